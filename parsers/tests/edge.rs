//! Cross-parser edge cases: huge lines, NULs, stray CR, BOMs.

use redtail_parsers::{Fields, ParseErrorKind, ParserSpec};

fn all_specs() -> Vec<ParserSpec> {
    ParserSpec::NAMES
        .iter()
        .map(|n| {
            let pat = (*n == "regex").then_some("(?P<word>[a-z]+)");
            ParserSpec::from_config(n, pat).unwrap()
        })
        .collect()
}

const MIB: usize = 1 << 20;

#[test]
fn one_mib_lines_do_not_panic_or_blow_up() {
    let big = "a".repeat(MIB);
    let quotes = "\"\\".repeat(MIB / 2);
    let pairs = "k=v ".repeat(MIB / 4);
    let brackets = "[".repeat(MIB);
    let colons = ", x: \"".repeat(MIB / 6);
    let inputs = [big.as_str(), &quotes, &pairs, &brackets, &colons];
    for spec in all_specs() {
        let mut p = spec.build();
        for input in inputs {
            let mut f = Fields::new();
            let _ = p.parse(input, &mut f);
        }
    }
}

#[test]
fn one_mib_valid_lines() {
    let big = "x".repeat(MIB);
    let mut f = Fields::new();

    let line = format!(r#"{{"msg":"{big}","n":1}}"#);
    ParserSpec::Json.build().parse(&line, &mut f).unwrap();
    assert_eq!(f.get("msg").map(str::len), Some(MIB));

    f.clear();
    let line = format!("a=1 msg=\"{big}\" b=2");
    ParserSpec::Logfmt.build().parse(&line, &mut f).unwrap();
    assert_eq!(f.get("b"), Some("2"));

    f.clear();
    let line =
        format!(r#"1.2.3.4 - - [02/Jan/2024:03:04:05 +0000] "GET /{big} HTTP/1.1" 200 1 "-" "ua""#);
    ParserSpec::Nginx.build().parse(&line, &mut f).unwrap();
    assert_eq!(f.get("user_agent.original"), Some("ua"));

    f.clear();
    let line = format!("<13>Jan  2 03:04:05 host app[1]: {big}");
    ParserSpec::Syslog.build().parse(&line, &mut f).unwrap();
    assert_eq!(f.get("log.syslog.msg").map(str::len), Some(MIB));

    f.clear();
    let many = "X=1 ".repeat(MIB / 4);
    let line = format!("IN=eth0 OUT= {many}PROTO=TCP");
    ParserSpec::Iptables.build().parse(&line, &mut f).unwrap();
    assert_eq!(f.get("network.transport"), Some("tcp"));
}

#[test]
fn nul_bytes_inside_values() {
    let mut f = Fields::new();
    ParserSpec::Logfmt
        .build()
        .parse("a=x\0y b=\"q\0\"", &mut f)
        .unwrap();
    assert_eq!(f.get("a"), Some("x\0y"));
    assert_eq!(f.get("b"), Some("q\0"));

    f.clear();
    let line = "1.2.3.4 - - [02/Jan/2024:03:04:05 +0000] \"GET /\0 HTTP/1.1\" 200 1 \"-\" \"u\0a\"";
    ParserSpec::Nginx.build().parse(line, &mut f).unwrap();
    assert_eq!(f.get("url.original"), Some("/\0"));
    assert_eq!(f.get("user_agent.original"), Some("u\0a"));

    // a raw NUL is a control character, invalid inside a JSON string
    f.clear();
    let e = ParserSpec::Json
        .build()
        .parse("{\"a\":\"\0\"}", &mut f)
        .unwrap_err();
    assert_eq!(e.kind, ParseErrorKind::Syntax);
}

#[test]
fn stray_carriage_return() {
    let mut f = Fields::new();
    let line = "1.2.3.4 - - [02/Jan/2024:03:04:05 +0000] \"GET / HTTP/1.1\" 200 1\r";
    ParserSpec::Apache.build().parse(line, &mut f).unwrap();
    assert_eq!(f.get("http.response.body.bytes"), Some("1"));

    for (spec, line) in [
        (ParserSpec::Logfmt, "a=1\r"),
        (ParserSpec::Json, "{\"a\":\"1\"}\r"),
        (ParserSpec::Syslog, "Jan  2 03:04:05 host app: 1\r"),
        (
            ParserSpec::NginxError,
            "2024/01/02 03:04:05 [error] 1#2: 1\r",
        ),
        (ParserSpec::Iptables, "IN=eth0 OUT= SRC=1\r"),
    ] {
        f.clear();
        spec.build().parse(line, &mut f).unwrap();
        assert!(
            f.iter().all(|(_, v)| !v.ends_with('\r')),
            "{}: {f:?}",
            spec.name()
        );
    }
}

#[test]
fn empty_lines() {
    for spec in all_specs() {
        let mut f = Fields::new();
        let r = spec.build().parse("", &mut f);
        match spec {
            ParserSpec::Raw => assert!(r.is_ok()),
            ParserSpec::Regex(_) => assert_eq!(r.unwrap_err().kind, ParseErrorKind::NoMatch),
            _ => assert_eq!(
                r.unwrap_err().kind,
                ParseErrorKind::Empty,
                "{}",
                spec.name()
            ),
        }
    }
}

#[test]
fn timestamp_fields_normalise() {
    use redtail_parsers::timestamp::normalize;
    let cases = [
        (
            ParserSpec::Nginx,
            r#"1.2.3.4 - - [10/Oct/2000:13:55:36 -0700] "GET / HTTP/1.1" 200 1"#,
        ),
        (ParserSpec::NginxError, "2024/01/02 03:04:05 [error] 1#2: x"),
        (
            ParserSpec::Syslog,
            "<13>1 2003-10-11T22:14:15.003Z h a - - - m",
        ),
        (ParserSpec::Json, r#"{"@timestamp":"2024-01-02T03:04:05Z"}"#),
    ];
    for (spec, line) in cases {
        let mut p = spec.build();
        let (field, fmt) = p.timestamp_field().unwrap();
        let mut f = Fields::new();
        p.parse(line, &mut f).unwrap();
        let raw = f.get(field).unwrap();
        assert!(normalize(raw, fmt).is_some(), "{}: {raw}", spec.name());
    }
}
