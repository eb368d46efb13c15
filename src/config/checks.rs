//! Rules that keep a configuration workable beyond type and range checks: MQTT
//! topic levels a broker accepts, a port and keep-alive that fit the protocol,
//! folders that are folders, and `data.dir` / `output.dir` kept apart (the
//! watcher would take models for data). Each error names the key.

use std::path::{Component, Path, PathBuf};

use super::{invalid, ConfigError, Settings};

/// Longest topic level (`mqtt.device_id`, each level of `mqtt.topic_prefix`), in bytes.
pub const MAX_TOPIC_LEVEL_BYTES: usize = 128;

/// Checks the rules above; called at the end of [`Settings::validate`].
pub(super) fn check(s: &Settings) -> Result<(), ConfigError> {
    check_mqtt(s)?;
    check_folders(s)
}

fn check_level(key: &str, level: &str) -> Result<(), ConfigError> {
    if level.contains('\0') || level.chars().any(char::is_control) {
        return Err(invalid(key, "must not contain NUL or control characters"));
    }
    if level.len() > MAX_TOPIC_LEVEL_BYTES {
        return Err(invalid(
            key,
            format!(
                "a topic level of {} bytes is longer than {MAX_TOPIC_LEVEL_BYTES}",
                level.len()
            ),
        ));
    }
    Ok(())
}

fn check_mqtt(s: &Settings) -> Result<(), ConfigError> {
    let m = &s.mqtt;
    if m.port == 0 {
        return Err(invalid("mqtt.port", "must be between 1 and 65535"));
    }
    if m.keep_alive_s > u64::from(u16::MAX) {
        return Err(invalid(
            "mqtt.keep_alive_s",
            format!(
                "{} does not fit MQTT's keep-alive (at most {} seconds)",
                m.keep_alive_s,
                u16::MAX
            ),
        ));
    }
    if let Some(id) = &m.device_id {
        if id.contains(['#', '+', '/']) {
            return Err(invalid(
                "mqtt.device_id",
                "must be non-empty and contain no '/', '#' or '+'",
            ));
        }
        check_level("mqtt.device_id", id)?;
    }
    if m.topic_prefix.starts_with('$') {
        return Err(invalid(
            "mqtt.topic_prefix",
            "must not start with `$` (topics such as $SYS belong to the broker)",
        ));
    }
    for level in m.topic_prefix.split('/') {
        check_level("mqtt.topic_prefix", level)?;
    }
    check_groups(&m.groups)?;
    if let Some(id) = &m.client_id {
        if id.is_empty() || id.contains('\0') || id.len() > 256 {
            return Err(invalid(
                "mqtt.client_id",
                "must be 1 to 256 bytes with no NUL",
            ));
        }
    }
    Ok(())
}

/// Most entries in `mqtt.groups` (one subscription each).
pub const MAX_GROUPS: usize = 32;

/// `mqtt.groups`: topic levels like `mqtt.device_id`, no duplicates.
fn check_groups(groups: &[String]) -> Result<(), ConfigError> {
    const KEY: &str = "mqtt.groups";
    if groups.len() > MAX_GROUPS {
        return Err(invalid(
            KEY,
            format!("{} groups; at most {MAX_GROUPS}", groups.len()),
        ));
    }
    for (i, g) in groups.iter().enumerate() {
        if g.is_empty() || g.contains(['#', '+', '/']) {
            return Err(invalid(
                KEY,
                format!("group {g:?} must be non-empty and contain no '/', '#' or '+'"),
            ));
        }
        check_level(KEY, g)?;
        if groups[..i].contains(g) {
            return Err(invalid(KEY, format!("group {g:?} is listed twice")));
        }
    }
    Ok(())
}

fn check_folders(s: &Settings) -> Result<(), ConfigError> {
    for (key, dir) in [("data.dir", &s.data.dir), ("output.dir", &s.output.dir)] {
        if let Ok(meta) = std::fs::metadata(dir) {
            if !meta.is_dir() {
                return Err(invalid(
                    key,
                    format!("{} exists and is not a folder", dir.display()),
                ));
            }
        }
    }
    let data = resolve(&s.data.dir);
    let output = resolve(&s.output.dir);
    // Where the daemon and `train` write: output.dir itself (models, the lock)
    // and its run folders. A data folder elsewhere under output.dir (say
    // `output.dir/data`) is left alone by both, and stays allowed.
    let how = if data == output {
        Some("are the same folder")
    } else if output.starts_with(&data) {
        Some("overlap: output.dir is inside data.dir")
    } else if data.starts_with(output.join("runs")) {
        Some("overlap: data.dir is inside output.dir/runs, where run folders are written")
    } else {
        None
    };
    if let Some(how) = how {
        return Err(invalid(
            "output.dir",
            format!(
                "output.dir ({}) and data.dir ({}) {how}; the watcher would take models for data: give them separate folders",
                s.output.dir.display(),
                s.data.dir.display()
            ),
        ));
    }
    Ok(())
}

/// `path` made absolute, `.`/`..` folded, and links resolved as far as the
/// path exists (the rest may be created later).
fn resolve(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    let mut lexical = PathBuf::new();
    for c in absolute.components() {
        match c {
            Component::ParentDir => {
                lexical.pop();
            }
            Component::CurDir => {}
            other => lexical.push(other.as_os_str()),
        }
    }
    // Resolve links in the longest prefix that exists.
    let mut existing = lexical.clone();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut out = real;
            for part in rest.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return lexical,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(s: &Settings) -> String {
        s.validate().unwrap_err().to_string()
    }

    fn with_dirs(data: &Path, output: &Path) -> Settings {
        let mut s = Settings::default();
        s.data.dir = data.to_path_buf();
        s.output.dir = output.to_path_buf();
        s
    }

    #[test]
    fn overlapping_data_and_output_folders_are_refused_naming_both_keys() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        let out = t.path().join("out");
        assert!(with_dirs(&data, &out).validate().is_ok());
        for (d, o) in [
            (data.clone(), data.clone()),
            (data.clone(), data.join("models")),
            (out.join("runs"), out.clone()),
            (out.join("runs/r1/data"), out.clone()),
            (data.clone(), t.path().join("x/../data/./m")),
        ] {
            let e = err_of(&with_dirs(&d, &o));
            assert!(
                e.contains("output.dir") && e.contains("data.dir"),
                "{d:?} {o:?}: {e}"
            );
        }
        // Through a link: out/link -> data.
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        std::os::unix::fs::symlink(&data, t.path().join("alias")).unwrap();
        let e = err_of(&with_dirs(&data, &t.path().join("alias/models")));
        assert!(e.contains("inside data.dir"), "{e}");
        // Data in a folder of its own under output.dir is not written to.
        assert!(with_dirs(&out.join("data"), &out).validate().is_ok());
        // A sibling whose name starts the same is not inside.
        assert!(with_dirs(&data, &t.path().join("data-out"))
            .validate()
            .is_ok());
    }

    #[test]
    fn files_where_folders_are_expected_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let e = err_of(&with_dirs(&file, &t.path().join("out")));
        assert!(e.contains("data.dir") && e.contains("not a folder"), "{e}");
        let e = err_of(&with_dirs(&t.path().join("data"), &file));
        assert!(
            e.contains("output.dir") && e.contains("not a folder"),
            "{e}"
        );
    }

    #[test]
    fn mqtt_values_a_broker_cannot_take_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let base = with_dirs(&t.path().join("d"), &t.path().join("o"));
        type Change = Box<dyn Fn(&mut Settings)>;
        let cases: Vec<(&str, Change)> = vec![
            ("mqtt.port", Box::new(|s| s.mqtt.port = 0)),
            (
                "mqtt.keep_alive_s",
                Box::new(|s| s.mqtt.keep_alive_s = 65_536),
            ),
            (
                "mqtt.device_id",
                Box::new(|s| s.mqtt.device_id = Some("a\0b".into())),
            ),
            (
                "mqtt.device_id",
                Box::new(|s| s.mqtt.device_id = Some("x".repeat(70_000))),
            ),
            (
                "mqtt.device_id",
                Box::new(|s| s.mqtt.device_id = Some("a/b".into())),
            ),
            (
                "mqtt.device_id",
                Box::new(|s| s.mqtt.device_id = Some("a+".into())),
            ),
            (
                "mqtt.topic_prefix",
                Box::new(|s| s.mqtt.topic_prefix = "$SYS".into()),
            ),
            (
                "mqtt.topic_prefix",
                Box::new(|s| s.mqtt.topic_prefix = "a/b\0".into()),
            ),
            (
                "mqtt.topic_prefix",
                Box::new(|s| s.mqtt.topic_prefix = format!("a/{}", "y".repeat(129))),
            ),
            (
                "mqtt.client_id",
                Box::new(|s| s.mqtt.client_id = Some("c\0".into())),
            ),
            (
                "mqtt.groups",
                Box::new(|s| s.mqtt.groups = vec!["line/1".into()]),
            ),
            (
                "mqtt.groups",
                Box::new(|s| s.mqtt.groups = vec![String::new()]),
            ),
            (
                "mqtt.groups",
                Box::new(|s| s.mqtt.groups = vec!["a".into(), "a".into()]),
            ),
            (
                "mqtt.groups",
                Box::new(|s| s.mqtt.groups = vec!["g".repeat(200)]),
            ),
        ];
        for (key, change) in cases {
            let mut s = base.clone();
            change(&mut s);
            let e = err_of(&s);
            assert!(e.contains(key), "{key}: {e}");
        }
        let mut s = base.clone();
        s.mqtt.keep_alive_s = 65_535;
        s.mqtt.topic_prefix = "site/edge-trainer".into();
        s.mqtt.device_id = Some("x".repeat(MAX_TOPIC_LEVEL_BYTES));
        assert!(s.validate().is_ok());
    }
}
