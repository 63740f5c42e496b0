//! Process-wide counters. Every place where a record could be lost, skipped or diverted
//! bumps one, so that nothing disappears silently: `run` logs them periodically and at exit,
//! `backfill` prints them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// Counters, all monotone.
        #[derive(Default, Debug)]
        pub struct Stats { $(#[doc = $doc] pub $name: AtomicU64,)* }
        impl Stats {
            /// (name, value) pairs, for logs and summaries.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Relaxed)),)*]
            }
        }
    };
}

counters! {
    bytes_read: "bytes read from files",
    records_read: "records cut from files",
    entries_published: "entries Redis acknowledged",
    entries_skipped: "entries Redis already held (replay after a crash or reconnect)",
    dead_lettered: "records written to the dead-letter file",
    dropped_by_filter: "records dropped by a source's `drop` filter",
    partial_lines_flushed: "last lines released without their newline",
    oversize_lines: "lines longer than max_line_bytes",
    files_opened: "files opened",
    rotations: "rotations detected",
    truncations: "truncations detected",
    lost_bytes: "bytes that could not be read (file closed early, truncated mid-line); always logged",
    redis_retries: "Redis calls retried after a transient error",
    redis_gaps: "files whose Redis-side mark was missing or behind the checkpoint",
    out_of_order: "entries published after later ones of their file (a refused transaction overtaken; none lost or doubled)",
    checkpoint_commits: "checkpoint store commits",
}

/// The one instance.
pub static STATS: std::sync::LazyLock<Stats> = std::sync::LazyLock::new(Stats::default);

/// Adds `n` to a counter.
#[inline]
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

/// Reads a counter.
pub fn get(c: &AtomicU64) -> u64 {
    c.load(Relaxed)
}
