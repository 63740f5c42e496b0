//! `json`: one JSON object per line, flattened.
//!
//! * The line must hold exactly one JSON object (surrounding whitespace and a
//!   leading UTF-8 BOM are ignored); any other top-level value is an error of
//!   kind [`ParseErrorKind::NotAnObject`], invalid JSON is a
//!   [`ParseErrorKind::Syntax`] error with the byte position.
//! * Nested objects are flattened with dotted keys: `{"a":{"b":1}}` gives
//!   `a.b` = `1`. An empty nested object gives its key with the value `{}`.
//! * Strings are unescaped (`\uXXXX` included; a lone surrogate becomes U+FFFD).
//! * Numbers, `true` and `false` keep their JSON text (`1.50e3` stays `1.50e3`).
//! * `null` becomes the empty string.
//! * Arrays are kept as their compact JSON text: whitespace outside strings is
//!   removed, everything else (including string escapes) is kept as written.
//! * Duplicate keys are all kept, in order (in [`Fields::to_json_object`] the
//!   last one wins).
//! * Nesting deeper than 128 levels is an error ([`ParseErrorKind::TooDeep`]).
//!
//! [`Parser::timestamp_field`] reports `@timestamp` with
//! [`TimestampFormat::Auto`]. Keys and values borrow from the line unless they
//! had escapes or are dotted keys.

use std::borrow::Cow;

use crate::{Fields, ParseError, ParseErrorKind, Parser, TimestampFormat};

const MAX_DEPTH: usize = 128;

/// The `json` parser.
#[derive(Debug, Clone, Default)]
pub struct JsonParser;

impl JsonParser {
    /// A new JSON parser.
    pub fn new() -> Self {
        JsonParser
    }
}

impl Parser for JsonParser {
    fn parse<'a>(&mut self, line: &'a str, out: &mut Fields<'a>) -> Result<(), ParseError> {
        let mut sc = Scanner {
            s: line,
            b: line.as_bytes(),
            i: 0,
        };
        if line.starts_with('\u{feff}') {
            sc.i = 3;
        }
        sc.ws();
        match sc.peek() {
            None => Err(ParseError::empty()),
            Some(b'{') => {
                sc.object(None, 0, out)?;
                sc.ws();
                if sc.i != sc.b.len() {
                    return Err(sc.err("unexpected characters after the JSON object"));
                }
                Ok(())
            }
            Some(_) => {
                Err(ParseError::new(ParseErrorKind::NotAnObject, "expected a JSON object").at(sc.i))
            }
        }
    }

    fn timestamp_field(&self) -> Option<(&'static str, TimestampFormat)> {
        Some(("@timestamp", TimestampFormat::Auto))
    }
}

struct Scanner<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn err(&self, detail: &'static str) -> ParseError {
        ParseError::syntax(detail, self.i)
    }

    fn expect(&mut self, c: u8, detail: &'static str) -> Result<(), ParseError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(detail))
        }
    }

    /// Parses an object at `self.i` (on `{`), pushing its members under
    /// `prefix`. Returns the number of fields pushed.
    fn object(
        &mut self,
        prefix: Option<&str>,
        depth: usize,
        out: &mut Fields<'a>,
    ) -> Result<usize, ParseError> {
        if depth >= MAX_DEPTH {
            return Err(
                ParseError::new(ParseErrorKind::TooDeep, "JSON nested too deeply").at(self.i),
            );
        }
        let before = out.len();
        self.i += 1;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(0);
        }
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.err("expected '\"' (object key)"));
            }
            let key = self.string()?;
            let key: Cow<'a, str> = match prefix {
                None => key,
                Some(p) => Cow::Owned(format!("{p}.{key}")),
            };
            self.ws();
            self.expect(b':', "expected ':'")?;
            self.ws();
            match self.peek() {
                Some(b'{') => {
                    if self.object(Some(&key), depth + 1, out)? == 0 {
                        out.push(key, "{}");
                    }
                }
                Some(b'[') => {
                    let start = self.i;
                    self.skip_value(depth)?;
                    out.push(key, compact(&self.s[start..self.i]));
                }
                Some(b'"') => {
                    let v = self.string()?;
                    out.push(key, v);
                }
                _ => {
                    let v = self.scalar()?;
                    out.push(key, v);
                }
            }
            self.ws();
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    self.ws();
                }
                Some(b'}') => {
                    self.i += 1;
                    return Ok(out.len() - before);
                }
                _ => return Err(self.err("expected ',' or '}'")),
            }
        }
    }

    /// A number or literal; returns its text (`null` → "").
    fn scalar(&mut self) -> Result<&'a str, ParseError> {
        let start = self.i;
        for (lit, val) in [("true", "true"), ("false", "false"), ("null", "")] {
            if self.b[self.i..].starts_with(lit.as_bytes()) {
                self.i += lit.len();
                return Ok(val);
            }
        }
        self.number()?;
        Ok(&self.s[start..self.i])
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<(), ParseError> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("expected a JSON value")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(self.err("expected a digit"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("expected a digit"));
            }
        }
        Ok(())
    }

    /// Validates a string at `self.i` (on `"`); returns the index of the
    /// closing quote and whether it contains escapes. Leaves `self.i` after it.
    fn scan_string(&mut self) -> Result<(usize, bool), ParseError> {
        self.i += 1;
        let mut escaped = false;
        loop {
            let rest = &self.b[self.i..];
            let Some(n) = memchr::memchr2(b'"', b'\\', rest) else {
                self.i = self.b.len();
                return Err(ParseError::new(
                    ParseErrorKind::UnterminatedQuote,
                    "unterminated string",
                )
                .at(self.i));
            };
            if let Some(c) = rest[..n].iter().position(|&c| c < 0x20) {
                self.i += c;
                return Err(self.err("control character in string"));
            }
            self.i += n;
            if self.b[self.i] == b'"' {
                let end = self.i;
                self.i += 1;
                return Ok((end, escaped));
            }
            escaped = true;
            match self.b.get(self.i + 1) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 2,
                Some(b'u') => {
                    let hex = self.b.get(self.i + 2..self.i + 6);
                    if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                        return Err(self.err("invalid \\u escape"));
                    }
                    self.i += 6;
                }
                _ => return Err(self.err("invalid escape in string")),
            }
        }
    }

    fn string(&mut self) -> Result<Cow<'a, str>, ParseError> {
        let start = self.i + 1;
        let (end, escaped) = self.scan_string()?;
        let raw = &self.s[start..end];
        if !escaped {
            return Ok(Cow::Borrowed(raw));
        }
        Ok(Cow::Owned(unescape(raw)))
    }

    /// Skips (and validates) any value.
    fn skip_value(&mut self, depth: usize) -> Result<(), ParseError> {
        if depth >= MAX_DEPTH {
            return Err(
                ParseError::new(ParseErrorKind::TooDeep, "JSON nested too deeply").at(self.i),
            );
        }
        match self.peek() {
            Some(b'"') => self.scan_string().map(drop),
            Some(open @ (b'[' | b'{')) => {
                let close = if open == b'[' { b']' } else { b'}' };
                self.i += 1;
                self.ws();
                if self.peek() == Some(close) {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    if open == b'{' {
                        if self.peek() != Some(b'"') {
                            return Err(self.err("expected '\"' (object key)"));
                        }
                        self.scan_string()?;
                        self.ws();
                        self.expect(b':', "expected ':'")?;
                        self.ws();
                    }
                    self.skip_value(depth + 1)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => {
                            self.i += 1;
                            self.ws();
                        }
                        Some(c) if c == close => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ if open == b'[' => return Err(self.err("expected ',' or ']'")),
                        _ => return Err(self.err("expected ',' or '}'")),
                    }
                }
            }
            _ => self.scalar().map(drop),
        }
    }
}

fn hex4(b: &[u8]) -> u32 {
    b.iter()
        .fold(0, |n, &c| n * 16 + (c as char).to_digit(16).unwrap_or(0))
}

/// Unescapes a validated JSON string body.
fn unescape(raw: &str) -> String {
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while let Some(n) = memchr::memchr(b'\\', &b[i..]) {
        out.push_str(&raw[i..i + n]);
        i += n;
        let c = b[i + 1];
        i += 2;
        match c {
            b'b' => out.push('\u{8}'),
            b'f' => out.push('\u{c}'),
            b'n' => out.push('\n'),
            b'r' => out.push('\r'),
            b't' => out.push('\t'),
            b'u' => {
                let hi = hex4(&b[i..i + 4]);
                i += 4;
                let cp = if (0xD800..0xDC00).contains(&hi)
                    && b.get(i..i + 2) == Some(b"\\u")
                    && b.get(i + 2..i + 6)
                        .is_some_and(|h| (0xDC00..0xE000).contains(&hex4(h)))
                {
                    let lo = hex4(&b[i + 2..i + 6]);
                    i += 6;
                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                } else {
                    hi
                };
                out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
            }
            other => out.push(other as char),
        }
    }
    out.push_str(&raw[i..]);
    out
}

/// Removes JSON whitespace outside strings (borrowing when there is none).
fn compact(raw: &str) -> Cow<'_, str> {
    let b = raw.as_bytes();
    let mut in_str = false;
    let mut esc = false;
    let mut first_ws = None;
    for (i, &c) in b.iter().enumerate() {
        if in_str {
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
        } else if c == b'"' {
            in_str = true;
        } else if matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
            first_ws = Some(i);
            break;
        }
    }
    let Some(start) = first_ws else {
        return Cow::Borrowed(raw);
    };
    let mut out = Vec::with_capacity(raw.len());
    out.extend_from_slice(&b[..start]);
    for &c in &b[start..] {
        if in_str {
            out.push(c);
            if esc {
                esc = false;
            } else if c == b'\\' {
                esc = true;
            } else if c == b'"' {
                in_str = false;
            }
        } else if !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
            if c == b'"' {
                in_str = true;
            }
            out.push(c);
        }
    }
    // Only ASCII whitespace was removed from valid UTF-8.
    Cow::Owned(String::from_utf8(out).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Vec<(String, String)>, ParseError> {
        let mut f = Fields::new();
        JsonParser.parse(line, &mut f)?;
        Ok(f.iter().map(|(k, v)| (k.into(), v.into())).collect())
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn flatten() {
        assert_eq!(
            parse(r#"{"a":{"b":1,"c":{"d":"x"}},"e":[1, {"f" : "g h"}],"n":null,"t":true,"o":{}}"#)
                .unwrap(),
            kv(&[
                ("a.b", "1"),
                ("a.c.d", "x"),
                ("e", r#"[1,{"f":"g h"}]"#),
                ("n", ""),
                ("t", "true"),
                ("o", "{}")
            ])
        );
    }

    #[test]
    fn escapes_bom_crlf() {
        assert_eq!(
            parse("\u{feff}{\"k\\n\":\"a\\\"b\\u00e9\\ud83d\\ude00\\ud800x\"}\r").unwrap(),
            kv(&[("k\n", "a\"bé😀\u{fffd}x")])
        );
        assert_eq!(
            parse("{\"a\":\"x\u{0}y\"}").unwrap_err().to_string(),
            "control character in string at byte 7"
        );
        assert_eq!(parse(r#"{"a":"x\u0000y"}"#).unwrap(), kv(&[("a", "x\0y")]));
    }

    #[test]
    fn errors() {
        assert_eq!(parse("").unwrap_err().kind, ParseErrorKind::Empty);
        assert_eq!(parse("[1]").unwrap_err().kind, ParseErrorKind::NotAnObject);
        assert_eq!(
            parse("{\"a\":1").unwrap_err().to_string(),
            "expected ',' or '}' at byte 6"
        );
        assert_eq!(
            parse("{\"a\":01}").unwrap_err().to_string(),
            "expected ',' or '}' at byte 6"
        );
        assert_eq!(
            parse("{\"a\":1} x").unwrap_err().to_string(),
            "unexpected characters after the JSON object at byte 8"
        );
        assert_eq!(
            parse("{\"a\":\"x}").unwrap_err().kind,
            ParseErrorKind::UnterminatedQuote
        );
        assert_eq!(
            parse("{\"a\":tru}").unwrap_err().to_string(),
            "expected a JSON value at byte 5"
        );
        assert_eq!(
            parse("{\"a\":[1,]}").unwrap_err().to_string(),
            "expected a JSON value at byte 8"
        );
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(500), "]".repeat(500));
        assert_eq!(parse(&deep).unwrap_err().kind, ParseErrorKind::TooDeep);
    }
}
