//! `RaftService`: inbound raft messages from peers. Authenticated, size-bounded and checked
//! (cluster id, sender, recipient) before anything is decoded or stepped.

use std::collections::BTreeSet;

use flotilla_proto::v1::raft_service_server::RaftService;
use flotilla_proto::v1::{Ack, RaftBatch, SnapshotChunk};
use flotilla_proto::{ApiError, ErrorKind, auth};
use protobuf::Message as _;
use raft::eraftpb::Message;
use tonic::{Request, Response, Status, Streaming};

use super::status;
use crate::raft::chunks::{Header, Reassembly};
use crate::raft::node::NodeHandle;

/// Messages in one batch at most.
pub const RAFT_BATCH_MESSAGES_MAX: usize = 10_000;

pub struct RaftApi {
    pub node: NodeHandle,
    pub cluster_id: String,
    pub peer_token: String,
    pub peers: BTreeSet<u64>,
    /// The server runs TLS: a batch must come with a coordinator's client certificate.
    pub tls: bool,
}

fn invalid(message: String) -> Status {
    status(ApiError::new(ErrorKind::InvalidArgument, message))
}

impl RaftApi {
    /// A coordinator's certificate (with TLS) and the peer token.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.tls {
            flotilla_proto::tls::require_role(request, flotilla_proto::tls::COORDINATOR_NAME).map_err(status)?;
        }
        auth::check(request.metadata(), &self.peer_token, "peer token").map_err(status)
    }

    /// This cluster, a known peer, this node.
    fn check_route(&self, cluster_id: &str, from: u64, to: u64) -> Result<(), Status> {
        if cluster_id != self.cluster_id {
            return Err(status(ApiError::new(
                ErrorKind::PermissionDenied,
                format!("batch is for cluster `{cluster_id}`, this is `{}`", self.cluster_id),
            )));
        }
        if to != self.node.id || !self.peers.contains(&from) {
            return Err(invalid(format!("batch from {from} to {to} does not fit node {}", self.node.id)));
        }
        Ok(())
    }

    /// A batch's messages, once it is this cluster's, from a peer, to this node, and decodes.
    fn check_batch(&self, batch: RaftBatch) -> Result<Vec<Message>, Status> {
        self.check_route(&batch.cluster_id, batch.from, batch.to)?;
        if batch.messages.len() > RAFT_BATCH_MESSAGES_MAX {
            return Err(invalid(format!(
                "{} messages in one batch; at most {RAFT_BATCH_MESSAGES_MAX}",
                batch.messages.len()
            )));
        }
        let mut messages = Vec::with_capacity(batch.messages.len());
        for (i, bytes) in batch.messages.iter().enumerate() {
            let message = Message::parse_from_bytes(bytes)
                .map_err(|e| invalid(format!("raft message {i} does not decode: {e}")))?;
            if message.from != batch.from || message.to != batch.to {
                return Err(invalid(format!("raft message {i} is from {} to {}", message.from, message.to)));
            }
            messages.push(message);
        }
        Ok(messages)
    }
}

#[tonic::async_trait]
impl RaftService for RaftApi {
    async fn send(&self, request: Request<RaftBatch>) -> Result<Response<Ack>, Status> {
        self.authenticate(&request)?;
        let messages = self.check_batch(request.into_inner())?;
        self.node.deliver(messages).map_err(status)?;
        Ok(Response::new(Ack {}))
    }

    async fn stream(&self, request: Request<Streaming<RaftBatch>>) -> Result<Response<Ack>, Status> {
        self.authenticate(&request)?;
        let mut batches = request.into_inner();
        while let Some(batch) = batches.message().await? {
            let messages = self.check_batch(batch)?;
            match self.node.deliver(messages) {
                Ok(()) => {}
                // A full queue drops this batch, as a failed send would; Raft retransmits.
                Err(e) if e.kind == ErrorKind::ResourceExhausted => {
                    tracing::debug!(error = %e, "raft batch dropped: the node's queue is full");
                }
                Err(e) => return Err(status(e)),
            }
        }
        Ok(Response::new(Ack {}))
    }

    async fn send_snapshot(&self, request: Request<Streaming<SnapshotChunk>>) -> Result<Response<Ack>, Status> {
        self.authenticate(&request)?;
        let mut chunks = request.into_inner();
        let mut reassembly: Option<Reassembly> = None;
        while let Some(chunk) = chunks.message().await? {
            let header =
                Header { cluster_id: chunk.cluster_id, from: chunk.from, to: chunk.to, total_bytes: chunk.total_bytes };
            let building = match reassembly.as_mut() {
                Some(building) => building,
                None => {
                    self.check_route(&header.cluster_id, header.from, header.to)?;
                    reassembly.insert(Reassembly::start(header.clone()).map_err(invalid)?)
                }
            };
            building.push(&header, &chunk.data).map_err(invalid)?;
        }
        let (header, bytes) =
            reassembly.ok_or_else(|| invalid("a snapshot stream without chunks".into()))?.finish().map_err(invalid)?;
        let message =
            Message::parse_from_bytes(&bytes).map_err(|e| invalid(format!("the snapshot does not decode: {e}")))?;
        let snapshot = message.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot;
        if !snapshot || message.from != header.from || message.to != header.to {
            return Err(invalid(format!("not a snapshot from {} to {}", header.from, header.to)));
        }
        self.node.deliver(vec![message]).map_err(status)?;
        Ok(Response::new(Ack {}))
    }
}
