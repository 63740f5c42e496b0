//! The dead-letter file: JSON Lines, one record a line, schema in docs/dead-letter.md.
//!
//! Records are appended and fsynced *before* the Redis call that moves the file's mark past
//! them, so a checkpoint never passes a record that is neither in Redis nor on disk here.
//! A crash between the fsync and the Redis call can write a record twice; readers
//! (`redtail dlq …`) deduplicate on (file_id, generation, offset).
//!
//! What [`Writer::sync`] confirms is on disk *under the dead-letter path*:
//! - The lines appended since the last sync are kept in memory until the sync. If the
//!   path no longer names the open file (an operator removed or replaced it) or the file
//!   is shorter than written (truncated), the file is reopened (created) and those lines
//!   are written again before the sync returns. Nothing is appended to an unlinked inode
//!   and confirmed.
//! - A line is written with one `write` call, but a kill can cut a multi-page write short:
//!   a failed write is cut back to the last whole line, and at open a last line without
//!   its newline (never confirmed: confirmation needs the whole line and the fsync) is
//!   cut off, so a torn line can never swallow the next record.
//! - A newly created file is made durable with an fsync of its directory.
//!
//! Rotation (`path` → `path.1` → `path.2` …) is idempotent: it shifts files only up to the
//! first free slot, and deletes the oldest (logged with its record count) only when all
//! `keep` slots are taken. An interrupted or retried rotation therefore never deletes or
//! shifts a file twice. A missing active file is not rotated: it is simply created again.
//! The renames are made durable with an fsync of the directory.
//!
//! Every error names the path and the operation. While appends or syncs fail,
//! [`stalled`] is true: `redtail run` stops at once on SIGTERM in that state instead of
//! waiting out `agent.shutdown_timeout` (what was not confirmed is not checkpointed, so the
//! next start reads it again).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::record::{file_id, DeadRecord, FileInfo};
use crate::stats::{add, STATS};

/// Version of the record layout below.
pub const SCHEMA: u32 = 1;

/// One dead-lettered record, as written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub schema: u32,
    /// When it was written, RFC 3339 UTC.
    pub ts: String,
    pub host: String,
    pub source: String,
    pub path: String,
    pub file_id: String,
    #[serde(default)]
    pub generation: u32,
    pub offset: u64,
    pub length: u64,
    pub parser: String,
    /// parse | oversize | encoding | rejected
    pub error_class: String,
    pub error: String,
    pub attempts: u32,
    pub agent_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line_b64: Option<String>,
    /// Present and true when only the head of the line is kept (over the line cap).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

impl Entry {
    /// The original bytes; `None` when the record holds neither `line` nor a `line_b64`
    /// that decodes.
    pub fn raw(&self) -> Option<Vec<u8>> {
        match (&self.line, &self.line_b64) {
            (Some(l), _) => Some(l.as_bytes().to_vec()),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD.decode(b).ok(),
            (None, None) => None,
        }
    }

    /// Identity used to deduplicate.
    pub fn id(&self) -> (String, u32, u64) {
        (self.file_id.clone(), self.generation, self.offset)
    }
}

/// Now, RFC 3339 UTC with milliseconds.
pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_millis() as i64)
}

/// Unix milliseconds as RFC 3339 UTC (the parsers crate's formatter).
pub fn rfc3339(ms: i64) -> String {
    redtail_parsers::timestamp::format_unix_ms(ms).unwrap_or_else(|| ms.to_string())
}

static STALLED: AtomicBool = AtomicBool::new(false);

/// True while the last append or sync of the dead-letter file failed: the publisher is
/// holding the pipeline until it can write it.
pub fn stalled() -> bool {
    STALLED.load(Ordering::Relaxed)
}

fn set_stalled<T>(r: &std::io::Result<T>) {
    STALLED.store(r.is_err(), Ordering::Relaxed);
}

/// `io::Error` naming the path and what was done.
fn io_err(path: &Path, what: &str, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()))
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, "fsync the directory", e))
}

/// Appends dead-lettered records, rotating by size.
pub struct Writer {
    path: PathBuf,
    file: Option<File>,
    /// (dev, inode) of the file last opened at `path`; kept after `file` is dropped.
    ident: Option<(u64, u64)>,
    /// What the file holds as far as we know: every line written, `pending` included.
    size: u64,
    max_bytes: u64,
    keep: u32,
    host: String,
    /// The lines appended since the last successful sync (written again if the file was
    /// removed, replaced or truncated before that sync).
    pending: Vec<u8>,
    pending_lines: usize,
}

impl Writer {
    pub fn new(path: &Path, max_bytes: u64, keep: u32, host: &str) -> Writer {
        Writer {
            path: path.to_path_buf(),
            file: None,
            ident: None,
            size: 0,
            max_bytes,
            keep: keep.max(1),
            host: host.to_string(),
            pending: Vec::new(),
            pending_lines: 0,
        }
    }

    /// Opens (or creates) the file at `path` if none is open; cuts off a torn last line;
    /// writes `pending` again when the file opened is not the one they went to.
    fn open(&mut self) -> std::io::Result<()> {
        if self.file.is_some() {
            return Ok(());
        }
        let path = self.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| io_err(dir, "create the dead-letter directory", e))?;
        }
        let mut created = false;
        let mut f = match OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => {
                created = true;
                f
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => OpenOptions::new()
                .read(true)
                .append(true)
                .open(&path)
                .map_err(|e| io_err(&path, "open", e))?,
            Err(e) => return Err(io_err(&path, "create", e)),
        };
        if created {
            sync_dir(&path)?;
        }
        let meta = f.metadata().map_err(|e| io_err(&path, "stat", e))?;
        let mut len = meta.len();
        if len > 0 {
            len = cut_torn_tail(&mut f, &path, len)?;
        }
        let ident = (meta.dev(), meta.ino());
        let intact = self.ident == Some(ident) && len >= self.size;
        if !self.pending.is_empty() && !intact {
            warn!(path = %path.display(), records = self.pending_lines,
                "the dead-letter file was removed, replaced or truncated before its last records were confirmed; writing them again");
            if let Err(e) = f.write_all(&self.pending) {
                let _ = f.set_len(len);
                return Err(io_err(&path, "write", e));
            }
            len += self.pending.len() as u64;
        }
        self.ident = Some(ident);
        self.size = len;
        self.file = Some(f);
        Ok(())
    }

    /// Drops the open file when `path` no longer names it, or it is shorter than written.
    fn check_path(&mut self) -> std::io::Result<()> {
        if self.file.is_none() {
            return Ok(());
        }
        let same = match std::fs::metadata(&self.path) {
            Ok(m) => Some((m.dev(), m.ino())) == self.ident && m.len() >= self.size,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(&self.path, "stat", e)),
        };
        if !same {
            warn!(path = %self.path.display(), "the dead-letter file was removed, replaced or truncated; opening it again");
            self.file = None;
        }
        Ok(())
    }

    /// Builds the entry for one record.
    pub fn entry(
        &self,
        source: &str,
        parser: &str,
        file: &FileInfo,
        rec: &DeadRecord,
        attempts: u32,
    ) -> Entry {
        let (line, line_b64) = match std::str::from_utf8(&rec.bytes) {
            Ok(s) => (Some(s.to_string()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&rec.bytes)),
            ),
        };
        Entry {
            schema: SCHEMA,
            ts: rfc3339_now(),
            host: self.host.clone(),
            source: source.to_string(),
            path: file.path.clone(),
            file_id: file_id(file.key, file.btime, file.fingerprint),
            generation: file.generation,
            offset: rec.offset,
            length: rec.length,
            parser: parser.to_string(),
            error_class: rec.class.as_str().to_string(),
            error: rec.error.clone(),
            attempts,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            truncated: (rec.bytes.len() as u64) < rec.length,
            line,
            line_b64,
        }
    }

    /// Appends one entry (buffered in the kernel until [`Writer::sync`]). On an error
    /// nothing of this entry stays in the file; the earlier ones are not confirmed either
    /// until a sync succeeds (appending them again only writes duplicates, which readers
    /// drop).
    pub fn append(&mut self, e: &Entry) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(e).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let r = self.append_line(&line);
        set_stalled(&r);
        r
    }

    fn append_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        self.check_path()?;
        self.open()?;
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
            self.open()?;
        }
        let f = self.file.as_mut().expect("opened above");
        if let Err(e) = f.write_all(line) {
            // Cut back to the last whole line, so a torn one cannot swallow the next record;
            // if even that fails, the next open cuts it.
            if f.set_len(self.size).is_err() {
                self.file = None;
            }
            return Err(io_err(&self.path, "write", e));
        }
        self.size += line.len() as u64;
        self.pending.extend_from_slice(line);
        self.pending_lines += 1;
        add(&STATS.dead_lettered, 1);
        Ok(())
    }

    /// Makes every appended entry durable under the dead-letter path.
    pub fn sync(&mut self) -> std::io::Result<()> {
        let r = self.sync_inner();
        set_stalled(&r);
        r
    }

    fn sync_inner(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        // A removal racing with the fsync is seen by the check after it; then the lines
        // are written to the new file and synced again.
        for _ in 0..4 {
            self.open()?;
            let f = self.file.as_ref().expect("opened above");
            f.sync_data().map_err(|e| io_err(&self.path, "fsync", e))?;
            self.check_path()?;
            if self.file.is_some() {
                self.pending.clear();
                self.pending_lines = 0;
                return Ok(());
            }
        }
        Err(io_err(
            &self.path,
            "fsync",
            std::io::Error::other("the file keeps being removed or replaced"),
        ))
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.sync_inner()?;
        self.file = None;
        self.ident = None;
        self.size = 0;
        let name = |i: u32| PathBuf::from(format!("{}.{i}", self.path.display()));
        let exists = |p: &Path| std::fs::symlink_metadata(p).is_ok();
        if !exists(&self.path) {
            // Removed since the sync above: nothing to rotate; `open` creates it again.
            return Ok(());
        }
        // Shift only up to the first free slot: a rotation interrupted half-way (or retried
        // after an error) leaves a gap, and the next one fills it instead of deleting.
        let top = match (1..=self.keep).find(|&i| !exists(&name(i))) {
            Some(free) => free,
            None => {
                let oldest = name(self.keep);
                let n = count_lines(&oldest);
                warn!(path = %oldest.display(), records = n, keep = self.keep, "deleting the oldest dead-letter file (agent.dead_letter_keep)");
                std::fs::remove_file(&oldest)
                    .map_err(|e| io_err(&oldest, "delete the oldest rotated file", e))?;
                self.keep
            }
        };
        for i in (1..top).rev() {
            let (from, to) = (name(i), name(i + 1));
            std::fs::rename(&from, &to)
                .map_err(|e| io_err(&from, &format!("rename to {}", to.display()), e))?;
        }
        match std::fs::rename(&self.path, name(1)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io_err(
                    &self.path,
                    &format!("rename to {}", name(1).display()),
                    e,
                ))
            }
        }
        sync_dir(&self.path)?;
        info!(path = %self.path.display(), "dead-letter file rotated");
        Ok(())
    }
}

/// Cuts a last line without its newline (an append cut short by a kill); returns the
/// new length.
fn cut_torn_tail(f: &mut File, path: &Path, len: u64) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut end = len;
    let keep = loop {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))
            .and_then(|_| f.read_exact(&mut buf[..n]))
            .map_err(|e| io_err(path, "read", e))?;
        if end == len && buf[n - 1] == b'\n' {
            return Ok(len);
        }
        if let Some(i) = buf[..n].iter().rposition(|&c| c == b'\n') {
            break start + i as u64 + 1;
        }
        if start == 0 {
            break 0;
        }
        end = start;
    };
    error!(path = %path.display(), bytes = len - keep, "the dead-letter file ends in a torn line (an append cut short by a crash; its record was never confirmed and is written again); cutting it off");
    f.set_len(keep)
        .and_then(|_| f.sync_data())
        .map_err(|e| io_err(path, "cut a torn last line", e))?;
    Ok(keep)
}

fn count_lines(p: &Path) -> usize {
    File::open(p)
        .map(|f| BufReader::new(f).lines().count())
        .unwrap_or(0)
}

/// Every dead-letter file, oldest first: `path.N` … `path.1`, `path` (every number
/// present, gaps and numbers above `dead_letter_keep` included).
pub fn files(path: &Path) -> Vec<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut rotated: Vec<(u64, PathBuf)> = Vec::new();
    if let (Some(name), Ok(rd)) = (path.file_name(), std::fs::read_dir(dir)) {
        let prefix = format!("{}.", name.to_string_lossy());
        for e in rd.flatten() {
            let n = e.file_name();
            let Some(num) = n.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
                continue;
            };
            if num.is_empty() || !num.bytes().all(|c| c.is_ascii_digit()) {
                continue;
            }
            if let Ok(i) = num.parse::<u64>() {
                rotated.push((i, path.with_file_name(&n)));
            }
        }
    }
    rotated.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|r| r.1).collect();
    if path.exists() {
        out.push(path.to_path_buf());
    }
    out
}

/// What the dead-letter files hold.
#[derive(Debug, Default)]
pub struct Contents {
    /// Every entry, oldest first, without duplicates.
    pub entries: Vec<Entry>,
    /// Lines that are not entries: where (`file:line: error`) and the raw line.
    pub bad: Vec<(String, Vec<u8>)>,
}

/// Reads every entry of every dead-letter file, oldest first, without duplicates.
/// Lines that are not valid entries are reported with their file and line number.
pub fn read_all(path: &Path) -> anyhow::Result<(Vec<Entry>, Vec<String>)> {
    let c = read_contents(path)?;
    Ok((c.entries, c.bad.into_iter().map(|b| b.0).collect()))
}

/// [`read_all`], keeping the raw bytes of the lines that are not entries.
pub fn read_contents(path: &Path) -> anyhow::Result<Contents> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Contents::default();
    for p in files(path) {
        let f = File::open(&p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
        for (i, line) in BufReader::new(f).split(b'\n').enumerate() {
            let line = line.map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Entry>(&line) {
                Ok(e) => {
                    if seen.insert(e.id()) {
                        out.entries.push(e);
                    }
                }
                Err(err) => out
                    .bad
                    .push((format!("{}:{}: {err}", p.display(), i + 1), line)),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(971_211_336_123), "2000-10-10T20:55:36.123Z");
        assert_eq!(rfc3339(1_709_251_199_000), "2024-02-29T23:59:59.000Z");
    }

    use crate::record::{DeadClass, FileKey, Fingerprint};

    fn writer(dir: &Path, max: u64, keep: u32) -> Writer {
        Writer::new(&dir.join("dl.jsonl"), max, keep, "h")
    }

    fn put(w: &mut Writer, offset: u64) {
        let f = FileInfo::new(
            0,
            FileKey { dev: 1, ino: 2 },
            Fingerprint { len: 0, hash: 3 },
            None,
            0,
            "/log".into(),
        );
        let rec = DeadRecord {
            offset,
            length: 20,
            class: DeadClass::Parse,
            error: "e".into(),
            bytes: format!("record-{offset:04}-xxxxxxxx").into_bytes(),
        };
        let e = w.entry("s", "json", &f, &rec, 1);
        w.append(&e).unwrap();
        w.sync().unwrap();
    }

    fn offsets(p: &Path) -> Vec<u64> {
        let (entries, bad) = read_all(p).unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        entries.iter().map(|e| e.offset).collect()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn rotation_keeps_files_and_deletes_only_beyond_keep() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dl.jsonl");
        // One record a file.
        let mut w = writer(d.path(), 10, 3);
        for i in 0..6 {
            put(&mut w, i);
        }
        assert_eq!(
            names(d.path()),
            ["dl.jsonl", "dl.jsonl.1", "dl.jsonl.2", "dl.jsonl.3"]
        );
        assert_eq!(offsets(&p), [2, 3, 4, 5]);
    }

    #[test]
    fn a_missing_active_file_is_recreated_without_rotating() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dl.jsonl");
        let mut w = writer(d.path(), 10, 3);
        for i in 0..3 {
            put(&mut w, i);
        }
        std::fs::remove_file(&p).unwrap();
        for i in 3..5 {
            put(&mut w, i);
        }
        // .1 and .2 (records 0 and 1) stay; 2 was removed with the active file.
        assert_eq!(offsets(&p), [0, 1, 3, 4]);
    }

    #[test]
    fn records_appended_to_a_removed_file_are_written_again_before_the_sync() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dl.jsonl");
        let mut w = writer(d.path(), 1 << 20, 3);
        put(&mut w, 0);
        let f = FileInfo::new(
            0,
            FileKey { dev: 1, ino: 2 },
            Fingerprint { len: 0, hash: 3 },
            None,
            0,
            "/log".into(),
        );
        let rec = |o: u64| DeadRecord {
            offset: o,
            length: 1,
            class: DeadClass::Parse,
            error: "e".into(),
            bytes: b"x".to_vec(),
        };
        let e1 = w.entry("s", "json", &f, &rec(1), 1);
        w.append(&e1).unwrap();
        // Removed after the append, before the sync that confirms it.
        std::fs::remove_file(&p).unwrap();
        w.sync().unwrap();
        assert_eq!(offsets(&p), [1]);
        // Truncated: the same.
        let e2 = w.entry("s", "json", &f, &rec(2), 1);
        w.append(&e2).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
        w.sync().unwrap();
        assert_eq!(offsets(&p), [2]);
    }

    #[test]
    fn an_interrupted_rotation_is_finished_without_deleting() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dl.jsonl");
        let mut w = writer(d.path(), 10, 3);
        for i in 0..4 {
            put(&mut w, i);
        }
        // A crash half-way through the next rotation: .3 deleted and .2 moved to .3.
        std::fs::remove_file(d.path().join("dl.jsonl.3")).unwrap();
        std::fs::rename(d.path().join("dl.jsonl.2"), d.path().join("dl.jsonl.3")).unwrap();
        let mut w = writer(d.path(), 10, 3);
        put(&mut w, 4);
        // The gap at .2 is filled; nothing else deleted.
        assert_eq!(offsets(&p), [1, 2, 3, 4]);
        assert_eq!(
            names(d.path()),
            ["dl.jsonl", "dl.jsonl.1", "dl.jsonl.2", "dl.jsonl.3"]
        );
    }

    #[test]
    fn a_torn_last_line_is_cut_at_open() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dl.jsonl");
        let mut w = writer(d.path(), 1 << 20, 3);
        put(&mut w, 0);
        drop(w);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"schema\":1,\"ts\":\"20").unwrap();
        let mut w = writer(d.path(), 1 << 20, 3);
        put(&mut w, 1);
        assert_eq!(offsets(&p), [0, 1]);
        // A file that is one torn line.
        std::fs::write(&p, b"{\"sch").unwrap();
        let mut w = writer(d.path(), 1 << 20, 3);
        put(&mut w, 2);
        assert_eq!(offsets(&p), [2]);
    }

    #[test]
    fn errors_name_the_path() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dl.jsonl");
        std::fs::create_dir(&p).unwrap();
        let mut w = writer(d.path(), 1 << 20, 3);
        let f = FileInfo::new(
            0,
            FileKey { dev: 1, ino: 2 },
            Fingerprint { len: 0, hash: 3 },
            None,
            0,
            "/log".into(),
        );
        let rec = DeadRecord {
            offset: 0,
            length: 1,
            class: DeadClass::Parse,
            error: "e".into(),
            bytes: b"x".to_vec(),
        };
        let e = w.entry("s", "json", &f, &rec, 1);
        let err = w.append(&e).unwrap_err().to_string();
        assert!(err.contains(p.to_str().unwrap()), "{err}");
        // (`stalled()` is process-wide; the integration tests check it.)
        std::fs::remove_dir(&p).unwrap();
        w.append(&e).unwrap();
        w.sync().unwrap();
        assert_eq!(offsets(&p), [0]);
    }

    #[test]
    fn files_lists_every_rotated_number_oldest_first() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dl.jsonl");
        for n in [
            "dl.jsonl",
            "dl.jsonl.1",
            "dl.jsonl.3",
            "dl.jsonl.1200",
            "dl.jsonl.x",
            "dl.jsonl.replay-tmp",
        ] {
            std::fs::write(d.path().join(n), b"").unwrap();
        }
        let got: Vec<String> = files(&p)
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            got,
            ["dl.jsonl.1200", "dl.jsonl.3", "dl.jsonl.1", "dl.jsonl"]
        );
    }
}
