//! `dtype: auto` on a CPU whose flags name bf16 units: one GEMM, forward
//! and backward, timed in bfloat16 and in float32, and bfloat16 only where
//! it is clearly faster (the rule: [`heterotune_crds::dtype::resolve_cpu_timed`]).
//!
//! Only trainers started by `heterotune run` or `heterotune site` time (they
//! set [`heterotune_crds::dtype::TIMING_ENV`]); a pod decides by the flags.
//!
//! The timing is kept per machine in the model cache
//! ([`heterotune_crds::dtype::timing_file`]: the key names the CPU model,
//! its flags and this build's version), and the first trainer to write it
//! wins: every trainer of a machine, every round and a resumed run then
//! compute in the same dtype, whatever the noise of a later timing. Where
//! the cache cannot be written or the kept file is damaged, each process
//! times for itself, once.

use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Instant;

use heterotune_crds::dtype::{self, CpuBf16Units, GemmTimes, Resolved};
use heterotune_crds::spec::Dtype;
use tch::{Device, Kind, Tensor};

/// The GEMM: a feed-forward projection of a 512-wide layer over 256 token
/// rows (the shapes the trainer's steps spend most of their time in).
const WIDTH: i64 = 512;
const ROWS: i64 = 256;
/// Timed tries per dtype, interleaved; the fastest counts.
const TRIES: usize = 3;

/// `dtype` on this machine's CPU: its flags, `HETEROTUNE_CPU_BF16`, and
/// where the flags name bf16 units and the process that started this
/// trainer asks for it ([`dtype::TIMING_ENV`]), the timed GEMM. Without
/// that, the flags alone decide: deterministic for every pod of a run.
pub fn resolve(dtype: Dtype) -> Resolved {
    let timed = std::env::var(dtype::TIMING_ENV).is_ok_and(|v| v == "1");
    dtype::resolve_cpu_timed(
        dtype,
        CpuBf16Units::detect(),
        dtype::this_override(),
        || if timed { this_machine() } else { None },
    )
}

/// `heterotune-trainer cpu-dtype`: a fresh timing, the kept one and the
/// choice `auto` makes here (in the local runner's trainers, which time,
/// and in pods, which go by the flags), one per line.
pub fn report() -> String {
    let fresh = time_gemm();
    let file = dtype::this_timing_file();
    let kept = file.as_deref().and_then(dtype::read_timing);
    let ms = |t: Option<GemmTimes>| match t {
        Some(t) => format!(
            "bfloat16 {:.2} ms, float32 {:.2} ms ({:.2}× {})",
            f64::from(t.bf16_us) / 1000.0,
            f64::from(t.f32_us) / 1000.0,
            f64::from(t.f32_us.max(t.bf16_us)) / f64::from(t.f32_us.min(t.bf16_us).max(1)),
            if t.bf16_us < t.f32_us {
                "faster in bfloat16"
            } else {
                "slower in bfloat16"
            }
        ),
        None => "none".to_string(),
    };
    let (units, force) = (CpuBf16Units::detect(), dtype::this_override());
    format!(
        "GEMM {ROWS}×{WIDTH} by {}×{WIDTH}, forward and backward, fastest of {TRIES}, {} threads\n\
         timed now: {}\nkept ({}): {}\n\
         auto in trainers of heterotune run and site: {}\nauto in pods (the flags): {}\n",
        4 * WIDTH,
        tch::get_num_threads(),
        ms(fresh),
        file.map_or("no cache".to_string(), |f| f.display().to_string()),
        ms(kept),
        dtype::resolve_cpu_timed(Dtype::Auto, units, force, this_machine),
        dtype::resolve_cpu(Dtype::Auto, units, force)
    )
}

/// The machine's timing: kept by a trainer before, else measured now (and
/// kept, the first writer winning). Once per process.
fn this_machine() -> Option<GemmTimes> {
    static TIMES: OnceLock<Option<GemmTimes>> = OnceLock::new();
    *TIMES.get_or_init(|| {
        let file = dtype::this_timing_file();
        if let Some(times) = file.as_deref().and_then(dtype::read_timing) {
            return Some(times);
        }
        let times = time_gemm()?;
        Some(match file {
            Some(f) => keep_first(&f, times),
            None => times,
        })
    })
}

/// Keeps `times` in `file` unless another trainer got there first, and
/// returns the kept timing. The file appears whole or not at all (written
/// beside it, then hard-linked into place, which fails when it exists).
fn keep_first(file: &Path, times: GemmTimes) -> GemmTimes {
    let write = || -> std::io::Result<()> {
        let dir = file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(&serde_json::to_vec(&times).map_err(std::io::Error::other)?)?;
        tmp.as_file().sync_all()?;
        std::fs::hard_link(tmp.path(), file)
    };
    match write() {
        Ok(()) => times,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                tracing::debug!("cannot keep the dtype timing in {}: {e}", file.display());
            }
            dtype::read_timing(file).unwrap_or(times)
        }
    }
}

/// The GEMM's forward and backward in each dtype, interleaved after one
/// warm-up of each; None when libtorch refuses either dtype.
fn time_gemm() -> Option<GemmTimes> {
    let once = |kind: Kind| -> Option<u32> {
        let opts = (kind, Device::Cpu);
        let x = Tensor::f_randn([ROWS, WIDTH], opts)
            .ok()?
            .set_requires_grad(true);
        let w = Tensor::f_randn([4 * WIDTH, WIDTH], opts)
            .ok()?
            .set_requires_grad(true);
        let start = Instant::now();
        let y = x.f_linear::<Tensor>(&w, None).ok()?;
        y.f_sum(kind).ok()?.f_backward().ok()?;
        u32::try_from(start.elapsed().as_micros()).ok()
    };
    once(Kind::BFloat16)?;
    once(Kind::Float)?;
    let (mut bf16_us, mut f32_us) = (u32::MAX, u32::MAX);
    for _ in 0..TRIES {
        bf16_us = bf16_us.min(once(Kind::BFloat16)?);
        f32_us = f32_us.min(once(Kind::Float)?);
    }
    Some(GemmTimes { bf16_us, f32_us })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gemm_is_timed_in_both_dtypes() {
        let t = time_gemm().expect("libtorch runs both dtypes on a CPU");
        assert!(t.bf16_us > 0 && t.f32_us > 0, "{t:?}");
        assert!(t.bf16_us < u32::MAX && t.f32_us < u32::MAX, "{t:?}");
    }

    #[test]
    fn the_first_timing_kept_wins() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dtype::timing_file(dir.path(), "model name: x\nflags: avx512_bf16\n");
        let first = GemmTimes {
            bf16_us: 10,
            f32_us: 20,
        };
        let second = GemmTimes {
            bf16_us: 30,
            f32_us: 20,
        };
        assert_eq!(keep_first(&file, first), first);
        assert_eq!(keep_first(&file, second), first, "a later timing loses");
        assert_eq!(dtype::read_timing(&file), Some(first));
        // Nothing but the timing is left in the folder.
        let names: Vec<_> = std::fs::read_dir(file.parent().expect("dir"))
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // A damaged file is no timing: the fresh one is used.
        std::fs::write(&file, b"{not json").expect("write");
        assert_eq!(keep_first(&file, second), second);
    }
}
