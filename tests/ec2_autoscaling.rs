//! The autoscaler end to end against a real EC2 API peer (moto, started by scripts/test.sh; its
//! address in FLOTILLA_MOTO_ENDPOINT): a `flotilla coordinator --provider ec2` process buys a
//! spot fleet for a submitted gang; killed with SIGKILL and restarted from its data directory,
//! it adopts what runs (no duplicate instances) and terminates an orphan that carries the
//! cluster's tag but is unknown to the replicated state.

#![cfg(feature = "ec2")]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_coordinator::provider::{CLUSTER_TAG, InstanceState, LaunchSpec, Provider};
use flotilla_ec2::{Connection, Ec2Config, Ec2Provider};

mod common;

const TOKEN: &str = "ec2-test-token";

fn moto() -> String {
    std::env::var("FLOTILLA_MOTO_ENDPOINT").ok().filter(|e| !e.is_empty()).unwrap_or_else(|| {
        panic!("this test needs moto: run scripts/test.sh, or start `moto_server` and set FLOTILLA_MOTO_ENDPOINT")
    })
}

fn start(dir: &Path, address: &str, cluster: &str) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("coordinator.log")).expect("log");
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["coordinator", "--id", "1", "--listen", address, "--peers", &format!("1={address}")])
        .args(["--cluster-id", cluster, "--provider", "ec2", "--ec2-image-id", "ami-12c6146b"])
        .args(["--max-instances", "6", "--max-usd-per-hour", "10"])
        .arg("--market")
        .arg(dir.join("market.csv"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("FLOTILLA_TOKEN", TOKEN)
        .env("FLOTILLA_JOIN_TOKEN", "join")
        .env("AWS_ENDPOINT_URL", moto())
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("coordinator")
}

fn ec2(cluster: &str, runtime: &tokio::runtime::Runtime) -> Ec2Provider {
    let config = Ec2Config {
        cluster_id: format!("{cluster}-test-side"),
        image_id: "ami-12c6146b".into(),
        subnets: BTreeMap::new(),
        security_group_ids: Vec::new(),
        key_name: None,
        user_data: String::new(),
    };
    let connection = Connection {
        endpoint_url: Some(moto()),
        region: Some("us-east-1".into()),
        static_credentials: Some(("testing".into(), "testing".into())),
    };
    runtime.block_on(Ec2Provider::connect(config, connection)).expect("provider")
}

fn running(ec2: &Ec2Provider, cluster: &str, runtime: &tokio::runtime::Runtime) -> Vec<String> {
    let tags = BTreeMap::from([(CLUSTER_TAG.to_string(), cluster.to_string())]);
    let mut ids: Vec<String> = runtime
        .block_on(ec2.describe(&tags))
        .expect("describe")
        .into_iter()
        .filter(|i| i.state == InstanceState::Running)
        .map(|i| i.id)
        .collect();
    ids.sort();
    ids
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "no {what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_leader_buys_a_spot_fleet_and_a_restart_adopts_it_without_duplicates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = format!("ec2t-{}", std::process::id());
    std::fs::write(
        dir.path().join("market.csv"),
        "hour,instance_type,zone,spot_usd_per_hour,on_demand_usd_per_hour,interruptions_per_hour,spot_capacity\n\
         0,g5.xlarge,us-east-1a,0.40,1.006,0.05,16\n0,g5.xlarge,us-east-1b,0.45,1.006,0.05,16\n",
    )
    .expect("market");
    let address =
        format!("127.0.0.1:{}", flotilla_coordinator::ports::free_loopback_port().expect("a free loopback port"));
    let mut coordinator = start(dir.path(), &address, &cluster);
    let spec = dir.path().join("gang.toml");
    std::fs::write(
        &spec,
        "name = \"gang\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\n\
         workers = { min = 3, max = 3, gpus = 1 }\ncapacity = { spot = true, instance_types = [\"g5.xlarge\"] }\n",
    )
    .expect("spec");
    let home = dir.path().join(".flotilla");
    let submit = |spec: &Path| {
        common::command(&home)
            .args(["--coordinator", &address, "submit"])
            .arg(spec)
            .env("FLOTILLA_TOKEN", TOKEN)
            .output()
            .expect("submit")
    };
    let started = Instant::now();
    let out = loop {
        let out = submit(&spec);
        if out.status.success() || started.elapsed() > Duration::from_secs(20) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let ec2 = ec2(&cluster, &runtime);
    wait_until("fleet of 3", Duration::from_secs(30), || running(&ec2, &cluster, &runtime).len() == 3);
    let fleet = running(&ec2, &cluster, &runtime);
    // `flotilla instances` lists what was bought, at the price recorded at launch.
    let listed = common::command(&home)
        .args(["--coordinator", &address, "instances", "-o", "json"])
        .env("FLOTILLA_TOKEN", TOKEN)
        .output()
        .expect("instances");
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    let mut ids: Vec<String> = listed["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| {
            assert_eq!((i["instance_type"].as_str(), i["spot"].as_bool()), (Some("g5.xlarge"), Some(true)), "{i}");
            assert!(i["usd_per_hour"].as_f64().is_some_and(|p| p > 0.0), "{i}");
            i["id"].as_str().expect("id").to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, fleet, "{listed}");
    // While the job waits, `status` says what the autoscaler does for it, not only that no
    // worker is free (its word used to be computed and dropped), and shows it Provisioning.
    wait_until("the autoscaler's word in the job's reason", Duration::from_secs(15), || {
        let out = common::command(&home)
            .args(["--coordinator", &address, "status", "job-1", "-o", "json"])
            .env("FLOTILLA_TOKEN", TOKEN)
            .output()
            .expect("status");
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        status["state"] == "Provisioning"
            && status["reason"].as_str().is_some_and(|r| {
                r.contains("waiting for 3 free worker(s)")
                    && r.contains("; autoscaler: 3 instance(s) bought for it are starting")
            })
    });

    // Kill the coordinator; meanwhile an instance with the cluster's tag appears that no
    // recorded request launched (as if a leader died between launching and recording).
    coordinator.kill().expect("kill");
    coordinator.wait().expect("wait");
    let mut tags = BTreeMap::from([(CLUSTER_TAG.to_string(), cluster.clone())]);
    tags.insert("purpose".into(), "orphan".into());
    let orphan = runtime
        .block_on(ec2.launch(&LaunchSpec {
            instance_type: "g5.xlarge".into(),
            zone: Some("us-east-1a".into()),
            spot: true,
            count: 1,
            on_demand_base: 0,
            tags,
            client_token: format!("{cluster}-orphan"),
        }))
        .expect("orphan");
    assert_eq!(running(&ec2, &cluster, &runtime).len(), 4);

    let mut restarted = start(dir.path(), &address, &cluster);
    wait_until("the orphan's termination", Duration::from_secs(30), || {
        !running(&ec2, &cluster, &runtime).contains(&orphan[0].id)
    });
    // Several passes later: the adopted fleet, nothing launched twice.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(running(&ec2, &cluster, &runtime), fleet, "the restarted leader adopted the fleet as it was");
    let _ = restarted.kill();
    let _ = restarted.wait();
    let log = std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap_or_default();
    assert!(log.contains("autoscaling"), "{log}");
    runtime.block_on(ec2.terminate(&fleet)).expect("clean up");
}

/// Without --ec2-subnet, the market's zones are checked at start against the zones where the
/// region's default VPC has a subnet: a market that prices none of them is refused (every
/// launch would fail), and a market that prices some has the others left out, with a warning
/// (they used to be tried, fail and back off, one launch at a time).
#[test]
fn market_zones_without_a_default_subnet_are_left_out_or_refused() {
    let header =
        "hour,instance_type,zone,spot_usd_per_hour,on_demand_usd_per_hour,interruptions_per_hour,spot_capacity\n";
    let coordinator_in = |zones: &[&str]| {
        let dir = tempfile::tempdir().expect("tempdir");
        let rows: String = zones.iter().map(|z| format!("0,g5.xlarge,{z},0.40,1.006,0.05,16\n")).collect();
        std::fs::write(dir.path().join("market.csv"), format!("{header}{rows}")).expect("market");
        let address =
            format!("127.0.0.1:{}", flotilla_coordinator::ports::free_loopback_port().expect("a free loopback port"));
        let child = start(dir.path(), &address, &format!("ec2z-{}", std::process::id()));
        (dir, child)
    };
    let log = |dir: &tempfile::TempDir| std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap_or_default();

    let (dir, mut refused) = coordinator_in(&["us-east-1z"]);
    let mut exited = None;
    wait_until("the refusal", Duration::from_secs(30), || {
        exited = refused.try_wait().expect("wait");
        exited.is_some()
    });
    assert!(!exited.expect("exited").success(), "{}", log(&dir));
    let said = log(&dir);
    assert!(
        said.contains("--market prices no zone where the region's default VPC has a subnet (us-east-1a")
            && said.contains("every launch would fail; name subnets with --ec2-subnet ZONE=SUBNET"),
        "{said}"
    );

    let (dir, mut running) = coordinator_in(&["us-east-1a", "us-east-1z"]);
    wait_until("the warning", Duration::from_secs(30), || {
        log(&dir).contains("--market prices zone(s) us-east-1z where the region's default VPC has no subnet")
    });
    assert!(running.try_wait().expect("wait").is_none(), "it runs on: {}", log(&dir));
    running.kill().expect("kill");
    running.wait().expect("wait");
}
