//! `RaftService`: inbound raft messages from peers. Authenticated, size-bounded and checked
//! (cluster id, sender, recipient) before anything is decoded or stepped.

use std::collections::BTreeSet;

use flotilla_proto::v1::raft_service_server::RaftService;
use flotilla_proto::v1::{Ack, RaftBatch};
use flotilla_proto::{ApiError, ErrorKind, auth};
use protobuf::Message as _;
use raft::eraftpb::Message;
use tonic::{Request, Response, Status};

use super::status;
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

#[tonic::async_trait]
impl RaftService for RaftApi {
    async fn send(&self, request: Request<RaftBatch>) -> Result<Response<Ack>, Status> {
        if self.tls {
            flotilla_proto::tls::require_role(&request, flotilla_proto::tls::COORDINATOR_NAME).map_err(status)?;
        }
        auth::check(request.metadata(), &self.peer_token, "peer token").map_err(status)?;
        let batch = request.into_inner();
        if batch.cluster_id != self.cluster_id {
            return Err(status(ApiError::new(
                ErrorKind::PermissionDenied,
                format!("batch is for cluster `{}`, this is `{}`", batch.cluster_id, self.cluster_id),
            )));
        }
        if batch.to != self.node.id || !self.peers.contains(&batch.from) {
            return Err(invalid(format!(
                "batch from {} to {} does not fit node {}",
                batch.from, batch.to, self.node.id
            )));
        }
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
        self.node.deliver(messages).map_err(status)?;
        Ok(Response::new(Ack {}))
    }
}
