//! Behaviour across processes: the sled lock, corruption + recovery, and
//! SIGKILL in the middle of commit/flush.
//!
//! Child processes are this test binary re-executed with
//! `REDTAIL_STATE_CHILD` set, running only the `child_main` test.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use common::{cp, key, TempDir};
use redtail_state::{read_snapshot, recover, CheckpointStore, StateError};

const CHILD_ENV: &str = "REDTAIL_STATE_CHILD";
const DIR_ENV: &str = "REDTAIL_STATE_CHILD_DIR";

/// Entry point of child processes; a no-op in the normal test run.
#[test]
fn child_main() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = std::path::PathBuf::from(std::env::var(DIR_ENV).unwrap());
    let store = CheckpointStore::open(&dir).unwrap();
    match mode.as_str() {
        "hold" => {
            println!("READY");
            // Hold the store until the parent kills us (or closes stdin).
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
        }
        "crash" => {
            let start = store.get("s", key(1)).unwrap().map_or(0, |c| c.offset);
            let mut offset = start;
            for i in 0u64.. {
                offset += 1 + i % 7;
                // Two files per batch, so torn batches would also show.
                store
                    .commit(&[cp("s", 1, offset, "/a", i), cp("s", 2, offset, "/b", i)])
                    .unwrap();
                store.flush().unwrap();
                if i % 8 == 0 {
                    store.export_snapshot().unwrap();
                }
                println!("FLUSHED {offset}");
            }
        }
        other => panic!("unknown child mode {other}"),
    }
}

fn spawn_child(mode: &str, dir: &Path) -> (Child, BufReader<ChildStdout>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_main", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, mode)
        .env(DIR_ENV, dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

/// Reads lines until one starts with `prefix`; panics on EOF.
fn read_until(out: &mut BufReader<ChildStdout>, prefix: &str) -> String {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "child exited before printing {prefix:?}"
        );
        // libtest prints "test child_main ... " without a newline first.
        if let Some(at) = line.find(prefix) {
            return line[at + prefix.len()..].trim_end().to_string();
        }
    }
}

#[test]
fn second_process_gets_locked_and_recover_refuses() {
    let dir = TempDir::new("locked");
    {
        let store = CheckpointStore::open(dir.path()).unwrap();
        store.commit(&[cp("s", 1, 5, "/a", 1)]).unwrap();
        store.flush().unwrap();
        store.export_snapshot().unwrap();
    }
    let (mut child, mut out) = spawn_child("hold", dir.path());
    read_until(&mut out, "READY");

    let err = CheckpointStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, StateError::Locked { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("locked by another process"), "{msg}");
    assert!(msg.contains("checkpoints.json"), "{msg}");
    // The inspection path: the snapshot is readable while the lock is held.
    assert_eq!(
        read_snapshot(dir.path())
            .unwrap()
            .unwrap()
            .checkpoints
            .len(),
        1
    );
    // Recovery must not move a live store aside.
    let err = recover(dir.path(), true).unwrap_err();
    assert!(matches!(err, StateError::Locked { .. }), "{err:?}");
    assert!(dir.path().join("checkpoints.sled").join("db").exists());

    child.kill().unwrap();
    child.wait().unwrap();
    let store = CheckpointStore::open(dir.path()).unwrap();
    assert_eq!(store.get("s", key(1)).unwrap().unwrap().offset, 5);
}

fn corrupt_then_recover(file: &str) {
    let dir = TempDir::new("corrupt");
    let cps = vec![cp("a", 1, 10, "/a", 1), cp("b", 2, 20, "/b", 2)];
    {
        let store = CheckpointStore::open(dir.path()).unwrap();
        store.commit(&cps).unwrap();
        store.flush().unwrap();
        store.export_snapshot().unwrap();
    }
    let target = dir.path().join("checkpoints.sled").join(file);
    let len = std::fs::metadata(&target).unwrap().len().max(64) as usize;
    let garbage: Vec<u8> = (0..len).map(|i| (i * 131 + 7) as u8).collect();
    std::fs::write(&target, &garbage).unwrap();

    let err = CheckpointStore::open(dir.path()).unwrap_err();
    eprintln!("garbage {file}: {err}");
    assert!(
        matches!(err, StateError::Corrupt { .. } | StateError::Io { .. }),
        "{err:?}"
    );
    if let StateError::Corrupt { .. } = err {
        assert!(err.to_string().contains("redtail state recover"), "{err}");
    }
    // Opening again still refuses: nothing was silently reset.
    assert!(CheckpointStore::open(dir.path()).is_err());

    // The refused opens above release sled's lock from a background thread: poll for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (store, aside, seeded) = loop {
        match recover(dir.path(), true) {
            Err(StateError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            r => break r.unwrap(),
        }
    };
    assert_eq!(seeded, 2);
    assert_eq!(store.all().unwrap(), cps);
    let name = aside.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("checkpoints.sled.corrupt-"), "{name}");
    // Moved, not deleted. (Not byte-identical: sled's own open-time log
    // recovery may already have truncated what it could not parse.)
    assert!(aside.join(file).is_file());
    drop(store);
    // The recovered store is durable and opens normally.
    let store = CheckpointStore::open(dir.path()).unwrap();
    assert_eq!(store.all().unwrap(), cps);
}

#[test]
fn garbage_db_file_is_corrupt_and_recover_seeds_from_snapshot() {
    corrupt_then_recover("db");
}

#[test]
fn garbage_conf_file_is_corrupt_and_recover_seeds_from_snapshot() {
    corrupt_then_recover("conf");
}

#[test]
fn recover_without_snapshot_seed_starts_empty() {
    let dir = TempDir::new("recover-empty");
    {
        let store = CheckpointStore::open(dir.path()).unwrap();
        store.commit(&[cp("a", 1, 10, "/a", 1)]).unwrap();
        store.flush().unwrap();
        store.export_snapshot().unwrap();
    }
    let (store, aside, seeded) = recover(dir.path(), false).unwrap();
    assert_eq!(seeded, 0);
    assert!(store.all().unwrap().is_empty());
    assert!(aside.join("db").exists());
}

/// SIGKILL a child that commits and flushes in a loop, five times, at random
/// points; after each kill the reopened store must hold at least the last
/// offset the child reported as flushed, and never less than before.
#[test]
fn sigkill_never_loses_flushed_offsets() {
    let dir = TempDir::new("crash");
    let mut rng = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut last_seen = 0;
    for round in 0..5 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let lines = 1 + rng % 150;
        let (mut child, mut out) = spawn_child("crash", dir.path());
        let mut flushed = 0u64;
        for _ in 0..lines {
            flushed = read_until(&mut out, "FLUSHED ").parse().unwrap();
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Lines already in the pipe were printed after their flush returned.
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        for l in rest.lines() {
            if let Some(at) = l.find("FLUSHED ") {
                // The last line may be torn by the kill; skip it if so.
                if let Ok(v) = l[at + 8..].trim_end().parse::<u64>() {
                    flushed = flushed.max(v);
                }
            }
        }
        let store = CheckpointStore::open(dir.path())
            .unwrap_or_else(|e| panic!("round {round}: reopen after SIGKILL failed: {e}"));
        let a = store.get("s", key(1)).unwrap().unwrap().offset;
        let b = store.get("s", key(2)).unwrap().unwrap().offset;
        assert_eq!(a, b, "round {round}: torn batch");
        assert!(
            a >= flushed,
            "round {round}: stored {a} < flushed {flushed}"
        );
        assert!(
            a >= last_seen,
            "round {round}: went backwards {a} < {last_seen}"
        );
        eprintln!("round {round}: killed after {lines} lines, flushed {flushed}, stored {a}");
        last_seen = a;
        if let Some(snap) = read_snapshot(dir.path()).unwrap() {
            assert!(snap.checkpoints.iter().all(|c| c.offset <= a));
        }
    }
}
