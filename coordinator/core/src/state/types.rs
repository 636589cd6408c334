//! Data of the state machine: jobs, workers, commands and their outcomes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{JobId, WorkerId};
use crate::spec::JobSpec;

/// Version of commands, envelopes and snapshots written by this build. A node refuses an
/// envelope or a snapshot of a newer version (it stops before applying it, see the replica),
/// so bump it whenever a command is new or applies differently: then a node of an older
/// version that meets the newer log stops instead of diverging from the others.
/// 2: several handovers at once, rebalance recommendations' handovers (`WorkerInterrupted`
/// applies differently), `GangLost`, `Job::handovers`.
/// 3: a reserved replacement lost or noticed while its gang trains is given up and another
/// sought (`WorkerLost` and `WorkerInterrupted` of a free worker apply differently).
/// 4: live handovers (`HandoverReady::live`, `HandoverSwapped`, `LiveSwapTimed`,
/// `Handover::live_since_unix_ms`, `Job::live_swap_timed_step`).
/// 5: a live handover's failure said by its members (`LiveHandoverFailed`); a member its peers
/// could not reach at the rendezvous held out of placement (`GenerationEnd::PeerLost::
/// unreachable_rank`, `Worker::unreachable_until_unix_ms`); suspect workers cleared once heard
/// from (`WorkersHeard`).
/// 6: a worker leaves in order (`WorkerLeft`, `Worker::left`, `Rejected::StillAssigned`).
/// 7: priority preemption (`PreemptForPriority`, `StopReason::Priority`); inference yields its
/// workers to a waiting gang at shard boundaries (`YieldInference`, `InferenceJob::yielding`).
/// 8: a member of a waiting job's last gang noticed while it waits may rejoin its next gang
/// and hand over from there (`Worker::holding_for`; `WorkerInterrupted` of a free worker and
/// `AssignGang` apply differently).
/// 9: a job's warm spares are at most its `capacity.spares` of the free workers in its pool
/// (`warm_spares`), and a noticed member's replacement is its job's own spare before other free
/// workers and other jobs' spares last (`pick_replacement`: `WorkerInterrupted` and the
/// commands that seek replacements apply differently); spares heard holding their job's state
/// are recorded (`SparesHolding`) and stay its spares.
/// 10: a generation that could not start because the store was out ends
/// `GenerationEnd::StoreUnavailable`, which is not a failure: the job waits for the store
/// (`Job::store_wait`) and is not placed before its backoff ends.
pub const STATE_VERSION: u32 = 10;
/// Jobs kept in the state at most (active and finished). A submission beyond it is refused
/// until finished jobs are garbage-collected; this bounds snapshot size (~2 KB a job).
pub const JOBS_MAX: usize = 100_000;
/// Workers registered at most.
pub const WORKERS_MAX: usize = 10_000;
/// Longest client request id, in bytes.
pub const CLIENT_REQUEST_ID_LEN_MAX: usize = 128;
/// How long a member its peers could not reach at a rendezvous is held out of placement the
/// first time (its data port may be firewalled, or its host cut off: a new gang with it would
/// break at once). Each hold that follows the previous one's end within
/// [`UNREACHABLE_STREAK_GAP_MS`] doubles, up to [`UNREACHABLE_HOLD_MAX_MS`].
pub const UNREACHABLE_HOLD_MS: u64 = 60_000;
pub const UNREACHABLE_HOLD_MAX_MS: u64 = 32 * 60_000;
/// A hold later than this after the previous one ended starts again at [`UNREACHABLE_HOLD_MS`].
pub const UNREACHABLE_STREAK_GAP_MS: u64 = 10 * 60_000;

/// How long the `holds`-th hold in a row lasts (1: [`UNREACHABLE_HOLD_MS`], doubling, capped).
pub fn unreachable_hold_ms(holds: u32) -> u64 {
    UNREACHABLE_HOLD_MS.saturating_mul(1 << holds.saturating_sub(1).min(16)).min(UNREACHABLE_HOLD_MAX_MS)
}
/// How long a job waits after the first generation in a row that could not start because the
/// store was out ([`GenerationEnd::StoreUnavailable`]); each one after doubles it, up to
/// [`STORE_WAIT_MAX_MS`]. A job waits for its store for as long as the store is out.
pub const STORE_WAIT_FIRST_MS: u64 = 10_000;
pub const STORE_WAIT_MAX_MS: u64 = 5 * 60_000;

/// How long a job waits after its `tries`-th start in a row that found the store out.
pub fn store_wait_ms(tries: u32) -> u64 {
    STORE_WAIT_FIRST_MS.saturating_mul(1 << tries.saturating_sub(1).min(16)).min(STORE_WAIT_MAX_MS)
}
/// Longest free-text reason kept on a job, in bytes (longer ones are cut).
pub const REASON_LEN_MAX: usize = 1024;
/// Pending reasons in one `SetPendingReasons` at most (the scheduler splits larger passes).
pub const PENDING_REASONS_PER_COMMAND_MAX: usize = 1024;
/// Workers in one `WorkersHeard` at most (the leader splits larger passes).
pub const WORKERS_HEARD_PER_COMMAND_MAX: usize = 1024;
/// Events kept per job; older ones are dropped first.
pub const JOB_EVENTS_MAX: usize = 64;
/// Checkpoint records kept per job at most (retention keeps far fewer; this bounds the state
/// if deletion cannot keep up).
pub const CHECKPOINTS_RECORDED_MAX: usize = 1024;
/// A notice that leaves at least this long before the instance is taken starts a handover
/// (a replacement takes the noticed member's place while the gang trains on) instead of an
/// immediate checkpoint and stop.
pub const HANDOVER_LEAD_MIN_MS: u64 = 60_000;
/// A handover without a replacement falls back to the checkpoint-and-stop path this long
/// before the instance is taken (time for the checkpoint).
pub const HANDOVER_FALLBACK_LEAD_MS: u64 = 45_000;
/// The `kind` of [`Command::WorkerInterrupted`] for EC2's rebalance recommendation (the
/// instance is at elevated risk of interruption; no time is named): a handover without a
/// deadline.
pub const REBALANCE_KIND: &str = "rebalance recommendation";
/// How long the survivors of a member lost silently (its lease expired) have to report the
/// state they hold before the leader ends the generation itself ([`Command::GangLost`]).
pub const MEMBER_LOST_REPORT_WAIT_MS: u64 = 3_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JobState {
    Pending,
    Provisioning,
    Running,
    Recovering,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::Pending => "Pending",
            JobState::Provisioning => "Provisioning",
            JobState::Running => "Running",
            JobState::Recovering => "Recovering",
            JobState::Succeeded => "Succeeded",
            JobState::Failed => "Failed",
            JobState::Cancelled => "Cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub at_unix_ms: u64,
    pub kind: String,
    pub message: String,
    /// When what the event records began, where that is known to be earlier than the record:
    /// a member lost silently is recorded at its lease's expiry, but stopped the gang after it
    /// was last heard from (up to a lease, 5 s, before). A recovery is timed from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_unix_ms: Option<u64>,
}

/// The words of a `handover` event that says the replacement took the leaving member's rank
/// (other `handover` events say it was reserved, prepared, or fell back).
const HANDED_OVER: &str = "'s rank at step";
/// What a live swap's `handover` event adds to [`JobEvent::handed_over_message`].
pub const LIVE_SWAP: &str = "; live, without a stop: 0 step(s) lost";
/// What follows the worker at the start of every `preemption_notice` event.
const NOTICED: &str = " got a ";
/// How an event that stops the gang at its next step ends: a notice with no time for a
/// handover, or the leader's request (`checkpoint_requested`, `<reason>: ` first).
pub const CHECKPOINTING: &str = "checkpointing at the next step";
/// What a `checkpointed` event says between the generation and the stop's reason.
const STOPPED_FOR: &str = " stopped for ";
/// What a `peer_lost` event says of a generation that broke before training a step (a member
/// its peers could not reach at the rendezvous): the stall that stopped the one before goes on.
const NEVER_TRAINED: &str = " before training a step";

impl JobEvent {
    /// The `handover` event's message for `replacement` taking `leaving`'s rank at `step`.
    pub fn handed_over_message(replacement: WorkerId, leaving: WorkerId, step: u64, since_notice_ms: u64) -> String {
        format!("{replacement} took {leaving}{HANDED_OVER} {step}, {since_notice_ms} ms after the notice")
    }

    /// The `checkpointed` event's message: `generation` stopped at `step` for `why` (a
    /// [`StopReason::name`], or `stop` for one nothing asked for), `lost` steps after the
    /// point the next generation resumes from.
    pub fn checkpointed_message(generation: u64, why: &str, step: u64, lost: u64) -> String {
        format!("generation {generation}{STOPPED_FOR}{why} at step {step}; {lost} step(s) lost")
    }

    /// The reason of a `checkpointed` event when it names a stop the job resumes from without
    /// having lost anyone: to grow, for a job of higher priority, or to move to on-demand
    /// capacity for a deadline. Preemption and handover stops are timed as recoveries and
    /// handovers; a budget stop never resumes.
    pub fn planned_stop(&self) -> Option<StopReason> {
        if self.kind != "checkpointed" {
            return None;
        }
        let (_, rest) = self.message.split_once(STOPPED_FOR)?;
        let (why, _) = rest.split_once(" at step ")?;
        [StopReason::Grow, StopReason::Priority, StopReason::Deadline].into_iter().find(|r| r.name() == why)
    }

    /// The `checkpoint_requested` event's message for a stop the leader asks for `reason`.
    pub fn checkpoint_requested_message(reason: StopReason) -> String {
        format!("{}: {CHECKPOINTING}", reason.name())
    }

    /// Whether this is the event that says a replacement took a noticed member's rank.
    pub fn is_handed_over(&self) -> bool {
        self.kind == "handover" && self.message.contains(HANDED_OVER)
    }

    /// The leaving member (as the message names it) when this event says its replacement took
    /// its rank live, without a stop: its notice is then settled within the generation.
    pub fn live_swap_leaving(&self) -> Option<&str> {
        if !self.is_handed_over() || !self.message.ends_with(LIVE_SWAP) {
            return None;
        }
        self.message.split_once(" took ")?.1.split_once(HANDED_OVER).map(|(leaving, _)| leaving)
    }

    /// Whether this event stopped training, or asked it to stop at the next step, for a member
    /// lost or about to be: a lost member, a notice the gang stops for at once, or the leader's
    /// fallback for a handover whose replacement did not come in time. A notice that began a
    /// handover (the gang trains on meanwhile) is not one.
    pub fn stops_for_a_loss(&self) -> bool {
        match self.kind.as_str() {
            "worker_lost" | "member_lost" | "peer_lost" => true,
            "preemption_notice" => self.message.ends_with(CHECKPOINTING),
            "checkpoint_requested" => self.message == Self::checkpoint_requested_message(StopReason::Preemption),
            _ => false,
        }
    }

    /// The `peer_lost` message of `generation`, broken at `step` (`never_trained`: its first
    /// step, the one it resumed from), with `kept` and `lost` words and the survivors' reason.
    pub fn peer_lost_message(
        generation: u64,
        step: u64,
        never_trained: bool,
        kept: &str,
        lost: u64,
        reason: &str,
    ) -> String {
        let before = if never_trained { NEVER_TRAINED } else { "" };
        format!("generation {generation} broke at step {step}{before}{kept}; {lost} step(s) lost: {reason}")
    }

    /// The `store_unavailable` message of `generation`, stopped at `step` (`never_trained`: its
    /// first step) because the store was out (`who`: the reporter's words): its `tries`-th in a
    /// row, `out_s` after the first, the next in `wait_s`, with the rank's reason.
    pub fn store_unavailable_message(
        generation: u64,
        step: u64,
        never_trained: bool,
        who: &str,
        (tries, out_s, wait_s): (u32, u64, u64),
        reason: &str,
    ) -> String {
        let before = if never_trained { NEVER_TRAINED } else { "" };
        format!(
            "generation {generation} stopped at step {step}{before}{who}: the store is out (try {tries}, {out_s} s \
             since the first); trying again in {wait_s} s, not counted toward capacity.max_failures: {reason}"
        )
    }

    /// Whether this event stopped a generation that had trained because the store was out: an
    /// interruption (no loss) that the next generation's first step ends.
    pub fn stopped_by_outage(&self) -> bool {
        self.kind == "store_unavailable" && !self.message.contains(NEVER_TRAINED)
    }

    /// Whether this event ended a generation that never trained a step (see
    /// [`JobEvent::peer_lost_message`], [`JobEvent::store_unavailable_message`]): training had
    /// stopped before it formed.
    pub fn ended_untrained(&self) -> bool {
        matches!(self.kind.as_str(), "peer_lost" | "store_unavailable") && self.message.contains(NEVER_TRAINED)
    }

    /// The `priority` event's message: the job stops for `for_job` (see
    /// [`JobEvent::made_way_for`]).
    pub fn priority_stop_message(for_job: JobId, for_priority: i32, priority: i32) -> String {
        format!(
            "{for_job} (priority {for_priority}) waits for workers this job (priority {priority}) holds: \
             {CHECKPOINTING}, to resume when workers are free"
        )
    }

    /// The job a `priority` event says this one stopped for.
    pub fn made_way_for(&self) -> Option<JobId> {
        if self.kind != "priority" {
            return None;
        }
        self.message.split_once(" (priority ")?.0.parse().ok()
    }

    /// The noticed worker (as the message names it) of a `preemption_notice` event.
    pub fn noticed_worker(&self) -> Option<&str> {
        if self.kind != "preemption_notice" {
            return None;
        }
        self.message.split_once(NOTICED).map(|(worker, _)| worker)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    pub state: JobState,
    /// Why the job is Pending/Failed/Cancelled; empty otherwise.
    pub reason: String,
    pub client_request_id: String,
    pub submitted_at_unix_ms: u64,
    pub updated_at_unix_ms: u64,
    /// Raft index of the entry that created the job (its place in the total order).
    pub submitted_index: u64,
    /// Last step recorded through Raft (checkpoints, finish); live progress is not replicated.
    pub step: u64,
    pub generation: u64,
    pub recoveries: u32,
    pub steps_lost: u64,
    pub events: Vec<JobEvent>,
    /// The current gang, in rank order (empty unless Running).
    #[serde(default)]
    pub gang: Vec<WorkerId>,
    /// The gang of the generation that ended last (generation `generation`, when the job is
    /// not Running): its members' late reports (a checkpoint that finished uploading after a
    /// peer died) are still theirs to make. Cleared when a new gang forms.
    #[serde(default)]
    pub ended_gang: Vec<WorkerId>,
    /// Size of the latest gang (kept after the job ends, for `status`).
    #[serde(default)]
    pub world_size: u32,
    /// Final metrics, reported when the job finished.
    #[serde(default)]
    pub metrics: Option<FinalMetrics>,
    /// The newest usable checkpoint recorded through Raft: where a new generation resumes.
    /// Always the newest entry of `checkpoints` that is not being deleted.
    #[serde(default)]
    pub latest_checkpoint: Option<CheckpointRecord>,
    /// Every recorded checkpoint still in the store, oldest first. Retention keeps the newest
    /// `checkpoint.keep`; the others are marked `deleting`, removed, then dropped.
    #[serde(default)]
    pub checkpoints: Vec<CheckpointRecord>,
    /// Why the current generation was told to checkpoint at its next step boundary and stop
    /// (a preemption notice, or an elastic resize); `None` when no such order is out.
    #[serde(default)]
    pub checkpoint_requested: Option<StopReason>,
    /// Generations ended in order by a preemption notice (checkpointed, nothing lost).
    #[serde(default)]
    pub preemptions: u32,
    /// Failures since the job last made progress (a checkpoint beyond `failure_step`).
    #[serde(default)]
    pub failures: u32,
    /// Compute charged to the job for its ended generations, USD (the running one is added
    /// by [`Job::cost_usd_at`]).
    #[serde(default)]
    pub cost_usd: f64,
    /// Of that, what paid for work that was lost and redone.
    #[serde(default)]
    pub lost_work_usd: f64,
    /// The current generation: when it started, at which step, and its gang's hourly price
    /// (from the instances' prices at launch; 0 for workers without an instance record).
    #[serde(default)]
    pub generation_started_at_unix_ms: u64,
    #[serde(default)]
    pub generation_start_step: u64,
    #[serde(default)]
    pub gang_usd_per_hour: f64,
    /// `step` at the last failure: a later checkpoint past it resets `failures`.
    #[serde(default)]
    pub failure_step: u64,
    /// Out of slack for `capacity.deadline_h`: from now on the job runs on on-demand capacity
    /// only (spot workers are neither assigned nor bought for it). Never cleared.
    #[serde(default)]
    pub on_demand_only: bool,
    /// Time without training that stops cost the job, summed (each from the stop, or the
    /// loss, to the next generation's first step, as the leader saw it), in ms.
    #[serde(default)]
    pub stall_ms_total: u64,
    /// The latest such stall, ms (0: none yet).
    #[serde(default)]
    pub last_stall_ms: u64,
    /// The generation whose stall was recorded last (one record per generation).
    #[serde(default)]
    pub stall_generation: u64,
    /// What its resumes moved, summed: bytes peer to peer and bytes read from the store.
    #[serde(default)]
    pub resume_peer_bytes: u64,
    #[serde(default)]
    pub resume_storage_bytes: u64,
    /// Members that got a notice with time to spare, in notice order: a replacement is sought
    /// for each while the gang trains on; once every one is ready the gang hands over to all
    /// of them at one step boundary. (Logs and snapshots before several handovers at once
    /// hold one, under `handover`.)
    #[serde(default, alias = "handover", deserialize_with = "one_or_many", skip_serializing_if = "Vec::is_empty")]
    pub handovers: Vec<Handover>,
    /// A member's lease expired while the gang trained (it went silent: its peers saw no
    /// reset): the survivors are told to stop waiting for it and report the state they hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_lost: Option<MemberLost>,
    /// The step of the newest live swap whose stall a surviving rank reported (its time
    /// without a step around the swap is counted once, whichever survivor reports first).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub live_swap_timed_step: u64,
    /// Generations that could not start because the store was out, in a row without progress,
    /// and when the next may be placed. Not a failure: the job waits for its store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_wait: Option<StoreWait>,
    /// The registered weights a fresh start loads (`train.init_from`, resolved when the job was
    /// submitted, so that an alias moved later changes nothing): the model's safetensors URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_artifact_uri: Option<String>,
}

/// See [`Job::store_wait`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreWait {
    /// When the first of these ends was recorded.
    pub since_unix_ms: u64,
    /// Starts that found the store out since then.
    pub tries: u32,
    /// The job's step at the first: progress past it starts a new count.
    pub step: u64,
    /// No gang is placed for the job before this ([`store_wait_ms`] after the latest try).
    pub until_unix_ms: u64,
}

/// See [`Job::member_lost`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberLost {
    pub worker: WorkerId,
    pub at_unix_ms: u64,
    /// The last step the leader heard of, for `steps_lost` if nobody reports.
    pub last_step_seen: u64,
}

/// A member leaves at a step boundary and a replacement takes its rank, the gang training on
/// until then (issue 25). Without a replacement by `fallback_at_unix_ms` the leader falls back
/// to the checkpoint-and-stop path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The noticed member.
    pub leaving: WorkerId,
    /// When the notice came (for a member that rejoined its job's gang though noticed,
    /// [`Worker::may_rejoin`], the notice it got while the job waited).
    pub noticed_at_unix_ms: u64,
    pub fallback_at_unix_ms: u64,
    /// The free worker taking its place, reserved from when it was chosen (the scheduler gives
    /// it to nobody else). It prepares (loads the job's data, compiles its GPU kernels) while
    /// the gang trains on; once it is ready ([`Command::HandoverReady`]) the gang checkpoints
    /// and the next generation forms with it at once.
    pub replacement: Option<WorkerId>,
    /// When the replacement was reserved (0: none yet).
    #[serde(default)]
    pub reserved_at_unix_ms: u64,
    /// Started by a rebalance recommendation (the instance is at risk; no time named): no
    /// fallback time (`fallback_at_unix_ms` is `u64::MAX`); the gang stops for it only once its
    /// replacement is ready. A spot notice for the member gives it the notice's deadline.
    #[serde(default)]
    pub advisory: bool,
    /// A live handover under way since then (0: none): the gang does not stop; the leaving
    /// member streams its state and every step's update to the replacement, which catches up
    /// and takes the rank at a step boundary the gang agrees on ([`Command::HandoverSwapped`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub live_since_unix_ms: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// `null`, one value (what a log or snapshot wrote before there could be several) or a list.
fn one_or_many<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        Many(Vec<T>),
        One(T),
    }
    Ok(match Option::<OneOrMany<T>>::deserialize(deserializer)? {
        None => Vec::new(),
        Some(OneOrMany::One(one)) => vec![one],
        Some(OneOrMany::Many(many)) => many,
    })
}

impl Handover {
    /// When the gang falls back to checkpoint-and-wait without the replacement ready; `None`
    /// for a rebalance recommendation's handover, which has no deadline.
    pub fn deadline_unix_ms(&self) -> Option<u64> {
        (!self.advisory).then_some(self.fallback_at_unix_ms)
    }

    /// Whether it is a live handover under way (see [`Handover::live_since_unix_ms`]).
    pub fn is_live(&self) -> bool {
        self.live_since_unix_ms > 0
    }
}

impl Job {
    /// Whether the job waits out its store's outage at `now_ms` (no gang is placed for it).
    pub fn waits_for_store(&self, now_ms: u64) -> bool {
        self.store_wait.as_ref().is_some_and(|w| now_ms < w.until_unix_ms)
    }

    /// Ends the running generation's membership: the gang is kept as `ended_gang` and returned
    /// for release.
    pub fn end_gang(&mut self) -> Vec<WorkerId> {
        // A handover belongs to its generation: a gang that ends (checkpoint, loss, cancel,
        // failure) releases the replacements it had reserved.
        self.handovers.clear();
        self.ended_gang = std::mem::take(&mut self.gang);
        self.ended_gang.clone()
    }

    /// Handovers under way that still wait for their replacement, in notice order.
    pub fn awaited_handovers(&self) -> impl Iterator<Item = &Handover> {
        self.handovers.iter().filter(|h| h.replacement.is_none())
    }

    /// The workers reserved to replace noticed members.
    pub fn reserved_replacements(&self) -> impl Iterator<Item = WorkerId> + '_ {
        self.handovers.iter().filter_map(|h| h.replacement)
    }

    /// The handover of `leaving`, if it is a noticed member.
    pub fn handover_of(&self, leaving: WorkerId) -> Option<&Handover> {
        self.handovers.iter().find(|h| h.leaving == leaving)
    }

    /// The live handover under way, if any.
    pub fn live_handover(&self) -> Option<&Handover> {
        self.handovers.iter().find(|h| h.is_live())
    }

    /// Whether the handovers under way may go live: exactly one, of a built-in job (a command
    /// job's program restarts from a checkpoint; several noticed members swap at one stop).
    pub fn may_hand_over_live(&self) -> bool {
        self.handovers.len() == 1 && self.spec.command().is_none()
    }

    /// Drops the handovers under way as the generation stops as after any notice (one found
    /// no replacement in time): those without a replacement now; those with one when the gang
    /// ends (their replacements are free then, and prepared for the job's next generation).
    pub fn drop_awaited_handovers(&mut self) {
        self.handovers.retain(|h| h.replacement.is_some());
    }

    /// Whether the job must run on on-demand workers only: `capacity.spot = false`, or moved
    /// there for its deadline.
    pub fn needs_on_demand(&self) -> bool {
        self.on_demand_only || !self.spec.capacity.spot
    }

    /// Whether `worker` may report for this job's current (or just ended) generation.
    pub fn is_member(&self, worker: WorkerId) -> bool {
        self.gang.contains(&worker) || self.ended_gang.contains(&worker)
    }

    /// The state users see (`status`, the API and its filter, the dashboard, metrics). The
    /// state machine and the scheduler keep every job that waits for a gang `Pending`; users
    /// are told more: `Recovering` once it has trained (it resumes from its newest checkpoint,
    /// after a spot notice, a lost member, a failure, a resize or a priority stop: its reason
    /// says which), else `Provisioning` while instances bought for it are launched or boot
    /// (`provisioning`; callers go through [`State::shown_state`] or [`ShownStates`]).
    fn shown_state(&self, provisioning: bool) -> JobState {
        match self.state {
            JobState::Pending if self.generation > 0 => JobState::Recovering,
            JobState::Pending if provisioning => JobState::Provisioning,
            state => state,
        }
    }

    /// The job this one stopped for, when a priority stop ended its last generation (it waits
    /// to resume since): the `priority` event since its last gang formed.
    pub fn stopped_for(&self) -> Option<JobId> {
        if self.state != JobState::Pending {
            return None;
        }
        self.events.iter().rev().take_while(|e| e.kind != "gang").find_map(JobEvent::made_way_for)
    }

    /// What the job has cost until `now_unix_ms`, the running generation included.
    pub fn cost_usd_at(&self, now_unix_ms: u64) -> f64 {
        let running = if self.state == JobState::Running {
            self.gang_usd_per_hour * now_unix_ms.saturating_sub(self.generation_started_at_unix_ms) as f64 / 3_600_000.0
        } else {
            0.0
        };
        self.cost_usd + running
    }

    /// Retention: the recorded checkpoints to mark for deletion now (all but the newest
    /// `checkpoint.keep` usable ones; never the newest), and those already marked, whose objects
    /// must be removed before their records are dropped.
    pub fn retention_plan(&self) -> (Vec<String>, Vec<String>) {
        let keep = (self.spec.checkpoint.keep as usize).max(1);
        // A pending checkpoint is not counted: until it is written, the older ones stay.
        let usable: Vec<&CheckpointRecord> = self.checkpoints.iter().filter(|c| !c.deleting && !c.pending).collect();
        let excess = usable.len().saturating_sub(keep);
        let newest = self.latest_checkpoint.as_ref().map(|c| c.uri.as_str());
        let mark =
            usable.iter().take(excess).filter(|c| Some(c.uri.as_str()) != newest).map(|c| c.uri.clone()).collect();
        let remove = self.checkpoints.iter().filter(|c| c.deleting).map(|c| c.uri.clone()).collect();
        (mark, remove)
    }
}

/// Why a running generation is asked to stop at a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// A gang member received a spot interruption notice (or SIGTERM).
    Preemption,
    /// Elastic job: more workers are free; regroup at a larger world size.
    Grow,
    /// The job reached `capacity.budget_usd`: it stops at a checkpoint and does not resume.
    Budget,
    /// Out of slack for `capacity.deadline_h` on spot: it resumes on on-demand capacity.
    Deadline,
    /// A waiting job of higher priority needs its workers: it resumes when workers are free.
    Priority,
    /// A noticed member's replacement is ready: the next generation forms with it at once.
    Handover,
}

impl StopReason {
    pub fn name(self) -> &'static str {
        match self {
            StopReason::Preemption => "preemption",
            StopReason::Grow => "grow",
            StopReason::Budget => "budget",
            StopReason::Deadline => "deadline",
            StopReason::Handover => "handover",
            StopReason::Priority => "priority",
        }
    }
}

/// How a generation ended without finishing the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "end")]
pub enum GenerationEnd {
    /// Stopped in order at a checkpoint of the step reported (after `checkpoint_requested`).
    Checkpointed,
    /// A collective failed: a peer died or stalled. Not the job's fault; never a failure.
    /// `unreachable_rank`: the rank the reporter could not reach while the gang formed (its
    /// data port refused or dropped the connection, or did not answer): that member is held
    /// out of placement for [`UNREACHABLE_HOLD_MS`], so the job does not re-form on it at once.
    PeerLost {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unreachable_rank: Option<u32>,
    },
    /// The checkpoint the generation was told to resume from is unreadable (corrupt or
    /// half-written): it is dropped and the next generation resumes from the one before.
    CheckpointUnusable { step: u64, reason: String },
    /// The training failed in a way a new generation may not repeat (counts toward
    /// `capacity.max_failures`).
    Error { reason: String },
    /// The generation could not go on because the store (its data, checkpoint or workdir) did
    /// not answer or failed on its side. Not the job's fault and not counted: the job waits
    /// ([`Job::store_wait`]) and tries again.
    StoreUnavailable { reason: String },
}

/// A completed checkpoint (its MANIFEST was written) as the coordinator records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    /// Object-store prefix of the checkpoint.
    pub uri: String,
    pub size_bytes: u64,
    pub manifest_sha256: String,
    pub epoch: u64,
    pub global_sample_offset: u64,
    pub generation: u64,
    /// Retention decided to delete it: never resumed from again; its objects are being removed.
    #[serde(default)]
    pub deleting: bool,
    /// Announced by its generation's orderly stop while its writer still saves it (the gang
    /// regroups at once: every member of the next generation holds its state in memory): the
    /// next generation resumes from it, retention keeps the older written ones, and its writer
    /// confirms it with [`Command::RecordCheckpoint`] once its MANIFEST is in the store. One
    /// never confirmed is given up once a newer checkpoint is recorded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
    /// The worker that wrote (or writes) it; `None` when the leader recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<WorkerId>,
}

/// What a finished job reports about its model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FinalMetrics {
    /// Fraction in 0..=1.
    pub val_accuracy: Option<f64>,
    pub val_loss: Option<f64>,
    pub train_loss: Option<f64>,
    /// The step of the validated state that is the job's model and these metrics', when it is
    /// not the final one (`train.keep_best`); 0: the final state.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub val_step: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub cpus: u32,
    pub gpus: u32,
    pub memory_bytes: u64,
    pub instance_id: String,
    pub instance_type: String,
    pub zone: String,
    pub hostname: String,
    /// Where the worker accepts collective connections.
    pub data_addr: String,
}

impl Worker {
    /// Whether `job`'s next gang may take it at `now_ms` though it is draining: it holds the
    /// state of the job's last gang ([`Worker::holding_for`]) and its notice leaves time for a
    /// handover ([`HANDOVER_LEAD_MIN_MS`]), which the gang starts with.
    pub fn may_rejoin(&self, job: JobId, now_ms: u64) -> bool {
        self.lost_at_unix_ms.is_none()
            && self.job.is_none()
            && self.draining
            && self.holding_for == Some(job)
            && self.taken_after_handover_lead(now_ms).is_some()
    }

    /// Whether it may hold the state `job`'s last gang ended with, of which it was a member
    /// ([`Worker::held_state`]).
    pub fn may_hold_state_of(&self, job: JobId) -> bool {
        match self.held_state {
            HeldState::Unknown => true,
            HeldState::Nothing => false,
            HeldState::Job(held) => held == job,
        }
    }

    /// When its instance is taken, if its notice named a time that leaves a handover
    /// [`HANDOVER_LEAD_MIN_MS`] from `now_ms` (else a checkpoint and stop is all there is time for).
    pub fn taken_after_handover_lead(&self, now_ms: u64) -> Option<u64> {
        self.notice_action_at_unix_ms.filter(|at| *at >= now_ms.saturating_add(HANDOVER_LEAD_MIN_MS))
    }

    /// Whether it is held out of placement at `now_ms`: its peers could not reach it at a
    /// rendezvous (see [`GenerationEnd::PeerLost`]).
    pub fn held_unreachable(&self, now_ms: u64) -> bool {
        self.unreachable_until_unix_ms > now_ms
    }

    /// What it is doing at `now_ms`, from the replicated state alone: the one rule behind the
    /// API's worker list, the dashboard and the metrics (a worker reads the same on every node
    /// and in every view). A suspect stays one until the leader records that it heard from it
    /// ([`Command::WorkersHeard`], within a scheduler pass).
    pub fn condition(&self, now_ms: u64) -> WorkerCondition {
        if self.lost_at_unix_ms.is_some() {
            if self.left { WorkerCondition::Left } else { WorkerCondition::Lost }
        } else if self.draining {
            WorkerCondition::Draining
        } else if self.job.is_none() && self.held_unreachable(now_ms) {
            WorkerCondition::Unreachable
        } else if self.suspect_since_unix_ms.is_some() {
            WorkerCondition::Suspect
        } else if self.job.is_some() {
            WorkerCondition::Busy
        } else {
            WorkerCondition::Idle
        }
    }
}

/// What a worker is doing ([`Worker::condition`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerCondition {
    Idle,
    Busy,
    Draining,
    /// Its gang broke without notice and the leader has not heard from it since.
    Suspect,
    /// Held out of placement: its peers could not reach it.
    Unreachable,
    /// Its lease expired: it fell silent (killed, crashed, cut off).
    Lost,
    /// Its agent said it was leaving, with no work held: gone in order.
    Left,
}

impl WorkerCondition {
    pub const ALL: [WorkerCondition; 7] = [
        WorkerCondition::Idle,
        WorkerCondition::Busy,
        WorkerCondition::Draining,
        WorkerCondition::Suspect,
        WorkerCondition::Unreachable,
        WorkerCondition::Lost,
        WorkerCondition::Left,
    ];

    /// The lower-case name the metrics and the dashboard use.
    pub fn name(self) -> &'static str {
        match self {
            WorkerCondition::Idle => "idle",
            WorkerCondition::Busy => "busy",
            WorkerCondition::Draining => "draining",
            WorkerCondition::Suspect => "suspect",
            WorkerCondition::Unreachable => "unreachable",
            WorkerCondition::Lost => "lost",
            WorkerCondition::Left => "left",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    pub id: WorkerId,
    pub info: WorkerInfo,
    pub registered_at_unix_ms: u64,
    /// Set when the worker was gone: the leader declared its lease expired, or it left in
    /// order ([`Worker::left`]). Never given work again (a worker that comes back registers
    /// anew, with a new id).
    pub lost_at_unix_ms: Option<u64>,
    /// It said it was leaving ([`Command::WorkerLeft`]: its agent stopped after its work was
    /// done or handed over) rather than falling silent; `lost_at_unix_ms` says when.
    #[serde(default)]
    pub left: bool,
    /// The job this worker is assigned to, if any.
    #[serde(default)]
    pub job: Option<JobId>,
    /// It received an interruption notice (spot, rebalance, SIGTERM): it finishes its current
    /// generation at a checkpoint and is never given new work (but its own job's next gang, when
    /// it holds that job's state: [`Worker::may_rejoin`]).
    #[serde(default)]
    pub draining: bool,
    /// When the cloud takes its instance, as the notice said (a spot notice's `time`); `None`
    /// without a notice or when the notice named no time. Its gang's deadline to checkpoint.
    #[serde(default)]
    pub notice_action_at_unix_ms: Option<u64>,
    /// Noticed while free, as a member of this waiting job's last gang: it holds that gang's
    /// state in memory (it was not leaving when the gang ended), so the job's next gang may
    /// take it and it hands over to a replacement from there ([`Worker::may_rejoin`]), rather
    /// than the next gang reading the state from the store.
    #[serde(default)]
    pub holding_for: Option<JobId>,
    /// The built-in job whose state its agent may hold in memory ([`HeldState`]).
    #[serde(default)]
    pub held_state: HeldState,
    /// When its first interruption notice came (`None`: none came): a handover it starts when
    /// it rejoins its job's gang is timed from it.
    #[serde(default)]
    pub noticed_at_unix_ms: Option<u64>,
    /// When a gang it belonged to broke without notice. It may have died with it: the
    /// scheduler gives it work again only once the leader has heard from it since (survivors
    /// heartbeat at once; a dead worker never does, until its lease expires).
    #[serde(default)]
    pub suspect_since_unix_ms: Option<u64>,
    /// Until when it is not placed in a gang nor reserved as a replacement: its peers could
    /// not reach it at a rendezvous (0: never). See [`GenerationEnd::PeerLost`].
    #[serde(default)]
    pub unreachable_until_unix_ms: u64,
    /// Holds in a row (each within [`UNREACHABLE_STREAK_GAP_MS`] of the previous one's end):
    /// the next one lasts [`unreachable_hold_ms`] of it.
    #[serde(default)]
    pub unreachable_holds: u32,
    /// SHA-256 (lower-case hex) of the credential the leader issued at registration. The
    /// secret itself is never stored: the worker presents it on every call after registering,
    /// and any node checks it against this digest. Empty: no credential (cannot report).
    #[serde(default)]
    pub credential_sha256: String,
}

/// What a worker's agent holds in memory of a built-in job's state, as far as the log can tell.
/// An agent keeps one: the state its rank stopped with at a gang's end (a stop or a break), or
/// one it received from a peer when a gang resumed; it drops it when that job finishes, and
/// keeps it through a gang of another job that starts fresh and finishes (a job stopped for a
/// higher priority's then resumes from its workers, not from the store). A command job's gang
/// or an inference shard leaves it. A warm spare holding its job's pushed checkpoints is
/// recorded once its heartbeat says so ([`Command::SparesHolding`]). A drop is not recorded
/// (a spare that held a state no gang can take any more): the scheduler's preference may then
/// be wrong, and the gang's exchange finds who holds what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HeldState {
    /// Not recorded (a worker in a snapshot from before STATE_VERSION 8): a job's last gang is
    /// taken at its word.
    #[default]
    Unknown,
    /// Nothing: it never was in a built-in gang that ended, or that job finished.
    Nothing,
    /// This job's (or nothing): a gang of it ended on the worker, or resumed on it from a
    /// checkpoint, or it holds the job's checkpoints as a warm spare, and the job has not
    /// finished since.
    Job(JobId),
}

/// The whole replicated state. Serialised as the Raft snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub next_job_id: u64,
    pub next_worker_id: u64,
    pub jobs: BTreeMap<JobId, Job>,
    /// client_request_id -> job, so a retried submission returns the job it created.
    pub request_ids: BTreeMap<String, JobId>,
    pub workers: BTreeMap<WorkerId, Worker>,
    /// Capacity the autoscaler asked a provider for, by request id (= the launch's client
    /// token): recorded *before* the launch, so a new leader repeats an unfinished one with the
    /// same token instead of deciding anew.
    #[serde(default)]
    pub instance_requests: BTreeMap<String, InstanceRequest>,
    /// Instances launched for those requests, by instance id (kept after termination for cost).
    #[serde(default)]
    pub instances: BTreeMap<String, InstanceRecord>,
    /// The model registry: trained models by name, their versions and aliases.
    #[serde(default)]
    pub models: BTreeMap<String, Model>,
    /// Batch-inference jobs (ids share the jobs' counter and request ids).
    #[serde(default)]
    pub inferences: BTreeMap<JobId, super::inference::InferenceJob>,
    /// The jobs that may be running (see [`RunningIndex`]); not replicated, rebuilt on restore.
    #[serde(skip)]
    pub running: RunningIndex,
}

/// An index of the running jobs, so that the leader's periodic passes (scheduler, the workers'
/// heartbeats) read them without scanning every job held: with thousands of jobs queued, each
/// scan held the Raft thread for a millisecond or more, 20+ times a second. A superset: a job
/// enters when it starts running ([`RunningIndex::started`], pruned of the jobs no longer running
/// then), so it may still name jobs that have stopped since; [`State::running_jobs`] filters
/// them. Derived data: not part of the state's value (always equal), not serialised.
#[derive(Debug, Clone, Default)]
pub struct RunningIndex(pub(crate) std::collections::BTreeSet<JobId>);

impl PartialEq for RunningIndex {
    fn eq(&self, _other: &RunningIndex) -> bool {
        true
    }
}

impl RunningIndex {
    /// `job` started running; the jobs of `jobs` that no longer run leave the index.
    pub(crate) fn started(&mut self, job: JobId, jobs: &BTreeMap<JobId, Job>) {
        self.0.retain(|id| jobs.get(id).is_some_and(|j| j.state == JobState::Running));
        self.0.insert(job);
    }

    /// The index of `jobs` as they are (a restored snapshot).
    fn of(jobs: &BTreeMap<JobId, Job>) -> RunningIndex {
        RunningIndex(jobs.values().filter(|j| j.state == JobState::Running).map(|j| j.id).collect())
    }
}

impl Default for State {
    fn default() -> Self {
        State {
            version: STATE_VERSION,
            next_job_id: 1,
            next_worker_id: 1,
            jobs: BTreeMap::new(),
            request_ids: BTreeMap::new(),
            workers: BTreeMap::new(),
            instance_requests: BTreeMap::new(),
            instances: BTreeMap::new(),
            models: BTreeMap::new(),
            inferences: BTreeMap::new(),
            running: RunningIndex::default(),
        }
    }
}

/// The states users see of jobs read together ([`State::shown_states`]).
pub struct ShownStates {
    provisioning: std::collections::BTreeSet<JobId>,
}

impl ShownStates {
    /// `job`'s state as users see it ([`Job::shown_state`]).
    pub fn of(&self, job: &Job) -> JobState {
        job.shown_state(self.provisioning.contains(&job.id))
    }
}

impl State {
    /// The waiting job whose next gang may take `worker` at `now_ms` though it is draining
    /// ([`Worker::may_rejoin`]): it idles for it meanwhile instead of being drained, and
    /// `flotilla workers` names the job.
    pub fn rejoins(&self, worker: &Worker, now_ms: u64) -> Option<JobId> {
        worker.holding_for.filter(|job| {
            self.jobs.get(job).is_some_and(|j| j.state == JobState::Pending) && worker.may_rejoin(*job, now_ms)
        })
    }

    /// The state users see of one job ([`Job::shown_state`]); the instances are read only
    /// for a job that waits to start.
    pub fn shown_state(&self, job: &Job) -> JobState {
        let waits_to_start = job.state == JobState::Pending && job.generation == 0;
        job.shown_state(waits_to_start && self.provisioning_jobs().contains(&job.id))
    }

    /// The states users see of many jobs, with the instances read once ([`ShownStates::of`]).
    pub fn shown_states(&self) -> ShownStates {
        ShownStates { provisioning: self.provisioning_jobs() }
    }

    /// The jobs instances are on their way for (shown `Provisioning` while they wait:
    /// [`Job::shown_state`]): a launch request recorded for the job and not answered yet, or
    /// an instance launched for it, not terminated, on which no worker has registered. (An
    /// instance that never registers is terminated by the autoscaler as a no-show.)
    fn provisioning_jobs(&self) -> std::collections::BTreeSet<JobId> {
        let registered: std::collections::BTreeSet<&str> =
            self.workers.values().map(|w| w.info.instance_id.as_str()).collect();
        let requested = self.instance_requests.values().filter(|r| r.state == RequestState::Requested);
        let booting = self
            .instances
            .values()
            .filter(|i| i.terminated_at_unix_ms.is_none() && !registered.contains(i.id.as_str()))
            .filter_map(|i| self.instance_requests.get(&i.request_id));
        requested.chain(booting).filter_map(|r| r.job).collect()
    }

    /// The running training jobs, by id, without scanning every job held (see [`RunningIndex`]).
    pub fn running_jobs(&self) -> impl Iterator<Item = &Job> {
        debug_assert_eq!(
            self.running.0.iter().filter(|id| self.jobs.get(id).is_some_and(|j| j.state == JobState::Running)).count(),
            self.jobs.values().filter(|j| j.state == JobState::Running).count(),
            "every running job is in the running index"
        );
        self.running.0.iter().filter_map(|id| self.jobs.get(id)).filter(|j| j.state == JobState::Running)
    }
}

/// Models in the registry at most, and versions per model.
pub const MODELS_MAX: usize = 10_000;
pub const MODEL_VERSIONS_MAX: usize = 10_000;
/// Aliases per model at most.
pub const MODEL_ALIASES_MAX: usize = 64;

/// A registered model: its versions (1, 2, ...) and aliases (`production` -> 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Model {
    pub name: String,
    pub versions: Vec<ModelVersion>,
    pub aliases: BTreeMap<String, u32>,
}

/// One trained model with its lineage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    pub version: u32,
    pub job_id: JobId,
    /// The job's final checkpoint (the exact training state the model came from).
    pub checkpoint: Option<CheckpointRecord>,
    /// Hex SHA-256 of the training data's content.
    pub dataset_sha256: String,
    /// The safetensors file.
    pub artifact_uri: String,
    /// The job's spec: model, data, hyper-parameters.
    pub spec: JobSpec,
    pub metrics: Option<FinalMetrics>,
    pub preemptions: u32,
    pub recoveries: u32,
    pub steps_lost: u64,
    pub cost_usd: f64,
    pub created_at_unix_ms: u64,
    /// What the model takes and gives (zero for versions registered before it was recorded).
    #[serde(default)]
    pub shape: ModelShape,
}

/// A model's inputs and outputs: `features_per_row` values, divided by `feature_scale` as the
/// training data was, give scores for `classes` classes.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ModelShape {
    pub features_per_row: u32,
    pub classes: u32,
    pub feature_scale: f32,
}

/// Classes a registered model may have: the workers' label cap (labels lie in 0..1000).
/// Summaries allocate one counter per class, so a reported shape is bounded before it is stored.
pub const MODEL_CLASSES_MAX: u32 = 1_000;
/// Features per row a registered model may take: the workers' data limit.
pub const MODEL_FEATURES_MAX: u32 = 100_000;

impl ModelShape {
    /// Why a reported shape cannot be a model's (the field, the value, the limit).
    /// No shape: what a command job's artifact (its newest checkpoint) reports.
    pub fn is_none(&self) -> bool {
        *self == ModelShape::default()
    }

    pub fn check(&self) -> Result<(), String> {
        if !(1..=MODEL_FEATURES_MAX).contains(&self.features_per_row) {
            return Err(format!("features_per_row is {}; 1 to {MODEL_FEATURES_MAX}", self.features_per_row));
        }
        if !(2..=MODEL_CLASSES_MAX).contains(&self.classes) {
            return Err(format!("classes is {}; 2 to {MODEL_CLASSES_MAX}", self.classes));
        }
        if !(self.feature_scale.is_finite() && self.feature_scale > 0.0) {
            return Err(format!("feature_scale is {}; a positive number", self.feature_scale));
        }
        Ok(())
    }
}

/// What a successful rank 0 exported for the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelArtifact {
    pub artifact_uri: String,
    pub dataset_sha256: String,
    #[serde(default)]
    pub shape: ModelShape,
}

/// Why a model reference does not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelRefError {
    #[error("no model named `{0}` (see `flotilla models list`)")]
    NoModel(String),
    #[error("model `{name}` has no version {version} (it has 1 to {latest})")]
    NoVersion { name: String, version: u32, latest: u32 },
    #[error("model `{name}` has no alias `{alias}` (aliases: {known})")]
    NoAlias { name: String, alias: String, known: String },
}

impl State {
    /// The checkpoints registered model versions name as their source (lineage: `models show`
    /// prints it): retention keeps them, also once a job trained further has newer ones.
    pub fn registered_checkpoints(&self) -> std::collections::HashSet<(JobId, &str)> {
        let versions = self.models.values().flat_map(|m| &m.versions);
        versions.filter_map(|v| v.checkpoint.as_ref().map(|c| (v.job_id, c.uri.as_str()))).collect()
    }

    /// Per job, retention's work now ([`Job::retention_plan`]): the checkpoints to mark for
    /// deletion, but for those a registered model version names as its source (they stay beyond
    /// `checkpoint.keep`: a job trained further after it succeeded has newer ones), and the
    /// marked ones whose objects go. Jobs with neither are left out.
    pub fn retention_plans(&self) -> Vec<(JobId, Vec<String>, Vec<String>)> {
        let registered = self.registered_checkpoints();
        let mut plans = Vec::new();
        for job in self.jobs.values() {
            let (mark, remove) = job.retention_plan();
            let mark: Vec<String> =
                mark.into_iter().filter(|uri| !registered.contains(&(job.id, uri.as_str()))).collect();
            if !mark.is_empty() || !remove.is_empty() {
                plans.push((job.id, mark, remove));
            }
        }
        plans
    }

    /// Resolves `NAME` (its newest version), `NAME@VERSION` or `NAME@ALIAS`.
    pub fn resolve_model(&self, reference: &str) -> Result<(&Model, &ModelVersion), ModelRefError> {
        let (name, selector) = match reference.split_once('@') {
            Some((name, selector)) => (name, Some(selector)),
            None => (reference, None),
        };
        let model = self.models.get(name).ok_or_else(|| ModelRefError::NoModel(name.to_string()))?;
        let latest = model.versions.last().map_or(0, |v| v.version);
        let version = match selector {
            None => latest,
            Some(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().unwrap_or(u32::MAX),
            Some(alias) => *model.aliases.get(alias).ok_or_else(|| ModelRefError::NoAlias {
                name: name.to_string(),
                alias: alias.to_string(),
                known: if model.aliases.is_empty() {
                    "none".to_string()
                } else {
                    model.aliases.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            })?,
        };
        let found = model.versions.iter().find(|v| v.version == version);
        found.map(|v| (model, v)).ok_or(ModelRefError::NoVersion { name: name.to_string(), version, latest })
    }
}

/// Instance requests kept at most (finished ones are dropped oldest first beyond it).
pub const INSTANCE_REQUESTS_MAX: usize = 10_000;
/// Instance records kept at most (terminated ones are dropped oldest first beyond it).
pub const INSTANCES_MAX: usize = 50_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestState {
    /// Recorded; the launch may or may not have happened yet.
    Requested,
    Launched,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRequest {
    pub request_id: String,
    /// The job it was bought for (it gets the instances first), if any.
    pub job: Option<JobId>,
    pub instance_type: String,
    pub zone: String,
    pub spot: bool,
    pub count: u32,
    pub usd_per_hour: f64,
    pub requested_at_unix_ms: u64,
    pub state: RequestState,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    pub request_id: String,
    pub instance_type: String,
    pub zone: String,
    pub spot: bool,
    /// The price at launch, USD per hour: what the instance is charged at.
    pub usd_per_hour: f64,
    pub launched_at_unix_ms: u64,
    pub terminated_at_unix_ms: Option<u64>,
}

impl InstanceRecord {
    /// What it has cost until `now_unix_ms` (or its termination).
    pub fn cost_usd(&self, now_unix_ms: u64) -> f64 {
        let end = self.terminated_at_unix_ms.unwrap_or(now_unix_ms);
        self.usd_per_hour * end.saturating_sub(self.launched_at_unix_ms) as f64 / 3_600_000.0
    }
}

/// An instance a provider reported launched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchedInstance {
    pub id: String,
    pub zone: String,
    pub spot: bool,
}

/// Errors of snapshot encoding and decoding.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot is not valid: {0}")]
    Decode(String),
    #[error("snapshot version {found} is newer than this build understands ({STATE_VERSION}); upgrade this node")]
    TooNew { found: u32 },
    /// A command holds a value JSON cannot carry (a non-finite number where one is required):
    /// it would be committed and then fail to decode on every replica.
    #[error("the command cannot be logged: {0}")]
    Unrepresentable(String),
}

impl State {
    pub fn to_snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the state holds only JSON-representable values")
    }

    pub fn from_snapshot(bytes: &[u8]) -> Result<State, SnapshotError> {
        if bytes.is_empty() {
            return Ok(State::default());
        }
        let mut state: State = serde_json::from_slice(bytes).map_err(|e| SnapshotError::Decode(e.to_string()))?;
        if state.version > STATE_VERSION {
            return Err(SnapshotError::TooNew { found: state.version });
        }
        // This build's state from now on: its next snapshot says so (an older node refuses it).
        state.version = STATE_VERSION;
        state.running = RunningIndex::of(&state.jobs);
        Ok(state)
    }
}

/// What a node proposes: a versioned command with the leader's clock reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub version: u32,
    /// Stamped by the proposing leader; the only source of time in the state machine.
    pub at_unix_ms: u64,
    pub command: Command,
}

impl Envelope {
    pub fn new(at_unix_ms: u64, command: Command) -> Envelope {
        Envelope { version: STATE_VERSION, at_unix_ms, command }
    }

    /// The log entry for this envelope, checked to decode again: an entry no replica can
    /// decode must never be committed (every replica would stop at it).
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        Ok(self.encode_checked()?.0)
    }

    /// [`Envelope::encode`], with the envelope its bytes decode to: what every replica applies
    /// (the proposer can apply it without decoding the entry again).
    pub fn encode_checked(&self) -> Result<(Vec<u8>, Envelope), SnapshotError> {
        let bytes = serde_json::to_vec(self).map_err(|e| SnapshotError::Unrepresentable(e.to_string()))?;
        let decoded = Envelope::decode(&bytes).map_err(|e| SnapshotError::Unrepresentable(e.to_string()))?;
        Ok((bytes, decoded))
    }

    pub fn decode(bytes: &[u8]) -> Result<Envelope, SnapshotError> {
        let envelope: Envelope = serde_json::from_slice(bytes).map_err(|e| SnapshotError::Decode(e.to_string()))?;
        if envelope.version > STATE_VERSION {
            return Err(SnapshotError::TooNew { found: envelope.version });
        }
        Ok(envelope)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Command {
    SubmitJob {
        spec: Box<JobSpec>,
        client_request_id: String,
    },
    CancelJob {
        job_id: JobId,
        reason: String,
    },
    /// A Failed or Cancelled training job waits for workers again, to resume from its newest
    /// checkpoint (from the start without one), with `spec` instead of its own where given (it
    /// may change only [`crate::spec::RESUMABLE_FIELDS`]); its failures count from 0 again.
    ResumeJob {
        job_id: JobId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        spec: Option<Box<JobSpec>>,
    },
    RegisterWorker {
        info: WorkerInfo,
        /// The digest of the credential the leader issued (see [`Worker::credential_sha256`]).
        #[serde(default)]
        credential_sha256: String,
    },
    WorkerLost {
        worker_id: WorkerId,
        /// The last training step the leader heard of from the worker's job (live progress),
        /// for `steps_lost` when nobody else reports how far the generation got.
        #[serde(default)]
        last_step_seen: u64,
        /// When the leader last heard from it (its clock; 0: not in this leadership), which is
        /// when its gang's recovery starts (see [`JobEvent::since_unix_ms`]).
        #[serde(default, skip_serializing_if = "is_zero")]
        last_heard_unix_ms: u64,
    },
    /// The worker's agent is stopping, its work done or handed over: it is gone from now on,
    /// without waiting for its lease to expire. Refused while it still holds a job (it then
    /// leaves once the job releases it, or its lease expires as for any silent worker).
    WorkerLeft {
        worker_id: WorkerId,
    },
    /// The survivors of a member lost silently ([`Job::member_lost`]) did not report within
    /// [`MEMBER_LOST_REPORT_WAIT_MS`]: the generation ends, to resume from the newest checkpoint.
    GangLost {
        job_id: JobId,
        generation: u64,
    },
    /// A worker got an interruption notice (`kind`: spot, rebalance, sigterm): it drains, and
    /// its gang is told to checkpoint at the next step boundary.
    WorkerInterrupted {
        worker_id: WorkerId,
        kind: String,
        /// When the instance will be taken, if the notice said.
        #[serde(default)]
        action_at_unix_ms: Option<u64>,
    },
    /// The leader asks a running generation to checkpoint and stop (elastic growth).
    RequestCheckpoint {
        job_id: JobId,
        generation: u64,
        reason: StopReason,
    },
    /// The leader found a free worker to replace a noticed member of a running generation
    /// (the job's `handover`): it is reserved and prepares while the gang trains on.
    HandoverTo {
        job_id: JobId,
        generation: u64,
        replacement: WorkerId,
    },
    /// The reserved replacement is ready (it reported the job prepared, or the leader stopped
    /// waiting for it): the gang checkpoints at the next step and hands over. `live` (the
    /// leader's choice: one handover of a built-in job, live handovers on): instead, the gang
    /// trains on while the leaving member streams its state to the replacement, which takes
    /// the rank without a stop ([`Command::HandoverSwapped`]). A live handover under way that
    /// gets `live = false` falls back to the stop.
    HandoverReady {
        job_id: JobId,
        generation: u64,
        #[serde(default)]
        live: bool,
    },
    /// A live handover's replacement took the leaving member's rank after `step`: the gang
    /// swapped the member at that step boundary without stopping (same generation).
    HandoverSwapped {
        job_id: JobId,
        generation: u64,
        replacement: WorkerId,
        step: u64,
        /// Bytes the transfer moved peer to peer (the state and the updates replayed).
        #[serde(default)]
        peer_bytes: u64,
    },
    /// A live handover under way failed, said by its leaving member or its replacement (`by`):
    /// the transfer could not reach the replacement or was refused, or the replacement fell
    /// behind the gang. The gang falls back to the stop at once, with the same replacement (as
    /// [`Command::HandoverReady`] with `live = false`, instead of when the leader stops
    /// waiting for the swap); `reason` goes to the job's events.
    LiveHandoverFailed {
        job_id: JobId,
        generation: u64,
        by: WorkerId,
        reason: String,
    },
    /// A surviving rank timed the live swap after `step` on its own clock: its longest time
    /// without an optimizer step around it (the swap's stall, recorded once per swap).
    LiveSwapTimed {
        job_id: JobId,
        generation: u64,
        step: u64,
        stall_ms: u64,
    },
    /// The leader saw the first step of `generation`, which followed a stop: the job went
    /// `stall_ms` without training (from the stop for a handover, from the notice or loss
    /// otherwise). Recorded once per generation, for the job's status and events.
    TrainingResumed {
        job_id: JobId,
        generation: u64,
        stall_ms: u64,
        handover: bool,
        /// Set when the generation followed a planned stop (grow, priority, deadline; see
        /// [`JobEvent::planned_stop`]): its time without a step is a regroup or a wait, not an
        /// interruption, so only the event and the bytes are recorded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stopped_for: Option<StopReason>,
        /// The generation before stopped because the store was out (after training): the
        /// stall runs from that stop (see [`JobEvent::stopped_by_outage`]).
        #[serde(default)]
        outage: bool,
        /// Bytes the start moved across the gang, peer to peer and from the store.
        #[serde(default)]
        peer_bytes: u64,
        #[serde(default)]
        storage_bytes: u64,
    },
    /// The leader's scheduler found that `for_job`, waiting, can have its gang only if running
    /// jobs of lower priority stop: this one checkpoints at the next step and waits, as after
    /// any stop (see `flotilla_core::scheduler::schedule_preempting`).
    PreemptForPriority {
        job_id: JobId,
        generation: u64,
        for_job: JobId,
    },
    /// The leader found the job out of slack for its deadline: it runs on on-demand capacity
    /// from now on; a generation running on spot workers checkpoints and stops to move.
    MoveToOnDemand {
        job_id: JobId,
        /// Why, for the job's events (the remaining work and the time left).
        reason: String,
    },
    /// A generation ended without finishing the job; `step` is the last step it completed.
    GenerationEnded {
        job_id: JobId,
        generation: u64,
        end: GenerationEnd,
        step: u64,
        /// The authenticated worker that reported it (a member of the gang); `None` when the
        /// leader itself proposes it.
        #[serde(default)]
        reporter: Option<WorkerId>,
        /// With `Checkpointed`: the stop step's checkpoint, announced while its writer (the
        /// reporter) still saves it; recorded as pending (see [`CheckpointRecord::pending`]).
        /// With `PeerLost`: the same for the state a survivor holds of the step it reached.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        announced: Option<CheckpointRecord>,
    },
    /// Retention: the checkpoint at `uri` will be deleted (first step of the crash-safe
    /// deletion: from now on it is never resumed from).
    CheckpointDeleting {
        job_id: JobId,
        uri: String,
    },
    /// Its objects are gone: drop the record (last step).
    CheckpointDeleted {
        job_id: JobId,
        uri: String,
    },
    /// The scheduler placed a pending job on these idle workers (rank order).
    AssignGang {
        job_id: JobId,
        workers: Vec<WorkerId>,
    },
    /// A gang member wrote a complete checkpoint; a new generation may resume from it.
    RecordCheckpoint {
        job_id: JobId,
        checkpoint: CheckpointRecord,
        /// The authenticated worker that reported it (a member of the gang).
        #[serde(default)]
        reporter: Option<WorkerId>,
    },
    /// The autoscaler decided to buy capacity (recorded before the provider is called).
    RequestInstances {
        request_id: String,
        job: Option<JobId>,
        instance_type: String,
        zone: String,
        spot: bool,
        count: u32,
        usd_per_hour: f64,
    },
    /// The provider launched these for the request.
    InstancesLaunched {
        request_id: String,
        instances: Vec<LaunchedInstance>,
    },
    /// The provider refused the request (`capacity`: no capacity of that kind now).
    LaunchFailed {
        request_id: String,
        reason: String,
        capacity: bool,
    },
    /// These instances are gone (terminated by us, or taken back by the cloud).
    InstancesTerminated {
        ids: Vec<String>,
    },
    /// The autoscaler terminated these instances because no worker registered from them in
    /// time (a broken image or boot script, or no route to the coordinators): as
    /// `InstancesTerminated`, plus an event on the job each was bought for.
    InstancesNoShow {
        ids: Vec<String>,
    },
    /// The scheduler's explanation of why a pending job waits (proposed only when it changes).
    /// Logs written before `SetPendingReasons` still hold it.
    SetPendingReason {
        job_id: JobId,
        reason: String,
    },
    /// The leader heard from these suspect workers (id, the `suspect_since_unix_ms` it saw)
    /// after their gang broke: they are alive, and no longer suspect (so they may replace a
    /// noticed member or be a warm spare again). A worker suspected again since is left so.
    WorkersHeard {
        workers: Vec<(WorkerId, u64)>,
    },
    /// Free workers that said in their heartbeat they hold this running job's state, pushed to
    /// them as its warm spares (at most [`WORKERS_HEARD_PER_COMMAND_MAX`]): their
    /// [`Worker::held_state`] becomes that job, so they stay its spares ([`crate::state::warm_spares`])
    /// and its next gang takes them first. A worker busy since, or a job not running, is skipped.
    SparesHolding {
        workers: Vec<(WorkerId, JobId)>,
    },
    /// Every pending reason one scheduler pass changed, in one entry (one raft round and one
    /// fsync per pass, not per job). Jobs no longer pending are skipped.
    SetPendingReasons {
        reasons: Vec<(JobId, String)>,
    },
    /// Rank 0 of generation `generation` reports the end of training; a successful job with
    /// an `artifact` is registered as a new version of `output.register_as`.
    JobFinished {
        job_id: JobId,
        generation: u64,
        success: bool,
        reason: String,
        step: u64,
        metrics: Option<FinalMetrics>,
        #[serde(default)]
        artifact: Option<ModelArtifact>,
        /// The authenticated worker that reported it (a member of the gang).
        #[serde(default)]
        reporter: Option<WorkerId>,
    },
    /// Points `alias` of model `name` at `version`.
    SetModelAlias {
        name: String,
        version: u32,
        alias: String,
    },
    /// A batch-inference job (the leader counted the input's rows).
    SubmitInference {
        request: Box<super::inference::InferenceRequest>,
        client_request_id: String,
    },
    /// The scheduler gives an inference job these idle workers.
    JoinInference {
        job_id: JobId,
        workers: Vec<WorkerId>,
    },
    /// A training gang waits for this inference job's workers: each member goes back to idle
    /// when it next asks for a shard (the shard it holds is finished and committed first, so
    /// nothing is lost); idle workers left once the gang is placed join it again.
    YieldInference {
        job_id: JobId,
    },
    /// A member asks for the next shard.
    LeaseShard {
        job_id: JobId,
        worker_id: WorkerId,
    },
    /// A member wrote `object` for the shard's `attempt`.
    CommitShard {
        job_id: JobId,
        worker_id: WorkerId,
        index: u32,
        attempt: u64,
        object: String,
        stats: super::inference::ShardStats,
    },
    /// A member could not process the shard, or (`release`) the leader gave up its lease.
    FailShard {
        job_id: JobId,
        worker_id: WorkerId,
        index: u32,
        attempt: u64,
        error: String,
        #[serde(default)]
        release: bool,
    },
    /// The leader finalized the output (or could not).
    InferenceFinished {
        job_id: JobId,
        success: bool,
        reason: String,
    },
    /// Record retention: forget finished jobs and inference jobs last updated before
    /// `before_unix_ms` (with their request ids), and workers lost before it. Their objects in
    /// the store stay (a model version's source checkpoint may be among them).
    ForgetFinished {
        before_unix_ms: u64,
    },
}

/// The outcome of an applied command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// `duplicate`: the request id had already created this job.
    JobSubmitted {
        job_id: JobId,
        duplicate: bool,
    },
    JobCancelled {
        job_id: JobId,
    },
    /// The job waits for workers again; its next generation starts at `from_step`.
    JobResumed {
        job_id: JobId,
        from_step: u64,
    },
    WorkerRegistered {
        worker_id: WorkerId,
    },
    WorkerLost {
        worker_id: WorkerId,
    },
    WorkerLeft {
        worker_id: WorkerId,
    },
    GangAssigned {
        job_id: JobId,
        generation: u64,
    },
    JobFinished {
        job_id: JobId,
    },
    ReasonSet {
        job_id: JobId,
    },
    /// `set` of the batch's jobs were still pending and took their reason.
    ReasonsSet {
        set: usize,
    },
    /// `cleared` of the workers heard from were no longer suspect.
    WorkersHeard {
        cleared: usize,
    },
    /// `set` of the workers named now hold their job's state, as far as the log tells.
    SparesHolding {
        set: usize,
    },
    CheckpointRecorded {
        job_id: JobId,
        step: u64,
    },
    /// Records forgotten by retention (jobs and inference jobs, workers).
    Forgotten {
        jobs: usize,
        workers: usize,
    },
    /// `job`: the job whose gang must checkpoint now (if the worker was training);
    /// `handover_until`: instead, it trains on while a replacement is sought, until then at most.
    WorkerInterrupted {
        worker_id: WorkerId,
        job: Option<JobId>,
        /// A handover with a deadline: the member trains on until then at most.
        handover_until: Option<u64>,
        /// A handover without a deadline (a rebalance recommendation): the member trains on
        /// until the gang is told to stop.
        advisory: bool,
    },
    /// `recorded`: false when the generation's stall was already recorded.
    TrainingResumed {
        job_id: JobId,
        recorded: bool,
    },
    /// A replacement is reserved for the job's handover; it prepares while the gang trains.
    ReplacementReserved {
        job_id: JobId,
        replacement: WorkerId,
    },
    /// The gang checkpoints at the next step and hands over to `replacement` (or, `live`,
    /// streams the leaving member's state to it while training on).
    HandoverStarted {
        job_id: JobId,
        replacement: WorkerId,
        live: bool,
    },
    /// `leaving` left the gang and `replacement` holds its rank (`None`: the swap was
    /// recorded already, a retried report).
    HandoverSwapped {
        job_id: JobId,
        leaving: Option<WorkerId>,
    },
    CheckpointRequested {
        job_id: JobId,
    },
    /// `checkpoint`: its running generation, on spot, was asked to checkpoint and move.
    MovedToOnDemand {
        job_id: JobId,
        checkpoint: bool,
    },
    /// `state`: where the job went (Pending for a new generation, or Failed).
    GenerationEnded {
        job_id: JobId,
        state: JobState,
    },
    CheckpointDeletionChanged {
        job_id: JobId,
    },
    InstancesChanged,
    ModelChanged {
        name: String,
        version: u32,
    },
    InferenceChanged {
        job_id: JobId,
    },
    /// `released`: no shard is left for the worker; it is idle again.
    ShardLeased {
        lease: Option<super::inference::ShardLease>,
        released: bool,
    },
    /// `complete`: every shard of the job is committed.
    ShardCommitted {
        job_id: JobId,
        complete: bool,
    },
}

/// Why a command changed nothing. Every node rejects the same commands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("{0} does not exist")]
    JobNotFound(JobId),
    #[error("{0} does not exist")]
    WorkerNotFound(WorkerId),
    #[error("{job_id} is already {state}; only unfinished jobs can be cancelled")]
    JobFinished { job_id: JobId, state: &'static str },
    #[error("{job_id} is {state}; {why}")]
    NotResumable { job_id: JobId, state: &'static str, why: &'static str },
    /// A resume's spec changes what it may not, or cannot run as it stands (budget, length).
    #[error("{job_id} cannot resume: {reason}")]
    BadResume { job_id: JobId, reason: String },
    /// `train.init_from` names weights a job cannot start from.
    #[error("train.init_from = {reference}: {reason}")]
    BadInit { reference: String, reason: String },
    #[error(
        "the cluster holds {limit} unfinished jobs, its limit (finished ones make room by themselves); cancel \
         some or wait for them to finish"
    )]
    TooManyJobs { limit: usize },
    #[error("{limit} instance requests are outstanding, the limit; another is made once one is settled")]
    TooManyInstanceRequests { limit: usize },
    #[error("the cluster has {limit} workers registered, its limit")]
    TooManyWorkers { limit: usize },
    #[error("client_request_id must be 1 to {CLIENT_REQUEST_ID_LEN_MAX} bytes")]
    BadRequestId,
    #[error("{job_id} is {state}; only Pending jobs can be assigned")]
    NotPending { job_id: JobId, state: &'static str },
    #[error("{0} is lost or already busy")]
    WorkerUnavailable(WorkerId),
    #[error("{worker} still holds {job_id}; it leaves once the job releases it")]
    StillAssigned { worker: WorkerId, job_id: JobId },
    #[error("{job_id} is in generation {current}, the report is for {reported}")]
    StaleGeneration { job_id: JobId, current: u64, reported: u64 },
    /// A checkpoint no newer than the job's newest recorded one (a stop's announced checkpoint
    /// of the same step, written by another path, was recorded first).
    #[error("{job_id} has a recorded checkpoint of step {latest} already; this one is of step {step}, not newer")]
    NotNewer { job_id: JobId, step: u64, latest: u64 },
    #[error("a gang needs 1 to {limit} distinct workers")]
    BadGang { limit: usize },
    #[error("{job_id} is {state}; only a Running generation can end or be asked to checkpoint")]
    NotRunning { job_id: JobId, state: &'static str },
    #[error(transparent)]
    Model(#[from] ModelRefError),
    #[error("alias `{0}`: 1 to 63 characters of a-z, 0-9, `-`, `_`, not only digits")]
    BadAlias(String),
    #[error("model `{name}` has {limit} aliases, its limit")]
    TooManyAliases { name: String, limit: usize },
    #[error("instance request `{0}` is not outstanding (unknown, or already settled)")]
    RequestNotOutstanding(String),
    #[error("instance request `{0}` already exists")]
    DuplicateRequest(String),
    #[error("{job_id}'s checkpoint at {uri} was announced with another step or manifest; it is not confirmed")]
    CheckpointMismatch { job_id: JobId, uri: String },
    #[error(
        "{job_id} has no checkpoint at {uri} that retention may delete (the newest usable one is kept, and those a \
         registered model version names)"
    )]
    CheckpointNotDeletable { job_id: JobId, uri: String },
    #[error("inference: {0}")]
    BadInference(String),
    #[error("{job_id} has no shard {index}")]
    NoShard { job_id: JobId, index: u32 },
    #[error("shard {index} of {job_id} is already committed (attempt {attempt})")]
    ShardDone { job_id: JobId, index: u32, attempt: u64 },
    #[error("shard {index}: {reason}")]
    BadShardReport { index: u32, reason: String },
    /// A worker reported for a job (or shard) that is not its own.
    #[error("{worker} is not a member of {job_id}'s gang; a worker reports only for its own job")]
    NotAMember { worker: WorkerId, job_id: JobId },
    #[error("{job_id} has no handover waiting for a replacement")]
    NoHandover { job_id: JobId },
    /// A worker's report carries a value outside its bounds.
    #[error("bad report: {0}")]
    BadReport(String),
    #[error("{job_id} (priority {priority}) may not be stopped for {for_job} (priority {for_priority}): not lower")]
    PriorityNotLower { job_id: JobId, priority: i32, for_job: JobId, for_priority: i32 },
}
