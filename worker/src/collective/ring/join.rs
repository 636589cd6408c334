//! A member joins a running ring in place of one that leaves, without a new rendezvous: the
//! rest of the gang keeps training meanwhile, and the links change at a step boundary that the
//! whole gang agrees on in a step's all-reduce.
//!
//! ```text
//!   joiner (rank r) ──▶ rank r+1: "FLOTJOIN" | gang | rank r | world                         | nonce_c
//!                   ──▶ rank r-1: "FLOTJOIN" | gang | rank r | world | DIALS_ITS_PREDECESSOR | nonce_c
//!   each neighbour, at its step boundaries (joining_links), reading only what has arrived:
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
    CollectiveError, DataPort, HELLO_LEN, Incoming, MAC_LEN, NONCE_LEN, RingCommunicator, RingConfig, check_and_prove,
    connect_to, hello, lost, mac, mac_matches, nonce, tracing_free_log, tune,
};
use crate::collective::port::JOIN_MAGIC;

/// Set in the world field of a joining member's hello on the link to its predecessor, which the
/// joiner dials (in a rendezvous the predecessor dials): says which way the link runs.
const DIALS_ITS_PREDECESSOR: u32 = 1 << 31;
/// How long a joining member's link may take from its connection to its proof (the rank
/// reads what has arrived at each step boundary, never waiting).
const HANDSHAKE_MAX: Duration = Duration::from_secs(10);
/// Links in their handshake a rank holds at most; more wait in the data port's queue.
const HANDSHAKING_MAX: usize = 8;

/// A joining member's link in its handshake.
pub(super) struct Handshake {
    stream: TcpStream,
    /// When it is dropped if not proven by then.
    until: Instant,
    /// Its hello, once read and answered.
    answered: Option<Answered>,
}

/// What a link's proof is checked against.
struct Answered {
    hello: [u8; HELLO_LEN + NONCE_LEN],
    nonce_a: [u8; NONCE_LEN],
    rank: usize,
    successor: bool,
}

/// Where a handshake got to.
enum Progress {
    Waiting(Handshake),
    Proven(JoinLink),
}

/// Whether `len` bytes have arrived on the non-blocking `stream`, unread (an error once it
/// closed).
fn arrived(stream: &TcpStream, len: usize) -> Result<bool, String> {
    let mut buffer = [0u8; HELLO_LEN + NONCE_LEN];
    match stream.peek(&mut buffer[..len]) {
        Ok(0) => Err("it closed the connection".into()),
        Ok(n) => Ok(n >= len),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(format!("socket: {e}")),
    }
}

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
        ring.attach(next, prev, "join")?;
        Ok(ring)
    }

    /// Moves the joining members' links on without waiting: takes those that arrived since the
    /// last call, reads hellos and proofs that have arrived, answers hellos. A link that fails
    /// its checks, closes, or takes over [`HANDSHAKE_MAX`] is dropped with a line on stderr.
    /// The rank never blocks on a joiner: a peer that connects and stays silent costs nothing
    /// but a socket until its time is up.
    pub(super) fn take_join_links(&mut self) {
        let now = Instant::now();
        while self.handshaking.len() < HANDSHAKING_MAX {
            let Some(stream) = self.incoming.as_ref().and_then(Incoming::try_accept_join) else { break };
            if stream.set_nonblocking(true).is_ok() {
                self.handshaking.push(Handshake { stream, until: now + HANDSHAKE_MAX, answered: None });
            }
        }
        for handshake in std::mem::take(&mut self.handshaking) {
            match self.advance(handshake) {
                Ok(Progress::Waiting(handshake)) if now < handshake.until => self.handshaking.push(handshake),
                Ok(Progress::Waiting(_)) => self.refused(format!("its handshake took over {HANDSHAKE_MAX:?}")),
                Ok(Progress::Proven(link)) => {
                    self.joining.retain(|held| (held.rank, held.successor) != (link.rank, link.successor));
                    self.joining.push(link);
                }
                Err(reason) => self.refused(reason),
            }
        }
    }

    fn refused(&self, reason: String) {
        tracing_free_log(&format!("ring rank {}: refused a joining member's link: {reason}", self.rank));
    }

    /// The accepting side of a joiner's link, as far as its bytes have come: its hello must
    /// name this gang, this world and one of this rank's neighbours on the side it claims;
    /// then both prove the secret.
    fn advance(&self, mut handshake: Handshake) -> Result<Progress, String> {
        let stream = &handshake.stream;
        if handshake.answered.is_none() {
            let mut hello = [0u8; HELLO_LEN + NONCE_LEN];
            if !arrived(stream, hello.len())? {
                return Ok(Progress::Waiting(handshake));
            }
            (&*stream).read_exact(&mut hello).map_err(|e| format!("hello: {e}"))?;
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
            // 48 bytes into the empty send buffer of a new connection: written whole at once.
            match (&*stream).write(&answer) {
                Ok(n) if n == answer.len() => {}
                Ok(_) => return Err("the answer did not fit the socket's buffer".into()),
                Err(e) => return Err(format!("answer: {e}")),
            }
            handshake.answered = Some(Answered { hello, nonce_a, rank, successor });
        }
        let Some(answered) = &handshake.answered else { unreachable!("answered above") };
        let stream = &handshake.stream;
        if !arrived(stream, MAC_LEN)? {
            return Ok(Progress::Waiting(handshake));
        }
        let mut proof = [0u8; MAC_LEN];
        (&*stream).read_exact(&mut proof).map_err(|e| format!("proof: {e}"))?;
        if !mac_matches(&self.secret, b"connect", &answered.hello, &answered.nonce_a, &proof) {
            return Err(format!("the member joining as rank {} does not hold this gang's secret", answered.rank));
        }
        tune(stream, self.timeout).map_err(|e| format!("socket options: {e}"))?;
        let (rank, successor) = (answered.rank, answered.successor);
        Ok(Progress::Proven(JoinLink { stream: handshake.stream, rank, successor }))
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
    check_and_prove(&stream, config, peer, &hello, "join")?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;

    use super::*;
    use crate::collective::Communicator;
    use crate::collective::ring::loopback_configs;

    #[test]
    fn a_joiner_is_proven_across_step_boundaries_and_strangers_never_count() {
        let (listeners, configs) = loopback_configs(2, Duration::from_secs(10)).expect("configs");
        let joiner = configs[1].clone();
        let survivor_addr = configs[0].addresses[0];
        let rings: Vec<_> = listeners
            .into_iter()
            .zip(configs)
            .map(|(listener, config)| std::thread::spawn(move || RingCommunicator::connect(listener, config)))
            .collect();
        let mut rings: Vec<RingCommunicator> =
            rings.into_iter().map(|r| r.join().expect("thread").expect("ring")).collect();
        let mut survivor = rings.remove(0);
        // A stranger that says the magic and nothing more, and one without the gang's secret.
        let mut silent = TcpStream::connect(survivor_addr).expect("connect");
        silent.write_all(&JOIN_MAGIC.to_le_bytes()).expect("write");
        let mut impostor = joiner.clone();
        impostor.secret = vec![1; 32];
        let impostor =
            std::thread::spawn(move || dial(&impostor, 0, false, Instant::now() + Duration::from_secs(10)).map(|_| ()));
        let joining = std::thread::spawn(move || RingCommunicator::join_running(joiner, None));
        // The survivor's step boundaries: each call reads what has arrived and returns.
        let mut links = Vec::new();
        for _ in 0..2000 {
            links = survivor.joining_links();
            if links.len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(links, vec![1, 1], "the joiner's two links (world 2: both on this rank) are proven");
        let error = impostor.join().expect("thread").expect_err("the survivor's answer does not match its secret");
        assert!(error.to_string().contains("does not hold this gang's secret"), "{error}");
        let joined = joining.join().expect("thread").expect("the joiner's links were taken");
        assert_eq!((joined.rank, joined.world), (1, 2));
        // The stranger is still in its handshake (it has time left); it never counts.
        assert_eq!(survivor.handshaking.len(), 1);
        assert_eq!(survivor.joining_links(), vec![1, 1]);
        survivor.admit(1).expect("both links are there");
        assert!(survivor.joining.is_empty());
    }
}
