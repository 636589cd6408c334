//! A live handover's transfer (see [`crate::train::Handover`]): the leaving member sends its
//! state once, then every step's update, to the joining member, which replays them while the
//! gang trains on and says how far it got.
//!
//! ```text
//!   leaving member ──▶ hello: "FLOTLIVE" | gang id (u64) | rank (u32) | nonce_c
//!                  ◀── nonce_a | HMAC(key, "accept" | hello | nonce_a)
//!                  ──▶ HMAC(key, "live" | hello | nonce_a) | frame length (u64) | state frame
//!                      (a state push's frame: the parts of `state::encode`)
//!                  ──▶ update: step (u64) | flags (u8: 1 last, 2 checksum) | values (u32)
//!                      | checksum (u64) | values as f32 LE
//!                  ◀── applied: step (u64), once for the state and once per update
//! ```
//!
//! The first update carries the leaving member's [`Trainer::replay_checksum`] after it
//! (parameters, cursor, step): the joiner compares its own after replaying it and refuses to
//! go on if they differ, so a state or replay that went wrong ends the handover (the gang
//! trains on as before) instead of joining the gang. That one comparison checks the state and
//! the replay end to end (the state frame's parts are not hashed, unlike a push's, whose hashes
//! are compared with a recorded checkpoint); it happens once, long before the swap, off its
//! critical path.
//!
//! The leaving member's step loop only queues each update ([`Source`] writes on a thread of its
//! own, at most [`queue_capacity`] updates behind); a joiner that falls further behind, or a
//! transfer that fails, gives the handover up, and the gang goes on as if it had never begun.
//! The updates travel as plain TCP, like the ring's gradients; the state frame is hashed part
//! by part on arrival, like a push's. Only a holder of the handover's key sends or takes one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use super::push::{frame_heads, read_parts};
use super::state::{decode, encode};
use crate::collective::CollectiveError;
use crate::collective::port::{DataPort, LIVE_MAGIC};
use crate::collective::ring::{
    ELEMENTS_MAX, MAC_LEN, NONCE_LEN, RingCommunicator, RingConfig, mac, mac_matches, nonce,
};
use crate::data::Dataset;
use crate::train::{Handover, TrainError, TrainState, Trainer};
use flotilla_proto::spec::JobSpec;

/// Updates that may always wait for the joiner, however large: a joiner further behind than
/// [`queue_capacity`] gives the handover up (the gang must not wait for it, and each queued
/// update holds a gradient's memory).
pub const QUEUED_UPDATES_MIN: usize = 8;
/// Bytes of updates queued for the joiner at most (the leaving member holds them): a small
/// model's updates are many and cheap, and its steps fast, so the joiner may fall that many
/// steps behind while it builds its trainer (sub-millisecond steps fill 8 in no time).
pub const QUEUED_UPDATE_BYTES_MAX: usize = 64 << 20;
/// Updates queued at most, however small.
pub const QUEUED_UPDATES_MAX: usize = 4096;

/// How many updates of `values` parameters may wait for the joiner: as many as fit in
/// [`QUEUED_UPDATE_BYTES_MAX`], between [`QUEUED_UPDATES_MIN`] and [`QUEUED_UPDATES_MAX`].
pub fn queue_capacity(values: usize) -> usize {
    (QUEUED_UPDATE_BYTES_MAX / (values * 4).max(1)).clamp(QUEUED_UPDATES_MIN, QUEUED_UPDATES_MAX)
}

/// Time for any one read or write of the transfer.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for the connection to the joiner.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes of a hello: magic, gang id, rank, nonce.
const HELLO_LEN: usize = 8 + 8 + 4 + NONCE_LEN;
/// Bytes of an update's head: step, flags, values, checksum.
const UPDATE_HEAD_LEN: usize = 8 + 1 + 4 + 8;
/// An update's flags: the swap follows it; it carries a checksum.
const LAST: u8 = 1;
const CHECKSUM: u8 = 2;
/// `applied` before the joiner holds the state.
const NOTHING_APPLIED: u64 = u64::MAX;

/// Why a live handover's transfer failed: it ends the handover, never the gang's training.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("live handover: {0}")]
    Io(String),
    #[error("live handover refused: {0}")]
    Refused(String),
    /// The joiner could not apply what it received.
    #[error("live handover: {0}")]
    Train(#[from] TrainError),
    /// The joiner's links to the gang could not be made.
    #[error("live handover: {0}")]
    Collective(#[from] CollectiveError),
}

fn io(what: &str) -> impl Fn(std::io::Error) -> LiveError + '_ {
    move |e| LiveError::Io(format!("{what}: {e}"))
}

fn hello(gang_id: u64, rank: usize, nonce_c: &[u8]) -> Vec<u8> {
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(&LIVE_MAGIC.to_le_bytes());
    hello.extend_from_slice(&gang_id.to_le_bytes());
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(nonce_c);
    hello
}

fn tune(stream: &TcpStream) -> Result<(), LiveError> {
    stream.set_nodelay(true).map_err(io("socket"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io("socket"))?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io("socket"))
}

/// One step's update, queued for the joiner.
struct Update {
    step: u64,
    gradient: Vec<f32>,
    last: bool,
    /// [`Trainer::replay_checksum`] after it (the first update only).
    checksum: Option<u64>,
}

/// The leaving member's side: the [`Handover`] its trainer forwards updates to.
pub struct Source {
    updates: SyncSender<Update>,
    /// Newest step the joiner applied ([`NOTHING_APPLIED`] before it holds the state).
    applied: Arc<AtomicU64>,
    /// Newest step forwarded (the state's step before the first update).
    forwarded: u64,
    /// The transfer ended early (the link broke, the joiner refused).
    failed: Arc<AtomicBool>,
    /// Updates that may wait for the joiner ([`queue_capacity`]).
    capacity: usize,
}

impl Source {
    /// Starts the transfer to the joiner whose data port is `addr` (it routes the connection
    /// by the hello's magic to `DataPort::next_live`), for rank `rank` of gang `gang_id`,
    /// proving `key`: `state` first, then every update forwarded. Everything that can wait
    /// (the connection, the handshake, the state's encoding) happens on the transfer's thread:
    /// the step loop that calls this only copies the state. A joiner that cannot be reached
    /// fails the transfer (the handover is given up at the next forward).
    pub fn connect(addr: SocketAddr, key: Vec<u8>, gang_id: u64, rank: usize, state: TrainState) -> Source {
        let capacity = queue_capacity(state.params.len());
        let (updates, queued) = sync_channel(capacity);
        let applied = Arc::new(AtomicU64::new(NOTHING_APPLIED));
        let failed = Arc::new(AtomicBool::new(false));
        let forwarded = state.step;
        let (applied_by_joiner, failed_transfer) = (applied.clone(), failed.clone());
        let spawned = std::thread::Builder::new().name("live-handover".into()).spawn(move || {
            let stream = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "the live handover's joiner cannot be reached");
                    failed_transfer.store(true, Ordering::Release);
                    return;
                }
            };
            // The joiner hears the end at once either way (the acknowledgements' reader holds a
            // handle too, so dropping this one would not close the connection). After the last
            // update, or once the trainer dropped the source: a graceful end (FIN), and the
            // reader drains the acknowledgements until the joiner closes, so the socket never
            // closes with unread bytes (which would reset it, and could take the last update
            // with it before the joiner read it). After a failure: closed both ways.
            match send(&stream, &key, gang_id, rank, &state, &queued, &applied_by_joiner) {
                Ok(()) => {
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the live handover's transfer ended early");
                    failed_transfer.store(true, Ordering::Release);
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                }
            }
        });
        if spawned.is_err() {
            failed.store(true, Ordering::Release);
        }
        Source { updates, applied, forwarded, failed, capacity }
    }

    /// Newest step the joiner applied, if it holds the state yet.
    fn applied(&self) -> Option<u64> {
        Some(self.applied.load(Ordering::Acquire)).filter(|&s| s != NOTHING_APPLIED)
    }
}

impl Handover for Source {
    fn caught_up(&self) -> bool {
        !self.failed.load(Ordering::Acquire) && self.applied().is_some_and(|applied| applied + 1 >= self.forwarded)
    }

    fn forward(&mut self, step: u64, gradient: Vec<f32>, checksum: Option<u64>, last: bool) -> Result<(), String> {
        if self.failed.load(Ordering::Acquire) {
            return Err("the transfer to the joining member failed".into());
        }
        match self.updates.try_send(Update { step, gradient, last, checksum }) {
            Ok(()) => {
                self.forwarded = step;
                Ok(())
            }
            Err(TrySendError::Full(_)) => {
                Err(format!("the joining member fell {} updates behind the gang", self.capacity))
            }
            Err(TrySendError::Disconnected(_)) => Err("the transfer to the joining member ended".into()),
        }
    }
}

/// The transfer's thread: handshake, state, then the updates until the last (or the trainer
/// drops the source); the joiner's acknowledgements are read on a thread of their own.
fn send(
    stream: &TcpStream,
    key: &[u8],
    gang_id: u64,
    rank: usize,
    state: &TrainState,
    queued: &Receiver<Update>,
    applied: &Arc<AtomicU64>,
) -> Result<(), LiveError> {
    tune(stream)?;
    let mut stream = stream;
    let hello = hello(gang_id, rank, &nonce().map_err(|e| LiveError::Io(e.to_string()))?);
    stream.write_all(&hello).map_err(io("hello"))?;
    let mut answer = [0u8; NONCE_LEN + MAC_LEN];
    stream.read_exact(&mut answer).map_err(io("the joiner's answer"))?;
    let (nonce_a, mac_a) = answer.split_at(NONCE_LEN);
    if !mac_matches(key, b"accept", &hello, nonce_a, mac_a) {
        return Err(LiveError::Refused("the joining member does not hold the handover's key".into()));
    }
    let parts = encode(state, None);
    let heads = frame_heads(&parts);
    let length =
        heads.iter().map(Vec::len).sum::<usize>() as u64 + parts.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
    let mut head = mac(key, b"live", &hello, nonce_a).to_vec();
    head.extend_from_slice(&length.to_le_bytes());
    stream.write_all(&head).map_err(io("proof"))?;
    for (head, (_, bytes)) in heads.iter().zip(&parts) {
        stream.write_all(head).map_err(io("state"))?;
        stream.write_all(bytes).map_err(io("state"))?;
    }
    drop(parts);
    let mut acks = stream.try_clone().map_err(io("socket"))?;
    let applied = applied.clone();
    std::thread::Builder::new()
        .name("live-handover-acks".into())
        .spawn(move || {
            let mut step = [0u8; 8];
            while acks.read_exact(&mut step).is_ok() {
                applied.store(u64::from_le_bytes(step), Ordering::Release);
            }
        })
        .map_err(io("thread"))?;
    for update in queued {
        let mut head = [0u8; UPDATE_HEAD_LEN];
        head[..8].copy_from_slice(&update.step.to_le_bytes());
        head[8] = if update.last { LAST } else { 0 } | if update.checksum.is_some() { CHECKSUM } else { 0 };
        head[9..13].copy_from_slice(&(update.gradient.len() as u32).to_le_bytes());
        head[13..].copy_from_slice(&update.checksum.unwrap_or(0).to_le_bytes());
        stream.write_all(&head).map_err(io("update"))?;
        stream.write_all(bytemuck::cast_slice::<f32, u8>(&update.gradient)).map_err(io("update"))?;
        if update.last {
            break;
        }
    }
    Ok(())
}

/// The joining member's side of the transfer.
pub struct Sink {
    stream: TcpStream,
    /// Values in an update: the model's parameter count.
    values: usize,
    /// Bytes received so far.
    bytes: u64,
    /// Time the state took from its first byte to decoded.
    state_ms: f64,
}

/// One update as received.
pub struct Received {
    pub step: u64,
    pub gradient: Vec<f32>,
    pub last: bool,
    /// The leaving member's [`Trainer::replay_checksum`] after this update (the first one only).
    pub checksum: Option<u64>,
}

impl Sink {
    /// Takes a live handover's transfer from the leaving member at the other end of `stream`:
    /// its hello must be for rank `rank` of gang `gang_id`, and it must prove `key`. Returns the
    /// state it sent, decoded, after acknowledging it.
    pub fn accept(
        mut stream: TcpStream,
        key: &[u8],
        gang_id: u64,
        rank: usize,
    ) -> Result<(Sink, TrainState), LiveError> {
        tune(&stream)?;
        let mut hello = [0u8; HELLO_LEN];
        stream.read_exact(&mut hello).map_err(io("hello"))?;
        let magic = u64::from_le_bytes(hello[..8].try_into().expect("8 bytes"));
        let gang = u64::from_le_bytes(hello[8..16].try_into().expect("8 bytes"));
        let their_rank = u32::from_le_bytes(hello[16..20].try_into().expect("4 bytes")) as usize;
        if magic != LIVE_MAGIC || gang != gang_id || their_rank != rank {
            return Err(LiveError::Refused(format!(
                "a transfer for rank {their_rank} of gang {gang}; this member joins as rank {rank} of gang {gang_id}"
            )));
        }
        let nonce_a = nonce().map_err(|e| LiveError::Io(e.to_string()))?;
        let mut answer = nonce_a.to_vec();
        answer.extend_from_slice(&mac(key, b"accept", &hello, &nonce_a));
        stream.write_all(&answer).map_err(io("answer"))?;
        let mut head = [0u8; MAC_LEN + 8];
        stream.read_exact(&mut head).map_err(io("proof"))?;
        if !mac_matches(key, b"live", &hello, &nonce_a, &head[..MAC_LEN]) {
            return Err(LiveError::Refused("the leaving member does not hold the handover's key".into()));
        }
        let length = u64::from_le_bytes(head[MAC_LEN..].try_into().expect("8 bytes"));
        if length == 0 || length > super::peer::TRANSFER_BYTES_MAX {
            return Err(LiveError::Refused(format!(
                "a state of {length} bytes (1 to {})",
                super::peer::TRANSFER_BYTES_MAX
            )));
        }
        let reading = Instant::now();
        let parts = read_parts(&mut stream, length).map_err(LiveError::Io)?;
        let origin =
            format!("the state of a live handover from {}", stream.peer_addr().map_or("?".into(), |a| a.to_string()));
        let state = decode(&parts.into_iter().collect(), &origin).map_err(|e| LiveError::Refused(e.to_string()))?.0;
        let state_ms = reading.elapsed().as_secs_f64() * 1e3;
        let values = state.params.len() + crate::train::UPDATE_EXTRAS;
        let mut sink = Sink { stream, values, bytes: length, state_ms };
        sink.applied(state.step)?;
        Ok((sink, state))
    }

    /// The next update, within the limits: as many values as the model has parameters, and
    /// [`crate::train::UPDATE_EXTRAS`] behind them.
    pub fn receive(&mut self) -> Result<Received, LiveError> {
        let mut head = [0u8; UPDATE_HEAD_LEN];
        self.stream.read_exact(&mut head).map_err(io("update"))?;
        let step = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let (last, checked) = (head[8] & LAST != 0, head[8] & CHECKSUM != 0);
        let values = u32::from_le_bytes(head[9..13].try_into().expect("4 bytes")) as usize;
        let checksum = checked.then(|| u64::from_le_bytes(head[13..].try_into().expect("8 bytes")));
        if values != self.values || values > ELEMENTS_MAX {
            return Err(LiveError::Refused(format!(
                "an update of {values} values for a model of {} parameters",
                self.values
            )));
        }
        let mut gradient = vec![0f32; values];
        self.stream.read_exact(bytemuck::cast_slice_mut::<f32, u8>(&mut gradient)).map_err(io("update"))?;
        self.bytes += (UPDATE_HEAD_LEN + values * 4) as u64;
        Ok(Received { step, gradient, last, checksum })
    }

    /// Tells the leaving member that this member applied the update of `step`.
    pub fn applied(&mut self, step: u64) -> Result<(), LiveError> {
        self.stream.write_all(&step.to_le_bytes()).map_err(io("acknowledgement"))
    }

    /// Bytes received so far (state and updates).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// What a joiner's catch-up did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CaughtUp {
    /// The step after which the joiner takes its rank (the last update's).
    pub step: u64,
    /// Updates replayed.
    pub updates: u64,
    /// Bytes received (state and updates).
    pub bytes: u64,
    /// Time spent replaying (the rest was waiting for the gang's steps).
    pub replay_ms: f64,
    /// Time the state took from its first byte to decoded.
    pub state_ms: f64,
}

/// Replays every update the leaving member sends on `trainer` (built from the sink's state),
/// acknowledging each, until the last: the trainer then holds the gang's state after the
/// swap's step, ready for the next.
pub fn catch_up(sink: &mut Sink, trainer: &mut Trainer) -> Result<CaughtUp, LiveError> {
    let mut caught =
        CaughtUp { step: trainer.steps_done(), updates: 0, bytes: 0, replay_ms: 0.0, state_ms: sink.state_ms };
    loop {
        let update = sink.receive()?;
        let replaying = Instant::now();
        trainer.replay(update.step, &update.gradient)?;
        if let Some(expected) = update.checksum
            && trainer.replay_checksum() != expected
        {
            return Err(LiveError::Refused(format!(
                "the replayed state differs from the leaving member's after step {}; not joining",
                update.step
            )));
        }
        caught.replay_ms += replaying.elapsed().as_secs_f64() * 1e3;
        caught.updates += 1;
        caught.step = update.step;
        if update.last {
            caught.bytes = sink.bytes();
            return Ok(caught);
        }
        sink.applied(update.step)?;
    }
}

/// A joining member, ready for the step after the swap: its trainer holds the gang's state,
/// its ring the links in the leaving member's place.
pub struct Joined {
    pub trainer: Trainer,
    pub comm: RingCommunicator,
    pub caught: CaughtUp,
}

/// The joining side of a live handover as one call: takes the transfer on `stream` (proving
/// `key`, for `config`'s rank and gang), builds the trainer for `spec` and `data` from the
/// state, and catches up while dialing the leaving member's neighbours (`config` is the
/// leaving member's ring config; `incoming` is where this member takes a later joiner's links).
pub fn join(
    stream: TcpStream,
    key: &[u8],
    spec: &JobSpec,
    data: Arc<Dataset>,
    config: RingConfig,
    incoming: Option<Arc<DataPort>>,
) -> Result<Joined, LiveError> {
    let (rank, world) = (config.rank, config.addresses.len());
    let (mut sink, state) = Sink::accept(stream, key, config.gang_id, rank)?;
    let model = Trainer::model(spec, &data)?;
    let mut trainer = Trainer::joining(model, spec, data, state, rank, world)?;
    // The links to the neighbours form while the updates are replayed.
    let dialing = std::thread::Builder::new()
        .name("live-handover-join".into())
        .spawn(move || RingCommunicator::join_running(config, incoming))
        .map_err(io("thread"))?;
    // Its first step with the gang must not be this process's first pass.
    trainer.warm_up()?;
    let caught = catch_up(&mut sink, &mut trainer)?;
    let comm = dialing.join().map_err(|_| LiveError::Io("the thread dialing the gang panicked".into()))??;
    Ok(Joined { trainer, comm, caught })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_joiner_may_fall_behind_by_a_byte_budget_of_updates_within_bounds() {
        assert_eq!(queue_capacity(700), QUEUED_UPDATES_MAX, "a tiny model: many cheap updates");
        assert_eq!(queue_capacity(235_146), 71, "the MNIST MLP: 0.9 MB an update, 64 MiB in all");
        assert_eq!(queue_capacity(100_000_000), QUEUED_UPDATES_MIN, "a large model: never fewer than 8");
        assert_eq!(queue_capacity(0), QUEUED_UPDATES_MAX);
    }
}
