//! Reads the redb Raft log of versions before the write-ahead log (`raft.redb`), once, so that
//! [`super::storage::RaftStore::open`] can convert it. Two layouts existed: `flotilla-raft-v1`
//! (the snapshot bytes in `raft_meta`) and `flotilla-raft-v2` (in `raft_snapshot`).

use std::path::Path;

use bytes::Bytes;
use raft::eraftpb::{ConfState, Entry, HardState, SnapshotMetadata};
use redb::{Database, ReadableDatabase, TableDefinition};

use super::storage::StoreError;

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_snapshot");
const FORMATS: [&[u8]; 2] = [b"flotilla-raft-v1", b"flotilla-raft-v2"];

/// Everything a redb log held.
#[derive(Debug, Default)]
pub struct LegacyLog {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    pub snapshot: SnapshotMetadata,
    pub snapshot_data: Bytes,
    /// In index order, right after the snapshot.
    pub entries: Vec<Entry>,
}

fn corrupt(path: &Path, why: String) -> StoreError {
    StoreError::Corrupt(format!("{}: {why}", path.display()))
}

fn decode<M: protobuf::Message>(path: &Path, what: &str, bytes: &[u8]) -> Result<M, StoreError> {
    M::parse_from_bytes(bytes).map_err(|e| corrupt(path, format!("{what}: {e}")))
}

pub fn read(path: &Path) -> Result<LegacyLog, StoreError> {
    let db = Database::open(path).map_err(redb::Error::from)?;
    let txn = db.begin_read().map_err(redb::Error::from)?;
    let meta = txn.open_table(META).map_err(redb::Error::from)?;
    let get = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
        Ok(meta.get(key).map_err(redb::Error::from)?.map(|v| v.value().to_vec()))
    };
    let format = get("format")?.unwrap_or_default();
    if !FORMATS.contains(&format.as_slice()) {
        return Err(StoreError::Format {
            path: path.display().to_string(),
            found: String::from_utf8_lossy(&format).into_owned(),
        });
    }
    let mut log = LegacyLog::default();
    if let Some(b) = get("hard_state")? {
        log.hard_state = decode(path, "hard state", &b)?;
    }
    if let Some(b) = get("conf_state")? {
        log.conf_state = decode(path, "conf state", &b)?;
    }
    if let Some(b) = get("snapshot_meta")? {
        log.snapshot = decode(path, "snapshot metadata", &b)?;
    }
    let data = match txn.open_table(SNAPSHOT) {
        Ok(table) => table.get("data").map_err(redb::Error::from)?.map(|v| v.value().to_vec()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(redb::Error::from(e).into()),
    };
    log.snapshot_data = Bytes::from(data.or(get("snapshot_data")?).unwrap_or_default());
    let entries = txn.open_table(ENTRIES).map_err(redb::Error::from)?;
    let first = log.snapshot.index + 1;
    for (expected, row) in (first..).zip(entries.range(first..).map_err(redb::Error::from)?) {
        let (key, value) = row.map_err(redb::Error::from)?;
        let entry: Entry = decode(path, "entry", value.value())?;
        if key.value() != expected || entry.index != expected {
            return Err(corrupt(path, format!("entry {} where {expected} was expected", key.value())));
        }
        log.entries.push(entry);
    }
    // raft-rs refuses a commit index below the snapshot (the v1 compaction wrote both).
    log.hard_state.commit = log.hard_state.commit.max(log.snapshot.index);
    Ok(log)
}
