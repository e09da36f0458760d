//! What a client sends and receives each round: the names of the tensors
//! that leave it ([`shared_names`]) and what it loads from a global
//! artifact ([`client_view`]). The server side of the exchange is
//! [`crate::aggregate`].

use std::collections::BTreeMap;

use heterotune_crds::spec::{AdapterKind, AggregationAlgorithm, FederatedTuneSpec};

use crate::aggregate::common::{
    factor_of, family_name, Factor, BRIDGE_PREFIX, POOL_PREFIX, SHARED,
};
use crate::train::ClientModel;
use crate::{Error, Result};

/// The LoRA rank of client `index` (`clients[].loraRank`, else `adapter.rank`).
pub fn lora_rank(spec: &FederatedTuneSpec, index: usize) -> usize {
    spec.clients[index].lora_rank.unwrap_or(spec.adapter.rank) as usize
}

/// Names (in this client's var store) of what leaves the client each round.
pub fn shared_names(model: &ClientModel, spec: &FederatedTuneSpec) -> Vec<String> {
    if spec.aggregation.algorithm == AggregationAlgorithm::LocalOnly {
        return Vec::new();
    }
    let mut names = model.adapter.shared_names();
    // LoRA factors are always exchanged (within a family); DeMA's
    // family projections only when the spec shares them.
    if spec.adapter.kind == AdapterKind::Lora || spec.adapter.share.family_parts {
        names.extend(model.adapter.family_names());
    }
    if spec.adapter.share.head {
        names.extend(model.head.names());
    }
    names
}

/// What a client loads from a global artifact, under its own var-store
/// names (a drop-in for the trainer's loading of `--global`):
///
/// * top-level `shared.*`, `bridge.*` (the bridge model, `spec.bridge`) and
///   `pool.*` (the ensemble on the public pool) as they are;
/// * `family/<family_key>/<name>` as `<name>`, taking precedence over a
///   top-level tensor of the same name (`family-fedavg` stores each
///   family's copy of the shared part there);
/// * with `lora_rank = Some(r)`, LoRA factors `lora.*.a` truncated to their
///   first `r` rows and `lora.*.b` to their first `r` columns (the global
///   stores each family's largest rank: HetLoRA's and FlexLoRA's
///   redistribution);
/// * nothing else (`server/*` state, other families).
///
/// Errors if a LoRA factor holds fewer than `r` components.
pub fn client_view(
    global: BTreeMap<String, tch::Tensor>,
    family_key: &str,
    lora_rank: Option<usize>,
) -> Result<BTreeMap<String, tch::Tensor>> {
    let prefix = family_name(family_key, "");
    let mut shared = BTreeMap::new();
    let mut own = BTreeMap::new();
    for (name, t) in global {
        if let Some(local) = name.strip_prefix(&prefix) {
            own.insert(local.to_string(), t);
        } else if name.starts_with(SHARED)
            || name.starts_with(BRIDGE_PREFIX)
            || name.starts_with(POOL_PREFIX)
        {
            shared.insert(name, t);
        }
    }
    shared.extend(own);
    if let Some(r) = lora_rank {
        for (name, t) in shared.iter_mut() {
            let dim = match factor_of(name) {
                Some(Factor::A) => 0,
                Some(Factor::B) => 1,
                None => continue,
            };
            let size = t.size();
            if size.len() != 2 || (size[dim] as usize) < r {
                return Err(Error::model(
                    "<global artifact>",
                    format!("{name}: shape {size:?} holds fewer than rank {r} components"),
                ));
            }
            *t = t.f_narrow(dim as i64, 0, r as i64)?.f_contiguous()?;
        }
    }
    Ok(shared)
}
