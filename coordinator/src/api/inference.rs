//! `InferenceService`: users submit and follow batch-inference jobs (API token); workers lease,
//! commit and fail shards (join token). Writes go through Raft on the leader; the input's shape
//! is read by the leader at submission, so a wrong column count is refused before any worker
//! starts.

use flotilla_core::state::{Applied, Command, InferenceRequest, ShardStats, plan_shards};
use flotilla_core::{JobId, WorkerId};
use flotilla_proto::convert::inference_to_proto;
use flotilla_proto::limits::CLIENT_REQUEST_ID_LEN_MAX;
use flotilla_proto::v1::inference_service_server::InferenceService;
use flotilla_proto::v1::*;
use flotilla_proto::{ApiError, ErrorKind, auth};
use tonic::{Request, Response, Status};

use super::status;
use crate::inference::{SHARD_VALUES_MAX, check_output, normalized, read_input, shard_byte_offsets};
use crate::raft::node::{NodeHandle, now_unix_ms};

/// Longest model reference and error text accepted.
const REFERENCE_LEN_MAX: usize = 256;
const ERROR_LEN_MAX: usize = 4096;

pub struct InferenceApi {
    pub node: NodeHandle,
    pub tokens: auth::ApiTokens,
    /// Where users' `file://` input and output may be (canonical; see `confine`).
    pub data_roots: std::sync::Arc<Vec<std::path::PathBuf>>,
    pub join_token: Option<String>,
    /// The server runs TLS: worker calls need a worker's client certificate.
    pub tls: bool,
}

fn invalid(message: impl Into<String>) -> Status {
    status(ApiError::new(ErrorKind::InvalidArgument, message))
}

fn parse<T: std::str::FromStr>(field: &str, text: &str) -> Result<T, Status>
where
    T::Err: std::fmt::Display,
{
    text.parse::<T>().map_err(|e| invalid(format!("{field}: {e}")))
}

impl InferenceApi {
    fn authorize_user<T>(&self, request: &Request<T>, needed: auth::Role, action: &str) -> Result<(), Status> {
        self.tokens.authorize(request.metadata(), needed, action).map(|_| ()).map_err(status)
    }

    /// The worker a call comes from (join token + its own credential).
    async fn worker<T>(&self, request: &Request<T>) -> Result<WorkerId, Status> {
        super::worker_auth::authenticate(&self.node, self.join_token.as_deref(), self.tls, request).await
    }
}

#[tonic::async_trait]
impl InferenceService for InferenceApi {
    async fn submit_inference(
        &self,
        request: Request<SubmitInferenceRequest>,
    ) -> Result<Response<SubmitJobResponse>, Status> {
        self.authorize_user(&request, auth::Role::Submit, "submit an inference job")?;
        let r = request.into_inner();
        if r.client_request_id.is_empty() || r.client_request_id.len() > CLIENT_REQUEST_ID_LEN_MAX {
            return Err(invalid(format!("client_request_id must be 1 to {CLIENT_REQUEST_ID_LEN_MAX} bytes")));
        }
        if r.model.is_empty() || r.model.len() > REFERENCE_LEN_MAX {
            return Err(invalid(format!(
                "model must be NAME, NAME@VERSION or NAME@ALIAS (1 to {REFERENCE_LEN_MAX} bytes)"
            )));
        }
        // One read: a retried submission returns the job it created (before the output check,
        // which the first attempt's output would now fail); otherwise the model's shape.
        let (request_id, reference) = (r.client_request_id.clone(), r.model.clone());
        let known = self
            .node
            .read(move |state| match state.request_ids.get(&request_id) {
                Some(&job_id) => Ok(Err(job_id)),
                None => state
                    .resolve_model(&reference)
                    .map(|(m, v)| Ok((m.name.clone(), v.version, v.shape.features_per_row))),
            })
            .await
            .map_err(status)?
            .map_err(|e| status(ApiError::new(ErrorKind::NotFound, e.to_string())))?;
        let (name, version, features) = match known {
            Ok(model) => model,
            Err(job_id) => {
                let (job_id, served_by) = (job_id.to_string(), self.node.id);
                return Ok(Response::new(SubmitJobResponse { job_id, duplicate: true, served_by }));
            }
        };
        let input_uri = normalized(&r.input_uri).map_err(|e| invalid(format!("input_uri: {e}")))?;
        let output_uri = normalized(&r.output_uri).map_err(|e| invalid(format!("output_uri: {e}")))?;
        let denied = |e: String| status(ApiError::new(ErrorKind::PermissionDenied, e));
        crate::confine::check("input_uri", &input_uri, &self.data_roots).map_err(denied)?;
        crate::confine::check("output_uri", &output_uri, &self.data_roots).map_err(denied)?;
        crate::confine::check_regular_file("input_uri", &input_uri).map_err(invalid)?;
        check_output(&output_uri).await.map_err(invalid)?;
        let input = read_input(&input_uri).await.map_err(invalid)?;
        let shape = input.shape;
        let features = features as usize;
        let labelled = match shape.columns {
            c if c == features => false,
            c if c == features + 1 => true,
            c => {
                return Err(invalid(format!(
                    "input has {c} columns per row, but {name}@{version} takes {features} features (or {} with a \
                     leading label)",
                    features + 1
                )));
            }
        };
        // A shard is parsed whole on one worker: keep it within the worker's memory limit.
        let rows_cap = (SHARD_VALUES_MAX / shape.columns.max(1) as u64).max(1);
        let shard_rows = match r.shard_rows {
            0 => {
                let planned = plan_shards(shape.rows, r.workers.max(1), 0)
                    .ok()
                    .and_then(|s| s.first().map(|s| s.rows))
                    .unwrap_or(0);
                if planned > rows_cap { rows_cap } else { 0 }
            }
            n if n > rows_cap => {
                return Err(invalid(format!(
                    "shard_rows {n} x {} columns is more than the {SHARD_VALUES_MAX} values a worker holds; use \
                     --shard-rows {rows_cap} or fewer",
                    shape.columns
                )));
            }
            n => n,
        };
        // Each shard's bytes, so workers fetch only theirs (not for gzip: no reading from the middle).
        let shard_byte_offsets = match (input.plain, plan_shards(shape.rows, r.workers.max(1), shard_rows)) {
            (Some(text), Ok(shards)) => {
                let first_rows: Vec<u64> = shards.iter().map(|s| s.first_row).collect();
                tokio::task::spawn_blocking(move || shard_byte_offsets(&text, &first_rows)).await.unwrap_or_default()
            }
            _ => Vec::new(),
        };
        let request = InferenceRequest {
            model: name,
            version,
            input_uri,
            output_uri,
            workers: r.workers,
            batch_size: r.batch_size,
            shard_rows,
            rows: shape.rows,
            labelled,
            input_bytes: shape.bytes,
            shard_byte_offsets,
        };
        let command = Command::SubmitInference { request: Box::new(request), client_request_id: r.client_request_id };
        match self.node.propose(command).await.map_err(status)? {
            Applied::JobSubmitted { job_id, duplicate } => {
                Ok(Response::new(SubmitJobResponse { job_id: job_id.to_string(), duplicate, served_by: self.node.id }))
            }
            other => Err(status(ApiError::new(ErrorKind::Internal, format!("submit produced {other:?}")))),
        }
    }

    async fn get_inference(&self, request: Request<GetJobRequest>) -> Result<Response<InferenceStatus>, Status> {
        self.authorize_user(&request, auth::Role::Read, "read inference jobs")?;
        let id: JobId = parse("job_id", &request.get_ref().job_id)?;
        let now = now_unix_ms();
        let found = self
            .node
            .read(move |state| state.inferences.get(&id).map(|j| inference_to_proto(j, now)))
            .await
            .map_err(status)?;
        let mut job = found.ok_or_else(|| {
            status(ApiError::new(ErrorKind::NotFound, format!("{id} is not an inference job (see `flotilla status`)")))
        })?;
        job.served_by = self.node.id;
        Ok(Response::new(job))
    }

    async fn list_inferences(
        &self,
        request: Request<ListInferencesRequest>,
    ) -> Result<Response<ListInferencesResponse>, Status> {
        self.authorize_user(&request, auth::Role::Read, "read inference jobs")?;
        let now = now_unix_ms();
        let request = request.into_inner();
        let limit = super::page_limit(request.limit);
        let after: Option<JobId> = super::page_after(&request.page_token)?;
        let (inferences, next) = self
            .node
            .read(move |state| {
                let (page, next) = super::page(state.inferences.iter().map(|(id, j)| (*id, j)), after, limit);
                (page.into_iter().map(|j| inference_to_proto(j, now)).collect(), next)
            })
            .await
            .map_err(status)?;
        let next_page_token = next.map(|id| id.to_string()).unwrap_or_default();
        Ok(Response::new(ListInferencesResponse { inferences, served_by: self.node.id, next_page_token }))
    }

    async fn lease_shard(&self, request: Request<LeaseShardRequest>) -> Result<Response<LeaseShardResponse>, Status> {
        let worker = self.worker(&request).await?;
        let r = request.into_inner();
        let worker_id = super::worker_auth::acting_as(worker, "worker_id", &r.worker_id)?;
        let job_id: JobId = parse("job_id", &r.job_id)?;
        let applied = self.node.propose(Command::LeaseShard { job_id, worker_id }).await.map_err(status)?;
        let Applied::ShardLeased { lease, released } = applied else {
            return Err(status(ApiError::new(ErrorKind::Internal, format!("lease produced {applied:?}"))));
        };
        let shard = lease.map(|lease| Shard {
            job_id: job_id.to_string(),
            index: lease.index,
            first_row: lease.first_row,
            rows: lease.rows,
            output_uri: lease.object,
            attempt: lease.attempt,
            byte_start: lease.bytes.map_or(0, |b| b.0),
            byte_end: lease.bytes.map_or(0, |b| b.1),
        });
        Ok(Response::new(LeaseShardResponse { shard, released }))
    }

    async fn commit_shard(&self, request: Request<CommitShardRequest>) -> Result<Response<Ack>, Status> {
        let worker = self.worker(&request).await?;
        let r = request.into_inner();
        let worker_id = super::worker_auth::acting_as(worker, "worker_id", &r.worker_id)?;
        let job_id: JobId = parse("job_id", &r.job_id)?;
        // Bounded before they enter the log (apply then checks them against the shard).
        if r.class_counts.len() > flotilla_core::state::MODEL_CLASSES_MAX as usize {
            let limit = flotilla_core::state::MODEL_CLASSES_MAX;
            return Err(invalid(format!("class_counts has {} entries; at most {limit}", r.class_counts.len())));
        }
        if r.output_object.len() > 2 * flotilla_core::state::INFERENCE_URI_LEN_MAX {
            return Err(invalid(format!(
                "output_object is {} bytes; far longer than any shard object",
                r.output_object.len()
            )));
        }
        let stats = ShardStats {
            rows: r.rows,
            labelled_rows: r.labelled_rows,
            correct: r.correct,
            class_counts: r.class_counts,
        };
        let command = Command::CommitShard {
            job_id,
            worker_id,
            index: r.index,
            attempt: r.attempt,
            object: r.output_object,
            stats,
        };
        self.node.propose(command).await.map_err(status)?;
        Ok(Response::new(Ack {}))
    }

    async fn fail_shard(&self, request: Request<FailShardRequest>) -> Result<Response<Ack>, Status> {
        let worker = self.worker(&request).await?;
        let r = request.into_inner();
        let worker_id = super::worker_auth::acting_as(worker, "worker_id", &r.worker_id)?;
        let job_id: JobId = parse("job_id", &r.job_id)?;
        let error: String = r.error.chars().take(ERROR_LEN_MAX).collect();
        let command =
            Command::FailShard { job_id, worker_id, index: r.index, attempt: r.attempt, error, release: false };
        self.node.propose(command).await.map_err(status)?;
        Ok(Response::new(Ack {}))
    }
}
