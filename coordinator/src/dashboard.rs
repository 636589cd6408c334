//! The web dashboard: one page (`dashboard.html`, shipped in the binary: no CDN, works offline)
//! and the read-only JSON views it fetches from `/api/...` with an API token of any role. The
//! views are pure functions of the replicated state; curves come from the job's metrics history
//! (`crate::history`), live values from the leader's progress.
//!
//! The token never reaches the server in a URL: `flotilla dashboard` prints
//! `http://ADDR/#token=...`, the page keeps the fragment in sessionStorage and sends it as
//! `Authorization: Bearer`.

use flotilla_core::JobId;
use flotilla_core::state::{Job, JobState, ShardState, State};
use serde_json::{Value, json};

use crate::metrics::job_state_name;
use crate::progress::Progress;

/// The page, as served at `/`.
pub const PAGE: &str = include_str!("dashboard.html");

/// Jobs listed at most (the newest).
const JOBS_LISTED_MAX: usize = 500;

pub fn jobs(state: &State, progress: &Progress) -> Value {
    let shown = state.shown_states();
    let jobs: Vec<Value> =
        state.jobs.values().rev().take(JOBS_LISTED_MAX).map(|job| summary(job, shown.of(job), progress)).collect();
    json!({ "jobs": jobs })
}

/// One job: its summary, events (preemptions, recoveries, checkpoints, generations) and
/// checkpoints; `None` when the state does not know it.
pub fn job(state: &State, progress: &Progress, id: JobId) -> Option<Value> {
    let job = state.jobs.get(&id)?;
    let mut view = summary(job, state.shown_state(job), progress);
    view["events"] = json!(job.events);
    view["checkpoints"] = json!(
        job.checkpoints
            .iter()
            .filter(|c| !c.deleting)
            .map(|c| json!({ "step": c.step, "uri": c.uri, "size_bytes": c.size_bytes, "generation": c.generation }))
            .collect::<Vec<_>>()
    );
    view["gang"] = json!(job.gang.iter().map(ToString::to_string).collect::<Vec<_>>());
    // Its warm spares now (`capacity.spares`; none unless it runs and keeps some).
    let spares = flotilla_core::state::spares_of(state, id);
    view["spares"] = json!(spares.iter().map(ToString::to_string).collect::<Vec<_>>());
    view["spares_wanted"] = json!(job.spec.capacity.spares);
    // Handovers under way: who leaves, who replaces it (none yet: null), until when (a
    // rebalance recommendation's: null, no deadline).
    view["handovers"] = json!(
        job.handovers
            .iter()
            .map(|h| json!({
                "leaving": h.leaving.to_string(),
                "replacement": h.replacement.map(|r| r.to_string()),
                "until_unix_ms": h.deadline_unix_ms(),
            }))
            .collect::<Vec<_>>()
    );
    view["spec"] = json!(job.spec.to_toml());
    Some(view)
}

/// A job's line in the jobs list (live values from the leader's progress); `shown`: its state
/// as users see it ([`State::shown_state`]).
fn summary(job: &Job, shown: JobState, progress: &Progress) -> Value {
    let live = progress.get(job.id, job.generation);
    let (reported, total_steps) = (live.is_some(), live.map(|p| p.total_steps));
    // A validation while it trains has its own step: shown beside a newer checkpoint too.
    let validated = live.and_then(|p| p.val_accuracy);
    // A report older than the checkpoint recorded since shows none of its step's values.
    let live = live.filter(|p| p.step >= job.step);
    let mut reason = job.reason.clone();
    if shown == JobState::Running && !reported {
        let now = crate::raft::node::now_unix_ms();
        let formed = Some(job.generation_started_at_unix_ms).filter(|at| *at > 0);
        reason = crate::progress::starting(&reason, job.generation, job.spec.run.is_some(), formed, now);
    }
    json!({
        "id": job.id.to_string(),
        "name": job.spec.name,
        "priority": job.spec.priority,
        "state": job_state_name(shown),
        "step": job.step.max(live.map_or(0, |p| p.step)),
        "total_steps": total_steps,
        "loss": live.map(|p| p.loss),
        "samples_per_s": live.map(|p| p.samples_per_s),
        "world_size": job.world_size,
        "generation": job.generation,
        "preemptions": job.preemptions,
        "recoveries": job.recoveries,
        "steps_lost": job.steps_lost,
        "cost_usd": job.cost_usd,
        "val_accuracy": job.metrics.as_ref().and_then(|m| m.val_accuracy).or(validated),
        "submitted_at_unix_ms": job.submitted_at_unix_ms,
        "reason": reason,
    })
}

pub fn workers(state: &State, now_ms: u64) -> Value {
    let spares: std::collections::BTreeMap<_, _> = flotilla_core::state::warm_spares(state).into_iter().collect();
    let workers: Vec<Value> = state
        .workers
        .values()
        .map(|w| {
            json!({
                "id": w.id.to_string(),
                "state": w.condition(now_ms).name(),
                "job": w.job.map(|j| j.to_string()),
                "holds_state_of": state.rejoins(w, now_ms).map(|j| j.to_string()),
                "spare_of": spares.get(&w.id).map(|j| j.to_string()),
                "instance_id": w.info.instance_id,
                "instance_type": w.info.instance_type,
                "zone": w.info.zone,
                "cpus": w.info.cpus,
                "gpus": w.info.gpus,
                "data_addr": w.info.data_addr,
                "registered_at_unix_ms": w.registered_at_unix_ms,
                "gone_at_unix_ms": w.lost_at_unix_ms,
            })
        })
        .collect();
    json!({ "workers": workers })
}

pub fn instances(state: &State, now_unix_ms: u64) -> Value {
    let instances: Vec<Value> = state
        .instances
        .values()
        .map(|i| {
            json!({
                "id": i.id,
                "instance_type": i.instance_type,
                "zone": i.zone,
                "market": if i.spot { "spot" } else { "on_demand" },
                "usd_per_hour": i.usd_per_hour,
                "cost_usd": i.cost_usd(now_unix_ms),
                "running": i.terminated_at_unix_ms.is_none(),
            })
        })
        .collect();
    json!({ "instances": instances })
}

pub fn models(state: &State) -> Value {
    let models: Vec<Value> = state
        .models
        .values()
        .flat_map(|m| {
            m.versions.iter().map(move |v| {
                let aliases: Vec<&String> =
                    m.aliases.iter().filter(|(_, n)| **n == v.version).map(|(a, _)| a).collect();
                json!({
                    "name": m.name,
                    "version": v.version,
                    "aliases": aliases,
                    "job": v.job_id.to_string(),
                    "checkpoint_step": v.checkpoint.as_ref().map(|c| c.step),
                    "dataset_sha256": v.dataset_sha256,
                    "val_accuracy": v.metrics.as_ref().and_then(|m| m.val_accuracy),
                    "preemptions": v.preemptions,
                    "cost_usd": v.cost_usd,
                })
            })
        })
        .collect();
    json!({ "models": models })
}

pub fn inferences(state: &State) -> Value {
    let jobs: Vec<Value> = state
        .inferences
        .values()
        .rev()
        .take(JOBS_LISTED_MAX)
        .map(|j| {
            let done = j.shards.iter().filter(|s| matches!(s.state, ShardState::Done { .. })).count();
            json!({
                "id": j.id.to_string(),
                "model": format!("{}:{}", j.request.model, j.request.version),
                "state": job_state_name(j.state),
                "shards_done": done,
                "shards": j.shards.len(),
                "workers": j.members.len(),
            })
        })
        .collect();
    json!({ "inferences": jobs })
}

#[cfg(test)]
mod tests {
    use flotilla_core::state::{Command, REBALANCE_KIND};
    use flotilla_core::{JobId, WorkerId};

    use super::*;
    use crate::testing::Log;

    #[test]
    fn a_job_s_view_shows_its_handovers_under_way() {
        let mut log = Log::job_of_two(2);
        let (w1, w2) = (WorkerId(1), WorkerId(2));
        log.step(Command::AssignGang { job_id: JobId(1), workers: vec![w1, w2] });
        log.step(Command::WorkerInterrupted { worker_id: w1, kind: REBALANCE_KIND.into(), action_at_unix_ms: None });
        log.step(Command::WorkerInterrupted { worker_id: w2, kind: "spot".into(), action_at_unix_ms: Some(200_000) });
        let view = job(&log.state, &Progress::default(), JobId(1)).expect("the job");
        assert_eq!(
            view["handovers"],
            json!([
                { "leaving": "worker-1", "replacement": null, "until_unix_ms": null },
                { "leaving": "worker-2", "replacement": null, "until_unix_ms": 155_000 },
            ])
        );
        assert_eq!((&view["spares"], &view["spares_wanted"]), (&json!([]), &json!(0)));
    }

    /// A live report older than the checkpoint recorded since lends the line none of its
    /// values but its total: the step is the checkpoint's, with no loss or rate beside it.
    #[test]
    fn a_report_older_than_the_recorded_step_shows_none_of_its_values() {
        let mut log = Log::job_of_two(2);
        log.step(Command::AssignGang { job_id: JobId(1), workers: vec![WorkerId(1), WorkerId(2)] });
        let generation = log.state.jobs[&JobId(1)].generation;
        let progress = Progress::default();
        let report = flotilla_proto::v1::LiveProgress {
            step: 1,
            total_steps: 9,
            loss: 2.3,
            generation,
            val_accuracy: Some(0.5),
            val_step: 1,
            ..Default::default()
        };
        progress.record(JobId(1), report);
        let line = |state: &State| summary(&state.jobs[&JobId(1)], JobState::Running, &progress);
        let fresh = line(&log.state);
        assert_eq!((&fresh["step"], &fresh["loss"], &fresh["total_steps"]), (&json!(1), &json!(2.3), &json!(9)));
        log.state.jobs.get_mut(&JobId(1)).expect("the job").step = 9;
        let stale = line(&log.state);
        assert_eq!((&stale["step"], &stale["loss"], &stale["total_steps"]), (&json!(9), &json!(null), &json!(9)));
        assert_eq!(stale["reason"], json!(""), "a generation that reported a step is not starting");
        assert_eq!((&fresh["val_accuracy"], &stale["val_accuracy"]), (&json!(0.5), &json!(0.5)), "at its own step");
    }

    /// A running job's view and the workers' name its warm spares.
    #[test]
    fn a_job_s_view_and_the_workers_name_its_warm_spares() {
        let mut log = Log::job_of_two_and_a_spared_job(2, 2);
        log.step(Command::AssignGang { job_id: JobId(2), workers: vec![WorkerId(1)] });
        let view = job(&log.state, &Progress::default(), JobId(2)).expect("the job");
        assert_eq!((&view["spares"], &view["spares_wanted"]), (&json!(["worker-2"]), &json!(2)));
        let listed = workers(&log.state, 0);
        let spare_of: Vec<&Value> =
            listed["workers"].as_array().expect("workers").iter().map(|w| &w["spare_of"]).collect();
        assert_eq!(spare_of, [&json!(null), &json!("job-2")]);
    }
}
