//! The cluster on S3 end to end (moto's server, started by scripts/test.sh, address in
//! `FLOTILLA_MOTO_ENDPOINT`): `flotilla up --store s3://...` keeps nothing of a job on local
//! disk. A job reads its training data from S3, checkpoints to S3, logs to S3 (`flotilla logs`
//! reads them back), registers its model artifact in S3 (`models download` streams it), and
//! `flotilla infer` reads an s3:// input and writes an s3:// output with every row once. A bad
//! store or data URI (wrong scheme, unknown bucket, missing object, missing credentials,
//! unreachable endpoint) is one clear error at `up` or at submit. A member killed without notice
//! loses no step: the survivor writes the state it held to S3 after the regroup. A store that
//! stops answering (moto's server stopped for longer than a collective waits) neither stalls
//! training nor breaks the gang, a coordinator restarted during such an outage serves its
//! state, a job that must restart during one waits for the store without failing, and training
//! that ends during one writes its final checkpoint and model once the store answers.
//!
//! AWS settings reach the coordinators and workers through the environment `up` passes on.
//! No request leaves the loopback interface: the instance-metadata fallback for credentials
//! points at a closed local port.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::Down;
use common::s3::{get, list, put};
use flotilla_store::testing::{closed_port, moto};
use serde_json::Value;

/// Environment variables set on a command.
type Env = Vec<(String, String)>;

/// The AWS environment of every process in these tests: `endpoint`, and test credentials
/// unless `credentials` is false.
fn aws_env(endpoint: &str, credentials: bool) -> Env {
    let mut vars = vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ENDPOINT", endpoint.to_string()),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_DEFAULT_REGION", "us-east-1".to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ("AWS_METADATA_ENDPOINT", format!("http://127.0.0.1:{}", closed_port())),
    ];
    if credentials {
        vars.push(("AWS_ACCESS_KEY_ID", "testing".to_string()));
        vars.push(("AWS_SECRET_ACCESS_KEY", "testing".to_string()));
    }
    vars.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn flotilla(home: &Path, env: &[(String, String)]) -> Command {
    let mut command = common::command(home);
    for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "FLOTILLA_STORE"] {
        command.env_remove(name);
    }
    command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    command
}

fn run(home: &Path, env: &[(String, String)], args: &[&str]) -> Output {
    flotilla(home, env).args(args).output().expect("the flotilla binary runs")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn refused(out: Output) -> String {
    assert!(!out.status.success(), "expected a refusal: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn last_json(text: &str) -> Value {
    let start = text.find(['{', '[']).expect("JSON in the output");
    serde_json::from_str(&text[start..]).expect("JSON")
}

/// Creates `bucket` on the store `env` points at.
fn create_bucket(env: &[(String, String)], bucket: &str) {
    let endpoint = env.iter().find(|(k, _)| k == "AWS_ENDPOINT_URL").expect("endpoint");
    flotilla_store::testing::create_bucket(&endpoint.1, bucket);
}

/// A local cluster of `workers` whose store, `s3://{bucket}/cluster`, is reached through a relay
/// the test takes down and brings back: the relay and the AWS settings of the cluster's
/// processes. The caller holds `home`'s `Down` guard, made before.
fn up_behind_relay(home: &Path, bucket: &str, workers: &str) -> (flotilla_store::testing::Relay, Env) {
    let relay = flotilla_store::testing::Relay::start(&moto());
    let env = aws_env(&relay.endpoint(), true);
    create_bucket(&env, bucket);
    ok(run(home, &env, &["up", "--workers", workers, "--store", &format!("s3://{bucket}/cluster")]), "up");
    (relay, env)
}

/// The ids of the workers `flotilla workers` lists on `job`.
fn gang_of(home: &Path, env: &[(String, String)], job: &str) -> Vec<String> {
    serde_json::from_str::<Value>(&ok(run(home, env, &["workers", "-o", "json"]), "workers"))
        .expect("workers")
        .as_array()
        .expect("a list")
        .iter()
        .filter(|w| w["job_id"] == job)
        .filter_map(|w| w["id"].as_str().map(str::to_string))
        .collect()
}

fn write_spec(dir: &Path, name: &str, train: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\nmodel = {{ kind = \"mlp\", hidden = [32] }}\n\
             data = {{ train = \"{train}\", format = \"csv\", validation_fraction = 0.2 }}\n\
             train = {{ epochs = 10, batch_size = 16, learning_rate = 0.003 }}\nworkers = {{ min = 2, max = 2 }}\n\
             checkpoint = {{ every_steps = 20, keep = 2 }}\noutput = {{ register_as = \"{name}\" }}\n"
        ),
    )
    .expect("spec");
    path.display().to_string()
}

#[test]
fn a_cluster_on_s3_trains_checkpoints_logs_registers_and_infers_with_nothing_on_local_disk() {
    let _serial = common::one_at_a_time();
    let env = aws_env(&moto(), true);
    create_bucket(&env, "flotilla-e2e");
    let digits = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv")).expect("data");
    put(&env, "s3://flotilla-e2e/data/digits.csv", digits.clone());

    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let _down = Down(&home);
    let store = "s3://flotilla-e2e/cluster";
    let up = run(&home, &env, &["up", "--workers", "2", "--store", store, "-o", "json"]);
    assert_eq!(last_json(&ok(up, "up"))["store"], store);

    let spec = write_spec(dir.path(), "digits-s3", "s3://flotilla-e2e/data/digits.csv");
    let submitted = ok(run(&home, &env, &["submit", &spec, "--follow"]), "submit");
    let job_id = submitted.lines().last().expect("job id").trim().to_string();
    let job = last_json(&ok(run(&home, &env, &["status", &job_id, "-o", "json"]), "status"));
    assert_eq!(job["state"], "Succeeded", "{job}");
    let accuracy = job["metrics"]["val_accuracy"].as_f64().expect("accuracy");
    assert!(accuracy >= 0.85, "digits MLP learned from S3 data: {accuracy}");

    // Checkpoints, logs and the model are in the bucket, under the job's area.
    // Retention (keep = 2) deletes the older checkpoints from S3 within a few passes.
    let started = std::time::Instant::now();
    let objects = loop {
        let objects = list(&env, &format!("{store}/jobs/{job_id}"));
        let checkpoints: BTreeSet<&str> =
            objects.iter().filter_map(|o| o.split("/ckpt/").nth(1).and_then(|rest| rest.split('/').next())).collect();
        if checkpoints.len() <= 2 || started.elapsed() > std::time::Duration::from_secs(30) {
            assert_eq!(checkpoints.len(), 2, "retention keeps 2 checkpoints in S3: {objects:?}");
            break objects;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(objects.iter().any(|o| o.contains("/logs/")), "{objects:?}");
    let logs = ok(run(&home, &env, &["logs", &job_id]), "logs");
    assert!(logs.lines().count() > 3, "the job's log, read back from S3: {logs}");

    let model = last_json(&ok(run(&home, &env, &["models", "show", "digits-s3", "-o", "json"]), "models show"));
    let checkpoint = model["source_checkpoint"]["uri"].as_str().expect("checkpoint uri");
    assert!(checkpoint.starts_with(&format!("{store}/jobs/{job_id}/ckpt/")), "{checkpoint}");
    let artifact = model["artifact_uri"].as_str().expect("artifact uri");
    assert!(artifact.starts_with(&format!("{store}/jobs/{job_id}/")), "{artifact}");
    let file = dir.path().join("digits.safetensors");
    let download = ["models", "download", "digits-s3", "--format", "safetensors", "-f", file.to_str().expect("utf-8")];
    ok(run(&home, &env, &download), "download");
    assert_eq!(std::fs::read(&file).expect("downloaded"), get(&env, artifact), "the artifact, streamed from S3");

    // Inference from s3:// to s3://: every input row exactly once, labels scored.
    let out = "s3://flotilla-e2e/predictions/run-1";
    let infer =
        ["infer", "--model", "digits-s3", "--input", "s3://flotilla-e2e/data/digits.csv", "--output-prefix", out];
    let done = last_json(&ok(
        run(&home, &env, &[&infer[..], &["--workers", "2", "--shard-rows", "300", "-o", "json"]].concat()),
        "infer",
    ));
    assert_eq!(done["state"], "Succeeded", "{done}");
    let written = list(&env, out);
    assert!(written.iter().any(|o| o.ends_with("/_SUCCESS")) && written.iter().any(|o| o.ends_with("/_SUMMARY.json")));
    assert!(!written.iter().any(|o| o.contains("/_attempts/")), "attempts promoted and removed: {written:?}");
    let rows_in = String::from_utf8(digits).expect("utf-8").lines().filter(|l| !l.trim().is_empty()).count();
    let mut seen = BTreeSet::new();
    for part in written.iter().filter(|o| o.contains("/part-")) {
        let text = String::from_utf8(get(&env, part)).expect("utf-8");
        for line in text.lines().skip(1) {
            let row: usize = line.split(',').next().expect("row").parse().expect("row id");
            assert!(seen.insert(row), "row {row} written twice");
        }
    }
    assert_eq!(seen.len(), rows_in, "every row once");
    // Each worker fetched only its shards' bytes of the input (range GETs), not the whole file.
    let worker_logs: String = std::fs::read_dir(home.join("logs"))
        .expect("worker logs")
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    let ranged = worker_logs.matches("of s3://flotilla-e2e/data/digits.csv (range GET)").count();
    let shards = done["shards_total"].as_u64().expect("shards") as usize;
    assert!(shards > 1 && ranged >= shards, "a range GET per shard attempt: {ranged} for {shards} shards");
    assert_eq!(seen.last().copied(), Some(rows_in - 1));

    // Nothing of the job is on the machine's disk: the local store folder was never made.
    assert!(!home.join("store").exists(), "a local store folder appeared");

    // Bad data URIs are refused at submission, naming the field and the cause.
    let missing = write_spec(dir.path(), "missing", "s3://flotilla-e2e/data/nope.csv");
    let error = refused(run(&home, &env, &["submit", &missing]));
    assert!(error.contains("data.train: s3://flotilla-e2e/data/nope.csv does not exist"), "{error}");
    let no_bucket = write_spec(dir.path(), "no-bucket", "s3://flotilla-no-such-bucket/digits.csv");
    let error = refused(run(&home, &env, &["submit", &no_bucket]));
    assert!(
        error.contains("data.train: s3://flotilla-no-such-bucket/digits.csv cannot be used: the bucket does not exist"),
        "{error}"
    );
}

#[test]
fn a_store_that_cannot_be_used_stops_up_with_the_cause() {
    let endpoint = moto();
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let _down = Down(&home);
    let cases: [(&str, Env, &str); 4] = [
        ("gs://bucket/x", aws_env(&endpoint, true), "scheme `gs://` is not supported"),
        ("s3://flotilla-no-such-bucket/x", aws_env(&endpoint, true), "the bucket does not exist"),
        ("s3://flotilla-e2e/x", aws_env(&endpoint, false), "no AWS credentials found"),
        (
            "s3://flotilla-e2e/x",
            aws_env(&format!("http://127.0.0.1:{}", closed_port()), true),
            "the endpoint is unreachable",
        ),
    ];
    for (store, env, cause) in cases {
        let error = refused(run(&home, &env, &["up", "--store", store]));
        assert!(error.contains(store) && error.contains(cause), "{store}: {error}");
        assert!(!home.join("cluster.toml").exists(), "{store}: no cluster was started");
    }
}

/// A hard loss on S3: the survivor holds the gang's state, announces it, and after the regroup
/// writes it to the bucket and confirms it; nothing of the resume is read from S3 and no step
/// is lost. (The writer is a worker process that shares nothing with the others but S3.)
#[test]
fn on_s3_a_killed_member_loses_no_step_and_the_survivor_writes_the_state_it_held() {
    let _serial = common::one_at_a_time();
    let env = aws_env(&moto(), true);
    create_bucket(&env, "flotilla-loss");
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let _down = Down(&home);
    let store = "s3://flotilla-loss/cluster";
    ok(run(&home, &env, &["up", "--workers", "3", "--store", store]), "up");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv");
    let spec = write_spec(dir.path(), "digits-loss", data.to_str().expect("utf-8"));
    let spec_text = std::fs::read_to_string(&spec).expect("spec").replace("epochs = 10", "epochs = 60");
    std::fs::write(&spec, spec_text).expect("spec");
    let job = ok(run(&home, &env, &["submit", &spec]), "submit").lines().last().expect("job id").trim().to_string();
    let status = || last_json(&ok(run(&home, &env, &["status", &job, "-o", "json"]), "status"));
    let wait = |what: &str, done: &dyn Fn(&Value) -> bool| {
        let started = std::time::Instant::now();
        loop {
            let now = status();
            if done(&now) {
                return now;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(120), "waiting for {what}: {now}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    wait("training past a checkpoint", &|s| s["state"] == "Running" && s["step"].as_u64() > Some(30));
    let gang = gang_of(&home, &env, &job);
    assert_eq!(gang.len(), 2, "{gang:?}");
    ok(run(&home, &env, &["preempt", &gang[1], "--hard"]), "preempt --hard");
    let broke =
        wait("the break", &|s| s["events"].as_array().is_some_and(|e| e.iter().any(|e| e["kind"] == "peer_lost")));
    let event = broke["events"].as_array().expect("events").iter().find(|e| e["kind"] == "peer_lost").expect("event");
    let message = event["message"].as_str().expect("message");
    assert!(message.contains("(the survivors hold its state); 0 step(s) lost"), "{message}");
    let step: u64 = message
        .split("broke at step ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("step");
    // The survivor writes the announced checkpoint to S3 after the regroup and confirms it.
    let confirmed = wait("the survivor's checkpoint written", &|s| {
        s["latest_checkpoint"]["step"].as_u64() > Some(step)
            || (s["latest_checkpoint"]["step"] == step && s["latest_checkpoint"]["pending"] == false)
    });
    let objects = list(&env, &format!("{store}/jobs/{job}/ckpt"));
    let written = format!("/ckpt/{step:012}-g1/MANIFEST");
    assert!(
        confirmed["latest_checkpoint"]["step"].as_u64() > Some(step) || objects.iter().any(|o| o.ends_with(&written)),
        "{written} in {objects:?}"
    );
    let done = wait("the end", &|s| s["state"] == "Succeeded");
    assert_eq!(done["steps_lost"], 0, "{done}");
    assert_eq!(done["resume_storage_bytes"], 0, "the new member took the state from the survivor: {done}");
    assert!(done["resume_peer_bytes"].as_u64() > Some(0), "{done}");
    assert!(done["metrics"]["val_accuracy"].as_f64() >= Some(0.85), "{done}");
}

/// Submits a digits job that trains on for hours and returns its id once it recorded a
/// checkpoint past step 40 (the tests that stop the store cancel it).
fn submit_until_checkpointed(dir: &Path, home: &Path, env: &[(String, String)], name: &str) -> String {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv");
    let spec = write_spec(dir, name, data.to_str().expect("utf-8"));
    let spec_text = std::fs::read_to_string(&spec).expect("spec").replace("epochs = 10", "steps = 10000000");
    std::fs::write(&spec, spec_text).expect("spec");
    let job = ok(run(home, env, &["submit", &spec]), "submit").lines().last().expect("job id").trim().to_string();
    let status = || last_json(&ok(run(home, env, &["status", &job, "-o", "json"]), "status"));
    let started = std::time::Instant::now();
    while status()["latest_checkpoint"]["step"].as_u64() < Some(40) {
        assert!(started.elapsed() < std::time::Duration::from_secs(120), "no checkpoint yet: {}", status());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    job
}

/// A moto server of this test's own (it is stopped and resumed, as an S3 outage), killed on drop.
struct OwnMoto(std::process::Child);

impl OwnMoto {
    fn start() -> (OwnMoto, String) {
        let server = std::env::var("FLOTILLA_MOTO_SERVER").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| {
            panic!("this test needs moto's server: run scripts/test.sh (it sets FLOTILLA_MOTO_SERVER)")
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a port").local_addr().expect("address").port();
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let endpoint = format!("127.0.0.1:{port}");
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(&endpoint).is_err() {
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "moto did not listen on {endpoint}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        (OwnMoto(child), format!("http://{endpoint}"))
    }

    fn signal(&self, signal: &str) {
        let sent = Command::new("kill").args([signal, &self.0.id().to_string()]).status().expect("kill runs");
        assert!(sent.success(), "kill {signal}");
    }
}

impl Drop for OwnMoto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_stalled_store_neither_stalls_training_nor_breaks_the_gang() {
    let _serial = common::one_at_a_time();
    let (moto, endpoint) = OwnMoto::start();
    let env = aws_env(&endpoint, true);
    create_bucket(&env, "flotilla-stall");
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let _down = Down(&home);
    ok(run(&home, &env, &["up", "--workers", "2", "--store", "s3://flotilla-stall/cluster"]), "up");
    let job = submit_until_checkpointed(dir.path(), &home, &env, "digits-stall");
    let status = || last_json(&ok(run(&home, &env, &["status", &job, "-o", "json"]), "status"));

    // S3 stops answering for longer than a collective may wait (30 s): requests hang, as in an
    // outage. Before, rank 0 waited for its save, the other rank's all-reduce timed out and
    // the gang broke; and the progress reports waited for the metrics history's writes.
    moto.signal("-STOP");
    let stalled_at = std::time::Instant::now();
    let mut steps = Vec::new();
    while stalled_at.elapsed() < std::time::Duration::from_secs(42) {
        let now = status();
        steps.push((stalled_at.elapsed().as_secs_f64(), now["step"].as_u64().unwrap_or(0)));
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    let during = status();
    moto.signal("-CONT");
    let step_at = |after_s: f64| steps.iter().find(|(t, _)| *t >= after_s).map_or(0, |(_, step)| *step);
    let (first, last) = (steps[0].1, steps.last().expect("steps").1);
    assert!(
        last > step_at(20.0) + 100,
        "training goes on past the first save's wait (at most 15 s) while the store is out: {steps:?}"
    );
    assert!(last > first, "{steps:?}");
    let events = during["events"].as_array().expect("events").clone();
    assert!(!events.iter().any(|e| e["kind"] == "peer_lost"), "the gang did not break: {events:?}");
    assert_eq!((during["generation"].as_u64(), during["state"].as_str()), (Some(1), Some("Running")), "{during}");

    // The store answers again: checkpoints are recorded again, and the log tells the story.
    let stalled_step = during["latest_checkpoint"]["step"].as_u64().expect("a checkpoint");
    let resumed = std::time::Instant::now();
    let logs = loop {
        let logs = ok(run(&home, &env, &["logs", &job]), "logs");
        let newer = status()["latest_checkpoint"]["step"].as_u64() > Some(last);
        if newer && logs.contains("the store takes checkpoints again") {
            break logs;
        }
        assert!(resumed.elapsed() < std::time::Duration::from_secs(120), "checkpoints again: {logs}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert!(stalled_step < first + 40, "no checkpoint was recorded during the stall: {stalled_step}, {first}");
    assert!(logs.contains("the store is slow: the checkpoint of step "), "{logs}");
    ok(run(&home, &env, &["cancel", &job]), "cancel");
}

#[test]
fn a_coordinator_restarted_while_the_store_is_out_serves_its_state() {
    let _serial = common::one_at_a_time();
    let (moto, endpoint) = OwnMoto::start();
    let env = aws_env(&endpoint, true);
    create_bucket(&env, "flotilla-restart");
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let _down = Down(&home);
    ok(run(&home, &env, &["up", "--store", "s3://flotilla-restart/cluster"]), "up");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv");
    let spec = write_spec(dir.path(), "waits", data.to_str().expect("utf-8"));
    let job = ok(run(&home, &env, &["submit", &spec]), "submit").lines().last().expect("job id").trim().to_string();

    // The coordinator dies while the store does not answer; `up` brings it back from its Raft
    // log. Before, `up` refused (the store's check), and so did the coordinator itself.
    moto.signal("-STOP");
    for pid in common::coordinator_pids(&home) {
        let killed = Command::new("kill").args(["-9", &pid.to_string()]).status().expect("kill runs");
        assert!(killed.success());
    }
    let restarted = run(&home, &env, &["up"]);
    let stderr = String::from_utf8_lossy(&restarted.stderr).to_string();
    ok(restarted, "up again");
    assert!(stderr.contains("restarting the coordinators anyway (they hold their Raft state)"), "{stderr}");
    let log = home.join("logs/coordinator-1.log");
    let started = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("the cluster store cannot be used now; this node started anyway") {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "the coordinator's own check: {text}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    // Its own check failed, and it serves on: the job submitted before is there.
    let status = last_json(&ok(run(&home, &env, &["status", &job, "-o", "json"]), "status"));
    assert_eq!(status["state"], "Pending", "{status}");
    moto.signal("-CONT");
}

/// The lines containing `needle` in the agents' logs.
fn agent_lines(home: &Path, needle: &str) -> Vec<String> {
    std::fs::read_dir(home.join("logs"))
        .expect("logs")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("local-"))
        .flat_map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            text.lines().filter(|l| l.contains(needle)).map(str::to_string).collect::<Vec<_>>()
        })
        .collect()
}

/// The first RFC 3339 timestamp of a line containing `needle` in the agents' logs.
fn first_agent_line_at(home: &Path, needle: &str) -> Option<String> {
    std::fs::read_dir(home.join("logs"))
        .expect("logs")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("local-"))
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            text.lines().find(|l| l.contains(needle)).and_then(|l| l.split_whitespace().next()).map(str::to_string)
        })
        .min()
}

#[test]
fn a_short_notice_while_the_store_is_out_regroups_without_waiting_for_the_stuck_save() {
    let _serial = common::one_at_a_time();
    let (moto, endpoint) = OwnMoto::start();
    let env = aws_env(&endpoint, true);
    create_bucket(&env, "flotilla-notice");
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let _down = Down(&home);
    ok(run(&home, &env, &["up", "--workers", "3", "--store", "s3://flotilla-notice/cluster"]), "up");
    let job = submit_until_checkpointed(dir.path(), &home, &env, "digits-notice");
    let status = || last_json(&ok(run(&home, &env, &["status", &job, "-o", "json"]), "status"));
    let gang = gang_of(&home, &env, &job);
    assert_eq!(gang.len(), 2, "{gang:?}");

    // The store stops answering; once rank 0 gave up waiting for its save (15 s), a member gets
    // a notice too short for a live handover: the gang checkpoints and stops, and the next
    // generation takes the free worker. Before, rank 0 waited for the stuck save (until the S3
    // client gave up, 30 s) before it announced the stop's checkpoint and reported.
    moto.signal("-STOP");
    let stalled_at = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_secs(20));
    ok(run(&home, &env, &["preempt", &gang[1], "--notice-s", "30"]), "preempt");
    let mut regrouped = None;
    while stalled_at.elapsed() < std::time::Duration::from_secs(42) {
        let now = status();
        if now["generation"].as_u64() >= Some(2) && now["state"] == "Running" {
            regrouped.get_or_insert(now);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    moto.signal("-CONT");
    let regrouped = regrouped.expect("the next generation ran while the store was out");
    assert_eq!(regrouped["steps_lost"], 0, "{regrouped}");
    let next = first_agent_line_at(&home, "generation=2").expect("generation 2 in an agent's log");
    // Before, the stuck save's failure (the S3 client gives up after 30 s) came first: rank 0
    // logged it from the step loop, then reported the stop. Now the stop's writer thread meets it
    // later, after the job log's own stuck writes.
    let stuck = first_agent_line_at(&home, "Error performing PUT");
    assert!(
        stuck.as_ref().is_none_or(|stuck| &next < stuck),
        "generation 2 started ({next}) before the stuck save failed ({stuck:?})"
    );
    ok(run(&home, &env, &["cancel", &job]), "cancel");
}

/// A start that finds the store out is waited out, never counted as a failure. The cluster
/// reaches moto through a relay the test takes down (connections cut and refused, as in an
/// outage, while moto keeps its objects). With `max_failures = 1`, one counted failure would
/// fail the job: before, the new member's read of the training data from S3 ended its
/// generation `RetryableError` and the job Failed at the first try.
#[test]
fn a_job_waits_out_a_store_outage_at_its_restart_and_resumes_when_the_store_answers() {
    let _serial = common::one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let _down = Down(&home);
    let (relay, env) = up_behind_relay(&home, "flotilla-outage", "3");
    let digits = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv")).expect("data");
    put(&env, "s3://flotilla-outage/data/digits.csv", digits);
    let spec = write_spec(dir.path(), "digits-outage", "s3://flotilla-outage/data/digits.csv");
    let text = std::fs::read_to_string(&spec).expect("spec").replace("epochs = 10", "steps = 10000000");
    std::fs::write(&spec, format!("{text}capacity = {{ max_failures = 1 }}\n")).expect("spec");
    let job = ok(run(&home, &env, &["submit", &spec]), "submit").lines().last().expect("job id").trim().to_string();
    let status = || last_json(&ok(run(&home, &env, &["status", &job, "-o", "json"]), "status"));
    let wait = |what: &str, done: &dyn Fn(&Value) -> bool| {
        let started = std::time::Instant::now();
        loop {
            let now = status();
            if done(&now) {
                return now;
            }
            assert!(now["state"] != "Failed", "the job failed while waiting for {what}: {now}");
            assert!(started.elapsed() < std::time::Duration::from_secs(120), "waiting for {what}: {now}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    let said = |s: &Value, kind: &str| s["events"].as_array().is_some_and(|e| e.iter().any(|e| e["kind"] == kind));
    wait("a checkpoint", &|s| s["latest_checkpoint"]["step"].as_u64() >= Some(40));
    let gang = gang_of(&home, &env, &job);
    assert_eq!(gang.len(), 2, "{gang:?}");

    // The store goes out and a member dies: the next generation needs the free worker, which
    // must read the training data from S3, and cannot.
    relay.down();
    ok(run(&home, &env, &["preempt", &gang[1], "--hard"]), "preempt --hard");
    let tried = |n: u32| {
        move |s: &Value| {
            s["events"].as_array().is_some_and(|e| {
                e.iter().any(|e| {
                    e["kind"] == "store_unavailable"
                        && e["message"].as_str().is_some_and(|m| m.contains(&format!("(try {n}, ")))
                })
            })
        }
    };
    let waiting = wait("a second start during the outage", &tried(2));
    assert_eq!((waiting["state"].as_str(), waiting["failures"].as_u64()), (Some("Recovering"), Some(0)), "{waiting}");
    assert!(waiting["reason"].as_str().is_some_and(|r| r.starts_with("waiting for the store: out for ")), "{waiting}");
    assert!(!said(&waiting, "failure"), "not counted: {waiting}");
    let stopped_at = waiting["step"].as_u64().expect("step");

    // The store answers again: the job resumes on its own and trains on.
    relay.up();
    let resumed = wait("training after the outage", &|s| {
        s["state"] == "Running" && s["latest_checkpoint"]["step"].as_u64() > Some(stopped_at + 40)
    });
    assert!(!said(&resumed, "failure") && resumed["failures"] == 0, "{resumed}");
    // The stall is timed from the loss, through the tries that found the store out.
    assert!(resumed["last_stall_ms"].as_u64() >= Some(10_000), "{resumed}");
    ok(run(&home, &env, &["cancel", &job]), "cancel");
}

/// Training that ends while the store is out keeps its end: rank 0 holds the final checkpoint
/// and the model until the store answers again, then writes them, and the model is registered
/// from the final step. Before, the job ended Succeeded at once, without a model ("the model
/// could not be exported: ... unreachable") and without its final checkpoint: the steps since
/// the newest checkpoint were nowhere.
#[test]
fn training_that_ends_while_the_store_is_out_writes_its_model_once_the_store_answers() {
    let _serial = common::one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let _down = Down(&home);
    let (relay, env) = up_behind_relay(&home, "flotilla-finish", "2");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv");
    let spec = write_spec(dir.path(), "digits-finish", data.to_str().expect("utf-8"));
    let text = std::fs::read_to_string(&spec).expect("spec").replace("epochs = 10", "steps = 4000");
    std::fs::write(&spec, text).expect("spec");
    let job = ok(run(&home, &env, &["submit", &spec]), "submit").lines().last().expect("job id").trim().to_string();
    let status = || last_json(&ok(run(&home, &env, &["status", &job, "-o", "json"]), "status"));
    let started = std::time::Instant::now();
    while status()["latest_checkpoint"]["step"].as_u64() < Some(40) {
        assert!(started.elapsed() < std::time::Duration::from_secs(120), "no checkpoint yet: {}", status());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // The store goes out before the last step; training goes on and ends, and rank 0 waits.
    relay.down();
    let waiting = "the store is out: the final checkpoint waits to be written";
    let started = std::time::Instant::now();
    while first_agent_line_at(&home, waiting).is_none() {
        let now = status();
        assert!(now["state"] == "Running", "the job ended while the store was out: {now}");
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "no wait for the store: {now}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(status()["state"], "Running", "still waiting for the store");

    relay.up();
    let started = std::time::Instant::now();
    let done = loop {
        let now = status();
        if now["state"] != "Running" {
            break now;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(120), "the end after the outage: {now}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(done["state"], "Succeeded", "{done}");
    assert_eq!(done["latest_checkpoint"]["step"], 4000, "the final checkpoint was written: {done}");
    let model = last_json(&ok(run(&home, &env, &["models", "show", "digits-finish", "-o", "json"]), "models show"));
    assert_eq!(model["source_checkpoint"]["step"], 4000, "registered from the final step: {model}");
}

/// A notice's stop while the store is out: the gang stops with the stop's checkpoint announced
/// and held in memory; its writer tries again until the store answers, and then writes it.
/// Before, its one try failed and it was never written (the job relied on the members' memory
/// until a newer checkpoint).
#[test]
fn a_stop_during_an_outage_writes_its_checkpoint_once_the_store_answers() {
    let _serial = common::one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let _down = Down(&home);
    let (relay, env) = up_behind_relay(&home, "flotilla-stop-out", "2");
    let job = submit_until_checkpointed(dir.path(), &home, &env, "digits-stop-out");
    let gang = gang_of(&home, &env, &job);
    assert_eq!(gang.len(), 2, "{gang:?}");

    relay.down();
    ok(run(&home, &env, &["preempt", &gang[1], "--notice-s", "30"]), "preempt");
    let waiting = "the store is out: the stop's checkpoint waits to be written";
    let started = std::time::Instant::now();
    while first_agent_line_at(&home, waiting).is_none() {
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "no wait for the store");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(first_agent_line_at(&home, "the stop's checkpoint was not written").is_none(), "it waits");
    relay.up();
    // Once the store answers, the writer's next try gets through: the checkpoint is written, or
    // (when the next generation, resumed from the members' memory, recorded a newer one first)
    // refused as stale. Either way not for the outage.
    let started = std::time::Instant::now();
    let ended = loop {
        let written = first_agent_line_at(&home, "the stop's checkpoint is written");
        let refused = agent_lines(&home, "the stop's checkpoint was not written");
        if written.is_some() || !refused.is_empty() {
            break refused;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(90), "the stop's checkpoint after the outage");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(ended.iter().all(|l| l.contains("not recorded") && !l.contains("error sending request")), "{ended:?}");
    ok(run(&home, &env, &["cancel", &job]), "cancel");
}
