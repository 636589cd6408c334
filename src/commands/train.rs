//! `flotilla train JOB.toml --local-workers N`: run a job standalone on this machine, like
//! `torchrun --standalone`: N worker processes (`flotilla train-rank`, hidden) joined by the TCP
//! ring on loopback, no coordinator. Rank 0 prints progress, writes checkpoints, evaluates, and
//! prints the summary (with `--output json`, a JSON object on the last line of stdout).
//!
//! Each rank runs the cluster agent's rank runner (`flotilla_worker::agent::work::run_rank`)
//! with a standalone host: same background checkpoint cadence, same resume and export, no
//! coordinator. `--checkpoint-dir`, `--steps` and `--resume-from` make stop-and-resume
//! scriptable; SIGINT/SIGTERM (Ctrl-C) stop the gang in order after a checkpoint.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_core::spec::{JobSpec, TrainLength};
use flotilla_proto::convert::spec_to_proto;
use flotilla_proto::v1::{CheckpointRef, FinishedReport, Peer, TrainAssignment};
use flotilla_worker::agent::work::{self, AgentShared, Host, RankContext, RankEnd, Standalone};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::json;

use super::spec_file::{self, LoadError};
use crate::output::OutputFormat;

/// The gang secret of a `flotilla train` run, passed to its rank processes.
const GANG_SECRET_ENV: &str = "FLOTILLA_GANG_SECRET";

/// Local worker processes at most (each needs a core to be useful).
const LOCAL_WORKERS_MAX: usize = 64;

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
    /// Start from a model's weights instead of the seeded ones (fine-tuning): a safetensors
    /// file as `--checkpoint-dir` exports it or `flotilla models download` writes it (a path,
    /// file:// or s3://); the same architecture. A cluster job names a registered model in
    /// `train.init_from` instead.
    #[arg(long, conflicts_with = "resume_from")]
    pub init_from: Option<String>,
    /// Replace a field of the file: `--set train.learning_rate=0.01` (repeatable; a relative
    /// path is relative to the current folder; README: Job specs).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub overrides: Vec<flotilla_core::spec::Override>,
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

/// `--init-from` as a URI: `file://`, `s3://` as given; a path made absolute (the ranks share
/// this process's folder, but the URI is read by the store layer).
fn init_uri(given: &str) -> anyhow::Result<String> {
    if given.contains("://") {
        return Ok(given.to_string());
    }
    let path = std::path::absolute(given).with_context(|| format!("--init-from {given}"))?;
    Ok(format!("file://{}", path.display()))
}

fn load_spec(args: &Args) -> anyhow::Result<JobSpec> {
    let mut spec = match spec_file::load(&args.spec, &args.overrides) {
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
    if let Some(reference) = &spec.train.init_from {
        bail!(
            "{}: train.init_from = {reference} names a model of a cluster's registry, which `flotilla train` has \
             not: submit the job to the cluster that registered it (`flotilla submit {}`), or download it \
             (`flotilla models download {reference} -f model.safetensors`) and pass --init-from model.safetensors",
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
    if let Some(dir) = &args.checkpoint_dir {
        check_writable(dir)?;
    }
    if let Some(uri) = &args.resume_from {
        check_exists(uri)?;
    }
    if let Some(given) = &args.init_from {
        let uri = init_uri(given)?;
        if let Some(path) = uri.strip_prefix("file://").filter(|p| !std::path::Path::new(p).is_file()) {
            bail!("--init-from {given}: no file at {path} (a model.safetensors, as `flotilla models download` writes)");
        }
    }
    let addresses = free_addresses(args.local_workers)?;
    let gang_id = u64::from(std::process::id()) << 20 | u64::from(addresses[0].port());
    let secret = flotilla_worker::collective::ring::random_secret()?;
    let secret = flotilla_proto::auth::hex(&secret);
    let mut children = Vec::with_capacity(args.local_workers);
    for rank in 0..args.local_workers {
        children.push(spawn_rank(&args, rank, &addresses, gang_id, &secret, output)?);
    }
    // SIGINT/SIGTERM: every rank is told (a terminal's Ctrl-C reaches them anyway), the gang
    // stops in order after a checkpoint, and this process waits for all of them.
    let interrupted = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the signal handler")?;
    let pids: Vec<Pid> = children.iter().map(|c| Pid::from_raw(c.id() as i32)).collect();
    let flag = interrupted.clone();
    runtime.spawn(async move {
        interrupted_by_signal().await;
        flag.store(true, Ordering::Relaxed);
        for pid in pids {
            let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        }
    });
    wait_all(children, &interrupted)
}

/// Checks that `--checkpoint-dir` takes writes (a probe object, deleted again) before any rank
/// starts: a folder that cannot be written is one clear error now, not a run whose every
/// checkpoint and model fail in warnings.
fn check_writable(dir: &str) -> anyhow::Result<()> {
    let cannot = || format!("--checkpoint-dir {dir}: checkpoints and the model cannot be written there");
    let location = flotilla_store::open(dir).with_context(cannot)?;
    flotilla_store::block_on(flotilla_store::probe(&location, flotilla_store::Access::Write))
        .and_then(|probed| probed)
        .with_context(cannot)
}

/// Checks that `--resume-from` names something (a typo'd or missing folder is "no checkpoint
/// there", not a partial checkpoint); whether it is whole is the rank's load to say.
fn check_exists(uri: &str) -> anyhow::Result<()> {
    let location = flotilla_store::open(uri).with_context(|| format!("--resume-from {uri}"))?;
    let found = flotilla_store::block_on(flotilla_store::list(&location, location.prefix()))
        .and_then(|listed| listed)
        .with_context(|| format!("--resume-from {uri}"))?;
    if found.is_empty() {
        bail!(
            "--resume-from {uri}: no checkpoint there (nothing at {}); give a checkpoint folder as a run with \
             --checkpoint-dir prints it, <dir>/ckpt/<step>",
            location.uri()
        );
    }
    Ok(())
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
    let flags = [
        ("--checkpoint-dir", &args.checkpoint_dir),
        ("--resume-from", &args.resume_from),
        ("--init-from", &args.init_from),
    ];
    for (flag, value) in flags {
        if let Some(value) = value {
            command.args([flag, value]);
        }
    }
    if let Some(steps) = args.steps {
        command.args(["--steps", &steps.to_string()]);
    }
    for given in &args.overrides {
        command.args(["--set", &given.to_string()]);
    }
    // The gang secret goes in the environment (not the command line, which `ps` shows).
    command.env(GANG_SECRET_ENV, secret_hex);
    command.stdin(Stdio::null()).stdout(if rank == 0 { Stdio::inherit() } else { Stdio::null() });
    command.spawn().with_context(|| format!("cannot start rank {rank}"))
}

/// Waits for every rank; when one fails, stops the others and reports the first failure. After
/// an interrupt every rank is waited for (rank 0 may still be saving the last checkpoint).
fn wait_all(mut children: Vec<Child>, interrupted: &AtomicBool) -> anyhow::Result<()> {
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
        if failed.is_some() && !interrupted.load(Ordering::Relaxed) {
            for &rank in &running {
                let _ = children[rank].kill();
                let _ = children[rank].wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match failed {
        Some(_) if interrupted.load(Ordering::Relaxed) => bail!("training interrupted (see above)"),
        Some(reason) => bail!("training failed: {reason} (see its error above)"),
        None => Ok(()),
    }
}

/// One rank: the agent's rank runner ([`work::run_rank`]) with no coordinator. Rank 0
/// checkpoints in the background like a cluster's rank 0, prints progress, evaluates, exports
/// the model (with --checkpoint-dir) and prints the summary. SIGINT/SIGTERM stop the gang in
/// order after a checkpoint.
pub fn run_rank(args: RankArgs, output: OutputFormat) -> anyhow::Result<()> {
    let spec = load_spec(&args.job)?;
    let world = args.addresses.len();
    if args.rank >= world {
        bail!("--rank {} is outside the {world} addresses", args.rank);
    }
    let listener = TcpListener::bind(args.addresses[args.rank]).context("binding this rank's ring address")?;
    let port = flotilla_worker::collective::port::DataPort::start(listener, None)
        .context("serving this rank's ring address")?;
    let gang_secret = std::env::var(GANG_SECRET_ENV)
        .ok()
        .and_then(|hex| {
            (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect()
        })
        .with_context(|| format!("{GANG_SECRET_ENV} must hold the gang secret in hex (`flotilla train` sets it)"))?;
    let peers = args
        .addresses
        .iter()
        .enumerate()
        .map(|(rank, address)| Peer {
            rank: rank as u32,
            worker_id: format!("rank-{rank}"),
            data_addr: address.to_string(),
        })
        .collect();
    let resume_from = args.job.resume_from.clone().map(|uri| CheckpointRef {
        step: step_of_prefix(&uri).unwrap_or(0),
        uri,
        ..Default::default()
    });
    let assignment = TrainAssignment {
        job_id: format!("train-{}", args.gang_id),
        spec: Some(spec_to_proto(&spec)),
        generation: 1,
        rank: args.rank as u32,
        world_size: world as u32,
        peers,
        resume_from,
        init_uri: args.job.init_from.as_deref().map(init_uri).transpose()?.unwrap_or_default(),
        job_prefix: args.job.checkpoint_dir.clone().unwrap_or_default(),
        gang_secret,
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the I/O runtime")?;
    let record = Arc::new(Standalone { newest: Mutex::new(None), notes_to_stdout: output == OutputFormat::Text });
    let shared = Arc::new(AgentShared::default());
    let context = RankContext {
        host: Host::Standalone(record.clone()),
        stop: Arc::default(),
        abort: Arc::default(),
        checkpoint_now: Arc::default(),
        deadline_unix_ms: Arc::default(),
        handover_to: Arc::default(),
        live_to: Arc::default(),
        shared: shared.clone(),
    };
    runtime.spawn(async move {
        interrupted_by_signal().await;
        shared.interrupted.store(true, Ordering::Relaxed);
    });
    // Progress reports are for a coordinator; rank 0's notes already print them.
    let (progress, mut reports) = tokio::sync::mpsc::channel(1);
    runtime.spawn(async move { while reports.recv().await.is_some() {} });
    let started = Instant::now();
    let end = work::run_rank(&context, assignment, &port, &progress, runtime.handle());
    let newest = record.newest.lock().ok().and_then(|n| n.clone());
    match end {
        RankEnd::Finished(None) => Ok(()),
        RankEnd::Finished(Some(report)) => {
            // Only a checkpoint of the final step is the run's checkpoint.
            let last = newest.filter(|c| c.step == report.step).map(|c| c.uri);
            summarize(&report, world, last.clone(), started, output);
            match &args.job.checkpoint_dir {
                Some(dir) => unwritten(report.step, dir, last.is_some(), !report.artifact_uri.is_empty()),
                None => Ok(()),
            }
        }
        RankEnd::Checkpointed { step, .. } => match (args.rank, newest.map(|c| c.uri)) {
            (0, Some(uri)) => bail!("interrupted: stopped at step {step}; continue with `--resume-from {uri}`"),
            (0, None) => bail!("interrupted: stopped at step {step}, nothing saved (no --checkpoint-dir)"),
            _ => Ok(()), // rank 0 says where it stopped
        },
        RankEnd::Superseded => bail!("rank {} was stopped", args.rank),
        // A standalone rank is never told to hand over live.
        RankEnd::HandedOver { step } => bail!("rank {} was handed over after step {step}", args.rank),
        RankEnd::Broken { error, .. } => bail!("{error}"),
        // Only a cluster's survivor announces what it holds; nothing to write here.
        RankEnd::PeerLost { error, write, .. } => {
            write(false);
            bail!("{error}")
        }
    }
}

/// The error of a run with `--checkpoint-dir dir` that finished at `step` without writing its
/// final checkpoint or its model there (the disk filled, the folder went away): the training is
/// done, but what the user asked to keep is not, so the run fails (pure).
fn unwritten(step: u64, dir: &str, checkpoint: bool, model: bool) -> anyhow::Result<()> {
    let missing = match (checkpoint, model) {
        (true, true) => return Ok(()),
        (false, true) => "the final checkpoint",
        (true, false) => "the model",
        (false, false) => "the final checkpoint and the model",
    };
    bail!(
        "training finished at step {step}, but {missing} could not be written to --checkpoint-dir {dir} (the warnings above say why)"
    )
}

/// Resolves on SIGINT or SIGTERM (never, where the handlers cannot be installed).
async fn interrupted_by_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// The step of a checkpoint prefix named `.../ckpt/<step>[-<suffix>]`, for messages.
fn step_of_prefix(uri: &str) -> Option<u64> {
    let name = uri.trim_end_matches('/').rsplit('/').next()?;
    name.split('-').next()?.parse().ok()
}

/// Rank 0's summary: a text line (and the checkpoint and model), or one JSON object on the last
/// line of stdout.
fn summarize(
    report: &FinishedReport,
    world: usize,
    checkpoint: Option<String>,
    started: Instant,
    output: OutputFormat,
) {
    let metrics = report.metrics.unwrap_or_default();
    let model = (!report.artifact_uri.is_empty()).then_some(report.artifact_uri.as_str());
    let summary = json!({
        "step": report.step,
        "total_steps": report.step,
        "world_size": world,
        "seconds": started.elapsed().as_secs_f64(),
        "metrics": {
            "val_accuracy": metrics.val_accuracy,
            "val_loss": metrics.val_loss,
            "train_loss": metrics.train_loss,
            "samples_per_s": metrics.samples_per_s,
        },
        // The step of the state that is the model when not the last (train.keep_best).
        "model_step": if metrics.val_step > 0 { metrics.val_step } else { report.step },
        "checkpoint": checkpoint,
        "model": model,
    });
    match output {
        OutputFormat::Json => println!("{summary}"),
        OutputFormat::Text => {
            let shown = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
            println!(
                "done: step {} on {world} worker(s), val_accuracy {}, val_loss {}",
                report.step,
                shown(metrics.val_accuracy),
                shown(metrics.val_loss)
            );
            if let Some(uri) = &checkpoint {
                println!("checkpoint: {uri}");
            }
            if let Some(uri) = model {
                match metrics.val_step {
                    0 => println!("model: {uri}"),
                    step => println!("model: {uri} (the best validated state, step {step})"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{step_of_prefix, unwritten};

    #[test]
    fn checkpoint_prefixes_name_their_step() {
        assert_eq!(step_of_prefix("/tmp/c/ckpt/000000000100"), Some(100));
        assert_eq!(step_of_prefix("s3://b/jobs/job-1/ckpt/000000000042-g3/"), Some(42));
        assert_eq!(step_of_prefix("/tmp/c/ckpt/latest"), None);
    }

    #[test]
    fn a_run_fails_when_its_final_checkpoint_or_model_was_not_written() {
        assert!(unwritten(90, "/c", true, true).is_ok());
        let error = |checkpoint, model| unwritten(90, "/c", checkpoint, model).expect_err("fails").to_string();
        assert!(error(false, true).contains("but the final checkpoint could not be written to --checkpoint-dir /c"));
        assert!(error(true, false).contains("but the model could not"));
        assert!(error(false, false).contains("the final checkpoint and the model"));
        assert!(error(false, false).starts_with("training finished at step 90"));
    }
}
