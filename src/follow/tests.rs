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
        btime: true,
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
        btime: None,
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
            None,
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
        start_point(None, None, None, None, 200, true, StartAt::End, end).offset,
        50
    );
    assert_eq!(
        start_point(None, None, None, None, 200, false, StartAt::End, end).offset,
        0
    );
    // A Redis mark ahead of the checkpoint wins (sled lags by a commit interval).
    assert_eq!(
        at(start_point(
            Some(&cp),
            Some(fp),
            None,
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
            None,
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
            None,
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
            None,
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
            None,
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
        btime: btime_of(&meta),
        generation: 3,
        offset: 10,
        path: p.to_string_lossy().into_owned(),
        updated_ms: 0,
    };
    let s = start_point(
        Some(&cp),
        None,
        None,
        None,
        0,
        true,
        StartAt::Beginning,
        || 0,
    );
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

/// Marks kept the way the publisher keeps them: per field, the end of the last batch.
#[derive(Clone, Default)]
struct MemMarks(std::sync::Arc<std::sync::Mutex<HashMap<String, (u32, u64)>>>);

impl Marks for MemMarks {
    fn get(&mut self, _: usize, field: &str) -> Result<Option<(u32, u64)>, ()> {
        Ok(self.0.lock().unwrap().get(field).copied())
    }
}

/// Ticks, publishing into `marks`; returns (mark field, expect_mark, generation, offset, text).
fn drain_marked(f: &mut Follower, marks: &MemMarks) -> Vec<(String, bool, u32, u64, String)> {
    let mut out = vec![];
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(1));
        f.tick(Instant::now(), &mut |b: Batch| {
            for s in &b.spans {
                out.push((
                    b.file.mark_field.clone(),
                    b.expect_mark,
                    b.file.generation,
                    s.offset,
                    String::from_utf8_lossy(b.record(s)).into_owned(),
                ));
            }
            marks
                .0
                .lock()
                .unwrap()
                .insert(b.file.mark_field.clone(), (b.file.generation, b.end));
            true
        });
    }
    out
}

/// Creates `p` (deleted) again with `content` under its old inode number `old`; false when
/// another process took the inode first.
fn recreate_reusing_inode(p: &Path, old: u64, content: &str) -> bool {
    let dir = p.parent().unwrap();
    let mut made = vec![];
    let mut hit = None;
    for i in 0..64 {
        let c = dir.join(format!(".reuse-{i}"));
        std::fs::write(&c, b"").unwrap();
        if std::fs::metadata(&c).unwrap().ino() == old {
            hit = Some(c);
            break;
        }
        made.push(c);
    }
    for c in made {
        std::fs::remove_file(c).unwrap();
    }
    let Some(c) = hit else { return false };
    std::fs::write(&c, content).unwrap();
    std::fs::rename(&c, p).unwrap();
    true
}

#[test]
fn deleted_while_running_then_inode_reused_with_the_same_header_without_birth_times() {
    // A filesystem without birth times: only having seen the deletion tells the new file
    // from the old one. It continues the mark field in the next generation, from 0.
    for _ in 0..5 {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.log");
        append(&p, "#Version: 1.0\nold-1\nold-2\n");
        let marks = MemMarks::default();
        let mut o = opts(false);
        o.btime = false;
        let mut f = Follower::new(o, spec(d.path()), vec![], Box::new(marks.clone()));
        let first = drain_marked(&mut f, &marks);
        assert_eq!(first.len(), 3);
        let old = std::fs::metadata(&p).unwrap().ino();
        std::fs::remove_file(&p).unwrap();
        // Seen deleted, drained, closed (rotate_wait 0): the inode is free again.
        drain_marked(&mut f, &marks);
        assert_eq!(f.file_count(), 0);
        if !recreate_reusing_inode(&p, old, "#Version: 1.0\nnew-1\nnew-2\nnew-3\n") {
            continue;
        }
        let got = drain_marked(&mut f, &marks);
        let texts: Vec<&str> = got.iter().map(|r| r.4.as_str()).collect();
        assert_eq!(texts, ["#Version: 1.0", "new-1", "new-2", "new-3"]);
        assert_eq!(got[0].0, first[0].0, "same identity without birth times");
        assert_eq!((got[0].1, got[0].2, got[0].3), (false, 1, 0));
        return;
    }
    panic!("the inode was never reused in 5 attempts: the test proves nothing");
}

#[test]
fn checkpoint_without_birth_time_is_adopted_once_by_a_file_born_before_it() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.log");
    append(&p, "#Version: 1.0\nold-1\n");
    let meta = std::fs::metadata(&p).unwrap();
    let btime = btime_of(&meta).expect("this filesystem records birth times");
    let key = FileKey {
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let fp = fingerprint_of(&std::fs::File::open(&p).unwrap())
        .unwrap()
        .unwrap();
    let legacy = |updated_ms| Checkpoint {
        source: "t".into(),
        key,
        fingerprint: fp,
        btime: None,
        generation: 0,
        offset: meta.len(),
        path: p.to_string_lossy().into_owned(),
        updated_ms,
    };
    append(&p, "new-1\n");
    // Written after the file was born: it is this file's (an upgrade). Resumes there, under
    // the new field name (which Redis has no mark for yet: expect_mark false).
    let marks = MemMarks::default();
    marks
        .0
        .lock()
        .unwrap()
        .insert(crate::record::file_id(key, None, fp), (0, meta.len()));
    let now_ms = crate::pipeline::now_ms();
    let mut f = Follower::new(
        opts(false),
        spec(d.path()),
        vec![legacy(now_ms)],
        Box::new(marks.clone()),
    );
    let got = drain_marked(&mut f, &marks);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].4, "new-1");
    assert_eq!(got[0].0, crate::record::file_id(key, Some(btime), fp));
    assert!(!got[0].1, "no mark under the new field yet");
    // Written before the file was born: another file that had the inode. From 0.
    let marks = MemMarks::default();
    let mut f = Follower::new(
        opts(false),
        spec(d.path()),
        vec![legacy(btime / 1_000_000 - 1)],
        Box::new(marks.clone()),
    );
    let got = drain_marked(&mut f, &marks);
    assert_eq!(got.len(), 3, "{got:?}");
}

fn texts(out: &[(u64, String)]) -> Vec<String> {
    let mut t: Vec<String> = out.iter().map(|(_, s)| s.clone()).collect();
    t.sort();
    t
}

#[test]
fn files_closed_for_the_open_file_limit_and_rotated_away_are_found_and_drained() {
    let d = tempfile::tempdir().unwrap();
    append(&d.path().join("a.log"), "a1\na2\n");
    append(&d.path().join("b.log"), "b1\nb2\n");
    let mut o = opts(false);
    o.max_open_files = 1;
    let mut f = Follower::new(o, spec(d.path()), vec![], Box::new(NoMarks));
    let mut out = vec![];
    drain(&mut f, &mut out);
    assert_eq!(texts(&out), ["a1", "a2", "b1", "b2"]);
    // One of them is closed now. Both grow and are renamed out of the globs before the
    // agent looks again.
    for n in ["a", "b"] {
        append(&d.path().join(format!("{n}.log")), &format!("{n}3\n"));
        std::fs::rename(
            d.path().join(format!("{n}.log")),
            d.path().join(format!("{n}.log.1")),
        )
        .unwrap();
    }
    drain(&mut f, &mut out);
    assert_eq!(texts(&out), ["a1", "a2", "a3", "b1", "b2", "b3"]);
}

#[test]
fn a_file_closed_for_the_open_file_limit_is_reopened_on_a_hint() {
    let d = tempfile::tempdir().unwrap();
    append(&d.path().join("a.log"), "a1\n");
    append(&d.path().join("b.log"), "b1\n");
    let mut o = opts(false);
    o.max_open_files = 1;
    o.glob_interval = Duration::from_secs(3600);
    let mut f = Follower::new(o, spec(d.path()), vec![], Box::new(NoMarks));
    let mut out = vec![];
    drain(&mut f, &mut out);
    assert_eq!(texts(&out), ["a1", "b1"]);
    // No glob pass for an hour: only the hints can bring the closed one back.
    for n in ["a", "b"] {
        let p = d.path().join(format!("{n}.log"));
        append(&p, &format!("{n}2\n"));
        f.hint(p);
    }
    drain(&mut f, &mut out);
    assert_eq!(texts(&out), ["a1", "a2", "b1", "b2"]);
}

#[test]
fn files_with_unread_bytes_are_not_closed_for_the_open_file_limit() {
    let d = tempfile::tempdir().unwrap();
    for n in ["a", "b", "c"] {
        append(&d.path().join(format!("{n}.log")), &format!("{n}1\n{n}2\n"));
    }
    let mut o = opts(false);
    o.max_open_files = 1;
    let mut f = Follower::new(o, spec(d.path()), vec![], Box::new(NoMarks));
    // The first discovery opens all three before reading any: none may be closed unread,
    // and each is deleted right after (only the descriptor reaches it).
    f.discover(Instant::now());
    for n in ["a", "b", "c"] {
        std::fs::remove_file(d.path().join(format!("{n}.log"))).unwrap();
    }
    let mut out = vec![];
    drain(&mut f, &mut out);
    assert_eq!(texts(&out), ["a1", "a2", "b1", "b2", "c1", "c2"]);
}

/// Redis is down: every lookup fails.
struct DownMarks;

impl Marks for DownMarks {
    fn get(&mut self, _: usize, _: &str) -> Result<Option<(u32, u64)>, ()> {
        Err(())
    }
}

#[test]
fn a_drained_file_renamed_back_into_the_globs_resumes_where_it_was() {
    // Redis cannot be asked, so only the follower's own memory prevents a re-read.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.log");
    append(&p, "1\n2\n");
    let mut f = Follower::new(opts(false), spec(d.path()), vec![], Box::new(DownMarks));
    let mut out = vec![];
    drain(&mut f, &mut out);
    std::fs::rename(&p, d.path().join("a.old")).unwrap();
    drain(&mut f, &mut out);
    assert_eq!(f.file_count(), 0, "drained and closed");
    std::fs::rename(d.path().join("a.old"), &p).unwrap();
    append(&p, "3\n");
    drain(&mut f, &mut out);
    assert_eq!(texts(&out), ["1", "2", "3"]);
}

#[test]
fn a_symlinked_file_closed_for_the_open_file_limit_is_drained_when_the_link_moves_on() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    std::fs::create_dir(&data).unwrap();
    append(&data.join("one"), "o1\n");
    std::os::unix::fs::symlink(data.join("one"), d.path().join("cur.log")).unwrap();
    let mut o = opts(false);
    o.max_open_files = 1;
    let mut f = Follower::new(o, spec(d.path()), vec![], Box::new(NoMarks));
    let mut out = vec![];
    drain(&mut f, &mut out);
    // A busier file makes the symlinked one the idlest: it is the one closed.
    append(&d.path().join("b.log"), "b1\n");
    drain(&mut f, &mut out);
    append(&d.path().join("b.log"), "b2\n");
    drain(&mut f, &mut out);
    // Written once more, then the link is re-pointed before the agent looks again.
    append(&data.join("one"), "o2\n");
    append(&data.join("two"), "t1\n");
    let tmp = d.path().join("cur.tmp");
    std::os::unix::fs::symlink(data.join("two"), &tmp).unwrap();
    std::fs::rename(&tmp, d.path().join("cur.log")).unwrap();
    drain(&mut f, &mut out);
    assert_eq!(texts(&out), ["b1", "b2", "o1", "o2", "t1"]);
}

/// A sink with a fixed number of credits that fails the test on a send that would block.
struct Credits {
    left: usize,
    out: Vec<String>,
}

impl Sink for Credits {
    fn send(&mut self, b: Batch) -> bool {
        assert!(
            self.left > 0,
            "send without a credit: the follower would block"
        );
        self.left -= 1;
        for s in &b.spans {
            self.out
                .push(String::from_utf8_lossy(b.record(s)).into_owned());
        }
        true
    }
    fn has_credit(&mut self) -> bool {
        self.left > 0
    }
}

#[test]
fn without_credits_the_follower_never_blocks_and_still_opens_new_files() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.log");
    append(&p, "A1\n  a\n");
    let mut s = spec(d.path());
    s[0].multiline = Some(Multiline {
        start: Some(regex::bytes::Regex::new(r"^\S").unwrap()),
        continuation: None,
        max_lines: 100,
        max_bytes: 1 << 20,
        timeout: Duration::from_secs(3600),
    });
    let mut f = Follower::new(opts(false), s, vec![], Box::new(NoMarks));
    let mut sink = Credits {
        left: 1,
        out: vec![],
    };
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1));
        f.tick(Instant::now(), &mut sink);
    }
    // The record is pending (multiline, waiting for its next line); no credits are left.
    sink.left = 0;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&d.path().join("b.log"), "b1\n");
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(1));
        f.tick(Instant::now(), &mut sink);
    }
    assert_eq!(f.file_count(), 2, "b.log opened while waiting for credits");
    sink.left = 10;
    // Each record is released by the start of the next one.
    append(&p, "A2\nA3\n");
    append(&d.path().join("b.log"), "b2\n");
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(1));
        f.tick(Instant::now(), &mut sink);
    }
    let mut got = sink.out.clone();
    got.sort();
    assert_eq!(got, ["A1\n  a", "A2", "b1"]);
}
