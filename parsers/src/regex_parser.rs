//! `regex`: named capture groups of a user-supplied pattern.
//!
//! The pattern is searched for anywhere in the line (unanchored: use `^` and
//! `$` to anchor it). Every named group that participated in the match becomes
//! a field named after the group, with the matched text as value (groups that
//! did not participate are omitted; an empty match gives an empty value).
//! Unnamed groups are ignored. A line the pattern does not match is an error of
//! kind [`ParseErrorKind::NoMatch`]. A group named `timestamp` is reported by
//! [`Parser::timestamp_field`] (format [`TimestampFormat::Auto`]).
//!
//! The pattern is compiled once per [`RegexParser::new`]; matching reuses one
//! set of capture locations, so parsing a line allocates only for the fields.

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use regex::{CaptureLocations, Regex};

use crate::{Fields, ParseError, ParseErrorKind, Parser, TimestampFormat};

/// The `regex` parser.
#[derive(Debug)]
pub struct RegexParser {
    re: Regex,
    locs: CaptureLocations,
    names: Vec<(usize, &'static str)>,
    has_timestamp: bool,
}

/// Group names live as long as the process: each distinct name is leaked once.
fn intern(name: &str) -> &'static str {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut set = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(n) = set.get(name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    set.insert(leaked);
    leaked
}

/// The one-line core of a regex error (regex's own message is multi-line).
fn one_line(e: &regex::Error) -> String {
    let text = e.to_string();
    if let Some(line) = text.lines().find_map(|l| l.trim().strip_prefix("error: ")) {
        return line.to_string();
    }
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

impl RegexParser {
    /// Compiles `pattern`; it must contain at least one named capture group.
    pub fn new(pattern: &str) -> Result<Self, String> {
        let re = Regex::new(pattern)
            .map_err(|e| format!("invalid regex pattern {pattern:?}: {}", one_line(&e)))?;
        let names: Vec<(usize, &'static str)> = re
            .capture_names()
            .enumerate()
            .filter_map(|(i, n)| n.map(|n| (i, intern(n))))
            .collect();
        if names.is_empty() {
            return Err(format!(
                "regex pattern {pattern:?} has no named capture group; name the parts to keep, e.g. (?P<status>\\d+)"
            ));
        }
        let has_timestamp = names.iter().any(|(_, n)| *n == "timestamp");
        Ok(RegexParser {
            locs: re.capture_locations(),
            re,
            names,
            has_timestamp,
        })
    }
}

impl Parser for RegexParser {
    fn parse<'a>(&mut self, line: &'a str, out: &mut Fields<'a>) -> Result<(), ParseError> {
        if self.re.captures_read(&mut self.locs, line).is_none() {
            return Err(ParseError::new(
                ParseErrorKind::NoMatch,
                "line does not match the regex pattern",
            ));
        }
        for &(i, name) in &self.names {
            if let Some((s, e)) = self.locs.get(i) {
                out.push(name, &line[s..e]);
            }
        }
        Ok(())
    }

    fn timestamp_field(&self) -> Option<(&'static str, TimestampFormat)> {
        self.has_timestamp
            .then_some(("timestamp", TimestampFormat::Auto))
    }
}
