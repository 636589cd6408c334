use proptest::prelude::*;

use super::*;

fn pool(t: &str, z: &str) -> PoolKey {
    PoolKey { instance_type: t.into(), zone: z.into() }
}

fn quote(t: &str, z: &str, spot: f64, on_demand: f64, rate: f64) -> Quote {
    Quote {
        pool: pool(t, z),
        gpus: 1,
        spot_usd_per_hour: spot,
        on_demand_usd_per_hour: on_demand,
        interruptions_per_hour: rate,
    }
}

fn gang(job: u64, workers: u32) -> Gang {
    Gang::unconstrained(JobId(job), job, workers, 1)
}

fn held(id: &str, p: PoolKey, busy: bool, idle_since: Option<u64>) -> Held {
    Held {
        id: id.into(),
        pool: p,
        gpus: 1,
        spot: true,
        usd_per_hour: 0.5,
        busy,
        reserved_for: None,
        idle_since_ms: idle_since,
        lost: false,
        spare_of: None,
    }
}

fn launches(plan: &Plan) -> Vec<(JobId, PoolKey, bool, u32)> {
    plan.decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Launch { job, pool, spot, count, .. } => Some((*job, pool.clone(), *spot, *count)),
            Decision::Terminate { .. } => None,
        })
        .collect()
}

#[test]
fn a_gang_buys_the_cheapest_risk_adjusted_spot_pool_in_one_piece() {
    let quotes = [
        quote("g5.xlarge", "a", 0.40, 1.0, 2.0), // reclaimed twice an hour: 0.40 x (1 + 4 x 2 x 0.1) = 0.72
        quote("g4dn.xlarge", "b", 0.45, 0.9, 0.1), // 0.45 x (1 + 4 x 0.1 x 0.1) = 0.468
    ];
    let plan = plan(0, &[gang(1, 4)], &[], &quotes, &Limits::default(), &Backoff::default());
    assert_eq!(launches(&plan), [(JobId(1), pool("g4dn.xlarge", "b"), true, 4)]);
    assert!(plan.waiting[&JobId(1)].contains("buying 4 spot"), "{:?}", plan.waiting);
}

/// A job's warm spares are kept for it past the idle cooldown, and an idle instance that is
/// nobody's spare is the one given back (not the spare, which holds the job's state).
#[test]
fn the_spare_kept_is_the_one_that_is_the_jobs_spare() {
    let quotes = [quote("g5.xlarge", "a", 0.40, 1.0, 0.1)];
    let p = pool("g5.xlarge", "a");
    let idle =
        |id: &str, spare_of: Option<u64>| Held { spare_of: spare_of.map(JobId), ..held(id, p.clone(), false, Some(0)) };
    let spares = Gang { pool: Some(p.clone()), priority: i32::MIN, ..gang(2, 1) };
    let cooldown = Limits::default().idle_cooldown_ms;
    let fleet = [idle("i-1", None), idle("i-2", Some(2))];
    let kept = plan(cooldown, std::slice::from_ref(&spares), &fleet, &quotes, &Limits::default(), &Backoff::default());
    assert_eq!(kept.decisions, [Decision::Terminate { id: "i-1".into() }]);
}

#[test]
fn a_mixed_gang_counts_idle_instances_of_its_zone_and_buys_only_the_rest() {
    let quotes = [quote("g5.xlarge", "a", 0.40, 1.0, 0.1), quote("g4dn.xlarge", "a", 0.30, 0.9, 0.1)];
    let idle = |id: &str, t: &str, z: &str| held(id, pool(t, z), false, Some(0));
    let fleet = [idle("i-1", "g5.xlarge", "a"), idle("i-2", "g6.xlarge", "a"), idle("i-3", "g5.xlarge", "b")];
    let mixed = Gang { mixed: true, ..gang(1, 3) };
    let limits = Limits::default();
    let bought = plan(0, std::slice::from_ref(&mixed), &fleet[..2], &quotes, &limits, &Backoff::default());
    // Zone a's two idle instances (of two types) count; one more in a's cheapest pool.
    assert_eq!(launches(&bought), [(JobId(1), pool("g4dn.xlarge", "a"), true, 1)]);
    // Without mixed_types: one pool, so the gang buys 2 next to the idle g5 in a (its cheapest
    // way to complete one pool: 0.40 x 2 beats 0.30 x 3).
    let strict = plan(0, &[gang(1, 3)], &fleet[..2], &quotes, &limits, &Backoff::default());
    assert_eq!(launches(&strict), [(JobId(1), pool("g5.xlarge", "a"), true, 2)]);
    // Idle instances anywhere that complete the gang (zone b's one too): nothing bought, and
    // none terminated however long idle.
    let covered = plan(1_000_000_000, &[mixed], &fleet, &quotes, &limits, &Backoff::default());
    assert!(covered.decisions.is_empty(), "{covered:?}");
}

#[test]
fn a_gang_that_cannot_buy_says_whether_no_pool_fits_or_every_pool_backs_off() {
    let quotes = [quote("g5.xlarge", "a", 0.40, 1.0, 0.0)];
    let why = |gang: Gang, backoff: &Backoff| {
        let plan = plan(0, &[gang], &[], &quotes, &Limits::default(), backoff);
        assert!(launches(&plan).is_empty());
        plan.waiting[&JobId(1)].clone()
    };
    let mut both = Backoff::default();
    both.failed(&pool("g5.xlarge", "a"), true, 0);
    both.failed(&pool("g5.xlarge", "a"), false, 0);
    // Spot and on-demand both failed (a zone without a subnet, say): not "no pool fits".
    assert_eq!(why(gang(1, 2), &both), "every allowed pool is backing off after failed launches");
    let mut spot = Backoff::default();
    spot.failed(&pool("g5.xlarge", "a"), true, 0);
    let strict = Gang { on_demand_fallback: false, ..gang(1, 2) };
    assert!(why(strict, &spot).starts_with("every allowed spot pool is backing off"));
    let typed = Gang { instance_types: vec!["p4d.24xlarge".into()], ..gang(1, 2) };
    assert!(why(typed, &Backoff::default()).starts_with("no allowed pool fits"));
}

#[test]
fn spot_above_on_demand_is_passed_over_for_on_demand_or_another_pool() {
    // a's spot is the cheapest spot but above its own on-demand price; b's spot is dearer.
    let quotes = [quote("g5.xlarge", "a", 0.90, 0.80, 0.0), quote("g4dn.xlarge", "b", 0.95, 1.2, 0.0)];
    let cheapest = plan(0, &[gang(1, 2)], &[], &quotes, &Limits::default(), &Backoff::default());
    assert_eq!(launches(&cheapest), [(JobId(1), pool("g5.xlarge", "a"), false, 2)], "a's on-demand at 0.80 wins");
    // With only the overpriced spot pool, a spot job with fallback buys on-demand.
    let only = [quote("g5.xlarge", "a", 0.90, 0.80, 0.0)];
    let fallback = plan(0, &[gang(1, 2)], &[], &only, &Limits::default(), &Backoff::default());
    assert_eq!(launches(&fallback), [(JobId(1), pool("g5.xlarge", "a"), false, 2)]);
    // Without fallback it waits, and says why.
    let strict = Gang { on_demand_fallback: false, ..gang(1, 2) };
    let waits = plan(0, &[strict], &[], &only, &Limits::default(), &Backoff::default());
    assert!(launches(&waits).is_empty());
    assert!(waits.waiting.contains_key(&JobId(1)), "{:?}", waits.waiting);
}

#[test]
fn a_gang_that_must_not_run_on_spot_buys_on_demand_beside_idle_spot_instances() {
    let quotes = [quote("g5.xlarge", "a", 0.40, 1.0, 0.0)];
    let idle =
        [held("i-1", pool("g5.xlarge", "a"), false, Some(0)), held("i-2", pool("g5.xlarge", "a"), false, Some(0))];
    let on_demand = Gang { spot: false, ..gang(1, 2) };
    let plan = plan(1, &[on_demand], &idle, &quotes, &Limits::default(), &Backoff::default());
    assert_eq!(launches(&plan), [(JobId(1), pool("g5.xlarge", "a"), false, 2)]);
    let spot = plan_for(&[gang(2, 2)], &idle, &quotes);
    assert!(launches(&spot).is_empty(), "a spot gang takes the idle spot instances");
}

#[test]
fn growth_buys_spot_in_the_jobs_pool_after_every_waiting_gang() {
    let quotes = [quote("g5.xlarge", "a", 0.40, 1.0, 0.0), quote("g4dn.xlarge", "b", 0.20, 0.5, 0.0)];
    let grow = Gang::growth(JobId(1), 1, 2, 1, pool("g5.xlarge", "a"));
    let alone = plan_for(std::slice::from_ref(&grow), &[], &quotes);
    assert_eq!(launches(&alone), [(JobId(1), pool("g5.xlarge", "a"), true, 2)], "its pool, not the cheaper one");
    // A waiting gang comes first: with room for 3 instances, growth gets what is left.
    let limits = Limits { max_instances: 3, ..Limits::default() };
    let both = plan(1, &[grow.clone(), gang(2, 2)], &[], &quotes, &limits, &Backoff::default());
    assert_eq!(launches(&both), [(JobId(2), pool("g4dn.xlarge", "b"), true, 2)]);
    assert!(both.waiting[&JobId(1)].contains("limit"), "{:?}", both.waiting);
    // Never on-demand for growth: with the pool's spot priced over on-demand, nothing.
    let dear = [quote("g5.xlarge", "a", 1.10, 1.0, 0.0)];
    assert!(launches(&plan_for(&[grow], &[], &dear)).is_empty());
}

#[test]
fn a_bigger_gang_weighs_interruptions_more() {
    // One worker: the risky pool's 0.40 x (1 + 1 x 1.0 x 0.1) = 0.44 beats 0.45.
    // Four workers: 0.40 x (1 + 4 x 1.0 x 0.1) = 0.56 loses to 0.45 x (1 + 4 x 0.01 x 0.1).
    let quotes = [quote("g5.xlarge", "a", 0.40, 1.0, 1.0), quote("g4dn.xlarge", "b", 0.45, 0.9, 0.01)];
    let one = plan(0, &[gang(1, 1)], &[], &quotes, &Limits::default(), &Backoff::default());
    assert_eq!(launches(&one), [(JobId(1), pool("g5.xlarge", "a"), true, 1)]);
    let four = plan(0, &[gang(1, 4)], &[], &quotes, &Limits::default(), &Backoff::default());
    assert_eq!(launches(&four), [(JobId(1), pool("g4dn.xlarge", "b"), true, 4)]);
}

#[test]
fn a_reclaim_in_a_zone_steers_the_next_gang_out_of_that_zone() {
    use super::risk::PoolRisk;
    // Zone a is 10% cheaper; after g5.xlarge/a was reclaimed, g4dn.xlarge/a (same zone, never
    // interrupted itself) carries half its added risk and zone b wins.
    let mut quotes = vec![quote("g4dn.xlarge", "a", 0.40, 1.0, 0.02), quote("g4dn.xlarge", "b", 0.44, 1.0, 0.02)];
    let before = plan(0, &[gang(1, 4)], &[], &quotes, &Limits::default(), &Backoff::default());
    assert_eq!(launches(&before)[0].1, pool("g4dn.xlarge", "a"));
    let mut risk = PoolRisk::default();
    risk.observe(&pool("g5.xlarge", "a"), 1_000);
    risk.adjust(&mut quotes, 60_000);
    let after = plan(60_000, &[gang(1, 4)], &[], &quotes, &Limits::default(), &Backoff::default());
    assert_eq!(launches(&after)[0].1, pool("g4dn.xlarge", "b"), "{quotes:?}");
}

#[test]
fn idle_instances_count_and_the_rest_is_bought_in_their_pool() {
    let quotes = [quote("g5.xlarge", "a", 0.5, 1.0, 0.0), quote("g4dn.xlarge", "b", 0.45, 0.9, 0.0)];
    let idle =
        [held("i-1", pool("g5.xlarge", "a"), false, Some(0)), held("i-2", pool("g5.xlarge", "a"), false, Some(0))];
    let plan = plan(1, &[gang(1, 3)], &idle, &quotes, &Limits::default(), &Backoff::default());
    // 1 more g5 (0.5) is cheaper than 3 g4dn (1.35).
    assert_eq!(launches(&plan), [(JobId(1), pool("g5.xlarge", "a"), true, 1)]);
    let covered = plan_for(&[gang(1, 2)], &idle, &quotes);
    assert!(covered.decisions.is_empty(), "two idle instances cover a gang of two: {covered:?}");
}

#[test]
fn idle_instances_of_a_type_the_gang_does_not_allow_do_not_cover_it() {
    let quotes = [quote("g5.xlarge", "a", 0.5, 1.0, 0.0), quote("p4d.24xlarge", "a", 9.0, 32.0, 0.0)];
    let idle = [held("i-1", pool("g5.xlarge", "a"), false, Some(0))];
    let typed = Gang { instance_types: vec!["p4d.24xlarge".into()], ..gang(1, 1) };
    let plan = plan(1, &[typed], &idle, &quotes, &Limits::default(), &Backoff::default());
    assert_eq!(launches(&plan), [(JobId(1), pool("p4d.24xlarge", "a"), true, 1)]);
}

#[test]
fn idle_instances_above_the_gangs_price_cap_do_not_cover_it() {
    let quotes = [quote("g5.xlarge", "a", 0.5, 1.0, 0.0)];
    let dear = Held { usd_per_hour: 32.0, ..held("i-1", pool("g5.xlarge", "a"), false, Some(0)) };
    let capped = Gang { max_price_usd_per_hour: Some(1.5), ..gang(1, 1) };
    let plan = plan(1, &[capped], &[dear], &quotes, &Limits::default(), &Backoff::default());
    assert_eq!(launches(&plan), [(JobId(1), pool("g5.xlarge", "a"), true, 1)]);
}

#[test]
fn an_instance_whose_worker_was_lost_is_no_capacity_and_goes_after_the_cooldown() {
    let quotes = [quote("g5.xlarge", "a", 0.5, 1.0, 0.0)];
    let dead = Held { lost: true, ..held("i-1", pool("g5.xlarge", "a"), false, Some(0)) };
    // Counted as idle capacity, it would cover the gang and nothing would be bought.
    let plan1 = plan(1, &[gang(1, 1)], std::slice::from_ref(&dead), &quotes, &Limits::default(), &Backoff::default());
    assert_eq!(launches(&plan1), [(JobId(1), pool("g5.xlarge", "a"), true, 1)]);
    let cooldown = Limits::default().idle_cooldown_ms;
    let later = plan(cooldown, &[], std::slice::from_ref(&dead), &quotes, &Limits::default(), &Backoff::default());
    assert_eq!(later.decisions, [Decision::Terminate { id: "i-1".into() }]);
}

fn plan_for(gangs: &[Gang], held: &[Held], quotes: &[Quote]) -> Plan {
    plan(1, gangs, held, quotes, &Limits::default(), &Backoff::default())
}

#[test]
fn on_demand_only_after_spot_capacity_errors_and_only_with_fallback() {
    let quotes = [quote("g5.xlarge", "a", 0.5, 1.0, 0.0)];
    let mut backoff = Backoff::default();
    backoff.failed(&pool("g5.xlarge", "a"), true, 1000);
    let plan1 = plan(1000, &[gang(1, 2)], &[], &quotes, &Limits::default(), &backoff);
    assert_eq!(launches(&plan1), [(JobId(1), pool("g5.xlarge", "a"), false, 2)]);
    let mut strict = gang(1, 2);
    strict.on_demand_fallback = false;
    let plan2 = plan(1000, &[strict], &[], &quotes, &Limits::default(), &backoff);
    assert!(plan2.decisions.is_empty());
    assert!(plan2.waiting[&JobId(1)].contains("backing off"), "{:?}", plan2.waiting);
    // The back-off expires, doubles on the next failure, and is capped.
    assert!(!backoff.is_blocked(&pool("g5.xlarge", "a"), true, 1000 + BACKOFF_FIRST_MS));
    backoff.failed(&pool("g5.xlarge", "a"), true, 100_000);
    assert!(backoff.is_blocked(&pool("g5.xlarge", "a"), true, 100_000 + 2 * BACKOFF_FIRST_MS - 1));
    for _ in 0..40 {
        backoff.failed(&pool("g5.xlarge", "a"), true, 0);
    }
    assert!(!backoff.is_blocked(&pool("g5.xlarge", "a"), true, BACKOFF_MAX_MS));
}

#[test]
fn caps_types_prices_and_budgets_are_respected_with_a_reason() {
    let quotes = [quote("g5.xlarge", "a", 0.5, 1.0, 0.0), quote("p3.2xlarge", "a", 0.9, 3.0, 0.0)];
    let mut typed = gang(1, 2);
    typed.instance_types = vec!["p3.2xlarge".into()];
    assert_eq!(launches(&plan_for(&[typed.clone()], &[], &quotes)), [(JobId(1), pool("p3.2xlarge", "a"), true, 2)]);
    typed.max_price_usd_per_hour = Some(0.6);
    let capped = plan_for(&[typed], &[], &quotes);
    assert!(capped.decisions.is_empty() && capped.waiting[&JobId(1)].contains("no allowed pool"), "{capped:?}");
    let mut broke = gang(2, 1);
    broke.budget_left_usd = Some(0.0);
    assert!(plan_for(&[broke], &[], &quotes).waiting[&JobId(2)].contains("budget"));
    let limits = Limits { max_usd_per_hour: 0.9, ..Limits::default() };
    let over = plan(0, &[gang(3, 2)], &[], &quotes, &limits, &Backoff::default());
    assert!(over.decisions.is_empty() && over.waiting[&JobId(3)].contains("0.90 $/h"), "{over:?}");
}

#[test]
fn gangs_spread_over_pools_when_prices_are_close() {
    let quotes = [quote("g5.xlarge", "a", 0.50, 1.0, 0.0), quote("g5.xlarge", "b", 0.51, 1.0, 0.0)];
    let plan = plan_for(&[gang(1, 4), gang(2, 4)], &[], &quotes);
    let pools: Vec<String> = launches(&plan).iter().map(|l| l.1.zone.clone()).collect();
    assert_eq!(pools, ["a", "b"], "the second gang goes to the other zone: {plan:?}");
}

#[test]
fn idle_instances_go_after_the_cooldown_and_the_fleet_reaches_zero() {
    let limits = Limits::default();
    let fleet = [
        held("i-1", pool("g5.xlarge", "a"), false, Some(0)),
        held("i-2", pool("g5.xlarge", "a"), false, Some(limits.idle_cooldown_ms)),
        held("i-3", pool("g5.xlarge", "a"), true, None),
    ];
    let early = plan(limits.idle_cooldown_ms, &[], &fleet, &[], &limits, &Backoff::default());
    assert_eq!(early.decisions, [Decision::Terminate { id: "i-1".into() }]);
    let later = plan(2 * limits.idle_cooldown_ms, &[], &fleet[..2], &[], &limits, &Backoff::default());
    assert_eq!(later.decisions.len(), 2, "no work: every idle instance goes");
}

fn arb_world() -> impl Strategy<Value = (Vec<Gang>, Vec<Held>, Vec<Quote>, Limits, u64)> {
    let gangs =
        prop::collection::vec((1u32..6, any::<bool>(), any::<bool>(), prop::option::of(0.0f64..5.0), -1i32..2), 0..6);
    let fleet =
        prop::collection::vec((0usize..3, any::<bool>(), prop::option::of(0u64..1_000_000), 0.1f64..2.0), 0..10);
    let quotes = prop::collection::vec((0.05f64..3.0, 0.5f64..6.0, 0.0f64..3.0), 1..4);
    let limits = (1u32..24, 0.5f64..30.0, 0u64..600_000);
    (gangs, fleet, quotes, limits, 0u64..2_000_000).prop_map(|(gangs, fleet, quotes, (max_i, max_usd, cool), now)| {
        let zones = ["a", "b", "c"];
        let quotes: Vec<Quote> =
            quotes.into_iter().enumerate().map(|(i, (s, o, r))| quote("g5.xlarge", zones[i % 3], s, o, r)).collect();
        let gangs = gangs
            .into_iter()
            .enumerate()
            .map(|(i, (w, spot, fallback, budget, prio))| Gang {
                mixed: i % 2 == 1,
                spot,
                on_demand_fallback: fallback,
                budget_left_usd: budget,
                priority: prio,
                ..gang(i as u64 + 1, w)
            })
            .collect();
        let fleet = fleet
            .into_iter()
            .enumerate()
            .map(|(i, (z, busy, idle, usd))| Held {
                usd_per_hour: usd,
                ..held(&format!("i-{i}"), pool("g5.xlarge", zones[z]), busy, if busy { None } else { idle })
            })
            .collect();
        let limits =
            Limits { max_instances: max_i, max_usd_per_hour: max_usd, idle_cooldown_ms: cool, ..Limits::default() };
        (gangs, fleet, quotes, limits, now)
    })
}

proptest! {
    #[test]
    fn never_past_the_instance_or_budget_caps((gangs, held, quotes, limits, now) in arb_world()) {
        let plan = plan(now, &gangs, &held, &quotes, &limits, &Backoff::default());
        let held_count = held.len() as u64;
        let held_usd: f64 = held.iter().map(|h| h.usd_per_hour).sum();
        let (mut n, mut usd) = (0u64, 0.0f64);
        for d in &plan.decisions {
            if let Decision::Launch { count, usd_per_hour, job, .. } = d {
                n += u64::from(*count);
                usd += usd_per_hour * f64::from(*count);
                let g = gangs.iter().find(|g| g.job == *job).expect("a launch is for a waiting gang");
                prop_assert!(g.budget_left_usd.is_none_or(|b| b > 0.0), "a spent budget buys nothing");
            }
        }
        // Launches never take the fleet past a cap (a fleet already past one only shrinks).
        prop_assert!(n == 0 || held_count + n <= u64::from(limits.max_instances));
        prop_assert!(n == 0 || held_usd + usd <= limits.max_usd_per_hour + 1e-9);
    }

    #[test]
    fn with_no_work_every_instance_idle_past_the_cooldown_goes((_, held, quotes, limits, now) in arb_world()) {
        let plan = plan(now, &[], &held, &quotes, &limits, &Backoff::default());
        let gone: BTreeSet<&str> = plan.decisions.iter().filter_map(|d| match d {
            Decision::Terminate { id } => Some(id.as_str()),
            Decision::Launch { .. } => None,
        }).collect();
        prop_assert_eq!(plan.decisions.len(), gone.len(), "terminations only, each once");
        for h in &held {
            let expired = !h.busy && h.idle_since_ms.is_some_and(|s| now.saturating_sub(s) >= limits.idle_cooldown_ms);
            prop_assert_eq!(gone.contains(h.id.as_str()), expired, "{:?}", h);
        }
    }

    #[test]
    fn never_buys_spot_at_or_above_on_demand((gangs, held, quotes, limits, now) in arb_world()) {
        let plan = plan(now, &gangs, &held, &quotes, &limits, &Backoff::default());
        for d in &plan.decisions {
            if let Decision::Launch { pool, spot: true, usd_per_hour, .. } = d {
                let q = quotes.iter().find(|q| q.pool == *pool).expect("a launch is in a quoted pool");
                prop_assert!(*usd_per_hour < q.on_demand_usd_per_hour, "spot {} >= on-demand {}", usd_per_hour, q.on_demand_usd_per_hour);
            }
        }
    }

    #[test]
    fn plans_are_deterministic((gangs, held, quotes, limits, now) in arb_world()) {
        let a = plan(now, &gangs, &held, &quotes, &limits, &Backoff::default());
        let b = plan(now, &gangs, &held, &quotes, &limits, &Backoff::default());
        prop_assert_eq!(a, b);
    }
}
