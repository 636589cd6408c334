//! A live handover (`flotilla_worker::train::Handover`): a member hands its rank to a joining
//! member while the rest of the gang trains on, and the result is bit-identical to a run
//! without it. Every rank runs in its own thread over the real TCP ring on loopback; the
//! leaving member's transfer runs over a real TCP connection to the joiner.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::spec::JobSpec;
use flotilla_worker::checkpoint::live::{CaughtUp, Joined, LiveError, Sink, Source, catch_up, join};
use flotilla_worker::collective::Communicator;
use flotilla_worker::collective::port::DataPort;
use flotilla_worker::collective::ring::{RingCommunicator, loopback_configs, loopback_gang};
use flotilla_worker::data::{Dataset, load_job_data};
use flotilla_worker::train::{TrainState, Trainer};

const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(30);
const KEY: [u8; 32] = [9; 32];
/// A gang's step time while its joiner catches up, at least.
const PACE: Duration = Duration::from_millis(5);

fn digits_spec(model: &str, train: &str) -> JobSpec {
    let text = format!(
        "name = \"test\"\n[model]\n{model}\n[data]\ntrain = \"{}/../examples/data/digits.csv\"\n\
         validation_fraction = 0.2\n[train]\n{train}\n[workers]\nmin = 1\nmax = 3\n",
        env!("CARGO_MANIFEST_DIR")
    );
    JobSpec::from_toml_str(&text).expect("test spec is valid")
}

/// Adam with a warm-up, a cosine decay over the epochs, clipping, patience and the best state
/// kept: a joiner's replayed updates must use the same rate and clipping factor as the gang's
/// steps, and count the same validations ([`count_on_rank_zero`]), keeping the same best state.
fn mlp_adam() -> JobSpec {
    digits_spec(
        "kind = \"mlp\"\nhidden = [32]",
        "epochs = 20\nbatch_size = 32\noptimizer = \"adam\"\nlearning_rate = 0.01\nweight_decay = 0.0001\nseed = 5\n\
         lr_schedule = \"cosine\"\nwarmup_steps = 8\nclip_grad_norm = 1.0\nvalidate_every_steps = 1\npatience = 1000\n\
         keep_best = true",
    )
}

/// What rank 0's agent does after a validation: counts it for `train.patience` (here a value
/// without evaluating: better at every step to [`BEST_STEP`], worse and better by turns after,
/// never as good): the handovers start before it, so a joiner takes an older best in the state
/// and replays the update that counts this one.
fn count_on_rank_zero(trainer: &mut Trainer, rank: usize) {
    if rank == 0 {
        let step = trainer.steps_done();
        let val_loss = if step <= BEST_STEP { 1.0 / (step + 1) as f64 } else { 1.0 + (step % 3) as f64 * 0.1 };
        trainer.count_validation(0.5, val_loss);
    }
}

/// The step of the best validation ([`count_on_rank_zero`]).
const BEST_STEP: u64 = 7;

fn train_set(spec: &JobSpec) -> Arc<Dataset> {
    Arc::new(load_job_data(spec.built_in().expect("a built-in job").1, spec.train.seed).expect("data loads").train)
}

fn bits(state: &TrainState) -> Vec<u32> {
    state.params.iter().map(|v| v.to_bits()).collect()
}

/// `world` ranks train `steps` steps without any handover: every rank's final state.
fn uninterrupted(spec: &JobSpec, data: &Arc<Dataset>, world: usize, steps: u64) -> Vec<TrainState> {
    let gang = loopback_gang(world, COLLECTIVE_TIMEOUT).expect("loopback gang forms");
    let ranks: Vec<_> = gang
        .into_iter()
        .map(|mut comm| {
            let (spec, data) = (spec.clone(), data.clone());
            std::thread::spawn(move || {
                let mut trainer = Trainer::new(&spec, data, &mut comm, None).expect("trainer builds");
                let rank = comm.rank();
                for _ in 0..steps {
                    trainer.step(&mut comm).expect("step");
                    count_on_rank_zero(&mut trainer, rank);
                }
                trainer.state()
            })
        })
        .collect();
    ranks.into_iter().map(|r| r.join().expect("rank thread")).collect()
}

/// What one rank of the gang ended with.
struct RankOutcome {
    state: TrainState,
    /// The step after which this rank's member was replaced (the leaving member only).
    replaced_after: Option<u64>,
    /// Whether its handover was still under way at the end.
    handing_over: bool,
    /// Why its handover was given up (what its agent tells the coordinator).
    failure: Option<String>,
}

/// Where the gang's ranks take links: a listener of their own, or an agent's data port (shared
/// with the next generation's rendezvous and state pushes).
#[derive(Clone, Copy, PartialEq)]
enum Ports {
    Listeners,
    DataPorts,
}

/// How the joining member behaves.
#[derive(Clone, Copy, PartialEq)]
enum Joiner {
    /// Takes the state, catches up, joins the ring and trains to the end.
    Joins,
    /// Takes a state damaged on its way (a bit of one weight): its replay of the first
    /// update differs from the leaving member's, so it refuses to go on.
    TakesADamagedState,
    /// Cannot be reached at all (its port is closed): the transfer fails to connect.
    Unreachable,
    /// Takes the state, then goes away (a joiner that dies before the swap).
    DiesAfterTheState,
}

/// A run with a live handover: `world` ranks train `steps` steps; after `start_at` steps rank
/// `leaving` hands over to a joiner.
#[derive(Clone, Copy)]
struct Case {
    world: usize,
    leaving: usize,
    start_at: u64,
    steps: u64,
    joiner: Joiner,
    ports: Ports,
}

/// Runs `case`, the joiner a thread with its own TCP endpoint. Returns every rank's outcome
/// and the joiner's (its state and catch-up), when it joined.
fn train_with_live_handover(
    spec: &JobSpec,
    data: &Arc<Dataset>,
    case: Case,
) -> (Vec<RankOutcome>, Option<(TrainState, CaughtUp)>) {
    let Case { world, leaving, start_at, steps, joiner, ports } = case;
    let (listeners, configs) = loopback_configs(world, COLLECTIVE_TIMEOUT).expect("loopback configs");
    let gang_id = configs[0].gang_id;
    let joiner_config = configs[leaving].clone();
    // The joiner's endpoint: an agent's data port (the transfer is routed by its magic), or a
    // listener of its own.
    let joiner_listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let joiner_addr = match joiner {
        // "Unreachable" is 127.0.0.1 on a closed port.
        Joiner::Unreachable => SocketAddr::from(([127, 0, 0, 1], flotilla_store::testing::closed_port())),
        _ => joiner_listener.local_addr().expect("addr"),
    };
    let joiner_port = match ports {
        Ports::Listeners => None,
        Ports::DataPorts => Some(DataPort::start(joiner_listener.try_clone().expect("listener"), None).expect("port")),
    };
    let ranks: Vec<_> = listeners
        .into_iter()
        .zip(configs)
        .enumerate()
        .map(|(rank, (listener, config))| {
            let (spec, data) = (spec.clone(), data.clone());
            std::thread::spawn(move || {
                let mut comm = match ports {
                    Ports::Listeners => RingCommunicator::connect(listener, config).expect("ring"),
                    Ports::DataPorts => {
                        let port = DataPort::start(listener, None).expect("data port");
                        RingCommunicator::connect_via(&port, config).expect("ring")
                    }
                };
                let mut trainer = Trainer::new(&spec, data, &mut comm, None).expect("trainer builds");
                let (mut replaced_after, mut swapped) = (None, false);
                while trainer.steps_done() < steps {
                    if rank == leaving && trainer.steps_done() == start_at {
                        let source = Source::connect(joiner_addr, KEY.to_vec(), gang_id, rank, trainer.state());
                        trainer.hand_over(Box::new(source));
                    }
                    let report = trainer.step(&mut comm).expect("step");
                    if report.replaced == Some(rank) {
                        replaced_after = Some(report.step);
                        break;
                    }
                    count_on_rank_zero(&mut trainer, rank);
                    // The joiner gets its time, however loaded the machine: until the gang sees
                    // a swap, its steps are paced (the results do not depend on timing).
                    swapped |= report.replaced.is_some();
                    if trainer.steps_done() >= start_at && !swapped {
                        std::thread::sleep(PACE);
                    }
                }
                let failure = trainer.take_handover_failure();
                RankOutcome { state: trainer.state(), replaced_after, handing_over: trainer.is_handing_over(), failure }
            })
        })
        .collect();
    let (spec, data) = (spec.clone(), data.clone());
    let joining = std::thread::spawn(move || -> Result<Option<(TrainState, CaughtUp)>, LiveError> {
        if joiner == Joiner::Unreachable {
            return Ok(None);
        }
        let stream = match &joiner_port {
            Some(port) => port.next_live(COLLECTIVE_TIMEOUT).expect("the leaving member's transfer arrives"),
            None => joiner_listener.accept().expect("the leaving member connects").0,
        };
        match joiner {
            Joiner::Joins => {
                let config = joiner_config;
                let Joined { mut trainer, mut comm, caught } = join(stream, &KEY, &spec, data, config, joiner_port)?;
                // As the agent's new rank 0: first the validation of the step it joined after
                // (the leaving rank 0 took it, and never ran the step that would count it).
                count_on_rank_zero(&mut trainer, leaving);
                while trainer.steps_done() < steps {
                    trainer.step(&mut comm)?;
                    count_on_rank_zero(&mut trainer, leaving);
                }
                Ok(Some((trainer.state(), caught)))
            }
            Joiner::Unreachable => unreachable!("returned above"),
            Joiner::DiesAfterTheState => {
                Sink::accept(stream, &KEY, gang_id, leaving)?;
                Ok(None)
            }
            Joiner::TakesADamagedState => {
                let (mut sink, mut state) = Sink::accept(stream, &KEY, gang_id, leaving)?;
                // The top mantissa bit: a change no update's rounding can absorb.
                state.params[0] = f32::from_bits(state.params[0].to_bits() ^ (1 << 22));
                let model = Trainer::model(&spec, &data)?;
                let mut trainer = Trainer::joining(model, &spec, data, state, leaving, world)?;
                let refused = catch_up(&mut sink, &mut trainer).expect_err("the replay differs").to_string();
                assert!(refused.contains("differs from the leaving member's"), "{refused}");
                Ok(None)
            }
        }
    });
    let outcomes = ranks.into_iter().map(|r| r.join().expect("rank thread")).collect();
    (outcomes, joining.join().expect("joiner thread").expect("the joiner ran"))
}

fn assert_handover_changes_no_bit(world: usize, leaving: usize, ports: Ports) {
    let spec = mlp_adam();
    let data = train_set(&spec);
    let (start_at, steps) = (6, 40);
    let reference = uninterrupted(&spec, &data, world, steps);
    let case = Case { world, leaving, start_at, steps, joiner: Joiner::Joins, ports };
    let (ranks, joined) = train_with_live_handover(&spec, &data, case);
    let (joiner, caught) = joined.expect("the joiner joined");
    let swap = ranks[leaving].replaced_after.expect("the leaving member was replaced");
    assert!(start_at < swap && swap < steps, "swapped after step {swap}");
    assert_eq!(caught.step, swap, "the joiner took over after the step the gang agreed on");
    assert_eq!(caught.updates, swap - start_at, "every update from the state's step on was replayed");
    assert_eq!(ranks[leaving].state.step, swap, "the leaving member stepped no further");
    assert!(ranks.iter().all(|r| r.failure.is_none()), "nothing failed");
    for (rank, outcome) in ranks.iter().enumerate().filter(|(rank, _)| *rank != leaving) {
        assert_eq!(outcome.replaced_after, None);
        assert_eq!(outcome.state.step, steps, "rank {rank} trained on to the end");
        assert_eq!(bits(&outcome.state), bits(&reference[rank]), "rank {rank}'s weights are bit-identical");
        assert_eq!(outcome.state.optimizer, reference[rank].optimizer);
    }
    assert_eq!(joiner.step, steps);
    assert_eq!(joiner.cursor, reference[leaving].cursor);
    assert_eq!(bits(&joiner), bits(&reference[leaving]), "the joiner's weights are bit-identical");
    assert_eq!(joiner.optimizer, reference[leaving].optimizer, "and so is its optimizer state");
    assert_eq!(joiner.patience, reference[leaving].patience, "and its patience count");
    assert!(joiner.patience.counted_step > swap, "validations were counted after the swap: {:?}", joiner.patience);
    let best = |state: &TrainState| state.best_params.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    assert!(!joiner.best_params.is_empty() && best(&joiner) == best(&reference[leaving]), "and its best state");
    assert_eq!(joiner.patience.best_step, BEST_STEP, "{:?}", joiner.patience);
    println!("handover from step {start_at}, swapped after step {swap}");
}

#[test]
fn a_member_handed_over_live_in_a_gang_of_three_changes_no_bit() {
    // The agent's way: every rank takes the joiner's links on its data port.
    assert_handover_changes_no_bit(3, 1, Ports::DataPorts);
}

#[test]
fn rank_zero_handed_over_live_in_a_gang_of_two_changes_no_bit() {
    // Both of the joiner's links go to the one survivor; rank 0's predecessor wraps around.
    assert_handover_changes_no_bit(2, 0, Ports::Listeners);
}

#[test]
fn a_lone_member_hands_over_live_and_its_joiner_trains_on() {
    // A world of one has no links: the member alone agrees, once its joiner caught up.
    assert_handover_changes_no_bit(1, 0, Ports::DataPorts);
}

fn assert_failed_joiner_leaves_the_gang_as_before(joiner: Joiner) {
    let spec = mlp_adam();
    let data = train_set(&spec);
    let (world, leaving, steps) = (3, 2, 30);
    let reference = uninterrupted(&spec, &data, world, steps);
    let case = Case { world, leaving, start_at: 4, steps, joiner, ports: Ports::Listeners };
    let (ranks, joined) = train_with_live_handover(&spec, &data, case);
    assert!(joined.is_none());
    assert!(!ranks[leaving].handing_over, "the leaving member gave the handover up");
    let failure = ranks[leaving].failure.as_deref().expect("and says why, once");
    assert!(failure.contains("joining member"), "{failure}");
    for (rank, outcome) in ranks.iter().enumerate() {
        assert_eq!(outcome.replaced_after, None, "nobody was replaced");
        assert_eq!(outcome.state.step, steps);
        assert_eq!(bits(&outcome.state), bits(&reference[rank]), "rank {rank}'s weights are bit-identical");
    }
}

#[test]
fn a_joiner_that_dies_before_the_swap_leaves_the_gang_training_as_before() {
    assert_failed_joiner_leaves_the_gang_as_before(Joiner::DiesAfterTheState);
}

#[test]
fn a_joiner_that_cannot_be_reached_costs_the_gang_nothing() {
    assert_failed_joiner_leaves_the_gang_as_before(Joiner::Unreachable);
}

#[test]
fn a_joiner_whose_replay_differs_refuses_to_join_and_the_gang_trains_on() {
    assert_failed_joiner_leaves_the_gang_as_before(Joiner::TakesADamagedState);
}
