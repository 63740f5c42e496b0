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
fn fails_clearly_before_the_first_snapshot() {
    // A running agent that has published nothing yet holds the store without a snapshot.
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let mut agent = Agent::new(&redis.url()).source(src);
    agent.run();
    wait_until("the agent to start", || agent.stderr().contains("starting"));
    let out = agent.cmd(&["checkpoints", "-c", agent.cfg(), "--json"]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has not exported a snapshot yet"),
        "{}",
        show(&out)
    );
    assert!(agent.stop().success());
}
