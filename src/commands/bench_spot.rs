//! `flotilla bench-spot-cost` (hidden): a fixed training workload on a replayed spot market
//! (`flotilla_core::market`) under four purchasing policies, for `scripts/bench/spot_cost.sh`.
//! One JSON line per policy, then one with ratios against all-on-demand (the baseline), naive
//! spot and naive spot held to a deadline of 1.25x on-demand's makespan, all from the same run.

use anyhow::Context;
use flotilla_core::market::{Policy, SimParams, Trace, benchmark_workload, simulate};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The market trace (CSV; format in examples/traces/README.md).
    #[arg(long, default_value = "examples/traces/us-east-1-gpu-72h.csv")]
    pub trace: std::path::PathBuf,
    /// Seeds the interruptions drawn from the trace's rates.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Minutes from a launch to a registered worker (EC2 GPU instances: 1 to 3). A handover
    /// needs its replacement within the notice (2 minutes) less the 45 s fallback lead.
    #[arg(long, default_value_t = 3.0)]
    pub provision_minutes: f64,
    /// The training state (parameters and optimizer moments) a replacement takes from the
    /// leaving member at a handover, in GiB: with the peer bandwidth, the handover's stall.
    #[arg(long, default_value_t = 1.0)]
    pub state_gib: f64,
    /// The bandwidth between two members, in Gbit/s.
    #[arg(long, default_value_t = 10.0)]
    pub peer_gbit_per_s: f64,
}

/// Makespan allowed to the deadline baseline, as a multiple of all-on-demand's (issue 24).
const DEADLINE_VS_ON_DEMAND: f64 = 1.25;

fn round(value: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (value * scale).round() / scale
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.trace).with_context(|| format!("reading {}", args.trace.display()))?;
    let trace = Trace::parse(&text).with_context(|| format!("parsing {}", args.trace.display()))?;
    let name = args.trace.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    anyhow::ensure!(
        args.provision_minutes.is_finite() && (0.0..=60.0).contains(&args.provision_minutes),
        "--provision-minutes must be 0 to 60, got {}",
        args.provision_minutes
    );
    anyhow::ensure!(
        args.state_gib.is_finite() && (0.0..=10_000.0).contains(&args.state_gib),
        "--state-gib must be 0 to 10000, got {}",
        args.state_gib
    );
    anyhow::ensure!(
        args.peer_gbit_per_s.is_finite() && (0.01..=10_000.0).contains(&args.peer_gbit_per_s),
        "--peer-gbit-per-s must be 0.01 to 10000, got {}",
        args.peer_gbit_per_s
    );
    let params = SimParams {
        seed: args.seed,
        provision_minutes: args.provision_minutes,
        state_gib: args.state_gib,
        peer_gbit_per_s: args.peer_gbit_per_s,
        ..SimParams::default()
    };
    let jobs = benchmark_workload();
    let mut outcomes = Vec::new();
    let mut deadline_hours = None;
    // Every policy, then Flotilla without correlated risk (what the risk model is worth), with
    // mixed-type gangs (what letting a gang span pools is worth) and without handovers (every
    // notice checkpoints and waits for capacity: what the handover is worth).
    let runs = Policy::ALL.into_iter().map(|p| (p, true, false, true)).chain([
        (Policy::Flotilla, false, false, true),
        (Policy::Flotilla, true, true, true),
        (Policy::Flotilla, true, false, false),
    ]);
    for (policy, correlated_risk, mixed_types, handover) in runs {
        let run = SimParams { deadline_hours, correlated_risk, mixed_types, handover, ..params };
        let mut o = simulate(&trace, &jobs, policy, run);
        if policy == Policy::OnDemand {
            deadline_hours = Some(o.makespan_h * DEADLINE_VS_ON_DEMAND);
        }
        if !correlated_risk {
            o.policy = "flotilla_uncorrelated";
        }
        if mixed_types {
            o.policy = "flotilla_mixed_types";
        }
        if !handover {
            o.policy = "flotilla_checkpoint_and_wait";
        }
        println!(
            "{}",
            json!({
                "bench": "spot_cost",
                "trace": name,
                "policy": o.policy,
                "cost_usd": round(o.cost_usd, 2),
                "makespan_h": round(o.makespan_h, 2),
                "preemptions": o.preemptions,
                "steps_lost": o.steps_lost,
                "lost_work_usd": round(o.lost_work_usd, 2),
                "instance_hours": round(o.instance_hours, 1),
                "on_demand_hours": round(o.on_demand_hours, 1),
                "finished_jobs": o.finished_jobs,
                "provision_minutes": args.provision_minutes,
                "handovers": o.handovers,
                "stall_h": round(o.stall_h, 3),
                "handover_stall_h": round(o.handover_stall_h, 4),
                "jobs": jobs.len(),
                "seed": args.seed,
            })
        );
        outcomes.push(o);
    }
    let by = |name: &str| outcomes.iter().find(|o| o.policy == name).context("a policy is missing");
    let (on_demand, naive, deadline, flotilla) =
        (by("on_demand")?, by("naive_spot")?, by("naive_spot_deadline")?, by("flotilla")?);
    let waiting = by("flotilla_checkpoint_and_wait")?;
    let per_preemption = |o: &flotilla_core::market::Outcome| o.stall_h * 60.0 / o.preemptions.max(1) as f64;
    println!(
        "{}",
        json!({
            "bench": "spot_cost_summary",
            "trace": name,
            "flotilla_cost_vs_on_demand": round(flotilla.cost_usd / on_demand.cost_usd, 3),
            "flotilla_makespan_vs_on_demand": round(flotilla.makespan_h / on_demand.makespan_h, 3),
            "flotilla_cost_vs_naive_deadline": round(flotilla.cost_usd / deadline.cost_usd, 3),
            "flotilla_makespan_vs_naive": round(flotilla.makespan_h / naive.makespan_h, 3),
            "naive_cost_vs_on_demand": round(naive.cost_usd / on_demand.cost_usd, 3),
            "naive_makespan_vs_on_demand": round(naive.makespan_h / on_demand.makespan_h, 3),
            "naive_deadline_cost_vs_on_demand": round(deadline.cost_usd / on_demand.cost_usd, 3),
            "naive_deadline_makespan_vs_on_demand": round(deadline.makespan_h / on_demand.makespan_h, 3),
            "flotilla_handovers_per_preemption": round(flotilla.handovers as f64 / flotilla.preemptions.max(1) as f64, 3),
            "flotilla_stall_min_per_preemption": round(per_preemption(flotilla), 3),
            "checkpoint_and_wait_stall_min_per_preemption": round(per_preemption(waiting), 3),
            "handover_stall_vs_checkpoint_and_wait": round(per_preemption(flotilla) / per_preemption(waiting).max(1e-9), 3),
            // Issue 25: each handover's stall against its bound (one step + the state's transfer).
            "handover_stall_s_per_handover": round(flotilla.handover_stall_h * 3600.0 / flotilla.handovers.max(1) as f64, 3),
            "handover_stall_bound_s": round(params.handover_stall_seconds(), 3),
            "state_gib": args.state_gib,
            "peer_gbit_per_s": args.peer_gbit_per_s,
            "seed": args.seed,
        })
    );
    Ok(())
}
