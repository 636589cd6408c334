//! The job spec exactly as a user wrote it: every field optional, unknown fields refused.
//!
//! Integers are read as `i64` and floats as `f64` so that out-of-range values reach
//! `validate` (which names the field and the allowed range) instead of failing inside serde
//! with a message about Rust types. Nothing here has defaults: those live in `validate`.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJobSpec {
    pub name: Option<String>,
    pub priority: Option<i64>,
    pub model: Option<RawModel>,
    pub data: Option<RawData>,
    pub train: Option<RawTrain>,
    pub workers: Option<RawWorkers>,
    pub capacity: Option<RawCapacity>,
    pub checkpoint: Option<RawCheckpoint>,
    pub output: Option<RawOutput>,
    pub run: Option<RawRun>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRun {
    pub command: Option<Vec<String>>,
    pub workdir: Option<String>,
    pub procs_per_worker: Option<i64>,
    pub notice_signal: Option<String>,
    pub env: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub kind: Option<String>,
    pub hidden: Option<Vec<i64>>,
    pub channels: Option<Vec<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawData {
    pub train: Option<String>,
    pub validation: Option<String>,
    pub format: Option<String>,
    pub validation_fraction: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTrain {
    pub epochs: Option<i64>,
    pub steps: Option<i64>,
    pub batch_size: Option<i64>,
    pub accumulate_batches: Option<i64>,
    pub optimizer: Option<String>,
    pub learning_rate: Option<f64>,
    pub momentum: Option<f64>,
    pub weight_decay: Option<f64>,
    pub seed: Option<i64>,
    pub init_from: Option<String>,
    pub validate_every_steps: Option<i64>,
    pub stop_at_val_accuracy: Option<f64>,
    pub stop_at_val_loss: Option<f64>,
    pub lr_schedule: Option<String>,
    pub warmup_steps: Option<i64>,
    pub min_learning_rate: Option<f64>,
    pub clip_grad_norm: Option<f64>,
    pub patience: Option<i64>,
    pub patience_metric: Option<String>,
    pub patience_min_delta: Option<f64>,
    pub keep_best: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWorkers {
    pub min: Option<i64>,
    pub max: Option<i64>,
    pub gpus: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCapacity {
    pub spot: Option<bool>,
    pub on_demand_fallback: Option<bool>,
    pub instance_types: Option<Vec<String>>,
    pub max_price_usd_per_hour: Option<f64>,
    pub budget_usd: Option<f64>,
    pub deadline_h: Option<f64>,
    pub mixed_types: Option<bool>,
    pub max_failures: Option<i64>,
    pub spares: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCheckpoint {
    pub every_steps: Option<i64>,
    pub keep: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutput {
    pub register_as: Option<String>,
}

impl RawJobSpec {
    /// The spec as its canonical TOML would read back ([`super::JobSpec::to_toml`]: every field
    /// written out, a command job without `[train]`), without the TOML: a spec that comes from
    /// the API is checked by the same validator as a file at a fraction of the cost (the TOML
    /// round trip was 18% of the leader's CPU under a stream of submissions). An unsigned value
    /// beyond `i64` (the API's `uint64` fields) is refused here, naming the field.
    pub(super) fn of(spec: &super::JobSpec) -> Result<RawJobSpec, super::SpecError> {
        use super::{ModelSpec, OptimizerSpec, TrainLength};
        let mut too_large = Vec::new();
        let mut int = |field: &str, value: u64, max: i64| {
            i64::try_from(value).unwrap_or_else(|_| {
                too_large.push(super::FieldError {
                    field: field.to_string(),
                    message: format!("{value} is out of range; allowed: up to {max}"),
                });
                0
            })
        };
        let widths = |w: &[u32]| Some(w.iter().map(|&w| i64::from(w)).collect());
        let model = spec.model.as_ref().map(|m| match m {
            ModelSpec::Mlp { hidden } => RawModel { kind: Some("mlp".into()), hidden: widths(hidden), channels: None },
            ModelSpec::Cnn { channels } => {
                RawModel { kind: Some("cnn".into()), hidden: None, channels: widths(channels) }
            }
        });
        let data = spec.data.as_ref().map(|d| RawData {
            train: Some(d.train.to_string()),
            validation: d.validation.as_ref().map(ToString::to_string),
            format: Some(d.format.to_string()),
            validation_fraction: Some(d.validation_fraction),
        });
        let run = spec.run.as_ref().map(|r| RawRun {
            command: Some(r.command.clone()),
            workdir: r.workdir.clone(),
            procs_per_worker: Some(i64::from(r.procs_per_worker)),
            notice_signal: Some(r.notice_signal.name().to_string()),
            env: (!r.env.is_empty()).then(|| r.env.clone()),
        });
        let t = &spec.train;
        let (epochs, steps) = match t.length {
            TrainLength::Epochs(n) => (Some(i64::from(n)), None),
            TrainLength::Steps(n) => (None, Some(int("train.steps", n, super::STEPS_MAX))),
        };
        let (optimizer, momentum) = match t.optimizer {
            OptimizerSpec::Sgd { momentum } => ("sgd", Some(momentum)),
            OptimizerSpec::Adam => ("adam", None),
        };
        // A command job's canonical TOML has no [train] table.
        let train = spec.run.is_none().then(|| RawTrain {
            epochs,
            steps,
            batch_size: Some(i64::from(t.batch_size)),
            accumulate_batches: (t.accumulate_batches != 1).then_some(i64::from(t.accumulate_batches)),
            optimizer: Some(optimizer.into()),
            learning_rate: Some(t.learning_rate),
            momentum,
            weight_decay: Some(t.weight_decay),
            seed: Some(int("train.seed", t.seed, i64::MAX)),
            init_from: t.init_from.clone(),
            validate_every_steps: (t.validate_every_steps > 0)
                .then(|| int("train.validate_every_steps", t.validate_every_steps, super::VALIDATE_EVERY_STEPS_MAX)),
            stop_at_val_accuracy: t.stop_at_val_accuracy,
            stop_at_val_loss: t.stop_at_val_loss,
            lr_schedule: (t.lr_schedule != super::LrSchedule::Constant).then(|| t.lr_schedule.name().to_string()),
            warmup_steps: (t.warmup_steps > 0).then(|| int("train.warmup_steps", t.warmup_steps, super::STEPS_MAX)),
            min_learning_rate: (t.min_learning_rate != 0.0).then_some(t.min_learning_rate),
            clip_grad_norm: t.clip_grad_norm,
            patience: (t.patience > 0).then_some(i64::from(t.patience)),
            patience_metric: (t.patience_metric != super::PatienceMetric::ValLoss)
                .then(|| t.patience_metric.name().to_string()),
            patience_min_delta: (t.patience_min_delta != 0.0).then_some(t.patience_min_delta),
            keep_best: t.keep_best.then_some(true),
        });
        let w = spec.workers;
        let c = &spec.capacity;
        let checkpoint = RawCheckpoint {
            every_steps: Some(int(
                "checkpoint.every_steps",
                spec.checkpoint.every_steps,
                super::CHECKPOINT_EVERY_STEPS_MAX,
            )),
            keep: Some(i64::from(spec.checkpoint.keep)),
        };
        if !too_large.is_empty() {
            return Err(super::SpecError::Invalid(too_large));
        }
        Ok(RawJobSpec {
            name: Some(spec.name.clone()),
            priority: Some(i64::from(spec.priority)),
            model,
            data,
            train,
            workers: Some(RawWorkers {
                min: Some(i64::from(w.min)),
                max: Some(i64::from(w.max)),
                gpus: Some(i64::from(w.gpus)),
            }),
            capacity: Some(RawCapacity {
                spot: Some(c.spot),
                on_demand_fallback: Some(c.on_demand_fallback),
                instance_types: Some(c.instance_types.clone()),
                max_price_usd_per_hour: c.max_price_usd_per_hour,
                budget_usd: c.budget_usd,
                deadline_h: c.deadline_h,
                mixed_types: c.mixed_types.then_some(true),
                max_failures: Some(i64::from(c.max_failures)),
                spares: (c.spares != 0).then_some(i64::from(c.spares)),
            }),
            checkpoint: Some(checkpoint),
            output: Some(RawOutput { register_as: Some(spec.output.register_as.clone()) }),
            run,
        })
    }

    /// Bytes of text the spec holds (names, URIs, the command, its environment, instance
    /// types), for the limit a spec file has on its size.
    pub(super) fn text_bytes(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        let list = |l: &Option<Vec<String>>| l.iter().flatten().map(String::len).sum::<usize>();
        let run = self.run.as_ref().map_or(0, |r| {
            list(&r.command) + opt(&r.workdir) + r.env.iter().flatten().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        });
        let data = self.data.as_ref().map_or(0, |d| opt(&d.train) + opt(&d.validation));
        let capacity = self.capacity.as_ref().map_or(0, |c| list(&c.instance_types));
        let output = self.output.as_ref().map_or(0, |o| opt(&o.register_as));
        let init = self.train.as_ref().map_or(0, |t| opt(&t.init_from));
        opt(&self.name) + run + data + capacity + output + init
    }
}
