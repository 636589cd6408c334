//! The replicated state machine: every node applies the same commands in the same order and
//! reaches the same `State`.
//!
//! ```text
//!   leader: validate request ─▶ Envelope{version, at_unix_ms, Command} ─▶ raft log
//!   every node:   committed entry ─▶ apply(&mut State, index, Envelope) ─▶ Applied | Rejected
//! ```
//!
//! Deterministic by construction: BTreeMaps only, no clock (the leader stamps `at_unix_ms`
//! into the envelope), no randomness, no I/O. Commands, envelopes and snapshots carry a version
//! so nodes of neighbouring versions can share a log during a rolling upgrade.
//!
//! Only coarse facts are replicated (job submitted, cancelled, worker registered or lost);
//! heartbeats and per-step progress stay in the leader's memory (DESIGN §2).

mod apply;
pub mod hostile;
mod inference;
mod types;

pub use apply::{
    apply, held_unreachable, on_spot, pick_replacement, reserving_job, spare_for, spares_of, usd_per_hour, warm_spares,
};
pub use inference::{
    ATTEMPTS_DIR, INFERENCE_BATCH_DEFAULT, INFERENCE_BATCH_MAX, INFERENCE_SHARDS_MAX, INFERENCE_URI_LEN_MAX,
    INFERENCE_WORKERS_MAX, InferenceJob, InferenceProgress, InferenceRequest, LEASE_TIMEOUT_FACTOR,
    LEASE_TIMEOUT_FIRST_MS, LEASE_TIMEOUT_MIN_MS, SHARD_FAILURES_MAX, Shard, ShardLease, ShardState, ShardStats,
    attempt_object, plan_shards,
};
pub use types::*;

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod tests;
