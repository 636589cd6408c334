//! `flotilla worker` (run an agent on this machine) and `flotilla workers` (list them).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use flotilla_proto::client::ApiClient;
use flotilla_proto::tls::ClientTls;
use tokio::sync::watch;

use flotilla_proto::v1::{self, ListWorkersRequest};
use flotilla_worker::agent;
use flotilla_worker::agent::work::AgentShared;
use serde_json::{Value, json};

use crate::cluster_file::{self, ClusterFile};
use crate::output::{OutputFormat, print_json};

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Token the cluster's coordinators accept from workers (default: the local cluster file's).
    #[arg(long, env = "FLOTILLA_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// This machine's instance id; default: the instance metadata's, else local-<pid>.
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Address the data port (gradient exchange with the other ranks of a gang) listens on;
    /// port 0: any free port. `0.0.0.0:PORT` listens on every interface and then needs an
    /// address to advertise (--advertise-addr, or the metadata's local-ipv4).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub data_addr: std::net::SocketAddr,
    /// The address other workers dial for this one's data port: IP or IP:PORT (default port:
    /// the bound one). Default: the --data-addr IP when it is a specific one, else the
    /// instance metadata's local-ipv4. Never 0.0.0.0.
    #[arg(long, env = "FLOTILLA_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// The instance metadata service (IMDSv2) to read this machine's identity and spot notices
    /// from: `host:port`, or `ec2` for EC2's own (169.254.169.254; the EC2 user data sets it).
    /// The local provider sets it for the workers it starts. Without it, the worker reports
    /// type and zone `local` and watches for SIGTERM only.
    #[arg(long, env = "FLOTILLA_IMDS_ENDPOINT")]
    pub imds_endpoint: Option<String>,
    /// GPUs to report; default: the count `nvidia-smi -L` lists (0 without it).
    #[arg(long)]
    pub gpus: Option<u32>,
    /// Serve this agent's Prometheus metrics at http://ADDR/metrics (steps, checkpoint stall and
    /// duration, notices). Off by default.
    #[arg(long, env = "FLOTILLA_AGENT_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// TLS: the cluster CA, and this worker's certificate and key (`flotilla certs worker`).
    /// Default: the local cluster file's TLS folder. Without them the worker speaks plaintext.
    #[arg(long, env = "FLOTILLA_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    #[arg(long, env = "FLOTILLA_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "FLOTILLA_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// The worker's TLS settings: the flags, else the local cluster's TLS folder.
fn worker_tls(args: &WorkerArgs, file: Option<&ClusterFile>) -> anyhow::Result<Option<ClientTls>> {
    if let Some(ca) = &args.tls_ca {
        return Ok(Some(ClientTls::load(ca, args.tls_cert.as_deref(), args.tls_key.as_deref())?));
    }
    if args.tls_cert.is_some() || args.tls_key.is_some() {
        anyhow::bail!("--tls-cert and --tls-key need --tls-ca (the cluster CA) too");
    }
    let Some(dir) = file.and_then(|f| f.tls_dir.as_ref()) else { return Ok(None) };
    let (cert, key) = (dir.join("worker.pem"), dir.join("worker-key.pem"));
    Ok(Some(ClientTls::load(&dir.join(super::certs::CA_FILE), Some(&cert), Some(&key))?))
}

/// How long the agent waits for the metadata endpoint at start-up.
const IMDS_IDENTITY_DEADLINE: Duration = Duration::from_secs(10);

/// The worker's identity: flags first, then the instance metadata, then local defaults.
async fn identity(
    args: &WorkerArgs,
    imds: Option<&str>,
    bound: std::net::SocketAddr,
) -> anyhow::Result<flotilla_worker::identity::WorkerIdentity> {
    use flotilla_worker::identity::{self, Metadata, WorkerIdentity};
    let metadata = match imds {
        Some(endpoint) => identity::from_metadata_within(endpoint, IMDS_IDENTITY_DEADLINE)
            .await
            .with_context(|| format!("reading this machine's identity from the metadata endpoint {endpoint}"))?,
        None => Metadata::default(),
    };
    let data_addr = identity::advertised_addr(bound, args.advertise_addr.as_deref(), metadata.local_ipv4)?;
    let gpus = match args.gpus {
        Some(gpus) => gpus,
        None => identity::gpu_count().await,
    };
    Ok(WorkerIdentity {
        instance_id: args
            .instance_id
            .clone()
            .or(metadata.instance_id)
            .unwrap_or_else(|| format!("local-{}", std::process::id())),
        instance_type: metadata.instance_type.unwrap_or_else(|| "local".into()),
        zone: metadata.zone.unwrap_or_else(|| "local".into()),
        gpus,
        data_addr,
    })
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Also the workers that are gone (Lost: fell silent; Left: stopped in order), which the
    /// cluster keeps until its --keep-finished-h; without it they are only counted.
    #[arg(long)]
    pub all: bool,
}

/// Gone for good: its lease expired, or it left.
pub(crate) fn gone(worker: &v1::WorkerInfo) -> bool {
    matches!(v1::WorkerState::try_from(worker.state), Ok(v1::WorkerState::Lost | v1::WorkerState::Left))
}

pub fn run_agent(args: WorkerArgs, coordinator: Option<&str>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let _context = runtime.enter();
    let home = cluster_file::home();
    let file = ClusterFile::load(&home)?;
    let addresses = coordinator
        .map(str::to_string)
        .or_else(|| std::env::var("FLOTILLA_COORDINATOR").ok().filter(|s| !s.is_empty()))
        .or_else(|| file.as_ref().map(ClusterFile::addresses))
        .context("no coordinator: pass --coordinator host:port or set FLOTILLA_COORDINATOR")?;
    let tls = worker_tls(&args, file.as_ref())?;
    let join_token = args
        .join_token
        .clone()
        .or_else(|| file.map(|f| f.join_token))
        .context("no join token: pass --join-token or set FLOTILLA_JOIN_TOKEN")?;
    let mut client = ApiClient::with_tls(&addresses, &join_token, tls)?;
    let listener = std::net::TcpListener::bind(args.data_addr)
        .with_context(|| format!("binding the data port --data-addr {}", args.data_addr))?;
    let bound = listener.local_addr().context("reading the data port")?;
    let imds = args.imds_endpoint.as_deref().filter(|e| !e.is_empty()).map(|e| match e {
        "ec2" => flotilla_worker::imds::EC2_ENDPOINT.to_string(),
        other => other.to_string(),
    });
    if let Some(address) = args.metrics_addr {
        let metrics = runtime
            .block_on(tokio::net::TcpListener::bind(address))
            .with_context(|| format!("binding the metrics port --metrics-addr {address}"))?;
        tracing::info!(address = %metrics.local_addr().unwrap_or(address), "agent metrics at /metrics");
        runtime.spawn(flotilla_worker::metrics::serve(metrics));
    }
    let identity = runtime.block_on(identity(&args, imds.as_deref(), bound))?;
    tracing::info!(?identity, "this worker");
    let capabilities = agent::local_capabilities(&identity);
    let (registered_tx, registered_rx) = tokio::sync::watch::channel(None);
    let shared = Arc::new(AgentShared::default());
    runtime.spawn(flotilla_worker::agent::work::follow(
        client.clone(),
        registered_rx.clone(),
        listener,
        shared.clone(),
    ));
    if let Some(endpoint) = imds {
        runtime.spawn(watch_interruptions(endpoint, client.clone(), registered_rx.clone(), shared.clone()));
    }
    let stopping = stop_when_told(client.clone(), registered_rx, shared.clone());
    runtime.block_on(async move {
        agent::run(&mut client, capabilities, stopping, &shared, |id| {
            tracing::info!(worker = id, "registered");
            let _ = registered_tx.send(Some(id.to_string()));
        })
        .await
    })?;
    tracing::info!("worker stopped");
    Ok(())
}

/// Longest wait for a running generation to checkpoint after SIGTERM (EC2 gives 2 minutes).
const CHECKPOINT_GRACE: Duration = Duration::from_secs(100);
/// How long an interruption report is retried before the worker stops on its own anyway.
const REPORT_DEADLINE: Duration = Duration::from_secs(5);

/// Resolves when the agent should exit: on SIGTERM (after the running generation checkpointed),
/// or when the coordinator drains this worker (after its notice) and it is idle.
async fn stop_when_told(client: ApiClient, registered: watch::Receiver<Option<String>>, shared: Arc<AgentShared>) {
    tokio::select! {
        _ = super::shutdown_signal() => {
            tracing::warn!("SIGTERM: stopping once the running work is checkpointed (training) or released (inference shards)");
            interrupt(client, registered, &shared, v1::InterruptionKind::Sigterm, None).await;
        }
        _ = shared.drained.notified() => {}
    }
    let mut busy = shared.busy.subscribe();
    let idle = busy.wait_for(|runs| *runs == 0);
    if tokio::time::timeout(CHECKPOINT_GRACE, idle).await.is_err() {
        tracing::warn!("the running generation did not stop within {CHECKPOINT_GRACE:?}; stopping anyway");
    }
}

/// Reports an interruption to the coordinator (so it drains this worker and knows why the
/// gang stops), then votes the running generation to a stop at the next step boundary: at
/// once, or, when the coordinator seeks a replacement while the gang trains on (a notice with
/// time to spare), at the time it answered unless its order to stop comes first. A rebalance
/// recommendation the coordinator answers with a handover without a deadline (`advisory`)
/// votes nothing: the gang trains on until the coordinator's order.
async fn interrupt(
    mut client: ApiClient,
    registered: watch::Receiver<Option<String>>,
    shared: &AgentShared,
    kind: v1::InterruptionKind,
    taken_at_unix_ms: Option<u64>,
) {
    let once =
        if kind == v1::InterruptionKind::Rebalance { &shared.rebalance_reported } else { &shared.notice_reported };
    if once.swap(true, Ordering::Relaxed) {
        return;
    }
    shared.noticed.store(true, Ordering::Relaxed);
    flotilla_worker::metrics::AGENT.notices.inc();
    if let Some(at) = taken_at_unix_ms {
        shared.taken_at_unix_ms.store(at, Ordering::Relaxed);
    }
    let worker_id = registered.borrow().clone().unwrap_or_default();
    let report = v1::InterruptionReport { worker_id, kind: kind.into(), action_at_unix_ms: taken_at_unix_ms };
    client.deadline = REPORT_DEADLINE;
    let sent = client
        .call_cluster(|mut c| {
            let report = report.clone();
            async move { c.report_interruption(report).await }
        })
        .await;
    let train_until_unix_ms = match sent {
        Ok(answer) if answer.advisory => {
            shared.handover_sought.store(true, Ordering::Release);
            tracing::warn!(
                "the coordinator seeks a replacement for this at-risk instance; training on until it is ready"
            );
            return;
        }
        Ok(answer) => answer.train_until_unix_ms,
        Err(e) => {
            tracing::warn!(error = %e, "the coordinator did not hear of the interruption; stopping the gang anyway");
            0
        }
    };
    let now = flotilla_coordinator::raft::node::now_unix_ms();
    if train_until_unix_ms > now {
        shared.handover_sought.store(true, Ordering::Release);
        let wait = Duration::from_millis(train_until_unix_ms - now);
        tracing::warn!(?wait, "the coordinator seeks a replacement; training on until it is ready, at most this long");
        tokio::time::sleep(wait).await;
    }
    // Release: the time stored above is seen with the flag.
    shared.interrupted.store(true, Ordering::Release);
}

fn state_name(worker: &v1::WorkerInfo) -> &'static str {
    match v1::WorkerState::try_from(worker.state) {
        Ok(v1::WorkerState::Idle) => "Idle",
        Ok(v1::WorkerState::Busy) => "Busy",
        Ok(v1::WorkerState::Draining) => "Draining",
        Ok(v1::WorkerState::Lost) => "Lost",
        Ok(v1::WorkerState::Left) => "Left",
        Ok(v1::WorkerState::Suspect) => "Suspect",
        Ok(v1::WorkerState::Unreachable) => "Unreachable",
        _ => "Unknown",
    }
}

fn worker_json(worker: &v1::WorkerInfo) -> Value {
    let caps = worker.capabilities.clone().unwrap_or_default();
    json!({
        "id": worker.id,
        "state": state_name(worker),
        "instance_id": caps.instance_id,
        "instance_type": caps.instance_type,
        "zone": caps.zone,
        "cpus": caps.cpus,
        "gpus": caps.gpus,
        "data_addr": caps.data_addr,
        "hostname": caps.hostname,
        "job_id": worker.job_id,
        "last_heartbeat_unix_ms": worker.last_heartbeat_unix_ms,
        "registered_at_unix_ms": worker.registered_at_unix_ms,
        "gone_at_unix_ms": worker.gone_at_unix_ms,
        "holds_state_of": worker.holds_state_of,
        "spare_of": worker.spare_of,
    })
}

/// Every registered worker, page by page, and the coordinator that served the last page.
pub async fn all_workers(client: &mut ApiClient) -> Result<(Vec<v1::WorkerInfo>, u64), flotilla_proto::ApiError> {
    let (mut workers, mut page_token) = (Vec::new(), String::new());
    loop {
        let request = ListWorkersRequest { page_token: page_token.clone(), ..Default::default() };
        let page = client
            .call_cluster(|mut c| {
                let request = request.clone();
                async move { c.list_workers(request).await }
            })
            .await?;
        workers.extend(page.workers);
        if page.next_page_token.is_empty() {
            return Ok((workers, page.served_by));
        }
        page_token = page.next_page_token;
    }
}

pub fn list(args: ListArgs, coordinator: Option<&str>, output: OutputFormat) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("async runtime")?;
    let _context = runtime.enter();
    let target = cluster_file::resolve(coordinator)?;
    let mut client = target.client()?;
    let (mut workers, served_by) = runtime.block_on(all_workers(&mut client)).map_err(anyhow::Error::from)?;
    let listed = workers.len();
    if !args.all {
        workers.retain(|w| !gone(w));
    }
    let hidden = listed - workers.len();
    match output {
        OutputFormat::Json => print_json(&Value::Array(workers.iter().map(worker_json).collect())),
        OutputFormat::Text => {
            println!(
                "{:<10} {:<11} {:<12} {:<20} {:<12} {:<12} {:>4} {:>4}  DATA ADDRESS",
                "ID", "STATE", "JOB", "INSTANCE", "TYPE", "ZONE", "CPUS", "GPUS"
            );
            for w in &workers {
                let caps = w.capabilities.clone().unwrap_or_default();
                // A noticed worker that holds a waiting job's state: the job, in parentheses; a
                // warm spare: `spare:` and its job.
                let job = match (&w.job_id, &w.holds_state_of, &w.spare_of) {
                    (Some(job), _, _) => job.clone(),
                    (None, Some(held), _) => format!("({held})"),
                    (None, None, Some(spare_of)) => format!("spare:{spare_of}"),
                    (None, None, None) => "-".to_string(),
                };
                println!(
                    "{:<10} {:<11} {:<12} {:<20} {:<12} {:<12} {:>4} {:>4}  {}",
                    w.id,
                    state_name(w),
                    job,
                    caps.instance_id,
                    caps.instance_type,
                    caps.zone,
                    caps.cpus,
                    caps.gpus,
                    caps.data_addr
                );
            }
            let hidden = match hidden {
                0 => String::new(),
                n => format!("; {n} gone (lost or left) not shown: --all lists them"),
            };
            println!("({} worker(s){hidden}, served by coordinator node {served_by})", workers.len());
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ImdsArgs {
    #[arg(long)]
    pub instance_id: String,
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    /// When this file holds a Unix time in ms, an interruption is announced for it.
    #[arg(long)]
    pub action_file: std::path::PathBuf,
    /// Announce an interruption this long after start (seeded by `up`).
    #[arg(long)]
    pub interrupt_after_ms: Option<u64>,
    /// What the endpoint says the instance is (`instance-type`, `placement/availability-zone`,
    /// `local-ipv4`): a multi-host test gives each host its own.
    #[arg(long, default_value = "local")]
    pub instance_type: String,
    #[arg(long, default_value = "local")]
    pub zone: String,
    #[arg(long, default_value = "127.0.0.1")]
    pub local_ipv4: std::net::IpAddr,
}

/// `flotilla imds` (hidden): the local provider's per-instance metadata endpoint (IMDSv2).
pub fn run_imds(args: ImdsArgs) -> anyhow::Result<()> {
    use flotilla_coordinator::provider::imds::{self, ImdsConfig};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await.context("binding the metadata endpoint")?;
        let config = ImdsConfig {
            instance_id: args.instance_id,
            instance_type: args.instance_type,
            zone: args.zone,
            local_ipv4: args.local_ipv4.to_string(),
            action_file: args.action_file,
            interrupt_after: args.interrupt_after_ms.map(std::time::Duration::from_millis),
        };
        let taken = imds::taken_at_action_time(&config);
        tokio::select! {
            _ = imds::serve(listener, config.clone()) => {}
            _ = taken => {}
            _ = super::shutdown_signal() => {}
        }
        anyhow::Ok(())
    })
}

/// How often the agent polls the metadata endpoint for a spot notice: EC2 gives 2 minutes, and
/// every millisecond before the stop is voted is a millisecond of the checkpoint's window (a
/// local endpoint answers in well under 1 ms, so 100 ms costs nothing).
const IMDS_POLL: Duration = Duration::from_millis(100);
/// `FLOTILLA_IMDS_POLL_MS` overrides it within these bounds (for benchmarks: scripts/bench/notice.sh).
const IMDS_POLL_MS_RANGE: std::ops::RangeInclusive<u64> = 10..=10_000;

/// The poll interval: [`IMDS_POLL`], or `FLOTILLA_IMDS_POLL_MS` when it is a number in range.
fn imds_poll() -> Duration {
    match std::env::var("FLOTILLA_IMDS_POLL_MS").ok().map(|v| v.trim().parse::<u64>()) {
        Some(Ok(ms)) if IMDS_POLL_MS_RANGE.contains(&ms) => Duration::from_millis(ms),
        Some(_) => {
            tracing::warn!(
                "FLOTILLA_IMDS_POLL_MS must be a number of ms in {IMDS_POLL_MS_RANGE:?}; using {IMDS_POLL:?}"
            );
            IMDS_POLL
        }
        None => IMDS_POLL,
    }
}

/// Polls the instance-metadata endpoint; on a spot interruption notice, reports it and stops
/// the running generation at a checkpoint (the coordinator then drains this worker).
async fn watch_interruptions(
    endpoint: String,
    api: ApiClient,
    registered: watch::Receiver<Option<String>>,
    shared: Arc<AgentShared>,
) {
    let mut client = flotilla_worker::imds::ImdsClient::new(&endpoint);
    let mut warned_unreachable = false;
    let mut rebalanced = false;
    let poll = imds_poll();
    loop {
        let polled = match client.instance_action().await {
            Ok(Some(notice)) => Ok(Some((notice, v1::InterruptionKind::SpotNotice))),
            Ok(None) if rebalanced => Ok(None),
            Ok(None) => client
                .rebalance_recommendation()
                .await
                .map(|r| r.map(|notice| (notice, v1::InterruptionKind::Rebalance))),
            Err(e) => Err(e),
        };
        match polled {
            Ok(Some((notice, kind))) => {
                let what = if kind == v1::InterruptionKind::SpotNotice {
                    "spot interruption notice"
                } else {
                    "rebalance recommendation"
                };
                tracing::warn!(notice = %notice.trim(), "{what} received");
                let taken_at = (kind == v1::InterruptionKind::SpotNotice).then(|| notice_time(&notice)).flatten();
                if kind == v1::InterruptionKind::Rebalance {
                    // Only a recommendation: report it, and keep watching for the notice.
                    interrupt(api.clone(), registered.clone(), &shared, kind, None).await;
                    rebalanced = true;
                } else {
                    interrupt(api, registered, &shared, kind, taken_at).await;
                    return;
                }
            }
            Ok(None) => {}
            Err(e) if !warned_unreachable => {
                tracing::warn!(error = %e, "cannot poll the instance metadata endpoint");
                warned_unreachable = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(poll).await;
    }
}

/// The `time` of a spot notice (`{"action": "terminate", "time": "2026-12-03T22:10:18Z"}`) in
/// unix ms; `None` when the notice names none we can read (the runner then uses its default).
fn notice_time(notice: &str) -> Option<u64> {
    let notice: serde_json::Value = serde_json::from_str(notice).ok()?;
    flotilla_proto::text::parse_rfc3339_utc(notice["time"].as_str()?)
}

#[derive(Debug, clap::Args)]
pub struct PreemptArgs {
    /// The worker to preempt (`worker-3`), as `flotilla workers` lists it.
    pub worker: String,
    /// Kill it without notice (a hard loss) instead of giving the 2-minute spot notice.
    #[arg(long, conflicts_with = "rebalance")]
    pub hard: bool,
    /// Give a rebalance recommendation instead (EC2's early warning: the instance is at
    /// elevated risk; nothing is taken): its job hands the worker's rank to a replacement
    /// without a deadline, training on until then.
    #[arg(long)]
    pub rebalance: bool,
    /// Seconds from the notice until the instance is taken (EC2 gives 120).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub notice_s: u64,
}

/// `flotilla preempt WORKER [--hard]`: a spot interruption on a local worker, now.
pub fn preempt(args: PreemptArgs, coordinator: Option<&str>, output: OutputFormat) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("async runtime")?;
    let _context = runtime.enter();
    let target = cluster_file::resolve(coordinator)?;
    let home = cluster_file::home();
    let cluster = ClusterFile::load(&home)?.context("preempt works on the local cluster (flotilla up)")?;
    let mut client = target.client()?;
    let (listed, _) = runtime.block_on(all_workers(&mut client))?;
    let worker = listed.iter().find(|w| w.id == args.worker).with_context(|| format!("no worker `{}`", args.worker))?;
    let instance = worker.capabilities.clone().unwrap_or_default().instance_id;
    let provider = super::cluster::local_provider(&home, &cluster)?;
    let at_unix_ms = flotilla_coordinator::raft::node::now_unix_ms() + args.notice_s * 1000;
    if args.hard {
        provider.kill(&instance)?;
    } else if args.rebalance {
        provider.recommend_rebalance(&instance)?;
    } else {
        provider.schedule_interruption(&instance, at_unix_ms)?;
    }
    let taken = !args.hard && !args.rebalance;
    match output {
        OutputFormat::Json => print_json(&json!({
            "worker": args.worker,
            "instance": instance,
            "hard": args.hard,
            "rebalance": args.rebalance,
            "taken_at_unix_ms": taken.then_some(at_unix_ms),
        })),
        OutputFormat::Text if args.hard => println!("{} ({instance}) killed without notice", args.worker),
        OutputFormat::Text if args.rebalance => {
            println!("{} ({instance}) given a rebalance recommendation", args.worker)
        }
        OutputFormat::Text => println!("{} ({instance}) given a spot interruption notice", args.worker),
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct InstancesArgs {
    /// Also list terminated instances.
    #[arg(long)]
    pub all: bool,
}

/// `flotilla instances`: what the autoscaler bought, and what each instance has cost.
pub fn instances(args: InstancesArgs, coordinator: Option<&str>, output: OutputFormat) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("async runtime")?;
    let _context = runtime.enter();
    let target = cluster_file::resolve(coordinator)?;
    let mut client = target.client()?;
    let mut answer = v1::ListInstancesResponse::default();
    let mut page_token = String::new();
    loop {
        let request = v1::ListInstancesRequest { all: args.all, page_token: page_token.clone(), ..Default::default() };
        let page = runtime
            .block_on(client.call_cluster(|mut c| {
                let request = request.clone();
                async move { c.list_instances(request).await }
            }))
            .map_err(anyhow::Error::from)?;
        answer.instances.extend(page.instances);
        (answer.total_cost_usd, answer.served_by) = (page.total_cost_usd, page.served_by);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    match output {
        OutputFormat::Json => print_json(&json!({
            "instances": answer.instances.iter().map(|i| json!({
                "id": i.id,
                "request_id": i.request_id,
                "instance_type": i.instance_type,
                "zone": i.zone,
                "spot": i.spot,
                "usd_per_hour": i.usd_per_hour,
                "launched_at_unix_ms": i.launched_at_unix_ms,
                "terminated_at_unix_ms": i.terminated_at_unix_ms,
                "cost_usd": i.cost_usd,
                "worker_id": i.worker_id,
                "job_id": i.job_id,
            })).collect::<Vec<_>>(),
            "total_cost_usd": answer.total_cost_usd,
            "served_by": answer.served_by,
        })),
        OutputFormat::Text => {
            println!(
                "{:<22} {:<13} {:<12} {:<9} {:>8} {:>10} {:<10} JOB",
                "ID", "TYPE", "ZONE", "MARKET", "$/H", "COST $", "WORKER"
            );
            for i in &answer.instances {
                println!(
                    "{:<22} {:<13} {:<12} {:<9} {:>8.3} {:>10.2} {:<10} {}",
                    i.id,
                    i.instance_type,
                    i.zone,
                    if i.spot { "spot" } else { "on-demand" },
                    i.usd_per_hour,
                    i.cost_usd,
                    i.worker_id.as_deref().unwrap_or("-"),
                    i.job_id.as_deref().unwrap_or("-")
                );
            }
            println!(
                "({} instance(s); {:.2} USD in all; served by coordinator node {})",
                answer.instances.len(),
                answer.total_cost_usd,
                answer.served_by
            );
        }
    }
    Ok(())
}
