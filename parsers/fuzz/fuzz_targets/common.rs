//! What every parser target does, once: build the parser once per thread, feed it the
//! input when it is UTF-8 (the agent dead-letters the rest before parsing), and exercise
//! what runs after a successful parse (the JSON view, timestamp normalisation).

use redtail_parsers::timestamp::normalize;
use redtail_parsers::{Fields, Parser};

/// Parses `line`; panics only if the parser or what follows it does.
pub fn check(parser: &mut dyn Parser, line: &str) {
    let mut fields = Fields::new();
    if parser.parse(line, &mut fields).is_ok() {
        let _ = fields.to_json_object();
        if let Some((name, fmt)) = parser.timestamp_field() {
            if let Some(v) = fields.get(name) {
                let _ = normalize(v, fmt);
            }
        }
    }
}

/// `parser_target!(expr)`: a fuzz target for the parser `expr: ParserSpec` builds.
#[macro_export]
macro_rules! parser_target {
    ($spec:expr) => {
        thread_local! {
            static PARSER: std::cell::RefCell<Box<dyn redtail_parsers::Parser>> =
                std::cell::RefCell::new($spec.build());
        }
        libfuzzer_sys::fuzz_target!(|data: &[u8]| {
            let Ok(line) = std::str::from_utf8(data) else {
                return;
            };
            PARSER.with_borrow_mut(|parser| common::check(parser.as_mut(), line));
        });
    };
}
