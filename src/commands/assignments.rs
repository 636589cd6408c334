//! The agent's work: follow this worker's assignment stream and train the assigned rank.
//!
//! ```text
//!   TrainAssignment ─▶ thread: load data ─▶ ring rendezvous ─▶ resume checkpoint ─▶ step loop
//!   CheckpointNow / notice / SIGTERM ─▶ vote to stop (rides in the next all-reduce) ─▶ every
//!        rank stops after the same step ─▶ rank 0 saves + records it ─▶ GenerationEnded
//!   StopJob / a newer TrainAssignment ─▶ stop at once (no report)
//!   Drain ─▶ the process exits once idle (the instance is going away)
//!   InferAssignment ─▶ lease, predict and commit shards until released (`infer_worker`)
//! ```
//!
//! Rank 0 checkpoints in the background ([`BackgroundCheckpointer`]): a snapshot every
//! `every_steps - lag` steps, where `lag = every_steps / 4` is how many steps a save may take
//! before the loop waits for it. So the newest *recorded* checkpoint is never more than
//! `checkpoint.every_steps` steps behind, whichever worker dies when.
//!
//! How a generation ends, and who reports it: rank 0 reports the finish (with metrics) and
//! orderly stops; every rank reports a broken collective, an unusable checkpoint or an error
//! (the coordinator takes the first report of a generation and refuses the rest).

use std::net::{SocketAddr, TcpListener};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_proto::client::ApiClient;
use flotilla_proto::convert::spec_from_proto;
use flotilla_proto::v1::{
    CheckpointRef, CheckpointReport, DataCursor, FinishedReport, GenerationEnd, JobMetrics, ProgressReport,
    TrainAssignment, WatchAssignmentsRequest, assignment,
};
use flotilla_worker::checkpoint::CheckpointError;
use flotilla_worker::checkpoint::state::{self, BackgroundCheckpointer, Checkpointer, Saved};
use flotilla_worker::collective::ring::{RingCommunicator, RingConfig};
use flotilla_worker::data::{self, Dataset};
use flotilla_worker::joblog::JobLog;
use flotilla_worker::train::{TrainError, Trainer};
use tokio::sync::watch;

/// Time for a gang to form and for any one collective operation.
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a refused connection to a peer's data port is retried: agents listen for their
/// whole life, so a refusal means the peer is gone.
const REFUSED_GRACE: Duration = Duration::from_secs(1);
/// Pause before re-opening a broken assignment stream.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// Rank 0 reports live progress at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Progress reports queued at most; older ones are dropped when the coordinator is slow.
const PROGRESS_QUEUE_MAX: usize = 4;

/// What the agent's parts share: the interruption flag, whether a training runs, and the
/// coordinator's order to drain.
#[derive(Default)]
pub struct AgentShared {
    /// Set on a spot notice or SIGTERM, before it is reported: a Drain from the coordinator
    /// is obeyed only then.
    pub noticed: AtomicBool,
    /// Set once the coordinator heard of the interruption (or could not be told): the running
    /// generation votes to stop at the next step boundary.
    pub interrupted: AtomicBool,
    /// Training runs in progress on this worker (a superseded one may still be ending).
    pub busy: watch::Sender<usize>,
    /// The coordinator told this worker to drain: no more work will come.
    pub drained: tokio::sync::Notify,
    /// Wakes the heartbeat loop (after a broken gang, so the coordinator can regroup at once).
    pub beat_now: tokio::sync::Notify,
}

/// A training run in progress on this worker.
struct Running {
    job_id: String,
    generation: u64,
    /// Stop at once without reporting (superseded); also aborts a rendezvous in progress.
    stop: Arc<AtomicBool>,
    /// The coordinator asked for a checkpoint at the next step boundary.
    checkpoint_now: Arc<AtomicBool>,
}

/// Follows the assignment stream of whichever worker id `registered` holds, until the process
/// ends. `listener` is this worker's data port (advertised at registration).
pub async fn follow(
    mut client: ApiClient,
    mut registered: watch::Receiver<Option<String>>,
    listener: TcpListener,
    shared: Arc<AgentShared>,
) {
    let listener = Arc::new(listener);
    let mut running: Option<Running> = None;
    // The inference loop: (worker id, job id, its control).
    let mut inferring: Option<(String, String, Arc<super::infer_worker::LoopControl>)> = None;
    loop {
        let Some(worker_id) = registered.borrow_and_update().clone() else {
            if registered.changed().await.is_err() {
                return;
            }
            continue;
        };
        let request = WatchAssignmentsRequest { worker_id: worker_id.clone() };
        let stream = client
            .call_cluster(|mut c| {
                let request = request.clone();
                async move { c.watch_assignments(request).await }
            })
            .await;
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch assignments; retrying");
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        loop {
            // A new registration (this worker was declared lost and joined again) watches
            // under its new id.
            let message = tokio::select! {
                message = stream.message() => message,
                _ = registered.changed() => break,
            };
            let Ok(Some(message)) = message else { break };
            match message.kind {
                Some(assignment::Kind::Train(train)) => {
                    // A re-opened stream repeats the current assignment: keep training.
                    if running.as_ref().is_some_and(|r| r.job_id == train.job_id && r.generation == train.generation) {
                        continue;
                    }
                    if let Some(old) = running.take() {
                        old.stop.store(true, Ordering::Relaxed);
                    }
                    let run = Running {
                        job_id: train.job_id.clone(),
                        generation: train.generation,
                        stop: Arc::new(AtomicBool::new(false)),
                        checkpoint_now: Arc::new(AtomicBool::new(false)),
                    };
                    let context = RankContext {
                        client: client.clone(),
                        worker_id: worker_id.clone(),
                        stop: run.stop.clone(),
                        checkpoint_now: run.checkpoint_now.clone(),
                        shared: shared.clone(),
                    };
                    running = Some(run);
                    tokio::spawn(train_and_report(context, train, listener.clone()));
                }
                Some(assignment::Kind::CheckpointNow(order)) => {
                    if let Some(run) =
                        running.as_ref().filter(|r| r.job_id == order.job_id && r.generation == order.generation)
                    {
                        run.checkpoint_now.store(true, Ordering::Relaxed);
                    }
                }
                Some(assignment::Kind::Stop(stop)) => {
                    if let Some(run) = running.take_if(|r| r.job_id == stop.job_id && r.generation == stop.generation) {
                        run.stop.store(true, Ordering::Relaxed);
                    }
                    if let Some((_, _, control)) = inferring.take_if(|(_, job, _)| *job == stop.job_id) {
                        control.stop();
                    }
                }
                Some(assignment::Kind::Infer(infer)) => {
                    // A re-sent membership (a re-opened stream, or joined again after a
                    // release) goes to the loop still running for it.
                    if inferring
                        .as_ref()
                        .is_some_and(|(w, job, control)| *w == worker_id && *job == infer.job_id && control.rejoin())
                    {
                        continue;
                    }
                    let control = super::infer_worker::LoopControl::start();
                    let run = (worker_id.clone(), infer.job_id.clone(), control.clone());
                    if let Some((_, _, old)) = inferring.replace(run) {
                        old.stop();
                    }
                    tokio::spawn(super::infer_worker::infer_and_commit(
                        client.clone(),
                        worker_id.clone(),
                        infer,
                        control,
                        shared.clone(),
                    ));
                }
                Some(assignment::Kind::Drain(drain)) => {
                    // Exit only after our own interruption (notice, SIGTERM): a coordinator
                    // that does not know this worker id (lease expired, lagging node) is
                    // answered by registering again, in the heartbeat loop.
                    if shared.noticed.load(Ordering::Relaxed) {
                        tracing::warn!(reason = %drain.reason, "the coordinator drains this worker");
                        shared.drained.notify_one();
                    } else {
                        tracing::info!(reason = %drain.reason, "drain ignored: this worker was not interrupted");
                    }
                }
                None => {}
            }
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

/// What one training run needs from the agent.
struct RankContext {
    client: ApiClient,
    worker_id: String,
    stop: Arc<AtomicBool>,
    checkpoint_now: Arc<AtomicBool>,
    shared: Arc<AgentShared>,
}

impl RankContext {
    fn stop_voted(&self) -> bool {
        self.checkpoint_now.load(Ordering::Relaxed) || self.shared.interrupted.load(Ordering::Relaxed)
    }
}

/// How a rank's run ended.
enum RankEnd {
    /// Training is done. Rank 0 carries the report (with metrics); other ranks `None`.
    Finished(Option<Box<FinishedReport>>),
    /// Stopped in order after `step` (vote); rank 0 saved and recorded that step.
    Checkpointed { step: u64, rank0: bool },
    /// Superseded (StopJob, or a newer assignment): report nothing.
    Superseded,
    /// Ended abnormally; every rank reports (the coordinator keeps the first).
    Broken { end: GenerationEnd, step: u64, error: String, unusable_step: u64 },
}

async fn train_and_report(context: RankContext, train: TrainAssignment, listener: Arc<TcpListener>) {
    let (job_id, generation, rank) = (train.job_id.clone(), train.generation, train.rank);
    tracing::info!(job = %job_id, generation, rank, world = train.world_size, "training");
    context.shared.busy.send_modify(|runs| *runs += 1);
    let mut client = context.client.clone();
    let worker_id = context.worker_id.clone();
    let shared = context.shared.clone();
    let stop = context.stop.clone();
    // A plain thread, not spawn_blocking: the data loader runs its own runtime and refuses to
    // start inside another one.
    let (done, outcome) = tokio::sync::oneshot::channel();
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::channel::<ProgressReport>(PROGRESS_QUEUE_MAX);
    let runtime = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        let _ = done.send(run_rank(&context, train, &listener, &progress_tx, &runtime));
    });
    let mut reporter = client.clone();
    tokio::spawn(async move {
        while let Some(report) = progress_rx.recv().await {
            let _ = reporter
                .call_cluster(|mut c| {
                    let report = report.clone();
                    async move { c.report_progress(report).await }
                })
                .await;
        }
    });
    let end = match outcome.await {
        Ok(end) => end,
        Err(_) => {
            tracing::error!(job = %job_id, "training thread panicked");
            RankEnd::Broken {
                end: GenerationEnd::RetryableError,
                step: 0,
                error: "the training thread panicked".into(),
                unusable_step: 0,
            }
        }
    };
    let base = FinishedReport { worker_id, job_id: job_id.clone(), generation, ..Default::default() };
    let report = match end {
        RankEnd::Finished(Some(report)) => Some(*report),
        RankEnd::Finished(None) | RankEnd::Superseded => None,
        RankEnd::Checkpointed { step, rank0 } => {
            rank0.then(|| FinishedReport { end: GenerationEnd::Checkpointed.into(), step, ..base })
        }
        RankEnd::Broken { .. } if stop.load(Ordering::Relaxed) => None, // superseded meanwhile
        RankEnd::Broken { end, step, error, unusable_step } => {
            tracing::warn!(job = %job_id, generation, rank, error = %error, "generation ended");
            Some(FinishedReport { end: end.into(), step, error, unusable_checkpoint_step: unusable_step, ..base })
        }
    };
    if let Some(report) = report {
        let sent = client
            .call_cluster(|mut c| {
                let report = report.clone();
                async move { c.report_finished(report).await }
            })
            .await;
        if let Err(e) = sent {
            // Refused when another rank's report came first: the normal case for a broken gang.
            tracing::debug!(job = %job_id, error = %e, "end of generation not recorded");
        }
    }
    // Heartbeat at once: after a broken gang, the coordinator regroups only workers it has heard
    // from since the break.
    shared.beat_now.notify_one();
    shared.busy.send_modify(|runs| *runs = runs.saturating_sub(1));
}

/// Writes a line to the job log (rank 0 only; a log that cannot be written is not fatal).
struct LogLine(Option<JobLog>);

impl LogLine {
    fn line(&mut self, text: String) {
        if let Some(log) = self.0.as_mut()
            && let Err(e) = log.line(&text).and_then(|()| log.flush())
        {
            tracing::warn!(error = %e, "could not write the job log");
        }
    }
}

fn broken(end: GenerationEnd, step: u64, error: impl std::fmt::Display) -> RankEnd {
    RankEnd::Broken { end, step, error: format!("{error:#}"), unusable_step: 0 }
}

/// Classifies a training error: a lost peer is not the job's fault; a NaN loss is final.
fn train_error_end(e: &TrainError) -> GenerationEnd {
    match e {
        TrainError::Collective(_) => GenerationEnd::PeerLost,
        TrainError::NonFiniteLoss { .. } => GenerationEnd::Finished,
        _ => GenerationEnd::RetryableError,
    }
}

/// Trains this rank until the job ends, the gang votes to stop, or it is superseded.
fn run_rank(
    context: &RankContext,
    train: TrainAssignment,
    listener: &TcpListener,
    progress: &tokio::sync::mpsc::Sender<ProgressReport>,
    runtime: &tokio::runtime::Handle,
) -> RankEnd {
    let spec = match train.spec.clone().context("the assignment has no spec").and_then(|s| Ok(spec_from_proto(s)?)) {
        Ok(spec) => spec,
        Err(e) => return broken(GenerationEnd::RetryableError, 0, e),
    };
    let resume_step = train.resume_from.as_ref().map_or(0, |c| c.step);
    let mut peers = train.peers.clone();
    peers.sort_by_key(|p| p.rank);
    let addresses: anyhow::Result<Vec<SocketAddr>> = peers
        .iter()
        .map(|p| p.data_addr.parse().with_context(|| format!("peer {} data address `{}`", p.worker_id, p.data_addr)))
        .collect();
    let addresses = match addresses {
        Ok(a) => a,
        Err(e) => return broken(GenerationEnd::RetryableError, resume_step, e),
    };
    let (train_set, validation_set) = match job_data(&spec) {
        Ok(sets) => sets,
        Err(e) => return broken(GenerationEnd::RetryableError, resume_step, e),
    };
    let job_number = train.job_id.parse::<flotilla_proto::JobId>().map_or(0, |j| j.0);
    let mut config = RingConfig::new(
        train.rank as usize,
        addresses,
        job_number << 24 | (train.generation & 0xff_ffff),
        train.gang_secret.clone(),
        COLLECTIVE_TIMEOUT,
    );
    config.refused_grace = REFUSED_GRACE;
    config.abort = Some(context.stop.clone());
    let rank0 = train.rank == 0;
    let mut log = LogLine(
        (rank0 && !train.job_prefix.is_empty())
            .then(|| JobLog::open(&train.job_prefix))
            .and_then(|opened| opened.map_err(|e| tracing::warn!(error = %e, "job log unavailable")).ok()),
    );
    log.line(format!(
        "generation {}: training on {} worker(s), {} train rows",
        train.generation, train.world_size, train_set.rows
    ));
    let listener = match listener.try_clone() {
        Ok(l) => l,
        Err(e) => return broken(GenerationEnd::RetryableError, resume_step, e),
    };
    let mut comm = match RingCommunicator::connect(listener, config) {
        Ok(comm) => comm,
        Err(e) => return broken(GenerationEnd::PeerLost, resume_step, e),
    };
    let resume = match &train.resume_from {
        Some(reference) => match state::load_uri(&reference.uri) {
            Ok((state, _)) => {
                log.line(format!("resuming from the checkpoint of step {} ({})", reference.step, reference.uri));
                Some(state)
            }
            Err(e) if e.is_unusable() => {
                log.line(format!("checkpoint of step {} is unusable: {e}", reference.step));
                return RankEnd::Broken {
                    end: GenerationEnd::CheckpointUnusable,
                    step: reference.step,
                    error: e.to_string(),
                    unusable_step: reference.step,
                };
            }
            Err(e) => return broken(GenerationEnd::RetryableError, resume_step, e),
        },
        None => None,
    };
    let mut trainer = match Trainer::new(&spec, train_set.clone(), &mut comm, resume) {
        Ok(trainer) => trainer,
        Err(e) => return broken(train_error_end(&e), resume_step, e),
    };
    let mut background = None;
    if rank0 && !train.job_prefix.is_empty() {
        let opened =
            Checkpointer::open(&train.job_prefix).and_then(|c| c.with_suffix(&format!("g{}", train.generation)));
        match opened {
            Ok(checkpointer) => {
                background = Some(BackgroundCheckpointer::start(checkpointer, recorder(context, &train, runtime)))
            }
            Err(e) => return broken(GenerationEnd::RetryableError, resume_step, e),
        }
    }
    let every = spec.checkpoint.every_steps.max(1);
    let lag = every / 4;
    let cadence = every - lag;
    let mut saves =
        SaveTracker { last_snapshot: trainer.steps_done(), last_saved: trainer.steps_done(), stall_ms: 0.0, count: 0 };
    let started = Instant::now();
    let first_step = trainer.steps_done();
    let mut last_report: Option<Instant> = None;
    let mut save_failed: Option<CheckpointError> = None;
    let outcome = trainer.run(&mut comm, |trainer, report| {
        if context.stop.load(Ordering::Relaxed) {
            return ControlFlow::Break(());
        }
        if context.stop_voted() {
            trainer.vote_stop();
        }
        if rank0 && last_report.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
            last_report = Some(Instant::now());
            let done = report.step.saturating_sub(first_step).max(1);
            let left = trainer.total_steps().saturating_sub(report.step);
            let eta_ms = (started.elapsed().as_millis() as u64 / done).saturating_mul(left);
            log.line(format!(
                "step {}/{} epoch {} loss {:.4} {:.0} samples/s",
                report.step,
                trainer.total_steps(),
                report.epoch,
                report.loss,
                report.samples_per_s
            ));
            let _ = progress.try_send(ProgressReport {
                worker_id: context.worker_id.clone(),
                job_id: train.job_id.clone(),
                generation: train.generation,
                rank: 0,
                step: report.step,
                loss: f64::from(report.loss),
                samples_per_s: report.samples_per_s,
                total_steps: trainer.total_steps(),
                eta_ms,
                ..Default::default()
            });
        }
        let Some(background) = background.as_mut() else { return ControlFlow::Continue(()) };
        let boundary = Instant::now();
        let mut outcomes = Vec::new();
        outcomes.extend(background.poll());
        if background.in_flight().is_some_and(|s| report.step >= s + lag) {
            outcomes.extend(background.finish()); // the save fell `lag` steps behind: wait
        }
        if report.stop_agreed {
            if saves.last_saved != report.step && background.in_flight() != Some(report.step) {
                outcomes.extend(background.submit(trainer.state(), None));
            }
            outcomes.extend(background.finish());
        } else if report.step - saves.last_snapshot >= cadence && !trainer.is_finished() {
            saves.last_snapshot = report.step;
            outcomes.extend(background.submit(trainer.state(), None));
        }
        saves.stall_ms += boundary.elapsed().as_secs_f64() * 1e3;
        for outcome in outcomes {
            match outcome {
                Ok(saved) => {
                    saves.last_saved = saved.step;
                    saves.count += 1;
                    log.line(format!(
                        "checkpoint at step {} ({} bytes in {:.1} ms in the background; stall so far {:.1} ms)",
                        saved.step,
                        saved.manifest.total_bytes(),
                        saved.background_ms,
                        saves.stall_ms
                    ));
                }
                Err(e) => {
                    tracing::warn!(error = %e, step = report.step, "checkpoint failed; training continues");
                    if report.stop_agreed {
                        save_failed = Some(e);
                    }
                }
            }
        }
        ControlFlow::Continue(())
    });
    let last = match outcome {
        Ok(last) => last,
        Err(e) => {
            // A survivor with a save in flight finishes recording it first: it may be the
            // checkpoint the next generation resumes from.
            drop(background);
            return broken(train_error_end(&e), trainer.steps_done(), e);
        }
    };
    if context.stop.load(Ordering::Relaxed) {
        return RankEnd::Superseded;
    }
    if last.is_some_and(|r| r.stop_agreed) && !trainer.is_finished() {
        if let Some(e) = save_failed {
            return broken(
                GenerationEnd::RetryableError,
                trainer.steps_done(),
                format!("checkpoint before stopping: {e}"),
            );
        }
        log.line(format!(
            "stopped at step {} for a checkpoint (generation {})",
            trainer.steps_done(),
            train.generation
        ));
        return RankEnd::Checkpointed { step: trainer.steps_done(), rank0 };
    }
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
            let _ = background.submit(trainer.state(), values);
            if let Some(Err(e)) = background.finish() {
                tracing::warn!(error = %e, "the final checkpoint was not saved");
            }
        }
    }
    // The model for the registry: safetensors beside the checkpoints, and the data's fingerprint.
    let (artifact_uri, dataset_sha256) = if train.job_prefix.is_empty() {
        (String::new(), String::new())
    } else {
        let exported = flotilla_worker::train::export::safetensors(&spec.model, trainer.layout(), trainer.params())
            .map_err(anyhow::Error::from)
            .and_then(|bytes| {
                Ok(state::write_artifact(&format!("{}/model", train.job_prefix), "model.safetensors", bytes)?)
            });
        match exported {
            Ok(uri) => (uri, flotilla_worker::train::export::dataset_sha256(&train_set)),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "the model could not be exported; it will not be registered");
                (String::new(), String::new())
            }
        }
    };
    let accuracy = metrics.map_or("n/a".to_string(), |m| format!("{:.4}", m.val_accuracy));
    log.line(format!(
        "finished at step {}: val_accuracy {accuracy}; this generation: {} steps in {:.3} s, {} checkpoint(s), \
         checkpoint stall {:.1} ms",
        trainer.steps_done(),
        trainer.steps_done() - first_step,
        started.elapsed().as_secs_f64(),
        saves.count,
        saves.stall_ms
    ));
    RankEnd::Finished(Some(Box::new(FinishedReport {
        worker_id: context.worker_id.clone(),
        job_id: train.job_id,
        generation: train.generation,
        success: true,
        error: String::new(),
        metrics: Some(JobMetrics {
            val_accuracy: metrics.map(|m| m.val_accuracy),
            val_loss: metrics.map(|m| m.val_loss),
            train_loss: last.map(|r| f64::from(r.loss)),
            samples_per_s: last.map(|r| r.samples_per_s),
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
    })))
}

/// A job's data sets: (train, validation).
type JobData = (Arc<Dataset>, Option<Arc<Dataset>>);

/// The data of the last job this worker trained, kept across its generations: regrouping after
/// a preemption does not reload and re-parse the data set (a few hundred ms for MNIST 5k).
static DATA_CACHE: std::sync::Mutex<Option<(String, JobData)>> = std::sync::Mutex::new(None);

fn job_data(spec: &flotilla_proto::spec::JobSpec) -> anyhow::Result<JobData> {
    let key = format!("{:?}/{}", spec.data, spec.train.seed);
    if let Ok(cache) = DATA_CACHE.lock()
        && let Some((cached, sets)) = cache.as_ref()
        && *cached == key
    {
        return Ok(sets.clone());
    }
    let splits = data::load_job_data(&spec.data, spec.train.seed).context("loading the training data")?;
    let sets = (Arc::new(splits.train), splits.validation.map(Arc::new));
    if let Ok(mut cache) = DATA_CACHE.lock() {
        *cache = Some((key, sets.clone()));
    }
    Ok(sets)
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
}

/// The background writer's hook: record the written checkpoint with the coordinator (through
/// Raft) before it counts as saved.
fn recorder(
    context: &RankContext,
    train: &TrainAssignment,
    runtime: &tokio::runtime::Handle,
) -> impl FnMut(&Saved) -> Result<(), String> + Send + 'static {
    let (client, runtime) = (context.client.clone(), runtime.clone());
    let (worker_id, job_id, generation) = (context.worker_id.clone(), train.job_id.clone(), train.generation);
    move |saved| {
        let report = CheckpointReport {
            worker_id: worker_id.clone(),
            job_id: job_id.clone(),
            generation,
            checkpoint: Some(CheckpointRef {
                step: saved.step,
                uri: saved.uri.clone(),
                size_bytes: saved.manifest.total_bytes(),
                manifest_sha256: saved.manifest.fingerprint(),
                cursor: Some(DataCursor {
                    epoch: saved.cursor.epoch as u32,
                    global_sample_offset: saved.cursor.global_sample_offset,
                }),
            }),
        };
        let mut client = client.clone();
        runtime
            .block_on(client.call_cluster(|mut c| {
                let report = report.clone();
                async move { c.report_checkpoint(report).await }
            }))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}
