//! Settings for the engine tests, loaded as the CLI loads them.

use std::path::Path;

use edge_trainer::config;

/// Writes `toml` to `path` and loads it with `overrides` (`KEY=VALUE`, as
/// `--set` takes them) on top.
pub fn load(path: &Path, toml: &str, overrides: &[&str]) -> config::Settings {
    std::fs::write(path, toml).unwrap();
    let ovs: Vec<config::Override> = overrides
        .iter()
        .map(|o| config::Override::parse_set(o).unwrap())
        .collect();
    config::load(path, &ovs).unwrap()
}
