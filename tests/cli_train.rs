//! `flotilla train` as a user scripts it: real worker processes on loopback, checkpoints on
//! disk, stop and resume. Resuming at the same world size must end bit-identical to an
//! uninterrupted run; a corrupted checkpoint must be refused with the part named.

use std::path::Path;
use std::process::{Command, Output};

fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla")).args(args).output().expect("the flotilla binary runs")
}

fn ok_json(out: Output) -> serde_json::Value {
    assert!(out.status.success(), "failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let last = stdout.lines().last().expect("a summary line");
    serde_json::from_str(last).expect("the last line is a JSON summary")
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name).to_str().expect("utf-8").to_string()
}

#[test]
fn stop_and_resume_ends_bit_identical_to_an_uninterrupted_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (full, split) = (dir.path().join("full"), dir.path().join("split"));
    let (full, split) = (full.to_str().expect("utf-8"), split.to_str().expect("utf-8"));
    let spec = example("digits-mlp.toml"); // checkpoint.every_steps = 50

    let uninterrupted = ok_json(flotilla(&[
        "train",
        &spec,
        "--local-workers",
        "2",
        "--steps",
        "120",
        "--checkpoint-dir",
        full,
        "-o",
        "json",
    ]));
    assert_eq!(uninterrupted["step"], 120);
    assert_eq!(uninterrupted["world_size"], 2);

    let first = ok_json(flotilla(&[
        "train",
        &spec,
        "--local-workers",
        "2",
        "--steps",
        "60",
        "--checkpoint-dir",
        split,
        "-o",
        "json",
    ]));
    assert_eq!(first["step"], 60);
    let resume_from = first["checkpoint"].as_str().expect("a checkpoint URI").to_string();
    assert!(resume_from.ends_with("ckpt/000000000060"), "{resume_from}");
    // The second half also evaluates the validation set every 20 steps while it trains: that
    // reads the weights and changes nothing.
    let resumed = flotilla(&[
        "train",
        &spec,
        "--local-workers",
        "2",
        "--steps",
        "120",
        "--resume-from",
        &resume_from,
        "--checkpoint-dir",
        split,
        "--set",
        "train.validate_every_steps=20",
        "-o",
        "json",
    ]);
    let notes = String::from_utf8_lossy(&resumed.stderr).to_string();
    let resumed = ok_json(resumed);
    assert_eq!(resumed["step"], 120);
    let validated: Vec<&str> = notes.lines().filter(|l| l.contains("validation at step")).collect();
    assert_eq!(validated.len(), 2, "steps 80 and 100 (60 resumed from, 120 is the final one): {notes}");
    assert!(validated[0].contains("validation at step 80: val_accuracy 0."), "{notes}");

    let weights = |root: &str| std::fs::read(Path::new(root).join("ckpt/000000000120/model")).expect("final weights");
    let optimizer =
        |root: &str| std::fs::read(Path::new(root).join("ckpt/000000000120/optim")).expect("final optimizer");
    assert!(weights(full) == weights(split), "resumed weights differ from the uninterrupted run");
    assert!(optimizer(full) == optimizer(split), "resumed optimizer state differs");
    assert_eq!(uninterrupted["metrics"]["val_accuracy"], resumed["metrics"]["val_accuracy"]);
}

/// `train.keep_best` across a stop: the resumed half judges the validation of the step it
/// resumes at (its predecessor finished there without counting it), so its count, its best
/// state and its model equal the uninterrupted run's. (A margin no later validation can beat
/// keeps step 20 the best and makes every validation count: one skipped would show.)
#[test]
fn keep_best_counts_the_same_validations_across_a_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (full, split) = (dir.path().join("full"), dir.path().join("split"));
    let (full, split) = (full.to_str().expect("utf-8"), split.to_str().expect("utf-8"));
    let spec = example("digits-mlp.toml");
    let kept = [
        "--set",
        "train.validate_every_steps=20",
        "--set",
        "train.keep_best=true",
        "--set",
        "train.patience_metric=val_accuracy",
        "--set",
        "train.patience_min_delta=0.5",
        "-o",
        "json",
    ];
    let run = |root: &str, steps: &str, resume: &[&str]| {
        let head = ["train", &spec, "--local-workers", "2", "--steps", steps, "--checkpoint-dir", root];
        ok_json(flotilla(&[&head[..], resume, &kept[..]].concat()))
    };
    let uninterrupted = run(full, "120", &[]);
    let first = run(split, "60", &[]);
    let from = first["checkpoint"].as_str().expect("a checkpoint URI").to_string();
    let resumed = run(split, "120", &["--resume-from", &from]);
    let read = |root: &str, name: &str| std::fs::read(Path::new(root).join(format!("ckpt/000000000120/{name}")));
    let meta = |root: &str| -> serde_json::Value {
        serde_json::from_slice(&read(root, "meta").expect("the final meta")).expect("JSON")
    };
    let count = &meta(full)["patience"];
    assert_eq!((count["best_step"].as_u64(), count["since_best"].as_u64()), (Some(20), Some(4)), "{count}");
    assert_eq!(&meta(split)["patience"], count, "the same validations counted");
    assert!(read(full, "best").expect("a best part") == read(split, "best").expect("a best part"));
    assert_eq!((uninterrupted["model_step"].as_u64(), resumed["model_step"].as_u64()), (Some(20), Some(20)));
    for metric in ["val_accuracy", "val_loss"] {
        assert_eq!(uninterrupted["metrics"][metric], resumed["metrics"][metric], "the model's {metric}");
    }
}

/// `train.stop_at_val_accuracy`: the ranks finish at the first validation that reaches it,
/// before the spec's length, and that step's state is final: bit-identical to a run told to
/// stop at that step.
/// `train.patience`: on 2 workers the run ends at the validation that made `patience` in a row
/// without a better one, says so, and keeps the count in its final checkpoint. With
/// `train.keep_best` its model is the best validated state: the final checkpoint's `best` part
/// holds the weights of the checkpoint at that step, and the metrics are that validation's.
#[test]
fn patience_finishes_a_run_that_stopped_improving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_str().expect("utf-8");
    let spec = example("digits-mlp.toml"); // 20 epochs: 460 steps on 2 workers
    let args = [
        "--set",
        "train.validate_every_steps=20",
        "--set",
        "train.patience=3",
        "--set",
        "train.keep_best=true",
        "--set",
        "checkpoint.every_steps=20",
    ];
    let patient = flotilla(
        &[&["train", &spec, "--local-workers", "2", "--checkpoint-dir", root], &args[..], &["-o", "json"]].concat(),
    );
    let notes = String::from_utf8_lossy(&patient.stderr).to_string();
    let summary = ok_json(patient);
    let step = summary["step"].as_u64().expect("the final step");
    assert!(step.is_multiple_of(20) && step < 460, "it finished early, at a validation step: {summary}");
    let said = format!("finished at step {step}: 3 validations in a row brought no better val_loss than");
    assert!(notes.contains(&said), "{notes}");
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(root).join(format!("ckpt/{step:012}/meta"))).expect("the final checkpoint"),
    )
    .expect("JSON");
    assert_eq!(meta["patience"]["since_best"], 3, "{meta}");
    assert_eq!(meta["patience"]["best_step"].as_u64(), Some(step - 60), "{meta}");

    let best = step - 60;
    let part = |ckpt: u64, name: &str| std::fs::read(Path::new(root).join(format!("ckpt/{ckpt:012}/{name}")));
    let kept = part(step, "best").expect("the final checkpoint has the best state");
    assert!(kept == part(best, "model").expect("the checkpoint of the best step"), "the weights of step {best}");
    assert!(kept != part(step, "model").expect("the final weights"), "not the last weights");
    assert_eq!(summary["model_step"].as_u64(), Some(best), "{summary}");
    assert!(notes.contains(&format!("the model is the best validated state, step {best} (val_loss ")), "{notes}");
    let accuracy = summary["metrics"]["val_accuracy"].as_f64().expect("the model's accuracy");
    let validated = format!("validation at step {best}: val_accuracy {accuracy:.4} ");
    assert!(notes.contains(&validated), "the metrics are the best validation's ({validated}): {notes}");
}

#[test]
fn a_validation_target_finishes_the_run_at_the_step_validated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (early, fixed) = (dir.path().join("early"), dir.path().join("fixed"));
    let (early, fixed) = (early.to_str().expect("utf-8"), fixed.to_str().expect("utf-8"));
    let spec = example("digits-mlp.toml"); // 20 epochs: 460 steps on 2 workers
    let targeted = flotilla(&[
        "train",
        &spec,
        "--local-workers",
        "2",
        "--checkpoint-dir",
        early,
        "--set",
        "train.validate_every_steps=20",
        "--set",
        "train.stop_at_val_accuracy=0.93",
        "-o",
        "json",
    ]);
    let notes = String::from_utf8_lossy(&targeted.stderr).to_string();
    let summary = ok_json(targeted);
    let reached = notes.lines().find(|l| l.contains("reached train.stop_at_val_accuracy = 0.93")).expect("said");
    let step: u64 = reached
        .split("validation at step ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{reached}"));
    assert!(step.is_multiple_of(20) && step < 460, "{notes}");
    assert_eq!((summary["step"].as_u64(), summary["total_steps"].as_u64()), (Some(step), Some(step)), "{summary}");
    assert!(summary["metrics"]["val_accuracy"].as_f64().is_some_and(|a| a >= 0.93), "{summary}");
    let below: Vec<&str> =
        notes.lines().filter(|l| l.starts_with("validation at step") && !l.contains("reached")).collect();
    assert_eq!(below.len() as u64, step / 20, "every validation before was below the target: {notes}");

    let stopped = ok_json(flotilla(&[
        "train",
        &spec,
        "--local-workers",
        "2",
        "--checkpoint-dir",
        fixed,
        "--steps",
        &step.to_string(),
        "-o",
        "json",
    ]));
    assert_eq!(stopped["metrics"]["val_accuracy"], summary["metrics"]["val_accuracy"]);
    let part = |root: &str, name: &str| {
        std::fs::read(Path::new(root).join(format!("ckpt/{step:012}/{name}"))).expect("the final checkpoint")
    };
    assert!(part(early, "model") == part(fixed, "model"), "the final weights are the validated step's");
    assert!(part(early, "optim") == part(fixed, "optim"), "no update after it");

    // A run that stopped exactly there (a stop at a validation step is not judged) and resumes
    // with the target judges that step first, and finishes at once: no step taken.
    let checkpoint = stopped["checkpoint"].as_str().expect("the final checkpoint").to_string();
    let resumed = flotilla(&[
        "train",
        &spec,
        "--local-workers",
        "2",
        "--resume-from",
        &checkpoint,
        "--set",
        "train.validate_every_steps=20",
        "--set",
        "train.stop_at_val_accuracy=0.93",
        "-o",
        "json",
    ]);
    let notes = String::from_utf8_lossy(&resumed.stderr).to_string();
    let resumed = ok_json(resumed);
    assert_eq!(resumed["step"].as_u64(), Some(step), "{resumed}");
    assert_eq!(resumed["metrics"]["val_accuracy"], summary["metrics"]["val_accuracy"]);
    assert!(
        notes.contains(&format!("the validation of step {step}, where this generation resumes, reached")),
        "{notes}"
    );
}

#[test]
fn a_corrupted_checkpoint_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_str().expect("utf-8");
    let spec = example("digits-mlp.toml");
    let summary = ok_json(flotilla(&["train", &spec, "--steps", "50", "--checkpoint-dir", root, "-o", "json"]));
    let prefix = dir.path().join("ckpt/000000000050");
    let model = prefix.join("model");
    let mut bytes = std::fs::read(&model).expect("weights");
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&model, bytes).expect("truncate");
    let uri = summary["checkpoint"].as_str().expect("uri").to_string();
    let out = flotilla(&["train", &spec, "--steps", "60", "--resume-from", &uri]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("corrupt") && stderr.contains("`model`"), "{stderr}");

    std::fs::remove_file(prefix.join("MANIFEST")).expect("remove manifest");
    let out = flotilla(&["train", &spec, "--steps", "60", "--resume-from", &uri]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("partial"), "a checkpoint without MANIFEST is partial");
}

#[test]
fn the_mnist_example_learns_on_two_workers() {
    let summary = ok_json(flotilla(&["train", &example("mnist-mlp.toml"), "--local-workers", "2", "-o", "json"]));
    let accuracy = summary["metrics"]["val_accuracy"].as_f64().expect("validation accuracy");
    assert!(accuracy >= 0.90, "mnist-mlp on 2 workers reached only {accuracy}");
    assert!(summary["checkpoint"].is_null(), "no checkpoint without --checkpoint-dir");
}

/// `--init-from`: a run started from another run's exported model (as `models download` writes
/// it) starts where that run ended: one step at a negligible learning rate keeps its accuracy,
/// on two ranks; a missing file is refused before any rank starts.
#[test]
fn a_run_from_an_exported_model_starts_where_that_run_ended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base");
    let spec = example("digits-mlp.toml");
    let args = ["train", &spec, "--local-workers", "2", "-o", "json"];
    let trained = ok_json(flotilla(&[&args[..], &["--checkpoint-dir", base.to_str().expect("utf-8")]].concat()));
    let model = trained["model"].as_str().expect("the exported model").trim_start_matches("file://").to_string();
    let tuned = ok_json(flotilla(
        &[&args[..], &["--init-from", &model, "--steps", "1", "--set", "train.learning_rate=0.000001"]].concat(),
    ));
    let accuracy = |summary: &serde_json::Value| summary["metrics"]["val_accuracy"].as_f64().expect("accuracy");
    assert!(accuracy(&trained) >= 0.9, "{trained}");
    assert!(accuracy(&tuned) >= accuracy(&trained) - 0.02, "{tuned} vs {trained}");
    let seeded = ok_json(flotilla(&[&args[..], &["--steps", "1"]].concat()));
    assert!(accuracy(&seeded) < 0.5, "one step from the seeded weights: {seeded}");
    let missing = flotilla(&[&args[..], &["--init-from", "/nonexistent/model.safetensors"]].concat());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && stderr.contains("--init-from /nonexistent/model.safetensors: no file"),
        "{stderr}"
    );
}

/// `--set` reaches every rank: they stop at the overridden length, with the overridden model.
#[test]
fn set_overrides_reach_every_rank() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_str().expect("utf-8");
    let spec = example("digits-mlp.toml");
    let (small, default) = (dir.path().join("small"), dir.path().join("default"));
    let mut sizes = Vec::new();
    for (at, hidden) in [(&small, "model.hidden=[8]"), (&default, "train.seed=42")] {
        let at = at.to_str().expect("utf-8");
        let args = ["train", &spec, "--local-workers", "2", "--checkpoint-dir", at, "-o", "json"];
        let summary = ok_json(flotilla(&[&args[..], &["--set", "train.steps=40", "--set", hidden]].concat()));
        assert_eq!((summary["step"].as_u64(), summary["world_size"].as_u64()), (Some(40), Some(2)), "{summary}");
        sizes.push(std::fs::metadata(Path::new(at).join("ckpt/000000000040/model")).expect("final weights").len());
    }
    assert!(sizes[0] * 4 < sizes[1], "hidden = [8] holds fewer weights: {sizes:?} under {root}");
}

#[test]
fn bad_arguments_are_clear_errors() {
    let spec = example("digits-mlp.toml");
    let out = flotilla(&["train", &spec, "--local-workers", "0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--local-workers must be 1 to"));
    // A missing checkpoint is named as missing (it used to read as a partial one).
    let out = flotilla(&["train", &spec, "--resume-from", "/nonexistent/ckpt/1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--resume-from /nonexistent/ckpt/1: no checkpoint there"), "{stderr}");

    // A checkpoint folder that cannot be written (under a file) is refused before any rank
    // trains, by name; it used to train to the end, warn at every checkpoint and exit 0.
    let file = tempfile::NamedTempFile::new().expect("a file");
    let under_a_file = file.path().join("ckpt");
    let out = flotilla(&["train", &spec, "--checkpoint-dir", under_a_file.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--checkpoint-dir") && stderr.contains("cannot be written there"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("generation 1"), "refused before training");

    // Weights from a registry need a cluster: said, not ignored.
    let out = flotilla(&["train", &spec, "--set", "train.init_from=digits-mlp@2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("train.init_from = digits-mlp@2 names a model of a cluster's registry"),
        "{stderr}"
    );
}

#[test]
fn sigterm_stops_after_a_checkpoint_and_the_run_resumes_from_it() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_str().expect("utf-8");
    let spec = example("digits-mlp.toml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["train", &spec, "--local-workers", "2", "--steps", "10000000", "--checkpoint-dir", root])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flotilla train starts");
    // Interrupt once a checkpoint was written: training is under way.
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let started = lines.by_ref().map_while(Result::ok).any(|line| line.starts_with("checkpoint at step"));
    assert!(started, "no checkpoint line before the end of the output");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let out = child.wait_with_output().expect("exit");
    assert!(!out.status.success(), "an interrupted run exits non-zero");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stopped_line = rest.iter().find(|l| l.starts_with("stopped at step")).expect("a stop note");
    let stopped: u64 =
        stopped_line.split_whitespace().nth(3).and_then(|s| s.parse().ok()).expect("the step it stopped at");
    let uri = stderr.split("--resume-from ").nth(1).and_then(|s| s.split('`').next()).expect("a resume hint");
    assert!(uri.ends_with(&format!("ckpt/{stopped:012}")), "{uri} is not the checkpoint of step {stopped}");

    let resumed = ok_json(flotilla(&[
        "train",
        &spec,
        "--local-workers",
        "2",
        "--steps",
        &(stopped + 10).to_string(),
        "--resume-from",
        uri,
        "-o",
        "json",
    ]));
    assert_eq!(resumed["step"].as_u64(), Some(stopped + 10), "{resumed}");
}
