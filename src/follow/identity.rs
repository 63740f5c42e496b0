//! Identity: what makes a file the same file. A file is (dev, inode, birth time, fingerprint):
//! the device and inode numbers, the birth time where the filesystem records one (statx
//! `btime`), and a hash of its first line (at most [`FINGERPRINT_MAX`] bytes). The same four
//! name its Redis mark field (`record::file_id`).
//!
//! Invariants: a fingerprint is a pure function of the file's leading bytes (FNV-1a, stable
//! across versions and platforms); an empty file has none. A reused inode with the same
//! first line is another file when the birth times differ ([`same_birth`]); without birth
//! times only the follower's own observation of the deletion tells them apart (it leaves a
//! tombstone, see `discovery.rs`). A checkpoint written before birth times were recorded is
//! adopted by a file of the same (dev, inode, fingerprint) only if that file was born before
//! the checkpoint was last written.

use std::fs::File;
use std::os::unix::fs::FileExt;

use memchr::memchr;

use crate::record::Fingerprint;

/// Bytes hashed for a file's fingerprint: its first line, at most this many bytes.
pub const FINGERPRINT_MAX: usize = 256;

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

/// Birth time of a file in nanoseconds since the epoch, where the filesystem records one.
/// (std's `created()` uses statx on Linux; ext4, xfs, btrfs and tmpfs record it, NFS, ext3
/// and older kernels do not.)
pub fn btime_of(meta: &std::fs::Metadata) -> Option<u64> {
    let t = meta.created().ok()?;
    let ns = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
    u64::try_from(ns).ok().filter(|&n| n > 0)
}

/// May a checkpoint (or mark) written for a file born at `cp_btime`, last updated at
/// `cp_updated_ms`, describe a file born at `btime`?
/// - both known: only the same birth;
/// - the checkpoint has none but the file has one (written before redtail stored birth
///   times): adopted once, if the file existed when the checkpoint was last written;
/// - the file has none (the filesystem records none): dev, inode and fingerprint decide.
pub fn same_birth(cp_btime: Option<u64>, cp_updated_ms: u64, btime: Option<u64>) -> bool {
    match (cp_btime, btime) {
        (Some(a), Some(b)) => a == b,
        (None, Some(b)) => b / 1_000_000 <= cp_updated_ms,
        (_, None) => true,
    }
}
