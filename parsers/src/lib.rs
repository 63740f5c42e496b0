//! Log line parsers for redtail.
//!
//! Each supported format has a [`Parser`] that turns one line (without its
//! trailing newline) into a list of [`Fields`] borrowed from the line. Parsers
//! are chosen from configuration with [`ParserSpec::from_config`] and built
//! with [`ParserSpec::build`] (once per worker thread).
//!
//! | name | module | format |
//! | --- | --- | --- |
//! | `raw` | [`raw`] | no fields, the caller keeps the line as `message` |
//! | `json` | [`json`] | one JSON object per line, nested objects flattened to dotted keys |
//! | `logfmt` | [`logfmt`] | `key=value key="quoted value" flag` |
//! | `syslog` | [`syslog`] | RFC 3164 (BSD, with or without PRI, ISO timestamp variant) and RFC 5424 |
//! | `nginx`, `apache` | [`access`] | combined and common access log formats |
//! | `nginx_error` | [`nginx_error`] | nginx `error.log` |
//! | `iptables` | [`iptables`] | netfilter `LOG` target lines (also `TRACE`) |
//! | `regex` | [`regex_parser`] | named capture groups of a user pattern |
//!
//! Field names follow ECS / OpenTelemetry conventions; each module documents
//! the fields it writes. All values are strings. The `message` field is never
//! written by a parser: the caller adds it. Timestamps are passed through as
//! raw text; [`timestamp::normalize`] converts them to RFC 3339 UTC.
//!
//! # Example
//!
//! ```
//! use redtail_parsers::{Fields, ParserSpec};
//!
//! let spec = ParserSpec::from_config("nginx", None).unwrap();
//! let mut parser = spec.build();
//! let line = r#"192.0.2.7 - - [10/Oct/2000:13:55:36 -0700] "GET /index.html HTTP/1.1" 200 2326 "-" "curl/8.5.0""#;
//! let mut fields = Fields::new();
//! parser.parse(line, &mut fields).unwrap();
//! assert_eq!(fields.get("http.request.method"), Some("GET"));
//! assert_eq!(fields.get("http.response.status_code"), Some("200"));
//! assert_eq!(fields.get("http.request.referrer"), None);
//!
//! // Errors carry the byte position where parsing failed.
//! fields.clear();
//! let err = parser.parse("192.0.2.7 - - [10/Oct/2000:13:55:36 -0700] GET", &mut fields).unwrap_err();
//! assert_eq!(err.to_string(), "expected '\"' at byte 43 (request line)");
//! ```
#![deny(missing_docs)]

pub mod access;
mod error;
mod fields;
pub mod iptables;
pub mod json;
pub mod logfmt;
pub mod nginx_error;
pub mod raw;
pub mod regex_parser;
mod scan;
pub mod syslog;
pub mod timestamp;

pub use error::{ParseError, ParseErrorKind};
pub use fields::Fields;
pub use timestamp::TimestampFormat;

/// A line parser. One instance is used by one thread at a time.
pub trait Parser: Send {
    /// Parses one record. `line` has no trailing `'\n'` (the caller already
    /// stripped one trailing `'\r'` too; a stray trailing `'\r'` is tolerated).
    /// Writes borrowed fields into `out` (the caller clears `out` between
    /// lines). The `message` field is added by the caller, never by parsers.
    fn parse<'a>(&mut self, line: &'a str, out: &mut Fields<'a>) -> Result<(), ParseError>;

    /// Name of the field holding the record's own timestamp, if the format has
    /// one (e.g. `"@timestamp"`, raw text), and its format, used for optional
    /// normalisation with [`timestamp::normalize`].
    fn timestamp_field(&self) -> Option<(&'static str, TimestampFormat)> {
        None
    }
}

/// Which parser to use, as chosen in configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParserSpec {
    /// [`raw::RawParser`].
    Raw,
    /// [`json::JsonParser`].
    Json,
    /// [`logfmt::LogfmtParser`].
    Logfmt,
    /// [`syslog::SyslogParser`].
    Syslog,
    /// [`access::AccessLogParser`] for nginx.
    Nginx,
    /// [`nginx_error::NginxErrorParser`].
    NginxError,
    /// [`access::AccessLogParser`] for Apache httpd.
    Apache,
    /// [`iptables::IptablesParser`].
    Iptables,
    /// [`regex_parser::RegexParser`] with this pattern (validated by `from_config`).
    Regex(String),
}

impl ParserSpec {
    /// The valid parser names, as accepted by [`ParserSpec::from_config`].
    pub const NAMES: &[&str] = &[
        "raw",
        "json",
        "logfmt",
        "syslog",
        "nginx",
        "nginx_error",
        "apache",
        "iptables",
        "regex",
    ];

    /// From config: `name` is one of [`ParserSpec::NAMES`]; `pattern` is
    /// required for `"regex"` and rejected for the others. The error is a
    /// one-line human message with a hint.
    pub fn from_config(name: &str, pattern: Option<&str>) -> Result<ParserSpec, String> {
        let spec = match name {
            "raw" => ParserSpec::Raw,
            "json" => ParserSpec::Json,
            "logfmt" => ParserSpec::Logfmt,
            "syslog" => ParserSpec::Syslog,
            "nginx" => ParserSpec::Nginx,
            "nginx_error" => ParserSpec::NginxError,
            "apache" => ParserSpec::Apache,
            "iptables" => ParserSpec::Iptables,
            "regex" => {
                let Some(pattern) = pattern else {
                    return Err(
                        "parser \"regex\" needs a pattern with named groups, e.g. pattern = '^(?P<level>[A-Z]+) (?P<text>.*)$'"
                            .to_string(),
                    );
                };
                regex_parser::RegexParser::new(pattern)?;
                return Ok(ParserSpec::Regex(pattern.to_string()));
            }
            _ => {
                return Err(format!(
                    "unknown parser {name:?}; valid parsers are: {}",
                    Self::NAMES.join(", ")
                ))
            }
        };
        if pattern.is_some() {
            return Err(format!(
                "parser {name:?} does not take a pattern (only \"regex\" does); remove the pattern"
            ));
        }
        Ok(spec)
    }

    /// Builds a parser. Cheap, except that a `regex` pattern is compiled here.
    ///
    /// # Panics
    /// If a `Regex` spec was constructed directly (not by `from_config`) with an
    /// invalid pattern.
    pub fn build(&self) -> Box<dyn Parser> {
        match self {
            ParserSpec::Raw => Box::new(raw::RawParser),
            ParserSpec::Json => Box::new(json::JsonParser::new()),
            ParserSpec::Logfmt => Box::new(logfmt::LogfmtParser),
            ParserSpec::Syslog => Box::new(syslog::SyslogParser),
            ParserSpec::Nginx | ParserSpec::Apache => Box::new(access::AccessLogParser),
            ParserSpec::NginxError => Box::new(nginx_error::NginxErrorParser),
            ParserSpec::Iptables => Box::new(iptables::IptablesParser),
            ParserSpec::Regex(p) => {
                Box::new(regex_parser::RegexParser::new(p).unwrap_or_else(|e| panic!("{e}")))
            }
        }
    }

    /// The configuration name of this parser.
    pub fn name(&self) -> &'static str {
        match self {
            ParserSpec::Raw => "raw",
            ParserSpec::Json => "json",
            ParserSpec::Logfmt => "logfmt",
            ParserSpec::Syslog => "syslog",
            ParserSpec::Nginx => "nginx",
            ParserSpec::NginxError => "nginx_error",
            ParserSpec::Apache => "apache",
            ParserSpec::Iptables => "iptables",
            ParserSpec::Regex(_) => "regex",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_config() {
        for name in ParserSpec::NAMES {
            if *name == "regex" {
                continue;
            }
            let spec = ParserSpec::from_config(name, None).unwrap();
            assert_eq!(spec.name(), *name);
            spec.build();
            assert!(ParserSpec::from_config(name, Some("(?P<a>x)")).is_err());
        }
        let e = ParserSpec::from_config("nope", None).unwrap_err();
        assert!(e.contains("raw, json, logfmt"), "{e}");
        assert!(ParserSpec::from_config("regex", None).is_err());
        let e = ParserSpec::from_config("regex", Some("(unclosed")).unwrap_err();
        assert!(!e.contains('\n') && e.contains("unclosed group"), "{e}");
        let e = ParserSpec::from_config("regex", Some("a(b)c")).unwrap_err();
        assert!(e.contains("named"), "{e}");
        let spec = ParserSpec::from_config("regex", Some("(?P<word>\\w+)")).unwrap();
        assert_eq!(spec, ParserSpec::Regex("(?P<word>\\w+)".into()));
        let mut p = spec.build();
        let mut f = Fields::new();
        p.parse("  hello", &mut f).unwrap();
        assert_eq!(f.get("word"), Some("hello"));
    }
}
