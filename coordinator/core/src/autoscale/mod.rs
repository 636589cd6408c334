//! The autoscaling policy: which capacity to buy for the gangs that wait, and which idle
//! instances to give back. Pure: prices, instances and time come in as values; decisions go
//! out (the coordinator records them through Raft before a provider carries them out).
//!
//! ```text
//!   waiting gangs ─┐
//!   held instances ├─▶ plan() ─▶ Launch{job, pool, spot, count} / Terminate{id} + reasons
//!   price quotes  ─┤
//!   limits, back-off ┘
//! ```
//!
//! Rules
//! - Gangs in priority then FIFO order. A gang's instances share one pool (instance type +
//!   zone, DESIGN §6): idle instances already in a pool count toward it, the rest is bought
//!   in the same pool. A mixed gang (`capacity.mixed_types`) also counts the idle instances
//!   of its zone's other pools (and, when idle instances anywhere complete it, those: the
//!   scheduler places it the same way), and buys only the rest.
//! - Pool choice: the lowest *expected* hourly cost of the gang among the pools the job allows
//!   (`capacity.instance_types`, `max_price_usd_per_hour`, enough GPUs). A spot gang of W
//!   workers is interrupted when any member is, W x rate times an hour, and each interruption
//!   stalls all W for [`Limits::interruption_cost_hours`] (replacement + restart; Flotilla
//!   checkpoints at the notice, so no work is lost): W x price x (1 + W x rate x cost_hours).
//!   The rate is the pool's long-run rate plus what [`risk::PoolRisk`] has seen lately in the
//!   pools that fail together with it (same zone, same type). A small penalty per instance
//!   already held in a pool spreads gangs over pools (one pool's reclaim takes fewer gangs
//!   down at once).
//! - Replacement at a notice (issue 25): a running job whose noticed member has no
//!   replacement yet comes as a gang of one, first within its priority, never bought in the
//!   noticed pool (it is being reclaimed); an idle instance anywhere covers it (the leader
//!   hands the rank over as soon as its worker registers).
//! - Elastic growth: a running job below `workers.max` comes as a [`Gang::growth`] of the
//!   missing workers, in its gang's pool, spot only, after every waiting gang; the scheduler
//!   regroups the job once they register (`scheduler::grow`).
//! - Never spot at or above the on-demand price of the same pool (nor above the job's
//!   `max_price_usd_per_hour`): on-demand is then the better buy.
//! - Spot for `capacity.spot` jobs; on-demand only with `on_demand_fallback` (or for a job that
//!   is not spot), and then only when no allowed spot pool is open (back-off after capacity
//!   errors, or priced at or above on-demand) or its price is below every open spot pool's
//!   expected cost.
//! - Hard caps: never more than `max_instances` held, never more than `max_usd_per_hour` for
//!   the cluster; a job whose budget is spent gets nothing.
//! - Scale-down: an idle instance that no waiting gang can use is terminated once it has been
//!   idle for `idle_cooldown_ms`; with no work, the fleet goes to zero.
//! - Back-off ([`Backoff`]): capacity or quota errors block a (pool, spot) pair for a time that
//!   doubles per failure (capped), never a tight retry loop.

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::JobId;

pub mod deadline;
pub mod risk;
#[cfg(test)]
mod tests;

/// An instance type in one zone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct PoolKey {
    pub instance_type: String,
    pub zone: String,
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.instance_type, self.zone)
    }
}

/// What a pool costs now, and how often its spot instances are taken back.
#[derive(Debug, Clone, PartialEq)]
pub struct Quote {
    pub pool: PoolKey,
    pub gpus: u32,
    pub spot_usd_per_hour: f64,
    pub on_demand_usd_per_hour: f64,
    /// Spot interruptions per instance-hour (from history or a trace).
    pub interruptions_per_hour: f64,
}

/// A gang waiting for capacity.
#[derive(Debug, Clone, PartialEq)]
pub struct Gang {
    pub job: JobId,
    pub priority: i32,
    /// FIFO order within a priority (the submission's Raft index).
    pub order: u64,
    pub workers: u32,
    pub gpus_per_worker: u32,
    /// Allowed instance types; empty: any.
    pub instance_types: Vec<String>,
    pub spot: bool,
    pub on_demand_fallback: bool,
    pub max_price_usd_per_hour: Option<f64>,
    /// What is left of the job's budget; `None`: no budget.
    pub budget_left_usd: Option<f64>,
    /// Only this pool (a running job's growth joins its gang's pool); `None`: any.
    pub pool: Option<PoolKey>,
    /// May span pools (`capacity.mixed_types`): idle instances of other pools count.
    pub mixed: bool,
    /// Never buy in this pool (a noticed member's: it is being reclaimed).
    pub avoid: Option<PoolKey>,
}

impl Gang {
    /// A gang with no constraints beyond its size: priority 0, any instance type, spot first
    /// with on-demand fallback, no price cap, no budget.
    pub fn unconstrained(job: JobId, order: u64, workers: u32, gpus_per_worker: u32) -> Gang {
        Gang {
            job,
            priority: 0,
            order,
            workers,
            gpus_per_worker,
            instance_types: Vec::new(),
            spot: true,
            on_demand_fallback: true,
            max_price_usd_per_hour: None,
            budget_left_usd: None,
            pool: None,
            mixed: false,
            avoid: None,
        }
    }

    /// Growth for a running elastic job: `workers` more in its gang's pool, spot only and below
    /// every waiting gang (growth is bought only with capacity nobody waits for).
    pub fn growth(job: JobId, order: u64, workers: u32, gpus_per_worker: u32, pool: PoolKey) -> Gang {
        Gang {
            priority: i32::MIN,
            on_demand_fallback: false,
            pool: Some(pool),
            ..Gang::unconstrained(job, order, workers, gpus_per_worker)
        }
    }
}

/// An instance the cluster holds (running, or requested and not yet registered).
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub id: String,
    pub pool: PoolKey,
    pub gpus: u32,
    pub spot: bool,
    pub usd_per_hour: f64,
    /// Training a gang now.
    pub busy: bool,
    /// Bought for this job (it gets it first).
    pub reserved_for: Option<JobId>,
    /// Since when it has had nothing to do (`None` while busy or still starting).
    pub idle_since_ms: Option<u64>,
    /// Its worker registered and was lost since (its lease expired: the agent died or the host
    /// is cut off), or is held out as unreachable by its peers: no capacity for any gang, given
    /// back like an idle instance.
    pub lost: bool,
    /// Its idle worker is this running job's warm spare (`crate::state::warm_spares`): that
    /// job's spares keep it first, other gangs count it last (the scheduler takes it last).
    pub spare_of: Option<JobId>,
}

impl Held {
    /// The order in which `job`'s gang counts idle instances: those bought for it, then its
    /// own spares, then nobody's, then other jobs' spares; then by id.
    fn order_for(&self, job: JobId) -> (bool, u8, String) {
        let spare = match self.spare_of {
            Some(of) if of == job => 0,
            None => 1,
            Some(_) => 2,
        };
        (self.reserved_for != Some(job), spare, self.id.clone())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_instances: u32,
    pub max_usd_per_hour: f64,
    pub idle_cooldown_ms: u64,
    /// Hours one spot interruption stalls each member of the gang (replacement and restart).
    pub interruption_cost_hours: f64,
    /// Price penalty per instance already held in a pool (0.02: 2% per instance).
    pub diversification: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_instances: 64,
            max_usd_per_hour: 100.0,
            idle_cooldown_ms: 5 * 60 * 1000,
            interruption_cost_hours: 0.1,
            diversification: 0.02,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Launch { job: JobId, pool: PoolKey, spot: bool, count: u32, usd_per_hour: f64 },
    Terminate { id: String },
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub decisions: Vec<Decision>,
    /// Why each gang still waits (capacity is being bought, or cannot be).
    pub waiting: BTreeMap<JobId, String>,
}

/// Capacity errors per (pool, spot): no new request there before `until_ms`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Backoff {
    blocked: BTreeMap<(PoolKey, bool), (u64, u32)>,
}

/// First back-off after a capacity error, and the most it grows to.
pub const BACKOFF_FIRST_MS: u64 = 30_000;
pub const BACKOFF_MAX_MS: u64 = 30 * 60 * 1000;

impl Backoff {
    /// Records a capacity or quota error for `pool` (spot or on-demand) at `now_ms`.
    pub fn failed(&mut self, pool: &PoolKey, spot: bool, now_ms: u64) {
        let entry = self.blocked.entry((pool.clone(), spot)).or_insert((0, 0));
        entry.1 = entry.1.saturating_add(1);
        let delay = BACKOFF_FIRST_MS.saturating_mul(1 << (entry.1 - 1).min(16)).min(BACKOFF_MAX_MS);
        entry.0 = now_ms.saturating_add(delay);
    }

    /// A launch there succeeded: forget its failures.
    pub fn succeeded(&mut self, pool: &PoolKey, spot: bool) {
        self.blocked.remove(&(pool.clone(), spot));
    }

    pub fn is_blocked(&self, pool: &PoolKey, spot: bool, now_ms: u64) -> bool {
        self.blocked.get(&(pool.clone(), spot)).is_some_and(|(until, _)| now_ms < *until)
    }
}

/// Expected hourly price per worker of a gang of `workers` in a pool: a spot gang stops when
/// any member is interrupted, and each stop idles every member for the interruption's cost.
pub fn risk_adjusted(quote: &Quote, spot: bool, workers: u32, limits: &Limits) -> f64 {
    if spot {
        let gang_rate = f64::from(workers.max(1)) * quote.interruptions_per_hour.max(0.0);
        quote.spot_usd_per_hour * (1.0 + gang_rate * limits.interruption_cost_hours)
    } else {
        quote.on_demand_usd_per_hour
    }
}

fn price(quote: &Quote, spot: bool) -> f64 {
    if spot { quote.spot_usd_per_hour } else { quote.on_demand_usd_per_hour }
}

fn allowed(gang: &Gang, quote: &Quote, spot: bool) -> bool {
    let typed = (gang.instance_types.is_empty() || gang.instance_types.contains(&quote.pool.instance_type))
        && gang.pool.as_ref().is_none_or(|p| *p == quote.pool)
        && gang.avoid.as_ref().is_none_or(|p| *p != quote.pool);
    let p = price(quote, spot);
    typed
        && quote.gpus >= gang.gpus_per_worker
        && p.is_finite()
        && p >= 0.0
        && gang.max_price_usd_per_hour.is_none_or(|cap| p <= cap)
        && (!spot || p < quote.on_demand_usd_per_hour) // spot at or above on-demand: buy on-demand
}

/// Decides launches and terminations (see the module docs for the rules).
pub fn plan(now_ms: u64, gangs: &[Gang], held: &[Held], quotes: &[Quote], limits: &Limits, backoff: &Backoff) -> Plan {
    let mut plan = Plan::default();
    let mut order: Vec<&Gang> = gangs.iter().collect();
    order.sort_by_key(|g| (std::cmp::Reverse(g.priority), g.order, g.job));
    // Idle capacity not yet promised in this pass, by pool.
    let mut free: BTreeMap<PoolKey, Vec<&Held>> = BTreeMap::new();
    for h in held.iter().filter(|h| !h.busy && !h.lost) {
        free.entry(h.pool.clone()).or_default().push(h);
    }
    let mut count = held.len() as u64;
    let mut hourly: f64 = held.iter().map(|h| h.usd_per_hour).sum();
    let mut in_pool: BTreeMap<PoolKey, u32> = BTreeMap::new();
    for h in held {
        *in_pool.entry(h.pool.clone()).or_default() += 1;
    }
    let mut used: BTreeSet<String> = BTreeSet::new();
    for gang in order {
        let workers = gang.workers.max(1);
        // Already covered by idle instances of one pool (its own reservations first)?
        // A gang that must not run on spot (`capacity.spot = false`, or out of slack for its
        // deadline) does not count idle spot instances.
        let usable = |h: &&Held, gang: &Gang| {
            !used.contains(&h.id)
                && h.gpus >= gang.gpus_per_worker
                && crate::spec::instance_allowed(
                    &gang.instance_types,
                    gang.max_price_usd_per_hour,
                    &h.pool.instance_type,
                    h.usd_per_hour,
                )
                && h.reserved_for.is_none_or(|j| j == gang.job)
                && (gang.spot || !h.spot)
                && gang.pool.as_ref().is_none_or(|p| *p == h.pool)
        };
        let best_idle = free
            .iter()
            .map(|(pool, hs)| (pool.clone(), hs.iter().filter(|h| usable(h, gang)).count() as u32))
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)));
        if let Some((pool, n)) = &best_idle
            && *n >= workers
        {
            let mut taken: Vec<&Held> = free[pool].iter().copied().filter(|h| usable(h, gang)).collect();
            taken.sort_by_key(|h| h.order_for(gang.job));
            used.extend(taken.into_iter().take(workers as usize).map(|h| h.id.clone()));
            continue;
        }
        // A mixed gang: idle instances of one zone, else of every zone (as the scheduler).
        if gang.mixed {
            let mut per_zone: BTreeMap<&str, Vec<&Held>> = BTreeMap::new();
            for h in free.values().flatten().copied().filter(|h| usable(h, gang)) {
                per_zone.entry(h.pool.zone.as_str()).or_default().push(h);
            }
            let total: usize = per_zone.values().map(Vec::len).sum();
            if total >= workers as usize {
                let zone = per_zone
                    .iter()
                    .filter(|(_, hs)| hs.len() >= workers as usize)
                    .max_by(|a, b| a.1.len().cmp(&b.1.len()).then_with(|| b.0.cmp(a.0)))
                    .map(|(zone, _)| *zone);
                let mut taken: Vec<&Held> = per_zone
                    .iter()
                    .filter(|(z, _)| zone.is_none_or(|zone| **z == zone))
                    .flat_map(|(_, hs)| hs.iter().copied())
                    .collect();
                taken.sort_by_key(|h| h.order_for(gang.job));
                used.extend(taken.into_iter().take(workers as usize).map(|h| h.id.clone()));
                continue;
            }
        }
        if gang.budget_left_usd.is_some_and(|left| left <= 0.0) {
            plan.waiting.insert(gang.job, "its budget (capacity.budget_usd) is spent".into());
            continue;
        }
        // Idle instances that count toward buying in `pool`: its own of the same market, or for
        // a mixed gang every usable one in its zone.
        let idle_for = |pool: &PoolKey, spot: bool| -> Vec<&Held> {
            if gang.mixed {
                free.iter()
                    .filter(|(p, _)| p.zone == pool.zone)
                    .flat_map(|(_, hs)| hs.iter().copied())
                    .filter(|h| usable(h, gang))
                    .collect()
            } else {
                free.get(pool)
                    .map_or(Vec::new(), |hs| hs.iter().copied().filter(|h| usable(h, gang) && h.spot == spot).collect())
            }
        };
        // Cheapest way to complete the gang in one pool: idle there + bought there.
        let mut best: Option<(f64, &Quote, bool, u32)> = None;
        for quote in quotes {
            for spot in [true, false] {
                // On-demand for a spot job: when no spot pool is open, or when it is simply the
                // cheaper buy (spot priced near on-demand, or risky enough to cost more).
                let permitted = if spot { gang.spot } else { !gang.spot || gang.on_demand_fallback };
                if !permitted || !allowed(gang, quote, spot) || backoff.is_blocked(&quote.pool, spot, now_ms) {
                    continue;
                }
                let idle = idle_for(&quote.pool, spot).len() as u32;
                let buy = workers.saturating_sub(idle);
                let crowd = 1.0 + limits.diversification * f64::from(*in_pool.get(&quote.pool).unwrap_or(&0));
                let score = risk_adjusted(quote, spot, workers, limits) * crowd * f64::from(buy);
                let better = best.is_none_or(|(s, q, sp, _)| {
                    score < s || (score == s && (quote.pool.clone(), !spot) < (q.pool.clone(), !sp))
                });
                if better {
                    best = Some((score, quote, spot, buy));
                }
            }
        }
        let Some((_, quote, spot, buy)) = best else {
            let permitted_anywhere = quotes.iter().any(|q| {
                [true, false].into_iter().any(|spot| {
                    let permitted = if spot { gang.spot } else { !gang.spot || gang.on_demand_fallback };
                    permitted && allowed(gang, q, spot)
                })
            });
            let why = if !permitted_anywhere {
                "no allowed pool fits (instance_types, GPUs, max_price_usd_per_hour)"
            } else if gang.spot && !gang.on_demand_fallback {
                "every allowed spot pool is backing off after failed launches (no on-demand fallback)"
            } else {
                "every allowed pool is backing off after failed launches"
            };
            plan.waiting.insert(gang.job, why.into());
            continue;
        };
        let usd_per_hour = price(quote, spot);
        if count + u64::from(buy) > u64::from(limits.max_instances) {
            plan.waiting.insert(
                gang.job,
                format!(
                    "{buy} more instance(s) would pass the cluster's limit of {} (coordinator --max-instances)",
                    limits.max_instances
                ),
            );
            continue;
        }
        if hourly + usd_per_hour * f64::from(buy) > limits.max_usd_per_hour + 1e-9 {
            plan.waiting.insert(
                gang.job,
                format!(
                    "{buy} x {usd_per_hour:.3} $/h would pass the cluster's budget of {:.2} $/h (coordinator --max-usd-per-hour)",
                    limits.max_usd_per_hour
                ),
            );
            continue;
        }
        let mut taken = idle_for(&quote.pool, spot);
        taken.sort_by_key(|h| (h.pool != quote.pool, h.order_for(gang.job)));
        let taken: Vec<String> = taken.into_iter().take((workers - buy) as usize).map(|h| h.id.clone()).collect();
        used.extend(taken);
        if buy > 0 {
            count += u64::from(buy);
            hourly += usd_per_hour * f64::from(buy);
            *in_pool.entry(quote.pool.clone()).or_default() += buy;
            plan.decisions.push(Decision::Launch {
                job: gang.job,
                pool: quote.pool.clone(),
                spot,
                count: buy,
                usd_per_hour,
            });
            plan.waiting.insert(
                gang.job,
                format!(
                    "buying {buy} {} instance(s) in {} at {usd_per_hour:.3} $/h",
                    if spot { "spot" } else { "on-demand" },
                    quote.pool
                ),
            );
        }
    }
    // Scale-down: idle past the cooldown and not promised to a gang in this pass.
    for h in held.iter().filter(|h| !h.busy && !used.contains(&h.id)) {
        if h.idle_since_ms.is_some_and(|since| now_ms.saturating_sub(since) >= limits.idle_cooldown_ms) {
            plan.decisions.push(Decision::Terminate { id: h.id.clone() });
        }
    }
    plan
}
