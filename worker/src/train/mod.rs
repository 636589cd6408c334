//! The built-in burn trainer: data-parallel training with our own gradient exchange (DESIGN §4).
//!
//! Owns: the model ([`model`]), flat parameter/gradient buffers ([`flat`]), the optimizers
//! ([`optim`]), and the step loop ([`Trainer`]). Must not touch: collectives' internals (it only
//! calls [`Communicator`]), checkpoint storage (the caller persists [`TrainState`] from the
//! `on_step` callback of [`Trainer::run`]), data loading (it receives a [`Dataset`]).
//!
//! One step, on every rank:
//!
//! ```text
//!   cursor ─plan─▶ my rows of the epoch order ─▶ forward + cross-entropy (summed) ─▶ backward
//!     (per `batch_size` rows: `accumulate_batches` passes, their sums added)
//!     ─▶ gradients flattened in module order + [loss sum] ─▶ all_reduce_sum
//!     ─▶ divide by the step's global sample count (= mean over the global batch)
//!     ─▶ optimizer step on the flat parameters (ours: SGD+momentum / Adam) ─▶ written back
//!     ─▶ cursor advanced
//! ```
//!
//! Dividing the summed gradient by the global sample count (rather than by the world size) is
//! the same thing when every rank has `batch_size` rows, and stays exact on the short last step
//! of an epoch, where ranks have fewer (or none). The state that makes a resume bit-identical is
//! [`TrainState`]: flat parameters, optimizer state, cursor, step — no burn records involved.

pub mod backend;
pub mod export;
pub mod flat;
pub mod model;
pub mod optim;
mod trainer;

use flotilla_proto::spec::PatienceMetric;
use serde::{Deserialize, Serialize};

use crate::collective::CollectiveError;
pub use crate::collective::Communicator;
use crate::data::Cursor;
pub use crate::data::Dataset;
pub use optim::OptimizerState;
pub use trainer::{Model, Trainer};

/// Version of the [`TrainState`] layout; bumped when a field's meaning changes.
pub const TRAIN_STATE_FORMAT_VERSION: u32 = 1;

/// Why training could not start or continue.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The model cannot be built for this data (not square for a CNN, too many pool blocks...).
    #[error("model and data do not fit: {0}")]
    Shape(String),
    /// A saved state does not belong to this job, model or data.
    #[error("cannot resume from this training state: {0}")]
    Resume(String),
    /// The ranks do not start from the same state (weights, optimizer, cursor or data differ).
    #[error("ranks disagree at start-up: {0}")]
    Disagreement(String),
    /// The loss became NaN or infinite; training stops rather than continue with garbage.
    #[error("loss is {loss} at step {step}; stopping (lower train.learning_rate or check the data)")]
    NonFiniteLoss { step: u64, loss: f32 },
    /// A collective failed (a peer was lost or timed out): retry in a new gang generation.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// The communicator does not describe the gang this trainer was built for.
    #[error("communicator mismatch: {0}")]
    Communicator(String),
    /// The tensor backend failed or is not built in (e.g. `workers.gpus > 0` without `cuda`).
    #[error("tensor backend: {0}")]
    Backend(String),
    /// A bug of ours: an invariant between the layout and the module did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

impl TrainError {
    /// Whether a new gang generation may succeed where this one failed (lost peers do; a bad
    /// model, bad data or a NaN loss will fail again).
    pub fn is_retryable(&self) -> bool {
        matches!(self, TrainError::Collective(_))
    }
}

/// Everything needed to continue training bit-identically, at any world size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Where the next step starts in the global sample order.
    pub cursor: Cursor,
    /// All float parameters, flattened in module order.
    pub params: Vec<f32>,
    pub optimizer: OptimizerState,
    /// Fingerprint of the parameter shapes: refuses a state from another architecture.
    pub layout_fingerprint: u64,
    /// The job seed and the train rows the sample order was drawn with (the order is a function
    /// of both, so a resume with other values would not continue the same order).
    pub seed: u64,
    pub train_rows: u64,
    /// `train.patience`'s count, the same on every rank (absent in states from before it).
    #[serde(default)]
    pub patience: PatienceCount,
    /// With `train.keep_best`: the parameters of the best validated state (`patience`'s
    /// `best_step`), the same on every rank; empty without, or before a validation counted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub best_params: Vec<f32>,
}

/// `train.patience`'s count (early stopping), the same on every rank: the best value of the
/// watched metric so far, the step it was validated at, and the validations since then that
/// brought no better one. Part of the training state, so a checkpoint, a peer's state and a
/// live handover carry it and a preempted job counts on where it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PatienceCount {
    pub best: Option<f32>,
    pub best_step: u64,
    pub since_best: u32,
    /// The step of the newest validation counted (a resumed job does not count it twice).
    pub counted_step: u64,
}

impl PatienceCount {
    /// Counts the validation of the state after `step` whose watched metric is `value` (pure):
    /// a better one (by more than `min_delta`) becomes the best, any other adds one.
    pub fn count(&mut self, step: u64, value: f32, metric: PatienceMetric, min_delta: f32) {
        match self.best {
            Some(best) if !metric.improves(value, best, min_delta) => self.since_best += 1,
            _ => (self.best, self.best_step, self.since_best) = (Some(value), step, 0),
        }
        self.counted_step = step;
    }

    pub fn is_zero(&self) -> bool {
        *self == PatienceCount::default()
    }
}

/// Values an update carries behind its gradient, to a live handover's joiner: whether the step
/// counted a validation for `train.patience`, and its value.
pub const UPDATE_EXTRAS: usize = 2;

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Steps completed, including this one.
    pub step: u64,
    /// The epoch this step's samples came from.
    pub epoch: u64,
    /// Mean cross-entropy over the step's global batch (before the update).
    pub loss: f32,
    /// Samples in the global batch (all ranks).
    pub samples: u64,
    /// Global samples per second of this step, on this rank's clock.
    pub samples_per_s: f64,
    /// The learning rate this step's update applied (`train.lr_schedule`); 0 for a finish
    /// step, which applies none.
    pub learning_rate: f32,
    /// Some rank voted to stop after this step ([`Trainer::vote_stop`]); all ranks see it.
    pub stop_agreed: bool,
    /// The gang replaced this rank's member after this step (a live handover, see
    /// [`Handover`]): from the next step on, the joining member holds the rank; all ranks see it.
    pub replaced: Option<usize>,
}

/// The leaving side of a live handover: a member about to go (a spot notice) hands its rank to
/// a joining member without the gang stopping.
///
/// ```text
///   leaving rank: state of step s ──▶ joiner; then every step's update (the summed, scaled
///                 gradient the optimizer applies) ──▶ joiner, which replays it (Trainer::replay)
///   joiner:       dials the leaving rank's neighbours (RingCommunicator::join_running)
///   every step's all-reduce carries the votes: the leaving rank counts once its joiner caught
///   up; its neighbours count the joiner's proven links. When both hold, every rank sees the
///   same step T: the leaving rank forwards T's update marked last and leaves; the neighbours
///   switch their links to the joiner; the joiner applies T and steps T+1 with the gang
/// ```
///
/// The survivors never stop: the swap costs them one step's wait for the joiner's first
/// step, and the result is bit-identical to a run without the handover (the joiner applies
/// the very updates the gang applied).
pub trait Handover: Send {
    /// Whether the joining member holds the state and has applied every forwarded update but
    /// at most the newest one (it then catches up within the swap's step).
    fn caught_up(&self) -> bool;
    /// Forwards the update of `step`; the first one carries [`Trainer::replay_checksum`] after
    /// it, for the joiner to check its replay against; `last` marks the step after which the
    /// joiner takes this rank's place. Must not block the step loop (an error gives the
    /// handover up).
    fn forward(&mut self, step: u64, gradient: Vec<f32>, checksum: Option<u64>, last: bool) -> Result<(), String>;
}

/// The predicted class of a row of logits (or probabilities): the first index of the highest
/// value. Validation and batch inference both use it, so their accuracies agree on the same rows.
pub fn argmax(values: &[f32]) -> usize {
    let first_best = |(bi, bv): (usize, f32), (i, &v): (usize, &f32)| if v > bv { (i, v) } else { (bi, bv) };
    values.iter().enumerate().fold((0, f32::NEG_INFINITY), first_best).0
}

/// Quality on a held-out set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    /// Fraction of rows whose highest logit is the label, in `0..=1`.
    pub val_accuracy: f64,
    /// Mean cross-entropy.
    pub val_loss: f64,
    pub rows: usize,
}

#[cfg(test)]
mod patience_tests {
    use super::*;

    #[test]
    fn patience_counts_validations_since_the_best() {
        let mut count = PatienceCount::default();
        count.count(10, 0.5, PatienceMetric::ValLoss, 0.0);
        assert_eq!(count, PatienceCount { best: Some(0.5), best_step: 10, since_best: 0, counted_step: 10 });
        count.count(20, 0.5, PatienceMetric::ValLoss, 0.0);
        count.count(30, 0.49, PatienceMetric::ValLoss, 0.05);
        let expected = PatienceCount { best: Some(0.5), best_step: 10, since_best: 2, counted_step: 30 };
        assert_eq!(count, expected, "equal, or not by the margin");
        count.count(40, 0.4, PatienceMetric::ValLoss, 0.05);
        assert_eq!(count, PatienceCount { best: Some(0.4), best_step: 40, since_best: 0, counted_step: 40 });
        let mut accuracy = PatienceCount::default();
        accuracy.count(5, 0.8, PatienceMetric::ValAccuracy, 0.0);
        accuracy.count(10, 0.7, PatienceMetric::ValAccuracy, 0.0);
        assert_eq!((accuracy.best, accuracy.since_best), (Some(0.8), 1), "higher is better");
    }
}
