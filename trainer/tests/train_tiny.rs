//! Local training on tiny random models of both families (written by the
//! test): the zero-initialised adapter leaves the backbone's output
//! unchanged, training lowers the loss, and the frozen-prefix cache (in
//! memory and on disk) gives exactly the losses of recomputation.

use std::path::Path;

use heterotune_tests::fixtures;
use heterotune_trainer::adapters::dema::DemaConfig;
use heterotune_trainer::adapters::head::Pooling;
use heterotune_trainer::adapters::lora::{LoraConfig, ProjectionDims};
use heterotune_trainer::adapters::LayerSelection;
use heterotune_trainer::data::source::{load, DatasetConfig};
use heterotune_trainer::logit_adjustment;
use heterotune_trainer::models::load_backbone;
use heterotune_trainer::tokenizer::TextTokenizer;
use heterotune_trainer::train::{AdapterChoice, ClientModel, TrainSettings};
use tch::{Device, Kind};

fn model(dir: &Path, selection: LayerSelection) -> ClientModel {
    let backbone = load_backbone(dir, Device::Cpu, Kind::Float).expect("tiny backbone loads");
    let vocab = backbone.info().vocab_size;
    let tokenizer = TextTokenizer::for_model(dir, vocab).expect("tokenizer");
    let cfg = DemaConfig {
        rank: 4,
        experts: 2,
        slots: 2,
        layer_selection: selection,
        ..DemaConfig::default()
    };
    ClientModel::new(
        backbone,
        tokenizer,
        &AdapterChoice::Dema(cfg),
        3,
        Pooling::Mean,
        Device::Cpu,
    )
    .expect("model")
}

fn lora_model(dir: &Path, query_out: usize, value_out: usize) -> ClientModel {
    let backbone = load_backbone(dir, Device::Cpu, Kind::Float).expect("tiny backbone loads");
    let info = backbone.info().clone();
    let tokenizer = TextTokenizer::for_model(dir, info.vocab_size).expect("tokenizer");
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        scaling_rank: None,
        layers: (0..info.num_layers).collect(),
        init_seed: 1,
    };
    let dims = ProjectionDims {
        hidden: info.hidden_size,
        query_out,
        value_out,
    };
    ClientModel::new(
        backbone,
        tokenizer,
        &AdapterChoice::Lora(cfg, dims),
        3,
        Pooling::Mean,
        Device::Cpu,
    )
    .expect("lora model")
}

fn settings(steps: usize, cache: bool, dir: Option<&Path>) -> TrainSettings {
    TrainSettings {
        steps,
        batch_size: 16,
        learning_rate: 0.01,
        head_learning_rate: 0.05,
        weight_decay: 0.0,
        warmup_steps: 2,
        max_grad_norm: 1.0,
        max_seq_length: 16,
        eval_batch_size: 32,
        seed: 5,
        prefix_cache: cache,
        prefix_cache_bytes: 64 << 20,
        prefix_cache_dir: dir.map(Path::to_path_buf),
        gradient_checkpointing: false,
        logit_offsets: None,
    }
}

fn families(root: &Path) -> Vec<(&'static str, std::path::PathBuf)> {
    let bert = root.join("bert");
    let llama = root.join("llama");
    fixtures::write_tiny_bert(&bert, 32, 3, 2, 11);
    fixtures::write_tiny_llama(&llama, 32, 3, 4, 2, 12);
    vec![("bert", bert), ("llama", llama)]
}

#[test]
fn zero_init_adapters_leave_outputs_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (family, path) in families(dir.path()) {
        let m = model(&path, LayerSelection::SlotEnds);
        let texts = ["w1 w20 w30", "w7 w8 w40 w41 w42 w43"];
        let bare = m.hidden_states(&texts, 16, false).expect("bare");
        let adapted = m.hidden_states(&texts, 16, true).expect("adapted");
        let diff = (bare - adapted).abs().max().double_value(&[]);
        assert_eq!(
            diff, 0.0,
            "{family}: zero-initialised adapters changed the output by {diff}"
        );
    }
}

#[test]
fn training_lowers_the_loss_and_the_cache_is_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_file = dir.path().join("data.jsonl");
    fixtures::write_dataset(&data_file, 240, 3);
    let mut cfg = DatasetConfig::new(data_file.display().to_string());
    cfg.labels = Some(fixtures::LABELS.iter().map(|s| s.to_string()).collect());
    let examples = load(&cfg).expect("dataset").examples;
    for (family, path) in families(dir.path()) {
        // Before training, on the training data.
        let mut m = model(&path, LayerSelection::SlotEnds);
        let s = settings(40, true, None);
        let prepared = m.prepare(&examples, &s, "tiny").expect("prepare");
        let (_, before) = m.evaluate(&prepared, 32, 3).expect("eval");
        let report = m.train(&prepared, &s).expect("train");
        let (scores, after) = m.evaluate(&prepared, 32, 3).expect("eval");
        assert!(
            after < 0.7 * before,
            "{family}: loss {before:.4} -> {after:.4} did not go down enough"
        );
        assert!(
            scores.accuracy > 0.6,
            "{family}: training accuracy {}",
            scores.accuracy
        );
        assert!(
            report.cached_examples == examples.len(),
            "{family}: every example cached"
        );

        // The same run without the cache, and with a cache loaded from disk,
        // gives the same losses.
        let mut plain = model(&path, LayerSelection::SlotEnds);
        let s_plain = settings(40, false, None);
        let prepared_plain = plain.prepare(&examples, &s_plain, "tiny").expect("prepare");
        let plain_report = plain.train(&prepared_plain, &s_plain).expect("train");
        assert!(
            (plain_report.final_loss - report.final_loss).abs() < 1e-4,
            "{family}: cached {} vs recomputed {}",
            report.final_loss,
            plain_report.final_loss
        );
        let cache_dir = dir.path().join(format!("cache-{family}"));
        let s_disk = settings(40, true, Some(&cache_dir));
        let first = model(&path, LayerSelection::SlotEnds);
        let built = first.prepare(&examples, &s_disk, "tiny").expect("prepare");
        assert!(!built.from_disk);
        let mut second = model(&path, LayerSelection::SlotEnds);
        let loaded = second.prepare(&examples, &s_disk, "tiny").expect("prepare");
        assert!(loaded.from_disk, "{family}: the cache file was not reused");
        let disk_report = second.train(&loaded, &s_disk).expect("train");
        assert!(
            (disk_report.final_loss - report.final_loss).abs() < 1e-4,
            "{family}: disk cache changed the loss"
        );
    }
}

#[test]
fn lora_starts_exact_and_learns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_file = dir.path().join("data.jsonl");
    fixtures::write_dataset(&data_file, 240, 4);
    let mut cfg = DatasetConfig::new(data_file.display().to_string());
    cfg.labels = Some(fixtures::LABELS.iter().map(|s| s.to_string()).collect());
    let examples = load(&cfg).expect("dataset").examples;
    // (query, value) output widths: BERT square; the tiny LLaMA has 4 heads
    // of 8 and 2 key/value heads.
    for ((family, path), (q, v)) in families(dir.path()).into_iter().zip([(32, 32), (32, 16)]) {
        let mut m = lora_model(&path, q, v);
        let texts = ["w1 w20 w30", "w7 w8 w40"];
        let bare = m.hidden_states(&texts, 16, false).expect("bare");
        let adapted = m.hidden_states(&texts, 16, true).expect("adapted");
        assert_eq!(
            (bare - adapted).abs().max().double_value(&[]),
            0.0,
            "{family}: B = 0 at start"
        );
        let s = settings(40, true, None);
        let prepared = m.prepare(&examples, &s, "tiny").expect("prepare");
        let (_, before) = m.evaluate(&prepared, 32, 3).expect("eval");
        m.train(&prepared, &s).expect("train");
        let (_, after) = m.evaluate(&prepared, 32, 3).expect("eval");
        assert!(
            after < 0.7 * before,
            "{family}: LoRA loss {before:.4} -> {after:.4}"
        );
    }
}

#[test]
fn an_auto_client_trains_on_the_cpu_in_the_dtype_the_rule_chooses() {
    use heterotune_crds::dtype::{resolve_cpu, this_override, CpuBf16Units, Reason, TIMING_ENV};
    use heterotune_crds::spec::Dtype;
    use heterotune_trainer::client::{train_round, ClientOptions, TrainRound};

    let dir = tempfile::tempdir().expect("tempdir");
    // The fixture's clients leave `dtype` out: `auto`, the default.
    let yaml = fixtures::write_federation(dir.path(), "auto", 1, "  storage: { uri: \"/tmp\" }");
    let spec_file = dir.path().join("spec.yaml");
    std::fs::write(&spec_file, yaml).expect("spec");
    // The trainer's rule on this CPU (flags, override, and a timed GEMM
    // where the flags name bf16 units and the runner asks for it).
    let expected = heterotune_trainer::job::resolve_dtype(Dtype::Auto, tch::Device::Cpu);
    assert_ne!(expected.dtype, Dtype::Auto);
    let opts = ClientOptions {
        spec: spec_file,
        client: "tiny-llama".into(),
        threads: Some(1),
        device: "cpu".into(),
    };
    let out = dir.path().join("out");
    let args = TrainRound {
        round: 1,
        global: None,
        state_in: None,
        state_out: None,
        cache_dir: None,
        out: &out,
        run: "auto-test",
    };
    let summary = train_round(&opts, &args).expect("an auto client trains");
    let m = &summary.manifest;
    assert_eq!(m.stats["dtype"], expected.dtype.as_str());
    assert_eq!(m.stats["dtypeChoice"], expected.to_string());
    // A trainer not started by `heterotune run` or `heterotune site` (here:
    // in-process, as a pod's) does not time: the flags decide, the same in
    // every process, whatever a kept timing says.
    if std::env::var_os(TIMING_ENV).is_none() {
        assert!(
            !matches!(expected.reason, Reason::Timed { .. }),
            "{expected}"
        );
        assert_eq!(
            expected,
            resolve_cpu(Dtype::Auto, CpuBf16Units::detect(), this_override())
        );
    }
    assert_eq!(
        m.metrics.get("backbone_dtype_bytes"),
        Some(&(expected.dtype.bytes() as f64))
    );
    assert!(m.metrics["loss"].is_finite(), "{:?}", m.metrics);
    assert!(summary.to_string().contains(&expected.to_string()));
}

/// The share of `examples` that `m` puts in class 0.
fn share_said_class_0(m: &ClientModel, data: &heterotune_trainer::train::Prepared) -> f64 {
    let logits = m.logits(data, 32).expect("logits");
    let said: Vec<i64> = Vec::try_from(logits.argmax(-1, false)).expect("argmax");
    said.iter().filter(|&&c| c == 0).count() as f64 / said.len() as f64
}

/// `training.logitAdjustment`: a client whose data is one class learns to
/// say that class for everything with plain cross-entropy, and does not
/// with the adjusted loss (no cross-entropy over classes it holds no
/// example of). On skewed two-class data the adjusted loss trains, and
/// gradient checkpointing trains it to the same weights.
#[test]
fn logit_offsets_keep_a_one_class_client_from_saying_its_class_for_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_file = dir.path().join("data.jsonl");
    fixtures::write_dataset(&data_file, 240, 3);
    let mut cfg = DatasetConfig::new(data_file.display().to_string());
    cfg.labels = Some(fixtures::LABELS.iter().map(|s| s.to_string()).collect());
    let all = load(&cfg).expect("dataset").examples;
    let one_class: Vec<_> = all.iter().filter(|e| e.label == 0).cloned().collect();
    let offsets = logit_adjustment::offsets(one_class.iter().map(|e| e.label), 3, None);
    for (family, path) in families(dir.path()) {
        let plain_settings = settings(40, false, None);
        let adjusted_settings = TrainSettings {
            logit_offsets: Some(offsets.clone()),
            ..plain_settings.clone()
        };
        let mut plain = model(&path, LayerSelection::SlotEnds);
        let train = plain
            .prepare(&one_class, &plain_settings, "tiny")
            .expect("prepare");
        let everything = plain
            .prepare(&all, &plain_settings, "tiny")
            .expect("prepare");
        plain.train(&train, &plain_settings).expect("train");
        let mut adjusted = model(&path, LayerSelection::SlotEnds);
        adjusted.train(&train, &adjusted_settings).expect("train");
        let untrained = model(&path, LayerSelection::SlotEnds)
            .logits(&everything, 32)
            .expect("logits");
        let p = share_said_class_0(&plain, &everything);
        assert!(
            p > 0.95,
            "{family}: class 0 said for {p:.2} of all examples"
        );
        // No cross-entropy, no step: the one class cannot be told apart
        // from anything with this data alone.
        let unmoved = (adjusted.logits(&everything, 32).expect("logits") - &untrained)
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            unmoved < 1e-6,
            "{family}: the adjusted model moved by {unmoved}"
        );

        // Skewed, two classes: the adjusted loss has a gradient.
        let skewed: Vec<_> = all
            .iter()
            .filter(|e| e.label == 0)
            .chain(all.iter().filter(|e| e.label == 1).take(8))
            .cloned()
            .collect();
        let skewed_settings = TrainSettings {
            logit_offsets: Some(logit_adjustment::offsets(
                skewed.iter().map(|e| e.label),
                3,
                None,
            )),
            ..plain_settings.clone()
        };
        let skewed = plain
            .prepare(&skewed, &plain_settings, "tiny")
            .expect("prepare");
        let mut straight = model(&path, LayerSelection::SlotEnds);
        straight.train(&skewed, &skewed_settings).expect("train");
        let mut checkpointed = model(&path, LayerSelection::SlotEnds);
        checkpointed
            .train(
                &skewed,
                &TrainSettings {
                    gradient_checkpointing: true,
                    ..skewed_settings.clone()
                },
            )
            .expect("train");
        let logits = straight.logits(&everything, 32).expect("logits");
        let moved = (&logits - &untrained).abs().max().double_value(&[]);
        assert!(
            moved > 1e-3,
            "{family}: the adjusted loss did not train ({moved})"
        );
        let diff = (logits - checkpointed.logits(&everything, 32).expect("logits"))
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            diff < 1e-4,
            "{family}: checkpointing changed the logits by {diff}"
        );
    }
}
