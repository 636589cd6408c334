//! Live training progress, kept in the leader's memory only (DESIGN §2: per-step progress is
//! not replicated). Rank 0 of a running gang reports every second or so; `status` and watch
//! streams served by the leader show it. After a leader change it reappears with the next
//! report.

use std::collections::HashMap;
use std::sync::Mutex;

use flotilla_core::JobId;
use flotilla_proto::v1::LiveProgress;

/// Jobs tracked at most (the oldest report is dropped beyond it).
const JOBS_TRACKED_MAX: usize = 10_000;

#[derive(Default)]
pub struct Progress {
    jobs: Mutex<HashMap<JobId, LiveProgress>>,
}

impl Progress {
    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, LiveProgress>> {
        self.jobs.lock().expect("the progress lock is never held across a panic")
    }

    pub fn record(&self, job: JobId, progress: LiveProgress) {
        let mut jobs = self.jobs();
        if jobs.len() >= JOBS_TRACKED_MAX
            && !jobs.contains_key(&job)
            && let Some(oldest) = jobs.keys().min().copied()
        {
            jobs.remove(&oldest);
        }
        jobs.insert(job, progress);
    }

    /// The latest report for `job` in `generation`, if any.
    pub fn get(&self, job: JobId, generation: u64) -> Option<LiveProgress> {
        self.jobs().get(&job).filter(|p| p.generation == generation).copied()
    }
}
