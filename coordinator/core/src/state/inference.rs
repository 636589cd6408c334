//! Batch inference in the state machine: an inference job is a model version, an input of
//! `rows` rows split into shards (row ranges), and an output prefix.
//!
//! ```text
//!   SubmitInference ─▶ shards planned (Pending) ─▶ JoinInference (idle workers become members)
//!   member: LeaseShard ─▶ Leased{worker, attempt} ─▶ writes its attempt object ─▶ CommitShard
//!        ─▶ Done{attempt, object, stats}      (the first commit of a shard wins; later ones
//!                                             are refused, their objects are never promoted)
//!   member lost ─▶ its leased shards go back to Pending (another member retries them)
//!   FailShard ─▶ Pending again; the SHARD_FAILURES_MAX-th failure of one shard fails the job
//!   every shard Done ─▶ the leader promotes the committed objects, writes the summary
//!        ─▶ InferenceFinished
//! ```
//!
//! A member asking for work when none is pending is released (back to idle); if a shard comes
//! back later, the scheduler lets an idle worker join again.

use serde::{Deserialize, Serialize};

use super::types::*;
use crate::ids::{JobId, WorkerId};
use crate::spec::ModelSpec;

/// Shards per inference job at most (bounds the state: ~200 bytes a shard).
pub const INFERENCE_SHARDS_MAX: usize = 10_000;
/// Rows per shard at most when the coordinator chooses (a shard is one lease: small enough
/// that a lost one costs little).
pub const SHARD_ROWS_DEFAULT_MAX: u64 = 50_000;
/// Shards per worker the coordinator aims for (so a slow or lost worker is balanced out).
pub const SHARDS_PER_WORKER: u64 = 4;
/// Failures of one shard after which the job fails.
pub const SHARD_FAILURES_MAX: u32 = 3;
/// Workers of one inference job at most.
pub const INFERENCE_WORKERS_MAX: u32 = 1024;
/// Rows per forward pass at most, and the default.
pub const INFERENCE_BATCH_MAX: u32 = 65_536;
pub const INFERENCE_BATCH_DEFAULT: u32 = 256;
/// A lease is given up (the attempt fails and its worker is released) after this many times
/// the longest lease-to-commit time seen in the job, and never before the minimum; before any
/// commit (model loading included), after the first-shard limit.
pub const LEASE_TIMEOUT_FACTOR: u64 = 10;
pub const LEASE_TIMEOUT_MIN_MS: u64 = 60_000;
pub const LEASE_TIMEOUT_FIRST_MS: u64 = 600_000;
/// Rows in one inference input at most.
pub const INFERENCE_ROWS_MAX: u64 = 1_000_000_000;
/// Longest input or output URI, and longest object name, in bytes.
pub const INFERENCE_URI_LEN_MAX: usize = 1024;

/// What a user asked for, with what the leader learnt from the input (its rows).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceRequest {
    /// The model's name and the version the reference resolved to at submission.
    pub model: String,
    pub version: u32,
    pub input_uri: String,
    pub output_uri: String,
    pub workers: u32,
    /// 0: [`INFERENCE_BATCH_DEFAULT`].
    pub batch_size: u32,
    /// 0: chosen by [`plan_shards`].
    pub shard_rows: u64,
    /// Data rows in the input (counted by the leader).
    pub rows: u64,
    /// Rows carry a leading label (one column more than the model's features).
    pub labelled: bool,
    /// The input's size in bytes when it was counted: workers refuse an input that changed
    /// since (row ids would shift). 0: not checked.
    #[serde(default)]
    pub input_bytes: u64,
    /// Byte offsets in the input of each shard's first data row, then the input's size
    /// (shards + 1 values), so a worker fetches only its shard's bytes (a range GET). Empty:
    /// workers fetch the whole input (gzip, which cannot be read from the middle).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shard_byte_offsets: Vec<u64>,
}

/// What a shard's attempt found.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ShardStats {
    pub rows: u64,
    pub labelled_rows: u64,
    pub correct: u64,
    /// Predicted rows per class.
    pub class_counts: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state")]
pub enum ShardState {
    Pending,
    Leased {
        worker: WorkerId,
        attempt: u64,
        since_unix_ms: u64,
    },
    /// Committed: `object` holds the attempt's output; the leader promotes it at the end.
    Done {
        attempt: u64,
        object: String,
        stats: ShardStats,
        worker: WorkerId,
        /// From lease to commit, when the committing attempt held the lease (0 otherwise):
        /// what the lease timeout is sized from.
        #[serde(default)]
        lease_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub first_row: u64,
    pub rows: u64,
    pub state: ShardState,
    /// Attempts leased so far, and of those, the ones that failed.
    pub attempts: u32,
    pub failures: u32,
    /// The worker whose attempt failed last: another member gets the retry when there is one.
    #[serde(default)]
    pub last_failed_by: Option<WorkerId>,
    /// The newest attempts and who held them (at most [`SHARD_HOLDERS_KEPT`]): only an
    /// attempt's holder may commit it, even after its lease was returned (a lost worker's
    /// complete output still counts).
    #[serde(default)]
    pub holders: Vec<(u64, WorkerId)>,
}

/// Attempts per shard whose holders are remembered; an older attempt's late commit is refused
/// (its shard was retried since, and the retry's output counts).
pub const SHARD_HOLDERS_KEPT: usize = 8;

/// An inference job's committed work and its pace (see [`InferenceJob::progress`]).
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceProgress {
    pub totals: ShardStats,
    pub elapsed_ms: u64,
    pub rows_per_s: f64,
    /// Correct / labelled rows, when the input is labelled.
    pub accuracy: Option<f64>,
}

/// A leased shard, as the worker gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLease {
    pub index: u32,
    pub attempt: u64,
    pub first_row: u64,
    pub rows: u64,
    /// Where this attempt writes its output (the only object its commit may name).
    pub object: String,
    /// The shard's bytes in the input (`start..end`), when the job has them.
    pub bytes: Option<(u64, u64)>,
}

/// The folder of an output that holds attempts not promoted yet.
pub const ATTEMPTS_DIR: &str = "_attempts";

/// The object a worker writes for `attempt` of shard `index` of the output at `output_uri`.
pub fn attempt_object(output_uri: &str, index: u32, attempt: u64) -> String {
    format!("{}/{ATTEMPTS_DIR}/part-{index:05}-a{attempt}.csv", output_uri.trim_end_matches('/'))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceJob {
    pub id: JobId,
    pub request: InferenceRequest,
    /// Copied from the model version at submission (an alias moving later changes nothing).
    pub artifact_uri: String,
    pub model_spec: ModelSpec,
    pub shape: ModelShape,
    pub state: JobState,
    pub reason: String,
    pub client_request_id: String,
    pub submitted_at_unix_ms: u64,
    /// Raft index of the submission (its place in the FIFO order of waiting work).
    pub submitted_index: u64,
    pub updated_at_unix_ms: u64,
    /// When the first shard was leased, and when the job ended.
    pub started_at_unix_ms: Option<u64>,
    pub finished_at_unix_ms: Option<u64>,
    pub shards: Vec<Shard>,
    /// Workers working on it now.
    pub members: Vec<WorkerId>,
    /// `JoinInference` commands applied: a member's assignment is re-sent when it changes, so
    /// a worker released and joined again restarts its shard loop.
    #[serde(default)]
    pub joins: u64,
    /// Workers whose lease timed out (alive but stuck): never joined to this job again.
    #[serde(default)]
    pub timed_out: Vec<WorkerId>,
    /// Members asked to go back to idle at their next lease ([`Command::YieldInference`]: a
    /// training gang waits for them); always members ([`InferenceJob::remove_member`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub yielding: Vec<WorkerId>,
    pub next_attempt: u64,
    pub events: Vec<JobEvent>,
}

impl InferenceJob {
    pub fn shards_done(&self) -> usize {
        self.shards.iter().filter(|s| matches!(s.state, ShardState::Done { .. })).count()
    }

    pub fn is_complete(&self) -> bool {
        self.shards.iter().all(|s| matches!(s.state, ShardState::Done { .. }))
    }

    /// The committed shards' statistics, summed.
    pub fn totals(&self) -> ShardStats {
        let mut total = ShardStats { class_counts: vec![0; self.shape.classes as usize], ..Default::default() };
        for shard in &self.shards {
            if let ShardState::Done { stats, .. } = &shard.state {
                total.rows = total.rows.saturating_add(stats.rows);
                total.labelled_rows = total.labelled_rows.saturating_add(stats.labelled_rows);
                total.correct = total.correct.saturating_add(stats.correct);
                for (sum, count) in total.class_counts.iter_mut().zip(&stats.class_counts) {
                    *sum = sum.saturating_add(*count);
                }
            }
        }
        total
    }

    /// The workers whose attempts were committed.
    pub fn workers_used(&self) -> Vec<WorkerId> {
        let mut used: Vec<WorkerId> = self
            .shards
            .iter()
            .filter_map(|s| match s.state {
                ShardState::Done { worker, .. } => Some(worker),
                _ => None,
            })
            .collect();
        used.sort();
        used.dedup();
        used
    }

    /// Attempts beyond the first of each shard.
    pub fn retries(&self) -> u64 {
        self.shards.iter().map(|s| u64::from(s.attempts.saturating_sub(1))).sum()
    }

    /// What is done as of `now_unix_ms`: what `status` and `_SUMMARY.json` both report.
    pub fn progress(&self, now_unix_ms: u64) -> InferenceProgress {
        let totals = self.totals();
        // From the first lease to the end (or now); nothing before the first lease.
        let elapsed_ms = self
            .started_at_unix_ms
            .map_or(0, |start| self.finished_at_unix_ms.unwrap_or(now_unix_ms).saturating_sub(start));
        let rows_per_s = if self.started_at_unix_ms.is_some() {
            totals.rows as f64 / (elapsed_ms.max(1) as f64 / 1000.0)
        } else {
            0.0
        };
        let accuracy = (totals.labelled_rows > 0).then(|| totals.correct as f64 / totals.labelled_rows as f64);
        InferenceProgress { totals, elapsed_ms, rows_per_s, accuracy }
    }

    /// How long a lease may run before it is given up (see [`LEASE_TIMEOUT_FACTOR`]).
    pub fn lease_timeout_ms(&self) -> u64 {
        let longest = self
            .shards
            .iter()
            .filter_map(|s| match s.state {
                ShardState::Done { lease_ms, .. } if lease_ms > 0 => Some(lease_ms),
                _ => None,
            })
            .max();
        longest.map_or(LEASE_TIMEOUT_FIRST_MS, |ms| ms.saturating_mul(LEASE_TIMEOUT_FACTOR).max(LEASE_TIMEOUT_MIN_MS))
    }

    /// Leases older than the timeout at `now_unix_ms`: (shard, worker, attempt, age in ms). Their
    /// workers are alive (a lost worker's leases are returned at once) but not progressing.
    pub fn expired_leases(&self, now_unix_ms: u64) -> Vec<(u32, WorkerId, u64, u64)> {
        if self.state != JobState::Running {
            return Vec::new();
        }
        let timeout = self.lease_timeout_ms();
        self.shards
            .iter()
            .enumerate()
            .filter_map(|(index, s)| match s.state {
                ShardState::Leased { worker, attempt, since_unix_ms } => {
                    let age = now_unix_ms.saturating_sub(since_unix_ms);
                    (age > timeout).then_some((index as u32, worker, attempt, age))
                }
                _ => None,
            })
            .collect()
    }

    /// Members it can still take.
    pub fn wants_workers(&self) -> usize {
        let open = self.shards.iter().filter(|s| s.state == ShardState::Pending).count();
        let room = (self.request.workers as usize).saturating_sub(self.members.len());
        if self.state.is_terminal() { 0 } else { open.min(room) }
    }

    /// `worker` is no member any more (released, timed out or lost): nor is it yielding, so
    /// `yielding` only ever names members.
    fn remove_member(&mut self, worker: WorkerId) {
        self.members.retain(|w| *w != worker);
        self.yielding.retain(|w| *w != worker);
    }

    fn push_event(&mut self, at_unix_ms: u64, kind: &str, message: String) {
        if self.events.len() >= JOB_EVENTS_MAX {
            self.events.remove(0);
        }
        self.events.push(JobEvent { at_unix_ms, kind: kind.to_string(), message, since_unix_ms: None });
    }
}

/// Splits `rows` rows into shards: `shard_rows` each when given, else about
/// [`SHARDS_PER_WORKER`] per worker, at most [`SHARD_ROWS_DEFAULT_MAX`] rows each, and never
/// more than [`INFERENCE_SHARDS_MAX`] shards.
pub fn plan_shards(rows: u64, workers: u32, shard_rows: u64) -> Result<Vec<Shard>, String> {
    if rows == 0 {
        return Err("the input has no data rows".into());
    }
    let fewest = rows.div_ceil(INFERENCE_SHARDS_MAX as u64);
    let size = if shard_rows > 0 {
        if shard_rows < fewest {
            return Err(format!(
                "shard_rows {shard_rows} makes {} shards of {rows} rows; at most {INFERENCE_SHARDS_MAX} are \
                 allowed (use --shard-rows {fewest} or more)",
                rows.div_ceil(shard_rows)
            ));
        }
        shard_rows
    } else {
        let aim = rows.div_ceil(u64::from(workers.max(1)) * SHARDS_PER_WORKER);
        aim.min(SHARD_ROWS_DEFAULT_MAX).max(fewest).max(1)
    };
    Ok((0..rows.div_ceil(size))
        .map(|i| Shard {
            first_row: i * size,
            rows: size.min(rows - i * size),
            state: ShardState::Pending,
            attempts: 0,
            failures: 0,
            last_failed_by: None,
            holders: Vec::new(),
        })
        .collect())
}

/// Shard `index`'s bytes from the job's offsets; `None` unless they are well formed (one per
/// shard plus the end, never decreasing).
fn shard_bytes(offsets: &[u64], shards: usize, index: usize) -> Option<(u64, u64)> {
    if offsets.len() != shards + 1 || offsets.windows(2).any(|w| w[0] > w[1]) {
        return None;
    }
    Some((offsets[index], offsets[index + 1]))
}

pub(super) fn submit(
    state: &mut State,
    index: u64,
    request: InferenceRequest,
    client_request_id: String,
    now: u64,
) -> Result<Applied, Rejected> {
    if let Some(job_id) = super::apply::admit(state, &client_request_id)? {
        return Ok(Applied::JobSubmitted { job_id, duplicate: true });
    }
    let bad = |message: String| Err(Rejected::BadInference(message));
    let reference = format!("{}@{}", request.model, request.version);
    let (_, version) = state.resolve_model(&reference)?;
    let Some(model_spec) = version.spec.model.clone() else {
        return bad(format!(
            "model {reference} was trained by a command job ([run]); batch inference runs built-in models only \
             (load its checkpoint in your own program instead)"
        ));
    };
    if version.shape.features_per_row == 0 || version.shape.classes < 2 {
        return bad(format!(
            "model {reference} was registered without its input shape (by an older flotilla); train it again"
        ));
    }
    if !(1..=INFERENCE_WORKERS_MAX).contains(&request.workers) {
        return bad(format!("workers is {}; use 1 to {INFERENCE_WORKERS_MAX}", request.workers));
    }
    if request.batch_size > INFERENCE_BATCH_MAX {
        return bad(format!("batch_size is {}; at most {INFERENCE_BATCH_MAX}", request.batch_size));
    }
    if request.rows > INFERENCE_ROWS_MAX {
        return bad(format!("the input has {} rows; at most {INFERENCE_ROWS_MAX}", request.rows));
    }
    for (field, uri) in [("input", &request.input_uri), ("output", &request.output_uri)] {
        if uri.is_empty() || uri.len() > INFERENCE_URI_LEN_MAX {
            return bad(format!("{field} must be 1 to {INFERENCE_URI_LEN_MAX} bytes"));
        }
    }
    let writing =
        state.inferences.values().find(|j| !j.state.is_terminal() && j.request.output_uri == request.output_uri);
    if let Some(other) = writing {
        return bad(format!("{} is writing to {}; choose another output", other.id, request.output_uri));
    }
    let shards = plan_shards(request.rows, request.workers, request.shard_rows).map_err(Rejected::BadInference)?;
    let (artifact_uri, shape) = (version.artifact_uri.clone(), version.shape);
    super::apply::make_room(state);
    let job_id = JobId(state.next_job_id);
    state.next_job_id += 1;
    state.request_ids.insert(client_request_id.clone(), job_id);
    let mut job = InferenceJob {
        id: job_id,
        request: InferenceRequest {
            batch_size: if request.batch_size == 0 { INFERENCE_BATCH_DEFAULT } else { request.batch_size },
            ..request
        },
        artifact_uri,
        model_spec,
        shape,
        state: JobState::Pending,
        reason: "waiting for workers".into(),
        client_request_id,
        submitted_at_unix_ms: now,
        submitted_index: index,
        updated_at_unix_ms: now,
        started_at_unix_ms: None,
        finished_at_unix_ms: None,
        shards,
        members: Vec::new(),
        joins: 0,
        timed_out: Vec::new(),
        yielding: Vec::new(),
        next_attempt: 1,
        events: Vec::new(),
    };
    let message = format!("{reference}: {} rows in {} shards", job.request.rows, job.shards.len());
    job.push_event(now, "submitted", message);
    state.inferences.insert(job_id, job);
    Ok(Applied::JobSubmitted { job_id, duplicate: false })
}

pub(super) fn join(state: &mut State, job_id: JobId, workers: Vec<WorkerId>, now: u64) -> Result<Applied, Rejected> {
    let job = state.inferences.get(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
    if job.state.is_terminal() {
        return Err(Rejected::JobFinished { job_id, state: job.state.name() });
    }
    let mut unique = workers.clone();
    unique.sort();
    unique.dedup();
    if workers.is_empty() || unique.len() != workers.len() || workers.len() > job.wants_workers() {
        return Err(Rejected::BadGang { limit: job.wants_workers() });
    }
    for id in &workers {
        let worker = state.workers.get(id).ok_or(Rejected::WorkerNotFound(*id))?;
        if worker.lost_at_unix_ms.is_some() || worker.job.is_some() || worker.draining || job.timed_out.contains(id) {
            return Err(Rejected::WorkerUnavailable(*id));
        }
    }
    for id in &workers {
        if let Some(worker) = state.workers.get_mut(id) {
            worker.job = Some(job_id);
        }
    }
    let job = state.inferences.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
    job.members.extend(&workers);
    job.joins += 1;
    job.state = JobState::Running;
    job.reason.clear();
    job.updated_at_unix_ms = now;
    Ok(Applied::InferenceChanged { job_id })
}

/// Workers a `yield` event names at most.
const YIELD_NAMES_SHOWN: usize = 8;

/// [`Command::YieldInference`]: every member not yet yielding goes back to idle at its next
/// lease. A job that is not running (or has no member left to yield) changes nothing.
pub(super) fn yield_workers(state: &mut State, job_id: JobId, now: u64) -> Result<Applied, Rejected> {
    let job = state.inferences.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
    if job.state.is_terminal() {
        return Err(Rejected::JobFinished { job_id, state: job.state.name() });
    }
    let new: Vec<WorkerId> = job.members.iter().copied().filter(|w| !job.yielding.contains(w)).collect();
    if !new.is_empty() {
        let mut names: Vec<String> = new.iter().take(YIELD_NAMES_SHOWN).map(ToString::to_string).collect();
        if new.len() > YIELD_NAMES_SHOWN {
            names.push(format!("{} more", new.len() - YIELD_NAMES_SHOWN));
        }
        let message = format!("{} go back to idle after their shard: a training gang waits for them", names.join(", "));
        job.push_event(now, "yield", message);
        job.yielding.extend(new);
        job.updated_at_unix_ms = now;
    }
    Ok(Applied::InferenceChanged { job_id })
}

pub(super) fn lease(state: &mut State, job_id: JobId, worker_id: WorkerId, now: u64) -> Result<Applied, Rejected> {
    let worker = state.workers.get(&worker_id).ok_or(Rejected::WorkerNotFound(worker_id))?;
    let draining = worker.draining;
    let live = worker.lost_at_unix_ms.is_none();
    let job = state.inferences.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
    let released = Ok(Applied::ShardLeased { lease: None, released: true });
    if job.state != JobState::Running || !job.members.contains(&worker_id) || !live {
        return released;
    }
    // A retried lease (its answer was lost) gets the same shard.
    let held =
        job.shards.iter().position(|s| matches!(s.state, ShardState::Leased { worker, .. } if worker == worker_id));
    // A shard this worker failed last goes to another member when there is one.
    let others = job.members.len() > 1;
    let open = |s: &Shard| s.state == ShardState::Pending && !(others && s.last_failed_by == Some(worker_id));
    let yielding = draining || job.yielding.contains(&worker_id);
    let next = if yielding { None } else { job.shards.iter().position(open) };
    if held.is_none() && next.is_none() && !yielding && job.shards.iter().any(|s| s.state == ShardState::Pending) {
        return Ok(Applied::ShardLeased { lease: None, released: false }); // ask again shortly
    }
    let Some(index) = held.or(next) else {
        job.remove_member(worker_id);
        if let Some(worker) = state.workers.get_mut(&worker_id) {
            worker.job = None;
        }
        return released;
    };
    let bytes = shard_bytes(&job.request.shard_byte_offsets, job.shards.len(), index);
    let shard = &mut job.shards[index];
    let attempt = match shard.state {
        ShardState::Leased { attempt, .. } => attempt,
        _ => {
            let attempt = job.next_attempt;
            job.next_attempt += 1;
            shard.attempts += 1;
            shard.state = ShardState::Leased { worker: worker_id, attempt, since_unix_ms: now };
            if shard.holders.len() >= SHARD_HOLDERS_KEPT {
                shard.holders.remove(0);
            }
            shard.holders.push((attempt, worker_id));
            attempt
        }
    };
    let object = attempt_object(&job.request.output_uri, index as u32, attempt);
    let lease =
        ShardLease { index: index as u32, attempt, first_row: shard.first_row, rows: shard.rows, object, bytes };
    job.started_at_unix_ms.get_or_insert(now);
    job.updated_at_unix_ms = now;
    Ok(Applied::ShardLeased { lease: Some(lease), released: false })
}

#[allow(clippy::too_many_arguments)] // one per field of the command
pub(super) fn commit(
    state: &mut State,
    job_id: JobId,
    worker: WorkerId,
    index: u32,
    attempt: u64,
    object: String,
    stats: ShardStats,
    now: u64,
) -> Result<Applied, Rejected> {
    let job = state.inferences.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
    if job.state != JobState::Running {
        return Err(Rejected::NotRunning { job_id, state: job.state.name() });
    }
    // Only the attempt's holder commits it: another worker could otherwise fill a shard with
    // made-up output.
    let holder = job.shards.get(index as usize).is_some_and(|s| s.holders.contains(&(attempt, worker)));
    if !holder {
        return Err(Rejected::NotAMember { worker, job_id });
    }
    let classes = job.shape.classes as usize;
    // Only the attempt's own object: the leader renames what is recorded.
    let expected = attempt_object(&job.request.output_uri, index, attempt);
    let shard = job.shards.get_mut(index as usize).ok_or(Rejected::NoShard { job_id, index })?;
    if let ShardState::Done { attempt: first, .. } = shard.state {
        return Err(Rejected::ShardDone { job_id, index, attempt: first });
    }
    let bad = |reason: String| Err(Rejected::BadShardReport { index, reason });
    if stats.rows != shard.rows {
        return bad(format!("reports {} rows; the shard has {}", stats.rows, shard.rows));
    }
    if (stats.labelled_rows != 0 && stats.labelled_rows != stats.rows) || stats.correct > stats.labelled_rows {
        return bad(format!("{} correct of {} labelled rows is not possible", stats.correct, stats.labelled_rows));
    }
    let counted = stats.class_counts.iter().try_fold(0u64, |sum, &n| sum.checked_add(n));
    if stats.class_counts.len() != classes || counted != Some(stats.rows) {
        return bad(format!("class counts must be {classes} numbers that sum to the rows"));
    }
    if object != expected {
        return bad(format!("the object must be {expected}, got `{object}`"));
    }
    let lease_ms = match shard.state {
        ShardState::Leased { attempt: held, since_unix_ms, .. } if held == attempt => now.saturating_sub(since_unix_ms),
        _ => 0,
    };
    shard.state = ShardState::Done { attempt, object, stats, worker, lease_ms };
    job.updated_at_unix_ms = now;
    Ok(Applied::ShardCommitted { job_id, complete: job.is_complete() })
}

/// `release`: the worker leaves the job too (its lease timed out: it is alive but stuck).
#[allow(clippy::too_many_arguments)] // one per field of the command
pub(super) fn fail(
    state: &mut State,
    job_id: JobId,
    worker: WorkerId,
    index: u32,
    attempt: u64,
    error: String,
    release: bool,
    now: u64,
) -> Result<Applied, Rejected> {
    let job = state.inferences.get_mut(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
    let shard = job.shards.get_mut(index as usize).ok_or(Rejected::NoShard { job_id, index })?;
    if !matches!(shard.state, ShardState::Leased { attempt: a, .. } if a == attempt) {
        return Err(Rejected::BadShardReport { index, reason: format!("attempt {attempt} does not hold the lease") });
    }
    if !matches!(shard.state, ShardState::Leased { worker: w, .. } if w == worker) {
        return Err(Rejected::NotAMember { worker, job_id });
    }
    shard.state = ShardState::Pending;
    shard.failures += 1;
    shard.last_failed_by = Some(worker);
    let (first, last, failures) = (shard.first_row, shard.first_row + shard.rows, shard.failures);
    let error = super::apply::bounded(error);
    job.push_event(now, "shard_failed", format!("shard {index} (rows {first}..{last}), attempt {attempt}: {error}"));
    if release {
        job.remove_member(worker);
        if !job.timed_out.contains(&worker) && job.timed_out.len() < INFERENCE_WORKERS_MAX as usize {
            job.timed_out.push(worker);
        }
        if let Some(member) = state.workers.get_mut(&worker).filter(|w| w.job == Some(job_id)) {
            member.job = None;
        }
    }
    if failures >= SHARD_FAILURES_MAX {
        let reason =
            format!("shard {index} (rows {first}..{last}) failed {failures} times (the limit); last error: {error}");
        end(state, job_id, JobState::Failed, reason, now);
    }
    Ok(Applied::InferenceChanged { job_id })
}

/// The leader promoted every committed object and wrote the summary (success), or gave up.
pub(super) fn finished(
    state: &mut State,
    job_id: JobId,
    success: bool,
    reason: String,
    now: u64,
) -> Result<Applied, Rejected> {
    let job = state.inferences.get(&job_id).ok_or(Rejected::JobNotFound(job_id))?;
    if job.state != JobState::Running {
        return Err(Rejected::NotRunning { job_id, state: job.state.name() });
    }
    if success && !job.is_complete() {
        return Err(Rejected::BadInference(format!("{job_id} has shards that are not committed")));
    }
    let to = if success { JobState::Succeeded } else { JobState::Failed };
    end(state, job_id, to, reason, now);
    Ok(Applied::InferenceChanged { job_id })
}

/// Ends the job (`Succeeded`, `Failed` or `Cancelled`) and frees its members.
pub(super) fn end(state: &mut State, job_id: JobId, to: JobState, reason: String, now: u64) {
    let Some(job) = state.inferences.get_mut(&job_id) else { return };
    job.state = to;
    job.reason = super::apply::bounded(reason);
    job.updated_at_unix_ms = now;
    job.finished_at_unix_ms = Some(now);
    let message = if job.reason.is_empty() { to.name().to_string() } else { job.reason.clone() };
    job.push_event(now, &to.name().to_ascii_lowercase(), message);
    for shard in &mut job.shards {
        if matches!(shard.state, ShardState::Leased { .. }) {
            shard.state = ShardState::Pending;
        }
    }
    let members = std::mem::take(&mut job.members);
    job.yielding.clear();
    for id in members {
        if let Some(worker) = state.workers.get_mut(&id).filter(|w| w.job == Some(job_id)) {
            worker.job = None;
        }
    }
}

/// A member was lost: the shards it held go back to the queue.
pub(super) fn member_lost(state: &mut State, job_id: JobId, lost: WorkerId, now: u64) {
    let Some(job) = state.inferences.get_mut(&job_id) else { return };
    job.remove_member(lost);
    let mut returned = Vec::new();
    for (index, shard) in job.shards.iter_mut().enumerate() {
        if matches!(shard.state, ShardState::Leased { worker, .. } if worker == lost) {
            shard.state = ShardState::Pending;
            returned.push(index.to_string());
        }
    }
    if !returned.is_empty() {
        let message = format!("{lost} was lost; shard(s) {} returned to the queue", returned.join(", "));
        job.push_event(now, "worker_lost", message);
        job.updated_at_unix_ms = now;
    }
}
