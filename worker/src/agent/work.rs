//! The agent's work: follow this worker's assignment stream and run the assigned rank with the
//! job's runner: the built-in trainer ([`super::builtin`]) or the user's command
//! ([`super::command`]). Both end a generation the same way ([`RankEnd`]) and record
//! checkpoints through the same call ([`record_checkpoint`]).
//!
//! ```text
//!   TrainAssignment ─▶ thread: runner (built-in | command) ─▶ RankEnd ─▶ report (ReportFinished)
//!   CheckpointNow / notice / SIGTERM ─▶ the runner stops in order after a checkpoint
//!        (built-in: a vote in the next all-reduce; command: the notice signal to the program)
//!   StopJob / a newer TrainAssignment ─▶ stop at once (no report)
//!   Drain ─▶ the process exits once idle (the instance is going away)
//!   InferAssignment ─▶ lease, predict and commit shards until released ([`super::inference`])
//! ```
//!
//! How a generation ends, and who reports it: rank 0 reports the finish (with metrics) and
//! orderly stops; every rank reports a broken collective, an unusable checkpoint or an error
//! (the coordinator takes the first report of a generation and refuses the rest).

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_proto::client::ApiClient;
use flotilla_proto::convert::spec_from_proto;
use flotilla_proto::v1::{
    CheckpointRef, CheckpointReport, FinishedReport, GenerationEnd, ProgressReport, TrainAssignment,
    WatchAssignmentsRequest, assignment,
};
use tokio::sync::watch;

use crate::checkpoint::push;
use crate::collective::port::DataPort;
use crate::collective::ring::{RingCommunicator, RingConfig};
use crate::history::HistoryWriter;
use crate::joblog::JobLog;

/// Time for a gang to form and for any one collective operation.
pub(super) const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a refused connection to a peer's data port is retried: agents listen for their
/// whole life, so a refusal means the peer is gone.
const REFUSED_GRACE: Duration = Duration::from_secs(1);
/// Pause before re-opening a broken assignment stream.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// Rank 0 reports live progress at most this often.
pub(super) const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long a noticed member's stopped rank waits for the checkpoint order that names its
/// replacement (the gang may agree to stop on a peer's order first).
const PUSH_TARGET_WAIT_MAX: Duration = Duration::from_secs(2);
/// Progress reports queued at most; older ones are dropped when the coordinator is slow.
const PROGRESS_QUEUE_MAX: usize = 4;
/// Metrics history points (one a second) waiting for a slow store at most; later ones are
/// dropped (the history is best effort; the progress reports are not held up).
const HISTORY_QUEUE_MAX: usize = 600;

/// What the agent's parts share: the interruption flag, whether a training runs, and the
/// coordinator's order to drain.
#[derive(Default)]
pub struct AgentShared {
    /// Set on a spot notice, a rebalance recommendation or SIGTERM, before it is reported:
    /// this worker leaves its gang at the next stop, and a Drain from the coordinator is obeyed
    /// only then.
    pub noticed: AtomicBool,
    /// A spot notice or SIGTERM was reported (each is reported once).
    pub notice_reported: AtomicBool,
    /// A rebalance recommendation was reported (once; a spot notice that follows is reported
    /// too).
    pub rebalance_reported: AtomicBool,
    /// Set once the coordinator heard of the interruption (or could not be told): the running
    /// generation votes to stop at the next step boundary.
    pub interrupted: AtomicBool,
    /// When this worker's instance is taken (unix ms, 0: unknown), from its own spot notice.
    pub taken_at_unix_ms: AtomicU64,
    /// The coordinator answered this worker's notice by seeking a replacement (a handover):
    /// its rank may be told where to push its state when the gang stops.
    pub handover_sought: AtomicBool,
    /// Training runs in progress on this worker (a superseded one may still be ending).
    pub busy: watch::Sender<usize>,
    /// The coordinator told this worker to drain: no more work will come.
    pub drained: tokio::sync::Notify,
    /// Wakes the heartbeat loop (after a broken gang, so the coordinator can regroup at once;
    /// when a handover's preparation is done, so it can hand over at once).
    pub beat_now: tokio::sync::Notify,
    /// The job this worker has prepared for a handover (`PrepareJob` done), empty when none;
    /// every heartbeat carries it. Cleared when a new preparation or a generation starts.
    pub prepared_job: Mutex<String>,
    /// The warm spares of the job this worker is rank 0 of (the coordinator's `Spares`), and
    /// whether a push of a checkpoint to them is under way (see [`push_to_spares`]).
    pub spares: Mutex<Option<flotilla_proto::v1::Spares>>,
    pushing_to_spares: AtomicBool,
    /// First steps this worker's ranks took (one per generation), and its signal: work a stop
    /// leaves for later (rank 0's save) waits for the regroup's first step.
    first_steps: Mutex<u64>,
    first_step_taken: std::sync::Condvar,
}

impl AgentShared {
    /// The job reported prepared in the next heartbeats ("" for none).
    pub fn set_prepared(&self, job_id: &str) {
        let mut prepared = self.prepared_job.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        job_id.clone_into(&mut prepared);
    }

    pub fn prepared(&self) -> String {
        self.prepared_job.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// A rank of this worker took its generation's first step.
    pub fn note_first_step(&self) {
        *self.first_steps.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) += 1;
        self.first_step_taken.notify_all();
    }

    /// First steps taken so far (see [`AgentShared::wait_first_step_after`]).
    pub fn first_steps(&self) -> u64 {
        *self.first_steps.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until a rank of this worker takes a first step beyond the `seen` ones (the next
    /// generation trains), at most `max`.
    pub fn wait_first_step_after(&self, seen: u64, max: Duration) {
        let steps = self.first_steps.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let _ = self.first_step_taken.wait_timeout_while(steps, max, |taken| *taken <= seen);
    }
}

/// A training run in progress on this worker.
struct Running {
    job_id: String,
    generation: u64,
    /// Stop at once without reporting (superseded); also aborts a rendezvous in progress.
    stop: Arc<AtomicBool>,
    /// Ends a wait in the ring (rendezvous or collective): set with `stop`, and alone when a
    /// gang member went silent (the rank then reports the state it holds).
    abort: Arc<AtomicBool>,
    /// The coordinator asked for a checkpoint at the next step boundary.
    checkpoint_now: Arc<AtomicBool>,
    /// ... by this time (unix ms, 0: none named): a noticed member's instance is taken then.
    deadline_unix_ms: Arc<AtomicU64>,
    /// Where this (leaving) member pushes its stop-step state, once told.
    handover_to: Arc<Mutex<Option<HandoverTarget>>>,
    /// Where this (leaving) member streams its state for a live handover, once told.
    live_to: Arc<Mutex<Option<HandoverTarget>>>,
}

/// Follows the assignment stream of whichever worker id `registered` holds, until the process
/// ends. `listener` is this worker's data port (advertised at registration).
pub async fn follow(
    mut client: ApiClient,
    mut registered: watch::Receiver<Option<String>>,
    listener: TcpListener,
    shared: Arc<AgentShared>,
) {
    // The data port carries the ring rendezvous and a handover's state push.
    let port = match DataPort::start(listener, Some(Arc::new(push::serve))) {
        Ok(port) => port,
        Err(e) => {
            tracing::error!(error = %e, "the data port cannot be served; this worker takes no training");
            return;
        }
    };
    let mut running: Option<Running> = None;
    // The inference loop: (worker id, job id, its control).
    let mut inferring: Option<(String, String, Arc<super::inference::LoopControl>)> = None;
    // The job this worker prepares (or prepared) for a handover or as a warm spare since its
    // last generation, and the handover push it was told to expect.
    let mut preparing: Option<String> = None;
    let mut expecting: Option<push::Expected> = None;
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
                        old.abort.store(true, Ordering::Relaxed);
                    }
                    shared.set_prepared("");
                    preparing = None;
                    train_on_until(&shared, train.train_until_unix_ms);
                    let run = Running {
                        job_id: train.job_id.clone(),
                        generation: train.generation,
                        stop: Arc::new(AtomicBool::new(false)),
                        abort: Arc::new(AtomicBool::new(false)),
                        checkpoint_now: Arc::new(AtomicBool::new(false)),
                        deadline_unix_ms: Arc::new(AtomicU64::new(0)),
                        handover_to: Arc::default(),
                        live_to: Arc::default(),
                    };
                    let context = RankContext {
                        host: Host::Cluster { client: Box::new(client.clone()), worker_id: worker_id.clone() },
                        stop: run.stop.clone(),
                        abort: run.abort.clone(),
                        checkpoint_now: run.checkpoint_now.clone(),
                        deadline_unix_ms: run.deadline_unix_ms.clone(),
                        handover_to: run.handover_to.clone(),
                        live_to: run.live_to.clone(),
                        shared: shared.clone(),
                    };
                    running = Some(run);
                    tokio::spawn(train_and_report(context, train, port.clone()));
                }
                // Reserved as a handover's replacement: load the data and compile the GPU
                // kernels in the background (a plain thread: the loader runs its own runtime),
                // then say so in the heartbeats (the leader hands over then). A re-sent
                // PrepareJob (a re-opened stream) for the same job starts nothing new. The
                // coordinator reserves only workers it counts free (a run of this agent that
                // is still ending meanwhile does not matter: loads are single-flight).
                Some(assignment::Kind::Prepare(prepare)) => {
                    // A handover's replacement: the leaving member pushes its stop-step state
                    // here before the regroup. A warm spare accepts that push (a handover may
                    // reserve it before its second PrepareJob arrives) but does not wait for it.
                    let expected = push::Expected {
                        job_id: prepare.job_id.clone(),
                        generation: prepare.generation,
                        key: prepare.handover_key.clone(),
                        spare: prepare.spare,
                    };
                    if !expected.key.is_empty() && expecting.as_ref() != Some(&expected) {
                        expecting = Some(expected.clone());
                        if expected.spare { push::accept(expected) } else { push::expect(expected) }
                    }
                    if preparing.as_deref() != Some(prepare.job_id.as_str()) {
                        preparing = Some(prepare.job_id.clone());
                        shared.set_prepared("");
                        let shared = shared.clone();
                        std::thread::spawn(move || super::builtin::prepare(prepare, &shared));
                    }
                }
                // Rank 0 of a job with warm spares: where to push each checkpoint it records.
                Some(assignment::Kind::Spares(spares)) => {
                    if let Ok(mut targets) = shared.spares.lock() {
                        *targets = Some(spares);
                    }
                }
                Some(assignment::Kind::CheckpointNow(order)) => {
                    if let Some(run) =
                        running.as_ref().filter(|r| r.job_id == order.job_id && r.generation == order.generation)
                    {
                        if order.member_lost {
                            // Its peer will never answer: the collective under way gives up
                            // and the rank reports the state it holds.
                            tracing::warn!(job = %order.job_id, "a gang member went silent; the rank stops waiting for it");
                            run.abort.store(true, Ordering::Relaxed);
                            continue;
                        }
                        run.deadline_unix_ms.store(order.deadline_unix_ms, Ordering::Relaxed);
                        if order.live {
                            // Not a stop: the rank starts streaming to the replacement at its
                            // next step boundary and trains on.
                            if let Ok(mut target) = run.live_to.lock() {
                                *target =
                                    Some(HandoverTarget { addr: order.handover_to_addr, key: order.handover_key });
                            }
                            continue;
                        }
                        if !order.handover_to_addr.is_empty()
                            && let Ok(mut target) = run.handover_to.lock()
                        {
                            *target = Some(HandoverTarget { addr: order.handover_to_addr, key: order.handover_key });
                        }
                        run.checkpoint_now.store(true, Ordering::Release);
                    }
                }
                Some(assignment::Kind::Stop(stop)) => {
                    if let Some(run) = running.take_if(|r| r.job_id == stop.job_id && r.generation == stop.generation) {
                        run.stop.store(true, Ordering::Relaxed);
                        run.abort.store(true, Ordering::Relaxed);
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
                    let control = super::inference::LoopControl::start();
                    let run = (worker_id.clone(), infer.job_id.clone(), control.clone());
                    if let Some((_, _, old)) = inferring.replace(run) {
                        old.stop();
                    }
                    tokio::spawn(super::inference::infer_and_commit(
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

/// A noticed worker that rejoins its job's gang with the state it holds (noticed while the job
/// waited; the coordinator seeks its replacement): its generation trains on rather than
/// stopping for the notice at the first step boundary, until `until_unix_ms`, when it votes the
/// stop itself unless the coordinator ordered a handover or a stop before (as after a notice
/// answered with a handover while training, see the notice's report). 0, or a worker not
/// noticed: nothing changes.
fn train_on_until(shared: &Arc<AgentShared>, until_unix_ms: u64) {
    let now = crate::unix_now_ms();
    if until_unix_ms <= now || !shared.noticed.load(Ordering::Relaxed) {
        return;
    }
    shared.handover_sought.store(true, Ordering::Release);
    shared.interrupted.store(false, Ordering::Release);
    let wait = Duration::from_millis(until_unix_ms - now);
    tracing::warn!(
        ?wait,
        "rejoining the gang with the state this noticed worker holds; training on while the coordinator seeks a replacement, at most this long"
    );
    let shared = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        shared.interrupted.store(true, Ordering::Release);
    });
}

/// Whom a rank answers to: the cluster's coordinator (an agent's rank), or nobody (a rank of
/// `flotilla train`, which keeps its own record).
#[derive(Clone)]
pub enum Host {
    Cluster { client: Box<ApiClient>, worker_id: String },
    Standalone(Arc<Standalone>),
}

/// The record of a standalone rank (`flotilla train`): its checkpoints are recorded here, and
/// rank 0's notes go to the terminal instead of a job log.
pub struct Standalone {
    /// The newest checkpoint written.
    pub newest: std::sync::Mutex<Option<CheckpointRef>>,
    /// Notes to stdout (`true`) or stderr (`false`, when stdout carries JSON).
    pub notes_to_stdout: bool,
}

/// What one training run needs from the agent (or from `flotilla train`).
#[derive(Clone)]
pub struct RankContext {
    pub host: Host,
    /// Superseded: stop at once, report nothing.
    pub stop: Arc<AtomicBool>,
    /// Ends the ring's waits (see `Running::abort`).
    pub abort: Arc<AtomicBool>,
    pub checkpoint_now: Arc<AtomicBool>,
    /// The gang's deadline from the coordinator's checkpoint order (unix ms, 0: none named).
    pub deadline_unix_ms: Arc<AtomicU64>,
    /// Set on a handover's leaving member by the checkpoint order: where it pushes the state
    /// it stops with.
    pub handover_to: Arc<Mutex<Option<HandoverTarget>>>,
    /// Set on a live handover's leaving member by its order: where it streams its state and
    /// updates while training on (taken by the rank when it starts the handover).
    pub live_to: Arc<Mutex<Option<HandoverTarget>>>,
    pub shared: Arc<AgentShared>,
}

/// A handover's replacement, as its leaving member is told of it.
#[derive(Debug, Clone)]
pub struct HandoverTarget {
    /// Its data port.
    pub addr: String,
    /// The handover's key (both prove it).
    pub key: Vec<u8>,
}

impl RankContext {
    /// The worker id reports carry (empty for a standalone rank).
    pub fn worker_id(&self) -> String {
        match &self.host {
            Host::Cluster { worker_id, .. } => worker_id.clone(),
            Host::Standalone(_) => String::new(),
        }
    }

    /// A standalone rank's record (`None` on a cluster).
    pub fn standalone(&self) -> Option<&Standalone> {
        match &self.host {
            Host::Standalone(record) => Some(record),
            Host::Cluster { .. } => None,
        }
    }

    /// The gang should stop in order after a checkpoint (the coordinator asked, or this worker
    /// was interrupted).
    pub fn stop_voted(&self) -> bool {
        // Acquire: a deadline stored before the flag is seen with it.
        self.checkpoint_now.load(Ordering::Acquire) || self.shared.interrupted.load(Ordering::Acquire)
    }

    /// When the gang must be done (unix ms): the earlier of this worker's own notice and the
    /// coordinator's order; `None` when no notice named a time.
    pub fn notice_deadline_unix_ms(&self) -> Option<u64> {
        let own = self.shared.taken_at_unix_ms.load(Ordering::Relaxed);
        let gang = self.deadline_unix_ms.load(Ordering::Relaxed);
        [own, gang].into_iter().filter(|&t| t > 0).min()
    }
}

/// How a rank's run ended.
pub enum RankEnd {
    /// Training is done. Rank 0 carries the report (with metrics); other ranks `None`.
    Finished(Option<Box<FinishedReport>>),
    /// Stopped in order after `step` (vote); rank 0 saved and recorded that step, or (in a
    /// cluster) `announced` it: its write and record end after the report.
    Checkpointed { step: u64, rank0: bool, announced: Option<flotilla_proto::v1::CheckpointRef> },
    /// Superseded (StopJob, or a newer assignment): report nothing.
    Superseded,
    /// A live handover: this rank's replacement took it after `step` (it reports the swap);
    /// or, on the joining side, the handover did not happen (the gang trains on without it).
    /// Report nothing.
    HandedOver { step: u64 },
    /// Ended abnormally; every rank reports (the coordinator keeps the first).
    /// `unreachable_rank`: the peer this rank could not reach while the gang formed.
    Broken { end: GenerationEnd, step: u64, error: String, unusable_step: u64, unreachable_rank: Option<u32> },
    /// A gang member was lost after this rank's `step`, newer than any checkpoint the gang had:
    /// the rank holds that step's state and reports the break with `announced`, its checkpoint
    /// (every survivor does; the coordinator keeps the first report). `write` is called with
    /// whether this report was the one kept: then it writes and records the announced
    /// checkpoint, as after an orderly stop; else it drops it.
    PeerLost { step: u64, error: String, announced: Box<flotilla_proto::v1::CheckpointRef>, write: SurvivorWrite },
}

/// Writes rank 0's progress points into the job's metrics history until the sender closes.
async fn keep_history(mut writer: HistoryWriter, mut points: tokio::sync::mpsc::Receiver<serde_json::Value>) {
    while let Some(point) = points.recv().await {
        writer.append(point).await;
    }
    writer.flush().await;
}

/// See [`RankEnd::PeerLost`]: returns at once (the write runs on a thread of its own).
pub type SurvivorWrite = Box<dyn FnOnce(bool) + Send>;

async fn train_and_report(context: RankContext, train: TrainAssignment, port: Arc<DataPort>) {
    let (job_id, generation, rank) = (train.job_id.clone(), train.generation, train.rank);
    tracing::info!(job = %job_id, generation, rank, world = train.world_size, "training");
    context.shared.busy.send_modify(|runs| *runs += 1);
    crate::metrics::AGENT.generations.inc();
    crate::metrics::AGENT.running.inc();
    let Host::Cluster { client, worker_id } = context.host.clone() else { return };
    let mut client = *client;
    let shared = context.shared.clone();
    let stop = context.stop.clone();
    // A plain thread, not spawn_blocking: the data loader runs its own runtime and refuses to
    // start inside another one.
    let (done, outcome) = tokio::sync::oneshot::channel();
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::channel::<ProgressReport>(PROGRESS_QUEUE_MAX);
    let runtime = tokio::runtime::Handle::current();
    // Rank 0 keeps the job's metrics history in the store (not in the Raft log), written by a
    // task of its own: a slow store must not hold up the progress reports.
    let (history, history_task) = (rank == 0 && !train.job_prefix.is_empty())
        .then(|| HistoryWriter::open(&train.job_prefix, generation, &worker_id.to_string()))
        .and_then(|opened| opened.map_err(|e| tracing::warn!(error = %e, "no metrics history")).ok())
        .map(|writer| {
            let (points, queue) = tokio::sync::mpsc::channel(HISTORY_QUEUE_MAX);
            (Some(points), Some(tokio::spawn(keep_history(writer, queue))))
        })
        .unwrap_or_default();
    let world = train.world_size;
    std::thread::spawn(move || {
        let _ = done.send(run_rank(&context, train, &port, &progress_tx, &runtime));
    });
    let mut reporter = client.clone();
    let points = history.clone();
    let forwarder = tokio::spawn(async move {
        let mut dropped = 0u64;
        while let Some(report) = progress_rx.recv().await {
            let _ = reporter
                .call_cluster(|mut c| {
                    let report = report.clone();
                    async move { c.report_progress(report).await }
                })
                .await;
            for point in history_points(&report, world, crate::unix_now_ms()) {
                if points.as_ref().is_some_and(|p| p.try_send(point).is_err()) {
                    dropped += 1;
                }
            }
        }
        if dropped > 0 {
            tracing::warn!(dropped, "metrics history points dropped: the store did not take them in time");
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
                unreachable_rank: None,
            }
        }
    };
    // The progress channel closed with the training thread: the history's last points, then the
    // final validation metrics (at the step of the state that is the model: with
    // `train.keep_best`, maybe an earlier one than the last). Only a finished job's history is complete before its report; any
    // other end writes it after the report: the gang regroups on the report, and the history's
    // write (on S3 a round trip, or a stall while the store is out) need not delay it.
    let _ = forwarder.await;
    if let (Some(points), RankEnd::Finished(Some(report))) = (&history, &end)
        && let Some(metrics) = &report.metrics
    {
        let _ = points
            .send(serde_json::json!({
                "t": crate::unix_now_ms(),
                "generation": generation,
                "world": world,
                "step": if metrics.val_step > 0 { metrics.val_step } else { report.step },
                "val_accuracy": metrics.val_accuracy,
                "val_loss": metrics.val_loss,
            }))
            .await;
    }
    drop(history);
    let mut history_task = history_task;
    if matches!(end, RankEnd::Finished(_))
        && let Some(task) = history_task.take()
    {
        let _ = task.await;
    }
    let base = FinishedReport { worker_id, job_id: job_id.clone(), generation, ..Default::default() };
    let mut survivor_write = None;
    let report = match end {
        RankEnd::Finished(Some(report)) => Some(*report),
        RankEnd::Finished(None) | RankEnd::Superseded | RankEnd::HandedOver { .. } => None,
        RankEnd::Checkpointed { step, rank0, announced } => rank0.then(|| FinishedReport {
            end: GenerationEnd::Checkpointed.into(),
            step,
            final_checkpoint: announced,
            ..base
        }),
        RankEnd::Broken { .. } if stop.load(Ordering::Relaxed) => None, // superseded meanwhile
        RankEnd::Broken { end, step, error, unusable_step, unreachable_rank } => {
            tracing::warn!(job = %job_id, generation, rank, error = %error, "generation ended");
            Some(FinishedReport {
                end: end.into(),
                step,
                error,
                unusable_checkpoint_step: unusable_step,
                unreachable_rank,
                ..base
            })
        }
        RankEnd::PeerLost { write, .. } if stop.load(Ordering::Relaxed) => {
            write(false);
            None
        }
        RankEnd::PeerLost { step, error, announced, write } => {
            tracing::warn!(job = %job_id, generation, rank, step, error = %error, "generation ended; holding its state");
            survivor_write = Some(write);
            Some(FinishedReport {
                end: GenerationEnd::PeerLost.into(),
                step,
                error,
                final_checkpoint: Some(*announced),
                ..base
            })
        }
    };
    if let Some(report) = report {
        let sent = client
            .call_cluster(|mut c| {
                let report = report.clone();
                async move { c.report_finished(report).await }
            })
            .await;
        if let Err(e) = &sent {
            // Refused when another rank's report came first: the normal case for a broken gang.
            tracing::debug!(job = %job_id, error = %e, "end of generation not recorded");
        }
        if let Some(write) = survivor_write {
            write(sent.is_ok());
        }
    }
    if let Some(task) = history_task {
        let _ = task.await;
    }
    // Heartbeat at once: after a broken gang, the coordinator regroups only workers it has heard
    // from since the break.
    shared.beat_now.notify_one();
    shared.busy.send_modify(|runs| *runs = runs.saturating_sub(1));
    crate::metrics::AGENT.running.dec();
}

/// Runs this rank with the job's runner (blocking: call it on a thread of its own; `runtime`
/// serves the runner's I/O).
pub fn run_rank(
    context: &RankContext,
    train: TrainAssignment,
    port: &Arc<DataPort>,
    progress: &tokio::sync::mpsc::Sender<ProgressReport>,
    runtime: &tokio::runtime::Handle,
) -> RankEnd {
    let spec = match train.spec.clone().context("the assignment has no spec").and_then(|s| Ok(spec_from_proto(s)?)) {
        Ok(spec) => spec,
        Err(e) => return broken(GenerationEnd::RetryableError, 0, e),
    };
    match spec.command() {
        Some(run) => super::command::run_rank(context, &train, run, port, progress, runtime),
        None => super::builtin::run_rank(context, &spec, train, port, progress, runtime),
    }
}

/// A rank that ended with `error`. A retryable error that is the store being out (a data,
/// checkpoint or workdir read that got no answer) ends `StoreUnavailable`: the job waits for
/// the store instead of counting a failure.
pub(super) fn broken(end: GenerationEnd, step: u64, error: impl std::fmt::Display + 'static) -> RankEnd {
    let end = if end == GenerationEnd::RetryableError && store_outage(&error) {
        GenerationEnd::StoreUnavailable
    } else {
        end
    };
    RankEnd::Broken { end, step, error: error_text(&error), unusable_step: 0, unreachable_rank: None }
}

/// Whether `error`, or a cause in its chain, is the store being out ([`flotilla_store::
/// StoreError::is_outage`] and the data and checkpoint errors that carry it).
pub(super) fn store_outage(error: &(dyn std::any::Any + 'static)) -> bool {
    fn cause(e: &(dyn std::error::Error + 'static)) -> bool {
        e.downcast_ref::<crate::checkpoint::CheckpointError>().is_some_and(|e| e.is_outage())
            || e.downcast_ref::<crate::data::DataError>().is_some_and(|e| e.is_outage())
            || e.downcast_ref::<flotilla_store::StoreError>().is_some_and(|e| e.is_outage())
            || e.downcast_ref::<object_store::Error>().is_some_and(flotilla_store::is_outage)
    }
    if let Some(e) = error.downcast_ref::<anyhow::Error>() {
        return e.chain().any(cause);
    }
    error.downcast_ref::<crate::checkpoint::CheckpointError>().is_some_and(|e| cause(e))
        || error.downcast_ref::<crate::data::DataError>().is_some_and(|e| cause(e))
        || error.downcast_ref::<flotilla_store::StoreError>().is_some_and(|e| cause(e))
        || error.downcast_ref::<object_store::Error>().is_some_and(|e| cause(e))
}

/// `error`'s text with its causes, each said once ([`flotilla_core::text::error_chain`]): the
/// reasons a job's status shows are read by people.
pub(crate) fn error_text(error: &(impl std::fmt::Display + 'static)) -> String {
    match (error as &dyn std::any::Any).downcast_ref::<anyhow::Error>() {
        Some(error) => flotilla_core::text::error_chain(error.chain()),
        None => format!("{error:#}"),
    }
}

/// The end of a rank whose gang did not form ([`join_gang`]'s error): with the peer it could
/// not reach, when the collective named one, so the coordinator holds that member out.
pub(super) fn gang_not_formed(end: GenerationEnd, step: u64, error: anyhow::Error) -> RankEnd {
    use crate::collective::CollectiveError;
    let unreachable_rank = error.chain().find_map(|e| match e.downcast_ref::<CollectiveError>() {
        Some(CollectiveError::PeerLost { peer, .. } | CollectiveError::Timeout { peer, .. }) => {
            u32::try_from(*peer).ok()
        }
        _ => None,
    });
    let unreachable_rank = unreachable_rank.filter(|_| end == GenerationEnd::PeerLost);
    RankEnd::Broken { end, step, error: error_text(&error), unusable_step: 0, unreachable_rank }
}

/// The end of a rank whose resume checkpoint is bad (half-written or corrupt): the coordinator
/// falls back to an older one.
pub(super) fn checkpoint_unusable(notes: &mut JobNotes, step: u64, error: impl std::fmt::Display) -> RankEnd {
    notes.note(format!("checkpoint of step {step} is unusable: {error}"));
    RankEnd::Broken {
        end: GenerationEnd::CheckpointUnusable,
        step,
        error: error.to_string(),
        unusable_step: step,
        unreachable_rank: None,
    }
}

/// Joins this rank's gang on the TCP ring (every link proves the generation's gang secret).
/// A bad assignment is a retryable error; a gang that does not form means a peer is lost.
pub(super) fn join_gang(
    context: &RankContext,
    train: &TrainAssignment,
    port: &Arc<DataPort>,
) -> Result<RingCommunicator, (GenerationEnd, anyhow::Error)> {
    let config = ring_config(context, train).map_err(|e| (GenerationEnd::RetryableError, e))?;
    RingCommunicator::connect_via(port, config).map_err(|e| (GenerationEnd::PeerLost, e.into()))
}

/// The id of a generation's ring (its hellos carry it): the job's number and the generation.
pub(super) fn gang_id(train: &TrainAssignment) -> u64 {
    let job_number = train.job_id.parse::<flotilla_proto::JobId>().map_or(0, |j| j.0);
    job_number << 24 | (train.generation & 0xff_ffff)
}

/// The ring configuration of this rank of `train`'s gang (a live handover's joiner uses its
/// leaving member's, whose assignment it got).
pub(super) fn ring_config(context: &RankContext, train: &TrainAssignment) -> anyhow::Result<RingConfig> {
    let mut peers = train.peers.clone();
    peers.sort_by_key(|p| p.rank);
    let addresses = peers
        .iter()
        .map(|p| p.data_addr.parse().with_context(|| format!("peer {} data address `{}`", p.worker_id, p.data_addr)))
        .collect::<anyhow::Result<Vec<SocketAddr>>>()?;
    let mut config =
        RingConfig::new(train.rank as usize, addresses, gang_id(train), train.gang_secret.clone(), COLLECTIVE_TIMEOUT);
    // Standalone ranks are processes started together: one may not listen yet.
    config.refused_grace = if context.standalone().is_some() { COLLECTIVE_TIMEOUT } else { REFUSED_GRACE };
    config.abort = Some(context.abort.clone());
    Ok(config)
}

/// Whether this worker leaves its gang at the agreed stop (it was noticed or told to stop by
/// SIGTERM): it keeps no state for a next generation, and may push it to a replacement.
pub(super) fn leaving(context: &RankContext) -> bool {
    context.shared.noticed.load(Ordering::Relaxed)
}

/// On a leaving member whose rank just stopped: pushes its state, as the checkpoint parts
/// `parts` makes on the push's thread (or hands over ready), to the handover's replacement
/// while the gang reports and regroups, on a thread of its own (the agent
/// does not exit before it ends). The gang may agree to stop before this member's own
/// checkpoint order (which names the replacement) arrives: it is waited for, briefly, when the
/// coordinator answered the notice by seeking a replacement (else nothing is waited for). A
/// failed push costs only itself: the new generation's exchange moves the state then.
pub(super) fn push_if_handed_over(
    context: &RankContext,
    job_id: &str,
    generation: u64,
    parts: impl FnOnce() -> Vec<(&'static str, bytes::Bytes)> + Send + 'static,
) {
    if !context.shared.handover_sought.load(Ordering::Acquire) {
        return; // a plain notice or SIGTERM stop: no replacement to wait for
    }
    let shared = context.shared.clone();
    shared.busy.send_modify(|runs| *runs += 1);
    let job_id = job_id.to_string();
    let handover_to = context.handover_to.clone();
    std::thread::spawn(move || {
        let started = Instant::now();
        let target = loop {
            if let Some(target) = handover_to.lock().ok().and_then(|mut t| t.take()) {
                break Some(target);
            }
            if started.elapsed() >= PUSH_TARGET_WAIT_MAX {
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        // None: the handover fell back (the gang stopped on the leader's fallback order).
        if let Some(target) = target {
            let waited_ms = started.elapsed().as_secs_f64() * 1e3;
            match push::send(&target.addr, &job_id, generation, &target.key, &parts()) {
                Ok(bytes) => tracing::info!(
                    job = %job_id, to = %target.addr, bytes, waited_ms, ms = started.elapsed().as_secs_f64() * 1e3,
                    "pushed the stop-step state to the replacement"
                ),
                Err(e) => tracing::warn!(job = %job_id, to = %target.addr, error = %e, "the state push failed"),
            }
        }
        shared.busy.send_modify(|runs| *runs = runs.saturating_sub(1));
    });
}

/// Rank 0 of a job with warm spares pushes each checkpoint it recorded to them (the parts as
/// written), on a thread of its own, so that each spare holds the job's newest checkpoint: a
/// loss of the whole gang (a world of 1) then resumes on a spare without reading the store. A
/// round still under way is not doubled (the next checkpoint is newer anyway); a failed push
/// costs nothing but that (the spare reads the store if it is needed).
pub(super) fn push_to_spares(
    context: &RankContext,
    job_id: &str,
    generation: u64,
    step: u64,
    parts: &[(&'static str, bytes::Bytes)],
) {
    let told = context.shared.spares.lock().ok().and_then(|s| s.clone());
    let Some(spares) = told.filter(|s| s.job_id == job_id && s.generation == generation && !s.data_addrs.is_empty())
    else {
        return;
    };
    if context.shared.pushing_to_spares.swap(true, Ordering::AcqRel) {
        return;
    }
    let shared = context.shared.clone();
    let (job_id, parts) = (job_id.to_string(), parts.to_vec());
    std::thread::spawn(move || {
        for addr in &spares.data_addrs {
            let started = Instant::now();
            match push::send(addr, &job_id, generation, &spares.key, &parts) {
                Ok(bytes) => tracing::info!(
                    job = %job_id, to = %addr, step, bytes, ms = started.elapsed().as_secs_f64() * 1e3,
                    "pushed the newest checkpoint to a warm spare"
                ),
                Err(e) => tracing::warn!(job = %job_id, to = %addr, step, error = %e, "a warm spare's push failed"),
            }
        }
        shared.pushing_to_spares.store(false, Ordering::Release);
    });
}

/// A rank's notes and its program's output: each gang member appends them to its log in the
/// store (node 0's is the job's log, what `flotilla logs` shows; `--node N` shows another's; a
/// log that cannot be written is not fatal, the lines then go to the agent's own log). A
/// standalone rank 0 prints them; other standalone ranks keep quiet.
pub(super) struct JobNotes {
    sink: NoteSink,
    job_id: String,
    last_flush: Instant,
}

enum NoteSink {
    JobLog(JobLog),
    AgentLog,
    Stdout,
    Stderr,
    Nowhere,
}

/// Buffered output is written to the job log at most this often (each flush is one object).
const LOG_FLUSH_EVERY: Duration = Duration::from_secs(1);

impl JobNotes {
    pub fn open(context: &RankContext, train: &TrainAssignment) -> JobNotes {
        let rank0 = train.rank == 0;
        let sink = match context.standalone() {
            Some(_) if !rank0 => NoteSink::Nowhere,
            Some(standalone) if standalone.notes_to_stdout => NoteSink::Stdout,
            Some(_) => NoteSink::Stderr,
            None if !train.job_prefix.is_empty() => match JobLog::open(&train.job_prefix, train.rank) {
                Ok(log) => NoteSink::JobLog(log),
                Err(e) => {
                    tracing::warn!(error = %e, "job log unavailable");
                    NoteSink::AgentLog
                }
            },
            None => NoteSink::AgentLog,
        };
        JobNotes { sink, job_id: train.job_id.clone(), last_flush: Instant::now() }
    }

    /// An event of the run, written at once.
    pub fn note(&mut self, text: String) {
        self.write(&text);
        self.flush();
    }

    /// A line of output, buffered (see [`JobNotes::flush_if_due`]).
    pub fn output(&mut self, text: &str) {
        self.write(text);
    }

    pub fn flush_if_due(&mut self) {
        if self.last_flush.elapsed() >= LOG_FLUSH_EVERY {
            self.flush();
        }
    }

    fn write(&mut self, text: &str) {
        match &mut self.sink {
            NoteSink::JobLog(log) => {
                if let Err(e) = log.line(text) {
                    tracing::warn!(error = %e, "could not write the job log");
                }
            }
            NoteSink::AgentLog => tracing::info!(job = %self.job_id, "{text}"),
            NoteSink::Stdout => println!("{text}"),
            NoteSink::Stderr => eprintln!("{text}"),
            NoteSink::Nowhere => {}
        }
    }

    fn flush(&mut self) {
        self.last_flush = Instant::now();
        if let NoteSink::JobLog(log) = &mut self.sink
            && let Err(e) = log.flush()
        {
            tracing::warn!(error = %e, "could not write the job log");
        }
    }
}

/// Records a written checkpoint with the coordinator (through Raft), blocking this thread: only
/// then does it count (a resume reads only recorded checkpoints).
pub(super) fn record_checkpoint(
    context: &RankContext,
    train: &TrainAssignment,
    runtime: &tokio::runtime::Handle,
    checkpoint: CheckpointRef,
) -> Result<(), String> {
    let Host::Cluster { client, worker_id } = &context.host else {
        let record = context.standalone().map(|s| &s.newest);
        if let Some(Ok(mut newest)) = record.map(|r| r.lock())
            && newest.as_ref().is_none_or(|n| n.step <= checkpoint.step)
        {
            *newest = Some(checkpoint);
        }
        return Ok(());
    };
    let report = CheckpointReport {
        worker_id: worker_id.clone(),
        job_id: train.job_id.clone(),
        generation: train.generation,
        checkpoint: Some(checkpoint),
    };
    let mut client = ApiClient::clone(client);
    runtime
        .block_on(client.call_cluster(|mut c| {
            let report = report.clone();
            async move { c.report_checkpoint(report).await }
        }))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The metrics history's points of one progress report (pure): its progress, and a validation
/// taken while it trains as a point of its own at its step. A report of a live handover (a
/// swap timed, a replacement joined, a failure) carries no progress: no point.
fn history_points(report: &ProgressReport, world: u32, t_unix_ms: u64) -> Vec<serde_json::Value> {
    if report.live_swap_step > 0 || report.joined_after_step > 0 || !report.live_handover_failed.is_empty() {
        return Vec::new();
    }
    let mut points = Vec::new();
    if !report.validation_only {
        let mut point = serde_json::json!({
            "t": t_unix_ms,
            "generation": report.generation,
            "world": world,
            "step": report.step,
            "loss": report.loss,
            "samples_per_s": report.samples_per_s,
        });
        if report.learning_rate > 0.0 {
            point["learning_rate"] = serde_json::json!(report.learning_rate);
        }
        points.push(point);
    }
    if let Some(accuracy) = report.val_accuracy {
        points.push(serde_json::json!({
            "t": t_unix_ms,
            "generation": report.generation,
            "world": world,
            "step": report.val_step,
            "val_accuracy": accuracy,
            "val_loss": report.val_loss,
        }));
    }
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A progress report is a point; its validation another, at its own step; a live
    /// handover's reports (no loss, no rate) are none.
    #[test]
    fn progress_reports_become_history_points() {
        let progress =
            ProgressReport { generation: 2, step: 130, loss: 0.5, samples_per_s: 900.0, ..Default::default() };
        let points = history_points(&progress, 4, 17);
        assert_eq!(
            points,
            [
                serde_json::json!({ "t": 17, "generation": 2, "world": 4, "step": 130, "loss": 0.5, "samples_per_s": 900.0 })
            ]
        );
        let scheduled = ProgressReport { learning_rate: 0.001, ..progress.clone() };
        assert_eq!(history_points(&scheduled, 4, 17)[0]["learning_rate"], 0.001, "a built-in job's rate");
        let validated = ProgressReport { val_accuracy: Some(0.9), val_loss: Some(0.25), val_step: 120, ..progress };
        let points = history_points(&validated, 4, 17);
        assert_eq!(points.len(), 2);
        let validation = serde_json::json!({ "t": 17, "generation": 2, "world": 4, "step": 120, "val_accuracy": 0.9, "val_loss": 0.25 });
        assert_eq!(points[1], validation);
        let alone = ProgressReport { validation_only: true, loss: 0.0, samples_per_s: 0.0, ..validated };
        assert_eq!(history_points(&alone, 4, 17), [validation], "no progress point beside it");
        let swap = ProgressReport {
            generation: 2,
            step: 115,
            live_swap_step: 115,
            live_swap_stall_ms: 59.0,
            ..Default::default()
        };
        let joined = ProgressReport { generation: 2, step: 115, joined_after_step: 115, ..Default::default() };
        let failed = ProgressReport { live_handover_failed: "refused".into(), ..Default::default() };
        for special in [swap, joined, failed] {
            assert!(history_points(&special, 4, 17).is_empty(), "{special:?}");
        }
    }

    #[test]
    fn a_gang_that_did_not_form_names_the_peer_it_could_not_reach() {
        use crate::collective::CollectiveError;
        let named = |end: GenerationEnd, error: CollectiveError| match gang_not_formed(
            end,
            0,
            anyhow::Error::from(error).context("gang rendezvous"),
        ) {
            RankEnd::Broken { unreachable_rank, error, .. } => {
                assert!(error.starts_with("gang rendezvous: "), "{error}");
                unreachable_rank
            }
            _ => panic!("a broken end"),
        };
        let lost = |peer| CollectiveError::PeerLost { operation: "rendezvous", peer, reason: "reset".into() };
        assert_eq!(named(GenerationEnd::PeerLost, lost(1)), Some(1));
        let silent = CollectiveError::Timeout { operation: "rendezvous", peer: 2, timeout: Duration::from_secs(1) };
        assert_eq!(named(GenerationEnd::PeerLost, silent), Some(2));
        assert_eq!(named(GenerationEnd::PeerLost, CollectiveError::Rendezvous("worlds differ".into())), None);
        assert_eq!(named(GenerationEnd::RetryableError, lost(1)), None, "only a lost peer is named");
    }

    /// A retryable end whose cause is the store being out (as the data and checkpoint readers
    /// word it) is reported `StoreUnavailable`, however deep in the chain; anything else keeps
    /// its end. (The store's own tests classify real outages; tests/s3_cluster.rs runs one.)
    #[test]
    fn a_rank_that_found_the_store_out_says_so_and_nothing_else_does() {
        use crate::checkpoint::CheckpointError;
        use crate::data::DataError;
        use flotilla_store::{Cause, StoreError};
        let end = |rank: RankEnd| match rank {
            RankEnd::Broken { end, .. } => end,
            _ => panic!("a broken end"),
        };
        let unreachable = || StoreError::Unusable {
            uri: "s3://b/x".into(),
            cause: Cause::Unreachable("error sending request".into()),
        };
        let data_out = DataError::Unavailable { uri: "s3://b/x".into(), reason: unreachable().to_string() };
        let data_bad = DataError::Read { uri: "s3://b/x".into(), reason: "no such key".into() };
        let (retry, out) = (GenerationEnd::RetryableError, GenerationEnd::StoreUnavailable);
        let loading = |e: DataError| anyhow::Error::from(e).context("loading the training data");
        assert_eq!(end(broken(retry, 0, loading(data_out))), out, "the data");
        assert_eq!(end(broken(retry, 7, CheckpointError::Location(unreachable()))), out, "a checkpoint");
        let workdir = anyhow::Error::from(unreachable()).context("fetching the workdir");
        assert_eq!(end(broken(retry, 0, workdir)), out, "a command job's workdir");
        assert_eq!(end(broken(retry, 0, loading(data_bad))), retry, "a read that waiting does not fix");
        let missing = CheckpointError::Location(StoreError::NotFound { uri: "s3://b/x".into() });
        assert_eq!(end(broken(retry, 0, missing)), retry, "a missing checkpoint");
        let lost = GenerationEnd::PeerLost;
        assert_eq!(end(broken(lost, 0, CheckpointError::Location(unreachable()))), lost, "other ends are kept");
    }

    #[test]
    fn work_left_after_a_stop_waits_for_the_next_first_step_or_its_bound() {
        let shared = Arc::new(AgentShared::default());
        let seen = shared.first_steps();
        // Nothing trains again: the wait ends at its bound.
        let started = Instant::now();
        shared.wait_first_step_after(seen, Duration::from_millis(50));
        assert!(started.elapsed() >= Duration::from_millis(50));
        // The next generation's first step ends it at once.
        let stepper = shared.clone();
        let step = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            stepper.note_first_step();
        });
        let started = Instant::now();
        shared.wait_first_step_after(seen, Duration::from_secs(30));
        assert!(started.elapsed() < Duration::from_secs(30), "woken by the first step");
        step.join().expect("stepper");
        // A first step taken before the wait began counts too.
        let started = Instant::now();
        shared.wait_first_step_after(seen, Duration::from_secs(30));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(shared.first_steps(), seen + 1);
    }
}
