//! Per-file state and the decisions about it: where reading starts ([`start_point`], the
//! Redis marks lookup), opening a file ([`Follower::open_new`]), reopening one closed for the
//! open-file limit, the limit itself, and in-place truncation (generation + 1).
//!
//! Invariants: (generation, offset) only grows per identity; a checkpoint is resumed only
//! by the content it describes (same fingerprint); every byte given up (closed early,
//! truncated mid-line) is counted in `lost_bytes` and logged.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redtail_state::Checkpoint;
use tracing::{debug, error, info, warn};

use crate::config::StartAt;
use crate::record::{FileInfo, FileKey, Fingerprint, Span};
use crate::stats::{add, STATS};

use super::*;

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
/// the fingerprint and birth time the file has now, the Redis-side mark for its identity,
/// the size, and whether this is start-up.
///
/// 1. A checkpoint describing this content (same fingerprint, same birth: [`same_birth`])
///    resumes at its offset, or — if the file is now shorter — starts the next generation
///    at 0 (truncated while away; also when truncated to empty). A checkpoint of another
///    fingerprint or birth means the inode now holds another file: read from 0.
///    Generations count within one mark field (one identity) only.
/// 2. No checkpoint: `start_at` applies to files present at start-up; files that appear
///    later start at 0 (everything in them is new).
/// 3. The Redis mark wins when it is ahead: it is written atomically with the entries, so it
///    is the truth about what was published (the sled checkpoint lags by up to one commit
///    interval, and is lost with a corrupt store).
#[allow(clippy::too_many_arguments)]
pub fn start_point(
    cp: Option<&Checkpoint>,
    current_fp: Option<Fingerprint>,
    btime: Option<u64>,
    mark: Option<(u32, u64)>,
    size: u64,
    startup: bool,
    start_at: StartAt,
    end_boundary: impl FnOnce() -> u64,
) -> Start {
    let cp_born = cp.filter(|c| same_birth(c.btime, c.updated_ms, btime));
    let mut start = match cp {
        Some(_) if cp_born.is_none() => Start {
            offset: 0,
            generation: 0,
            resumed: false,
            fingerprint: None,
        },
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
        // Empty now: truncated to nothing while we were away (or another, empty file under
        // this inode; then the generation is merely higher than needed). Never back to a
        // generation that may already have marks.
        Some(cp) if current_fp.is_none() && size == 0 => Start {
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

/// Offset just past the last newline at or before `size`: where `start_at = "end"` begins,
/// so that a line being written right now is not cut in half.
pub(super) fn end_boundary(file: &File, size: u64) -> u64 {
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
pub(super) enum State {
    Live,
    /// Rotated away, renamed out of the globs, or deleted: drain, then close.
    Gone {
        since: Instant,
    },
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    pub(super) start: u64,
    /// End of the last line, excluding its newline.
    pub(super) end: u64,
    pub(super) lines: u32,
}

pub(super) struct Oversize {
    pub(super) start: u64,
    pub(super) kept: Vec<u8>,
    pub(super) total: u64,
}

pub(super) struct Tracked {
    pub(super) source: usize,
    pub(super) key: FileKey,
    pub(super) path: PathBuf,
    pub(super) file: Option<File>,
    pub(super) info: Option<Arc<FileInfo>>,
    pub(super) fingerprint: Option<Fingerprint>,
    /// Birth time (ns since the epoch), where the filesystem records one.
    pub(super) btime: Option<u64>,
    /// Size at the last glob pass (bounds what is lost if it vanishes while closed).
    pub(super) last_size: u64,
    /// Closed for the open-file limit: where the kernel said the file was (the target, when
    /// `path` is a symlink), to find it again if it is rotated away while closed.
    pub(super) closed_at: Option<PathBuf>,
    /// Closed for the open-file limit: its modification time then.
    pub(super) closed_mtime: Option<(i64, i64)>,
    pub(super) generation: u32,
    /// Next byte to read.
    pub(super) pos: u64,
    /// Bytes `[carry_start, pos)`, not yet handed out.
    pub(super) carry: Vec<u8>,
    pub(super) carry_start: u64,
    /// Bytes before this (absolute) have been scanned for newlines.
    pub(super) scan: u64,
    /// Bytes before this (absolute) belong to finished records in `spans`.
    pub(super) done: u64,
    pub(super) spans: Vec<Span>,
    pub(super) pending: Option<Pending>,
    pub(super) oversize: Option<Oversize>,
    /// The next batch is the first since a start that Redis holds no mark for.
    pub(super) fresh: bool,
    pub(super) last_data: Instant,
    pub(super) next_poll: Instant,
    pub(super) backoff: Duration,
    pub(super) state: State,
    pub(super) seen_round: u64,
    pub(super) at_eof: bool,
    /// The first bytes changed under us: treat as a truncation at the next read.
    pub(super) rewritten: bool,
}

impl Tracked {
    pub(super) fn unterminated(&self) -> u64 {
        self.pos - self.scan_line_start()
    }

    /// Start of the line being written (after the last newline seen).
    pub(super) fn scan_line_start(&self) -> u64 {
        self.scan
    }

    pub(super) fn buffered_done(&self) -> usize {
        (self.done - self.carry_start) as usize
    }

    pub(super) fn info(&mut self) -> Arc<FileInfo> {
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
            self.btime,
            self.generation,
            self.path.to_string_lossy().into_owned(),
        );
        self.info = Some(info.clone());
        info
    }

    pub(super) fn set_path(&mut self, path: PathBuf) {
        if self.path != path {
            self.path = path;
            self.info = None;
        }
    }
}

impl Follower {
    /// The file shrank below our position: emit what is whole, then start again at 0 with
    /// the next generation.
    pub(super) fn truncated(
        &mut self,
        f: &mut Tracked,
        sink: &mut dyn Sink,
        report: &mut TickReport,
    ) -> bool {
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

    pub(super) fn open_new(
        &mut self,
        si: usize,
        key: FileKey,
        path: &Path,
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
            // Replaced between stat and open; the next discovery sees the new one. The file
            // we saw was renamed away in that instant (rotated before we ever opened it):
            // look for it by inode next to its path, or its lines would never be read.
            use std::os::unix::fs::DirEntryExt;
            let moved = path
                .parent()
                .and_then(|d| std::fs::read_dir(d).ok())
                .and_then(|rd| {
                    rd.flatten()
                        .find(|e| e.ino() == key.ino && e.path() != path)
                        .map(|e| e.path())
                });
            if let Some(p2) = moved {
                let same_dev = std::fs::metadata(&p2).is_ok_and(|m| m.dev() == key.dev);
                if same_dev && !self.files.contains_key(&(si, key)) {
                    // Not matched by the globs there, it turns Gone at the next discovery.
                    self.open_new(si, key, &p2, now, round);
                }
            }
            return;
        }
        self.warned_missing.remove(path.to_string_lossy().as_ref());
        let btime = self.btime_of(&meta);
        let cp = self.checkpoints.get(&(si, key));
        let current_fp = match cp {
            // Compare over the checkpoint's length: the first line may have grown since.
            Some(cp) if fingerprint_matches(&file, cp.fingerprint) => Some(cp.fingerprint),
            _ => fingerprint_of(&file).ok().flatten(),
        };
        // A checkpoint written before birth times were stored, for this content, by a file
        // that existed then: adopted (once: its next commit carries the birth time). Its
        // mark is under the old field name, without the birth time.
        let adopting = cp.is_some_and(|c| {
            c.btime.is_none()
                && btime.is_some()
                && current_fp == Some(c.fingerprint)
                && same_birth(c.btime, c.updated_ms, btime)
        });
        // The mark is an optimisation (where to start); the publisher checks every
        // transaction against it. Redis being unreachable never keeps a file from being
        // opened: a file created and rotated away or deleted during an outage is only
        // reachable through the descriptor taken now.
        let mut looked_up = true;
        let mut lookup = |field: String| match self.marks.get(si, &field) {
            Ok(m) => m,
            Err(()) => {
                looked_up = false;
                None
            }
        };
        let (mark, legacy_mark) = match current_fp {
            Some(fp) => (
                lookup(crate::record::file_id(key, btime, fp)),
                if adopting {
                    lookup(crate::record::file_id(key, None, fp))
                } else {
                    None
                },
            ),
            None => (None, None),
        };
        let best_mark = mark.max(legacy_mark);
        let present_at_startup = self.startup;
        let mut start = start_point(
            cp,
            current_fp,
            btime,
            best_mark,
            meta.len(),
            present_at_startup,
            self.sources[si].start_at,
            || end_boundary(&file, meta.len()),
        );
        if adopting {
            info!(path = %path.display(), offset = start.offset, "adopting a checkpoint written without the file's birth time; its Redis mark moves to a field with the birth time");
            // Redis holds a mark at the start under the new field only if an adopted run
            // already published there.
            if mark != Some((start.generation, start.offset)) {
                start.resumed = false;
            }
        }
        if let Some(cp) = cp.filter(|c| {
            c.offset > 0
                && current_fp == Some(c.fingerprint)
                && same_birth(c.btime, c.updated_ms, btime)
        }) {
            if looked_up && best_mark.is_none_or(|m| m < (cp.generation, cp.offset)) {
                add(&STATS.redis_gaps, 1);
                error!(
                    path = %path.display(),
                    checkpoint = cp.offset,
                    redis_mark = ?best_mark,
                    "Redis has no high-water mark (or an older one) for this file although the checkpoint says bytes up to {} were published: Redis lost data (restart without persistence, FLUSHALL, failover?). Not republishing them (see docs/exactly-once.md); continuing from the checkpoint.",
                    cp.offset
                );
            }
        }
        if cp.is_some() && !start.resumed && start.offset == 0 {
            warn!(path = %path.display(), "checkpoint does not match the file any more (truncated, rewritten or inode reused); reading it from the start");
        }
        self.insert_tracked(si, key, path, file, start, btime, now, round);
    }

    /// The birth time of a file, unless birth times are off ([`Options::btime`]).
    pub(super) fn btime_of(&self, meta: &std::fs::Metadata) -> Option<u64> {
        if self.opts.btime {
            btime_of(meta)
        } else {
            None
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn insert_tracked(
        &mut self,
        si: usize,
        key: FileKey,
        path: &Path,
        mut file: File,
        start: Start,
        btime: Option<u64>,
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
                btime,
                last_size: start.offset,
                closed_at: None,
                closed_mtime: None,
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

    pub(super) fn reopen(&mut self, si: usize, key: FileKey, path: &Path) {
        let Some(f) = self.files.get_mut(&(si, key)) else {
            return;
        };
        match File::open(path) {
            Ok(mut h) => {
                let btime = f.btime;
                let same = h
                    .metadata()
                    .map(|m| {
                        m.dev() == key.dev
                            && m.ino() == key.ino
                            && (!self.opts.btime || btime_of(&m) == btime)
                    })
                    .unwrap_or(false);
                if same && h.seek(SeekFrom::Start(f.pos)).is_ok() {
                    f.file = Some(h);
                    f.closed_at = None;
                    f.next_poll = Instant::now();
                }
            }
            Err(e) => warn!(path = %path.display(), error = %e, "cannot reopen file"),
        }
    }

    /// Over the open-file limit: close live files that are read to their end, idle the
    /// longest first. They are reopened when they grow (glob pass, or a notify hint for
    /// their path), and found again by identity next to their last path if they are
    /// rotated away while closed (`discovery.rs`). A file with unread bytes, or a rotated
    /// one being drained, is never closed for the limit: the limit is exceeded instead
    /// (and said so once), because closing it could lose data.
    pub(super) fn enforce_open_limit(&mut self) {
        if self.files.len() <= self.opts.max_open_files {
            return;
        }
        let open = self.files.values().filter(|f| f.file.is_some()).count();
        if open <= self.opts.max_open_files {
            return;
        }
        let mut candidates: Vec<(Instant, (usize, FileKey))> = self
            .files
            .iter()
            .filter(|(_, f)| f.state == State::Live && f.at_eof && f.file.is_some())
            .filter(|(_, f)| {
                f.file
                    .as_ref()
                    .and_then(|h| h.metadata().ok())
                    .is_some_and(|m| m.len() == f.pos && m.nlink() > 0)
                    // Not rewritten in place under us (to be noticed while it is open).
                    && f.file.as_ref().is_some_and(|h| {
                        f.fingerprint.is_none_or(|fp| fingerprint_matches(h, fp))
                    })
            })
            .map(|(k, f)| (f.last_data, *k))
            .collect();
        candidates.sort();
        let excess = open - self.opts.max_open_files;
        if candidates.len() < excess && !self.warned_open_limit {
            self.warned_open_limit = true;
            warn!(
                open,
                limit = self.opts.max_open_files,
                "over agent.max_open_files, but the other open files have unread bytes or are rotated files being drained; keeping them open rather than risk losing data"
            );
        }
        for (_, k) in candidates.into_iter().take(excess) {
            if let Some(f) = self.files.get_mut(&k) {
                f.closed_at = f.file.as_ref().and_then(super::discovery::current_path);
                f.closed_mtime = f
                    .file
                    .as_ref()
                    .and_then(|h| h.metadata().ok())
                    .map(|m| (m.mtime(), m.mtime_nsec()));
                f.file = None;
                debug!(path = %f.path.display(), "closed idle file (open-file limit)");
            }
        }
    }
}
