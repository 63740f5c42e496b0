//! Discovery: glob expansion, notify-hint filtering, renames, rotations and deletions of
//! known files, and the search for files rotated while the agent was stopped.
//!
//! Invariants: a followed file is keyed by identity, never by path; a path that names
//! another file, or none, makes the old one `Gone` (drained, then closed), never skipped.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use redtail_state::Checkpoint;
use tracing::{debug, error, info, warn};

use crate::config::StartAt;
use crate::record::FileKey;
use crate::stats::{add, STATS};

use super::*;

impl SourceSpec {
    /// Would discovery pick this path up?
    pub(super) fn matches(&self, path: &Path) -> bool {
        !self.excluded(path) && self.globs.iter().any(|g| g.matches_path(path))
    }

    pub(super) fn excluded(&self, path: &Path) -> bool {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        self.exclude
            .iter()
            .any(|p| p.matches(name) || p.matches_path(path))
    }
}

impl Follower {
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
                        f.last_size = meta.len();
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
                        // Closed for the open-file limit: reopened when it grew, shrank, or was
                        // written at all (truncated and rewritten to the same size only shows
                        // in the modification time; the model test found it).
                        let touched = f.closed_mtime != Some((meta.mtime(), meta.mtime_nsec()));
                        if f.file.is_none() && (meta.len() != f.pos || touched) {
                            self.reopen(si, key, &path);
                        }
                        continue;
                    }
                    self.open_new(si, key, &path, now, round);
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
                if deleted {
                    // This identity is dead. Without birth times a new file that gets the
                    // inode and the same first line would look like it; a tombstone makes
                    // it the next generation of the same mark field, read from 0, instead of
                    // resuming at the dead file's checkpoint or mark.
                    let k = (f.source, f.key);
                    match f.fingerprint.or_else(|| {
                        f.file
                            .as_ref()
                            .and_then(|h| fingerprint_of(h).ok().flatten())
                    }) {
                        Some(fp) => {
                            self.checkpoints.insert(
                                k,
                                Checkpoint {
                                    source: self.sources[f.source].name.clone(),
                                    key: f.key,
                                    fingerprint: fp,
                                    btime: f.btime,
                                    generation: f.generation,
                                    offset: u64::MAX,
                                    path: f.path.to_string_lossy().into_owned(),
                                    updated_ms: crate::pipeline::now_ms(),
                                },
                            );
                        }
                        None => {
                            self.checkpoints.remove(&k);
                        }
                    }
                }
                // Where did it go? The kernel knows the open file's current name.
                if let Some(now_at) = f.file.as_ref().and_then(current_path) {
                    if !deleted {
                        f.set_path(now_at);
                    }
                }
                info!(
                    path = %f.path.display(),
                    offset = f.pos,
                    how = if f.file.is_none() {
                        "closed for the open-file limit"
                    } else if deleted {
                        "deleted"
                    } else {
                        "rotated"
                    },
                    "file rotated away; reading it to its end"
                );
                f.state = State::Gone { since: now };
                if f.file.is_none() {
                    // Closed for the open-file limit and no longer at its path: look for it
                    // by identity next to where it was (rename rotation), and drain it.
                    match find_by_identity(f, self.opts.btime) {
                        Some((at, h)) => {
                            info!(path = %at.display(), was = %f.path.display(), offset = f.pos, "found a closed file rotated away; reading it to its end");
                            f.set_path(at);
                            f.file = Some(h);
                            f.closed_at = None;
                            f.at_eof = false;
                            f.next_poll = now;
                        }
                        None => {
                            // Deleted (or moved elsewhere) while closed: what it held past our
                            // position is out of reach. The last size discovery saw bounds it.
                            let lost = f.last_size.saturating_sub(f.done);
                            add(&STATS.lost_bytes, lost);
                            error!(
                                path = %f.path.display(),
                                from = f.done,
                                to = f.last_size.max(f.done),
                                "a file closed for agent.max_open_files was deleted or moved out of its directory before it was drained: bytes from {} on are lost ({} known)",
                                f.done,
                                lost
                            );
                            f.state = State::Gone {
                                since: now - self.opts.rotate_wait,
                            };
                        }
                    }
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
            self.find_rotated_while_stopped(now, round);
            self.rotated_scan_done = true;
        }
    }

    /// Files rotated while the agent was stopped and renamed to a name the globs do not
    /// match: look for their inode next to where they were last seen, and drain them.
    pub(super) fn find_rotated_while_stopped(&mut self, now: Instant, round: u64) {
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
                let btime = self.btime_of(&meta);
                if !fingerprint_matches(&file, cp.fingerprint)
                    || !same_birth(cp.btime, cp.updated_ms, btime)
                    || meta.len() <= cp.offset
                {
                    break;
                }
                let adopting = cp.btime.is_none() && btime.is_some();
                // Redis unreachable: start from the checkpoint; the publisher checks.
                let mark = self
                    .marks
                    .get(si, &crate::record::file_id(cp.key, btime, cp.fingerprint))
                    .unwrap_or(None);
                let legacy = if adopting {
                    self.marks
                        .get(si, &crate::record::file_id(cp.key, None, cp.fingerprint))
                        .unwrap_or(None)
                } else {
                    None
                };
                let mut start = start_point(
                    Some(&cp),
                    Some(cp.fingerprint),
                    btime,
                    mark.max(legacy),
                    meta.len(),
                    true,
                    StartAt::Beginning,
                    || 0,
                );
                if start.offset >= meta.len() {
                    break;
                }
                if adopting && mark != Some((start.generation, start.offset)) {
                    start.resumed = false;
                }
                info!(path = %path.display(), was = %cp.path, offset = start.offset, "found a file rotated while the agent was stopped; draining it");
                self.insert_tracked(si, cp.key, &path, file, start, btime, now, round);
                if let Some(f) = self.files.get_mut(&(si, cp.key)) {
                    f.state = State::Gone { since: now };
                }
                break;
            }
        }
    }
}

/// The current name of an open file, from /proc (None when unavailable or deleted).
pub(super) fn current_path(file: &File) -> Option<PathBuf> {
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

/// A file closed for the open-file limit, rotated away while closed: the entry with its
/// (dev, inode), birth time and first line in its real directory (the target's, when it
/// was followed through a symlink) or its path's, opened at its position.
fn find_by_identity(f: &Tracked, use_btime: bool) -> Option<(PathBuf, File)> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::DirEntryExt;
    let mut dirs: Vec<&Path> = Vec::new();
    dirs.extend(f.closed_at.as_deref().and_then(Path::parent));
    dirs.extend(f.path.parent());
    dirs.dedup();
    let entries = dirs
        .into_iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten());
    for entry in entries {
        if entry.ino() != f.key.ino {
            continue;
        }
        let path = entry.path();
        let Ok(mut h) = File::open(&path) else {
            continue;
        };
        let Ok(m) = h.metadata() else { continue };
        let same = m.dev() == f.key.dev
            && m.ino() == f.key.ino
            && (!use_btime || btime_of(&m) == f.btime)
            && f.fingerprint.is_none_or(|fp| fingerprint_matches(&h, fp));
        if same && h.seek(SeekFrom::Start(f.pos)).is_ok() {
            return Some((path, h));
        }
    }
    None
}
