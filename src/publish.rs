//! The publisher: puts parsed batches back in file order, writes dead letters, and applies
//! them to Redis. The protocol is described in docs/exactly-once.md.
//!
//! All ready batches go out in one pipeline; within it, each file's batches form one
//! `MULTI … XADD … HSET <mark> … EXEC` transaction, so a file's entries and its high-water
//! mark land together or not at all. Batches grow under load by themselves: the next
//! pipeline leaves as soon as the previous one is acknowledged, with whatever is ready.
//!
//! Nothing is read back on the happy path. When a pipeline's outcome is unknown (the
//! connection dropped, a timeout), the publisher reconnects, reads the marks of the files
//! involved, and resends only what they do not cover.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, Value};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::{marks_key, Config};
use crate::deadletter;
use crate::record::{DeadClass, DeadRecord, FileInfo, Parsed};
use crate::stats::{add, STATS};

/// An acknowledged batch: the checkpoint may move to `end`.
#[derive(Debug, Clone)]
pub struct Ack {
    pub file: Arc<FileInfo>,
    pub end: u64,
    pub read_bytes: u64,
    pub lines: u32,
}

/// Is this error worth retrying after a pause (nothing is lost by retrying: the marks make a
/// repeated call a no-op for what already landed)?
pub fn is_transient(e: &RedisError) -> bool {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return true;
    }
    matches!(
        e.code(),
        Some(
            "LOADING"
                | "BUSY"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
                | "MASTERDOWN"
                | "READONLY"
                | "OOM"
                | "EXECABORT"
                | "NOREPLICAS"
                | "MOVED"
                | "ASK"
                | "REDTAILGAP"
        )
    )
}

/// Capped exponential backoff with full jitter.
pub struct Backoff {
    attempt: u32,
    max: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        Backoff { attempt: 0, max }
    }
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
    pub fn next_delay(&mut self) -> Duration {
        let base = Duration::from_millis(50).saturating_mul(1u32 << self.attempt.min(16));
        self.attempt += 1;
        let cap = base.min(self.max);
        // Jitter from the clock's low bits: good enough to spread reconnecting agents.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let frac = (nanos % 1000) as f64 / 1000.0;
        cap.mul_f64(0.5 + frac / 2.0)
    }
}

/// Publisher settings.
pub struct Publisher {
    pub client: redis::Client,
    pub conn_cfg: AsyncConnectionConfig,
    pub max_entries: usize,
    pub max_bytes: usize,
    pub retry_max_backoff: Duration,
    pub retry_limit: u32,
    pub wait_replicas: u32,
    pub wait_timeout: Duration,
    pub dlq: deadletter::Writer,
    pub source_names: Vec<String>,
    pub parser_names: Vec<String>,
    pub marks_keys: Vec<String>,
    conn: Option<MultiplexedConnection>,
    /// Server-side id of `conn`.
    conn_id: Option<i64>,
    /// Ids of dropped connections whose last pipeline may still sit unread in Redis.
    stale_ids: Vec<i64>,
    gap_reported: HashSet<String>,
}

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
            marks_keys: cfg.sources.iter().map(|s| marks_key(&s.stream)).collect(),
            conn: None,
            conn_id: None,
            stale_ids: Vec::new(),
            gap_reported: HashSet::new(),
        })
    }

    async fn connect(&mut self) -> Result<&mut MultiplexedConnection, RedisError> {
        if self.conn.is_none() {
            let mut c = self
                .client
                .get_multiplexed_async_connection_with_config(&self.conn_cfg)
                .await?;
            // Kept so that a later connection can fence this one off (see `reconcile`); a
            // connection that cannot say its id is not used.
            self.conn_id = match redis::cmd("CLIENT")
                .arg("ID")
                .query_async::<i64>(&mut c)
                .await
            {
                Ok(id) => Some(id),
                Err(e) if e.code() == Some("NOPERM") => {
                    warn!("the Redis user may not run CLIENT ID/KILL: after a timeout the agent cannot fence off the old connection, so a reply lost to a timeout may leave a duplicate; grant +client to rule that out");
                    None
                }
                Err(e) => return Err(e),
            };
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().unwrap())
    }

    /// Runs until `rx` is closed and everything received is published (or `abort` fires).
    /// Sends one ack per batch, in order, to `acks`.
    ///
    /// Two pipelines may be in flight on the one connection, so Redis works on one while the
    /// reply of the other is read and the next is built. Any failure drops back to one
    /// pipeline at a time, through the careful path in [`Publisher::finish`].
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Parsed>,
        acks: crossbeam_channel::Sender<Ack>,
        mut abort: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let mut reorder: BTreeMap<u64, Parsed> = BTreeMap::new();
        let mut next_seq = 0u64;
        let mut closed = false;
        let mut flights: VecDeque<Flight> = VecDeque::new();
        let ack = |group: Vec<Parsed>| {
            for p in group {
                let _ = acks.send(Ack {
                    file: p.file,
                    end: p.end,
                    read_bytes: p.read_bytes,
                    lines: p.lines,
                });
            }
        };
        loop {
            // Whatever is queued already joins the next pipeline.
            while let Ok(p) = rx.try_recv() {
                reorder.insert(p.seq, p);
            }
            let can_send = flights.len() < 2 && flights.iter().all(|f| f.reply.is_some());
            if can_send && reorder.contains_key(&next_seq) {
                let mut group = Vec::new();
                let mut entries = 0usize;
                let mut bytes = 0usize;
                while let Some(p) = reorder.remove(&next_seq) {
                    entries += p.xadds.len();
                    bytes += p.wire_bytes;
                    next_seq += 1;
                    group.push(p);
                    if entries >= self.max_entries || bytes >= self.max_bytes {
                        break;
                    }
                }
                tokio::select! {
                    r = self.write_group_dead(&mut group) => r,
                    _ = abort.changed() => return Ok(()),
                }
                let txns = txns_of(&group);
                let reply = match self.connect().await {
                    Ok(c) => {
                        let mut c = c.clone();
                        // The commands move into the pipeline (no copy); they come back
                        // with the reply, and are put back only if something failed.
                        let all: Vec<usize> = (0..txns.len()).collect();
                        let pipe = pipe_of(&self.marks_keys, &mut group, &txns, &all, true);
                        Some(tokio::spawn(async move {
                            let r = pipe.query_async::<Vec<Value>>(&mut c).await;
                            (pipe, r)
                        }))
                    }
                    Err(_) => None,
                };
                flights.push_back(Flight { group, txns, reply });
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
            let can_take =
                flights.len() < 2 && !closed && flights.iter().all(|f| f.reply.is_some());
            let front = flights.front_mut().unwrap();
            let result = tokio::select! {
                r = landed(front) => Some(r?),
                m = rx.recv(), if can_take => {
                    match m {
                        Some(p) => { reorder.insert(p.seq, p); }
                        None => closed = true,
                    }
                    None
                }
                _ = abort.changed() => return Ok(()),
            };
            let Some((pipe, result)) = result else {
                continue;
            };
            let Flight {
                mut group,
                mut txns,
                ..
            } = flights.pop_front().unwrap();
            let all: Vec<usize> = (0..txns.len()).collect();
            let clean = matches!(&result, Ok(replies) if replies.iter().all(|v| matches!(v,
                Value::Array(items) if !items.iter().any(|x| matches!(x, Value::ServerError(_))))));
            if !clean {
                restore(&mut group, &txns, pipe.as_ref());
            }
            drop(pipe);
            let outcome = match result {
                Ok(replies) => self.apply_replies(&group, &mut txns, &all, replies),
                Err(e) => Outcome::Uncertain(e),
            };
            if matches!(outcome, Outcome::Clean) {
                self.wait_replicas_if_asked().await;
                ack(group);
                continue;
            }
            // Something failed: the pipeline behind this one may depend on it. Let it land,
            // then finish both one at a time, reading the marks first where needed.
            let mut rest = Vec::new();
            while let Some(mut f) = flights.pop_front() {
                let (pipe, r) = landed(&mut f).await?;
                restore(&mut f.group, &f.txns, pipe.as_ref());
                drop(pipe);
                let all: Vec<usize> = (0..f.txns.len()).collect();
                let o = match r {
                    Ok(replies) => self.apply_replies(&f.group, &mut f.txns, &all, replies),
                    Err(e) => Outcome::Uncertain(e),
                };
                rest.push((f, o));
            }
            let uncertain = match &outcome {
                Outcome::Uncertain(e) => {
                    add(&STATS.redis_retries, 1);
                    warn!(error = %e, "Redis call failed; checking what Redis holds before sending again (nothing is lost)");
                    if e.is_io_error()
                        || e.is_connection_dropped()
                        || e.is_timeout()
                        || e.is_connection_refusal()
                        || e.kind() == redis::ErrorKind::Io
                    {
                        self.drop_conn();
                    }
                    true
                }
                _ => false,
            };
            let done = tokio::select! {
                r = self.finish(&mut group, &mut txns, uncertain) => r,
                _ = abort.changed() => return Ok(()),
            };
            done?;
            ack(group);
            for (mut f, o) in rest {
                // Whatever happened to it, it was sent after a failure: read the marks.
                let _ = o;
                let done = tokio::select! {
                    r = self.finish(&mut f.group, &mut f.txns, true) => r,
                    _ = abort.changed() => return Ok(()),
                };
                done?;
                ack(f.group);
            }
        }
    }

    fn write_dead(&mut self, file: &FileInfo, recs: &[DeadRecord]) -> std::io::Result<()> {
        let source = &self.source_names[file.source];
        let parser = &self.parser_names[file.source];
        for r in recs {
            let e = self.dlq.entry(source, parser, file, r, 1);
            self.dlq.append(&e)?;
        }
        Ok(())
    }

    /// Dead letters of a group, fsynced before the group's transactions are sent: a
    /// checkpoint must never pass a record that is neither in Redis nor on disk.
    async fn write_group_dead(&mut self, group: &mut [Parsed]) {
        let mut any_dead = false;
        for p in group.iter_mut() {
            if p.dead.is_empty() {
                continue;
            }
            any_dead = true;
            let dead = std::mem::take(&mut p.dead);
            let mut backoff = Backoff::new(self.retry_max_backoff);
            while let Err(e) = self.write_dead(&p.file, &dead) {
                let d = backoff.next_delay();
                error!(error = %e, retry_in = ?d, "cannot write the dead-letter file; holding the pipeline");
                tokio::time::sleep(d).await;
            }
        }
        if any_dead {
            let mut backoff = Backoff::new(self.retry_max_backoff);
            while let Err(e) = self.dlq.sync() {
                let d = backoff.next_delay();
                error!(error = %e, "cannot fsync the dead-letter file; holding the pipeline");
                tokio::time::sleep(d).await;
            }
        }
    }

    /// Reads the EXEC replies of `pending` transactions and sets their states.
    fn apply_replies(
        &mut self,
        group: &[Parsed],
        txns: &mut [Txn],
        pending: &[usize],
        replies: Vec<Value>,
    ) -> Outcome {
        let mut outcome = Outcome::Clean;
        for (reply, &t) in replies.into_iter().zip(pending) {
            match reply {
                Value::Array(items) => {
                    self.applied(group, &txns[t], &items);
                    txns[t].state = TxnState::Done;
                }
                Value::ServerError(se) => {
                    // EXECABORT (a command refused while queued: OOM, …): nothing of this
                    // file's transaction applied; it is sent again.
                    let e: RedisError = se.into();
                    if is_transient(&e) {
                        txns[t].aborted = true;
                        if matches!(outcome, Outcome::Clean) {
                            outcome = Outcome::Retry(e);
                        }
                    } else {
                        self.reject_txn(group, &txns[t], &e.to_string());
                        txns[t].state = TxnState::Rejected;
                        outcome = Outcome::Uncertain(e);
                    }
                }
                other => {
                    // Nil: aborted (nothing applied).
                    txns[t].aborted = true;
                    if matches!(outcome, Outcome::Clean) {
                        outcome = Outcome::Retry(RedisError::from((
                            redis::ErrorKind::Client,
                            "transaction aborted",
                            format!("{other:?}"),
                        )));
                    }
                }
            }
        }
        outcome
    }

    /// The careful path: sends what is still pending, one pipeline at a time, reading the
    /// marks first after an uncertain failure; transient failures are retried until they
    /// pass (or `redis.retry_limit`).
    async fn finish(
        &mut self,
        group: &mut [Parsed],
        txns: &mut [Txn],
        mut uncertain: bool,
    ) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(self.retry_max_backoff);
        if txns.iter().any(|t| t.state == TxnState::Pending) && !uncertain {
            // A transient refusal (EXECABORT): pause before trying again.
            let e = RedisError::from((redis::ErrorKind::Client, "transaction aborted; retrying"));
            self.transient_pause(&mut backoff, &e).await?;
        }
        loop {
            if uncertain {
                match self.reconcile(group, txns).await {
                    Ok(()) => uncertain = false,
                    Err(e) => {
                        self.transient_pause(&mut backoff, &e).await?;
                        continue;
                    }
                }
            }
            let pending: Vec<usize> = (0..txns.len())
                .filter(|&t| txns[t].state == TxnState::Pending)
                .collect();
            if pending.is_empty() {
                break;
            }
            let pipe = pipe_of(&self.marks_keys, group, txns, &pending, false);
            let result: Result<Vec<Value>, RedisError> = match self.connect().await {
                Ok(c) => pipe.query_async(c).await,
                Err(e) => Err(e),
            };
            drop(pipe);
            match result {
                Ok(replies) => match self.apply_replies(group, txns, &pending, replies) {
                    Outcome::Clean => {}
                    Outcome::Retry(e) => self.transient_pause(&mut backoff, &e).await?,
                    Outcome::Uncertain(_) => uncertain = true,
                },
                Err(e) => {
                    uncertain = true;
                    self.transient_pause(&mut backoff, &e).await?;
                }
            }
        }
        self.wait_replicas_if_asked().await;
        Ok(())
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

    /// An EXEC reply: count what landed; entries Redis refused at run time (the transaction
    /// still applied, mark included) go to the dead-letter file.
    fn applied(&mut self, group: &[Parsed], txn: &Txn, items: &[Value]) {
        let mut i = 0;
        let mut added = 0u64;
        for &b in &txn.batches {
            let p = &group[b];
            let mut refused = Vec::new();
            for (k, &offset) in p.offsets.iter().enumerate() {
                match items.get(i) {
                    Some(Value::ServerError(se)) => {
                        let msg =
                            format!("Redis rejected the entry: {}", RedisError::from(se.clone()));
                        // The commands were put back (`restore`) because of this error.
                        match p.xadds.get(k) {
                            Some(c) => refused.push(rejected_record(c, offset, msg)),
                            None => error!(offset, error = %msg, "rejected entry lost its command"),
                        }
                    }
                    _ => added += 1,
                }
                i += 1;
            }
            if !refused.is_empty() {
                error!(path = %p.file.path, entries = refused.len(), "Redis rejected entries; they go to the dead-letter file");
                if let Err(e) = self
                    .write_dead(&p.file, &refused)
                    .and_then(|_| self.dlq.sync())
                {
                    error!(error = %e, records = refused.len(), "cannot write rejected records to the dead-letter file; they are lost");
                    add(&STATS.lost_bytes, refused.iter().map(|r| r.length).sum());
                }
            }
        }
        add(&STATS.entries_published, added);
    }

    /// A transaction refused as a whole (not transient): its records are dead-lettered and
    /// its mark is moved past them (by `reconcile` on the next round).
    fn reject_txn(&mut self, group: &[Parsed], txn: &Txn, err: &str) {
        for &b in &txn.batches {
            let p = &group[b];
            error!(path = %p.file.path, entries = p.xadds.len(), error = %err, "Redis refused a batch permanently; its records go to the dead-letter file");
            let recs: Vec<DeadRecord> = p
                .xadds
                .iter()
                .zip(&p.offsets)
                .map(|(c, &o)| rejected_record(c, o, format!("Redis rejected the batch: {err}")))
                .collect();
            if let Err(e) = self
                .write_dead(&p.file, &recs)
                .and_then(|_| self.dlq.sync())
            {
                error!(error = %e, records = recs.len(), "cannot write rejected records to the dead-letter file; they are lost");
                add(&STATS.lost_bytes, recs.iter().map(|r| r.length).sum());
            }
        }
    }

    /// Reads the marks of every file still pending (or rejected) and decides, per batch,
    /// what Redis already holds. Also where a loss on the Redis side shows up.
    async fn reconcile(
        &mut self,
        group: &mut [Parsed],
        files: &mut [Txn],
    ) -> Result<(), RedisError> {
        let todo: Vec<usize> = (0..files.len())
            .filter(|&t| files[t].state != TxnState::Done)
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        // Fence first: a pipeline whose reply timed out may still sit unread in Redis (a
        // paused server reads it when it resumes). Killing its connection discards what
        // Redis has not executed yet, so the marks read next are final. A transaction is
        // executed whole at EXEC, so a kill never splits one.
        let stale = std::mem::take(&mut self.stale_ids);
        for id in stale {
            let c = self.connect().await?;
            let r: Result<Value, RedisError> = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async(c)
                .await;
            if let Err(e) = r {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.stale_ids.push(id);
                    return Err(e);
                }
                // "No such client" (already gone) or no permission for CLIENT KILL.
            }
        }
        let mut pipe = redis::pipe();
        for &t in &todo {
            let f = &group[files[t].batches[0]].file;
            pipe.cmd("HGET")
                .arg(&self.marks_keys[f.source])
                .arg(&f.mark_field);
        }
        let marks: Vec<Option<String>> = pipe.query_async(self.connect().await?).await?;
        let mut fix = redis::pipe();
        for (&t, mark) in todo.iter().zip(marks) {
            let mark = mark.and_then(|v| {
                let (g, o) = v.split_once(':')?;
                Some((g.parse::<u32>().ok()?, o.parse::<u64>().ok()?))
            });
            let first = &group[files[t].batches[0]];
            let last = &group[*files[t].batches.last().unwrap()];
            if files[t].state == TxnState::Rejected {
                // Dead-lettered: move the mark past it, so the file's next batch is not
                // mistaken for a gap.
                if mark.is_none_or(|m| m < (last.file.generation, last.end)) {
                    fix.cmd("HSET")
                        .arg(&self.marks_keys[last.file.source])
                        .arg(&last.file.mark_field)
                        .arg(format!("{}:{}", last.file.generation, last.end));
                }
                files[t].state = TxnState::Done;
                continue;
            }
            let (g0, s0) = (first.file.generation, first.start);
            if files[t].aborted && mark.is_some_and(|m| m > (g0, s0)) {
                // Known not applied, yet the mark is past it: a later transaction of the
                // same file overtook it (the second pipeline in flight, after an OOM
                // refusal of this one). Its entries are sent now, after the later ones.
                let n: usize = files[t].batches.iter().map(|&b| group[b].xadds.len()).sum();
                add(&STATS.out_of_order, n as u64);
                warn!(path = %first.file.path, entries = n, "a refused transaction was overtaken by a later one; sending its entries now, out of order (none lost, none twice)");
                files[t].no_mark = true;
                files[t].aborted = false;
                continue;
            }
            match mark {
                Some(m) if m >= (last.file.generation, last.end) => {
                    // The transaction landed before the connection broke.
                    let n: usize = files[t].batches.iter().map(|&b| group[b].xadds.len()).sum();
                    add(&STATS.entries_skipped, n as u64);
                    info!(path = %last.file.path, entries = n, "entries already in Redis (their reply was lost); not sent again");
                    files[t].state = TxnState::Done;
                }
                Some(m) if m > (g0, s0) => {
                    // Part of it is there (the follower started below the mark): drop
                    // what the mark covers.
                    for &b in &files[t].batches {
                        let p = &mut group[b];
                        let g = p.file.generation;
                        let keep: Vec<bool> = p.offsets.iter().map(|&o| (g, o) >= m).collect();
                        let before = p.xadds.len();
                        let mut it = keep.iter();
                        p.xadds.retain(|_| *it.next().unwrap());
                        let mut it = keep.iter();
                        p.offsets.retain(|_| *it.next().unwrap());
                        add(&STATS.entries_skipped, (before - p.xadds.len()) as u64);
                    }
                }
                m if s0 > 0 && first.expect_mark && m.is_none_or(|m| m < (g0, s0)) => {
                    self.report_gap(first, m);
                }
                _ => {}
            }
        }
        if !fix.is_empty() {
            let _: Value = fix.query_async(self.connect().await?).await?;
        }
        Ok(())
    }

    /// Forgets the connection; remembers its id so `reconcile` can kill it server-side.
    fn drop_conn(&mut self) {
        if self.conn.take().is_some() {
            if let Some(id) = self.conn_id.take() {
                self.stale_ids.push(id);
            }
        }
    }

    async fn transient_pause(
        &mut self,
        backoff: &mut Backoff,
        e: &RedisError,
    ) -> anyhow::Result<()> {
        add(&STATS.redis_retries, 1);
        if e.is_io_error()
            || e.is_connection_dropped()
            || e.is_timeout()
            || e.is_connection_refusal()
        {
            self.drop_conn();
        }
        if self.retry_limit > 0 && backoff.attempts() >= self.retry_limit {
            anyhow::bail!(
                "Redis still failing after {} attempts (redis.retry_limit): {e}",
                backoff.attempts()
            );
        }
        let d = backoff.next_delay();
        if backoff.attempts() == 1 {
            warn!(error = %e, retry_in = ?d, "Redis unavailable; reading paused, retrying (nothing is lost)");
        } else {
            warn!(error = %e, attempt = backoff.attempts(), retry_in = ?d, "Redis still unavailable");
        }
        tokio::time::sleep(d).await;
        Ok(())
    }

    fn report_gap(&mut self, p: &Parsed, mark: Option<(u32, u64)>) {
        add(&STATS.redis_gaps, 1);
        if !self.gap_reported.insert(p.file.mark_field.clone()) {
            return;
        }
        match mark {
            None => error!(
                path = %p.file.path,
                checkpoint = p.start,
                "Redis has no high-water mark for this file although bytes 0..{} were published: Redis lost data (restart without persistence, FLUSHALL, failover to a stale replica?). Not republishing them (see docs/exactly-once.md); continuing from {}.",
                p.start,
                p.start
            ),
            Some((_, po)) => error!(
                path = %p.file.path,
                checkpoint = p.start,
                redis_mark = po,
                "Redis's high-water mark for this file is behind what was published: Redis lost bytes {}..{} (restored from an older snapshot?). Not republishing them; continuing from {}.",
                po,
                p.start,
                p.start
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxnState {
    Pending,
    Done,
    Rejected,
}

/// The batches of one file in one pipeline: one MULTI/EXEC.
struct Txn {
    batches: Vec<usize>,
    state: TxnState,
    /// Redis said it did not apply (EXECABORT, or an aborted EXEC).
    aborted: bool,
    /// Send without the mark update (a later transaction already moved it).
    no_mark: bool,
}

type Sent = (redis::Pipeline, Result<Vec<Value>, RedisError>);

/// A pipeline sent, its reply not yet read.
struct Flight {
    group: Vec<Parsed>,
    txns: Vec<Txn>,
    /// None: it could not be sent (no connection).
    reply: Option<tokio::task::JoinHandle<Sent>>,
}

/// Waits for a flight's reply; the pipeline comes back with it (None if never sent).
async fn landed(
    f: &mut Flight,
) -> anyhow::Result<(Option<redis::Pipeline>, Result<Vec<Value>, RedisError>)> {
    match f.reply.as_mut() {
        Some(h) => match h.await {
            Ok((pipe, r)) => Ok((Some(pipe), r)),
            Err(e) => anyhow::bail!("internal error: the publishing task failed: {e}"),
        },
        None => Ok((
            None,
            Err(RedisError::from((redis::ErrorKind::Io, "not connected"))),
        )),
    }
}

/// One MULTI/EXEC per transaction in `pending`. The fast path (`take`) moves the XADDs out
/// of `group` (no copy; `restore` puts them back if something fails); the careful path
/// copies them, since it may need them again. A transaction that a later one overtook
/// (`no_mark`) goes without its mark, which is already past it.
fn pipe_of(
    marks_keys: &[String],
    group: &mut [Parsed],
    txns: &[Txn],
    pending: &[usize],
    take: bool,
) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for &t in pending {
        let last = *txns[t].batches.last().unwrap();
        pipe.cmd("MULTI").ignore();
        for &b in &txns[t].batches {
            if take {
                for c in std::mem::take(&mut group[b].xadds) {
                    pipe.add_command(c).ignore();
                }
            } else {
                for c in &group[b].xadds {
                    pipe.add_command(c.clone()).ignore();
                }
            }
        }
        if !txns[t].no_mark {
            let f = &group[last].file;
            pipe.cmd("HSET")
                .arg(&marks_keys[f.source])
                .arg(&f.mark_field)
                .arg(format!("{}:{}", f.generation, group[last].end))
                .ignore();
        }
        pipe.cmd("EXEC");
    }
    pipe
}

/// Puts the XADDs `pipe_of(.., take)` moved out back into `group` (copies; failure path only).
fn restore(group: &mut [Parsed], txns: &[Txn], pipe: Option<&redis::Pipeline>) {
    let Some(pipe) = pipe else { return };
    let mut cmds = pipe.cmd_iter();
    for t in txns {
        cmds.next(); // MULTI
        for &b in &t.batches {
            let n = group[b].offsets.len();
            group[b].xadds = cmds.by_ref().take(n).cloned().collect();
        }
        cmds.next(); // HSET
        cmds.next(); // EXEC
    }
}

/// How a pipeline went.
enum Outcome {
    /// Every transaction applied.
    Clean,
    /// Some transactions were refused as a whole, transiently: they did not apply.
    Retry(RedisError),
    /// The outcome of some transactions is unknown (connection, timeout) or a mark must be
    /// fixed: read the marks before resending.
    Uncertain(RedisError),
}

/// Groups a pipeline's batches into one transaction per file, in order.
fn txns_of(group: &[Parsed]) -> Vec<Txn> {
    let mut txns: Vec<Txn> = Vec::new();
    let mut by_field: HashMap<&str, usize> = HashMap::new();
    for (i, p) in group.iter().enumerate() {
        let t = *by_field
            .entry(p.file.mark_field.as_str())
            .or_insert_with(|| {
                txns.push(Txn {
                    batches: Vec::new(),
                    state: TxnState::Pending,
                    aborted: false,
                    no_mark: false,
                });
                txns.len() - 1
            });
        txns[t].batches.push(i);
    }
    txns
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
