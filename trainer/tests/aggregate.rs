//! Aggregation end to end through the file layout: verification of untrusted
//! client artifacts, CMGA and the baselines on hand-computed cases, and
//! determinism.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use heterotune_crds::manifest::{ArtifactKind, ArtifactManifest};
use heterotune_crds::spec::FederatedTuneSpec;
use heterotune_trainer::aggregate::{
    self, aggregate_round, clients_dir, read_global, write_global, AggregateOutcome, Array,
    RejectReason,
};
use heterotune_trainer::artifact::{sha256_hex, write_artifact, StoreDtype};
use heterotune_trainer::exchange::client_view;
use heterotune_trainer::Error;
use serde_json::json;
use tch::Tensor;

const RUN: &str = "team/run-0f1e2d3c";

fn spec(value: serde_json::Value) -> FederatedTuneSpec {
    let mut base = json!({
        "task": {"dataset": {"uri": "/data/d.jsonl"}, "labels": ["x", "y"]},
        "adapter": {"rank": 1, "experts": 1, "slots": 1},
    });
    let (b, v) = (
        base.as_object_mut().expect("object"),
        value.as_object().expect("object"),
    );
    for (k, val) in v {
        b.insert(k.clone(), val.clone());
    }
    serde_json::from_value(base).expect("spec")
}

/// Clients `(name, model uri)` as spec JSON.
fn clients(list: &[(&str, &str)]) -> serde_json::Value {
    json!(list
        .iter()
        .map(|(n, uri)| json!({"name": n, "model": {"family": "bert", "uri": uri}}))
        .collect::<Vec<_>>())
}

fn key(spec: &FederatedTuneSpec, client: &str) -> String {
    let i = spec
        .clients
        .iter()
        .position(|c| c.name == client)
        .expect("client");
    spec.family_key(i)
}

fn arr(shape: &[usize], data: &[f32]) -> Array {
    Array::new(shape.to_vec(), data.to_vec()).expect("array")
}

fn global_manifest(round: u32) -> ArtifactManifest {
    ArtifactManifest {
        created_at: "2026-01-01T00:00:00Z".into(),
        ..ArtifactManifest::new(
            ArtifactKind::Global,
            RUN,
            round,
            round.saturating_sub(1),
            "test",
        )
    }
}

/// The DeMA shared part with r = K = S = 1, values in flatten order
/// (experts.bias, experts.weight, gate.bias, gate.weight).
fn shared(v: [f32; 4]) -> BTreeMap<String, Array> {
    let mut m = BTreeMap::new();
    m.insert("shared.slot0.experts.bias".into(), arr(&[1, 1], &[v[0]]));
    m.insert(
        "shared.slot0.experts.weight".into(),
        arr(&[1, 1, 1], &[v[1]]),
    );
    m.insert("shared.slot0.gate.bias".into(), arr(&[1], &[v[2]]));
    m.insert("shared.slot0.gate.weight".into(), arr(&[1, 1], &[v[3]]));
    m
}

/// Family parts (one adapted layer, width d) and a 2-class head, all `value`.
fn family_parts(d: usize, value: f32) -> BTreeMap<String, Array> {
    let mut m = BTreeMap::new();
    m.insert(
        "family.layer0.down.weight".into(),
        arr(&[1, d], &vec![value; d]),
    );
    m.insert(
        "family.layer0.up.weight".into(),
        arr(&[d, 1], &vec![value; d]),
    );
    m.insert("head.weight".into(), arr(&[2, d], &vec![value; 2 * d]));
    m.insert("head.bias".into(), arr(&[2], &[value; 2]));
    m
}

/// The round-0 global of a DeMA spec: shared values `v`, every family's
/// parts at 0.25 (width from `widths`, by family key).
fn dema_global(
    spec: &FederatedTuneSpec,
    v: [f32; 4],
    widths: &BTreeMap<String, usize>,
) -> BTreeMap<String, Array> {
    let mut g = shared(v);
    for i in 0..spec.clients.len() {
        let k = spec.family_key(i);
        for (name, a) in family_parts(widths[&k], 0.25) {
            g.insert(format!("family/{k}/{name}"), a);
        }
    }
    g
}

fn to_tensor(a: &Array) -> Tensor {
    let shape: Vec<i64> = a.shape.iter().map(|&d| d as i64).collect();
    Tensor::from_slice(&a.data).reshape(&shape)
}

struct Run {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Run {
    fn new(global0: &BTreeMap<String, Array>) -> Run {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("run");
        write_global(&dir.join("round-0000/global"), global0, global_manifest(0))
            .expect("global 0");
        Run { _tmp: tmp, dir }
    }

    fn global(&self, round: u32) -> PathBuf {
        self.dir.join(format!("round-{round:04}/global"))
    }

    fn client_dir(&self, round: u32, client: &str) -> PathBuf {
        clients_dir(&self.dir, round).join(client)
    }

    /// Writes a client artifact with the trainer's writer.
    #[allow(clippy::too_many_arguments)]
    fn client(
        &self,
        round: u32,
        name: &str,
        family: &str,
        n: u64,
        tensors: &BTreeMap<String, Array>,
        dtype: StoreDtype,
        edit: impl FnOnce(&mut ArtifactManifest),
    ) -> PathBuf {
        let dir = self.client_dir(round, name);
        let t: BTreeMap<String, Tensor> = tensors
            .iter()
            .map(|(k, a)| (k.clone(), to_tensor(a)))
            .collect();
        let mut m = global_manifest(round);
        m.kind = ArtifactKind::Client;
        m.client = Some(name.into());
        m.family = Some(family.into());
        m.num_examples = n;
        edit(&mut m);
        write_artifact(&dir, &t, dtype, m).expect("client artifact");
        dir
    }

    fn good(
        &self,
        round: u32,
        name: &str,
        family: &str,
        n: u64,
        tensors: &BTreeMap<String, Array>,
    ) {
        self.client(round, name, family, n, tensors, StoreDtype::Bf16, |_| {});
    }

    fn aggregate_into(
        &self,
        spec: &FederatedTuneSpec,
        round: u32,
        out: &Path,
    ) -> heterotune_trainer::Result<AggregateOutcome> {
        aggregate_round(spec, &self.dir, RUN, round, &self.global(round - 1), out)
    }

    fn aggregate(&self, spec: &FederatedTuneSpec, round: u32) -> AggregateOutcome {
        self.aggregate_into(spec, round, &self.global(round))
            .expect("aggregate")
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).expect("f32 values")
}

fn data_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter.safetensors")).expect("data")
}

fn values(dir: &Path) -> BTreeMap<String, Array> {
    read_global(dir).expect("global").1
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (f64::from(*g) - w).abs() < 1e-6,
            "{what}: got {got:?}, want {want:?}"
        );
    }
}

fn shared_vector(g: &BTreeMap<String, Array>, prefix: &str) -> Vec<f32> {
    [
        ".experts.bias",
        ".experts.weight",
        ".gate.bias",
        ".gate.weight",
    ]
    .iter()
    .map(|s| g[&format!("{prefix}shared.slot0{s}")].data[0])
    .collect()
}

/// Merges the shared update `v` with family parts/head deltas `fam` of width `d`.
fn update(v: [f32; 4], d: usize, fam: f32) -> BTreeMap<String, Array> {
    let mut u = shared(v);
    u.extend(family_parts(d, fam));
    u
}

/// Three families (widths 2, 3, 4): f1 = {a}, f2 = {b}, f3 = {c, d}.
fn three_families(aggregation: serde_json::Value) -> (FederatedTuneSpec, BTreeMap<String, usize>) {
    let s = spec(json!({
        "clients": clients(&[("a", "/m/fam1"), ("b", "/m/fam2"), ("c", "/m/fam3"), ("d", "/m/fam3")]),
        "aggregation": aggregation,
    }));
    let mut widths = BTreeMap::new();
    widths.insert(key(&s, "a"), 2);
    widths.insert(key(&s, "b"), 3);
    widths.insert(key(&s, "c"), 4);
    (s, widths)
}

const THETA0: [f32; 4] = [0.0, 0.5, 0.0, 0.125];

/// The hand-computed case: G1 = (1,0,0,0), G2 = (−1,1,0,0), G3 = (0,0,1,0)
/// (client c: (0,0,2,0) with n=1, d: (0,0,0.5,0) with n=2), N = 1+1+3.
fn write_three_family_round(run: &Run, s: &FederatedTuneSpec) {
    run.good(
        1,
        "a",
        &key(s, "a"),
        1,
        &update([1.0, 0.0, 0.0, 0.0], 2, 1.0),
    );
    run.good(
        1,
        "b",
        &key(s, "b"),
        1,
        &update([-1.0, 1.0, 0.0, 0.0], 3, -1.0),
    );
    run.good(
        1,
        "c",
        &key(s, "c"),
        1,
        &update([0.0, 0.0, 2.0, 0.0], 4, 2.0),
    );
    run.good(
        1,
        "d",
        &key(s, "d"),
        2,
        &update([0.0, 0.0, 0.5, 0.0], 4, 0.5),
    );
}

#[test]
fn cmga_on_a_hand_computed_three_family_case() {
    let (s, widths) = three_families(
        json!({"algorithm": "cmga", "alignment": "pcgrad", "conflictThreshold": 0.0}),
    );
    let run = Run::new(&dema_global(&s, THETA0, &widths));
    write_three_family_round(&run, &s);
    let out = run.aggregate(&s, 1);
    let g = values(&run.global(1));
    // G1' = (1/2, 1/2, 0, 0), G2' = (0, 1, 0, 0), G3 unchanged;
    // Δ = 1/5 G1' + 1/5 G2' + 3/5 G3 = (0.1, 0.3, 0.6, 0).
    let want: Vec<f64> = [0.1, 0.3, 0.6, 0.0]
        .iter()
        .zip(THETA0)
        .map(|(d, t)| d + f64::from(t))
        .collect();
    assert_close(&shared_vector(&g, ""), &want, "cmga shared");
    assert_eq!(out.stats.conflicts_projected, 2);
    let group = &out.stats.groups[0];
    assert_eq!(group.conflicts_projected, 2);
    let cos = |list: &[aggregate::PairCosine], a: &str, b: &str| {
        list.iter()
            .find(|p| {
                (p.a == key(&s, a) && p.b == key(&s, b)) || (p.a == key(&s, b) && p.b == key(&s, a))
            })
            .expect("pair")
            .cosine
    };
    assert!((cos(&group.cosines_before, "a", "b") + 0.5f64.sqrt()).abs() < 1e-9);
    assert!((cos(&group.cosines_after, "a", "b") - 0.5f64.sqrt()).abs() < 1e-9);
    // Family parts and head: within the family, sample-weighted: family 3
    // (2·1 + 0.5·2)/3 = 1, others their single client's delta.
    for (client, delta) in [("a", 1.0), ("b", -1.0), ("c", 1.0)] {
        let k = key(&s, client);
        for part in [
            "family.layer0.down.weight",
            "family.layer0.up.weight",
            "head.weight",
            "head.bias",
        ] {
            let t = &g[&format!("family/{k}/{part}")];
            assert_close(&t.data, &vec![0.25 + delta; t.numel()], part);
        }
    }
    let f3 = &out.stats.families[&key(&s, "c")];
    assert_eq!(f3.examples, 3);
    assert!((f3.weight - 0.6).abs() < 1e-12);
    assert!((f3.update_norms["shared"] - 1.0).abs() < 1e-9);
    assert_eq!(out.stats.participants.len(), 4);
    assert!(out.stats.rejects.is_empty() && out.stats.missing.is_empty());
    // The manifest is a committed global with the stats.
    let (m, _) = read_global(&run.global(1)).expect("global");
    assert_eq!(m.kind, ArtifactKind::Global);
    assert_eq!((m.round, m.base_round, m.num_examples), (1, 0, 5));
    assert_eq!(m.stats["groups"][0]["conflictsProjected"], 2);
    assert_eq!(
        m.tensors.iter().filter(|t| t.dtype == "F32").count(),
        m.tensors.len()
    );

    // Variants, same artifacts: server lr 0.5 with harmonisation
    // (G2 rescaled to the median norm 1 → G2' = (0, 1/√2, 0, 0)); uniform weights.
    let cases = [
        (
            json!({"algorithm": "cmga", "magnitudeHarmonisation": true, "serverLearningRate": 0.5}),
            [0.05, 0.5 * (0.1 + 1.0 / (5.0 * 2f64.sqrt())), 0.3, 0.0],
        ),
        (
            json!({"algorithm": "cmga", "familyWeighting": "uniform"}),
            [1.0 / 6.0, 0.5, 1.0 / 3.0, 0.0],
        ),
        // TIES: coordinate 0 elected positive (1/5 − 1/5 = 0: no election,
        // plain combination 0); coordinate 1 all agree.
        (
            json!({"algorithm": "cmga", "alignment": "ties"}),
            [0.0, 0.2, 0.6, 0.0],
        ),
        (json!({"algorithm": "fedavg"}), [0.0, 0.2, 0.6, 0.0]),
    ];
    for (i, (aggregation, delta)) in cases.iter().enumerate() {
        let (s2, _) = three_families(aggregation.clone());
        let out_dir = run.dir.join(format!("variant-{i}"));
        run.aggregate_into(&s2, 1, &out_dir).expect("variant");
        let want: Vec<f64> = delta
            .iter()
            .zip(THETA0)
            .map(|(d, t)| d + f64::from(t))
            .collect();
        assert_close(
            &shared_vector(&values(&out_dir), ""),
            &want,
            &aggregation.to_string(),
        );
    }
}

#[test]
fn cmga_equals_fedavg_with_one_family_and_without_conflicts() {
    // One family, three clients with conflicting updates: no pair of
    // families, nothing to align; harmonisation is a no-op.
    let s = spec(json!({"clients": clients(&[("a", "/m/one"), ("b", "/m/one"), ("c", "/m/one")])}));
    let widths: BTreeMap<String, usize> = [(key(&s, "a"), 3)].into_iter().collect();
    let run = Run::new(&dema_global(&s, THETA0, &widths));
    let k = key(&s, "a");
    run.good(1, "a", &k, 7, &update([0.3, -0.7, 0.11, 2.5], 3, 0.1));
    run.good(1, "b", &k, 3, &update([-0.9, 0.2, -0.35, -1.5], 3, -0.3));
    run.good(1, "c", &k, 11, &update([0.01, 0.05, 1.25, 0.75], 3, 0.7));
    let fedavg = spec(
        json!({"clients": clients(&[("a", "/m/one"), ("b", "/m/one"), ("c", "/m/one")]),
        "aggregation": {"algorithm": "fedavg"}}),
    );
    run.aggregate_into(&fedavg, 1, &run.dir.join("fedavg"))
        .expect("fedavg");
    for (i, aggregation) in [
        json!({"algorithm": "cmga", "conflictThreshold": 0.5}),
        json!({"algorithm": "cmga", "magnitudeHarmonisation": true, "familyWeighting": "uniform"}),
        json!({"algorithm": "cmga", "alignment": "ties"}),
    ]
    .into_iter()
    .enumerate()
    {
        let s2 = spec(
            json!({"clients": clients(&[("a", "/m/one"), ("b", "/m/one"), ("c", "/m/one")]),
            "aggregation": aggregation}),
        );
        let out = run.dir.join(format!("cmga-{i}"));
        run.aggregate_into(&s2, 1, &out).expect("cmga");
        assert_eq!(
            data_bytes(&out),
            data_bytes(&run.dir.join("fedavg")),
            "one family, case {i}"
        );
    }

    // Three families whose updates all agree (positive cosines): no
    // conflict at τ = 0, harmonisation off → FedAvg bit for bit.
    let (s3, widths) = three_families(json!({"algorithm": "cmga"}));
    let run = Run::new(&dema_global(&s3, THETA0, &widths));
    run.good(
        1,
        "a",
        &key(&s3, "a"),
        5,
        &update([0.5, 0.25, 0.125, 1.0], 2, 0.1),
    );
    run.good(
        1,
        "b",
        &key(&s3, "b"),
        9,
        &update([0.75, 0.5, -0.125, 0.6], 3, 0.2),
    );
    run.good(
        1,
        "c",
        &key(&s3, "c"),
        2,
        &update([0.2, 0.1, 0.3, 0.9], 4, 0.3),
    );
    run.good(
        1,
        "d",
        &key(&s3, "d"),
        4,
        &update([0.4, -0.1, 0.05, 0.7], 4, 0.4),
    );
    let cmga = run.aggregate(&s3, 1);
    assert_eq!(cmga.stats.conflicts_projected, 0);
    assert!(cmga.stats.groups[0]
        .cosines_before
        .iter()
        .all(|p| p.cosine > 0.0));
    let (fedavg, _) = three_families(json!({"algorithm": "fedavg"}));
    run.aggregate_into(&fedavg, 1, &run.dir.join("fedavg"))
        .expect("fedavg");
    assert_eq!(
        data_bytes(&run.global(1)),
        data_bytes(&run.dir.join("fedavg"))
    );
    // With harmonisation on it legitimately differs.
    let (harm, _) = three_families(json!({"algorithm": "cmga", "magnitudeHarmonisation": true}));
    run.aggregate_into(&harm, 1, &run.dir.join("harm"))
        .expect("harmonised");
    assert_ne!(
        data_bytes(&run.dir.join("harm")),
        data_bytes(&run.dir.join("fedavg"))
    );
}

#[test]
fn two_conflicting_families_are_aligned() {
    for tau in [0.0, -0.2] {
        let s = spec(json!({
            "clients": clients(&[("a", "/m/x"), ("b", "/m/x"), ("c", "/m/y")]),
            "aggregation": {"algorithm": "cmga", "conflictThreshold": tau, "seed": 3},
        }));
        let widths: BTreeMap<String, usize> =
            [(key(&s, "a"), 2), (key(&s, "c"), 3)].into_iter().collect();
        let run = Run::new(&dema_global(&s, THETA0, &widths));
        run.good(
            1,
            "a",
            &key(&s, "a"),
            4,
            &update([1.0, 0.5, -0.25, 0.75], 2, 0.0),
        );
        run.good(
            1,
            "b",
            &key(&s, "b"),
            4,
            &update([0.75, 0.5, -0.5, 1.0], 2, 0.0),
        );
        run.good(
            1,
            "c",
            &key(&s, "c"),
            8,
            &update([-1.0, -0.25, 0.5, -0.5], 3, 0.0),
        );
        let out = run.aggregate(&s, 1);
        let g = &out.stats.groups[0];
        assert!(g.cosines_before[0].cosine < tau, "{g:?}");
        assert!(g.cosines_after[0].cosine >= tau, "{g:?}");
        assert!((g.cosines_after[0].cosine + g.cosines_before[0].cosine).abs() < 1e-9);
        assert_eq!(g.conflicts_projected, 2);
        // The aligned updates are each orthogonal to the other's original.
        // Reconstruct G1, G2 and check Δ = w1 G1' + w2 G2'.
        let g1 = [0.875f64, 0.5, -0.375, 0.875];
        let g2 = [-1.0f64, -0.25, 0.5, -0.5];
        let d12: f64 = g1.iter().zip(&g2).map(|(a, b)| a * b).sum();
        let n1: f64 = g1.iter().map(|a| a * a).sum();
        let n2: f64 = g2.iter().map(|a| a * a).sum();
        let want: Vec<f64> = (0..4)
            .map(|i| {
                let p1 = g1[i] - d12 / n2 * g2[i];
                let p2 = g2[i] - d12 / n1 * g1[i];
                f64::from(THETA0[i]) + 0.5 * p1 + 0.5 * p2
            })
            .collect();
        assert_close(
            &shared_vector(&values(&run.global(1)), ""),
            &want,
            "aligned",
        );
    }
}

/// A LoRA global: one family, factors of `lora.layer0.query` at rank 2.
/// The cases weight two clients 1 : 3; the default `maxExamplesShare` (0.5)
/// would make that 1 : 1 (two clients: at most equal weights), so it is
/// turned off here, where the algorithms' weighted arithmetic is checked.
fn lora_spec(algorithm: &str, ranks: &[(&str, u32)]) -> FederatedTuneSpec {
    let clients: Vec<serde_json::Value> = ranks
        .iter()
        .map(|(n, r)| json!({"name": n, "model": {"family": "bert", "uri": "/m/lora"}, "loraRank": r}))
        .collect();
    spec(json!({
        "clients": clients,
        "adapter": {"type": "lora", "rank": 2, "share": {"familyParts": true, "head": false}},
        "aggregation": {"algorithm": algorithm, "robust": {"maxExamplesShare": 1.0}},
    }))
}

#[test]
fn hetlora_pads_averages_and_truncates() {
    let s = lora_spec("hetlora", &[("small", 1), ("large", 2)]);
    let k = key(&s, "small");
    let mut g0 = BTreeMap::new();
    g0.insert(
        format!("family/{k}/lora.layer0.query.a"),
        arr(&[2, 2], &[1., 2., 3., 4.]),
    );
    g0.insert(
        format!("family/{k}/lora.layer0.query.b"),
        arr(&[2, 2], &[1., 0., 0., 1.]),
    );
    let run = Run::new(&g0);
    let mut small = BTreeMap::new();
    small.insert("lora.layer0.query.a".to_string(), arr(&[1, 2], &[1., 1.]));
    small.insert("lora.layer0.query.b".to_string(), arr(&[2, 1], &[1., 1.]));
    let mut large = BTreeMap::new();
    large.insert(
        "lora.layer0.query.a".to_string(),
        arr(&[2, 2], &[0., 0., 1., 1.]),
    );
    large.insert(
        "lora.layer0.query.b".to_string(),
        arr(&[2, 2], &[0., 0., 0., 0.]),
    );
    run.good(1, "small", &k, 1, &small);
    run.good(1, "large", &k, 3, &large);
    let out = run.aggregate(&s, 1);
    assert_eq!(out.stats.participants.len(), 2);
    let g = values(&run.global(1));
    // small: A = [[2,3]] → [[2,3],[0,0]], B = [[2],[1]] → [[2,0],[1,0]];
    // large: A = [[1,2],[4,5]], B = I. Mean with weights 1, 3 (÷ 4).
    assert_close(
        &g[&format!("family/{k}/lora.layer0.query.a")].data,
        &[1.25, 2.25, 3.0, 3.75],
        "A",
    );
    assert_close(
        &g[&format!("family/{k}/lora.layer0.query.b")].data,
        &[1.25, 0.0, 0.25, 0.75],
        "B",
    );
    // What each client loads: its rank's truncation.
    let tensors: BTreeMap<String, Tensor> =
        g.iter().map(|(n, a)| (n.clone(), to_tensor(a))).collect();
    let view = client_view(tensors, &k, Some(1)).expect("view");
    assert_eq!(view.len(), 2);
    assert_eq!(flat(&view["lora.layer0.query.a"]), vec![1.25, 2.25]);
    assert_eq!(view["lora.layer0.query.b"].size(), vec![2, 1]);
    assert_eq!(flat(&view["lora.layer0.query.b"]), vec![1.25, 0.25]);

    // A rank-1 client sending rank-2 factors is rejected (wrong_shape).
    let run2 = Run::new(&g0);
    run2.good(1, "small", &k, 1, &large);
    run2.good(1, "large", &k, 3, &large);
    let s1 = lora_spec("hetlora", &[("small", 1), ("large", 2)]);
    let s1 = FederatedTuneSpec {
        min_clients: Some(1),
        ..s1
    };
    let out = run2.aggregate(&s1, 1);
    assert_eq!(out.stats.rejects[0].reason, RejectReason::WrongShape);

    // family-fedavg of LoRA pads the deltas (homogeneous ranks: plain FedAvg).
    let ff = lora_spec("family-fedavg", &[("small", 1), ("large", 2)]);
    run.aggregate_into(&ff, 1, &run.dir.join("ff"))
        .expect("family-fedavg");
    let g = values(&run.dir.join("ff"));
    // Deltas: A (1·[[1,1],[0,0]] + 3·[[0,0],[1,1]])/4 added to [[1,2],[3,4]].
    assert_close(
        &g[&format!("family/{k}/lora.layer0.query.a")].data,
        &[1.25, 2.25, 3.75, 4.75],
        "A",
    );
}

#[test]
fn flexlora_reproduces_the_mean_product_at_sufficient_rank() {
    let s = lora_spec("flexlora", &[("r1", 1), ("r2", 2), ("r4", 4)]);
    let k = key(&s, "r1");
    let pa: Vec<f32> = vec![
        1.0, 0.5, -0.25, 0.0, //
        0.0, 1.0, 0.5, -1.0, //
        0.25, 0.0, 1.0, 0.5, //
        -0.5, 0.25, 0.0, 1.0,
    ];
    let mut g0 = BTreeMap::new();
    g0.insert(format!("family/{k}/lora.layer0.value.a"), arr(&[4, 4], &pa));
    g0.insert(
        format!("family/{k}/lora.layer0.value.b"),
        Array::zeros(&[3, 4]),
    );
    let run = Run::new(&g0);
    let delta = |rank: usize, b: &[f32]| {
        let mut m = BTreeMap::new();
        m.insert("lora.layer0.value.a".to_string(), Array::zeros(&[rank, 4]));
        m.insert("lora.layer0.value.b".to_string(), arr(&[3, rank], b));
        m
    };
    // The rank-4 client only uses the first two components: the mean
    // product has rank 2.
    let b2 = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
    let b4 = [2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
    run.good(1, "r2", &k, 1, &delta(2, &b2));
    run.good(1, "r4", &k, 1, &delta(4, &b4));
    let s2 = FederatedTuneSpec {
        min_clients: Some(2),
        ..s
    };
    let out = run.aggregate(&s2, 1);
    assert_eq!(out.stats.missing, vec!["r1".to_string()]);
    // W̄ = (B2 A[:2] + B4 A) / 2.
    let mut want = vec![0.0f64; 12];
    for (b, r) in [(&b2[..], 2usize), (&b4[..], 4)] {
        for i in 0..3 {
            for c in 0..r {
                for j in 0..4 {
                    want[i * 4 + j] += 0.5 * f64::from(b[i * r + c]) * f64::from(pa[c * 4 + j]);
                }
            }
        }
    }
    let g = values(&run.global(1));
    let tensors: BTreeMap<String, Tensor> =
        g.iter().map(|(n, a)| (n.clone(), to_tensor(a))).collect();
    for rank in [2usize, 4] {
        let view = client_view(
            tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            &k,
            Some(rank),
        )
        .expect("view");
        let w = view["lora.layer0.value.b"].matmul(&view["lora.layer0.value.a"]);
        let got = flat(&w);
        for (x, y) in got.iter().zip(&want) {
            assert!(
                (f64::from(*x) - y).abs() < 1e-5,
                "rank {rank}: {got:?} vs {want:?}"
            );
        }
    }
    // Rank 1 gets the best rank-1 approximation, which is not W̄.
    let view = client_view(tensors, &k, Some(1)).expect("view");
    let w = view["lora.layer0.value.b"].matmul(&view["lora.layer0.value.a"]);
    let got = flat(&w);
    let err: f64 = got
        .iter()
        .zip(&want)
        .map(|(x, y)| (f64::from(*x) - y).powi(2))
        .sum();
    assert!(err > 1e-3);
    // Components come in decreasing singular value: ‖A row 0‖ ≥ ‖A row 1‖, rows 2-3 ≈ 0.
    let a = &g[&format!("family/{k}/lora.layer0.value.a")].data;
    let row = |i: usize| a[i * 4..(i + 1) * 4].iter().map(|v| v * v).sum::<f32>();
    assert!(row(0) >= row(1) && row(1) > 1e-3 && row(2) < 1e-8 && row(3) < 1e-8);
}

/// Every kind of bad artifact, each rejected with its own reason; the round
/// completes with the good ones and equals the round aggregated from the
/// good ones alone.
#[test]
fn bad_artifacts_are_rejected_and_the_round_completes() {
    let names: Vec<String> = (0..20).map(|i| format!("c{i:02}")).collect();
    let list: Vec<(&str, &str)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), if i % 2 == 0 { "/m/even" } else { "/m/odd" }))
        .collect();
    let aggregation = json!({"algorithm": "cmga", "maxUpdateNorm": 100.0, "normBoundAction": "reject",
        "maxArtifactBytes": 4096});
    let s = spec(json!({"clients": clients(&list), "minClients": 3, "aggregation": aggregation}));
    let widths: BTreeMap<String, usize> = [(key(&s, "c00"), 2), (key(&s, "c01"), 3)]
        .into_iter()
        .collect();
    let g0 = dema_global(&s, THETA0, &widths);
    let run = Run::new(&g0);
    let clean = Run::new(&g0);
    let fam = |n: &str| key(&s, n);
    let width = |n: &str| widths[&fam(n)];
    let ok = |n: &str| update([0.5, -0.25, 0.125, 1.0], width(n), 0.5);
    // Good clients: c00, c01, c02, c03 (written to both runs).
    for (i, n) in ["c00", "c01", "c02", "c03"].iter().enumerate() {
        let u = update([0.5 * i as f32, -0.25, 0.125, 1.0], width(n), 0.5);
        run.good(1, n, &fam(n), 10 + i as u64, &u);
        clean.good(1, n, &fam(n), 10 + i as u64, &u);
    }
    let mut expect: BTreeMap<&str, RejectReason> = BTreeMap::new();
    let data = |dir: &Path| dir.join("adapter.safetensors");
    // Bad sha: one flipped byte, same size.
    let d = run.client(
        1,
        "c04",
        &fam("c04"),
        5,
        &ok("c04"),
        StoreDtype::Bf16,
        |_| {},
    );
    let mut bytes = std::fs::read(data(&d)).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(data(&d), &bytes).expect("write");
    expect.insert("c04", RejectReason::ChecksumMismatch);
    // Truncated upload.
    let d = run.client(
        1,
        "c05",
        &fam("c05"),
        5,
        &ok("c05"),
        StoreDtype::Bf16,
        |_| {},
    );
    let bytes = std::fs::read(data(&d)).expect("read");
    std::fs::write(data(&d), &bytes[..bytes.len() - 3]).expect("write");
    expect.insert("c05", RejectReason::SizeMismatch);
    // NaN.
    let mut u = ok("c06");
    u.get_mut("shared.slot0.gate.bias").expect("t").data[0] = f32::NAN;
    run.client(1, "c06", &fam("c06"), 5, &u, StoreDtype::Bf16, |_| {});
    expect.insert("c06", RejectReason::NonFinite);
    // Infinity.
    let mut u = ok("c07");
    u.get_mut("head.bias").expect("t").data[1] = f32::INFINITY;
    run.client(1, "c07", &fam("c07"), 5, &u, StoreDtype::Bf16, |_| {});
    expect.insert("c07", RejectReason::NonFinite);
    // Wrong shape: another family's width.
    run.client(
        1,
        "c08",
        &fam("c08"),
        5,
        &update([0.0; 4], 3, 0.5),
        StoreDtype::Bf16,
        |_| {},
    );
    expect.insert("c08", RejectReason::WrongShape);
    // Wrong dtype: F32 instead of BF16.
    run.client(
        1,
        "c09",
        &fam("c09"),
        5,
        &ok("c09"),
        StoreDtype::F32,
        |_| {},
    );
    expect.insert("c09", RejectReason::WrongDtype);
    // Oversized: a valid file with junk appended, the manifest updated to match.
    let d = run.client(
        1,
        "c10",
        &fam("c10"),
        5,
        &ok("c10"),
        StoreDtype::Bf16,
        |_| {},
    );
    let mut bytes = std::fs::read(data(&d)).expect("read");
    bytes.extend(vec![0u8; 8192]);
    std::fs::write(data(&d), &bytes).expect("write");
    let mpath = d.join("manifest.json");
    let mut m: ArtifactManifest =
        serde_json::from_slice(&std::fs::read(&mpath).expect("m")).expect("m");
    m.artifact.bytes = bytes.len() as u64;
    m.artifact.sha256 = sha256_hex(&bytes);
    std::fs::write(&mpath, serde_json::to_vec(&m).expect("json")).expect("write");
    expect.insert("c10", RejectReason::TooLarge);
    // Huge norm.
    run.client(
        1,
        "c11",
        &fam("c11"),
        5,
        &update([1000.0, 0.0, 0.0, 0.0], width("c11"), 0.5),
        StoreDtype::Bf16,
        |_| {},
    );
    expect.insert("c11", RejectReason::NormExceeded);
    // A manifest for another round, another run; a stale base.
    run.client(
        1,
        "c12",
        &fam("c12"),
        5,
        &ok("c12"),
        StoreDtype::Bf16,
        |m| m.round = 2,
    );
    expect.insert("c12", RejectReason::WrongRound);
    run.client(
        1,
        "c13",
        &fam("c13"),
        5,
        &ok("c13"),
        StoreDtype::Bf16,
        |m| m.run = "team/other-12345678".into(),
    );
    expect.insert("c13", RejectReason::WrongRun);
    run.client(
        1,
        "c14",
        &fam("c14"),
        5,
        &ok("c14"),
        StoreDtype::Bf16,
        |m| m.base_round = 3,
    );
    expect.insert("c14", RejectReason::StaleBase);
    // Another client's name, the wrong family, no examples.
    run.client(
        1,
        "c15",
        &fam("c15"),
        5,
        &ok("c15"),
        StoreDtype::Bf16,
        |m| m.client = Some("c00".into()),
    );
    expect.insert("c15", RejectReason::ClientMismatch);
    run.client(
        1,
        "c16",
        &fam("c16"),
        5,
        &ok("c16"),
        StoreDtype::Bf16,
        |m| m.family = Some(fam("c17")),
    );
    expect.insert("c16", RejectReason::FamilyMismatch);
    run.client(
        1,
        "c17",
        &fam("c17"),
        0,
        &ok("c17"),
        StoreDtype::Bf16,
        |_| {},
    );
    expect.insert("c17", RejectReason::InvalidExamples);
    // A missing tensor, an extra tensor.
    let mut u = ok("c18");
    u.remove("head.bias");
    run.client(1, "c18", &fam("c18"), 5, &u, StoreDtype::Bf16, |_| {});
    expect.insert("c18", RejectReason::MissingTensor);
    let mut u = ok("c19");
    u.insert("family.layer9.up.weight".into(), Array::zeros(&[3, 1]));
    run.client(1, "c19", &fam("c19"), 5, &u, StoreDtype::Bf16, |_| {});
    expect.insert("c19", RejectReason::UnexpectedTensor);
    // Not a client of the spec; a garbage manifest (as client "c99"? no:
    // unknown directory names are rejected before anything else matters).
    run.client(
        1,
        "mallory",
        &fam("c00"),
        5,
        &ok("c00"),
        StoreDtype::Bf16,
        |_| {},
    );
    expect.insert("mallory", RejectReason::UnknownClient);
    let junk = clients_dir(&run.dir, 1).join("zz-junk");
    std::fs::create_dir_all(&junk).expect("dir");
    std::fs::write(junk.join("manifest.json"), b"{ not json").expect("write");
    expect.insert("zz-junk", RejectReason::ManifestInvalid);
    // An upload in progress (no manifest yet): missing, not rejected.
    std::fs::create_dir_all(clients_dir(&run.dir, 1).join("aaa-uploading")).expect("dir");

    let out = run.aggregate(&s, 1);
    let got: BTreeMap<&str, RejectReason> = out
        .stats
        .rejects
        .iter()
        .map(|r| (r.client.as_str(), r.reason))
        .collect();
    assert_eq!(got, expect);
    let participants: Vec<&str> = out
        .stats
        .participants
        .iter()
        .map(|p| p.client.as_str())
        .collect();
    assert_eq!(participants, vec!["c00", "c01", "c02", "c03"]);
    assert!(out.stats.missing.is_empty());
    assert_eq!(
        out.stats.reject_counts.values().sum::<u32>() as usize,
        expect.len()
    );
    assert!(out.stats.bytes_rejected > 0 && out.stats.bytes_received > 0);
    for r in &out.stats.rejects {
        assert!(!r.detail.is_empty(), "{r:?}");
    }
    // Rejected artifacts never reach the aggregate.
    clean.aggregate(&s, 1);
    assert_eq!(data_bytes(&run.global(1)), data_bytes(&clean.global(1)));

    // Quorum: with 5 required the round fails and writes nothing.
    let strict = FederatedTuneSpec {
        min_clients: Some(5),
        ..s.clone()
    };
    let out_dir = run.dir.join("strict");
    match run.aggregate_into(&strict, 1, &out_dir) {
        Err(Error::QuorumNotMet {
            accepted,
            required,
            summary,
            ..
        }) => {
            assert_eq!((accepted, required), (4, 5));
            assert!(summary.contains("c12 rejected (wrong_round"), "{summary}");
        }
        other => panic!("expected QuorumNotMet, got {other:?}"),
    }
    assert!(!out_dir.exists());
}

#[test]
fn norm_bound_clips_when_asked() {
    let s = spec(json!({
        "clients": clients(&[("a", "/m/x"), ("b", "/m/x")]),
        "aggregation": {"algorithm": "fedavg", "maxUpdateNorm": 1.0, "normBoundAction": "clip"},
        "adapter": {"rank": 1, "experts": 1, "slots": 1, "share": {"familyParts": false, "head": false}},
    }));
    let mut g0 = shared(THETA0);
    // Family parts are not shared: the global need not hold them.
    g0.insert(
        format!("family/{}/head.bias", key(&s, "a")),
        arr(&[2], &[9.0, 9.0]),
    );
    let run = Run::new(&g0);
    run.good(1, "a", &key(&s, "a"), 1, &shared([3.0, 4.0, 0.0, 0.0]));
    run.good(1, "b", &key(&s, "b"), 1, &shared([0.0, 0.0, 0.5, 0.0]));
    let out = run.aggregate(&s, 1);
    assert!(out.stats.rejects.is_empty());
    let p = &out.stats.participants;
    assert!(p[0].clipped && !p[1].clipped);
    assert!((p[0].update_norm - 5.0).abs() < 1e-9);
    // a clipped to (0.6, 0.8, 0, 0); mean with b.
    let g = values(&run.global(1));
    let want: Vec<f64> = [0.3, 0.4, 0.25, 0.0]
        .iter()
        .zip(THETA0)
        .map(|(d, t)| d + f64::from(t))
        .collect();
    assert_close(&shared_vector(&g, ""), &want, "clipped");
    // Unshared parts are not carried into the global.
    assert_eq!(g.len(), 4, "{:?}", g.keys().collect::<Vec<_>>());
}

#[test]
fn reruns_give_identical_bytes() {
    let (s, widths) = three_families(
        json!({"algorithm": "cmga", "magnitudeHarmonisation": true, "serverMomentum": 0.5}),
    );
    let run = Run::new(&dema_global(&s, THETA0, &widths));
    write_three_family_round(&run, &s);
    let first = run.aggregate(&s, 1);
    let bytes = data_bytes(&run.global(1));
    for i in 0..2 {
        let again = run.aggregate(&s, 1);
        assert_eq!(data_bytes(&run.global(1)), bytes, "rerun {i}");
        assert_eq!(
            again.manifest.artifact.sha256,
            first.manifest.artifact.sha256
        );
        assert_eq!(again.stats.groups, first.stats.groups);
    }
    // Another seed changes nothing here (one conflict per family, order-free)
    // but the output is still identical across reruns with it.
    let (s2, _) = three_families(json!({"algorithm": "cmga", "magnitudeHarmonisation": true,
        "serverMomentum": 0.5, "seed": 99}));
    run.aggregate_into(&s2, 1, &run.dir.join("seed99"))
        .expect("seed 99");
    assert_eq!(data_bytes(&run.dir.join("seed99")), bytes);
}

#[test]
fn server_momentum_is_kept_in_the_global() {
    let s = spec(json!({
        "clients": clients(&[("a", "/m/x")]),
        "aggregation": {"algorithm": "fedavg", "serverMomentum": 0.5, "serverLearningRate": 2.0},
        "adapter": {"rank": 1, "experts": 1, "slots": 1, "share": {"familyParts": false, "head": false}},
    }));
    let run = Run::new(&shared(THETA0));
    let k = key(&s, "a");
    run.good(1, "a", &k, 1, &shared([1.0, 0.0, 0.0, 0.0]));
    run.aggregate(&s, 1);
    let g1 = values(&run.global(1));
    assert_eq!(
        g1["server/momentum/shared.slot0.experts.bias"].data,
        vec![1.0]
    );
    assert_eq!(g1["shared.slot0.experts.bias"].data, vec![2.0]);
    run.client(
        2,
        "a",
        &k,
        1,
        &shared([1.0, 0.0, 0.0, 0.0]),
        StoreDtype::Bf16,
        |m| {
            m.round = 2;
            m.base_round = 1;
        },
    );
    run.aggregate(&s, 2);
    let g2 = values(&run.global(2));
    // m = 0.5 · 1 + 1 = 1.5; θ = 2 + 2 · 1.5 = 5.
    assert_eq!(
        g2["server/momentum/shared.slot0.experts.bias"].data,
        vec![1.5]
    );
    assert_eq!(g2["shared.slot0.experts.bias"].data, vec![5.0]);
    // Clients never load server state.
    let tensors: BTreeMap<String, Tensor> =
        g2.iter().map(|(n, a)| (n.clone(), to_tensor(a))).collect();
    let view = client_view(tensors, &k, None).expect("view");
    assert!(
        view.keys().all(|n| n.starts_with("shared.")),
        "{:?}",
        view.keys()
    );
}

#[test]
fn family_fedavg_keeps_a_shared_copy_per_family() {
    let (s, widths) = three_families(json!({"algorithm": "family-fedavg"}));
    let run = Run::new(&dema_global(&s, THETA0, &widths));
    write_three_family_round(&run, &s);
    let out = run.aggregate(&s, 1);
    assert!(out.stats.groups.is_empty());
    let g = values(&run.global(1));
    assert!(
        !g.keys().any(|n| n.starts_with("shared.")),
        "no top-level shared part"
    );
    let expect = |client: &str, delta: [f64; 4]| {
        let want: Vec<f64> = delta
            .iter()
            .zip(THETA0)
            .map(|(d, t)| d + f64::from(t))
            .collect();
        assert_close(
            &shared_vector(&g, &format!("family/{}/", key(&s, client))),
            &want,
            client,
        );
    };
    expect("a", [1.0, 0.0, 0.0, 0.0]);
    expect("b", [-1.0, 1.0, 0.0, 0.0]);
    expect("c", [0.0, 0.0, 1.0, 0.0]);
    // A client loads its family's copy under the usual names.
    let tensors: BTreeMap<String, Tensor> =
        g.iter().map(|(n, a)| (n.clone(), to_tensor(a))).collect();
    let view = client_view(tensors, &key(&s, "b"), None).expect("view");
    assert_eq!(flat(&view["shared.slot0.experts.weight"]), vec![1.5]);
    assert_eq!(view.len(), 8);
    // Round 2 starts from the per-family copies.
    run.client(
        2,
        "a",
        &key(&s, "a"),
        1,
        &update([1.0, 0.0, 0.0, 0.0], 2, 0.0),
        StoreDtype::Bf16,
        |m| {
            m.round = 2;
            m.base_round = 1;
        },
    );
    let s1 = FederatedTuneSpec {
        min_clients: Some(1),
        ..s.clone()
    };
    run.aggregate(&s1, 2);
    let g2 = values(&run.global(2));
    assert_eq!(
        g2[&format!("family/{}/shared.slot0.experts.bias", key(&s, "a"))].data,
        vec![2.0]
    );
    assert_eq!(
        g2[&format!("family/{}/shared.slot0.experts.bias", key(&s, "b"))].data,
        vec![-1.0]
    );
}

#[test]
fn local_only_keeps_the_previous_global() {
    let (s, widths) = three_families(json!({"algorithm": "local-only"}));
    let run = Run::new(&dema_global(&s, THETA0, &widths));
    for c in ["a", "b", "c"] {
        run.good(1, c, &key(&s, c), 4, &BTreeMap::new());
    }
    // An artifact with tensors is unexpected under local-only.
    run.good(1, "d", &key(&s, "d"), 4, &shared([0.0; 4]));
    let s3 = FederatedTuneSpec {
        min_clients: Some(3),
        ..s
    };
    let out = run.aggregate(&s3, 1);
    assert_eq!(out.stats.participants.len(), 3);
    assert_eq!(out.stats.rejects[0].reason, RejectReason::UnexpectedTensor);
    assert_eq!(data_bytes(&run.global(1)), data_bytes(&run.global(0)));
}

#[test]
fn configuration_errors_are_reported() {
    let (s, widths) = three_families(json!({"algorithm": "hetlora"}));
    let run = Run::new(&dema_global(&s, THETA0, &widths));
    let err = run
        .aggregate_into(&s, 1, &run.dir.join("x"))
        .expect_err("hetlora on dema");
    assert!(err.to_string().contains("hetlora"), "{err}");
    // The previous global must be round − 1 of the same run.
    let (s, _) = three_families(json!({"algorithm": "cmga"}));
    let err = aggregate_round(&s, &run.dir, RUN, 2, &run.global(0), &run.dir.join("x"))
        .expect_err("round");
    assert!(
        err.to_string().contains("round 2 starts from round 1"),
        "{err}"
    );
    let err = aggregate_round(
        &s,
        &run.dir,
        "team/other",
        1,
        &run.global(0),
        &run.dir.join("x"),
    )
    .expect_err("run");
    assert!(err.to_string().contains("not \"team/other\""), "{err}");
    // A global without a family's parts cannot say what its clients send.
    let g0 = shared(THETA0);
    let run = Run::new(&g0);
    let err = run
        .aggregate_into(&s, 1, &run.dir.join("x"))
        .expect_err("no family parts");
    assert!(err.to_string().contains("family parts"), "{err}");
    // Spec and global disagree on r.
    let s2 = spec(
        json!({"clients": clients(&[("a", "/m/x")]), "adapter": {"rank": 2, "experts": 1, "slots": 1,
        "share": {"familyParts": false, "head": false}}}),
    );
    let err = run
        .aggregate_into(&s2, 1, &run.dir.join("x"))
        .expect_err("rank");
    assert!(err.to_string().contains("adapter.rank 2"), "{err}");
}

#[test]
fn global_metrics_average_the_participants_test_scores() {
    // Families p = {a, b}, q = {c}.
    let s = spec(json!({"clients": clients(&[("a", "/m/p"), ("b", "/m/p"), ("c", "/m/q")])}));
    let (p, q) = (key(&s, "a"), key(&s, "c"));
    let widths: BTreeMap<String, usize> = [(p.clone(), 2), (q.clone(), 3)].into_iter().collect();
    let run = Run::new(&dema_global(&s, THETA0, &widths));
    let write = |scores: [(f64, Option<f64>); 3]| {
        for ((client, n, v), (accuracy, f1)) in [
            ("a", 1, [1.0, 0.0, 0.0, 0.0]),
            ("b", 2, [0.0, 1.0, 0.0, 0.0]),
            ("c", 3, [0.0, 0.0, 1.0, 0.0]),
        ]
        .into_iter()
        .zip(scores)
        {
            let k = key(&s, client);
            let u = update(v, widths[&k], 0.5);
            run.client(1, client, &k, n, &u, StoreDtype::Bf16, |m| {
                m.metrics.insert("test_accuracy".into(), accuracy);
                if let Some(f1) = f1 {
                    m.metrics.insert("test_macro_f1".into(), f1);
                }
                m.metrics.insert("accuracy".into(), 0.01); // validation: not used
            });
        }
    };
    let close = |got: f64, want: f64, what: &str| {
        assert!((got - want).abs() < 1e-12, "{what}: got {got}, want {want}");
    };

    // Unweighted over participants (not over families, not by examples):
    // (0.6 + 0.9 + 0.3) / 3, per family (0.6 + 0.9) / 2 and 0.3.
    write([(0.6, Some(0.5)), (0.9, Some(0.7)), (0.3, Some(0.4))]);
    let good = run
        .aggregate_into(&s, 1, &run.dir.join("good"))
        .expect("good");
    let m = &good.manifest.metrics;
    close(m["accuracy"], 0.6, "accuracy");
    close(m["macro_f1"], 1.6 / 3.0, "macro_f1");
    close(m[&format!("accuracy.{p}")], 0.75, "accuracy.p");
    close(m[&format!("accuracy.{q}")], 0.3, "accuracy.q");
    assert_eq!(m["participants"], 3.0);
    let stats: Vec<(String, Option<f64>, Option<f64>)> = good
        .stats
        .participants
        .iter()
        .map(|p| (p.client.clone(), p.test_accuracy, p.test_macro_f1))
        .collect();
    assert_eq!(
        stats,
        vec![
            ("a".to_string(), Some(0.6), Some(0.5)),
            ("b".to_string(), Some(0.9), Some(0.7)),
            ("c".to_string(), Some(0.3), Some(0.4)),
        ]
    );
    let (written, _) = read_global(&run.dir.join("good")).expect("global");
    assert_eq!(written.metrics, good.manifest.metrics);
    assert_eq!(written.stats["participants"][0]["testAccuracy"], 0.6);
    assert_eq!(written.stats["participants"][2]["testMacroF1"], 0.4);

    // Out-of-range and NaN (written as null) scores are ignored, the
    // updates still aggregated: same data, same participants. No macro-F1
    // and no accuracy for family p at all: left out, not NaN.
    write([(7.0, None), (f64::NAN, Some(f64::INFINITY)), (0.3, None)]);
    let bad = run
        .aggregate_into(&s, 1, &run.dir.join("bad"))
        .expect("bad");
    assert!(bad.stats.rejects.is_empty(), "{:?}", bad.stats.rejects);
    assert_eq!(bad.stats.participants.len(), 3);
    assert_eq!(
        data_bytes(&run.dir.join("bad")),
        data_bytes(&run.dir.join("good"))
    );
    let m = &bad.manifest.metrics;
    close(m["accuracy"], 0.3, "accuracy");
    close(m[&format!("accuracy.{q}")], 0.3, "accuracy.q");
    assert!(!m.contains_key("macro_f1"), "{m:?}");
    assert!(!m.contains_key(&format!("accuracy.{p}")), "{m:?}");
    assert!(m.values().all(|v| v.is_finite()), "{m:?}");
    assert!(bad.stats.participants[..2]
        .iter()
        .all(|p| p.test_accuracy.is_none() && p.test_macro_f1.is_none()));
    let (written, _) = read_global(&run.dir.join("bad")).expect("global");
    assert!(written.stats["participants"][0]
        .get("testAccuracy")
        .is_none());
}

/// A bridge part (a 2-class head of width 2), all `value`.
fn bridge_part(value: f32) -> BTreeMap<String, Array> {
    let mut m = BTreeMap::new();
    m.insert("bridge.head.weight".into(), arr(&[2, 2], &[value; 4]));
    m.insert("bridge.head.bias".into(), arr(&[2], &[value; 2]));
    m
}

/// The three-family case with a bridge (`spec.bridge`): the bridge is
/// averaged over every client of every family (sample-weighted), the rest
/// exactly as without it; a client that leaves a bridge tensor out is
/// rejected; a global without bridge tensors is a configuration error.
#[test]
fn the_bridge_is_averaged_over_every_client_of_every_family() {
    let (mut s, widths) = three_families(json!({"algorithm": "fedavg"}));
    let (mut plain, _) = three_families(json!({"algorithm": "fedavg"}));
    plain.min_clients = Some(3);
    s.bridge = Some(
        serde_json::from_value(json!({"model": {"family": "bert", "uri": "/m/fam1"}}))
            .expect("bridge spec"),
    );
    s.min_clients = Some(3);
    let mut global0 = dema_global(&s, THETA0, &widths);
    global0.extend(bridge_part(0.5));
    let run = Run::new(&global0);
    // Each client with a bridge delta: a +1, b −1, c +2 (n=1); d (n=2) below.
    for (client, n, fam, v, bridge) in [
        ("a", 1, 2, [1.0, 0.0, 0.0, 0.0], 1.0),
        ("b", 1, 3, [-1.0, 1.0, 0.0, 0.0], -1.0),
        ("c", 1, 4, [0.0, 0.0, 2.0, 0.0], 2.0),
    ] {
        let mut u = update(v, fam, 1.0);
        u.extend(bridge_part(bridge));
        run.good(1, client, &key(&s, client), n, &u);
    }
    // d sends no bridge head bias: rejected.
    let mut u = update([0.0, 0.0, 0.5, 0.0], 4, 0.5);
    let mut partial = bridge_part(0.5);
    partial.remove("bridge.head.bias");
    u.extend(partial);
    run.good(1, "d", &key(&s, "d"), 2, &u);
    let out = run.aggregate(&s, 1);
    assert_eq!(out.stats.rejects.len(), 1, "{:?}", out.stats.rejects);
    assert_eq!(out.stats.rejects[0].client, "d");
    assert_eq!(out.stats.rejects[0].reason, RejectReason::MissingTensor);
    let g = values(&run.global(1));
    // Over a, b, c (n = 1 each): (1 − 1 + 2) / 3.
    let want = 0.5 + 2.0 / 3.0;
    for name in ["bridge.head.weight", "bridge.head.bias"] {
        assert_close(&g[name].data, &vec![want; g[name].numel()], name);
    }
    // The shared part is what plain FedAvg makes of the same three clients.
    let run_plain = Run::new(&dema_global(&plain, THETA0, &widths));
    for (client, fam, v) in [
        ("a", 2, [1.0, 0.0, 0.0, 0.0]),
        ("b", 3, [-1.0, 1.0, 0.0, 0.0]),
        ("c", 4, [0.0, 0.0, 2.0, 0.0]),
    ] {
        run_plain.good(1, client, &key(&plain, client), 1, &update(v, fam, 1.0));
    }
    run_plain.aggregate(&plain, 1);
    let g_plain = values(&run_plain.global(1));
    assert_eq!(shared_vector(&g, ""), shared_vector(&g_plain, ""));

    // A global without the bridge: the spec's bridge cannot be served.
    let run_without = Run::new(&dema_global(&s, THETA0, &widths));
    let err = run_without
        .aggregate_into(&s, 1, &run_without.global(1))
        .expect_err("no bridge tensors in the previous global");
    assert!(err.to_string().contains("spec.bridge"), "{err}");
}

/// Five clients of one family sharing only DeMA's shared part, under
/// `aggregation` (fedavg unless it says otherwise).
fn five_clients(aggregation: serde_json::Value) -> FederatedTuneSpec {
    spec(json!({
        "clients": clients(&[("a", "/m/x"), ("b", "/m/x"), ("c", "/m/x"), ("d", "/m/x"), ("e", "/m/x")]),
        "aggregation": aggregation,
        "adapter": {"rank": 1, "experts": 1, "slots": 1, "share": {"familyParts": false, "head": false}},
    }))
}

/// An honest shared update, exact in BF16 (‖V‖² = 0.15625).
const V: [f32; 4] = [0.125, 0.25, -0.125, 0.25];

/// The global's shared delta from THETA0.
fn shared_delta(g: &BTreeMap<String, Array>) -> Vec<f64> {
    shared_vector(g, "")
        .iter()
        .zip(THETA0)
        .map(|(v, t)| f64::from(*v) - f64::from(t))
        .collect()
}

fn l2(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

#[test]
fn hostile_updates_no_longer_move_the_global_beyond_the_bound() {
    let s = five_clients(json!({"algorithm": "fedavg"}));
    let k = key(&s, "a");
    let honest = ["a", "b", "c", "d"];
    let norm_v = 0.15625f64.sqrt();
    // ×1000: the attacker's RMS is 1000 × the (lower) median's, so it is
    // clipped to 5 × ‖V‖: Δ = (4 · 10 · V + 10 · 5 V) / 50 = 1.8 V.
    let run = Run::new(&shared(THETA0));
    for c in honest {
        run.good(1, c, &k, 10, &shared(V));
    }
    run.good(1, "e", &k, 10, &shared(V.map(|x| 1000.0 * x)));
    let out = run.aggregate(&s, 1);
    let want: Vec<f64> = V.iter().map(|&x| 1.8 * f64::from(x)).collect();
    assert_close(
        &shared_delta(&values(&run.global(1)))
            .iter()
            .map(|&x| x as f32)
            .collect::<Vec<_>>(),
        &want,
        "×1000",
    );
    let e = &out.stats.participants[4];
    assert!(e.clipped && e.clipped_parts == ["shared"], "{e:?}");
    assert_eq!(out.stats.robust.clipped, ["e"]);
    assert!((out.stats.robust.median_rms["shared"] - norm_v / 2.0).abs() < 1e-12);

    // ±3.3e38 (finite BF16): clipped to 5 ‖V‖ as well, so the global moves
    // by at most (4 ‖V‖ + 5 ‖V‖) / 5.
    let run = Run::new(&shared(THETA0));
    for c in honest {
        run.good(1, c, &k, 10, &shared(V));
    }
    run.good(1, "e", &k, 10, &shared([3.3e38, -3.3e38, 3.3e38, -3.3e38]));
    run.aggregate(&s, 1);
    let delta = shared_delta(&values(&run.global(1)));
    assert!(l2(&delta) <= 1.8 * norm_v + 1e-6, "{delta:?}");
    // The attacker's clipped update is 5 ‖V‖ (1, −1, 1, −1) / 2.
    let want: Vec<f64> = V
        .iter()
        .zip([1.0, -1.0, 1.0, -1.0])
        .map(|(&x, sign)| (4.0 * f64::from(x) + 2.5 * norm_v * sign) / 5.0)
        .collect();
    assert_close(
        &delta.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        &want,
        "±3.3e38",
    );

    // With normBoundAction: reject the attacker is rejected instead.
    let strict = FederatedTuneSpec {
        min_clients: Some(4),
        ..five_clients(json!({"algorithm": "fedavg", "normBoundAction": "reject"}))
    };
    let out = run.aggregate(&strict, 1);
    assert_eq!(out.stats.participants.len(), 4);
    assert_eq!(out.stats.rejects[0].reason, RejectReason::NormExceeded);
    assert_eq!(out.stats.reject_counts["norm_exceeded"], 1);
    let delta = shared_delta(&values(&run.global(1)));
    assert_close(
        &delta.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        &V.map(f64::from),
        "rejected",
    );
}

#[test]
fn an_inflated_weight_is_capped() {
    // The attacker claims 2^40 examples for an honest-sized update W.
    let s = five_clients(json!({"algorithm": "fedavg"}));
    let k = key(&s, "a");
    let w: [f32; 4] = [-0.25, 0.0, 0.25, -0.125];
    let run = Run::new(&shared(THETA0));
    for c in ["a", "b", "c", "d"] {
        run.good(1, c, &k, 10, &shared(V));
    }
    run.good(1, "e", &k, 1 << 40, &shared(w));
    // maxExamplesShare 0.5 (the data is not readable here): e weighs 40,
    // half the round: Δ = (40 V + 40 W) / 80.
    let out = run.aggregate(&s, 1);
    assert_eq!(out.stats.robust.examples_cap, "unavailable");
    let e = &out.stats.participants[4];
    assert_eq!((e.num_examples, e.weight), (1 << 40, 40));
    assert_eq!(out.stats.robust.weights_capped, ["e"]);
    assert_eq!(out.stats.examples, 80);
    let want: Vec<f64> = V
        .iter()
        .zip(w)
        .map(|(&v, w)| (f64::from(v) + f64::from(w)) / 2.0)
        .collect();
    let got = shared_delta(&values(&run.global(1)));
    assert_close(
        &got.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        &want,
        "share cap",
    );

    // Partition sizes known (the local runner): e's weight is its
    // partition's size, 10: Δ = (40 V + 10 W) / 50.
    let sizes: BTreeMap<String, aggregate::robust::PartitionFacts> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|c| {
            let facts = aggregate::robust::PartitionFacts {
                examples: 10,
                class_counts: Vec::new(),
            };
            (c.to_string(), facts)
        })
        .collect();
    let options = aggregate::RoundOptions {
        partition: Some(sizes),
        ..aggregate::RoundOptions::default()
    };
    let out_dir = run.dir.join("sized");
    let out =
        aggregate::aggregate_round_with(&s, &run.dir, RUN, 1, &run.global(0), &out_dir, options)
            .expect("aggregate");
    assert_eq!(out.stats.robust.examples_cap, "partition");
    assert_eq!(out.stats.participants[4].weight, 10);
    let want: Vec<f64> = V
        .iter()
        .zip(w)
        .map(|(&v, w)| (4.0 * f64::from(v) + f64::from(w)) / 5.0)
        .collect();
    let got = shared_delta(&values(&out_dir));
    assert_close(
        &got.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        &want,
        "partition cap",
    );
}

/// Five clients' shared updates (name, numExamples, values), one of them
/// hostile (`d`), for the combiners' hand-computed cases.
const FIVE_UPDATES: [(&str, u64, [f32; 4]); 5] = [
    ("a", 1, [1.0, 0.5, -1.0, 0.0]),
    ("b", 2, [2.0, 0.25, 0.0, 1.0]),
    ("c", 3, [3.0, 1.0, 0.5, -2.0]),
    ("d", 4, [1000.0, 0.75, -3.3e38, 0.5]),
    ("e", 5, [0.0, -1.0, 1.0, 4.0]),
];

/// A run whose round 1 holds [`FIVE_UPDATES`] as the five clients' commits.
fn five_updates_run() -> Run {
    let s = five_clients(json!({}));
    let k = key(&s, "a");
    let run = Run::new(&shared(THETA0));
    for (c, n, u) in FIVE_UPDATES {
        run.good(1, c, &k, n, &shared(u));
    }
    run
}

#[test]
fn median_and_trimmed_mean_on_a_hand_computed_case() {
    // Per coordinate, unweighted, over the five clients (weights differ
    // and do not matter):
    //   a ( 1,  0.5, -1,   0 )   b (2, 0.25,  0, 1)   c (3, 1, 0.5, -2)
    //   d (1000, 0.75, -3.3e38, 0.5)   e (0, -1, 1, 4)
    // median (2, 0.5, 0, 0.5); trimmed (20 %: drop the min and the max)
    // (2, 0.5, -1/6, 0.5).
    let run = five_updates_run();
    let cases = [
        ("median", json!({"combine": "median"}), [2.0, 0.5, 0.0, 0.5]),
        (
            "trimmedMean",
            json!({"combine": "trimmedMean", "trimFraction": 0.2}),
            [2.0, 0.5, -1.0 / 6.0, 0.5],
        ),
        // Krum scores with f = 1 (sum of the 2 nearest squared distances):
        // a 13.56, b 13.88, c 21.31, d ≈ 2.2e77, e 38.81: d is left out, the
        // mean of a, b, c, e.
        (
            "multiKrum",
            json!({"combine": "multiKrum"}),
            [1.5, 0.1875, 0.125, 0.75],
        ),
    ];
    for (what, robust, want) in cases {
        for algorithm in ["fedavg", "cmga"] {
            // The combiner alone (no norm bound, no weight cap).
            let mut r = robust.clone();
            r["normBoundMultiple"] = json!(0.0);
            r["maxExamplesShare"] = json!(1.0);
            let s = five_clients(json!({"algorithm": algorithm, "robust": r}));
            let out_dir = run.dir.join(format!("{what}-{algorithm}"));
            let out = run.aggregate_into(&s, 1, &out_dir).expect(what);
            assert_eq!(out.stats.robust.combine, what);
            let got = shared_delta(&values(&out_dir));
            assert_close(
                &got.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                &want,
                what,
            );
        }
        // One family: CMGA over the family's robust update is FedAvg's, bit for bit.
        assert_eq!(
            data_bytes(&run.dir.join(format!("{what}-fedavg"))),
            data_bytes(&run.dir.join(format!("{what}-cmga"))),
            "{what}"
        );
    }
}

#[test]
fn multi_krum_names_whom_it_left_out() {
    // The five clients above; with f = 2 each score is the nearest squared
    // distance: a 3.06, b 3.06, c 10.5, d ≈ 1.1e77, e 15.56: a, b, c kept.
    let run = five_updates_run();
    let robust = json!({"combine": "multiKrum", "byzantineClients": 2,
                        "normBoundMultiple": 0.0, "maxExamplesShare": 1.0});
    let s = five_clients(json!({"robust": robust}));
    let out_dir = run.dir.join("krum-f2");
    let out = run.aggregate_into(&s, 1, &out_dir).expect("multiKrum");
    assert_eq!(
        out.stats.robust.krum_excluded,
        vec!["d (shared)", "e (shared)"]
    );
    let got = shared_delta(&values(&out_dir));
    assert_close(
        &got.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        &[2.0, 7.0 / 12.0, -1.0 / 6.0, -1.0 / 3.0],
        "multiKrum f = 2",
    );
}

#[test]
fn the_median_forms_each_family_update_before_cmga() {
    // The three-family case with `combine: median`: family 3 = {c, d} gets
    // the unweighted median of (0,0,2,0) and (0,0,0.5,0), G3 = (0,0,1.25,0)
    // (the weighted mean was (0,0,1,0)); G1, G2 project as before:
    // Δ = 1/5 (½,½,0,0) + 1/5 (0,1,0,0) + 3/5 G3 = (0.1, 0.3, 0.75, 0).
    let (s, widths) = three_families(json!({"algorithm": "cmga", "robust": {"combine": "median"}}));
    let run = Run::new(&dema_global(&s, THETA0, &widths));
    write_three_family_round(&run, &s);
    let out = run.aggregate(&s, 1);
    let want: Vec<f64> = [0.1, 0.3, 0.75, 0.0]
        .iter()
        .zip(THETA0)
        .map(|(d, t)| d + f64::from(t))
        .collect();
    let g = values(&run.global(1));
    assert_close(&shared_vector(&g, ""), &want, "cmga median");
    assert_eq!(out.stats.conflicts_projected, 2);
    // Family 3's parts: the median of 2 and 0.5.
    let t = &g[&format!("family/{}/head.bias", key(&s, "c"))];
    assert_close(&t.data, &[1.5, 1.5], "family parts");
    // Reruns, and the re-reading second pass, give the same bytes.
    let bytes = data_bytes(&run.global(1));
    run.aggregate(&s, 1);
    assert_eq!(data_bytes(&run.global(1)), bytes);
    let options = aggregate::RoundOptions {
        retain_bytes: 0,
        ..aggregate::RoundOptions::default()
    };
    let out_dir = run.dir.join("re-read");
    aggregate::aggregate_round_with(&s, &run.dir, RUN, 1, &run.global(0), &out_dir, options)
        .expect("re-read");
    assert_eq!(data_bytes(&out_dir), bytes);
}

#[test]
fn robust_options_are_checked() {
    let lora = spec(json!({
        "clients": [{"name": "a", "model": {"family": "bert", "uri": "/m/lora"}, "loraRank": 1}],
        "adapter": {"type": "lora", "rank": 2},
        "aggregation": {"algorithm": "hetlora", "robust": {"combine": "median"}},
    }));
    let err = aggregate::aggregator_for(&lora).err().expect("refused");
    assert!(err.to_string().contains("robust.combine"), "{err}");
    let bad = five_clients(json!({"robust": {"trimFraction": 0.5}}));
    let err = aggregate::aggregator_for(&bad).err().expect("refused");
    assert!(err.to_string().contains("trimFraction"), "{err}");
}

#[test]
fn weights_are_capped_by_the_partition_when_the_data_is_readable() {
    // A 200-example dataset, split and partitioned iid over five clients as
    // the clients do: the aggregator computes each client's training-set
    // size and caps the attacker's 2^40 to its own.
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("d.jsonl");
    let lines: Vec<String> = (0..200)
        .map(|i| {
            let label = if i % 2 == 0 { "x" } else { "y" };
            json!({"text": format!("example {i}"), "label": label}).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).expect("dataset");
    let mut s = five_clients(json!({"algorithm": "fedavg"}));
    s.task.dataset.uri = data.display().to_string();
    s.task.partition.strategy = heterotune_crds::spec::PartitionStrategy::Iid;
    s.task.partition.min_examples_per_client = 1;
    let sizes = aggregate::robust::partition_sizes(&s).expect("partition sizes");
    assert_eq!(sizes.len(), 5);
    // Each client's examples per class, what replaces the class counts it
    // reports with the pool ensemble: they sum to its size, and over the
    // clients to each label's share of the training split.
    let facts = aggregate::robust::partition_facts(&s).expect("partition facts");
    let mut per_class = [0u64; 2];
    for (name, f) in &facts {
        assert_eq!(f.class_counts.len(), 2, "{name}: {f:?}");
        assert_eq!(
            f.class_counts.iter().sum::<u64>(),
            sizes[name],
            "{name}: {f:?}"
        );
        per_class[0] += f.class_counts[0];
        per_class[1] += f.class_counts[1];
    }
    assert!(per_class[0].abs_diff(per_class[1]) <= 20, "{per_class:?}");
    assert!(sizes.values().all(|&n| (30..=34).contains(&n)), "{sizes:?}");
    let k = key(&s, "a");
    let run = Run::new(&shared(THETA0));
    for c in ["a", "b", "c", "d"] {
        run.good(1, c, &k, sizes[c], &shared(V));
    }
    run.good(1, "e", &k, 1 << 40, &shared(V));
    let out = run.aggregate(&s, 1);
    assert_eq!(out.stats.robust.examples_cap, "partition");
    let e = &out.stats.participants[4];
    assert_eq!((e.num_examples, e.weight), (1 << 40, sizes["e"]));
    assert!(out.stats.participants[..4]
        .iter()
        .all(|p| p.weight == p.num_examples));
}

/// A client manifest's `baseSha256` must be the previous global's data
/// digest: an update trained from another global (a second writer's, no
/// longer in the store) is rejected as `stale_base`, naming both digests.
#[test]
fn an_update_from_another_global_is_rejected() {
    let s = spec(json!({
        "clients": clients(&[("a", "/m/x"), ("b", "/m/x")]),
        "minClients": 1,
        "aggregation": {"algorithm": "fedavg"},
        "adapter": {"rank": 1, "experts": 1, "slots": 1, "share": {"familyParts": false, "head": false}},
    }));
    let run = Run::new(&shared(THETA0));
    let (m0, _) = read_global(&run.global(0)).expect("global 0");
    let base = m0.artifact.sha256.clone();
    let k = key(&s, "a");
    let u = shared([1.0, 0.0, 0.0, 0.0]);
    run.client(1, "a", &k, 1, &u, StoreDtype::Bf16, |m| {
        m.base_sha256 = Some(base.to_ascii_uppercase())
    });
    let other = "0".repeat(64);
    run.client(1, "b", &k, 1, &u, StoreDtype::Bf16, |m| {
        m.base_sha256 = Some(other.clone())
    });
    let out = run.aggregate(&s, 1);
    assert_eq!(out.stats.rejects.len(), 1, "{:?}", out.stats.rejects);
    let r = &out.stats.rejects[0];
    assert_eq!(
        (r.client.as_str(), r.reason),
        ("b", RejectReason::StaleBase)
    );
    assert!(
        r.detail.contains(&other) && r.detail.contains(&base),
        "{}",
        r.detail
    );
}
