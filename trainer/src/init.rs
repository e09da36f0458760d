//! The run's initial global (round 0): the shared parts from the seed and
//! every family's parts under `family/<key>/`, what every client starts
//! from (`heterotune-trainer init`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use heterotune_crds::manifest::{ArtifactKind, ArtifactManifest};
use heterotune_crds::spec::{AdapterKind, FederatedTuneSpec};
use tch::{Device, Tensor};

use crate::adapters::dema::Dema;
use crate::adapters::head::ClassifierHead;
use crate::adapters::lora::Lora;
use crate::artifact::{self, StoreDtype, WRITER_VERSION};
use crate::client::adapter_choice;
use crate::exchange::lora_rank;
use crate::job;
use crate::models::ModelConfig;
use crate::train::AdapterChoice;
use crate::Result;

/// What [`write_initial_global`] wrote; its `Display` is the trainer's report.
#[derive(Debug, Clone)]
pub struct InitSummary {
    /// The family keys, in spec order.
    pub families: Vec<String>,
    /// The manifest as written.
    pub manifest: ArtifactManifest,
}

impl fmt::Display for InitSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "initial state: {} tensors, {} bytes, families {}",
            self.manifest.tensors.len(),
            self.manifest.artifact.bytes,
            self.families.join(", ")
        )
    }
}

/// Writes the round-0 global artifact of run `run` into `out`: shared parts
/// from the seed, and each family's parts (when shared) under
/// `family/<key>/`.
pub fn write_initial_global(
    spec: &FederatedTuneSpec,
    out: &Path,
    run: &str,
) -> Result<InitSummary> {
    let slots = match spec.adapter.kind {
        AdapterKind::Dema => job::resolve_slots(spec)?,
        AdapterKind::Lora => 0,
    };
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut families = Vec::new();
    for index in 0..spec.clients.len() {
        let key = job::family_key(spec, index);
        if families.contains(&key) {
            continue;
        }
        let (shared, family) = initial_parts(spec, index, &key)?;
        for (name, t) in shared {
            tensors.entry(name).or_insert(t);
        }
        for (name, t) in family {
            tensors.insert(format!("family/{key}/{name}"), t);
        }
        families.push(key);
    }
    tensors.extend(crate::client::bridge::initial_values(spec)?);
    let manifest = ArtifactManifest {
        stats: serde_json::json!({ "families": families, "slots": slots }),
        ..ArtifactManifest::new(ArtifactKind::Global, run, 0, 0, WRITER_VERSION)
    };
    let manifest = artifact::write_artifact(out, &tensors, StoreDtype::F32, manifest)?;
    Ok(InitSummary { families, manifest })
}

/// The initial values of family `key`, built for its first client `index`:
/// the shared parts (by name), and the family's own parts (by local name).
fn initial_parts(spec: &FederatedTuneSpec, index: usize, key: &str) -> Result<(Parts, Parts)> {
    let client = &spec.clients[index];
    let dir = job::local_path(
        &client.model.uri,
        &format!("spec.clients[{index}].model.uri"),
    )?;
    // Shape facts from config.json, without loading the weights.
    let info = ModelConfig::read(&dir)?.info();
    // LoRA families start at the largest rank among their clients (HetLoRA,
    // FlexLoRA); each client truncates to its own rank, which equals its
    // own initial factors (A is drawn row by row from the seed).
    let family_rank = (0..spec.clients.len())
        .filter(|&j| job::family_key(spec, j) == key)
        .map(|j| lora_rank(spec, j))
        .max()
        .unwrap_or(spec.adapter.rank as usize);
    let choice = adapter_choice(spec, index, &dir, info.num_layers, family_rank)?;
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let (adapter_names, shared) = match &choice {
        AdapterChoice::Dema(cfg) => {
            let dema = Dema::new(&vs.root(), cfg, &info)?;
            let family = if spec.adapter.share.family_parts {
                dema.family_names()
            } else {
                Vec::new()
            };
            (family, dema.shared_names())
        }
        AdapterChoice::Lora(cfg, dims) => {
            let lora = Lora::new(&vs.root(), cfg, dims)?;
            (lora.names(), Vec::new())
        }
    };
    let head = ClassifierHead::new_seeded(
        &vs.root().set_group(1),
        info.hidden_size,
        spec.task.labels.len(),
        spec.training.seed,
    )?;
    let mut family_names = adapter_names;
    if spec.adapter.share.head {
        family_names.extend(head.names());
    }
    let vars = vs.variables();
    let copies = |names: Vec<String>| -> Parts {
        names
            .into_iter()
            .map(|name| {
                let t = vars[&name].detach().copy();
                (name, t)
            })
            .collect()
    };
    Ok((copies(shared), copies(family_names)))
}

/// Named initial values.
type Parts = Vec<(String, Tensor)>;
