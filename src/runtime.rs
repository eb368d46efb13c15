//! Process-wide settings for training speed, applied once at start-up (the
//! binary ships them; nothing needs to be set by hand). Measured with
//! `edge-trainer bench`, see README "Performance".
//!
//! - **Allocator.** Training allocates and frees the same large buffers
//!   (activations, gradients) at every step. With glibc's defaults each buffer
//!   above the mmap threshold (128 KiB at first) is a fresh `mmap`, zero-filled
//!   page by page on first touch, and the top of the heap is trimmed back to
//!   the kernel whenever enough lies free, so the next step faults the same
//!   pages in again. Raising both thresholds (to glibc's maximum, 32 MiB) lets
//!   buffers be reused across steps; peak RSS is set by the largest step and
//!   does not grow. One arena for all threads: with one per thread (glibc
//!   makes up to 8 per core) each rayon worker's arena kept its own freed
//!   buffers, and resnet18's peak RSS was 40-45 MiB higher (`edge-trainer
//!   bench --one resnet18`: 498 against 455 MiB); the threads allocate a few
//!   large buffers per op, so they do not contend for it.
//!   `EDGE_TRAINER_MALLOC=system` keeps glibc's defaults.
//!   (mimalloc as the global allocator was measured too: the same speed, but
//!   1.5-2x the peak RSS.)
//! - **Threads.** candle runs element-wise ops on a pool of its own whose
//!   workers spin for a while after each op, while matrix products and our
//!   kernels run on rayon's pool: on a device with few cores the spinning
//!   steals the cores the next product needs. Element-wise ops are
//!   memory-bound, so they run on the calling thread (`CANDLE_NUM_THREADS=1`)
//!   and all compute parallelism goes through rayon. A `CANDLE_NUM_THREADS`
//!   set by the user is kept.

/// The allocator setting [`init`] applied, for reports (`edge-trainer bench`).
pub fn allocator_name() -> &'static str {
    if malloc_tuned() {
        "glibc malloc, mmap/trim thresholds raised, one arena"
    } else {
        "glibc malloc (default settings)"
    }
}

fn malloc_tuned() -> bool {
    cfg!(all(target_os = "linux", target_env = "gnu"))
        && std::env::var("EDGE_TRAINER_MALLOC").map_or(true, |v| v != "system")
}

/// Applies the settings; call first thing in `main`, before any other thread
/// starts and before candle is used.
pub fn init() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if malloc_tuned() {
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        const TRIM_THRESHOLD: libc::c_int = 256 << 20;
        // SAFETY: mallopt only changes allocator parameters and is called
        // before any other thread exists; a refused value leaves the default.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Single-threaded here: no other thread can read the environment yet.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
