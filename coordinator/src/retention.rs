//! Checkpoint retention and garbage collection, run by the leader.
//!
//! Crash-safe deletion in three steps, each one durable before the next:
//!
//! ```text
//!   CheckpointDeleting{uri} (Raft: never resumed from again) ─▶ remove the objects ─▶
//!   CheckpointDeleted{uri} (Raft: drop the record)
//! ```
//!
//! Whatever crashes in between, the next pass (on this or a new leader) sees the record marked
//! `deleting` and repeats the removal, which is idempotent: no record ever points at missing
//! data that could be resumed from, and no recorded checkpoint's objects leak. Objects that
//! were never recorded (a save cut short by a kill, a late save of a superseded generation)
//! are swept once a newer checkpoint of the job is recorded.
//!
//! The store is the cluster store (`file://` or `s3://`); only folders of a job's checkpoint
//! area in it are ever deleted.
//!
//! Record retention ([`records_loop`]): finished jobs and inference jobs, and lost workers,
//! are forgotten (`ForgetFinished`) once they are older than the cluster's `--keep-finished-h`,
//! so the replicated state and its snapshots stay bounded by what is live.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use flotilla_core::JobId;
use flotilla_core::state::{Command, State};
use flotilla_store::Location;
use object_store::path::Path;

use crate::raft::node::NodeHandle;

/// How often the leader looks for checkpoints to delete.
const PASS_EVERY: Duration = Duration::from_secs(1);
/// ... and at the earliest this long after a change wakes it: a pass reads every job's
/// checkpoints twice on the Raft loop's thread (with 12,000 jobs held, 2.6% of the leader's
/// CPU at 4 passes a second, in a profile under a stream of submissions; at 50 ms it ran 20
/// times a second), and nothing in it is urgent (issue 19: the clients' p99 grew with the
/// number of jobs held).
const PASS_MIN_GAP: Duration = Duration::from_secs(1);
/// Deletions started per pass at most (bounds one pass's work on a big backlog).
const DELETIONS_PER_PASS_MAX: usize = 64;

/// What one pass must do, read from the replicated state.
#[derive(Debug, Default)]
struct Work {
    /// (job, uri) to mark deleting.
    mark: Vec<(JobId, String)>,
    /// (job, uri) marked: remove objects, then drop the record.
    remove: Vec<(JobId, String)>,
    /// Per job: the newest recorded step and whether the job has ended.
    jobs: Vec<(JobId, u64, bool)>,
}

fn plan(state: &State) -> Work {
    let mut work = Work::default();
    for (job_id, mark, remove) in state.retention_plans() {
        work.mark.extend(mark.into_iter().map(|uri| (job_id, uri)));
        work.remove.extend(remove.into_iter().map(|uri| (job_id, uri)));
    }
    for job in state.jobs.values() {
        let newest = job.latest_checkpoint.as_ref().map_or(0, |c| c.step);
        work.jobs.push((job.id, newest, job.state.is_terminal()));
    }
    work.mark.truncate(DELETIONS_PER_PASS_MAX);
    work.remove.truncate(DELETIONS_PER_PASS_MAX);
    work
}

/// What the job looked like when the sweep last listed its checkpoint area, and when.
#[derive(Debug, Clone, Copy)]
struct Swept {
    newest: u64,
    ended: bool,
    at: Instant,
}

/// The jobs whose checkpoint area is worth listing now, oldest sweep first, at most
/// [`SWEEPS_PER_PASS_MAX`]. Only a job with a recorded checkpoint can have stale folders (the
/// sweep removes only folders older than the newest record), so a job is due when its newest
/// record or its end changed since its last sweep, or after [`RESWEEP_EVERY`] (a superseded
/// generation's save may land after the sweep that followed the newer record). Listing every
/// job on every pass cost one store listing per job per pass: on S3 a LIST request each, and
/// locally most of the leader's CPU under a stream of submissions.
fn due_sweeps(jobs: &[(JobId, u64, bool)], swept: &HashMap<JobId, Swept>, now: Instant) -> Vec<JobId> {
    let mut due: Vec<(Option<Instant>, JobId)> = jobs
        .iter()
        .filter(|(_, newest, _)| *newest > 0)
        .filter_map(|&(job_id, newest, ended)| match swept.get(&job_id) {
            None => Some((None, job_id)),
            Some(last) if last.newest != newest || last.ended != ended => Some((None, job_id)),
            Some(last) if now.saturating_duration_since(last.at) >= RESWEEP_EVERY => Some((Some(last.at), job_id)),
            Some(_) => None,
        })
        .collect();
    due.sort();
    due.into_iter().take(SWEEPS_PER_PASS_MAX).map(|(_, job_id)| job_id).collect()
}

/// A job's checkpoint area: `<store>/jobs/<job>/ckpt`.
fn area(store: &Location, job_id: JobId) -> Path {
    store.key(&format!("jobs/{job_id}/ckpt"))
}

/// Longest checkpoint folder name.
const CHECKPOINT_NAME_LEN_MAX: usize = 64;

/// The key of a checkpoint URI, if it is one folder of `job_id`'s checkpoint area
/// (`<store>/jobs/<job>/ckpt/<name>`, name of letters, digits, `-` and `_`) written in canonical
/// form (the sweep compares recorded URIs as text). The one rule for what a worker may record
/// and what retention may delete: nothing else is ever deleted.
pub(crate) fn checkpoint_key(uri: &str, store: &Location, job_id: JobId) -> Option<Path> {
    let key = store.key_in(uri)?;
    let name = key.filename()?;
    let plain = !name.is_empty()
        && name.len() <= CHECKPOINT_NAME_LEN_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (plain && key == area(store, job_id).join(name) && store.uri_of(&key) == uri).then_some(key)
}

/// Runs on every node; acts only while this node leads.
pub async fn retention_loop(mut node: NodeHandle, store: Location) {
    let mut swept: HashMap<JobId, Swept> = HashMap::new();
    loop {
        let _ = tokio::time::timeout(PASS_EVERY, node.changed()).await;
        tokio::time::sleep(PASS_MIN_GAP).await;
        if node.status().leader_id != Some(node.id) {
            continue;
        }
        let Ok(work) = node.read_local(plan).await else { continue };
        for (job_id, uri) in work.mark {
            if let Err(e) = node.propose(Command::CheckpointDeleting { job_id, uri: uri.clone() }).await {
                tracing::debug!(%job_id, uri, error = %e, "could not mark a checkpoint for deletion yet");
            }
        }
        let Ok(work) = node.read_local(plan).await else { continue };
        for (job_id, uri) in work.remove {
            let Some(folder) = checkpoint_key(&uri, &store, job_id) else {
                tracing::warn!(%job_id, uri, "not in this cluster's store; left for its owner");
                continue;
            };
            if let Err(e) = flotilla_store::delete_prefix(&store, &folder).await {
                tracing::warn!(%job_id, uri, error = %e, "could not delete a checkpoint; retrying later");
                continue;
            }
            if let Err(e) = node.propose(Command::CheckpointDeleted { job_id, uri: uri.clone() }).await {
                tracing::debug!(%job_id, uri, error = %e, "checkpoint deleted; its record will be dropped next pass");
            } else {
                tracing::info!(%job_id, uri, "checkpoint deleted (retention)");
            }
        }
        let present: HashSet<JobId> = work.jobs.iter().map(|(id, _, _)| *id).collect();
        swept.retain(|job_id, _| present.contains(job_id));
        let due = due_sweeps(&work.jobs, &swept, Instant::now());
        if due.is_empty() {
            continue;
        }
        let Ok(recorded) = node
            .read_local(move |state| {
                due.iter()
                    .filter_map(|id| state.jobs.get(id))
                    .map(|job| {
                        let uris: BTreeSet<String> = job.checkpoints.iter().map(|c| c.uri.clone()).collect();
                        let newest = job.latest_checkpoint.as_ref().map_or(0, |c| c.step);
                        (job.id, uris, newest, job.state.is_terminal())
                    })
                    .collect::<Vec<_>>()
            })
            .await
        else {
            continue;
        };
        for (job_id, uris, newest, ended) in recorded {
            if sweep_unrecorded(&store, job_id, &uris, newest, ended).await {
                swept.insert(job_id, Swept { newest, ended, at: Instant::now() });
            }
        }
    }
}

/// Folders of one checkpoint area listed per pass at most.
const SWEEP_FOLDERS_MAX: usize = 10_000;
/// Checkpoint areas listed per pass at most.
const SWEEPS_PER_PASS_MAX: usize = 32;
/// A swept job's area is listed again after this long even if nothing changed (late saves).
const RESWEEP_EVERY: Duration = Duration::from_secs(600);

/// Removes checkpoint folders of `job_id` that no record names and that can no longer be
/// recorded: older than the newest recorded step (or any, once the job has ended). False when
/// the area could not be listed (the next pass tries again).
async fn sweep_unrecorded(
    store: &Location,
    job_id: JobId,
    recorded: &BTreeSet<String>,
    newest: u64,
    ended: bool,
) -> bool {
    let Ok(listing) = store.store().list_with_delimiter(Some(&area(store, job_id))).await else { return false };
    for folder in listing.common_prefixes.into_iter().take(SWEEP_FOLDERS_MAX) {
        let uri = store.uri_of(&folder);
        if recorded.contains(&uri) {
            continue;
        }
        let step = folder.filename().and_then(|name| name.get(..12)).and_then(|digits| digits.parse::<u64>().ok());
        let stale = step.is_some_and(|s| s < newest || (ended && newest > 0));
        if stale && flotilla_store::delete_prefix(store, &folder).await.is_ok_and(|removed| removed > 0) {
            tracing::info!(%job_id, uri, "removed an unrecorded checkpoint");
        }
    }
    true
}

/// How often the leader looks for records to forget.
const RECORDS_PASS_EVERY: Duration = Duration::from_secs(60);

/// The leader forgets records older than `keep` (checked every minute and at start).
pub async fn records_loop(node: NodeHandle, keep: Duration) {
    loop {
        if node.status().leader_id == Some(node.id) {
            let before_unix_ms = crate::raft::node::now_unix_ms().saturating_sub(keep.as_millis() as u64);
            let due = node
                .read_local(move |state| {
                    let (jobs, workers) = state.forgettable(before_unix_ms);
                    !jobs.is_empty() || !workers.is_empty()
                })
                .await
                .unwrap_or(false);
            if due {
                match node.propose(Command::ForgetFinished { before_unix_ms }).await {
                    Ok(outcome) => tracing::info!(?outcome, keep_h = keep.as_secs() / 3600, "forgot old records"),
                    Err(e) => tracing::debug!(error = %e, "could not forget old records yet"),
                }
            }
        }
        tokio::time::sleep(RECORDS_PASS_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_folders_of_the_jobs_checkpoint_area_are_ever_deleted() {
        let store = flotilla_store::open("/data/store").expect("store");
        let job = JobId(1);
        assert_eq!(
            checkpoint_key("file:///data/store/jobs/job-1/ckpt/000000000020-g1", &store, job),
            Some(Path::from("data/store/jobs/job-1/ckpt/000000000020-g1"))
        );
        for bad in [
            "file:///etc/passwd",
            "file:///data/store",
            "file:///data/store/jobs/job-2/ckpt/000000000020-g1",
            "file:///data/store/jobs/job-1/ckpt",
            "file:///data/store/jobs/job-1/ckpt/../../job-2",
            "file:///data/store/jobs/job-1/ckpt/a/b",
            "s3://bucket/data/store/jobs/job-1/ckpt/1",
            "file://relative/path",
        ] {
            assert_eq!(checkpoint_key(bad, &store, job), None, "{bad}");
        }
        let keys = [("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s")].map(|(n, v)| (n.into(), v.into()));
        let s3 = flotilla_store::open_with("s3://bucket/cluster", keys).expect("s3 store");
        assert_eq!(
            checkpoint_key("s3://bucket/cluster/jobs/job-1/ckpt/000000000020-g1", &s3, job),
            Some(Path::from("cluster/jobs/job-1/ckpt/000000000020-g1"))
        );
        assert_eq!(checkpoint_key("s3://other/cluster/jobs/job-1/ckpt/000000000020-g1", &s3, job), None);
        let long = format!("s3://bucket/cluster/jobs/job-1/ckpt/{}", "a".repeat(65));
        assert_eq!(checkpoint_key(&long, &s3, job), None, "names are at most 64 characters");
        assert_eq!(checkpoint_key("s3://bucket/cluster/jobs/job-1/ckpt/1/", &s3, job), None, "canonical only");
    }

    #[test]
    fn only_jobs_whose_records_changed_or_went_unswept_long_are_listed() {
        let now = Instant::now() + RESWEEP_EVERY * 2;
        let recent = now - Duration::from_secs(5);
        let long_ago = now - RESWEEP_EVERY - Duration::from_secs(1);
        let jobs = [
            (JobId(1), 0, false),  // nothing recorded: nothing can be stale
            (JobId(2), 20, false), // never swept
            (JobId(3), 20, false), // swept at this record, recently
            (JobId(4), 40, false), // a newer record since its sweep
            (JobId(5), 20, true),  // ended since its sweep
            (JobId(6), 20, false), // swept at this record, long ago (late saves)
            (JobId(7), 0, true),   // ended without a record
        ];
        let swept: HashMap<JobId, Swept> = [
            (JobId(3), Swept { newest: 20, ended: false, at: recent }),
            (JobId(4), Swept { newest: 20, ended: false, at: recent }),
            (JobId(5), Swept { newest: 20, ended: false, at: recent }),
            (JobId(6), Swept { newest: 20, ended: false, at: long_ago }),
        ]
        .into();
        assert_eq!(due_sweeps(&jobs, &swept, now), [JobId(2), JobId(4), JobId(5), JobId(6)]);
        // Changed jobs come before the periodic re-listing, and a pass lists a bounded number.
        let many: Vec<(JobId, u64, bool)> = (1..=100).map(|i| (JobId(i), 10, false)).collect();
        let old: HashMap<JobId, Swept> =
            (1..=50).map(|i| (JobId(i), Swept { newest: 10, ended: false, at: long_ago })).collect();
        let due = due_sweeps(&many, &old, now);
        assert_eq!(due.len(), SWEEPS_PER_PASS_MAX);
        assert!(due.iter().all(|id| id.0 > 50), "never-swept jobs first: {due:?}");
    }

    #[test]
    fn the_sweep_removes_only_unrecorded_older_folders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("jobs/job-1/ckpt");
        for name in ["000000000010-g1", "000000000020-g1", "000000000030-g2", "000000000040-g2"] {
            std::fs::create_dir_all(root.join(name)).expect("folder");
            std::fs::write(root.join(name).join("MANIFEST"), b"{}").expect("manifest");
        }
        let store = flotilla_store::open(dir.path().to_str().expect("utf-8")).expect("store");
        let uri = |name: &str| format!("file://{}", root.join(name).display());
        let recorded: BTreeSet<String> = [uri("000000000020-g1"), uri("000000000030-g2")].into();
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        assert!(runtime.block_on(sweep_unrecorded(&store, JobId(1), &recorded, 30, false)), "listed");
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .expect("read")
            .filter_map(|e| {
                let e = e.expect("entry");
                e.path().join("MANIFEST").exists().then(|| e.file_name().to_string_lossy().to_string())
            })
            .collect();
        left.sort();
        // 10: unrecorded and older than the newest: swept. 40: may still be being recorded: kept.
        assert_eq!(left, ["000000000020-g1", "000000000030-g2", "000000000040-g2"]);
    }
}
