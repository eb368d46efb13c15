//! Shutdown on SIGTERM / SIGINT: the first signal tells systemd `STOPPING=1` and
//! cancels the daemon's token, which starts the orderly shutdown; a second signal
//! while that is under way ends the process at once.

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use super::systemd;

/// Exit status after a second signal cut the shutdown short (128 + SIGINT).
pub const EXIT_FORCED: i32 = 130;

/// The longest each step of an orderly shutdown may take, in the order they
/// happen. Their sum stays below systemd's `TimeoutStopSec` (a test reads it
/// from `systemd/edge-trainer.service`), so systemd never has to kill a daemon
/// that is still shutting down in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopBudget {
    /// The run finishes its batch, keeps its best checkpoint and resume state,
    /// and ends; past this it is left behind.
    pub run: Duration,
    /// The publisher delivers the final events and the `offline` status (only
    /// while the broker is reachable).
    pub drain: Duration,
    /// The publisher task returns after its drain.
    pub publisher_exit: Duration,
    /// The MQTT driver sends the disconnect and ends.
    pub disconnect: Duration,
    /// The remaining tasks (watcher, status lines, watchdog) end.
    pub tasks: Duration,
    /// The last notifications reach systemd.
    pub notify_flush: Duration,
}

impl StopBudget {
    /// The worst case of the whole shutdown.
    pub const fn total(&self) -> Duration {
        Duration::from_secs(0)
            .saturating_add(self.run)
            .saturating_add(self.drain)
            .saturating_add(self.publisher_exit)
            .saturating_add(self.disconnect)
            .saturating_add(self.tasks)
            .saturating_add(self.notify_flush)
    }
}

/// The daemon's stop budget: 59 s in all, within `TimeoutStopSec=60s`.
pub const STOP_BUDGET: StopBudget = StopBudget {
    run: Duration::from_secs(45),
    drain: Duration::from_secs(5),
    publisher_exit: Duration::from_secs(2),
    disconnect: Duration::from_secs(3),
    tasks: Duration::from_secs(2),
    notify_flush: Duration::from_secs(2),
};

/// Waits for SIGTERM or SIGINT, then cancels `token`. A second signal exits the
/// process. Returns immediately if the handlers cannot be installed (the token
/// then still works for other callers).
pub async fn on_signals(token: CancellationToken) {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return;
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = token.cancelled() => return,
    };
    systemd::stopping();
    tracing::info!(
        signal = name,
        "shutting down: cancelling the run after its current batch"
    );
    token.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting now");
    std::process::exit(EXIT_FORCED);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `TimeoutStopSec` of the unit, in seconds (`60s`, `60`, `1min`, `1min 30s`).
    fn timeout_stop_sec(unit: &str) -> Option<u64> {
        let value = unit
            .lines()
            .find_map(|l| l.trim().strip_prefix("TimeoutStopSec="))?;
        let mut total = 0;
        for part in value.split_whitespace() {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            let n: u64 = digits.parse().ok()?;
            total += match &part[digits.len()..] {
                "" | "s" | "sec" => n,
                "min" | "m" => n * 60,
                _ => return None,
            };
        }
        Some(total)
    }

    #[test]
    fn the_stop_budget_fits_systemds_timeout() {
        let unit = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/systemd/edge-trainer.service"
        ))
        .unwrap();
        let limit = Duration::from_secs(timeout_stop_sec(&unit).unwrap());
        assert!(
            STOP_BUDGET.total() < limit,
            "the shutdown may take {:?}, systemd kills after {limit:?}",
            STOP_BUDGET.total()
        );
        assert_eq!(timeout_stop_sec("TimeoutStopSec=1min 30s"), Some(90));
    }
}
