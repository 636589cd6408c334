//! `flotilla validate JOB.toml`: parse, validate and print the normalised spec.
//!
//! Exit status 0 when valid; 1 with every problem listed (each naming its field) otherwise.

use std::path::PathBuf;
use std::process::ExitCode;

use flotilla_core::spec::{Override, SpecError};
use serde_json::json;

use super::spec_file::{self, LoadError};
use crate::output::{OutputFormat, print_json};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Path to the job spec (TOML). Relative data paths are resolved against its folder.
    pub spec: PathBuf,
    /// Replace a field of the file: `--set train.learning_rate=0.01` (repeatable; README: Job specs).
    #[arg(long = "set", value_name = "FIELD=VALUE")]
    pub overrides: Vec<Override>,
}

pub fn run(args: Args, output: OutputFormat) -> anyhow::Result<ExitCode> {
    match spec_file::load(&args.spec, &args.overrides) {
        Ok(spec) => {
            match output {
                OutputFormat::Text => print!("{}", spec.to_toml()),
                OutputFormat::Json => print_json(&json!({ "valid": true, "spec": spec })),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(LoadError::Io(err)) => Err(err),
        Err(LoadError::Spec(err)) => {
            if output == OutputFormat::Json {
                print_json(&json!({ "valid": false, "errors": error_list(&err) }));
            }
            eprintln!("error: {}: {err}", args.spec.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

fn error_list(err: &SpecError) -> Vec<serde_json::Value> {
    match err {
        SpecError::Syntax(message) => vec![json!({ "field": null, "message": message })],
        SpecError::Invalid(errors) => {
            errors.iter().map(|e| json!({ "field": e.field, "message": e.message })).collect()
        }
    }
}
