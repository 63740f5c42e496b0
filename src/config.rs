//! Configuration: the TOML as written (`Raw*`, `deny_unknown_fields`) and the validated,
//! typed [`Config`] every command works from.
//!
//! Two layers so that `validate`, `run`, `backfill` and `parse` cannot disagree about what a
//! file means, and so that every problem in a file is reported in one go, each with the file,
//! line and key it concerns.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use redtail_parsers::ParserSpec;
use regex::Regex;
use serde::Deserialize;
use toml::Spanned;

/// Compressed rotated files are never followed unless a source's `exclude` says otherwise:
/// reading them as text yields garbage lines (a classic complaint against glob-based tailers).
pub const DEFAULT_EXCLUDES: &[&str] = &["*.gz", "*.bz2", "*.xz", "*.zst", "*.zip", "*.lz4"];

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    redis: RawRedis,
    #[serde(default)]
    source: Vec<RawSource>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    state_dir: Option<Spanned<String>>,
    dead_letter: Option<Spanned<String>>,
    dead_letter_max_bytes: Option<Spanned<toml::Value>>,
    dead_letter_keep: Option<Spanned<u32>>,
    dead_letter_line_cap: Option<Spanned<toml::Value>>,
    host_name: Option<Spanned<String>>,
    workers: Option<Spanned<u32>>,
    glob_interval: Option<Spanned<String>>,
    poll_interval: Option<Spanned<String>>,
    rotate_wait: Option<Spanned<String>>,
    partial_line_timeout: Option<Spanned<String>>,
    max_line_bytes: Option<Spanned<toml::Value>>,
    max_open_files: Option<Spanned<u32>>,
    checkpoint_retention: Option<Spanned<String>>,
    commit_interval: Option<Spanned<String>>,
    shutdown_timeout: Option<Spanned<String>>,
    read_chunk_bytes: Option<Spanned<toml::Value>>,
    log_level: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Option<Spanned<String>>,
    maxlen: Option<Spanned<u64>>,
    batch_max_entries: Option<Spanned<u32>>,
    batch_max_bytes: Option<Spanned<toml::Value>>,
    wait_replicas: Option<Spanned<u32>>,
    wait_timeout: Option<Spanned<String>>,
    retry_max_backoff: Option<Spanned<String>>,
    retry_limit: Option<Spanned<u32>>,
    connect_timeout: Option<Spanned<String>>,
    response_timeout: Option<Spanned<String>>,
    metadata: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: Spanned<String>,
    paths: Spanned<Vec<String>>,
    #[serde(default)]
    exclude: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    parser: Option<Spanned<String>>,
    #[serde(default)]
    pattern: Option<Spanned<String>>,
    stream: Option<Spanned<String>>,
    #[serde(default)]
    start_at: Option<Spanned<String>>,
    #[serde(default)]
    fields: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    drop: Option<Spanned<String>>,
    #[serde(default)]
    timestamp: Option<Spanned<bool>>,
    #[serde(default)]
    invalid_utf8: Option<Spanned<String>>,
    #[serde(default)]
    multiline: Option<Spanned<RawMultiline>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMultiline {
    start: Option<String>,
    continuation: Option<String>,
    max_lines: Option<u32>,
    max_bytes: Option<toml::Value>,
    timeout: Option<String>,
}

/// Where a file with no checkpoint starts, when it is present at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// Read the whole file.
    Beginning,
    /// Skip what is there now; follow what is appended.
    End,
}

/// What to do with a line that is not valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidUtf8 {
    /// Send it to the dead-letter file, class `encoding` (default).
    DeadLetter,
    /// Replace invalid sequences with U+FFFD and parse what results.
    Replace,
}

/// Multiline aggregation for one source.
#[derive(Debug, Clone)]
pub struct Multiline {
    /// A line matching this starts a new record; others continue the current one.
    pub start: Option<regex::bytes::Regex>,
    /// A line matching this continues the current record; others start a new one.
    pub continuation: Option<regex::bytes::Regex>,
    /// A record never has more lines than this.
    pub max_lines: u32,
    /// A record never has more bytes than this.
    pub max_bytes: usize,
    /// A pending record is released after this long without a new line.
    pub timeout: Duration,
}

/// One `[[source]]`.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub paths: Vec<String>,
    pub exclude: Vec<glob::Pattern>,
    pub parser: ParserSpec,
    pub stream: String,
    pub start_at: StartAt,
    pub fields: Vec<(String, String)>,
    pub drop: Option<Regex>,
    pub timestamp: bool,
    pub invalid_utf8: InvalidUtf8,
    pub multiline: Option<Multiline>,
}

/// Agent-wide settings.
#[derive(Debug, Clone)]
pub struct Agent {
    pub state_dir: PathBuf,
    pub dead_letter: PathBuf,
    pub dead_letter_max_bytes: u64,
    pub dead_letter_keep: u32,
    pub dead_letter_line_cap: usize,
    pub host_name: String,
    pub workers: usize,
    pub glob_interval: Duration,
    pub poll_interval: Duration,
    pub rotate_wait: Duration,
    pub partial_line_timeout: Duration,
    pub max_line_bytes: usize,
    pub max_open_files: usize,
    pub checkpoint_retention: Duration,
    pub commit_interval: Duration,
    pub shutdown_timeout: Duration,
    pub read_chunk_bytes: usize,
    pub log_level: Option<String>,
}

/// Redis connection and batching.
#[derive(Debug, Clone)]
pub struct Redis {
    pub url: String,
    pub maxlen: u64,
    pub batch_max_entries: usize,
    pub batch_max_bytes: usize,
    pub wait_replicas: u32,
    pub wait_timeout: Duration,
    pub retry_max_backoff: Duration,
    /// 0 = retry transient errors forever.
    pub retry_limit: u32,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// Add `log.file.path`, `log.offset`, `host.name`, `log.record.uid` to every entry.
    pub metadata: bool,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub agent: Agent,
    pub redis: Redis,
    pub sources: Vec<Source>,
}

/// Every problem found in a config file, each with its position.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

/// One problem: where, which key, what is wrong.
#[derive(Debug)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{} problem{} in {}:",
            n,
            if n == 1 { "" } else { "s" },
            self.file.display()
        )?;
        for p in &self.problems {
            write!(
                f,
                "\n  {}:{}:{}: {}: {}",
                self.file.display(),
                p.line,
                p.column,
                p.key,
                p.message
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

struct Checker<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn pos(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
        (line, col)
    }

    fn err(&mut self, span: std::ops::Range<usize>, key: &str, message: impl Into<String>) {
        let (line, column) = self.pos(span.start);
        self.problems.push(Problem {
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn duration(&mut self, v: &Option<Spanned<String>>, key: &str, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match humantime::parse_duration(s.get_ref().trim()) {
                Ok(d) => d,
                Err(e) => {
                    self.err(
                        s.span(),
                        key,
                        format!(
                            "invalid duration {:?} ({e}); write e.g. \"250ms\", \"5s\", \"2m\", \"7days\"",
                            s.get_ref()
                        ),
                    );
                    default
                }
            },
        }
    }

    fn size(&mut self, v: &Option<Spanned<toml::Value>>, key: &str, default: u64) -> u64 {
        let Some(s) = v else { return default };
        let parsed = match s.get_ref() {
            toml::Value::Integer(i) if *i >= 0 => Some(*i as u64),
            toml::Value::String(t) => parse_size(t),
            _ => None,
        };
        match parsed {
            Some(n) => n,
            None => {
                self.err(
                    s.span(),
                    key,
                    "invalid size; write a number of bytes or e.g. \"512KiB\", \"4MiB\", \"1GiB\"",
                );
                default
            }
        }
    }
}

/// Parses "4MiB", "512k", "1 GB", "1000". Binary and decimal units both mean powers of 1024,
/// as log-host operators expect from `ls -h`.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn default_host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Marks key for a stream: shares the stream's hash slot so one Lua script may touch both
/// on Redis Cluster. A stream name that already has a hash tag keeps it.
pub fn marks_key(stream: &str) -> String {
    let has_tag = stream
        .find('{')
        .and_then(|open| stream[open + 1..].find('}').map(|close| close > 0))
        .unwrap_or(false);
    if has_tag {
        format!("{stream}:redtail:marks")
    } else {
        format!("{{{stream}}}:redtail:marks")
    }
}

/// The marks hash of one agent (its `host_name`) for a stream: `<marks key>:<host>`. Only
/// that agent writes it, so its transactions can WATCH it; two hosts whose files happen to
/// have the same identity (cloned images) cannot skip each other's lines. Marks written by
/// redtail before this key existed are in [`marks_key`] and are adopted once per file.
pub fn host_marks_key(stream: &str, host: &str) -> String {
    format!("{}:{host}", marks_key(stream))
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        Ok(Config::parse(path, &text)?)
    }

    /// Validates config text; `path` is used for messages and to resolve nothing else.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let mut ck = Checker {
            text,
            problems: Vec::new(),
        };
        // serde stops at the first unknown key. To still report every problem in one run,
        // each unknown key's line is blanked (same length, so positions stay true) and the
        // text parsed again.
        let mut work = text.to_string();
        let raw: RawConfig = loop {
            match toml::from_str(&work) {
                Ok(r) => break r,
                Err(e) => {
                    let span = e.span().unwrap_or(0..0);
                    let msg = e.message().trim().to_string();
                    let key = match key_from_message(&msg) {
                        Some(k) => match table_at(&work, span.start) {
                            Some(t) => format!("{t}.{k}"),
                            None => k,
                        },
                        None => "(syntax)".to_string(),
                    };
                    ck.err(span.clone(), &key, msg.clone());
                    let line_start = work[..span.start.min(work.len())]
                        .rfind('\n')
                        .map(|i| i + 1)
                        .unwrap_or(0);
                    let line_end = work[line_start..]
                        .find('\n')
                        .map(|i| line_start + i)
                        .unwrap_or(work.len());
                    if !msg.starts_with("unknown field") || ck.problems.len() > 50 {
                        return Err(ConfigErrors {
                            file: path.to_path_buf(),
                            problems: ck.problems,
                        });
                    }
                    let blank = " ".repeat(line_end - line_start);
                    work.replace_range(line_start..line_end, &blank);
                }
            }
        };
        let a = &raw.agent;
        let state_dir = PathBuf::from(
            a.state_dir
                .as_ref()
                .map(|s| s.get_ref().clone())
                .unwrap_or_else(|| "/var/lib/redtail".into()),
        );
        if let Some(s) = &a.state_dir {
            if s.get_ref().trim().is_empty() {
                ck.err(s.span(), "agent.state_dir", "must not be empty");
            }
        }
        let dead_letter = a
            .dead_letter
            .as_ref()
            .map(|s| PathBuf::from(s.get_ref()))
            .unwrap_or_else(|| state_dir.join("dead-letter.jsonl"));
        let workers = match &a.workers {
            Some(w) if *w.get_ref() > 256 => {
                ck.err(w.span(), "agent.workers", "at most 256 (0 = one per CPU)");
                1
            }
            Some(w) if *w.get_ref() > 0 => *w.get_ref() as usize,
            _ => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        };
        let max_line_bytes = ck.size(&a.max_line_bytes, "agent.max_line_bytes", 1 << 20) as usize;
        if max_line_bytes < 64 {
            if let Some(s) = &a.max_line_bytes {
                ck.err(
                    s.span(),
                    "agent.max_line_bytes",
                    "must be at least 64 bytes",
                );
            }
        }
        let log_level = a.log_level.as_ref().map(|s| s.get_ref().clone());
        if let Some(l) = &a.log_level {
            if tracing_subscriber::EnvFilter::try_new(l.get_ref()).is_err() {
                ck.err(
                    l.span(),
                    "agent.log_level",
                    "not a valid level/filter; use error, warn, info, debug or trace",
                );
            }
        }
        let agent = Agent {
            dead_letter,
            dead_letter_max_bytes: ck.size(
                &a.dead_letter_max_bytes,
                "agent.dead_letter_max_bytes",
                64 << 20,
            ),
            dead_letter_keep: a
                .dead_letter_keep
                .as_ref()
                .map(|v| *v.get_ref())
                .unwrap_or(5),
            dead_letter_line_cap: ck.size(
                &a.dead_letter_line_cap,
                "agent.dead_letter_line_cap",
                16 << 20,
            ) as usize,
            host_name: a
                .host_name
                .as_ref()
                .map(|s| s.get_ref().clone())
                .unwrap_or_else(default_host_name),
            workers,
            // inotify reports new and renamed files at once; the glob pass is the safety
            // net (lost events, NFS), and with thousands of files it is the main idle cost.
            glob_interval: ck.duration(
                &a.glob_interval,
                "agent.glob_interval",
                Duration::from_secs(5),
            ),
            poll_interval: ck.duration(
                &a.poll_interval,
                "agent.poll_interval",
                Duration::from_millis(250),
            ),
            rotate_wait: ck.duration(&a.rotate_wait, "agent.rotate_wait", Duration::from_secs(5)),
            partial_line_timeout: ck.duration(
                &a.partial_line_timeout,
                "agent.partial_line_timeout",
                Duration::from_secs(0),
            ),
            max_line_bytes,
            max_open_files: a
                .max_open_files
                .as_ref()
                .map(|v| *v.get_ref() as usize)
                .unwrap_or(1024)
                .max(1),
            checkpoint_retention: ck.duration(
                &a.checkpoint_retention,
                "agent.checkpoint_retention",
                Duration::from_secs(7 * 24 * 3600),
            ),
            commit_interval: ck.duration(
                &a.commit_interval,
                "agent.commit_interval",
                Duration::from_secs(1),
            ),
            shutdown_timeout: ck.duration(
                &a.shutdown_timeout,
                "agent.shutdown_timeout",
                Duration::from_secs(30),
            ),
            read_chunk_bytes: (ck.size(&a.read_chunk_bytes, "agent.read_chunk_bytes", 256 << 10)
                as usize)
                .clamp(4096, 64 << 20),
            state_dir,
            log_level,
        };
        if agent.dead_letter_line_cap < agent.max_line_bytes {
            if let Some(s) = &a.dead_letter_line_cap {
                ck.err(
                    s.span(),
                    "agent.dead_letter_line_cap",
                    "must be at least agent.max_line_bytes",
                );
            }
        }

        let r = &raw.redis;
        let url = r
            .url
            .as_ref()
            .map(|s| s.get_ref().clone())
            .unwrap_or_else(|| "redis://127.0.0.1:6379/0".into());
        if let Some(s) = &r.url {
            if let Err(e) = redis::Client::open(s.get_ref().as_str()) {
                ck.err(
                    s.span(),
                    "redis.url",
                    format!(
                        "invalid Redis URL ({e}); write redis://[user:password@]host:port/db, rediss://… or unix:///path/to/socket"
                    ),
                );
            }
        }
        let redis = Redis {
            url,
            maxlen: r.maxlen.as_ref().map(|v| *v.get_ref()).unwrap_or(0),
            batch_max_entries: r
                .batch_max_entries
                .as_ref()
                .map(|v| *v.get_ref() as usize)
                .unwrap_or(4096)
                .max(1),
            batch_max_bytes: (ck.size(&r.batch_max_bytes, "redis.batch_max_bytes", 8 << 20)
                as usize)
                .max(1024),
            wait_replicas: r.wait_replicas.as_ref().map(|v| *v.get_ref()).unwrap_or(0),
            wait_timeout: ck.duration(
                &r.wait_timeout,
                "redis.wait_timeout",
                Duration::from_secs(1),
            ),
            retry_max_backoff: ck.duration(
                &r.retry_max_backoff,
                "redis.retry_max_backoff",
                Duration::from_secs(5),
            ),
            retry_limit: r.retry_limit.as_ref().map(|v| *v.get_ref()).unwrap_or(0),
            connect_timeout: ck.duration(
                &r.connect_timeout,
                "redis.connect_timeout",
                Duration::from_secs(5),
            ),
            response_timeout: ck.duration(
                &r.response_timeout,
                "redis.response_timeout",
                Duration::from_secs(30),
            ),
            metadata: r.metadata.as_ref().map(|v| *v.get_ref()).unwrap_or(true),
        };

        let mut sources = Vec::new();
        let mut names = HashSet::new();
        for (i, s) in raw.source.iter().enumerate() {
            let k = |field: &str| format!("source[{i}].{field}");
            let name = s.name.get_ref().trim().to_string();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                ck.err(
                    s.name.span(),
                    &k("name"),
                    "must be non-empty and use only letters, digits, '-', '_' and '.'",
                );
            } else if !names.insert(name.clone()) {
                ck.err(
                    s.name.span(),
                    &k("name"),
                    format!("duplicate source name {name:?}; names must be unique"),
                );
            }
            if s.paths.get_ref().is_empty() {
                ck.err(s.paths.span(), &k("paths"), "needs at least one glob");
            }
            for p in s.paths.get_ref() {
                if !Path::new(p).is_absolute() {
                    ck.err(
                        s.paths.span(),
                        &k("paths"),
                        format!("{p:?} is not absolute; the agent's working directory is not a place for logs"),
                    );
                } else if let Err(e) = glob::Pattern::new(p) {
                    ck.err(s.paths.span(), &k("paths"), format!("bad glob {p:?}: {e}"));
                }
            }
            let mut exclude = Vec::new();
            let ex: Vec<String> = match &s.exclude {
                Some(e) => e.get_ref().clone(),
                None => DEFAULT_EXCLUDES.iter().map(|s| s.to_string()).collect(),
            };
            for e in &ex {
                match glob::Pattern::new(e) {
                    Ok(p) => exclude.push(p),
                    Err(err) => {
                        let span = s.exclude.as_ref().map(|x| x.span()).unwrap_or(0..0);
                        ck.err(span, &k("exclude"), format!("bad glob {e:?}: {err}"));
                    }
                }
            }
            let parser_name = s
                .parser
                .as_ref()
                .map(|p| p.get_ref().as_str())
                .unwrap_or("raw");
            let parser = match ParserSpec::from_config(
                parser_name,
                s.pattern.as_ref().map(|p| p.get_ref().as_str()),
            ) {
                Ok(p) => p,
                Err(msg) => {
                    let (span, key) = match (&s.pattern, parser_name) {
                        (Some(p), "regex") => (p.span(), k("pattern")),
                        _ => (
                            s.parser.as_ref().map(|p| p.span()).unwrap_or(s.name.span()),
                            k("parser"),
                        ),
                    };
                    ck.err(span, &key, msg);
                    ParserSpec::Raw
                }
            };
            let stream = match &s.stream {
                Some(st) if st.get_ref().trim().is_empty() => {
                    ck.err(st.span(), &k("stream"), "must not be empty");
                    String::new()
                }
                Some(st) => st.get_ref().clone(),
                None => format!("logs:{name}"),
            };
            let start_at = match s.start_at.as_ref().map(|v| v.get_ref().as_str()) {
                None | Some("beginning") => StartAt::Beginning,
                Some("end") => StartAt::End,
                Some(other) => {
                    ck.err(
                        s.start_at.as_ref().unwrap().span(),
                        &k("start_at"),
                        format!("{other:?} is not valid; use \"beginning\" or \"end\""),
                    );
                    StartAt::Beginning
                }
            };
            let invalid_utf8 = match s.invalid_utf8.as_ref().map(|v| v.get_ref().as_str()) {
                None | Some("dead_letter") => InvalidUtf8::DeadLetter,
                Some("replace") => InvalidUtf8::Replace,
                Some(other) => {
                    ck.err(
                        s.invalid_utf8.as_ref().unwrap().span(),
                        &k("invalid_utf8"),
                        format!("{other:?} is not valid; use \"dead_letter\" or \"replace\""),
                    );
                    InvalidUtf8::DeadLetter
                }
            };
            let drop = s.drop.as_ref().and_then(|d| match Regex::new(d.get_ref()) {
                Ok(r) => Some(r),
                Err(e) => {
                    ck.err(d.span(), &k("drop"), format!("bad regex: {e}"));
                    None
                }
            });
            let multiline = s.multiline.as_ref().and_then(|m| {
                let span = m.span();
                let m = m.get_ref();
                let compile = |ck: &mut Checker, re: &Option<String>, key: &str| {
                    re.as_ref().and_then(|r| match regex::bytes::Regex::new(r) {
                        Ok(r) => Some(r),
                        Err(e) => {
                            ck.err(span.clone(), key, format!("bad regex: {e}"));
                            None
                        }
                    })
                };
                let start = compile(&mut ck, &m.start, &k("multiline.start"));
                let continuation = compile(&mut ck, &m.continuation, &k("multiline.continuation"));
                if m.start.is_some() == m.continuation.is_some() {
                    ck.err(
                        span.clone(),
                        &k("multiline"),
                        "set exactly one of `start` (a line that begins a record) or `continuation` (a line that continues one)",
                    );
                    return None;
                }
                let timeout = match &m.timeout {
                    None => Duration::from_secs(1),
                    Some(t) => match humantime::parse_duration(t) {
                        Ok(d) => d,
                        Err(e) => {
                            ck.err(span.clone(), &k("multiline.timeout"), format!("invalid duration: {e}"));
                            Duration::from_secs(1)
                        }
                    },
                };
                let max_bytes = match &m.max_bytes {
                    None => None,
                    Some(toml::Value::Integer(i)) if *i > 0 => Some(*i as usize),
                    Some(toml::Value::String(t)) => parse_size(t).map(|v| v as usize),
                    Some(_) => None,
                };
                if m.max_bytes.is_some() && max_bytes.is_none() {
                    ck.err(span.clone(), &k("multiline.max_bytes"), "invalid size");
                }
                Some(Multiline {
                    start,
                    continuation,
                    max_lines: m.max_lines.unwrap_or(500).max(1),
                    max_bytes: max_bytes.unwrap_or(max_line_bytes).min(max_line_bytes),
                    timeout,
                })
            });
            sources.push(Source {
                name,
                paths: s.paths.get_ref().clone(),
                exclude,
                parser,
                stream,
                start_at,
                fields: s
                    .fields
                    .as_ref()
                    .map(|f| {
                        f.get_ref()
                            .iter()
                            .map(|(a, b)| (a.clone(), b.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
                drop,
                timestamp: s.timestamp.as_ref().map(|v| *v.get_ref()).unwrap_or(false),
                invalid_utf8,
                multiline,
            });
        }
        if raw.source.is_empty() {
            ck.problems.push(Problem {
                line: 1,
                column: 1,
                key: "source".into(),
                message: "no [[source]] defined; add one with name, paths and stream".into(),
            });
        }
        if ck.problems.is_empty() {
            Ok(Config {
                path: path.to_path_buf(),
                agent,
                redis,
                sources,
            })
        } else {
            Err(ConfigErrors {
                file: path.to_path_buf(),
                problems: ck.problems,
            })
        }
    }

    /// Source by name, with the list of valid names in the error.
    pub fn source(&self, name: &str) -> anyhow::Result<&Source> {
        self.sources.iter().find(|s| s.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.sources.iter().map(|s| s.name.as_str()).collect();
            anyhow::anyhow!(
                "no source named {name:?} in {}; sources: {}",
                self.path.display(),
                names.join(", ")
            )
        })
    }

    /// Warnings that do not stop the agent but usually mean a mistake.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut streams: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for s in &self.sources {
            streams.entry(&s.stream).or_default().push(&s.name);
            for p in &s.paths {
                if p.ends_with('*') {
                    out.push(format!(
                        "source {:?}: glob {p:?} also matches rotated files (e.g. .1); that is fine for rename rotation (they are recognised by identity) but with copytruncate a copy looks like a new file",
                        s.name
                    ));
                }
            }
        }
        for (stream, names) in streams {
            if names.len() > 1 {
                out.push(format!(
                    "sources {} share stream {stream:?}",
                    names.join(", ")
                ));
            }
        }
        out
    }
}

/// The table a byte offset lies in: "agent", "redis", "source[2]" (None at top level).
fn table_at(text: &str, offset: usize) -> Option<String> {
    let mut current = None;
    let mut sources = 0usize;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        if pos > offset {
            break;
        }
        let t = line.trim();
        if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim();
            if name == "source" {
                current = Some(format!("source[{sources}]"));
                sources += 1;
            } else {
                current = Some(name.to_string());
            }
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            current = Some(name.trim().to_string());
        }
        pos += line.len();
    }
    current
}

fn key_from_message(msg: &str) -> Option<String> {
    // toml's messages quote the key in backticks: "unknown field `foo`, expected ...".
    let start = msg.find('`')? + 1;
    let end = msg[start..].find('`')? + start;
    Some(msg[start..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(Path::new("/etc/redtail/test.toml"), text)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(
            r#"
[[source]]
name = "app"
paths = ["/var/log/app/*.log"]
"#,
        )
        .unwrap();
        assert_eq!(c.agent.state_dir, PathBuf::from("/var/lib/redtail"));
        assert_eq!(
            c.agent.dead_letter,
            PathBuf::from("/var/lib/redtail/dead-letter.jsonl")
        );
        assert_eq!(c.sources[0].stream, "logs:app");
        assert_eq!(c.sources[0].start_at, StartAt::Beginning);
        assert_eq!(c.redis.url, "redis://127.0.0.1:6379/0");
        assert_eq!(c.agent.max_line_bytes, 1 << 20);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = parse("[agent]\nstate_dir = \"/tmp/x\"\nbogus = 1\n").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("/etc/redtail/test.toml:3:1"), "{s}");
        assert!(s.contains("bogus"), "{s}");
    }

    #[test]
    fn all_value_errors_reported_at_once() {
        let e = parse(
            r#"[agent]
rotate_wait = "soon"
[[source]]
name = "a"
paths = ["relative/*.log"]
start_at = "middle"
parser = "yaml"
"#,
        )
        .unwrap_err();
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "agent.rotate_wait",
                "source[0].paths",
                "source[0].parser",
                "source[0].start_at"
            ]
        );
        assert_eq!(e.problems[0].line, 2);
        assert_eq!(e.problems[3].line, 6);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4MiB"), Some(4 << 20));
        assert_eq!(parse_size("512k"), Some(512 << 10));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("1 GB"), Some(1 << 30));
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn marks_key_shares_the_stream_slot() {
        assert_eq!(marks_key("logs:nginx"), "{logs:nginx}:redtail:marks");
        assert_eq!(marks_key("{app}:nginx"), "{app}:nginx:redtail:marks");
        assert_eq!(
            host_marks_key("logs:nginx", "web1"),
            "{logs:nginx}:redtail:marks:web1"
        );
    }
}
