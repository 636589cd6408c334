//! The async driver: one tokio task owns the [`Replica`] and loops on tick / inbound message /
//! request; everything else talks to it through a bounded channel ([`NodeHandle`]).
//!
//! ```text
//!   gRPC handlers ──Request──▶ ┌────────────── node task ──────────────┐ ──Message──▶ transport
//!   RaftService   ──Message──▶ │ tick / step / propose / read_index     │
//!                              │ advance(): persist (1 fsync), apply    │ ──outcome──▶ waiters
//!                              └────────────────────────────────────────┘
//! ```
//!
//! Requests that arrive together are proposed together and share one Ready, hence one fsync.
//! Every queue is bounded; a full queue answers `ResourceExhausted` instead of growing.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_core::state::{Applied, Command, Envelope, Rejected, State};
use flotilla_proto::{ApiError, ErrorKind};
use raft::eraftpb::Message;
use tokio::sync::{mpsc, oneshot, watch};

use super::replica::{Committed, Early, Output, PendingReads, ProposalId, Replica, ReplicaError, group_by_destination};

/// Interval between Raft ticks. With ELECTION_TICKS = 10 a leader is replaced 0.5 to 1 s after
/// it stops sending heartbeats.
pub const TICK: Duration = Duration::from_millis(50);
/// Requests queued for the node task at most (back-pressure to gRPC handlers).
pub const REQUEST_QUEUE_MAX: usize = 8192;
/// Proposals proposed but not yet committed at most.
pub const PROPOSALS_IN_FLIGHT_MAX: usize = 4096;
/// Linearizable reads waiting for their read index at most.
pub const READS_IN_FLIGHT_MAX: usize = 4096;
/// Requests taken from the queue before the task persists and replies (bounds latency).
const REQUESTS_PER_ROUND_MAX: usize = 1024;

/// A read executed by the node task against its state; it sends its own answer.
pub type ReadFn = Box<dyn FnOnce(Result<&State, ApiError>) + Send>;

pub enum Request {
    Propose {
        command: Command,
        reply: oneshot::Sender<Result<Applied, ApiError>>,
    },
    /// Linearizable read: runs once this node has applied the leader's commit index.
    Read(ReadFn),
    /// Read of this node's current state, possibly stale (watch streams).
    LocalRead(ReadFn),
    Raft(Vec<Message>),
    Unreachable(u64),
    /// How sending a snapshot to a peer ended (raft-rs pauses the peer until it knows).
    SnapshotSent {
        peer: u64,
        delivered: bool,
    },
}

/// What the node publishes about itself after every round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub leader_id: Option<u64>,
    pub term: u64,
    pub applied_index: u64,
}

/// A cheap, cloneable way to talk to the node task.
#[derive(Clone)]
pub struct NodeHandle {
    pub id: u64,
    requests: mpsc::Sender<Request>,
    status: watch::Receiver<NodeStatus>,
    /// Node id -> API address, to answer `NotLeader` with a hint.
    addresses: BTreeMap<u64, String>,
    /// This node's proposal latency and leader changes, for /metrics.
    pub metrics: std::sync::Arc<crate::metrics::RaftMetrics>,
}

impl NodeHandle {
    fn send(&self, request: Request) -> Result<(), ApiError> {
        self.requests.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ApiError::new(
                ErrorKind::ResourceExhausted,
                "coordinator is overloaded (request queue full); retry shortly",
            ),
            mpsc::error::TrySendError::Closed(_) => {
                ApiError::new(ErrorKind::Unavailable, "coordinator is shutting down")
            }
        })
    }

    /// Proposes `command` through Raft and waits for its outcome.
    pub async fn propose(&self, command: Command) -> Result<Applied, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Propose { command, reply })?;
        // Timed and counted until answered, or until the caller gives up (the guard's drop).
        let _in_flight = self.metrics.proposal();
        answer.await.map_err(|_| ApiError::new(ErrorKind::Unavailable, "coordinator stopped before answering"))?
    }

    /// Runs `f` on a linearizable view of the state (ReadIndex; works on followers too).
    pub async fn read<T: Send + 'static>(&self, f: impl FnOnce(&State) -> T + Send + 'static) -> Result<T, ApiError> {
        self.run_read(f, true).await
    }

    /// Runs `f` on this node's current state without a quorum round (may be stale).
    pub async fn read_local<T: Send + 'static>(
        &self,
        f: impl FnOnce(&State) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        self.run_read(f, false).await
    }

    async fn run_read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&State) -> T + Send + 'static,
        linearizable: bool,
    ) -> Result<T, ApiError> {
        let (reply, answer) = oneshot::channel();
        let read: ReadFn = Box::new(move |state| {
            let _ = reply.send(state.map(f));
        });
        self.send(if linearizable { Request::Read(read) } else { Request::LocalRead(read) })?;
        answer.await.map_err(|_| ApiError::new(ErrorKind::Unavailable, "coordinator stopped before answering"))?
    }

    pub fn deliver(&self, messages: Vec<Message>) -> Result<(), ApiError> {
        self.send(Request::Raft(messages))
    }

    pub fn report_unreachable(&self, peer: u64) {
        let _ = self.requests.try_send(Request::Unreachable(peer));
    }

    pub fn report_snapshot(&self, peer: u64, delivered: bool) {
        let _ = self.requests.try_send(Request::SnapshotSent { peer, delivered });
    }

    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// Resolves when the status changes (or the node stops).
    pub async fn changed(&mut self) -> bool {
        self.status.changed().await.is_ok()
    }

    pub fn not_leader(&self) -> ApiError {
        let status = self.status();
        ApiError::not_leader(status.leader_id.and_then(|id| self.addresses.get(&id).cloned()))
    }
}

/// Where the node task sends raft messages (the peer transport, or a test network).
pub trait Outbox: Send + 'static {
    fn send(&mut self, to: u64, messages: Vec<Message>);
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Creates the node's channel; run the returned [`NodeTask`] on a tokio task.
pub fn channel(replica: Replica, addresses: BTreeMap<u64, String>, incarnation: u64) -> (NodeHandle, NodeTask) {
    let (requests, inbox) = mpsc::channel(REQUEST_QUEUE_MAX);
    let status =
        NodeStatus { leader_id: replica.leader_id(), term: replica.term(), applied_index: replica.applied_index() };
    let (status_tx, status_rx) = watch::channel(status);
    let id = replica.id();
    let handle =
        NodeHandle { id, requests, status: status_rx, addresses: addresses.clone(), metrics: Default::default() };
    let task = NodeTask {
        replica,
        addresses,
        inbox,
        status: status_tx,
        incarnation,
        next_sequence: 0,
        proposals: HashMap::new(),
        read_waiters: HashMap::new(),
        next_read: 0,
        reads: PendingReads::default(),
        last_leader: None,
    };
    (handle, task)
}

pub struct NodeTask {
    replica: Replica,
    addresses: BTreeMap<u64, String>,
    inbox: mpsc::Receiver<Request>,
    status: watch::Sender<NodeStatus>,
    incarnation: u64,
    next_sequence: u64,
    proposals: HashMap<ProposalId, oneshot::Sender<Result<Applied, ApiError>>>,
    /// Read-index context -> reads waiting for the leader to confirm it.
    read_waiters: HashMap<u64, Vec<ReadFn>>,
    next_read: u64,
    /// Confirmed reads waiting for this node to apply up to their index.
    reads: PendingReads<ReadFn>,
    last_leader: Option<(u64, Option<u64>)>,
}

impl NodeTask {
    /// Runs until every handle is dropped or the log fails (a fatal error for this node).
    pub async fn run(mut self, mut outbox: impl Outbox) -> Result<(), ReplicaError> {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.replica.tick(),
                request = self.inbox.recv() => {
                    let Some(request) = request else { return Ok(()) };
                    self.handle(request)?;
                    for _ in 1..REQUESTS_PER_ROUND_MAX {
                        match self.inbox.try_recv() {
                            Ok(request) => self.handle(request)?,
                            Err(_) => break,
                        }
                    }
                }
            }
            while self.replica.has_ready() {
                let proposals = &mut self.proposals;
                let output = self.replica.advance_sending(&mut |early| match early {
                    Early::Messages(messages) => send_grouped(&mut outbox, messages),
                    Early::Committed(committed) => answer(proposals, committed),
                })?;
                self.dispatch(output, &mut outbox);
            }
            self.after_round();
        }
    }

    fn handle(&mut self, request: Request) -> Result<(), ReplicaError> {
        match request {
            Request::Propose { command, reply } => self.propose(command, reply),
            Request::Read(read) => self.read(read),
            Request::LocalRead(read) => read(Ok(self.replica.state())),
            Request::Raft(messages) => {
                for message in messages {
                    self.replica.step(message)?;
                }
            }
            Request::Unreachable(peer) => self.replica.report_unreachable(peer),
            Request::SnapshotSent { peer, delivered } => {
                let status = if delivered { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
                self.replica.report_snapshot(peer, status);
            }
        }
        Ok(())
    }

    fn propose(&mut self, command: Command, reply: oneshot::Sender<Result<Applied, ApiError>>) {
        if !self.replica.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if self.proposals.len() >= PROPOSALS_IN_FLIGHT_MAX {
            let _ = reply.send(Err(ApiError::new(
                ErrorKind::ResourceExhausted,
                format!("{PROPOSALS_IN_FLIGHT_MAX} proposals are in flight, the limit; retry shortly"),
            )));
            return;
        }
        let id = ProposalId { node: self.replica.id(), incarnation: self.incarnation, sequence: self.next_sequence };
        self.next_sequence += 1;
        match self.replica.propose(id, &Envelope::new(now_unix_ms(), command)) {
            Ok(()) => {
                self.proposals.insert(id, reply);
            }
            Err(ReplicaError::Snapshot(e)) => {
                let _ = reply.send(Err(ApiError::new(ErrorKind::InvalidArgument, e.to_string())));
            }
            Err(e) => {
                let _ = reply.send(Err(ApiError::new(ErrorKind::Unavailable, format!("proposal dropped: {e}; retry"))));
            }
        }
    }

    fn read(&mut self, read: ReadFn) {
        let waiting: usize = self.read_waiters.values().map(Vec::len).sum::<usize>() + self.reads.len();
        if waiting >= READS_IN_FLIGHT_MAX {
            read(Err(ApiError::new(ErrorKind::ResourceExhausted, "too many reads in flight; retry shortly")));
            return;
        }
        if self.replica.leader_id().is_none() {
            read(Err(ApiError::new(ErrorKind::Unavailable, "no leader is elected yet; retry shortly")));
            return;
        }
        // Reads arriving in the same round share one read-index round trip.
        let context = self.next_read;
        let first = !self.read_waiters.contains_key(&context);
        self.read_waiters.entry(context).or_default().push(read);
        if first {
            self.replica.read_index(context.to_le_bytes().to_vec());
        }
    }

    fn dispatch(&mut self, output: Output, outbox: &mut impl Outbox) {
        send_grouped(outbox, output.messages);
        answer(&mut self.proposals, output.committed);
        for read_state in output.reads {
            let Ok(bytes) = <[u8; 8]>::try_from(read_state.request_ctx.as_slice()) else { continue };
            for read in self.read_waiters.remove(&u64::from_le_bytes(bytes)).unwrap_or_default() {
                self.reads.push(read_state.index, read);
            }
        }
    }

    fn after_round(&mut self) {
        if self.read_waiters.contains_key(&self.next_read) {
            self.next_read += 1;
        }
        for read in self.reads.ready(self.replica.applied_index()) {
            read(Ok(self.replica.state()));
        }
        let leader = (self.replica.term(), self.replica.leader_id());
        if self.last_leader != Some(leader) {
            self.last_leader = Some(leader);
            self.fail_in_flight();
        }
        let status = NodeStatus { leader_id: leader.1, term: leader.0, applied_index: self.replica.applied_index() };
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }

    /// After a change of term or leader, proposals may or may not commit: tell their callers
    /// to retry (submissions are idempotent by request id), and re-ask pending reads.
    fn fail_in_flight(&mut self) {
        let still_leader = self.replica.is_leader();
        if !still_leader {
            for (_, reply) in self.proposals.drain() {
                let _ = reply.send(Err(ApiError::new(
                    ErrorKind::Unavailable,
                    "leadership changed before the request committed; retry with the same request id",
                )));
            }
        }
        for (_, reads) in self.read_waiters.drain() {
            for read in reads {
                read(Err(ApiError::new(ErrorKind::Unavailable, "leadership changed during the read; retry")));
            }
        }
    }

    fn not_leader(&self) -> ApiError {
        ApiError::not_leader(self.replica.leader_id().and_then(|id| self.addresses.get(&id).cloned()))
    }
}

/// Answers the proposers of `committed` entries that this node is waiting on.
fn answer(proposals: &mut HashMap<ProposalId, oneshot::Sender<Result<Applied, ApiError>>>, committed: Vec<Committed>) {
    for committed in committed {
        let Some(reply) = committed.proposal.and_then(|id| proposals.remove(&id)) else { continue };
        let _ = reply.send(committed.outcome.map_err(rejected_to_api));
    }
}

fn send_grouped(outbox: &mut impl Outbox, messages: Vec<Message>) {
    for (to, messages) in group_by_destination(messages) {
        outbox.send(to, messages);
    }
}

fn rejected_to_api(rejected: Rejected) -> ApiError {
    let kind = match rejected {
        Rejected::JobNotFound(_) | Rejected::WorkerNotFound(_) | Rejected::Model(_) | Rejected::NoShard { .. } => {
            ErrorKind::NotFound
        }
        Rejected::ShardDone { .. } => ErrorKind::AlreadyExists,
        Rejected::JobFinished { .. }
        | Rejected::NotResumable { .. }
        | Rejected::BadResume { .. }
        | Rejected::NotPending { .. }
        | Rejected::WorkerUnavailable(_)
        | Rejected::StillAssigned { .. }
        | Rejected::StaleGeneration { .. }
        | Rejected::NotNewer { .. }
        | Rejected::NotRunning { .. }
        | Rejected::CheckpointNotDeletable { .. }
        | Rejected::CheckpointMismatch { .. }
        | Rejected::RequestNotOutstanding(_)
        | Rejected::DuplicateRequest(_)
        | Rejected::NoHandover { .. }
        | Rejected::PriorityNotLower { .. } => ErrorKind::FailedPrecondition,
        Rejected::TooManyJobs { .. } | Rejected::TooManyWorkers { .. } | Rejected::TooManyInstanceRequests { .. } => {
            ErrorKind::ResourceExhausted
        }
        Rejected::BadRequestId
        | Rejected::BadInit { .. }
        | Rejected::BadGang { .. }
        | Rejected::BadAlias(_)
        | Rejected::BadInference(_)
        | Rejected::BadShardReport { .. }
        | Rejected::BadReport(_) => ErrorKind::InvalidArgument,
        Rejected::TooManyAliases { .. } => ErrorKind::ResourceExhausted,
        Rejected::NotAMember { .. } => ErrorKind::PermissionDenied,
    };
    ApiError::new(kind, rejected.to_string())
}
