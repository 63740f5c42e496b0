//! notify (inotify) as a source of *hints*: a changed path is polled at once, a created or
//! renamed one triggers discovery. Events get lost (queue overflow, NFS has none), so the
//! follower never relies on them: its own timers still poll and rediscover.
//!
//! The callback runs on notify's thread and must never block it: it only records paths in
//! a set and does a `try_send` on a capacity-1 wake channel.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{bounded, Receiver, Sender};
use notify::{RecursiveMode, Watcher};
use tracing::{debug, warn};

#[derive(Default)]
struct Shared {
    paths: HashSet<PathBuf>,
    rescan: bool,
}

/// A running watcher.
pub struct Hints {
    watcher: Mutex<notify::RecommendedWatcher>,
    shared: Arc<Mutex<Shared>>,
    wake_rx: Receiver<()>,
}

impl Hints {
    /// Starts a watcher; None (poll-only mode, logged) when inotify is unavailable.
    pub fn start() -> Option<Hints> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (wake_tx, wake_rx): (Sender<()>, Receiver<()>) = bounded(1);
        let sh = shared.clone();
        let handler = move |res: notify::Result<notify::Event>| {
            let mut s = sh.lock().unwrap_or_else(|e| e.into_inner());
            match res {
                Ok(ev) => {
                    use notify::event::{EventKind as K, ModifyKind};
                    // Opens, reads and closes — ours included (listing a watched directory,
                    // reading a file's first bytes) — say nothing about new data. Heeding
                    // them made the agent wake itself up in a loop.
                    if matches!(ev.kind, K::Access(_)) && !ev.need_rescan() {
                        return;
                    }
                    let structural = matches!(
                        ev.kind,
                        K::Create(_) | K::Remove(_) | K::Modify(ModifyKind::Name(_)) | K::Other
                    );
                    if ev.need_rescan() || structural {
                        s.rescan = true;
                    }
                    s.paths.extend(ev.paths);
                }
                Err(_) => s.rescan = true,
            }
            drop(s);
            let _ = wake_tx.try_send(());
        };
        match notify::recommended_watcher(handler) {
            Ok(w) => Some(Hints {
                watcher: Mutex::new(w),
                shared,
                wake_rx,
            }),
            Err(e) => {
                warn!(error = %e, "file notifications unavailable; polling only");
                None
            }
        }
    }

    /// Watches a directory (not recursively). A directory that does not exist yet is
    /// found again by discovery; failures only cost latency, so they are logged at debug.
    pub fn watch(&self, dir: &Path) -> bool {
        let mut w = self.watcher.lock().unwrap_or_else(|e| e.into_inner());
        match w.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => true,
            Err(e) => {
                debug!(dir = %dir.display(), error = %e, "cannot watch directory; polling it");
                false
            }
        }
    }

    /// The channel that becomes ready when something happened.
    pub fn wake_rx(&self) -> &Receiver<()> {
        &self.wake_rx
    }

    /// Takes the paths seen since the last call, and whether a rescan is needed.
    pub fn take(&self) -> (HashSet<PathBuf>, bool) {
        let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        let paths = std::mem::take(&mut s.paths);
        let rescan = std::mem::replace(&mut s.rescan, false);
        (paths, rescan)
    }
}
