//! `flotilla bench-submit` (hidden): load generator for `scripts/bench/coordinator.sh`.
//!
//! Submits jobs from N concurrent clients against the resolved cluster and prints one JSON line
//! with throughput and latency percentiles. With `--kill-leader`, one client keeps submitting
//! while the leader named in the last acknowledgement is killed with SIGKILL (its pid from
//! `.flotilla/cluster.toml`); the line then reports the time to the next acknowledged write.
//! With `--etcd URL`, the same load goes to etcd as `Put`s (the baseline in the same run).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_core::spec::JobSpec;
use flotilla_proto::client::ApiClient;
use flotilla_proto::convert::spec_to_proto;
use flotilla_proto::v1::{SubmitJobRequest, SubmitJobResponse};
use prost::Message as _;
use serde_json::json;

use crate::cluster_file::{self, ClusterFile};

/// Concurrent clients at most.
const CLIENTS_MAX: usize = 256;
/// Submissions in one run at most.
const OPS_MAX: usize = 1_000_000;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    #[arg(long, default_value_t = 1000)]
    pub ops: usize,
    /// Measure failover instead: kill the leader mid-run and time the next acknowledged write.
    #[arg(long)]
    pub kill_leader: bool,
    /// The baseline instead: the same load as etcd `Put`s (key = the request id, value = the
    /// encoded job spec) against this etcd client URL, the leader's (scripts/bench/coordinator.sh).
    #[arg(long)]
    pub etcd: Option<String>,
    /// The CA that signed the etcd server's certificate (an https:// `--etcd` URL).
    #[arg(long)]
    pub etcd_ca: Option<std::path::PathBuf>,
}

fn spec() -> JobSpec {
    JobSpec::from_toml_str(
        "name = \"bench\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\nworkers = { min = 1 }\n",
    )
    .expect("the benchmark's spec is valid")
}

async fn submit(client: &mut ApiClient, request_id: String) -> anyhow::Result<SubmitJobResponse> {
    let request = SubmitJobRequest { spec: Some(spec_to_proto(&spec())), client_request_id: request_id };
    client
        .call(|mut c| {
            let request = request.clone();
            async move { c.submit_job(request).await }
        })
        .await
        .map_err(anyhow::Error::from)
}

/// One benchmark client: a write is a job submission, or the baseline's etcd `Put` of the same
/// encoded spec under the request id.
enum Writer {
    Flotilla(ApiClient),
    Etcd { client: tonic::client::Grpc<tonic::transport::Channel>, value: Vec<u8> },
}

impl Writer {
    async fn write(&mut self, request_id: String) -> anyhow::Result<()> {
        match self {
            Writer::Flotilla(client) => submit(client, request_id).await.map(|_| ()),
            Writer::Etcd { client, value } => etcd::put(client, request_id, value.clone()).await,
        }
    }
}

fn percentile_ms(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

pub fn run(args: Args, coordinator: Option<&str>) -> anyhow::Result<()> {
    if args.clients == 0 || args.clients > CLIENTS_MAX || args.ops == 0 || args.ops > OPS_MAX {
        bail!("--clients must be 1 to {CLIENTS_MAX} and --ops 1 to {OPS_MAX}");
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let _context = runtime.enter();
    let run_id = format!("{}", flotilla_coordinator::raft::node::now_unix_ms());
    let per_client = args.ops.div_ceil(args.clients);
    let mut clients = Vec::with_capacity(args.clients);
    if let Some(url) = &args.etcd {
        let value = spec_to_proto(&spec()).encode_to_vec();
        for _ in 0..args.clients {
            // One connection per client, as each coordinator client has its own.
            let channel = etcd::channel(url, args.etcd_ca.as_deref())?;
            clients.push(Writer::Etcd { client: tonic::client::Grpc::new(channel), value: value.clone() });
        }
    } else {
        let target = cluster_file::resolve(coordinator)?;
        if args.kill_leader {
            return runtime.block_on(failover(target, run_id));
        }
        for _ in 0..args.clients {
            clients.push(Writer::Flotilla(target.client()?));
        }
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, mut writer)| {
            let run_id = run_id.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_client);
                for i in 0..per_client {
                    let t = Instant::now();
                    writer.write(format!("bench-{run_id}-{c}-{i}")).await?;
                    latencies.push(t.elapsed());
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(runtime.block_on(task).context("client task")??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    println!(
        "{}",
        json!({
            "bench": if args.etcd.is_some() { "etcd_put" } else { "coordinator_submit" },
            "clients": args.clients,
            "ops": latencies.len(),
            "seconds": elapsed.as_secs_f64(),
            "ops_per_s": latencies.len() as f64 / elapsed.as_secs_f64(),
            "p50_ms": percentile_ms(&latencies, 0.50),
            "p99_ms": percentile_ms(&latencies, 0.99),
        })
    );
    Ok(())
}

/// A minimal etcd v3 client: `KV.Put` only, the messages declared by hand (the fields of
/// etcd's rpc.proto that a put needs; unknown fields in answers are skipped).
mod etcd {
    use std::path::Path;

    use anyhow::Context;
    use tonic::codegen::http::uri::PathAndQuery;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    /// The answer's fields (header, previous value) are not needed: it is decoded as empty.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {}

    /// A lazily connected HTTP/2 channel to `url`, TLS when a CA is given.
    pub fn channel(url: &str, ca: Option<&Path>) -> anyhow::Result<Channel> {
        let mut endpoint = Endpoint::from_shared(url.to_string()).with_context(|| format!("etcd URL `{url}`"))?;
        if let Some(ca) = ca {
            flotilla_proto::tls::install_crypto_provider();
            let pem = std::fs::read_to_string(ca).with_context(|| format!("--etcd-ca {}", ca.display()))?;
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            endpoint = endpoint.tls_config(tls).context("etcd TLS")?;
        }
        Ok(endpoint.tcp_nodelay(true).connect_lazy())
    }

    pub async fn put(client: &mut tonic::client::Grpc<Channel>, key: String, value: Vec<u8>) -> anyhow::Result<()> {
        client.ready().await.context("etcd is not reachable")?;
        let request = tonic::Request::new(PutRequest { key: key.into_bytes(), value });
        let path = PathAndQuery::from_static("/etcdserverpb.KV/Put");
        let _: tonic::Response<PutResponse> =
            client.unary(request, path, tonic_prost::ProstCodec::default()).await.context("etcd put")?;
        Ok(())
    }
}

async fn failover(target: cluster_file::Target, run_id: String) -> anyhow::Result<()> {
    let cluster =
        ClusterFile::load(&cluster_file::home())?.context("--kill-leader needs a local cluster (flotilla up)")?;
    let mut client = target.client()?;
    let mut leader = 0;
    for i in 0..50 {
        leader = submit(&mut client, format!("failover-{run_id}-warm-{i}")).await?.served_by;
    }
    let pid = cluster
        .coordinators
        .iter()
        .find(|c| c.id == leader)
        .and_then(|c| c.pid)
        .with_context(|| format!("no pid recorded for leader node {leader}"))?;
    let killed_at = Instant::now();
    std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().context("cannot run kill")?;
    let response = submit(&mut client, format!("failover-{run_id}-after")).await?;
    let failover = killed_at.elapsed();
    println!(
        "{}",
        json!({
            "bench": "coordinator_failover",
            "killed_node": leader,
            "new_leader": response.served_by,
            "failover_ms": failover.as_secs_f64() * 1000.0,
        })
    );
    Ok(())
}

/// `flotilla bench-first-step` (hidden): submit-to-first-step latency on the local cluster.
#[derive(Debug, clap::Args)]
pub struct FirstStepArgs {
    /// Jobs to time, one after another.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

/// A 2-worker job on synthetic data (nothing to download; the data-loading cost is small).
const FIRST_STEP_SPEC: &str = "name = \"first-step\"\nmodel = { kind = \"mlp\", hidden = [64] }\n\
    data = { train = \"synthetic:blobs?samples=2000&features=64&classes=4\" }\n\
    train = { steps = 200, batch_size = 32 }\nworkers = { min = 2, max = 2 }\n";

pub fn first_step(args: FirstStepArgs, coordinator: Option<&str>) -> anyhow::Result<()> {
    use flotilla_proto::v1::GetJobRequest;
    let target = cluster_file::resolve(coordinator)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let _context = runtime.enter();
    let mut client = target.client()?;
    let spec = JobSpec::from_toml_str(FIRST_STEP_SPEC).expect("the benchmark's spec is valid");
    let run_id = flotilla_coordinator::raft::node::now_unix_ms();
    for round in 0..args.rounds.max(1) {
        let request =
            SubmitJobRequest { spec: Some(spec_to_proto(&spec)), client_request_id: format!("first-{run_id}-{round}") };
        let started = Instant::now();
        let job = runtime.block_on(client.call(|mut c| {
            let request = request.clone();
            async move { c.submit_job(request).await }
        }))?;
        let submitted = started.elapsed();
        let (mut running, mut first_step) = (None, None);
        while first_step.is_none() {
            if started.elapsed() > Duration::from_secs(60) {
                bail!("{} did not take a step within 60 s", job.job_id);
            }
            let request = GetJobRequest { job_id: job.job_id.clone() };
            let status = runtime.block_on(client.call(|mut c| {
                let request = request.clone();
                async move { c.get_job(request).await }
            }))?;
            let status = status.job.context("no job in the answer")?;
            if running.is_none() && status.generation > 0 {
                running = Some(started.elapsed());
            }
            if status.step >= 1 {
                first_step = Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        println!(
            "{}",
            json!({
                "bench": "submit_to_first_step",
                "job": job.job_id,
                "submit_ack_ms": submitted.as_secs_f64() * 1000.0,
                "submit_to_running_ms": ms(running),
                "submit_to_first_step_ms": ms(first_step),
            })
        );
        // Let the job finish so the next one finds both workers free.
        std::thread::sleep(Duration::from_secs(2));
    }
    Ok(())
}
