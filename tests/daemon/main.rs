//! The daemon's tests, one binary (harness: libtest-mimic, so that a test whose
//! outside requirement is missing is counted as ignored, never as passed).
//!
//! The end-to-end tests run the real `edge-trainer run` against a real broker
//! (`helpers::broker`: Mosquitto when it is on PATH, else the embedded broker as
//! its own process) and subscribe as a dashboard would. The TLS tests need
//! Mosquitto (client certificates, password file, ACL) and openssl.

use std::process::ExitCode;

mod helpers;
#[path = "../support/paths.rs"]
mod paths;
#[path = "../support/trials.rs"]
mod trials;

mod daemon_broker;
mod daemon_commands;
mod daemon_crash;
mod daemon_data;
mod daemon_embedded_broker;
mod daemon_feature_cache;
mod daemon_flood;
mod daemon_full_disk;
mod daemon_measure;
mod daemon_no_broker;
mod daemon_onnx;
mod daemon_outage;
mod daemon_retention;
mod daemon_secrets;
mod daemon_sigterm;
mod daemon_soak;
mod daemon_stop;
mod daemon_tls;
mod daemon_tls_acl;
mod daemon_train;
mod fleet;
mod fuzz_commands;
mod hostile_inputs;

fn main() -> ExitCode {
    trials::run([
        daemon_broker::tests(),
        daemon_commands::tests(),
        daemon_crash::tests(),
        daemon_data::tests(),
        daemon_embedded_broker::tests(),
        daemon_feature_cache::tests(),
        daemon_flood::tests(),
        daemon_full_disk::tests(),
        daemon_measure::tests(),
        daemon_no_broker::tests(),
        daemon_onnx::tests(),
        daemon_outage::tests(),
        daemon_retention::tests(),
        daemon_secrets::tests(),
        daemon_sigterm::tests(),
        daemon_soak::tests(),
        daemon_stop::tests(),
        daemon_tls::tests(),
        daemon_tls_acl::tests(),
        daemon_train::tests(),
        fleet::tests(),
        fuzz_commands::tests(),
        hostile_inputs::tests(),
    ])
}
