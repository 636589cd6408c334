//! `raft::Storage` over redb: the durable Raft log, HardState, ConfState and snapshot.
//!
//! One redb file per node. Everything a Ready asks to persist (snapshot, entries, HardState)
//! is written in ONE write transaction, so one fsync covers every proposal batched into that
//! Ready. Log metadata (first/last index, HardState, ConfState, snapshot metadata) is cached in
//! memory and only changed together with a committed transaction, so the cache never runs
//! ahead of the disk.
//!
//! Layout: table `raft_entries` (index -> protobuf `Entry`), table `raft_meta` (name -> bytes:
//! `hard_state`, `conf_state`, `snapshot_meta`, `format`), table `raft_snapshot` (`data` -> the
//! state machine's snapshot). The snapshot has a table of its own because redb keeps a value
//! inline in its B-tree leaf and copies the whole leaf on every update of any key in it: next to
//! `hard_state`, a 5 MB snapshot was rewritten (and fsynced) by every commit (format v1; opening
//! a v1 file moves its snapshot out, once).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_snapshot");
const KEY_HARD_STATE: &str = "hard_state";
const KEY_CONF_STATE: &str = "conf_state";
const KEY_SNAPSHOT_META: &str = "snapshot_meta";
/// The snapshot bytes: in SNAPSHOT since v2, in META in v1.
const KEY_SNAPSHOT_DATA: &str = "snapshot_data";
const KEY_DATA: &str = "data";
const KEY_FORMAT: &str = "format";
/// On-disk layout version of this file.
const FORMAT_VERSION: &[u8] = b"flotilla-raft-v2";
/// The layout before the snapshot moved to its own table (read, and upgraded on open).
const FORMAT_V1: &[u8] = b"flotilla-raft-v1";

/// Errors of the durable log. All are fatal for the node: Raft cannot continue safely on a
/// log it cannot read or write.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("raft log database: {0}")]
    Db(#[from] redb::Error),
    #[error("raft log is corrupt: {0}")]
    Corrupt(String),
    #[error("raft log at {path} was written by another format ({found}); this build reads flotilla-raft-v1 and v2")]
    Format { path: String, found: String },
}

macro_rules! db_error {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
db_error!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

impl From<StoreError> for raft::Error {
    fn from(e: StoreError) -> raft::Error {
        raft::Error::Store(StorageError::Other(Box::new(e)))
    }
}

#[derive(Debug, Clone, Default)]
struct Cached {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: SnapshotMetadata,
    /// Index of the last entry in the table, or the snapshot index when the table is empty.
    last_index: u64,
}

impl Cached {
    fn first_index(&self) -> u64 {
        self.snapshot.index + 1
    }
}

pub struct RaftStore {
    db: Database,
    cache: Mutex<Cached>,
}

fn decode<M: protobuf::Message>(what: &str, bytes: &[u8]) -> Result<M, StoreError> {
    M::parse_from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn encode<M: protobuf::Message>(message: &M) -> Vec<u8> {
    message.write_to_bytes().expect("encoding a raft message into memory cannot fail")
}

impl RaftStore {
    /// Opens (or creates) the log at `path`.
    pub fn open(path: &Path) -> Result<RaftStore, StoreError> {
        let db = Database::create(path)?;
        RaftStore::load(db, &path.display().to_string())
    }

    /// A log that lives in memory only (deterministic simulation tests). It behaves exactly like
    /// a file: data is visible only after its transaction commits.
    pub fn in_memory() -> Result<RaftStore, StoreError> {
        RaftStore::with_backend(redb::backends::InMemoryBackend::new())
    }

    /// A log over any redb backend (tests count the bytes a backend is asked to write).
    pub fn with_backend(backend: impl redb::StorageBackend) -> Result<RaftStore, StoreError> {
        let db = Database::builder().create_with_backend(backend)?;
        RaftStore::load(db, "(memory)")
    }

    fn load(db: Database, path: &str) -> Result<RaftStore, StoreError> {
        {
            let txn = db.begin_write()?;
            {
                let mut meta = txn.open_table(META)?;
                let found = meta.get(KEY_FORMAT)?.map(|v| v.value().to_vec());
                match found {
                    None => {
                        meta.insert(KEY_FORMAT, FORMAT_VERSION)?;
                    }
                    Some(v) if v == FORMAT_VERSION => {}
                    Some(v) if v == FORMAT_V1 => {
                        let data = meta.remove(KEY_SNAPSHOT_DATA)?.map(|v| v.value().to_vec());
                        if let Some(data) = data {
                            txn.open_table(SNAPSHOT)?.insert(KEY_DATA, data.as_slice())?;
                        }
                        meta.insert(KEY_FORMAT, FORMAT_VERSION)?;
                    }
                    Some(v) => {
                        return Err(StoreError::Format {
                            path: path.to_string(),
                            found: String::from_utf8_lossy(&v).into_owned(),
                        });
                    }
                }
                txn.open_table(ENTRIES)?;
                txn.open_table(SNAPSHOT)?;
            }
            txn.commit()?;
        }
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        let entries = txn.open_table(ENTRIES)?;
        let get = |key: &str| -> Result<Option<Vec<u8>>, StoreError> { Ok(meta.get(key)?.map(|v| v.value().to_vec())) };
        let mut cached = Cached::default();
        if let Some(b) = get(KEY_HARD_STATE)? {
            cached.hard_state = decode("hard state", &b)?;
        }
        if let Some(b) = get(KEY_CONF_STATE)? {
            cached.conf_state = decode("conf state", &b)?;
        }
        if let Some(b) = get(KEY_SNAPSHOT_META)? {
            cached.snapshot = decode("snapshot metadata", &b)?;
        }
        cached.last_index = match entries.last()? {
            Some((k, _)) => k.value(),
            None => cached.snapshot.index,
        };
        if let Some((k, _)) = entries.first()?
            && k.value() != cached.first_index()
        {
            return Err(StoreError::Corrupt(format!(
                "first entry is {} but the snapshot ends at {}",
                k.value(),
                cached.snapshot.index
            )));
        }
        drop((meta, entries, txn));
        Ok(RaftStore { db, cache: Mutex::new(cached) })
    }

    fn cache(&self) -> MutexGuard<'_, Cached> {
        self.cache.lock().expect("the cache lock is never held across a panic")
    }

    /// First start of a statically configured cluster: every node begins with the same voters
    /// and an empty log. Does nothing when the log already holds state.
    pub fn bootstrap(&self, voters: &[u64]) -> Result<(), StoreError> {
        if !self.cache().conf_state.voters.is_empty() {
            return Ok(());
        }
        let conf_state = ConfState { voters: voters.to_vec(), ..Default::default() };
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert(KEY_CONF_STATE, encode(&conf_state).as_slice())?;
        txn.commit()?;
        self.cache().conf_state = conf_state;
        Ok(())
    }

    /// Persists what one Ready asks for, in one transaction (one fsync): an incoming snapshot
    /// (replacing the log), new entries (replacing any conflicting suffix) and the HardState.
    pub fn persist(
        &self,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StoreError> {
        if snapshot.is_none() && entries.is_empty() {
            let mut cache = self.cache();
            match hard_state {
                None => return Ok(()),
                // Only the commit index moved: no fsync on the commit path. A lower commit
                // index after a crash is safe (the leader re-sends it); term and vote are not.
                Some(hs) if hs.term == cache.hard_state.term && hs.vote == cache.hard_state.vote => {
                    cache.hard_state.commit = cache.hard_state.commit.max(hs.commit);
                    return Ok(());
                }
                Some(_) => {}
            }
        }
        let mut next = self.cache().clone();
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let mut table = txn.open_table(ENTRIES)?;
            if let Some(snapshot) = snapshot {
                let m = snapshot.get_metadata();
                table.retain(|_, _| false)?;
                meta.insert(KEY_SNAPSHOT_META, encode(m).as_slice())?;
                txn.open_table(SNAPSHOT)?.insert(KEY_DATA, snapshot.get_data())?;
                meta.insert(KEY_CONF_STATE, encode(m.get_conf_state()).as_slice())?;
                next.snapshot = m.clone();
                next.conf_state = m.get_conf_state().clone();
                next.last_index = m.index;
                next.hard_state.term = next.hard_state.term.max(m.term);
                next.hard_state.commit = next.hard_state.commit.max(m.index);
            }
            if let Some(first) = entries.first() {
                if first.index < next.first_index() {
                    return Err(StoreError::Corrupt(format!(
                        "append at {} overwrites compacted entries (first index {})",
                        first.index,
                        next.first_index()
                    )));
                }
                if first.index > next.last_index + 1 {
                    return Err(StoreError::Corrupt(format!(
                        "append at {} leaves a gap after {}",
                        first.index, next.last_index
                    )));
                }
                table.retain_in(first.index.., |_, _| false)?;
                for entry in entries {
                    table.insert(entry.index, encode(entry).as_slice())?;
                }
                next.last_index = entries.last().map_or(next.last_index, |e| e.index);
            }
            if let Some(hs) = hard_state {
                next.hard_state = hs.clone();
            }
            meta.insert(KEY_HARD_STATE, encode(&next.hard_state).as_slice())?;
        }
        txn.commit()?;
        *self.cache() = next;
        Ok(())
    }

    /// Records the commit index learned from a LightReady. Kept in memory and written with the
    /// next transaction: a lower commit index after a crash is safe (the leader re-sends it).
    pub fn set_commit(&self, commit: u64) {
        let mut cache = self.cache();
        cache.hard_state.commit = cache.hard_state.commit.max(commit);
    }

    /// Stores a snapshot of the state machine at `index` (already applied) and drops the log
    /// up to it.
    pub fn compact_to_snapshot(&self, index: u64, data: &[u8]) -> Result<(), StoreError> {
        let term = self.term(index).map_err(|e| StoreError::Corrupt(format!("term of {index}: {e}")))?;
        let mut next = self.cache().clone();
        if index <= next.snapshot.index {
            return Ok(());
        }
        let meta_value =
            SnapshotMetadata { index, term, conf_state: Some(next.conf_state.clone()).into(), ..Default::default() };
        // The HardState on disk must not end below the snapshot (raft-rs refuses to start with
        // a commit index under the first log index); the cached commit may not be on disk yet.
        next.hard_state.commit = next.hard_state.commit.max(index);
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(KEY_SNAPSHOT_META, encode(&meta_value).as_slice())?;
            txn.open_table(SNAPSHOT)?.insert(KEY_DATA, data)?;
            meta.insert(KEY_HARD_STATE, encode(&next.hard_state).as_slice())?;
            txn.open_table(ENTRIES)?.retain_in(..=index, |_, _| false)?;
        }
        txn.commit()?;
        next.snapshot = meta_value;
        next.last_index = next.last_index.max(index);
        *self.cache() = next;
        Ok(())
    }

    /// The stored snapshot: metadata and state-machine bytes (empty before the first one).
    pub fn snapshot_with_data(&self) -> Result<Snapshot, StoreError> {
        let txn = self.db.begin_read()?;
        let data = txn.open_table(SNAPSHOT)?.get(KEY_DATA)?.map(|v| v.value().to_vec()).unwrap_or_default();
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(self.cache().snapshot.clone());
        snapshot.set_data(data.into());
        Ok(snapshot)
    }

    pub fn hard_state(&self) -> HardState {
        self.cache().hard_state.clone()
    }

    fn read_entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Result<Vec<Entry>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let mut out = Vec::new();
        let mut size = 0u64;
        for row in table.range(low..high)? {
            let (key, value) = row?;
            let bytes = value.value();
            size += bytes.len() as u64;
            if !out.is_empty() && max_size.is_some_and(|max| size > max) {
                break;
            }
            let entry: Entry = decode("entry", bytes)?;
            if entry.index != key.value() {
                return Err(StoreError::Corrupt(format!("entry at key {} says index {}", key.value(), entry.index)));
            }
            out.push(entry);
        }
        if out.is_empty() || out[0].index != low {
            return Err(StoreError::Corrupt(format!("entries [{low}, {high}) are missing")));
        }
        Ok(out)
    }
}

impl Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let cache = self.cache();
        Ok(RaftState::new(cache.hard_state.clone(), cache.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let (first, last) = {
            let cache = self.cache();
            (cache.first_index(), cache.last_index)
        };
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > last + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if low >= high {
            return Ok(Vec::new());
        }
        Ok(self.read_entries(low, high, max_size.into())?)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let (snapshot, first, last) = {
            let cache = self.cache();
            (cache.snapshot.clone(), cache.first_index(), cache.last_index)
        };
        if idx == snapshot.index {
            return Ok(snapshot.term);
        }
        if idx < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > last {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.read_entries(idx, idx + 1, None)?[0].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.cache().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.cache().last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let snapshot = self.snapshot_with_data()?;
        if snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: format!("e{index}").into_bytes().into(), ..Default::default() }
    }

    #[test]
    fn entries_survive_a_reopen_and_conflicts_are_truncated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft.redb");
        {
            let store = RaftStore::open(&path).expect("open");
            store.bootstrap(&[1, 2, 3]).expect("bootstrap");
            let hs = HardState { term: 2, vote: 1, commit: 2, ..Default::default() };
            store.persist(None, &[entry(1, 1), entry(2, 1), entry(3, 2)], Some(&hs)).expect("persist");
            // A new leader overwrites index 3 onwards.
            store.persist(None, &[entry(3, 3), entry(4, 3)], None).expect("overwrite");
        }
        let store = RaftStore::open(&path).expect("reopen");
        let state = store.initial_state().expect("state");
        assert_eq!((state.hard_state.term, state.hard_state.vote, state.hard_state.commit), (2, 1, 2));
        assert_eq!(state.conf_state.voters, [1, 2, 3]);
        assert_eq!((store.first_index().expect("first"), store.last_index().expect("last")), (1, 4));
        let terms: Vec<u64> = (1..=4).map(|i| store.term(i).expect("term")).collect();
        assert_eq!(terms, [1, 1, 3, 3]);
        let got = store.entries(2, 5, None, GetEntriesContext::empty(false)).expect("entries");
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), [2, 3, 4]);
        let limited = store.entries(1, 5, Some(1), GetEntriesContext::empty(false)).expect("limited");
        assert_eq!(limited.len(), 1, "max_size still returns at least one entry");
    }

    /// An in-memory redb backend that counts the bytes redb asks it to write.
    #[derive(Debug, Default)]
    struct Counting {
        inner: redb::backends::InMemoryBackend,
        written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    }

    impl redb::StorageBackend for Counting {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.written.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.inner.write(offset, data)
        }
    }

    #[test]
    fn a_commit_after_a_large_snapshot_does_not_rewrite_it() {
        let backend = Counting::default();
        let written = backend.written.clone();
        let store = RaftStore::with_backend(backend).expect("store");
        store.bootstrap(&[1]).expect("bootstrap");
        store.persist(None, &[entry(1, 1), entry(2, 1)], None).expect("persist");
        let snapshot_bytes = 4 << 20;
        store.compact_to_snapshot(2, &vec![7u8; snapshot_bytes]).expect("compact");
        let before = written.load(std::sync::atomic::Ordering::Relaxed);
        let commits = 50u64;
        for i in 3..3 + commits {
            let hs = HardState { term: 1, vote: 1, commit: i - 1, ..Default::default() };
            store.persist(None, &[entry(i, 1)], Some(&hs)).expect("persist");
        }
        let per_commit = (written.load(std::sync::atomic::Ordering::Relaxed) - before) / commits;
        assert!(
            per_commit < 64 * 1024,
            "each small commit wrote {per_commit} bytes after a {snapshot_bytes}-byte snapshot"
        );
        assert_eq!(store.snapshot_with_data().expect("snapshot").get_data().len(), snapshot_bytes);
    }

    #[test]
    fn a_v1_log_is_upgraded_on_open_and_keeps_its_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft.redb");
        {
            // The v1 layout: snapshot bytes next to the HardState in the meta table.
            let db = Database::create(&path).expect("create");
            let txn = db.begin_write().expect("txn");
            {
                let mut meta = txn.open_table(META).expect("meta");
                meta.insert(KEY_FORMAT, FORMAT_V1).expect("format");
                meta.insert(KEY_SNAPSHOT_DATA, &b"state@5"[..]).expect("data");
                let m = SnapshotMetadata { index: 5, term: 2, ..Default::default() };
                meta.insert(KEY_SNAPSHOT_META, encode(&m).as_slice()).expect("meta");
                let hs = HardState { term: 2, vote: 1, commit: 5, ..Default::default() };
                meta.insert(KEY_HARD_STATE, encode(&hs).as_slice()).expect("hs");
                let mut entries = txn.open_table(ENTRIES).expect("entries");
                entries.insert(6, encode(&entry(6, 2)).as_slice()).expect("entry");
            }
            txn.commit().expect("commit");
        }
        for _ in 0..2 {
            let store = RaftStore::open(&path).expect("open a v1 file, then the upgraded one");
            let snapshot = store.snapshot_with_data().expect("snapshot");
            assert_eq!((snapshot.get_metadata().index, snapshot.get_data()), (5, &b"state@5"[..]));
            assert_eq!((store.first_index().expect("first"), store.last_index().expect("last")), (6, 6));
        }
        let db = Database::open(&path).expect("reopen raw");
        let txn = db.begin_read().expect("read");
        let meta = txn.open_table(META).expect("meta");
        assert_eq!(meta.get(KEY_FORMAT).expect("get").map(|v| v.value().to_vec()), Some(FORMAT_VERSION.to_vec()));
        assert!(meta.get(KEY_SNAPSHOT_DATA).expect("get").is_none(), "the snapshot left the meta table");
    }

    #[test]
    fn compaction_keeps_the_snapshot_term_and_refuses_old_reads() {
        let store = RaftStore::in_memory().expect("memory store");
        store.bootstrap(&[1]).expect("bootstrap");
        store.persist(None, &[entry(1, 1), entry(2, 1), entry(3, 2), entry(4, 2)], None).expect("persist");
        store.compact_to_snapshot(3, b"state@3").expect("compact");
        assert_eq!(store.first_index().expect("first"), 4);
        assert_eq!(store.term(3).expect("snapshot term"), 2);
        assert!(matches!(store.term(2), Err(raft::Error::Store(StorageError::Compacted))));
        assert!(matches!(
            store.entries(2, 5, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        let snapshot = store.snapshot(0, 2).expect("snapshot");
        assert_eq!((snapshot.get_metadata().index, snapshot.get_data()), (3, &b"state@3"[..]));
        assert!(store.snapshot(4, 2).is_err(), "a snapshot older than requested is not offered");
        assert!(store.persist(None, &[entry(2, 1)], None).is_err(), "appending below the snapshot is refused");
        assert!(store.persist(None, &[entry(9, 2)], None).is_err(), "a gap is refused");
    }

    #[test]
    fn an_incoming_snapshot_replaces_the_log() {
        let store = RaftStore::in_memory().expect("memory store");
        store.persist(None, &[entry(1, 1), entry(2, 1)], None).expect("persist");
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().index = 10;
        snapshot.mut_metadata().term = 4;
        snapshot.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        snapshot.set_data(b"s".to_vec().into());
        store.persist(Some(&snapshot), &[entry(11, 4)], None).expect("apply snapshot");
        assert_eq!((store.first_index().expect("first"), store.last_index().expect("last")), (11, 11));
        assert_eq!(store.initial_state().expect("state").hard_state.commit, 10);
        assert_eq!(store.snapshot_with_data().expect("snapshot").get_data(), b"s");
    }
}
