//! Correlated interruption risk: what the market did lately raises the estimated risk of the
//! pools that tend to fail together.
//!
//! Spot capacity events are rarely confined to one pool: a zone runs short of capacity for
//! every type at once, and a type in short supply is short in several zones. So an
//! interruption observed in one pool adds to the interruption rate the policy assumes for
//!
//! - the same pool: [`SAME_POOL_PER_HOUR`] per event,
//! - every other pool of the same zone: [`SAME_ZONE_WEIGHT`] of that,
//! - the same instance type in other zones: [`SAME_TYPE_WEIGHT`] of that,
//!
//! where one event is one pool's reclaims within [`EVENT_MERGE_MS`] (a capacity event that takes
//! back eight instances at once is one signal, not eight),
//! each decaying as `exp(-age / RISK_DECAY_MS)`, on top of the pool's long-run rate (the quote's
//! `interruptions_per_hour`: history or a trace). Pure: events and time come in as values; the
//! leader keeps a [`PoolRisk`] in its memory (a new leader starts afresh) and the market
//! simulation keeps one per run.

use std::collections::VecDeque;

use super::{PoolKey, Quote};

/// Events remembered at most (the oldest are forgotten first).
pub const RISK_EVENTS_MAX: usize = 4096;
/// The e-folding time of an event's weight: after 2 h it counts 37%, after 6 h 5%.
pub const RISK_DECAY_MS: u64 = 2 * 3_600_000;
/// Events older than this many decay times are dropped (their weight is below 0.7%).
const FORGET_AFTER_DECAYS: u64 = 5;
/// Interruptions per hour added to a pool by one fresh event there. Chosen on the market
/// simulation (scripts/bench/spot_cost.sh, both shipped traces): 0.25-2 were tried; higher
/// values avoid failing pools sooner but pay for pricier ones longer.
pub const SAME_POOL_PER_HOUR: f64 = 1.0;
/// Reclaims in one pool closer together than this are one event.
pub const EVENT_MERGE_MS: u64 = 10 * 60_000;
/// Share of that added to the other pools of the same zone.
pub const SAME_ZONE_WEIGHT: f64 = 0.5;
/// Share added to the same instance type in other zones.
pub const SAME_TYPE_WEIGHT: f64 = 0.25;

/// How strongly an event in `seen` speaks for `pool`: 1, the zone or type share, or 0.
pub fn relation_weight(seen: &PoolKey, pool: &PoolKey) -> f64 {
    match (seen.zone == pool.zone, seen.instance_type == pool.instance_type) {
        (true, true) => 1.0,
        (true, false) => SAME_ZONE_WEIGHT,
        (false, true) => SAME_TYPE_WEIGHT,
        (false, false) => 0.0,
    }
}

/// Interruptions observed lately, by pool and time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolRisk {
    events: VecDeque<(PoolKey, u64)>,
}

impl PoolRisk {
    /// Records that a spot instance of `pool` was taken back at `at_ms` (times in order).
    pub fn observe(&mut self, pool: &PoolKey, at_ms: u64) {
        let recent = self.events.iter().rev().take_while(|(_, t)| at_ms.saturating_sub(*t) < EVENT_MERGE_MS);
        if recent.into_iter().any(|(seen, _)| seen == pool) {
            return; // part of the same event
        }
        let horizon = RISK_DECAY_MS * FORGET_AFTER_DECAYS;
        while self.events.front().is_some_and(|(_, t)| at_ms.saturating_sub(*t) > horizon) {
            self.events.pop_front();
        }
        if self.events.len() == RISK_EVENTS_MAX {
            self.events.pop_front();
        }
        self.events.push_back((pool.clone(), at_ms));
    }

    /// Interruptions per instance-hour to add to `pool`'s long-run rate at `now_ms`.
    pub fn extra_rate(&self, pool: &PoolKey, now_ms: u64) -> f64 {
        self.events
            .iter()
            .map(|(seen, at)| {
                let age = now_ms.saturating_sub(*at) as f64;
                relation_weight(seen, pool) * SAME_POOL_PER_HOUR * (-age / RISK_DECAY_MS as f64).exp()
            })
            .sum()
    }

    /// Adds each pool's [`extra_rate`](PoolRisk::extra_rate) to its quote.
    pub fn adjust(&self, quotes: &mut [Quote], now_ms: u64) {
        if self.events.is_empty() {
            return;
        }
        for quote in quotes {
            quote.interruptions_per_hour += self.extra_rate(&quote.pool, now_ms);
        }
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn pool(t: &str, z: &str) -> PoolKey {
        PoolKey { instance_type: t.into(), zone: z.into() }
    }

    const HOUR_MS: u64 = 3_600_000;

    #[test]
    fn an_event_speaks_most_for_its_pool_then_its_zone_then_its_type() {
        let mut risk = PoolRisk::default();
        risk.observe(&pool("g5", "a"), 0);
        let at = |t, z| risk.extra_rate(&pool(t, z), 0);
        assert_eq!(at("g5", "a"), SAME_POOL_PER_HOUR);
        assert_eq!(at("g4dn", "a"), SAME_POOL_PER_HOUR * SAME_ZONE_WEIGHT);
        assert_eq!(at("g5", "b"), SAME_POOL_PER_HOUR * SAME_TYPE_WEIGHT);
        assert_eq!(at("g4dn", "b"), 0.0);
        // One decay time later it counts e^-1.
        let later = risk.extra_rate(&pool("g5", "a"), RISK_DECAY_MS);
        assert!((later - SAME_POOL_PER_HOUR / std::f64::consts::E).abs() < 1e-12, "{later}");
    }

    #[test]
    fn reclaims_together_are_one_event_and_old_events_are_forgotten() {
        let mut risk = PoolRisk::default();
        for i in 0..8 {
            risk.observe(&pool("g5", "a"), i * 1_000); // a capacity event takes eight at once
        }
        assert_eq!(risk.len(), 1);
        risk.observe(&pool("g6", "a"), 2_000); // another pool: its own event
        risk.observe(&pool("g5", "a"), EVENT_MERGE_MS + 10_000); // later: a new event
        assert_eq!(risk.len(), 3);
        risk.observe(&pool("g5", "b"), 24 * HOUR_MS);
        assert_eq!(risk.len(), 1, "events older than five decay times are dropped");
    }

    #[test]
    fn quotes_get_the_extra_rate_and_an_empty_memory_changes_nothing() {
        let quote = Quote {
            pool: pool("g5", "a"),
            gpus: 1,
            spot_usd_per_hour: 0.4,
            on_demand_usd_per_hour: 1.0,
            interruptions_per_hour: 0.05,
        };
        let mut quotes = vec![quote.clone()];
        PoolRisk::default().adjust(&mut quotes, 0);
        assert_eq!(quotes, vec![quote.clone()]);
        let mut risk = PoolRisk::default();
        risk.observe(&pool("g5", "a"), 0);
        risk.adjust(&mut quotes, 0);
        assert_eq!(quotes[0].interruptions_per_hour, 0.05 + SAME_POOL_PER_HOUR);
    }

    proptest! {
        #[test]
        fn the_extra_rate_is_bounded_and_never_grows_with_time(
            events in prop::collection::vec((0usize..3, 0usize..3, 0u64..10 * HOUR_MS), 0..200),
            t in 0usize..3, z in 0usize..3, later in 0u64..10 * HOUR_MS,
        ) {
            let (types, zones) = (["g4dn", "g5", "g6"], ["a", "b", "c"]);
            let mut sorted = events;
            sorted.sort_by_key(|e| e.2);
            let mut risk = PoolRisk::default();
            for (ti, zi, at) in &sorted {
                risk.observe(&pool(types[*ti], zones[*zi]), *at);
            }
            prop_assert!(risk.len() <= RISK_EVENTS_MAX);
            let now = sorted.last().map_or(0, |e| e.2);
            let target = pool(types[t], zones[z]);
            let rate = risk.extra_rate(&target, now);
            prop_assert!(rate >= 0.0 && rate <= risk.len() as f64 * SAME_POOL_PER_HOUR + 1e-9);
            prop_assert!(risk.extra_rate(&target, now + later) <= rate + 1e-12);
        }
    }
}
