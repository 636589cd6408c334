//! The invariants, checked against every live replica after every simulation step.
//!
//! The checker keeps global history that no single replica has: which node led each term,
//! every entry any replica has shown as committed, and every acknowledged submission. A
//! violation panics with the node, the index and both sides of the disagreement.

use std::collections::BTreeMap;

use flotilla_coordinator::raft::replica::Replica;
use flotilla_core::ids::JobId;
use flotilla_core::state::State;

/// Committed entries re-read from a log, below the ones checked before, whenever its durable
/// committed prefix grows: a bug that rewrites a committed entry most likely rewrites the tail
/// while appending. Every log is re-read in full at the end of a run.
const TAIL_RECHECK_ENTRIES: u64 = 8;

/// An acknowledged submission: the client was told that `request_id` created `job_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub job_id: JobId,
    /// The lowest log index at which an acknowledgement of this request id committed.
    pub index: u64,
}

/// A committed entry as first seen; `data` is unknown when it was seen only through an apply.
struct SeenEntry {
    term: u64,
    data: Option<Vec<u8>>,
    seen_on: u64,
}

/// What the checker remembers about one live replica (reset when it crashes).
#[derive(Default, Clone, Copy)]
struct Watch {
    /// Log entries up to here were compared with the committed history.
    log_checked_to: u64,
    /// `applied_index` at the last state check; `None` forces one.
    state_checked_at: Option<u64>,
    commit_index: u64,
}

#[derive(Default)]
pub struct Checker {
    leaders: BTreeMap<u64, u64>,
    committed: BTreeMap<u64, SeenEntry>,
    acks: BTreeMap<String, Ack>,
    /// A submission was acknowledged since the last state check: every replica is re-checked.
    new_acks: bool,
    watches: BTreeMap<u64, Watch>,
}

impl Checker {
    pub fn acks(&self) -> &BTreeMap<String, Ack> {
        &self.acks
    }

    /// The replica crashed: its in-memory progress is gone, a restart starts the checks over.
    pub fn forget(&mut self, node: u64) {
        self.watches.remove(&node);
    }

    /// Re-reads every log in full on the next check.
    pub fn recheck_all_logs(&mut self) {
        for watch in self.watches.values_mut() {
            watch.log_checked_to = 0;
        }
    }

    /// Invariant 2 for entries seen through an apply (term only).
    pub fn observe_applied(&mut self, node: u64, index: u64, term: u64) {
        self.observe_entry(node, index, term, None);
    }

    fn observe_entry(&mut self, node: u64, index: u64, term: u64, data: Option<&[u8]>) {
        let seen = self.committed.entry(index).or_insert_with(|| SeenEntry { term, data: None, seen_on: node });
        assert_eq!(
            seen.term, term,
            "committed entry {index} changed: node {} saw term {}, node {node} has term {term}",
            seen.seen_on, seen.term
        );
        match (&seen.data, data) {
            (Some(known), Some(new)) => assert!(
                known.as_slice() == new,
                "committed entry {index} (term {term}) changed: node {node}'s data differs from node {}'s",
                seen.seen_on
            ),
            (None, Some(new)) => seen.data = Some(new.to_vec()),
            _ => {}
        }
    }

    /// A submission was acknowledged to its client by `node`, whose state has just applied it.
    pub fn acknowledge(
        &mut self,
        node: u64,
        request_id: &str,
        job_id: JobId,
        duplicate: bool,
        index: u64,
        state: &State,
    ) {
        assert_eq!(
            state.request_ids.get(request_id),
            Some(&job_id),
            "node {node}: ack of {request_id} at {index} names {job_id} but the state disagrees"
        );
        let job = state.jobs.get(&job_id).unwrap_or_else(|| panic!("node {node}: acked {job_id} is not in the state"));
        assert_eq!(
            duplicate,
            job.submitted_index != index,
            "node {node}: {request_id} acked at {index} with duplicate={duplicate}, but {job_id} was created at {}",
            job.submitted_index
        );
        let ack = self.acks.entry(request_id.to_string()).or_insert(Ack { job_id, index });
        assert_eq!(ack.job_id, job_id, "{request_id} was acked as {} and now as {job_id}", ack.job_id);
        ack.index = ack.index.min(index);
        self.new_acks = true;
    }

    /// Invariants 1 and 2 for one live replica, plus monotonic commit and apply progress.
    pub fn check_replica(&mut self, node: u64, replica: &mut Replica) {
        if replica.is_leader() {
            let term = replica.term();
            let leader = *self.leaders.entry(term).or_insert(node);
            assert_eq!(leader, node, "two leaders in term {term}: {leader} and {node}");
        }
        let mut watch = self.watches.get(&node).copied().unwrap_or_default();
        let commit = replica.commit_index();
        assert!(commit >= watch.commit_index, "node {node}: commit index went back {} -> {commit}", watch.commit_index);
        watch.commit_index = commit;
        // Only the persisted prefix: a follower may already know a commit index beyond entries it
        // is still about to overwrite on disk with the leader's.
        let durable = commit.min(replica.raft_mut().raft_log.persisted);
        if durable == watch.log_checked_to {
            self.watches.insert(node, watch);
            return;
        }
        let from = watch.log_checked_to.min(durable).saturating_sub(TAIL_RECHECK_ENTRIES) + 1;
        for (index, term, data) in replica.log_entries(from, durable + 1) {
            self.observe_entry(node, index, term, Some(&data));
        }
        watch.log_checked_to = durable;
        self.watches.insert(node, watch);
    }

    /// Invariants 3 and 4. `replicas` are the live ones; only those whose `applied_index`
    /// moved since the last check (or that restarted) are compared, since nothing else changes.
    pub fn check_states(&mut self, replicas: &[(u64, &Replica)]) {
        for &(node, replica) in replicas {
            let applied = replica.applied_index();
            let watch = self.watches.entry(node).or_default();
            if watch.state_checked_at == Some(applied) {
                if self.new_acks {
                    self.check_acks_present(node, replica);
                }
                continue;
            }
            if let Some(before) = watch.state_checked_at {
                assert!(applied >= before, "node {node}: applied index went back {before} -> {applied}");
            }
            watch.state_checked_at = Some(applied);
            self.check_acks_present(node, replica);
            for &(other, other_replica) in replicas {
                if other != node && other_replica.applied_index() == applied {
                    assert!(
                        replica.state() == other_replica.state(),
                        "nodes {node} and {other} applied up to {applied} but their states differ"
                    );
                }
            }
        }
        self.new_acks = false;
    }

    fn check_acks_present(&self, node: u64, replica: &Replica) {
        let applied = replica.applied_index();
        let state = replica.state();
        for (request_id, ack) in self.acks.iter().filter(|(_, ack)| ack.index <= applied) {
            assert_eq!(
                state.request_ids.get(request_id),
                Some(&ack.job_id),
                "node {node} applied up to {applied} but lost acknowledged {request_id} ({} at {})",
                ack.job_id,
                ack.index
            );
        }
    }

    /// End of run: every acknowledged request id names exactly one job in `state`.
    pub fn check_exactly_once(&self, node: u64, state: &State) {
        let mut jobs_per_request: BTreeMap<&str, usize> = BTreeMap::new();
        for job in state.jobs.values() {
            *jobs_per_request.entry(job.client_request_id.as_str()).or_default() += 1;
        }
        for (request_id, ack) in &self.acks {
            assert_eq!(
                jobs_per_request.get(request_id.as_str()).copied(),
                Some(1),
                "node {node}: acknowledged {request_id} is not present exactly once"
            );
            let job = state.request_ids.get(request_id).and_then(|id| state.jobs.get(id));
            assert_eq!(job.map(|j| j.id), Some(ack.job_id), "node {node}: {request_id} names another job");
        }
        assert_eq!(state.jobs.len(), state.request_ids.len(), "node {node}: jobs and request ids disagree");
    }
}
