//! The leader's autoscaling loop: buys capacity for the gangs that wait, gives idle capacity
//! back, stops jobs at their budget, and keeps the provider and the replicated state in step.
//!
//! ```text
//!   every pass (leader only):
//!     1. requests recorded but not settled (a previous leader may have died mid-way):
//!          launch again with the same client token (idempotent) -> InstancesLaunched / LaunchFailed
//!     2. running jobs past capacity.budget_usd -> RequestCheckpoint{Budget}
//!        jobs out of slack for capacity.deadline_h (autoscale::deadline: remaining work at the
//!          pace rank 0 reports, a restart and a checkpoint interval no longer fit) -> MoveToOnDemand
//!        instances with no registered worker REGISTER_TIMEOUT after launch (no-shows: a broken
//!          image or boot script) -> provider.terminate -> InstancesNoShow (an event on the job
//!          they were bought for); their pool backs off as after a capacity error
//!     3. autoscale::plan(gangs, held instances, market quotes (spot prices refreshed from the
//!          provider every 5 min where it has them; interruption rates raised by the notices
//!          this leader has seen in correlated pools, autoscale::risk), limits, back-off)
//!          Launch    -> RequestInstances (Raft) -> provider.launch(token = request id) -> step 1's outcome
//!          Terminate -> provider.terminate -> InstancesTerminated
//!     4. every RECONCILE_EVERY: describe by cluster tag -> terminate orphans (ours, unknown, not
//!          an unsettled request's); record instances the cloud took back
//! ```
//!
//! Every decision is recorded through Raft *before* it is carried out, and carried out with an
//! idempotent token, so whatever crashes where, a new leader finishes it and nothing is
//! launched twice. Back-off, interruption risk and idle timers are the leader's memory (a new leader starts them
//! afresh: conservative). The pass is generic over [`Control`], so the simulation test drives it
//! against a plain state machine with injected leader crashes.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use flotilla_core::autoscale::deadline::{Pace, Slack};
use flotilla_core::autoscale::risk::PoolRisk;
use flotilla_core::autoscale::{self, Backoff, Decision, Gang, Held, Limits, PoolKey};
use flotilla_core::market::Trace;
use flotilla_core::state::{
    Applied, Command, InstanceRequest, JobState, LaunchedInstance, RequestState, State, StopReason,
};
use flotilla_core::{JobId, WorkerId};
use flotilla_proto::ApiError;

use crate::provider::{DynProvider, Instance, LaunchSpec, ProviderError};

/// A failed launch's text in a job's reason, at most (the provider's message, clipped in the
/// middle).
const FAILURE_TEXT_MAX: usize = 400;

/// How often the leader runs a pass.
pub const PASS_EVERY: Duration = Duration::from_secs(2);
/// How often the cloud's view is compared with the state (orphans, instances taken back).
pub const RECONCILE_EVERY_MS: u64 = 30_000;
/// How often live spot prices are read from the provider (where it has them).
pub const PRICES_EVERY_MS: u64 = 5 * 60_000;
/// An instance is believed gone only when a describe misses it this long after its launch.
pub const DESCRIBE_GRACE_MS: u64 = 5 * 60_000;
/// An instance whose worker has not registered this long after launch counts as idle (a broken
/// image never holds capacity forever).
pub const REGISTER_TIMEOUT_MS: u64 = 10 * 60_000;

#[derive(Debug, Clone)]
pub struct AutoscaleConfig {
    pub limits: Limits,
    /// Prices and capacity per pool: a trace (replayed from the coordinator's start) or a
    /// one-row-per-pool price list.
    pub market: Trace,
    /// Tags on every instance of this cluster (`flotilla-cluster=<id>`).
    pub cluster_tags: BTreeMap<String, String>,
    /// Prefix of request ids (the cluster id).
    pub cluster_id: String,
    /// When the market's hour 0 is, in Unix ms.
    pub market_start_unix_ms: u64,
}

/// What a pass needs from the replicated state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Input {
    pub gangs: Vec<Gang>,
    /// Instances held (with `idle_since_ms` not yet filled: the leader's memory does that).
    pub held: Vec<Held>,
    /// Of `held`, those idle now (a worker without a job, or never registered in time).
    pub idle: BTreeSet<String>,
    pub outstanding: Vec<InstanceRequest>,
    /// (job, generation) of running jobs that reached their budget.
    pub over_budget: Vec<(JobId, u64)>,
    /// Instances the state believes alive.
    pub known: BTreeSet<String>,
    /// Their launch times.
    pub launched_at: BTreeMap<String, u64>,
    /// Spot instances whose worker got an interruption notice, with their pool.
    pub interrupted: Vec<(String, PoolKey)>,
    /// Jobs with a deadline that may still run on spot.
    pub deadlines: Vec<DeadlineJob>,
    /// Instances whose worker has not registered [`REGISTER_TIMEOUT_MS`] after their launch
    /// (a broken image or boot script, or no route to the coordinators), with their pool and
    /// market: no capacity for any gang; the pass terminates them and backs their pool off.
    pub no_shows: Vec<(String, PoolKey, bool)>,
}

/// A job with `capacity.deadline_h` not yet moved to on-demand.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadlineJob {
    pub job: JobId,
    pub generation: u64,
    pub running: bool,
    pub deadline_unix_ms: u64,
    /// Where a new generation would resume (its newest checkpoint's step).
    pub resume_step: u64,
    pub checkpoint_every_steps: u64,
}

/// What rank 0 last reported of a running generation (kept in the leader's memory).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Live {
    pub step: u64,
    pub total_steps: u64,
    pub eta_ms: u64,
}

/// Reads a pass's input from the state (pure).
pub fn input(state: &State, now_ms: u64) -> Input {
    let mut out = Input::default();
    let live_workers: Vec<_> = state.workers.values().filter(|w| w.lost_at_unix_ms.is_none()).collect();
    let live_by_instance: BTreeMap<&str, &flotilla_core::state::Worker> =
        live_workers.iter().map(|w| (w.info.instance_id.as_str(), *w)).collect();
    let lost_instances: BTreeSet<&str> =
        state.workers.values().filter(|w| w.lost_at_unix_ms.is_some()).map(|w| w.info.instance_id.as_str()).collect();
    for request in state.instance_requests.values().filter(|r| r.state == RequestState::Requested) {
        out.outstanding.push(request.clone());
    }
    let spares: BTreeMap<WorkerId, JobId> = flotilla_core::state::warm_spares(state).into_iter().collect();
    for instance in state.instances.values().filter(|i| i.terminated_at_unix_ms.is_none()) {
        out.known.insert(instance.id.clone());
        out.launched_at.insert(instance.id.clone(), instance.launched_at_unix_ms);
        let worker = live_by_instance.get(instance.id.as_str());
        let busy = worker.is_some_and(|w| w.job.is_some());
        if instance.spot && worker.is_some_and(|w| w.draining) {
            let pool = PoolKey { instance_type: instance.instance_type.clone(), zone: instance.zone.clone() };
            out.interrupted.push((instance.id.clone(), pool));
        }
        let registered = worker.is_some();
        // Its worker registered and was lost: not an instance still booting (nothing will
        // register on it), and no capacity; given back after the idle cooldown.
        // Or its peers cannot reach it (held out): no capacity either while the hold lasts.
        let unreachable = worker.is_some_and(|w| !busy && w.held_unreachable(now_ms));
        let overdue = !registered && now_ms.saturating_sub(instance.launched_at_unix_ms) >= REGISTER_TIMEOUT_MS;
        let lost = (!registered && lost_instances.contains(instance.id.as_str())) || unreachable;
        if overdue && !lost {
            let pool = PoolKey { instance_type: instance.instance_type.clone(), zone: instance.zone.clone() };
            out.no_shows.push((instance.id.clone(), pool, instance.spot));
        }
        // A no-show is no capacity either: it used to count as idle capacity for the gang it
        // was bought for, which then waited for it forever while it was paid for.
        let lost = lost || overdue;
        if (registered && !busy && !worker.is_some_and(|w| w.draining)) || overdue || lost {
            out.idle.insert(instance.id.clone());
        }
        let reserved_for = if registered || lost {
            None
        } else {
            state.instance_requests.get(&instance.request_id).and_then(|r| r.job)
        };
        out.held.push(Held {
            id: instance.id.clone(),
            pool: PoolKey { instance_type: instance.instance_type.clone(), zone: instance.zone.clone() },
            gpus: worker.map_or(0, |w| w.info.gpus).max(1),
            spot: instance.spot,
            usd_per_hour: instance.usd_per_hour,
            busy: busy || worker.is_some_and(|w| w.draining),
            reserved_for,
            idle_since_ms: None,
            lost,
            spare_of: worker.and_then(|w| spares.get(&w.id).copied()),
        });
    }
    // Requested instances not launched yet hold their place (so nothing is bought twice).
    for request in &out.outstanding {
        for n in 0..request.count {
            out.held.push(Held {
                id: format!("{}#{n}", request.request_id),
                pool: PoolKey { instance_type: request.instance_type.clone(), zone: request.zone.clone() },
                gpus: 1,
                spot: request.spot,
                usd_per_hour: request.usd_per_hour,
                busy: false,
                reserved_for: request.job,
                idle_since_ms: None,
                lost: false,
                spare_of: None,
            });
        }
    }
    // Workers without an instance record (started by hand, the local provider): capacity too.
    for worker in live_workers.iter().filter(|w| !state.instances.contains_key(&w.info.instance_id)) {
        out.held.push(Held {
            id: format!("worker:{}", worker.id),
            pool: PoolKey { instance_type: worker.info.instance_type.clone(), zone: worker.info.zone.clone() },
            gpus: worker.info.gpus.max(1),
            spot: false,
            usd_per_hour: 0.0,
            busy: worker.job.is_some() || worker.draining,
            reserved_for: None,
            idle_since_ms: None,
            lost: worker.job.is_none() && worker.held_unreachable(now_ms),
            spare_of: spares.get(&worker.id).copied(),
        });
    }
    for job in state.jobs.values() {
        let budget_left = job.spec.capacity.budget_usd.map(|b| b - job.cost_usd_at(now_ms));
        let active = matches!(job.state, JobState::Pending | JobState::Running);
        if let Some(hours) = job.spec.capacity.deadline_h
            && active
            && !job.needs_on_demand()
            && job.checkpoint_requested != Some(StopReason::Budget)
        {
            out.deadlines.push(DeadlineJob {
                job: job.id,
                generation: job.generation,
                running: job.state == JobState::Running,
                deadline_unix_ms: job.submitted_at_unix_ms.saturating_add((hours * 3_600_000.0) as u64),
                resume_step: job.latest_checkpoint.as_ref().map_or(0, |c| c.step),
                checkpoint_every_steps: job.spec.checkpoint.every_steps,
            });
        }
        if !active {
            continue;
        }
        // The job's gang as the autoscaler sees it: `min` workers of its types and market.
        // Out of slack for its deadline, a spot job buys on-demand (whatever its fallback).
        let wanted = Gang {
            job: job.id,
            priority: job.spec.priority,
            order: job.submitted_index,
            workers: job.spec.workers.min,
            gpus_per_worker: job.spec.workers.gpus,
            instance_types: job.spec.capacity.instance_types.clone(),
            spot: !job.needs_on_demand(),
            on_demand_fallback: job.spec.capacity.on_demand_fallback || job.on_demand_only,
            max_price_usd_per_hour: job.spec.capacity.max_price_usd_per_hour,
            budget_left_usd: budget_left,
            pool: None,
            mixed: job.spec.capacity.mixed_types,
            avoid: None,
        };
        // Warm spares (`capacity.spares`): idle workers kept in a running gang's pool, bought
        // below every waiting gang; idle instances there count toward them, so they are not
        // given back. A hard loss or a notice then regroups with one at once (the scheduler and
        // the handover take free workers) instead of waiting for an instance to boot.
        if job.state == JobState::Running
            && job.spec.capacity.spares > 0
            && job.checkpoint_requested.is_none()
            && !budget_left.is_some_and(|left| left <= 0.0)
            && let Some(first) = job.gang.first().and_then(|id| state.workers.get(id))
        {
            let pool = PoolKey { instance_type: first.info.instance_type.clone(), zone: first.info.zone.clone() };
            out.gangs.push(Gang {
                priority: i32::MIN,
                workers: job.spec.capacity.spares,
                pool: Some(pool),
                mixed: false,
                ..wanted.clone()
            });
        }
        match job.state {
            JobState::Pending => out.gangs.push(wanted),
            JobState::Running if budget_left.is_some_and(|left| left <= 0.0) && job.checkpoint_requested.is_none() => {
                out.over_budget.push((job.id, job.generation));
            }
            // Noticed members' replacements, bought at the notice while the gang trains on
            // (one per member still without one, outside the first one's pool).
            JobState::Running if job.awaited_handovers().next().is_some() => {
                let leaving = job.awaited_handovers().next().and_then(|h| state.workers.get(&h.leaving));
                out.gangs.push(Gang {
                    order: 0,
                    workers: job.awaited_handovers().count() as u32,
                    mixed: false,
                    avoid: leaving
                        .map(|w| PoolKey { instance_type: w.info.instance_type.clone(), zone: w.info.zone.clone() }),
                    ..wanted
                });
            }
            // An elastic job below its max grows on spot in its gang's pool when capacity is
            // there (the scheduler regroups it once the workers register).
            JobState::Running
                if !job.needs_on_demand()
                    && (job.gang.len() as u32) < job.spec.workers.max
                    && job.checkpoint_requested.is_none() =>
            {
                let members: Vec<_> = job.gang.iter().filter_map(|id| state.workers.get(id)).collect();
                let Some(first) = members.first() else { continue };
                if members.iter().any(|w| w.draining || w.lost_at_unix_ms.is_some()) {
                    continue; // a member is leaving: the job regroups anyway
                }
                let pool = PoolKey { instance_type: first.info.instance_type.clone(), zone: first.info.zone.clone() };
                let missing = job.spec.workers.max - job.gang.len() as u32;
                let gang = Gang::growth(job.id, job.submitted_index, missing, job.spec.workers.gpus, pool);
                out.gangs.push(Gang {
                    instance_types: job.spec.capacity.instance_types.clone(),
                    max_price_usd_per_hour: job.spec.capacity.max_price_usd_per_hour,
                    budget_left_usd: budget_left,
                    ..gang
                });
            }
            _ => {}
        }
    }
    // Inference jobs want workers for their pending shards: CPU work, any pool, spot first.
    for job in state.inferences.values().filter(|j| j.wants_workers() > 0) {
        out.gangs.push(Gang::unconstrained(job.id, job.submitted_index, job.wants_workers() as u32, 0));
    }
    out
}

/// How a pass reads the state and records decisions: Raft in production.
pub trait Control {
    fn input(&mut self, now_ms: u64) -> impl Future<Output = Result<Input, ApiError>> + Send;
    fn propose(&mut self, command: Command) -> impl Future<Output = Result<Applied, ApiError>> + Send;
    /// Rank 0's latest report for the running `generation` of `job` (live progress is in the
    /// leader's memory, not replicated).
    fn live(&self, job: JobId, generation: u64) -> Option<Live>;
}

/// The leader's view in production: the replicated state through its node, live progress
/// from its memory.
pub struct Leader {
    pub node: crate::raft::node::NodeHandle,
    pub progress: std::sync::Arc<crate::progress::Progress>,
}

impl Control for Leader {
    async fn input(&mut self, now_ms: u64) -> Result<Input, ApiError> {
        self.node.read_local(move |state| input(state, now_ms)).await
    }

    async fn propose(&mut self, command: Command) -> Result<Applied, ApiError> {
        self.node.propose(command).await
    }

    fn live(&self, job: JobId, generation: u64) -> Option<Live> {
        let p = self.progress.get(job, generation)?;
        Some(Live { step: p.step, total_steps: p.total_steps, eta_ms: p.eta_ms })
    }
}

/// What the autoscaler says of each gang it buys for or cannot buy for (shared with the
/// scheduling loop, which adds it to the job's pending reason): the leader's memory, replaced
/// at every pass, empty on a node that does not lead.
pub type CapacityNotes = std::sync::Arc<std::sync::Mutex<BTreeMap<JobId, String>>>;

/// The leader's memory between passes.
#[derive(Debug, Default)]
pub struct Memory {
    /// The last pass's word on each waiting gang: buying, starting, or why it cannot buy.
    pub notes: BTreeMap<JobId, String>,
    /// The last failed launch for each job since its last successful one (what the provider
    /// said: a dry spot pool, a quota, an image that does not exist, missing permissions).
    failures: BTreeMap<JobId, String>,
    pub backoff: Backoff,
    /// Interruptions this leader has seen, for the correlated risk of every pool.
    pub risk: PoolRisk,
    /// Instances whose interruption is already in `risk`.
    noticed: BTreeSet<String>,
    /// Instance id -> when this leader first saw it idle.
    idle_since: BTreeMap<String, u64>,
    requests_made: u64,
    last_reconcile_ms: u64,
    /// Live spot prices per (type, zone) from the provider, over the market file's.
    spot_prices: BTreeMap<(String, String), f64>,
    last_prices_ms: u64,
    /// The latest pace of each job with a deadline (kept while it waits between generations).
    paces: BTreeMap<JobId, Pace>,
}

/// What a pass did (for logs and tests).
#[derive(Debug, Default, PartialEq)]
pub struct PassReport {
    pub launched: Vec<String>,
    pub terminated: Vec<String>,
    pub orphans_terminated: Vec<String>,
    pub budget_stops: Vec<JobId>,
    pub deadline_moves: Vec<JobId>,
    /// Instances terminated because no worker registered from them in time.
    pub no_shows: Vec<String>,
}

fn launch_spec(config: &AutoscaleConfig, request: &InstanceRequest) -> LaunchSpec {
    let mut tags = config.cluster_tags.clone();
    if let Some(job) = request.job {
        tags.insert("flotilla-job".into(), job.to_string());
    }
    LaunchSpec {
        instance_type: request.instance_type.clone(),
        zone: Some(request.zone.clone()),
        spot: request.spot,
        count: request.count,
        on_demand_base: 0,
        tags,
        client_token: request.request_id.clone(),
    }
}

/// Carries out a recorded request and records the outcome.
async fn settle<C: Control>(
    control: &mut C,
    provider: &dyn DynProvider,
    config: &AutoscaleConfig,
    memory: &mut Memory,
    request: &InstanceRequest,
    now_ms: u64,
    report: &mut PassReport,
) -> Result<(), ApiError> {
    let pool = PoolKey { instance_type: request.instance_type.clone(), zone: request.zone.clone() };
    let launched = provider.launch_dyn(&launch_spec(config, request)).await;
    if let Some(job) = request.job {
        match &launched {
            Ok(_) => {
                memory.failures.remove(&job);
            }
            Err(e) => {
                let market = if request.spot { "spot" } else { "on-demand" };
                let failure = format!("{} {market} in {pool}: {e}", request.count);
                memory.failures.insert(job, flotilla_core::text::clip_middle(failure, FAILURE_TEXT_MAX));
            }
        }
    }
    let command = match launched {
        Ok(instances) => {
            memory.backoff.succeeded(&pool, request.spot);
            report.launched.extend(instances.iter().map(|i| i.id.clone()));
            Command::InstancesLaunched {
                request_id: request.request_id.clone(),
                instances: instances
                    .into_iter()
                    .map(|i| LaunchedInstance { id: i.id, zone: i.zone, spot: i.spot })
                    .collect(),
            }
        }
        Err(ProviderError::Capacity(reason)) => {
            memory.backoff.failed(&pool, request.spot, now_ms);
            Command::LaunchFailed { request_id: request.request_id.clone(), reason, capacity: true }
        }
        Err(e) => {
            // Never a tight retry loop, whatever the error.
            memory.backoff.failed(&pool, request.spot, now_ms);
            Command::LaunchFailed { request_id: request.request_id.clone(), reason: e.to_string(), capacity: false }
        }
    };
    control.propose(command).await.map(|_| ())
}

/// The word on each gang (pure): the plan's reason where it bought or could not buy, else how
/// many instances bought for the job are still starting; then the job's last failed launch.
fn notes(
    held: &[Held],
    mut waiting: BTreeMap<JobId, String>,
    failures: &BTreeMap<JobId, String>,
) -> BTreeMap<JobId, String> {
    let mut starting: BTreeMap<JobId, usize> = BTreeMap::new();
    for h in held.iter().filter(|h| !h.busy && !h.lost && h.idle_since_ms.is_none()) {
        if let Some(job) = h.reserved_for {
            *starting.entry(job).or_default() += 1;
        }
    }
    for (job, n) in starting {
        waiting.entry(job).or_insert_with(|| {
            format!("{n} instance(s) bought for it are starting (their workers register as they boot)")
        });
    }
    for (job, failure) in failures {
        let said = waiting.entry(*job).or_default();
        let joint = if said.is_empty() { "" } else { "; " };
        *said = format!("{said}{joint}the last launch failed: {failure}");
    }
    waiting
}

/// Moves the jobs out of slack for their deadline to on-demand capacity.
async fn deadline_moves<C: Control>(
    control: &mut C,
    config: &AutoscaleConfig,
    memory: &mut Memory,
    jobs: &[DeadlineJob],
    now_ms: u64,
    report: &mut PassReport,
) -> Result<(), ApiError> {
    memory.paces.retain(|id, _| jobs.iter().any(|d| d.job == *id));
    for d in jobs {
        let live = if d.running { control.live(d.job, d.generation) } else { None };
        if let Some(pace) = live.and_then(|l| Pace::from_report(l.step, l.total_steps, l.eta_ms)) {
            memory.paces.insert(d.job, pace);
        }
        // Without a pace yet (no report since this leader took over), nothing to judge by.
        let Some(pace) = memory.paces.get(&d.job) else { continue };
        let step = live.map_or(d.resume_step, |l| l.step);
        let hours = |ms: u64| ms as f64 / 3_600_000.0;
        let slack = Slack {
            now_h: hours(now_ms),
            deadline_h: hours(d.deadline_unix_ms),
            remaining_h: pace.remaining_h(step),
            restart_h: config.limits.interruption_cost_hours,
            at_risk_h: pace.at_risk_h(d.checkpoint_every_steps),
        };
        if !slack.out() {
            continue;
        }
        let reason = format!(
            "deadline in {:.2} h, {:.2} h of work left ({} steps at {:.2} s/step) with {:.2} h for a restart and {:.2} h at risk",
            hours(d.deadline_unix_ms.saturating_sub(now_ms)),
            slack.remaining_h,
            pace.total_steps.saturating_sub(step),
            pace.ms_per_step / 1e3,
            slack.restart_h,
            slack.at_risk_h,
        );
        control.propose(Command::MoveToOnDemand { job_id: d.job, reason }).await?;
        memory.paces.remove(&d.job);
        report.deadline_moves.push(d.job);
    }
    Ok(())
}

/// One autoscaling pass at `now_ms` (see the module docs).
pub async fn pass<C: Control>(
    control: &mut C,
    provider: &dyn DynProvider,
    config: &AutoscaleConfig,
    memory: &mut Memory,
    now_ms: u64,
) -> Result<PassReport, ApiError> {
    let mut report = PassReport::default();
    let input = control.input(now_ms).await?;
    for request in &input.outstanding {
        settle(control, provider, config, memory, request, now_ms, &mut report).await?;
    }
    for (job_id, generation) in &input.over_budget {
        control
            .propose(Command::RequestCheckpoint {
                job_id: *job_id,
                generation: *generation,
                reason: StopReason::Budget,
            })
            .await?;
        report.budget_stops.push(*job_id);
    }
    deadline_moves(control, config, memory, &input.deadlines, now_ms, &mut report).await?;
    let input = if input.outstanding.is_empty() && report.deadline_moves.is_empty() {
        input
    } else {
        control.input(now_ms).await?
    };
    // No-shows go at once (their pool backs off as after a capacity error, as Kubernetes'
    // cluster-autoscaler does with nodes that never become ready): they are paid for and
    // serve nobody.
    for (id, pool, spot) in &input.no_shows {
        if let Err(e) = provider.terminate_dyn(std::slice::from_ref(id)).await {
            tracing::warn!(instance = id, error = %e, "could not terminate an instance whose worker never registered; retrying later");
            continue;
        }
        control.propose(Command::InstancesNoShow { ids: vec![id.clone()] }).await?;
        memory.backoff.failed(pool, *spot, now_ms);
        tracing::warn!(
            instance = id,
            pool = %pool,
            "no worker registered from this instance {} min after its launch: terminated, its pool backs off; \
             check that the image starts `flotilla worker` at boot and reaches the coordinators",
            REGISTER_TIMEOUT_MS / 60_000
        );
        report.no_shows.push(id.clone());
    }
    let input = if report.no_shows.is_empty() { input } else { control.input(now_ms).await? };
    memory.idle_since.retain(|id, _| input.idle.contains(id));
    for id in &input.idle {
        memory.idle_since.entry(id.clone()).or_insert(now_ms);
    }
    let held: Vec<Held> = input
        .held
        .iter()
        .cloned()
        .map(|mut h| {
            h.idle_since_ms = memory.idle_since.get(&h.id).copied();
            h
        })
        .collect();
    if now_ms.saturating_sub(memory.last_prices_ms) >= PRICES_EVERY_MS || memory.last_prices_ms == 0 {
        memory.last_prices_ms = now_ms.max(1);
        let types: BTreeSet<String> = config.market.pools().map(|p| p.instance_type.clone()).collect();
        match provider.spot_prices_dyn(&types.into_iter().collect::<Vec<_>>()).await {
            Ok(prices) => memory.spot_prices = prices,
            Err(e) => tracing::warn!(error = %e, "cannot read spot prices; using the last known ones"),
        }
    }
    let hour = now_ms.saturating_sub(config.market_start_unix_ms) as f64 / 3_600_000.0;
    let mut quotes: Vec<autoscale::Quote> = config
        .market
        .quotes(hour)
        .into_iter()
        .map(|mut q| {
            let key = (q.pool.instance_type.clone(), q.pool.zone.clone());
            if let Some(price) = memory.spot_prices.get(&key).filter(|p| p.is_finite() && **p > 0.0) {
                q.spot_usd_per_hour = *price;
            }
            q
        })
        .collect();
    memory.noticed.retain(|id| input.known.contains(id));
    for (id, pool) in &input.interrupted {
        if memory.noticed.insert(id.clone()) {
            memory.risk.observe(pool, now_ms);
        }
    }
    memory.risk.adjust(&mut quotes, now_ms);
    let plan = autoscale::plan(now_ms, &input.gangs, &held, &quotes, &config.limits, &memory.backoff);
    let waiting = plan.waiting.clone();
    for decision in plan.decisions {
        match decision {
            Decision::Launch { job, pool, spot, count, usd_per_hour } => {
                memory.requests_made += 1;
                let request_id = format!("{}-{now_ms:x}-{}", config.cluster_id, memory.requests_made);
                let command = Command::RequestInstances {
                    request_id: request_id.clone(),
                    job: Some(job),
                    instance_type: pool.instance_type.clone(),
                    zone: pool.zone.clone(),
                    spot,
                    count,
                    usd_per_hour,
                };
                control.propose(command).await?;
                let request = InstanceRequest {
                    request_id,
                    job: Some(job),
                    instance_type: pool.instance_type,
                    zone: pool.zone,
                    spot,
                    count,
                    usd_per_hour,
                    requested_at_unix_ms: now_ms,
                    state: RequestState::Requested,
                    reason: String::new(),
                };
                settle(control, provider, config, memory, &request, now_ms, &mut report).await?;
            }
            Decision::Terminate { id } if input.known.contains(&id) => {
                if let Err(e) = provider.terminate_dyn(std::slice::from_ref(&id)).await {
                    tracing::warn!(instance = id, error = %e, "could not terminate an idle instance; retrying later");
                    continue;
                }
                control.propose(Command::InstancesTerminated { ids: vec![id.clone()] }).await?;
                memory.idle_since.remove(&id);
                report.terminated.push(id);
            }
            Decision::Terminate { .. } => {} // a worker without an instance record: not ours to stop
        }
    }
    // The word on each gang, with what this pass's launches met.
    memory.failures.retain(|job, _| input.gangs.iter().any(|g| g.job == *job));
    memory.notes = notes(&held, waiting, &memory.failures);
    if now_ms.saturating_sub(memory.last_reconcile_ms) >= RECONCILE_EVERY_MS || memory.last_reconcile_ms == 0 {
        memory.last_reconcile_ms = now_ms.max(1);
        let input = control.input(now_ms).await?;
        let pending_tokens: BTreeSet<&str> = input.outstanding.iter().map(|r| r.request_id.as_str()).collect();
        let ours = |i: &Instance| {
            input.known.contains(&i.id)
                || i.tags.get(crate::provider::LAUNCH_TOKEN_TAG).is_some_and(|t| pending_tokens.contains(t.as_str()))
        };
        let reconciled = match crate::provider::reconcile(provider, &config.cluster_tags, &ours).await {
            Ok(reconciled) => reconciled,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reconcile with the cloud; trying again later");
                return Ok(report);
            }
        };
        report.orphans_terminated = reconciled.orphans_terminated;
        let running: BTreeSet<&str> = reconciled.adopted.iter().map(|i| i.id.as_str()).collect();
        // Describe is eventually consistent: a just-launched instance may not show yet.
        let young =
            |id: &str| input.launched_at.get(id).is_some_and(|at| now_ms.saturating_sub(*at) < DESCRIBE_GRACE_MS);
        let gone: Vec<String> =
            input.known.iter().filter(|id| !running.contains(id.as_str()) && !young(id)).cloned().collect();
        if !gone.is_empty() {
            control.propose(Command::InstancesTerminated { ids: gone }).await?;
        }
    }
    Ok(report)
}

/// Runs on every node; acts only while this node leads.
pub async fn autoscale_loop(
    node: crate::raft::node::NodeHandle,
    progress: std::sync::Arc<crate::progress::Progress>,
    provider: std::sync::Arc<dyn DynProvider>,
    config: AutoscaleConfig,
    notes: CapacityNotes,
) {
    let share = |words: &BTreeMap<JobId, String>| {
        if let Ok(mut shared) = notes.lock() {
            shared.clone_from(words);
        }
    };
    let mut leader = Leader { node, progress };
    let mut memory = Memory::default();
    let mut was_leader = false;
    loop {
        tokio::time::sleep(PASS_EVERY).await;
        let leading = leader.node.status().leader_id == Some(leader.node.id);
        if !leading {
            was_leader = false;
            share(&BTreeMap::new());
            continue;
        }
        if !was_leader {
            memory = Memory::default(); // a new term: timers and back-off start afresh
            was_leader = true;
        }
        let now = crate::raft::node::now_unix_ms();
        match pass(&mut leader, provider.as_ref(), &config, &mut memory, now).await {
            Ok(report) if report != PassReport::default() => tracing::info!(?report, "autoscaling"),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "autoscaling pass cut short; the next one continues"),
        }
        share(&memory.notes);
    }
}
