//! Output conventions shared by every subcommand: `--output text|json`.
//!
//! Text is for people and may change; JSON is a contract for scripts (DESIGN §8): one object
//! (or one array) per invocation, on stdout, keys stable.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Prints a JSON value on one line of stdout.
pub fn print_json(value: &serde_json::Value) {
    println!("{value}");
}
