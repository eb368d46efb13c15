//! The broker of the daemon tests: Mosquitto when it is on `PATH`, otherwise the
//! embedded rumqttd run as its own process (`edge-trainer broker`). Both can be
//! stopped and restarted on the same port. Only Mosquitto keeps persistent
//! sessions across a restart (rumqttd keeps them in memory), so tests that
//! assert on that ask [`Broker::keeps_sessions`].
//!
//! With `CI` set, a missing Mosquitto fails every daemon test, loudly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::{signal, SHORT};
use crate::paths::BIN;
use crate::trials::Need;

/// An executable named `tool` on `PATH`.
pub fn on_path(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The `mosquitto` binary on `PATH`, if any.
pub fn mosquitto() -> Option<PathBuf> {
    on_path("mosquitto")
}

/// Mosquitto itself (its TLS client certificates, password file and ACL).
pub const MOSQUITTO: Need = Need {
    what: "mosquitto on PATH",
    present: || mosquitto().is_some(),
    hint: "apt-get install -y mosquitto mosquitto-clients",
};

/// `mosquitto_passwd` (package mosquitto) for the password-file tests.
pub const MOSQUITTO_PASSWD: Need = Need {
    what: "mosquitto_passwd on PATH",
    present: || on_path("mosquitto_passwd").is_some(),
    hint: "apt-get install -y mosquitto",
};

/// `openssl` for the tests that make their own certificates.
pub const OPENSSL: Need = Need {
    what: "openssl on PATH",
    present: || on_path("openssl").is_some(),
    hint: "apt-get install -y openssl",
};

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// Waits until something accepts connections on 127.0.0.1:`port`.
pub fn wait_port(port: u16, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

enum Kind {
    /// Mosquitto, persistent sessions saved in the broker's folder.
    Mosquitto(PathBuf),
    /// `edge-trainer broker` (rumqttd).
    Embedded,
}

/// A broker on 127.0.0.1:`port`, its files (config, log, saved sessions) in its folder.
pub struct Broker {
    kind: Kind,
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// Mosquitto if installed, else the embedded broker (panics under `CI`
    /// without Mosquitto: CI must run the whole suite against it).
    pub fn start(dir: &Path, port: u16) -> Self {
        let kind = match mosquitto() {
            Some(bin) => Kind::Mosquitto(bin),
            None if std::env::var_os("CI").is_some() => panic!(
                "mosquitto is not installed but CI is set: the daemon's end-to-end tests need it \
                 (apt-get install -y mosquitto mosquitto-clients)"
            ),
            None => Kind::Embedded,
        };
        Self::start_kind(kind, dir, port)
    }

    /// The embedded broker (`edge-trainer broker`), even where Mosquitto is installed.
    pub fn start_embedded(dir: &Path, port: u16) -> Self {
        Self::start_kind(Kind::Embedded, dir, port)
    }

    fn start_kind(kind: Kind, dir: &Path, port: u16) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        if let Kind::Mosquitto(_) = kind {
            std::fs::write(
                dir.join("mosquitto.conf"),
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
                     user root\n\
                     max_queued_messages 100000\nlog_dest file {}/mosquitto.log\n",
                    dir.display(),
                    dir.display()
                ),
            )
            .unwrap();
        }
        let mut b = Self {
            kind,
            port,
            dir: dir.to_path_buf(),
            child: None,
        };
        b.spawn();
        b
    }

    /// "mosquitto" or "embedded", for messages.
    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Mosquitto(_) => "mosquitto",
            Kind::Embedded => "embedded",
        }
    }

    /// Whether it is Mosquitto (not the embedded broker).
    pub fn is_mosquitto(&self) -> bool {
        matches!(self.kind, Kind::Mosquitto(_))
    }

    /// Whether persistent sessions survive [`Broker::restart`] (Mosquitto's
    /// persistence file; rumqttd keeps sessions in memory only).
    pub fn keeps_sessions(&self) -> bool {
        self.is_mosquitto()
    }

    fn spawn(&mut self) {
        let mut cmd = match &self.kind {
            Kind::Mosquitto(bin) => {
                let mut c = Command::new(bin);
                c.arg("-c").arg(self.dir.join("mosquitto.conf"));
                c.stderr(Stdio::null());
                c
            }
            Kind::Embedded => {
                let mut c = Command::new(BIN);
                c.args(["broker", "--host", "127.0.0.1", "--port"])
                    .arg(self.port.to_string())
                    .env_remove("EDGE_TRAINER_LOG");
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("broker.log"))
                    .unwrap();
                c.stderr(log);
                c
            }
        };
        let child = cmd
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start the {} broker: {e}", self.name()));
        self.child = Some(child);
        assert!(
            wait_port(self.port, SHORT),
            "the {} broker did not open port {}",
            self.name(),
            self.port
        );
    }

    /// Stops the broker (SIGTERM, so Mosquitto saves its sessions) and waits for
    /// it; its exit status, `None` if it had to be killed (or was not running).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        signal(c.id(), "TERM");
        let t0 = Instant::now();
        while t0.elapsed() < SHORT {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    /// Whether the broker saved its sessions to disk (Mosquitto only).
    pub fn saved_sessions(&self) -> bool {
        self.keeps_sessions() && self.dir.join("mosquitto.db").is_file()
    }

    /// Starts it again on the same port (Mosquitto: with the saved sessions).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
