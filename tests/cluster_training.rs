//! The product loop, end to end with the real binary: `up` with 3 coordinators and 2 workers
//! (local provider), `submit` the MNIST example, and the job trains data-parallel on the workers to Succeeded with
//! validation accuracy >= 90% in `status --output json`, even when the leader coordinator is
//! killed during training. A job needing more workers than exist waits with a reason and starts
//! when capacity is added; `cancel` stops a running job and frees its workers. A leader killed
//! in the middle of a handover: exactly one replacement still takes the noticed rank.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{command as flotilla, run};

fn json(out: Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    serde_json::from_str(text.lines().last().expect("output")).expect("JSON")
}

struct Cluster<'a> {
    home: &'a Path,
    workers: Vec<Child>,
}

impl Cluster<'_> {
    fn add_worker(&mut self) {
        let child =
            flotilla(self.home).arg("worker").stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("worker");
        self.workers.push(child);
    }

    fn submit(&self, spec: &Path) -> String {
        let out = run(self.home, &["submit", spec.to_str().expect("utf-8")]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8").lines().last().expect("job id").trim().to_string()
    }

    fn status(&self, job: &str) -> serde_json::Value {
        json(run(self.home, &["status", job, "-o", "json"]))
    }

    fn wait_state(&self, job: &str, states: &[&str], limit: Duration) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let status = self.status(job);
            if states.iter().any(|s| status["state"] == *s) {
                return status;
            }
            assert!(started.elapsed() < limit, "{job} not in {states:?} after {limit:?}: {status}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn leader_pid(&self, leader: u64) -> i64 {
        let text = std::fs::read_to_string(self.home.join("cluster.toml")).expect("cluster file");
        let cluster: toml::Value = toml::from_str(&text).expect("cluster TOML");
        cluster["coordinators"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["id"].as_integer() == Some(leader as i64)))
            .and_then(|c| c["pid"].as_integer())
            .expect("the leader's pid")
    }
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = run(self.home, &["down", "--purge"]);
    }
}

#[test]
fn mnist_trains_on_the_cluster_through_a_leader_failure() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let cluster = Cluster { home: &home, workers: Vec::new() };
    let up = run(&home, &["up", "--coordinators", "3", "--workers", "2"]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    // The shipped example, trained longer so that the leader dies mid-training.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mnist-mlp.toml");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/mnist_5k.csv.gz");
    let text = std::fs::read_to_string(&example).expect("example").replace("epochs = 6", "epochs = 16");
    let text = text.replace("\"data/mnist_5k.csv.gz\"", &format!("\"{}\"", data.display()));
    let spec = dir.path().join("mnist-long.toml");
    std::fs::write(&spec, text).expect("spec");
    let job = cluster.submit(&spec);
    let running = cluster.wait_state(&job, &["Running", "Succeeded"], Duration::from_secs(60));
    assert_eq!(running["state"], "Running", "the job finished before the leader could be killed: {running}");
    assert_eq!(running["world_size"], 2);

    // Kill the leader coordinator while the gang trains: the job must still finish.
    // The leader is whoever acknowledges a write (`served_by` of a JSON submit).
    let submitted = run(&home, &["submit", example.to_str().expect("utf-8"), "-o", "json"]);
    let first = String::from_utf8_lossy(&submitted.stdout).lines().next().unwrap_or_default().to_string();
    let leader =
        serde_json::from_str::<serde_json::Value>(&first).expect("submit JSON")["served_by"].as_u64().expect("leader");
    let second = serde_json::from_str::<serde_json::Value>(&first).expect("submit JSON")["id"]
        .as_str()
        .expect("its id")
        .to_string();
    let pid = cluster.leader_pid(leader);
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill").success());

    let done = cluster.wait_state(&job, &["Succeeded", "Failed"], Duration::from_secs(180));
    assert_eq!(done["state"], "Succeeded", "{done}");
    let accuracy = done["metrics"]["val_accuracy"].as_f64().expect("validation accuracy");
    assert!(accuracy >= 0.90, "validation accuracy {accuracy}: {done}");
    assert_eq!(done["world_size"], 2);
    assert!(done["step"].as_u64().unwrap_or(0) > 0);

    // Rank 0's log, read back through the coordinator (`logs -f` returns once the job has ended).
    let logs = run(&home, &["logs", "-f", &job]);
    assert!(logs.status.success(), "{}", String::from_utf8_lossy(&logs.stderr));
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("training on 2 worker(s)") && logs.contains("finished at step"), "{logs}");

    // `status JOB --follow` follows a job submitted earlier (queued behind the first) to its
    // end, then shows it.
    let followed = run(&home, &["status", &second, "--follow", "-o", "json"]);
    assert!(followed.status.success(), "{}", String::from_utf8_lossy(&followed.stderr));
    assert!(String::from_utf8_lossy(&followed.stderr).contains(&format!("{second} Succeeded")));
    assert_eq!(json(followed)["state"], "Succeeded");

    // `submit --follow` shows progress and returns when the job ends, the id on stdout's last line.
    let followed = run(&home, &["submit", example.to_str().expect("utf-8"), "--follow"]);
    assert!(followed.status.success(), "{}", String::from_utf8_lossy(&followed.stderr));
    let stderr = String::from_utf8_lossy(&followed.stderr);
    assert!(stderr.contains("Succeeded") && stderr.contains("world 2") && stderr.contains("val_accuracy"), "{stderr}");
    let stdout = String::from_utf8_lossy(&followed.stdout);
    assert!(stdout.lines().last().is_some_and(|l| l.starts_with("job-")), "{stdout}");
}

#[test]
fn a_job_too_big_waits_with_a_reason_then_starts_and_cancel_frees_workers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let mut cluster = Cluster { home: &home, workers: Vec::new() };
    assert!(run(&home, &["up"]).status.success());
    cluster.add_worker();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv");
    let spec = dir.path().join("big.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"big\"\nmodel = {{ kind = \"mlp\", hidden = [32] }}\ndata = {{ train = \"{}\" }}\n\
             train = {{ steps = 100000, batch_size = 16 }}\nworkers = {{ min = 2, max = 2 }}\n",
            data.display()
        ),
    )
    .expect("spec");
    let job = cluster.submit(&spec);
    let started = Instant::now();
    let waiting = loop {
        let status = cluster.status(&job);
        if status["reason"].as_str().unwrap_or_default().contains("waiting for 2 free worker(s)") {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no scheduler reason: {status}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(waiting["state"], "Pending");

    cluster.add_worker(); // capacity arrives: the job starts
    cluster.wait_state(&job, &["Running"], Duration::from_secs(60));
    let cancelled = run(&home, &["cancel", &job]);
    assert!(cancelled.status.success(), "{}", String::from_utf8_lossy(&cancelled.stderr));
    let started = Instant::now();
    loop {
        let workers = json(run(&home, &["workers", "--all", "-o", "json"]));
        let idle = workers
            .as_array()
            .map_or(0, |ws| ws.iter().filter(|w| w["state"] == "Idle" && w["job_id"].is_null()).count());
        if idle == 2 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "workers not freed: {workers}");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(cluster.status(&job)["state"], "Cancelled");
    // Following a job that did not succeed ends with exit status 1 and its end.
    let followed = run(&home, &["status", &job, "-f"]);
    let stderr = String::from_utf8_lossy(&followed.stderr);
    assert!(!followed.status.success() && stderr.contains(&format!("{job} ended Cancelled")), "{stderr}");
}

#[test]
fn a_killed_worker_costs_at_most_one_checkpoint_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let mut cluster = Cluster { home: &home, workers: Vec::new() };
    let up = run(&home, &["up", "--workers", "2"]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/mnist_5k.csv.gz");
    let spec = dir.path().join("mnist-ckpt.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"mnist-ckpt\"\nmodel = {{ kind = \"mlp\", hidden = [256, 128] }}\ndata = {{ train = \"{}\" }}\n\
             train = {{ epochs = 16, batch_size = 64 }}\nworkers = {{ min = 2, max = 2 }}\ncheckpoint = {{ every_steps = 20 }}\n",
            data.display()
        ),
    )
    .expect("spec");
    let job = cluster.submit(&spec);
    let started = Instant::now();
    let checkpointed = loop {
        let status = cluster.status(&job);
        if status["latest_checkpoint"]["step"].as_u64().unwrap_or(0) >= 40 {
            break status["latest_checkpoint"]["step"].as_u64().unwrap_or(0);
        }
        assert!(status["state"] != "Succeeded", "finished before the kill: {status}");
        assert!(started.elapsed() < Duration::from_secs(60), "no checkpoint recorded: {status}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let killed = run(&home, &["preempt", "worker-1", "--hard"]);
    assert!(killed.status.success(), "{}", String::from_utf8_lossy(&killed.stderr));
    cluster.add_worker(); // replacement capacity
    let done = cluster.wait_state(&job, &["Succeeded", "Failed"], Duration::from_secs(180));
    assert_eq!(done["state"], "Succeeded", "{done}");
    assert!(done["generation"].as_u64().unwrap_or(0) >= 2, "a new generation formed: {done}");
    assert!(done["recoveries"].as_u64().unwrap_or(0) >= 1, "{done}");
    let accuracy = done["metrics"]["val_accuracy"].as_f64().expect("validation accuracy");
    assert!(accuracy >= 0.90, "validation accuracy {accuracy}: {done}");
    let logs = String::from_utf8_lossy(&run(&home, &["logs", &job]).stdout).to_string();
    let resumed: u64 = logs
        .lines()
        .find_map(|l| l.strip_prefix("resuming from the checkpoint of step "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the new generation did not resume from a checkpoint:\n{logs}"));
    assert!(resumed >= checkpointed, "resumed at {resumed}, an older checkpoint than {checkpointed}");
}

/// A leader change in the middle of a handover (issue 25): a gang member gets a two-minute
/// spot notice, and the leader that recorded it is killed while the replacement it asked for
/// still "boots" (`up --boot-delay-s`), so that launch dies with it. The new leader asks again
/// for the handover that still waits (the launch's client token makes it one worker, whoever
/// asks), the replacement takes the noticed rank, and nothing is lost or doubled.
/// A spec that trains a small MLP on the digits example until cancelled (two workers,
/// `every_steps` between checkpoints), for tests that interrupt a running job.
fn endless_digits_spec(dir: &Path, name: &str, every_steps: u64) -> std::path::PathBuf {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv");
    let spec = dir.join(format!("{name}.toml"));
    std::fs::write(
        &spec,
        format!(
            "name = \"{name}\"\nmodel = {{ kind = \"mlp\", hidden = [32] }}\ndata = {{ train = \"{}\" }}\n\
             train = {{ steps = 1000000, batch_size = 16 }}\nworkers = {{ min = 2, max = 2 }}\n\
             checkpoint = {{ every_steps = {every_steps} }}\n",
            data.display()
        ),
    )
    .expect("spec");
    spec
}

#[test]
fn a_leader_killed_mid_handover_still_hands_over_to_exactly_one_replacement() {
    leader_killed_mid_handover(false);
}

/// The same with live handovers (issue 25): the new leader starts the live handover, the
/// replacement is swapped in without a stop, in the same generation, exactly once.
#[test]
fn a_leader_killed_mid_live_handover_still_swaps_in_exactly_one_replacement() {
    leader_killed_mid_handover(true);
}

fn leader_killed_mid_handover(live: bool) {
    const BOOT_S: u64 = 5;
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let cluster = Cluster { home: &home, workers: Vec::new() };
    let boot = BOOT_S.to_string();
    let live_handover = if live { "true" } else { "false" };
    let up_args =
        ["up", "--coordinators", "3", "--workers", "2", "--boot-delay-s", &boot, "--live-handover", live_handover];
    let up = run(&home, &up_args);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let spec = endless_digits_spec(dir.path(), "handover", 2000);
    let submitted = run(&home, &["submit", spec.to_str().expect("utf-8"), "-o", "json"]);
    assert!(submitted.status.success(), "{}", String::from_utf8_lossy(&submitted.stderr));
    let first = String::from_utf8_lossy(&submitted.stdout).lines().next().unwrap_or_default().to_string();
    let submitted: serde_json::Value = serde_json::from_str(&first).expect("submit JSON");
    let job = submitted["id"].as_str().expect("job id").to_string();
    let leader = submitted["served_by"].as_u64().expect("the leader served the submission");
    cluster.wait_state(&job, &["Running"], Duration::from_secs(60));
    let started = Instant::now();
    while cluster.status(&job)["step"].as_u64().unwrap_or(0) < 20 {
        assert!(started.elapsed() < Duration::from_secs(60), "no progress: {}", cluster.status(&job));
        std::thread::sleep(Duration::from_millis(100));
    }

    let workers = json(run(&home, &["workers", "--all", "-o", "json"]));
    let noticed = workers.as_array().and_then(|ws| ws.first()).and_then(|w| w["id"].as_str()).expect("a worker");
    let noticed = noticed.to_string();
    let preempted = run(&home, &["preempt", &noticed]);
    assert!(preempted.status.success(), "{}", String::from_utf8_lossy(&preempted.stderr));
    let started = Instant::now();
    loop {
        let status = cluster.status(&job);
        let sought = status["events"].as_array().is_some_and(|events| {
            events.iter().any(|e| {
                e["kind"] == "preemption_notice"
                    && e["message"].as_str().is_some_and(|m| m.contains("while a replacement is sought"))
            })
        });
        if sought {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the notice was not recorded as a handover: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = cluster.leader_pid(leader);
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill").success());
    // The killed leader's launch was still waiting out the boot delay: any replacement now
    // comes from the new leader.
    assert!(started.elapsed() < Duration::from_secs(BOOT_S - 1), "the kill came too late to test anything");

    let handed = |status: &serde_json::Value| -> Vec<String> {
        status["events"]
            .as_array()
            .map(|events| {
                events
                    .iter()
                    .filter(|e| e["kind"] == "handover")
                    .filter_map(|e| e["message"].as_str())
                    .filter(|m| m.contains("'s rank at step"))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let started = Instant::now();
    let after = loop {
        let status = cluster.status(&job);
        // A live handover keeps the generation; the stop-and-regroup one starts the next.
        let regrouped = status["generation"].as_u64() >= Some(2);
        if !handed(&status).is_empty() && status["state"] == "Running" && regrouped != live {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no handover after the leader change: {status}");
        std::thread::sleep(Duration::from_millis(250));
    };
    // Another launch, had one been made, would register within the boot delay: wait it out.
    std::thread::sleep(Duration::from_secs(BOOT_S + 3));
    let workers = json(run(&home, &["workers", "--all", "-o", "json"]));
    assert_eq!(workers.as_array().map_or(0, Vec::len), 3, "2 workers + exactly one replacement: {workers}");
    let status = cluster.status(&job);
    let handovers = handed(&status);
    assert_eq!(handovers.len(), 1, "{status}");
    assert!(handovers[0].contains(&format!("took {noticed}'s rank")), "{}", handovers[0]);
    assert_eq!(handovers[0].contains("without a stop"), live, "{}", handovers[0]);
    if live {
        assert_eq!(status["generation"], 1, "no regroup: {status}");
    }
    assert_eq!(status["steps_lost"], 0, "{status}");
    assert_eq!(status["preemptions"], 1, "{status}");
    assert_eq!(status["recoveries"], 0, "{status}");
    assert!(status["step"].as_u64() >= after["step"].as_u64(), "{status}");
    assert_eq!(status["state"], "Running", "{status}");
    let cancelled = run(&home, &["cancel", &job]);
    assert!(cancelled.status.success(), "{}", String::from_utf8_lossy(&cancelled.stderr));
}

/// The whole control plane restarted under a running job, as coordinators are upgraded (stop
/// them all, replace the binary, start them again; see README "Upgrades"): every coordinator
/// SIGKILLed, down for longer than a worker's lease, then started again by `up`. The gang keeps
/// its generation: it trains until rank 0 must record its next checkpoint, waits for the
/// coordinators, and goes on; nobody is lost, no step is trained twice, the job succeeds.
#[test]
fn the_whole_control_plane_restarted_under_a_running_job_keeps_its_gang() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let cluster = Cluster { home: &home, workers: Vec::new() };
    let up = run(&home, &["up", "--coordinators", "3", "--workers", "2"]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let spec = endless_digits_spec(dir.path(), "outage", 50);
    let text = std::fs::read_to_string(&spec).expect("spec").replace("steps = 1000000", "steps = 3000");
    std::fs::write(&spec, text).expect("spec");
    let job = cluster.submit(&spec);
    let started = Instant::now();
    while cluster.status(&job)["step"].as_u64().unwrap_or(0) < 100 {
        assert!(started.elapsed() < Duration::from_secs(60), "no progress: {}", cluster.status(&job));
        std::thread::sleep(Duration::from_millis(100));
    }
    let pids: Vec<String> = common::coordinator_pids(&home).iter().map(u64::to_string).collect();
    assert_eq!(pids.len(), 3, "{pids:?}");
    let killed = Command::new("kill").arg("-KILL").args(&pids).status().expect("kill");
    assert!(killed.success());
    std::thread::sleep(Duration::from_secs(7)); // longer than a worker's 5 s lease
    let again = run(&home, &["up", "--coordinators", "3"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let done = cluster.wait_state(&job, &["Succeeded", "Failed"], Duration::from_secs(180));
    assert_eq!(done["state"], "Succeeded", "{done}");
    assert_eq!(done["generation"], 1, "the gang was kept: {done}");
    assert_eq!((done["recoveries"].as_u64(), done["steps_lost"].as_u64()), (Some(0), Some(0)), "{done}");
    let kinds: Vec<&str> =
        done["events"].as_array().expect("events").iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(!kinds.iter().any(|k| k.contains("lost")), "{done}");
}

/// The handover's fallback end to end: a notice with time for a handover, but the only
/// replacement (the local provider's, `up --boot-delay-s`) registers after the fallback time
/// (45 s before the instance is taken). The gang trains on until then, stops at a checkpoint
/// as after any notice, and resumes from exactly that step once the replacement is there: no
/// step lost, no handover recorded.
#[test]
fn a_replacement_too_late_for_the_handover_falls_back_to_checkpoint_and_wait() {
    const NOTICE_S: u64 = 65; // fallback 20 s after the notice
    const BOOT_S: u64 = 26;
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let cluster = Cluster { home: &home, workers: Vec::new() };
    let up = run(&home, &["up", "--workers", "2", "--boot-delay-s", &BOOT_S.to_string()]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let spec = endless_digits_spec(dir.path(), "fallback", 100000);
    let job = cluster.submit(&spec);
    cluster.wait_state(&job, &["Running"], Duration::from_secs(60));
    let workers = json(run(&home, &["workers", "--all", "-o", "json"]));
    let noticed = workers.as_array().and_then(|ws| ws.first()).and_then(|w| w["id"].as_str()).expect("a worker");
    let preempted = run(&home, &["preempt", noticed, "--notice-s", &NOTICE_S.to_string()]);
    assert!(preempted.status.success(), "{}", String::from_utf8_lossy(&preempted.stderr));
    let noticed_at = Instant::now();
    let events = |status: &serde_json::Value, kind: &str| -> Vec<String> {
        status["events"]
            .as_array()
            .map(|events| {
                events
                    .iter()
                    .filter(|e| e["kind"] == kind)
                    .filter_map(|e| e["message"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    // The gang trains on through the notice, then stops at the fallback time.
    let stopped = loop {
        let status = cluster.status(&job);
        if status["generation"].as_u64() >= Some(2) || status["state"] == "Recovering" {
            break status;
        }
        assert!(noticed_at.elapsed() < Duration::from_secs(NOTICE_S), "no stop by the fallback time: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let stopped_after = noticed_at.elapsed();
    assert!(
        events(&stopped, "preemption_notice").iter().any(|m| m.contains("while a replacement is sought")),
        "a handover was sought first: {stopped}"
    );
    assert!(stopped_after >= Duration::from_secs(15), "trained on until the fallback, stopped after {stopped_after:?}");
    assert!(stopped_after < Duration::from_secs(BOOT_S), "stopped before the replacement came: {stopped_after:?}");
    // It resumes on the replacement once that registers, from the step it stopped at.
    let resumed = cluster.wait_state(&job, &["Running"], Duration::from_secs(BOOT_S + 30));
    assert!(resumed["generation"].as_u64() >= Some(2), "{resumed}");
    let started = Instant::now();
    let status = loop {
        let status = cluster.status(&job);
        if status["step"].as_u64() > status["latest_checkpoint"]["step"].as_u64() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no step after the resume: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!((status["steps_lost"].as_u64(), status["preemptions"].as_u64()), (Some(0), Some(1)), "{status}");
    assert!(
        events(&status, "handover").iter().all(|m| !m.contains("'s rank at step")),
        "no handover took place: {status}"
    );
    assert!(
        events(&status, "checkpointed").iter().any(|m| m.contains("stopped for preemption")),
        "the notice path's checkpoint: {status}"
    );
    let cancelled = run(&home, &["cancel", &job]);
    assert!(cancelled.status.success(), "{}", String::from_utf8_lossy(&cancelled.stderr));
}
