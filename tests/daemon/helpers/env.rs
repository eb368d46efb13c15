//! A test folder: a copy of the digits data, an output folder and a config.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::paths::root;

/// A test folder: the digits data, an output folder and a config file.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub out: PathBuf,
    pub config: PathBuf,
    pub device_id: String,
}

fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

impl Env {
    /// A folder with the digits shards (all but those in `hold_back`) and a config:
    /// quick CPU training, the broker on `port`, plus `extra` TOML on top.
    pub fn new(port: u16, extra: &str, hold_back: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let out = dir.path().join("out");
        std::fs::create_dir_all(&data).unwrap();
        for entry in std::fs::read_dir(root().join("examples/digits")).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().to_string();
            if !hold_back.contains(&name.as_str()) {
                std::fs::copy(entry.path(), data.join(&name)).unwrap();
            }
        }
        let device_id = format!("dev-{:08x}", rand::random::<u32>());
        let q = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
        let base = format!(
            r#"
[device]
kind = "cpu"
[mqtt]
host = "127.0.0.1"
port = {port}
device_id = "{device_id}"
topic_prefix = "et"
keep_alive_s = 5
reconnect_max_s = 1.0
[data]
dir = {data}
val_fraction = 0.15
test_fraction = 0.15
[model]
hidden = [64]
[train]
max_epochs = 60
batch_size = 64
eval_every = "epoch"
[train.optimizer]
lr = 0.01
[train.early_stopping]
patience = 3
[retrain]
on_start = false
min_new_samples = 0
file_settle_s = 0.3
rescan_s = 1.0
[output]
dir = {out}
"#,
            data = q(&data),
            out = q(&out),
        );
        let mut table: toml::Table = toml::from_str(&base).unwrap();
        merge(&mut table, toml::from_str(extra).expect("extra TOML"));
        let config = dir.path().join("config.toml");
        std::fs::write(&config, toml::to_string(&table).unwrap()).unwrap();
        Self {
            dir,
            data,
            out,
            config,
            device_id,
        }
    }

    /// `et/{device_id}`.
    pub fn base_topic(&self) -> String {
        format!("et/{}", self.device_id)
    }

    pub fn run_dir(&self, run_id: &str) -> PathBuf {
        self.out.join("runs").join(run_id)
    }

    pub fn metrics_lines(&self, run_id: &str) -> Vec<Value> {
        std::fs::read_to_string(self.run_dir(run_id).join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn summary(&self, run_id: &str) -> Value {
        let p = self.run_dir(run_id).join("summary.json");
        serde_json::from_slice(
            &std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        )
        .unwrap()
    }
}
