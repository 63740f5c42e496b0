//! Identity: what makes a file the same file. Owns the fingerprint (hash of the first line,
//! at most [`FINGERPRINT_MAX`] bytes) and how it is computed and compared.
//!
//! Invariants: a fingerprint is a pure function of the file's leading bytes (FNV-1a, stable
//! across versions and platforms, so it can name a Redis mark field); an empty file has none.

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
