//! From a `FederatedTune` spec to the trainer's own configuration for one
//! client: data, DeMA, optimisation. The spec is the one source of truth:
//! the runner and the operator hand the trainer the validated spec (JSON or
//! YAML, with defaults applied) and the client's name.

use std::path::{Path, PathBuf};

use heterotune_crds::dtype::{self, Resolved};
use heterotune_crds::model::slots::resolve_slots as resolve_slot_count;
use heterotune_crds::model::LayerSelection;
use heterotune_crds::spec::{Dtype, FederatedTuneSpec, OutputScale, PartitionStrategy};
use heterotune_crds::uri::{self, Location};

use crate::adapters::dema::DemaConfig;
use crate::data::partition::{DataConfig, PartitionConfig, PartitionScheme};
use crate::data::source::DatasetConfig;
use crate::data::split::SplitFractions;
use crate::models::ModelConfig;
use crate::{Error, Result};

/// Reads a spec file: a whole FederatedTune (YAML or JSON) or just its spec.
pub fn read_spec(path: &Path) -> Result<FederatedTuneSpec> {
    let text = heterotune_crds::bounded::read_text(path, heterotune_crds::bounded::MAX_SPEC_BYTES)
        .map_err(|e| Error::io(path, e))?;
    let value: serde_json::Value = serde_saphyr::from_str(&text).map_err(|e| {
        Error::config(
            path.display().to_string(),
            format!("not valid YAML/JSON: {e}"),
        )
    })?;
    let spec = value.get("spec").cloned().unwrap_or(value);
    serde_json::from_value(spec).map_err(|e| {
        Error::config(
            path.display().to_string(),
            format!("not a FederatedTune spec: {e} (check it with `heterotune validate -f`)"),
        )
    })
}

/// Resolves a model or dataset URI to a local path. An `s3://` URI must
/// have been staged to a local copy by `heterotune job` (listed in the
/// `HETEROTUNE_STAGED` file); the trainer itself never reads object storage.
pub fn local_path(uri_text: &str, field: &str) -> Result<PathBuf> {
    match uri::resolve(uri_text) {
        Ok(Location::Local(p)) => Ok(p),
        Ok(Location::S3 { .. }) => match uri::staged_path(uri_text) {
            Ok(Some(p)) => Ok(p),
            Ok(None) => Err(Error::config(
                field,
                format!(
                    "{uri_text} is in object storage and was not staged: run the trainer through \
                     `heterotune run` or `heterotune job`, which copy it to a local folder first"
                ),
            )),
            Err(e) => Err(Error::config(field, e.to_string())),
        },
        Err(e) => Err(Error::config(field, e.to_string())),
    }
}

/// Index of client `name` in the spec.
pub fn client_index(spec: &FederatedTuneSpec, name: &str) -> Result<usize> {
    spec.clients
        .iter()
        .position(|c| c.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = spec.clients.iter().map(|c| c.name.as_str()).collect();
            Error::config(
                "client",
                format!(
                    "no client {name:?} in the spec; clients: {}",
                    names.join(", ")
                ),
            )
        })
}

/// The data configuration shared by every client of the spec.
pub fn data_config(spec: &FederatedTuneSpec) -> Result<DataConfig> {
    let task = &spec.task;
    let dataset_path = local_path(&task.dataset.uri, "spec.task.dataset.uri")?;
    let dataset = DatasetConfig {
        uri: dataset_path.display().to_string(),
        format: task.dataset.format.map(|f| match f {
            heterotune_crds::spec::DatasetFormat::Csv => crate::data::source::DataFormat::Csv,
            heterotune_crds::spec::DatasetFormat::Tsv => crate::data::source::DataFormat::Tsv,
            heterotune_crds::spec::DatasetFormat::Jsonl => crate::data::source::DataFormat::Jsonl,
        }),
        text_field: task.dataset.text_field.clone(),
        label_field: task.dataset.label_field.clone(),
        labels: Some(task.labels.clone()),
        label_aliases: if task.dataset.label_aliases.is_empty() {
            None
        } else {
            Some(task.dataset.label_aliases.clone())
        },
        max_examples: None,
    };
    let scheme = match task.partition.strategy {
        PartitionStrategy::Dirichlet => PartitionScheme::Dirichlet {
            alpha: task.partition.alpha,
        },
        PartitionStrategy::Iid => PartitionScheme::Iid,
        PartitionStrategy::Shards => {
            let mut uris = Vec::with_capacity(spec.clients.len());
            for (i, c) in spec.clients.iter().enumerate() {
                let field = format!("spec.clients[{i}].data.uri");
                let data = c.data.as_ref().ok_or_else(|| {
                    Error::config(&field, "required with partition strategy shards")
                })?;
                uris.push(local_path(&data.uri, &field)?.display().to_string());
            }
            PartitionScheme::Shards { uris }
        }
    };
    let validation = task.splits.validation;
    let test = task.splits.test;
    Ok(DataConfig {
        dataset,
        split: SplitFractions {
            train: 1.0 - validation - test,
            validation,
            test,
        },
        split_seed: task.splits.seed,
        pool: task.splits.pool,
        partition: PartitionConfig {
            clients: spec.clients.len(),
            scheme,
            seed: task.partition.seed,
            min_examples: task.partition.min_examples_per_client as usize,
            min_validation_examples: 0,
        },
    })
}

/// The number of slots: `adapter.slots`, or the depth of the shallowest
/// client's adapted window (read from each local model's config.json).
pub fn resolve_slots(spec: &FederatedTuneSpec) -> Result<usize> {
    if spec.adapter.slots.is_some() {
        return Ok(resolve_slot_count(spec.adapter.slots, []));
    }
    let mut depths = Vec::with_capacity(spec.clients.len());
    for (i, c) in spec.clients.iter().enumerate() {
        let dir =
            local_path(&c.model.uri, &format!("spec.clients[{i}].model.uri")).map_err(|_| {
                Error::config(
                "spec.adapter.slots",
                "cannot infer the number of slots from models in object storage: set adapter.slots",
            )
            })?;
        let layers = num_layers(&dir)?;
        depths
            .push(LayerSelection::from_spec(spec.layer_selection(i), layers).window_depth(layers));
    }
    Ok(resolve_slot_count(None, depths))
}

/// `num_hidden_layers` from a model directory's config.json
/// ([`ModelConfig::read`]).
pub fn num_layers(dir: &Path) -> Result<usize> {
    Ok(ModelConfig::read(dir)?.num_layers())
}

/// DeMA settings of client `index` for a backbone of `num_layers` layers.
pub fn dema_config(
    spec: &FederatedTuneSpec,
    index: usize,
    num_layers: usize,
    slots: usize,
) -> DemaConfig {
    let sel = spec.layer_selection(index);
    DemaConfig {
        rank: spec.adapter.rank as usize,
        experts: spec.adapter.experts as usize,
        slots,
        scale: spec.adapter.scale,
        residual_scale: spec.adapter.output_scale == OutputScale::Residual,
        layer_selection: LayerSelection::from_spec(sel, num_layers),
        every_layer_in_group: sel.every_layer_in_group,
        // Every client starts from the same shared initial values.
        init_seed: spec.training.seed,
    }
}

/// What `dtype` (a client's `model.dtype`) is on `device`: `auto` resolved
/// by the rule of [`heterotune_crds::dtype`] (a CUDA GPU by the compute
/// capability its driver reports, any other device by this CPU's bf16 units,
/// `HETEROTUNE_CPU_BF16` and, where the units exist, a timed GEMM:
/// [`crate::cpu_dtype`]); explicit dtypes as they are.
pub fn resolve_dtype(dtype: Dtype, device: tch::Device) -> Resolved {
    match device {
        tch::Device::Cuda(index) => {
            let capability = (dtype == Dtype::Auto)
                .then(|| crate::cuda::compute_capability(index))
                .flatten();
            dtype::resolve_cuda(dtype, capability)
        }
        _ => crate::cpu_dtype::resolve(dtype),
    }
}

/// libtorch kind of a resolved dtype ([`resolve_dtype`]; an unresolved
/// `auto` runs float32).
pub fn kind_of(dtype: Dtype) -> tch::Kind {
    match dtype {
        Dtype::Auto | Dtype::Float32 => tch::Kind::Float,
        Dtype::Bfloat16 => tch::Kind::BFloat16,
        Dtype::Float16 => tch::Kind::Half,
    }
}

/// The family key of client `index` (see [`FederatedTuneSpec::family_key`]).
pub fn family_key(spec: &FederatedTuneSpec, index: usize) -> String {
    spec.family_key(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FederatedTuneSpec {
        let text = r#"{"clients": [
            {"name": "a", "model": {"family": "bert", "uri": "cache://models/all-MiniLM-L6-v2"}},
            {"name": "b", "model": {"family": "bert", "uri": "cache://models/all-MiniLM-L6-v2/"}},
            {"name": "c", "model": {"family": "bert", "uri": "/other/all-MiniLM-L6-v2"}},
            {"name": "d", "model": {"family": "bert", "uri": "cache://models/all-MiniLM-L6-v2",
                                    "adaptedLayers": {"mode": "topWindow", "window": 4}}}],
            "task": {"dataset": {"uri": "/d.jsonl"}, "labels": ["x", "z"]}}"#;
        serde_json::from_str(text).expect("spec")
    }

    #[test]
    fn family_keys_are_readable_and_distinct() {
        let s = spec();
        let a = family_key(&s, 0);
        assert!(a.starts_with("all-MiniLM-L6-v2."), "{a}");
        assert_eq!(a.len(), "all-MiniLM-L6-v2.".len() + 6);
        assert_eq!(a, family_key(&s, 1), "a trailing slash is the same model");
        assert_ne!(a, family_key(&s, 2), "another directory is another family");
        assert_ne!(
            a,
            family_key(&s, 3),
            "other adapted layers are another family"
        );
    }
}
