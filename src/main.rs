//! `flotilla`: the one binary that plays every role (CLI client, coordinator, worker).
//!
//! This file only declares the command line and dispatches; each subcommand lives in
//! `commands/` and does its I/O there. Subcommands appear here only once they really work.

mod cluster_file;
mod commands;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::output::OutputFormat;

/// Train models on fleets of cheap spot machines without losing work when they are taken back.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Output format: human-readable text, or JSON for scripts.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,

    /// Coordinator address(es), host:port[,host:port]; default: FLOTILLA_COORDINATOR, then
    /// $FLOTILLA_HOME/cluster.toml or ./.flotilla/cluster.toml.
    #[arg(long, global = true)]
    coordinator: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a local cluster in the background (data and cluster.toml under ./.flotilla).
    Up(commands::cluster::UpArgs),
    /// Stop the local cluster started by `up` (its data is kept unless --purge).
    Down(commands::cluster::DownArgs),
    /// Submit a job; prints the job id on the last line.
    Submit(commands::jobs::SubmitArgs),
    /// Show one job, or every job.
    Status(commands::jobs::StatusArgs),
    /// Cancel jobs that have not finished.
    Cancel(commands::jobs::CancelArgs),
    /// Resume a Failed or Cancelled job from its newest checkpoint (--set raises its budget, lengthens it ...).
    Resume(commands::jobs::ResumeArgs),
    /// Print a job's log (written by its rank 0); -f follows it until the job ends.
    Logs(commands::jobs::LogsArgs),
    /// A job's metrics history: its loss curve by step, and the final validation metrics.
    History(commands::history::Args),
    /// Print the web dashboard's address (with the API token in its fragment).
    Dashboard(commands::dashboard::Args),
    /// The live workers, with their state and job (--all: the lost and left too).
    Workers(commands::workers::ListArgs),
    /// Instances the autoscaler bought, with their prices and costs (--all: terminated too).
    Instances(commands::workers::InstancesArgs),
    /// The model registry: list, show, alias, download trained models.
    #[command(subcommand)]
    Models(commands::models::ModelsCommand),
    /// Batch inference: predict a CSV file with a registered model on the cluster's workers.
    Infer(commands::infer::InferArgs),
    /// Run a worker agent on this machine (registers with the cluster and keeps its lease).
    Worker(commands::workers::WorkerArgs),
    /// Give a local worker a spot interruption notice now (--hard: kill it without notice; --rebalance: a rebalance recommendation).
    Preempt(commands::workers::PreemptArgs),
    /// A local instance-metadata endpoint (IMDSv2), started by the local provider.
    #[command(hide = true)]
    Imds(commands::workers::ImdsArgs),
    /// Check a job spec and print it normalised, with every default filled in.
    Validate(commands::validate::Args),
    /// Train a job standalone on this machine with N local worker processes.
    Train(commands::train::Args),
    /// One rank of `flotilla train` (started by it).
    #[command(hide = true)]
    TrainRank(commands::train::RankArgs),
    /// The cluster CA and its certificates, for TLS across machines (`up` makes its own).
    #[command(subcommand)]
    Certs(commands::certs::CertsCommand),
    /// Run one coordinator node in the foreground (what `up` starts).
    Coordinator(Box<commands::coordinator::Args>),
    /// Load generator for scripts/bench/coordinator.sh.
    #[command(hide = true)]
    BenchSubmit(commands::bench::Args),
    /// Submit-to-first-step latency for scripts/bench/first_step.sh.
    #[command(hide = true)]
    BenchFirstStep(commands::bench::FirstStepArgs),
    /// All-reduce bandwidth benchmark for scripts/bench/allreduce.sh.
    #[command(hide = true)]
    BenchAllreduce(commands::bench_collective::Args),
    /// Training throughput benchmark for scripts/bench/train.sh.
    #[command(hide = true)]
    BenchTrain(commands::bench_train::Args),
    /// Live handover benchmark (the survivors' stall at the swap) for scripts/bench/live_handover.sh.
    #[command(hide = true)]
    BenchLiveHandover(commands::bench_live_handover::Args),
    /// Gang-scheduler placement benchmark for scripts/bench/scheduler.sh.
    #[command(hide = true)]
    BenchScheduler(commands::bench_scheduler::Args),
    /// In-process inference baseline for scripts/bench/infer.sh.
    #[command(hide = true)]
    BenchInfer(commands::bench_infer::Args),
    /// GPU probe, NCCL all-reduce and GPU-vs-CPU step benchmark for scripts/gpu_check.sh.
    #[command(hide = true)]
    BenchGpu(commands::bench_gpu::Args),
    /// Spot cost simulation for scripts/bench/spot_cost.sh.
    #[command(hide = true)]
    BenchSpotCost(commands::bench_spot::Args),
    /// Checkpoint write/read throughput to a store for scripts/bench/checkpoint.sh.
    #[command(hide = true)]
    BenchCheckpoint(commands::bench_checkpoint::Args),
}

impl Command {
    /// A command that prints for a person or a script and ends: piped into `head`, it should
    /// end quietly when the reader goes away. Not the long-running roles (coordinator, worker
    /// agent, metadata endpoint) nor `train`, whose ranks share its output: they write to
    /// sockets and pipes where a reader gone is an error they handle.
    fn prints_and_ends(&self) -> bool {
        matches!(
            self,
            Command::Up(_)
                | Command::Down(_)
                | Command::Submit(_)
                | Command::Status(_)
                | Command::Cancel(_)
                | Command::Resume(_)
                | Command::Logs(_)
                | Command::History(_)
                | Command::Dashboard(_)
                | Command::Workers(_)
                | Command::Instances(_)
                | Command::Models(_)
                | Command::Infer(_)
                | Command::Preempt(_)
                | Command::Validate(_)
                | Command::Certs(_)
        )
    }
}

/// Restores the default action of SIGPIPE, ending the process without a word when its output's
/// reader has gone (as `ls | head` does), instead of panicking in `println!` with a backtrace:
/// Rust ignores SIGPIPE by default.
#[allow(unsafe_code)]
fn end_quietly_when_the_reader_goes() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called first in `main`, before any other thread exists, and SIG_DFL installs no
    // handler code at all.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.command.prints_and_ends() {
        end_quietly_when_the_reader_goes();
    }
    init_logging();
    let coordinator = cli.coordinator.as_deref();
    let done = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    let result = match cli.command {
        Command::Up(args) => done(commands::cluster::up(args, cli.output)),
        Command::Down(args) => done(commands::cluster::down(args, cli.output)),
        Command::Submit(args) => done(commands::jobs::submit(args, coordinator, cli.output)),
        Command::Status(args) => done(commands::jobs::status(args, coordinator, cli.output)),
        Command::Cancel(args) => done(commands::jobs::cancel(args, coordinator, cli.output)),
        Command::Resume(args) => done(commands::jobs::resume(args, coordinator, cli.output)),
        Command::Logs(args) => done(commands::jobs::logs(args, coordinator, cli.output)),
        Command::History(args) => done(commands::history::run(args, coordinator, cli.output)),
        Command::Dashboard(args) => done(commands::dashboard::run(args, cli.output)),
        Command::Workers(args) => done(commands::workers::list(args, coordinator, cli.output)),
        Command::Instances(args) => done(commands::workers::instances(args, coordinator, cli.output)),
        Command::Models(command) => done(commands::models::run(command, coordinator, cli.output)),
        Command::Infer(args) => done(commands::infer::run(args, coordinator, cli.output)),
        Command::Worker(args) => done(commands::workers::run_agent(args, coordinator)),
        Command::Preempt(args) => done(commands::workers::preempt(args, coordinator, cli.output)),
        Command::Imds(args) => done(commands::workers::run_imds(args)),
        Command::Validate(args) => commands::validate::run(args, cli.output),
        Command::Train(args) => done(commands::train::run(args, cli.output)),
        Command::TrainRank(args) => done(commands::train::run_rank(args, cli.output)),
        Command::Certs(command) => done(commands::certs::run(command)),
        Command::Coordinator(args) => done(commands::coordinator::run(*args)),
        Command::BenchSubmit(args) => done(commands::bench::run(args, coordinator)),
        Command::BenchFirstStep(args) => done(commands::bench::first_step(args, coordinator)),
        Command::BenchAllreduce(args) => done(commands::bench_collective::run(args)),
        Command::BenchCheckpoint(args) => done(commands::bench_checkpoint::run(args)),
        Command::BenchTrain(args) => done(commands::bench_train::run(args)),
        Command::BenchLiveHandover(args) => done(commands::bench_live_handover::run(args)),
        Command::BenchScheduler(args) => done(commands::bench_scheduler::run(args)),
        Command::BenchInfer(args) => done(commands::bench_infer::run(args, coordinator)),
        Command::BenchSpotCost(args) => done(commands::bench_spot::run(args)),
        Command::BenchGpu(args) => commands::bench_gpu::run(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", flotilla_core::text::error_chain(err.chain()));
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, filtered by `RUST_LOG` (default: info for flotilla, warn otherwise).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,flotilla=info,flotilla_coordinator=info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words of one shell command line as `sh` splits them (quotes and backslashes), up to
    /// a comment or an operator (`|`, `&`, `&&`, `;`, `>`) that ends the command.
    fn shell_words(line: &str) -> Vec<String> {
        let (mut words, mut word, mut quote, mut started) = (Vec::new(), String::new(), None, false);
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some('"'), '\\') => word.extend(chars.next()),
                (Some(_), c) => word.push(c),
                (None, '\'' | '"') => (quote, started) = (Some(c), true),
                (None, '\\') => (word.extend(chars.next()), started = true).1,
                (None, '#' | '|' | '&' | ';' | '>') if !started => break,
                (None, c) if c.is_whitespace() => {
                    if started {
                        words.push(std::mem::take(&mut word));
                    }
                    started = false;
                }
                (None, c) => (word.push(c), started = true).1,
            }
        }
        if started {
            words.push(word);
        }
        words
    }

    /// Every `flotilla ...` command in the docs' code blocks (`$ ` prompts and `\` continuations
    /// included), with its file and line.
    fn documented_commands(file: &str, text: &str) -> Vec<(String, Vec<String>)> {
        let (mut found, mut in_code, mut pending): (Vec<_>, bool, Option<(usize, String)>) = (Vec::new(), false, None);
        for (number, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
                continue;
            }
            if !in_code {
                continue;
            }
            let line = line.trim();
            let (at, command) = match pending.take() {
                Some((at, before)) => (at, format!("{before} {line}")),
                None => {
                    let line = line.strip_prefix("$ ").unwrap_or(line);
                    if !line.starts_with("flotilla ") {
                        continue;
                    }
                    (number + 1, line.to_string())
                }
            };
            match command.strip_suffix('\\') {
                Some(continued) => pending = Some((at, continued.to_string())),
                None => found.push((format!("{file}:{at}"), shell_words(&command))),
            }
        }
        found
    }

    #[test]
    fn shell_words_split_as_sh_does() {
        assert_eq!(shell_words("flotilla a 'b c' \"d\\\"e\" f\\ g # h"), ["flotilla", "a", "b c", "d\"e", "f g"]);
        assert_eq!(shell_words("flotilla status -o json | jq ."), ["flotilla", "status", "-o", "json"]);
        assert_eq!(shell_words("flotilla worker &"), ["flotilla", "worker"]);
        assert_eq!(shell_words("flotilla x --set 'a=[1,2]' a#b"), ["flotilla", "x", "--set", "a=[1,2]", "a#b"]);
    }

    /// Every command the README and the Terraform guide show parses with this binary's command
    /// line: a renamed or removed flag fails here, not in a user's shell.
    #[test]
    fn every_documented_command_parses() {
        let root = env!("CARGO_MANIFEST_DIR");
        let mut commands = Vec::new();
        for file in ["README.md", "terraform/README.md", "scripts/bench/README.md"] {
            let text = std::fs::read_to_string(format!("{root}/{file}")).expect("the doc exists");
            commands.extend(documented_commands(file, &text));
        }
        assert!(commands.len() >= 45, "the docs show the CLI: {} commands found", commands.len());
        // A flag the environment may give (`FLOTILLA_TOKEN`): the docs say so beside the command.
        let cli = <Cli as clap::CommandFactory>::command();
        let from_env: Vec<String> = cli
            .get_subcommands()
            .flat_map(|c| c.get_arguments())
            .filter(|a| a.get_env().is_some())
            .filter_map(|a| a.get_long().map(|long| format!("--{long}")))
            .collect();
        let missing_from_env = |e: &clap::Error| {
            let missing = e.get(clap::error::ContextKind::InvalidArg);
            matches!(missing, Some(clap::error::ContextValue::Strings(args))
                if args.iter().all(|a| from_env.iter().any(|f| a.split(' ').next() == Some(f.as_str()))))
        };
        let refused: Vec<String> = commands
            .iter()
            .filter_map(|(at, words)| match Cli::try_parse_from(words) {
                Ok(_) => None,
                Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => None,
                Err(e) if e.kind() == clap::error::ErrorKind::MissingRequiredArgument && missing_from_env(&e) => None,
                Err(e) => Some(format!("{at}: {}\n{}", words.join(" "), e.render())),
            })
            .collect();
        assert!(refused.is_empty(), "documented commands the CLI refuses:\n{}", refused.join("\n"));
    }
}
