//! systemd integration (`Type=notify`): `READY=1`, `STATUS=` lines, `STOPPING=1`
//! and the watchdog. Every call is a no-op when not started by systemd
//! (`NOTIFY_SOCKET` unset), and failures are logged, never fatal.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Tells systemd the service is ready.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Sets the one-line status `systemctl status` shows.
pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

/// The watchdog period systemd asked for (`WatchdogSec=`), if any.
pub fn watchdog_period() -> Option<Duration> {
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec))
    } else {
        None
    }
}

/// What the daemon is doing, for `STATUS=` lines.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Activity {
    #[default]
    Idle,
    /// Training `run_id`, at `epoch` of `max_epochs` (0 before the first epoch).
    Training {
        run_id: String,
        epoch: u64,
        max_epochs: u64,
    },
    ShuttingDown,
}

/// Keeps the `STATUS=` line current: what the daemon does and whether the broker is up.
pub async fn status_lines(
    mut activity: watch::Receiver<Activity>,
    mut broker_up: watch::Receiver<bool>,
) {
    loop {
        let line = {
            let a = activity.borrow_and_update().clone();
            let up = *broker_up.borrow_and_update();
            let what = match a {
                Activity::Idle => "idle".to_string(),
                Activity::Training {
                    run_id,
                    epoch,
                    max_epochs,
                } if epoch > 0 => format!("training {run_id}: epoch {epoch}/{max_epochs}"),
                Activity::Training { run_id, .. } => format!("training {run_id}: loading data"),
                Activity::ShuttingDown => "shutting down".to_string(),
            };
            format!("{what}; broker {}", if up { "connected" } else { "down" })
        };
        status(&line);
        tokio::select! {
            r = activity.changed() => if r.is_err() { return },
            r = broker_up.changed() => if r.is_err() { return },
        }
    }
}

/// Pings the watchdog at half its period, but only while `alive` answers: a
/// `oneshot` sent through it must come back within the period. `alive` goes to
/// the daemon's main loop, so a stuck loop (not just a live timer) stops the pings.
pub async fn watchdog(
    period: Duration,
    alive: mpsc::Sender<oneshot::Sender<()>>,
    stop: CancellationToken,
) {
    let half = period / 2;
    tracing::info!(
        period_ms = period.as_millis() as u64,
        "systemd watchdog enabled"
    );
    let mut tick = tokio::time::interval(half);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let (tx, rx) = oneshot::channel();
        if alive.try_send(tx).is_err() {
            tracing::warn!("the main loop is not taking watchdog probes");
            continue;
        }
        match tokio::time::timeout(half, rx).await {
            Ok(Ok(())) => send(&[NotifyState::Watchdog]),
            _ => tracing::warn!("the main loop did not answer the watchdog probe"),
        }
    }
}
