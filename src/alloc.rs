//! Allocator settings for the process: training allocates and frees activation buffers of tens of
//! megabytes every step, and glibc's defaults hand each of them back to the kernel and fault the
//! pages in again on the next step.

/// What `tune` changed, for the benches to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuned {
    /// glibc malloc keeps large freed blocks (mmap and trim thresholds raised, two arenas).
    Glibc,
    /// Another allocator or platform: nothing was changed.
    Unchanged,
}

/// Blocks below this are served from the heap rather than fresh mmaps: glibc's maximum on 64-bit
/// (larger values are refused), above MiniLM's `[32, 128, 1536]` f32 activations (24 MiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// Free memory at the top of the heap kept rather than returned with `brk`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1 << 30;
/// Arenas: one per worker thread on a small machine; more only fragment the heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENA_MAX: libc::c_int = 2;

/// Applies the allocator settings; call once at the start of `main`, before threads start.
pub fn tune() -> Tuned {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only adjusts glibc's malloc parameters; it is called before other threads
        // allocate, and a rejected value (return 0) leaves the default in place.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                && libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX) == 1
        };
        if ok {
            return Tuned::Glibc;
        }
    }
    Tuned::Unchanged
}
