//! Parse errors: cheap to create (no allocation), with the byte position of the failure.

use std::fmt;

/// What kind of problem made a line unparseable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ParseErrorKind {
    /// The line is empty (or only whitespace) and the format needs content.
    Empty,
    /// The line does not follow the format's syntax.
    Syntax,
    /// A quoted string was opened but never closed.
    UnterminatedQuote,
    /// A JSON line whose top-level value is not an object.
    NotAnObject,
    /// JSON nesting deeper than the parser accepts.
    TooDeep,
    /// The user's `regex` pattern did not match the line.
    NoMatch,
    /// The line is well-formed text but not of the expected kind (e.g. not a netfilter line).
    Unrecognized,
}

/// A failure to parse one line.
///
/// Creating one never allocates: the detail text is a `&'static str`.
/// `Display` gives a one-line human message such as
/// `expected '"' at byte 42 (request line)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseError {
    /// The kind of failure.
    pub kind: ParseErrorKind,
    /// Byte offset in the line where parsing failed, when known.
    pub at: Option<usize>,
    detail: &'static str,
    context: &'static str,
}

impl ParseError {
    /// A new error of `kind` with a short static description (e.g. `expected '"'`).
    pub const fn new(kind: ParseErrorKind, detail: &'static str) -> Self {
        ParseError {
            kind,
            at: None,
            detail,
            context: "",
        }
    }

    /// A [`ParseErrorKind::Syntax`] error at byte `at`.
    pub const fn syntax(detail: &'static str, at: usize) -> Self {
        Self::new(ParseErrorKind::Syntax, detail).at(at)
    }

    /// The error for an empty line.
    pub const fn empty() -> Self {
        Self::new(ParseErrorKind::Empty, "empty line")
    }

    /// Sets the byte position where parsing failed.
    pub const fn at(mut self, at: usize) -> Self {
        self.at = Some(at);
        self
    }

    /// Names the part of the record being parsed (shown in parentheses).
    pub const fn context(mut self, context: &'static str) -> Self {
        self.context = context;
        self
    }

    /// Shifts the position by `offset` bytes (for errors from a sub-slice of the line).
    pub const fn offset(mut self, offset: usize) -> Self {
        if let Some(at) = self.at {
            self.at = Some(at + offset);
        }
        self
    }

    /// The short description, without position or context.
    pub const fn detail(&self) -> &'static str {
        self.detail
    }

    /// The part of the record being parsed, or `""`.
    pub const fn part(&self) -> &'static str {
        self.context
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.detail)?;
        if let Some(at) = self.at {
            write!(f, " at byte {at}")?;
        }
        if !self.context.is_empty() {
            write!(f, " ({})", self.context)?;
        }
        Ok(())
    }
}

impl std::error::Error for ParseError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display() {
        let e = ParseError::syntax("expected '\"'", 42).context("request line");
        assert_eq!(e.to_string(), "expected '\"' at byte 42 (request line)");
        assert_eq!(ParseError::empty().to_string(), "empty line");
        assert_eq!(e.offset(3).at, Some(45));
    }
}
