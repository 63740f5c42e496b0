//! The connection to Redis: connecting, checking at connect that the protocol can run at
//! all (a permanent refusal stops the agent with the reason instead of retrying forever),
//! what counts as a transient error, and the backoff between retries.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, Value};

use super::protocol::{transient_code, GUARD_SCRIPT};
use super::txn::{server_error_text, Keys};

/// Is this error worth retrying after a pause (nothing is lost by retrying: the guarded
/// transactions make a repeated one a no-op for what already landed)?
pub fn is_transient(e: &RedisError) -> bool {
    if is_connection_error(e) {
        return true;
    }
    e.code()
        .is_some_and(|c| transient_code(c) || c == "EXECABORT")
}

/// The connection is gone or unusable: drop it and connect again.
pub fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.kind() == redis::ErrorKind::Io
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

/// Why connecting failed.
pub enum ConnectError {
    /// Try again later.
    Transient(RedisError),
    /// Redis refuses what the protocol needs (a command renamed away, an ACL, Redis < 7):
    /// retrying cannot help.
    Permanent(String),
}

/// Opens a connection and runs every command the protocol uses once, writing nothing: a
/// guarded check on a probe field, then `MULTI; XADD; HSET; DISCARD`. Redis checks commands
/// and ACLs while queueing, so a refusal shows here, not halfway through a transaction.
pub async fn connect(
    client: &redis::Client,
    cfg: &AsyncConnectionConfig,
    keys: &[Keys],
) -> Result<MultiplexedConnection, ConnectError> {
    let mut c = client
        .get_multiplexed_async_connection_with_config(cfg)
        .await
        .map_err(ConnectError::Transient)?;
    let mut seen = std::collections::HashSet::new();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut what = Vec::new();
    for k in keys.iter().filter(|k| seen.insert(k.marks.clone())) {
        pipe.cmd("WATCH").arg(&k.guard).arg(&k.marks);
        pipe.cmd("EVAL")
            .arg(GUARD_SCRIPT)
            .arg(3)
            .arg(&k.marks)
            .arg(&k.guard)
            .arg(&k.stream)
            .arg("redtail:probe")
            .arg("")
            .arg("1");
        pipe.cmd("MULTI");
        pipe.cmd("XADD")
            .arg(&k.stream)
            .arg("*")
            .arg("redtail")
            .arg("probe");
        pipe.cmd("HSET")
            .arg(&k.marks)
            .arg("redtail:probe")
            .arg("0:0");
        pipe.cmd("DISCARD");
        for w in ["WATCH", "EVAL", "MULTI", "XADD", "HSET", "DISCARD"] {
            what.push((w, k.stream.clone()));
        }
    }
    let replies: Vec<Value> = pipe
        .query_async(&mut c)
        .await
        .map_err(ConnectError::Transient)?;
    for (v, (cmd, stream)) in replies.iter().zip(&what) {
        if let Value::ServerError(se) = v {
            let text = server_error_text(se);
            if transient_code(se.code()) {
                return Err(ConnectError::Transient(se.clone().into()));
            }
            if *cmd == "EVAL" && se.code() == "ERR" && text.contains("compil") {
                return Err(ConnectError::Permanent(format!(
                    "Redis cannot run redtail's check script ({text}): redtail needs Redis 7.0 or later"
                )));
            }
            return Err(ConnectError::Permanent(format!(
                "Redis refused {cmd} for stream {stream:?}: {text}. redtail needs WATCH, EVAL, MULTI/EXEC/DISCARD, XADD, HSET and HGET on the stream's keys (Redis 7.0 or later, commands not renamed, ACL: +@write +@read +@transaction +@scripting on ~{stream} and its {{…}}:redtail:* keys)"
            )));
        }
        if *cmd == "EVAL" && matches!(v, Value::Int(2)) {
            // The stream key has another type: its records will go to the dead-letter file.
            tracing::error!(stream = %stream, "the stream key holds another type than a stream: its records go to the dead-letter file until it is fixed");
        }
    }
    Ok(c)
}
