//! The sizing `heterotune plan` plans against: the defaults (no GPU
//! profile: every client on CPU), or a cluster's, read from the operator's
//! configuration (`--operator-config`: the JSON the chart renders from its
//! `config` values, that YAML, or a whole values file) or from a GPU
//! profile list (`--gpu-profiles`: the chart's `config.sizing.gpuProfiles`).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::controller::OperatorConfig;
use crate::sizing::{GpuProfile, SizingConfig};

/// A sizing file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterSizingError {
    /// The file cannot be read.
    #[error("cannot read {file}: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not YAML or JSON.
    #[error("{file}: not YAML or JSON: {message}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The file does not have the expected shape.
    #[error("{file}: {message} (expected {expected})")]
    Shape {
        /// The file.
        file: PathBuf,
        /// What is wrong, field named.
        message: String,
        /// What the option takes.
        expected: &'static str,
    },
}

const CONFIG_SHAPE: &str = "the operator's configuration ({sizing: {gpuProfiles: [...]}, ...}) \
     or a Helm values file with it under `config`";
const PROFILES_SHAPE: &str = "a list of GPU profiles ([{name: l4-24gb, memory: 24Gi}, ...]), \
     as under the chart's config.sizing.gpuProfiles";

fn read_value(file: &Path) -> Result<Value, ClusterSizingError> {
    let text = heterotune_crds::bounded::read_text(file, heterotune_crds::bounded::MAX_SPEC_BYTES)
        .map_err(|source| ClusterSizingError::Read {
            file: file.to_path_buf(),
            source,
        })?;
    serde_saphyr::from_str::<Value>(&text).map_err(|e| ClusterSizingError::Syntax {
        file: file.to_path_buf(),
        message: e.to_string(),
    })
}

/// The sizing of the operator configuration in `file`: the configuration
/// itself, or a values file's `config` (then keys the operator does not
/// read, such as `image`, are ignored).
pub fn from_operator_config(file: &Path) -> Result<SizingConfig, ClusterSizingError> {
    let mut value = read_value(file)?;
    if value.get("sizing").is_none() {
        if let Some(config) = value.get_mut("config") {
            value = config.take();
        }
    }
    let config: OperatorConfig =
        serde_json::from_value(value).map_err(|e| ClusterSizingError::Shape {
            file: file.to_path_buf(),
            message: e.to_string(),
            expected: CONFIG_SHAPE,
        })?;
    Ok(config.sizing)
}

/// The GPU profiles in `file`: a list, or a mapping with `gpuProfiles`.
pub fn gpu_profiles(file: &Path) -> Result<Vec<GpuProfile>, ClusterSizingError> {
    let mut value = read_value(file)?;
    if let Some(list) = value.get_mut("gpuProfiles") {
        value = list.take();
    }
    serde_json::from_value(value).map_err(|e| ClusterSizingError::Shape {
        file: file.to_path_buf(),
        message: e.to_string(),
        expected: PROFILES_SHAPE,
    })
}

/// The sizing `plan` uses: the operator configuration's (else the
/// defaults), its GPU profiles replaced by `profiles` when given.
pub fn resolve(
    operator_config: Option<&Path>,
    profiles: Option<&Path>,
) -> Result<SizingConfig, ClusterSizingError> {
    let mut config = match operator_config {
        Some(file) => from_operator_config(file)?,
        None => SizingConfig::default(),
    };
    if let Some(file) = profiles {
        config.gpu_profiles = gpu_profiles(file)?;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn reads_the_operator_config_a_values_file_and_a_profile_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let json = write(
            &dir,
            "config.json",
            r#"{"sizing": {"gpuProfiles": [{"name": "l4-24gb", "memory": "24Gi"}], "marginPercent": 20}}"#,
        );
        let config = resolve(Some(&json), None).expect("config");
        assert_eq!(config.gpu_profiles[0].name, "l4-24gb");
        assert_eq!(config.gpu_profiles[0].memory, 24 << 30);
        assert_eq!(config.margin_percent, 20);
        let values = write(
            &dir,
            "values.yaml",
            "image: { tag: x }\nconfig:\n  sizing:\n    gpuProfiles:\n      - { name: a100, memory: 80Gi }\n",
        );
        let config = resolve(Some(&values), None).expect("values");
        assert_eq!(config.gpu_profiles[0].name, "a100");
        let list = write(&dir, "profiles.yaml", "- { name: t4, memory: 16Gi }\n");
        let config = resolve(Some(&values), Some(&list)).expect("both");
        assert_eq!(config.gpu_profiles.len(), 1);
        assert_eq!(config.gpu_profiles[0].name, "t4");
        assert_eq!(config.margin_percent, 10);
    }

    #[test]
    fn a_wrong_shape_names_the_field_and_what_is_expected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = write(&dir, "p.yaml", "- { name: t4, memroy: 16Gi }\n");
        let e = gpu_profiles(&bad).expect_err("unknown field").to_string();
        assert!(
            e.contains("memroy") && e.contains("a list of GPU profiles"),
            "{e}"
        );
        let e = resolve(Some(&dir.path().join("none.yaml")), None)
            .expect_err("missing")
            .to_string();
        assert!(e.contains("cannot read") && e.contains("none.yaml"), "{e}");
    }
}
