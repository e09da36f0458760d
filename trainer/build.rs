//! Records libtorch's folder in the trainer's binaries (an rpath), so
//! `heterotune-trainer` runs as built, without `source scripts/env.sh`.
//!
//! torch-sys finds libtorch (with `LIBTORCH_USE_PYTORCH=1`: the venv's
//! `torch/lib`) and hands its folder to direct dependents as
//! `DEP_TCH_LIBTORCH_LIB`. On Linux the path is written as `DT_RUNPATH`
//! (`--enable-new-dtags`), which is searched after `LD_LIBRARY_PATH`: an
//! image that moves libtorch and sets `LD_LIBRARY_PATH` is unaffected.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    if !std::path::Path::new(&dir).is_absolute() {
        return;
    }
    match os.as_str() {
        "linux" => println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{dir}"),
        "macos" => println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}"),
        _ => {}
    }
}
