//! The `dmd` program; see `dmd_experiments::cli`. (`examples/dry_run.rs` runs this `main`
//! too.)

pub fn main() {
    keep_freed_memory();
    dmd_experiments::cli::main()
}

/// glibc's malloc returns large freed blocks to the system at once (mmap'd above a threshold
/// that adapts up to 32 MB, and the heap trimmed above 128 kB free), so a training step that
/// allocates and frees the same activation-sized buffers every iteration pays a page fault and
/// a page clear per 4 kB each time. Keeping them (as PyTorch's caching allocator does) made
/// the CPU training steps ~10% faster (results/bench/README.md). Peak memory is unchanged;
/// the process keeps its peak instead of returning memory between steps.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: mallopt only changes allocator parameters; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
