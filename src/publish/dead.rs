//! The publisher's dead letters: records that failed to parse (written before their batch is
//! sent), and records Redis refused. Either way a record is on disk, fsynced, before the
//! file's mark may move past it.

use tracing::error;

use super::conn::Backoff;
use super::Publisher;
use crate::record::{DeadClass, DeadRecord, FileInfo, Parsed};
use crate::stats::{add, STATS};

impl Publisher {
    pub(super) fn write_dead(
        &mut self,
        file: &FileInfo,
        recs: &[DeadRecord],
    ) -> std::io::Result<()> {
        let source = &self.source_names[file.source];
        let parser = &self.parser_names[file.source];
        for r in recs {
            let e = self.dlq.entry(source, parser, file, r, 1);
            self.dlq.append(&e)?;
        }
        Ok(())
    }

    /// Writes and fsyncs `recs`, retrying until it works: the mark must not move past them
    /// before. Returns false when `abort` fired first.
    pub(super) async fn write_dead_durably(
        &mut self,
        file: &FileInfo,
        recs: &[DeadRecord],
        abort: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        if recs.is_empty() {
            return true;
        }
        let mut backoff = Backoff::new(self.retry_max_backoff);
        loop {
            match self.write_dead(file, recs).and_then(|_| self.dlq.sync()) {
                Ok(()) => return true,
                Err(e) => {
                    let d = backoff.next_delay();
                    error!(error = %e, path = %file.path, records = recs.len(), retry_in = ?d, "cannot write the dead-letter file; holding this file's records until it works");
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = abort.changed() => return false,
                    }
                }
            }
        }
    }

    /// Dead letters of a group, fsynced before the group's transactions are sent.
    pub(super) async fn write_group_dead(
        &mut self,
        group: &mut [Parsed],
        abort: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        for p in group.iter_mut() {
            if p.dead.is_empty() {
                continue;
            }
            let dead = std::mem::take(&mut p.dead);
            let file = p.file.clone();
            if !self.write_dead_durably(&file, &dead, abort).await {
                return false;
            }
        }
        true
    }

    /// Records of a batch that Redis refused, as dead records (`entries`: indexes into the
    /// batch's XADDs; None: all of them).
    pub(super) fn refused(p: &Parsed, entries: Option<&[usize]>, why: &str) -> Vec<DeadRecord> {
        let all: Vec<usize>;
        let idx = match entries {
            Some(i) => i,
            None => {
                all = (0..p.xadds.len()).collect();
                &all
            }
        };
        idx.iter()
            .filter_map(|&k| {
                Some(rejected_record(
                    p.xadds.get(k)?,
                    *p.offsets.get(k)?,
                    why.to_string(),
                ))
            })
            .collect()
    }

    /// Entries refused inside an EXEC that applied (the key changed type between the check and
    /// the EXEC): the rest of the transaction, mark included, applied, so these are written
    /// after it — the one window where a crash can lose a record; logged and counted if the
    /// write fails.
    pub(super) fn dead_after_exec(&mut self, p: &Parsed, recs: Vec<DeadRecord>) {
        error!(path = %p.file.path, entries = recs.len(), "Redis rejected entries inside an applied transaction; they go to the dead-letter file");
        if let Err(e) = self
            .write_dead(&p.file, &recs)
            .and_then(|_| self.dlq.sync())
        {
            error!(error = %e, path = %p.file.path, records = recs.len(), "cannot write rejected records to the dead-letter file; they are lost");
            add(&STATS.lost_bytes, recs.iter().map(|r| r.length).sum());
        }
    }
}

/// The field/value arguments of an XADD (after the `*` id).
pub fn xadd_pairs(cmd: &redis::Cmd) -> Vec<&[u8]> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(b) => Some(b),
            _ => None,
        })
        .collect();
    match args.iter().position(|a| *a == b"*") {
        Some(i) => args[i + 1..].to_vec(),
        None => Vec::new(),
    }
}

fn rejected_record(cmd: &redis::Cmd, offset: u64, error: String) -> DeadRecord {
    let pairs = xadd_pairs(cmd);
    let message = pairs
        .chunks(2)
        .find(|kv| kv[0] == b"message")
        .and_then(|kv| kv.get(1))
        .map(|v| v.to_vec())
        .unwrap_or_default();
    DeadRecord {
        offset,
        length: message.len() as u64,
        class: DeadClass::Rejected,
        error,
        bytes: message,
    }
}
