//! A [`TrainState`] as checkpoint parts, and back.
//!
//! `model` holds the flat parameters and `optim` the optimizer's vectors (SGD: velocity; Adam:
//! first moments then second moments), both as little-endian f32, so a checkpoint is compact
//! and loads without parsing floats. `meta` is JSON with everything else (step, cursor, seed,
//! layout fingerprint, Adam's update count, validation metrics). With `train.keep_best`, `best`
//! holds the parameters of the best validated state (f32 like `model`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::ObjectStore;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use super::{
    CheckpointError, Manifest, bytes_to_f32, f32_to_bytes, f32s_to_bytes, manifest_of, read, write, write_with,
};
use crate::data::Cursor;
use crate::train::{OptimizerState, PatienceCount, TrainState};

/// Metadata stored beside the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    pub step: u64,
    pub cursor: Cursor,
    pub layout_fingerprint: u64,
    pub seed: u64,
    pub train_rows: u64,
    /// `sgd` or `adam`.
    pub optimizer: String,
    /// Adam's update count (bias correction); 0 for SGD.
    pub optimizer_updates: u64,
    /// Validation accuracy (0..1) and loss at this step, when they were measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// `train.patience`'s count (absent when it has counted nothing).
    #[serde(default, skip_serializing_if = "PatienceCount::is_zero")]
    pub patience: PatienceCount,
}

/// `state` (and optional validation metrics) as checkpoint parts: `model`, `optim`, `meta`.
pub fn encode(state: &TrainState, metrics: Option<(f64, f64)>) -> Vec<(&'static str, Bytes)> {
    let (optimizer, updates, optim) = match &state.optimizer {
        OptimizerState::Sgd { velocity } => ("sgd", 0, f32_to_bytes(velocity)),
        OptimizerState::Adam { first_moment, second_moment, updates } => {
            ("adam", *updates, f32s_to_bytes(&[first_moment, second_moment]))
        }
    };
    let meta = CheckpointMeta {
        format_version: state.format_version,
        step: state.step,
        cursor: state.cursor,
        layout_fingerprint: state.layout_fingerprint,
        seed: state.seed,
        train_rows: state.train_rows,
        optimizer: optimizer.to_string(),
        optimizer_updates: updates,
        val_accuracy: metrics.map(|m| m.0),
        val_loss: metrics.map(|m| m.1),
        patience: state.patience,
    };
    let meta = Bytes::from(serde_json::to_vec_pretty(&meta).expect("checkpoint metadata is plain data"));
    let mut parts = vec![("model", f32_to_bytes(&state.params)), ("optim", optim), ("meta", meta)];
    if !state.best_params.is_empty() {
        parts.push(("best", f32_to_bytes(&state.best_params)));
    }
    parts
}

/// A state encoded as checkpoint parts, with their manifest: what a save writes, computed once
/// by whoever needs the fingerprint before the write (a stop announces it to the coordinator).
/// Cloning shares the parts' bytes.
#[derive(Clone)]
pub struct Encoded {
    pub step: u64,
    pub cursor: Cursor,
    pub parts: Vec<(&'static str, Bytes)>,
    pub manifest: Manifest,
}

impl Encoded {
    /// `state` encoded (without validation metrics) and hashed.
    pub fn of(state: &TrainState) -> Result<Encoded, CheckpointError> {
        Encoded::hash(state.step, state.cursor, encode(state, None))
    }

    /// The encoding `parts` (of the state at `step`, `cursor`), hashed: for a caller that
    /// used the parts before they were hashed (a leaving rank 0 starts its push first).
    pub fn hash(step: u64, cursor: Cursor, parts: Vec<(&'static str, Bytes)>) -> Result<Encoded, CheckpointError> {
        let manifest = manifest_of(&parts)?;
        Ok(Encoded { step, cursor, parts, manifest })
    }
}

/// Writes `state` (and optional validation metrics) as a checkpoint under `prefix`.
pub async fn save(
    store: &dyn ObjectStore,
    prefix: &Path,
    state: &TrainState,
    metrics: Option<(f64, f64)>,
) -> Result<Manifest, CheckpointError> {
    write(store, prefix, &encode(state, metrics)).await
}

/// Reads and verifies the checkpoint under `prefix` and rebuilds the [`TrainState`].
pub async fn load(store: &dyn ObjectStore, prefix: &Path) -> Result<(TrainState, CheckpointMeta), CheckpointError> {
    let (_, parts) = read(store, prefix).await?;
    decode(&parts, prefix.as_ref())
}

/// Rebuilds the [`TrainState`] from verified parts (the inverse of [`encode`]); `origin`
/// names where they came from in the error.
pub fn decode(parts: &BTreeMap<String, Bytes>, origin: &str) -> Result<(TrainState, CheckpointMeta), CheckpointError> {
    let invalid = |what: String| CheckpointError::Corrupt { prefix: origin.to_string(), reason: what };
    let part = |name: &str| parts.get(name).ok_or_else(|| invalid(format!("part `{name}` is not in the manifest")));
    let meta: CheckpointMeta =
        serde_json::from_slice(part("meta")?).map_err(|e| invalid(format!("part `meta`: {e}")))?;
    let params = bytes_to_f32(part("model")?, "model")?;
    let optim = bytes_to_f32(part("optim")?, "optim")?;
    let optimizer = match meta.optimizer.as_str() {
        "sgd" if optim.len() == params.len() => OptimizerState::Sgd { velocity: optim },
        "adam" if optim.len() == 2 * params.len() => {
            let second = optim[params.len()..].to_vec();
            let mut first = optim;
            first.truncate(params.len());
            OptimizerState::Adam { first_moment: first, second_moment: second, updates: meta.optimizer_updates }
        }
        other => {
            return Err(invalid(format!(
                "optimizer `{other}` with {} values does not fit {} parameters",
                optim.len(),
                params.len()
            )));
        }
    };
    let best_params = match parts.get("best") {
        Some(bytes) => bytes_to_f32(bytes, "best")?,
        None => Vec::new(),
    };
    if !best_params.is_empty() && best_params.len() != params.len() {
        return Err(invalid(format!(
            "part `best` holds {} values; part `model` holds {}",
            best_params.len(),
            params.len()
        )));
    }
    let state = TrainState {
        format_version: meta.format_version,
        step: meta.step,
        cursor: meta.cursor,
        params,
        optimizer,
        layout_fingerprint: meta.layout_fingerprint,
        seed: meta.seed,
        train_rows: meta.train_rows,
        patience: meta.patience,
        best_params,
    };
    Ok((state, meta))
}

/// The prefix of the checkpoint taken after `step` under a job's checkpoint root:
/// `ckpt/<step, 12 digits>[-<suffix>]` so that names sort by step (the cluster's suffix is the
/// generation, so two generations never write the same prefix).
pub fn step_prefix(root: &Path, step: u64, suffix: Option<&str>) -> Path {
    let name = match suffix {
        Some(suffix) => format!("{step:012}-{suffix}"),
        None => format!("{step:012}"),
    };
    root.clone().join("ckpt").join(name)
}

/// Where the checkpoint of each step goes: a job's checkpoint root and the names' suffix.
#[derive(Clone)]
struct Names {
    location: super::store::Location,
    /// Appended to each checkpoint's name (`ckpt/<step>-<suffix>`): the cluster passes the
    /// generation, so two generations never write the same prefix.
    suffix: Option<String>,
}

impl Names {
    fn prefix(&self, step: u64) -> Path {
        step_prefix(self.location.prefix(), step, self.suffix.as_deref())
    }

    fn uri(&self, step: u64) -> String {
        self.location.uri_of(&self.prefix(step))
    }
}

/// The blocking front end the synchronous training loop uses: a store opened once, its own
/// small runtime, and URIs of what it wrote.
pub struct Checkpointer {
    names: Names,
    runtime: tokio::runtime::Runtime,
}

fn runtime() -> Result<tokio::runtime::Runtime, CheckpointError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CheckpointError::Invalid(format!("checkpoint runtime: {e}")))
}

impl Checkpointer {
    /// Opens the checkpoint root `uri` (file:///dir, /dir or s3://bucket/prefix).
    pub fn open(uri: &str) -> Result<Checkpointer, CheckpointError> {
        Ok(Checkpointer { names: Names { location: super::store::open(uri)?, suffix: None }, runtime: runtime()? })
    }

    /// Names checkpoints `ckpt/<step>-<suffix>` (letters, digits, `-`; at most 32).
    pub fn with_suffix(mut self, suffix: &str) -> Result<Checkpointer, CheckpointError> {
        let valid =
            !suffix.is_empty() && suffix.len() <= 32 && suffix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid {
            return Err(CheckpointError::Invalid(format!("checkpoint name suffix `{suffix}`")));
        }
        self.names.suffix = Some(suffix.to_string());
        Ok(self)
    }

    /// Saves `state` as the checkpoint of its step; returns the checkpoint's URI and manifest.
    pub fn save(&self, state: &TrainState, metrics: Option<(f64, f64)>) -> Result<(String, Manifest), CheckpointError> {
        let store = self.names.location.store();
        let manifest = self.runtime.block_on(save(store.as_ref(), &self.names.prefix(state.step), state, metrics))?;
        Ok((self.names.uri(state.step), manifest))
    }

    /// Saves an already encoded state as the checkpoint of its step; returns its URI.
    pub fn save_encoded(&self, encoded: &Encoded) -> Result<String, CheckpointError> {
        let (store, prefix) = (self.names.location.store(), self.names.prefix(encoded.step));
        self.runtime.block_on(write_with(store.as_ref(), &prefix, &encoded.parts, &encoded.manifest))?;
        Ok(self.names.uri(encoded.step))
    }
}

/// A checkpoint written by [`BackgroundCheckpointer`] and accepted by its `on_saved` hook.
#[derive(Debug, Clone)]
pub struct Saved {
    pub step: u64,
    pub cursor: Cursor,
    pub uri: String,
    pub manifest: Manifest,
    /// Time to write it and run the hook (the part that overlaps training).
    pub background_ms: f64,
    /// The parts as written (shared bytes, no copy): rank 0 pushes them to warm spares.
    pub parts: Vec<(&'static str, Bytes)>,
}

type SaveResult = Result<Saved, CheckpointError>;
/// A snapshot to save: a state with validation (accuracy, loss) when measured, encoded by the
/// writer thread; or one encoded already.
enum Snapshot {
    State(TrainState, Option<(f64, f64)>),
    Encoded(Encoded),
}

/// Asynchronous saving: the training loop hands over a snapshot (already copied to host
/// memory) and continues; one background thread writes it and then calls `on_saved` (the
/// agent records it with the coordinator there). At most one save is in flight: handing over
/// another waits for the previous one, so memory stays bounded at one extra copy of the state.
pub struct BackgroundCheckpointer {
    /// The writer's names (its thread owns the writer).
    names: Names,
    snapshots: Option<std::sync::mpsc::SyncSender<Snapshot>>,
    results: std::sync::mpsc::Receiver<SaveResult>,
    in_flight: Option<u64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundCheckpointer {
    pub fn start(
        checkpointer: Checkpointer,
        mut on_saved: impl FnMut(&Saved) -> Result<(), String> + Send + 'static,
    ) -> BackgroundCheckpointer {
        let names = checkpointer.names.clone();
        let (snapshots, inbox) = std::sync::mpsc::sync_channel::<Snapshot>(1);
        let (outbox, results) = std::sync::mpsc::sync_channel::<SaveResult>(1);
        let thread = std::thread::spawn(move || {
            for snapshot in inbox {
                let started = std::time::Instant::now();
                let encoded = match snapshot {
                    Snapshot::State(state, metrics) => Encoded::hash(state.step, state.cursor, encode(&state, metrics)),
                    Snapshot::Encoded(encoded) => Ok(encoded),
                };
                let written = encoded.and_then(|e| checkpointer.save_encoded(&e).map(|uri| (uri, e)));
                let saved = written.and_then(|(uri, e)| {
                    let Encoded { step, cursor, parts, manifest } = e;
                    let mut saved = Saved { step, cursor, uri, manifest, background_ms: 0.0, parts };
                    on_saved(&saved).map_err(CheckpointError::NotRecorded)?;
                    saved.background_ms = started.elapsed().as_secs_f64() * 1e3;
                    Ok(saved)
                });
                if outbox.send(saved).is_err() {
                    return;
                }
            }
        });
        BackgroundCheckpointer { names, snapshots: Some(snapshots), results, in_flight: None, thread: Some(thread) }
    }

    /// The URI the checkpoint of `step` is (or will be) saved at.
    pub fn uri_of_step(&self, step: u64) -> String {
        self.names.uri(step)
    }

    /// The step of the save in progress, if any.
    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight
    }

    /// Starts saving `state` (with validation accuracy and loss, if measured). If a save is
    /// still in flight, waits for it first and returns its outcome.
    pub fn submit(&mut self, state: TrainState, metrics: Option<(f64, f64)>) -> Option<SaveResult> {
        let step = state.step;
        self.send(step, Snapshot::State(state, metrics))
    }

    /// Like [`BackgroundCheckpointer::submit`], for a state encoded already.
    pub fn submit_encoded(&mut self, encoded: Encoded) -> Option<SaveResult> {
        let step = encoded.step;
        self.send(step, Snapshot::Encoded(encoded))
    }

    fn send(&mut self, step: u64, snapshot: Snapshot) -> Option<SaveResult> {
        let previous = self.finish();
        let sent = self.snapshots.as_ref().is_some_and(|s| s.send(snapshot).is_ok());
        if sent {
            self.in_flight = Some(step);
            previous
        } else {
            Some(Err(CheckpointError::Invalid("the checkpoint writer thread stopped".into())))
        }
    }

    /// The outcome of the save in flight if it is done, without waiting.
    pub fn poll(&mut self) -> Option<SaveResult> {
        self.in_flight?;
        match self.results.try_recv() {
            Ok(result) => {
                self.in_flight = None;
                Some(result)
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => None,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                self.in_flight = None;
                Some(Err(CheckpointError::Invalid("the checkpoint writer thread stopped".into())))
            }
        }
    }

    /// Waits up to `wait` for the save in flight; its outcome, or None when none is in flight
    /// or it is still being written (then it stays in flight).
    pub fn finish_within(&mut self, wait: Duration) -> Option<SaveResult> {
        self.in_flight?;
        let result = match self.results.recv_timeout(wait) {
            Ok(result) => result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return None,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(CheckpointError::Invalid("the checkpoint writer thread stopped".into()))
            }
        };
        self.in_flight = None;
        Some(result)
    }

    /// Waits for the save in flight, if any, and returns its outcome.
    pub fn finish(&mut self) -> Option<SaveResult> {
        self.in_flight?;
        self.in_flight = None;
        Some(
            self.results
                .recv()
                .unwrap_or_else(|_| Err(CheckpointError::Invalid("the checkpoint writer thread stopped".into()))),
        )
    }
}

impl Drop for BackgroundCheckpointer {
    fn drop(&mut self) {
        let _ = self.finish();
        self.snapshots = None; // ends the thread's loop
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes `bytes` as `<prefix_uri>/<name>` (blocking); returns the object's URI.
pub fn write_artifact(prefix_uri: &str, name: &str, bytes: Vec<u8>) -> Result<String, CheckpointError> {
    use object_store::{ObjectStoreExt, PutPayload};
    let location = super::store::open(prefix_uri)?;
    let path = location.key(name);
    runtime()?.block_on(location.store().put(&path, PutPayload::from(bytes)))?;
    Ok(location.uri_of(&path))
}

/// Reads and verifies the checkpoint at `uri` (blocking): what a resuming rank calls.
pub fn load_uri(uri: &str) -> Result<(TrainState, CheckpointMeta), CheckpointError> {
    load_uri_when_written(uri, Duration::ZERO).map(|(state, meta, _)| (state, meta))
}

/// How often a rank looks for the MANIFEST of an announced checkpoint it waits for.
const WRITTEN_POLL: Duration = Duration::from_millis(200);
/// The rate below which a writer is assumed stuck (bytes per second, per the checkpoint's
/// size): a 5.6 MB state waits at most 10.1 s, a 10 GB one 210 s.
const WRITE_RATE_FLOOR_BYTES_PER_S: u64 = 50_000_000;
/// What a wait for an announced checkpoint's write starts from, whatever its size: the writer
/// defers its save up to a second for its own next step, and a store's first request takes a
/// connection.
const WRITE_WAIT_BASE: Duration = Duration::from_secs(10);
/// The longest such wait.
const WRITE_WAIT_MAX: Duration = Duration::from_secs(300);

/// How long a rank waits for an announced checkpoint of `size_bytes` to be written when it must
/// read it from the store (no gang member holds it): its writer, a member of the gang that
/// ended, still saves it. Past this the writer counts as gone and the checkpoint as partial.
pub fn pending_write_wait(size_bytes: u64) -> Duration {
    let writing = Duration::from_secs(size_bytes / WRITE_RATE_FLOOR_BYTES_PER_S);
    (WRITE_WAIT_BASE + writing).min(WRITE_WAIT_MAX)
}

/// [`load_uri`], waiting up to `wait_max` while the checkpoint has no MANIFEST yet (an
/// announced checkpoint whose writer is still saving it; `Duration::ZERO`: no wait). Also
/// returns how long it waited.
pub fn load_uri_when_written(
    uri: &str,
    wait_max: Duration,
) -> Result<(TrainState, CheckpointMeta, Duration), CheckpointError> {
    let location = super::store::open(uri)?;
    let runtime = runtime()?;
    let started = Instant::now();
    loop {
        match runtime.block_on(load(location.store().as_ref(), location.prefix())) {
            Err(CheckpointError::Partial { .. }) if started.elapsed() + WRITTEN_POLL <= wait_max => {
                std::thread::sleep(WRITTEN_POLL);
            }
            Ok((state, meta)) => return Ok((state, meta, started.elapsed())),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(optimizer: OptimizerState) -> TrainState {
        TrainState {
            format_version: crate::train::TRAIN_STATE_FORMAT_VERSION,
            step: 42,
            cursor: Cursor { epoch: 1, global_sample_offset: 640 },
            params: vec![0.5, -1.25, 3.0],
            optimizer,
            layout_fingerprint: 0xfeed,
            seed: 7,
            train_rows: 4000,
            patience: PatienceCount { best: Some(0.25), best_step: 40, since_best: 2, counted_step: 42 },
            best_params: vec![0.75, -1.0, 2.5],
        }
    }

    #[test]
    fn train_states_round_trip_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let location = super::super::store::open(dir.path().to_str().expect("utf-8")).expect("store");
        let (store, root) = (location.store().clone(), location.prefix().clone());
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        for optimizer in [
            OptimizerState::Sgd { velocity: vec![0.1, 0.2, 0.3] },
            OptimizerState::Adam { first_moment: vec![1.0, 2.0, 3.0], second_moment: vec![4.0, 5.0, 6.0], updates: 9 },
        ] {
            let original = state(optimizer);
            let prefix = step_prefix(&root, original.step, None);
            rt.block_on(save(store.as_ref(), &prefix, &original, Some((0.93, 0.21)))).expect("save");
            let (loaded, meta) = rt.block_on(load(store.as_ref(), &prefix)).expect("load");
            assert_eq!(loaded, original);
            assert_eq!(meta.val_accuracy, Some(0.93));
        }
        assert!(dir.path().join("ckpt/000000000042/MANIFEST").exists());
    }

    /// `train.keep_best`'s part is optional (a state without it has none) and must fit the model.
    #[test]
    fn the_best_part_is_optional_and_must_fit_the_model() {
        let with_best = state(OptimizerState::Sgd { velocity: vec![0.1, 0.2, 0.3] });
        let parts = |state: &TrainState| -> BTreeMap<String, Bytes> {
            encode(state, None).into_iter().map(|(name, bytes)| (name.to_string(), bytes)).collect()
        };
        let without = TrainState { best_params: Vec::new(), ..with_best.clone() };
        assert!(!parts(&without).contains_key("best"));
        assert_eq!(decode(&parts(&without), "here").expect("decodes").0, without);
        assert_eq!(decode(&parts(&with_best), "here").expect("decodes").0.best_params, [0.75, -1.0, 2.5]);
        let mut short = parts(&with_best);
        short.insert("best".into(), f32_to_bytes(&[1.0, 2.0]));
        let error = decode(&short, "here").expect_err("two values for three parameters").to_string();
        assert!(error.contains("part `best` holds 2 values; part `model` holds 3"), "{error}");
    }

    #[test]
    fn a_rank_waits_for_an_announced_checkpoint_to_be_written_then_loads_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let location = super::super::store::open(dir.path().to_str().expect("utf-8")).expect("store");
        let (store, root) = (location.store().clone(), location.prefix().clone());
        let original = state(OptimizerState::Sgd { velocity: vec![0.1, 0.2, 0.3] });
        let prefix = step_prefix(&root, original.step, None);
        let uri = location.uri_of(&prefix);
        // Not written yet: without a wait it is partial; with a short one, still partial.
        assert!(matches!(load_uri_when_written(&uri, Duration::ZERO), Err(CheckpointError::Partial { .. })));
        assert!(matches!(
            load_uri_when_written(&uri, Duration::from_millis(450)),
            Err(CheckpointError::Partial { .. })
        ));
        // Its writer saves it while the rank waits: the rank loads it, bit for bit.
        let written = original.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            rt.block_on(save(store.as_ref(), &prefix, &written, None)).expect("save");
        });
        let (loaded, _, waited) = load_uri_when_written(&uri, Duration::from_secs(30)).expect("written meanwhile");
        writer.join().expect("writer");
        assert_eq!(loaded, original);
        assert!(waited >= Duration::from_millis(400), "it waited for the write: {waited:?}");
        // The wait grows with the size, within its bounds.
        assert_eq!(pending_write_wait(5_643_988), Duration::from_secs(10));
        assert_eq!(pending_write_wait(10_000_000_000), Duration::from_secs(210));
        assert_eq!(pending_write_wait(u64::MAX), WRITE_WAIT_MAX);
    }

    #[test]
    fn background_saves_are_written_then_handed_to_the_hook_one_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let checkpointer = Checkpointer::open(dir.path().to_str().expect("utf-8"))
            .and_then(|c| c.with_suffix("g3"))
            .expect("checkpointer");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let hook_seen = seen.clone();
        let mut background = BackgroundCheckpointer::start(checkpointer, move |saved| {
            // The hook runs after the write: the checkpoint must be complete and loadable.
            let (loaded, _) = load_uri(&saved.uri).map_err(|e| e.to_string())?;
            hook_seen.lock().map_err(|e| e.to_string())?.push(loaded.step);
            if saved.step == 3 { Err("the coordinator refused it".into()) } else { Ok(()) }
        });
        let mut first = state(OptimizerState::Sgd { velocity: vec![0.1, 0.2, 0.3] });
        first.step = 1;
        assert!(background.submit(first.clone(), None).is_none(), "nothing was in flight");
        assert_eq!(background.in_flight(), Some(1));
        first.step = 2;
        let previous = background.submit(first.clone(), None).expect("waited for step 1");
        assert!(previous.expect("saved").uri.ends_with("ckpt/000000000001-g3"));
        first.step = 3;
        let _ = background.submit(first, None);
        assert!(matches!(background.finish(), Some(Err(CheckpointError::NotRecorded(_)))));
        assert!(background.finish().is_none(), "nothing in flight any more");
        assert_eq!(*seen.lock().expect("lock"), [1, 2, 3]);
    }
}
