//! The daemon (`edge-trainer run`): keeps the model current on a device nobody
//! logs into. Tokio tasks, one job each:
//!
//! - [`mqtt`]: the only task polling rumqttc's event loop (connection, acks,
//!   commands in, reconnection with backoff);
//! - [`publisher`]: the only task handing messages to the client, from the
//!   [`outbox`] that survives broker outages; [`messages`]: every payload;
//! - [`scheduler`]: the main loop; one training run at a time on its own OS
//!   thread, queued and coalesced triggers, promotion, status;
//! - [`watcher`]: new data files in `data.dir`;
//! - [`systemd`]: readiness, status lines, watchdog; [`shutdown`]: signals and
//!   the stop budget.
//!
//! The engine knows none of this: it gets a run request and a cancel flag and
//! reports on a channel.

pub mod bounded;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod commands;
pub mod fleet_status;
pub mod messages;
pub mod model_recovery;
pub mod mqtt;
pub mod outbox;
pub mod publisher;
pub mod recovery;
pub mod retention;
pub mod scheduler;
pub mod shutdown;
pub mod systemd;
pub mod watcher;

use std::path::Path;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::shutdown::STOP_BUDGET;
use crate::config::{Override, Settings};
use crate::engine::data;
use crate::engine::device;
use crate::engine::promote::{current_model_run_id, CURRENT_FILE};

/// Why the daemon could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A configuration problem (exit code 2).
    #[error("{0}")]
    Config(String),
    /// A folder cannot be created or read.
    #[error("{0}")]
    Io(String),
    /// The embedded broker cannot be started.
    #[error("{0}")]
    Broker(String),
    /// The async runtime cannot be built.
    #[error("cannot start the async runtime: {0}")]
    Runtime(String),
}

impl DaemonError {
    /// Whether the error is the user's configuration (as opposed to the system).
    pub fn is_config(&self) -> bool {
        matches!(self, DaemonError::Config(_))
    }
}

/// This machine's host name, made safe for an MQTT topic level.
pub fn default_device_id() -> String {
    let raw = gethostname::gethostname().to_string_lossy().to_string();
    let clean: String = raw
        .chars()
        .map(|c| {
            if matches!(c, '/' | '+' | '#') || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    if clean.trim().is_empty() {
        "edge-trainer".to_string()
    } else {
        clean
    }
}

/// Runs the daemon with the config file at `config` and the given environment /
/// `--set` overrides, until SIGTERM or SIGINT. Blocks the calling thread.
pub fn run(config: &Path, overrides: Vec<Override>) -> Result<(), DaemonError> {
    let (base, settings) = commands::ConfigBase::load(config, overrides)
        .map_err(|e| DaemonError::Config(e.to_string()))?;
    // Secrets other users can read are refused before anything connects.
    settings
        .check_secret_files()
        .map_err(|e| DaemonError::Config(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("edge-trainer-rt")
        .enable_all()
        .build()
        .map_err(|e| DaemonError::Runtime(e.to_string()))?;
    let shutdown = CancellationToken::new();
    runtime.block_on(async {
        tokio::spawn(shutdown::on_signals(shutdown.clone()));
        serve(base, settings, shutdown).await
    })
}

/// Runs the daemon until `shutdown` is cancelled, then shuts down in order:
/// cancel the run, publish the final events and the `offline` status, disconnect.
pub async fn serve(
    base: commands::ConfigBase,
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let dev = device::select(settings.device.kind, settings.device.ordinal)
        .map_err(|e| DaemonError::Config(format!("device.kind: {e}")))?;
    for (key, dir) in [
        ("output.dir", &settings.output.dir),
        ("data.dir", &settings.data.dir),
    ] {
        std::fs::create_dir_all(dir)
            .map_err(|e| DaemonError::Io(format!("{key}: cannot create {}: {e}", dir.display())))?;
    }
    // One daemon (or `train`) per output.dir: held until `serve` returns.
    let _outdir_lock = crate::outdir_lock::OutdirLock::acquire(&settings.output.dir)
        .map_err(|e| DaemonError::Config(e.to_string()))?;
    let m = &settings.mqtt;
    let device_id = m.device_id.clone().unwrap_or_else(default_device_id);
    let topics = publisher::Topics::new(&m.topic_prefix, &device_id).with_groups(&m.groups);
    if matches!(device_id.as_str(), "fleet" | "group") {
        tracing::warn!(%device_id, "this device id is also a fleet topic level: its own commands reach the fleet or its groups; choose another mqtt.device_id");
    }

    let connect_host = if m.embedded_broker {
        start_embedded_broker(&settings)?
    } else {
        m.host.clone()
    };
    let conn = mqtt::connection(m, &device_id, &topics.status(), &connect_host)?;
    let publisher = publisher::Publisher::new(topics.clone(), &device_id, m.outbox_capacity);
    let current = settings.output.dir.join(CURRENT_FILE);
    let current_model = {
        let out = settings.output.dir.clone();
        tokio::task::spawn_blocking(move || current_model_run_id(&out))
            .await
            .unwrap_or(None)
    };
    let current_score = match &current_model {
        Some(id) => {
            let (runs, id) = (settings.runs_dir(), id.clone());
            tokio::task::spawn_blocking(move || fleet_status::score_at_start(&runs, &id))
                .await
                .unwrap_or(None)
        }
        None => None,
    };
    publisher.update_status(|s| {
        s.current_model = current_model.clone();
        s.groups = m.groups.clone();
        s.current_score = current_score;
    });

    // The data folder as it is now: these files are not new.
    let spec = settings.data_spec();
    let (existing, reference) = {
        let (spec, current) = (spec.clone(), current.clone());
        let runs = settings.runs_dir();
        let seen_file = settings.output.dir.join(watcher::SEEN_FILE);
        let out = settings.output.dir.clone();
        tokio::task::spawn_blocking(move || {
            // Temporary files of interrupted writes, before any task writes its
            // own (the watcher's seen-data list was removed mid-write).
            recovery::clean_stale_temps(&out);
            let files = data::list_files(&spec).unwrap_or_default();
            // By the list of files seen before (clock steps hide nothing), else by time.
            let seen = watcher::load_seen(&seen_file);
            let (old, new) = watcher::split_seen(
                &spec.dir,
                files,
                seen.as_ref(),
                watcher::last_run_start(&runs),
            );
            // From the data already there, not from the files about to be checked.
            let reference = watcher::Reference::discover(&spec, &current, &old);
            if !new.is_empty() {
                tracing::info!(
                    files = new.len(),
                    "data files arrived since the last run; checking them"
                );
            }
            (old, reference)
        })
        .await
        .map_err(|e| DaemonError::Io(format!("cannot scan data.dir: {e}")))?
    };

    let tasks = TaskTracker::new();
    let finish = CancellationToken::new();
    let (broker_tx, broker_rx) = watch::channel(false);
    let (activity_tx, activity_rx) = watch::channel(systemd::Activity::Idle);
    let (cmd_tx, cmd_rx) = mpsc::channel(64);
    let (urgent_tx, urgent_rx) = mpsc::channel(commands::URGENT_QUEUE);
    let (samples_tx, samples_rx) = mpsc::unbounded_channel();
    let (probe_tx, probe_rx) = mpsc::channel(4);

    let (client, eventloop) = rumqttc::AsyncClient::new(conn.options, 64);
    tracing::info!(
        broker = %conn.address,
        device_id = %device_id,
        topics = %format!("{}/{}/#", m.topic_prefix, device_id),
        "edge-trainer daemon starting"
    );
    let driver = tasks.spawn(
        mqtt::Driver {
            eventloop,
            client: client.clone(),
            publisher: publisher.clone(),
            commands: cmd_tx,
            urgent: urgent_tx,
            broker_up: broker_tx,
            finish: finish.clone(),
            reconnect_max: Duration::from_secs_f64(m.reconnect_max_s),
            address: conn.address.clone(),
        }
        .run(),
    );
    let publisher_task = tasks.spawn(publisher::run(
        publisher.clone(),
        client,
        finish.clone(),
        STOP_BUDGET.drain,
    ));
    let stop_watching = CancellationToken::new();
    tasks.spawn(
        watcher::Watcher::new(
            spec,
            Duration::from_secs_f64(settings.retrain.file_settle_s),
            Duration::from_secs_f64(settings.retrain.rescan_s),
            reference,
            existing,
            publisher.clone(),
            samples_tx,
        )
        .with_current_model(current.clone())
        .with_seen_file(settings.output.dir.join(watcher::SEEN_FILE))
        .run(stop_watching.clone()),
    );
    tasks.spawn(systemd::status_lines(activity_rx, broker_rx));
    if let Some(period) = systemd::watchdog_period() {
        tasks.spawn(systemd::watchdog(period, probe_tx, finish.clone()));
    }

    let scheduler = scheduler::Scheduler::new(base, settings, dev, publisher.clone(), activity_tx);
    systemd::ready();
    tracing::info!("ready");
    scheduler
        .run(
            scheduler::Inputs {
                commands: cmd_rx,
                urgent: urgent_rx,
                new_samples: samples_rx,
                probes: probe_rx,
            },
            shutdown,
        )
        .await;

    // The scheduler published its last messages; deliver them and disconnect.
    stop_watching.cancel();
    finish.cancel();
    let b = STOP_BUDGET;
    let _ = tokio::time::timeout(b.drain + b.publisher_exit, publisher_task).await;
    let _ = tokio::time::timeout(b.disconnect, driver).await;
    tasks.close();
    if tokio::time::timeout(b.tasks, tasks.wait()).await.is_err() {
        tracing::debug!("some tasks did not end in time");
    }
    tracing::info!("stopped");
    tokio::task::spawn_blocking(move || systemd::flush(b.notify_flush))
        .await
        .ok();
    Ok(())
}

#[cfg(feature = "embedded-broker")]
fn start_embedded_broker(settings: &Settings) -> Result<String, DaemonError> {
    let m = &settings.mqtt;
    let credentials = match (&m.username, &m.password_file) {
        (Some(u), Some(p)) => {
            let pw = std::fs::read_to_string(p).map_err(|e| {
                DaemonError::Config(format!(
                    "mqtt.password_file: cannot read {}: {e}",
                    p.display()
                ))
            })?;
            Some((u.clone(), pw.lines().next().unwrap_or_default().to_string()))
        }
        _ => None,
    };
    if m.tls.ca.is_some() {
        return Err(DaemonError::Config(
            "mqtt.embedded_broker does not serve TLS; unset mqtt.tls or use an external broker"
                .into(),
        ));
    }
    let listen = broker::start(&m.host, m.port, credentials)?;
    Ok(broker::local_address(listen).ip().to_string())
}

#[cfg(not(feature = "embedded-broker"))]
fn start_embedded_broker(_settings: &Settings) -> Result<String, DaemonError> {
    Err(DaemonError::Config(
        "mqtt.embedded_broker = true but this build has no embedded broker; rebuild with the `embedded-broker` feature (on by default)".into(),
    ))
}
