//! `flotilla up` / `flotilla down`: a local cluster of coordinator processes on this machine.
//!
//! `up` starts the processes in the background (own process group, logs under
//! `.flotilla/logs/`), writes `.flotilla/cluster.toml`, and returns once the cluster answers.
//! Running `up` again after `down` restarts the same nodes on the same data, so jobs survive.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_coordinator::provider::local::{LocalProvider, is_running, stop_process};
use flotilla_coordinator::provider::{CLUSTER_TAG, InstanceState, LaunchSpec, Provider};
use flotilla_proto::v1::ListJobsRequest;
use serde_json::json;
use std::collections::BTreeMap;

use crate::cluster_file::{self, ClusterFile, CoordinatorEntry, random_hex};
use crate::output::{OutputFormat, print_json};

/// Coordinators `up` starts at most on one machine.
const LOCAL_COORDINATORS_MAX: u32 = 7;
/// How long `up` waits for the cluster to elect a leader and answer.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Coordinator nodes to start: 1 (no fault tolerance) or 3/5 (tolerate 1/2 failures); default
    /// 1, or the existing cluster's count. On an existing cluster, `up` starts the ones that are
    /// not running (a crashed or killed node rejoins with its data) and leaves the others as
    /// they are.
    #[arg(long)]
    pub coordinators: Option<u32>,
    /// Worker agents to have running on this machine (through the local provider): `up`
    /// launches the missing ones, also on a cluster that is up. Default: as many as the last
    /// `up --workers` of this cluster asked for (so `down` then `up` brings them back), 0 for a
    /// new cluster.
    #[arg(long)]
    pub workers: Option<u32>,
    /// Random spot interruptions for demos and tests: mean notices per worker-hour.
    #[arg(long, default_value_t = 0.0)]
    pub spot_interruptions_per_hour: f64,
    /// Seed of those interruptions (the same seed replays the same times).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seconds a replacement worker takes to start after a notice or a loss, as a cloud
    /// instance boots (EC2: one to three minutes); 0 starts it at once.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub boot_delay_s: u64,
    /// The cluster store (checkpoints, logs, model artifacts): `s3://bucket/prefix` (AWS settings
    /// from the environment, which the coordinators and workers inherit) or a local folder.
    /// Default: `store/` in the cluster folder. Fixed when the cluster is first created.
    #[arg(long)]
    pub store: Option<String>,
    /// Another folder whose files jobs may name as `file://` data or inference input/output
    /// (repeatable; the folder `up` runs in and the cluster's parent folder always are).
    #[arg(long = "data-root")]
    pub data_roots: Vec<PathBuf>,
    /// Run the new cluster without TLS (plaintext on loopback; for measuring what TLS costs).
    /// Default: a cluster CA in `tls/` and TLS on every connection. Fixed at creation.
    #[arg(long)]
    pub no_tls: bool,
    /// Hand noticed members of built-in jobs over live: the gang trains on while the
    /// replacement catches up, and swaps it in without a stop (see `coordinator
    /// --live-handover`); `false`: every handover stops the gang and regroups.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub live_handover: bool,
    /// Let a waiting job stop running jobs of lower `priority` that hold the workers it needs
    /// (they checkpoint and resume later; see `coordinator --priority-preemption`); `false`:
    /// priority orders the queue only
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub priority_preemption: bool,
}

/// How long `up` waits for launched workers to register.
const WORKERS_READY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn local_provider(home: &Path, cluster: &ClusterFile) -> anyhow::Result<LocalProvider> {
    let home = std::path::absolute(home).context("resolving the cluster folder")?;
    let env = [
        ("FLOTILLA_COORDINATOR", cluster.addresses()),
        ("FLOTILLA_JOIN_TOKEN", cluster.join_token.clone()),
        ("FLOTILLA_HOME", home.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let exe = std::env::current_exe().context("cannot find the flotilla executable")?;
    Ok(LocalProvider { home, exe, env, interruptions_per_hour: 0.0, seed: 0 })
}

fn cluster_tags(cluster: &ClusterFile) -> BTreeMap<String, String> {
    BTreeMap::from([(CLUSTER_TAG.to_string(), cluster.cluster_id.clone())])
}

/// Launches the workers missing to have `workers` running on this machine; returns how
/// many it launched once each has registered (idle or already given work: a queued job takes
/// a new worker at once).
async fn launch_workers(home: &Path, cluster: &ClusterFile, args: &UpArgs, workers: u32) -> anyhow::Result<u32> {
    let mut provider = local_provider(home, cluster)?;
    provider.interruptions_per_hour = args.spot_interruptions_per_hour;
    provider.seed = args.seed;
    let running = running_workers(&provider, cluster).await?;
    let count = workers.saturating_sub(running.len() as u32);
    if count == 0 {
        return Ok(0);
    }
    let spec = LaunchSpec {
        instance_type: "local".into(),
        zone: None,
        spot: false,
        count,
        on_demand_base: 0,
        tags: cluster_tags(cluster),
        client_token: random_hex(8)?,
    };
    let launched: Vec<String> = provider.launch(&spec).await?.into_iter().map(|i| i.id).collect();
    let mut client = cluster.client()?;
    let started = Instant::now();
    loop {
        let (listed, _) = super::workers::all_workers(&mut client).await?;
        let registered = launched
            .iter()
            .filter(|id| {
                listed
                    .iter()
                    .any(|w| !super::workers::gone(w) && w.capabilities.as_ref().is_some_and(|c| &c.instance_id == *id))
            })
            .count();
        if registered == launched.len() {
            return Ok(count);
        }
        if started.elapsed() > WORKERS_READY_TIMEOUT {
            bail!(
                "only {registered} of {count} workers registered within {WORKERS_READY_TIMEOUT:?}; see {}",
                home.join("logs").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The cluster's worker instances running on this machine.
async fn running_workers(provider: &LocalProvider, cluster: &ClusterFile) -> anyhow::Result<Vec<String>> {
    Ok(provider
        .describe(&cluster_tags(cluster))
        .await?
        .into_iter()
        .filter(|i| i.state == InstanceState::Running)
        .map(|i| i.id)
        .collect())
}

#[derive(Debug, clap::Args)]
pub struct DownArgs {
    /// Also delete the cluster's data (jobs, logs, tokens).
    #[arg(long)]
    pub purge: bool,
}

fn free_port() -> anyhow::Result<u16> {
    flotilla_coordinator::ports::free_loopback_port().context("cannot find a free loopback port")
}

fn new_cluster(home: &Path, coordinators: u32, store: Option<String>, tls: bool) -> anyhow::Result<ClusterFile> {
    let mut entries = Vec::new();
    for id in 1..=u64::from(coordinators) {
        entries.push(CoordinatorEntry {
            id,
            address: format!("127.0.0.1:{}", free_port()?),
            data_dir: home.join(format!("coordinator-{id}")),
            log: home.join("logs").join(format!("coordinator-{id}.log")),
            pid: None,
            metrics_address: Some(format!("127.0.0.1:{}", free_port()?)),
        });
    }
    Ok(ClusterFile {
        tls_dir: if tls { Some(local_certificates(home)?) } else { None },
        cluster_id: format!("local-{}", random_hex(4)?),
        api_token: random_hex(16)?,
        submit_token: Some(random_hex(16)?),
        read_token: Some(random_hex(16)?),
        join_token: random_hex(16)?,
        peer_token: random_hex(16)?,
        store,
        data_roots: Vec::new(),
        coordinators: entries,
        workers: None,
    })
}

/// TLS on every connection of the local cluster: a CA for it, one certificate for the
/// coordinators (they all listen on loopback) and one for the workers. Returns the folder.
fn local_certificates(home: &Path) -> anyhow::Result<PathBuf> {
    let tls_dir = std::path::absolute(home.join("tls")).context("resolving the TLS folder")?;
    let days = super::certs::VALID_DAYS_MAX;
    if !tls_dir.join(super::certs::CA_KEY_FILE).exists() {
        super::certs::init(&tls_dir, days)?; // else: the CA of an `up` that did not finish
    }
    let loopback = ["127.0.0.1".to_string(), "localhost".to_string()];
    super::certs::issue(&tls_dir, super::certs::Role::Coordinator, "coordinator", &loopback, days)?;
    super::certs::issue(&tls_dir, super::certs::Role::Worker, "worker", &[], days)?;
    Ok(tls_dir)
}

/// The cluster store: `--store`, or `store/` beside the coordinators' data folders.
fn store_uri(cluster: &ClusterFile, coordinator_data_dir: &Path) -> anyhow::Result<String> {
    if let Some(uri) = &cluster.store {
        return Ok(uri.clone());
    }
    let home = coordinator_data_dir.parent().unwrap_or(Path::new("."));
    Ok(std::path::absolute(home.join("store")).context("resolving the store folder")?.display().to_string())
}

/// The coordinators' data roots: the folder `up` runs in, the cluster's parent folder, and
/// the cluster file's (every `up --data-root` so far).
fn data_roots(cluster: &ClusterFile, home: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let cwd = std::env::current_dir().context("reading the current folder")?;
    let home = std::path::absolute(home).context("resolving the cluster folder")?;
    let mut roots = vec![cwd, home.parent().unwrap_or(&home).to_path_buf()];
    roots.extend(cluster.data_roots.iter().cloned());
    roots.dedup();
    Ok(roots)
}

/// FLOTILLA_TLS_{CA,CERT,KEY} for a process of the cluster presenting certificate `name`.
pub fn tls_env(cluster: &ClusterFile, name: &str) -> Vec<(&'static str, PathBuf)> {
    let Some(dir) = &cluster.tls_dir else { return Vec::new() };
    vec![
        ("FLOTILLA_TLS_CA", dir.join(super::certs::CA_FILE)),
        ("FLOTILLA_TLS_CERT", dir.join(format!("{name}.pem"))),
        ("FLOTILLA_TLS_KEY", dir.join(format!("{name}-key.pem"))),
    ]
}

fn spawn_coordinator(
    cluster: &ClusterFile,
    entry: &CoordinatorEntry,
    home: &Path,
    args: &UpArgs,
) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt;
    let peers: Vec<String> = cluster.coordinators.iter().map(|c| format!("{}={}", c.id, c.address)).collect();
    if let Some(dir) = entry.log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&entry.log)
        .with_context(|| format!("cannot open {}", entry.log.display()))?;
    let exe = std::env::current_exe().context("cannot find the flotilla executable")?;
    let child = Command::new(exe)
        .arg("coordinator")
        .args(["--id", &entry.id.to_string(), "--listen", &entry.address, "--peers", &peers.join(",")])
        .args(entry.metrics_address.iter().flat_map(|address| ["--metrics-addr", address.as_str()]))
        .arg("--data-dir")
        .arg(&entry.data_dir)
        .args(["--store", &store_uri(cluster, &entry.data_dir)?])
        .args(["--cluster-id", &cluster.cluster_id])
        .arg("--local-workers-home")
        .arg(std::path::absolute(home).context("resolving the cluster folder")?)
        .args(["--local-interruptions-per-hour", &args.spot_interruptions_per_hour.to_string()])
        .args(["--local-seed", &args.seed.to_string()])
        .args(["--local-boot-delay-s", &args.boot_delay_s.to_string()])
        .args(["--live-handover", if args.live_handover { "true" } else { "false" }])
        .args(["--priority-preemption", if args.priority_preemption { "true" } else { "false" }])
        .envs(tls_env(cluster, "coordinator"))
        .args(
            data_roots(cluster, home)?.iter().flat_map(|root| [std::ffi::OsStr::new("--data-root"), root.as_os_str()]),
        )
        .env("FLOTILLA_TOKEN", &cluster.api_token)
        .envs(cluster.submit_token.iter().map(|t| ("FLOTILLA_SUBMIT_TOKEN", t)))
        .envs(cluster.read_token.iter().map(|t| ("FLOTILLA_READ_TOKEN", t)))
        .env("FLOTILLA_PEER_TOKEN", &cluster.peer_token)
        .env("FLOTILLA_JOIN_TOKEN", &cluster.join_token)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("cannot share the log file")?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start a coordinator process")?;
    Ok(child.id())
}

pub fn up(args: UpArgs, output: OutputFormat) -> anyhow::Result<()> {
    if !(0.0..=3600.0).contains(&args.spot_interruptions_per_hour) {
        bail!("--spot-interruptions-per-hour must be 0 to 3600, got {}", args.spot_interruptions_per_hour);
    }
    let home = cluster_file::home();
    let existing = ClusterFile::load(&home)?;
    let coordinators = args.coordinators.or(existing.as_ref().map(|c| c.coordinators.len() as u32)).unwrap_or(1);
    if coordinators == 0 || coordinators > LOCAL_COORDINATORS_MAX {
        bail!("--coordinators must be 1 to {LOCAL_COORDINATORS_MAX} (3 or 5 tolerate failures), got {coordinators}");
    }
    let mut cluster = match existing {
        Some(existing) => {
            if existing.coordinators.len() != coordinators as usize {
                bail!(
                    "the cluster in {} has {} coordinators; run `flotilla up --coordinators {}` or delete it with \
                     `flotilla down --purge`",
                    home.display(),
                    existing.coordinators.len(),
                    existing.coordinators.len()
                );
            }
            let requested = args.store.as_deref().map(super::coordinator::store_uri).transpose()?;
            if requested.is_some() && requested != existing.store {
                bail!(
                    "the cluster in {} keeps its data in {}; its jobs' checkpoints are there. Run `flotilla up` \
                     without --store, or delete the cluster with `flotilla down --purge` first",
                    home.display(),
                    existing.store.as_deref().unwrap_or("its local store folder")
                );
            }
            existing
        }
        None => {
            let store = args.store.as_deref().map(super::coordinator::store_uri).transpose()?;
            new_cluster(&home, coordinators, store, !args.no_tls)?
        }
    };
    // What the user asked for last (`down` then `up` brings the same workers back).
    let workers = args.workers.or(cluster.workers).unwrap_or(0);
    cluster.workers = Some(workers);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    // A cluster partly up (a coordinator crashed or was killed, workers missing) gets what is
    // missing; one wholly up is left alone.
    let stopped: Vec<usize> =
        (0..cluster.coordinators.len()).filter(|&i| !cluster.coordinators[i].pid.is_some_and(is_running)).collect();
    if stopped.is_empty() {
        let running = runtime.block_on(running_workers(&local_provider(&home, &cluster)?, &cluster))?;
        if running.len() >= workers as usize {
            bail!(
                "a cluster is already running from {} ({} coordinator(s), {} worker(s) on this machine; stop it \
                 with `flotilla down`, or ask for more workers with `up --workers N`)",
                home.display(),
                cluster.coordinators.len(),
                running.len()
            );
        }
    }
    // The coordinators check the store too, but a clear error here beats a timeout there. Only
    // a restart of nodes that hold Raft state starts whatever the store says (as they do): the
    // log needs no store, and a store outage must not keep the cluster down.
    let store = store_uri(&cluster, &cluster.coordinators[0].data_dir)?;
    let restart = stopped
        .iter()
        .all(|&i| flotilla_coordinator::raft::storage::RaftStore::exists(&cluster.coordinators[i].data_dir));
    let probed = runtime.block_on(async {
        let location = flotilla_store::open(&store)?;
        flotilla_store::probe(&location, flotilla_store::Access::Write).await
    });
    match probed {
        Err(e) if restart => eprintln!(
            "warning: {e}; restarting the coordinators anyway (they hold their Raft state); checkpoints, job logs \
             and models wait for the store"
        ),
        probed => probed?,
    }
    for root in &args.data_roots {
        let root = std::path::absolute(root).with_context(|| format!("--data-root {}", root.display()))?;
        if !cluster.data_roots.contains(&root) {
            cluster.data_roots.push(root);
        }
    }
    for &i in &stopped {
        let pid = spawn_coordinator(&cluster, &cluster.coordinators[i], &home, &args)?;
        cluster.coordinators[i].pid = Some(pid);
    }
    cluster.save(&home)?;
    runtime.block_on(wait_ready(&cluster))?;
    let launched = runtime.block_on(launch_workers(&home, &cluster, &args, workers))?;
    // Restarted while the others ran: said, by id.
    let restarted: Vec<u64> = if stopped.len() < cluster.coordinators.len() {
        stopped.iter().map(|&i| cluster.coordinators[i].id).collect()
    } else {
        Vec::new()
    };
    match output {
        OutputFormat::Json => print_json(&json!({
            "coordinators": cluster.coordinators.iter().map(|c| json!({"id": c.id, "address": c.address, "pid": c.pid, "metrics": c.metrics_address.as_ref().map(|a| format!("http://{a}/metrics"))})).collect::<Vec<_>>(),
            "address": cluster.addresses(),
            "store": store,
            "cluster_file": home.join(cluster_file::CLUSTER_FILE),
            "restarted_coordinators": restarted,
            "workers_launched": launched,
        })),
        OutputFormat::Text => {
            println!(
                "cluster up: {} coordinator(s), {} worker(s), data in {}",
                cluster.coordinators.len(),
                workers,
                home.display()
            );
            if !restarted.is_empty() {
                let ids: Vec<String> = restarted.iter().map(u64::to_string).collect();
                println!(
                    "restarted coordinator(s) {} (the others were running); launched {launched} worker(s)",
                    ids.join(", ")
                );
            }
            println!("API: {}", cluster.addresses());
            println!("store: {store}");
            let metrics: Vec<String> = cluster
                .coordinators
                .iter()
                .filter_map(|c| c.metrics_address.as_ref())
                .map(|a| format!("http://{a}/metrics"))
                .collect();
            if !metrics.is_empty() {
                println!("metrics: {}", metrics.join(" "));
                println!("dashboard: `flotilla dashboard` prints its address (with the API token)");
            }
        }
    }
    Ok(())
}

async fn wait_ready(cluster: &ClusterFile) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut client = cluster.client()?;
    client.deadline = READY_TIMEOUT;
    let ready =
        client.call(|mut c| async move { c.list_jobs(ListJobsRequest { limit: 1, ..Default::default() }).await }).await;
    if let Err(e) = ready {
        let logs: Vec<String> = cluster.coordinators.iter().map(|c| c.log.display().to_string()).collect();
        bail!("the cluster did not answer within {:?}: {e}; see {}", started.elapsed(), logs.join(", "));
    }
    Ok(())
}

pub fn down(args: DownArgs, output: OutputFormat) -> anyhow::Result<()> {
    let home = cluster_file::home();
    let Some(mut cluster) = ClusterFile::load(&home)? else {
        bail!("no local cluster in {} (nothing to stop)", home.display());
    };
    let mut stopped = Vec::new();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("async runtime")?;
    let provider = local_provider(&home, &cluster)?;
    let workers = runtime.block_on(provider.describe(&cluster_tags(&cluster)))?;
    let running: Vec<String> =
        workers.iter().filter(|i| i.state == InstanceState::Running).map(|i| i.id.clone()).collect();
    // Every instance, not only the running ones: a worker killed without notice may have left
    // its metadata endpoint behind.
    let all: Vec<String> = workers.into_iter().map(|i| i.id).collect();
    runtime.block_on(provider.terminate(&all))?;
    for entry in &mut cluster.coordinators {
        if let Some(pid) = entry.pid.take().filter(|&pid| is_running(pid)) {
            runtime.block_on(stop_process(pid))?;
            stopped.push(pid);
        }
    }
    // A coordinator may have launched a replacement worker while the others were stopping.
    let late: Vec<String> = runtime
        .block_on(provider.describe(&cluster_tags(&cluster)))?
        .into_iter()
        .filter(|i| i.state == InstanceState::Running)
        .map(|i| i.id)
        .collect();
    runtime.block_on(provider.terminate(&late))?;
    if args.purge {
        std::fs::remove_dir_all(&home).with_context(|| format!("cannot delete {}", home.display()))?;
    } else {
        cluster.save(&home)?;
    }
    match output {
        OutputFormat::Json => {
            print_json(&json!({ "stopped_pids": stopped, "stopped_workers": running, "purged": args.purge }))
        }
        OutputFormat::Text => println!(
            "stopped {} coordinator(s) and {} worker(s){}",
            stopped.len(),
            running.len(),
            if args.purge { "; cluster data deleted" } else { "; data kept (`flotilla up` resumes it)" }
        ),
    }
    Ok(())
}
