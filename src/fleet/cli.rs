//! `edge-trainer fleet ...`: the subcommands and what each prints.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use rumqttc::{Event, Packet, QoS};
use serde_json::Value;
use tokio::time::Instant;

use super::client::{self, Connection, Target, TopicKind};
use super::command::{self, DeviceResult, Tracker, Verb};
use super::view::{Change, Fleet};
use super::FleetError;
use crate::config::{self, MqttSettings};

/// Exit code when a device failed or did not answer.
pub const EXIT_FAILED: u8 = 1;

/// The broker connection: the `[mqtt]` section of a config file.
#[derive(clap::Args, Debug, Clone)]
pub struct Connect {
    /// A config file whose `[mqtt]` section names the broker (host, port, TLS,
    /// credentials, topic_prefix); EDGE_TRAINER__MQTT__* variables override it.
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
    /// Seconds to wait for the broker and for the devices' retained status.
    #[arg(long, default_value_t = 5.0, value_name = "S")]
    pub wait: f64,
}

/// Which devices a command addresses.
#[derive(clap::Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    /// One device (its `mqtt.device_id`).
    #[arg(long, value_name = "ID")]
    pub device: Option<String>,
    /// Every device with this name in `mqtt.groups`.
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// Every device.
    #[arg(long)]
    pub all: bool,
}

impl TargetArgs {
    fn target(&self) -> Result<Target, FleetError> {
        let t = match (&self.device, &self.group) {
            (Some(d), _) => Target::Device(d.clone()),
            (_, Some(g)) => Target::Group(g.clone()),
            _ => Target::All,
        };
        t.validate()?;
        Ok(t)
    }
}

/// `fleet train|stop|status` options.
#[derive(clap::Args, Debug, Clone)]
pub struct CommandArgs {
    #[command(flatten)]
    pub connect: Connect,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Seconds to wait for every addressed device's terminal answer.
    #[arg(long, default_value_t = 600.0, value_name = "S")]
    pub timeout: f64,
    /// One JSON object per device instead of aligned lines.
    #[arg(long)]
    pub json: bool,
}

/// `edge-trainer fleet` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Action {
    /// Every device from its retained status: id, groups, online, state, current
    /// model and accuracy, last run, version.
    Ls {
        #[command(flatten)]
        connect: Connect,
        /// A JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Follow every device's runs live: epochs, val loss/acc, early stops, promotions.
    Watch {
        #[command(flatten)]
        connect: Connect,
        /// Stop after this many seconds (default: until interrupted).
        #[arg(long = "for", value_name = "S")]
        duration: Option<f64>,
    },
    /// Train on a device, a group or every device; waits for each one's
    /// promotion decision (promoted / kept) or failure.
    Train {
        #[command(flatten)]
        args: CommandArgs,
        /// Override a config key for this run, e.g. `--set train.optimizer.lr=0.001` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Stop the running run on a device, a group or every device.
    Stop {
        #[command(flatten)]
        args: CommandArgs,
    },
    /// Ask a device, a group or every device for its status.
    Status {
        #[command(flatten)]
        args: CommandArgs,
    },
    /// The web dashboard: device table, live curves, event feed.
    Serve {
        #[command(flatten)]
        connect: Connect,
        /// Address to listen on (HTTP).
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: SocketAddr,
        /// Show train/stop buttons and accept commands from the page.
        #[arg(long)]
        allow_commands: bool,
    },
}

impl Action {
    /// Whether this action is a long-running server (`serve`) rather than a
    /// command whose output goes to a terminal or a pipe.
    pub fn serves(&self) -> bool {
        matches!(self, Action::Serve { .. })
    }
}

/// Runs a fleet subcommand; the exit code (0, or [`EXIT_FAILED`] when a device
/// failed or did not answer).
pub fn main(action: Action) -> Result<u8, FleetError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("edge-trainer-fleet")
        .enable_all()
        .build()
        .map_err(|e| FleetError::Runtime(e.to_string()))?;
    runtime.block_on(async move {
        match action {
            Action::Ls { connect, json } => ls(&connect, json).await,
            Action::Watch { connect, duration } => watch(&connect, duration).await,
            Action::Train { args, set } => send(Verb::Train, &args, &set).await,
            Action::Stop { args } => send(Verb::Stop, &args, &[]).await,
            Action::Status { args } => send(Verb::Status, &args, &[]).await,
            Action::Serve {
                connect,
                listen,
                allow_commands,
            } => {
                let settings = mqtt_settings(&connect)?;
                super::serve::serve(settings, wait_of(&connect)?, listen, allow_commands).await?;
                Ok(0)
            }
        }
    })
}

/// The `[mqtt]` settings of the config file (environment overrides applied).
pub fn mqtt_settings(c: &Connect) -> Result<MqttSettings, FleetError> {
    let overrides = config::env_overrides(std::env::vars());
    let s = config::load(&c.config, &overrides).map_err(|e| FleetError::Usage(e.to_string()))?;
    s.check_secret_files()
        .map_err(|e| FleetError::Usage(e.to_string()))?;
    Ok(s.mqtt)
}

fn wait_of(c: &Connect) -> Result<Duration, FleetError> {
    secs("--wait", c.wait)
}

fn secs(flag: &str, s: f64) -> Result<Duration, FleetError> {
    if !(s.is_finite() && s > 0.0 && s < 1e7) {
        return Err(FleetError::Usage(format!(
            "{flag} {s}: expected a positive number of seconds"
        )));
    }
    Ok(Duration::from_secs_f64(s))
}

/// Folds one incoming publish into `fleet`.
pub fn fold(conn: &Connection, fleet: &mut Fleet, topic: &str, payload: &[u8]) -> Option<Change> {
    let (device, kind) = conn.topics.parse(topic)?;
    fleet.apply(device, kind, payload)
}

/// Connects and reads the retained statuses: until the subscription is
/// acknowledged and then no status arrived for a quarter second (or `wait` is up).
pub async fn connect_and_load(
    settings: &MqttSettings,
    wait: Duration,
) -> Result<(Connection, Fleet), FleetError> {
    let mut conn = client::connect(settings, wait).await?;
    let mut fleet = Fleet::default();
    let deadline = Instant::now() + wait;
    let quiet = Duration::from_millis(250);
    let mut subscribed = false;
    let mut last = Instant::now();
    loop {
        let until = if subscribed {
            (last + quiet).min(deadline)
        } else {
            deadline
        };
        match tokio::time::timeout_at(until, conn.eventloop.poll()).await {
            Err(_) => break,
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                subscribed = true;
                last = Instant::now();
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                if matches!(conn.topics.parse(&p.topic), Some((_, TopicKind::Status))) {
                    last = Instant::now();
                }
                fold(&conn, &mut fleet, &p.topic, &p.payload);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(FleetError::Broker {
                    address: conn.address.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok((conn, fleet))
}

fn or_dash(s: Option<&str>) -> String {
    s.unwrap_or("-").to_string()
}

async fn ls(c: &Connect, json: bool) -> Result<u8, FleetError> {
    let settings = mqtt_settings(c)?;
    let (conn, fleet) = connect_and_load(&settings, wait_of(c)?).await?;
    let _ = conn.client.try_disconnect();
    let mut out = std::io::stdout().lock();
    if json {
        let rows: Vec<Value> = fleet
            .devices
            .values()
            .filter(|d| d.status.is_some())
            .map(|d| d.summary())
            .collect();
        let _ = writeln!(out, "{}", Value::Array(rows));
        return Ok(0);
    }
    let mut rows = vec![[
        "DEVICE", "GROUPS", "ONLINE", "STATE", "MODEL", "ACCURACY", "LAST RUN", "VERSION",
    ]
    .map(String::from)
    .to_vec()];
    for d in fleet.devices.values().filter(|d| d.status.is_some()) {
        rows.push(vec![
            d.id.clone(),
            if d.groups().is_empty() {
                "-".into()
            } else {
                d.groups().join(",")
            },
            if d.online() { "yes" } else { "no" }.into(),
            d.state().to_string(),
            or_dash(d.current_model()),
            d.accuracy()
                .map(|a| format!("{a:.4}"))
                .unwrap_or_else(|| "-".into()),
            d.last_run().unwrap_or_else(|| "-".into()),
            or_dash(d.version()),
        ]);
    }
    let _ = write!(out, "{}", table(&rows));
    if rows.len() == 1 {
        let _ = writeln!(out, "(no devices under {}/)", settings.topic_prefix);
    }
    Ok(0)
}

/// Left-aligned columns separated by two spaces.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

async fn watch(c: &Connect, duration: Option<f64>) -> Result<u8, FleetError> {
    let settings = mqtt_settings(c)?;
    let until = duration
        .map(|s| secs("--for", s).map(|d| Instant::now() + d))
        .transpose()?;
    let (mut conn, mut fleet) = connect_and_load(&settings, wait_of(c)?).await?;
    let tty = std::io::stdout().is_terminal();
    let mut dirty = true;
    let mut next_draw = Instant::now();
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    loop {
        if tty && dirty && Instant::now() >= next_draw {
            print!("\x1b[H\x1b[2J{}", watch_table(&fleet));
            let _ = std::io::stdout().flush();
            dirty = false;
            next_draw = Instant::now() + Duration::from_millis(500);
        }
        let wake = if tty && dirty { next_draw } else { far };
        let stop_at = until.unwrap_or(far);
        let polled = tokio::select! {
            r = conn.eventloop.poll() => r,
            _ = tokio::time::sleep_until(wake) => continue,
            _ = tokio::time::sleep_until(stop_at) => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        match polled {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let change = fold(&conn, &mut fleet, &p.topic, &p.payload);
                if let Some(ch) = change {
                    dirty = true;
                    if !tty {
                        if let Some(line) = watch_line(&ch) {
                            println!("{line}");
                        }
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                return Err(FleetError::Broker {
                    address: conn.address.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }
    let _ = conn.client.try_disconnect();
    Ok(0)
}

/// One line per change, for `watch` on a pipe.
fn watch_line(ch: &Change) -> Option<String> {
    let f = |x: f64| format!("{x:.4}");
    match ch {
        Change::Metrics(d, p, run) => Some(format!(
            "{d}  {run}  epoch {}  step {}  val_loss {}  val_acc {}  lr {}",
            p.epoch,
            p.step,
            f(p.val_loss),
            f(p.val_acc),
            p.lr
        )),
        Change::Event(e) => Some(format!("{}  {}  {}", e.device, e.event, e.text)),
        Change::Status(_) => None,
    }
}

/// The live table of `watch` on a terminal.
fn watch_table(fleet: &Fleet) -> String {
    let mut rows = vec![[
        "DEVICE", "STATE", "RUN", "EPOCH", "VAL LOSS", "VAL ACC", "CKPTS", "EARLY", "RESULT",
    ]
    .map(String::from)
    .to_vec()];
    for d in fleet.devices.values() {
        let r = d.run.as_ref();
        let last = r.and_then(|r| r.points.last());
        rows.push(vec![
            d.id.clone(),
            d.state().into(),
            or_dash(r.map(|r| r.run_id.as_str())),
            match (last, r.and_then(|r| r.max_epochs)) {
                (Some(p), Some(m)) => format!("{}/{m}", p.epoch),
                (Some(p), None) => p.epoch.to_string(),
                _ => "-".into(),
            },
            last.map(|p| format!("{:.4}", p.val_loss))
                .unwrap_or_else(|| "-".into()),
            last.map(|p| format!("{:.4}", p.val_acc))
                .unwrap_or_else(|| "-".into()),
            r.map(|r| r.checkpoints.to_string())
                .unwrap_or_else(|| "-".into()),
            if r.is_some_and(|r| r.early_stopped) {
                "yes"
            } else {
                "-"
            }
            .into(),
            r.and_then(|r| r.decision.clone().or(r.outcome.clone()))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    table(&rows)
}

/// A fresh request id: `fleet-` and 16 hex digits.
pub fn new_request_id() -> Value {
    Value::String(format!("fleet-{:016x}", rand::random::<u64>()))
}

/// Sends `verb` to the target and follows every addressed device; see [`Tracker`].
pub async fn run_command(
    conn: &mut Connection,
    fleet: &Fleet,
    verb: Verb,
    target: &Target,
    sets: &[String],
    timeout: Duration,
) -> Result<Vec<DeviceResult>, FleetError> {
    let request_id = new_request_id();
    let payload = command::payload(verb, &request_id, sets)?;
    let addressed: Vec<_> = fleet
        .devices
        .values()
        .filter(|d| d.status.is_some())
        .filter(|d| match target {
            Target::Device(id) => &d.id == id,
            Target::Group(g) => d.groups().contains(g),
            Target::All => true,
        })
        .collect();
    // A group or the fleet may have members whose status was not seen: they
    // are counted when they answer; the wait ends when the known ones did.
    let accept_others = !matches!(target, Target::Device(_));
    let mut tracker = Tracker::new(verb, request_id, addressed, accept_others);
    if let Target::Device(id) = target {
        tracker.expect(id);
    }
    if !accept_others && tracker.is_done() {
        return Ok(tracker.finish());
    }
    let known = !tracker.is_done();
    let topic = conn.topics.command(target, verb.name());
    conn.client
        .try_publish(topic, QoS::AtLeastOnce, false, payload)
        .map_err(|e| FleetError::Broker {
            address: conn.address.clone(),
            reason: e.to_string(),
        })?;
    let deadline = Instant::now() + timeout;
    // Nobody known to wait for: give unknown members a short while to answer.
    let deadline = if tracker.is_done() {
        Instant::now() + timeout.min(Duration::from_secs(2))
    } else {
        deadline
    };
    let mut sent = false;
    loop {
        if sent && known && tracker.is_done() {
            break;
        }
        let polled = match tokio::time::timeout_at(deadline, conn.eventloop.poll()).await {
            Err(_) => break,
            Ok(r) => r,
        };
        match polled {
            Ok(Event::Incoming(Packet::PubAck(_))) => sent = true,
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some((device, TopicKind::Events)) = conn.topics.parse(&p.topic) {
                    if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                        tracker.on_event(device, &v);
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                return Err(FleetError::Broker {
                    address: conn.address.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(tracker.finish())
}

async fn send(verb: Verb, args: &CommandArgs, sets: &[String]) -> Result<u8, FleetError> {
    let target = args.target.target()?;
    let timeout = secs("--timeout", args.timeout)?;
    let settings = mqtt_settings(&args.connect)?;
    // Overrides are checked before anything is sent.
    command::payload(verb, &Value::Null, sets)?;
    let (mut conn, fleet) = connect_and_load(&settings, wait_of(&args.connect)?).await?;
    let results = run_command(&mut conn, &fleet, verb, &target, sets, timeout).await?;
    let _ = conn.client.try_disconnect();
    let mut out = std::io::stdout().lock();
    if args.json {
        for r in &results {
            let _ = writeln!(out, "{}", serde_json::to_string(r).unwrap_or_default());
        }
    } else {
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|r| {
                vec![
                    r.device.clone(),
                    serde_json::to_value(r.answer)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default(),
                    or_dash(r.run_id.as_deref()),
                    r.detail.clone(),
                ]
            })
            .collect();
        let _ = write!(out, "{}", table(&rows));
    }
    let failed = results.iter().filter(|r| !r.ok).count();
    if results.is_empty() {
        eprintln!(
            "no device answered: {} has no known member",
            target.describe()
        );
        return Ok(EXIT_FAILED);
    }
    if failed > 0 {
        eprintln!(
            "{failed} of {} devices did not {} (see above)",
            results.len(),
            match verb {
                Verb::Train => "train successfully",
                Verb::Stop => "stop a run",
                Verb::Status => "answer",
            }
        );
        return Ok(EXIT_FAILED);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(&[
            vec!["A".into(), "BB".into()],
            vec!["long".into(), "x".into()],
        ]);
        assert_eq!(t, "A     BB\nlong  x\n");
    }
}
