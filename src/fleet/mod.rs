//! The operator's side of a fleet of daemons: `edge-trainer fleet`. An MQTT
//! client only (it links none of the training code into the daemon): it reads
//! every device's retained `status`, `metrics` and `events`, sends commands to
//! a device, a group (`{prefix}/group/{name}/cmd/...`) or every device
//! (`{prefix}/fleet/cmd/...`), and serves a live dashboard.
//!
//! - [`client`]: connecting with the `[mqtt]` settings, the fleet's topics;
//! - [`view`]: the fleet as the messages describe it (devices, runs, events);
//! - [`command`]: addressing devices and following each to its answer;
//! - [`cli`]: `fleet ls`, `watch`, `train`, `stop`, `status`;
//! - [`serve`]: `fleet serve`, the web dashboard.

pub mod cli;
pub mod client;
pub mod command;
pub mod serve;
pub mod view;

pub use cli::{main, Action};

/// Why a fleet command could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// Bad arguments or configuration (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The broker cannot be reached or refused us.
    #[error("MQTT broker {address}: {reason}")]
    Broker { address: String, reason: String },
    /// The dashboard cannot listen or serve.
    #[error("{0}")]
    Serve(String),
    /// The async runtime cannot be built.
    #[error("cannot start the async runtime: {0}")]
    Runtime(String),
}

impl FleetError {
    /// Whether the error is the user's (arguments, configuration).
    pub fn is_usage(&self) -> bool {
        matches!(self, FleetError::Usage(_))
    }
}
