//! `flotilla bench-spot-cost` (hidden): a fixed training workload on a replayed spot market
//! (`flotilla_core::market`) under three purchasing policies, for `scripts/bench/spot_cost.sh`.
//! One JSON line per policy, then one with Flotilla's ratios against all-on-demand (the
//! baseline, computed in the same run).

use anyhow::Context;
use flotilla_core::market::{Policy, SimJob, SimParams, Trace, simulate};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The market trace (CSV; format in examples/traces/README.md).
    #[arg(long, default_value = "examples/traces/us-east-1-gpu-72h.csv")]
    pub trace: std::path::PathBuf,
    /// Seeds the interruptions drawn from the trace's rates.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The workload: 8 data-parallel jobs, 208 instance-hours of training on on-demand capacity.
fn workload() -> Vec<SimJob> {
    let mut jobs = Vec::new();
    for _ in 0..4 {
        jobs.push(SimJob { workers: 4, work_hours: 10.0 });
        jobs.push(SimJob { workers: 2, work_hours: 6.0 });
    }
    jobs
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.trace).with_context(|| format!("reading {}", args.trace.display()))?;
    let trace = Trace::parse(&text).with_context(|| format!("parsing {}", args.trace.display()))?;
    let params = SimParams { seed: args.seed, ..SimParams::default() };
    let jobs = workload();
    let mut outcomes = Vec::new();
    for policy in Policy::ALL {
        let o = simulate(&trace, &jobs, policy, params);
        println!(
            "{}",
            json!({
                "bench": "spot_cost",
                "policy": o.policy,
                "cost_usd": (o.cost_usd * 100.0).round() / 100.0,
                "makespan_h": (o.makespan_h * 100.0).round() / 100.0,
                "preemptions": o.preemptions,
                "steps_lost": o.steps_lost,
                "lost_work_usd": (o.lost_work_usd * 100.0).round() / 100.0,
                "instance_hours": (o.instance_hours * 10.0).round() / 10.0,
                "finished_jobs": o.finished_jobs,
                "jobs": jobs.len(),
                "seed": args.seed,
            })
        );
        outcomes.push(o);
    }
    let by = |name: &str| outcomes.iter().find(|o| o.policy == name).context("a policy is missing");
    let (on_demand, naive, flotilla) = (by("on_demand")?, by("naive_spot")?, by("flotilla")?);
    println!(
        "{}",
        json!({
            "bench": "spot_cost_summary",
            "flotilla_cost_vs_on_demand": (flotilla.cost_usd / on_demand.cost_usd * 1000.0).round() / 1000.0,
            "flotilla_makespan_vs_on_demand": (flotilla.makespan_h / on_demand.makespan_h * 1000.0).round() / 1000.0,
            "naive_cost_vs_on_demand": (naive.cost_usd / on_demand.cost_usd * 1000.0).round() / 1000.0,
            "naive_makespan_vs_on_demand": (naive.makespan_h / on_demand.makespan_h * 1000.0).round() / 1000.0,
            "seed": args.seed,
        })
    );
    Ok(())
}
