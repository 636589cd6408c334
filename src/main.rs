//! `flotilla`: the one binary that plays every role (CLI client, coordinator, worker).
//!
//! This file only declares the command line and dispatches; each subcommand lives in
//! `commands/` and does its I/O there. Subcommands appear here only once they really work.

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

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check a job spec and print it normalised, with every default filled in.
    Validate(commands::validate::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate(args) => commands::validate::run(args, cli.output),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
