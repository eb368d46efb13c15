//! edge-trainer: keeps a classifier current on an edge device.
//!
//! The crate has two halves. [`engine`] is a synchronous library that loads data,
//! builds models, trains them and writes checkpoints; it knows nothing of MQTT or
//! async runtimes. The binary's subcommands (and later the daemon) drive it through
//! [`engine::run::RunRequest`], a stream of [`engine::run::RunEvent`]s and a cancel flag.

pub mod config;
pub mod daemon;
pub mod engine;
pub mod outdir_lock;
pub mod plot;
pub mod report;
