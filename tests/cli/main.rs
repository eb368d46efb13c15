//! The command line's tests, one binary (harness: libtest-mimic, so that a test
//! whose outside requirement is missing, `unshare` for the full-disk test, is
//! counted as ignored, never as passed): `train`, `eval`, `check-config`, every
//! data format end to end, resuming, a full disk and `bench --smoke`.

use std::process::ExitCode;

mod helpers;
#[path = "../support/paths.rs"]
mod paths;
#[path = "../support/trials.rs"]
mod trials;

mod backbones_e2e;
mod bench_smoke;
mod cli_train;
mod feature_cache_e2e;
mod formats_e2e;
mod full_disk;
mod onnx_export;
mod resume;

fn main() -> ExitCode {
    trials::run([
        backbones_e2e::tests(),
        bench_smoke::tests(),
        cli_train::tests(),
        feature_cache_e2e::tests(),
        formats_e2e::tests(),
        full_disk::tests(),
        onnx_export::tests(),
        resume::tests(),
    ])
}
