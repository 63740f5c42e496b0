//! Dead letters: parse failures, invalid UTF-8, NUL bytes and oversize lines go to the
//! dead-letter file (never to the stream); `dlq stats` counts them; `dlq replay` publishes
//! those that parse under the current config exactly once.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine;
use common::*;

fn fixture(rel: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn dead_letters(agent: &Agent) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(agent.dead_letter_path()).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad DLQ line {l:?}: {e}")))
        .collect()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

const LONG: usize = 200;

/// good-1, 3 JSON syntax errors, 2 non-UTF-8 lines, a NUL line, an oversize line, good-2.
fn write_mixed(logs: &LogDir) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"{\"msg\":\"good 1\"}\n");
    b.extend(fixture("invalid/json-syntax.log"));
    b.extend(fixture("invalid/non-utf8.log"));
    b.extend(fixture("invalid/nul.log"));
    b.extend(std::iter::repeat_n(b'x', LONG));
    b.push(b'\n');
    b.extend_from_slice(b"{\"msg\":\"good 2\"}\n");
    logs.append_bytes("app.log", &b);
    b
}

/// Each line of `b` with its start offset.
fn lines_of(b: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut off = 0u64;
    for l in b.split_inclusive(|&c| c == b'\n') {
        out.push((off, l[..l.len() - 1].to_vec()));
        off += l.len() as u64;
    }
    out
}

fn mixed_agent(redis: &RedisServer, logs: &LogDir) -> (Agent, SourceCfg) {
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("json");
    let agent = Agent::new(&redis.url())
        .agent_kv("max_line_bytes", "100")
        .source(src.clone());
    (agent, src)
}

#[test]
fn bad_lines_go_to_the_dead_letter_file_with_their_class() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let bytes = write_mixed(&logs);
    let lines = lines_of(&bytes);
    assert_eq!(lines.len(), 9);
    let (agent, src) = mixed_agent(&redis, &logs);
    let out = agent.backfill(&[]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        stdout(&out).contains(
            "published 2 entries (0 already in Redis), dead-lettered 7, dropped by filter 0"
        ),
        "{}",
        show(&out)
    );
    assert_eq!(
        redis.xrange_messages(&src.stream()),
        [r#"{"msg":"good 1"}"#, r#"{"msg":"good 2"}"#]
    );

    let dl = dead_letters(&agent);
    let got: Vec<(u64, &str)> = dl
        .iter()
        .map(|d| {
            (
                d["offset"].as_u64().unwrap(),
                d["error_class"].as_str().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(u64, &str)> = [
        (1, "parse"),
        (2, "parse"),
        (3, "parse"),
        (4, "encoding"),
        (5, "encoding"),
        (6, "parse"),
        (7, "oversize"),
    ]
    .iter()
    .map(|&(i, c)| (lines[i].0, c))
    .collect();
    assert_eq!(got, expected, "{dl:#?}");
    let p = logs.path("app.log");
    for (d, i) in dl.iter().zip(1..=7) {
        let raw = &lines[i].1;
        for k in [
            "schema",
            "ts",
            "host",
            "source",
            "path",
            "file_id",
            "generation",
            "offset",
            "length",
            "parser",
            "error_class",
            "error",
            "attempts",
            "agent_version",
        ] {
            assert!(d.get(k).is_some(), "key {k} missing in {d}");
        }
        assert_eq!(d["source"], "app");
        assert_eq!(d["host"], "testhost");
        assert_eq!(d["path"], p.to_str().unwrap());
        assert_eq!(d["parser"], "json");
        assert_eq!(d["length"], raw.len() as u64, "{d}");
        assert!(
            d.get("truncated").is_none(),
            "truncated only when true: {d}"
        );
        match std::str::from_utf8(raw) {
            Ok(text) => {
                assert_eq!(d["line"], text, "{d}");
                assert!(d.get("line_b64").is_none(), "{d}");
            }
            Err(_) => {
                let b64 = d["line_b64"]
                    .as_str()
                    .unwrap_or_else(|| panic!("no line_b64: {d}"));
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap();
                assert_eq!(&decoded, raw);
                assert!(d.get("line").is_none(), "{d}");
            }
        }
    }

    // dlq stats: counts per class.
    let st = agent.cmd(&["dlq", "-c", agent.cfg(), "stats"]);
    assert!(st.status.success(), "{}", show(&st));
    let s = stdout(&st);
    assert!(s.starts_with("7 record(s) in "), "{s}");
    let mut by_class: BTreeMap<String, u64> = BTreeMap::new();
    for row in s.lines().skip(2) {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[1], "app", "{row}");
        *by_class.entry(cols[2].to_string()).or_default() += cols[0].parse::<u64>().unwrap();
    }
    assert_eq!(
        by_class,
        BTreeMap::from([
            ("encoding".to_string(), 2),
            ("oversize".to_string(), 1),
            ("parse".to_string(), 4)
        ]),
        "{s}"
    );

    // dlq show --class filters.
    let show_enc = agent.cmd(&[
        "dlq",
        "-c",
        agent.cfg(),
        "show",
        "--json",
        "--class",
        "encoding",
    ]);
    assert!(show_enc.status.success(), "{}", show(&show_enc));
    assert_eq!(stdout(&show_enc).lines().count(), 2, "{}", show(&show_enc));
}

#[test]
fn following_agent_dead_letters_too() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let (mut agent, src) = mixed_agent(&redis, &logs);
    agent.run();
    wait_until("the agent to start", || agent.stderr().contains("starting"));
    write_mixed(&logs);
    wait_until("2 entries", || redis.xlen(&src.stream()) >= 2);
    wait_until("7 dead letters", || dead_letters(&agent).len() >= 7);
    assert!(agent.stop().success());
    assert_eq!(redis.xlen(&src.stream()), 2);
    let classes: Vec<String> = dead_letters(&agent)
        .iter()
        .map(|d| d["error_class"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        classes,
        ["parse", "parse", "parse", "encoding", "encoding", "parse", "oversize"]
    );
}

#[test]
fn replay_publishes_exactly_once() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let bytes = write_mixed(&logs);
    let lines = lines_of(&bytes);
    let text = |i: usize| String::from_utf8(lines[i].1.clone()).unwrap();
    let (mut agent, src) = mixed_agent(&redis, &logs);
    let stream = src.stream();
    assert!(agent.backfill(&[]).status.success());
    assert_eq!(dead_letters(&agent).len(), 7);
    let original = std::fs::read(agent.dead_letter_path()).unwrap();

    // With parser raw, the parse failures now parse; encoding and oversize ones do not.
    agent.replace_source(SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw"));
    let replay = |agent: &Agent| {
        let o = agent.cmd(&["dlq", "-c", agent.cfg(), "replay"]);
        assert!(o.status.success(), "{}", show(&o));
        stdout(&o)
    };
    let r1 = replay(&agent);
    assert!(r1.contains("4 published, 0 already published"), "{r1}");
    assert!(r1.contains("3 kept in"), "{r1}");
    let mut expected = vec![
        r#"{"msg":"good 1"}"#.to_string(),
        r#"{"msg":"good 2"}"#.to_string(),
        text(1),
        text(2),
        text(3),
        text(6),
    ];
    assert_eq!(redis.xrange_messages(&stream), expected);
    let kept: Vec<String> = dead_letters(&agent)
        .iter()
        .map(|d| d["error_class"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kept, ["encoding", "encoding", "oversize"]);
    // Written once by the backfill (1), tried again by this replay (2).
    let attempts: Vec<u64> = dead_letters(&agent)
        .iter()
        .map(|d| d["attempts"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, [2, 2, 2]);

    // Replaying again publishes nothing new.
    let r2 = replay(&agent);
    assert!(r2.contains("0 published"), "{r2}");
    assert_eq!(redis.xrange_messages(&stream), expected);
    let attempts: Vec<u64> = dead_letters(&agent)
        .iter()
        .map(|d| d["attempts"].as_u64().unwrap())
        .collect();
    assert_eq!(attempts, [3, 3, 3], "every replay counts");

    // Now make the rest acceptable: replace bad UTF-8, allow long lines.
    agent = agent.agent_kv("max_line_bytes", "1024");
    agent.replace_source(
        SourceCfg::new("app", &[&logs.path("*.log")])
            .parser("raw")
            .kv("invalid_utf8", "\"replace\""),
    );
    let r3 = replay(&agent);
    assert!(r3.contains("3 published, 0 already published"), "{r3}");
    assert!(r3.contains("0 kept in"), "{r3}");
    assert!(
        dead_letters(&agent).is_empty(),
        "the dead-letter file is emptied"
    );
    expected.push(String::from_utf8_lossy(&lines[4].1).into_owned());
    expected.push(String::from_utf8_lossy(&lines[5].1).into_owned());
    expected.push("x".repeat(LONG));
    assert_eq!(redis.xrange_messages(&stream), expected);
    let r4 = replay(&agent);
    assert!(r4.contains("replayed 0 record(s)"), "{r4}");

    // An interrupted replay (published, but the file not yet rewritten) run again:
    // every record is recognised as already published.
    std::fs::write(agent.dead_letter_path(), &original).unwrap();
    let r5 = replay(&agent);
    assert!(r5.contains("0 published, 7 already published"), "{r5}");
    assert_eq!(redis.xrange_messages(&stream), expected);
    assert!(dead_letters(&agent).is_empty());
}
