//! Support for the integration tests: a private `redis-server` per test, the real
//! `redtail` binary run as a child, log-file helpers and a polling `wait_until`.
//!
//! No mocks: every test starts its own Redis on a free loopback port (never 6379) and runs
//! the binary built by Cargo (`CARGO_BIN_EXE_redtail`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_redtail");
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";
pub const DEFAULT_WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// waiting

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`wait_until_for`] with the default 20 s deadline.
pub fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    wait_until_for(DEFAULT_WAIT, what, cond)
}

// ---------------------------------------------------------------------------------------
// Redis

/// One stream entry: its id and its fields in order (values lossily decoded as UTF-8).
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub fields: Vec<(String, String)>,
}

impl Entry {
    pub fn get(&self, k: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(f, _)| f == k)
            .map(|(_, v)| v.as_str())
    }
    pub fn message(&self) -> &str {
        self.get("message").expect("entry without a message field")
    }
    pub fn path(&self) -> &str {
        self.get("log.file.path")
            .expect("entry without log.file.path")
    }
    pub fn offset(&self) -> u64 {
        self.get("log.offset")
            .expect("entry without log.offset")
            .parse()
            .expect("log.offset is not a number")
    }
}

/// A private redis-server on a free loopback port, killed (SIGKILL) on drop.
pub struct RedisServer {
    pub port: u16,
    dir: TempDir,
    aof: bool,
    /// Extra redis-server arguments (e.g. `--rename-command CLIENT ""`).
    extra: Vec<String>,
    child: Option<Child>,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let p = l.local_addr().unwrap().port();
    drop(l);
    assert_ne!(p, 6379, "never use the shared server's port");
    p
}

impl RedisServer {
    /// No persistence at all.
    pub fn start() -> Self {
        Self::start_opts(false)
    }

    /// With `--appendonly yes --appendfsync always`, so a restart keeps everything acknowledged.
    pub fn start_with_aof() -> Self {
        Self::start_opts(true)
    }

    /// No persistence, with extra redis-server arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_opts_with(false, extra)
    }

    fn start_opts(aof: bool) -> Self {
        Self::start_opts_with(aof, &[])
    }

    fn start_opts_with(aof: bool, extra: &[&str]) -> Self {
        // Another process may grab the port between our probe and redis' bind: retry.
        let mut last = String::new();
        for _ in 0..5 {
            let mut s = RedisServer {
                port: free_port(),
                dir: tempfile::Builder::new()
                    .prefix("redtail-redis-")
                    .tempdir()
                    .expect("tempdir for redis"),
                aof,
                extra: extra.iter().map(|a| a.to_string()).collect(),
                child: None,
            };
            match s.spawn_and_wait() {
                Ok(()) => return s,
                Err(e) => last = e,
            }
        }
        panic!("redis-server could not be started (5 attempts): {last}");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(REDIS_SERVER);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .arg("--daemonize")
            .arg("no");
        if self.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        cmd.args(&self.extra);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {REDIS_SERVER}: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited with {st}; log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            if self.ping() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "redis-server on port {} did not answer PING within 10 s; log:\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        let Ok(c) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut con) = c.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        redis::cmd("PING").query::<String>(&mut con).is_ok()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to redis on {}: {e}", self.port))
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("redis is not running").id() as i32)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kill and start again on the same port (data survives only with AOF).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!("redis-server could not be restarted on {}: {e}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn pause(&self) {
        kill(self.pid(), Signal::SIGSTOP).expect("SIGSTOP redis");
    }

    pub fn resume(&self) {
        kill(self.pid(), Signal::SIGCONT).expect("SIGCONT redis");
    }

    pub fn xrange(&self, stream: &str) -> Vec<Entry> {
        let raw: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query(&mut self.conn())
            .expect("XRANGE");
        raw.into_iter()
            .map(|(id, kv)| Entry {
                id,
                fields: kv
                    .chunks(2)
                    .map(|p| {
                        (
                            String::from_utf8_lossy(&p[0]).into_owned(),
                            String::from_utf8_lossy(&p[1]).into_owned(),
                        )
                    })
                    .collect(),
            })
            .collect()
    }

    /// `message` of every entry, in stream order.
    pub fn xrange_messages(&self, stream: &str) -> Vec<String> {
        self.xrange(stream)
            .iter()
            .map(|e| e.message().to_string())
            .collect()
    }

    /// `message` of the entries read from `path`, in stream order.
    pub fn messages_from(&self, stream: &str, path: &Path) -> Vec<String> {
        let p = path.to_str().unwrap();
        self.xrange(stream)
            .iter()
            .filter(|e| e.path() == p)
            .map(|e| e.message().to_string())
            .collect()
    }

    /// `used_memory` from INFO memory.
    pub fn used_memory(&self) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query(&mut self.conn())
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("used_memory in INFO")
    }

    /// CONFIG SET, panicking on failure.
    pub fn config_set(&self, key: &str, value: &str) {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(key)
            .arg(value)
            .query(&mut self.conn())
            .unwrap_or_else(|e| panic!("CONFIG SET {key} {value}: {e}"));
    }

    /// Calls of one command since start, from INFO commandstats (0 when never called).
    pub fn command_calls(&self, name: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.conn())
            .unwrap();
        let key = format!("cmdstat_{}:calls=", name.to_lowercase());
        info.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    pub fn xlen(&self, stream: &str) -> usize {
        redis::cmd("XLEN")
            .arg(stream)
            .query(&mut self.conn())
            .expect("XLEN")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!(
                "--- redis-server :{} log (last lines) ---\n{}",
                self.port,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------
// the agent

/// One `[[source]]` table.
#[derive(Debug, Clone)]
pub struct SourceCfg {
    pub name: String,
    lines: Vec<String>,
}

impl SourceCfg {
    /// `paths` are absolute globs.
    pub fn new(name: &str, paths: &[&Path]) -> Self {
        let paths: Vec<String> = paths
            .iter()
            .map(|p| toml_str(p.to_str().unwrap()))
            .collect();
        SourceCfg {
            name: name.to_string(),
            lines: vec![
                format!("name = {}", toml_str(name)),
                format!("paths = [{}]", paths.join(", ")),
            ],
        }
    }

    /// Adds `key = value`, `value` being TOML as written (`"\"end\""`, `"{ a = \"b\" }"`).
    pub fn kv(mut self, key: &str, value: &str) -> Self {
        self.lines.push(format!("{key} = {value}"));
        self
    }

    pub fn parser(self, p: &str) -> Self {
        self.kv("parser", &toml_str(p))
    }

    pub fn stream(&self) -> String {
        format!("logs:{}", self.name)
    }

    fn toml(&self) -> String {
        format!("[[source]]\n{}\n", self.lines.join("\n"))
    }
}

/// A TOML basic string literal.
pub fn toml_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A config in its own tempdir (with `state/`) and, once started, the `redtail run` child.
pub struct Agent {
    pub dir: TempDir,
    pub cfg_path: PathBuf,
    agent: BTreeMap<String, String>,
    redis: BTreeMap<String, String>,
    sources: Vec<SourceCfg>,
    child: Option<Child>,
    runs: u32,
}

impl Agent {
    /// Test-friendly defaults: fast discovery, polling, commits; `host_name = "testhost"`.
    pub fn new(redis_url: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("redtail-agent-")
            .tempdir()
            .expect("tempdir for the agent");
        let state = dir.path().join("state");
        let mut agent = BTreeMap::new();
        for (k, v) in [
            ("state_dir", toml_str(state.to_str().unwrap())),
            ("glob_interval", toml_str("100ms")),
            ("poll_interval", toml_str("50ms")),
            ("rotate_wait", toml_str("500ms")),
            ("commit_interval", toml_str("200ms")),
            ("shutdown_timeout", toml_str("10s")),
            ("host_name", toml_str("testhost")),
        ] {
            agent.insert(k.to_string(), v);
        }
        let mut redis = BTreeMap::new();
        redis.insert("url".to_string(), toml_str(redis_url));
        let cfg_path = dir.path().join("redtail.toml");
        Agent {
            dir,
            cfg_path,
            agent,
            redis,
            sources: Vec::new(),
            child: None,
            runs: 0,
        }
    }

    pub fn source(mut self, s: SourceCfg) -> Self {
        self.sources.push(s);
        self
    }

    /// Sets (or replaces) an `[agent]` key; `value` is TOML as written.
    pub fn agent_kv(mut self, key: &str, value: &str) -> Self {
        self.agent.insert(key.to_string(), value.to_string());
        self
    }

    /// Sets (or replaces) a `[redis]` key; `value` is TOML as written.
    pub fn redis_kv(mut self, key: &str, value: &str) -> Self {
        self.redis.insert(key.to_string(), value.to_string());
        self
    }

    /// Replaces the source named `name` (e.g. to change its parser) and rewrites the config.
    pub fn replace_source(&mut self, s: SourceCfg) {
        let i = self
            .sources
            .iter()
            .position(|x| x.name == s.name)
            .expect("no such source");
        self.sources[i] = s;
        self.write_config();
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn dead_letter_path(&self) -> PathBuf {
        self.state_dir().join("dead-letter.jsonl")
    }

    pub fn config_text(&self) -> String {
        let mut t = String::from("[agent]\n");
        for (k, v) in &self.agent {
            t.push_str(&format!("{k} = {v}\n"));
        }
        t.push_str("\n[redis]\n");
        for (k, v) in &self.redis {
            t.push_str(&format!("{k} = {v}\n"));
        }
        for s in &self.sources {
            t.push('\n');
            t.push_str(&s.toml());
        }
        t
    }

    pub fn write_config(&self) {
        fs::write(&self.cfg_path, self.config_text()).expect("write config");
    }

    fn stderr_path(&self, run: u32) -> PathBuf {
        self.dir.path().join(format!("run-{run}.stderr"))
    }

    /// Starts `redtail run -c cfg`; stderr goes to a file shown if the test fails.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        self.write_config();
        self.runs += 1;
        let err = File::create(self.stderr_path(self.runs)).unwrap();
        let child = Command::new(BIN)
            .arg("run")
            .arg("-c")
            .arg(&self.cfg_path)
            .env("RUST_LOG", "info,redtail=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn redtail run");
        self.child = Some(child);
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("agent not running").id() as i32)
    }

    /// SIGTERM, then wait up to 20 s for the exit; returns its status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("agent not running");
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "redtail run did not exit within 20 s of SIGTERM; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// stderr of the latest `run`.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.stderr_path(self.runs)).unwrap_or_default()
    }

    /// Runs `redtail <args…>` (the config is written first; add `-c` yourself via `cfg()`).
    pub fn cmd(&self, args: &[&str]) -> Output {
        self.write_config();
        Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redtail")
    }

    pub fn cfg(&self) -> &str {
        self.cfg_path.to_str().unwrap()
    }

    /// `redtail backfill -c cfg [extra…]`.
    pub fn backfill(&self, extra: &[&str]) -> Output {
        let mut a = vec!["backfill", "-c", self.cfg(), "--no-progress"];
        a.extend_from_slice(extra);
        self.cmd(&a)
    }

    /// `redtail checkpoints -c cfg --json`, parsed (panics unless it exits 0).
    pub fn checkpoints_json(&self) -> Vec<serde_json::Value> {
        let out = self.cmd(&["checkpoints", "-c", self.cfg(), "--json"]);
        assert!(out.status.success(), "checkpoints failed: {}", show(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("checkpoints --json is not JSON ({e}): {}", show(&out)))
    }

    /// Like [`Agent::checkpoints_json`], but `None` while the command fails (e.g. before
    /// the running agent's first snapshot export).
    pub fn try_checkpoints_json(&self) -> Option<Vec<serde_json::Value>> {
        let out = self.cmd(&["checkpoints", "-c", self.cfg(), "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until the checkpoint of `path` has `offset`.
    pub fn wait_checkpoint(&self, path: &Path, offset: u64) {
        let p = path.to_str().unwrap();
        wait_until(&format!("checkpoint of {p} at offset {offset}"), || {
            self.try_checkpoints_json()
                .is_some_and(|all| all.iter().any(|c| c["path"] == p && c["offset"] == offset))
        });
    }

    /// The checkpoint of `path` (panics if there is none or several).
    pub fn checkpoint_of(&self, path: &Path) -> serde_json::Value {
        let all = self.checkpoints_json();
        let p = path.to_str().unwrap();
        let mine: Vec<_> = all.iter().filter(|c| c["path"] == p).cloned().collect();
        assert_eq!(mine.len(), 1, "checkpoints for {p}: {all:#?}");
        mine.into_iter().next().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let err = self.stderr();
            let tail: Vec<&str> = err.lines().rev().take(60).collect();
            eprintln!(
                "--- redtail run #{} stderr (last lines) ---\n{}\n--- config ---\n{}",
                self.runs,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                self.config_text()
            );
        }
        self.kill9();
    }
}

/// Exit status, stdout and stderr of a finished command, for assertion messages.
pub fn show(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

// ---------------------------------------------------------------------------------------
// log files

/// A tempdir holding the log files of one test.
pub struct LogDir {
    pub dir: TempDir,
}

impl LogDir {
    pub fn new() -> Self {
        LogDir {
            dir: tempfile::Builder::new()
                .prefix("redtail-logs-")
                .tempdir()
                .expect("tempdir for logs"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Appends each line plus `\n` in one write.
    pub fn append(&self, name: &str, lines: &[&str]) {
        let mut s = String::new();
        for l in lines {
            s.push_str(l);
            s.push('\n');
        }
        self.append_bytes(name, s.as_bytes());
    }

    /// Appends text without a trailing newline.
    /// Appends many lines, in chunks of 5,000 per write.
    pub fn append_all(&self, name: &str, lines: &[String]) {
        let refs: Vec<&str> = lines.iter().map(|s| s.as_str()).collect();
        for chunk in refs.chunks(5_000) {
            self.append(name, chunk);
        }
    }

    pub fn append_partial(&self, name: &str, text: &str) {
        self.append_bytes(name, text.as_bytes());
    }

    pub fn append_bytes(&self, name: &str, b: &[u8]) {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(name))
            .unwrap_or_else(|e| panic!("open {name}: {e}"));
        f.write_all(b).unwrap();
        f.flush().unwrap();
    }

    pub fn rename(&self, from: &str, to: &str) {
        fs::rename(self.path(from), self.path(to)).unwrap();
    }

    /// Truncates to zero length in place (same inode).
    pub fn truncate(&self, name: &str) {
        OpenOptions::new()
            .write(true)
            .open(self.path(name))
            .unwrap()
            .set_len(0)
            .unwrap();
    }

    /// copytruncate as logrotate does it: copy to `to`, then truncate `name` in place.
    pub fn copytruncate(&self, name: &str, to: &str) {
        fs::copy(self.path(name), self.path(to)).unwrap();
        self.truncate(name);
    }

    pub fn remove(&self, name: &str) {
        fs::remove_file(self.path(name)).unwrap();
    }

    /// Creates (or re-points) symlink `link` → `target` atomically (via a rename).
    pub fn symlink(&self, target: &Path, link: &str) {
        let tmp = self.path(&format!("{link}.tmp-link"));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).unwrap();
        fs::rename(&tmp, self.path(link)).unwrap();
    }

    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        fs::create_dir_all(&p).unwrap();
        p
    }
}

/// `prefix-0`, `prefix-1`, … as owned strings.
pub fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i}")).collect()
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Deletes `path` and puts a new file with `content` there that has the deleted file's inode
/// number (ext4 and tmpfs hand a just-freed inode out again). Creates up to 64 candidates in
/// the same directory and keeps the one that got the inode. False when none did (another
/// process on the filesystem took it first): then `path` holds `content` under another
/// inode, and the caller must retry its scenario or fail, never pass without the reuse.
/// Sleeps a little first so the birth times differ (timestamps have a coarse clock tick).
pub fn recreate_reusing_inode(path: &Path, content: &[u8]) -> bool {
    use std::os::unix::fs::MetadataExt;
    let old = fs::metadata(path).unwrap().ino();
    fs::remove_file(path).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let dir = path.parent().unwrap();
    let mut made = Vec::new();
    let mut hit = None;
    for i in 0..64 {
        let c = dir.join(format!(".reuse-{i}"));
        fs::write(&c, b"").unwrap();
        if fs::metadata(&c).unwrap().ino() == old {
            hit = Some(c);
            break;
        }
        made.push(c);
    }
    let got: Vec<u64> = made
        .iter()
        .filter_map(|c| fs::metadata(c).ok())
        .map(|m| m.ino())
        .collect();
    for c in &made {
        fs::remove_file(c).unwrap();
    }
    let Some(c) = hit else {
        eprintln!(
            "inode {old} was not reused after {} creations: {got:?}",
            got.len()
        );
        fs::write(path, content).unwrap();
        return false;
    };
    fs::write(&c, content).unwrap();
    fs::rename(&c, path).unwrap();
    assert_eq!(fs::metadata(path).unwrap().ino(), old, "inode reused");
    true
}

/// `n` lines of about 100 bytes, numbered, so that order and duplicates show.
pub fn numbered_lines(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix} {i:07} {}", "x".repeat(80)))
        .collect()
}
