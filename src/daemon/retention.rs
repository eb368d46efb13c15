//! Retention: what a device that runs for years keeps on its disk.
//!
//! - **Data** (`[data.retention]`): a ledger (`output.dir/retention.json`)
//!   remembers each data file's size, mtime, samples per class and whether a
//!   finished run has trained on it. Before a new run, the files trained on are
//!   cut to the budget by a class-balanced reservoir ([`select`]); the others
//!   (the new files of this run) are always kept. Evicted files are deleted or
//!   moved to `archive_dir`. Nothing is evicted while a run waits to be resumed.
//! - **Runs** (`output.keep_runs`): the newest N run folders stay; the runs
//!   behind `current.safetensors` / `previous.safetensors`, runs with a resume
//!   state and the run in progress are never deleted ([`prune_runs`]).
//! - **Disk guard**: before a run, the free space of `output.dir` against what
//!   the run will write ([`disk_need`]); too little fails the run up front.
//!
//! Everything here is blocking file-system work: it runs on the run's own
//! thread, before and after training, never on the async workers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::config::{RetentionPolicy, Settings};
use crate::engine::budget::optimizer_copies;
use crate::engine::checkpoint;
use crate::engine::data::{self, image_folder, text_tsv, DataFormat, DataSpec, RawLabels, Split};
use crate::engine::fsutil::atomic_write;
use crate::engine::promote::{CURRENT_FILE, PREVIOUS_FILE};
use crate::engine::resume::RESUME_FILE;
use crate::engine::trainer::BEST_FILE;

/// The ledger of data files, in `output.dir`.
pub const LEDGER_FILE: &str = "retention.json";

/// At most this many file names are listed in one `data_evicted` event (the
/// count is always complete).
pub const MAX_LISTED_FILES: usize = 100;

const MIB: u64 = 1 << 20;

/// One data file as the ledger knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub size: u64,
    /// Modification time, ns since the epoch (negative before it).
    pub mtime_ns: i128,
    /// Samples per label, as written in the file (class name or index).
    pub classes: BTreeMap<String, u64>,
    /// A finished run trained on this version of the file.
    pub trained: bool,
}

impl FileEntry {
    /// Samples in the file.
    pub fn samples(&self) -> u64 {
        self.classes.values().sum()
    }

    /// The label most of its samples have (ties: the first by name).
    fn main_class(&self) -> &str {
        let mut best: Option<(&str, u64)> = None;
        for (c, &n) in &self.classes {
            if best.is_none_or(|(_, b)| n > b) {
                best = Some((c, n));
            }
        }
        best.map_or("", |(c, _)| c)
    }
}

/// The data files of `data.dir`, by name relative to it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    pub files: BTreeMap<String, FileEntry>,
}

impl Ledger {
    /// The ledger in `path`; empty when there is none or it is unreadable
    /// (then every file counts as new, so nothing is evicted on its account).
    pub fn load(path: &Path) -> Self {
        let Ok(bytes) = std::fs::read(path) else {
            return Self::default();
        };
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(file = %path.display(), error = %e, "unreadable retention ledger; every data file counts as new");
            Self::default()
        })
    }

    /// Writes the ledger atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        atomic_write(path, &bytes)
    }

    /// Brings the ledger in line with the data folder: vanished files are
    /// dropped, new or changed ones counted (and not trained). Files that
    /// cannot be read are left out (the run skips them with a reason).
    pub fn refresh(&mut self, spec: &DataSpec) {
        let listed = data::list_files(spec).unwrap_or_default();
        let mut files = BTreeMap::new();
        for path in listed {
            let name = data::relative_name(&spec.dir, &path);
            let (size, mtime_ns) = stat(&path);
            match self.files.remove(&name) {
                Some(e) if e.size == size && e.mtime_ns == mtime_ns => {
                    files.insert(name, e);
                }
                _ => match count_labels(&path, &name, spec) {
                    Ok(classes) => {
                        files.insert(
                            name,
                            FileEntry {
                                size,
                                mtime_ns,
                                classes,
                                trained: false,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::debug!(file = %name, error = %e, "not counted for retention")
                    }
                },
            }
        }
        self.files = files;
    }
}

fn stat(path: &Path) -> (u64, i128) {
    let Ok(m) = std::fs::metadata(path) else {
        return (0, 0);
    };
    let ns = m
        .modified()
        .map_or(0, |t| match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        });
    (m.len(), ns)
}

/// Samples per label of one data file.
pub fn count_labels(
    path: &Path,
    name: &str,
    spec: &DataSpec,
) -> Result<BTreeMap<String, u64>, data::FileError> {
    let labels = match spec.format {
        DataFormat::ImageFolder => return Ok(BTreeMap::from([(image_folder::class_of(name)?, 1)])),
        DataFormat::TextTsv => text_tsv::read(path)?.labels,
        DataFormat::Safetensors | DataFormat::Csv => data::read_file(path, spec)?.labels,
    };
    let mut out = BTreeMap::new();
    match labels {
        RawLabels::Index(v) => v
            .iter()
            .for_each(|l| *out.entry(l.to_string()).or_default() += 1),
        RawLabels::Name(v) => v.into_iter().for_each(|l| *out.entry(l).or_default() += 1),
    }
    Ok(out)
}

/// The replay budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub max_samples: Option<u64>,
    pub max_bytes: Option<u64>,
    pub seed: u64,
}

/// The files to keep out of `candidates` (files already trained on), within
/// `budget`: a class-balanced reservoir. Each file gets a priority that is a
/// pure function of (seed, name), and each class keeps its files of lowest
/// priority (a bottom-k sample: the same distribution as reservoir sampling
/// over the stream of files, and stable as files arrive). Classes are filled
/// in turns, the one with the fewest kept samples first, so rare classes keep
/// all they have and common ones share the rest; a file that does not fit
/// the budget is passed over. A file counts for its main label.
pub fn select(candidates: &BTreeMap<&str, &FileEntry>, budget: Budget) -> BTreeSet<String> {
    let mut queues: BTreeMap<&str, Vec<(u64, &str)>> = BTreeMap::new();
    for (&name, e) in candidates {
        queues
            .entry(e.main_class())
            .or_default()
            .push((xxh3_64_with_seed(name.as_bytes(), budget.seed), name));
    }
    for q in queues.values_mut() {
        // Lowest priority last, to pop.
        q.sort_unstable_by(|a, b| b.cmp(a));
    }
    let mut kept_per_class: BTreeMap<&str, u64> = queues.keys().map(|&c| (c, 0)).collect();
    let (mut samples, mut bytes) = (0u64, 0u64);
    let mut keep = BTreeSet::new();
    while let Some(class) = kept_per_class
        .iter()
        .filter(|(c, _)| queues.get(*c).is_some_and(|q| !q.is_empty()))
        .min_by_key(|(c, n)| (**n, **c))
        .map(|(c, _)| *c)
    {
        let Some((_, name)) = queues.get_mut(class).and_then(Vec::pop) else {
            break;
        };
        let Some(e) = candidates.get(name) else {
            continue;
        };
        let fits = budget
            .max_samples
            .is_none_or(|m| samples + e.samples() <= m)
            && budget.max_bytes.is_none_or(|m| bytes + e.size <= m);
        if !fits {
            continue;
        }
        samples += e.samples();
        bytes += e.size;
        *kept_per_class.entry(class).or_default() += e.samples();
        keep.insert(name.to_string());
    }
    keep
}

/// New and replayed data of a run (`replay` in `run_started`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReplayCounts {
    /// Files no finished run has trained on.
    pub new_files: u64,
    pub new_samples: u64,
    /// Files kept from earlier runs.
    pub replayed_files: u64,
    pub replayed_samples: u64,
}

/// What an eviction removed (the body of `data_evicted`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Eviction {
    /// The first [`MAX_LISTED_FILES`] evicted files.
    pub files: Vec<String>,
    /// How many files were evicted in all.
    pub evicted_files: u64,
    pub samples: u64,
    /// Evicted samples per label.
    pub per_class: BTreeMap<String, u64>,
    pub bytes: u64,
    /// `deleted`, or `archived` (moved to `archive_dir`).
    pub action: &'static str,
    pub archive_dir: Option<PathBuf>,
    pub reason: String,
    /// What stays for replay.
    pub kept_files: u64,
    pub kept_samples: u64,
    /// Files that could not be removed (they stay, and count as kept).
    pub errors: Vec<String>,
}

/// The files of a run: which to mark trained once it finishes.
#[derive(Debug, Clone, Default)]
pub struct RunData {
    pub files: Vec<String>,
    pub replay: ReplayCounts,
}

/// Whether a run folder's resume state is waiting to be continued, anywhere
/// under `runs_dir` (then nothing is evicted).
fn resume_pending(runs_dir: &Path) -> bool {
    std::fs::read_dir(runs_dir)
        .is_ok_and(|rd| rd.flatten().any(|e| e.path().join(RESUME_FILE).is_file()))
}

/// Refreshes the ledger, evicts what is over the budget (when the policy asks
/// for it and no run waits to be resumed), and says what the next run will
/// train on. Called before a new run, with no run in progress.
pub fn prepare_data(settings: &Settings) -> (RunData, Option<Eviction>) {
    let spec = settings.data_spec();
    let ledger_path = settings.output.dir.join(LEDGER_FILE);
    let mut ledger = Ledger::load(&ledger_path);
    ledger.refresh(&spec);
    let r = &settings.data.retention;
    let mut eviction = None;
    if r.policy == RetentionPolicy::ClassBalanced {
        if resume_pending(&settings.runs_dir()) {
            tracing::info!("a run waits to be resumed: no data is evicted now");
        } else {
            let budget = Budget {
                max_samples: r.max_samples,
                max_bytes: r.max_mb.map(|m| m.saturating_mul(MIB)),
                seed: r.seed,
            };
            let ev = evict_over_budget(&mut ledger, &spec, budget, r.archive_dir.as_deref());
            eviction = (ev.evicted_files > 0 || !ev.errors.is_empty()).then_some(ev);
        }
    }
    if let Err(e) = ledger.save(&ledger_path) {
        tracing::warn!(file = %ledger_path.display(), error = %e, "cannot save the retention ledger");
    }
    let mut run = RunData::default();
    for (name, e) in &ledger.files {
        run.files.push(name.clone());
        if e.trained {
            run.replay.replayed_files += 1;
            run.replay.replayed_samples += e.samples();
        } else {
            run.replay.new_files += 1;
            run.replay.new_samples += e.samples();
        }
    }
    (run, eviction)
}

/// Files named for the validation or test split: the user's yardstick, never evicted.
fn held_out(name: &str, format: DataFormat) -> bool {
    matches!(
        data::fixed_split(name, format),
        Some(Split::Val | Split::Test)
    )
}

fn evict_over_budget(
    ledger: &mut Ledger,
    spec: &DataSpec,
    budget: Budget,
    archive: Option<&Path>,
) -> Eviction {
    let candidates: BTreeMap<&str, &FileEntry> = ledger
        .files
        .iter()
        .filter(|(n, e)| e.trained && !held_out(n, spec.format))
        .map(|(n, e)| (n.as_str(), e))
        .collect();
    let keep = select(&candidates, budget);
    let out: Vec<String> = candidates
        .keys()
        .filter(|n| !keep.contains(**n))
        .map(|n| n.to_string())
        .collect();
    let mut ev = Eviction {
        action: if archive.is_some() {
            "archived"
        } else {
            "deleted"
        },
        archive_dir: archive.map(Path::to_path_buf),
        reason: describe(budget),
        ..Eviction::default()
    };
    for name in out {
        let path = spec.dir.join(&name);
        match remove(&path, &name, archive) {
            Ok(()) => {
                if let Some(e) = ledger.files.remove(&name) {
                    ev.samples += e.samples();
                    ev.bytes += e.size;
                    for (c, n) in &e.classes {
                        *ev.per_class.entry(c.clone()).or_default() += n;
                    }
                }
                if ev.files.len() < MAX_LISTED_FILES {
                    ev.files.push(name);
                }
                ev.evicted_files += 1;
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot evict a data file; it stays");
                ev.errors.push(format!("{name}: {e}"));
            }
        }
    }
    for (n, e) in &ledger.files {
        if e.trained && !held_out(n, spec.format) {
            ev.kept_files += 1;
            ev.kept_samples += e.samples();
        }
    }
    if ev.evicted_files > 0 {
        tracing::info!(
            files = ev.evicted_files,
            samples = ev.samples,
            action = ev.action,
            "data evicted: {}",
            ev.reason
        );
    }
    ev
}

fn describe(b: Budget) -> String {
    let mut parts = Vec::new();
    if let Some(s) = b.max_samples {
        parts.push(format!("data.retention.max_samples = {s}"));
    }
    if let Some(m) = b.max_bytes {
        parts.push(format!("data.retention.max_mb = {}", m / MIB));
    }
    format!(
        "over the replay budget ({}): class-balanced reservoir, seed {}",
        parts.join(", "),
        b.seed
    )
}

/// Deletes `path`, or moves it to `archive/name` (a free name: `.1`, `.2`…).
fn remove(path: &Path, name: &str, archive: Option<&Path>) -> std::io::Result<()> {
    let Some(archive) = archive else {
        return std::fs::remove_file(path);
    };
    let mut target = archive.join(name);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut n = 1;
    while target.exists() {
        target = archive.join(format!("{name}.{n}"));
        n += 1;
    }
    match std::fs::rename(path, &target) {
        Ok(()) => Ok(()),
        // Another file system: copy, then remove.
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(path, &target)?;
            std::fs::remove_file(path)
        }
        Err(e) => Err(e),
    }
}

/// Marks the files a finished run trained on (as they were when it started).
pub fn mark_trained(settings: &Settings, files: &[String]) {
    let path = settings.output.dir.join(LEDGER_FILE);
    let mut ledger = Ledger::load(&path);
    for f in files {
        if let Some(e) = ledger.files.get_mut(f) {
            e.trained = true;
        }
    }
    if let Err(e) = ledger.save(&path) {
        tracing::warn!(file = %path.display(), error = %e, "cannot save the retention ledger");
    }
}

/// What pruning removed (the body of `runs_pruned`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Pruned {
    pub runs: Vec<String>,
    pub bytes: u64,
    /// Run folders left.
    pub kept: u64,
    pub keep_runs: u64,
    /// Folders that could not be removed.
    pub errors: Vec<String>,
}

/// Removes the oldest run folders under `runs_dir` so that `keep` remain,
/// never one behind the models in `output_dir`, one with a resume state, or
/// `active`. Run ids start with their UTC time, so names sort by age.
pub fn prune_runs(output_dir: &Path, runs_dir: &Path, keep: u64, active: Option<&str>) -> Pruned {
    let mut pruned = Pruned {
        keep_runs: keep,
        ..Pruned::default()
    };
    let Ok(rd) = std::fs::read_dir(runs_dir) else {
        return pruned;
    };
    let mut runs: Vec<String> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    runs.sort();
    if keep == 0 || runs.len() as u64 <= keep {
        pruned.kept = runs.len() as u64;
        return pruned;
    }
    let protected: BTreeSet<String> = [CURRENT_FILE, PREVIOUS_FILE]
        .iter()
        .filter_map(|f| checkpoint::read_run_id(&output_dir.join(f)))
        .chain(active.map(str::to_string))
        .collect();
    let cut = runs.len() - usize::try_from(keep).unwrap_or(usize::MAX).min(runs.len());
    for (i, run) in runs.iter().enumerate() {
        let dir = runs_dir.join(run);
        if i >= cut || protected.contains(run) || dir.join(RESUME_FILE).exists() {
            pruned.kept += 1;
            continue;
        }
        let bytes = dir_bytes(&dir);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                pruned.bytes += bytes;
                pruned.runs.push(run.clone());
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot prune a run folder");
                pruned.errors.push(format!("{run}: {e}"));
                pruned.kept += 1;
            }
        }
    }
    if !pruned.runs.is_empty() {
        tracing::info!(runs = pruned.runs.len(), keep, "old run folders pruned");
    }
    pruned
}

/// Bytes of the files under `path` (links not followed).
pub fn dir_bytes(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                total += e.metadata().map_or(0, |m| m.len());
            }
        }
    }
    total
}

/// Bytes an unprivileged writer may still use on the file system of `path`.
// The statvfs field widths differ between targets.
#[allow(clippy::useless_conversion)]
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs only writes into `st`, which is plain old data; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

/// Disk usage for `status` (`storage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Footprint {
    /// Free space on the file system of `output.dir`, MiB.
    pub free_mb: f64,
    /// Data files in `data.dir` (rejected ones included), MiB.
    pub data_mb: f64,
    /// Run folders under `output.dir/runs`, MiB.
    pub runs_mb: f64,
    pub runs: u64,
    /// The frozen-feature cache, `output.dir/feature-cache`, MiB.
    pub feature_cache_mb: f64,
}

/// The footprint of the data and run folders now.
pub fn footprint(settings: &Settings) -> Footprint {
    let mb = |b: u64| (b as f64 / MIB as f64 * 100.0).round() / 100.0;
    let runs_dir = settings.runs_dir();
    Footprint {
        free_mb: free_bytes(&settings.output.dir).map_or(f64::NAN, mb),
        data_mb: mb(dir_bytes(&settings.data.dir)),
        runs_mb: mb(dir_bytes(&runs_dir)),
        feature_cache_mb: mb(dir_bytes(&settings.feature_cache_dir())),
        runs: std::fs::read_dir(&runs_dir).map_or(0, |rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .count() as u64
        }),
    }
}

/// Bytes a run of these settings is expected to write: its checkpoint
/// (written beside the old one, atomically), its resume state (weights,
/// optimiser state and best weights, also atomically) and a promotion
/// (`current` and `previous`), each a model's size; metrics and summary;
/// and, where the frozen-feature cache may be used (something is frozen,
/// `train.cache_features = "auto"`), what `train.cache_features_mb` leaves
/// room for beside the cache files already there.
pub fn disk_need(settings: &Settings) -> u64 {
    run_files_need(settings).saturating_add(feature_cache_need(settings))
}

/// The room the frozen-feature cache may still take up.
fn feature_cache_need(settings: &Settings) -> u64 {
    let frozen = settings.model.finetune != crate::engine::model::FineTune::Full
        || !settings.model.freeze.is_empty();
    if !frozen || settings.train.cache_features == crate::engine::run::CacheFeatures::Off {
        return 0;
    }
    let limit = settings.train.cache_features_mb.saturating_mul(MIB);
    limit.saturating_sub(dir_bytes(&settings.feature_cache_dir()))
}

fn run_files_need(settings: &Settings) -> u64 {
    let out = &settings.output.dir;
    // The size of a model: the one in service or the newest run's, else the
    // configuration's sketch (which knows the shapes only in part).
    let newest_best = std::fs::read_dir(settings.runs_dir())
        .ok()
        .and_then(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .max()
        })
        .map(|r| settings.runs_dir().join(r).join(BEST_FILE));
    let file_len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let sketch = settings.sketch_model().map_or(0, |s| {
        let fp = s.footprint();
        fp.params.saturating_add(fp.buffers).saturating_mul(4)
    });
    let model = [
        file_len(&out.join(CURRENT_FILE)),
        newest_best.as_deref().map_or(0, file_len),
        sketch,
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    let copies = 2 + 2 * (2 + optimizer_copies(&settings.optimizer_config())) + 2;
    let metrics = settings.train.max_epochs.min(100_000).saturating_mul(1024) + MIB;
    model.saturating_mul(copies).saturating_add(metrics)
}

/// The disk guard: `Err(reason)` when the file system of `output.dir` has
/// less free space than the run will write plus `output.min_free_mb`.
pub fn check_disk(settings: &Settings) -> Result<(), String> {
    if !settings.output.disk_guard {
        return Ok(());
    }
    let Some(free) = free_bytes(&settings.output.dir) else {
        tracing::warn!(dir = %settings.output.dir.display(), "cannot read the free space; the disk guard is skipped");
        return Ok(());
    };
    let need = disk_need(settings);
    let margin = settings.output.min_free_mb.saturating_mul(MIB);
    if free >= need.saturating_add(margin) {
        return Ok(());
    }
    let mb = |b: u64| b as f64 / MIB as f64;
    Err(format!(
        "not enough free disk space for a run in {}: {:.1} MiB free, the run writes up to {:.1} MiB (checkpoints, resume state, promotion, metrics) and output.min_free_mb = {} must stay free; free some space, lower output.keep_runs or the data.retention budget",
        settings.output.dir.display(),
        mb(free),
        mb(need),
        settings.output.min_free_mb
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(classes: &[(&str, u64)], size: u64, trained: bool) -> FileEntry {
        FileEntry {
            size,
            mtime_ns: 0,
            classes: classes.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
            trained,
        }
    }

    fn budget(samples: Option<u64>, bytes: Option<u64>) -> Budget {
        Budget {
            max_samples: samples,
            max_bytes: bytes,
            seed: 7,
        }
    }

    #[test]
    fn rare_classes_keep_everything_and_common_ones_share_the_rest() {
        // Class a: 50 files of 10 samples; class b: 2 files of 10.
        let mut files = BTreeMap::new();
        for i in 0..50 {
            files.insert(format!("a-{i:02}.csv"), entry(&[("a", 10)], 100, true));
        }
        for i in 0..2 {
            files.insert(format!("b-{i}.csv"), entry(&[("b", 10)], 100, true));
        }
        let cands: BTreeMap<&str, &FileEntry> =
            files.iter().map(|(n, e)| (n.as_str(), e)).collect();
        let keep = select(&cands, budget(Some(100), None));
        assert_eq!(keep.len(), 10);
        assert!(keep.contains("b-0.csv") && keep.contains("b-1.csv"));
        assert_eq!(keep.iter().filter(|n| n.starts_with("a-")).count(), 8);
        // Deterministic, and stable: a larger budget keeps a superset.
        assert_eq!(select(&cands, budget(Some(100), None)), keep);
        let more = select(&cands, budget(Some(200), None));
        assert!(keep.is_subset(&more), "{keep:?} {more:?}");
        // Another seed picks other files of the common class.
        let other = select(
            &cands,
            Budget {
                seed: 8,
                ..budget(Some(100), None)
            },
        );
        assert_ne!(other, keep);
        // Bytes bound too; a file that does not fit is passed over.
        let keep = select(&cands, budget(None, Some(450)));
        assert_eq!(keep.len(), 4);
        let keep = select(&cands, budget(Some(15), None));
        assert_eq!(keep.len(), 1);
    }

    #[test]
    fn balanced_across_many_classes() {
        let mut files = BTreeMap::new();
        for c in 0..10 {
            for i in 0..30 {
                files.insert(
                    format!("{c}/{i}.png"),
                    entry(&[(&c.to_string(), 1)], 10, true),
                );
            }
        }
        let cands: BTreeMap<&str, &FileEntry> =
            files.iter().map(|(n, e)| (n.as_str(), e)).collect();
        let keep = select(&cands, budget(Some(60), None));
        assert_eq!(keep.len(), 60);
        for c in 0..10 {
            let n = keep
                .iter()
                .filter(|n| n.starts_with(&format!("{c}/")))
                .count();
            assert_eq!(n, 6, "class {c}");
        }
    }

    #[test]
    fn eviction_keeps_new_and_held_out_files_and_archives() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let archive = tmp.path().join("archive");
        std::fs::create_dir_all(&data).unwrap();
        let mut s = Settings::default();
        s.data.dir = data.clone();
        s.data.format = DataFormat::Csv;
        s.output.dir = tmp.path().join("out");
        std::fs::create_dir_all(&s.output.dir).unwrap();
        for i in 0..6 {
            let label = i % 2;
            std::fs::write(
                data.join(format!("f{i}.csv")),
                format!("x,label\n1,{label}\n2,{label}\n"),
            )
            .unwrap();
        }
        std::fs::write(data.join("test.csv"), "x,label\n1,0\n2,1\n").unwrap();
        // First look: everything is new, nothing goes even with a budget.
        s.data.retention.policy = RetentionPolicy::ClassBalanced;
        s.data.retention.max_samples = Some(4);
        s.data.retention.archive_dir = Some(archive.clone());
        let (run, ev) = prepare_data(&s);
        assert!(ev.is_none());
        assert_eq!(run.replay.new_files, 7);
        assert_eq!(run.replay.new_samples, 14);
        mark_trained(&s, &run.files);
        // A new file arrives; the trained ones are cut to 4 samples, 2 per class.
        std::fs::write(data.join("g.csv"), "x,label\n1,1\n").unwrap();
        let (run, ev) = prepare_data(&s);
        let ev = ev.unwrap();
        assert_eq!(ev.evicted_files, 4);
        assert_eq!(ev.samples, 8);
        assert_eq!(ev.per_class.get("0"), Some(&4));
        assert_eq!(ev.per_class.get("1"), Some(&4));
        assert_eq!((ev.kept_files, ev.kept_samples), (2, 4));
        assert_eq!(ev.action, "archived");
        for f in &ev.files {
            assert!(!data.join(f).exists() && archive.join(f).exists(), "{f}");
        }
        assert!(data.join("g.csv").exists() && data.join("test.csv").exists());
        assert_eq!(run.replay.new_files, 1);
        assert_eq!(run.replay.new_samples, 1);
        // test.csv is trained and held out: replayed, not evicted.
        assert_eq!(run.replay.replayed_files, 3);
        assert_eq!(run.replay.replayed_samples, 6);
        // A pending resume state holds evictions back.
        mark_trained(&s, &run.files);
        let runs = s.runs_dir().join("r1");
        std::fs::create_dir_all(&runs).unwrap();
        std::fs::write(runs.join(RESUME_FILE), b"x").unwrap();
        s.data.retention.max_samples = Some(1);
        assert!(prepare_data(&s).1.is_none());
        std::fs::remove_file(runs.join(RESUME_FILE)).unwrap();
        let ev = prepare_data(&s).1.unwrap();
        assert_eq!(ev.kept_samples, 1);
    }

    #[test]
    fn the_split_of_the_samples_that_remain_does_not_change() {
        let spec = DataSpec::new("/d", DataFormat::Csv);
        let files: Vec<String> = (0..6).map(|i| format!("f{i}.csv")).collect();
        let origins: Vec<(u32, u32)> = (0..6u32)
            .flat_map(|f| (0..20u32).map(move |p| (f, p)))
            .collect();
        let before = data::split_indices(&origins, &files, &spec);
        let which = |s: &data::SplitIndices, i: usize| {
            if s.train.contains(&i) {
                0
            } else if s.val.contains(&i) {
                1
            } else {
                2
            }
        };
        // Files 1 and 4 evicted: the others keep their names and positions.
        let kept: Vec<usize> = vec![0, 2, 3, 5];
        let files2: Vec<String> = kept.iter().map(|&f| files[f].clone()).collect();
        let origins2: Vec<(u32, u32)> = (0..4u32)
            .flat_map(|f| (0..20u32).map(move |p| (f, p)))
            .collect();
        let after = data::split_indices(&origins2, &files2, &spec);
        for (j, (f, p)) in origins2.iter().enumerate() {
            let old = kept[*f as usize] * 20 + *p as usize;
            assert_eq!(which(&after, j), which(&before, old), "{f} {p}");
        }
    }

    #[test]
    fn pruning_keeps_the_newest_and_the_protected() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path();
        let runs = out.join("runs");
        for i in 0..6 {
            let d = runs.join(format!("2026010{i}T000000Z-0000"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("metrics.jsonl"), b"0123456789").unwrap();
        }
        // Run 0 is behind current.safetensors, run 1 has a resume state.
        let t = candle_core::Tensor::new(&[1f32], &candle_core::Device::Cpu).unwrap();
        let meta = std::collections::HashMap::from([(
            "run_id".to_string(),
            "20260100T000000Z-0000".to_string(),
        )]);
        let bytes =
            crate::engine::checkpoint::to_safetensors_bytes(&[("w".to_string(), t)], Some(meta))
                .unwrap();
        std::fs::write(out.join(CURRENT_FILE), bytes).unwrap();
        assert_eq!(
            checkpoint::read_run_id(&out.join(CURRENT_FILE)).as_deref(),
            Some("20260100T000000Z-0000")
        );
        std::fs::write(runs.join("20260101T000000Z-0000").join(RESUME_FILE), b"x").unwrap();
        let p = prune_runs(out, &runs, 2, Some("20260102T000000Z-0000"));
        assert_eq!(p.runs, vec!["20260103T000000Z-0000".to_string()]);
        assert_eq!(p.bytes, 10);
        assert_eq!(p.kept, 5);
        assert!(prune_runs(out, &runs, 0, None).runs.is_empty());
    }

    #[test]
    fn the_disk_guard_names_the_numbers() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = Settings::default();
        s.output.dir = tmp.path().to_path_buf();
        assert!(check_disk(&s).is_ok());
        assert!(free_bytes(tmp.path()).is_some_and(|b| b > 0));
        s.output.min_free_mb = u64::MAX / MIB;
        let e = check_disk(&s).unwrap_err();
        assert!(
            e.contains("MiB free") && e.contains("output.min_free_mb"),
            "{e}"
        );
        assert!(disk_need(&s) > MIB);
        s.output.disk_guard = false;
        assert!(check_disk(&s).is_ok());
    }

    /// With something frozen and the cache on, the guard leaves room for
    /// what `train.cache_features_mb` allows beside the files already there.
    #[test]
    fn the_disk_guard_counts_the_feature_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = Settings::default();
        s.output.dir = tmp.path().to_path_buf();
        s.train.cache_features_mb = 10;
        let full = disk_need(&s);
        s.model.finetune = crate::engine::model::FineTune::Head;
        assert_eq!(disk_need(&s), full + 10 * MIB);
        std::fs::create_dir_all(s.feature_cache_dir()).unwrap();
        std::fs::write(s.feature_cache_dir().join("a.feat"), vec![0u8; 1 << 20]).unwrap();
        assert_eq!(disk_need(&s), full + 9 * MIB);
        assert_eq!(footprint(&s).feature_cache_mb, 1.0);
        s.train.cache_features = crate::engine::run::CacheFeatures::Off;
        assert_eq!(disk_need(&s), full);
    }
}
