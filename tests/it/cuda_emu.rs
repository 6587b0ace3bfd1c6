//! recycle's CUDA kernels on the CPU: `tests/cuda_emu/check.cpp` compiles
//! `src/model/kernels/cuda/kernels.cu` as C++ against a stand-in for the CUDA toolkit (threads for
//! a block's threads, barriers for `__syncthreads` and warp shuffles) and checks every kernel
//! against double-precision references. CI has no GPU and builds without the `cuda` feature, so
//! this is what checks the kernels' arithmetic and indexing on every push; `recycle gpu-check`
//! checks them on a GPU, through the custom ops.

use std::path::Path;
use std::process::Command;

/// The kernels `kernels.cu` defines, without their `_f32`/`_bf16` suffix.
fn kernel_names(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in source.lines() {
        let Some(rest) = line.split("__global__ void ").nth(1) else {
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if let Some(stem) = name.strip_suffix("_") {
            // `name_##S` in the macro that instantiates a kernel per dtype
            names.push(stem.to_string());
        } else {
            names.push(name);
        }
    }
    names.sort();
    names.dedup();
    names
}

#[test]
fn every_cuda_kernel_matches_its_reference_on_the_cpu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda-emu-check");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let build = Command::new(&cxx)
        .current_dir(root.join("tests/cuda_emu"))
        .args([
            "-std=c++20",
            "-O1",
            "-pthread",
            "-Wall",
            "-Wno-unknown-pragmas",
        ])
        .args([
            "-Iinclude",
            "-I../../src/model/kernels/cuda",
            "check.cpp",
            "-o",
        ])
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running {cxx} (set CXX to a C++20 compiler): {e}"));
    assert!(
        build.status.success(),
        "{cxx} failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "a kernel check failed:\n{out}");

    let passes: Vec<&str> = out.lines().filter(|l| l.starts_with("PASS ")).collect();
    let summary = out.lines().last().unwrap_or_default();
    assert_eq!(
        summary,
        format!("{} passed, 0 failed", passes.len()),
        "{out}"
    );

    let source = std::fs::read_to_string(root.join("src/model/kernels/cuda/kernels.cu")).unwrap();
    let names = kernel_names(&source);
    assert!(names.len() >= 15, "kernels found in kernels.cu: {names:?}");
    let untested: Vec<&String> = names
        .iter()
        .filter(|n| !passes.iter().any(|l| l.contains(n.as_str())))
        .collect();
    assert!(
        untested.is_empty(),
        "kernels with no check in tests/cuda_emu/check.cpp: {untested:?}\n{out}"
    );
}
