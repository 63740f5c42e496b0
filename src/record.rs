//! The types that cross stage boundaries: follower → parse pool → publisher → committer.
//! Nothing else is shared between stages.

use std::sync::Arc;

pub use redtail_state::{FileKey, Fingerprint};

/// What the follower knows about a file at the time it cut a batch. Replaced (not mutated)
/// when the path, fingerprint or generation changes, so batches in flight keep theirs.
#[derive(Debug)]
pub struct FileInfo {
    pub source: usize,
    pub key: FileKey,
    pub fingerprint: Fingerprint,
    /// Birth time (statx btime, ns since the epoch) where the filesystem records one.
    pub btime: Option<u64>,
    /// Bumped on every in-place truncation, so offsets stay monotone per (file, generation).
    pub generation: u32,
    pub path: String,
    /// Field of the Redis marks hash holding this file's high-water mark ([`file_id`]).
    pub mark_field: String,
    /// Prefix of `log.record.uid`: the offset is appended.
    pub uid_prefix: String,
}

impl FileInfo {
    pub fn new(
        source: usize,
        key: FileKey,
        fingerprint: Fingerprint,
        btime: Option<u64>,
        generation: u32,
        path: String,
    ) -> Arc<FileInfo> {
        let id = file_id(key, btime, fingerprint);
        Arc::new(FileInfo {
            source,
            key,
            fingerprint,
            btime,
            generation,
            path,
            uid_prefix: format!("{id}-{generation}-"),
            mark_field: id,
        })
    }
}

/// Stable textual identity of a file, in hex: `<dev>-<inode>-<fingerprint>-<btime>`, the
/// birth time in nanoseconds since the epoch (an inode reused by a file with the same first
/// line is another file). Without a birth time (the filesystem records none) it is
/// `<dev>-<inode>-<fingerprint>`, which is also every field written before redtail used
/// birth times (see the migration note in README.md).
pub fn file_id(key: FileKey, btime: Option<u64>, fp: Fingerprint) -> String {
    match btime {
        Some(b) => format!("{:x}-{:x}-{:016x}-{:x}", key.dev, key.ino, fp.hash, b),
        None => format!("{:x}-{:x}-{:016x}", key.dev, key.ino, fp.hash),
    }
}

/// How a record was delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Ended by a newline (or several lines joined by multiline aggregation).
    Line,
    /// A last line released without its newline (file closed, or the partial-line timeout).
    Partial,
    /// A line longer than the dead-letter cap: `bytes` holds its first `len` bytes and
    /// `total` is the full length. Always dead-lettered.
    Oversize { total: u64 },
}

/// One record inside a batch's byte buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub len: u32,
    /// Byte offset of the record's first byte in the file.
    pub offset: u64,
    pub kind: SpanKind,
}

/// Whole records read from one file, in file order. The unit of transfer between stages.
#[derive(Debug)]
pub struct Batch {
    pub seq: u64,
    pub file: Arc<FileInfo>,
    /// File offset of the first byte this batch accounts for.
    pub start: u64,
    /// File offset just past the last byte this batch accounts for: the checkpoint once it is
    /// acknowledged.
    pub end: u64,
    /// True when Redis should already hold a mark at `start` (resumed or continued reading);
    /// false for the first batch of a file read from 0 or from `start_at = "end"`.
    pub expect_mark: bool,
    pub bytes: Vec<u8>,
    pub spans: Vec<Span>,
}

impl Batch {
    pub fn record(&self, span: &Span) -> &[u8] {
        &self.bytes[span.start as usize..(span.start + span.len) as usize]
    }
}

/// Why a record went to the dead-letter file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadClass {
    Parse,
    Oversize,
    Encoding,
    Rejected,
}

impl DeadClass {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadClass::Parse => "parse",
            DeadClass::Oversize => "oversize",
            DeadClass::Encoding => "encoding",
            DeadClass::Rejected => "rejected",
        }
    }
}

/// A record on its way to the dead-letter file.
#[derive(Debug, Clone)]
pub struct DeadRecord {
    pub offset: u64,
    /// Full length of the record in the file (may exceed `bytes.len()` for oversize lines).
    pub length: u64,
    pub class: DeadClass,
    pub error: String,
    pub bytes: Vec<u8>,
}

/// A parsed batch, ready for Redis: one XADD per record that parsed.
pub struct Parsed {
    pub seq: u64,
    pub file: Arc<FileInfo>,
    pub start: u64,
    pub end: u64,
    /// Redis should already hold a mark at `start` (see [`Batch::expect_mark`]).
    pub expect_mark: bool,
    pub xadds: Vec<redis::Cmd>,
    /// File offset of each XADD's record.
    pub offsets: Vec<u64>,
    /// Approximate wire size, for batching.
    pub wire_bytes: usize,
    pub dead: Vec<DeadRecord>,
    /// Bytes read from the file for this batch (for progress).
    pub read_bytes: u64,
    pub lines: u32,
}
