//! `raw`: the line is kept as is.
//!
//! Writes no fields at all: the caller stores the line as `message`. Never
//! fails, not even on an empty line.

use crate::{Fields, ParseError, Parser};

/// The `raw` parser.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawParser;

impl Parser for RawParser {
    fn parse<'a>(&mut self, _line: &'a str, _out: &mut Fields<'a>) -> Result<(), ParseError> {
        Ok(())
    }
}
