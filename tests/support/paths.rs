//! Where things are, shared by the test binaries (`#[path]`-included by each).

use std::path::PathBuf;

/// The `edge-trainer` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_edge-trainer");

/// The repository root (examples, configs, fixtures).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
