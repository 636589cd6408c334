//! `flotilla validate`, driven as a user drives it: the real binary on real files.

use std::path::Path;
use std::process::{Command, Output};

fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla")).args(args).output().expect("the flotilla binary runs")
}

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

#[test]
fn every_shipped_example_validates() {
    let mut seen = 0;
    for entry in std::fs::read_dir(examples()).expect("examples/ exists") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = flotilla(&["validate", path.to_str().expect("utf-8 path")]);
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            seen += 1;
        }
    }
    assert!(seen >= 3, "expected at least mnist-mlp, mnist-cnn and digits-mlp, found {seen}");
}

#[test]
fn validate_prints_the_normalised_spec_with_resolved_paths() {
    let spec = examples().join("mnist-mlp.toml");
    let out = flotilla(&["validate", spec.to_str().expect("utf-8")]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let data = examples().join("data/mnist_5k.csv.gz").canonicalize().expect("data ships with the examples");
    assert!(text.contains(&format!("train = \"file://{}\"", data.display())), "{text}");
    assert!(text.contains("on_demand_fallback = true"), "defaults are written out: {text}");

    let out = flotilla(&["validate", spec.to_str().expect("utf-8"), "--output", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(json["valid"], true);
    assert_eq!(json["spec"]["workers"]["min"], 2);
    assert_eq!(json["spec"]["model"]["kind"], "mlp");
}

fn write_spec(dir: &Path, body: &str) -> String {
    let path = dir.join("job.toml");
    std::fs::write(&path, body).expect("write spec");
    path.to_str().expect("utf-8").to_string()
}

#[test]
fn min_greater_than_max_fails_and_names_both_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(
        dir.path(),
        "name = \"x\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\nworkers = { min = 4, max = 2 }\n",
    );
    let out = flotilla(&["validate", &spec]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("workers.min") && stderr.contains("workers.max"), "{stderr}");

    let out = flotilla(&["--output", "json", "validate", &spec]);
    assert!(!out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON errors");
    assert_eq!(json["valid"], false);
    assert_eq!(json["errors"][0]["field"], "workers.min");
}

#[test]
fn missing_data_files_and_missing_specs_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(
        dir.path(),
        "name = \"x\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"nowhere.csv\" }\nworkers = { min = 1 }\n",
    );
    let out = flotilla(&["validate", &spec]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("data.train") && stderr.contains("does not exist"), "{stderr}");

    let out = flotilla(&["validate", "/no/such/job.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read job spec"));
}

#[test]
fn unknown_fields_are_refused_with_their_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(
        dir.path(),
        "name = \"x\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\nworkers = { min = 1 }\n[train]\nepoch = 3\n",
    );
    let out = flotilla(&["validate", &spec]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("epoch") && stderr.contains("line 6"), "{stderr}");
}

/// Piped into a reader that goes away (`flotilla validate ... | head -1`), the CLI ends quietly
/// as other Unix tools do; it used to panic in `println!` with a backtrace.
#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let spec = examples().join("mnist-mlp.toml");
    // The reader is gone before the child starts, so its first write finds no reader (closing
    // it after the spawn raced the child's write into the pipe's buffer: once it won, exit 0).
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["validate", spec.to_str().expect("utf-8"), "-o", "json"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the flotilla binary runs");
    let out = child.wait_with_output().expect("it ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(13), "ended by SIGPIPE, like `ls | head`: {:?} {stderr}", out.status);
}

#[test]
fn submit_refuses_a_priority_out_of_range_before_contacting_anybody() {
    let spec = examples().join("mnist-mlp.toml");
    let out = flotilla(&["submit", spec.to_str().expect("utf-8"), "--priority", "-1001"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--priority") && stderr.contains("-1000..=1000"), "{stderr}");
}

/// `--set FIELD=VALUE` replaces a field of the file: typed values, plain text, a relative path
/// taken from the current folder; a bad one is refused with its field and the flag, before
/// anybody is contacted.
#[test]
fn set_replaces_fields_and_a_bad_one_is_refused_by_name() {
    let spec = examples().join("mnist-mlp.toml");
    let spec = spec.to_str().expect("utf-8");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("mine.csv"), "label,x\n1,0.5\n").expect("a data file");
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .current_dir(dir.path())
        .args(["validate", spec, "-o", "json", "--set", "train.learning_rate=0.01", "--set", "name=lr-0.01"])
        .args(["--set", "model.hidden=[64]", "--set", "data.train=mine.csv", "--set", "train.steps=30"])
        .output()
        .expect("the flotilla binary runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let spec_json = &json["spec"];
    assert_eq!(spec_json["train"]["learning_rate"], 0.01);
    assert_eq!(spec_json["train"]["steps"], 30, "{spec_json}");
    assert!(spec_json["train"].get("epochs").is_none(), "steps replace the file's epochs: {spec_json}");
    assert_eq!(spec_json["name"], "lr-0.01");
    assert_eq!(spec_json["model"]["hidden"], serde_json::json!([64]));
    let data = dir.path().canonicalize().expect("the folder").join("mine.csv");
    assert_eq!(spec_json["data"]["train"], format!("file://{}", data.display()), "{spec_json}");
    assert_eq!(spec_json["workers"]["min"], 2, "the file's other fields are kept");

    for (given, says) in [
        ("train.learning_rat=0.1", "train.learning_rat: --set train.learning_rat=0.1: unknown field"),
        ("train.learning_rate=20", "train.learning_rate"),
        ("data.train=nowhere.csv", "does not exist"),
    ] {
        let out = flotilla(&["validate", spec, "--set", given]);
        assert!(!out.status.success(), "{given}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{given}: {stderr}");
    }
    let out = flotilla(&["submit", spec, "--set", "train.learning_rate"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--set") && stderr.contains("is not FIELD=VALUE"), "{stderr}");
}
