//! Live training progress, kept in the leader's memory only (DESIGN §2: per-step progress is
//! not replicated). Rank 0 of a running gang reports every second or so; `status` and watch
//! streams served by the leader show it. After a leader change it reappears with the next
//! report.

use std::collections::HashMap;
use std::sync::Mutex;

use flotilla_core::JobId;
use flotilla_proto::v1::LiveProgress;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// The reason of a running generation that has reported no step to this node: what it is doing
/// before `reason` (its own, if any). Its ranks form the ring and load the data and the state
/// (a read the store does not answer shows here as a growing time), or this node was elected
/// since rank 0's last report (it reports every second). A command job's program need not
/// report steps: it is said how to. `formed_at_unix_ms`: when its gang formed, if known.
pub fn starting(
    reason: &str,
    generation: u64,
    command: bool,
    formed_at_unix_ms: Option<u64>,
    now_unix_ms: u64,
) -> String {
    let what = if command {
        format!("generation {generation} runs its command; no step reported yet (a JSON line with `step` reports one)")
    } else {
        format!("starting generation {generation}: no step reported yet")
    };
    let when = match formed_at_unix_ms {
        Some(at) => format!(", {} s after its gang formed", now_unix_ms.saturating_sub(at) / 1000),
        None => String::new(),
    };
    match reason {
        "" => format!("{what}{when}"),
        reason => format!("{what}{when}; {reason}"),
    }
}

/// Jobs tracked at most (the oldest report is dropped beyond it).
const JOBS_TRACKED_MAX: usize = 10_000;

pub struct Progress {
    jobs: Mutex<HashMap<JobId, LiveProgress>>,
    /// Loss (notice or lost worker) to the next generation's first reported step, in seconds.
    pub recovery_seconds: Histogram,
    /// A handover's stop to the next generation's first reported step, in seconds.
    pub handover_stall_seconds: Histogram,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            jobs: Mutex::default(),
            // 250 ms to ~70 min.
            recovery_seconds: Histogram::new(exponential_buckets(0.25, 2.0, 15)),
            // 10 ms to ~5 min.
            handover_stall_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 15)),
        }
    }
}

impl Progress {
    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, LiveProgress>> {
        self.jobs.lock().expect("the progress lock is never held across a panic")
    }

    /// Keeps `progress` as the job's latest, with the newest validation metrics of an earlier
    /// report when it has none; true when it is the first report of its generation this node
    /// has seen.
    pub fn record(&self, job: JobId, mut progress: LiveProgress) -> bool {
        let mut jobs = self.jobs();
        if jobs.len() >= JOBS_TRACKED_MAX
            && !jobs.contains_key(&job)
            && let Some(oldest) = jobs.keys().min().copied()
        {
            jobs.remove(&oldest);
        }
        let generation = progress.generation;
        if progress.val_accuracy.is_none()
            && let Some(previous) = jobs.get(&job).filter(|p| p.val_accuracy.is_some() && p.val_step <= progress.step)
        {
            (progress.val_accuracy, progress.val_loss, progress.val_step) =
                (previous.val_accuracy, previous.val_loss, previous.val_step);
        }
        jobs.insert(job, progress).is_none_or(|previous| previous.generation != generation)
    }

    /// A validation reported on its own (`ProgressReport.validation_only`): the job's latest
    /// report of `generation` takes it, unless it holds a newer one. Nothing without a report.
    pub fn validated(&self, job: JobId, generation: u64, val_accuracy: f64, val_loss: Option<f64>, val_step: u64) {
        let mut jobs = self.jobs();
        if let Some(latest) = jobs.get_mut(&job).filter(|p| p.generation == generation && p.val_step <= val_step) {
            (latest.val_accuracy, latest.val_loss, latest.val_step) = (Some(val_accuracy), val_loss, val_step);
        }
    }

    /// The latest report for `job` in `generation`, if any.
    pub fn get(&self, job: JobId, generation: u64) -> Option<LiveProgress> {
        self.jobs().get(&job).filter(|p| p.generation == generation).copied()
    }
}
