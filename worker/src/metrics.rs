//! The agent's own metrics for Prometheus: `GET /metrics` on `flotilla worker --metrics-addr`,
//! in the OpenMetrics text format. Process-wide counters updated where the work happens (the
//! step loop, the checkpoint writers, the notice watcher); only the held state's size is
//! sampled (at each heartbeat).
//!
//! Checkpoint *stall* is what the step loop waited for (snapshot copies, a save fallen behind,
//! the final save at a stop); checkpoint *duration* is the background write and upload, which
//! overlaps training.

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;

use flotilla_proto::http;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};

pub struct AgentMetrics {
    /// Optimizer steps this agent's ranks took.
    pub steps: Counter,
    /// Samples per second of this agent's last reported step (rank 0: the gang's).
    pub samples_per_second: Gauge<f64, AtomicU64>,
    /// Time the step loop spent on a checkpoint at one step boundary.
    pub checkpoint_stall_seconds: Histogram,
    /// Write and upload of one checkpoint (in the background for the built-in trainer).
    pub checkpoint_seconds: Histogram,
    /// Bytes of checkpoints this agent wrote and recorded.
    pub checkpoint_bytes: Counter,
    /// Checkpoints written and recorded.
    pub checkpoints: Counter,
    /// Spot notices and SIGTERMs this agent received.
    pub notices: Counter,
    /// Generations this agent ran a rank of.
    pub generations: Counter,
    /// Generations running now (0 or 1).
    pub running: Gauge,
    /// Resumes from a state this agent still held in memory (nothing read or moved).
    pub resumes_from_memory: Counter,
    /// Resumes from a state received from a gang member over the data port.
    pub resumes_from_peer: Counter,
    /// Resumes from a checkpoint read from the store.
    pub resumes_from_storage: Counter,
    /// Bytes of resume state received from gang members.
    pub resume_peer_bytes: Counter,
    /// Bytes of resume state read from the store.
    pub resume_storage_bytes: Counter,
    /// Bytes of a job's state held in memory for its next gang (its checkpoint encoding; 0:
    /// none), sampled at each heartbeat.
    pub held_state_bytes: Gauge,
}

/// This process's agent metrics.
pub static AGENT: LazyLock<AgentMetrics> = LazyLock::new(|| AgentMetrics {
    steps: Counter::default(),
    samples_per_second: Gauge::default(),
    // 100 us to ~13 s.
    checkpoint_stall_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
    // 1 ms to ~9 min.
    checkpoint_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
    checkpoint_bytes: Counter::default(),
    checkpoints: Counter::default(),
    notices: Counter::default(),
    generations: Counter::default(),
    running: Gauge::default(),
    resumes_from_memory: Counter::default(),
    resumes_from_peer: Counter::default(),
    resumes_from_storage: Counter::default(),
    resume_peer_bytes: Counter::default(),
    resume_storage_bytes: Counter::default(),
    held_state_bytes: Gauge::default(),
});

/// The exposition of `metrics`.
pub fn render(metrics: &AgentMetrics) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("flotilla_agent");
    registry.register("steps", "Optimizer steps this agent's ranks took", metrics.steps.clone());
    registry.register(
        "samples_per_second",
        "Training throughput at this agent's last progress report",
        metrics.samples_per_second.clone(),
    );
    registry.register(
        "checkpoint_stall_seconds",
        "Time the step loop waited on a checkpoint at one step boundary",
        metrics.checkpoint_stall_seconds.clone(),
    );
    registry.register(
        "checkpoint_seconds",
        "Write and upload of one checkpoint (in the background for the built-in trainer)",
        metrics.checkpoint_seconds.clone(),
    );
    registry.register(
        "checkpoint_bytes",
        "Bytes of checkpoints written and recorded",
        metrics.checkpoint_bytes.clone(),
    );
    registry.register("checkpoints", "Checkpoints written and recorded", metrics.checkpoints.clone());
    registry.register("notices", "Spot interruption notices and SIGTERMs received", metrics.notices.clone());
    registry.register("generations", "Generations this agent ran a rank of", metrics.generations.clone());
    registry.register("running", "1 while this agent runs a rank", metrics.running.clone());
    let resumes = [
        (
            "resumes_from_memory",
            "Resumes from a state still held in memory since the last planned stop",
            &metrics.resumes_from_memory,
        ),
        (
            "resumes_from_peer",
            "Resumes from a state received from a gang member over the data port",
            &metrics.resumes_from_peer,
        ),
        ("resumes_from_storage", "Resumes from a checkpoint read from the store", &metrics.resumes_from_storage),
        ("resume_peer_bytes", "Bytes of resume state received from gang members", &metrics.resume_peer_bytes),
        ("resume_storage_bytes", "Bytes of resume state read from the store", &metrics.resume_storage_bytes),
    ];
    for (name, help, counter) in resumes {
        registry.register(name, help, counter.clone());
    }
    registry.register(
        "held_state_bytes",
        "Bytes of a job's state held in memory for its next gang (checkpoint encoding), sampled at each heartbeat",
        metrics.held_state_bytes.clone(),
    );
    let mut text = String::new();
    encode(&mut text, &registry)?;
    Ok(text)
}

/// Serves `GET /metrics` on `listener` until the process ends.
pub async fn serve(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            if let Err(e) = answer(stream).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

async fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    let Some(request) = http::read_request(&mut stream).await? else { return Ok(()) };
    if request.method != "GET" || request.path.split('?').next() != Some("/metrics") {
        return http::respond(&mut stream, 404, "text/plain", "", "the metrics are at GET /metrics\n").await;
    }
    match render(&AGENT) {
        Ok(text) => {
            http::respond(&mut stream, 200, "application/openmetrics-text; version=1.0.0; charset=utf-8", "", &text)
                .await
        }
        Err(e) => http::respond(&mut stream, 503, "text/plain", "", &format!("{e}\n")).await,
    }
}
