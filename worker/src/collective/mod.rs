//! Collectives: how the ranks of one gang exchange gradients.
//!
//! One trait, [`Communicator`], with blocking operations that each end within the timeout given
//! at construction: a dead or stalled peer makes every other rank fail with
//! [`CollectiveError::Timeout`] or [`CollectiveError::PeerLost`] within seconds, never hang.
//! Backends: [`local::LocalCommunicator`] (world size 1), [`ring`] (TCP ring all-reduce on
//! CPUs), and NCCL through cudarc behind the `cuda` feature.
//!
//! Results are deterministic: every rank gets bit-identical sums, and the same inputs give the
//! same sums from run to run (a fixed reduction order, independent of timing).

pub mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod port;
pub mod ring;

use std::time::Duration;

/// Default time one collective operation may take before the gang is declared broken.
pub const OPERATION_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A peer did not answer within the operation timeout.
    #[error("collective {operation} timed out after {timeout:?} waiting for rank {peer}")]
    Timeout { operation: &'static str, peer: usize, timeout: Duration },
    /// A peer closed its connection or sent something that is not part of the protocol.
    #[error("rank {peer} was lost during {operation}: {reason}")]
    PeerLost { operation: &'static str, peer: usize, reason: String },
    /// The gang could not be formed (connect/accept failed, ranks disagree on the world).
    #[error("rendezvous failed: {0}")]
    Rendezvous(String),
    /// The call itself is wrong (buffer lengths differ across ranks, root out of range).
    #[error("invalid collective call: {0}")]
    Invalid(String),
    /// The backend cannot run here (no CUDA driver, no NCCL library).
    #[error("collective backend unavailable: {0}")]
    Unavailable(String),
}

/// The collective operations a data-parallel trainer needs.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buffer` on every rank with the element-wise sum over all ranks. Every rank
    /// must pass a buffer of the same length.
    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError>;
    /// Replaces `buffer` on every rank with `root`'s buffer.
    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> Result<(), CollectiveError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
    /// For the vote on taking a member into the running gang in place of one that leaves
    /// ([`crate::train::Handover`]): the rank of each joining member's proven link to this rank
    /// (one entry per link). Backends that cannot take a member in hold none, so no swap is
    /// ever agreed on them.
    fn joining_links(&mut self) -> Vec<usize> {
        Vec::new()
    }
    /// The gang agreed to replace `rank`'s member after the collective that carried the vote:
    /// from the next collective on, this rank's links to `rank` are the joining member's.
    fn admit(&mut self, rank: usize) -> Result<(), CollectiveError> {
        Err(CollectiveError::Invalid(format!(
            "this backend cannot take a member into a running gang (rank {rank} was to be replaced)"
        )))
    }
}
