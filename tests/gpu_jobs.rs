//! A GPU job (`workers.gpus > 0`) given a worker without a usable GPU: the generation ends with
//! the reason, the failure policy ends the job with it, and the agent lives on (no panic, and
//! no silent CPU run). This machine and CI have no GPU; scripts/gpu_check.sh covers the GPU.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Local, command, submit, wait_for};

#[test]
fn a_gpu_job_on_a_worker_without_a_gpu_fails_with_the_reason() {
    if flotilla_worker::gpu::cuda_devices().is_ok() {
        return; // a GPU machine: the job would train
    }
    let cluster = Local::up(0);
    let home = cluster.home.as_path();
    // A worker that reports a GPU it cannot use, as a misconfigured instance would.
    let mut worker = command(home)
        .args(["worker", "--gpus", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("a worker starts");
    let spec = cluster.dir.path().join("gpu.toml");
    std::fs::write(
        &spec,
        "name = \"gpu\"\nmodel = { kind = \"mlp\", hidden = [16] }\n\
         data = { train = \"synthetic:blobs?samples=512&features=8&classes=3&seed=1\", validation_fraction = 0.0 }\n\
         train = { steps = 20, batch_size = 32 }\nworkers = { min = 1, max = 1, gpus = 1 }\n\
         capacity = { max_failures = 2 }\n",
    )
    .expect("spec");
    let job = submit(home, &spec);
    let done = wait_for(home, &job, Duration::from_secs(90), "failed", |s| s["state"] == "Failed");
    let reason = done["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("workers.gpus = 1"), "the reason names the setting: {done}");
    assert!(reason.contains("workers.gpus = 0") || reason.contains("--features cuda"), "and a fix: {done}");
    assert_eq!(done["step"].as_u64().unwrap_or(0), 0, "nothing trained on the CPU instead: {done}");
    assert!(worker.try_wait().expect("wait").is_none(), "the agent survived the refusal");
    let _ = worker.kill();
    let _ = worker.wait();
}
