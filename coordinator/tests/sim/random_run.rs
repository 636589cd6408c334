//! One seeded random run: draw a cluster and an environment, run a fault phase with clients,
//! heal everything, wait for convergence, prove the cluster still takes writes, and check that
//! every acknowledged submission is present exactly once on every node.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use flotilla_coordinator::raft::replica::{Replica, SNAPSHOT_EVERY_ENTRIES};
use rand::rngs::SmallRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

use super::network::Faults;
use super::world::{CrashMode, PER_MILLE, Setup, Sim, Stats};

/// Steps of the fault phase. Long enough for several elections (one takes ~30-60 steps),
/// crashes and partitions per run; short enough that 300 seeds run in seconds.
const FAULT_PHASE_STEPS: u64 = 400;
/// Steps to converge after healing at most: a few elections plus a snapshot transfer take a
/// few hundred; more means the cluster is stuck.
const CONVERGE_STEPS_MAX: u64 = 3_000;
/// Steps to wait for the acknowledgement of the post-heal write before proposing it again.
const FINAL_WRITE_WAIT_STEPS: u64 = 300;
/// Proposals of the post-heal write at most (a healed cluster must take it at the first).
const FINAL_WRITE_ATTEMPTS: u32 = 3;
/// Replicas of most runs: the smallest cluster that survives a failure.
const NODES: u64 = 3;
/// Replicas of one run in `LARGE_CLUSTER_ONE_IN`: two failures, larger quorums.
const NODES_LARGE: u64 = 5;
const LARGE_CLUSTER_ONE_IN: u32 = 4;
/// One seed in this many keeps its logs in write-ahead log files (on tmpfs where there is one) that a
/// restart reopens, so a crash loses every in-memory cache of the store; the others keep the
/// in-memory store object (faster, but its cached commit index survives the crash).
const ON_DISK_ONE_IN: u32 = 2;
/// Snapshot intervals drawn per seed: small ones make snapshots, compaction and snapshot
/// transfers happen many times per run; the production default makes none happen.
const SNAPSHOT_INTERVALS: [u64; 4] = [8, 16, 32, SNAPSHOT_EVERY_ENTRIES];
/// Random message loss at most (a lossy network, not a dead one).
const DROP_PER_MILLE_MAX: u32 = 100;
/// Random message duplication at most.
const DUPLICATE_PER_MILLE_MAX: u32 = 50;
/// Longest message delay drawn: below the heartbeat interval (~7 steps) up to far above it.
const MAX_DELAY_STEPS_MAX: u64 = 12;
/// Least chance of handling a Ready right away; lower makes most crashes lose a Ready.
const ADVANCE_NOW_PER_MILLE_MIN: u32 = 300;
/// Chance per fault-phase step of injecting a fault, at least and at most.
const FAULT_PER_MILLE_RANGE: (u32, u32) = (10, 35);
/// A crashed node stays down this many steps (from, to).
const DOWN_STEPS_RANGE: (u64, u64) = (10, 300);
/// A partition lasts this many steps (from, to).
const PARTITION_STEPS_RANGE: (u64, u64) = (20, 400);
/// Submissions a client action sends at once at most (one Ready carries them all).
const CLIENT_BURST_MAX: usize = 4;
/// Chance that a crash hits the leader (when there is one) rather than a random node.
const CRASH_LEADER_PER_MILLE: u32 = 500;
/// Chance that a crash lands in the middle of a Ready, before it is persisted.
const CRASH_BEFORE_PERSIST_PER_MILLE: u32 = 500;
/// Chance that a client submission reuses an earlier request id (a retry).
const RETRY_PER_MILLE: u32 = 250;
/// Messages delivered in one delivery step at most.
const DELIVER_BATCH_MAX: usize = 12;
/// Action of a fault-phase step, by cumulative percentage: ticks, one node's tick,
/// deliveries, client submissions, the rest handles Readys.
const ACTION_TICK_ALL_BELOW: u32 = 30;
const ACTION_TICK_ONE_BELOW: u32 = 36;
const ACTION_DELIVER_BELOW: u32 = 79;
const ACTION_SUBMIT_BELOW: u32 = 86;
const ACTION_PERCENT: u32 = 100;
/// Action of a quiet step, by cumulative percentage: ticks, deliveries, the rest handles
/// Readys.
/// Half the runs get hostile input: each fault-phase step, with this chance, the leader
/// proposes a garbage worker report (or a registration or gang that gives reports a target).
const HOSTILE_ONE_IN: u32 = 2;
const HOSTILE_PER_MILLE_RANGE: (u32, u32) = (50, 250);
/// Workers registered at most by hostile input.
const HOSTILE_WORKERS_MAX: usize = 6;
const QUIET_TICK_ALL_BELOW: u32 = 40;
const QUIET_DELIVER_BELOW: u32 = 90;

/// The faults a fault-phase step can inject, equally likely.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Crash,
    /// A random split into two sides.
    Partition,
    /// The leader alone on one side.
    IsolateLeader,
    /// Restart a crashed node now, or heal the partition now.
    Recover,
}
const FAULTS: [Fault; 4] = [Fault::Crash, Fault::Partition, Fault::IsolateLeader, Fault::Recover];

/// Everything a seed decides about its run.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub setup: Setup,
    pub fault_steps: u64,
    pub fault_per_mille: u32,
    /// Nodes down at once at most (a majority down is allowed: safety must still hold).
    pub max_down: u64,
    /// Chance per fault-phase step of hostile input (0: none).
    pub hostile_per_mille: u32,
}

impl Plan {
    pub fn draw(rng: &mut SmallRng) -> Plan {
        let nodes = if rng.random_range(0..LARGE_CLUSTER_ONE_IN) == 0 { NODES_LARGE } else { NODES };
        let faults = Faults {
            drop_per_mille: rng.random_range(0..=DROP_PER_MILLE_MAX),
            duplicate_per_mille: rng.random_range(0..=DUPLICATE_PER_MILLE_MAX),
            max_delay_steps: rng.random_range(1..=MAX_DELAY_STEPS_MAX),
        };
        let setup = Setup {
            nodes,
            snapshot_every_entries: *SNAPSHOT_INTERVALS.choose(rng).expect("intervals are not empty"),
            faults,
            advance_now_per_mille: rng.random_range(ADVANCE_NOW_PER_MILLE_MIN..=PER_MILLE),
            report_unreachable_per_mille: rng.random_range(0..=PER_MILLE),
            file_backed: rng.random_range(0..ON_DISK_ONE_IN) == 0,
        };
        Plan {
            setup,
            fault_steps: FAULT_PHASE_STEPS,
            fault_per_mille: rng.random_range(FAULT_PER_MILLE_RANGE.0..=FAULT_PER_MILLE_RANGE.1),
            max_down: rng.random_range(1..nodes),
            hostile_per_mille: if rng.random_range(0..HOSTILE_ONE_IN) == 0 {
                rng.random_range(HOSTILE_PER_MILLE_RANGE.0..=HOSTILE_PER_MILLE_RANGE.1)
            } else {
                0
            },
        }
    }
}

/// What a run did, for the log line and the coverage checks. Equal summaries for equal seeds
/// show the run is deterministic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub seed: u64,
    pub nodes: u64,
    pub snapshot_every_entries: u64,
    pub on_disk: bool,
    pub steps: u64,
    pub acked_requests: usize,
    pub final_index: u64,
    pub max_term: u64,
    pub stats: Stats,
    pub state_digest: u64,
}

/// Restarts and heals that are due at a later step.
#[derive(Default)]
struct Schedule {
    restarts: BTreeMap<u64, u64>,
    heal_at: Option<u64>,
}

impl Schedule {
    fn run_due(&mut self, sim: &mut Sim) {
        let due: Vec<u64> = self.restarts.iter().filter(|&(_, &at)| at <= sim.now).map(|(&id, _)| id).collect();
        for id in due {
            self.restarts.remove(&id);
            sim.restart(id);
        }
        if self.heal_at.is_some_and(|at| at <= sim.now) {
            self.heal_at = None;
            sim.heal();
        }
    }
}

/// Request ids the clients have used, for retries.
#[derive(Default)]
struct Clients {
    used: Vec<String>,
}

pub fn run_seed(seed: u64) -> Summary {
    let mut rng = SmallRng::seed_from_u64(seed);
    let plan = Plan::draw(&mut rng);
    run_plan(seed, rng, plan)
}

pub fn run_plan(seed: u64, rng: SmallRng, plan: Plan) -> Summary {
    let mut sim = Sim::new(rng, plan.setup);
    sim.trace(|| format!("seed {seed}: {plan:?}"));
    let mut schedule = Schedule::default();
    let mut clients = Clients::default();
    for _ in 0..plan.fault_steps {
        fault_phase_step(&mut sim, &plan, &mut schedule, &mut clients);
    }
    converge(&mut sim);
    final_write(&mut sim);
    converge(&mut sim);
    final_checks(&mut sim);
    summarize(seed, &mut sim)
}

fn fault_phase_step(sim: &mut Sim, plan: &Plan, schedule: &mut Schedule, clients: &mut Clients) {
    sim.now += 1;
    schedule.run_due(sim);
    match sim.rng.random_range(0..ACTION_PERCENT) {
        r if r < ACTION_TICK_ALL_BELOW => sim.tick_all(),
        r if r < ACTION_TICK_ONE_BELOW => {
            if let Some(&id) = sim.live_ids().choose(&mut sim.rng) {
                sim.tick(id);
            }
        }
        r if r < ACTION_DELIVER_BELOW => {
            let limit = sim.rng.random_range(1..=DELIVER_BATCH_MAX);
            sim.deliver(limit);
        }
        r if r < ACTION_SUBMIT_BELOW => client_submits(sim, clients),
        _ => sim.advance_all(),
    }
    if sim.rng.random_range(0..PER_MILLE) < plan.fault_per_mille {
        inject_fault(sim, plan, schedule);
    }
    if sim.rng.random_range(0..PER_MILLE) < plan.hostile_per_mille {
        hostile_input(sim);
    }
    sim.check();
}

/// The leader proposes hostile input, as a worker holding a valid credential could cause it:
/// a garbage report from a random worker (registered or not; `hostile::report`), or a worker
/// registration or a gang for a pending job, so that reports have real jobs and members to
/// aim at. Every replica must apply it without a panic and stay identical to the others (the
/// invariants checked after each step); that a report never changes a job its reporter is not
/// part of is the state tests' property over the same generator.
fn hostile_input(sim: &mut Sim) {
    use flotilla_core::ids::WorkerId;
    use flotilla_core::state::hostile::{Garbage, report};
    use flotilla_core::state::{Command, JobState, WorkerInfo};
    let Some(via) = sim.leaders().choose(&mut sim.rng).copied() else { return };
    let Some(state) = sim.replica(via).map(|r| r.state().clone()) else { return };
    let live: Vec<WorkerId> = state.workers.values().filter(|w| w.lost_at_unix_ms.is_none()).map(|w| w.id).collect();
    let idle: Vec<WorkerId> =
        state.workers.values().filter(|w| w.lost_at_unix_ms.is_none() && w.job.is_none()).map(|w| w.id).collect();
    let pending = state.jobs.values().find(|j| j.state == JobState::Pending).map(|j| j.id);
    let command = match sim.rng.random_range(0..10) {
        0 | 1 if live.len() < HOSTILE_WORKERS_MAX => Command::RegisterWorker {
            info: WorkerInfo {
                cpus: 1,
                gpus: 0,
                memory_bytes: 0,
                instance_id: format!("i-{}", sim.now),
                instance_type: "sim".into(),
                zone: "sim".into(),
                hostname: "sim".into(),
                data_addr: "127.0.0.1:1".into(),
            },
            credential_sha256: "ab".repeat(32),
        },
        2 | 3 if pending.is_some() && !idle.is_empty() => {
            let size = sim.rng.random_range(1..=idle.len().min(2));
            let workers = idle.choose_multiple(&mut sim.rng, size).copied().collect();
            Command::AssignGang { job_id: pending.expect("checked"), workers }
        }
        _ => {
            let reporter = live.choose(&mut sim.rng).copied().unwrap_or(WorkerId(999));
            let garbage = Garbage {
                kind: sim.rng.random(),
                job: sim.rng.random_range(0..6),
                numbers: sim.rng.random(),
                text: "x".repeat(sim.rng.random_range(0..40)),
            };
            report(reporter, &garbage)
        }
    };
    sim.propose_hostile(via, command);
}

fn client_submits(sim: &mut Sim, clients: &mut Clients) {
    // Like the real node, only a node that believes it leads takes proposals (a stale leader
    // in a minority does too: its proposals must never be acknowledged).
    let Some(via) = sim.leaders().choose(&mut sim.rng).copied() else { return };
    let burst = sim.rng.random_range(1..=CLIENT_BURST_MAX);
    let request_ids: Vec<String> = (0..burst).map(|_| next_request_id(sim, clients)).collect();
    sim.submit_burst(via, &request_ids);
}

fn next_request_id(sim: &mut Sim, clients: &mut Clients) -> String {
    let retry = !clients.used.is_empty() && sim.rng.random_range(0..PER_MILLE) < RETRY_PER_MILLE;
    if retry {
        return clients.used.choose(&mut sim.rng).expect("retries only after a first submission").clone();
    }
    let fresh = format!("req-{}", clients.used.len());
    clients.used.push(fresh.clone());
    fresh
}

fn inject_fault(sim: &mut Sim, plan: &Plan, schedule: &mut Schedule) {
    match *FAULTS.choose(&mut sim.rng).expect("faults are not empty") {
        Fault::Crash => crash_someone(sim, plan, schedule),
        Fault::Partition if !sim.net.partitioned() => {
            let mut ids: Vec<u64> = sim.ids().collect();
            ids.shuffle(&mut sim.rng);
            let size = sim.rng.random_range(1..ids.len());
            let side: BTreeSet<u64> = ids[..size].iter().copied().collect();
            split_for_a_while(sim, side, schedule);
        }
        Fault::IsolateLeader if !sim.net.partitioned() => {
            if let Some(leader) = sim.leader() {
                split_for_a_while(sim, BTreeSet::from([leader]), schedule);
            }
        }
        Fault::Partition | Fault::IsolateLeader => {}
        Fault::Recover => {
            if let Some(&id) = sim.down_ids().choose(&mut sim.rng) {
                schedule.restarts.remove(&id);
                sim.restart(id);
            } else {
                schedule.heal_at = None;
                sim.heal();
            }
        }
    }
}

fn split_for_a_while(sim: &mut Sim, side: BTreeSet<u64>, schedule: &mut Schedule) {
    sim.partition(side);
    schedule.heal_at = Some(sim.now + sim.rng.random_range(PARTITION_STEPS_RANGE.0..=PARTITION_STEPS_RANGE.1));
}

fn crash_someone(sim: &mut Sim, plan: &Plan, schedule: &mut Schedule) {
    if sim.down_ids().len() as u64 >= plan.max_down {
        return;
    }
    let leader = sim.leader().filter(|_| sim.rng.random_range(0..PER_MILLE) < CRASH_LEADER_PER_MILLE);
    let Some(id) = leader.or_else(|| sim.live_ids().choose(&mut sim.rng).copied()) else { return };
    let before_persist = sim.rng.random_range(0..PER_MILLE) < CRASH_BEFORE_PERSIST_PER_MILLE;
    let mode = if before_persist { CrashMode::BeforePersist } else { CrashMode::Clean };
    sim.crash(id, mode);
    schedule.restarts.insert(id, sim.now + sim.rng.random_range(DOWN_STEPS_RANGE.0..=DOWN_STEPS_RANGE.1));
}

/// A step without faults or clients: time passes, messages arrive, Readys are handled.
pub fn quiet_step(sim: &mut Sim) {
    sim.now += 1;
    match sim.rng.random_range(0..ACTION_PERCENT) {
        r if r < QUIET_TICK_ALL_BELOW => sim.tick_all(),
        r if r < QUIET_DELIVER_BELOW => sim.deliver(DELIVER_BATCH_MAX),
        _ => sim.advance_all(),
    }
    sim.check();
}

/// Heals the network, restarts every node and runs until all agree; panics if they do not.
pub fn converge(sim: &mut Sim) {
    sim.heal();
    sim.net.faults = Faults::reliable(sim.setup.faults.max_delay_steps);
    for id in sim.down_ids() {
        sim.restart(id);
    }
    for _ in 0..CONVERGE_STEPS_MAX {
        quiet_step(sim);
        if let Some(leader) = converged(sim) {
            for id in sim.ids() {
                assert!(sim.state(id) == sim.state(leader), "converged nodes {id} and {leader} differ");
            }
            return;
        }
    }
    panic!("no convergence within {CONVERGE_STEPS_MAX} steps after healing:\n{}", sim.describe());
}

/// The leader, once every node is live and has applied everything the leader has logged.
fn converged(sim: &mut Sim) -> Option<u64> {
    let leader = sim.leader()?;
    let replica = sim.replica_mut(leader)?;
    let commit = replica.commit_index();
    if replica.raft_mut().raft_log.last_index() != commit {
        return None;
    }
    let all_there = sim.ids().all(|id| {
        sim.replica(id).is_some_and(|r| r.applied_index() == commit && r.commit_index() == commit && !r.has_ready())
    });
    all_there.then_some(leader)
}

/// A healed cluster must still take writes.
fn final_write(sim: &mut Sim) {
    const REQUEST_ID: &str = "after-heal";
    for _ in 0..FINAL_WRITE_ATTEMPTS {
        let leader = sim.leader().expect("a converged cluster has a leader");
        sim.submit(leader, REQUEST_ID);
        for _ in 0..FINAL_WRITE_WAIT_STEPS {
            quiet_step(sim);
            if sim.checker.acks().contains_key(REQUEST_ID) {
                return;
            }
        }
    }
    panic!("the healed cluster did not acknowledge a write:\n{}", sim.describe());
}

/// Full log re-check, then exactly-once of every acknowledged submission on every node.
pub fn final_checks(sim: &mut Sim) {
    sim.checker.recheck_all_logs();
    sim.check();
    for id in sim.ids() {
        sim.checker.check_exactly_once(id, sim.state(id));
    }
}

fn summarize(seed: u64, sim: &mut Sim) -> Summary {
    let leader = sim.leader().expect("a converged cluster has a leader");
    let mut hasher = DefaultHasher::new();
    sim.state(leader).to_snapshot().hash(&mut hasher);
    sim.stats.net = sim.net.stats;
    Summary {
        seed,
        nodes: sim.setup.nodes,
        snapshot_every_entries: sim.setup.snapshot_every_entries,
        on_disk: sim.setup.file_backed,
        steps: sim.now,
        acked_requests: sim.checker.acks().len(),
        final_index: sim.replica(leader).map_or(0, Replica::applied_index),
        max_term: sim.ids().filter_map(|id| sim.replica(id).map(Replica::term)).max().unwrap_or(0),
        stats: sim.stats,
        state_digest: hasher.finish(),
    }
}
