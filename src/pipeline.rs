//! Wires the stages together and owns their threads:
//!
//! ```text
//! follower thread ──Batch──▶ parse workers (N threads) ──Parsed──▶ publisher (tokio)
//!       ▲  credits (bounded: at most `inflight` batches unacknowledged)      │ Ack
//!       └──────────────────────────────────────────────────────────────────┤
//!                                                       committer thread ◀──┘ (sled)
//! ```
//!
//! Shutdown is a cascade of disconnections: the follower stops and drops its sender; the
//! workers drain and drop theirs; the publisher publishes what it has and drops the ack
//! sender; the committer commits, flushes and exports its snapshot.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use redtail_parsers::{Fields, Parser};
use redtail_state::{Checkpoint, CheckpointStore, FileKey};
use tracing::{error, info, warn};

use crate::config::{marks_key, Config, InvalidUtf8, Source};
use crate::follow::{self, Follower, Sink};
use crate::publish::{Ack, Publisher};
use crate::record::{Batch, DeadClass, DeadRecord, Parsed, SpanKind};
use crate::stats::{add, STATS};

/// Per-worker state: one parser per source (each owns its scratch and compiled regexes).
pub struct Worker {
    sources: Arc<Vec<Source>>,
    parsers: Vec<Box<dyn Parser>>,
    streams: Vec<String>,
    host: String,
    maxlen: u64,
    metadata: bool,
    max_line_bytes: usize,
}

impl Worker {
    pub fn new(cfg: &Config, sources: Arc<Vec<Source>>) -> Worker {
        Worker {
            parsers: sources.iter().map(|s| s.parser.build()).collect(),
            streams: sources.iter().map(|s| s.stream.clone()).collect(),
            sources,
            host: cfg.agent.host_name.clone(),
            maxlen: cfg.redis.maxlen,
            metadata: cfg.redis.metadata,
            max_line_bytes: cfg.agent.max_line_bytes,
        }
    }

    /// Turns a batch into one XADD per record, plus its dead letters.
    pub fn parse(&mut self, batch: &Batch) -> Parsed {
        let si = batch.file.source;
        let src = &self.sources[si];
        let parser = &mut self.parsers[si];
        let stream = &self.streams[si];
        let mut xadds = Vec::with_capacity(batch.spans.len());
        let mut offsets = Vec::with_capacity(batch.spans.len());
        let mut dead = Vec::new();
        let mut dropped = 0u32;
        let mut fields = Fields::new();
        let mut uid = String::with_capacity(batch.file.uid_prefix.len() + 20);
        let mut wire = 0usize;
        for span in &batch.spans {
            let mut raw = batch.record(span);
            if let SpanKind::Oversize { total } = span.kind {
                dead.push(DeadRecord {
                    offset: span.offset,
                    length: total,
                    class: DeadClass::Oversize,
                    error: format!(
                        "line of {total} bytes exceeds agent.max_line_bytes ({}); only its first {} bytes are kept",
                        self.max_line_bytes,
                        raw.len()
                    ),
                    bytes: raw.to_vec(),
                });
                continue;
            }
            if raw.last() == Some(&b'\r') {
                raw = &raw[..raw.len() - 1];
            }
            if raw.len() > self.max_line_bytes {
                add(&STATS.oversize_lines, 1);
                dead.push(DeadRecord {
                    offset: span.offset,
                    length: raw.len() as u64,
                    class: DeadClass::Oversize,
                    error: format!(
                        "line of {} bytes exceeds agent.max_line_bytes ({})",
                        raw.len(),
                        self.max_line_bytes
                    ),
                    bytes: raw.to_vec(),
                });
                continue;
            }
            let mut out = Out {
                xadds: &mut xadds,
                offsets: &mut offsets,
                stream,
                maxlen: self.maxlen,
                dead: &mut dead,
                uid: &mut uid,
                wire: &mut wire,
            };
            let ctx = EntryCtx {
                src,
                host: &self.host,
                metadata: self.metadata,
                file: &batch.file,
            };
            let outcome = match std::str::from_utf8(raw) {
                Ok(text) => encode_entry(
                    &ctx,
                    parser.as_mut(),
                    text,
                    span.offset,
                    &mut fields,
                    &mut out,
                ),
                Err(e) => match src.invalid_utf8 {
                    InvalidUtf8::Replace => {
                        // Rare path: the replaced text lives only in this iteration.
                        let owned = String::from_utf8_lossy(raw).into_owned();
                        let mut f2 = Fields::new();
                        encode_entry(
                            &ctx,
                            parser.as_mut(),
                            &owned,
                            span.offset,
                            &mut f2,
                            &mut out,
                        )
                    }
                    InvalidUtf8::DeadLetter => {
                        out.dead.push(DeadRecord {
                            offset: span.offset,
                            length: raw.len() as u64,
                            class: DeadClass::Encoding,
                            error: format!("invalid UTF-8 at byte {}", e.valid_up_to()),
                            bytes: raw.to_vec(),
                        });
                        Outcome::Dead
                    }
                },
            };
            match outcome {
                Outcome::Entry => {}
                Outcome::Dropped => dropped += 1,
                Outcome::Dead => {}
            }
        }
        add(&STATS.dropped_by_filter, dropped as u64);
        Parsed {
            seq: batch.seq,
            file: batch.file.clone(),
            start: batch.start,
            end: batch.end,
            expect_mark: batch.expect_mark,
            xadds,
            offsets,
            wire_bytes: wire + 64,
            dead,
            read_bytes: batch.end - batch.start,
            lines: batch.spans.len() as u32,
        }
    }
}

enum Outcome {
    Entry,
    Dropped,
    Dead,
}

struct EntryCtx<'c> {
    src: &'c Source,
    host: &'c str,
    metadata: bool,
    file: &'c crate::record::FileInfo,
}

struct Out<'o> {
    xadds: &'o mut Vec<redis::Cmd>,
    offsets: &'o mut Vec<u64>,
    stream: &'o str,
    maxlen: u64,
    dead: &'o mut Vec<DeadRecord>,
    uid: &'o mut String,
    wire: &'o mut usize,
}

/// Filters, parses and appends one record's entry arguments (offset, pair count, pairs).
fn encode_entry<'t>(
    ctx: &EntryCtx,
    parser: &mut dyn Parser,
    text: &'t str,
    offset: u64,
    fields: &mut Fields<'t>,
    out: &mut Out,
) -> Outcome {
    let src = ctx.src;
    if let Some(d) = &src.drop {
        if d.is_match(text) {
            return Outcome::Dropped;
        }
    }
    fields.clear();
    if let Err(e) = parser.parse(text, fields) {
        out.dead.push(DeadRecord {
            offset,
            length: text.len() as u64,
            class: DeadClass::Parse,
            error: e.to_string(),
            bytes: text.as_bytes().to_vec(),
        });
        return Outcome::Dead;
    }
    let ts = if src.timestamp {
        parser.timestamp_field().and_then(|(name, fmt)| {
            fields
                .iter()
                .find(|(k, _)| *k == name)
                .and_then(|(_, v)| redtail_parsers::timestamp::normalize(v, fmt))
        })
    } else {
        None
    };
    let nf = 1
        + if ctx.metadata { 4 } else { 0 }
        + fields.len()
        + src.fields.len()
        + ts.is_some() as usize;
    let mut cmd = redis::Cmd::with_capacity(6 + 2 * nf, text.len() + 64 * nf);
    cmd.arg("XADD").arg(out.stream);
    if out.maxlen > 0 {
        cmd.arg("MAXLEN").arg("~").arg(out.maxlen);
    }
    cmd.arg("*");
    cmd.arg("message").arg(text.as_bytes());
    *out.wire += text.len() + 16 * nf;
    if ctx.metadata {
        out.uid.clear();
        out.uid.push_str(&ctx.file.uid_prefix);
        out.uid.push_str(itoa::Buffer::new().format(offset));
        cmd.arg("log.file.path")
            .arg(&ctx.file.path)
            .arg("log.offset")
            .arg(offset)
            .arg("host.name")
            .arg(ctx.host)
            .arg("log.record.uid")
            .arg(out.uid.as_str());
        *out.wire += ctx.file.path.len() + ctx.host.len() + out.uid.len() + 20;
    }
    for (k, v) in fields.iter() {
        cmd.arg(k.as_bytes()).arg(v.as_bytes());
        *out.wire += k.len() + v.len();
    }
    for (k, v) in &src.fields {
        cmd.arg(k).arg(v);
    }
    if let Some(ts) = &ts {
        cmd.arg("event.timestamp").arg(ts);
    }
    out.xadds.push(cmd);
    out.offsets.push(offset);
    Outcome::Entry
}

/// Marks read straight from Redis when the follower opens a file, so that a restart resumes
/// where Redis is, not where the (lagging, or lost) local checkpoint is. Retries until Redis
/// answers: nothing could be published without it anyway.
pub struct RedisMarks {
    client: redis::Client,
    conn: Option<redis::Connection>,
    keys: Vec<String>,
    timeout: Duration,
    down_until: Option<Instant>,
}

impl RedisMarks {
    pub fn new(cfg: &Config) -> anyhow::Result<RedisMarks> {
        Ok(RedisMarks {
            client: redis::Client::open(cfg.redis.url.as_str())?,
            conn: None,
            keys: cfg.sources.iter().map(|s| marks_key(&s.stream)).collect(),
            // Short: a lookup holds up the follower.
            timeout: cfg.redis.connect_timeout.min(Duration::from_secs(1)),
            down_until: None,
        })
    }
}

impl follow::Marks for RedisMarks {
    /// One attempt. While Redis is down the follower must stay free to drain rotated and
    /// deleted files and to stop, so a failure is reported, not waited out; after one,
    /// lookups fail fast for a second instead of each waiting for a timeout.
    fn get(&mut self, source: usize, field: &str) -> Result<Option<(u32, u64)>, ()> {
        if self.down_until.is_some_and(|t| Instant::now() < t) {
            return Err(());
        }
        let result = (|| -> redis::RedisResult<Option<String>> {
            if self.conn.is_none() {
                let c = self.client.get_connection_with_timeout(self.timeout)?;
                c.set_read_timeout(Some(self.timeout))?;
                c.set_write_timeout(Some(self.timeout))?;
                self.conn = Some(c);
            }
            redis::cmd("HGET")
                .arg(&self.keys[source])
                .arg(field)
                .query(self.conn.as_mut().unwrap())
        })();
        match result {
            Ok(v) => {
                if self.down_until.take().is_some() {
                    info!("Redis reachable again: reading high-water marks");
                }
                Ok(v.and_then(|v| {
                    let (g, o) = v.split_once(':')?;
                    Some((g.parse().ok()?, o.parse().ok()?))
                }))
            }
            Err(e) => {
                self.conn = None;
                if self.down_until.is_none() {
                    warn!(error = %e, "Redis unavailable: cannot read high-water marks; files are opened from their checkpoints and the publisher checks the marks when it is back (nothing is lost)");
                }
                self.down_until = Some(Instant::now() + Duration::from_secs(1));
                Err(())
            }
        }
    }
}

/// The follower's sink: waits for a credit (backpressure), then queues the batch.
pub struct ChannelSink {
    pub credits: Sender<()>,
    pub batches: Sender<Batch>,
    pub shutdown: Receiver<()>,
    pub recycled: Receiver<Vec<u8>>,
    /// A credit taken by `has_credit`, for the next `send`.
    pub held: bool,
}

impl Sink for ChannelSink {
    fn send(&mut self, batch: Batch) -> bool {
        if !std::mem::take(&mut self.held) {
            crossbeam_channel::select! {
                send(self.credits, ()) -> r => if r.is_err() { return false },
                recv(self.shutdown) -> _ => return false,
            }
        }
        self.batches.send(batch).is_ok()
    }

    fn has_credit(&mut self) -> bool {
        if !self.held {
            self.held = self.credits.try_send(()).is_ok();
        }
        self.held
    }

    fn buffer(&mut self) -> Vec<u8> {
        self.recycled.try_recv().unwrap_or_default()
    }
}

/// The committer: keeps the latest acknowledged offset per file and writes them to the
/// store every `interval`, and when the ack channel closes.
/// `store` None: count and release credits only (dry run).
pub fn committer(
    store: Option<Arc<CheckpointStore>>,
    acks: Receiver<Ack>,
    interval: Duration,
    names: Vec<String>,
    retention: Duration,
    mut on_ack: impl FnMut(&Ack),
) {
    // The latest ack per file; checkpoints are built only when committed (no allocation
    // per ack on the hot path).
    let mut dirty: HashMap<(usize, FileKey), (Arc<crate::record::FileInfo>, u64)> = HashMap::new();
    let mut last = Instant::now();
    // Pruned once at start (an agent restarted often would otherwise never prune) and
    // hourly after that.
    let mut last_prune: Option<Instant> = None;
    let commit = |dirty: &mut HashMap<(usize, FileKey), (Arc<crate::record::FileInfo>, u64)>| {
        let Some(store) = store.as_ref() else {
            dirty.clear();
            return;
        };
        if dirty.is_empty() {
            return;
        }
        let now_ms = now_ms();
        let ups: Vec<Checkpoint> = dirty
            .drain()
            .map(|(_, (f, end))| Checkpoint {
                source: names[f.source].clone(),
                key: f.key,
                fingerprint: f.fingerprint,
                btime: f.btime,
                generation: f.generation,
                offset: end,
                path: f.path.clone(),
                updated_ms: now_ms,
            })
            .collect();
        let r = store
            .commit(&ups)
            .and_then(|_| store.flush())
            .and_then(|_| store.export_snapshot());
        match r {
            Ok(()) => add(&STATS.checkpoint_commits, 1),
            Err(e) => {
                error!(error = %e, "cannot commit checkpoints; Redis-side marks keep delivery exact, retrying at the next commit")
            }
        }
    };
    loop {
        let timeout = interval.saturating_sub(last.elapsed());
        match acks.recv_timeout(timeout) {
            Ok(a) => {
                on_ack(&a);
                dirty.insert((a.file.source, a.file.key), (a.file, a.end));
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                commit(&mut dirty);
                return;
            }
        }
        if last.elapsed() >= interval {
            commit(&mut dirty);
            last = Instant::now();
        }
        let prune_due = last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600));
        if let (Some(store), true) = (&store, prune_due) {
            last_prune = Some(Instant::now());
            prune(store, retention);
        }
    }
}

/// Removes checkpoints of files not seen for `retention` whose file is gone.
pub fn prune(store: &CheckpointStore, retention: Duration) {
    use std::os::unix::fs::MetadataExt;
    let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
    let Ok(all) = store.all() else { return };
    for c in all.into_iter().filter(|c| c.updated_ms < cutoff) {
        let alive = std::fs::metadata(&c.path)
            .map(|m| m.dev() == c.key.dev && m.ino() == c.key.ino)
            .unwrap_or(false);
        if !alive {
            if let Err(e) = store.remove(&c.source, c.key) {
                warn!(error = %e, "cannot prune checkpoint");
            } else {
                info!(path = %c.path, "pruned checkpoint of a file gone for longer than agent.checkpoint_retention");
            }
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How the pipeline runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Follow forever (until signalled).
    Follow,
    /// Read every file to its end once.
    Backfill,
    /// Backfill that reads, cuts and parses but writes nothing: no Redis, no checkpoints,
    /// no dead-letter file.
    DryRun,
}

/// What a finished pipeline reports.
#[derive(Debug, Default)]
pub struct Summary {
    pub files: usize,
    pub lines: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub held_back_bytes: u64,
    pub held_back_files: usize,
    pub aborted: bool,
    /// CPU time of the follower thread (reading and cutting lines).
    pub follower_cpu: f64,
    /// Dry run: entries that would be published, records that would be dead-lettered.
    pub would_publish: u64,
    pub would_dead_letter: u64,
}

/// Handles to stop a running pipeline.
pub struct Control {
    /// Dropping it stops reading; what was read is still published and committed.
    pub stop_reading: Option<Sender<()>>,
    /// Sending `true` stops publishing at once; what is unpublished is not checkpointed.
    pub abort: tokio::sync::watch::Sender<bool>,
}

/// Runs the whole pipeline on the current thread until it finishes (backfill) or is
/// stopped through the returned control's channels (follow).
pub fn run(
    cfg: &Config,
    mode: Mode,
    only_source: Option<&str>,
    store: Option<Arc<CheckpointStore>>,
    control_rx: impl FnOnce(Control),
    progress: Option<indicatif::ProgressBar>,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let mut cfg = cfg.clone();
    if let Some(name) = only_source {
        let src = cfg.source(name)?.clone();
        cfg.sources = vec![src];
    }
    let sources = Arc::new(cfg.sources.clone());
    let workers = cfg.agent.workers.max(1);
    let inflight = (2 * workers + 4).max(8);
    let (credit_tx, credit_rx) = bounded::<()>(inflight);
    let (batch_tx, batch_rx) = bounded::<Batch>(inflight);
    let (recycle_tx, recycle_rx) = bounded::<Vec<u8>>(inflight);
    let (parsed_tx, parsed_rx) = tokio::sync::mpsc::channel::<Parsed>(inflight);
    let (ack_tx, ack_rx) = bounded::<Ack>(inflight * 4);
    let (stop_tx, stop_rx) = bounded::<()>(1);
    let (abort_tx, abort_rx) = tokio::sync::watch::channel(false);
    let abort_seen = abort_rx.clone();
    control_rx(Control {
        stop_reading: Some(stop_tx),
        abort: abort_tx,
    });

    let checkpoints = match &store {
        Some(s) => s.all()?,
        None => Vec::new(),
    };
    let once = mode != Mode::Follow;
    let dry = mode == Mode::DryRun;
    let opts = follow::Options::from_config(&cfg, once);
    let marks: Box<dyn follow::Marks> = if dry {
        Box::new(follow::NoMarks)
    } else {
        Box::new(RedisMarks::new(&cfg)?)
    };
    let follower = Follower::new(
        opts,
        follow::SourceSpec::from_config(&cfg),
        checkpoints,
        marks,
    );

    // Parse workers.
    let mut worker_handles = Vec::new();
    for i in 0..workers {
        let rx = batch_rx.clone();
        let tx = parsed_tx.clone();
        let recycle = recycle_tx.clone();
        let mut w = Worker::new(&cfg, sources.clone());
        worker_handles.push(
            std::thread::Builder::new()
                .name(format!("parse-{i}"))
                .spawn(move || {
                    for b in rx {
                        let parsed = w.parse(&b);
                        // The byte buffer goes back to the follower: steady state allocates
                        // no new batch buffers.
                        let _ = recycle.try_send(b.bytes);
                        if tx.blocking_send(parsed).is_err() {
                            break;
                        }
                    }
                })?,
        );
    }
    drop(parsed_tx);
    drop(batch_rx);

    // Committer.
    let names: Vec<String> = sources.iter().map(|s| s.name.clone()).collect();
    let interval = if once {
        Duration::from_secs(1)
    } else {
        cfg.agent.commit_interval
    };
    let retention = cfg.agent.checkpoint_retention;
    let st = store.clone();
    // Only the committer holds the credit receiver: if it exits, a follower waiting for a
    // credit is released instead of hanging.
    let credits = credit_rx;
    let pb = progress.clone();
    let committer_handle =
        std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || {
                let mut lines = 0u64;
                committer(st, ack_rx, interval, names, retention, |a| {
                    let _ = credits.try_recv();
                    lines += a.lines as u64;
                    if let Some(pb) = &pb {
                        pb.inc(a.read_bytes);
                    }
                });
                lines
            })?;

    // Follower.
    let hints = if mode == Mode::Follow {
        follow::hints::Hints::start()
    } else {
        None
    };
    let follower_handle = std::thread::Builder::new()
        .name("follower".into())
        .spawn(move || {
            let mut sink = ChannelSink {
                credits: credit_tx,
                batches: batch_tx,
                shutdown: stop_rx.clone(),
                recycled: recycle_rx,
                held: false,
            };
            let pb = progress;
            let mut sized = false;
            let f = follow::run_thread(follower, &mut sink, hints, stop_rx, once, |f| {
                if let (Some(pb), false) = (&pb, sized) {
                    let (total, done) = f.progress();
                    pb.set_length(total);
                    let _ = done;
                    sized = true;
                }
            });
            let cpu = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
                .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
                .unwrap_or(0.0);
            (f.file_count(), f.held_back(), cpu)
        })?;

    // Publisher on a small tokio runtime of its own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut would_publish, mut would_dead) = (0u64, 0u64);
    let result = if dry {
        // Count instead of publishing; acks still flow so credits and progress do.
        let mut rx = parsed_rx;
        while let Some(p) = rx.blocking_recv() {
            would_publish += p.offsets.len() as u64;
            would_dead += p.dead.len() as u64;
            let _ = ack_tx.send(Ack {
                file: p.file,
                end: p.end,
                read_bytes: p.read_bytes,
                lines: p.lines,
            });
        }
        drop(ack_tx);
        drop(abort_rx);
        Ok(())
    } else {
        let publisher = Publisher::new(&cfg)?;
        rt.block_on(publisher.run(parsed_rx, ack_tx, abort_rx))
    };
    let aborted = *abort_seen.borrow();
    if let Err(e) = &result {
        error!(error = %e, "publisher stopped");
    }
    // On an error the follower may be blocked on credits: tell it to stop.
    let (files, (held_bytes, held_files), follower_cpu) = match follower_handle.join() {
        Ok(v) => v,
        Err(_) => anyhow::bail!("follower thread panicked"),
    };
    for h in worker_handles {
        let _ = h.join();
    }
    let lines = committer_handle
        .join()
        .map_err(|_| anyhow::anyhow!("committer thread panicked"))?;
    result?;
    Ok(Summary {
        files,
        lines,
        bytes: crate::stats::get(&STATS.bytes_read),
        seconds: started.elapsed().as_secs_f64(),
        held_back_bytes: held_bytes,
        held_back_files: held_files,
        aborted,
        follower_cpu,
        would_publish,
        would_dead_letter: would_dead,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use redtail_state::Fingerprint;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn prune_forgets_only_old_checkpoints_of_files_that_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(&dir.path().join("state")).unwrap();
        let alive = dir.path().join("alive.log");
        std::fs::write(&alive, "x\n").unwrap();
        let m = std::fs::metadata(&alive).unwrap();
        let cp = |path: &str, key: FileKey, updated_ms: u64| Checkpoint {
            source: "s".into(),
            key,
            fingerprint: Fingerprint { len: 2, hash: 1 },
            btime: None,
            generation: 0,
            offset: 2,
            path: path.into(),
            updated_ms,
        };
        let old = 1_000;
        let alive_key = FileKey {
            dev: m.dev(),
            ino: m.ino(),
        };
        let gone_key = FileKey { dev: 1, ino: 2 };
        let fresh_key = FileKey { dev: 1, ino: 3 };
        store
            .commit(&[
                cp(alive.to_str().unwrap(), alive_key, old),
                cp("/nonexistent/gone.log", gone_key, old),
                cp("/nonexistent/fresh.log", fresh_key, now_ms()),
            ])
            .unwrap();
        prune(&store, Duration::from_secs(3600));
        let left: Vec<FileKey> = store.all().unwrap().into_iter().map(|c| c.key).collect();
        assert!(
            left.contains(&alive_key),
            "a quiet file that still exists keeps its checkpoint"
        );
        assert!(left.contains(&fresh_key), "a recent checkpoint is kept");
        assert!(
            !left.contains(&gone_key),
            "an old checkpoint of a gone file is removed"
        );
    }
}
