//! The follower: finds files, tells them apart by identity, reads appended bytes and cuts
//! them into whole records. It is the only part of redtail that touches log files.
//!
//! It is a synchronous state machine driven by [`Follower::tick`]: the thread around it
//! (see [`run_thread`]) only decides *when* to tick — on a notify hint, on a timer, or in a
//! loop for backfill. Tests drive `tick` directly, without notify and without sleeps.
//!
//! ```text
//!   discovered ──open──▶ Live ──path now names another file / vanished──▶ Gone
//!                         │  ▲                                              │
//!            truncated:   │  │ grows again                  drained to EOF, │
//!            gen+1, off 0 ┘  └─ (closed while idle when                     │ idle rotate_wait
//!                               over max_open_files)                        ▼
//!                                                                      closed, forgotten
//! ```
//!
//! Identity rules, each decided in one place:
//! - **renamed**: same (dev, inode) seen under a new path → update the path, keep the fd
//!   ([`Follower::discover`]).
//! - **rotated**: the path now names a different (dev, inode), or no longer exists → the old
//!   file is `Gone`: keep reading it to its end, close it `rotate_wait` after its last byte;
//!   the new file at the path is a new file, read from 0.
//! - **truncated**: fstat size below our read position, or the fingerprint (hash of the first
//!   line, up to 256 bytes) changed → generation + 1, read from 0 ([`Tracked::truncated`]).
//! - **checkpoint mismatch**: a checkpoint for the same (dev, inode) whose fingerprint does not
//!   match the file → inode reuse → a new file, read from 0 ([`start_point`]).

pub mod hints;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memchr::memchr;
use redtail_state::Checkpoint;
use tracing::{debug, error, info, warn};

use crate::config::{Config, Multiline, StartAt};
use crate::record::{Batch, FileInfo, FileKey, Fingerprint, Span, SpanKind};
use crate::stats::{add, STATS};

/// Quiet files are polled on this grid (see `service`).
const POLL_GRID: Duration = Duration::from_millis(10);

/// Bytes hashed for a file's fingerprint: its first line, at most this many bytes.
pub const FINGERPRINT_MAX: usize = 256;

/// What the follower needs from the configuration.
#[derive(Debug, Clone)]
pub struct Options {
    pub read_chunk: usize,
    pub max_batch_bytes: usize,
    /// Longest record kept whole; longer lines become `Oversize` spans holding this prefix.
    pub line_cap: usize,
    pub rotate_wait: Duration,
    pub partial_timeout: Option<Duration>,
    pub glob_interval: Duration,
    pub poll_interval: Duration,
    pub max_open_files: usize,
    /// Backfill: read every file to its end once; never release a last line without newline.
    pub once: bool,
}

impl Options {
    pub fn from_config(cfg: &Config, once: bool) -> Options {
        let a = &cfg.agent;
        Options {
            read_chunk: a.read_chunk_bytes,
            // Small batches keep memory low; the publisher still sends many per pipeline.
            max_batch_bytes: (cfg.redis.batch_max_bytes / 32).clamp(16 << 10, 1 << 20),
            line_cap: a.dead_letter_line_cap.max(a.max_line_bytes),
            rotate_wait: a.rotate_wait,
            partial_timeout: (!a.partial_line_timeout.is_zero()).then_some(a.partial_line_timeout),
            glob_interval: a.glob_interval,
            poll_interval: a.poll_interval,
            max_open_files: a.max_open_files,
            once,
        }
    }
}

/// Per-source settings the follower uses.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    pub name: String,
    pub paths: Vec<String>,
    pub exclude: Vec<glob::Pattern>,
    pub start_at: StartAt,
    pub multiline: Option<Multiline>,
    /// `paths`, compiled (for notify hints about files not followed yet).
    pub globs: Vec<glob::Pattern>,
}

impl SourceSpec {
    pub fn from_config(cfg: &Config) -> Vec<SourceSpec> {
        cfg.sources
            .iter()
            .map(|s| SourceSpec {
                name: s.name.clone(),
                paths: s.paths.clone(),
                exclude: s.exclude.clone(),
                start_at: s.start_at,
                multiline: s.multiline.clone(),
                globs: s
                    .paths
                    .iter()
                    .filter_map(|p| glob::Pattern::new(p).ok())
                    .collect(),
            })
            .collect()
    }

    /// Would discovery pick this path up?
    fn matches(&self, path: &Path) -> bool {
        !self.excluded(path) && self.globs.iter().any(|g| g.matches_path(path))
    }

    fn excluded(&self, path: &Path) -> bool {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        self.exclude
            .iter()
            .any(|p| p.matches(name) || p.matches_path(path))
    }
}

/// Where reading starts, and whether Redis should already hold what lies before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    pub offset: u64,
    pub generation: u32,
    /// Resumed from a checkpoint (Redis should hold a mark at `offset`).
    pub resumed: bool,
    /// The checkpoint's fingerprint, reused when resuming.
    pub fingerprint: Option<Fingerprint>,
}

/// The start-point rule, in one place. Inputs: the local checkpoint for this (dev, inode),
/// the fingerprint the file has now, the Redis-side mark for (dev, inode, that fingerprint),
/// the size, and whether this is start-up.
///
/// 1. A checkpoint describing this content (same fingerprint) resumes at its offset, or —
///    if the file is now shorter — starts the next generation at 0 (truncated while away).
///    A checkpoint with another fingerprint means the inode now holds other content: read
///    from 0. Generations count within one mark field (dev, inode, fingerprint) only.
/// 2. No checkpoint: `start_at` applies to files present at start-up; files that appear
///    later start at 0 (everything in them is new).
/// 3. The Redis mark wins when it is ahead: it is written atomically with the entries, so it
///    is the truth about what was published (the sled checkpoint lags by up to one commit
///    interval, and is lost with a corrupt store).
pub fn start_point(
    cp: Option<&Checkpoint>,
    current_fp: Option<Fingerprint>,
    mark: Option<(u32, u64)>,
    size: u64,
    startup: bool,
    start_at: StartAt,
    end_boundary: impl FnOnce() -> u64,
) -> Start {
    let mut start = match cp {
        Some(cp) if current_fp == Some(cp.fingerprint) && size >= cp.offset => Start {
            offset: cp.offset,
            generation: cp.generation,
            resumed: true,
            fingerprint: Some(cp.fingerprint),
        },
        Some(cp) if current_fp == Some(cp.fingerprint) => Start {
            offset: 0,
            generation: cp.generation + 1,
            resumed: false,
            fingerprint: None,
        },
        // Other content: another mark field, whose generations owe nothing to this
        // checkpoint's (the mark below, if any, says where that content stands).
        Some(_) => Start {
            offset: 0,
            generation: 0,
            resumed: false,
            fingerprint: None,
        },
        None => Start {
            offset: if startup && start_at == StartAt::End {
                end_boundary()
            } else {
                0
            },
            generation: 0,
            resumed: false,
            fingerprint: None,
        },
    };
    if let Some((g, o)) = mark {
        if (g, o) > (start.generation, start.offset) || (g == start.generation && !start.resumed) {
            start = if size >= o {
                Start {
                    offset: o,
                    generation: g,
                    resumed: true,
                    fingerprint: current_fp,
                }
            } else {
                // Published up to `o` in generation `g`, but the file is shorter now.
                Start {
                    offset: 0,
                    generation: g + 1,
                    resumed: false,
                    fingerprint: None,
                }
            };
        }
    }
    start
}

/// Where the follower learns the Redis-side high-water mark of a file.
pub trait Marks: Send {
    /// The mark of `field` in the marks hash of source `source`'s stream, if any;
    /// `Err(())` when Redis cannot be asked right now (the caller tries again later).
    #[allow(clippy::result_unit_err)]
    fn get(&mut self, source: usize, field: &str) -> Result<Option<(u32, u64)>, ()>;
}

/// No Redis: for tests and `backfill --dry-run`.
pub struct NoMarks;

impl Marks for NoMarks {
    fn get(&mut self, _: usize, _: &str) -> Result<Option<(u32, u64)>, ()> {
        Ok(None)
    }
}

/// FNV-1a, 64 bit: stable across versions and platforms, which a std `Hasher` is not.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Fingerprint of an open file: hash of its first line (with the newline), at most
/// [`FINGERPRINT_MAX`] bytes. None for an empty file.
pub fn fingerprint_of(file: &File) -> std::io::Result<Option<Fingerprint>> {
    let mut buf = [0u8; FINGERPRINT_MAX];
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    if n == 0 {
        return Ok(None);
    }
    let len = memchr(b'\n', &buf[..n]).map(|i| i + 1).unwrap_or(n);
    Ok(Some(Fingerprint {
        len: len as u32,
        hash: fnv1a(&buf[..len]),
    }))
}

/// Does the file still start with the bytes `fp` describes?
pub fn fingerprint_matches(file: &File, fp: Fingerprint) -> bool {
    let mut buf = [0u8; FINGERPRINT_MAX];
    let want = (fp.len as usize).min(FINGERPRINT_MAX);
    let mut n = 0;
    while n < want {
        match file.read_at(&mut buf[n..want], n as u64) {
            Ok(0) => return false,
            Ok(k) => n += k,
            Err(_) => return false,
        }
    }
    fnv1a(&buf[..want]) == fp.hash
}

/// Offset just past the last newline at or before `size`: where `start_at = "end"` begins,
/// so that a line being written right now is not cut in half.
fn end_boundary(file: &File, size: u64) -> u64 {
    let mut pos = size;
    let mut buf = vec![0u8; 64 << 10];
    while pos > 0 {
        let from = pos.saturating_sub(buf.len() as u64);
        let len = (pos - from) as usize;
        let Ok(n) = file.read_at(&mut buf[..len], from) else {
            return size;
        };
        if let Some(i) = memchr::memrchr(b'\n', &buf[..n]) {
            return from + i as u64 + 1;
        }
        pos = from;
    }
    0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Live,
    /// Rotated away, renamed out of the globs, or deleted: drain, then close.
    Gone {
        since: Instant,
    },
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    start: u64,
    /// End of the last line, excluding its newline.
    end: u64,
    lines: u32,
}

struct Oversize {
    start: u64,
    kept: Vec<u8>,
    total: u64,
}

struct Tracked {
    source: usize,
    key: FileKey,
    path: PathBuf,
    file: Option<File>,
    info: Option<Arc<FileInfo>>,
    fingerprint: Option<Fingerprint>,
    generation: u32,
    /// Next byte to read.
    pos: u64,
    /// Bytes `[carry_start, pos)`, not yet handed out.
    carry: Vec<u8>,
    carry_start: u64,
    /// Bytes before this (absolute) have been scanned for newlines.
    scan: u64,
    /// Bytes before this (absolute) belong to finished records in `spans`.
    done: u64,
    spans: Vec<Span>,
    pending: Option<Pending>,
    oversize: Option<Oversize>,
    /// The next batch is the first since a start that Redis holds no mark for.
    fresh: bool,
    last_data: Instant,
    next_poll: Instant,
    backoff: Duration,
    state: State,
    seen_round: u64,
    at_eof: bool,
    /// The first bytes changed under us: treat as a truncation at the next read.
    rewritten: bool,
}

impl Tracked {
    fn unterminated(&self) -> u64 {
        self.pos - self.scan_line_start()
    }

    /// Start of the line being written (after the last newline seen).
    fn scan_line_start(&self) -> u64 {
        self.scan
    }

    fn buffered_done(&self) -> usize {
        (self.done - self.carry_start) as usize
    }

    fn info(&mut self) -> Arc<FileInfo> {
        if let Some(i) = &self.info {
            return i.clone();
        }
        let fp = match (self.fingerprint, &self.file) {
            (Some(fp), _) => fp,
            (None, Some(f)) => fingerprint_of(f).ok().flatten().unwrap_or(Fingerprint {
                len: 0,
                hash: fnv1a(b""),
            }),
            (None, None) => Fingerprint {
                len: 0,
                hash: fnv1a(b""),
            },
        };
        self.fingerprint = Some(fp);
        let info = FileInfo::new(
            self.source,
            self.key,
            fp,
            self.generation,
            self.path.to_string_lossy().into_owned(),
        );
        self.info = Some(info.clone());
        info
    }

    fn set_path(&mut self, path: PathBuf) {
        if self.path != path {
            self.path = path;
            self.info = None;
        }
    }
}

/// What one tick did.
#[derive(Debug, Default, Clone, Copy)]
pub struct TickReport {
    pub batches: u64,
    pub bytes: u64,
    /// When the follower wants the next tick at the latest.
    pub next: Option<Instant>,
    /// Backfill: every file has been read to its end.
    pub finished: bool,
    /// The sink refused a batch (shutdown).
    pub stopped: bool,
}

/// The sink the follower hands batches to. Returns false when the pipeline is shutting down.
pub trait Sink {
    fn send(&mut self, batch: Batch) -> bool;
    /// A buffer to cut the next batch into (recycled from published batches when possible).
    fn buffer(&mut self) -> Vec<u8> {
        Vec::new()
    }
}

impl<F: FnMut(Batch) -> bool> Sink for F {
    fn send(&mut self, batch: Batch) -> bool {
        self(batch)
    }
}

/// The follower. See the module docs.
pub struct Follower {
    opts: Options,
    sources: Vec<SourceSpec>,
    files: HashMap<(usize, FileKey), Tracked>,
    checkpoints: HashMap<(usize, FileKey), Checkpoint>,
    next_seq: u64,
    last_discovery: Option<Instant>,
    discover_now: bool,
    round: u64,
    startup: bool,
    dirty: HashSet<PathBuf>,
    warned_missing: HashSet<String>,
    /// Directories worth watching (parents of globs and of followed files).
    pub watch_dirs: HashSet<PathBuf>,
    marks: Box<dyn Marks>,
    /// The start-up search for files rotated while stopped has run to the end.
    rotated_scan_done: bool,
    /// Files present at start-up whose opening waits for Redis (they keep `start_at`).
    /// (Their `start_at = "end"` position as it was at start-up.)
    startup_deferred: HashMap<(usize, FileKey), u64>,
    /// Path → followed files, for notify hints; rebuilt after discovery changed things.
    path_index: HashMap<PathBuf, Vec<(usize, FileKey)>>,
    index_stale: bool,
    epoch: Instant,
    /// inotify hints are flowing (polls can be slower).
    pub hinted: bool,
}

impl Follower {
    /// A follower over `sources`, resuming from `checkpoints` (all sources).
    pub fn new(
        opts: Options,
        sources: Vec<SourceSpec>,
        checkpoints: Vec<Checkpoint>,
        marks: Box<dyn Marks>,
    ) -> Self {
        let by_name: HashMap<&str, usize> = sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let checkpoints = checkpoints
            .into_iter()
            .filter_map(|c| by_name.get(c.source.as_str()).map(|&i| ((i, c.key), c)))
            .collect();
        Follower {
            opts,
            sources,
            files: HashMap::new(),
            checkpoints,
            next_seq: 0,
            last_discovery: None,
            discover_now: true,
            round: 0,
            startup: true,
            dirty: HashSet::new(),
            warned_missing: HashSet::new(),
            watch_dirs: HashSet::new(),
            marks,
            rotated_scan_done: false,
            startup_deferred: HashMap::new(),
            path_index: HashMap::new(),
            index_stale: true,
            epoch: Instant::now(),
            hinted: false,
        }
    }

    /// Number of files being followed.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Total size of the followed files and how much of it is already read (for progress).
    pub fn progress(&self) -> (u64, u64) {
        let mut total = 0;
        let mut done = 0;
        for f in self.files.values() {
            let size = f
                .file
                .as_ref()
                .and_then(|h| h.metadata().ok())
                .map(|m| m.len())
                .unwrap_or(f.pos);
            total += size;
            done += f.pos.min(size);
        }
        (total, done)
    }

    /// Bytes not yet read, and held-back partial lines (for the backfill summary).
    pub fn held_back(&self) -> (u64, usize) {
        let mut bytes = 0;
        let mut files = 0;
        for f in self.files.values() {
            let b = f.pos - f.done;
            if b > 0 {
                bytes += b;
                files += 1;
            }
        }
        (bytes, files)
    }

    /// A notify hint: something happened at `path`.
    pub fn hint(&mut self, path: PathBuf) {
        self.dirty.insert(path);
    }

    /// Notify lost events or a directory changed: look for files again now.
    pub fn rescan(&mut self) {
        self.discover_now = true;
    }

    /// One step: discover if due, read what is new, release what timed out, close what is
    /// done. Hands batches to `sink`, which may block (backpressure).
    pub fn tick(&mut self, now: Instant, sink: &mut dyn Sink) -> TickReport {
        let mut report = TickReport::default();
        let discovery_due = self.discover_now
            || self
                .last_discovery
                .is_none_or(|t| now.duration_since(t) >= self.opts.glob_interval);
        if !self.dirty.is_empty() {
            let dirty = std::mem::take(&mut self.dirty);
            if self.index_stale {
                self.path_index.clear();
                for (k, f) in &self.files {
                    self.path_index.entry(f.path.clone()).or_default().push(*k);
                }
                self.index_stale = false;
            }
            for p in &dirty {
                match self.path_index.get(p) {
                    Some(keys) => {
                        for k in keys {
                            if let Some(f) = self.files.get_mut(k) {
                                f.next_poll = now;
                            }
                        }
                    }
                    // A file we do not follow yet: worth a discovery only if some source's
                    // globs match it (a busy /var/log is full of files nobody asked for).
                    None => {
                        if self.sources.iter().any(|s| s.matches(p)) {
                            self.discover_now = true;
                        }
                    }
                }
            }
        }
        if discovery_due || self.discover_now {
            self.index_stale = true;
            self.discover(now);
            self.last_discovery = Some(now);
            self.discover_now = false;
        }

        // Only files whose poll is due: with a thousand quiet files a tick must not cost a
        // thousand map operations.
        let once = self.opts.once;
        let keys: Vec<(usize, FileKey)> = self
            .files
            .iter()
            .filter(|(_, f)| once || f.next_poll <= now || f.file.is_none())
            .map(|(k, _)| *k)
            .collect();
        let mut finished = true;
        let mut to_close = Vec::new();
        for k in keys {
            let Some(mut f) = self.files.remove(&k) else {
                continue;
            };
            let keep = self.service(&mut f, now, sink, &mut report);
            if report.stopped {
                self.files.insert(k, f);
                return report;
            }
            if !f.at_eof {
                finished = false;
            }
            if !keep {
                to_close.push(k);
            }
            self.files.insert(k, f);
        }
        for k in to_close {
            self.index_stale = true;
            if let Some(f) = self.files.remove(&k) {
                debug!(path = %f.path.display(), offset = f.pos, "closed file");
            }
        }
        self.enforce_open_limit();
        self.startup = false;
        report.finished = self.opts.once && finished;
        let mut next = self
            .last_discovery
            .map(|t| t + self.opts.glob_interval)
            .unwrap_or(now);
        for f in self.files.values() {
            if f.file.is_some() {
                next = next.min(f.next_poll);
            }
        }
        report.next = Some(next);
        report
    }

    /// Reads one file as far as is useful now, emits its batches; false = close it.
    fn service(
        &mut self,
        f: &mut Tracked,
        now: Instant,
        sink: &mut dyn Sink,
        report: &mut TickReport,
    ) -> bool {
        if f.file.is_none() {
            // Closed while idle (open-file limit); discovery reopens it when it grows. A
            // closed file that is no longer reachable by path is forgotten.
            f.at_eof = true;
            return f.state == State::Live;
        }
        if f.next_poll > now && !self.opts.once {
            return true;
        }
        let budget = self.opts.max_batch_bytes * 4;
        let mut read_now = 0usize;
        loop {
            // Size check first: one fstat tells EOF, growth and truncation apart.
            let size = match f.file.as_ref().unwrap().metadata() {
                Ok(m) => m.len(),
                Err(e) => {
                    warn!(path = %f.path.display(), error = %e, "cannot stat open file; will retry");
                    break;
                }
            };
            if size < f.pos || f.rewritten {
                f.rewritten = false;
                if !self.truncated(f, sink, report) {
                    return true;
                }
                continue;
            }
            if size == f.pos {
                f.at_eof = true;
                break;
            }
            // Growing again after a pause: make sure it is still the same content. A file
            // truncated and rewritten past our position between two polls looks like
            // growth by size alone (copytruncate followed by a burst of writes).
            if f.at_eof && f.pos > 0 {
                if let (Some(h), Some(fp)) = (&f.file, f.fingerprint) {
                    if !fingerprint_matches(h, fp) {
                        f.rewritten = true;
                        continue;
                    }
                }
            }
            f.at_eof = false;
            match self.read_some(f, size) {
                Ok(0) => {
                    f.at_eof = true;
                    break;
                }
                Ok(n) => {
                    read_now += n;
                    f.last_data = now;
                    report.bytes += n as u64;
                    self.cut(f, sink, report);
                    if report.stopped {
                        return true;
                    }
                    if f.buffered_done() >= self.opts.max_batch_bytes && !self.emit(f, sink, report)
                    {
                        return true;
                    }
                    if read_now >= budget {
                        break;
                    }
                }
                Err(e) => {
                    warn!(path = %f.path.display(), offset = f.pos, error = %e, "read failed; will retry");
                    break;
                }
            }
        }
        // Timeouts: a multiline record that saw no new line, a last line without newline.
        let idle = now.saturating_duration_since(f.last_data);
        if let (Some(p), Some(ml)) = (f.pending, &self.sources[f.source].multiline) {
            if f.at_eof && (idle >= ml.timeout || self.opts.once) {
                Self::finish_pending(f, p);
            }
        }
        let gone_and_idle = matches!(f.state, State::Gone { since } if f.at_eof
            && now.saturating_duration_since(since.max(f.last_data)) >= self.opts.rotate_wait);
        if gone_and_idle {
            if let Some(p) = f.pending.take() {
                Self::finish_pending(f, p);
            }
        }
        let partial_due = !self.opts.once
            && f.at_eof
            && f.unterminated() > 0
            && f.oversize.is_none()
            && (gone_and_idle || self.opts.partial_timeout.is_some_and(|t| idle >= t));
        if partial_due {
            if let Some(p) = f.pending.take() {
                Self::finish_pending(f, p);
            }
            let start = f.scan;
            let len = f.pos - start;
            f.spans.push(Span {
                start: (start - f.carry_start) as u32,
                len: len as u32,
                offset: start,
                kind: SpanKind::Partial,
            });
            f.scan = f.pos;
            f.done = f.pos;
            add(&STATS.partial_lines_flushed, 1);
            info!(path = %f.path.display(), offset = start, bytes = len, "released a last line without newline");
        }
        if f.done > f.carry_start && !self.emit(f, sink, report) {
            return true;
        }
        if f.at_eof {
            // With inotify hints a quiet file is woken by its events; the poll is only the
            // safety net for lost events, so it can be slower.
            let cap = if self.hinted {
                self.opts.poll_interval.max(Duration::from_secs(1))
            } else {
                self.opts.poll_interval
            };
            f.backoff = (f.backoff * 2).clamp(Duration::from_millis(1), cap);
            f.next_poll = now + f.backoff;
            if f.backoff >= POLL_GRID {
                // Quiet files share wake-ups on a 10 ms grid instead of each waking the
                // thread at its own instant.
                let since = f.next_poll.saturating_duration_since(self.epoch).as_nanos();
                let grid = POLL_GRID.as_nanos();
                let up = (grid - since % grid) % grid;
                f.next_poll += Duration::from_nanos(up as u64);
            }
        } else {
            f.backoff = Duration::ZERO;
            f.next_poll = now;
        }
        if gone_and_idle {
            let lost = f.pos - f.done;
            if lost > 0 && f.oversize.is_none() {
                add(&STATS.lost_bytes, lost);
                warn!(path = %f.path.display(), bytes = lost, "closing a rotated file with bytes that never became a whole record");
            }
            info!(path = %f.path.display(), offset = f.pos, "rotated file drained; closing");
            return false;
        }
        true
    }

    /// Reads what the file has beyond `pos` (up to `size` as fstat said, at most one
    /// chunk). Sized to what is there, so a quiet file with a few new lines does not get a
    /// chunk-sized buffer: a thousand followed files must not cost a thousand chunks.
    fn read_some(&mut self, f: &mut Tracked, size: u64) -> std::io::Result<usize> {
        let chunk = (size.saturating_sub(f.pos) as usize)
            .max(4096)
            .min(self.opts.read_chunk);
        let len = f.carry.len();
        f.carry.reserve(chunk);
        // SAFETY-free approach: zero-extend, read, truncate. The memset is cheap next to the
        // read syscall and keeps the code free of uninitialised memory.
        f.carry.resize(len + chunk, 0);
        let file = f.file.as_mut().unwrap();
        let n = loop {
            match file.read(&mut f.carry[len..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    f.carry.truncate(len);
                    return Err(e);
                }
            }
        };
        f.carry.truncate(len + n);
        f.pos += n as u64;
        add(&STATS.bytes_read, n as u64);
        Ok(n)
    }

    /// Scans newly read bytes for newlines and turns complete lines into records.
    fn cut(&mut self, f: &mut Tracked, sink: &mut dyn Sink, report: &mut TickReport) {
        if f.oversize.is_some() {
            if !self.continue_oversize(f, sink, report) {
                return;
            }
            if f.oversize.is_some() {
                return;
            }
        }
        let ml = self.sources[f.source].multiline.clone();
        loop {
            let from = (f.scan - f.carry_start) as usize;
            let Some(i) = memchr(b'\n', &f.carry[from..]) else {
                break;
            };
            let ls = f.scan;
            let le = ls + i as u64;
            f.scan = le + 1;
            add(&STATS.records_read, 1);
            match &ml {
                None => {
                    f.spans.push(Span {
                        start: (ls - f.carry_start) as u32,
                        len: (le - ls) as u32,
                        offset: ls,
                        kind: SpanKind::Line,
                    });
                    f.done = le + 1;
                }
                Some(ml) => {
                    let line =
                        &f.carry[(ls - f.carry_start) as usize..(le - f.carry_start) as usize];
                    let starts = match (&ml.start, &ml.continuation) {
                        (Some(s), _) => s.is_match(line),
                        (None, Some(c)) => !c.is_match(line),
                        (None, None) => true,
                    };
                    if let Some(p) = f.pending {
                        let too_big = le - p.start > ml.max_bytes as u64 || p.lines >= ml.max_lines;
                        if starts || too_big {
                            Self::finish_pending(f, p);
                        }
                    }
                    match &mut f.pending {
                        Some(p) => {
                            p.end = le;
                            p.lines += 1;
                        }
                        None => {
                            f.pending = Some(Pending {
                                start: ls,
                                end: le,
                                lines: 1,
                            })
                        }
                    }
                }
            }
        }
        // A line with no newline yet that is already past the cap: keep its head, skip the rest.
        if f.pos - f.scan > self.opts.line_cap as u64 {
            if let Some(p) = f.pending.take() {
                Self::finish_pending(f, p);
            }
            if f.done > f.carry_start && !self.emit(f, sink, report) {
                return;
            }
            let from = (f.scan - f.carry_start) as usize;
            let mut kept = f.carry[from..].to_vec();
            kept.truncate(self.opts.line_cap);
            f.oversize = Some(Oversize {
                start: f.scan,
                kept,
                total: f.pos - f.scan,
            });
            f.carry.clear();
            f.carry_start = f.pos;
            f.scan = f.pos;
            f.done = f.pos;
        }
    }

    /// Skipping the tail of an over-long line; false when the sink stopped.
    fn continue_oversize(
        &mut self,
        f: &mut Tracked,
        sink: &mut dyn Sink,
        report: &mut TickReport,
    ) -> bool {
        let o = f.oversize.as_mut().unwrap();
        let nl = memchr(b'\n', &f.carry);
        let upto = nl.unwrap_or(f.carry.len());
        let room = self.opts.line_cap.saturating_sub(o.kept.len());
        o.kept.extend_from_slice(&f.carry[..upto.min(room)]);
        o.total += upto as u64;
        match nl {
            None => {
                f.carry.clear();
                f.carry_start = f.pos;
                f.scan = f.pos;
                f.done = f.pos;
                true
            }
            Some(i) => {
                let o = f.oversize.take().unwrap();
                add(&STATS.oversize_lines, 1);
                add(&STATS.records_read, 1);
                warn!(path = %f.path.display(), offset = o.start, bytes = o.total, "line longer than the dead-letter cap; its head goes to the dead-letter file");
                let end = f.carry_start + i as u64 + 1;
                let len = o.kept.len();
                let batch = Batch {
                    seq: self.take_seq(),
                    file: f.info(),
                    start: o.start,
                    end,
                    expect_mark: !std::mem::replace(&mut f.fresh, false),
                    bytes: o.kept,
                    spans: vec![Span {
                        start: 0,
                        len: len as u32,
                        offset: o.start,
                        kind: SpanKind::Oversize { total: o.total },
                    }],
                };
                f.carry.drain(..=i);
                f.carry_start = end;
                f.scan = end;
                f.done = end;
                report.batches += 1;
                if !sink.send(batch) {
                    report.stopped = true;
                    return false;
                }
                true
            }
        }
    }

    fn finish_pending(f: &mut Tracked, p: Pending) {
        f.spans.push(Span {
            start: (p.start - f.carry_start) as u32,
            len: (p.end - p.start) as u32,
            offset: p.start,
            kind: SpanKind::Line,
        });
        f.done = p.end + 1;
        f.pending = None;
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Hands out everything before `done` as one batch; false when the sink stopped.
    fn emit(&mut self, f: &mut Tracked, sink: &mut dyn Sink, report: &mut TickReport) -> bool {
        let n = f.buffered_done();
        if n == 0 {
            return true;
        }
        // The batch takes the buffer; the file keeps only its unfinished tail (a recycled
        // buffer when the file is busy, a small one when it is not).
        let tail = f.carry.len() - n;
        let mut rest = if f.at_eof {
            Vec::with_capacity(tail.max(256))
        } else {
            let mut b = sink.buffer();
            b.clear();
            b
        };
        rest.extend_from_slice(&f.carry[n..]);
        let mut bytes = std::mem::replace(&mut f.carry, rest);
        bytes.truncate(n);
        let spans = std::mem::take(&mut f.spans);
        let batch = Batch {
            seq: self.take_seq(),
            file: f.info(),
            start: f.carry_start,
            end: f.done,
            expect_mark: !std::mem::replace(&mut f.fresh, false),
            bytes,
            spans,
        };
        f.carry_start = f.done;
        report.batches += 1;
        if !sink.send(batch) {
            report.stopped = true;
            return false;
        }
        true
    }

    /// The file shrank below our position: emit what is whole, then start again at 0 with
    /// the next generation.
    fn truncated(&mut self, f: &mut Tracked, sink: &mut dyn Sink, report: &mut TickReport) -> bool {
        if let Some(p) = f.pending.take() {
            Self::finish_pending(f, p);
        }
        if !self.emit(f, sink, report) {
            return false;
        }
        let lost = f.pos - f.done;
        if lost > 0 {
            add(&STATS.lost_bytes, lost);
            warn!(path = %f.path.display(), bytes = lost, "file truncated while its last line was incomplete; those bytes are gone");
        }
        add(&STATS.truncations, 1);
        info!(path = %f.path.display(), offset = f.pos, generation = f.generation + 1, "file truncated; reading again from the start");
        f.generation += 1;
        f.fingerprint = None;
        f.info = None;
        f.pos = 0;
        f.carry.clear();
        f.carry_start = 0;
        f.scan = 0;
        f.done = 0;
        f.spans.clear();
        f.oversize = None;
        f.fresh = true;
        if let Some(h) = f.file.as_mut() {
            let _ = h.seek(SeekFrom::Start(0));
        }
        true
    }

    /// Expands every source's globs, starts following new files, and notices renames,
    /// rotations, deletions and rewrites of known ones.
    pub fn discover(&mut self, now: Instant) {
        self.round += 1;
        let round = self.round;
        // What each matched path named this round (dev, inode, size): the checks of known
        // files below reuse it instead of a second stat per file.
        let mut seen: HashMap<PathBuf, (FileKey, u64)> = HashMap::new();
        for si in 0..self.sources.len() {
            let patterns = self.sources[si].paths.clone();
            for pat in &patterns {
                if let Some(dir) = static_dir(pat) {
                    self.watch_dirs.insert(dir);
                }
                let paths = match glob::glob(pat) {
                    Ok(p) => p,
                    Err(e) => {
                        error!(pattern = %pat, error = %e, "bad glob");
                        continue;
                    }
                };
                let mut matched = false;
                for entry in paths {
                    let path = match entry {
                        Ok(p) => p,
                        Err(e) => {
                            warn!(error = %e, "cannot read a directory while expanding globs");
                            continue;
                        }
                    };
                    if self.sources[si].excluded(&path) {
                        continue;
                    }
                    let meta = match std::fs::metadata(&path) {
                        Ok(m) => m,
                        Err(_) => continue,
                    };
                    if !meta.is_file() {
                        continue;
                    }
                    matched = true;
                    let key = FileKey {
                        dev: meta.dev(),
                        ino: meta.ino(),
                    };
                    seen.insert(path.clone(), (key, meta.len()));
                    if let Some(f) = self.files.get_mut(&(si, key)) {
                        let ghost = f
                            .file
                            .as_ref()
                            .and_then(|h| h.metadata().ok())
                            .is_some_and(|m| m.nlink() == 0);
                        if ghost {
                            // The inode number of a deleted file we still drain was reused
                            // by a new file at once (ext4, tmpfs do that). The new file is
                            // picked up once the old one is drained and closed.
                            continue;
                        }
                        f.seen_round = round;
                        if f.path != path {
                            // Renamed, unless the old path still names this file too (a hard
                            // link or a second matching symlink): then keep the old name.
                            let old_still_ours = std::fs::metadata(&f.path)
                                .map(|m| m.dev() == key.dev && m.ino() == key.ino)
                                .unwrap_or(false);
                            if !old_still_ours {
                                debug!(from = %f.path.display(), to = %path.display(), "file renamed");
                                f.set_path(path.clone());
                            }
                        }
                        // Matched by the globs again (e.g. app.log -> app.log.1 with app.log*):
                        // it is followed like any other file, not closed after rotate_wait.
                        if f.path == path {
                            f.state = State::Live;
                        }
                        if f.file.is_none() && meta.len() != f.pos {
                            self.reopen(si, key, &path);
                        }
                        continue;
                    }
                    self.open_new(si, key, &path, meta.len(), now, round);
                }
                if !matched && self.warned_missing.insert(pat.clone()) && !self.startup {
                    debug!(pattern = %pat, "no file matches yet");
                } else if !matched && self.startup {
                    info!(pattern = %pat, "no file matches yet; waiting for one to appear");
                }
            }
        }
        // Known files: was the path taken over by another file, or did it vanish?
        for f in self.files.values_mut() {
            if f.state != State::Live {
                continue;
            }
            if let Some(d) = f.path.parent() {
                self.watch_dirs.insert(d.to_path_buf());
            }
            let path_meta = seen.get(&f.path).copied().or_else(|| {
                std::fs::metadata(&f.path).ok().map(|m| {
                    (
                        FileKey {
                            dev: m.dev(),
                            ino: m.ino(),
                        },
                        m.len(),
                    )
                })
            });
            let now_there = path_meta.map(|(k, _)| k);
            let unlinked = f
                .file
                .as_ref()
                .and_then(|h| h.metadata().ok())
                .is_some_and(|m| m.nlink() == 0);
            if unlinked || now_there != Some(f.key) || f.seen_round != round {
                let deleted = f
                    .file
                    .as_ref()
                    .and_then(|h| h.metadata().ok())
                    .map(|m| m.nlink() == 0)
                    .unwrap_or(true);
                add(&STATS.rotations, 1);
                // Where did it go? The kernel knows the open file's current name.
                if let Some(now_at) = f.file.as_ref().and_then(current_path) {
                    if !deleted {
                        f.set_path(now_at);
                    }
                }
                info!(
                    path = %f.path.display(),
                    offset = f.pos,
                    how = if deleted { "deleted" } else { "rotated" },
                    "file rotated away; reading it to its end"
                );
                f.state = State::Gone { since: now };
                if f.file.is_none() {
                    // It was closed for the open-file limit and is no longer reachable by path.
                    f.state = State::Gone {
                        since: now - self.opts.rotate_wait,
                    };
                }
                continue;
            }
            // Same file at the same path: did someone rewrite it in place (copytruncate
            // followed by writes past our position before we noticed)?
            // Even at an unchanged size: truncated and rewritten to the same length is
            // only visible here (the model test found it).
            if let (Some(h), Some(fp)) = (&f.file, f.fingerprint) {
                if f.pos > 0 && !fingerprint_matches(h, fp) {
                    f.rewritten = true;
                    f.next_poll = now;
                }
            }
        }
        if !self.rotated_scan_done {
            self.rotated_scan_done = self.find_rotated_while_stopped(now, round);
        }
    }

    fn open_new(
        &mut self,
        si: usize,
        key: FileKey,
        path: &Path,
        _size: u64,
        now: Instant,
        round: u64,
    ) {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                if self
                    .warned_missing
                    .insert(path.to_string_lossy().into_owned())
                {
                    error!(path = %path.display(), error = %e, "cannot open file; will retry at every discovery");
                }
                return;
            }
        };
        let Ok(meta) = file.metadata() else { return };
        if meta.dev() != key.dev || meta.ino() != key.ino {
            // Replaced between stat and open; the next discovery sees the new one.
            return;
        }
        self.warned_missing.remove(path.to_string_lossy().as_ref());
        let cp = self.checkpoints.get(&(si, key));
        let current_fp = match cp {
            // Compare over the checkpoint's length: the first line may have grown since.
            Some(cp) if fingerprint_matches(&file, cp.fingerprint) => Some(cp.fingerprint),
            _ => fingerprint_of(&file).ok().flatten(),
        };
        let mark = match current_fp {
            Some(fp) => match self.marks.get(si, &crate::record::file_id(key, fp)) {
                Ok(m) => m,
                // Redis is down: where to start is unknown. Open it at a later discovery;
                // nothing could be published now anyway. (It keeps its start-up status.)
                Err(()) => {
                    if self.startup {
                        let end = end_boundary(&file, meta.len());
                        self.startup_deferred.insert((si, key), end);
                    }
                    return;
                }
            },
            None => None,
        };
        let deferred_end = self.startup_deferred.remove(&(si, key));
        let present_at_startup = self.startup || deferred_end.is_some();
        let start = start_point(
            cp,
            current_fp,
            mark,
            meta.len(),
            present_at_startup,
            self.sources[si].start_at,
            || deferred_end.unwrap_or_else(|| end_boundary(&file, meta.len())),
        );
        if let Some(cp) = cp.filter(|c| c.offset > 0 && current_fp == Some(c.fingerprint)) {
            if mark.is_none_or(|m| m < (cp.generation, cp.offset)) {
                add(&STATS.redis_gaps, 1);
                error!(
                    path = %path.display(),
                    checkpoint = cp.offset,
                    redis_mark = ?mark,
                    "Redis has no high-water mark (or an older one) for this file although the checkpoint says bytes up to {} were published: Redis lost data (restart without persistence, FLUSHALL, failover?). Not republishing them (see docs/exactly-once.md); continuing from the checkpoint.",
                    cp.offset
                );
            }
        }
        if cp.is_some() && !start.resumed && start.offset == 0 {
            warn!(path = %path.display(), "checkpoint does not match the file any more (truncated, rewritten or inode reused); reading it from the start");
        }
        self.insert_tracked(si, key, path, file, start, now, round);
    }

    #[allow(clippy::too_many_arguments)]
    fn insert_tracked(
        &mut self,
        si: usize,
        key: FileKey,
        path: &Path,
        mut file: File,
        start: Start,
        now: Instant,
        round: u64,
    ) {
        if start.offset > 0 {
            if let Err(e) = file.seek(SeekFrom::Start(start.offset)) {
                error!(path = %path.display(), error = %e, "cannot seek; will retry");
                return;
            }
        }
        add(&STATS.files_opened, 1);
        info!(
            source = %self.sources[si].name,
            path = %path.display(),
            offset = start.offset,
            resumed = start.resumed,
            "following file"
        );
        if let Some(d) = path.parent() {
            self.watch_dirs.insert(d.to_path_buf());
        }
        self.files.insert(
            (si, key),
            Tracked {
                source: si,
                key,
                path: path.to_path_buf(),
                file: Some(file),
                info: None,
                fingerprint: start.fingerprint,
                generation: start.generation,
                pos: start.offset,
                carry: Vec::new(),
                carry_start: start.offset,
                scan: start.offset,
                done: start.offset,
                spans: Vec::new(),
                pending: None,
                oversize: None,
                fresh: !start.resumed,
                last_data: now,
                next_poll: now,
                backoff: Duration::ZERO,
                state: State::Live,
                seen_round: round,
                at_eof: false,
                rewritten: false,
            },
        );
        self.enforce_open_limit();
    }

    fn reopen(&mut self, si: usize, key: FileKey, path: &Path) {
        let Some(f) = self.files.get_mut(&(si, key)) else {
            return;
        };
        match File::open(path) {
            Ok(mut h) => {
                let same = h
                    .metadata()
                    .map(|m| m.dev() == key.dev && m.ino() == key.ino)
                    .unwrap_or(false);
                if same && h.seek(SeekFrom::Start(f.pos)).is_ok() {
                    f.file = Some(h);
                    f.next_poll = Instant::now();
                }
            }
            Err(e) => warn!(path = %path.display(), error = %e, "cannot reopen file"),
        }
    }

    /// Over the open-file limit: close the files idle the longest (they are reopened when
    /// they grow). A rotated-away file cannot be reopened: closing it early loses its unread
    /// bytes, which is counted and logged.
    fn enforce_open_limit(&mut self) {
        if self.files.len() <= self.opts.max_open_files {
            return;
        }
        let open = self.files.values().filter(|f| f.file.is_some()).count();
        if open <= self.opts.max_open_files {
            return;
        }
        let mut candidates: Vec<(bool, Instant, (usize, FileKey))> = self
            .files
            .iter()
            .filter(|(_, f)| f.file.is_some())
            .map(|(k, f)| (matches!(f.state, State::Gone { .. }), f.last_data, *k))
            .collect();
        // Live idle files first (cheap to reopen), oldest first.
        candidates.sort();
        for (gone, _, k) in candidates.into_iter().take(open - self.opts.max_open_files) {
            if gone {
                if let Some(f) = self.files.remove(&k) {
                    let size = f
                        .file
                        .as_ref()
                        .and_then(|h| h.metadata().ok())
                        .map(|m| m.len())
                        .unwrap_or(f.pos);
                    let lost = size.saturating_sub(f.done);
                    add(&STATS.lost_bytes, lost);
                    error!(path = %f.path.display(), bytes = lost, limit = self.opts.max_open_files, "closing a rotated file before it was drained: over agent.max_open_files; these bytes are lost");
                }
            } else if let Some(f) = self.files.get_mut(&k) {
                f.file = None;
                debug!(path = %f.path.display(), "closed idle file (open-file limit)");
            }
        }
    }

    /// Files rotated while the agent was stopped and renamed to a name the globs do not
    /// match: look for their inode next to where they were last seen, and drain them.
    /// Returns false when some file had to be left for later (Redis unreachable).
    fn find_rotated_while_stopped(&mut self, now: Instant, round: u64) -> bool {
        let mut complete = true;
        use std::os::unix::fs::DirEntryExt;
        let missing: Vec<Checkpoint> = self
            .checkpoints
            .iter()
            .filter(|(k, _)| !self.files.contains_key(k))
            .map(|(_, c)| c.clone())
            .collect();
        for cp in missing {
            let Some(si) = self.sources.iter().position(|s| s.name == cp.source) else {
                continue;
            };
            let Some(dir) = Path::new(&cp.path).parent() else {
                continue;
            };
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in rd.flatten() {
                if entry.ino() != cp.key.ino {
                    continue;
                }
                let path = entry.path();
                let Ok(file) = File::open(&path) else {
                    continue;
                };
                let Ok(meta) = file.metadata() else { continue };
                if meta.dev() != cp.key.dev || meta.ino() != cp.key.ino {
                    continue;
                }
                if !fingerprint_matches(&file, cp.fingerprint) || meta.len() <= cp.offset {
                    break;
                }
                let Ok(mark) = self
                    .marks
                    .get(si, &crate::record::file_id(cp.key, cp.fingerprint))
                else {
                    complete = false;
                    break;
                };
                let start = start_point(
                    Some(&cp),
                    Some(cp.fingerprint),
                    mark,
                    meta.len(),
                    true,
                    StartAt::Beginning,
                    || 0,
                );
                if start.offset >= meta.len() {
                    break;
                }
                info!(path = %path.display(), was = %cp.path, offset = start.offset, "found a file rotated while the agent was stopped; draining it");
                self.insert_tracked(si, cp.key, &path, file, start, now, round);
                if let Some(f) = self.files.get_mut(&(si, cp.key)) {
                    f.state = State::Gone { since: now };
                }
                break;
            }
        }
        complete
    }
}

/// The current name of an open file, from /proc (None when unavailable or deleted).
fn current_path(file: &File) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    let p = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    if p.to_string_lossy().ends_with(" (deleted)") {
        None
    } else {
        Some(p)
    }
}

/// The longest leading part of a glob without wildcards, as a directory to watch.
pub fn static_dir(pattern: &str) -> Option<PathBuf> {
    let mut dir = PathBuf::new();
    let p = Path::new(pattern);
    let comps: Vec<_> = p.components().collect();
    for (i, c) in comps.iter().enumerate() {
        let s = c.as_os_str().to_string_lossy();
        if s.contains(['*', '?', '[', '{']) || i == comps.len() - 1 {
            break;
        }
        dir.push(c);
    }
    if dir.as_os_str().is_empty() {
        None
    } else {
        Some(dir)
    }
}

/// The thread around a follower: ticks on hints, on its own deadline, and stops when told.
/// In `once` mode it ticks until every file is read to its end.
pub fn run_thread(
    mut follower: Follower,
    sink: &mut dyn Sink,
    hints: Option<hints::Hints>,
    shutdown: crossbeam_channel::Receiver<()>,
    once: bool,
    mut on_tick: impl FnMut(&Follower),
) -> Follower {
    let mut watched: HashSet<PathBuf> = HashSet::new();
    follower.hinted = hints.is_some();
    loop {
        let now = Instant::now();
        let report = follower.tick(now, sink);
        on_tick(&follower);
        if report.stopped || (once && report.finished) {
            return follower;
        }
        if let Some(h) = &hints {
            for d in follower.watch_dirs.iter() {
                if !watched.contains(d) && h.watch(d) {
                    watched.insert(d.clone());
                }
            }
        }
        if once {
            if !matches!(
                shutdown.try_recv(),
                Err(crossbeam_channel::TryRecvError::Empty)
            ) {
                return follower;
            }
            continue;
        }
        let deadline = report.next.unwrap_or(now + Duration::from_millis(250));
        let wait = deadline.saturating_duration_since(Instant::now());
        let never = crossbeam_channel::never();
        let wake = hints.as_ref().map(|h| h.wake_rx()).unwrap_or(&never);
        crossbeam_channel::select! {
            recv(shutdown) -> _ => return follower,
            recv(wake) -> _ => {
                if let Some(h) = &hints {
                    let (paths, rescan) = h.take();
                    for p in paths { follower.hint(p); }
                    if rescan { follower.rescan(); }
                }
            }
            default(wait) => {}
        }
    }
}

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
