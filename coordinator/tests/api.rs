//! The coordinator's gRPC surface under bad input: a real single-node coordinator on loopback
//! receives garbage, truncated, oversized and unauthenticated requests, refuses each with a
//! clear error, and keeps serving.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use flotilla_coordinator::server::{self, CoordinatorConfig};
use flotilla_core::spec::JobSpec;
use flotilla_proto::auth::BearerAuth;
use flotilla_proto::client::ApiClient;
use flotilla_proto::convert::spec_to_proto;
use flotilla_proto::v1::raft_service_client::RaftServiceClient;
use flotilla_proto::v1::{GetJobRequest, ListJobsRequest, RaftBatch, SubmitJobRequest};
use flotilla_proto::{ApiError, ErrorKind};
use protobuf::Message as _;
use tonic::Code;

const TOKEN: &str = "api-token";
const SUBMIT_TOKEN: &str = "submit-token";
const READ_TOKEN: &str = "read-token";
const PEER_TOKEN: &str = "peer-token-of-the-test";

struct Node {
    address: String,
    /// The cluster store's folder.
    store: String,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn free_address() -> SocketAddr {
    let port = flotilla_coordinator::ports::free_loopback_port().expect("a free loopback port");
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A node of a 3-node configuration whose other peers (2, 3) never answer; it is a follower,
/// which is enough to exercise decoding and authentication. With `single`, a 1-node cluster.
async fn start(single: bool) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = free_address();
    let mut peers = BTreeMap::from([(1, listen.to_string())]);
    if !single {
        peers.insert(2, free_address().to_string());
        peers.insert(3, free_address().to_string());
    }
    let store = dir.path().join("store").display().to_string();
    let config = CoordinatorConfig {
        id: 1,
        listen,
        peers,
        data_dir: dir.path().to_path_buf(),
        cluster_id: "test".into(),
        api_token: TOKEN.into(),
        submit_token: Some(SUBMIT_TOKEN.into()),
        read_token: Some(READ_TOKEN.into()),
        tls: None,
        raft_peers: None,
        data_roots: vec![dir.path().to_path_buf()],
        keep_finished: Duration::from_secs(7 * 24 * 3600),
        snapshot_every_entries: flotilla_coordinator::raft::replica::SNAPSHOT_EVERY_ENTRIES,
        peer_token: PEER_TOKEN.into(),
        join_token: Some("join-token".into()),
        store_uri: store.clone(),
        local_workers: None,
        capacity: None,
        metrics_listen: None,
        live_handover: false,
        priority_preemption: true,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel();
    tokio::spawn(server::run(config, async move {
        let _ = stopped.await;
    }));
    let node = Node { address: listen.to_string(), store, _dir: dir, stop: Some(stop) };
    let mut client = ApiClient::new(&node.address, TOKEN).expect("client");
    client.deadline = Duration::from_secs(10);
    if single {
        client.call(|mut c| async move { c.list_jobs(ListJobsRequest::default()).await }).await.expect("node answers");
    }
    node
}

fn spec() -> JobSpec {
    JobSpec::from_toml_str(
        "name = \"t\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\nworkers = { min = 1 }\n",
    )
    .expect("valid spec")
}

async fn raft_client(
    address: &str,
    token: &str,
) -> RaftServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerAuth>> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}")).expect("endpoint");
    let mut attempts = 0;
    let channel = loop {
        match endpoint.connect().await {
            Ok(channel) => break channel,
            // The server starts in the background; give it up to 5 s.
            Err(e) if attempts < 100 => {
                attempts += 1;
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("coordinator never listened on {address}: {e}"),
        }
    };
    RaftServiceClient::with_interceptor(channel, BearerAuth::new(token).expect("token"))
        .max_encoding_message_size(usize::MAX)
}

fn batch(messages: Vec<Vec<u8>>) -> RaftBatch {
    RaftBatch { cluster_id: "test".into(), from: 2, to: 1, messages }
}

fn heartbeat() -> Vec<u8> {
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
    m.from = 2;
    m.to = 1;
    m.term = 1;
    m.write_to_bytes().expect("encode")
}

#[tokio::test]
async fn bad_peer_messages_are_refused_and_the_node_keeps_serving() {
    let node = start(false).await;
    let mut peer = raft_client(&node.address, PEER_TOKEN).await;
    let cases: Vec<(&str, RaftBatch, Code)> = vec![
        ("garbage bytes", batch(vec![vec![0xff, 0xfe, 0x01, 0x80]]), Code::InvalidArgument),
        ("truncated message", batch(vec![heartbeat()[..3].to_vec()]), Code::InvalidArgument),
        ("wrong recipient", RaftBatch { to: 9, ..batch(vec![heartbeat()]) }, Code::InvalidArgument),
        ("unknown sender", RaftBatch { from: 7, ..batch(vec![heartbeat()]) }, Code::InvalidArgument),
        ("other cluster", RaftBatch { cluster_id: "x".into(), ..batch(vec![heartbeat()]) }, Code::PermissionDenied),
        ("oversized batch", batch(vec![vec![0u8; 65 * 1024 * 1024]]), Code::OutOfRange),
    ];
    for (what, request, code) in cases {
        let expected =
            if code == Code::OutOfRange { [Code::OutOfRange, Code::ResourceExhausted] } else { [code, code] };
        // The same checks on the stream the peer transport uses, after a good batch.
        let on_stream = vec![batch(vec![heartbeat()]), request.clone()];
        let status = peer.stream(tokio_stream::iter(on_stream)).await.expect_err(what);
        assert!(expected.contains(&status.code()), "{what} on a stream: {status:?}");
        let status = peer.send(request).await.expect_err(what);
        assert!(expected.contains(&status.code()), "{what}: {status:?}");
    }
    let mut stranger = raft_client(&node.address, "wrong").await;
    assert_eq!(stranger.send(batch(vec![heartbeat()])).await.expect_err("bad token").code(), Code::Unauthenticated);
    let refused = stranger.stream(tokio_stream::iter(vec![batch(vec![heartbeat()])])).await;
    assert_eq!(refused.expect_err("bad token on a stream").code(), Code::Unauthenticated);
    let batches: Vec<RaftBatch> = (0..3).map(|_| batch(vec![heartbeat(), heartbeat()])).collect();
    peer.stream(tokio_stream::iter(batches)).await.expect("a stream of valid batches is accepted");
    // A well-formed message is still accepted after all of that.
    peer.send(batch(vec![heartbeat()])).await.expect("valid heartbeat accepted");
}

#[tokio::test]
async fn bad_api_requests_are_refused_with_the_field_named() {
    let node = start(true).await;
    let mut client = ApiClient::new(&node.address, TOKEN).expect("client");
    let submit = |request: SubmitJobRequest| {
        move |mut c: flotilla_proto::client::JobClient| {
            let request = request.clone();
            async move { c.submit_job(request).await }
        }
    };
    let mut bad = spec_to_proto(&spec());
    bad.workers = Some(flotilla_proto::v1::WorkersSpec { min: 4, max: 2, gpus: 0 });
    let err: ApiError = client
        .call(submit(SubmitJobRequest { spec: Some(bad), client_request_id: "r1".into() }))
        .await
        .expect_err("min > max");
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
    assert!(err.message.contains("workers.min"), "{err}");

    let mut relative = spec_to_proto(&spec());
    relative.data.as_mut().expect("data").train = "data/x.csv".into();
    relative.data.as_mut().expect("data").format = flotilla_proto::v1::DataFormat::Csv.into();
    let err = client
        .call(submit(SubmitJobRequest { spec: Some(relative), client_request_id: "r2".into() }))
        .await
        .expect_err("relative path");
    assert!(err.message.contains("data.train") && err.message.contains("relative"), "{err}");

    let err = client
        .call(submit(SubmitJobRequest { spec: None, client_request_id: "r3".into() }))
        .await
        .expect_err("no spec");
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
    let err = client
        .call(submit(SubmitJobRequest { spec: Some(spec_to_proto(&spec())), client_request_id: String::new() }))
        .await
        .expect_err("no request id");
    assert!(err.message.contains("client_request_id"), "{err}");

    let mut huge = spec_to_proto(&spec());
    huge.name = "x".repeat(5 * 1024 * 1024);
    let err = client
        .call(submit(SubmitJobRequest { spec: Some(huge), client_request_id: "r4".into() }))
        .await
        .expect_err("oversized request");
    assert!(
        matches!(err.kind, ErrorKind::InvalidArgument | ErrorKind::ResourceExhausted | ErrorKind::Internal),
        "{err:?}"
    );

    let err = client
        .call(|mut c| async move { c.get_job(GetJobRequest { job_id: "job-x".into() }).await })
        .await
        .expect_err("bad id");
    assert!(err.message.contains("job_id"), "{err}");

    let mut stranger = ApiClient::new(&node.address, "wrong").expect("client");
    let err =
        stranger.call(|mut c| async move { c.list_jobs(ListJobsRequest::default()).await }).await.expect_err("token");
    assert_eq!(err.kind, ErrorKind::Unauthenticated);

    // Still serving, and idempotent: the same request id gives the same job.
    let request = SubmitJobRequest { spec: Some(spec_to_proto(&spec())), client_request_id: "ok".into() };
    let first = client.call(submit(request.clone())).await.expect("submit");
    let again = client.call(submit(request)).await.expect("resubmit");
    assert_eq!((first.job_id.as_str(), first.duplicate), ("job-1", false));
    assert_eq!((again.job_id.as_str(), again.duplicate), ("job-1", true));
    let jobs = client.call(|mut c| async move { c.list_jobs(ListJobsRequest::default()).await }).await.expect("list");
    assert_eq!(jobs.jobs.len(), 1);
}

#[tokio::test]
async fn watch_streams_changes_until_the_job_ends() {
    use flotilla_proto::v1::{CancelJobRequest, WatchJobRequest};
    let node = start(true).await;
    let mut client = ApiClient::new(&node.address, TOKEN).expect("client");
    let request = SubmitJobRequest { spec: Some(spec_to_proto(&spec())), client_request_id: "w".into() };
    let job = client
        .call(|mut c| {
            let request = request.clone();
            async move { c.submit_job(request).await }
        })
        .await
        .expect("submit");
    let job_id = job.job_id.clone();
    let mut stream = client
        .call(|mut c| {
            let job_id = job_id.clone();
            async move { c.watch_job(WatchJobRequest { job_id }).await }
        })
        .await
        .expect("watch");
    let first = stream.message().await.expect("stream").expect("first update");
    assert_eq!(first.job.expect("job").state, flotilla_proto::v1::JobState::Pending as i32);
    let job_id = job.job_id.clone();
    client
        .call(|mut c| {
            let job_id = job_id.clone();
            async move { c.cancel_job(CancelJobRequest { job_id, reason: "done".into() }).await }
        })
        .await
        .expect("cancel");
    let update = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.expect("update in time");
    let update = update.expect("stream").expect("second update");
    assert_eq!(update.job.expect("job").state, flotilla_proto::v1::JobState::Cancelled as i32);
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.expect("end in time");
    assert!(end.expect("clean end").is_none(), "the stream ends with the job");
}

/// A registered worker (its own client, carrying its credential) and its id.
async fn register(address: &str, host: &str) -> (ApiClient, String) {
    use flotilla_proto::v1::{RegisterWorkerRequest, WorkerCapabilities};
    let mut client = ApiClient::new(address, "join-token").expect("client");
    let capabilities =
        WorkerCapabilities { cpus: 1, hostname: host.into(), data_addr: "127.0.0.1:1".into(), ..Default::default() };
    let request = RegisterWorkerRequest { capabilities: Some(capabilities) };
    let registered = client
        .call_cluster(|mut c| {
            let request = request.clone();
            async move { c.register_worker(request).await }
        })
        .await
        .expect("register");
    assert!(registered.credential.starts_with(&format!("{}.", registered.worker_id)), "{}", registered.credential);
    client.set_worker_credential(&registered.credential).expect("credential");
    (client, registered.worker_id)
}

async fn job_state(client: &mut ApiClient, job_id: &str) -> i32 {
    let job_id = job_id.to_string();
    let job = client
        .call(|mut c| {
            let job_id = job_id.clone();
            async move { c.get_job(GetJobRequest { job_id }).await }
        })
        .await
        .expect("get");
    job.job.expect("job").state
}

#[tokio::test]
async fn a_worker_credential_acts_only_for_its_own_worker_and_gang() {
    use flotilla_proto::v1::{
        CheckpointRef, CheckpointReport, FinishedReport, HeartbeatRequest, JobState, ListWorkersRequest,
    };
    let node = start(true).await;
    let mut user = ApiClient::new(&node.address, TOKEN).expect("client");
    let (mut a, a_id) = register(&node.address, "a").await;
    let (mut b, b_id) = register(&node.address, "b").await;
    let request = SubmitJobRequest { spec: Some(spec_to_proto(&spec())), client_request_id: "c".into() };
    let job_id = user
        .call(|mut c| {
            let request = request.clone();
            async move { c.submit_job(request).await }
        })
        .await
        .expect("submit")
        .job_id;
    // The scheduler gives the job to one of the two; the other is the outsider.
    let member = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let workers = user
                .call_cluster(|mut c| async move { c.list_workers(ListWorkersRequest::default()).await })
                .await
                .expect("list");
            if let Some(w) = workers.workers.iter().find(|w| w.job_id.as_deref() == Some(job_id.as_str())) {
                return w.id.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the job is placed");
    let ((insider, insider_id), (outsider, outsider_id)) =
        if member == a_id { ((&mut a, &a_id), (&mut b, &b_id)) } else { ((&mut b, &b_id), (&mut a, &a_id)) };

    let finished = |worker_id: &str| FinishedReport {
        worker_id: worker_id.into(),
        job_id: job_id.clone(),
        generation: 1,
        success: true,
        step: 1,
        ..Default::default()
    };
    let checkpoint = CheckpointReport {
        worker_id: outsider_id.clone(),
        job_id: job_id.clone(),
        generation: 1,
        checkpoint: Some(CheckpointRef {
            step: 5,
            uri: format!("{}/jobs/{job_id}/ckpt/step-5", flotilla_store::open(&node.store).expect("store").uri()),
            manifest_sha256: "ab".repeat(32),
            ..Default::default()
        }),
    };
    // The outsider, as itself: refused by the state machine (not a member of the gang).
    let report = finished(outsider_id);
    let refused = outsider
        .call_cluster(|mut c| {
            let report = report.clone();
            async move { c.report_finished(report).await }
        })
        .await
        .expect_err("not its gang");
    assert_eq!(refused.kind, ErrorKind::PermissionDenied, "{refused}");
    assert!(refused.message.contains("not a member"), "{refused}");
    let refused = outsider
        .call_cluster(|mut c| {
            let report = checkpoint.clone();
            async move { c.report_checkpoint(report).await }
        })
        .await
        .expect_err("not its gang");
    assert_eq!(refused.kind, ErrorKind::PermissionDenied, "{refused}");
    // The outsider, claiming to be the member: refused before anything is proposed.
    let report = finished(insider_id);
    let refused = outsider
        .call_cluster(|mut c| {
            let report = report.clone();
            async move { c.report_finished(report).await }
        })
        .await
        .expect_err("not its identity");
    assert_eq!(refused.kind, ErrorKind::PermissionDenied, "{refused}");
    assert!(refused.message.contains("cannot act as"), "{refused}");
    assert_eq!(job_state(&mut user, &job_id).await, JobState::Running as i32, "nothing changed");

    // Only the join token (no credential), or a made-up secret: refused as unauthenticated.
    let bare = ApiClient::new(&node.address, "join-token").expect("client");
    let beat = HeartbeatRequest { worker_id: insider_id.clone(), ..Default::default() };
    let call = |mut client: ApiClient| {
        let beat = beat.clone();
        async move {
            client
                .call_cluster(|mut c| {
                    let beat = beat.clone();
                    async move { c.heartbeat(beat).await }
                })
                .await
        }
    };
    assert_eq!(call(bare.clone()).await.expect_err("no credential").kind, ErrorKind::Unauthenticated);
    bare.set_worker_credential(&format!("{insider_id}.{}", "00".repeat(32))).expect("credential");
    assert_eq!(call(bare).await.expect_err("made-up secret").kind, ErrorKind::Unauthenticated);

    // A worker that holds the job's state in memory keeps it while the job runs...
    let held = HeartbeatRequest {
        worker_id: outsider_id.clone(),
        held_job_id: job_id.clone(),
        held_step: Some(5),
        ..Default::default()
    };
    let beat_held = |client: &mut ApiClient| {
        let held = held.clone();
        let mut client = client.clone();
        async move {
            client
                .call_cluster(|mut c| {
                    let held = held.clone();
                    async move { c.heartbeat(held).await }
                })
                .await
                .expect("heartbeat")
        }
    };
    assert!(!beat_held(outsider).await.drop_held, "the job runs: its state may be wanted");

    // The member itself is heard.
    let report = finished(insider_id);
    insider
        .call_cluster(|mut c| {
            let report = report.clone();
            async move { c.report_finished(report).await }
        })
        .await
        .expect("the member reports");
    assert_eq!(job_state(&mut user, &job_id).await, JobState::Succeeded as i32);
    // ... and is told to drop it once the job has ended.
    assert!(beat_held(outsider).await.drop_held, "the job succeeded: no gang takes its state");
}

#[tokio::test]
async fn a_read_only_token_cannot_submit_or_cancel_and_a_submit_token_cannot_administer() {
    use flotilla_proto::v1::{CancelJobRequest, SetAliasRequest};
    let node = start(true).await;
    let mut admin = ApiClient::new(&node.address, TOKEN).expect("client");
    let mut submitter = ApiClient::new(&node.address, SUBMIT_TOKEN).expect("client");
    let mut reader = ApiClient::new(&node.address, READ_TOKEN).expect("client");
    let submit = |client: &mut ApiClient, id: &str| {
        let request = SubmitJobRequest { spec: Some(spec_to_proto(&spec())), client_request_id: id.into() };
        let mut client = client.clone();
        async move {
            client
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.submit_job(request).await }
                })
                .await
        }
    };
    let cancel = |client: &mut ApiClient, job_id: &str| {
        let request = CancelJobRequest { job_id: job_id.into(), reason: "test".into() };
        let mut client = client.clone();
        async move {
            client
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.cancel_job(request).await }
                })
                .await
        }
    };
    let refused = submit(&mut reader, "r").await.expect_err("read-only");
    assert_eq!(refused.kind, ErrorKind::PermissionDenied, "{refused}");
    assert!(refused.message.contains("read-only token cannot submit a job"), "{refused}");
    let job = submit(&mut submitter, "s").await.expect("the submit role submits").job_id;
    let refused = cancel(&mut reader, &job).await.expect_err("read-only");
    assert_eq!(refused.kind, ErrorKind::PermissionDenied, "{refused}");
    // The reader sees the job, still Pending.
    assert_eq!(job_state(&mut reader, &job).await, flotilla_proto::v1::JobState::Pending as i32);
    // Resuming takes the submit role too: the reader is refused, the submitter resumes the
    // job it cancelled (from the start: it recorded no checkpoint).
    let resume = |client: &mut ApiClient, job_id: &str| {
        let request = flotilla_proto::v1::ResumeJobRequest { job_id: job_id.into(), spec: None };
        let mut client = client.clone();
        async move {
            client
                .call(|mut c| {
                    let request = request.clone();
                    async move { c.resume_job(request).await }
                })
                .await
        }
    };
    cancel(&mut submitter, &job).await.expect("the submit role cancels");
    let refused = resume(&mut reader, &job).await.expect_err("read-only");
    assert!(refused.message.contains("read-only token cannot resume a job"), "{refused}");
    let resumed = resume(&mut submitter, &job).await.expect("the submit role resumes");
    let state = resumed.job.map(|j| j.state);
    assert_eq!((resumed.from_step, state), (0, Some(flotilla_proto::v1::JobState::Pending as i32)));
    let alias = SetAliasRequest { name: "m".into(), version: 1, alias: "prod".into() };
    let refused = submitter
        .call_registry(|mut c| {
            let alias = alias.clone();
            async move { c.set_alias(alias).await }
        })
        .await
        .expect_err("not admin");
    assert_eq!(refused.kind, ErrorKind::PermissionDenied, "{refused}");
    // The admin passes the role check (and is told the model does not exist).
    let missing = admin
        .call_registry(|mut c| {
            let alias = alias.clone();
            async move { c.set_alias(alias).await }
        })
        .await
        .expect_err("no such model");
    assert_eq!(missing.kind, ErrorKind::NotFound, "{missing}");
    cancel(&mut submitter, &job).await.expect("the submit role cancels");
    assert_eq!(job_state(&mut admin, &job).await, flotilla_proto::v1::JobState::Cancelled as i32);
}

#[tokio::test]
async fn lists_come_in_pages_that_continue_where_they_ended() {
    use flotilla_proto::v1::{ListInferencesRequest, ListModelsRequest, ListWorkersRequest};
    let node = start(true).await;
    let mut user = ApiClient::new(&node.address, TOKEN).expect("client");
    let mut ids = Vec::new();
    for host in ["a", "b", "c"] {
        ids.push(register(&node.address, host).await.1);
    }
    let list = |client: &mut ApiClient, page_token: String| {
        let mut client = client.clone();
        async move {
            let request = ListWorkersRequest { limit: 2, page_token };
            client
                .call_cluster(|mut c| {
                    let request = request.clone();
                    async move { c.list_workers(request).await }
                })
                .await
        }
    };
    let first = list(&mut user, String::new()).await.expect("first page");
    assert_eq!(first.workers.iter().map(|w| w.id.clone()).collect::<Vec<_>>(), ids[..2]);
    assert_eq!(first.next_page_token, ids[1]);
    let second = list(&mut user, first.next_page_token).await.expect("second page");
    assert_eq!(second.workers.iter().map(|w| w.id.clone()).collect::<Vec<_>>(), ids[2..]);
    assert!(second.next_page_token.is_empty(), "the last page says so");
    let bad = list(&mut user, "garbage".into()).await.expect_err("not a token");
    assert_eq!(bad.kind, ErrorKind::InvalidArgument, "{bad}");
    // The other lists take the same fields (empty here).
    let models = user
        .call_registry(|mut c| async move { c.list_models(ListModelsRequest { limit: 1, ..Default::default() }).await })
        .await
        .expect("models");
    assert!(models.versions.is_empty() && models.next_page_token.is_empty());
    let inferences = user
        .call_inference(|mut c| async move {
            c.list_inferences(ListInferencesRequest { limit: 1, ..Default::default() }).await
        })
        .await
        .expect("inferences");
    assert!(inferences.inferences.is_empty() && inferences.next_page_token.is_empty());
}
