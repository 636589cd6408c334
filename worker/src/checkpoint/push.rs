//! A handover's state push: the leaving member sends its stop-step state to its replacement's
//! data port while the coordinator regroups the gang, so the new generation starts with every
//! rank already holding it ([`super::peer`]: nothing moves at the exchange).
//!
//! ```text
//!   coordinator: PrepareJob(job, generation g, key) ──▶ replacement (expects the push)
//!                CheckpointNow(job, g, replacement's data addr, key) ──▶ leaving member
//!   leaving member, once its rank stopped at step s and holds the state:
//!     ──▶ hello: "FLOTPUSH" | g (u64) | job id (u16 length, bytes) | nonce_c
//!     ◀── nonce_a | HMAC(key, "accept" | hello | nonce_a)      the replacement knows the key
//!     ──▶ HMAC(key, "push" | hello | nonce_a) | frame length (u64) | frame
//!     ◀── 1: kept (0: refused)
//!   frame: part count (u32), then per part: name length (u16) | name | size (u64) | bytes,
//!          the checkpoint's parts as `state::encode` gives them (no hashes: see below)
//!   replacement: hashes each part as it arrives (chunk by chunk, while the next is on the
//!   way), decodes the state and holds it with the parts' manifest for the job;
//!   its rank in generation g+1 counts as a holder only if that manifest's fingerprint is the
//!   recorded checkpoint's
//! ```
//!
//! The sender hashes nothing on the push's way: it frames its state as it stops and sends (a
//! leaving rank 0 hashes the same encoding for its announcement meanwhile). The receiver's
//! manifest, compared with the fingerprint the coordinator recorded from rank 0's
//! announcement, checks every byte end to end, which a manifest from the sender would not add
//! to.
//!
//! Trust: the key is derived by the coordinator from the gang key for this handover alone
//! (`job/g/handover`) and told only to the two workers; both prove it before any state moves,
//! so nobody else plants or reads a state. A state that is not the recorded checkpoint never
//! counts (its fingerprint differs). A push that fails or comes late costs nothing: the gang's
//! exchange at the start of the generation moves the state as before.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::peer::{self, HELD, Held, Pushed};
use super::state::decode;
use super::{PART_BYTES_MAX, PARTS_MAX, PartEntry, manifest_of_entries, part_entry};
use crate::collective::port::PUSH_MAGIC;
use crate::collective::ring::{MAC_LEN, NONCE_LEN, mac, mac_matches, nonce};

/// Bytes of a job id in a push's hello at most.
pub const JOB_ID_BYTES_MAX: usize = 64;
/// Time for the connection to the replacement.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time for any one read or write.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of the hello before the job id: magic, generation, job id length.
const HEAD_LEN: usize = 8 + 8 + 2;
/// Bytes of a part read (then hashed) at a time: the hash of one chunk overlaps the arrival of
/// the next.
const RECEIVE_CHUNK_BYTES: u64 = 256 * 1024;

/// The handover this worker takes a push for (from its PrepareJob): one at a time.
#[derive(Clone, PartialEq, Eq)]
pub struct Expected {
    pub job_id: String,
    pub generation: u64,
    pub key: Vec<u8>,
    /// A warm spare (its job's rank 0 pushes each checkpoint it records here), not a handover's
    /// reserved replacement.
    pub spare: bool,
}

static EXPECTED: Mutex<Option<Expected>> = Mutex::new(None);

/// Accepts a push for `expected` from now on (replacing any earlier expectation); the job's
/// next rank on this worker waits for it a little.
pub fn expect(expected: Expected) {
    HELD.push_announced(&expected.job_id);
    accept(expected);
}

/// Accepts a push for `expected` from now on, without making the job's next rank wait for one
/// (a warm spare: a handover may reserve it, or a hard loss may take it without any push).
pub fn accept(expected: Expected) {
    if let Ok(mut slot) = EXPECTED.lock() {
        *slot = Some(expected);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("state push to {addr}: {reason}")]
    Io { addr: String, reason: String },
    #[error("state push to {addr} refused: {reason}")]
    Refused { addr: String, reason: String },
}

fn hello(job_id: &str, generation: u64, nonce_c: &[u8]) -> Vec<u8> {
    let mut hello = Vec::with_capacity(HEAD_LEN + job_id.len() + NONCE_LEN);
    hello.extend_from_slice(&PUSH_MAGIC.to_le_bytes());
    hello.extend_from_slice(&generation.to_le_bytes());
    hello.extend_from_slice(&(job_id.len() as u16).to_le_bytes());
    hello.extend_from_slice(job_id.as_bytes());
    hello.extend_from_slice(nonce_c);
    hello
}

/// Pushes `parts` (the stop-step state of `job_id`'s generation `generation`, as
/// [`super::state::encode`] gives them) to the replacement at `addr`, proving `key`. Returns the frame's
/// bytes once the replacement kept it.
pub fn send(
    addr: &str,
    job_id: &str,
    generation: u64,
    key: &[u8],
    parts: &[(&'static str, Bytes)],
) -> Result<u64, PushError> {
    let io = |reason: String| PushError::Io { addr: addr.to_string(), reason };
    let refused = |reason: String| PushError::Refused { addr: addr.to_string(), reason };
    if job_id.len() > JOB_ID_BYTES_MAX {
        return Err(refused(format!("job id of {} bytes (at most {JOB_ID_BYTES_MAX})", job_id.len())));
    }
    let heads = frame_heads(parts);
    let length =
        heads.iter().map(Vec::len).sum::<usize>() as u64 + parts.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
    if length > peer::TRANSFER_BYTES_MAX {
        return Err(refused(format!("{length} bytes (at most {})", peer::TRANSFER_BYTES_MAX)));
    }
    let socket: SocketAddr = addr.parse().map_err(|e| io(format!("address: {e}")))?;
    let mut stream = TcpStream::connect_timeout(&socket, CONNECT_TIMEOUT).map_err(|e| io(format!("connect: {e}")))?;
    let _ = stream.set_nodelay(true);
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| io(e.to_string()))?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| io(e.to_string()))?;
    let nonce_c = nonce().map_err(|e| io(e.to_string()))?;
    let hello = hello(job_id, generation, &nonce_c);
    stream.write_all(&hello).map_err(|e| io(format!("hello: {e}")))?;
    let mut answer = [0u8; NONCE_LEN + MAC_LEN];
    stream.read_exact(&mut answer).map_err(|e| io(format!("the replacement's answer: {e}")))?;
    let (nonce_a, mac_a) = answer.split_at(NONCE_LEN);
    if !mac_matches(key, b"accept", &hello, nonce_a, mac_a) {
        return Err(refused("the replacement does not hold this handover's key".into()));
    }
    let mut head = mac(key, b"push", &hello, nonce_a).to_vec();
    head.extend_from_slice(&length.to_le_bytes());
    stream.write_all(&head).map_err(|e| io(format!("proof: {e}")))?;
    // Each part straight from its encoding, after its head (the first head carries the count).
    for (head, (_, bytes)) in heads.iter().zip(parts) {
        stream.write_all(head).map_err(|e| io(format!("state: {e}")))?;
        stream.write_all(bytes).map_err(|e| io(format!("state: {e}")))?;
    }
    let mut kept = [0u8; 1];
    stream.read_exact(&mut kept).map_err(|e| io(format!("the replacement's receipt: {e}")))?;
    match kept[0] {
        1 => Ok(length),
        _ => Err(refused("the replacement could not check or decode the state".into())),
    }
}

/// Takes one push (the data port's handler for "FLOTPUSH" connections): only for the expected
/// handover, only from a sender that proves its key; the state is held for the job's next
/// generation. Failures are logged and cost nothing but the push.
pub fn serve(mut stream: TcpStream) {
    let started = Instant::now();
    let from = stream.peer_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
    let _ = stream.set_nodelay(true);
    if stream.set_read_timeout(Some(IO_TIMEOUT)).and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT))).is_err() {
        return;
    }
    let Some(Accepted { job_id, hello, nonce_a, key, spare }) = handshake(&mut stream, &from) else { return };
    let length = match proof(&mut stream, &hello, &nonce_a, &key) {
        Ok(length) => length,
        Err(reason) => {
            tracing::warn!(job = %job_id, from = %from, reason = %reason, "a state push was refused");
            let _ = stream.write_all(&[0]);
            return;
        }
    };
    // From here the job's ranks wait for this push (bounded by peer::PUSH_WAIT_MAX).
    HELD.push_begun(&job_id);
    let authenticated_ms = started.elapsed().as_secs_f64() * 1e3;
    let outcome = receive(&mut stream, &from, length, started, spare);
    let kept = match outcome {
        Ok((held, read_ms)) => {
            let ms = held.pushed.map_or(0.0, |p| p.ms);
            tracing::info!(
                job = %job_id, from = %from, bytes = length, ms, authenticated_ms, read_ms, spare,
                "a pushed state arrived"
            );
            HELD.push_ended(&job_id, Some(held));
            true
        }
        Err(reason) => {
            tracing::warn!(job = %job_id, from = %from, reason = %reason, "a state push failed; the gang exchanges it");
            HELD.push_ended(&job_id, None);
            false
        }
    };
    let _ = stream.write_all(&[u8::from(kept)]);
}

/// A push's accepted hello.
struct Accepted {
    job_id: String,
    hello: Vec<u8>,
    nonce_a: [u8; NONCE_LEN],
    key: Vec<u8>,
    spare: bool,
}

/// Reads the hello and answers it if it is the expected handover's. None (logged) for
/// anything else.
fn handshake(stream: &mut TcpStream, from: &str) -> Option<Accepted> {
    let mut head = [0u8; HEAD_LEN];
    stream.read_exact(&mut head).ok()?;
    let generation = u64::from_le_bytes(head[8..16].try_into().ok()?);
    let length = u16::from_le_bytes(head[16..18].try_into().ok()?) as usize;
    if length > JOB_ID_BYTES_MAX {
        tracing::warn!(from, length, "a state push named a job id over {JOB_ID_BYTES_MAX} bytes; dropped");
        return None;
    }
    let mut rest = vec![0u8; length + NONCE_LEN];
    stream.read_exact(&mut rest).ok()?;
    let job_id = String::from_utf8(rest[..length].to_vec()).ok()?;
    let expected = EXPECTED.lock().ok()?.clone();
    let Some(expected) = expected.filter(|e| e.job_id == job_id && e.generation == generation) else {
        tracing::warn!(from, job = %job_id, generation, "a state push for a handover this worker was not told of; dropped");
        return None;
    };
    let hello = [head.as_slice(), &rest].concat();
    let nonce_a = nonce().ok()?;
    let mut answer = nonce_a.to_vec();
    answer.extend_from_slice(&mac(&expected.key, b"accept", &hello, &nonce_a));
    stream.write_all(&answer).ok()?;
    Some(Accepted { job_id, hello, nonce_a, key: expected.key, spare: expected.spare })
}

/// The sender's proof of the key, and the frame's length.
fn proof(stream: &mut TcpStream, hello: &[u8], nonce_a: &[u8], key: &[u8]) -> Result<u64, String> {
    let mut head = [0u8; MAC_LEN + 8];
    stream.read_exact(&mut head).map_err(|e| format!("proof: {e}"))?;
    if !mac_matches(key, b"push", hello, nonce_a, &head[..MAC_LEN]) {
        return Err("the sender does not hold this handover's key".into());
    }
    let length = u64::from_le_bytes(head[MAC_LEN..].try_into().map_err(|_| "length".to_string())?);
    if length == 0 || length > peer::TRANSFER_BYTES_MAX {
        return Err(format!("a frame of {length} bytes (1 to {})", peer::TRANSFER_BYTES_MAX));
    }
    Ok(length)
}

/// The frame, decoded, with its manifest computed and how it came (`started`: the push's
/// first byte); with the milliseconds its bytes took to arrive (and be hashed).
fn receive(
    stream: &mut TcpStream,
    from: &str,
    length: u64,
    started: Instant,
    to_spare: bool,
) -> Result<(Held, f64), String> {
    let reading = Instant::now();
    let (parts, entries) = read_frame(stream, length)?;
    let read_ms = reading.elapsed().as_secs_f64() * 1e3;
    let manifest = manifest_of_entries(entries).map_err(|e| e.to_string())?;
    let origin = format!("the state pushed by {from}");
    let map = parts.iter().cloned().collect();
    let state = decode(&map, &origin).map_err(|e| e.to_string())?.0;
    let pushed = Pushed { bytes: length, ms: started.elapsed().as_secs_f64() * 1e3, to_spare };
    let held = Held::from_parts(state, parts, manifest, pushed);
    Ok((held, read_ms))
}

/// Each part's head in the frame (the first also carries the part count).
pub(super) fn frame_heads(parts: &[(&str, Bytes)]) -> Vec<Vec<u8>> {
    parts
        .iter()
        .enumerate()
        .map(|(i, (name, bytes))| {
            let mut head = Vec::with_capacity(4 + 2 + name.len() + 8);
            if i == 0 {
                head.extend_from_slice(&(parts.len() as u32).to_le_bytes());
            }
            head.extend_from_slice(&(name.len() as u16).to_le_bytes());
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            head
        })
        .collect()
}

/// A frame's parts (name, bytes) in order, and their manifest entries.
type Frame = (Vec<(String, Bytes)>, Vec<PartEntry>);

/// Reads a frame of `length` bytes: its parts in order, each with its manifest entry (hashed
/// chunk by chunk as it arrives), within the format's limits.
fn read_frame(reader: &mut impl Read, length: u64) -> Result<Frame, String> {
    read_frame_hashing(reader, length, true)
}

/// [`read_frame`]'s parts without their hashes (a transfer that checks its state otherwise).
pub(super) fn read_parts(reader: &mut impl Read, length: u64) -> Result<Vec<(String, Bytes)>, String> {
    Ok(read_frame_hashing(reader, length, false)?.0)
}

/// [`read_frame`], the entries only when `hashing` (else none).
fn read_frame_hashing(reader: &mut impl Read, length: u64, hashing: bool) -> Result<Frame, String> {
    let mut frame = reader.take(length);
    let count = u32::from_le_bytes(read_array(&mut frame)?) as usize;
    if count == 0 || count > PARTS_MAX {
        return Err(format!("{count} parts (1 to {PARTS_MAX})"));
    }
    let mut parts = Vec::with_capacity(count);
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let mut name = vec![0u8; u16::from_le_bytes(read_array(&mut frame)?) as usize];
        frame.read_exact(&mut name).map_err(cut_short)?;
        let name = String::from_utf8(name).map_err(|_| "a part name that is not UTF-8".to_string())?;
        let size = u64::from_le_bytes(read_array(&mut frame)?);
        if size > PART_BYTES_MAX {
            return Err(format!("part `{name}` of {size} bytes (at most {PART_BYTES_MAX})"));
        }
        if size > frame.limit() {
            return Err("the frame is cut short".into());
        }
        if hashing {
            let (body, digest) = read_hashed(&mut frame, size)?;
            entries.push(part_entry(&name, size, &digest).map_err(|e| e.to_string())?);
            parts.push((name, Bytes::from(body)));
        } else {
            let mut body = vec![0u8; size as usize];
            frame.read_exact(&mut body).map_err(cut_short)?;
            parts.push((name, Bytes::from(body)));
        }
    }
    if frame.limit() != 0 {
        return Err(format!("{} bytes after the last part", frame.limit()));
    }
    Ok((parts, entries))
}

/// `size` bytes and their SHA-256, hashed a chunk at a time as they arrive.
fn read_hashed(reader: &mut impl Read, size: u64) -> Result<(Vec<u8>, [u8; 32]), String> {
    let mut body = Vec::with_capacity(size as usize);
    let mut hasher = Sha256::new();
    while (body.len() as u64) < size {
        let at = body.len();
        let chunk = (size - at as u64).min(RECEIVE_CHUNK_BYTES);
        let got = reader.take(chunk).read_to_end(&mut body).map_err(cut_short)?;
        if got == 0 {
            return Err("the frame is cut short".into());
        }
        hasher.update(&body[at..]);
    }
    Ok((body, hasher.finalize().into()))
}

fn read_array<const N: usize>(reader: &mut impl Read) -> Result<[u8; N], String> {
    let mut bytes = [0u8; N];
    reader.read_exact(&mut bytes).map_err(cut_short)?;
    Ok(bytes)
}

fn cut_short(e: std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof { "the frame is cut short".into() } else { format!("state: {e}") }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::Arc;

    use super::*;
    use crate::checkpoint::peer::tests::state;
    use crate::checkpoint::state::encode;
    use crate::collective::port::DataPort;
    use crate::train::TrainState;

    /// One test: the expectation and the holder are process-wide, like an agent's.
    #[test]
    fn only_the_expected_handover_s_key_pushes_a_state_and_it_arrives_bit_for_bit() {
        let port =
            DataPort::start(TcpListener::bind("127.0.0.1:0").expect("bind"), Some(Arc::new(serve))).expect("data port");
        let addr = port.local_addr().to_string();
        let sent = state(40);
        let held = Held::encode(sent.clone()).expect("fits");
        let parts = encode(&sent, None);
        let fingerprint = held.fingerprint();
        let key = vec![7u8; 32];
        // Not expected yet: dropped before any state moves.
        let error = send(&addr, "job-9", 3, &key, &parts).expect_err("nobody expects it").to_string();
        assert!(error.contains("state push to"), "{error}");
        expect(Expected { job_id: "job-9".into(), generation: 3, key: key.clone(), spare: false });
        // A wrong key, another generation, another job: refused, nothing held.
        assert!(matches!(send(&addr, "job-9", 3, &[8u8; 32], &parts), Err(PushError::Refused { .. })));
        assert!(send(&addr, "job-9", 2, &key, &parts).is_err(), "another generation's handover");
        assert!(send(&addr, "job-8", 3, &key, &parts).is_err(), "another job");
        assert!(HELD.held("job-9", &fingerprint).is_none());
        // The expected one: kept, and held as the recorded checkpoint with how it came.
        let bytes = send(&addr, "job-9", 3, &key, &parts).expect("pushed");
        let got = HELD.held_waiting("job-9", &fingerprint).expect("held after the push");
        assert_eq!(got.pushed.map(|p| p.bytes), Some(bytes));
        let bits = |s: &TrainState| s.params.iter().map(|p| p.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.state), bits(&held.state));
        assert_eq!(got.state.optimizer, held.state.optimizer);
        assert_eq!(got.state.cursor, held.state.cursor);
        assert!(HELD.held("job-9", &Held::encode(state(41)).expect("fits").fingerprint()).is_none());
        HELD.release("job-9");
    }

    #[test]
    fn damaged_frames_are_refused_with_the_reason() {
        let parts = encode(&state(5), None);
        let mut frame = Vec::new();
        for (head, (_, bytes)) in frame_heads(&parts).iter().zip(&parts) {
            frame.extend_from_slice(head);
            frame.extend_from_slice(bytes);
        }
        let (good, entries) = read_frame(&mut frame.as_slice(), frame.len() as u64).expect("a good frame");
        assert_eq!(
            good.iter().map(|(n, b)| (n.as_str(), b.clone())).collect::<Vec<_>>(),
            parts.iter().map(|(n, b)| (*n, b.clone())).collect::<Vec<_>>()
        );
        // Hashed chunk by chunk as it arrived: the manifest of the parts, hashed whole.
        let manifest = manifest_of_entries(entries).expect("entries");
        assert_eq!(manifest, crate::checkpoint::manifest_of(&parts).expect("manifest"));
        let cases = [
            (frame[..frame.len() - 1].to_vec(), "cut short"),
            ([frame.clone(), vec![0]].concat(), "after the last part"),
            ([&0u32.to_le_bytes()[..], &frame[4..]].concat(), "0 parts"),
            ([&1000u32.to_le_bytes()[..], &frame[4..]].concat(), "1000 parts"),
            // The first part's name (`model`, after the count and its length) made invalid.
            ([&frame[..6], b"mod-l", &frame[11..]].concat(), "part `mod-l`"),
        ];
        for (bytes, reason) in cases {
            let error = read_frame(&mut bytes.as_slice(), bytes.len() as u64).expect_err(reason);
            assert!(error.contains(reason), "{error}");
        }
    }
}
