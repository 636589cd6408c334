//! The built-in runner: train the job's burn model on this rank, joined to the gang by the TCP
//! ring, with rank 0 checkpointing in the background.
//!
//! ```text
//!   load data ─▶ ring rendezvous ─▶ resume checkpoint ─▶ step loop ─▶ evaluate + export (rank 0)
//!   stop vote (rides in the next all-reduce) ─▶ every rank stops after the same step ─▶ rank 0
//!        encodes that step and announces it (Checkpointed); writes + records it after the regroup
//! ```
//!
//! In a cluster the stop's checkpoint is announced before it is written: rank 0 encodes and
//! hashes the state (the manifest's fingerprint) and reports the stop with the checkpoint's
//! reference at once. The coordinator records it as pending and the gang regroups on it: every
//! member of the next generation holds that state in memory (survivors keep it; a handover's
//! replacement has it pushed; new members take it from them), so nobody reads the store
//! meanwhile. A thread of the agent's writes it once this worker's next generation took its
//! first step, and confirms the record; a write that fails leaves the record pending, and a
//! newer checkpoint replaces it. Standalone runs save the stop step before they end, as before.
//! A gang member lost without notice ends a generation the same way from the survivors' side:
//! each keeps the state of the last step it completed and announces it with its report of the
//! break ([`survive_peer_loss`]), so the break loses no step.
//!
//! Rank 0 checkpoints in the background ([`BackgroundCheckpointer`]): a snapshot every
//! `every_steps - lag` steps, where `lag = every_steps / 4` is how many steps a save may take
//! before the loop waits for it. So the newest *recorded* checkpoint is never more than
//! `checkpoint.every_steps` steps behind, whichever worker dies when, as long as the store
//! takes a save within [`SAVE_WAIT_MAX`] of that wait: past it (a store outage) training goes
//! on and the next snapshot waits for the save, rather than the other ranks' all-reduce
//! timing out and breaking the gang.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_proto::spec::JobSpec;
use flotilla_proto::v1::{
    CheckpointRef, DataCursor, FinishedReport, GenerationEnd, JobMetrics, ProgressReport, TrainAssignment,
};

use super::work::{
    HandoverTarget, JobNotes, PROGRESS_EVERY, RankContext, RankEnd, SurvivorWrite, broken, checkpoint_unusable,
    error_text, gang_not_formed, join_gang, record_checkpoint,
};
use crate::checkpoint::CheckpointError;
use crate::checkpoint::Manifest;
use crate::checkpoint::live;
use crate::checkpoint::peer::{self, ShareError, Shared};
use crate::checkpoint::state::{self, BackgroundCheckpointer, Checkpointer, Encoded, Saved};
use crate::data::Cursor;
use crate::data::{self, Dataset};
use crate::metrics::AGENT;
use crate::train::{TrainError, Trainer};

/// Classifies a training error: a lost peer is not the job's fault; a NaN loss is final.
fn train_error_end(e: &TrainError) -> GenerationEnd {
    match e {
        TrainError::Collective(_) => GenerationEnd::PeerLost,
        TrainError::NonFiniteLoss { .. } => GenerationEnd::Finished,
        _ => GenerationEnd::RetryableError,
    }
}

/// Trains this rank until the job ends, the gang votes to stop, or it is superseded.
pub(super) fn run_rank(
    context: &RankContext,
    spec: &JobSpec,
    train: TrainAssignment,
    port: &std::sync::Arc<crate::collective::port::DataPort>,
    progress: &tokio::sync::mpsc::Sender<ProgressReport>,
    runtime: &tokio::runtime::Handle,
) -> RankEnd {
    let resume_step = train.resume_from.as_ref().map_or(0, |c| c.step);
    let mut startup = Startup::new();
    let (train_set, validation_set) = match job_data(spec) {
        Ok(sets) => sets,
        Err(e) => return broken(GenerationEnd::RetryableError, resume_step, e),
    };
    let rank0 = train.rank == 0;
    let mut log = JobNotes::open(context, &train);
    log.note(format!(
        "generation {}: training on {} worker(s), {} train rows",
        train.generation, train.world_size, train_set.rows
    ));
    startup.lap("data");
    // What this start moved across the gang (rank 0 reports it with its progress).
    let mut moved = ResumeBytes::default();
    let (mut comm, mut trainer) = if train.joins_live {
        // A live handover's replacement: it takes the leaving member's rank in the running
        // generation, without a rendezvous and without a resume.
        let joined = match join_live(context, spec, &train, train_set.clone(), port, progress, &mut log) {
            Ok(joined) => joined,
            Err(end) => return end,
        };
        moved.peer = joined.caught.bytes;
        startup.lap("live handover");
        let swapped = ProgressReport {
            joined_after_step: joined.caught.step,
            resume_peer_bytes: joined.caught.bytes,
            ..progress_report(context, &train, joined.caught.step)
        };
        let _ = progress.blocking_send(swapped);
        (joined.comm, joined.trainer)
    } else {
        // The model first: it needs neither the gang nor the state, so a rank builds it while
        // the others are still on their way to the rendezvous.
        let model = match Trainer::model(spec, &train_set) {
            Ok(model) => model,
            Err(e) => return broken(train_error_end(&e), resume_step, e),
        };
        startup.lap("model");
        let mut comm = match join_gang(context, &train, port) {
            Ok(comm) => comm,
            Err((end, e)) => return gang_not_formed(end, resume_step, e),
        };
        startup.lap("rendezvous");
        let resume = match &train.resume_from {
            Some(reference) => match resume_state(&train.job_id, reference, &mut comm, &mut log) {
                Ok((state, bytes, stopped_at)) => {
                    moved = bytes;
                    startup.stopped_at = stopped_at;
                    Some(state)
                }
                Err(end) => return end,
            },
            None if !train.init_uri.is_empty() => match initial_weights(&train.init_uri, spec, &model, &train_set) {
                Ok((state, bytes)) => {
                    moved.storage = bytes;
                    log.note(format!("starting from the weights of {} ({bytes} bytes)", train.init_uri));
                    Some(state)
                }
                Err(end) => return end,
            },
            None => None,
        };
        startup.lap("exchange");
        let trainer = match Trainer::start(model, spec, train_set.clone(), &mut comm, resume) {
            Ok(trainer) => trainer,
            Err(e) => return broken(train_error_end(&e), resume_step, e),
        };
        startup.lap("state");
        (comm, trainer)
    };
    let mut background = None;
    if rank0 && !train.job_prefix.is_empty() {
        match open_checkpointer(context, &train, runtime) {
            Ok(opened) => background = Some(opened),
            Err(e) => return broken(GenerationEnd::RetryableError, resume_step, e),
        }
    }
    let every = spec.checkpoint.every_steps.max(1);
    let lag = every / 4;
    let cadence = every - lag;
    let mut saves = SaveTracker {
        last_snapshot: trainer.steps_done(),
        last_saved: trainer.steps_done(),
        stall_ms: 0.0,
        count: 0,
        slow: None,
        failures: 0,
    };
    let started = Instant::now();
    let first_step = trainer.steps_done();
    let mut last_report: Option<Instant> = None;
    let mut save_failed: Option<CheckpointError> = None;
    // The stop step's checkpoint, announced to the coordinator before it is written, and
    // what is to be written.
    let mut announced: Option<(CheckpointRef, Encoded)> = None;
    let announces = context.standalone().is_none();
    let mut around_swaps = SwapClock::default();
    // Validation while it trains (train.validate_every_steps): rank 0 reports each evaluation
    // at once on its own, at most one per VALIDATION_REPORTS_GAP; one taken sooner waits for
    // the next progress report, or the end of the generation (every one is in the job log).
    let validate_every = spec.train.validate_every_steps;
    let mut validated: Option<(u64, crate::train::Metrics)> = None;
    let mut last_validation_report: Option<Instant> = None;
    // The target a validation reached (the job's reason once it finished there).
    let mut reached: Option<String> = None;
    if rank0
        && spec.train.judges_validations()
        && first_step > 0
        && first_step.is_multiple_of(validate_every.max(1))
        && !trainer.is_finished()
        && let Some(validation) = validation_set.as_deref()
    {
        // A generation that resumes at a validation step its predecessor did not judge (it
        // stopped there), or a live handover's joiner that takes rank 0 after one (the leaving
        // rank 0 judged it, but never ran the step that would count it), judges it first: the
        // job finishes where an uninterrupted run would.
        match trainer.validate(validation) {
            Ok((_, Some(target))) => {
                log.note(format!(
                    "the validation of step {first_step}, where this generation resumes, reached {target}: the \
                     job finishes here"
                ));
                reached = Some(finished_at_target(first_step, &target));
            }
            Ok((_, None)) => {}
            Err(e) => log.note(format!("validation at step {first_step} failed: {e}")),
        }
    }
    let outcome = trainer.run(&mut comm, |trainer, report| {
        AGENT.steps.inc();
        if let Some(breakdown) = startup.first_step() {
            context.shared.note_first_step();
            log.note(format!("generation {} started: {breakdown}", train.generation));
        }
        if let Some(timed) = around_swaps.step(report, train.rank as usize, Instant::now()) {
            // Every survivor reports it; the coordinator records the first.
            let _ = progress.try_send(ProgressReport {
                live_swap_step: timed.step,
                live_swap_stall_ms: timed.longest_ms,
                ..progress_report(context, &train, report.step)
            });
            log.note(timed.note);
        }
        if context.stop.load(Ordering::Relaxed) {
            return ControlFlow::Break(());
        }
        if context.stop_voted() {
            trainer.vote_stop();
        } else if !trainer.is_handing_over()
            && let Some(target) = context.live_to.lock().ok().and_then(|mut t| t.take())
        {
            start_live_handover(trainer, &train, target, &mut log);
        }
        if let Some(reason) = trainer.take_handover_failure() {
            // The coordinator falls back to the stop at once instead of waiting for a swap.
            log.note(format!("the live handover of rank {} failed: {reason}; falling back to the stop", train.rank));
            let _ = progress.try_send(ProgressReport {
                live_handover_failed: format!("the leaving member's transfer: {reason}"),
                ..progress_report(context, &train, report.step)
            });
        }
        if rank0
            && validate_every > 0
            && report.step.is_multiple_of(validate_every)
            && !report.stop_agreed
            && !trainer.is_finished()
            && let Some(validation) = validation_set.as_deref()
        {
            // The other ranks wait for it at the next all-reduce; it reads the weights only.
            let evaluating = Instant::now();
            match trainer.validate(validation) {
                Ok((metrics, target)) => {
                    log.note(format!(
                        "validation at step {}: val_accuracy {:.4} val_loss {:.4} ({:.0} ms)",
                        report.step,
                        metrics.val_accuracy,
                        metrics.val_loss,
                        evaluating.elapsed().as_secs_f64() * 1e3
                    ));
                    if let Some(target) = target {
                        // Every rank ends at this step: the next one applies no update. The
                        // final validation (of these weights) is the one reported for it; an
                        // earlier one not reported yet goes now.
                        log.note(format!("validation at step {} reached {target}: the job finishes here", report.step));
                        reached = Some(finished_at_target(report.step, &target));
                        report_validation(context, &train, progress, validated.take());
                    } else {
                        validated = Some((report.step, metrics));
                    }
                    if validated.is_some()
                        && last_validation_report.is_none_or(|t| t.elapsed() >= VALIDATION_REPORTS_GAP) {
                        last_validation_report = Some(Instant::now());
                        report_validation(context, &train, progress, validated.take());
                    }
                }
                Err(e) => log.note(format!("validation at step {} failed: {e}", report.step)),
            }
        }
        if rank0 && last_report.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
            last_report = Some(Instant::now());
            let validation = validated.take();
            let done = report.step.saturating_sub(first_step).max(1);
            let left = trainer.total_steps().saturating_sub(report.step);
            let eta_ms = (started.elapsed().as_millis() as u64 / done).saturating_mul(left);
            log.note(format!(
                "step {}/{} epoch {} loss {:.4} lr {:.3e} {:.0} samples/s",
                report.step,
                trainer.total_steps(),
                report.epoch,
                report.loss,
                report.learning_rate,
                report.samples_per_s
            ));
            AGENT.samples_per_second.set(report.samples_per_s);
            let _ = progress.try_send(ProgressReport {
                loss: f64::from(report.loss),
                samples_per_s: report.samples_per_s,
                learning_rate: f64::from(report.learning_rate),
                total_steps: trainer.total_steps(),
                eta_ms,
                resume_peer_bytes: moved.peer,
                resume_storage_bytes: moved.storage,
                val_accuracy: validation.map(|(_, m)| m.val_accuracy),
                val_loss: validation.map(|(_, m)| m.val_loss),
                val_step: validation.map_or(0, |(step, _)| step),
                ..progress_report(context, &train, report.step)
            });
        }
        // Rank 0 of a cluster announces the stop's checkpoint: it encodes the state once, for
        // the announcement, the write and (unless it leaves) the state it holds.
        let announcing = announces
            && report.stop_agreed
            && !trainer.is_finished()
            && background
                .as_ref()
                .is_some_and(|b| saves.last_saved != report.step && b.in_flight() != Some(report.step));
        let mut stop_encoded = None;
        if report.stop_agreed && !trainer.is_finished() {
            let state = trainer.state();
            let (step, cursor) = (state.step, state.cursor);
            let parts = announcing.then(|| state::encode(&state, None));
            let kept = if super::work::leaving(context) {
                // A handover's leaving member pushes the state to its replacement now, while
                // rank 0 announces it. A leaving rank 0 pushes the encoding it announces, before
                // hashing it: the replacement hashes what it receives meanwhile. Others encode
                // on the push's thread.
                let push: Box<dyn FnOnce() -> _ + Send> = match &parts {
                    Some(parts) => {
                        let parts = parts.clone();
                        Box::new(move || parts)
                    }
                    None => Box::new(move || state::encode(&state, None)),
                };
                super::work::push_if_handed_over(context, &train.job_id, train.generation, push);
                None
            } else {
                Some(state)
            };
            stop_encoded = parts.map(|parts| Encoded::hash(step, cursor, parts));
            // Kept for the next generation (it resumes from this step): this rank then gives the
            // state to new members over the data port instead of each reading the store.
            if let Some(state) = kept {
                match &stop_encoded {
                    Some(Ok(encoded)) => peer::HELD.hold_encoded(&train.job_id, state, encoded),
                    _ => peer::HELD.hold(&train.job_id, state),
                }
            }
        }
        let Some(background) = background.as_mut() else { return ControlFlow::Continue(()) };
        let boundary = Instant::now();
        let mut outcomes = Vec::new();
        outcomes.extend(background.poll());
        // Slow until a save succeeds: a failed one is retried by the next snapshot, unwaited.
        if let (Some(since), Some(Ok(saved))) = (saves.slow, outcomes.last()) {
            saves.slow = None;
            log.note(format!(
                "the store takes checkpoints again: the one of step {} was recorded {:.1} s after training stopped \
                 waiting for the store ({} failed meanwhile)",
                saved.step,
                since.elapsed().as_secs_f64(),
                std::mem::take(&mut saves.failures)
            ));
        }
        let mut waited = false;
        if saves.slow.is_none() && background.in_flight().is_some_and(|s| report.step >= s + lag) {
            // The save fell `lag` steps behind: wait, but not so long that the other ranks'
            // next all-reduce gives up on this one (a slow store must not break the gang).
            match background.finish_within(SAVE_WAIT_MAX) {
                Some(outcome) => outcomes.push(outcome),
                None => {
                    let step = background.in_flight().unwrap_or(saves.last_snapshot);
                    saves.slow = Some(Instant::now());
                    tracing::warn!(job = %train.job_id, step, "the store is slow; training goes on without waiting for it");
                    log.note(format!(
                        "the store is slow: the checkpoint of step {step} is not written after {} s; training goes \
                         on without waiting for saves until one is recorded, one snapshot in flight at a time (until \
                         then a loss of the whole gang costs more than checkpoint.every_steps = {every} steps)",
                        SAVE_WAIT_MAX.as_secs()
                    ));
                }
            }
            waited = true;
        }
        if report.stop_agreed {
            if let Some(encoded) = stop_encoded {
                // An earlier save first, unless the store is out: then the stop is reported at
                // once (the gang holds the state) and the stop's writer writes it after that one.
                if saves.slow.is_none() {
                    outcomes.extend(background.finish());
                }
                match encoded {
                    Ok(encoded) => {
                        let uri = background.uri_of_step(encoded.step);
                        announced =
                            Some((checkpoint_ref(encoded.step, encoded.cursor, uri, &encoded.manifest), encoded));
                    }
                    Err(e) => outcomes.push(Err(e)),
                }
            } else if saves.last_saved != report.step && background.in_flight() != Some(report.step) {
                outcomes.extend(background.submit(trainer.state(), None));
            }
            if announced.is_none() {
                outcomes.extend(background.finish());
            }
            waited = true;
        } else if report.step - saves.last_snapshot >= cadence
            && !trainer.is_finished()
            && background.in_flight().is_none()
        {
            saves.last_snapshot = report.step;
            outcomes.extend(background.submit(trainer.state(), None));
            waited = true;
        }
        let stall = boundary.elapsed().as_secs_f64();
        saves.stall_ms += stall * 1e3;
        if waited {
            AGENT.checkpoint_stall_seconds.observe(stall);
        }
        for outcome in outcomes {
            match outcome {
                Ok(saved) => {
                    saves.last_saved = saved.step;
                    saves.count += 1;
                    AGENT.checkpoints.inc();
                    AGENT.checkpoint_bytes.inc_by(saved.manifest.total_bytes());
                    AGENT.checkpoint_seconds.observe(saved.background_ms / 1e3);
                    log.note(format!(
                        "checkpoint at step {} ({} bytes in {:.1} ms in the background; stall so far {:.1} ms)",
                        saved.step,
                        saved.manifest.total_bytes(),
                        saved.background_ms,
                        saves.stall_ms
                    ));
                }
                Err(e) => {
                    // A failing store is no more waited for than a slow one: until a save is
                    // recorded, the next snapshot retries it unwaited (waiting out each failure's
                    // retries at every checkpoint slowed a digits job about 30-fold). Said once.
                    saves.failures += 1;
                    if saves.slow.is_none() {
                        saves.slow = Some(Instant::now());
                        tracing::warn!(error = %e, step = report.step, "checkpoint failed; training continues");
                        log.note(format!(
                            "a checkpoint failed; training continues without waiting for saves until one is recorded: \
                             {e}"
                        ));
                    }
                    if report.stop_agreed {
                        save_failed = Some(e);
                    }
                }
            }
        }
        ControlFlow::Continue(())
    });
    // A gang that finished early at the step validated last (patience) reports that validation
    // as its final metrics: not twice.
    let pending = validated.take().filter(|(step, _)| !(trainer.finished_early() && *step == trainer.steps_done()));
    let last_validated = pending.is_some_and(|(step, _)| step == trainer.steps_done());
    report_validation(context, &train, progress, pending);
    let last = match outcome {
        Ok(last) => last,
        Err(e) => {
            let end = train_error_end(&e);
            if let Some(Ok(saved)) = background.as_mut().and_then(BackgroundCheckpointer::poll) {
                saves.last_saved = saved.step;
            }
            // A survivor reports at once, with the newer state it holds; a save in flight (on S3
            // a large model's takes seconds) ends on its own meanwhile.
            // (Not a superseded rank: its collective was aborted, and a newer generation runs.)
            let superseded = context.stop.load(Ordering::Relaxed);
            if end == GenerationEnd::PeerLost && announces && !superseded && !train.job_prefix.is_empty() {
                let newest = resume_step.max(saves.last_saved);
                return survive_peer_loss(context, &train, runtime, &trainer, background, newest, log, e);
            }
            // Otherwise it finishes recording it first: it may be the checkpoint the next
            // generation resumes from.
            drop(background);
            return broken(end, trainer.steps_done(), e);
        }
    };
    if context.stop.load(Ordering::Relaxed) {
        return RankEnd::Superseded;
    }
    if let Some(step) = last.filter(|r| r.replaced == Some(train.rank as usize)).map(|r| r.step) {
        // A save in flight ends first (dropping the checkpointer waits for it).
        drop(background);
        log.note(format!(
            "handed rank {} over live after step {step}: the replacement holds the state and trains on; this \
             worker leaves the gang",
            train.rank
        ));
        return RankEnd::HandedOver { step };
    }
    if last.is_some_and(|r| r.stop_agreed) && !trainer.is_finished() {
        if let Some(e) = save_failed {
            return broken(
                GenerationEnd::RetryableError,
                trainer.steps_done(),
                format!("checkpoint before stopping: {e}"),
            );
        }
        log.note(format!(
            "stopped at step {} for a checkpoint (generation {}){}",
            trainer.steps_done(),
            train.generation,
            if announced.is_some() { "; its checkpoint is announced and being written" } else { "" }
        ));
        // In a cluster the stop's save (when announced) and the job log's last writes come
        // after the report; a standalone run ends with them.
        if announces {
            let (reference, encoded) = announced.unzip();
            finish_after_stop(context, background.take().zip(encoded), Some(log), trainer.steps_done());
            return RankEnd::Checkpointed { step: trainer.steps_done(), rank0, announced: reference };
        }
        return RankEnd::Checkpointed { step: trainer.steps_done(), rank0, announced: None };
    }
    peer::HELD.release(&train.job_id);
    if !rank0 {
        return RankEnd::Finished(None);
    }
    let metrics = match validation_set.as_deref().map(|v| trainer.evaluate(v)).transpose() {
        Ok(metrics) => metrics,
        Err(e) => return broken(GenerationEnd::RetryableError, trainer.steps_done(), e),
    };
    if let Some(background) = background.as_mut() {
        // The final model, recorded before the finish so that it is the job's last checkpoint.
        let _ = background.finish();
        if saves.last_saved != trainer.steps_done() {
            let values = metrics.map(|m| (m.val_accuracy, m.val_loss));
            let saved = through_outage(context, &mut log, "the final checkpoint", || {
                let _ = background.submit(trainer.state(), values);
                match background.finish() {
                    Some(Err(e)) => Err(e),
                    _ => Ok(()),
                }
            });
            if let Err(e) = saved {
                tracing::warn!(error = %e, "the final checkpoint was not saved");
            }
        }
    }
    // train.keep_best: the model is the best validated state (every rank holds its parameters),
    // unless this final one validated better; its metrics are the model's.
    let final_metrics = metrics;
    let (model_params, model_step, metrics) = match trainer.kept_best(metrics.as_ref()).zip(validation_set.as_deref()) {
        Some(((step, params), validation)) => match trainer.evaluate_params(params, validation) {
            Ok(best) => (params, step, Some(best)),
            Err(e) => return broken(GenerationEnd::RetryableError, trainer.steps_done(), e),
        },
        None => (trainer.params(), 0, metrics),
    };
    let kept = (model_step > 0).then(|| {
        let metric = spec.train.patience_metric;
        let value = |m: Option<crate::train::Metrics>| m.map_or(f64::NAN, |m| metric.of(m.val_accuracy, m.val_loss));
        format!(
            "the model is the best validated state, step {model_step} ({} {:.4}), not the last, step {} ({:.4}; \
             train.keep_best)",
            metric.name(),
            value(metrics),
            trainer.steps_done(),
            value(final_metrics)
        )
    });
    if let Some(kept) = &kept {
        log.note(kept.clone());
        // The report's metrics are the model's: the last state's validation is a point of its own.
        if !last_validated {
            report_validation(context, &train, progress, final_metrics.map(|m| (trainer.steps_done(), m)));
        }
    }
    // The model for the registry: safetensors beside the checkpoints, and the data's fingerprint.
    // Why there is no model (the job finishes anyway: its training is done, and its newest
    // checkpoint holds the weights); the coordinator tells it in the job's events.
    let mut unexported = String::new();
    let (artifact_uri, dataset_sha256) = if train.job_prefix.is_empty() {
        (String::new(), String::new())
    } else {
        let exported = spec
            .built_in()
            .map_err(anyhow::Error::from)
            .and_then(|(model, _)| Ok(crate::train::export::safetensors(model, trainer.layout(), model_params)?))
            .and_then(|bytes| {
                // A cluster's job may be trained further after it succeeded (`flotilla resume`
                // with a longer length): each registration keeps its own file, named by its step.
                let prefix = match context.standalone() {
                    Some(_) => format!("{}/model", train.job_prefix),
                    None => format!("{}/model/{:012}", train.job_prefix, trainer.steps_done()),
                };
                let write = || state::write_artifact(&prefix, "model.safetensors", bytes.clone());
                Ok(through_outage(context, &mut log, "the model", write)?)
            });
        match exported {
            Ok(uri) => (uri, crate::train::export::dataset_sha256(&train_set)),
            Err(e) => {
                let why = error_text(&e);
                tracing::warn!(error = %why, "the model could not be exported; it will not be registered");
                unexported = format!("the model could not be exported: {why}");
                (String::new(), String::new())
            }
        }
    };
    if let Some(count) = trainer.out_of_patience() {
        let train = &spec.train;
        let reason = format!(
            "finished at step {}: {} validations in a row brought no better {} than {:.4} (step {}; train.patience = \
             {})",
            trainer.steps_done(),
            count.since_best,
            train.patience_metric.name(),
            count.best.unwrap_or(f32::NAN),
            count.best_step,
            train.patience
        );
        log.note(reason.clone());
        reached = reached.or(Some(reason));
    }
    let accuracy = metrics.map_or("n/a".to_string(), |m| format!("{:.4}", m.val_accuracy));
    log.note(format!(
        "finished at step {}: val_accuracy {accuracy}; this generation: {} steps in {:.3} s, {} checkpoint(s), \
         checkpoint stall {:.1} ms",
        trainer.steps_done(),
        trainer.steps_done() - first_step,
        started.elapsed().as_secs_f64(),
        saves.count,
        saves.stall_ms
    ));
    RankEnd::Finished(Some(Box::new(FinishedReport {
        worker_id: context.worker_id(),
        job_id: train.job_id,
        generation: train.generation,
        success: true,
        // A success's reason: where it finished before its length, the state kept as its model
        // (train.keep_best), and a model not exported.
        error: [reached.filter(|_| trainer.finished_early()).unwrap_or_default(), kept.unwrap_or_default(), unexported]
            .into_iter()
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
        metrics: Some(JobMetrics {
            val_accuracy: metrics.map(|m| m.val_accuracy),
            val_loss: metrics.map(|m| m.val_loss),
            train_loss: last.map(|r| f64::from(r.loss)),
            samples_per_s: last.map(|r| r.samples_per_s),
            val_step: model_step,
        }),
        step: trainer.steps_done(),
        final_checkpoint: None,
        end: GenerationEnd::Finished.into(),
        unusable_checkpoint_step: 0,
        artifact_uri,
        dataset_sha256,
        features_per_row: train_set.features_per_row as u32,
        classes: train_set.classes as u32,
        feature_scale: train_set.feature_scale,
        unreachable_rank: None,
    })))
}

/// A job's reason once it finished at the validation of `step`, which reached `target`.
fn finished_at_target(step: u64, target: &str) -> String {
    format!("finished at step {step}: its validation reached {target}")
}

/// Reports taken only for a validation at most one per this (beyond the progress reports).
const VALIDATION_REPORTS_GAP: std::time::Duration = std::time::Duration::from_millis(250);

/// Reports rank 0's evaluation at its step on its own (`validation_only`), if there is one.
fn report_validation(
    context: &RankContext,
    train: &TrainAssignment,
    progress: &tokio::sync::mpsc::Sender<ProgressReport>,
    validated: Option<(u64, crate::train::Metrics)>,
) {
    if let Some((step, metrics)) = validated {
        let _ = progress.try_send(ProgressReport {
            val_accuracy: Some(metrics.val_accuracy),
            val_loss: Some(metrics.val_loss),
            val_step: step,
            validation_only: true,
            ..progress_report(context, train, step)
        });
    }
}

/// A report of this rank's progress at `step`: what every report carries.
fn progress_report(context: &RankContext, train: &TrainAssignment, step: u64) -> ProgressReport {
    ProgressReport {
        worker_id: context.worker_id(),
        job_id: train.job_id.clone(),
        generation: train.generation,
        rank: train.rank,
        step,
        ..Default::default()
    }
}

/// Longest a live handover's replacement waits for the leaving member's transfer to arrive
/// (the leaving member is told to start it once the replacement's assignment is out).
const LIVE_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The joining side of a live handover: waits for the leaving member's transfer on the data
/// port, then [`live::join`]s the running gang in its rank. A handover that does not happen
/// (nothing came, the transfer failed or was refused, superseded meanwhile) ends the rank
/// quietly: the gang trains on without this worker, and the coordinator, told why (unless
/// superseded), falls back to the stop at once.
fn join_live(
    context: &RankContext,
    spec: &JobSpec,
    train: &TrainAssignment,
    data: Arc<Dataset>,
    port: &Arc<crate::collective::port::DataPort>,
    progress: &tokio::sync::mpsc::Sender<ProgressReport>,
    log: &mut JobNotes,
) -> Result<live::Joined, RankEnd> {
    let failed = |reason: String| {
        tracing::warn!(job = %train.job_id, %reason, "the live handover failed; the gang trains on without this worker");
        let _ = progress
            .blocking_send(ProgressReport { live_handover_failed: reason, ..progress_report(context, train, 0) });
        Err(RankEnd::HandedOver { step: 0 })
    };
    let config = super::work::ring_config(context, train)
        .map_err(|e| broken(GenerationEnd::RetryableError, 0, format!("live handover: {}", error_text(&e))))?;
    let waiting = Instant::now();
    let stream = loop {
        if context.stop.load(Ordering::Relaxed) {
            return Err(RankEnd::Superseded);
        }
        if let Some(stream) = port.next_live(std::time::Duration::from_millis(200)) {
            break stream;
        }
        if waiting.elapsed() >= LIVE_CONNECT_WAIT {
            return failed(format!("no transfer reached the replacement within {} s", LIVE_CONNECT_WAIT.as_secs()));
        }
    };
    match live::join(stream, &train.handover_key, spec, data, config, Some(port.clone())) {
        Ok(joined) => {
            let caught = joined.caught;
            log.note(format!(
                "took rank {} of generation {} live after step {}: the state and {} update(s) ({} bytes) from the \
                 leaving member (the state in {:.1} ms), replayed in {:.1} ms while the gang trained on; no stop",
                train.rank,
                train.generation,
                caught.step,
                caught.updates,
                caught.bytes,
                caught.state_ms,
                caught.replay_ms
            ));
            Ok(joined)
        }
        Err(e) => failed(format!("the replacement's join: {e}")),
    }
}

/// The leaving side of a live handover: from the next step on, the trainer streams its state
/// and every update to the replacement at `target` (connecting on the transfer's thread), and
/// the gang swaps it in once it caught up.
fn start_live_handover(trainer: &mut Trainer, train: &TrainAssignment, target: HandoverTarget, log: &mut JobNotes) {
    match target.addr.parse() {
        Ok(addr) => {
            let gang_id = super::work::gang_id(train);
            let source = live::Source::connect(addr, target.key, gang_id, train.rank as usize, trainer.state());
            trainer.hand_over(Box::new(source));
            log.note(format!(
                "handing rank {} over live to {} from step {} on; training on",
                train.rank,
                target.addr,
                trainer.steps_done()
            ));
        }
        Err(e) => tracing::warn!(addr = %target.addr, error = %e, "the live handover's address is not valid"),
    }
}

/// Steps in the window a rank times a live swap over (and in the control window before it).
const SWAP_WINDOW_STEPS: usize = 16;
/// Steps after a live swap the rank waits before it says what the swap cost it.
const SWAP_STEPS_AFTER: u64 = 4;

/// A surviving rank's clock around live swaps: the ends of its last steps. [`SWAP_STEPS_AFTER`]
/// steps after another rank was swapped, the longest time without a step over the last
/// [`SWAP_WINDOW_STEPS`] steps (the stall the swap cost it, issue 25's measure) against their
/// median step, the swap's own step, and the longest time without a step over the
/// [`SWAP_WINDOW_STEPS`] steps before them (a control: what the machine's noise alone gives).
#[derive(Default)]
struct SwapClock {
    ends: std::collections::VecDeque<Instant>,
    /// The swap being timed: its step and the rank swapped.
    swapped: Option<(u64, usize)>,
}

impl SwapClock {
    /// Records the end of `report`'s step (at `now`) on rank `rank`; returns what it timed of a
    /// swap once due.
    fn step(&mut self, report: &crate::train::StepReport, rank: usize, now: Instant) -> Option<SwapTimed> {
        if self.ends.len() > 2 * SWAP_WINDOW_STEPS {
            self.ends.pop_front();
        }
        self.ends.push_back(now);
        if let Some(swapped) = report.replaced.filter(|r| *r != rank) {
            self.swapped = Some((report.step, swapped));
        }
        let (at, swapped) = self.swapped.filter(|(at, _)| report.step >= at + SWAP_STEPS_AFTER)?;
        self.swapped = None;
        let gaps: Vec<f64> =
            self.ends.iter().zip(self.ends.iter().skip(1)).map(|(a, b)| (*b - *a).as_secs_f64() * 1e3).collect();
        let (control, window) = gaps.split_at(gaps.len().saturating_sub(SWAP_WINDOW_STEPS));
        let longest = |gaps: &[f64]| gaps.iter().copied().fold(0.0, f64::max);
        // The window in three: the steps while the replacement caught up (the old member still
        // in the gang), the first step with the new member (the swap's own), and the rest.
        let (before, from_swap) = window.split_at(window.len().saturating_sub(SWAP_STEPS_AFTER as usize));
        let first_after = from_swap.first().copied().unwrap_or(0.0);
        let after = from_swap.get(1..).unwrap_or_default();
        let median = |gaps: &[f64]| {
            let mut sorted = gaps.to_vec();
            sorted.sort_by(f64::total_cmp);
            sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
        };
        // The control's median is the steady step: the window's own median includes the steps
        // the replacement's start-up slowed where it shares the gang's cores.
        let note = format!(
            "rank {swapped} was swapped live after step {at}: longest time without a step over the last {} steps \
             {:.1} ms (median step {:.1} ms; the first step with the new member {first_after:.1} ms; the longest of \
             the {} steps before it {:.1} ms, of the {} after it {:.1} ms; over the {} steps before them {:.1} ms, \
             median {:.1} ms)",
            window.len(),
            longest(window),
            median(window),
            before.len(),
            longest(before),
            after.len(),
            longest(after),
            control.len(),
            longest(control),
            median(control)
        );
        Some(SwapTimed { step: at, longest_ms: longest(window), note })
    }
}

/// A live swap as a surviving rank timed it (see [`SwapClock`]).
struct SwapTimed {
    /// The swap's step.
    step: u64,
    /// The longest time without a step around it (the swap's stall).
    longest_ms: f64,
    /// The note for the job log.
    note: String,
}

/// Bytes a generation's start moved across its gang: peer to peer, and read from the store.
#[derive(Debug, Default, Clone, Copy)]
struct ResumeBytes {
    peer: u64,
    storage: u64,
}

/// The state of the checkpoint `reference` (every rank of the gang calls this together): held
/// in memory since the last planned stop, pushed or received from a gang member that holds it,
/// or read from the store (see [`peer`]). The note says which. With it, what the gang moved as
/// every rank can tell: the peer bytes of the exchange, and the store's bytes times the ranks
/// when nobody held it (a rank that refused a peer's state and read the store counts only
/// itself); and, when this worker held it since its own rank stopped, when that was.
fn resume_state(
    job_id: &str,
    reference: &CheckpointRef,
    comm: &mut dyn crate::collective::Communicator,
    log: &mut JobNotes,
) -> Result<(crate::train::TrainState, ResumeBytes, Option<Instant>), RankEnd> {
    let started = Instant::now();
    // A handover's replacement may be receiving it from the leaving member right now.
    let mine = peer::HELD.held_waiting(job_id, &reference.manifest_sha256);
    let (pushed, stopped_at) = mine.as_ref().map_or((None, None), |held| (held.pushed, held.stopped_at));
    let step = reference.step;
    let world = comm.world_size() as u64;
    let mut moved = ResumeBytes::default();
    match peer::share(comm, mine, &reference.manifest_sha256) {
        Ok((Shared::Held(state), peer)) => {
            match pushed {
                Some(pushed) => {
                    AGENT.resumes_from_peer.inc();
                    AGENT.resume_peer_bytes.inc_by(pushed.bytes);
                    let how = if pushed.to_spare {
                        "pushed to this warm spare by rank 0 when it recorded it"
                    } else {
                        "pushed by the leaving member over the data port before the regroup"
                    };
                    log.note(format!(
                        "resuming from the checkpoint of step {step} ({how}: {} bytes in {:.1} ms; its manifest is \
                         the recorded checkpoint's)",
                        pushed.bytes, pushed.ms
                    ));
                }
                None => {
                    AGENT.resumes_from_memory.inc();
                    log.note(format!("resuming from the checkpoint of step {step} (held in memory since the stop)"));
                }
            }
            return Ok((state, ResumeBytes { peer, storage: 0 }, stopped_at));
        }
        Ok((Shared::FromPeer { state, root, bytes, received }, peer)) => {
            // Held in turn: the survivor that gave it may die before it writes the checkpoint.
            let _holding = peer::HELD.hold_received(job_id, received);
            AGENT.resumes_from_peer.inc();
            AGENT.resume_peer_bytes.inc_by(bytes);
            log.note(format!(
                "resuming from the checkpoint of step {step} (from rank {root} over the data port: {bytes} bytes in \
                 {:.1} ms, checksums verified)",
                started.elapsed().as_secs_f64() * 1e3
            ));
            return Ok((state, ResumeBytes { peer, storage: 0 }, None));
        }
        Ok((Shared::Nobody, _)) => moved.storage = reference.size_bytes.saturating_mul(world),
        Err(ShareError::Collective(e)) => return Err(broken(GenerationEnd::PeerLost, step, e)),
        Err(ShareError::Refused(e)) => {
            tracing::warn!(error = %e, "the state from a peer was refused; reading the checkpoint from the store");
            log.note(format!("the state from a peer was refused ({e}); reading the checkpoint from the store"));
            moved.storage = reference.size_bytes;
        }
    }
    // Announced by the gang that ended and not yet written: its writer (a member of that gang
    // that is not in this one) still saves it; wait for it rather than find it partial.
    let wait = if reference.pending { state::pending_write_wait(reference.size_bytes) } else { Duration::ZERO };
    match state::load_uri_when_written(&reference.uri, wait) {
        Ok((state, _, waited)) => {
            AGENT.resumes_from_storage.inc();
            AGENT.resume_storage_bytes.inc_by(reference.size_bytes);
            let waited = if waited.is_zero() {
                String::new()
            } else {
                format!(", after {:.0} ms waiting for its writer to finish it", waited.as_secs_f64() * 1e3)
            };
            log.note(format!(
                "resuming from the checkpoint of step {step} ({}: {} bytes in {:.1} ms{waited})",
                reference.uri,
                reference.size_bytes,
                started.elapsed().as_secs_f64() * 1e3
            ));
            Ok((state, moved, None))
        }
        Err(e) if e.is_unusable() => Err(checkpoint_unusable(log, step, e)),
        Err(e) => Err(broken(GenerationEnd::RetryableError, step, e)),
    }
}

/// The starting state of a fresh generation from the registered weights at `uri`
/// (`train.init_from`, resolved by the coordinator), and the bytes read. Weights that do not fit
/// this job's model end the job (another try would read the same file); a store that does not
/// answer is waited out as for the data.
fn initial_weights(
    uri: &str,
    spec: &JobSpec,
    model: &crate::train::Model,
    data: &Dataset,
) -> Result<(crate::train::TrainState, u64), RankEnd> {
    let parsed: flotilla_proto::spec::DataUri = match uri.parse() {
        Ok(parsed) => parsed,
        Err(e) => return Err(broken(GenerationEnd::Finished, 0, format!("train.init_from: {uri}: {}", e.0))),
    };
    let bytes = data::store::fetch(&parsed).map_err(|e| broken(GenerationEnd::RetryableError, 0, e))?;
    let state = model.initial_state(spec, data, &bytes).map_err(|e| {
        let why = format!("train.init_from: the registered weights do not fit this job: {e}");
        broken(GenerationEnd::Finished, 0, why)
    })?;
    Ok((state, bytes.len() as u64))
}

/// A job's data sets: (train, validation).
type JobData = (Arc<Dataset>, Option<Arc<Dataset>>);

/// The data of the last job this worker trained or prepared, kept across its generations:
/// regrouping after a preemption does not reload and re-parse the data set (100-200 ms for
/// MNIST 5k), and a handover's replacement loads it while the gang still trains.
static DATA_CACHE: std::sync::Mutex<Option<(String, JobData)>> = std::sync::Mutex::new(None);
/// Held while a data set loads: a generation that starts during a replacement's preparation
/// waits for that load instead of starting a second one.
static DATA_LOADING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Prepares this worker for the job a handover reserved it for, or that keeps it as a warm
/// spare (its `PrepareJob`), so that its first generation starts at once: loads the data into
/// the cache and runs [`WARM_UP_PASSES`] throw-away forward and backward passes ([`warm_up`]:
/// on a GPU burn compiles its CUDA kernels at first use: 2-5 s on an H200 that the whole gang
/// would otherwise wait for in the first all-reduce; on a CPU the fresh process's first step
/// took 5-12 ms against 4 ms later, and the gang waits for it). Then it reports the job
/// prepared (`shared`), also after a failure: the generation reports that one. Command jobs
/// have nothing to prepare.
pub(super) fn prepare(prepare: flotilla_proto::v1::PrepareJob, shared: &super::work::AgentShared) {
    let started = Instant::now();
    let job = prepare.job_id.clone();
    if let Some(Ok(spec)) = prepare.spec.map(flotilla_proto::convert::spec_from_proto)
        && spec.command().is_none()
    {
        match job_data(&spec).and_then(|(train, _)| warm_up(&spec, train, WARM_UP_PASSES)) {
            Ok(()) => tracing::info!(
                job = %job,
                ms = started.elapsed().as_secs_f64() * 1e3,
                gpus = spec.workers.gpus,
                spare = prepare.spare,
                "prepared the job (data loaded, warm-up pass run)"
            ),
            Err(e) => tracing::warn!(job = %job, error = %error_text(&e), "could not prepare the job"),
        }
    }
    shared.set_prepared(&job);
    shared.beat_now.notify_one();
}

/// Warm-up passes a prepared worker runs. `scripts/bench/warm_up.sh` (2-core development
/// machine, 5 rounds): without one a fresh process's first step took 1.28x (CNN) and 1.89x
/// (MLP) its steady step, after one 1.13x and 1.68x; more passes did not help consistently
/// (see the bench's README). A live handover's joiner also runs a pass on its real trainer
/// ([`crate::checkpoint::live::join`]).
pub const WARM_UP_PASSES: usize = 1;

/// `passes` of [`Trainer::warm_up`] on a scratch trainer (world 1, fresh weights, the job's
/// batch size) on the job's device, so that the kernels the real steps use are compiled (GPU)
/// and the process's allocations and caches are warm (CPU). A prepared worker runs
/// [`WARM_UP_PASSES`]; `scripts/bench/warm_up.sh` measures others.
pub fn warm_up(spec: &JobSpec, train: Arc<Dataset>, passes: usize) -> anyhow::Result<()> {
    let mut comm = crate::collective::local::LocalCommunicator;
    let mut trainer = Trainer::new(spec, train, &mut comm, None).context("building the warm-up trainer")?;
    for _ in 0..passes {
        trainer.warm_up().context("a warm-up pass")?;
    }
    Ok(())
}

fn cached_data(key: &str) -> Option<JobData> {
    let cache = DATA_CACHE.lock().ok()?;
    cache.as_ref().filter(|(cached, _)| cached == key).map(|(_, sets)| sets.clone())
}

fn job_data(spec: &JobSpec) -> anyhow::Result<JobData> {
    let key = format!("{:?}/{}", spec.data, spec.train.seed);
    if let Some(sets) = cached_data(&key) {
        return Ok(sets);
    }
    let _one_load = DATA_LOADING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(sets) = cached_data(&key) {
        return Ok(sets); // loaded while we waited (a replacement's preparation)
    }
    let splits = data::load_job_data(spec.built_in()?.1, spec.train.seed).context("loading the training data")?;
    let sets = (Arc::new(splits.train), splits.validation.map(Arc::new));
    if let Ok(mut cache) = DATA_CACHE.lock() {
        *cache = Some((key, sets.clone()));
    }
    Ok(sets)
}

/// Where a generation's start-up went, from the assignment to its first step: the stall a
/// regroup costs on this rank, besides the coordinator's part.
struct Startup {
    started: Instant,
    last: Instant,
    laps: Vec<(&'static str, f64)>,
    reported: bool,
    /// When this worker's rank of the previous generation stopped (it resumes from the state
    /// it held): its time without an optimizer step ends at this generation's first step.
    stopped_at: Option<Instant>,
}

impl Startup {
    fn new() -> Startup {
        let now = Instant::now();
        Startup { started: now, last: now, laps: Vec::new(), reported: false, stopped_at: None }
    }

    /// Ends the phase `name`.
    fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        self.laps.push((name, (now - self.last).as_secs_f64() * 1e3));
        self.last = now;
    }

    /// At the first step only: `first step in X ms (data a ms, rendezvous b ms, ...)`.
    fn first_step(&mut self) -> Option<String> {
        if std::mem::replace(&mut self.reported, true) {
            return None;
        }
        self.lap("step");
        let total = self.started.elapsed().as_secs_f64() * 1e3;
        let laps: Vec<String> = self.laps.iter().map(|(name, ms)| format!("{name} {ms:.1} ms")).collect();
        let idle = self.stopped_at.map_or(String::new(), |at| {
            format!("; {:.1} ms without a step since this worker's last one", at.elapsed().as_secs_f64() * 1e3)
        });
        Some(format!("first step {total:.1} ms after the assignment ({}){idle}", laps.join(", ")))
    }
}

/// Rank 0's bookkeeping of its checkpoints.
struct SaveTracker {
    /// Step of the newest snapshot handed to the background writer.
    last_snapshot: u64,
    /// Step of the newest checkpoint written and recorded.
    last_saved: u64,
    /// Time the step loop spent on checkpoints (snapshot copies and waits), in ms.
    stall_ms: f64,
    /// Checkpoints written and recorded.
    count: u64,
    /// Since a save outlasted [`SAVE_WAIT_MAX`] or failed, until a save succeeds: the loop does
    /// not wait for saves, and takes no snapshot while one is in flight.
    slow: Option<Instant>,
    /// Saves failed since the last one recorded.
    failures: u64,
}

/// The longest the step loop waits for a save that fell `lag` steps behind: half the ring's
/// collective timeout, since the other ranks wait for this one in their next all-reduce
/// meanwhile. A store slower than that (an S3 outage) no longer stalls training until the
/// gang breaks; the checkpoints are then further apart for as long as it lasts.
const SAVE_WAIT_MAX: Duration = Duration::from_secs(super::work::COLLECTIVE_TIMEOUT.as_secs() / 2);

/// A gang member was lost after this rank's last step (its all-reduce broke, so that step's
/// update is whole: the optimizer runs only after the sum arrived). Data parallelism left this
/// survivor with the gang's whole state, so it keeps it for the next generation instead of the
/// gang going back to the newest checkpoint: it holds the state in memory and, when it is newer
/// than `newest` (the step the gang resumed from or last saved), reports the break with the
/// state's checkpoint announced. Survivors may be one step apart (one finished the step's
/// all-reduce, another did not); the coordinator keeps the first report, the next generation
/// resumes from its announcement, and a survivor holding another step receives that state from
/// a holder in the exchange ([`peer`]). The kept report's rank writes the checkpoint after the
/// regroup, as after an orderly stop; a survivor whose report was refused writes nothing.
#[allow(clippy::too_many_arguments)]
fn survive_peer_loss(
    context: &RankContext,
    train: &TrainAssignment,
    runtime: &tokio::runtime::Handle,
    trainer: &Trainer,
    background: Option<BackgroundCheckpointer>,
    newest: u64,
    mut log: JobNotes,
    error: TrainError,
) -> RankEnd {
    let state = trainer.state();
    let (step, cursor) = (state.step, state.cursor);
    let encoded = match Encoded::of(&state) {
        Ok(encoded) => encoded,
        Err(e) => {
            tracing::warn!(error = %e, step, "the survivor's state could not be encoded; the gang resumes without it");
            return broken(GenerationEnd::PeerLost, step, error);
        }
    };
    peer::HELD.hold_encoded(&train.job_id, state, &encoded);
    if step <= newest {
        log.note(format!("a gang member was lost after step {step}: holding its state (the newest checkpoint)"));
        return broken(GenerationEnd::PeerLost, step, error);
    }
    let background = match background.map_or_else(|| open_checkpointer(context, train, runtime), Ok) {
        Ok(background) => background,
        Err(e) => {
            tracing::warn!(error = %e, step, "no checkpoint writer for the survivor's state");
            return broken(GenerationEnd::PeerLost, step, error);
        }
    };
    let announced = Box::new(checkpoint_ref(step, cursor, background.uri_of_step(step), &encoded.manifest));
    // The save in flight may be of this very step (the break came in the next step's
    // all-reduce): its record then confirms the announcement, and nothing is written twice.
    let written_already = background.in_flight() == Some(step);
    log.note(format!(
        "a gang member was lost after step {step} ({}): holding the state of step {step} for the next generation \
         and announcing its checkpoint",
        error_text(&error)
    ));
    drop(log);
    let context = context.clone();
    let write: SurvivorWrite = Box::new(move |kept| {
        if kept && !written_already {
            finish_after_stop(&context, Some((background, encoded)), None, step);
        } else {
            // Dropped off the async reporter: a save in flight ends and the writer's thread is
            // joined (an older save's record is refused once the generation ended: no harm).
            std::thread::spawn(move || drop((background, encoded)));
        }
    });
    RankEnd::PeerLost { step, error: error_text(&error), announced, write }
}

/// Rank 0's background writer of the job's checkpoints. A cluster names them by generation too
/// (two generations may save one step); a standalone run is one generation: `ckpt/<step>`.
fn open_checkpointer(
    context: &RankContext,
    train: &TrainAssignment,
    runtime: &tokio::runtime::Handle,
) -> Result<BackgroundCheckpointer, CheckpointError> {
    let opened = Checkpointer::open(&train.job_prefix).and_then(|c| match context.standalone() {
        Some(_) => Ok(c),
        None => c.with_suffix(&format!("g{}", train.generation)),
    })?;
    Ok(BackgroundCheckpointer::start(opened, recorder(context, train, runtime)))
}

/// How long rank 0 keeps trying to write the final checkpoint and the model while the store is
/// out: until they are written, the steps since the newest checkpoint and the model for the
/// registry exist only in its memory.
const FINAL_WRITE_WAIT_MAX: Duration = Duration::from_secs(600);
/// The first pause between such tries; each one after doubles, up to [`FINAL_WRITE_PAUSE_MAX`].
const FINAL_WRITE_PAUSE: Duration = Duration::from_secs(2);
const FINAL_WRITE_PAUSE_MAX: Duration = Duration::from_secs(60);

/// Runs `write` until it succeeds, fails for a reason other than the store being out, the rank
/// is stopped (a cancel), or [`FINAL_WRITE_WAIT_MAX`] would pass; the job log says each wait.
fn through_outage<T, E: std::fmt::Display + 'static>(
    context: &RankContext,
    log: &mut JobNotes,
    what: &str,
    write: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let waiting = |why: &str, pause: Duration| {
        log.note(format!("the store is out: {what} waits to be written ({why}); trying again in {pause:?}"));
        tracing::warn!(error = %why, "the store is out: {what} waits to be written");
    };
    retry_while_store_out(Some(&context.stop), waiting, write)
}

/// Runs `write` until it succeeds, fails for a reason other than the store being out, `stop` is
/// set, or [`FINAL_WRITE_WAIT_MAX`] would pass. Pauses [`FINAL_WRITE_PAUSE`] doubling to
/// [`FINAL_WRITE_PAUSE_MAX`] between tries; `waiting` hears each pause with the error's text.
fn retry_while_store_out<T, E: std::fmt::Display + 'static>(
    stop: Option<&AtomicBool>,
    mut waiting: impl FnMut(&str, Duration),
    mut write: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let stopped = || stop.is_some_and(|stop| stop.load(Ordering::Relaxed));
    let started = Instant::now();
    let mut pause = FINAL_WRITE_PAUSE;
    loop {
        let error = match write() {
            Ok(done) => return Ok(done),
            Err(e) => e,
        };
        if !super::work::store_outage(&error) || stopped() || started.elapsed() + pause > FINAL_WRITE_WAIT_MAX {
            return Err(error);
        }
        waiting(&error_text(&error), pause);
        let until = Instant::now() + pause;
        while Instant::now() < until && !stopped() {
            std::thread::sleep(Duration::from_millis(200)); // a cancel ends the wait at once
        }
        pause = (pause * 2).min(FINAL_WRITE_PAUSE_MAX);
    }
}

/// How long the stop's announced save waits for the regroup's first step on this worker.
const STOP_WRITE_DEFER_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Writes the stop step's announced checkpoint, and closes the job log (its queued writes: on
/// S3 a round trip each), after the rank has reported the stop. Both wait for this worker's
/// next generation to take its first step (at most [`STOP_WRITE_DEFER_MAX`]; a leaving member
/// does not wait): the gang holds the state in memory meanwhile, so the write need not compete
/// with the regroup for the cores. The agent does not exit before they end (its busy count).
fn finish_after_stop(
    context: &RankContext,
    write: Option<(BackgroundCheckpointer, Encoded)>,
    log: Option<JobNotes>,
    step: u64,
) {
    let shared = context.shared.clone();
    shared.busy.send_modify(|runs| *runs += 1);
    let seen = shared.first_steps();
    std::thread::spawn(move || {
        if !shared.noticed.load(Ordering::Relaxed) {
            shared.wait_first_step_after(seen, STOP_WRITE_DEFER_MAX);
        }
        // The checkpoint before the log: while the store is out, closing the log waits for its
        // queued segments, and the announced checkpoint is what a whole-gang loss resumes from.
        if let Some((background, encoded)) = write {
            write_stop_checkpoint(background, encoded, step);
        }
        drop(log);
        shared.busy.send_modify(|runs| *runs = runs.saturating_sub(1));
    });
}

/// Writes and records the stop's announced checkpoint (which confirms its pending record). A
/// survivor of a broken gang may still have had an older save in flight: it ends first. While
/// the store is out it is tried again as the final checkpoint is ([`FINAL_WRITE_WAIT_MAX`]):
/// until it is written, the state exists only in the gang's memory.
fn write_stop_checkpoint(mut background: BackgroundCheckpointer, encoded: Encoded, step: u64) {
    if let Some(Err(e)) = background.submit_encoded(encoded.clone()) {
        tracing::info!(error = %e, "an older checkpoint in flight at the break was not recorded");
    }
    // Not cancelled by the rank's stop flag: the next generation's assignment sets it, and this
    // checkpoint is written for the gang that goes on.
    let waiting = |why: &str, pause: Duration| {
        tracing::warn!(step, error = %why, "the store is out: the stop's checkpoint waits to be written; trying again in {pause:?}");
    };
    let mut first = true;
    let outcome = retry_while_store_out(None, waiting, || {
        if !std::mem::take(&mut first) {
            let _ = background.submit_encoded(encoded.clone());
        }
        background.finish().transpose()
    });
    match outcome {
        Ok(Some(saved)) => {
            AGENT.checkpoints.inc();
            AGENT.checkpoint_bytes.inc_by(saved.manifest.total_bytes());
            AGENT.checkpoint_seconds.observe(saved.background_ms / 1e3);
            tracing::info!(step, ms = saved.background_ms, uri = saved.uri, "the stop's checkpoint is written");
        }
        Err(e) => tracing::warn!(
            step,
            error = %e,
            "the stop's checkpoint was not written; the gang resumed from the state its members hold, \
             and the next checkpoint replaces this one"
        ),
        Ok(None) => {}
    }
}

/// The reference the coordinator records for a checkpoint.
fn checkpoint_ref(step: u64, cursor: Cursor, uri: String, manifest: &Manifest) -> CheckpointRef {
    CheckpointRef {
        step,
        uri,
        size_bytes: manifest.total_bytes(),
        manifest_sha256: manifest.fingerprint(),
        cursor: Some(DataCursor { epoch: cursor.epoch as u32, global_sample_offset: cursor.global_sample_offset }),
        pending: false,
    }
}

/// The background writer's hook: record the written checkpoint before it counts as saved.
fn recorder(
    context: &RankContext,
    train: &TrainAssignment,
    runtime: &tokio::runtime::Handle,
) -> impl FnMut(&Saved) -> Result<(), String> + Send + 'static {
    let context = context.clone();
    let (train, runtime) = (train.clone(), runtime.clone());
    move |saved| {
        let checkpoint = checkpoint_ref(saved.step, saved.cursor, saved.uri.clone(), &saved.manifest);
        record_checkpoint(&context, &train, &runtime, checkpoint)?;
        // Recorded: the job's newest checkpoint, for its warm spares to hold.
        super::work::push_to_spares(&context, &train.job_id, train.generation, saved.step, &saved.parts);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::SwapClock;
    use crate::train::StepReport;

    fn report(step: u64, replaced: Option<usize>) -> StepReport {
        StepReport {
            step,
            epoch: 0,
            loss: 1.0,
            samples: 64,
            samples_per_s: 0.0,
            learning_rate: 0.001,
            stop_agreed: false,
            replaced,
        }
    }

    #[test]
    fn a_survivor_times_a_live_swap_against_its_median_step_and_a_control_window() {
        let mut clock = SwapClock::default();
        let mut now = Instant::now();
        let mut notes = Vec::new();
        for step in 1..=40u64 {
            // Steps of 5 ms; a 20 ms one long before the swap, 9 ms while the replacement catches
            // up, 12 ms for the first step after it, 7 ms after that.
            now += Duration::from_millis(match step {
                10 => 20,
                25 => 9,
                31 => 12,
                33 => 7,
                _ => 5,
            });
            let replaced = (step == 30).then_some(1);
            notes.extend(clock.step(&report(step, replaced), 0, now).map(|t| (t.step, t.longest_ms, t.note)));
        }
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert_eq!(notes[0].0, 30);
        assert!((notes[0].1 - 12.0).abs() < 1e-6, "{}", notes[0].1);
        assert_eq!(
            notes[0].2,
            "rank 1 was swapped live after step 30: longest time without a step over the last 16 steps 12.0 ms \
             (median step 5.0 ms; the first step with the new member 12.0 ms; the longest of the 12 steps before it \
             9.0 ms, of the 3 after it 7.0 ms; over the 16 steps before them 20.0 ms, median 5.0 ms)"
        );
        // The swapped rank itself times nothing (it left).
        let mut leaver = SwapClock::default();
        assert!((1..=40).filter_map(|s| leaver.step(&report(s, (s == 30).then_some(0)), 0, now)).next().is_none());
    }
}
