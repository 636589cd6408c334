//! Serving job logs from the cluster's object store: segments `jobs/<job>/logs/<seq:08>.log`
//! written by the job's rank 0, streamed in order; with `follow`, new segments as they appear,
//! until the job has ended and no segment is left.

use std::path::Path as FsPath;
use std::time::Duration;

use flotilla_core::JobId;
use flotilla_proto::v1::LogLines;
use flotilla_proto::{ApiError, ErrorKind};
use object_store::ObjectStoreExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use tokio::sync::mpsc;
use tonic::Status;

use crate::raft::node::NodeHandle;

/// How often a follow stream looks for new segments.
const FOLLOW_POLL: Duration = Duration::from_millis(500);
/// Segments sent per stream at most (a runaway log cannot keep a stream busy forever).
const SEGMENTS_MAX: u64 = 1_000_000;

pub struct JobLogs {
    store: LocalFileSystem,
    job: JobId,
    prefix: Path,
}

impl JobLogs {
    pub fn open(store_dir: &FsPath, job: JobId) -> Result<JobLogs, ApiError> {
        std::fs::create_dir_all(store_dir)
            .map_err(|e| ApiError::new(ErrorKind::Internal, format!("store {}: {e}", store_dir.display())))?;
        let store = LocalFileSystem::new_with_prefix(store_dir)
            .map_err(|e| ApiError::new(ErrorKind::Internal, format!("store {}: {e}", store_dir.display())))?;
        Ok(JobLogs { store, job, prefix: Path::from("jobs").join(job.to_string().as_str()) })
    }

    async fn segment(&self, seq: u64) -> Option<String> {
        let path = self.prefix.clone().join("logs").join(format!("{seq:08}.log").as_str());
        let bytes = self.store.get(&path).await.ok()?.bytes().await.ok()?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }
}

pub async fn stream(
    node: NodeHandle,
    logs: JobLogs,
    from: u64,
    follow: bool,
    tx: mpsc::Sender<Result<LogLines, Status>>,
) {
    let mut seq = from;
    let job = logs.job;
    while seq < SEGMENTS_MAX {
        if let Some(text) = logs.segment(seq).await {
            let lines = text.lines().map(str::to_string).collect();
            seq += 1;
            if tx.send(Ok(LogLines { lines, next_offset: seq })).await.is_err() {
                return;
            }
            continue;
        }
        if !follow {
            return;
        }
        let ended = node
            .read_local(move |state| state.jobs.get(&job).is_none_or(|j| j.state.is_terminal()))
            .await
            .unwrap_or(true);
        if ended {
            // The last segment may land just after the job is recorded as ended.
            tokio::time::sleep(FOLLOW_POLL).await;
            while let Some(text) = logs.segment(seq).await {
                seq += 1;
                let lines = text.lines().map(str::to_string).collect();
                if tx.send(Ok(LogLines { lines, next_offset: seq })).await.is_err() {
                    return;
                }
            }
            return;
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}
