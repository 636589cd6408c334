//! Job specs: the TOML a user writes (DESIGN §3), parsed and validated into typed structs.
//!
//! ```text
//!   job.toml ──toml──▶ RawJobSpec ──validate()──▶ JobSpec ──serde──▶ canonical TOML / JSON
//!            (unknown fields refused)   (defaults filled, every range checked, all errors at once)
//! ```
//!
//! A `JobSpec` is always valid: the only way to get one from outside is [`JobSpec::from_toml_str`]
//! or [`JobSpec::validated`], and its canonical TOML (`to_toml`) parses back to the same value.
//! The limits below are the contract; each error names the field, the value and the range.

pub mod overrides;
mod raw;
pub mod run;
pub mod uri;
mod validate;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use overrides::Override;
pub use run::{NoticeSignal, RunSpec};
pub use uri::{DataUri, SyntheticKind, SyntheticSpec, UriError};

/// Longest spec file accepted, in bytes. A spec is a few hundred bytes; this bounds parsing work
/// on input that arrives over the API.
pub const SPEC_LEN_MAX_BYTES: usize = 64 * 1024;
/// Job and model names: 1 to this many characters (they become object-store prefixes and
/// cloud tags, whose values are limited to 63 characters on some providers).
pub const NAME_LEN_MAX: usize = 63;
/// Priorities lie in `-PRIORITY_ABS_MAX ..= PRIORITY_ABS_MAX`; higher runs first.
pub const PRIORITY_ABS_MAX: i64 = 1000;
/// Hidden layers of an MLP at most.
pub const MLP_LAYERS_MAX: usize = 16;
/// Units in one hidden layer at most.
pub const MLP_WIDTH_MAX: i64 = 65_536;
/// Convolution blocks of a CNN at most (each halves the image; 28 px allows 4).
pub const CNN_BLOCKS_MAX: usize = 4;
/// Channels in one convolution block at most.
pub const CNN_CHANNELS_MAX: i64 = 1024;
/// Parameters of a built-in model at most: 2^30, 4 GiB of f32 weights (training holds at least
/// four times that: the weights, their gradients and Adam's two moments). The layers' limits
/// alone allowed 8.6 G (`hidden = [65536, 65536, 65536]`), which aborted in an allocation.
pub const MODEL_PARAMETERS_MAX: u64 = 1 << 30;
/// Largest validation fraction: at least 10% of the data must remain for training.
pub const VALIDATION_FRACTION_MAX: f64 = 0.9;
pub const EPOCHS_MAX: i64 = 100_000;
pub const STEPS_MAX: i64 = 1_000_000_000;
/// Per-worker batch size at most.
pub const BATCH_SIZE_MAX: i64 = 65_536;
/// Learning rates lie in (0, LEARNING_RATE_MAX].
pub const LEARNING_RATE_MAX: f64 = 10.0;
/// Workers in one gang at most.
pub const WORKERS_MAX: i64 = 1024;
/// GPUs per worker at most (the largest instances carry 8, some 16).
pub const GPUS_PER_WORKER_MAX: i64 = 16;
/// Instance types one job may list at most.
pub const INSTANCE_TYPES_MAX: usize = 32;
/// Price cap per instance at most, USD per hour (the largest GPU instances cost ~100 $/h).
pub const PRICE_USD_PER_HOUR_MAX: f64 = 1_000.0;
/// Budget of one job at most, USD.
pub const BUDGET_USD_MAX: f64 = 10_000_000.0;
/// A deadline at most this many hours after submission (a year).
pub const DEADLINE_H_MAX: f64 = 8_760.0;
pub const MAX_FAILURES_MAX: i64 = 1_000;
/// Warm spares one job may keep at most.
pub const SPARES_MAX: i64 = 16;
pub const CHECKPOINT_EVERY_STEPS_MAX: i64 = 10_000_000;
/// `train.validate_every_steps` at most (as a checkpoint's cadence).
pub const VALIDATE_EVERY_STEPS_MAX: i64 = CHECKPOINT_EVERY_STEPS_MAX;
/// Checkpoints kept at most.
pub const CHECKPOINT_KEEP_MAX: i64 = 1_000;

/// The fields `flotilla resume` may change ([`JobSpec::unresumable_changes`]): how long to
/// train, and the job's place, capacity, checkpoints and output; not what it trains.
pub const RESUMABLE_FIELDS: &str = "priority, train.epochs or train.steps, train.validate_every_steps, \
     train.stop_at_val_accuracy and stop_at_val_loss, workers, capacity, checkpoint and output";
/// `train.stop_at_val_loss` at most.
pub const STOP_AT_VAL_LOSS_MAX: f64 = 1e6;
/// `train.clip_grad_norm` at most.
pub const CLIP_GRAD_NORM_MAX: f64 = 1e6;
/// `train.patience` at most (validations).
pub const PATIENCE_MAX: i64 = 10_000;
/// `train.accumulate_batches` at most.
pub const ACCUMULATE_BATCHES_MAX: i64 = 1024;

/// A validated job spec, with every default filled in.
///
/// A job either trains a built-in model (`model` and `data` set, `run` absent) or runs the
/// user's own program (`run` set, `model` and `data` absent): see [`JobSpec::built_in`] and
/// [`JobSpec::command`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    /// Higher runs first; FIFO within one priority. A waiting job may stop running jobs of
    /// lower priority (`flotilla_core::scheduler::schedule_preempting`).
    pub priority: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataSpec>,
    /// A command job: the user's program instead of the built-in trainer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<RunSpec>,
    /// The built-in trainer's settings (defaults only, for a command job).
    pub train: TrainSpec,
    pub workers: WorkersSpec,
    pub capacity: CapacitySpec,
    pub checkpoint: CheckpointSpec,
    pub output: OutputSpec,
}

/// The architecture to train, chosen by `model.kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelSpec {
    /// A multi-layer perceptron with ReLU between the `hidden` layers.
    Mlp { hidden: Vec<u32> },
    /// A small convolutional net for 28x28 (or 8x8) single-channel images: one 3x3
    /// conv + ReLU + 2x2 max-pool block per entry of `channels`, then a linear classifier.
    Cnn { channels: Vec<u32> },
}

impl ModelSpec {
    pub const KINDS: [&'static str; 2] = ["mlp", "cnn"];

    pub fn kind(&self) -> &'static str {
        match self {
            ModelSpec::Mlp { .. } => "mlp",
            ModelSpec::Cnn { .. } => "cnn",
        }
    }
}

/// One line in the spec's own words, the way refusals and `flotilla list` name an architecture:
/// `mlp hidden = [256, 128]`, `cnn channels = [16, 32]`.
impl std::fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSpec::Mlp { hidden } => write!(f, "mlp hidden = {hidden:?}"),
            ModelSpec::Cnn { channels } => write!(f, "cnn channels = {channels:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// One sample per line: the label, then the features. Optionally gzip-compressed.
    Csv,
    /// MNIST's IDX files (an images file; labels in the sibling `*labels*` file).
    Idx,
    /// Generated from `synthetic:` parameters.
    Synthetic,
}

impl DataFormat {
    pub const NAMES: [&'static str; 3] = ["csv", "idx", "synthetic"];
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataFormat::Csv => "csv",
            DataFormat::Idx => "idx",
            DataFormat::Synthetic => "synthetic",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSpec {
    pub train: DataUri,
    /// A separate validation set; when absent, `validation_fraction` of `train` is held out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<DataUri>,
    pub format: DataFormat,
    /// Fraction of `train` held out for validation (0 when `validation` is set).
    pub validation_fraction: f64,
}

/// How long to train: whole passes over the training split, or optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainLength {
    Epochs(u32),
    Steps(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "optimizer", rename_all = "lowercase")]
pub enum OptimizerSpec {
    Sgd { momentum: f64 },
    Adam,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    #[serde(flatten)]
    pub length: TrainLength,
    /// Samples per worker per forward and backward pass; a step takes `accumulate_batches` of
    /// them per worker: the global batch is `batch_size x accumulate_batches x world size`.
    pub batch_size: u32,
    /// Gradient accumulation: each step's gradient is summed over this many batches of
    /// `batch_size` per worker before the one all-reduce and optimizer update (the memory of
    /// one batch, the arithmetic of their sum); 1: none.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub accumulate_batches: u32,
    #[serde(flatten)]
    pub optimizer: OptimizerSpec,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Seeds weight initialisation and the data order (a pure function of seed and epoch).
    pub seed: u64,
    /// Start from a registered model's weights instead of the seeded ones (`NAME`, its newest
    /// version, `NAME@VERSION` or `NAME@ALIAS`; the same architecture): fine-tuning. The
    /// coordinator resolves it when the job is submitted; a resume starts from the job's own
    /// checkpoint instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
    /// Rank 0 evaluates the validation set every this many steps while the job trains (its
    /// metrics go to the job's history, status and log); 0: only when it finishes. Evaluation
    /// reads the weights and changes nothing, so the trained weights are the same either way.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub validate_every_steps: u64,
    /// The job finishes as soon as a validation while it trains reaches this accuracy (or
    /// [`TrainSpec::stop_at_val_loss`]), before its length: at the step validated, whose
    /// weights are the model. Needs `validate_every_steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_at_val_accuracy: Option<f64>,
    /// As `stop_at_val_accuracy`, for a validation loss at most this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_at_val_loss: Option<f64>,
    /// How the learning rate changes over the job's steps after the warm-up
    /// ([`TrainSpec::learning_rate_at`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lr_schedule: LrSchedule,
    /// The learning rate rises linearly from `learning_rate / warmup_steps` to `learning_rate`
    /// over the first this many steps; 0: none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub warmup_steps: u64,
    /// Where a `linear` or `cosine` schedule ends (it starts at `learning_rate`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_learning_rate: f64,
    /// Each step's averaged gradient is scaled down to this L2 norm (over all parameters) when
    /// it is longer, as PyTorch's `clip_grad_norm_`: every rank clips the same all-reduced
    /// gradient, so the ranks stay identical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
    /// The job finishes once this many validations in a row (`validate_every_steps`) bring no
    /// better `patience_metric` than the best so far (by more than `patience_min_delta`): early
    /// stopping. 0: off. The count lives in the training state (every rank's, checkpointed), so
    /// a preempted job counts on where it stopped.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub patience: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub patience_metric: PatienceMetric,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub patience_min_delta: f64,
    /// The job's model (exported, registered, its final metrics) is its best validated state by
    /// `patience_metric` (beyond `patience_min_delta`), not its last: every rank keeps the
    /// parameters of the best validation in its training state (a checkpoint's `best` part).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub keep_best: bool,
}

/// What `train.patience` and `train.keep_best` watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatienceMetric {
    /// Lower is better.
    #[default]
    ValLoss,
    /// Higher is better.
    ValAccuracy,
}

impl PatienceMetric {
    pub const NAMES: [&'static str; 2] = ["val_loss", "val_accuracy"];
    const ALL: [PatienceMetric; 2] = [PatienceMetric::ValLoss, PatienceMetric::ValAccuracy];

    pub fn name(self) -> &'static str {
        Self::NAMES[Self::ALL.iter().position(|m| *m == self).expect("every metric is listed")]
    }

    pub fn from_name(name: &str) -> Option<PatienceMetric> {
        Self::NAMES.iter().position(|n| *n == name).map(|i| Self::ALL[i])
    }

    /// This metric of a validation.
    pub fn of(self, val_accuracy: f64, val_loss: f64) -> f64 {
        match self {
            PatienceMetric::ValLoss => val_loss,
            PatienceMetric::ValAccuracy => val_accuracy,
        }
    }

    /// Whether `value` is better than `best` by more than `min_delta` (pure).
    pub fn improves(self, value: f32, best: f32, min_delta: f32) -> bool {
        match self {
            PatienceMetric::ValLoss => value < best - min_delta,
            PatienceMetric::ValAccuracy => value > best + min_delta,
        }
    }
}

/// The learning rate's course after the warm-up (`train.lr_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// `learning_rate` throughout.
    #[default]
    Constant,
    /// From `learning_rate` down to `min_learning_rate` in a straight line over the job's steps.
    Linear,
    /// From `learning_rate` down to `min_learning_rate` along half a cosine (SGDR without
    /// restarts, as PyTorch's `CosineAnnealingLR` over the whole run).
    Cosine,
}

impl LrSchedule {
    pub const NAMES: [&'static str; 3] = ["constant", "linear", "cosine"];
    const ALL: [LrSchedule; 3] = [LrSchedule::Constant, LrSchedule::Linear, LrSchedule::Cosine];

    pub fn name(self) -> &'static str {
        Self::NAMES[Self::ALL.iter().position(|s| *s == self).expect("every schedule is listed")]
    }

    pub fn from_name(name: &str) -> Option<LrSchedule> {
        Self::NAMES.iter().position(|n| *n == name).map(|i| Self::ALL[i])
    }
}

impl TrainSpec {
    /// Whether the gang counts rank 0's validations (the count is training state):
    /// `train.patience` or `train.keep_best` watch them.
    pub fn counts_validations(&self) -> bool {
        self.patience > 0 || self.keep_best
    }

    /// Whether a validation may end the job (a target, or patience) or be its model
    /// (`keep_best`): then a resumed generation judges the one of the step it resumes at.
    pub fn judges_validations(&self) -> bool {
        self.stop_at_val_accuracy.is_some() || self.stop_at_val_loss.is_some() || self.counts_validations()
    }

    /// Samples per worker per step: `batch_size` times `accumulate_batches`.
    pub fn samples_per_worker_step(&self) -> u64 {
        u64::from(self.batch_size) * u64::from(self.accumulate_batches.max(1))
    }

    /// The target a validation reached (`train.stop_at_val_accuracy` or `stop_at_val_loss`),
    /// named with the value, or `None` (pure).
    pub fn target_reached(&self, val_accuracy: f64, val_loss: f64) -> Option<String> {
        if let Some(target) = self.stop_at_val_accuracy.filter(|t| val_accuracy >= *t) {
            return Some(format!("train.stop_at_val_accuracy = {target} (val_accuracy {val_accuracy:.4})"));
        }
        let target = self.stop_at_val_loss.filter(|t| val_loss <= *t)?;
        Some(format!("train.stop_at_val_loss = {target} (val_loss {val_loss:.4})"))
    }

    /// The learning rate of the `update`-th optimizer step (from 1) of a job of `total_steps`
    /// (pure): `learning_rate x update / warmup_steps` during the warm-up, then the schedule
    /// from `learning_rate` towards `min_learning_rate` over the steps after it. The last
    /// update's rate is still above `min_learning_rate` (no step is wasted at the floor). A
    /// constant schedule without warm-up is `learning_rate` exactly.
    ///
    /// `total_steps` is the trainer's: `train.steps`, or for epochs the steps done plus those
    /// left at the gang's size, so an elastic resize re-plans the rest of the curve.
    pub fn learning_rate_at(&self, update: u64, total_steps: u64) -> f64 {
        let (peak, warmup) = (self.learning_rate, self.warmup_steps);
        if update <= warmup {
            return peak * update as f64 / warmup as f64;
        }
        let decay_steps = total_steps.saturating_sub(warmup).max(1);
        let progress = ((update - warmup - 1) as f64 / decay_steps as f64).min(1.0);
        let floor = self.min_learning_rate;
        match self.lr_schedule {
            LrSchedule::Constant => peak,
            LrSchedule::Linear => floor + (peak - floor) * (1.0 - progress),
            LrSchedule::Cosine => floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }

    /// Whether the learning rate depends on the job's length (a decaying schedule): then a
    /// resume may not change the length.
    pub fn decays_over_length(&self) -> bool {
        self.lr_schedule != LrSchedule::Constant
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkersSpec {
    /// The job runs only when this many workers are assigned together (gang scheduling).
    pub min: u32,
    /// With `max > min` the job is elastic: it grows up to `max` when capacity allows.
    pub max: u32,
    /// GPUs per worker; 0 trains on CPUs.
    pub gpus: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacitySpec {
    pub spot: bool,
    /// When spot capacity is refused, buy on-demand instead of waiting.
    pub on_demand_fallback: bool,
    /// Allowed instance types, to buy and to run on ([`instance_type_allowed`]); empty: any.
    pub instance_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_price_usd_per_hour: Option<f64>,
    /// The job stops, checkpointed, before it would spend more than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_usd: Option<f64>,
    /// Hours after submission by which the job should be done. As its slack runs out (remaining
    /// work at the observed pace, a restart and one checkpoint interval no longer fit) it moves
    /// from spot to on-demand capacity, checkpointing first; `None`: no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_h: Option<f64>,
    /// A gang may mix instance types (of `instance_types`) within one zone, and span zones
    /// when one zone cannot hold it, so the job does not wait for one pool to have them all.
    /// Off: a gang's workers share one pool (the ring runs at its slowest link).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mixed_types: bool,
    /// Failures without progress before the job is marked Failed (preemptions never count).
    pub max_failures: u32,
    /// Idle workers the autoscaler keeps in a running job's pool beyond its gang (warm spares):
    /// a hard loss or a notice regroups at once with one instead of waiting for an instance to
    /// boot. They cost what they run for; 0: none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub spares: u32,
}

/// The instance type a worker reports when it knows none: the local provider's workers, and a
/// worker started without an instance metadata endpoint.
pub const LOCAL_INSTANCE_TYPE: &str = "local";

/// Whether a worker of `instance_type` may run a job that allows `allowed`
/// (`capacity.instance_types`): any type when the list is empty, and a worker that knows no type
/// ([`LOCAL_INSTANCE_TYPE`]) whatever the list says, so a spec written for the cloud also runs
/// on a local cluster.
pub fn instance_type_allowed(allowed: &[String], instance_type: &str) -> bool {
    allowed.is_empty() || instance_type == LOCAL_INSTANCE_TYPE || allowed.iter().any(|t| t == instance_type)
}

/// Whether a worker on an instance of `instance_type` that costs `usd_per_hour` (0: no instance
/// record) may run a job that allows `instance_types` at most `max_usd_per_hour` each
/// (`capacity.instance_types`, `capacity.max_price_usd_per_hour`): the job pays what its
/// workers' instances cost. The autoscaler's idle capacity and a handover's replacement judge by
/// it; the scheduler applies the same two tests apart (types per pool, the price per worker).
pub fn instance_allowed(
    instance_types: &[String],
    max_usd_per_hour: Option<f64>,
    instance_type: &str,
    usd_per_hour: f64,
) -> bool {
    instance_type_allowed(instance_types, instance_type) && max_usd_per_hour.is_none_or(|cap| usd_per_hour <= cap)
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointSpec {
    pub every_steps: u64,
    /// Newest verified checkpoints kept; the newest one is never deleted.
    pub keep: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputSpec {
    /// Model-registry name the finished model is published under (default: the job name).
    pub register_as: String,
}

/// One problem with one field. `field` is the dotted path as written in TOML (`workers.min`).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a spec was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    /// Not TOML, an unknown field, or a value of the wrong type. The message carries the line.
    #[error("job spec is not valid TOML for this format: {0}")]
    Syntax(String),
    /// Well-formed, but values are missing or out of range. Every problem found is listed.
    #[error("job spec is invalid:\n{}", list(.0))]
    Invalid(Vec<FieldError>),
}

fn list(errors: &[FieldError]) -> String {
    errors.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n")
}

impl SpecError {
    /// A spec over [`SPEC_LEN_MAX_BYTES`]: `field` says which text, `size` how large it is.
    fn too_large(field: &str, size: String) -> SpecError {
        SpecError::Invalid(vec![FieldError {
            field: field.into(),
            message: format!("{size}; a spec may have at most {SPEC_LEN_MAX_BYTES}"),
        }])
    }

    /// The fields this error is about (empty for syntax errors).
    pub fn fields(&self) -> Vec<&str> {
        match self {
            SpecError::Syntax(_) => Vec::new(),
            SpecError::Invalid(errors) => errors.iter().map(|e| e.field.as_str()).collect(),
        }
    }
}

/// The error of asking a job for a built-in model or data it does not have (a command job).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job `{0}` runs a command ([run]); it has no built-in model or data")]
pub struct NotBuiltIn(pub String);

impl JobSpec {
    /// The user's program, for a command job.
    pub fn command(&self) -> Option<&RunSpec> {
        self.run.as_ref()
    }

    /// The built-in model and data, or why there are none (a command job).
    pub fn built_in(&self) -> Result<(&ModelSpec, &DataSpec), NotBuiltIn> {
        match (&self.run, &self.model, &self.data) {
            (None, Some(model), Some(data)) => Ok((model, data)),
            _ => Err(NotBuiltIn(self.name.clone())),
        }
    }

    /// Parses and validates a TOML spec. Relative data paths stay relative; see
    /// [`JobSpec::resolve_relative_paths`].
    pub fn from_toml_str(text: &str) -> Result<JobSpec, SpecError> {
        if text.len() > SPEC_LEN_MAX_BYTES {
            return Err(SpecError::too_large("(file)", format!("is {} bytes", text.len())));
        }
        let raw: raw::RawJobSpec = toml::from_str(text).map_err(|e| SpecError::Syntax(e.to_string()))?;
        validate::validate(raw)
    }

    /// [`JobSpec::from_toml_str`] with `overrides` (`--set FIELD=VALUE`) applied to the file's
    /// fields before it is validated ([`overrides`]).
    pub fn from_toml_str_with(text: &str, overrides: &[Override]) -> Result<JobSpec, SpecError> {
        if overrides.is_empty() {
            return Self::from_toml_str(text);
        }
        if text.len() > SPEC_LEN_MAX_BYTES {
            return Err(SpecError::too_large("(file)", format!("is {} bytes", text.len())));
        }
        validate::validate(overrides::apply_all(text, overrides)?)
    }

    /// Re-checks a spec that arrived from elsewhere (the API, a snapshot) with the same
    /// validator as a file, reading its fields as the canonical TOML would give them (without
    /// writing and parsing TOML: a property test holds the two to the same verdicts). Its text
    /// (names, URIs, the command and its environment) has the file's size limit.
    pub fn validated(self) -> Result<JobSpec, SpecError> {
        let raw = raw::RawJobSpec::of(&self)?;
        let bytes = raw.text_bytes();
        if bytes > SPEC_LEN_MAX_BYTES {
            return Err(SpecError::too_large("(spec)", format!("holds {bytes} bytes of text")));
        }
        validate::validate(raw)
    }

    /// What a resumed job's `new` spec changes of this one that a resume cannot change: the
    /// fields that make what its checkpoint holds (name, model, data, program, and how it
    /// trains, but for its length). Empty when `new` changes only [`RESUMABLE_FIELDS`].
    pub fn unresumable_changes(&self, new: &JobSpec) -> Vec<&'static str> {
        // Every field named: one added to the spec must be sorted into one list or the other.
        let JobSpec { name, priority: _, model, data, run, train, workers: _, capacity: _, checkpoint: _, output: _ } =
            new;
        let same_training = TrainSpec {
            length: self.train.length,
            validate_every_steps: self.train.validate_every_steps,
            stop_at_val_accuracy: self.train.stop_at_val_accuracy,
            stop_at_val_loss: self.train.stop_at_val_loss,
            ..train.clone()
        } == self.train;
        [
            (*name == self.name, "name"),
            (*model == self.model, "model"),
            (*data == self.data, "data"),
            (*run == self.run, "run"),
            (same_training, "train (but for its length, validation and targets)"),
        ]
        .into_iter()
        .filter(|(same, _)| !same)
        .map(|(_, field)| field)
        .collect()
    }

    /// The canonical TOML form: every default written out, fields in a fixed order.
    pub fn to_toml(&self) -> String {
        if self.run.is_none() {
            return toml::to_string(self).expect("a JobSpec holds only TOML-representable values");
        }
        // A command job has no [train] table (the validator refuses one): leave the defaults out.
        let mut table = toml::Table::try_from(self).expect("a JobSpec holds only TOML-representable values");
        table.remove("train");
        toml::to_string(&table).expect("a table of TOML values")
    }

    /// Makes every relative data path (and a command job's workdir) absolute under `base_dir`
    /// (the spec file's folder).
    pub fn resolve_relative_paths(&mut self, base_dir: &str) {
        if let Some(workdir) = self.run.as_mut().and_then(|r| r.workdir.as_mut())
            && !workdir.starts_with('/')
            && !run::is_packed_workdir(workdir)
        {
            let joined = std::path::Path::new(base_dir).join(workdir.as_str());
            *workdir = joined.to_string_lossy().into_owned();
        }
        if let Some(data) = &mut self.data {
            data.train = data.train.resolve_relative(base_dir);
            if let Some(validation) = &data.validation {
                data.validation = Some(validation.resolve_relative(base_dir));
            }
        }
    }

    /// The data URIs this job names, with their fields (none for a command job).
    pub fn data_uris(&self) -> Vec<(&'static str, &DataUri)> {
        let Some(data) = &self.data else { return Vec::new() };
        let mut out = vec![("data.train", &data.train)];
        out.extend(data.validation.as_ref().map(|v| ("data.validation", v)));
        out
    }

    /// Data URIs that are still relative paths (a coordinator refuses such a spec: it cannot
    /// know what they were relative to).
    pub fn unresolved_paths(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        for (field, uri) in self.data_uris() {
            if !uri.is_resolved() {
                out.push(FieldError {
                    field: field.into(),
                    message: format!(
                        "`{uri}` is a relative path, which only the CLI can resolve; submit with \
                         `flotilla submit` or use an absolute path, file://, s3:// or synthetic:"
                    ),
                });
            }
        }
        if let Some(workdir) = self.run.as_ref().and_then(|r| r.workdir.as_deref())
            && !run::is_packed_workdir(workdir)
        {
            out.push(FieldError {
                field: "run.workdir".into(),
                message: format!(
                    "`{workdir}` is a local folder, which only the CLI can pack; submit with `flotilla submit` \
                     (it uploads the folder and names the packed archive here)"
                ),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests;
