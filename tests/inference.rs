//! Batch inference end to end with the real binary on a local cluster:
//!
//! - an MLP trained on 4,000 MNIST rows and validated on a held-out 1,000 is registered; `infer`
//!   over the held-out file with 2 workers writes every row exactly once, and the accuracy
//!   computed from the output equals the training job's `val_accuracy` (same rows, same
//!   scaling, same arg-max); unlabelled rows get the same predictions; bad inputs and an
//!   existing output folder are refused with the reason;
//! - a worker SIGKILLed while it holds a shard: the shard goes back to the queue and the job
//!   still writes every row exactly once;
//! - a training gang submitted while inference holds every worker gets them at their next shard
//!   boundary; the inference finishes after it, every row exactly once.
//!
//! The tests share the 2 CPUs, so they run one at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod common;
use common::{mnist_rows, run, submit, wait_for, worker_pid};
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn json(home: &Path, args: &[&str]) -> Value {
    parse(run(home, args), &args.join(" "))
}

/// The JSON object a successful command printed.
fn parse(out: std::process::Output, what: &str) -> Value {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let start = text.find('{').expect("a JSON object");
    serde_json::from_str(&text[start..]).expect("JSON")
}

/// A failed command's error output.
fn refused(out: std::process::Output) -> String {
    assert!(!out.status.success(), "expected a refusal: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Writes train.csv (4 of every 5 rows) and heldout.csv (every 5th row), returns their paths.
fn split(dir: &Path) -> (PathBuf, PathBuf) {
    let rows = mnist_rows();
    let (train, heldout) = (dir.join("train.csv"), dir.join("heldout.csv"));
    let pick = |keep: fn(usize) -> bool| {
        rows.iter().enumerate().filter(|(i, _)| keep(*i)).map(|(_, r)| format!("{r}\n")).collect::<String>()
    };
    std::fs::write(&train, pick(|i| i % 5 != 0)).expect("train");
    std::fs::write(&heldout, pick(|i| i % 5 == 0)).expect("heldout");
    (train, heldout)
}

/// Trains and registers `mnist-mlp` version 1; returns the job's status.
fn train(home: &Path, dir: &Path, train: &Path, heldout: &Path) -> Value {
    let spec = dir.join("mnist.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"mnist-mlp\"\nmodel = {{ kind = \"mlp\", hidden = [64] }}\n\
             data = {{ train = \"{}\", validation = \"{}\" }}\n\
             train = {{ epochs = 2, batch_size = 64, seed = 3 }}\nworkers = {{ min = 2, max = 2 }}\n\
             output = {{ register_as = \"mnist-mlp\" }}\n",
            train.display(),
            heldout.display()
        ),
    )
    .expect("spec");
    let followed = run(home, &["submit", spec.to_str().expect("utf-8"), "--follow"]);
    assert!(followed.status.success(), "{}", String::from_utf8_lossy(&followed.stderr));
    let job = String::from_utf8_lossy(&followed.stdout).lines().last().expect("job id").trim().to_string();
    json(home, &["status", &job, "-o", "json"])
}

/// `flotilla infer --model MODEL --input INPUT --output-prefix OUT EXTRA...`.
fn infer(home: &Path, model: &str, input: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let (input, out) = (input.to_str().expect("utf-8"), out.to_str().expect("utf-8"));
    run(home, &[&["infer", "--model", model, "--input", input, "--output-prefix", out], extra].concat())
}

/// Starts (detached) inference over the held-out rows `copies` times over, in shards of 10 rows
/// on both workers (seconds of work); returns the job and its output folder.
fn long_inference(home: &Path, dir: &Path, heldout: &Path, copies: usize) -> (String, PathBuf) {
    let input = dir.join(format!("heldout-x{copies}.csv"));
    std::fs::write(&input, std::fs::read_to_string(heldout).expect("heldout").repeat(copies)).expect("input");
    let out = dir.join("predictions");
    let flags = ["--workers", "2", "--shard-rows", "10", "--batch-size", "1", "--detach"];
    let submitted = infer(home, "mnist-mlp", &input, &out, &flags);
    assert!(submitted.status.success(), "{}", String::from_utf8_lossy(&submitted.stderr));
    (String::from_utf8_lossy(&submitted.stdout).trim().to_string(), out)
}

/// Waits (`limit` at most) until inference `job` ends; returns its status then.
fn ended(home: &Path, job: &str, limit: Duration) -> Value {
    wait_for(home, job, limit, "the inference to end", |s| s["state"] != "Running" && s["state"] != "Pending")
}

/// Every row of `copies` times the held-out split, exactly once, in `out`.
fn assert_every_row_once(out: &Path, copies: usize) {
    let rows = read_output(out);
    let expected: Vec<u64> = (0..1000 * copies as u64).collect();
    assert_eq!(rows.keys().copied().collect::<Vec<_>>(), expected, "every row exactly once");
}

/// Every output row: row id -> (predicted, the rest of the line), checking each id appears once.
fn read_output(out: &Path) -> BTreeMap<u64, (u32, String)> {
    assert!(out.join("_SUCCESS").exists(), "no _SUCCESS in {}", out.display());
    assert!(!out.join("_attempts").exists(), "uncommitted attempts are removed");
    let mut rows = BTreeMap::new();
    let mut parts: Vec<PathBuf> = std::fs::read_dir(out)
        .expect("output folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("part-")))
        .collect();
    parts.sort();
    assert!(!parts.is_empty());
    for part in parts {
        let text = std::fs::read_to_string(&part).expect("part");
        let mut lines = text.lines();
        assert!(lines.next().expect("header").starts_with("row,predicted"), "{}", part.display());
        for line in lines {
            let mut fields = line.splitn(3, ',');
            let row: u64 = fields.next().expect("row").parse().expect("row id");
            let predicted: u32 = fields.next().expect("predicted").parse().expect("class");
            let rest = fields.next().unwrap_or_default().to_string();
            assert!(rows.insert(row, (predicted, rest)).is_none(), "row {row} written twice ({})", part.display());
        }
    }
    rows
}

/// A local cluster of 2 workers with `mnist-mlp` version 1 trained on it (one test at a time);
/// stopped and deleted when dropped, even when an assertion fails.
struct Trained {
    home: PathBuf,
    dir: tempfile::TempDir,
    heldout: PathBuf,
    /// The training job's status.
    job: Value,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Trained {
    fn new() -> Trained {
        let serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join(".flotilla");
        let up = run(&home, &["up", "--workers", "2"]);
        let (train_file, heldout) = split(dir.path());
        let mut trained = Trained { home, dir, heldout, job: Value::Null, _serial: serial };
        assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
        trained.job = train(&trained.home, trained.dir.path(), &train_file, &trained.heldout);
        assert_eq!(trained.job["state"], "Succeeded", "{}", trained.job);
        trained
    }
}

impl Drop for Trained {
    fn drop(&mut self) {
        let _ = run(&self.home, &["down", "--purge"]);
    }
}

#[test]
fn inference_over_the_held_out_split_writes_every_row_once_and_matches_validation_accuracy() {
    let trained = Trained::new();
    let (home, dir, heldout, job) = (&trained.home, &trained.dir, &trained.heldout, &trained.job);
    let val_accuracy = job["metrics"]["val_accuracy"].as_f64().expect("val_accuracy");
    let model = json(home, &["models", "show", "mnist-mlp", "-o", "json"]);
    assert_eq!((model["features_per_row"].as_u64(), model["classes"].as_u64()), (Some(784), Some(10)), "{model}");
    assert_eq!(model["job_id"], job["id"], "lineage");

    let out = dir.path().join("predictions");
    let done = parse(infer(home, "mnist-mlp@1", heldout, &out, &["--workers", "2", "-o", "json"]), "infer");
    assert_eq!(done["state"], "Succeeded", "{done}");
    assert_eq!(done["rows_done"], 1000, "{done}");

    let rows = read_output(&out);
    assert_eq!(rows.keys().copied().collect::<Vec<_>>(), (0..1000).collect::<Vec<u64>>(), "every row exactly once");
    let labels: Vec<u32> = std::fs::read_to_string(heldout)
        .expect("heldout")
        .lines()
        .map(|l| l.split(',').next().expect("label").parse().expect("label"))
        .collect();
    let correct = rows.iter().filter(|(row, (predicted, _))| labels[**row as usize] == *predicted).count();
    let accuracy = correct as f64 / 1000.0;
    assert!((accuracy - val_accuracy).abs() < 1e-12, "output accuracy {accuracy} != val_accuracy {val_accuracy}");
    assert!(accuracy > 0.85, "the model learnt: {accuracy}");

    let summary: Value =
        serde_json::from_slice(&std::fs::read(out.join("_SUMMARY.json")).expect("summary")).expect("summary JSON");
    assert_eq!(summary["rows"], 1000);
    assert!((summary["accuracy"].as_f64().expect("accuracy") - accuracy).abs() < 1e-12, "{summary}");
    let counts: u64 = summary["class_counts"].as_array().expect("counts").iter().map(|c| c.as_u64().expect("n")).sum();
    assert_eq!(counts, 1000);
    assert_eq!(summary["workers_used"].as_array().map(Vec::len), Some(2), "both workers served shards: {summary}");
    assert!(summary["rows_per_s"].as_f64().expect("rate") > 0.0);
    let shown = json(home, &["status", done["id"].as_str().expect("id"), "-o", "json"]);
    assert_eq!(
        (shown["kind"].as_str(), shown["shards_done"].clone()),
        (Some("inference"), done["shards_total"].clone())
    );
    // `--follow` follows training jobs; an inference job is shown as without it, and said.
    let followed = run(home, &["status", done["id"].as_str().expect("id"), "--follow", "-o", "json"]);
    let said = String::from_utf8_lossy(&followed.stderr).to_string();
    assert_eq!(parse(followed, "status --follow")["kind"], "inference");
    assert!(said.contains("no training job has this id to follow"), "{said}");

    // The same rows without labels get the same predictions (and no accuracy).
    let unlabelled = dir.path().join("unlabelled.csv");
    let text: String = std::fs::read_to_string(heldout)
        .expect("heldout")
        .lines()
        .take(100)
        .map(|l| format!("{}\n", l.split_once(',').expect("label").1))
        .collect();
    std::fs::write(&unlabelled, text).expect("unlabelled");
    let out2 = dir.path().join("unlabelled-out");
    let plain = parse(infer(home, "mnist-mlp", &unlabelled, &out2, &["-o", "json"]), "infer unlabelled");
    assert_eq!((plain["state"].as_str(), plain["accuracy"].is_null()), (Some("Succeeded"), true), "{plain}");
    for (row, (predicted, _)) in read_output(&out2) {
        assert_eq!(predicted, rows[&row].0, "row {row}");
    }

    // Refused with the reason, before any worker starts.
    let again = refused(infer(home, "mnist-mlp", heldout, &out, &[]));
    assert!(again.contains("choose a new folder"), "{again}");
    let narrow = dir.path().join("narrow.csv");
    std::fs::write(&narrow, "1,2,3\n").expect("narrow");
    let stderr = refused(infer(home, "mnist-mlp", &narrow, &out2.join("x"), &[]));
    assert!(stderr.contains("input has 3 columns per row, but mnist-mlp@1 takes 784 features (or 785"), "{stderr}");
    let unknown = refused(infer(home, "mnist-mlp@production", heldout, &out2.join("y"), &[]));
    assert!(unknown.contains("has no alias `production`"), "{unknown}");
    // Local paths only inside the coordinators' data roots, and only regular files are read:
    // a file elsewhere, an output elsewhere, a link to the input, a FIFO.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let outside = elsewhere.path().join("in.csv");
    std::fs::copy(heldout, &outside).expect("copy");
    let stderr = refused(infer(home, "mnist-mlp", &outside, &out2.join("z"), &[]));
    assert!(stderr.contains("input_uri") && stderr.contains("outside the coordinators' data roots"), "{stderr}");
    let stderr = refused(infer(home, "mnist-mlp", heldout, &elsewhere.path().join("out"), &[]));
    assert!(stderr.contains("output_uri") && stderr.contains("--data-root"), "{stderr}");
    let link = dir.path().join("link.csv");
    std::os::unix::fs::symlink(heldout, &link).expect("symlink");
    // (As a URI: the CLI itself resolves a local path it is given, links included.)
    let link_uri = PathBuf::from(format!("file://{}", link.display()));
    let stderr = refused(infer(home, "mnist-mlp", &link_uri, &out2.join("l"), &[]));
    assert!(stderr.contains("is a symbolic link"), "{stderr}");
    let fifo = dir.path().join("fifo.csv");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
    let stderr = refused(infer(home, "mnist-mlp", &fifo, &out2.join("f"), &[]));
    assert!(stderr.contains("not a regular file"), "{stderr}");

    // A value that is not a number fails its shard on every attempt: the job fails, naming it.
    let bad = dir.path().join("bad.csv");
    let mut lines: Vec<String> =
        std::fs::read_to_string(heldout).expect("heldout").lines().take(20).map(str::to_string).collect();
    lines[13] = lines[13].replacen(",0,", ",x,", 1);
    std::fs::write(&bad, lines.join("\n") + "\n").expect("bad");
    let stderr = refused(infer(home, "mnist-mlp", &bad, &out2.join("bad"), &["--workers", "2", "--shard-rows", "10"]));
    assert!(
        stderr.contains("shard 1 (rows 10..20) failed 3 times") && stderr.contains("`x` is not a number"),
        "{stderr}"
    );
}

#[test]
fn a_worker_killed_while_holding_a_shard_loses_no_row_and_duplicates_none() {
    let trained = Trained::new();
    let (home, dir, heldout) = (&trained.home, &trained.dir, &trained.heldout);

    // The held-out rows 8 times over (8000 rows, seconds of work): the held-out split alone
    // (1000 rows) was sometimes done before a status poll caught a worker holding a shard.
    const COPIES: usize = 8;
    let (job, out) = long_inference(home, dir.path(), heldout, COPIES);
    // Freeze a worker that holds a lease (SIGSTOP: it cannot commit meanwhile), then kill it.
    let started = Instant::now();
    let victim = loop {
        assert!(started.elapsed() < Duration::from_secs(60), "never caught a worker holding a shard");
        let status = json(home, &["status", &job, "-o", "json"]);
        assert_eq!(
            status["state"].as_str().map(|s| s != "Succeeded"),
            Some(true),
            "finished before the kill: {status}"
        );
        let Some(lease) = status["leases"].as_array().and_then(|l| l.first()).cloned() else { continue };
        let worker = lease["worker"].as_str().expect("worker").to_string();
        let pid = worker_pid(home, &worker).to_string();
        assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().expect("kill").success());
        let frozen = json(home, &["status", &job, "-o", "json"]);
        if frozen["leases"].as_array().is_some_and(|l| l.iter().any(|l| l["worker"] == worker.as_str())) {
            assert!(std::process::Command::new("kill").args(["-KILL", &pid]).status().expect("kill").success());
            break worker;
        }
        assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().expect("kill").success());
    };
    let done = ended(home, &job, Duration::from_secs(120));
    assert_eq!(done["state"], "Succeeded", "{done}");
    let lost: Vec<&str> = done["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "worker_lost")
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(lost.iter().any(|m| m.contains(&victim) && m.contains("returned to the queue")), "{done}");
    assert!(done["shard_retries"].as_u64().unwrap_or(0) >= 1, "{done}");
    assert_every_row_once(&out, COPIES);
}

#[test]
fn inference_gives_its_workers_to_a_training_gang_between_shards_and_finishes_after_it() {
    let trained = Trained::new();
    let (home, dir, heldout) = (&trained.home, &trained.dir, &trained.heldout);
    // 20,000 rows in shards of 10 on both workers: tens of seconds of work.
    const COPIES: usize = 20;
    let (inference, out) = long_inference(home, dir.path(), heldout, COPIES);
    let started = Instant::now();
    while json(home, &["status", &inference, "-o", "json"])["leases"].as_array().is_none_or(Vec::is_empty) {
        assert!(started.elapsed() < Duration::from_secs(60), "no shard was leased");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A training gang of 2 needs both workers: it gets them at their next shard boundary.
    let spec = dir.path().join("gang.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"gang\"\nmodel = {{ kind = \"mlp\", hidden = [32] }}\ndata = {{ train = \"{}\" }}\n\
             train = {{ steps = 30, batch_size = 32 }}\nworkers = {{ min = 2, max = 2 }}\n",
            heldout.display()
        ),
    )
    .expect("spec");
    let gang = submit(home, &spec);
    let running = wait_for(home, &gang, Duration::from_secs(90), "the gang to start", |s| {
        s["state"] == "Running" || s["state"] == "Succeeded"
    });
    let meanwhile = json(home, &["status", &inference, "-o", "json"]);
    assert_eq!(meanwhile["state"], "Running", "the gang waited for the inference to end: {running} {meanwhile}");
    let yielded = meanwhile["events"].as_array().expect("events").iter().any(|e| e["kind"] == "yield");
    assert!(yielded, "{meanwhile}");
    // Both finish; the inference wrote every row exactly once.
    let done = ended(home, &inference, Duration::from_secs(240));
    assert_eq!(done["state"], "Succeeded", "{done}");
    assert_eq!(json(home, &["status", &gang, "-o", "json"])["state"], "Succeeded");
    assert_every_row_once(&out, COPIES);
}
