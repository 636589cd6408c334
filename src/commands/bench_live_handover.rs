//! `flotilla bench-live-handover` (hidden): what a live handover costs the ranks that stay.
//!
//! Trains the MLP 784-512-512-10 of `bench-train` (Adam, batch 64 per rank, synthetic data) on
//! `world` ranks (threads joined by the TCP ring on loopback). After `--start-at` steps the last
//! rank hands its place to a joining member (a thread of its own, reached over TCP): it sends
//! its state, then every step's update, and the gang swaps after the step its votes agree on
//! (see `flotilla_worker::train::Handover`). Each round prints one JSON line: the survivors'
//! median step time (the steps before the handover began), their longest time without an
//! optimizer step around the swap, its ratio to the median and to #25's bound (one step plus
//! the state's transfer, as the stop-and-push handover moves it), and the transfer's figures.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_core::spec::JobSpec;
use flotilla_worker::checkpoint::live::{CaughtUp, Joined, Source, join};
use flotilla_worker::collective::ring::{RingCommunicator, loopback_configs};
use flotilla_worker::data;
use flotilla_worker::train::Trainer;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);
const KEY: [u8; 32] = [3; 32];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Ranks in the gang (the last one hands over).
    #[arg(long, default_value_t = 2)]
    pub world: usize,
    /// Steps before the handover begins (the first 10 warm up).
    #[arg(long, default_value_t = 40)]
    pub start_at: u64,
    /// Steps in all.
    #[arg(long, default_value_t = 80)]
    pub steps: u64,
    /// Rounds (each a fresh gang).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// One survivor's step end times, and the step after which the leaving member was replaced.
struct Round {
    /// Per survivor: when each step ended.
    ends: Vec<Vec<Instant>>,
    swap: u64,
    caught: CaughtUp,
    /// Time from the joiner holding the gang's state (caught up, links made) to the end of its
    /// first step with the gang.
    joiner_first_step_ms: f64,
}

fn round(args: &Args) -> anyhow::Result<Round> {
    let spec = JobSpec::from_toml_str(super::bench_train::SPEC).context("benchmark spec")?;
    let train = Arc::new(data::load_job_data(spec.built_in()?.1, spec.train.seed)?.train);
    let (world, leaving, steps, start_at) = (args.world, args.world - 1, args.steps, args.start_at);
    let (listeners, configs) = loopback_configs(world, TIMEOUT)?;
    let gang_id = configs[0].gang_id;
    let joiner_config = configs[leaving].clone();
    let joiner_port = TcpListener::bind("127.0.0.1:0")?;
    let joiner_addr = joiner_port.local_addr()?;
    let ranks: Vec<_> = listeners
        .into_iter()
        .zip(configs)
        .enumerate()
        .map(|(rank, (listener, config))| {
            let (spec, train) = (spec.clone(), train.clone());
            std::thread::spawn(move || -> anyhow::Result<(Vec<Instant>, Option<u64>)> {
                let mut comm = RingCommunicator::connect(listener, config)?;
                let mut trainer = Trainer::new(&spec, train, &mut comm, None)?;
                let mut ends = Vec::new();
                while trainer.steps_done() < steps {
                    if rank == leaving && trainer.steps_done() == start_at {
                        trainer.hand_over(Box::new(Source::connect(
                            joiner_addr,
                            KEY.to_vec(),
                            gang_id,
                            rank,
                            trainer.state(),
                        )));
                    }
                    let report = trainer.step(&mut comm)?;
                    ends.push(Instant::now());
                    if report.replaced == Some(rank) {
                        return Ok((ends, Some(report.step)));
                    }
                }
                Ok((ends, None))
            })
        })
        .collect();
    let joining = std::thread::spawn(move || -> anyhow::Result<(CaughtUp, f64)> {
        let (stream, _) = joiner_port.accept()?;
        let Joined { mut trainer, mut comm, caught } = join(stream, &KEY, &spec, train, joiner_config, None)?;
        let caught_at = Instant::now();
        trainer.step(&mut comm)?;
        let first_step_ms = caught_at.elapsed().as_secs_f64() * 1e3;
        while trainer.steps_done() < steps {
            trainer.step(&mut comm)?;
        }
        Ok((caught, first_step_ms))
    });
    let mut ends = Vec::new();
    let mut swap = None;
    for (rank, handle) in ranks.into_iter().enumerate() {
        let (rank_ends, replaced) = handle.join().map_err(|_| anyhow::anyhow!("a rank panicked"))??;
        match rank == leaving {
            true => swap = replaced,
            false => ends.push(rank_ends),
        }
    }
    let (caught, joiner_first_step_ms) = joining.join().map_err(|_| anyhow::anyhow!("the joiner panicked"))??;
    let swap = swap.context("the gang never agreed on the swap")?;
    Ok(Round { ends, swap, caught, joiner_first_step_ms })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or_default()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.world >= 2, "--world must be 2 or more (the last rank hands over to a joiner)");
    anyhow::ensure!(
        args.start_at >= 12 && args.steps >= args.start_at + 20,
        "--start-at must be 12 or more and --steps at least 20 beyond it"
    );
    for _ in 0..args.rounds {
        let round = round(&args)?;
        let gap_ms = |ends: &[Instant], step: u64| {
            // ends[i] is the end of step i + 1.
            (ends[step as usize - 1] - ends[step as usize - 2]).as_secs_f64() * 1e3
        };
        let steady: Vec<f64> =
            round.ends.iter().flat_map(|ends| (11..=args.start_at).map(|step| gap_ms(ends, step))).collect();
        let median_step_ms = median(steady);
        // The survivors' time without an optimizer step around the swap: the step after it
        // (the joiner's first) and the swap's own step (its votes and the links' change).
        let swap_gap_ms = round
            .ends
            .iter()
            .flat_map(|ends| [gap_ms(ends, round.swap), gap_ms(ends, round.swap + 1)])
            .fold(0.0, f64::max);
        let during: Vec<f64> =
            round.ends.iter().flat_map(|ends| (args.start_at + 2..round.swap).map(|step| gap_ms(ends, step))).collect();
        println!(
            "{}",
            json!({
                "bench": "live_handover_mlp_784_512_512_10",
                "world": args.world,
                "started_after_step": args.start_at,
                "swapped_after_step": round.swap,
                "median_step_ms": median_step_ms,
                "median_step_during_catch_up_ms": if during.is_empty() { None } else { Some(median(during)) },
                "survivor_longest_without_a_step_ms": swap_gap_ms,
                "vs_median_step": swap_gap_ms / median_step_ms,
                "state_transfer_ms": round.caught.state_ms,
                "bound_ms": median_step_ms + round.caught.state_ms,
                "vs_bound": swap_gap_ms / (median_step_ms + round.caught.state_ms),
                "updates_replayed": round.caught.updates,
                "replay_ms_per_update": round.caught.replay_ms / round.caught.updates.max(1) as f64,
                "bytes_moved_peer_to_peer": round.caught.bytes,
                "joiner_first_step_ms": round.joiner_first_step_ms,
            })
        );
    }
    Ok(())
}
