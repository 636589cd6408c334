//! `flotilla train JOB.toml --local-workers N`: run a job standalone on this machine, like
//! `torchrun --standalone`: N worker processes (`flotilla train-rank`, hidden) joined by the TCP
//! ring on loopback, no coordinator. Rank 0 prints progress, writes checkpoints, evaluates, and
//! prints the summary (with `--output json`, a JSON object on the last line of stdout).
//!
//! `--checkpoint-dir`, `--steps` and `--resume-from` make stop-and-resume scriptable; this is
//! also the engine the cluster's worker agents run.

use std::net::{SocketAddr, TcpListener};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_core::spec::{JobSpec, TrainLength};
use flotilla_worker::checkpoint::state::{self, Checkpointer};
use flotilla_worker::collective::ring::{RingCommunicator, RingConfig};
use flotilla_worker::data;
use flotilla_worker::train::{StepReport, Trainer};
use serde_json::json;

use super::spec_file::{self, LoadError};
use crate::output::OutputFormat;

/// The gang secret of a `flotilla train` run, passed to its rank processes.
const GANG_SECRET_ENV: &str = "FLOTILLA_GANG_SECRET";

/// Local worker processes at most (each needs a core to be useful).
const LOCAL_WORKERS_MAX: usize = 64;
/// Time for the ranks to find each other and for any one collective operation.
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Progress lines at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Path to the job spec (TOML).
    pub spec: PathBuf,
    /// Worker processes to train with (data-parallel ranks on this machine).
    #[arg(long, default_value_t = 1)]
    pub local_workers: usize,
    /// Where to write checkpoints (file:///dir or /dir): <dir>/ckpt/<step>/.
    #[arg(long)]
    pub checkpoint_dir: Option<String>,
    /// Train exactly this many steps (overrides train.epochs / train.steps).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Resume from a checkpoint prefix (e.g. <dir>/ckpt/000000000100).
    #[arg(long)]
    pub resume_from: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RankArgs {
    #[command(flatten)]
    pub job: Args,
    #[arg(long)]
    pub rank: usize,
    /// Every rank's ring address, in rank order.
    #[arg(long, value_delimiter = ',')]
    pub addresses: Vec<SocketAddr>,
    #[arg(long)]
    pub gang_id: u64,
}

fn load_spec(args: &Args) -> anyhow::Result<JobSpec> {
    let mut spec = match spec_file::load(&args.spec) {
        Ok(spec) => spec,
        Err(LoadError::Io(e)) => return Err(e),
        Err(LoadError::Spec(e)) => bail!("{}: {e}", args.spec.display()),
    };
    if spec.command().is_some() {
        bail!(
            "{}: `flotilla train` runs the built-in trainer; a command job ([run]) runs on a cluster: \
             `flotilla up` then `flotilla submit {}`",
            args.spec.display(),
            args.spec.display()
        );
    }
    if let Some(steps) = args.steps {
        if steps == 0 {
            bail!("--steps must be at least 1");
        }
        spec.train.length = TrainLength::Steps(steps);
    }
    Ok(spec)
}

pub fn run(args: Args, output: OutputFormat) -> anyhow::Result<()> {
    if args.local_workers == 0 || args.local_workers > LOCAL_WORKERS_MAX {
        bail!("--local-workers must be 1 to {LOCAL_WORKERS_MAX}, got {}", args.local_workers);
    }
    load_spec(&args)?; // fail here, once, rather than in every rank
    let addresses = free_addresses(args.local_workers)?;
    let gang_id = u64::from(std::process::id()) << 20 | u64::from(addresses[0].port());
    let secret = flotilla_worker::collective::ring::random_secret()?;
    let secret = flotilla_proto::auth::hex(&secret);
    let mut children = Vec::with_capacity(args.local_workers);
    for rank in 0..args.local_workers {
        children.push(spawn_rank(&args, rank, &addresses, gang_id, &secret, output)?);
    }
    wait_all(children)
}

fn free_addresses(count: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let listeners: Vec<TcpListener> =
        (0..count).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>().context("finding free ports")?;
    listeners.iter().map(|l| l.local_addr().context("reading a bound port")).collect()
}

fn spawn_rank(
    args: &Args,
    rank: usize,
    addresses: &[SocketAddr],
    gang_id: u64,
    secret_hex: &str,
    output: OutputFormat,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the flotilla executable")?;
    let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    let mut command = Command::new(exe);
    command.args(["--output", if output == OutputFormat::Json { "json" } else { "text" }, "train-rank"]);
    command.arg(&args.spec).args(["--local-workers", &args.local_workers.to_string()]);
    command.args(["--rank", &rank.to_string(), "--addresses", &list.join(","), "--gang-id", &gang_id.to_string()]);
    for (flag, value) in [("--checkpoint-dir", &args.checkpoint_dir), ("--resume-from", &args.resume_from)] {
        if let Some(value) = value {
            command.args([flag, value]);
        }
    }
    if let Some(steps) = args.steps {
        command.args(["--steps", &steps.to_string()]);
    }
    // The gang secret goes in the environment (not the command line, which `ps` shows).
    command.env(GANG_SECRET_ENV, secret_hex);
    command.stdin(Stdio::null()).stdout(if rank == 0 { Stdio::inherit() } else { Stdio::null() });
    command.spawn().with_context(|| format!("cannot start rank {rank}"))
}

/// Waits for every rank; when one fails, stops the others and reports the first failure.
fn wait_all(mut children: Vec<Child>) -> anyhow::Result<()> {
    let mut failed: Option<String> = None;
    let mut running: Vec<usize> = (0..children.len()).collect();
    while !running.is_empty() {
        running.retain(|&rank| match children[rank].try_wait() {
            Ok(Some(status)) => {
                if !status.success() && failed.is_none() {
                    failed = Some(format!("rank {rank} exited with {status}"));
                }
                false
            }
            Ok(None) => true,
            Err(e) => {
                failed.get_or_insert(format!("cannot wait for rank {rank}: {e}"));
                false
            }
        });
        if failed.is_some() {
            for &rank in &running {
                let _ = children[rank].kill();
                let _ = children[rank].wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match failed {
        Some(reason) => bail!("training failed: {reason} (see its error above)"),
        None => Ok(()),
    }
}

/// One rank: load data, join the ring, train, checkpoint (rank 0), report (rank 0).
pub fn run_rank(args: RankArgs, output: OutputFormat) -> anyhow::Result<()> {
    let spec = load_spec(&args.job)?;
    let world = args.addresses.len();
    if args.rank >= world {
        bail!("--rank {} is outside the {world} addresses", args.rank);
    }
    let (_, data_spec) = spec.built_in()?;
    let splits = data::load_job_data(data_spec, spec.train.seed).context("loading the training data")?;
    let listener = TcpListener::bind(args.addresses[args.rank]).context("binding this rank's ring address")?;
    let secret = std::env::var(GANG_SECRET_ENV)
        .ok()
        .and_then(|hex| {
            (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect()
        })
        .with_context(|| format!("{GANG_SECRET_ENV} must hold the gang secret in hex (`flotilla train` sets it)"))?;
    let config = RingConfig::new(args.rank, args.addresses.clone(), args.gang_id, secret, COLLECTIVE_TIMEOUT);
    let mut comm = RingCommunicator::connect(listener, config).context("joining the ring")?;
    let resume = args.job.resume_from.as_deref().map(state::load_uri).transpose()?.map(|(state, _)| state);
    let mut trainer = Trainer::new(&spec, splits.train, &mut comm, resume)?;
    let checkpointer = match (&args.job.checkpoint_dir, args.rank) {
        (Some(uri), 0) => Some(Checkpointer::open(uri)?),
        _ => None,
    };
    let progress = Progress { rank: args.rank, output, total: trainer.total_steps(), started: Instant::now() };
    let mut last_print = Instant::now() - PROGRESS_EVERY;
    let mut last_checkpoint = None;
    let mut save_error = None;
    let last = trainer.run(&mut comm, |trainer, report| {
        if last_print.elapsed() >= PROGRESS_EVERY || trainer.is_finished() {
            progress.print(report);
            last_print = Instant::now();
        }
        if let Some(checkpointer) = &checkpointer
            && report.step % spec.checkpoint.every_steps == 0
        {
            match checkpointer.save(&trainer.state(), None) {
                Ok((uri, _)) => last_checkpoint = Some(uri),
                Err(e) => {
                    save_error = Some(e);
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    })?;
    if let Some(e) = save_error {
        return Err(e).context("writing a checkpoint");
    }
    if args.rank != 0 {
        return Ok(());
    }
    let metrics = splits.validation.as_ref().map(|v| trainer.evaluate(v)).transpose()?;
    if let Some(checkpointer) = &checkpointer {
        let values = metrics.map(|m| (m.val_accuracy, m.val_loss));
        let (uri, _) = checkpointer.save(&trainer.state(), values).context("final checkpoint")?;
        last_checkpoint = Some(uri);
    }
    let summary = json!({
        "step": trainer.steps_done(),
        "total_steps": trainer.total_steps(),
        "world_size": world,
        "metrics": {
            "val_accuracy": metrics.map(|m| m.val_accuracy),
            "val_loss": metrics.map(|m| m.val_loss),
            "train_loss": last.map(|r| r.loss),
            "samples_per_s": last.map(|r| r.samples_per_s),
        },
        "checkpoint": last_checkpoint,
    });
    match output {
        OutputFormat::Json => println!("{summary}"),
        OutputFormat::Text => {
            let accuracy = metrics.map_or("n/a".to_string(), |m| format!("{:.4}", m.val_accuracy));
            let loss = metrics.map_or("n/a".to_string(), |m| format!("{:.4}", m.val_loss));
            println!(
                "done: step {} on {world} worker(s), val_accuracy {accuracy}, val_loss {loss}",
                trainer.steps_done()
            );
            if let Some(uri) = summary["checkpoint"].as_str() {
                println!("checkpoint: {uri}");
            }
        }
    }
    Ok(())
}

struct Progress {
    rank: usize,
    output: OutputFormat,
    total: u64,
    started: Instant,
}

impl Progress {
    fn print(&self, report: &StepReport) {
        if self.rank != 0 {
            return;
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        let line = format!(
            "step {}/{}  epoch {}  loss {:.4}  {:.0} samples/s  {:.1}s",
            report.step, self.total, report.epoch, report.loss, report.samples_per_s, elapsed
        );
        // In JSON mode stdout carries only the summary.
        match self.output {
            OutputFormat::Json => eprintln!("{line}"),
            OutputFormat::Text => println!("{line}"),
        }
    }
}
