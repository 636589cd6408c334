//! A job's logs in the object store: each gang member (node) appends lines, written as numbered
//! segments (`<job prefix>/logs/<seq:08>.log` for node 0, the job's log;
//! `<job prefix>/logs/node-<N>/<seq:08>.log` for node N; objects are immutable), which
//! `flotilla logs [--node N]` reads back in order. One segment per flush keeps a crash from
//! losing more than the unflushed lines.

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::checkpoint::CheckpointError;
use crate::checkpoint::store;

/// Bytes buffered before a flush is forced.
const BUFFER_BYTES_MAX: usize = 64 * 1024;
/// Length of one line at most (longer lines are cut).
pub const LINE_BYTES_MAX: usize = 4096;

pub struct JobLog {
    store: std::sync::Arc<dyn ObjectStore>,
    prefix: Path,
    node: u32,
    next_segment: u64,
    buffer: String,
    runtime: tokio::runtime::Runtime,
}

/// The folder of node `node`'s log, relative to the job prefix.
pub fn node_logs(node: u32) -> String {
    if node == 0 { "logs".to_string() } else { format!("logs/node-{node}") }
}

/// The object holding segment `seq` of node `node`'s log under a job prefix.
pub fn segment_path(job_prefix: &Path, node: u32, seq: u64) -> Path {
    let mut path = job_prefix.clone();
    for part in node_logs(node).split('/') {
        path = path.join(part);
    }
    path.join(format!("{seq:08}.log"))
}

impl JobLog {
    /// Opens node `node`'s log under `job_uri` (file:///.../jobs/<job>), continuing after
    /// existing segments.
    pub fn open(job_uri: &str, node: u32) -> Result<JobLog, CheckpointError> {
        let location = store::open(job_uri)?;
        let (store, prefix) = (location.store().clone(), location.prefix().clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CheckpointError::Invalid(format!("log runtime: {e}")))?;
        // One listing, not a HEAD per segment: a long job has hundreds of segments, and this
        // runs at the start of every generation (on S3, each request costs a round trip).
        let folder = node_logs(node).split('/').fold(prefix.clone(), |path, part| path.join(part));
        let existing = match runtime.block_on(store.list_with_delimiter(Some(&folder))) {
            Ok(listed) => listed.objects,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let next_segment = existing
            .iter()
            .filter_map(|o| o.location.filename()?.strip_suffix(".log")?.parse::<u64>().ok())
            .max()
            .map_or(0, |last| last + 1);
        Ok(JobLog { store, prefix, node, next_segment, buffer: String::new(), runtime })
    }

    pub fn line(&mut self, text: &str) -> Result<(), CheckpointError> {
        let mut cut = text.len().min(LINE_BYTES_MAX);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        self.buffer.push_str(&text[..cut]);
        self.buffer.push('\n');
        if self.buffer.len() >= BUFFER_BYTES_MAX { self.flush() } else { Ok(()) }
    }

    /// Writes buffered lines as the next segment.
    pub fn flush(&mut self) -> Result<(), CheckpointError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let path = segment_path(&self.prefix, self.node, self.next_segment);
        let bytes = Bytes::from(std::mem::take(&mut self.buffer));
        self.runtime.block_on(self.store.put(&path, PutPayload::from_bytes(bytes)))?;
        self.next_segment += 1;
        Ok(())
    }
}

impl Drop for JobLog {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn a_reopened_log_continues_after_its_segments_and_nodes_keep_their_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uri = format!("file://{}/jobs/job-1", dir.path().display());
        for round in 0..3 {
            let mut log = JobLog::open(&uri, 0).expect("open node 0");
            log.line(&format!("round {round}")).expect("line");
            log.flush().expect("flush");
            let mut other = JobLog::open(&uri, 1).expect("open node 1");
            other.line("node 1").expect("line");
        } // dropping flushes node 1
        let logs = dir.path().join("jobs/job-1/logs");
        assert_eq!(segments(&logs), ["00000000.log", "00000001.log", "00000002.log", "node-1"]);
        assert_eq!(segments(&logs.join("node-1")), ["00000000.log", "00000001.log", "00000002.log"]);
        let first = std::fs::read_to_string(logs.join("00000000.log")).expect("segment 0");
        assert_eq!(first, "round 0\n", "an earlier segment is never overwritten");
    }
}
