//! A member joins a running ring in place of one that leaves, without a new rendezvous: the
//! rest of the gang keeps training meanwhile, and the links change at a step boundary that the
//! whole gang agrees on in a step's all-reduce.
//!
//! ```text
//!   joiner (rank r) ──▶ rank r+1: "FLOTJOIN" | gang | rank r | world                         | nonce_c
//!                   ──▶ rank r-1: "FLOTJOIN" | gang | rank r | world | DIALS_ITS_PREDECESSOR | nonce_c
//!   each neighbour, at its next step boundary (join_vote):
//!                   ◀── nonce_a + HMAC(secret, "accept"  | hello | nonce_c | nonce_a)
//!                   ──▶ HMAC(secret, "connect" | hello | nonce_c | nonce_a)   checked, link kept
//!   every rank votes on the joiners' links it holds (the trainer's vote, with the leaving
//!   member's); when the sums say one member leaves and both of its joiner's links are there,
//!   every rank knows it after the same step: rank r-1 then writes to the joiner, rank r+1
//!   reads from it (admit), and the leaving member leaves
//! ```
//!
//! The transcript and its roles are the rendezvous' (see the parent module): only a holder of
//! the gang's secret joins. Its own magic keeps joiners' links apart from the next
//! generation's rendezvous on an agent's data port (the running rank takes only joiners). A link waits unused (nothing is written to it) until the swap, so
//! a joiner that never completes costs the gang nothing but the proof's round trip.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    CollectiveError, DataPort, HELLO_LEN, Incoming, MAC_LEN, NONCE_LEN, RingCommunicator, RingConfig, SEGMENT_BYTES,
    connect_to, hello, lost, mac, mac_matches, nonce, tracing_free_log, tune,
};
use crate::collective::port::JOIN_MAGIC;

/// Set in the world field of a joining member's hello on the link to its predecessor, which the
/// joiner dials (in a rendezvous the predecessor dials): says which way the link runs.
const DIALS_ITS_PREDECESSOR: u32 = 1 << 31;
/// How long a rank waits for a joining member's proof: the step it delays is the whole gang's.
const PROOF_TIMEOUT: Duration = Duration::from_secs(1);
/// Connections a rank takes per vote at most (more wait for later steps).
const TAKEN_PER_VOTE_MAX: usize = 4;

/// A proven link from a joining member, not yet in use. A rank holds at most one per joiner
/// and direction (a newer one replaces it), and takes only a neighbour's on its side.
pub(super) struct JoinLink {
    stream: TcpStream,
    /// The joining member's rank.
    pub(super) rank: usize,
    /// The joiner becomes this rank's successor (it dialed this rank as its predecessor);
    /// otherwise its predecessor.
    successor: bool,
}

impl RingCommunicator {
    /// Joins a running ring as `config.rank`, in place of the member that leaves it (see the
    /// module docs): dials both neighbours and proves the gang's secret to each. Returns once
    /// both took their link, which each does at its next step boundary. The ring's collectives
    /// may be used once the gang agreed on the swap (the trainer's vote), from the step after
    /// it. `incoming` is where this member takes a later joiner's links (its data port).
    pub fn join_running(
        config: RingConfig,
        incoming: Option<Arc<DataPort>>,
    ) -> Result<RingCommunicator, CollectiveError> {
        let mut ring = RingCommunicator::unlinked(&config, incoming.map(Incoming::Port))?;
        if ring.world == 1 {
            return Ok(ring);
        }
        let deadline = Instant::now() + config.timeout;
        let next = dial(&config, ring.next_rank(), false, deadline)?;
        let prev = dial(&config, ring.prev_rank(), true, deadline)?;
        for (stream, peer) in [(&next, ring.next_rank()), (&prev, ring.prev_rank())] {
            stream.set_nonblocking(true).map_err(|e| lost("join", peer, &e, config.timeout))?;
        }
        ring.next = Some(next);
        ring.prev = Some(prev);
        ring.scratch = vec![0f32; SEGMENT_BYTES / 4];
        Ok(ring)
    }

    /// Takes the links joining members opened since the last call, without waiting for any to
    /// arrive; a link that fails its proof is dropped with a line on stderr.
    pub(super) fn take_join_links(&mut self) {
        for _ in 0..TAKEN_PER_VOTE_MAX {
            let Some(stream) = self.incoming.as_ref().and_then(Incoming::try_accept_join) else { break };
            match self.prove_joiner(stream) {
                Ok(link) => {
                    self.joining.retain(|held| (held.rank, held.successor) != (link.rank, link.successor));
                    self.joining.push(link);
                }
                Err(reason) => {
                    tracing_free_log(&format!("ring rank {}: refused a joining member's link: {reason}", self.rank))
                }
            }
        }
    }

    /// The accepting side of a joiner's link: its hello must name this gang, this world and one
    /// of this rank's neighbours on the side it claims; then both prove the secret.
    fn prove_joiner(&self, stream: TcpStream) -> Result<JoinLink, String> {
        stream.set_nonblocking(false).map_err(|e| format!("socket: {e}"))?;
        tune(&stream, PROOF_TIMEOUT).map_err(|e| format!("socket options: {e}"))?;
        let mut hello = [0u8; HELLO_LEN + NONCE_LEN];
        (&stream).read_exact(&mut hello).map_err(|e| format!("hello: {e}"))?;
        let magic = u64::from_le_bytes(hello[..8].try_into().expect("8 bytes"));
        let gang = u64::from_le_bytes(hello[8..16].try_into().expect("8 bytes"));
        let rank = u32::from_le_bytes(hello[16..20].try_into().expect("4 bytes")) as usize;
        let world_field = u32::from_le_bytes(hello[20..24].try_into().expect("4 bytes"));
        let successor = world_field & DIALS_ITS_PREDECESSOR != 0;
        let world = (world_field & !DIALS_ITS_PREDECESSOR) as usize;
        let neighbour = if successor { self.next_rank() } else { self.prev_rank() };
        if magic != JOIN_MAGIC || gang != self.gang_id || world != self.world || rank != neighbour {
            return Err(format!(
                "gang {gang}, rank {rank} as this rank's {}, world {world}: not a joiner of this ring",
                if successor { "successor" } else { "predecessor" }
            ));
        }
        let nonce_a = nonce().map_err(|e| e.to_string())?;
        let mut answer = nonce_a.to_vec();
        answer.extend_from_slice(&mac(&self.secret, b"accept", &hello, &nonce_a));
        (&stream).write_all(&answer).map_err(|e| format!("answer: {e}"))?;
        let mut proof = [0u8; MAC_LEN];
        (&stream).read_exact(&mut proof).map_err(|e| format!("proof: {e}"))?;
        if !mac_matches(&self.secret, b"connect", &hello, &nonce_a, &proof) {
            return Err(format!("the member joining as rank {rank} does not hold this gang's secret"));
        }
        tune(&stream, self.timeout).map_err(|e| format!("socket options: {e}"))?;
        stream.set_nonblocking(true).map_err(|e| format!("socket: {e}"))?;
        Ok(JoinLink { stream, rank, successor })
    }

    /// Puts the joining member of `rank` in place of the leaving one: this rank's link to or
    /// from `rank` becomes the joiner's. Links of other joiners are dropped.
    pub(super) fn admit_joiner(&mut self, rank: usize) -> Result<(), CollectiveError> {
        if rank >= self.world || rank == self.rank {
            return Err(CollectiveError::Invalid(format!(
                "rank {} cannot admit a member as rank {rank} in a world of {}",
                self.rank, self.world
            )));
        }
        let (mut successor, mut predecessor) = (None, None);
        for link in std::mem::take(&mut self.joining).into_iter().filter(|link| link.rank == rank) {
            match link.successor {
                true => successor = Some(link.stream),
                false => predecessor = Some(link.stream),
            }
        }
        let missing = |side: &str| {
            CollectiveError::Invalid(format!(
                "the gang agreed to take a member as rank {rank}, but rank {} holds no link {side} it",
                self.rank
            ))
        };
        if self.next_rank() == rank {
            self.next = Some(successor.ok_or_else(|| missing("to"))?);
        }
        if self.prev_rank() == rank {
            self.prev = Some(predecessor.ok_or_else(|| missing("from"))?);
        }
        Ok(())
    }
}

/// The joining side of one link: connects to `peer`, says which way the link runs, and runs
/// the rendezvous' challenge-response (the peer answers at its next step boundary).
fn dial(config: &RingConfig, peer: usize, predecessor: bool, deadline: Instant) -> Result<TcpStream, CollectiveError> {
    let stream = connect_to(config.addresses[peer], peer, deadline, config)?;
    let world = config.addresses.len() as u32 | if predecessor { DIALS_ITS_PREDECESSOR } else { 0 };
    let hello = hello(JOIN_MAGIC, config.gang_id, config.rank, world)?;
    (&stream).write_all(&hello).map_err(|e| lost("join", peer, &e, config.timeout))?;
    let mut answer = [0u8; NONCE_LEN + MAC_LEN];
    (&stream).read_exact(&mut answer).map_err(|e| lost("join", peer, &e, config.timeout))?;
    let (nonce_a, mac_a) = answer.split_at(NONCE_LEN);
    if !mac_matches(&config.secret, b"accept", &hello, nonce_a, mac_a) {
        return Err(CollectiveError::Rendezvous(format!(
            "rank {peer} at {} does not hold this gang's secret",
            config.addresses[peer]
        )));
    }
    (&stream)
        .write_all(&mac(&config.secret, b"connect", &hello, nonce_a))
        .map_err(|e| lost("join", peer, &e, config.timeout))?;
    Ok(stream)
}
