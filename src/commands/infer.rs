//! `flotilla infer`: batch inference with a registered model over a CSV file, on the cluster's
//! workers. Follows the job until it ends (unless `--detach`) and prints its summary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use flotilla_core::spec::uri::join_lexically;
use flotilla_proto::client::ApiClient;
use flotilla_proto::convert::job_state_name;
use flotilla_proto::v1::{self, GetJobRequest, SubmitInferenceRequest};
use serde_json::{Value, json};

use crate::cluster_file;
use crate::output::{OutputFormat, print_json};

/// How often `infer` polls the job while following it.
const FOLLOW_EVERY: Duration = Duration::from_millis(300);

#[derive(Debug, clap::Args)]
pub struct InferArgs {
    /// The model: NAME (newest version), NAME@VERSION or NAME@ALIAS.
    #[arg(long)]
    pub model: String,
    /// A CSV file (gzip or not): one row per line with the model's features, optionally
    /// preceded by the label (then the summary reports accuracy). A path, or a file:// or
    /// s3:// URI (read by the coordinator).
    #[arg(long)]
    pub input: String,
    /// A new (or empty) folder for part-*.csv, _SUMMARY.json and _SUCCESS. A path, or a
    /// file:// or s3:// URI. (`--output` is every command's output format, text or json.)
    #[arg(long = "output-prefix", value_name = "URI")]
    pub destination: String,
    /// Workers used at most.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// Rows per forward pass (default 256).
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Rows per shard, the unit of work a worker leases (default: about 4 shards per worker,
    /// at most 50,000 rows each).
    #[arg(long)]
    pub shard_rows: Option<u64>,
    /// Print the job id and return without following it.
    #[arg(long)]
    pub detach: bool,
}

/// `file://` + the absolute form of a local path; other URIs as they are.
fn absolute_uri(text: &str, must_exist: bool) -> anyhow::Result<String> {
    if text.contains("://") {
        return Ok(text.trim_end_matches('/').to_string());
    }
    let path = Path::new(text);
    let absolute: PathBuf = if must_exist {
        std::fs::canonicalize(path).with_context(|| format!("--input {text}"))?
    } else {
        // Resolved by name (`out/../preds` is `preds`): the coordinators refuse a path with `..`.
        let base = std::env::current_dir().context("the current directory")?;
        let base = base.to_str().context("the current directory is not valid UTF-8")?;
        PathBuf::from(if text.starts_with('/') { join_lexically("/", text) } else { join_lexically(base, text) })
    };
    Ok(format!("file://{}", absolute.display()))
}

pub fn run(args: InferArgs, coordinator: Option<&str>, output: OutputFormat) -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    let _context = runtime.enter();
    let target = cluster_file::resolve(coordinator)?;
    let mut client = target.client()?;
    let request = SubmitInferenceRequest {
        model: args.model.clone(),
        input_uri: absolute_uri(&args.input, true)?,
        output_uri: absolute_uri(&args.destination, false)?,
        workers: args.workers,
        batch_size: args.batch_size.unwrap_or(0), // 0: the coordinator's default
        client_request_id: cluster_file::random_hex(16)?,
        shard_rows: args.shard_rows.unwrap_or(0),
    };
    let submitted = runtime.block_on(client.call_inference(|mut c| {
        let request = request.clone();
        async move { c.submit_inference(request).await }
    }))?;
    if args.detach {
        match output {
            OutputFormat::Json => print_json(&json!({ "id": submitted.job_id, "served_by": submitted.served_by })),
            OutputFormat::Text => println!("{}", submitted.job_id),
        }
        return Ok(());
    }
    eprintln!("{}: inference with {} over {}", submitted.job_id, args.model, request.input_uri);
    let job = loop {
        let job = runtime.block_on(get(&mut client, &submitted.job_id))?;
        let state = v1::JobState::try_from(job.state).unwrap_or_default();
        eprint!(
            "\r{}: {:<9} shards {}/{}  rows {}/{}  {:.0} rows/s  workers {}   ",
            job.id,
            job_state_name(state),
            job.shards_done,
            job.shards_total,
            job.rows_done,
            job.rows_total,
            job.rows_per_s,
            job.workers.len()
        );
        if matches!(state, v1::JobState::Succeeded | v1::JobState::Failed | v1::JobState::Cancelled) {
            eprintln!();
            break job;
        }
        std::thread::sleep(FOLLOW_EVERY);
    };
    print(&job, output);
    if job.state != v1::JobState::Succeeded as i32 {
        anyhow::bail!("{} ended {}: {}", job.id, state_name(&job), job.reason);
    }
    Ok(())
}

async fn get(client: &mut ApiClient, job_id: &str) -> anyhow::Result<v1::InferenceStatus> {
    let request = GetJobRequest { job_id: job_id.to_string() };
    Ok(client
        .call_inference(|mut c| {
            let request = request.clone();
            async move { c.get_inference(request).await }
        })
        .await?)
}

fn state_name(job: &v1::InferenceStatus) -> &'static str {
    v1::JobState::try_from(job.state).map_or("Unknown", job_state_name)
}

/// The `--output json` object of an inference job.
pub fn inference_json(job: &v1::InferenceStatus) -> Value {
    json!({
        "id": job.id,
        "kind": "inference",
        "state": state_name(job),
        "reason": job.reason,
        "model": job.model,
        "model_version": job.model_version,
        "input": job.input_uri,
        "output": job.output_uri,
        "rows_total": job.rows_total,
        "rows_done": job.rows_done,
        "labelled": job.labelled,
        "accuracy": job.accuracy,
        "shards_total": job.shards_total,
        "shards_done": job.shards_done,
        "shard_retries": job.retries,
        "rows_per_s": job.rows_per_s,
        "elapsed_ms": job.elapsed_ms,
        "workers_max": job.workers_max,
        "workers": job.workers,
        "leases": job.leases.iter().map(|l| json!({"shard": l.index, "worker": l.worker_id, "attempt": l.attempt})).collect::<Vec<_>>(),
        "class_counts": job.class_counts,
        "served_by": job.served_by,
        "events": job.events.iter().map(super::jobs::event_json).collect::<Vec<_>>(),
    })
}

/// Prints one inference job (what `status` shows for an inference id).
pub fn print(job: &v1::InferenceStatus, output: OutputFormat) {
    match output {
        OutputFormat::Json => print_json(&inference_json(job)),
        OutputFormat::Text => {
            let accuracy = job.accuracy.map_or("-".to_string(), |a| format!("{a:.4}"));
            println!(
                "{} (inference) {}{}",
                job.id,
                state_name(job),
                if job.reason.is_empty() { String::new() } else { format!(": {}", job.reason) }
            );
            println!("  model      {}@{}", job.model, job.model_version);
            println!(
                "  input      {} ({} rows{})",
                job.input_uri,
                job.rows_total,
                if job.labelled { ", labelled" } else { "" }
            );
            println!("  output     {}", job.output_uri);
            println!(
                "  progress   {}/{} shards, {} rows, {:.0} rows/s, {} retried",
                job.shards_done, job.shards_total, job.rows_done, job.rows_per_s, job.retries
            );
            println!("  accuracy   {accuracy}");
            println!("  classes    {:?}", job.class_counts);
            for event in &job.events {
                println!("  event      {}: {}", event.kind, event.message);
            }
        }
    }
}

/// The inference jobs under `flotilla status` (text), newest first; nothing when there are none.
pub fn print_table(jobs: &[v1::InferenceStatus]) {
    if jobs.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<10} {:<10} {:<28} {:>13} {:>10} {:>9}  REASON",
        "INFERENCE", "STATE", "MODEL", "SHARDS", "ROWS/S", "ACCURACY"
    );
    for job in jobs {
        let accuracy = job.accuracy.map_or("-".to_string(), |a| format!("{a:.4}"));
        println!(
            "{:<10} {:<10} {:<28} {:>13} {:>10.0} {:>9}  {}",
            job.id,
            state_name(job),
            format!("{}@{}", job.model, job.model_version),
            format!("{}/{}", job.shards_done, job.shards_total),
            job.rows_per_s,
            accuracy,
            job.reason
        );
    }
}

/// `flotilla status ID` for an id that is not a training job: the inference job, if it is one.
pub fn status(
    client: &mut ApiClient,
    runtime: &tokio::runtime::Runtime,
    job_id: &str,
    output: OutputFormat,
) -> anyhow::Result<()> {
    let job = runtime.block_on(get(client, job_id))?;
    print(&job, output);
    Ok(())
}
