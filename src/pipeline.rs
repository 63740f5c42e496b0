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

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use redtail_parsers::{Fields, Parser};
use redtail_state::{Checkpoint, CheckpointStore, FileKey, StateError};
use tracing::{error, info, warn};

use crate::config::{host_marks_key, marks_key, Config, InvalidUtf8, Source};
use crate::follow::{self, Follower, Sink};
use crate::publish::{Ack, Publisher};
use crate::record::{Batch, DeadClass, DeadRecord, FileInfo, Parsed, SpanKind};
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
    /// Test hook, unreachable in normal use: a worker panics on a record containing this
    /// text (env `REDTAIL_TEST_HOOK_PANIC_ON`, read once; tests/shutdown.rs).
    panic_on: Option<Vec<u8>>,
}

/// See [`Worker::panic_on`].
pub const TEST_HOOK_PANIC_ON: &str = "REDTAIL_TEST_HOOK_PANIC_ON";

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
            panic_on: std::env::var_os(TEST_HOOK_PANIC_ON)
                .filter(|v| !v.is_empty())
                .map(|v| std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()).to_vec()),
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
            if let Some(needle) = &self.panic_on {
                if memchr::memmem::find(raw, needle).is_some() {
                    panic!(
                        "test hook {TEST_HOOK_PANIC_ON}: record at offset {}",
                        span.offset
                    );
                }
            }
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
    /// Per source: this agent's marks key, and the one from before marks were per host.
    keys: Vec<(String, String)>,
    timeout: Duration,
    down_until: Option<Instant>,
}

impl RedisMarks {
    pub fn new(cfg: &Config) -> anyhow::Result<RedisMarks> {
        Ok(RedisMarks {
            client: redis::Client::open(cfg.redis.url.as_str())?,
            conn: None,
            keys: cfg
                .sources
                .iter()
                .map(|s| {
                    (
                        host_marks_key(&s.stream, &cfg.agent.host_name),
                        marks_key(&s.stream),
                    )
                })
                .collect(),
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
            // This agent's mark, or one written before marks were per host.
            let (mine, legacy) = &self.keys[source];
            let v: Option<String> = redis::cmd("HGET")
                .arg(mine)
                .arg(field)
                .query(self.conn.as_mut().unwrap())?;
            match v {
                Some(v) => Ok(Some(v)),
                None => redis::cmd("HGET")
                    .arg(legacy)
                    .arg(field)
                    .query(self.conn.as_mut().unwrap()),
            }
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
    /// Every batch is told to the committer before it goes to the workers.
    pub issued: Sender<Issued>,
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
        if self
            .issued
            .send(Issued {
                file: batch.file.clone(),
                end: batch.end,
            })
            .is_err()
        {
            return false;
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

/// What the committer and [`prune`] need from the checkpoint store. A trait so that tests
/// can make the store fail; [`CheckpointStore`] is the implementation.
pub trait Checkpoints: Send + Sync {
    fn all(&self) -> Result<Vec<Checkpoint>, StateError>;
    fn commit(&self, updates: &[Checkpoint]) -> Result<(), StateError>;
    fn remove(&self, source: &str, key: FileKey) -> Result<(), StateError>;
    fn flush(&self) -> Result<(), StateError>;
    fn export_snapshot(&self) -> Result<(), StateError>;
}

impl Checkpoints for CheckpointStore {
    fn all(&self) -> Result<Vec<Checkpoint>, StateError> {
        CheckpointStore::all(self)
    }
    fn commit(&self, updates: &[Checkpoint]) -> Result<(), StateError> {
        CheckpointStore::commit(self, updates)
    }
    fn remove(&self, source: &str, key: FileKey) -> Result<(), StateError> {
        CheckpointStore::remove(self, source, key)
    }
    fn flush(&self) -> Result<(), StateError> {
        CheckpointStore::flush(self)
    }
    fn export_snapshot(&self) -> Result<(), StateError> {
        CheckpointStore::export_snapshot(self)
    }
}

/// A batch handed to the parse workers, told to the committer before it can be
/// acknowledged (the follower's sink sends it), so that a file's checkpoint only ever moves
/// to the end of a contiguous prefix of acknowledged batches.
pub struct Issued {
    pub file: Arc<FileInfo>,
    pub end: u64,
}

type FileSlot = (usize, FileKey);

/// One issued batch of a file, waiting for its ack (or acked, behind an unacked one).
struct Outstanding {
    file: Arc<FileInfo>,
    end: u64,
    acked: bool,
}

fn same_batch(o: &Outstanding, file: &FileInfo, end: u64) -> bool {
    !o.acked
        && o.end == end
        && o.file.generation == file.generation
        && o.file.fingerprint == file.fingerprint
}

/// Position of a file's checkpoint in its history: later generations and later offsets are
/// later. A different fingerprint is another file that reused the inode: whatever comes later
/// in issue order wins.
fn not_before(new: &FileInfo, new_end: u64, old: &FileInfo, old_end: u64) -> bool {
    new.fingerprint != old.fingerprint || (new.generation, new_end) >= (old.generation, old_end)
}

/// The committer's bookkeeping: batches issued but not yet acknowledged, and the checkpoint
/// each file may move to (pending until a commit succeeds).
#[derive(Default)]
struct Tracker {
    outstanding: HashMap<FileSlot, VecDeque<Outstanding>>,
    dirty: HashMap<FileSlot, (Arc<FileInfo>, u64)>,
    /// Acks that matched no issued batch (only when batches are not tracked).
    untracked: u64,
}

impl Tracker {
    fn issued(&mut self, i: Issued) {
        self.outstanding
            .entry((i.file.source, i.file.key))
            .or_default()
            .push_back(Outstanding {
                file: i.file,
                end: i.end,
                acked: false,
            });
    }

    /// Records an ack; the file's checkpoint moves to the end of the longest prefix of its
    /// issued batches that are all acknowledged, never past one that is not.
    fn ack(&mut self, file: &Arc<FileInfo>, end: u64) {
        let slot = (file.source, file.key);
        let Some(q) = self.outstanding.get_mut(&slot) else {
            // Not issued through a tracked sink: taken as it comes, but never backwards.
            self.untracked += 1;
            self.advance(slot, file.clone(), end);
            return;
        };
        match q.iter_mut().find(|o| same_batch(o, file, end)) {
            Some(o) => o.acked = true,
            None => {
                warn!(path = %file.path, end, "acknowledgement of a batch that was not issued; ignored (the checkpoint stays behind, the Redis-side mark keeps delivery exact)");
                return;
            }
        }
        let mut to = None;
        while q.front().is_some_and(|o| o.acked) {
            let o = q.pop_front().unwrap();
            to = Some((o.file, o.end));
        }
        if q.is_empty() {
            self.outstanding.remove(&slot);
        }
        if let Some((f, e)) = to {
            self.advance(slot, f, e);
        }
    }

    fn advance(&mut self, slot: FileSlot, file: Arc<FileInfo>, end: u64) {
        match self.dirty.get(&slot) {
            Some((f, e)) if !not_before(&file, end, f, *e) => {}
            _ => {
                self.dirty.insert(slot, (file, end));
            }
        }
    }
}

/// The committer's settings.
pub struct CommitterOpts {
    pub interval: Duration,
    /// Source names, by source index.
    pub names: Vec<String>,
    pub retention: Duration,
    /// Where pruned checkpoints' Redis-side marks are removed (None: not at all).
    pub marks: Option<MarksCleaner>,
    /// Globs of every configured source (not only those being run): a file that one of
    /// them matches is not gone.
    pub globs: Vec<String>,
}

/// The committer: keeps the checkpoint each file may move to (the end of its acknowledged
/// prefix of batches) and writes them to the store every `interval`, and when the ack
/// channel closes. A failed commit keeps them pending: they are retried at the next commit,
/// newer acks overwrite them, and none is ever lost or moved backwards.
/// `store` None: count and release credits only (dry run).
/// `issued` None: batches are not tracked, acks are taken in arrival order.
/// Returns false when the last commit (at shutdown) failed.
pub fn committer<S: Checkpoints + ?Sized>(
    store: Option<Arc<S>>,
    acks: Receiver<Ack>,
    issued: Option<Receiver<Issued>>,
    mut opts: CommitterOpts,
    mut on_ack: impl FnMut(&Ack),
) -> bool {
    let mut t = Tracker::default();
    let mut last = Instant::now();
    let mut need_export = false;
    // Pruned once at start (an agent restarted often would otherwise never prune) and
    // hourly after that.
    let mut last_prune: Option<Instant> = None;
    let names = std::mem::take(&mut opts.names);
    let commit = |t: &mut Tracker, need_export: &mut bool| -> bool {
        let Some(store) = store.as_ref() else {
            t.dirty.clear();
            return true;
        };
        if !t.dirty.is_empty() {
            let now_ms = now_ms();
            let ups: Vec<Checkpoint> = t
                .dirty
                .values()
                .map(|(f, end)| Checkpoint {
                    source: names[f.source].clone(),
                    key: f.key,
                    fingerprint: f.fingerprint,
                    btime: f.btime,
                    generation: f.generation,
                    offset: *end,
                    path: f.path.clone(),
                    updated_ms: now_ms,
                })
                .collect();
            if let Err(e) = store.commit(&ups).and_then(|_| store.flush()) {
                error!(error = %e, files = ups.len(), "cannot commit checkpoints; they stay pending and are retried at the next commit (Redis-side marks keep delivery exact)");
                return false;
            }
            t.dirty.clear();
            add(&STATS.checkpoint_commits, 1);
            *need_export = true;
        }
        if *need_export {
            match store.export_snapshot() {
                Ok(()) => *need_export = false,
                Err(e) => {
                    error!(error = %e, "cannot export the checkpoint snapshot; retrying at the next commit (the store is up to date)")
                }
            }
        }
        true
    };
    let drain_issued = |t: &mut Tracker| {
        if let Some(rx) = &issued {
            while let Ok(i) = rx.try_recv() {
                t.issued(i);
            }
        }
    };
    loop {
        let timeout = opts.interval.saturating_sub(last.elapsed());
        match acks.recv_timeout(timeout) {
            Ok(a) => {
                on_ack(&a);
                drain_issued(&mut t);
                t.ack(&a.file, a.end);
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                // The last commit: a few tries, then report the failure.
                for attempt in 0..3 {
                    if commit(&mut t, &mut need_export) && !need_export {
                        return true;
                    }
                    if attempt < 2 {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                return false;
            }
        }
        if last.elapsed() >= opts.interval {
            commit(&mut t, &mut need_export);
            last = Instant::now();
        }
        let prune_due = last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600));
        if let (Some(store), true) = (&store, prune_due) {
            last_prune = Some(Instant::now());
            prune(
                store.as_ref(),
                opts.retention,
                &opts.globs,
                opts.marks.as_mut(),
            );
        }
    }
}

/// The field of a checkpoint's file in its stream's marks hash: the one function both the
/// publisher's `FileInfo::mark_field` and the pruning of marks take it from.
pub fn mark_field(cp: &Checkpoint) -> String {
    crate::record::file_id(cp.key, cp.btime, cp.fingerprint)
}

/// Removes the Redis-side marks of pruned checkpoints (`HDEL {stream}:redtail:marks field…`),
/// so the hashes stay bounded.
pub struct MarksCleaner {
    client: redis::Client,
    /// Marks key by source name (every configured source).
    keys: HashMap<String, String>,
    timeout: Duration,
}

impl MarksCleaner {
    pub fn new(cfg: &Config) -> anyhow::Result<MarksCleaner> {
        Ok(MarksCleaner {
            client: redis::Client::open(cfg.redis.url.as_str())?,
            keys: cfg
                .sources
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        host_marks_key(&s.stream, &cfg.agent.host_name),
                    )
                })
                .collect(),
            // Short: the committer waits for it.
            timeout: cfg.redis.connect_timeout.min(Duration::from_secs(1)),
        })
    }

    /// One pipeline of HDELs; Err when Redis did not take it (the caller keeps the checkpoints
    /// and tries again at the next prune).
    fn remove(&mut self, cps: &[&Checkpoint]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for c in cps {
            if let Some(key) = self.keys.get(&c.source) {
                pipe.cmd("HDEL").arg(key).arg(mark_field(c)).ignore();
            }
        }
        if pipe.is_empty() {
            return Ok(());
        }
        let mut conn = self.client.get_connection_with_timeout(self.timeout)?;
        conn.set_read_timeout(Some(self.timeout))?;
        conn.set_write_timeout(Some(self.timeout))?;
        pipe.query::<()>(&mut conn)
    }
}

/// Is the file of `c` certainly gone? Only when its path and its directory say so (the
/// follower looks for a rotated file next to where it was last seen, so a rename in its
/// directory is not gone) and no path the configured globs match holds its inode. Anything
/// that cannot be read (permissions, I/O errors, a missing mount point's stale handle) is not
/// gone: a file that is only temporarily unreadable keeps its checkpoint and its mark.
fn file_is_gone(
    c: &Checkpoint,
    globbed: &mut Option<HashSet<(u64, u64)>>,
    globs: &[String],
) -> bool {
    use std::os::unix::fs::MetadataExt;
    let same = |m: &std::fs::Metadata| m.dev() == c.key.dev && m.ino() == c.key.ino;
    let absent = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
        )
    };
    match std::fs::metadata(&c.path) {
        Ok(m) if same(&m) => return false,
        Ok(_) => {}
        Err(e) if absent(&e) => {}
        Err(e) => {
            info!(path = %c.path, error = %e, "checkpoint kept: its file cannot be checked now");
            return false;
        }
    }
    if let Some(dir) = Path::new(&c.path).parent() {
        match std::fs::read_dir(dir) {
            Ok(rd) => {
                for e in rd.flatten() {
                    use std::os::unix::fs::DirEntryExt;
                    if e.ino() == c.key.ino && e.metadata().is_ok_and(|m| m.dev() == c.key.dev) {
                        return false;
                    }
                }
            }
            Err(e) if absent(&e) => {}
            Err(e) => {
                info!(path = %c.path, error = %e, "checkpoint kept: its directory cannot be read now");
                return false;
            }
        }
    }
    let set = globbed.get_or_insert_with(|| {
        let mut set = HashSet::new();
        for g in globs {
            for p in glob::glob(g).into_iter().flatten().flatten() {
                if let Ok(m) = std::fs::metadata(&p) {
                    set.insert((m.dev(), m.ino()));
                }
            }
        }
        set
    });
    !set.contains(&(c.key.dev, c.key.ino))
}

/// Removes checkpoints of files not seen for `retention` whose file is gone, and their
/// Redis-side marks. The marks go first, in one pipeline, once the prune is decided; a
/// checkpoint is removed only after its mark is (so a mark Redis could not remove is
/// retried at the next prune, from the checkpoint still there, also after a restart).
/// Returns the number of checkpoints removed.
pub fn prune<S: Checkpoints + ?Sized>(
    store: &S,
    retention: Duration,
    globs: &[String],
    marks: Option<&mut MarksCleaner>,
) -> usize {
    let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
    let all = match store.all() {
        Ok(all) => all,
        Err(e) => {
            warn!(error = %e, "cannot read the checkpoints to prune them; trying again at the next prune");
            return 0;
        }
    };
    let mut globbed = None;
    let gone: Vec<&Checkpoint> = all
        .iter()
        .filter(|c| c.updated_ms < cutoff && file_is_gone(c, &mut globbed, globs))
        .collect();
    if gone.is_empty() {
        return 0;
    }
    if let Some(m) = marks {
        if let Err(e) = m.remove(&gone) {
            warn!(error = %e, files = gone.len(), "cannot remove the Redis-side marks of files gone for longer than agent.checkpoint_retention; their checkpoints are kept and both are retried at the next prune");
            return 0;
        }
    }
    let mut removed = 0;
    for c in gone {
        match store.remove(&c.source, c.key) {
            Ok(()) => {
                removed += 1;
                info!(path = %c.path, mark = %mark_field(c), "pruned checkpoint and mark of a file gone for longer than agent.checkpoint_retention");
            }
            Err(e) => warn!(error = %e, path = %c.path, "cannot prune checkpoint"),
        }
    }
    if removed > 0 {
        if let Err(e) = store.flush().and_then(|_| store.export_snapshot()) {
            warn!(error = %e, "cannot flush pruned checkpoints; pruned again at the next prune");
        }
    }
    removed
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How a parse worker stops everything when it panics.
#[derive(Clone)]
struct FatalStop {
    stop: Sender<()>,
    abort: tokio::sync::watch::Sender<bool>,
    reason: Arc<Mutex<Option<String>>>,
}

/// A parse worker: batches in, parsed batches out. A panic while parsing a batch is caught:
/// it is logged at ERROR with the file and the byte range, and the agent stops (the
/// publisher at once, the follower too) and exits non-zero. The publisher publishes in batch
/// order and this batch never reaches it, so nothing from it on is published or
/// checkpointed: the next start reads it again (docs/exactly-once.md).
fn worker_loop(
    mut w: Worker,
    rx: Receiver<Batch>,
    tx: tokio::sync::mpsc::Sender<Parsed>,
    recycle: Sender<Vec<u8>>,
    fatal: FatalStop,
) {
    for b in rx {
        let parsed = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.parse(&b))) {
            Ok(p) => p,
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                let reason = format!(
                    "a parse worker panicked on bytes {}..{} of {} (generation {}): {msg}; stopped without publishing or checkpointing anything from this batch on, so the next start reads it again",
                    b.start, b.end, b.file.path, b.file.generation
                );
                error!(path = %b.file.path, start = b.start, end = b.end, panic = %msg, "{reason}");
                {
                    let mut r = fatal.reason.lock().unwrap_or_else(|p| p.into_inner());
                    r.get_or_insert(reason);
                }
                let _ = fatal.abort.send(true);
                let _ = fatal.stop.try_send(());
                return;
            }
        };
        // The byte buffer goes back to the follower: steady state allocates no new batch
        // buffers.
        let _ = recycle.try_send(b.bytes);
        if tx.blocking_send(parsed).is_err() {
            break;
        }
    }
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
    // Pruning looks at every configured source, also when only one is run.
    let marks_cleaner = if mode == Mode::DryRun {
        None
    } else {
        Some(MarksCleaner::new(cfg)?)
    };
    let all_globs: Vec<String> = cfg.sources.iter().flat_map(|s| s.paths.clone()).collect();
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
    let (issued_tx, issued_rx) = crossbeam_channel::unbounded::<Issued>();
    let (stop_tx, stop_rx) = bounded::<()>(1);
    let (abort_tx, abort_rx) = tokio::sync::watch::channel(false);
    let abort_seen = abort_rx.clone();
    // A parse worker that panics stops everything through these (see `worker_loop`).
    let fatal: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    // The follower stops when `stop_reading` is dropped (or sent to), or when a worker
    // panics. The workers cannot hold a clone of `stop_tx` (dropping `stop_reading` would no
    // longer stop anything): a relay turns either into the follower's own stop channel.
    let (fatal_tx, fatal_rx) = bounded::<()>(1);
    let (follow_stop_tx, follow_stop_rx) = bounded::<()>(1);
    std::thread::Builder::new()
        .name("stop-relay".into())
        .spawn(move || {
            crossbeam_channel::select! {
                recv(stop_rx) -> _ => {}
                recv(fatal_rx) -> r => {
                    if r.is_err() {
                        // Every worker finished normally: only `stop_reading` is left.
                        let _ = stop_rx.recv();
                    }
                }
            }
            drop(follow_stop_tx);
        })?;
    // The publisher failing stops the follower the same way.
    let stop_on_error = fatal_tx.clone();
    let fatal_stop = FatalStop {
        stop: fatal_tx,
        abort: abort_tx.clone(),
        reason: fatal.clone(),
    };
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
        let w = Worker::new(&cfg, sources.clone());
        let fatal = fatal_stop.clone();
        worker_handles.push(
            std::thread::Builder::new()
                .name(format!("parse-{i}"))
                .spawn(move || worker_loop(w, rx, tx, recycle, fatal))?,
        );
    }
    drop(fatal_stop);
    drop(parsed_tx);
    drop(batch_rx);

    // Committer.
    let opts = CommitterOpts {
        interval: if once {
            Duration::from_secs(1)
        } else {
            cfg.agent.commit_interval
        },
        names: sources.iter().map(|s| s.name.clone()).collect(),
        retention: cfg.agent.checkpoint_retention,
        marks: marks_cleaner,
        globs: all_globs,
    };
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
                let committed = committer(st, ack_rx, Some(issued_rx), opts, |a| {
                    let _ = credits.try_recv();
                    lines += a.lines as u64;
                    if let Some(pb) = &pb {
                        pb.inc(a.read_bytes);
                    }
                });
                (lines, committed)
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
                issued: issued_tx,
                shutdown: follow_stop_rx.clone(),
                recycled: recycle_rx,
                held: false,
            };
            let pb = progress;
            let mut sized = false;
            let f = follow::run_thread(follower, &mut sink, hints, follow_stop_rx, once, |f| {
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
        let _ = stop_on_error.try_send(());
    }
    drop(stop_on_error);
    // On an error the follower may be blocked on credits: tell it to stop.
    let (files, (held_bytes, held_files), follower_cpu) = match follower_handle.join() {
        Ok(v) => v,
        Err(_) => anyhow::bail!("follower thread panicked"),
    };
    for h in worker_handles {
        let _ = h.join();
    }
    let (lines, committed) = committer_handle
        .join()
        .map_err(|_| anyhow::anyhow!("committer thread panicked"))?;
    if let Some(reason) = fatal.lock().unwrap_or_else(|p| p.into_inner()).take() {
        anyhow::bail!("{reason}");
    }
    result?;
    if !committed {
        anyhow::bail!("the last checkpoint commit failed (see the log); what was published is covered by the Redis-side marks, so the next start publishes nothing twice");
    }
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
        prune(&store, Duration::from_secs(3600), &[], None);
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

    fn info(ino: u64, generation: u32) -> Arc<FileInfo> {
        FileInfo::new(
            0,
            FileKey { dev: 7, ino },
            Fingerprint { len: 4, hash: 42 },
            None,
            generation,
            format!("/nonexistent/{ino}.log"),
        )
    }

    #[test]
    fn tracker_never_moves_past_an_unacknowledged_batch() {
        let mut t = Tracker::default();
        let f = info(1, 0);
        let g = info(2, 0);
        for end in [10, 20, 30] {
            t.issued(Issued {
                file: f.clone(),
                end,
            });
        }
        t.issued(Issued {
            file: g.clone(),
            end: 5,
        });
        // Out of order: 20 and 30 before 10. Nothing may move for f.
        t.ack(&f, 20);
        t.ack(&f, 30);
        assert!(
            !t.dirty.contains_key(&(0, f.key)),
            "moved past the unacked 0..10"
        );
        // Another file is independent.
        t.ack(&g, 5);
        assert_eq!(t.dirty[&(0, g.key)].1, 5);
        // The gap fills: straight to the end of the contiguous prefix.
        t.ack(&f, 10);
        assert_eq!(t.dirty[&(0, f.key)].1, 30);
        assert!(t.outstanding.is_empty());
        // In order, one at a time.
        t.issued(Issued {
            file: f.clone(),
            end: 40,
        });
        t.issued(Issued {
            file: f.clone(),
            end: 50,
        });
        t.ack(&f, 40);
        assert_eq!(t.dirty[&(0, f.key)].1, 40);
        // An ack for a batch never issued is ignored.
        t.ack(&f, 45);
        assert_eq!(t.dirty[&(0, f.key)].1, 40);
        t.ack(&f, 50);
        assert_eq!(t.dirty[&(0, f.key)].1, 50);
        assert_eq!(t.untracked, 0);
    }

    #[test]
    fn tracker_untracked_acks_never_go_backwards_but_a_truncation_moves_on() {
        let mut t = Tracker::default();
        let f = info(1, 0);
        t.ack(&f, 30);
        t.ack(&f, 20);
        assert_eq!(t.dirty[&(0, f.key)].1, 30, "went backwards");
        // Truncated in place: generation 1 starts again from 0, and that is later.
        let f1 = info(1, 1);
        t.ack(&f1, 5);
        let (fi, end) = &t.dirty[&(0, f.key)];
        assert_eq!((fi.generation, *end), (1, 5));
        t.ack(&f, 40);
        let (fi, end) = &t.dirty[&(0, f.key)];
        assert_eq!((fi.generation, *end), (1, 5), "an older generation won");
    }

    /// A store whose commits (and flushes) fail while `fail` is set.
    struct Flaky {
        inner: CheckpointStore,
        fail: std::sync::atomic::AtomicBool,
        commits: std::sync::atomic::AtomicUsize,
    }

    impl Checkpoints for Flaky {
        fn all(&self) -> Result<Vec<Checkpoint>, StateError> {
            self.inner.all()
        }
        fn commit(&self, updates: &[Checkpoint]) -> Result<(), StateError> {
            self.commits
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StateError::Io {
                    path: "/test/flaky".into(),
                    source: std::io::Error::other("injected failure"),
                });
            }
            self.inner.commit(updates)
        }
        fn remove(&self, source: &str, key: FileKey) -> Result<(), StateError> {
            self.inner.remove(source, key)
        }
        fn flush(&self) -> Result<(), StateError> {
            self.inner.flush()
        }
        fn export_snapshot(&self) -> Result<(), StateError> {
            self.inner.export_snapshot()
        }
    }

    fn ack(f: &Arc<FileInfo>, end: u64) -> Ack {
        Ack {
            file: f.clone(),
            end,
            read_bytes: 10,
            lines: 1,
        }
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_failed_commit_keeps_the_updates_of_quiet_files_and_retries_them() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Flaky {
            inner: CheckpointStore::open(&dir.path().join("state")).unwrap(),
            fail: true.into(),
            commits: 0.into(),
        });
        let (ack_tx, ack_rx) = bounded::<Ack>(16);
        let (iss_tx, iss_rx) = crossbeam_channel::unbounded::<Issued>();
        let opts = CommitterOpts {
            interval: Duration::from_millis(20),
            names: vec!["s".into()],
            retention: Duration::from_secs(3600),
            marks: None,
            globs: Vec::new(),
        };
        let st = store.clone();
        let h = std::thread::spawn(move || committer(Some(st), ack_rx, Some(iss_rx), opts, |_| {}));
        let quiet = info(1, 0);
        let busy = info(2, 0);
        let offset = |f: &Arc<FileInfo>| store.inner.get("s", f.key).unwrap().map(|c| c.offset);
        for (f, end) in [(&quiet, 10), (&busy, 10), (&busy, 20)] {
            iss_tx
                .send(Issued {
                    file: f.clone(),
                    end,
                })
                .unwrap();
        }
        for (f, end) in [(&quiet, 10), (&busy, 10)] {
            ack_tx.send(ack(f, end)).unwrap();
        }
        // Commits fail for a while: nothing is stored, and nothing is dropped.
        let n = store.commits.load(SeqCst);
        wait_for("three failed commits", || {
            store.commits.load(SeqCst) >= n + 3
        });
        assert_eq!(offset(&quiet), None);
        // A newer ack for the busy file while failing overwrites its pending update.
        ack_tx.send(ack(&busy, 20)).unwrap();
        let n = store.commits.load(SeqCst);
        wait_for("two more failed commits", || {
            store.commits.load(SeqCst) >= n + 2
        });
        // The store recovers: the quiet file (no ack since) is committed too.
        store.fail.store(false, SeqCst);
        wait_for("both committed", || {
            offset(&quiet) == Some(10) && offset(&busy) == Some(20)
        });
        // The snapshot agrees with the store (it is exported just after the commit).
        wait_for("the snapshot has both", || {
            redtail_state::read_snapshot(&dir.path().join("state"))
                .ok()
                .flatten()
                .is_some_and(|snap| snap.checkpoints.len() == 2)
        });
        // A failing last commit is reported.
        iss_tx
            .send(Issued {
                file: quiet.clone(),
                end: 30,
            })
            .unwrap();
        store.fail.store(true, SeqCst);
        ack_tx.send(ack(&quiet, 30)).unwrap();
        drop(ack_tx);
        assert!(!h.join().unwrap(), "a failed last commit was not reported");
        assert_eq!(
            offset(&quiet),
            Some(10),
            "never ahead of what was committed"
        );
    }

    #[test]
    fn committer_holds_a_checkpoint_behind_an_unacknowledged_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(CheckpointStore::open(&dir.path().join("state")).unwrap());
        let (ack_tx, ack_rx) = bounded::<Ack>(16);
        let (iss_tx, iss_rx) = crossbeam_channel::unbounded::<Issued>();
        let opts = CommitterOpts {
            interval: Duration::from_millis(10),
            names: vec!["s".into()],
            retention: Duration::from_secs(3600),
            marks: None,
            globs: Vec::new(),
        };
        let st = store.clone();
        let h = std::thread::spawn(move || committer(Some(st), ack_rx, Some(iss_rx), opts, |_| {}));
        let f = info(1, 0);
        for end in [10, 20, 30] {
            iss_tx
                .send(Issued {
                    file: f.clone(),
                    end,
                })
                .unwrap();
        }
        ack_tx.send(ack(&f, 20)).unwrap();
        ack_tx.send(ack(&f, 30)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(store.get("s", f.key).unwrap(), None);
        ack_tx.send(ack(&f, 10)).unwrap();
        wait_for("the checkpoint at 30", || {
            store.get("s", f.key).unwrap().map(|c| c.offset) == Some(30)
        });
        drop(ack_tx);
        assert!(h.join().unwrap());
    }

    #[test]
    fn prune_keeps_what_it_cannot_check_and_files_renamed_or_globbed_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(&dir.path().join("state")).unwrap();
        let logs = dir.path().join("logs");
        let other = dir.path().join("other");
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let key_of = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            FileKey {
                dev: m.dev(),
                ino: m.ino(),
            }
        };
        // Renamed in its directory (the follower finds it there at start-up).
        let renamed = logs.join("app.log.1");
        std::fs::write(&renamed, "r\n").unwrap();
        // Moved to another directory that the configured globs match.
        let moved = other.join("moved.log");
        std::fs::write(&moved, "m\n").unwrap();
        // A path that cannot be checked now (ELOOP here; EACCES, EIO, ESTALE alike).
        let looped = logs.join("loop");
        std::os::unix::fs::symlink(&looped, &looped).unwrap();
        let cp = |path: &Path, key: FileKey| Checkpoint {
            btime: None,
            source: "s".into(),
            key,
            fingerprint: Fingerprint { len: 2, hash: 1 },
            generation: 0,
            offset: 2,
            path: path.to_str().unwrap().into(),
            updated_ms: 1_000,
        };
        store
            .commit(&[
                cp(&logs.join("app.log"), key_of(&renamed)),
                cp(&logs.join("moved.log"), key_of(&moved)),
                cp(&looped, FileKey { dev: 1, ino: 9 }),
                cp(&logs.join("gone.log"), FileKey { dev: 1, ino: 10 }),
            ])
            .unwrap();
        let globs = vec![format!("{}/*.log", other.display())];
        // Redis unreachable: the marks cannot go, so nothing is pruned (retried later).
        let mut down = MarksCleaner {
            client: redis::Client::open("redis://127.0.0.1:1/0").unwrap(),
            keys: [("s".to_string(), "{logs:s}:redtail:marks".to_string())].into(),
            timeout: Duration::from_millis(200),
        };
        assert_eq!(
            prune(&store, Duration::from_secs(1), &globs, Some(&mut down)),
            0
        );
        assert_eq!(store.all().unwrap().len(), 4);
        // Without marks to remove, only the file that is certainly gone goes.
        assert_eq!(prune(&store, Duration::from_secs(1), &globs, None), 1);
        let left: Vec<u64> = store.all().unwrap().iter().map(|c| c.key.ino).collect();
        assert_eq!(left.len(), 3, "{left:?}");
        assert!(!left.contains(&10));
    }
}
