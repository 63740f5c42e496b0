//! `redtail backfill`: one pass over every matching file, exactly once across runs.

mod common;

use common::*;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn publishes_all_lines_in_order_with_offsets() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    logs.append("app.log", &["alpha", "b", "gamma gamma", ""]);
    logs.append_bytes("app.log", b"crlf\r\nlast\n");
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let stream = src.stream();
    let agent = Agent::new(&redis.url()).source(src);
    let out = agent.backfill(&[]);
    assert!(out.status.success(), "{}", show(&out));
    let entries = redis.xrange(&stream);
    let got: Vec<(&str, u64)> = entries.iter().map(|e| (e.message(), e.offset())).collect();
    assert_eq!(
        got,
        [
            ("alpha", 0),
            ("b", 6),
            ("gamma gamma", 8),
            ("", 20),
            ("crlf", 21),
            ("last", 27)
        ]
    );
    let p = logs.path("app.log");
    for e in &entries {
        assert_eq!(e.path(), p.to_str().unwrap());
        assert_eq!(e.get("host.name"), Some("testhost"));
    }
    let s = stdout(&out);
    assert!(s.starts_with("backfill: 1 files, 6 lines, 32 bytes"), "{s}");
    assert!(
        s.contains(
            "published 6 entries (0 already in Redis), dead-lettered 0, dropped by filter 0"
        ),
        "{s}"
    );
    // The checkpoint is at the end of the file.
    assert_eq!(agent.checkpoint_of(&p)["offset"], 32);
}

#[test]
fn second_backfill_publishes_nothing() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let lines = numbered("line", 0..100);
    logs.append("a.log", &strs(&lines));
    logs.append("b.log", &["b-only"]);
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let stream = src.stream();
    let agent = Agent::new(&redis.url()).source(src);
    let first = agent.backfill(&[]);
    assert!(first.status.success(), "{}", show(&first));
    assert!(
        stdout(&first).contains("published 101 entries"),
        "{}",
        show(&first)
    );
    let second = agent.backfill(&[]);
    assert!(second.status.success(), "{}", show(&second));
    assert!(
        stdout(&second).contains("published 0 entries"),
        "{}",
        show(&second)
    );
    assert_eq!(redis.messages_from(&stream, &logs.path("a.log")), lines);
    assert_eq!(
        redis.messages_from(&stream, &logs.path("b.log")),
        ["b-only"]
    );
    assert_eq!(redis.xlen(&stream), 101);
    // New lines since: only those.
    logs.append("a.log", &["line-100"]);
    let third = agent.backfill(&[]);
    assert!(
        stdout(&third).contains("published 1 entries"),
        "{}",
        show(&third)
    );
    assert_eq!(redis.xlen(&stream), 102);
    assert_eq!(redis.xrange_messages(&stream).last().unwrap(), "line-100");
}

#[test]
fn second_backfill_without_state_is_deduplicated_by_redis_marks() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    logs.append("app.log", &["m1", "m2", "m3"]);
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let stream = src.stream();
    let agent = Agent::new(&redis.url()).source(src);
    assert!(agent.backfill(&[]).status.success());
    // Lose the local state entirely: the Redis-side marks must still prevent duplicates.
    std::fs::remove_dir_all(agent.state_dir()).unwrap();
    let again = agent.backfill(&[]);
    assert!(again.status.success(), "{}", show(&again));
    // Whether it skips by the marks or starts at them, nothing is published again.
    assert!(
        stdout(&again).contains("published 0 entries"),
        "{}",
        show(&again)
    );
    assert_eq!(redis.xrange_messages(&stream), ["m1", "m2", "m3"]);
}

#[test]
fn trailing_partial_line_is_held_back() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    logs.append("app.log", &["done-1", "done-2"]);
    logs.append_partial("app.log", "half");
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let stream = src.stream();
    let agent = Agent::new(&redis.url()).source(src);
    let out = agent.backfill(&[]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        stdout(&out).contains("published 2 entries"),
        "{}",
        show(&out)
    );
    assert!(
        stdout(&out).contains("held back 4 bytes in 1 file(s)"),
        "{}",
        show(&out)
    );
    assert_eq!(redis.xrange_messages(&stream), ["done-1", "done-2"]);
    assert_eq!(agent.checkpoint_of(&logs.path("app.log"))["offset"], 14);
    logs.append("app.log", &[" and whole"]);
    let out = agent.backfill(&[]);
    assert!(
        stdout(&out).contains("published 1 entries"),
        "{}",
        show(&out)
    );
    assert_eq!(
        redis.xrange_messages(&stream),
        ["done-1", "done-2", "half and whole"]
    );
}

#[test]
fn source_option_limits_to_one_source() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    logs.mkdir("a");
    logs.mkdir("b");
    logs.append("a/x.log", &["from-a"]);
    logs.append("b/x.log", &["from-b-1", "from-b-2"]);
    let a = SourceCfg::new("a", &[&logs.path("a/*.log")]).parser("raw");
    let b = SourceCfg::new("b", &[&logs.path("b/*.log")]).parser("raw");
    let agent = Agent::new(&redis.url()).source(a).source(b);
    let out = agent.backfill(&["--source", "b"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        stdout(&out).starts_with("backfill: 1 files, 2 lines"),
        "{}",
        show(&out)
    );
    assert_eq!(redis.xlen("logs:a"), 0);
    assert_eq!(redis.xrange_messages("logs:b"), ["from-b-1", "from-b-2"]);
    // The other source afterwards; b is not published again.
    let out = agent.backfill(&[]);
    assert!(
        stdout(&out).contains("published 1 entries"),
        "{}",
        show(&out)
    );
    assert_eq!(redis.xrange_messages("logs:a"), ["from-a"]);
    assert_eq!(redis.xlen("logs:b"), 2);
    // An unknown source is an error.
    let out = agent.backfill(&["--source", "nope"]);
    assert!(!out.status.success(), "{}", show(&out));
}

#[test]
fn summary_counts_filter_and_dead_letters() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    logs.append(
        "app.log",
        &[
            r#"{"msg":"ok 1"}"#,
            r#"{"msg":"debug noise"}"#,
            "not json",
            r#"{"msg":"ok 2"}"#,
        ],
    );
    let src = SourceCfg::new("app", &[&logs.path("*.log")])
        .parser("json")
        .kv("drop", r#""debug noise""#)
        .kv("fields", r#"{ env = "test" }"#);
    let stream = src.stream();
    let agent = Agent::new(&redis.url()).source(src);
    let out = agent.backfill(&[]);
    assert!(out.status.success(), "{}", show(&out));
    let s = stdout(&out);
    assert!(s.starts_with("backfill: 1 files, 4 lines"), "{s}");
    assert!(
        s.contains(
            "published 2 entries (0 already in Redis), dead-lettered 1, dropped by filter 1"
        ),
        "{s}"
    );
    let entries = redis.xrange(&stream);
    let msgs: Vec<&str> = entries.iter().map(|e| e.message()).collect();
    assert_eq!(msgs, [r#"{"msg":"ok 1"}"#, r#"{"msg":"ok 2"}"#]);
    for e in &entries {
        assert_eq!(e.get("env"), Some("test"), "{e:?}");
    }
    assert_eq!(entries[0].get("msg"), Some("ok 1"), "{:?}", entries[0]);
}

#[test]
fn dry_run_parses_and_counts_but_writes_nothing() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    logs.append("app.log", &[r#"{"a":1}"#, "not json", r#"{"b":2}"#]);
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("json");
    let stream = src.stream();
    let agent = Agent::new(&redis.url()).source(src);
    let out = agent.backfill(&["--dry-run"]);
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    assert!(text.contains("dry run: 1 files, 3 lines"), "{text}");
    assert!(
        text.contains("would publish 2 entries, dead-letter 1"),
        "{text}"
    );
    assert_eq!(redis.xlen(&stream), 0);
    assert!(
        !agent.state_dir().exists(),
        "a dry run created {}",
        agent.state_dir().display()
    );
    // The real backfill afterwards starts from scratch.
    let out = agent.backfill(&[]);
    assert!(
        stdout(&out).contains("published 2 entries"),
        "{}",
        show(&out)
    );
}
