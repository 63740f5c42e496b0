//! redtail's checkpoint store.
//!
//! A [`CheckpointStore`] remembers, per source and per file (device + inode),
//! the byte offset up to which every record has been delivered to Redis (or to
//! the dead-letter file). It lives in `state_dir/checkpoints.sled`, a
//! [sled](https://docs.rs/sled/0.34.7) database, and is written in atomic
//! batches ([`CheckpointStore::commit`]) that are made durable only by an
//! explicit [`CheckpointStore::flush`] at the caller's commit points.
//!
//! sled holds an exclusive lock on its files for as long as the store is open,
//! and has no read-only mode. A running agent therefore exports a JSON snapshot
//! (`state_dir/checkpoints.json`, see [`CheckpointStore::export_snapshot`]) after
//! each commit, and inspection tools read it with [`read_snapshot`] when
//! [`CheckpointStore::open`] reports [`StateError::Locked`].
//!
//! A store that cannot be read is never silently replaced by an empty one:
//! [`CheckpointStore::open`] returns [`StateError::Corrupt`], and the operator
//! runs the explicit [`recover`] (`redtail state recover [--from-snapshot]`).
//!
//! The on-disk layout is described in `docs/checkpoints.md`:
//!
//! * one sled tree, `checkpoints`; key = `u16` big-endian length of the source
//!   name, the source name (UTF-8), `dev` (`u64` BE), `ino` (`u64` BE);
//! * value = one format-version byte ([`VALUE_VERSION`], currently 1) followed
//!   by the [`Checkpoint`] as JSON; an unknown version byte is reported as
//!   [`StateError::Version`], never guessed at;
//! * a tree `redtail-meta` holding `format` = `[1]`, written when the store is
//!   created; a store whose files exist but whose marker is missing is reported
//!   as corrupt (this is how a log that sled silently truncated to nothing is
//!   caught).
//!
//! # Example
//!
//! ```
//! use redtail_state::{Checkpoint, CheckpointStore, FileKey, Fingerprint};
//!
//! # fn main() -> Result<(), redtail_state::StateError> {
//! # let dir = std::env::temp_dir().join(format!("redtail-state-doc-{}", std::process::id()));
//! # let _ = std::fs::remove_dir_all(&dir);
//! let store = CheckpointStore::open(&dir)?;
//! let key = FileKey { dev: 2049, ino: 131_077 };
//! store.commit(&[Checkpoint {
//!     source: "nginx".into(),
//!     key,
//!     fingerprint: Fingerprint { len: 256, hash: 0x9e37_79b9_7f4a_7c15 },
//!     btime: Some(1_699_999_000_123_456_789),
//!     generation: 0,
//!     offset: 4096,
//!     path: "/var/log/nginx/access.log".into(),
//!     updated_ms: 1_700_000_000_000,
//! }])?;
//! store.flush()?; // durable from here on
//! store.export_snapshot()?; // for `redtail checkpoints` while we hold the lock
//!
//! let cp = store.get("nginx", key)?.expect("just committed");
//! assert_eq!(cp.offset, 4096);
//! # drop(store);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Name of the sled database directory inside the state directory.
pub const STORE_DIR_NAME: &str = "checkpoints.sled";
/// Name of the JSON snapshot file inside the state directory.
pub const SNAPSHOT_FILE_NAME: &str = "checkpoints.json";
/// Name of the temporary file the snapshot is written to before the rename.
pub const SNAPSHOT_TMP_NAME: &str = "checkpoints.json.tmp";
/// Format version byte that prefixes every stored value.
pub const VALUE_VERSION: u8 = 1;
/// Version of the JSON snapshot format written by [`CheckpointStore::export_snapshot`].
pub const SNAPSHOT_VERSION: u32 = 1;

const CHECKPOINT_TREE: &str = "checkpoints";
const META_TREE: &str = "redtail-meta";
const META_FORMAT_KEY: &[u8] = b"format";
const LAYOUT_VERSION: u8 = 1;
const SLED_CACHE_BYTES: u64 = 1 << 20;
const LOCK_MARKER: &str = "could not acquire lock";

/// Identity of a file: device and inode numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileKey {
    /// Device number (`st_dev`).
    pub dev: u64,
    /// Inode number (`st_ino`).
    pub ino: u64,
}

/// Fingerprint of a file's head, used to detect inode reuse and rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Number of leading bytes hashed.
    pub len: u32,
    /// Hash of the first `len` bytes of the file.
    pub hash: u64,
}

/// How far one file of one source has been delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Source name from the configuration.
    pub source: String,
    /// Device and inode of the file.
    pub key: FileKey,
    /// Fingerprint of the file's head.
    pub fingerprint: Fingerprint,
    /// Birth time of the file (statx `btime`), nanoseconds since the Unix epoch; `None` on
    /// filesystems that do not record one, and in records written before redtail stored it
    /// (absent from the JSON: such records stay readable, version 1 unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub btime: Option<u64>,
    /// Bumped each time the file was truncated in place.
    pub generation: u32,
    /// Byte offset up to which every record is in Redis or the dead-letter file.
    pub offset: u64,
    /// Where the file was last seen (lossy UTF-8 of the path).
    pub path: String,
    /// Unix epoch milliseconds of the last commit.
    pub updated_ms: u64,
}

/// Contents of `state_dir/checkpoints.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Snapshot format version ([`SNAPSHOT_VERSION`]).
    pub version: u32,
    /// Unix epoch milliseconds at which the snapshot was written.
    pub written_ms: u64,
    /// Every checkpoint, sorted like [`CheckpointStore::all`].
    pub checkpoints: Vec<Checkpoint>,
}

/// Errors of the checkpoint store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// An I/O operation on `path` failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// Another process holds the store open.
    #[error(
        "checkpoint store {} is locked by another process (is `redtail run` running?); \
         read the snapshot {} instead, as `redtail checkpoints` does",
        path.display(), snapshot_path(path).display()
    )]
    Locked {
        /// The sled database directory.
        path: PathBuf,
    },
    /// The store cannot be read; it is never replaced silently.
    #[error(
        "checkpoint store {} is corrupt or unreadable: {detail}; \
         run `redtail state recover --from-snapshot` (or without --from-snapshot to start empty); \
         recovery moves the damaged store aside, it never deletes it",
        path.display()
    )]
    Corrupt {
        /// The sled database directory.
        path: PathBuf,
        /// What was found wrong.
        detail: String,
    },
    /// A stored record or the store layout has a format version this build does not know.
    #[error(
        "checkpoint format version {found} is not supported (this build reads version {VALUE_VERSION}); \
         was the store written by a newer redtail?"
    )]
    Version {
        /// The version byte found.
        found: u8,
    },
    /// The snapshot file exists but cannot be used.
    #[error("checkpoint snapshot {} is unreadable: {detail}", path.display())]
    Snapshot {
        /// The snapshot file.
        path: PathBuf,
        /// What was found wrong.
        detail: String,
    },
    /// A source name that cannot be stored (longer than 65535 bytes).
    #[error("source name of {len} bytes is too long for the checkpoint store (max 65535)")]
    SourceName {
        /// Length of the rejected name in bytes.
        len: usize,
    },
    /// The state directory does not exist (reported by the read-only [`read_only`], which
    /// never creates it).
    #[error("state directory {} does not exist", path.display())]
    NoStateDir {
        /// The missing state directory.
        path: PathBuf,
    },
    /// sled reported an internal failure that is neither I/O nor corruption.
    #[error("checkpoint store {}: sled failure: {detail}", path.display())]
    Store {
        /// The sled database directory.
        path: PathBuf,
        /// sled's description.
        detail: String,
    },
}

fn snapshot_path(store_path: &Path) -> PathBuf {
    store_path
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(SNAPSHOT_FILE_NAME)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Maps a sled error from a running store.
fn runtime_err(path: &Path, e: sled::Error) -> StateError {
    let path = path.to_path_buf();
    match e {
        sled::Error::Io(source) => StateError::Io { path, source },
        sled::Error::Corruption { .. } => StateError::Corrupt {
            path,
            detail: e.to_string(),
        },
        other => StateError::Store {
            path,
            detail: other.to_string(),
        },
    }
}

/// Maps a sled error from `Config::open`.
fn open_err(path: &Path, e: sled::Error) -> StateError {
    let path = path.to_path_buf();
    match e {
        sled::Error::Io(source) if source.to_string().contains(LOCK_MARKER) => {
            StateError::Locked { path }
        }
        sled::Error::Io(source)
            if matches!(
                source.kind(),
                io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
            ) =>
        {
            StateError::Corrupt {
                path,
                detail: source.to_string(),
            }
        }
        sled::Error::Io(source) => StateError::Io { path, source },
        // Corruption, and Unsupported/ReportableBug raised while parsing the
        // on-disk config or log: the files cannot be used as they are.
        other => StateError::Corrupt {
            path,
            detail: other.to_string(),
        },
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn encode_key(source: &str, key: FileKey) -> Result<Vec<u8>, StateError> {
    let len =
        u16::try_from(source.len()).map_err(|_| StateError::SourceName { len: source.len() })?;
    let mut k = Vec::with_capacity(2 + source.len() + 16);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(source.as_bytes());
    k.extend_from_slice(&key.dev.to_be_bytes());
    k.extend_from_slice(&key.ino.to_be_bytes());
    Ok(k)
}

fn encode_value(cp: &Checkpoint) -> Vec<u8> {
    let mut v = vec![VALUE_VERSION];
    // Serializing plain structs of strings and integers cannot fail.
    serde_json::to_writer(&mut v, cp).expect("checkpoint serializes");
    v
}

/// Decodes a stored value; `path` is the store directory for error messages.
fn decode_value(path: &Path, key: &[u8], value: &[u8]) -> Result<Checkpoint, StateError> {
    let corrupt = |detail: String| StateError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    let (&version, body) = value
        .split_first()
        .ok_or_else(|| corrupt("empty checkpoint value".into()))?;
    if version != VALUE_VERSION {
        return Err(StateError::Version { found: version });
    }
    let cp: Checkpoint = serde_json::from_slice(body)
        .map_err(|e| corrupt(format!("undecodable checkpoint value: {e}")))?;
    if encode_key(&cp.source, cp.key)? != key {
        return Err(corrupt(format!(
            "checkpoint for source {:?} {:?} stored under a foreign key",
            cp.source, cp.key
        )));
    }
    Ok(cp)
}

fn sort_checkpoints(cps: &mut [Checkpoint]) {
    cps.sort_by(|a, b| (&a.source, &a.path, a.key).cmp(&(&b.source, &b.path, b.key)));
}

/// The checkpoint store: a sled database at `state_dir/checkpoints.sled`.
///
/// All methods take `&self`; the store is `Send + Sync` and can be shared
/// behind an `Arc`. Dropping it releases the lock (after sled's own final
/// flush); durability is only promised by [`CheckpointStore::flush`].
pub struct CheckpointStore {
    state_dir: PathBuf,
    db_path: PathBuf,
    db: sled::Db,
    tree: sled::Tree,
    export_lock: Mutex<()>,
}

impl fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointStore")
            .field("db_path", &self.db_path)
            .finish_non_exhaustive()
    }
}

impl CheckpointStore {
    /// Opens (creating if needed) the store at `state_dir/checkpoints.sled`.
    ///
    /// Creates `state_dir` if missing. Errors: [`StateError::Locked`] when
    /// another process has the store open; [`StateError::Corrupt`] when the
    /// files cannot be read, when they exist but hold no redtail store, or when
    /// the store is missing while a snapshot with checkpoints exists (so a
    /// deleted or moved store is not silently restarted from zero);
    /// [`StateError::Version`] for an unknown layout version.
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        Self::open_inner(state_dir, false)
    }

    fn open_inner(state_dir: &Path, fresh_ok: bool) -> Result<Self, StateError> {
        fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
        let db_path = state_dir.join(STORE_DIR_NAME);
        let existed = store_files_exist(&db_path);
        if !existed && !fresh_ok {
            let detail = match read_snapshot(state_dir) {
                Ok(Some(snap)) if !snap.checkpoints.is_empty() => Some(format!(
                    "the store is missing but {SNAPSHOT_FILE_NAME} holds {} checkpoints",
                    snap.checkpoints.len()
                )),
                Ok(_) => None,
                Err(e) => Some(format!(
                    "the store is missing and {SNAPSHOT_FILE_NAME} exists but is unreadable ({e})"
                )),
            };
            if let Some(detail) = detail {
                return Err(StateError::Corrupt {
                    path: db_path,
                    detail,
                });
            }
        }
        let db = open_sled(&db_path, &db_path, Duration::from_millis(500))?;
        let meta = db.open_tree(META_TREE).map_err(|e| open_err(&db_path, e))?;
        match meta
            .get(META_FORMAT_KEY)
            .map_err(|e| open_err(&db_path, e))?
        {
            Some(v) if v.as_ref() == [LAYOUT_VERSION] => {}
            Some(v) if v.len() == 1 => return Err(StateError::Version { found: v[0] }),
            Some(v) => {
                return Err(StateError::Corrupt {
                    path: db_path,
                    detail: format!("unreadable format marker {:?}", v.as_ref()),
                })
            }
            // Files without a marker and no snapshot with checkpoints: the agent was
            // killed during its very first open (the marker is flushed before any commit,
            // and every commit exports a snapshot), so nothing can have been lost.
            None if existed && !snapshot_has_checkpoints(state_dir) => {
                meta.insert(META_FORMAT_KEY, &[LAYOUT_VERSION])
                    .map_err(|e| runtime_err(&db_path, e))?;
                db.flush().map_err(|e| runtime_err(&db_path, e))?;
            }
            None if existed => {
                return Err(StateError::Corrupt {
                    path: db_path,
                    detail: "the store files exist but hold no redtail format marker \
                             (sled found no readable data)"
                        .into(),
                })
            }
            None => {
                meta.insert(META_FORMAT_KEY, &[LAYOUT_VERSION])
                    .map_err(|e| runtime_err(&db_path, e))?;
                db.flush().map_err(|e| runtime_err(&db_path, e))?;
            }
        }
        let tree = db
            .open_tree(CHECKPOINT_TREE)
            .map_err(|e| open_err(&db_path, e))?;
        Ok(Self {
            state_dir: state_dir.to_path_buf(),
            db_path,
            db,
            tree,
            export_lock: Mutex::new(()),
        })
    }

    /// Returns the checkpoint of `key` in `source`, if any.
    pub fn get(&self, source: &str, key: FileKey) -> Result<Option<Checkpoint>, StateError> {
        let k = encode_key(source, key)?;
        match self
            .tree
            .get(&k)
            .map_err(|e| runtime_err(&self.db_path, e))?
        {
            Some(v) => decode_value(&self.db_path, &k, &v).map(Some),
            None => Ok(None),
        }
    }

    /// Returns every checkpoint of every source, sorted by (source, path, key).
    pub fn all(&self) -> Result<Vec<Checkpoint>, StateError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item.map_err(|e| runtime_err(&self.db_path, e))?;
            out.push(decode_value(&self.db_path, &k, &v)?);
        }
        sort_checkpoints(&mut out);
        Ok(out)
    }

    /// Stores `updates` (any mix of sources) as one atomic sled batch.
    ///
    /// Later entries for the same (source, key) win. Does not flush: the
    /// batch is durable only after the next [`CheckpointStore::flush`].
    pub fn commit(&self, updates: &[Checkpoint]) -> Result<(), StateError> {
        let mut batch = sled::Batch::default();
        for cp in updates {
            batch.insert(encode_key(&cp.source, cp.key)?, encode_value(cp));
        }
        self.tree
            .apply_batch(batch)
            .map_err(|e| runtime_err(&self.db_path, e))
    }

    /// Removes the checkpoint of `key` in `source` (no error if absent). Does not flush.
    pub fn remove(&self, source: &str, key: FileKey) -> Result<(), StateError> {
        let k = encode_key(source, key)?;
        self.tree
            .remove(k)
            .map(drop)
            .map_err(|e| runtime_err(&self.db_path, e))
    }

    /// Removes and returns the checkpoints with `updated_ms < older_than_ms`.
    ///
    /// Each removal is a compare-and-swap against the value read, so a
    /// checkpoint committed concurrently is never pruned. Does not flush.
    pub fn prune(&self, older_than_ms: u64) -> Result<Vec<Checkpoint>, StateError> {
        let mut pruned = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item.map_err(|e| runtime_err(&self.db_path, e))?;
            let cp = decode_value(&self.db_path, &k, &v)?;
            if cp.updated_ms >= older_than_ms {
                continue;
            }
            let swapped = self
                .tree
                .compare_and_swap(&k, Some(&v), None as Option<&[u8]>)
                .map_err(|e| runtime_err(&self.db_path, e))?;
            if swapped.is_ok() {
                pruned.push(cp);
            }
        }
        sort_checkpoints(&mut pruned);
        Ok(pruned)
    }

    /// Makes every preceding commit/remove/prune durable (sled `flush`, which fsyncs).
    pub fn flush(&self) -> Result<(), StateError> {
        self.db
            .flush()
            .map(drop)
            .map_err(|e| runtime_err(&self.db_path, e))
    }

    /// Writes [`CheckpointStore::all`] to `state_dir/checkpoints.json` atomically.
    ///
    /// Writes `checkpoints.json.tmp`, `sync_all`s it, renames it over
    /// `checkpoints.json` and fsyncs the directory, so readers see either the
    /// previous or the new snapshot, never a torn one. Exports are serialized
    /// within the process. The snapshot shows each key's latest value at the
    /// time it is read; export from the committing thread for a consistent cut.
    pub fn export_snapshot(&self) -> Result<(), StateError> {
        let _guard = self
            .export_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let snap = Snapshot {
            version: SNAPSHOT_VERSION,
            written_ms: now_ms(),
            checkpoints: self.all()?,
        };
        let mut body = serde_json::to_vec_pretty(&snap).expect("snapshot serializes");
        body.push(b'\n');
        let tmp = self.state_dir.join(SNAPSHOT_TMP_NAME);
        let dst = self.state_dir.join(SNAPSHOT_FILE_NAME);
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(&body).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
        sync_dir(&self.state_dir)
    }

    /// The state directory this store was opened in.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
}

/// Opens the sled database at `at`; errors name `shown` (the store the caller means, which
/// differs from `at` for the read-only copy). A lock held by a store that is just being
/// closed (sled releases it from a background thread, a moment after the last handle is
/// dropped; or a restarting agent's predecessor) is waited for up to `lock_wait` before it
/// counts as another process's. sled 0.34 may panic instead of erroring on some damaged
/// files: that is reported as [`StateError::Corrupt`].
fn open_sled(at: &Path, shown: &Path, lock_wait: Duration) -> Result<sled::Db, StateError> {
    let config = sled::Config::new()
        .path(at)
        .cache_capacity(SLED_CACHE_BYTES)
        .mode(sled::Mode::LowSpace)
        .flush_every_ms(None);
    let deadline = Instant::now() + lock_wait;
    let opened = loop {
        let r = panic::catch_unwind(AssertUnwindSafe(|| config.open()));
        match &r {
            Ok(Err(sled::Error::Io(e)))
                if e.to_string().contains(LOCK_MARKER) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => break r,
        }
    };
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(open_err(shown, e)),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(StateError::Corrupt {
                path: shown.to_path_buf(),
                detail: format!("sled panicked while opening: {msg}"),
            })
        }
    }
}

/// Reads every checkpoint without writing anything in `state_dir`: no directory, no file,
/// no sled snapshot rewrite, no mtime change (`redtail checkpoints`).
///
/// sled has no read-only mode and writes while it opens (it recovers its log and rewrites
/// its own `snap.*` files), so the store is copied to a private temporary directory
/// under [`std::env::temp_dir`] while a shared `flock` on its `db` file keeps an agent
/// from opening it meanwhile, and the copy is opened and removed. Sorted like
/// [`CheckpointStore::all`].
///
/// Errors: [`StateError::NoStateDir`] when `state_dir` does not exist (it is not
/// created); [`StateError::Locked`] while another process has the store open (read the
/// snapshot with [`read_snapshot`] instead); [`StateError::Corrupt`] and
/// [`StateError::Version`] as [`CheckpointStore::open`] reports them. A state directory
/// without a store, or with a store that never got its format marker while no snapshot
/// holds checkpoints, has no checkpoints: `Ok` with an empty list.
pub fn read_only(state_dir: &Path) -> Result<Vec<Checkpoint>, StateError> {
    match fs::metadata(state_dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(StateError::Io {
                path: state_dir.to_path_buf(),
                source: io::Error::other("not a directory"),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StateError::NoStateDir {
                path: state_dir.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(state_dir)(e)),
    }
    let db_path = state_dir.join(STORE_DIR_NAME);
    if !store_files_exist(&db_path) {
        return match read_snapshot(state_dir) {
            Ok(Some(snap)) if !snap.checkpoints.is_empty() => Err(StateError::Corrupt {
                path: db_path,
                detail: format!(
                    "the store is missing but {SNAPSHOT_FILE_NAME} holds {} checkpoints",
                    snap.checkpoints.len()
                ),
            }),
            Ok(_) => Ok(Vec::new()),
            Err(e) => Err(StateError::Corrupt {
                path: db_path,
                detail: format!(
                    "the store is missing and {SNAPSHOT_FILE_NAME} exists but is unreadable ({e})"
                ),
            }),
        };
    }
    let scratch = Scratch::new()?;
    let copy = scratch.0.join(STORE_DIR_NAME);
    {
        let _shared = lock_shared(&db_path)?;
        copy_tree(&db_path, &copy)?;
    }
    let db = open_sled(&copy, &db_path, Duration::ZERO)?;
    let meta = db.open_tree(META_TREE).map_err(|e| open_err(&db_path, e))?;
    match meta
        .get(META_FORMAT_KEY)
        .map_err(|e| open_err(&db_path, e))?
    {
        Some(v) if v.as_ref() == [LAYOUT_VERSION] => {}
        Some(v) if v.len() == 1 => return Err(StateError::Version { found: v[0] }),
        Some(v) => {
            return Err(StateError::Corrupt {
                path: db_path,
                detail: format!("unreadable format marker {:?}", v.as_ref()),
            })
        }
        // Killed during its very first open: nothing can have been committed (see `open`).
        None if !snapshot_has_checkpoints(state_dir) => return Ok(Vec::new()),
        None => {
            return Err(StateError::Corrupt {
                path: db_path,
                detail: "the store files exist but hold no redtail format marker \
                         (sled found no readable data)"
                    .into(),
            })
        }
    }
    let tree = db
        .open_tree(CHECKPOINT_TREE)
        .map_err(|e| open_err(&db_path, e))?;
    let mut out = Vec::new();
    for item in tree.iter() {
        let (k, v) = item.map_err(|e| runtime_err(&db_path, e))?;
        out.push(decode_value(&db_path, &k, &v)?);
    }
    sort_checkpoints(&mut out);
    Ok(out)
}

/// A private directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch, StateError> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let base = std::env::temp_dir();
        loop {
            let p = base.join(format!(
                "redtail-state-ro-{}-{}-{}",
                std::process::id(),
                now_ms(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            match fs::create_dir(&p) {
                Ok(()) => return Ok(Scratch(p)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&p)(e)),
            }
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // sled may still be closing the copy from its background thread: retry briefly.
        for _ in 0..10 {
            if fs::remove_dir_all(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A shared `flock` on the store's `db` file, taken through a read-only descriptor (so it
/// changes nothing); contended while a process holds sled's exclusive lock.
fn lock_shared(db_path: &Path) -> Result<Option<File>, StateError> {
    let db_file = db_path.join("db");
    let f = match File::open(&db_file) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&db_file)(e)),
    };
    // Like `open`, a lock that is just being released is waited for briefly.
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        match fs2::FileExt::try_lock_shared(&f) {
            Ok(()) => return Ok(Some(f)),
            Err(e) if e.kind() == fs2::lock_contended_error().kind() => {
                if Instant::now() >= deadline {
                    return Err(StateError::Locked {
                        path: db_path.to_path_buf(),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io_err(&db_file)(e)),
        }
    }
}

/// Copies the directory tree `from` to `to` (which must not exist), reading only.
fn copy_tree(from: &Path, to: &Path) -> Result<(), StateError> {
    fs::create_dir(to).map_err(io_err(to))?;
    for entry in fs::read_dir(from).map_err(io_err(from))? {
        let entry = entry.map_err(io_err(from))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let ty = entry.file_type().map_err(io_err(&src))?;
        if ty.is_dir() {
            copy_tree(&src, &dst)?;
        } else if ty.is_file() {
            fs::copy(&src, &dst).map_err(io_err(&src))?;
        }
    }
    Ok(())
}

fn store_files_exist(db_path: &Path) -> bool {
    ["db", "conf"].iter().any(|f| {
        fs::metadata(db_path.join(f))
            .map(|m| m.len() > 0)
            .unwrap_or(false)
    })
}

fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Reads `state_dir/checkpoints.json`; `Ok(None)` when it does not exist.
///
/// Only the renamed-into-place file is read, so a leftover
/// `checkpoints.json.tmp` from an interrupted export is ignored.
pub fn read_snapshot(state_dir: &Path) -> Result<Option<Snapshot>, StateError> {
    let path = state_dir.join(SNAPSHOT_FILE_NAME);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StateError::Io { path, source: e }),
    };
    #[derive(Deserialize)]
    struct VersionOnly {
        version: u32,
    }
    let bad = |detail: String| StateError::Snapshot {
        path: path.clone(),
        detail,
    };
    let v: VersionOnly = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if v.version != SNAPSHOT_VERSION {
        return Err(bad(format!(
            "snapshot version {} is not supported (this build reads {SNAPSHOT_VERSION})",
            v.version
        )));
    }
    let snap: Snapshot = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    Ok(Some(snap))
}

/// Explicit recovery for a corrupt or unreadable store (`redtail state recover`).
///
/// Moves `state_dir/checkpoints.sled` aside to
/// `checkpoints.sled.corrupt-<unix_ms>` (never deletes it), opens a fresh
/// store, seeds it from the snapshot when `seed_from_snapshot` is true and a
/// snapshot exists (flushing it), and returns the store, the path the old store
/// was moved to, and the number of checkpoints seeded. Refuses with
/// [`StateError::Locked`] while another process has the store open, and
/// with [`StateError::Snapshot`] (before touching anything) when seeding was
/// asked for and the snapshot is unreadable. If there is no store to move
/// aside, the returned path is where it would have gone.
pub fn recover(
    state_dir: &Path,
    seed_from_snapshot: bool,
) -> Result<(CheckpointStore, PathBuf, usize), StateError> {
    fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
    let db_path = state_dir.join(STORE_DIR_NAME);
    let snapshot = if seed_from_snapshot {
        read_snapshot(state_dir)?
    } else {
        None
    };
    let mut aside = state_dir.join(format!("{STORE_DIR_NAME}.corrupt-{}", now_ms()));
    let mut n = 1;
    while aside.exists() {
        aside = state_dir.join(format!("{STORE_DIR_NAME}.corrupt-{}-{n}", now_ms()));
        n += 1;
    }
    // Hold sled's lock on the old `db` file while moving it, so a running (or
    // starting) agent is never pulled out from under.
    let _held = lock_existing_db(&db_path)?;
    match fs::rename(&db_path, &aside) {
        Ok(()) => sync_dir(state_dir)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(StateError::Io {
                path: db_path,
                source: e,
            })
        }
    }
    let store = CheckpointStore::open_inner(state_dir, true)?;
    let mut seeded = 0;
    if let Some(snap) = snapshot {
        store.commit(&snap.checkpoints)?;
        store.flush()?;
        seeded = snap.checkpoints.len();
    }
    Ok((store, aside, seeded))
}

fn lock_existing_db(db_path: &Path) -> Result<Option<File>, StateError> {
    use fs2::FileExt;
    let db_file = db_path.join("db");
    let f = match OpenOptions::new().read(true).write(true).open(&db_file) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(StateError::Io {
                path: db_file,
                source: e,
            })
        }
    };
    match f.try_lock_exclusive() {
        Ok(()) => Ok(Some(f)),
        Err(e) if e.kind() == fs2::lock_contended_error().kind() => Err(StateError::Locked {
            path: db_path.to_path_buf(),
        }),
        Err(e) => Err(StateError::Io {
            path: db_file,
            source: e,
        }),
    }
}

/// Whether a snapshot exists that holds checkpoints (or cannot be read, which counts).
fn snapshot_has_checkpoints(state_dir: &Path) -> bool {
    !matches!(read_snapshot(state_dir), Ok(None))
        && !matches!(read_snapshot(state_dir), Ok(Some(s)) if s.checkpoints.is_empty())
}
