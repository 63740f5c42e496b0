#![no_main]

use libfuzzer_sys::fuzz_target;
use redtail_parsers::timestamp::{normalize, TimestampFormat};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    for fmt in [
        TimestampFormat::Rfc3339,
        TimestampFormat::Clf,
        TimestampFormat::Rfc3164,
        TimestampFormat::NginxError,
        TimestampFormat::UnixSeconds,
        TimestampFormat::UnixMillis,
        TimestampFormat::Auto,
    ] {
        if let Some(out) = normalize(value, fmt) {
            assert_eq!(out.len(), 24, "{value:?} -> {out}");
        }
    }
});
