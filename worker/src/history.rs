//! A job's metrics history, kept out of the Raft log: rank 0's agent appends one JSON line per
//! progress report (about one a second: step, loss, samples/s) and one with the final validation
//! metrics, as numbered segments `<job prefix>/history/<generation:08>-<seq:08>.jsonl` (objects
//! are immutable; names sort by time). The coordinator reads them back for the dashboard.

use std::time::{Duration, Instant};

use flotilla_store::Location;
use object_store::{ObjectStoreExt, PutPayload};

/// A segment is written at most this often (each is one object)...
const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// ...or when this many bytes are buffered.
const BUFFER_BYTES_MAX: usize = 64 * 1024;
/// Segments per generation at most (a runaway run stops recording, never fails).
const SEGMENTS_MAX: u64 = 100_000;

pub struct HistoryWriter {
    location: Location,
    generation: u64,
    next_segment: u64,
    buffer: String,
    last_flush: Instant,
}

impl HistoryWriter {
    /// The history of the job under `job_uri`, for `generation` (no I/O until the first flush).
    pub fn open(job_uri: &str, generation: u64) -> Result<HistoryWriter, flotilla_store::StoreError> {
        let location = flotilla_store::open(job_uri)?.join("history");
        Ok(HistoryWriter { location, generation, next_segment: 0, buffer: String::new(), last_flush: Instant::now() })
    }

    /// Appends one point (a JSON object); writes a segment when one is due.
    pub async fn append(&mut self, point: serde_json::Value) {
        self.buffer.push_str(&point.to_string());
        self.buffer.push('\n');
        if self.buffer.len() >= BUFFER_BYTES_MAX || self.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush().await;
        }
    }

    /// Writes what is buffered as the next segment (a failure is logged: history is best effort).
    pub async fn flush(&mut self) {
        self.last_flush = Instant::now();
        if self.buffer.is_empty() || self.next_segment >= SEGMENTS_MAX {
            return;
        }
        let key = self.location.key(&format!("{:08}-{:08}.jsonl", self.generation, self.next_segment));
        let bytes = std::mem::take(&mut self.buffer);
        match self.location.store().put(&key, PutPayload::from(bytes)).await {
            Ok(_) => self.next_segment += 1,
            Err(e) => tracing::warn!(error = %e, "could not write the job's metrics history"),
        }
    }
}
