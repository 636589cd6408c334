//! The coordinator's metrics for Prometheus: `GET /metrics` on `--metrics-addr`, in the
//! OpenMetrics text format (which Prometheus scrapes natively), every family with HELP and TYPE.
//!
//! ```text
//!   scrape ─▶ read_local(state) ─▶ sample (pure: counts and per-job values) ─┐
//!             leader's live progress (loss, samples/s) ───────────────────────┼─▶ encode ─▶ text
//!             RaftMetrics (this node's proposals, leader changes) ────────────┘
//! ```
//!
//! State-derived values are read at scrape time (nothing to keep in step); per-job families are
//! bounded to the [`JOBS_EXPORTED_MAX`] newest jobs, so label cardinality stays bounded. The
//! endpoint is read-only and unauthenticated, like every Prometheus exporter: bind it to an
//! address only the monitoring system reaches (`up` binds 127.0.0.1).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use flotilla_core::JobId;
use flotilla_core::state::{JobState, State, WorkerCondition};
use flotilla_proto::http;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};

use crate::progress::Progress;
use crate::raft::node::NodeHandle;

/// Jobs with per-job series at most (the newest by id).
pub const JOBS_EXPORTED_MAX: usize = 1000;

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

/// This node's Raft activity, updated as it happens (not replicated: each node reports its own).
pub struct RaftMetrics {
    /// Time from a proposal to its applied outcome, as the proposer saw it.
    pub propose_seconds: Histogram,
    /// Proposals sent and not answered yet.
    pub proposals_in_flight: Gauge,
    /// Times this node saw the leader change (including to "no leader").
    pub leader_changes: Counter,
}

impl RaftMetrics {
    /// One proposal in flight until the guard drops (answered, or abandoned by its caller):
    /// counted in `proposals_in_flight` meanwhile, then timed in `propose_seconds`.
    pub fn proposal(&self) -> InFlight<'_> {
        self.proposals_in_flight.inc();
        InFlight { metrics: self, started: std::time::Instant::now() }
    }
}

/// See [`RaftMetrics::proposal`].
pub struct InFlight<'a> {
    metrics: &'a RaftMetrics,
    started: std::time::Instant,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.metrics.proposals_in_flight.dec();
        self.metrics.propose_seconds.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Default for RaftMetrics {
    fn default() -> Self {
        RaftMetrics {
            // 100 us to ~6.5 s.
            propose_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            proposals_in_flight: Gauge::default(),
            leader_changes: Counter::default(),
        }
    }
}

/// One job's values in a scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSample {
    pub id: JobId,
    pub name: String,
    pub state: &'static str,
    pub step: u64,
    pub generation: u64,
    pub world_size: u32,
    pub preemptions: u32,
    pub recoveries: u32,
    pub steps_lost: u64,
    pub cost_usd: f64,
    pub checkpoints: usize,
    /// When its first generation started (its first `gang` event), if it ever ran.
    pub first_ran_at_unix_ms: Option<u64>,
    /// When it ended, for a finished job.
    pub ended_at_unix_ms: Option<u64>,
}

/// What the first step of a job's current generation ends (pure, from the job's events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumption {
    /// A recovery: the job lost (or was about to lose) a gang member and stopped; timed from
    /// the first event since the previous generation's start (of one that trained: see
    /// [`resumption`]) that stopped training for it
    /// ([`flotilla_core::state::JobEvent::stops_for_a_loss`]), not from a notice the gang
    /// trained on through.
    Recovery { lost_at_unix_ms: u64 },
    /// A handover: the gang trained on through the notice until its replacement came, then
    /// stopped at `stopped_at_unix_ms` (its `checkpointed` event); the time from there to the
    /// first step is the training stall.
    Handover { stopped_at_unix_ms: u64 },
    /// A restart after a planned stop (to grow, for a job of higher priority, for a deadline:
    /// [`flotilla_core::state::JobEvent::planned_stop`]) at `stopped_at_unix_ms`: no
    /// interruption, so it feeds neither histogram; the job's events record what it moved.
    Restart { stopped_at_unix_ms: u64, reason: flotilla_core::state::StopReason },
    /// A restart after a generation that trained stopped because the store was out, at
    /// `stopped_at_unix_ms` ([`flotilla_core::state::JobEvent::stopped_by_outage`]): the time
    /// to the first step is a stall, but no loss (it feeds neither histogram).
    Outage { stopped_at_unix_ms: u64 },
}

/// What the job's current generation resumes from: `None` for a first generation.
pub fn resumption(events: &[flotilla_core::state::JobEvent]) -> Option<Resumption> {
    let mut gangs = events.iter().enumerate().filter(|(_, e)| e.kind == "gang").map(|(i, _)| i).rev();
    let current = gangs.next()?;
    // Since the previous generation that trained: one whose ranks found its resume point
    // unusable (`checkpoint_corrupt`) ended at its start, so the loss that stopped training
    // came before it (both members of a gang killed before the survivor wrote the state it
    // held: the next gang finds that checkpoint partial and the one after resumes); so did one
    // that broke before its first step (a member its peers could not reach at the rendezvous).
    let untrained = |e: &flotilla_core::state::JobEvent| e.kind == "checkpoint_corrupt" || e.ended_untrained();
    let (mut from, mut end) = (0, current);
    for previous in gangs {
        if !events[previous + 1..end].iter().any(untrained) {
            from = previous + 1;
            break;
        }
        end = previous;
    }
    let between = &events[from..current];
    // Across a generation that never trained, training stopped at the first stop or loss
    // before it: a handover's stop whose new gang then broke at the rendezvous counts from
    // the stop (the stall went on through the failed generation).
    if end < current
        && let Some(stop) =
            events[from..end].iter().find(|e| e.kind == "checkpointed" || e.stops_for_a_loss() || e.stopped_by_outage())
    {
        if stop.stopped_by_outage() {
            return Some(Resumption::Outage { stopped_at_unix_ms: stop.at_unix_ms });
        }
        return Some(Resumption::Recovery { lost_at_unix_ms: stop.since_unix_ms.unwrap_or(stop.at_unix_ms) });
    }
    // The handover event that re-forms the generation comes after the `gang` event of the
    // same Raft entry.
    let handed_over = events[current + 1..].iter().take_while(|e| e.kind != "gang").any(|e| e.is_handed_over());
    if handed_over && let Some(stop) = between.iter().rev().find(|e| e.kind == "checkpointed") {
        return Some(Resumption::Handover { stopped_at_unix_ms: stop.at_unix_ms });
    }
    // From the first event that stopped training for a loss (a silent member from its lease's
    // expiry, before the survivors' report). A notice that began a handover did not stop it:
    // the gang trained on, and a later loss or the leader's fallback stopped it. Only when
    // nothing recorded the stop (the noticed agent stopped on its own at the deadline) does
    // such a notice start the recovery, unless its member was swapped out live.
    let swapped_out = |worker: &str| between.iter().any(|e| e.live_swap_leaving() == Some(worker));
    let lost = between
        .iter()
        .find(|e| e.stops_for_a_loss())
        .or_else(|| between.iter().find(|e| e.noticed_worker().is_some_and(|worker| !swapped_out(worker))));
    if let Some(lost) = lost {
        return Some(Resumption::Recovery { lost_at_unix_ms: lost.since_unix_ms.unwrap_or(lost.at_unix_ms) });
    }
    if let Some(out) = between.iter().find(|e| e.stopped_by_outage()) {
        return Some(Resumption::Outage { stopped_at_unix_ms: out.at_unix_ms });
    }
    let stop = between.iter().rev().find(|e| e.kind == "checkpointed")?;
    let reason = stop.planned_stop()?;
    Some(Resumption::Restart { stopped_at_unix_ms: stop.at_unix_ms, reason })
}

/// Committed steps per second since the job first ran, until it ended or `now` (pure): stalls,
/// recoveries and re-trained steps all lower it.
pub fn goodput_steps_per_second(job: &JobSample, now_unix_ms: u64) -> Option<f64> {
    let started = job.first_ran_at_unix_ms?;
    let until = job.ended_at_unix_ms.unwrap_or(now_unix_ms);
    let seconds = until.saturating_sub(started) as f64 / 1e3;
    (seconds > 0.0).then(|| job.step as f64 / seconds)
}

/// What a scrape reads from the replicated state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateSample {
    pub jobs_by_state: BTreeMap<&'static str, i64>,
    pub workers_by_state: BTreeMap<&'static str, i64>,
    /// (market, instance type) -> running instances.
    pub instances: BTreeMap<(&'static str, String), i64>,
    pub jobs: Vec<JobSample>,
}

pub fn job_state_name(state: JobState) -> &'static str {
    match state {
        JobState::Pending => "pending",
        JobState::Provisioning => "provisioning",
        JobState::Running => "running",
        JobState::Recovering => "recovering",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

/// The scrape's view of `state` at `now_ms` (pure). Every job state and worker state is
/// present, zero or not, so a series does not vanish when its count drops to zero.
pub fn sample(state: &State, now_ms: u64) -> StateSample {
    let mut out = StateSample::default();
    for name in ["pending", "provisioning", "running", "recovering", "succeeded", "failed", "cancelled"] {
        out.jobs_by_state.insert(name, 0);
    }
    for condition in WorkerCondition::ALL {
        out.workers_by_state.insert(condition.name(), 0);
    }
    let states = state.shown_states();
    let shown = |job: &flotilla_core::state::Job| job_state_name(states.of(job));
    for job in state.jobs.values() {
        *out.jobs_by_state.entry(shown(job)).or_default() += 1;
    }
    for worker in state.workers.values() {
        *out.workers_by_state.entry(worker.condition(now_ms).name()).or_default() += 1;
    }
    for instance in state.instances.values().filter(|i| i.terminated_at_unix_ms.is_none()) {
        let market = if instance.spot { "spot" } else { "on_demand" };
        *out.instances.entry((market, instance.instance_type.clone())).or_default() += 1;
    }
    out.jobs = state
        .jobs
        .values()
        .rev()
        .take(JOBS_EXPORTED_MAX)
        .map(|job| JobSample {
            id: job.id,
            name: job.spec.name.clone(),
            state: shown(job),
            step: job.step,
            generation: job.generation,
            world_size: job.world_size,
            preemptions: job.preemptions,
            recoveries: job.recoveries,
            steps_lost: job.steps_lost,
            cost_usd: job.cost_usd,
            checkpoints: job.checkpoints.iter().filter(|c| !c.deleting).count(),
            first_ran_at_unix_ms: job.events.iter().find(|e| e.kind == "gang").map(|e| e.at_unix_ms),
            ended_at_unix_ms: job.state.is_terminal().then_some(job.updated_at_unix_ms),
        })
        .collect();
    out
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Encodes a scrape: the state sample, the leader's live progress for running jobs, this
/// node's Raft metrics and status.
pub fn render(
    sample: &StateSample,
    progress: &Progress,
    raft: &RaftMetrics,
    status: &crate::raft::node::NodeStatus,
    node_id: u64,
    now_unix_ms: u64,
) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("flotilla");
    let family = |registry: &mut Registry, name: &str, help: &str, values: Vec<(Labels, i64)>| {
        let family = Family::<Labels, Gauge>::default();
        for (labels, value) in values {
            family.get_or_create(&labels).set(value);
        }
        registry.register(name, help, family);
    };
    family(
        &mut registry,
        "jobs",
        "Training jobs by state",
        sample.jobs_by_state.iter().map(|(s, n)| (labels(&[("state", s)]), *n)).collect(),
    );
    family(
        &mut registry,
        "workers",
        "Registered workers by state (idle, busy, draining, suspect, lost)",
        sample.workers_by_state.iter().map(|(s, n)| (labels(&[("state", s)]), *n)).collect(),
    );
    family(
        &mut registry,
        "instances",
        "Running instances the autoscaler bought, by market (spot, on_demand) and instance type",
        sample
            .instances
            .iter()
            .map(|((market, kind), n)| (labels(&[("market", market), ("instance_type", kind)]), *n))
            .collect(),
    );
    let per_job = |job: &JobSample| labels(&[("job", &job.id.to_string()), ("name", &job.name)]);
    family(
        &mut registry,
        "job_step",
        "The last step a job completed (recorded at checkpoints and generation ends; live for running jobs)",
        sample
            .jobs
            .iter()
            .map(|j| {
                let live = progress.get(j.id, j.generation).map_or(0, |p| p.step);
                (per_job(j), j.step.max(live) as i64)
            })
            .collect(),
    );
    family(
        &mut registry,
        "job_world_size",
        "Workers in a job's current gang",
        sample.jobs.iter().map(|j| (per_job(j), i64::from(j.world_size))).collect(),
    );
    family(
        &mut registry,
        "job_generation",
        "A job's generation (a new one after each preemption or loss)",
        sample.jobs.iter().map(|j| (per_job(j), j.generation as i64)).collect(),
    );
    family(
        &mut registry,
        "job_checkpoints",
        "Recorded checkpoints a job keeps",
        sample.jobs.iter().map(|j| (per_job(j), j.checkpoints as i64)).collect(),
    );
    let counters = |registry: &mut Registry, name: &str, help: &str, value: &dyn Fn(&JobSample) -> f64| {
        let family = Family::<Labels, FloatCounter>::default();
        for job in &sample.jobs {
            family.get_or_create(&per_job(job)).inc_by(value(job));
        }
        registry.register(name, help, family);
    };
    counters(&mut registry, "job_preemptions", "Generations a job ended in order at a preemption notice", &|j| {
        f64::from(j.preemptions)
    });
    counters(&mut registry, "job_recoveries", "Generations a job lost to a hard loss and recovered from", &|j| {
        f64::from(j.recoveries)
    });
    counters(&mut registry, "job_steps_lost", "Steps a job trained twice because of losses", &|j| j.steps_lost as f64);
    counters(&mut registry, "job_cost_usd", "What a job's instances have cost it, USD", &|j| j.cost_usd);
    let gauges = |registry: &mut Registry, name: &str, help: &str, value: &dyn Fn(&JobSample) -> Option<f64>| {
        let family = Family::<Labels, FloatGauge>::default();
        for job in &sample.jobs {
            if let Some(v) = value(job) {
                family.get_or_create(&per_job(job)).set(v);
            }
        }
        registry.register(name, help, family);
    };
    gauges(&mut registry, "job_cost_per_step_usd", "What a job has cost per committed step so far, USD", &|j| {
        (j.step > 0).then(|| j.cost_usd / j.step as f64)
    });
    gauges(
        &mut registry,
        "job_goodput_steps_per_second",
        "Committed steps per second of the job's life since it first ran (stalls, recoveries and lost steps lower it)",
        &|j| goodput_steps_per_second(j, now_unix_ms),
    );
    registry.register(
        "recovery_seconds",
        "Time from a loss (a lost member, a notice the gang stopped for at once, or the fallback when no replacement came) to the next generation's first step, seen by the leader",
        progress.recovery_seconds.clone(),
    );
    registry.register(
        "handover_stall_seconds",
        "Time without training at a handover: from the gang's stop to the next generation's first step, seen by the leader",
        progress.handover_stall_seconds.clone(),
    );
    let live =
        |registry: &mut Registry, name: &str, help: &str, value: &dyn Fn(&flotilla_proto::v1::LiveProgress) -> f64| {
            let family = Family::<Labels, FloatGauge>::default();
            for job in sample.jobs.iter().filter(|j| j.state == "running") {
                if let Some(p) = progress.get(job.id, job.generation) {
                    family.get_or_create(&per_job(job)).set(value(&p));
                }
            }
            registry.register(name, help, family);
        };
    live(
        &mut registry,
        "job_loss",
        "Training loss of a running job's last reported step (served by the leader)",
        &|p| p.loss,
    );
    live(
        &mut registry,
        "job_samples_per_second",
        "Training throughput of a running job (served by the leader)",
        &|p| p.samples_per_s,
    );
    let raft_registry = registry.sub_registry_with_prefix("raft");
    raft_registry.register(
        "propose_seconds",
        "Time from a proposal on this node to its applied outcome",
        raft.propose_seconds.clone(),
    );
    raft_registry.register(
        "proposals_in_flight",
        "Proposals this node sent and has no answer for yet",
        raft.proposals_in_flight.clone(),
    );
    raft_registry.register("leader_changes", "Leader changes this node saw", raft.leader_changes.clone());
    let term = Gauge::<i64>::default();
    term.set(status.term as i64);
    raft_registry.register("term", "This node's Raft term", term);
    let leader = Gauge::<i64>::default();
    leader.set(i64::from(status.leader_id == Some(node_id)));
    raft_registry.register("is_leader", "1 when this node is the leader", leader);
    let mut text = String::new();
    encode(&mut text, &registry)?;
    Ok(text)
}

/// Counts leader changes as this node sees them, until the node stops.
pub async fn watch_leader(mut node: NodeHandle, raft: Arc<RaftMetrics>) {
    let mut leader = node.status().leader_id;
    while node.changed().await {
        let now = node.status().leader_id;
        if now != leader {
            raft.leader_changes.inc();
            leader = now;
        }
    }
}

/// What the HTTP port serves from.
pub struct Web {
    pub node: NodeHandle,
    pub progress: Arc<Progress>,
    /// The cluster store (job histories).
    pub store: flotilla_store::Location,
    /// `/api/...` needs one of these (any role); `/metrics` is open.
    pub tokens: flotilla_proto::auth::ApiTokens,
}

/// Serves `GET /metrics` (open), the dashboard page at `/` (open: it holds no data) and its JSON
/// views under `/api/` (a bearer token of any role; see `crate::dashboard`) on `listener` until
/// the process ends.
pub async fn serve(listener: TcpListener, web: Arc<Web>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let web = web.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &web).await {
                tracing::debug!(error = %e, "metrics request failed");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, web: &Web) -> std::io::Result<()> {
    let Some(request) = http::read_request(&mut stream).await? else { return Ok(()) };
    if request.method != "GET" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    let path = request.path.as_str();
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    if route == "/" || route == "/index.html" {
        return http::respond(&mut stream, 200, "text/html; charset=utf-8", PAGE_HEADERS, crate::dashboard::PAGE).await;
    }
    if route == "/favicon.ico" {
        return respond(&mut stream, 404, "text/plain", "").await;
    }
    if let Some(api) = route.strip_prefix("/api/") {
        if request.bearer().and_then(|token| web.tokens.role_of(token)).is_none() {
            return respond(&mut stream, 401, "text/plain", "send `Authorization: Bearer <API token>`\n").await;
        }
        return answer_api(&mut stream, web, api, query).await;
    }
    if route != "/metrics" {
        return respond(&mut stream, 404, "text/plain", "the metrics are at /metrics, the dashboard at /\n").await;
    }
    let node = &web.node;
    // One clock reading per scrape: the sample and the rendering see the same moment.
    let now_ms = crate::raft::node::now_unix_ms();
    let sampled = node.read_local(move |state| sample(state, now_ms)).await;
    let text = sampled.map_err(|e| e.to_string()).and_then(|s| {
        render(&s, &web.progress, &node.metrics, &node.status(), node.id, now_ms).map_err(|e| e.to_string())
    });
    match text {
        Ok(text) => {
            respond(&mut stream, 200, "application/openmetrics-text; version=1.0.0; charset=utf-8", &text).await
        }
        Err(e) => respond(&mut stream, 503, "text/plain", &format!("state unavailable: {e}\n")).await,
    }
}

/// The page loads nothing from elsewhere and cannot be framed.
const PAGE_HEADERS: &str = "Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:; frame-ancestors 'none'\r\n\
     X-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n";

/// `/api/<api>` for a caller whose token was checked: the dashboard's JSON views.
async fn answer_api(stream: &mut TcpStream, web: &Web, api: &str, query: &str) -> std::io::Result<()> {
    if let Some(job) = api.strip_prefix("jobs/").and_then(|rest| rest.strip_suffix("/history")) {
        let Ok(job) = job.parse::<JobId>() else {
            return respond(stream, 404, "text/plain", "no such job id (job-N)\n").await;
        };
        let points = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("points="))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(crate::history::POINTS_DEFAULT);
        return match crate::history::read(&web.store, job, points).await {
            Ok(points) => {
                let body = serde_json::json!({ "job": job.to_string(), "points": points }).to_string();
                respond(stream, 200, "application/json", &body).await
            }
            Err(e) => respond(stream, 503, "text/plain", &format!("{e}\n")).await,
        };
    }
    let progress = web.progress.clone();
    let now_unix_ms = crate::raft::node::now_unix_ms();
    let view = match api {
        "jobs" => web.node.read_local(move |state| Some(crate::dashboard::jobs(state, &progress))).await,
        "workers" => web.node.read_local(move |state| Some(crate::dashboard::workers(state, now_unix_ms))).await,
        "instances" => web.node.read_local(move |state| Some(crate::dashboard::instances(state, now_unix_ms))).await,
        "models" => web.node.read_local(|state| Some(crate::dashboard::models(state))).await,
        "inferences" => web.node.read_local(|state| Some(crate::dashboard::inferences(state))).await,
        _ => match api.strip_prefix("jobs/").map(str::parse::<JobId>) {
            Some(Ok(job)) => web.node.read_local(move |state| crate::dashboard::job(state, &progress, job)).await,
            _ => return respond(stream, 404, "text/plain", "no such view\n").await,
        },
    };
    match view {
        Ok(Some(body)) => respond(stream, 200, "application/json", &body.to_string()).await,
        Ok(None) => respond(stream, 404, "text/plain", "no such job\n").await,
        Err(e) => respond(stream, 503, "text/plain", &format!("state unavailable: {e}\n")).await,
    }
}

async fn respond(stream: &mut TcpStream, status: u16, content_type: &str, body: &str) -> std::io::Result<()> {
    http::respond(stream, status, content_type, "", body).await
}

#[cfg(test)]
mod tests {
    use flotilla_core::state::JobEvent;

    use super::*;

    fn event(at_unix_ms: u64, kind: &str) -> JobEvent {
        JobEvent { at_unix_ms, kind: kind.into(), message: String::new(), since_unix_ms: None }
    }

    /// A notice as the state machine words it: one the gang stops for at once, or one that
    /// begins a handover while the gang trains on.
    fn notice(at_unix_ms: u64, worker: &str, stops: bool) -> JobEvent {
        let then = if stops {
            format!("; {}", flotilla_core::state::CHECKPOINTING)
        } else {
            "; training on while a replacement is sought (until ...)".into()
        };
        JobEvent {
            at_unix_ms,
            kind: "preemption_notice".into(),
            message: format!("{worker} got a spot interruption notice (instance taken at ...){then}"),
            since_unix_ms: None,
        }
    }

    /// The event of a live swap: `replacement` took `leaving`'s rank without a stop.
    fn swapped(at_unix_ms: u64, replacement: u64, leaving: u64) -> JobEvent {
        let took = JobEvent::handed_over_message(
            flotilla_core::WorkerId(replacement),
            flotilla_core::WorkerId(leaving),
            500,
            at_unix_ms,
        );
        JobEvent {
            at_unix_ms,
            kind: "handover".into(),
            message: format!("{took}{}", flotilla_core::state::LIVE_SWAP),
            since_unix_ms: None,
        }
    }

    /// The gauge counts jobs by the state users see: a job that trained and waits to resume
    /// is `recovering` (the state machine keeps it Pending), one bought for is `provisioning`.
    #[test]
    fn jobs_are_counted_by_the_state_users_see() {
        use flotilla_core::state::Command;
        use flotilla_core::{JobId, WorkerId};
        let mut log = crate::testing::Log::job_of_two(2);
        let count = |log: &crate::testing::Log, name: &str| sample(&log.state, 0).jobs_by_state[name];
        assert_eq!(count(&log, "pending"), 1);
        log.step(Command::RequestInstances {
            request_id: "req-1".into(),
            job: Some(JobId(1)),
            instance_type: "g5.xlarge".into(),
            zone: "a".into(),
            spot: true,
            count: 1,
            usd_per_hour: 0.5,
        });
        assert_eq!((count(&log, "pending"), count(&log, "provisioning")), (0, 1));
        let job_id = JobId(1);
        log.step(Command::AssignGang { job_id, workers: vec![WorkerId(1), WorkerId(2)] });
        assert_eq!((count(&log, "provisioning"), count(&log, "running")), (0, 1));
        log.step(Command::WorkerLost { worker_id: WorkerId(2), last_step_seen: 0, last_heard_unix_ms: 0 });
        log.step(Command::GangLost { job_id, generation: 1 });
        assert_eq!((count(&log, "running"), count(&log, "recovering"), count(&log, "pending")), (0, 1, 0));
        assert_eq!(sample(&log.state, 0).jobs[0].state, "recovering");
    }

    #[test]
    fn a_recovery_starts_at_the_first_loss_since_the_previous_generation() {
        assert_eq!(resumption(&[]), None);
        assert_eq!(resumption(&[event(1, "gang")]), None, "a first generation recovers nothing");
        let grown = [event(1, "gang"), event(5, "checkpointed"), event(6, "gang")];
        assert_eq!(resumption(&grown), None, "a stop nothing asked for is no recovery");
        let preempted = [
            event(1, "gang"),
            notice(10, "worker-1", true),
            event(11, "worker_lost"),
            event(12, "checkpointed"),
            event(20, "gang"),
        ];
        assert_eq!(resumption(&preempted), Some(Resumption::Recovery { lost_at_unix_ms: 10 }));
        let earlier = [event(1, "gang"), event(10, "worker_lost"), event(20, "gang"), event(30, "gang")];
        assert_eq!(resumption(&earlier), None, "only losses since the previous generation");
        let silent = [event(1, "gang"), event(10, "member_lost"), event(14, "peer_lost"), event(20, "gang")];
        assert_eq!(resumption(&silent), Some(Resumption::Recovery { lost_at_unix_ms: 10 }), "from the lease's expiry");
        // When the leader knew when it last heard from the lost member: from there (the loss
        // stopped the gang then; its lease expired 5 s later).
        let heard = JobEvent { since_unix_ms: Some(5), ..event(10, "member_lost") };
        let silent = [event(1, "gang"), heard, event(14, "peer_lost"), event(20, "gang")];
        assert_eq!(resumption(&silent), Some(Resumption::Recovery { lost_at_unix_ms: 5 }), "from the last heartbeat");
        // Generation 2 never trained (its resume point was partial): generation 3's recovery
        // starts at the loss that stopped generation 1.
        let untrained = [
            event(1, "gang"),
            event(10, "peer_lost"),
            event(20, "gang"),
            event(30, "checkpoint_corrupt"),
            event(31, "gang"),
        ];
        assert_eq!(resumption(&untrained), Some(Resumption::Recovery { lost_at_unix_ms: 10 }), "across it");
        let corrupt_first = [event(1, "gang"), event(2, "checkpoint_corrupt"), event(3, "gang")];
        assert_eq!(resumption(&corrupt_first), None, "no loss before it");
    }

    /// A generation that broke before its first step (a member its peers could not reach at
    /// the rendezvous) did not end the stall: the next one's is timed from the stop or loss
    /// before it, a handover's stop included (its new gang never trained).
    #[test]
    fn a_generation_that_never_trained_is_timed_through() {
        let untrained = |at_unix_ms: u64, generation: u64| JobEvent {
            message: JobEvent::peer_lost_message(generation, 68, true, "", 0, "rank 1 was lost during rendezvous"),
            ..event(at_unix_ms, "peer_lost")
        };
        let lost = [event(1, "gang"), event(10, "peer_lost"), event(18, "gang"), untrained(19, 2), event(30, "gang")];
        assert_eq!(resumption(&lost), Some(Resumption::Recovery { lost_at_unix_ms: 10 }), "from the first loss");
        let mut took = event(20, "handover");
        took.message = JobEvent::handed_over_message(flotilla_core::WorkerId(3), flotilla_core::WorkerId(2), 68, 10);
        let handed = [
            event(1, "gang"),
            notice(5, "worker-2", false),
            event(15, "checkpointed"),
            event(20, "gang"),
            took,
            untrained(21, 2),
            event(40, "gang"),
        ];
        assert_eq!(resumption(&handed), Some(Resumption::Recovery { lost_at_unix_ms: 15 }), "from the stop");
        // A break after training starts the stall itself, as before.
        let trained = JobEvent {
            message: JobEvent::peer_lost_message(2, 90, false, "", 0, "rank 1 was lost during all_reduce"),
            ..event(25, "peer_lost")
        };
        let later = [event(1, "gang"), event(10, "peer_lost"), event(18, "gang"), trained, event(30, "gang")];
        assert_eq!(resumption(&later), Some(Resumption::Recovery { lost_at_unix_ms: 25 }));
        // Starts that found the store out (one event for all the tries) are timed through too.
        let store_out = JobEvent {
            message: JobEvent::store_unavailable_message(3, 68, true, " (worker-3)", (4, 70, 80), "unreachable"),
            ..event(90, "store_unavailable")
        };
        let waited =
            [event(1, "gang"), event(10, "peer_lost"), event(18, "gang"), store_out.clone(), event(170, "gang")];
        assert_eq!(resumption(&waited), Some(Resumption::Recovery { lost_at_unix_ms: 10 }), "from the loss");
        // A generation that trained and then stopped for the store: the stall runs from that
        // stop, through the tries that found the store still out.
        let stopped_out = JobEvent {
            message: JobEvent::store_unavailable_message(1, 90, false, " (worker-1)", (1, 0, 1), "unreachable"),
            ..event(50, "store_unavailable")
        };
        let out = [event(1, "gang"), stopped_out.clone(), event(60, "gang")];
        assert_eq!(resumption(&out), Some(Resumption::Outage { stopped_at_unix_ms: 50 }));
        let retried = [event(1, "gang"), stopped_out, event(60, "gang"), store_out, event(170, "gang")];
        assert_eq!(resumption(&retried), Some(Resumption::Outage { stopped_at_unix_ms: 50 }), "through the tries");
    }

    /// A generation after a stop to grow, for a job of higher priority or for a deadline is a
    /// restart from that stop; one after a loss during such a stop is still a recovery.
    #[test]
    fn a_planned_stop_is_a_restart_from_the_stop() {
        use flotilla_core::state::StopReason;
        let stopped = |at_unix_ms: u64, why: &str| JobEvent {
            message: JobEvent::checkpointed_message(1, why, 90, 0),
            ..event(at_unix_ms, "checkpointed")
        };
        for reason in [StopReason::Grow, StopReason::Priority, StopReason::Deadline] {
            let events = [event(1, "gang"), stopped(5, reason.name()), event(9, "gang")];
            assert_eq!(resumption(&events), Some(Resumption::Restart { stopped_at_unix_ms: 5, reason }), "{reason:?}");
        }
        for why in ["budget", "stop"] {
            let events = [event(1, "gang"), stopped(5, why), event(9, "gang")];
            assert_eq!(resumption(&events), None, "{why}");
        }
        let lost = [event(1, "gang"), stopped(5, "grow"), event(7, "worker_lost"), event(9, "gang")];
        assert_eq!(resumption(&lost), Some(Resumption::Recovery { lost_at_unix_ms: 7 }), "a loss comes first");
        let earlier = [event(1, "gang"), stopped(5, "grow"), event(9, "gang"), event(20, "gang")];
        assert_eq!(resumption(&earlier), None, "only the stop before the current generation");
    }

    #[test]
    fn a_handover_is_timed_from_the_stop_not_the_notice() {
        let mut took = event(61_000, "handover");
        took.message = flotilla_core::state::JobEvent::handed_over_message(
            flotilla_core::WorkerId(3),
            flotilla_core::WorkerId(1),
            711,
            60_000,
        );
        assert_eq!(took.message, "worker-3 took worker-1's rank at step 711, 60000 ms after the notice");
        let mut started = event(50_000, "handover");
        started.message = "worker-3 replaces worker-1; checkpointing at the next step".into();
        let handed = [
            event(1, "gang"),
            event(1_000, "preemption_notice"),
            started,
            event(61_000, "checkpointed"),
            event(61_000, "gang"),
            took.clone(),
        ];
        assert_eq!(resumption(&handed), Some(Resumption::Handover { stopped_at_unix_ms: 61_000 }));
        // A handover of an earlier generation does not make the next one a handover.
        let later = [&handed[..], &[event(70_000, "worker_lost"), event(80_000, "gang")]].concat();
        assert_eq!(resumption(&later), Some(Resumption::Recovery { lost_at_unix_ms: 70_000 }));
    }

    /// A notice that began a handover did not stop training: a later loss, or the leader's
    /// fallback request, starts the recovery; the notice only when nothing recorded the stop,
    /// and never when its member was swapped out live.
    #[test]
    fn a_recovery_starts_where_training_stopped_not_at_a_notice_the_gang_trained_through() {
        assert_eq!(swapped(2_000, 3, 2).live_swap_leaving(), Some("worker-2"));
        assert_eq!(notice(1_000, "worker-2", false).noticed_worker(), Some("worker-2"));
        assert!(notice(1_000, "worker-2", true).stops_for_a_loss());
        assert!(!notice(1_000, "worker-2", false).stops_for_a_loss());
        // Swapped out live, then a member killed in the same generation: from the kill.
        let events =
            [event(1, "gang"), notice(1_000, "worker-2", false), swapped(2_000, 3, 2), event(15_000, "peer_lost")];
        let regrouped = [&events[..], &[event(15_100, "gang")]].concat();
        assert_eq!(resumption(&regrouped), Some(Resumption::Recovery { lost_at_unix_ms: 15_000 }));
        // Noticed, and a member killed before the replacement came (the swap comes later, in
        // the next generation): from the kill, not the notice the gang trained through.
        let events = [event(1, "gang"), notice(1_000, "worker-2", false), event(9_000, "worker_lost")];
        let regrouped = [&events[..], &[event(9_100, "gang"), swapped(12_000, 3, 2)]].concat();
        assert_eq!(resumption(&regrouped), Some(Resumption::Recovery { lost_at_unix_ms: 9_000 }));
        // No replacement in time: from the leader's fallback request.
        let mut fallback = event(75_000, "checkpoint_requested");
        fallback.message = JobEvent::checkpoint_requested_message(flotilla_core::state::StopReason::Preemption);
        assert!(fallback.stops_for_a_loss());
        let mut grow = event(75_000, "checkpoint_requested");
        grow.message = JobEvent::checkpoint_requested_message(flotilla_core::state::StopReason::Grow);
        assert!(!grow.stops_for_a_loss(), "growing stops for no loss");
        let events = [
            event(1, "gang"),
            notice(1_000, "worker-2", false),
            fallback,
            event(75_040, "checkpointed"),
            event(80_000, "gang"),
        ];
        assert_eq!(resumption(&events), Some(Resumption::Recovery { lost_at_unix_ms: 75_000 }));
        // Nothing recorded the stop (the noticed agent stopped on its own): from the notice.
        let events =
            [event(1, "gang"), notice(1_000, "worker-2", false), event(76_000, "checkpointed"), event(80_000, "gang")];
        assert_eq!(resumption(&events), Some(Resumption::Recovery { lost_at_unix_ms: 1_000 }));
        // ... but not from one whose member was swapped out live.
        let events = [
            event(1, "gang"),
            notice(1_000, "worker-2", false),
            swapped(2_000, 3, 2),
            event(5_000, "checkpointed"),
            event(6_000, "gang"),
        ];
        assert_eq!(resumption(&events), None, "nothing was lost");
    }

    #[test]
    fn goodput_counts_committed_steps_over_the_jobs_life() {
        let mut job = JobSample {
            id: JobId(1),
            name: "j".into(),
            state: "running",
            step: 600,
            generation: 2,
            world_size: 2,
            preemptions: 1,
            recoveries: 0,
            steps_lost: 0,
            cost_usd: 3.0,
            checkpoints: 1,
            first_ran_at_unix_ms: Some(10_000),
            ended_at_unix_ms: None,
        };
        assert_eq!(goodput_steps_per_second(&job, 70_000), Some(10.0));
        job.ended_at_unix_ms = Some(40_000);
        assert_eq!(goodput_steps_per_second(&job, 70_000), Some(20.0), "a finished job's life ends");
        job.first_ran_at_unix_ms = None;
        assert_eq!(goodput_steps_per_second(&job, 70_000), None, "never ran");
    }
}
