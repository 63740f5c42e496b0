//! `nginx_error`: nginx `error.log` lines.
//!
//! ```text
//! 2024/01/02 03:04:05 [error] 1234#5678: *99 open() "/x" failed (2: No such file or directory), client: 1.2.3.4, server: _, request: "GET /x HTTP/1.1", host: "h"
//! ```
//!
//! | field | content |
//! | --- | --- |
//! | `@timestamp` | `2024/01/02 03:04:05` as written ([`TimestampFormat::NginxError`], server local time) |
//! | `log.level` | `debug`, `info`, `notice`, `warn`, `error`, `crit`, `alert` or `emerg` (as written) |
//! | `process.pid` | worker process id |
//! | `process.thread.id` | thread id |
//! | `nginx.connection_id` | the `*N` connection number, when present |
//! | `log.error.message` | the message, without the trailing `, key: value` context |
//! | `source.address` | `client:` |
//! | `nginx.server` | `server:` |
//! | `http.request.original` | `request:` (quotes removed) |
//! | `nginx.upstream` | `upstream:` |
//! | `url.domain` | `host:` |
//! | `http.request.referrer` | `referrer:` |
//! | `nginx.subrequest` | `subrequest:` |
//!
//! The context starts at the first `, client: ` (nginx always logs the client
//! first); other `key: value` parts found there become `nginx.<key>`. Quoted
//! context values are unquoted; nginx does not escape quotes in them, so a
//! quoted value ends at a `"` followed by `, ` or the end of the line.

use crate::scan::trim_cr;
use crate::{Fields, ParseError, Parser, TimestampFormat};

/// The `nginx_error` parser.
#[derive(Debug, Clone, Copy, Default)]
pub struct NginxErrorParser;

fn digits(b: &[u8], i: usize) -> usize {
    b[i.min(b.len())..]
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .count()
}

fn context_key(key: &str) -> Option<&'static str> {
    Some(match key {
        "client" => "source.address",
        "server" => "nginx.server",
        "request" => "http.request.original",
        "upstream" => "nginx.upstream",
        "host" => "url.domain",
        "referrer" => "http.request.referrer",
        "subrequest" => "nginx.subrequest",
        _ => return None,
    })
}

impl Parser for NginxErrorParser {
    fn parse<'a>(&mut self, line: &'a str, out: &mut Fields<'a>) -> Result<(), ParseError> {
        let line = trim_cr(line);
        let b = line.as_bytes();
        if line.trim().is_empty() {
            return Err(ParseError::empty());
        }
        let ts_ok = b.len() >= 19
            && b[4] == b'/'
            && b[7] == b'/'
            && b[10] == b' '
            && b[13] == b':'
            && b[16] == b':'
            && [0..4, 5..7, 8..10, 11..13, 14..16, 17..19]
                .into_iter()
                .all(|r| b[r].iter().all(u8::is_ascii_digit));
        if !ts_ok {
            return Err(ParseError::syntax(
                "expected a YYYY/MM/DD HH:MM:SS timestamp",
                0,
            ));
        }
        out.push("@timestamp", &line[..19]);
        if !line[19..].starts_with(" [") {
            return Err(ParseError::syntax("expected ' ['", 19).context("level"));
        }
        let Some(n) = memchr::memchr(b']', &b[21..]) else {
            return Err(ParseError::syntax("expected ']'", b.len()).context("level"));
        };
        if n == 0 {
            return Err(ParseError::syntax("expected a level", 21).context("level"));
        }
        out.push("log.level", &line[21..21 + n]);
        let mut i = 21 + n + 1;
        if b.get(i) != Some(&b' ') {
            return Err(ParseError::syntax("expected ' '", i).context("pid#tid"));
        }
        i += 1;
        let pid = digits(b, i);
        if pid == 0 || b.get(i + pid) != Some(&b'#') {
            return Err(ParseError::syntax("expected pid#tid", i).context("pid#tid"));
        }
        out.push("process.pid", &line[i..i + pid]);
        i += pid + 1;
        let tid = digits(b, i);
        if tid == 0 || b.get(i + tid) != Some(&b':') {
            return Err(ParseError::syntax("expected pid#tid", i).context("pid#tid"));
        }
        out.push("process.thread.id", &line[i..i + tid]);
        i += tid + 1;
        if b.get(i) == Some(&b' ') {
            i += 1;
        }
        if b.get(i) == Some(&b'*') {
            let n = digits(b, i + 1);
            if n > 0 && matches!(b.get(i + 1 + n), Some(b' ') | None) {
                out.push("nginx.connection_id", &line[i + 1..i + 1 + n]);
                i = (i + 2 + n).min(b.len());
            }
        }
        let rest = &line[i..];
        let ctx = memchr::memmem::find(rest.as_bytes(), b", client: ");
        let message = ctx.map_or(rest, |c| &rest[..c]);
        out.push("log.error.message", message);
        if let Some(c) = ctx {
            context(&rest[c + 2..], out);
        }
        Ok(())
    }

    fn timestamp_field(&self) -> Option<(&'static str, TimestampFormat)> {
        Some(("@timestamp", TimestampFormat::NginxError))
    }
}

/// Parses `key: value, key: "value", ...` (starting at a key).
fn context<'a>(mut s: &'a str, out: &mut Fields<'a>) {
    while !s.is_empty() {
        let Some(colon) = s.find(": ") else { return };
        let key = &s[..colon];
        let v = &s[colon + 2..];
        let (value, rest) = if let Some(q) = v.strip_prefix('"') {
            // ends at `"` followed by ", " or end of line
            let mut from = 0;
            loop {
                match q[from..].find('"') {
                    Some(p) => {
                        let p = from + p;
                        let after = &q[p + 1..];
                        if after.is_empty() {
                            break (&q[..p], "");
                        }
                        if let Some(r) = after.strip_prefix(", ") {
                            break (&q[..p], r);
                        }
                        from = p + 1;
                    }
                    None => break (q, ""),
                }
            }
        } else {
            match v.find(", ") {
                Some(p) => (&v[..p], &v[p + 2..]),
                None => (v, ""),
            }
        };
        match context_key(key) {
            Some(k) => out.push(k, value),
            None => out.push(format!("nginx.{key}"), value),
        }
        s = rest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_line() {
        let line = r#"2024/01/02 03:04:05 [error] 1234#5678: *99 open() "/x" failed (2: No such file or directory), client: 2001:db8::1, server: _, request: "GET /x?a="b" HTTP/1.1", upstream: "http://127.0.0.1:8080/x", host: "h""#;
        let mut f = Fields::new();
        NginxErrorParser.parse(line, &mut f).unwrap();
        assert_eq!(f.get("nginx.connection_id"), Some("99"));
        assert_eq!(
            f.get("log.error.message"),
            Some(r#"open() "/x" failed (2: No such file or directory)"#)
        );
        assert_eq!(f.get("source.address"), Some("2001:db8::1"));
        assert_eq!(
            f.get("http.request.original"),
            Some(r#"GET /x?a="b" HTTP/1.1"#)
        );
        assert_eq!(f.get("url.domain"), Some("h"));
        assert_eq!(f.get("nginx.upstream"), Some("http://127.0.0.1:8080/x"));
    }

    #[test]
    fn errors() {
        let mut f = Fields::new();
        let e = NginxErrorParser
            .parse("2024/01/02 03:04:05 [error] x", &mut f)
            .unwrap_err();
        assert_eq!(e.to_string(), "expected pid#tid at byte 28 (pid#tid)");
    }
}
