//! The coordinator's /metrics, as Prometheus reads it: a parser of the text exposition checks
//! every sample belongs to a family with HELP and TYPE, every value is a number, the exposition
//! ends with `# EOF`; and the values follow a running job (its step grows, the job counts move
//! from running to succeeded).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{Local, command, http_get as get, status, submit};

/// One sample: family-qualified name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition strictly enough to catch what Prometheus would refuse.
fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let (mut help, mut kind) = (BTreeSet::new(), BTreeMap::new());
    let mut samples = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    if lines.last() != Some(&"# EOF") {
        return Err("the exposition does not end with # EOF".into());
    }
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            help.insert(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, t) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            if !["counter", "gauge", "histogram", "summary", "info", "stateset", "unknown"].contains(&t) {
                return Err(format!("unknown type in `{line}`"));
            }
            kind.insert(name.to_string(), t.to_string());
            continue;
        }
        if line.starts_with('#') {
            return Err(format!("unexpected comment `{line}`"));
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| format!("no value in `{line}`"))?;
        let value: f64 = value.parse().map_err(|_| format!("value of `{line}` is not a number"))?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').ok_or_else(|| format!("unclosed labels in `{line}`"))?;
                let mut labels = BTreeMap::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").ok_or_else(|| format!("bad label `{pair}` in `{line}`"))?;
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (name, labels)
            }
            None => (series, BTreeMap::new()),
        };
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            return Err(format!("bad metric name in `{line}`"));
        }
        let family = ["_total", "_bucket", "_sum", "_count", "_created"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| kind.contains_key(*f)))
            .unwrap_or(name);
        if !help.contains(family) || !kind.contains_key(family) {
            return Err(format!("`{name}` has no HELP or TYPE (family `{family}`)"));
        }
        samples.push(Sample { name: name.to_string(), labels, value });
    }
    Ok(samples)
}

fn scrape(address: &str) -> Vec<Sample> {
    let (head, body) = get(address, "/metrics", "");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    parse(&body).unwrap_or_else(|e| panic!("{e}\n{body}"))
}

fn value(samples: &[Sample], name: &str, label: (&str, &str)) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && s.labels.get(label.0).map(String::as_str) == Some(label.1))
        .map(|s| s.value)
}

#[test]
fn the_parser_refuses_what_prometheus_would() {
    assert!(parse("flotilla_x 1\n# EOF").is_err(), "no HELP/TYPE");
    assert!(parse("# HELP flotilla_x x.\n# TYPE flotilla_x gauge\nflotilla_x one\n# EOF").is_err(), "not a number");
    assert!(parse("# HELP flotilla_x x.\n# TYPE flotilla_x gauge\nflotilla_x 1").is_err(), "no # EOF");
    let ok =
        parse("# HELP flotilla_x x.\n# TYPE flotilla_x counter\nflotilla_x_total{a=\"b\"} 1\n# EOF").expect("valid");
    assert_eq!(ok[0].labels["a"], "b");
}

#[test]
fn metrics_are_well_formed_and_follow_a_running_job() {
    let cluster = Local::up(2);
    let home = cluster.home.as_path();
    let file: toml::Value =
        toml::from_str(&std::fs::read_to_string(home.join("cluster.toml")).expect("cluster.toml")).expect("toml");
    let address = file["coordinators"][0]["metrics_address"].as_str().expect("up sets a metrics address").to_string();

    let idle = scrape(&address);
    assert_eq!(value(&idle, "flotilla_workers", ("state", "idle")), Some(2.0));
    assert_eq!(value(&idle, "flotilla_jobs", ("state", "running")), Some(0.0));
    let leader = idle.iter().find(|s| s.name == "flotilla_raft_is_leader").map(|s| s.value);
    assert_eq!(leader, Some(1.0), "a one-node cluster's node leads");

    let spec = cluster.dir.path().join("long.toml");
    std::fs::write(
        &spec,
        "name = \"metered\"\nmodel = { kind = \"mlp\", hidden = [64] }\n\
         data = { train = \"synthetic:blobs?samples=4000&features=32&classes=4&seed=3\", validation_fraction = 0.1 }\n\
         train = { steps = 10000, batch_size = 32, validate_every_steps = 2000, lr_schedule = \"cosine\", \
         warmup_steps = 100 }\nworkers = { min = 2, max = 2 }\n",
    )
    .expect("spec");
    let job = submit(home, &spec);
    let mut steps = Vec::new();
    let started = Instant::now();
    while steps.len() < 2 && started.elapsed() < Duration::from_secs(60) {
        let samples = scrape(&address);
        if let Some(step) = value(&samples, "flotilla_job_step", ("job", &job)).filter(|s| *s > 0.0) {
            assert_eq!(value(&samples, "flotilla_jobs", ("state", "running")), Some(1.0));
            assert!(value(&samples, "flotilla_job_samples_per_second", ("job", &job)).is_some_and(|v| v > 0.0));
            if steps.last().is_none_or(|last| step > *last) {
                steps.push(step);
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(steps.len() >= 2, "the job's step grew between scrapes: {steps:?}");
    let started = Instant::now();
    while status(home, &job)["state"] != "Succeeded" && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(300));
    }
    let done = scrape(&address);
    assert_eq!(value(&done, "flotilla_jobs", ("state", "succeeded")), Some(1.0));
    assert_eq!(value(&done, "flotilla_jobs", ("state", "running")), Some(0.0));
    assert_eq!(value(&done, "flotilla_job_step", ("job", &job)), Some(10000.0));
    let goodput = value(&done, "flotilla_job_goodput_steps_per_second", ("job", &job));
    assert!(goodput.is_some_and(|g| g > 0.0), "committed steps per second of the job's life: {goodput:?}");
    assert_eq!(value(&done, "flotilla_job_cost_per_step_usd", ("job", &job)), Some(0.0), "local workers are free");
    let proposals = done.iter().find(|s| s.name == "flotilla_raft_propose_seconds_count").map(|s| s.value);
    assert!(proposals.is_some_and(|n| n > 0.0), "proposals are timed");

    // The job's metrics history (kept in the store by rank 0, not in the Raft log): a token is
    // needed; the points follow the training and end with the validation metrics.
    let path = format!("/api/jobs/{job}/history");
    let (refused, _) = get(&address, &path, "");
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let (wrong, _) = get(&address, &path, "Authorization: Bearer not-the-token\r\n");
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    let token = file["api_token"].as_str().expect("api_token");
    let (head, body) = get(&address, &path, &format!("Authorization: Bearer {token}\r\n"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let history: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let points = history["points"].as_array().expect("points");
    let steps: Vec<u64> = points.iter().filter_map(|p| p["step"].as_u64()).collect();
    assert!(steps.len() >= 3, "a point about every second, and the final one: {body}");
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "in step order: {steps:?}");
    assert!(points.iter().filter(|p| p["loss"].is_number()).count() >= 2, "{body}");
    let last = points.last().expect("a last point");
    assert_eq!(last["step"], 10000, "{last}");
    assert!(last["val_accuracy"].as_f64().is_some_and(|a| a > 0.5), "validation metrics at the end: {last}");
    // While it trained, rank 0 evaluated every 2000 steps and reported each at once: a point
    // at its own step (the first, at step 2000, is always 250 ms after any other).
    let validated: Vec<u64> = points
        .iter()
        .filter(|p| p["val_accuracy"].is_number() && p["step"] != 10000)
        .filter_map(|p| p["step"].as_u64())
        .collect();
    assert!(validated.first() == Some(&2000) && validated.iter().all(|s| s % 2000 == 0), "{validated:?}: {body}");

    // `flotilla history` reads the same curve through the job API: thinned to what it asks for
    // (plus the validation point), the final metrics last, the loss lower than at the start.
    let cli = common::ok(common::run(home, &["history", &job, "--points", "4", "-o", "json"]));
    let cli: serde_json::Value = serde_json::from_str(&cli).expect("history prints one JSON object");
    let thinned = cli["points"].as_array().expect("points");
    // (Each validation point is kept: the stride's 4, the last, and those.)
    let validations = points.iter().filter(|p| p["val_accuracy"].is_number()).count();
    assert!(thinned.len() <= 5 + validations && thinned.len() < points.len(), "{cli}");
    assert_eq!(thinned.last(), points.last(), "the same final point: {cli}");
    let all = common::ok(common::run(home, &["history", &job, "--points", "10000", "-o", "json"]));
    let all: serde_json::Value = serde_json::from_str(&all).expect("history prints one JSON object");
    assert_eq!(all["points"].as_array(), Some(points), "unthinned, the points the HTTP API serves");
    // Each progress point has its step's learning rate: the cosine schedule's, from 0.001 down.
    let rates: Vec<(u64, f64)> = points
        .iter()
        .filter(|p| p["loss"].is_number())
        .filter_map(|p| Some((p["step"].as_u64()?, p["learning_rate"].as_f64()?)))
        .collect();
    let progress_points = points.iter().filter(|p| p["loss"].is_number()).count();
    assert_eq!(rates.len(), progress_points, "every progress point has a rate: {body}");
    let decaying: Vec<f64> = rates.iter().filter(|(step, _)| *step > 100).map(|(_, rate)| *rate).collect();
    assert!(
        decaying.windows(2).all(|w| w[1] <= w[0]) && rates.iter().all(|(_, r)| *r > 0.0 && *r <= 0.001),
        "{rates:?}"
    );
    assert!(rates.iter().any(|(step, rate)| *step > 6000 && *rate < 0.0005), "it decays over the job: {rates:?}");
    let losses: Vec<f64> = points.iter().filter_map(|p| p["loss"].as_f64()).collect();
    assert!(losses.len() >= 2 && losses[losses.len() - 1] < losses[0], "the curve falls: {losses:?}");
    let table = common::ok(common::run(home, &["history", &job, "--points", "10000"]));
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].trim_start().starts_with("STEP") && rows.len() == points.len() + 2, "{table}");
    assert!(rows[rows.len() - 2].trim_start().starts_with("10000 "), "{table}");
    let missing = common::run(home, &["history", "job-99"]);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && stderr.contains("job-99 does not exist"), "{stderr}");

    // A job with a validation target finishes at the first validation that reaches it, and
    // says so in its reason.
    let targeted = cluster.dir.path().join("targeted.toml");
    std::fs::write(
        &targeted,
        "name = \"targeted\"\nmodel = { kind = \"mlp\", hidden = [64] }\n\
         data = { train = \"synthetic:blobs?samples=4000&features=32&classes=4&seed=3\", validation_fraction = 0.1 }\n\
         train = { steps = 10000, batch_size = 32, validate_every_steps = 100, stop_at_val_accuracy = 0.5 }\n\
         workers = { min = 2, max = 2 }\n",
    )
    .expect("spec");
    let early = submit(home, &targeted);
    let done = common::wait_for(home, &early, Duration::from_secs(120), "success", |s| s["state"] == "Succeeded");
    let step = done["step"].as_u64().expect("step");
    assert!(done["state"] == "Succeeded" && step < 10000 && step.is_multiple_of(100), "{done}");
    let reason = done["reason"].as_str().unwrap_or_default();
    let said = format!("finished at step {step}: its validation reached train.stop_at_val_accuracy = 0.5");
    assert!(reason.starts_with(&said), "{done}");
    let event = done["events"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["kind"] == "succeeded"))
        .unwrap_or_else(|| panic!("{done}"));
    assert!(event["message"].as_str().is_some_and(|m| m.starts_with(&format!("generation 1 {said}"))), "{event}");
    assert!(done["metrics"]["val_accuracy"].as_f64().is_some_and(|a| a >= 0.5), "{done}");

    // With train.keep_best the model is the best validated state: the job's metrics, its
    // registered version and its history name that step; the history also has the last state's.
    let kept = cluster.dir.path().join("kept.toml");
    std::fs::write(
        &kept,
        "name = \"kept\"\nmodel = { kind = \"mlp\", hidden = [64] }\n\
         data = { train = \"synthetic:blobs?samples=4000&features=32&classes=4&seed=3\", validation_fraction = 0.1 }\n\
         train = { steps = 10000, batch_size = 32, validate_every_steps = 50, patience = 2, patience_min_delta = 0.05, \
         keep_best = true }\nworkers = { min = 2, max = 2 }\noutput = { register_as = \"kept\" }\n",
    )
    .expect("spec");
    let kept = submit(home, &kept);
    let done = common::wait_for(home, &kept, Duration::from_secs(120), "success", |s| s["state"] == "Succeeded");
    let step = done["step"].as_u64().expect("step");
    let best = done["metrics"]["val_step"].as_u64().expect("the model's step");
    assert!(done["state"] == "Succeeded" && best + 100 == step, "two validations after the best: {done}");
    let said = format!("the model is the best validated state, step {best} (val_loss ");
    assert!(done["reason"].as_str().is_some_and(|r| r.contains(&said)), "{done}");
    let registered = done["events"].as_array().and_then(|e| e.iter().find(|e| e["kind"] == "registered"));
    let message = format!("model kept version 1 (its best validated state, step {best}, not its last)");
    assert!(registered.is_some_and(|e| e["message"] == message.as_str()), "{done}");
    let model = common::ok(common::run(home, &["models", "show", "kept", "-o", "json"]));
    let model: serde_json::Value = serde_json::from_str(&model).expect("models show prints JSON");
    assert_eq!(model["metrics"]["val_step"], best, "{model}");
    assert_eq!(model["metrics"]["val_loss"], done["metrics"]["val_loss"], "{model}");
    let all = common::ok(common::run(home, &["history", &kept, "--points", "10000", "-o", "json"]));
    let all: serde_json::Value = serde_json::from_str(&all).expect("history prints one JSON object");
    let validation_at = |at: u64| {
        let points = all["points"].as_array().expect("points");
        points.iter().rev().find(|p| p["step"] == at && p["val_loss"].is_number()).map(|p| p["val_loss"].clone())
    };
    assert_eq!(validation_at(best), Some(done["metrics"]["val_loss"].clone()), "the model's validation: {all}");
    let last = validation_at(step).unwrap_or_else(|| panic!("the last state's validation: {all}"));
    assert_ne!(last, done["metrics"]["val_loss"], "{all}");
}

/// Worker processes started by the test (killed when it ends).
struct Agents(Vec<std::process::Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_address() -> String {
    format!("127.0.0.1:{}", flotilla_coordinator::ports::free_loopback_port().expect("a free loopback port"))
}

#[test]
fn agents_serve_their_own_metrics() {
    let cluster = Local::up(0);
    let home = cluster.home.as_path();
    let addresses: Vec<String> = (0..2).map(|_| free_address()).collect();
    let _agents = Agents(
        addresses
            .iter()
            .enumerate()
            .map(|(i, address)| {
                command(home)
                    .args(["worker", "--instance-id", &format!("metered-{i}"), "--metrics-addr", address])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("a worker starts")
            })
            .collect(),
    );
    let started = Instant::now();
    let scrape_all = || -> Option<Vec<Vec<Sample>>> {
        addresses
            .iter()
            .map(|a| {
                std::net::TcpStream::connect(a).ok()?;
                Some(scrape(a))
            })
            .collect()
    };
    let idle = loop {
        if let Some(all) = scrape_all() {
            break all;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the agents' metrics ports did not open");
        std::thread::sleep(Duration::from_millis(100));
    };
    for samples in &idle {
        let steps = samples.iter().find(|s| s.name == "flotilla_agent_steps_total").map(|s| s.value);
        assert_eq!(steps, Some(0.0), "no step before a job");
    }
    let registered = Instant::now();
    while common::json(home, &["workers", "--all", "-o", "json"]).as_array().map_or(0, Vec::len) < 2 {
        assert!(registered.elapsed() < Duration::from_secs(30), "the agents did not register");
        std::thread::sleep(Duration::from_millis(100));
    }

    let spec = cluster.dir.path().join("agents.toml");
    std::fs::write(
        &spec,
        "name = \"agents\"\nmodel = { kind = \"mlp\", hidden = [64] }\n\
         data = { train = \"synthetic:blobs?samples=4000&features=32&classes=4&seed=3\", validation_fraction = 0.1 }\n\
         train = { steps = 5000000, batch_size = 32 }\ncheckpoint = { every_steps = 200 }\n\
         workers = { min = 2, max = 2 }\n",
    )
    .expect("spec");
    let job = submit(home, &spec);
    let started = Instant::now();
    let total = |all: &[Vec<Sample>], name: &str| -> f64 {
        all.iter().flat_map(|samples| samples.iter().filter(|s| s.name == name)).map(|s| s.value).sum()
    };
    let running = loop {
        let all = scrape_all().expect("the agents answer");
        if total(&all, "flotilla_agent_checkpoints_total") >= 2.0 {
            break all;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "no checkpoint on either agent after 90 s");
        std::thread::sleep(Duration::from_millis(300));
    };
    for samples in &running {
        let of = |name: &str| samples.iter().find(|s| s.name == name).map(|s| s.value);
        assert!(of("flotilla_agent_steps_total").is_some_and(|n| n > 0.0), "each agent trains");
        assert_eq!(of("flotilla_agent_generations_total"), Some(1.0));
        assert_eq!(of("flotilla_agent_running"), Some(1.0));
    }
    assert!(total(&running, "flotilla_agent_checkpoint_seconds_count") >= 2.0, "checkpoint durations observed");
    assert!(total(&running, "flotilla_agent_checkpoint_stall_seconds_count") >= 1.0, "stalls observed");
    assert!(total(&running, "flotilla_agent_checkpoint_bytes_total") > 0.0);
    for samples in &running {
        let held = samples.iter().find(|s| s.name == "flotilla_agent_held_state_bytes").map(|s| s.value);
        assert_eq!(held, Some(0.0), "nothing held while the first generation trains");
    }

    // A job of higher priority stops it: each rank keeps the stop step's state in memory for
    // the job's next gang, through the urgent job...
    let urgent = cluster.dir.path().join("urgent.toml");
    let text = std::fs::read_to_string(&spec).expect("spec").replace("\"agents\"", "\"urgent\"");
    std::fs::write(&urgent, format!("priority = 5\n{text}")).expect("spec");
    let urgent = submit(home, &urgent);
    let held_by_each = |want: &dyn Fn(f64) -> bool| {
        scrape_all().is_some_and(|all| {
            all.iter()
                .all(|samples| samples.iter().any(|s| s.name == "flotilla_agent_held_state_bytes" && want(s.value)))
        })
    };
    common::eventually(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || held_by_each(&|bytes| bytes > 0.0),
        || format!("the stopped job's state is not held by both agents: {}", common::json(home, &["status", &job])),
    );
    // ... until it is cancelled: the next heartbeat learns no gang will take it.
    assert!(run_ok(home, &["cancel", &job]));
    common::eventually(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || held_by_each(&|bytes| bytes == 0.0),
        || "the cancelled job's state is still held".to_string(),
    );
    assert!(run_ok(home, &["cancel", &urgent]));
}

fn run_ok(home: &std::path::Path, args: &[&str]) -> bool {
    common::run(home, args).status.success()
}
