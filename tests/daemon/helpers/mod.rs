//! Shared parts of the daemon's end-to-end tests: a real broker on a free
//! loopback port ([`broker`]: Mosquitto, or the embedded one as its own process),
//! the real `edge-trainer run` binary ([`daemon`]) with a config in a temp folder
//! holding a copy of the digits data ([`env`]), a "dashboard" that subscribes
//! with rumqttc the way a fleet dashboard would ([`dashboard`]), the three
//! together ([`harness`]) and a systemd notify socket ([`notify`]).

use std::process::Command;
use std::time::{Duration, Instant};

pub mod broker;
pub mod browser;
pub mod daemon;
pub mod dashboard;
pub mod env;
pub mod harness;
pub mod notify;

pub use broker::*;
pub use browser::*;
pub use daemon::*;
pub use dashboard::*;
pub use env::*;
pub use harness::*;
pub use notify::*;

/// Generous: the tests share two busy cores.
pub const LONG: Duration = Duration::from_secs(120);
pub const SHORT: Duration = Duration::from_secs(30);

/// Sends a signal with kill(1): the tests need no libc binding.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
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
