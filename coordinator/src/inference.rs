//! Batch inference, the leader's I/O: reading an input's shape at submission, and committing
//! a finished job's output.
//!
//! Output layout under the job's output folder:
//!
//! ```text
//!   _attempts/part-00003-a7.csv   written by a worker for attempt 7 of shard 3, then committed
//!   part-00003.csv                the committed attempt, promoted (renamed) by the leader
//!   _SUMMARY.json                 rows, throughput, class distribution, accuracy (labelled input)
//!   _SUCCESS                      written last: the folder is complete
//! ```
//!
//! Workers never write a `part-*` file: a shard retried after a lost worker leaves at most a
//! stray attempt under `_attempts/`, which is removed, so readers of `part-*` see every row
//! exactly once. Promotion is copy then delete (S3 has no rename) and idempotent (a source
//! gone with its target present is a finished move), so a new leader redoes an interrupted one.
//! Inputs and outputs are storage URIs (`file://`, `s3://`): on several machines, `s3://`.

use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

use flotilla_store::{Location, StoreError};
use object_store::{ObjectStoreExt, PutPayload};

use flotilla_core::JobId;
use flotilla_core::state::{ATTEMPTS_DIR, Command, InferenceJob, JobState, ShardState, State};

use crate::raft::node::NodeHandle;

/// Largest input read, in bytes (compressed size for gzip), and largest decompressed stream:
/// the worker's data loader's limits.
pub const INPUT_SIZE_MAX_BYTES: u64 = 1024 * 1024 * 1024;
pub const INPUT_DECOMPRESSED_MAX_BYTES: u64 = 8 * 1024 * 1024 * 1024;
/// Feature values one shard holds in memory at most on a worker (1 GiB of f32), as the
/// worker's data loader.
pub const SHARD_VALUES_MAX: u64 = 256 * 1024 * 1024;
/// Longest input line, in bytes.
const LINE_LEN_MAX_BYTES: u64 = 1024 * 1024;
/// How often the leader looks for complete jobs.
const PASS_EVERY: Duration = Duration::from_millis(300);
/// ... and at the earliest this long after a change wakes it (without it, every committed
/// write woke a read of the state on the Raft loop's thread).
const PASS_MIN_GAP: Duration = Duration::from_millis(50);
/// Names of the summary and marker files.
pub const SUMMARY_FILE: &str = "_SUMMARY.json";
pub const SUCCESS_FILE: &str = "_SUCCESS";

/// The canonical form of a storage URI (`file:///abs`, `s3://bucket/prefix`, no trailing
/// slash), so the attempt objects the state machine names are the ones the finalizer finds.
pub fn normalized(uri: &str) -> Result<String, String> {
    let parsed = flotilla_store::parse(uri).map_err(|e| e.to_string())?;
    if parsed.prefix.as_ref().is_empty() {
        return Err(format!("`{uri}` names the root of a store; name a folder or object in it"));
    }
    Ok(parsed.root.uri_of(&parsed.prefix))
}

/// The promoted name of shard `index`.
pub fn part_name(index: usize) -> String {
    format!("part-{index:05}.csv")
}

/// What the input holds: data rows (non-blank lines) and columns per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputShape {
    pub rows: u64,
    pub columns: usize,
    /// The file's size in bytes (as stored: compressed for gzip).
    pub bytes: u64,
}

/// Counts an input's rows and checks every row has the first row's column count. Reads CSV
/// text (decompressed). Data rows are told from blank lines by `flotilla_core::text`, the rule
/// the workers' readers use, so both number the same rows. `name` is used in errors.
pub fn input_shape(name: &str, input: impl Read) -> Result<InputShape, String> {
    let mut reader = BufReader::new(input.take(INPUT_DECOMPRESSED_MAX_BYTES + 1));
    let mut total = 0u64;
    let mut line = Vec::new();
    let (mut rows, mut columns, mut number) = (0u64, 0usize, 0u64);
    loop {
        number += 1;
        line.clear();
        let read = (&mut reader)
            .take(LINE_LEN_MAX_BYTES + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("{name}: line {number}: {e}"))?;
        if read == 0 {
            break;
        }
        total += read as u64;
        if total > INPUT_DECOMPRESSED_MAX_BYTES {
            return Err(format!("{name}: decompresses to more than {INPUT_DECOMPRESSED_MAX_BYTES} bytes"));
        }
        if line.len() as u64 > LINE_LEN_MAX_BYTES {
            return Err(format!("{name}: line {number} is longer than {LINE_LEN_MAX_BYTES} bytes"));
        }
        if !flotilla_core::text::is_data_line(&line) {
            continue;
        }
        let found = line.iter().filter(|&&b| b == b',').count() + 1;
        if rows == 0 {
            columns = found;
        } else if found != columns {
            return Err(format!("{name}: line {number} has {found} columns, but the first row has {columns}"));
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(format!("{name}: contains no data rows"));
    }
    Ok(InputShape { rows, columns, bytes: 0 })
}

/// An input as the leader read it at submission.
pub struct Input {
    pub shape: InputShape,
    /// The bytes of a plain (not gzip) input: shards can be cut from them by byte offsets.
    pub plain: Option<bytes::Bytes>,
}

/// Reads the input at `uri` (at most [`INPUT_SIZE_MAX_BYTES`]) and its shape.
pub async fn read_input(uri: &str) -> Result<Input, String> {
    let location = flotilla_store::open(uri).map_err(|e| format!("input: {e}"))?;
    let bytes = flotilla_store::get_capped(&location, location.prefix(), INPUT_SIZE_MAX_BYTES)
        .await
        .map_err(|e| format!("input: {e}"))?;
    let name = location.uri();
    tokio::task::spawn_blocking(move || {
        let gzip = flotilla_core::text::is_gzip(&name, &bytes[..bytes.len().min(2)]);
        let shape = if gzip {
            input_shape(&name, flate2::read::MultiGzDecoder::new(bytes.as_ref()))
        } else {
            input_shape(&name, bytes.as_ref())
        };
        let shape = shape.map(|s| InputShape { bytes: bytes.len() as u64, ..s })?;
        Ok(Input { shape, plain: (!gzip).then_some(bytes) })
    })
    .await
    .map_err(|e| format!("input {uri}: reading it failed: {e}"))?
}

/// The byte offsets of the data rows numbered `first_rows` (ascending) in `text`, then the
/// text's size: what a worker needs to fetch only its shard. Rows are numbered by
/// `flotilla_core::text::is_data_line`, as the workers number them. Empty when a row is missing.
pub fn shard_byte_offsets(text: &[u8], first_rows: &[u64]) -> Vec<u64> {
    let mut offsets = Vec::with_capacity(first_rows.len() + 1);
    let mut wanted = first_rows.iter().copied().peekable();
    let (mut row, mut start) = (0u64, 0usize);
    for line in text.split_inclusive(|&b| b == b'\n') {
        let Some(&next) = wanted.peek() else { break };
        if flotilla_core::text::is_data_line(line) {
            if row == next {
                offsets.push(start as u64);
                wanted.next();
            }
            row += 1;
        }
        start += line.len();
    }
    if offsets.len() != first_rows.len() {
        return Vec::new();
    }
    offsets.push(text.len() as u64);
    offsets
}

/// Checks that the output folder is new or empty (an inference never overwrites results) and
/// that this coordinator can write there.
pub async fn check_output(uri: &str) -> Result<(), String> {
    use futures_util::TryStreamExt;
    let location = flotilla_store::open(uri).map_err(|e| format!("output: {e}"))?;
    let mut listing = location.store().list(Some(location.prefix()));
    match listing.try_next().await {
        Ok(Some(_)) => {
            return Err(format!(
                "output {} already holds files; choose a new folder (results are never overwritten)",
                location.uri()
            ));
        }
        Ok(None) => {}
        Err(e) => return Err(format!("output: {}", StoreError::op(location.uri(), e))),
    }
    flotilla_store::probe(&location, flotilla_store::Access::Write).await.map_err(|e| format!("output: {e}"))
}

/// The `_SUMMARY.json` of a complete job, as of `now_unix_ms`.
pub fn summary(job: &InferenceJob, now_unix_ms: u64) -> serde_json::Value {
    let progress = job.progress(now_unix_ms);
    let totals = &progress.totals;
    serde_json::json!({
        "job_id": job.id.to_string(),
        "model": job.request.model,
        "model_version": job.request.version,
        "input": job.request.input_uri,
        "output": job.request.output_uri,
        "rows": totals.rows,
        "labelled_rows": totals.labelled_rows,
        "correct": totals.correct,
        "accuracy": progress.accuracy,
        "class_counts": totals.class_counts,
        "shards": job.shards.len(),
        "shard_retries": job.retries(),
        "workers_used": job.workers_used().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "parts": (0..job.shards.len()).map(part_name).collect::<Vec<_>>(),
        "seconds": progress.elapsed_ms as f64 / 1000.0,
        "rows_per_s": progress.rows_per_s,
        "workers_max": job.request.workers,
        "batch_size": job.request.batch_size,
    })
}

/// Why finalizing did not finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinalizeError {
    /// I/O that may succeed on the next pass (a busy disk, a racing finalizer): retried.
    Retry(String),
    /// A committed output is gone: the job fails with this reason.
    Fatal(String),
}

/// Promotes every committed attempt of `job` to its `part-*` name, removes stray attempts
/// (best effort) and writes the summary and `_SUCCESS`. Idempotent, and safe to run twice at
/// once (a deposed leader that has not noticed yet). `store` lends its connections when the
/// output is in it.
pub async fn finalize(
    store: &Location,
    job: &InferenceJob,
    now_unix_ms: u64,
) -> Result<serde_json::Value, FinalizeError> {
    let out = store.resolve(&job.request.output_uri).map_err(|e| FinalizeError::Fatal(format!("output: {e}")))?;
    let attempts = out.key(ATTEMPTS_DIR);
    for (index, shard) in job.shards.iter().enumerate() {
        let ShardState::Done { object, .. } = &shard.state else {
            return Err(FinalizeError::Retry(format!("shard {index} is not committed")));
        };
        let source =
            out.key_in(object).filter(|key| key.filename().is_some_and(|name| *key == attempts.clone().join(name)));
        let source = source.ok_or_else(|| {
            FinalizeError::Fatal(format!("shard {index}: committed object {object} is not an attempt"))
        })?;
        match flotilla_store::promote(&out, &source, &out.key(&part_name(index))).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {
                return Err(FinalizeError::Fatal(format!("shard {index}: the committed output {object} is gone")));
            }
            Err(e) => return Err(FinalizeError::Retry(format!("shard {index}: promoting: {e}"))),
        }
    }
    // Stray attempts (retried shards, a lost worker's late write) are removed; a failure here
    // leaves clutter under `_attempts/`, never a wrong `part-*`.
    if let Err(e) = flotilla_store::delete_prefix(&out, &attempts).await {
        tracing::warn!(job = %job.id, error = %e, "stray attempts not removed");
    }
    let summary = summary(job, now_unix_ms);
    let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
    // A put is atomic in both stores (a local one writes a temporary file and renames it).
    for (name, bytes) in [(SUMMARY_FILE, text.into_bytes()), (SUCCESS_FILE, Vec::new())] {
        let key = out.key(name);
        out.store()
            .put(&key, PutPayload::from(bytes))
            .await
            .map_err(|e| FinalizeError::Retry(format!("writing {}: {e}", out.uri_of(&key))))?;
    }
    Ok(summary)
}

fn complete_jobs(state: &State) -> Vec<InferenceJob> {
    state.inferences.values().filter(|j| j.state == JobState::Running && j.is_complete()).cloned().collect()
}

/// Leases to give up now: (job, shard, worker, attempt, why).
fn expired(state: &State, now_unix_ms: u64) -> Vec<(JobId, u32, flotilla_core::WorkerId, u64, String)> {
    state
        .inferences
        .values()
        .flat_map(|job| {
            let timeout = job.lease_timeout_ms();
            job.expired_leases(now_unix_ms).into_iter().map(move |(index, worker, attempt, age)| {
                let why = format!(
                    "{worker} held the lease for {} s without committing (limit {} s); it leaves the job",
                    age / 1000,
                    timeout / 1000
                );
                (job.id, index, worker, attempt, why)
            })
        })
        .collect()
}

/// Runs on every node; acts only while this node leads: gives up leases that ran too long
/// (a worker alive but stuck) and finalizes complete inference jobs.
pub async fn finalize_loop(mut node: NodeHandle, store: Location) {
    loop {
        let _ = tokio::time::timeout(PASS_EVERY, node.changed()).await;
        tokio::time::sleep(PASS_MIN_GAP).await;
        if node.status().leader_id != Some(node.id) {
            continue;
        }
        let now = crate::raft::node::now_unix_ms();
        let Ok(stale) = node.read_local(move |state| expired(state, now)).await else { continue };
        for (job_id, index, worker_id, attempt, error) in stale {
            tracing::warn!(job = %job_id, shard = index, "{error}");
            let command = Command::FailShard { job_id, worker_id, index, attempt, error, release: true };
            if let Err(e) = node.propose(command).await {
                tracing::debug!(job = %job_id, error = %e, "lease not given up; next pass retries");
            }
        }
        let Ok(jobs) = node.read_local(complete_jobs).await else { continue };
        for job in jobs {
            let job_id: JobId = job.id;
            let now = crate::raft::node::now_unix_ms();
            let outcome = finalize(&store, &job, now).await;
            let (success, reason) = match outcome {
                Ok(summary) => {
                    let rows = summary["rows"].as_u64().unwrap_or(0);
                    let rate = summary["rows_per_s"].as_f64().unwrap_or(0.0);
                    let accuracy = summary["accuracy"].as_f64().map_or(String::new(), |a| format!(", accuracy {a:.4}"));
                    (true, format!("{rows} rows at {rate:.0} rows/s{accuracy}"))
                }
                Err(FinalizeError::Retry(e)) => {
                    tracing::warn!(job = %job_id, error = %e, "finalizing the output; retrying next pass");
                    continue;
                }
                Err(FinalizeError::Fatal(e)) => (false, format!("committing the output: {e}")),
            };
            if let Err(e) = node.propose(Command::InferenceFinished { job_id, success, reason }).await {
                tracing::debug!(job = %job_id, error = %e, "inference end not recorded; next pass retries");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_core::state::attempt_object;

    #[test]
    fn the_input_shape_counts_data_rows_and_checks_columns() {
        let text = "1,2,3\n\n4,5,6\r\n  \n7,8,9";
        assert_eq!(input_shape("in", text.as_bytes()), Ok(InputShape { rows: 3, columns: 3, bytes: 0 }));
        let error = input_shape("in", "1,2,3\n4,5\n".as_bytes()).expect_err("ragged");
        assert!(error.contains("line 2 has 2 columns"), "{error}");
        assert!(input_shape("in", "\n\n".as_bytes()).expect_err("empty").contains("no data rows"));
    }

    #[test]
    fn finalizing_promotes_committed_attempts_once_and_is_idempotent() {
        use flotilla_core::state::{InferenceRequest, ModelShape, Shard, ShardState, ShardStats};
        let dir = tempfile::tempdir().expect("tempdir");
        let out = format!("file://{}", dir.path().join("out").display());
        let attempts = dir.path().join("out").join(ATTEMPTS_DIR);
        std::fs::create_dir_all(&attempts).expect("mkdir");
        let shard = |index: u32, attempt: u64| {
            std::fs::write(
                attempts.join(format!("part-{index:05}-a{attempt}.csv")),
                format!("row,predicted\n{index},1\n"),
            )
            .expect("attempt");
            Shard {
                first_row: u64::from(index),
                rows: 1,
                state: ShardState::Done {
                    attempt,
                    object: attempt_object(&out, index, attempt),
                    stats: ShardStats { rows: 1, labelled_rows: 0, correct: 0, class_counts: vec![0, 1] },
                    worker: flotilla_core::WorkerId(1),
                    lease_ms: 0,
                },
                attempts: 1,
                failures: 0,
                last_failed_by: None,
                holders: Vec::new(),
            }
        };
        // Attempt 3 of shard 1 lost the race: written, never committed.
        std::fs::write(attempts.join("part-00001-a3.csv"), "stale").expect("stray");
        let job = InferenceJob {
            id: JobId(4),
            request: InferenceRequest {
                model: "m".into(),
                version: 1,
                input_uri: "file:///in".into(),
                output_uri: out.clone(),
                workers: 2,
                batch_size: 1,
                shard_rows: 1,
                rows: 2,
                labelled: false,
                input_bytes: 0,
                shard_byte_offsets: Vec::new(),
            },
            artifact_uri: String::new(),
            model_spec: flotilla_core::spec::ModelSpec::Mlp { hidden: vec![] },
            shape: ModelShape { features_per_row: 1, classes: 2, feature_scale: 1.0 },
            state: JobState::Running,
            reason: String::new(),
            client_request_id: "r".into(),
            submitted_at_unix_ms: 0,
            submitted_index: 1,
            updated_at_unix_ms: 0,
            started_at_unix_ms: Some(1000),
            finished_at_unix_ms: None,
            shards: vec![shard(0, 1), shard(1, 2)],
            members: vec![],
            joins: 1,
            timed_out: vec![],
            yielding: vec![],
            next_attempt: 4,
            events: vec![],
        };
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let store = flotilla_store::open(dir.path().to_str().expect("utf-8")).expect("store");
        let finalize = |job: &InferenceJob, now: u64| runtime.block_on(finalize(&store, job, now));
        let summary = finalize(&job, 3000).expect("finalize");
        assert_eq!((summary["rows"].as_u64(), summary["rows_per_s"].as_f64()), (Some(2), Some(1.0)));
        let folder = dir.path().join("out");
        assert_eq!(std::fs::read_to_string(folder.join("part-00001.csv")).expect("part"), "row,predicted\n1,1\n");
        assert!(folder.join(SUCCESS_FILE).exists() && !attempts.exists(), "stray attempts removed");
        assert!(finalize(&job, 3000).is_ok(), "a second run (a new leader) finds the work done");
        std::fs::remove_file(folder.join("part-00000.csv")).expect("rm");
        assert!(matches!(finalize(&job, 3000), Err(FinalizeError::Fatal(_))), "a committed output is gone");
    }

    #[test]
    fn shard_offsets_cut_the_text_at_data_rows() {
        let text = b"\n1,2\n\n3,4\n5,6\n  \n7,8";
        let offsets = shard_byte_offsets(text, &[0, 2]);
        assert_eq!(offsets, vec![1, 10, text.len() as u64]);
        let (first, second) = (&text[1..10], &text[10..]);
        assert_eq!(input_shape("a", first).map(|s| s.rows), Ok(2));
        assert_eq!(input_shape("b", second).map(|s| s.rows), Ok(2), "{:?}", std::str::from_utf8(second));
        assert!(shard_byte_offsets(text, &[0, 9]).is_empty(), "a row past the end");
        assert_eq!(shard_byte_offsets(text, &[]), vec![text.len() as u64]);
    }

    #[test]
    fn uris_are_normalized_and_roots_refused() {
        assert_eq!(normalized("/data/out/").as_deref(), Ok("file:///data/out"));
        assert_eq!(normalized("file:///data//in.csv").as_deref(), Ok("file:///data/in.csv"));
        assert_eq!(normalized("s3://bucket/out/").as_deref(), Ok("s3://bucket/out"));
        assert!(normalized("s3://bucket").expect_err("root").contains("root of a store"));
        assert!(normalized("file:///data/../etc/passwd").is_err());
        assert!(normalized("gs://bucket/x").expect_err("scheme").contains("not supported"));
        assert_eq!(attempt_object("file:///o/", 3, 7), "file:///o/_attempts/part-00003-a7.csv");
    }

    #[test]
    fn an_output_folder_with_files_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let check_output = |uri: &str| runtime.block_on(check_output(uri));
        assert!(check_output(dir.path().join("new").to_str().expect("utf-8")).is_ok());
        assert!(check_output(dir.path().to_str().expect("utf-8")).is_ok(), "empty");
        std::fs::write(dir.path().join("part-00000.csv"), "x").expect("write");
        let error = check_output(&format!("file://{}", dir.path().display())).expect_err("not empty");
        assert!(error.contains("choose a new folder"), "{error}");
    }
}
