//! The web dashboard in a real browser: headless Chromium (Debian's `chromium`, which
//! scripts/test.sh installs when missing) loads the job page of a running job on a local cluster
//! and renders its loss curve from the metrics history with a preemption marker after
//! `flotilla preempt`, with no console message at all; a screenshot is kept as a test artifact.
//! The JSON views need the API token; the page itself holds no data.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Local, cluster_file, gang, http_get, run, status, submit, wait_for};

/// Points the loss curve must have (the history gets about one a second, written every 5 s).
const CURVE_POINTS_MIN: usize = 8;
/// How long one Chromium run may take before the test gives up on it.
const BROWSER_LIMIT: Duration = Duration::from_secs(90);

fn chromium() -> PathBuf {
    let path = std::env::var_os("FLOTILLA_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        path.exists(),
        "{} not found: install Debian's chromium (`apt-get install chromium`; scripts/test.sh does) or set \
         FLOTILLA_CHROMIUM",
        path.display()
    );
    path
}

/// Runs headless Chromium on `url` with `extra` arguments (one fresh profile per run, no
/// background networking: this machine reaches nothing but loopback); (stdout, stderr).
fn browse(profile: &Path, url: &str, extra: &[&str]) -> (String, String) {
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            // Virtual time runs the page's refresh timers and waits for its fetches.
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let started = Instant::now();
    while child.try_wait().expect("chromium status").is_none() {
        if started.elapsed() > BROWSER_LIMIT {
            let _ = child.kill();
            panic!("chromium did not finish {url} in {BROWSER_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("chromium output");
    (String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}

/// The number in `attribute="N"` of the first element whose opening tag contains `tag_part`.
fn attribute_of(dom: &str, tag_part: &str, attribute: &str) -> Option<usize> {
    let at = dom.find(tag_part)?;
    let tag_start = dom[..at].rfind('<')?;
    let tag = &dom[tag_start..tag_start + dom[tag_start..].find('>')?];
    let value = tag.split(&format!("{attribute}=\"")).nth(1)?.split('"').next()?;
    value.parse().ok()
}

/// Lines the page wrote to the browser console (Chromium logs every console message, errors and
/// failed loads included, as `CONSOLE`).
fn console_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains(":CONSOLE")).collect()
}

#[test]
fn the_job_page_shows_the_curve_and_the_preemption_in_chromium() {
    let cluster = Local::up(2);
    let home = cluster.home.as_path();
    let file = cluster_file(home);
    let address = file["coordinators"][0]["metrics_address"].as_str().expect("a metrics address").to_string();
    let token = file["api_token"].as_str().expect("api_token").to_string();

    // `flotilla dashboard` prints the address with the token in the fragment.
    let printed = run(home, &["dashboard"]);
    assert!(printed.status.success(), "{}", String::from_utf8_lossy(&printed.stderr));
    let url = String::from_utf8_lossy(&printed.stdout).trim().to_string();
    assert_eq!(url, format!("http://{address}/#token={token}"));

    // The page is served to anyone (it holds no data, loads nothing from elsewhere); the views
    // need the token.
    let (head, page) = http_get(&address, "/", "");
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/html"), "{head}");
    assert!(head.contains("Content-Security-Policy: default-src 'none'"), "{head}");
    assert!(!page.contains("http://") && !page.contains("https://"), "the page names no other origin");
    let (refused, _) = http_get(&address, "/api/jobs", "");
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");

    let spec = cluster.dir.path().join("watched.toml");
    std::fs::write(
        &spec,
        "name = \"watched\"\npriority = 7\nmodel = { kind = \"mlp\", hidden = [64] }\n\
         data = { train = \"synthetic:blobs?samples=4000&features=32&classes=4&seed=3\", validation_fraction = 0.1 }\n\
         train = { steps = 5000000, batch_size = 32 }\nworkers = { min = 2, max = 2 }\n",
    )
    .expect("spec");
    let job = submit(home, &spec);

    // Wait until rank 0 has written enough history for a curve.
    let bearer = format!("Authorization: Bearer {token}\r\n");
    let history_steps = || {
        let (head, body) = http_get(&address, &format!("/api/jobs/{job}/history"), &bearer);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let history: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let points = history["points"].as_array().cloned().unwrap_or_default();
        points.iter().filter(|p| p["loss"].is_number()).filter_map(|p| p["step"].as_u64()).collect::<Vec<u64>>()
    };
    let started = Instant::now();
    let before = loop {
        let steps = history_steps();
        if steps.len() >= CURVE_POINTS_MIN {
            break steps;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "only {} history points after 90 s", steps.len());
        std::thread::sleep(Duration::from_millis(500));
    };

    // A spot notice for a gang member: the job records it and goes on.
    let member = gang(home, &job).into_iter().next().expect("a gang member");
    let preempted = run(home, &["preempt", &member]);
    assert!(preempted.status.success(), "{}", String::from_utf8_lossy(&preempted.stderr));
    wait_for(home, &job, Duration::from_secs(60), "a recorded preemption", |s| {
        s["preemptions"].as_u64().is_some_and(|n| n >= 1)
    });

    // The local provider's replacement takes the noticed member's rank (a handover: no worker
    // was free); the next generation's first step ends the handover's stall, timed by the
    // leader (a recovery, had there been none).
    let started = Instant::now();
    loop {
        let (_, metrics) = http_get(&address, "/metrics", "");
        let count = |name: &str| {
            metrics
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{name}_count ")))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        if count("flotilla_handover_stall_seconds") >= 1.0 {
            assert_eq!(count("flotilla_recovery_seconds"), 0.0, "a handover is no recovery");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no handover stall timed after 60 s");
        std::thread::sleep(Duration::from_millis(300));
    }

    // The history goes on in order after the handover and keeps every earlier point: when the
    // noticed member was rank 0, its replacement writes the rest of the generation's history
    // (it used to overwrite the first segments, and the curve doubled back).
    let swapped_at = status(home, &job)["step"].as_u64().expect("step");
    let started = Instant::now();
    let after = loop {
        let steps = history_steps();
        if steps.last().is_some_and(|&last| last > swapped_at) {
            break steps;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no history past step {swapped_at}: {steps:?}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(after.is_sorted(), "history points in step order: {after:?}");
    assert!(before.iter().all(|step| after.contains(step)), "points lost: {before:?} -> {after:?}");

    let profiles = tempfile::tempdir().expect("profiles");
    let job_url = format!("http://{address}/#/job/{job}&token={token}");
    let (dom, stderr) = browse(&profiles.path().join("dom"), &job_url, &["--dump-dom"]);
    assert!(dom.contains("data-view=\"job\" data-ready=\"1\""), "the job view rendered:\n{dom}");
    let points = attribute_of(&dom, "class=\"curve loss\"", "data-points").unwrap_or(0);
    assert!(points >= CURVE_POINTS_MIN, "the loss curve has {points} points:\n{dom}");
    assert!(dom.contains("class=\"marker preemption\""), "a preemption marker on the curve:\n{dom}");
    assert!(dom.contains("preemption_notice"), "the notice in the events table");
    assert!(dom.contains("<span>Priority</span><b>7</b>"), "the job's priority:\n{dom}");
    assert!(dom.contains("data-errors=\"0\""), "no page error:\n{dom}");
    assert_eq!(console_lines(&stderr), Vec::<&str>::new(), "no console message");

    // The other views render with the cluster's data, also without a console message. The
    // noticed member left once it handed over: listed apart from the live fleet.
    common::eventually(
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let workers = common::json(home, &["workers", "--all", "-o", "json"]);
            workers.as_array().is_some_and(|ws| ws.iter().any(|w| w["id"] == member.as_str() && w["state"] == "Left"))
        },
        || format!("{member} never read Left"),
    );
    let (workers, stderr) =
        browse(&profiles.path().join("workers"), &format!("http://{address}/#/workers&token={token}"), &["--dump-dom"]);
    assert!(workers.contains("data-view=\"workers\" data-ready=\"1\""), "{workers}");
    assert!(workers.contains(&format!("href=\"#/job/{job}\"")), "a worker busy with {job}: {workers}");
    let (live, gone) = workers.split_once("<details class=\"gone\">").expect("a gone section");
    assert!(gone.contains("1 gone (lost or left)") && gone.contains(&format!("<td>{member}</td>")), "{gone}");
    assert!(gone.contains("class=\"state left\"") && !live.contains(&format!("<td>{member}</td>")), "{workers}");
    assert_eq!(console_lines(&stderr), Vec::<&str>::new(), "no console message");

    // The jobs list: the job, named, with its priority.
    let (jobs, stderr) =
        browse(&profiles.path().join("jobs"), &format!("http://{address}/#/jobs&token={token}"), &["--dump-dom"]);
    assert!(jobs.contains("data-view=\"jobs\" data-ready=\"1\""), "{jobs}");
    let row = format!("<td><a href=\"#/job/{job}\">{job}</a></td><td>watched</td><td class=\"num\">7</td>");
    assert!(jobs.contains(&row), "{row} in {jobs}");
    assert_eq!(console_lines(&stderr), Vec::<&str>::new(), "no console message");

    // Without the token the page says how to get one, and shows no data.
    let (bare, _) = browse(&profiles.path().join("bare"), &format!("http://{address}/#/jobs"), &["--dump-dom"]);
    let shown = bare.split("<main").nth(1).and_then(|m| m.split("</main>").next()).unwrap_or_default();
    assert!(shown.contains("API token needed") && !shown.contains(&job), "{shown}");

    // The screenshot, kept as the test's artifact.
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&artifacts).expect("artifact folder");
    let shot = artifacts.join("job.png");
    let _ = std::fs::remove_file(&shot);
    browse(
        &profiles.path().join("shot"),
        &job_url,
        &["--window-size=1280,1400", "--hide-scrollbars", &format!("--screenshot={}", shot.display())],
    );
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "a real screenshot ({} bytes)", png.len());
    eprintln!("dashboard screenshot: {}", shot.display());

    assert!(run(home, &["cancel", &job]).status.success());
    assert_eq!(status(home, &job)["state"], "Cancelled");
}
