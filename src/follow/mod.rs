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
//!   line, up to 256 bytes) changed → generation + 1, read from 0 (`Follower::truncated`).
//! - **checkpoint mismatch**: a checkpoint for the same (dev, inode) whose fingerprint does not
//!   match the file → inode reuse → a new file, read from 0 ([`start_point`]).
//!
//! Anatomy (each file opens with what it owns and the invariants it enforces):
//! - `discovery.rs`: globs, notify-hint filtering, renames/rotations/deletions of known
//!   files, files rotated while stopped;
//! - `identity.rs`: what makes a file the same file (fingerprint, …);
//! - `read.rs`: polling, reading, line cutting, batches;
//! - `state.rs`: per-file state, where reading starts, open/reopen/close, truncation;
//! - this file: the options, the `Follower` itself, `tick` and the thread around it.

mod discovery;
pub mod hints;
mod identity;
mod read;
mod state;

pub use identity::{btime_of, fingerprint_matches, fingerprint_of, fnv1a, same_birth};
pub use state::{start_point, Marks, NoMarks};
use state::{Oversize, Pending, State, Tracked};

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use redtail_state::Checkpoint;
use tracing::debug;

use crate::config::{Config, Multiline, StartAt};
use crate::record::{Batch, FileKey};

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
    /// Use birth times where the filesystem records them (false: behave as on a filesystem
    /// without; for tests).
    pub btime: bool,
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
            btime: true,
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
    /// Could `send` go through now without waiting? A `true` may reserve the credit for
    /// the next `send`. Followers ask before reading more, so they never sit blocked in
    /// `send` while files appear and vanish.
    fn has_credit(&mut self) -> bool {
        true
    }
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
    /// Path → followed files, for notify hints; rebuilt after discovery changed things.
    path_index: HashMap<PathBuf, Vec<(usize, FileKey)>>,
    index_stale: bool,
    epoch: Instant,
    /// inotify hints are flowing (polls can be slower).
    pub hinted: bool,
    /// The open-file limit could not be honoured without risking data (said once).
    warned_open_limit: bool,
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
            path_index: HashMap::new(),
            index_stale: true,
            epoch: Instant::now(),
            hinted: false,
            warned_open_limit: false,
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
            let mut reopen = Vec::new();
            for p in &dirty {
                match self.path_index.get(p) {
                    Some(keys) => {
                        for k in keys {
                            if let Some(f) = self.files.get_mut(k) {
                                f.next_poll = now;
                                if f.file.is_none() && f.state == State::Live {
                                    reopen.push((*k, p.clone()));
                                }
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
            // A file closed for the open-file limit is reopened on a hint for its path;
            // if the path names another file now, discovery looks for it by identity.
            for ((si, key), p) in reopen {
                self.reopen(si, key, &p);
                if self.files.get(&(si, key)).is_some_and(|f| f.file.is_none()) {
                    self.discover_now = true;
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
                // Drained and closed, but it still exists (renamed out of the globs): if it
                // is renamed back into them, it resumes here, not at a start-up checkpoint
                // or 0 (Redis may not be there to say where it is). A deleted file keeps
                // the tombstone discovery left.
                let alive = f
                    .file
                    .as_ref()
                    .and_then(|h| h.metadata().ok())
                    .is_some_and(|m| m.nlink() > 0);
                if let (true, Some(fp)) = (alive, f.fingerprint) {
                    self.checkpoints.insert(
                        k,
                        Checkpoint {
                            source: self.sources[f.source].name.clone(),
                            key: f.key,
                            fingerprint: fp,
                            btime: f.btime,
                            generation: f.generation,
                            offset: f.done,
                            path: f.path.to_string_lossy().into_owned(),
                            updated_ms: crate::pipeline::now_ms(),
                        },
                    );
                }
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
