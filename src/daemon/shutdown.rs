//! Shutdown on SIGTERM / SIGINT: the first signal tells systemd `STOPPING=1` and
//! cancels the daemon's token, which starts the orderly shutdown; a second signal
//! while that is under way ends the process at once.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use super::systemd;

/// Exit status after a second signal cut the shutdown short (128 + SIGINT).
pub const EXIT_FORCED: i32 = 130;

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
