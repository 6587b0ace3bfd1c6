//! Records the git revision recycle is built from as `RECYCLE_GIT_REV` (for result provenance);
//! a build outside a git checkout, or without git, leaves it unset.

use std::process::Command;

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
