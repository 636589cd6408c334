//! TLS on a real local cluster: `flotilla up` makes the cluster CA and certificates, the CLI
//! and the workers speak TLS (workers with their own certificate). Refused: a plaintext client,
//! a client that trusts another CA, a worker without a certificate, and a Raft batch from
//! anything but a coordinator's certificate.

use std::path::Path;
use std::time::Duration;

use flotilla_proto::client::ApiClient;
use flotilla_proto::tls::ClientTls;
use flotilla_proto::v1::raft_service_client::RaftServiceClient;
use flotilla_proto::v1::{ListJobsRequest, RaftBatch, RegisterWorkerRequest, WorkerCapabilities};
use flotilla_proto::{ApiError, ErrorKind};

mod common;
use common::{Down, ok, run as flotilla};

async fn list_jobs(mut client: ApiClient) -> Result<usize, ApiError> {
    client.deadline = Duration::from_secs(2);
    client.call(|mut c| async move { c.list_jobs(ListJobsRequest::default()).await }).await.map(|r| r.jobs.len())
}

/// A Raft batch to the coordinator at `address`, over TLS as `tls`'s certificate.
async fn raft_send(address: &str, tls: &ClientTls, peer_token: &str) -> tonic::Status {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{address}"))
        .expect("endpoint")
        .tls_config(tls.config("127.0.0.1"))
        .expect("tls");
    let channel = endpoint.connect().await.expect("a TLS connection (the certificate is the cluster CA's)");
    let auth = flotilla_proto::auth::BearerAuth::new(peer_token).expect("token");
    let mut client = RaftServiceClient::with_interceptor(channel, auth);
    let batch = RaftBatch { cluster_id: "another-cluster".into(), from: 2, to: 1, messages: Vec::new() };
    client.send(batch).await.expect_err("refused")
}

#[test]
fn tls_refuses_plaintext_another_ca_and_callers_without_their_role() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join(".flotilla");
    let _down = Down(&home);
    ok(flotilla(&home, &["up", "--workers", "1"]));
    // The CLI and the worker (registered over mutual TLS) work.
    let workers: serde_json::Value =
        serde_json::from_str(&ok(flotilla(&home, &["workers", "--output", "json"]))).expect("JSON");
    assert_eq!(workers.as_array().map(Vec::len), Some(1), "{workers}");

    let file: toml::Value =
        toml::from_str(&std::fs::read_to_string(home.join("cluster.toml")).expect("cluster file")).expect("toml");
    let text = |key: &str| file[key].as_str().expect(key).to_string();
    let (api_token, join_token, peer_token) = (text("api_token"), text("join_token"), text("peer_token"));
    let tls_dir = Path::new(&text("tls_dir")).to_path_buf();
    let address = file["coordinators"][0]["address"].as_str().expect("address").to_string();
    let ca = tls_dir.join("ca.pem");
    let other = dir.path().join("other-ca");
    ok(flotilla(&home, &["certs", "init", "--dir", other.to_str().expect("utf-8")]));

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let trusted = ClientTls::load(&ca, None, None).expect("CA");
        let client = ApiClient::with_tls(&address, &api_token, Some(trusted.clone())).expect("client");
        assert_eq!(list_jobs(client).await.expect("TLS with the cluster CA"), 0);

        let plaintext = list_jobs(ApiClient::new(&address, &api_token).expect("client")).await;
        assert!(plaintext.is_err(), "a plaintext client was served: {plaintext:?}");
        let stranger = ClientTls::load(&other.join("ca.pem"), None, None).expect("other CA");
        let client = ApiClient::with_tls(&address, &api_token, Some(stranger)).expect("client");
        let refused = list_jobs(client).await.expect_err("another CA's client must not accept the coordinator");
        assert_eq!(refused.kind, ErrorKind::Unavailable, "{refused}");

        // A worker with the join token but no certificate cannot register.
        let mut anonymous = ApiClient::with_tls(&address, &join_token, Some(trusted.clone())).expect("client");
        let request = RegisterWorkerRequest {
            capabilities: Some(WorkerCapabilities { cpus: 1, data_addr: "127.0.0.1:1".into(), ..Default::default() }),
        };
        let refused = anonymous
            .call_cluster(|mut c| {
                let request = request.clone();
                async move { c.register_worker(request).await }
            })
            .await
            .expect_err("no worker certificate");
        assert_eq!(refused.kind, ErrorKind::Unauthenticated, "{refused}");
        assert!(refused.message.contains("a worker's TLS client certificate"), "{refused}");

        // The Raft service takes only a coordinator's certificate, even with the peer token.
        let as_worker = ClientTls::load(&ca, Some(&tls_dir.join("worker.pem")), Some(&tls_dir.join("worker-key.pem")))
            .expect("worker");
        let refused = raft_send(&address, &as_worker, &peer_token).await;
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        assert!(refused.message().contains("a coordinator's TLS client certificate"), "{refused:?}");
        let as_coordinator =
            ClientTls::load(&ca, Some(&tls_dir.join("coordinator.pem")), Some(&tls_dir.join("coordinator-key.pem")))
                .expect("coordinator");
        // Past TLS and the token: refused only for naming another cluster.
        let refused = raft_send(&address, &as_coordinator, &peer_token).await;
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("another-cluster"), "{refused:?}");
    });
}
