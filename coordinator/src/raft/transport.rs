//! Peer transport: raft messages to other coordinators over gRPC (`RaftService.Stream`).
//!
//! One background task per peer drains a bounded queue, encodes messages with raft-rs's own
//! codec and writes them as one batch onto a long-lived client stream to that peer: no request
//! per batch and no wait for an answer between batches (the unary `Send` per batch cost a
//! request/response round and held the next batch back until the answer came). A stream that
//! fails or stalls is dropped and reopened; a peer of an older version that has no `Stream`
//! gets unary `Send`s. A message that cannot be queued or sent is dropped: Raft retransmits
//! what matters, and the node is told the peer is unreachable so it backs off.
//! Snapshot messages go on their own, in chunks (`SendSnapshot`, see [`super::chunks`]): a
//! state machine larger than one gRPC message still reaches a follower that fell behind.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_proto::auth::BearerAuth;
use flotilla_proto::limits::RAFT_MESSAGE_BYTES_MAX;
use flotilla_proto::v1::RaftBatch;
use flotilla_proto::v1::raft_service_client::RaftServiceClient;
use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use super::node::{NodeHandle, Outbox};

/// Batches queued per peer at most; beyond it messages are dropped (Raft retransmits).
const PEER_QUEUE_MAX: usize = 1024;
/// Bytes of encoded messages in one batch at most (below the receiver's decode limit).
const BATCH_BYTES_MAX: usize = RAFT_MESSAGE_BYTES_MAX / 2;
/// A send that takes longer counts as a failure.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// A snapshot transfer (chunked, possibly gigabytes) that takes longer counts as a failure.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause after a failed send before the next attempt (drops what queued meanwhile beyond it).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Batches handed to an open stream and not yet written to the connection, at most.
const STREAM_QUEUE_MAX: usize = 64;
/// HTTP/2 pings on the stream's connection: a peer that stops answering them for
/// KEEPALIVE_TIMEOUT is taken as gone (the stream ends, the node hears it is unreachable).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct PeerTransport {
    queues: BTreeMap<u64, mpsc::Sender<Vec<Message>>>,
    node: NodeHandle,
}

impl PeerTransport {
    /// Starts one sender task per peer (`peers` excludes this node).
    pub fn start(
        node: NodeHandle,
        cluster_id: String,
        peers: &BTreeMap<u64, String>,
        peer_token: &str,
        tls: Option<&flotilla_proto::tls::ClientTls>,
    ) -> Result<PeerTransport, String> {
        let auth = BearerAuth::new(peer_token).map_err(|e| format!("peer token: {e}"))?;
        let mut queues = BTreeMap::new();
        for (&id, addr) in peers {
            let bad = |e: tonic::transport::Error| format!("peer {id} address `{addr}`: {e}");
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(bad)?;
            if let Some(tls) = tls {
                // This coordinator's own certificate is its identity to the peer (mutual TLS).
                let host = addr.rsplit_once(':').map_or(addr.as_str(), |(host, _)| host);
                endpoint = endpoint.tls_config(tls.config(host)).map_err(bad)?;
            }
            let endpoint = endpoint.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true);
            // The stream lives as long as the connection: no request timeout, keepalive pings.
            let stream = RaftServiceClient::with_interceptor(
                endpoint
                    .clone()
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true)
                    .connect_lazy(),
                auth.clone(),
            )
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
            let endpoint = endpoint.timeout(SEND_TIMEOUT);
            let client = RaftServiceClient::with_interceptor(endpoint.connect_lazy(), auth.clone())
                .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
            // Snapshots on their own connection, with a timeout for their size.
            let snapshots = RaftServiceClient::with_interceptor(
                endpoint.clone().timeout(SNAPSHOT_TIMEOUT).connect_lazy(),
                auth.clone(),
            )
            .max_encoding_message_size(RAFT_MESSAGE_BYTES_MAX);
            let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
            let clients = Clients { stream, unary: client, snapshots };
            tokio::spawn(peer_loop(id, node.clone(), cluster_id.clone(), clients, rx));
            queues.insert(id, tx);
        }
        Ok(PeerTransport { queues, node })
    }
}

impl Outbox for PeerTransport {
    fn send(&mut self, to: u64, messages: Vec<Message>) {
        let Some(queue) = self.queues.get(&to) else { return };
        if let Err(full) = queue.try_send(messages) {
            let dropped = match full {
                mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m) => m,
            };
            for m in dropped.iter().filter(|m| m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot) {
                self.node.report_snapshot(m.to, false);
            }
        }
    }
}

type Client = RaftServiceClient<tonic::service::interceptor::InterceptedService<Channel, BearerAuth>>;

/// One peer's clients: the stream's connection, unary sends (a peer without `Stream`), and
/// snapshots (their own connection, with a timeout for their size).
struct Clients {
    stream: Client,
    unary: Client,
    snapshots: Client,
}

/// The open stream to a peer: batches go into `batches`; `ended` resolves when the stream does.
struct OpenStream {
    batches: mpsc::Sender<RaftBatch>,
    ended: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>,
}

impl OpenStream {
    fn open(client: &Client) -> OpenStream {
        let (batches, rx) = mpsc::channel(STREAM_QUEUE_MAX);
        let mut client = client.clone();
        let ended =
            Box::pin(async move { client.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map(|_| ()) });
        OpenStream { batches, ended }
    }
}

async fn peer_loop(
    to: u64,
    node: NodeHandle,
    cluster_id: String,
    mut clients: Clients,
    mut rx: mpsc::Receiver<Vec<Message>>,
) {
    // Cleared when the peer answers that it has no `Stream` (an older version): unary sends.
    let mut streaming = true;
    let mut open: Option<OpenStream> = None;
    loop {
        let first = match open.as_mut() {
            Some(stream) => tokio::select! {
                first = rx.recv() => first,
                ended = &mut stream.ended => {
                    open = None;
                    match ended {
                        Err(status) if status.code() == tonic::Code::Unimplemented => {
                            tracing::info!(peer = to, "the peer has no raft stream (an older version); sending batches one by one");
                            streaming = false;
                        }
                        Err(status) => tracing::debug!(peer = to, error = %status, "raft stream to the peer ended"),
                        Ok(()) => tracing::debug!(peer = to, "raft stream closed by the peer"),
                    }
                    node.report_unreachable(to);
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(first) = first else { return };
        let mut encoded = Vec::new();
        let mut snapshots = Vec::new();
        let mut bytes = encode_into(first, &mut encoded, &mut snapshots);
        while bytes < BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(more) => bytes += encode_into(more, &mut encoded, &mut snapshots),
                Err(_) => break,
            }
        }
        let mut delivered = true;
        if !encoded.is_empty() {
            let batch = RaftBatch { cluster_id: cluster_id.clone(), from: node.id, to, messages: encoded };
            if streaming {
                let stream = open.get_or_insert_with(|| OpenStream::open(&clients.stream));
                // A stream that cannot take the batch in time is stalled: drop it, reopen later.
                let queued = tokio::time::timeout(SEND_TIMEOUT, stream.batches.send(batch)).await;
                if !matches!(queued, Ok(Ok(()))) {
                    open = None;
                    delivered = false;
                }
            } else {
                delivered = clients.unary.send(batch).await.is_ok();
            }
        }
        for snapshot in snapshots {
            let sent = send_snapshot(&mut clients.snapshots, &cluster_id, node.id, to, snapshot).await;
            if let Err(e) = &sent {
                tracing::warn!(peer = to, error = %e, "snapshot transfer failed; raft will send another");
            }
            node.report_snapshot(to, sent.is_ok());
            delivered &= sent.is_ok();
        }
        if !delivered {
            node.report_unreachable(to);
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }
}

/// Sends one encoded snapshot message to `to` in chunks.
async fn send_snapshot(
    client: &mut Client,
    cluster_id: &str,
    from: u64,
    to: u64,
    encoded: Vec<u8>,
) -> Result<(), tonic::Status> {
    use flotilla_proto::v1::SnapshotChunk;
    let total_bytes = encoded.len() as u64;
    let chunks: Vec<SnapshotChunk> = super::chunks::chunk(&encoded, super::chunks::SNAPSHOT_CHUNK_BYTES)
        .into_iter()
        .map(|data| SnapshotChunk { cluster_id: cluster_id.to_string(), from, to, total_bytes, data: data.to_vec() })
        .collect();
    drop(encoded);
    client.send_snapshot(tokio_stream::iter(chunks)).await.map(|_| ())
}

/// Encodes `messages`: snapshots onto `snapshots` (sent on their own), the rest onto `out`;
/// returns the bytes added to `out`.
fn encode_into(messages: Vec<Message>, out: &mut Vec<Vec<u8>>, snapshots: &mut Vec<Vec<u8>>) -> usize {
    let mut bytes = 0;
    for message in messages {
        let encoded = message.write_to_bytes().expect("encoding a raft message into memory cannot fail");
        if message.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
            snapshots.push(encoded);
            continue;
        }
        bytes += encoded.len();
        out.push(encoded);
    }
    bytes
}
