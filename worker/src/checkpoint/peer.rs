//! Resume state from a peer: a new generation takes the state it resumes from from a gang
//! member that still holds it in memory, not from the store.
//!
//! ```text
//!   generation g stops at step s for a checkpoint (a notice's handover, a deadline move, ...):
//!     every rank keeps its state of step s in memory (hold); rank 0 also writes it as the
//!     checkpoint the coordinator records, with its manifest fingerprint F
//!   generation g+1 of the job (resume_from = step s, F), on the joined ring:
//!     1. each rank checks what it holds against F (encoded as the checkpoint: same bytes, same hash)
//!     2. one all-reduce of a flag per rank: who holds it
//!     3. all hold it   -> each keeps its own; no bytes move
//!        none does     -> each reads the checkpoint from the store (the path without a peer)
//!        some do       -> the lowest holding rank broadcasts MANIFEST + parts over the ring
//!                         (pipelined in segments); receivers check every part's SHA-256 and the
//!                         manifest's fingerprint against F, then decode as from the store
//! ```
//!
//! Trust: the ring's links were authenticated at the rendezvous (an HMAC over the gang secret),
//! so only gang members send or receive state. F comes from the coordinator's Raft record, so a
//! rank holding another state (another step, a diverged run) never counts as a holder, and
//! received bytes that do not hash to F are refused: that rank reads the store instead. The
//! state a rank resumes from is therefore the recorded checkpoint, bit for bit, whichever way
//! it came.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::state::{Encoded, decode};
use super::{CheckpointError, Manifest, parse_manifest};
use crate::collective::{CollectiveError, Communicator, ring};
use crate::train::TrainState;

/// Bytes of one transfer at most (the ring's largest broadcast).
pub const TRANSFER_BYTES_MAX: u64 = ring::ELEMENTS_MAX as u64 * 4;

/// The state a planned stop left in memory, for one job. One at most: an agent runs one rank
/// at a time. Its checkpoint encoding (the parts, their SHA-256s and the manifest) is computed
/// on a background thread from the moment it is held, so the next generation's exchange
/// finds it ready instead of encoding and hashing the whole state on the resume path. A
/// handover's replacement also holds the state its leaving member pushed to it before the
/// regroup ([`super::push`]); a rank of that job waits for a push under way.
pub struct Holder {
    slots: Mutex<Slots>,
    /// Signalled when a push under way ends.
    pushed: Condvar,
}

struct Slots {
    entry: Option<HeldEntry>,
    /// The job a push is expected or being received for.
    push: Option<AwaitedPush>,
}

impl Slots {
    /// Holds `cell` for `job_id` unless the job's held state is newer (or, with
    /// `keep_same_step`, of the same step): a state that arrives late never replaces a newer one.
    fn offer(&mut self, job_id: &str, cell: HeldCell, keep_same_step: bool) {
        let newer = self.entry.as_ref().is_some_and(|e| {
            e.job_id == job_id && (e.cell.step > cell.step || (keep_same_step && e.cell.step == cell.step))
        });
        if !newer {
            self.entry = Some(HeldEntry { job_id: job_id.to_string(), cell: Arc::new(cell) });
        }
    }
}

struct AwaitedPush {
    job_id: String,
    /// The sender proved the key and the bytes are coming (else only announced).
    begun: bool,
}

/// How long a rank waits for a push that is announced (its worker was told it replaces a
/// leaving member) but has not begun: the leaving member starts it as its rank stops, so it
/// normally begins before the regroup; a leaving member that died never does.
pub const ANNOUNCED_PUSH_WAIT_MAX: Duration = Duration::from_millis(500);
/// How long a rank waits for a push under way before the gang exchanges the state itself.
pub const PUSH_WAIT_MAX: Duration = Duration::from_secs(10);

struct HeldEntry {
    job_id: String,
    cell: Arc<HeldCell>,
}

/// One held state, kept once: raw until someone encodes it (the background thread, or the
/// exchange if it comes first), then only inside its encoding.
struct HeldCell {
    raw: Mutex<Option<TrainState>>,
    encoded: OnceLock<Option<Held>>,
    /// When this worker's rank stopped with it (None: pushed to this worker).
    stopped_at: Option<Instant>,
    /// The state's step.
    step: u64,
}

impl HeldCell {
    /// The encoding; computes it from the raw state if nobody has, waits for an encoding
    /// under way on another thread.
    fn encoded(&self) -> Option<&Held> {
        self.encoded.get_or_init(|| self.raw.lock().ok()?.take().and_then(Held::encode)).as_ref()
    }

    /// A cell for a state that comes encoded (a push: `stopped_at` None).
    fn of_encoded(held: Held, stopped_at: Option<Instant>) -> HeldCell {
        let step = held.state.step;
        HeldCell { raw: Mutex::new(None), encoded: OnceLock::from(Some(held)), stopped_at, step }
    }
}

/// This process's holder.
pub static HELD: Holder = Holder::new();

impl Holder {
    pub const fn new() -> Holder {
        Holder { slots: Mutex::new(Slots { entry: None, push: None }), pushed: Condvar::new() }
    }

    /// Keeps `state` (the step a generation of `job_id` stopped at) for the next generation,
    /// and starts encoding it in the background.
    pub fn hold(&self, job_id: &str, state: TrainState) {
        let cell = Arc::new(HeldCell {
            step: state.step,
            raw: Mutex::new(Some(state)),
            encoded: OnceLock::new(),
            stopped_at: Some(Instant::now()),
        });
        let background = cell.clone();
        std::thread::spawn(move || {
            background.encoded();
        });
        self.put(job_id, cell);
    }

    /// Like [`Holder::hold`], for a state its caller encoded already (rank 0 at a stop writes
    /// the same encoding as the checkpoint): it is not encoded a second time.
    pub fn hold_encoded(&self, job_id: &str, state: TrainState, encoded: &Encoded) {
        let held = Held::of_encoded(state, encoded);
        self.put(job_id, Arc::new(HeldCell::of_encoded(held, Some(Instant::now()))));
    }

    /// Keeps the state this rank received from a peer in the exchange, so that it holds it in
    /// turn: if the holder that gave it dies before the checkpoint is written (a survivor writes
    /// it after the regroup), the next generation still finds it in the gang. The caller decoded
    /// its own copy for training; this one is decoded again on a thread of its own, off the
    /// start-up's path (its handle, for tests). A newer state of the job held meanwhile is
    /// never replaced.
    pub fn hold_received(&'static self, job_id: &str, received: Received) -> std::thread::JoinHandle<()> {
        let job_id = job_id.to_string();
        std::thread::spawn(move || {
            let Received { parts, manifest } = received;
            let state = match decode(&parts, "the state received from a peer") {
                Ok((state, _)) => state,
                Err(e) => return tracing::warn!(error = %e, "the received state is not held"),
            };
            let parts = manifest.parts.iter().filter_map(|entry| parts.get(&entry.name).cloned()).collect();
            let held = Held { state, parts, manifest, pushed: None, stopped_at: None };
            if let Ok(mut slots) = self.slots.lock() {
                slots.offer(&job_id, HeldCell::of_encoded(held, None), true);
            }
        })
    }

    fn put(&self, job_id: &str, cell: Arc<HeldCell>) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.entry = Some(HeldEntry { job_id: job_id.to_string(), cell });
        }
    }

    /// Drops the state of `job_id`, which finished, if that is what is held. Another job's
    /// state stays: a job stopped for this one (a higher priority's, or one that took free
    /// workers) resumes from it when its next gang holds it, rather than from the store.
    pub fn release(&self, job_id: &str) {
        self.drop_if(|e| e.job_id == job_id);
    }

    /// Drops the held state if `matches` it; returns whether it did.
    fn drop_if(&self, matches: impl Fn(&HeldEntry) -> bool) -> bool {
        let Ok(mut slots) = self.slots.lock() else { return false };
        let dropped = slots.entry.as_ref().is_some_and(matches);
        if dropped {
            slots.entry = None;
        }
        dropped
    }

    /// The job whose state is held (one at most) and that state's step, if any: the agent's
    /// heartbeat names them, and drops the state with [`Holder::drop_obsolete`] once the cluster
    /// answers that no gang can take it.
    pub fn held_job(&self) -> Option<(String, u64)> {
        self.slots.lock().ok()?.entry.as_ref().map(|e| (e.job_id.clone(), e.cell.step))
    }

    /// Bytes of the held state's checkpoint encoding (what a peer would be sent; the decoded
    /// state beside it takes about as much again): 0 when nothing is held or it is still being
    /// encoded. Never waits for the encoder.
    pub fn held_bytes(&self) -> u64 {
        let Ok(slots) = self.slots.lock() else { return 0 };
        let encoded = slots.entry.as_ref().and_then(|e| e.cell.encoded.get()?.as_ref());
        encoded.map_or(0, |held| held.parts.iter().map(|p| p.len() as u64).sum())
    }

    /// Drops the held state if it is still `job_id`'s of step `step` (what the heartbeat named:
    /// a newer state held meanwhile stays). Returns whether it did.
    pub fn drop_obsolete(&self, job_id: &str, step: u64) -> bool {
        self.drop_if(|e| e.job_id == job_id && e.cell.step == step)
    }

    /// A push of `job_id`'s state will come (this worker replaces a leaving member): the
    /// job's next rank waits for it a little ([`ANNOUNCED_PUSH_WAIT_MAX`]).
    pub fn push_announced(&self, job_id: &str) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.push = Some(AwaitedPush { job_id: job_id.to_string(), begun: false });
        }
    }

    /// A push of `job_id`'s state has begun arriving: its ranks wait for it (see
    /// [`Holder::held_waiting`], up to [`PUSH_WAIT_MAX`]) until [`Holder::push_ended`].
    pub fn push_begun(&self, job_id: &str) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.push = Some(AwaitedPush { job_id: job_id.to_string(), begun: true });
        }
        self.pushed.notify_all();
    }

    /// The push of `job_id` ended: with the state (kept as held, unless a newer state of the
    /// job is held: a spare's older checkpoint push may end after a handover's), or without
    /// (failed).
    pub fn push_ended(&self, job_id: &str, held: Option<Held>) {
        if let Ok(mut slots) = self.slots.lock() {
            if let Some(held) = held {
                slots.offer(job_id, HeldCell::of_encoded(held, None), false);
            }
            if slots.push.as_ref().is_some_and(|p| p.job_id == job_id) {
                slots.push = None;
            }
        }
        self.pushed.notify_all();
    }

    /// The held state of `job_id` if it is the checkpoint whose manifest fingerprint is
    /// `fingerprint` (an empty fingerprint matches nothing), with its encoding.
    pub fn held(&self, job_id: &str, fingerprint: &str) -> Option<Held> {
        self.encoded(job_id).filter(|held| held.is_checkpoint(fingerprint))
    }

    /// [`Holder::held`], after waiting for a push of `job_id` that is announced or under way
    /// (see [`ANNOUNCED_PUSH_WAIT_MAX`], [`PUSH_WAIT_MAX`]). A push that is waited for in
    /// vain is forgotten: the gang exchanges the state, and later generations do not wait.
    pub fn held_waiting(&self, job_id: &str, fingerprint: &str) -> Option<Held> {
        let started = Instant::now();
        if let Ok(mut slots) = self.slots.lock() {
            while let Some(push) = slots.push.as_ref().filter(|p| p.job_id == job_id) {
                let limit = if push.begun { PUSH_WAIT_MAX } else { ANNOUNCED_PUSH_WAIT_MAX };
                let left = limit.saturating_sub(started.elapsed());
                if left.is_zero() {
                    slots.push = None;
                    break;
                }
                match self.pushed.wait_timeout(slots, left) {
                    Ok((next, _)) => slots = next,
                    Err(_) => return None,
                }
            }
        }
        self.held(job_id, fingerprint)
    }

    /// The encoding of whatever state of `job_id` is held (waits for the background encoder).
    fn encoded(&self, job_id: &str) -> Option<Held> {
        let cell = {
            let slots = self.slots.lock().ok()?;
            slots.entry.as_ref().filter(|e| e.job_id == job_id)?.cell.clone()
        };
        let mut held = cell.encoded().cloned()?;
        held.stopped_at = cell.stopped_at;
        Some(held)
    }
}

/// A held state with its checkpoint encoding, computed once: checked against the recorded
/// fingerprint, then framed for peers without encoding and hashing it again.
#[derive(Clone)]
pub struct Held {
    pub state: TrainState,
    /// The parts' bytes, in the manifest's order.
    parts: Vec<Bytes>,
    manifest: Manifest,
    /// Set when it was pushed to this worker (a handover's replacement): how it came.
    pub pushed: Option<Pushed>,
    /// When this worker's own rank stopped with it (its last optimizer step); None when pushed.
    pub stopped_at: Option<Instant>,
}

/// How a pushed state arrived.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pushed {
    pub bytes: u64,
    /// From the first byte of the push to the state decoded and checked.
    pub ms: f64,
    /// Pushed to this worker as a warm spare (a checkpoint its job's rank 0 recorded), not by a
    /// handover's leaving member.
    pub to_spare: bool,
}

impl Held {
    /// None when the state does not fit the checkpoint format's limits.
    pub fn encode(state: TrainState) -> Option<Held> {
        let encoded = Encoded::of(&state).ok()?;
        Some(Held::of_encoded(state, &encoded))
    }

    /// `state` with its encoding (made by [`Encoded::of`] from this state).
    pub fn of_encoded(state: TrainState, encoded: &Encoded) -> Held {
        Held {
            state,
            parts: encoded.parts.iter().map(|(_, bytes)| bytes.clone()).collect(),
            manifest: encoded.manifest.clone(),
            pushed: None,
            stopped_at: None,
        }
    }

    /// A state that arrived as checkpoint parts (in the order [`super::state::encode`] gives
    /// them), with the manifest its receiver computed from those bytes.
    pub(crate) fn from_parts(
        state: TrainState,
        parts: Vec<(String, Bytes)>,
        manifest: Manifest,
        pushed: Pushed,
    ) -> Held {
        Held {
            state,
            parts: parts.into_iter().map(|(_, bytes)| bytes).collect(),
            manifest,
            pushed: Some(pushed),
            stopped_at: None,
        }
    }

    /// The manifest fingerprint of the checkpoint it is.
    pub fn fingerprint(&self) -> String {
        self.manifest.fingerprint()
    }

    /// Whether it is the checkpoint whose manifest fingerprint is `fingerprint`.
    pub fn is_checkpoint(&self, fingerprint: &str) -> bool {
        !fingerprint.is_empty() && self.manifest.fingerprint() == fingerprint
    }
}

impl Default for Holder {
    fn default() -> Holder {
        Holder::new()
    }
}

/// What [`share`] gave this rank.
#[derive(Debug)]
pub enum Shared {
    /// This rank held the state: nothing moved.
    Held(TrainState),
    /// Received from rank `root` over the ring: `bytes` moved. `received` is what arrived, for
    /// this rank to hold in turn ([`Holder::hold_received`]).
    FromPeer { state: TrainState, root: usize, bytes: u64, received: Received },
    /// No rank holds it: read the store.
    Nobody,
}

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The gang broke during the exchange.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// What arrived is not the recorded checkpoint (this rank reads the store instead).
    #[error(transparent)]
    Refused(#[from] CheckpointError),
}

/// The collective exchange (every rank of the gang calls it, with what it holds of the
/// checkpoint `fingerprint`; see the module docs), with the bytes the whole gang moved peer to
/// peer (the frame times the ranks that lacked it, and what was pushed before the regroup),
/// which every rank knows once the exchange is done.
pub fn share(comm: &mut dyn Communicator, mine: Option<Held>, fingerprint: &str) -> Result<(Shared, u64), ShareError> {
    let (rank, world) = (comm.rank(), comm.world_size());
    // One all-reduce: who holds it, and the bytes pushed to each rank before the regroup
    // (three 16-bit pieces per rank, each exact in f32).
    let mut flags = vec![0.0f32; world * 4];
    if let Some(held) = &mine {
        flags[rank] = 1.0;
        let pushed = held.pushed.map_or(0, |p| p.bytes);
        for piece in 0..3 {
            flags[world + rank * 3 + piece] = ((pushed >> (16 * piece)) & 0xffff) as f32;
        }
    }
    comm.all_reduce_sum(&mut flags)?;
    let pushed: u64 = (0..world * 3).map(|i| (flags[world + i] as u64) << (16 * (i % 3))).sum();
    let holders: Vec<usize> = (0..world).filter(|&r| flags[r] > 0.5).collect();
    let Some(&root) = holders.first() else { return Ok((Shared::Nobody, 0)) };
    if holders.len() == world
        && let Some(held) = mine
    {
        return Ok((Shared::Held(held.state), pushed));
    }
    // The root frames its state; everyone learns the length, then receives the frame.
    let frame = match (&mine, rank == root) {
        (Some(held), true) => frame(held).filter(|f| f.len() as u64 <= TRANSFER_BYTES_MAX),
        _ => None,
    };
    let mut length = [0.0f32; 2];
    if let Some(frame) = &frame {
        bytemuck::cast_slice_mut::<f32, u8>(&mut length).copy_from_slice(&(frame.len() as u64).to_le_bytes());
    }
    comm.broadcast(&mut length, root)?;
    let mut raw = [0u8; 8];
    raw.copy_from_slice(bytemuck::cast_slice::<f32, u8>(&length));
    let bytes = u64::from_le_bytes(raw);
    if bytes == 0 || bytes > TRANSFER_BYTES_MAX {
        // The root could not frame it (too large): everyone that lacks it reads the store.
        return Ok((mine.map_or(Shared::Nobody, |held| Shared::Held(held.state)), pushed));
    }
    let moved = bytes.saturating_mul((world - holders.len()) as u64).saturating_add(pushed);
    let mut buffer = vec![0.0f32; (bytes as usize).div_ceil(4)];
    if let Some(frame) = &frame {
        bytemuck::cast_slice_mut::<f32, u8>(&mut buffer)[..frame.len()].copy_from_slice(frame);
    }
    comm.broadcast(&mut buffer, root)?;
    if let Some(held) = mine {
        return Ok((Shared::Held(held.state), moved));
    }
    let received = &bytemuck::cast_slice::<f32, u8>(&buffer)[..bytes as usize];
    let (state, received) = unframe(received, fingerprint, &format!("the state from rank {root}"))?;
    Ok((Shared::FromPeer { state, root, bytes, received }, moved))
}

/// `state` as one frame: MANIFEST length (u32, little-endian), MANIFEST, then the parts in
/// the manifest's order. None when the state does not fit the checkpoint format's limits.
fn frame(held: &Held) -> Option<Vec<u8>> {
    let (parts, manifest) = (&held.parts, held.manifest.encode());
    let total = 4 + manifest.len() + parts.iter().map(|b| b.len()).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&u32::try_from(manifest.len()).ok()?.to_le_bytes());
    out.extend_from_slice(&manifest);
    for part in parts {
        out.extend_from_slice(part);
    }
    Some(out)
}

/// The inverse of [`frame`], accepting only the checkpoint whose fingerprint is `fingerprint`
/// with every part matching its checksum; `origin` names the sender in errors.
fn unframe(bytes: &[u8], fingerprint: &str, origin: &str) -> Result<(TrainState, Received), CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt { prefix: origin.to_string(), reason };
    let (length, rest) = bytes.split_first_chunk::<4>().ok_or_else(|| corrupt("shorter than its header".into()))?;
    let length = u32::from_le_bytes(*length) as usize;
    if length > rest.len() {
        return Err(corrupt(format!("a {length}-byte manifest in {} bytes", rest.len())));
    }
    let (manifest_bytes, mut rest) = rest.split_at(length);
    let manifest = parse_manifest(manifest_bytes, origin)?;
    if manifest.fingerprint() != fingerprint {
        return Err(corrupt(format!(
            "its manifest {} is not the recorded checkpoint's {fingerprint}",
            manifest.fingerprint()
        )));
    }
    let mut parts = BTreeMap::new();
    for entry in &manifest.parts {
        let size = usize::try_from(entry.size_bytes).unwrap_or(usize::MAX);
        if size > rest.len() {
            return Err(corrupt(format!("part `{}` is cut short", entry.name)));
        }
        let (part, tail) = rest.split_at(size);
        super::check_part(entry, part, origin)?;
        parts.insert(entry.name.clone(), Bytes::copy_from_slice(part));
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(corrupt(format!("{} bytes after the last part", rest.len())));
    }
    let state = decode(&parts, origin)?.0;
    Ok((state, Received { parts, manifest }))
}

/// A state's checkpoint encoding as a rank received it from a peer (every part checked against
/// the manifest, the manifest against the recorded fingerprint).
#[derive(Debug)]
pub struct Received {
    parts: BTreeMap<String, Bytes>,
    manifest: Manifest,
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::checkpoint::manifest_of;
    use crate::checkpoint::state::encode;
    use crate::data::Cursor;
    use crate::train::OptimizerState;

    /// A training state of `step` with awkward values (also for the push's tests).
    pub(crate) fn state(step: u64) -> TrainState {
        let params: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.37).sin()).collect();
        TrainState {
            format_version: crate::train::TRAIN_STATE_FORMAT_VERSION,
            step,
            cursor: Cursor { epoch: 2, global_sample_offset: 1280 },
            // A negative zero and a NaN payload survive the transfer bit for bit.
            params: [vec![-0.0, f32::from_bits(0x7fc0_1234)], params].concat(),
            optimizer: OptimizerState::Adam {
                first_moment: vec![0.25; 5002],
                second_moment: vec![1e-8; 5002],
                updates: step,
            },
            layout_fingerprint: 0xbeef,
            seed: 7,
            train_rows: 4000,
            patience: Default::default(),
            // `train.keep_best`'s part travels too.
            best_params: vec![0.5; 5002],
        }
    }

    fn fingerprint(state: &TrainState) -> String {
        manifest_of(&encode(state, None)).expect("fits").fingerprint()
    }

    fn held(state: &TrainState) -> Held {
        Held::encode(state.clone()).expect("fits")
    }

    fn is_checkpoint(state: &TrainState, fingerprint: &str) -> bool {
        held(state).is_checkpoint(fingerprint)
    }

    fn bits(state: &TrainState) -> Vec<u32> {
        state.params.iter().map(|p| p.to_bits()).collect()
    }

    /// Equal bit for bit (`==` would call the NaN parameter unequal to itself).
    fn same(a: &TrainState, b: &TrainState) -> bool {
        bits(a) == bits(b)
            && a.optimizer == b.optimizer
            && TrainState { params: vec![], ..a.clone() } == TrainState { params: vec![], ..b.clone() }
    }

    /// Runs `share` on a loopback ring of `held.len()` ranks, rank r holding `held[r]`.
    fn exchange(held: Vec<Option<TrainState>>, fingerprint: &str) -> Vec<Result<Shared, ShareError>> {
        exchange_counted(held, fingerprint).into_iter().map(|r| r.map(|(shared, _)| shared)).collect()
    }

    /// [`exchange`] with each rank's count of the bytes the gang moved.
    fn exchange_counted(held: Vec<Option<TrainState>>, fingerprint: &str) -> Vec<Result<(Shared, u64), ShareError>> {
        let gang = ring::loopback_gang(held.len(), Duration::from_secs(10)).expect("ring");
        let threads: Vec<_> = gang
            .into_iter()
            .zip(held)
            .map(|(mut comm, mine)| {
                let fingerprint = fingerprint.to_string();
                let mine = mine.map(|state| Held::encode(state).expect("fits"));
                std::thread::spawn(move || share(&mut comm, mine, &fingerprint))
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("rank thread")).collect()
    }

    #[test]
    fn ranks_without_the_state_receive_it_bit_for_bit_from_the_lowest_holder() {
        let s = state(120);
        let f = fingerprint(&s);
        let results = exchange(vec![None, Some(s.clone()), None, Some(s.clone())], &f);
        for (rank, result) in results.into_iter().enumerate() {
            match result.expect("exchange") {
                Shared::Held(got) => assert!([1, 3].contains(&rank) && same(&got, &s)),
                Shared::FromPeer { state: got, root, bytes, .. } => {
                    assert!([0, 2].contains(&rank), "rank {rank}");
                    assert_eq!(root, 1);
                    assert!(same(&got, &s), "rank {rank} got another state");
                    assert_eq!(bytes, frame(&held(&s)).expect("frame").len() as u64);
                }
                Shared::Nobody => panic!("rank {rank}: a holder existed"),
            }
        }
    }

    #[test]
    fn a_rank_that_received_the_state_holds_it_in_turn_unless_it_holds_a_newer_one() {
        let s = state(120);
        let f = fingerprint(&s);
        let results = exchange(vec![Some(s.clone()), None], &f);
        let Ok(Shared::FromPeer { state: got, received, .. }) = results.into_iter().nth(1).expect("rank 1") else {
            panic!("rank 1 received it");
        };
        let holder: &'static Holder = Box::leak(Box::new(Holder::new()));
        holder.hold_received("job-1", received).join().expect("holding thread");
        let held = holder.held("job-1", &f).expect("the received state is held");
        assert!(same(&held.state, &got) && same(&held.state, &s));
        assert_eq!(frame(&held), frame(&self::held(&s)), "held as the same checkpoint encoding");
        assert!(held.pushed.is_none() && held.stopped_at.is_none());
        // A newer state of the job (this rank's next generation broke later) is not replaced.
        let newer = state(130);
        let received = {
            let frame = frame(&self::held(&s)).expect("frame");
            unframe(&frame, &f, "peer").expect("frame").1
        };
        holder.hold("job-1", newer.clone());
        holder.hold_received("job-1", received).join().expect("holding thread");
        assert!(holder.held("job-1", &f).is_none(), "the older received state replaced the newer one");
        assert!(holder.held("job-1", &fingerprint(&newer)).is_some_and(|h| same(&h.state, &newer)));
    }

    #[test]
    fn every_rank_knows_what_the_gang_moved_peer_to_peer() {
        let s = state(60);
        let f = fingerprint(&s);
        let frame_bytes = frame(&held(&s)).expect("frame").len() as u64;
        for result in exchange_counted(vec![Some(s.clone()), None, None], &f) {
            assert_eq!(result.expect("exchange").1, 2 * frame_bytes, "two ranks received the frame");
        }
        for result in exchange_counted(vec![Some(s.clone()), Some(s.clone())], &f) {
            assert_eq!(result.expect("exchange").1, 0, "all held: nothing moved");
        }
    }

    #[test]
    fn bytes_pushed_before_the_regroup_count_as_moved_peer_to_peer() {
        // Rank 1 was a handover's replacement: its state was pushed to it (a 5 GB model's
        // count, beyond f32's exact integers, to check the pieces), so nothing moves now.
        let s = state(90);
        let f = fingerprint(&s);
        let pushed = 5_000_000_123u64;
        let gang = ring::loopback_gang(3, Duration::from_secs(10)).expect("ring");
        let threads: Vec<_> = gang
            .into_iter()
            .enumerate()
            .map(|(rank, mut comm)| {
                let (s, f) = (s.clone(), f.clone());
                std::thread::spawn(move || {
                    let mut mine = Held::encode(s).expect("fits");
                    if rank == 1 {
                        mine.pushed = Some(Pushed { bytes: pushed, ms: 3.0, to_spare: false });
                    }
                    share(&mut comm, Some(mine), &f)
                })
            })
            .collect();
        for thread in threads {
            let (shared, moved) = thread.join().expect("rank").expect("exchange");
            assert!(matches!(shared, Shared::Held(_)));
            assert_eq!(moved, pushed, "every rank counts the push");
        }
    }

    #[test]
    fn all_or_none_holding_moves_nothing() {
        let s = state(40);
        let f = fingerprint(&s);
        for result in exchange(vec![Some(s.clone()), Some(s.clone())], &f) {
            assert!(matches!(result.expect("exchange"), Shared::Held(got) if same(&got, &s)));
        }
        for result in exchange(vec![None, None, None], &f) {
            assert!(matches!(result.expect("exchange"), Shared::Nobody));
        }
    }

    #[test]
    fn a_state_that_is_not_the_recorded_checkpoint_is_refused() {
        // The holder's state is of another step than the fingerprint the coordinator recorded:
        // `held` would not offer it; if a peer sent it anyway, the receiver refuses it.
        let recorded = state(80);
        let other = state(81);
        assert!(is_checkpoint(&recorded, &fingerprint(&recorded)));
        assert!(!is_checkpoint(&other, &fingerprint(&recorded)));
        assert!(!is_checkpoint(&recorded, ""));
        let results = exchange(vec![Some(other), None], &fingerprint(&recorded));
        let refused = results.into_iter().nth(1).expect("rank 1");
        let error = refused.expect_err("refused").to_string();
        assert!(error.contains("not the recorded checkpoint"), "{error}");
    }

    #[test]
    fn damaged_frames_are_refused_with_the_reason() {
        let s = state(12);
        let f = fingerprint(&s);
        let good = frame(&held(&s)).expect("frame");
        assert!(same(&unframe(&good, &f, "peer").expect("good frame").0, &s));
        let mut flipped = good.clone();
        let last = flipped.len() - 10;
        flipped[last] ^= 1;
        let cases = [
            (good[..2].to_vec(), "shorter than its header"),
            (good[..good.len() - 1].to_vec(), "cut short"),
            ([good.clone(), vec![0]].concat(), "after the last part"),
            (flipped, "does not match its checksum"),
        ];
        for (bytes, reason) in cases {
            let error = unframe(&bytes, &f, "peer").expect_err(reason).to_string();
            assert!(error.contains(reason), "{error}");
        }
    }

    #[test]
    fn a_rank_waits_for_an_announced_push_a_little_and_for_one_under_way_until_it_ends() {
        let holder = Arc::new(Holder::new());
        let s = state(70);
        let f = fingerprint(&s);
        // Announced, never begun (the leaving member died): a bounded wait, then forgotten.
        holder.push_announced("5");
        let started = Instant::now();
        assert!(holder.held_waiting("5", &f).is_none());
        let waited = started.elapsed();
        assert!(waited >= ANNOUNCED_PUSH_WAIT_MAX && waited < PUSH_WAIT_MAX, "{waited:?}");
        let started = Instant::now();
        assert!(holder.held_waiting("5", &f).is_none());
        assert!(started.elapsed() < ANNOUNCED_PUSH_WAIT_MAX, "a forgotten push is not waited for again");
        // Under way: the rank gets the state as soon as it arrives; another job's rank does not wait.
        holder.push_announced("5");
        holder.push_begun("5");
        let started = Instant::now();
        assert!(holder.held_waiting("6", &f).is_none());
        assert!(started.elapsed() < ANNOUNCED_PUSH_WAIT_MAX);
        let arriving = holder.clone();
        let parts = encode(&s, None);
        let manifest = manifest_of(&parts).expect("fits");
        let pushed = Held::from_parts(
            s.clone(),
            parts.into_iter().map(|(name, bytes)| (name.to_string(), bytes)).collect(),
            manifest,
            Pushed { bytes: 9, ms: 1.0, to_spare: false },
        );
        let sender = std::thread::spawn(move || {
            std::thread::sleep(ANNOUNCED_PUSH_WAIT_MAX + Duration::from_millis(200));
            arriving.push_ended("5", Some(pushed));
        });
        let got = holder.held_waiting("5", &f).expect("the pushed state, past the announced wait");
        assert!(same(&got.state, &s) && got.pushed.is_some_and(|p| p.bytes == 9));
        sender.join().expect("sender");
    }

    #[test]
    fn only_the_job_s_matching_state_is_held() {
        let holder = Holder::new();
        let s = state(60);
        let f = fingerprint(&s);
        assert_eq!(holder.held_job(), None);
        holder.hold("7", s.clone());
        assert_eq!(holder.held_job(), Some(("7".to_string(), 60)), "what the heartbeat names");
        let encoded_bytes: u64 = Encoded::of(&s).expect("fits").parts.iter().map(|(_, p)| p.len() as u64).sum();
        let deadline = Instant::now() + Duration::from_secs(10);
        while holder.held_bytes() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1)); // the background encoder
        }
        assert_eq!(holder.held_bytes(), encoded_bytes);
        // The heartbeat's answer drops only the state it named.
        assert!(!holder.drop_obsolete("7", 59) && !holder.drop_obsolete("8", 60));
        assert!(holder.held("7", &f).is_some());
        assert!(holder.held("7", &f).is_some_and(|got| same(&got.state, &s)));
        assert!(holder.held("8", &f).is_none(), "another job's state");
        assert!(holder.held("7", &fingerprint(&state(61))).is_none(), "another checkpoint");
        // Another job's end leaves it; its own drops it.
        holder.release("8");
        assert!(holder.held("7", &f).is_some());
        holder.release("7");
        assert!(holder.held("7", &f).is_none());
        assert_eq!(holder.held_job(), None);
        holder.hold("7", s.clone());
        assert!(holder.drop_obsolete("7", 60));
        assert_eq!((holder.held_job(), holder.held_bytes()), (None, 0));
        // Held with the writer's encoding (rank 0 at a stop): the same fingerprint and state,
        // and the same bytes a peer gets as an encoding made by the holder.
        let encoded = Encoded::of(&s).expect("fits");
        assert_eq!(encoded.manifest.fingerprint(), f);
        holder.hold_encoded("7", s.clone(), &encoded);
        let got = holder.held("7", &f).expect("held");
        assert!(same(&got.state, &s) && got.stopped_at.is_some());
        assert_eq!(got.parts, Held::encode(s).expect("fits").parts);
    }
}
