//! flotilla-worker: the data plane, run by every worker agent.
//!
//! Owns (DESIGN §4, §5, §7): the collectives (`collective`: TCP ring on CPUs, NCCL through
//! cudarc on GPUs), the data readers and the global sample order (`data`), the burn trainer
//! (`train`), the checkpoint format (`checkpoint`), the agent's pieces (`agent`, `imds`) and
//! batch inference (`infer`).
//!
//! Must not import coordinator crates: it talks to the control plane only through
//! `flotilla-proto`.

pub mod agent;
pub mod checkpoint;
pub mod collective;
pub mod data;
pub mod gpu;
pub mod history;
pub mod identity;
pub mod imds;
pub mod infer;
pub mod joblog;
pub mod metrics;
pub mod train;
pub mod workdir;

/// The wall clock in unix ms (0 before 1970): progress points, notice deadlines.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
