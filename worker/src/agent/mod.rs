//! The worker agent's control loop: register with the cluster's join token (the answer carries
//! this worker's own credential, sent with every later call), then heartbeat on the lease the
//! coordinator hands out, re-registering if the coordinator declared this worker lost. Follows
//! the leader through the failover client. Stops cleanly on `shutdown`, saying it leaves
//! ([`leave`]) so that the cluster records it as gone in order, not lost.
//!
//! Assignments build on this loop: [`work`] follows this worker's assignment stream and runs
//! each rank with the job's runner (the built-in trainer or the user's command); [`inference`]
//! runs batch-inference shards.

mod builtin;
pub use builtin::{WARM_UP_PASSES, warm_up};
mod command;
pub mod inference;
pub mod work;

use std::future::Future;
use std::time::Duration;

use flotilla_proto::client::ApiClient;
use flotilla_proto::v1::{HeartbeatRequest, LeaveRequest, RegisterWorkerRequest, WorkerCapabilities};
use flotilla_proto::{ApiError, ErrorKind};

use crate::checkpoint::peer::HELD;

/// Heartbeat interval used if the coordinator names none (or an absurd one).
const HEARTBEAT_FALLBACK: Duration = Duration::from_secs(1);
const HEARTBEAT_MIN: Duration = Duration::from_millis(100);
/// One registration or heartbeat attempt against one coordinator: short, so that a coordinator
/// cut off the network costs a fraction of the lease before the next one is tried.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a stopping agent tries to say it leaves: the coordinator refuses while it still
/// counts the worker in a job, which the gang's report (or a live swap's) ends within moments;
/// under the lease (5 s), after which the worker is declared lost anyway.
const LEAVE_DEADLINE: Duration = Duration::from_secs(4);
const LEAVE_RETRY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The cluster refused this worker (wrong join token, no workers accepted): retrying will
    /// not help.
    #[error("the cluster refused this worker: {0}")]
    Refused(ApiError),
    #[error("coordinator: {0}")]
    Api(ApiError),
}

impl From<ApiError> for AgentError {
    fn from(e: ApiError) -> Self {
        match e.kind {
            ErrorKind::Unauthenticated | ErrorKind::PermissionDenied => AgentError::Refused(e),
            _ => AgentError::Api(e),
        }
    }
}

/// What this machine offers, as sent at registration.
pub fn local_capabilities(identity: &crate::identity::WorkerIdentity) -> WorkerCapabilities {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024);
    let hostname = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    WorkerCapabilities {
        cpus,
        gpus: identity.gpus,
        memory_bytes,
        instance_id: identity.instance_id.clone(),
        instance_type: identity.instance_type.clone(),
        zone: identity.zone.clone(),
        hostname,
        data_addr: identity.data_addr.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

/// Registers and heartbeats until `shutdown` resolves. `on_registered` sees each worker id.
/// `shared.beat_now` sends the next heartbeat at once (after a broken gang, so the coordinator
/// knows this worker is alive before it regroups; after a handover's preparation); every
/// heartbeat carries `shared`'s prepared job.
pub async fn run(
    client: &mut ApiClient,
    capabilities: WorkerCapabilities,
    shutdown: impl Future<Output = ()>,
    shared: &work::AgentShared,
    mut on_registered: impl FnMut(&str),
) -> Result<(), AgentError> {
    let beat_now = &shared.beat_now;
    tokio::pin!(shutdown);
    client.attempt_timeout = ATTEMPT_TIMEOUT;
    loop {
        let request = RegisterWorkerRequest { capabilities: Some(capabilities.clone()) };
        let registered = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = client.call_cluster(|mut c| {
                let request = request.clone();
                async move { c.register_worker(request).await }
            }) => r?,
        };
        // Every later call (this loop's and every clone's: assignments, reports, shards)
        // carries this worker's own credential.
        client.set_worker_credential(&registered.credential).map_err(AgentError::Refused)?;
        on_registered(&registered.worker_id);
        let interval = Duration::from_millis(registered.heartbeat_interval_ms);
        let interval = if interval < HEARTBEAT_MIN { HEARTBEAT_FALLBACK } else { interval };
        loop {
            // The wait and the heartbeat both race the shutdown: a heartbeat to a coordinator
            // that is gone retries for its whole deadline (30 s), and a shutdown is not kept
            // waiting for it.
            let beat = async {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = beat_now.notified() => {}
                }
                let held = HELD.held_job();
                crate::metrics::AGENT.held_state_bytes.set(HELD.held_bytes().try_into().unwrap_or(i64::MAX));
                let request = HeartbeatRequest {
                    worker_id: registered.worker_id.clone(),
                    prepared_job_id: shared.prepared(),
                    held_job_id: held.as_ref().map(|(job, _)| job.clone()).unwrap_or_default(),
                    held_step: held.as_ref().map(|(_, step)| *step),
                };
                let answer = client
                    .call_cluster(|mut c| {
                        let request = request.clone();
                        async move { c.heartbeat(request).await }
                    })
                    .await;
                (held, answer)
            };
            let answer = tokio::select! {
                _ = &mut shutdown => {
                    leave(client, &registered.worker_id).await;
                    return Ok(());
                }
                answer = beat => answer,
            };
            let (held, answer) = answer;
            match answer {
                Ok(beat) if beat.unknown_worker => break, // declared lost: register again
                Ok(beat) => {
                    if beat.drop_held
                        && let Some((job, step)) = held
                        && HELD.drop_obsolete(&job, step)
                    {
                        tracing::info!(
                            job = %job,
                            step,
                            "dropped the state held in memory: the job has ended or recorded a newer checkpoint"
                        );
                    }
                }
                Err(e) => match AgentError::from(e) {
                    refused @ AgentError::Refused(_) => return Err(refused),
                    AgentError::Api(e) => eprintln!("heartbeat failed, retrying: {e}"),
                },
            }
        }
    }
}

/// Tells the cluster this worker is gone (its work done, handed over or drained): it reads as
/// Left at once, instead of Lost once its lease runs out. Retried while the coordinator still
/// counts it in a job, up to [`LEAVE_DEADLINE`]; a worker that cannot say so is declared lost
/// by its lease, as before.
async fn leave(client: &mut ApiClient, worker_id: &str) {
    let started = std::time::Instant::now();
    let request = LeaveRequest { worker_id: worker_id.to_string() };
    client.deadline = LEAVE_DEADLINE;
    loop {
        let answer = client
            .call_cluster(|mut c| {
                let request = request.clone();
                async move { c.leave(request).await }
            })
            .await;
        match answer {
            Ok(_) => {
                tracing::info!(worker = worker_id, "left the cluster");
                return;
            }
            Err(e) if e.kind == ErrorKind::FailedPrecondition && started.elapsed() + LEAVE_RETRY < LEAVE_DEADLINE => {
                tracing::debug!(error = %e, "not free to leave yet");
                tokio::time::sleep(LEAVE_RETRY).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not tell the coordinator this worker leaves; its lease runs out instead");
                return;
            }
        }
    }
}
