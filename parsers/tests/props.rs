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
        (0u32..100_000).prop_map(|n| n.to_string()),
        prop::sample::select(&["a", "Oct", "host", "k", "x@1", "SRC", "HTTP", "e"][..])
            .prop_map(String::from),
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(frag, 0..24).prop_map(|v| v.concat())
}

fn input() -> impl Strategy<Value = String> {
    let chars = prop::collection::vec(any::<char>(), 0..64).prop_map(String::from_iter);
    prop_oneof![chars, fragments(), fragments(), fragments()]
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

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,3}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Reference flattening, written against serde_json's data model.
fn flatten(
    prefix: Option<&str>,
    map: &serde_json::Map<String, serde_json::Value>,
    out: &mut Vec<(String, String)>,
) {
    use serde_json::Value;
    for (k, v) in map {
        let key = prefix.map_or_else(|| k.clone(), |p| format!("{p}.{k}"));
        match v {
            Value::Object(m) if m.is_empty() => out.push((key, "{}".into())),
            Value::Object(m) => flatten(Some(&key), m, out),
            Value::String(s) => out.push((key, s.clone())),
            Value::Null => out.push((key, String::new())),
            other => out.push((key, other.to_string())),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn json_flattening_matches_reference(
        map in prop::collection::btree_map("[a-z]{1,3}", json_value(), 0..5)
    ) {
        let map: serde_json::Map<String, serde_json::Value> = map.into_iter().collect();
        let pretty = serde_json::to_string_pretty(&map).unwrap().replace('\n', " ");
        let mut want = Vec::new();
        flatten(None, &map, &mut want);
        for line in [serde_json::to_string(&map).unwrap(), pretty] {
            let mut f = Fields::new();
            ParserSpec::Json.build().parse(&line, &mut f).unwrap();
            let got: Vec<(String, String)> = f.iter().map(|(k, v)| (k.into(), v.into())).collect();
            prop_assert_eq!(&got, &want, "line: {}", line);
        }
    }

    #[test]
    fn json_validity_agrees_with_serde_json(line in fragments()) {
        // Documented differences: a BOM is skipped, lone surrogates become U+FFFD.
        let line = line.replace('\u{feff}', "").replace("\\ud83d", "");
        prop_assume!(!line.to_ascii_lowercase().contains("\\ud"));
        let mut f = Fields::new();
        let ours = ParserSpec::Json.build().parse(&line, &mut f).is_ok();
        let theirs = matches!(
            serde_json::from_str::<serde_json::Value>(&line),
            Ok(serde_json::Value::Object(_))
        );
        prop_assert_eq!(ours, theirs, "line: {:?}", line);
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
