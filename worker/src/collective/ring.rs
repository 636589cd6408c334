//! Ring all-reduce over TCP: the CPU backend of [`Communicator`].
//!
//! ```text
//!   rank 0 ──▶ rank 1 ──▶ rank 2 ──▶ ... ──▶ rank W-1 ──┐
//!     ▲                                                 │
//!     └─────────────────────────────────────────────────┘
//! ```
//!
//! Each rank holds one connection to its successor (`next`, written) and one from its
//! predecessor (`prev`, read). The buffer is cut into W chunks. Reduce-scatter: in W-1 steps
//! each rank forwards a partial sum and adds what it receives, until rank r holds the full sum of
//! chunk r+1. All-gather: in W-1 more steps the full sums travel around the ring and overwrite.
//! Each rank sends and receives 2(W-1)/W of the buffer: the bandwidth-optimal schedule.
//!
//! Pipelining: chunks move in segments, and one thread per rank keeps both links busy: with
//! both sockets non-blocking it writes queued segments to the successor while the kernel takes
//! them, reads from the predecessor what has arrived, and sleeps in `poll` only when neither
//! can move. A segment is forwarded as soon as it is reduced. One thread, not a sender and a
//! receiver: on a machine with fewer cores than threads the hand-offs cost more than the work.
//!
//! No copies in user space: segments are written straight from the caller's buffer, a received
//! segment is read into one cache-sized scratch buffer and added into place (reduce-scatter),
//! or read straight into the buffer (all-gather, broadcast). A segment still queued for the
//! successor is not read into until it has been written.
//!
//! Determinism: chunk c is summed along the ring in one fixed order (starting at rank c) and
//! then copied, so every rank holds bit-identical results, run after run.
//!
//! Rendezvous: only ranks that hold the gang's secret (from the assignment) join. Each link
//! runs a challenge-response over fresh nonces, in an order that cannot deadlock the ring:
//!
//! ```text
//!   rank r ──▶ r+1: hello (magic, gang id, rank, world) + nonce_c
//!   r+1 ──▶ r:      nonce_a + HMAC(secret, "accept"  | hello | nonce_c | nonce_a)   (in accept)
//!   rank r ──▶ r+1: HMAC(secret, "connect" | hello | nonce_c | nonce_a)             (after accept)
//! ```
//!
//! A peer without the secret (a port scan, a stale generation, an attacker who guessed the
//! gang id) fails the rendezvous and never sees or sends gradients. A member may also join the
//! running ring in place of one that leaves, proving the same secret, without a rendezvous of
//! the whole gang (`join`, the live handover's links). The data that follows is
//! plain TCP: keep the data port on a private network.
//!
//! Failure: every socket read and write has the operation timeout; a peer that dies resets
//! its connections (immediate `PeerLost`), one that stalls times out (`Timeout`). Each
//! operation starts with a header (operation, length) checked against the predecessor's, so
//! ranks that disagree fail loudly instead of mixing data.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::SockRef;

use super::port::DataPort;
use super::{CollectiveError, Communicator};

mod join;

/// Bytes per pipelined segment: large enough to amortise syscalls, small enough that the
/// next rank starts forwarding early and a received segment is summed while still in cache.
const SEGMENT_BYTES: usize = 256 * 1024;
/// Socket send/receive buffer size requested from the kernel.
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// Ranks in one ring at most.
pub const WORLD_MAX: usize = 1024;
/// Elements in one all-reduce or broadcast at most (4 GiB of f32).
pub const ELEMENTS_MAX: usize = 1 << 30;
/// Pause between connection attempts while peers start up.
const CONNECT_RETRY: Duration = Duration::from_millis(20);
const HANDSHAKE_MAGIC: u64 = super::port::RING_MAGIC;
/// Bytes of a gang secret.
pub const GANG_SECRET_LEN: usize = 32;
const HELLO_LEN: usize = 24;
pub(crate) const NONCE_LEN: usize = 16;
pub(crate) const MAC_LEN: usize = 32;

const OP_ALL_REDUCE: u32 = 1;
const OP_BROADCAST: u32 = 2;

/// Where each rank of the gang listens, and how long any operation may take.
#[derive(Debug, Clone)]
pub struct RingConfig {
    pub rank: usize,
    /// Listening address of every rank, in rank order.
    pub addresses: Vec<SocketAddr>,
    /// Identifies this gang generation; connections from another generation are refused.
    pub gang_id: u64,
    /// The gang's shared secret ([`GANG_SECRET_LEN`] bytes): the rendezvous proves it.
    pub secret: Vec<u8>,
    pub timeout: Duration,
    /// How long a refused connection to the next rank is retried. Agents bind their data port
    /// for their whole life, so among agents a refusal means the peer process is gone: a short
    /// grace fails the rendezvous in about a second instead of the whole timeout.
    pub refused_grace: Duration,
    /// Set from outside to give up a rendezvous in progress (the generation was superseded).
    pub abort: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl RingConfig {
    /// A config that retries refused connections for the whole timeout and cannot be aborted.
    pub fn new(
        rank: usize,
        addresses: Vec<SocketAddr>,
        gang_id: u64,
        secret: Vec<u8>,
        timeout: Duration,
    ) -> RingConfig {
        RingConfig { rank, addresses, gang_id, secret, timeout, refused_grace: timeout, abort: None }
    }

    fn aborted(&self) -> bool {
        is_set(self.abort.as_ref())
    }
}

/// Whether an abort flag is given and set.
fn is_set(flag: Option<&Arc<std::sync::atomic::AtomicBool>>) -> bool {
    flag.is_some_and(|a| a.load(std::sync::atomic::Ordering::Relaxed))
}

pub struct RingCommunicator {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Set from outside to end a collective that waits (the generation was superseded): it
    /// fails within [`ABORT_CHECK`] instead of waiting out `timeout` for a peer that is gone
    /// silently (a frozen or cut-off host), holding the rank's memory meanwhile.
    abort: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Connection to rank + 1 (None when the world has one rank).
    next: Option<TcpStream>,
    /// Connection from rank - 1.
    prev: Option<TcpStream>,
    /// Where a received segment lands before it is added (reduce-scatter): one segment,
    /// allocated once the ring is joined (a world of one has none).
    scratch: Vec<f32>,
    /// Where links from a member joining the running ring arrive (the rendezvous' listener or
    /// data port, kept); None on a member that joined a running ring itself without one.
    incoming: Option<Incoming>,
    /// The gang's identity and secret, which a joining member proves like a rendezvous peer.
    gang_id: u64,
    secret: Vec<u8>,
    /// Joining members' links in their handshake, and proven ones not yet in use (see
    /// [`join`]).
    handshaking: Vec<join::Handshake>,
    joining: Vec<join::JoinLink>,
}

fn lost(operation: &'static str, peer: usize, err: &std::io::Error, timeout: Duration) -> CollectiveError {
    match err.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            CollectiveError::Timeout { operation, peer, timeout }
        }
        _ => CollectiveError::PeerLost { operation, peer, reason: err.to_string() },
    }
}

fn tune(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let socket = SockRef::from(stream);
    socket.set_send_buffer_size(SOCKET_BUFFER_BYTES)?;
    socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES)?;
    Ok(())
}

impl RingCommunicator {
    /// Joins the ring: connects to rank + 1 and accepts rank - 1 on `listener` (which must be
    /// bound to `config.addresses[config.rank]`), within `config.timeout`.
    pub fn connect(listener: TcpListener, config: RingConfig) -> Result<RingCommunicator, CollectiveError> {
        listener.set_nonblocking(true).map_err(|e| CollectiveError::Rendezvous(format!("listener: {e}")))?;
        RingCommunicator::rendezvous(Incoming::Listener(listener), config)
    }

    /// [`RingCommunicator::connect`] through an agent's [`DataPort`], which also takes other
    /// protocols on the same port.
    pub fn connect_via(port: &Arc<DataPort>, config: RingConfig) -> Result<RingCommunicator, CollectiveError> {
        RingCommunicator::rendezvous(Incoming::Port(port.clone()), config)
    }

    /// A ring of `config`'s shape with no links yet, after checking the config.
    fn unlinked(config: &RingConfig, incoming: Option<Incoming>) -> Result<RingCommunicator, CollectiveError> {
        let world = config.addresses.len();
        if world == 0 || world > WORLD_MAX || config.rank >= world {
            return Err(CollectiveError::Invalid(format!(
                "rank {} in a world of {world} (1..={WORLD_MAX})",
                config.rank
            )));
        }
        if config.secret.len() != GANG_SECRET_LEN {
            return Err(CollectiveError::Invalid(format!(
                "the gang secret is {} bytes; it must be {GANG_SECRET_LEN}",
                config.secret.len()
            )));
        }
        Ok(RingCommunicator {
            rank: config.rank,
            world,
            timeout: config.timeout,
            abort: config.abort.clone(),
            next: None,
            prev: None,
            scratch: Vec::new(),
            incoming,
            gang_id: config.gang_id,
            secret: config.secret.clone(),
            handshaking: Vec::new(),
            joining: Vec::new(),
        })
    }

    fn rendezvous(incoming: Incoming, config: RingConfig) -> Result<RingCommunicator, CollectiveError> {
        let mut ring = RingCommunicator::unlinked(&config, None)?;
        let world = ring.world;
        if world == 1 {
            ring.incoming = Some(incoming);
            return Ok(ring);
        }
        let deadline = Instant::now() + config.timeout;
        let (next_rank, prev_rank) = (ring.next_rank(), ring.prev_rank());
        let next = connect_to(config.addresses[next_rank], next_rank, deadline, &config)?;
        let hello = hello(HANDSHAKE_MAGIC, config.gang_id, config.rank, world as u32)?;
        (&next).write_all(&hello).map_err(|e| lost("rendezvous", next_rank, &e, config.timeout))?;
        let (prev, accepted) = accept_prev(&incoming, deadline, &config, prev_rank, world)?;
        // Our side of the link to next: check its proof, then prove ourselves.
        check_and_prove(&next, &config, next_rank, &hello, "rendezvous")?;
        // Their side of the link from prev: the proof they owe us.
        let mut proof = [0u8; MAC_LEN];
        (&prev).read_exact(&mut proof).map_err(|e| lost("rendezvous", prev_rank, &e, config.timeout))?;
        if !mac_matches(&config.secret, b"connect", &accepted.hello, &accepted.nonce_a, &proof) {
            return Err(CollectiveError::Rendezvous(format!(
                "the connection claiming to be rank {prev_rank} does not hold this gang's secret"
            )));
        }
        ring.attach(next, prev, "rendezvous")?;
        ring.incoming = Some(incoming);
        Ok(ring)
    }

    /// Takes `next` and `prev` as the ring's proven links; from here on they are driven by
    /// `poll` (see the module docs).
    fn attach(&mut self, next: TcpStream, prev: TcpStream, operation: &'static str) -> Result<(), CollectiveError> {
        for (stream, peer) in [(&next, self.next_rank()), (&prev, self.prev_rank())] {
            stream.set_nonblocking(true).map_err(|e| lost(operation, peer, &e, self.timeout))?;
        }
        self.next = Some(next);
        self.prev = Some(prev);
        self.scratch = vec![0f32; SEGMENT_BYTES / 4];
        Ok(())
    }

    /// Makes later collectives end (fail) once `flag` is set (see [`RingCommunicator`]'s
    /// `abort`; the agent's ranks get it from [`RingConfig::abort`]).
    pub fn abort_on(&mut self, flag: Arc<std::sync::atomic::AtomicBool>) {
        self.abort = Some(flag);
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// Element range of chunk `c` of a buffer of `len` elements.
    fn chunk(&self, c: usize, len: usize) -> std::ops::Range<usize> {
        let c = c % self.world;
        (c * len / self.world)..((c + 1) * len / self.world)
    }

    /// Sends and checks the operation header, so mismatched calls fail instead of mixing data.
    fn exchange_header(
        &mut self,
        op: u32,
        len: usize,
        root: usize,
        operation: &'static str,
    ) -> Result<(), CollectiveError> {
        let (wait, next_rank, prev_rank) = (self.wait(), self.next_rank(), self.prev_rank());
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&op.to_le_bytes());
        header[4..12].copy_from_slice(&(len as u64).to_le_bytes());
        header[12..].copy_from_slice(&(root as u32).to_le_bytes());
        let next = self.next.as_mut().expect("a ring of 2 or more has a successor");
        write_all_polled(next, &header, &wait).map_err(|e| lost(operation, next_rank, &e, wait.limit))?;
        let mut theirs = [0u8; 16];
        let prev = self.prev.as_mut().expect("a ring of 2 or more has a predecessor");
        read_exact_polled(prev, &mut theirs, &wait).map_err(|e| lost(operation, prev_rank, &e, wait.limit))?;
        if theirs != header {
            return Err(CollectiveError::Invalid(format!(
                "rank {prev_rank} called a different collective (op/length/root {:?} vs ours {:?})",
                decode_header(&theirs),
                decode_header(&header)
            )));
        }
        Ok(())
    }

    /// Runs one ring transfer over `buffer` cut into `ranges` (see [`Transfer`]): `first`
    /// is the chunk queued for the successor before anything is read.
    fn transfer(
        &mut self,
        operation: &'static str,
        buffer: &mut [f32],
        ranges: &[std::ops::Range<usize>],
        first: Option<usize>,
        steps: &[Step],
    ) -> Result<(), CollectiveError> {
        let (wait, next_rank, prev_rank) = (self.wait(), self.next_rank(), self.prev_rank());
        let next = self.next.as_mut().expect("a ring of 2 or more has a successor");
        let prev = self.prev.as_mut().expect("a ring of 2 or more has a predecessor");
        let mut transfer = Transfer::new(buffer, &mut self.scratch, ranges, steps);
        if let Some(chunk) = first {
            transfer.queue_chunk(chunk);
        }
        transfer.run(next, prev, &wait).map_err(|(side, e)| match side {
            Side::Next => lost(operation, next_rank, &e, wait.limit),
            Side::Prev => lost(operation, prev_rank, &e, wait.limit),
        })
    }

    fn wait(&self) -> Wait {
        Wait { limit: self.timeout, abort: self.abort.clone() }
    }
}

/// How often a waiting collective looks at its abort flag.
const ABORT_CHECK: Duration = Duration::from_millis(50);

/// How long a collective waits for a link without progress, and what ends the wait early.
struct Wait {
    limit: Duration,
    abort: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Wait {
    /// `poll` on `fds` until one is ready (true), `limit` passes without it (false), or the
    /// abort flag is set (an error), looking at the flag every [`ABORT_CHECK`].
    fn poll(&self, fds: &mut [nix::poll::PollFd]) -> std::io::Result<bool> {
        use nix::poll::PollTimeout;
        let deadline = Instant::now() + self.limit;
        loop {
            if is_set(self.abort.as_ref()) {
                return Err(std::io::Error::other(
                    "aborted by the coordinator (the generation was superseded, or a member went silent)",
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let slice = if self.abort.is_some() { left.min(ABORT_CHECK) } else { left };
            match nix::poll::poll(fds, PollTimeout::try_from(slice).unwrap_or(PollTimeout::MAX)) {
                Ok(0) => {}
                Ok(_) | Err(nix::errno::Errno::EINTR) => return Ok(true),
                Err(e) => return Err(std::io::Error::from(e)),
            }
        }
    }
}

fn decode_header(h: &[u8; 16]) -> (u32, u64, u32) {
    let op = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(h[4..12].try_into().expect("8 bytes"));
    let root = u32::from_le_bytes(h[12..].try_into().expect("4 bytes"));
    (op, len, root)
}

/// A ring hello: `magic`, gang id, the sender's rank and `world` (see the module docs), and a
/// fresh nonce.
fn hello(magic: u64, gang_id: u64, rank: usize, world: u32) -> Result<Vec<u8>, CollectiveError> {
    let mut hello = Vec::with_capacity(HELLO_LEN + NONCE_LEN);
    hello.extend_from_slice(&magic.to_le_bytes());
    hello.extend_from_slice(&gang_id.to_le_bytes());
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&world.to_le_bytes());
    hello.extend_from_slice(&nonce()?);
    Ok(hello)
}

/// The dialing side's half of a link's challenge-response, after its `hello`: reads the
/// peer's answer, checks that the peer holds the gang's secret, and proves it holds it too.
fn check_and_prove(
    stream: &TcpStream,
    config: &RingConfig,
    peer: usize,
    hello: &[u8],
    operation: &'static str,
) -> Result<(), CollectiveError> {
    let mut answer = [0u8; NONCE_LEN + MAC_LEN];
    (&*stream).read_exact(&mut answer).map_err(|e| lost(operation, peer, &e, config.timeout))?;
    let (nonce_a, mac_a) = answer.split_at(NONCE_LEN);
    if !mac_matches(&config.secret, b"accept", hello, nonce_a, mac_a) {
        return Err(CollectiveError::Rendezvous(format!(
            "rank {peer} at {} does not hold this gang's secret",
            config.addresses[peer]
        )));
    }
    (&*stream)
        .write_all(&mac(&config.secret, b"connect", hello, nonce_a))
        .map_err(|e| lost(operation, peer, &e, config.timeout))
}

/// Connects to rank `peer` at `address`, retrying while it starts up (see [`RingConfig`]).
fn connect_to(
    address: SocketAddr,
    peer: usize,
    deadline: Instant,
    config: &RingConfig,
) -> Result<TcpStream, CollectiveError> {
    let started = Instant::now();
    loop {
        if config.aborted() {
            return Err(CollectiveError::Rendezvous("aborted: this generation was superseded".into()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&address, left.max(Duration::from_millis(1))) {
            Ok(stream) => {
                tune(&stream, config.timeout)
                    .map_err(|e| CollectiveError::Rendezvous(format!("socket options: {e}")))?;
                return Ok(stream);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused && started.elapsed() >= config.refused_grace =>
            {
                return Err(CollectiveError::PeerLost {
                    operation: "rendezvous",
                    peer,
                    reason: format!("{address} refuses connections for {:?}: {e}", config.refused_grace),
                });
            }
            Err(_) if Instant::now() + CONNECT_RETRY < deadline => {
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(e) => {
                return Err(CollectiveError::Rendezvous(format!("cannot connect to rank {peer} at {address}: {e}")));
            }
        }
    }
}

/// Where a rank's incoming ring connections come from.
enum Incoming {
    /// A listener of its own (non-blocking).
    Listener(TcpListener),
    /// An agent's data port, shared with other protocols.
    Port(Arc<DataPort>),
}

impl Incoming {
    /// The next connection; `WouldBlock` when none came within a short wait.
    fn accept(&self) -> std::io::Result<(TcpStream, String)> {
        match self {
            Incoming::Listener(listener) => {
                let accepted = listener.accept().map(|(stream, from)| (stream, from.to_string()));
                if accepted.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock) {
                    std::thread::sleep(Duration::from_millis(2));
                }
                accepted
            }
            Incoming::Port(port) => match port.next_ring(Duration::from_millis(20)) {
                Some(stream) => {
                    let from = stream.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
                    Ok((stream, from))
                }
                None => Err(std::io::ErrorKind::WouldBlock.into()),
            },
        }
    }

    /// A joining member's link that has already arrived, without waiting (None when none
    /// has). A listener of its own only ever gets joiners once the rendezvous is over.
    fn try_accept_join(&self) -> Option<TcpStream> {
        match self {
            Incoming::Listener(listener) => listener.accept().ok().map(|(stream, _)| stream),
            Incoming::Port(port) => port.next_join(),
        }
    }
}

fn accept_prev(
    incoming: &Incoming,
    deadline: Instant,
    config: &RingConfig,
    prev_rank: usize,
    world: usize,
) -> Result<(TcpStream, Accepted), CollectiveError> {
    loop {
        // A superseded generation must not take (and drop) the next one's connection.
        if config.aborted() {
            return Err(CollectiveError::Rendezvous("aborted: this generation was superseded".into()));
        }
        match incoming.accept() {
            Ok((stream, from)) => {
                stream.set_nonblocking(false).map_err(|e| CollectiveError::Rendezvous(format!("socket: {e}")))?;
                tune(&stream, config.timeout)
                    .map_err(|e| CollectiveError::Rendezvous(format!("socket options: {e}")))?;
                let mut hello = [0u8; HELLO_LEN + NONCE_LEN];
                if (&stream).read_exact(&mut hello).is_err() {
                    continue; // not a ring peer (a port scan, a stale generation that hung up)
                }
                let magic = u64::from_le_bytes(hello[..8].try_into().expect("8 bytes"));
                let gang = u64::from_le_bytes(hello[8..16].try_into().expect("8 bytes"));
                let rank = u32::from_le_bytes(hello[16..20].try_into().expect("4 bytes")) as usize;
                let their_world = u32::from_le_bytes(hello[20..24].try_into().expect("4 bytes")) as usize;
                if magic == HANDSHAKE_MAGIC && gang == config.gang_id && rank == prev_rank && their_world == world {
                    // Prove the secret; the connector's proof is read once the whole ring has
                    // got this far (see the module docs).
                    let nonce_a = nonce()?;
                    let mut answer = nonce_a.to_vec();
                    answer.extend_from_slice(&mac(&config.secret, b"accept", &hello, &nonce_a));
                    if (&stream).write_all(&answer).is_err() {
                        continue;
                    }
                    return Ok((stream, Accepted { hello: hello.to_vec(), nonce_a }));
                }
                tracing_free_log(&format!(
                    "ring rank {}: refused a connection from {from} (gang {gang}, rank {rank}, world {their_world})",
                    config.rank
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if config.aborted() {
                    return Err(CollectiveError::Rendezvous("aborted: this generation was superseded".into()));
                }
                if Instant::now() >= deadline {
                    return Err(CollectiveError::Timeout {
                        operation: "rendezvous",
                        peer: prev_rank,
                        timeout: config.timeout,
                    });
                }
            }
            Err(e) => return Err(CollectiveError::Rendezvous(format!("accept: {e}"))),
        }
    }
}

/// What the accepting side of a link keeps to check the connector's proof.
struct Accepted {
    hello: Vec<u8>,
    nonce_a: [u8; NONCE_LEN],
}

/// A fresh gang secret (for gangs formed without a coordinator: `flotilla train`, benchmarks).
pub fn random_secret() -> Result<Vec<u8>, CollectiveError> {
    let mut secret = vec![0u8; GANG_SECRET_LEN];
    flotilla_proto::auth::random_bytes(&mut secret)
        .map_err(|e| CollectiveError::Rendezvous(format!("cannot read /dev/urandom for a gang secret: {e}")))?;
    Ok(secret)
}

pub(crate) fn nonce() -> Result<[u8; NONCE_LEN], CollectiveError> {
    let mut nonce = [0u8; NONCE_LEN];
    flotilla_proto::auth::random_bytes(&mut nonce)
        .map_err(|e| CollectiveError::Rendezvous(format!("cannot read /dev/urandom for a nonce: {e}")))?;
    Ok(nonce)
}

/// HMAC-SHA256 over the link's transcript, for one side (`role`), not yet finalized.
fn transcript_mac(secret: &[u8], role: &[u8], hello: &[u8], nonce_a: &[u8]) -> hmac::Hmac<sha2::Sha256> {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    for part in [role, hello, nonce_a] {
        mac.update(part);
    }
    mac
}

pub(crate) fn mac(secret: &[u8], role: &[u8], hello: &[u8], nonce_a: &[u8]) -> [u8; MAC_LEN] {
    use hmac::Mac;
    transcript_mac(secret, role, hello, nonce_a).finalize().into_bytes().into()
}

pub(crate) fn mac_matches(secret: &[u8], role: &[u8], hello: &[u8], nonce_a: &[u8], presented: &[u8]) -> bool {
    use hmac::Mac;
    transcript_mac(secret, role, hello, nonce_a).verify_slice(presented).is_ok() // constant time
}

/// Stale or foreign connections are worth a line on stderr; the worker has no logger here.
fn tracing_free_log(message: &str) {
    eprintln!("{message}");
}

// The wire format is little-endian f32; on little-endian hosts (every platform Flotilla
// targets) buffers are sent and received in place, without conversion.
const _: () = assert!(cfg!(target_endian = "little"), "the ring's wire format assumes a little-endian host");

/// How a received segment is merged into the local buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Combine {
    /// Reduce-scatter: add the partial sum.
    Add,
    /// All-gather and broadcast: take the value.
    Copy,
}

/// One chunk to read from the predecessor: how to merge it, and whether to pass it on.
#[derive(Clone, Copy)]
struct Step {
    chunk: usize,
    combine: Combine,
    forward: bool,
}

/// Which link an I/O error came from.
#[derive(Debug, Clone, Copy)]
enum Side {
    Next,
    Prev,
}

/// One ring transfer on one rank: segments queued for the successor, and where reading from
/// the predecessor has got to, over the caller's buffer. [`Transfer::run`] drives it with
/// non-blocking reads and writes.
struct Transfer<'a> {
    buffer: &'a mut [f32],
    scratch: &'a mut [f32],
    /// Element range of every segment, chunk by chunk.
    segments: Vec<std::ops::Range<usize>>,
    /// First segment of each chunk, plus one past the last.
    first: Vec<usize>,
    /// Segments to write to the successor, in order; the front one has `written` bytes out.
    queue: std::collections::VecDeque<usize>,
    written: usize,
    /// Segments in `queue`: not to be read into until written.
    queued: Vec<bool>,
    steps: &'a [Step],
    /// Reading: step, segment within the step's chunk, bytes of it received.
    step: usize,
    segment: usize,
    received: usize,
}

impl<'a> Transfer<'a> {
    fn new(
        buffer: &'a mut [f32],
        scratch: &'a mut [f32],
        ranges: &[std::ops::Range<usize>],
        steps: &'a [Step],
    ) -> Transfer<'a> {
        let mut segments = Vec::new();
        let mut first = Vec::with_capacity(ranges.len() + 1);
        for range in ranges {
            first.push(segments.len());
            let mut at = range.start;
            while at < range.end {
                let end = (at + SEGMENT_BYTES / 4).min(range.end);
                segments.push(at..end);
                at = end;
            }
        }
        first.push(segments.len());
        let queued = vec![false; segments.len()];
        let queue = std::collections::VecDeque::with_capacity(segments.len());
        Transfer {
            buffer,
            scratch,
            segments,
            first,
            queue,
            written: 0,
            queued,
            steps,
            step: 0,
            segment: 0,
            received: 0,
        }
    }

    fn queue_segment(&mut self, id: usize) {
        self.queued[id] = true;
        self.queue.push_back(id);
    }

    fn queue_chunk(&mut self, chunk: usize) {
        for id in self.first[chunk]..self.first[chunk + 1] {
            self.queue_segment(id);
        }
    }

    /// The segment being read, past empty chunks; None when every step is done.
    fn reading(&mut self) -> Option<usize> {
        while let Some(step) = self.steps.get(self.step) {
            let id = self.first[step.chunk] + self.segment;
            if id < self.first[step.chunk + 1] {
                return Some(id);
            }
            self.step += 1;
            self.segment = 0;
        }
        None
    }

    /// Writes queued segments until the socket would block. Ok(true) when bytes went out.
    fn write_some(&mut self, next: &mut TcpStream) -> std::io::Result<bool> {
        let mut progress = false;
        while let Some(&id) = self.queue.front() {
            let bytes = bytemuck::cast_slice::<f32, u8>(&self.buffer[self.segments[id].clone()]);
            match next.write(&bytes[self.written..]) {
                Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "the connection closed")),
                Ok(n) => {
                    progress = true;
                    self.written += n;
                    if self.written == bytes.len() {
                        self.queue.pop_front();
                        self.queued[id] = false;
                        self.written = 0;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(progress)
    }

    /// Reads until the socket would block, a segment to forward is complete (so it goes out at
    /// once) or the next target is still queued. Ok(true) when bytes came in.
    fn read_some(&mut self, prev: &mut TcpStream) -> std::io::Result<bool> {
        let mut progress = false;
        while let Some(id) = self.reading() {
            if self.queued[id] {
                break;
            }
            let step = self.steps[self.step];
            let range = self.segments[id].clone();
            let target = match step.combine {
                Combine::Copy => bytemuck::cast_slice_mut::<f32, u8>(&mut self.buffer[range.clone()]),
                Combine::Add => bytemuck::cast_slice_mut::<f32, u8>(&mut self.scratch[..range.len()]),
            };
            let length = target.len();
            match prev.read(&mut target[self.received..]) {
                Ok(0) => {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the connection closed"));
                }
                Ok(n) => {
                    progress = true;
                    self.received += n;
                    if self.received < length {
                        continue;
                    }
                    if step.combine == Combine::Add {
                        for (t, v) in self.buffer[range].iter_mut().zip(self.scratch.iter()) {
                            *t += *v;
                        }
                    }
                    self.received = 0;
                    self.segment += 1;
                    if step.forward {
                        self.queue_segment(id);
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(progress)
    }

    /// Moves bytes both ways until every step is read and every queued segment written,
    /// waiting in `poll` (see [`Wait`]) only when neither link can move.
    fn run(&mut self, next: &mut TcpStream, prev: &mut TcpStream, wait: &Wait) -> Result<(), (Side, std::io::Error)> {
        use nix::poll::{PollFd, PollFlags};
        use std::os::fd::AsFd;
        loop {
            let wrote = self.write_some(next).map_err(|e| (Side::Next, e))?;
            let read = self.read_some(prev).map_err(|e| (Side::Prev, e))?;
            let target = self.reading();
            let writing = !self.queue.is_empty();
            if target.is_none() && !writing {
                return Ok(());
            }
            if wrote || read {
                continue;
            }
            let reading = target.is_some_and(|id| !self.queued[id]);
            let out = if writing { PollFlags::POLLOUT } else { PollFlags::empty() };
            let inn = if reading { PollFlags::POLLIN } else { PollFlags::empty() };
            let mut fds = [PollFd::new(next.as_fd(), out), PollFd::new(prev.as_fd(), inn)];
            let side = if reading { Side::Prev } else { Side::Next };
            match wait.poll(&mut fds) {
                Ok(true) => {}
                Ok(false) => return Err((side, std::io::Error::new(std::io::ErrorKind::TimedOut, "no progress"))),
                Err(e) => return Err((side, e)),
            }
        }
    }
}

/// `write_all` on a non-blocking socket, waiting in `poll` (see [`Wait`]).
fn write_all_polled(stream: &mut TcpStream, mut bytes: &[u8], wait: &Wait) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "the connection closed")),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_for(stream, false, wait)?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `read_exact` on a non-blocking socket, waiting in `poll` (see [`Wait`]).
fn read_exact_polled(stream: &mut TcpStream, buffer: &mut [u8], wait: &Wait) -> std::io::Result<()> {
    let mut at = 0;
    while at < buffer.len() {
        match stream.read(&mut buffer[at..]) {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the connection closed")),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_for(stream, true, wait)?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn wait_for(stream: &TcpStream, read: bool, wait: &Wait) -> std::io::Result<()> {
    use nix::poll::{PollFd, PollFlags};
    use std::os::fd::AsFd;
    let events = if read { PollFlags::POLLIN } else { PollFlags::POLLOUT };
    let mut fds = [PollFd::new(stream.as_fd(), events)];
    match wait.poll(&mut fds)? {
        true => Ok(()),
        false => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no progress")),
    }
}

impl Communicator for RingCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        if buffer.len() > ELEMENTS_MAX {
            return Err(CollectiveError::Invalid(format!("{} elements; at most {ELEMENTS_MAX}", buffer.len())));
        }
        self.exchange_header(OP_ALL_REDUCE, buffer.len(), 0, "all_reduce")?;
        let (rank, world, len) = (self.rank, self.world, buffer.len());
        let ranges: Vec<_> = (0..world).map(|c| self.chunk(c, len)).collect();
        // Reduce-scatter: our own chunk starts; at step s receive chunk r-s-1, add, forward (the
        // last one is the first all-gather send). All-gather: at step t receive the full chunk
        // r-t, keep it, forward all but the last.
        let reduce = (0..world - 1).map(|s| Step {
            chunk: (rank + 2 * world - s - 1) % world,
            combine: Combine::Add,
            forward: true,
        });
        let gather = (0..world - 1).map(|t| Step {
            chunk: (rank + world - t) % world,
            combine: Combine::Copy,
            forward: t < world - 2,
        });
        let steps: Vec<Step> = reduce.chain(gather).collect();
        self.transfer("all_reduce", buffer, &ranges, Some(rank), &steps)
    }

    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if root >= self.world {
            return Err(CollectiveError::Invalid(format!("broadcast root {root} in a world of {}", self.world)));
        }
        if self.world == 1 {
            return Ok(());
        }
        self.exchange_header(OP_BROADCAST, buffer.len(), root, "broadcast")?;
        let last = (root + self.world - 1) % self.world;
        let whole = 0..buffer.len(); // one chunk: the whole buffer
        let whole = std::slice::from_ref(&whole);
        if self.rank == root {
            return self.transfer("broadcast", buffer, whole, Some(0), &[]);
        }
        let receive = [Step { chunk: 0, combine: Combine::Copy, forward: self.rank != last }];
        self.transfer("broadcast", buffer, whole, None, &receive)
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let mut token = [0.0f32];
        self.all_reduce_sum(&mut token)
    }

    fn joining_links(&mut self) -> Vec<usize> {
        self.take_join_links();
        self.joining.iter().map(|link| link.rank).collect()
    }

    fn admit(&mut self, rank: usize) -> Result<(), CollectiveError> {
        self.admit_joiner(rank)
    }
}

/// Forms a ring of `world` ranks on loopback inside this process (tests and benchmarks): binds
/// one listener per rank, then connects them all from separate threads.
pub fn loopback_gang(world: usize, timeout: Duration) -> Result<Vec<RingCommunicator>, CollectiveError> {
    let (listeners, configs) = loopback_configs(world, timeout)?;
    let handles: Vec<_> = listeners
        .into_iter()
        .zip(configs)
        .map(|(listener, config)| std::thread::spawn(move || RingCommunicator::connect(listener, config)))
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|_| Err(CollectiveError::Rendezvous("a rank's thread panicked".into()))))
        .collect()
}

/// The listeners and configs of a loopback gang of `world` ranks (one gang id and secret),
/// for [`RingCommunicator::connect`]; a member joining it later uses a copy of its rank's config.
pub fn loopback_configs(
    world: usize,
    timeout: Duration,
) -> Result<(Vec<TcpListener>, Vec<RingConfig>), CollectiveError> {
    let mut listeners = Vec::with_capacity(world);
    let mut addresses = Vec::with_capacity(world);
    for _ in 0..world {
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| CollectiveError::Rendezvous(format!("bind loopback: {e}")))?;
        addresses.push(listener.local_addr().map_err(|e| CollectiveError::Rendezvous(e.to_string()))?);
        listeners.push(listener);
    }
    let gang_id = u64::from(std::process::id()) << 32 | addresses.first().map_or(0, |a| u64::from(a.port()));
    let secret = random_secret()?;
    let configs =
        (0..world).map(|rank| RingConfig::new(rank, addresses.clone(), gang_id, secret.clone(), timeout)).collect();
    Ok((listeners, configs))
}
