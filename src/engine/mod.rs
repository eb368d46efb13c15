//! The training engine: data, models, optimisers, schedules, evaluation,
//! checkpoints and the training loop. Synchronous and free of any transport:
//! drivers hand it a [`run::RunRequest`] and a [`run::CancelFlag`] and receive
//! [`run::RunEvent`]s through a [`run::EventSink`]. Failures stay typed
//! ([`error::RunError`]) and carry a machine-readable [`error::FailureKind`].

pub mod budget;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod early_stop;
pub mod error;
pub mod eval;
pub mod export;
pub mod fsutil;
pub mod kernels;
pub mod loss;
pub mod model;
pub mod optim;
pub mod predict;
pub mod promote;
pub mod resume;
pub mod run;
pub mod schedule;
pub mod st_decode;
pub mod trainer;
