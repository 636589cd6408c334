//! Helpers shared by the end-to-end tests that drive the real `flotilla` binary against a local
//! cluster in a temporary FLOTILLA_HOME (so no test sees the developer's own cluster).

#![allow(dead_code)] // each test file uses a subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `flotilla` binary with FLOTILLA_HOME set and every other cluster variable cleared.
pub fn command(home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flotilla"));
    command.env("FLOTILLA_HOME", home);
    for name in ["FLOTILLA_COORDINATOR", "FLOTILLA_TOKEN", "FLOTILLA_JOIN_TOKEN"] {
        command.env_remove(name);
    }
    command
}

/// Runs `flotilla ARGS` to completion.
pub fn run(home: &Path, args: &[&str]) -> Output {
    command(home).args(args).output().expect("the flotilla binary runs")
}

/// The standard output of a command that must have succeeded (else its output, in the panic).
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// End-to-end tests of one file start their clusters one at a time (they share the CPUs).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Holds the file's clusters to one at a time (for tests that start theirs without [`Local`]).
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A local cluster of `workers` in a temporary FLOTILLA_HOME, one test at a time; stopped and
/// deleted when dropped, even when an assertion fails.
pub struct Local {
    pub home: PathBuf,
    pub dir: tempfile::TempDir,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Local {
    pub fn up(workers: u32) -> Local {
        Local::up_with(workers, &[])
    }

    /// [`Local::up`] with more arguments for `flotilla up` (e.g. `--boot-delay-s`).
    pub fn up_with(workers: u32, more: &[&str]) -> Local {
        let serial = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join(".flotilla");
        let workers = workers.to_string();
        let up = run(&home, &[&["up", "--workers", workers.as_str()], more].concat());
        let local = Local { home, dir, _serial: serial };
        assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
        local
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = run(&self.home, &["down", "--purge"]);
    }
}

/// Stops and deletes the cluster even when an assertion fails.
pub struct Down<'a>(pub &'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = run(self.0, &["down", "--purge"]);
    }
}

/// The instance a local worker runs on (`flotilla workers` names it).
pub fn instance_of(home: &Path, worker: &str) -> String {
    let out = run(home, &["workers", "--all", "-o", "json"]);
    assert!(out.status.success(), "workers: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let workers: serde_json::Value = serde_json::from_str(text.lines().last().expect("output")).expect("JSON");
    workers
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["id"] == worker))
        .and_then(|w| w["instance_id"].as_str())
        .expect("the worker's instance")
        .to_string()
}

/// A local worker's agent log (the local provider writes it under `logs/`).
pub fn agent_log(home: &Path, worker: &str) -> PathBuf {
    home.join("logs").join(format!("{}.log", instance_of(home, worker)))
}

/// Polls `done` every `every` until it holds; fails after `limit` with `what` (called then,
/// so it can read the state it names).
pub fn eventually(limit: Duration, every: Duration, mut done: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{}", what());
        std::thread::sleep(every);
    }
}

/// The process id of a local worker's agent, from its instance record (the local provider
/// records the pid).
pub fn worker_pid(home: &Path, worker: &str) -> u64 {
    let instance = instance_of(home, worker);
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(home.join("instances").join(format!("{instance}.json"))).expect("instance record"),
    )
    .expect("record JSON");
    record["pid"].as_u64().expect("pid")
}

/// The process ids of the local cluster's coordinators, in node order, from `cluster.toml`
/// (`up` records them).
pub fn coordinator_pids(home: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(home.join("cluster.toml")).expect("cluster file");
    let file: toml::Value = toml::from_str(&text).expect("cluster TOML");
    let coordinators = file["coordinators"].as_array().expect("coordinators");
    coordinators.iter().filter_map(|c| c["pid"].as_integer()).map(|p| p as u64).collect()
}

/// The shipped MNIST 5k rows (label first), as text lines.
pub fn mnist_rows() -> Vec<String> {
    use std::io::Read;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/mnist_5k.csv.gz");
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("mnist")).read_to_string(&mut text).expect("gunzip");
    text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
}

/// The test's own S3 calls, through the same storage layer as the cluster, with the AWS
/// settings in `env` (name, value pairs).
pub mod s3 {
    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(future)
    }

    fn location(env: &[(String, String)], uri: &str) -> flotilla_store::Location {
        flotilla_store::open_with(uri, env.to_vec()).expect("location")
    }

    pub fn put(env: &[(String, String)], uri: &str, bytes: Vec<u8>) {
        use object_store::{ObjectStoreExt, PutPayload};
        let location = location(env, uri);
        block_on(location.store().put(location.prefix(), PutPayload::from(bytes))).expect("upload");
    }

    pub fn get(env: &[(String, String)], uri: &str) -> Vec<u8> {
        let location = location(env, uri);
        block_on(flotilla_store::get_capped(&location, location.prefix(), 1 << 30)).expect(uri).to_vec()
    }

    /// Every object's URI under `uri`.
    pub fn list(env: &[(String, String)], uri: &str) -> Vec<String> {
        let location = location(env, uri);
        let objects = block_on(flotilla_store::list(&location, location.prefix())).expect("list");
        objects.iter().map(|m| location.uri_of(&m.location)).collect()
    }
}

/// The last line of a command's standard output, as JSON (the command must succeed).
pub fn json(home: &Path, args: &[&str]) -> Value {
    let out = run(home, args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    serde_json::from_str(text.lines().last().expect("output")).expect("JSON")
}

pub fn status(home: &Path, job: &str) -> Value {
    json(home, &["status", job, "-o", "json"])
}

pub fn wait_for(home: &Path, job: &str, limit: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let s = status(home, job);
        if done(&s) {
            return s;
        }
        assert!(s["state"] != "Failed" && s["state"] != "Cancelled", "{job} ended while waiting for {what}: {s}");
        if started.elapsed() >= limit {
            let workers = String::from_utf8_lossy(&run(home, &["workers", "--all"]).stdout).to_string();
            panic!("{job}: no {what} after {limit:?}: {s}\n{workers}\n{}", logs(home, job));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn submit(home: &Path, spec: &Path) -> String {
    let out = run(home, &["submit", spec.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8").lines().last().expect("job id").trim().to_string()
}

/// The workers of `job`'s current gang, as `flotilla workers` lists them.
pub fn gang(home: &Path, job: &str) -> Vec<String> {
    let workers = json(home, &["workers", "--all", "-o", "json"]);
    let mut ids: Vec<String> = workers
        .as_array()
        .expect("a list")
        .iter()
        .filter(|w| w["job_id"] == job && w["state"] == "Busy")
        .map(|w| w["id"].as_str().expect("id").to_string())
        .collect();
    ids.sort();
    ids
}

pub fn logs(home: &Path, job: &str) -> String {
    String::from_utf8_lossy(&run(home, &["logs", job]).stdout).to_string()
}

/// `GET path` over HTTP/1.1 with optional extra header lines: (head, body).
pub fn http_get(address: &str, path: &str, headers: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("the metrics port answers");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\n{headers}\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_string(), body.to_string())
}

/// The local cluster's file (`cluster.toml`), parsed.
pub fn cluster_file(home: &Path) -> toml::Value {
    toml::from_str(&std::fs::read_to_string(home.join("cluster.toml")).expect("cluster.toml")).expect("toml")
}
