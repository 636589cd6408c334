//! A worker reports only for its own job: pinned cases, and the hostile-input property (random
//! bounded garbage from any worker never panics `apply` and never changes another job).

use proptest::prelude::*;

use super::hostile::{self, Garbage};
use super::tests::{at, inference_job, lease, register, stats, submit};
use super::*;
use crate::ids::{JobId, WorkerId};

/// Two running training jobs (gangs of 2 and 1), a running inference job with a leased shard,
/// a finished job, and an idle worker. Returns the state and every worker id (plus one unknown).
fn cluster() -> (State, Vec<WorkerId>) {
    let mut state = State::default();
    let (inference, i1, i2) = inference_job(&mut state, 400, 100);
    at(&mut state, 8, Command::JoinInference { job_id: inference, workers: vec![i1, i2] }).expect("join");
    lease(&mut state, inference, i1).expect("a shard");
    let (a, b) = (submit(&mut state, 10, "t1"), submit(&mut state, 11, "t2"));
    let (Ok(Applied::JobSubmitted { job_id: a, .. }), Ok(Applied::JobSubmitted { job_id: b, .. })) = (a, b) else {
        panic!("submit")
    };
    let (g1, g2, g3, idle) =
        (register(&mut state, 12), register(&mut state, 13), register(&mut state, 14), register(&mut state, 15));
    at(&mut state, 16, Command::AssignGang { job_id: a, workers: vec![g1, g2] }).expect("gang a");
    at(&mut state, 17, Command::AssignGang { job_id: b, workers: vec![g3] }).expect("gang b");
    let mut workers: Vec<WorkerId> = state.workers.keys().copied().collect();
    assert!(workers.contains(&idle));
    workers.push(WorkerId(999));
    (state, workers)
}

fn checkpoint(job_id: JobId, step: u64) -> CheckpointRecord {
    CheckpointRecord {
        step,
        uri: format!("file:///s/jobs/{job_id}/ckpt/step-{step}"),
        size_bytes: 1,
        manifest_sha256: "ab".repeat(32),
        epoch: 0,
        global_sample_offset: 0,
        generation: 1,
        deleting: false,
        pending: false,
        writer: None,
    }
}

#[test]
fn a_worker_reports_only_for_its_own_gang() {
    let (mut state, _) = cluster();
    let (a, b) = (JobId(3), JobId(4));
    let (g1, g3) = (state.jobs[&a].gang[0], state.jobs[&b].gang[0]);
    let before = state.jobs[&a].clone();
    let forged = [
        Command::RecordCheckpoint { job_id: a, checkpoint: checkpoint(a, 50), reporter: Some(g3) },
        Command::GenerationEnded {
            job_id: a,
            generation: 1,
            end: GenerationEnd::Checkpointed,
            step: u64::MAX,
            reporter: Some(g3),
            announced: None,
        },
        Command::JobFinished {
            job_id: a,
            generation: 1,
            success: true,
            reason: String::new(),
            step: 1,
            metrics: None,
            artifact: None,
            reporter: Some(g3),
        },
    ];
    for command in forged {
        assert_eq!(at(&mut state, 20, command), Err(Rejected::NotAMember { worker: g3, job_id: a }));
    }
    assert_eq!(state.jobs[&a], before, "nothing changed");
    let own = Command::RecordCheckpoint { job_id: a, checkpoint: checkpoint(a, 50), reporter: Some(g1) };
    assert_eq!(at(&mut state, 21, own), Ok(Applied::CheckpointRecorded { job_id: a, step: 50 }));
    // A member's late report after its generation ended (a peer died first) is still its own.
    let broken = GenerationEnd::PeerLost { reason: "peer died".into(), unreachable_rank: None };
    let ended = Command::GenerationEnded {
        job_id: a,
        generation: 1,
        end: broken,
        step: 60,
        reporter: Some(g1),
        announced: None,
    };
    at(&mut state, 22, ended).expect("ended");
    let late = Command::RecordCheckpoint { job_id: a, checkpoint: checkpoint(a, 55), reporter: Some(g1) };
    assert_eq!(at(&mut state, 23, late), Ok(Applied::CheckpointRecorded { job_id: a, step: 55 }));
    let forged = Command::RecordCheckpoint { job_id: a, checkpoint: checkpoint(a, 58), reporter: Some(g3) };
    assert_eq!(at(&mut state, 24, forged), Err(Rejected::NotAMember { worker: g3, job_id: a }));
}

#[test]
fn only_a_shards_holder_commits_or_fails_it() {
    let (mut state, _) = cluster();
    let inference = JobId(2);
    let job = &state.inferences[&inference];
    let (i1, i2) = (job.members[0], job.members[1]);
    let (index, attempt) = job
        .shards
        .iter()
        .enumerate()
        .find_map(|(i, s)| match s.state {
            ShardState::Leased { attempt, .. } => Some((i as u32, attempt)),
            _ => None,
        })
        .expect("i1 holds a shard");
    let rows = job.shards[index as usize].rows;
    let object = attempt_object(&job.request.output_uri, index, attempt);
    let commit = |worker| Command::CommitShard {
        job_id: inference,
        worker_id: worker,
        index,
        attempt,
        object: object.clone(),
        stats: stats(rows, 0),
    };
    let fail = |worker| Command::FailShard {
        job_id: inference,
        worker_id: worker,
        index,
        attempt,
        error: "forged".into(),
        release: false,
    };
    let before = state.inferences[&inference].clone();
    for worker in [i2, WorkerId(12)] {
        assert_eq!(at(&mut state, 30, commit(worker)), Err(Rejected::NotAMember { worker, job_id: inference }));
        assert_eq!(at(&mut state, 30, fail(worker)), Err(Rejected::NotAMember { worker, job_id: inference }));
    }
    assert_eq!(state.inferences[&inference], before, "nothing changed");
    assert_eq!(at(&mut state, 31, commit(i1)), Ok(Applied::ShardCommitted { job_id: inference, complete: false }));
}

fn garbage() -> impl Strategy<Value = (usize, Garbage)> {
    (any::<usize>(), any::<u8>(), 0u64..6, any::<[u64; 5]>(), ".{0,300}")
        .prop_map(|(reporter, kind, job, numbers, text)| (reporter, Garbage { kind, job, numbers, text }))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Random bounded garbage from any worker (a gang member, an idle one, an unknown id)
    /// never panics apply and never changes a job the reporter is not part of. The state
    /// stays encodable and decodes to itself (what a snapshot transfer needs).
    #[test]
    fn hostile_reports_never_change_another_workers_job(reports in prop::collection::vec(garbage(), 1..40)) {
        let (mut state, workers) = cluster();
        for (t, (pick, garbage)) in reports.iter().enumerate() {
            let reporter = workers[pick % workers.len()];
            let foreign = hostile::foreign_jobs(&state, reporter);
            let command = hostile::report(reporter, garbage);
            // Through the log's encoding, as every replica sees it (the leader refuses to log
            // what would not decode).
            let Ok(entry) = Envelope::new(100 + t as u64, command).encode() else { continue };
            let _ = apply(&mut state, 100 + t as u64, Envelope::decode(&entry).expect("a logged entry decodes"));
            let after: std::collections::BTreeMap<_, _> = hostile::jobs_json(&state).into_iter().collect();
            for (id, json) in foreign {
                prop_assert_eq!(after.get(&id), Some(&json), "{} changed {}", reporter, id);
            }
        }
        prop_assert_eq!(State::from_snapshot(&state.to_snapshot()).expect("decodes"), state);
    }
}

#[test]
fn a_command_that_would_not_decode_is_never_logged() {
    let artifact = ModelArtifact {
        artifact_uri: "file:///s/m".into(),
        dataset_sha256: String::new(),
        shape: ModelShape { features_per_row: 4, classes: 3, feature_scale: f32::NAN },
    };
    let finished = Command::JobFinished {
        job_id: JobId(1),
        generation: 1,
        success: true,
        reason: String::new(),
        step: 1,
        metrics: None,
        artifact: Some(artifact),
        reporter: None,
    };
    let refused = Envelope::new(1, finished).encode().expect_err("NaN is not JSON");
    assert!(matches!(refused, SnapshotError::Unrepresentable(_)), "{refused}");
}

#[test]
fn finished_records_are_forgotten_and_the_job_limit_never_locks_submissions_out() {
    let (mut state, _) = cluster();
    // job-1 trained the model (Succeeded, updated at t=4); job-3 and job-4 run.
    let lost = register(&mut state, 30);
    at(&mut state, 31, Command::WorkerLost { worker_id: lost, last_step_seen: 0, last_heard_unix_ms: 0 })
        .expect("lost");
    let before = at(&mut state, 40, Command::ForgetFinished { before_unix_ms: 35 });
    assert_eq!(before, Ok(Applied::Forgotten { jobs: 1, workers: 1 }));
    assert!(!state.jobs.contains_key(&JobId(1)) && state.jobs.contains_key(&JobId(3)), "running jobs stay");
    assert!(!state.request_ids.values().any(|j| *j == JobId(1)), "its request id is gone too");
    assert!(!state.workers.contains_key(&lost));
    assert!(state.models.contains_key("m"), "the model registry keeps its versions");
    assert_eq!(
        at(&mut state, 41, Command::ForgetFinished { before_unix_ms: 35 }),
        Ok(Applied::Forgotten { jobs: 0, workers: 0 })
    );

    // At the limit: the oldest finished record makes room; with none, the limit refuses.
    let mut full = State::default();
    for i in 0..JOBS_MAX as u64 {
        submit(&mut full, i + 1, &format!("r{i}")).expect("room");
    }
    let refused = submit(&mut full, 200_000, "one-more");
    assert_eq!(refused, Err(Rejected::TooManyJobs { limit: JOBS_MAX }), "every job is unfinished");
    at(&mut full, 200_001, Command::CancelJob { job_id: JobId(7), reason: String::new() }).expect("cancel");
    at(&mut full, 200_002, Command::CancelJob { job_id: JobId(5), reason: String::new() }).expect("cancel");
    let admitted = submit(&mut full, 200_003, "one-more").expect("the oldest finished job made room");
    assert!(matches!(admitted, Applied::JobSubmitted { duplicate: false, .. }));
    assert_eq!(full.jobs.len(), JOBS_MAX);
    assert!(!full.jobs.contains_key(&JobId(7)) && full.jobs.contains_key(&JobId(5)), "job-7 finished first");
}

/// Outstanding instance requests are bounded: at the limit a settled one makes room, and with
/// none settled the next is refused with the limit's own words (not the job limit's).
#[test]
fn outstanding_instance_requests_are_bounded_with_their_own_refusal() {
    let mut state = State::default();
    let request = |i: usize| Command::RequestInstances {
        request_id: format!("req-{i}"),
        job: None,
        instance_type: "g5.xlarge".into(),
        zone: "a".into(),
        spot: true,
        count: 1,
        usd_per_hour: 0.5,
    };
    for i in 0..INSTANCE_REQUESTS_MAX {
        at(&mut state, i as u64 + 1, request(i)).expect("room");
    }
    let refused = at(&mut state, 20_000, request(INSTANCE_REQUESTS_MAX)).expect_err("full");
    assert_eq!(refused, Rejected::TooManyInstanceRequests { limit: INSTANCE_REQUESTS_MAX });
    assert!(refused.to_string().starts_with("10000 instance requests are outstanding"), "{refused}");
    let settled = Command::InstancesLaunched { request_id: "req-3".into(), instances: Vec::new() };
    at(&mut state, 20_001, settled).expect("settled");
    at(&mut state, 20_002, request(INSTANCE_REQUESTS_MAX)).expect("the settled request made room");
    assert!(!state.instance_requests.contains_key("req-3"));
}
