//! What `dtype: auto` becomes on the device a trainer runs on: bfloat16
//! where the device computes it natively, float32 elsewhere. The one home of
//! that rule, without tensors: the trainer resolves its client's dtype with
//! it (on a CUDA GPU from the compute capability it reads from the driver),
//! and `heterotune plan` prints what this machine's CPU would get.
//!
//! | device | `auto` becomes |
//! |---|---|
//! | x86-64 CPU with AVX512-BF16 or AMX-BF16 | bfloat16 |
//! | any other CPU (AVX2 only, ARM, ...) | float32: bfloat16 would be emulated, several times slower |
//! | CUDA GPU, compute capability >= 8.0 (Ampere and newer) | bfloat16 |
//! | CUDA GPU below 8.0 | float32 |
//!
//! `HETEROTUNE_CPU_BF16=1` (or `0`) overrides what the CPU's flags say, for
//! tests and benchmarks: forcing the float32 path on a CPU with bf16 units
//! shows what a CPU without them would run. Explicit dtypes are never changed.

use std::fmt;

use crate::spec::Dtype;

/// The environment variable that overrides the CPU's bf16 units for `auto`
/// (`1`, `true`, `yes`, `on`: bfloat16; `0`, `false`, `no`, `off`: float32;
/// anything else is ignored).
pub const CPU_BF16_ENV: &str = "HETEROTUNE_CPU_BF16";

/// Why a dtype was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The spec names the dtype: nothing was chosen.
    Explicit,
    /// The CPU has AVX512-BF16.
    Avx512Bf16,
    /// The CPU has AMX-BF16 (and no AVX512-BF16).
    AmxBf16,
    /// The CPU has no bf16 units (or is not x86-64).
    NoBf16Units,
    /// [`CPU_BF16_ENV`] decided (`true`: bfloat16).
    Override(bool),
    /// A CUDA GPU of this compute capability (major, minor).
    Cuda(u32, u32),
    /// A CUDA GPU whose compute capability could not be read.
    CudaUnknown,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Explicit => f.write_str("set in the spec"),
            Reason::Avx512Bf16 => f.write_str("AVX512-BF16"),
            Reason::AmxBf16 => f.write_str("AMX-BF16"),
            Reason::NoBf16Units => f.write_str("no bf16 units"),
            Reason::Override(on) => write!(f, "{CPU_BF16_ENV}={}", u8::from(*on)),
            Reason::Cuda(major, minor) => write!(f, "CUDA compute capability {major}.{minor}"),
            Reason::CudaUnknown => f.write_str("CUDA compute capability unknown"),
        }
    }
}

/// A dtype as resolved for a device: never [`Dtype::Auto`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// What the spec says.
    pub requested: Dtype,
    /// What the backbone runs in.
    pub dtype: Dtype,
    /// Why.
    pub reason: Reason,
}

impl Resolved {
    /// An explicit dtype, kept as it is.
    fn explicit(dtype: Dtype) -> Resolved {
        Resolved {
            requested: dtype,
            dtype,
            reason: Reason::Explicit,
        }
    }

    /// `auto` resolved to bfloat16 (`true`) or float32, for `reason`.
    fn auto(bf16: bool, reason: Reason) -> Resolved {
        Resolved {
            requested: Dtype::Auto,
            dtype: if bf16 {
                Dtype::Bfloat16
            } else {
                Dtype::Float32
            },
            reason,
        }
    }
}

/// `float32`, or for `auto` e.g. `auto → bfloat16 (AVX512-BF16)`.
impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            Reason::Explicit => f.write_str(self.dtype.as_str()),
            reason => write!(f, "auto → {} ({reason})", self.dtype.as_str()),
        }
    }
}

/// The bf16 units of a CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuBf16Units {
    /// AVX512-BF16 (`avx512_bf16` in /proc/cpuinfo).
    pub avx512_bf16: bool,
    /// AMX-BF16 (`amx_bf16` in /proc/cpuinfo).
    pub amx_bf16: bool,
}

impl CpuBf16Units {
    /// The units of this machine's CPU: AVX512-BF16 from the standard
    /// library's detection (which also checks that the OS enabled the
    /// registers), AMX-BF16 from /proc/cpuinfo (its detection macro is not
    /// stable). None on other architectures.
    pub fn detect() -> CpuBf16Units {
        #[cfg(target_arch = "x86_64")]
        {
            let flags = std::fs::read_to_string("/proc/cpuinfo")
                .map(|text| CpuBf16Units::from_cpuinfo(&text))
                .unwrap_or_default();
            CpuBf16Units {
                avx512_bf16: std::arch::is_x86_feature_detected!("avx512bf16"),
                amx_bf16: flags.amx_bf16,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuBf16Units::default()
        }
    }

    /// The units named in the first `flags` line of /proc/cpuinfo's `text`.
    pub fn from_cpuinfo(text: &str) -> CpuBf16Units {
        let flags = text
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "flags").then_some(value)
            })
            .unwrap_or_default();
        let has = |name: &str| flags.split_whitespace().any(|f| f == name);
        CpuBf16Units {
            avx512_bf16: has("avx512_bf16"),
            amx_bf16: has("amx_bf16"),
        }
    }
}

/// Parses an override value: `Some(true)` for bfloat16, `Some(false)` for
/// float32, `None` when unset or not understood.
pub fn parse_override(value: Option<&str>) -> Option<bool> {
    match value?.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// `dtype` on a CPU with `units`, `force` (from [`CPU_BF16_ENV`]) winning
/// over the units.
pub fn resolve_cpu(dtype: Dtype, units: CpuBf16Units, force: Option<bool>) -> Resolved {
    if dtype != Dtype::Auto {
        return Resolved::explicit(dtype);
    }
    match force {
        Some(bf16) => Resolved::auto(bf16, Reason::Override(bf16)),
        None if units.avx512_bf16 => Resolved::auto(true, Reason::Avx512Bf16),
        None if units.amx_bf16 => Resolved::auto(true, Reason::AmxBf16),
        None => Resolved::auto(false, Reason::NoBf16Units),
    }
}

/// `dtype` on this machine's CPU (its units and [`CPU_BF16_ENV`]).
pub fn resolve_this_cpu(dtype: Dtype) -> Resolved {
    let force = parse_override(std::env::var(CPU_BF16_ENV).ok().as_deref());
    resolve_cpu(dtype, CpuBf16Units::detect(), force)
}

/// `dtype` on a CUDA GPU of compute `capability` (major, minor; `None`:
/// unknown, which runs float32).
pub fn resolve_cuda(dtype: Dtype, capability: Option<(u32, u32)>) -> Resolved {
    if dtype != Dtype::Auto {
        return Resolved::explicit(dtype);
    }
    match capability {
        Some((major, minor)) => Resolved::auto(major >= 8, Reason::Cuda(major, minor)),
        None => Resolved::auto(false, Reason::CudaUnknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AVX512: CpuBf16Units = CpuBf16Units {
        avx512_bf16: true,
        amx_bf16: false,
    };
    const AMX: CpuBf16Units = CpuBf16Units {
        avx512_bf16: false,
        amx_bf16: true,
    };
    const NONE: CpuBf16Units = CpuBf16Units {
        avx512_bf16: false,
        amx_bf16: false,
    };

    #[test]
    fn auto_follows_the_cpu_units() {
        let r = resolve_cpu(Dtype::Auto, AVX512, None);
        assert_eq!((r.dtype, r.reason), (Dtype::Bfloat16, Reason::Avx512Bf16));
        assert_eq!(r.to_string(), "auto → bfloat16 (AVX512-BF16)");
        let r = resolve_cpu(Dtype::Auto, AMX, None);
        assert_eq!((r.dtype, r.reason), (Dtype::Bfloat16, Reason::AmxBf16));
        let r = resolve_cpu(Dtype::Auto, NONE, None);
        assert_eq!((r.dtype, r.reason), (Dtype::Float32, Reason::NoBf16Units));
        assert_eq!(r.to_string(), "auto → float32 (no bf16 units)");
    }

    #[test]
    fn the_override_wins_both_ways() {
        let r = resolve_cpu(Dtype::Auto, AVX512, Some(false));
        assert_eq!(
            (r.dtype, r.reason),
            (Dtype::Float32, Reason::Override(false))
        );
        assert_eq!(r.to_string(), "auto → float32 (HETEROTUNE_CPU_BF16=0)");
        let r = resolve_cpu(Dtype::Auto, NONE, Some(true));
        assert_eq!(
            (r.dtype, r.reason),
            (Dtype::Bfloat16, Reason::Override(true))
        );
        for (value, expected) in [
            (Some("1"), Some(true)),
            (Some(" on "), Some(true)),
            (Some("TRUE"), Some(true)),
            (Some("0"), Some(false)),
            (Some("off"), Some(false)),
            (Some("maybe"), None),
            (Some(""), None),
            (None, None),
        ] {
            assert_eq!(parse_override(value), expected, "{value:?}");
        }
    }

    #[test]
    fn explicit_dtypes_are_kept_everywhere() {
        for dtype in [Dtype::Float32, Dtype::Bfloat16, Dtype::Float16] {
            for units in [AVX512, AMX, NONE] {
                for force in [None, Some(true), Some(false)] {
                    let r = resolve_cpu(dtype, units, force);
                    assert_eq!((r.dtype, r.reason), (dtype, Reason::Explicit));
                    assert_eq!(r.to_string(), dtype.as_str());
                }
            }
            assert_eq!(resolve_cuda(dtype, Some((7, 5))).dtype, dtype);
            assert_eq!(resolve_cuda(dtype, None).dtype, dtype);
        }
    }

    #[test]
    fn auto_on_cuda_needs_compute_capability_8() {
        assert_eq!(
            resolve_cuda(Dtype::Auto, Some((8, 0))).dtype,
            Dtype::Bfloat16
        );
        assert_eq!(
            resolve_cuda(Dtype::Auto, Some((9, 0))).dtype,
            Dtype::Bfloat16
        );
        let r = resolve_cuda(Dtype::Auto, Some((7, 5)));
        assert_eq!(r.dtype, Dtype::Float32);
        assert_eq!(
            r.to_string(),
            "auto → float32 (CUDA compute capability 7.5)"
        );
        assert_eq!(resolve_cuda(Dtype::Auto, None).dtype, Dtype::Float32);
    }

    #[test]
    fn auto_is_the_default_and_reads_and_writes_as_auto() {
        use crate::spec::ModelSpec;
        let m: ModelSpec =
            serde_json::from_str(r#"{"family":"llama","uri":"cache://models/m"}"#).expect("spec");
        assert_eq!(m.dtype, Dtype::Auto);
        assert_eq!(Dtype::default(), Dtype::Auto);
        for dtype in [Dtype::Auto, Dtype::Float32, Dtype::Bfloat16, Dtype::Float16] {
            let json = serde_json::to_string(&dtype).expect("serialises");
            assert_eq!(json, format!("\"{}\"", dtype.as_str()));
            assert_eq!(serde_json::from_str::<Dtype>(&json).expect("parses"), dtype);
        }
        // `auto` is sized as float32 when nothing else is known.
        assert_eq!(Dtype::Auto.bytes(), 4);
    }

    #[test]
    fn cpuinfo_flags_are_read_by_name() {
        let text = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n\
                    processor\t: 1\nflags\t\t: fpu\n";
        assert_eq!(CpuBf16Units::from_cpuinfo(text), AVX512);
        let amx = "flags : sse amx_bf16 amx_tile\n";
        assert_eq!(CpuBf16Units::from_cpuinfo(amx), AMX);
        // `avx512_bf16x` is not `avx512_bf16`; no flags line: no units.
        assert_eq!(CpuBf16Units::from_cpuinfo("flags: avx512_bf16x\n"), NONE);
        assert_eq!(CpuBf16Units::from_cpuinfo("model name: x\n"), NONE);
    }

    #[test]
    fn detection_agrees_with_cpuinfo_here() {
        // Where /proc/cpuinfo exists, the standard library's detection of
        // AVX512-BF16 matches the kernel's flags.
        if let Ok(text) = std::fs::read_to_string("/proc/cpuinfo") {
            let flags = CpuBf16Units::from_cpuinfo(&text);
            let detected = CpuBf16Units::detect();
            if cfg!(target_arch = "x86_64") {
                assert_eq!(detected.avx512_bf16, flags.avx512_bf16);
                assert_eq!(detected.amx_bf16, flags.amx_bf16);
            } else {
                assert_eq!(detected, CpuBf16Units::default());
            }
        }
    }
}
