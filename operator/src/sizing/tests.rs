//! Sizing by hand: parameter counts, estimates, placements.

use super::*;
use heterotune_crds::model::{LayerSelection, ModelFacts, SlotMap};
use heterotune_crds::spec::LayerSelectionMode;
use heterotune_crds::spec::{
    ClientSpec, Dtype, FederatedTuneSpec, LayerSelectionSpec, ModelFamily,
};

/// A spec with `clients` (name, family, uri, dtype) and `extra` YAML under `spec:`.
fn spec(clients: &[(&str, &str, &str, &str)], extra: &str) -> FederatedTuneSpec {
    let list: String = clients
        .iter()
        .map(|(n, f, u, d)| {
            format!("    - name: {n}\n      model: {{ family: {f}, uri: \"{u}\", dtype: {d} }}\n")
        })
        .collect();
    let yaml = format!(
        "apiVersion: heterotune.dev/v1alpha1\nkind: FederatedTune\nmetadata: {{ name: t }}\nspec:\n  clients:\n{list}  task:\n    dataset: {{ uri: \"s3://d/x.jsonl\" }}\n    labels: [ABBR, DESC, ENTY, HUM, LOC, NUM]\n{extra}"
    );
    heterotune_crds::validate::parse_federated_tune(&yaml)
        .expect("valid test spec")
        .spec
}

/// [`place`] without a bridge.
fn place_alone(
    client: &ClientSpec,
    shape: Option<&ModelShape>,
    w: &Workload,
    allow_cpu: bool,
    config: &SizingConfig,
    index: usize,
) -> Result<Placement, SizingError> {
    place(client, shape, w, None, allow_cpu, config, index)
}

fn profiles() -> SizingConfig {
    let json = serde_json::json!({
        "gpuProfiles": [
            { "name": "a100-80gb", "memory": "80Gi", "nodeSelector": { "gpu": "a100-80" } },
            { "name": "l4-24gb", "memory": "24Gi", "nodeSelector": { "gpu": "l4" },
              "tolerations": [{ "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule" }] },
            { "name": "a100-40gb", "memory": 42949672960u64 }
        ]
    });
    serde_json::from_value(json).expect("valid sizing config")
}

const MINILM_L6: &str = r#"{"model_type":"bert","hidden_size":384,"intermediate_size":1536,"num_hidden_layers":6,
    "num_attention_heads":12,"vocab_size":30522,"max_position_embeddings":512,"type_vocab_size":2}"#;
const LLAMA_7B: &str = r#"{"model_type":"llama","hidden_size":4096,"intermediate_size":11008,"num_hidden_layers":32,
    "num_attention_heads":32,"num_key_value_heads":32,"vocab_size":32000,"tie_word_embeddings":false}"#;
const LLAMA_13B: &str = r#"{"model_type":"llama","hidden_size":5120,"intermediate_size":13824,"num_hidden_layers":40,
    "num_attention_heads":40,"num_key_value_heads":40,"vocab_size":32000,"tie_word_embeddings":false}"#;

fn shape(json: &str) -> ModelShape {
    ModelShape::from_facts(
        &ModelFacts::from_bytes(std::path::Path::new("config.json"), json.as_bytes())
            .expect("facts"),
    )
}

#[test]
fn parameter_counts_match_the_model_cards() {
    // all-MiniLM-L6-v2: embeddings (30522 + 512 + 2)·384 + 2·384 = 11,918,592;
    // a layer 4·(384² + 384) + 2·384·1536 + 1536 + 384 + 4·384 = 1,774,464; 6 layers.
    // 22,565,376 without the 147,840-parameter pooler the trainer does not load
    // (the card's 22.7 M counts it).
    let l6 = shape(MINILM_L6);
    assert_eq!(l6.parameters, 11_918_592 + 6 * 1_774_464);
    assert_eq!(l6.parameters, 22_565_376);
    assert_eq!(
        packaged_model("cache://models/all-MiniLM-L6-v2").map(|s| s.parameters),
        Some(22_565_376)
    );
    // paraphrase-MiniLM-L3-v2: 11,918,592 + 3 · 1,774,464 = 17,241,984 (17.2 M).
    assert_eq!(
        packaged_model("cache://models/paraphrase-MiniLM-L3-v2").map(|s| s.parameters),
        Some(17_241_984)
    );
    // all-mpnet-base-v2: embeddings (30527 + 514)·768 + 2·768 = 23,841,024 (no token
    // types); a layer as BERT's at d = 768, i = 3072: 7,087,872; 12 layers; the
    // relative-position bias 32 buckets · 12 heads = 384: 108,895,872 (the
    // checkpoint's 109.5 M counts the 590,592-parameter pooler).
    assert_eq!(
        packaged_model("cache://models/all-mpnet-base-v2").map(|s| s.parameters),
        Some(23_841_024 + 12 * 7_087_872 + 384)
    );
    assert_eq!(
        packaged_model("s3://m/all-mpnet-base-v2/").map(|s| s.parameters),
        Some(108_895_872)
    );
    // SmolLM2-135M: embeddings 49152·576 = 28,311,552; a layer: q 576·576, k and v
    // 576·192 (3 kv heads of 64), o 576·576, MLP 3·576·1536, 2 norms = 3,540,096;
    // 30 layers, final norm 576, tied head: 134,515,008 (134.5 M).
    let smol = packaged_model("s3://models/SmolLM2-135M-Instruct").expect("packaged");
    assert_eq!(smol.parameters, 28_311_552 + 30 * 3_540_096 + 576);
    assert_eq!(smol.parameters, 134_515_008);
    // Its first 14 layers: 28,311,552 + 14 · 3,540,096 + 576 = 77,873,472
    // (the 312 MB f32 file setup writes).
    let mid = packaged_model("cache://models/SmolLM2-135M-Instruct-L14").expect("packaged");
    assert_eq!((mid.parameters, mid.num_layers), (77_873_472, 14));
    // LLaMA-7B: 32000·4096 (embeddings) + 32·(4·4096² + 3·4096·11008 + 2·4096)
    // + 4096 (norm) + 32000·4096 (untied head) = 6,738,415,616.
    assert_eq!(shape(LLAMA_7B).parameters, 6_738_415_616);
    // LLaMA-13B: 2·32000·5120 + 40·(4·5120² + 3·5120·13824 + 2·5120) + 5120 = 13,015,864,320.
    assert_eq!(shape(LLAMA_13B).parameters, 13_015_864_320);
}

#[test]
fn adapted_layers_follow_the_trainer_slot_map() {
    let ends = LayerSelectionSpec::default();
    assert_eq!(adapted_layers(30, 3, &ends), vec![9, 19, 29]);
    assert_eq!(adapted_layers(6, 3, &ends), vec![1, 3, 5]);
    assert_eq!(adapted_layers(3, 3, &ends), vec![0, 1, 2]);
    assert_eq!(adapted_layers(32, 3, &ends), vec![10, 21, 31]);
    let top = LayerSelectionSpec {
        mode: LayerSelectionMode::TopWindow,
        window: Some(6),
        every_layer_in_group: false,
    };
    assert_eq!(adapted_layers(30, 3, &top), vec![25, 27, 29]);
}

/// Every valid setting up to 40 layers: the estimate's adapted layers
/// are exactly the trainer's slot map, and the slot count it resolves
/// is the depth the trainer's check accepts.
#[test]
fn sizing_and_trainer_share_one_slot_map() {
    for layers in 1..=40u64 {
        for window in 1..=layers {
            for every in [false, true] {
                let spec = LayerSelectionSpec {
                    mode: LayerSelectionMode::TopWindow,
                    window: Some(window as u32),
                    every_layer_in_group: every,
                };
                let sel = LayerSelection::from_spec(&spec, layers as usize);
                assert_eq!(window_depth(layers, &spec), window);
                for slots in 1..=window {
                    let map = SlotMap::new(layers as usize, slots as usize, sel, every)
                        .expect("valid settings");
                    let trainer: Vec<u64> = map
                        .adapted_layers()
                        .iter()
                        .map(|&(l, _)| l as u64)
                        .collect();
                    assert_eq!(adapted_layers(layers, slots, &spec), trainer);
                }
                assert!(SlotMap::new(layers as usize, window as usize + 1, sel, every).is_err());
            }
        }
    }
}

#[test]
fn minilm_l6_estimate_by_hand() {
    // Defaults: f32, batch 16, eval batch 64, 32 tokens, DeMA r 8, K 4, S 3, 6 classes,
    // prefix cache 2048 MiB.
    let s = spec(
        &[("a", "bert", "cache://models/all-MiniLM-L6-v2", "float32")],
        "",
    );
    let w = Workload::of(&s, 0, 3);
    let e = estimate(&shape(MINILM_L6), &w, &SizingConfig::default(), Target::Cpu);
    // trainable: shared 3·(4·(64+8) + 4·8 + 4) = 972; family 2·8·384·3 = 18,432;
    // head 384·6 + 6 = 2,310.
    assert_eq!(e.own.trainable_parameters, 972 + 18_432 + 2_310);
    assert_eq!(e.own.weights, 22_565_376 * 4);
    assert_eq!(e.own.adapter_state, 16 * 21_714);
    // On a CPU in f32 (sizing::CPU_F32) a layer keeps 57·s·b·d = 57·32·16·384 = 11,206,656
    // (fused attention: no s² term); adapted 1, 3, 5: layers 2..=5 keep activations; DeMA
    // adds 50 · 16·32·384 = 9,830,400 per adapted layer.
    assert_eq!(e.own.activations, 4 * 11_206_656 + 3 * 9_830_400);
    // workspace 7·32·64·384 = 5,505,024
    assert_eq!(e.own.workspace, 5_505_024);
    assert_eq!(e.own.prefix_cache, 2048 * MIB);
    let sum = 90_261_504 + 347_424 + 74_317_824 + 5_505_024 + 2_147_483_648u64;
    assert_eq!(sum, 2_317_915_424);
    // margin: ceil(10 %) = 231,791,543; CPU runtime 180 MiB.
    assert_eq!(e.total, 2_317_915_424 + 231_791_543 + 180 * MIB);
    assert_eq!(e.total, 2_738_450_647);
}

#[test]
fn minilm_l3_estimate_by_hand() {
    let s = spec(
        &[(
            "a",
            "bert",
            "cache://models/paraphrase-MiniLM-L3-v2",
            "float32",
        )],
        "",
    );
    let shape = packaged_model(&s.clients[0].model.uri).expect("packaged");
    let e = estimate(
        &shape,
        &Workload::of(&s, 0, 3),
        &SizingConfig::default(),
        Target::Cpu,
    );
    // Adapted 0, 1, 2: layers 1 and 2 keep activations (2 · 11,206,656), DeMA 3 · 9,830,400.
    assert_eq!(e.own.activations, 51_904_512);
    // 68,967,936 + 347,424 + 51,904,512 + 5,505,024 + 2,147,483,648 = 2,274,208,544;
    // margin 227,420,855; runtime 180 MiB.
    assert_eq!(e.total, 2_274_208_544 + 227_420_855 + 180 * MIB);
}

#[test]
fn smollm2_estimate_by_hand_and_cpu_placement() {
    let s = spec(
        &[(
            "a",
            "llama",
            "cache://models/SmolLM2-135M-Instruct",
            "float32",
        )],
        "",
    );
    let shape = packaged_model(&s.clients[0].model.uri).expect("packaged");
    let w = Workload::of(&s, 0, 3);
    let e = estimate(&shape, &w, &SizingConfig::default(), Target::Cpu);
    // trainable: 972 + 2·8·576·3 (27,648) + 576·6 + 6 (3,462) = 32,082.
    assert_eq!(e.own.trainable_parameters, 32_082);
    // A layer: 57·32·16·576 = 16,809,984 (f32: no causal-mask term); adapted 9, 19, 29:
    // 20 layers keep activations; DeMA 3 · 50·16·32·576 = 3 · 14,745,600.
    assert_eq!(e.own.activations, 20 * 16_809_984 + 3 * 14_745_600);
    // workspace 7·32·64·576 = 8,257,536
    assert_eq!(e.own.workspace, 8_257_536);
    // 538,060,032 + 513,312 + 380,436,480 + 8,257,536 + 2,147,483,648 = 3,074,751,008
    assert_eq!(e.total, 3_074_751_008 + 307_475_101 + 180 * MIB);
    // 134.5 M parameters ≤ 200 M: CPU by default, even with GPU profiles.
    let p = place_alone(&s.clients[0], Some(&shape), &w, true, &profiles(), 0).expect("placed");
    assert_eq!(p.profile_name(), "cpu");
    assert_eq!(p.estimated_bytes(), Some(3_570_969_789));
}

fn llama_workload(checkpointing: bool) -> (FederatedTuneSpec, Workload) {
    let extra = format!(
        "  training: {{ batchSize: 8, evalBatchSize: 8, maxSeqLength: 512, gradientCheckpointing: {checkpointing}, prefixCache: {{ enabled: false }} }}\n  adapter: {{ rank: 16, experts: 4, slots: 3 }}\n"
    );
    let s = spec(
        &[("big", "llama", "s3://models/llama-7b", "bfloat16")],
        &extra,
    );
    let w = Workload::of(&s, 0, 3);
    (s, w)
}

#[test]
fn llama_7b_estimate_by_hand_picks_the_40gb_profile() {
    let (s, w) = llama_workload(false);
    let shape = shape(LLAMA_7B);
    let e = estimate(&shape, &w, &SizingConfig::default(), Target::Gpu);
    // bf16 weights: 6,738,415,616 · 2.
    assert_eq!(e.own.weights, 13_476_831_232);
    // trainable: 3·(4·(256+16) + 4·16 + 4) = 3,468; 2·16·4096·3 = 393,216; 4096·6 + 6 = 24,582.
    assert_eq!(e.own.trainable_parameters, 421_266);
    // act(8) = 34·512·8·4096 + 5·32·512²·8 = 570,425,344 + 335,544,320 = 905,969,664 (bf16);
    // adapted 10, 21, 31: 21 layers keep activations.
    assert_eq!(e.own.activations, 21 * 905_969_664);
    assert_eq!(e.own.workspace, 905_969_664);
    // 13,476,831,232 + 6,740,256 + 19,025,362,944 + 905,969,664 = 33,414,904,096;
    // margin 3,341,490,410; GPU runtime 1 GiB: 37,830,136,330 bytes (35.2 GiB).
    assert_eq!(e.total, 33_414_904_096 + 3_341_490_410 + 1_073_741_824);
    let p = place_alone(&s.clients[0], Some(&shape), &w, true, &profiles(), 0).expect("placed");
    assert_eq!(p.profile_name(), "a100-40gb");
    match p {
        Placement::Gpu { host_memory, .. } => {
            assert_eq!(host_memory, 13_476_831_232 + 512 * MIB)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn auto_is_sized_as_bfloat16_on_a_gpu_and_float32_on_a_cpu() {
    // The default dtype: the llama-7b estimate above on a GPU, the
    // float32 MiniLM-L6 estimate on a CPU.
    let (s, explicit) = llama_workload(false);
    let auto = Workload {
        dtype: Dtype::Auto,
        ..explicit.clone()
    };
    let (llama, config) = (shape(LLAMA_7B), SizingConfig::default());
    let gpu = estimate(&llama, &auto, &config, Target::Gpu);
    assert_eq!(gpu, estimate(&llama, &explicit, &config, Target::Gpu));
    assert_eq!(gpu.own.weights, 13_476_831_232);
    let p = place_alone(&s.clients[0], Some(&llama), &auto, true, &profiles(), 0).expect("placed");
    assert_eq!(p.profile_name(), "a100-40gb");
    let cpu = estimate(&llama, &auto, &config, Target::Cpu);
    assert_eq!(cpu.own.weights, 2 * 13_476_831_232);
    // CPU nodes with bf16 units (`sizing.cpu.autoDtype`, what `heterotune plan` sets
    // from the CPU it runs on): half the weights, plus an f32-sized copy of the token
    // embeddings (sizing::CPU_16BIT: 3 · 32000 · 4096).
    let mut bf16_nodes = config.clone();
    bf16_nodes.cpu.auto_dtype = Dtype::Bfloat16;
    let cpu_bf16 = estimate(&llama, &auto, &bf16_nodes, Target::Cpu);
    assert_eq!(cpu_bf16.own.weights, 13_476_831_232 + 393_216_000);
    let minilm = "cache://models/all-MiniLM-L6-v2";
    let f32_spec = spec(&[("a", "bert", minilm, "float32")], "");
    let auto_spec = spec(&[("a", "bert", minilm, "auto")], "");
    let (l6, f32_w) = (shape(MINILM_L6), Workload::of(&f32_spec, 0, 3));
    let auto_w = Workload::of(&auto_spec, 0, 3);
    assert_eq!(auto_w.dtype, Dtype::Auto);
    assert_eq!(
        estimate(&l6, &auto_w, &config, Target::Cpu).total,
        estimate(&l6, &f32_w, &config, Target::Cpu).total
    );
}

#[test]
fn gradient_checkpointing_moves_llama_7b_to_a_24gb_gpu() {
    let (s, w) = llama_workload(true);
    let shape = shape(LLAMA_7B);
    let e = estimate(&shape, &w, &SizingConfig::default(), Target::Gpu);
    // 21 layer inputs 8·512·4096·2 = 33,554,432 each, plus one recomputed layer.
    assert_eq!(e.own.activations, 21 * 33_554_432 + 905_969_664);
    // 13,483,571,488 + 1,610,612,736 + 905,969,664 = 16,000,153,888; margin 1,600,015,389.
    assert_eq!(e.total, 16_000_153_888 + 1_600_015_389 + 1_073_741_824);
    let p = place_alone(&s.clients[0], Some(&shape), &w, true, &profiles(), 0).expect("placed");
    assert_eq!(p.profile_name(), "l4-24gb");
}

#[test]
fn llama_13b_needs_80gb_and_fits_nothing_smaller() {
    let (s, w) = llama_workload(false);
    let shape = shape(LLAMA_13B);
    let e = estimate(&shape, &w, &SizingConfig::default(), Target::Gpu);
    // act(8) = 34·512·8·5120 + 5·40·512²·8 = 713,031,680 + 419,430,400 = 1,132,462,080;
    // adapted 13, 26, 39: 26 layers keep activations.
    assert_eq!(e.own.activations, 26 * 1_132_462_080);
    // trainable 3,468 + 2·16·5120·3 + 5120·6 + 6 = 525,714
    assert_eq!(e.own.trainable_parameters, 525_714);
    // 26,031,728,640 + 8,411,424 + 29,444,014,080 + 1,132,462,080 = 56,616,616,224;
    // margin 5,661,661,623; + 1 GiB: 63,352,019,671 bytes (59.0 GiB).
    assert_eq!(e.total, 56_616_616_224 + 5_661_661_623 + 1_073_741_824);
    let p = place_alone(&s.clients[0], Some(&shape), &w, true, &profiles(), 0).expect("placed");
    assert_eq!(p.profile_name(), "a100-80gb");
    let mut small = profiles();
    small.gpu_profiles.retain(|p| p.name != "a100-80gb");
    let err = place_alone(&s.clients[0], Some(&shape), &w, true, &small, 0).expect_err("too large");
    let text = err.to_string();
    assert!(
        text.contains("needs about 59.0 GiB")
            && text.contains("(a100-40gb) has 40.0 GiB")
            && text.contains("200000000"),
        "{text}"
    );
}

#[test]
fn cpu_rules_and_explicit_resources() {
    let s = spec(
        &[("a", "bert", "cache://models/all-MiniLM-L6-v2", "float32")],
        "",
    );
    let shape = shape(MINILM_L6);
    let w = Workload::of(&s, 0, 3);
    // allowCpu false and no profiles: a clear error.
    let err = place_alone(
        &s.clients[0],
        Some(&shape),
        &w,
        false,
        &SizingConfig::default(),
        0,
    )
    .expect_err("no fit");
    assert!(matches!(err, SizingError::NoGpuProfileFits { .. }));
    assert!(err.to_string().contains("allowCpu is false"), "{err}");
    // allowCpu false with profiles: the smallest GPU (24 GiB).
    let p = place_alone(&s.clients[0], Some(&shape), &w, false, &profiles(), 0).expect("gpu");
    assert_eq!(p.profile_name(), "l4-24gb");
    // Not preferring CPU: GPU when one fits, CPU as the fallback.
    let mut cfg = profiles();
    cfg.cpu.prefer_for_small_models = false;
    assert_eq!(
        place_alone(&s.clients[0], Some(&shape), &w, true, &cfg, 0)
            .expect("gpu")
            .profile_name(),
        "l4-24gb"
    );
    cfg.gpu_profiles.clear();
    assert_eq!(
        place_alone(&s.clients[0], Some(&shape), &w, true, &cfg, 0)
            .expect("cpu")
            .profile_name(),
        "cpu"
    );
    // Unknown size.
    let err = place_alone(&s.clients[0], None, &w, true, &cfg, 2).expect_err("unknown");
    assert!(
        err.to_string().contains("spec.clients[2].model.parameters"),
        "{err}"
    );
    // Explicit resources win.
    let mut c = s.clients[0].clone();
    c.resources = Some(Default::default());
    assert_eq!(
        place_alone(&c, None, &w, false, &cfg, 0)
            .expect("explicit")
            .profile_name(),
        "explicit"
    );
}

#[test]
fn shapes_from_parameters_and_quantities() {
    let s = ModelShape::from_parameters(ModelFamily::Llama, 6_738_415_616);
    // cbrt(6,738,415,616 · 32/3) = 4158; L = 4158/128 = 32.
    assert_eq!((s.hidden_size, s.num_layers, s.num_heads), (4158, 32, 64));
    assert_eq!(parse_quantity("24Gi"), Some(24 * GIB));
    assert_eq!(parse_quantity("512M"), Some(512_000_000));
    assert_eq!(parse_quantity("1073741824"), Some(GIB));
    assert_eq!(parse_quantity("lots"), None);
    assert_eq!(quantity_mib(GIB + 1), "1025Mi");
    let spec2 = spec(
        &[
            ("a", "llama", "cache://models/SmolLM2-135M", "float32"),
            (
                "b",
                "bert",
                "cache://models/paraphrase-MiniLM-L3-v2",
                "float32",
            ),
        ],
        "",
    );
    let shapes: Vec<Option<ModelShape>> = spec2
        .clients
        .iter()
        .map(|c| packaged_model(&c.model.uri))
        .collect();
    assert_eq!(resolve_slots(&spec2, &shapes), 3);
}

const BRIDGE: &str =
    "  bridge: { model: { family: bert, uri: \"cache://models/paraphrase-MiniLM-L3-v2\" } }\n";

/// A SmolLM2 client (float32, top 6 layers, LoRA rank 4 of its own) with
/// `adapter.slots: 2` and `extra`.
fn smollm2_client(extra: &str) -> FederatedTuneSpec {
    let client = "cache://models/SmolLM2-135M-Instruct";
    let mut s = spec(
        &[("a", "llama", client, "float32")],
        &format!("  adapter: {{ slots: 2 }}\n{extra}"),
    );
    s.clients[0].model.adapted_layers = Some(LayerSelectionSpec {
        mode: LayerSelectionMode::TopWindow,
        window: Some(6),
        every_layer_in_group: false,
    });
    s.clients[0].lora_rank = Some(4);
    s
}

#[test]
fn a_bridge_adds_exactly_its_parts_to_every_client() {
    let (with, without) = (smollm2_client(BRIDGE), smollm2_client(""));
    let own = packaged_model("cache://models/SmolLM2-135M-Instruct").expect("packaged");
    let l3 = packaged_model("cache://models/paraphrase-MiniLM-L3-v2");
    let bridge = BridgeModel::of(&with, l3)
        .expect("a bridge")
        .expect("known size");
    assert_eq!(BridgeModel::of(&without, None), None);
    // The bridge's DeMA: adapter.rank 8 (not the client's 4), one slot per
    // adapted layer of its own selection (3, not adapter.slots = 2).
    assert_eq!((bridge.workload.rank, bridge.workload.slots), (8, 3));
    let config = SizingConfig::default();
    let parts = bridge.parts(&config, Target::Cpu);
    // The same numbers as the paraphrase-MiniLM-L3-v2 client above, less
    // the runtime: 68,967,936 + 347,424 + 51,904,512 + 5,505,024 +
    // 2,147,483,648 (its own prefix cache) + margin 227,420,855.
    assert_eq!(parts.trainable_parameters, 21_714);
    assert_eq!(parts.weights, 17_241_984 * 4);
    assert_eq!(parts.prefix_cache, 2048 * MIB);
    assert_eq!(parts.total(), 2_274_208_544 + 227_420_855);
    let w = Workload::of(&with, 0, 2);
    assert_eq!(w, Workload::of(&without, 0, 2));
    let known = Some(Ok(bridge.clone()));
    for (target, cfg) in [(Target::Cpu, config.clone()), (Target::Gpu, profiles())] {
        let alone = estimate(&own, &w, &cfg, target);
        let both = alone.with_bridge(bridge.parts(&cfg, target));
        assert_eq!(both.total, alone.total + bridge.parts(&cfg, target).total());
        assert_eq!((both.own, both.runtime), (alone.own, alone.runtime));
    }
    // Placement uses the sum: on CPU (134.5 M + 17.2 M ≤ 200 M) …
    let on_cpu = place(
        &with.clients[0],
        Some(&own),
        &w,
        known.as_ref(),
        true,
        &config,
        0,
    );
    let alone = place_alone(&without.clients[0], Some(&own), &w, true, &config, 0);
    let (on_cpu, alone) = (on_cpu.expect("cpu"), alone.expect("cpu"));
    assert_eq!(on_cpu.profile_name(), "cpu");
    assert_eq!(
        on_cpu.estimated_bytes(),
        alone.estimated_bytes().map(|b| b + 2_501_629_399)
    );
    // … and on a GPU, where the host stages both backbones' weights.
    let gpu = place(
        &with.clients[0],
        Some(&own),
        &w,
        known.as_ref(),
        false,
        &profiles(),
        0,
    );
    match gpu.expect("gpu") {
        Placement::Gpu {
            estimate,
            host_memory,
            ..
        } => {
            let bf16 = bridge.parts(&profiles(), Target::Gpu);
            assert_eq!(bf16.weights, 17_241_984 * 2);
            assert_eq!(estimate.bridge, Some(bf16));
            // The client's float32, the bridge's `auto` as bfloat16.
            assert_eq!(host_memory, 134_515_008 * 4 + 17_241_984 * 2 + 512 * MIB);
        }
        other => panic!("{other:?}"),
    }
    // The CPU rule counts both backbones: 190 M + 17.2 M > 200 M.
    let mut big = with.clone();
    big.clients[0].model.parameters = Some(190_000_000);
    let big_shape = ModelShape::from_parameters(ModelFamily::Llama, 190_000_000);
    let p = place(
        &big.clients[0],
        Some(&big_shape),
        &w,
        known.as_ref(),
        true,
        &profiles(),
        0,
    );
    assert_eq!(p.expect("gpu").profile_name(), "l4-24gb");
}

#[test]
fn an_unknown_bridge_names_its_field() {
    let s =
        smollm2_client("  bridge: { model: { family: bert, uri: \"s3://m/private-bridge\" } }\n");
    let own = packaged_model("cache://models/SmolLM2-135M-Instruct").expect("packaged");
    let unknown = BridgeModel::of(&s, None).expect("a bridge");
    let w = Workload::of(&s, 0, 2);
    let err = place(
        &s.clients[0],
        Some(&own),
        &w,
        Some(&unknown),
        true,
        &profiles(),
        0,
    )
    .expect_err("unknown bridge");
    assert_eq!(
        err,
        SizingError::UnknownBridge {
            uri: "s3://m/private-bridge".into()
        }
    );
    let text = err.to_string();
    assert!(
        text.contains("s3://m/private-bridge (spec.bridge.model.uri)")
            && text.contains("spec.bridge.model.parameters"),
        "{text}"
    );
    // Explicit resources still win, without an estimate.
    let mut c = s.clients[0].clone();
    c.resources = Some(Default::default());
    let p = place(&c, Some(&own), &w, Some(&unknown), true, &profiles(), 0).expect("explicit");
    assert_eq!(p, Placement::Explicit { estimate: None });
}
