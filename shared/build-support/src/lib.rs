//! Helpers for build scripts of crates whose binaries or tests link libtorch (through tch).
//!
//! torch-sys links against the libtorch of the venv's torch wheel (`LIBTORCH`, set by
//! `.cargo/config.toml` to `.venv/libtorch`) but sets no rpath, so without help every binary
//! would need `LD_LIBRARY_PATH`. [`link_libtorch_rpath`] records the library folder in the
//! binaries that the calling crate builds (bins, tests, examples, benches).

use std::path::{Path, PathBuf};

/// Emits `-Wl,-rpath,<libtorch>/lib` (and keeps `libtorch_cuda` linked when the libtorch has
/// it) for every target of the calling package. Call from
/// `build.rs`. The path is kept unresolved (`<repo>/.venv/libtorch/lib`) so that a venv
/// rebuilt under a new cache key is picked up without relinking.
pub fn link_libtorch_rpath() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        println!("cargo:warning=LIBTORCH is not set: binaries will need LD_LIBRARY_PATH to find libtorch");
        return;
    };
    let libtorch = absolute(&libtorch);
    let lib = libtorch.join("lib");
    if !lib.is_dir() {
        println!(
            "cargo:warning={} does not exist: run scripts/setup.sh first",
            lib.display()
        );
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // Nothing calls into libtorch_cuda directly, so `--as-needed` drops it and libtorch then
    // sees no CUDA at all: keep it whenever this libtorch has it (its CUDA libraries resolve
    // through its own RUNPATH, and load fine on machines without a GPU).
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-ltorch_cuda,--pop-state");
    }
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_or_else(|_| path.to_path_buf(), |dir| dir.join(path))
    }
}
