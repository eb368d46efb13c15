//! A broker, the daemon and a dashboard together, with failure messages that
//! show the daemon's log and what the dashboard saw.

use std::time::Duration;

use crate::helpers::{free_port, Broker, Daemon, Dashboard, Env, Msg, LONG, SHORT};

/// A broker, the daemon and a dashboard.
pub struct Harness {
    pub env: Env,
    pub broker: Broker,
    pub daemon: Daemon,
    pub dash: Dashboard,
}

impl Harness {
    /// Broker + dashboard + daemon; waits for the daemon's retained status.
    pub fn start(extra: &str, hold_back: &[&str]) -> Self {
        Self::start_with(extra, hold_back, &[], None)
    }

    /// [`Harness::start`] with environment variables for the daemon and a
    /// persistent session (client id) for the dashboard.
    pub fn start_with(
        extra: &str,
        hold_back: &[&str],
        vars: &[(&str, String)],
        session: Option<&str>,
    ) -> Self {
        let port = free_port();
        let env = Env::new(port, extra, hold_back);
        Self::start_in(env, port, vars, session)
    }

    /// Broker + dashboard + daemon around an `env` made (and filled with
    /// data, models) by the caller for `port`; waits for the retained status.
    pub fn start_in(env: Env, port: u16, vars: &[(&str, String)], session: Option<&str>) -> Self {
        let broker = Broker::start(&env.dir.path().join("broker"), port);
        let dash = Dashboard::connect(port, &env.base_topic(), session);
        let daemon = Daemon::start(&env, vars);
        let mut h = Self {
            env,
            broker,
            daemon,
            dash,
        };
        h.wait("the daemon's first status", SHORT, |m| {
            m.topic.ends_with("/status")
        });
        h
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
