//! Where a client's trainer runs: explicit resources, CPU, or the smallest
//! GPU profile that holds its estimate.

use heterotune_crds::spec::ClientSpec;

use super::bridge::BridgeModel;
use super::estimate::{estimate, MemoryEstimate, Target, Workload};
use super::settings::{GpuProfile, SizingConfig};
use super::shape::ModelShape;
use super::SizingError;

/// Where a client's trainer runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// On one GPU of `profile`.
    Gpu {
        /// The chosen profile.
        profile: GpuProfile,
        /// Accelerator memory estimate.
        estimate: MemoryEstimate,
        /// Host memory to request (weights staged on the host + runtime).
        host_memory: u64,
    },
    /// On CPU.
    Cpu {
        /// Host memory estimate.
        estimate: MemoryEstimate,
    },
    /// As `clients[].resources` says (no estimate applied).
    Explicit {
        /// The estimate for information, when the shape is known.
        estimate: Option<MemoryEstimate>,
    },
}

impl Placement {
    /// The profile name reported in status (`cpu` for CPU-only, `explicit`).
    pub fn profile_name(&self) -> String {
        match self {
            Placement::Gpu { profile, .. } => profile.name.clone(),
            Placement::Cpu { .. } => "cpu".to_string(),
            Placement::Explicit { .. } => "explicit".to_string(),
        }
    }

    /// The memory estimate reported in status.
    pub fn estimated_bytes(&self) -> Option<u64> {
        match self {
            Placement::Gpu { estimate, .. } | Placement::Cpu { estimate } => Some(estimate.total),
            Placement::Explicit { estimate } => estimate.map(|e| e.total),
        }
    }

    /// The trainer's `--device`.
    pub fn device(&self) -> &'static str {
        match self {
            Placement::Gpu { .. } => "cuda",
            Placement::Cpu { .. } => "cpu",
            Placement::Explicit { .. } => "auto",
        }
    }
}

/// Chooses where client `client` runs: its own model of `shape` trained
/// with `workload` and, with `spec.bridge`, `bridge` next to it (`Some(Err)`:
/// the bridge's size is unknown).
pub fn place(
    client: &ClientSpec,
    shape: Option<&ModelShape>,
    workload: &Workload,
    bridge: Option<&Result<BridgeModel, SizingError>>,
    allow_cpu: bool,
    config: &SizingConfig,
    index: usize,
) -> Result<Placement, SizingError> {
    let bridge = bridge.map(Result::as_ref).transpose();
    let sized = |shape: &ModelShape, bridge: Option<&BridgeModel>, target: Target| {
        let own = estimate(shape, workload, config, target);
        match bridge {
            Some(b) => own.with_bridge(b.parts(config, target)),
            None => own,
        }
    };
    if client.resources.is_some() {
        return Ok(Placement::Explicit {
            estimate: match (shape, bridge) {
                (Some(s), Ok(b)) => Some(sized(s, b, Target::Gpu)),
                _ => None,
            },
        });
    }
    let shape = shape.ok_or_else(|| SizingError::UnknownModel {
        index,
        uri: client.model.uri.clone(),
    })?;
    let bridge = bridge.map_err(Clone::clone)?;
    let parameters = shape.parameters + bridge.map_or(0, |b| b.shape.parameters);
    let small = allow_cpu && parameters <= config.cpu.max_parameters;
    let cpu = || Placement::Cpu {
        estimate: sized(shape, bridge, Target::Cpu),
    };
    if small && config.cpu.prefer_for_small_models {
        return Ok(cpu());
    }
    let gpu = sized(shape, bridge, Target::Gpu);
    let mut profiles: Vec<&GpuProfile> = config.gpu_profiles.iter().collect();
    profiles.sort_by_key(|p| (p.memory, p.gpus_per_pod));
    if let Some(profile) = profiles.iter().find(|p| p.memory >= gpu.total) {
        return Ok(Placement::Gpu {
            profile: (*profile).clone(),
            estimate: gpu,
            host_memory: gpu.weights() + config.gpu_host_overhead,
        });
    }
    if small {
        return Ok(cpu());
    }
    let largest = profiles.last();
    let cpu_note = if !allow_cpu {
        " (spec.trainer.allowCpu is false)".to_string()
    } else {
        format!(
            " (CPU training is limited to models of at most {} parameters; this one has {parameters}{})",
            config.cpu.max_parameters,
            if bridge.is_some() { " with the bridge" } else { "" }
        )
    };
    Err(SizingError::NoGpuProfileFits {
        client: client.name.clone(),
        needed: gpu.total,
        largest: largest.map(|p| p.memory).unwrap_or(0),
        largest_name: largest.map(|p| p.name.clone()),
        cpu_note,
    })
}
