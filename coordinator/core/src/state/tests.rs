use super::*;
use crate::ids::{JobId, WorkerId};
use crate::spec::JobSpec;

fn spec(name: &str) -> JobSpec {
    JobSpec::from_toml_str(&format!(
        "name = \"{name}\"\nmodel = {{ kind = \"mlp\" }}\ndata = {{ train = \"synthetic:blobs\" }}\nworkers = {{ min = 1 }}\n"
    ))
    .expect("valid spec")
}

fn submit(state: &mut State, index: u64, request: &str) -> Result<Applied, Rejected> {
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

#[test]
fn workers_register_and_are_lost() {
    let mut state = State::default();
    let info = WorkerInfo {
        cpus: 2,
        gpus: 0,
        memory_bytes: 1 << 30,
        instance_id: "local-1".into(),
        instance_type: "local".into(),
        zone: "local".into(),
        hostname: "h".into(),
        data_addr: "127.0.0.1:9000".into(),
    };
    let registered = apply(&mut state, 1, Envelope::new(10, Command::RegisterWorker { info }));
    assert_eq!(registered, Ok(Applied::WorkerRegistered { worker_id: WorkerId(1) }));
    let lost = apply(&mut state, 2, Envelope::new(20, Command::WorkerLost { worker_id: WorkerId(1) }));
    assert_eq!(lost, Ok(Applied::WorkerLost { worker_id: WorkerId(1) }));
    assert_eq!(state.workers[&WorkerId(1)].lost_at_unix_ms, Some(20));
    let unknown = apply(&mut state, 3, Envelope::new(30, Command::WorkerLost { worker_id: WorkerId(9) }));
    assert_eq!(unknown, Err(Rejected::WorkerNotFound(WorkerId(9))));
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
    assert_eq!(Envelope::decode(&envelope.encode()).expect("decodes"), envelope);
    assert!(Envelope::decode(b"\x00\x01").is_err());
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

fn register(state: &mut State, index: u64) -> WorkerId {
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
    match apply(state, index, Envelope::new(index, Command::RegisterWorker { info })) {
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
        metrics: Some(FinalMetrics { val_accuracy: Some(0.92), val_loss: Some(0.3), train_loss: None }),
    };
    assert!(matches!(apply(&mut state, 5, Envelope::new(5, finish(7))), Err(Rejected::StaleGeneration { .. })));
    assert_eq!(apply(&mut state, 6, Envelope::new(6, finish(1))), Ok(Applied::JobFinished { job_id: JobId(1) }));
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.state, job.step, job.world_size), (JobState::Succeeded, 192, 2));
    assert_eq!(job.metrics.and_then(|m| m.val_accuracy), Some(0.92));
    assert!(state.workers.values().all(|w| w.job.is_none()), "workers are free again");
}

#[test]
fn losing_a_gang_member_requeues_the_job_and_cancel_frees_workers() {
    let mut state = State::default();
    submit(&mut state, 1, "a").expect("submit");
    let (w1, w2) = (register(&mut state, 2), register(&mut state, 3));
    apply(&mut state, 4, Envelope::new(4, Command::AssignGang { job_id: JobId(1), workers: vec![w1, w2] }))
        .expect("assign");
    apply(&mut state, 5, Envelope::new(5, Command::WorkerLost { worker_id: w2 })).expect("lost");
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.state, job.recoveries), (JobState::Pending, 1));
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
    };
    let recorded =
        apply(&mut state, 2, Envelope::new(2, Command::RecordCheckpoint { job_id: JobId(1), checkpoint: record(40) }));
    assert_eq!(recorded, Ok(Applied::CheckpointRecorded { job_id: JobId(1), step: 40 }));
    let older =
        apply(&mut state, 3, Envelope::new(3, Command::RecordCheckpoint { job_id: JobId(1), checkpoint: record(20) }));
    assert!(older.is_err(), "an older checkpoint never replaces a newer one");
    let job = &state.jobs[&JobId(1)];
    assert_eq!((job.step, job.latest_checkpoint.as_ref().map(|c| c.step)), (40, Some(40)));
}
