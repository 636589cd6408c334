//! A job's logs in the object store: each gang member (node) appends lines, written as numbered
//! segments (`<job prefix>/logs/<seq:08>.log` for node 0, the job's log;
//! `<job prefix>/logs/node-<N>/<seq:08>.log` for node N; objects are immutable), which
//! `flotilla logs [--node N]` reads back in order. One segment per flush keeps a crash from
//! losing more than the unflushed lines.
//!
//! Writes never block the rank: a flush hands its segment to the log's writer thread, which
//! finds where the log continues (one listing) and puts the segments in order. On S3 each of
//! those is a round trip (20-100 ms) that a generation's start-up no longer waits for. While
//! the store does not take segments (an outage), the lines wait in the rank's buffer, up to
//! [`PENDING_BYTES_MAX`]; past it they go to the agent's own log, and the job log says how many
//! did once it takes segments again. Closing the log (drop) waits for the writer, so a rank's
//! last lines are written before it ends.
//!
//! Two writers of one node's log can overlap: a stopped rank closes its log after the next
//! generation's rank of the same node opened its own (on this machine or another). Each segment
//! is therefore put only if its name is free (a conditional put: `If-None-Match: *` on S3, a
//! link that does not replace on disk); a taken name sends the writer on to the next free one,
//! so no segment is overwritten and the numbering stays dense for readers. An S3-compatible
//! store that refuses conditional puts gets plain ones (the log is kept; overlapping writers
//! may then replace each other's segment, as before).

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

use crate::checkpoint::CheckpointError;
use crate::checkpoint::store;

/// Bytes buffered before a flush is forced.
const BUFFER_BYTES_MAX: usize = 64 * 1024;
/// Segments waiting for the writer at most; a flush beyond keeps its lines in the buffer (the
/// store is slower than the lines come).
const QUEUE_SEGMENTS_MAX: usize = 16;
/// Bytes kept in the buffer while the writer's queue is full; beyond, they go to the agent's
/// own log (a stalled store must neither stall the training loop nor grow its memory).
const PENDING_BYTES_MAX: usize = 1024 * 1024;
/// Length of one line at most (longer lines are cut).
pub const LINE_BYTES_MAX: usize = 4096;
/// Taken segment names skipped for one segment at most (another writer of the same node's log
/// wrote them meanwhile); beyond, its lines go to the agent's log.
const TAKEN_SEGMENTS_MAX: u64 = 1024;

pub struct JobLog {
    buffer: String,
    /// The log's URI, for the lines that go to the agent's log instead.
    job_uri: String,
    /// Lines sent to the agent's log since the job log last took a segment.
    diverted_lines: u64,
    /// To the writer thread; None once closed.
    segments: Option<std::sync::mpsc::SyncSender<Bytes>>,
    writer: Option<std::thread::JoinHandle<()>>,
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
    /// existing segments. The URI is checked here; the store itself is opened by the writer,
    /// off the caller's path (an S3 client's set-up took 4-11 ms of each rank's start), which
    /// also finds the existing segments.
    pub fn open(job_uri: &str, node: u32) -> Result<JobLog, CheckpointError> {
        store::check_uri(job_uri)?;
        let job_uri = job_uri.to_string();
        let name = job_uri.clone();
        let (segments, queue) = std::sync::mpsc::sync_channel::<Bytes>(QUEUE_SEGMENTS_MAX);
        let writer = std::thread::Builder::new()
            .name("job-log".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| CheckpointError::Invalid(format!("log runtime: {e}")));
                match store::open(&job_uri).and_then(|location| Ok((location, runtime?))) {
                    Ok((location, runtime)) => {
                        write_segments(location.store().as_ref(), location.prefix(), node, &runtime, &queue)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, log = job_uri, "the job log cannot be opened; its lines go to this agent's log");
                        queue.iter().for_each(|bytes| to_agent_log(&job_uri, &bytes));
                    }
                }
            })
            .map_err(|e| CheckpointError::Invalid(format!("log writer: {e}")))?;
        Ok(JobLog {
            buffer: String::new(),
            job_uri: name,
            diverted_lines: 0,
            segments: Some(segments),
            writer: Some(writer),
        })
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

    /// Hands buffered lines to the writer as the next segment, without waiting: while its
    /// queue is full they stay buffered (see [`PENDING_BYTES_MAX`]).
    pub fn flush(&mut self) -> Result<(), CheckpointError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        if self.diverted_lines > 0 {
            if self.hand(diverted_note(self.diverted_lines))?.is_some() {
                self.keep_buffered();
                return Ok(());
            }
            self.diverted_lines = 0;
        }
        let segment = Bytes::from(std::mem::take(&mut self.buffer));
        if let Some(segment) = self.hand(segment)? {
            self.buffer = String::from_utf8(Vec::from(segment)).unwrap_or_default();
            self.keep_buffered();
        }
        Ok(())
    }

    /// Gives `segment` to the writer if its queue has room; else gives it back.
    fn hand(&self, segment: Bytes) -> Result<Option<Bytes>, CheckpointError> {
        use std::sync::mpsc::TrySendError;
        match self.segments.as_ref().map(|s| s.try_send(segment)) {
            Some(Ok(())) => Ok(None),
            Some(Err(TrySendError::Full(segment))) => Ok(Some(segment)),
            _ => Err(CheckpointError::Invalid("the job log's writer has stopped".into())),
        }
    }

    /// The buffer stays for the next flush, or goes to the agent's log once it is too big.
    fn keep_buffered(&mut self) {
        if self.buffer.len() >= PENDING_BYTES_MAX {
            self.diverted_lines += self.buffer.lines().count() as u64;
            to_agent_log(&self.job_uri, self.buffer.as_bytes());
            self.buffer.clear();
        }
    }
}

impl Drop for JobLog {
    fn drop(&mut self) {
        // The last lines wait for the writer's queue.
        if let Some(segments) = self.segments.as_ref() {
            if self.diverted_lines > 0 {
                let _ = segments.send(diverted_note(self.diverted_lines));
            }
            if !self.buffer.is_empty() {
                let _ = segments.send(Bytes::from(std::mem::take(&mut self.buffer)));
            }
        }
        self.segments = None; // the writer ends once the queue is drained
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// The line that stands for `lines` lines sent to the agent's log instead (see [`PENDING_BYTES_MAX`]).
fn diverted_note(lines: u64) -> Bytes {
    Bytes::from(format!(
        "[flotilla: {lines} line(s) of this log are in the agent's log instead: the store did not take them in time]\n"
    ))
}

/// A segment the job log could not take, line by line into this agent's own log.
fn to_agent_log(log: &str, segment: &[u8]) {
    for line in String::from_utf8_lossy(segment).lines() {
        tracing::info!(log, "{line}");
    }
}

/// The writer thread: one listing to find the next segment number (not a HEAD per segment: a
/// long job has hundreds), then each queued segment put in order. A store that fails is
/// reported in the agent's log, with the lines it could not take.
fn write_segments(
    store: &dyn ObjectStore,
    prefix: &Path,
    node: u32,
    runtime: &tokio::runtime::Runtime,
    queue: &std::sync::mpsc::Receiver<Bytes>,
) {
    let folder = node_logs(node).split('/').fold(prefix.clone(), |path, part| path.join(part));
    let mut next_segment = match runtime.block_on(store.list_with_delimiter(Some(&folder))) {
        Ok(listed) => Some(
            listed
                .objects
                .iter()
                .filter_map(|o| o.location.filename()?.strip_suffix(".log")?.parse::<u64>().ok())
                .max()
                .map_or(0, |last| last + 1),
        ),
        Err(object_store::Error::NotFound { .. }) => Some(0),
        Err(e) => {
            tracing::warn!(error = %e, log = %folder, "the job log cannot be listed; its lines go to this agent's log");
            None
        }
    };
    let mut conditional = true;
    while let Ok(bytes) = queue.recv() {
        let written = next_segment
            .map(|seq| runtime.block_on(put_free_segment(store, prefix, node, seq, &bytes, &mut conditional)));
        match written {
            Some(Ok(seq)) => next_segment = Some(seq + 1),
            failed => {
                if let Some(Err(e)) = failed {
                    tracing::warn!(error = %e, log = %folder, "a job log segment was not written");
                }
                to_agent_log(folder.as_ref(), &bytes);
            }
        }
    }
}

/// Puts `bytes` as the first free segment from `seq` on (never replacing one another writer
/// put) and returns its number. A store that refuses conditional puts (an S3-compatible one
/// without `If-None-Match`) gets plain puts from then on (`conditional` false): the behaviour
/// before, where overlapping writers of one node could replace each other's segment.
async fn put_free_segment(
    store: &dyn ObjectStore,
    prefix: &Path,
    node: u32,
    seq: u64,
    bytes: &Bytes,
    conditional: &mut bool,
) -> Result<u64, object_store::Error> {
    let create = PutOptions { mode: PutMode::Create, ..PutOptions::default() };
    let mut taken = 0;
    loop {
        let candidate = seq + taken;
        let path = segment_path(prefix, node, candidate);
        let payload = || PutPayload::from_bytes(bytes.clone());
        if !*conditional {
            return store.put_opts(&path, payload(), PutOptions::default()).await.map(|_| candidate);
        }
        match store.put_opts(&path, payload(), create.clone()).await {
            Ok(_) => return Ok(candidate),
            Err(object_store::Error::AlreadyExists { .. }) if taken < TAKEN_SEGMENTS_MAX => taken += 1,
            Err(e @ object_store::Error::AlreadyExists { .. }) => return Err(e),
            // An outage says nothing of conditional puts: this segment fails, the mode stays.
            Err(e) if flotilla_store::is_outage(&e) => return Err(e),
            Err(refused) => {
                store.put_opts(&path, payload(), PutOptions::default()).await?;
                tracing::warn!(
                    error = %refused,
                    "the store refused a conditional put of a job log segment and took a plain one; \
                     this log's segments are written without the check from now on"
                );
                *conditional = false;
                return Ok(candidate);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use object_store::ObjectStoreExt;

    use super::*;

    fn segments(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    #[test]
    fn a_stalled_writer_never_blocks_a_flush_and_the_log_says_what_went_elsewhere() {
        // The writer thread of a store that takes nothing (an S3 outage): its queue, never read.
        let (segments, queue) = std::sync::mpsc::sync_channel::<Bytes>(QUEUE_SEGMENTS_MAX);
        let mut log = JobLog {
            buffer: String::new(),
            job_uri: "s3://bucket/jobs/job-1".into(),
            diverted_lines: 0,
            segments: Some(segments),
            writer: None,
        };
        let line = "x".repeat(1000);
        let (done, finished) = std::sync::mpsc::channel();
        let writing = std::thread::spawn(move || {
            // 4 MiB of lines, a flush after each: the queue fills after 16 segments.
            for _ in 0..4096 {
                log.line(&line).expect("line");
                log.flush().expect("flush");
            }
            let _ = done.send(());
            log
        });
        finished.recv_timeout(std::time::Duration::from_secs(20)).expect("flushes return while the writer is stalled");
        let mut log = writing.join().expect("writer");
        assert!(log.buffer.len() < PENDING_BYTES_MAX, "the buffer is bounded: {} bytes", log.buffer.len());
        let queued: Vec<Bytes> = queue.try_iter().collect();
        assert_eq!(queued.len(), QUEUE_SEGMENTS_MAX);
        let diverted = log.diverted_lines;
        let kept = log.buffer.lines().count() as u64;
        assert!(diverted >= 2048, "{diverted} lines went to the agent's log");
        assert_eq!(QUEUE_SEGMENTS_MAX as u64 + diverted + kept, 4096, "every line is somewhere");
        // The store takes segments again: the next one says how many lines went elsewhere.
        log.line("after").expect("line");
        log.flush().expect("flush");
        let text = |segment: Bytes| String::from_utf8(segment.to_vec()).expect("utf-8");
        let note = text(queue.try_recv().expect("the note"));
        assert_eq!(
            note,
            format!(
                "[flotilla: {diverted} line(s) of this log are in the agent's log instead: the store did not take them \
                 in time]\n"
            )
        );
        let lines = text(queue.try_recv().expect("the lines kept"));
        assert_eq!(lines.lines().count() as u64, kept + 1);
        assert!(lines.ends_with("after\n") && log.diverted_lines == 0);
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
        // Two writers of one node at once (a stopped rank closing its log after the next
        // generation's rank opened its own): both started from the same listing, neither
        // segment replaces the other and the numbering stays dense.
        let mut leaving = JobLog::open(&uri, 1).expect("open node 1");
        let mut next = JobLog::open(&uri, 1).expect("open node 1 again");
        next.line("next generation").expect("line");
        next.flush().expect("flush");
        drop(next);
        leaving.line("stopped").expect("line");
        drop(leaving);
        let names = segments(&logs.join("node-1"));
        assert_eq!(names, ["00000000.log", "00000001.log", "00000002.log", "00000003.log", "00000004.log"]);
        let last_two: Vec<String> =
            names[3..].iter().map(|n| std::fs::read_to_string(logs.join("node-1").join(n)).expect("segment")).collect();
        assert!(last_two.contains(&"stopped\n".to_string()) && last_two.contains(&"next generation\n".to_string()));
        // The URI is still checked when the log opens (the store itself opens in the writer).
        assert!(JobLog::open("ftp://host/jobs/job-1", 0).is_err());
    }

    /// An S3 endpoint that answers a conditional put (`If-None-Match`) with 503 SlowDown and
    /// takes any other request.
    fn flapping_endpoint() -> String {
        use flotilla_store::testing::{Reply, http_endpoint};
        http_endpoint(|request| match request.header("if-none-match") {
            Some(_) => Reply::s3_error("503 Service Unavailable", "SlowDown"),
            None => Reply::new("200 OK", "").header("ETag: \"e\""),
        })
    }

    /// On S3 (moto's server, started by scripts/test.sh): a taken segment name is skipped, and
    /// a store that refuses conditional puts gets plain ones instead of losing the lines.
    #[test]
    fn on_s3_a_taken_segment_is_skipped_and_a_store_without_conditional_puts_still_takes_the_log() {
        use flotilla_store::testing::{create_bucket, env, moto};
        let endpoint = moto();
        let settings = |conditional: &str| {
            let mut vars = env(&endpoint, true);
            vars.push(("AWS_CONDITIONAL_PUT".to_string(), conditional.to_string()));
            vars
        };
        create_bucket(&endpoint, "flotilla-joblog");

        let read = |location: &flotilla_store::Location, seq: u64| {
            let key = segment_path(location.prefix(), 1, seq);
            flotilla_store::block_on(async { location.store().get(&key).await?.bytes().await })
                .expect("runtime")
                .map(|b: Bytes| String::from_utf8_lossy(&b).into_owned())
        };
        let put = |location: &flotilla_store::Location, seq: u64, text: &str, conditional: &mut bool| {
            let bytes = Bytes::from(text.to_string());
            flotilla_store::block_on(put_free_segment(
                location.store().as_ref(),
                location.prefix(),
                1,
                seq,
                &bytes,
                conditional,
            ))
            .expect("runtime")
        };
        let checked = flotilla_store::open_with("s3://flotilla-joblog/jobs/job-1", settings("etag")).expect("location");
        let mut conditional = true;
        assert_eq!(put(&checked, 0, "first\n", &mut conditional).expect("put"), 0);
        // A second writer that listed before the first put: moves on to segment 1.
        assert_eq!(put(&checked, 0, "second\n", &mut conditional).expect("put"), 1);
        assert!(conditional, "moto's S3 takes conditional puts");
        assert_eq!(read(&checked, 0).expect("segment 0"), "first\n");
        assert_eq!(read(&checked, 1).expect("segment 1"), "second\n");

        // A store that fails the conditional put on its side (503 after the client's retries)
        // and then takes a plain one: the segment fails and conditional puts stay on. Before,
        // the plain put landed and turned the check off for good.
        let mut flapping = env(&flapping_endpoint(), true);
        flapping.push(("AWS_CONDITIONAL_PUT".to_string(), "etag".to_string()));
        let out = flotilla_store::open_with("s3://flotilla-joblog/jobs/job-3", flapping).expect("location");
        assert!(put(&out, 0, "lost\n", &mut conditional).is_err(), "the store is out");
        assert!(conditional, "an outage does not turn conditional puts off");

        let plain =
            flotilla_store::open_with("s3://flotilla-joblog/jobs/job-2", settings("disabled")).expect("location");
        assert_eq!(put(&plain, 0, "kept\n", &mut conditional).expect("a plain put after the refusal"), 0);
        assert!(!conditional, "the writer puts plainly from then on");
        assert_eq!(read(&plain, 0).expect("segment 0"), "kept\n");
    }
}
