//! Shared parts of the daemon's end-to-end tests: a real Mosquitto on a free
//! loopback port, the real `edge-trainer run` binary with a config in a temp
//! folder holding a copy of the digits data, and a "dashboard" that subscribes
//! with rumqttc the way a fleet dashboard would.
//!
//! Without `mosquitto` installed the broker tests are skipped with a message,
//! except when `CI` is set: then they fail, loudly.

#![allow(dead_code)]

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_edge-trainer");

/// Generous: the tests share two busy cores.
pub const LONG: Duration = Duration::from_secs(120);
pub const SHORT: Duration = Duration::from_secs(30);

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `mosquitto` binary, or `None` (with a note) when it is not installed.
/// Panics when it is missing and `CI` is set.
pub fn mosquitto() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("mosquitto"))
                .collect()
        })
        .unwrap_or_default();
    candidates.push(PathBuf::from("/usr/sbin/mosquitto"));
    candidates.push(PathBuf::from("/usr/local/sbin/mosquitto"));
    if let Some(found) = candidates.into_iter().find(|p| p.is_file()) {
        return Some(found);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "mosquitto is not installed but CI is set: the daemon's end-to-end tests need it \
             (apt-get install -y mosquitto mosquitto-clients)"
        );
    }
    eprintln!("SKIPPED: mosquitto is not installed (apt-get install -y mosquitto); set CI=1 to make this a failure");
    None
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

fn wait_port(port: u16, timeout: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// A Mosquitto broker on 127.0.0.1:`port`, persistent sessions kept in its folder.
pub struct Mosquitto {
    bin: PathBuf,
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start(bin: &Path, dir: &Path, port: u16) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
                 user root\n\
                 max_queued_messages 100000\nlog_dest file {}/mosquitto.log\n",
                dir.display(),
                dir.display()
            ),
        )
        .unwrap();
        let mut m = Self {
            bin: bin.to_path_buf(),
            port,
            dir: dir.to_path_buf(),
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        assert!(
            wait_port(self.port, SHORT),
            "mosquitto did not open port {}",
            self.port
        );
    }

    /// Stops the broker (SIGTERM, so it saves its sessions) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let t0 = Instant::now();
            while t0.elapsed() < SHORT {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the broker saved its sessions to disk.
    pub fn saved_sessions(&self) -> bool {
        self.dir.join("mosquitto.db").is_file()
    }

    /// Starts it again on the same port with the saved sessions.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends a signal with kill(1): the tests need no libc binding.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// One message the dashboard received.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub json: Value,
    pub raw: Vec<u8>,
    pub retain: bool,
}

impl Msg {
    pub fn event(&self) -> &str {
        self.json["event"].as_str().unwrap_or("")
    }
    pub fn run_id(&self) -> &str {
        self.json["run_id"].as_str().unwrap_or("")
    }
}

/// A subscriber to `{prefix}/{device}/#`, as a fleet dashboard would be.
pub struct Dashboard {
    client: Client,
    rx: mpsc::Receiver<Msg>,
    pub seen: Vec<Msg>,
    pub base: String,
}

impl Dashboard {
    /// Connects and subscribes; returns once the subscription is acknowledged.
    /// `session`: a client id for a persistent session (messages wait while it is away).
    pub fn connect(port: u16, base: &str, session: Option<&str>) -> Self {
        let id = session
            .map(str::to_string)
            .unwrap_or_else(|| format!("dash-{}", rand::random::<u32>()));
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(session.is_none());
        Self::connect_with(o, base)
    }

    /// Connects with the given options (TLS, credentials) and subscribes.
    pub fn connect_with(mut o: MqttOptions, base: &str) -> Self {
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        let (client, mut conn) = Client::new(o, 64);
        let (tx, rx) = mpsc::channel();
        let (sub_tx, sub_rx) = mpsc::channel();
        let filter = format!("{base}/#");
        let c2 = client.clone();
        std::thread::spawn(move || {
            let mut errors: u64 = 0;
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c2.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let json = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        let msg = Msg {
                            topic: p.topic.clone(),
                            json,
                            raw: p.payload.to_vec(),
                            retain: p.retain,
                        };
                        if tx.send(msg).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        errors += 1;
                        if errors.is_power_of_two() {
                            eprintln!("dashboard connection error #{errors}: {e}");
                        }
                        std::thread::sleep(Duration::from_millis(100))
                    }
                }
            }
        });
        sub_rx.recv_timeout(SHORT).expect("dashboard subscribed");
        Self {
            client,
            rx,
            seen: Vec::new(),
            base: base.to_string(),
        }
    }

    fn pump(&mut self, wait: Duration) {
        if let Ok(m) = self.rx.recv_timeout(wait) {
            self.seen.push(m);
            while let Ok(m) = self.rx.try_recv() {
                self.seen.push(m);
            }
        }
    }

    /// Takes in whatever has arrived, without waiting.
    pub fn pump_now(&mut self) {
        while let Ok(m) = self.rx.try_recv() {
            self.seen.push(m);
        }
    }

    /// Index of the first message at or after `from` matching `pred`, waiting up to `timeout`.
    pub fn find_from(
        &mut self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&Msg) -> bool,
    ) -> Option<usize> {
        let t0 = Instant::now();
        loop {
            if let Some(i) = self.seen.iter().skip(from).position(&pred) {
                return Some(from + i);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            self.pump(Duration::from_millis(50));
        }
    }

    pub fn topic(&self, leaf: &str) -> String {
        format!("{}/{leaf}", self.base)
    }

    /// Publishes a command (QoS 1, not retained).
    pub fn send(&self, cmd: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(
                self.topic(&format!("cmd/{cmd}")),
                QoS::AtLeastOnce,
                false,
                payload.into(),
            )
            .expect("publish command");
    }

    /// Publishes a retained command.
    pub fn send_retained(&self, cmd: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(
                self.topic(&format!("cmd/{cmd}")),
                QoS::AtLeastOnce,
                true,
                payload.into(),
            )
            .expect("publish command");
    }

    /// Everything received so far on `leaf` (`events`, `metrics`, `status`).
    pub fn on(&self, leaf: &str) -> Vec<&Msg> {
        let t = self.topic(leaf);
        self.seen.iter().filter(|m| m.topic == t).collect()
    }
}

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

/// The daemon process, its stderr going to a log file.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(env: &Env, vars: &[(&str, String)]) -> Self {
        let log = env.dir.path().join("daemon.log");
        let err = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg("--config")
            .arg(&env.config)
            .current_dir(env.dir.path())
            .env("EDGE_TRAINER_LOG", "info,edge_trainer=debug")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdout(Stdio::null())
            .stderr(err);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start edge-trainer run");
        Self { child, log }
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn sigterm(&self) {
        signal(self.child.id(), "TERM");
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mosquitto, the daemon and a dashboard, with failure messages that show the
/// daemon's log and what the dashboard saw.
pub struct Harness {
    pub env: Env,
    pub broker: Option<Mosquitto>,
    pub daemon: Daemon,
    pub dash: Dashboard,
}

impl Harness {
    /// Mosquitto + dashboard + daemon; waits for the daemon's retained status.
    /// `None` when mosquitto is missing (and CI unset).
    pub fn start(extra: &str, hold_back: &[&str]) -> Option<Self> {
        Self::start_with(extra, hold_back, &[], None)
    }

    pub fn start_with(
        extra: &str,
        hold_back: &[&str],
        vars: &[(&str, String)],
        session: Option<&str>,
    ) -> Option<Self> {
        let bin = mosquitto()?;
        let port = free_port();
        let env = Env::new(port, extra, hold_back);
        let broker = Mosquitto::start(&bin, &env.dir.path().join("broker"), port);
        let dash = Dashboard::connect(port, &env.base_topic(), session);
        let daemon = Daemon::start(&env, vars);
        let mut h = Self {
            env,
            broker: Some(broker),
            daemon,
            dash,
        };
        h.wait("the daemon's first status", SHORT, |m| {
            m.topic.ends_with("/status")
        });
        Some(h)
    }

    /// Dumps context and panics.
    pub fn fail(&self, what: &str) -> ! {
        let seen: Vec<String> = self
            .dash
            .seen
            .iter()
            .map(|m| {
                format!(
                    "  {} {}",
                    m.topic,
                    String::from_utf8_lossy(&m.raw)
                        .chars()
                        .take(200)
                        .collect::<String>()
                )
            })
            .collect();
        panic!(
            "timed out waiting for {what}\n--- dashboard saw:\n{}\n--- daemon log:\n{}",
            seen.join("\n"),
            self.daemon.log_text()
        );
    }

    /// The first message (from the start) matching `pred`.
    pub fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Msg) -> bool,
    ) -> (usize, Msg) {
        self.wait_from(0, what, timeout, pred)
    }

    /// The first message at index `from` or later matching `pred`, with its index.
    pub fn wait_from(
        &mut self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Msg) -> bool,
    ) -> (usize, Msg) {
        match self.dash.find_from(from, timeout, pred) {
            Some(i) => (i, self.dash.seen[i].clone()),
            None => self.fail(what),
        }
    }

    /// Index and message of the first `events` message named `name` (for `run_id` if given).
    pub fn wait_event(
        &mut self,
        name: &str,
        run_id: Option<&str>,
        timeout: Duration,
    ) -> (usize, Msg) {
        let topic = self.dash.topic("events");
        let what = format!("event {name} (run {run_id:?})");
        self.wait_from(0, &what, timeout, |m| {
            m.topic == topic && m.event() == name && run_id.is_none_or(|r| m.run_id() == r)
        })
    }

    /// Sends `cmd/train` with `payload` and returns the run id from `run_started`
    /// carrying `request_id`.
    pub fn train(&mut self, request_id: &str, payload: &str) -> String {
        self.dash.send("train", payload);
        let topic = self.dash.topic("events");
        let rid = request_id.to_string();
        let (_, m) = self.wait_from(0, &format!("run_started for {request_id}"), LONG, |m| {
            m.topic == topic
                && m.event() == "run_started"
                && m.json["request_ids"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|v| v.as_str() == Some(rid.as_str())))
        });
        m.run_id().to_string()
    }
}

/// A Unix datagram socket standing in for systemd's `NOTIFY_SOCKET`, read
/// continuously by a thread (as systemd would) into `lines`.
pub struct NotifySocket {
    pub path: PathBuf,
    rx: mpsc::Receiver<String>,
    pub lines: Vec<String>,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                for line in String::from_utf8_lossy(&buf[..n]).lines() {
                    if tx.send(line.to_string()).is_err() {
                        return;
                    }
                }
            }
        });
        Self {
            path,
            rx,
            lines: Vec::new(),
        }
    }

    /// Waits until `pred` holds for some line received so far, or `timeout`.
    pub fn wait(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let t0 = Instant::now();
        loop {
            while let Ok(l) = self.rx.try_recv() {
                self.lines.push(l);
            }
            if self.lines.iter().any(|l| pred(l)) {
                return true;
            }
            if t0.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Checks that `ts` is RFC 3339 UTC.
pub fn assert_ts(m: &Msg) {
    let ts = m.json["ts"]
        .as_str()
        .unwrap_or_else(|| panic!("no ts in {} {}", m.topic, m.json));
    assert!(
        ts.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(ts).is_ok(),
        "bad ts {ts:?} in {}",
        m.topic
    );
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}
