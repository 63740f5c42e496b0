//! `redtail dlq stats | show | replay`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

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

/// Publishes replayed records; each record's own marker field makes it exactly once even
/// when a replay is interrupted and run again.
const REPLAY_SCRIPT: &str = r#"#!lua
local maxlen = tonumber(ARGV[1])
local added, skipped = 0, 0
local i, n = 2, #ARGV
while i <= n do
  local f = ARGV[i]
  local nf2 = 2 * tonumber(ARGV[i + 1])
  if redis.call('HSETNX', KEYS[2], f, '1') == 1 then
    local args
    if maxlen > 0 then args = {'MAXLEN', '~', ARGV[1], '*'} else args = {'*'} end
    local a = #args
    for j = 1, nf2 do args[a + j] = ARGV[i + 1 + j] end
    redis.call('XADD', KEYS[1], unpack(args))
    added = added + 1
  else
    skipped = skipped + 1
  end
  i = i + 2 + nf2
end
return {added, skipped}
"#;

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
    let entries = load(&cfg)?;
    let sources = Arc::new(cfg.sources.clone());
    let mut worker = Worker::new(&cfg, sources.clone());
    // Per stream: the replay call being built.
    let mut calls: BTreeMap<usize, redis::Cmd> = BTreeMap::new();
    let mut keep: Vec<Entry> = Vec::new();
    let mut replayable = 0u64;
    for e in entries {
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
        let bytes = e.bytes();
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
        if parsed.xadds.is_empty() {
            // Dropped by the source's filter now: counted as replayed (it is accounted for).
            replayable += 1;
            continue;
        }
        let src = &cfg.sources[si];
        let call = calls.entry(si).or_insert_with(|| {
            let mut c = redis::Cmd::new();
            c.arg("EVAL")
                .arg(REPLAY_SCRIPT)
                .arg(2)
                .arg(&src.stream)
                .arg(marks_key(&src.stream))
                .arg(cfg.redis.maxlen);
            c
        });
        for pairs in parsed.xadds.iter().map(xadd_pairs) {
            call.arg(format!("dlq:{}:{}:{}", e.file_id, e.generation, e.offset))
                .arg(pairs.len() / 2);
            for p in pairs {
                call.arg(p);
            }
        }
        replayable += 1;
    }
    let (mut added, mut skipped) = (0i64, 0i64);
    if !calls.is_empty() {
        let client = redis::Client::open(cfg.redis.url.as_str())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut backoff = Backoff::new(cfg.redis.retry_max_backoff);
            for call in calls.values() {
                loop {
                    let r: Result<(i64, i64), redis::RedisError> = async {
                        let mut c = client.get_multiplexed_async_connection().await?;
                        call.query_async(&mut c).await
                    }
                    .await;
                    match r {
                        Ok((a, s)) => {
                            added += a;
                            skipped += s;
                            break;
                        }
                        Err(e) if is_transient(&e) && backoff.attempts() < 10 => {
                            eprintln!("Redis: {e}; retrying");
                            tokio::time::sleep(backoff.next_delay()).await;
                        }
                        Err(e) => {
                            return Err(anyhow::anyhow!(
                                "replay failed: {e}; nothing is lost, run it again"
                            ))
                        }
                    }
                }
            }
            Ok(())
        })?;
    }
    rewrite(&cfg.agent.dead_letter, &keep)?;
    println!(
        "replayed {replayable} record(s): {added} published, {skipped} already published by an earlier replay; {} kept in {}",
        keep.len(),
        cfg.agent.dead_letter.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Replaces the dead-letter files with one file holding `keep` (tmp, fsync, rename).
fn rewrite(path: &Path, keep: &[Entry]) -> anyhow::Result<()> {
    let tmp = path.with_extension("jsonl.replay-tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        for e in keep {
            serde_json::to_writer(&mut f, e)?;
            f.write_all(b"\n")?;
        }
        f.sync_all()?;
    }
    let old = deadletter::files(path);
    std::fs::rename(&tmp, path)?;
    for p in old {
        if p != path {
            std::fs::remove_file(&p)?;
        }
    }
    if let Some(d) = path.parent() {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}
