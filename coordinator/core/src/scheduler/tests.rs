use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;

fn job(id: u64, priority: i32, min: u32, max: u32, gpus: u32) -> PendingJob {
    PendingJob {
        id: JobId(id),
        priority,
        submitted_index: id,
        min_workers: min,
        max_workers: max,
        gpus_per_worker: gpus,
        on_demand_only: false,
        mixed: false,
        instance_types: Vec::new(),
        max_usd_per_hour: None,
        holders: Vec::new(),
    }
}

fn worker(id: u64, gpus: u32, pool: &str) -> FreeWorker {
    FreeWorker {
        id: WorkerId(id),
        gpus,
        instance_type: pool.to_string(),
        zone: "z".to_string(),
        spot: false,
        usd_per_hour: 0.0,
        only_for: None,
        spare: false,
    }
}

/// A running job of generation 1 at `world` workers of `max`, in `pool` (zone "z"), that may
/// grow: spot allowed, no GPUs, no price cap.
fn growing(id: u64, world: u32, max: u32, pool: &str) -> RunningJob {
    RunningJob {
        id: JobId(id),
        generation: 1,
        priority: 0,
        submitted_index: id,
        world,
        max_workers: max,
        gpus_per_worker: 0,
        pool: (pool.to_string(), "z".to_string()),
        on_demand_only: false,
        max_usd_per_hour: None,
    }
}

fn in_zone(id: u64, pool: &str, zone: &str) -> FreeWorker {
    FreeWorker { zone: zone.to_string(), ..worker(id, 0, pool) }
}

#[test]
fn a_mixed_gang_prefers_one_pool_then_one_zone_then_spans_zones() {
    let mixed = |min: u32, max: u32| PendingJob { mixed: true, ..job(1, 0, min, max, 0) };
    let free = [
        in_zone(1, "g5", "a"),
        in_zone(2, "g5", "a"),
        in_zone(3, "g4dn", "a"),
        in_zone(4, "g5", "b"),
        in_zone(5, "g5", "b"),
        in_zone(6, "g6", "b"),
        in_zone(7, "g6", "b"),
    ];
    let ids = |plan: &Plan| plan.placements.iter().map(|p| p.workers.clone()).collect::<Vec<_>>();
    let w = |ids: &[u64]| ids.iter().map(|i| WorkerId(*i)).collect::<Vec<_>>();
    // Two fit in one pool: one pool, as without mixed_types.
    assert_eq!(ids(&schedule(&[mixed(2, 2)], &free)), [w(&[1, 2])]);
    // Three: zone a holds 3 (g5 x2 + g4dn), zone b 4; the larger zone, its largest pools first.
    assert_eq!(ids(&schedule(&[mixed(3, 3)], &free)), [w(&[4, 5, 6])]);
    // Five: no zone holds five; across zones, largest pools first.
    assert_eq!(ids(&schedule(&[mixed(5, 5)], &free)), [w(&[1, 2, 4, 5, 6])]);
    // Up to max from what fits; and not more than there is.
    assert_eq!(ids(&schedule(&[mixed(3, 9)], &free)), [w(&[4, 5, 6, 7])]);
    let plan = schedule(&[mixed(8, 8)], &free);
    assert!(plan.waiting[&JobId(1)].contains("7 fit"), "{:?}", plan.waiting);
    // Without mixed_types the same job waits for one pool.
    assert!(schedule(&[job(1, 0, 3, 3, 0)], &free).placements.is_empty());
}

/// A running job's warm spare is taken after the pool's other fitting workers (so it stays that
/// job's spare), and still taken when the gang needs it.
#[test]
fn other_jobs_warm_spares_are_taken_last() {
    let w = |ids: &[u64]| ids.iter().map(|i| WorkerId(*i)).collect::<Vec<_>>();
    let spare = FreeWorker { spare: true, ..worker(1, 0, "a") };
    let free = [spare.clone(), worker(2, 0, "a"), worker(3, 0, "a")];
    let plan = schedule(&[job(1, 0, 1, 1, 0)], &free);
    assert_eq!(plan.placements, [Placement { job: JobId(1), workers: w(&[2]) }]);
    let plan = schedule(&[job(1, 0, 2, 3, 0)], &free);
    assert_eq!(plan.placements, [Placement { job: JobId(1), workers: w(&[1, 2, 3]) }], "needed: taken");
    // The best fit (fewest GPUs) still comes first: a spare without GPUs before a GPU worker.
    let gpu = worker(4, 1, "a");
    let plan = schedule(&[job(1, 0, 1, 1, 0)], &[spare, gpu]);
    assert_eq!(plan.placements, [Placement { job: JobId(1), workers: w(&[1]) }]);
}

/// A noticed holder of a waiting job's state (free for that job alone) goes to that job first,
/// and to nobody else: not to a job ahead of it in the queue, not to growth.
#[test]
fn a_worker_free_for_one_job_alone_goes_to_that_job_first_and_to_no_other() {
    let w = |ids: &[u64]| ids.iter().map(|i| WorkerId(*i)).collect::<Vec<_>>();
    let noticed = FreeWorker { spot: true, only_for: Some(JobId(2)), ..worker(5, 0, "a") };
    let free = [worker(1, 0, "a"), worker(2, 0, "a"), noticed.clone()];
    let regroup = PendingJob { holders: w(&[5, 6]), ..job(2, 0, 2, 2, 0) };
    // Job 1 (higher priority) takes two of the others; job 2 the noticed one and none left.
    let urgent = job(1, 5, 2, 2, 0);
    let plan = schedule(&[urgent, regroup.clone()], &free);
    assert_eq!(plan.placements, [Placement { job: JobId(1), workers: w(&[1, 2]) }], "{:?}", plan.waiting);
    assert!(plan.waiting.contains_key(&JobId(2)));
    // Alone it counts toward job 2's gang, first.
    let plan = schedule(std::slice::from_ref(&regroup), &free);
    assert_eq!(plan.placements, [Placement { job: JobId(2), workers: w(&[1, 5]) }]);
    // Not for a job that needs more than it and the other free one: job 1 waits.
    let plan = schedule(&[job(1, 5, 3, 3, 0)], &free);
    assert!(plan.placements.is_empty() && plan.waiting[&JobId(1)].contains("has 2"), "{:?}", plan.waiting);
    // Nor on-demand only (it is on spot), nor growth.
    let on_demand = PendingJob { on_demand_only: true, ..job(2, 0, 1, 1, 0) };
    assert_eq!(schedule(&[on_demand], &free).placements[0].workers, w(&[1]));
    assert!(grow(&[growing(3, 1, 2, "a")], &[noticed], false).is_empty());
}

#[test]
fn a_regroup_takes_its_previous_members_first_and_stays_in_their_pool() {
    let w = |ids: &[u64]| ids.iter().map(|i| WorkerId(*i)).collect::<Vec<_>>();
    let regroup = |min: u32, max: u32, holders: &[u64]| PendingJob { holders: w(holders), ..job(1, 0, min, max, 0) };
    // A survivor (worker 5) of a gang of 5 and 6 (6 is gone) and idle workers with lower ids:
    // the survivor first, then the lowest id (was: workers 1 and 2, and the state from the store).
    let free = [worker(1, 0, "a"), worker(2, 0, "a"), worker(3, 0, "a"), worker(5, 0, "a")];
    let plan = schedule(&[regroup(2, 2, &[5, 6])], &free);
    assert_eq!(plan.placements, [Placement { job: JobId(1), workers: w(&[1, 5]) }]);
    // Every survivor, up to max.
    let plan = schedule(&[regroup(2, 2, &[3, 5])], &free);
    assert_eq!(plan.placements, [Placement { job: JobId(1), workers: w(&[3, 5]) }]);
    // A holder that does not fit (too few GPUs) is not taken.
    let gpu_job = PendingJob { holders: w(&[5]), ..job(1, 0, 1, 1, 1) };
    let plan = schedule(&[gpu_job], &[worker(4, 1, "a"), worker(5, 0, "a")]);
    assert_eq!(plan.placements, [Placement { job: JobId(1), workers: w(&[4]) }]);
    // Pools: the holders' pool when it gives as many workers as the largest; not when it gives
    // fewer (a larger world comes first).
    let free = [worker(1, 0, "a"), worker(2, 0, "a"), worker(3, 0, "a"), worker(7, 0, "b"), worker(8, 0, "b")];
    assert_eq!(schedule(&[regroup(2, 2, &[7])], &free).placements[0].workers, w(&[7, 8]));
    assert_eq!(schedule(&[regroup(2, 2, &[])], &free).placements[0].workers, w(&[1, 2]));
    assert_eq!(schedule(&[regroup(2, 3, &[7])], &free).placements[0].workers, w(&[1, 2, 3]));
    // An on-demand-only job never takes a spot holder.
    let free = [worker(1, 0, "a"), spot_worker(5, 0, "a")];
    let on_demand = PendingJob { on_demand_only: true, ..regroup(1, 1, &[5]) };
    assert_eq!(schedule(&[on_demand], &free).placements[0].workers, w(&[1]));
    // A mixed gang takes the holders first in each pool it uses (here 4, not 3, of g4dn).
    let mixed = PendingJob { mixed: true, ..regroup(4, 4, &[4]) };
    let free = [in_zone(1, "g5", "a"), in_zone(2, "g5", "a"), in_zone(9, "g5", "a")];
    let free = [&free[..], &[in_zone(3, "g4dn", "a"), in_zone(4, "g4dn", "a")]].concat();
    assert_eq!(schedule(&[mixed], &free).placements[0].workers, w(&[1, 2, 4, 9]));
}

fn spot_worker(id: u64, gpus: u32, pool: &str) -> FreeWorker {
    FreeWorker { spot: true, ..worker(id, gpus, pool) }
}

#[test]
fn on_demand_only_jobs_get_on_demand_workers_and_others_take_spot_first() {
    let free = [spot_worker(1, 0, "a"), spot_worker(2, 0, "a"), worker(3, 0, "a"), worker(4, 0, "b")];
    let on_demand = PendingJob { on_demand_only: true, ..job(1, 0, 2, 2, 0) };
    let plan = schedule(std::slice::from_ref(&on_demand), &free);
    assert!(plan.placements.is_empty(), "pool a has one on-demand worker, b one: {plan:?}");
    assert!(plan.waiting[&JobId(1)].contains("2 free on-demand worker(s)"), "{:?}", plan.waiting);
    let one = PendingJob { min_workers: 1, max_workers: 1, ..on_demand };
    let plan = schedule(&[job(2, 5, 2, 2, 0), one], &free);
    // The spot-tolerant job (first by priority) takes a's spot workers, leaving its on-demand one.
    assert_eq!(
        plan.placements,
        [
            Placement { job: JobId(2), workers: vec![WorkerId(1), WorkerId(2)] },
            Placement { job: JobId(1), workers: vec![WorkerId(3)] },
        ]
    );
    // Growth: an on-demand-only job never grows onto spot workers.
    let running = RunningJob { on_demand_only: true, ..growing(1, 1, 2, "a") };
    assert!(grow(std::slice::from_ref(&running), &free[..2], false).is_empty());
    assert_eq!(grow(&[running], &free[..3], false), [(JobId(1), 1)]);
}

#[test]
fn a_gang_starts_only_with_min_workers_together() {
    let free: Vec<_> = (1..=3).map(|i| worker(i, 0, "local")).collect();
    let plan = schedule(&[job(1, 0, 4, 4, 0)], &free);
    assert!(plan.placements.is_empty());
    assert!(plan.waiting[&JobId(1)].contains("waiting for 4 free worker(s)"), "{:?}", plan.waiting);
    assert!(plan.waiting[&JobId(1)].contains("has 3"), "{:?}", plan.waiting);
    let plan = schedule(&[job(1, 0, 2, 3, 0)], &free);
    assert_eq!(plan.placements, [Placement { job: JobId(1), workers: vec![WorkerId(1), WorkerId(2), WorkerId(3)] }]);
}

#[test]
fn priority_then_fifo_then_backfill() {
    let free: Vec<_> = (1..=4).map(|i| worker(i, 0, "local")).collect();
    let jobs = [job(1, 0, 2, 2, 0), job(2, 5, 3, 3, 0), job(3, 0, 8, 8, 0), job(4, 0, 1, 1, 0)];
    let plan = schedule(&jobs, &free);
    let placed: Vec<JobId> = plan.placements.iter().map(|p| p.job).collect();
    // Job 2 (priority 5) first; job 1 needs 2 but only 1 is left; job 3 can never fit; job 4 backfills.
    assert_eq!(placed, [JobId(2), JobId(4)]);
    assert_eq!(plan.waiting.keys().copied().collect::<Vec<_>>(), [JobId(1), JobId(3)]);
}

#[test]
fn gpu_jobs_get_gpu_workers_from_one_pool() {
    let free =
        vec![worker(1, 0, "cpu"), worker(2, 1, "g5"), worker(3, 1, "g4dn"), worker(4, 1, "g5"), worker(5, 4, "g5")];
    let plan = schedule(&[job(1, 0, 2, 2, 1)], &free);
    // g5 has three fitting workers; the least-equipped two are taken (the 4-GPU one is kept).
    assert_eq!(plan.placements, [Placement { job: JobId(1), workers: vec![WorkerId(2), WorkerId(4)] }]);
    let plan = schedule(&[job(1, 0, 2, 2, 2)], &free);
    assert!(plan.waiting[&JobId(1)].contains(">= 2 GPU(s)"), "{:?}", plan.waiting);
}

#[test]
fn a_job_runs_only_on_the_instance_types_it_allows_or_on_local_workers() {
    let typed = PendingJob { instance_types: vec!["p4d.24xlarge".into()], ..job(1, 0, 2, 2, 1) };
    // Idle T4s bought for another job: not for a job that asked for A100s.
    let t4s = [worker(1, 1, "g4dn.xlarge"), worker(2, 1, "g4dn.xlarge")];
    let plan = schedule(std::slice::from_ref(&typed), &t4s);
    assert!(plan.placements.is_empty(), "{plan:?}");
    assert!(plan.waiting[&JobId(1)].contains("of type p4d.24xlarge"), "{:?}", plan.waiting);
    let a100s = [worker(3, 1, "p4d.24xlarge"), worker(4, 1, "p4d.24xlarge")];
    let plan = schedule(std::slice::from_ref(&typed), &[t4s.as_slice(), a100s.as_slice()].concat());
    assert_eq!(plan.placements, [Placement { job: JobId(1), workers: vec![WorkerId(3), WorkerId(4)] }]);
    // Workers that know no type (a local cluster) take a spec written for the cloud.
    let local = [worker(5, 1, "local"), worker(6, 1, "local")];
    assert_eq!(schedule(std::slice::from_ref(&typed), &local).placements.len(), 1);
    // A mixed gang also keeps to its types.
    let mixed = PendingJob { mixed: true, ..typed };
    assert!(schedule(&[mixed], &[worker(1, 1, "g4dn.xlarge"), worker(3, 1, "p4d.24xlarge")]).placements.is_empty());
}

#[test]
fn a_job_runs_only_on_instances_within_its_price_cap() {
    let capped = PendingJob { max_usd_per_hour: Some(1.5), ..job(1, 0, 2, 2, 0) };
    // Idle on-demand instances at 32 $/h, bought for another job: not for a job capped at 1.5.
    let dear = [
        FreeWorker { usd_per_hour: 32.0, ..worker(1, 0, "p") },
        FreeWorker { usd_per_hour: 32.0, ..worker(2, 0, "p") },
    ];
    let plan = schedule(std::slice::from_ref(&capped), &dear);
    assert!(plan.placements.is_empty() && plan.waiting[&JobId(1)].contains("at most 1.5 $/h"), "{plan:?}");
    let cheap =
        [FreeWorker { usd_per_hour: 0.4, ..worker(3, 0, "p") }, FreeWorker { usd_per_hour: 1.5, ..worker(4, 0, "p") }];
    let plan = schedule(std::slice::from_ref(&capped), &[dear.as_slice(), cheap.as_slice()].concat());
    assert_eq!(plan.placements, [Placement { job: JobId(1), workers: vec![WorkerId(3), WorkerId(4)] }]);
    // Growth keeps to the cap too.
    let running = RunningJob { max_usd_per_hour: Some(1.5), ..growing(1, 1, 2, "p") };
    assert!(grow(std::slice::from_ref(&running), &dear, false).is_empty());
    assert_eq!(grow(&[running], &cheap, false), [(JobId(1), 1)]);
}

#[test]
fn nothing_to_place_on_an_empty_cluster() {
    let plan = schedule(&[job(1, 0, 1, 1, 0)], &[]);
    assert!(plan.waiting[&JobId(1)].contains("has 0 (none)"));
    assert_eq!(schedule(&[], &[worker(1, 0, "x")]), Plan::default());
}

fn arb_state() -> impl Strategy<Value = (Vec<PendingJob>, Vec<FreeWorker>)> {
    let holders = prop::collection::vec(1u64..41, 0..3);
    let types = prop::sample::subsequence(vec!["a", "b", "c", "local"], 0..=2);
    let caps = prop::option::of(0u32..4);
    let jobs = prop::collection::vec(
        (0u64..50, -2i32..3, 1u32..5, 0u32..4, 0u32..3, any::<bool>(), any::<bool>(), holders, types, caps),
        0..30,
    );
    let workers = prop::collection::vec((any::<bool>(), 0u32..4, 0usize..4, 0u32..4), 0..40);
    (jobs, workers).prop_map(|(jobs, workers)| {
        let pools = ["a", "b", "c", "local"];
        let jobs = jobs
            .into_iter()
            .enumerate()
            .map(|(i, (index, priority, min, extra, gpus, on_demand_only, mixed, holders, types, cap))| PendingJob {
                id: JobId(i as u64 + 1),
                priority,
                submitted_index: index,
                min_workers: min,
                max_workers: min + extra,
                gpus_per_worker: gpus,
                on_demand_only,
                mixed,
                instance_types: types.into_iter().map(str::to_string).collect(),
                max_usd_per_hour: cap.map(f64::from),
                holders: holders.into_iter().map(WorkerId).collect(),
            })
            .collect();
        // Worker ids are unique in a real cluster.
        let workers = workers
            .into_iter()
            .enumerate()
            .map(|(i, (spot, gpus, pool, usd))| FreeWorker {
                spot,
                usd_per_hour: f64::from(usd),
                ..worker(i as u64 + 1, gpus, pools[pool])
            })
            .collect();
        (jobs, workers)
    })
}

proptest! {
    /// Over random clusters: no worker is used twice, every gang fits its spec and one pool, and
    /// a job waits only when no pool could hold its gang at its turn.
    #[test]
    fn placements_are_valid_and_complete((jobs, workers) in arb_state()) {
        let plan = schedule(&jobs, &workers);
        let mut used = BTreeSet::new();
        for placement in &plan.placements {
            let job = jobs.iter().find(|j| j.id == placement.job).expect("placed jobs exist");
            let n = placement.workers.len() as u32;
            prop_assert!(n >= job.min_workers && n <= job.max_workers.max(job.min_workers), "{job:?} got {n}");
            let mut pools = BTreeSet::new();
            for id in &placement.workers {
                prop_assert!(used.insert(*id), "{id} placed twice");
                let w = workers.iter().find(|w| w.id == *id).expect("placed workers exist");
                prop_assert!(w.gpus >= job.gpus_per_worker);
                prop_assert!(!(job.on_demand_only && w.spot), "{job:?} got spot {id}");
                prop_assert!(crate::spec::instance_type_allowed(&job.instance_types, &w.instance_type), "{job:?} got {w:?}");
                prop_assert!(job.max_usd_per_hour.is_none_or(|cap| w.usd_per_hour <= cap), "{job:?} got {w:?}");
                pools.insert((&w.instance_type, &w.zone));
            }
            if !job.mixed {
                prop_assert_eq!(pools.len(), 1, "a gang spans pools");
            }
        }
        prop_assert_eq!(plan.placements.len() + plan.waiting.len(), jobs.len());
        // Replaying in the scheduler's order, a waiting job had no pool with `min` fitting free workers.
        let mut order: Vec<&PendingJob> = jobs.iter().collect();
        order.sort_by_key(|j| (std::cmp::Reverse(j.priority), j.submitted_index, j.id));
        let mut taken: BTreeSet<WorkerId> = BTreeSet::new();
        for job in order {
            match plan.placements.iter().find(|p| p.job == job.id) {
                Some(p) => taken.extend(p.workers.iter().copied()),
                None => {
                    let mut per_pool: BTreeMap<(&str, &str), BTreeSet<WorkerId>> = BTreeMap::new();
                    let fits = |w: &&FreeWorker| {
                        !taken.contains(&w.id)
                            && w.gpus >= job.gpus_per_worker
                            && !(job.on_demand_only && w.spot)
                            && crate::spec::instance_type_allowed(&job.instance_types, &w.instance_type)
                            && job.max_usd_per_hour.is_none_or(|cap| w.usd_per_hour <= cap)
                    };
                    for w in workers.iter().filter(fits) {
                        per_pool.entry((&w.instance_type, &w.zone)).or_default().insert(w.id);
                    }
                    let largest = per_pool.values().map(BTreeSet::len).max().unwrap_or(0);
                    prop_assert!(largest < job.min_workers as usize, "{job:?} waits though a pool had {largest}");
                    let total: usize = per_pool.values().map(BTreeSet::len).sum();
                    prop_assert!(!job.mixed || total < job.min_workers as usize, "{job:?} waits though {total} fit");
                }
            }
        }
    }

    /// The same input gives the same plan (every coordinator computes the same thing).
    #[test]
    fn deterministic((jobs, workers) in arb_state()) {
        prop_assert_eq!(schedule(&jobs, &workers), schedule(&jobs, &workers));
    }

    /// Over random clusters with some workers busy in running jobs: placements use free
    /// workers only, once; each order stops a job of lower priority than the unplaced job it
    /// is for, one not stopping already, once; and never in vain: the free workers and the
    /// stopped jobs' members that fit the waiting job are at least its gang.
    #[test]
    fn preemptions_stop_only_lower_priorities_once_for_unplaced_jobs(
        (jobs, workers) in arb_state(),
        running in prop::collection::vec((-3i32..3, any::<bool>(), 0usize..4), 0..6),
    ) {
        // Workers go round-robin to the running jobs; a job-less rest stays free.
        let mut running: Vec<Preemptible> = running
            .into_iter()
            .enumerate()
            .map(|(i, (priority, stopping, _))| Preemptible {
                id: JobId(100 + i as u64),
                generation: 1,
                priority,
                submitted_index: 100 + i as u64,
                stopping,
                members: Vec::new(),
                inference: false,
            })
            .collect();
        let mut free = Vec::new();
        for (i, w) in workers.iter().enumerate() {
            match running.len() {
                0 => free.push(w.clone()),
                n if i % (n + 1) == n => free.push(w.clone()),
                n => running[i % (n + 1)].members.push(w.clone()),
            }
        }
        let plan = schedule_preempting(&jobs, &free, &running);
        let mut used = BTreeSet::new();
        for placement in &plan.placements {
            for id in &placement.workers {
                prop_assert!(used.insert(*id), "{id} placed twice");
                prop_assert!(free.iter().any(|w| w.id == *id), "{id} is busy");
            }
        }
        let mut victims = BTreeSet::new();
        for order in &plan.preemptions {
            let job = jobs.iter().find(|j| j.id == order.for_job).expect("for a pending job");
            let victim = running.iter().find(|r| r.id == order.victim).expect("a running job");
            prop_assert!(victim.priority < job.priority, "{order:?}");
            prop_assert!(!victim.stopping, "{order:?}");
            prop_assert!(victims.insert(victim.id), "{order:?} twice");
            prop_assert!(plan.placements.iter().all(|p| p.job != job.id), "{order:?} for a placed job");
            prop_assert_eq!(order.priorities, (job.priority, victim.priority));
        }
        for job in jobs.iter().filter(|j| plan.preemptions.iter().any(|p| p.for_job == j.id)) {
            let fits = |w: &&FreeWorker| {
                w.gpus >= job.gpus_per_worker
                    && !(job.on_demand_only && w.spot)
                    && crate::spec::instance_type_allowed(&job.instance_types, &w.instance_type)
                    && job.max_usd_per_hour.is_none_or(|cap| w.usd_per_hour <= cap)
            };
            let stopped = running.iter().filter(|r| r.stopping || plan.preemptions.iter().any(|p| p.victim == r.id && p.for_job == job.id));
            let mut supply: Vec<&FreeWorker> = free.iter().filter(fits).collect();
            supply.extend(stopped.flat_map(|r| r.members.iter()).filter(fits));
            prop_assert!(supply.len() >= job.min_workers as usize, "{job:?} stopped jobs in vain: {plan:?}");
        }
        prop_assert_eq!(&plan, &schedule_preempting(&jobs, &free, &running));
    }
}

#[test]
fn elastic_jobs_grow_only_into_free_workers_of_their_pool_when_nobody_waits() {
    let running = |id: u64, world, max, pool: &str| RunningJob { generation: 3, ..growing(id, world, max, pool) };
    let free = [worker(7, 0, "a")];
    let jobs = [running(1, 2, 2, "a"), running(2, 1, 4, "b"), running(3, 1, 2, "a"), running(4, 1, 2, "a")];
    assert_eq!(grow(&jobs, &free, false), [(JobId(3), 3)], "full, wrong pool, and the one free worker promised once");
    assert!(grow(&jobs, &free, true).is_empty(), "waiting jobs come first");
    assert!(grow(&jobs, &[], false).is_empty());
}

/// A running job of generation 1 in pool `pool` (zone "z") on workers `ids` (no GPUs).
fn victim(id: u64, priority: i32, pool: &str, ids: &[u64]) -> Preemptible {
    Preemptible {
        id: JobId(id),
        generation: 1,
        priority,
        submitted_index: id,
        stopping: false,
        members: ids.iter().map(|w| worker(*w, 0, pool)).collect(),
        inference: false,
    }
}

fn stopped(plan: &Plan) -> Vec<(u64, u64)> {
    plan.preemptions.iter().map(|p| (p.victim.0, p.for_job.0)).collect()
}

#[test]
fn a_waiting_job_stops_only_jobs_of_lower_priority_and_the_fewest_of_them() {
    let high = job(9, 10, 2, 2, 0);
    // One free worker in pool a; job 1 (priority 0) holds two in a, jobs 2 and 3 (priority -5,
    // -1) one each in a, job 4 (priority 10, as high as the waiter) two in a.
    let free = [worker(1, 0, "a")];
    let running =
        [victim(1, 0, "a", &[2, 3]), victim(2, -5, "a", &[4]), victim(3, -1, "a", &[5]), victim(4, 10, "a", &[6, 7])];
    let plan = schedule_preempting(std::slice::from_ref(&high), &free, &running);
    assert!(plan.placements.is_empty());
    // One stop does: the lowest priority that makes the gang with the free worker.
    assert_eq!(stopped(&plan), [(2, 9)]);
    assert_eq!(plan.preemptions[0].priorities, (10, -5));
    assert!(plan.waiting[&JobId(9)].contains("stopping job-2 (priority -5) at a checkpoint"), "{:?}", plan.waiting);
    // Three workers needed: job 2 alone is not enough; the lowest priorities go first (jobs 2
    // and 3, not job 1's two at priority 0); never job 4 (not lower).
    let plan = schedule_preempting(&[job(9, 10, 3, 3, 0)], &free, &running);
    assert_eq!(stopped(&plan), [(2, 9), (3, 9)]);
    // A stop made unneeded by a later one is spared: with no free worker, job 2's one worker
    // and then job 1's two make three, but job 1's alone make the gang of two.
    let plan = schedule_preempting(&[job(9, 10, 2, 2, 0)], &[], &[running[0].clone(), running[1].clone()]);
    assert_eq!(stopped(&plan), [(1, 9)]);
    // Five: 1 free + jobs 2, 3 and 1 (three stops); seven would need job 4: nothing is stopped.
    let plan = schedule_preempting(&[job(9, 10, 5, 5, 0)], &free, &running);
    assert_eq!(stopped(&plan), [(2, 9), (3, 9), (1, 9)]);
    let plan = schedule_preempting(&[job(9, 10, 6, 6, 0)], &free, &running);
    assert!(plan.preemptions.is_empty(), "{plan:?}");
    assert!(!plan.waiting[&JobId(9)].contains("stopping"), "{:?}", plan.waiting);
    // Equal priorities never stop each other.
    assert!(schedule_preempting(&[job(9, 0, 3, 3, 0)], &free, &running[..1]).preemptions.is_empty());
    // A job that fits on free workers stops nobody.
    let plan = schedule_preempting(&[job(9, 10, 1, 1, 0)], &free, &running);
    assert_eq!((plan.placements.len(), plan.preemptions.len()), (1, 0));
}

#[test]
fn only_workers_that_fit_the_waiting_job_count_and_in_one_pool_unless_mixed() {
    let free = [worker(1, 0, "a")];
    // Two one-worker jobs in pools a and b: one pool cannot make two.
    let running = [victim(1, 0, "a", &[2]), victim(2, 0, "b", &[3])];
    assert!(schedule_preempting(&[job(9, 5, 3, 3, 0)], &free, &running).preemptions.is_empty());
    assert_eq!(stopped(&schedule_preempting(&[job(9, 5, 2, 2, 0)], &free, &running)), [(1, 9)]);
    // A mixed gang counts every allowed pool.
    let mixed = PendingJob { mixed: true, ..job(9, 5, 3, 3, 0) };
    let mut plan = schedule_preempting(std::slice::from_ref(&mixed), &free, &running);
    plan.preemptions.sort_by_key(|p| p.victim);
    assert_eq!(stopped(&plan), [(1, 9), (2, 9)]);
    // ... but not a type it may not run on.
    let typed = PendingJob { instance_types: vec!["a".to_string()], ..mixed };
    assert!(schedule_preempting(&[typed], &free, &running).preemptions.is_empty());
    // GPUs, on-demand and price as for placement.
    let gpus = job(9, 5, 2, 2, 1);
    let with_gpus =
        |gpus: u32| Preemptible { members: vec![FreeWorker { gpus, ..worker(2, 0, "a") }], ..victim(1, 0, "a", &[]) };
    let free_gpu = [worker(1, 1, "a")];
    assert!(schedule_preempting(std::slice::from_ref(&gpus), &free_gpu, &[with_gpus(0)]).preemptions.is_empty());
    assert_eq!(stopped(&schedule_preempting(&[gpus], &free_gpu, &[with_gpus(1)])), [(1, 9)]);
    let on_demand = PendingJob { on_demand_only: true, ..job(9, 5, 2, 2, 0) };
    let spot = Preemptible { members: vec![FreeWorker { spot: true, ..worker(2, 0, "a") }], ..victim(1, 0, "a", &[]) };
    assert!(schedule_preempting(&[on_demand], &free, &[spot]).preemptions.is_empty());
    let capped = PendingJob { max_usd_per_hour: Some(1.0), ..job(9, 5, 2, 2, 0) };
    let dear =
        Preemptible { members: vec![FreeWorker { usd_per_hour: 3.0, ..worker(2, 0, "a") }], ..victim(1, 0, "a", &[]) };
    assert!(schedule_preempting(&[capped], &free, &[dear]).preemptions.is_empty());
}

#[test]
fn a_job_already_stopping_is_waited_for_and_the_free_workers_are_held_for_the_waiting_job() {
    let free = [worker(1, 0, "a")];
    let stopping = Preemptible { stopping: true, ..victim(1, 0, "a", &[2]) };
    let low = job(5, -3, 1, 1, 0);
    let plan = schedule_preempting(&[job(9, 5, 2, 2, 0), low.clone()], &free, std::slice::from_ref(&stopping));
    // No new order (it stops anyway), and the free worker is not given to the lower job.
    assert!(plan.preemptions.is_empty(), "{plan:?}");
    assert!(plan.placements.is_empty(), "the held worker went to {:?}", plan.placements);
    assert!(plan.waiting[&JobId(9)].contains("stopping job-1 (priority 0)"), "{:?}", plan.waiting);
    // Without a stop in sight, the lower job backfills as before.
    let plan = schedule_preempting(&[job(9, 5, 3, 3, 0), low], &free, &[stopping]);
    assert_eq!(plan.placements, [Placement { job: JobId(5), workers: vec![WorkerId(1)] }]);
}

#[test]
fn only_so_many_waiting_jobs_look_for_jobs_to_stop_in_one_pass() {
    let count = PREEMPTION_TRIES_PER_PASS as u64 + 3;
    let running: Vec<Preemptible> = (0..count).map(|i| victim(100 + i, 0, "a", &[i + 1])).collect();
    // Waiting jobs of priority 5 each need one worker, but none is free, and more of them
    // than the limit: the first ones (by submission) stop one job each, the rest wait.
    let waiting: Vec<PendingJob> = (1..=count).map(|i| job(i, 5, 1, 1, 0)).collect();
    let plan = schedule_preempting(&waiting, &[], &running);
    assert_eq!(plan.preemptions.len(), PREEMPTION_TRIES_PER_PASS);
    let for_jobs: Vec<u64> = plan.preemptions.iter().map(|p| p.for_job.0).collect();
    assert_eq!(for_jobs, (1..=PREEMPTION_TRIES_PER_PASS as u64).collect::<Vec<_>>());
}

#[test]
fn two_waiting_jobs_do_not_count_the_same_stopped_job() {
    let running = [victim(1, 0, "a", &[1, 2]), victim(2, 0, "a", &[3, 4])];
    let plan = schedule_preempting(&[job(8, 5, 2, 2, 0), job(9, 4, 2, 2, 0), job(10, 3, 2, 2, 0)], &[], &running);
    // The newest submission goes first among equal priorities; the third waiter finds nobody.
    assert_eq!(stopped(&plan), [(2, 8), (1, 9)]);
    assert!(!plan.waiting[&JobId(10)].contains("stopping"), "{:?}", plan.waiting);
}

#[test]
fn inference_gives_its_workers_back_before_any_training_job_stops_and_the_held_workers_are_named() {
    let inference = Preemptible { priority: i32::MIN, inference: true, ..victim(7, 0, "a", &[2, 3]) };
    let running = [victim(1, -5, "a", &[4, 5]), inference];
    let free = [worker(1, 0, "a")];
    // A job of the lowest training priority still outranks inference.
    let plan = schedule_preempting(&[job(9, -1000, 3, 3, 0)], &free, &running);
    assert_eq!(stopped(&plan), [(7, 9)]);
    assert!(plan.preemptions[0].inference);
    assert_eq!(plan.held, [WorkerId(1)], "the free worker waits for the gang");
    let reason = &plan.waiting[&JobId(9)];
    assert!(reason.ends_with("; inference job-7 gives its workers back after their shard"), "{reason}");
    // Five need both: the inference job, then the training job.
    let plan = schedule_preempting(&[job(9, 0, 5, 5, 0)], &free, &running);
    assert_eq!(stopped(&plan), [(7, 9), (1, 9)]);
    let reason = &plan.waiting[&JobId(9)];
    assert!(
        reason.ends_with("; inference job-7 gives its workers back after their shard; stopping job-1 (priority -5) at a checkpoint for it (lower priority)"),
        "{reason}"
    );
}
