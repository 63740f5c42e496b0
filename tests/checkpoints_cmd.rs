//! `redtail checkpoints`: from the snapshot while `run` holds the store, from the store
//! when it is stopped; `--json` rows with the documented keys and values.

mod common;

use std::os::unix::fs::MetadataExt;

use common::*;

const KEYS: &[&str] = &[
    "source",
    "path",
    "dev",
    "inode",
    "fingerprint",
    "btime",
    "file_id",
    "generation",
    "offset",
    "size",
    "lag",
    "present",
    "updated_ms",
];

fn check_row(c: &serde_json::Value, path: &std::path::Path, offset: u64) {
    for k in KEYS {
        assert!(c.get(*k).is_some(), "key {k} missing: {c:#}");
    }
    let m = std::fs::metadata(path).unwrap();
    assert_eq!(c["source"], "app");
    assert_eq!(c["path"], path.to_str().unwrap());
    assert_eq!(c["dev"], m.dev());
    assert_eq!(c["inode"], m.ino());
    assert_eq!(c["offset"], offset, "{c:#}");
    assert_eq!(c["size"], m.len(), "{c:#}");
    assert_eq!(c["lag"], m.len() - offset, "{c:#}");
    assert_eq!(c["present"], true);
    assert_eq!(c["generation"], 0);
    assert!(
        c["updated_ms"].as_u64().unwrap() > 1_600_000_000_000,
        "{c:#}"
    );
    assert!(
        c["fingerprint"].as_str().is_some_and(|f| !f.is_empty()),
        "{c:#}"
    );
    assert!(
        c["file_id"].as_str().is_some_and(|f| !f.is_empty()),
        "{c:#}"
    );
}

#[test]
fn while_running_from_snapshot_and_when_stopped_from_store() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    logs.append("app.log", &["l1", "l2", "l3"]);
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let stream = src.stream();
    let mut agent = Agent::new(&redis.url()).source(src);
    let p = logs.path("app.log");
    agent.run();
    wait_until("3 entries", || redis.xlen(&stream) == 3);
    agent.wait_checkpoint(&p, 9);
    // While running: the snapshot.
    let rows = agent.checkpoints_json();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    check_row(&rows[0], &p, 9);
    let table = agent.cmd(&["checkpoints", "-c", agent.cfg()]);
    assert!(table.status.success(), "{}", show(&table));
    let t = String::from_utf8_lossy(&table.stdout);
    assert!(
        t.starts_with("# 1 checkpoint(s), from the snapshot written"),
        "{t}"
    );

    // Lag: appended but the agent is the one to catch up.
    logs.append("app.log", &["l4"]);
    agent.wait_checkpoint(&p, 12);
    assert!(agent.stop().success());

    // Stopped: the store.
    let rows = agent.checkpoints_json();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    check_row(&rows[0], &p, 12);
    let table = agent.cmd(&["checkpoints", "-c", agent.cfg()]);
    let t = String::from_utf8_lossy(&table.stdout);
    assert!(t.starts_with("# 1 checkpoint(s), from the store"), "{t}");
    assert!(t.contains(p.to_str().unwrap()), "{t}");

    // Written while stopped: lag shows it.
    logs.append("app.log", &["l5"]);
    let rows = agent.checkpoints_json();
    assert_eq!(rows[0]["size"], 15);
    assert_eq!(rows[0]["lag"], 3);

    // A deleted file: present false, no size.
    logs.remove("app.log");
    let rows = agent.checkpoints_json();
    assert_eq!(rows[0]["present"], false, "{:#}", rows[0]);
    assert!(rows[0]["size"].is_null(), "{:#}", rows[0]);
    let table = agent.cmd(&["checkpoints", "-c", agent.cfg()]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("(gone)"));
}

#[test]
fn one_row_per_file_and_source() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    logs.append("a.log", &["a"]);
    logs.append("b.log", &["bb", "bb"]);
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let agent = Agent::new(&redis.url()).source(src);
    assert!(agent.backfill(&[]).status.success());
    let mut rows: Vec<(String, u64)> = agent
        .checkpoints_json()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_string(),
                c["offset"].as_u64().unwrap(),
            )
        })
        .collect();
    rows.sort();
    assert_eq!(
        rows,
        [
            (logs.path("a.log").to_str().unwrap().to_string(), 2),
            (logs.path("b.log").to_str().unwrap().to_string(), 6)
        ]
    );
}

#[test]
fn a_running_agent_has_a_snapshot_from_the_start() {
    // The store exports its snapshot when it is opened: a running agent that has published
    // nothing yet (or whose last export was cut off by a crash) is not shown stale or as an
    // error.
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let mut agent = Agent::new(&redis.url()).source(src);
    agent.run();
    wait_until("the agent to start", || agent.stderr().contains("starting"));
    wait_until("checkpoints answers while the agent runs", || {
        agent
            .try_checkpoints_json()
            .is_some_and(|all| all.is_empty())
    });
    assert!(agent.stop().success());
}

/// Every path under `dir` (recursively) with its size and mtime.
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
fn checkpoints_writes_nothing_with_or_without_a_running_agent() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    logs.append("app.log", &["l1", "l2", "l3"]);
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let stream = src.stream();
    let mut agent = Agent::new(&redis.url()).source(src);
    let p = logs.path("app.log");
    assert!(agent.backfill(&[]).status.success());
    let state = agent.state_dir();
    // The backfill has exited: nothing writes to the state dir any more.
    let before = listing(&state);
    assert!(
        before
            .iter()
            .any(|(f, ..)| f.ends_with("checkpoints.sled/db")),
        "{before:#?}"
    );
    // Stopped: read from the store, three times, as table and JSON.
    for _ in 0..3 {
        let rows = agent.checkpoints_json();
        assert_eq!(rows.len(), 1, "{rows:#?}");
        check_row(&rows[0], &p, 9);
        let table = agent.cmd(&["checkpoints", "-c", agent.cfg()]);
        assert!(table.status.success(), "{}", show(&table));
        assert!(String::from_utf8_lossy(&table.stdout).contains("from the store"));
    }
    assert_eq!(
        listing(&state),
        before,
        "`checkpoints` changed the state dir of a stopped agent"
    );
    // The store is intact: a backfill after it sees the checkpoint (publishes nothing twice).
    assert!(agent.backfill(&[]).status.success());
    assert_eq!(redis.xlen(&stream), 3);

    // Running: the snapshot; the idle agent writes nothing either, so the listing holds.
    agent.run();
    logs.append("app.log", &["l4"]);
    agent.wait_checkpoint(&p, 12);
    std::thread::sleep(std::time::Duration::from_millis(600));
    let before = listing(&state);
    for _ in 0..3 {
        let rows = agent.checkpoints_json();
        check_row(&rows[0], &p, 12);
    }
    assert_eq!(
        listing(&state),
        before,
        "`checkpoints` changed the state dir of a running agent"
    );
    assert!(agent.stop().success());
}

#[test]
fn checkpoints_with_a_missing_state_dir_says_so_and_creates_nothing() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let agent = Agent::new(&redis.url()).source(src);
    let state = agent.state_dir();
    assert!(!state.exists());
    for args in [&["--json"][..], &[]] {
        let mut a = vec!["checkpoints", "-c", agent.cfg()];
        a.extend_from_slice(args);
        let out = agent.cmd(&a);
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("does not exist") && err.contains(state.to_str().unwrap()),
            "{}",
            show(&out)
        );
        assert!(out.stdout.is_empty(), "{}", show(&out));
        assert!(!state.exists(), "`checkpoints` created the state dir");
    }
}

fn marks(redis: &RedisServer, stream: &str) -> std::collections::HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(format!("{{{stream}}}:redtail:marks:testhost"))
        .query(&mut redis.conn())
        .unwrap()
}

#[test]
fn pruned_checkpoints_take_their_redis_marks_along_retried_while_redis_is_down() {
    let mut redis = RedisServer::start_with_aof();
    let logs = LogDir::new();
    logs.append("gone.log", &["g1", "g2"]);
    logs.append("kept.log", &["k1"]);
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let stream = src.stream();
    let mut agent = Agent::new(&redis.url()).source(src);
    assert!(agent.backfill(&[]).status.success());
    let rows = agent.checkpoints_json();
    let field_of = |name: &str| {
        let p = logs.path(name);
        rows.iter()
            .find(|c| c["path"] == p.to_str().unwrap())
            .unwrap_or_else(|| panic!("no checkpoint for {name}: {rows:#?}"))["file_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (gone, kept) = (field_of("gone.log"), field_of("kept.log"));
    let m = marks(&redis, &stream);
    assert!(m.contains_key(&gone) && m.contains_key(&kept), "{m:?}");

    logs.remove("gone.log");
    agent = agent.agent_kv("checkpoint_retention", "\"1ms\"");
    // Redis down at the prune: neither the mark nor the checkpoint goes (not lost, not
    // blocking: the agent stops normally).
    redis.kill();
    agent.run();
    wait_until("the prune to give up on Redis", || {
        agent
            .stderr()
            .contains("cannot remove the Redis-side marks")
    });
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
    assert_eq!(
        agent.checkpoints_json().len(),
        2,
        "pruned although its mark stayed"
    );

    // Redis back: the next prune (at start) removes the mark, then the checkpoint.
    redis.restart();
    let m = marks(&redis, &stream);
    assert!(m.contains_key(&gone), "AOF lost the mark: {m:?}");
    agent.run();
    wait_until("the gone file's mark removed", || {
        !marks(&redis, &stream).contains_key(&gone)
    });
    // Still running and healthy: the kept file goes on.
    logs.append("kept.log", &["k2"]);
    wait_until("k2 published", || redis.xlen(&stream) == 4);
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
    let m = marks(&redis, &stream);
    assert_eq!(m.keys().collect::<Vec<_>>(), [&kept], "{m:?}");
    let rows = agent.checkpoints_json();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["file_id"], kept.as_str());
    assert_eq!(rows[0]["offset"], 6);
}
