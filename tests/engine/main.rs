//! The engine's tests, one binary: numerical parity with PyTorch (architectures,
//! optimisers, the plateau scheduler) and fuzzed inputs (data files, checkpoints,
//! resume states, configs). They need nothing outside the repository.

#[path = "../support/paths.rs"]
mod paths;

mod arch_parity;
mod configs;
mod feature_cache;
mod fuzz_inputs;
mod image_stream;
mod optim_parity;
mod plateau_parity;
mod tensors;
