//! The publisher: puts parsed batches back in file order, writes dead letters, and applies
//! each batch to Redis with one atomic script call that also moves the file's high-water
//! mark. The protocol is described in docs/exactly-once.md.
//!
//! Batches are pipelined: every batch ready when the previous pipeline was acknowledged
//! goes out in the next one, so batches grow under load and a lone line leaves at once.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, Value};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::deadletter;
use crate::record::{DeadClass, DeadRecord, FileInfo, Parsed};
use crate::stats::{add, STATS};

/// ARGV: 1 mark field, 2 generation, 3 end offset, 4 maxlen, 5 start offset, 6 force,
/// then per entry: offset, number of field pairs, the pairs.
/// Returns {added, skipped, previous generation, previous offset} (-1 when no mark).
///
/// Refuses (REDTAILGAP) a batch that would leave a hole: one that starts past the mark, or
/// past 0 in a generation Redis has not seen. That happens when an earlier batch of the
/// same file failed inside the same pipeline (OOM on one call) — applying the later one
/// would move the mark over the failed one and lose it — or when Redis lost data. The
/// publisher tells the two apart and forces the batch through only in the second case.
pub const SCRIPT: &str = r#"#!lua
local stream, marks = KEYS[1], KEYS[2]
local field = ARGV[1]
local gen = tonumber(ARGV[2])
local endoff = tonumber(ARGV[3])
local maxlen = tonumber(ARGV[4])
local start = tonumber(ARGV[5])
local force = ARGV[6] == '1'
local t = redis.call('TYPE', stream)['ok']
if t ~= 'stream' and t ~= 'none' then
  return redis.error_reply('WRONGTYPE redtail: key ' .. stream .. ' holds a ' .. t .. ', not a stream')
end
local pg, po = -1, -1
local mark = redis.call('HGET', marks, field)
if mark then
  local sep = string.find(mark, ':', 1, true)
  pg = tonumber(string.sub(mark, 1, sep - 1))
  po = tonumber(string.sub(mark, sep + 1))
end
if not force and start > 0 and (gen > pg or (gen == pg and start > po)) then
  return redis.error_reply('REDTAILGAP ' .. pg .. ' ' .. po)
end
local added, skipped = 0, 0
local args = {}
local base = 1
if maxlen > 0 then
  args[1] = 'MAXLEN'; args[2] = '~'; args[3] = ARGV[4]; args[4] = '*'; base = 4
else
  args[1] = '*'
end
local last = base
local i, n = 7, #ARGV
while i <= n do
  local off = tonumber(ARGV[i])
  local nf2 = 2 * tonumber(ARGV[i + 1])
  if gen > pg or (gen == pg and off >= po) then
    for j = 1, nf2 do args[base + j] = ARGV[i + 1 + j] end
    for j = base + nf2 + 1, last do args[j] = nil end
    last = base + nf2
    redis.call('XADD', stream, unpack(args, 1, last))
    added = added + 1
  else
    skipped = skipped + 1
  end
  i = i + 2 + nf2
end
if gen > pg or (gen == pg and endoff > po) then
  redis.call('HSET', marks, field, ARGV[2] .. ':' .. ARGV[3])
end
return {added, skipped, pg, po}
"#;

/// Index of the first entry argument in the script call: EVALSHA sha numkeys stream marks,
/// then the six fixed ARGV.
const FIRST_ENTRY_ARG: usize = 5 + 6;

/// The script, hashed once.
pub fn script() -> &'static redis::Script {
    static S: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(SCRIPT));
    &S
}

/// An acknowledged batch: the checkpoint may move to `end`.
#[derive(Debug, Clone)]
pub struct Ack {
    pub file: Arc<FileInfo>,
    pub end: u64,
    pub read_bytes: u64,
    pub lines: u32,
}

/// Is this error worth retrying after a pause (nothing is lost by retrying: the marks make a
/// repeated call a no-op for what already landed)?
pub fn is_transient(e: &RedisError) -> bool {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return true;
    }
    matches!(
        e.code(),
        Some(
            "LOADING"
                | "BUSY"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
                | "MASTERDOWN"
                | "READONLY"
                | "OOM"
                | "NOSCRIPT"
                | "NOREPLICAS"
                | "MOVED"
                | "ASK"
                | "REDTAILGAP"
        )
    )
}

/// Capped exponential backoff with full jitter.
pub struct Backoff {
    attempt: u32,
    max: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        Backoff { attempt: 0, max }
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
    pub fn next_delay(&mut self) -> Duration {
        let base = Duration::from_millis(50).saturating_mul(1u32 << self.attempt.min(16));
        self.attempt += 1;
        let cap = base.min(self.max);
        // Jitter from the clock's low bits: good enough to spread reconnecting agents.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let frac = (nanos % 1000) as f64 / 1000.0;
        cap.mul_f64(0.5 + frac / 2.0)
    }
}

/// Publisher settings.
pub struct Publisher {
    pub client: redis::Client,
    pub conn_cfg: AsyncConnectionConfig,
    pub max_entries: usize,
    pub max_bytes: usize,
    pub retry_max_backoff: Duration,
    pub retry_limit: u32,
    pub wait_replicas: u32,
    pub wait_timeout: Duration,
    pub dlq: deadletter::Writer,
    pub source_names: Vec<String>,
    pub parser_names: Vec<String>,
    conn: Option<MultiplexedConnection>,
    gap_reported: HashSet<String>,
}

impl Publisher {
    pub fn new(cfg: &Config) -> anyhow::Result<Publisher> {
        let client = redis::Client::open(cfg.redis.url.as_str())
            .map_err(|e| anyhow::anyhow!("redis.url {:?}: {e}", cfg.redis.url))?;
        let conn_cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.redis.connect_timeout))
            .set_response_timeout(Some(cfg.redis.response_timeout));
        Ok(Publisher {
            client,
            conn_cfg,
            max_entries: cfg.redis.batch_max_entries,
            max_bytes: cfg.redis.batch_max_bytes,
            retry_max_backoff: cfg.redis.retry_max_backoff,
            retry_limit: cfg.redis.retry_limit,
            wait_replicas: cfg.redis.wait_replicas,
            wait_timeout: cfg.redis.wait_timeout,
            dlq: deadletter::Writer::new(
                &cfg.agent.dead_letter,
                cfg.agent.dead_letter_max_bytes,
                cfg.agent.dead_letter_keep,
                &cfg.agent.host_name,
            ),
            source_names: cfg.sources.iter().map(|s| s.name.clone()).collect(),
            parser_names: cfg
                .sources
                .iter()
                .map(|s| s.parser.name().to_string())
                .collect(),
            conn: None,
            gap_reported: HashSet::new(),
        })
    }

    async fn connect(&mut self) -> Result<&mut MultiplexedConnection, RedisError> {
        if self.conn.is_none() {
            let mut c = self
                .client
                .get_multiplexed_async_connection_with_config(&self.conn_cfg)
                .await?;
            // Load once per connection; EVALSHA then costs only the hash on the wire.
            let _: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(SCRIPT)
                .query_async(&mut c)
                .await?;
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().unwrap())
    }

    /// Runs until `rx` is closed and everything received is published (or `abort` fires).
    /// Sends one ack per batch, in order, to `acks`.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Parsed>,
        acks: crossbeam_channel::Sender<Ack>,
        mut abort: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut reorder: BTreeMap<u64, Parsed> = BTreeMap::new();
        let mut next_seq = 0u64;
        let mut closed = false;
        loop {
            // Wait until the next batch in order is here (or the input is done).
            while !reorder.contains_key(&next_seq) {
                if closed {
                    if !reorder.is_empty() {
                        anyhow::bail!("internal error: batches {:?}.. missing", next_seq);
                    }
                    return Ok(());
                }
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(p) => { reorder.insert(p.seq, p); }
                        None => closed = true,
                    },
                    _ = abort.changed() => return Ok(()),
                }
            }
            // Take in more without waiting: whatever is already queued joins this pipeline.
            while let Ok(p) = rx.try_recv() {
                reorder.insert(p.seq, p);
            }
            let mut group = Vec::new();
            let mut entries = 0usize;
            let mut bytes = 0usize;
            while let Some(p) = reorder.remove(&next_seq) {
                entries += p.entries as usize;
                bytes += p.wire_bytes;
                next_seq += 1;
                group.push(p);
                if entries >= self.max_entries || bytes >= self.max_bytes {
                    break;
                }
            }
            let published = tokio::select! {
                r = self.publish_group(&mut group) => r,
                _ = abort.changed() => return Ok(()),
            };
            published?;
            for p in group {
                let _ = acks.send(Ack {
                    file: p.file,
                    end: p.end,
                    read_bytes: p.read_bytes,
                    lines: p.lines,
                });
            }
        }
    }

    fn write_dead(&mut self, p: &Parsed, recs: &[DeadRecord]) -> std::io::Result<()> {
        let source = &self.source_names[p.file.source];
        let parser = &self.parser_names[p.file.source];
        for r in recs {
            let e = self.dlq.entry(source, parser, &p.file, r, 1);
            self.dlq.append(&e)?;
        }
        Ok(())
    }

    /// Writes dead letters (fsynced), then applies every batch in one pipeline; retries
    /// transient failures until they pass.
    async fn publish_group(&mut self, group: &mut [Parsed]) -> anyhow::Result<()> {
        let mut any_dead = false;
        for i in 0..group.len() {
            if group[i].dead.is_empty() {
                continue;
            }
            any_dead = true;
            let dead = std::mem::take(&mut group[i].dead);
            let mut backoff = Backoff::new(self.retry_max_backoff);
            loop {
                match self.write_dead(&group[i], &dead) {
                    Ok(()) => break,
                    Err(e) => {
                        let d = backoff.next_delay();
                        error!(path = %self.dlq_path_display(), error = %e, retry_in = ?d, "cannot write the dead-letter file; holding the pipeline");
                        tokio::time::sleep(d).await;
                    }
                }
            }
        }
        if any_dead {
            let mut backoff = Backoff::new(self.retry_max_backoff);
            while let Err(e) = self.dlq.sync() {
                let d = backoff.next_delay();
                error!(error = %e, "cannot fsync the dead-letter file; holding the pipeline");
                tokio::time::sleep(d).await;
            }
        }

        let mut force: HashSet<usize> = HashSet::new();
        let mut rejected: HashSet<usize> = HashSet::new();
        let mut backoff = Backoff::new(self.retry_max_backoff);
        loop {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            let mut idx = Vec::new();
            for (i, p) in group.iter().enumerate() {
                if rejected.contains(&i) {
                    continue;
                }
                if force.contains(&i) {
                    pipe.add_command(forced(&p.cmd));
                } else {
                    pipe.add_command(p.cmd.clone());
                }
                idx.push(i);
            }
            if idx.is_empty() {
                return Ok(());
            }
            let result: Result<Vec<Value>, RedisError> = match self.connect().await {
                Ok(c) => pipe.query_async(c).await,
                Err(e) => Err(e),
            };
            let replies = match result {
                Ok(v) => v,
                Err(e) => {
                    self.transient_pause(&mut backoff, &e).await?;
                    continue;
                }
            };
            let mut retry_err: Option<RedisError> = None;
            let mut failed_files: HashSet<&str> = HashSet::new();
            for (reply, &i) in replies.into_iter().zip(&idx) {
                let p = &group[i];
                match reply {
                    Value::ServerError(se) => {
                        let e: RedisError = se.into();
                        let gap = e.code() == Some("REDTAILGAP");
                        if gap && !failed_files.contains(p.file.mark_field.as_str()) {
                            // Nothing before it failed: Redis really lacks what the checkpoint
                            // says it holds. The documented rule: say so loudly, don't
                            // republish history, continue from the checkpoint.
                            self.report_gap(p, e.detail().unwrap_or(""));
                            force.insert(i);
                            retry_err.get_or_insert(e);
                        } else if is_transient(&e) {
                            failed_files.insert(p.file.mark_field.as_str());
                            retry_err.get_or_insert(e);
                        } else {
                            error!(
                                stream = %stream_of(&p.cmd),
                                path = %p.file.path,
                                entries = p.entries,
                                error = %e,
                                "Redis rejected a batch permanently; its records go to the dead-letter file"
                            );
                            self.reject(p, &e.to_string());
                            rejected.insert(i);
                            failed_files.insert(p.file.mark_field.as_str());
                            retry_err.get_or_insert(e);
                        }
                    }
                    v => self.record_reply(p, &v),
                }
            }
            if retry_err.is_none() && !rejected.is_empty() {
                // Move the marks past what was dead-lettered, so the file's next batch
                // does not look like a gap.
                let mut fix = redis::pipe();
                for &i in &rejected {
                    let a = simple_args(&group[i].cmd);
                    fix.cmd("HSET").arg(a[4]).arg(a[5]).arg(format!(
                        "{}:{}",
                        String::from_utf8_lossy(a[6]),
                        String::from_utf8_lossy(a[7])
                    ));
                }
                let r: Result<Value, RedisError> = match self.connect().await {
                    Ok(c) => fix.query_async(c).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    self.transient_pause(&mut backoff, &e).await?;
                    continue;
                }
                rejected.clear();
                break;
            }
            match retry_err {
                None => break,
                Some(e) => {
                    // Everything that landed is a no-op when resent; only the failed part and
                    // what follows it in the same file is really written again.
                    if !is_transient(&e) || e.code() == Some("REDTAILGAP") {
                        backoff.reset();
                        continue;
                    }
                    self.transient_pause(&mut backoff, &e).await?;
                }
            }
        }
        if self.wait_replicas > 0 {
            if let Some(c) = self.conn.as_mut() {
                let r: Result<i64, _> = redis::cmd("WAIT")
                    .arg(self.wait_replicas)
                    .arg(self.wait_timeout.as_millis() as u64)
                    .query_async(c)
                    .await;
                match r {
                    Ok(n) if n < self.wait_replicas as i64 => {
                        warn!(
                            acked = n,
                            wanted = self.wait_replicas,
                            "fewer replicas than redis.wait_replicas acknowledged the batch"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "WAIT failed"),
                }
            }
        }
        Ok(())
    }

    fn dlq_path_display(&self) -> String {
        "dead-letter file".into()
    }

    async fn transient_pause(
        &mut self,
        backoff: &mut Backoff,
        e: &RedisError,
    ) -> anyhow::Result<()> {
        add(&STATS.redis_retries, 1);
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_timeout()
            || e.is_connection_refusal()
            || e.code() == Some("NOSCRIPT")
        {
            self.conn = None;
        }
        if self.retry_limit > 0 && backoff.attempts() >= self.retry_limit {
            anyhow::bail!(
                "Redis still failing after {} attempts (redis.retry_limit): {e}",
                backoff.attempts()
            );
        }
        let d = backoff.next_delay();
        if backoff.attempts() == 1 {
            warn!(error = %e, retry_in = ?d, "Redis unavailable; reading paused, retrying (nothing is lost)");
        } else {
            warn!(error = %e, attempt = backoff.attempts(), retry_in = ?d, "Redis still unavailable");
        }
        tokio::time::sleep(d).await;
        Ok(())
    }

    fn record_reply(&mut self, p: &Parsed, v: &Value) {
        let nums: Vec<i64> = match v {
            Value::Array(a) => a
                .iter()
                .map(|x| match x {
                    Value::Int(i) => *i,
                    _ => 0,
                })
                .collect(),
            _ => Vec::new(),
        };
        if let [added, skipped, _pg, _po] = nums[..] {
            add(&STATS.entries_published, added as u64);
            if skipped > 0 {
                add(&STATS.entries_skipped, skipped as u64);
                info!(path = %p.file.path, skipped, "entries already in Redis skipped (replay after restart or reconnect)");
            }
        }
    }

    fn report_gap(&mut self, p: &Parsed, detail: &str) {
        add(&STATS.redis_gaps, 1);
        let mut it = detail.split_whitespace();
        let pg: i64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(-1);
        let po: i64 = it.next().and_then(|s| s.parse().ok()).unwrap_or(-1);
        if self.gap_reported.insert(p.file.mark_field.clone()) {
            if pg < 0 {
                error!(
                    path = %p.file.path,
                    checkpoint = p.start,
                    "Redis has no high-water mark for this file although the local checkpoint says bytes 0..{} were published: Redis lost data (restart without persistence, FLUSHALL, failover to a stale replica?). Not republishing them (see docs/exactly-once.md); continuing from the checkpoint.",
                    p.start
                );
            } else {
                error!(
                    path = %p.file.path,
                    checkpoint = p.start,
                    redis_mark = po,
                    "Redis's high-water mark for this file is behind the local checkpoint: Redis lost bytes {}..{} (restored from an older snapshot?). Not republishing them; continuing from the checkpoint.",
                    po.max(0),
                    p.start
                );
            }
        }
    }

    /// Dead-letters every entry of a batch Redis refused, recovering the records from the
    /// script call's own arguments.
    fn reject(&mut self, p: &Parsed, err: &str) {
        let recs = entries_of(&p.cmd)
            .into_iter()
            .map(|(offset, message)| DeadRecord {
                offset,
                length: message.len() as u64,
                class: DeadClass::Rejected,
                error: format!("Redis rejected the entry: {err}"),
                bytes: message,
            })
            .collect::<Vec<_>>();
        if let Err(e) = self.write_dead(p, &recs).and_then(|_| self.dlq.sync()) {
            error!(error = %e, records = recs.len(), "cannot write rejected records to the dead-letter file; they are lost");
            add(&STATS.lost_bytes, recs.iter().map(|r| r.length).sum());
        }
    }
}

fn stream_of(cmd: &redis::Cmd) -> String {
    cmd.args_iter()
        .nth(3)
        .map(|a| match a {
            redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        })
        .unwrap_or_default()
}

fn simple_args(cmd: &redis::Cmd) -> Vec<&[u8]> {
    cmd.args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(b) => Some(b),
            _ => None,
        })
        .collect()
}

/// Every entry of a script call: its offset and its field/value arguments.
pub fn entry_args(cmd: &redis::Cmd) -> Vec<(u64, Vec<&[u8]>)> {
    let args = simple_args(cmd);
    let mut out = Vec::new();
    let mut i = FIRST_ENTRY_ARG;
    let num = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
    };
    while i + 1 < args.len() {
        let (Some(off), Some(nf)) = (num(args[i]), num(args[i + 1])) else {
            break;
        };
        let pairs = args[i + 2..(i + 2 + 2 * nf as usize).min(args.len())].to_vec();
        out.push((off, pairs));
        i += 2 + 2 * nf as usize;
    }
    out
}

/// The (offset, message) of every entry in a script call.
pub fn entries_of(cmd: &redis::Cmd) -> Vec<(u64, Vec<u8>)> {
    entry_args(cmd)
        .into_iter()
        .map(|(off, pairs)| {
            let msg = pairs
                .chunks(2)
                .find(|kv| kv[0] == b"message")
                .and_then(|kv| kv.get(1))
                .map(|v| v.to_vec())
                .unwrap_or_default();
            (off, msg)
        })
        .collect()
}

/// The same call with the force flag set (accept a gap the publisher has reported).
fn forced(cmd: &redis::Cmd) -> redis::Cmd {
    let mut c = redis::Cmd::new();
    for (i, a) in cmd.args_iter().enumerate() {
        if let redis::Arg::Simple(b) = a {
            if i == FIRST_ENTRY_ARG - 1 {
                c.arg("1");
            } else {
                c.arg(b);
            }
        }
    }
    c
}
