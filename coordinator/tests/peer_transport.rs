//! The peer transport against real gRPC peers on loopback: a peer of this version gets the
//! batches on one stream (`Stream`), a peer of an older version (no `Stream`: it answers
//! Unimplemented, as tonic does for a method it does not know) gets them one by one (`Send`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla_coordinator::raft::node::{self, Outbox};
use flotilla_coordinator::raft::replica::{Replica, ReplicaConfig};
use flotilla_coordinator::raft::storage::RaftStore;
use flotilla_coordinator::raft::transport::PeerTransport;
use flotilla_proto::v1::raft_service_server::{RaftService, RaftServiceServer};
use flotilla_proto::v1::{Ack, RaftBatch, SnapshotChunk};
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

const TOKEN: &str = "peer-token-of-the-test";

/// How a batch reached the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Send,
    Stream,
}

struct Peer {
    has_stream: bool,
    got: mpsc::UnboundedSender<(Via, RaftBatch)>,
}

#[tonic::async_trait]
impl RaftService for Peer {
    async fn send(&self, request: Request<RaftBatch>) -> Result<Response<Ack>, Status> {
        flotilla_proto::auth::check(request.metadata(), TOKEN, "peer token")
            .map_err(|e| Status::unauthenticated(e.message))?;
        let _ = self.got.send((Via::Send, request.into_inner()));
        Ok(Response::new(Ack {}))
    }

    async fn stream(&self, request: Request<Streaming<RaftBatch>>) -> Result<Response<Ack>, Status> {
        if !self.has_stream {
            return Err(Status::unimplemented("Method not found: flotilla.v1.RaftService/Stream"));
        }
        flotilla_proto::auth::check(request.metadata(), TOKEN, "peer token")
            .map_err(|e| Status::unauthenticated(e.message))?;
        let mut batches = request.into_inner();
        while let Some(batch) = batches.message().await? {
            let _ = self.got.send((Via::Stream, batch));
        }
        Ok(Response::new(Ack {}))
    }

    async fn send_snapshot(&self, _: Request<Streaming<SnapshotChunk>>) -> Result<Response<Ack>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

fn heartbeat(term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    (m.from, m.to, m.term) = (1, 2, term);
    m
}

/// Sends heartbeats from node 1 to a peer until it has 5 batches; returns how they came.
async fn deliveries(has_stream: bool) -> Vec<Via> {
    let port = flotilla_coordinator::ports::free_loopback_port().expect("a free port");
    let address = format!("127.0.0.1:{port}");
    let (got, mut arrived) = mpsc::unbounded_channel();
    let server = tonic::transport::Server::builder()
        .add_service(RaftServiceServer::new(Peer { has_stream, got }))
        .serve(address.parse().expect("address"));
    tokio::spawn(server);
    let replica = Replica::open(
        &ReplicaConfig { id: 1, voters: vec![1, 2], snapshot_every_entries: 1000 },
        RaftStore::in_memory().expect("store"),
    )
    .expect("replica");
    let addresses = BTreeMap::from([(1, "127.0.0.1:1".to_string()), (2, address.clone())]);
    let (handle, _task) = node::channel(replica, addresses, 1);
    let peers = BTreeMap::from([(2, address)]);
    let mut transport = PeerTransport::start(handle, "c".into(), &peers, TOKEN, None).expect("transport");
    let started = Instant::now();
    let mut seen = Vec::new();
    let mut term = 0;
    while seen.len() < 5 {
        assert!(started.elapsed() < Duration::from_secs(20), "only {seen:?} arrived");
        term += 1;
        transport.send(2, vec![heartbeat(term)]);
        if let Ok(Some((via, batch))) = tokio::time::timeout(Duration::from_millis(50), arrived.recv()).await {
            assert_eq!((batch.cluster_id.as_str(), batch.from, batch.to), ("c", 1, 2));
            assert!(!batch.messages.is_empty());
            seen.push(via);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_this_version_gets_every_batch_on_the_stream() {
    let seen = deliveries(true).await;
    assert!(seen.iter().all(|via| *via == Via::Stream), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_stream_gets_batches_one_by_one() {
    let seen = deliveries(false).await;
    assert!(seen.iter().all(|via| *via == Via::Send), "{seen:?}");
}
