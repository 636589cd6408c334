//! A real 3-node coordinator cluster (the `flotilla` binary, three processes on loopback):
//! 200 submissions from 4 concurrent clients while the leader is killed with SIGKILL mid-way
//! and restarted. Afterwards every acknowledged job is present exactly once on every node, and
//! a node restarted from disk serves the same state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_core::spec::JobSpec;
use flotilla_proto::client::ApiClient;
use flotilla_proto::convert::spec_to_proto;
use flotilla_proto::v1::{ListJobsRequest, SubmitJobRequest};

const TOKEN: &str = "cluster-test-token";
const PEER_TOKEN: &str = "cluster-test-peer-token";
const NODES: u64 = 3;
const CLIENTS: usize = 4;
const SUBMISSIONS_PER_CLIENT: usize = 50;
/// Acknowledged submissions before the leader is killed.
const KILL_AFTER_ACKS: usize = 60;
/// Acknowledged submissions after the kill before the old leader is restarted.
const RESTART_AFTER_MORE_ACKS: usize = 40;

struct Cluster {
    dir: tempfile::TempDir,
    addresses: BTreeMap<u64, String>,
    processes: BTreeMap<u64, Child>,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let addresses = (1..=NODES)
            .map(|id| {
                let port = flotilla_coordinator::ports::free_loopback_port().expect("a free loopback port");
                (id, format!("127.0.0.1:{port}"))
            })
            .collect();
        let mut cluster = Cluster { dir, addresses, processes: BTreeMap::new() };
        for id in 1..=NODES {
            cluster.spawn(id);
        }
        cluster
    }

    fn spawn(&mut self, id: u64) {
        let peers: Vec<String> = self.addresses.iter().map(|(i, a)| format!("{i}={a}")).collect();
        let log = std::fs::File::create(self.dir.path().join(format!("node-{id}.log"))).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["coordinator", "--id", &id.to_string(), "--listen", &self.addresses[&id]])
            .args(["--peers", &peers.join(","), "--cluster-id", "test"])
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("node-{id}")))
            .env("FLOTILLA_TOKEN", TOKEN)
            .env("FLOTILLA_PEER_TOKEN", PEER_TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start coordinator");
        self.processes.insert(id, child);
    }

    fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.processes.remove(&id) {
            child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix
            child.wait().expect("reap");
        }
    }

    fn all_addresses(&self) -> String {
        self.addresses.values().cloned().collect::<Vec<_>>().join(",")
    }

    fn log_tail(&self) -> String {
        (1..=NODES)
            .map(|id| {
                let text = std::fs::read_to_string(self.dir.path().join(format!("node-{id}.log"))).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(10).collect();
                format!("--- node {id} ---\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in 1..=NODES {
            self.kill(id);
        }
    }
}

fn spec(name: &str) -> JobSpec {
    JobSpec::from_toml_str(&format!(
        "name = \"{name}\"\nmodel = {{ kind = \"mlp\" }}\ndata = {{ train = \"synthetic:blobs\" }}\nworkers = {{ min = 1 }}\n"
    ))
    .expect("valid spec")
}

/// (job id, name) of every job a node serves, through a linearizable read on that node.
async fn jobs_on(address: &str) -> BTreeMap<String, String> {
    let mut client = ApiClient::new(address, TOKEN).expect("client");
    let mut jobs = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let request = ListJobsRequest { page_token: page_token.clone(), limit: 1000, ..Default::default() };
        let page = client
            .call(|mut c| {
                let request = request.clone();
                async move { c.list_jobs(request).await }
            })
            .await
            .unwrap_or_else(|e| panic!("listing jobs on {address}: {e}"));
        for job in page.jobs {
            assert!(jobs.insert(job.id.clone(), job.name.clone()).is_none(), "{} listed twice on {address}", job.id);
        }
        if page.next_page_token.is_empty() {
            return jobs;
        }
        page_token = page.next_page_token;
    }
}

#[derive(Default)]
struct Progress {
    /// name -> (job id, node that acknowledged it)
    acked: BTreeMap<String, (String, u64)>,
    kill_at: Option<Instant>,
    first_ack_after_kill: Option<Duration>,
}

async fn client_loop(client_index: usize, addresses: String, progress: Arc<Mutex<Progress>>) {
    let mut client = ApiClient::new(&addresses, TOKEN).expect("client");
    for i in 0..SUBMISSIONS_PER_CLIENT {
        let name = format!("c{client_index}-{i}");
        let request = SubmitJobRequest { spec: Some(spec_to_proto(&spec(&name))), client_request_id: name.clone() };
        let response = client
            .call(|mut c| {
                let request = request.clone();
                async move { c.submit_job(request).await }
            })
            .await
            .unwrap_or_else(|e| panic!("submission {name} failed for good: {e}"));
        let mut p = progress.lock().expect("progress lock");
        if let Some(killed) = p.kill_at
            && p.first_ack_after_kill.is_none()
        {
            p.first_ack_after_kill = Some(killed.elapsed());
        }
        p.acked.insert(name, (response.job_id, response.served_by));
    }
}

fn acks(progress: &Mutex<Progress>) -> (usize, Option<u64>) {
    let p = progress.lock().expect("progress lock");
    let leader = p.acked.values().last().map(|(_, served_by)| *served_by);
    (p.acked.len(), leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_load_loses_no_acknowledged_job() {
    let mut cluster = Cluster::start();
    let progress = Arc::new(Mutex::new(Progress::default()));
    let clients: Vec<_> =
        (0..CLIENTS).map(|c| tokio::spawn(client_loop(c, cluster.all_addresses(), progress.clone()))).collect();

    let deadline = Instant::now() + Duration::from_secs(120);
    let killed = loop {
        let (count, leader) = acks(&progress);
        if count >= KILL_AFTER_ACKS {
            let leader = leader.expect("an acknowledged write names its leader");
            progress.lock().expect("lock").kill_at = Some(Instant::now());
            cluster.kill(leader);
            break leader;
        }
        assert!(Instant::now() < deadline, "no progress before the kill:\n{}", cluster.log_tail());
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    while acks(&progress).0 < KILL_AFTER_ACKS + RESTART_AFTER_MORE_ACKS {
        assert!(Instant::now() < deadline, "no progress after killing node {killed}:\n{}", cluster.log_tail());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.spawn(killed);
    for client in clients {
        client.await.expect("client task");
    }

    let progress = std::mem::take(&mut *progress.lock().expect("lock"));
    assert_eq!(progress.acked.len(), CLIENTS * SUBMISSIONS_PER_CLIENT);
    let failover = progress.first_ack_after_kill.expect("writes were acknowledged after the kill");
    eprintln!("failover: first acknowledged write {failover:?} after SIGKILL of leader {killed}");
    // Liveness, not speed: 10 s is 10-20 election timeouts (speed is in scripts/bench/coordinator.sh).
    assert!(failover < Duration::from_secs(10), "the API was unavailable for {failover:?} after the leader died");
    let expected: BTreeMap<String, String> =
        progress.acked.iter().map(|(name, (id, _))| (id.clone(), name.clone())).collect();
    assert_eq!(expected.len(), progress.acked.len(), "two submissions got the same job id");
    for (id, address) in &cluster.addresses {
        let served = jobs_on(address).await;
        assert_eq!(served, expected, "node {id} does not hold exactly the acknowledged jobs");
    }

    // A node restarted from its disk alone serves the same state.
    let restarted = (killed % NODES) + 1;
    cluster.kill(restarted);
    cluster.spawn(restarted);
    assert_eq!(jobs_on(&cluster.addresses[&restarted]).await, expected, "node {restarted} after restart");
    let names: BTreeSet<&String> = expected.values().collect();
    assert_eq!(names.len(), CLIENTS * SUBMISSIONS_PER_CLIENT, "every submission exactly once");
    assert!(Path::new(&cluster.dir.path().join(format!("node-{restarted}/raft.wal"))).exists());
}

#[test]
fn a_replicated_cluster_requires_its_own_peer_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let peers = "1=127.0.0.1:1,2=127.0.0.1:2,3=127.0.0.1:3";
    let start_with = |peer_token: Option<&str>, read_token: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_flotilla"));
        command
            .args(["coordinator", "--id", "1", "--listen", "127.0.0.1:0", "--peers", peers])
            .arg("--data-dir")
            .arg(dir.path())
            .env("FLOTILLA_TOKEN", TOKEN)
            .env_remove("FLOTILLA_PEER_TOKEN")
            .env_remove("FLOTILLA_READ_TOKEN");
        if let Some(token) = read_token {
            command.env("FLOTILLA_READ_TOKEN", token);
        }
        if let Some(token) = peer_token {
            command.env("FLOTILLA_PEER_TOKEN", token);
        }
        let out = command.output().expect("coordinator");
        assert!(!out.status.success(), "a coordinator started with peer token {peer_token:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let start = |peer_token: Option<&str>| start_with(peer_token, None);
    assert!(start(None).contains("--peer-token (or FLOTILLA_PEER_TOKEN) is required with 3 coordinators"));
    assert!(start(Some("short")).contains("at least 16 characters"));
    let same = start(Some(TOKEN));
    assert!(same.contains("--token and --peer-token are the same secret"), "{same}");
    // Every secret is its own: a read-only token that is also the admin token is refused.
    let same = start_with(Some("a-peer-token-of-the-test"), Some(TOKEN));
    assert!(same.contains("--token and --read-token are the same secret"), "{same}");
}
