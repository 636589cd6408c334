//! A job's metrics history, kept out of the Raft log: rank 0's agent appends one JSON line per
//! progress report (about one a second: step, loss, samples/s) and one with the final validation
//! metrics, as segments `<job prefix>/history/<generation:08>-<first step:012>-<seq:08>-<worker>.jsonl`
//! (objects are immutable; names sort by generation, then step). A generation's rank 0 can
//! change without a new generation (a live handover gives its rank to the replacement), so the
//! name holds the writer and the segment's first step: the new rank 0's segments neither
//! overwrite the old one's nor sort before them. The coordinator reads them back for the
//! dashboard.

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
    /// The agent writing (its worker id), part of every segment's name.
    writer: String,
    next_segment: u64,
    buffer: String,
    /// The step of the buffer's first point (the last step seen when that point has none).
    first_step: Option<u64>,
    last_step: u64,
    last_flush: Instant,
}

impl HistoryWriter {
    /// The history of the job under `job_uri`, for `generation`, written by `writer` (a worker
    /// id: letters, digits and `-`; anything else becomes `_`). No I/O until the first flush.
    pub fn open(job_uri: &str, generation: u64, writer: &str) -> Result<HistoryWriter, flotilla_store::StoreError> {
        let location = flotilla_store::open(job_uri)?.join("history");
        let writer =
            writer.chars().take(64).map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        Ok(HistoryWriter {
            location,
            generation,
            writer,
            next_segment: 0,
            buffer: String::new(),
            first_step: None,
            last_step: 0,
            last_flush: Instant::now(),
        })
    }

    /// Appends one point (a JSON object); writes a segment when one is due.
    pub async fn append(&mut self, point: serde_json::Value) {
        self.last_step = point.get("step").and_then(serde_json::Value::as_u64).unwrap_or(self.last_step);
        self.first_step.get_or_insert(self.last_step);
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
        let first_step = self.first_step.take().unwrap_or(self.last_step);
        let name = format!("{:08}-{first_step:012}-{:08}-{}.jsonl", self.generation, self.next_segment, self.writer);
        let key = self.location.key(&name);
        let bytes = std::mem::take(&mut self.buffer);
        match self.location.store().put(&key, PutPayload::from(bytes)).await {
            Ok(_) => self.next_segment += 1,
            Err(e) => tracing::warn!(error = %e, "could not write the job's metrics history"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HistoryWriter;

    /// A live handover gives generation 1's rank 0 to another agent: its segments keep the old
    /// writer's (they used to overwrite them: both wrote `00000001-00000000.jsonl`) and sort
    /// after them.
    #[tokio::test]
    async fn a_second_writer_of_a_generation_overwrites_nothing_and_sorts_after() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uri = format!("file://{}", dir.path().display());
        let mut first = HistoryWriter::open(&uri, 1, "worker-1").expect("open");
        for step in [1, 2, 3] {
            first.append(serde_json::json!({ "generation": 1, "step": step })).await;
            first.flush().await;
        }
        let mut second = HistoryWriter::open(&uri, 1, "worker-3").expect("open");
        for step in [40, 41] {
            second.append(serde_json::json!({ "generation": 1, "step": step })).await;
            second.flush().await;
        }
        let location = flotilla_store::open(&uri).expect("store").join("history");
        let mut names: Vec<String> = flotilla_store::list(&location, location.prefix())
            .await
            .expect("list")
            .into_iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "00000001-000000000001-00000000-worker-1.jsonl",
                "00000001-000000000002-00000001-worker-1.jsonl",
                "00000001-000000000003-00000002-worker-1.jsonl",
                "00000001-000000000040-00000000-worker-3.jsonl",
                "00000001-000000000041-00000001-worker-3.jsonl",
            ]
        );
    }
}
