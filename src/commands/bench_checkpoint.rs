//! `flotilla bench-checkpoint` (hidden): checkpoint write and read throughput to a store, for
//! `scripts/bench/checkpoint.sh`.
//!
//! Saves a training state of `--params` parameters with Adam's two moments (12 bytes per
//! parameter: model + optimizer parts, plus a manifest) through the same [`Checkpointer`] the
//! trainer uses, `--repeats` times, then loads each back verified, and prints one JSON line with
//! the median write and read rates. What it wrote is deleted at the end.

use std::time::Instant;

use anyhow::{Context, bail};
use flotilla_worker::checkpoint::state::{Checkpointer, load_uri};
use flotilla_worker::data::Cursor;
use flotilla_worker::train::{OptimizerState, TRAIN_STATE_FORMAT_VERSION, TrainState};
use serde_json::json;

/// Parameters at most (16 GiB of checkpoint): bounds the benchmark's memory.
const PARAMS_MAX: usize = 1 << 30;
/// Repeats at most.
const REPEATS_MAX: usize = 100;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write: a local folder, file:///dir or s3://bucket/prefix (AWS settings from the
    /// environment). A run writes under `<store>/bench-<pid>/` and removes it.
    #[arg(long)]
    pub store: String,
    /// Parameters of the model (the checkpoint is 12 bytes per parameter with Adam).
    #[arg(long, default_value_t = 2_000_000)]
    pub params: usize,
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.params == 0 || args.params > PARAMS_MAX || args.repeats == 0 || args.repeats > REPEATS_MAX {
        bail!("--params must be 1 to {PARAMS_MAX} and --repeats 1 to {REPEATS_MAX}");
    }
    let root = format!("{}/bench-{}", args.store.trim_end_matches('/'), std::process::id());
    let checkpointer = Checkpointer::open(&root).context("opening the store")?;
    let values = |seed: f32| (0..args.params).map(|i| (i as f32 * 1e-6 + seed).sin()).collect::<Vec<f32>>();
    let mut state = TrainState {
        format_version: TRAIN_STATE_FORMAT_VERSION,
        step: 0,
        cursor: Cursor::default(),
        params: values(0.1),
        optimizer: OptimizerState::Adam { first_moment: values(0.2), second_moment: values(0.3), updates: 1 },
        layout_fingerprint: 7,
        seed: 1,
        train_rows: 1,
        patience: Default::default(),
        best_params: Vec::new(),
    };
    let (mut writes, mut reads, mut bytes, mut uris) = (Vec::new(), Vec::new(), 0u64, Vec::new());
    for repeat in 0..args.repeats {
        state.step = repeat as u64 + 1;
        let started = Instant::now();
        let (uri, manifest) = checkpointer.save(&state, None).context("saving")?;
        let seconds = started.elapsed().as_secs_f64();
        bytes = manifest.total_bytes();
        writes.push(bytes as f64 / 1e6 / seconds);
        let started = Instant::now();
        let (loaded, _) = load_uri(&uri).context("loading")?;
        reads.push(bytes as f64 / 1e6 / started.elapsed().as_secs_f64());
        if loaded.params != state.params {
            bail!("the checkpoint read back differs from the one written ({uri})");
        }
        uris.push(uri);
    }
    let location = flotilla_store::open(&root)?;
    flotilla_store::block_on(flotilla_store::delete_prefix(&location, location.prefix()))??;
    let scheme = if root.starts_with("s3://") { "s3" } else { "file" };
    println!(
        "{}",
        json!({
            "bench": "checkpoint",
            "store": scheme,
            "checkpoint_bytes": bytes,
            "repeats": args.repeats,
            "write_MBps": median(writes),
            "read_MBps": median(reads),
        })
    );
    Ok(())
}
