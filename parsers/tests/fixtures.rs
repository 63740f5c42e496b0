//! Data-driven fixture test: every `fixtures/<parser>/<case>.log` is parsed line
//! by line and compared with `<case>.expected.jsonl` (one JSON object per
//! input line: `{"fields": {...}}` or `{"error": "<Display of the error>"}`).
//! For `regex`, the pattern is read from `<case>.pattern`.
//!
//! Set `REDTAIL_BLESS=1` to (re)write the expected files from the current
//! output (then review the diff!).

use std::fs;
use std::path::{Path, PathBuf};

use redtail_parsers::{Fields, ParserSpec};
use serde_json::{json, Value};

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn run_case(parser_name: &str, log: &Path) -> Result<usize, String> {
    let pattern = if parser_name == "regex" {
        let p = log.with_extension("pattern");
        let text = fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Some(text.trim_end_matches(['\n', '\r']).to_string())
    } else {
        None
    };
    let spec = ParserSpec::from_config(parser_name, pattern.as_deref())?;
    let mut parser = spec.build();
    let input = fs::read_to_string(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut lines: Vec<&str> = input.split('\n').collect();
    if lines.last() == Some(&"") {
        lines.pop();
    }
    let mut actual = Vec::with_capacity(lines.len());
    let mut fields = Fields::new();
    for line in &lines {
        let line = line.strip_suffix('\r').unwrap_or(line);
        fields.clear();
        actual.push(match parser.parse(line, &mut fields) {
            Ok(()) => json!({ "fields": fields.to_json_object() }),
            Err(e) => json!({ "error": e.to_string() }),
        });
    }
    let expected_path = log.with_file_name(format!(
        "{}.expected.jsonl",
        log.file_stem().unwrap().to_string_lossy()
    ));
    if std::env::var_os("REDTAIL_BLESS").is_some() {
        let text: String = actual.iter().map(|v| format!("{v}\n")).collect();
        fs::write(&expected_path, text).map_err(|e| e.to_string())?;
        return Ok(lines.len());
    }
    let expected_text = fs::read_to_string(&expected_path)
        .map_err(|e| format!("{}: {e}", expected_path.display()))?;
    let expected: Vec<Value> = expected_text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(n, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}:{}: {e}", expected_path.display(), n + 1))
        })
        .collect();
    if expected.len() != actual.len() {
        return Err(format!(
            "{}: {} input lines but {} expected results",
            log.display(),
            actual.len(),
            expected.len()
        ));
    }
    let mut failures = String::new();
    for (n, (want, got)) in expected.iter().zip(&actual).enumerate() {
        if want != got {
            failures += &format!(
                "{}:{}: {}\n    expected: {want}\n    actual:   {got}\n",
                log.display(),
                n + 1,
                lines[n]
            );
        }
    }
    if failures.is_empty() {
        Ok(lines.len())
    } else {
        Err(failures)
    }
}

#[test]
fn fixtures() {
    let dir = fixtures_dir();
    let mut failures = Vec::new();
    let mut parsers_seen = Vec::new();
    let mut total = 0;
    let mut dirs: Vec<_> = fs::read_dir(&dir)
        .expect("fixtures dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for sub in dirs {
        let name = sub.file_name().unwrap().to_string_lossy().to_string();
        if !ParserSpec::NAMES.contains(&name.as_str()) {
            continue; // e.g. fixtures/invalid
        }
        let mut logs: Vec<_> = fs::read_dir(&sub)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        assert!(!logs.is_empty(), "no .log cases in {}", sub.display());
        for log in logs {
            match run_case(&name, &log) {
                Ok(n) => total += n,
                Err(e) => failures.push(e),
            }
        }
        parsers_seen.push(name);
    }
    for name in ParserSpec::NAMES {
        assert!(
            parsers_seen.iter().any(|p| p == name),
            "no fixtures for parser {name}"
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(total > 0);
    eprintln!("{total} fixture lines checked");
}
