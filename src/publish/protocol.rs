//! The exactly-once protocol: what a transaction may assume about Redis, and what the
//! publisher concludes from a reply. Pure logic, no I/O (tested by a model of Redis in
//! `model_tests.rs`). docs/exactly-once.md tells the same story with its failure table.
//!
//! Every file has one *mark* in Redis: field `<file id>` of the hash
//! `{<stream>}:redtail:marks`, value `"<generation>:<offset>"`, the end of what of the file
//! the stream holds. Each transaction for a file is sent as
//!
//! ```text
//! WATCH {<stream>}:redtail:guard:<host> {<stream>}:redtail:marks:<host>
//! EVAL <GUARD_SCRIPT> 3 <marks> <guard> <stream> <field> <expected mark or ""> 1
//! MULTI
//! XADD <stream> * …            (one per record)
//! HSET <marks> <field> <new mark>
//! EXEC
//! ```
//!
//! The script compares the mark with the one the transaction was built on; on a mismatch it
//! writes the guard key, which the WATCH turns into an aborted EXEC (a nil reply). The marks
//! hash is WATCHed too: it belongs to this agent alone (`<host>`), so a change between the
//! check and the EXEC can only come from this agent's own older connection (a pipeline Redis
//! runs late, after a timeout), and must abort this one. So:
//!
//! - **I1. A transaction applies only on top of the mark it expects.** Marks only ever take
//!   values along one chain (each transaction's new mark is past its expected one), so a
//!   file's transactions apply in file order, each at most once, and a mark never decreases.
//! - **I2. Nothing later of a file applies after an earlier part that did not.** A refused or
//!   aborted transaction leaves the mark where it was; every transaction sent behind it expects
//!   the mark it would have set, so each of them aborts too. No connection needs killing: a
//!   pipeline that Redis runs late (after a timeout) aborts by itself.
//! - **I3. After any failure that is not a confirmed apply, the publisher reads the marks**
//!   ([`Chain::forget`]) and builds again from what Redis holds: entries below the mark are
//!   dropped ([`plan`]), and a mark behind what the publisher knew it had applied is a loss on
//!   the Redis side, reported per file with its byte range ([`Gap`]).
//! - **I4. A stream key of another type fails the check too** (script result 2), before
//!   anything is applied: the records go to the dead-letter file (fsynced) and only then does a
//!   mark-only transaction move the mark past them.
//!
//! A check that did not run (the EVAL itself refused) cannot stop the EXEC; the reply shows
//! it ([`TxnReply::Unchecked`]) and the publisher treats it as uncertain (I3).

use std::collections::HashMap;

/// (generation, offset): the end of what a file's stream holds. Ordered as a tuple.
pub type Mark = (u32, u64);

/// The check run before each transaction. KEYS: marks hash, guard key, stream.
/// ARGV: mark field, expected value ("" = no mark), "1" to check the stream's type (a
/// mark-only transaction does not). Returns 1 (go), 0 (the mark is not the expected one, or
/// cannot be read: the marks key holds another type) or 2 (the stream key holds another
/// type); on 0 and 2 the guard key is written, so the WATCHed EXEC that follows aborts. The
/// script cannot fail on the data it reads (`pcall`), and `SET` writes the guard whatever
/// the key held. `allow-oom`: the guard write must work when Redis is out of memory, or a
/// failed check could not stop the EXEC (needs Redis 7).
pub const GUARD_SCRIPT: &str = "#!lua flags=allow-oom
local ok, v = pcall(redis.call, 'HGET', KEYS[1], ARGV[1])
if not ok then v = nil elseif v == false then v = '' end
local r = 1
if v ~= ARGV[2] then
  r = 0
elseif ARGV[3] == '1' then
  local t = redis.call('TYPE', KEYS[3])['ok']
  if t ~= 'stream' and t ~= 'none' then r = 2 end
end
if r ~= 1 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', 60000)
end
return r
";

/// `"<generation>:<offset>"`.
pub fn fmt_mark(m: Mark) -> String {
    format!("{}:{}", m.0, m.1)
}

/// The script's `expected` argument: "" for no mark.
pub fn expected_arg(m: Option<Mark>) -> String {
    m.map(fmt_mark).unwrap_or_default()
}

/// Parses a mark value; None for a missing or malformed one.
pub fn parse_mark(v: &str) -> Option<Mark> {
    let (g, o) = v.split_once(':')?;
    Some((g.parse().ok()?, o.parse().ok()?))
}

/// The guard key of a marks key: same hash slot, same agent.
pub fn guard_key(marks_key: &str) -> String {
    match marks_key.rfind(":redtail:marks") {
        Some(i) => format!(
            "{}:redtail:guard{}",
            &marks_key[..i],
            &marks_key[i + ":redtail:marks".len()..]
        ),
        None => format!("{marks_key}:guard"),
    }
}

/// What the publisher believes each file's mark is once everything it has sent applies:
/// the mark the file's next transaction is built on. A file not in the chain must be read
/// from Redis first.
#[derive(Default, Debug)]
pub struct Chain {
    tips: HashMap<(usize, String), Option<Mark>>,
    /// The last mark Redis confirmed per file (a reply, or a read): what a later read is
    /// compared with. The tip may be ahead of it by what is in flight.
    confirmed: HashMap<(usize, String), Option<Mark>>,
}

impl Chain {
    pub fn tip(&self, source: usize, field: &str) -> Option<Option<Mark>> {
        self.tips.get(&(source, field.to_string())).copied()
    }
    pub fn knows(&self, source: usize, field: &str) -> bool {
        self.tips.contains_key(&(source, field.to_string()))
    }
    pub fn set(&mut self, source: usize, field: &str, tip: Option<Mark>) {
        self.tips.insert((source, field.to_string()), tip);
    }
    /// After a failure: the mark must be read again before the next transaction.
    pub fn forget(&mut self, source: usize, field: &str) {
        self.tips.remove(&(source, field.to_string()));
    }
    /// Redis said so: a transaction's reply, or a read.
    pub fn confirm(&mut self, source: usize, field: &str, m: Option<Mark>) {
        self.confirmed.insert((source, field.to_string()), m);
    }
    /// Every file with a confirmed mark, for the check after a reconnect.
    pub fn confirmed(&self) -> Vec<(usize, String, Option<Mark>)> {
        self.confirmed
            .iter()
            .map(|((s, f), t)| (*s, f.clone(), *t))
            .collect()
    }
}

/// Bytes of a file that Redis no longer holds although they were published: reported at
/// ERROR and counted, not republished (docs/exactly-once.md says why).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Gap {
    /// Where Redis's mark is (None: no mark at all).
    pub redis: Option<Mark>,
    /// Where the file's published part ended.
    pub published: Mark,
}

impl Gap {
    /// The lost byte range, in the published mark's generation.
    pub fn range(&self) -> (u64, u64) {
        let from = match self.redis {
            Some((g, o)) if g == self.published.0 => o,
            _ => 0,
        };
        (from, self.published.1)
    }
}

/// What one transaction covers: from its first batch's start to its last batch's end.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub first: Mark,
    pub last: Mark,
    /// Redis should hold a mark at `first` (the file was resumed or continued, not started at
    /// 0 or at `start_at = "end"`).
    pub expect_mark: bool,
}

/// What to do with a transaction, given the mark Redis holds (or the chain's tip).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Drop the entries below this mark (Redis holds them). None: keep all.
    pub drop_below: Option<Mark>,
    /// Everything is in Redis already: nothing to send.
    pub all_there: bool,
    /// Redis is behind the transaction's start although it should not be.
    pub gap: Option<Gap>,
}

/// Decides a transaction against `tip`, the mark it will be built on.
pub fn plan(span: Span, tip: Option<Mark>) -> Plan {
    let behind = tip.is_none_or(|t| t < span.first);
    let gap = (behind && span.expect_mark && span.first.1 > 0).then_some(Gap {
        redis: tip,
        published: span.first,
    });
    match tip {
        Some(t) if t >= span.last => Plan {
            drop_below: Some(t),
            all_there: true,
            gap: None,
        },
        Some(t) if t > span.first => Plan {
            drop_below: Some(t),
            all_there: false,
            gap: None,
        },
        _ => Plan {
            drop_below: None,
            all_there: false,
            gap,
        },
    }
}

/// Compares a mark read after a reconnect with what the publisher had applied: a mark behind
/// it is a loss on the Redis side.
pub fn check_known(believed: Option<Mark>, read: Option<Mark>) -> Option<Gap> {
    match (believed, read) {
        (Some(b), r) if r.is_none_or(|r| r < b) => Some(Gap {
            redis: r,
            published: b,
        }),
        _ => None,
    }
}

/// How one guarded transaction went, from its four replies (WATCH, EVAL, MULTI, EXEC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnReply {
    /// Applied, the check passed.
    Applied,
    /// Applied, but the check's own reply was an error, so it may not have run (I3: treat
    /// the file as uncertain afterwards).
    Unchecked(String),
    /// Not applied: the mark was not the expected one (or another agent's failed check wrote
    /// the guard in between).
    Mismatch,
    /// Not applied: the stream key holds another type.
    WrongType,
    /// Not applied: refused while queued; transient (OOM, …).
    Refused { oom: bool, error: String },
    /// Not applied: refused for good (NOPERM, a syntax error): a configuration problem.
    Permanent(String),
}

/// One reply value, reduced to what the protocol needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Int(i64),
    Nil,
    /// EXEC's array: the items that are errors, by position, and the item count.
    Items {
        errors: Vec<(usize, String)>,
        len: usize,
    },
    Error {
        code: String,
        text: String,
    },
}

/// Error codes after which trying again later can succeed.
pub fn transient_code(code: &str) -> bool {
    matches!(
        code,
        "LOADING"
            | "BUSY"
            | "TRYAGAIN"
            | "CLUSTERDOWN"
            | "MASTERDOWN"
            | "READONLY"
            | "OOM"
            | "NOREPLICAS"
            | "MOVED"
            | "ASK"
    )
}

/// Classifies a transaction's replies. `queued`: the first error among the queued
/// commands' replies, when they were kept (EXECABORT does not name its cause). `Err` when the
/// framing itself failed (WATCH or MULTI refused): what the EXEC did cannot be trusted, the
/// file is uncertain.
pub fn classify(
    watch: &Reply,
    eval: &Reply,
    multi: &Reply,
    exec: &Reply,
    queued: Option<&Reply>,
) -> Result<TxnReply, String> {
    for (what, r) in [("WATCH", watch), ("MULTI", multi)] {
        if let Reply::Error { code, text } = r {
            return Err(format!("{what} refused: {code} {text}"));
        }
    }
    match exec {
        Reply::Items { .. } => match eval {
            Reply::Int(1) => Ok(TxnReply::Applied),
            Reply::Error { code, text } => Ok(TxnReply::Unchecked(format!("{code} {text}"))),
            other => Ok(TxnReply::Unchecked(format!("check replied {other:?}"))),
        },
        Reply::Nil => match eval {
            Reply::Int(2) => Ok(TxnReply::WrongType),
            _ => Ok(TxnReply::Mismatch),
        },
        Reply::Error { code, text } => {
            let error = match queued {
                Some(Reply::Error { code: c, text: t }) => format!("{code} {text} ({c} {t})"),
                _ => format!("{code} {text}"),
            };
            match queued {
                // The cause is known: it decides.
                Some(Reply::Error { code: c, .. }) if transient_code(c) => Ok(TxnReply::Refused {
                    oom: c == "OOM",
                    error,
                }),
                Some(Reply::Error { .. }) => Ok(TxnReply::Permanent(error)),
                // EXECABORT without its cause (the fast path does not keep the queued
                // replies): try again on the careful path, which does.
                _ if code == "EXECABORT" || transient_code(code) => Ok(TxnReply::Refused {
                    oom: code == "OOM",
                    error,
                }),
                _ => Ok(TxnReply::Permanent(error)),
            }
        }
        other => Err(format!("EXEC replied {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(first: Mark, last: Mark) -> Span {
        Span {
            first,
            last,
            expect_mark: true,
        }
    }

    #[test]
    fn plan_in_order_sends_all() {
        let p = plan(span((0, 100), (0, 200)), Some((0, 100)));
        assert_eq!(
            p,
            Plan {
                drop_below: None,
                all_there: false,
                gap: None
            }
        );
    }

    #[test]
    fn plan_mark_inside_drops_the_covered_part() {
        let p = plan(span((0, 100), (0, 200)), Some((0, 150)));
        assert_eq!(p.drop_below, Some((0, 150)));
        assert!(!p.all_there);
    }

    #[test]
    fn plan_mark_past_is_all_there() {
        assert!(plan(span((0, 100), (0, 200)), Some((0, 200))).all_there);
        assert!(plan(span((0, 100), (0, 200)), Some((1, 0))).all_there);
    }

    #[test]
    fn plan_mark_missing_or_behind_is_a_gap_when_expected() {
        let p = plan(span((0, 100), (0, 200)), None);
        assert_eq!(
            p.gap,
            Some(Gap {
                redis: None,
                published: (0, 100)
            })
        );
        assert_eq!(p.gap.unwrap().range(), (0, 100));
        let p = plan(span((0, 100), (0, 200)), Some((0, 40)));
        assert_eq!(p.gap.unwrap().range(), (40, 100));
        // A file started fresh (or at "end") has no mark to expect.
        let mut s = span((0, 100), (0, 200));
        s.expect_mark = false;
        assert_eq!(plan(s, None).gap, None);
        // A new generation starting at 0 is no gap.
        assert_eq!(plan(span((1, 0), (1, 50)), Some((0, 900))).gap, None);
    }

    #[test]
    fn known_marks_behind_are_gaps() {
        assert_eq!(check_known(Some((0, 10)), Some((0, 10))), None);
        assert!(check_known(Some((0, 10)), None).is_some());
        assert!(check_known(Some((0, 10)), Some((0, 5))).is_some());
        assert_eq!(check_known(None, None), None);
    }

    fn err(code: &str, text: &str) -> Reply {
        Reply::Error {
            code: code.into(),
            text: text.into(),
        }
    }

    fn classify(w: &Reply, e: &Reply, m: &Reply, x: &Reply) -> Result<TxnReply, String> {
        super::classify(w, e, m, x, None)
    }

    #[test]
    fn classify_replies() {
        let items = Reply::Items {
            errors: vec![],
            len: 2,
        };
        assert_eq!(
            classify(&Reply::Ok, &Reply::Int(1), &Reply::Ok, &items),
            Ok(TxnReply::Applied)
        );
        assert_eq!(
            classify(&Reply::Ok, &Reply::Int(0), &Reply::Ok, &Reply::Nil),
            Ok(TxnReply::Mismatch)
        );
        assert_eq!(
            classify(&Reply::Ok, &Reply::Int(2), &Reply::Ok, &Reply::Nil),
            Ok(TxnReply::WrongType)
        );
        assert!(matches!(
            classify(&Reply::Ok, &err("NOPERM", "x"), &Reply::Ok, &items),
            Ok(TxnReply::Unchecked(_))
        ));
        let abort = err(
            "EXECABORT",
            "Transaction discarded because of previous errors.",
        );
        // Without the cause: transient, to be tried on the careful path.
        assert!(matches!(
            classify(&Reply::Ok, &Reply::Int(1), &Reply::Ok, &abort),
            Ok(TxnReply::Refused { oom: false, .. })
        ));
        let oom = err("OOM", "command not allowed when used memory > 'maxmemory'.");
        assert!(matches!(
            super::classify(&Reply::Ok, &Reply::Int(1), &Reply::Ok, &abort, Some(&oom)),
            Ok(TxnReply::Refused { oom: true, .. })
        ));
        let perm = err(
            "NOPERM",
            "User x has no permissions to run the 'xadd' command",
        );
        assert!(matches!(
            super::classify(&Reply::Ok, &Reply::Int(1), &Reply::Ok, &abort, Some(&perm)),
            Ok(TxnReply::Permanent(_))
        ));
        assert!(classify(&err("ERR", "x"), &Reply::Int(1), &Reply::Ok, &items).is_err());
        assert!(classify(&Reply::Ok, &Reply::Int(1), &err("ERR", "x"), &items).is_err());
    }

    #[test]
    fn guard_key_shares_the_slot() {
        assert_eq!(
            guard_key("{logs:nginx}:redtail:marks:web1"),
            "{logs:nginx}:redtail:guard:web1"
        );
    }
}
