//! `nginx` and `apache`: access logs in the combined or common format.
//!
//! ```text
//! $remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent"
//! %h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-agent}i"
//! ```
//!
//! The common format (no referrer and user agent) is detected automatically.
//! Anything after the user agent (nginx `"$http_x_forwarded_for"` and the
//! like) is ignored. The ident field (`%l`) is ignored.
//!
//! | field | content |
//! | --- | --- |
//! | `source.address` | client address (IPv4, IPv6 or host name) |
//! | `user.name` | authenticated user; omitted when `-` |
//! | `@timestamp` | time as written, e.g. `10/Oct/2000:13:55:36 -0700` ([`TimestampFormat::Clf`]) |
//! | `http.request.method` | request method |
//! | `url.original` | request target |
//! | `http.version` | protocol version without `HTTP/`, e.g. `1.1` |
//! | `http.request.original` | the whole request line, only when it is not `METHOD TARGET HTTP/x` (e.g. `-` or garbage) |
//! | `http.response.status_code` | status |
//! | `http.response.body.bytes` | body size; omitted when `-` |
//! | `http.request.referrer` | referrer; omitted when `-` |
//! | `user_agent.original` | user agent; omitted when `-` |
//!
//! In quoted fields `\"` and `\\` are unescaped (Apache escapes them so); other
//! escapes such as nginx's `\x22` are kept as written.

use crate::scan::{find_closing_quote, skip_ws, token_end, trim_cr, unescape_quotes};
use crate::{Fields, ParseError, ParseErrorKind, Parser, TimestampFormat};

/// The parser for nginx and Apache access logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct AccessLogParser;

fn quoted<'a>(
    line: &'a str,
    i: usize,
    ctx: &'static str,
) -> Result<(std::borrow::Cow<'a, str>, usize), ParseError> {
    let b = line.as_bytes();
    if b.get(i) != Some(&b'"') {
        return Err(ParseError::syntax("expected '\"'", i).context(ctx));
    }
    let (close, esc) = find_closing_quote(b, i + 1).ok_or(
        ParseError::new(
            ParseErrorKind::UnterminatedQuote,
            "unterminated quoted field",
        )
        .at(i)
        .context(ctx),
    )?;
    Ok((unescape_quotes(&line[i + 1..close], esc), close + 1))
}

fn expect_space(b: &[u8], i: usize, ctx: &'static str) -> Result<usize, ParseError> {
    if b.get(i) != Some(&b' ') {
        return Err(ParseError::syntax("expected ' '", i).context(ctx));
    }
    Ok(i + 1)
}

fn request<'a>(req: std::borrow::Cow<'a, str>, out: &mut Fields<'a>) {
    use std::borrow::Cow;
    let split = {
        let r = req.as_ref();
        let b = r.as_bytes();
        match (memchr::memchr(b' ', b), memchr::memrchr(b' ', b)) {
            (Some(m), Some(p))
                if m > 0
                    && b[..m]
                        .iter()
                        .all(|c| c.is_ascii_uppercase() || *c == b'-' || *c == b'_') =>
            {
                if m == p {
                    // HTTP/0.9 style "GET /"
                    (m + 1 < b.len()).then_some((m, None))
                } else if r[p + 1..].starts_with("HTTP/") && p > m + 1 {
                    Some((m, Some(p)))
                } else {
                    None
                }
            }
            _ => None,
        }
    };
    let Some((m, p)) = split else {
        out.push("http.request.original", req);
        return;
    };
    match req {
        Cow::Borrowed(r) => {
            out.push("http.request.method", &r[..m]);
            match p {
                Some(p) => {
                    out.push("url.original", &r[m + 1..p]);
                    out.push("http.version", &r[p + 6..]);
                }
                None => out.push("url.original", &r[m + 1..]),
            }
        }
        Cow::Owned(r) => {
            out.push("http.request.method", r[..m].to_string());
            match p {
                Some(p) => {
                    out.push("url.original", r[m + 1..p].to_string());
                    out.push("http.version", r[p + 6..].to_string());
                }
                None => out.push("url.original", r[m + 1..].to_string()),
            }
        }
    }
}

impl Parser for AccessLogParser {
    fn parse<'a>(&mut self, line: &'a str, out: &mut Fields<'a>) -> Result<(), ParseError> {
        let line = trim_cr(line);
        let b = line.as_bytes();
        if line.trim().is_empty() {
            return Err(ParseError::empty());
        }
        // remote address
        let mut i = token_end(b, 0);
        if i == 0 {
            return Err(ParseError::syntax("expected the client address", 0));
        }
        out.push("source.address", &line[..i]);
        // ident
        i = expect_space(b, i, "ident")?;
        i = token_end(b, i);
        // user: up to " [" (a user name may contain spaces)
        i = expect_space(b, i, "user")?;
        let user_start = i;
        let Some(n) = memchr::memmem::find(&b[i..], b" [") else {
            return Err(ParseError::syntax("expected '['", token_end(b, i)).context("time"));
        };
        i += n;
        let user = &line[user_start..i];
        if user != "-" && !user.is_empty() {
            out.push("user.name", user);
        }
        i += 2;
        let Some(n) = memchr::memchr(b']', &b[i..]) else {
            return Err(ParseError::syntax("expected ']'", b.len()).context("time"));
        };
        out.push("@timestamp", &line[i..i + n]);
        i = expect_space(b, i + n + 1, "request line")?;
        let (req, next) = quoted(line, i, "request line")?;
        request(req, out);
        i = expect_space(b, next, "status")?;
        let end = token_end(b, i);
        if end == i || !b[i..end].iter().all(u8::is_ascii_digit) {
            return Err(ParseError::syntax("expected a status code", i).context("status"));
        }
        out.push("http.response.status_code", &line[i..end]);
        i = expect_space(b, end, "body bytes")?;
        let end = token_end(b, i);
        let bytes = &line[i..end];
        if bytes != "-" {
            if bytes.is_empty() || !bytes.bytes().all(|c| c.is_ascii_digit()) {
                return Err(
                    ParseError::syntax("expected a byte count or '-'", i).context("body bytes")
                );
            }
            out.push("http.response.body.bytes", bytes);
        }
        i = skip_ws(b, end);
        if i == b.len() {
            return Ok(()); // common log format
        }
        let (referrer, next) = quoted(line, i, "referrer")?;
        if referrer != "-" {
            out.push("http.request.referrer", referrer);
        }
        i = expect_space(b, next, "user agent")?;
        let (ua, _) = quoted(line, i, "user agent")?;
        if ua != "-" {
            out.push("user_agent.original", ua);
        }
        Ok(())
    }

    fn timestamp_field(&self) -> Option<(&'static str, TimestampFormat)> {
        Some(("@timestamp", TimestampFormat::Clf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Fields<'_>, ParseError> {
        let mut f = Fields::new();
        AccessLogParser.parse(line, &mut f)?;
        Ok(f)
    }

    #[test]
    fn combined_escaped_quotes_ipv6() {
        let f = parse(r#"2001:db8::1 - bob [10/Oct/2000:13:55:36 -0700] "GET /a\"b?q=\x22 HTTP/1.1" 200 - "-" "Mozilla \"x\"" "10.0.0.1""#).unwrap();
        assert_eq!(f.get("source.address"), Some("2001:db8::1"));
        assert_eq!(f.get("user.name"), Some("bob"));
        assert_eq!(f.get("url.original"), Some(r#"/a"b?q=\x22"#));
        assert_eq!(f.get("http.version"), Some("1.1"));
        assert_eq!(f.get("http.response.body.bytes"), None);
        assert_eq!(f.get("http.request.referrer"), None);
        assert_eq!(f.get("user_agent.original"), Some("Mozilla \"x\""));
    }

    #[test]
    fn common_and_odd_requests() {
        let f = parse(r#"127.0.0.1 - - [10/Oct/2000:13:55:36 -0700] "-" 400 0"#).unwrap();
        assert_eq!(f.get("http.request.original"), Some("-"));
        assert_eq!(f.get("http.request.method"), None);
        assert_eq!(f.get("user.name"), None);
        let f = parse(
            "127.0.0.1 - - [10/Oct/2000:13:55:36 -0700] \"\\x16\\x03\\x01\" 400 157 \"-\" \"-\"\r",
        )
        .unwrap();
        assert_eq!(f.get("http.request.original"), Some("\\x16\\x03\\x01"));
        assert_eq!(f.get("user_agent.original"), None);
    }

    #[test]
    fn errors() {
        let e =
            parse(r#"1.2.3.4 - - [10/Oct/2000:13:55:36 -0700] "GET / HTTP/1.1 200 5"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unterminated quoted field at byte 41 (request line)"
        );
        let e = parse(r#"1.2.3.4 - - [10/Oct/2000:13:55:36 -0700] "GET / HTTP/1.1" abc 5"#)
            .unwrap_err();
        assert_eq!(e.to_string(), "expected a status code at byte 58 (status)");
    }
}
