//! The write-ahead log against real files: reopen, conflicts, compaction, torn tails, crashes
//! between a snapshot and its log, and the conversion of the redb log of earlier versions.

use super::*;

fn entry(index: u64, term: u64) -> Entry {
    Entry { index, term, data: format!("e{index}").into_bytes().into(), ..Default::default() }
}

fn bounds(store: &RaftStore) -> (u64, u64) {
    (store.first_index().expect("first"), store.last_index().expect("last"))
}

/// Where the log's records end in its file (the rest of the file is the preallocated zeros).
fn records_end(store: &RaftStore) -> u64 {
    store.wal().as_ref().expect("a log on disk").len
}

/// Writes `bytes` into the log file at `at`, as a crash mid-append can leave them.
fn damage(path: &Path, at: u64, bytes: &[u8]) {
    let file = OpenOptions::new().write(true).open(path).expect("open for writing");
    file.write_all_at(bytes, at).expect("write into the log");
}

/// After a reopen that cut a torn tail: entry `next` appends, and it and `hs` survive the next
/// reopen, which finds entries 1..=next.
fn goes_on_after_the_cut(dir: &Path, store: RaftStore, next: u64, hs: &HardState) {
    store.persist(None, &[entry(next, 1)], None).expect("append after the cut");
    drop(store);
    let store = RaftStore::open(dir).expect("reopen");
    assert_eq!(bounds(&store), (1, next));
    assert_eq!(&store.initial_state().expect("state").hard_state, hs);
}

fn snapshot_at(index: u64, term: u64, data: &[u8]) -> Snapshot {
    let mut snapshot = Snapshot::default();
    snapshot.mut_metadata().index = index;
    snapshot.mut_metadata().term = term;
    snapshot.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
    snapshot.set_data(data.to_vec().into());
    snapshot
}

#[test]
fn entries_survive_a_reopen_and_conflicts_are_truncated() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = RaftStore::open(dir.path()).expect("open");
        store.bootstrap(&[1, 2, 3]).expect("bootstrap");
        let hs = HardState { term: 2, vote: 1, commit: 2, ..Default::default() };
        store.persist(None, &[entry(1, 1), entry(2, 1), entry(3, 2)], Some(&hs)).expect("persist");
        // A new leader overwrites index 3 onwards.
        store.persist(None, &[entry(3, 3), entry(4, 3)], None).expect("overwrite");
    }
    let store = RaftStore::open(dir.path()).expect("reopen");
    let state = store.initial_state().expect("state");
    assert_eq!((state.hard_state.term, state.hard_state.vote, state.hard_state.commit), (2, 1, 2));
    assert_eq!(state.conf_state.voters, [1, 2, 3]);
    assert_eq!(bounds(&store), (1, 4));
    let terms: Vec<u64> = (1..=4).map(|i| store.term(i).expect("term")).collect();
    assert_eq!(terms, [1, 1, 3, 3]);
    let got = store.entries(2, 5, None, GetEntriesContext::empty(false)).expect("entries");
    assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), [2, 3, 4]);
    let limited = store.entries(1, 5, Some(1), GetEntriesContext::empty(false)).expect("limited");
    assert_eq!(limited.len(), 1, "max_size still returns at least one entry");
    assert!(store.entries(1, 6, None, GetEntriesContext::empty(false)).is_err(), "past the end");
}

#[test]
fn compaction_keeps_the_snapshot_term_and_refuses_old_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    for reopen in [false, true] {
        let store = if reopen {
            RaftStore::open(dir.path()).expect("reopen")
        } else {
            let store = RaftStore::open(dir.path()).expect("open");
            store.bootstrap(&[1]).expect("bootstrap");
            store.persist(None, &[entry(1, 1), entry(2, 1), entry(3, 2), entry(4, 2)], None).expect("persist");
            store.compact_to_snapshot(3, b"state@3").expect("compact");
            store
        };
        assert_eq!(bounds(&store), (4, 4), "reopened: {reopen}");
        assert_eq!(store.term(3).expect("snapshot term"), 2);
        assert!(matches!(store.term(2), Err(raft::Error::Store(StorageError::Compacted))));
        assert!(matches!(
            store.entries(2, 5, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        let snapshot = store.snapshot(0, 2).expect("snapshot");
        assert_eq!((snapshot.get_metadata().index, snapshot.get_data()), (3, &b"state@3"[..]));
        assert_eq!(snapshot.get_metadata().get_conf_state().voters, [1]);
        assert!(store.initial_state().expect("state").hard_state.commit >= 3, "commit below the snapshot");
        assert!(store.snapshot(4, 2).is_err(), "a snapshot older than requested is not offered");
    }
    let store = RaftStore::open(dir.path()).expect("reopen");
    assert!(store.persist(None, &[entry(2, 1)], None).is_err(), "appending below the snapshot is refused");
    assert!(store.persist(None, &[entry(9, 2)], None).is_err(), "a gap is refused");
}

#[test]
fn an_incoming_snapshot_replaces_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let memory = RaftStore::in_memory().expect("memory store");
    let file = RaftStore::open(dir.path()).expect("open");
    for store in [&memory, &file] {
        store.persist(None, &[entry(1, 1), entry(2, 1)], None).expect("persist");
        store.persist(Some(&snapshot_at(10, 4, b"s")), &[entry(11, 4)], None).expect("apply snapshot");
    }
    drop(file);
    let reopened = RaftStore::open(dir.path()).expect("reopen");
    for store in [&memory, &reopened] {
        assert_eq!(bounds(store), (11, 11));
        assert_eq!(store.initial_state().expect("state").hard_state.commit, 10);
        assert_eq!(store.initial_state().expect("state").conf_state.voters, [1, 2, 3]);
        assert_eq!(store.snapshot_with_data().expect("snapshot").get_data(), b"s");
    }
}

#[test]
fn a_torn_record_at_the_end_is_cut_off_and_the_log_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hs = HardState { term: 1, vote: 1, commit: 1, ..Default::default() };
    let good_len = {
        let store = RaftStore::open(dir.path()).expect("open");
        store.persist(None, &[entry(1, 1), entry(2, 1)], Some(&hs)).expect("persist");
        records_end(&store)
    };
    let path = dir.path().join(WAL_FILE);
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), PREALLOCATE_BYTES, "zeros after the records");
    // A crash in the middle of the next append: a header and part of its body, over the zeros.
    let mut torn = Vec::new();
    push_record(&mut torn, KIND_ENTRY, &encode(&entry(3, 1)));
    torn.truncate(torn.len() - 3);
    damage(&path, good_len, &torn);
    let store = RaftStore::open(dir.path()).expect("reopen over a torn tail");
    assert_eq!(bounds(&store), (1, 2), "the torn entry is not in the log");
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), good_len, "the torn bytes are cut off");
    goes_on_after_the_cut(dir.path(), store, 3, &hs);
}

#[test]
fn a_commit_appends_only_its_own_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RaftStore::open(dir.path()).expect("open");
    store.bootstrap(&[1]).expect("bootstrap");
    store.persist(None, &[entry(1, 1), entry(2, 1)], None).expect("persist");
    store.compact_to_snapshot(2, &vec![7u8; 4 << 20]).expect("compact");
    let before = records_end(&store);
    let commits = 50u64;
    for i in 3..3 + commits {
        let hs = HardState { term: 1, vote: 1, commit: i - 1, ..Default::default() };
        store.persist(None, &[entry(i, 1)], Some(&hs)).expect("persist");
    }
    let per_commit = (records_end(&store) - before) / commits;
    assert!(per_commit < 64, "each one-entry commit wrote {per_commit} bytes to the log");
    assert_eq!(store.snapshot_with_data().expect("snapshot").get_data().len(), 4 << 20);
}

#[test]
fn a_crash_between_a_snapshot_and_its_log_rewrite_recovers() {
    let hs = HardState { term: 2, vote: 3, commit: 2, ..Default::default() };
    // From the leader: the old suffix may conflict with the snapshot, so none of it is kept.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = RaftStore::open(dir.path()).expect("open");
        store.persist(None, &[entry(1, 1), entry(2, 2), entry(3, 2)], Some(&hs)).expect("persist");
    }
    let meta = snapshot_at(10, 5, b"s10").get_metadata().clone();
    write_snapshot(dir.path(), &meta, b"s10", true).expect("the snapshot, then the crash");
    let store = RaftStore::open(dir.path()).expect("reopen");
    assert_eq!(bounds(&store), (11, 10), "an empty log after the snapshot");
    let state = store.initial_state().expect("state").hard_state;
    assert_eq!((state.term, state.vote, state.commit), (5, 3, 10));
    assert_eq!(store.snapshot_with_data().expect("snapshot").get_data(), b"s10");
    // A compaction of this node's own log: the entries after the snapshot are still good.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = RaftStore::open(dir.path()).expect("open");
        let entries: Vec<Entry> = (1..=12).map(|i| entry(i, 2)).collect();
        store.persist(None, &entries, Some(&hs)).expect("persist");
    }
    let meta = snapshot_at(10, 2, b"c10").get_metadata().clone();
    write_snapshot(dir.path(), &meta, b"c10", false).expect("the snapshot, then the crash");
    let store = RaftStore::open(dir.path()).expect("reopen");
    assert_eq!(bounds(&store), (11, 12));
    assert_eq!(store.initial_state().expect("state").hard_state.commit, 10);
}

#[test]
fn a_file_of_another_format_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(WAL_FILE), b"something else entirely").expect("write");
    let error = RaftStore::open(dir.path()).err().expect("refused");
    assert!(matches!(error, StoreError::Format { .. }), "{error}");
    assert!(error.to_string().contains("flotilla-wal-v1"), "{error}");
}

/// Writes a redb log as earlier versions did (`v2`: snapshot in its own table).
fn write_redb_log(path: &Path, v2: bool) {
    use redb::{Database, TableDefinition};
    let meta_table: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
    let entries_table: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_entries");
    let snapshot_table: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_snapshot");
    let db = Database::create(path).expect("create");
    let txn = db.begin_write().expect("txn");
    {
        let mut meta = txn.open_table(meta_table).expect("meta");
        meta.insert("format", if v2 { &b"flotilla-raft-v2"[..] } else { &b"flotilla-raft-v1"[..] }).expect("format");
        if v2 {
            txn.open_table(snapshot_table).expect("snapshot").insert("data", &b"state@5"[..]).expect("data");
        } else {
            meta.insert("snapshot_data", &b"state@5"[..]).expect("data");
        }
        let m = SnapshotMetadata {
            index: 5,
            term: 2,
            conf_state: Some(ConfState { voters: vec![1, 2, 3], ..Default::default() }).into(),
            ..Default::default()
        };
        meta.insert("snapshot_meta", encode(&m).as_slice()).expect("meta");
        meta.insert("conf_state", encode(&m.get_conf_state().clone()).as_slice()).expect("conf");
        let hs = HardState { term: 3, vote: 2, commit: 6, ..Default::default() };
        meta.insert("hard_state", encode(&hs).as_slice()).expect("hs");
        let mut entries = txn.open_table(entries_table).expect("entries");
        for i in 6..=7 {
            entries.insert(i, encode(&entry(i, 3)).as_slice()).expect("entry");
        }
    }
    txn.commit().expect("commit");
}

#[test]
fn the_redb_log_of_earlier_versions_is_converted_once() {
    for v2 in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        write_redb_log(&dir.path().join(LEGACY_REDB_FILE), v2);
        for _ in 0..2 {
            let store = RaftStore::open(dir.path()).expect("open the redb log, then the converted one");
            let snapshot = store.snapshot_with_data().expect("snapshot");
            assert_eq!((snapshot.get_metadata().index, snapshot.get_data()), (5, &b"state@5"[..]), "v2: {v2}");
            assert_eq!(bounds(&store), (6, 7));
            let state = store.initial_state().expect("state");
            assert_eq!((state.hard_state.term, state.hard_state.vote, state.hard_state.commit), (3, 2, 6));
            assert_eq!(state.conf_state.voters, [1, 2, 3]);
            assert_eq!(store.entries(6, 8, None, GetEntriesContext::empty(false)).expect("entries")[1], entry(7, 3));
        }
        assert!(!dir.path().join(LEGACY_REDB_FILE).exists());
        assert!(dir.path().join(format!("{LEGACY_REDB_FILE}.migrated")).exists(), "the old log is kept");
    }
}

#[test]
fn the_preallocated_zeros_end_the_log_and_appends_fill_them_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(WAL_FILE);
    let hs = HardState { term: 1, vote: 1, commit: 0, ..Default::default() };
    // Entries of ~200 KiB: the sixth append passes the first megabyte.
    let big = |index: u64| Entry { index, term: 1, data: vec![index as u8; 200 << 10].into(), ..Default::default() };
    {
        let store = RaftStore::open(dir.path()).expect("open");
        store.persist(None, &[big(1)], Some(&hs)).expect("persist");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), PREALLOCATE_BYTES);
        for i in 2..=6 {
            store.persist(None, &[big(i)], None).expect("persist");
        }
        assert!(records_end(&store) > PREALLOCATE_BYTES, "the records passed the first megabyte");
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 2 * PREALLOCATE_BYTES, "grown by one more");
    }
    // Reopened: the zeros are the end of the log, kept as they are (not a torn tail).
    let end = {
        let store = RaftStore::open(dir.path()).expect("reopen");
        assert_eq!(bounds(&store), (1, 6));
        assert_eq!(store.entries(6, 7, None, GetEntriesContext::empty(false)).expect("read")[0], big(6));
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 2 * PREALLOCATE_BYTES, "the zeros are kept");
        store.persist(None, &[entry(7, 1)], None).expect("append into the zeros");
        records_end(&store)
    };
    // A stray byte beyond the zeros (a torn append whose later sector reached the disk first)
    // is not part of the log: cut off with the zeros before it, and the log goes on.
    damage(&path, end + 4096, &[0xAB]);
    let store = RaftStore::open(dir.path()).expect("reopen over the stray byte");
    assert_eq!(bounds(&store), (1, 7));
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), end, "cut at the records' end");
    goes_on_after_the_cut(dir.path(), store, 8, &hs);
}
