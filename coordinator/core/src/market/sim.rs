//! A training workload on a replayed spot market, minute by minute, under one purchasing policy.
//!
//! - `on_demand`: every gang on on-demand instances of the cheapest on-demand pool.
//! - `naive_spot`: one instance type in one zone (the cheapest spot pool at the start), spot
//!   only, no fallback; like a framework that restarts from the user's last periodic checkpoint,
//!   it loses the work since that checkpoint at each interruption.
//! - `naive_spot_deadline`: `naive_spot` that moves a waiting job to on-demand (the cheapest
//!   on-demand pool) once its remaining work would no longer finish by
//!   [`SimParams::deadline_hours`] on spot: the baseline for cost at equal deadline.
//! - `flotilla`: with [`SimParams::deadline_hours`], a job moves to on-demand as its slack runs
//!   out, as in `naive_spot_deadline` ("Can't Be Late", NSDI'24, is the idea); and always
//!   the [`crate::autoscale`] policy (expected-cost pool choice over every pool,
//!   correlated risk from the interruptions it has seen ([`crate::autoscale::risk`]),
//!   diversification, back-off on capacity errors, never spot above on-demand, on-demand
//!   fallback) and Flotilla's notice path: a spot interruption is announced
//!   ([`SimParams::notice_minutes`] ahead), and with [`SimParams::handover`] (issue 25) the
//!   gang trains on while a replacement is found or bought outside the noticed pool; once it is
//!   ready, before the fallback time, it takes the noticed member's rank at a step boundary
//!   ([`SimParams::handover_stall_seconds`] without training: one step and the state's
//!   transfer, the bound the live swap keeps to in `scripts/bench/handover.sh`). Otherwise (handover off, a
//!   replacement too late, a notice too short) the gang checkpoints at the notice and waits
//!   for capacity. No work is lost either way; idle instances are reused by the next gang.
//!
//! Time a gang spends restarting (replacement provisioning, rendezvous, resume) is paid for and
//! delays the job in every policy. Cost is billed per minute at the pool's current price.

use std::collections::BTreeMap;

use super::{PoolKey, Trace};
use crate::autoscale::deadline::{MARGIN_STEPS, Slack};
use crate::autoscale::risk::PoolRisk;
use crate::autoscale::{self, Backoff, Decision, Gang, Held, Limits};
use crate::ids::JobId;
use crate::rand::SplitMix64;
use crate::state::{HANDOVER_FALLBACK_LEAD_MS, HANDOVER_LEAD_MIN_MS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    OnDemand,
    NaiveSpot,
    NaiveSpotDeadline,
    Flotilla,
}

impl Policy {
    pub const ALL: [Policy; 4] = [Policy::OnDemand, Policy::NaiveSpot, Policy::NaiveSpotDeadline, Policy::Flotilla];

    pub fn name(self) -> &'static str {
        match self {
            Policy::OnDemand => "on_demand",
            Policy::NaiveSpot => "naive_spot",
            Policy::NaiveSpotDeadline => "naive_spot_deadline",
            Policy::Flotilla => "flotilla",
        }
    }

    fn naive(self) -> bool {
        matches!(self, Policy::NaiveSpot | Policy::NaiveSpotDeadline)
    }
}

/// One training job of the workload: a gang of `workers` for `work_hours` of training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimJob {
    pub workers: u32,
    pub work_hours: f64,
}

/// The cost benchmark's workload (`scripts/bench/spot_cost.sh`): 8 data-parallel jobs, 4 x 4
/// workers x 10 h and 4 x 2 workers x 6 h, 208 instance-hours of training on on-demand.
pub fn benchmark_workload() -> Vec<SimJob> {
    let mut jobs = Vec::new();
    for _ in 0..4 {
        jobs.push(SimJob { workers: 4, work_hours: 10.0 });
        jobs.push(SimJob { workers: 2, work_hours: 6.0 });
    }
    jobs
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimParams {
    pub step_minutes: f64,
    /// Launch to a registered worker.
    pub provision_minutes: f64,
    /// Gang start (rendezvous, data, resume) before training makes progress again.
    pub restart_minutes: f64,
    /// The periodic checkpoint interval: what an interruption without notice handling loses.
    pub checkpoint_every_hours: f64,
    pub steps_per_hour: f64,
    pub limits: Limits,
    /// The simulation stops here even if jobs remain (they count as unfinished).
    pub horizon_hours: f64,
    /// When every job should be done (`naive_spot_deadline` and `flotilla` move jobs to
    /// on-demand to make it).
    pub deadline_hours: Option<f64>,
    /// `flotilla` raises pool risk from the interruptions it sees (off: the long-run rates
    /// alone, for comparison).
    pub correlated_risk: bool,
    /// `flotilla`'s gangs may span pools (`capacity.mixed_types`): one pool first, then one
    /// zone, then any, as the scheduler places them.
    pub mixed_types: bool,
    /// How long before a spot instance is taken its notice comes (EC2: 2 minutes).
    pub notice_minutes: f64,
    /// `flotilla` hands a noticed member's rank to a replacement while the gang trains on
    /// (issue 25); off: it checkpoints at every notice and waits for capacity.
    pub handover: bool,
    /// The model's training state a replacement takes from the leaving member (parameters
    /// and optimizer moments: 1 GiB is a ~90 M-parameter model under Adam in f32).
    pub state_gib: f64,
    /// The bandwidth between two members for that transfer (a 10 Gbit/s instance network).
    pub peer_gbit_per_s: f64,
    pub seed: u64,
}

impl Default for SimParams {
    fn default() -> Self {
        SimParams {
            step_minutes: 1.0,
            provision_minutes: 3.0,
            restart_minutes: 2.0,
            checkpoint_every_hours: 0.5,
            steps_per_hour: 3600.0,
            limits: Limits {
                max_instances: 32,
                max_usd_per_hour: 1000.0,
                idle_cooldown_ms: 10 * 60_000,
                ..Limits::default()
            },
            horizon_hours: 500.0,
            deadline_hours: None,
            correlated_risk: true,
            mixed_types: false,
            notice_minutes: 2.0,
            handover: true,
            state_gib: 1.0,
            peer_gbit_per_s: 10.0,
            seed: 1,
        }
    }
}

impl SimParams {
    /// Training time one handover costs the gang: one step and the state's transfer (issue
    /// 25's bound; what the live swap measures against it: `LIVE=1 scripts/bench/handover.sh`
    /// and scripts/bench/README.md).
    pub fn handover_stall_seconds(&self) -> f64 {
        let step_seconds = 3600.0 / self.steps_per_hour.max(1e-9);
        let transfer_seconds = self.state_gib * 8.0 * 1.073_741_824 / self.peer_gbit_per_s.max(1e-9);
        step_seconds + transfer_seconds
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub policy: &'static str,
    pub cost_usd: f64,
    pub makespan_h: f64,
    pub preemptions: u64,
    pub steps_lost: u64,
    /// Compute paid for work that was lost and redone.
    pub lost_work_usd: f64,
    pub instance_hours: f64,
    /// Of which on on-demand instances.
    pub on_demand_hours: f64,
    pub finished_jobs: usize,
    /// Notices handled by a handover (the gang never stopped to wait for capacity).
    pub handovers: u64,
    /// Hours without training that preemptions cost the jobs: from the stop to the first step
    /// on new capacity, summed over jobs (a handover counts its stall).
    pub stall_h: f64,
    /// Of which the handovers' ([`SimParams::handover_stall_seconds`] each).
    pub handover_stall_h: f64,
}

#[derive(Debug, Clone)]
struct Inst {
    id: u64,
    pool: PoolKey,
    spot: bool,
    ready_at_h: f64,
    /// Bought for, or assigned to, this job.
    job: Option<usize>,
    idle_since_h: Option<f64>,
    /// Noticed: the market takes it then; it joins no gang meanwhile.
    taken_at_h: Option<f64>,
}

/// A gang member's notice under `flotilla`'s handover: the gang trains on until `replacement`
/// (an instance id) is ready, or stops at `fallback_at_h`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SimHandover {
    leaving: u64,
    fallback_at_h: f64,
    replacement: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Waiting,
    Starting { until_h: f64 },
    Running,
    Done { at_h: f64 },
}

#[derive(Debug, Clone)]
struct Job {
    spec: SimJob,
    progress_h: f64,
    checkpoint_h: f64,
    phase: Phase,
    /// Moved to on-demand to meet the deadline (`naive_spot_deadline`).
    on_demand: bool,
    /// Members noticed with time for a handover, in notice order (several when notices come
    /// together): the gang hands over to all of them at once.
    handovers: Vec<SimHandover>,
    /// Stopped by a preemption and not training again yet (its wait counts as stall).
    preempted: bool,
}

struct World<'a> {
    trace: &'a Trace,
    params: SimParams,
    policy: Policy,
    jobs: Vec<Job>,
    alive: Vec<Inst>,
    next_id: u64,
    out: Outcome,
    backoff: Backoff,
    risk: PoolRisk,
    rng: SplitMix64,
}

fn hour_ms(hour: f64) -> u64 {
    (hour * 3_600_000.0) as u64
}

impl World<'_> {
    fn price(&self, pool: &PoolKey, spot: bool, hour: f64) -> f64 {
        self.trace.at(pool, hour).map_or(0.0, |s| if spot { s.spot_usd_per_hour } else { s.on_demand_usd_per_hour })
    }

    fn gang_hourly(&self, job: usize, hour: f64) -> f64 {
        self.alive.iter().filter(|i| i.job == Some(job)).map(|i| self.price(&i.pool, i.spot, hour)).sum()
    }

    /// An instance is taken back: its gang (if training) stops; work since the last
    /// checkpoint is lost unless the policy checkpoints at the notice.
    fn reclaim(&mut self, index: usize, hour: f64) {
        let inst = self.alive.remove(index);
        if self.policy == Policy::Flotilla && self.params.correlated_risk && inst.spot {
            self.risk.observe(&inst.pool, hour_ms(hour));
        }
        let Some(j) = inst.job else { return };
        let phase = self.jobs[j].phase;
        if !matches!(phase, Phase::Running | Phase::Starting { .. }) {
            return;
        }
        self.out.preemptions += 1;
        let lost_h = match (phase, self.policy) {
            (Phase::Running, Policy::NaiveSpot | Policy::NaiveSpotDeadline | Policy::OnDemand) => {
                self.jobs[j].progress_h - self.jobs[j].checkpoint_h
            }
            _ => 0.0,
        };
        if self.policy == Policy::Flotilla {
            self.jobs[j].checkpoint_h = self.jobs[j].progress_h; // checkpoint at the notice
        }
        self.out.steps_lost += (lost_h * self.params.steps_per_hour).round() as u64;
        self.out.lost_work_usd += lost_h * (self.gang_hourly(j, hour) + self.price(&inst.pool, inst.spot, hour));
        self.jobs[j].progress_h = self.jobs[j].checkpoint_h;
        self.jobs[j].phase = Phase::Waiting;
        self.jobs[j].preempted = true;
        // The survivors stay: reserved for the job (naive, on-demand) or free for any gang.
        for other in self.alive.iter_mut().filter(|i| i.job == Some(j)) {
            other.idle_since_h = Some(hour);
            if self.policy == Policy::Flotilla {
                other.job = None;
            }
        }
    }

    /// A spot notice for instance `index`: under `flotilla` with handovers, a running gang's
    /// member starts a handover (true: the instance stays until `taken_at_h`); otherwise the
    /// caller takes it at once (the notice path: checkpoint at the notice, or naive loss).
    fn notice(&mut self, index: usize, hour: f64) -> bool {
        let notice_ms = self.params.notice_minutes * 60_000.0;
        if self.policy != Policy::Flotilla || !self.params.handover || notice_ms < HANDOVER_LEAD_MIN_MS as f64 {
            return false;
        }
        let inst = &self.alive[index];
        let Some(j) = inst.job else { return false };
        if self.jobs[j].phase != Phase::Running {
            return false;
        }
        let (id, pool) = (inst.id, inst.pool.clone());
        if self.params.correlated_risk {
            self.risk.observe(&pool, hour_ms(hour));
        }
        let taken_at_h = hour + self.params.notice_minutes / 60.0;
        self.alive[index].taken_at_h = Some(taken_at_h);
        self.jobs[j].handovers.push(SimHandover {
            leaving: id,
            fallback_at_h: taken_at_h - HANDOVER_FALLBACK_LEAD_MS as f64 / 3_600_000.0,
            replacement: None,
        });
        self.out.preemptions += 1;
        true
    }

    /// Handovers under way: reserve a free ready instance outside the noticed pool for each
    /// (else [`World::buy`] buys them); once every replacement is ready, before the earliest
    /// fallback time, swap them all in at once (the gang loses
    /// [`SimParams::handover_stall_seconds`] of training); at that fallback time without them,
    /// the notice path (checkpoint, stop, wait; bought replacements stay the job's for its next
    /// gang).
    fn handovers(&mut self, hour: f64) {
        for j in 0..self.jobs.len() {
            if self.jobs[j].handovers.is_empty() {
                continue;
            }
            if self.jobs[j].phase != Phase::Running {
                self.jobs[j].handovers.clear(); // the gang stopped otherwise (another member lost)
                continue;
            }
            let mut handovers = std::mem::take(&mut self.jobs[j].handovers);
            for h in handovers.iter_mut().filter(|h| h.replacement.is_none()) {
                let noticed_pool = self.alive.iter().find(|i| i.id == h.leaving).map(|i| i.pool.clone());
                let on_demand_only = self.jobs[j].on_demand;
                h.replacement = self
                    .alive
                    .iter()
                    .filter(|i| {
                        i.job.is_none() && i.ready_at_h <= hour && i.taken_at_h.is_none() && !(on_demand_only && i.spot)
                    })
                    .min_by_key(|i| (Some(&i.pool) == noticed_pool.as_ref(), i.id))
                    .map(|i| i.id);
                if let Some(inst) = self.alive.iter_mut().find(|i| Some(i.id) == h.replacement) {
                    inst.job = Some(j);
                    inst.idle_since_h = None;
                }
            }
            let fallback_at_h = handovers.iter().map(|h| h.fallback_at_h).fold(f64::INFINITY, f64::min);
            let ready =
                |h: &SimHandover| self.alive.iter().any(|i| Some(i.id) == h.replacement && i.ready_at_h <= hour);
            if handovers.iter().all(ready) && hour < fallback_at_h {
                for h in &handovers {
                    if let Some(leaving) = self.alive.iter_mut().find(|i| i.id == h.leaving) {
                        leaving.job = None; // taken at its time; never in a gang again
                    }
                }
                let stall_h = self.params.handover_stall_seconds() / 3600.0;
                let job = &mut self.jobs[j];
                job.progress_h = (job.progress_h - stall_h).max(job.checkpoint_h);
                self.out.stall_h += stall_h;
                self.out.handover_stall_h += stall_h;
                self.out.handovers += handovers.len() as u64;
            } else if hour >= fallback_at_h {
                let job = &mut self.jobs[j];
                job.checkpoint_h = job.progress_h;
                job.phase = Phase::Waiting;
                job.preempted = true;
                let replacements: Vec<Option<u64>> = handovers.iter().map(|h| h.replacement).collect();
                for i in self.alive.iter_mut().filter(|i| i.job == Some(j) && !replacements.contains(&Some(i.id))) {
                    i.job = None;
                    i.idle_since_h = Some(hour);
                }
            } else {
                self.jobs[j].handovers = handovers;
            }
        }
    }

    fn launch(&mut self, job: usize, pool: &PoolKey, spot: bool, count: u32, hour: f64) {
        for _ in 0..count {
            self.next_id += 1;
            self.alive.push(Inst {
                id: self.next_id,
                pool: pool.clone(),
                spot,
                ready_at_h: hour + self.params.provision_minutes / 60.0,
                job: Some(job),
                idle_since_h: None,
                taken_at_h: None,
            });
        }
    }

    /// Whether job `j` must move to capacity that stays (on-demand) at `hour` to finish by the
    /// deadline: the coordinator's rule ([`Slack`]) with its remaining work, one provisioning
    /// and one restart, and what one more spot interruption could lose (a checkpoint interval
    /// and a few steps).
    fn out_of_slack(&self, j: usize, hour: f64) -> bool {
        let Some(deadline) = self.params.deadline_hours else { return false };
        let job = &self.jobs[j];
        Slack {
            now_h: hour,
            deadline_h: deadline,
            remaining_h: job.spec.work_hours - job.progress_h,
            restart_h: (self.params.provision_minutes + self.params.restart_minutes) / 60.0,
            at_risk_h: self.params.checkpoint_every_hours + MARGIN_STEPS * self.params.step_minutes / 60.0,
        }
        .out()
    }

    /// With a deadline (`naive_spot_deadline`, and `flotilla` when one is set): a job out of
    /// slack on spot checkpoints, leaves its spot instances (given back, or idle for other
    /// gangs under `flotilla`) and waits for on-demand capacity.
    fn move_late_jobs_to_on_demand(&mut self, hour: f64) {
        for j in 0..self.jobs.len() {
            let job = &self.jobs[j];
            if job.on_demand || matches!(job.phase, Phase::Done { .. }) || !self.out_of_slack(j, hour) {
                continue;
            }
            let job = &mut self.jobs[j];
            job.on_demand = true;
            job.checkpoint_h = job.progress_h; // a deliberate stop checkpoints first
            job.phase = Phase::Waiting;
            if self.policy == Policy::Flotilla {
                for i in self.alive.iter_mut().filter(|i| i.job == Some(j) && i.spot) {
                    i.job = None;
                    i.idle_since_h = Some(hour);
                }
            } else {
                self.alive.retain(|i| !(i.job == Some(j) && i.spot));
            }
        }
    }

    fn spot_room(&self, pool: &PoolKey, hour: f64) -> u32 {
        let capacity = self.trace.at(pool, hour).map_or(0, |s| s.spot_capacity);
        let held = self.alive.iter().filter(|i| i.spot && i.pool == *pool).count() as u32;
        capacity.saturating_sub(held)
    }

    /// Forms gangs from ready instances: the job's own first, then (Flotilla) free ones.
    fn form_gangs(&mut self, hour: f64) {
        for j in 0..self.jobs.len() {
            if self.jobs[j].phase != Phase::Waiting {
                continue;
            }
            let workers = self.jobs[j].spec.workers as usize;
            let usable: Vec<usize> = (0..self.alive.len())
                .filter(|&index| {
                    let inst = &self.alive[index];
                    inst.ready_at_h <= hour
                        && inst.taken_at_h.is_none()
                        && (inst.job == Some(j) || inst.job.is_none())
                        && !(self.jobs[j].on_demand && inst.spot)
                })
                .collect();
            // One pool; with mixed types, else one zone, else any.
            let mixed = self.policy == Policy::Flotilla && self.params.mixed_types;
            let groupings: &[fn(&PoolKey) -> String] =
                if mixed { &[|p| p.to_string(), |p| p.zone.clone(), |_| String::new()] } else { &[|p| p.to_string()] };
            let own = |m: &Vec<usize>| m.iter().filter(|&&i| self.alive[i].job == Some(j)).count();
            let chosen = groupings.iter().find_map(|key| {
                let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
                for &index in &usable {
                    groups.entry(key(&self.alive[index].pool)).or_default().push(index);
                }
                groups.into_values().filter(|m| m.len() >= workers).max_by_key(own)
            });
            let Some(mut members) = chosen else { continue };
            members.sort_by_key(|&i| (self.alive[i].job != Some(j), self.alive[i].id));
            for &i in members.iter().take(workers) {
                self.alive[i].job = Some(j);
                self.alive[i].idle_since_h = None;
            }
            self.jobs[j].phase = Phase::Starting { until_h: hour + self.params.restart_minutes / 60.0 };
        }
    }

    fn buy(&mut self, hour: f64) {
        if matches!(self.policy, Policy::NaiveSpotDeadline | Policy::Flotilla) {
            self.move_late_jobs_to_on_demand(hour);
        }
        let waiting: Vec<usize> = (0..self.jobs.len()).filter(|&j| self.jobs[j].phase == Phase::Waiting).collect();
        match self.policy {
            Policy::OnDemand | Policy::NaiveSpot | Policy::NaiveSpotDeadline => {
                // Naive: one spot pool, fixed at the start (the cheapest spot price at hour 0).
                let spot_pool = self
                    .trace
                    .quotes(0.0)
                    .into_iter()
                    .min_by(|a, b| a.spot_usd_per_hour.total_cmp(&b.spot_usd_per_hour))
                    .map(|q| q.pool);
                let on_demand_pool = self
                    .trace
                    .quotes(hour)
                    .into_iter()
                    .min_by(|a, b| a.on_demand_usd_per_hour.total_cmp(&b.on_demand_usd_per_hour))
                    .map(|q| q.pool);
                let (Some(spot_pool), Some(on_demand_pool)) = (spot_pool, on_demand_pool) else { return };
                for j in waiting {
                    let spot = self.policy.naive() && !self.jobs[j].on_demand;
                    let pool = if spot { &spot_pool } else { &on_demand_pool };
                    let have = self.alive.iter().filter(|i| i.job == Some(j)).count() as u32;
                    let need = self.jobs[j].spec.workers.saturating_sub(have);
                    let total = self.alive.len() as u32;
                    if need == 0 || total + need > self.params.limits.max_instances {
                        continue;
                    }
                    if spot && self.spot_room(pool, hour) < need {
                        continue; // no capacity: try again next minute
                    }
                    let pool = pool.clone();
                    self.launch(j, &pool, spot, need, hour);
                }
                // Nothing left to wait for: give idle capacity back at once.
                let keep: Vec<bool> = self
                    .alive
                    .iter()
                    .map(|i| i.job.is_some_and(|j| !matches!(self.jobs[j].phase, Phase::Done { .. })))
                    .collect();
                let mut k = keep.into_iter();
                self.alive.retain(|_| k.next().unwrap_or(true));
            }
            Policy::Flotilla => {
                let now_ms = hour_ms(hour);
                let mut gangs: Vec<Gang> = waiting
                    .iter()
                    .map(|&j| Gang {
                        spot: !self.jobs[j].on_demand, // out of slack for its deadline: on-demand
                        mixed: self.params.mixed_types,
                        ..Gang::unconstrained(JobId(j as u64), j as u64, self.jobs[j].spec.workers, 1)
                    })
                    .collect();
                // Handovers without a replacement: one gang of as many, never in the first
                // noticed pool, first (as the coordinator's autoscaler asks for them).
                for j in 0..self.jobs.len() {
                    let awaited: Vec<SimHandover> =
                        self.jobs[j].handovers.iter().filter(|h| h.replacement.is_none()).copied().collect();
                    let Some(first) = awaited.first() else { continue };
                    let avoid = self.alive.iter().find(|i| i.id == first.leaving).map(|i| i.pool.clone());
                    gangs.insert(
                        0,
                        Gang {
                            spot: !self.jobs[j].on_demand,
                            avoid,
                            priority: 1,
                            ..Gang::unconstrained(JobId(j as u64), j as u64, awaited.len() as u32, 1)
                        },
                    );
                }
                let held: Vec<Held> = self
                    .alive
                    .iter()
                    .map(|i| {
                        let busy = i.taken_at_h.is_some()
                            || i.job
                                .is_some_and(|j| matches!(self.jobs[j].phase, Phase::Running | Phase::Starting { .. }));
                        Held {
                            id: i.id.to_string(),
                            pool: i.pool.clone(),
                            gpus: 1,
                            spot: i.spot,
                            usd_per_hour: self.price(&i.pool, i.spot, hour),
                            busy,
                            reserved_for: if busy { None } else { i.job.map(|j| JobId(j as u64)) },
                            idle_since_ms: i.idle_since_h.map(hour_ms),
                            lost: false,
                            spare_of: None,
                        }
                    })
                    .collect();
                let mut quotes = self.trace.quotes(hour);
                self.risk.adjust(&mut quotes, now_ms);
                let plan = autoscale::plan(now_ms, &gangs, &held, &quotes, &self.params.limits, &self.backoff);
                for decision in plan.decisions {
                    match decision {
                        Decision::Launch { job, pool, spot, count, .. } => {
                            if spot && self.spot_room(&pool, hour) < count {
                                self.backoff.failed(&pool, true, now_ms); // a capacity error
                                continue;
                            }
                            self.backoff.succeeded(&pool, spot);
                            let j = job.0 as usize;
                            self.launch(j, &pool, spot, count, hour);
                            // The instances just launched, to the handovers without a replacement.
                            let launched = self.next_id + 1 - u64::from(count)..=self.next_id;
                            let awaited = self.jobs[j].handovers.iter_mut().filter(|h| h.replacement.is_none());
                            for (h, id) in awaited.zip(launched) {
                                h.replacement = Some(id);
                            }
                        }
                        Decision::Terminate { id } => self.alive.retain(|i| i.id.to_string() != id),
                    }
                }
            }
        }
    }
}

/// Runs `jobs` (all submitted at hour 0, FIFO) on `trace` under `policy`.
pub fn simulate(trace: &Trace, jobs: &[SimJob], policy: Policy, params: SimParams) -> Outcome {
    let mut world = World {
        trace,
        params,
        policy,
        jobs: jobs
            .iter()
            .map(|&spec| Job {
                spec,
                progress_h: 0.0,
                checkpoint_h: 0.0,
                phase: Phase::Waiting,
                on_demand: false,
                handovers: Vec::new(),
                preempted: false,
            })
            .collect(),
        alive: Vec::new(),
        next_id: 0,
        out: Outcome {
            policy: policy.name(),
            cost_usd: 0.0,
            makespan_h: 0.0,
            preemptions: 0,
            steps_lost: 0,
            lost_work_usd: 0.0,
            instance_hours: 0.0,
            on_demand_hours: 0.0,
            finished_jobs: 0,
            handovers: 0,
            stall_h: 0.0,
            handover_stall_h: 0.0,
        },
        backoff: Backoff::default(),
        risk: PoolRisk::default(),
        rng: SplitMix64::new(params.seed),
    };
    let dt = params.step_minutes.max(0.01) / 60.0;
    let mut hour = 0.0;
    while hour < params.horizon_hours && world.jobs.iter().any(|j| !matches!(j.phase, Phase::Done { .. })) {
        // Billing.
        for i in &world.alive {
            world.out.cost_usd += world.price(&i.pool, i.spot, hour) * dt;
            world.out.instance_hours += dt;
            if !i.spot {
                world.out.on_demand_hours += dt;
            }
        }
        // Handovers first: one whose fallback time came stops its gang before the noticed
        // instance is taken.
        world.handovers(hour);
        // The market takes instances back: noticed ones at their time, random interruptions
        // (announced: see `notice`), and capacity shrinking below what is held (the newest
        // instances go first).
        let mut index = 0;
        while index < world.alive.len() {
            let inst = &world.alive[index];
            let rate = world.trace.at(&inst.pool, hour).map_or(0.0, |s| s.interruptions_per_hour);
            if inst.taken_at_h.is_some_and(|at| at <= hour) {
                world.reclaim(index, hour); // a noticed instance's time has come
            } else if inst.spot && inst.taken_at_h.is_none() && world.rng.next_f64() < rate * dt {
                if world.notice(index, hour) {
                    index += 1;
                } else {
                    world.reclaim(index, hour);
                }
            } else {
                index += 1;
            }
        }
        let pools: Vec<PoolKey> = world.trace.pools().cloned().collect();
        for pool in pools {
            let capacity = world.trace.at(&pool, hour).map_or(0, |s| s.spot_capacity) as usize;
            loop {
                let held: Vec<usize> =
                    (0..world.alive.len()).filter(|&i| world.alive[i].spot && world.alive[i].pool == pool).collect();
                if held.len() <= capacity {
                    break;
                }
                // Taken at once, with no time for a handover: the gang checkpoints at the
                // notice (modelled as immediate; announcing these too, a zone-wide event made
                // every handover buy a replacement that the event took next).
                let newest = *held.iter().max_by_key(|&&i| world.alive[i].id).expect("more held than capacity");
                world.reclaim(newest, hour);
            }
        }
        // Training.
        for j in 0..world.jobs.len() {
            if world.jobs[j].preempted && matches!(world.jobs[j].phase, Phase::Waiting | Phase::Starting { .. }) {
                world.out.stall_h += dt;
            }
            match world.jobs[j].phase {
                Phase::Starting { until_h } if hour >= until_h => {
                    world.jobs[j].phase = Phase::Running;
                    world.jobs[j].preempted = false;
                }
                Phase::Running => {
                    let job = &mut world.jobs[j];
                    job.progress_h += dt;
                    if job.progress_h - job.checkpoint_h >= params.checkpoint_every_hours {
                        job.checkpoint_h = job.progress_h;
                    }
                    if job.progress_h >= job.spec.work_hours {
                        job.phase = Phase::Done { at_h: hour + dt };
                        world.out.finished_jobs += 1;
                        for i in world.alive.iter_mut().filter(|i| i.job == Some(j)) {
                            i.job = None;
                            i.idle_since_h = Some(hour + dt);
                        }
                    }
                }
                _ => {}
            }
        }
        world.form_gangs(hour);
        world.buy(hour);
        world.form_gangs(hour);
        hour += dt;
    }
    world.out.makespan_h =
        world.jobs.iter().map(|j| if let Phase::Done { at_h } = j.phase { at_h } else { hour }).fold(0.0, f64::max);
    world.out
}
