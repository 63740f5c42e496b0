//! Small byte-scanning helpers shared by the parsers.

use std::borrow::Cow;

/// Strips one stray trailing `'\r'`.
#[inline]
pub(crate) fn trim_cr(line: &str) -> &str {
    line.strip_suffix('\r').unwrap_or(line)
}

/// Given `b[start]` just after an opening `"`, returns the index of the closing
/// `"` (one not preceded by a backslash escape) and whether any backslash was seen.
#[inline]
pub(crate) fn find_closing_quote(b: &[u8], start: usize) -> Option<(usize, bool)> {
    let mut i = start;
    let mut escaped = false;
    while i < b.len() {
        let j = i + memchr::memchr2(b'"', b'\\', &b[i..])?;
        if b[j] == b'"' {
            return Some((j, escaped));
        }
        escaped = true;
        i = j + 2;
    }
    None
}

/// Replaces `\"` with `"` and `\\` with `\`; any other backslash is kept verbatim.
pub(crate) fn unescape_quotes(s: &str, has_escape: bool) -> Cow<'_, str> {
    if !has_escape {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(n @ ('"' | '\\')) => out.push(n),
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
    Cow::Owned(out)
}

/// Index of the first byte at or after `i` that is not a space or tab.
#[inline]
pub(crate) fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
        i += 1;
    }
    i
}

/// Index of the first space at or after `i`, or `b.len()`.
#[inline]
pub(crate) fn token_end(b: &[u8], i: usize) -> usize {
    memchr::memchr(b' ', &b[i..]).map_or(b.len(), |n| i + n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes() {
        assert_eq!(find_closing_quote(br#"ab\"c" x"#, 0), Some((5, true)));
        assert_eq!(find_closing_quote(br#"abc"#, 0), None);
        assert_eq!(find_closing_quote(br#"ab\\"#, 0), None);
        assert_eq!(find_closing_quote(br#"\"#, 0), None);
        assert_eq!(unescape_quotes(r#"a\"b\\c\x22"#, true), r#"a"b\c\x22"#);
    }
}
