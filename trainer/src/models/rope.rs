//! Rotary position embeddings of the LLaMA family: the configuration's
//! RoPE parameters, their scaling (`default`, `linear`, `llama3`), the
//! inverse frequencies computed as Hugging Face does, and the cos/sin tables.

use std::path::Path;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// RoPE tables are precomputed up to this many positions (longer sequences
/// compute theirs on the fly).
pub(crate) const ROPE_TABLE_MAX: usize = 4096;

/// RoPE parameters: `rope_parameters` (transformers ≥ 5) or `rope_scaling`
/// (older configs).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeParameters {
    /// `default`, `linear` or `llama3`.
    #[serde(default)]
    pub rope_type: Option<String>,
    /// Older spelling of `rope_type`.
    #[serde(default, rename = "type")]
    pub legacy_type: Option<String>,
    /// Base of the rotary frequencies (transformers ≥ 5 keeps it here).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Scaling factor (`linear`, `llama3`).
    #[serde(default)]
    pub factor: Option<f64>,
    /// `llama3`: low-frequency factor.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// `llama3`: high-frequency factor.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// `llama3`: the context length before scaling.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// How rotary frequencies are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: f64,
    },
}

impl RopeScaling {
    /// The scaling a configuration's RoPE parameters name.
    ///
    /// # Errors
    /// [`Error::Model`] naming `path`: an unsupported type, a missing factor.
    pub(crate) fn of(parameters: Option<&RopeParameters>, path: &Path) -> Result<RopeScaling> {
        let Some(p) = parameters else {
            return Ok(RopeScaling::None);
        };
        let kind = p
            .rope_type
            .as_deref()
            .or(p.legacy_type.as_deref())
            .unwrap_or("default");
        let need = |v: Option<f64>, field: &str| {
            v.ok_or_else(|| Error::model(path, format!("rope type `{kind}` needs `{field}`")))
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear {
                factor: need(p.factor, "factor")?,
            }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: need(p.factor, "factor")?,
                low_freq_factor: need(p.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(p.high_freq_factor, "high_freq_factor")?,
                original_max_positions: need(
                    p.original_max_position_embeddings.map(|v| v as f64),
                    "original_max_position_embeddings",
                )?,
            }),
            other => Err(Error::model(
                path,
                format!("rope type `{other}` is not supported (default, linear, llama3)"),
            )),
        }
    }
}

/// Inverse rotary frequencies (`[head_dim / 2]`, f32, on `device`), computed
/// with the same f32 tensor operations as Hugging Face
/// (`_compute_default_rope_parameters` and the `linear` / `llama3`
/// variants), so the rotation angles agree bit for bit.
pub(crate) fn inverse_frequencies(
    head_dim: usize,
    theta: f64,
    scaling: RopeScaling,
    device: Device,
) -> Tensor {
    let exponent = Tensor::arange_start_step(0, head_dim as i64, 2, (Kind::Int64, device))
        .to_kind(Kind::Float)
        / head_dim as f64;
    let inv_freq = Tensor::pow_scalar(theta, &exponent).reciprocal();
    match scaling {
        RopeScaling::None => inv_freq,
        RopeScaling::Linear { factor } => inv_freq / factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_positions,
        } => {
            let low_wavelen = original_max_positions / low_freq_factor;
            let high_wavelen = original_max_positions / high_freq_factor;
            let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
            let long = wavelen.gt(low_wavelen);
            let scaled = (&inv_freq / factor).where_self(&long, &inv_freq);
            let smooth = (wavelen.reciprocal() * original_max_positions - low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            let smoothed = (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
            let medium = wavelen.ge(high_wavelen).logical_and(&long.logical_not());
            smoothed.where_self(&medium, &scaled)
        }
    }
}

/// cos and signed sin tables for positions `start..end`.
pub(crate) fn rope_tables(inv_freq: &Tensor, start: i64, end: i64, kind: Kind) -> (Tensor, Tensor) {
    let positions = Tensor::arange_start(start, end, (Kind::Float, inv_freq.device())).unsqueeze(1);
    let freqs = positions * inv_freq.unsqueeze(0);
    let cos = Tensor::cat(&[freqs.cos(), freqs.cos()], 1).to_kind(kind);
    let sin = freqs.sin();
    let sin_signed = Tensor::cat(&[-&sin, sin], 1).to_kind(kind);
    (cos, sin_signed)
}
