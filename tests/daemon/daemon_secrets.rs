//! `edge-trainer run` refuses secret files other users can read, before it
//! connects anywhere: exit 2 and a message naming the key and the fix.

use crate::paths::BIN;
use crate::trials::{test, Test};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn world_readable_password_file_stops_the_daemon_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("password");
    std::fs::write(&pw, "secret\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[device]\nkind = \"cpu\"\n[mqtt]\nhost = \"127.0.0.1\"\nport = 1\nusername = \"u\"\npassword_file = {:?}\n[data]\ndir = {:?}\n[output]\ndir = {:?}\n",
            pw.display().to_string(),
            dir.path().join("data").display().to_string(),
            dir.path().join("out").display().to_string(),
        ),
    )
    .unwrap();
    let run = || {
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&cfg)
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap()
    };
    let o = run();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("mqtt.password_file") && err.contains("chmod 600"),
        "{err}"
    );
    // Nothing was created: it stopped before touching the folders.
    assert!(!dir.path().join("out").exists());
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![test!(
        world_readable_password_file_stops_the_daemon_at_start
    )]
}
