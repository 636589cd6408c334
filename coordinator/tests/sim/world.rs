//! The simulated cluster: replicas, their disks, the network, the clients and the clock.
//!
//! Every operation here is one thing a real cluster does (a tick, a delivery, a Ready handled,
//! a proposal, a crash, a restart); the random schedule (`random_run`) and the scripted
//! scenarios (in `sim.rs`) decide the order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use flotilla_coordinator::raft::replica::{
    Committed, ELECTION_TICKS, ProposalId, Replica, ReplicaConfig, ReplicaError,
};
use flotilla_coordinator::raft::storage::RaftStore;
use flotilla_core::spec::JobSpec;
use flotilla_core::state::{Applied, Command, Envelope, State};
use raft::SnapshotStatus;
use raft::eraftpb::{Message, MessageType};
use rand::Rng;
use rand::rngs::SmallRng;

use super::checker::Checker;
use super::network::{Faults, NetStats, Network};

/// Rates are per mille so a seed can draw them as integers.
pub const PER_MILLE: u32 = 1000;
/// The clients' clock at step 0 (any fixed instant; the state machine only stores it).
const EPOCH_UNIX_MS: u64 = 1_700_000_000_000;
/// Wall-clock milliseconds one simulation step stands for, for the envelopes' timestamps.
const MS_PER_STEP: u64 = 10;
/// Readys handled for one node in a row at most by `advance_all`: each Ready is finite, so a
/// node that keeps producing them is stuck in a loop (a bug), not busy.
const READYS_PER_ADVANCE_MAX: usize = 64;
/// A RAM-backed directory on Linux, preferred for file-backed logs.
const RAM_DIRECTORY: &str = "/dev/shm";
/// The smallest job spec the coordinator accepts.
const JOB_SPEC_TOML: &str =
    "name = \"j\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\nworkers = { min = 1 }\n";

/// How a cluster is built and how its environment behaves.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub nodes: u64,
    pub snapshot_every_entries: u64,
    pub faults: Faults,
    /// Chance that a replica handles its Ready right after an operation; otherwise the Ready
    /// waits for an advance step (batching more work into it, or being lost to a crash).
    pub advance_now_per_mille: u32,
    /// Chance that the transport tells a sender its message was lost to a partition or to a
    /// down node (a refused connection); random drops are silent.
    pub report_unreachable_per_mille: u32,
    /// Keep each log in its write-ahead log files and reopen them on restart, instead of keeping
    /// the in-memory store object (slower; also drops the store's in-memory caches on a crash).
    pub file_backed: bool,
}

/// How a node goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Between two operations: everything handled so far was persisted.
    Clean,
    /// In the middle of a Ready: its early messages went out, nothing of it reached the disk.
    BeforePersist,
}

/// Counters for the run summary and the coverage assertions.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub proposals: u64,
    pub proposals_refused: u64,
    pub acks: u64,
    pub duplicate_acks: u64,
    pub crashes: u64,
    pub crashes_before_persist: u64,
    pub restarts: u64,
    pub partitions: u64,
    pub snapshots_installed: u64,
    pub snapshots_lost: u64,
    /// Hostile-input commands (garbage worker reports, and the registrations and gangs that
    /// give them jobs to aim at) applied with an effect, and refused.
    pub hostile_applied: u64,
    pub hostile_refused: u64,
    pub readys: u64,
    pub net: NetStats,
}

/// A crashed node's durable log, waiting for the restart.
enum Disk {
    /// The in-memory store object: what its transactions committed, plus its in-memory
    /// caches (so a commit index it had not written yet survives the crash).
    Memory(Box<RaftStore>),
    /// A log folder, reopened from scratch: exactly what was synced to it.
    File(PathBuf),
}

struct Node {
    config: ReplicaConfig,
    replica: Option<Replica>,
    /// The log while the node is down.
    disk: Option<Disk>,
    /// Where the log lives when the cluster is file-backed.
    file: Option<PathBuf>,
    /// Bumped on every restart, so proposals of an earlier life never match a waiter.
    incarnation: u64,
    next_sequence: u64,
    /// Proposals of this incarnation not yet seen committed, with their request ids (`None`:
    /// hostile input, whose outcome is not a client's acknowledgement).
    pending: BTreeMap<ProposalId, Option<String>>,
}

pub struct Sim {
    pub rng: SmallRng,
    /// Simulation steps so far: the fake clock.
    pub now: u64,
    nodes: Vec<Node>,
    pub net: Network,
    pub checker: Checker,
    pub stats: Stats,
    pub setup: Setup,
    spec: JobSpec,
    /// Snapshot send results the transport has yet to report to the senders:
    /// (sender, peer, status).
    snapshot_reports: Vec<(u64, u64, SnapshotStatus)>,
    /// Nodes operated on during the current action, whose Readys are due at its end.
    touched: BTreeSet<u64>,
    trace: bool,
    /// Keeps the files of a file-backed cluster alive for the run.
    _dir: Option<tempfile::TempDir>,
}

fn slot(id: u64) -> usize {
    usize::try_from(id - 1).expect("node ids are small")
}

/// A fresh directory for file-backed logs: in RAM (tmpfs) where there is one, since an fsync
/// there costs nothing and a crash is simulated by reopening the file, not by losing the page
/// cache.
fn log_directory() -> tempfile::TempDir {
    let ram = std::path::Path::new(RAM_DIRECTORY);
    let dir = if ram.is_dir() { tempfile::tempdir_in(ram) } else { tempfile::tempdir() };
    dir.expect("a temporary directory for the logs")
}

/// raft-rs draws election timeouts from a thread RNG; redraw from the seeded one whenever
/// raft-rs has just reset the election clock, so runs are reproducible.
fn fix_election_timeout(rng: &mut SmallRng, replica: &mut Replica) {
    let raft = replica.raft_mut();
    if raft.election_elapsed == 0 {
        raft.set_randomized_election_timeout(rng.random_range(ELECTION_TICKS..2 * ELECTION_TICKS));
    }
}

impl Sim {
    pub fn new(mut rng: SmallRng, setup: Setup) -> Sim {
        let dir = setup.file_backed.then(log_directory);
        let voters: Vec<u64> = (1..=setup.nodes).collect();
        let mut nodes = Vec::new();
        for &id in &voters {
            let config =
                ReplicaConfig { id, voters: voters.clone(), snapshot_every_entries: setup.snapshot_every_entries };
            let file = dir.as_ref().map(|d| d.path().join(format!("node-{id}")));
            let store = match &file {
                Some(path) => RaftStore::open(path).expect("a new log file"),
                None => RaftStore::in_memory().expect("an in-memory log"),
            };
            let mut replica = Replica::open(&config, store).expect("a fresh replica opens");
            fix_election_timeout(&mut rng, &mut replica);
            nodes.push(Node {
                config,
                replica: Some(replica),
                disk: None,
                file,
                incarnation: 0,
                next_sequence: 0,
                pending: BTreeMap::new(),
            });
        }
        let trace = std::env::var_os("FLOTILLA_SIM_TRACE").is_some();
        let spec = JobSpec::from_toml_str(JOB_SPEC_TOML).expect("the minimal job spec is valid");
        Sim {
            rng,
            now: 0,
            nodes,
            net: Network::new(setup.faults),
            checker: Checker::default(),
            stats: Stats::default(),
            setup,
            spec,
            snapshot_reports: Vec::new(),
            touched: BTreeSet::new(),
            trace,
            _dir: dir,
        }
    }

    /// Prints an event when `FLOTILLA_SIM_TRACE` is set (for replaying one seed).
    pub fn trace(&self, event: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[step {}] {}", self.now, event());
        }
    }

    pub fn ids(&self) -> impl Iterator<Item = u64> + use<> {
        1..=self.setup.nodes
    }

    pub fn live_ids(&self) -> Vec<u64> {
        self.ids().filter(|&id| self.is_live(id)).collect()
    }

    pub fn down_ids(&self) -> Vec<u64> {
        self.ids().filter(|&id| !self.is_live(id)).collect()
    }

    pub fn is_live(&self, id: u64) -> bool {
        self.nodes[slot(id)].replica.is_some()
    }

    pub fn replica(&self, id: u64) -> Option<&Replica> {
        self.nodes[slot(id)].replica.as_ref()
    }

    pub fn replica_mut(&mut self, id: u64) -> Option<&mut Replica> {
        self.nodes[slot(id)].replica.as_mut()
    }

    pub fn state(&self, id: u64) -> &State {
        self.replica(id).unwrap_or_else(|| panic!("node {id} is down")).state()
    }

    /// Live nodes that believe they lead, highest term first.
    pub fn leaders(&self) -> Vec<u64> {
        let mut leaders: Vec<u64> = self.ids().filter(|&id| self.replica(id).is_some_and(Replica::is_leader)).collect();
        leaders.sort_by_key(|&id| std::cmp::Reverse(self.replica(id).map_or(0, Replica::term)));
        leaders
    }

    /// The leader of the highest term, if a live node leads it.
    pub fn leader(&self) -> Option<u64> {
        self.leaders().first().copied()
    }

    pub fn tick(&mut self, id: u64) {
        self.tick_one(id);
        self.settle();
    }

    pub fn tick_all(&mut self) {
        for id in self.ids() {
            self.tick_one(id);
        }
        self.settle();
    }

    fn tick_one(&mut self, id: u64) {
        if let Some(replica) = self.replica_mut(id) {
            replica.tick();
            self.after_op(id);
        }
    }

    /// After an operation on a replica: reseed its election timeout; its Ready waits for the
    /// end of the current action (`settle`), like a node that drains its inbox first.
    fn after_op(&mut self, id: u64) {
        let Some(replica) = self.nodes[slot(id)].replica.as_mut() else { return };
        fix_election_timeout(&mut self.rng, replica);
        self.touched.insert(id);
    }

    /// End of an action: each node touched by it handles its Ready now, or maybe later.
    fn settle(&mut self) {
        for id in std::mem::take(&mut self.touched) {
            if self.rng.random_range(0..PER_MILLE) < self.setup.advance_now_per_mille {
                self.advance(id);
            }
        }
    }

    /// Handles one Ready of `id`: sends its messages and reports what it committed.
    pub fn advance(&mut self, id: u64) {
        let node = &mut self.nodes[slot(id)];
        let Some(replica) = node.replica.as_mut() else { return };
        if !replica.has_ready() {
            return;
        }
        if replica.raft_mut().raft_log.unstable.snapshot.is_some() {
            self.stats.snapshots_installed += 1;
        }
        self.stats.readys += 1;
        let output = replica.advance().unwrap_or_else(|e| panic!("node {id}: advance failed: {e}"));
        fix_election_timeout(&mut self.rng, replica);
        self.send(output.messages);
        for committed in output.committed {
            self.on_committed(id, committed);
        }
    }

    /// Handles every pending Ready of every live node.
    pub fn advance_all(&mut self) {
        for id in self.ids() {
            for _ in 0..READYS_PER_ADVANCE_MAX {
                if !self.replica(id).is_some_and(Replica::has_ready) {
                    break;
                }
                self.advance(id);
            }
            assert!(!self.replica(id).is_some_and(Replica::has_ready), "node {id} never runs out of Readys");
        }
    }

    fn on_committed(&mut self, id: u64, committed: Committed) {
        self.checker.observe_applied(id, committed.index, committed.term);
        let node = &mut self.nodes[slot(id)];
        let Some(proposal) = committed.proposal else { return };
        assert_eq!(proposal.node, id, "node {id} was handed another node's proposal");
        if proposal.incarnation != node.incarnation {
            return; // proposed before a restart: that client was already told nothing
        }
        let pending = node.pending.remove(&proposal).unwrap_or_else(|| {
            panic!("node {id}: {proposal:?} committed at {} twice or was never proposed", committed.index)
        });
        let Some(request_id) = pending else {
            // Applied without a panic: that, and identical replicas, is all hostile input gets.
            match committed.outcome {
                Ok(_) => self.stats.hostile_applied += 1,
                Err(_) => self.stats.hostile_refused += 1,
            }
            return;
        };
        let replica = node.replica.as_ref().expect("a node that applies is live");
        match committed.outcome {
            Ok(Applied::JobSubmitted { job_id, duplicate }) => {
                self.checker.acknowledge(id, &request_id, job_id, duplicate, committed.index, replica.state());
                self.stats.acks += 1;
                self.stats.duplicate_acks += u64::from(duplicate);
                self.trace(|| format!("node {id} acked {request_id} as {job_id} at {}", committed.index));
            }
            other => panic!("node {id}: submission {request_id} at {} ended as {other:?}", committed.index),
        }
    }

    fn send(&mut self, messages: Vec<Message>) {
        for lost in self.net.send(&mut self.rng, self.now, messages) {
            self.snapshot_lost(lost);
        }
    }

    /// Delivers at most `limit` of the messages due now, after the transport's reports on
    /// earlier snapshots.
    pub fn deliver(&mut self, limit: usize) {
        for (sender, peer, status) in std::mem::take(&mut self.snapshot_reports) {
            if let Some(replica) = self.replica_mut(sender) {
                replica.report_snapshot(peer, status);
                self.after_op(sender);
                self.trace(|| format!("node {sender} told its snapshot to {peer}: {status:?}"));
            }
        }
        let delivery = self.net.take_due(self.now, limit);
        for message in delivery.cut {
            self.lost_in_transit(message);
        }
        for message in delivery.arrived {
            let (from, to, snapshot) = (message.from, message.to, message.get_msg_type() == MessageType::MsgSnapshot);
            let Some(replica) = self.replica_mut(to) else {
                self.lost_in_transit(message);
                continue;
            };
            replica.step(message).unwrap_or_else(|e| panic!("node {to}: step failed: {e}"));
            self.after_op(to);
            if snapshot {
                self.trace(|| format!("node {to} received a snapshot from {from}"));
                self.snapshot_reports.push((from, to, SnapshotStatus::Finish));
            }
        }
        self.settle();
    }

    /// The transport reports every snapshot it could not hand over (raft-rs needs that to
    /// send another one).
    fn snapshot_lost(&mut self, message: Message) {
        self.stats.snapshots_lost += 1;
        self.snapshot_reports.push((message.from, message.to, SnapshotStatus::Failure));
    }

    /// A message the transport could not hand over: sometimes the sender hears of it.
    fn lost_in_transit(&mut self, message: Message) {
        if message.get_msg_type() == MessageType::MsgSnapshot {
            self.snapshot_lost(message);
            return;
        }
        if self.rng.random_range(0..PER_MILLE) >= self.setup.report_unreachable_per_mille {
            return;
        }
        if let Some(sender) = self.replica_mut(message.from) {
            sender.report_unreachable(message.to);
            self.after_op(message.from);
        }
    }

    /// A client asks node `via` to submit a job; returns the proposal if the node took it.
    pub fn submit(&mut self, via: u64, request_id: &str) -> Option<ProposalId> {
        let proposal = self.propose(via, request_id);
        self.settle();
        proposal
    }

    /// Several clients' submissions reach node `via` before it handles its next Ready.
    pub fn submit_burst(&mut self, via: u64, request_ids: &[String]) {
        for request_id in request_ids {
            self.propose(via, request_id);
        }
        self.settle();
    }

    /// Node `via` proposes hostile input (see `random_run::hostile_input`); `false` when it
    /// would not take it.
    pub fn propose_hostile(&mut self, via: u64, command: Command) -> bool {
        let taken = self.propose_command(via, None, command).is_some();
        self.settle();
        taken
    }

    fn propose(&mut self, via: u64, request_id: &str) -> Option<ProposalId> {
        let command =
            Command::SubmitJob { spec: Box::new(self.spec.clone()), client_request_id: request_id.to_string() };
        self.propose_command(via, Some(request_id.to_string()), command)
    }

    fn propose_command(&mut self, via: u64, request_id: Option<String>, command: Command) -> Option<ProposalId> {
        let at = EPOCH_UNIX_MS + self.now * MS_PER_STEP;
        let envelope = Envelope::new(at, command);
        let node = &mut self.nodes[slot(via)];
        let replica = node.replica.as_mut()?;
        let proposal = ProposalId { node: via, incarnation: node.incarnation, sequence: node.next_sequence };
        node.next_sequence += 1;
        match replica.propose(proposal, &envelope) {
            Ok(()) => {
                node.pending.insert(proposal, request_id);
                self.stats.proposals += 1;
                self.after_op(via);
                Some(proposal)
            }
            Err(ReplicaError::Raft(raft::Error::ProposalDropped)) => {
                self.stats.proposals_refused += 1;
                None
            }
            // What the real leader refuses to log (a value that would not decode).
            Err(ReplicaError::Snapshot(_)) if request_id.is_none() => None,
            Err(e) => panic!("node {via}: proposing {request_id:?} failed: {e}"),
        }
    }

    pub fn crash(&mut self, id: u64, mode: CrashMode) {
        let Some(replica) = self.nodes[slot(id)].replica.take() else { return };
        let store = match mode {
            CrashMode::Clean => replica.into_store(),
            CrashMode::BeforePersist => {
                let (messages, store) = replica.crash_before_persist();
                self.send(messages);
                self.stats.crashes_before_persist += 1;
                store
            }
        };
        let node = &mut self.nodes[slot(id)];
        node.disk = Some(match &node.file {
            Some(path) => {
                drop(store);
                Disk::File(path.clone())
            }
            None => Disk::Memory(Box::new(store)),
        });
        node.pending.clear();
        self.checker.forget(id);
        self.stats.crashes += 1;
        self.trace(|| format!("node {id} crashed ({mode:?})"));
    }

    /// Starts a crashed node again from its disk, as a new incarnation.
    pub fn restart(&mut self, id: u64) {
        let node = &mut self.nodes[slot(id)];
        let Some(disk) = node.disk.take() else { return };
        let store = match disk {
            Disk::Memory(store) => *store,
            Disk::File(path) => RaftStore::open(&path).unwrap_or_else(|e| panic!("node {id}: reopening the log: {e}")),
        };
        let mut replica =
            Replica::open(&node.config, store).unwrap_or_else(|e| panic!("node {id}: restart failed: {e}"));
        fix_election_timeout(&mut self.rng, &mut replica);
        node.replica = Some(replica);
        node.incarnation += 1;
        node.next_sequence = 0;
        self.stats.restarts += 1;
        self.trace(|| format!("node {id} restarted"));
    }

    pub fn partition(&mut self, side: BTreeSet<u64>) {
        self.trace(|| format!("partition {side:?} | rest"));
        self.net.partition(side);
        self.stats.partitions += 1;
    }

    pub fn heal(&mut self) {
        if self.net.partitioned() {
            self.trace(|| "partition healed".to_string());
        }
        self.net.heal();
    }

    /// Checks every invariant against every live replica.
    pub fn check(&mut self) {
        for node in &mut self.nodes {
            if let Some(replica) = node.replica.as_mut() {
                self.checker.check_replica(node.config.id, replica);
            }
        }
        let live: Vec<(u64, &Replica)> =
            self.nodes.iter().filter_map(|n| n.replica.as_ref().map(|r| (n.config.id, r))).collect();
        self.checker.check_states(&live);
    }

    /// One line per node, for failure messages.
    pub fn describe(&mut self) -> String {
        let mut lines = vec![format!("step {}, {} messages in flight", self.now, self.net.in_flight())];
        lines.extend(self.net.describe_in_flight());
        for node in &mut self.nodes {
            let id = node.config.id;
            let Some(replica) = node.replica.as_mut() else {
                lines.push(format!("  node {id}: down"));
                continue;
            };
            let (term, leader, commit, applied) =
                (replica.term(), replica.leader_id(), replica.commit_index(), replica.applied_index());
            let raft = replica.raft_mut();
            let (first, last, role) = (raft.raft_log.first_index(), raft.raft_log.last_index(), raft.state);
            lines.push(format!(
                "  node {id}: {role:?} term {term} leader {leader:?} log [{first}, {last}] commit {commit} applied {applied}"
            ));
            if replica.is_leader() {
                for (peer, progress) in replica.raft_mut().prs().iter() {
                    lines.push(format!("    progress of {peer}: {progress:?}"));
                }
            }
        }
        lines.join("\n")
    }
}
