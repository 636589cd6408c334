//! `ClusterService`: worker registration (join token), heartbeats (leases in the leader's
//! memory) and the worker list. Assignments and reports arrive with the agents issue.

use std::sync::Arc;

use std::time::Duration;

use flotilla_core::state::{
    Applied, CheckpointRecord, Command, FinalMetrics, GenerationEnd as CoreEnd, JobState, State, StopReason, Worker,
    WorkerCondition, WorkerInfo as CoreWorkerInfo,
};
use flotilla_core::{JobId, WorkerId};
use flotilla_proto::convert::spec_to_proto;
use flotilla_proto::v1::cluster_service_server::ClusterService;
use flotilla_proto::v1::*;
use flotilla_proto::{ApiError, ErrorKind, auth};
use tonic::{Request, Response, Status};

use super::status;
use super::worker_auth::{self, Presented, acting_as};
use crate::leases::{HEARTBEAT_INTERVAL, LEASE, Leases};
use crate::metrics::Resumption;
use crate::raft::node::NodeHandle;

/// Longest text field in a worker's capabilities.
const CAPABILITY_TEXT_MAX: usize = 256;
/// Assignments buffered per worker stream.
const ASSIGNMENT_BUFFER: usize = 8;
/// A stream re-reads the state at least this often even without a change notification.
const ASSIGNMENT_POLL: Duration = Duration::from_millis(200);
/// Bytes of a worker's error text kept (its start and its end: `clip_middle`).
const REPORT_TEXT_MAX: usize = 4096;
/// A generation's first progress report within this many steps of its start ends a recovery.
const RECOVERY_FIRST_STEPS: u64 = 50;

pub struct ClusterApi {
    pub node: NodeHandle,
    pub tokens: auth::ApiTokens,
    /// `None`: this cluster accepts no workers.
    pub join_token: Option<String>,
    /// The server runs TLS: worker calls need a worker's client certificate.
    pub tls: bool,
    pub leases: Arc<Leases>,
    pub progress: Arc<crate::progress::Progress>,
    /// The cluster store: assignments name its job areas; checkpoint reports must be inside.
    pub store: flotilla_store::Location,
    /// Derives each gang's secret ([`gang_secret`]); the same on every coordinator.
    pub gang_key: [u8; 32],
    /// Replaces workers that get an interruption notice (the local provider; EC2 is the
    /// autoscaler's). `None`: replacements are someone else's business.
    pub replacer: Option<Arc<crate::replace::Replacer>>,
}

fn invalid(message: String) -> Status {
    status(ApiError::new(ErrorKind::InvalidArgument, message))
}

impl ClusterApi {
    /// The worker a call comes from (join token + its own credential).
    async fn worker<T>(&self, request: &Request<T>) -> Result<WorkerId, Status> {
        worker_auth::authenticate(&self.node, self.join_token.as_deref(), self.tls, request).await
    }

    fn require_leader(&self) -> Result<(), Status> {
        if self.node.status().leader_id == Some(self.node.id) { Ok(()) } else { Err(status(self.node.not_leader())) }
    }

    /// Refuses a report about `job_id` from `worker` unless it is a member of the job's gang.
    async fn require_member(&self, job_id: JobId, worker: WorkerId) -> Result<(), Status> {
        let member = self.node.read_local(move |state| state.jobs.get(&job_id).is_some_and(|j| j.is_member(worker)));
        if member.await.map_err(status)? {
            return Ok(());
        }
        let refused = flotilla_core::state::Rejected::NotAMember { worker, job_id };
        Err(status(ApiError::new(ErrorKind::PermissionDenied, refused.to_string())))
    }

    /// A worker's checkpoint reference as the record the state keeps, checked: only a folder of
    /// this job's checkpoint area (retention deletes what is recorded), a bounded manifest hash.
    fn checkpoint_record(
        &self,
        job_id: JobId,
        reference: CheckpointRef,
        generation: u64,
    ) -> Result<CheckpointRecord, Status> {
        if reference.manifest_sha256.len() > 64 {
            return Err(invalid("checkpoint.manifest_sha256 must be at most 64 characters".into()));
        }
        if crate::retention::checkpoint_key(&reference.uri, &self.store, job_id).is_none() {
            let area = format!("{}/jobs/{job_id}/ckpt/", self.store.uri());
            return Err(invalid(format!("checkpoint.uri must be one folder under {area}, got `{}`", reference.uri)));
        }
        let cursor = reference.cursor.unwrap_or_default();
        Ok(CheckpointRecord {
            step: reference.step,
            uri: reference.uri,
            size_bytes: reference.size_bytes,
            manifest_sha256: reference.manifest_sha256,
            epoch: u64::from(cursor.epoch),
            global_sample_offset: cursor.global_sample_offset,
            generation,
            deleting: false,
            pending: false,
            writer: None,
        })
    }
}

fn capabilities(caps: Option<WorkerCapabilities>) -> Result<CoreWorkerInfo, Status> {
    let caps = caps.ok_or_else(|| invalid("capabilities are required".into()))?;
    for (field, value) in [
        ("instance_id", &caps.instance_id),
        ("instance_type", &caps.instance_type),
        ("zone", &caps.zone),
        ("hostname", &caps.hostname),
        ("data_addr", &caps.data_addr),
    ] {
        if value.len() > CAPABILITY_TEXT_MAX {
            return Err(invalid(format!(
                "capabilities.{field} is {} bytes; at most {CAPABILITY_TEXT_MAX}",
                value.len()
            )));
        }
    }
    Ok(CoreWorkerInfo {
        cpus: caps.cpus,
        gpus: caps.gpus,
        memory_bytes: caps.memory_bytes,
        instance_id: caps.instance_id,
        instance_type: caps.instance_type,
        zone: caps.zone,
        hostname: caps.hostname,
        data_addr: caps.data_addr,
    })
}

fn worker_to_proto(
    replicated: &State,
    worker: &Worker,
    spare_of: Option<JobId>,
    last_heartbeat_unix_ms: u64,
    now_ms: u64,
) -> WorkerInfo {
    let state = match worker.condition(now_ms) {
        WorkerCondition::Idle => WorkerState::Idle,
        WorkerCondition::Busy => WorkerState::Busy,
        WorkerCondition::Draining => WorkerState::Draining,
        WorkerCondition::Suspect => WorkerState::Suspect,
        WorkerCondition::Unreachable => WorkerState::Unreachable,
        WorkerCondition::Lost => WorkerState::Lost,
        WorkerCondition::Left => WorkerState::Left,
    };
    let info = &worker.info;
    WorkerInfo {
        id: worker.id.to_string(),
        state: state.into(),
        capabilities: Some(WorkerCapabilities {
            cpus: info.cpus,
            gpus: info.gpus,
            memory_bytes: info.memory_bytes,
            instance_id: info.instance_id.clone(),
            instance_type: info.instance_type.clone(),
            zone: info.zone.clone(),
            hostname: info.hostname.clone(),
            data_addr: info.data_addr.clone(),
            version: String::new(),
        }),
        job_id: worker.job.map(|j| j.to_string()),
        rank: None,
        last_heartbeat_unix_ms,
        registered_at_unix_ms: worker.registered_at_unix_ms,
        gone_at_unix_ms: worker.lost_at_unix_ms,
        holds_state_of: replicated.rejoins(worker, now_ms).map(|j| j.to_string()),
        spare_of: spare_of.map(|j| j.to_string()),
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        worker_auth::check_certificate(&request, self.tls)?;
        worker_auth::check_join_token(request.metadata(), self.join_token.as_deref())?;
        let info = capabilities(request.into_inner().capabilities)?;
        let (secret, credential_sha256) = worker_auth::issue(worker_auth::random_secret()?);
        match self.node.propose(Command::RegisterWorker { info, credential_sha256 }).await.map_err(status)? {
            Applied::WorkerRegistered { worker_id } => {
                self.leases.renew(worker_id, self.node.status().term, None, None);
                Ok(Response::new(RegisterWorkerResponse {
                    worker_id: worker_id.to_string(),
                    lease_ms: LEASE.as_millis() as u64,
                    heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u64,
                    credential: format!("{worker_id}.{secret}"),
                }))
            }
            other => Err(status(ApiError::new(ErrorKind::Internal, format!("register produced {other:?}")))),
        }
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        self.require_leader()?;
        let id = match worker_auth::check(&self.node, self.join_token.as_deref(), self.tls, &request).await? {
            Presented::Valid(id) => acting_as(id, "worker_id", &request.get_ref().worker_id)?,
            // Unknown here (its registration was lost with a leader that never committed it):
            // it registers again.
            Presented::Unknown(id) => {
                acting_as(id, "worker_id", &request.get_ref().worker_id)?;
                return Ok(Response::new(HeartbeatResponse {
                    lease_ms: LEASE.as_millis() as u64,
                    unknown_worker: true,
                    drop_held: false,
                }));
            }
        };
        let (held, held_step) = (request.get_ref().held_job_id.clone(), request.get_ref().held_step);
        let (worker, drop_held) = self
            .node
            .read_local(move |state| {
                let worker =
                    state.workers.get(&id).filter(|w| w.lost_at_unix_ms.is_none()).map(|w| w.suspect_since_unix_ms);
                (worker, held_state_obsolete(state, &held, held_step))
            })
            .await
            .map_err(status)?;
        let live = worker.is_some();
        // A malformed job id reads as "nothing prepared": the handover then waits it out.
        let prepared = request.get_ref().prepared_job_id.parse().ok();
        if let Some(suspect_since) = worker {
            self.leases.renew(id, self.node.status().term, suspect_since, prepared);
            let holding = request.get_ref().held_job_id.parse().ok().filter(|_| !drop_held);
            self.leases.heard_holding(id, holding);
        }
        Ok(Response::new(HeartbeatResponse { lease_ms: LEASE.as_millis() as u64, unknown_worker: !live, drop_held }))
    }

    type WatchAssignmentsStream = tokio_stream::wrappers::ReceiverStream<Result<Assignment, Status>>;

    async fn watch_assignments(
        &self,
        request: Request<WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        let id = acting_as(self.worker(&request).await?, "worker_id", &request.get_ref().worker_id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(ASSIGNMENT_BUFFER);
        let store = self.store.uri();
        tokio::spawn(assignment_loop(self.node.clone(), id, store, self.gang_key, tx));
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn report_progress(&self, request: Request<ProgressReport>) -> Result<Response<Ack>, Status> {
        self.require_leader()?;
        let id = acting_as(self.worker(&request).await?, "worker_id", &request.get_ref().worker_id)?;
        let report = request.into_inner();
        let job_id: JobId = report.job_id.parse().map_err(|e| invalid(format!("job_id: {e}")))?;
        if report.joined_after_step > 0 {
            // A live handover's replacement took its rank: the state machine checks it is the
            // job's live replacement (or already swapped in, for a retried report).
            let swapped = Command::HandoverSwapped {
                job_id,
                generation: report.generation,
                replacement: id,
                step: report.joined_after_step,
                peer_bytes: report.resume_peer_bytes,
            };
            self.node.propose(swapped).await.map_err(status)?;
            return Ok(Response::new(Ack {}));
        }
        if !report.live_handover_failed.is_empty() {
            // One side of a live handover says it failed: the state machine checks it is one
            // (the leaving member or the replacement) and falls back to the stop at once.
            let failed = Command::LiveHandoverFailed {
                job_id,
                generation: report.generation,
                by: id,
                reason: flotilla_core::text::clip_middle(report.live_handover_failed.clone(), REPORT_TEXT_MAX),
            };
            self.node.propose(failed).await.map_err(status)?;
            return Ok(Response::new(Ack {}));
        }
        if report.live_swap_step > 0 {
            // A survivor timed a live swap: the job's status records it once (the first
            // survivor's report), and the leader's stall histogram counts it then.
            self.require_member(job_id, id).await?;
            let stall_ms = report.live_swap_stall_ms.max(0.0);
            let timed = Command::LiveSwapTimed {
                job_id,
                generation: report.generation,
                step: report.live_swap_step,
                stall_ms: stall_ms.round() as u64,
            };
            let applied = self.node.propose(timed).await.map_err(status)?;
            if matches!(applied, flotilla_core::state::Applied::TrainingResumed { recorded: true, .. }) {
                self.progress.handover_stall_seconds.observe(stall_ms / 1e3);
            }
            return Ok(Response::new(Ack {}));
        }
        if report.validation_only {
            self.require_member(job_id, id).await?;
            if let Some(accuracy) = report.val_accuracy {
                self.progress.validated(job_id, report.generation, accuracy, report.val_loss, report.val_step);
            }
            return Ok(Response::new(Ack {}));
        }
        let seen = self
            .node
            .read_local(move |state| {
                let job = state.jobs.get(&job_id).filter(|j| j.is_member(id))?;
                Some((crate::metrics::resumption(&job.events), job.generation_start_step))
            })
            .await;
        let Some((resumption, start_step)) = seen.map_err(status)? else {
            let refused = flotilla_core::state::Rejected::NotAMember { worker: id, job_id };
            return Err(status(ApiError::new(ErrorKind::PermissionDenied, refused.to_string())));
        };
        let first = self.progress.record(
            job_id,
            LiveProgress {
                step: report.step,
                loss: report.loss,
                samples_per_s: report.samples_per_s,
                eta_ms: report.eta_ms,
                total_steps: report.total_steps,
                generation: report.generation,
                val_accuracy: report.val_accuracy,
                val_loss: report.val_loss,
                val_step: report.val_step,
            },
        );
        // The first step of a generation that follows a loss ends a recovery, one that follows
        // a handover ends its stall (rank 0 reports its first step; a leader elected
        // mid-generation sees a later one and counts nothing).
        if first
            && report.step <= start_step + RECOVERY_FIRST_STEPS
            && let Some(resumption) = resumption
        {
            let now = crate::raft::node::now_unix_ms();
            let (histogram, since, handover, stopped_for) = match resumption {
                Resumption::Recovery { lost_at_unix_ms } => {
                    (Some(&self.progress.recovery_seconds), lost_at_unix_ms, false, None)
                }
                Resumption::Handover { stopped_at_unix_ms } => {
                    (Some(&self.progress.handover_stall_seconds), stopped_at_unix_ms, true, None)
                }
                Resumption::Restart { stopped_at_unix_ms, reason } => (None, stopped_at_unix_ms, false, Some(reason)),
                Resumption::Outage { stopped_at_unix_ms } => (None, stopped_at_unix_ms, false, None),
            };
            let stall_ms = now.saturating_sub(since);
            if let Some(histogram) = histogram {
                histogram.observe(stall_ms as f64 / 1e3);
            }
            // For the job's status and events, through Raft, off this report's path.
            let resumed = Command::TrainingResumed {
                job_id,
                generation: report.generation,
                stall_ms,
                handover,
                stopped_for,
                outage: matches!(resumption, Resumption::Outage { .. }),
                peer_bytes: report.resume_peer_bytes,
                storage_bytes: report.resume_storage_bytes,
            };
            let node = self.node.clone();
            tokio::spawn(async move {
                if let Err(e) = node.propose(resumed).await {
                    tracing::debug!(error = %e, "the stall was not recorded");
                }
            });
        }
        Ok(Response::new(Ack {}))
    }

    async fn report_checkpoint(&self, request: Request<CheckpointReport>) -> Result<Response<Ack>, Status> {
        let reporter = acting_as(self.worker(&request).await?, "worker_id", &request.get_ref().worker_id)?;
        let report = request.into_inner();
        let job_id: JobId = report.job_id.parse().map_err(|e| invalid(format!("job_id: {e}")))?;
        let reference = report.checkpoint.ok_or_else(|| invalid("checkpoint is required".into()))?;
        let checkpoint = self.checkpoint_record(job_id, reference, report.generation)?;
        self.node
            .propose(Command::RecordCheckpoint { job_id, checkpoint, reporter: Some(reporter) })
            .await
            .map_err(status)?;
        Ok(Response::new(Ack {}))
    }

    async fn report_interruption(
        &self,
        request: Request<InterruptionReport>,
    ) -> Result<Response<InterruptionAnswer>, Status> {
        let worker_id = acting_as(self.worker(&request).await?, "worker_id", &request.get_ref().worker_id)?;
        let report = request.into_inner();
        let kind = match InterruptionKind::try_from(report.kind) {
            Ok(InterruptionKind::SpotNotice) => "spot interruption",
            Ok(InterruptionKind::Rebalance) => flotilla_core::state::REBALANCE_KIND,
            Ok(InterruptionKind::Sigterm) => "SIGTERM",
            _ => return Err(invalid(format!("kind {} is not an interruption kind", report.kind))),
        };
        let action_at_unix_ms = report.action_at_unix_ms;
        let applied = self
            .node
            .propose(Command::WorkerInterrupted { worker_id, kind: kind.into(), action_at_unix_ms })
            .await
            .map_err(status)?;
        tracing::warn!(worker = %worker_id, kind, outcome = ?applied, "interruption notice");
        let (train_until_unix_ms, advisory) = match applied {
            flotilla_core::state::Applied::WorkerInterrupted { handover_until, advisory, .. } => {
                (handover_until.unwrap_or(0), advisory)
            }
            _ => (0, false),
        };
        // A notice means the cloud takes the machine: replace it. SIGTERM is an operator's
        // (or `flotilla down`'s) decision to stop this worker: no replacement.
        let taken = !matches!(InterruptionKind::try_from(report.kind), Ok(InterruptionKind::Sigterm));
        if let Some(replacer) = self.replacer.as_ref().filter(|_| taken) {
            let instance = self
                .node
                .read_local(move |state| state.workers.get(&worker_id).map(|w| w.info.instance_id.clone()))
                .await
                .map_err(status)?;
            if let Some(instance) = instance {
                replacer.replace(worker_id, instance);
            }
        }
        Ok(Response::new(InterruptionAnswer { train_until_unix_ms, advisory }))
    }

    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<Ack>, Status> {
        let worker_id = acting_as(self.worker(&request).await?, "worker_id", &request.get_ref().worker_id)?;
        self.node.propose(Command::WorkerLeft { worker_id }).await.map_err(status)?;
        // Its lease ends with it: the leader would otherwise declare it lost when it runs out.
        self.leases.forget(worker_id);
        tracing::info!(worker = %worker_id, "worker left");
        Ok(Response::new(Ack {}))
    }

    async fn report_finished(&self, request: Request<FinishedReport>) -> Result<Response<Ack>, Status> {
        let reporter = Some(acting_as(self.worker(&request).await?, "worker_id", &request.get_ref().worker_id)?);
        let report = request.into_inner();
        let job_id: JobId = report.job_id.parse().map_err(|e| invalid(format!("job_id: {e}")))?;
        let metrics = report.metrics.map(|m| FinalMetrics {
            val_accuracy: m.val_accuracy,
            val_loss: m.val_loss,
            train_loss: m.train_loss,
            val_step: m.val_step,
        });
        let reason = flotilla_core::text::clip_middle(report.error.clone(), REPORT_TEXT_MAX);
        let (generation, step) = (report.generation, report.step);
        let ended = |end| Command::GenerationEnded { job_id, generation, end, step, reporter, announced: None };
        // Rank 0's orderly stop, or a broken gang's survivor, may announce the checkpoint of the
        // step it stopped at while it still writes it.
        let announcing = |end| -> Result<Command, Status> {
            let announced =
                report.final_checkpoint.clone().map(|r| self.checkpoint_record(job_id, r, generation)).transpose()?;
            Ok(Command::GenerationEnded { job_id, generation, end, step, reporter, announced })
        };
        let command = match GenerationEnd::try_from(report.end) {
            Ok(GenerationEnd::Finished) => {
                let artifact = (!report.artifact_uri.is_empty()
                    && report.artifact_uri.len() <= CAPABILITY_TEXT_MAX * 8)
                    .then(|| flotilla_core::state::ModelArtifact {
                        artifact_uri: report.artifact_uri.clone(),
                        dataset_sha256: report.dataset_sha256.chars().take(64).collect(),
                        shape: flotilla_core::state::ModelShape {
                            features_per_row: report.features_per_row,
                            classes: report.classes,
                            feature_scale: report.feature_scale,
                        },
                    });
                // A command job's artifact (its newest checkpoint) has no input shape; whether the
                // job may report none is the state machine's to decide (it knows the spec).
                if let Some(artifact) = artifact.as_ref().filter(|a| !a.shape.is_none()) {
                    artifact.shape.check().map_err(|e| invalid(format!("the model's {e}")))?;
                }
                Command::JobFinished {
                    job_id,
                    generation,
                    success: report.success,
                    reason,
                    step,
                    metrics,
                    artifact,
                    reporter,
                }
            }
            Ok(GenerationEnd::Checkpointed) => announcing(CoreEnd::Checkpointed)?,
            Ok(GenerationEnd::PeerLost) => {
                announcing(CoreEnd::PeerLost { reason, unreachable_rank: report.unreachable_rank })?
            }
            Ok(GenerationEnd::CheckpointUnusable) => {
                ended(CoreEnd::CheckpointUnusable { step: report.unusable_checkpoint_step, reason })
            }
            Ok(GenerationEnd::RetryableError) => ended(CoreEnd::Error { reason }),
            Ok(GenerationEnd::StoreUnavailable) => ended(CoreEnd::StoreUnavailable { reason }),
            Err(_) => return Err(invalid(format!("end {} is not a generation end", report.end))),
        };
        self.node.propose(command).await.map_err(status)?;
        Ok(Response::new(Ack {}))
    }

    async fn list_instances(
        &self,
        request: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        self.tokens.authorize(request.metadata(), auth::Role::Read, "read instances").map_err(status)?;
        let request = request.into_inner();
        let (all, limit) = (request.all, super::page_limit(request.limit));
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(instance_page_key(token).ok_or_else(|| super::bad_page_token(token))?),
        };
        let now = crate::raft::node::now_unix_ms();
        let mut answer =
            self.node.read(move |state| instances_to_proto(state, all, now, after, limit)).await.map_err(status)?;
        answer.served_by = self.node.id;
        Ok(Response::new(answer))
    }

    async fn list_workers(
        &self,
        request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        self.tokens.authorize(request.metadata(), auth::Role::Read, "read workers").map_err(status)?;
        let leases = self.leases.clone();
        let request = request.into_inner();
        let limit = super::page_limit(request.limit);
        let after: Option<WorkerId> = super::page_after(&request.page_token)?;
        let (workers, next) = self
            .node
            .read(move |state| {
                let sorted = state.workers.values().map(|w| (w.id, w));
                let (page, next) = super::page(sorted, after, limit);
                let now_ms = crate::raft::node::now_unix_ms();
                let heard = |w: &Worker| leases.last_heartbeat_unix_ms(w.id);
                let spares: std::collections::BTreeMap<WorkerId, JobId> =
                    flotilla_core::state::warm_spares(state).into_iter().collect();
                let spare_of = |w: &Worker| spares.get(&w.id).copied();
                let page: Vec<WorkerInfo> =
                    page.into_iter().map(|w| worker_to_proto(state, w, spare_of(w), heard(w), now_ms)).collect();
                (page, next)
            })
            .await
            .map_err(status)?;
        let next_page_token = next.map(|id| id.to_string()).unwrap_or_default();
        Ok(Response::new(ListWorkersResponse { workers, served_by: self.node.id, next_page_token }))
    }
}

/// Instances are listed newest first: the page key orders them so.
type InstanceKey = (std::cmp::Reverse<u64>, std::cmp::Reverse<String>);

/// A page token `<launched_at_unix_ms>:<instance id>` as its key.
fn instance_page_key(token: &str) -> Option<InstanceKey> {
    let (launched, id) = token.split_once(':')?;
    Some((std::cmp::Reverse(launched.parse().ok()?), std::cmp::Reverse(id.to_string())))
}

fn instances_to_proto(
    state: &State,
    all: bool,
    now_unix_ms: u64,
    after: Option<InstanceKey>,
    limit: usize,
) -> ListInstancesResponse {
    let mut records: Vec<_> = state
        .instances
        .values()
        .filter(|i| all || i.terminated_at_unix_ms.is_none())
        .map(|i| ((std::cmp::Reverse(i.launched_at_unix_ms), std::cmp::Reverse(i.id.clone())), i))
        .collect();
    records.sort_by(|a, b| a.0.cmp(&b.0));
    let (records, next) = super::page(records.into_iter(), after, limit);
    let next_page_token = next.map(|(launched, id)| format!("{}:{}", launched.0, id.0)).unwrap_or_default();
    let instances = records
        .into_iter()
        .map(|i| {
            let worker = state.workers.values().find(|w| w.info.instance_id == i.id && w.lost_at_unix_ms.is_none());
            InstanceInfo {
                id: i.id.clone(),
                request_id: i.request_id.clone(),
                instance_type: i.instance_type.clone(),
                zone: i.zone.clone(),
                spot: i.spot,
                usd_per_hour: i.usd_per_hour,
                launched_at_unix_ms: i.launched_at_unix_ms,
                terminated_at_unix_ms: i.terminated_at_unix_ms,
                cost_usd: i.cost_usd(now_unix_ms),
                worker_id: worker.map(|w| w.id.to_string()),
                job_id: worker.and_then(|w| w.job).map(|j| j.to_string()),
            }
        })
        .collect();
    let total_cost_usd = state.instances.values().map(|i| i.cost_usd(now_unix_ms)).sum();
    ListInstancesResponse { instances, total_cost_usd, served_by: 0, next_page_token }
}

/// Whether the state an agent holds in memory of the training job `held` (its
/// [`HeartbeatRequest::held_job_id`], at step `held_step`) can no longer be taken by a gang: the
/// job has ended or is no longer recorded (retention forgets only finished jobs), or it recorded
/// a written checkpoint newer than that step (its next generation resumes from that one or a
/// later one, whose fingerprint the held state cannot match). Then the agent drops it. An agent
/// keeps a state through other work and idleness until then: the job's own finishing gang drops
/// it at once; a worker outside that gang, one of a cancelled job, or a member whose gang has
/// trained past the state it started from learns it here. An empty or malformed id names nothing
/// held.
fn held_state_obsolete(state: &State, held: &str, held_step: Option<u64>) -> bool {
    let Ok(job) = held.parse::<JobId>() else { return false };
    let Some(job) = state.jobs.get(&job).filter(|job| !job.state.is_terminal()) else { return true };
    held_step
        .is_some_and(|held| job.latest_checkpoint.iter().chain(&job.checkpoints).any(|c| !c.pending && c.step > held))
}

/// What a worker should be doing, by the replicated state.
#[derive(Debug, Clone, PartialEq)]
enum Desired {
    /// Unknown or declared lost: it must stop and register again.
    Gone,
    Idle,
    /// Interrupted and without work: it should exit (the instance is going away).
    Drain,
    /// Train `job` in `generation`; carries the assignment to send, and whether the gang must
    /// checkpoint at its next step boundary.
    Train {
        job: JobId,
        generation: u64,
        assignment: Box<TrainAssignment>,
        checkpoint_now: bool,
        /// The earliest time a noticed member's instance is taken (unix ms; 0: none named).
        deadline_unix_ms: u64,
        /// To a handover's leaving member once the gang stops for it: the replacement's data
        /// port, where it pushes its stop-step state (see [`handover_key`]).
        handover_to: Option<String>,
        /// To a live handover's leaving member: the replacement's data port, where it streams
        /// its state and every step's update while the gang trains on.
        live_to: Option<String>,
        /// To rank 0 of a job with warm spares: their data ports, where it pushes each
        /// checkpoint it records (empty for other ranks and jobs).
        spares: Vec<String>,
        /// A member of the gang went silent: stop waiting for it and report (see
        /// `CheckpointNow.member_lost`).
        member_lost: bool,
    },
    /// Reserved as the replacement in `job`'s handover: load its data before the gang stops.
    Prepare {
        job: JobId,
        prepare: Box<PrepareJob>,
    },
    /// Run inference shards of `job` (a member of it). `joins` changes whenever workers join
    /// it: the assignment is sent again, and an agent whose loop ended (released) restarts it.
    Infer {
        job: JobId,
        joins: u64,
        assignment: Box<InferAssignment>,
    },
}

fn infer_assignment(job: &flotilla_core::state::InferenceJob) -> InferAssignment {
    InferAssignment {
        job_id: job.id.to_string(),
        model: Some(flotilla_proto::convert::model_to_proto(&job.model_spec)),
        model_artifact_uri: job.artifact_uri.clone(),
        features_per_row: job.shape.features_per_row,
        classes: job.shape.classes,
        feature_scale: job.shape.feature_scale,
        input_uri: job.request.input_uri.clone(),
        output_uri: job.request.output_uri.clone(),
        batch_size: job.request.batch_size,
        input_bytes: job.request.input_bytes,
    }
}

/// The key gang secrets derive from: from the peer token, which every coordinator of the
/// cluster holds and nothing else does, so each derives the same secrets.
pub fn gang_key(peer_token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::new().chain_update(b"flotilla gang key v1\0").chain_update(peer_token.as_bytes()).finalize().into()
}

/// The secret of `job`'s generation `generation`: what its ranks prove to each other at the
/// ring rendezvous. A new generation gets a new one.
pub fn gang_secret(key: &[u8; 32], job: JobId, generation: u64) -> Vec<u8> {
    derive(key, &format!("{job}/{generation}"))
}

/// The key of a handover out of `job`'s generation `generation`: the leaving member proves it
/// when it pushes its stop-step state to the replacement, which proves it back. Only those two
/// are told it, and it opens nothing else (not the gang's ring).
pub fn handover_key(key: &[u8; 32], job: JobId, generation: u64) -> Vec<u8> {
    derive(key, &format!("{job}/{generation}/handover"))
}

fn derive(key: &[u8; 32], label: &str) -> Vec<u8> {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(label.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// What worker `id` should be doing at `now_ms` (the leader's clock: a noticed holder of a
/// waiting job's state idles while it may rejoin the job's next gang, then drains).
fn desired(state: &State, id: WorkerId, store: &str, gang_key: &[u8; 32], now_ms: u64) -> Desired {
    let Some(worker) = state.workers.get(&id).filter(|w| w.lost_at_unix_ms.is_none()) else { return Desired::Gone };
    if let Some(job) = worker.job.and_then(|j| state.inferences.get(&j)).filter(|j| j.state == JobState::Running) {
        return Desired::Infer { job: job.id, joins: job.joins, assignment: Box::new(infer_assignment(job)) };
    }
    let Some(job) = worker.job.and_then(|j| state.jobs.get(&j)).filter(|j| j.state == JobState::Running) else {
        if worker.draining {
            // A noticed holder of a waiting job's state keeps it for the job's next gang.
            return if state.rejoins(worker, now_ms).is_some() { Desired::Idle } else { Desired::Drain };
        }
        // A warm spare prepares too; it accepts the push of a handover out of the current
        // generation (one may reserve it) without waiting for one.
        let prepare = |job: &flotilla_core::state::Job, spare: bool| Desired::Prepare {
            job: job.id,
            prepare: Box::new(PrepareJob {
                job_id: job.id.to_string(),
                spec: Some(spec_to_proto(&job.spec)),
                generation: job.generation,
                handover_key: handover_key(gang_key, job.id, job.generation),
                spare,
            }),
        };
        if let Some(job) = flotilla_core::state::reserving_job(state, id) {
            // A live handover's replacement takes the leaving member's own assignment and joins
            // the running gang in its place (no new generation).
            let live = job.live_handover().filter(|h| h.replacement == Some(id));
            if let Some(rank) = live
                .filter(|_| job.checkpoint_requested.is_none())
                .and_then(|h| job.gang.iter().position(|w| *w == h.leaving))
            {
                let mut assignment = train_assignment(state, job, rank, store, gang_key);
                assignment.joins_live = true;
                assignment.handover_key = handover_key(gang_key, job.id, job.generation);
                return Desired::Train {
                    job: job.id,
                    generation: job.generation,
                    assignment: Box::new(assignment),
                    checkpoint_now: false,
                    deadline_unix_ms: 0,
                    handover_to: None,
                    live_to: None,
                    spares: Vec::new(),
                    member_lost: false,
                };
            }
            return prepare(job, false);
        }
        return match flotilla_core::state::spare_for(state, id) {
            Some(job) => prepare(job, true),
            None => Desired::Idle,
        };
    };
    let rank = job.gang.iter().position(|w| *w == id).unwrap_or(0);
    let assignment = train_assignment(state, job, rank, store, gang_key);
    let rank = rank as u32;
    let spares = if rank == 0 { spare_addrs(state, job.id) } else { Vec::new() };
    // A handover's leaving member learns its replacement's data port once the gang stops for
    // it (it pushes its stop-step state there) or, live, at once (it streams while training).
    let handover = job.handover_of(id);
    let replacement_addr =
        handover.and_then(|h| state.workers.get(&h.replacement?)).map(|replacement| replacement.info.data_addr.clone());
    let live = handover.is_some_and(|h| h.is_live());
    let (handover_to, live_to) = match job.checkpoint_requested {
        Some(StopReason::Handover) => (replacement_addr, None),
        None if live => (None, replacement_addr),
        _ => (None, None),
    };
    Desired::Train {
        job: job.id,
        generation: job.generation,
        assignment: Box::new(assignment),
        checkpoint_now: job.checkpoint_requested.is_some(),
        handover_to,
        live_to,
        spares,
        member_lost: job.member_lost.is_some(),
        deadline_unix_ms: job
            .gang
            .iter()
            .filter_map(|w| state.workers.get(w).and_then(|w| w.notice_action_at_unix_ms))
            .min()
            .unwrap_or(0),
    }
}

/// The assignment of rank `rank` of `job`'s running generation.
fn train_assignment(
    state: &State,
    job: &flotilla_core::state::Job,
    rank: usize,
    store: &str,
    gang_key: &[u8; 32],
) -> TrainAssignment {
    let peers: Vec<Peer> = job
        .gang
        .iter()
        .enumerate()
        .map(|(rank, w)| Peer {
            rank: rank as u32,
            worker_id: w.to_string(),
            data_addr: state.workers.get(w).map(|w| w.info.data_addr.clone()).unwrap_or_default(),
        })
        .collect();
    TrainAssignment {
        job_id: job.id.to_string(),
        spec: Some(spec_to_proto(&job.spec)),
        generation: job.generation,
        rank: rank as u32,
        world_size: job.gang.len() as u32,
        peers,
        nccl_unique_id: Vec::new(),
        resume_from: job.latest_checkpoint.as_ref().map(|c| resume_point(state, c)),
        init_uri: job.init_artifact_uri.clone().unwrap_or_default(),
        job_prefix: format!("{store}/jobs/{}", job.id),
        gang_secret: gang_secret(gang_key, job.id, job.generation),
        joins_live: false,
        handover_key: Vec::new(),
        // A member that rejoined though noticed trains on while its replacement is sought
        // (told any noticed member; one noticed while it trains already runs its generation).
        train_until_unix_ms: job
            .gang
            .get(rank)
            .and_then(|w| job.handover_of(*w))
            .and_then(|h| h.deadline_unix_ms())
            .unwrap_or(0),
    }
}

/// Where a generation resumes: the job's newest checkpoint. One announced and not yet written
/// is waited for in the store (its writer still saves it) only while its writer lives: a writer
/// lost before it confirmed the write may never finish it, so the ranks read it once and, when
/// they find it partial, fall back at once to the newest written one (before, they waited out
/// the write's allowance first: 10 s for a few MB).
fn resume_point(state: &State, c: &flotilla_core::state::CheckpointRecord) -> flotilla_proto::v1::CheckpointRef {
    let writer_lives = c.writer.and_then(|w| state.workers.get(&w)).is_some_and(|w| w.lost_at_unix_ms.is_none());
    flotilla_proto::v1::CheckpointRef {
        pending: c.pending && writer_lives,
        ..flotilla_proto::convert::checkpoint_to_proto(c)
    }
}

/// The data ports of `job`'s warm spares ([`flotilla_core::state::spares_of`]: at most its
/// `capacity.spares`), in worker order.
fn spare_addrs(state: &State, job: JobId) -> Vec<String> {
    flotilla_core::state::spares_of(state, job)
        .into_iter()
        .filter_map(|w| state.workers.get(&w))
        .map(|w| w.info.data_addr.clone())
        .filter(|addr| !addr.is_empty())
        .collect()
}

/// Streams a worker's assignments: a `TrainAssignment` when its gang forms, `StopJob` when the
/// job ends or is cancelled under it, `Drain` when it is no longer a member of the cluster;
/// `Spares` to rank 0 of a job with warm spares whenever they change.
async fn assignment_loop(
    mut node: NodeHandle,
    id: WorkerId,
    store: String,
    gang_key: [u8; 32],
    tx: tokio::sync::mpsc::Sender<Result<Assignment, Status>>,
) {
    let mut current: Option<(JobId, u64)> = None;
    let mut checkpoint_sent = false;
    let mut member_lost_sent = false;
    // The replacement a live handover's order named last (a new one is told again).
    let mut live_sent: Option<String> = None;
    let mut drain_sent = false;
    // The PrepareJob sent last: a spare later reserved for its job's handover (or a spare of
    // the job's next generation) is told again.
    let mut prepared: Option<PrepareJob> = None;
    // The spares rank 0 of the current generation was told of (none yet: an empty list).
    let mut spares_sent: Vec<String> = Vec::new();
    loop {
        let store = store.clone();
        let now_ms = crate::raft::node::now_unix_ms();
        let Ok(want) = node.read_local(move |state| desired(state, id, &store, &gang_key, now_ms)).await else {
            return;
        };
        let message = match (&want, current) {
            (Desired::Gone, _) => Some(assignment::Kind::Drain(Drain { reason: format!("{id} is not a live member") })),
            (Desired::Train { job, generation, deadline_unix_ms, live_to: Some(addr), .. }, Some(now))
                if now == (*job, *generation) && live_sent.as_ref() != Some(addr) =>
            {
                live_sent = Some(addr.clone());
                Some(assignment::Kind::CheckpointNow(CheckpointNow {
                    job_id: job.to_string(),
                    generation: *generation,
                    deadline_unix_ms: *deadline_unix_ms,
                    handover_to_addr: addr.clone(),
                    handover_key: handover_key(&gang_key, *job, *generation),
                    member_lost: false,
                    live: true,
                }))
            }
            (
                Desired::Train { job, generation, checkpoint_now, deadline_unix_ms, handover_to, member_lost, .. },
                Some(now),
            ) if now == (*job, *generation) => {
                let lost = *member_lost && !std::mem::replace(&mut member_lost_sent, true);
                let order = *checkpoint_now && !std::mem::replace(&mut checkpoint_sent, true);
                (lost || order).then(|| {
                    assignment::Kind::CheckpointNow(CheckpointNow {
                        member_lost: *member_lost,
                        job_id: job.to_string(),
                        generation: *generation,
                        deadline_unix_ms: *deadline_unix_ms,
                        handover_key: match handover_to {
                            Some(_) => handover_key(&gang_key, *job, *generation),
                            None => Vec::new(),
                        },
                        handover_to_addr: handover_to.clone().unwrap_or_default(),
                        live: false,
                    })
                })
            }
            (Desired::Train { job, generation, assignment, .. }, _) => {
                current = Some((*job, *generation));
                checkpoint_sent = false;
                member_lost_sent = false;
                live_sent = None;
                spares_sent.clear();
                prepared = None; // free again later, it prepares again
                Some(assignment::Kind::Train(assignment.as_ref().clone()))
            }
            (Desired::Infer { job, joins, .. }, Some(now)) if now == (*job, *joins) => None,
            (Desired::Infer { job, joins, assignment }, _) => {
                current = Some((*job, *joins));
                Some(assignment::Kind::Infer(assignment.as_ref().clone()))
            }
            (Desired::Drain, _) if !drain_sent => {
                drain_sent = true;
                current = None;
                Some(assignment::Kind::Drain(Drain { reason: format!("{id} was interrupted; it gets no more work") }))
            }
            (Desired::Drain, _) => None,
            (Desired::Prepare { prepare, .. }, _) => {
                let sent = Some(prepare.as_ref().clone());
                (std::mem::replace(&mut prepared, sent.clone()) != sent)
                    .then(|| assignment::Kind::Prepare(prepare.as_ref().clone()))
            }
            (Desired::Idle, Some((job, generation))) => {
                current = None;
                Some(assignment::Kind::Stop(StopJob {
                    job_id: job.to_string(),
                    generation,
                    reason: "the job ended".into(),
                }))
            }
            (Desired::Idle, None) => None,
        };
        if let Some(kind) = message
            && tx.send(Ok(Assignment { kind: Some(kind) })).await.is_err()
        {
            return;
        }
        if let Desired::Train { job, generation, spares, .. } = &want
            && current == Some((*job, *generation))
            && *spares != spares_sent
        {
            spares_sent.clone_from(spares);
            let kind = assignment::Kind::Spares(Spares {
                job_id: job.to_string(),
                generation: *generation,
                data_addrs: spares.clone(),
                key: handover_key(&gang_key, *job, *generation),
            });
            if tx.send(Ok(Assignment { kind: Some(kind) })).await.is_err() {
                return;
            }
        }
        if want == Desired::Gone {
            return;
        }
        let _ = tokio::time::timeout(ASSIGNMENT_POLL, node.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use flotilla_core::state::{Envelope, apply};

    use super::*;

    fn register(state: &mut State, index: u64) -> WorkerId {
        let info = crate::testing::worker_info(index);
        let register = Command::RegisterWorker { info, credential_sha256: String::new() };
        match apply(state, index, Envelope::new(index * 1000, register)) {
            Ok(Applied::WorkerRegistered { worker_id }) => worker_id,
            other => panic!("the worker registers: {other:?}"),
        }
    }

    #[test]
    fn a_held_state_is_dropped_once_no_gang_can_take_it() {
        let mut state = State::default();
        let spec = "name = \"held\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\n\
                    workers = { min = 1, max = 1 }\n";
        let submit = Command::SubmitJob {
            spec: Box::new(flotilla_core::spec::JobSpec::from_toml_str(spec).expect("spec")),
            client_request_id: "held".into(),
        };
        apply(&mut state, 1, Envelope::new(1000, submit)).expect("submit");
        let worker = register(&mut state, 2);
        let obsolete = |state: &State, held: &str, step| held_state_obsolete(state, held, step);
        assert!(!obsolete(&state, "job-1", Some(40)), "a queued job may take its state back");
        let assign = Command::AssignGang { job_id: JobId(1), workers: vec![worker] };
        apply(&mut state, 3, Envelope::new(3000, assign)).expect("assign");
        assert!(!obsolete(&state, "job-1", Some(40)), "a running job may stop and regroup");
        assert!(!obsolete(&state, "", None), "nothing held");
        assert!(!obsolete(&state, "not a job", Some(1)), "a malformed id names nothing");
        assert!(obsolete(&state, "job-9", None), "a job the cluster does not record (forgotten)");
        // Checkpoints: the state of the step a next generation resumes from, or of a later step
        // (a survivor's after a break), is kept; an older one is dropped once a newer checkpoint
        // is written, not while it is only announced.
        let checkpoint = |step, pending| CheckpointRecord {
            step,
            uri: format!("file:///s/jobs/job-1/ckpt/{step}"),
            size_bytes: 1,
            manifest_sha256: "ab".repeat(32),
            epoch: 0,
            global_sample_offset: 0,
            generation: 1,
            deleting: false,
            pending,
            writer: None,
        };
        state.jobs.get_mut(&JobId(1)).expect("job").latest_checkpoint = Some(checkpoint(40, true));
        assert!(!obsolete(&state, "job-1", Some(20)), "the newer one is still being written");
        state.jobs.get_mut(&JobId(1)).expect("job").latest_checkpoint = Some(checkpoint(40, false));
        assert!(obsolete(&state, "job-1", Some(20)), "trained past it");
        assert!(!obsolete(&state, "job-1", Some(40)), "the resume point");
        assert!(!obsolete(&state, "job-1", Some(45)), "newer than the checkpoint");
        assert!(!obsolete(&state, "job-1", None), "no step named (an older agent): the job's end decides");
        let cancel = Command::CancelJob { job_id: JobId(1), reason: String::new() };
        apply(&mut state, 4, Envelope::new(4000, cancel)).expect("cancel");
        assert!(obsolete(&state, "job-1", Some(40)), "cancelled: no gang will take it");
        assert!(obsolete(&state, "job-1", None));
    }

    #[test]
    fn a_warm_spare_prepares_its_job_and_accepts_a_handover_push_without_awaiting_one() {
        let mut state = State::default();
        let submit = |name: &str, spares: u32| Command::SubmitJob {
            spec: Box::new(
                flotilla_core::spec::JobSpec::from_toml_str(&format!(
                    "name = \"{name}\"\nmodel = {{ kind = \"mlp\" }}\ndata = {{ train = \"synthetic:blobs\" }}\n\
                     workers = {{ min = 1, max = 1 }}\ncapacity = {{ spares = {spares} }}\n"
                ))
                .expect("spec"),
            ),
            client_request_id: name.into(),
        };
        apply(&mut state, 1, Envelope::new(1000, submit("none", 0))).expect("submit");
        let workers: Vec<WorkerId> = (2..5).map(|index| register(&mut state, index)).collect();
        let assign = Command::AssignGang { job_id: JobId(1), workers: vec![workers[0]] };
        apply(&mut state, 5, Envelope::new(5000, assign)).expect("assign");
        let key = gang_key("token");
        assert_eq!(desired(&state, workers[2], "file:///s", &key, 0), Desired::Idle, "no job keeps spares");
        apply(&mut state, 6, Envelope::new(6000, submit("spared", 1))).expect("submit");
        let assign = Command::AssignGang { job_id: JobId(2), workers: vec![workers[1]] };
        apply(&mut state, 7, Envelope::new(7000, assign)).expect("assign");
        match desired(&state, workers[2], "file:///s", &key, 0) {
            Desired::Prepare { job, prepare } => {
                assert_eq!((job, prepare.job_id.as_str()), (JobId(2), "job-2"));
                assert!(prepare.spare, "a spare does not wait for a push");
                assert_eq!(prepare.handover_key, handover_key(&key, JobId(2), 1), "it accepts one");
            }
            other => panic!("the free worker prepares as a spare: {other:?}"),
        }
        // Its rank 0 is told where to push each checkpoint it records; the job without spares is not.
        let spares_of = |state: &State, worker| match desired(state, worker, "file:///s", &key, 0) {
            Desired::Train { spares, .. } => spares,
            other => panic!("{worker} trains: {other:?}"),
        };
        assert_eq!(spares_of(&state, workers[1]), vec!["127.0.0.1:9004".to_string()]);
        assert!(spares_of(&state, workers[0]).is_empty());
        // Another pool is not the gang's: no spare there.
        let mut elsewhere = state.clone();
        elsewhere.workers.get_mut(&workers[2]).expect("worker").info.zone = "b".into();
        assert_eq!(desired(&elsewhere, workers[2], "file:///s", &key, 0), Desired::Idle);
        assert!(spares_of(&elsewhere, workers[1]).is_empty());
        // A notice for the member: the spare is reserved as its replacement and now awaits the push.
        let notice =
            Command::WorkerInterrupted { worker_id: workers[1], kind: "spot".into(), action_at_unix_ms: Some(130_000) };
        apply(&mut state, 8, Envelope::new(10_000, notice)).expect("notice");
        assert_eq!(state.jobs[&JobId(2)].reserved_replacements().collect::<Vec<_>>(), [workers[2]]);
        match desired(&state, workers[2], "file:///s", &key, 0) {
            Desired::Prepare { prepare, .. } => {
                assert!(!prepare.spare, "the reserved replacement awaits the push");
                assert_eq!(prepare.handover_key, handover_key(&key, JobId(2), 1));
            }
            other => panic!("the replacement prepares: {other:?}"),
        }
        assert!(spares_of(&state, workers[1]).is_empty(), "reserved, it is no longer a spare");
    }

    /// Job 1 (a gang of 2) running on the first two of three registered workers.
    fn gang_of_two_and_a_free_worker() -> (State, Vec<WorkerId>, JobId) {
        let mut state = State::default();
        let spec = flotilla_core::spec::JobSpec::from_toml_str(
            "name = \"h\"\nmodel = { kind = \"mlp\" }\ndata = { train = \"synthetic:blobs\" }\n\
             workers = { min = 2, max = 2 }\n",
        )
        .expect("spec");
        let submit = Command::SubmitJob { spec: Box::new(spec), client_request_id: "r".into() };
        apply(&mut state, 1, Envelope::new(1000, submit)).expect("submit");
        let workers: Vec<WorkerId> = (2..5).map(|index| register(&mut state, index)).collect();
        let job_id = JobId(1);
        let assign = Command::AssignGang { job_id, workers: workers[..2].to_vec() };
        apply(&mut state, 5, Envelope::new(5000, assign)).expect("assign");
        (state, workers, job_id)
    }

    /// A survivor noticed while its job waits idles (keeping the state it holds) while the job's
    /// next gang may take it, then drains; taken, it is told to train on until its handover's
    /// fallback time.
    #[test]
    fn a_noticed_holder_idles_while_it_may_rejoin_and_trains_on_once_it_does() {
        let (mut state, workers, job_id) = gang_of_two_and_a_free_worker();
        let lost =
            flotilla_core::state::GenerationEnd::PeerLost { reason: "rank 1 was lost".into(), unreachable_rank: None };
        let report = Command::GenerationEnded {
            job_id,
            generation: 1,
            end: lost,
            step: 33,
            reporter: Some(workers[0]),
            announced: None,
        };
        apply(&mut state, 6, Envelope::new(6000, report)).expect("break");
        let lost = Command::WorkerLost { worker_id: workers[1], last_step_seen: 33, last_heard_unix_ms: 5500 };
        apply(&mut state, 7, Envelope::new(6100, lost)).expect("lost");
        let notice =
            Command::WorkerInterrupted { worker_id: workers[0], kind: "spot".into(), action_at_unix_ms: Some(130_000) };
        apply(&mut state, 8, Envelope::new(7000, notice)).expect("notice");
        let key = gang_key("token");
        assert_eq!(desired(&state, workers[0], "file:///s", &key, 7000), Desired::Idle, "it may rejoin");
        assert_eq!(desired(&state, workers[0], "file:///s", &key, 70_001), Desired::Drain, "too late for a handover");
        let assign = Command::AssignGang { job_id, workers: vec![workers[0], workers[2]] };
        apply(&mut state, 9, Envelope::new(8000, assign)).expect("the next gang takes it");
        match desired(&state, workers[0], "file:///s", &key, 8000) {
            Desired::Train { assignment, checkpoint_now, .. } => {
                assert_eq!((assignment.generation, assignment.train_until_unix_ms, checkpoint_now), (2, 85_000, false));
            }
            other => panic!("it trains on: {other:?}"),
        }
        match desired(&state, workers[2], "file:///s", &key, 8000) {
            Desired::Train { assignment, .. } => assert_eq!(assignment.train_until_unix_ms, 0, "not noticed"),
            other => panic!("the newcomer trains: {other:?}"),
        }
    }

    #[test]
    fn an_announced_checkpoint_is_awaited_only_while_its_writer_lives() {
        let (mut state, workers, job_id) = gang_of_two_and_a_free_worker();
        // Rank 1 is lost; rank 0 reports the break and announces the state it holds, which it
        // still writes to the store.
        let announced = flotilla_core::state::CheckpointRecord {
            step: 33,
            uri: "file:///s/jobs/job-1/ckpt/000000000033-g1".into(),
            size_bytes: 10,
            manifest_sha256: "f33".into(),
            epoch: 0,
            global_sample_offset: 33 * 64,
            generation: 1,
            deleting: false,
            pending: false,
            writer: None,
        };
        let broke = Command::GenerationEnded {
            job_id,
            generation: 1,
            end: flotilla_core::state::GenerationEnd::PeerLost { reason: "closed".into(), unreachable_rank: None },
            step: 33,
            reporter: Some(workers[0]),
            announced: Some(announced),
        };
        apply(&mut state, 6, Envelope::new(6000, broke)).expect("broke");
        let key = gang_key("token");
        let resume = |state: &State, gang: Vec<WorkerId>, index: u64| {
            let mut state = state.clone();
            let assign = Command::AssignGang { job_id, workers: gang.clone() };
            apply(&mut state, index, Envelope::new(index * 1000, assign)).expect("assign");
            match desired(&state, gang[0], "file:///s", &key, 0) {
                Desired::Train { assignment, .. } => assignment.resume_from.expect("a resume point"),
                other => panic!("{} trains: {other:?}", gang[0]),
            }
        };
        // Its writer lives: the new gang's ranks wait for the write if they need the store copy.
        let point = resume(&state, vec![workers[2], workers[0]], 7);
        assert_eq!((point.step, point.pending), (33, true));
        // Its writer is lost before it confirmed the write: read it once, no wait.
        apply(
            &mut state,
            8,
            Envelope::new(
                8000,
                Command::WorkerLost { worker_id: workers[0], last_step_seen: 33, last_heard_unix_ms: 0 },
            ),
        )
        .expect("lost");
        let replacement = register(&mut state, 9);
        let point = resume(&state, vec![workers[2], replacement], 10);
        assert_eq!((point.step, point.pending), (33, false));
        assert!(state.jobs[&job_id].latest_checkpoint.as_ref().is_some_and(|c| c.pending), "the record stays pending");
    }

    #[test]
    fn a_handover_s_reserved_replacement_is_told_to_prepare_the_job_s_data() {
        let (mut state, workers, job_id) = gang_of_two_and_a_free_worker();
        let key = gang_key("token");
        assert_eq!(desired(&state, workers[2], "file:///s", &key, 0), Desired::Idle, "a free worker idles");
        // A two-minute notice for rank 1: the free worker is reserved at once, the gang trains on.
        let notice =
            Command::WorkerInterrupted { worker_id: workers[1], kind: "spot".into(), action_at_unix_ms: Some(130_000) };
        apply(&mut state, 6, Envelope::new(10_000, notice)).expect("notice");
        let reserved: Vec<_> = state.jobs[&job_id].reserved_replacements().collect();
        assert_eq!(reserved, [workers[2]], "{:?}", state.jobs[&job_id].handovers);
        match desired(&state, workers[2], "file:///s", &key, 0) {
            Desired::Prepare { job, prepare } => {
                assert_eq!((job, prepare.job_id.as_str()), (job_id, "job-1"));
                assert!(prepare.spec.is_some_and(|s| s.name == "h"), "it carries the job's spec");
            }
            other => panic!("the replacement prepares: {other:?}"),
        }
        assert!(matches!(desired(&state, workers[0], "file:///s", &key, 0), Desired::Train { .. }), "rank 0 trains on");
        match desired(&state, workers[2], "file:///s", &key, 0) {
            Desired::Prepare { prepare, .. } => {
                assert_eq!(prepare.generation, 1);
                assert!(!prepare.spare, "a handover's replacement awaits the push");
                assert_eq!(prepare.handover_key, handover_key(&key, job_id, 1), "the push's key");
                assert_ne!(prepare.handover_key, gang_secret(&key, job_id, 1), "not the gang's ring secret");
            }
            other => panic!("the replacement prepares: {other:?}"),
        }
        let handover_to = |state: &State, worker| match desired(state, worker, "file:///s", &key, 0) {
            Desired::Train { handover_to, .. } => handover_to,
            other => panic!("{worker} trains: {other:?}"),
        };
        assert_eq!(handover_to(&state, workers[1]), None, "not before the replacement is ready");
        let ready = Command::HandoverReady { job_id, generation: 1, live: false };
        apply(&mut state, 7, Envelope::new(11_000, ready)).expect("ready");
        // The leaving member pushes its stop-step state to the replacement's data port; the
        // survivor does nothing new.
        assert_eq!(handover_to(&state, workers[1]).as_deref(), Some("127.0.0.1:9004"));
        assert_eq!(handover_to(&state, workers[0]), None);
    }

    #[test]
    fn a_live_handover_s_replacement_gets_the_leaving_member_s_assignment_and_the_leaver_its_target() {
        let (mut state, workers, job_id) = gang_of_two_and_a_free_worker();
        let notice =
            Command::WorkerInterrupted { worker_id: workers[0], kind: "spot".into(), action_at_unix_ms: Some(130_000) };
        apply(&mut state, 6, Envelope::new(10_000, notice)).expect("notice");
        let key = gang_key("token");
        let train = |state: &State, worker| match desired(state, worker, "file:///s", &key, 0) {
            Desired::Train { assignment, live_to, checkpoint_now, .. } => (*assignment, live_to, checkpoint_now),
            other => panic!("{worker} trains: {other:?}"),
        };
        let ready = Command::HandoverReady { job_id, generation: 1, live: true };
        apply(&mut state, 7, Envelope::new(11_000, ready)).expect("ready");
        // The replacement gets rank 0's own assignment (same generation, peers and secret),
        // marked to join live, with the handover's key; rank 0 is told where to stream.
        let (leaver, leaver_to, stop) = train(&state, workers[0]);
        let (joiner, joiner_to, joiner_stop) = train(&state, workers[2]);
        assert_eq!((leaver_to.as_deref(), stop), (Some("127.0.0.1:9004"), false), "no stop");
        assert_eq!((joiner_to, joiner_stop), (None, false));
        assert!(joiner.joins_live && !leaver.joins_live);
        assert_eq!(joiner.handover_key, handover_key(&key, job_id, 1));
        let same = |a: &TrainAssignment| (a.rank, a.generation, a.peers.clone(), a.gang_secret.clone());
        assert_eq!(same(&joiner), same(&leaver));
        assert_eq!(train(&state, workers[1]).1, None, "the survivor does nothing new");
        // Had the leaving member said the live handover failed: it stops at the next step and
        // pushes the state to the same replacement, which no longer joins live.
        let mut failed = state.clone();
        let said = Command::LiveHandoverFailed { job_id, generation: 1, by: workers[0], reason: "behind".into() };
        apply(&mut failed, 8, Envelope::new(11_500, said)).expect("failed");
        match desired(&failed, workers[0], "file:///s", &key, 0) {
            Desired::Train { live_to, checkpoint_now, handover_to, .. } => {
                assert_eq!((live_to, checkpoint_now, handover_to.as_deref()), (None, true, Some("127.0.0.1:9004")));
            }
            other => panic!("the leaver trains to the stop: {other:?}"),
        }
        assert!(
            matches!(desired(&failed, workers[2], "file:///s", &key, 0), Desired::Prepare { .. }),
            "the replacement awaits the push"
        );
        // After the swap the replacement is rank 0 (its assignment unchanged: not sent again)
        // and the leaving member is drained.
        let swapped =
            Command::HandoverSwapped { job_id, generation: 1, replacement: workers[2], step: 9, peer_bytes: 0 };
        apply(&mut state, 8, Envelope::new(12_000, swapped)).expect("swapped");
        let (after, after_to, _) = train(&state, workers[2]);
        assert_eq!((after.rank, after.generation, after_to), (0, 1, None));
        assert_eq!(desired(&state, workers[0], "file:///s", &key, 0), Desired::Drain);
    }

    #[test]
    fn every_coordinator_derives_the_same_gang_secret_and_each_generation_a_new_one() {
        let key = gang_key("a-peer-token-of-the-cluster");
        let secret = gang_secret(&key, JobId(3), 2);
        assert_eq!(secret.len(), 32);
        assert_eq!(gang_secret(&gang_key("a-peer-token-of-the-cluster"), JobId(3), 2), secret, "deterministic");
        assert_ne!(gang_secret(&key, JobId(3), 3), secret, "a new generation, a new secret");
        assert_ne!(gang_secret(&key, JobId(4), 2), secret);
        assert_ne!(gang_secret(&gang_key("another-cluster-peer-token"), JobId(3), 2), secret);
    }
}
