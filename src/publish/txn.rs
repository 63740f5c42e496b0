//! Building guarded transactions into a pipeline, and reading their replies back.
//! The shape of a transaction and why it is safe are in `protocol.rs`.

use std::collections::HashMap;

use redis::Value;

use super::protocol::{self, expected_arg, fmt_mark, Mark, Reply, Span, GUARD_SCRIPT};
use crate::record::Parsed;

/// The keys of one source's stream.
pub struct Keys {
    pub stream: String,
    /// This agent's marks hash (`config::host_marks_key`).
    pub marks: String,
    pub guard: String,
    /// Where marks written before per-host marks existed are (`config::marks_key`).
    pub legacy_marks: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnState {
    Pending,
    Done,
}

/// The batches of one file in one pipeline: one guarded MULTI/EXEC.
pub struct Txn {
    pub batches: Vec<usize>,
    pub state: TxnState,
    /// The mark the last attempt was built on, and the one it sets.
    pub expect: Option<Mark>,
    pub new: Mark,
    /// Entries the last attempt carried (a prefix when `cap` split it).
    pub sent: usize,
    /// At most this many entries per attempt: halved after an out-of-memory refusal.
    pub cap: usize,
    /// The records went to the dead-letter file (the stream key has another type): the
    /// transaction moves the mark only.
    pub dead: bool,
    /// Confirmed not applied, and a later transaction of the file applied without its check
    /// (see `TxnReply::Unchecked`): its entries are sent anyway, after the later ones.
    pub overtaken: bool,
    /// The last attempt's reply said: not applied (mismatch, refusal, wrong type).
    pub not_applied: bool,
    /// The last attempt applied although its check did not run.
    pub unchecked: bool,
}

impl Txn {
    pub fn span(&self, group: &[Parsed]) -> Span {
        let first = &group[self.batches[0]];
        let last = &group[*self.batches.last().unwrap()];
        Span {
            first: (first.file.generation, first.start),
            last: (last.file.generation, last.end),
            expect_mark: first.expect_mark,
        }
    }
    pub fn entries(&self, group: &[Parsed]) -> usize {
        self.batches.iter().map(|&b| group[b].offsets.len()).sum()
    }
}

/// Groups a pipeline's batches into one transaction per file, in order.
pub fn txns_of(group: &[Parsed]) -> Vec<Txn> {
    let mut txns: Vec<Txn> = Vec::new();
    let mut by_file: HashMap<(usize, &str), usize> = HashMap::new();
    for (i, p) in group.iter().enumerate() {
        let t = *by_file
            .entry((p.file.source, p.file.mark_field.as_str()))
            .or_insert_with(|| {
                txns.push(Txn {
                    batches: Vec::new(),
                    state: TxnState::Pending,
                    expect: None,
                    new: (0, 0),
                    sent: 0,
                    cap: usize::MAX,
                    dead: false,
                    overtaken: false,
                    not_applied: false,
                    unchecked: false,
                });
                txns.len() - 1
            });
        txns[t].batches.push(i);
    }
    txns
}

/// Drops the entries Redis already holds (below `m`); returns how many.
pub fn drop_below(group: &mut [Parsed], txn: &Txn, m: Mark) -> usize {
    let mut dropped = 0;
    for &b in &txn.batches {
        let p = &mut group[b];
        let g = p.file.generation;
        let keep: Vec<bool> = p.offsets.iter().map(|&o| (g, o) >= m).collect();
        let before = p.offsets.len();
        let mut it = keep.iter();
        p.offsets.retain(|_| *it.next().unwrap());
        if !p.xadds.is_empty() {
            let mut it = keep.iter();
            p.xadds.retain(|_| *it.next().unwrap());
        }
        dropped += before - p.offsets.len();
    }
    dropped
}

/// Sets `txn.expect`, `txn.new` and `txn.sent` for an attempt built on `expect`: all its
/// entries, or the first `cap` of them (the mark then ends at the next entry's offset).
pub fn prepare(group: &[Parsed], txn: &mut Txn, expect: Option<Mark>) {
    let last = &group[*txn.batches.last().unwrap()];
    let total = if txn.dead { 0 } else { txn.entries(group) };
    txn.expect = expect;
    if txn.overtaken {
        // Sent out of order below a mark that is already past it: the mark stays.
        txn.new = expect.unwrap_or((last.file.generation, last.end));
        txn.sent = total;
        return;
    }
    txn.new = (last.file.generation, last.end);
    txn.sent = total;
    if total > txn.cap {
        let mut k = txn.cap;
        for &b in &txn.batches {
            let p = &group[b];
            if k < p.offsets.len() {
                txn.new = (p.file.generation, p.offsets[k]);
                break;
            }
            k -= p.offsets.len();
        }
        txn.sent = txn.cap;
    }
}

/// One guarded transaction per `pending` txn (already `prepare`d). The fast path (`take`)
/// moves the XADDs out of `group` (no copy; [`restore`] puts them back if something failed);
/// the careful path copies them, since it may need them again.
pub fn pipe_of(
    keys: &[Keys],
    group: &mut [Parsed],
    txns: &[Txn],
    pending: &[usize],
    take: bool,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for &t in pending {
        let txn = &txns[t];
        let file = group[txn.batches[0]].file.clone();
        let k = &keys[file.source];
        pipe.cmd("WATCH").arg(&k.guard).arg(&k.marks);
        pipe.cmd("EVAL")
            .arg(GUARD_SCRIPT)
            .arg(3)
            .arg(&k.marks)
            .arg(&k.guard)
            .arg(&k.stream)
            .arg(&file.mark_field)
            .arg(expected_arg(txn.expect))
            .arg(if txn.sent > 0 { "1" } else { "0" });
        pipe.cmd("MULTI");
        let mut left = txn.sent;
        for &b in &txn.batches {
            let n = left.min(group[b].offsets.len());
            left -= n;
            if take {
                for c in std::mem::take(&mut group[b].xadds) {
                    pipe.add_command(c).ignore();
                }
            } else {
                // The careful path keeps the QUEUED replies: a refusal's cause is there
                // (EXECABORT itself does not say it).
                for c in &group[b].xadds[..n] {
                    pipe.add_command(c.clone());
                }
            }
        }
        pipe.cmd("HSET")
            .arg(&k.marks)
            .arg(&file.mark_field)
            .arg(fmt_mark(txn.new));
        if take {
            pipe.ignore();
        }
        pipe.cmd("EXEC");
    }
    pipe
}

/// Puts the XADDs `pipe_of(.., take)` moved out back into `group` (copies; failure path only).
pub fn restore(
    group: &mut [Parsed],
    txns: &[Txn],
    pending: &[usize],
    pipe: Option<&redis::Pipeline>,
) {
    let Some(pipe) = pipe else { return };
    let mut cmds = pipe.cmd_iter();
    for t in pending.iter().map(|&t| &txns[t]) {
        cmds.nth(2); // WATCH, EVAL, MULTI
        for &b in &t.batches {
            let n = group[b].offsets.len();
            group[b].xadds = cmds.by_ref().take(n).cloned().collect();
        }
        cmds.nth(1); // HSET, EXEC
    }
}

/// A reply value, reduced.
pub fn reply(v: &Value) -> Reply {
    match v {
        Value::Okay | Value::SimpleString(_) => Reply::Ok,
        Value::Int(i) => Reply::Int(*i),
        Value::Nil => Reply::Nil,
        Value::Array(items) => Reply::Items {
            errors: items
                .iter()
                .enumerate()
                .filter_map(|(i, x)| match x {
                    Value::ServerError(se) => Some((i, server_error_text(se))),
                    _ => None,
                })
                .collect(),
            len: items.len(),
        },
        Value::ServerError(se) => Reply::Error {
            code: se.code().to_string(),
            text: se.details().unwrap_or("").to_string(),
        },
        other => Reply::Error {
            code: "UNEXPECTED".into(),
            text: format!("{other:?}"),
        },
    }
}

pub fn server_error_text(se: &redis::ServerError) -> String {
    match se.details() {
        Some(d) => format!("{} {d}", se.code()),
        None => se.code().to_string(),
    }
}

/// The replies of one transaction: WATCH, EVAL, MULTI, EXEC, and the first error among the
/// queued commands' replies (kept on the careful path only).
pub struct TxnReplies {
    pub head: [Reply; 4],
    pub queued_error: Option<Reply>,
}

/// The replies of each pending transaction, in order. None when the count is off (treated
/// as an uncertain outcome). `careful`: the queued commands' replies are there too.
pub fn split_replies(
    values: Vec<Value>,
    txns: &[Txn],
    pending: &[usize],
    careful: bool,
) -> Option<Vec<TxnReplies>> {
    let sizes: Vec<usize> = pending
        .iter()
        .map(|&t| if careful { 5 + txns[t].sent } else { 4 })
        .collect();
    if values.len() != sizes.iter().sum::<usize>() {
        return None;
    }
    let mut out = Vec::with_capacity(pending.len());
    let mut i = 0;
    for n in sizes {
        let c = &values[i..i + n];
        i += n;
        let queued = &c[3..n - 1];
        out.push(TxnReplies {
            head: [reply(&c[0]), reply(&c[1]), reply(&c[2]), reply(&c[n - 1])],
            queued_error: queued
                .iter()
                .find(|v| matches!(v, Value::ServerError(_)))
                .map(reply),
        });
    }
    Some(out)
}

/// Classifies one transaction's replies.
pub fn classify(r: &TxnReplies) -> Result<protocol::TxnReply, String> {
    let h = &r.head;
    protocol::classify(&h[0], &h[1], &h[2], &h[3], r.queued_error.as_ref())
}
