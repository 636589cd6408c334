//! Runs one coordinator node: opens the durable log, starts the Raft node task and the peer
//! transport, and serves the gRPC API until shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use flotilla_proto::limits::{API_MESSAGE_BYTES_MAX, RAFT_MESSAGE_BYTES_MAX};
use flotilla_proto::v1::cluster_service_server::ClusterServiceServer;
use flotilla_proto::v1::inference_service_server::InferenceServiceServer;
use flotilla_proto::v1::job_service_server::JobServiceServer;
use flotilla_proto::v1::raft_service_server::RaftServiceServer;
use flotilla_proto::v1::registry_service_server::RegistryServiceServer;

use crate::api::cluster::ClusterApi;
use crate::api::jobs::JobApi;
use crate::api::raft_service::RaftApi;
use crate::leases::{self, Leases};
use crate::raft::node::{self, now_unix_ms};
use crate::raft::replica::{Replica, ReplicaConfig, ReplicaError};
use crate::raft::storage::RaftStore;
use crate::raft::transport::PeerTransport;

/// Shortest peer token accepted (16 random hex characters carry 64 bits).
pub const PEER_TOKEN_LEN_MIN: usize = 16;

/// The Raft log in a coordinator's data folder (see `raft::storage`).
pub const RAFT_LOG_FILE: &str = "raft.wal";
/// Requests in progress on one connection at most (a client holds a few streams and a few
/// calls; beyond this one connection cannot take the node's whole capacity).
const REQUESTS_PER_CONNECTION_MAX: usize = 64;
/// HTTP/2 streams one connection may open at once.
const STREAMS_PER_CONNECTION_MAX: u32 = 128;
/// After the shutdown signal (SIGTERM, Ctrl-C), calls in flight get this long to finish; then
/// the node stops with whatever is still open. Long-lived streams (the peers' Raft streams,
/// workers' assignment streams, `logs -f`) never finish on their own, and waiting for them
/// left a coordinator deaf to SIGTERM (systemd's stop and `flotilla down` ended in SIGKILL).
/// Nothing is lost by stopping: every entry is durable before it is acknowledged, and clients
/// retry on another node (submissions by request id).
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub id: u64,
    pub listen: SocketAddr,
    /// Every node's id and API/peer address, this one included.
    pub peers: BTreeMap<u64, String>,
    pub data_dir: PathBuf,
    pub cluster_id: String,
    /// The admin API token (every API call).
    pub api_token: String,
    /// Optional API tokens of the submit role (submit and cancel, read) and the read-only one.
    pub submit_token: Option<String>,
    pub read_token: Option<String>,
    pub peer_token: String,
    /// Token workers present to register; `None` refuses every worker.
    pub join_token: Option<String>,
    /// The cluster store's URI (`file:///abs/dir` or `s3://bucket/prefix`): checkpoints, job
    /// logs, model artifacts and inference staging. Every coordinator of a cluster and every
    /// worker must reach the same one: on several machines, an `s3://` store.
    pub store_uri: String,
    /// The state machine is snapshotted (and the log compacted) every this many entries.
    pub snapshot_every_entries: u64,
    /// Finished jobs and lost workers are forgotten after this long (`ForgetFinished`).
    pub keep_finished: std::time::Duration,
    /// Folders users' `file://` paths may name (training data, inference input and output);
    /// none: no local paths from users (see `confine`).
    pub data_roots: Vec<PathBuf>,
    /// Every node's Raft address (same ids as `peers`): the Raft service is served only on
    /// this node's port (at the `listen` address) and peers are reached there, so a firewall can
    /// keep it between coordinators. `None`: the API port serves Raft too.
    pub raft_peers: Option<BTreeMap<u64, String>>,
    /// TLS on the API, worker and peer port (`None`: plaintext, tokens in cleartext).
    pub tls: Option<flotilla_proto::tls::ServerTls>,
    /// Replace interrupted or lost workers that the local provider launched (`flotilla up`).
    pub local_workers: Option<LocalWorkers>,
    /// Buy and release capacity with a provider (EC2, simulated): the autoscaling loop.
    pub capacity: Option<Capacity>,
    /// Serve Prometheus metrics (`GET /metrics`) here; `None`: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Hand a lone noticed member of a built-in job over live: its replacement takes the state
    /// and every step's update while the gang trains on, and takes the rank without a stop
    /// (falls back to the stop-and-regroup handover; see `scheduling::HandoverPolicy`).
    pub live_handover: bool,
    /// A waiting job stops running jobs of lower priority that hold the workers it needs
    /// (`flotilla_core::scheduler::schedule_preempting`); `false`: priority orders the queue.
    pub priority_preemption: bool,
}

/// A provider and the autoscaler's settings.
#[derive(Clone)]
pub struct Capacity {
    pub provider: std::sync::Arc<dyn crate::provider::DynProvider>,
    pub config: crate::autoscaling::AutoscaleConfig,
}

impl std::fmt::Debug for Capacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capacity").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The local provider's settings, for replacement workers.
#[derive(Debug, Clone)]
pub struct LocalWorkers {
    /// The cluster folder (instance records, logs).
    pub home: PathBuf,
    /// Random spot interruptions of the replacements (as `up --spot-interruptions-per-hour`).
    pub interruptions_per_hour: f64,
    pub seed: u64,
    /// How long a replacement takes to start (a cloud instance's boot; 0 locally).
    pub boot_delay: std::time::Duration,
}

fn replacer(config: &CoordinatorConfig) -> Result<Option<std::sync::Arc<crate::replace::Replacer>>, CoordinatorError> {
    let (Some(local), Some(join_token)) = (&config.local_workers, &config.join_token) else { return Ok(None) };
    let exe = std::env::current_exe()
        .map_err(|e| CoordinatorError::Config(format!("cannot find the flotilla executable: {e}")))?;
    let addresses: Vec<&str> = config.peers.values().map(String::as_str).collect();
    let env = [
        ("FLOTILLA_COORDINATOR", addresses.join(",")),
        ("FLOTILLA_JOIN_TOKEN", join_token.clone()),
        ("FLOTILLA_HOME", local.home.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let provider = crate::provider::local::LocalProvider {
        home: local.home.clone(),
        exe,
        env,
        interruptions_per_hour: local.interruptions_per_hour,
        seed: local.seed,
    };
    let tags = BTreeMap::from([(crate::provider::CLUSTER_TAG.to_string(), config.cluster_id.clone())]);
    Ok(Some(std::sync::Arc::new(crate::replace::Replacer {
        provider,
        tags,
        boot_delay: local.boot_delay,
        launching: Default::default(),
    })))
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("cluster store: {0} (set --store to a URI every coordinator and worker can write)")]
    Store(#[from] flotilla_store::StoreError),
    #[error("data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("serving on {addr}: {source}")]
    Serve { addr: SocketAddr, source: tonic::transport::Error },
}

impl CoordinatorConfig {
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        raft_port(self)?;
        if self.id == 0 {
            return Err(CoordinatorError::Config("--id must be 1 or more (raft reserves 0)".into()));
        }
        if !self.peers.contains_key(&self.id) {
            return Err(CoordinatorError::Config(format!("--peers must include this node's id {}", self.id)));
        }
        if self.peers.len() > 1 {
            // The peer token guards the Raft log itself: a forged batch can crash or rewrite
            // every node, so it is its own secret, never a token that clients or workers hold.
            if self.peer_token.len() < PEER_TOKEN_LEN_MIN {
                return Err(CoordinatorError::Config(format!(
                    "--peer-token (or FLOTILLA_PEER_TOKEN) is required with {} coordinators: a secret of at least \
                     {PEER_TOKEN_LEN_MIN} characters that only the coordinators hold (e.g. `openssl rand -hex 16`)",
                    self.peers.len()
                )));
            }
        }
        // Each secret is its own: whoever holds a read-only token must not be able to submit,
        // a worker must not be able to use the API, and neither may write the Raft log.
        let secrets = [
            ("--token", Some(self.api_token.as_str())),
            ("--submit-token", self.submit_token.as_deref()),
            ("--read-token", self.read_token.as_deref()),
            ("--join-token", self.join_token.as_deref()),
            ("--peer-token", Some(self.peer_token.as_str()).filter(|t| !t.is_empty())),
        ];
        for (i, (a, first)) in secrets.iter().enumerate() {
            for (b, second) in &secrets[i + 1..] {
                if first.is_some() && first == second {
                    return Err(CoordinatorError::Config(format!(
                        "{a} and {b} are the same secret; each must differ (e.g. `openssl rand -hex 16` for each)"
                    )));
                }
            }
        }
        if self.peers.len().is_multiple_of(2) {
            tracing::warn!(
                nodes = self.peers.len(),
                "an even number of coordinators tolerates no more failures than one fewer"
            );
        }
        Ok(())
    }
}

/// This node's own Raft port, when Raft has addresses of its own.
fn raft_port(config: &CoordinatorConfig) -> Result<Option<u16>, CoordinatorError> {
    let Some(raft) = &config.raft_peers else { return Ok(None) };
    if raft.keys().ne(config.peers.keys()) {
        return Err(CoordinatorError::Config("--raft-peers must name exactly the nodes of --peers".into()));
    }
    let own = raft.get(&config.id).and_then(|addr| addr.rsplit_once(':')).and_then(|(_, port)| port.parse().ok());
    let port: u16 =
        own.ok_or_else(|| CoordinatorError::Config(format!("--raft-peers: no HOST:PORT for node {}", config.id)))?;
    if port == config.listen.port() {
        return Err(CoordinatorError::Config("--raft-peers: this node's Raft port must differ from --listen's".into()));
    }
    Ok(Some(port))
}

/// A gRPC server with the per-connection limits and, when configured, TLS: every client is
/// asked for a certificate and none must give one (API clients have none); the Raft service
/// and the worker calls require theirs.
fn server_builder(config: &CoordinatorConfig) -> Result<tonic::transport::Server, CoordinatorError> {
    let builder = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(REQUESTS_PER_CONNECTION_MAX)
        .max_concurrent_streams(STREAMS_PER_CONNECTION_MAX);
    let Some(tls) = &config.tls else { return Ok(builder) };
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    flotilla_proto::tls::install_crypto_provider();
    let tls_config = ServerTlsConfig::new()
        .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
        .client_ca_root(Certificate::from_pem(&tls.ca_pem))
        .client_auth_optional(true);
    builder.tls_config(tls_config).map_err(|e| CoordinatorError::Config(format!("TLS settings: {e}")))
}

/// Runs the node until `shutdown` resolves or a fatal error occurs.
pub async fn run(
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    config.validate()?;
    // The store is checked before anything starts: a missing bucket or credentials is one clear
    // error now, not a job that fails at its first checkpoint. A restart (the node holds Raft
    // state) does not wait for it: the log needs no store, and the cluster may need this node
    // for its quorum while the store is out (checkpoints, logs and models wait for it).
    let store = flotilla_store::open(&config.store_uri)?;
    if RaftStore::exists(&config.data_dir) {
        let store = store.clone();
        tokio::spawn(async move {
            match flotilla_store::probe(&store, flotilla_store::Access::Write).await {
                Ok(()) => tracing::info!(store = %store.uri(), "cluster store is writable"),
                Err(e) => tracing::warn!(
                    error = %e,
                    "the cluster store cannot be used now; this node started anyway (it holds Raft state, which needs \
                     no store); checkpoints, job logs and models wait for the store"
                ),
            }
        });
    } else {
        flotilla_store::probe(&store, flotilla_store::Access::Write).await?;
        tracing::info!(store = %store.uri(), "cluster store is writable");
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| CoordinatorError::DataDir { path: config.data_dir.display().to_string(), source })?;
    let log = RaftStore::open(&config.data_dir).map_err(ReplicaError::from)?;
    let voters: Vec<u64> = config.peers.keys().copied().collect();
    let replica_config =
        ReplicaConfig { id: config.id, voters, snapshot_every_entries: config.snapshot_every_entries.max(1) };
    let replica = Replica::open(&replica_config, log)?;
    let incarnation = now_unix_ms() ^ (u64::from(std::process::id()) << 40);
    let (handle, task) = node::channel(replica, config.peers.clone(), incarnation);
    let others: BTreeMap<u64, String> =
        config.peers.iter().filter(|(id, _)| **id != config.id).map(|(k, v)| (*k, v.clone())).collect();
    let peer_tls = config.tls.as_ref().map(flotilla_proto::tls::ServerTls::as_client);
    // With Raft addresses of their own, peers are reached there.
    let raft_addresses: BTreeMap<u64, String> = match &config.raft_peers {
        Some(raft) => raft.iter().filter(|(id, _)| **id != config.id).map(|(k, v)| (*k, v.clone())).collect(),
        None => others.clone(),
    };
    let transport = PeerTransport::start(
        handle.clone(),
        config.cluster_id.clone(),
        &raft_addresses,
        &config.peer_token,
        peer_tls.as_ref(),
    )
    .map_err(CoordinatorError::Config)?;
    let node_task = tokio::spawn(task.run(transport));

    let data_roots =
        std::sync::Arc::new(crate::confine::canonical_roots(&config.data_roots).map_err(CoordinatorError::Config)?);
    let tokens = flotilla_proto::auth::ApiTokens {
        admin: config.api_token.clone(),
        submit: config.submit_token.clone(),
        read: config.read_token.clone(),
    };
    let progress = std::sync::Arc::new(crate::progress::Progress::default());
    let jobs = JobServiceServer::new(JobApi {
        node: handle.clone(),
        tokens: tokens.clone(),
        progress: progress.clone(),
        store: store.clone(),
        data_roots: data_roots.clone(),
    })
    .max_decoding_message_size(API_MESSAGE_BYTES_MAX)
    .max_encoding_message_size(API_MESSAGE_BYTES_MAX);
    if let Some(address) = config.metrics_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| CoordinatorError::Config(format!("--metrics-addr {address}: cannot listen: {e}")))?;
        tracing::info!(address = %address, "metrics at http://{address}/metrics");
        let web = crate::metrics::Web {
            node: handle.clone(),
            progress: progress.clone(),
            store: store.clone(),
            tokens: tokens.clone(),
        };
        tokio::spawn(crate::metrics::serve(listener, std::sync::Arc::new(web)));
    }
    tokio::spawn(crate::metrics::watch_leader(handle.clone(), handle.metrics.clone()));
    let leases = std::sync::Arc::new(Leases::default());
    let replacer = replacer(&config)?;
    tokio::spawn(leases::expire_loop(handle.clone(), leases.clone(), progress.clone(), replacer.clone()));
    // Replacements for noticed workers come from the autoscaler or the local provider's
    // replacer; without either, a handover falls back at once.
    let policy = crate::scheduling::HandoverPolicy {
        replacements_expected: config.capacity.is_some() || replacer.is_some(),
        live: config.live_handover,
    };
    let capacity_notes = crate::autoscaling::CapacityNotes::default();
    tokio::spawn(crate::scheduling::schedule_loop(
        handle.clone(),
        leases.clone(),
        policy,
        config.priority_preemption,
        capacity_notes.clone(),
    ));
    tokio::spawn(crate::retention::retention_loop(handle.clone(), store.clone()));
    tokio::spawn(crate::retention::records_loop(handle.clone(), config.keep_finished));
    tokio::spawn(crate::inference::finalize_loop(handle.clone(), store.clone()));
    if let Some(capacity) = config.capacity.clone() {
        tokio::spawn(crate::autoscaling::autoscale_loop(
            handle.clone(),
            progress.clone(),
            capacity.provider,
            capacity.config,
            capacity_notes,
        ));
    }
    let cluster = ClusterServiceServer::new(ClusterApi {
        node: handle.clone(),
        tokens: tokens.clone(),
        join_token: config.join_token.clone(),
        tls: config.tls.is_some(),
        gang_key: crate::api::cluster::gang_key(&config.peer_token),
        leases,
        progress: progress.clone(),
        store: store.clone(),
        replacer,
    })
    .max_decoding_message_size(API_MESSAGE_BYTES_MAX)
    .max_encoding_message_size(API_MESSAGE_BYTES_MAX);
    let registry = RegistryServiceServer::new(crate::api::registry::RegistryApi {
        node: handle.clone(),
        tokens: tokens.clone(),
        store: store.clone(),
    })
    .max_decoding_message_size(API_MESSAGE_BYTES_MAX)
    .max_encoding_message_size(API_MESSAGE_BYTES_MAX);
    let inference = InferenceServiceServer::new(crate::api::inference::InferenceApi {
        node: handle.clone(),
        tokens: tokens.clone(),
        data_roots,
        join_token: config.join_token.clone(),
        tls: config.tls.is_some(),
    })
    .max_decoding_message_size(API_MESSAGE_BYTES_MAX)
    .max_encoding_message_size(API_MESSAGE_BYTES_MAX);
    let raft = RaftServiceServer::new(RaftApi {
        node: handle.clone(),
        cluster_id: config.cluster_id.clone(),
        peer_token: config.peer_token.clone(),
        peers: others.keys().copied().collect::<BTreeSet<u64>>(),
        tls: config.tls.is_some(),
    })
    .max_decoding_message_size(RAFT_MESSAGE_BYTES_MAX);
    tracing::info!(id = config.id, listen = %config.listen, peers = ?config.peers, "coordinator starting");
    if config.tls.is_none() {
        tracing::warn!("serving without TLS: tokens travel in cleartext (run on a private network)");
    }
    // One shutdown for both servers.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let grace_over = {
        let stopped = stopped.clone();
        async move {
            until_stopped(stopped).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
            tracing::info!(grace = ?SHUTDOWN_GRACE, "stopping: the streams still open are cut");
        }
    };
    let api =
        server_builder(&config)?.add_service(jobs).add_service(cluster).add_service(registry).add_service(inference);
    let (api, peer_server) = match raft_port(&config)? {
        None => (api.add_service(raft), None),
        Some(port) => {
            let addr = SocketAddr::new(config.listen.ip(), port);
            let served =
                server_builder(&config)?.add_service(raft).serve_with_shutdown(addr, until_stopped(stopped.clone()));
            (api, Some((addr, served)))
        }
    };
    let api = api.serve_with_shutdown(config.listen, until_stopped(stopped));
    let peers = async move {
        match peer_server {
            Some((addr, served)) => served.await.map_err(|source| CoordinatorError::Serve { addr, source }),
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        served = api => served.map_err(|source| CoordinatorError::Serve { addr: config.listen, source }),
        served = peers => served,
        finished = node_task => match finished {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(join) => Err(CoordinatorError::Config(format!("node task failed: {join}"))),
        },
        () = grace_over => Ok(()),
    }
}
