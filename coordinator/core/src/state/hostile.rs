//! Hostile worker input, for tests: well-formed commands with garbage in every field a worker
//! controls, as a worker holding a valid credential could make the leader propose them (the
//! API bounds text lengths and checks that a report names its own worker id; everything else
//! reaches `apply` as the worker sent it).
//!
//! The state tests' property and the coordinator's deterministic simulation both draw from
//! here, and check the same two things: applying them never panics, and never changes a job
//! the reporter is not part of ([`is_part_of`]).

use super::inference::{ShardStats, attempt_object};
use super::types::*;
use crate::ids::{JobId, WorkerId};

/// Longest text in a garbage report (the API's bound on reported text is larger; `apply`
/// bounds what it keeps).
pub const GARBAGE_TEXT_MAX: usize = 300;

/// The raw randomness of one report; every field of the command derives from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Garbage {
    /// Which report (taken modulo the number of kinds).
    pub kind: u8,
    /// The job it names (small, so that it often names a real one).
    pub job: u64,
    pub numbers: [u64; 5],
    pub text: String,
}

/// Half the time a plausible small value (0..8), half the time anything at all.
fn small_or_raw(x: u64) -> u64 {
    if x & 1 == 0 { (x >> 1) % 8 } else { x }
}

fn float(bits: u64) -> f64 {
    match bits % 4 {
        0 => f64::NAN,
        1 => f64::INFINITY,
        2 => (bits >> 2) as f64 / 1e6,
        _ => f64::from_bits(bits),
    }
}

/// The command a worker `reporter` could cause with `garbage`.
pub fn report(reporter: WorkerId, garbage: &Garbage) -> Command {
    let job_id = JobId(garbage.job);
    let [a, b, c, d, e] = garbage.numbers;
    let text: String = garbage.text.chars().take(GARBAGE_TEXT_MAX).collect();
    let reason = text.clone();
    match garbage.kind % 7 {
        0 => Command::RecordCheckpoint {
            job_id,
            checkpoint: CheckpointRecord {
                step: small_or_raw(a),
                uri: if b & 1 == 0 { format!("file:///s/jobs/{job_id}/ckpt/step-{}", b >> 1) } else { text },
                size_bytes: c,
                manifest_sha256: garbage.text.chars().take(64).collect(),
                epoch: small_or_raw(d),
                global_sample_offset: e,
                generation: small_or_raw(b >> 8),
                deleting: c & 1 == 1,
                pending: c & 4 == 4,
                writer: None,
            },
            reporter: Some(reporter),
        },
        1 => Command::GenerationEnded {
            job_id,
            generation: small_or_raw(a),
            end: match b % 5 {
                0 => GenerationEnd::Checkpointed,
                1 => GenerationEnd::PeerLost { reason, unreachable_rank: (e & 8 == 8).then_some((e >> 4) as u32 % 8) },
                2 => GenerationEnd::CheckpointUnusable { step: small_or_raw(c), reason },
                3 => GenerationEnd::StoreUnavailable { reason },
                _ => GenerationEnd::Error { reason },
            },
            step: small_or_raw(d),
            reporter: Some(reporter),
            // An announced checkpoint (valid in shape or not) now and then.
            announced: (c & 2 == 2).then(|| CheckpointRecord {
                step: small_or_raw(d),
                uri: format!("file:///s/jobs/{job_id}/ckpt/step-{}", e % 64),
                size_bytes: c,
                manifest_sha256: garbage.text.chars().take(64).collect(),
                epoch: 0,
                global_sample_offset: e,
                generation: small_or_raw(a),
                deleting: c & 8 == 8,
                pending: c & 16 == 16,
                writer: None,
            }),
        },
        2 => Command::JobFinished {
            job_id,
            generation: small_or_raw(a),
            success: b & 1 == 1,
            reason,
            step: small_or_raw(c),
            metrics: (d & 1 == 1).then(|| FinalMetrics {
                val_accuracy: Some(float(d)),
                val_loss: Some(float(e)),
                train_loss: None,
                val_step: e % 64,
            }),
            artifact: (b & 2 == 2).then(|| ModelArtifact {
                artifact_uri: text,
                dataset_sha256: garbage.text.chars().take(64).collect(),
                shape: ModelShape {
                    features_per_row: small_or_raw(d) as u32,
                    classes: small_or_raw(e) as u32,
                    feature_scale: float(c) as f32,
                },
            }),
            reporter: Some(reporter),
        },
        3 => {
            Command::WorkerInterrupted { worker_id: reporter, kind: text, action_at_unix_ms: (a & 1 == 1).then_some(b) }
        }
        4 => Command::LeaseShard { job_id, worker_id: reporter },
        5 => {
            let rows = small_or_raw(c);
            Command::CommitShard {
                job_id,
                worker_id: reporter,
                index: small_or_raw(a) as u32,
                attempt: small_or_raw(b),
                object: if d & 1 == 0 { attempt_object("file:///out", a as u32, b) } else { text },
                stats: ShardStats {
                    rows,
                    labelled_rows: if e & 1 == 0 { rows } else { small_or_raw(e) },
                    correct: small_or_raw(e >> 1),
                    class_counts: (0..(d % 5)).map(|i| if i == 0 { rows } else { small_or_raw(e >> i) }).collect(),
                },
            }
        }
        _ => Command::FailShard {
            job_id,
            worker_id: reporter,
            index: small_or_raw(a) as u32,
            attempt: small_or_raw(b),
            error: text,
            release: false,
        },
    }
}

/// Whether `worker` takes part in `job_id` (training: its current or just-ended gang, or a
/// handover's reserved replacement, which its own notice or loss gives up; inference: a
/// member, or the holder of one of its shards' attempts, the current lease's included): the
/// only jobs its reports may change.
pub fn is_part_of(state: &State, worker: WorkerId, job_id: JobId) -> bool {
    if let Some(job) = state.jobs.get(&job_id) {
        return job.is_member(worker) || job.reserved_replacements().any(|r| r == worker);
    }
    state.inferences.get(&job_id).is_some_and(|job| {
        job.members.contains(&worker) || job.shards.iter().any(|s| s.holders.iter().any(|(_, w)| *w == worker))
    })
}

/// Every job (training and inference) as JSON, to compare before and after a report.
pub fn jobs_json(state: &State) -> Vec<(JobId, String)> {
    let training = state.jobs.iter().map(|(id, job)| (*id, serde_json::to_string(job)));
    let inference = state.inferences.iter().map(|(id, job)| (*id, serde_json::to_string(job)));
    training.chain(inference).map(|(id, json)| (id, json.unwrap_or_else(|e| format!("unencodable: {e}")))).collect()
}

/// The jobs `reporter` is not part of, as JSON: what its report must leave unchanged.
pub fn foreign_jobs(state: &State, reporter: WorkerId) -> Vec<(JobId, String)> {
    jobs_json(state).into_iter().filter(|(id, _)| !is_part_of(state, reporter, *id)).collect()
}
