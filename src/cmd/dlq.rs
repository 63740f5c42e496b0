//! `redtail dlq stats | show | replay`.
//!
//! # The replay protocol
//!
//! Each replayed record has a marker field `dlq:<file_id>:<generation>:<offset>` in its
//! stream's marks hash (`{<stream>}:redtail:marks`, same hash slot as the stream), whose
//! value is the id of the entry it was published as. The marker and the entry are written
//! by one Lua call, so they exist together or not at all (a script runs whole, and Redis
//! replicates and persists its effects as one MULTI/EXEC block). Per chunk of at most
//! [`CHUNK_RECORDS`] records and about [`CHUNK_BYTES`] bytes (so Redis is never blocked for
//! a whole file), the script:
//!
//! 1. checks the types of the stream key and the marks key (`stream`/`hash` or absent).
//!    Otherwise it changes nothing and fails with `WRONGTYPE`; no other command can run
//!    between this check and the writes below, so an `XADD` cannot meet `WRONGTYPE` later;
//! 2. per record: a marker already present means published by an earlier replay (skipped);
//!    else `XADD`; only when it returned an id is the marker set (`HSET`, which cannot fail
//!    on a hash). An `XADD` error is returned for that record, and no marker is set.
//!
//! A record leaves the dead-letter file only when the reply confirmed it: published now, or
//! its marker was there. Everything else (a parse failure, a refused `XADD`, a chunk that
//! failed or whose reply was lost) stays, with `attempts` increased and the error, and the
//! command exits 1. A retried chunk (lost reply, reconnect) is checked again by the script,
//! so a replay retried, interrupted or killed -9 at any point and run again publishes
//! each record exactly once. The file is rewritten after Redis answered (tmp, fsync,
//! rename, fsync of the directory); a kill before that only leaves records whose markers
//! the next run finds.
//!
//! Why not MULTI/EXEC: an `XADD` refused at EXEC time (`WRONGTYPE`) does not stop the
//! `HSET` of its marker queued behind it, and WATCHing the stream key to guard a type check
//! would abort the transaction whenever another agent (another host) writes to the same
//! stream, which is the normal case.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::config::{marks_key, Config};
use crate::deadletter::{self, Entry};
use crate::pipeline::Worker;
use crate::publish::{is_transient, xadd_pairs, Backoff};
use crate::record::{Batch, FileInfo, FileKey, Fingerprint, Span, SpanKind};

fn load(cfg: &Config) -> anyhow::Result<Vec<Entry>> {
    let (entries, bad) = deadletter::read_all(&cfg.agent.dead_letter)?;
    for b in &bad {
        eprintln!("warning: not a dead-letter record: {b}");
    }
    Ok(entries)
}

/// `redtail dlq stats`.
pub fn dlq_stats(path: &Path) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(path)?;
    let entries = load(&cfg)?;
    let mut by: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for e in &entries {
        // Group errors by their text without positions, so one cause is one row.
        let mut err = String::with_capacity(e.error.len());
        for c in e.error.chars() {
            if !c.is_ascii_digit() {
                err.push(c);
            } else if !err.ends_with('N') {
                err.push('N');
            }
        }
        *by.entry((e.source.clone(), e.error_class.clone(), err))
            .or_default() += 1;
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} record(s) in {}",
        entries.len(),
        cfg.agent.dead_letter.display()
    )?;
    writeln!(out, "{:>8}  {:<12} {:<9} ERROR", "COUNT", "SOURCE", "CLASS")?;
    let mut rows: Vec<_> = by.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    for ((src, class, err), n) in rows {
        writeln!(out, "{n:>8}  {src:<12} {class:<9} {err}")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `redtail dlq show`.
pub fn dlq_show(
    path: &Path,
    source: Option<&str>,
    class: Option<&str>,
    limit: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(path)?;
    if let Some(c) = class {
        if !["parse", "oversize", "encoding", "rejected"].contains(&c) {
            anyhow::bail!("--class {c:?}: use parse, oversize, encoding or rejected");
        }
    }
    let entries = load(&cfg)?;
    let mut out = std::io::stdout().lock();
    for e in entries
        .iter()
        .filter(|e| source.is_none_or(|s| e.source == s))
        .filter(|e| class.is_none_or(|c| e.error_class == c))
        .take(limit)
    {
        if json {
            serde_json::to_writer(&mut out, e)?;
            writeln!(out)?;
        } else {
            let text = match &e.line {
                Some(l) => l.chars().take(200).collect::<String>(),
                None => format!("(not UTF-8, {} bytes, base64 in --json)", e.length),
            };
            writeln!(
                out,
                "{} {}:{} [{}] {}\n    {}",
                e.source, e.path, e.offset, e.error_class, e.error, text
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Records per replay call, at most.
pub const CHUNK_RECORDS: usize = 256;
/// Bytes of entry fields per replay call, about (a larger record goes alone).
pub const CHUNK_BYTES: usize = 4 << 20;

/// One chunk of replayed records (see the module's opening comment). Reply: per record
/// 1 (published), 0 (its marker was there) or the XADD's error text.
const REPLAY_SCRIPT: &str = r#"#!lua
local st = redis.call('TYPE', KEYS[1])['ok']
if st ~= 'stream' and st ~= 'none' then
  return redis.error_reply('WRONGTYPE the stream key ' .. KEYS[1] .. ' holds a ' .. st .. ', not a stream')
end
local mt = redis.call('TYPE', KEYS[2])['ok']
if mt ~= 'hash' and mt ~= 'none' then
  return redis.error_reply('WRONGTYPE the marks key ' .. KEYS[2] .. ' holds a ' .. mt .. ', not a hash')
end
local maxlen = tonumber(ARGV[1])
local out = {}
local i, n = 2, #ARGV
while i <= n do
  local f = ARGV[i]
  local nf2 = 2 * tonumber(ARGV[i + 1])
  if redis.call('HEXISTS', KEYS[2], f) == 1 then
    out[#out + 1] = 0
  else
    local args
    if maxlen > 0 then args = {'MAXLEN', '~', ARGV[1], '*'} else args = {'*'} end
    local a = #args
    for j = 1, nf2 do args[a + j] = ARGV[i + 1 + j] end
    local id = redis.pcall('XADD', KEYS[1], unpack(args))
    if type(id) == 'table' and id['err'] then
      out[#out + 1] = id['err']
    else
      redis.call('HSET', KEYS[2], f, id)
      out[#out + 1] = 1
    end
  end
  i = i + 2 + nf2
end
return out
"#;

/// A record parsed under the current config, to be published.
struct Item {
    entry: Entry,
    marker: String,
    pairs: Vec<Vec<u8>>,
}

/// How one record's replay ended.
#[derive(Clone)]
enum Outcome {
    Published,
    Already,
    /// Refused: stays, class `rejected`, with this error.
    Failed(String),
    /// Not tried, or the reply was lost (Redis unreachable): stays as it was.
    Unknown(String),
}

/// `<dev>-<inode>-<fingerprint>[-<btime>]` (see `record::file_id`).
fn parse_file_id(id: &str) -> Option<(FileKey, u64, Option<u64>)> {
    let mut it = id.split('-');
    let dev = u64::from_str_radix(it.next()?, 16).ok()?;
    let ino = u64::from_str_radix(it.next()?, 16).ok()?;
    let fp = u64::from_str_radix(it.next()?, 16).ok()?;
    let btime = match it.next() {
        Some(b) => Some(u64::from_str_radix(b, 16).ok()?),
        None => None,
    };
    Some((FileKey { dev, ino }, fp, btime))
}

/// `redtail dlq replay`.
pub fn dlq_replay(path: &Path, source: Option<&str>) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(path)?;
    if let Some(s) = source {
        cfg.source(s)?;
    }
    // The running agent appends to the dead-letter file; replay rewrites it. Holding the
    // checkpoint store's lock proves no agent is running on this state_dir.
    let _exclusive = super::open_store(&cfg).map_err(|e| {
        e.context("dlq replay needs the agent stopped (it rewrites the dead-letter file)")
    })?;
    let contents = deadletter::read_contents(&cfg.agent.dead_letter)?;
    for (at, _) in &contents.bad {
        eprintln!("warning: not a dead-letter record (kept as it is): {at}");
    }
    let sources = Arc::new(cfg.sources.clone());
    let mut worker = Worker::new(&cfg, sources.clone());
    // Per source, in file order: the records to publish.
    let mut items: BTreeMap<usize, Vec<Item>> = BTreeMap::new();
    let mut keep: Vec<Entry> = Vec::new();
    let mut dropped = 0u64;
    let mut unusable = 0u64;
    for e in contents.entries {
        let si = match cfg.sources.iter().position(|s| s.name == e.source) {
            Some(i) if source.is_none_or(|s| s == e.source) => i,
            _ => {
                keep.push(e);
                continue;
            }
        };
        let Some((key, fp, btime)) = parse_file_id(&e.file_id) else {
            keep.push(e);
            continue;
        };
        if e.truncated {
            // Only the head of the line was kept: publishing it would be publishing a lie.
            keep.push(e);
            continue;
        }
        // The record must be whole: `line` or a `line_b64` that decodes, of its `length`.
        // Anything else (a damaged or hand-edited record) would publish something that is
        // not the line, and then drop the record.
        let bytes = match e.raw() {
            Some(b) if b.len() as u64 == e.length && e.schema == deadletter::SCHEMA => b,
            _ => {
                eprintln!(
                    "warning: {}:{} (source {}): the record's bytes are missing, do not decode or do not match its length, or its schema is not {}; kept as it is, not replayed",
                    e.path, e.offset, e.source, deadletter::SCHEMA
                );
                unusable += 1;
                keep.push(e);
                continue;
            }
        };
        let info = FileInfo::new(
            si,
            key,
            Fingerprint { len: 0, hash: fp },
            btime,
            e.generation,
            e.path.clone(),
        );
        let batch = Batch {
            seq: 0,
            file: info,
            start: e.offset,
            end: e.offset + e.length,
            expect_mark: false,
            spans: vec![Span {
                start: 0,
                len: bytes.len() as u32,
                offset: e.offset,
                kind: SpanKind::Line,
            }],
            bytes,
        };
        let parsed = worker.parse(&batch);
        if let Some(d) = parsed.dead.first() {
            let mut e = e;
            e.attempts += 1;
            e.error = d.error.clone();
            e.error_class = d.class.as_str().to_string();
            keep.push(e);
            continue;
        }
        let pairs: Vec<Vec<u8>> = match parsed.xadds.as_slice() {
            // Dropped by the source's filter now: counted as replayed (it is accounted for).
            [] => {
                dropped += 1;
                continue;
            }
            [one] => xadd_pairs(one).into_iter().map(<[u8]>::to_vec).collect(),
            more => {
                // One record, one span: one entry. Anything else is not replayed.
                let mut e = e;
                e.attempts += 1;
                e.error = format!("dlq replay: the record parsed into {} entries", more.len());
                keep.push(e);
                continue;
            }
        };
        let marker = format!("dlq:{}:{}:{}", e.file_id, e.generation, e.offset);
        items.entry(si).or_default().push(Item {
            entry: e,
            marker,
            pairs,
        });
    }

    let (mut added, mut skipped, mut calls) = (0u64, 0u64, 0u64);
    let mut failed: Vec<(String, u64)> = Vec::new();
    let mut failed_records = 0u64;
    if !items.is_empty() {
        let client = redis::Client::open(cfg.redis.url.as_str())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut conn: Option<redis::aio::MultiplexedConnection> = None;
            // Set once Redis cannot be reached: the rest is not tried (and stays as it is).
            let mut unreachable: Option<String> = None;
            for (si, list) in items {
                let src = &cfg.sources[si];
                let marks = marks_key(&src.stream);
                // Set once a chunk failed as a whole: the rest of the stream stays too.
                let mut stream_err: Option<String> = None;
                let mut rest = list.into_iter().peekable();
                while rest.peek().is_some() {
                    let mut chunk = Vec::new();
                    let mut bytes = 0usize;
                    while let Some(it) = rest.peek() {
                        let b: usize = it.pairs.iter().map(Vec::len).sum();
                        if !chunk.is_empty()
                            && (chunk.len() >= CHUNK_RECORDS || bytes + b > CHUNK_BYTES)
                        {
                            break;
                        }
                        bytes += b;
                        chunk.push(rest.next().unwrap());
                    }
                    let outcomes: Vec<Outcome> = if let Some(e) = &unreachable {
                        vec![Outcome::Unknown(e.clone()); chunk.len()]
                    } else if let Some(e) = &stream_err {
                        vec![Outcome::Failed(e.clone()); chunk.len()]
                    } else {
                        let mut call = redis::Cmd::new();
                        call.arg("EVAL")
                            .arg(REPLAY_SCRIPT)
                            .arg(2)
                            .arg(&src.stream)
                            .arg(&marks)
                            .arg(cfg.redis.maxlen);
                        for it in &chunk {
                            call.arg(&it.marker).arg(it.pairs.len() / 2);
                            for p in &it.pairs {
                                call.arg(p.as_slice());
                            }
                        }
                        let mut backoff = Backoff::new(cfg.redis.retry_max_backoff);
                        let reply = loop {
                            let r: Result<redis::Value, redis::RedisError> = async {
                                if conn.is_none() {
                                    conn = Some(client.get_multiplexed_async_connection().await?);
                                }
                                calls += 1;
                                call.query_async(conn.as_mut().unwrap()).await
                            }
                            .await;
                            match r {
                                Err(e) if is_transient(&e) && backoff.attempts() < 10 => {
                                    // The outcome may be unknown: the script checks the
                                    // markers again, so sending it again is safe.
                                    eprintln!("Redis: {e}; retrying");
                                    conn = None;
                                    tokio::time::sleep(backoff.next_delay()).await;
                                }
                                r => break r,
                            }
                        };
                        match reply {
                            Ok(v) => outcomes_of(v, chunk.len()),
                            Err(e) if is_transient(&e) => {
                                let msg = format!("dlq replay: Redis: {e}");
                                unreachable = Some(msg.clone());
                                vec![Outcome::Unknown(msg); chunk.len()]
                            }
                            Err(e) => {
                                let msg = format!("dlq replay into {}: {e}", src.stream);
                                stream_err = Some(msg.clone());
                                vec![Outcome::Failed(msg); chunk.len()]
                            }
                        }
                    };
                    for (it, o) in chunk.into_iter().zip(outcomes) {
                        let (err, e) = match o {
                            Outcome::Published => {
                                added += 1;
                                continue;
                            }
                            Outcome::Already => {
                                skipped += 1;
                                continue;
                            }
                            Outcome::Unknown(err) => (err, it.entry),
                            Outcome::Failed(err) => {
                                let mut e = it.entry;
                                e.attempts += 1;
                                e.error_class = "rejected".to_string();
                                e.error = err.clone();
                                (err, e)
                            }
                        };
                        match failed.iter_mut().find(|f| f.0 == err) {
                            Some(f) => f.1 += 1,
                            None => failed.push((err, 1)),
                        }
                        failed_records += 1;
                        keep.push(e);
                    }
                }
            }
        });
    }
    rewrite(&cfg.agent.dead_letter, &keep, &contents.bad)?;
    println!(
        "replayed {} record(s): {added} published, {skipped} already published by an earlier replay; {} kept in {} ({calls} Redis call(s) of at most {CHUNK_RECORDS} records)",
        added + skipped + dropped,
        keep.len() + contents.bad.len(),
        cfg.agent.dead_letter.display()
    );
    if unusable > 0 {
        eprintln!("warning: {unusable} damaged record(s) kept as they are, not replayed");
    }
    if failed_records > 0 {
        eprintln!(
            "error: {failed_records} record(s) could not be published; they stay in {} (run the replay again once fixed):",
            cfg.agent.dead_letter.display()
        );
        for (err, n) in &failed {
            eprintln!("  {n} record(s): {err}");
        }
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// The outcome of each record of a chunk from the script's reply.
fn outcomes_of(v: redis::Value, n: usize) -> Vec<Outcome> {
    use redis::Value;
    let items = match v {
        Value::Array(items) if items.len() == n => items,
        other => {
            let msg = format!("dlq replay: unexpected reply from Redis: {other:?}");
            return (0..n).map(|_| Outcome::Failed(msg.clone())).collect();
        }
    };
    items
        .into_iter()
        .map(|x| match x {
            Value::Int(1) => Outcome::Published,
            Value::Int(0) => Outcome::Already,
            Value::BulkString(b) => Outcome::Failed(format!(
                "dlq replay: Redis refused the entry: {}",
                String::from_utf8_lossy(&b)
            )),
            Value::SimpleString(s) => {
                Outcome::Failed(format!("dlq replay: Redis refused the entry: {s}"))
            }
            other => Outcome::Failed(format!(
                "dlq replay: unexpected reply from Redis: {other:?}"
            )),
        })
        .collect()
}

/// Replaces the dead-letter files with one file holding `keep`, then the lines that were
/// not records, as they were (tmp, fsync, rename, then the rotated files are removed and
/// the directory fsynced). A crash in between leaves records twice, which readers drop.
fn rewrite(path: &Path, keep: &[Entry], bad: &[(String, Vec<u8>)]) -> anyhow::Result<()> {
    let tmp = path.with_extension("jsonl.replay-tmp");
    let ctx = |p: &Path, what: &str| format!("{}: {what}", p.display());
    {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&tmp).with_context(|| ctx(&tmp, "create"))?,
        );
        for e in keep {
            serde_json::to_writer(&mut f, e)?;
            f.write_all(b"\n").with_context(|| ctx(&tmp, "write"))?;
        }
        for (_, raw) in bad {
            f.write_all(raw).with_context(|| ctx(&tmp, "write"))?;
            f.write_all(b"\n").with_context(|| ctx(&tmp, "write"))?;
        }
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_all().with_context(|| ctx(&tmp, "fsync"))?;
    }
    let old = deadletter::files(path);
    std::fs::rename(&tmp, path).with_context(|| ctx(path, "rename the rewritten file"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // The rename must be durable before the rotated files, whose records it now holds,
    // are removed.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| ctx(dir, "fsync"))?;
    for p in old {
        if p != path {
            std::fs::remove_file(&p).with_context(|| ctx(&p, "remove"))?;
        }
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| ctx(dir, "fsync"))?;
    Ok(())
}
