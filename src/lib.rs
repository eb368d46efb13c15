//! edge-trainer: keeps a classifier current on an edge device.
//!
//! The crate has two halves. [`engine`] is a synchronous library that loads data,
//! builds models, trains them and writes checkpoints; it knows nothing of MQTT or
//! async runtimes. The binary's subcommands (and later the daemon) drive it through
//! [`engine::RunRequest`], a stream of [`engine::RunEvent`]s and a cancel flag.

pub mod config;
pub mod engine;
pub mod report;
