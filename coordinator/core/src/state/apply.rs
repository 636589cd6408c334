//! `apply`: one command against the state. Pure and total: every input gives an outcome.

use std::collections::BTreeMap;

use super::inference;
use super::types::*;
use crate::ids::{JobId, WorkerId};

/// Applies `envelope`, committed at raft `index`, to `state`.
pub fn apply(state: &mut State, index: u64, envelope: Envelope) -> Result<Applied, Rejected> {
    let now = envelope.at_unix_ms;
    match envelope.command {
        Command::SubmitJob { spec, client_request_id } => {
            if let Some(job_id) = admit(state, &client_request_id)? {
                return Ok(Applied::JobSubmitted { job_id, duplicate: true });
            }
            let init = initial_weights(state, &spec)?;
            make_room(state);
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
                    ended_gang: Vec::new(),
                    world_size: 0,
                    metrics: None,
                    latest_checkpoint: None,
                    checkpoints: Vec::new(),
                    checkpoint_requested: None,
                    preemptions: 0,
                    failures: 0,
                    failure_step: 0,
                    cost_usd: 0.0,
                    lost_work_usd: 0.0,
                    generation_started_at_unix_ms: 0,
                    generation_start_step: 0,
                    gang_usd_per_hour: 0.0,
                    on_demand_only: false,
                    handovers: Vec::new(),
                    member_lost: None,
                    live_swap_timed_step: 0,
                    store_wait: None,
                    stall_ms_total: 0,
                    last_stall_ms: 0,
                    stall_generation: 0,
                    resume_peer_bytes: 0,
                    resume_storage_bytes: 0,
                    init_artifact_uri: init.as_ref().map(|(uri, _)| uri.clone()),
                },
            );
            if let (Some((_, message)), Some(job)) = (init, state.jobs.get_mut(&job_id)) {
                push_event(job, now, "init", message);
            }
            Ok(Applied::JobSubmitted { job_id, duplicate: false })
        }
        Command::CancelJob { job_id, reason } if state.inferences.contains_key(&job_id) => {
            let job = &state.inferences[&job_id];
            if job.state.is_terminal() {
                return Err(Rejected::JobFinished { job_id, state: job.state.name() });
            }
            if job.state == JobState::Running && job.is_complete() {
                return Err(Rejected::BadInference(format!(
                    "{job_id} has every shard committed and is writing its summary; it cannot be cancelled now"
                )));
            }
            let reason = if reason.is_empty() { "cancelled by user".to_string() } else { reason };
            inference::end(state, job_id, JobState::Cancelled, reason, now);
            Ok(Applied::JobCancelled { job_id })
        }
        Command::CancelJob { job_id, reason } => {
            let job = state.jobs.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
            if job.state.is_terminal() {
                return Err(Rejected::JobFinished { job_id, state: job.state.name() });
            }
            if job.state == JobState::Running {
                let step = job.step;
                charge_generation(job, now, step, 0);
            }
            job.state = JobState::Cancelled;
            job.reason = bounded(if reason.is_empty() { "cancelled by user".to_string() } else { reason });
            job.updated_at_unix_ms = now;
            push_event(job, now, "cancelled", job.reason.clone());
            let gang = job.end_gang();
            release(state, &gang);
            Ok(Applied::JobCancelled { job_id })
        }
        Command::ResumeJob { job_id, spec } => resume_job(state, job_id, spec.map(|s| *s), now),
        Command::RegisterWorker { info, credential_sha256 } => {
            let hex = credential_sha256.len() == 64 && credential_sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !credential_sha256.is_empty() && !hex {
                return Err(Rejected::BadReport("credential_sha256 must be 64 hex characters".into()));
            }
            let live = state.workers.values().filter(|w| w.lost_at_unix_ms.is_none()).count();
            if live >= WORKERS_MAX {
                return Err(Rejected::TooManyWorkers { limit: WORKERS_MAX });
            }
            let worker_id = WorkerId(state.next_worker_id);
            state.next_worker_id += 1;
            state.workers.insert(
                worker_id,
                Worker {
                    id: worker_id,
                    info,
                    registered_at_unix_ms: now,
                    lost_at_unix_ms: None,
                    left: false,
                    job: None,
                    draining: false,
                    notice_action_at_unix_ms: None,
                    holding_for: None,
                    held_state: HeldState::Nothing,
                    noticed_at_unix_ms: None,
                    suspect_since_unix_ms: None,
                    unreachable_until_unix_ms: 0,
                    unreachable_holds: 0,
                    credential_sha256: credential_sha256.to_ascii_lowercase(),
                },
            );
            Ok(Applied::WorkerRegistered { worker_id })
        }
        Command::WorkerLost { worker_id, last_step_seen, last_heard_unix_ms } => {
            let worker = state.workers.get_mut(&worker_id).ok_or(Rejected::WorkerNotFound(worker_id))?;
            worker.lost_at_unix_ms.get_or_insert(now);
            let silent_since = silent_since(last_heard_unix_ms, now);
            match worker.job.take() {
                Some(job_id) if state.inferences.contains_key(&job_id) => {
                    inference::member_lost(state, job_id, worker_id, now)
                }
                Some(job_id) => lose_member(state, job_id, worker_id, last_step_seen, silent_since, now),
                None => give_up_replacement(state, worker_id, "was lost", now),
            }
            Ok(Applied::WorkerLost { worker_id })
        }
        Command::WorkerLeft { worker_id } => {
            let worker = state.workers.get_mut(&worker_id).ok_or(Rejected::WorkerNotFound(worker_id))?;
            // Declared lost first (its lease expired while it finished): it stays so.
            if worker.lost_at_unix_ms.is_some() {
                return Ok(Applied::WorkerLeft { worker_id });
            }
            if let Some(job_id) = worker.job {
                return Err(Rejected::StillAssigned { worker: worker_id, job_id });
            }
            worker.lost_at_unix_ms = Some(now);
            worker.left = true;
            give_up_replacement(state, worker_id, "left", now);
            Ok(Applied::WorkerLeft { worker_id })
        }
        Command::GangLost { job_id, generation } => {
            let job = running_generation(state, job_id, generation)?;
            let lost =
                job.member_lost.clone().ok_or(Rejected::NotRunning { job_id, state: "without a lost member" })?;
            // Timed from the `member_lost` event before it (see `silent_since`).
            requeue_after_loss(state, job_id, lost.worker, lost.last_step_seen, None, now);
            Ok(Applied::GenerationEnded { job_id, state: JobState::Pending })
        }
        Command::WorkerInterrupted { worker_id, kind, action_at_unix_ms } => {
            let worker = state.workers.get_mut(&worker_id).ok_or(Rejected::WorkerNotFound(worker_id))?;
            if worker.lost_at_unix_ms.is_some() {
                return Err(Rejected::WorkerUnavailable(worker_id));
            }
            let noticed_before = std::mem::replace(&mut worker.draining, true);
            worker.noticed_at_unix_ms.get_or_insert(now);
            // The earliest time any notice named (a repeated notice never moves it later).
            worker.notice_action_at_unix_ms = match (worker.notice_action_at_unix_ms, action_at_unix_ms) {
                (Some(old), Some(new)) => Some(old.min(new)),
                (old, new) => old.or(new),
            };
            let taken_at = worker.notice_action_at_unix_ms;
            let spare = worker.taken_after_handover_lead(now);
            let job_id = worker.job;
            if job_id.is_none() {
                give_up_replacement(state, worker_id, &format!("got a {kind} notice"), now);
                if !noticed_before {
                    hold_for_waiting_job(state, worker_id, &kind, now);
                }
            }
            let running = job_id.and_then(|id| state.jobs.get_mut(&id)).filter(|j| j.state == JobState::Running);
            let Some(job) = running else { return Ok(interrupted(worker_id, None, None)) };
            job.updated_at_unix_ms = now;
            let taken =
                taken_at.map_or(String::new(), |at| format!(" (instance taken at {})", crate::text::rfc3339_utc(at)));
            // A rebalance recommendation names no time: the instance is at risk, not taken.
            let advisory = kind == REBALANCE_KIND && taken_at.is_none();
            if let Some(handover) = job.handovers.iter_mut().find(|h| h.leaving == worker_id) {
                match (handover.advisory, advisory, spare) {
                    // The spot notice after a rebalance recommendation: the handover under way
                    // now has a deadline.
                    (true, false, Some(at)) => {
                        handover.advisory = false;
                        handover.fallback_at_unix_ms = at - HANDOVER_FALLBACK_LEAD_MS;
                        let answer = interrupted(worker_id, Some(job.id), Some(handover));
                        let message = format!(
                            "{worker_id} got a {kind} notice{taken}; the handover under way has until {}",
                            crate::text::rfc3339_utc(handover.fallback_at_unix_ms)
                        );
                        push_event(job, now, "preemption_notice", message);
                        return Ok(answer);
                    }
                    // Too little time left, or SIGTERM: the checkpoint path below.
                    (true, false, None) => {}
                    // The same notice reported again (its report was retried across a leader
                    // change): the same answer, nothing changes.
                    _ => return Ok(interrupted(worker_id, Some(job.id), Some(handover))),
                }
            }
            // Time to spare (or a recommendation) and the gang not stopping yet: hand over to a
            // replacement while the gang trains on (a member noticed while others' handovers
            // are under way joins them: the gang hands over to every replacement at one step
            // boundary). A recommendation has no deadline: the gang stops for it only once its
            // replacement is ready.
            let deadline = if advisory { Some(u64::MAX) } else { spare.map(|at| at - HANDOVER_FALLBACK_LEAD_MS) };
            if let Some(fallback_at_unix_ms) = deadline
                && job.checkpoint_requested.is_none()
            {
                let handover = Handover {
                    leaving: worker_id,
                    noticed_at_unix_ms: now,
                    fallback_at_unix_ms,
                    replacement: None,
                    reserved_at_unix_ms: 0,
                    advisory,
                    live_since_unix_ms: 0,
                };
                let answer = interrupted(worker_id, Some(job.id), Some(&handover));
                job.handovers.push(handover);
                let message = if advisory {
                    format!(
                        "{worker_id} got a {kind}; training on while a replacement is sought (no deadline: the gang \
                         stops for it once the replacement is ready, or for a spot notice)"
                    )
                } else {
                    format!(
                        "{worker_id} got a {kind} notice{taken}; training on while a replacement is sought (until {})",
                        crate::text::rfc3339_utc(fallback_at_unix_ms)
                    )
                };
                push_event(job, now, "preemption_notice", message);
                let job_id = job.id;
                let generation = job.generation;
                while let Some(replacement) = pick_replacement(state, job_id, now) {
                    reserve_replacement(state, job_id, generation, replacement, now)?;
                }
                return Ok(answer);
            }
            // A budget stop stays a budget stop (the job must not resume), a handover under way
            // ends the generation anyway.
            if job.checkpoint_requested.is_none() {
                job.checkpoint_requested = Some(StopReason::Preemption);
            }
            job.drop_awaited_handovers();
            push_event(
                job,
                now,
                "preemption_notice",
                format!("{worker_id} got a {kind} notice{taken}; {CHECKPOINTING}"),
            );
            Ok(interrupted(worker_id, Some(job.id), None))
        }
        Command::HandoverTo { job_id, generation, replacement } => {
            let job = running_generation(state, job_id, generation)?;
            if job.checkpoint_requested.is_some() || job.awaited_handovers().next().is_none() {
                return Err(Rejected::NoHandover { job_id });
            }
            if !free_to_replace(state, job_id, replacement, now) {
                return Err(Rejected::WorkerUnavailable(replacement));
            }
            reserve_replacement(state, job_id, generation, replacement, now)
        }
        Command::HandoverReady { job_id, generation, live } => {
            // Every noticed member's replacement is reserved: the gang hands over to all of
            // them at the next step boundary (or, live, to the one replacement without a stop).
            let job = running_generation(state, job_id, generation)?;
            let all_reserved = !job.handovers.is_empty() && job.awaited_handovers().next().is_none();
            if !all_reserved || job.checkpoint_requested.is_some() {
                return Err(Rejected::NoHandover { job_id });
            }
            let live_under_way = job.live_handover().is_some();
            if live && (live_under_way || !job.may_hand_over_live()) {
                // Repeated (a retried proposal), or not one built-in member's handover.
                return Err(Rejected::NoHandover { job_id });
            }
            if live {
                job.updated_at_unix_ms = now;
                job.handovers[0].live_since_unix_ms = now;
                let message = format!("{}; handing over live while the gang trains on", ready_to_replace(job));
                push_event(job, now, "handover", message);
                let replacement = job.handovers[0].replacement.ok_or(Rejected::NoHandover { job_id })?;
                return Ok(Applied::HandoverStarted { job_id, replacement, live });
            }
            let why =
                if live_under_way { " (the live handover did not finish in time)".to_string() } else { String::new() };
            hand_over_at_a_stop(job, now, &why)
        }
        Command::LiveHandoverFailed { job_id, generation, by, reason } => {
            let job = running_generation(state, job_id, generation)?;
            let Some(live) = job.live_handover().filter(|_| job.checkpoint_requested.is_none()) else {
                // Swapped, or fallen back already (the other side said it too, or the leader).
                return Err(Rejected::NoHandover { job_id });
            };
            if by != live.leaving && live.replacement != Some(by) {
                return Err(Rejected::NotAMember { worker: by, job_id });
            }
            let why = format!(
                " (the live handover failed, {by} said: {})",
                crate::text::clip_middle(reason, LIVE_FAILURE_LEN_MAX)
            );
            hand_over_at_a_stop(job, now, &why)
        }
        Command::HandoverSwapped { job_id, generation, replacement, step, peer_bytes } => {
            let job = running_generation(state, job_id, generation)?;
            // Only a live handover's replacement reports a swap (nobody else gets an assignment
            // that joins live). Its report is taken even when the leader fell back to a stop
            // meanwhile (a swap that took long): the gang did swap, and it stops with the
            // replacement in the rank, which then holds the state and is placed again with it.
            let Some(index) = job.handovers.iter().position(|h| h.replacement == Some(replacement)) else {
                // A report retried after its entry was applied (a leader change meanwhile).
                if job.gang.contains(&replacement) {
                    return Ok(Applied::HandoverSwapped { job_id, leaving: None });
                }
                return Err(Rejected::NoHandover { job_id });
            };
            let Some(rank) = job.gang.iter().position(|w| *w == job.handovers[index].leaving) else {
                return Err(Rejected::NoHandover { job_id });
            };
            let handover = job.handovers.remove(index);
            // The gang's price changes with the member from now on: the time so far at the old
            // price (the running generation's cost is `gang_usd_per_hour` times its age).
            let (old_usd_per_hour, new_usd_per_hour) =
                (usd_per_hour(state, handover.leaving), usd_per_hour(state, replacement));
            let job = state.jobs.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
            let age_ms = now.saturating_sub(job.generation_started_at_unix_ms) as f64;
            job.cost_usd += (old_usd_per_hour - new_usd_per_hour) * age_ms / 3_600_000.0;
            job.gang_usd_per_hour += new_usd_per_hour - old_usd_per_hour;
            job.gang[rank] = replacement;
            job.step = job.step.max(step);
            job.resume_peer_bytes = job.resume_peer_bytes.saturating_add(peer_bytes);
            job.preemptions = job.preemptions.saturating_add(1);
            job.updated_at_unix_ms = now;
            let since_notice_ms = now.saturating_sub(handover.noticed_at_unix_ms);
            let message = JobEvent::handed_over_message(replacement, handover.leaving, step, since_notice_ms);
            push_event(job, now, "handover", format!("{message}{LIVE_SWAP}"));
            release(state, &[handover.leaving]);
            if let Some(worker) = state.workers.get_mut(&replacement) {
                worker.job = Some(job_id);
                // It holds the state pushed to it.
                worker.held_state = HeldState::Job(job_id);
            }
            Ok(Applied::HandoverSwapped { job_id, leaving: Some(handover.leaving) })
        }
        Command::LiveSwapTimed { job_id, generation, step, stall_ms } => {
            let job = running_generation(state, job_id, generation)?;
            if job.live_swap_timed_step >= step {
                return Ok(Applied::TrainingResumed { job_id, recorded: false });
            }
            job.live_swap_timed_step = step;
            job.last_stall_ms = stall_ms;
            job.stall_ms_total = job.stall_ms_total.saturating_add(stall_ms);
            let message = format!(
                "the live swap after step {step} cost {stall_ms} ms without a step (a surviving rank's longest gap \
                 around it); no stop"
            );
            push_event(job, now, "resumed", message);
            Ok(Applied::TrainingResumed { job_id, recorded: true })
        }
        Command::RequestCheckpoint { job_id, generation, reason } => {
            let job = running_generation(state, job_id, generation)?;
            // The leader's fallback: no replacement came in time; this generation stops as
            // after any notice.
            let message = JobEvent::checkpoint_requested_message(reason);
            ask_to_stop(job, now, reason, "checkpoint_requested", message);
            Ok(Applied::CheckpointRequested { job_id })
        }
        Command::PreemptForPriority { job_id, generation, for_job } => {
            let waiting = state.jobs.get(&for_job).ok_or(Rejected::JobNotFound(for_job))?;
            if waiting.state != JobState::Pending {
                return Err(Rejected::NotPending { job_id: for_job, state: waiting.state.name() });
            }
            let for_priority = waiting.spec.priority;
            let job = running_generation(state, job_id, generation)?;
            let priority = job.spec.priority;
            if priority >= for_priority {
                return Err(Rejected::PriorityNotLower { job_id, priority, for_job, for_priority });
            }
            let message = JobEvent::priority_stop_message(for_job, for_priority, priority);
            ask_to_stop(job, now, StopReason::Priority, "priority", message);
            Ok(Applied::CheckpointRequested { job_id })
        }
        Command::TrainingResumed {
            job_id,
            generation,
            stall_ms,
            handover,
            stopped_for,
            outage,
            peer_bytes,
            storage_bytes,
        } => {
            let job = running_generation(state, job_id, generation)?;
            if job.stall_generation == generation {
                return Ok(Applied::TrainingResumed { job_id, recorded: false });
            }
            job.stall_generation = generation;
            // A planned stop's time without a step (a regroup, or a wait for workers) is no
            // interruption: the job's stall figures count those alone.
            if stopped_for.is_none() {
                job.last_stall_ms = stall_ms;
                job.stall_ms_total = job.stall_ms_total.saturating_add(stall_ms);
            }
            job.resume_peer_bytes = job.resume_peer_bytes.saturating_add(peer_bytes);
            job.resume_storage_bytes = job.resume_storage_bytes.saturating_add(storage_bytes);
            let since = match stopped_for.or(handover.then_some(StopReason::Handover)) {
                Some(reason) => format!("the stop ({})", reason.name()),
                None if outage => "the stop for the store outage".to_string(),
                None => "the notice or loss".to_string(),
            };
            push_event(
                job,
                now,
                "resumed",
                format!(
                    "generation {generation} trained again {stall_ms} ms after {since}; state moved: {peer_bytes} bytes \
                     peer to peer, {storage_bytes} bytes from the store"
                ),
            );
            Ok(Applied::TrainingResumed { job_id, recorded: true })
        }
        Command::MoveToOnDemand { job_id, reason } => {
            let job = state.jobs.get(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
            if !matches!(job.state, JobState::Pending | JobState::Running) {
                return Err(Rejected::JobFinished { job_id, state: job.state.name() });
            }
            let on_spot = job.gang.iter().any(|w| on_spot(state, *w));
            let job = state.jobs.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
            if job.on_demand_only {
                return Ok(Applied::MovedToOnDemand { job_id, checkpoint: false });
            }
            job.on_demand_only = true;
            job.updated_at_unix_ms = now;
            let reason = bounded(reason);
            // A budget or preemption stop already out ends the generation anyway; it resumes
            // on on-demand capacity then.
            let checkpoint = job.state == JobState::Running && on_spot && job.checkpoint_requested.is_none();
            if checkpoint {
                job.checkpoint_requested = Some(StopReason::Deadline);
                push_event(job, now, "deadline", format!("{reason}; checkpointing to move to on-demand capacity"));
            } else {
                push_event(job, now, "deadline", format!("{reason}; on-demand capacity only from now on"));
            }
            Ok(Applied::MovedToOnDemand { job_id, checkpoint })
        }
        Command::GenerationEnded { job_id, generation, end, step, reporter, announced } => {
            // A report the log already has, sent again (the reporter's call crossed a leader
            // change): acknowledged, so that its rank writes the checkpoint it announced.
            if let (Some(record), Some(job)) = (&announced, state.jobs.get(&job_id))
                && job.checkpoints.iter().any(|c| {
                    c.pending
                        && c.uri == record.uri
                        && c.generation == generation
                        && c.manifest_sha256 == record.manifest_sha256
                        && c.writer.is_some()
                        && c.writer == reporter
                })
            {
                return Ok(Applied::GenerationEnded { job_id, state: job.state });
            }
            check_reporter(state, job_id, reporter)?;
            let unreachable = unreachable_member(state, job_id, generation, &end, reporter);
            if let (GenerationEnd::Checkpointed | GenerationEnd::PeerLost { .. }, Some(record)) = (&end, announced) {
                let job = running_generation(state, job_id, generation)?;
                announce_checkpoint(job, record, reporter, generation, step, now);
            }
            let applied = generation_ended(state, job_id, generation, end, step, reporter, now)?;
            // The reporter of a break is alive (it just called): not suspect, so that the
            // regroup can take it at once with the state it holds (see the scheduler's holders).
            if let Some(worker) = reporter.and_then(|r| state.workers.get_mut(&r)) {
                worker.suspect_since_unix_ms = None;
            }
            if let Some(worker) = unreachable {
                hold_unreachable(state, job_id, worker, now);
            }
            Ok(applied)
        }
        Command::CheckpointDeleting { job_id, uri } => {
            let registered = state.registered_checkpoints().contains(&(job_id, uri.as_str()));
            let job = state.jobs.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
            let newest = job.latest_checkpoint.as_ref().map(|c| c.uri.clone());
            match job.checkpoints.iter_mut().find(|c| c.uri == uri) {
                // The newest usable checkpoint, and a registered version's source, are never
                // deleted by retention.
                Some(record) if Some(&uri) != newest.as_ref() && !registered => record.deleting = true,
                _ => return Err(Rejected::CheckpointNotDeletable { job_id, uri }),
            }
            refresh_latest(job);
            Ok(Applied::CheckpointDeletionChanged { job_id })
        }
        Command::CheckpointDeleted { job_id, uri } => {
            let job = state.jobs.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
            let before = job.checkpoints.len();
            job.checkpoints.retain(|c| !(c.uri == uri && c.deleting));
            if job.checkpoints.len() == before {
                return Err(Rejected::CheckpointNotDeletable { job_id, uri });
            }
            Ok(Applied::CheckpointDeletionChanged { job_id })
        }
        Command::AssignGang { job_id, workers } => assign_gang(state, job_id, workers, now),
        Command::SubmitInference { request, client_request_id } => {
            inference::submit(state, index, *request, client_request_id, now)
        }
        Command::JoinInference { job_id, workers } => inference::join(state, job_id, workers, now),
        Command::YieldInference { job_id } => inference::yield_workers(state, job_id, now),
        Command::LeaseShard { job_id, worker_id } => inference::lease(state, job_id, worker_id, now),
        Command::CommitShard { job_id, worker_id, index, attempt, object, stats } => {
            inference::commit(state, job_id, worker_id, index, attempt, object, stats, now)
        }
        Command::FailShard { job_id, worker_id, index, attempt, error, release } => {
            inference::fail(state, job_id, worker_id, index, attempt, error, release, now)
        }
        Command::ForgetFinished { before_unix_ms } => Ok(forget_finished(state, before_unix_ms)),
        Command::InferenceFinished { job_id, success, reason } => {
            inference::finished(state, job_id, success, reason, now)
        }
        Command::RequestInstances { request_id, job, instance_type, zone, spot, count, usd_per_hour } => {
            if request_id.is_empty() || request_id.len() > CLIENT_REQUEST_ID_LEN_MAX {
                return Err(Rejected::BadRequestId);
            }
            if state.instance_requests.contains_key(&request_id) {
                return Err(Rejected::DuplicateRequest(request_id));
            }
            if state.instance_requests.len() >= INSTANCE_REQUESTS_MAX {
                let settled = state
                    .instance_requests
                    .values()
                    .filter(|r| r.state != RequestState::Requested)
                    .min_by_key(|r| r.requested_at_unix_ms)
                    .map(|r| r.request_id.clone());
                match settled {
                    Some(oldest) => {
                        state.instance_requests.remove(&oldest);
                    }
                    None => return Err(Rejected::TooManyInstanceRequests { limit: INSTANCE_REQUESTS_MAX }),
                }
            }
            let request = InstanceRequest {
                request_id: request_id.clone(),
                job,
                instance_type,
                zone,
                spot,
                count,
                usd_per_hour,
                requested_at_unix_ms: now,
                state: RequestState::Requested,
                reason: String::new(),
            };
            state.instance_requests.insert(request_id, request);
            Ok(Applied::InstancesChanged)
        }
        Command::InstancesLaunched { request_id, instances } => {
            let request = state
                .instance_requests
                .get_mut(&request_id)
                .filter(|r| r.state == RequestState::Requested)
                .ok_or_else(|| Rejected::RequestNotOutstanding(request_id.clone()))?;
            request.state = RequestState::Launched;
            let request = request.clone();
            for launched in instances {
                if state.instances.len() >= INSTANCES_MAX {
                    let oldest = state
                        .instances
                        .values()
                        .filter(|i| i.terminated_at_unix_ms.is_some())
                        .min_by_key(|i| i.launched_at_unix_ms)
                        .map(|i| i.id.clone());
                    if let Some(oldest) = oldest {
                        state.instances.remove(&oldest);
                    }
                }
                state.instances.entry(launched.id.clone()).or_insert(InstanceRecord {
                    id: launched.id,
                    request_id: request.request_id.clone(),
                    instance_type: request.instance_type.clone(),
                    zone: launched.zone,
                    spot: launched.spot,
                    usd_per_hour: request.usd_per_hour,
                    launched_at_unix_ms: now,
                    terminated_at_unix_ms: None,
                });
            }
            Ok(Applied::InstancesChanged)
        }
        Command::LaunchFailed { request_id, reason, capacity } => {
            let request = state
                .instance_requests
                .get_mut(&request_id)
                .filter(|r| r.state == RequestState::Requested)
                .ok_or_else(|| Rejected::RequestNotOutstanding(request_id.clone()))?;
            request.state = RequestState::Failed;
            request.reason = bounded(if capacity { format!("no capacity: {reason}") } else { reason });
            Ok(Applied::InstancesChanged)
        }
        Command::InstancesTerminated { ids } => {
            for id in ids {
                if let Some(instance) = state.instances.get_mut(&id) {
                    instance.terminated_at_unix_ms.get_or_insert(now);
                }
            }
            Ok(Applied::InstancesChanged)
        }
        Command::InstancesNoShow { ids } => {
            for id in ids {
                let Some(instance) = state.instances.get_mut(&id).filter(|i| i.terminated_at_unix_ms.is_none()) else {
                    continue; // already gone: said once
                };
                instance.terminated_at_unix_ms = Some(now);
                let instance = instance.clone();
                let job = state.instance_requests.get(&instance.request_id).and_then(|r| r.job);
                if let Some(job) = job.and_then(|id| state.jobs.get_mut(&id)).filter(|j| !j.state.is_terminal()) {
                    push_event(job, now, "capacity", no_show_message(&instance, now));
                }
            }
            Ok(Applied::InstancesChanged)
        }
        Command::RecordCheckpoint { job_id, checkpoint, reporter } => {
            let job = state.jobs.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
            // The writer of an announced checkpoint confirms it, whichever generation runs by
            // now and whether or not the writer is still a member (a leaving rank 0 writes it too).
            if let Some(record) =
                job.checkpoints.iter_mut().find(|c| c.pending && !c.deleting && c.uri == checkpoint.uri)
            {
                if let (Some(worker), Some(writer)) = (reporter, record.writer)
                    && worker != writer
                {
                    return Err(Rejected::NotAMember { worker, job_id });
                }
                if (record.step, &record.manifest_sha256, record.size_bytes)
                    != (checkpoint.step, &checkpoint.manifest_sha256, checkpoint.size_bytes)
                {
                    return Err(Rejected::CheckpointMismatch { job_id, uri: checkpoint.uri });
                }
                record.pending = false;
                let step = record.step;
                refresh_latest(job);
                job.updated_at_unix_ms = now;
                return Ok(Applied::CheckpointRecorded { job_id, step });
            }
            check_reporter(state, job_id, reporter)?;
            let job = state.jobs.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
            if job.state.is_terminal() {
                return Err(Rejected::JobFinished { job_id, state: job.state.name() });
            }
            // A superseded generation's late save is dropped (the new one resumed from an older
            // checkpoint and will write its own), and the checkpoint step never decreases.
            if checkpoint.generation < job.generation {
                return Err(Rejected::StaleGeneration {
                    job_id,
                    current: job.generation,
                    reported: checkpoint.generation,
                });
            }
            if let Some(latest) = job.latest_checkpoint.as_ref().filter(|c| c.step >= checkpoint.step) {
                return Err(Rejected::NotNewer { job_id, step: checkpoint.step, latest: latest.step });
            }
            let step = checkpoint.step;
            push_checkpoint(job, CheckpointRecord { pending: false, writer: reporter, ..checkpoint }, now);
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
        Command::WorkersHeard { workers } => {
            at_most(workers.len(), WORKERS_HEARD_PER_COMMAND_MAX, "workers heard")?;
            let mut cleared = 0;
            for (worker_id, since) in workers {
                if let Some(worker) =
                    state.workers.get_mut(&worker_id).filter(|w| w.suspect_since_unix_ms == Some(since))
                {
                    worker.suspect_since_unix_ms = None;
                    cleared += 1;
                }
            }
            Ok(Applied::WorkersHeard { cleared })
        }
        Command::SparesHolding { workers } => {
            at_most(workers.len(), WORKERS_HEARD_PER_COMMAND_MAX, "spares holding")?;
            let mut set = 0;
            for (worker_id, job_id) in workers {
                let spared = state.jobs.get(&job_id).is_some_and(|j| {
                    j.state == JobState::Running && j.spec.capacity.spares > 0 && j.spec.command().is_none()
                });
                if let Some(worker) = state
                    .workers
                    .get_mut(&worker_id)
                    .filter(|w| spared && w.job.is_none() && w.lost_at_unix_ms.is_none())
                    .filter(|w| w.held_state != HeldState::Job(job_id))
                {
                    worker.held_state = HeldState::Job(job_id);
                    set += 1;
                }
            }
            Ok(Applied::SparesHolding { set })
        }
        Command::SetPendingReasons { reasons } => {
            at_most(reasons.len(), PENDING_REASONS_PER_COMMAND_MAX, "pending reasons")?;
            let mut set = 0;
            for (job_id, reason) in reasons {
                if let Some(job) = state.jobs.get_mut(&job_id).filter(|j| j.state == JobState::Pending) {
                    job.reason = bounded(reason);
                    set += 1;
                }
            }
            Ok(Applied::ReasonsSet { set })
        }
        Command::SetModelAlias { name, version, alias } => {
            let valid = !alias.is_empty()
                && alias.len() <= 63
                && alias.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
                && !alias.bytes().all(|b| b.is_ascii_digit());
            if !valid {
                return Err(Rejected::BadAlias(alias));
            }
            state.resolve_model(&format!("{name}@{version}"))?;
            let model = state.models.get_mut(&name).expect("the model was just resolved");
            if !model.aliases.contains_key(&alias) && model.aliases.len() >= MODEL_ALIASES_MAX {
                return Err(Rejected::TooManyAliases { name, limit: MODEL_ALIASES_MAX });
            }
            model.aliases.insert(alias, version);
            Ok(Applied::ModelChanged { name, version })
        }
        Command::JobFinished { job_id, generation, success, reason, step, metrics, artifact, reporter } => {
            check_reporter(state, job_id, reporter)?;
            let job = state.jobs.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
            // A built-in model has an input shape (batch inference needs it); a command job's
            // artifact (its newest checkpoint) has none.
            if let Some(artifact) = &artifact {
                if job.spec.command().is_none() {
                    artifact.shape.check().map_err(|e| Rejected::BadReport(format!("the model's {e}")))?;
                } else if !artifact.shape.is_none() {
                    return Err(Rejected::BadReport("a command job's artifact has no input shape".into()));
                }
            }
            if job.state.is_terminal() {
                return Err(Rejected::JobFinished { job_id, state: job.state.name() });
            }
            let job = running_generation(state, job_id, generation)?;
            charge_generation(job, now, step, 0);
            job.state = if success { JobState::Succeeded } else { JobState::Failed };
            job.checkpoint_requested = None;
            job.reason = bounded(reason);
            job.step = step;
            // A non-finite value is no measurement (and JSON, the snapshot format, has none).
            let finite = |v: Option<f64>| v.filter(|v| v.is_finite());
            job.metrics = metrics.map(|m| FinalMetrics {
                val_accuracy: finite(m.val_accuracy),
                val_loss: finite(m.val_loss),
                train_loss: finite(m.train_loss),
                // Only an earlier state than the final one is named.
                val_step: if m.val_step < step { m.val_step } else { 0 },
            });
            job.updated_at_unix_ms = now;
            let kind = if success { "succeeded" } else { "failed" };
            // A success before its length says why (its reason: "finished at step S: its
            // validation reached ..."); any other end, where.
            let said = if success && job.reason.starts_with("finished at step ") {
                format!("generation {generation} {}", job.reason)
            } else {
                format!("generation {generation} finished at step {step}")
            };
            push_event(job, now, kind, said);
            if success && artifact.is_none() && !job.spec.output.register_as.is_empty() {
                // Said where the user looks (the job's events), not only in a worker's log.
                let why = if job.reason.is_empty() { "the job reported no model" } else { job.reason.as_str() };
                let message = format!("model `{}` not registered: {why}", job.spec.output.register_as);
                push_event(job, now, "registry", message);
            }
            let gang = job.end_gang();
            release(state, &gang);
            // Its agents drop this job's state (another job's, held through it, stays).
            set_held_state(state, &gang, |held| held == HeldState::Job(job_id), HeldState::Nothing);
            if success && let Some(artifact) = artifact {
                register_model(state, job_id, artifact, now);
            }
            Ok(Applied::JobFinished { job_id })
        }
    }
}

/// A report from `reporter` (when a worker made it) must come from a member of the job's
/// current or just-ended gang.
fn check_reporter(state: &State, job_id: JobId, reporter: Option<WorkerId>) -> Result<(), Rejected> {
    let Some(worker) = reporter else { return Ok(()) };
    let job = state.jobs.get(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
    if job.is_member(worker) { Ok(()) } else { Err(Rejected::NotAMember { worker, job_id }) }
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
    // Free workers, and members of the job's last gang noticed since that hold its state and
    // have time for a handover: those rejoin and hand over from the new gang (see below).
    let mut rejoining = Vec::new();
    for id in &workers {
        let worker = state.workers.get(id);
        let free = worker.is_some_and(|w| w.lost_at_unix_ms.is_none() && w.job.is_none() && !w.draining);
        let rejoins = worker.is_some_and(|w| w.may_rejoin(job_id, now));
        if !(free || rejoins) || held_unreachable(state, *id, now) {
            return Err(Rejected::WorkerUnavailable(*id));
        }
        if let Some(w) = worker.filter(|_| rejoins)
            && let Some(at) = w.taken_after_handover_lead(now)
        {
            rejoining.push((*id, at, w.noticed_at_unix_ms.unwrap_or(now)));
        }
    }
    // A built-in job that resumes may leave its state with its members (one received from a
    // peer is kept); a fresh start leaves what they hold.
    let resumes = job.spec.command().is_none() && job.latest_checkpoint.is_some();
    for id in &workers {
        if let Some(worker) = state.workers.get_mut(id) {
            worker.job = Some(job_id);
            if resumes {
                worker.held_state = HeldState::Job(job_id);
            }
        }
    }
    // The last gang's noticed holders left out stay draining (they are drained now).
    for id in &job.ended_gang.clone() {
        if let Some(worker) = state.workers.get_mut(id).filter(|w| w.holding_for == Some(job_id)) {
            worker.holding_for = None;
        }
    }
    let gang_usd_per_hour: f64 = workers.iter().map(|w| usd_per_hour(state, *w)).sum();
    let job = state.jobs.get_mut(&job_id).expect("the job was just found");
    job.generation_started_at_unix_ms = now;
    job.generation_start_step = resume_step(job);
    job.gang_usd_per_hour = gang_usd_per_hour;
    job.generation += 1;
    job.state = JobState::Running;
    job.reason.clear();
    job.checkpoint_requested = None;
    job.updated_at_unix_ms = now;
    let message = format!("generation {} on {} worker(s)", job.generation, workers.len());
    job.world_size = workers.len() as u32;
    job.gang = workers;
    job.ended_gang.clear();
    push_event(job, now, "gang", message);
    let generation = job.generation;
    for (leaving, at, noticed_at_unix_ms) in rejoining {
        // As a notice with time to spare in a running gang: a replacement is sought while the
        // gang trains on (until the fallback time, when it stops at a checkpoint).
        let fallback_at_unix_ms = at - HANDOVER_FALLBACK_LEAD_MS;
        job.handovers.push(Handover {
            leaving,
            noticed_at_unix_ms,
            fallback_at_unix_ms,
            replacement: None,
            reserved_at_unix_ms: 0,
            advisory: false,
            live_since_unix_ms: 0,
        });
        let message = format!(
            "{leaving} rejoins with the state it holds though noticed (instance taken at {}); training on while a \
             replacement is sought (until {})",
            crate::text::rfc3339_utc(at),
            crate::text::rfc3339_utc(fallback_at_unix_ms)
        );
        push_event(job, now, "preemption_notice", message);
    }
    state.running.started(job_id, &state.jobs);
    // Never an error past this point (the gang is assigned): a reservation refused ends the loop.
    while let Some(replacement) = pick_replacement(state, job_id, now) {
        if reserve_replacement(state, job_id, generation, replacement, now).is_err() {
            break;
        }
    }
    Ok(Applied::GangAssigned { job_id, generation })
}

/// Checks a submission's request id and the job limit (training and inference jobs alike);
/// `Some(job)` when the id already created `job` (a retried submission).
pub(super) fn admit(state: &State, client_request_id: &str) -> Result<Option<JobId>, Rejected> {
    if client_request_id.is_empty() || client_request_id.len() > CLIENT_REQUEST_ID_LEN_MAX {
        return Err(Rejected::BadRequestId);
    }
    if let Some(&job_id) = state.request_ids.get(client_request_id) {
        return Ok(Some(job_id));
    }
    // At the limit the oldest finished record makes room (`make_room`, once the submission is
    // accepted): only unfinished jobs fill the cluster.
    if state.jobs.len() + state.inferences.len() >= JOBS_MAX && oldest_finished(state).is_none() {
        return Err(Rejected::TooManyJobs { limit: JOBS_MAX });
    }
    Ok(None)
}

/// The finished training or inference job updated longest ago.
fn oldest_finished(state: &State) -> Option<JobId> {
    let training = state.jobs.values().filter(|j| j.state.is_terminal()).map(|j| (j.updated_at_unix_ms, j.id));
    let inference = state.inferences.values().filter(|j| j.state.is_terminal()).map(|j| (j.updated_at_unix_ms, j.id));
    training.chain(inference).min().map(|(_, id)| id)
}

/// Before an accepted submission is inserted: at the job limit, forget the oldest finished
/// record ([`admit`] checked there is one).
pub(super) fn make_room(state: &mut State) {
    if state.jobs.len() + state.inferences.len() >= JOBS_MAX
        && let Some(oldest) = oldest_finished(state)
    {
        forget_jobs(state, &[oldest]);
    }
}

/// Removes these jobs' records and the request ids that created them.
fn forget_jobs(state: &mut State, ids: &[JobId]) {
    for id in ids {
        state.jobs.remove(id);
        state.inferences.remove(id);
    }
    let gone: std::collections::BTreeSet<&JobId> = ids.iter().collect();
    state.request_ids.retain(|_, job| !gone.contains(job));
}

/// Record retention (see [`Command::ForgetFinished`]).
fn forget_finished(state: &mut State, before_unix_ms: u64) -> Applied {
    let (jobs, workers) = state.forgettable(before_unix_ms);
    forget_jobs(state, &jobs);
    for worker in &workers {
        state.workers.remove(worker);
    }
    Applied::Forgotten { jobs: jobs.len(), workers: workers.len() }
}

impl State {
    /// What record retention would forget at `before_unix_ms` (see [`Command::ForgetFinished`]):
    /// finished jobs and inference jobs last updated before it, and workers lost before it.
    pub fn forgettable(&self, before_unix_ms: u64) -> (Vec<JobId>, Vec<WorkerId>) {
        let old = |finished: bool, updated: u64| finished && updated < before_unix_ms;
        let training = self.jobs.values().filter(|j| old(j.state.is_terminal(), j.updated_at_unix_ms)).map(|j| j.id);
        let inference =
            self.inferences.values().filter(|j| old(j.state.is_terminal(), j.updated_at_unix_ms)).map(|j| j.id);
        let workers = self
            .workers
            .values()
            .filter(|w| w.job.is_none() && w.lost_at_unix_ms.is_some_and(|lost| lost < before_unix_ms))
            .map(|w| w.id);
        (training.chain(inference).collect(), workers.collect())
    }
}

/// A successful job's model becomes the next version of `output.register_as`.
fn register_model(state: &mut State, job_id: JobId, artifact: ModelArtifact, now: u64) {
    let Some(job) = state.jobs.get_mut(&job_id) else { return };
    let name = job.spec.output.register_as.clone();
    if name.is_empty() || (!state.models.contains_key(&name) && state.models.len() >= MODELS_MAX) {
        return;
    }
    let model = state.models.entry(name.clone()).or_insert_with(|| Model {
        name: name.clone(),
        versions: Vec::new(),
        aliases: BTreeMap::new(),
    });
    if model.versions.len() >= MODEL_VERSIONS_MAX {
        push_event(job, now, "registry", format!("model `{name}` has {MODEL_VERSIONS_MAX} versions; not registered"));
        return;
    }
    let version = model.versions.last().map_or(1, |v| v.version + 1);
    model.versions.push(ModelVersion {
        version,
        job_id,
        checkpoint: job.latest_checkpoint.clone(),
        dataset_sha256: artifact.dataset_sha256,
        artifact_uri: artifact.artifact_uri,
        spec: job.spec.clone(),
        metrics: job.metrics,
        preemptions: job.preemptions,
        recoveries: job.recoveries,
        steps_lost: job.steps_lost,
        cost_usd: job.cost_usd,
        created_at_unix_ms: now,
        shape: artifact.shape,
    });
    let state_of = match job.metrics.map_or(0, |m| m.val_step) {
        0 => String::new(),
        step => format!(" (its best validated state, step {step}, not its last)"),
    };
    push_event(job, now, "registered", format!("model {name} version {version}{state_of}"));
}

/// Members of a gang that broke without notice: any of them may be dead.
fn suspect(state: &mut State, gang: &[WorkerId], now: u64) {
    for id in gang {
        if let Some(worker) = state.workers.get_mut(id) {
            worker.suspect_since_unix_ms = Some(now);
        }
    }
}

/// The member of `job_id`'s running `generation` that a report of its end names as not
/// reachable at the rendezvous (`GenerationEnd::PeerLost::unreachable_rank`), unless it is the
/// reporter itself.
fn unreachable_member(
    state: &State,
    job_id: JobId,
    generation: u64,
    end: &GenerationEnd,
    reporter: Option<WorkerId>,
) -> Option<WorkerId> {
    let GenerationEnd::PeerLost { unreachable_rank: Some(rank), .. } = end else { return None };
    let job = state.jobs.get(&job_id).filter(|j| j.state == JobState::Running && j.generation == generation)?;
    job.gang.get(*rank as usize).copied().filter(|w| Some(*w) != reporter)
}

/// `worker`'s peers could not reach it when `job_id`'s gang formed: it is not placed nor
/// reserved for [`unreachable_hold_ms`] (a gang with it would break at once again): 60 s, and
/// twice as long for each hold in a row (a firewalled worker is tried ever more rarely).
fn hold_unreachable(state: &mut State, job_id: JobId, worker: WorkerId, now: u64) {
    let Some(w) = state.workers.get_mut(&worker) else { return };
    let in_a_row =
        w.unreachable_until_unix_ms > 0 && now < w.unreachable_until_unix_ms.saturating_add(UNREACHABLE_STREAK_GAP_MS);
    w.unreachable_holds = if in_a_row { w.unreachable_holds.saturating_add(1) } else { 1 };
    let hold_ms = unreachable_hold_ms(w.unreachable_holds);
    w.unreachable_until_unix_ms = now.saturating_add(hold_ms);
    let holds = w.unreachable_holds;
    if let Some(job) = state.jobs.get_mut(&job_id) {
        let again = if holds > 1 { format!(" ({holds} times in a row)") } else { String::new() };
        let message = format!(
            "{worker}'s peers could not reach its data port when the gang formed{again}; not placed for {} s",
            hold_ms / 1000
        );
        push_event(job, now, "unreachable", message);
    }
}

/// Whether `worker` is held out of placement at `now` ([`hold_unreachable`]).
pub fn held_unreachable(state: &State, worker: WorkerId, now: u64) -> bool {
    state.workers.get(&worker).is_some_and(|w| w.held_unreachable(now))
}

/// Whether `worker` may be reserved to replace a member of `job_id`'s gang at `now`: it fits
/// ([`replacement_fits`]) and is not held out as unreachable.
fn free_to_replace(state: &State, job_id: JobId, worker: WorkerId, now: u64) -> bool {
    replacement_fits(state, job_id, worker) && !held_unreachable(state, worker, now)
}

/// Whether `worker` may replace a member of `job_id`'s gang: live, free, not draining nor
/// suspect, not promised to another handover, with the job's GPUs, of a type it allows, within
/// its price cap, on-demand when the job must be.
fn replacement_fits(state: &State, job_id: JobId, worker: WorkerId) -> bool {
    let Some(job) = state.jobs.get(&job_id) else { return false };
    let promised = reserving_job(state, worker).is_some();
    state.workers.get(&worker).is_some_and(|w| {
        w.lost_at_unix_ms.is_none()
            && w.job.is_none()
            && !w.draining
            && w.suspect_since_unix_ms.is_none()
            && w.info.gpus >= job.spec.workers.gpus
            && crate::spec::instance_allowed(
                &job.spec.capacity.instance_types,
                job.spec.capacity.max_price_usd_per_hour,
                &w.info.instance_type,
                usd_per_hour(state, worker),
            )
            && !promised
            && !(job.needs_on_demand() && on_spot(state, worker))
    })
}

/// The job whose handover has reserved `worker` as its replacement, if any.
/// Only a running job has handovers (a gang that ends drops them), so the running index is
/// read, not every job held: free workers' heartbeats ask this.
pub fn reserving_job(state: &State, worker: WorkerId) -> Option<&Job> {
    let reserving = |j: &&Job| j.reserved_replacements().any(|r| r == worker);
    let found = state.running_jobs().find(reserving);
    debug_assert_eq!(found.map(|j| j.id), state.jobs.values().find(reserving).map(|j| j.id));
    found
}

/// The running job `worker` is a warm spare of (`capacity.spares`), if any ([`warm_spares`]).
/// It prepares that job (data loaded, a warm-up step) and rank 0 pushes it every checkpoint.
pub fn spare_for(state: &State, worker: WorkerId) -> Option<&Job> {
    let (_, job) = warm_spares(state).into_iter().find(|(w, _)| *w == worker)?;
    state.jobs.get(&job)
}

/// `job`'s warm spares ([`warm_spares`]), in worker order; none (and nothing read) unless it
/// runs and keeps some.
pub fn spares_of(state: &State, job: JobId) -> Vec<WorkerId> {
    let keeps = state.jobs.get(&job).is_some_and(|j| j.state == JobState::Running && j.spec.capacity.spares > 0);
    if !keeps {
        return Vec::new();
    }
    warm_spares(state).into_iter().filter(|(_, of)| *of == job).map(|(w, _)| w).collect()
}

/// The warm spares (`capacity.spares`), each with its job, in worker order. A job's spares are
/// free workers that could replace one of its members, in its gang's pool (where the
/// autoscaler keeps them), at most its `capacity.spares`: first those recorded holding its
/// state (its spares already, [`Command::SparesHolding`]: a spare stays one while it is free),
/// then the others in id order, each to the lowest job id that still wants one. A free worker
/// beyond every job's count is nobody's spare: it idles (no data loaded for a job, no
/// checkpoint pushed to it). The scan ends once every job has its spares.
pub fn warm_spares(state: &State) -> Vec<(WorkerId, JobId)> {
    fn pool_of(w: &crate::state::Worker) -> (&str, &str) {
        (w.info.instance_type.as_str(), w.info.zone.as_str())
    }
    let mut wanting: Vec<(JobId, (&str, &str), u32)> = state
        .running_jobs()
        .filter(|j| j.spec.capacity.spares > 0)
        .filter_map(|j| Some((j.id, pool_of(state.workers.get(j.gang.first()?)?), j.spec.capacity.spares)))
        .collect();
    if wanting.is_empty() {
        return Vec::new(); // the common case: no running job keeps spares, no worker is read
    }
    let mut spares: Vec<(WorkerId, JobId)> = Vec::new();
    let free = || state.workers.values().filter(|w| w.job.is_none() && w.lost_at_unix_ms.is_none());
    // Holders of a wanting job's state first (to that job alone), then the others.
    for holders_only in [true, false] {
        for w in free() {
            if wanting.is_empty() {
                break;
            }
            let held = match w.held_state {
                HeldState::Job(job) => Some(job),
                HeldState::Nothing | HeldState::Unknown => None,
            };
            if !holders_only && spares.iter().any(|(taken, _)| *taken == w.id) {
                continue;
            }
            let fits = |job: JobId, pool: (&str, &str)| pool == pool_of(w) && replacement_fits(state, job, w.id);
            let taken =
                wanting.iter().position(|(job, pool, _)| (!holders_only || held == Some(*job)) && fits(*job, *pool));
            if let Some(index) = taken {
                let (job, _, left) = &mut wanting[index];
                spares.push((w.id, *job));
                *left -= 1;
                if *left == 0 {
                    wanting.remove(index);
                }
            }
        }
    }
    spares.sort();
    spares
}

/// The free worker to replace the first noticed member of `job_id` still without a
/// replacement, if any: one outside the noticed member's pool first (that pool is being
/// reclaimed), then the job's own warm spare (prepared), then any but another job's spare,
/// then the lowest id; none held unreachable at `now`.
pub fn pick_replacement(state: &State, job_id: JobId, now: u64) -> Option<WorkerId> {
    let leaving = state.jobs.get(&job_id)?.awaited_handovers().next()?.leaving;
    let pool = state.workers.get(&leaving).map(|w| (w.info.instance_type.as_str(), w.info.zone.as_str()));
    let spares: std::collections::BTreeMap<WorkerId, JobId> = warm_spares(state).into_iter().collect();
    // 0: this job's spare, 1: nobody's, 2: another job's.
    let whose = |w: WorkerId| spares.get(&w).map_or(1, |of| if *of == job_id { 0 } else { 2 });
    state
        .workers
        .values()
        .filter(|w| free_to_replace(state, job_id, w.id, now))
        .min_by_key(|w| (Some((w.info.instance_type.as_str(), w.info.zone.as_str())) == pool, whose(w.id), w.id))
        .map(|w| w.id)
}

/// Reserves `replacement` for the job's first handover still without one: it prepares while
/// the gang trains on, until the leader finds every replacement ready
/// ([`Command::HandoverReady`]).
fn reserve_replacement(
    state: &mut State,
    job_id: JobId,
    generation: u64,
    replacement: WorkerId,
    now: u64,
) -> Result<Applied, Rejected> {
    let job = running_generation(state, job_id, generation)?;
    let Some(handover) = job.handovers.iter_mut().find(|h| h.replacement.is_none()) else {
        return Err(Rejected::NoHandover { job_id });
    };
    handover.replacement = Some(replacement);
    handover.reserved_at_unix_ms = now;
    let leaving = handover.leaving;
    job.updated_at_unix_ms = now;
    push_event(job, now, "handover", format!("{replacement} will replace {leaving}; training on while it prepares"));
    Ok(Applied::ReplacementReserved { job_id, replacement })
}

/// A free worker noticed (not before) while a waiting job's last gang had it: it holds that
/// gang's state in memory, so when its notice leaves time for a handover the job's next gang may
/// take it ([`Worker::may_rejoin`]) and it hands over from there, its state reaching the new
/// members over the data port instead of through the store. Not for a command job: its state
/// lives in its program, which restarts from the store at every new gang (a rejoin would only
/// add a restart). Of several waiting jobs whose last gang had it, the one whose gang it was in
/// last (that gang started last): it holds that one's state; none when it holds another job's
/// state since, or nothing ([`Worker::may_hold_state_of`]).
fn hold_for_waiting_job(state: &mut State, worker_id: WorkerId, kind: &str, now: u64) {
    let Some(held) = state.workers.get(&worker_id) else { return };
    let waiting = state
        .jobs
        .values()
        .filter(|j| j.state == JobState::Pending && j.spec.command().is_none() && j.ended_gang.contains(&worker_id))
        .filter(|j| held.may_hold_state_of(j.id))
        .max_by_key(|j| j.generation_started_at_unix_ms);
    let Some(job_id) = waiting.map(|j| j.id) else { return };
    let Some(worker) = state.workers.get_mut(&worker_id) else { return };
    // Too little time left for a handover (or no time named): it leaves.
    let Some(taken_at) = worker.taken_after_handover_lead(now) else { return };
    worker.holding_for = Some(job_id);
    let taken = crate::text::rfc3339_utc(taken_at);
    if let Some(job) = state.jobs.get_mut(&job_id) {
        job.updated_at_unix_ms = now;
        let message = format!(
            "{worker_id} got a {kind} notice while the job waits (instance taken at {taken}); it holds the job's \
             state, so the next gang may take it and it hands over to a replacement from there"
        );
        push_event(job, now, "preemption_notice", message);
    }
}

/// A reserved replacement that can no longer take the place (lost, or noticed itself while it
/// prepared) is given up while its gang still trains: the handover waits for another, a free
/// worker at once if one fits, else one the autoscaler or the local provider brings, until the
/// handover's own fallback time. (Once the gang stops for the handover, a replacement gone
/// leaves the job to wait as after any stop; see `generation_ended`.)
fn give_up_replacement(state: &mut State, worker: WorkerId, why: &str, now: u64) {
    let Some(job_id) = reserving_job(state, worker).map(|j| j.id) else { return };
    let Some(job) = state.jobs.get_mut(&job_id) else { return }; // running: reserving_job reads those
    if job.checkpoint_requested.is_some() {
        return;
    }
    let Some(handover) = job.handovers.iter_mut().find(|h| h.replacement == Some(worker)) else { return };
    handover.replacement = None;
    handover.reserved_at_unix_ms = 0;
    handover.live_since_unix_ms = 0;
    let leaving = handover.leaving;
    job.updated_at_unix_ms = now;
    push_event(
        job,
        now,
        "handover",
        format!("{worker}, reserved to replace {leaving}, {why}; seeking another replacement"),
    );
    let generation = job.generation;
    while let Some(replacement) = pick_replacement(state, job_id, now) {
        if reserve_replacement(state, job_id, generation, replacement, now).is_err() {
            break;
        }
    }
}

/// What `worker`'s instance costs an hour (0 for a worker without an instance record, started
/// by hand or by the local provider).
pub fn usd_per_hour(state: &State, worker: WorkerId) -> f64 {
    state.workers.get(&worker).and_then(|w| state.instances.get(&w.info.instance_id)).map_or(0.0, |i| i.usd_per_hour)
}

/// Whether `worker` runs on a spot instance (a worker without an instance record, started by
/// hand or by the local provider, counts as on-demand, as the autoscaler counts it).
pub fn on_spot(state: &State, worker: WorkerId) -> bool {
    state.workers.get(&worker).and_then(|w| state.instances.get(&w.info.instance_id)).is_some_and(|i| i.spot)
}

/// The answer to a worker's interruption: the handover under way for it, if any, says until
/// when it trains on (no deadline: a rebalance recommendation's).
fn interrupted(worker_id: WorkerId, job: Option<JobId>, handover: Option<&Handover>) -> Applied {
    Applied::WorkerInterrupted {
        worker_id,
        job,
        handover_until: handover.and_then(Handover::deadline_unix_ms),
        advisory: handover.is_some_and(|h| h.advisory),
    }
}

/// Sets [`Worker::held_state`] of those of `gang` whose held state passes `which`.
fn set_held_state(state: &mut State, gang: &[WorkerId], which: impl Fn(HeldState) -> bool, to: HeldState) {
    for id in gang {
        if let Some(worker) = state.workers.get_mut(id).filter(|w| which(w.held_state)) {
            worker.held_state = to;
        }
    }
}

/// The ranks of `job_id`'s gang that just ended keep the state they stopped with (at a stop,
/// the one they stopped at; at a break, the one a survivor holds): a built-in job's alone, a
/// command job's lives in its program.
fn ranks_keep_state(state: &mut State, job_id: JobId, gang: &[WorkerId]) {
    if state.jobs.get(&job_id).is_some_and(|j| j.spec.command().is_none()) {
        set_held_state(state, gang, |_| true, HeldState::Job(job_id));
    }
}

/// Frees the gang's workers that are still assigned.
fn release(state: &mut State, gang: &[WorkerId]) {
    for id in gang {
        if let Some(worker) = state.workers.get_mut(id) {
            worker.job = None;
        }
    }
}

/// A gang member's lease expired while the job ran (nobody reported the break earlier: it went
/// silent, a frozen or cut-off host whose connections never reset). A built-in job with a live
/// survivor keeps running for [`MEMBER_LOST_REPORT_WAIT_MS`]: the survivors are told to stop
/// waiting in their collective and report the state they hold, which ends the generation with
/// no step lost (see `announce_checkpoint`); the leader ends it with [`Command::GangLost`] if
/// none does. Otherwise (a world of 1, a command job, a second loss) it is requeued at once.
fn lose_member(
    state: &mut State,
    job_id: JobId,
    lost: WorkerId,
    last_step_seen: u64,
    silent_since: Option<u64>,
    now: u64,
) {
    let Some(job) = state.jobs.get(&job_id) else { return };
    let survivor =
        job.gang.iter().any(|w| *w != lost && state.workers.get(w).is_some_and(|w| w.lost_at_unix_ms.is_none()));
    let wait = job.state == JobState::Running && survivor && job.spec.command().is_none() && job.member_lost.is_none();
    if !wait {
        return requeue_after_loss(state, job_id, lost, last_step_seen, silent_since, now);
    }
    let job = state.jobs.get_mut(&job_id).expect("the job exists");
    job.member_lost = Some(MemberLost { worker: lost, at_unix_ms: now, last_step_seen });
    job.updated_at_unix_ms = now;
    let heard = silence_words(silent_since, now);
    let message = format!("{lost} was lost (its lease expired{heard}); the survivors report the state they hold");
    push_event_since(job, now, silent_since, "member_lost", message);
}

/// Since when a worker declared lost by its lease had been silent: the leader's record of when
/// it last heard from it in this leadership (0: unknown), if that is before the declaration.
fn silent_since(last_heard_unix_ms: u64, now: u64) -> Option<u64> {
    Some(last_heard_unix_ms).filter(|heard| *heard != 0 && *heard <= now)
}

/// `; last heard N ms before`, or nothing when unknown.
fn silence_words(silent_since: Option<u64>, now: u64) -> String {
    silent_since.map(|heard| format!("; last heard {} ms before", now - heard)).unwrap_or_default()
}

/// The job goes back to Pending, to resume from its newest checkpoint in a new generation.
fn requeue_after_loss(
    state: &mut State,
    job_id: JobId,
    lost: WorkerId,
    last_step_seen: u64,
    silent_since: Option<u64>,
    now: u64,
) {
    let Some(job) = state.jobs.get_mut(&job_id) else { return };
    if job.state != JobState::Running {
        return;
    }
    let lost_steps = last_step_seen.saturating_sub(resume_step(job));
    charge_generation(job, now, last_step_seen, lost_steps);
    job.state = JobState::Pending;
    job.reason = format!("{lost} was lost; waiting for workers to form a new generation");
    job.recoveries = job.recoveries.saturating_add(1);
    job.steps_lost = job.steps_lost.saturating_add(lost_steps);
    job.checkpoint_requested = None;
    job.member_lost = None;
    job.updated_at_unix_ms = now;
    // Nobody reported the step the gang reached: the leader knows the last progress report (up
    // to a second old), so the steps since are trained again too and not counted.
    let counted = format!("at least {lost_steps} step(s) lost (counted to the gang's last progress report)");
    let message = format!("{}{}; {counted}", job.reason, silence_words(silent_since, now));
    push_event_since(job, now, silent_since, "worker_lost", message);
    let gang = job.end_gang();
    release(state, &gang);
    suspect(state, &gang, now);
}

/// The leader asks a running generation to checkpoint at the next step and stop, for
/// `reason`: the handovers still waiting for a replacement are dropped (the gang stops anyway),
/// and the first such request is kept, with its event (`kind`, `message`); a later one for
/// another reason changes nothing.
fn ask_to_stop(job: &mut Job, now: u64, reason: StopReason, kind: &str, message: String) {
    job.drop_awaited_handovers();
    if job.checkpoint_requested.is_none() {
        job.checkpoint_requested = Some(reason);
        push_event(job, now, kind, message);
    }
}

fn running_generation(state: &mut State, job_id: JobId, generation: u64) -> Result<&mut Job, Rejected> {
    let job = state.jobs.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
    if job.state != JobState::Running {
        return Err(Rejected::NotRunning { job_id, state: job.state.name() });
    }
    if job.generation != generation {
        return Err(Rejected::StaleGeneration { job_id, current: job.generation, reported: generation });
    }
    Ok(job)
}

/// Charges the generation that ends now to the job: its gang's price times its run time, and
/// the share of it that paid for `lost_steps` of the steps it made.
fn charge_generation(job: &mut Job, now: u64, step_reached: u64, lost_steps: u64) {
    let cost = job.gang_usd_per_hour * now.saturating_sub(job.generation_started_at_unix_ms) as f64 / 3_600_000.0;
    let made = step_reached.saturating_sub(job.generation_start_step);
    job.cost_usd += cost;
    if made > 0 {
        job.lost_work_usd += cost * (lost_steps.min(made) as f64 / made as f64);
    }
    job.gang_usd_per_hour = 0.0;
}

/// Appends a checkpoint record (bounded), which is progress: an older announced one still not
/// written is given up (retention removes whatever of it reached the store), then the newest
/// usable one is resumed from.
fn push_checkpoint(job: &mut Job, record: CheckpointRecord, now: u64) {
    job.step = job.step.max(record.step);
    if record.step > job.failure_step {
        job.failures = 0; // progress since the last failure
    }
    job.updated_at_unix_ms = now;
    for older in job.checkpoints.iter_mut().filter(|c| c.pending && c.step < record.step) {
        older.deleting = true;
    }
    if job.checkpoints.len() >= CHECKPOINTS_RECORDED_MAX {
        // Retention should have removed old ones long ago; never grow without bound.
        job.checkpoints.remove(0);
    }
    job.checkpoints.push(record);
    refresh_latest(job);
}

/// Records the checkpoint a generation's orderly stop announced (its writer, the reporter,
/// still saves it) as pending, so that the next generation resumes from the stop step at once.
/// A broken generation's survivor announces the state it holds the same way (the step it
/// reached), so that the break loses no step.
/// An announcement that does not describe this stop (another step or generation, not newer
/// than the newest record) is ignored: the stop is then recorded like one without it.
fn announce_checkpoint(
    job: &mut Job,
    record: CheckpointRecord,
    reporter: Option<WorkerId>,
    generation: u64,
    step: u64,
    now: u64,
) {
    let fits = record.step == step
        && record.generation == generation
        && !record.deleting
        && step > resume_step(job)
        && !job.checkpoints.iter().any(|c| c.uri == record.uri);
    if !fits {
        return;
    }
    push_checkpoint(job, CheckpointRecord { pending: true, writer: reporter, ..record }, now);
}

/// The step a new generation resumes from.
fn resume_step(job: &Job) -> u64 {
    job.latest_checkpoint.as_ref().map_or(0, |c| c.step)
}

fn refresh_latest(job: &mut Job) {
    job.latest_checkpoint = job.checkpoints.iter().rev().find(|c| !c.deleting).cloned();
}

fn generation_ended(
    state: &mut State,
    job_id: JobId,
    generation: u64,
    end: GenerationEnd,
    step: u64,
    reporter: Option<WorkerId>,
    now: u64,
) -> Result<Applied, Rejected> {
    let job = running_generation(state, job_id, generation)?;
    let handovers = std::mem::take(&mut job.handovers);
    job.member_lost = None;
    // A gang that stops on its own during a handover (the noticed member's agent stops at the
    // fallback time when no order came first) stops for that notice.
    let requested = job.checkpoint_requested.take().or((!handovers.is_empty()).then_some(StopReason::Preemption));
    let lost_steps = match &end {
        GenerationEnd::Checkpointed | GenerationEnd::PeerLost { .. } => step.saturating_sub(resume_step(job)),
        _ => 0,
    };
    charge_generation(job, now, step, lost_steps);
    match &end {
        // Over budget, however the generation ended: stop, keeping the checkpoints.
        _ if requested == Some(StopReason::Budget) => {
            let budget = job.spec.capacity.budget_usd.unwrap_or(0.0);
            job.state = JobState::Failed;
            job.reason = format!(
                "budget spent: {:.2} USD of capacity.budget_usd = {budget:.2}; stopped at the checkpoint of step {}",
                job.cost_usd,
                resume_step(job)
            );
            job.updated_at_unix_ms = now;
            push_event(job, now, "budget", job.reason.clone());
            let gang = job.end_gang();
            release(state, &gang);
            ranks_keep_state(state, job_id, &gang);
            return Ok(Applied::GenerationEnded { job_id, state: JobState::Failed });
        }
        GenerationEnd::Checkpointed => {
            let lost = step.saturating_sub(resume_step(job));
            job.steps_lost = job.steps_lost.saturating_add(lost);
            if matches!(requested, Some(StopReason::Preemption | StopReason::Handover)) {
                job.preemptions = job.preemptions.saturating_add(1);
            }
            let why = requested.map_or("stop", StopReason::name);
            push_event(job, now, "checkpointed", JobEvent::checkpointed_message(generation, why, step, lost));
            let workers = if job.on_demand_only { "on-demand workers" } else { "workers" };
            job.reason = format!("{why}: waiting for {workers} to resume from step {}", resume_step(job));
        }
        GenerationEnd::PeerLost { reason, .. } => {
            let lost = step.saturating_sub(resume_step(job));
            job.steps_lost = job.steps_lost.saturating_add(lost);
            job.recoveries = job.recoveries.saturating_add(1);
            // A survivor announced the state it holds (see `announce_checkpoint`).
            let held = job
                .latest_checkpoint
                .as_ref()
                .is_some_and(|c| c.pending && c.step == step && c.generation == generation);
            let kept = if held { " (the survivors hold its state)" } else { "" };
            let never_trained = step == job.generation_start_step;
            let message = JobEvent::peer_lost_message(generation, step, never_trained, kept, lost, reason);
            push_event(job, now, "peer_lost", bounded(message));
            job.reason = format!("a worker was lost; resuming from step {}", resume_step(job));
        }
        GenerationEnd::CheckpointUnusable { step: bad, reason } => {
            for record in job.checkpoints.iter_mut().filter(|c| c.step == *bad) {
                record.deleting = true; // never resumed from again; retention removes its objects
            }
            refresh_latest(job);
            // The steps since the fallback are trained again (an announced checkpoint whose
            // writer died before writing it counted none lost when the gang regrouped on it).
            let lost = bad.saturating_sub(resume_step(job));
            job.steps_lost = job.steps_lost.saturating_add(lost);
            let message = format!(
                "checkpoint of step {bad} is unusable ({reason}); falling back to {}; {lost} step(s) lost",
                job.latest_checkpoint.as_ref().map_or("a fresh start".to_string(), |c| format!("step {}", c.step))
            );
            push_event(job, now, "checkpoint_corrupt", bounded(message));
            job.reason = format!("resuming from step {}", resume_step(job));
        }
        GenerationEnd::Error { reason } => {
            if job.step > job.failure_step {
                job.failures = 0;
            }
            job.failures = job.failures.saturating_add(1);
            job.failure_step = job.step;
            let limit = job.spec.capacity.max_failures;
            push_event(
                job,
                now,
                "failure",
                bounded(format!("generation {generation} failed ({} of {limit}): {reason}", job.failures)),
            );
            if job.failures >= limit {
                job.state = JobState::Failed;
                job.reason = bounded(format!(
                    "failed {} time(s) without progress (capacity.max_failures = {limit}); last: {reason}",
                    job.failures
                ));
                job.updated_at_unix_ms = now;
                let gang = job.end_gang();
                release(state, &gang);
                return Ok(Applied::GenerationEnded { job_id, state: JobState::Failed });
            }
            job.reason = bounded(format!("retrying after a failure: {reason}"));
        }
        GenerationEnd::StoreUnavailable { reason } => {
            let never_trained = step == job.generation_start_step;
            wait_for_store(job, (generation, step, never_trained), reporter, reason, now);
        }
    }
    job.state = JobState::Pending;
    job.updated_at_unix_ms = now;
    let gang = job.end_gang();
    release(state, &gang);
    ranks_keep_state(state, job_id, &gang);
    if matches!(end, GenerationEnd::PeerLost { .. }) {
        suspect(state, &gang, now);
    }
    // A handover: the next generation forms at once, each replacement in its leaving member's
    // rank. If it cannot (a replacement is gone, another member was noticed meanwhile), the job
    // waits like after any stop.
    let replaced: Option<Vec<(&Handover, WorkerId)>> =
        handovers.iter().map(|h| h.replacement.map(|r| (h, r))).collect();
    if let (Some(StopReason::Handover), GenerationEnd::Checkpointed, Some(replaced)) = (requested, &end, replaced)
        && !replaced.is_empty()
    {
        let workers: Vec<WorkerId> = gang
            .iter()
            .map(|w| replaced.iter().find(|(h, _)| h.leaving == *w).map_or(*w, |(_, replacement)| *replacement))
            .collect();
        if assign_gang(state, job_id, workers, now).is_ok() {
            let job = state.jobs.get_mut(&job_id).expect("the job was just assigned");
            for (h, replacement) in replaced {
                let since_notice_ms = now.saturating_sub(h.noticed_at_unix_ms);
                let message = JobEvent::handed_over_message(replacement, h.leaving, step, since_notice_ms);
                push_event(job, now, "handover", message);
            }
            return Ok(Applied::GenerationEnded { job_id, state: JobState::Running });
        }
    }
    Ok(Applied::GenerationEnded { job_id, state: JobState::Pending })
}

/// A generation could not go on because the store was out: the job waits ([`store_wait_ms`],
/// doubling with each try in a row without progress) and is tried again, for as long as the
/// outage lasts; `capacity.max_failures` is not touched. One event says it, updated in place
/// with each try that never trained (with the gang events between tries), so that a long
/// outage does not push the job's history out of its events.
///
/// `ended`: the generation, the step it stopped at, and whether it never trained.
fn wait_for_store(job: &mut Job, ended: (u64, u64, bool), reporter: Option<WorkerId>, reason: &str, now: u64) {
    let (generation, step, never_trained) = ended;
    let wait = match job.store_wait.take() {
        Some(wait) if job.step <= wait.step => StoreWait { tries: wait.tries.saturating_add(1), ..wait },
        _ => StoreWait { since_unix_ms: now, tries: 1, step: job.step, until_unix_ms: 0 },
    };
    let wait_ms = store_wait_ms(wait.tries);
    let out_s = now.saturating_sub(wait.since_unix_ms) / 1000;
    let who = reporter.map_or(String::new(), |w| format!(" ({w})"));
    let tries = (wait.tries, out_s, wait_ms / 1000);
    let message = JobEvent::store_unavailable_message(generation, step, never_trained, &who, tries, reason);
    // Only tries that never trained are folded (the metrics time a stall through them: see
    // `JobEvent::ended_untrained`).
    if let Some(last) = job.events.iter().rposition(|e| e.kind == "store_unavailable")
        && never_trained
        && job.events[last].ended_untrained()
        && job.events[last + 1..].iter().all(|e| e.kind == "gang")
    {
        job.events.truncate(last);
    }
    push_event(job, now, "store_unavailable", bounded(message));
    job.reason = bounded(format!(
        "waiting for the store: out for {out_s} s ({} tries); next try in {} s; last: {reason}",
        wait.tries,
        wait_ms / 1000
    ));
    job.store_wait = Some(StoreWait { until_unix_ms: now.saturating_add(wait_ms), ..wait });
}

/// The registered weights a submitted job starts from (`train.init_from`), resolved now: (their
/// URI, the event that names the version). Refused when the reference names no version, or one
/// without exported weights or of another architecture.
fn initial_weights(state: &State, spec: &crate::spec::JobSpec) -> Result<Option<(String, String)>, Rejected> {
    let Some(reference) = spec.train.init_from.as_deref().filter(|_| spec.run.is_none()) else {
        return Ok(None);
    };
    let bad = |reason: String| Rejected::BadInit { reference: reference.to_string(), reason };
    let (model, version) = state.resolve_model(reference).map_err(|e| bad(e.to_string()))?;
    let named = format!("model {} version {}", model.name, version.version);
    if version.artifact_uri.is_empty() || version.shape.is_none() {
        return Err(bad(format!("{named} has no exported weights (a command job's model); start from a built-in one")));
    }
    if version.spec.model != spec.model {
        let architecture = |m: &Option<crate::spec::ModelSpec>| {
            m.as_ref().map_or_else(|| "no built-in model".to_string(), |m| format!("`{m}`"))
        };
        return Err(bad(format!(
            "{named} is {}; this job's model is {}: its weights fit only the same architecture",
            architecture(&version.spec.model),
            architecture(&spec.model)
        )));
    }
    let message = format!("starts from the weights of {named} ({})", version.artifact_uri);
    Ok(Some((version.artifact_uri.clone(), message)))
}

/// [`Command::ResumeJob`]: a Failed or Cancelled training job waits for workers again, its
/// next generation resuming from its newest checkpoint (every recorded one is kept after the
/// job ends: retention keeps the newest), with its failures counted from 0.
fn resume_job(
    state: &mut State,
    job_id: JobId,
    spec: Option<crate::spec::JobSpec>,
    now: u64,
) -> Result<Applied, Rejected> {
    if let Some(job) = state.inferences.get(&job_id) {
        let why = "an inference job is not resumed (`flotilla infer` runs it again)";
        return Err(Rejected::NotResumable { job_id, state: job.state.name(), why });
    }
    let job = state.jobs.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
    let not = |why| Rejected::NotResumable { job_id, state: job.state.name(), why };
    match job.state {
        JobState::Failed | JobState::Cancelled => {}
        // Trained further: a longer length of the same kind (a job's length in epochs is not
        // known here in steps).
        JobState::Succeeded if job.spec.run.is_some() => {
            return Err(not(
                "a command job that succeeded is not resumed (its program sets its length): submit it again",
            ));
        }
        JobState::Succeeded if job.spec.train.decays_over_length() => {
            return Err(not(
                "its learning rate decayed over its length (train.lr_schedule), so it does not train further: \
                 fine-tune its registered model in a new job (train.init_from)",
            ));
        }
        JobState::Succeeded => {
            use crate::spec::TrainLength::{Epochs, Steps};
            let longer = match (job.spec.train.length, spec.as_ref().map(|s| s.train.length)) {
                (Epochs(before), Some(Epochs(after))) => after > before,
                (Steps(_), Some(Steps(after))) => after > job.step,
                _ => false,
            };
            if !longer {
                return Err(not(
                    "it trained its whole length: a resume with a longer one trains it further from its final \
                     checkpoint (--set train.epochs=N with more epochs, or train.steps=N past its final step, as it \
                     was given) and registers its model as a new version",
                ));
            }
        }
        _ => return Err(not("only a Failed, Cancelled or Succeeded job can be resumed")),
    }
    let from_step = resume_step(job);
    let spec = spec.unwrap_or_else(|| job.spec.clone());
    let bad = |reason: String| Rejected::BadResume { job_id, reason };
    let changed = job.spec.unresumable_changes(&spec);
    if !changed.is_empty() {
        return Err(bad(format!(
            "{} may not change (its checkpoint holds what they made); a resume may change {}",
            changed.join(", "),
            crate::spec::RESUMABLE_FIELDS
        )));
    }
    if spec.train.length != job.spec.train.length && spec.train.decays_over_length() {
        return Err(bad(format!(
            "train.lr_schedule = \"{}\" decays over the job's length: a new length would change the learning \
             rate of the steps it trained, so a resume keeps it; to train it further, fine-tune its registered \
             model in a new job (train.init_from)",
            spec.train.lr_schedule.name()
        )));
    }
    if let crate::spec::TrainLength::Steps(steps) = spec.train.length
        && spec.run.is_none()
        && steps <= from_step
    {
        return Err(bad(format!(
            "train.steps = {steps} is not past step {from_step}, where it resumes; raise train.steps \
             (--set train.steps=N)"
        )));
    }
    if let Some(budget) = spec.capacity.budget_usd
        && job.cost_usd >= budget
    {
        return Err(bad(format!(
            "capacity.budget_usd = {budget:.2} is spent ({:.2} USD charged); raise it \
             (--set capacity.budget_usd=N)",
            job.cost_usd
        )));
    }
    let was = match job.reason.as_str() {
        "" => job.state.name().to_string(),
        reason => format!("{} ({reason})", job.state.name()),
    };
    if job.state == JobState::Succeeded {
        job.metrics = None; // its end's, registered with its model; the next end reports its own
    }
    job.spec = spec;
    job.state = JobState::Pending;
    job.failures = 0;
    job.failure_step = job.step;
    job.checkpoint_requested = None;
    job.member_lost = None;
    job.store_wait = None;
    job.updated_at_unix_ms = now;
    let from = if from_step > 0 { format!("step {from_step}") } else { "the start".to_string() };
    job.reason = format!("resumed: waiting for workers to resume from {from}");
    push_event(job, now, "resumed_by_user", bounded(format!("resumed from {from}; it was {was}")));
    Ok(Applied::JobResumed { job_id, from_step })
}

/// A batch command's `len` entries, refused beyond `max` (the leader splits larger batches).
fn at_most(len: usize, max: usize, what: &str) -> Result<(), Rejected> {
    if len > max {
        return Err(Rejected::BadReport(format!("{len} {what} in one command; at most {max}")));
    }
    Ok(())
}

/// Longest reason for a live handover's failure kept in the job's events, in bytes.
const LIVE_FAILURE_LEN_MAX: usize = 256;

/// The gang checkpoints at the next step and hands its ranks over to their reserved
/// replacements at the stop; `why` (may be empty) says why a live handover fell back to it.
fn hand_over_at_a_stop(job: &mut Job, now: u64, why: &str) -> Result<Applied, Rejected> {
    let Some(replacement) = job.reserved_replacements().next() else {
        return Err(Rejected::NoHandover { job_id: job.id });
    };
    job.updated_at_unix_ms = now;
    job.handovers.iter_mut().for_each(|h| h.live_since_unix_ms = 0);
    job.checkpoint_requested = Some(StopReason::Handover);
    let message = format!("{}; checkpointing at the next step{why}", ready_to_replace(job));
    push_event(job, now, "handover", message);
    Ok(Applied::HandoverStarted { job_id: job.id, replacement, live: false })
}

/// "worker-5 is ready to replace worker-2, ...": the job's handovers with a reserved replacement.
fn ready_to_replace(job: &Job) -> String {
    let who: Vec<String> = job
        .handovers
        .iter()
        .filter_map(|h| h.replacement.map(|r| format!("{r} is ready to replace {}", h.leaving)))
        .collect();
    who.join(", ")
}

/// `text` cut to a reason's limit, its start and its end kept ([`crate::text::clip_middle`]).
pub(super) fn bounded(text: String) -> String {
    crate::text::clip_middle(text, REASON_LEN_MAX)
}

/// What a job's events say of an instance bought for it that never registered a worker.
fn no_show_message(instance: &InstanceRecord, now: u64) -> String {
    let minutes = now.saturating_sub(instance.launched_at_unix_ms) / 60_000;
    format!(
        "instance {} ({} {} in {}) registered no worker in {minutes} min since its launch: terminated, and its pool \
         backs off. Check that the image starts `flotilla worker` at boot (the instance's console output or \
         cloud-init log), and that it reaches the coordinators with the cluster's join token",
        instance.id,
        instance.instance_type,
        if instance.spot { "spot" } else { "on-demand" },
        instance.zone,
    )
}

fn push_event(job: &mut Job, at_unix_ms: u64, kind: &str, message: String) {
    push_event_since(job, at_unix_ms, None, kind, message);
}

/// [`push_event`] for what began before it was recorded (see [`JobEvent::since_unix_ms`]).
fn push_event_since(job: &mut Job, at_unix_ms: u64, since_unix_ms: Option<u64>, kind: &str, message: String) {
    if job.events.len() >= JOB_EVENTS_MAX {
        job.events.remove(0);
    }
    job.events.push(JobEvent { at_unix_ms, kind: kind.to_string(), message, since_unix_ms });
}
