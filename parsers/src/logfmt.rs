//! `logfmt`: `key=value key="quoted \" value" flag`.
//!
//! * Pairs are separated by spaces or tabs; each key becomes a field of that
//!   name.
//! * A value runs to the next space; `key=` gives an empty value.
//! * A quoted value may contain spaces; inside it `\"`, `\\`, `\n`, `\r` and
//!   `\t` are unescaped, any other backslash is kept verbatim. A quoted value
//!   must be followed by a space or the end of the line.
//! * A bare key (no `=`) gives the value `true`.
//! * Errors: an unterminated quote ([`ParseErrorKind::UnterminatedQuote`], at
//!   the opening quote), an empty key (`=x`), a `"` inside a key, and an
//!   empty line ([`ParseErrorKind::Empty`]).

use std::borrow::Cow;

use crate::scan::{skip_ws, trim_cr};
use crate::{Fields, ParseError, ParseErrorKind, Parser};

/// The `logfmt` parser.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogfmtParser;

impl Parser for LogfmtParser {
    fn parse<'a>(&mut self, line: &'a str, out: &mut Fields<'a>) -> Result<(), ParseError> {
        let line = trim_cr(line);
        let b = line.as_bytes();
        let mut i = skip_ws(b, 0);
        if i == b.len() {
            return Err(ParseError::empty());
        }
        while i < b.len() {
            let kstart = i;
            while i < b.len() && !matches!(b[i], b'=' | b' ' | b'\t' | b'"') {
                i += 1;
            }
            if i < b.len() && b[i] == b'"' {
                return Err(ParseError::syntax("unexpected '\"' in key", i));
            }
            if i == kstart {
                return Err(ParseError::syntax("empty key", i));
            }
            let key = &line[kstart..i];
            if i == b.len() || b[i] != b'=' {
                out.push(key, "true");
                i = skip_ws(b, i);
                continue;
            }
            i += 1; // '='
            if i < b.len() && b[i] == b'"' {
                let open = i;
                let (close, escaped) = crate::scan::find_closing_quote(b, i + 1).ok_or(
                    ParseError::new(
                        ParseErrorKind::UnterminatedQuote,
                        "unterminated quoted value",
                    )
                    .at(open),
                )?;
                let raw = &line[open + 1..close];
                out.push(
                    key,
                    if escaped {
                        unescape(raw)
                    } else {
                        Cow::Borrowed(raw)
                    },
                );
                i = close + 1;
                if i < b.len() && !matches!(b[i], b' ' | b'\t') {
                    return Err(ParseError::syntax(
                        "expected a space after the quoted value",
                        i,
                    ));
                }
            } else {
                let vstart = i;
                while i < b.len() && !matches!(b[i], b' ' | b'\t') {
                    i += 1;
                }
                out.push(key, &line[vstart..i]);
            }
            i = skip_ws(b, i);
        }
        Ok(())
    }
}

fn unescape(raw: &str) -> Cow<'_, str> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('t') => out.push('\t'),
            Some(c @ ('"' | '\\')) => out.push(c),
            Some(c) => {
                out.push('\\');
                out.push(c);
            }
            None => out.push('\\'),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Vec<(String, String)>, ParseError> {
        let mut f = Fields::new();
        LogfmtParser.parse(line, &mut f)?;
        Ok(f.iter().map(|(k, v)| (k.into(), v.into())).collect())
    }

    #[test]
    fn basics() {
        let f =
            parse("level=info msg=\"hello \\\"world\\\"\\n\" flag  empty= path=/a=b\r").unwrap();
        let want = [
            ("level", "info"),
            ("msg", "hello \"world\"\n"),
            ("flag", "true"),
            ("empty", ""),
            ("path", "/a=b"),
        ];
        assert_eq!(f, want.map(|(k, v)| (k.to_string(), v.to_string())));
        assert_eq!(parse("a=\"x\0y\"").unwrap()[0].1, "x\0y");
    }

    #[test]
    fn errors() {
        let e = parse("a=1 msg=\"oops").unwrap_err();
        assert_eq!(e.kind, ParseErrorKind::UnterminatedQuote);
        assert_eq!(e.to_string(), "unterminated quoted value at byte 8");
        assert_eq!(
            parse("a=\"x\"y").unwrap_err().to_string(),
            "expected a space after the quoted value at byte 5"
        );
        assert_eq!(parse("=x").unwrap_err().to_string(), "empty key at byte 0");
        assert_eq!(parse("   ").unwrap_err().kind, ParseErrorKind::Empty);
    }
}
