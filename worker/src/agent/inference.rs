//! The agent's batch-inference loop: while this worker is a member of an inference job, lease a
//! shard, predict its rows, write the attempt's object, commit it; until no shard is left.
//!
//! ```text
//!   InferAssignment ─▶ thread: LeaseShard ─▶ (first shard: fetch the model, load the input)
//!        ─▶ predict rows first_row..+rows ─▶ put <output>/_attempts/part-NNNNN-aK.csv
//!        ─▶ CommitShard (the first commit of a shard wins) ─▶ LeaseShard ... ─▶ released
//!   a shard that cannot be done ─▶ FailShard (retried elsewhere; the 3rd failure fails the job)
//!   StopJob (cancelled, ended) ─▶ stop before the next shard
//! ```
//!
//! The model and the indexed input are loaded once per job and kept while the worker works on
//! it; a worker that rejoins the same job reuses them.
//!
//! Release and re-join can cross: the coordinator may release this worker (nothing left to
//! lease) and let it join again before the loop has exited. [`LoopControl`] makes that safe:
//! a re-sent assignment for the running loop counts as a re-join, and the loop exits on
//! "released" only if no re-join arrived since it asked, under one lock, so the worker is never
//! a member without a loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::checkpoint::state::write_artifact;
use crate::data::store;
use crate::infer::{InputText, Predictor, run_shard};
use anyhow::Context;
use flotilla_proto::client::ApiClient;
use flotilla_proto::v1::{CommitShardRequest, FailShardRequest, InferAssignment, LeaseShardRequest, Shard};
use flotilla_proto::{ErrorKind, spec::DataUri};

use super::work::AgentShared;

/// Pause before asking again after a failed call (the client already retried within its deadline).
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The model of the job this worker last inferred for, and its whole input once a shard
/// needed it (a job whose shards carry byte ranges never fetches it).
struct Loaded {
    job_id: String,
    predictor: Arc<Predictor>,
    input: Option<Arc<InputText>>,
}

static LOADED: Mutex<Option<Loaded>> = Mutex::new(None);

/// Shared between the agent and one shard loop.
pub struct LoopControl {
    /// Stop before the next shard (the job ended, or this worker re-registered).
    stop: AtomicBool,
    /// (loop running, re-joins seen by the agent).
    state: Mutex<(bool, u64)>,
}

impl LoopControl {
    pub fn start() -> Arc<LoopControl> {
        Arc::new(LoopControl { stop: AtomicBool::new(false), state: Mutex::new((true, 0)) })
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// The coordinator (re-)sent the assignment: true if the running loop takes it (it will
    /// not exit on a release it asked for before now); false if the loop has ended.
    pub fn rejoin(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0 && !self.stop.load(Ordering::Relaxed) {
            state.1 += 1;
            true
        } else {
            false
        }
    }

    fn rejoins(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    /// Released by the coordinator after `seen` re-joins: exit (false) unless one came since.
    fn stay_after_release(&self, seen: u64) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.1 != seen {
            return true;
        }
        state.0 = false;
        false
    }

    fn ended(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0 = false;
    }
}

/// Marks the loop ended however it ends (a panic included).
struct Ended(Arc<LoopControl>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.ended();
    }
}

/// Runs the inference loop for `assignment` on a plain thread (data loading blocks) until the
/// worker is released or `control` stops it.
pub async fn infer_and_commit(
    client: ApiClient,
    worker_id: String,
    assignment: InferAssignment,
    control: Arc<LoopControl>,
    shared: Arc<AgentShared>,
) {
    shared.busy.send_modify(|runs| *runs += 1);
    let runtime = tokio::runtime::Handle::current();
    let job_id = assignment.job_id.clone();
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ended = Ended(control.clone());
        let _ = done.send(shard_loop(client, &worker_id, &assignment, &control, &runtime));
    });
    match finished.await {
        Ok(shards) => tracing::info!(job = %job_id, shards, "inference: released"),
        Err(_) => tracing::error!(job = %job_id, "the inference thread panicked"),
    }
    shared.beat_now.notify_one();
    shared.busy.send_modify(|runs| *runs = runs.saturating_sub(1));
}

/// Leases and commits shards until released or stopped; returns the shards committed.
fn shard_loop(
    mut client: ApiClient,
    worker_id: &str,
    assignment: &InferAssignment,
    control: &LoopControl,
    runtime: &tokio::runtime::Handle,
) -> u64 {
    let mut committed = 0;
    let request = LeaseShardRequest { worker_id: worker_id.to_string(), job_id: assignment.job_id.clone() };
    while !control.stop.load(Ordering::Relaxed) {
        let seen = control.rejoins();
        let leased = runtime.block_on(client.call_inference(|mut c| {
            let request = request.clone();
            async move { c.lease_shard(request).await }
        }));
        let shard = match leased {
            Ok(answer) if answer.released => {
                if control.stay_after_release(seen) {
                    continue; // joined again meanwhile
                }
                return committed;
            }
            Ok(answer) => answer.shard,
            Err(e) => {
                tracing::warn!(error = %e, "cannot lease a shard; retrying");
                std::thread::sleep(RETRY_PAUSE);
                continue;
            }
        };
        let Some(shard) = shard else {
            std::thread::sleep(RETRY_PAUSE);
            continue;
        };
        // A panic (a bug, or the tensor backend) fails this attempt instead of the loop.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| infer_shard(assignment, &shard)))
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!("the inference of this shard panicked (a bug; see the worker's log)"))
            });
        let failed = match outcome {
            Ok(output) => {
                let commit = CommitShardRequest {
                    worker_id: worker_id.to_string(),
                    job_id: shard.job_id.clone(),
                    index: shard.index,
                    output_object: shard.output_uri.clone(),
                    rows: output.rows,
                    labelled_rows: output.labelled_rows,
                    correct: output.correct,
                    attempt: shard.attempt,
                    class_counts: output.class_counts,
                };
                let sent = runtime.block_on(client.call_inference(|mut c| {
                    let commit = commit.clone();
                    async move { c.commit_shard(commit).await }
                }));
                match sent {
                    Ok(_) => {
                        committed += 1;
                        None
                    }
                    // Another attempt of this shard committed first: ours is never promoted.
                    Err(e) if e.kind == ErrorKind::AlreadyExists => {
                        tracing::info!(shard = shard.index, "{e}");
                        None
                    }
                    // Refused for what it reported: retrying the same attempt would repeat it.
                    Err(e) if matches!(e.kind, ErrorKind::InvalidArgument | ErrorKind::NotFound) => {
                        Some(format!("the commit was refused: {e}"))
                    }
                    Err(e) => {
                        tracing::warn!(shard = shard.index, error = %e, "commit failed; leasing again retries it");
                        None
                    }
                }
            }
            Err(e) => Some(super::work::error_text(&e)),
        };
        if let Some(error) = failed {
            tracing::warn!(shard = shard.index, error = %error, "shard failed");
            let fail = FailShardRequest {
                worker_id: worker_id.to_string(),
                job_id: shard.job_id.clone(),
                index: shard.index,
                attempt: shard.attempt,
                error,
            };
            let _ = runtime.block_on(client.call_inference(|mut c| {
                let fail = fail.clone();
                async move { c.fail_shard(fail).await }
            }));
        }
    }
    committed
}

/// One shard: predictions written to the attempt's object (not committed yet).
fn infer_shard(assignment: &InferAssignment, shard: &Shard) -> anyhow::Result<crate::infer::ShardOutput> {
    let predictor = predictor(assignment)?;
    let first_row = usize::try_from(shard.first_row).context("first_row")?;
    let rows = usize::try_from(shard.rows).context("rows")?;
    let input = if shard.byte_end > shard.byte_start {
        // Only this shard's bytes: a range GET.
        let bytes = fetch_range(assignment, shard.byte_start..shard.byte_end)?;
        tracing::info!(
            shard = shard.index,
            "fetched bytes {}..{} of {} (range GET)",
            shard.byte_start,
            shard.byte_end,
            assignment.input_uri
        );
        let name = format!("{} (bytes {}..{})", assignment.input_uri, shard.byte_start, shard.byte_end);
        InputText::index(&name, &bytes)?.shard(0, rows, predictor.features_per_row)?
    } else {
        whole_input(assignment)?.shard(first_row, rows, predictor.features_per_row)?
    };
    let output = run_shard(&predictor, &input, first_row, assignment.batch_size.max(1) as usize)?;
    let (prefix, name) = shard.output_uri.rsplit_once('/').context("the shard's output URI has no folder")?;
    write_artifact(prefix, name, output.csv.clone().into_bytes())
        .with_context(|| format!("writing {}", shard.output_uri))?;
    Ok(output)
}

/// The job's model, loaded on first use.
fn predictor(assignment: &InferAssignment) -> anyhow::Result<Arc<Predictor>> {
    if let Ok(cache) = LOADED.lock()
        && let Some(l) = cache.as_ref().filter(|l| l.job_id == assignment.job_id)
    {
        return Ok(l.predictor.clone());
    }
    let model = assignment
        .model
        .clone()
        .and_then(flotilla_proto::convert::model_from_proto)
        .context("the assignment names no model architecture")?;
    let artifact = fetch(&assignment.model_artifact_uri).context("fetching the model")?;
    let predictor = Predictor::load(
        &model,
        assignment.features_per_row as usize,
        assignment.classes as usize,
        assignment.feature_scale,
        &artifact,
    )
    .with_context(|| format!("loading the model {}", assignment.model_artifact_uri))?;
    let predictor = Arc::new(predictor);
    if let Ok(mut cache) = LOADED.lock() {
        *cache = Some(Loaded { job_id: assignment.job_id.clone(), predictor: predictor.clone(), input: None });
    }
    Ok(predictor)
}

/// The job's whole input, fetched and indexed on first use.
fn whole_input(assignment: &InferAssignment) -> anyhow::Result<Arc<InputText>> {
    if let Ok(cache) = LOADED.lock()
        && let Some(input) = cache.as_ref().filter(|l| l.job_id == assignment.job_id).and_then(|l| l.input.clone())
    {
        return Ok(input);
    }
    let bytes = fetch(&assignment.input_uri).context("fetching the input")?;
    check_unchanged(assignment, bytes.len() as u64)?;
    let input = Arc::new(InputText::index(&assignment.input_uri, &bytes)?);
    if let Ok(mut cache) = LOADED.lock()
        && let Some(loaded) = cache.as_mut().filter(|l| l.job_id == assignment.job_id)
    {
        loaded.input = Some(input.clone());
    }
    Ok(input)
}

/// Refuses an input whose size changed since submission (its row ids would not match).
fn check_unchanged(assignment: &InferAssignment, size_bytes: u64) -> anyhow::Result<()> {
    if assignment.input_bytes != 0 && size_bytes != assignment.input_bytes {
        anyhow::bail!(
            "{} is {size_bytes} bytes now, but {} when the job was submitted: the input changed, so its row ids would \
             not match; submit the job again",
            assignment.input_uri,
            assignment.input_bytes
        );
    }
    Ok(())
}

/// The bytes `range` of the job's input (one HEAD for the size check, one range GET).
fn fetch_range(assignment: &InferAssignment, range: std::ops::Range<u64>) -> anyhow::Result<bytes::Bytes> {
    use object_store::ObjectStoreExt;
    let uri = &assignment.input_uri;
    let location = flotilla_store::open(uri)?;
    let fetched = flotilla_store::block_on(async {
        let meta = location.store().head(location.prefix()).await?;
        check_unchanged(assignment, meta.size)?;
        anyhow::Ok(location.store().get_range(location.prefix(), range.clone()).await?)
    })?;
    fetched.with_context(|| format!("reading bytes {}..{} of {uri}", range.start, range.end))
}

fn fetch(uri: &str) -> anyhow::Result<Vec<u8>> {
    let parsed: DataUri = uri.parse().map_err(|e: flotilla_proto::spec::UriError| anyhow::anyhow!("{uri}: {}", e.0))?;
    Ok(store::fetch(&parsed)?)
}
