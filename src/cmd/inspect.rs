//! `checkpoints`, `validate`, `parse`, `state recover`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;

use redtail_parsers::{Fields, ParserSpec};
use redtail_state::{Checkpoint, StateError};

use crate::config::Config;
use crate::deadletter::rfc3339;
use crate::record::file_id;

/// `redtail checkpoints`: from the store when it is free, from the snapshot the running
/// agent exports after every commit when it is not (sled allows one process at a time).
/// Writes nothing in `state_dir`, whichever it reads ([`redtail_state::read_only`]).
pub fn checkpoints(path: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(path)?;
    let dir = &cfg.agent.state_dir;
    let (list, origin) = match redtail_state::read_only(dir) {
        Ok(list) => (list, "store".to_string()),
        Err(StateError::Locked { .. }) => match redtail_state::read_snapshot(dir)? {
            Some(s) => (
                s.checkpoints,
                format!("snapshot written {} by the running agent", rfc3339(s.written_ms as i64)),
            ),
            None => anyhow::bail!(
                "the agent holds the store and has not exported a snapshot yet ({}/checkpoints.json); try again after its first commit",
                dir.display()
            ),
        },
        Err(StateError::NoStateDir { .. }) => anyhow::bail!(
            "agent.state_dir {} does not exist: there are no checkpoints (has `redtail run` or `redtail backfill` run with this config?); nothing was created",
            dir.display()
        ),
        Err(e) => return Err(super::explain_store_error(&cfg, e)),
    };
    let rows: Vec<serde_json::Value> = list.iter().map(row).collect();
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "# {} checkpoint(s), from the {origin}", list.len())?;
    writeln!(
        out,
        "{:<12} {:>12} {:>12} {:>10} {:>4}  {:<24} PATH",
        "SOURCE", "OFFSET", "SIZE", "LAG", "GEN", "UPDATED"
    )?;
    for (c, r) in list.iter().zip(&rows) {
        let size = r["size"]
            .as_u64()
            .map(|v| v.to_string())
            .unwrap_or("-".into());
        let lag = r["lag"]
            .as_u64()
            .map(|v| v.to_string())
            .unwrap_or("-".into());
        writeln!(
            out,
            "{:<12} {:>12} {:>12} {:>10} {:>4}  {:<24} {}{}",
            c.source,
            c.offset,
            size,
            lag,
            c.generation,
            rfc3339(c.updated_ms as i64),
            c.path,
            if r["present"].as_bool() == Some(false) {
                " (gone)"
            } else {
                ""
            }
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn row(c: &Checkpoint) -> serde_json::Value {
    let meta = std::fs::metadata(&c.path)
        .ok()
        .filter(|m| m.dev() == c.key.dev && m.ino() == c.key.ino)
        // The inode reused by another file is not this checkpoint's file.
        .filter(|m| c.btime.is_none() || crate::follow::btime_of(m) == c.btime);
    serde_json::json!({
        "source": c.source,
        "path": c.path,
        "dev": c.key.dev,
        "inode": c.key.ino,
        "fingerprint": format!("{:016x}", c.fingerprint.hash),
        "fingerprint_len": c.fingerprint.len,
        "btime": c.btime,
        "file_id": file_id(c.key, c.btime, c.fingerprint),
        "generation": c.generation,
        "offset": c.offset,
        "size": meta.as_ref().map(|m| m.len()),
        "lag": meta.as_ref().map(|m| m.len().saturating_sub(c.offset)),
        "present": meta.is_some(),
        "updated_ms": c.updated_ms,
        "updated": rfc3339(c.updated_ms as i64),
    })
}

/// `redtail validate`.
pub fn validate(path: &Path) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(path)?;
    println!("{}: OK, {} source(s)", path.display(), cfg.sources.len());
    for s in &cfg.sources {
        let mut n = 0;
        for p in &s.paths {
            if let Ok(g) = glob::glob(p) {
                n += g.filter_map(Result::ok).filter(|p| p.is_file()).count();
            }
        }
        println!(
            "  source {:?}: parser {}, stream {:?}, {} file(s) match now",
            s.name,
            s.parser.name(),
            s.stream,
            n
        );
    }
    for w in cfg.warnings() {
        println!("  warning: {w}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `redtail parse`: one JSON object per record on stdout; errors as `{"line": n, "error": …}`.
pub fn parse(name: &str, pattern: Option<&str>, file: Option<&Path>) -> anyhow::Result<ExitCode> {
    let spec = ParserSpec::from_config(name, pattern).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut parser = spec.build();
    let input: Box<dyn BufRead> = match file {
        Some(p) => {
            Box::new(BufReader::new(std::fs::File::open(p).map_err(|e| {
                anyhow::anyhow!("cannot open {}: {e}", p.display())
            })?))
        }
        None => Box::new(BufReader::new(std::io::stdin())),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut ok, mut bad) = (0u64, 0u64);
    for (i, line) in input.split(b'\n').enumerate() {
        let mut line = line?;
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let obj = match std::str::from_utf8(&line) {
            Err(e) => {
                bad += 1;
                serde_json::json!({"line": i + 1, "error": format!("invalid UTF-8 at byte {}", e.valid_up_to())})
            }
            Ok(text) => {
                let mut fields = Fields::new();
                match parser.parse(text, &mut fields) {
                    Ok(()) => {
                        ok += 1;
                        let mut m = fields.to_json_object();
                        m.insert(
                            "message".into(),
                            serde_json::Value::String(text.to_string()),
                        );
                        serde_json::Value::Object(m)
                    }
                    Err(e) => {
                        bad += 1;
                        serde_json::json!({"line": i + 1, "error": e.to_string(), "message": text})
                    }
                }
            }
        };
        serde_json::to_writer(&mut out, &obj)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    eprintln!("{ok} parsed, {bad} failed");
    Ok(if bad > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `redtail state recover`.
pub fn state_recover(path: &Path, from_snapshot: bool) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(path)?;
    let (_store, moved, seeded) = redtail_state::recover(&cfg.agent.state_dir, from_snapshot)?;
    println!("moved the old store aside to {}", moved.display());
    if from_snapshot {
        println!("seeded {seeded} checkpoint(s) from the snapshot");
    } else {
        println!("started with no checkpoints: files are read per start_at; lines Redis already holds are skipped by the high-water marks");
    }
    Ok(ExitCode::SUCCESS)
}
