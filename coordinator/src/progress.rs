//! Live training progress, kept in the leader's memory only (DESIGN §2: per-step progress is
//! not replicated). Rank 0 of a running gang reports every second or so; `status` and watch
//! streams served by the leader show it. After a leader change it reappears with the next
//! report.

use std::collections::HashMap;
use std::sync::Mutex;

use flotilla_core::JobId;
use flotilla_proto::v1::LiveProgress;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

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

    /// Keeps `progress` as the job's latest; true when it is the first report of its generation
    /// this node has seen.
    pub fn record(&self, job: JobId, progress: LiveProgress) -> bool {
        let mut jobs = self.jobs();
        if jobs.len() >= JOBS_TRACKED_MAX
            && !jobs.contains_key(&job)
            && let Some(oldest) = jobs.keys().min().copied()
        {
            jobs.remove(&oldest);
        }
        let generation = progress.generation;
        jobs.insert(job, progress).is_none_or(|previous| previous.generation != generation)
    }

    /// The latest report for `job` in `generation`, if any.
    pub fn get(&self, job: JobId, generation: u64) -> Option<LiveProgress> {
        self.jobs().get(&job).filter(|p| p.generation == generation).copied()
    }
}
