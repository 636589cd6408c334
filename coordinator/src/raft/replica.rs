//! One coordinator's Raft replica: a `RawNode` over the durable log plus the state machine.
//!
//! Pure with respect to time and the network: the caller ticks it, feeds it messages and
//! proposals, and sends what [`Replica::advance`] returns. The async node and the deterministic
//! simulation drive this same code, so the simulation tests what production runs.
//!
//! Ready handling follows raft-rs's order: send messages; apply an incoming snapshot; apply
//! committed entries; persist snapshot + entries + HardState in one transaction (one fsync);
//! send persisted messages; advance; then the LightReady's commit index, messages and entries.
//! A follower applies the Ready's committed entries after persisting and sending its answers
//! instead (nobody waits for its apply; the leader waits for its answer), and a leader hands
//! their outcomes out before persisting (see [`Replica::advance_sending`]).

use std::collections::{BTreeMap, VecDeque};

use flotilla_core::state::{self, Applied, Envelope, Rejected, State};
use raft::eraftpb::{ConfState, Entry, EntryType, Message, Snapshot};
use raft::{Config, RawNode, ReadState, StateRole, Storage};

use super::storage::{RaftStore, StoreError};

/// Ticks without a heartbeat before a follower campaigns (randomised up to twice this).
pub const ELECTION_TICKS: usize = 10;
/// Ticks between leader heartbeats.
pub const HEARTBEAT_TICKS: usize = 2;
/// Applied entries between state-machine snapshots (and log compactions), at least: a snapshot
/// also waits until the entries applied since the last one weigh as much as it did, so that a
/// large state (100,000 jobs: 119 MB, 250 ms to serialise on the Raft thread) is not rewritten
/// every few seconds under load; it is written anyway after [`SNAPSHOT_EVERY_ENTRIES_MAX`].
pub const SNAPSHOT_EVERY_ENTRIES: u64 = 10_000;
/// Applied entries between snapshots at most, whatever the sizes: bounds what a restarted node
/// re-applies (etcd's default snapshot count).
pub const SNAPSHOT_EVERY_ENTRIES_MAX: u64 = 100_000;
/// Bytes of entries in one append message at most.
const MAX_SIZE_PER_MSG_BYTES: u64 = 1024 * 1024;
/// Append messages in flight per follower at most.
const MAX_INFLIGHT_MSGS: usize = 256;
/// Bytes of proposed-but-uncommitted entries the leader accepts at most (back-pressure).
const MAX_UNCOMMITTED_BYTES: u64 = 64 * 1024 * 1024;

/// Identifies a proposal so the proposer can find its outcome among the committed entries.
/// `incarnation` is chosen at process start, so entries proposed before a restart never match
/// waiters after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProposalId {
    pub node: u64,
    pub incarnation: u64,
    pub sequence: u64,
}

impl ProposalId {
    fn encode(self) -> Vec<u8> {
        [self.node, self.incarnation, self.sequence].iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn decode(bytes: &[u8]) -> Option<ProposalId> {
        if bytes.len() != 24 {
            return None;
        }
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8-byte slice"));
        Some(ProposalId { node: word(0), incarnation: word(1), sequence: word(2) })
    }
}

/// A committed command and its outcome, in log order.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    pub index: u64,
    pub term: u64,
    /// Set when this replica proposed the entry (in this incarnation).
    pub proposal: Option<ProposalId>,
    pub outcome: Result<Applied, Rejected>,
}

/// What [`Replica::advance_sending`] hands out before the Ready is handled completely.
#[derive(Debug)]
pub enum Early {
    /// Messages that may go out now.
    Messages(Vec<Message>),
    /// Committed entries, applied: their proposers may be answered now.
    Committed(Vec<Committed>),
}

/// What one call to [`Replica::advance`] produced.
#[derive(Debug, Default)]
pub struct Output {
    /// Raft messages to deliver to peers (in order).
    pub messages: Vec<Message>,
    pub committed: Vec<Committed>,
    /// Confirmed read indexes: a read with this context may be served once `applied_index`
    /// reaches `index`.
    pub reads: Vec<ReadState>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("state-machine snapshot: {0}")]
    Snapshot(#[from] state::SnapshotError),
    /// Skipping the entry would let this replica's state diverge from the others', so the
    /// node stops before applying it (a node of an older version met a newer command: upgrade
    /// it; on restart it applies the entry from the log).
    #[error(
        "committed entry {index} cannot be decoded by this version ({reason}); stopping so that the replicas do not \
         diverge: run the same flotilla version on every coordinator"
    )]
    Undecodable { index: u64, reason: String },
}

/// Static configuration of one replica.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub id: u64,
    /// Every voter's id, this one included.
    pub voters: Vec<u64>,
    pub snapshot_every_entries: u64,
}

pub struct Replica {
    node: RawNode<RaftStore>,
    state: State,
    applied_index: u64,
    snapshot_index: u64,
    snapshot_every_entries: u64,
    /// Bytes of the latest snapshot, and of the entries applied since it.
    snapshot_bytes: u64,
    applied_bytes_since_snapshot: u64,
    /// The envelopes this replica proposed and has not applied yet, as their entries decode
    /// (the check before proposing decodes them anyway): applying its own proposals skips a
    /// second decode, 14% of a leader's CPU under a stream of submissions. Bounded; a proposal
    /// that never commits leaves when a later one of this replica applies.
    proposed: BTreeMap<ProposalId, Envelope>,
}

/// Proposed envelopes kept for their apply at most (beyond it the oldest is decoded again).
const PROPOSED_KEPT_MAX: usize = 4096;

impl Replica {
    /// Starts a replica over `store`: restores the state machine from the stored snapshot; the
    /// committed entries after it are re-applied through the first Readys.
    pub fn open(config: &ReplicaConfig, store: RaftStore) -> Result<Replica, ReplicaError> {
        store.bootstrap(&config.voters)?;
        let snapshot = store.snapshot_with_data()?;
        let state = State::from_snapshot(snapshot.get_data())?;
        let snapshot_index = snapshot.get_metadata().index;
        let raft_config = Config {
            id: config.id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            applied: snapshot_index,
            max_size_per_msg: MAX_SIZE_PER_MSG_BYTES,
            max_inflight_msgs: MAX_INFLIGHT_MSGS,
            max_uncommitted_size: MAX_UNCOMMITTED_BYTES,
            check_quorum: true,
            pre_vote: true,
            // A leader tells the followers a new commit index with its next append or
            // heartbeat (at most HEARTBEAT_TICKS later), not in an append of its own: at one
            // client that halved the messages per write (leader: 2 in and 2 out instead of 4
            // and 4) and took the servers' CPU per write to 0.84x. A follower's own view
            // (watch streams, metrics) may lag by up to a heartbeat (100 ms) after the last
            // write; worker calls go to the leader, and a follower's linearizable read learns
            // the commit index from the heartbeats of its read-index round.
            skip_bcast_commit: true,
            ..Config::default()
        };
        raft_config.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node = RawNode::new(&raft_config, store, &logger)?;
        Ok(Replica {
            node,
            state,
            applied_index: snapshot_index,
            snapshot_index,
            snapshot_every_entries: config.snapshot_every_entries.max(1),
            snapshot_bytes: snapshot.get_data().len() as u64,
            applied_bytes_since_snapshot: 0,
            proposed: BTreeMap::new(),
        })
    }

    pub fn id(&self) -> u64 {
        self.node.raft.id
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// The leader this replica knows of, if any.
    pub fn leader_id(&self) -> Option<u64> {
        Some(self.node.raft.leader_id).filter(|&id| id != raft::INVALID_ID)
    }

    pub fn commit_index(&self) -> u64 {
        self.node.raft.raft_log.committed
    }

    /// The raft core, for simulation hooks (seeded election timeouts).
    pub fn raft_mut(&mut self) -> &mut raft::Raft<RaftStore> {
        &mut self.node.raft
    }

    pub fn tick(&mut self) {
        self.node.tick();
    }

    /// Feeds a message from a peer. Messages for another node or from an unknown one are the
    /// caller's to filter; raft-rs ignores stale terms itself.
    pub fn step(&mut self, message: Message) -> Result<(), ReplicaError> {
        match self.node.step(message) {
            // Harmless for a peer message: an unknown sender, a local message type, or a
            // proposal forwarded to a node that cannot take it (the proposer retries).
            Ok(())
            | Err(raft::Error::StepPeerNotFound)
            | Err(raft::Error::StepLocalMsg)
            | Err(raft::Error::ProposalDropped) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Proposes a command. Only the leader proposes; callers check [`Replica::is_leader`].
    pub fn propose(&mut self, id: ProposalId, envelope: &Envelope) -> Result<(), ReplicaError> {
        let (bytes, decoded) = envelope.encode_checked()?;
        self.node.propose(id.encode(), bytes)?;
        if self.proposed.len() >= PROPOSED_KEPT_MAX {
            self.proposed.pop_first();
        }
        self.proposed.insert(id, decoded);
        Ok(())
    }

    /// Asks for a linearizable read point; the answer arrives in [`Output::reads`].
    pub fn read_index(&mut self, context: Vec<u8>) {
        self.node.read_index(context);
    }

    pub fn report_unreachable(&mut self, peer: u64) {
        self.node.report_unreachable(peer);
    }

    /// Tells raft-rs how sending a `MsgSnapshot` to `peer` ended. The transport must report
    /// every snapshot it was handed: until it does, the leader sends that peer nothing else, so
    /// a lost snapshot would stall the peer until the leadership changes.
    pub fn report_snapshot(&mut self, peer: u64, status: raft::SnapshotStatus) {
        self.node.report_snapshot(peer, status);
    }

    pub fn has_ready(&self) -> bool {
        self.node.has_ready()
    }

    /// Handles one Ready completely (see the module docs for the order); every message is
    /// returned in [`Output::messages`].
    pub fn advance(&mut self) -> Result<Output, ReplicaError> {
        let (mut messages, mut committed) = (Vec::new(), Vec::new());
        let mut out = self.advance_sending(&mut |early| match early {
            Early::Messages(m) => messages.extend(m),
            Early::Committed(c) => committed.extend(c),
        })?;
        messages.append(&mut out.messages);
        committed.append(&mut out.committed);
        (out.messages, out.committed) = (messages, committed);
        Ok(out)
    }

    /// Like [`Replica::advance`], but hands out first what need not wait for the rest of the
    /// Ready: the messages raft-rs allows out before persisting (a leader's appends, so the
    /// followers' fsyncs overlap the leader's own); on a leader, the committed entries' outcomes
    /// before its fsync (they are on a quorum already; the fsync is for the new entries); then
    /// the persisted messages (a follower's answers to the leader) before a follower applies
    /// what was committed, which nobody waits for.
    pub fn advance_sending(&mut self, early: &mut dyn FnMut(Early)) -> Result<Output, ReplicaError> {
        let mut out = Output::default();
        if !self.node.has_ready() {
            return Ok(out);
        }
        let mut ready = self.node.ready();
        let messages = ready.take_messages();
        if !messages.is_empty() {
            early(Early::Messages(messages));
        }
        let incoming = if ready.snapshot().get_metadata().index > 0 { Some(ready.snapshot().clone()) } else { None };
        if let Some(snapshot) = &incoming {
            self.restore(snapshot)?;
        }
        let mut committed = ready.take_committed_entries();
        if self.is_leader() {
            let mut applied = Vec::new();
            self.apply_entries(std::mem::take(&mut committed), &mut applied)?;
            if !applied.is_empty() {
                early(Early::Committed(applied));
            }
        }
        self.node.store().persist(incoming.as_ref(), ready.entries(), ready.hs())?;
        let persisted = ready.take_persisted_messages();
        if !persisted.is_empty() {
            early(Early::Messages(persisted));
        }
        // A follower's (a leader's are applied above).
        self.apply_entries(committed, &mut out.committed)?;
        out.reads.extend(ready.take_read_states());
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.node.store().set_commit(commit);
        }
        out.messages.extend(light.take_messages());
        self.apply_entries(light.take_committed_entries(), &mut out.committed)?;
        self.node.advance_apply_to(self.applied_index);
        self.maybe_snapshot()?;
        Ok(out)
    }

    /// Simulates a crash in the middle of a Ready: the messages raft-rs allows to be sent
    /// before persisting go out, then the process dies and nothing of this Ready is persisted.
    /// Returns those messages and the durable log as the crash left it.
    pub fn crash_before_persist(mut self) -> (Vec<Message>, RaftStore) {
        let messages = if self.node.has_ready() { self.node.ready().take_messages() } else { Vec::new() };
        (messages, self.into_store())
    }

    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), ReplicaError> {
        self.state = State::from_snapshot(snapshot.get_data())?;
        self.applied_index = snapshot.get_metadata().index;
        self.snapshot_index = self.applied_index;
        self.snapshot_bytes = snapshot.get_data().len() as u64;
        self.applied_bytes_since_snapshot = 0;
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>, out: &mut Vec<Committed>) -> Result<(), ReplicaError> {
        let me = self.id();
        for entry in entries {
            if entry.index <= self.applied_index {
                continue;
            }
            if entry.data.is_empty() || entry.get_entry_type() != EntryType::EntryNormal {
                // The empty entry a new leader appends; membership is static (from config), so
                // no conf changes are proposed.
                self.applied_index = entry.index;
                continue;
            }
            let proposal = ProposalId::decode(&entry.context).filter(|p| p.node == me);
            let envelope = match proposal.and_then(|p| self.take_proposed(p)) {
                Some(envelope) => envelope,
                None => Envelope::decode(&entry.data)
                    .map_err(|e| ReplicaError::Undecodable { index: entry.index, reason: e.to_string() })?,
            };
            self.applied_index = entry.index;
            self.applied_bytes_since_snapshot += entry.data.len() as u64;
            let outcome = state::apply(&mut self.state, entry.index, envelope);
            out.push(Committed { index: entry.index, term: entry.term, proposal, outcome });
        }
        Ok(())
    }

    /// The envelope of this replica's proposal `id`, now applied. A proposal's id names its
    /// entry alone (this process's incarnation, a sequence never reused), so its entry holds the
    /// bytes it was decoded from. Earlier proposals still kept never committed (proposals of one
    /// replica commit in order): they leave.
    fn take_proposed(&mut self, id: ProposalId) -> Option<Envelope> {
        self.proposed = self.proposed.split_off(&id);
        self.proposed.remove(&id)
    }

    fn maybe_snapshot(&mut self) -> Result<(), ReplicaError> {
        let since = self.applied_index.saturating_sub(self.snapshot_index);
        let every = self.snapshot_every_entries;
        if snapshot_due(since, every, self.applied_bytes_since_snapshot, self.snapshot_bytes) {
            let data = self.state.to_snapshot();
            self.node.store().compact_to_snapshot(self.applied_index, &data)?;
            self.snapshot_index = self.applied_index;
            self.snapshot_bytes = data.len() as u64;
            self.applied_bytes_since_snapshot = 0;
        }
        Ok(())
    }

    /// Voters as the log records them.
    pub fn conf_state(&self) -> ConfState {
        self.node.store().initial_state().map(|s| s.conf_state).unwrap_or_default()
    }

    /// Entries still in the log, for invariant checks: (index, term, data) of `[low, high)`.
    pub fn log_entries(&self, low: u64, high: u64) -> Vec<(u64, u64, Vec<u8>)> {
        let store = self.node.store();
        let first = store.first_index().unwrap_or(1).max(low);
        let last = store.last_index().unwrap_or(0).min(high.saturating_sub(1));
        if first > last {
            return Vec::new();
        }
        store
            .entries(first, last + 1, None, raft::GetEntriesContext::empty(false))
            .map(|es| es.into_iter().map(|e| (e.index, e.term, e.data.to_vec())).collect())
            .unwrap_or_default()
    }

    /// Hands back the durable log (what survives a crash).
    pub fn into_store(self) -> RaftStore {
        let Replica { node, .. } = self;
        let RawNode { raft, .. } = node;
        raft.r.raft_log.store
    }
}

/// Whether a snapshot is due after `entries` applied entries of `entry_bytes` since the last
/// one, which was `snapshot_bytes`: at least `every` entries and as many bytes as the snapshot,
/// or `every` x 10 entries (at most [`SNAPSHOT_EVERY_ENTRIES_MAX`]) whatever the bytes.
fn snapshot_due(entries: u64, every: u64, entry_bytes: u64, snapshot_bytes: u64) -> bool {
    let most = every.saturating_mul(10).min(SNAPSHOT_EVERY_ENTRIES_MAX).max(every);
    entries >= most || (entries >= every && entry_bytes >= snapshot_bytes)
}

/// Messages queued for peers, grouped by destination, in order.
pub fn group_by_destination(messages: Vec<Message>) -> Vec<(u64, Vec<Message>)> {
    let mut groups: Vec<(u64, Vec<Message>)> = Vec::new();
    for message in messages {
        match groups.iter_mut().find(|(to, _)| *to == message.to) {
            Some((_, list)) => list.push(message),
            None => groups.push((message.to, vec![message])),
        }
    }
    groups
}

/// A FIFO of read requests waiting for their read index to be applied.
#[derive(Debug)]
pub struct PendingReads<T> {
    waiting: VecDeque<(u64, T)>,
}

impl<T> Default for PendingReads<T> {
    fn default() -> Self {
        PendingReads { waiting: VecDeque::new() }
    }
}

impl<T> PendingReads<T> {
    pub fn push(&mut self, index: u64, item: T) {
        self.waiting.push_back((index, item));
    }

    /// Reads whose index has been applied.
    pub fn ready(&mut self, applied_index: u64) -> Vec<T> {
        let mut out = Vec::new();
        let mut keep = VecDeque::new();
        for (index, item) in self.waiting.drain(..) {
            if index <= applied_index { out.push(item) } else { keep.push_back((index, item)) }
        }
        self.waiting = keep;
        out
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_waits_for_as_many_bytes_of_entries_as_it_weighs_up_to_ten_times_the_entries() {
        // A small state: every 10,000 entries, as before.
        assert!(!snapshot_due(9_999, 10_000, 3_000_000, 50_000));
        assert!(snapshot_due(10_000, 10_000, 3_000_000, 50_000));
        // A large one (11 MB): not before 11 MB of entries ...
        assert!(!snapshot_due(30_000, 10_000, 9_000_000, 11_000_000));
        assert!(snapshot_due(37_000, 10_000, 11_100_000, 11_000_000));
        // ... nor after 100,000 entries whatever the bytes.
        assert!(!snapshot_due(99_999, 10_000, 30_000_000, 119_000_000));
        assert!(snapshot_due(100_000, 10_000, 30_000_000, 119_000_000));
        // A small `every` (tests, `--snapshot-every-entries`) caps at ten times it.
        assert!(snapshot_due(1_000, 100, 1, 1_000_000));
        assert!(!snapshot_due(999, 100, 1, 1_000_000));
    }

    /// A single voter, elected.
    fn single_voter_leader() -> Replica {
        let store = RaftStore::in_memory().expect("store");
        let config = ReplicaConfig { id: 1, voters: vec![1], snapshot_every_entries: 1000 };
        let mut replica = Replica::open(&config, store).expect("open");
        for _ in 0..200 {
            if replica.is_leader() {
                break;
            }
            replica.tick();
            while replica.has_ready() {
                replica.advance().expect("a healthy ready");
            }
        }
        assert!(replica.is_leader(), "a single voter elects itself");
        replica
    }

    #[test]
    fn own_proposals_apply_as_their_entries_decode_and_those_that_never_commit_are_forgotten() {
        use flotilla_core::state::Command;
        let mut replica = single_voter_leader();
        let mut expected = replica.state().clone();
        let first = replica.applied_index() + 1;
        let id = |sequence| ProposalId { node: 1, incarnation: 7, sequence };
        // Proposed once and lost (a leadership change): its entry never commits.
        let lost = Envelope::new(1, Command::CancelJob { job_id: flotilla_core::JobId(1), reason: "lost".into() });
        replica.proposed.insert(id(0), lost);
        let text =
            "name = \"p\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\nworkers = { min = 1 }\n";
        let spec = flotilla_core::spec::JobSpec::from_toml_str(text).expect("valid");
        for i in 1..=3 {
            let submit = Command::SubmitJob { spec: Box::new(spec.clone()), client_request_id: format!("r{i}") };
            replica.propose(id(i), &Envelope::new(1000 + i, submit)).expect("propose");
        }
        let mut committed = Vec::new();
        while replica.has_ready() {
            committed.extend(replica.advance().expect("a healthy ready").committed);
        }
        assert_eq!(committed.iter().filter_map(|c| c.proposal).collect::<Vec<_>>(), [id(1), id(2), id(3)]);
        assert!(replica.proposed.is_empty(), "applied, and the lost one forgotten: {:?}", replica.proposed.keys());
        // Every replica decodes the entries from the log: the proposer's state is theirs.
        let last = replica.applied_index();
        let entries = replica.node.store().entries(first, last + 1, None, raft::GetEntriesContext::empty(false));
        for entry in entries.expect("entries").into_iter().filter(|e| !e.data.is_empty()) {
            let envelope = Envelope::decode(&entry.data).expect("decodes");
            let _ = flotilla_core::state::apply(&mut expected, entry.index, envelope);
        }
        assert_eq!(expected.jobs.len(), 3);
        assert_eq!(&expected, replica.state());
    }

    #[test]
    fn an_entry_this_version_cannot_decode_stops_the_replica_before_applying_it() {
        let mut replica = single_voter_leader();
        let applied = replica.applied_index();
        replica.node.propose(Vec::new(), b"{\"not\": \"an envelope\"}".to_vec()).expect("propose");
        let mut stopped = None;
        while replica.has_ready() && stopped.is_none() {
            stopped = replica.advance().err();
        }
        let error = stopped.expect("the replica stops").to_string();
        assert!(error.contains(&format!("committed entry {} cannot be decoded", applied + 1)), "{error}");
        assert_eq!(replica.applied_index(), applied, "the entry was not applied (nor skipped)");
    }
}
