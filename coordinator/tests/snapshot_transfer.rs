//! A coordinator that joins late catches up through a snapshot sent in chunks (`SendSnapshot`):
//! three real nodes on loopback, the log compacted every 10 entries, the third node started
//! only after 60 submissions were committed by the other two. It must then serve every job.
//! Raft runs on ports of its own (`raft_peers`): the API ports do not serve it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use flotilla_coordinator::server::{self, CoordinatorConfig};
use flotilla_core::spec::JobSpec;
use flotilla_proto::client::ApiClient;
use flotilla_proto::convert::spec_to_proto;
use flotilla_proto::v1::{ListJobsRequest, SubmitJobRequest};

const TOKEN: &str = "api-token";
const JOBS: usize = 60;

fn free_address() -> SocketAddr {
    let port = flotilla_coordinator::ports::free_loopback_port().expect("a free loopback port");
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Raft on ports of its own (`raft_peers`), apart from the API ports (`peers`).
fn config(
    id: u64,
    peers: &BTreeMap<u64, String>,
    raft_peers: &BTreeMap<u64, String>,
    dir: &std::path::Path,
) -> CoordinatorConfig {
    CoordinatorConfig {
        id,
        listen: peers[&id].parse().expect("address"),
        peers: peers.clone(),
        data_dir: dir.join(format!("node-{id}")),
        cluster_id: "snapshots".into(),
        api_token: TOKEN.into(),
        submit_token: None,
        read_token: None,
        peer_token: "a-peer-token-for-the-test".into(),
        join_token: None,
        store_uri: dir.join("store").display().to_string(),
        tls: None,
        raft_peers: Some(raft_peers.clone()),
        data_roots: Vec::new(),
        keep_finished: Duration::from_secs(3600),
        snapshot_every_entries: 10,
        local_workers: None,
        capacity: None,
        metrics_listen: None,
        live_handover: false,
        priority_preemption: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_node_catches_up_through_a_chunked_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let peers: BTreeMap<u64, String> = (1..=3).map(|id| (id, free_address().to_string())).collect();
    let raft_peers: BTreeMap<u64, String> = (1..=3).map(|id| (id, free_address().to_string())).collect();
    let mut stops = Vec::new();
    for id in [1, 2] {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server::run(config(id, &peers, &raft_peers, dir.path()), async move {
            let _ = stopped.await;
        }));
        stops.push(stop);
    }
    let two: Vec<&str> = [1, 2].iter().map(|id| peers[id].as_str()).collect();
    let mut client = ApiClient::new(&two.join(","), TOKEN).expect("client");
    client.deadline = Duration::from_secs(20);
    let spec = JobSpec::from_toml_str(
        "name = \"s\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\nworkers = { min = 1 }\n",
    )
    .expect("spec");
    for i in 0..JOBS {
        let request = SubmitJobRequest { spec: Some(spec_to_proto(&spec)), client_request_id: format!("r{i}") };
        client
            .call(|mut c| {
                let request = request.clone();
                async move { c.submit_job(request).await }
            })
            .await
            .expect("a majority commits");
    }

    // Node 3 starts with an empty log; the leader's log is compacted past its start.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server::run(config(3, &peers, &raft_peers, dir.path()), async move {
        let _ = stopped.await;
    }));
    stops.push(stop);
    let mut third = ApiClient::new(&peers[&3], TOKEN).expect("client");
    third.deadline = Duration::from_secs(5);
    let started = std::time::Instant::now();
    loop {
        let listed = third
            .call(|mut c| async move { c.list_jobs(ListJobsRequest { limit: 1000, ..Default::default() }).await })
            .await;
        if let Ok(listed) = &listed
            && listed.served_by == 3
            && listed.jobs.len() == JOBS
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "node 3 never caught up: {listed:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The API port does not serve Raft (a firewall keeps the Raft ports between coordinators).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", peers[&1]))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let auth = flotilla_proto::auth::BearerAuth::new("a-peer-token-for-the-test").expect("token");
    let mut raft = flotilla_proto::v1::raft_service_client::RaftServiceClient::with_interceptor(channel, auth);
    let batch = flotilla_proto::v1::RaftBatch { cluster_id: "snapshots".into(), from: 2, to: 1, messages: Vec::new() };
    let refused = raft.send(batch).await.expect_err("not served on the API port");
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
    drop(stops);
}
