//! Records the git revision recycle is built from as `RECYCLE_GIT_REV` (for result provenance);
//! a build outside a git checkout, or without git, leaves it unset. With the `cuda` feature, also
//! compiles recycle's CUDA kernels (src/model/kernels/cuda/kernels.cu) to PTX with nvcc
//! (`$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on the PATH) for compute capability
//! `$CUDA_COMPUTE_CAP` (default 80: bf16 needs it; newer GPUs JIT the PTX).

use std::path::PathBuf;
use std::process::Command;

fn cuda_kernels() {
    const SRC: &str = "src/model/kernels/cuda/kernels.cu";
    println!("cargo:rerun-if-changed={SRC}");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("recycle_kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(SRC)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {} for {SRC}: {e}", nvcc.display()));
    assert!(status.success(), "{} failed on {SRC}", nvcc.display());
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda_kernels();
    }
    println!("cargo:rerun-if-env-changed=RECYCLE_GIT_REV");
    if let Ok(preset) = std::env::var("RECYCLE_GIT_REV") {
        println!("cargo:rustc-env=RECYCLE_GIT_REV={preset}");
        return;
    }
    // Rebuild when HEAD moves: watch HEAD and the ref it points to.
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={head}");
    }
    if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = git(&["rev-parse", "--git-path", &reference]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    if let Some(rev) = git(&["rev-parse", "HEAD"]) {
        println!("cargo:rustc-env=RECYCLE_GIT_REV={rev}");
    }
}
