//! The leader's scheduling loop: feeds pending jobs and idle workers to the pure gang
//! scheduler (`flotilla_core::scheduler`) and proposes each placement as `AssignGang`.
//!
//! Inference jobs are served after training: they take the idle workers left once every
//! placeable gang is placed (`JoinInference`), one shard at a time, and give each back when no
//! shard is left for it, or after its shard when a waiting gang needs it (`YieldInference`,
//! planned with the priority preemption: inference ranks below every training job), so they
//! backfill and hold a gang's workers for one shard at most.
//!
//! Runs on every node and acts only while this node leads. Placements go through Raft, so a
//! new leader sees exactly which workers are taken; a proposal that loses a race (a worker
//! was lost meanwhile) is rejected by the state machine and retried on the next pass.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use flotilla_core::scheduler::{FreeWorker, PendingJob, Preemptible, RunningJob, grow, schedule_preempting};
use flotilla_core::state::{
    Command, HeldState, Job, JobState, PENDING_REASONS_PER_COMMAND_MAX, State, StopReason,
    WORKERS_HEARD_PER_COMMAND_MAX, pick_replacement,
};
use flotilla_core::{JobId, WorkerId};

use crate::raft::node::NodeHandle;

/// A pass runs at the latest this long after the previous one (picks up anything missed).
const PASS_EVERY: Duration = Duration::from_millis(300);
/// ... and at the earliest this long after it, when the state changes (a submission, a worker
/// freed): fast reaction without a pass per committed write under load.
const PASS_MIN_GAP: Duration = Duration::from_millis(20);
/// ... or this many times the last pass's own work (reading the state, planning), whichever
/// is longer: a big queue (thousands of pending jobs) keeps the scheduler under ~5% of a core
/// and of the Raft loop, whose thread runs the read (issue 19: the p99 of clients' writes).
const PASS_GAP_PER_WORK: u32 = 20;

/// Pending jobs' reasons (what `flotilla status` shows while a job waits) are recorded at most
/// this often: they are informational, and recording them at every pass put a Raft entry (an
/// fsync on every node) beside the clients' writes 50 times a second under load (issue 19: the
/// coordinator's p99 at 1 client was 1.6x etcd's). Placements are not delayed.
const REASONS_EVERY: Duration = Duration::from_secs(1);

/// An elastic generation runs at least this long before it is regrown.
const GROW_AFTER: Duration = Duration::from_secs(3);

/// The running jobs (from the state's index), listed once per scheduler pass: the handovers
/// under way, the members lost silently, the elastic growth and the workers promised to
/// handovers all come from them.
fn running_jobs(state: &State) -> Vec<&Job> {
    state.running_jobs().collect()
}

/// Of `running`, the elastic jobs below their `max`, not already asked to checkpoint.
fn growable(state: &State, running: &[&Job]) -> Vec<RunningJob> {
    running
        .iter()
        .filter(|j| j.checkpoint_requested.is_none())
        .filter(|j| (j.gang.len() as u32) < j.spec.workers.max)
        .filter_map(|j| {
            let first = state.workers.get(j.gang.first()?)?;
            Some(RunningJob {
                id: j.id,
                generation: j.generation,
                priority: j.spec.priority,
                submitted_index: j.submitted_index,
                world: j.gang.len() as u32,
                max_workers: j.spec.workers.max,
                gpus_per_worker: j.spec.workers.gpus,
                pool: (first.info.instance_type.clone(), first.info.zone.clone()),
                on_demand_only: j.needs_on_demand(),
                max_usd_per_hour: j.spec.capacity.max_price_usd_per_hour,
            })
        })
        .collect()
}

/// The scheduler's input, read from the replicated state; `heard_at` is the leader's clock at
/// each worker's last heartbeat (in memory, not replicated). A worker whose gang broke is
/// left out until heard from since the break: it may be dead with a lease not yet expired;
/// one its peers could not reach, until its hold ends (`now_ms`: the leader's clock).
pub fn scheduler_input(
    state: &State,
    heard_at: impl Fn(WorkerId) -> u64,
    now_ms: u64,
) -> (Vec<PendingJob>, Vec<FreeWorker>) {
    (pending_jobs(state, now_ms), free_workers(state, &running_jobs(state), heard_at, now_ms))
}

/// Suspect workers (their gang broke) the leader heard from since, with the suspicion's time:
/// alive, so no longer suspect ([`Command::WorkersHeard`]); at most one command's worth.
fn suspects_heard(state: &State, heard_at: impl Fn(WorkerId) -> u64) -> Vec<(WorkerId, u64)> {
    state
        .workers
        .values()
        .filter(|w| w.lost_at_unix_ms.is_none())
        .filter_map(|w| w.suspect_since_unix_ms.filter(|since| heard_at(w.id) >= *since).map(|since| (w.id, since)))
        .take(WORKERS_HEARD_PER_COMMAND_MAX)
        .collect()
}

/// Free workers whose heartbeat says they hold a running job's state (`held`: pushed to them as
/// its warm spares) where the log does not say so yet ([`Command::SparesHolding`]); at most one
/// command's worth. Nothing is read without a running job that keeps spares.
fn spares_holding(state: &State, running: &[&Job], held: impl Fn(WorkerId) -> Option<JobId>) -> Vec<(WorkerId, JobId)> {
    let spared: BTreeSet<JobId> =
        running.iter().filter(|j| j.spec.capacity.spares > 0 && j.spec.command().is_none()).map(|j| j.id).collect();
    if spared.is_empty() {
        return Vec::new();
    }
    state
        .workers
        .values()
        .filter(|w| w.lost_at_unix_ms.is_none() && w.job.is_none())
        .filter_map(|w| {
            held(w.id).filter(|job| spared.contains(job) && w.held_state != HeldState::Job(*job)).map(|job| (w.id, job))
        })
        .take(WORKERS_HEARD_PER_COMMAND_MAX)
        .collect()
}

/// The jobs waiting for a gang (a scan of every job held).
fn waiting_jobs(state: &State) -> impl Iterator<Item = &Job> {
    state.jobs.values().filter(|j| j.state == JobState::Pending)
}

/// The waiting jobs a gang may be placed for at `now_ms`: not those that wait out their
/// store's outage ([`Job::waits_for_store`]; their reason says so, and the scheduler keeps it).
fn placeable_jobs(state: &State, now_ms: u64) -> impl Iterator<Item = &Job> {
    waiting_jobs(state).filter(move |j| !j.waits_for_store(now_ms))
}

/// The jobs waiting for a gang, as the planner takes them.
fn pending_jobs(state: &State, now_ms: u64) -> Vec<PendingJob> {
    let spares = spare_holders(state);
    placeable_jobs(state, now_ms).map(|j| pending_job(state, j, &spares)).collect()
}

/// [`pending_jobs`] with the reasons they hold, which the pass may rewrite (those of jobs left
/// out, such as one waiting for its store, stay as they are).
fn pending_jobs_with_reasons(state: &State, now_ms: u64) -> (Vec<PendingJob>, BTreeMap<JobId, String>) {
    let spares = spare_holders(state);
    placeable_jobs(state, now_ms).map(|j| (pending_job(state, j, &spares), (j.id, j.reason.clone()))).unzip()
}

/// Free workers outside a job's last gang recorded holding its state (its warm spares while it
/// ran, [`Command::SparesHolding`]), by job: one scan of the workers for every waiting job.
fn spare_holders(state: &State) -> BTreeMap<JobId, Vec<WorkerId>> {
    let mut holders: BTreeMap<JobId, Vec<WorkerId>> = BTreeMap::new();
    for w in state.workers.values().filter(|w| w.lost_at_unix_ms.is_none() && w.job.is_none()) {
        if let HeldState::Job(job) = w.held_state {
            holders.entry(job).or_default().push(w.id);
        }
    }
    holders
}

/// A waiting job as the planner takes it; its holders are the members of its last gang that
/// may still hold the state it ended with ([`flotilla_core::state::Worker::may_hold_state_of`]:
/// none that holds another job's since, or nothing), then its spares that hold its pushed
/// checkpoints (`spares`: [`spare_holders`]). A command job's state lives in its program,
/// restarted from the store: its last gang is only a preference.
fn pending_job(state: &State, j: &Job, spares: &BTreeMap<JobId, Vec<WorkerId>>) -> PendingJob {
    let builtin = j.spec.command().is_none();
    let holds = |w: &WorkerId| !builtin || state.workers.get(w).is_some_and(|w| w.may_hold_state_of(j.id));
    let mut holders: Vec<WorkerId> = j.ended_gang.iter().copied().filter(holds).collect();
    for spare in spares.get(&j.id).into_iter().flatten() {
        if builtin && !holders.contains(spare) {
            holders.push(*spare);
        }
    }
    PendingJob {
        id: j.id,
        priority: j.spec.priority,
        submitted_index: j.submitted_index,
        min_workers: j.spec.workers.min,
        max_workers: j.spec.workers.max,
        gpus_per_worker: j.spec.workers.gpus,
        on_demand_only: j.needs_on_demand(),
        mixed: j.spec.capacity.mixed_types,
        instance_types: j.spec.capacity.instance_types.clone(),
        max_usd_per_hour: j.spec.capacity.max_price_usd_per_hour,
        holders,
    }
}

/// Of `running`, the jobs of priority below `highest_waiting` (the highest a waiting job has),
/// which a waiting job may stop, with their members that would come free. None when every job
/// keeps one priority (the common case): no worker is read.
fn preemptible(state: &State, running: &[&Job], highest_waiting: i32) -> Vec<Preemptible> {
    running
        .iter()
        .filter(|j| j.spec.priority < highest_waiting)
        .map(|j| Preemptible {
            id: j.id,
            generation: j.generation,
            priority: j.spec.priority,
            submitted_index: j.submitted_index,
            stopping: j.checkpoint_requested.is_some(),
            members: coming_free(state, &j.gang),
            inference: false,
        })
        .collect()
}

/// The running inference jobs, which give their workers back to any waiting training gang
/// that needs them (priority `i32::MIN`): a job whose every member already yields is counted
/// without a new order.
fn yielding_inference(state: &State) -> Vec<Preemptible> {
    state
        .inferences
        .values()
        .filter(|j| j.state == JobState::Running && !j.members.is_empty())
        .map(|j| Preemptible {
            id: j.id,
            generation: 0,
            priority: i32::MIN,
            submitted_index: j.submitted_index,
            stopping: j.members.iter().all(|w| j.yielding.contains(w)),
            members: coming_free(state, &j.members),
            inference: true,
        })
        .collect()
}

/// Of `workers` (a job's), those that come free when it stops: not those leaving the cluster
/// (lost, or noticed and draining).
fn coming_free(state: &State, workers: &[WorkerId]) -> Vec<FreeWorker> {
    workers
        .iter()
        .filter_map(|id| state.workers.get(id))
        .filter(|w| w.lost_at_unix_ms.is_none() && !w.draining)
        .map(|w| as_free(state, w))
        .collect()
}

/// A worker as the scheduler sees it.
fn as_free(state: &State, w: &flotilla_core::state::Worker) -> FreeWorker {
    FreeWorker {
        id: w.id,
        gpus: w.info.gpus,
        instance_type: w.info.instance_type.clone(),
        zone: w.info.zone.clone(),
        spot: flotilla_core::state::on_spot(state, w.id),
        usd_per_hour: flotilla_core::state::usd_per_hour(state, w.id),
        only_for: None,
        spare: false,
    }
}

/// The workers free for a gang (see [`scheduler_input`]); `running`: the running jobs. Also
/// the noticed holders of waiting jobs' state that may rejoin their job's next gang
/// ([`State::rejoins`]), each free for that job alone. (Where no replacement can come, no
/// autoscaler, no local replacer and no free worker, the handover such a gang starts with
/// stops it at its first step: the state has then reached the other members' memory.)
fn free_workers(state: &State, running: &[&Job], heard_at: impl Fn(WorkerId) -> u64, now_ms: u64) -> Vec<FreeWorker> {
    // Workers promised to a handover (only a running job has one) are not free for anybody else.
    let promised: std::collections::BTreeSet<WorkerId> =
        running.iter().flat_map(|j| j.reserved_replacements()).collect();
    let spares: std::collections::BTreeSet<WorkerId> =
        flotilla_core::state::warm_spares(state).into_iter().map(|(w, _)| w).collect();
    state
        .workers
        .values()
        .filter(|w| w.lost_at_unix_ms.is_none() && w.job.is_none())
        .filter(|w| !promised.contains(&w.id))
        .filter(|w| w.suspect_since_unix_ms.is_none_or(|since| heard_at(w.id) >= since))
        .filter(|w| !w.held_unreachable(now_ms))
        .filter_map(|w| {
            // A draining worker is free only for the job whose next gang it may rejoin.
            let only_for = if w.draining { Some(state.rejoins(w, now_ms)?) } else { None };
            Some(FreeWorker { only_for, spare: spares.contains(&w.id), ..as_free(state, w) })
        })
        .collect()
}

/// Longest a handover waits for its reserved replacement to report the job prepared (data
/// loaded, GPU kernels compiled) before it goes ahead anyway: a replacement that never reports
/// (stuck, or an older agent) costs the gang nothing but this wait, spent training.
pub const PREPARE_WAIT_MAX_MS: u64 = 30_000;
/// Longest a live handover may take from its start to the swap (the replacement takes the
/// state, catches up and dials the gang) before the leader falls back to the stop-and-regroup
/// handover with the same replacement: a joiner stuck or too slow to keep up costs the gang
/// nothing but this wait, spent training.
pub const LIVE_SWAP_WAIT_MAX_MS: u64 = 30_000;

/// How the leader runs handovers: whether a lone built-in member's handover goes live (the
/// gang never stops; `flotilla coordinator --live-handover`), and whether replacements can
/// come at all (an autoscaler or the local replacer).
#[derive(Debug, Clone, Copy, Default)]
pub struct HandoverPolicy {
    pub replacements_expected: bool,
    pub live: bool,
}

/// What the leader does for handovers under way (issue 25) at `now_ms`:
/// - a job with a noticed member still without a replacement gets the free worker that fits
///   ([`pick_replacement`], one per pass, in notice order); without one by the earliest
///   fallback time of its handovers, or when no replacement can come (`replacements_expected`
///   false: no autoscaler, no local replacer), the generation stops at a checkpoint as after
///   any notice (a rebalance recommendation's handover has no fallback time: alone, it waits);
/// - once every noticed member has a reserved replacement and each reported the job prepared
///   (`prepared(worker)`, from its heartbeats), the gang hands over to all of them
///   ([`Command::HandoverReady`]); a replacement that has not reported by the earliest
///   fallback time or within [`PREPARE_WAIT_MAX_MS`] counts as ready; with `policy.live`, a lone
///   built-in member's handover goes live (the gang trains on until the swap), falling back
///   to the stop at the fallback time, after [`LIVE_SWAP_WAIT_MAX_MS`], or when another member
///   is noticed meanwhile (or at once when a side says it failed, `Command::LiveHandoverFailed`,
///   proposed by the API). (One lost or noticed
///   while it prepares is given up by the state machine, and another sought; one still
///   reserved though gone, in a state an older build wrote, ends the handovers at a
///   checkpoint.)
pub fn handover_commands(
    state: &State,
    now_ms: u64,
    policy: HandoverPolicy,
    prepared: impl Fn(WorkerId) -> Option<JobId>,
) -> Vec<Command> {
    handovers_among(state, &running_jobs(state), now_ms, policy, prepared)
}

/// [`handover_commands`] for the running jobs `running` of `state`.
fn handovers_among(
    state: &State,
    running: &[&Job],
    now_ms: u64,
    policy: HandoverPolicy,
    prepared: impl Fn(WorkerId) -> Option<JobId>,
) -> Vec<Command> {
    let mut out = Vec::new();
    for job in running.iter().filter(|j| j.checkpoint_requested.is_none()) {
        if job.handovers.is_empty() {
            continue;
        }
        // Handovers for rebalance recommendations (advisory) have no fallback time: only
        // notices' do, and with nothing but recommendations the gang never stops to wait.
        let fallback_at_ms = job.handovers.iter().filter_map(flotilla_core::state::Handover::deadline_unix_ms).min();
        let past_fallback = fallback_at_ms.is_some_and(|at| now_ms >= at);
        let (job_id, generation) = (job.id, job.generation);
        let fallback = Command::RequestCheckpoint { job_id, generation, reason: StopReason::Preemption };
        let gone = |r: WorkerId| state.workers.get(&r).is_none_or(|w| w.lost_at_unix_ms.is_some() || w.draining);
        if job.reserved_replacements().any(gone) {
            out.push(fallback);
        } else if job.awaited_handovers().next().is_some() {
            if let Some(replacement) = pick_replacement(state, job_id, now_ms) {
                out.push(Command::HandoverTo { job_id, generation, replacement });
            } else if past_fallback || (!policy.replacements_expected && fallback_at_ms.is_some()) {
                out.push(fallback);
            }
        } else if let Some(live) = job.live_handover() {
            let overdue = now_ms >= live.live_since_unix_ms.saturating_add(LIVE_SWAP_WAIT_MAX_MS);
            if past_fallback || overdue || job.handovers.len() > 1 {
                out.push(Command::HandoverReady { job_id, generation, live: false });
            }
        } else {
            let ready = |h: &flotilla_core::state::Handover| {
                h.replacement.is_some_and(|r| prepared(r) == Some(job_id))
                    || past_fallback
                    || now_ms >= h.reserved_at_unix_ms.saturating_add(PREPARE_WAIT_MAX_MS)
            };
            if job.handovers.iter().all(ready) {
                let live = policy.live && job.may_hand_over_live() && !past_fallback;
                out.push(Command::HandoverReady { job_id, generation, live });
            }
        }
    }
    out
}

/// The leader's fallback for members lost silently ([`flotilla_core::state::Job::member_lost`]):
/// a generation whose survivors did not report within
/// [`flotilla_core::state::MEMBER_LOST_REPORT_WAIT_MS`] ends ([`Command::GangLost`]).
pub fn member_lost_commands(state: &State, now_ms: u64) -> Vec<Command> {
    members_lost_among(&running_jobs(state), now_ms)
}

/// [`member_lost_commands`] for the running jobs `running`.
fn members_lost_among(running: &[&Job], now_ms: u64) -> Vec<Command> {
    running
        .iter()
        .filter(|j| {
            j.member_lost.as_ref().is_some_and(|m| {
                now_ms >= m.at_unix_ms.saturating_add(flotilla_core::state::MEMBER_LOST_REPORT_WAIT_MS)
            })
        })
        .map(|j| Command::GangLost { job_id: j.id, generation: j.generation })
        .collect()
}

pub async fn schedule_loop(
    mut node: NodeHandle,
    leases: std::sync::Arc<crate::leases::Leases>,
    policy: HandoverPolicy,
    priority_preemption: bool,
    capacity_notes: crate::autoscaling::CapacityNotes,
) {
    let mut running_since: HashMap<JobId, (u64, Instant)> = HashMap::new();
    let mut reasons_at: Option<Instant> = None;
    let mut gap = PASS_MIN_GAP;
    loop {
        tokio::select! {
            _ = tokio::time::timeout(PASS_EVERY, node.changed()) => {}
            _ = leases.wake_scheduler.notified() => {}
        }
        tokio::time::sleep(gap).await;
        if node.status().leader_id != Some(node.id) {
            continue;
        }
        let heard = leases.clone();
        let now_ms = crate::raft::node::now_unix_ms();
        let reasons_due = reasons_at.is_none_or(|at| at.elapsed() >= REASONS_EVERY);
        let Ok((heard_from, holding, handovers, pending, free, words, running, victims, inference, mut work)) = node
            .read_local(move |state| {
                let reading = Instant::now();
                let running = running_jobs(state);
                let prepared = |w| heard.prepared_job(w);
                let mut handovers = handovers_among(state, &running, now_ms, policy, prepared);
                handovers.extend(members_lost_among(&running, now_ms));
                let free = free_workers(state, &running, |w| heard.last_heartbeat_unix_ms(w), now_ms);
                let heard_from = suspects_heard(state, |w| heard.last_heartbeat_unix_ms(w));
                let holding = spares_holding(state, &running, |w| heard.held_job(w));
                // Without a free worker nothing can be placed, grown or joined: the queue is
                // read only when its reasons are due (thousands of pending jobs made every
                // pass O(jobs) on the Raft thread under a stream of submissions), and then
                // once for both.
                let (pending, reasons) = if reasons_due {
                    pending_jobs_with_reasons(state, now_ms)
                } else if free.is_empty() {
                    (Vec::new(), BTreeMap::new())
                } else {
                    (pending_jobs(state, now_ms), BTreeMap::new())
                };
                let made_way = if reasons_due { made_way(state) } else { BTreeMap::new() };
                let inference: Vec<InferenceWants> = state
                    .inferences
                    .values()
                    .filter(|j| j.wants_workers() > 0)
                    .map(|j| InferenceWants { job: j.id, workers: j.wants_workers(), excluded: j.timed_out.clone() })
                    .collect();
                // Jobs to stop for a waiting job of higher priority, and inference jobs to give
                // their workers back to a waiting gang: only read with a queue.
                let mut victims = Vec::new();
                if !pending.is_empty() {
                    victims = yielding_inference(state);
                    let highest = pending.iter().map(|p| p.priority).max();
                    if let Some(highest) = highest.filter(|_| priority_preemption) {
                        victims.extend(preemptible(state, &running, highest));
                    }
                }
                let growable = growable(state, &running);
                let words = Words { reasons, made_way };
                (heard_from, holding, handovers, pending, free, words, growable, victims, inference, reading.elapsed())
            })
            .await
        else {
            continue;
        };
        let Words { reasons, made_way } = words;
        // Suspect workers heard from are alive: clear them (they may replace or spare again).
        if !heard_from.is_empty() {
            let _ = node.propose(Command::WorkersHeard { workers: heard_from }).await;
        }
        // Spares that hold their job's pushed state: recorded, so that they stay its spares.
        if !holding.is_empty() {
            let named: Vec<String> = holding.iter().map(|(w, j)| format!("{w}:{j}")).collect();
            match node.propose(Command::SparesHolding { workers: holding }).await {
                Ok(_) => tracing::info!(spares = %named.join(","), "warm spares hold their job's state: recorded"),
                Err(e) => tracing::debug!(error = %e, "spares holding not recorded; next pass retries"),
            }
        }
        // Handovers first: a running job's replacement before any placement.
        if !handovers.is_empty() {
            for command in handovers {
                match node.propose(command).await {
                    Ok(applied) => tracing::info!(?applied, "handover"),
                    Err(e) => tracing::debug!(error = %e, "handover step not recorded; next pass retries"),
                }
            }
            continue; // the free workers changed: read them again
        }
        // Elastic growth, once a generation has run a while (a regroup costs a checkpoint and
        // a rendezvous; never thrash).
        running_since
            .retain(|job, (generation, _)| running.iter().any(|r| r.id == *job && r.generation == *generation));
        for job in &running {
            running_since.entry(job.id).or_insert((job.generation, Instant::now()));
        }
        let settled: Vec<RunningJob> = running
            .into_iter()
            .filter(|j| running_since.get(&j.id).is_some_and(|(_, since)| since.elapsed() >= GROW_AFTER))
            .collect();
        for (job_id, generation) in grow(&settled, &free, !pending.is_empty()) {
            let command = Command::RequestCheckpoint { job_id, generation, reason: StopReason::Grow };
            match node.propose(command).await {
                Ok(_) => tracing::info!(job = %job_id, generation, "free workers: regrouping the elastic job larger"),
                Err(e) => tracing::debug!(job = %job_id, error = %e, "growth not requested"),
            }
        }
        let mut taken = Vec::new();
        // Free workers held for a waiting gang that stops others: not joined to inference.
        let mut held = Vec::new();
        if !pending.is_empty() {
            let planning = Instant::now();
            let mut plan = schedule_preempting(&pending, &free, &victims);
            work += planning.elapsed();
            held = std::mem::take(&mut plan.held);
            for p in &plan.preemptions {
                let command = if p.inference {
                    Command::YieldInference { job_id: p.victim }
                } else {
                    Command::PreemptForPriority { job_id: p.victim, generation: p.generation, for_job: p.for_job }
                };
                match node.propose(command).await {
                    Ok(_) => tracing::info!(job = %p.victim, for_job = %p.for_job, priorities = ?p.priorities,
                        inference = p.inference, "a waiting gang takes the workers of a job it outranks"),
                    Err(e) => {
                        tracing::debug!(job = %p.victim, error = %e, "preemption not recorded; next pass retries")
                    }
                }
            }
            if reasons_due {
                reasons_at = Some(Instant::now());
                let notes = capacity_notes.lock().map(|n| n.clone()).unwrap_or_default();
                let changed: Vec<(JobId, String)> = with_words(plan.waiting, &made_way, &notes)
                    .into_iter()
                    .filter(|(job_id, reason)| reasons.get(job_id) != Some(reason))
                    .collect();
                for batch in changed.chunks(PENDING_REASONS_PER_COMMAND_MAX) {
                    let _ = node.propose(Command::SetPendingReasons { reasons: batch.to_vec() }).await;
                }
            }
            for placement in plan.placements {
                taken.extend(placement.workers.iter().copied());
                let command = Command::AssignGang { job_id: placement.job, workers: placement.workers };
                if let Err(e) = node.propose(command).await {
                    tracing::debug!(job = %placement.job, error = %e, "placement not recorded; next pass retries");
                }
            }
        }
        gap = work.saturating_mul(PASS_GAP_PER_WORK).clamp(PASS_MIN_GAP, PASS_EVERY);
        let left: Vec<WorkerId> = free
            .iter()
            .filter(|w| w.only_for.is_none())
            .map(|w| w.id)
            .filter(|w| !taken.contains(w) && !held.contains(w))
            .collect();
        for (job_id, workers) in inference_joins(&inference, &left) {
            if let Err(e) = node.propose(Command::JoinInference { job_id, workers }).await {
                tracing::debug!(job = %job_id, error = %e, "inference workers not recorded; next pass retries");
            }
        }
    }
}

/// The waiting jobs' words besides the scheduler's: what each stopped for a higher priority
/// made way for, and what the autoscaler says of it (what it buys, or why it cannot).
struct Words {
    /// The reasons as recorded (only what changed is proposed).
    reasons: BTreeMap<JobId, String>,
    /// "made way for job-4 (priority 5), which runs" ([`made_way`]).
    made_way: BTreeMap<JobId, String>,
}

/// "made way for job-4 (priority 5), which runs", for each job stopped for a higher priority
/// whose generation has not re-formed, while the job it stopped for runs (a scan of the
/// waiting jobs; only the events of those that ran are read).
fn made_way(state: &State) -> BTreeMap<JobId, String> {
    waiting_jobs(state)
        .filter(|j| j.generation > 0)
        .filter_map(|j| {
            let for_job = j.stopped_for()?;
            let other = state.jobs.get(&for_job).filter(|o| o.state == JobState::Running)?;
            Some((j.id, format!("made way for {for_job} (priority {}), which runs", other.spec.priority)))
        })
        .collect()
}

/// The scheduler's reasons for waiting jobs with what each made way for before them and the
/// autoscaler's word on each after them: "made way for job-4 (priority 5), which runs; waiting
/// for 2 free worker(s) ...; autoscaler: buying 2 spot instance(s) in g5.xlarge/us-east-1a at
/// 0.400 $/h". Pure.
pub fn with_words(
    waiting: BTreeMap<JobId, String>,
    made_way: &BTreeMap<JobId, String>,
    notes: &BTreeMap<JobId, String>,
) -> BTreeMap<JobId, String> {
    waiting
        .into_iter()
        .map(|(job, reason)| {
            let before = made_way.get(&job).map_or(String::new(), |words| format!("{words}; "));
            let after = notes.get(&job).map_or(String::new(), |note| format!("; autoscaler: {note}"));
            (job, format!("{before}{reason}{after}"))
        })
        .collect()
}

/// An inference job's want of workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceWants {
    pub job: JobId,
    pub workers: usize,
    /// Workers it must not get (their lease timed out on it).
    pub excluded: Vec<WorkerId>,
}

/// Gives idle workers to inference jobs, oldest job first, as many as each still wants.
pub fn inference_joins(wants: &[InferenceWants], idle: &[WorkerId]) -> Vec<(JobId, Vec<WorkerId>)> {
    let mut idle: Vec<WorkerId> = idle.to_vec();
    wants
        .iter()
        .filter_map(|want| {
            let mut workers = Vec::new();
            idle.retain(|w| {
                let take = workers.len() < want.workers && !want.excluded.contains(w);
                if take {
                    workers.push(*w);
                }
                !take
            });
            (!workers.is_empty()).then_some((want.job, workers))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use flotilla_core::state::{Command, Envelope, GenerationEnd};

    use super::*;
    use crate::testing::Log;

    /// Replacements can come; handovers stop the gang.
    const EXPECTED: HandoverPolicy = HandoverPolicy { replacements_expected: true, live: false };

    /// A job stopped for a higher priority says so in its reason while the job it made way
    /// for runs (the scheduler's own reason alone read as if nothing held its workers).
    #[test]
    fn a_job_stopped_for_a_higher_priority_says_what_it_made_way_for_while_that_runs() {
        let mut log = Log::job_of_two(4);
        let (low, high) = (JobId(1), JobId(2));
        log.step(Command::AssignGang { job_id: low, workers: vec![WorkerId(1), WorkerId(2)] });
        let urgent = flotilla_core::spec::JobSpec::from_toml_str(
            "name = \"u\"\npriority = 5\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\n\
             workers = { min = 2 }\n",
        )
        .expect("spec");
        log.step(Command::SubmitJob { spec: Box::new(urgent), client_request_id: "u".into() });
        log.step(Command::PreemptForPriority { job_id: low, generation: 1, for_job: high });
        assert!(made_way(&log.state).is_empty(), "it still runs");
        log.step(stopped(low, 0));
        assert!(made_way(&log.state).is_empty(), "the job it stopped for does not run yet");
        log.step(Command::AssignGang { job_id: high, workers: vec![WorkerId(1), WorkerId(2)] });
        let words = made_way(&log.state);
        assert_eq!(words.get(&low).map(String::as_str), Some("made way for job-2 (priority 5), which runs"));
        let waiting = BTreeMap::from([(low, "waiting for 2 free worker(s)".to_string())]);
        let notes = BTreeMap::from([(low, "buying 2 spot instance(s)".to_string())]);
        assert_eq!(
            with_words(waiting, &words, &notes)[&low],
            "made way for job-2 (priority 5), which runs; waiting for 2 free worker(s); autoscaler: buying 2 spot instance(s)"
        );
        // Resumed: nothing more to say.
        log.step(Command::AssignGang { job_id: low, workers: vec![WorkerId(3), WorkerId(4)] });
        assert!(made_way(&log.state).is_empty());
    }

    /// A job that waits out its store's outage is not placed until its wait ends, and the
    /// scheduler does not overwrite its reason meanwhile.
    #[test]
    fn a_job_waiting_for_its_store_is_placed_only_when_its_wait_ends() {
        let mut log = Log::job_of_two(2);
        let job_id = JobId(1);
        log.step(Command::AssignGang { job_id, workers: vec![WorkerId(1), WorkerId(2)] });
        let out = GenerationEnd::StoreUnavailable { reason: "the endpoint is unreachable".into() };
        log.step(Command::GenerationEnded {
            job_id,
            generation: 1,
            end: out,
            step: 0,
            reporter: None,
            announced: None,
        });
        let until = log.state.jobs[&job_id].store_wait.as_ref().expect("waits").until_unix_ms;
        let placeable = |now| scheduler_input(&log.state, |_| u64::MAX, now).0.iter().map(|p| p.id).collect::<Vec<_>>();
        assert_eq!(placeable(until - 1), [], "waits for the store");
        assert_eq!(placeable(until), [job_id], "its wait ended");
        let (_, reasons) = pending_jobs_with_reasons(&log.state, until - 1);
        assert!(!reasons.contains_key(&job_id), "its reason is not the scheduler's to rewrite: {reasons:?}");
        assert!(pending_jobs_with_reasons(&log.state, until).1.contains_key(&job_id), "its wait ended");
    }

    #[test]
    fn the_autoscalers_word_is_appended_to_a_waiting_jobs_reason() {
        let waiting = BTreeMap::from([(JobId(1), "waiting for 2 free worker(s)".to_string()), (JobId(2), "w".into())]);
        let notes = BTreeMap::from([(JobId(1), "buying 2 spot instance(s)".to_string()), (JobId(7), "x".into())]);
        let reasons = with_words(waiting, &BTreeMap::new(), &notes);
        assert_eq!(reasons[&JobId(1)], "waiting for 2 free worker(s); autoscaler: buying 2 spot instance(s)");
        assert_eq!(reasons[&JobId(2)], "w", "no word, no change");
        assert_eq!(reasons.len(), 2, "a note for a job that does not wait adds nothing");
    }

    #[test]
    fn a_running_job_offers_for_preemption_only_the_members_that_come_free() {
        let mut log = Log::job_of_two(3);
        let job_id = JobId(1);
        log.step(Command::AssignGang { job_id, workers: vec![WorkerId(1), WorkerId(2)] });
        let running = |log: &Log| preemptible(&log.state, &running_jobs(&log.state), 1);
        let members = |p: &Preemptible| p.members.iter().map(|w| w.id).collect::<Vec<_>>();
        let offered = running(&log);
        assert_eq!(offered.len(), 1);
        assert_eq!((offered[0].id, offered[0].generation, offered[0].stopping), (job_id, 1, false));
        assert_eq!(members(&offered[0]), [WorkerId(1), WorkerId(2)]);
        // A noticed member leaves the cluster: its worker never comes free; the job stops.
        log.step(Command::WorkerInterrupted { worker_id: WorkerId(2), kind: "spot".into(), action_at_unix_ms: None });
        let offered = running(&log);
        assert_eq!(members(&offered[0]), [WorkerId(1)]);
        assert!(offered[0].stopping, "a notice without time to spare stops the gang: {offered:?}");
        // Only jobs below the highest waiting priority are read.
        assert!(preemptible(&log.state, &running_jobs(&log.state), 0).is_empty());
    }

    #[test]
    fn inference_takes_the_idle_workers_oldest_job_first() {
        let idle = [WorkerId(4), WorkerId(5), WorkerId(6)];
        let want = |job, workers, excluded: &[u64]| InferenceWants {
            job: JobId(job),
            workers,
            excluded: excluded.iter().map(|&w| WorkerId(w)).collect(),
        };
        let joins = inference_joins(&[want(2, 2, &[]), want(3, 5, &[]), want(9, 1, &[])], &idle);
        assert_eq!(joins, vec![(JobId(2), vec![WorkerId(4), WorkerId(5)]), (JobId(3), vec![WorkerId(6)])]);
        assert!(inference_joins(&[want(2, 2, &[])], &[]).is_empty());
        // A worker whose lease timed out on job 2 is never given to it again; job 3 may have it.
        let joins = inference_joins(&[want(2, 1, &[4]), want(3, 1, &[])], &idle);
        assert_eq!(joins, vec![(JobId(2), vec![WorkerId(5)]), (JobId(3), vec![WorkerId(4)])]);
    }

    /// `job_id`'s first generation stopped at a checkpoint at `step`.
    fn stopped(job_id: JobId, step: u64) -> Command {
        let end = GenerationEnd::Checkpointed;
        Command::GenerationEnded { job_id, generation: 1, end, step, reporter: None, announced: None }
    }

    /// Job 1's gang (workers 1 and 2 of 3) broke at step 5 (rank 1 lost), as `reporter` said.
    fn broken_gang_of_two(reporter: Option<WorkerId>) -> (Log, JobId) {
        let mut log = Log::job_of_two(3);
        let job_id = JobId(1);
        log.step(Command::AssignGang { job_id, workers: vec![WorkerId(1), WorkerId(2)] });
        let end = GenerationEnd::PeerLost { reason: "rank 1 was lost".into(), unreachable_rank: None };
        log.step(Command::GenerationEnded { job_id, generation: 1, end, step: 5, reporter, announced: None });
        (log, job_id)
    }

    /// A waiting job's holders are the members of its last gang that may still hold the state
    /// it ended with: not one another built-in job's gang stopped on since (its agent then holds
    /// that job's state).
    #[test]
    fn a_member_another_job_stopped_on_since_is_no_holder() {
        let (mut log, job_id) = broken_gang_of_two(Some(WorkerId(1)));
        let holders = |log: &Log| {
            let (pending, _) = scheduler_input(&log.state, |_| u64::MAX, 0);
            pending.into_iter().find(|j| j.id == job_id).map(|j| j.holders)
        };
        assert_eq!(holders(&log), Some(vec![WorkerId(1), WorkerId(2)]));
        let spec = flotilla_core::spec::JobSpec::from_toml_str(
            "name = \"k\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\nworkers = { min = 1 }\n",
        )
        .expect("spec");
        log.step(Command::SubmitJob { spec: Box::new(spec), client_request_id: "k".into() });
        let other = JobId(2);
        log.step(Command::AssignGang { job_id: other, workers: vec![WorkerId(1)] });
        log.step(stopped(other, 3));
        assert_eq!(holders(&log), Some(vec![WorkerId(2)]), "worker-1 holds job-2's state now");
    }

    /// A free worker whose heartbeat says it holds a running job's pushed state (its warm spare)
    /// is recorded once; the job's spares then stay where the state is, and when the job waits
    /// again its next gang takes that worker before the others.
    #[test]
    fn a_spare_heard_holding_its_jobs_state_is_recorded_and_taken_first() {
        let mut log = Log::job_of_two_and_a_spared_job(1, 4);
        let spared = JobId(2);
        log.step(Command::AssignGang { job_id: JobId(1), workers: vec![WorkerId(1), WorkerId(2)] });
        log.step(Command::AssignGang { job_id: spared, workers: vec![WorkerId(3)] });
        let holding = |log: &Log, held: &dyn Fn(WorkerId) -> Option<JobId>| {
            spares_holding(&log.state, &running_jobs(&log.state), held)
        };
        // worker-4 is the spare and says it holds job-2's state; job-1 keeps no spares.
        assert_eq!(holding(&log, &|w| (w == WorkerId(4)).then_some(spared)), [(WorkerId(4), spared)]);
        assert!(holding(&log, &|_| Some(JobId(1))).is_empty(), "job-1 keeps no spares");
        assert!(holding(&log, &|_| None).is_empty());
        log.step(Command::SparesHolding { workers: vec![(WorkerId(4), spared)] });
        assert!(holding(&log, &|w| (w == WorkerId(4)).then_some(spared)).is_empty(), "recorded once");
        // Job 1 ends: worker-1 and worker-2 are free with lower ids, but worker-4 stays the spare.
        log.step(Command::CancelJob { job_id: JobId(1), reason: String::new() });
        assert_eq!(flotilla_core::state::warm_spares(&log.state), [(WorkerId(4), spared)]);
        // Job 2's member is lost: its next gang takes the spare that holds its state.
        log.step(Command::WorkerLost { worker_id: WorkerId(3), last_step_seen: 5, last_heard_unix_ms: 0 });
        let (pending, free) = scheduler_input(&log.state, |_| u64::MAX, 0);
        let waiting = pending.iter().find(|j| j.id == spared).expect("job-2 waits");
        assert_eq!(waiting.holders, [WorkerId(4)]);
        let plan = schedule_preempting(&pending, &free, &[]);
        assert_eq!(
            plan.placements.iter().map(|p| (p.job, p.workers.clone())).collect::<Vec<_>>(),
            [(spared, vec![WorkerId(4)])]
        );
    }

    /// A survivor noticed while its job waits is free for that job alone while its notice leaves
    /// time for a handover, then not at all.
    #[test]
    fn a_noticed_survivor_is_free_for_its_own_job_alone_while_it_may_rejoin() {
        let (mut log, job_id) = broken_gang_of_two(Some(WorkerId(1)));
        log.step(Command::WorkerLost { worker_id: WorkerId(2), last_step_seen: 5, last_heard_unix_ms: 0 });
        let taken_at = 200_000;
        let notice = Command::WorkerInterrupted {
            worker_id: WorkerId(1),
            kind: "spot".into(),
            action_at_unix_ms: Some(taken_at),
        };
        log.step(notice);
        let free_at = |now| {
            let (_, free) = scheduler_input(&log.state, |_| u64::MAX, now);
            free.iter().map(|w| (w.id, w.only_for)).collect::<Vec<_>>()
        };
        let limit = taken_at - flotilla_core::state::HANDOVER_LEAD_MIN_MS;
        assert_eq!(free_at(limit), [(WorkerId(1), Some(job_id)), (WorkerId(3), None)]);
        assert_eq!(free_at(limit + 1), [(WorkerId(3), None)], "too late for a handover: it drains");
    }

    #[test]
    fn members_of_a_broken_gang_wait_to_be_heard_from() {
        let (mut log, job_id) = broken_gang_of_two(None);
        let broke_at = log.state.workers[&WorkerId(1)].suspect_since_unix_ms.expect("suspect");
        // worker-1 heartbeat after the break, worker-2 (dead) did not; worker-3 was not involved.
        let heard = |w: WorkerId| if w == WorkerId(1) { broke_at + 5 } else { broke_at - 500 };
        let (pending, free) = scheduler_input(&log.state, heard, broke_at);
        assert_eq!(pending.len(), 1);
        let ids: Vec<WorkerId> = free.iter().map(|w| w.id).collect();
        assert_eq!(ids, [WorkerId(1), WorkerId(3)]);
        // The one heard from is cleared (it may replace a noticed member again), not the other.
        let heard_from = suspects_heard(&log.state, heard);
        assert_eq!(heard_from, [(WorkerId(1), broke_at)]);
        let mut cleared = log.state.clone();
        let applied = flotilla_core::state::apply(
            &mut cleared,
            99,
            Envelope::new(broke_at + 10, Command::WorkersHeard { workers: heard_from }),
        );
        assert_eq!(applied, Ok(flotilla_core::state::Applied::WorkersHeard { cleared: 1 }));
        assert_eq!(cleared.workers[&WorkerId(1)].suspect_since_unix_ms, None);
        assert_eq!(cleared.workers[&WorkerId(2)].suspect_since_unix_ms, Some(broke_at));
        // One its peers could not reach is left out until its hold ends, heard from or not.
        let mut held = log.state.clone();
        held.workers.get_mut(&WorkerId(3)).expect("worker-3").unreachable_until_unix_ms = broke_at + 60_000;
        let free_at = |now| scheduler_input(&held, |_| u64::MAX, now).1.iter().map(|w| w.id).collect::<Vec<_>>();
        assert_eq!(free_at(broke_at + 59_999), [WorkerId(1), WorkerId(2)]);
        assert_eq!(free_at(broke_at + 60_000), [WorkerId(1), WorkerId(2), WorkerId(3)]);
        // A member whose lease expires in the next generation leaves its survivor time to
        // report; the leader ends the generation itself only after that.
        log.step(Command::AssignGang { job_id, workers: vec![WorkerId(1), WorkerId(3)] });
        log.step(Command::WorkerLost { worker_id: WorkerId(3), last_step_seen: 9, last_heard_unix_ms: 0 });
        let lost_at = log.state.jobs[&job_id].member_lost.as_ref().expect("a member lost").at_unix_ms;
        let wait = flotilla_core::state::MEMBER_LOST_REPORT_WAIT_MS;
        assert!(member_lost_commands(&log.state, lost_at + wait - 1).is_empty());
        assert_eq!(member_lost_commands(&log.state, lost_at + wait), vec![Command::GangLost { job_id, generation: 2 }]);
    }

    #[test]
    fn members_noticed_together_hand_over_once_every_replacement_is_reserved_and_prepared() {
        use flotilla_core::state::StopReason;
        let mut log = Log::job_of_two(2);
        let (w1, w2) = (WorkerId(1), WorkerId(2));
        let job_id = JobId(1);
        log.step(Command::AssignGang { job_id, workers: vec![w1, w2] });
        let notice =
            |worker_id| Command::WorkerInterrupted { worker_id, kind: "spot".into(), action_at_unix_ms: Some(200_000) };
        log.step(notice(w1));
        log.step(notice(w2));
        let fallback_at = log.state.jobs[&job_id].handovers[0].fallback_at_unix_ms;
        let fallback = vec![Command::RequestCheckpoint { job_id, generation: 1, reason: StopReason::Preemption }];
        let ready = vec![Command::HandoverReady { job_id, generation: 1, live: false }];
        let all = |_| Some(job_id);
        // No free worker: wait (replacements are on their way) until the fallback time.
        assert!(handover_commands(&log.state, 1_000, EXPECTED, all).is_empty());
        assert_eq!(handover_commands(&log.state, fallback_at, EXPECTED, all), fallback);
        assert_eq!(handover_commands(&log.state, 1_000, HandoverPolicy::default(), all), fallback, "none can come");
        // One per pass, in notice order.
        log.register(3);
        log.register(4);
        let (r1, r2) = (WorkerId(3), WorkerId(4));
        assert_eq!(
            handover_commands(&log.state, 1_000, EXPECTED, all),
            vec![Command::HandoverTo { job_id, generation: 1, replacement: r1 }]
        );
        log.step(Command::HandoverTo { job_id, generation: 1, replacement: r1 });
        assert!(log.state.jobs[&job_id].handovers[0].replacement == Some(r1));
        // w1's replacement is prepared, w2 has none yet: not ready.
        assert_eq!(
            handover_commands(&log.state, 1_000, EXPECTED, all),
            vec![Command::HandoverTo { job_id, generation: 1, replacement: r2 }]
        );
        log.step(Command::HandoverTo { job_id, generation: 1, replacement: r2 });
        let only_r1 = |w| (w == r1).then_some(job_id);
        assert!(handover_commands(&log.state, 1_000, EXPECTED, only_r1).is_empty(), "r2 still prepares");
        assert_eq!(handover_commands(&log.state, 1_000, EXPECTED, all), ready);
        assert_eq!(handover_commands(&log.state, fallback_at, EXPECTED, only_r1), ready, "waited out at the fallback");
        // A replacement still reserved though lost (a state an older build wrote: this one
        // gives it up, see the state machine's tests) ends the handovers at a checkpoint.
        let mut lost = log.state.clone();
        lost.workers.get_mut(&r2).expect("worker").lost_at_unix_ms = Some(900);
        assert_eq!(handover_commands(&lost, 1_000, EXPECTED, all), fallback);
    }

    #[test]
    fn a_lone_member_hands_over_live_when_enabled_and_falls_back_to_the_stop_when_overdue() {
        let mut log = Log::job_of_two(3);
        let (job_id, w1, w2, r) = (JobId(1), WorkerId(1), WorkerId(2), WorkerId(3));
        log.step(Command::AssignGang { job_id, workers: vec![w1, w2] });
        let notice =
            |worker_id| Command::WorkerInterrupted { worker_id, kind: "spot".into(), action_at_unix_ms: Some(200_000) };
        log.step(notice(w2));
        assert_eq!(log.state.jobs[&job_id].handovers[0].replacement, Some(r), "reserved at the notice");
        let all = |_| Some(job_id);
        let live = HandoverPolicy { live: true, ..EXPECTED };
        let (stop, go_live) = (
            Command::HandoverReady { job_id, generation: 1, live: false },
            Command::HandoverReady { job_id, generation: 1, live: true },
        );
        assert_eq!(handover_commands(&log.state, 1_000, EXPECTED, all), vec![stop.clone()], "live is opt-in");
        assert_eq!(handover_commands(&log.state, 1_000, live, all), vec![go_live.clone()]);
        log.step(go_live);
        let since = log.state.jobs[&job_id].handovers[0].live_since_unix_ms;
        // Under way: nothing to do until the swap, unless it is overdue or the fallback time came.
        assert!(handover_commands(&log.state, since + 1_000, live, all).is_empty(), "waits for the swap");
        let overdue = since + LIVE_SWAP_WAIT_MAX_MS;
        assert_eq!(handover_commands(&log.state, overdue, live, all), vec![stop.clone()]);
        let fallback_at = log.state.jobs[&job_id].handovers[0].fallback_at_unix_ms;
        assert_eq!(handover_commands(&log.state, fallback_at, live, all), vec![stop.clone()]);
        // Another member noticed meanwhile: both hand over at one stop, once it has a replacement.
        let mut both = log.clone();
        both.step(notice(w1));
        both.register(4);
        let reserve = Command::HandoverTo { job_id, generation: 1, replacement: WorkerId(4) };
        assert_eq!(handover_commands(&both.state, since + 1_000, live, all), vec![reserve.clone()]);
        both.step(reserve);
        assert_eq!(handover_commands(&both.state, since + 1_000, live, all), [stop]);
    }

    #[test]
    fn a_rebalance_recommendation_s_handover_never_falls_back_by_itself() {
        use flotilla_core::state::{REBALANCE_KIND, StopReason};
        let mut log = Log::job_of_two(2);
        let (job_id, w1, w2) = (JobId(1), WorkerId(1), WorkerId(2));
        log.step(Command::AssignGang { job_id, workers: vec![w1, w2] });
        log.step(Command::WorkerInterrupted { worker_id: w1, kind: REBALANCE_KIND.into(), action_at_unix_ms: None });
        let all = |_| Some(job_id);
        // No replacement yet, however long, even where none can come: the gang trains on.
        assert!(handover_commands(&log.state, u64::MAX - 1, EXPECTED, all).is_empty());
        assert!(handover_commands(&log.state, 1_000, HandoverPolicy::default(), all).is_empty());
        // A notice for the other member brings a deadline for the pair.
        let notice =
            Command::WorkerInterrupted { worker_id: w2, kind: "spot".into(), action_at_unix_ms: Some(200_000) };
        log.step(notice);
        let fallback = vec![Command::RequestCheckpoint { job_id, generation: 1, reason: StopReason::Preemption }];
        assert!(handover_commands(&log.state, 154_999, EXPECTED, all).is_empty());
        assert_eq!(handover_commands(&log.state, 155_000, EXPECTED, all), fallback);
    }
}
