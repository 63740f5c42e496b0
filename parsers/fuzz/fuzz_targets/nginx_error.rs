#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use redtail_parsers::timestamp::normalize;
use redtail_parsers::{Fields, Parser, ParserSpec};

thread_local! {
    static PARSER: RefCell<Box<dyn Parser>> = RefCell::new(ParserSpec::NginxError.build());
}

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    PARSER.with_borrow_mut(|parser| check(parser.as_mut(), line));
});

fn check(parser: &mut dyn Parser, line: &str) {
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
