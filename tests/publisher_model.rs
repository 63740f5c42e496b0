//! The publisher against random interleavings of what Redis does to it (issue #8): lost
//! replies (Redis paused past `response_timeout`, so a pipeline runs after the agent gave up
//! on it), transactions refused for memory with two pipelines in flight, Redis restarts with
//! and without persistence, and kill -9 of the agent, while two files are written and rotated.
//! Real binary, real redis-server. Checked against the model of what the stream must hold:
//! with persistence, every line of every file exactly once, in file order. (A variant
//! without persistence is not in the suite yet: its quiescence check misfires when a file
//! resumes at its Redis mark with nothing new to read, whose checkpoint then stays behind.)
//!
//! Each case prints its seed; `REDTAIL_SEED=n` replays one, `REDTAIL_CASES=n` runs more.

mod common;

use std::time::Duration;

use common::*;

/// xorshift64*, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("REDTAIL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![s];
    }
    let n: u64 = std::env::var("REDTAIL_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    (0..n).map(|i| (base ^ (i * 0x9e37_79b9)) | 1).collect()
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Write {
        file: usize,
        lines: u64,
    },
    Rotate {
        file: usize,
    },
    /// SIGSTOP past the response timeout, then SIGCONT.
    Pause {
        ms: u64,
    },
    /// maxmemory just above what is used, for a while.
    Oom {
        ms: u64,
    },
    Kill9,
    RestartRedis,
}

fn step(rng: &mut Rng) -> Step {
    match rng.below(100) {
        0..=44 => Step::Write {
            file: rng.below(2) as usize,
            lines: 1 + rng.below(6000),
        },
        45..=54 => Step::Rotate {
            file: rng.below(2) as usize,
        },
        55..=69 => Step::Pause {
            ms: 400 + rng.below(800),
        },
        70..=79 => Step::Oom {
            ms: 200 + rng.below(800),
        },
        80..=89 => Step::Kill9,
        _ => Step::RestartRedis,
    }
}

/// Runs one case; returns each file's written lines and the agent's stderr of all runs.
fn run_case(seed: u64, persistent: bool) -> (RedisServer, Vec<Vec<String>>, String, String) {
    eprintln!("REDTAIL_SEED={seed} persistent={persistent}");
    let mut rng = Rng(seed);
    let mut redis = if persistent {
        RedisServer::start_with_aof()
    } else {
        RedisServer::start()
    };
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query(&mut redis.conn())
        .unwrap();
    let logs = LogDir::new();
    let names = ["a", "b"];
    // The globs match the rotated names too (fine with rename rotation): a file renamed
    // while the agent is down before its first checkpoint is then still found. (With globs
    // that do not match them, such a file is out of reach: see the README.)
    let src = SourceCfg::new("app", &[&logs.path("a.log*"), &logs.path("b.log*")]);
    let stream = src.stream();
    let mut agent = Agent::new(&redis.url())
        .source(src)
        .redis_kv("response_timeout", "\"300ms\"")
        .redis_kv("connect_timeout", "\"300ms\"")
        .redis_kv("retry_max_backoff", "\"200ms\"");
    let mut written: Vec<Vec<String>> = vec![Vec::new(), Vec::new()];
    let mut rotations = [0u32; 2];
    let mut stderr = String::new();
    agent.run();
    let steps = 8 + rng.below(8);
    for _ in 0..steps {
        let s = step(&mut rng);
        eprintln!("step {s:?}");
        match s {
            Step::Write { file, lines } => {
                let base = written[file].len();
                let new: Vec<String> = (0..lines)
                    .map(|i| format!("{}-{:07} {}", names[file], base as u64 + i, "y".repeat(60)))
                    .collect();
                let refs: Vec<&str> = new.iter().map(|s| s.as_str()).collect();
                logs.append(&format!("{}.log", names[file]), &refs);
                written[file].extend(new);
            }
            Step::Rotate { file } => {
                let from = format!("{}.log", names[file]);
                if logs.path(&from).exists() {
                    rotations[file] += 1;
                    logs.rename(&from, &format!("{}.log.{}", names[file], rotations[file]));
                }
            }
            Step::Pause { ms } => {
                redis.pause();
                std::thread::sleep(Duration::from_millis(ms));
                redis.resume();
            }
            Step::Oom { ms } => {
                redis.config_set("maxmemory", &(redis.used_memory() + 500_000).to_string());
                std::thread::sleep(Duration::from_millis(ms));
                redis.config_set("maxmemory", &(0).to_string());
            }
            Step::Kill9 => {
                agent.kill9();
                stderr.push_str(&agent.stderr());
                agent.run();
            }
            Step::RestartRedis => {
                redis.restart();
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory-policy")
                    .arg("noeviction")
                    .query(&mut redis.conn())
                    .unwrap();
            }
        }
        // Let the agent get some of it done, or not: fault timing is the point.
        std::thread::sleep(Duration::from_millis(rng.below(300)));
    }
    redis.config_set("maxmemory", &(0).to_string());
    // Quiet: wait until every file on disk is checkpointed at its end (a loss without
    // persistence is not republished, so the stream alone cannot say when it is over). By
    // inode: a rotated file drained with nothing new keeps its old path in the store.
    use std::os::unix::fs::MetadataExt;
    let files: Vec<(u64, u64)> = std::fs::read_dir(logs.path(""))
        .unwrap()
        .map(|e| std::fs::metadata(e.unwrap().path()).unwrap())
        .map(|m| (m.ino(), m.len()))
        .filter(|(_, len)| *len > 0)
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let all = agent.try_checkpoints_json().unwrap_or_default();
        // A file resumed at its Redis mark with nothing new to read keeps an older
        // checkpoint: its mark at the end says the same.
        let marks: Vec<String> = redis::cmd("HVALS")
            .arg(format!("{{{stream}}}:redtail:marks:testhost"))
            .query(&mut redis.conn())
            .unwrap_or_default();
        let at_end = files.iter().all(|(ino, len)| {
            all.iter()
                .any(|c| c["inode"] == *ino && c["offset"] == *len)
                || marks.iter().any(|m| m.ends_with(&format!(":{len}")))
        });
        if at_end {
            break;
        }
        if std::time::Instant::now() > deadline {
            panic!("seed {seed}: files (inode, size) {files:?} not all checkpointed at their end: {all:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(agent.stop().code(), Some(0), "{}", agent.stderr());
    stderr.push_str(&agent.stderr());
    (redis, written, stream, stderr)
}

fn per_file(msgs: &[String], name: &str) -> Vec<String> {
    let p = format!("{name}-");
    msgs.iter().filter(|m| m.starts_with(&p)).cloned().collect()
}

#[test]
fn with_persistence_every_line_exactly_once_in_order() {
    for seed in seeds() {
        let (redis, written, stream, stderr) = run_case(seed, true);
        let msgs = redis.xrange_messages(&stream);
        for (i, name) in ["a", "b"].iter().enumerate() {
            let got = per_file(&msgs, name);
            if got != written[i] {
                let dup = got.len() as i64 - written[i].len() as i64;
                panic!(
                    "seed {seed}: file {name}: {} lines in the stream, {} written ({dup:+}); first difference at {:?}\n{stderr}",
                    got.len(),
                    written[i].len(),
                    got.iter().zip(&written[i]).position(|(a, b)| a != b)
                );
            }
        }
        assert!(
            !stderr.contains("Redis lost"),
            "seed {seed}: a loss was reported with appendfsync always:\n{stderr}"
        );
    }
}
