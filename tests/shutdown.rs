//! SIGTERM while lines are being written: exit 0, what was published is in Redis once,
//! and the committed checkpoints equal the published offsets.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

fn line(i: usize) -> String {
    format!("steady-{i:06} payload {}", "x".repeat(i % 17))
}

#[test]
fn sigterm_during_steady_writes_commits_exactly_what_was_published() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let p = logs.path("app.log");
    logs.append("app.log", &[]);
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let stream = src.stream();
    let mut agent = Agent::new(&redis.url()).source(src);
    agent.run();

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, written, p) = (stop.clone(), written.clone(), p.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                // Ten lines per write; time passing between writes is the subject here.
                let mut buf = String::new();
                for _ in 0..10 {
                    buf.push_str(&line(i));
                    buf.push('\n');
                    i += 1;
                }
                f.write_all(buf.as_bytes()).unwrap();
                written.store(i, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    wait_until("300 lines published while writing", || {
        redis.xlen(&stream) >= 300
    });
    let status = agent.stop();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert!(
        status.success(),
        "exit status {status:?}; stderr:\n{}",
        agent.stderr()
    );

    let total = written.load(Ordering::SeqCst);
    let entries = redis.xrange(&stream);
    let n = entries.len();
    assert!(n >= 300 && n <= total, "{n} entries, {total} written");
    // Exactly the first n lines, each once, in order, with their offsets.
    let mut off = 0u64;
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.message(), line(i), "entry {i}");
        assert_eq!(e.offset(), off, "log.offset of entry {i}");
        off += line(i).len() as u64 + 1;
    }
    let last = entries.last().unwrap();
    let published_end = last.offset() + last.message().len() as u64 + 1;
    let cp = agent.checkpoint_of(&p);
    assert_eq!(
        cp["offset"], published_end,
        "checkpoint vs last published line: {cp:#}"
    );
    // The Redis-side mark agrees too (`gen:offset`).
    let marks: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{{{stream}}}:redtail:marks:testhost"))
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(marks.len(), 1, "{marks:?}");
    let mark = marks.values().next().unwrap();
    assert_eq!(
        mark.rsplit(':').next().unwrap(),
        published_end.to_string(),
        "mark {mark}"
    );

    // A restart publishes the rest, nothing twice.
    agent.run();
    wait_until(&format!("all {total} lines in Redis"), || {
        redis.xlen(&stream) >= total
    });
    assert!(agent.stop().success());
    let msgs = redis.xrange_messages(&stream);
    let expected: Vec<String> = (0..total).map(line).collect();
    assert_eq!(msgs, expected);
}

#[test]
fn sigterm_while_idle_exits_zero_and_commits() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    logs.append("app.log", &["only"]);
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let stream = src.stream();
    let mut agent = Agent::new(&redis.url()).source(src);
    // A long commit interval: only the shutdown commit can write the checkpoint.
    agent = agent.agent_kv("commit_interval", "\"1h\"");
    agent.run();
    wait_until("the line published", || redis.xlen(&stream) == 1);
    let st = agent.stop();
    assert!(st.success(), "{st:?}; stderr:\n{}", agent.stderr());
    assert_eq!(agent.checkpoint_of(&logs.path("app.log"))["offset"], 5);
}

#[test]
fn a_panicking_parse_worker_stops_the_agent_non_zero_and_nothing_from_its_batch_on_is_kept() {
    let redis = RedisServer::start();
    let logs = LogDir::new();
    let p = logs.path("app.log");
    logs.append("app.log", &["a1", "a2"]);
    let src = SourceCfg::new("app", &[&logs.path("*.log")]).parser("raw");
    let stream = src.stream();
    let mut agent = Agent::new(&redis.url()).source(src);
    agent.write_config();
    let err_path = agent.dir.path().join("panic.stderr");
    let mut child = std::process::Command::new(BIN)
        .args(["run", "-c", agent.cfg()])
        .env("RUST_LOG", "info")
        // The test hook (see pipeline::Worker): a worker panics on a record containing this.
        .env("REDTAIL_TEST_HOOK_PANIC_ON", "BOOM")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    wait_until("a1 a2 published", || redis.xlen(&stream) == 2);
    agent.wait_checkpoint(&p, 6);
    logs.append("app.log", &["BOOM 3", "a4"]);
    // Promptly, and not with success.
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the agent hangs after a worker panic; stderr:\n{}",
                std::fs::read_to_string(&err_path).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert!(!status.success(), "{status:?}; stderr:\n{err}");
    assert!(
        err.lines().any(|l| l.contains("ERROR")
            && l.contains("panicked on bytes 6..16 of")
            && l.contains(p.to_str().unwrap())),
        "{err}"
    );
    // Nothing of the batch (nor after it) was published or checkpointed.
    assert_eq!(redis.xrange_messages(&stream), ["a1", "a2"]);
    assert_eq!(agent.checkpoint_of(&p)["offset"], 6);
    // Without the fault, a restart reads the batch again: everything once, in order.
    agent.run();
    wait_until("all 4 lines", || redis.xlen(&stream) >= 4);
    assert!(agent.stop().success());
    assert_eq!(redis.xrange_messages(&stream), ["a1", "a2", "BOOM 3", "a4"]);
}
