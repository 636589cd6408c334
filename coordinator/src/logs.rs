//! Serving job logs from the cluster store: segments `jobs/<job>/logs/<seq:08>.log` written by
//! the job's node 0 (`logs/node-<N>/` by node N), streamed in order; with `follow`, new segments
//! as they appear, until the job has ended and no segment is left.

use std::time::Duration;

use flotilla_core::JobId;
use flotilla_proto::v1::LogLines;
use flotilla_store::Location;
use tokio::sync::mpsc;
use tonic::Status;

use crate::raft::node::NodeHandle;

/// How often a follow stream looks for new segments.
const FOLLOW_POLL: Duration = Duration::from_millis(500);
/// Segments sent per stream at most (a runaway log cannot keep a stream busy forever).
const SEGMENTS_MAX: u64 = 1_000_000;
/// Largest segment read (workers flush at 64 KiB; a bigger object is not one of theirs).
const SEGMENT_BYTES_MAX: u64 = 16 * 1024 * 1024;

pub struct JobLogs {
    job: JobId,
    /// `<store>/jobs/<job>/logs`.
    logs: Location,
}

impl JobLogs {
    /// Node `node`'s log of `job` (0: the job's log, written by worker 0).
    pub fn open(store: &Location, job: JobId, node: u32) -> JobLogs {
        let folder = if node == 0 { "logs".to_string() } else { format!("logs/node-{node}") };
        JobLogs { job, logs: store.join(&format!("jobs/{job}/{folder}")) }
    }

    /// Segment `seq`, or `None` while it does not exist (or cannot be read yet: the stream
    /// polls again).
    async fn segment(&self, seq: u64) -> Option<String> {
        let key = self.logs.key(&format!("{seq:08}.log"));
        match flotilla_store::get_capped(&self.logs, &key, SEGMENT_BYTES_MAX).await {
            Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
            Err(e) if e.is_not_found() => None,
            Err(e) => {
                tracing::debug!(job = %self.job, seq, error = %e, "log segment not readable yet");
                None
            }
        }
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
