//! `syslog`: RFC 3164 (BSD) and RFC 5424 records.
//!
//! Accepted shapes:
//! * RFC 3164 with PRI: `<34>Oct 11 22:14:15 mymachine su[123]: msg`
//! * RFC 3164 as written to files, without PRI: `Oct 11 22:14:15 host prog[pid]: msg`
//! * the rsyslog ISO variant: `2024-01-02T03:04:05.123456+00:00 host prog[pid]: msg`
//! * RFC 5424: `<165>1 2003-10-11T22:14:15.003Z host app procid msgid [id@1 k="v"] msg`
//!
//! Fields (omitted when absent or the RFC 5424 nil value `-`):
//!
//! | field | content |
//! | --- | --- |
//! | `log.syslog.priority` | PRI number, e.g. `34` |
//! | `log.syslog.facility.code` | PRI / 8 |
//! | `log.syslog.severity.code` | PRI % 8 |
//! | `log.syslog.version` | RFC 5424 version (`1`) |
//! | `@timestamp` | the timestamp as written (normalise with [`TimestampFormat::Auto`]) |
//! | `host.hostname` | HOSTNAME |
//! | `process.name` | RFC 3164 tag program name / RFC 5424 APP-NAME |
//! | `process.pid` | RFC 3164 `[pid]` / RFC 5424 PROCID (may be non-numeric) |
//! | `log.syslog.msgid` | RFC 5424 MSGID |
//! | `log.syslog.structured_data.<SDID>.<param>` | each SD-PARAM, with `\"`, `\\`, `\]` unescaped |
//! | `log.syslog.msg` | the message part (a leading UTF-8 BOM is removed) |
//!
//! In RFC 3164 the host name is optional: when the word after the timestamp
//! looks like a tag (`prog:` or `prog[pid]:`) it is taken as the tag. A line
//! with PRI but no recognisable timestamp is accepted with the rest as
//! `log.syslog.msg`; a line with neither is an error.

use std::borrow::Cow;

use crate::scan::{find_closing_quote, skip_ws, token_end, trim_cr};
use crate::timestamp::month_from_abbr;
use crate::{Fields, ParseError, ParseErrorKind, Parser, TimestampFormat};

/// The `syslog` parser.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyslogParser;

const SMALL: [&str; 24] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    "17", "18", "19", "20", "21", "22", "23",
];

impl Parser for SyslogParser {
    fn parse<'a>(&mut self, line: &'a str, out: &mut Fields<'a>) -> Result<(), ParseError> {
        let line = trim_cr(line);
        if line.trim().is_empty() {
            return Err(ParseError::empty());
        }
        let b = line.as_bytes();
        let mut i = pri(line, out)?;
        let has_pri = i > 0;
        if has_pri {
            // RFC 5424: VERSION SP right after PRI.
            let v_end = i + b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
            if v_end > i && v_end - i <= 2 && b[i] != b'0' && b.get(v_end) == Some(&b' ') {
                out.push("log.syslog.version", &line[i..v_end]);
                return rfc5424(line, v_end + 1, out);
            }
        }
        i = bsd_header(line, i, has_pri, out)?;
        if i < b.len() {
            out.push("log.syslog.msg", &line[i..]);
        }
        Ok(())
    }

    fn timestamp_field(&self) -> Option<(&'static str, TimestampFormat)> {
        Some(("@timestamp", TimestampFormat::Auto))
    }
}

/// Parses `<PRI>` at the start of the line, if any; returns the index after it.
pub(crate) fn pri<'a>(line: &'a str, out: &mut Fields<'a>) -> Result<usize, ParseError> {
    let b = line.as_bytes();
    if b.first() != Some(&b'<') {
        return Ok(0);
    }
    let digits = b[1..]
        .iter()
        .take(4)
        .take_while(|c| c.is_ascii_digit())
        .count();
    if digits == 0 || digits > 3 || b.get(1 + digits) != Some(&b'>') {
        return Err(ParseError::syntax("invalid PRI, expected <0-191>", 1));
    }
    let n: usize = line[1..1 + digits].parse().unwrap_or(usize::MAX);
    if n > 191 {
        return Err(ParseError::syntax("PRI out of range 0-191", 1));
    }
    out.push("log.syslog.priority", &line[1..1 + digits]);
    out.push("log.syslog.facility.code", SMALL[n / 8]);
    out.push("log.syslog.severity.code", SMALL[n % 8]);
    Ok(digits + 2)
}

/// Length of a BSD timestamp (`Oct 11 22:14:15`, optionally with a fraction)
/// or an ISO one (`2024-01-02T03:04:05...`) at the start of `b`.
pub(crate) fn bsd_timestamp_len(b: &[u8]) -> Option<usize> {
    if b.len() >= 15
        && month_from_abbr(&b[..3]).is_some()
        && b[3] == b' '
        && b[6] == b' '
        && b[9] == b':'
        && b[12] == b':'
        && (b[4] == b' ' || b[4].is_ascii_digit())
        && [5, 7, 8, 10, 11, 13, 14]
            .iter()
            .all(|&k| b[k].is_ascii_digit())
    {
        let mut n = 15;
        if b.get(15) == Some(&b'.') {
            n += 1 + b[16..].iter().take_while(|c| c.is_ascii_digit()).count();
        }
        return Some(n);
    }
    if b.len() >= 10 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[7] == b'-' {
        return Some(token_end(b, 0));
    }
    None
}

/// Parses an RFC 3164 header (timestamp, optional host, optional tag) starting
/// at `i`; returns where the message starts.
pub(crate) fn bsd_header<'a>(
    line: &'a str,
    mut i: usize,
    has_pri: bool,
    out: &mut Fields<'a>,
) -> Result<usize, ParseError> {
    let b = line.as_bytes();
    let Some(ts_len) = bsd_timestamp_len(&b[i..]) else {
        if has_pri {
            return Ok(i);
        }
        return Err(ParseError::syntax("expected a timestamp", i).context("syslog header"));
    };
    out.push("@timestamp", &line[i..i + ts_len]);
    i += ts_len;
    if i < b.len() && b[i] != b' ' {
        return Err(ParseError::syntax("expected ' '", i).context("syslog header"));
    }
    i = skip_ws(b, i);
    if i == b.len() {
        return Ok(i);
    }
    if let Some(next) = tag(line, i, out) {
        return Ok(next);
    }
    let host_end = token_end(b, i);
    out.push("host.hostname", &line[i..host_end]);
    i = skip_ws(b, host_end);
    Ok(tag(line, i, out).unwrap_or(i))
}

/// Parses a tag `prog:` / `prog[pid]:` at `i`; returns where the message starts.
fn tag<'a>(line: &'a str, i: usize, out: &mut Fields<'a>) -> Option<usize> {
    let b = line.as_bytes();
    let mut j = i;
    while j < b.len() && !matches!(b[j], b' ' | b':' | b'[' | b']') {
        j += 1;
    }
    if j == i || j == b.len() {
        return None;
    }
    let name_end = j;
    let mut pid = None;
    if b[j] == b'[' {
        let close = j + memchr::memchr2(b']', b' ', &b[j..])?;
        if b[close] != b']' {
            return None;
        }
        pid = Some((j + 1, close));
        j = close + 1;
    }
    if b.get(j) != Some(&b':') {
        return None;
    }
    out.push("process.name", &line[i..name_end]);
    if let Some((s, e)) = pid {
        if e > s {
            out.push("process.pid", &line[s..e]);
        }
    }
    j += 1;
    if b.get(j) == Some(&b' ') {
        j += 1;
    }
    Some(j)
}

fn rfc5424<'a>(line: &'a str, mut i: usize, out: &mut Fields<'a>) -> Result<(), ParseError> {
    let b = line.as_bytes();
    for name in [
        "@timestamp",
        "host.hostname",
        "process.name",
        "process.pid",
        "log.syslog.msgid",
    ] {
        let end = token_end(b, i);
        if end == i {
            return Err(ParseError::syntax("expected a header field", i).context("RFC 5424 header"));
        }
        if &b[i..end] != b"-" {
            out.push(name, &line[i..end]);
        }
        if end == b.len() {
            return Err(
                ParseError::syntax("unexpected end of line", end).context("RFC 5424 header")
            );
        }
        i = end + 1;
    }
    match b.get(i) {
        Some(b'-') => i += 1,
        Some(b'[') => i = structured_data(line, i, out)?,
        _ => {
            return Err(
                ParseError::syntax("expected '[' or '-'", i).context("RFC 5424 structured data")
            )
        }
    }
    if i == b.len() {
        return Ok(());
    }
    if b[i] != b' ' {
        return Err(ParseError::syntax("expected ' '", i).context("RFC 5424 structured data"));
    }
    let msg = &line[i + 1..];
    let msg = msg.strip_prefix('\u{feff}').unwrap_or(msg);
    if !msg.is_empty() {
        out.push("log.syslog.msg", msg);
    }
    Ok(())
}

/// Parses one or more `[SDID param="value" ...]` elements; returns the index after them.
fn structured_data<'a>(
    line: &'a str,
    mut i: usize,
    out: &mut Fields<'a>,
) -> Result<usize, ParseError> {
    const CTX: &str = "RFC 5424 structured data";
    let b = line.as_bytes();
    while b.get(i) == Some(&b'[') {
        i += 1;
        let id_start = i;
        while i < b.len() && !matches!(b[i], b' ' | b']' | b'=' | b'"') {
            i += 1;
        }
        if i == id_start {
            return Err(ParseError::syntax("expected an SD-ID", i).context(CTX));
        }
        let sdid = &line[id_start..i];
        loop {
            match b.get(i) {
                Some(b']') => {
                    i += 1;
                    break;
                }
                Some(b' ') => i += 1,
                None => {
                    return Err(
                        ParseError::new(ParseErrorKind::UnterminatedQuote, "expected ']'")
                            .at(i)
                            .context(CTX),
                    )
                }
                _ => return Err(ParseError::syntax("expected ' ' or ']'", i).context(CTX)),
            }
            if b.get(i) == Some(&b']') {
                continue;
            }
            let name_start = i;
            while i < b.len() && !matches!(b[i], b' ' | b']' | b'=' | b'"') {
                i += 1;
            }
            if i == name_start {
                return Err(ParseError::syntax("expected a parameter name", i).context(CTX));
            }
            let param = &line[name_start..i];
            if b.get(i) != Some(&b'=') {
                return Err(ParseError::syntax("expected '='", i).context(CTX));
            }
            i += 1;
            if b.get(i) != Some(&b'"') {
                return Err(ParseError::syntax("expected '\"'", i).context(CTX));
            }
            let (close, escaped) = find_closing_quote(b, i + 1).ok_or(
                ParseError::new(
                    ParseErrorKind::UnterminatedQuote,
                    "unterminated parameter value",
                )
                .at(i)
                .context(CTX),
            )?;
            let raw = &line[i + 1..close];
            let value = if escaped {
                Cow::Owned(unescape_sd(raw))
            } else {
                Cow::Borrowed(raw)
            };
            out.push(format!("log.syslog.structured_data.{sdid}.{param}"), value);
            i = close + 1;
        }
    }
    Ok(i)
}

fn unescape_sd(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n @ ('"' | '\\' | ']')) => out.push(n),
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Vec<(String, String)>, ParseError> {
        let mut f = Fields::new();
        SyslogParser.parse(line, &mut f)?;
        Ok(f.iter().map(|(k, v)| (k.into(), v.into())).collect())
    }

    fn get(f: &[(String, String)], k: &str) -> Option<String> {
        f.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn rfc3164() {
        let f = parse("<34>Oct 11 22:14:15 mymachine su[123]: 'su root' failed\r").unwrap();
        assert_eq!(get(&f, "log.syslog.facility.code").unwrap(), "4");
        assert_eq!(get(&f, "log.syslog.severity.code").unwrap(), "2");
        assert_eq!(get(&f, "host.hostname").unwrap(), "mymachine");
        assert_eq!(get(&f, "process.pid").unwrap(), "123");
        assert_eq!(get(&f, "log.syslog.msg").unwrap(), "'su root' failed");
        let f = parse("Jan  2 03:04:05 kernel: boot").unwrap();
        assert_eq!(get(&f, "host.hostname"), None);
        assert_eq!(get(&f, "process.name").unwrap(), "kernel");
    }

    #[test]
    fn rfc5424_sd_escapes_and_bom() {
        let f = parse(
            "<165>1 2003-10-11T22:14:15.003Z host app - ID47 [a@1 x=\"q\\\"b\\\\s\\]e\\n\" y=\"\"][b@2 z=\"1\"] \u{feff}hi",
        )
        .unwrap();
        assert_eq!(
            get(&f, "log.syslog.structured_data.a@1.x").unwrap(),
            "q\"b\\s]e\\n"
        );
        assert_eq!(get(&f, "log.syslog.structured_data.a@1.y").unwrap(), "");
        assert_eq!(get(&f, "log.syslog.structured_data.b@2.z").unwrap(), "1");
        assert_eq!(get(&f, "process.pid"), None);
        assert_eq!(get(&f, "log.syslog.msg").unwrap(), "hi");
        let e = parse("<165>1 2003-10-11T22:14:15.003Z host app - ID47 [a@1 x=\"q").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unterminated parameter value at byte 55 (RFC 5424 structured data)"
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            parse("<999>x").unwrap_err().to_string(),
            "PRI out of range 0-191 at byte 1"
        );
        assert_eq!(
            parse("hello world").unwrap_err().to_string(),
            "expected a timestamp at byte 0 (syslog header)"
        );
        assert_eq!(parse("").unwrap_err().kind, ParseErrorKind::Empty);
        // multi-byte characters where digits are expected must not panic
        assert!(parse("Oct 11 22:14:1\u{e9} host x: y").is_err());
        assert!(parse("2024-01-02T03:04:0\u{e9} host x: y").is_ok());
    }
}
