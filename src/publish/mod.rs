//! The publisher: puts parsed batches back in file order, writes dead letters, and applies
//! them to Redis as guarded transactions (`protocol.rs` states the invariants;
//! docs/exactly-once.md has the failure table).
//!
//! All ready batches go out in one pipeline; within it, each file's batches form one
//! transaction built on the file's known mark. Two pipelines may be in flight. Batches grow
//! under load by themselves: the next pipeline leaves as soon as a slot is free, with
//! whatever is ready.
//!
//! Nothing is read back on the happy path. A file seen for the first time, any failure, and
//! every reconnect go through the careful path ([`Publisher::finish`]): one pipeline at a
//! time, the marks read first, the transaction rebuilt on what Redis holds.

mod conn;
mod dead;
#[cfg(test)]
mod model_tests;
pub mod protocol;
mod txn;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, Value};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

pub use conn::{is_transient, Backoff};
pub use dead::xadd_pairs;

use crate::config::{host_marks_key, marks_key, Config};
use crate::deadletter;
use crate::record::{FileInfo, Parsed};
use crate::stats::{add, STATS};
use conn::{is_connection_error, ConnectError};
use protocol::{check_known, parse_mark, plan, Chain, Gap, TxnReply};
use txn::{drop_below, pipe_of, prepare, restore, split_replies, txns_of, Keys, Txn, TxnState};

/// An acknowledged batch: the checkpoint may move to `end`.
#[derive(Debug, Clone)]
pub struct Ack {
    pub file: Arc<FileInfo>,
    pub end: u64,
    pub read_bytes: u64,
    pub lines: u32,
}

/// Publisher settings and state.
pub struct Publisher {
    client: redis::Client,
    conn_cfg: AsyncConnectionConfig,
    max_entries: usize,
    max_bytes: usize,
    retry_max_backoff: Duration,
    retry_limit: u32,
    wait_replicas: u32,
    wait_timeout: Duration,
    dlq: deadletter::Writer,
    source_names: Vec<String>,
    parser_names: Vec<String>,
    keys: Vec<Keys>,
    conn: Option<MultiplexedConnection>,
    connected_once: bool,
    /// A reconnect happened: check every known mark before the next transaction.
    recheck: bool,
    chain: Chain,
    /// Paths by (source, mark field), for reports about files not in the current group.
    paths: std::collections::HashMap<(usize, String), String>,
    gaps_reported: HashSet<(String, Gap)>,
    /// Mismatches in a row (reset by an applied transaction): past a few, the careful path
    /// pauses between rounds instead of spinning against another writer of the marks.
    mismatches: u32,
}

/// What a pipeline's replies leave to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Every transaction is done.
    Clean,
    /// Some must be sent again, after reading marks; `pause` first when Redis refused
    /// something transiently or the connection failed.
    Again { pause: bool },
}

/// A pipeline sent, its reply not yet read.
struct Flight {
    group: Vec<Parsed>,
    txns: Vec<Txn>,
    /// The transactions it carries.
    pending: Vec<usize>,
    /// None: nothing had to be sent.
    reply: Option<tokio::task::JoinHandle<Sent>>,
    /// Set once the replies were taken.
    next: Option<Next>,
}

type Sent = (redis::Pipeline, Result<Vec<Value>, RedisError>);

impl Publisher {
    pub fn new(cfg: &Config) -> anyhow::Result<Publisher> {
        let client = redis::Client::open(cfg.redis.url.as_str())
            .map_err(|e| anyhow::anyhow!("redis.url {:?}: {e}", cfg.redis.url))?;
        let conn_cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.redis.connect_timeout))
            .set_response_timeout(Some(cfg.redis.response_timeout));
        Ok(Publisher {
            client,
            conn_cfg,
            max_entries: cfg.redis.batch_max_entries,
            max_bytes: cfg.redis.batch_max_bytes,
            retry_max_backoff: cfg.redis.retry_max_backoff,
            retry_limit: cfg.redis.retry_limit,
            wait_replicas: cfg.redis.wait_replicas,
            wait_timeout: cfg.redis.wait_timeout,
            dlq: deadletter::Writer::new(
                &cfg.agent.dead_letter,
                cfg.agent.dead_letter_max_bytes,
                cfg.agent.dead_letter_keep,
                &cfg.agent.host_name,
            ),
            source_names: cfg.sources.iter().map(|s| s.name.clone()).collect(),
            parser_names: cfg
                .sources
                .iter()
                .map(|s| s.parser.name().to_string())
                .collect(),
            keys: cfg
                .sources
                .iter()
                .map(|s| {
                    let marks = host_marks_key(&s.stream, &cfg.agent.host_name);
                    Keys {
                        stream: s.stream.clone(),
                        guard: protocol::guard_key(&marks),
                        marks,
                        legacy_marks: marks_key(&s.stream),
                    }
                })
                .collect(),
            conn: None,
            connected_once: false,
            recheck: false,
            chain: Chain::default(),
            paths: Default::default(),
            gaps_reported: HashSet::new(),
            mismatches: 0,
        })
    }

    /// The connection, opened (and probed) if there is none. `Err` (outer): Redis refuses
    /// what the protocol needs; the agent stops.
    async fn conn(&mut self) -> anyhow::Result<Result<MultiplexedConnection, RedisError>> {
        if let Some(c) = &self.conn {
            return Ok(Ok(c.clone()));
        }
        match conn::connect(&self.client, &self.conn_cfg, &self.keys).await {
            Ok(c) => {
                if self.connected_once {
                    // Whatever happened while the connection was down (a Redis restart
                    // without persistence, a failover) shows in the marks.
                    self.recheck = true;
                    info!("reconnected to Redis; checking the marks of every file before sending");
                }
                self.connected_once = true;
                self.conn = Some(c.clone());
                Ok(Ok(c))
            }
            Err(ConnectError::Transient(e)) => Ok(Err(e)),
            Err(ConnectError::Permanent(m)) => Err(anyhow::anyhow!("{m}")),
        }
    }

    /// Runs until `rx` is closed and everything received is published (or `abort` fires).
    /// Sends one ack per batch, in order, to `acks`.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Parsed>,
        acks: crossbeam_channel::Sender<Ack>,
        mut abort: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut reorder: BTreeMap<u64, Parsed> = BTreeMap::new();
        let mut next_seq = 0u64;
        let mut closed = false;
        let mut flights: VecDeque<Flight> = VecDeque::new();
        loop {
            // Whatever is queued already joins the next pipeline.
            while let Ok(p) = rx.try_recv() {
                reorder.insert(p.seq, p);
            }
            if flights.len() < 2 && reorder.contains_key(&next_seq) {
                let mut group = Vec::new();
                let (mut entries, mut bytes) = (0usize, 0usize);
                while let Some(p) = reorder.remove(&next_seq) {
                    entries += p.xadds.len();
                    bytes += p.wire_bytes;
                    next_seq += 1;
                    group.push(p);
                    if entries >= self.max_entries || bytes >= self.max_bytes {
                        break;
                    }
                }
                if !self.write_group_dead(&mut group, &mut abort).await {
                    return Ok(());
                }
                let mut txns = txns_of(&group);
                let fast = !self.recheck
                    && self.conn.is_some()
                    && txns.iter().all(|t| {
                        let f = &group[t.batches[0]].file;
                        self.chain.knows(f.source, &f.mark_field)
                    });
                if !fast {
                    // First sight of a file, or no connection: land what is in flight, then
                    // this group on the careful path.
                    flights.push_back(Flight {
                        group,
                        txns,
                        pending: Vec::new(),
                        reply: None,
                        next: Some(Next::Again { pause: false }),
                    });
                    if !self.settle(&mut flights, &acks, &mut abort).await? {
                        return Ok(());
                    }
                    continue;
                }
                let pending = self.build_fast(&mut group, &mut txns);
                let reply = if pending.is_empty() {
                    None
                } else {
                    let mut c = self.conn.clone().expect("fast path has a connection");
                    let pipe = pipe_of(&self.keys, &mut group, &txns, &pending, true);
                    Some(tokio::spawn(async move {
                        let r = pipe.query_async::<Vec<Value>>(&mut c).await;
                        (pipe, r)
                    }))
                };
                flights.push_back(Flight {
                    group,
                    txns,
                    pending,
                    reply,
                    next: None,
                });
                continue;
            }
            if flights.is_empty() {
                if closed {
                    if !reorder.is_empty() {
                        anyhow::bail!("internal error: batches {next_seq}.. missing");
                    }
                    return Ok(());
                }
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(p) => { reorder.insert(p.seq, p); }
                        None => closed = true,
                    },
                    _ = abort.changed() => return Ok(()),
                }
                continue;
            }
            // Wait for the oldest pipeline, or for input that could fill the free slot.
            let can_take = flights.len() < 2 && !closed;
            let front = flights.front_mut().unwrap();
            tokio::select! {
                r = landed(front) => {
                    let r = r?;
                    let mut f = flights.pop_front().unwrap();
                    let next = self.take_replies(&mut f.group, &mut f.txns, &f.pending, r, false, &mut abort).await?;
                    if next == Next::Clean {
                        self.wait_replicas_if_asked().await;
                        ack(&acks, f.group);
                        continue;
                    }
                    // Something failed: the pipeline behind may hold later parts of the same
                    // files (they abort by themselves, I2). Let everything land, then finish
                    // each group in order.
                    f.next = Some(next);
                    flights.push_front(f);
                    if !self.settle(&mut flights, &acks, &mut abort).await? {
                        return Ok(());
                    }
                }
                m = rx.recv(), if can_take => match m {
                    Some(p) => { reorder.insert(p.seq, p); }
                    None => closed = true,
                },
                _ = abort.changed() => return Ok(()),
            }
        }
    }

    /// Builds the fast path's transactions on the chain's tips, and moves the tips on as if
    /// they applied. Returns the transactions to send.
    fn build_fast(&mut self, group: &mut [Parsed], txns: &mut [Txn]) -> Vec<usize> {
        let mut pending = Vec::new();
        for (i, t) in txns.iter_mut().enumerate() {
            let f = group[t.batches[0]].file.clone();
            let tip = self.chain.tip(f.source, &f.mark_field).flatten();
            let p = plan(t.span(group), tip);
            if p.all_there {
                add(&STATS.entries_skipped, t.entries(group) as u64);
                t.state = TxnState::Done;
                continue;
            }
            if let Some(m) = p.drop_below {
                add(&STATS.entries_skipped, drop_below(group, t, m) as u64);
            }
            prepare(group, t, tip);
            self.chain.set(f.source, &f.mark_field, Some(t.new));
            pending.push(i);
        }
        pending
    }

    /// Lands every flight, then finishes each group in order on the careful path and acks
    /// it. Returns false when `abort` fired.
    async fn settle(
        &mut self,
        flights: &mut VecDeque<Flight>,
        acks: &crossbeam_channel::Sender<Ack>,
        abort: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<bool> {
        let mut all: Vec<Flight> = flights.drain(..).collect();
        for f in all.iter_mut().filter(|f| f.next.is_none()) {
            let r = landed(f).await?;
            f.next = Some(
                self.take_replies(&mut f.group, &mut f.txns, &f.pending, r, false, abort)
                    .await?,
            );
        }
        mark_overtaken(&mut all);
        for mut f in all {
            if f.next != Some(Next::Clean) {
                let pause = f.next == Some(Next::Again { pause: true });
                if !self.finish(&mut f.group, &mut f.txns, pause, abort).await? {
                    return Ok(false);
                }
            }
            self.wait_replicas_if_asked().await;
            ack(acks, f.group);
        }
        Ok(true)
    }

    /// Reads the replies of `pending` transactions: sets their states, counts, writes what
    /// Redis refused to the dead-letter file, and forgets the tip of every file whose
    /// transaction did not confirm (I3). `careful`: the tips are set from the replies (one
    /// pipeline at a time); on the fast path they were moved on when the pipeline was built.
    async fn take_replies(
        &mut self,
        group: &mut [Parsed],
        txns: &mut [Txn],
        pending: &[usize],
        (pipe, result): (Option<redis::Pipeline>, Result<Vec<Value>, RedisError>),
        careful: bool,
        abort: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<Next> {
        let replies = match result.map(|v| split_replies(v, txns, pending, careful)) {
            Ok(Some(r)) => r,
            other => {
                restore(group, txns, pending, pipe.as_ref());
                let e = match other {
                    Err(e) => e,
                    _ => RedisError::from((redis::ErrorKind::Client, "unexpected reply count")),
                };
                add(&STATS.redis_retries, 1);
                warn!(error = %e, "Redis call failed; reading the marks before sending again (nothing is lost)");
                self.drop_conn();
                for &t in pending {
                    let f = &group[txns[t].batches[0]].file;
                    self.chain.forget(f.source, &f.mark_field);
                }
                return Ok(Next::Again { pause: true });
            }
        };
        let clean_so_far = replies.iter().all(|r| {
            matches!(txn::classify(r), Ok(TxnReply::Applied))
                && matches!(&r.head[3], protocol::Reply::Items { errors, .. } if errors.is_empty())
        });
        if !clean_so_far {
            restore(group, txns, pending, pipe.as_ref());
        }
        drop(pipe);
        let mut next = Next::Clean;
        for (r, &t) in replies.iter().zip(pending) {
            let file = group[txns[t].batches[0]].file.clone();
            let (first, last) = {
                let s = txns[t].span(group);
                (s.first, s.last)
            };
            match txn::classify(r) {
                Ok(outcome @ (TxnReply::Applied | TxnReply::Unchecked(_))) => {
                    let protocol::Reply::Items { errors, len } = &r.head[3] else {
                        unreachable!("classify: applied means an array");
                    };
                    let sent = txns[t].sent;
                    if *len != sent + 1 {
                        error!(path = %file.path, expected = sent + 1, got = len, "EXEC returned an unexpected number of replies");
                    }
                    if let Some((_, e)) = errors.iter().find(|(i, _)| *i == sent) {
                        anyhow::bail!("the marks key {:?} is not usable ({e}): entries of {} up to byte {} (generation {}) are in the stream but its mark could not be written. Restore it as a hash with the field {:?} set to \"{}:{}\", then start again (deleting it instead makes files resume at their checkpoints and may send lines twice)", self.keys[file.source].marks, file.path, last.1, last.0, file.mark_field, last.0, last.1);
                    }
                    self.dead_refused_items(group, &txns[t], errors);
                    add(
                        &STATS.entries_published,
                        (sent - errors.len().min(sent)) as u64,
                    );
                    if let TxnReply::Unchecked(why) = &outcome {
                        error!(path = %file.path, error = %why, "a transaction applied although its mark check did not run; reading the mark before the next one");
                        self.chain.forget(file.source, &file.mark_field);
                        txns[t].unchecked = true;
                        txns[t].overtaken = false;
                        txns[t].state = TxnState::Done;
                        next = Next::Again { pause: false };
                        continue;
                    }
                    self.mismatches = 0;
                    self.chain
                        .confirm(file.source, &file.mark_field, Some(txns[t].new));
                    if careful {
                        self.chain
                            .set(file.source, &file.mark_field, Some(txns[t].new));
                    }
                    if sent < txns[t].entries(group) && !txns[t].dead && !txns[t].overtaken {
                        // A prefix (split after an out-of-memory refusal): the rest next.
                        txns[t].cap = txns[t].cap.saturating_mul(2);
                        if next == Next::Clean {
                            next = Next::Again { pause: false };
                        }
                    } else {
                        txns[t].state = TxnState::Done;
                    }
                }
                Ok(TxnReply::Mismatch) => {
                    txns[t].not_applied = true;
                    self.mismatches += 1;
                    if self.mismatches == 4 {
                        warn!(path = %file.path, marks = %self.keys[file.source].marks, "the file's mark keeps differing from what was just read: is another process writing this agent's marks hash or guard key? Retrying with pauses");
                    }
                    // The mark is not where this transaction was built: an earlier part
                    // failed, or Redis lost data. Read it and build again.
                    self.chain.forget(file.source, &file.mark_field);
                    if next == Next::Clean {
                        next = Next::Again { pause: false };
                    }
                }
                Ok(TxnReply::WrongType) => {
                    // Nothing applied; the mark is the expected one. The records go to the
                    // dead-letter file first, then a mark-only transaction moves the mark.
                    let stream = &self.keys[file.source].stream;
                    let why = format!("Redis rejected the entry: the key {stream:?} holds another type than a stream (WRONGTYPE)");
                    error!(path = %file.path, stream = %stream, from = first.1, to = last.1, "the stream key holds another type; these records go to the dead-letter file");
                    for &b in &txns[t].batches {
                        let recs = Self::refused(&group[b], None, &why);
                        let f = group[b].file.clone();
                        if !self.write_dead_durably(&f, &recs, abort).await {
                            return Ok(Next::Again { pause: false });
                        }
                    }
                    txns[t].dead = true;
                    txns[t].not_applied = true;
                    self.chain.forget(file.source, &file.mark_field);
                    if next == Next::Clean {
                        next = Next::Again { pause: false };
                    }
                }
                Ok(TxnReply::Refused { oom, error: e }) => {
                    txns[t].not_applied = true;
                    add(&STATS.redis_retries, 1);
                    if oom {
                        txns[t].cap = (txns[t].sent / 2).max(1);
                    }
                    warn!(path = %file.path, error = %e, entries = txns[t].sent, "Redis refused a transaction (nothing of it applied); sending it again after a pause{}", if oom { ", in smaller parts" } else { "" });
                    self.chain.forget(file.source, &file.mark_field);
                    next = Next::Again { pause: true };
                }
                Ok(TxnReply::Permanent(e)) => {
                    anyhow::bail!("Redis refused the transaction for {} (bytes {}..{} of generation {}) for good: {e}. Nothing of it was applied; fix the cause (ACL, renamed commands, Redis version) and start again — publishing resumes there, nothing is lost", file.path, first.1, last.1, first.0);
                }
                Err(framing) => {
                    txns[t].not_applied = false;
                    error!(path = %file.path, error = %framing, from = first.1, to = last.1, "a transaction's framing failed; reconnecting and reading the mark (what it applied is found there)");
                    self.drop_conn();
                    self.chain.forget(file.source, &file.mark_field);
                    next = Next::Again { pause: true };
                }
            }
        }
        Ok(next)
    }

    /// Entries refused inside an EXEC that applied go to the dead-letter file.
    fn dead_refused_items(&mut self, group: &[Parsed], t: &Txn, errors: &[(usize, String)]) {
        if errors.is_empty() {
            return;
        }
        let mut base = 0usize;
        for &b in &t.batches {
            let n = group[b].offsets.len().min(t.sent.saturating_sub(base));
            let mine: Vec<(usize, &String)> = errors
                .iter()
                .filter(|(i, _)| *i >= base && *i < base + n)
                .map(|(i, e)| (i - base, e))
                .collect();
            base += n;
            if mine.is_empty() {
                continue;
            }
            let mut recs = Vec::new();
            for (k, e) in mine {
                recs.extend(Self::refused(
                    &group[b],
                    Some(&[k]),
                    &format!("Redis rejected the entry: {e}"),
                ));
            }
            self.dead_after_exec(&group[b], recs);
        }
    }

    /// The careful path: sends what is still pending, one pipeline at a time, each
    /// transaction built on the mark read from Redis; transient failures are retried until
    /// they pass (or `redis.retry_limit`). Returns false when `abort` fired.
    async fn finish(
        &mut self,
        group: &mut [Parsed],
        txns: &mut [Txn],
        mut pause: bool,
        abort: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<bool> {
        let mut backoff = Backoff::new(self.retry_max_backoff);
        let mut last_err: Option<String> = None;
        loop {
            if pause {
                let why = last_err
                    .take()
                    .unwrap_or_else(|| "Redis refused or failed a call".into());
                if !self.transient_pause(&mut backoff, &why, abort).await? {
                    return Ok(false);
                }
            }
            pause = true;
            let pending: Vec<usize> = (0..txns.len())
                .filter(|&t| txns[t].state == TxnState::Pending)
                .collect();
            if pending.is_empty() {
                break;
            }
            let mut c = match self.conn().await? {
                Ok(c) => c,
                Err(e) => {
                    last_err = Some(e.to_string());
                    continue;
                }
            };
            if self.recheck {
                if let Err(e) = self.recheck_known(&mut c).await {
                    self.fail_conn(&e);
                    last_err = Some(e.to_string());
                    continue;
                }
                self.recheck = false;
            }
            // Read the marks the chain does not know.
            let unknown: Vec<usize> = pending
                .iter()
                .copied()
                .filter(|&t| {
                    let f = &group[txns[t].batches[0]].file;
                    !self.chain.knows(f.source, &f.mark_field)
                })
                .collect();
            let mut read_now = HashSet::new();
            if !unknown.is_empty() {
                let files: Vec<Arc<FileInfo>> = unknown
                    .iter()
                    .map(|&t| group[txns[t].batches[0]].file.clone())
                    .collect();
                match self.read_marks(&mut c, &files).await? {
                    Ok(marks) => {
                        for (f, m) in files.iter().zip(marks) {
                            self.chain.set(f.source, &f.mark_field, m);
                            self.chain.confirm(f.source, &f.mark_field, m);
                            read_now.insert((f.source, f.mark_field.clone()));
                        }
                    }
                    Err(e) => {
                        self.fail_conn(&e);
                        last_err = Some(e.to_string());
                        continue;
                    }
                }
            }
            let mut send = Vec::new();
            for &t in &pending {
                let f = group[txns[t].batches[0]].file.clone();
                self.paths
                    .entry((f.source, f.mark_field.clone()))
                    .or_insert_with(|| f.path.clone());
                let tip = self.chain.tip(f.source, &f.mark_field).flatten();
                if txns[t].overtaken {
                    let n = txns[t].entries(group);
                    add(&STATS.out_of_order, n as u64);
                    error!(path = %f.path, entries = n, "a refused transaction was overtaken by a later one that applied without its check; sending its entries now, out of order (none lost, none twice)");
                    prepare(group, &mut txns[t], tip);
                    send.push(t);
                    continue;
                }
                let p = plan(txns[t].span(group), tip);
                if let Some(gap) = p
                    .gap
                    .filter(|_| read_now.contains(&(f.source, f.mark_field.clone())))
                {
                    self.report_gap(&f.path, &f.mark_field, gap);
                }
                if p.all_there {
                    let n = txns[t].entries(group);
                    if n > 0 && !txns[t].dead {
                        add(&STATS.entries_skipped, n as u64);
                        info!(path = %f.path, entries = n, "entries already in Redis; not sent again");
                    }
                    txns[t].state = TxnState::Done;
                    continue;
                }
                if let Some(m) = p.drop_below {
                    let n = drop_below(group, &txns[t], m);
                    if n > 0 {
                        add(&STATS.entries_skipped, n as u64);
                        info!(path = %f.path, entries = n, "entries already in Redis; not sent again");
                    }
                }
                prepare(group, &mut txns[t], tip);
                send.push(t);
            }
            if send.is_empty() {
                break;
            }
            let pipe = pipe_of(&self.keys, group, txns, &send, false);
            let r = pipe.query_async::<Vec<Value>>(&mut c).await;
            drop(pipe);
            if let Err(e) = &r {
                last_err = Some(e.to_string());
            }
            match self
                .take_replies(group, txns, &send, (None, r), true, abort)
                .await?
            {
                Next::Clean => break,
                Next::Again { pause: p } => {
                    pause = p || self.mismatches > 3;
                    if p && last_err.is_none() {
                        last_err = Some("Redis refused a transaction".into());
                    }
                }
            }
            if abort.has_changed().unwrap_or(true) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// HGETs of the marks of `files`, pipelined. A file without a mark in this agent's hash
    /// adopts one written before marks were per host (copied over with HSETNX, once). Err
    /// (outer): the marks cannot be used (another type, a malformed value): the agent stops.
    async fn read_marks(
        &mut self,
        c: &mut MultiplexedConnection,
        files: &[Arc<FileInfo>],
    ) -> anyhow::Result<Result<Vec<Option<protocol::Mark>>, RedisError>> {
        let mut pipe = redis::pipe();
        for f in files {
            let k = &self.keys[f.source];
            pipe.cmd("HGET").arg(&k.marks).arg(&f.mark_field);
            pipe.cmd("HGET").arg(&k.legacy_marks).arg(&f.mark_field);
        }
        let v: Vec<Option<String>> = match pipe.query_async(c).await {
            Ok(v) => v,
            Err(e) if is_transient(&e) => return Ok(Err(e)),
            Err(e) => anyhow::bail!(
                "cannot read the high-water marks ({}): {e}. The marks hashes must be hashes; move the key away (RENAME) and start again (files then resume at their checkpoints, which may send up to agent.commit_interval of lines again)",
                files
                    .iter()
                    .map(|f| self.keys[f.source].marks.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let mut out = Vec::with_capacity(files.len());
        let mut adopt = redis::pipe();
        for (f, pair) in files.iter().zip(v.chunks(2)) {
            let k = &self.keys[f.source];
            let (raw, from) = match (&pair[0], &pair[1]) {
                (Some(m), _) => (Some(m.clone()), &k.marks),
                (None, Some(l)) => {
                    adopt
                        .cmd("HSETNX")
                        .arg(&k.marks)
                        .arg(&f.mark_field)
                        .arg(l)
                        .ignore();
                    (Some(l.clone()), &k.legacy_marks)
                }
                (None, None) => (None, &k.marks),
            };
            match raw {
                None => out.push(None),
                Some(r) => match parse_mark(&r) {
                    Some(m) => out.push(Some(m)),
                    None => anyhow::bail!(
                        "the high-water mark of {} (field {:?} of {from}) is {r:?}, not \"<generation>:<offset>\": something else wrote it. Fix or delete that field, then start again",
                        f.path,
                        f.mark_field
                    ),
                },
            }
        }
        if !adopt.is_empty() {
            if let Err(e) = adopt.query_async::<()>(c).await {
                return Ok(Err(e));
            }
            info!(
                files = adopt.cmd_iter().count(),
                "adopted high-water marks written before marks were per host"
            );
        }
        Ok(Ok(out))
    }

    /// After a reconnect: reads the mark of every file the publisher has published to
    /// (pipelined, in chunks) and reports each one that Redis lost.
    async fn recheck_known(&mut self, c: &mut MultiplexedConnection) -> Result<(), RedisError> {
        let known = self.chain.confirmed();
        tracing::debug!(
            files = known.len(),
            "checking the marks of every known file"
        );
        for chunk in known.chunks(1000) {
            let mut pipe = redis::pipe();
            for (s, field, _) in chunk {
                pipe.cmd("HGET").arg(&self.keys[*s].marks).arg(field);
            }
            let v: Vec<Option<String>> = pipe.query_async(c).await?;
            for ((s, field, believed), read) in chunk.iter().zip(v) {
                // A malformed value is caught (and stops the agent) when the file's next
                // transaction reads it; here it counts as missing.
                let read = read.as_deref().and_then(parse_mark);
                tracing::debug!(field = %field, believed = ?believed, read = ?read, "mark after reconnect");
                if let Some(gap) = check_known(*believed, read) {
                    let path = self
                        .paths
                        .get(&(*s, field.clone()))
                        .cloned()
                        .unwrap_or_else(|| field.clone());
                    self.report_gap(&path, field, gap);
                }
                // The tip is read again where a transaction is pending (it was forgotten).
                if self.chain.knows(*s, field) {
                    self.chain.set(*s, field, read);
                }
                self.chain.confirm(*s, field, read);
            }
        }
        Ok(())
    }

    fn fail_conn(&mut self, e: &RedisError) {
        if is_connection_error(e) {
            self.drop_conn();
        }
    }

    fn drop_conn(&mut self) {
        self.conn = None;
    }

    /// One pause between retries. Err when `redis.retry_limit` is used up; Ok(false) when
    /// `abort` fired.
    async fn transient_pause(
        &mut self,
        backoff: &mut Backoff,
        why: &str,
        abort: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<bool> {
        add(&STATS.redis_retries, 1);
        if self.retry_limit > 0 && backoff.attempts() >= self.retry_limit {
            anyhow::bail!(
                "Redis still failing after {} attempts (redis.retry_limit): {why}",
                backoff.attempts()
            );
        }
        let d = backoff.next_delay();
        if backoff.attempts() == 1 {
            warn!(error = %why, retry_in = ?d, "Redis unavailable; reading paused, retrying (nothing is lost)");
        } else {
            warn!(error = %why, attempt = backoff.attempts(), retry_in = ?d, "Redis still unavailable");
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(true),
            _ = abort.changed() => Ok(false),
        }
    }

    async fn wait_replicas_if_asked(&mut self) {
        if self.wait_replicas == 0 {
            return;
        }
        if let Some(c) = self.conn.as_mut() {
            let r: Result<i64, _> = redis::cmd("WAIT")
                .arg(self.wait_replicas)
                .arg(self.wait_timeout.as_millis() as u64)
                .query_async(c)
                .await;
            match r {
                Ok(n) if n < self.wait_replicas as i64 => {
                    warn!(
                        acked = n,
                        wanted = self.wait_replicas,
                        "fewer replicas than redis.wait_replicas acknowledged the batch"
                    )
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "WAIT failed"),
            }
        }
    }

    fn report_gap(&mut self, path: &str, field: &str, gap: Gap) {
        if !self.gaps_reported.insert((field.to_string(), gap.clone())) {
            return;
        }
        add(&STATS.redis_gaps, 1);
        let (from, to) = gap.range();
        match gap.redis {
            None => error!(
                path = %path,
                generation = gap.published.0,
                lost_from = from,
                lost_to = to,
                "Redis has no high-water mark for this file although bytes {from}..{to} were published: Redis lost data (restart without persistence, FLUSHALL, failover to a stale replica?). Not republishing them (see docs/exactly-once.md); continuing from {to}."
            ),
            Some(m) => error!(
                path = %path,
                generation = gap.published.0,
                lost_from = from,
                lost_to = to,
                redis_mark = %protocol::fmt_mark(m),
                "Redis's high-water mark for this file is behind what was published: Redis lost bytes {from}..{to} (restored from an older snapshot, failover?). Not republishing them; continuing from {to}."
            ),
        }
    }
}

/// A transaction confirmed not applied, of a file whose later transaction (in a later
/// flight) applied without its check, has been overtaken: its entries are sent anyway, out
/// of order, instead of being taken for "below the mark" (which would lose them).
fn mark_overtaken(flights: &mut [Flight]) {
    let mut later_unchecked: HashSet<(usize, String)> = HashSet::new();
    for f in flights.iter_mut().rev() {
        for &i in &f.pending {
            let t = &mut f.txns[i];
            let file = &f.group[t.batches[0]].file;
            let key = (file.source, file.mark_field.clone());
            if t.state == TxnState::Pending && t.not_applied && later_unchecked.contains(&key) {
                t.overtaken = true;
            }
            if t.unchecked {
                later_unchecked.insert(key);
            }
        }
    }
}

fn ack(acks: &crossbeam_channel::Sender<Ack>, group: Vec<Parsed>) {
    for p in group {
        let _ = acks.send(Ack {
            file: p.file,
            end: p.end,
            read_bytes: p.read_bytes,
            lines: p.lines,
        });
    }
}

/// Waits for a flight's reply; the pipeline comes back with it (None if nothing was sent).
async fn landed(
    f: &mut Flight,
) -> anyhow::Result<(Option<redis::Pipeline>, Result<Vec<Value>, RedisError>)> {
    match f.reply.as_mut() {
        Some(h) => match h.await {
            Ok((pipe, r)) => Ok((Some(pipe), r)),
            Err(e) => anyhow::bail!("internal error: the publishing task failed: {e}"),
        },
        None => Ok((None, Ok(Vec::new()))),
    }
}
