//! The memory allocator settings this binary ships with.
//!
//! Training allocates and frees the same large buffers (activations,
//! gradients) at every step. With glibc's defaults every buffer above the mmap
//! threshold (128 KiB at first, raised only as large blocks are freed) is a
//! fresh `mmap`, zero-filled page by page on first touch, and the top of the
//! heap is trimmed back to the kernel whenever 2x that threshold lies free, so
//! the next step faults the same pages in again. At start-up we raise both
//! thresholds once: buffers up to 32 MiB (glibc's maximum) come from the heap and are reused
//! across steps; peak RSS is unchanged (it is set by the largest step), only
//! the page-fault churn goes. `EDGE_TRAINER_MALLOC=system` keeps glibc's
//! defaults (for comparisons).

/// What [`init`] set up, for reports (`edge-trainer bench`).
pub fn name() -> &'static str {
    if tuned() {
        "glibc malloc, mmap/trim thresholds raised"
    } else {
        "glibc malloc (default settings)"
    }
}

fn tuned() -> bool {
    cfg!(all(target_os = "linux", target_env = "gnu"))
        && std::env::var("EDGE_TRAINER_MALLOC").map_or(true, |v| v != "system")
}

/// Applies the settings; call first thing in `main`, before other threads start.
pub fn init() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if tuned() {
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 256 << 20;
        // SAFETY: mallopt only changes allocator parameters and is called
        // before any other thread exists; a refused value leaves the default.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}
