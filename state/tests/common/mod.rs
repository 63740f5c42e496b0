//! Helpers shared by the integration tests (no extra dependencies).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use redtail_state::{Checkpoint, FileKey, Fingerprint};

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!(
            "redtail-state-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn key(ino: u64) -> FileKey {
    FileKey { dev: 2049, ino }
}

pub fn cp(source: &str, ino: u64, offset: u64, path: &str, updated_ms: u64) -> Checkpoint {
    Checkpoint {
        source: source.to_string(),
        key: key(ino),
        fingerprint: Fingerprint {
            len: 64,
            hash: ino.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        },
        btime: None,
        generation: 0,
        offset,
        path: path.to_string(),
        updated_ms,
    }
}

/// Total size of the regular files below `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            total += dir_size(&entry.path());
        } else {
            total += meta.len();
        }
    }
    total
}
