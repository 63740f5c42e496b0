//! Checkpoint-store growth and commit cost (issue #5 benchmark).
//!
//! 10,000,000 checkpoint updates over 1,000 files, committed in batches of
//! 1,000 (one commit per 1,000 updates, like one commit interval with 1,000
//! active files), `flush()` after every commit; `export_snapshot()` every 100
//! commits. Prints the on-disk size of the sled directory every 1M updates,
//! the total time and µs per commit (commit + flush).
//!
//! Run: cargo run --release -p redtail-state --example commit_bench [-- UPDATES [DIR]]

use redtail_state::{Checkpoint, CheckpointStore, FileKey, Fingerprint};
use std::path::Path;
use std::time::Instant;

fn du(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let md = match e.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            if md.is_dir() {
                total += du(&e.path());
            } else {
                use std::os::unix::fs::MetadataExt;
                total += md.blocks() * 512; // allocated, like `du`
            }
        }
    }
    total
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let updates: u64 = args
        .get(1)
        .map(|s| s.parse().expect("UPDATES"))
        .unwrap_or(10_000_000);
    let dir = match args.get(2) {
        Some(d) => std::path::PathBuf::from(d),
        None => std::env::temp_dir().join(format!("redtail-commit-bench-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&dir);
    const FILES: u64 = 1_000;
    const BATCH: u64 = 1_000;
    let store = CheckpointStore::open(&dir).expect("open store");
    let sled_dir = dir.join("checkpoints.sled");
    println!(
        "state dir: {}  ({} updates, {} files, {} per commit, flush every commit)",
        dir.display(),
        updates,
        FILES,
        BATCH
    );
    println!("| updates | commits | sled dir (du) MiB | elapsed s | µs/commit (last 1M) |");
    println!("|---:|---:|---:|---:|---:|");
    let mut offsets = vec![0u64; FILES as usize];
    let mut batch = Vec::with_capacity(BATCH as usize);
    let t0 = Instant::now();
    let mut seg = Instant::now();
    let mut seg_commits = 0u64;
    let mut commits = 0u64;
    let mut worst = std::time::Duration::ZERO;
    let mut done = 0u64;
    while done < updates {
        batch.clear();
        for _ in 0..BATCH.min(updates - done) {
            let f = done % FILES;
            offsets[f as usize] += 180 + (done % 37);
            batch.push(Checkpoint {
                source: "access".into(),
                key: FileKey {
                    dev: 2049,
                    ino: 1_000_000 + f,
                },
                fingerprint: Fingerprint {
                    len: 1024,
                    hash: 0x9e37_79b9_7f4a_7c15 ^ f,
                },
                btime: None,
                generation: 0,
                offset: offsets[f as usize],
                path: format!("/var/log/app/service-{f:04}/access.log"),
                updated_ms: 1_700_000_000_000 + done / 100,
            });
            done += 1;
        }
        let c = Instant::now();
        store.commit(&batch).expect("commit");
        store.flush().expect("flush");
        let dt = c.elapsed();
        worst = worst.max(dt);
        commits += 1;
        seg_commits += 1;
        if commits.is_multiple_of(100) {
            store.export_snapshot().expect("export");
        }
        if done.is_multiple_of(1_000_000) || done == updates {
            let us = seg.elapsed().as_secs_f64() * 1e6 / seg_commits as f64;
            println!(
                "| {} | {} | {:.2} | {:.1} | {:.0} |",
                done,
                commits,
                du(&sled_dir) as f64 / (1 << 20) as f64,
                t0.elapsed().as_secs_f64(),
                us
            );
            seg = Instant::now();
            seg_commits = 0;
        }
    }
    let total = t0.elapsed();
    println!(
        "total: {} updates in {} commits, {:.1} s, {:.0} µs per commit (commit+flush, \
              incl. a snapshot export every 100 commits), worst commit+flush {:.1} ms",
        done,
        commits,
        total.as_secs_f64(),
        total.as_secs_f64() * 1e6 / commits as f64,
        worst.as_secs_f64() * 1e3
    );
    drop(store);
    println!(
        "after close: sled dir {:.2} MiB, whole state dir {:.2} MiB",
        du(&sled_dir) as f64 / (1 << 20) as f64,
        du(&dir) as f64 / (1 << 20) as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
}
