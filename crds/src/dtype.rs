//! What `dtype: auto` becomes on the device a trainer runs on: bfloat16
//! where the device computes it natively, float32 elsewhere. The one home of
//! that rule, without tensors: the trainer resolves its client's dtype with
//! it (on a CUDA GPU from the compute capability it reads from the driver),
//! and `heterotune plan` prints what this machine's CPU would get.
//!
//! | device | `auto` becomes |
//! |---|---|
//! | x86-64 CPU with AVX512-BF16 or AMX-BF16 | bfloat16 when a timed GEMM says it is at least [`BF16_SPEEDUP`]× faster than float32 there, else float32 |
//! | any other CPU (AVX2 only, ARM, ...) | float32: bfloat16 would be emulated, several times slower |
//! | CUDA GPU, compute capability >= 8.0 (Ampere and newer) | bfloat16 |
//! | CUDA GPU below 8.0 | float32 |
//!
//! The flags are not enough: a 2-core Intel Xeon with AVX512-BF16 (no AMX)
//! ran libtorch's bfloat16 GEMMs 1.25–1.7× *slower* than its float32 ones, and
//! the quickstart 388 s in bfloat16 against 250 s in float32, where an AMD
//! EPYC with the same flag ran it 1.7× faster in bfloat16. So on a CPU whose
//! flags name bf16 units the trainer times one GEMM forward and backward in
//! both dtypes ([`resolve_cpu_timed`]) where it can keep the timing for
//! the machine ([`TIMING_ENV`]); the tensor code lives in the trainer, the
//! rule here.
//!
//! `HETEROTUNE_CPU_BF16=1` (or `0`) overrides what the CPU's flags and the
//! timing say, for tests and benchmarks: forcing the float32 path on a CPU
//! with bf16 units shows what a CPU without them would run. Explicit dtypes
//! are never changed.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::spec::Dtype;

/// The environment variable that overrides the CPU's bf16 units for `auto`
/// (`1`, `true`, `yes`, `on`: bfloat16; `0`, `false`, `no`, `off`: float32;
/// anything else is ignored).
pub const CPU_BF16_ENV: &str = "HETEROTUNE_CPU_BF16";

/// Set (to `1`) by the processes that start trainers on one machine whose
/// cache outlives them (`heterotune run`, `heterotune site`): only there
/// does a trainer time a GEMM and keep the timing, so that every trainer,
/// round and resumed run of the machine computes in the same dtype. A
/// trainer without it (a Kubernetes pod, whose home and cache are its own
/// and gone after it, a bare `heterotune-trainer`) decides by the flags, as
/// every pod of a run then does: a timing per pod could differ between pods
/// and rounds and change the trained values. Read by the trainer.
pub const TIMING_ENV: &str = "HETEROTUNE_CPU_DTYPE_TIMING";

/// How much faster a bfloat16 GEMM must run than a float32 one for `auto`
/// to pick bfloat16 on a CPU: clearly faster, so that timing noise near
/// parity does not pick the dtype that loses precision.
pub const BF16_SPEEDUP: f64 = 1.25;

/// One GEMM's forward and backward timed in each dtype on this CPU
/// (microseconds, the fastest of a few interleaved tries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GemmTimes {
    /// bfloat16.
    pub bf16_us: u32,
    /// float32.
    pub f32_us: u32,
}

impl GemmTimes {
    /// Whether bfloat16 is at least [`BF16_SPEEDUP`]× faster.
    pub fn bf16_pays(self) -> bool {
        f64::from(self.f32_us) >= BF16_SPEEDUP * f64::from(self.bf16_us.max(1))
    }
}

/// Where a machine's [`GemmTimes`] are kept under the cache `root`
/// (`$HETEROTUNE_CACHE`): `cpu/dtype-timing-<key>.json`, the key hashing
/// `cpuinfo`'s model name and flags and this build's version, so that every
/// trainer of a machine (every round, a resumed run) reads the first
/// timing, and another CPU or build times again.
pub fn timing_file(root: &Path, cpuinfo: &str) -> PathBuf {
    let mut hash = Sha256::new();
    for part in [
        cpuinfo_field(cpuinfo, "model name"),
        cpuinfo_field(cpuinfo, "flags"),
        env!("CARGO_PKG_VERSION"),
    ] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let key = hex::encode(&hash.finalize()[..8]);
    root.join("cpu").join(format!("dtype-timing-{key}.json"))
}

/// The value of the first `key : value` line of /proc/cpuinfo's `text`
/// (trimmed; empty when there is none).
fn cpuinfo_field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|line| {
            let (k, value) = line.split_once(':')?;
            (k.trim() == key).then_some(value.trim())
        })
        .unwrap_or_default()
}

/// This machine's [`timing_file`] (None without a cache root).
pub fn this_timing_file() -> Option<PathBuf> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    crate::uri::cache_root().map(|root| timing_file(&root, &cpuinfo))
}

/// Kept timings (None when missing or unreadable).
pub fn read_timing(file: &Path) -> Option<GemmTimes> {
    serde_json::from_slice(&std::fs::read(file).ok()?).ok()
}

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
    /// The CPU has bf16 units (`units`, [`Reason::Avx512Bf16`] or
    /// [`Reason::AmxBf16`]) and a timed GEMM decided.
    Timed {
        /// What the flags say.
        units: Bf16Units,
        /// The timing.
        times: GemmTimes,
    },
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
            Reason::Timed { units, times } => write!(
                f,
                "{units}; a GEMM timed {:.1} ms in bfloat16, {:.1} ms in float32",
                f64::from(times.bf16_us) / 1000.0,
                f64::from(times.f32_us) / 1000.0
            ),
            Reason::Override(on) => write!(f, "{CPU_BF16_ENV}={}", u8::from(*on)),
            Reason::Cuda(major, minor) => write!(f, "CUDA compute capability {major}.{minor}"),
            Reason::CudaUnknown => f.write_str("CUDA compute capability unknown"),
        }
    }
}

/// Which bf16 units a CPU's flags name (AVX512-BF16 first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Units {
    /// AVX512-BF16.
    Avx512,
    /// AMX-BF16 without AVX512-BF16.
    Amx,
}

impl fmt::Display for Bf16Units {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Bf16Units::Avx512 => "AVX512-BF16",
            Bf16Units::Amx => "AMX-BF16",
        })
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
        let flags = cpuinfo_field(text, "flags");
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

/// [`resolve_cpu`], with a timed GEMM deciding on a CPU whose flags name
/// bf16 units: `time` runs only there (and only for `auto` without an
/// override); bfloat16 when [`GemmTimes::bf16_pays`]. When `time` cannot
/// measure (`None`) the flags decide, as in [`resolve_cpu`].
pub fn resolve_cpu_timed(
    dtype: Dtype,
    units: CpuBf16Units,
    force: Option<bool>,
    time: impl FnOnce() -> Option<GemmTimes>,
) -> Resolved {
    let by_flags = resolve_cpu(dtype, units, force);
    let units = match by_flags.reason {
        Reason::Avx512Bf16 => Bf16Units::Avx512,
        Reason::AmxBf16 => Bf16Units::Amx,
        _ => return by_flags,
    };
    match time() {
        Some(times) => Resolved::auto(times.bf16_pays(), Reason::Timed { units, times }),
        None => by_flags,
    }
}

/// The [`CPU_BF16_ENV`] override of this process, if any.
pub fn this_override() -> Option<bool> {
    parse_override(std::env::var(CPU_BF16_ENV).ok().as_deref())
}

/// `dtype` on this machine's CPU as far as it is known without tensors
/// (what `heterotune plan` prints): its flags, [`CPU_BF16_ENV`], and the
/// GEMM timing a trainer kept here ([`this_timing_file`]); before any
/// trainer timed it, the flags alone (the trainer's own rule:
/// `heterotune_trainer::cpu_dtype`).
pub fn resolve_this_cpu(dtype: Dtype) -> Resolved {
    resolve_cpu_timed(dtype, CpuBf16Units::detect(), this_override(), || {
        this_timing_file().and_then(|f| read_timing(&f))
    })
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
    fn a_timed_gemm_decides_where_the_flags_name_bf16_units() {
        let times = |bf16_us, f32_us| GemmTimes { bf16_us, f32_us };
        // This Intel Xeon: bfloat16 1.7x slower.
        let slow = times(71_300, 41_500);
        let r = resolve_cpu_timed(Dtype::Auto, AVX512, None, || Some(slow));
        assert_eq!(r.dtype, Dtype::Float32);
        assert_eq!(
            r.to_string(),
            "auto → float32 (AVX512-BF16; a GEMM timed 71.3 ms in bfloat16, 41.5 ms in float32)"
        );
        // Clearly faster: bfloat16; faster by less than BF16_SPEEDUP: not.
        let r = resolve_cpu_timed(Dtype::Auto, AMX, None, || Some(times(10_000, 12_500)));
        assert_eq!(r.dtype, Dtype::Bfloat16);
        assert!(
            r.to_string().starts_with("auto → bfloat16 (AMX-BF16; "),
            "{r}"
        );
        let r = resolve_cpu_timed(Dtype::Auto, AVX512, None, || Some(times(10_000, 12_499)));
        assert_eq!(r.dtype, Dtype::Float32);
        // No timing: the flags decide.
        let r = resolve_cpu_timed(Dtype::Auto, AVX512, None, || None);
        assert_eq!((r.dtype, r.reason), (Dtype::Bfloat16, Reason::Avx512Bf16));
        // Nothing is timed without units, with an override, or for an
        // explicit dtype.
        let never = || -> Option<GemmTimes> { panic!("timed") };
        assert_eq!(
            resolve_cpu_timed(Dtype::Auto, NONE, None, never).reason,
            Reason::NoBf16Units
        );
        assert_eq!(
            resolve_cpu_timed(Dtype::Auto, AVX512, Some(true), never).reason,
            Reason::Override(true)
        );
        assert_eq!(
            resolve_cpu_timed(Dtype::Bfloat16, AVX512, None, never).reason,
            Reason::Explicit
        );
        // A zero bf16 time does not divide by zero.
        assert!(times(0, 2).bf16_pays());
    }

    #[test]
    fn the_timing_file_names_the_cpu_and_reads_back() {
        let root = Path::new("/cache");
        let a = "model name\t: Xeon\nflags\t\t: avx2 avx512_bf16\n";
        let file = timing_file(root, a);
        assert!(file.starts_with("/cache/cpu"), "{}", file.display());
        assert_eq!(file, timing_file(root, a), "the same CPU, the same file");
        assert_ne!(file, timing_file(root, "model name: Xeon\nflags: avx2\n"));
        assert_ne!(
            file,
            timing_file(root, "model name: EPYC\nflags: avx2 avx512_bf16\n")
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let file = timing_file(dir.path(), a);
        assert_eq!(read_timing(&file), None, "none kept");
        std::fs::create_dir_all(file.parent().expect("dir")).expect("mkdir");
        std::fs::write(&file, br#"{"bf16Us":71300,"f32Us":41500}"#).expect("write");
        assert_eq!(
            read_timing(&file),
            Some(GemmTimes {
                bf16_us: 71_300,
                f32_us: 41_500
            })
        );
        std::fs::write(&file, b"{").expect("write");
        assert_eq!(read_timing(&file), None, "a damaged file is no timing");
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
