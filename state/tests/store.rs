//! Single-process behaviour of the checkpoint store and its snapshot.

mod common;

use common::{cp, dir_size, key, TempDir};
use redtail_state::{read_snapshot, CheckpointStore, StateError, SNAPSHOT_VERSION};

#[test]
fn commit_then_reopen_reads_back() {
    let dir = TempDir::new("reopen");
    let a = cp("nginx", 1, 100, "/var/log/a.log", 10);
    let b = cp("nginx", 2, 200, "/var/log/b.log", 10);
    {
        let store = CheckpointStore::open(dir.path()).unwrap();
        assert_eq!(store.get("nginx", key(1)).unwrap(), None);
        store.commit(&[a.clone(), b.clone()]).unwrap();
        store.flush().unwrap();
    }
    let store = CheckpointStore::open(dir.path()).unwrap();
    assert_eq!(store.get("nginx", key(1)).unwrap(), Some(a));
    assert_eq!(store.get("nginx", key(2)).unwrap(), Some(b));
    assert_eq!(store.get("nginx", key(3)).unwrap(), None);
    assert_eq!(store.get("other", key(1)).unwrap(), None);
}

#[test]
fn open_creates_missing_state_dir() {
    let dir = TempDir::new("mkdir");
    let nested = dir.path().join("a/b/state");
    let store = CheckpointStore::open(&nested).unwrap();
    assert!(nested.join("checkpoints.sled").is_dir());
    assert!(store.all().unwrap().is_empty());
}

#[test]
fn commit_overwrites_and_last_entry_in_a_batch_wins() {
    let dir = TempDir::new("overwrite");
    let store = CheckpointStore::open(dir.path()).unwrap();
    store.commit(&[cp("s", 1, 100, "/a", 1)]).unwrap();
    let mut newer = cp("s", 1, 500, "/a.1", 2);
    newer.generation = 3;
    store
        .commit(&[cp("s", 1, 300, "/a", 2), newer.clone()])
        .unwrap();
    assert_eq!(store.get("s", key(1)).unwrap(), Some(newer));
    assert_eq!(store.all().unwrap().len(), 1);
}

#[test]
fn remove_deletes_only_that_key() {
    let dir = TempDir::new("remove");
    let store = CheckpointStore::open(dir.path()).unwrap();
    store
        .commit(&[
            cp("s", 1, 1, "/a", 1),
            cp("s", 2, 2, "/b", 1),
            cp("t", 1, 3, "/a", 1),
        ])
        .unwrap();
    store.remove("s", key(1)).unwrap();
    store.remove("s", key(99)).unwrap(); // absent: not an error
    assert_eq!(store.get("s", key(1)).unwrap(), None);
    assert!(store.get("s", key(2)).unwrap().is_some());
    assert!(store.get("t", key(1)).unwrap().is_some());
    store.flush().unwrap();
    drop(store);
    let store = CheckpointStore::open(dir.path()).unwrap();
    assert_eq!(store.get("s", key(1)).unwrap(), None);
    assert_eq!(store.all().unwrap().len(), 2);
}

#[test]
fn prune_removes_and_returns_only_older_checkpoints() {
    let dir = TempDir::new("prune");
    let store = CheckpointStore::open(dir.path()).unwrap();
    let old1 = cp("s", 1, 1, "/old1", 1_000);
    let old2 = cp("t", 2, 1, "/old2", 1_999);
    let edge = cp("s", 3, 1, "/edge", 2_000);
    let new = cp("t", 4, 1, "/new", 3_000);
    store
        .commit(&[old1.clone(), old2.clone(), edge.clone(), new.clone()])
        .unwrap();
    let pruned = store.prune(2_000).unwrap();
    assert_eq!(pruned, vec![old1, old2]);
    assert_eq!(store.all().unwrap(), vec![edge, new]);
    assert!(store.prune(2_000).unwrap().is_empty());
}

#[test]
fn all_is_sorted_by_source_then_path_across_sources() {
    let dir = TempDir::new("order");
    let store = CheckpointStore::open(dir.path()).unwrap();
    // Keys chosen so that key order, insertion order and (source, path) order differ;
    // "zz" is shorter than "app" so a length-prefixed key sorts it first.
    let batch = vec![
        cp("zz", 1, 1, "/a", 1),
        cp("app", 9, 1, "/var/log/c", 1),
        cp("app", 1, 1, "/var/log/b", 1),
        cp("app", 5, 1, "/var/log/a", 1),
        cp("b", 3, 1, "/x", 1),
    ];
    store.commit(&batch).unwrap();
    let got: Vec<(String, String)> = store
        .all()
        .unwrap()
        .into_iter()
        .map(|c| (c.source, c.path))
        .collect();
    let want = [
        ("app", "/var/log/a"),
        ("app", "/var/log/b"),
        ("app", "/var/log/c"),
        ("b", "/x"),
        ("zz", "/a"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(s, p)| (s.to_string(), p.to_string()))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn sources_are_independent_and_prefix_names_do_not_collide() {
    let dir = TempDir::new("sources");
    let store = CheckpointStore::open(dir.path()).unwrap();
    // "a" + key bytes must not be confused with "ab" + other key bytes.
    store
        .commit(&[
            cp("a", 1, 10, "/a", 1),
            cp("ab", 1, 20, "/ab", 1),
            cp("", 1, 30, "/e", 1),
        ])
        .unwrap();
    assert_eq!(store.get("a", key(1)).unwrap().unwrap().offset, 10);
    assert_eq!(store.get("ab", key(1)).unwrap().unwrap().offset, 20);
    assert_eq!(store.get("", key(1)).unwrap().unwrap().offset, 30);
    store.remove("a", key(1)).unwrap();
    assert_eq!(store.get("ab", key(1)).unwrap().unwrap().offset, 20);
}

#[test]
fn overlong_source_name_is_rejected_not_truncated() {
    let dir = TempDir::new("longname");
    let store = CheckpointStore::open(dir.path()).unwrap();
    let long = "x".repeat(70_000);
    let err = store.commit(&[cp(&long, 1, 1, "/a", 1)]).unwrap_err();
    assert!(
        matches!(err, StateError::SourceName { len: 70_000 }),
        "{err:?}"
    );
    assert!(store.all().unwrap().is_empty());
}

/// Writes a raw value under the documented key layout, bypassing the store.
fn write_raw(state_dir: &std::path::Path, source: &str, dev: u64, ino: u64, value: &[u8]) {
    let db = sled_open(state_dir.join("checkpoints.sled")).unwrap();
    let tree = db.open_tree("checkpoints").unwrap();
    let mut k = (source.len() as u16).to_be_bytes().to_vec();
    k.extend_from_slice(source.as_bytes());
    k.extend_from_slice(&dev.to_be_bytes());
    k.extend_from_slice(&ino.to_be_bytes());
    tree.insert(k, value).unwrap();
    db.flush().unwrap();
}

#[test]
fn documented_value_layout_is_version_byte_then_json() {
    let dir = TempDir::new("layout");
    drop(CheckpointStore::open(dir.path()).unwrap());
    let want = cp("s", 7, 42, "/p", 5);
    let mut v = vec![1u8];
    v.extend(serde_json::to_vec(&want).unwrap());
    write_raw(dir.path(), "s", 2049, 7, &v);
    let store = CheckpointStore::open(dir.path()).unwrap();
    assert_eq!(store.get("s", key(7)).unwrap(), Some(want));
}

#[test]
fn records_written_before_btime_are_read_with_none_and_btime_round_trips() {
    let dir = TempDir::new("btime");
    drop(CheckpointStore::open(dir.path()).unwrap());
    // A version-1 record as redtail wrote it before it stored birth times.
    let old = br#"{"source":"s","key":{"dev":2049,"ino":7},"fingerprint":{"len":64,"hash":9},"generation":2,"offset":42,"path":"/p","updated_ms":5}"#;
    let mut v = vec![1u8];
    v.extend_from_slice(old);
    write_raw(dir.path(), "s", 2049, 7, &v);
    let store = CheckpointStore::open(dir.path()).unwrap();
    let got = store.get("s", key(7)).unwrap().unwrap();
    assert_eq!((got.btime, got.offset, got.generation), (None, 42, 2));
    let mut with = got.clone();
    with.btime = Some(1_700_000_000_123_456_789);
    store.commit(std::slice::from_ref(&with)).unwrap();
    assert_eq!(store.get("s", key(7)).unwrap(), Some(with));
}

#[test]
fn unknown_value_version_is_an_error_not_a_guess() {
    let dir = TempDir::new("version");
    drop(CheckpointStore::open(dir.path()).unwrap());
    let mut v = vec![2u8];
    v.extend(serde_json::to_vec(&cp("s", 7, 42, "/p", 5)).unwrap());
    write_raw(dir.path(), "s", 2049, 7, &v);
    let store = CheckpointStore::open(dir.path()).unwrap();
    let err = store.get("s", key(7)).unwrap_err();
    assert!(matches!(err, StateError::Version { found: 2 }), "{err:?}");
    assert!(err.to_string().contains("version 2"), "{err}");
    assert!(matches!(
        store.all().unwrap_err(),
        StateError::Version { found: 2 }
    ));
    assert!(matches!(
        store.prune(u64::MAX).unwrap_err(),
        StateError::Version { found: 2 }
    ));
}

#[test]
fn unknown_layout_version_is_an_error() {
    let dir = TempDir::new("layoutver");
    drop(CheckpointStore::open(dir.path()).unwrap());
    {
        let db = sled_open(dir.path().join("checkpoints.sled")).unwrap();
        db.open_tree("redtail-meta")
            .unwrap()
            .insert("format", &[9u8])
            .unwrap();
        db.flush().unwrap();
    }
    let err = CheckpointStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, StateError::Version { found: 9 }), "{err:?}");
}

#[test]
fn snapshot_export_matches_all_and_missing_is_none() {
    let dir = TempDir::new("snapshot");
    assert!(read_snapshot(dir.path()).unwrap().is_none());
    let store = CheckpointStore::open(dir.path()).unwrap();
    store
        .commit(&[cp("b", 1, 11, "/b", 7), cp("a", 2, 22, "/a", 8)])
        .unwrap();
    store.export_snapshot().unwrap();
    let snap = read_snapshot(dir.path()).unwrap().unwrap();
    assert_eq!(snap.version, SNAPSHOT_VERSION);
    assert!(snap.written_ms > 1_600_000_000_000);
    assert_eq!(snap.checkpoints, store.all().unwrap());
    assert!(!dir.path().join("checkpoints.json.tmp").exists());

    // A newer export replaces the older one.
    store.remove("b", key(1)).unwrap();
    store.export_snapshot().unwrap();
    let snap = read_snapshot(dir.path()).unwrap().unwrap();
    assert_eq!(snap.checkpoints, store.all().unwrap());
    assert_eq!(snap.checkpoints.len(), 1);
}

#[test]
fn half_written_tmp_file_does_not_break_reading_or_exporting() {
    let dir = TempDir::new("tmpfile");
    let store = CheckpointStore::open(dir.path()).unwrap();
    store.commit(&[cp("a", 1, 1, "/a", 1)]).unwrap();
    store.export_snapshot().unwrap();
    let before = read_snapshot(dir.path()).unwrap().unwrap();
    // An export interrupted before its rename leaves a torn tmp file.
    std::fs::write(
        dir.path().join("checkpoints.json.tmp"),
        b"{\"version\":1,\"writ",
    )
    .unwrap();
    assert_eq!(read_snapshot(dir.path()).unwrap().unwrap(), before);
    store.commit(&[cp("a", 2, 2, "/b", 1)]).unwrap();
    store.export_snapshot().unwrap();
    assert_eq!(
        read_snapshot(dir.path())
            .unwrap()
            .unwrap()
            .checkpoints
            .len(),
        2
    );
}

#[test]
fn torn_or_foreign_snapshot_is_an_error_not_empty() {
    let dir = TempDir::new("badsnap");
    std::fs::write(dir.path().join("checkpoints.json"), b"{\"version\":1,\"wri").unwrap();
    let err = read_snapshot(dir.path()).unwrap_err();
    assert!(matches!(err, StateError::Snapshot { .. }), "{err:?}");
    std::fs::write(
        dir.path().join("checkpoints.json"),
        b"{\"version\":2,\"written_ms\":1,\"checkpoints\":[]}",
    )
    .unwrap();
    let err = read_snapshot(dir.path()).unwrap_err();
    assert!(err.to_string().contains("version 2"), "{err}");
}

#[test]
fn missing_store_next_to_a_nonempty_snapshot_is_not_silently_restarted() {
    let dir = TempDir::new("missing");
    {
        let store = CheckpointStore::open(dir.path()).unwrap();
        store.commit(&[cp("a", 1, 1, "/a", 1)]).unwrap();
        store.flush().unwrap();
        store.export_snapshot().unwrap();
    }
    std::fs::remove_dir_all(dir.path().join("checkpoints.sled")).unwrap();
    let err = CheckpointStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, StateError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("redtail state recover"), "{err}");
    assert!(!dir.path().join("checkpoints.sled").join("conf").exists());
    // Same when the snapshot next to the missing store is unreadable.
    std::fs::write(dir.path().join("checkpoints.json"), b"{\"vers").unwrap();
    let err = CheckpointStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, StateError::Corrupt { .. }), "{err:?}");
    // A first run (no store, no snapshot) creates the store.
    std::fs::remove_file(dir.path().join("checkpoints.json")).unwrap();
    assert!(CheckpointStore::open(dir.path())
        .unwrap()
        .all()
        .unwrap()
        .is_empty());
}

/// sled is log-structured; rewriting the same keys must not grow the store
/// without bound. 100k updates of 100 keys (10k commits of 10, flushed every
/// 100 commits) must stay within a few segments.
#[test]
fn store_size_stays_bounded_under_rewrites() {
    let dir = TempDir::new("bounded");
    let store = CheckpointStore::open(dir.path()).unwrap();
    let mut batch: Vec<_> = (0..10)
        .map(|i| cp("s", i, 0, "/var/log/x.log", 0))
        .collect();
    let mut max_size = 0;
    for round in 0..10_000u64 {
        for (i, c) in batch.iter_mut().enumerate() {
            c.key = key((round % 10) * 10 + i as u64);
            c.offset = round * 1000 + i as u64;
            c.updated_ms = round;
        }
        store.commit(&batch).unwrap();
        if round % 100 == 99 {
            store.flush().unwrap();
            max_size = max_size.max(dir_size(dir.path()));
        }
    }
    assert_eq!(store.all().unwrap().len(), 100);
    let final_size = dir_size(dir.path());
    eprintln!("store size: max {max_size} B, final {final_size} B");
    // Without segment reuse the ~25 MB of rewritten values would exceed this.
    assert!(max_size < 8 << 20, "store grew to {max_size} bytes");
}

/// `sled::open`, waiting out the lock of a store dropped a moment ago: sled releases its
/// file lock from a background thread, after the last handle is gone.
fn sled_open(path: std::path::PathBuf) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(&path) {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// Every path under `dir` with its size and mtime (directories too).
fn listing(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                todo.push(e.path());
            }
            out.push((e.path(), m.len(), m.modified().unwrap()));
        }
    }
    out.sort();
    out
}

#[test]
fn read_only_reads_the_store_and_writes_nothing() {
    let dir = TempDir::new("ro");
    let a = cp("nginx", 1, 100, "/var/log/a.log", 10);
    let b = cp("nginx", 2, 200, "/var/log/b.log", 10);
    {
        let store = CheckpointStore::open(dir.path()).unwrap();
        store.commit(&[b.clone(), a.clone()]).unwrap();
        store.flush().unwrap();
        store.export_snapshot().unwrap();
    }
    // Let sled finish closing (it writes its own snapshot on drop, from a background thread).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = listing(dir.path());
    std::thread::sleep(std::time::Duration::from_millis(20));
    for _ in 0..3 {
        assert_eq!(
            redtail_state::read_only(dir.path()).unwrap(),
            vec![a.clone(), b.clone()]
        );
    }
    assert_eq!(
        listing(dir.path()),
        before,
        "read_only changed the state dir"
    );
    // The store still opens read-write and holds the same.
    let store = CheckpointStore::open(dir.path()).unwrap();
    assert_eq!(store.all().unwrap(), vec![a, b]);
    // While a store holds the lock: Locked (the caller reads the snapshot), nothing written.
    let before = listing(dir.path());
    let err = redtail_state::read_only(dir.path()).unwrap_err();
    assert!(matches!(err, StateError::Locked { .. }), "{err:?}");
    assert_eq!(listing(dir.path()), before);
}

#[test]
fn read_only_never_creates_a_missing_state_dir_or_store() {
    let dir = TempDir::new("ro-missing");
    let missing = dir.path().join("state");
    let err = redtail_state::read_only(&missing).unwrap_err();
    assert!(matches!(err, StateError::NoStateDir { .. }), "{err:?}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(!missing.exists(), "the state dir was created");
    // An empty state dir: no checkpoints, and still no store.
    std::fs::create_dir(&missing).unwrap();
    assert!(redtail_state::read_only(&missing).unwrap().is_empty());
    assert_eq!(std::fs::read_dir(&missing).unwrap().count(), 0);
    // A missing store next to a snapshot with checkpoints: corrupt, as for `open`.
    {
        let store = CheckpointStore::open(&missing).unwrap();
        store.commit(&[cp("a", 1, 1, "/a", 1)]).unwrap();
        store.flush().unwrap();
        store.export_snapshot().unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    std::fs::remove_dir_all(missing.join("checkpoints.sled")).unwrap();
    let err = redtail_state::read_only(&missing).unwrap_err();
    assert!(matches!(err, StateError::Corrupt { .. }), "{err:?}");
    assert!(!missing.join("checkpoints.sled").exists());
}
