//! `flotilla coordinator`: runs one coordinator node in the foreground.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use flotilla_coordinator::server::{self, CoordinatorConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// This node's id (1 or more), one of the ids in --peers.
    #[arg(long)]
    pub id: u64,
    /// Address to serve the API and peer traffic on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Every node, this one included: ID=HOST:PORT,ID=HOST:PORT,...
    #[arg(long)]
    pub peers: String,
    /// Where this node keeps its Raft log.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Cluster name; nodes refuse peer traffic from another cluster.
    #[arg(long, default_value = "flotilla")]
    pub cluster_id: String,
    /// Bearer token every API call must carry.
    #[arg(long, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Token workers present to register (without it, no worker is accepted).
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// The cluster's object store folder (job logs), the same for every coordinator and worker
    /// (default: <data-dir>/store, fine for a single node).
    #[arg(long)]
    pub store_dir: Option<PathBuf>,
    /// Token coordinators present to each other (default: the API token).
    #[arg(long, env = "FLOTILLA_PEER_TOKEN", hide_env_values = true)]
    pub peer_token: Option<String>,
    /// Replace interrupted or lost workers that the local provider launched in this cluster
    /// folder (`flotilla up` sets it).
    #[arg(long)]
    pub local_workers_home: Option<PathBuf>,
    /// Random spot interruptions of replacement workers, per worker-hour (with --local-workers-home).
    #[arg(long, default_value_t = 0.0)]
    pub local_interruptions_per_hour: f64,
    /// Seed of those interruptions.
    #[arg(long, default_value_t = 0)]
    pub local_seed: u64,
}

/// Peers given at most (Raft clusters beyond 7 voters only add latency).
const PEERS_MAX: usize = 7;

pub fn parse_peers(text: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut peers = BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, address) = part.split_once('=').with_context(|| format!("--peers: `{part}` is not ID=HOST:PORT"))?;
        let id: u64 = id.trim().parse().with_context(|| format!("--peers: `{id}` is not a node id"))?;
        if id == 0 {
            bail!("--peers: node ids start at 1 (raft reserves 0)");
        }
        let address = flotilla_proto::client::parse_addresses(address)
            .map_err(|e| anyhow::anyhow!("--peers: {}", e.message))?
            .remove(0);
        if peers.insert(id, address).is_some() {
            bail!("--peers: node {id} is listed twice");
        }
    }
    if peers.is_empty() || peers.len() > PEERS_MAX {
        bail!("--peers: give 1 to {PEERS_MAX} nodes, e.g. 1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103");
    }
    Ok(peers)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let peers = parse_peers(&args.peers)?;
    let config = CoordinatorConfig {
        id: args.id,
        listen: args.listen,
        peers,
        data_dir: args.data_dir.clone(),
        cluster_id: args.cluster_id,
        peer_token: args.peer_token.unwrap_or_else(|| args.token.clone()),
        join_token: args.join_token,
        store_dir: match args.store_dir {
            Some(dir) => std::path::absolute(dir).context("resolving --store-dir")?,
            None => std::path::absolute(args.data_dir.join("store")).context("resolving the data dir")?,
        },
        api_token: args.token,
        local_workers: match args.local_workers_home {
            Some(home) => Some(server::LocalWorkers {
                home: std::path::absolute(home).context("resolving --local-workers-home")?,
                interruptions_per_hour: args.local_interruptions_per_hour,
                seed: args.local_seed,
            }),
            None => None,
        },
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown = async {
            super::shutdown_signal().await;
            tracing::info!("shutting down");
        };
        server::run(config, shutdown).await.map_err(anyhow::Error::from)
    })
}
