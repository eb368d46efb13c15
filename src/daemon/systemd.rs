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

/// The watchdog period systemd asked for (`WatchdogSec=`), if any: `WATCHDOG_USEC`,
/// unless `WATCHDOG_PID` names another process (as `sd_watchdog_enabled(3)`).
pub fn watchdog_period() -> Option<Duration> {
    parse_watchdog(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    match pid.map(|p| p.trim().parse::<u32>()) {
        Some(Ok(p)) if p != me => None,
        Some(Err(_)) => None,
        _ => Some(Duration::from_micros(usec)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_follows_sd_watchdog_enabled() {
        let d = Some(Duration::from_secs(2));
        assert_eq!(parse_watchdog(Some("2000000"), None, 7), d);
        assert_eq!(parse_watchdog(Some("2000000"), Some("7"), 7), d);
        assert_eq!(parse_watchdog(Some("2000000"), Some("8"), 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("x"), None, 7), None);
        assert_eq!(parse_watchdog(None, Some("7"), 7), None);
    }
}
