//! The model registry end to end: a job trained on the local cluster is registered as a
//! version with its lineage (job, source checkpoint, data fingerprint, metrics, spec); aliases
//! resolve; the safetensors download has PyTorch's names and shapes and holds exactly the
//! trained weights (compared with the source checkpoint's parameters); bad references fail
//! with a clear message.

use std::path::Path;

mod common;
use common::{Down, run};
use serde_json::Value;

fn json(home: &Path, args: &[&str]) -> Value {
    let out = run(home, args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(String::from_utf8_lossy(&out.stdout).lines().last().expect("output").as_bytes())
        .expect("JSON")
}

/// (name -> (shape, values)) of a safetensors file, parsed by hand (the format is tiny).
fn read_safetensors(bytes: &[u8]) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).expect("header JSON");
    let data = &bytes[8 + header_len..];
    header
        .as_object()
        .expect("object")
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, t)| {
            assert_eq!(t["dtype"], "F32", "{name}");
            let shape: Vec<usize> =
                t["shape"].as_array().expect("shape").iter().map(|d| d.as_u64().expect("dim") as usize).collect();
            let (start, end) = (
                t["data_offsets"][0].as_u64().expect("start") as usize,
                t["data_offsets"][1].as_u64().expect("end") as usize,
            );
            assert_eq!(end - start, 4 * shape.iter().product::<usize>(), "{name}");
            let values =
                data[start..end].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect();
            (name.clone(), (shape, values))
        })
        .collect()
}

#[test]
fn a_trained_job_becomes_a_version_with_lineage_aliases_and_a_pytorch_loadable_artifact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let _down = Down(&home);
    assert!(run(&home, &["up", "--workers", "1"]).status.success());
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/digits.csv");
    let spec = dir.path().join("digits.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"digits-run\"\nmodel = {{ kind = \"mlp\", hidden = [32] }}\n\
             data = {{ train = \"{}\", validation_fraction = 0.2 }}\ntrain = {{ epochs = 5, batch_size = 32 }}\n\
             workers = {{ min = 1, max = 1 }}\noutput = {{ register_as = \"digits\" }}\n",
            data.display()
        ),
    )
    .expect("spec");
    let followed = run(&home, &["submit", spec.to_str().expect("utf-8"), "--follow"]);
    assert!(followed.status.success(), "{}", String::from_utf8_lossy(&followed.stderr));
    let job_id = String::from_utf8_lossy(&followed.stdout).lines().last().expect("job id").trim().to_string();
    let job = json(&home, &["status", &job_id, "-o", "json"]);
    assert_eq!(job["state"], "Succeeded", "{job}");

    let listed = json(&home, &["models", "list", "-o", "json"]);
    let versions = listed.as_array().expect("list");
    assert_eq!(versions.len(), 1, "{listed}");
    let v = &versions[0];
    assert_eq!((v["name"].as_str(), v["version"].as_u64()), (Some("digits"), Some(1)));
    assert_eq!(v["job_id"], job["id"]);
    assert_eq!(v["metrics"]["val_accuracy"], job["metrics"]["val_accuracy"], "the job's validation accuracy");
    assert_eq!(v["source_checkpoint"]["step"], job["step"], "lineage: the final checkpoint");
    let fingerprint = v["dataset_sha256"].as_str().expect("fingerprint");
    assert!(fingerprint.len() == 64 && fingerprint.bytes().all(|b| b.is_ascii_hexdigit()), "{fingerprint}");
    assert!(v["spec_toml"].as_str().is_some_and(|t| t.contains("hidden = [32]")), "{v}");

    let aliased = run(&home, &["models", "alias", "digits", "1", "production"]);
    assert!(aliased.status.success(), "{}", String::from_utf8_lossy(&aliased.stderr));
    let shown = json(&home, &["models", "show", "digits@production", "-o", "json"]);
    assert_eq!(shown["version"], 1);
    assert_eq!(shown["aliases"], serde_json::json!(["production"]));

    // The same version for a reader.
    let text = run(&home, &["models", "show", "digits@production"]);
    assert!(text.status.success(), "{}", String::from_utf8_lossy(&text.stderr));
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    let accuracy = format!("{:.4}", v["metrics"]["val_accuracy"].as_f64().expect("accuracy"));
    assert!(text.starts_with("digits version 1 (production)\n"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("val_accuracy") && l.ends_with(&accuracy)), "{text}");
    assert!(text.contains(&format!("trained from          step {} at ", job["step"])), "{text}");
    assert!(
        text.contains(&format!("dataset sha256        {fingerprint}")) && text.contains("  hidden = [32]"),
        "{text}"
    );
    assert!(!text.starts_with('{'), "not JSON: {text}");

    let file = dir.path().join("digits.safetensors");
    let downloaded = run(
        &home,
        &["models", "download", "digits@production", "--format", "safetensors", "-f", file.to_str().expect("utf-8")],
    );
    assert!(downloaded.status.success(), "{}", String::from_utf8_lossy(&downloaded.stderr));
    let tensors = read_safetensors(&std::fs::read(&file).expect("artifact"));
    let names: Vec<&str> = tensors.keys().map(String::as_str).collect();
    assert_eq!(names, ["hidden.0.bias", "hidden.0.weight", "output.bias", "output.weight"]);
    assert_eq!(tensors["hidden.0.weight"].0, [32, 64], "PyTorch's [out, in]");
    assert_eq!(tensors["output.weight"].0, [10, 32]);
    // The same numbers as the source checkpoint's flat parameters (burn order: hidden weight
    // [in, out], hidden bias, output weight [in, out], output bias).
    let checkpoint = v["source_checkpoint"]["uri"].as_str().expect("uri").trim_start_matches("file://").to_string();
    let flat: Vec<f32> = std::fs::read(Path::new(&checkpoint).join("model"))
        .expect("model part")
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
        .collect();
    assert_eq!(flat.len(), 64 * 32 + 32 + 32 * 10 + 10);
    let w = &tensors["hidden.0.weight"].1;
    for (i, o) in [(0usize, 0usize), (5, 7), (63, 31)] {
        assert_eq!(w[o * 64 + i], flat[i * 32 + o], "hidden.0.weight[{o}][{i}]");
    }
    assert_eq!(tensors["hidden.0.bias"].1, flat[64 * 32..64 * 32 + 32]);
    assert_eq!(tensors["output.bias"].1, flat[flat.len() - 10..]);

    let missing = run(&home, &["models", "show", "nope@3"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no model named `nope`"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    let bad_alias = run(&home, &["models", "alias", "digits", "1", "Not Valid"]);
    assert!(!bad_alias.status.success());
    assert!(String::from_utf8_lossy(&bad_alias.stderr).contains("alias `Not Valid`"));
    let no_version = run(&home, &["models", "show", "digits@9"]);
    assert!(String::from_utf8_lossy(&no_version.stderr).contains("has no version 9"));

    // A model that cannot be written to the store (a file where its folder goes): the job still
    // succeeds (its training is done, its checkpoints hold the weights), is not registered, and
    // its events say why, each cause once (it used to say nothing outside the worker's log).
    std::fs::create_dir_all(home.join("store/jobs/job-2")).expect("job folder");
    std::fs::write(home.join("store/jobs/job-2/model"), b"in the way").expect("a file in the way");
    let followed = run(&home, &["submit", spec.to_str().expect("utf-8"), "--follow"]);
    let job_id = String::from_utf8_lossy(&followed.stdout).lines().last().expect("job id").trim().to_string();
    assert_eq!(job_id, "job-2");
    let job = json(&home, &["status", &job_id, "-o", "json"]);
    assert_eq!(job["state"], "Succeeded", "{job}");
    let said: Vec<&str> = job["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "registry")
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert_eq!(said.len(), 1, "{job}");
    assert!(said[0].starts_with("model `digits` not registered: the model could not be exported: "), "{}", said[0]);
    assert_eq!(said[0].matches("Not a directory").count(), 1, "each cause once: {}", said[0]);
    let listed = json(&home, &["models", "list", "-o", "json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "still one version: {listed}");

    // Fine-tuning: a job that starts from a registered version's weights (`train.init_from`)
    // starts where that version ended: after one step at a negligible learning rate it is as
    // accurate as the version (the seeded weights are near chance after one step).
    let spec_path = spec.to_str().expect("utf-8");
    let tuned = run(
        &home,
        &[
            "submit",
            spec_path,
            "--set",
            "train.init_from=digits@production",
            "--set",
            "train.steps=1",
            "--set",
            "train.learning_rate=0.000001",
            "--set",
            "output.register_as=digits-tuned",
            "--follow",
        ],
    );
    assert!(tuned.status.success(), "{}", String::from_utf8_lossy(&tuned.stderr));
    let job_id = String::from_utf8_lossy(&tuned.stdout).lines().last().expect("job id").trim().to_string();
    let job = json(&home, &["status", &job_id, "-o", "json"]);
    let base = v["metrics"]["val_accuracy"].as_f64().expect("base accuracy");
    let accuracy = job["metrics"]["val_accuracy"].as_f64().expect("tuned accuracy");
    assert!(base >= 0.8 && accuracy >= base - 0.02, "base {base}, started from it {accuracy}: {job}");
    let artifact = json(&home, &["models", "show", "digits@1", "-o", "json"]);
    let init = format!(
        "starts from the weights of model digits version 1 ({})",
        artifact["artifact_uri"].as_str().expect("uri")
    );
    assert!(job["events"].as_array().expect("events").iter().any(|e| e["message"] == init.as_str()), "{job}");
    let logs = String::from_utf8_lossy(&run(&home, &["logs", &job_id]).stdout).to_string();
    assert!(logs.contains("starting from the weights of "), "{logs}");
    // Weights that do not fit the data (784 features, not 64) end the job at once, saying so.
    let mnist = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/mnist_5k.csv.gz");
    let other_data = format!("data.train={}", mnist.display());
    let unfit = run(&home, &["submit", spec_path, "--set", "train.init_from=digits", "--set", &other_data, "--follow"]);
    let stderr = String::from_utf8_lossy(&unfit.stderr);
    let said = "ended Failed: train.init_from: the registered weights do not fit this job: model and data do not fit";
    assert!(!unfit.status.success() && stderr.contains(said), "{stderr}");
    // What cannot be started from is refused at submission, naming the field.
    for (set, said) in [
        (&["--set", "train.init_from=digits@9"][..], "train.init_from = digits@9: model `digits` has no version 9"),
        (
            &["--set", "train.init_from=digits", "--set", "model.hidden=[16]"][..],
            "its weights fit only the same architecture",
        ),
    ] {
        let refused = run(&home, &[&["submit", spec_path][..], set].concat());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success() && stderr.contains(said), "{set:?}: {stderr}");
    }
}
