//! `flotilla bench-train` (hidden): the measurement behind `scripts/bench/train.sh`.
//!
//! Trains an MLP 784-512-512-10 on synthetic data with batch 64 per worker, on 1 and 2 ranks
//! (threads joined by the TCP ring on loopback), and prints one JSON line per world size:
//! samples/s, the median step time, and the communication fraction. The fraction is the time
//! spent inside the gradient all-reduce divided by the step time: since our exchange does not
//! overlap computation, it equals (step with exchange - step without) / step with.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_core::spec::JobSpec;
use flotilla_worker::collective::ring::loopback_gang;
use flotilla_worker::collective::{CollectiveError, Communicator};
use flotilla_worker::data;
use flotilla_worker::train::Trainer;
use serde_json::json;

/// The benchmark's job (bench-live-handover trains it too).
pub(crate) const SPEC: &str = r#"
name = "bench-train"
model = { kind = "mlp", hidden = [512, 512] }
data = { train = "synthetic:blobs?samples=20000&features=784&classes=10&seed=1", validation_fraction = 0.0 }
train = { steps = 1000000, batch_size = 64, optimizer = "adam" }
workers = { min = 1, max = 4 }
"#;

/// The model line of [`SPEC`], and the CNN of examples/mnist-cnn.toml that `--model cnn`
/// puts in its place (the same synthetic data, read as 28x28 images).
const MLP_MODEL: &str = r#"model = { kind = "mlp", hidden = [512, 512] }"#;
const CNN_MODEL: &str = r#"model = { kind = "cnn", channels = [16, 32] }"#;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Steps timed per world size (after 10 warm-up steps).
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub worlds: Vec<usize>,
    /// Instead: this process's first training step after this many warm-up passes of a
    /// prepared worker (world 1), against the `--steps` after it. One measurement per process
    /// (a process warms once): `scripts/bench/warm_up.sh` runs each in a fresh one.
    #[arg(long)]
    pub first_step_after: Option<usize>,
    /// The model for --first-step-after: mlp (784-512-512-10) or cnn (channels 16, 32).
    #[arg(long, default_value = "mlp")]
    pub model: String,
    /// With --first-step-after: warm-up passes on the timed trainer itself too (as a live
    /// handover's joiner runs one), after the scratch ones.
    #[arg(long, default_value_t = 0)]
    pub own_passes: usize,
}

/// Adds up the time spent in all-reduce.
struct Timed<C> {
    inner: C,
    all_reduce: Arc<Mutex<Duration>>,
}

impl<C: Communicator> Communicator for Timed<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&mut self, buffer: &mut [f32]) -> Result<(), CollectiveError> {
        let started = Instant::now();
        let result = self.inner.all_reduce_sum(buffer);
        *self.all_reduce.lock().expect("timer lock") += started.elapsed();
        result
    }
    fn broadcast(&mut self, buffer: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.inner.broadcast(buffer, root)
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.inner.barrier()
    }
}

/// (step times, all-reduce time per step) of rank 0.
fn measure(world: usize, steps: usize) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    const WARMUP: usize = 10;
    let spec = JobSpec::from_toml_str(SPEC).context("benchmark spec")?;
    let train = Arc::new(data::load_job_data(spec.built_in()?.1, spec.train.seed)?.train);
    let gang = loopback_gang(world, Duration::from_secs(60))?;
    let handles: Vec<_> = gang
        .into_iter()
        .map(|comm| {
            let (spec, train) = (spec.clone(), train.clone());
            std::thread::spawn(move || -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
                let timer = Arc::new(Mutex::new(Duration::ZERO));
                let mut comm = Timed { inner: comm, all_reduce: timer.clone() };
                let mut trainer = Trainer::new(&spec, train, &mut comm, None)?;
                let (mut step_times, mut comm_times) = (Vec::new(), Vec::new());
                for i in 0..WARMUP + steps {
                    *timer.lock().expect("timer lock") = Duration::ZERO;
                    let started = Instant::now();
                    trainer.step(&mut comm)?;
                    if i >= WARMUP {
                        step_times.push(started.elapsed());
                        comm_times.push(*timer.lock().expect("timer lock"));
                    }
                }
                Ok((step_times, comm_times))
            })
        })
        .collect();
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.join().map_err(|_| anyhow::anyhow!("a rank panicked"))??);
    }
    Ok(results.swap_remove(0))
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

/// A fresh process's first step after `passes` warm-up passes (the prepared worker's own
/// [`flotilla_worker::agent::warm_up`]), then `steps` more: one JSON line.
fn first_step(model: &str, passes: usize, own_passes: usize, steps: usize) -> anyhow::Result<()> {
    let text = match model {
        "mlp" => SPEC.to_string(),
        "cnn" => SPEC.replace(MLP_MODEL, CNN_MODEL),
        other => anyhow::bail!("--model {other}: mlp or cnn"),
    };
    let spec = JobSpec::from_toml_str(&text).context("benchmark spec")?;
    let kind = spec.model.as_ref().map(|m| m.kind());
    anyhow::ensure!(kind == Some(model), "the benchmark spec's model line changed; update MLP_MODEL");
    let train = Arc::new(data::load_job_data(spec.built_in()?.1, spec.train.seed)?.train);
    flotilla_worker::agent::warm_up(&spec, train.clone(), passes)?;
    let mut comm = flotilla_worker::collective::local::LocalCommunicator;
    let mut trainer = Trainer::new(&spec, train, &mut comm, None)?;
    for _ in 0..own_passes {
        trainer.warm_up()?;
    }
    let mut times = Vec::with_capacity(steps + 1);
    for _ in 0..=steps {
        let started = Instant::now();
        trainer.step(&mut comm)?;
        times.push(started.elapsed());
    }
    let first = times.remove(0);
    let steady = median(times);
    println!(
        "{}",
        json!({
            "bench": "first_step_after_warm_up",
            "model": model,
            "passes": passes,
            "own_passes": own_passes,
            "product_passes": flotilla_worker::agent::WARM_UP_PASSES,
            "first_step_ms": first.as_secs_f64() * 1000.0,
            "steady_step_ms": steady.as_secs_f64() * 1000.0,
            "first_vs_steady": first.as_secs_f64() / steady.as_secs_f64().max(1e-9),
        })
    );
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(passes) = args.first_step_after {
        return first_step(&args.model, passes, args.own_passes, args.steps);
    }
    for &world in &args.worlds {
        let (steps, comm) = measure(world, args.steps)?;
        let total: Duration = steps.iter().sum();
        let comm_total: Duration = comm.iter().sum();
        let samples = (64 * world * steps.len()) as f64;
        println!(
            "{}",
            json!({
                "bench": "train_mlp_784_512_512_10",
                "world": world,
                "batch_per_worker": 64,
                "steps": steps.len(),
                "samples_s": samples / total.as_secs_f64(),
                "median_step_ms": median(steps).as_secs_f64() * 1000.0,
                "median_allreduce_ms": median(comm).as_secs_f64() * 1000.0,
                "comm_fraction": comm_total.as_secs_f64() / total.as_secs_f64(),
            })
        );
    }
    Ok(())
}
