//! Loading libtorch's CUDA half on demand.
//!
//! The trainer links only what it uses of libtorch (rustc links with
//! `--as-needed`), so a CUDA build's `libtorch_cuda.so`, whose symbols the
//! trainer never names, is not loaded and tch would see no GPU. Linking it
//! unconditionally would cost every CPU-only trainer about 0.2 s of start-up
//! and 390 MB of resident libraries (measured here), which a CPU pod's
//! memory limit must then cover. So it is opened at run time, only when a
//! GPU is asked for: `--device cuda`, or `--device auto` on a machine with an
//! NVIDIA device node. [`device`] turns the trainer's `--device` into a
//! libtorch device; [`compute_capability`] asks the driver what a GPU is.

use std::ffi::{CStr, CString};
use std::path::Path;

use tch::Device;

use crate::{Error, Result};

/// The library that registers libtorch's CUDA backend when loaded.
const LIBRARY: &str = "libtorch_cuda.so";

/// True when this machine exposes an NVIDIA GPU to this process.
pub fn gpu_device_present() -> bool {
    ["/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg"]
        .iter()
        .any(|p| Path::new(p).exists())
}

/// Loads `libtorch_cuda.so` (found like any shared library: the trainer's
/// RUNPATH, `LD_LIBRARY_PATH`); `Err` with the loader's reason otherwise.
/// Loading it twice is harmless.
pub fn load_cuda_backend() -> Result<(), String> {
    let name = CString::new(LIBRARY).map_err(|e| e.to_string())?;
    // SAFETY: dlopen with a valid NUL-terminated name; the handle is kept
    // for the life of the process (never closed), as a linked library is.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let reason = unsafe {
            let e = libc::dlerror();
            if e.is_null() {
                "unknown error".to_string()
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            }
        };
        return Err(format!("cannot load {LIBRARY}: {reason}"));
    }
    Ok(())
}

/// The libtorch device of `--device name`: `cpu`, `cuda` (an error when no
/// GPU can be used), or `auto` (CUDA when available, with a warning when a
/// GPU is present but its backend does not load).
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if gpu_device_present() {
                if let Err(e) = load_cuda_backend() {
                    tracing::warn!("a GPU is present but {e}; training on the CPU");
                }
            }
            Ok(Device::cuda_if_available())
        }
        "cuda" => {
            load_cuda_backend().map_err(|e| {
                Error::Device(format!(
                    "cuda: {e}: the trainer needs a CUDA build of libtorch \
                     (the -cuda trainer image, or the CUDA torch wheel on this machine)"
                ))
            })?;
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(Error::Device(
                    "cuda: libtorch's CUDA backend is loaded but sees no GPU \
                     (driver missing, or no GPU given to this container)"
                        .to_string(),
                ))
            }
        }
        other => Err(Error::Device(format!("{other:?}: use cpu, cuda or auto"))),
    }
}

/// The driver library, present wherever a CUDA GPU is usable.
const DRIVER: &CStr = c"libcuda.so.1";

/// The compute capability (major, minor) of CUDA device `index` as the
/// driver reports it (tch does not expose it); `None` when it cannot be read.
pub fn compute_capability(index: usize) -> Option<(u32, u32)> {
    type Init = unsafe extern "C" fn(u32) -> i32;
    type DeviceGet = unsafe extern "C" fn(*mut i32, i32) -> i32;
    type Attribute = unsafe extern "C" fn(*mut i32, i32, i32) -> i32;
    // CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR and _MINOR.
    const MAJOR: i32 = 75;
    const MINOR: i32 = 76;
    let ordinal = i32::try_from(index).ok()?;
    // SAFETY: dlopen/dlsym with valid NUL-terminated names; the symbols are
    // the driver API's, called with their documented signatures and valid
    // out-pointers; the handle is never closed.
    unsafe {
        let handle = libc::dlopen(DRIVER.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        if handle.is_null() {
            return None;
        }
        let symbol = |name: &CStr| {
            let p = libc::dlsym(handle, name.as_ptr());
            (!p.is_null()).then_some(p)
        };
        let init: Init = std::mem::transmute(symbol(c"cuInit")?);
        let device_get: DeviceGet = std::mem::transmute(symbol(c"cuDeviceGet")?);
        let attribute: Attribute = std::mem::transmute(symbol(c"cuDeviceGetAttribute")?);
        let mut device = 0;
        let (mut major, mut minor) = (0, 0);
        let ok = init(0) == 0
            && device_get(&mut device, ordinal) == 0
            && attribute(&mut major, MAJOR, device) == 0
            && attribute(&mut minor, MINOR, device) == 0;
        if !ok {
            return None;
        }
        Some((u32::try_from(major).ok()?, u32::try_from(minor).ok()?))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cuda_backend_loads_from_a_cuda_build_or_says_why() {
        // The pinned PyPI wheel is a CUDA build: its libtorch_cuda.so loads
        // (there is no GPU here, so CUDA stays unavailable). A CPU-only
        // libtorch has no such file and the error names it.
        match super::load_cuda_backend() {
            Ok(()) => {}
            Err(e) => assert!(e.contains("libtorch_cuda.so"), "{e}"),
        }
    }

    #[test]
    fn compute_capability_is_none_without_a_gpu_or_plausible_with_one() {
        match super::compute_capability(0) {
            None => {}
            Some((major, _)) => assert!((3..=20).contains(&major), "{major}"),
        }
    }
}
