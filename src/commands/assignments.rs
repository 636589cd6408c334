//! The agent's work: follow this worker's assignment stream and train the assigned rank.
//!
//! A `TrainAssignment` starts training in a blocking thread (the same engine as `flotilla
//! train`: data, ring all-reduce over the peers' data addresses, burn trainer); `StopJob`
//! stops it at the next step boundary; rank 0 reports the end of training (with validation
//! metrics) through `ReportFinished`, which the coordinator records through Raft.

use std::net::{SocketAddr, TcpListener};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use flotilla_proto::client::ApiClient;
use flotilla_proto::convert::spec_from_proto;
use flotilla_proto::v1::{
    CheckpointRef, CheckpointReport, DataCursor, FinishedReport, JobMetrics, ProgressReport, TrainAssignment,
    WatchAssignmentsRequest, assignment,
};
use flotilla_worker::checkpoint::state::{self, Checkpointer};
use flotilla_worker::collective::ring::{RingCommunicator, RingConfig};
use flotilla_worker::data;
use flotilla_worker::joblog::JobLog;
use flotilla_worker::train::Trainer;
use tokio::sync::watch;

/// Time for a gang to form and for any one collective operation.
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before re-opening a broken assignment stream.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// Rank 0 reports live progress at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Progress reports queued at most; older ones are dropped when the coordinator is slow.
const PROGRESS_QUEUE_MAX: usize = 4;

/// A training run in progress on this worker.
struct Running {
    job_id: String,
    generation: u64,
    stop: Arc<AtomicBool>,
}

/// Follows the assignment stream of whichever worker id `registered` holds, until the process
/// ends. `listener` is this worker's data port (advertised at registration).
pub async fn follow(mut client: ApiClient, mut registered: watch::Receiver<Option<String>>, listener: TcpListener) {
    let listener = Arc::new(listener);
    let mut running: Option<Running> = None;
    loop {
        let Some(worker_id) = registered.borrow_and_update().clone() else {
            if registered.changed().await.is_err() {
                return;
            }
            continue;
        };
        let request = WatchAssignmentsRequest { worker_id };
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
        while let Ok(Some(message)) = stream.message().await {
            match message.kind {
                Some(assignment::Kind::Train(train)) => {
                    if let Some(old) = running.take() {
                        old.stop.store(true, Ordering::Relaxed);
                    }
                    let stop = Arc::new(AtomicBool::new(false));
                    running = Some(Running {
                        job_id: train.job_id.clone(),
                        generation: train.generation,
                        stop: stop.clone(),
                    });
                    tokio::spawn(train_and_report(client.clone(), train, listener.clone(), stop));
                }
                Some(assignment::Kind::Stop(stop)) => {
                    if let Some(run) = running.take_if(|r| r.job_id == stop.job_id && r.generation == stop.generation) {
                        run.stop.store(true, Ordering::Relaxed);
                    }
                }
                Some(assignment::Kind::Drain(_)) | Some(assignment::Kind::CheckpointNow(_)) | None => {}
            }
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

async fn train_and_report(
    mut client: ApiClient,
    train: TrainAssignment,
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
) {
    let (job_id, generation, rank) = (train.job_id.clone(), train.generation, train.rank);
    tracing::info!(job = %job_id, generation, rank, world = train.world_size, "training");
    // A plain thread, not spawn_blocking: the data loader runs its own runtime and refuses to
    // start inside another one.
    let (done, outcome) = tokio::sync::oneshot::channel();
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::channel::<ProgressReport>(PROGRESS_QUEUE_MAX);
    let (saved_tx, mut saved_rx) = tokio::sync::mpsc::channel::<CheckpointReport>(PROGRESS_QUEUE_MAX);
    std::thread::spawn(move || {
        let _ = done.send(run_rank(train, &listener, &stop, &progress_tx, &saved_tx));
    });
    let mut recorder = client.clone();
    tokio::spawn(async move {
        while let Some(report) = saved_rx.recv().await {
            let sent = recorder
                .call_cluster(|mut c| {
                    let report = report.clone();
                    async move { c.report_checkpoint(report).await }
                })
                .await;
            if let Err(e) = sent {
                tracing::warn!(error = %e, "checkpoint not recorded by the coordinator");
            }
        }
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
    let outcome = outcome.await;
    let report = match outcome {
        Ok(Ok(None)) => return, // stopped, or not rank 0
        Ok(Ok(Some(report))) => report,
        Ok(Err(e)) => {
            tracing::error!(job = %job_id, error = %format!("{e:#}"), "training failed");
            if rank != 0 {
                return;
            }
            FinishedReport {
                job_id: job_id.clone(),
                generation,
                success: false,
                error: format!("{e:#}"),
                ..Default::default()
            }
        }
        Err(_) => {
            tracing::error!(job = %job_id, "training thread panicked");
            return;
        }
    };
    let sent = client
        .call_cluster(|mut c| {
            let report = report.clone();
            async move { c.report_finished(report).await }
        })
        .await;
    if let Err(e) = sent {
        tracing::warn!(job = %job_id, error = %e, "could not report the end of training");
    }
}

/// Trains this rank to the end (or until `stop`). Rank 0 returns the report to send.
fn run_rank(
    train: TrainAssignment,
    listener: &TcpListener,
    stop: &AtomicBool,
    progress: &tokio::sync::mpsc::Sender<ProgressReport>,
    saved: &tokio::sync::mpsc::Sender<CheckpointReport>,
) -> anyhow::Result<Option<FinishedReport>> {
    let spec = spec_from_proto(train.spec.clone().context("the assignment has no spec")?)?;
    let mut peers = train.peers.clone();
    peers.sort_by_key(|p| p.rank);
    let addresses: Vec<SocketAddr> = peers
        .iter()
        .map(|p| p.data_addr.parse().with_context(|| format!("peer {} data address `{}`", p.worker_id, p.data_addr)))
        .collect::<anyhow::Result<_>>()?;
    let splits = data::load_job_data(&spec.data, spec.train.seed).context("loading the training data")?;
    let job_number = train.job_id.parse::<flotilla_proto::JobId>().map_err(anyhow::Error::from)?.0;
    let config = RingConfig {
        rank: train.rank as usize,
        addresses,
        gang_id: job_number << 24 | (train.generation & 0xff_ffff),
        timeout: COLLECTIVE_TIMEOUT,
    };
    let mut log = (train.rank == 0 && !train.job_prefix.is_empty())
        .then(|| JobLog::open(&train.job_prefix))
        .and_then(|opened| opened.map_err(|e| tracing::warn!(error = %e, "job log unavailable")).ok());
    let mut log_line = |text: String, flush: bool| {
        if let Some(log) = log.as_mut() {
            let written = log.line(&text).and_then(|()| if flush { log.flush() } else { Ok(()) });
            if let Err(e) = written {
                tracing::warn!(error = %e, "could not write the job log");
            }
        }
    };
    log_line(
        format!(
            "generation {}: training on {} worker(s), {} train rows",
            train.generation, train.world_size, splits.train.rows
        ),
        true,
    );
    let mut comm = RingCommunicator::connect(listener.try_clone().context("data port")?, config)?;
    let resume = match &train.resume_from {
        Some(reference) => {
            let (state, _) = state::load_uri(&reference.uri)?;
            log_line(format!("resuming from the checkpoint of step {} ({})", reference.step, reference.uri), true);
            Some(state)
        }
        None => None,
    };
    let mut trainer = Trainer::new(&spec, splits.train, &mut comm, resume)?;
    let checkpointer =
        (train.rank == 0 && !train.job_prefix.is_empty()).then(|| Checkpointer::open(&train.job_prefix)).transpose()?;
    let started = std::time::Instant::now();
    let first_step = trainer.steps_done();
    let mut last_report: Option<std::time::Instant> = None;
    let last = trainer.run(&mut comm, |trainer, report| {
        if train.rank == 0 && last_report.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
            last_report = Some(std::time::Instant::now());
            let done = report.step.saturating_sub(first_step).max(1);
            let left = trainer.total_steps().saturating_sub(report.step);
            let eta_ms = (started.elapsed().as_millis() as u64 / done) * left;
            log_line(
                format!(
                    "step {}/{} epoch {} loss {:.4} {:.0} samples/s",
                    report.step,
                    trainer.total_steps(),
                    report.epoch,
                    report.loss,
                    report.samples_per_s
                ),
                true,
            );
            let _ = progress.try_send(ProgressReport {
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
        if let Some(checkpointer) = &checkpointer
            && report.step % spec.checkpoint.every_steps == 0
            && !trainer.is_finished()
        {
            match checkpointer.save(&trainer.state(), None) {
                Ok((uri, manifest)) => {
                    let cursor = trainer.cursor();
                    let _ = saved.try_send(CheckpointReport {
                        worker_id: String::new(),
                        job_id: train.job_id.clone(),
                        generation: train.generation,
                        checkpoint: Some(CheckpointRef {
                            step: report.step,
                            uri,
                            size_bytes: manifest.total_bytes(),
                            manifest_sha256: manifest.fingerprint(),
                            cursor: Some(DataCursor {
                                epoch: cursor.epoch as u32,
                                global_sample_offset: cursor.global_sample_offset,
                            }),
                        }),
                    });
                    log_line(format!("checkpoint at step {}", report.step), true);
                }
                Err(e) => tracing::warn!(error = %e, step = report.step, "checkpoint failed; training continues"),
            }
        }
        if stop.load(Ordering::Relaxed) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    })?;
    if stop.load(Ordering::Relaxed) || train.rank != 0 {
        return Ok(None);
    }
    let metrics = splits.validation.as_ref().map(|v| trainer.evaluate(v)).transpose()?;
    let accuracy = metrics.map_or("n/a".to_string(), |m| format!("{:.4}", m.val_accuracy));
    log_line(format!("finished at step {}: val_accuracy {accuracy}", trainer.steps_done()), true);
    Ok(Some(FinishedReport {
        worker_id: String::new(),
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
    }))
}
