//! `redtail validate`: exit 0 on a good file; exit 2 and every problem, each with
//! `file:line:col: key: message`, on a bad one.

mod common;

use std::path::Path;
use std::process::Output;

use common::{show, toml_str, BIN};

fn validate(text: &str) -> (tempfile::TempDir, String, Output) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("redtail.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["validate", "-c", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    (dir, cfg.to_str().unwrap().to_string(), out)
}

fn all_output(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn good_config(dir: &Path) -> String {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join("a.log"), "x\n").unwrap();
    format!(
        r#"[agent]
state_dir = {}
glob_interval = "100ms"
rotate_wait = "5s"
host_name = "testhost"

[redis]
url = "redis://127.0.0.1:1/0"

[[source]]
name = "app"
paths = [{}]
parser = "regex"
pattern = '^(?P<level>[A-Z]+) (?P<text>.*)$'
stream = "logs:app"
start_at = "end"
fields = {{ env = "test" }}
multiline = {{ start = "^\\S", max_lines = 500, timeout = "1s" }}
"#,
        toml_str(dir.join("state").to_str().unwrap()),
        toml_str(logs.join("*.log").to_str().unwrap())
    )
}

#[test]
fn good_config_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, cfg, out) = validate(&good_config(dir.path()));
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.starts_with(&format!("{cfg}: OK, 1 source(s)")), "{s}");
    assert!(
        s.contains(r#"source "app": parser regex, stream "logs:app", 1 file(s) match now"#),
        "{s}"
    );
}

#[test]
fn several_errors_are_all_reported_with_positions_and_keys() {
    let text = r#"[agent]
state_dir = "/tmp/redtail-validate-state"
poll_interval = "fast"
max_line_bytes = "huge"

[redis]
url = "http://nope"

[[source]]
name = "app"
paths = ["relative/*.log"]
parser = "nosuch"
start_at = "middle"
"#;
    let (_d, cfg, out) = validate(text);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let s = all_output(&out);
    for (line, col, key) in [
        (3, 17, "agent.poll_interval"),
        (4, 18, "agent.max_line_bytes"),
        (7, 7, "redis.url"),
        (11, 9, "source[0].paths"),
        (12, 10, "source[0].parser"),
        (13, 12, "source[0].start_at"),
    ] {
        let prefix = format!("{cfg}:{line}:{col}: {key}: ");
        assert!(s.contains(&prefix), "missing {prefix:?} in:\n{s}");
    }
    assert!(s.contains("6 problems"), "{s}");
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let text = r#"[agent]
state_dir = "/tmp/redtail-validate-state"

[[source]]
name = "app"
paths = ["/tmp/*.log"]
colour = "blue"
"#;
    let (_d, cfg, out) = validate(text);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let s = all_output(&out);
    let line = s
        .lines()
        .find(|l| l.contains(&format!("{cfg}:7:")))
        .unwrap_or_else(|| panic!("no {cfg}:7: line in:\n{s}"));
    assert!(line.contains("colour"), "{line}");
    assert!(line.contains("unknown field"), "{line}");
}

/// An unknown key must not hide the other problems of the file ("every problem in a file
/// is reported in one go", src/config.rs).
#[test]
fn unknown_key_does_not_hide_other_problems() {
    let text = r#"[agent]
state_dir = "/tmp/redtail-validate-state"
poll_interval = "fast"

[redis]
urll = "redis://127.0.0.1:1/0"

[[source]]
name = "app"
paths = ["/tmp/*.log"]
parser = "nosuch"
"#;
    let (_d, cfg, out) = validate(text);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let s = all_output(&out);
    assert!(
        s.contains(&format!("{cfg}:6:1: ")) && s.contains("urll"),
        "{s}"
    );
    assert!(
        s.contains(&format!("{cfg}:3:17: agent.poll_interval: ")),
        "poll_interval not reported:\n{s}"
    );
    assert!(
        s.contains(&format!("{cfg}:11:10: source[0].parser: ")),
        "parser not reported:\n{s}"
    );
}

#[test]
fn run_refuses_an_invalid_config_with_exit_2() {
    let (_d, cfg, _) = validate("[agent]\nstate_dir = \"/tmp/x\"\npoll_interval = \"fast\"\n");
    let out = std::process::Command::new(BIN)
        .args(["run", "-c", &cfg])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(all_output(&out).contains(&format!("{cfg}:3:17: agent.poll_interval: ")));
}
