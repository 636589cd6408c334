//! The gang scheduler: which pending jobs start now, and on which free workers.
//!
//! Pure: it takes the pending jobs and the free workers as data and returns placements and,
//! for every job it could not place, the reason (shown by `status`). No clock, no randomness:
//! the same input always gives the same output, on every coordinator.
//!
//! Rules
//! - Order: higher `priority` first, then FIFO (`submitted_index`, the job's Raft log index).
//! - Gang: a job is placed only when at least `min` fitting workers are free together, and
//!   gets at most `max` of them. A worker fits when it has at least the job's GPUs per worker
//!   and is of one of its `capacity.instance_types` (any, when the list is empty; a worker of
//!   type `local`, which knows none, fits every list: [`crate::spec::instance_type_allowed`]),
//!   on an instance whose price is within its `capacity.max_price_usd_per_hour` (the job pays
//!   what its workers' instances cost).
//! - Pools: a gang's workers share one pool (instance type + zone), since synchronous
//!   all-reduce runs at the speed of the slowest link (DESIGN §6). The job goes to the pool
//!   that gives it the most workers up to its `max`; among pools that give as many, the one
//!   holding most of its previous gang, then the one with the most fitting free workers (ties:
//!   the pool's name). In the pool it takes its previous gang's members first, then workers in
//!   id order, running jobs' warm spares last ([`FreeWorker::spare`]).
//! - Holders first: a job regrouping after a stop or a loss takes the free members of the gang
//!   that ended ([`PendingJob::holders`]) before any other worker: they hold the state it
//!   resumes from in memory (and its data loaded), so the new gang takes it from them over the
//!   data port instead of reading the store, where an announced checkpoint may not even be
//!   written yet. A member of that gang noticed while the job waited (so draining) is free for
//!   this job alone, while its notice leaves time for a handover ([`FreeWorker::only_for`]):
//!   the new gang takes the state from it and it hands over to a replacement from there.
//! - Mixed gangs (`capacity.mixed_types`): when no one pool holds the gang, it may mix
//!   instance types within the zone with the most fitting workers, and span zones only when no
//!   zone holds it (idle capacity is paid for either way; a ring across zones is slower and
//!   pays for cross-zone traffic). The largest pools are taken first (fewest pools per gang).
//! - On-demand only: a job that must not run on spot (`capacity.spot = false`, or moved to
//!   on-demand for its deadline) gets only on-demand workers. Other jobs take a pool's spot
//!   workers first, keeping its on-demand ones for the jobs that need them.
//! - Backfill: a job that cannot be placed does not hold back smaller jobs behind it. (A
//!   reservation for blocked large jobs is the autoscaler's business: it buys their capacity.)
//! - Priority preemption ([`schedule_preempting`]): a job that cannot be placed stops running
//!   jobs of strictly lower priority whose workers, with the free ones, make its gang (they
//!   checkpoint and wait as after any stop, so nothing is lost). As Kubernetes' scheduler
//!   picks victims: the lowest priorities first (the newest submission first among equals),
//!   then those not needed are spared, the highest priority first; among pools, the one whose
//!   highest stopped priority is lowest, then with the fewest stops. The free workers it counted
//!   are held for it (lower jobs do not backfill them) and the stopped jobs' workers are not
//!   counted twice; a job already stopping (for any reason) is counted without a new order.
//!   At most [`PREEMPTION_TRIES_PER_PASS`] waiting jobs look for stops in one pass. Inference
//!   jobs come last of all (priority `i32::MIN`, so first to go): their workers go back to idle
//!   after their shard, with nothing to checkpoint.
//! - A worker is never placed twice: each placement removes its workers from the free set.
//! - Elastic growth ([`grow`]): when no job waits, a running job below `max` whose pool has
//!   free fitting workers is asked to checkpoint and regroup larger.

use std::collections::BTreeMap;

use crate::ids::{JobId, WorkerId};

/// Jobs considered in one scheduling pass at most (the rest wait for the next pass).
pub const PENDING_JOBS_MAX: usize = 100_000;
/// Unplaced jobs that may look for jobs of lower priority to stop in one pass, the highest
/// priority first (the rest wait for a later pass): a long queue of high-priority jobs keeps
/// the pass cheap.
pub const PREEMPTION_TRIES_PER_PASS: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub struct PendingJob {
    pub id: JobId,
    pub priority: i32,
    /// Raft index of the submission: FIFO order within a priority.
    pub submitted_index: u64,
    pub min_workers: u32,
    pub max_workers: u32,
    pub gpus_per_worker: u32,
    /// Only on-demand workers (`capacity.spot = false`, or out of slack for its deadline).
    pub on_demand_only: bool,
    /// The gang may span pools (`capacity.mixed_types`).
    pub mixed: bool,
    /// Instance types it may run on (`capacity.instance_types`); empty: any.
    pub instance_types: Vec<String>,
    /// The most a worker's instance may cost an hour (`capacity.max_price_usd_per_hour`).
    pub max_usd_per_hour: Option<f64>,
    /// The members of its gang that ended last (empty for a job that never ran): taken first
    /// when free (see the module docs).
    pub holders: Vec<WorkerId>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FreeWorker {
    pub id: WorkerId,
    pub gpus: u32,
    pub instance_type: String,
    pub zone: String,
    /// On a spot instance (may be taken back).
    pub spot: bool,
    /// What its instance costs an hour (its price at launch; 0 for a worker without one).
    pub usd_per_hour: f64,
    /// Free for this job alone: a noticed holder of its state that may rejoin its next gang
    /// (`Worker::may_rejoin`); no other job, growth or inference takes it.
    pub only_for: Option<JobId>,
    /// A running job's warm spare (`capacity.spares`: prepared, holding its newest checkpoint):
    /// a pool's other fitting workers are taken first, so that it stays that job's spare.
    pub spare: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub job: JobId,
    /// In rank order.
    pub workers: Vec<WorkerId>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub placements: Vec<Placement>,
    /// Why each unplaced job waits.
    pub waiting: BTreeMap<JobId, String>,
    /// Running jobs to stop at a checkpoint for a higher-priority waiting job (and inference
    /// jobs to give their workers back).
    pub preemptions: Vec<Preemption>,
    /// Free workers held for waiting jobs that stop others: nobody else gets them this pass
    /// (inference jobs included).
    pub held: Vec<WorkerId>,
}

/// A running job a waiting job of higher priority may stop (see [`schedule_preempting`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Preemptible {
    pub id: JobId,
    pub generation: u64,
    pub priority: i32,
    pub submitted_index: u64,
    /// Already asked to checkpoint and stop (for any reason): its workers come free without
    /// another order.
    pub stopping: bool,
    /// Its gang's workers that come free when it stops (not those leaving the cluster), as
    /// they will be then.
    pub members: Vec<FreeWorker>,
    /// An inference job: it gives its workers back between shards (nothing to checkpoint) and
    /// yields to any training job (its `priority` is `i32::MIN`).
    pub inference: bool,
}

/// Stop `victim`'s `generation` at a checkpoint so `for_job` can have its workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preemption {
    pub victim: JobId,
    pub generation: u64,
    pub for_job: JobId,
    /// `for_job`'s priority and the victim's, for the victim's events.
    pub priorities: (i32, i32),
    /// The victim is an inference job: its workers go back to idle after their shard.
    pub inference: bool,
}

/// What a worker must offer a job: its GPUs per worker, on-demand when it must not run on
/// spot, an hourly price within its `capacity.max_price_usd_per_hour`.
#[derive(Debug, Clone, Copy)]
struct Need {
    /// The job placed: the only one that may take workers free for it alone.
    job: JobId,
    gpus: u32,
    on_demand_only: bool,
    max_usd_per_hour: Option<f64>,
}

impl Need {
    fn of(job: &PendingJob) -> Need {
        Need {
            job: job.id,
            gpus: job.gpus_per_worker,
            on_demand_only: job.on_demand_only,
            max_usd_per_hour: job.max_usd_per_hour,
        }
    }

    fn priced(&self, usd_per_hour: f64) -> bool {
        self.max_usd_per_hour.is_none_or(|cap| usd_per_hour <= cap)
    }

    /// Whether `worker` fits the job (its type is checked apart, per pool).
    fn fits(&self, worker: &FreeWorker) -> bool {
        worker.gpus >= self.gpus && !(self.on_demand_only && worker.spot) && self.priced(worker.usd_per_hour)
    }
}

/// Free workers of one kind in one pool, (gpus, id, USD per hour) sorted by (gpus, id) so "how
/// many have >= g GPUs" is a search (a scan only for a job with a price cap).
#[derive(Debug, Default)]
struct Sorted {
    workers: Vec<(u32, WorkerId, f64)>,
}

impl Sorted {
    fn start(&self, need: &Need) -> usize {
        self.workers.partition_point(|(g, _, _)| *g < need.gpus)
    }

    fn fitting(&self, need: &Need) -> usize {
        let start = self.start(need);
        match need.max_usd_per_hour {
            None => self.workers.len() - start,
            Some(_) => self.workers[start..].iter().filter(|(_, _, usd)| need.priced(*usd)).count(),
        }
    }

    /// Takes up to `count` fitting workers, the least-equipped first (keeps big GPUs for jobs
    /// that need them).
    fn take(&mut self, need: &Need, count: usize) -> Vec<WorkerId> {
        let start = self.start(need);
        if need.max_usd_per_hour.is_none() {
            let end = (start + count).min(self.workers.len());
            return self.workers.drain(start..end).map(|(_, id, _)| id).collect();
        }
        let mut taken = Vec::with_capacity(count);
        let mut index = 0;
        self.workers.retain(|(_, id, usd)| {
            let take = index >= start && taken.len() < count && need.priced(*usd);
            index += 1;
            if take {
                taken.push(*id);
            }
            !take
        });
        taken
    }

    /// How many of `holders` fit here.
    fn holding(&self, need: &Need, holders: &[WorkerId]) -> usize {
        self.workers.iter().filter(|(g, id, usd)| *g >= need.gpus && need.priced(*usd) && holders.contains(id)).count()
    }

    /// Takes up to `count` of the fitting workers among `holders`, in id order.
    fn take_holders(&mut self, need: &Need, count: usize, holders: &[WorkerId]) -> Vec<WorkerId> {
        let mut taken = Vec::new();
        self.workers.retain(|(g, id, usd)| {
            let take = taken.len() < count && *g >= need.gpus && need.priced(*usd) && holders.contains(id);
            if take {
                taken.push(*id);
            }
            !take
        });
        taken
    }
}

/// Free workers of one pool: spot and on-demand apart, and those free for one job alone.
#[derive(Debug, Default)]
struct Pool {
    spot: Sorted,
    on_demand: Sorted,
    /// Noticed holders, each free for its own job only ([`FreeWorker::only_for`]): a few at
    /// most (members of waiting jobs' last gangs noticed since), so scanned.
    rejoining: Vec<FreeWorker>,
}

impl Pool {
    /// Of the workers free for one job alone, those free for `need`'s and fitting it.
    fn rejoining_for<'a>(&'a self, need: &'a Need) -> impl Iterator<Item = &'a FreeWorker> + 'a {
        self.rejoining.iter().filter(move |w| w.only_for == Some(need.job) && need.fits(w))
    }

    fn fitting(&self, need: &Need) -> usize {
        let spot = if need.on_demand_only { 0 } else { self.spot.fitting(need) };
        spot + self.on_demand.fitting(need) + self.rejoining_for(need).count()
    }

    /// How many of `holders` fit here (those free for the job alone are holders).
    fn holding(&self, need: &Need, holders: &[WorkerId]) -> usize {
        if holders.is_empty() {
            return 0; // a job that never ran (most of a long queue): no scan
        }
        let spot = if need.on_demand_only { 0 } else { self.spot.holding(need, holders) };
        spot + self.on_demand.holding(need, holders) + self.rejoining_for(need).count()
    }

    /// Takes `count` fitting workers, in id order: those free for the job alone and the
    /// fitting `holders` first, then spot workers first unless the job is on-demand only.
    fn take(&mut self, need: &Need, count: usize, holders: &[WorkerId]) -> Vec<WorkerId> {
        let mut ids: Vec<WorkerId> = self.rejoining_for(need).map(|w| w.id).take(count).collect();
        self.rejoining.retain(|w| !ids.contains(&w.id));
        if !holders.is_empty() {
            if !need.on_demand_only {
                let rest = count - ids.len();
                ids.extend(self.spot.take_holders(need, rest, holders));
            }
            let rest = count - ids.len();
            ids.extend(self.on_demand.take_holders(need, rest, holders));
        }
        if !need.on_demand_only {
            let rest = count - ids.len();
            ids.extend(self.spot.take(need, rest));
        }
        let rest = count - ids.len();
        ids.extend(self.on_demand.take(need, rest));
        ids.sort();
        ids
    }
}

/// Places `pending` jobs on `free` workers (see the module docs for the rules).
pub fn schedule(pending: &[PendingJob], free: &[FreeWorker]) -> Plan {
    schedule_preempting(pending, free, &[])
}

/// [`schedule`], and for a job that cannot be placed, the `running` jobs of lower priority to
/// stop so it can be (see the module docs, priority preemption).
pub fn schedule_preempting(pending: &[PendingJob], free: &[FreeWorker], running: &[Preemptible]) -> Plan {
    let mut pools: BTreeMap<(&str, &str), Pool> = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for w in free.iter().filter(|w| seen.insert(w.id)) {
        let pool = pools.entry((w.instance_type.as_str(), w.zone.as_str())).or_default();
        if w.only_for.is_some() {
            pool.rejoining.push(w.clone());
            continue;
        }
        let kind = if w.spot { &mut pool.spot } else { &mut pool.on_demand };
        kind.workers.push((w.gpus, w.id, w.usd_per_hour));
    }
    // Fewest GPUs first (the best fit), other jobs' warm spares last, then id order.
    let spares: std::collections::BTreeSet<WorkerId> = free.iter().filter(|w| w.spare).map(|w| w.id).collect();
    for pool in pools.values_mut() {
        pool.spot.workers.sort_by_key(|(g, id, _)| (*g, spares.contains(id), *id));
        pool.on_demand.workers.sort_by_key(|(g, id, _)| (*g, spares.contains(id), *id));
    }
    let mut order: Vec<&PendingJob> = pending.iter().take(PENDING_JOBS_MAX).collect();
    order.sort_by_key(|j| (std::cmp::Reverse(j.priority), j.submitted_index, j.id));
    let mut plan = Plan::default();
    // Running jobs by the order they are stopped in: those already stopping (no new stop),
    // then the lowest priority, then the newest submission. Each is counted for one job.
    let mut victims: Vec<&Preemptible> = running.iter().filter(|r| !r.members.is_empty()).collect();
    victims.sort_by_key(|r| (!r.stopping, r.priority, std::cmp::Reverse(r.submitted_index), std::cmp::Reverse(r.id)));
    let mut claims = Claims::default();
    for job in order {
        let min = job.min_workers.max(1) as usize;
        let want = job.max_workers.max(job.min_workers) as usize;
        let (need, holders) = (Need::of(job), job.holders.as_slice());
        let typed = |name: &(&str, &str)| crate::spec::instance_type_allowed(&job.instance_types, name.0);
        let best = pools
            .iter()
            .filter(|(name, _)| typed(name))
            .map(|(name, pool)| {
                let fitting = pool.fitting(&need);
                ((fitting.min(want), pool.holding(&need, holders), fitting), *name)
            })
            .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(&a.1)))
            .map(|((_, _, fitting), name)| (fitting, name));
        match best {
            Some((fitting, name)) if fitting >= min => {
                let count = fitting.min(want);
                let pool = pools.get_mut(&name).expect("the pool was just found");
                let workers = pool.take(&need, count, holders);
                plan.placements.push(Placement { job: job.id, workers });
            }
            _ if job.mixed => match take_mixed(&mut pools, job, min) {
                Ok(workers) => plan.placements.push(Placement { job: job.id, workers }),
                Err(total) => {
                    let stops = preempt_for(job, min, &mut pools, &victims, &mut claims);
                    let kind = if job.on_demand_only { " on-demand" } else { "" };
                    let reason =
                        format!("waiting for {min} free{kind} worker(s) of any pool (mixed_types); {total} fit");
                    plan.waiting.insert(job.id, with_stops(reason, &stops));
                    plan.preemptions.extend(orders(job, &stops));
                }
            },
            best => {
                let stops = preempt_for(job, min, &mut pools, &victims, &mut claims);
                let (largest, pool) = best.map_or((0, String::from("none")), |(n, (t, z))| (n, format!("{t}/{z}")));
                let mut fitting = if job.gpus_per_worker > 0 {
                    format!(" with >= {} GPU(s)", job.gpus_per_worker)
                } else {
                    String::new()
                };
                if !job.instance_types.is_empty() {
                    fitting.push_str(&format!(" of type {}", job.instance_types.join("/")));
                }
                if let Some(cap) = job.max_usd_per_hour {
                    fitting.push_str(&format!(" at most {cap} $/h"));
                }
                let kind = if job.on_demand_only { " on-demand" } else { "" };
                let reason = format!(
                    "waiting for {min} free{kind} worker(s){fitting} in one pool; the largest such group has {largest} ({pool})"
                );
                plan.waiting.insert(job.id, with_stops(reason, &stops));
                plan.preemptions.extend(orders(job, &stops));
            }
        }
    }
    plan.held = claims.held;
    plan
}

/// What the waiting jobs of one pass took for themselves by stopping others.
#[derive(Debug, Default)]
struct Claims {
    /// Running jobs counted for a waiting job (each for one at most).
    jobs: std::collections::BTreeSet<JobId>,
    /// Waiting jobs that looked for jobs to stop (at most [`PREEMPTION_TRIES_PER_PASS`]).
    tries: usize,
    /// Free workers held for them.
    held: Vec<WorkerId>,
}

/// The running jobs `job` stops (or waits for, those already stopping) to make its gang of
/// `min` with the free workers in `pools`, none when that cannot make it. The free workers it
/// counted are taken out of `pools` (held for it this pass) and, with the jobs, added to `claims`.
fn preempt_for<'a>(
    job: &PendingJob,
    min: usize,
    pools: &mut BTreeMap<(&str, &str), Pool>,
    victims: &[&'a Preemptible],
    claims: &mut Claims,
) -> Vec<&'a Preemptible> {
    let need = Need::of(job);
    if claims.tries >= PREEMPTION_TRIES_PER_PASS {
        return Vec::new();
    }
    let candidates: Vec<&Preemptible> =
        victims.iter().copied().filter(|v| v.priority < job.priority && !claims.jobs.contains(&v.id)).collect();
    if candidates.is_empty() {
        return Vec::new();
    }
    claims.tries += 1;
    let typed = |instance_type: &str| crate::spec::instance_type_allowed(&job.instance_types, instance_type);
    // The groups a gang may form in: each allowed pool, or (mixed_types) all of them.
    let mut groups: std::collections::BTreeSet<(&str, &str)> =
        pools.keys().copied().filter(|(t, _)| typed(t)).collect();
    for v in &candidates {
        groups.extend(
            v.members.iter().filter(|w| typed(&w.instance_type)).map(|w| (w.instance_type.as_str(), w.zone.as_str())),
        );
    }
    let in_group = |group: &(&str, &str), w: &FreeWorker| {
        typed(&w.instance_type) && (job.mixed || (w.instance_type.as_str(), w.zone.as_str()) == *group)
    };
    let mut best: Option<Stops> = None;
    for group in &groups {
        let free = if job.mixed {
            pools.iter().filter(|(name, _)| typed(name.0)).map(|(_, pool)| pool.fitting(&need)).sum()
        } else {
            pools.get(group).map_or(0, |pool| pool.fitting(&need))
        };
        let adding: Vec<(&Preemptible, usize)> = candidates
            .iter()
            .map(|v| (*v, v.members.iter().filter(|w| in_group(group, w) && need.fits(w)).count()))
            .filter(|(_, adds)| *adds > 0)
            .collect();
        if let Some(jobs) = pick_stops(&adding, free, min) {
            let stops = Stops { group: *group, jobs };
            if best.as_ref().is_none_or(|b| stops.score() < b.score()) {
                best = Some(stops);
            }
        }
        if job.mixed {
            break; // one group: every allowed pool
        }
    }
    let Some(Stops { group, jobs: stops }) = best else {
        return Vec::new();
    };
    // Hold the free workers counted for this job: a lower job placed on them would be the
    // next one stopped.
    for (name, pool) in pools.iter_mut() {
        if typed(name.0) && (job.mixed || *name == group) {
            let fitting = pool.fitting(&need);
            claims.held.extend(pool.take(&need, fitting, &[]));
        }
    }
    claims.jobs.extend(stops.iter().map(|v| v.id));
    stops
}

/// The jobs to stop in one group of pools (one pool, or every allowed pool for a mixed gang).
struct Stops<'p, 'a> {
    group: (&'p str, &'p str),
    jobs: Vec<&'a Preemptible>,
}

impl Stops<'_, '_> {
    /// The highest priority stopped anew, then how many are: the lower, the better.
    fn score(&self) -> (i32, usize) {
        let new = || self.jobs.iter().filter(|v| !v.stopping);
        (new().map(|v| v.priority).max().unwrap_or(i32::MIN), new().count())
    }
}

/// Of `adding` (jobs in the order they are stopped in, each with the fitting workers its stop
/// frees), the ones that make `min` with `free` workers: taken in order until they do, then
/// those not needed spared, the last taken (the highest priority) first; a job already
/// stopping is never spared (it frees its workers anyway). `None`: all of them do not make it.
fn pick_stops<'a>(adding: &[(&'a Preemptible, usize)], free: usize, min: usize) -> Option<Vec<&'a Preemptible>> {
    let mut count = free;
    let mut taken: Vec<(&Preemptible, usize)> = Vec::new();
    for (v, adds) in adding {
        if count >= min {
            break;
        }
        count += adds;
        taken.push((*v, *adds));
    }
    if count < min {
        return None;
    }
    for i in (0..taken.len()).rev() {
        let (v, adds) = taken[i];
        if !v.stopping && count - adds >= min {
            count -= adds;
            taken.remove(i);
        }
    }
    Some(taken.into_iter().map(|(v, _)| v).collect())
}

/// The orders to stop the jobs among `stops` not already stopping, for `job`.
fn orders<'a>(job: &'a PendingJob, stops: &'a [&Preemptible]) -> impl Iterator<Item = Preemption> + 'a {
    stops.iter().filter(|v| !v.stopping).map(|v| Preemption {
        victim: v.id,
        generation: v.generation,
        for_job: job.id,
        priorities: (job.priority, v.priority),
        inference: v.inference,
    })
}

/// A waiting reason with the jobs stopped for it named.
fn with_stops(reason: String, stops: &[&Preemptible]) -> String {
    if stops.is_empty() {
        return reason;
    }
    let (inference, training): (Vec<&&Preemptible>, Vec<&&Preemptible>) = stops.iter().partition(|v| v.inference);
    let mut parts = Vec::new();
    if !inference.is_empty() {
        let ids: Vec<String> = inference.iter().map(|v| v.id.to_string()).collect();
        parts.push(format!("inference {} gives its workers back after their shard", ids.join(", ")));
    }
    if !training.is_empty() {
        let names: Vec<String> = training.iter().map(|v| format!("{} (priority {})", v.id, v.priority)).collect();
        parts.push(format!("stopping {} at a checkpoint for it (lower priority)", names.join(", ")));
    }
    format!("{reason}; {}", parts.join("; "))
}

/// A mixed gang (see the module docs): up to `max` workers from the zone with the most fitting
/// ones when it holds `min`, else from every zone, largest pools first, in id order. `Err`:
/// how many fit in all, fewer than `min` (nothing is taken).
fn take_mixed(pools: &mut BTreeMap<(&str, &str), Pool>, job: &PendingJob, min: usize) -> Result<Vec<WorkerId>, usize> {
    let need = Need::of(job);
    let typed = |name: &(&str, &str)| crate::spec::instance_type_allowed(&job.instance_types, name.0);
    let mut per_zone: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, pool) in pools.iter().filter(|(name, _)| typed(name)) {
        *per_zone.entry(name.1).or_default() += pool.fitting(&need);
    }
    let total: usize = per_zone.values().sum();
    if total < min {
        return Err(total);
    }
    let zone = per_zone
        .iter()
        .filter(|(_, n)| **n >= min)
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(zone, _)| *zone);
    let mut names: Vec<((&str, &str), usize)> = pools
        .iter()
        .filter(|(name, _)| typed(name) && zone.is_none_or(|zone| name.1 == zone))
        .map(|(name, pool)| (*name, pool.fitting(&need)))
        .filter(|(_, n)| *n > 0)
        .collect();
    names.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let want = job.max_workers.max(job.min_workers) as usize;
    let mut workers = Vec::with_capacity(want);
    for (name, fitting) in names {
        let count = fitting.min(want - workers.len());
        if count == 0 {
            break;
        }
        let pool = pools.get_mut(&name).expect("the pool was just listed");
        workers.extend(pool.take(&need, count, &job.holders));
    }
    workers.sort();
    Ok(workers)
}

/// A running job that may grow (`world < max`).
#[derive(Debug, Clone, PartialEq)]
pub struct RunningJob {
    pub id: JobId,
    pub generation: u64,
    pub priority: i32,
    pub submitted_index: u64,
    pub world: u32,
    pub max_workers: u32,
    pub gpus_per_worker: u32,
    /// (instance type, zone) of its gang.
    pub pool: (String, String),
    /// It grows on on-demand workers only.
    pub on_demand_only: bool,
    /// The most a worker's instance may cost an hour (`capacity.max_price_usd_per_hour`).
    pub max_usd_per_hour: Option<f64>,
}

/// Elastic growth: which running jobs to regroup at a larger world size, given the workers left
/// free after this pass's placements. Only when no job is waiting (pending jobs come first);
/// each free worker is promised to one job at most, in priority then FIFO order.
pub fn grow(running: &[RunningJob], free: &[FreeWorker], any_waiting: bool) -> Vec<(JobId, u64)> {
    if any_waiting {
        return Vec::new();
    }
    let mut order: Vec<&RunningJob> = running.iter().filter(|j| j.world < j.max_workers).collect();
    order.sort_by_key(|j| (std::cmp::Reverse(j.priority), j.submitted_index, j.id));
    let mut taken = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for job in order {
        let want = (job.max_workers - job.world) as usize;
        let need = Need {
            job: job.id,
            gpus: job.gpus_per_worker,
            on_demand_only: job.on_demand_only,
            max_usd_per_hour: job.max_usd_per_hour,
        };
        let fitting: Vec<WorkerId> = free
            .iter()
            .filter(|w| (w.instance_type.as_str(), w.zone.as_str()) == (job.pool.0.as_str(), job.pool.1.as_str()))
            .filter(|w| w.only_for.is_none() && need.fits(w) && !taken.contains(&w.id))
            .map(|w| w.id)
            .take(want)
            .collect();
        if !fitting.is_empty() {
            taken.extend(fitting);
            out.push((job.id, job.generation));
        }
    }
    out
}

#[cfg(test)]
mod tests;
