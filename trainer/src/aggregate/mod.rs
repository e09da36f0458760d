//! Server-side aggregation of one round: verify the round's client
//! artifacts (untrusted input), combine the accepted updates with the
//! spec's algorithm, and write the round's global artifact. See
//! docs/aggregation.md for the algorithms, the global's tensor names and
//! what each client loads.
//!
//! Entry point: [`aggregate_round`]. One module per algorithm, each behind
//! the [`Aggregator`] trait:
//!
//! | `aggregation.algorithm` | module | adapter |
//! |---|---|---|
//! | `cmga` | [`cmga`] | DeMA |
//! | `fedavg` | [`fedavg`] | DeMA |
//! | `family-fedavg` | [`family_fedavg`] | DeMA or LoRA |
//! | `hetlora` | [`hetlora`] | LoRA |
//! | `flexlora` | [`flexlora`] | LoRA |
//! | `local-only` | [`local_only`] | any |
//!
//! **Protocol.** Round `r` reads the previous global (round `r − 1`; round
//! 0 is the initial state) and the committed client artifacts under
//! `<run_dir>/round-NNNN/clients/<client>/` (crds::layout), verifies each
//! ([`verify`]), applies the round-level defences against hostile updates
//! ([`robust`]: adaptive norm bound, capped weights; [`combine`]: median,
//! trimmed mean) in two passes ([`intake`]), streams the accepted ones into
//! the aggregator in client-name order (memory: the per-family sums and a
//! bounded number of kept updates, not all the clients' updates), checks the
//! quorum, and writes `adapter.safetensors` (F32) then `manifest.json` (the
//! commit marker) into the output directory. The same inputs give the same
//! data file, byte for byte: sorted iteration, f64 accumulation in a fixed
//! order, a seeded PCGrad order, no timestamps in the data (the manifest's
//! `createdAt` and `stats.timing` do vary).
//!
//! **Shapes.** The previous global is the round's schema: what a client
//! must send (names, shapes) is derived from the previous global's tensors
//! for that client's family and the spec's share policy, so the initial
//! global must hold every family's shared parts.

#[macro_use]
mod wrap;

pub mod array;
pub mod bridge;
pub mod cmga;
pub mod combine;
pub mod common;
pub mod family_fedavg;
pub mod fedavg;
pub mod flexlora;
pub mod hetlora;
pub mod intake;
pub mod local_only;
pub mod pool;
pub mod privacy;
pub mod reject;
pub mod robust;
pub mod stats;
pub mod verify;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use heterotune_crds::layout::{ADAPTER_FILE, MANIFEST_FILE};
use heterotune_crds::manifest::{ArtifactKind, ArtifactManifest, FileDigest};
use heterotune_crds::spec::{AdapterKind, AggregationAlgorithm, FederatedTuneSpec, RobustCombine};

use crate::artifact::{sha256_hex, write_atomic, WRITER_VERSION};
use crate::{Error, Result};
pub use array::{Array, WireDtype};
pub use common::{family_name, MOMENTUM_PREFIX};
pub use intake::RoundOptions;
pub use reject::{Reject, RejectReason};
pub use robust::RobustStats;
pub use stats::{
    FamilyStats, GroupStats, PairCosine, Participant, PrivacyStats, RoundStats,
    ServerDistillationStats, Timing,
};

/// A client of the spec, as aggregation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// Client name.
    pub name: String,
    /// Family key of its model (`FederatedTuneSpec::family_key`).
    pub family: String,
    /// Its LoRA rank (`clients[].loraRank`, else `adapter.rank`).
    pub lora_rank: usize,
}

/// A family (one checkpoint: one hidden size) of the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyInfo {
    /// Its clients in the spec, sorted.
    pub clients: Vec<String>,
    /// The largest LoRA rank of its clients (the rank the global stores).
    pub lora_rank: usize,
}

/// Everything an aggregator may read about the round.
#[derive(Debug)]
pub struct RoundContext<'a> {
    /// The spec (validated, defaults applied).
    pub spec: &'a FederatedTuneSpec,
    /// The run's name (manifests must carry it).
    pub run: &'a str,
    /// The round being aggregated (≥ 1).
    pub round: u32,
    /// The previous global state (F32 values).
    pub previous: &'a BTreeMap<String, Array>,
    /// The sha256 of the previous global's data file, when known: a client
    /// manifest's `baseSha256` must equal it.
    pub previous_sha256: Option<String>,
    /// The spec's clients by name.
    pub clients: BTreeMap<String, ClientInfo>,
    /// The spec's families by key.
    pub families: BTreeMap<String, FamilyInfo>,
}

impl<'a> RoundContext<'a> {
    /// The context of round `round` of `spec` over the previous global `previous`.
    pub fn new(
        spec: &'a FederatedTuneSpec,
        run: &'a str,
        round: u32,
        previous: &'a BTreeMap<String, Array>,
    ) -> Self {
        let mut clients = BTreeMap::new();
        let mut families: BTreeMap<String, FamilyInfo> = BTreeMap::new();
        for (index, c) in spec.clients.iter().enumerate() {
            let family = spec.family_key(index);
            let lora_rank = c.lora_rank.unwrap_or(spec.adapter.rank) as usize;
            let f = families
                .entry(family.clone())
                .or_insert_with(|| FamilyInfo {
                    clients: Vec::new(),
                    lora_rank: 0,
                });
            f.clients.push(c.name.clone());
            f.clients.sort();
            f.lora_rank = f.lora_rank.max(lora_rank);
            clients.insert(
                c.name.clone(),
                ClientInfo {
                    name: c.name.clone(),
                    family,
                    lora_rank,
                },
            );
        }
        RoundContext {
            spec,
            run,
            round,
            previous,
            previous_sha256: None,
            clients,
            families,
        }
    }
}

/// One client's verified update: deltas `θ_client − θ_global(r−1)` as f32,
/// named as in the client's var store.
#[derive(Debug, Clone)]
pub struct ClientUpdate {
    /// Client name.
    pub client: String,
    /// Family key.
    pub family: String,
    /// Aggregation weight (training examples, > 0).
    pub num_examples: u64,
    /// The client's LoRA rank (LoRA algorithms).
    pub lora_rank: usize,
    /// Delta tensors by local name.
    pub tensors: BTreeMap<String, Array>,
}

/// What an aggregator produces: the new global tensors and its statistics.
#[derive(Debug, Default)]
pub struct Aggregated {
    /// Global tensors by global name (F32 values).
    pub tensors: BTreeMap<String, Array>,
    /// Per-family statistics.
    pub families: BTreeMap<String, FamilyStats>,
    /// Per shared group statistics (CMGA, FedAvg).
    pub groups: Vec<GroupStats>,
    /// Conflicts resolved over all groups.
    pub conflicts_projected: u64,
    /// `aggregation.privacy`: the clients whose update was clipped.
    pub privacy_clipped: Vec<String>,
    /// `robust.combine: multiKrum`: the parts it left out, `client (part)`.
    pub krum_excluded: Vec<String>,
}

/// One aggregation algorithm.
///
/// The driver calls [`Aggregator::expected_tensors`] for every client of the
/// spec before reading any artifact (a configuration error fails the round
/// up front), then [`Aggregator::add`] for every accepted update in
/// client-name order, then [`Aggregator::finish`] once.
pub trait Aggregator {
    /// The algorithm implemented.
    fn algorithm(&self) -> AggregationAlgorithm;

    /// The tensors (local names → shapes, all BF16) `client` must send this
    /// round, derived from the previous global and the spec.
    fn expected_tensors(
        &self,
        ctx: &RoundContext<'_>,
        client: &ClientInfo,
    ) -> Result<BTreeMap<String, Vec<usize>>>;

    /// The updates (client, family) that will be added this round, in
    /// order, before the first [`Aggregator::add`]: for a wrapper that needs
    /// the round's composition ([`privacy::Private`]); wrappers pass it on.
    fn plan(&mut self, _accepted: &[(&str, &str)]) {}

    /// Takes one verified update.
    fn add(&mut self, ctx: &RoundContext<'_>, update: ClientUpdate) -> Result<()>;

    /// The new global state.
    fn finish(self: Box<Self>, ctx: &RoundContext<'_>) -> Result<Aggregated>;
}

/// The aggregator of `spec.aggregation.algorithm` for `spec.adapter.type`.
///
/// # Errors
/// [`Error::Config`] for an algorithm that does not fit the adapter (`cmga`
/// and `fedavg` need DeMA, `hetlora` and `flexlora` LoRA), server momentum
/// with an algorithm that does not use it, or a non-finite server learning rate.
pub fn aggregator_for(spec: &FederatedTuneSpec) -> Result<Box<dyn Aggregator>> {
    let agg = &spec.aggregation;
    let alg = agg.algorithm;
    if !agg.server_learning_rate.is_finite() || agg.server_learning_rate < 0.0 {
        return Err(Error::config(
            "spec.aggregation.serverLearningRate",
            format!("must be finite and ≥ 0, got {}", agg.server_learning_rate),
        ));
    }
    if !(0.0..1.0).contains(&agg.server_momentum) {
        return Err(Error::config(
            "spec.aggregation.serverMomentum",
            format!("must be in [0, 1), got {}", agg.server_momentum),
        ));
    }
    if agg.server_momentum > 0.0
        && matches!(
            alg,
            AggregationAlgorithm::Hetlora
                | AggregationAlgorithm::Flexlora
                | AggregationAlgorithm::LocalOnly
        )
    {
        return Err(Error::config(
            "spec.aggregation.serverMomentum",
            format!(
                "server momentum applies to cmga, fedavg and family-fedavg, not {}",
                alg.as_str()
            ),
        ));
    }
    robust::check_spec(spec)?;
    privacy::check_spec(spec)?;
    let inner = algorithm_for(spec)?;
    let bridged: Box<dyn Aggregator> = match (&spec.bridge, alg) {
        (None, _) => inner,
        (Some(_), AggregationAlgorithm::LocalOnly) => return Err(Error::config(
            "spec.bridge",
            "a bridge is averaged over all clients: it needs an aggregation algorithm other than local-only",
        )),
        (Some(_), _) => Box::new(bridge::Bridged::new(inner)),
    };
    let robust = &agg.robust;
    let combined: Box<dyn Aggregator> = match robust.combine {
        RobustCombine::Mean => bridged,
        _ if alg == AggregationAlgorithm::LocalOnly => bridged,
        _ => Box::new(combine::Robust::new(bridged, robust)),
    };
    Ok(match &agg.privacy {
        Some(p) => Box::new(privacy::Private::new(combined, p.clone())),
        None => combined,
    })
}

/// The aggregator of `spec.aggregation.algorithm` alone (no bridge).
fn algorithm_for(spec: &FederatedTuneSpec) -> Result<Box<dyn Aggregator>> {
    let alg = spec.aggregation.algorithm;
    let kind = spec.adapter.kind;
    Ok(match (alg, kind) {
        (AggregationAlgorithm::Cmga, AdapterKind::Dema) => {
            Box::new(cmga::Cmga::new(cmga::CmgaOptions::from_spec(spec)))
        }
        (AggregationAlgorithm::Fedavg, AdapterKind::Dema) => Box::new(fedavg::FedAvg::new()),
        (AggregationAlgorithm::FamilyFedavg, k) => Box::new(family_fedavg::FamilyFedAvg::new(k)),
        (AggregationAlgorithm::Hetlora, AdapterKind::Lora) => Box::new(hetlora::HetLora::new()),
        (AggregationAlgorithm::Flexlora, AdapterKind::Lora) => Box::new(flexlora::FlexLora::new()),
        (AggregationAlgorithm::LocalOnly, _) => Box::new(local_only::LocalOnly::new()),
        (alg, kind) => {
            return Err(Error::config(
                "spec.aggregation.algorithm",
                format!(
                "{} does not aggregate {kind:?} adapters (cmga and fedavg need adapter.type dema, \
                     hetlora and flexlora need lora)",
                alg.as_str()
            ),
            ))
        }
    })
}

/// Reads a global artifact (`manifest.json` + its data file) from `dir`,
/// checking size and sha256 against the manifest. Values come back as f32.
pub fn read_global(dir: &Path) -> Result<(ArtifactManifest, BTreeMap<String, Array>)> {
    let (manifest, bytes, data_path) = crate::artifact::read_committed(dir)?;
    let tensors = array::parse_safetensors(&bytes, &data_path)?;
    Ok((manifest, tensors))
}

/// Writes a global artifact into `dir` (data first, manifest last, both
/// atomically) and returns the manifest as written. `manifest.artifact` and
/// `manifest.tensors` are filled in here.
pub fn write_global(
    dir: &Path,
    tensors: &BTreeMap<String, Array>,
    manifest: ArtifactManifest,
) -> Result<ArtifactManifest> {
    let (bytes, infos) = array::serialize(tensors, WireDtype::F32)?;
    crate::artifact::commit(dir, &bytes, infos, manifest)
}

/// The result of one round's aggregation.
#[derive(Debug, Clone)]
pub struct AggregateOutcome {
    /// The global manifest as written (its `stats` hold [`RoundStats`] as JSON).
    pub manifest: ArtifactManifest,
    /// The round's statistics.
    pub stats: RoundStats,
    /// Where the global artifact was written.
    pub global_dir: PathBuf,
}

/// Directory of round `round`'s client artifacts under a local run directory.
pub fn clients_dir(run_dir: &Path, round: u32) -> PathBuf {
    run_dir.join(format!("round-{round:04}")).join("clients")
}

/// Aggregates round `round` of run `run_name`.
///
/// * `spec`: the run's spec (validated, defaults applied);
/// * `run_dir`: the local directory of the run (holding `round-NNNN/clients/<client>/`);
/// * `run_name`: the run name client manifests must carry (`manifest.run`);
/// * `previous_global`: the directory of round `round − 1`'s global artifact
///   (round 0: the initial state), whose manifest must name the same run;
/// * `out_dir`: where to write this round's global (normally
///   `<run_dir>/round-NNNN/global`); an existing artifact there is replaced.
///
/// # Errors
/// [`Error::QuorumNotMet`] when fewer updates than `spec.quorum()` were
/// accepted (nothing is written); [`Error::Config`] when the spec and the
/// previous global disagree (a family missing from it, wrong ranks, an
/// algorithm that does not fit the adapter); I/O and data errors for the
/// previous global.
pub fn aggregate_round(
    spec: &FederatedTuneSpec,
    run_dir: &Path,
    run_name: &str,
    round: u32,
    previous_global: &Path,
    out_dir: &Path,
) -> Result<AggregateOutcome> {
    let options = RoundOptions::default();
    aggregate_round_with(
        spec,
        run_dir,
        run_name,
        round,
        previous_global,
        out_dir,
        options,
    )
}

/// [`aggregate_round`] with explicit [`RoundOptions`] (how many decoded
/// updates to keep between the two passes; the clients' partition sizes).
pub fn aggregate_round_with(
    spec: &FederatedTuneSpec,
    run_dir: &Path,
    run_name: &str,
    round: u32,
    previous_global: &Path,
    out_dir: &Path,
    mut options: RoundOptions,
) -> Result<AggregateOutcome> {
    let started = Instant::now();
    let (prev_manifest, previous) = read_previous(previous_global, run_name, round)?;
    let mut ctx = RoundContext::new(spec, run_name, round, &previous);
    ctx.previous_sha256 = Some(prev_manifest.artifact.sha256.to_ascii_lowercase());
    let mut aggregator = aggregator_for(spec)?;
    let mut schemas = BTreeMap::new();
    for (name, info) in &ctx.clients {
        schemas.insert(name.clone(), aggregator.expected_tensors(&ctx, info)?);
    }
    let entries = intake::client_dirs(&clients_dir(run_dir, round))?;
    let mut stats = RoundStats::of_round(spec, round);
    stats.robust.examples_cap = intake::examples_cap(spec, &mut options).to_string();
    intake::take_round(
        &ctx,
        &schemas,
        &entries,
        &options,
        aggregator.as_mut(),
        &mut stats,
    )?;
    intake::check_quorum(&stats)?;
    let verified_at = Instant::now();

    let mut tensors = finish_checked(aggregator, &ctx, &mut stats)?;
    stats.server_distillation =
        crate::server_distillation::distil_bridge(spec, round, &mut tensors)?;
    let aggregated_at = Instant::now();
    stats.timing = Timing {
        verify_seconds: (verified_at - started).as_secs_f64(),
        aggregate_seconds: (aggregated_at - verified_at).as_secs_f64(),
        write_seconds: 0.0,
        total_seconds: 0.0,
    };
    let manifest = ArtifactManifest {
        num_examples: stats.examples,
        metrics: round_metrics(&stats, &prev_manifest),
        ..ArtifactManifest::new(
            ArtifactKind::Global,
            run_name,
            round,
            round - 1,
            WRITER_VERSION,
        )
    };
    let manifest = write_round_global(
        out_dir,
        &tensors,
        manifest,
        &mut stats,
        (started, aggregated_at),
    )?;
    Ok(AggregateOutcome {
        manifest,
        stats,
        global_dir: out_dir.to_path_buf(),
    })
}

/// Reads the previous global of round `round` of run `run_name` from
/// `dir` and checks that it is one: a global artifact of that run, of the
/// round before.
fn read_previous(
    dir: &Path,
    run_name: &str,
    round: u32,
) -> Result<(ArtifactManifest, BTreeMap<String, Array>)> {
    if round == 0 {
        return Err(Error::config(
            "round",
            "round 0 is the initial state: aggregation starts at round 1",
        ));
    }
    let (prev_manifest, previous) = read_global(dir)?;
    let prev_path = dir.join(MANIFEST_FILE);
    if prev_manifest.kind != ArtifactKind::Global {
        return Err(Error::data(
            &prev_path,
            "not a global artifact (kind client)",
        ));
    }
    if prev_manifest.run != run_name {
        return Err(Error::data(
            &prev_path,
            format!("belongs to run {:?}, not {run_name:?}", prev_manifest.run),
        ));
    }
    if prev_manifest.round.checked_add(1) != Some(round) {
        return Err(Error::data(
            &prev_path,
            format!(
                "is the global of round {}, round {round} starts from round {}",
                prev_manifest.round,
                round - 1
            ),
        ));
    }
    Ok((prev_manifest, previous))
}

/// The aggregator's new global, checked finite; its statistics go to `stats`.
fn finish_checked(
    aggregator: Box<dyn Aggregator>,
    ctx: &RoundContext<'_>,
    stats: &mut RoundStats,
) -> Result<BTreeMap<String, Array>> {
    let aggregated = aggregator.finish(ctx)?;
    if let Some((name, _)) = aggregated
        .tensors
        .iter()
        .find(|(_, a)| a.data.iter().any(|v| !v.is_finite()))
    {
        return Err(Error::config(
            "spec.aggregation.maxUpdateNorm",
            format!(
                "round {}: the aggregated {name} is not finite (updates too large for f32): \
                 set a norm bound",
                ctx.round
            ),
        ));
    }
    stats.families = aggregated.families;
    stats.groups = aggregated.groups;
    stats.conflicts_projected = aggregated.conflicts_projected;
    stats.robust.krum_excluded = aggregated.krum_excluded;
    if let Some(p) = &ctx.spec.aggregation.privacy {
        stats.privacy = Some(PrivacyStats {
            clip_norm: p.clip_norm,
            noise_multiplier: p.noise_multiplier,
            delta: p.delta,
            epsilon: heterotune_crds::privacy::epsilon(p.noise_multiplier, ctx.round, p.delta),
            clipped: aggregated.privacy_clipped,
        });
    }
    Ok(aggregated.tensors)
}

/// The global manifest's metrics of the round (`aggregation_seconds` is
/// added when the data is written).
fn round_metrics(stats: &RoundStats, previous: &ArtifactManifest) -> BTreeMap<String, f64> {
    let mut metrics = stats::participant_metrics(&stats.participants);
    // The round's wall time: from the previous global's commit to now.
    if let Some(since) = heterotune_crds::manifest::parse_rfc3339(&previous.created_at) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(since);
        metrics.insert("round_seconds".into(), now.saturating_sub(since) as f64);
    }
    metrics.insert("participants".into(), stats.participants.len() as f64);
    metrics.insert("rejected".into(), stats.rejects.len() as f64);
    metrics.insert("bytes_received".into(), stats.bytes_received as f64);
    metrics.insert(
        "conflicts_projected".into(),
        stats.conflicts_projected as f64,
    );
    metrics
}

/// Writes the round's global into `out_dir`: the data, then the manifest
/// with `stats` and the final timing (the write time of the data included;
/// `since`: when the round's aggregation began and when it ended). Returns
/// the manifest as written.
fn write_round_global(
    out_dir: &Path,
    tensors: &BTreeMap<String, Array>,
    mut manifest: ArtifactManifest,
    stats: &mut RoundStats,
    since: (Instant, Instant),
) -> Result<ArtifactManifest> {
    let (started, aggregated_at) = since;
    let (bytes, infos) = array::serialize(tensors, WireDtype::F32)?;
    write_atomic(&out_dir.join(ADAPTER_FILE), &bytes)?;
    let written_at = Instant::now();
    stats.timing.write_seconds = (written_at - aggregated_at).as_secs_f64();
    stats.timing.total_seconds = (written_at - started).as_secs_f64();
    manifest.artifact = FileDigest {
        path: ADAPTER_FILE.to_string(),
        sha256: sha256_hex(&bytes),
        bytes: bytes.len() as u64,
    };
    manifest.tensors = infos;
    manifest
        .metrics
        .insert("aggregation_seconds".into(), stats.timing.total_seconds);
    manifest.stats = serde_json::to_value(&*stats)
        .map_err(|e| Error::config("stats", format!("cannot serialise: {e}")))?;
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::config("manifest", format!("cannot serialise: {e}")))?;
    write_atomic(&out_dir.join(MANIFEST_FILE), &json)?;
    Ok(manifest)
}
