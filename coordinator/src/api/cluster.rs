//! `ClusterService`: worker registration (join token), heartbeats (leases in the leader's
//! memory) and the worker list. Assignments and reports arrive with the agents issue.

use std::sync::Arc;

use flotilla_core::WorkerId;
use flotilla_core::state::{Applied, Command, Worker, WorkerInfo as CoreWorkerInfo};
use flotilla_proto::v1::cluster_service_server::ClusterService;
use flotilla_proto::v1::*;
use flotilla_proto::{ApiError, ErrorKind, auth};
use tonic::{Request, Response, Status};

use super::status;
use crate::leases::{HEARTBEAT_INTERVAL, LEASE, Leases};
use crate::raft::node::NodeHandle;

/// Longest text field in a worker's capabilities.
const CAPABILITY_TEXT_MAX: usize = 256;

pub struct ClusterApi {
    pub node: NodeHandle,
    pub api_token: String,
    /// `None`: this cluster accepts no workers.
    pub join_token: Option<String>,
    pub leases: Arc<Leases>,
}

fn invalid(message: String) -> Status {
    status(ApiError::new(ErrorKind::InvalidArgument, message))
}

impl ClusterApi {
    fn authorize_worker<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.join_token else {
            return Err(status(ApiError::new(
                ErrorKind::PermissionDenied,
                "this cluster accepts no workers (start its coordinators with --join-token)",
            )));
        };
        auth::check(request.metadata(), token, "join token").map_err(status)
    }

    fn require_leader(&self) -> Result<(), Status> {
        if self.node.status().leader_id == Some(self.node.id) { Ok(()) } else { Err(status(self.node.not_leader())) }
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

fn worker_to_proto(worker: &Worker, last_heartbeat_unix_ms: u64) -> WorkerInfo {
    let state = if worker.lost_at_unix_ms.is_some() { WorkerState::Lost } else { WorkerState::Idle };
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
        job_id: None,
        rank: None,
        last_heartbeat_unix_ms,
    }
}

fn unimplemented_yet(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} arrives with the worker agents; this coordinator build does not assign work yet"
    ))
}

#[tonic::async_trait]
impl ClusterService for ClusterApi {
    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        self.authorize_worker(&request)?;
        let info = capabilities(request.into_inner().capabilities)?;
        match self.node.propose(Command::RegisterWorker { info }).await.map_err(status)? {
            Applied::WorkerRegistered { worker_id } => {
                self.leases.renew(worker_id);
                Ok(Response::new(RegisterWorkerResponse {
                    worker_id: worker_id.to_string(),
                    lease_ms: LEASE.as_millis() as u64,
                    heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u64,
                }))
            }
            other => Err(status(ApiError::new(ErrorKind::Internal, format!("register produced {other:?}")))),
        }
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        self.authorize_worker(&request)?;
        self.require_leader()?;
        let id: WorkerId = request.get_ref().worker_id.parse().map_err(|e| invalid(format!("worker_id: {e}")))?;
        let live = self
            .node
            .read_local(move |state| state.workers.get(&id).is_some_and(|w| w.lost_at_unix_ms.is_none()))
            .await
            .map_err(status)?;
        if live {
            self.leases.renew(id);
        }
        Ok(Response::new(HeartbeatResponse { lease_ms: LEASE.as_millis() as u64, unknown_worker: !live }))
    }

    type WatchAssignmentsStream = tokio_stream::wrappers::ReceiverStream<Result<Assignment, Status>>;

    async fn watch_assignments(
        &self,
        request: Request<WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        self.authorize_worker(&request)?;
        Err(unimplemented_yet("assignments"))
    }

    async fn report_progress(&self, request: Request<ProgressReport>) -> Result<Response<Ack>, Status> {
        self.authorize_worker(&request)?;
        Err(unimplemented_yet("progress reports"))
    }

    async fn report_checkpoint(&self, request: Request<CheckpointReport>) -> Result<Response<Ack>, Status> {
        self.authorize_worker(&request)?;
        Err(unimplemented_yet("checkpoint reports"))
    }

    async fn report_interruption(&self, request: Request<InterruptionReport>) -> Result<Response<Ack>, Status> {
        self.authorize_worker(&request)?;
        Err(unimplemented_yet("interruption reports"))
    }

    async fn report_finished(&self, request: Request<FinishedReport>) -> Result<Response<Ack>, Status> {
        self.authorize_worker(&request)?;
        Err(unimplemented_yet("finish reports"))
    }

    async fn list_workers(
        &self,
        request: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        auth::check(request.metadata(), &self.api_token, "API token").map_err(status)?;
        let leases = self.leases.clone();
        let workers = self
            .node
            .read(move |state| {
                state.workers.values().map(|w| worker_to_proto(w, leases.last_heartbeat_unix_ms(w.id))).collect()
            })
            .await
            .map_err(status)?;
        Ok(Response::new(ListWorkersResponse { workers, served_by: self.node.id }))
    }
}
