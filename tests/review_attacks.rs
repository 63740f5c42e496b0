//! Hostile review of the guarded-transaction publisher protocol (src/publish/protocol.rs).
//!
//! Tests named `bug_*` are what it found: each asserts the correct behaviour and failed on
//! the first guarded protocol (a10b8b1: only the guard WATCHed, INCR on the guard, one shared
//! marks hash for all hosts, no backoff on mismatches); they pass since. The `survived_*`
//! ones are attacks that protocol already survived, kept as regression tests.
//! Run: cargo nextest run -p redtail --test review_attacks

mod common;

use std::collections::HashSet;

use std::time::Duration;

use common::*;
use redis::Value;

// ---------------------------------------------------------------------------------------
// helpers

/// GUARD_SCRIPT, taken from the source so the raw-protocol tests run the real check.
fn guard_script() -> String {
    let src = include_str!("../src/publish/protocol.rs");
    let start = src.find("\"#!lua").expect("GUARD_SCRIPT in protocol.rs") + 1;
    let end = start + src[start..].find("\";\n").unwrap();
    src[start..end].to_string()
}

/// The agent's own marks hash (`host_name = "testhost"` in the test agents).
fn marks_key(stream: &str) -> String {
    format!("{{{stream}}}:redtail:marks:testhost")
}

fn guard_key(stream: &str) -> String {
    format!("{{{stream}}}:redtail:guard:testhost")
}

fn marks(redis: &RedisServer, stream: &str) -> Vec<(String, String)> {
    redis::cmd("HGETALL")
        .arg(marks_key(stream))
        .query(&mut redis.conn())
        .unwrap()
}

fn assert_exactly_once_in_order(got: &[String], want: &[String]) {
    let uniq: HashSet<&String> = got.iter().collect();
    assert_eq!(
        uniq.len(),
        got.len(),
        "DUPLICATES: {} entries, {} distinct",
        got.len(),
        uniq.len()
    );
    assert_eq!(got.len(), want.len(), "lost lines");
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!(
            "REORDERED from index {i}: got {:?}, want {:?}",
            got[i], want[i]
        );
    }
}

/// One guarded transaction exactly as txn.rs builds it, on a raw connection.
fn guarded_txn(
    c: &mut redis::Connection,
    stream: &str,
    field: &str,
    expect: &str,
    new: &str,
    msgs: &[&str],
) -> (Value, Value) {
    let mut p = redis::pipe();
    p.ignore_errors();
    p.cmd("WATCH").arg(guard_key(stream)).arg(marks_key(stream));
    p.cmd("EVAL")
        .arg(guard_script())
        .arg(3)
        .arg(marks_key(stream))
        .arg(guard_key(stream))
        .arg(stream)
        .arg(field)
        .arg(expect)
        .arg("1");
    p.cmd("MULTI");
    for m in msgs {
        p.cmd("XADD").arg(stream).arg("*").arg("message").arg(*m);
    }
    p.cmd("HSET").arg(marks_key(stream)).arg(field).arg(new);
    p.cmd("EXEC");
    let v: Vec<Value> = p.query(c).unwrap();
    (v[1].clone(), v.last().unwrap().clone())
}

// ---------------------------------------------------------------------------------------
// BUG 1: the check runs at EVAL time, the transaction at EXEC time; only the guard key is
// WATCHed, so a mark changed by ANOTHER connection in between (a late pipeline after a
// timeout, a second agent) does not abort the EXEC. I1 ("applies only on top of the mark it
// expects") and the claim "a pipeline that Redis runs late aborts by itself" (I2) are false
// whenever the late pipeline's check ran before the other connection's EXEC.

/// BUG: fails (2 entries, mark 0:3) on a10b8b1.
#[test]
fn bug_check_then_other_connection_exec_then_exec_duplicates() {
    let redis = RedisServer::start();
    let stream = "logs:t";
    let field = "f";
    let mut a = redis.conn();
    let mut b = redis.conn();
    // Connection A (the "late" pipeline): its check passes, its MULTI is being queued...
    let _: () = redis::cmd("WATCH")
        .arg(guard_key(stream))
        .arg(marks_key(stream))
        .query(&mut a)
        .unwrap();
    let r: i64 = redis::cmd("EVAL")
        .arg(guard_script())
        .arg(3)
        .arg(marks_key(stream))
        .arg(guard_key(stream))
        .arg(stream)
        .arg(field)
        .arg("")
        .arg("1")
        .query(&mut a)
        .unwrap();
    assert_eq!(r, 1);
    let _: () = redis::cmd("MULTI").query(&mut a).unwrap();
    let _: Value = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("message")
        .arg("line-0")
        .query(&mut a)
        .unwrap();
    // ...when connection B (the agent after reconnecting, it read mark = none) sends the
    // same transaction, built on the same mark. It applies.
    let (_, exec_b) = guarded_txn(&mut b, stream, field, "", "0:7", &["line-0"]);
    assert!(matches!(exec_b, Value::Array(_)), "B applies: {exec_b:?}");
    // A's EXEC arrives: its expected mark is gone, it must abort.
    let _: Value = redis::cmd("HSET")
        .arg(marks_key(stream))
        .arg(field)
        .arg("0:7")
        .query(&mut a)
        .unwrap();
    let exec_a: Value = redis::cmd("EXEC").query(&mut a).unwrap();
    assert_eq!(
        redis.xlen(stream),
        1,
        "line-0 applied twice: the late transaction's EXEC ({exec_a:?}) was not stopped by its (passed, stale) check"
    );
}

// ---------------------------------------------------------------------------------------
// BUG 2: the guard key is written by someone else with a non-integer value (or as another
// type). On a mismatch the script's INCR raises, the EVAL replies an error, the guard is
// NOT written, and the EXEC applies on top of the wrong mark: the mark even goes BACKWARD.

/// BUG: fails on a10b8b1 (the stale transaction applies, the mark goes from 0:10 to 0:3).
#[test]
fn bug_guard_key_not_an_integer_lets_a_stale_transaction_apply() {
    let redis = RedisServer::start();
    let stream = "logs:t";
    let mut c = redis.conn();
    let _: () = redis::cmd("SET")
        .arg(guard_key(stream))
        .arg("someone else's value")
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(marks_key(stream))
        .arg("f")
        .arg("0:10")
        .query(&mut c)
        .unwrap();
    // A transaction built on "no mark" (stale): must not apply.
    let (eval, exec) = guarded_txn(&mut c, stream, "f", "", "0:3", &["line-0"]);
    let m: String = redis::cmd("HGET")
        .arg(marks_key(stream))
        .arg("f")
        .query(&mut c)
        .unwrap();
    assert_eq!(
        (redis.xlen(stream), m.as_str()),
        (0, "0:10"),
        "stale transaction applied (EVAL replied {eval:?}, EXEC {exec:?}); the mark went backward"
    );
}

/// BUG (agent level): same cause. Someone owns the guard key; then Redis loses the
/// stream and marks (DEL, as FLUSHALL/restore would). The agent must report the loss
/// ("Redis has no high-water mark ... Redis lost data"); it only says a check "did not run".
#[test]
fn bug_guard_key_taken_hides_redis_loss() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("app.log")]);
    let stream = src.stream();
    let mut agent = Agent::new(&redis.url()).source(src);
    logs.append("app.log", &["a1", "a2", "a3"]);
    agent.run();
    wait_until("first lines", || redis.xlen(&stream) == 3);
    std::thread::sleep(Duration::from_millis(300));
    let _: () = redis::cmd("SET")
        .arg(guard_key(&stream))
        .arg("taken")
        .query(&mut redis.conn())
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .arg(marks_key(&stream))
        .query(&mut redis.conn())
        .unwrap();
    logs.append("app.log", &["a4"]);
    wait_until("a4 published", || redis.xlen(&stream) == 1);
    std::thread::sleep(Duration::from_millis(300));
    let err = agent.stderr();
    assert!(
        err.contains("lost data") || err.contains("behind what was published"),
        "Redis lost a1..a3 (stream and marks deleted) but the agent reported no gap:\n{}",
        err.lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// BUG 3: a mark value that does not parse ("garbage", a future format) is read as "no
// mark" (parse_mark -> None), the transaction is built with expected "" and the script
// compares against the raw value: Mismatch, forever. `Next::Again { pause: false }` means
// finish() loops with no backoff, no log after the first (misleading) gap report, and no
// retry_limit: the agent hangs and hammers Redis.

/// BUG: fails on a10b8b1: thousands of EVALs a second, nothing published, no message.
#[test]
fn bug_malformed_mark_spins_finish_forever() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("app.log")]);
    let stream = src.stream();
    let mut agent = Agent::new(&redis.url())
        .source(src)
        .redis_kv("retry_limit", "5");
    logs.append("app.log", &["a1", "a2"]);
    agent.run();
    wait_until("first lines", || redis.xlen(&stream) == 2);
    let (field, _) = marks(&redis, &stream).pop().unwrap();
    let _: () = redis::cmd("HSET")
        .arg(marks_key(&stream))
        .arg(&field)
        .arg("garbage")
        .query(&mut redis.conn())
        .unwrap();
    logs.append("app.log", &["a3"]);
    std::thread::sleep(Duration::from_secs(2));
    let e0 = redis.command_calls("eval");
    std::thread::sleep(Duration::from_secs(1));
    let rate = redis.command_calls("eval") - e0;
    let running = agent.is_running();
    let err = agent.stderr();
    assert!(
        rate < 50 && (!running || redis.xlen(&stream) == 3),
        "agent spins: {rate} EVALs in 1 s, running={running}, xlen={}; last log lines:\n{}",
        redis.xlen(&stream),
        err.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// BUG 4: the marks hash becomes a string. The check script's HGET raises, so the EVAL
// errors and the EXEC runs unguarded: the XADDs apply, the HSET fails. The agent then stops
// with "fix or delete the key, then start again"; doing exactly that republishes the
// entries that are already in the stream (duplicates), and at start the agent blames
// "Redis lost data" for the deleted marks.

/// BUG: fails on a10b8b1 (b-lines twice).
#[test]
fn bug_marks_key_made_a_string_then_following_the_advice_duplicates() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("app.log")]);
    let stream = src.stream();
    let mut agent = Agent::new(&redis.url()).source(src);
    let first = numbered_lines("a", 50);
    logs.append_all("app.log", &first);
    agent.run();
    wait_until("first lines", || redis.xlen(&stream) == 50);
    let len = std::fs::metadata(logs.path("app.log")).unwrap().len();
    agent.wait_checkpoint(&logs.path("app.log"), len);
    let _: () = redis::cmd("DEL")
        .arg(marks_key(&stream))
        .query(&mut redis.conn())
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(marks_key(&stream))
        .arg("oops")
        .query(&mut redis.conn())
        .unwrap();
    let second = numbered_lines("b", 50);
    logs.append_all("app.log", &second);
    wait_until("the agent stops", || !agent.is_running());
    let after_stop = redis.xlen(&stream);
    let stop_msg: String = agent
        .stderr()
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("Error"))
        .collect::<Vec<_>>()
        .join("\n");
    let _ = agent.stop();
    // The operator follows the message: delete the key, start again.
    let _: () = redis::cmd("DEL")
        .arg(marks_key(&stream))
        .query(&mut redis.conn())
        .unwrap();
    agent.run();
    std::thread::sleep(Duration::from_secs(3));
    let _ = agent.stop();
    let got = redis.xrange_messages(&stream);
    let want: Vec<String> = first.iter().chain(&second).cloned().collect();
    let uniq: HashSet<&String> = got.iter().collect();
    assert!(
        uniq.len() == got.len() && after_stop == 50,
        "xlen when the agent stopped: {after_stop} (the unguarded EXEC applied), after restart {} entries, {} distinct (want {}).\nstop message:\n{stop_msg}\nrestart log:\n{}",
        got.len(),
        uniq.len(),
        want.len(),
        agent
            .stderr()
            .lines()
            .filter(|l| l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// BUG 5: the mark field is `<dev>-<inode>-<fingerprint>` with no host component, while
// entries carry host.name (several hosts per stream are intended). Two hosts whose files
// collide (cloned images: same dev, inode, first line) share a mark: the second host's lines
// are dropped as "entries already in Redis". Simulated by two agents (host h1, h2) on one
// file.

/// BUG: fails on a10b8b1 (h2's lines are missing, logged at INFO only).
#[test]
fn bug_two_hosts_with_colliding_file_ids_lose_lines() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("app.log")]);
    let stream = src.stream();
    let mut h1 = Agent::new(&redis.url())
        .source(src.clone())
        .agent_kv("host_name", "\"h1\"");
    let mut h2 = Agent::new(&redis.url())
        .source(src)
        .agent_kv("host_name", "\"h2\"");
    h1.run();
    h2.run();
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..20 {
        logs.append("app.log", &[&format!("line {i}")]);
        std::thread::sleep(Duration::from_millis(30));
    }
    std::thread::sleep(Duration::from_secs(2));
    let entries = redis.xrange(&stream);
    let per_host = |h: &str| {
        entries
            .iter()
            .filter(|e| e.get("host.name") == Some(h))
            .count()
    };
    let (n1, n2) = (per_host("h1"), per_host("h2"));
    h1.stop();
    h2.stop();
    assert_eq!((n1, n2), (20, 20), "lines per host");
}

// ---------------------------------------------------------------------------------------
// Attacks the code survived (regression tests).

/// Redis SIGSTOPped past response_timeout three times under heavy writes; late pipelines
/// run after the agent reconnected.
#[test]
fn survived_sigstop_past_response_timeout_under_load() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("app.log"), &logs.path("b.log")]);
    let stream = src.stream();
    let mut agent = Agent::new(&redis.url())
        .source(src)
        .redis_kv("response_timeout", "\"200ms\"")
        .redis_kv("connect_timeout", "\"200ms\"")
        .redis_kv("retry_max_backoff", "\"100ms\"");
    agent.run();
    let want = numbered_lines("s", 120_000);
    let wantb = numbered_lines("b", 60_000);
    let w = want.clone();
    let wb = wantb.clone();
    let lp = logs.path("app.log");
    let lb = logs.path("b.log");
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(lp)
            .unwrap();
        let mut g = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(lb)
            .unwrap();
        for (i, c) in w.chunks(2000).enumerate() {
            f.write_all((c.join("\n") + "\n").as_bytes()).unwrap();
            if let Some(cb) = wb.chunks(1000).nth(i) {
                g.write_all((cb.join("\n") + "\n").as_bytes()).unwrap();
            }
            std::thread::sleep(Duration::from_millis(40));
        }
    });
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        redis.pause();
        std::thread::sleep(Duration::from_millis(800));
        redis.resume();
    }
    writer.join().unwrap();
    wait_until_for(Duration::from_secs(90), "all published", || {
        redis.xlen(&stream) >= want.len() + wantb.len()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.stop().code(), Some(0));
    let got = redis.messages_from(&stream, &logs.path("app.log"));
    assert_exactly_once_in_order(&got, &want);
    let got = redis.messages_from(&stream, &logs.path("b.log"));
    assert_exactly_once_in_order(&got, &wantb);
}

/// kill -9 of the agent at random points under load (Redis with AOF), then a clean run.
#[test]
fn survived_agent_kill9_at_random_points() {
    let redis = RedisServer::start_with_aof();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("app.log"), &logs.path("b.log")]);
    let stream = src.stream();
    let mut agent = Agent::new(&redis.url()).source(src);
    let want = numbered_lines("k", 60_000);
    let wantb = numbered_lines("j", 30_000);
    let mut seed = 12345u64;
    let chunks: Vec<_> = want.chunks(6000).zip(wantb.chunks(3000)).collect();
    for (a, b) in chunks {
        logs.append_all("app.log", a);
        logs.append_all("b.log", b);
        agent.run();
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(150 + (seed >> 33) % 600));
        agent.kill9();
    }
    agent.run();
    wait_until_for(Duration::from_secs(60), "all published", || {
        redis.xlen(&stream) >= want.len() + wantb.len()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.stop().code(), Some(0));
    assert_exactly_once_in_order(&redis.messages_from(&stream, &logs.path("app.log")), &want);
    assert_exactly_once_in_order(&redis.messages_from(&stream, &logs.path("b.log")), &wantb);
}

/// The stream key turns into a string mid-run, then is fixed: every line is in the stream
/// or the dead-letter file, once; the stream part keeps file order.
#[test]
fn survived_wrongtype_mid_run() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("app.log")]);
    let stream = src.stream();
    let mut agent = Agent::new(&redis.url()).source(src);
    agent.run();
    let want = numbered_lines("w", 30_000);
    let mut published_before = Vec::new();
    for (i, c) in want.chunks(1000).enumerate() {
        logs.append_all("app.log", c);
        std::thread::sleep(Duration::from_millis(30));
        if i == 10 {
            published_before = redis.xrange_messages(&stream);
            let _: () = redis::cmd("DEL")
                .arg(&stream)
                .query(&mut redis.conn())
                .unwrap();
            let _: () = redis::cmd("SET")
                .arg(&stream)
                .arg("x")
                .query(&mut redis.conn())
                .unwrap();
        }
        if i == 20 {
            let _: () = redis::cmd("DEL")
                .arg(&stream)
                .query(&mut redis.conn())
                .unwrap();
        }
    }
    let dlq = agent.dead_letter_path();
    let count = || {
        redis.xlen(&stream)
            + published_before.len()
            + std::fs::read_to_string(&dlq)
                .map(|t| t.lines().count())
                .unwrap_or(0)
    };
    wait_until_for(Duration::from_secs(60), "all lines accounted for", || {
        // The DEL at i == 20 may also remove entries published after it was a string.
        count() >= want.len() || !agent.is_running()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.stop().code(), Some(0));
    let dead: Vec<String> = std::fs::read_to_string(&dlq)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["line"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let mut all: Vec<String> = published_before.clone();
    all.extend(dead);
    all.extend(redis.xrange_messages(&stream));
    all.sort();
    let mut w = want.clone();
    w.sort();
    let uniq: HashSet<&String> = all.iter().collect();
    assert_eq!(uniq.len(), all.len(), "duplicates across stream and DLQ");
    assert_eq!(all, w, "lost lines");
}

/// FLUSHALL while publishing: the loss is reported and later lines flow in order.
#[test]
fn survived_flushall_mid_run_is_reported() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("app.log")]);
    let stream = src.stream();
    let mut agent = Agent::new(&redis.url()).source(src);
    agent.run();
    let want = numbered_lines("f", 40_000);
    for (i, c) in want.chunks(1000).enumerate() {
        logs.append_all("app.log", c);
        std::thread::sleep(Duration::from_millis(25));
        if i == 15 {
            let _: () = redis::cmd("FLUSHALL").query(&mut redis.conn()).unwrap();
        }
    }
    wait_until_for(Duration::from_secs(60), "last line", || {
        redis.xrange_messages(&stream).last() == want.last()
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(agent.stop().code(), Some(0));
    let got = redis.xrange_messages(&stream);
    let start = want.iter().position(|w| *w == got[0]).unwrap();
    assert_exactly_once_in_order(&got, &want[start..]);
    assert!(
        agent.stderr().contains("lost data"),
        "FLUSHALL not reported"
    );
}
