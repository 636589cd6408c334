//! `flotilla bench-infer` (hidden): the in-process baseline of `scripts/bench/infer.sh`.
//!
//! Loads a registered model (from the local cluster's store) and an input file the way an
//! inference worker does, then predicts every row in one process with no leases, commits or
//! output files, and prints one JSON line: parse and predict times and rows/s. The cluster's
//! rows/s per worker divided by this is the distributed path's efficiency.

use std::time::Instant;

use anyhow::Context;
use flotilla_proto::v1;
use flotilla_worker::data::store;
use flotilla_worker::infer::{InputText, Predictor, run_shard};
use serde_json::json;

use crate::cluster_file;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The registered model (NAME, NAME@VERSION, NAME@ALIAS).
    #[arg(long)]
    pub model: String,
    /// A local CSV file (the same one given to `flotilla infer`).
    #[arg(long)]
    pub input: std::path::PathBuf,
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
}

pub fn run(args: Args, coordinator: Option<&str>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("async runtime")?;
    let version = {
        let _context = runtime.enter();
        let target = cluster_file::resolve(coordinator)?;
        let mut client = target.client()?;
        let request = v1::GetModelRequest { reference: args.model.clone() };
        runtime.block_on(client.call_registry(|mut c| {
            let request = request.clone();
            async move { c.get_model(request).await }
        }))?
    };
    drop(runtime); // the store reader runs its own runtime
    let model = version
        .spec
        .and_then(|s| s.model)
        .and_then(flotilla_proto::convert::model_from_proto)
        .context("the version has no model spec")?;
    let artifact =
        store::fetch(&version.artifact_uri.parse().map_err(|e: flotilla_proto::spec::UriError| anyhow::anyhow!(e.0))?)?;
    let (features, classes) = (version.features_per_row as usize, version.classes as usize);
    let predictor = Predictor::load(&model, features, classes, version.feature_scale, &artifact)?;
    let started = Instant::now();
    let bytes = std::fs::read(&args.input).with_context(|| format!("{}", args.input.display()))?;
    let text = InputText::index(&args.input.display().to_string(), &bytes)?;
    let input = text.shard(0, text.rows(), features)?;
    let parse_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let output = run_shard(&predictor, &input, 0, args.batch_size)?;
    let predict_s = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "bench": "infer_in_process",
            "rows": input.rows,
            "batch_size": args.batch_size,
            "parse_s": parse_s,
            "predict_s": predict_s,
            "rows_per_s": input.rows as f64 / (parse_s + predict_s),
            "predict_rows_per_s": input.rows as f64 / predict_s,
            "accuracy": (output.labelled_rows > 0).then(|| output.correct as f64 / output.labelled_rows as f64),
        })
    );
    Ok(())
}
