//! edge-trainer: keeps a classifier current on an edge device.
//!
//! The crate has two halves. [`engine`] is a synchronous library that loads data,
//! builds models, trains them and writes checkpoints; it knows nothing of MQTT or
//! async runtimes. The binary's subcommands and the [`daemon`] drive it through
//! [`engine::run::RunRequest`], an [`engine::run::EventSink`] for its
//! [`engine::run::RunEvent`]s and a cancel flag; [`config`] turns the layered
//! settings into those requests.

pub mod config;
pub mod daemon;
pub mod engine;
pub mod fleet;
pub mod outdir_lock;
pub mod plot;
pub mod report;
