//! The fleet end to end: real daemons in groups on one Mosquitto, driven by
//! the real `edge-trainer fleet` (ls, train, stop, status) over plain TCP and
//! over TLS with credentials; the dashboard (`fleet serve`) in a headless
//! Chromium; and, ignored, the 50-daemon scale measurement.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;
use crate::paths::BIN;
use crate::trials::{test, Test};

/// Quick runs: a few epochs of the digits MLP.
const QUICK: &str = "[train]\nmax_epochs = 3\n";

/// What `edge-trainer fleet ...` did.
pub struct FleetOut {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl FleetOut {
    /// stdout's lines parsed as JSON (`--json`).
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{self:?}")))
            .collect()
    }
}

impl std::fmt::Debug for FleetOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `edge-trainer fleet ARGS --config CONFIG`.
pub fn fleet(config: &Path, args: &[&str]) -> FleetOut {
    let out = Command::new(BIN)
        .arg("fleet")
        .args(args)
        .arg("--config")
        .arg(config)
        .env("EDGE_TRAINER_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run edge-trainer fleet");
    FleetOut {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A device: its folder and its daemon.
pub struct Member {
    pub env: Env,
    pub daemon: Daemon,
}

/// Starts one daemon per `(extra TOML)` on the broker at `port`.
pub fn start_members(port: u16, extras: &[String]) -> Vec<Member> {
    extras
        .iter()
        .map(|extra| {
            let env = Env::new(port, extra, &[]);
            let daemon = Daemon::start(&env, &[]);
            Member { env, daemon }
        })
        .collect()
}

/// `fleet ls --json` until every one of `ids` is listed in a state in `states`.
pub fn wait_listed(config: &Path, ids: &[&str], states: &[&str], members: &[Member]) -> Vec<Value> {
    let t0 = Instant::now();
    loop {
        let out = fleet(config, &["ls", "--json"]);
        assert_eq!(out.code, Some(0), "{out:?}");
        let rows: Vec<Value> = serde_json::from_str(out.stdout.trim()).unwrap_or_default();
        let ok = ids.iter().all(|id| {
            rows.iter()
                .any(|r| r["device_id"] == *id && states.iter().any(|s| r["state"] == *s))
        });
        if ok {
            return rows;
        }
        if t0.elapsed() > LONG {
            let logs: Vec<String> = members.iter().map(|m| m.daemon.log_text()).collect();
            panic!(
                "not all of {ids:?} listed as {states:?}: {out:?}\n{}",
                logs.join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn by_device(lines: &[Value]) -> std::collections::BTreeMap<String, Value> {
    lines
        .iter()
        .map(|l| (l["device"].as_str().unwrap_or("").to_string(), l.clone()))
        .collect()
}

fn group_extra(groups: &[&str]) -> String {
    let list: Vec<String> = groups.iter().map(|g| format!("{g:?}")).collect();
    format!("{QUICK}[mqtt]\ngroups = [{}]\n", list.join(", "))
}

fn fleet_groups_broadcast_and_device_commands() {
    let port = free_port();
    let broker_dir = tempfile::tempdir().unwrap();
    let _broker = Broker::start(broker_dir.path(), port);
    let mut members = start_members(
        port,
        &[
            group_extra(&["line-1"]),
            group_extra(&["line-1", "cams"]),
            group_extra(&["cams"]),
        ],
    );
    let owned: Vec<String> = members.iter().map(|m| m.env.device_id.clone()).collect();
    let ids: Vec<&str> = owned.iter().map(String::as_str).collect();
    let cfg = members[0].env.config.clone();

    // ls: every device, its groups, online and idle.
    let rows = wait_listed(&cfg, &ids, &["idle"], &members);
    let b = rows.iter().find(|r| r["device_id"] == ids[1]).unwrap();
    assert_eq!(b["groups"], serde_json::json!(["line-1", "cams"]));
    assert_eq!(b["online"], true);
    assert_eq!(b["version"], env!("CARGO_PKG_VERSION"));
    let table = fleet(&cfg, &["ls"]);
    assert!(table.stdout.starts_with("DEVICE"), "{table:?}");
    assert!(ids.iter().all(|id| table.stdout.contains(id)), "{table:?}");

    // A group train reaches its two members only; each is followed to its promotion.
    let out = fleet(
        &cfg,
        &["train", "--group", "line-1", "--json", "--timeout", "300"],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines = by_device(&out.json_lines());
    assert_eq!(lines.len(), 2, "{out:?}");
    for id in &ids[..2] {
        assert_eq!(lines[*id]["answer"], "promoted", "{out:?}");
        assert_eq!(lines[*id]["ok"], true);
    }
    assert!(!members[2].env.out.join("current.safetensors").exists());

    // The retained status now carries the model, its scores and the last run.
    let rows = wait_listed(&cfg, &ids, &["idle"], &members);
    let a = rows.iter().find(|r| r["device_id"] == ids[0]).unwrap();
    assert_eq!(a["current_model"], lines[ids[0]]["run_id"], "{a}");
    assert!(a["accuracy"].as_f64().is_some_and(|x| x > 0.5), "{a}");
    assert_eq!(a["last_run"]["promoted"], true, "{a}");
    let c = rows.iter().find(|r| r["device_id"] == ids[2]).unwrap();
    assert!(
        c["current_model"].is_null() && c["last_run"].is_null(),
        "{c}"
    );

    // A broadcast status: one answer per device.
    let out = fleet(&cfg, &["status", "--all", "--json", "--timeout", "60"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines = by_device(&out.json_lines());
    assert_eq!(lines.len(), 3, "{out:?}");
    assert!(lines.values().all(|l| l["answer"] == "reported"), "{out:?}");

    // A stop to one idle device is rejected: one line, exit 1.
    let out = fleet(
        &cfg,
        &["stop", "--device", ids[2], "--json", "--timeout", "60"],
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    let lines = out.json_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["answer"], "rejected");
    assert!(lines[0]["detail"]
        .as_str()
        .unwrap()
        .contains("no run in progress"));

    // A broadcast with a bad override: every device refuses it, naming the key.
    let out = fleet(
        &cfg,
        &[
            "train",
            "--all",
            "--set",
            "train.optimizer.lr=-1",
            "--json",
            "--timeout",
            "60",
        ],
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    let lines = by_device(&out.json_lines());
    assert_eq!(lines.len(), 3, "{out:?}");
    for l in lines.values() {
        assert_eq!(l["answer"], "rejected", "{out:?}");
        assert!(
            l["detail"].as_str().unwrap().contains("train.optimizer.lr"),
            "{l}"
        );
    }

    // A group nobody is in: nothing answers, exit 1; bad targets are usage errors.
    let out = fleet(&cfg, &["train", "--group", "nobody", "--timeout", "5"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("no known member"), "{out:?}");
    let out = fleet(&cfg, &["stop", "--group", "a/b"]);
    assert_eq!(out.code, Some(2), "{out:?}");
    let out = fleet(&cfg, &["stop", "--group", "x", "--all"]);
    assert_eq!(out.code, Some(2), "{out:?}");

    // The whole fleet trains at once (the third device's first model too).
    let out = fleet(&cfg, &["train", "--all", "--json", "--timeout", "300"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines = by_device(&out.json_lines());
    assert_eq!(lines.len(), 3, "{out:?}");
    assert!(
        lines
            .values()
            .all(|l| l["answer"] == "promoted" || l["answer"] == "kept"),
        "{out:?}"
    );
    assert_eq!(lines[ids[2]]["answer"], "promoted", "{out:?}");

    // A device that went away is listed offline, and a command to it says so.
    members[2].daemon.sigterm();
    members[2].daemon.wait_exit(SHORT);
    let rows = wait_listed(&cfg, &ids[2..], &["offline"], &members);
    assert!(rows
        .iter()
        .any(|r| r["device_id"] == ids[2] && r["online"] == false));
    let out = fleet(
        &cfg,
        &["status", "--group", "cams", "--json", "--timeout", "60"],
    );
    assert_eq!(out.code, Some(1), "{out:?}");
    let lines = by_device(&out.json_lines());
    assert_eq!(lines[ids[1]]["answer"], "reported", "{out:?}");
    assert_eq!(lines[ids[2]]["answer"], "offline", "{out:?}");
}

fn fleet_over_tls_with_credentials() {
    let bin = mosquitto().expect("mosquitto");
    let port = free_port();
    let pki = tempfile::tempdir().unwrap();
    let p = pki.path();
    crate::daemon_tls::make_pki(p);
    let secret = "fl33t-Pa55";
    let out = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(p.join("passwd"))
        .args(["edge", secret])
        .output()
        .expect("mosquitto_passwd");
    assert!(out.status.success(), "{out:?}");
    std::fs::write(p.join("mqtt-password"), format!("{secret}\n")).unwrap();
    for f in ["mqtt-password", "client.key"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let conf = p.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {pki}/passwd\n\
             cafile {pki}/ca.crt\ncertfile {pki}/server.crt\nkeyfile {pki}/server.key\n\
             require_certificate true\nuser root\n",
            pki = p.display()
        ),
    )
    .unwrap();
    let mut broker = KillOnDrop(
        Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto"),
    );
    assert!(wait_port(port, SHORT));
    let q = |f: &str| toml::Value::String(p.join(f).display().to_string()).to_string();
    let secure = format!(
        "[mqtt]\nusername = \"edge\"\npassword_file = {}\ngroups = [\"secure\"]\n[mqtt.tls]\nca = {}\nclient_cert = {}\nclient_key = {}\n",
        q("mqtt-password"),
        q("ca.crt"),
        q("client.crt"),
        q("client.key")
    );
    let members = start_members(
        port,
        &[format!("{QUICK}{secure}"), format!("{QUICK}{secure}")],
    );
    let ids: Vec<&str> = members.iter().map(|m| m.env.device_id.as_str()).collect();
    let cfg = members[0].env.config.clone();
    wait_listed(&cfg, &ids, &["idle"], &members);
    let out = fleet(
        &cfg,
        &["train", "--group", "secure", "--json", "--timeout", "300"],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    let lines = by_device(&out.json_lines());
    assert_eq!(lines.len(), 2, "{out:?}");
    assert!(lines.values().all(|l| l["answer"] == "promoted"), "{out:?}");
    assert!(!out.stderr.contains(secret));

    // Without the client certificate the broker refuses the fleet client.
    let plain = members[0].env.dir.path().join("no-cert.toml");
    std::fs::write(
        &plain,
        format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\ntopic_prefix = \"et\"\nusername = \"edge\"\npassword_file = {}\n[data]\ndir = {}\n[output]\ndir = {}\n",
            q("mqtt-password"),
            q("data-x"),
            q("out-x")
        ),
    )
    .unwrap();
    let out = fleet(&plain, &["ls", "--wait", "3"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("MQTT broker"), "{out:?}");
    drop(members);
    let _ = broker.0.kill();
}

/// `fleet serve` on a free port; its URL.
pub fn serve(config: &Path, extra: &[&str]) -> (KillOnDrop, String) {
    use std::io::BufRead;
    let mut child = Command::new(BIN)
        .args(["fleet", "serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .arg("--config")
        .arg(config)
        .env("EDGE_TRAINER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start fleet serve");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_string();
    (KillOnDrop(child), url)
}

/// Evaluates `js` until it returns true.
fn page_until(b: &mut Browser, what: &str, js: &str, members: &[Member]) {
    let t0 = Instant::now();
    while t0.elapsed() < LONG {
        if b.eval(js) == Value::Bool(true) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let html = b.eval("document.body.innerHTML");
    let logs: Vec<String> = members.iter().map(|m| m.daemon.log_text()).collect();
    panic!(
        "the page never showed {what}\n--- page:\n{}\n--- logs:\n{}",
        html.as_str().unwrap_or(""),
        logs.join("\n---\n")
    );
}

fn runs_of(m: &Member) -> usize {
    std::fs::read_dir(m.env.out.join("runs"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn fleet_dashboard_in_headless_chromium() {
    let port = free_port();
    let broker_dir = tempfile::tempdir().unwrap();
    let _broker = Broker::start(broker_dir.path(), port);
    // Runs long enough for their curves to be seen growing.
    let slow = "[train]\nmax_epochs = 200\n[train.early_stopping]\npatience = 100\n";
    let members = start_members(
        port,
        &[
            format!("{slow}[mqtt]\ngroups = [\"line-1\"]\n"),
            format!("{slow}[mqtt]\ngroups = [\"line-1\"]\n"),
            slow.to_string(),
        ],
    );
    let ids: Vec<String> = members.iter().map(|m| m.env.device_id.clone()).collect();
    let cfg = members[0].env.config.clone();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    wait_listed(&cfg, &id_refs, &["idle"], &members);

    // Read-only by default: no buttons, and the API refuses commands.
    let (_ro, ro_url) = serve(&cfg, &[]);
    let mut b = Browser::open(&ro_url);
    page_until(
        &mut b,
        "three device rows",
        "document.querySelectorAll('#devices tbody tr').length === 3",
        &members,
    );
    assert_eq!(
        b.eval("document.querySelectorAll('button[data-cmd]').length"),
        0
    );
    let status = b.eval(
        "fetch('/api/command', {method: 'POST', headers: {'content-type': 'application/json'}, body: JSON.stringify({verb: 'train', all: true})}).then(r => r.status)",
    );
    assert_eq!(status, 403);
    // Everything comes from the binary: no other origin is referenced.
    let external = b.eval(
        "[...document.querySelectorAll('script[src], link[href]')].map(e => e.src || e.href).filter(u => !u.startsWith(location.origin)).length",
    );
    assert_eq!(external, 0);
    drop(b);

    let (_rw, url) = serve(&cfg, &["--allow-commands"]);
    let mut b = Browser::open(&url);
    page_until(
        &mut b,
        "three device rows with buttons",
        "document.querySelectorAll('button[data-cmd=train]').length === 3",
        &members,
    );
    // The train button of the second device trains that device only.
    let target = &ids[1];
    b.eval(&format!(
        "document.querySelector('button[data-cmd=train][data-device=\"{target}\"]').click(); true"
    ));
    let points = format!(
        "Number(document.querySelector('.card[data-device=\"{target}\"]').getAttribute('data-points'))"
    );
    page_until(
        &mut b,
        "the first point",
        &format!("{points} >= 1"),
        &members,
    );
    let first = b.eval(&points).as_u64().unwrap();
    page_until(
        &mut b,
        "the curve growing",
        &format!("{points} > {first}"),
        &members,
    );
    page_until(
        &mut b,
        "the promotion in the feed",
        &format!("!!document.querySelector('#feed li[data-event=model_promoted][data-device=\"{target}\"]')"),
        &members,
    );
    assert_eq!(runs_of(&members[1]), 1);
    assert_eq!(
        runs_of(&members[0]) + runs_of(&members[2]),
        0,
        "a command reached the wrong device"
    );
    // The row shows the new model and its accuracy.
    page_until(
        &mut b,
        "the row with the promoted model",
        &format!("document.querySelector('#devices tr[data-device=\"{target}\"]').textContent.includes('promoted')"),
        &members,
    );

    // Train the group from the page: its two members train, the third does not.
    b.eval("document.getElementById('group').value = 'line-1'; document.getElementById('train-group').click(); true");
    let id0 = &ids[0];
    page_until(
        &mut b,
        "the group's runs",
        &format!("document.querySelectorAll('#feed li[data-event^=model_][data-device=\"{id0}\"]').length === 1 && document.querySelectorAll('#feed li[data-event^=model_][data-device=\"{target}\"]').length === 2"),
        &members,
    );
    assert_eq!(
        runs_of(&members[2]),
        0,
        "the group command reached a device outside it"
    );
    // The second device's card now has a previous run too.
    let prev = b.eval(&format!(
        "Number(document.querySelector('.card[data-device=\"{target}\"]').getAttribute('data-previous-points'))"
    ));
    assert!(prev.as_u64().unwrap() >= 1, "{prev}");
    // Three uPlot charts per device.
    assert_eq!(
        b.eval("document.querySelectorAll('.card .uplot').length"),
        9
    );
}

/// A child killed when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// This module's tests.
pub fn tests() -> Vec<Test> {
    vec![
        test!(fleet_groups_broadcast_and_device_commands).needs(MOSQUITTO),
        test!(fleet_dashboard_in_headless_chromium)
            .needs(MOSQUITTO)
            .needs(CHROMIUM),
        test!(fleet_over_tls_with_credentials)
            .needs(MOSQUITTO)
            .needs(MOSQUITTO_PASSWD)
            .needs(OPENSSL),
    ]
}
