//! `JobService`: submit, get, list, cancel, resume and watch jobs; read their logs and metrics
//! history. Writes go through Raft on the leader (followers answer `NotLeader` with the
//! leader's address); reads are linearizable (ReadIndex) and served by any node, which reports
//! itself in `served_by`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotilla_core::JobId;
use flotilla_core::state::{Applied, Command, JobState, State};
use flotilla_proto::convert::{job_state_to_proto, job_to_proto, spec_from_proto};
use flotilla_proto::limits::{CLIENT_REQUEST_ID_LEN_MAX, LIST_JOBS_LIMIT_DEFAULT, LIST_JOBS_LIMIT_MAX};
use flotilla_proto::v1::job_service_server::JobService;
use flotilla_proto::v1::{self, *};
use flotilla_proto::{ApiError, ErrorKind, auth};
use object_store::ObjectStoreExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::status;
use crate::progress::Progress;
use crate::raft::node::NodeHandle;

/// Updates buffered per watch stream; a slow client skips intermediate states, not the last.
const WATCH_BUFFER: usize = 16;
/// A watch re-reads the job at least this often even without a change notification.
const WATCH_POLL: Duration = Duration::from_millis(500);

pub struct JobApi {
    pub node: NodeHandle,
    pub tokens: auth::ApiTokens,
    /// Live progress reported to this node while it leads (not replicated).
    pub progress: Arc<Progress>,
    /// The cluster store: job logs are under `jobs/<job>/logs/`.
    pub store: flotilla_store::Location,
    /// Where users' `file://` data may be (canonical; see `confine`).
    pub data_roots: Arc<Vec<std::path::PathBuf>>,
}

/// Adds live progress (when this node has it) to a job's replicated status; a running job
/// without any yet says it is starting ([`crate::progress::starting`]).
fn with_live(mut job: v1::JobStatus, progress: &Progress) -> (v1::JobStatus, Option<LiveProgress>) {
    let live = job.id.parse::<JobId>().ok().and_then(|id| progress.get(id, job.generation));
    let running = job.state == v1::JobState::Running as i32;
    if running && live.is_none() {
        job.reason = starting(&job, crate::raft::node::now_unix_ms());
    }
    if let Some(p) = live.filter(|_| running) {
        job.total_steps = p.total_steps;
        // The newest evaluation while it trains (train.validate_every_steps), at its own step.
        if p.val_accuracy.is_some() {
            let metrics = job.metrics.get_or_insert_with(Default::default);
            (metrics.val_accuracy, metrics.val_loss, metrics.val_step) = (p.val_accuracy, p.val_loss, p.val_step);
        }
        if p.step < job.step {
            // Rank 0 reports every second and a checkpoint was recorded since: the report's
            // loss, rate and ETA are of an older step, so the line keeps the checkpoint's.
            return (job, None);
        }
        job.step = p.step;
        let metrics = job.metrics.get_or_insert_with(Default::default);
        metrics.train_loss = Some(p.loss);
        metrics.samples_per_s = Some(p.samples_per_s);
        return (job, Some(p));
    }
    (job, None)
}

/// [`crate::progress::starting`] for a job's status (its reason after the word): the time runs
/// from when its generation formed its gang.
fn starting(job: &v1::JobStatus, now_unix_ms: u64) -> String {
    let command = job.spec.as_ref().is_some_and(|s| s.run.is_some());
    let formed = Some(job.generation_started_at_unix_ms).filter(|at| *at > 0);
    crate::progress::starting(&job.reason, job.generation, command, formed, now_unix_ms)
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidArgument, message)
}

fn parse_job_id(text: &str) -> Result<JobId, Status> {
    text.parse::<JobId>().map_err(|e| status(invalid(format!("job_id: {e}"))))
}

fn find_job(state: &State, id: JobId) -> Result<v1::JobStatus, ApiError> {
    let job = state.jobs.get(&id).ok_or_else(|| ApiError::new(ErrorKind::NotFound, format!("{id} does not exist")))?;
    let mut status = job_to_proto(job, state.shown_state(job), crate::raft::node::now_unix_ms());
    with_spares(state, std::slice::from_mut(&mut status));
    Ok(status)
}

/// Fills each running job's warm spares ([`flotilla_core::state::warm_spares`], one pass for
/// all of `jobs`); nothing is read unless a running job keeps spares.
fn with_spares(state: &State, jobs: &mut [v1::JobStatus]) {
    let keeps = |j: &v1::JobStatus| j.spec.as_ref().is_some_and(|s| s.capacity.as_ref().is_some_and(|c| c.spares > 0));
    if !jobs.iter().any(|j| keeps(j) && j.state == v1::JobState::Running as i32) {
        return;
    }
    let mut by_job: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    for (worker, job) in flotilla_core::state::warm_spares(state) {
        by_job.entry(job.to_string()).or_default().push(worker.to_string());
    }
    for job in jobs.iter_mut() {
        job.spares = by_job.remove(&job.id).unwrap_or_default();
    }
}

impl JobApi {
    fn authorize<T>(&self, request: &Request<T>, needed: auth::Role, action: &str) -> Result<(), Status> {
        self.tokens.authorize(request.metadata(), needed, action).map(|_| ()).map_err(status)
    }

    /// Live progress (step, loss, samples/s) is reported to the leader and not replicated, so
    /// a follower would show a running job at its last checkpoint: it sends the client to the
    /// leader instead (`NotLeader` with the hint; the clients follow it).
    fn live_from_leader(&self, jobs: &[v1::JobStatus]) -> Result<(), Status> {
        let running = jobs.iter().any(|j| j.state == v1::JobState::Running as i32);
        if running && self.node.status().leader_id != Some(self.node.id) {
            return Err(status(self.node.not_leader()));
        }
        Ok(())
    }
}

type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<JobUpdate, Status>> + Send>>;
type LogStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<LogLines, Status>> + Send>>;

/// The key of a packed workdir in the cluster store: `workdirs/<sha256>.tar.gz`.
fn workdir_key(store: &flotilla_store::Location, sha256: &str) -> object_store::path::Path {
    store.key(&format!("workdirs/{sha256}.tar.gz"))
}

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<SubmitJobResponse>, Status> {
        self.authorize(&request, auth::Role::Submit, "submit a job")?;
        let request = request.into_inner();
        let request_id = request.client_request_id;
        if request_id.is_empty() || request_id.len() > CLIENT_REQUEST_ID_LEN_MAX {
            return Err(status(invalid(format!("client_request_id must be 1 to {CLIENT_REQUEST_ID_LEN_MAX} bytes"))));
        }
        let spec = spec_from_proto(request.spec.ok_or_else(|| status(invalid("spec is required")))?).map_err(status)?;
        let unresolved = spec.unresolved_paths();
        if let Some(problem) = unresolved.first() {
            return Err(status(invalid(problem.to_string())));
        }
        check_data_readable(&spec, &self.data_roots).await?;
        check_workdir_stored(&spec, &self.store).await?;
        let command = Command::SubmitJob { spec: Box::new(spec), client_request_id: request_id };
        match self.node.propose(command).await.map_err(status)? {
            Applied::JobSubmitted { job_id, duplicate } => {
                Ok(Response::new(SubmitJobResponse { job_id: job_id.to_string(), duplicate, served_by: self.node.id }))
            }
            other => Err(status(ApiError::new(ErrorKind::Internal, format!("submit produced {other:?}")))),
        }
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<GetJobResponse>, Status> {
        self.authorize(&request, auth::Role::Read, "read jobs")?;
        let id = parse_job_id(&request.get_ref().job_id)?;
        let job = self.node.read(move |state| find_job(state, id)).await.map_err(status)?.map_err(status)?;
        self.live_from_leader(std::slice::from_ref(&job))?;
        let (job, _) = with_live(job, &self.progress);
        Ok(Response::new(GetJobResponse { job: Some(job), served_by: self.node.id }))
    }

    async fn list_jobs(&self, request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        self.authorize(&request, auth::Role::Read, "read jobs")?;
        let request = request.into_inner();
        let limit = match request.limit {
            0 => LIST_JOBS_LIMIT_DEFAULT,
            n => n.min(LIST_JOBS_LIMIT_MAX),
        } as usize;
        let after = match request.page_token.as_str() {
            "" => None,
            token => Some(parse_job_id(token)?),
        };
        let mut states = Vec::new();
        for s in &request.states {
            match v1::JobState::try_from(*s) {
                Ok(v1::JobState::Unspecified) | Err(_) => {
                    return Err(status(invalid(format!("states: {s} is not a job state"))));
                }
                Ok(state) => states.push(state),
            }
        }
        let (jobs, next) = self
            .node
            .read(move |state| {
                let start = after.map_or(JobId(0), |id| JobId(id.0 + 1));
                let shown = state.shown_states();
                let now = crate::raft::node::now_unix_ms();
                let wanted = |s: JobState| states.is_empty() || states.contains(&job_state_to_proto(s));
                let mut page: Vec<v1::JobStatus> = state
                    .jobs
                    .range(start..)
                    .map(|(_, job)| (job, shown.of(job)))
                    .filter(|(_, s)| wanted(*s))
                    .take(limit + 1)
                    .map(|(job, s)| job_to_proto(job, s, now))
                    .collect();
                with_spares(state, &mut page);
                let next = if page.len() > limit {
                    page.truncate(limit);
                    page.last().map(|j| j.id.clone())
                } else {
                    None
                };
                (page, next)
            })
            .await
            .map_err(status)?;
        self.live_from_leader(&jobs)?;
        let jobs = jobs.into_iter().map(|j| with_live(j, &self.progress).0).collect();
        Ok(Response::new(ListJobsResponse { jobs, next_page_token: next.unwrap_or_default(), served_by: self.node.id }))
    }

    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<CancelJobResponse>, Status> {
        self.authorize(&request, auth::Role::Submit, "cancel a job")?;
        let request = request.into_inner();
        let id = parse_job_id(&request.job_id)?;
        let reason: String = request.reason.chars().take(flotilla_core::state::REASON_LEN_MAX).collect();
        self.node.propose(Command::CancelJob { job_id: id, reason }).await.map_err(status)?;
        let job = self.node.read(move |state| find_job(state, id)).await.map_err(status)?.map_err(status)?;
        Ok(Response::new(CancelJobResponse { job: Some(job) }))
    }

    async fn resume_job(&self, request: Request<ResumeJobRequest>) -> Result<Response<ResumeJobResponse>, Status> {
        self.authorize(&request, auth::Role::Submit, "resume a job")?;
        let request = request.into_inner();
        let id = parse_job_id(&request.job_id)?;
        let spec = request.spec.map(spec_from_proto).transpose().map_err(status)?.map(Box::new);
        let applied = self.node.propose(Command::ResumeJob { job_id: id, spec }).await.map_err(status)?;
        let from_step = match applied {
            Applied::JobResumed { from_step, .. } => from_step,
            _ => 0,
        };
        let job = self.node.read(move |state| find_job(state, id)).await.map_err(status)?.map_err(status)?;
        Ok(Response::new(ResumeJobResponse { job: Some(job), from_step }))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<WatchStream>, Status> {
        self.authorize(&request, auth::Role::Read, "read jobs")?;
        let id = parse_job_id(&request.get_ref().job_id)?;
        let first = self.node.read(move |state| find_job(state, id)).await.map_err(status)?.map_err(status)?;
        self.live_from_leader(std::slice::from_ref(&first))?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(watch_loop(self.node.clone(), self.progress.clone(), id, first, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type GetLogsStream = LogStream;

    async fn get_logs(&self, request: Request<GetLogsRequest>) -> Result<Response<LogStream>, Status> {
        self.authorize(&request, auth::Role::Read, "read logs")?;
        let request = request.into_inner();
        let id = parse_job_id(&request.job_id)?;
        self.node.read(move |state| find_job(state, id)).await.map_err(status)?.map_err(status)?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let nodes_max = flotilla_core::spec::WORKERS_MAX as u32;
        if request.node >= nodes_max {
            return Err(status(invalid(format!(
                "node {} is not a gang member: a job has at most {nodes_max} workers (nodes 0 to {})",
                request.node,
                nodes_max - 1
            ))));
        }
        let logs = crate::logs::JobLogs::open(&self.store, id, request.node);
        tokio::spawn(crate::logs::stream(self.node.clone(), logs, request.from_offset, request.follow, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_history(&self, request: Request<GetHistoryRequest>) -> Result<Response<GetHistoryResponse>, Status> {
        self.authorize(&request, auth::Role::Read, "read jobs")?;
        let request = request.into_inner();
        let id = parse_job_id(&request.job_id)?;
        let known = self.node.read(move |state| state.jobs.contains_key(&id)).await.map_err(status)?;
        if !known {
            return Err(status(ApiError::new(
                ErrorKind::NotFound,
                format!("{id} does not exist (no training job has this id)"),
            )));
        }
        let points = match request.points {
            0 => crate::history::POINTS_DEFAULT,
            n => n as usize,
        };
        let points = crate::history::read(&self.store, id, points)
            .await
            .map_err(|e| status(ApiError::new(ErrorKind::Unavailable, e)))?;
        let points = points.iter().map(crate::history::to_proto).collect();
        Ok(Response::new(GetHistoryResponse { points, served_by: self.node.id }))
    }

    async fn upload_workdir(
        &self,
        request: Request<tonic::Streaming<WorkdirChunk>>,
    ) -> Result<Response<WorkdirUploaded>, Status> {
        use sha2::{Digest, Sha256};
        self.authorize(&request, auth::Role::Submit, "upload a workdir")?;
        let max = flotilla_core::spec::run::WORKDIR_BYTES_MAX;
        let too_big = |bytes: u64| {
            status(invalid(format!(
                "run.workdir: the packed folder is {bytes} bytes; at most {max} (keep data sets out of the workdir: \
                 read them from s3:// or the cluster store in your program)"
            )))
        };
        let mut chunks = request.into_inner();
        let mut claimed: Option<(String, u64)> = None;
        let mut archive = Vec::new();
        let mut hasher = Sha256::new();
        while let Some(chunk) = chunks.message().await? {
            if claimed.is_none() {
                let digest = chunk.sha256.clone();
                if !flotilla_core::spec::run::is_workdir_sha256(&digest) {
                    return Err(status(invalid("the first chunk must carry the archive's SHA-256 (64 hex digits)")));
                }
                if chunk.total_bytes > max {
                    return Err(too_big(chunk.total_bytes));
                }
                // The store may hold it already: content-addressed, nothing more to send.
                let key = workdir_key(&self.store, &digest);
                if self.store.store().head(&key).await.is_ok() {
                    return Ok(Response::new(WorkdirUploaded { uri: self.store.uri_of(&key), written: false }));
                }
                claimed = Some((digest, chunk.total_bytes));
            }
            if archive.len() as u64 + chunk.data.len() as u64 > max {
                return Err(too_big(archive.len() as u64 + chunk.data.len() as u64));
            }
            hasher.update(&chunk.data);
            archive.extend_from_slice(&chunk.data);
        }
        let Some((digest, total)) = claimed else { return Err(status(invalid("no workdir archive was sent"))) };
        let actual = auth::hex(&hasher.finalize());
        if actual != digest || archive.len() as u64 != total {
            return Err(status(invalid(format!(
                "the workdir archive arrived as {} bytes with SHA-256 {actual}; the client announced {total} bytes, {digest}",
                archive.len()
            ))));
        }
        let key = workdir_key(&self.store, &digest);
        self.store.store().put(&key, archive.into()).await.map_err(|e| {
            status(ApiError::new(ErrorKind::Unavailable, format!("writing the workdir to the cluster store: {e}")))
        })?;
        tracing::info!(uri = %self.store.uri_of(&key), bytes = total, "workdir stored");
        Ok(Response::new(WorkdirUploaded { uri: self.store.uri_of(&key), written: true }))
    }
}

/// A command job's workdir must be an archive in this cluster's store (where `UploadWorkdir`
/// put it), so workers can fetch it and nothing else is handed to them as code.
async fn check_workdir_stored(
    spec: &flotilla_core::spec::JobSpec,
    store: &flotilla_store::Location,
) -> Result<(), Status> {
    let Some(uri) = spec.command().and_then(|r| r.workdir.as_deref()) else { return Ok(()) };
    let digest = flotilla_core::spec::run::packed_workdir_sha256(uri);
    let stored = digest.filter(|d| store.key_in(uri) == Some(workdir_key(store, d)));
    let Some(digest) = stored else {
        return Err(status(invalid(format!(
            "run.workdir: `{uri}` is not a workdir in this cluster's store; `flotilla submit` uploads the folder"
        ))));
    };
    if store.store().head(&workdir_key(store, digest)).await.is_err() {
        return Err(status(ApiError::new(
            ErrorKind::NotFound,
            format!("run.workdir: `{uri}` is not in the cluster store; submit again with `flotilla submit`"),
        )));
    }
    Ok(())
}

/// Checks that the job's `s3://` data exists and can be read with this cluster's credentials,
/// so a wrong bucket or key is refused at submission, not after capacity is bought. (`file://`
/// data is read by the workers from their own disks, which the coordinator cannot see.)
async fn check_data_readable(
    spec: &flotilla_core::spec::JobSpec,
    data_roots: &[std::path::PathBuf],
) -> Result<(), Status> {
    use flotilla_core::spec::DataUri;
    for (field, uri) in spec.data_uris() {
        // A local path only inside the data roots (the workers read it from their disks).
        match uri {
            DataUri::File(_) => crate::confine::check(field, &uri.to_string(), data_roots)
                .map_err(|e| status(ApiError::new(ErrorKind::PermissionDenied, e)))?,
            DataUri::Relative(path) => {
                return Err(status(ApiError::new(
                    ErrorKind::InvalidArgument,
                    format!("{field}: `{path}` is relative; name it from / (the CLI resolves it for you)"),
                )));
            }
            _ => {}
        }
        if let DataUri::S3 { .. } = uri {
            let kind = |e: &flotilla_store::StoreError| match e {
                flotilla_store::StoreError::NotFound { .. } => ErrorKind::NotFound,
                _ => ErrorKind::FailedPrecondition,
            };
            if let Err(e) = flotilla_store::probe_object(&uri.to_string()).await {
                return Err(status(ApiError::new(kind(&e), format!("{field}: {e}"))));
            }
        }
    }
    Ok(())
}

async fn watch_loop(
    mut node: NodeHandle,
    progress: Arc<Progress>,
    id: JobId,
    first: v1::JobStatus,
    tx: mpsc::Sender<Result<JobUpdate, Status>>,
) {
    let (first, live) = with_live(first, &progress);
    let mut last = (first.clone(), live);
    if tx.send(Ok(JobUpdate { job: Some(first), progress: live })).await.is_err() {
        return;
    }
    loop {
        let terminal = [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
            .iter()
            .any(|s| flotilla_proto::convert::job_state_to_proto(*s) as i32 == last.0.state);
        if terminal {
            return;
        }
        let _ = tokio::time::timeout(WATCH_POLL, node.changed()).await;
        let job = match node.read_local(move |state| find_job(state, id)).await {
            Ok(Ok(job)) => job,
            Ok(Err(e)) | Err(e) => {
                let _ = tx.send(Err(status(e))).await;
                return;
            }
        };
        let current = with_live(job, &progress);
        if current != last {
            last = current.clone();
            if tx.send(Ok(JobUpdate { job: Some(current.0), progress: current.1 })).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(generation: u64, formed_at_unix_ms: u64) -> v1::JobStatus {
        v1::JobStatus {
            id: "job-1".into(),
            state: v1::JobState::Running as i32,
            generation,
            generation_started_at_unix_ms: formed_at_unix_ms,
            ..Default::default()
        }
    }

    /// The status carries when the generation formed its gang (the starting word's time), the
    /// moment the state recorded.
    #[test]
    fn a_job_s_status_says_when_its_generation_formed() {
        let mut log = crate::testing::Log::job_of_two(2);
        let workers = vec![flotilla_core::WorkerId(1), flotilla_core::WorkerId(2)];
        log.step(Command::AssignGang { job_id: JobId(1), workers });
        let formed = log.state.jobs[&JobId(1)].generation_started_at_unix_ms;
        let job = find_job(&log.state, JobId(1)).expect("the job");
        assert!(formed > 0);
        assert_eq!((job.generation, job.generation_started_at_unix_ms), (1, formed));
    }

    /// A running generation says it is starting until rank 0 reports a step of it, with the
    /// time since its gang formed; then the live step replaces the word.
    #[test]
    fn a_running_job_says_it_is_starting_until_its_generation_reports_a_step() {
        let progress = Progress::default();
        let now = crate::raft::node::now_unix_ms();
        let (job, live) = with_live(running(2, now - 35_000), &progress);
        assert!(live.is_none());
        assert_eq!(job.reason, "starting generation 2: no step reported yet, 35 s after its gang formed");
        // A step of the previous generation is not one of this generation's.
        let step = |generation| LiveProgress { step: 7, generation, ..Default::default() };
        progress.record(JobId(1), step(1));
        assert!(with_live(running(2, now), &progress).0.reason.starts_with("starting generation 2"));
        progress.record(JobId(1), step(2));
        let (job, live) = with_live(running(2, now - 35_000), &progress);
        assert_eq!((job.reason.as_str(), job.step, live.map(|p| p.step)), ("", 7, Some(7)));
        // A checkpoint recorded after the last report: the step is the checkpoint's, and no
        // field of the older report (loss, rate, ETA) is shown beside it; its total is.
        let mut checkpointed = running(2, now);
        checkpointed.step = 9;
        checkpointed.metrics = Some(v1::JobMetrics { train_loss: Some(0.25), ..Default::default() });
        progress.record(JobId(1), LiveProgress { loss: 2.3, total_steps: 9, eta_ms: 3_000, ..step(2) });
        let (job, live) = with_live(checkpointed, &progress);
        let metrics = job.metrics.unwrap_or_default();
        assert_eq!((job.step, job.total_steps, live), (9, 9, None));
        assert_eq!((metrics.train_loss, metrics.samples_per_s), (Some(0.25), None));
        // A command job is told how its program reports steps; a reason it had is kept.
        let mut command = running(1, now);
        command.spec = Some(v1::JobSpec { run: Some(Default::default()), ..Default::default() });
        command.reason = "the store takes checkpoints slowly".into();
        let said = with_live(command, &Progress::default()).0.reason;
        assert!(
            said.starts_with("generation 1 runs its command; no step reported yet (a JSON line with `step`"),
            "{said}"
        );
        assert!(said.ends_with("0 s after its gang formed; the store takes checkpoints slowly"), "{said}");
        // Jobs not running say nothing of it.
        let mut pending = running(2, now);
        pending.state = v1::JobState::Pending as i32;
        assert_eq!(with_live(pending, &progress).0.reason, "");
    }

    /// A validation rank 0 reported while the job trains stays in its status through the
    /// progress reports without one that follow, until a newer one.
    #[test]
    fn a_running_job_shows_its_newest_validation() {
        let progress = Progress::default();
        let now = crate::raft::node::now_unix_ms();
        let report = |step, val_accuracy: Option<f64>| LiveProgress {
            step,
            generation: 2,
            val_accuracy,
            val_loss: val_accuracy.map(|a| 1.0 - a),
            val_step: if val_accuracy.is_some() { step } else { 0 },
            ..Default::default()
        };
        let shown = |progress: &Progress| {
            let metrics = with_live(running(2, now), progress).0.metrics.unwrap_or_default();
            (metrics.val_accuracy, metrics.val_loss)
        };
        let step_shown = |progress: &Progress, job_step: u64| {
            let mut job = running(2, now);
            job.step = job_step;
            with_live(job, progress).0.metrics.unwrap_or_default().val_step
        };
        progress.record(JobId(1), report(5, None));
        assert_eq!(shown(&progress), (None, None), "none yet");
        progress.record(JobId(1), report(10, Some(0.75)));
        progress.record(JobId(1), report(12, None));
        assert_eq!(shown(&progress), (Some(0.75), Some(0.25)), "kept past a report without one");
        assert_eq!(progress.get(JobId(1), 2).map(|p| (p.step, p.val_step)), Some((12, 10)));
        assert_eq!(step_shown(&progress, 0), 10, "its step");
        assert_eq!(step_shown(&progress, 15), 10, "also beside a checkpoint newer than the report");
        progress.record(JobId(1), report(20, Some(0.875)));
        assert_eq!(shown(&progress), (Some(0.875), Some(0.125)), "the newer one");
        // One reported on its own (validation_only) goes to the latest report of its
        // generation; an older one or another generation's does not.
        progress.validated(JobId(1), 2, 0.9, Some(0.1), 30);
        progress.validated(JobId(1), 2, 0.5, Some(0.5), 25);
        progress.validated(JobId(1), 1, 0.5, Some(0.5), 40);
        assert_eq!(shown(&progress), (Some(0.9), Some(0.1)));
        assert_eq!(progress.get(JobId(1), 2).map(|p| (p.step, p.val_step)), Some((20, 30)), "its step stays");
    }
}
