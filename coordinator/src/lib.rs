//! flotilla-coordinator: the control plane's I/O shell around `flotilla-core`.
//!
//! Will own (DESIGN §2, §6, §8): the raft-rs `RawNode` driver and its write-ahead log,
//! the peer transport, the gRPC services of `flotilla-proto` (jobs, cluster, registry,
//! inference), the HTTP dashboard and `/metrics`, and the capacity providers (local, ec2, sim).
//!
//! Must not own decisions: what to schedule, scale or charge is computed by `flotilla-core`
//! from inputs; this crate feeds it time, messages and cloud answers and carries out what it
//! returns.

pub mod api;
pub mod autoscaling;
pub mod confine;
pub mod dashboard;
pub mod history;
pub mod inference;
pub mod leases;
pub mod logs;
pub mod metrics;
pub mod ports;
pub mod progress;
pub mod provider;
pub mod raft;
pub mod replace;
pub mod retention;
pub mod scheduling;
pub mod server;
#[cfg(test)]
mod testing;
