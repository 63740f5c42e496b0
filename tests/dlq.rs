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

// ---------------------------------------------------------------------------------------
// replay: confirmed in Redis before it leaves the file, in chunks, exactly once

fn marks_key(stream: &str) -> String {
    format!("{{{stream}}}:redtail:marks")
}

/// The `dlq:` marker fields of the stream's marks hash.
fn replay_markers(redis: &RedisServer, stream: &str) -> Vec<String> {
    let keys: Vec<String> = redis::cmd("HKEYS")
        .arg(marks_key(stream))
        .query(&mut redis.conn())
        .unwrap();
    keys.into_iter().filter(|k| k.starts_with("dlq:")).collect()
}

fn redis_cmd(redis: &RedisServer, args: &[&str]) {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query::<redis::Value>(&mut redis.conn())
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
}

/// Writes a dead-letter file of `n` parse failures `rec-000000` … of source `app`, one
/// file, offsets 100 apart.
fn synthetic_dead_letters(agent: &Agent, n: usize) {
    std::fs::create_dir_all(agent.state_dir()).unwrap();
    let mut s = String::new();
    for i in 0..n {
        let e = serde_json::json!({
            "schema": 1, "ts": "2024-01-01T00:00:00.000Z", "host": "testhost",
            "source": "app", "path": "/var/log/app.log", "file_id": "fd01-2a-beef",
            "generation": 0, "offset": i * 100, "length": 10, "parser": "json",
            "error_class": "parse", "error": "expected value at byte 0", "attempts": 1,
            "agent_version": "0.0.0", "line": format!("rec-{i:06}"),
        });
        s.push_str(&e.to_string());
        s.push('\n');
    }
    std::fs::write(agent.dead_letter_path(), s).unwrap();
}

/// Calls of a command, from INFO commandstats.
fn command_calls(redis: &RedisServer, cmd: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.conn())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .map(|r| r.split(',').next().unwrap().parse().unwrap())
        .unwrap_or(0)
}

/// Every message once, and nothing else.
fn assert_each_once(redis: &RedisServer, stream: &str, expected: &[String]) {
    let mut got = redis.xrange_messages(stream);
    got.sort();
    let mut want = expected.to_vec();
    want.sort();
    assert_eq!(got.len(), want.len(), "entries in {stream}");
    assert!(
        got == want,
        "{stream} does not hold each record exactly once"
    );
}

#[test]
fn replay_into_a_wrongtype_key_keeps_the_records_until_they_are_published() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let bytes = write_mixed(&logs);
    let lines = lines_of(&bytes);
    let text = |i: usize| String::from_utf8(lines[i].1.clone()).unwrap();
    let (mut agent, src) = mixed_agent(&redis, &logs);
    let stream = src.stream();
    assert!(agent.backfill(&[]).status.success());
    assert_eq!(dead_letters(&agent).len(), 7);

    // The stream key now holds a string: every XADD into it fails with WRONGTYPE.
    redis_cmd(&redis, &["DEL", &stream]);
    redis_cmd(&redis, &["SET", &stream, "not a stream"]);
    agent.replace_source(SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw"));
    let o = agent.cmd(&["dlq", "-c", agent.cfg(), "replay"]);
    assert!(
        !o.status.success(),
        "a failed replay must fail: {}",
        show(&o)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("WRONGTYPE"), "{}", show(&o));
    assert!(
        err.contains("4 record(s) could not be published"),
        "{}",
        show(&o)
    );
    assert!(
        replay_markers(&redis, &stream).is_empty(),
        "no marker may be set without its entry: {:?}",
        replay_markers(&redis, &stream)
    );
    let dl = dead_letters(&agent);
    assert_eq!(dl.len(), 7, "nothing leaves the file: {dl:#?}");
    let rejected: Vec<&serde_json::Value> = dl
        .iter()
        .filter(|d| d["error_class"] == "rejected")
        .collect();
    assert_eq!(rejected.len(), 4, "{dl:#?}");
    for d in &rejected {
        assert_eq!(d["attempts"], 2, "{d}");
        assert!(d["error"].as_str().unwrap().contains("WRONGTYPE"), "{d}");
    }

    // Run again on the same wrong key: still nothing lost, nothing "already published".
    let o = agent.cmd(&["dlq", "-c", agent.cfg(), "replay"]);
    assert!(!o.status.success(), "{}", show(&o));
    assert!(stdout(&o).contains("0 already published"), "{}", show(&o));
    assert_eq!(dead_letters(&agent).len(), 7);

    // Fix the key: now they are published, once, and only then leave the file.
    redis_cmd(&redis, &["DEL", &stream]);
    let o = agent.cmd(&["dlq", "-c", agent.cfg(), "replay"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        stdout(&o).contains("4 published, 0 already published"),
        "{}",
        show(&o)
    );
    let expected = vec![text(1), text(2), text(3), text(6)];
    assert_eq!(redis.xrange_messages(&stream), expected);
    let kept: Vec<String> = dead_letters(&agent)
        .iter()
        .map(|d| d["error_class"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kept, ["encoding", "encoding", "oversize"]);
    let o = agent.cmd(&["dlq", "-c", agent.cfg(), "replay"]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(redis.xrange_messages(&stream), expected);
    assert_eq!(replay_markers(&redis, &stream).len(), 4);
}

#[test]
fn a_large_dead_letter_file_is_replayed_in_chunks() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let agent = Agent::new(&redis.url()).source(src.clone());
    let n = 2000;
    synthetic_dead_letters(&agent, n);
    let before = command_calls(&redis, "eval") + command_calls(&redis, "evalsha");
    let o = agent.cmd(&["dlq", "-c", agent.cfg(), "replay"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        stdout(&o).contains(&format!("{n} published, 0 already published")),
        "{}",
        show(&o)
    );
    let calls = command_calls(&redis, "eval") + command_calls(&redis, "evalsha") - before;
    assert!(
        calls >= (n / 500) as u64,
        "{n} records in {calls} call(s): Redis is blocked for too long per call"
    );
    let expected: Vec<String> = (0..n).map(|i| format!("rec-{i:06}")).collect();
    assert_eq!(
        redis.xrange_messages(&src.stream()),
        expected,
        "in file order"
    );
    assert!(dead_letters(&agent).is_empty());
}

#[test]
fn a_replay_killed_midway_and_run_again_publishes_nothing_twice() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let stream = src.stream();
    let agent = Agent::new(&redis.url()).source(src.clone());
    let mut con = redis.conn();
    let xlen = |con: &mut redis::Connection| -> usize {
        redis::cmd("XLEN").arg(&stream).query(con).unwrap()
    };
    // Kill it once the first chunks landed and the rest cannot (writes paused); a replay
    // too quick to catch is tried again with more records.
    let mut n = 20_000;
    let at_kill = loop {
        redis_cmd(&redis, &["DEL", &stream, &marks_key(&stream)]);
        synthetic_dead_letters(&agent, n);
        agent.write_config();
        let mut child = std::process::Command::new(BIN)
            .args(["dlq", "-c", agent.cfg(), "replay"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + DEFAULT_WAIT;
        let caught = loop {
            if xlen(&mut con) > 0 {
                redis::cmd("CLIENT")
                    .arg("PAUSE")
                    .arg(60_000)
                    .arg("WRITE")
                    .query::<()>(&mut con)
                    .unwrap();
                break true;
            }
            if child.try_wait().unwrap().is_some() {
                break false;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the replay published nothing"
            );
        };
        let landed = xlen(&mut con);
        let _ = child.kill();
        let _ = child.wait();
        // Its queued call must not run after the pause: wait until Redis dropped it.
        wait_until("the killed replay's connection to close", || {
            let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).unwrap();
            list.lines().count() == 1
        });
        redis::cmd("CLIENT")
            .arg("UNPAUSE")
            .query::<()>(&mut con)
            .unwrap();
        if caught && landed < n {
            break landed;
        }
        assert!(
            n < 100_000,
            "could not catch a replay mid-way ({landed} of {n})"
        );
        n *= 2;
    };
    assert!(at_kill > 0 && at_kill < n, "{at_kill} of {n}");
    assert_eq!(
        dead_letters(&agent).len(),
        n,
        "a killed replay keeps the file"
    );

    let o = agent.cmd(&["dlq", "-c", agent.cfg(), "replay"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        stdout(&o).contains(&format!(
            "{} published, {at_kill} already published",
            n - at_kill
        )),
        "{}",
        show(&o)
    );
    let expected: Vec<String> = (0..n).map(|i| format!("rec-{i:06}")).collect();
    assert_each_once(&redis, &stream, &expected);
    assert!(dead_letters(&agent).is_empty());
}

// ---------------------------------------------------------------------------------------
// the agent's dead-letter writer: rotation, a removed file, crashes

/// Every record of every dead-letter file (`path.N` … `path.1`, `path`), and the lines that
/// are not records.
fn all_dead_letters(agent: &Agent) -> (Vec<serde_json::Value>, Vec<String>) {
    let path = agent.dead_letter_path();
    let Ok(rd) = std::fs::read_dir(agent.state_dir()) else {
        return (Vec::new(), Vec::new());
    };
    let mut files: Vec<(u64, PathBuf)> = rd
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let n = name.strip_prefix("dead-letter.jsonl.")?.parse().ok()?;
            Some((n, agent.state_dir().join(name)))
        })
        .collect();
    files.sort();
    files.reverse();
    let mut paths: Vec<PathBuf> = files.into_iter().map(|f| f.1).collect();
    paths.push(path);
    let (mut recs, mut bad) = (Vec::new(), Vec::new());
    for p in paths {
        let Ok(b) = std::fs::read(&p) else { continue };
        for l in b.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<serde_json::Value>(l) {
                Ok(v) => recs.push(v),
                Err(_) => bad.push(format!(
                    "{}: {:?}",
                    p.display(),
                    String::from_utf8_lossy(&l[..l.len().min(80)])
                )),
            }
        }
    }
    (recs, bad)
}

/// Newlines in all dead-letter files (cheaper than parsing them).
fn dead_letter_lines(agent: &Agent) -> usize {
    let Ok(rd) = std::fs::read_dir(agent.state_dir()) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("dead-letter.jsonl")
        })
        .filter_map(|e| std::fs::read(e.path()).ok())
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .sum()
}

/// The `line` of every record in the dead-letter file `p` (empty when there is none).
fn lines_in(p: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["line"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

fn dead_lines(agent: &Agent) -> std::collections::HashSet<String> {
    all_dead_letters(agent)
        .0
        .iter()
        .filter_map(|d| d["line"].as_str().map(str::to_string))
        .collect()
}

fn bad_line(i: usize) -> String {
    format!("bad-{i:05} {}", "y".repeat(200))
}

#[test]
fn removing_the_active_dead_letter_file_loses_no_rotated_file_and_does_not_stall() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("json");
    let mut agent = Agent::new(&redis.url())
        .agent_kv("dead_letter_max_bytes", "\"4KiB\"")
        .agent_kv("dead_letter_keep", "50")
        .source(src.clone());
    agent.run();
    wait_until("the agent to start", || agent.stderr().contains("starting"));
    let round = |range: std::ops::Range<usize>, good: &str| {
        let mut v: Vec<String> = range.clone().map(bad_line).collect();
        v.push(format!("{{\"good\":\"{good}\"}}"));
        logs.append("app.log", &strs(&v));
        wait_until(&format!("dead letters {range:?}"), || {
            let have = dead_lines(&agent);
            range.clone().all(|i| have.contains(&bad_line(i)))
        });
        wait_until(&format!("entry {good}"), || {
            redis
                .xrange_messages(&src.stream())
                .contains(&format!("{{\"good\":\"{good}\"}}"))
        });
    };
    round(0..40, "1");
    let dl = agent.dead_letter_path();
    let rotated: Vec<(PathBuf, Vec<String>)> = (1..=50)
        .map(|i| PathBuf::from(format!("{}.{i}", dl.display())))
        .filter(|p| p.exists())
        .map(|p| {
            let l = lines_in(&p);
            (p, l)
        })
        .collect();
    assert!(rotated.len() >= 2, "rotated: {rotated:?}");

    // An operator removes the active file; dead letters keep coming, enough to rotate.
    std::fs::remove_file(&dl).unwrap();
    round(40..80, "2");
    round(80..100, "3");
    assert!(dl.exists(), "the active file is recreated");
    let have = dead_lines(&agent);
    for (p, lines) in &rotated {
        for l in lines {
            assert!(have.contains(l), "{l} of {} is gone", p.display());
        }
    }
    let (_, bad) = all_dead_letters(&agent);
    assert!(bad.is_empty(), "{bad:?}");
    assert!(
        !agent.stderr().contains("holding the pipeline"),
        "{}",
        agent.stderr()
    );
    let t = std::time::Instant::now();
    assert!(agent.stop().success());
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn a_dead_letter_file_that_cannot_be_written_is_reported_and_sigterm_is_prompt() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("json");
    let mut agent = Agent::new(&redis.url()).source(src.clone());
    agent.run();
    wait_until("the agent to start", || agent.stderr().contains("starting"));
    logs.append("app.log", &[&bad_line(0)]);
    wait_until("the first dead letter", || dead_lines(&agent).len() == 1);

    // The path becomes a directory: every open and write fails until it is removed.
    let dl = agent.dead_letter_path();
    std::fs::remove_file(&dl).unwrap();
    std::fs::create_dir(&dl).unwrap();
    logs.append("app.log", &[&bad_line(1), "{\"good\":\"after\"}"]);
    wait_until("an ERROR naming the file and the error", || {
        agent.stderr().lines().any(|l| {
            l.contains("ERROR") && l.contains(dl.to_str().unwrap()) && l.contains("Is a directory")
        })
    });
    assert!(
        !redis
            .xrange_messages(&src.stream())
            .contains(&"{\"good\":\"after\"}".to_string()),
        "nothing passes a dead letter that is not on disk"
    );
    let t = std::time::Instant::now();
    assert!(agent.stop().success());
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "SIGTERM took {:?} (shutdown_timeout is 10 s)",
        t.elapsed()
    );

    // Fixed: the next start writes what was not written.
    std::fs::remove_dir(&dl).unwrap();
    agent.run();
    wait_until("the entry after the dead letter", || {
        redis
            .xrange_messages(&src.stream())
            .contains(&"{\"good\":\"after\"}".to_string())
    });
    assert!(dead_lines(&agent).contains(&bad_line(1)));
    assert!(agent.stop().success());
}

#[test]
fn kill9_during_heavy_dead_lettering_loses_no_dead_letter() {
    let redis = RedisServer::start_with_aof();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("json");
    let mut agent = Agent::new(&redis.url())
        .agent_kv("max_line_bytes", "\"1KiB\"")
        .agent_kv("dead_letter_max_bytes", "\"4MiB\"")
        .agent_kv("dead_letter_keep", "100")
        .source(src.clone());
    // Long lines (oversize, dead-lettered whole): one append is many pages, so a kill can
    // land inside it (Linux stops a write to a file between pages for a fatal signal).
    let n = 120;
    let long = |i: usize| format!("long-{i:04} {}", "z".repeat(256 * 1024));
    let mut expected = std::collections::HashSet::new();
    for i in 0..n {
        logs.append("app.log", &[&long(i)]);
        expected.insert(long(i));
    }
    let size = std::fs::metadata(logs.path("app.log")).unwrap().len();
    for k in 1..=4usize {
        agent.run();
        let want = k * n / 6;
        wait_until(&format!("{want} dead letters"), || {
            dead_letter_lines(&agent) >= want
        });
        agent.kill9();
        // What a kill inside a multi-page append leaves: the head of a line, no newline.
        // The next record written must not be glued to it.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(agent.dead_letter_path())
            .unwrap();
        std::io::Write::write_all(&mut f, b"{\"schema\":1,\"ts\":\"2024-01-01T00:0").unwrap();
    }
    agent.run();
    agent.wait_checkpoint(&logs.path("app.log"), size);
    assert!(agent.stop().success());
    let (recs, bad) = all_dead_letters(&agent);
    let have: std::collections::HashSet<String> = recs
        .iter()
        .filter_map(|d| d["line"].as_str().map(str::to_string))
        .collect();
    let missing: Vec<usize> = (0..n).filter(|&i| !have.contains(&long(i))).collect();
    assert!(
        missing.is_empty(),
        "dead letters lost: {missing:?}; bad lines: {bad:?}"
    );
    assert!(bad.is_empty(), "torn lines: {bad:?}");
}

#[test]
fn replay_keeps_damaged_records_instead_of_publishing_something_else() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let agent = Agent::new(&redis.url()).source(src.clone());
    synthetic_dead_letters(&agent, 4);
    // 0: line_b64 that is not base64; 1: no line at all; 2: line shorter than its length;
    // 3: intact.
    let text = std::fs::read_to_string(agent.dead_letter_path()).unwrap();
    let mut recs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let o = recs[0].as_object_mut().unwrap();
    o.remove("line");
    o.insert("line_b64".into(), "!!! not base64".into());
    recs[1].as_object_mut().unwrap().remove("line");
    recs[2]["line"] = "rec-0".into();
    let mut out = String::new();
    for r in &recs {
        out.push_str(&r.to_string());
        out.push('\n');
    }
    // And a line that is not a record at all: kept as it is.
    out.push_str("not a record\n");
    std::fs::write(agent.dead_letter_path(), out).unwrap();
    let o = agent.cmd(&["dlq", "-c", agent.cfg(), "replay"]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(stdout(&o).contains("1 published"), "{}", show(&o));
    assert_eq!(redis.xrange_messages(&src.stream()), ["rec-000003"]);
    let after = std::fs::read_to_string(agent.dead_letter_path()).unwrap();
    let lines: Vec<&str> = after.lines().collect();
    assert_eq!(lines.len(), 4, "{after}");
    assert_eq!(lines[3], "not a record");
    for (l, r) in lines[..3].iter().zip(&recs[..3]) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(&v, r, "kept as it was");
    }
}
