//! Property tests: no parser panics on arbitrary input; logfmt round-trips.

use proptest::prelude::*;
use redtail_parsers::timestamp::{normalize, TimestampFormat};
use redtail_parsers::{Fields, ParserSpec};

/// Strings built from fragments that are meaningful to some parser.
fn fragments() -> impl Strategy<Value = String> {
    let frag = prop_oneof![
        Just("\"".to_string()),
        Just("\\".to_string()),
        Just("=".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just("<".to_string()),
        Just(">".to_string()),
        Just(" ".to_string()),
        Just(":".to_string()),
        Just(", ".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just("-".to_string()),
        Just("#".to_string()),
        Just("*".to_string()),
        Just("/".to_string()),
        Just("\r".to_string()),
        Just("\0".to_string()),
        Just("\u{feff}".to_string()),
        Just("\\u00e9".to_string()),
        Just("\\ud83d".to_string()),
        Just("IN=".to_string()),
        Just("TRACE: raw:INPUT:rule:1 ".to_string()),
        Just("Oct 11 22:14:15 ".to_string()),
        Just("2024-01-02T03:04:05Z ".to_string()),
        Just("2024/01/02 03:04:05 [error] 1#2: ".to_string()),
        Just("<34>1 ".to_string()),
        Just("[10/Oct/2000:13:55:36 -0700] ".to_string()),
        Just("GET / HTTP/1.1".to_string()),
        Just(", client: ".to_string()),
        "[0-9]{1,4}",
        "[a-zA-Z@.]{1,6}",
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(frag, 0..48).prop_map(|v| v.concat())
}

fn input() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), fragments(), fragments(), fragments()]
}

fn no_panic(spec: &ParserSpec, line: &str) {
    let mut p = spec.build();
    let mut f = Fields::new();
    if p.parse(line, &mut f).is_err() {
        return;
    }
    // fields must be readable and serialisable
    let _ = f.to_json_object();
    if let Some((field, fmt)) = p.timestamp_field() {
        if let Some(v) = f.get(field) {
            let _ = normalize(v, fmt);
        }
    }
}

macro_rules! no_panic_tests {
    ($($name:ident => $spec:expr),* $(,)?) => {
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            $(
                #[test]
                fn $name(line in input()) {
                    no_panic(&$spec, &line);
                }
            )*
        }
    };
}

no_panic_tests! {
    raw_never_panics => ParserSpec::Raw,
    json_never_panics => ParserSpec::Json,
    logfmt_never_panics => ParserSpec::Logfmt,
    syslog_never_panics => ParserSpec::Syslog,
    nginx_never_panics => ParserSpec::Nginx,
    apache_never_panics => ParserSpec::Apache,
    nginx_error_never_panics => ParserSpec::NginxError,
    iptables_never_panics => ParserSpec::Iptables,
    regex_never_panics => ParserSpec::Regex(r#"(?P<a>\w+)=(?P<b>"[^"]*"|\S*)"#.into()),
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn raw_never_fails(line in input()) {
        let mut f = Fields::new();
        prop_assert!(ParserSpec::Raw.build().parse(&line, &mut f).is_ok());
        prop_assert!(f.is_empty());
    }

    #[test]
    fn normalize_never_panics(v in input()) {
        for fmt in [
            TimestampFormat::Rfc3339,
            TimestampFormat::Clf,
            TimestampFormat::Rfc3164,
            TimestampFormat::NginxError,
            TimestampFormat::UnixSeconds,
            TimestampFormat::UnixMillis,
            TimestampFormat::Auto,
        ] {
            if let Some(out) = normalize(&v, fmt) {
                prop_assert_eq!(out.len(), 24);
            }
        }
    }

    #[test]
    fn logfmt_round_trip(
        pairs in prop::collection::vec(("[a-zA-Z_][a-zA-Z0-9_./:-]{0,12}", any::<String>()), 1..8)
    ) {
        let line = pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", logfmt_value(v)))
            .collect::<Vec<_>>()
            .join(" ");
        let mut f = Fields::new();
        ParserSpec::Logfmt.build().parse(&line, &mut f).unwrap();
        let got: Vec<(String, String)> = f.iter().map(|(k, v)| (k.into(), v.into())).collect();
        prop_assert_eq!(got, pairs, "line: {:?}", line);
    }

    #[test]
    fn json_matches_serde_json_for_flat_objects(
        obj in prop::collection::btree_map("[a-z]{1,6}", any::<String>(), 0..6)
    ) {
        let line = serde_json::to_string(&obj).unwrap();
        let mut f = Fields::new();
        ParserSpec::Json.build().parse(&line, &mut f).unwrap();
        let got: std::collections::BTreeMap<String, String> =
            f.iter().map(|(k, v)| (k.into(), v.into())).collect();
        prop_assert_eq!(got, obj);
    }
}

/// A logfmt serialiser for the round-trip property.
fn logfmt_value(v: &str) -> String {
    let needs_quotes = v.is_empty()
        || v.chars()
            .any(|c| c == ' ' || c == '"' || c == '=' || c == '\\' || c.is_control());
    if !needs_quotes {
        return v.to_string();
    }
    let mut out = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
