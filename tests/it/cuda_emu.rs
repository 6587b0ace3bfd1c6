//! recycle's CUDA kernels on the CPU: `tests/cuda_emu/check.cpp` compiles
//! `src/model/kernels/cuda/kernels.cu` as C++ against a stand-in for the CUDA toolkit (threads for
//! a block's threads, barriers for `__syncthreads` and warp shuffles) and checks every kernel
//! against double-precision references, built with the address and undefined-behaviour
//! sanitizers. CI has no GPU and builds without the `cuda` feature, so
//! this is what checks the kernels' arithmetic and indexing on every push; `recycle gpu-check`
//! checks them on a GPU, through the custom ops.

use std::path::Path;
use std::process::Command;

/// What follows a kernel's `__launch_bounds__(..)`, if it has one, else `rest` itself.
fn past_launch_bounds(rest: &str) -> &str {
    match rest.strip_prefix("__launch_bounds__(") {
        Some(args) => args[args.find(')').map_or(0, |i| i + 1)..].trim_start(),
        None => rest,
    }
}

/// The kernels `kernels.cu` defines, without their `_f32`/`_bf16` suffix.
fn kernel_names(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in source.lines() {
        let Some(rest) = line.split("__global__ void ").nth(1) else {
            continue;
        };
        let rest = past_launch_bounds(rest);
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
            // An index past a buffer, a shared array or a vector, or undefined arithmetic, in
            // any kernel ends the run with the sanitizer's report (on a GPU it would corrupt
            // memory or fault the launch).
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=undefined",
            "-fno-omit-frame-pointer",
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
    assert!(
        run.status.success(),
        "a kernel check failed:\n{out}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );

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

/// Each kernel's parameter count, by the name `kernel_names` gives it.
fn kernel_arities(source: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for (at, _) in source.match_indices("__global__ void ") {
        let rest = past_launch_bounds(&source[at + "__global__ void ".len()..]);
        let first_line = rest.lines().next().unwrap_or_default();
        let name = kernel_names(&format!("__global__ void {first_line}"))
            .into_iter()
            .next()
            .unwrap();
        let open = rest.find('(').unwrap();
        let close = open + rest[open..].find(')').unwrap();
        let params = &rest[open + 1..close];
        out.push((name, params.split(',').count()));
    }
    out
}

/// Every launch in `src/model/kernels/cuda.rs`: the kernel it loads (by literal name, or, for a
/// helper that takes the name as a parameter, each literal its callers give) and how many `.arg(`
/// it pushes before `.launch(`.
fn launches(rust: &str) -> Vec<(String, usize)> {
    let literal_after = |s: &str| -> Option<String> {
        let start = s.find('"')? + 1;
        let len = s[start..].find('"')?;
        Some(s[start..start + len].to_string())
    };
    let mut out = Vec::new();
    for pattern in ["func!(dev, ", "load_kernel(dev, ", "load_kernel(&dev, "] {
        for (at, _) in rust.match_indices(pattern) {
            let tail = &rust[at + pattern.len()..];
            let launch = tail
                .find(".launch(")
                .expect("a launch after each kernel load");
            let args = tail[..launch].matches(".arg(").count();
            let names = if tail.starts_with("name(\"") {
                // `name("softmax_fwd")` in the softmax launch: the kernel, or its chunked variant
                // (`_vec`) where the rows fit; both take the same arguments.
                let stem = literal_after(tail).unwrap();
                vec![format!("{stem}_vec"), stem]
            } else if tail.starts_with('"') || tail.starts_with("&format!(\"") {
                // A literal, or `format!("swap12_u{}", ..)`: the stem before the dtype or unit.
                let name = literal_after(tail).unwrap();
                let stem = name.split('{').next().unwrap();
                vec![stem
                    .trim_end_matches("_u")
                    .trim_end_matches('_')
                    .to_string()]
            } else {
                // A name passed in: the helper is the function this load sits in; its callers
                // name the kernels.
                let before = &rust[..at];
                let fn_at = before.rfind("fn ").unwrap();
                let helper: String = before[fn_at + 3..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                let call = format!("{helper}(\"");
                let names: Vec<String> = rust
                    .match_indices(&call)
                    .filter_map(|(c, _)| literal_after(&rust[c..]))
                    .collect();
                assert!(!names.is_empty(), "no caller of {helper} names a kernel");
                names
            };
            out.extend(names.into_iter().map(|n| (n, args)));
        }
    }
    out
}

/// CI builds without CUDA, so nothing compiles the Rust launch sites against the kernels; a
/// launch that pushes the wrong number of arguments would fail only on a GPU (session 6 found one
/// by reading). This counts them against each kernel's parameters, and checks every kernel is
/// launched somewhere.
#[test]
fn every_launch_passes_as_many_arguments_as_its_kernel_takes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cu = std::fs::read_to_string(root.join("src/model/kernels/cuda/kernels.cu")).unwrap();
    let rust = std::fs::read_to_string(root.join("src/model/kernels/cuda.rs")).unwrap();
    let arities = kernel_arities(&cu);
    let launches = launches(&rust);
    assert!(launches.len() >= 15, "launch sites found: {launches:?}");
    for (name, args) in &launches {
        let params: Vec<usize> = arities
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, n)| *n)
            .collect();
        assert!(
            !params.is_empty(),
            "cuda.rs launches {name}, which kernels.cu lacks"
        );
        assert!(
            params.iter().all(|p| p == args),
            "cuda.rs launches {name} with {args} arguments; kernels.cu declares {params:?}"
        );
    }
    for (name, _) in &arities {
        assert!(
            launches.iter().any(|(l, _)| l == name),
            "kernels.cu defines {name}, which cuda.rs never launches"
        );
    }
}
