//! The in-memory network: Raft messages in flight, each with a delivery step.
//!
//! Misbehaviour is drawn from the simulation's one RNG: a message may be dropped, duplicated
//! or delayed (messages with different delays overtake each other, which reorders them). A
//! partition splits the nodes into two sides; a message crossing it is lost at delivery time,
//! so messages sent before the split that arrive after it are lost too.

use std::collections::BTreeSet;

use raft::eraftpb::{Message, MessageType};
use rand::Rng;
use rand::rngs::SmallRng;

/// Rates are per mille so a seed can draw them as integers.
const PER_MILLE: u32 = 1000;

/// How the network misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    pub drop_per_mille: u32,
    pub duplicate_per_mille: u32,
    /// Largest delivery delay, in simulation steps (0: delivered at the next delivery step).
    pub max_delay_steps: u64,
}

impl Faults {
    /// A reliable network that still delays (and so reorders) messages.
    pub fn reliable(max_delay_steps: u64) -> Faults {
        Faults { drop_per_mille: 0, duplicate_per_mille: 0, max_delay_steps }
    }
}

struct Packet {
    deliver_at: u64,
    /// Send order, to break ties between packets due at the same step deterministically.
    order: u64,
    message: Message,
}

/// What a delivery step hands to the receivers.
#[derive(Default)]
pub struct Delivery {
    pub arrived: Vec<Message>,
    /// Messages that reached the partition and were lost there.
    pub cut: Vec<Message>,
}

/// Counters for the run summary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub sent: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub cut: u64,
}

pub struct Network {
    in_flight: Vec<Packet>,
    next_order: u64,
    pub faults: Faults,
    /// Drop every snapshot message (for the scenario of a lost snapshot).
    pub lose_snapshots: bool,
    /// While set, the nodes in this set and the others cannot reach each other.
    partition: Option<BTreeSet<u64>>,
    pub stats: NetStats,
}

impl Network {
    pub fn new(faults: Faults) -> Network {
        Network {
            in_flight: Vec::new(),
            next_order: 0,
            faults,
            lose_snapshots: false,
            partition: None,
            stats: NetStats::default(),
        }
    }

    /// Puts `messages` in flight at step `now`, applying drops, duplicates and delays. Returns
    /// the snapshots it dropped: a transport learns that those did not arrive.
    pub fn send(&mut self, rng: &mut SmallRng, now: u64, messages: Vec<Message>) -> Vec<Message> {
        let mut lost_snapshots = Vec::new();
        for message in messages {
            self.stats.sent += 1;
            let snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            if rng.random_range(0..PER_MILLE) < self.faults.drop_per_mille || (snapshot && self.lose_snapshots) {
                self.stats.dropped += 1;
                if snapshot {
                    lost_snapshots.push(message);
                }
                continue;
            }
            if rng.random_range(0..PER_MILLE) < self.faults.duplicate_per_mille {
                self.stats.duplicated += 1;
                self.enqueue(rng, now, message.clone());
            }
            self.enqueue(rng, now, message);
        }
        lost_snapshots
    }

    fn enqueue(&mut self, rng: &mut SmallRng, now: u64, message: Message) {
        let delay = rng.random_range(0..=self.faults.max_delay_steps);
        self.in_flight.push(Packet { deliver_at: now + delay, order: self.next_order, message });
        self.next_order += 1;
    }

    /// Takes at most `limit` messages due by step `now`, oldest due first.
    pub fn take_due(&mut self, now: u64, limit: usize) -> Delivery {
        let mut due: Vec<usize> = (0..self.in_flight.len()).filter(|&i| self.in_flight[i].deliver_at <= now).collect();
        due.sort_by_key(|&i| (self.in_flight[i].deliver_at, self.in_flight[i].order));
        due.truncate(limit);
        due.sort_unstable_by(|a, b| b.cmp(a)); // remove from the back so indexes stay valid
        let mut taken: Vec<Packet> = due.into_iter().map(|i| self.in_flight.swap_remove(i)).collect();
        taken.sort_by_key(|p| (p.deliver_at, p.order));
        let mut delivery = Delivery::default();
        for packet in taken {
            if self.is_cut(packet.message.from, packet.message.to) {
                self.stats.cut += 1;
                delivery.cut.push(packet.message);
            } else {
                delivery.arrived.push(packet.message);
            }
        }
        delivery
    }

    pub fn partition(&mut self, side: BTreeSet<u64>) {
        self.partition = Some(side);
    }

    pub fn heal(&mut self) {
        self.partition = None;
    }

    pub fn partitioned(&self) -> bool {
        self.partition.is_some()
    }

    pub fn is_cut(&self, from: u64, to: u64) -> bool {
        self.partition.as_ref().is_some_and(|side| side.contains(&from) != side.contains(&to))
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The messages in flight, one line each, for failure messages.
    pub fn describe_in_flight(&self) -> Vec<String> {
        let mut packets: Vec<&Packet> = self.in_flight.iter().collect();
        packets.sort_by_key(|p| (p.deliver_at, p.order));
        packets
            .iter()
            .map(|p| {
                let m = &p.message;
                format!("    at step {}: {:?} {} -> {} term {}", p.deliver_at, m.get_msg_type(), m.from, m.to, m.term)
            })
            .collect()
    }
}
