//! Worker leases: liveness tracked in the leader's memory, never in the Raft log (DESIGN §2).
//!
//! A worker renews its lease with every heartbeat. When the leader has not heard from a worker
//! for [`LEASE`], it proposes `WorkerLost` through Raft, so every node agrees the worker is gone.
//! A new leader starts every known live worker with a full lease (it cannot know when the old
//! leader last heard from them), so a leader change never declares a healthy worker lost.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_core::state::{Command, State};
use flotilla_core::{JobId, WorkerId};

use crate::raft::node::{NodeHandle, now_unix_ms};

/// How long a worker stays alive without a heartbeat.
pub const LEASE: Duration = Duration::from_secs(5);
/// How often workers are asked to heartbeat (several per lease, so one lost packet is harmless).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How often the leader looks for expired leases.
const CHECK_EVERY: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Table {
    /// The term in which this node built the table as leader; 0 when it is not the leader.
    term: u64,
    expires: HashMap<WorkerId, Instant>,
    /// Each worker's last heartbeat: when (this node's clock) and in which term of this node's
    /// leadership (one from an earlier leadership says nothing of when the worker last spoke).
    heard: HashMap<WorkerId, Heard>,
    /// The job each worker last reported prepared in its heartbeat (a handover's replacement:
    /// data loaded, GPU kernels compiled). Leader memory only: a new leader hears it again
    /// within a heartbeat.
    prepared: HashMap<WorkerId, JobId>,
    /// The job whose state each worker last said it holds in memory, when the leader did not
    /// answer that it may drop it (leader memory only, like `prepared`): a free one holding a
    /// running job's state is recorded as that job's spare ([`crate::scheduling`]).
    held: HashMap<WorkerId, JobId>,
}

#[derive(Debug, Clone, Copy)]
struct Heard {
    unix_ms: u64,
    term: u64,
}

#[derive(Default)]
pub struct Leases {
    table: Mutex<Table>,
    /// Notified when a worker under suspicion (its gang broke) is heard from, or a worker
    /// reports a job newly prepared: the scheduler acts at once (regroups, or hands over)
    /// instead of at its next periodic pass.
    pub wake_scheduler: tokio::sync::Notify,
}

impl Leases {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("the lease lock is never held across a panic")
    }

    /// Renews `worker`'s lease, heard by this node as leader in `term`. `suspect_since`: when
    /// its gang broke, if it did; hearing from it for the first time since then wakes the
    /// scheduler. `prepared`: the job it reports prepared, if any; a new one wakes the
    /// scheduler too.
    pub fn renew(&self, worker: WorkerId, term: u64, suspect_since: Option<u64>, prepared: Option<JobId>) {
        let now = now_unix_ms();
        let (previous, newly_prepared) = {
            let mut table = self.table();
            table.expires.insert(worker, Instant::now() + LEASE);
            let newly_prepared = match prepared {
                Some(job) => table.prepared.insert(worker, job) != Some(job),
                None => {
                    table.prepared.remove(&worker);
                    false
                }
            };
            let previous = table.heard.insert(worker, Heard { unix_ms: now, term }).map_or(0, |h| h.unix_ms);
            (previous, newly_prepared)
        };
        if newly_prepared || suspect_since.is_some_and(|since| previous < since && now >= since) {
            self.wake_scheduler.notify_one();
        }
    }

    pub fn last_heartbeat_unix_ms(&self, worker: WorkerId) -> u64 {
        self.table().heard.get(&worker).map_or(0, |h| h.unix_ms)
    }

    /// Records the job whose state `worker`'s last heartbeat said it holds, if any, and that
    /// may still be wanted.
    pub fn heard_holding(&self, worker: WorkerId, job: Option<JobId>) {
        let mut table = self.table();
        match job {
            Some(job) => table.held.insert(worker, job),
            None => table.held.remove(&worker),
        };
    }

    /// The job whose state `worker` last said it holds (see [`Leases::heard_holding`]).
    pub fn held_job(&self, worker: WorkerId) -> Option<JobId> {
        self.table().held.get(&worker).copied()
    }

    /// The job `worker` last reported prepared (see [`Leases::renew`]).
    pub fn prepared_job(&self, worker: WorkerId) -> Option<JobId> {
        self.table().prepared.get(&worker).copied()
    }

    /// When this node last heard from `worker` while leading in `term` (0: not in that term).
    fn last_heard_in_term(&self, worker: WorkerId, term: u64) -> u64 {
        self.table().heard.get(&worker).filter(|h| h.term == term).map_or(0, |h| h.unix_ms)
    }

    /// Starts every live worker with a full lease, for leadership in `term`.
    fn adopt(&self, term: u64, live: Vec<WorkerId>) {
        let mut table = self.table();
        let deadline = Instant::now() + LEASE;
        table.term = term;
        table.expires = live.into_iter().map(|id| (id, deadline)).collect();
    }

    fn expired(&self) -> Vec<WorkerId> {
        let now = Instant::now();
        self.table().expires.iter().filter(|(_, at)| **at <= now).map(|(id, _)| *id).collect()
    }

    pub(crate) fn forget(&self, worker: WorkerId) {
        self.table().expires.remove(&worker);
    }
}

fn live_workers(state: &State) -> Vec<WorkerId> {
    state.workers.values().filter(|w| w.lost_at_unix_ms.is_none()).map(|w| w.id).collect()
}

/// Noticed workers whose handover still waits for its replacement: (worker, instance).
fn awaited_replacements(state: &State) -> Vec<(WorkerId, String)> {
    state
        .jobs
        .values()
        .flat_map(|job| job.awaited_handovers())
        .filter_map(|h| state.workers.get(&h.leaving).map(|w| (h.leaving, w.info.instance_id.clone())))
        .collect()
}

/// Runs on every node; acts only while this node leads. A lost worker's job learns how far its
/// generation got from `progress`; `replacer` launches a new worker for a lost local one.
pub async fn expire_loop(
    node: NodeHandle,
    leases: std::sync::Arc<Leases>,
    progress: std::sync::Arc<crate::progress::Progress>,
    replacer: Option<std::sync::Arc<crate::replace::Replacer>>,
) {
    let mut ticker = tokio::time::interval(CHECK_EVERY);
    loop {
        ticker.tick().await;
        let status = node.status();
        if status.leader_id != Some(node.id) {
            leases.table().term = 0;
            continue;
        }
        if leases.table().term != status.term {
            match node.read_local(|state| (live_workers(state), awaited_replacements(state))).await {
                Ok((live, awaited)) => {
                    leases.adopt(status.term, live);
                    // A replacement the previous leader asked for at a notice may have died with
                    // it (a launch still waiting out the boot): ask again. The launch's client
                    // token makes it one worker whoever asks.
                    if let Some(replacer) = &replacer {
                        for (worker, instance) in awaited {
                            replacer.replace(worker, instance);
                        }
                    }
                }
                Err(_) => continue,
            }
        }
        for worker in leases.expired() {
            let progress = progress.clone();
            let Ok(seen) = node
                .read_local(move |state| {
                    // Gone already (it left, or a previous pass recorded it): nothing to declare.
                    let w = state.workers.get(&worker).filter(|w| w.lost_at_unix_ms.is_none())?;
                    let step = w
                        .job
                        .and_then(|j| state.jobs.get(&j).and_then(|job| progress.get(j, job.generation)))
                        .map_or(0, |p| p.step);
                    // A draining worker was replaced at its notice, or stopped on purpose.
                    Some((step, (!w.draining).then(|| w.info.instance_id.clone())))
                })
                .await
            else {
                continue;
            };
            let Some((last_step_seen, instance)) = seen else {
                leases.forget(worker);
                continue;
            };
            // When this leader last heard from it (0: not in this leadership). Heartbeats may
            // arrive before this loop adopts the term, so they carry the term, not the time.
            let last_heard_unix_ms = leases.last_heard_in_term(worker, status.term);
            match node.propose(Command::WorkerLost { worker_id: worker, last_step_seen, last_heard_unix_ms }).await {
                Ok(_) => {
                    tracing::warn!(%worker, "worker lease expired; marked lost");
                    leases.forget(worker);
                    if let (Some(replacer), Some(instance)) = (&replacer, instance) {
                        replacer.replace(worker, instance);
                    }
                }
                Err(e) => tracing::debug!(%worker, error = %e, "could not record a lost worker yet"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_newly_prepared_job_wakes_the_scheduler_once_and_is_remembered_until_cleared() {
        let leases = Leases::default();
        let (worker, job) = (WorkerId(3), JobId(7));
        leases.renew(worker, 1, None, None);
        assert_eq!(leases.prepared_job(worker), None);
        leases.renew(worker, 1, None, Some(job));
        assert_eq!(leases.prepared_job(worker), Some(job));
        // The wake-up was stored (notify_one keeps one permit).
        tokio::time::timeout(Duration::from_millis(100), leases.wake_scheduler.notified())
            .await
            .expect("a new report wakes the scheduler");
        // The same report again wakes nobody.
        leases.renew(worker, 1, None, Some(job));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), leases.wake_scheduler.notified()).await.is_err(),
            "a repeated report is not news"
        );
        leases.renew(worker, 1, None, None);
        assert_eq!(leases.prepared_job(worker), None, "a heartbeat without one clears it");
    }

    #[test]
    fn a_silence_is_known_only_from_heartbeats_taken_in_the_current_term() {
        let leases = Leases::default();
        let (worker, other) = (WorkerId(3), WorkerId(4));
        // Heard before the expiry loop adopted term 2 (registration, first heartbeats): counts.
        leases.renew(worker, 2, None, None);
        let heard = leases.last_heartbeat_unix_ms(worker);
        assert!(heard > 0);
        leases.adopt(2, vec![worker, other]);
        assert_eq!(leases.last_heard_in_term(worker, 2), heard);
        assert_eq!(leases.last_heard_in_term(other, 2), 0, "never heard: unknown");
        // This node leads again in term 5: what it heard in term 2 is stale (another leader
        // may have heard from the worker since).
        leases.adopt(5, vec![worker, other]);
        assert_eq!(leases.last_heard_in_term(worker, 5), 0);
        leases.renew(worker, 5, None, None);
        assert!(leases.last_heard_in_term(worker, 5) >= heard);
    }
}
