//! `flotilla up / submit / status / down` as a user runs them: the real binary, a 3-node local
//! cluster in a temporary FLOTILLA_HOME.

use std::path::Path;
use std::time::Duration;

mod common;
use common::{Down, coordinator_pids, eventually, ok, run as flotilla};

#[test]
fn up_submit_status_down_and_up_again_keeps_jobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let _down = Down(&home);
    let up = ok(flotilla(&home, &["up", "--coordinators", "3", "--workers", "1", "--output", "json"]));
    let up: serde_json::Value = serde_json::from_str(&up).expect("up prints JSON");
    assert_eq!(up["coordinators"].as_array().map(Vec::len), Some(3));
    assert!(home.join("cluster.toml").exists());

    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mnist-mlp.toml");
    // `--set` changes a field of the file for this job: its status shows the spec it runs.
    let submitted =
        ok(flotilla(&home, &["submit", example.to_str().expect("utf-8"), "--set", "train.learning_rate=0.003"]));
    let job_id = submitted.lines().last().expect("the job id is on the last line").trim().to_string();
    assert_eq!(job_id, "job-1");

    let status = ok(flotilla(&home, &["status", &job_id, "--output", "json"]));
    let status: serde_json::Value = serde_json::from_str(&status).expect("status prints one JSON object");
    for key in [
        "id",
        "name",
        "state",
        "reason",
        "step",
        "total_steps",
        "world_size",
        "generation",
        "recoveries",
        "steps_lost",
        "metrics",
        "cost_usd",
        "served_by",
    ] {
        assert!(status.get(key).is_some(), "status JSON lacks `{key}`: {status}");
    }
    assert_eq!(status["state"], "Pending");
    assert_eq!(status["name"], "mnist-mlp");
    assert_eq!(status["spec"]["train"]["learning_rate"], 0.003, "{status}");
    assert_eq!(status["spec"]["model"]["hidden"], serde_json::json!([256, 128]), "the file's fields: {status}");
    assert!(status["metrics"].get("val_accuracy").is_some());

    // `status --state` lists the jobs in those states only; a state that does not exist is
    // refused with the ones that do.
    let listed = |states: &[&str]| -> Vec<String> {
        let filter: Vec<&str> = states.iter().flat_map(|s| ["--state", *s]).collect();
        let out = ok(flotilla(&home, &[&["status", "-o", "json"][..], &filter].concat()));
        let jobs: serde_json::Value = serde_json::from_str(&out).expect("status prints a JSON array");
        jobs.as_array().expect("array").iter().filter_map(|j| j["id"].as_str().map(str::to_string)).collect()
    };
    assert_eq!(listed(&["pending"]), ["job-1"]);
    assert_eq!(listed(&["running", "pending"]), ["job-1"]);
    assert!(listed(&["running", "recovering"]).is_empty());
    let unknown = flotilla(&home, &["status", "--state", "paused"]);
    let error = String::from_utf8_lossy(&unknown.stderr);
    assert!(!unknown.status.success() && error.contains("possible values: pending, provisioning"), "{error}");

    let missing = flotilla(&home, &["status", "job-42"]);
    assert!(!missing.status.success());
    let error = String::from_utf8_lossy(&missing.stderr);
    assert!(error.contains("job-42 does not exist: no training or inference job has this id"), "{error}");
    assert_eq!(error.matches("job-42").count(), 1, "said once: {error}");

    // Training data on a local path must lie inside the coordinators' data roots (the folder
    // `up` ran in, the cluster's parent folder, `up --data-root`).
    let elsewhere = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv"),
        elsewhere.path().join("d.csv"),
    )
    .expect("copy");
    let spec = dir.path().join("elsewhere.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"x\"\nmodel = {{ kind = \"mlp\" }}\ndata = {{ train = \"file://{}/d.csv\" }}\nworkers = {{ min = 1 }}\n",
            elsewhere.path().display()
        ),
    )
    .expect("spec");
    let outside = flotilla(&home, &["submit", spec.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&outside.stderr);
    assert!(!outside.status.success() && stderr.contains("data.train"), "{stderr}");
    assert!(stderr.contains("outside the coordinators' data roots"), "{stderr}");

    // Ctrl-C while `submit --follow` follows a job stops the following, not the job, and says so.
    let follower = common::command(&home)
        .args(["submit", example.to_str().expect("utf-8"), "--follow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("submit --follow");
    let two_jobs = || {
        let all = ok(flotilla(&home, &["status", "--output", "json"]));
        serde_json::from_str::<serde_json::Value>(&all).is_ok_and(|a| a.as_array().is_some_and(|a| a.len() == 2))
    };
    eventually(Duration::from_secs(20), Duration::from_millis(50), two_jobs, || "the second job submitted".into());
    std::thread::sleep(Duration::from_millis(500)); // following by now
    let pid = follower.id().to_string();
    assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().expect("kill").success());
    let followed = follower.wait_with_output().expect("it ends");
    let stderr = String::from_utf8_lossy(&followed.stderr);
    assert!(!followed.status.success() && stderr.contains("stopped following; job-2 keeps running"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&followed.stdout).lines().last(), Some("job-2"), "the id on the last line");
    let second = ok(flotilla(&home, &["status", "job-2", "--output", "json"]));
    assert!(second.contains("\"Pending\""), "still queued, not cancelled: {second}");
    ok(flotilla(&home, &["cancel", "job-2"]));

    let cancelled = ok(flotilla(&home, &["cancel", &job_id, "--reason", "test over"]));
    assert_eq!(cancelled.trim(), "job-1 Cancelled");
    let again = flotilla(&home, &["cancel", &job_id]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already Cancelled"), "cancelling twice is refused");

    ok(flotilla(&home, &["down"]));
    // A client of a cluster that is down says so at once (it used to retry the dead addresses
    // for 30 s and end with "tcp connect error").
    let started = std::time::Instant::now();
    let down = flotilla(&home, &["status"]);
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert!(
        !down.status.success() && stderr.contains("is not running") && stderr.contains("`flotilla up`"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "said at once, not after the client's retries");
    // A plain `up` brings the same cluster back: its 3 coordinators and the worker it had.
    ok(flotilla(&home, &["up"]));
    let all = ok(flotilla(&home, &["status", "--output", "json"]));
    let all: serde_json::Value = serde_json::from_str(&all).expect("status prints an array");
    assert_eq!(all.as_array().map(Vec::len), Some(2), "the jobs survived down/up: {all}");
    let workers = ok(flotilla(&home, &["workers", "--output", "json"]));
    let workers: serde_json::Value = serde_json::from_str(&workers).expect("workers prints an array");
    let live = workers.as_array().expect("array").iter().filter(|w| w["gone_at_unix_ms"].is_null()).count();
    assert_eq!(live, 1, "the worker came back: {workers}");
    let again = flotilla(&home, &["up", "--coordinators", "3"]);
    assert!(!again.status.success(), "a second `up` on a running cluster is refused");

    // A coordinator that died (here: SIGKILL) is started again by `up`, with its data; the
    // others keep running.
    let before = coordinator_pids(&home);
    let killed = std::process::Command::new("kill").args(["-9", &before[1].to_string()]).status().expect("kill");
    assert!(killed.success());
    // Gone as `up` judges it (a zombie or a vanished pid).
    let gone = || !flotilla_coordinator::provider::local::is_running(before[1] as u32);
    eventually(Duration::from_secs(10), Duration::from_millis(20), gone, || format!("pid {} still runs", before[1]));
    let restarted = ok(flotilla(&home, &["up", "--coordinators", "3", "-o", "json"]));
    let restarted: serde_json::Value = serde_json::from_str(&restarted).expect("up prints JSON");
    assert_eq!(restarted["restarted_coordinators"], serde_json::json!([2]), "{restarted}");
    let after = coordinator_pids(&home);
    assert!(after[0] == before[0] && after[2] == before[2] && after[1] != before[1], "{before:?} -> {after:?}");
    let all = ok(flotilla(&home, &["status", "--output", "json"]));
    assert!(all.contains("job-1"), "{all}");

    // A path relative to the spec may climb out of its folder (`../d.csv`): the CLI resolves
    // the `..` by name, since coordinators refuse a path holding one (it was refused).
    std::fs::create_dir(dir.path().join("jobs")).expect("jobs/");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv"), dir.path().join("d.csv"))
        .expect("copy");
    let spec = dir.path().join("jobs/up.toml");
    std::fs::write(
        &spec,
        "name = \"up\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"../d.csv\" }\nworkers = { min = 9 }\n",
    )
    .expect("spec");
    let normalised = ok(flotilla(&home, &["validate", spec.to_str().expect("utf-8")]));
    let data = dir.path().canonicalize().expect("canonical").join("d.csv");
    assert!(normalised.contains(&format!("train = \"file://{}\"", data.display())), "{normalised}");
    let submitted = ok(flotilla(&home, &["submit", spec.to_str().expect("utf-8")]));
    assert_eq!(submitted.lines().last().map(str::trim), Some("job-3"), "{submitted}");
    // Several at once: each is tried, those that cannot be are named, the exit status says so.
    let both = flotilla(&home, &["cancel", "job-3", "job-1", "-o", "json"]);
    let stderr = String::from_utf8_lossy(&both.stderr);
    assert!(!both.status.success() && stderr.contains("error: job-1 is already Cancelled"), "{stderr}");
    assert_eq!(stderr.matches("job-1").count(), 2, "named once per line: {stderr}");
    assert!(stderr.contains("1 of 2 job(s) not cancelled: job-1"), "{stderr}");
    let shown: serde_json::Value = serde_json::from_slice(&both.stdout).expect("a JSON array");
    assert_eq!((shown[0]["id"].as_str(), shown[0]["state"].as_str()), (Some("job-3"), Some("Cancelled")), "{shown}");
    assert_eq!(shown[1]["id"], "job-1", "{shown}");
    assert!(shown[1]["error"].as_str().is_some_and(|e| e.contains("already Cancelled")), "{shown}");
    // `resume` takes several too, each with the same `--set` (read back from the coordinator).
    let both = flotilla(&home, &["resume", "job-3", "job-9", "--set", "priority=5", "-o", "json"]);
    let stderr = String::from_utf8_lossy(&both.stderr);
    assert!(!both.status.success() && stderr.contains("1 of 2 job(s) not resumed: job-9"), "{stderr}");
    let shown: serde_json::Value = serde_json::from_slice(&both.stdout).expect("a JSON array");
    assert_eq!((shown[0]["id"].as_str(), shown[0]["from_step"].as_u64()), (Some("job-3"), Some(0)), "{shown}");
    assert!(shown[1]["error"].as_str().is_some_and(|e| e.contains("job-9 does not exist")), "{shown}");
    let resumed = ok(flotilla(&home, &["status", "job-3", "-o", "json"]));
    let resumed: serde_json::Value = serde_json::from_str(&resumed).expect("one JSON object");
    assert_eq!(
        (resumed["state"].as_str(), resumed["spec"]["priority"].as_i64()),
        (Some("Pending"), Some(5)),
        "{resumed}"
    );
    ok(flotilla(&home, &["cancel", "job-3"]));
    // `status --name` lists the jobs whose name matches a glob.
    let named = |pattern: &str| -> Vec<String> {
        let out = ok(flotilla(&home, &["status", "--name", pattern, "-o", "json"]));
        let jobs: serde_json::Value = serde_json::from_str(&out).expect("a JSON array");
        jobs.as_array().expect("array").iter().filter_map(|j| j["id"].as_str().map(str::to_string)).collect()
    };
    assert_eq!(named("u?"), ["job-3"]);
    assert_eq!(named("mnist-*"), ["job-1", "job-2"]);
    assert!(named("nothing*").is_empty());
    let table = ok(flotilla(&home, &["status", "--name", "u*"]));
    assert!(table.contains("job-3") && !table.contains("job-1"), "{table}");

    // No output and no coordinator log ever shows a token (they are only in cluster.toml, 0600).
    let cluster: toml::Value =
        toml::from_str(&std::fs::read_to_string(home.join("cluster.toml")).expect("cluster")).expect("cluster TOML");
    let tokens: Vec<String> = ["api_token", "join_token", "peer_token"]
        .iter()
        .map(|k| cluster[*k].as_str().expect("token").to_string())
        .collect();
    let mut shown = String::new();
    for args in [
        &["status"][..],
        &["status", "-o", "json"],
        &["workers", "--all", "-o", "json"],
        &["up", "--coordinators", "3"],
    ] {
        let out = flotilla(&home, args);
        shown.push_str(&String::from_utf8_lossy(&out.stdout));
        shown.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    for entry in std::fs::read_dir(home.join("logs")).expect("logs").flatten() {
        shown.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
    }
    for token in &tokens {
        assert!(token.len() >= 16 && !shown.contains(token.as_str()), "a token was shown");
    }
}

/// SIGTERM (what systemd's stop and `flotilla down` send) stops a coordinator within its
/// shutdown grace while its peers' Raft streams and a worker's streams are open (it used to
/// wait for them forever, until SIGKILL), and the other two serve on. A worker whose
/// coordinators are all gone stops on SIGTERM without first waiting out a heartbeat's 30 s of
/// retries (it used to take ~35 s; now the interruption report's 5 s and the leave's 4 s).
#[test]
fn sigterm_stops_a_coordinator_with_open_streams_and_a_worker_whose_cluster_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let _down = Down(&home);
    ok(flotilla(&home, &["up", "--coordinators", "3", "--workers", "1"]));
    let registered = || {
        let workers = common::json(&home, &["workers", "-o", "json"]);
        workers.as_array().and_then(|ws| ws.first()).and_then(|w| w["id"].as_str()).map(str::to_string)
    };
    eventually(Duration::from_secs(20), Duration::from_millis(100), || registered().is_some(), || "no worker".into());
    let worker = common::worker_pid(&home, &registered().expect("a worker")) as u32;
    let coordinators = coordinator_pids(&home);
    use flotilla_coordinator::provider::local::{is_running as running, signal};

    signal(coordinators[0] as u32, "TERM").expect("SIGTERM");
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || !running(coordinators[0] as u32),
        || {
            format!(
                "coordinator 1 still runs 10 s after SIGTERM (its grace is {:?})",
                flotilla_coordinator::server::SHUTDOWN_GRACE
            )
        },
    );
    ok(flotilla(&home, &["status"]));

    for pid in &coordinators[1..] {
        signal(*pid as u32, "KILL").expect("SIGKILL");
    }
    // A heartbeat to the vanished cluster is under way by now (they go every second).
    std::thread::sleep(Duration::from_millis(1500));
    signal(worker, "TERM").expect("SIGTERM");
    eventually(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || !running(worker),
        || "the worker still runs 20 s after SIGTERM".into(),
    );
}
