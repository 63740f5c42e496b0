//! `redtail parse`: the parsers as the agent runs them, on the shared fixtures.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use common::{show, BIN};
use serde_json::{json, Map, Value};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn parse(args: &[&str], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut c = Command::new(BIN)
        .arg("parse")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run redtail parse");
    {
        let mut i = c.stdin.take().unwrap();
        if let Some(b) = stdin {
            // The command may exit before reading its input (a usage error): a closed
            // pipe here is its answer, not a test failure.
            if let Err(e) = i.write_all(b) {
                assert_eq!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe,
                    "writing stdin: {e}"
                );
            }
        }
    }
    c.wait_with_output().unwrap()
}

fn json_lines(o: &Output) -> Vec<Value> {
    String::from_utf8(o.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON {l:?}: {e}")))
        .collect()
}

/// Compares `parse` output with `<case>.expected.jsonl`: fields plus `message` = the line,
/// or `error` plus `line` (1-based) and `message`.
fn check_case(out: &Output, log: &PathBuf, expected: &PathBuf) {
    let input = std::fs::read_to_string(log).unwrap();
    let inputs: Vec<&str> = input.lines().collect();
    let exp: Vec<Value> = std::fs::read_to_string(expected)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got = json_lines(out);
    assert_eq!(got.len(), inputs.len(), "{}", show(out));
    for (i, ((g, e), line)) in got.iter().zip(&exp).zip(&inputs).enumerate() {
        let want = if let Some(f) = e.get("fields") {
            let mut m: Map<String, Value> = f.as_object().unwrap().clone();
            m.insert("message".into(), json!(line));
            Value::Object(m)
        } else {
            json!({"error": e["error"], "line": i + 1, "message": line})
        };
        assert_eq!(g, &want, "line {}", i + 1);
    }
}

#[test]
fn nginx_combined_fixture_fields() {
    let dir = fixtures().join("nginx");
    for case in ["combined", "common"] {
        let log = dir.join(format!("{case}.log"));
        let out = parse(&["--parser", "nginx", log.to_str().unwrap()], None);
        check_case(&out, &log, &dir.join(format!("{case}.expected.jsonl")));
    }
    // One line spelled out, so a wrong fixture cannot hide a wrong parser.
    let line = br#"203.0.113.7 - - [02/Jan/2024:03:04:05 +0000] "GET /index.html HTTP/1.1" 200 6120 "https://example.com/start" "curl/8.5.0""#;
    let out = parse(&["--parser", "nginx"], Some(&[&line[..], b"\n"].concat()));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        json_lines(&out),
        [json!({
            "@timestamp": "02/Jan/2024:03:04:05 +0000",
            "http.request.method": "GET",
            "http.request.referrer": "https://example.com/start",
            "http.response.body.bytes": "6120",
            "http.response.status_code": "200",
            "http.version": "1.1",
            "message": std::str::from_utf8(line).unwrap(),
            "source.address": "203.0.113.7",
            "url.original": "/index.html",
            "user_agent.original": "curl/8.5.0",
        })]
    );
}

#[test]
fn regex_with_pattern() {
    let dir = fixtures().join("regex");
    let pattern = std::fs::read_to_string(dir.join("app.pattern")).unwrap();
    let pattern = pattern.lines().next().unwrap();
    let log = dir.join("app.log");
    let out = parse(
        &[
            "--parser",
            "regex",
            "--pattern",
            pattern,
            log.to_str().unwrap(),
        ],
        None,
    );
    // The fixture has a non-matching line: exit 1, the others still printed.
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    check_case(&out, &log, &dir.join("app.expected.jsonl"));

    let out = parse(
        &[
            "--parser",
            "regex",
            "--pattern",
            r"^(?P<level>[A-Z]+) (?P<text>.*)$",
        ],
        Some(b"WARN disk full\r\nERROR boom\n"),
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        json_lines(&out),
        [
            json!({"level": "WARN", "text": "disk full", "message": "WARN disk full"}),
            json!({"level": "ERROR", "text": "boom", "message": "ERROR boom"}),
        ]
    );
}

#[test]
fn regex_without_pattern_is_an_error() {
    let out = parse(&["--parser", "regex"], Some(b"x\n"));
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a pattern"),
        "{}",
        show(&out)
    );
}

#[test]
fn failures_are_reported_per_line_and_exit_1() {
    let out = parse(
        &["--parser", "json"],
        Some(b"{\"a\":1}\nnot json\n{\"b\":\"2\"}\n"),
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let got = json_lines(&out);
    assert_eq!(got.len(), 3, "{}", show(&out));
    assert_eq!(got[0], json!({"a": "1", "message": "{\"a\":1}"}));
    assert_eq!(got[1]["line"], 2);
    assert_eq!(got[1]["message"], "not json");
    assert!(
        got[1]["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{}",
        got[1]
    );
    assert_eq!(got[2], json!({"b": "2", "message": "{\"b\":\"2\"}"}));
}
