//! The command runner: the user's own program (PyTorch DDP, JAX, anything) on this gang member,
//! under the torchrun environment contract, with Flotilla's checkpoint, notice and resume
//! guarantees.
//!
//! ```text
//!   ring rendezvous (authenticated) ─▶ node 0 picks MASTER_PORT, broadcast to the gang
//!   ─▶ fetch + verify + unpack the workdir ─▶ download the resume checkpoint (verified)
//!   ─▶ start procs_per_worker processes (own process groups, RANK/WORLD_SIZE/... set)
//!   ─▶ watch: output lines ─▶ job log; JSON lines ─▶ progress; checkpoint markers ─▶ upload
//!        (node 0) ─▶ record through Raft; notice ─▶ signal ─▶ the program checkpoints and exits
//!   ─▶ every process exited: Finished | Checkpointed | Broken (exit status, or a lost peer)
//! ```
//!
//! The contract (README "Bring your own training code"):
//! - RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT as
//!   torchrun sets them; FLOTILLA_JOB_ID, FLOTILLA_GENERATION; FLOTILLA_CHECKPOINT_DIR (local);
//!   FLOTILLA_RESUME_FROM (the newest recorded checkpoint, downloaded; unset on a fresh start);
//!   FLOTILLA_PREEMPT_FILE (holds the unix-seconds deadline once a notice came).
//! - A checkpoint is `FLOTILLA_CHECKPOINT_DIR/<step>/`, complete once the program prints
//!   `FLOTILLA_CHECKPOINT <step>` on stdout or writes `<step>/COMPLETE`. Node 0's folder is
//!   uploaded (in DDP rank 0 writes the checkpoint); a recorded one replaces older local ones.
//! - A preemption notice sends `run.notice_signal` to every process group; the program saves a
//!   checkpoint and exits. At the deadline the groups are killed.
//! - A JSON object line with a numeric `step` (and `loss`, `samples_per_s`, `total_steps`,
//!   `val_accuracy`, `val_loss`) is progress.

use std::collections::{BTreeSet, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_proto::spec::{NoticeSignal, RunSpec};
use flotilla_proto::v1::{CheckpointRef, FinishedReport, GenerationEnd, JobMetrics, ProgressReport, TrainAssignment};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::work::{
    JobNotes, PROGRESS_EVERY, RankContext, RankEnd, broken, checkpoint_unusable, gang_not_formed, join_gang,
    record_checkpoint,
};
use crate::checkpoint::{files, state, store};
use crate::collective::Communicator;
use crate::joblog::LINE_BYTES_MAX;

/// How often the runner looks at its processes, flags and output.
const POLL: Duration = Duration::from_millis(50);
/// How often the checkpoint folder is scanned for `COMPLETE` files.
const SCAN_EVERY: Duration = Duration::from_millis(500);
/// Time from a notice that named no time to the kill of whatever still runs.
pub const NOTICE_GRACE: Duration = Duration::from_secs(100);
/// Kept between the program's deadline and the instance's end, to upload its last checkpoint.
pub const UPLOAD_RESERVE: Duration = Duration::from_secs(20);
/// The program gets at least this long after the signal, however late the notice arrived.
const NOTICE_GRACE_MIN: Duration = Duration::from_secs(5);
/// A failed process's siblings get this long after SIGTERM before SIGKILL.
const SIBLING_GRACE: Duration = Duration::from_secs(5);
/// Time for a peer's data port to answer when a failure is classified.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Last output lines kept per run, quoted when a process fails.
const TAIL_LINES: usize = 20;
/// Where runs keep their folders, unless FLOTILLA_WORK_DIR says otherwise.
const WORK_DIR_ENV: &str = "FLOTILLA_WORK_DIR";

fn signal_of(notice: NoticeSignal) -> Signal {
    match notice {
        NoticeSignal::Term => Signal::SIGTERM,
        NoticeSignal::Int => Signal::SIGINT,
        NoticeSignal::Usr1 => Signal::SIGUSR1,
        NoticeSignal::Usr2 => Signal::SIGUSR2,
        NoticeSignal::Hup => Signal::SIGHUP,
    }
}

/// The torchrun contract for one process: pure, so the test of the contract is exact.
pub fn contract_env(
    node_rank: u32,
    nodes: u32,
    local_rank: u32,
    procs: u32,
    master: SocketAddr,
) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", (node_rank * procs + local_rank).to_string()),
        ("WORLD_SIZE", (nodes * procs).to_string()),
        ("LOCAL_RANK", local_rank.to_string()),
        ("LOCAL_WORLD_SIZE", procs.to_string()),
        ("NODE_RANK", node_rank.to_string()),
        ("MASTER_ADDR", master.ip().to_string()),
        ("MASTER_PORT", master.port().to_string()),
    ]
}

/// A line of the program's output that means something to the runner.
#[derive(Debug, Clone, PartialEq)]
pub enum Marker {
    /// `FLOTILLA_CHECKPOINT <step>`: `<dir>/<step>/` is complete.
    Checkpoint(u64),
    /// A JSON object with a numeric `step`.
    Metrics(Metrics),
}

/// Progress as the program reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Metrics {
    pub step: u64,
    pub loss: Option<f64>,
    pub samples_per_s: Option<f64>,
    pub total_steps: Option<u64>,
    pub val_accuracy: Option<f64>,
    pub val_loss: Option<f64>,
}

impl Metrics {
    /// This line's progress after `earlier`'s: a value it leaves out (a validation line without
    /// the loss) keeps the one an earlier line gave (pure).
    pub fn after(self, earlier: Option<Metrics>) -> Metrics {
        let earlier = earlier.unwrap_or_default();
        Metrics {
            loss: self.loss.or(earlier.loss),
            samples_per_s: self.samples_per_s.or(earlier.samples_per_s),
            total_steps: self.total_steps.or(earlier.total_steps),
            ..self
        }
    }
}

/// Parses one output line (pure).
pub fn parse_line(line: &str) -> Option<Marker> {
    let line = line.trim();
    if let Some(step) = line.strip_prefix("FLOTILLA_CHECKPOINT ") {
        return step.trim().parse().ok().map(Marker::Checkpoint);
    }
    if !line.starts_with('{') {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let number = |key: &str| value.get(key).and_then(serde_json::Value::as_f64).filter(|v| v.is_finite());
    let step = value.get("step")?.as_u64()?;
    Some(Marker::Metrics(Metrics {
        step,
        loss: number("loss"),
        samples_per_s: number("samples_per_s"),
        total_steps: value.get("total_steps").and_then(serde_json::Value::as_u64),
        val_accuracy: number("val_accuracy").filter(|a| (0.0..=1.0).contains(a)),
        val_loss: number("val_loss"),
    }))
}

/// Output of one process, line by line.
struct Line {
    local_rank: u32,
    text: String,
}

/// What the uploader thread did with one checkpoint folder.
struct Uploaded {
    step: u64,
    result: Result<String, String>,
}

/// The folders of one run: `<work>/<job>/g<generation>/{workdir,checkpoints,resume,preempt}`.
struct RunDirs {
    workdir: PathBuf,
    checkpoints: PathBuf,
    resume: PathBuf,
    preempt: PathBuf,
}

impl RunDirs {
    /// Makes the run's folders, removing older generations' folders of the same job (and
    /// other jobs' runs: one job runs on a worker at a time).
    fn create(job_id: &str, generation: u64) -> anyhow::Result<RunDirs> {
        let base = std::env::var_os(WORK_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join(format!("flotilla-work-{}", std::process::id())));
        if base.exists() {
            for entry in std::fs::read_dir(&base).with_context(|| format!("reading {}", base.display()))?.flatten() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let root = base.join(job_id).join(format!("g{generation}"));
        let dirs = RunDirs {
            workdir: root.join("workdir"),
            checkpoints: root.join("checkpoints"),
            resume: root.join("resume"),
            preempt: root.join("preempt"),
        };
        for dir in [&dirs.workdir, &dirs.checkpoints] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(dirs)
    }
}

/// One process of this rank; it leads its own process group.
struct Proc {
    local_rank: u32,
    child: Child,
    exited: Option<ExitStatus>,
}

/// The running processes of this rank.
struct Procs(Vec<Proc>);

impl Procs {
    fn signal_all(&self, signal: Signal) {
        for proc in self.0.iter().filter(|p| p.exited.is_none()) {
            // The child leads its own group: the signal reaches what it started too.
            let _ = killpg(Pid::from_raw(proc.child.id() as i32), signal);
        }
    }

    /// Collects exit statuses; true once every process has exited.
    fn poll(&mut self) -> bool {
        for proc in self.0.iter_mut().filter(|p| p.exited.is_none()) {
            proc.exited = proc.child.try_wait().ok().flatten();
        }
        self.0.iter().all(|p| p.exited.is_some())
    }

    fn kill_and_reap(&mut self) {
        self.signal_all(Signal::SIGKILL);
        for proc in self.0.iter_mut().filter(|p| p.exited.is_none()) {
            proc.exited = proc.child.wait().ok();
        }
    }

    /// The first process that failed: (local rank, status).
    fn first_failure(&self) -> Option<(u32, ExitStatus)> {
        self.0.iter().find_map(|p| p.exited.filter(|s| !s.success()).map(|s| (p.local_rank, s)))
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        if self.0.iter().any(|p| p.exited.is_none()) {
            self.kill_and_reap();
        }
    }
}

/// The program is killed when the thread that started it ends (the agent died or was killed):
/// its own process group does not receive the signals aimed at the agent's, and an orphaned
/// rank must not keep training (or holding its GPU) beside the next generation.
#[allow(unsafe_code)]
fn die_with_this_thread(command: &mut Command) {
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe calls
    // are allowed: prctl(PR_SET_PDEATHSIG) is a single system call, allocating nothing and
    // taking no lock.
    unsafe {
        command.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
    }
}

/// Streams one pipe's lines (cut at LINE_BYTES_MAX) into `lines`.
fn read_lines(pipe: impl Read + Send + 'static, local_rank: u32, lines: mpsc::Sender<Line>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            match reader.by_ref().take(LINE_BYTES_MAX as u64).read_until(b'\n', &mut buffer) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buffer).trim_end_matches(['\n', '\r']).to_string();
                    if lines.send(Line { local_rank, text }).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// Whether every other gang member's agent still answers on its data port.
fn peers_alive(train: &TrainAssignment) -> bool {
    train.peers.iter().filter(|p| p.rank != train.rank).all(|p| {
        p.data_addr.parse::<SocketAddr>().is_ok_and(|addr| TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).is_ok())
    })
}

/// When the program must have exited after a notice at `now_ms` (unix ms): [`UPLOAD_RESERVE`]
/// before the instance is taken, or [`NOTICE_GRACE`] from now when no time was named; never
/// less than [`NOTICE_GRACE_MIN`] from now.
pub fn program_deadline_unix_ms(now_ms: u64, taken_at_ms: Option<u64>) -> u64 {
    let reserve = UPLOAD_RESERVE.as_millis() as u64;
    let deadline = match taken_at_ms {
        Some(at) => at.saturating_sub(reserve),
        None => now_ms + NOTICE_GRACE.as_millis() as u64,
    };
    deadline.max(now_ms + NOTICE_GRACE_MIN.as_millis() as u64)
}

/// Joins the gang (the ring rendezvous proves every member holds the gang secret), then node 0's
/// MASTER_PORT reaches everyone. Returns MASTER_ADDR:MASTER_PORT.
fn rendezvous(
    context: &RankContext,
    train: &TrainAssignment,
    port: &std::sync::Arc<crate::collective::port::DataPort>,
) -> Result<SocketAddr, (GenerationEnd, anyhow::Error)> {
    let mut comm = join_gang(context, train, port)?;
    let master_ip = train
        .peers
        .iter()
        .find(|p| p.rank == 0)
        .and_then(|p| p.data_addr.parse::<SocketAddr>().ok())
        .map(|a| a.ip())
        .context("the assignment names no rank 0")
        .map_err(|e| (GenerationEnd::RetryableError, e))?;
    let mut port = [0f32];
    if train.rank == 0 {
        // A free port on the address the gang reaches this worker at (the program binds it).
        let probe = TcpListener::bind((master_ip, 0))
            .and_then(|l| l.local_addr())
            .context("finding a free MASTER_PORT")
            .map_err(|e| (GenerationEnd::RetryableError, e))?;
        port[0] = f32::from(probe.port());
    }
    comm.broadcast(&mut port, 0).map_err(|e| (GenerationEnd::PeerLost, e.into()))?;
    Ok(SocketAddr::new(master_ip, port[0] as u16))
}

/// Runs the user's program on this rank until it exits, is superseded, or stops for a notice.
pub(super) fn run_rank(
    context: &RankContext,
    train: &TrainAssignment,
    run: &RunSpec,
    port: &std::sync::Arc<crate::collective::port::DataPort>,
    progress: &tokio::sync::mpsc::Sender<ProgressReport>,
    runtime: &tokio::runtime::Handle,
) -> RankEnd {
    let resume_step = train.resume_from.as_ref().map_or(0, |c| c.step);
    let mut notes = JobNotes::open(context, train);
    let master = match rendezvous(context, train, port) {
        Ok(master) => master,
        Err((end, e)) => return gang_not_formed(end, resume_step, e.context("gang rendezvous")),
    };
    let dirs = match RunDirs::create(&train.job_id, train.generation) {
        Ok(dirs) => dirs,
        Err(e) => return broken(GenerationEnd::RetryableError, resume_step, e),
    };
    if let Some(uri) = &run.workdir
        && let Err(e) = crate::workdir::fetch(uri, &dirs.workdir, runtime)
    {
        return broken(GenerationEnd::RetryableError, resume_step, e);
    }
    if let Some(reference) = &train.resume_from {
        let downloaded = store::open(&reference.uri).and_then(|location| {
            runtime.block_on(files::download(location.store().as_ref(), location.prefix(), &dirs.resume))
        });
        match downloaded {
            Ok(_) => notes.note(format!("resuming from the checkpoint of step {} ({})", reference.step, reference.uri)),
            Err(e) if e.is_unusable() => return checkpoint_unusable(&mut notes, reference.step, e),
            Err(e) => return broken(GenerationEnd::RetryableError, resume_step, e),
        }
    }
    notes.note(format!(
        "generation {}: starting {:?} on {} worker(s) x {} process(es), MASTER {master}",
        train.generation, run.command, train.world_size, run.procs_per_worker
    ));
    let (lines_tx, lines) = mpsc::channel::<Line>();
    let mut procs = Procs(Vec::new());
    for local_rank in 0..run.procs_per_worker {
        let mut command = Command::new(&run.command[0]);
        command.args(&run.command[1..]).current_dir(&dirs.workdir);
        command.env("PYTHONUNBUFFERED", "1").envs(&run.env);
        command.envs(contract_env(train.rank, train.world_size, local_rank, run.procs_per_worker, master));
        command.env("FLOTILLA_JOB_ID", &train.job_id).env("FLOTILLA_GENERATION", train.generation.to_string());
        command.env("FLOTILLA_CHECKPOINT_DIR", &dirs.checkpoints).env("FLOTILLA_PREEMPT_FILE", &dirs.preempt);
        if train.resume_from.is_some() {
            command.env("FLOTILLA_RESUME_FROM", &dirs.resume);
        } else {
            command.env_remove("FLOTILLA_RESUME_FROM");
        }
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        die_with_this_thread(&mut command);
        match command.spawn() {
            Ok(mut child) => {
                if let Some(out) = child.stdout.take() {
                    read_lines(out, local_rank, lines_tx.clone());
                }
                if let Some(err) = child.stderr.take() {
                    read_lines(err, local_rank, lines_tx.clone());
                }
                procs.0.push(Proc { local_rank, child, exited: None });
            }
            Err(e) => {
                return broken(
                    GenerationEnd::RetryableError,
                    resume_step,
                    format!("run.command[0] `{}` cannot be started in the workdir: {e}", run.command[0]),
                );
            }
        }
    }
    drop(lines_tx);
    let uploader =
        (train.rank == 0 && !train.job_prefix.is_empty()).then(|| start_uploader(context, train, &dirs, runtime));
    let mut watch = Watch {
        context,
        train,
        run,
        dirs: &dirs,
        notes,
        uploader,
        queued: BTreeSet::new(),
        started: Instant::now(),
        signalled: false,
        superseded: false,
        last_metrics: None,
        validation: None,
        validation_sent: false,
        recorded: None,
        upload_error: None,
        tail: VecDeque::new(),
    };
    watch.until_exit(&mut procs, &lines, progress);
    watch.finish(&procs, resume_step)
}

/// The uploader: node 0's complete checkpoint folders, uploaded and recorded in order.
fn start_uploader(
    context: &RankContext,
    train: &TrainAssignment,
    dirs: &RunDirs,
    runtime: &tokio::runtime::Handle,
) -> (mpsc::Sender<u64>, mpsc::Receiver<Uploaded>, std::thread::JoinHandle<()>) {
    let (steps_tx, steps) = mpsc::channel::<u64>();
    let (done_tx, done) = mpsc::channel::<Uploaded>();
    let (context, train, runtime) = (context.clone(), train.clone(), runtime.clone());
    let folder = dirs.checkpoints.clone();
    let thread = std::thread::spawn(move || {
        for step in steps {
            let started = Instant::now();
            let result = upload_one(&context, &train, &folder, step, &runtime);
            if result.is_ok() {
                crate::metrics::AGENT.checkpoints.inc();
                crate::metrics::AGENT.checkpoint_seconds.observe(started.elapsed().as_secs_f64());
                // Recorded: older local folders are no longer needed.
                for (older, path) in step_folders(&folder) {
                    if older < step {
                        let _ = std::fs::remove_dir_all(path);
                    }
                }
            }
            if done_tx.send(Uploaded { step, result }).is_err() {
                return;
            }
        }
    });
    (steps_tx, done, thread)
}

fn upload_one(
    context: &RankContext,
    train: &TrainAssignment,
    folder: &Path,
    step: u64,
    runtime: &tokio::runtime::Handle,
) -> Result<String, String> {
    let local = step_folders(folder).into_iter().find(|(s, _)| *s == step).map(|(_, path)| path);
    let local = local.ok_or_else(|| format!("checkpoint folder {}/{step} does not exist", folder.display()))?;
    let location = store::open(&train.job_prefix).map_err(|e| e.to_string())?;
    let prefix = state::step_prefix(location.prefix(), step, Some(&format!("g{}", train.generation)));
    let manifest = runtime
        .block_on(files::upload(location.store(), &local, &prefix))
        .map_err(|e| format!("uploading step {step}: {e}"))?;
    let uri = location.uri_of(&prefix);
    let checkpoint = CheckpointRef {
        step,
        uri: uri.clone(),
        size_bytes: manifest.total_bytes(),
        manifest_sha256: manifest.fingerprint(),
        cursor: None,
        pending: false,
    };
    record_checkpoint(context, train, runtime, checkpoint).map_err(|e| format!("recording step {step}: {e}"))?;
    Ok(uri)
}

/// The step folders under the checkpoint folder (names that are step numbers), by step.
fn step_folders(folder: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(folder) else { return Vec::new() };
    let mut out: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
        .collect();
    out.sort();
    out
}

/// The watch over one run: what the runner has learnt so far.
struct Watch<'a> {
    context: &'a RankContext,
    train: &'a TrainAssignment,
    run: &'a RunSpec,
    dirs: &'a RunDirs,
    notes: JobNotes,
    /// Node 0's uploader: steps to upload, what became of them, the thread.
    uploader: Option<(mpsc::Sender<u64>, mpsc::Receiver<Uploaded>, std::thread::JoinHandle<()>)>,
    /// Steps handed to the uploader (each once, in increasing order).
    queued: BTreeSet<u64>,
    started: Instant,
    /// A notice (or the coordinator) made the runner signal the program.
    signalled: bool,
    superseded: bool,
    last_metrics: Option<Metrics>,
    /// The program's newest validation (a metrics line of rank 0 with `val_accuracy`): its step,
    /// accuracy and loss; and whether a progress report carried it yet.
    validation: Option<(u64, f64, Option<f64>)>,
    validation_sent: bool,
    /// Newest checkpoint recorded through Raft: (step, URI).
    recorded: Option<(u64, String)>,
    upload_error: Option<String>,
    tail: VecDeque<String>,
}

impl Watch<'_> {
    /// Watches the processes until every one has exited (or the run is superseded), then waits
    /// for the last uploads.
    fn until_exit(
        &mut self,
        procs: &mut Procs,
        lines: &mpsc::Receiver<Line>,
        progress: &tokio::sync::mpsc::Sender<ProgressReport>,
    ) {
        let mut kill_at: Option<Instant> = None;
        let mut failed_at: Option<Instant> = None;
        let mut last_progress: Option<Instant> = None;
        let mut last_scan = Instant::now();
        loop {
            if self.context.stop.load(Ordering::Relaxed) {
                self.superseded = true;
                procs.kill_and_reap();
                break;
            }
            if kill_at.is_none() && self.context.stop_voted() {
                let now_ms = crate::unix_now_ms();
                let taken_at = self.context.notice_deadline_unix_ms();
                let deadline_ms = program_deadline_unix_ms(now_ms, taken_at);
                let deadline = deadline_ms / 1000;
                let _ = std::fs::write(&self.dirs.preempt, format!("{deadline}\n"));
                procs.signal_all(signal_of(self.run.notice_signal));
                kill_at = Some(Instant::now() + Duration::from_millis(deadline_ms - now_ms));
                self.signalled = true;
                let taken = taken_at.map_or("no time named".to_string(), |at| {
                    format!("instance taken at {}", flotilla_proto::text::rfc3339_utc(at))
                });
                self.notes.note(format!(
                    "notice ({taken}): sent {} to the program; it must exit by {} (unix {deadline})",
                    self.run.notice_signal.name(),
                    flotilla_proto::text::rfc3339_utc(deadline_ms)
                ));
            }
            if kill_at.is_some_and(|t| Instant::now() >= t) {
                procs.signal_all(Signal::SIGKILL);
            }
            // One process failed: its siblings cannot go on alone (their collectives would hang).
            if failed_at.is_none() && !self.signalled && procs.first_failure().is_some() {
                failed_at = Some(Instant::now());
                procs.signal_all(Signal::SIGTERM);
            }
            if failed_at.is_some_and(|t| t.elapsed() >= SIBLING_GRACE) {
                procs.signal_all(Signal::SIGKILL);
            }
            let all_exited = procs.poll();
            let deadline = Instant::now() + POLL;
            while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                self.on_line(line);
            }
            if last_scan.elapsed() >= SCAN_EVERY {
                last_scan = Instant::now();
                self.scan_complete();
            }
            self.collect_uploads();
            if let Some(metrics) = self.last_metrics
                && self.uploader.is_some()
                && last_progress.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY)
            {
                last_progress = Some(Instant::now());
                let _ = progress.try_send(self.progress_report(metrics));
            }
            self.notes.flush_if_due();
            if all_exited {
                break;
            }
        }
        if self.superseded {
            return; // the uploader finishes (or fails) on its own; nothing waits for it
        }
        // Late output (a marker or the final metrics printed just before exit), then every
        // queued upload.
        while let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
            self.on_line(line);
        }
        self.scan_complete();
        if let Some((steps, done, thread)) = self.uploader.take() {
            drop(steps);
            let _ = thread.join();
            for uploaded in done.try_iter() {
                self.on_uploaded(uploaded);
            }
        }
    }

    /// One line of a process's output: to the log and the tail; markers and metrics noted.
    fn on_line(&mut self, line: Line) {
        let rank = self.train.rank * self.run.procs_per_worker + line.local_rank;
        match parse_line(&line.text) {
            Some(Marker::Checkpoint(step)) => self.queue(step),
            Some(Marker::Metrics(metrics)) if line.local_rank == 0 => {
                if let Some(accuracy) = metrics.val_accuracy {
                    self.validation = Some((metrics.step, accuracy, metrics.val_loss));
                    self.validation_sent = false;
                }
                self.last_metrics = Some(metrics.after(self.last_metrics));
            }
            _ => {}
        }
        let text = format!("[rank {rank}] {}", line.text);
        self.notes.output(&text);
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(text);
    }

    /// Hands `step` to the uploader (node 0), once, if its folder exists and it is newer than
    /// what was handed over before.
    fn queue(&mut self, step: u64) {
        let Some((steps, _, _)) = &self.uploader else { return };
        if self.queued.last().is_none_or(|newest| step > *newest)
            && step_folders(&self.dirs.checkpoints).iter().any(|(s, _)| *s == step)
        {
            self.queued.insert(step);
            let _ = steps.send(step);
        }
    }

    /// Queues the step folders that hold a `COMPLETE` file.
    fn scan_complete(&mut self) {
        for (step, path) in step_folders(&self.dirs.checkpoints) {
            if path.join("COMPLETE").is_file() {
                self.queue(step);
            }
        }
    }

    fn collect_uploads(&mut self) {
        let done: Vec<Uploaded> =
            self.uploader.as_ref().map(|(_, done, _)| done.try_iter().collect()).unwrap_or_default();
        for uploaded in done {
            self.on_uploaded(uploaded);
        }
    }

    fn on_uploaded(&mut self, uploaded: Uploaded) {
        match uploaded.result {
            Ok(uri) => {
                self.notes.note(format!("checkpoint of step {} uploaded and recorded: {uri}", uploaded.step));
                self.recorded = Some((uploaded.step, uri));
                self.upload_error = None;
            }
            Err(e) => {
                self.notes.note(format!("checkpoint of step {} failed: {e}", uploaded.step));
                self.upload_error = Some(e);
            }
        }
    }

    /// A progress report of `metrics`, with the program's newest validation if no report
    /// carried it yet (status, `--follow` and the metrics history show it).
    fn progress_report(&mut self, metrics: Metrics) -> ProgressReport {
        let validation = self.validation.filter(|_| !self.validation_sent);
        self.validation_sent = true;
        let first_step = self.train.resume_from.as_ref().map_or(0, |c| c.step);
        let total = metrics.total_steps.unwrap_or(0);
        let done = metrics.step.saturating_sub(first_step).max(1);
        let eta_ms =
            (self.started.elapsed().as_millis() as u64 / done).saturating_mul(total.saturating_sub(metrics.step));
        ProgressReport {
            worker_id: self.context.worker_id(),
            job_id: self.train.job_id.clone(),
            generation: self.train.generation,
            rank: 0,
            step: metrics.step,
            loss: metrics.loss.unwrap_or(f64::NAN),
            samples_per_s: metrics.samples_per_s.unwrap_or(0.0),
            total_steps: total,
            eta_ms: if total > 0 { eta_ms } else { 0 },
            val_accuracy: validation.map(|(_, accuracy, _)| accuracy),
            val_loss: validation.and_then(|(_, _, loss)| loss),
            val_step: validation.map_or(0, |(step, _, _)| step),
            ..Default::default()
        }
    }

    /// How the generation ended on this rank.
    fn finish(mut self, procs: &Procs, resume_step: u64) -> RankEnd {
        let node0 = self.train.rank == 0;
        let reached = [self.last_metrics.map(|m| m.step), self.recorded.as_ref().map(|(step, _)| *step)]
            .into_iter()
            .flatten()
            .fold(resume_step, u64::max);
        if self.superseded || self.context.stop.load(Ordering::Relaxed) {
            return RankEnd::Superseded;
        }
        if self.signalled {
            if node0 && let Some(e) = self.upload_error {
                return broken(GenerationEnd::RetryableError, reached, format!("checkpoint before stopping: {e}"));
            }
            self.notes
                .note(format!("stopped at step {reached} for a checkpoint (generation {})", self.train.generation));
            return RankEnd::Checkpointed { step: reached, rank0: node0, announced: None };
        }
        if let Some((local_rank, status)) = procs.first_failure() {
            let rank = self.train.rank * self.run.procs_per_worker + local_rank;
            self.notes.note(format!("rank {rank} exited with {status}"));
            let tail: Vec<String> = self.tail.into_iter().collect();
            let error = format!("rank {rank} exited with {status}; its last lines:\n{}", tail.join("\n"));
            // A process that failed because a peer machine went away is not the program's fault.
            let end = if peers_alive(self.train) { GenerationEnd::RetryableError } else { GenerationEnd::PeerLost };
            return broken(end, reached, error);
        }
        if !node0 {
            return RankEnd::Finished(None);
        }
        let metrics = self.last_metrics.unwrap_or_default();
        self.notes.note(format!("finished at step {reached}: every process exited 0"));
        RankEnd::Finished(Some(Box::new(FinishedReport {
            worker_id: self.context.worker_id(),
            job_id: self.train.job_id.clone(),
            generation: self.train.generation,
            success: true,
            // The newest validation it printed, also when a line without one followed.
            metrics: Some(JobMetrics {
                val_accuracy: self.validation.map(|(_, accuracy, _)| accuracy),
                val_loss: self.validation.and_then(|(_, _, loss)| loss),
                train_loss: metrics.loss,
                samples_per_s: metrics.samples_per_s,
                val_step: 0,
            }),
            step: reached,
            end: GenerationEnd::Finished.into(),
            // The registry records the newest checkpoint as the model's artifact.
            artifact_uri: self.recorded.map(|(_, uri)| uri).unwrap_or_default(),
            ..Default::default()
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_deadline_leaves_the_upload_reserve_before_the_instance_ends() {
        let now = 1_000_000;
        assert_eq!(program_deadline_unix_ms(now, Some(now + 120_000)), now + 100_000, "EC2's two minutes");
        assert_eq!(program_deadline_unix_ms(now, Some(now + 60_000)), now + 40_000);
        assert_eq!(program_deadline_unix_ms(now, None), now + 100_000, "no time named");
        assert_eq!(program_deadline_unix_ms(now, Some(now + 3_000)), now + 5_000, "a late notice still gets 5 s");
        assert_eq!(program_deadline_unix_ms(now, Some(0)), now + 5_000);
    }

    #[test]
    fn the_contract_matches_torchrun() {
        let master: SocketAddr = "10.0.0.5:29500".parse().expect("address");
        let env = contract_env(2, 3, 1, 4, master);
        let get = |key: &str| env.iter().find(|(k, _)| *k == key).map(|(_, v)| v.as_str());
        assert_eq!(get("RANK"), Some("9"), "node 2 x 4 procs + local rank 1");
        assert_eq!(get("WORLD_SIZE"), Some("12"));
        assert_eq!(get("LOCAL_RANK"), Some("1"));
        assert_eq!(get("LOCAL_WORLD_SIZE"), Some("4"));
        assert_eq!(get("NODE_RANK"), Some("2"));
        assert_eq!(get("MASTER_ADDR"), Some("10.0.0.5"));
        assert_eq!(get("MASTER_PORT"), Some("29500"));
    }

    /// A validation line without the loss keeps the loss, rate and length an earlier line gave;
    /// a value a line has replaces the earlier one.
    #[test]
    fn a_line_without_a_value_keeps_the_earlier_one() {
        let progress = |line: &str| match parse_line(line) {
            Some(Marker::Metrics(metrics)) => metrics,
            other => panic!("{line}: {other:?}"),
        };
        let trained = progress(r#"{"step": 10, "loss": 0.5, "samples_per_s": 800, "total_steps": 40}"#).after(None);
        let validated = progress(r#"{"step": 10, "val_accuracy": 0.9, "val_loss": 0.3}"#).after(Some(trained));
        assert_eq!((validated.step, validated.loss, validated.samples_per_s), (10, Some(0.5), Some(800.0)));
        assert_eq!(
            (validated.total_steps, validated.val_accuracy, validated.val_loss),
            (Some(40), Some(0.9), Some(0.3))
        );
        let next = progress(r#"{"step": 11, "loss": 0.25}"#).after(Some(validated));
        assert_eq!((next.step, next.loss, next.samples_per_s, next.val_accuracy), (11, Some(0.25), Some(800.0), None));
    }

    #[test]
    fn output_lines_are_parsed_strictly() {
        assert_eq!(parse_line("FLOTILLA_CHECKPOINT 300"), Some(Marker::Checkpoint(300)));
        assert_eq!(parse_line("  FLOTILLA_CHECKPOINT  7 \r"), Some(Marker::Checkpoint(7)));
        assert_eq!(parse_line("FLOTILLA_CHECKPOINT -1"), None);
        assert_eq!(parse_line("epoch 3 loss 0.1"), None);
        assert_eq!(parse_line("{\"loss\": 0.5}"), None, "no step: not progress");
        let Some(Marker::Metrics(m)) =
            parse_line(r#"{"step": 12, "loss": 0.25, "samples_per_s": 800, "total_steps": 100, "val_accuracy": 1.5}"#)
        else {
            panic!("a metrics line");
        };
        assert_eq!((m.step, m.loss, m.samples_per_s, m.total_steps), (12, Some(0.25), Some(800.0), Some(100)));
        assert_eq!(m.val_accuracy, None, "an accuracy above 1 is not one");
    }
}
