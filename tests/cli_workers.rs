//! Worker agents against a real local cluster: registration with the join token and a real
//! identity (advertised data address, GPUs, instance id; 0.0.0.0 never advertised), heartbeats
//! keeping the lease, a worker killed with SIGKILL declared Lost after its lease, one stopped
//! with SIGTERM reading Left (it said so; its lease never declares it lost), and a wrong join
//! token refused.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{command as flotilla, run};

struct Cleanup<'a> {
    home: &'a Path,
    workers: Vec<Child>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = run(self.home, &["down", "--purge"]);
    }
}

fn workers(home: &Path) -> Vec<serde_json::Value> {
    let out = run(home, &["workers", "--all", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON").as_array().cloned().unwrap_or_default()
}

fn wait_for(
    home: &Path,
    what: &str,
    limit: Duration,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let started = Instant::now();
    loop {
        let list = workers(home);
        if done(&list) {
            return list;
        }
        assert!(started.elapsed() < limit, "{what} did not happen within {limit:?}: {list:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn workers_register_keep_their_lease_and_are_lost_when_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let mut cleanup = Cleanup { home: &home, workers: Vec::new() };
    let up = run(&home, &["up"]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    // One worker as on a real machine: listening on every interface, advertising one address.
    let identities: [&[&str]; 2] =
        [&[], &["--data-addr", "0.0.0.0:0", "--advertise-addr", "127.0.0.1", "--gpus", "2", "--instance-id", "i-0abc"]];
    for extra in identities {
        let child = flotilla(&home)
            .arg("worker")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("worker");
        cleanup.workers.push(child);
    }
    let state = |w: &serde_json::Value| w["state"].as_str().unwrap_or_default().to_string();
    let list = wait_for(&home, "two idle workers", Duration::from_secs(20), |l| {
        l.len() == 2 && l.iter().all(|w| state(w) == "Idle")
    });
    for w in &list {
        let addr: std::net::SocketAddr = w["data_addr"].as_str().expect("data_addr").parse().expect("an address");
        assert!(addr.ip().is_loopback() && addr.port() != 0, "a dialable address: {w}");
        assert_eq!((w["instance_type"].as_str(), w["zone"].as_str()), (Some("local"), Some("local")), "{w}");
        assert!(w["gone_at_unix_ms"].is_null() && w["registered_at_unix_ms"].as_u64() > Some(0), "{w}");
    }
    let manual = list.iter().find(|w| w["instance_id"] == "i-0abc").expect("the advertised worker");
    assert_eq!(manual["gpus"], 2, "{manual}");

    // Listening everywhere without an address for peers is refused before registering.
    let nowhere = flotilla(&home).args(["worker", "--data-addr", "0.0.0.0:0"]).output().expect("worker");
    assert!(!nowhere.status.success());
    let error = String::from_utf8_lossy(&nowhere.stderr);
    assert!(error.contains("listens on every interface") && error.contains("--advertise-addr"), "{error}");

    // Heartbeats keep both alive well past one lease (5 s).
    std::thread::sleep(Duration::from_secs(6));
    assert!(workers(&home).iter().all(|w| state(w) == "Idle"), "a heartbeating worker was declared lost");

    let killed_id = list.iter().find(|w| w["instance_id"] != "i-0abc").expect("the other one")["id"].clone();
    let mut killed = cleanup.workers.remove(0);
    killed.kill().expect("SIGKILL");
    killed.wait().expect("reap");
    let list = wait_for(&home, "the killed worker declared lost", Duration::from_secs(20), |l| {
        l.iter().filter(|w| state(w) == "Lost").count() == 1
    });
    assert_eq!(list.iter().filter(|w| state(w) == "Idle").count(), 1, "{list:?}");

    // Stopped in order (SIGTERM: an operator, `down`, a machine shutting down), the other one
    // says it leaves: Left at once, not Lost when its lease would have run out.
    let mut stopped = cleanup.workers.remove(0);
    let term = Command::new("kill").args(["-TERM", &stopped.id().to_string()]).status().expect("kill");
    assert!(term.success());
    assert!(stopped.wait().expect("reap").success(), "the agent exits cleanly on SIGTERM");
    let left = list.iter().find(|w| state(w) == "Idle").expect("the live one")["id"].clone();
    let list = workers(&home);
    assert!(list.iter().any(|w| w["id"] == left && state(w) == "Left"), "left before it exited: {list:?}");
    // When: after it registered, and the live have no such time.
    for w in &list {
        let (registered, gone) = (w["registered_at_unix_ms"].as_u64().unwrap_or(0), w["gone_at_unix_ms"].as_u64());
        assert!(registered > 0 && gone.is_some_and(|g| g >= registered), "both are gone: {w}");
    }
    std::thread::sleep(Duration::from_secs(6));
    let list = workers(&home);
    assert!(list.iter().any(|w| w["id"] == left && state(w) == "Left"), "{list:?}");
    // Without --all the list is the live fleet (none left here); the gone are counted.
    let live = run(&home, &["workers", "-o", "json"]);
    assert_eq!(String::from_utf8_lossy(&live.stdout).trim(), "[]");
    let table = String::from_utf8_lossy(&run(&home, &["workers"]).stdout).to_string();
    assert!(table.contains("(0 worker(s); 2 gone (lost or left) not shown: --all lists them"), "{table}");
    let table = String::from_utf8_lossy(&run(&home, &["workers", "--all"]).stdout).to_string();
    let id = left.as_str().expect("id");
    assert!(table.lines().any(|l| l.starts_with(id) && l.contains(" Left ")), "{table}");
    let log = std::fs::read_dir(home.join("logs"))
        .expect("logs")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("coordinator"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    assert!(log.contains("worker left") && log.contains("lease expired"), "{log}");
    let expired: Vec<&str> = log.lines().filter(|l| l.contains("lease expired")).collect();
    let names = |l: &str, id: &str| l.split(|c: char| !c.is_ascii_alphanumeric() && c != '-').any(|word| word == id);
    assert!(expired.iter().any(|l| names(l, killed_id.as_str().expect("id"))), "{expired:?}");
    assert!(!expired.iter().any(|l| names(l, id)), "{id} was declared lost: {expired:?}");

    let refused = flotilla(&home).args(["worker", "--join-token", "wrong"]).output().expect("worker");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("wrong join token"));
}

#[test]
fn workers_follow_a_new_leader_and_keep_their_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let mut cleanup = Cleanup { home: &home, workers: Vec::new() };
    let up = run(&home, &["up", "--coordinators", "3"]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let child = flotilla(&home).arg("worker").stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("worker");
    cleanup.workers.push(child);
    let state = |w: &serde_json::Value| w["state"].as_str().unwrap_or_default().to_string();
    wait_for(&home, "one idle worker", Duration::from_secs(20), |l| l.len() == 1 && state(&l[0]) == "Idle");

    // Find the leader (writes are served by it) and kill it without warning.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/digits-mlp.toml");
    let submitted = run(&home, &["submit", example.to_str().expect("utf-8"), "-o", "json"]);
    let first_line = String::from_utf8_lossy(&submitted.stdout).lines().next().unwrap_or_default().to_string();
    let leader = serde_json::from_str::<serde_json::Value>(&first_line).expect("submit JSON")["served_by"]
        .as_u64()
        .expect("leader id");
    let cluster = std::fs::read_to_string(home.join("cluster.toml")).expect("cluster file");
    let cluster: toml::Value = toml::from_str(&cluster).expect("cluster TOML");
    let pid = cluster["coordinators"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["id"].as_integer() == Some(leader as i64)))
        .and_then(|c| c["pid"].as_integer())
        .expect("the leader's pid");
    let killed = Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill");
    assert!(killed.success());

    // Well past a lease later, the worker is still alive: it heartbeats to the new leader.
    std::thread::sleep(Duration::from_secs(8));
    let list = workers(&home);
    assert!(list.len() == 1 && state(&list[0]) == "Idle", "after the leader died: {list:?}");
}
