//! `flotilla bench-gpu` (hidden): the measurements of `scripts/gpu_check.sh` on a GPU machine.
//!
//! First the probe (`flotilla_worker::gpu::cuda_devices`): without a usable GPU it prints
//! `{"bench":"gpu_probe","gpu":false,"reason":...}` and exits with status 2, so the script can
//! tell "no GPU here" from a failure. With one it prints JSON lines:
//! - `nccl_allreduce`: NCCL all-reduce over every GPU of this machine (one thread per GPU,
//!   world = GPUs), 1-256 MiB: median time, algbw and busbw (GB/s, NCCL's definitions).
//! - `train_step`: samples/s of the built-in MLP and CNN steps on the GPU and on the CPU, in
//!   the same run, and their ratio.

use std::time::Instant;

use anyhow::Context;
use flotilla_core::spec::JobSpec;
use flotilla_worker::collective::local::LocalCommunicator;
use flotilla_worker::data;
use flotilla_worker::train::Trainer;
use serde_json::json;

/// The exit status that means "no usable GPU on this machine" (not a failure of the check).
pub const NO_GPU_EXIT: u8 = 2;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Steps timed per model and device (after 5 warm-up steps).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Largest all-reduce buffer, in MiB.
    #[arg(long, default_value_t = 256)]
    pub max_mib: usize,
}

const MODELS: [(&str, &str); 2] = [
    ("mlp_784_512_512_10", "model = { kind = \"mlp\", hidden = [512, 512] }"),
    ("cnn_32_64", "model = { kind = \"cnn\", channels = [32, 64] }"),
];

fn spec(model: &str, gpus: u32) -> anyhow::Result<JobSpec> {
    let text = format!(
        "name = \"bench-gpu\"\n{model}\n\
         data = {{ train = \"synthetic:blobs?samples=20000&features=784&classes=10&seed=1\", validation_fraction = 0.0 }}\n\
         train = {{ steps = 1000000, batch_size = 256, optimizer = \"adam\" }}\n\
         workers = {{ min = 1, max = 1, gpus = {gpus} }}\n"
    );
    JobSpec::from_toml_str(&text).context("benchmark spec")
}

/// Samples per second of `steps` steps of `model` on the CPU (`gpus = 0`) or GPU 0.
fn samples_per_s(model: &str, gpus: u32, steps: usize) -> anyhow::Result<f64> {
    const WARMUP: usize = 5;
    let spec = spec(model, gpus)?;
    let train = data::load_job_data(spec.built_in()?.1, spec.train.seed)?.train;
    let mut comm = LocalCommunicator;
    let mut trainer = Trainer::new(&spec, train, &mut comm, None)?;
    for _ in 0..WARMUP {
        trainer.step(&mut comm)?;
    }
    let started = Instant::now();
    for _ in 0..steps {
        trainer.step(&mut comm)?;
    }
    Ok((steps * spec.train.batch_size as usize) as f64 / started.elapsed().as_secs_f64())
}

pub fn run(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let gpus = match flotilla_worker::gpu::cuda_devices() {
        Ok(gpus) => gpus,
        Err(reason) => {
            println!("{}", json!({ "bench": "gpu_probe", "gpu": false, "reason": reason }));
            return Ok(std::process::ExitCode::from(NO_GPU_EXIT));
        }
    };
    println!("{}", json!({ "bench": "gpu_probe", "gpu": true, "devices": gpus }));
    nccl::run(gpus, args.max_mib)?;
    for (name, model) in MODELS {
        let gpu = samples_per_s(model, 1, args.steps)?;
        let cpu = samples_per_s(model, 0, args.steps.min(20))?;
        println!(
            "{}",
            json!({ "bench": "train_step", "model": name, "batch": 256, "gpu_samples_s": gpu, "cpu_samples_s": cpu,
                    "gpu_over_cpu": gpu / cpu })
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(feature = "cuda")]
mod nccl {
    use std::time::{Duration, Instant};

    use anyhow::Context;
    use flotilla_worker::collective::Communicator;
    use flotilla_worker::collective::nccl::{NcclCommunicator, new_unique_id};
    use serde_json::json;

    /// NCCL all-reduce over `gpus` GPUs (one thread each), sizes 1 MiB up to `max_mib` by 4x.
    pub fn run(gpus: usize, max_mib: usize) -> anyhow::Result<()> {
        let mut mib = 1;
        while mib <= max_mib {
            let bytes = mib << 20;
            let median = measure(gpus, bytes)?;
            let algbw = bytes as f64 / median.as_secs_f64() / 1e9;
            let busbw = algbw * 2.0 * (gpus as f64 - 1.0) / gpus as f64;
            println!(
                "{}",
                json!({ "bench": "nccl_allreduce", "world": gpus, "bytes": bytes,
                        "median_ms": median.as_secs_f64() * 1e3, "algbw_GBps": algbw, "busbw_GBps": busbw })
            );
            mib *= 4;
        }
        Ok(())
    }

    fn measure(world: usize, bytes: usize) -> anyhow::Result<Duration> {
        const ROUNDS: usize = 10;
        let id = new_unique_id()?;
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
                    let mut comm = NcclCommunicator::new(rank, rank, world, &id).context("joining NCCL")?;
                    let mut buffer = vec![1.0f32; bytes / 4];
                    let mut times = Vec::with_capacity(ROUNDS);
                    for _ in 0..ROUNDS + 2 {
                        let started = Instant::now();
                        comm.all_reduce_sum(&mut buffer)?;
                        times.push(started.elapsed());
                    }
                    anyhow::ensure!(buffer[0] > 0.0, "the all-reduce produced {}", buffer[0]);
                    Ok(times.split_off(2))
                })
            })
            .collect();
        let mut times = Vec::new();
        for handle in handles {
            times = handle.join().map_err(|_| anyhow::anyhow!("an NCCL rank panicked"))??;
        }
        times.sort();
        Ok(times.get(times.len() / 2).copied().unwrap_or_default())
    }
}

#[cfg(not(feature = "cuda"))]
mod nccl {
    pub fn run(_gpus: usize, _max_mib: usize) -> anyhow::Result<()> {
        anyhow::bail!("NCCL needs a build with `--features cuda`")
    }
}
