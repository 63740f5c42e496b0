//! Follower unit tests: real files in a temp dir, driven through `tick` with no notify and
//! no sleeps.

use super::*;
use crate::record::{Fingerprint, SpanKind};
use discovery::static_dir;
use state::Start;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn opts(once: bool) -> Options {
    Options {
        read_chunk: 16,
        max_batch_bytes: 64,
        line_cap: 40,
        rotate_wait: Duration::ZERO,
        partial_timeout: None,
        glob_interval: Duration::ZERO,
        poll_interval: Duration::from_millis(1),
        max_open_files: 16,
        once,
    }
}

fn spec(dir: &Path) -> Vec<SourceSpec> {
    vec![SourceSpec {
        name: "t".into(),
        paths: vec![format!("{}/*.log", dir.display())],
        exclude: vec![],
        start_at: StartAt::Beginning,
        multiline: None,
        globs: vec![],
    }]
}

/// Records emitted as (offset, text).
fn drain(f: &mut Follower, out: &mut Vec<(u64, String)>) {
    for _ in 0..50 {
        let mut sink = |b: Batch| {
            for s in &b.spans {
                out.push((s.offset, String::from_utf8_lossy(b.record(s)).into_owned()));
            }
            true
        };
        f.tick(Instant::now(), &mut sink);
    }
}

fn append(p: &Path, s: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .unwrap();
    f.write_all(s.as_bytes()).unwrap();
}

#[test]
fn cuts_whole_lines_with_offsets_and_holds_the_partial_one() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.log");
    append(&p, "one\ntwo\nthr");
    let mut f = Follower::new(opts(false), spec(d.path()), vec![], Box::new(NoMarks));
    let mut out = vec![];
    drain(&mut f, &mut out);
    assert_eq!(out, vec![(0, "one".into()), (4, "two".into())]);
    append(&p, "ee\n");
    drain(&mut f, &mut out);
    assert_eq!(out[2], (8, "three".into()));
}

#[test]
fn lines_longer_than_a_read_chunk_stay_whole() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.log");
    let long = "x".repeat(35);
    append(&p, &format!("{long}\nshort\n"));
    let mut f = Follower::new(opts(false), spec(d.path()), vec![], Box::new(NoMarks));
    let mut out = vec![];
    drain(&mut f, &mut out);
    assert_eq!(out, vec![(0, long), (36, "short".into())]);
}

#[test]
fn oversize_line_keeps_its_head_and_the_next_line_is_intact() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.log");
    let huge = "y".repeat(100);
    append(&p, &format!("{huge}\nafter\n"));
    let mut f = Follower::new(opts(false), spec(d.path()), vec![], Box::new(NoMarks));
    let mut kinds = vec![];
    for _ in 0..20 {
        let mut sink = |b: Batch| {
            for s in &b.spans {
                kinds.push((s.offset, s.kind, b.record(s).len()));
            }
            true
        };
        f.tick(Instant::now(), &mut sink);
    }
    assert_eq!(
        kinds,
        vec![
            (0, SpanKind::Oversize { total: 100 }, 40),
            (101, SpanKind::Line, 5)
        ]
    );
}

#[test]
fn rename_rotation_drains_old_file_then_reads_new_one() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.log");
    append(&p, "1\n2\n");
    let mut f = Follower::new(opts(false), spec(d.path()), vec![], Box::new(NoMarks));
    let mut out = vec![];
    drain(&mut f, &mut out);
    append(&p, "3\n");
    std::fs::rename(&p, d.path().join("a.log.1")).unwrap();
    append(&p, "new\n");
    drain(&mut f, &mut out);
    // Order is per file; the two files may interleave.
    let texts: Vec<&str> = out.iter().map(|(_, t)| t.as_str()).collect();
    let old: Vec<&str> = texts.iter().copied().filter(|t| *t != "new").collect();
    assert_eq!(old, ["1", "2", "3"]);
    assert_eq!(texts.iter().filter(|t| **t == "new").count(), 1);
}

#[test]
fn truncation_starts_again_at_zero_with_next_generation() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.log");
    append(&p, "aaaa\nbbbb\n");
    let mut f = Follower::new(opts(false), spec(d.path()), vec![], Box::new(NoMarks));
    let mut gens = vec![];
    let tick = |f: &mut Follower, gens: &mut Vec<(u32, u64, String)>| {
        for _ in 0..10 {
            let mut sink = |b: Batch| {
                for s in &b.spans {
                    gens.push((
                        b.file.generation,
                        s.offset,
                        String::from_utf8_lossy(b.record(s)).into(),
                    ));
                }
                true
            };
            f.tick(Instant::now(), &mut sink);
        }
    };
    tick(&mut f, &mut gens);
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    append(&p, "c\n");
    tick(&mut f, &mut gens);
    assert_eq!(
        gens,
        vec![
            (0, 0, "aaaa".into()),
            (0, 5, "bbbb".into()),
            (1, 0, "c".into())
        ]
    );
}

#[test]
fn start_point_rules() {
    let fp = Fingerprint { len: 4, hash: 7 };
    let cp = Checkpoint {
        source: "t".into(),
        key: FileKey { dev: 1, ino: 2 },
        fingerprint: fp,
        generation: 3,
        offset: 100,
        path: "/x".into(),
        updated_ms: 0,
    };
    let end = || 50;
    let at = |s: Start| (s.generation, s.offset, s.resumed);
    // Checkpoint wins when the file is the same and long enough, over start_at.
    assert_eq!(
        at(start_point(
            Some(&cp),
            Some(fp),
            None,
            200,
            true,
            StartAt::End,
            end
        )),
        (3, 100, true)
    );
    // Same file, shorter than the checkpoint: truncated while stopped.
    assert_eq!(
        at(start_point(
            Some(&cp),
            Some(fp),
            None,
            10,
            true,
            StartAt::Beginning,
            end
        )),
        (4, 0, false)
    );
    // Other content under the same inode: from 0 (a new mark field, its own generations).
    let other = Fingerprint { len: 4, hash: 8 };
    assert_eq!(
        at(start_point(
            Some(&cp),
            Some(other),
            None,
            200,
            true,
            StartAt::Beginning,
            end
        )),
        (0, 0, false)
    );
    // ... unless that content was published already (inode reused, then a crash).
    assert_eq!(
        at(start_point(
            Some(&cp),
            Some(other),
            Some((0, 40)),
            200,
            true,
            StartAt::Beginning,
            end
        )),
        (0, 40, true)
    );
    // No checkpoint: start_at applies at startup only.
    assert_eq!(
        start_point(None, None, None, 200, true, StartAt::End, end).offset,
        50
    );
    assert_eq!(
        start_point(None, None, None, 200, false, StartAt::End, end).offset,
        0
    );
    // A Redis mark ahead of the checkpoint wins (sled lags by a commit interval).
    assert_eq!(
        at(start_point(
            Some(&cp),
            Some(fp),
            Some((3, 150)),
            200,
            true,
            StartAt::End,
            end
        )),
        (3, 150, true)
    );
    // A mark in a later generation (truncated and republished before a crash) wins too.
    assert_eq!(
        at(start_point(
            Some(&cp),
            Some(fp),
            Some((5, 20)),
            200,
            true,
            StartAt::End,
            end
        )),
        (5, 20, true)
    );
    // The mark is past the file's end: truncated since, next generation from 0.
    assert_eq!(
        at(start_point(
            Some(&cp),
            Some(fp),
            Some((5, 300)),
            200,
            true,
            StartAt::End,
            end
        )),
        (6, 0, false)
    );
    // A mark behind the checkpoint changes nothing (the publisher reports the gap).
    assert_eq!(
        at(start_point(
            Some(&cp),
            Some(fp),
            Some((3, 10)),
            200,
            true,
            StartAt::End,
            end
        )),
        (3, 100, true)
    );
    // No checkpoint (lost store) but a mark: resume there instead of start_at.
    assert_eq!(
        at(start_point(
            None,
            Some(fp),
            Some((0, 120)),
            200,
            true,
            StartAt::Beginning,
            end
        )),
        (0, 120, true)
    );
}

#[test]
fn static_dir_stops_at_first_wildcard() {
    assert_eq!(
        static_dir("/var/log/nginx/access.log*"),
        Some(PathBuf::from("/var/log/nginx"))
    );
    assert_eq!(
        static_dir("/var/log/*/app.log"),
        Some(PathBuf::from("/var/log"))
    );
}

#[test]
fn truncated_to_empty_while_stopped_starts_the_next_generation() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.log");
    append(&p, "");
    let meta = std::fs::metadata(&p).unwrap();
    let cp = Checkpoint {
        source: "t".into(),
        key: FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
        },
        fingerprint: Fingerprint {
            len: 5,
            hash: fnv1a(b"aaaa\n"),
        },
        generation: 3,
        offset: 10,
        path: p.to_string_lossy().into_owned(),
        updated_ms: 0,
    };
    let s = start_point(Some(&cp), None, None, 0, true, StartAt::Beginning, || 0);
    assert_eq!((s.generation, s.offset, s.resumed), (4, 0, false));
    let mut f = Follower::new(opts(false), spec(d.path()), vec![cp], Box::new(NoMarks));
    let mut gens = vec![];
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1));
        f.tick(Instant::now(), &mut |b: Batch| {
            gens.push(b.file.generation);
            true
        });
    }
    append(&p, "c\n");
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1));
        f.tick(Instant::now(), &mut |b: Batch| {
            gens.push(b.file.generation);
            true
        });
    }
    assert_eq!(gens, [4]);
}
