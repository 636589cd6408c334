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
    /// The admin API token: every API call may carry it.
    #[arg(long, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    pub token: String,
    /// A token of the submit role: submit and cancel training and inference jobs, and read.
    #[arg(long, env = "FLOTILLA_SUBMIT_TOKEN", hide_env_values = true)]
    pub submit_token: Option<String>,
    /// A read-only token: jobs, logs, workers, instances, models, inference jobs.
    #[arg(long, env = "FLOTILLA_READ_TOKEN", hide_env_values = true)]
    pub read_token: Option<String>,
    /// Token workers present to register (without it, no worker is accepted).
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// The cluster store: checkpoints, job logs, model artifacts, inference staging. A URI
    /// every coordinator and worker can write: `s3://bucket/prefix` across machines (settings
    /// from the standard AWS environment: AWS_REGION, credentials, AWS_ENDPOINT_URL), or a
    /// local folder (`/abs/dir`, `file:///abs/dir`; default <data-dir>/store, fine on one
    /// machine). Checked at start-up: a store that cannot be written stops the node with the cause.
    #[arg(long, env = "FLOTILLA_STORE")]
    pub store: Option<String>,
    /// Finished jobs and inference jobs, and lost workers, are forgotten after this many hours
    /// (their objects stay in the store). At the job limit the oldest finished job makes room
    /// for a new submission whatever its age.
    #[arg(long, default_value_t = 168)]
    pub keep_finished_h: u64,
    /// Snapshot the state (and compact the log) every this many entries (tests lower it).
    #[arg(long, env = "FLOTILLA_SNAPSHOT_EVERY_ENTRIES", default_value_t = flotilla_coordinator::raft::replica::SNAPSHOT_EVERY_ENTRIES, hide = true)]
    pub snapshot_every_entries: u64,
    /// Every node's Raft address, ID=HOST:PORT,... (the same ids as --peers): this node serves
    /// the Raft service only on its own port (at the --listen address), so a firewall can keep
    /// it between coordinators. Default: the API port serves Raft too.
    #[arg(long, env = "FLOTILLA_RAFT_PEERS")]
    pub raft_peers: Option<String>,
    /// A folder users' `file://` paths may name (training data, inference input and output),
    /// repeatable; symlinks are resolved before the check. None: users name only s3:// URIs.
    #[arg(long = "data-root", env = "FLOTILLA_DATA_ROOTS", value_delimiter = ',')]
    pub data_roots: Vec<PathBuf>,
    /// TLS: this coordinator's certificate (PEM; `flotilla certs coordinator`), its key, and
    /// the cluster CA that signed it and every peer's and worker's. All three or none; without
    /// them the node serves plaintext (tokens in cleartext: a private network only).
    #[arg(long, env = "FLOTILLA_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "FLOTILLA_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    #[arg(long, env = "FLOTILLA_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Token coordinators present to each other: required with 2 or more coordinators, at
    /// least 16 characters, different from the API and join tokens (`up` generates one).
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
    /// Seconds a replacement worker takes to start, as a cloud instance's boot (with
    /// --local-workers-home; for demos and benchmarks of the notice path).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub local_boot_delay_s: u64,
    #[command(flatten)]
    pub capacity: CapacityArgs,
    /// Serve Prometheus metrics (`GET /metrics`, OpenMetrics text) on HOST:PORT. Unauthenticated
    /// and read-only, like any exporter: bind an address only the monitoring system reaches.
    #[arg(long, env = "FLOTILLA_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Hand a lone noticed member of a built-in job over live (issue 25): its replacement takes
    /// the state and every step's update from it while the gang trains on, and takes its rank
    /// without a stop; falls back to the checkpoint-and-regroup handover if the swap does not
    /// happen in time. `false`: every handover stops the gang and regroups.
    #[arg(long, env = "FLOTILLA_LIVE_HANDOVER", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set, value_name = "BOOL")]
    pub live_handover: bool,
    /// Let a waiting job stop running jobs of strictly lower `priority` whose workers, with
    /// the free ones, make its gang: they checkpoint at the next step and wait, as after a
    /// spot notice, so nothing is lost. `false`: priority only orders the queue.
    #[arg(long, env = "FLOTILLA_PRIORITY_PREEMPTION", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set, value_name = "BOOL")]
    pub priority_preemption: bool,
    /// Check the configuration (flags, tokens, TLS files, data roots, store URI, the market and
    /// the EC2 settings) and exit, without starting, binding or contacting anything.
    #[arg(long)]
    pub check_config: bool,
}

/// Where the leader buys workers for waiting gangs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    /// None: workers join by themselves (`flotilla worker`, `flotilla up --workers`).
    None,
    /// Amazon EC2 (spot fleets with on-demand fallback); credentials and region from the
    /// standard AWS configuration, AWS_ENDPOINT_URL honoured.
    Ec2,
    /// A simulated cloud on the --market trace (to try the autoscaler without one).
    Sim,
}

#[derive(Debug, clap::Args)]
pub struct CapacityArgs {
    /// Capacity provider of the autoscaler.
    #[arg(long, value_enum, default_value = "none")]
    pub provider: ProviderKind,
    /// Prices, interruption rates and spot capacity per pool (the trace format of
    /// examples/traces/README.md; one row per pool at hour 0 is a price list). Required with
    /// --provider.
    #[arg(long)]
    pub market: Option<PathBuf>,
    /// Instances the cluster holds at most.
    #[arg(long, default_value_t = 16)]
    pub max_instances: u32,
    /// What the cluster's instances may cost together, USD per hour.
    #[arg(long, default_value_t = 50.0)]
    pub max_usd_per_hour: f64,
    /// An idle instance is released after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub idle_cooldown_s: u64,
    /// EC2: the AMI workers boot (with `flotilla` installed).
    #[arg(long)]
    pub ec2_image_id: Option<String>,
    /// EC2: ZONE=SUBNET, repeatable (default: the default VPC's subnets).
    #[arg(long)]
    pub ec2_subnet: Vec<String>,
    /// EC2: security group ids for workers, repeatable.
    #[arg(long)]
    pub ec2_security_group: Vec<String>,
    /// EC2: an SSH key pair name for workers.
    #[arg(long)]
    pub ec2_key_name: Option<String>,
    /// EC2 with TLS: the worker certificate and key (`flotilla certs worker`) the instances'
    /// boot script installs, with this coordinator's --tls-ca.
    #[arg(long)]
    pub ec2_worker_tls_cert: Option<PathBuf>,
    #[arg(long)]
    pub ec2_worker_tls_key: Option<PathBuf>,
}

/// Instances the autoscaler may hold at most, whatever the flag says.
const MAX_INSTANCES_LIMIT: u32 = 10_000;

fn capacity(
    args: &CapacityArgs,
    cluster_id: &str,
    peers: &BTreeMap<u64, String>,
    join_token: Option<&str>,
    tls: Option<&flotilla_proto::tls::ServerTls>,
    runtime: &tokio::runtime::Runtime,
    connect: bool,
) -> anyhow::Result<Option<server::Capacity>> {
    use flotilla_coordinator::provider::DynProvider;
    if args.provider == ProviderKind::None {
        return Ok(None);
    }
    let market_path = args.market.as_ref().context("--market is required with --provider (prices per pool)")?;
    let text = std::fs::read_to_string(market_path).with_context(|| format!("reading {}", market_path.display()))?;
    let mut market =
        flotilla_core::market::Trace::parse(&text).with_context(|| format!("--market {}", market_path.display()))?;
    // With subnets named per zone, a zone without one can take no instance: its pools are left
    // out (Terraform names the coordinators' zones; a price list may cover more).
    let subnets = if args.provider == ProviderKind::Ec2 { ec2_subnets(&args.ec2_subnet)? } else { BTreeMap::new() };
    if !subnets.is_empty() {
        let zones: Vec<String> = subnets.keys().cloned().collect();
        keep_launchable_zones(&mut market, &zones, &NAMED_SUBNETS, !connect)?;
    }
    if args.max_instances == 0 || args.max_instances > MAX_INSTANCES_LIMIT {
        bail!("--max-instances must be 1 to {MAX_INSTANCES_LIMIT}, got {}", args.max_instances);
    }
    if !args.max_usd_per_hour.is_finite() || args.max_usd_per_hour <= 0.0 {
        bail!("--max-usd-per-hour must be a positive number of USD, got {}", args.max_usd_per_hour);
    }
    let provider: std::sync::Arc<dyn DynProvider> = match args.provider {
        ProviderKind::None => return Ok(None),
        ProviderKind::Sim => std::sync::Arc::new(flotilla_coordinator::provider::sim::SimProvider::new(market.clone())),
        ProviderKind::Ec2 => match ec2_provider(args, cluster_id, peers, join_token, tls, runtime, connect)? {
            Some((provider, default_zones)) => {
                if let Some(zones) = default_zones {
                    keep_launchable_zones(&mut market, &zones, &DEFAULT_SUBNETS, false)?;
                }
                provider
            }
            None => return Ok(None), // checked, not connected
        },
    };
    let config = flotilla_coordinator::autoscaling::AutoscaleConfig {
        limits: flotilla_core::autoscale::Limits {
            max_instances: args.max_instances,
            max_usd_per_hour: args.max_usd_per_hour,
            idle_cooldown_ms: args.idle_cooldown_s.saturating_mul(1000),
            ..Default::default()
        },
        market,
        cluster_tags: BTreeMap::from([(
            flotilla_coordinator::provider::CLUSTER_TAG.to_string(),
            cluster_id.to_string(),
        )]),
        cluster_id: cluster_id.to_string(),
        market_start_unix_ms: flotilla_coordinator::raft::node::now_unix_ms(),
    };
    Ok(Some(server::Capacity { provider, config }))
}

/// How the zones instances can launch in are known, for [`keep_launchable_zones`]'s words.
struct ZonesKnown {
    /// "that an --ec2-subnet names": the zones the market prices none of.
    none: &'static str,
    /// "that no --ec2-subnet names": the zones left out.
    left_out: &'static str,
    /// What to do when none is left.
    fix: &'static str,
}

const NAMED_SUBNETS: ZonesKnown = ZonesKnown {
    none: "that an --ec2-subnet names",
    left_out: "that no --ec2-subnet names",
    fix: "name a subnet in a zone the market prices",
};

const DEFAULT_SUBNETS: ZonesKnown = ZonesKnown {
    none: "where the region's default VPC has a subnet",
    left_out: "where the region's default VPC has no subnet",
    fix: "name subnets with --ec2-subnet ZONE=SUBNET",
};

/// Leaves out the market's pools in zones no instance can launch in (`zones`: the ones it
/// can), with a warning naming them (also printed by --check-config: `print`); a market left
/// with no pool is refused, since every launch would fail.
fn keep_launchable_zones(
    market: &mut flotilla_core::market::Trace,
    zones: &[String],
    known: &ZonesKnown,
    print: bool,
) -> anyhow::Result<()> {
    let dropped = market.retain_zones(|zone| zones.iter().any(|z| z == zone));
    if market.pools().next().is_none() {
        bail!("--market prices no zone {} ({}): every launch would fail; {}", known.none, zones.join(", "), known.fix);
    }
    if !dropped.is_empty() {
        let warning =
            format!("--market prices zone(s) {} {}: their pools are left out", dropped.join(", "), known.left_out);
        tracing::warn!("{warning}");
        if print {
            println!("warning: {warning}");
        }
    }
    Ok(())
}

/// The EC2 provider, and the zones its default subnets are in when no --ec2-subnet names any
/// (`None`: named, or the default VPC could not be read: then a launch in a zone without a
/// subnet fails with the reason, and its pool backs off).
type Ec2Capacity = (std::sync::Arc<dyn flotilla_coordinator::provider::DynProvider>, Option<Vec<String>>);

#[cfg(feature = "ec2")]
fn ec2_provider(
    args: &CapacityArgs,
    cluster_id: &str,
    peers: &BTreeMap<u64, String>,
    join_token: Option<&str>,
    tls: Option<&flotilla_proto::tls::ServerTls>,
    runtime: &tokio::runtime::Runtime,
    connect: bool,
) -> anyhow::Result<Option<Ec2Capacity>> {
    let image_id = args.ec2_image_id.clone().context("--ec2-image-id is required with --provider ec2")?;
    let join_token = join_token.context("--provider ec2 needs a join token for the workers it starts")?;
    let subnets = ec2_subnets(&args.ec2_subnet)?;
    let coordinators: Vec<&str> = peers.values().map(String::as_str).collect();
    let worker_tls = match (tls, &args.ec2_worker_tls_cert, &args.ec2_worker_tls_key) {
        (Some(tls), Some(cert), Some(key)) => Some(flotilla_ec2::WorkerTls {
            ca_pem: tls.ca_pem.clone(),
            cert_pem: flotilla_proto::tls::read_pem(cert, "--ec2-worker-tls-cert")?,
            key_pem: flotilla_proto::tls::read_pem(key, "--ec2-worker-tls-key")?,
        }),
        (Some(_), _, _) => anyhow::bail!(
            "this coordinator runs TLS, so the workers it starts need a certificate: --ec2-worker-tls-cert and \
             --ec2-worker-tls-key (`flotilla certs worker`)"
        ),
        (None, None, None) => None,
        (None, _, _) => {
            anyhow::bail!("--ec2-worker-tls-cert/--ec2-worker-tls-key need TLS on the coordinator (--tls-*)")
        }
    };
    let config = flotilla_ec2::Ec2Config {
        cluster_id: cluster_id.to_string(),
        image_id,
        subnets,
        security_group_ids: args.ec2_security_group.clone(),
        key_name: args.ec2_key_name.clone(),
        user_data: flotilla_ec2::worker_user_data(&coordinators.join(","), join_token, worker_tls.as_ref()),
    };
    if !connect {
        return Ok(None);
    }
    let named = !config.subnets.is_empty();
    let provider = runtime.block_on(flotilla_ec2::Ec2Provider::connect(config, flotilla_ec2::Connection::default()))?;
    let default_zones = if named {
        None
    } else {
        match runtime.block_on(provider.subnet_zones()) {
            Ok(zones) => Some(zones),
            Err(e) => {
                tracing::warn!(error = %e, "the default VPC's subnets could not be read: the market's zones are not checked");
                None
            }
        }
    };
    Ok(Some((std::sync::Arc::new(provider), default_zones)))
}

/// `--ec2-subnet ZONE=SUBNET` flags as zone -> subnet.
fn ec2_subnets(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|pair| {
            let (zone, subnet) =
                pair.split_once('=').with_context(|| format!("--ec2-subnet `{pair}` is not ZONE=SUBNET"))?;
            Ok((zone.trim().to_string(), subnet.trim().to_string()))
        })
        .collect()
}

#[cfg(not(feature = "ec2"))]
fn ec2_provider(
    _: &CapacityArgs,
    _: &str,
    _: &BTreeMap<u64, String>,
    _: Option<&str>,
    _: Option<&flotilla_proto::tls::ServerTls>,
    _: &tokio::runtime::Runtime,
    _: bool,
) -> anyhow::Result<Option<Ec2Capacity>> {
    bail!("this flotilla was built without the EC2 provider; rebuild with `cargo build --release --features ec2`")
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

/// `--check-config`: what the node would check at start, short of binding its port and
/// opening its log and store.
fn check_config(config: &CoordinatorConfig, capacity: &CapacityArgs) -> anyhow::Result<()> {
    config.validate()?;
    flotilla_coordinator::confine::canonical_roots(&config.data_roots).map_err(|e| anyhow::anyhow!(e))?;
    // The store's own parsing (it opens no connection; the node probes the store at start).
    flotilla_store::open(&config.store_uri).with_context(|| format!("--store {}", config.store_uri))?;
    if config.api_token.is_empty() {
        bail!("--token (FLOTILLA_TOKEN) is empty");
    }
    println!(
        "configuration OK: node {} of {} in cluster {}, store {}, TLS {}, provider {:?}",
        config.id,
        config.peers.len(),
        config.cluster_id,
        config.store_uri,
        if config.tls.is_some() { "on" } else { "off" },
        capacity.provider
    );
    Ok(())
}

/// `--store` as given, with a relative local path made absolute (a URI is checked when the
/// node opens it).
pub fn store_uri(text: &str) -> anyhow::Result<String> {
    if text.contains("://") || text.starts_with('/') {
        return Ok(text.to_string());
    }
    Ok(std::path::absolute(text).context("resolving --store")?.display().to_string())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let peers = parse_peers(&args.peers)?;
    // A single node has no peers: a random token nobody holds (its Raft service takes no
    // messages anyway). Several nodes need the operator's (checked when the node starts).
    let peer_token = match args.peer_token {
        Some(token) => token,
        None if peers.len() == 1 => crate::cluster_file::random_hex(16)?,
        None => String::new(),
    };
    let config = CoordinatorConfig {
        id: args.id,
        listen: args.listen,
        peers,
        data_dir: args.data_dir.clone(),
        cluster_id: args.cluster_id,
        peer_token,
        join_token: args.join_token,
        store_uri: match args.store {
            Some(uri) => store_uri(&uri)?,
            None => std::path::absolute(args.data_dir.join("store"))
                .context("resolving the data dir")?
                .display()
                .to_string(),
        },
        api_token: args.token,
        submit_token: args.submit_token,
        read_token: args.read_token,
        data_roots: args.data_roots,
        raft_peers: args.raft_peers.as_deref().map(parse_peers).transpose()?,
        keep_finished: std::time::Duration::from_secs(args.keep_finished_h.saturating_mul(3600)),
        snapshot_every_entries: args.snapshot_every_entries,
        tls: match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(flotilla_proto::tls::ServerTls::load(cert, key, ca)?),
            (None, None, None) => None,
            _ => anyhow::bail!("TLS needs all three of --tls-cert, --tls-key and --tls-ca (or none)"),
        },
        local_workers: match args.local_workers_home {
            Some(home) => Some(server::LocalWorkers {
                home: std::path::absolute(home).context("resolving --local-workers-home")?,
                interruptions_per_hour: args.local_interruptions_per_hour,
                seed: args.local_seed,
                boot_delay: std::time::Duration::from_secs(args.local_boot_delay_s),
            }),
            None => None,
        },
        capacity: None,
        metrics_listen: args.metrics_addr,
        live_handover: args.live_handover,
        priority_preemption: args.priority_preemption,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let connect = !args.check_config;
    let config = CoordinatorConfig {
        capacity: capacity(
            &args.capacity,
            &config.cluster_id,
            &config.peers,
            config.join_token.as_deref(),
            config.tls.as_ref(),
            &runtime,
            connect,
        )?,
        ..config
    };
    if args.check_config {
        return check_config(&config, &args.capacity);
    }
    runtime.block_on(async move {
        let shutdown = async {
            super::shutdown_signal().await;
            tracing::info!("shutting down");
        };
        server::run(config, shutdown).await.map_err(anyhow::Error::from)
    })
}
