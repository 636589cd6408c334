use super::*;
use crate::ids::{JobId, WorkerId};
use crate::spec::JobSpec;

fn spec(name: &str) -> JobSpec {
    JobSpec::from_toml_str(&format!(
        "name = \"{name}\"\nmodel = {{ kind = \"mlp\" }}\ndata = {{ train = \"synthetic:blobs\" }}\nworkers = {{ min = 1 }}\n"
    ))
    .expect("valid spec")
}

pub(super) fn submit(state: &mut State, index: u64, request: &str) -> Result<Applied, Rejected> {
    apply(
        state,
        index,
        Envelope::new(
            1000 + index,
            Command::SubmitJob { spec: Box::new(spec("j")), client_request_id: request.into() },
        ),
    )
}

#[test]
fn submissions_get_dense_ids_and_retries_are_deduplicated() {
    let mut state = State::default();
    assert_eq!(submit(&mut state, 1, "a"), Ok(Applied::JobSubmitted { job_id: JobId(1), duplicate: false }));
    assert_eq!(submit(&mut state, 2, "b"), Ok(Applied::JobSubmitted { job_id: JobId(2), duplicate: false }));
    assert_eq!(submit(&mut state, 3, "a"), Ok(Applied::JobSubmitted { job_id: JobId(1), duplicate: true }));
    assert_eq!(state.jobs.len(), 2);
    let job = &state.jobs[&JobId(2)];
    assert_eq!((job.state, job.submitted_at_unix_ms, job.submitted_index), (JobState::Pending, 1002, 2));
    assert_eq!(submit(&mut state, 4, ""), Err(Rejected::BadRequestId));
    assert_eq!(submit(&mut state, 5, &"x".repeat(CLIENT_REQUEST_ID_LEN_MAX + 1)), Err(Rejected::BadRequestId));
}

#[test]
fn cancel_moves_unfinished_jobs_only() {
    let mut state = State::default();
    submit(&mut state, 1, "a").expect("submit");
    let cancel = |state: &mut State, id| {
        apply(state, 9, Envelope::new(5, Command::CancelJob { job_id: JobId(id), reason: String::new() }))
    };
    assert_eq!(cancel(&mut state, 1), Ok(Applied::JobCancelled { job_id: JobId(1) }));
    assert_eq!(state.jobs[&JobId(1)].state, JobState::Cancelled);
    assert_eq!(state.jobs[&JobId(1)].events.len(), 1);
    assert_eq!(cancel(&mut state, 1), Err(Rejected::JobFinished { job_id: JobId(1), state: "Cancelled" }));
    assert_eq!(cancel(&mut state, 7), Err(Rejected::JobNotFound(JobId(7))));
}

/// A local worker's registration details.
fn local_worker_info() -> WorkerInfo {
    WorkerInfo {
        cpus: 2,
        gpus: 0,
        memory_bytes: 1 << 30,
        instance_id: "local-1".into(),
        instance_type: "local".into(),
        zone: "local".into(),
        hostname: "h".into(),
        data_addr: "127.0.0.1:9000".into(),
    }
}

#[test]
fn workers_register_and_are_lost() {
    let mut state = State::default();
    let info = local_worker_info();
    let registered =
        apply(&mut state, 1, Envelope::new(10, Command::RegisterWorker { info, credential_sha256: String::new() }));
    assert_eq!(registered, Ok(Applied::WorkerRegistered { worker_id: WorkerId(1) }));
    let lost = apply(
        &mut state,
        2,
        Envelope::new(20, Command::WorkerLost { worker_id: WorkerId(1), last_step_seen: 0, last_heard_unix_ms: 0 }),
    );
    assert_eq!(lost, Ok(Applied::WorkerLost { worker_id: WorkerId(1) }));
    assert_eq!(state.workers[&WorkerId(1)].lost_at_unix_ms, Some(20));
    let unknown = apply(
        &mut state,
        3,
        Envelope::new(30, Command::WorkerLost { worker_id: WorkerId(9), last_step_seen: 0, last_heard_unix_ms: 0 }),
    );
    assert_eq!(unknown, Err(Rejected::WorkerNotFound(WorkerId(9))));
}

#[test]
fn a_worker_has_one_condition_whichever_fields_are_set() {
    let mut state = State::default();
    let info = local_worker_info();
    apply(&mut state, 1, Envelope::new(10, Command::RegisterWorker { info, credential_sha256: String::new() }))
        .expect("registered");
    let mut worker = state.workers[&WorkerId(1)].clone();
    let now = 50_000;
    assert_eq!(worker.condition(now), WorkerCondition::Idle);
    worker.job = Some(JobId(1));
    assert_eq!(worker.condition(now), WorkerCondition::Busy);
    // A suspect reads as one, busy or not, until the leader records that it heard from it.
    worker.suspect_since_unix_ms = Some(40_000);
    assert_eq!(worker.condition(now), WorkerCondition::Suspect);
    worker.job = None;
    assert_eq!(worker.condition(now), WorkerCondition::Suspect);
    // Held out as unreachable only while the hold lasts, and only when free.
    worker.unreachable_until_unix_ms = now + 1;
    assert_eq!(worker.condition(now), WorkerCondition::Unreachable);
    assert_eq!(worker.condition(now + 1), WorkerCondition::Suspect);
    worker.draining = true;
    assert_eq!(worker.condition(now), WorkerCondition::Draining);
    worker.lost_at_unix_ms = Some(now);
    assert_eq!(worker.condition(now), WorkerCondition::Lost);
    worker.left = true;
    assert_eq!(worker.condition(now), WorkerCondition::Left);
    let names: Vec<&str> = WorkerCondition::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(names, ["idle", "busy", "draining", "suspect", "unreachable", "lost", "left"]);
}

#[test]
fn snapshots_and_envelopes_round_trip_and_refuse_newer_versions() {
    let mut state = State::default();
    submit(&mut state, 1, "a").expect("submit");
    let restored = State::from_snapshot(&state.to_snapshot()).expect("decodes");
    assert_eq!(restored, state);
    assert_eq!(State::from_snapshot(&[]).expect("empty is the initial state"), State::default());
    assert!(State::from_snapshot(b"{not json").is_err());
    let mut newer = state.clone();
    newer.version = STATE_VERSION + 1;
    assert!(matches!(State::from_snapshot(&newer.to_snapshot()), Err(SnapshotError::TooNew { .. })));

    let envelope = Envelope::new(7, Command::CancelJob { job_id: JobId(3), reason: "r".into() });
    assert_eq!(Envelope::decode(&envelope.encode().expect("encodes")).expect("decodes"), envelope);
    assert!(Envelope::decode(b"\x00\x01").is_err());
    // Older versions' entries and snapshots still apply; newer ones are refused.
    let older = Envelope { version: 1, ..envelope.clone() };
    assert_eq!(Envelope::decode(&serde_json::to_vec(&older).expect("json")).expect("decodes"), older);
    let newer = Envelope { version: STATE_VERSION + 1, ..envelope };
    let refused = Envelope::decode(&serde_json::to_vec(&newer).expect("json"));
    assert!(matches!(refused, Err(SnapshotError::TooNew { .. })), "{refused:?}");
    let mut older = state.clone();
    older.version = 1;
    let loaded = State::from_snapshot(&older.to_snapshot()).expect("decodes");
    assert_eq!(loaded, state, "loaded as this build's state (its next snapshot has this version)");
}

#[test]
fn the_same_commands_give_the_same_state() {
    let run = || {
        let mut state = State::default();
        for i in 0..50u64 {
            let _ = submit(&mut state, i + 1, &format!("r{}", i % 17));
            if i % 5 == 0 {
                let _ = apply(
                    &mut state,
                    i + 1,
                    Envelope::new(i, Command::CancelJob { job_id: JobId(i / 3 + 1), reason: "x".into() }),
                );
            }
        }
        state.to_snapshot()
    };
    assert_eq!(run(), run());
}

pub(super) fn register(state: &mut State, index: u64) -> WorkerId {
    let info = WorkerInfo {
        cpus: 2,
        gpus: 0,
        memory_bytes: 0,
        instance_id: format!("i-{index}"),
        instance_type: "local".into(),
        zone: "local".into(),
        hostname: "h".into(),
        data_addr: "127.0.0.1:1".into(),
    };
    match apply(state, index, Envelope::new(index, Command::RegisterWorker { info, credential_sha256: String::new() }))
    {
        Ok(Applied::WorkerRegistered { worker_id }) => worker_id,
        other => panic!("register: {other:?}"),
    }
}

#[test]
fn a_gang_runs_finishes_and_frees_its_workers() {
    let mut state = State::default();
    submit(&mut state, 1, "a").expect("submit");
    let (w1, w2) = (register(&mut state, 2), register(&mut state, 3));
    let assign = |state: &mut State, workers: Vec<WorkerId>| {
        apply(state, 4, Envelope::new(4, Command::AssignGang { job_id: JobId(1), workers }))
    };
    assert_eq!(assign(&mut state, vec![w1, w1]), Err(Rejected::BadGang { limit: 1024 }));
    assert_eq!(assign(&mut state, vec![w1, w2]), Ok(Applied::GangAssigned { job_id: JobId(1), generation: 1 }));
    assert_eq!(state.jobs[&JobId(1)].state, JobState::Running);
    assert_eq!(state.workers[&w1].job, Some(JobId(1)));
    assert!(matches!(assign(&mut state, vec![w1, w2]), Err(Rejected::NotPending { .. })));

    let finish = |generation| Command::JobFinished {
        job_id: JobId(1),
        generation,
        success: true,
        reason: String::new(),
        step: 192,
        metrics: Some(FinalMetrics { val_accuracy: Some(0.92), val_loss: Some(0.3), train_loss: None, val_step: 0 }),
        artifact: None,
        reporter: None,
    };
    assert!(matches!(apply(&mut state, 5, Envelope::new(5, finish(7))), Err(Rejected::StaleGeneration { .. })));
    assert_eq!(apply(&mut state, 6, Envelope::new(6, finish(1))), Ok(Applied::JobFinished { job_id: JobId(1) }));
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.state, job.step, job.world_size), (JobState::Succeeded, 192, 2));
    assert_eq!(job.metrics.and_then(|m| m.val_accuracy), Some(0.92));
    assert!(state.workers.values().all(|w| w.job.is_none()), "workers are free again");
}

/// Warm spares: free workers in id order go to the running jobs with `capacity.spares` in their
/// gang's pool, the lowest job id first, each up to its count; the rest are nobody's spare (so
/// rank 0 pushes each checkpoint to `spares` workers, not to every free worker in the pool).
#[test]
fn each_job_gets_at_most_its_spares_of_the_free_workers_in_its_pool() {
    let mut state = State::default();
    let spared = |name: &str, spares: u32| Command::SubmitJob {
        spec: Box::new(
            JobSpec::from_toml_str(&format!(
                "name = \"{name}\"\nmodel = {{ kind = \"mlp\" }}\ndata = {{ train = \"synthetic:blobs\" }}\n\
                 workers = {{ min = 1, max = 1 }}\ncapacity = {{ spares = {spares} }}\n"
            ))
            .expect("spec"),
        ),
        client_request_id: name.into(),
    };
    for (index, (name, spares)) in [("a", 1), ("b", 2), ("c", 0)].into_iter().enumerate() {
        apply(&mut state, index as u64 + 1, Envelope::new(1, spared(name, spares))).expect("submit");
    }
    let workers: Vec<WorkerId> = (10..18).map(|index| register(&mut state, index)).collect();
    // Another pool's free worker, lowest id of the free ones: not in any gang's pool.
    state.workers.get_mut(&workers[3]).expect("worker").info.zone = "elsewhere".into();
    for (job, member) in [(1, workers[0]), (2, workers[1]), (3, workers[2])] {
        let assign = Command::AssignGang { job_id: JobId(job), workers: vec![member] };
        apply(&mut state, 20 + job, Envelope::new(20, assign)).expect("assign");
    }
    let free = &workers[4..];
    let expected = vec![(free[0], JobId(1)), (free[1], JobId(2)), (free[2], JobId(2))];
    assert_eq!(warm_spares(&state), expected);
    assert_eq!((spares_of(&state, JobId(2)), spares_of(&state, JobId(3))), (vec![free[1], free[2]], vec![]));
    assert_eq!(spare_for(&state, free[0]).map(|j| j.id), Some(JobId(1)));
    assert_eq!(spare_for(&state, free[2]).map(|j| j.id), Some(JobId(2)));
    assert!(spare_for(&state, free[3]).is_none(), "beyond every job's spares: nobody's");
    assert!(spare_for(&state, workers[3]).is_none(), "not in a gang's pool");
    assert!(spare_for(&state, workers[0]).is_none(), "a member is no spare");
    // A notice for job 2's member: its own spare replaces it, not job 1's (a lower id).
    let mut noticed = state.clone();
    noticed.workers.get_mut(&workers[3]).expect("worker").lost_at_unix_ms = Some(1);
    let notice =
        Command::WorkerInterrupted { worker_id: workers[1], kind: "spot".into(), action_at_unix_ms: Some(130_000) };
    apply(&mut noticed, 25, Envelope::new(10_000, notice)).expect("notice");
    assert_eq!(noticed.jobs[&JobId(2)].reserved_replacements().collect::<Vec<_>>(), [free[1]]);
    // Job 1 ends: its spare goes to job 2 (lowest id first), which then has its two.
    let finish = Command::JobFinished {
        job_id: JobId(1),
        generation: 1,
        success: false,
        reason: "x".into(),
        step: 0,
        metrics: None,
        artifact: None,
        reporter: None,
    };
    let mut unrecorded = state.clone();
    apply(&mut unrecorded, 30, Envelope::new(30, finish.clone())).expect("finish");
    assert_eq!(warm_spares(&unrecorded), vec![(workers[0], JobId(2)), (free[0], JobId(2))]);
    // Once job 2's spares said they hold its state, they stay its spares: a worker freed with a
    // lower id does not displace them. A busy worker, or a job without spares, is skipped.
    let holding = Command::SparesHolding {
        workers: vec![(free[1], JobId(2)), (free[2], JobId(2)), (workers[0], JobId(2)), (free[3], JobId(3))],
    };
    assert_eq!(apply(&mut state, 29, Envelope::new(29, holding)), Ok(Applied::SparesHolding { set: 2 }));
    assert_eq!(state.workers[&free[1]].held_state, HeldState::Job(JobId(2)));
    apply(&mut state, 30, Envelope::new(30, finish)).expect("finish");
    assert_eq!(warm_spares(&state), vec![(free[1], JobId(2)), (free[2], JobId(2))]);
    let too_many = Command::SparesHolding { workers: vec![(free[1], JobId(2)); WORKERS_HEARD_PER_COMMAND_MAX + 1] };
    assert!(apply(&mut state, 31, Envelope::new(31, too_many)).is_err());
}

/// The running index names exactly the running jobs to its readers, through starts, ends,
/// cancellations and a snapshot's restore, while most jobs held wait in the queue.
#[test]
fn the_running_jobs_are_read_from_the_index_through_starts_ends_and_restores() {
    let mut state = State::default();
    for i in 1..=50 {
        submit(&mut state, i, &format!("r{i}")).expect("submit");
    }
    let workers: Vec<WorkerId> = (0..4).map(|i| register(&mut state, 100 + i)).collect();
    let running = |state: &State| state.running_jobs().map(|j| j.id.0).collect::<Vec<_>>();
    assert!(running(&state).is_empty());
    let assign = |state: &mut State, job: u64, workers: Vec<WorkerId>| {
        apply(state, 200 + job, Envelope::new(200 + job, Command::AssignGang { job_id: JobId(job), workers }))
            .expect("assign")
    };
    assign(&mut state, 7, vec![workers[0]]);
    assign(&mut state, 3, vec![workers[1], workers[2]]);
    assert_eq!(running(&state), [3, 7]);
    let cancel = Command::CancelJob { job_id: JobId(7), reason: String::new() };
    apply(&mut state, 300, Envelope::new(300, cancel)).expect("cancel");
    assert_eq!(running(&state), [3], "a cancelled job is no longer read as running");
    assign(&mut state, 40, vec![workers[0]]);
    assert_eq!(running(&state), [3, 40]);
    assert_eq!(state.running.0.len(), 2, "a start prunes the jobs that stopped");
    let restored = State::from_snapshot(&state.to_snapshot()).expect("restore");
    assert_eq!(running(&restored), [3, 40], "a restored state rebuilds its index");
    assert_eq!(restored, state);
}

#[test]
fn losing_a_gang_member_requeues_the_job_and_cancel_frees_workers() {
    let mut state = State::default();
    submit(&mut state, 1, "a").expect("submit");
    let (w1, w2) = (register(&mut state, 2), register(&mut state, 3));
    apply(&mut state, 4, Envelope::new(4, Command::AssignGang { job_id: JobId(1), workers: vec![w1, w2] }))
        .expect("assign");
    // Its lease expired 5 s after the leader last heard from it: the survivor is asked for the
    // state it holds first, and the event says when the member fell silent.
    let lost = Command::WorkerLost { worker_id: w2, last_step_seen: 0, last_heard_unix_ms: 1 };
    apply(&mut state, 5, Envelope::new(5_001, lost)).expect("lost");
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.state, job.member_lost.as_ref().map(|m| m.worker)), (JobState::Running, Some(w2)));
    let event = job.events.last().expect("event");
    assert_eq!((event.kind.as_str(), event.at_unix_ms, event.since_unix_ms), ("member_lost", 5_001, Some(1)));
    assert!(event.message.contains("(its lease expired; last heard 5000 ms before)"), "{}", event.message);
    // It does not report in time: the leader ends the generation.
    let stale = Command::GangLost { job_id: JobId(1), generation: 2 };
    assert!(matches!(apply(&mut state, 6, Envelope::new(6, stale)), Err(Rejected::StaleGeneration { .. })));
    apply(&mut state, 6, Envelope::new(6, Command::GangLost { job_id: JobId(1), generation: 1 })).expect("gang lost");
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.state, job.recoveries, job.member_lost.is_none()), (JobState::Pending, 1, true));
    assert!(job.reason.contains("worker-2 was lost"), "{}", job.reason);
    assert_eq!(state.workers[&w1].job, None, "the survivor is freed");
    let busy = apply(&mut state, 6, Envelope::new(6, Command::AssignGang { job_id: JobId(1), workers: vec![w2] }));
    assert_eq!(busy, Err(Rejected::WorkerUnavailable(w2)), "a lost worker is never assigned");

    apply(&mut state, 7, Envelope::new(7, Command::AssignGang { job_id: JobId(1), workers: vec![w1] }))
        .expect("assign");
    apply(&mut state, 8, Envelope::new(8, Command::CancelJob { job_id: JobId(1), reason: String::new() }))
        .expect("cancel");
    assert_eq!(state.workers[&w1].job, None, "cancel frees the gang");
    let reason = Command::SetPendingReason { job_id: JobId(1), reason: "x".into() };
    assert!(matches!(apply(&mut state, 9, Envelope::new(9, reason)), Err(Rejected::NotPending { .. })));
}

#[test]
fn one_command_sets_the_reasons_of_a_pass_and_skips_jobs_no_longer_pending() {
    let mut state = State::default();
    submit(&mut state, 1, "a").expect("submit");
    submit(&mut state, 2, "b").expect("submit");
    apply(&mut state, 3, Envelope::new(3, Command::CancelJob { job_id: JobId(2), reason: String::new() }))
        .expect("cancel");
    let cancelled_reason = state.jobs[&JobId(2)].reason.clone();
    let reasons = vec![(JobId(1), "waiting for 2".to_string()), (JobId(2), "stale".into()), (JobId(9), "gone".into())];
    let applied = apply(&mut state, 4, Envelope::new(4, Command::SetPendingReasons { reasons }));
    assert_eq!(applied, Ok(Applied::ReasonsSet { set: 1 }));
    assert_eq!(state.jobs[&JobId(1)].reason, "waiting for 2");
    assert_eq!(state.jobs[&JobId(2)].reason, cancelled_reason, "a cancelled job keeps its reason");
    let too_many = vec![(JobId(1), String::new()); PENDING_REASONS_PER_COMMAND_MAX + 1];
    let refused = apply(&mut state, 5, Envelope::new(5, Command::SetPendingReasons { reasons: too_many }));
    assert!(matches!(refused, Err(Rejected::BadReport(ref why)) if why.contains("at most 1024")), "{refused:?}");
    assert_eq!(state.jobs[&JobId(1)].reason, "waiting for 2", "a refused batch changes nothing");
}

/// Users see a waiting job as `Pending` until instances are on their way for it
/// (`Provisioning`: a request out, then instances booting), `Pending` again once their workers
/// have registered (or the launch failed), and `Recovering` once it has trained and waits to
/// resume; the scheduler sees `Pending` throughout.
#[test]
fn a_waiting_job_is_shown_pending_provisioning_or_recovering() {
    let mut state = State::default();
    submit(&mut state, 1, "a").expect("submit");
    let job = JobId(1);
    let shown = |state: &State| {
        let one = state.shown_state(&state.jobs[&job]);
        assert_eq!(one, state.shown_states().of(&state.jobs[&job]), "read alone or with others");
        one
    };
    assert_eq!(shown(&state), JobState::Pending);
    let request = |request_id: &str, for_job: Option<JobId>| Command::RequestInstances {
        request_id: request_id.into(),
        job: for_job,
        instance_type: "g5.xlarge".into(),
        zone: "a".into(),
        spot: true,
        count: 2,
        usd_per_hour: 0.5,
    };
    // Capacity bought for no job in particular says nothing of this one.
    at(&mut state, 2, request("req-0", None)).expect("request");
    assert_eq!(shown(&state), JobState::Pending);
    at(&mut state, 3, request("req-1", Some(job))).expect("request");
    assert_eq!(shown(&state), JobState::Provisioning, "a request is out for it");
    let instances = ["i-5", "i-6"].map(|id| LaunchedInstance { id: id.into(), zone: "a".into(), spot: true }).to_vec();
    at(&mut state, 4, Command::InstancesLaunched { request_id: "req-1".into(), instances }).expect("launched");
    assert_eq!(shown(&state), JobState::Provisioning, "its instances boot");
    let w1 = register(&mut state, 5);
    assert_eq!(shown(&state), JobState::Provisioning, "one instance still boots");
    let w2 = register(&mut state, 6);
    assert_eq!(shown(&state), JobState::Pending, "every worker bought for it registered");
    // A request that fails leaves nothing on its way.
    at(&mut state, 7, request("req-2", Some(job))).expect("request");
    assert_eq!(shown(&state), JobState::Provisioning);
    let failed = Command::LaunchFailed { request_id: "req-2".into(), reason: "no capacity".into(), capacity: true };
    at(&mut state, 8, failed).expect("failed");
    assert_eq!(shown(&state), JobState::Pending);
    at(&mut state, 9, Command::AssignGang { job_id: job, workers: vec![w1, w2] }).expect("assign");
    assert_eq!(shown(&state), JobState::Running);
    // It trained; a member is lost: it waits to resume, as Pending for the scheduler.
    at(&mut state, 10, Command::WorkerLost { worker_id: w2, last_step_seen: 0, last_heard_unix_ms: 0 }).expect("lost");
    at(&mut state, 11, Command::GangLost { job_id: job, generation: 1 }).expect("gang lost");
    assert_eq!(state.jobs[&job].state, JobState::Pending);
    assert_eq!(shown(&state), JobState::Recovering);
    // Capacity bought for it meanwhile does not hide that it is recovering.
    at(&mut state, 12, request("req-3", Some(job))).expect("request");
    assert_eq!(shown(&state), JobState::Recovering);
    at(&mut state, 13, Command::CancelJob { job_id: job, reason: String::new() }).expect("cancel");
    assert_eq!(shown(&state), JobState::Cancelled);
}

#[test]
fn recorded_checkpoints_only_move_forward() {
    let mut state = State::default();
    submit(&mut state, 1, "a").expect("submit");
    let record = |step| CheckpointRecord {
        step,
        uri: format!("file:///store/jobs/job-1/ckpt/{step:012}"),
        size_bytes: 10,
        manifest_sha256: "ab".into(),
        epoch: 0,
        global_sample_offset: step * 64,
        generation: 1,
        deleting: false,
        pending: false,
        writer: None,
    };
    let recorded = apply(
        &mut state,
        2,
        Envelope::new(2, Command::RecordCheckpoint { job_id: JobId(1), checkpoint: record(40), reporter: None }),
    );
    assert_eq!(recorded, Ok(Applied::CheckpointRecorded { job_id: JobId(1), step: 40 }));
    let older = apply(
        &mut state,
        3,
        Envelope::new(3, Command::RecordCheckpoint { job_id: JobId(1), checkpoint: record(20), reporter: None }),
    );
    assert_eq!(
        older.map_err(|e| e.to_string()),
        Err("job-1 has a recorded checkpoint of step 40 already; this one is of step 20, not newer".into()),
        "an older checkpoint never replaces a newer one, and the refusal says why"
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.step, job.latest_checkpoint.as_ref().map(|c| c.step)), (40, Some(40)));
}

fn running_job(state: &mut State, max_failures: u32) -> (WorkerId, WorkerId) {
    let mut job_spec = spec("j");
    job_spec.capacity.max_failures = max_failures;
    apply(state, 1, Envelope::new(1, Command::SubmitJob { spec: Box::new(job_spec), client_request_id: "r".into() }))
        .expect("submit");
    let (w1, w2) = (register(state, 2), register(state, 3));
    apply(state, 4, Envelope::new(4, Command::AssignGang { job_id: JobId(1), workers: vec![w1, w2] })).expect("assign");
    (w1, w2)
}

/// A written checkpoint of job 1 at `step` by `generation`, whose manifest hashes to `sha`.
fn checkpoint_record(step: u64, generation: u64, sha: &str) -> CheckpointRecord {
    CheckpointRecord {
        step,
        uri: format!("file:///s/ckpt/{step:012}-g{generation}"),
        size_bytes: 10,
        manifest_sha256: sha.into(),
        epoch: 0,
        global_sample_offset: step * 64,
        generation,
        deleting: false,
        pending: false,
        writer: None,
    }
}

fn checkpoint(state: &mut State, step: u64, generation: u64) -> Result<Applied, Rejected> {
    let checkpoint = checkpoint_record(step, generation, "ab");
    apply(
        state,
        10 + step,
        Envelope::new(10 + step, Command::RecordCheckpoint { job_id: JobId(1), checkpoint, reporter: None }),
    )
}

fn end(state: &mut State, generation: u64, end: GenerationEnd, step: u64) -> Result<Applied, Rejected> {
    apply(
        state,
        500,
        Envelope::new(
            500,
            Command::GenerationEnded { job_id: JobId(1), generation, end, step, reporter: None, announced: None },
        ),
    )
}

#[test]
fn a_notice_orders_a_checkpoint_and_the_generation_ends_without_loss() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    let notice =
        |at: u64| Command::WorkerInterrupted { worker_id: w2, kind: "spot".into(), action_at_unix_ms: Some(at) };
    // Less than HANDOVER_LEAD_MIN_MS to spare: no handover, checkpoint now.
    assert_eq!(
        apply(&mut state, 5, Envelope::new(5, notice(30_000))),
        Ok(Applied::WorkerInterrupted { worker_id: w2, job: Some(JobId(1)), handover_until: None, advisory: false })
    );
    assert_eq!(state.jobs[&JobId(1)].checkpoint_requested, Some(StopReason::Preemption));
    // The notice's time is the gang's deadline; a repeated notice never moves it later.
    assert_eq!(state.workers[&w2].notice_action_at_unix_ms, Some(30_000));
    apply(&mut state, 6, Envelope::new(6, notice(50_000))).expect("a repeated notice");
    assert_eq!(state.workers[&w2].notice_action_at_unix_ms, Some(30_000));
    let event = state.jobs[&JobId(1)].events.iter().rev().find(|e| e.kind == "preemption_notice").expect("event");
    assert!(event.message.contains("taken at 1970-01-01T00:00:30Z"), "{}", event.message);
    checkpoint(&mut state, 37, 1).expect("checkpoint");
    assert_eq!(
        end(&mut state, 1, GenerationEnd::Checkpointed, 37),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Pending })
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.preemptions, job.steps_lost, job.failures, job.recoveries), (1, 0, 0, 0));
    assert_eq!(job.checkpoint_requested, None);
    assert!(state.workers.values().all(|w| w.suspect_since_unix_ms.is_none()), "an orderly stop suspects nobody");
    assert!(state.workers[&w2].draining && state.workers[&w2].job.is_none());
    assert!(matches!(end(&mut state, 1, GenerationEnd::Checkpointed, 37), Err(Rejected::NotRunning { .. })));
    // The draining worker is never given new work; the other one is.
    let again = |state: &mut State, workers| {
        apply(state, 600, Envelope::new(600, Command::AssignGang { job_id: JobId(1), workers }))
    };
    assert_eq!(again(&mut state, vec![w2]), Err(Rejected::WorkerUnavailable(w2)));
    assert_eq!(again(&mut state, vec![w1]), Ok(Applied::GangAssigned { job_id: JobId(1), generation: 2 }));
}

#[test]
fn a_job_stopped_for_a_higher_priority_checkpoints_and_waits_with_its_workers_free() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    let mut submit_with = |index: u64, priority: i32| {
        let mut job_spec = spec("other");
        job_spec.priority = priority;
        let submit = Command::SubmitJob { spec: Box::new(job_spec), client_request_id: format!("r{index}") };
        apply(&mut state, index, Envelope::new(index, submit)).expect("submit");
    };
    submit_with(5, 0); // job 2: as high as job 1
    submit_with(6, 7); // job 3: higher
    let preempt = |state: &mut State, for_job: u64, generation: u64| {
        let command = Command::PreemptForPriority { job_id: JobId(1), generation, for_job: JobId(for_job) };
        apply(state, 7, Envelope::new(7, command))
    };
    let not_lower = Rejected::PriorityNotLower { job_id: JobId(1), priority: 0, for_job: JobId(2), for_priority: 0 };
    assert_eq!(preempt(&mut state, 2, 1), Err(not_lower));
    assert!(matches!(preempt(&mut state, 3, 2), Err(Rejected::StaleGeneration { .. })));
    assert!(matches!(preempt(&mut state, 9, 1), Err(Rejected::JobNotFound(_))));
    assert_eq!(preempt(&mut state, 3, 1), Ok(Applied::CheckpointRequested { job_id: JobId(1) }));
    let job = &state.jobs[&JobId(1)];
    assert_eq!(job.checkpoint_requested, Some(StopReason::Priority));
    let event = job.events.last().expect("an event");
    assert_eq!(event.kind, "priority");
    assert!(event.message.starts_with("job-3 (priority 7) waits for workers this job (priority 0) holds"), "{event:?}");
    assert!(!event.stops_for_a_loss(), "not a loss: no recovery is timed for it");
    // A second order (another pass) changes nothing.
    assert_eq!(preempt(&mut state, 3, 1), Ok(Applied::CheckpointRequested { job_id: JobId(1) }));
    assert_eq!(state.jobs[&JobId(1)].events.iter().filter(|e| e.kind == "priority").count(), 1);
    checkpoint(&mut state, 37, 1).expect("checkpoint");
    assert_eq!(
        end(&mut state, 1, GenerationEnd::Checkpointed, 37),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Pending })
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.preemptions, job.steps_lost, job.failures, job.recoveries), (0, 0, 0, 0), "not a spot preemption");
    assert_eq!(job.reason, "priority: waiting for workers to resume from step 37");
    assert_eq!(job.stopped_for(), Some(JobId(3)));
    for w in [w1, w2] {
        let worker = &state.workers[&w];
        assert!(worker.job.is_none() && !worker.draining && worker.suspect_since_unix_ms.is_none(), "{worker:?}");
    }
    // Once the waiting job runs, it is no longer stopped for.
    apply(&mut state, 8, Envelope::new(8, Command::AssignGang { job_id: JobId(3), workers: vec![w1, w2] }))
        .expect("assign");
    let not_pending = Rejected::NotPending { job_id: JobId(3), state: "Running" };
    assert_eq!(preempt(&mut state, 3, 1), Err(not_pending));
    assert_eq!(state.jobs[&JobId(1)].stopped_for(), Some(JobId(3)), "it still waits for job 3's workers");
    // Resumed: it no longer waits for anything.
    let w3 = register(&mut state, 9);
    apply(&mut state, 10, Envelope::new(10, Command::AssignGang { job_id: JobId(1), workers: vec![w3] }))
        .expect("assign");
    assert_eq!(state.jobs[&JobId(1)].stopped_for(), None);
}

fn spot_notice(worker_id: WorkerId, at: u64) -> Command {
    Command::WorkerInterrupted { worker_id, kind: "spot".into(), action_at_unix_ms: Some(at) }
}

#[test]
fn a_notice_with_time_to_spare_hands_the_rank_to_a_free_worker_at_a_step_boundary() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    let spare = register(&mut state, 5);
    // Two minutes' notice at t = 10 s: a handover, the free worker reserved at once.
    assert_eq!(
        at(&mut state, 10_000, spot_notice(w2, 130_000)),
        Ok(Applied::WorkerInterrupted {
            worker_id: w2,
            job: Some(JobId(1)),
            handover_until: Some(85_000),
            advisory: false
        })
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!(job.checkpoint_requested, None, "the gang trains on while the replacement prepares");
    let [handover] = job.handovers.clone().try_into().expect("one handover");
    assert_eq!((handover.leaving, handover.replacement, handover.fallback_at_unix_ms), (w2, Some(spare), 85_000));
    assert_eq!(handover.reserved_at_unix_ms, 10_000);
    assert!(state.workers[&spare].job.is_none(), "reserved by the handover, not assigned yet");
    // Ready (the leader read its report): the gang checkpoints at the next step, once.
    let ready = Command::HandoverReady { job_id: JobId(1), generation: 1, live: false };
    assert_eq!(
        at(&mut state, 11_000, ready.clone()),
        Ok(Applied::HandoverStarted { job_id: JobId(1), replacement: spare, live: false })
    );
    assert_eq!(state.jobs[&JobId(1)].checkpoint_requested, Some(StopReason::Handover));
    assert_eq!(at(&mut state, 11_001, ready), Err(Rejected::NoHandover { job_id: JobId(1) }));
    checkpoint(&mut state, 30, 1).expect("checkpoint");
    assert_eq!(
        at(
            &mut state,
            12_000,
            Command::GenerationEnded {
                job_id: JobId(1),
                generation: 1,
                end: GenerationEnd::Checkpointed,
                step: 30,
                reporter: None,
                announced: None,
            }
        ),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Running })
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.generation, job.gang.clone()), (2, vec![w1, spare]), "the replacement takes rank 1");
    assert_eq!((job.preemptions, job.steps_lost, job.recoveries, job.handovers.clone()), (1, 0, 0, vec![]));
    assert_eq!(job.generation_start_step, 30);
    let event = job.events.iter().rev().find(|e| e.kind == "handover").expect("event");
    assert!(event.message.contains("2000 ms after the notice"), "{}", event.message);
    assert!(state.workers[&w2].job.is_none() && state.workers[&w2].draining);
    assert_eq!(state.workers[&spare].job, Some(JobId(1)));
}

/// `job_id`'s generation 1 broke at step 27 (rank 1 lost), as its survivor `reporter` says at `t`.
fn break_reported(state: &mut State, t: u64, job_id: JobId, reporter: WorkerId) {
    let lost = GenerationEnd::PeerLost { reason: "rank 1 was lost".into(), unreachable_rank: None };
    let report = Command::GenerationEnded {
        job_id,
        generation: 1,
        end: lost,
        step: 27,
        reporter: Some(reporter),
        announced: None,
    };
    at(state, t, report).expect("the break");
}

/// A survivor noticed while its job waits (the state of the gang that ended is in its memory)
/// may rejoin the job's next gang, alone among the draining workers and while its notice leaves
/// time for a handover, which the new gang starts with: its replacement is sought at once.
#[test]
fn a_holder_noticed_while_its_job_waits_rejoins_the_next_gang_and_hands_over_from_there() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    break_reported(&mut state, 1_000, JobId(1), w1);
    at(&mut state, 1_100, Command::WorkerLost { worker_id: w2, last_step_seen: 27, last_heard_unix_ms: 900 })
        .expect("lost");
    // Noticed at 2 s, its instance taken at 122 s: it holds the job's state and may rejoin.
    assert_eq!(
        at(&mut state, 2_000, spot_notice(w1, 122_000)),
        Ok(Applied::WorkerInterrupted { worker_id: w1, job: None, handover_until: None, advisory: false })
    );
    assert_eq!(state.workers[&w1].holding_for, Some(JobId(1)));
    assert!(state.workers[&w1].may_rejoin(JobId(1), 62_000) && !state.workers[&w1].may_rejoin(JobId(1), 62_001));
    assert!(!state.workers[&w1].may_rejoin(JobId(2), 2_000), "for its own job alone");
    assert_eq!(
        (state.rejoins(&state.workers[&w1], 2_000), state.rejoins(&state.workers[&w1], 62_001)),
        (Some(JobId(1)), None)
    );
    let event = state.jobs[&JobId(1)].events.last().expect("event").message.clone();
    assert!(event.contains("while the job waits") && event.contains("next gang may take it"), "{event}");
    let (w3, w4) = (register(&mut state, 3_000), register(&mut state, 3_001));
    // Too late for a handover: refused (the leader no longer offers it; it drains).
    let assign = Command::AssignGang { job_id: JobId(1), workers: vec![w1, w3] };
    assert_eq!(at(&mut state.clone(), 62_001, assign.clone()), Err(Rejected::WorkerUnavailable(w1)));
    // In time: the gang forms with it, and it hands over to the free worker, reserved at once.
    assert_eq!(at(&mut state, 5_000, assign), Ok(Applied::GangAssigned { job_id: JobId(1), generation: 2 }));
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.state, job.gang.clone(), job.checkpoint_requested), (JobState::Running, vec![w1, w3], None));
    let [handover] = job.handovers.clone().try_into().expect("one handover");
    assert_eq!(
        (handover.leaving, handover.replacement, handover.fallback_at_unix_ms, handover.reserved_at_unix_ms),
        (w1, Some(w4), 122_000 - HANDOVER_FALLBACK_LEAD_MS, 5_000)
    );
    assert!(job.events.iter().any(|e| e.message.contains(&format!("{w1} rejoins with the state it holds"))));
    assert_eq!(handover.noticed_at_unix_ms, 2_000, "timed from the notice, not from the rejoin");
    assert_eq!((state.workers[&w1].holding_for, state.workers[&w1].draining), (None, true));
    assert_eq!(state.rejoins(&state.workers[&w1], 5_000), None, "it rejoined");
    // A worker in the last gangs of two waiting jobs holds the state of the one it was in last.
    let mut two = State::default();
    let (u1, _) = running_job(&mut two, 3);
    break_reported(&mut two, 1_000, JobId(1), u1);
    at(&mut two, 1_100, Command::SubmitJob { spec: Box::new(spec("second")), client_request_id: "s".into() })
        .expect("submit");
    let u3 = register(&mut two, 1_200);
    at(&mut two, 1_300, Command::AssignGang { job_id: JobId(2), workers: vec![u1, u3] }).expect("assign");
    break_reported(&mut two, 1_400, JobId(2), u1);
    assert!(two.jobs.values().all(|j| j.state == JobState::Pending && j.ended_gang.contains(&u1)));
    at(&mut two, 1_500, spot_notice(u1, 122_000)).expect("notice");
    assert_eq!(two.workers[&u1].holding_for, Some(JobId(2)));
    // Another job that starts fresh on it and finishes leaves it the first job's state (its
    // agent drops only the finished job's); a command job's gang leaves it too.
    let mut since = State::default();
    let (x1, _) = running_job(&mut since, 3);
    break_reported(&mut since, 1_000, JobId(1), x1);
    assert_eq!(since.workers[&x1].held_state, HeldState::Job(JobId(1)));
    at(&mut since, 1_100, Command::SubmitJob { spec: Box::new(spec("second")), client_request_id: "s".into() })
        .expect("submit");
    let x3 = register(&mut since, 1_200);
    at(&mut since, 1_300, Command::AssignGang { job_id: JobId(2), workers: vec![x1, x3] }).expect("assign");
    assert_eq!(
        (since.workers[&x1].held_state, since.workers[&x3].held_state),
        (HeldState::Job(JobId(1)), HeldState::Nothing)
    );
    let mut stopped = since.clone();
    let finished = Command::JobFinished {
        job_id: JobId(2),
        generation: 1,
        success: true,
        reason: String::new(),
        step: 10,
        metrics: None,
        artifact: None,
        reporter: None,
    };
    at(&mut since, 1_400, finished.clone()).expect("finished");
    assert_eq!(since.workers[&x1].held_state, HeldState::Job(JobId(1)));
    let command_spec =
        JobSpec::from_toml_str("name = \"c\"\nworkers = { min = 1 }\n[run]\ncommand = [\"true\"]\n").expect("spec");
    at(&mut since, 1_410, Command::SubmitJob { spec: Box::new(command_spec), client_request_id: "c".into() })
        .expect("submit");
    at(&mut since, 1_420, Command::AssignGang { job_id: JobId(3), workers: vec![x1] }).expect("assign");
    let stop = |job_id| Command::GenerationEnded {
        job_id,
        generation: 1,
        end: GenerationEnd::Checkpointed,
        step: 10,
        reporter: None,
        announced: None,
    };
    at(&mut since, 1_430, stop(JobId(3))).expect("stopped");
    assert_eq!(since.workers[&x1].held_state, HeldState::Job(JobId(1)), "a command job's gang leaves it");
    at(&mut since, 1_500, spot_notice(x1, 122_000)).expect("notice");
    assert_eq!(since.workers[&x1].holding_for, Some(JobId(1)));
    // One the other job stopped on holds that job's state: not held for the first, even once
    // that job is gone.
    at(&mut stopped, 1_400, stop(JobId(2))).expect("stopped");
    assert_eq!(stopped.workers[&x1].held_state, HeldState::Job(JobId(2)));
    at(&mut stopped, 1_450, Command::CancelJob { job_id: JobId(2), reason: String::new() }).expect("cancel");
    assert!(!stopped.workers[&x1].may_hold_state_of(JobId(1)));
    at(&mut stopped, 1_500, spot_notice(x1, 122_000)).expect("notice");
    assert_eq!(stopped.workers[&x1].holding_for, None);
    // A job that resumes from a checkpoint leaves its state with its members; its end, nothing.
    let resumed = stopped.jobs.get_mut(&JobId(1)).expect("job 1");
    resumed.latest_checkpoint = Some(checkpoint_record(27, 1, "ab"));
    let x4 = register(&mut stopped, 1_600);
    at(&mut stopped, 1_700, Command::AssignGang { job_id: JobId(1), workers: vec![x3, x4] }).expect("assign");
    assert_eq!(stopped.workers[&x4].held_state, HeldState::Job(JobId(1)));
    let finished = Command::JobFinished {
        job_id: JobId(1),
        generation: 2,
        success: true,
        reason: String::new(),
        step: 30,
        metrics: None,
        artifact: None,
        reporter: None,
    };
    at(&mut stopped, 1_800, finished).expect("finished");
    assert_eq!(stopped.workers[&x4].held_state, HeldState::Nothing);
    // A member noticed while its gang trained is not held for the next one, whatever a later
    // notice says: it left the gang at the stop and kept no state.
    let mut other = State::default();
    let (v1, _) = running_job(&mut other, 3);
    let sigterm = Command::WorkerInterrupted { worker_id: v1, kind: "SIGTERM".into(), action_at_unix_ms: None };
    at(&mut other, 400, sigterm).expect("notice");
    end(&mut other, 1, GenerationEnd::Checkpointed, 30).expect("stopped");
    assert_eq!(other.jobs[&JobId(1)].state, JobState::Pending);
    at(&mut other, 1_500, spot_notice(v1, 200_000)).expect("a spot notice after");
    assert_eq!(other.workers[&v1].holding_for, None);
    // Nor a member of a command job's gang: its state is in its program, which restarts anyway.
    let mut command = State::default();
    let (c1, c2) = running_job(&mut command, 3);
    command.jobs.get_mut(&JobId(1)).expect("job").spec =
        JobSpec::from_toml_str("name = \"c\"\nworkers = { min = 1 }\n[run]\ncommand = [\"true\"]\n").expect("spec");
    break_reported(&mut command, 1_000, JobId(1), c1);
    assert_eq!(command.jobs[&JobId(1)].ended_gang, [c1, c2]);
    at(&mut command, 2_000, spot_notice(c1, 122_000)).expect("notice");
    assert_eq!(command.workers[&c1].holding_for, None);
}

#[test]
fn a_live_handover_swaps_the_member_in_the_same_generation_or_falls_back_to_the_stop() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    let spare = register(&mut state, 5);
    at(&mut state, 10_000, spot_notice(w2, 130_000)).expect("notice");
    let live = Command::HandoverReady { job_id: JobId(1), generation: 1, live: true };
    assert_eq!(
        at(&mut state, 11_000, live.clone()),
        Ok(Applied::HandoverStarted { job_id: JobId(1), replacement: spare, live: true })
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!(job.checkpoint_requested, None, "a live handover does not stop the gang");
    assert_eq!(job.handovers[0].live_since_unix_ms, 11_000);
    assert_eq!(at(&mut state, 11_001, live), Err(Rejected::NoHandover { job_id: JobId(1) }), "once");
    // The replacement costs 0.5 USD/h (the gang's members, without instance records, nothing).
    let instance = state.workers[&spare].info.instance_id.clone();
    launched(&mut state, 11_500, &instance, false);
    // The replacement reports the swap: same generation, its rank, the leaver released.
    let swapped =
        Command::HandoverSwapped { job_id: JobId(1), generation: 1, replacement: spare, step: 42, peer_bytes: 1000 };
    assert_eq!(
        at(&mut state, 12_000, swapped.clone()),
        Ok(Applied::HandoverSwapped { job_id: JobId(1), leaving: Some(w2) })
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.generation, job.gang.clone(), job.handovers.clone()), (1, vec![w1, spare], vec![]));
    assert_eq!((job.preemptions, job.steps_lost, job.recoveries, job.state), (1, 0, 0, JobState::Running));
    let event = job.events.last().expect("event");
    assert!(event.is_handed_over() && event.message.contains("without a stop"), "{}", event.message);
    assert_eq!((state.workers[&spare].job, state.workers[&w2].job), (Some(JobId(1)), None));
    assert!(state.workers[&w2].draining);
    assert_eq!(state.jobs[&JobId(1)].resume_peer_bytes, 1000, "the transfer, peer to peer");
    // A survivor's clock: the swap's stall, counted once whichever survivor reports first.
    let timed = Command::LiveSwapTimed { job_id: JobId(1), generation: 1, step: 42, stall_ms: 9 };
    assert_eq!(
        at(&mut state, 12_100, timed.clone()),
        Ok(Applied::TrainingResumed { job_id: JobId(1), recorded: true })
    );
    assert_eq!(at(&mut state, 12_101, timed), Ok(Applied::TrainingResumed { job_id: JobId(1), recorded: false }));
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.last_stall_ms, job.stall_ms_total), (9, 9));
    assert!(job.events.last().is_some_and(|e| e.kind == "resumed" && e.message.contains("no stop")));
    // From the swap on the gang costs the replacement's price; nothing before it.
    let cost = state.jobs[&JobId(1)].cost_usd_at(12_000 + 3_600_000);
    assert!((cost - 0.5).abs() < 1e-9, "{cost}");
    // A retried report after a leader change: accepted, nothing changes.
    assert_eq!(at(&mut state, 12_500, swapped), Ok(Applied::HandoverSwapped { job_id: JobId(1), leaving: None }));
    assert_eq!(state.jobs[&JobId(1)].gang, vec![w1, spare]);
    // Nobody else can claim a swap.
    let stranger =
        Command::HandoverSwapped { job_id: JobId(1), generation: 1, replacement: w2, step: 43, peer_bytes: 0 };
    assert_eq!(at(&mut state, 12_600, stranger), Err(Rejected::NoHandover { job_id: JobId(1) }));

    // The next notice's live handover does not finish in time: the leader falls back to the
    // stop-and-regroup handover with the same replacement.
    let other = register(&mut state, 7);
    at(&mut state, 20_000, spot_notice(w1, 140_000)).expect("notice");
    at(&mut state, 21_000, Command::HandoverReady { job_id: JobId(1), generation: 1, live: true }).expect("live");
    let swap_after_fallback =
        Command::HandoverSwapped { job_id: JobId(1), generation: 1, replacement: other, step: 50, peer_bytes: 0 };
    let stop = Command::HandoverReady { job_id: JobId(1), generation: 1, live: false };
    assert_eq!(
        at(&mut state, 50_000, stop),
        Ok(Applied::HandoverStarted { job_id: JobId(1), replacement: other, live: false })
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.checkpoint_requested, job.handovers[0].live_since_unix_ms), (Some(StopReason::Handover), 0));
    assert!(job.events.last().expect("event").message.contains("did not finish in time"));
    // Its swap had happened after all, reported late: taken (the gang did swap), and the stop
    // ends the generation with the replacement in the rank; the job is placed again.
    let mut late = state.clone();
    assert_eq!(
        at(&mut late, 50_001, swap_after_fallback),
        Ok(Applied::HandoverSwapped { job_id: JobId(1), leaving: Some(w1) })
    );
    assert_eq!(late.jobs[&JobId(1)].gang, vec![other, spare]);
    assert_eq!(
        end(&mut late, 1, GenerationEnd::Checkpointed, 60),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Pending })
    );
    assert_eq!((late.workers[&other].job, late.workers[&spare].job), (None, None), "free to be placed again");
    // Without that report, the stop regroups with the replacement in the noticed rank.
    checkpoint(&mut state, 60, 1).expect("checkpoint");
    assert_eq!(
        end(&mut state, 1, GenerationEnd::Checkpointed, 60),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Running })
    );
    assert_eq!(state.jobs[&JobId(1)].gang, vec![other, spare]);
}

#[test]
fn a_live_handover_said_to_have_failed_falls_back_to_the_stop_at_once() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    let joiner = register(&mut state, 5);
    at(&mut state, 10_000, spot_notice(w2, 130_000)).expect("notice");
    let failed = |by: WorkerId| Command::LiveHandoverFailed {
        job_id: JobId(1),
        generation: 1,
        by,
        reason: format!("the joining member fell 12 updates behind the gang{}", "!".repeat(1000)),
    };
    // Nothing live yet: nothing to fail.
    assert_eq!(at(&mut state, 10_500, failed(w2)), Err(Rejected::NoHandover { job_id: JobId(1) }));
    at(&mut state, 11_000, Command::HandoverReady { job_id: JobId(1), generation: 1, live: true }).expect("live");
    // Only the handover's two sides may say so.
    assert_eq!(at(&mut state, 11_500, failed(w1)), Err(Rejected::NotAMember { worker: w1, job_id: JobId(1) }));
    let mut from_joiner = state.clone();
    assert_eq!(
        at(&mut from_joiner, 12_000, failed(joiner)),
        Ok(Applied::HandoverStarted { job_id: JobId(1), replacement: joiner, live: false })
    );
    // The leaving member says it: the gang stops at the next step, long before the leader's wait
    // for the swap ends, and hands the rank over to the same replacement at the stop.
    assert_eq!(
        at(&mut state, 12_000, failed(w2)),
        Ok(Applied::HandoverStarted { job_id: JobId(1), replacement: joiner, live: false })
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.checkpoint_requested, job.handovers[0].live_since_unix_ms), (Some(StopReason::Handover), 0));
    assert_eq!(job.handovers[0].replacement, Some(joiner));
    let event = &job.events.last().expect("event").message;
    assert!(event.contains(&format!("the live handover failed, {w2} said: the joining member fell 12")), "{event}");
    assert!(event.len() < 512, "the reason is cut: {event}");
    // Said again (the other side): already fallen back.
    assert_eq!(at(&mut state, 12_100, failed(joiner)), Err(Rejected::NoHandover { job_id: JobId(1) }));
    checkpoint(&mut state, 60, 1).expect("checkpoint");
    assert_eq!(
        end(&mut state, 1, GenerationEnd::Checkpointed, 60),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Running })
    );
    assert_eq!((state.jobs[&JobId(1)].generation, state.jobs[&JobId(1)].gang.clone()), (2, vec![w1, joiner]));
    assert_eq!(state.jobs[&JobId(1)].steps_lost, 0);
}

#[test]
fn a_member_its_peers_cannot_reach_at_the_rendezvous_is_held_out_of_placement() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    let broke = |rank: Option<u32>, reporter: WorkerId, generation: u64| Command::GenerationEnded {
        job_id: JobId(1),
        generation,
        end: GenerationEnd::PeerLost { reason: "rank 1 was lost during rendezvous".into(), unreachable_rank: rank },
        step: 0,
        reporter: Some(reporter),
        announced: None,
    };
    // A stale report (another generation) holds nobody.
    assert!(at(&mut state, 9_000, broke(Some(1), w1, 7)).is_err());
    assert_eq!(state.workers[&w2].unreachable_until_unix_ms, 0);
    // Rank 0 could not reach rank 1 while the gang formed: rank 1's member is held for 60 s.
    assert_eq!(
        at(&mut state, 10_000, broke(Some(1), w1, 1)),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Pending })
    );
    assert_eq!(state.workers[&w2].unreachable_until_unix_ms, 10_000 + UNREACHABLE_HOLD_MS);
    assert_eq!(state.workers[&w1].unreachable_until_unix_ms, 0, "not the reporter");
    let event = state.jobs[&JobId(1)].events.last().expect("event");
    assert_eq!(event.kind, "unreachable");
    assert!(event.message.contains(&format!("{w2}'s peers could not reach its data port")), "{}", event.message);
    assert!(held_unreachable(&state, w2, 69_999) && !held_unreachable(&state, w2, 70_000));
    // Whoever proposes it, a gang with it is refused while the hold lasts.
    let regroup = Command::AssignGang { job_id: JobId(1), workers: vec![w1, w2] };
    assert_eq!(at(&mut state.clone(), 69_999, regroup), Err(Rejected::WorkerUnavailable(w2)));
    // Placed again and unreachable again soon after: twice as long; much later: 60 s again.
    let mut again = state.clone();
    at(&mut again, 71_000, Command::AssignGang { job_id: JobId(1), workers: vec![w1, w2] }).expect("assign");
    at(&mut again, 72_000, broke(Some(1), w1, 2)).expect("broke again");
    assert_eq!(again.workers[&w2].unreachable_until_unix_ms, 72_000 + 2 * UNREACHABLE_HOLD_MS);
    assert!(again.jobs[&JobId(1)].events.last().is_some_and(|e| e.message.contains("(2 times in a row)")));
    let later = 70_000 + UNREACHABLE_STREAK_GAP_MS;
    at(&mut state, later, Command::AssignGang { job_id: JobId(1), workers: vec![w1, w2] }).expect("assign");
    at(&mut state, later + 1, broke(Some(1), w1, 2)).expect("broke much later");
    assert_eq!(state.workers[&w2].unreachable_until_unix_ms, later + 1 + UNREACHABLE_HOLD_MS);
    let holds: Vec<u64> = (1..=8).map(unreachable_hold_ms).collect();
    assert_eq!(holds, [60_000, 120_000, 240_000, 480_000, 960_000, 1_920_000, 1_920_000, 1_920_000]);
    assert_eq!(unreachable_hold_ms(u32::MAX), UNREACHABLE_HOLD_MAX_MS);
    // A member naming itself holds nobody.
    let mut state = State::default();
    let (w1, _) = running_job(&mut state, 3);
    at(&mut state, 10_000, broke(Some(0), w1, 1)).expect("ended");
    assert_eq!(state.workers[&w1].unreachable_until_unix_ms, 0);
}

/// A generation that breaks before training a step says so (training stopped before it
/// formed; the metrics time the stall from that stop); one that trained does not.
#[test]
fn a_generation_that_breaks_before_its_first_step_says_so() {
    let mut state = State::default();
    let (w1, _) = running_job(&mut state, 3);
    let broke = |step| Command::GenerationEnded {
        job_id: JobId(1),
        generation: 1,
        end: GenerationEnd::PeerLost { reason: "rank 1 was lost during rendezvous".into(), unreachable_rank: None },
        step,
        reporter: Some(w1),
        announced: None,
    };
    let mut trained = state.clone();
    at(&mut trained, 10_000, broke(40)).expect("broke");
    at(&mut state, 10_000, broke(0)).expect("broke");
    let peer_lost = |state: &State| {
        state.jobs[&JobId(1)].events.iter().find(|e| e.kind == "peer_lost").cloned().expect("a peer_lost event")
    };
    let after_training = peer_lost(&trained);
    assert!(!after_training.ended_untrained(), "{}", after_training.message);
    let untrained = peer_lost(&state);
    assert!(untrained.ended_untrained(), "{}", untrained.message);
    assert!(untrained.message.starts_with("generation 1 broke at step 0 before training a step; 0 step(s) lost"));
}

#[test]
fn a_noticed_members_replacement_is_of_a_type_the_job_allows() {
    let mut state = State::default();
    let typed = JobSpec::from_toml_str(
        "name = \"t\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\nworkers = { min = 2 }\n\
         capacity = { instance_types = [\"p4d.24xlarge\"] }\n",
    )
    .expect("spec");
    at(&mut state, 1, Command::SubmitJob { spec: Box::new(typed), client_request_id: "t".into() }).expect("submit");
    let typed_worker = |state: &mut State, index: u64, instance_type: &str| {
        let info = WorkerInfo {
            cpus: 2,
            gpus: 0,
            memory_bytes: 0,
            instance_id: format!("i-{index}"),
            instance_type: instance_type.into(),
            zone: "z".into(),
            hostname: "h".into(),
            data_addr: "127.0.0.1:1".into(),
        };
        match at(state, index, Command::RegisterWorker { info, credential_sha256: String::new() }) {
            Ok(Applied::WorkerRegistered { worker_id }) => worker_id,
            other => panic!("register: {other:?}"),
        }
    };
    let (a, b) = (typed_worker(&mut state, 2, "p4d.24xlarge"), typed_worker(&mut state, 3, "p4d.24xlarge"));
    at(&mut state, 4, Command::AssignGang { job_id: JobId(1), workers: vec![a, b] }).expect("assign");
    let other = typed_worker(&mut state, 5, "g4dn.xlarge");
    at(&mut state, 6, spot_notice(b, 130_000)).expect("notice");
    assert_eq!(pick_replacement(&state, JobId(1), 7), None, "{other} is of a type the job does not allow");
    let fitting = typed_worker(&mut state, 8, "p4d.24xlarge");
    assert_eq!(pick_replacement(&state, JobId(1), 9), Some(fitting));
}

#[test]
fn a_survivor_of_a_broken_gang_replaces_a_noticed_member_once_heard_from() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    end(&mut state, 1, GenerationEnd::PeerLost { reason: "rank 1 was lost".into(), unreachable_rank: None }, 0)
        .expect("broke");
    let since = state.workers[&w1].suspect_since_unix_ms.expect("suspect");
    // Another job runs on two other workers; one of them gets a notice.
    at(&mut state, 600, Command::SubmitJob { spec: Box::new(spec("k")), client_request_id: "k".into() })
        .expect("submit");
    let (a, b) = (register(&mut state, 7), register(&mut state, 8));
    at(&mut state, 700, Command::AssignGang { job_id: JobId(2), workers: vec![a, b] }).expect("assign");
    at(&mut state, 800, spot_notice(b, 130_000)).expect("notice");
    assert_eq!(state.jobs[&JobId(2)].handovers[0].replacement, None, "a suspect survivor may be dead");
    // The leader heard from w1 since (w2, dead, never): w1 is picked at once.
    let heard = Command::WorkersHeard { workers: vec![(w1, since), (w2, since - 1)] };
    assert_eq!(at(&mut state, 900, heard), Ok(Applied::WorkersHeard { cleared: 1 }));
    assert_eq!(
        (state.workers[&w1].suspect_since_unix_ms, state.workers[&w2].suspect_since_unix_ms),
        (None, Some(since))
    );
    assert_eq!(pick_replacement(&state, JobId(2), 900), Some(w1));
    let too_many = Command::WorkersHeard { workers: vec![(w2, since); WORKERS_HEARD_PER_COMMAND_MAX + 1] };
    assert!(matches!(at(&mut state, 901, too_many), Err(Rejected::BadReport(_))));
}

#[test]
fn only_one_built_in_member_hands_over_live_and_a_lost_joiner_is_replaced() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    let (a, b) = (register(&mut state, 5), register(&mut state, 6));
    at(&mut state, 10_000, spot_notice(w1, 130_000)).expect("notice");
    at(&mut state, 10_100, spot_notice(w2, 130_000)).expect("notice");
    let live = Command::HandoverReady { job_id: JobId(1), generation: 1, live: true };
    assert_eq!(at(&mut state, 11_000, live), Err(Rejected::NoHandover { job_id: JobId(1) }), "two at once stop");
    assert_eq!(state.jobs[&JobId(1)].handovers.iter().map(|h| h.replacement).collect::<Vec<_>>(), [Some(a), Some(b)]);
    // One handover: live; its joiner lost while catching up is given up and another sought.
    let mut state = State::default();
    let (_, w2) = running_job(&mut state, 3);
    let joiner = register(&mut state, 5);
    at(&mut state, 10_000, spot_notice(w2, 130_000)).expect("notice");
    at(&mut state, 11_000, Command::HandoverReady { job_id: JobId(1), generation: 1, live: true }).expect("live");
    at(&mut state, 12_000, Command::WorkerLost { worker_id: joiner, last_step_seen: 0, last_heard_unix_ms: 0 })
        .expect("lost");
    let handover = &state.jobs[&JobId(1)].handovers[0];
    assert_eq!((handover.replacement, handover.live_since_unix_ms), (None, 0));
}

#[test]
fn members_noticed_together_hand_over_to_their_replacements_at_one_step_boundary() {
    // A capacity pool is reclaimed: both members get notices seconds apart.
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    let first = register(&mut state, 5);
    let noticed = |worker_id, until| {
        Ok(Applied::WorkerInterrupted { worker_id, job: Some(JobId(1)), handover_until: until, advisory: false })
    };
    assert_eq!(at(&mut state, 10_000, spot_notice(w1, 130_000)), noticed(w1, Some(85_000)));
    assert_eq!(at(&mut state, 10_500, spot_notice(w2, 126_000)), noticed(w2, Some(81_000)));
    let job = &state.jobs[&JobId(1)];
    assert_eq!(job.checkpoint_requested, None, "the gang trains on while replacements are sought");
    let pairs: Vec<_> = job.handovers.iter().map(|h| (h.leaving, h.replacement)).collect();
    assert_eq!(pairs, [(w1, Some(first)), (w2, None)], "the free worker went to the first notice");
    // A notice reported again (retried across a leader change) changes nothing.
    assert_eq!(at(&mut state, 10_600, spot_notice(w1, 130_000)), noticed(w1, Some(85_000)));
    assert_eq!(state.jobs[&JobId(1)].handovers.len(), 2);
    assert_eq!(state.jobs[&JobId(1)].checkpoint_requested, None);
    // Not ready while one noticed member has no replacement.
    let ready = Command::HandoverReady { job_id: JobId(1), generation: 1, live: false };
    assert_eq!(at(&mut state, 11_000, ready.clone()), Err(Rejected::NoHandover { job_id: JobId(1) }));
    let second = register(&mut state, 12);
    let reserve = Command::HandoverTo { job_id: JobId(1), generation: 1, replacement: second };
    assert_eq!(
        at(&mut state, 12_000, reserve.clone()),
        Ok(Applied::ReplacementReserved { job_id: JobId(1), replacement: second })
    );
    assert_eq!(at(&mut state, 12_001, reserve), Err(Rejected::NoHandover { job_id: JobId(1) }), "none left to fill");
    assert_eq!(
        at(&mut state, 13_000, ready),
        Ok(Applied::HandoverStarted { job_id: JobId(1), replacement: first, live: false })
    );
    let event = state.jobs[&JobId(1)].events.last().expect("event").message.clone();
    assert!(event.contains(&format!("{first} is ready to replace {w1}, {second} is ready to replace {w2}")), "{event}");
    checkpoint(&mut state, 30, 1).expect("checkpoint");
    assert_eq!(
        end(&mut state, 1, GenerationEnd::Checkpointed, 30),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Running })
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.generation, job.gang.clone()), (2, vec![first, second]), "each replacement in its member's rank");
    assert_eq!((job.steps_lost, job.recoveries, job.handovers.clone()), (0, 0, vec![]));
    let taken: Vec<_> = job.events.iter().filter(|e| e.is_handed_over()).map(|e| e.message.clone()).collect();
    assert_eq!(taken.len(), 2, "{taken:?}");
    assert!(
        taken[0].starts_with(&format!("{first} took {w1}")) && taken[1].starts_with(&format!("{second} took {w2}"))
    );
    for w in [w1, w2] {
        assert!(state.workers[&w].job.is_none() && state.workers[&w].draining);
    }
}

#[test]
fn a_second_notice_without_a_replacement_in_time_falls_back_and_frees_the_first_one() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    let first = register(&mut state, 5);
    at(&mut state, 10_000, spot_notice(w1, 130_000)).expect("notice");
    at(&mut state, 10_500, spot_notice(w2, 130_000)).expect("notice");
    // The leader's fallback: w2's handover found nobody.
    let fallback = Command::RequestCheckpoint { job_id: JobId(1), generation: 1, reason: StopReason::Preemption };
    at(&mut state, 85_000, fallback).expect("fallback");
    let job = &state.jobs[&JobId(1)];
    assert_eq!(job.checkpoint_requested, Some(StopReason::Preemption));
    let left: Vec<_> = job.handovers.iter().map(|h| (h.leaving, h.replacement)).collect();
    assert_eq!(left, [(w1, Some(first))], "the reserved one stays until the gang ends");
    checkpoint(&mut state, 40, 1).expect("checkpoint");
    assert_eq!(
        end(&mut state, 1, GenerationEnd::Checkpointed, 40),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Pending })
    );
    assert!(reserving_job(&state, first).is_none(), "free (and prepared) for the job's next generation");
    assert_eq!(state.jobs[&JobId(1)].handovers, []);
}

#[test]
fn a_replacement_lost_or_noticed_while_it_prepares_is_given_up_for_another() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    let first = register(&mut state, 5);
    at(&mut state, 10_000, spot_notice(w2, 130_000)).expect("notice");
    let pair = |state: &State| {
        let job = &state.jobs[&JobId(1)];
        (job.checkpoint_requested, job.handovers.iter().map(|h| (h.leaving, h.replacement)).collect::<Vec<_>>())
    };
    assert_eq!(pair(&state), (None, vec![(w2, Some(first))]));
    // The replacement dies while it prepares: the gang trains on and the handover seeks another
    // (before, it fell back to checkpoint-and-wait at once).
    at(&mut state, 20_000, Command::WorkerLost { worker_id: first, last_step_seen: 0, last_heard_unix_ms: 0 })
        .expect("lost");
    assert_eq!(pair(&state), (None, vec![(w2, None)]));
    let event = state.jobs[&JobId(1)].events.last().expect("event").message.clone();
    assert!(event.contains(&format!("{first}, reserved to replace {w2}, was lost; seeking another")), "{event}");
    let (second, third) = (register(&mut state, 21), register(&mut state, 22));
    let reserve = Command::HandoverTo { job_id: JobId(1), generation: 1, replacement: second };
    at(&mut state, 30_000, reserve).expect("reserve");
    assert_eq!(pair(&state), (None, vec![(w2, Some(second))]));
    // The next one gets a notice of its own: given up too, and the free worker reserved at once.
    assert_eq!(
        at(&mut state, 40_000, spot_notice(second, 160_000)),
        Ok(Applied::WorkerInterrupted { worker_id: second, job: None, handover_until: None, advisory: false })
    );
    assert_eq!(pair(&state), (None, vec![(w2, Some(third))]));
    assert_eq!(state.jobs[&JobId(1)].handovers[0].reserved_at_unix_ms, 40_000);
    assert_eq!(state.jobs[&JobId(1)].handovers[0].fallback_at_unix_ms, 85_000, "the member's deadline stands");
    assert!(reserving_job(&state, second).is_none() && state.workers[&second].draining);
    // The handover goes ahead with the third, rank kept, nothing lost.
    at(&mut state, 41_000, Command::HandoverReady { job_id: JobId(1), generation: 1, live: false }).expect("ready");
    checkpoint(&mut state, 30, 1).expect("checkpoint");
    assert_eq!(
        end(&mut state, 1, GenerationEnd::Checkpointed, 30),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Running })
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.generation, job.gang.clone(), job.steps_lost, job.recoveries), (2, vec![w1, third], 0, 0));
    // Once the gang stops for the handover, a replacement lost is not given up (the job waits
    // as after any stop, see a_handover_waits_for_a_replacement_and_falls_back_to_checkpoint_and_stop).
}

#[test]
fn a_worker_leaves_once_it_holds_no_job_and_a_reserved_replacement_that_leaves_is_replaced() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    let left = |state: &State, w: WorkerId| {
        let worker = &state.workers[&w];
        (worker.condition(u64::MAX), worker.lost_at_unix_ms)
    };
    // A member still holds its job: refused, nothing changes (it leaves once the job frees it,
    // or its lease runs out).
    assert_eq!(
        at(&mut state, 5_000, Command::WorkerLeft { worker_id: w2 }),
        Err(Rejected::StillAssigned { worker: w2, job_id: JobId(1) })
    );
    assert_eq!(left(&state, w2), (WorkerCondition::Busy, None));
    // A replacement reserved at a notice leaves while it prepares: the handover seeks another.
    let (first, second) = (register(&mut state, 5), register(&mut state, 6));
    at(&mut state, 10_000, spot_notice(w2, 130_000)).expect("notice");
    let replacement = |state: &State| state.jobs[&JobId(1)].handovers[0].replacement;
    let reserved = replacement(&state).expect("reserved at once");
    let other = if reserved == first { second } else { first };
    assert_eq!(
        at(&mut state, 11_000, Command::WorkerLeft { worker_id: reserved }),
        Ok(Applied::WorkerLeft { worker_id: reserved })
    );
    assert_eq!(left(&state, reserved), (WorkerCondition::Left, Some(11_000)));
    assert_eq!(replacement(&state), Some(other), "the other free worker reserved instead");
    let events: Vec<&str> = state.jobs[&JobId(1)].events.iter().map(|e| e.message.as_str()).collect();
    let said = format!("{reserved}, reserved to replace {w2}, left; seeking another");
    assert!(events.iter().any(|e| e.contains(&said)), "{events:?}");
    // A leave repeated (an agent's retry), or after its lease expired, changes nothing.
    at(&mut state, 12_000, Command::WorkerLeft { worker_id: reserved }).expect("again");
    assert_eq!(left(&state, reserved), (WorkerCondition::Left, Some(11_000)));
    at(&mut state, 13_000, Command::WorkerLost { worker_id: reserved, last_step_seen: 0, last_heard_unix_ms: 0 })
        .expect("lease");
    assert_eq!(left(&state, reserved), (WorkerCondition::Left, Some(11_000)));
    at(&mut state, 14_000, Command::WorkerLost { worker_id: w1, last_step_seen: 0, last_heard_unix_ms: 0 })
        .expect("lost");
    at(&mut state, 15_000, Command::WorkerLeft { worker_id: w1 }).expect("already gone");
    assert_eq!(left(&state, w1), (WorkerCondition::Lost, Some(14_000)), "lost first: stays lost");
    assert_eq!(
        at(&mut state, 16_000, Command::WorkerLeft { worker_id: WorkerId(99) }),
        Err(Rejected::WorkerNotFound(WorkerId(99)))
    );
}

#[test]
fn a_rebalance_recommendation_hands_over_without_a_deadline_until_a_notice_gives_it_one() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    let rebalance = Command::WorkerInterrupted { worker_id: w2, kind: REBALANCE_KIND.into(), action_at_unix_ms: None };
    let advised =
        Ok(Applied::WorkerInterrupted { worker_id: w2, job: Some(JobId(1)), handover_until: None, advisory: true });
    assert_eq!(at(&mut state, 10_000, rebalance.clone()), advised);
    let job = &state.jobs[&JobId(1)];
    assert_eq!(job.checkpoint_requested, None, "the gang trains on: nothing is taken yet");
    let [handover] = job.handovers.clone().try_into().expect("one handover");
    assert!(handover.advisory && handover.fallback_at_unix_ms == u64::MAX && handover.replacement.is_none());
    assert!(job.events.last().expect("event").message.contains("no deadline"), "{:?}", job.events);
    assert!(state.workers[&w2].draining, "no new work for an instance at risk");
    assert_eq!(at(&mut state, 10_500, rebalance), advised, "reported again: the same answer");
    // The spot notice comes: the handover under way gets its deadline.
    assert_eq!(
        at(&mut state, 20_000, spot_notice(w2, 140_000)),
        Ok(Applied::WorkerInterrupted {
            worker_id: w2,
            job: Some(JobId(1)),
            handover_until: Some(95_000),
            advisory: false
        })
    );
    let job = &state.jobs[&JobId(1)];
    let [handover] = job.handovers.clone().try_into().expect("still one handover");
    assert_eq!((handover.advisory, handover.fallback_at_unix_ms, handover.noticed_at_unix_ms), (false, 95_000, 10_000));
    // A replacement comes and is ready: the gang hands over as after a notice.
    let spare = register(&mut state, 30);
    let reserve = Command::HandoverTo { job_id: JobId(1), generation: 1, replacement: spare };
    at(&mut state, 30_000, reserve).expect("reserve");
    at(&mut state, 31_000, Command::HandoverReady { job_id: JobId(1), generation: 1, live: false }).expect("ready");
    checkpoint(&mut state, 50, 1).expect("checkpoint");
    assert_eq!(
        end(&mut state, 1, GenerationEnd::Checkpointed, 50),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Running })
    );
    assert_eq!(state.jobs[&JobId(1)].gang, [w1, spare]);

    // On an idle worker a recommendation only drains it.
    let idle = register(&mut state, 40);
    let rebalance =
        Command::WorkerInterrupted { worker_id: idle, kind: REBALANCE_KIND.into(), action_at_unix_ms: None };
    assert_eq!(
        at(&mut state, 41_000, rebalance),
        Ok(Applied::WorkerInterrupted { worker_id: idle, job: None, handover_until: None, advisory: false })
    );
    assert!(state.workers[&idle].draining);
    // SIGTERM after a recommendation stops the gang at once.
    let rebalance = Command::WorkerInterrupted { worker_id: w1, kind: REBALANCE_KIND.into(), action_at_unix_ms: None };
    at(&mut state, 42_000, rebalance).expect("recommendation");
    let sigterm = Command::WorkerInterrupted { worker_id: w1, kind: "SIGTERM".into(), action_at_unix_ms: None };
    at(&mut state, 43_000, sigterm).expect("SIGTERM");
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.checkpoint_requested, job.handovers.clone()), (Some(StopReason::Preemption), vec![]));
}

#[test]
fn a_job_saved_with_one_handover_loads_with_it() {
    // Snapshots and logs from before several handovers at once wrote `handover`: one or null.
    let mut state = State::default();
    let (w1, _) = running_job(&mut state, 3);
    at(&mut state, 10_000, spot_notice(w1, 130_000)).expect("notice");
    let job = state.jobs[&JobId(1)].clone();
    let mut old = serde_json::to_value(&job).expect("json");
    let fields = old.as_object_mut().expect("an object");
    let [one]: [serde_json::Value; 1] =
        serde_json::from_value(fields.remove("handovers").expect("written")).expect("one handover");
    fields.insert("handover".into(), one);
    assert_eq!(serde_json::from_value::<Job>(old.clone()).expect("loads").handovers, job.handovers);
    old.as_object_mut().expect("an object").insert("handover".into(), serde_json::Value::Null);
    assert_eq!(serde_json::from_value::<Job>(old).expect("loads").handovers, []);
}

#[test]
fn cancelling_a_job_mid_handover_frees_its_reserved_replacement() {
    let mut state = State::default();
    let (_, w2) = running_job(&mut state, 3);
    let spare = register(&mut state, 5);
    at(&mut state, 10_000, spot_notice(w2, 130_000)).expect("notice");
    assert_eq!(reserving_job(&state, spare).map(|j| j.id), Some(JobId(1)), "reserved by the handover");
    at(&mut state, 11_000, Command::CancelJob { job_id: JobId(1), reason: String::new() }).expect("cancel");
    assert_eq!(state.jobs[&JobId(1)].handovers, []);
    assert!(reserving_job(&state, spare).is_none(), "free for other jobs again");
}

#[test]
fn a_handover_waits_for_a_replacement_and_falls_back_to_checkpoint_and_stop() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    assert_eq!(
        at(&mut state, 10_000, spot_notice(w1, 130_000)),
        Ok(Applied::WorkerInterrupted {
            worker_id: w1,
            job: Some(JobId(1)),
            handover_until: Some(85_000),
            advisory: false
        })
    );
    assert_eq!(state.jobs[&JobId(1)].checkpoint_requested, None, "no replacement yet: training on");
    let handover = |replacement| Command::HandoverTo { job_id: JobId(1), generation: 1, replacement };
    // A busy or draining worker cannot replace; a new free one can, once.
    assert_eq!(at(&mut state, 11_000, handover(w2)), Err(Rejected::WorkerUnavailable(w2)));
    let late = register(&mut state, 20);
    assert_eq!(
        at(&mut state, 21_000, handover(late)),
        Ok(Applied::ReplacementReserved { job_id: JobId(1), replacement: late })
    );
    assert_eq!(at(&mut state, 22_000, handover(late)), Err(Rejected::NoHandover { job_id: JobId(1) }));
    let ready = Command::HandoverReady { job_id: JobId(1), generation: 1, live: false };
    at(&mut state, 22_500, ready).expect("ready");
    // The replacement is lost before the stop: the job waits like after any stop.
    at(&mut state, 23_000, Command::WorkerLost { worker_id: late, last_step_seen: 0, last_heard_unix_ms: 0 })
        .expect("lost");
    let ended = Command::GenerationEnded {
        job_id: JobId(1),
        generation: 1,
        end: GenerationEnd::Checkpointed,
        step: 0,
        reporter: None,
        announced: None,
    };
    assert_eq!(
        at(&mut state, 24_000, ended),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Pending })
    );

    // Generation 2, and a notice nobody replaces: the leader's fallback is today's path.
    let spare = register(&mut state, 30);
    at(&mut state, 31_000, Command::AssignGang { job_id: JobId(1), workers: vec![w2, spare] }).expect("assign");
    at(&mut state, 32_000, spot_notice(spare, 200_000)).expect("notice");
    assert_eq!(state.jobs[&JobId(1)].handovers.len(), 1);
    let fallback = Command::RequestCheckpoint { job_id: JobId(1), generation: 2, reason: StopReason::Preemption };
    at(&mut state, 155_000, fallback).expect("fallback");
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.checkpoint_requested, job.handovers.clone()), (Some(StopReason::Preemption), vec![]));
    assert_eq!(
        at(&mut state, 156_000, handover(late)),
        Err(Rejected::StaleGeneration { job_id: JobId(1), current: 2, reported: 1 })
    );
}

#[test]
fn a_gang_that_stops_on_its_own_during_a_handover_stops_for_the_notice() {
    // The noticed agent stops at the fallback time when the leader's order has not come yet.
    let mut state = State::default();
    let (w1, _) = running_job(&mut state, 3);
    at(&mut state, 10_000, spot_notice(w1, 130_000)).expect("notice");
    assert!(!state.jobs[&JobId(1)].handovers.is_empty() && state.jobs[&JobId(1)].checkpoint_requested.is_none());
    checkpoint(&mut state, 40, 1).expect("checkpoint");
    let ended = Command::GenerationEnded {
        job_id: JobId(1),
        generation: 1,
        end: GenerationEnd::Checkpointed,
        step: 40,
        reporter: None,
        announced: None,
    };
    at(&mut state, 85_000, ended).expect("ended");
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.state, job.preemptions, job.steps_lost, job.handovers.clone()), (JobState::Pending, 1, 0, vec![]));
    let event = job.events.iter().rev().find(|e| e.kind == "checkpointed").expect("event");
    assert!(event.message.contains("stopped for preemption"), "{}", event.message);
}

#[test]
fn a_generation_s_stall_is_recorded_once_with_an_event() {
    let mut state = State::default();
    running_job(&mut state, 3);
    let resumed = |generation| Command::TrainingResumed {
        job_id: JobId(1),
        generation,
        stall_ms: 42,
        handover: true,
        stopped_for: None,
        outage: false,
        peer_bytes: 2_822_494,
        storage_bytes: 0,
    };
    assert_eq!(at(&mut state, 1_000, resumed(1)), Ok(Applied::TrainingResumed { job_id: JobId(1), recorded: true }));
    assert_eq!(at(&mut state, 1_001, resumed(1)), Ok(Applied::TrainingResumed { job_id: JobId(1), recorded: false }));
    assert!(matches!(at(&mut state, 1_002, resumed(2)), Err(Rejected::StaleGeneration { .. })));
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.stall_ms_total, job.last_stall_ms), (42, 42), "counted once");
    assert_eq!((job.resume_peer_bytes, job.resume_storage_bytes), (2_822_494, 0));
    let event = job.events.last().expect("event");
    assert_eq!(event.kind, "resumed");
    assert!(event.message.contains("42 ms after the stop (handover)"), "{}", event.message);
}

/// A generation after one that stopped for a store outage counts its time without a step as a
/// stall, and its event says from what.
#[test]
fn a_restart_after_a_store_outage_is_a_stall_from_that_stop() {
    let mut state = State::default();
    running_job(&mut state, 3);
    let resumed = Command::TrainingResumed {
        job_id: JobId(1),
        generation: 1,
        stall_ms: 12_400,
        handover: false,
        stopped_for: None,
        outage: true,
        peer_bytes: 0,
        storage_bytes: 5_643_990,
    };
    assert_eq!(at(&mut state, 1_000, resumed), Ok(Applied::TrainingResumed { job_id: JobId(1), recorded: true }));
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.stall_ms_total, job.last_stall_ms), (12_400, 12_400));
    let said = &job.events.last().expect("event").message;
    assert!(said.starts_with("generation 1 trained again 12400 ms after the stop for the store outage;"), "{said}");
}

/// A generation after a planned stop (here, to grow) records what its start moved and when it
/// trained again, but its time without a step is a regroup, not an interruption.
#[test]
fn a_restart_after_a_planned_stop_records_its_bytes_but_no_stall() {
    let mut state = State::default();
    running_job(&mut state, 3);
    let resumed = Command::TrainingResumed {
        job_id: JobId(1),
        generation: 1,
        stall_ms: 850,
        handover: false,
        stopped_for: Some(StopReason::Grow),
        outage: false,
        peer_bytes: 0,
        storage_bytes: 5_643_990,
    };
    assert_eq!(at(&mut state, 1_000, resumed), Ok(Applied::TrainingResumed { job_id: JobId(1), recorded: true }));
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.stall_ms_total, job.last_stall_ms), (0, 0), "no interruption");
    assert_eq!((job.resume_peer_bytes, job.resume_storage_bytes), (0, 5_643_990));
    let event = job.events.last().expect("event");
    assert_eq!(
        (event.kind.as_str(), event.message.as_str()),
        (
            "resumed",
            "generation 1 trained again 850 ms after the stop (grow); state moved: 0 bytes peer to peer, 5643990 \
             bytes from the store"
        )
    );
}

#[test]
fn a_broken_gang_counts_lost_steps_and_waits_for_fresh_heartbeats() {
    let mut state = State::default();
    running_job(&mut state, 3);
    checkpoint(&mut state, 20, 1).expect("checkpoint");
    let lost = GenerationEnd::PeerLost { reason: "rank 1 was lost".into(), unreachable_rank: None };
    assert!(matches!(end(&mut state, 2, lost.clone(), 27), Err(Rejected::StaleGeneration { .. })));
    end(&mut state, 1, lost.clone(), 27).expect("end");
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.state, job.steps_lost, job.recoveries, job.failures), (JobState::Pending, 7, 1, 0));
    assert!(state.workers.values().all(|w| w.suspect_since_unix_ms == Some(500)), "the whole gang is suspect");
    assert!(end(&mut state, 1, lost, 27).is_err(), "the other survivor's report changes nothing");
}

#[test]
fn the_survivor_that_reports_a_break_is_not_suspect_and_the_others_are() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    break_reported(&mut state, 600, JobId(1), w1);
    assert_eq!(state.jobs[&JobId(1)].ended_gang, [w1, w2], "the regroup's holders");
    assert_eq!(state.workers[&w1].suspect_since_unix_ms, None, "it just called: alive");
    assert_eq!(state.workers[&w2].suspect_since_unix_ms, Some(600), "it may have died with the gang");
}

#[test]
fn an_unusable_checkpoint_falls_back_to_the_previous_one_with_an_event() {
    let mut state = State::default();
    running_job(&mut state, 3);
    checkpoint(&mut state, 20, 1).expect("checkpoint");
    checkpoint(&mut state, 40, 1).expect("checkpoint");
    let bad = GenerationEnd::CheckpointUnusable { step: 40, reason: "part `model` does not match its checksum".into() };
    end(&mut state, 1, bad, 40).expect("end");
    let job = &state.jobs[&JobId(1)];
    assert_eq!(job.latest_checkpoint.as_ref().map(|c| c.step), Some(20));
    assert!(job.checkpoints.iter().any(|c| c.step == 40 && c.deleting), "marked for deletion");
    let event = job.events.last().expect("event");
    assert_eq!(event.kind, "checkpoint_corrupt");
    assert!(event.message.contains("step 40") && event.message.contains("falling back to step 20"), "{event:?}");
    assert_eq!(job.failures, 0, "a bad checkpoint is not the job's failure");
    // The next generation may record step 40 again (under another name).
    apply(&mut state, 700, Envelope::new(700, Command::AssignGang { job_id: JobId(1), workers: vec![WorkerId(1)] }))
        .expect("assign");
    checkpoint(&mut state, 40, 2).expect("a fresh checkpoint of the same step");
    assert_eq!(state.jobs[&JobId(1)].latest_checkpoint.as_ref().map(|c| c.generation), Some(2));
}

#[test]
fn failures_without_progress_fail_the_job_and_progress_resets_the_count() {
    let mut state = State::default();
    running_job(&mut state, 2);
    let error = || GenerationEnd::Error { reason: "cannot read the data".into() };
    let reassign = |state: &mut State, index| {
        apply(state, index, Envelope::new(index, Command::AssignGang { job_id: JobId(1), workers: vec![WorkerId(1)] }))
            .expect("assign");
    };
    end(&mut state, 1, error(), 0).expect("first failure");
    assert_eq!((state.jobs[&JobId(1)].state, state.jobs[&JobId(1)].failures), (JobState::Pending, 1));
    reassign(&mut state, 600);
    checkpoint(&mut state, 20, 2).expect("progress");
    assert_eq!(state.jobs[&JobId(1)].failures, 0, "progress resets the count");
    end(&mut state, 2, error(), 25).expect("failure after progress");
    reassign(&mut state, 601);
    assert_eq!(
        end(&mut state, 3, error(), 20),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Failed })
    );
    let job = &state.jobs[&JobId(1)];
    assert!(job.reason.contains("capacity.max_failures = 2"), "{}", job.reason);
    assert!(state.workers.values().all(|w| w.job.is_none()), "capacity released");
}

/// A start that finds the store out is waited out, never counted: with `max_failures = 1` one
/// failure fails the job, but any number of store outages in a row do not. The wait doubles
/// with each try (capped), one event says it however long the outage lasts, and progress
/// starts a new count.
#[test]
fn a_store_outage_is_waited_out_with_a_backoff_and_never_fails_the_job() {
    let mut state = State::default();
    running_job(&mut state, 1);
    let out = || GenerationEnd::StoreUnavailable { reason: "s3://b/data.csv: the endpoint is unreachable".into() };
    let end_at = |state: &mut State, at: u64, generation: u64, end: GenerationEnd, step: u64| {
        let command = Command::GenerationEnded {
            job_id: JobId(1),
            generation,
            end,
            step,
            reporter: Some(WorkerId(2)),
            announced: None,
        };
        apply(state, at, Envelope::new(at, command))
    };
    let reassign = |state: &mut State, at: u64| {
        let command = Command::AssignGang { job_id: JobId(1), workers: vec![WorkerId(1), WorkerId(2)] };
        apply(state, at, Envelope::new(at, command)).expect("assign");
    };
    let mut at = 1_000;
    for generation in 1..=12u64 {
        let ended = end_at(&mut state, at, generation, out(), 0);
        assert_eq!(ended, Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Pending }));
        let job = &state.jobs[&JobId(1)];
        let wait = job.store_wait.clone().expect("waiting for the store");
        let wait_ms = (10_000u64 << (generation - 1)).min(300_000);
        assert_eq!((wait.tries, wait.since_unix_ms, wait.until_unix_ms), (generation as u32, 1_000, at + wait_ms));
        assert!(job.waits_for_store(at + wait_ms - 1) && !job.waits_for_store(at + wait_ms));
        assert_eq!(job.failures, 0, "not counted toward capacity.max_failures");
        assert!(job.reason.starts_with("waiting for the store: out for "), "{}", job.reason);
        let said: Vec<&JobEvent> = job.events.iter().filter(|e| e.kind == "store_unavailable").collect();
        assert_eq!(said.len(), 1, "one event, updated: {:?}", job.events);
        assert!(
            said[0].message.contains(&format!("(worker-2): the store is out (try {generation}, ")),
            "{}",
            said[0].message
        );
        assert_eq!(job.events.last().map(|e| e.kind.as_str()), Some("store_unavailable"), "the gangs between tries go");
        at += wait_ms;
        reassign(&mut state, at);
        at += 2_000;
    }
    assert!(state.workers.values().all(|w| w.job.is_some()), "still placed after 12 tries");
    // The store answers again: progress, then a later outage counts from one.
    checkpoint(&mut state, 20, 13).expect("progress");
    end_at(&mut state, at, 13, out(), 20).expect("a later outage");
    let job = &state.jobs[&JobId(1)];
    let wait = job.store_wait.clone().expect("waiting");
    assert_eq!((wait.tries, wait.since_unix_ms, wait.until_unix_ms), (1, at, at + 10_000));
    // A failure that is not the store's still counts (and here fails the job at once).
    reassign(&mut state, at + 10_000);
    let failed = end_at(&mut state, at + 11_000, 14, GenerationEnd::Error { reason: "bad column".into() }, 20);
    assert_eq!(failed, Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Failed }));
}

#[test]
fn retention_deletes_in_two_steps_and_never_the_newest_checkpoint() {
    let mut state = State::default();
    running_job(&mut state, 3);
    for step in [10, 20, 30] {
        checkpoint(&mut state, step, 1).expect("checkpoint");
    }
    let uri = |step: u64| format!("file:///s/ckpt/{step:012}-g1");
    let deleting = |state: &mut State, step| {
        apply(state, 800, Envelope::new(800, Command::CheckpointDeleting { job_id: JobId(1), uri: uri(step) }))
    };
    let deleted = |state: &mut State, step| {
        apply(state, 801, Envelope::new(801, Command::CheckpointDeleted { job_id: JobId(1), uri: uri(step) }))
    };
    assert!(matches!(deleting(&mut state, 30), Err(Rejected::CheckpointNotDeletable { .. })), "newest kept");
    assert!(deleted(&mut state, 10).is_err(), "only a checkpoint marked deleting can be dropped");
    deleting(&mut state, 10).expect("mark");
    deleting(&mut state, 10).expect("marking twice is harmless (a retried deletion)");
    deleted(&mut state, 10).expect("drop");
    let steps: Vec<u64> = state.jobs[&JobId(1)].checkpoints.iter().map(|c| c.step).collect();
    assert_eq!(steps, [20, 30]);
    assert_eq!(state.jobs[&JobId(1)].latest_checkpoint.as_ref().map(|c| c.step), Some(30));
}

#[test]
fn the_retention_plan_keeps_the_newest_k() {
    let mut state = State::default();
    running_job(&mut state, 3);
    state.jobs.get_mut(&JobId(1)).expect("job").spec.checkpoint.keep = 2;
    for step in [10, 20, 30, 40] {
        checkpoint(&mut state, step, 1).expect("checkpoint");
    }
    let uri = |step: u64| format!("file:///s/ckpt/{step:012}-g1");
    assert_eq!(state.jobs[&JobId(1)].retention_plan(), (vec![uri(10), uri(20)], vec![]));
    apply(&mut state, 900, Envelope::new(900, Command::CheckpointDeleting { job_id: JobId(1), uri: uri(10) }))
        .expect("mark");
    assert_eq!(state.jobs[&JobId(1)].retention_plan(), (vec![uri(20)], vec![uri(10)]));
}

/// A registered version's source checkpoint stays when the job, trained further, records newer
/// ones beyond `checkpoint.keep`: retention neither plans nor applies its deletion.
#[test]
fn a_registered_versions_source_checkpoint_outlives_checkpoint_keep() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    state.jobs.get_mut(&JobId(1)).expect("job").spec.checkpoint.keep = 2;
    checkpoint(&mut state, 10, 1).expect("checkpoint");
    let done = Command::JobFinished {
        job_id: JobId(1),
        generation: 1,
        success: true,
        reason: String::new(),
        step: 10,
        metrics: None,
        artifact: Some(ModelArtifact {
            artifact_uri: "file:///s/jobs/job-1/model/000000000010/model.safetensors".into(),
            dataset_sha256: "ab".repeat(32),
            shape: ModelShape { features_per_row: 4, classes: 3, feature_scale: 1.0 },
        }),
        reporter: Some(w1),
    };
    at(&mut state, 100, done).expect("finished and registered");
    let mut longer = state.jobs[&JobId(1)].spec.clone();
    longer.train.length = crate::spec::TrainLength::Epochs(5);
    at(&mut state, 101, Command::ResumeJob { job_id: JobId(1), spec: Some(Box::new(longer)) }).expect("resumed");
    at(&mut state, 102, Command::AssignGang { job_id: JobId(1), workers: vec![w1, w2] }).expect("assign");
    for step in [20, 30, 40] {
        checkpoint(&mut state, step, 2).expect("checkpoint");
    }
    let uri = |step: u64, generation: u64| format!("file:///s/ckpt/{step:012}-g{generation}");
    assert_eq!(state.jobs[&JobId(1)].retention_plan().0, [uri(10, 1), uri(20, 2)], "beyond keep = 2");
    let plans = state.retention_plans();
    assert_eq!(plans, [(JobId(1), vec![uri(20, 2)], vec![])], "version 1's source stays");
    let deleting = |uri| Command::CheckpointDeleting { job_id: JobId(1), uri };
    assert!(matches!(at(&mut state, 103, deleting(uri(10, 1))), Err(Rejected::CheckpointNotDeletable { .. })));
    at(&mut state, 104, deleting(uri(20, 2))).expect("an unregistered one goes");
}

#[test]
fn successful_jobs_register_versions_with_lineage_and_aliases_resolve() {
    let mut state = State::default();
    let finish = |state: &mut State, job: u64, request: &str| {
        apply(
            state,
            job * 10,
            Envelope::new(
                job * 10,
                Command::SubmitJob { spec: Box::new(spec("j")), client_request_id: request.into() },
            ),
        )
        .expect("submit");
        let worker = register(state, job * 10 + 1);
        apply(state, job * 10 + 2, Envelope::new(5, Command::AssignGang { job_id: JobId(job), workers: vec![worker] }))
            .expect("assign");
        let done = Command::JobFinished {
            job_id: JobId(job),
            generation: 1,
            success: true,
            reason: String::new(),
            step: 100,
            // train.keep_best: job 2's model is its state of step 80; job 1's names its last.
            metrics: Some(FinalMetrics {
                val_accuracy: Some(0.9),
                val_loss: None,
                train_loss: None,
                val_step: if job == 2 { 80 } else { 100 },
            }),
            artifact: Some(ModelArtifact {
                artifact_uri: format!("file:///s/jobs/job-{job}/model/model.safetensors"),
                dataset_sha256: "ab".repeat(32),
                shape: ModelShape { features_per_row: 4, classes: 3, feature_scale: 255.0 },
            }),
            reporter: Some(worker),
        };
        apply(state, job * 10 + 3, Envelope::new(job * 100, done)).expect("finish");
    };
    finish(&mut state, 1, "a");
    finish(&mut state, 2, "b");
    let (model, latest) = state.resolve_model("j").expect("latest");
    assert_eq!((model.versions.len(), latest.version, latest.job_id), (2, 2, JobId(2)));
    assert_eq!(latest.metrics.and_then(|m| m.val_accuracy), Some(0.9));
    assert_eq!(latest.spec.name, "j");
    assert_eq!(latest.metrics.map(|m| m.val_step), Some(80), "its model is the state of step 80");
    assert_eq!(model.versions[0].metrics.map(|m| m.val_step), Some(0), "the last state is not named");
    let registered =
        |job| state.jobs[&JobId(job)].events.iter().find(|e| e.kind == "registered").map(|e| e.message.clone());
    assert_eq!(registered(2).as_deref(), Some("model j version 2 (its best validated state, step 80, not its last)"));
    assert_eq!(registered(1).as_deref(), Some("model j version 1"));
    let alias = |state: &mut State, version, alias: &str| {
        apply(state, 99, Envelope::new(99, Command::SetModelAlias { name: "j".into(), version, alias: alias.into() }))
    };
    alias(&mut state, 1, "production").expect("alias");
    assert_eq!(state.resolve_model("j@production").map(|(_, v)| v.version), Ok(1));
    assert_eq!(state.resolve_model("j@2").map(|(_, v)| v.version), Ok(2));
    assert!(matches!(alias(&mut state, 7, "staging"), Err(Rejected::Model(ModelRefError::NoVersion { .. }))));
    assert!(matches!(alias(&mut state, 1, "Bad Alias"), Err(Rejected::BadAlias(_))));
    assert!(matches!(alias(&mut state, 1, "12"), Err(Rejected::BadAlias(_))), "an alias is not a version");
    assert_eq!(
        state.resolve_model("j@canary").map(|(_, v)| v.version),
        Err(ModelRefError::NoAlias { name: "j".into(), alias: "canary".into(), known: "production".into() })
    );
    assert!(matches!(state.resolve_model("nope"), Err(ModelRefError::NoModel(_))));

    // A job submitted with `train.init_from` is pinned to the version its reference names now
    // (moving the alias later changes nothing) and says so in an event.
    let submit_from = |state: &mut State, index: u64, reference: &str, hidden: Option<Vec<u32>>| {
        let mut job_spec = spec("tuned");
        job_spec.train.init_from = Some(reference.to_string());
        if let Some(hidden) = hidden {
            job_spec.model = Some(crate::spec::ModelSpec::Mlp { hidden });
        }
        let submit = Command::SubmitJob { spec: Box::new(job_spec), client_request_id: format!("init-{index}") };
        apply(state, index, Envelope::new(index, submit))
    };
    let Ok(Applied::JobSubmitted { job_id, .. }) = submit_from(&mut state, 200, "j@production", None) else {
        panic!("submitted from j@production")
    };
    alias(&mut state, 2, "production").expect("the alias moves");
    let job = &state.jobs[&job_id];
    assert_eq!(job.init_artifact_uri.as_deref(), Some("file:///s/jobs/job-1/model/model.safetensors"));
    let said = &job.events.last().expect("an event").message;
    assert_eq!(said, "starts from the weights of model j version 1 (file:///s/jobs/job-1/model/model.safetensors)");
    // Refused, naming the field, and admitting nothing: no such model or version, or another
    // architecture.
    let jobs = state.jobs.len();
    let refused = |state: &mut State, index, reference, hidden| {
        submit_from(state, index, reference, hidden).expect_err("refused").to_string()
    };
    assert_eq!(
        refused(&mut state, 201, "nope", None),
        "train.init_from = nope: no model named `nope` (see `flotilla models list`)"
    );
    assert_eq!(
        refused(&mut state, 202, "j@9", None),
        "train.init_from = j@9: model `j` has no version 9 (it has 1 to 2)"
    );
    assert_eq!(
        refused(&mut state, 203, "j", Some(vec![8])),
        "train.init_from = j: model j version 2 is `mlp hidden = [256, 128]`; this job's model is `mlp hidden = [8]`: \
         its weights fit only the same architecture"
    );
    assert_eq!(state.jobs.len(), jobs, "no refused submission was admitted");
}

#[test]
fn a_success_without_a_model_says_why_it_was_not_registered() {
    let mut state = State::default();
    for (job, reason) in [(1, "the model could not be exported: disk full"), (2, "")] {
        let submit = Command::SubmitJob { spec: Box::new(spec("j")), client_request_id: format!("r{job}") };
        apply(&mut state, job * 10, Envelope::new(job * 10, submit)).expect("submit");
        let worker = register(&mut state, job * 10 + 1);
        let assign = Command::AssignGang { job_id: JobId(job), workers: vec![worker] };
        apply(&mut state, job * 10 + 2, Envelope::new(job * 10 + 2, assign)).expect("assign");
        let done = Command::JobFinished {
            job_id: JobId(job),
            generation: 1,
            success: true,
            reason: reason.into(),
            step: 100,
            metrics: None,
            artifact: None,
            reporter: Some(worker),
        };
        apply(&mut state, job * 10 + 3, Envelope::new(job * 10 + 3, done)).expect("finish");
    }
    let registry = |job| {
        let events = &state.jobs[&JobId(job)].events;
        events.iter().filter(|e| e.kind == "registry").map(|e| e.message.clone()).collect::<Vec<_>>()
    };
    assert_eq!(registry(1), ["model `j` not registered: the model could not be exported: disk full"]);
    assert_eq!(registry(2), ["model `j` not registered: the job reported no model"]);
    assert_eq!(state.jobs[&JobId(1)].state, JobState::Succeeded, "the training itself is done");
    assert!(state.models.is_empty());
}

#[test]
fn a_budget_stop_survives_notices_and_broken_gangs_and_finish_needs_a_running_generation() {
    let mut state = State::default();
    let (_, w2) = running_job(&mut state, 3);
    let request = Command::RequestCheckpoint { job_id: JobId(1), generation: 1, reason: StopReason::Budget };
    apply(&mut state, 5, Envelope::new(5, request)).expect("budget stop");
    apply(
        &mut state,
        6,
        Envelope::new(6, Command::WorkerInterrupted { worker_id: w2, kind: "spot".into(), action_at_unix_ms: None }),
    )
    .expect("notice");
    assert_eq!(state.jobs[&JobId(1)].checkpoint_requested, Some(StopReason::Budget), "not downgraded");
    let lost = GenerationEnd::PeerLost { reason: "rank 1 was lost".into(), unreachable_rank: None };
    assert_eq!(end(&mut state, 1, lost, 9), Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Failed }));
    assert!(state.jobs[&JobId(1)].reason.contains("budget spent"), "{}", state.jobs[&JobId(1)].reason);

    // A job that is not running cannot be finished (nor register a model).
    submit(&mut state, 20, "other").expect("submit");
    let finish = Command::JobFinished {
        job_id: JobId(2),
        generation: 0,
        success: true,
        reason: String::new(),
        step: 1,
        metrics: None,
        artifact: None,
        reporter: None,
    };
    assert!(matches!(apply(&mut state, 21, Envelope::new(21, finish)), Err(Rejected::NotRunning { .. })));
}

/// Records `id` as a launched instance (spot or not) of a settled request.
fn launched(state: &mut State, t: u64, id: &str, spot: bool) {
    let request_id = format!("req-{id}");
    let request = Command::RequestInstances {
        request_id: request_id.clone(),
        job: None,
        instance_type: "g5.xlarge".into(),
        zone: "a".into(),
        spot,
        count: 1,
        usd_per_hour: 0.5,
    };
    at(state, t, request).expect("request");
    let instances = vec![LaunchedInstance { id: id.into(), zone: "a".into(), spot }];
    at(state, t + 1, Command::InstancesLaunched { request_id, instances }).expect("launched");
}

#[test]
fn out_of_slack_a_spot_gang_checkpoints_and_the_job_resumes_on_demand_only() {
    let mut state = State::default();
    let (_, w2) = running_job(&mut state, 3);
    let instance = state.workers[&w2].info.instance_id.clone();
    launched(&mut state, 5, &instance, true);
    let moved = |state: &mut State, t| {
        at(state, t, Command::MoveToOnDemand { job_id: JobId(1), reason: "2.0 h of work left, 2.1 h to go".into() })
    };
    assert_eq!(moved(&mut state, 7), Ok(Applied::MovedToOnDemand { job_id: JobId(1), checkpoint: true }));
    let job = &state.jobs[&JobId(1)];
    assert!(job.on_demand_only);
    assert_eq!(job.checkpoint_requested, Some(StopReason::Deadline));
    assert!(job.events.iter().any(|e| e.kind == "deadline" && e.message.contains("2.0 h of work left")));
    // Said twice (a new leader): nothing changes, no second stop.
    assert_eq!(moved(&mut state, 8), Ok(Applied::MovedToOnDemand { job_id: JobId(1), checkpoint: false }));
    checkpoint(&mut state, 30, 1).expect("checkpoint");
    assert_eq!(
        end(&mut state, 1, GenerationEnd::Checkpointed, 30),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Pending })
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.preemptions, job.steps_lost, job.failures), (0, 0, 0), "a deliberate move loses nothing");
    assert!(job.on_demand_only && job.reason.contains("on-demand"), "{}", job.reason);
}

#[test]
fn out_of_slack_on_on_demand_workers_or_while_pending_only_marks_the_job() {
    let mut state = State::default();
    running_job(&mut state, 3); // workers without instance records count as on-demand
    assert_eq!(
        at(&mut state, 5, Command::MoveToOnDemand { job_id: JobId(1), reason: "late".into() }),
        Ok(Applied::MovedToOnDemand { job_id: JobId(1), checkpoint: false })
    );
    assert_eq!(state.jobs[&JobId(1)].checkpoint_requested, None, "already on on-demand: keeps training");
    submit(&mut state, 6, "pending").expect("submit");
    assert_eq!(
        at(&mut state, 7, Command::MoveToOnDemand { job_id: JobId(2), reason: "late".into() }),
        Ok(Applied::MovedToOnDemand { job_id: JobId(2), checkpoint: false })
    );
    assert!(state.jobs[&JobId(2)].on_demand_only);
    at(&mut state, 8, Command::CancelJob { job_id: JobId(2), reason: "x".into() }).expect("cancel");
    assert!(matches!(
        at(&mut state, 9, Command::MoveToOnDemand { job_id: JobId(2), reason: "late".into() }),
        Err(Rejected::JobFinished { .. })
    ));
    assert_eq!(
        at(&mut state, 10, Command::MoveToOnDemand { job_id: JobId(9), reason: "late".into() }),
        Err(Rejected::JobNotFound(JobId(9)))
    );
}

pub(super) fn at(state: &mut State, t: u64, command: Command) -> Result<Applied, Rejected> {
    apply(state, t, Envelope::new(t, command))
}

/// Trains job-1 (`register_as = "m"`) on one worker and reports it succeeded with a model of
/// `shape`: what the state machine answers.
fn train_model(state: &mut State, shape: ModelShape) -> Result<Applied, Rejected> {
    at(state, 1, Command::SubmitJob { spec: Box::new(spec("m")), client_request_id: "train".into() }).expect("submit");
    let trainer = register(state, 2);
    at(state, 3, Command::AssignGang { job_id: JobId(1), workers: vec![trainer] }).expect("assign");
    let artifact = ModelArtifact {
        artifact_uri: "file:///s/jobs/job-1/model/model.safetensors".into(),
        dataset_sha256: String::new(),
        shape,
    };
    let done = Command::JobFinished {
        job_id: JobId(1),
        generation: 1,
        success: true,
        reason: String::new(),
        step: 10,
        metrics: None,
        artifact: Some(artifact),
        reporter: Some(trainer),
    };
    at(state, 4, done)
}

/// A registered model `m` version 1 (4 features, 3 classes) and an inference job over `rows`
/// rows with up to 2 workers; returns the job id and two idle workers.
pub(super) fn inference_job(state: &mut State, rows: u64, shard_rows: u64) -> (JobId, WorkerId, WorkerId) {
    train_model(state, ModelShape { features_per_row: 4, classes: 3, feature_scale: 1.0 }).expect("finish");
    let request = InferenceRequest {
        model: "m".into(),
        version: 1,
        input_uri: "file:///in.csv".into(),
        output_uri: "file:///out".into(),
        workers: 2,
        batch_size: 0,
        shard_rows,
        rows,
        labelled: true,
        input_bytes: 0,
        shard_byte_offsets: Vec::new(),
    };
    let submitted =
        at(state, 5, Command::SubmitInference { request: Box::new(request), client_request_id: "i".into() });
    let Ok(Applied::JobSubmitted { job_id, duplicate: false }) = submitted else { panic!("{submitted:?}") };
    (job_id, register(state, 6), register(state, 7))
}

pub(super) fn stats(rows: u64, correct: u64) -> ShardStats {
    ShardStats { rows, labelled_rows: rows, correct, class_counts: vec![rows, 0, 0] }
}

/// `worker_id`'s commit of the shard it was leased, with `stats`.
fn commit_shard(job_id: JobId, worker_id: WorkerId, lease: &ShardLease, stats: ShardStats) -> Command {
    Command::CommitShard {
        job_id,
        worker_id,
        index: lease.index,
        attempt: lease.attempt,
        object: lease.object.clone(),
        stats,
    }
}

pub(super) fn lease(state: &mut State, job_id: JobId, worker_id: WorkerId) -> Option<ShardLease> {
    match at(state, 50, Command::LeaseShard { job_id, worker_id }) {
        Ok(Applied::ShardLeased { lease, .. }) => lease,
        other => panic!("lease: {other:?}"),
    }
}

#[test]
fn shards_cover_every_row_once_within_the_limits() {
    for (rows, workers, shard_rows) in [(1, 1, 0), (1000, 2, 0), (1001, 3, 0), (10_000_000, 1, 0), (999, 2, 100)] {
        let shards = plan_shards(rows, workers, shard_rows).expect("plan");
        assert!(shards.len() <= INFERENCE_SHARDS_MAX);
        let mut next = 0;
        for shard in &shards {
            assert_eq!(shard.first_row, next, "contiguous");
            assert!(shard.rows > 0);
            next += shard.rows;
        }
        assert_eq!(next, rows, "every row once");
    }
    assert_eq!(plan_shards(1000, 2, 0).expect("plan").len(), 8, "about 4 shards per worker");
    assert!(plan_shards(0, 1, 0).is_err());
    let refused = plan_shards(1_000_000, 1, 1).expect_err("too many shards");
    assert!(refused.contains("--shard-rows 100"), "{refused}");
}

#[test]
fn leases_carry_their_shards_bytes_only_when_the_offsets_are_well_formed() {
    let mut state = State::default();
    let (job, w1, w2) = inference_job(&mut state, 250, 100);
    state.inferences.get_mut(&job).expect("job").request.shard_byte_offsets = vec![0, 900, 1800, 2250];
    at(&mut state, 8, Command::JoinInference { job_id: job, workers: vec![w1, w2] }).expect("join");
    assert_eq!(lease(&mut state, job, w1).expect("shard 0").bytes, Some((0, 900)));
    assert_eq!(lease(&mut state, job, w2).expect("shard 1").bytes, Some((900, 1800)));
    for malformed in [vec![0, 900, 1800], vec![0, 1800, 900, 2250]] {
        let mut state = State::default();
        let (job, w1, w2) = inference_job(&mut state, 250, 100);
        state.inferences.get_mut(&job).expect("job").request.shard_byte_offsets = malformed;
        at(&mut state, 8, Command::JoinInference { job_id: job, workers: vec![w1, w2] }).expect("join");
        assert_eq!(lease(&mut state, job, w1).expect("shard 0").bytes, None, "the whole input is fetched");
    }
}

#[test]
fn an_inference_job_yields_its_workers_after_their_shard_and_takes_them_back_later() {
    let mut state = State::default();
    let (job, w1, w2) = inference_job(&mut state, 400, 100);
    at(&mut state, 8, Command::JoinInference { job_id: job, workers: vec![w1, w2] }).expect("join");
    let a = lease(&mut state, job, w1).expect("shard 0");
    assert_eq!(
        at(&mut state, 9, Command::YieldInference { job_id: job }),
        Ok(Applied::InferenceChanged { job_id: job })
    );
    let event = state.inferences[&job].events.last().expect("an event").clone();
    assert_eq!(event.kind, "yield");
    assert!(event.message.starts_with(&format!("{w1}, {w2} go back to idle after their shard")), "{event:?}");
    // w1 holds shard 0: a repeated lease still gets it, and its commit counts.
    assert_eq!(lease(&mut state, job, w1), Some(a.clone()));
    at(&mut state, 10, commit_shard(job, w1, &a, stats(100, 90))).expect("the shard held is committed");
    // At its next lease w1 goes back to idle, though shards are left; w2 is lost meanwhile.
    assert_eq!(
        at(&mut state, 11, Command::LeaseShard { job_id: job, worker_id: w1 }),
        Ok(Applied::ShardLeased { lease: None, released: true })
    );
    assert_eq!(state.workers[&w1].job, None);
    let lost = Command::WorkerLost { worker_id: w2, last_step_seen: 0, last_heard_unix_ms: 0 };
    at(&mut state, 12, lost).expect("lost");
    let inference = &state.inferences[&job];
    assert!(inference.members.is_empty() && inference.yielding.is_empty(), "{inference:?}");
    assert_eq!((inference.state, inference.wants_workers()), (JobState::Running, 2));
    // A second order with nobody to yield adds no event; joined again, a worker leases as before.
    let events = inference.events.len();
    at(&mut state, 13, Command::YieldInference { job_id: job }).expect("no-op");
    assert_eq!(state.inferences[&job].events.len(), events);
    at(&mut state, 14, Command::JoinInference { job_id: job, workers: vec![w1] }).expect("join again");
    assert_eq!(lease(&mut state, job, w1).map(|l| l.index), Some(1));
}

#[test]
fn an_inference_job_leases_commits_and_finishes_exactly_once() {
    let mut state = State::default();
    let (job, w1, w2) = inference_job(&mut state, 250, 100);
    assert_eq!(state.inferences[&job].shards.len(), 3);
    assert_eq!(state.inferences[&job].request.batch_size, INFERENCE_BATCH_DEFAULT);
    assert!(at(&mut state, 8, Command::JoinInference { job_id: job, workers: vec![w1, w1] }).is_err());
    at(&mut state, 8, Command::JoinInference { job_id: job, workers: vec![w1, w2] }).expect("join");
    assert_eq!(state.inferences[&job].state, JobState::Running);
    let a = lease(&mut state, job, w1).expect("shard 0");
    assert_eq!(lease(&mut state, job, w1), Some(a.clone()), "a repeated lease gets the same shard");
    let b = lease(&mut state, job, w2).expect("shard 1");
    assert_eq!((a.index, b.index, b.first_row, b.rows), (0, 1, 100, 100));
    let commit = |state: &mut State, l: &ShardLease, worker_id, correct| {
        at(
            state,
            60,
            Command::CommitShard {
                job_id: job,
                worker_id,
                index: l.index,
                attempt: l.attempt,
                object: l.object.clone(),
                stats: stats(l.rows, correct),
            },
        )
    };
    let wrong = at(
        &mut state,
        60,
        Command::CommitShard {
            job_id: job,
            worker_id: w1,
            index: 0,
            attempt: a.attempt,
            object: "x".into(),
            stats: stats(99, 0),
        },
    );
    assert!(matches!(wrong, Err(Rejected::BadShardReport { .. })), "{wrong:?}");
    let elsewhere = Command::CommitShard {
        job_id: job,
        worker_id: w1,
        index: 0,
        attempt: a.attempt,
        object: "file:///tmp/part-00000.csv".into(),
        stats: stats(a.rows, 0),
    };
    let refused = at(&mut state, 60, elsewhere);
    assert!(
        matches!(refused, Err(Rejected::BadShardReport { ref reason, .. }) if reason.contains("_attempts/part-00000-a")),
        "{refused:?}"
    );
    assert_eq!(commit(&mut state, &a, w1, 90), Ok(Applied::ShardCommitted { job_id: job, complete: false }));
    assert!(matches!(commit(&mut state, &a, w1, 90), Err(Rejected::ShardDone { .. })), "the first commit wins");
    // w2 is lost holding shard 1: it goes back to the queue and w1 takes it.
    at(&mut state, 70, Command::WorkerLost { worker_id: w2, last_step_seen: 0, last_heard_unix_ms: 0 }).expect("lost");
    let job_state = &state.inferences[&job];
    assert_eq!(job_state.shards[1].state, ShardState::Pending);
    assert_eq!(job_state.members, vec![w1]);
    assert!(job_state.events.iter().any(|e| e.kind == "worker_lost"));
    let c = lease(&mut state, job, w1).expect("shard 1 again");
    assert_eq!((c.index, c.attempt > b.attempt), (1, true));
    // The lost worker's late commit of the old attempt still counts (its object is complete);
    // the retry's commit is then refused, so its object is never promoted.
    assert_eq!(commit(&mut state, &b, w2, 80), Ok(Applied::ShardCommitted { job_id: job, complete: false }));
    assert!(matches!(commit(&mut state, &c, w1, 80), Err(Rejected::ShardDone { .. })));
    let d = lease(&mut state, job, w1).expect("shard 2");
    assert!(matches!(
        at(&mut state, 80, Command::InferenceFinished { job_id: job, success: true, reason: String::new() }),
        Err(Rejected::BadInference(_))
    ));
    assert_eq!(commit(&mut state, &d, w1, 45), Ok(Applied::ShardCommitted { job_id: job, complete: true }));
    assert_eq!(lease(&mut state, job, w1), None, "nothing left: released");
    assert_eq!(state.workers[&w1].job, None);
    let totals = state.inferences[&job].totals();
    assert_eq!((totals.rows, totals.correct, totals.class_counts[0]), (250, 215, 250));
    assert_eq!(state.inferences[&job].retries(), 1);
    at(&mut state, 90, Command::InferenceFinished { job_id: job, success: true, reason: String::new() }).expect("end");
    assert_eq!(state.inferences[&job].state, JobState::Succeeded);
    assert!(matches!(
        at(&mut state, 91, Command::CancelJob { job_id: job, reason: String::new() }),
        Err(Rejected::JobFinished { .. })
    ));
}

#[test]
fn a_shard_failing_too_often_fails_the_job_and_cancel_frees_members() {
    let mut state = State::default();
    let (job, w1, _) = inference_job(&mut state, 10, 0);
    at(&mut state, 8, Command::JoinInference { job_id: job, workers: vec![w1] }).expect("join");
    for failure in 1..=SHARD_FAILURES_MAX {
        let l = lease(&mut state, job, w1).expect("lease");
        let error = "line 3, column 2: `x` is not a number".to_string();
        at(
            &mut state,
            9,
            Command::FailShard {
                job_id: job,
                worker_id: w1,
                index: l.index,
                attempt: l.attempt,
                error,
                release: false,
            },
        )
        .expect("fail");
        assert_eq!(state.inferences[&job].state == JobState::Failed, failure == SHARD_FAILURES_MAX);
    }
    assert!(state.inferences[&job].reason.contains("`x` is not a number"), "{}", state.inferences[&job].reason);
    assert_eq!(state.workers[&w1].job, None, "members are freed");

    let mut state = State::default();
    let (job, w1, _) = inference_job(&mut state, 10, 0);
    at(&mut state, 8, Command::JoinInference { job_id: job, workers: vec![w1] }).expect("join");
    lease(&mut state, job, w1).expect("lease");
    at(&mut state, 9, Command::CancelJob { job_id: job, reason: String::new() }).expect("cancel");
    assert_eq!((state.inferences[&job].state, state.workers[&w1].job), (JobState::Cancelled, None));
}

#[test]
fn one_output_per_running_job_retries_go_to_another_member_and_reports_cannot_overflow() {
    let mut state = State::default();
    let (job, w1, w2) = inference_job(&mut state, 30, 10);
    let mut request = state.inferences[&job].request.clone();
    let second = at(
        &mut state,
        7,
        Command::SubmitInference { request: Box::new(request.clone()), client_request_id: "i2".into() },
    );
    assert!(
        matches!(second, Err(Rejected::BadInference(ref m)) if m.contains("is writing to file:///out")),
        "{second:?}"
    );
    request.output_uri = "file:///elsewhere".into();
    at(&mut state, 7, Command::SubmitInference { request: Box::new(request), client_request_id: "i3".into() })
        .expect("another output is fine");

    at(&mut state, 8, Command::JoinInference { job_id: job, workers: vec![w1, w2] }).expect("join");
    let l = lease(&mut state, job, w1).expect("shard 0");
    let error = "disk full".to_string();
    at(
        &mut state,
        9,
        Command::FailShard { job_id: job, worker_id: w1, index: l.index, attempt: l.attempt, error, release: false },
    )
    .expect("fail");
    assert_ne!(lease(&mut state, job, w1).map(|l| l.index), Some(l.index), "not the shard it just failed");
    assert_eq!(lease(&mut state, job, w2).map(|l| l.index), Some(l.index), "the other member retries it");

    let overflow = ShardStats { rows: 10, labelled_rows: 0, correct: 0, class_counts: vec![u64::MAX, 11, 0] };
    let sent = at(
        &mut state,
        10,
        Command::CommitShard {
            job_id: job,
            worker_id: w2,
            index: l.index,
            attempt: l.attempt + 2,
            object: "o".into(),
            stats: overflow,
        },
    );
    assert!(matches!(sent, Err(Rejected::BadShardReport { .. })), "{sent:?}");
}

#[test]
fn a_job_being_finalized_cannot_be_cancelled() {
    let mut state = State::default();
    let (job, w1, _) = inference_job(&mut state, 10, 10);
    at(&mut state, 8, Command::JoinInference { job_id: job, workers: vec![w1] }).expect("join");
    let l = lease(&mut state, job, w1).expect("lease");
    assert_eq!(
        at(&mut state, 9, commit_shard(job, w1, &l, stats(10, 10))),
        Ok(Applied::ShardCommitted { job_id: job, complete: true })
    );
    let cancel = at(&mut state, 10, Command::CancelJob { job_id: job, reason: String::new() });
    assert!(
        matches!(cancel, Err(Rejected::BadInference(ref m)) if m.contains("cannot be cancelled now")),
        "{cancel:?}"
    );
}

#[test]
fn a_stuck_lease_times_out_by_the_jobs_own_pace_and_its_worker_leaves() {
    let mut state = State::default();
    let (job, w1, w2) = inference_job(&mut state, 30, 10);
    at(&mut state, 8, Command::JoinInference { job_id: job, workers: vec![w1, w2] }).expect("join");
    let leased_at = 50; // `lease` stamps t = 50
    let a = lease(&mut state, job, w1).expect("shard 0");
    let b = lease(&mut state, job, w2).expect("shard 1");
    let j = &state.inferences[&job];
    assert_eq!(j.lease_timeout_ms(), LEASE_TIMEOUT_FIRST_MS, "before any commit: the first-shard limit");
    assert!(j.expired_leases(leased_at + LEASE_TIMEOUT_FIRST_MS).is_empty());
    // w1 commits after 2 s: the limit becomes max(10 x 2 s, 60 s) = 60 s.
    let commit = commit_shard(job, w1, &a, stats(10, 10));
    apply(&mut state, 60, Envelope::new(leased_at + 2_000, commit)).expect("commit");
    let j = &state.inferences[&job];
    assert_eq!(j.lease_timeout_ms(), LEASE_TIMEOUT_MIN_MS);
    let expired = j.expired_leases(leased_at + LEASE_TIMEOUT_MIN_MS + 1);
    assert_eq!(expired, vec![(b.index, w2, b.attempt, LEASE_TIMEOUT_MIN_MS + 1)], "w2 is stuck on shard 1");
    let give_up = Command::FailShard {
        job_id: job,
        worker_id: w2,
        index: b.index,
        attempt: b.attempt,
        error: "timed out".into(),
        release: true,
    };
    at(&mut state, 70, give_up).expect("give up");
    let j = &state.inferences[&job];
    assert_eq!((j.shards[1].state.clone(), j.members.clone()), (ShardState::Pending, vec![w1]));
    assert_eq!(state.workers[&w2].job, None, "the stuck worker left the job");
    let again = at(&mut state, 71, Command::JoinInference { job_id: job, workers: vec![w2] });
    assert_eq!(again, Err(Rejected::WorkerUnavailable(w2)), "and never joins it again");
    assert_eq!(lease(&mut state, job, w1).map(|l| l.index), Some(1), "another member retries it");
}

#[test]
fn hostile_reports_saturate_counters_and_unbounded_shapes_are_refused() {
    // Two generations that each claim to have reached step u64::MAX: the lost-steps counter
    // saturates instead of overflowing (a panic in apply on every replica).
    let mut state = State::default();
    running_job(&mut state, 10);
    let lost = || GenerationEnd::PeerLost { reason: "forged".into(), unreachable_rank: None };
    end(&mut state, 1, lost(), u64::MAX).expect("first end");
    let (w3, w4) = (register(&mut state, 600), register(&mut state, 601));
    at(&mut state, 602, Command::AssignGang { job_id: JobId(1), workers: vec![w3, w4] }).expect("assign");
    let generation = state.jobs[&JobId(1)].generation;
    end(&mut state, generation, lost(), u64::MAX).expect("second end");
    assert_eq!(state.jobs[&JobId(1)].steps_lost, u64::MAX);

    // A model whose reported shape would make every later summary allocate per class (or
    // divide by a non-positive scale) is refused before anything is registered.
    for (features_per_row, classes, feature_scale) in
        [(4, u32::MAX, 1.0), (4, 1, 1.0), (0, 3, 1.0), (MODEL_FEATURES_MAX + 1, 3, 1.0), (4, 3, f32::NAN), (4, 3, 0.0)]
    {
        let mut state = State::default();
        let refused = train_model(&mut state, ModelShape { features_per_row, classes, feature_scale });
        assert!(matches!(refused, Err(Rejected::BadReport(_))), "{features_per_row}x{classes}: {refused:?}");
        assert!(state.models.is_empty() && state.jobs[&JobId(1)].state == JobState::Running);
    }
}

#[test]
fn a_handover_regroups_on_the_announced_stop_checkpoint_before_its_write_is_confirmed() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    state.jobs.get_mut(&JobId(1)).expect("job").spec.checkpoint.keep = 1;
    let spare = register(&mut state, 5);
    checkpoint(&mut state, 20, 1).expect("checkpoint");
    at(&mut state, 10_000, spot_notice(w2, 130_000)).expect("notice");
    at(&mut state, 11_000, Command::HandoverReady { job_id: JobId(1), generation: 1, live: false }).expect("ready");
    let record = checkpoint_record;
    let ended = |generation: u64, step: u64, announced: CheckpointRecord| Command::GenerationEnded {
        job_id: JobId(1),
        generation,
        end: GenerationEnd::Checkpointed,
        step,
        reporter: Some(w1),
        announced: Some(announced),
    };
    // Rank 0 (w1) reports the stop at step 30 while it still writes that step's checkpoint.
    assert_eq!(
        at(&mut state, 12_000, ended(1, 30, record(30, 1, "f30"))),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Running })
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.generation, job.gang.clone(), job.generation_start_step), (2, vec![w1, spare], 30));
    assert_eq!((job.steps_lost, job.preemptions), (0, 1), "the next generation resumes from the stop step");
    let latest = job.latest_checkpoint.clone().expect("latest");
    assert_eq!(
        (latest.step, latest.pending, latest.writer, latest.manifest_sha256.as_str()),
        (30, true, Some(w1), "f30")
    );
    assert_eq!(job.retention_plan(), (vec![], vec![]), "the written checkpoint of step 20 stays until 30 is written");
    // Only its writer confirms it, with what it announced; then the older one may go.
    let confirm = |reporter: WorkerId, sha: &str| Command::RecordCheckpoint {
        job_id: JobId(1),
        checkpoint: record(30, 1, sha),
        reporter: Some(reporter),
    };
    assert!(matches!(at(&mut state, 12_100, confirm(spare, "f30")), Err(Rejected::NotAMember { .. })));
    assert!(matches!(at(&mut state, 12_100, confirm(w1, "other")), Err(Rejected::CheckpointMismatch { .. })));
    assert!(state.jobs[&JobId(1)].latest_checkpoint.as_ref().is_some_and(|c| c.pending));
    assert_eq!(
        at(&mut state, 12_200, confirm(w1, "f30")),
        Ok(Applied::CheckpointRecorded { job_id: JobId(1), step: 30 }),
        "confirmed although generation 2 runs by now"
    );
    let job = &state.jobs[&JobId(1)];
    assert!(job.latest_checkpoint.as_ref().is_some_and(|c| c.step == 30 && !c.pending));
    assert_eq!(job.retention_plan().0, vec![record(20, 1, "").uri], "step 20 is now beyond checkpoint.keep");
    // An announcement that does not describe the stop is ignored (the stop still counts).
    assert_eq!(
        at(&mut state, 13_100, ended(2, 50, record(49, 2, "f49"))),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Pending })
    );
    assert_eq!(state.jobs[&JobId(1)].latest_checkpoint.as_ref().map(|c| c.step), Some(30));
    // An announced checkpoint whose write never lands is given up once a newer one is written.
    at(&mut state, 14_000, Command::AssignGang { job_id: JobId(1), workers: vec![w1, spare] }).expect("assign");
    assert_eq!(
        at(&mut state, 15_000, ended(3, 60, record(60, 3, "f60"))),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Pending })
    );
    assert!(state.jobs[&JobId(1)].latest_checkpoint.as_ref().is_some_and(|c| c.step == 60 && c.pending));
    at(&mut state, 16_000, Command::AssignGang { job_id: JobId(1), workers: vec![w1, spare] }).expect("assign");
    checkpoint(&mut state, 80, 4).expect("a newer checkpoint");
    let job = &state.jobs[&JobId(1)];
    assert!(job.checkpoints.iter().any(|c| c.step == 60 && c.deleting), "{:?}", job.checkpoints);
    assert_eq!(job.latest_checkpoint.as_ref().map(|c| c.step), Some(80));
    let late = Command::RecordCheckpoint { job_id: JobId(1), checkpoint: record(60, 3, "f60"), reporter: Some(w1) };
    assert!(at(&mut state, 16_100, late).is_err(), "a late confirmation of a given-up checkpoint is refused");
}

#[test]
fn an_announced_checkpoint_missing_from_the_store_falls_back_to_the_newest_written_one() {
    let mut state = State::default();
    let (w1, _) = running_job(&mut state, 3);
    state.jobs.get_mut(&JobId(1)).expect("job").spec.checkpoint.keep = 1;
    checkpoint(&mut state, 20, 1).expect("checkpoint");
    // Generation 1 stops at 30 and announces it; nobody writes it (its writer died).
    let ended = Command::GenerationEnded {
        job_id: JobId(1),
        generation: 1,
        end: GenerationEnd::Checkpointed,
        step: 30,
        reporter: Some(w1),
        announced: Some(checkpoint_record(30, 1, "f30")),
    };
    at(&mut state, 5_000, ended).expect("ended");
    assert!(state.jobs[&JobId(1)].latest_checkpoint.as_ref().is_some_and(|c| c.step == 30 && c.pending));
    assert!(state.jobs[&JobId(1)].retention_plan().0.is_empty(), "the written step 20 is kept meanwhile");
    // The next gang holds nothing in memory and cannot read it from the store.
    at(&mut state, 6_000, Command::AssignGang { job_id: JobId(1), workers: vec![w1] }).expect("assign");
    let unusable = GenerationEnd::CheckpointUnusable { step: 30, reason: "no MANIFEST".into() };
    assert_eq!(
        end(&mut state, 2, unusable, 30),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Pending })
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!(job.latest_checkpoint.as_ref().map(|c| (c.step, c.pending)), Some((20, false)), "the written one");
    assert_eq!(job.steps_lost, 10, "steps 21-30 are trained again");
    let event = job.events.iter().rev().find(|e| e.kind == "checkpoint_corrupt").expect("event");
    assert!(event.message.ends_with("falling back to step 20; 10 step(s) lost"), "{}", event.message);
    assert!(job.checkpoints.iter().any(|c| c.step == 30 && c.deleting), "never resumed from again");
    let late =
        Command::RecordCheckpoint { job_id: JobId(1), checkpoint: checkpoint_record(30, 1, "f30"), reporter: Some(w1) };
    assert!(at(&mut state, 7_000, late).is_err(), "nor confirmed later");
}

#[test]
fn a_survivor_of_a_broken_gang_announces_the_state_it_holds_and_the_break_loses_no_step() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    checkpoint(&mut state, 20, 1).expect("checkpoint");
    let broke = |generation: u64, step: u64, reporter: WorkerId, announced: Option<CheckpointRecord>| {
        Command::GenerationEnded {
            job_id: JobId(1),
            generation,
            end: GenerationEnd::PeerLost { reason: "rank 1 was lost".into(), unreachable_rank: None },
            step,
            reporter: Some(reporter),
            announced,
        }
    };
    // w2 died after step 37; w1 reached step 37 and holds that state: it announces it.
    assert_eq!(
        at(&mut state, 5_000, broke(1, 37, w1, Some(checkpoint_record(37, 1, "f37")))),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Pending })
    );
    let job = &state.jobs[&JobId(1)];
    let latest = job.latest_checkpoint.clone().expect("latest");
    assert_eq!((latest.step, latest.pending, latest.writer), (37, true, Some(w1)), "resumed from the held state");
    assert_eq!((job.steps_lost, job.recoveries), (0, 1));
    let event = job.events.iter().rev().find(|e| e.kind == "peer_lost").expect("event");
    assert!(event.message.contains("at step 37 (the survivors hold its state); 0 step(s) lost"), "{}", event.message);
    // The same report again (its call crossed a leader change) is acknowledged, changing nothing,
    // so that its rank writes what it announced.
    let before = state.jobs[&JobId(1)].clone();
    assert_eq!(
        at(&mut state, 5_005, broke(1, 37, w1, Some(checkpoint_record(37, 1, "f37")))),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Pending })
    );
    assert_eq!(state.jobs[&JobId(1)], before);
    // The other survivor's report of the same break is refused: only the first one's writer confirms.
    assert!(at(&mut state, 5_010, broke(1, 36, w2, Some(checkpoint_record(36, 1, "f36")))).is_err());
    assert!(at(&mut state, 5_010, broke(1, 37, w2, Some(checkpoint_record(37, 1, "f37")))).is_err());
    let confirm = |reporter: WorkerId| Command::RecordCheckpoint {
        job_id: JobId(1),
        checkpoint: checkpoint_record(37, 1, "f37"),
        reporter: Some(reporter),
    };
    assert!(matches!(at(&mut state, 5_100, confirm(w2)), Err(Rejected::NotAMember { .. })));
    assert_eq!(at(&mut state, 5_200, confirm(w1)), Ok(Applied::CheckpointRecorded { job_id: JobId(1), step: 37 }));
    // Without an announcement (a command job, an old agent) the break goes back to the newest checkpoint.
    at(&mut state, 6_000, Command::AssignGang { job_id: JobId(1), workers: vec![w1, w2] }).expect("assign");
    assert_eq!(
        at(&mut state, 7_000, broke(2, 45, w1, None)),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Pending })
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.latest_checkpoint.as_ref().map(|c| c.step), job.steps_lost), (Some(37), 8));
}

#[test]
fn a_member_lost_silently_ends_its_generation_at_the_survivors_report_with_no_step_lost() {
    let mut state = State::default();
    let (w1, w2) = running_job(&mut state, 3);
    checkpoint(&mut state, 20, 1).expect("checkpoint");
    // w2's lease expires (frozen): the job keeps running while w1 is told to report.
    at(&mut state, 5_000, Command::WorkerLost { worker_id: w2, last_step_seen: 31, last_heard_unix_ms: 0 })
        .expect("lost");
    let job = &state.jobs[&JobId(1)];
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.member_lost, Some(MemberLost { worker: w2, at_unix_ms: 5_000, last_step_seen: 31 }));
    assert!(job.events.iter().any(|e| e.kind == "member_lost" && e.message.contains("worker-2 was lost")));
    // w1 stops waiting in its all-reduce and reports the break with the state it holds.
    let broke = Command::GenerationEnded {
        job_id: JobId(1),
        generation: 1,
        end: GenerationEnd::PeerLost { reason: "aborted by the coordinator".into(), unreachable_rank: None },
        step: 33,
        reporter: Some(w1),
        announced: Some(checkpoint_record(33, 1, "f33")),
    };
    assert_eq!(
        at(&mut state, 5_200, broke),
        Ok(Applied::GenerationEnded { job_id: JobId(1), state: JobState::Pending })
    );
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.steps_lost, job.member_lost.clone()), (0, None));
    assert_eq!(job.latest_checkpoint.as_ref().map(|c| (c.step, c.pending)), Some((33, true)));
    // The leader's fallback comes too late: refused.
    assert!(at(&mut state, 8_000, Command::GangLost { job_id: JobId(1), generation: 1 }).is_err());
    // A second silent loss while one is reported on: requeued at once (w3 is w1's new peer).
    let w3 = register(&mut state, 9);
    at(&mut state, 9_000, Command::AssignGang { job_id: JobId(1), workers: vec![w1, w3] }).expect("assign");
    at(&mut state, 9_500, Command::WorkerLost { worker_id: w3, last_step_seen: 40, last_heard_unix_ms: 0 })
        .expect("lost");
    at(&mut state, 9_600, Command::WorkerLost { worker_id: w1, last_step_seen: 40, last_heard_unix_ms: 0 })
        .expect("lost");
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.state, job.steps_lost), (JobState::Pending, 7), "steps 34-40 are trained again");
    // Counted to the last progress report: a lower bound, and the event says so.
    let event = job.events.iter().rev().find(|e| e.kind == "worker_lost").expect("event");
    assert!(
        event.message.ends_with("at least 7 step(s) lost (counted to the gang's last progress report)"),
        "{}",
        event.message
    );
}

/// A Cancelled or Failed job resumes from its newest checkpoint, its failures counted from 0,
/// with a spec that changes only what a resume may (its length, budget, workers ...); a job
/// still waiting or running, or a change of what it trains, is refused and named; a job that
/// succeeded trains further only with a longer length.
#[test]
fn a_stopped_job_resumes_from_its_newest_checkpoint_and_a_finished_one_trains_further() {
    let mut state = State::default();
    running_job(&mut state, 1);
    checkpoint(&mut state, 40, 1).expect("checkpoint");
    let resume = |state: &mut State, spec: Option<JobSpec>| {
        apply(state, 600, Envelope::new(600, Command::ResumeJob { job_id: JobId(1), spec: spec.map(Box::new) }))
    };
    let refused = resume(&mut state, None).expect_err("a running job does not resume");
    assert_eq!(refused.to_string(), "job-1 is Running; only a Failed, Cancelled or Succeeded job can be resumed");
    apply(&mut state, 50, Envelope::new(50, Command::CancelJob { job_id: JobId(1), reason: String::new() }))
        .expect("cancel");

    // What it trains may not change; its length must go past the checkpoint; a spent budget
    // must be raised.
    let mut other = state.jobs[&JobId(1)].spec.clone();
    other.model = Some(crate::spec::ModelSpec::Mlp { hidden: vec![8] });
    other.train.learning_rate = 0.5;
    let refused = resume(&mut state, Some(other)).expect_err("another model");
    assert!(
        refused.to_string().starts_with(
            "job-1 cannot resume: model, train (but for its length, validation and targets) may not change (its \
             checkpoint"
        ),
        "{refused}"
    );
    let mut shorter = state.jobs[&JobId(1)].spec.clone();
    shorter.train.length = crate::spec::TrainLength::Steps(40);
    let refused = resume(&mut state, Some(shorter)).expect_err("no step left");
    assert!(
        refused.to_string().ends_with("step 40, where it resumes; raise train.steps (--set train.steps=N)"),
        "{refused}"
    );
    state.jobs.get_mut(&JobId(1)).expect("the job").cost_usd = 5.0;
    let mut spent = state.jobs[&JobId(1)].spec.clone();
    spent.capacity.budget_usd = Some(5.0);
    let refused = resume(&mut state, Some(spent.clone())).expect_err("budget spent");
    assert!(
        refused.to_string().ends_with("= 5.00 is spent (5.00 USD charged); raise it (--set capacity.budget_usd=N)")
    );
    assert_eq!(state.jobs[&JobId(1)].state, JobState::Cancelled, "a refused resume changes nothing");

    // A longer run with a raised budget and another gang size resumes from step 40.
    spent.capacity.budget_usd = Some(8.0);
    spent.train.length = crate::spec::TrainLength::Steps(500);
    spent.workers.min = 1;
    spent.workers.max = 1;
    spent.train.validate_every_steps = 100; // evaluating reads the weights only
    assert_eq!(resume(&mut state, Some(spent.clone())), Ok(Applied::JobResumed { job_id: JobId(1), from_step: 40 }));
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.state, state.shown_state(job)), (JobState::Pending, JobState::Recovering));
    assert_eq!((&job.spec, job.reason.as_str()), (&spent, "resumed: waiting for workers to resume from step 40"));
    let said = &job.events.last().expect("an event").message;
    assert_eq!(said, "resumed from step 40; it was Cancelled (cancelled by user)");
    let refused = resume(&mut state, None).expect_err("a waiting job does not resume");
    assert_eq!(refused.to_string(), "job-1 is Pending; only a Failed, Cancelled or Succeeded job can be resumed");

    // The next gang starts from the checkpoint; a failure then counts from 0 again.
    let free = register(&mut state, 601);
    apply(&mut state, 602, Envelope::new(602, Command::AssignGang { job_id: JobId(1), workers: vec![free] }))
        .expect("assign");
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.generation, job.generation_start_step, job.failures), (2, 40, 0));

    // A job that succeeded trains further only with a longer length of the same kind; its final
    // metrics go (the next end reports its own).
    submit(&mut state, 700, "done").expect("submit");
    let done = state.jobs.get_mut(&JobId(2)).expect("the job");
    let metrics = FinalMetrics { val_accuracy: Some(0.9), val_loss: None, train_loss: None, val_step: 0 };
    (done.state, done.step, done.metrics) = (JobState::Succeeded, 31, Some(metrics));
    done.reason.clear();
    let epochs = |n| {
        let mut spec = state.jobs[&JobId(2)].spec.clone();
        spec.train.length = crate::spec::TrainLength::Epochs(n);
        spec
    };
    let (same, longer) = (epochs(1), epochs(3));
    let resume_done = |state: &mut State, spec: Option<JobSpec>| {
        apply(state, 701, Envelope::new(701, Command::ResumeJob { job_id: JobId(2), spec: spec.map(Box::new) }))
    };
    for spec in [
        None,
        Some(same),
        Some(JobSpec {
            train: crate::spec::TrainSpec { length: crate::spec::TrainLength::Steps(500), ..longer.train.clone() },
            ..longer.clone()
        }),
    ] {
        let refused = resume_done(&mut state, spec).expect_err("not longer, or another kind");
        assert!(
            refused.to_string().starts_with("job-2 is Succeeded; it trained its whole length: a resume with a longer")
        );
    }
    assert_eq!(resume_done(&mut state, Some(longer)), Ok(Applied::JobResumed { job_id: JobId(2), from_step: 0 }));
    let job = &state.jobs[&JobId(2)];
    assert_eq!(
        (job.state, job.metrics, job.spec.train.length),
        (JobState::Pending, None, crate::spec::TrainLength::Epochs(3))
    );
    assert_eq!(job.events.last().expect("an event").message, "resumed from the start; it was Succeeded");
}

/// A job whose learning rate decays over its length (`train.lr_schedule`) resumes only with
/// that length: another would change the rate of the steps it trained.
#[test]
fn a_decaying_schedule_keeps_its_length_on_a_resume() {
    let mut state = State::default();
    running_job(&mut state, 1);
    checkpoint(&mut state, 40, 1).expect("checkpoint");
    apply(&mut state, 50, Envelope::new(50, Command::CancelJob { job_id: JobId(1), reason: String::new() }))
        .expect("cancel");
    state.jobs.get_mut(&JobId(1)).expect("the job").spec.train.lr_schedule = crate::spec::LrSchedule::Cosine;
    let resume = |state: &mut State, spec: Option<JobSpec>| {
        apply(state, 600, Envelope::new(600, Command::ResumeJob { job_id: JobId(1), spec: spec.map(Box::new) }))
    };
    let mut longer = state.jobs[&JobId(1)].spec.clone();
    longer.train.length = crate::spec::TrainLength::Steps(5_000);
    let refused = resume(&mut state, Some(longer)).expect_err("another length");
    assert!(
        refused.to_string().starts_with(
            "job-1 cannot resume: train.lr_schedule = \"cosine\" decays over the job's length: a new length would"
        ),
        "{refused}"
    );
    assert_eq!(state.jobs[&JobId(1)].state, JobState::Cancelled, "a refused resume changes nothing");
    assert_eq!(resume(&mut state, None), Ok(Applied::JobResumed { job_id: JobId(1), from_step: 40 }));
    // Once it succeeded, it does not train further: its rate reached the end of its course.
    state.jobs.get_mut(&JobId(1)).expect("the job").state = JobState::Succeeded;
    let mut longer = state.jobs[&JobId(1)].spec.clone();
    longer.train.length = crate::spec::TrainLength::Steps(5_000);
    let refused = resume(&mut state, Some(longer)).expect_err("a finished cosine job");
    assert!(
        refused.to_string().ends_with("fine-tune its registered model in a new job (train.init_from)"),
        "{refused}"
    );
}
