//! The local instance-metadata endpoint (IMDSv2) and `flotilla preempt`: the agent's poller and
//! the endpoint speak real HTTP over loopback, as they would against EC2.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::{Down, run as flotilla};

use flotilla_coordinator::provider::imds::{ImdsConfig, serve};
use flotilla_worker::imds::ImdsClient;

fn raw(address: &str, request: &str) -> String {
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream.write_all(request.as_bytes()).expect("write");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

#[test]
fn the_endpoint_speaks_imdsv2_and_announces_a_scheduled_interruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let action = dir.path().join("i-1.action");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    let config = ImdsConfig {
        instance_id: "i-1".into(),
        instance_type: "g5.xlarge".into(),
        zone: "us-east-1b".into(),
        local_ipv4: "10.213.7.21".into(),
        action_file: action.clone(),
        interrupt_after: None,
    };
    runtime.spawn(serve(listener, config));

    let mut client = ImdsClient::new(&format!("http://{address}"));
    assert_eq!(runtime.block_on(client.instance_id()).expect("instance id").as_deref(), Some("i-1"));
    // The worker's identity, read as on EC2.
    let identity = runtime.block_on(flotilla_worker::identity::from_metadata(&address)).expect("identity");
    assert_eq!(
        identity,
        flotilla_worker::identity::Metadata {
            instance_id: Some("i-1".into()),
            instance_type: Some("g5.xlarge".into()),
            zone: Some("us-east-1b".into()),
            local_ipv4: Some("10.213.7.21".parse().expect("ip")),
        }
    );
    assert_eq!(runtime.block_on(client.instance_action()).expect("no notice yet"), None);
    std::fs::write(&action, "1795949931013").expect("schedule");
    let notice = runtime.block_on(client.instance_action()).expect("notice").expect("a notice");
    assert!(notice.contains("\"action\":\"terminate\"") && notice.contains("2026-11-29T"), "{notice}");

    let without_token = raw(&address, "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(without_token.starts_with("HTTP/1.1 401"), "{without_token}");
    let bad_ttl = raw(&address, "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 0\r\n\r\n");
    assert!(bad_ttl.starts_with("HTTP/1.1 400"), "{bad_ttl}");
    let huge = format!("GET /{} HTTP/1.1\r\n", "a".repeat(20_000));
    assert!(raw(&address, &huge).starts_with("HTTP/1.1 400"));
    let garbage = raw(&address, "\x00\x01\x02 nonsense\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
}

fn wait_for_log(home: &Path, instance: &str, needle: &str, limit: Duration) {
    let started = Instant::now();
    let path = home.join("logs").join(format!("{instance}.log"));
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(started.elapsed() < limit, "`{needle}` not in {} within {limit:?}:\n{text}", path.display());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_lost(home: &Path, id: &str) {
    let started = Instant::now();
    loop {
        let out = flotilla(home, &["workers", "--all", "-o", "json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        if list.as_array().is_some_and(|l| l.iter().any(|w| w["id"] == id && w["state"] == "Lost")) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{id} not lost: {list}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn preempt_gives_a_notice_or_kills_and_random_interruptions_arrive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let _down = Down(&home);
    // 3600 per hour: a mean of one second before each worker's (seeded) notice.
    let up = flotilla(&home, &["up", "--workers", "2", "--spot-interruptions-per-hour", "3600", "--seed", "7"]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    for instance in ["local-1", "local-2"] {
        wait_for_log(&home, instance, "spot interruption notice received", Duration::from_secs(30));
    }
    // Noticed workers drain and exit; the coordinator launches replacements (which get their
    // own seeded notices in turn). A hard kill of a live one is detected by its lease.
    let started = Instant::now();
    loop {
        let out = flotilla(&home, &["workers", "--all", "-o", "json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let workers = list.as_array().cloned().unwrap_or_default();
        let gone =
            |id: &str| workers.iter().any(|w| w["id"] == id && (w["state"] == "Draining" || w["state"] == "Left"));
        let replacement =
            workers.iter().find(|w| w["state"] == "Idle" && w["id"] != "worker-1" && w["id"] != "worker-2");
        if gone("worker-1")
            && gone("worker-2")
            && let Some(replacement) = replacement
        {
            let id = replacement["id"].as_str().expect("id").to_string();
            if flotilla(&home, &["preempt", &id, "--hard"]).status.success() {
                wait_lost(&home, &id);
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no drain and replacement: {list}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let unknown = flotilla(&home, &["preempt", "worker-999"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no worker `worker-999`"));
}

#[test]
fn preempt_without_hard_announces_the_notice_to_that_worker_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let _down = Down(&home);
    let up = flotilla(&home, &["up", "--workers", "2"]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    let out = flotilla(&home, &["preempt", "worker-2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let instance = String::from_utf8_lossy(&out.stdout).split(['(', ')']).nth(1).unwrap_or_default().to_string();
    wait_for_log(&home, &instance, "spot interruption notice received", Duration::from_secs(20));
    let other = if instance == "local-1" { "local-2" } else { "local-1" };
    let text = std::fs::read_to_string(home.join("logs").join(format!("{other}.log"))).unwrap_or_default();
    assert!(!text.contains("spot interruption notice"), "the other worker got a notice too:\n{text}");
}
