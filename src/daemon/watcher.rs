//! The data-folder watcher. Collectors drop files into `data.dir`; a file is
//! taken once complete: renamed into place (taken at once), or with size and
//! mtime unchanged for `retrain.file_settle_s`. File-system events (notify) make
//! it look soon; a periodic rescan catches whatever events missed. Each new file
//! is validated on its own and against the model: good ones are announced with
//! `data_accepted` and counted towards `retrain.min_new_samples`, bad ones are
//! moved to `data.dir/rejected/` with a `.reason` file and announced with
//! `data_rejected`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use notify::event::{EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::messages::Event;
use super::publisher::Publisher;
use crate::engine::data::{self, DataFormat, DataSpec};
use crate::engine::fsutil::atomic_write;

/// Folder under `data.dir` where rejected files go.
pub const REJECTED_DIR: &str = "rejected";

/// How often pending files are looked at while some are settling.
const SETTLE_POLL: Duration = Duration::from_millis(200);

/// What new files must match: the sample shape and classes of the model in
/// service (or, before there is one, of the data already there).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reference {
    pub sample_shape: Option<Vec<usize>>,
    pub classes: Option<Vec<String>>,
}

impl Reference {
    /// From the model in `current` if it loads, else from the data folder: the
    /// class list (`data.classes`, the class file) or, without one, the classes
    /// a run would infer from the data already there, so that a stray label
    /// (`cat` among digits) is refused before the first promotion.
    pub fn discover(spec: &DataSpec, current: &Path, files: &[PathBuf]) -> Self {
        if current.exists() {
            match crate::engine::checkpoint::load(current, &candle_core::Device::Cpu) {
                Ok(ck) => {
                    return Self {
                        sample_shape: Some(ck.meta.input.sample_shape),
                        classes: Some(ck.meta.classes),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the current model is unreadable; new data is checked against the data folder")
                }
            }
        }
        let classes = spec
            .classes
            .clone()
            .or_else(|| data::read_class_file(&spec.dir).ok().flatten())
            .or_else(|| data::infer_classes_of(spec, files));
        let sample_shape = files
            .iter()
            .find_map(|f| data::scan_file(f, spec, None, None).ok())
            .map(|s| s.sample_shape);
        Self {
            sample_shape,
            classes,
        }
    }
}

/// When the newest run under `runs_dir` started: the `started` time in its
/// `summary.json`, else the second in its run id (`20261126T073300Z-3fa2`)
/// rounded up. `None` before the first run.
pub fn last_run_start(runs_dir: &Path) -> Option<SystemTime> {
    let (stamp, name) = std::fs::read_dir(runs_dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter_map(|name| {
            let stamp =
                chrono::NaiveDateTime::parse_from_str(name.split('-').next()?, "%Y%m%dT%H%M%SZ")
                    .ok()?;
            Some((stamp, name))
        })
        .max()?;
    let from_summary = std::fs::read(runs_dir.join(&name).join("summary.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v["started"]
                .as_str()
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        })
        .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
        .map(Duration::from_millis);
    let from_id = || {
        u64::try_from(stamp.and_utc().timestamp())
            .ok()
            .map(|s| Duration::from_secs(s + 1))
    };
    Some(SystemTime::UNIX_EPOCH + from_summary.or_else(from_id)?)
}

/// Splits the data folder's files into those already there at the last run
/// (not new) and those that arrived since (new: validated and counted). Before
/// the first run every file counts as already there.
pub fn split_existing(
    files: Vec<PathBuf>,
    last_run: Option<SystemTime>,
) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let Some(cutoff) = last_run else {
        return (files, Vec::new());
    };
    files.into_iter().partition(|f| {
        std::fs::metadata(f)
            .and_then(|m| m.modified())
            .map(|t| t <= cutoff)
            .unwrap_or(true)
    })
}

/// File under `output.dir` listing the data files the watcher has seen (name,
/// size, mtime), so that files arriving while the daemon is down are found by
/// comparing listings, whatever the clock did meanwhile.
pub const SEEN_FILE: &str = "seen-data.json";

/// One data file as last seen: relative name, size, mtime in ns since the epoch.
type SeenEntry = (String, u64, i128);

fn seen_entry(dir: &Path, path: &Path) -> SeenEntry {
    let (size, mtime) = stat(path);
    let ns = mtime.map_or(0, |t| match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    });
    (data::relative_name(dir, path), size, ns)
}

/// The seen-files list in `path`, if one was written (and reads back).
pub fn load_seen(path: &Path) -> Option<HashSet<SeenEntry>> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice::<Vec<SeenEntry>>(&bytes) {
        Ok(v) => Some(v.into_iter().collect()),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "unreadable list of seen data files; using file times");
            None
        }
    }
}

/// Writes the seen-files list for `files` (atomically).
pub fn save_seen(path: &Path, dir: &Path, files: impl Iterator<Item = impl AsRef<Path>>) {
    let mut v: Vec<SeenEntry> = files.map(|f| seen_entry(dir, f.as_ref())).collect();
    v.sort();
    let written = serde_json::to_vec(&v)
        .map_err(std::io::Error::other)
        .and_then(|b| atomic_write(path, &b));
    if let Err(e) = written {
        tracing::warn!(file = %path.display(), error = %e, "cannot save the list of seen data files");
    }
}

/// [`split_existing`], but by the list of files seen before (`seen`) when there
/// is one: a file not in it, or changed since (size, mtime), is new. Listings do
/// not depend on the clock, so a clock stepped back hides nothing.
pub fn split_seen(
    dir: &Path,
    files: Vec<PathBuf>,
    seen: Option<&HashSet<SeenEntry>>,
    last_run: Option<SystemTime>,
) -> (Vec<PathBuf>, Vec<PathBuf>) {
    match seen {
        Some(seen) => files
            .into_iter()
            .partition(|f| seen.contains(&seen_entry(dir, f))),
        None => split_existing(files, last_run),
    }
}

/// Checks one new file; returns its number of samples, or why it is rejected.
pub fn validate_file(
    path: &Path,
    spec: &DataSpec,
    reference: &Reference,
) -> Result<usize, data::FileError> {
    // Checked as it is parsed, without keeping the samples (bounded memory).
    data::scan_file(
        path,
        spec,
        reference.sample_shape.as_deref(),
        reference.classes.as_deref(),
    )
    .map(|c| c.samples)
}

/// Moves a rejected file to `data.dir/rejected/` (keeping its path below
/// `data.dir`, adding `.1`, `.2`… if the name is taken) and writes the reason
/// beside it as `NAME.reason`. Returns the new path.
pub fn quarantine(path: &Path, data_dir: &Path, reason: &str) -> std::io::Result<PathBuf> {
    let rel = path.strip_prefix(data_dir).unwrap_or(path);
    let rel = if rel.is_absolute() {
        PathBuf::from(path.file_name().unwrap_or_default())
    } else {
        rel.to_path_buf()
    };
    let mut target = data_dir.join(REJECTED_DIR).join(&rel);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut n = 1;
    while target.exists() {
        let mut name = rel.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{n}"));
        target.set_file_name(name);
        n += 1;
    }
    std::fs::rename(path, &target)?;
    let mut reason_path = target.clone().into_os_string();
    reason_path.push(".reason");
    let text = format!(
        "{reason}\nrejected at {}\n",
        crate::engine::run::now_rfc3339()
    );
    atomic_write(Path::new(&reason_path), text.as_bytes())?;
    Ok(target)
}

struct Candidate {
    size: u64,
    mtime: Option<SystemTime>,
    since: Instant,
}

/// Identifies one version of the current model file (a promotion replaces it).
type ModelStamp = Option<(u64, u64, Option<SystemTime>)>;

fn model_stamp(path: &Path) -> ModelStamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()))
}

/// The watcher's state; [`Watcher::run`] is its task.
pub struct Watcher {
    /// The model in service and the version the reference was taken from:
    /// after a promotion, new files are checked against the new model.
    current: Option<(PathBuf, ModelStamp)>,
    /// Where the list of seen files is kept, if anywhere.
    seen_file: Option<PathBuf>,
    spec: DataSpec,
    settle: Duration,
    rescan: Duration,
    reference: Reference,
    known: HashSet<PathBuf>,
    pending: HashMap<PathBuf, Candidate>,
    renamed: HashSet<PathBuf>,
    publisher: Publisher,
    new_samples: mpsc::UnboundedSender<u64>,
}

impl Watcher {
    /// A watcher for which the files in `existing` are not new.
    pub fn new(
        spec: DataSpec,
        settle: Duration,
        rescan: Duration,
        reference: Reference,
        existing: Vec<PathBuf>,
        publisher: Publisher,
        new_samples: mpsc::UnboundedSender<u64>,
    ) -> Self {
        Self {
            current: None,
            seen_file: None,
            spec,
            settle,
            rescan,
            reference,
            known: existing.into_iter().collect(),
            pending: HashMap::new(),
            renamed: HashSet::new(),
            publisher,
            new_samples,
        }
    }

    /// Refreshes the reference from `current` (the model file) whenever a
    /// promotion replaced it.
    pub fn with_current_model(mut self, current: PathBuf) -> Self {
        let stamp = model_stamp(&current);
        self.current = Some((current, stamp));
        self
    }

    /// Keeps the list of seen data files in `path` ([`SEEN_FILE`]).
    pub fn with_seen_file(mut self, path: PathBuf) -> Self {
        self.seen_file = Some(path);
        self
    }

    async fn save_seen(&self) {
        let Some(path) = self.seen_file.clone() else {
            return;
        };
        let dir = self.spec.dir.clone();
        let files: Vec<PathBuf> = self.known.iter().cloned().collect();
        let _ = tokio::task::spawn_blocking(move || save_seen(&path, &dir, files.iter())).await;
    }

    /// A new model was promoted since the reference was taken: take it again.
    async fn refresh_reference(&mut self) {
        let Some((path, stamp)) = &self.current else {
            return;
        };
        let now = model_stamp(path);
        if now.is_none() || now == *stamp {
            return;
        }
        let p = path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            crate::engine::checkpoint::load(&p, &candle_core::Device::Cpu)
                .map(|ck| (ck.meta.input.sample_shape, ck.meta.classes))
        })
        .await;
        match loaded {
            Ok(Ok((shape, classes))) => {
                tracing::info!(classes = classes.len(), shape = ?shape, "new model in service: new data is checked against it");
                self.reference = Reference {
                    sample_shape: Some(shape),
                    classes: Some(classes),
                };
                self.current = Some((path.clone(), now));
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the new current model; the data reference stays")
            }
            Err(e) => tracing::warn!(error = %e, "reading the current model panicked"),
        }
    }

    /// Watches until `stop` fires.
    pub async fn run(mut self, stop: CancellationToken) {
        self.save_seen().await;
        let (tx, mut events) = mpsc::unbounded_channel();
        let mode = if self.spec.format == DataFormat::ImageFolder {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        let fs_watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let _ = tx.send(res);
        })
        .and_then(|mut w| w.watch(&self.spec.dir, mode).map(|_| w));
        let _fs_watcher = match fs_watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %self.spec.dir.display(), error = %e, "cannot watch the data folder; relying on rescans");
                None
            }
        };
        let mut next_rescan = Instant::now() + self.rescan;
        // Look at once: files that arrived while the daemon was down are new.
        let mut dirty = true;
        loop {
            let now = Instant::now();
            let wake = if dirty || !self.pending.is_empty() {
                next_rescan.min(now + SETTLE_POLL)
            } else {
                next_rescan
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                ev = events.recv() => match ev {
                    Some(Ok(ev)) => {
                        // Opening and reading files (our own rescans among them)
                        // changes nothing; only these can bring a new file.
                        if changes_files(&ev.kind) {
                            self.note(&ev);
                            dirty = true;
                        }
                        continue;
                    }
                    Some(Err(e)) => tracing::debug!(error = %e, "file watch error"),
                    None => {}
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            if dirty || Instant::now() >= next_rescan {
                dirty = false;
                self.rescan_folder().await;
                next_rescan = Instant::now() + self.rescan;
            }
            self.take_settled().await;
        }
    }

    /// Remembers files renamed into place: they are complete.
    fn note(&mut self, ev: &notify::Event) {
        match ev.kind {
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                self.renamed.extend(ev.paths.iter().cloned());
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                if let Some(to) = ev.paths.get(1) {
                    self.renamed.insert(to.clone());
                }
            }
            _ => {}
        }
    }

    async fn rescan_folder(&mut self) {
        let spec = self.spec.clone();
        let listed = match tokio::task::spawn_blocking(move || data::list_files(&spec)).await {
            Ok(Ok(files)) => files,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot list the data folder");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "the data folder listing panicked");
                return;
            }
        };
        let listed: HashSet<PathBuf> = listed.into_iter().collect();
        // A file that went away and comes back is new again.
        self.known.retain(|p| listed.contains(p));
        self.pending.retain(|p, _| listed.contains(p));
        self.renamed
            .retain(|p| listed.contains(p) && !self.known.contains(p));
        for path in listed {
            if !self.known.contains(&path) && !self.pending.contains_key(&path) {
                let (size, mtime) = stat(&path);
                self.pending.insert(
                    path,
                    Candidate {
                        size,
                        mtime,
                        since: Instant::now(),
                    },
                );
            }
        }
    }

    async fn take_settled(&mut self) {
        // A file that went away before it was taken is forgotten, not rejected.
        self.pending.retain(|p, _| p.exists());
        let mut ready = Vec::new();
        for (path, c) in self.pending.iter_mut() {
            if self.renamed.contains(path) {
                ready.push(path.clone());
                continue;
            }
            let (size, mtime) = stat(path);
            if size != c.size || mtime != c.mtime {
                c.size = size;
                c.mtime = mtime;
                c.since = Instant::now();
            } else if c.since.elapsed() >= self.settle {
                ready.push(path.clone());
            }
        }
        ready.sort();
        if ready.is_empty() {
            return;
        }
        self.refresh_reference().await;
        for path in ready {
            self.pending.remove(&path);
            self.renamed.remove(&path);
            self.take(path.clone()).await;
            // Accepted files stay; rejected ones left for rejected/.
            if path.exists() {
                self.known.insert(path);
            }
        }
        self.save_seen().await;
    }

    async fn take(&mut self, path: PathBuf) {
        let spec = self.spec.clone();
        let reference = self.reference.clone();
        let p = path.clone();
        let checked = tokio::task::spawn_blocking(move || {
            let r = validate_file(&p, &spec, &reference);
            let shape = match &r {
                Ok(_) if reference.sample_shape.is_none() => data::scan_file(&p, &spec, None, None)
                    .ok()
                    .map(|s| s.sample_shape),
                _ => None,
            };
            (r, shape)
        })
        .await;
        let name = data::relative_name(&self.spec.dir, &path);
        let result = match checked {
            Ok((r, shape)) => {
                if let Some(shape) = shape {
                    self.reference.sample_shape = Some(shape);
                }
                r.map_err(|e| e.to_string())
            }
            Err(e) => Err(format!("validation crashed: {e}")),
        };
        match result {
            Ok(samples) => {
                tracing::info!(file = %name, samples, "new data accepted");
                self.publisher.event(Event::DataAccepted {
                    file: name,
                    samples,
                });
                let _ = self.new_samples.send(samples as u64);
            }
            Err(reason) => {
                let dir = self.spec.dir.clone();
                let (p, r) = (path.clone(), reason.clone());
                let moved = tokio::task::spawn_blocking(move || quarantine(&p, &dir, &r)).await;
                let (moved_to, move_error) = match moved {
                    Ok(Ok(t)) => (Some(data::relative_name(&self.spec.dir, &t)), None),
                    Ok(Err(e)) => (None, Some(e.to_string())),
                    Err(e) => (None, Some(e.to_string())),
                };
                match &move_error {
                    None => {
                        tracing::warn!(file = %name, %reason, "new data rejected and quarantined")
                    }
                    Some(e) => {
                        tracing::error!(file = %name, %reason, error = %e, "new data rejected but cannot be moved to rejected/")
                    }
                }
                self.publisher.event(Event::DataRejected {
                    file: name,
                    reason,
                    moved_to,
                    move_error,
                });
            }
        }
    }
}

/// Whether a file-system event can mean a new or changed data file.
fn changes_files(kind: &EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Other => false,
    }
}

fn stat(path: &Path) -> (u64, Option<SystemTime>) {
    match std::fs::metadata(path) {
        Ok(m) => (m.len(), m.modified().ok()),
        Err(_) => (0, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_files_is_not_a_change() {
        use notify::event::{AccessKind, AccessMode, CreateKind};
        assert!(!changes_files(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!changes_files(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(changes_files(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(changes_files(&EventKind::Create(CreateKind::File)));
        assert!(changes_files(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
    }

    /// Issue 18: on a fresh device (no model, no class file) a CSV row
    /// labelled `cat` among digit data was accepted; a from-scratch run then
    /// inferred the classes as `["cat"]`. The reference now holds the classes
    /// inferred from the data already there.
    #[test]
    fn without_a_model_new_files_are_checked_against_the_classes_of_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let mut rows = String::from("a,b,label\n");
        for i in 0..10 {
            rows.push_str(&format!("{i},1,{i}\n"));
        }
        std::fs::write(data.join("digits.csv"), rows).unwrap();
        std::fs::write(data.join("more.csv"), "a,b,label\n1,2,3\n").unwrap();
        let spec = DataSpec::new(&data, DataFormat::Csv);
        let old = data::list_files(&spec).unwrap();
        let r = Reference::discover(&spec, &dir.path().join("current.safetensors"), &old);
        let want: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        assert_eq!(r.classes.as_deref(), Some(want.as_slice()));
        assert_eq!(r.sample_shape, Some(vec![2]));

        let cat = data.join("cat.csv");
        std::fs::write(&cat, "a,b,label\n1,2,cat\n").unwrap();
        let e = validate_file(&cat, &spec, &r).unwrap_err().to_string();
        assert!(e.contains("\"cat\"") && e.contains("10 classes"), "{e}");
        std::fs::write(data.join("ok.csv"), "a,b,label\n1,2,9\n").unwrap();
        assert_eq!(validate_file(&data.join("ok.csv"), &spec, &r).unwrap(), 1);
        // A class file still decides when there is one.
        std::fs::write(data.join("classes.txt"), "cat\ndog\n").unwrap();
        let r = Reference::discover(&spec, &dir.path().join("current.safetensors"), &old);
        assert_eq!(r.classes, Some(vec!["cat".to_string(), "dog".to_string()]));
    }

    #[test]
    fn files_newer_than_the_last_run_are_new() {
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        assert_eq!(last_run_start(&runs), None);
        for id in ["20200101T000000Z-aaaa", "20200102T030405Z-bbbb", "notes"] {
            std::fs::create_dir_all(runs.join(id)).unwrap();
        }
        let t = last_run_start(&runs).unwrap();
        let want = chrono::NaiveDate::from_ymd_opt(2020, 1, 2)
            .unwrap()
            .and_hms_opt(3, 4, 5)
            .unwrap()
            .and_utc()
            .timestamp();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64,
            want + 1
        );
        std::fs::write(
            runs.join("20200102T030405Z-bbbb/summary.json"),
            r#"{"started": "2020-01-02T03:04:05.250Z"}"#,
        )
        .unwrap();
        let precise = last_run_start(&runs).unwrap();
        assert_eq!(
            precise
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64,
            want * 1000 + 250
        );
        let f = dir.path().join("a.csv");
        std::fs::write(&f, "x").unwrap();
        let (old, new) = split_existing(vec![f.clone()], Some(t));
        assert!(old.is_empty() && new == vec![f.clone()]);
        let (old, new) = split_existing(vec![f.clone()], None);
        assert!(old == vec![f] && new.is_empty());
    }

    #[test]
    fn quarantine_moves_and_explains_without_clobbering() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for _ in 0..2 {
            std::fs::write(d.join("bad.csv"), b"junk").unwrap();
            quarantine(&d.join("bad.csv"), d, "not a csv").unwrap();
        }
        assert!(!d.join("bad.csv").exists());
        assert!(d.join("rejected/bad.csv").is_file());
        assert!(d.join("rejected/bad.csv.1").is_file());
        let reason = std::fs::read_to_string(d.join("rejected/bad.csv.reason")).unwrap();
        assert!(reason.starts_with("not a csv\n"));
        assert!(d.join("rejected/bad.csv.1.reason").is_file());
    }

    /// Issue 18: a clock stepped back hid data that arrived while the daemon
    /// was down (its mtime is older than the last run's start). The list of
    /// seen files finds it whatever the clock says.
    #[test]
    fn files_that_arrived_while_down_are_new_whatever_the_clock_did() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let old = d.join("old.csv");
        std::fs::write(&old, "a,label\n1,0\n").unwrap();
        let seen_path = d.join(SEEN_FILE);
        save_seen(&seen_path, d, [&old].iter());
        // While down: a new file, written with the clock stepped back by a day,
        // and the old one rewritten in place.
        let new = d.join("new.csv");
        std::fs::write(&new, "a,label\n2,1\n").unwrap();
        let day_ago = SystemTime::now() - Duration::from_secs(86_400);
        std::fs::File::options()
            .write(true)
            .open(&new)
            .unwrap()
            .set_modified(day_ago)
            .unwrap();
        let last_run = Some(SystemTime::now());
        let files = vec![old.clone(), new.clone()];
        // By time alone, the new file is hidden.
        let (_, by_time) = split_existing(files.clone(), last_run);
        assert!(by_time.is_empty());
        let seen = load_seen(&seen_path);
        assert!(seen.is_some());
        let (kept, found) = split_seen(d, files.clone(), seen.as_ref(), last_run);
        assert_eq!((kept, found), (vec![old.clone()], vec![new.clone()]));
        std::fs::write(&old, "a,label\n1,0\n3,1\n").unwrap();
        let (_, found) = split_seen(d, files.clone(), seen.as_ref(), last_run);
        assert_eq!(found, files);
        // No list yet (first start after an upgrade): by time, as before.
        let (_, found) = split_seen(d, files, None, None);
        assert!(found.is_empty());
    }
}
