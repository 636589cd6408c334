//! Command jobs end to end: the real binary on a local cluster runs a stdlib-only Python
//! program (`tests/command/ranks.py`, a stand-in for a DDP script) under the torchrun contract.
//!
//! - the environment contract is exact on every rank of 2 workers x 2 processes, MASTER_ADDR:
//!   MASTER_PORT reaches rank 0, the workdir is unpacked; a spot notice makes the program
//!   checkpoint and exit, and the next generation resumes at the next step (zero lost);
//! - SIGKILL of a member's agent: the job resumes from the newest recorded checkpoint, and the
//!   killed agent's processes die with it;
//! - a program that exits non-zero feeds the failure policy (max_failures);
//! - a workdir over the limit is refused at submit with the limit and the biggest files.

use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;
use common::{Local, gang, logs, run, status, submit, wait_for};
use serde_json::Value;

/// A job folder: the workdir (the program and a payload), the spec, and `out/` for what the
/// program reports.
struct Job {
    dir: tempfile::TempDir,
}

impl Job {
    fn new(workers: u32, procs: u32, env: &str, max_failures: u32) -> Job {
        let dir = tempfile::tempdir().expect("tempdir");
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).expect("workdir");
        std::fs::create_dir_all(dir.path().join("out")).expect("out");
        let program = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/command/ranks.py");
        std::fs::copy(program, work.join("ranks.py")).expect("copy the program");
        std::fs::write(work.join("payload.txt"), "hello-workdir\n").expect("payload");
        let spec = format!(
            "name = \"ranks\"\nworkers = {{ min = {workers}, max = {workers} }}\n\
             capacity = {{ max_failures = {max_failures} }}\n\
             [run]\ncommand = [\"python3\", \"ranks.py\"]\nworkdir = \"work\"\nprocs_per_worker = {procs}\n\
             env = {{ OUT = \"{}\", {env} }}\n",
            dir.path().join("out").display()
        );
        std::fs::write(dir.path().join("job.toml"), spec).expect("spec");
        Job { dir }
    }

    fn spec(&self) -> PathBuf {
        self.dir.path().join("job.toml")
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join("out").join(name)
    }

    fn env_of(&self, generation: u64, rank: u64) -> Value {
        let text = std::fs::read_to_string(self.out(&format!("env-g{generation}-r{rank}.json")))
            .unwrap_or_else(|e| panic!("generation {generation} rank {rank} wrote no env: {e}"));
        serde_json::from_str(&text).expect("env JSON")
    }

    /// (generation, step) lines a rank wrote, in order.
    fn steps(&self, rank: u64) -> Vec<(u64, u64)> {
        let text = std::fs::read_to_string(self.out(&format!("steps-r{rank}.txt"))).expect("steps");
        text.lines()
            .map(|line| {
                let (g, step) = line.split_once(' ').expect("g<gen> <step>");
                (g[1..].parse().expect("generation"), step.parse().expect("step"))
            })
            .collect()
    }

    fn generations(&self) -> Vec<u64> {
        let mut out: Vec<u64> = std::fs::read_dir(self.dir.path().join("out"))
            .expect("out")
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                name.strip_prefix("env-g")?.split_once("-r0.json")?.0.parse().ok()
            })
            .collect();
        out.sort();
        out
    }
}

#[test]
fn the_contract_holds_and_a_notice_resumes_at_the_next_step() {
    let cluster = Local::up(2);
    let home = cluster.home.as_path();
    let job = Job::new(2, 2, "STEPS = \"40\", STEP_S = \"0.1\", CKPT_EVERY = \"5\"", 3);
    let id = submit(home, &job.spec());
    wait_for(home, &id, Duration::from_secs(120), "step 12", |s| s["step"].as_u64().is_some_and(|s| s >= 12));
    let members = gang(home, &id);
    assert_eq!(members.len(), 2, "{members:?}");
    // A 60 s notice: every rank's deadline is the instance's end less the upload reserve (20 s),
    // on the noticed worker (its own metadata) and on the other (through the coordinator).
    let noticed = run(home, &["preempt", &members[1], "--notice-s", "60", "-o", "json"]);
    assert!(noticed.status.success(), "{}", String::from_utf8_lossy(&noticed.stderr));
    let noticed: Value = serde_json::from_slice(&noticed.stdout).expect("preempt prints JSON");
    let taken_at_ms = noticed["taken_at_unix_ms"].as_u64().expect("the time the instance is taken");
    let done = wait_for(home, &id, Duration::from_secs(180), "success", |s| s["state"] == "Succeeded");

    // The contract, exact on all 4 ranks of the first generation.
    let first: Vec<Value> = (0..4).map(|rank| job.env_of(1, rank)).collect();
    for (rank, env) in first.iter().enumerate() {
        assert_eq!(env["RANK"], rank.to_string(), "{env}");
        assert_eq!(env["WORLD_SIZE"], "4", "{env}");
        assert_eq!(env["LOCAL_RANK"], (rank % 2).to_string(), "{env}");
        assert_eq!(env["LOCAL_WORLD_SIZE"], "2", "{env}");
        assert_eq!(env["NODE_RANK"], (rank / 2).to_string(), "{env}");
        assert_eq!(env["MASTER_ADDR"], first[0]["MASTER_ADDR"], "{env}");
        assert_eq!(env["MASTER_PORT"], first[0]["MASTER_PORT"], "{env}");
        assert_eq!(env["FLOTILLA_JOB_ID"], id.as_str(), "{env}");
        assert_eq!(env["FLOTILLA_GENERATION"], "1", "{env}");
        assert_eq!(env["FLOTILLA_RESUME_FROM"], Value::Null, "a fresh start has nothing to resume: {env}");
        assert!(env["FLOTILLA_CHECKPOINT_DIR"].as_str().is_some_and(|d| d.starts_with('/')), "{env}");
        assert!(env["FLOTILLA_PREEMPT_FILE"].is_string(), "{env}");
        assert_eq!(env["cwd_payload"], "hello-workdir", "the workdir is the current folder: {env}");
    }
    assert_eq!(first[0]["MASTER_ADDR"], "127.0.0.1");
    // Every other rank reached rank 0 at MASTER_ADDR:MASTER_PORT.
    let met: Value =
        serde_json::from_str(&std::fs::read_to_string(job.out("rendezvous-g1.json")).expect("met")).expect("JSON");
    assert_eq!(met, serde_json::json!([1, 2, 3]));
    let expected = ((taken_at_ms - 20_000) / 1000).to_string();
    for rank in 0..4 {
        let deadline = std::fs::read_to_string(job.out(&format!("preempt-g1-r{rank}.txt"))).expect("a deadline");
        assert_eq!(deadline.trim(), expected, "rank {rank}: the deadline comes from the notice's time");
    }

    // The notice: generation 1 checkpointed where it stopped; the last one resumed from it.
    let generations = job.generations();
    let last = *generations.last().expect("generations");
    assert!(last >= 2, "a notice starts a new generation: {generations:?}");
    assert!(job.env_of(last, 0)["FLOTILLA_RESUME_FROM"].is_string());
    let steps = job.steps(0);
    let all: Vec<u64> = steps.iter().map(|(_, step)| *step).collect();
    assert_eq!(all, (1..=40).collect::<Vec<u64>>(), "rank 0 ran every step exactly once: {steps:?}");
    let stopped = steps.iter().filter(|(g, _)| *g == 1).map(|(_, s)| *s).max().expect("generation 1 steps");
    let resumed = steps.iter().find(|(g, _)| *g > 1).map(|(_, s)| *s).expect("a later generation");
    assert_eq!(resumed, stopped + 1, "the step continues: {steps:?}");
    assert_eq!(done["steps_lost"], 0, "{done}");
    assert_eq!(done["preemptions"], 1, "{done}");
    assert_eq!(done["step"], 40, "{done}");
    assert_eq!(done["metrics"]["val_accuracy"], 0.75, "metric lines feed status: {done}");
    // Its validations while it trained (every 10 steps: accuracy step / 100) are points of the
    // job's metrics history at their steps.
    let history = run(home, &["history", &id, "--points", "10000", "-o", "json"]);
    let history: Value = serde_json::from_slice(&history.stdout).expect("history prints JSON");
    let validated: Vec<(u64, f64)> = history["points"]
        .as_array()
        .expect("points")
        .iter()
        .filter(|p| p["step"].as_u64().is_some_and(|s| s < 40))
        .filter_map(|p| Some((p["step"].as_u64()?, p["val_accuracy"].as_f64()?)))
        .collect();
    assert!(!validated.is_empty(), "{history}");
    assert!(validated.iter().all(|(step, accuracy)| step % 10 == 0 && *accuracy == *step as f64 / 100.0), "{history}");
    // A progress report after a validation line (which has no loss) keeps the loss before it.
    let progress = history["points"].as_array().expect("points").iter().filter(|p| p["val_accuracy"].is_null());
    assert!(progress.clone().count() >= 3 && progress.clone().all(|p| p["loss"].is_number()), "{history}");
    let log = logs(home, &id);
    assert!(log.contains("[rank 0] FLOTILLA_CHECKPOINT 40"), "{log}");
    assert!(log.contains("uploaded and recorded"), "{log}");
    // Worker 1's processes (ranks 2 and 3) have a log of their own.
    let node1 = String::from_utf8_lossy(&run(home, &["logs", &id, "--node", "1"]).stdout).to_string();
    assert!(node1.contains("[rank 2]") && node1.contains("[rank 3]"), "{node1}");
    assert!(!node1.contains("[rank 0]"), "node 1's log holds its own ranks only: {node1}");
}

#[test]
fn a_killed_member_resumes_from_the_recorded_checkpoint() {
    let cluster = Local::up(2);
    let home = cluster.home.as_path();
    let job = Job::new(2, 1, "STEPS = \"40\", STEP_S = \"0.1\", CKPT_EVERY = \"5\"", 3);
    let id = submit(home, &job.spec());
    wait_for(home, &id, Duration::from_secs(120), "step 13", |s| s["step"].as_u64().is_some_and(|s| s >= 13));
    let members = gang(home, &id);
    let killed = run(home, &["preempt", &members[0], "--hard"]);
    assert!(killed.status.success(), "{}", String::from_utf8_lossy(&killed.stderr));
    let done = wait_for(home, &id, Duration::from_secs(180), "success", |s| s["state"] == "Succeeded");
    assert!(done["recoveries"].as_u64().is_some_and(|r| r >= 1), "{done}");

    for rank in 0..2 {
        let steps = job.steps(rank);
        // Generations never interleave: the killed agent's processes died with it.
        assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0), "rank {rank}: {steps:?}");
        assert_eq!(steps.last().map(|(_, s)| *s), Some(40), "rank {rank}: {steps:?}");
    }
    let steps = job.steps(0);
    let generations = job.generations();
    let second = generations[1];
    let resumed = steps.iter().find(|(g, _)| *g == second).map(|(_, s)| *s).expect("a second generation");
    let reached = steps.iter().filter(|(g, _)| *g < second).map(|(_, s)| *s).max().expect("first steps");
    // Resumed right after a recorded checkpoint (every 5 steps), at most one interval back.
    assert_eq!((resumed - 1) % 5, 0, "{steps:?}");
    assert!(resumed + 5 > reached, "lost at most one checkpoint interval: {steps:?}");
    assert!(resumed > 1, "a checkpoint had been recorded before the kill: {steps:?}");
}

#[test]
fn a_failing_program_feeds_the_failure_policy() {
    let cluster = Local::up(1);
    let home = cluster.home.as_path();
    // 25 progress lines before each failure (no checkpoint: every try starts at 0): the last 20
    // lines are more than a reason holds.
    let job = Job::new(1, 1, "STEPS = \"40\", STEP_S = \"0.02\", FAIL_AT = \"25\", CKPT_EVERY = \"100\"", 2);
    let id = submit(home, &job.spec());
    let mut last = Value::Null;
    for _ in 0..1200 {
        last = status(home, &id);
        if last["state"] == "Failed" || last["state"] == "Succeeded" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(last["state"], "Failed", "{last}");
    let reason = last["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("exit status: 3"), "the exit status is the reason: {last}");
    // Cut to fit in the middle: the program's last words stay (only its first were kept).
    assert!(reason.len() <= 1024 && reason.contains(" … "), "{reason}");
    assert!(reason.contains("simulated failure"), "the last lines before the exit are kept: {reason}");
    assert!(job.generations().len() >= 2, "the first failure was retried (max_failures = 2)");
}

#[test]
fn an_oversized_workdir_is_refused_at_submit() {
    let job = Job::new(1, 1, "STEPS = \"1\"", 1);
    // Incompressible bytes, above the 64 MiB limit once packed.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let noise: Vec<u8> = (0..(66u64 << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(job.dir.path().join("work/weights.bin"), noise).expect("big file");
    let home = job.dir.path().join(".flotilla");
    let out = common::command(&home)
        .args(["submit", job.spec().to_str().expect("utf-8")])
        .env("FLOTILLA_COORDINATOR", "127.0.0.1:9")
        .env("FLOTILLA_TOKEN", "unused")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("run.workdir") && stderr.contains("67108864"), "{stderr}");
    assert!(stderr.contains("weights.bin (69206016 bytes)"), "the biggest file is named: {stderr}");
}
