//! systemd integration (`Type=notify`): `READY=1`, `STATUS=` lines, `STOPPING=1`
//! and the watchdog. Every call is a no-op when not started by systemd
//! (`NOTIFY_SOCKET` unset), and failures are logged, never fatal.
//!
//! Sending to the notify socket can block (a datagram socket whose reader is
//! slow), so the messages go through a bounded queue to a small thread of their
//! own: no runtime worker ever waits on systemd.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

/// One message for systemd.
enum Note {
    Ready,
    Stopping,
    Watchdog,
    Status(String),
    /// Answered once everything before it was sent.
    Flush(SyncSender<()>),
}

fn notifier() -> Option<&'static SyncSender<Note>> {
    static TX: OnceLock<Option<SyncSender<Note>>> = OnceLock::new();
    TX.get_or_init(|| {
        std::env::var_os("NOTIFY_SOCKET")?;
        let (tx, rx) = sync_channel::<Note>(256);
        let spawned = std::thread::Builder::new()
            .name("sd-notify".into())
            .spawn(move || {
                for note in rx {
                    let state = match &note {
                        Note::Ready => NotifyState::Ready,
                        Note::Stopping => NotifyState::Stopping,
                        Note::Watchdog => NotifyState::Watchdog,
                        Note::Status(s) => NotifyState::Status(s),
                        Note::Flush(done) => {
                            let _ = done.try_send(());
                            continue;
                        }
                    };
                    if let Err(e) = sd_notify::notify(false, &[state]) {
                        tracing::debug!(error = %e, "sd_notify failed");
                    }
                }
            });
        match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the systemd notifier thread");
                None
            }
        }
    })
    .as_ref()
}

fn send(note: Note) {
    if let Some(tx) = notifier() {
        match tx.try_send(note) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::debug!("systemd is not reading notifications; one dropped")
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// Waits (up to `timeout`) until the notifications sent so far went out.
pub fn flush(timeout: Duration) {
    if notifier().is_some() {
        let (tx, rx) = sync_channel(1);
        send(Note::Flush(tx));
        let _ = rx.recv_timeout(timeout);
    }
}

/// Tells systemd the service is ready.
pub fn ready() {
    send(Note::Ready);
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    send(Note::Stopping);
}

/// Sets the one-line status `systemctl status` shows.
pub fn status(line: &str) {
    send(Note::Status(line.to_string()));
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
            Ok(Ok(())) => send(Note::Watchdog),
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
