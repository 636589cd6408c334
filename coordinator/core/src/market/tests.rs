use super::*;

const TRACE: &str = "\
# two pools: a cheap volatile one, a steady one
hour,instance_type,zone,spot_usd_per_hour,on_demand_usd_per_hour,interruptions_per_hour,spot_capacity
0,g5.xlarge,a,0.30,1.00,0.6,40
0,g4dn.xlarge,b,0.40,0.80,0.02,40
5,g5.xlarge,a,0.30,1.00,0.6,0   # the cheap pool runs dry for 4 hours
9,g5.xlarge,a,0.30,1.00,0.6,40
";

fn jobs() -> Vec<SimJob> {
    vec![
        SimJob { workers: 4, work_hours: 6.0 },
        SimJob { workers: 2, work_hours: 4.0 },
        SimJob { workers: 4, work_hours: 8.0 },
    ]
}

#[test]
fn pools_of_zones_the_provider_cannot_launch_in_are_left_out() {
    let mut trace = Trace::parse(TRACE).expect("trace");
    assert_eq!(trace.retain_zones(|zone| zone == "b"), ["a"]);
    let left: Vec<&PoolKey> = trace.pools().collect();
    assert_eq!(left, [&PoolKey { instance_type: "g4dn.xlarge".into(), zone: "b".into() }]);
    assert_eq!(trace.quotes(6.0).len(), 1);
    assert!(trace.retain_zones(|_| true).is_empty());
}

#[test]
fn traces_parse_with_step_functions_and_refuse_bad_rows() {
    let trace = Trace::parse(TRACE).expect("trace");
    let pool = PoolKey { instance_type: "g5.xlarge".into(), zone: "a".into() };
    assert_eq!(trace.at(&pool, 4.9).map(|s| s.spot_capacity), Some(40));
    assert_eq!(trace.at(&pool, 5.0).map(|s| s.spot_capacity), Some(0));
    assert_eq!(trace.quotes(0.0).len(), 2);
    let bad = Trace::parse("hour,a\n0,g5.xlarge,a,x,1,0,1\n").expect_err("not a number");
    assert_eq!(bad.line, 2);
    assert!(bad.message.contains("spot_usd_per_hour"), "{bad}");
    assert!(Trace::parse("0,g5.xlarge,a,-1,1,0,1\n").is_err(), "negative prices are refused");
    assert!(Trace::parse("3,g5.xlarge,a,1,1,0,1\n").expect_err("late start").message.contains("hour 0"));
    assert!(Trace::parse("").is_err());
}

#[test]
fn every_policy_finishes_the_work_and_the_simulation_is_seeded() {
    let trace = Trace::parse(TRACE).expect("trace");
    for policy in Policy::ALL {
        let a = simulate(&trace, &jobs(), policy, SimParams::default());
        let b = simulate(&trace, &jobs(), policy, SimParams::default());
        assert_eq!(a, b, "{}: replayable", policy.name());
        assert_eq!(a.finished_jobs, 3, "{a:?}");
        assert!(a.makespan_h >= 8.0 && a.cost_usd > 0.0, "{a:?}");
    }
}

#[test]
fn on_demand_is_never_interrupted_and_flotilla_loses_no_work() {
    let trace = Trace::parse(TRACE).expect("trace");
    let on_demand = simulate(&trace, &jobs(), Policy::OnDemand, SimParams::default());
    assert_eq!((on_demand.preemptions, on_demand.steps_lost), (0, 0));
    let naive = simulate(&trace, &jobs(), Policy::NaiveSpot, SimParams::default());
    let flotilla = simulate(&trace, &jobs(), Policy::Flotilla, SimParams::default());
    assert_eq!(flotilla.steps_lost, 0, "checkpoints at the notice: {flotilla:?}");
    assert!(naive.preemptions > 0 && naive.steps_lost > 0, "{naive:?}");
    assert!(flotilla.cost_usd < on_demand.cost_usd, "{flotilla:?} vs {on_demand:?}");
    assert!(
        flotilla.makespan_h < naive.makespan_h,
        "the naive pool runs dry from hour 5 to 9: {flotilla:?} vs {naive:?}"
    );
}

#[test]
fn mixed_type_gangs_finish_the_work_without_loss_and_replay() {
    let trace = Trace::parse(TRACE).expect("trace");
    let mixed = SimParams { mixed_types: true, ..SimParams::default() };
    let a = simulate(&trace, &jobs(), Policy::Flotilla, mixed);
    assert_eq!(a, simulate(&trace, &jobs(), Policy::Flotilla, mixed), "replayable");
    assert_eq!((a.finished_jobs, a.steps_lost), (3, 0), "{a:?}");
    let on_demand = simulate(&trace, &jobs(), Policy::OnDemand, SimParams::default());
    assert!(a.cost_usd < on_demand.cost_usd, "{a:?} vs {on_demand:?}");
}

const ZONAL: &str = include_str!("../../../../examples/traces/us-east-1-gpu-zonal-72h.csv");

#[test]
fn on_the_zonal_trace_flotilla_beats_both_naive_baselines_within_the_targets() {
    // A zone-wide capacity event, the two cheapest other pools dry together, one pool's spot
    // above on-demand: issue 24's acceptance on one seed (the bench takes five).
    let trace = Trace::parse(ZONAL).expect("the shipped zonal trace parses");
    let jobs = benchmark_workload();
    let on_demand = simulate(&trace, &jobs, Policy::OnDemand, SimParams::default());
    let deadline = on_demand.makespan_h * 1.25;
    let with_deadline = SimParams { deadline_hours: Some(deadline), ..SimParams::default() };
    let naive = simulate(&trace, &jobs, Policy::NaiveSpot, SimParams::default());
    let naive_deadline = simulate(&trace, &jobs, Policy::NaiveSpotDeadline, with_deadline);
    let flotilla = simulate(&trace, &jobs, Policy::Flotilla, SimParams::default());
    assert_eq!(flotilla.finished_jobs, jobs.len(), "{flotilla:?}");
    assert_eq!(flotilla.steps_lost, 0, "{flotilla:?}");
    assert!(flotilla.cost_usd <= 0.35 * on_demand.cost_usd, "{flotilla:?} vs {on_demand:?}");
    assert!(flotilla.makespan_h <= deadline, "{flotilla:?} vs {on_demand:?}");
    assert!(flotilla.cost_usd < naive_deadline.cost_usd, "{flotilla:?} vs {naive_deadline:?}");
    assert!(flotilla.makespan_h <= naive.makespan_h, "{flotilla:?} vs {naive:?}");
    assert_eq!(flotilla.on_demand_hours, 0.0, "spot stays cheaper than on-demand somewhere");
}

/// One run of `policy` per trace, deadline factor (x on-demand's makespan) and seed 1-3.
struct DeadlineRun {
    label: String,
    deadline: f64,
    on_demand_cost_usd: f64,
    jobs: usize,
    run: Outcome,
}

fn deadline_runs(traces: &[(&str, &str)], factors: &[f64], policy: Policy) -> Vec<DeadlineRun> {
    let mut runs = Vec::new();
    for &(name, text) in traces {
        let trace = Trace::parse(text).expect("trace");
        let jobs = if name == "small" { jobs() } else { benchmark_workload() };
        let on_demand = simulate(&trace, &jobs, Policy::OnDemand, SimParams::default());
        for &factor in factors {
            let deadline = on_demand.makespan_h * factor;
            for seed in 1..=3 {
                let params = SimParams { deadline_hours: Some(deadline), seed, ..SimParams::default() };
                let run = simulate(&trace, &jobs, policy, params);
                let label = format!("{name} x{factor} seed {seed}");
                runs.push(DeadlineRun {
                    label,
                    deadline,
                    on_demand_cost_usd: on_demand.cost_usd,
                    jobs: jobs.len(),
                    run,
                });
            }
        }
    }
    runs
}

#[test]
fn the_deadline_baseline_meets_the_deadline_whenever_on_demand_could() {
    for r in deadline_runs(&[("small", TRACE), ("zonal", ZONAL)], &[1.1, 1.25, 2.0], Policy::NaiveSpotDeadline) {
        let (label, run, deadline) = (&r.label, &r.run, r.deadline);
        assert_eq!(run.finished_jobs, r.jobs, "{label}: {run:?}");
        assert!(run.makespan_h <= deadline, "{label}: {run:?} past {deadline}");
    }
}

#[test]
fn flotilla_meets_a_deadline_whenever_on_demand_alone_could() {
    let shipped = include_str!("../../../../examples/traces/us-east-1-gpu-72h.csv");
    let traces = [("small", TRACE), ("shipped", shipped), ("zonal", ZONAL)];
    for r in deadline_runs(&traces, &[1.02, 1.05, 1.1, 1.25], Policy::Flotilla) {
        let (label, run, deadline) = (&r.label, &r.run, r.deadline);
        assert_eq!(run.finished_jobs, r.jobs, "{label}: {run:?}");
        assert!(run.makespan_h <= deadline, "{label}: {run:?} past {deadline}");
        assert_eq!(run.steps_lost, 0, "{label}: {run:?}");
        // A tight deadline costs more, never more than on-demand by much (idle spot
        // instances left behind are paid until their cooldown).
        assert!(run.cost_usd <= r.on_demand_cost_usd * 1.05, "{label}: {run:?}");
    }
}

#[test]
fn handovers_keep_gangs_training_through_notices_when_a_replacement_is_ready_in_time() {
    let trace = Trace::parse(TRACE).expect("trace");
    let waiting = SimParams { handover: false, ..SimParams::default() };
    let handing = SimParams::default();
    // Instances that boot within the notice: bought replacements arrive before the fallback.
    let quick = SimParams { provision_minutes: 0.5, ..SimParams::default() };
    let quick_waiting = SimParams { handover: false, ..quick };
    for (label, with, without) in [("3-minute boot", handing, waiting), ("30 s boot", quick, quick_waiting)] {
        let a = simulate(&trace, &jobs(), Policy::Flotilla, with);
        assert_eq!(a, simulate(&trace, &jobs(), Policy::Flotilla, with), "{label}: replayable");
        let b = simulate(&trace, &jobs(), Policy::Flotilla, without);
        assert_eq!((a.finished_jobs, a.steps_lost, b.steps_lost), (3, 0, 0), "{label}: {a:?}");
        assert_eq!(b.handovers, 0, "{label}: {b:?}");
        assert!(a.preemptions > 0 && b.preemptions > 0, "{label}: {a:?} {b:?}");
        assert!(a.handovers > 0, "{label}: {a:?}");
        // Each handover costs its stall; each notice without one, a restart.
        let per_preemption = |o: &Outcome| o.stall_h / o.preemptions as f64;
        assert!(per_preemption(&a) < per_preemption(&b), "{label}: {a:?} vs {b:?}");
        // Issue 25's bound: a handover costs at most one step and the state's transfer.
        let bound_h = with.handover_stall_seconds() / 3600.0;
        assert!(
            a.handover_stall_h > 0.0 && a.handover_stall_h <= a.handovers as f64 * bound_h + 1e-12,
            "{label}: {a:?}"
        );
        assert_eq!(b.handover_stall_h, 0.0, "{label}: {b:?}");
    }
    // With quick boots most notices are handed over (not: a notice while the gang starts, a
    // second one while a handover is under way, capacity taken without a notice), and the
    // time without training falls by more than half.
    let a = simulate(&trace, &jobs(), Policy::Flotilla, quick);
    let b = simulate(&trace, &jobs(), Policy::Flotilla, quick_waiting);
    assert!(a.handovers * 2 >= a.preemptions, "{a:?}");
    assert!(a.stall_h < b.stall_h / 2.0, "{a:?} vs {b:?}");
}

#[test]
fn a_handover_stalls_one_step_and_the_state_transfer() {
    let params = SimParams::default();
    // 1 s steps; 1 GiB over 10 Gbit/s is 0.859 s.
    assert!((params.handover_stall_seconds() - 1.859).abs() < 1e-3, "{}", params.handover_stall_seconds());
    let fast = SimParams { steps_per_hour: 7200.0, state_gib: 0.5, peer_gbit_per_s: 25.0, ..params };
    assert!((fast.handover_stall_seconds() - (0.5 + 0.5 * 8.0 * 1.073_741_824 / 25.0)).abs() < 1e-9);
    // A bigger state costs more simulated stall, over the same market.
    let trace = Trace::parse(TRACE).expect("trace");
    let quick = SimParams { provision_minutes: 0.5, ..params };
    let heavy = SimParams { state_gib: 40.0, ..quick };
    let (a, b) =
        (simulate(&trace, &jobs(), Policy::Flotilla, quick), simulate(&trace, &jobs(), Policy::Flotilla, heavy));
    let per_handover = |o: &Outcome| o.handover_stall_h * 3600.0 / o.handovers as f64;
    assert!(a.handovers > 0 && b.handovers > 0, "{a:?} {b:?}");
    assert!(per_handover(&a) <= quick.handover_stall_seconds() + 1e-9, "{a:?}");
    assert!(per_handover(&b) <= heavy.handover_stall_seconds() + 1e-9, "{b:?}");
    assert!(per_handover(&b) > per_handover(&a) * 10.0, "{a:?} {b:?}");
}
