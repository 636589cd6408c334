//! `flotilla bench-scheduler` (hidden): placement time of the gang scheduler for
//! `scripts/bench/scheduler.sh`, with a naive scheduler (scan every free worker for every job)
//! timed on the same input in the same run as the baseline; and the pass with priority
//! preemption (half the workers busy in running gangs of lower and higher priorities), against
//! the plain pass on the same input.

use std::time::{Duration, Instant};

use flotilla_core::ids::{JobId, WorkerId};
use flotilla_core::scheduler::{FreeWorker, PendingJob, Preemptible, schedule, schedule_preempting};
use serde_json::json;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 10_000)]
    pub jobs: usize,
    #[arg(long, default_value_t = 1_000)]
    pub workers: usize,
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
}

/// A deterministic mixed workload: gangs of 1-8, a quarter of them GPU jobs, 4 pools.
fn workload(jobs: usize, workers: usize) -> (Vec<PendingJob>, Vec<FreeWorker>) {
    let pending = (0..jobs as u64)
        .map(|i| PendingJob {
            id: JobId(i + 1),
            priority: (i % 3) as i32,
            submitted_index: i,
            min_workers: 1 + (i % 8) as u32,
            max_workers: 1 + (i % 8) as u32 + (i % 2) as u32,
            gpus_per_worker: u32::from(i % 4 == 0),
            on_demand_only: false,
            mixed: false,
            instance_types: Vec::new(),
            max_usd_per_hour: None,
            holders: Vec::new(),
        })
        .collect();
    let free = (0..workers as u64)
        .map(|i| FreeWorker {
            id: WorkerId(i + 1),
            gpus: (i % 3) as u32,
            instance_type: ["g5.xlarge", "g4dn.xlarge"][(i % 2) as usize].to_string(),
            zone: ["a", "b"][((i / 2) % 2) as usize].to_string(),
            spot: false,
            usd_per_hour: 0.0,
            only_for: None,
            spare: false,
        })
        .collect();
    (pending, free)
}

/// `free` split: the first half stays free, the second half runs in gangs of 4 of priorities
/// -1, 0 and 1 (the pending jobs have 0 to 2: most of them may stop some).
fn half_busy(free: &[FreeWorker]) -> (Vec<FreeWorker>, Vec<Preemptible>) {
    let (idle, busy) = free.split_at(free.len() / 2);
    let running = busy
        .chunks(4)
        .enumerate()
        .map(|(i, members)| Preemptible {
            id: JobId(1_000_000 + i as u64),
            generation: 1,
            priority: (i % 3) as i32 - 1,
            submitted_index: 1_000_000 + i as u64,
            stopping: false,
            members: members.to_vec(),
            inference: false,
        })
        .collect();
    (idle.to_vec(), running)
}

/// The baseline: per job, scan all free workers of each pool.
fn naive(pending: &[PendingJob], free: &[FreeWorker]) -> usize {
    let mut order: Vec<&PendingJob> = pending.iter().collect();
    order.sort_by_key(|j| (std::cmp::Reverse(j.priority), j.submitted_index));
    let mut used = vec![false; free.len()];
    let mut placed = 0;
    for job in order {
        let pools: std::collections::BTreeSet<(&str, &str)> =
            free.iter().map(|w| (w.instance_type.as_str(), w.zone.as_str())).collect();
        for (t, z) in pools {
            let fit: Vec<usize> = (0..free.len())
                .filter(|&i| {
                    !used[i] && free[i].gpus >= job.gpus_per_worker && free[i].instance_type == t && free[i].zone == z
                })
                .collect();
            if fit.len() >= job.min_workers as usize {
                for &i in fit.iter().take(job.max_workers as usize) {
                    used[i] = true;
                }
                placed += 1;
                break;
            }
        }
    }
    placed
}

fn median(mut times: Vec<Duration>) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1000.0
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (pending, free) = workload(args.jobs, args.workers);
    let rounds = args.rounds.max(1);
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    let mut placed = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        placed = schedule(&pending, &free).placements.len();
        ours.push(started.elapsed());
        let started = Instant::now();
        let _ = naive(&pending, &free);
        base.push(started.elapsed());
    }
    let (ours, base) = (median(ours), median(base));
    let (idle, running) = half_busy(&free);
    let (mut plain, mut preempting) = (Vec::new(), Vec::new());
    let mut stops = 0;
    for _ in 0..rounds {
        let started = Instant::now();
        let _ = schedule(&pending, &idle);
        plain.push(started.elapsed());
        let started = Instant::now();
        stops = schedule_preempting(&pending, &idle, &running).preemptions.len();
        preempting.push(started.elapsed());
    }
    let (plain, preempting) = (median(plain), median(preempting));
    println!(
        "{}",
        json!({
            "bench": "scheduler_placement",
            "pending_jobs": args.jobs,
            "free_workers": args.workers,
            "placed": placed,
            "median_ms": ours,
            "naive_median_ms": base,
            "speedup_vs_naive": base / ours,
            "half_busy_running_jobs": running.len(),
            "half_busy_plain_median_ms": plain,
            "half_busy_preempting_median_ms": preempting,
            "half_busy_preemptions": stops,
            "preempting_vs_plain": preempting / plain,
        })
    );
    Ok(())
}
