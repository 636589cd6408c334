//! Conversions between wire messages (`v1::*`) and core types.
//!
//! Incoming specs are re-validated by the same validator as `flotilla validate`
//! ([`JobSpec::validated`]), so the API accepts exactly what a spec file may say, and errors
//! name the same fields.

use flotilla_core::spec::{
    CapacitySpec, CheckpointSpec, DataFormat, DataSpec, DataUri, FieldError, JobSpec, LrSchedule, ModelSpec,
    NoticeSignal, OptimizerSpec, OutputSpec, PatienceMetric, RunSpec, SpecError, TrainLength, TrainSpec, WorkersSpec,
};

use crate::v1;

pub fn model_to_proto(model: &ModelSpec) -> v1::ModelSpec {
    let kind = match model {
        ModelSpec::Mlp { hidden } => v1::model_spec::Kind::Mlp(v1::MlpSpec { hidden: hidden.clone() }),
        ModelSpec::Cnn { channels } => v1::model_spec::Kind::Cnn(v1::CnnSpec { channels: channels.clone() }),
    };
    v1::ModelSpec { kind: Some(kind) }
}

/// A wire model -> a core model (`None` when the kind is missing).
pub fn model_from_proto(model: v1::ModelSpec) -> Option<ModelSpec> {
    Some(match model.kind? {
        v1::model_spec::Kind::Mlp(m) => ModelSpec::Mlp { hidden: m.hidden },
        v1::model_spec::Kind::Cnn(c) => ModelSpec::Cnn { channels: c.channels },
    })
}

fn data_to_proto(data: &DataSpec) -> v1::DataSpec {
    let format = match data.format {
        DataFormat::Csv => v1::DataFormat::Csv,
        DataFormat::Idx => v1::DataFormat::Idx,
        DataFormat::Synthetic => v1::DataFormat::Synthetic,
    };
    v1::DataSpec {
        train: data.train.to_string(),
        validation: data.validation.as_ref().map(ToString::to_string),
        format: format.into(),
        validation_fraction: data.validation_fraction,
    }
}

fn run_to_proto(run: &RunSpec) -> v1::RunSpec {
    v1::RunSpec {
        command: run.command.clone(),
        workdir: run.workdir.clone().unwrap_or_default(),
        procs_per_worker: run.procs_per_worker,
        notice_signal: run.notice_signal.name().to_string(),
        env: run.env.clone().into_iter().collect(),
    }
}

pub fn spec_to_proto(spec: &JobSpec) -> v1::JobSpec {
    let length = match spec.train.length {
        TrainLength::Epochs(n) => v1::train_spec::Length::Epochs(n),
        TrainLength::Steps(n) => v1::train_spec::Length::Steps(n),
    };
    let optimizer = match spec.train.optimizer {
        OptimizerSpec::Sgd { momentum } => v1::train_spec::Optimizer::Sgd(v1::SgdSpec { momentum }),
        OptimizerSpec::Adam => v1::train_spec::Optimizer::Adam(v1::AdamSpec {}),
    };
    v1::JobSpec {
        name: spec.name.clone(),
        priority: spec.priority,
        model: spec.model.as_ref().map(model_to_proto),
        data: spec.data.as_ref().map(data_to_proto),
        run: spec.run.as_ref().map(run_to_proto),
        train: Some(v1::TrainSpec {
            length: Some(length),
            batch_size: spec.train.batch_size,
            optimizer: Some(optimizer),
            learning_rate: spec.train.learning_rate,
            weight_decay: spec.train.weight_decay,
            seed: spec.train.seed,
            init_from: spec.train.init_from.clone(),
            validate_every_steps: spec.train.validate_every_steps,
            stop_at_val_accuracy: spec.train.stop_at_val_accuracy,
            stop_at_val_loss: spec.train.stop_at_val_loss,
            lr_schedule: spec.train.lr_schedule.name().to_string(),
            warmup_steps: spec.train.warmup_steps,
            min_learning_rate: spec.train.min_learning_rate,
            clip_grad_norm: spec.train.clip_grad_norm,
            patience: spec.train.patience,
            patience_metric: spec.train.patience_metric.name().to_string(),
            patience_min_delta: spec.train.patience_min_delta,
            keep_best: spec.train.keep_best,
            accumulate_batches: spec.train.accumulate_batches,
        }),
        workers: Some(v1::WorkersSpec { min: spec.workers.min, max: spec.workers.max, gpus: spec.workers.gpus }),
        capacity: Some(v1::CapacitySpec {
            spot: spec.capacity.spot,
            on_demand_fallback: spec.capacity.on_demand_fallback,
            instance_types: spec.capacity.instance_types.clone(),
            max_price_usd_per_hour: spec.capacity.max_price_usd_per_hour,
            budget_usd: spec.capacity.budget_usd,
            deadline_h: spec.capacity.deadline_h,
            mixed_types: spec.capacity.mixed_types,
            max_failures: spec.capacity.max_failures,
            spares: spec.capacity.spares,
        }),
        checkpoint: Some(v1::CheckpointSpec { every_steps: spec.checkpoint.every_steps, keep: spec.checkpoint.keep }),
        output: Some(v1::OutputSpec { register_as: spec.output.register_as.clone() }),
    }
}

fn missing(field: &str) -> SpecError {
    SpecError::Invalid(vec![FieldError { field: field.into(), message: "is required".into() }])
}

fn uri(field: &str, text: &str) -> Result<DataUri, SpecError> {
    text.parse().map_err(|e: flotilla_core::spec::UriError| {
        SpecError::Invalid(vec![FieldError { field: field.into(), message: e.0 }])
    })
}

fn data_from_proto(data: v1::DataSpec) -> Result<DataSpec, SpecError> {
    let format = match v1::DataFormat::try_from(data.format) {
        Ok(v1::DataFormat::Csv) => DataFormat::Csv,
        Ok(v1::DataFormat::Idx) => DataFormat::Idx,
        Ok(v1::DataFormat::Synthetic) => DataFormat::Synthetic,
        Ok(v1::DataFormat::Unspecified) | Err(_) => return Err(missing("data.format")),
    };
    Ok(DataSpec {
        train: uri("data.train", &data.train)?,
        validation: data.validation.as_deref().map(|v| uri("data.validation", v)).transpose()?,
        format,
        validation_fraction: data.validation_fraction,
    })
}

fn run_from_proto(run: v1::RunSpec) -> Result<RunSpec, SpecError> {
    let notice_signal = NoticeSignal::from_name(&run.notice_signal).ok_or_else(|| {
        SpecError::Invalid(vec![FieldError {
            field: "run.notice_signal".into(),
            message: format!("`{}` is not allowed; use one of {}", run.notice_signal, NoticeSignal::NAMES.join(", ")),
        }])
    })?;
    Ok(RunSpec {
        command: run.command,
        workdir: Some(run.workdir).filter(|w| !w.is_empty()),
        procs_per_worker: run.procs_per_worker,
        notice_signal,
        env: run.env.into_iter().collect(),
    })
}

/// A named choice of the spec from the wire: `name` as `from_name` reads it, empty for its
/// default; another is refused naming `field` and the `allowed` names.
fn choice<T: Default>(
    field: &str,
    name: &str,
    from_name: fn(&str) -> Option<T>,
    allowed: &[&str],
) -> Result<T, SpecError> {
    if name.is_empty() {
        return Ok(T::default());
    }
    from_name(name).ok_or_else(|| {
        SpecError::Invalid(vec![FieldError {
            field: field.into(),
            message: format!("`{name}` is not allowed; use one of {}", allowed.join(", ")),
        }])
    })
}

/// A wire spec -> a validated core spec. Errors name the TOML field (`workers.min`).
pub fn spec_from_proto(pb: v1::JobSpec) -> Result<JobSpec, SpecError> {
    let model = pb.model.map(|m| model_from_proto(m).ok_or_else(|| missing("model.kind"))).transpose()?;
    let data = pb.data.map(data_from_proto).transpose()?;
    let run = pb.run.map(run_from_proto).transpose()?;
    let train = pb.train.ok_or_else(|| missing("train"))?;
    let length = match train.length.ok_or_else(|| missing("train.epochs"))? {
        v1::train_spec::Length::Epochs(n) => TrainLength::Epochs(n),
        v1::train_spec::Length::Steps(n) => TrainLength::Steps(n),
    };
    let optimizer = match train.optimizer.ok_or_else(|| missing("train.optimizer"))? {
        v1::train_spec::Optimizer::Sgd(s) => OptimizerSpec::Sgd { momentum: s.momentum },
        v1::train_spec::Optimizer::Adam(_) => OptimizerSpec::Adam,
    };
    let lr_schedule = choice("train.lr_schedule", &train.lr_schedule, LrSchedule::from_name, &LrSchedule::NAMES)?;
    let patience_metric =
        choice("train.patience_metric", &train.patience_metric, PatienceMetric::from_name, &PatienceMetric::NAMES)?;
    let workers = pb.workers.ok_or_else(|| missing("workers"))?;
    let capacity = pb.capacity.ok_or_else(|| missing("capacity"))?;
    let checkpoint = pb.checkpoint.ok_or_else(|| missing("checkpoint"))?;
    let output = pb.output.ok_or_else(|| missing("output"))?;
    let spec = JobSpec {
        name: pb.name,
        priority: pb.priority,
        model,
        data,
        run,
        train: TrainSpec {
            length,
            batch_size: train.batch_size,
            accumulate_batches: train.accumulate_batches.max(1), // 0: a client from before it
            optimizer,
            learning_rate: train.learning_rate,
            weight_decay: train.weight_decay,
            seed: train.seed,
            init_from: train.init_from,
            validate_every_steps: train.validate_every_steps,
            stop_at_val_accuracy: train.stop_at_val_accuracy,
            stop_at_val_loss: train.stop_at_val_loss,
            lr_schedule,
            warmup_steps: train.warmup_steps,
            min_learning_rate: train.min_learning_rate,
            clip_grad_norm: train.clip_grad_norm,
            patience: train.patience,
            patience_metric,
            patience_min_delta: train.patience_min_delta,
            keep_best: train.keep_best,
        },
        workers: WorkersSpec { min: workers.min, max: workers.max, gpus: workers.gpus },
        capacity: CapacitySpec {
            spot: capacity.spot,
            on_demand_fallback: capacity.on_demand_fallback,
            instance_types: capacity.instance_types,
            max_price_usd_per_hour: capacity.max_price_usd_per_hour,
            budget_usd: capacity.budget_usd,
            deadline_h: capacity.deadline_h,
            mixed_types: capacity.mixed_types,
            max_failures: capacity.max_failures,
            spares: capacity.spares,
        },
        checkpoint: CheckpointSpec { every_steps: checkpoint.every_steps, keep: checkpoint.keep },
        output: OutputSpec { register_as: output.register_as },
    };
    spec.validated()
}

/// The state's name as users see it in `status` (DESIGN §8): `Pending`, `Running`, ...
pub fn job_state_name(state: v1::JobState) -> &'static str {
    match state {
        v1::JobState::Unspecified => "Unknown",
        v1::JobState::Pending => "Pending",
        v1::JobState::Provisioning => "Provisioning",
        v1::JobState::Running => "Running",
        v1::JobState::Recovering => "Recovering",
        v1::JobState::Succeeded => "Succeeded",
        v1::JobState::Failed => "Failed",
        v1::JobState::Cancelled => "Cancelled",
    }
}

/// A core job state -> its wire enum.
pub fn job_state_to_proto(state: flotilla_core::state::JobState) -> v1::JobState {
    use flotilla_core::state::JobState as S;
    match state {
        S::Pending => v1::JobState::Pending,
        S::Provisioning => v1::JobState::Provisioning,
        S::Running => v1::JobState::Running,
        S::Recovering => v1::JobState::Recovering,
        S::Succeeded => v1::JobState::Succeeded,
        S::Failed => v1::JobState::Failed,
        S::Cancelled => v1::JobState::Cancelled,
    }
}

/// A job's event as the wire names it.
fn event_to_proto(e: &flotilla_core::state::JobEvent) -> v1::JobEvent {
    v1::JobEvent {
        at_unix_ms: e.at_unix_ms,
        kind: e.kind.clone(),
        message: e.message.clone(),
        since_unix_ms: e.since_unix_ms,
    }
}

/// A recorded checkpoint as the wire names it (status, assignments' resume point, registry).
pub fn checkpoint_to_proto(c: &flotilla_core::state::CheckpointRecord) -> v1::CheckpointRef {
    v1::CheckpointRef {
        step: c.step,
        uri: c.uri.clone(),
        size_bytes: c.size_bytes,
        manifest_sha256: c.manifest_sha256.clone(),
        cursor: Some(v1::DataCursor { epoch: c.epoch as u32, global_sample_offset: c.global_sample_offset }),
        pending: c.pending,
    }
}

/// A replicated job -> what `status` shows, with its cost up to `now_unix_ms`; `shown`: its
/// state as users see it ([`flotilla_core::state::State::shown_state`]). Live progress (not
/// replicated) is added by the caller where it has it.
pub fn job_to_proto(
    job: &flotilla_core::state::Job,
    shown: flotilla_core::state::JobState,
    now_unix_ms: u64,
) -> v1::JobStatus {
    let total_steps = match job.spec.train.length {
        TrainLength::Steps(n) => n,
        TrainLength::Epochs(_) => 0, // known once the worker has read the data set
    };
    v1::JobStatus {
        id: job.id.to_string(),
        name: job.spec.name.clone(),
        state: job_state_to_proto(shown).into(),
        reason: job.reason.clone(),
        step: job.step,
        total_steps,
        world_size: job.world_size,
        generation: job.generation,
        recoveries: job.recoveries,
        steps_lost: job.steps_lost,
        metrics: Some(job.metrics.map_or_else(v1::JobMetrics::default, |m| v1::JobMetrics {
            val_accuracy: m.val_accuracy,
            val_loss: m.val_loss,
            train_loss: m.train_loss,
            samples_per_s: None,
            val_step: m.val_step,
        })),
        cost_usd: job.cost_usd_at(now_unix_ms),
        spec: Some(spec_to_proto(&job.spec)),
        submitted_at_unix_ms: job.submitted_at_unix_ms,
        updated_at_unix_ms: job.updated_at_unix_ms,
        latest_checkpoint: job.latest_checkpoint.as_ref().map(checkpoint_to_proto),
        events: job.events.iter().map(event_to_proto).collect(),
        preemptions: job.preemptions,
        failures: job.failures,
        checkpoints: job.checkpoints.iter().filter(|c| !c.deleting).count() as u32,
        lost_work_usd: job.lost_work_usd,
        stall_ms_total: job.stall_ms_total,
        last_stall_ms: job.last_stall_ms,
        resume_peer_bytes: job.resume_peer_bytes,
        resume_storage_bytes: job.resume_storage_bytes,
        handovers: job
            .handovers
            .iter()
            .map(|h| v1::HandoverStatus {
                leaving: h.leaving.to_string(),
                replacement: h.replacement.map_or_else(String::new, |r| r.to_string()),
                until_unix_ms: h.deadline_unix_ms().unwrap_or(0),
            })
            .collect(),
        spares: Vec::new(), // the state's (`flotilla_core::state::warm_spares`): the caller's
        generation_started_at_unix_ms: job.generation_started_at_unix_ms,
    }
}

/// An inference job's status, with its throughput as of `now_unix_ms`.
pub fn inference_to_proto(job: &flotilla_core::state::InferenceJob, now_unix_ms: u64) -> v1::InferenceStatus {
    use flotilla_core::state::ShardState;
    let progress = job.progress(now_unix_ms);
    v1::InferenceStatus {
        id: job.id.to_string(),
        state: job_state_to_proto(job.state).into(),
        reason: job.reason.clone(),
        shards_total: job.shards.len() as u32,
        shards_done: job.shards_done() as u32,
        rows_done: progress.totals.rows,
        rows_per_s: progress.rows_per_s,
        accuracy: progress.accuracy,
        served_by: 0,
        model: job.request.model.clone(),
        model_version: job.request.version,
        input_uri: job.request.input_uri.clone(),
        output_uri: job.request.output_uri.clone(),
        rows_total: job.request.rows,
        labelled: job.request.labelled,
        workers_max: job.request.workers,
        workers: job.members.iter().map(ToString::to_string).collect(),
        leases: job
            .shards
            .iter()
            .enumerate()
            .filter_map(|(index, shard)| match shard.state {
                ShardState::Leased { worker, attempt, .. } => {
                    Some(v1::ShardLeaseInfo { index: index as u32, worker_id: worker.to_string(), attempt })
                }
                _ => None,
            })
            .collect(),
        retries: job.retries(),
        events: job.events.iter().map(event_to_proto).collect(),
        submitted_at_unix_ms: job.submitted_at_unix_ms,
        elapsed_ms: progress.elapsed_ms,
        class_counts: progress.totals.class_counts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: [&str; 3] = [
        "name = \"a\"\nmodel = { kind = \"mlp\", hidden = [32] }\ndata = { train = \"/d/x.csv.gz\" }\nworkers = { min = 2, max = 4 }\n",
        "name = \"b\"\nmodel = { kind = \"cnn\" }\ndata = { train = \"s3://bkt/x.idx\", validation = \"s3://bkt/v.idx\" }\n\
         workers = { min = 1 }\ntrain = { steps = 10, optimizer = \"sgd\", momentum = 0.5 }\n\
         capacity = { budget_usd = 3.5, instance_types = [\"g5.xlarge\"] }\n",
        "name = \"c\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs?classes=4\" }\nworkers = { min = 1 }\n",
    ];

    #[test]
    fn specs_round_trip_through_the_wire() {
        for text in SPECS {
            let spec = JobSpec::from_toml_str(text).expect("valid");
            assert_eq!(spec_from_proto(spec_to_proto(&spec)).expect("round trip"), spec);
        }
    }

    #[test]
    fn invalid_wire_specs_name_the_field() {
        let spec = JobSpec::from_toml_str(SPECS[0]).expect("valid");
        let mut pb = spec_to_proto(&spec);
        pb.workers = Some(v1::WorkersSpec { min: 4, max: 2, gpus: 0 });
        let err = spec_from_proto(pb).expect_err("min > max");
        assert!(err.fields().contains(&"workers.min"), "{err}");

        let mut pb = spec_to_proto(&spec);
        pb.model = None;
        assert_eq!(spec_from_proto(pb).expect_err("no model").fields(), ["model"]);

        // A command job crosses the wire intact, and its fields are checked there too.
        let digest = "0f".repeat(32);
        let command = JobSpec::from_toml_str(&format!(
            "name = \"c\"\nworkers = {{ min = 2 }}\n[run]\ncommand = [\"python3\", \"t.py\"]\n\
             workdir = \"s3://b/w/workdirs/{digest}.tar.gz\"\nenv = {{ A = \"1\" }}\n"
        ))
        .expect("valid command job");
        assert_eq!(spec_from_proto(spec_to_proto(&command)).expect("round trip"), command);
        let mut pb = spec_to_proto(&command);
        if let Some(run) = pb.run.as_mut() {
            run.env.insert("RANK".into(), "7".into());
            run.notice_signal = "SIGKILL".into();
        }
        assert_eq!(spec_from_proto(pb).expect_err("bad signal").fields(), ["run.notice_signal"]);
        let mut pb = spec_to_proto(&command);
        if let Some(run) = pb.run.as_mut() {
            run.env.insert("RANK".into(), "7".into());
        }
        assert_eq!(spec_from_proto(pb).expect_err("reserved name").fields(), ["run.env.RANK"]);

        let mut pb = spec_to_proto(&spec);
        if let Some(d) = pb.data.as_mut() {
            d.train = "ftp://x/y.csv".into();
        }
        assert_eq!(spec_from_proto(pb).expect_err("bad scheme").fields(), ["data.train"]);

        let mut pb = spec_to_proto(&spec);
        if let Some(t) = pb.train.as_mut() {
            t.batch_size = 0;
        }
        assert_eq!(spec_from_proto(pb).expect_err("batch 0").fields(), ["train.batch_size"]);

        // Named choices: an empty one is the default, an unknown one is refused by name.
        let mut pb = spec_to_proto(&spec);
        if let Some(t) = pb.train.as_mut() {
            (t.lr_schedule, t.patience_metric) = (String::new(), String::new());
        }
        assert_eq!(spec_from_proto(pb).expect("defaults"), spec);
        let refused = |edit: fn(&mut v1::TrainSpec)| {
            let mut pb = spec_to_proto(&spec);
            if let Some(t) = pb.train.as_mut() {
                edit(t);
            }
            spec_from_proto(pb).expect_err("unknown").fields().iter().map(|f| f.to_string()).collect::<Vec<_>>()
        };
        assert_eq!(refused(|t| t.lr_schedule = "step".into()), ["train.lr_schedule"]);
        assert_eq!(refused(|t| t.patience_metric = "accuracy".into()), ["train.patience_metric"]);
    }
}
