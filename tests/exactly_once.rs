//! The publisher's protocol against a hostile Redis (issue #8): transactions refused for
//! memory with two pipelines in flight, Redis restarted without persistence under two files,
//! hardened servers (renamed commands, ACLs). Real binary, real redis-server.

mod common;

use std::time::Duration;

use common::*;

fn mark_of(redis: &RedisServer, stream: &str, path: &std::path::Path) -> Vec<String> {
    let _ = path;
    let marks: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(format!("{{{stream}}}:redtail:marks:testhost"))
        .query(&mut redis.conn())
        .unwrap();
    marks.into_iter().map(|(_, v)| v).collect()
}

/// Redis refuses transactions (OOM under noeviction) while two pipelines are in flight: the
/// refused one must not be overtaken by the next; once memory is back every line is in the
/// stream exactly once, in file order, and the mark is at the end of the file.
#[test]
fn oom_refused_transactions_are_never_overtaken() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("app.log")]);
    let stream = src.stream();
    let want = numbered_lines("l", 60_000);
    logs.append_all("app.log", &want);
    redis.config_set("maxmemory-policy", "noeviction");
    redis.config_set("maxmemory", &(redis.used_memory() + 2_000_000).to_string());
    let mut agent = Agent::new(&redis.url()).source(src);
    agent.run();
    wait_until("Redis refuses for memory", || {
        agent.stderr().contains("Redis refused a transaction")
    });
    // While refused, what is in the stream is a prefix of the file, in order.
    let part = redis.xrange_messages(&stream);
    assert!(part.len() < want.len(), "the memory limit did not bite");
    assert_eq!(
        part[..],
        want[..part.len()],
        "stream is not a prefix of the file"
    );
    redis.config_set("maxmemory", "0");
    wait_until_for(Duration::from_secs(60), "every line published", || {
        redis.xlen(&stream) >= want.len()
    });
    assert_eq!(agent.stop().code(), Some(0));
    let got = redis.xrange_messages(&stream);
    assert_eq!(got.len(), want.len(), "lost or duplicated lines");
    assert!(got == want, "lines out of file order");
    let len = std::fs::metadata(logs.path("app.log")).unwrap().len();
    assert_eq!(
        mark_of(&redis, &stream, &logs.path("app.log")),
        [format!("0:{len}")]
    );
}

/// The same refusal, then kill -9 while refused: a backfill once memory is back publishes
/// exactly the lines that are missing, in order.
#[test]
fn oom_refusal_then_kill9_then_backfill_loses_nothing() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("app.log")]);
    let stream = src.stream();
    let want = numbered_lines("k", 60_000);
    logs.append_all("app.log", &want);
    redis.config_set("maxmemory-policy", "noeviction");
    redis.config_set("maxmemory", &(redis.used_memory() + 2_000_000).to_string());
    let mut agent = Agent::new(&redis.url()).source(src);
    agent.run();
    wait_until("Redis refuses for memory", || {
        agent.stderr().contains("Redis refused a transaction")
    });
    agent.kill9();
    let part = redis.xlen(&stream);
    assert!(part < want.len(), "the memory limit did not bite");
    redis.config_set("maxmemory", "0");
    let out = agent.backfill(&[]);
    assert!(out.status.success(), "{}", show(&out));
    let got = redis.xrange_messages(&stream);
    assert_eq!(got.len(), want.len(), "lost or duplicated lines");
    assert!(got == want, "lines out of file order");
}

/// Redis restarted without persistence under two files: the loss is reported for each
/// file, including the one with nothing new to send, and later lines still flow.
#[test]
fn redis_restart_without_persistence_reports_every_file() {
    let mut redis = RedisServer::start();
    let logs = LogDir::new();
    let a = SourceCfg::new("a", &[&logs.path("a.log")]);
    let b = SourceCfg::new("b", &[&logs.path("b.log")]);
    let (sa, sb) = (a.stream(), b.stream());
    logs.append("a.log", &["a1", "a2", "a3"]);
    logs.append("b.log", &["b1", "b2"]);
    let mut agent = Agent::new(&redis.url()).source(a).source(b);
    agent.run();
    wait_until("both files published", || {
        redis.xlen(&sa) == 3 && redis.xlen(&sb) == 2
    });
    redis.restart();
    logs.append("a.log", &["a4"]);
    wait_until("a4 published after the restart", || redis.xlen(&sa) == 1);
    let pa = logs.path("a.log").display().to_string();
    let pb = logs.path("b.log").display().to_string();
    let reported = |err: &str, p: &str| {
        err.lines()
            .filter(|l| l.contains("ERROR") && l.contains("Redis lost") && l.contains(p))
            .count()
    };
    wait_until("both losses reported", || {
        let e = agent.stderr();
        reported(&e, &pa) >= 1 && reported(&e, &pb) >= 1
    });
    assert_eq!(redis.xrange_messages(&sa), ["a4"]);
    assert_eq!(agent.stop().code(), Some(0));
    let e = agent.stderr();
    assert_eq!(reported(&e, &pa), 1, "{e}");
    assert_eq!(reported(&e, &pb), 1, "{e}");
    // b's mark was not overwritten with anything it did not publish.
    logs.append("b.log", &["b3"]);
    agent.run();
    wait_until("b3 published", || redis.xlen(&sb) == 1);
    assert_eq!(redis.xrange_messages(&sb), ["b3"]);
    assert_eq!(agent.stop().code(), Some(0));
}

/// A hardened server without CLIENT (`rename-command CLIENT ""`): publishing needs no CLIENT
/// command at all, and no other client is ever killed.
#[test]
fn works_without_the_client_command() {
    let redis = RedisServer::start_with(&["--rename-command", "CLIENT", ""]);
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("app.log")]);
    let stream = src.stream();
    logs.append("app.log", &["one", "two"]);
    let mut agent = Agent::new(&redis.url()).source(src);
    agent.run();
    wait_until("published", || redis.xlen(&stream) == 2);
    assert_eq!(agent.stop().code(), Some(0));
    assert_eq!(redis.xrange_messages(&stream), ["one", "two"]);
}

/// A reply lost to a timeout (Redis paused past `response_timeout`) is handled without
/// killing any connection: another client blocked on the server survives, and every line is
/// in the stream once.
#[test]
fn timeouts_never_kill_other_clients() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("app.log")]);
    let stream = src.stream();
    let mut agent = Agent::new(&redis.url())
        .source(src)
        .redis_kv("response_timeout", "\"300ms\"")
        .redis_kv("connect_timeout", "\"300ms\"");
    agent.run();
    logs.append("app.log", &["before"]);
    wait_until("first line", || redis.xlen(&stream) == 1);
    // Another application's consumer, blocked on its own stream.
    let url = redis.url();
    let blocked = std::thread::spawn(move || {
        let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
        let r: redis::RedisResult<redis::Value> = redis::cmd("XREAD")
            .arg("BLOCK")
            .arg(0)
            .arg("STREAMS")
            .arg("other:app")
            .arg("$")
            .query(&mut c);
        r.is_ok()
    });
    wait_until("consumer blocked", || {
        let info: String = redis::cmd("INFO")
            .arg("clients")
            .query(&mut redis.conn())
            .unwrap();
        info.contains("blocked_clients:1")
    });
    redis.pause();
    let mut rng_lines = Vec::new();
    for i in 0..50 {
        rng_lines.push(format!("during {i}"));
    }
    let refs: Vec<&str> = rng_lines.iter().map(|s| s.as_str()).collect();
    logs.append("app.log", &refs);
    wait_until("the agent times out", || {
        agent.stderr().contains("Redis call failed") || agent.stderr().contains("Redis unavailable")
    });
    redis.resume();
    wait_until("every line", || redis.xlen(&stream) >= 51);
    let _: () = redis::cmd("XADD")
        .arg("other:app")
        .arg("*")
        .arg("k")
        .arg("v")
        .query(&mut redis.conn())
        .unwrap();
    assert!(
        blocked.join().unwrap(),
        "the other client's connection was killed"
    );
    assert_eq!(redis.command_calls("client|kill"), 0);
    assert_eq!(agent.stop().code(), Some(0));
    let got = redis.xrange_messages(&stream);
    let mut want = vec!["before".to_string()];
    want.extend(rng_lines);
    assert_eq!(got, want);
}

/// A user without XADD (ACL): the agent stops at once with the reason (exit non-zero), instead
/// of retrying forever; nothing is checkpointed, so a fixed ACL resumes from the start.
#[test]
fn a_permanent_refusal_stops_the_agent_with_the_reason() {
    let redis = RedisServer::start();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("shipper")
        .arg("on")
        .arg(">secret")
        .arg("~*")
        .arg("+@all")
        .arg("-xadd")
        .query(&mut redis.conn())
        .unwrap();
    let logs = LogDir::new();
    let src = SourceCfg::new("app", &[&logs.path("app.log")]);
    let stream = src.stream();
    logs.append("app.log", &["one"]);
    let url = format!("redis://shipper:secret@127.0.0.1:{}/0", redis.port);
    let mut agent = Agent::new(&url).source(src);
    agent.run();
    wait_until("the agent stops by itself", || !agent.is_running());
    let err = agent.stderr();
    assert!(err.contains("XADD") && err.contains("NOPERM"), "{err}");
    assert_eq!(redis.xlen(&stream), 0);
    // Fixed ACL: it publishes.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("shipper")
        .arg("+xadd")
        .query(&mut redis.conn())
        .unwrap();
    let mut agent2 = Agent::new(&url).source(SourceCfg::new("app", &[&logs.path("app.log")]));
    agent2.run();
    wait_until("published after the fix", || redis.xlen(&stream) == 1);
    assert_eq!(agent2.stop().code(), Some(0));
}
