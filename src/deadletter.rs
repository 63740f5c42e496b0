//! The dead-letter file: JSON Lines, one record a line, schema in docs/dead-letter.md.
//!
//! Records are appended and fsynced *before* the Redis call that moves the file's mark past
//! them, so a checkpoint never passes a record that is neither in Redis nor on disk here.
//! A crash between the fsync and the Redis call can write a record twice; readers
//! (`redtail dlq …`) deduplicate on (file_id, generation, offset).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

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
    /// The original bytes.
    pub fn bytes(&self) -> Vec<u8> {
        match (&self.line, &self.line_b64) {
            (Some(l), _) => l.as_bytes().to_vec(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b)
                .unwrap_or_default(),
            (None, None) => Vec::new(),
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

/// Appends dead-lettered records, rotating by size.
pub struct Writer {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max_bytes: u64,
    keep: u32,
    host: String,
    unsynced: bool,
}

impl Writer {
    pub fn new(path: &Path, max_bytes: u64, keep: u32, host: &str) -> Writer {
        Writer {
            path: path.to_path_buf(),
            file: None,
            size: 0,
            max_bytes,
            keep: keep.max(1),
            host: host.to_string(),
            unsynced: false,
        }
    }

    fn open(&mut self) -> std::io::Result<&mut File> {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        Ok(self.file.as_mut().unwrap())
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

    /// Appends one entry (buffered in the kernel until [`Writer::sync`]).
    pub fn append(&mut self, e: &Entry) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(e).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let f = self.open()?;
        f.write_all(&line)?;
        self.size += line.len() as u64;
        self.unsynced = true;
        add(&STATS.dead_lettered, 1);
        Ok(())
    }

    /// Makes every appended entry durable.
    pub fn sync(&mut self) -> std::io::Result<()> {
        if self.unsynced {
            if let Some(f) = &self.file {
                f.sync_data()?;
            }
            self.unsynced = false;
        }
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.sync()?;
        self.file = None;
        let name = |i: u32| PathBuf::from(format!("{}.{i}", self.path.display()));
        let oldest = name(self.keep);
        if oldest.exists() {
            let n = count_lines(&oldest);
            warn!(path = %oldest.display(), records = n, keep = self.keep, "deleting the oldest dead-letter file (agent.dead_letter_keep)");
            std::fs::remove_file(&oldest)?;
        }
        for i in (1..self.keep).rev() {
            let from = name(i);
            if from.exists() {
                std::fs::rename(&from, name(i + 1))?;
            }
        }
        std::fs::rename(&self.path, name(1))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        info!(path = %self.path.display(), "dead-letter file rotated");
        self.size = 0;
        Ok(())
    }
}

fn count_lines(p: &Path) -> usize {
    File::open(p)
        .map(|f| BufReader::new(f).lines().count())
        .unwrap_or(0)
}

/// Every dead-letter file, oldest first: `path.N` … `path.1`, `path`.
pub fn files(path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for i in (1..=1000).rev() {
        let p = PathBuf::from(format!("{}.{i}", path.display()));
        if p.exists() {
            out.push(p);
        }
    }
    if path.exists() {
        out.push(path.to_path_buf());
    }
    out
}

/// Reads every entry of every dead-letter file, oldest first, without duplicates.
/// Lines that are not valid entries are reported with their file and line number.
pub fn read_all(path: &Path) -> anyhow::Result<(Vec<Entry>, Vec<String>)> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for p in files(path) {
        let f = File::open(&p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?;
        for (i, line) in BufReader::new(f).split(b'\n').enumerate() {
            let line = line?;
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Entry>(&line) {
                Ok(e) => {
                    if seen.insert(e.id()) {
                        out.push(e);
                    }
                }
                Err(err) => bad.push(format!("{}:{}: {err}", p.display(), i + 1)),
            }
        }
    }
    Ok((out, bad))
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
}
