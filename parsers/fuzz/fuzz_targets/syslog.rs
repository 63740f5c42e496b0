#![no_main]

use libfuzzer_sys::fuzz_target;
use redtail_parsers::timestamp::normalize;
use redtail_parsers::{Fields, ParserSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let mut parser = ParserSpec::Syslog.build();
    let mut fields = Fields::new();
    if parser.parse(line, &mut fields).is_ok() {
        let _ = fields.to_json_object();
        if let Some((name, fmt)) = parser.timestamp_field() {
            if let Some(v) = fields.get(name) {
                let _ = normalize(v, fmt);
            }
        }
    }
});
