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
            Ok(Applied::JobCancelled { job_id })
        }
        Command::RegisterWorker { info } => {
            let live = state.workers.values().filter(|w| w.lost_at_unix_ms.is_none()).count();
            if live >= WORKERS_MAX {
                return Err(Rejected::TooManyWorkers { limit: WORKERS_MAX });
            }
            let worker_id = WorkerId(state.next_worker_id);
            state.next_worker_id += 1;
            state
                .workers
                .insert(worker_id, Worker { id: worker_id, info, registered_at_unix_ms: now, lost_at_unix_ms: None });
            Ok(Applied::WorkerRegistered { worker_id })
        }
        Command::WorkerLost { worker_id } => {
            let worker = state.workers.get_mut(&worker_id).ok_or(Rejected::WorkerNotFound(worker_id))?;
            worker.lost_at_unix_ms.get_or_insert(now);
            Ok(Applied::WorkerLost { worker_id })
        }
    }
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
