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
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

use super::state::{decode, encode};
use super::{CheckpointError, Manifest, manifest_of, parse_manifest};
use crate::collective::{CollectiveError, Communicator, ring};
use crate::train::TrainState;

/// Bytes of one transfer at most (the ring's largest broadcast).
pub const TRANSFER_BYTES_MAX: u64 = ring::ELEMENTS_MAX as u64 * 4;

/// The state a planned stop left in memory, for one job. One at most: an agent runs one rank
/// at a time. Its checkpoint encoding (the parts, their SHA-256s and the manifest) is computed
/// on a background thread from the moment it is held, so the next generation's exchange
/// finds it ready instead of encoding and hashing the whole state on the resume path.
pub struct Holder(Mutex<Option<HeldEntry>>);

struct HeldEntry {
    job_id: String,
    cell: Arc<HeldCell>,
}

/// One held state, kept once: raw until someone encodes it (the background thread, or the
/// exchange if it comes first), then only inside its encoding.
struct HeldCell {
    raw: Mutex<Option<TrainState>>,
    encoded: OnceLock<Option<Held>>,
}

impl HeldCell {
    /// The encoding; computes it from the raw state if nobody has, waits for an encoding
    /// under way on another thread.
    fn encoded(&self) -> Option<&Held> {
        self.encoded.get_or_init(|| self.raw.lock().ok()?.take().and_then(Held::encode)).as_ref()
    }
}

/// This process's holder.
pub static HELD: Holder = Holder::new();

impl Holder {
    pub const fn new() -> Holder {
        Holder(Mutex::new(None))
    }

    /// Keeps `state` (the step a generation of `job_id` stopped at) for the next generation,
    /// and starts encoding it in the background.
    pub fn hold(&self, job_id: &str, state: TrainState) {
        let cell = Arc::new(HeldCell { raw: Mutex::new(Some(state)), encoded: OnceLock::new() });
        let background = cell.clone();
        std::thread::spawn(move || {
            background.encoded();
        });
        if let Ok(mut held) = self.0.lock() {
            *held = Some(HeldEntry { job_id: job_id.to_string(), cell });
        }
    }

    /// Drops what is held (the job finished).
    pub fn release(&self) {
        if let Ok(mut held) = self.0.lock() {
            *held = None;
        }
    }

    /// The held state of `job_id` if it is the checkpoint whose manifest fingerprint is
    /// `fingerprint` (an empty fingerprint matches nothing), with its encoding.
    pub fn held(&self, job_id: &str, fingerprint: &str) -> Option<Held> {
        let cell = {
            let held = self.0.lock().ok()?;
            held.as_ref().filter(|e| e.job_id == job_id)?.cell.clone()
        };
        cell.encoded().filter(|held| held.is_checkpoint(fingerprint)).cloned()
    }
}

/// A held state with its checkpoint encoding, computed once: checked against the recorded
/// fingerprint, then framed for peers without encoding and hashing it again.
#[derive(Clone)]
pub struct Held {
    pub state: TrainState,
    parts: Vec<(&'static str, Bytes)>,
    manifest: Manifest,
}

impl Held {
    /// None when the state does not fit the checkpoint format's limits.
    pub fn encode(state: TrainState) -> Option<Held> {
        let parts = encode(&state, None);
        let manifest = manifest_of(&parts).ok()?;
        Some(Held { state, parts, manifest })
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
    /// Received from rank `root` over the ring: `bytes` moved.
    FromPeer { state: TrainState, root: usize, bytes: u64 },
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
/// checkpoint `fingerprint`): see the module docs.
pub fn share(comm: &mut dyn Communicator, mine: Option<Held>, fingerprint: &str) -> Result<Shared, ShareError> {
    share_counted(comm, mine, fingerprint).map(|(shared, _)| shared)
}

/// [`share`], with the bytes the whole gang moved peer to peer (the frame times the ranks
/// that lacked it), which every rank knows once the exchange is done.
pub fn share_counted(
    comm: &mut dyn Communicator,
    mine: Option<Held>,
    fingerprint: &str,
) -> Result<(Shared, u64), ShareError> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let mut flags = vec![0.0f32; world];
    if mine.is_some() {
        flags[rank] = 1.0;
    }
    comm.all_reduce_sum(&mut flags)?;
    let holders: Vec<usize> = (0..world).filter(|&r| flags[r] > 0.5).collect();
    let Some(&root) = holders.first() else { return Ok((Shared::Nobody, 0)) };
    if holders.len() == world
        && let Some(held) = mine
    {
        return Ok((Shared::Held(held.state), 0));
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
        return Ok((mine.map_or(Shared::Nobody, |held| Shared::Held(held.state)), 0));
    }
    let moved = bytes.saturating_mul((world - holders.len()) as u64);
    let mut buffer = vec![0.0f32; (bytes as usize).div_ceil(4)];
    if let Some(frame) = &frame {
        bytemuck::cast_slice_mut::<f32, u8>(&mut buffer)[..frame.len()].copy_from_slice(frame);
    }
    comm.broadcast(&mut buffer, root)?;
    if let Some(held) = mine {
        return Ok((Shared::Held(held.state), moved));
    }
    let received = &bytemuck::cast_slice::<f32, u8>(&buffer)[..bytes as usize];
    let state = unframe(received, fingerprint, &format!("the state from rank {root}"))?;
    Ok((Shared::FromPeer { state, root, bytes }, moved))
}

/// `state` as one frame: MANIFEST length (u32, little-endian), MANIFEST, then the parts in
/// the manifest's order. None when the state does not fit the checkpoint format's limits.
fn frame(held: &Held) -> Option<Vec<u8>> {
    let (parts, manifest) = (&held.parts, held.manifest.encode());
    let total = 4 + manifest.len() + parts.iter().map(|(_, b)| b.len()).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&u32::try_from(manifest.len()).ok()?.to_le_bytes());
    out.extend_from_slice(&manifest);
    for (_, part) in parts {
        out.extend_from_slice(part);
    }
    Some(out)
}

/// The inverse of [`frame`], accepting only the checkpoint whose fingerprint is `fingerprint`
/// with every part matching its checksum; `origin` names the sender in errors.
fn unframe(bytes: &[u8], fingerprint: &str, origin: &str) -> Result<TrainState, CheckpointError> {
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
    Ok(decode(&parts, origin)?.0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::data::Cursor;
    use crate::train::OptimizerState;

    fn state(step: u64) -> TrainState {
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
                std::thread::spawn(move || share_counted(&mut comm, mine, &fingerprint))
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
                Shared::FromPeer { state: got, root, bytes } => {
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
        assert!(same(&unframe(&good, &f, "peer").expect("good frame"), &s));
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
    fn only_the_job_s_matching_state_is_held() {
        let holder = Holder::new();
        let s = state(60);
        let f = fingerprint(&s);
        holder.hold("7", s.clone());
        assert!(holder.held("7", &f).is_some_and(|got| same(&got.state, &s)));
        assert!(holder.held("8", &f).is_none(), "another job's state");
        assert!(holder.held("7", &fingerprint(&state(61))).is_none(), "another checkpoint");
        holder.release();
        assert!(holder.held("7", &f).is_none());
    }
}
