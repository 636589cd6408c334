//! `apply`: one command against the state. Pure and total: every input gives an outcome.

use super::types::*;
use crate::ids::{JobId, WorkerId};

/// Applies `envelope`, committed at raft `index`, to `state`.
pub fn apply(state: &mut State, index: u64, envelope: Envelope) -> Result<Applied, Rejected> {
    let now = envelope.at_unix_ms;
    match envelope.command {
        Command::SubmitJob { spec, client_request_id } => {
            if client_request_id.is_empty() || client_request_id.len() > CLIENT_REQUEST_ID_LEN_MAX {
                return Err(Rejected::BadRequestId);
            }
            if let Some(&job_id) = state.request_ids.get(&client_request_id) {
                return Ok(Applied::JobSubmitted { job_id, duplicate: true });
            }
            if state.jobs.len() >= JOBS_MAX {
                return Err(Rejected::TooManyJobs { limit: JOBS_MAX });
            }
            let job_id = JobId(state.next_job_id);
            state.next_job_id += 1;
            state.request_ids.insert(client_request_id.clone(), job_id);
            state.jobs.insert(
                job_id,
                Job {
                    id: job_id,
                    spec: *spec,
                    state: JobState::Pending,
                    reason: "waiting for workers".to_string(),
                    client_request_id,
                    submitted_at_unix_ms: now,
                    updated_at_unix_ms: now,
                    submitted_index: index,
                    step: 0,
                    generation: 0,
                    recoveries: 0,
                    steps_lost: 0,
                    events: Vec::new(),
                    gang: Vec::new(),
                    world_size: 0,
                    metrics: None,
                    latest_checkpoint: None,
                },
            );
            Ok(Applied::JobSubmitted { job_id, duplicate: false })
        }
        Command::CancelJob { job_id, reason } => {
            let job = state.jobs.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
            if job.state.is_terminal() {
                return Err(Rejected::JobFinished { job_id, state: job.state.name() });
            }
            job.state = JobState::Cancelled;
            job.reason = bounded(if reason.is_empty() { "cancelled by user".to_string() } else { reason });
            job.updated_at_unix_ms = now;
            push_event(job, now, "cancelled", job.reason.clone());
            let gang = std::mem::take(&mut job.gang);
            release(state, &gang);
            Ok(Applied::JobCancelled { job_id })
        }
        Command::RegisterWorker { info } => {
            let live = state.workers.values().filter(|w| w.lost_at_unix_ms.is_none()).count();
            if live >= WORKERS_MAX {
                return Err(Rejected::TooManyWorkers { limit: WORKERS_MAX });
            }
            let worker_id = WorkerId(state.next_worker_id);
            state.next_worker_id += 1;
            state.workers.insert(
                worker_id,
                Worker { id: worker_id, info, registered_at_unix_ms: now, lost_at_unix_ms: None, job: None },
            );
            Ok(Applied::WorkerRegistered { worker_id })
        }
        Command::WorkerLost { worker_id } => {
            let worker = state.workers.get_mut(&worker_id).ok_or(Rejected::WorkerNotFound(worker_id))?;
            worker.lost_at_unix_ms.get_or_insert(now);
            if let Some(job_id) = worker.job.take() {
                requeue_after_loss(state, job_id, worker_id, now);
            }
            Ok(Applied::WorkerLost { worker_id })
        }
        Command::AssignGang { job_id, workers } => assign_gang(state, job_id, workers, now),
        Command::RecordCheckpoint { job_id, checkpoint } => {
            let job = state.jobs.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
            if job.state.is_terminal() {
                return Err(Rejected::JobFinished { job_id, state: job.state.name() });
            }
            // The checkpoint step never decreases: a late report from an old generation is dropped.
            if job.latest_checkpoint.as_ref().is_some_and(|c| c.step >= checkpoint.step) {
                return Err(Rejected::StaleGeneration {
                    job_id,
                    current: job.generation,
                    reported: checkpoint.generation,
                });
            }
            let step = checkpoint.step;
            job.step = job.step.max(step);
            job.latest_checkpoint = Some(checkpoint);
            job.updated_at_unix_ms = now;
            Ok(Applied::CheckpointRecorded { job_id, step })
        }
        Command::SetPendingReason { job_id, reason } => {
            let job = state.jobs.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
            if job.state != JobState::Pending {
                return Err(Rejected::NotPending { job_id, state: job.state.name() });
            }
            job.reason = bounded(reason);
            Ok(Applied::ReasonSet { job_id })
        }
        Command::JobFinished { job_id, generation, success, reason, step, metrics } => {
            let job = state.jobs.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
            if job.state.is_terminal() {
                return Err(Rejected::JobFinished { job_id, state: job.state.name() });
            }
            if job.generation != generation {
                return Err(Rejected::StaleGeneration { job_id, current: job.generation, reported: generation });
            }
            job.state = if success { JobState::Succeeded } else { JobState::Failed };
            job.reason = bounded(reason);
            job.step = step;
            job.metrics = metrics;
            job.updated_at_unix_ms = now;
            let kind = if success { "succeeded" } else { "failed" };
            push_event(job, now, kind, format!("generation {generation} finished at step {step}"));
            let gang = std::mem::take(&mut job.gang);
            release(state, &gang);
            Ok(Applied::JobFinished { job_id })
        }
    }
}

fn assign_gang(state: &mut State, job_id: JobId, workers: Vec<WorkerId>, now: u64) -> Result<Applied, Rejected> {
    let distinct: std::collections::BTreeSet<_> = workers.iter().collect();
    if workers.is_empty() || distinct.len() != workers.len() || workers.len() > crate::spec::WORKERS_MAX as usize {
        return Err(Rejected::BadGang { limit: crate::spec::WORKERS_MAX as usize });
    }
    let job = state.jobs.get(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
    if job.state != JobState::Pending {
        return Err(Rejected::NotPending { job_id, state: job.state.name() });
    }
    for id in &workers {
        let free = state.workers.get(id).is_some_and(|w| w.lost_at_unix_ms.is_none() && w.job.is_none());
        if !free {
            return Err(Rejected::WorkerUnavailable(*id));
        }
    }
    for id in &workers {
        if let Some(worker) = state.workers.get_mut(id) {
            worker.job = Some(job_id);
        }
    }
    let job = state.jobs.get_mut(&job_id).expect("the job was just found");
    job.generation += 1;
    job.state = JobState::Running;
    job.reason.clear();
    job.updated_at_unix_ms = now;
    let message = format!("generation {} on {} worker(s)", job.generation, workers.len());
    job.world_size = workers.len() as u32;
    job.gang = workers;
    push_event(job, now, "gang", message);
    Ok(Applied::GangAssigned { job_id, generation: job.generation })
}

/// Frees the gang's workers that are still assigned.
fn release(state: &mut State, gang: &[WorkerId]) {
    for id in gang {
        if let Some(worker) = state.workers.get_mut(id) {
            worker.job = None;
        }
    }
}

/// A gang member was lost: the job goes back to Pending (a new generation will form) and the
/// survivors are freed. Resuming from the newest checkpoint is the preemption issue's work.
fn requeue_after_loss(state: &mut State, job_id: JobId, lost: WorkerId, now: u64) {
    let Some(job) = state.jobs.get_mut(&job_id) else { return };
    if job.state.is_terminal() {
        return;
    }
    job.state = JobState::Pending;
    job.reason = format!("{lost} was lost; waiting for workers to form a new generation");
    job.recoveries += 1;
    job.updated_at_unix_ms = now;
    push_event(job, now, "worker_lost", job.reason.clone());
    let gang = std::mem::take(&mut job.gang);
    release(state, &gang);
}

fn bounded(mut text: String) -> String {
    if text.len() > REASON_LEN_MAX {
        let mut cut = REASON_LEN_MAX;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

fn push_event(job: &mut Job, at_unix_ms: u64, kind: &str, message: String) {
    if job.events.len() >= JOB_EVENTS_MAX {
        job.events.remove(0);
    }
    job.events.push(JobEvent { at_unix_ms, kind: kind.to_string(), message });
}
