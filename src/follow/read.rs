//! Reading and line cutting: per-file polls ([`Follower::service`]), reads sized to what is
//! there, newline scanning, multiline aggregation, over-long lines, partial-line release,
//! and handing whole records out as [`Batch`]es.
//!
//! Invariants: a batch covers `[start, end)` of whole records, contiguous with the previous
//! batch of the same file and generation; nothing is handed out before its newline unless
//! a release rule (partial timeout, rotated file drained, oversize) says so.

use std::io::Read;
use std::time::{Duration, Instant};

use memchr::memchr;
use tracing::{info, warn};

use crate::record::{Batch, Span, SpanKind};
use crate::stats::{add, STATS};

use super::*;

/// Quiet files are polled on this grid (see `service`).
const POLL_GRID: Duration = Duration::from_millis(10);

/// A file waiting for a credit is looked at again this soon.
const STARVED_POLL: Duration = Duration::from_millis(20);

impl Follower {
    /// Reads one file as far as is useful now, emits its batches; false = close it.
    pub(super) fn service(
        &mut self,
        f: &mut Tracked,
        now: Instant,
        sink: &mut dyn Sink,
        report: &mut TickReport,
    ) -> bool {
        if f.file.is_none() {
            // Closed while idle (open-file limit); discovery reopens it when it grows. A
            // closed file that is no longer reachable by path is forgotten.
            f.at_eof = true;
            return f.state == State::Live;
        }
        if f.next_poll > now && !self.opts.once {
            return true;
        }
        let budget = self.opts.max_batch_bytes * 4;
        let mut read_now = 0usize;
        loop {
            // Size check first: one fstat tells EOF, growth and truncation apart.
            let size = match f.file.as_ref().unwrap().metadata() {
                Ok(m) => m.len(),
                Err(e) => {
                    warn!(path = %f.path.display(), error = %e, "cannot stat open file; will retry");
                    break;
                }
            };
            if size < f.pos || f.rewritten {
                // What is whole goes out first, which needs a credit: wait for one without
                // blocking (the truncation is seen again at the next poll).
                let to_emit = f.done > f.carry_start || f.pending.is_some();
                if to_emit && !self.opts.once && !sink.has_credit() {
                    f.next_poll = now + STARVED_POLL;
                    return true;
                }
                f.rewritten = false;
                if !self.truncated(f, sink, report) {
                    return true;
                }
                continue;
            }
            if size == f.pos {
                f.at_eof = true;
                break;
            }
            // Growing again after a pause: make sure it is still the same content. A file
            // truncated and rewritten past our position between two polls looks like
            // growth by size alone (copytruncate followed by a burst of writes).
            if f.at_eof && f.pos > 0 {
                if let (Some(h), Some(fp)) = (&f.file, f.fingerprint) {
                    if !fingerprint_matches(h, fp) {
                        f.rewritten = true;
                        continue;
                    }
                }
            }
            f.at_eof = false;
            // No credit (Redis slow or down): read nothing more, return, and let discovery
            // go on taking descriptors of new files (a file created and rotated away or
            // deleted while we wait is reachable only through one).
            if !self.opts.once && !sink.has_credit() {
                f.next_poll = now + STARVED_POLL;
                return true;
            }
            match self.read_some(f, size) {
                Ok(0) => {
                    f.at_eof = true;
                    break;
                }
                Ok(n) => {
                    read_now += n;
                    f.last_data = now;
                    report.bytes += n as u64;
                    self.cut(f, sink, report);
                    if report.stopped {
                        return true;
                    }
                    if f.buffered_done() >= self.opts.max_batch_bytes {
                        // (An over-long line finished in this chunk may have used the credit.)
                        if !self.opts.once && !sink.has_credit() {
                            f.next_poll = now + STARVED_POLL;
                            return true;
                        }
                        if !self.emit(f, sink, report) {
                            return true;
                        }
                    }
                    if read_now >= budget {
                        break;
                    }
                }
                Err(e) => {
                    warn!(path = %f.path.display(), offset = f.pos, error = %e, "read failed; will retry");
                    break;
                }
            }
        }
        // Timeouts: a multiline record that saw no new line, a last line without newline.
        let idle = now.saturating_duration_since(f.last_data);
        if let (Some(p), Some(ml)) = (f.pending, &self.sources[f.source].multiline) {
            if f.at_eof && (idle >= ml.timeout || self.opts.once) {
                Self::finish_pending(f, p);
            }
        }
        let gone_and_idle = matches!(f.state, State::Gone { since } if f.at_eof
            && now.saturating_duration_since(since.max(f.last_data)) >= self.opts.rotate_wait);
        if gone_and_idle {
            if let Some(p) = f.pending.take() {
                Self::finish_pending(f, p);
            }
        }
        let partial_due = !self.opts.once
            && f.at_eof
            && f.unterminated() > 0
            && f.oversize.is_none()
            && (gone_and_idle || self.opts.partial_timeout.is_some_and(|t| idle >= t));
        if partial_due {
            if let Some(p) = f.pending.take() {
                Self::finish_pending(f, p);
            }
            let start = f.scan;
            let len = f.pos - start;
            f.spans.push(Span {
                start: (start - f.carry_start) as u32,
                len: len as u32,
                offset: start,
                kind: SpanKind::Partial,
            });
            f.scan = f.pos;
            f.done = f.pos;
            add(&STATS.partial_lines_flushed, 1);
            info!(path = %f.path.display(), offset = start, bytes = len, "released a last line without newline");
        }
        if f.done > f.carry_start {
            if !self.opts.once && !sink.has_credit() {
                f.next_poll = now + STARVED_POLL;
                return true;
            }
            if !self.emit(f, sink, report) {
                return true;
            }
        }
        if f.at_eof {
            // With inotify hints a quiet file is woken by its events; the poll is only the
            // safety net for lost events, so it can be slower.
            let cap = if self.hinted {
                self.opts.poll_interval.max(Duration::from_secs(1))
            } else {
                self.opts.poll_interval
            };
            f.backoff = (f.backoff * 2).clamp(Duration::from_millis(1), cap);
            f.next_poll = now + f.backoff;
            if f.backoff >= POLL_GRID {
                // Quiet files share wake-ups on a 10 ms grid instead of each waking the
                // thread at its own instant.
                let since = f.next_poll.saturating_duration_since(self.epoch).as_nanos();
                let grid = POLL_GRID.as_nanos();
                let up = (grid - since % grid) % grid;
                f.next_poll += Duration::from_nanos(up as u64);
            }
        } else {
            f.backoff = Duration::ZERO;
            f.next_poll = now;
        }
        if gone_and_idle {
            let lost = f.pos - f.done;
            if lost > 0 && f.oversize.is_none() {
                add(&STATS.lost_bytes, lost);
                warn!(path = %f.path.display(), bytes = lost, "closing a rotated file with bytes that never became a whole record");
            }
            info!(path = %f.path.display(), offset = f.pos, "rotated file drained; closing");
            return false;
        }
        true
    }

    /// Reads what the file has beyond `pos` (up to `size` as fstat said, at most one
    /// chunk). Sized to what is there, so a quiet file with a few new lines does not get a
    /// chunk-sized buffer: a thousand followed files must not cost a thousand chunks.
    pub(super) fn read_some(&mut self, f: &mut Tracked, size: u64) -> std::io::Result<usize> {
        let chunk = (size.saturating_sub(f.pos) as usize)
            .max(4096)
            .min(self.opts.read_chunk);
        let len = f.carry.len();
        f.carry.reserve(chunk);
        // SAFETY-free approach: zero-extend, read, truncate. The memset is cheap next to the
        // read syscall and keeps the code free of uninitialised memory.
        f.carry.resize(len + chunk, 0);
        let file = f.file.as_mut().unwrap();
        let n = loop {
            match file.read(&mut f.carry[len..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    f.carry.truncate(len);
                    return Err(e);
                }
            }
        };
        f.carry.truncate(len + n);
        f.pos += n as u64;
        add(&STATS.bytes_read, n as u64);
        Ok(n)
    }

    /// Scans newly read bytes for newlines and turns complete lines into records.
    pub(super) fn cut(&mut self, f: &mut Tracked, sink: &mut dyn Sink, report: &mut TickReport) {
        if f.oversize.is_some() {
            if !self.continue_oversize(f, sink, report) {
                return;
            }
            if f.oversize.is_some() {
                return;
            }
        }
        let ml = self.sources[f.source].multiline.clone();
        loop {
            let from = (f.scan - f.carry_start) as usize;
            let Some(i) = memchr(b'\n', &f.carry[from..]) else {
                break;
            };
            let ls = f.scan;
            let le = ls + i as u64;
            f.scan = le + 1;
            add(&STATS.records_read, 1);
            match &ml {
                None => {
                    f.spans.push(Span {
                        start: (ls - f.carry_start) as u32,
                        len: (le - ls) as u32,
                        offset: ls,
                        kind: SpanKind::Line,
                    });
                    f.done = le + 1;
                }
                Some(ml) => {
                    let line =
                        &f.carry[(ls - f.carry_start) as usize..(le - f.carry_start) as usize];
                    let starts = match (&ml.start, &ml.continuation) {
                        (Some(s), _) => s.is_match(line),
                        (None, Some(c)) => !c.is_match(line),
                        (None, None) => true,
                    };
                    if let Some(p) = f.pending {
                        let too_big = le - p.start > ml.max_bytes as u64 || p.lines >= ml.max_lines;
                        if starts || too_big {
                            Self::finish_pending(f, p);
                        }
                    }
                    match &mut f.pending {
                        Some(p) => {
                            p.end = le;
                            p.lines += 1;
                        }
                        None => {
                            f.pending = Some(Pending {
                                start: ls,
                                end: le,
                                lines: 1,
                            })
                        }
                    }
                }
            }
        }
        // A line with no newline yet that is already past the cap: keep its head, skip the rest.
        if f.pos - f.scan > self.opts.line_cap as u64 {
            if let Some(p) = f.pending.take() {
                Self::finish_pending(f, p);
            }
            if f.done > f.carry_start && !self.emit(f, sink, report) {
                return;
            }
            let from = (f.scan - f.carry_start) as usize;
            let mut kept = f.carry[from..].to_vec();
            kept.truncate(self.opts.line_cap);
            f.oversize = Some(Oversize {
                start: f.scan,
                kept,
                total: f.pos - f.scan,
            });
            f.carry.clear();
            f.carry_start = f.pos;
            f.scan = f.pos;
            f.done = f.pos;
        }
    }

    /// Skipping the tail of an over-long line; false when the sink stopped.
    pub(super) fn continue_oversize(
        &mut self,
        f: &mut Tracked,
        sink: &mut dyn Sink,
        report: &mut TickReport,
    ) -> bool {
        let o = f.oversize.as_mut().unwrap();
        let nl = memchr(b'\n', &f.carry);
        let upto = nl.unwrap_or(f.carry.len());
        let room = self.opts.line_cap.saturating_sub(o.kept.len());
        o.kept.extend_from_slice(&f.carry[..upto.min(room)]);
        o.total += upto as u64;
        match nl {
            None => {
                f.carry.clear();
                f.carry_start = f.pos;
                f.scan = f.pos;
                f.done = f.pos;
                true
            }
            Some(i) => {
                let o = f.oversize.take().unwrap();
                add(&STATS.oversize_lines, 1);
                add(&STATS.records_read, 1);
                warn!(path = %f.path.display(), offset = o.start, bytes = o.total, "line longer than the dead-letter cap; its head goes to the dead-letter file");
                let end = f.carry_start + i as u64 + 1;
                let len = o.kept.len();
                let batch = Batch {
                    seq: self.take_seq(),
                    file: f.info(),
                    start: o.start,
                    end,
                    expect_mark: !std::mem::replace(&mut f.fresh, false),
                    bytes: o.kept,
                    spans: vec![Span {
                        start: 0,
                        len: len as u32,
                        offset: o.start,
                        kind: SpanKind::Oversize { total: o.total },
                    }],
                };
                f.carry.drain(..=i);
                f.carry_start = end;
                f.scan = end;
                f.done = end;
                report.batches += 1;
                if !sink.send(batch) {
                    report.stopped = true;
                    return false;
                }
                true
            }
        }
    }

    pub(super) fn finish_pending(f: &mut Tracked, p: Pending) {
        f.spans.push(Span {
            start: (p.start - f.carry_start) as u32,
            len: (p.end - p.start) as u32,
            offset: p.start,
            kind: SpanKind::Line,
        });
        f.done = p.end + 1;
        f.pending = None;
    }

    pub(super) fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Hands out everything before `done` as one batch; false when the sink stopped.
    pub(super) fn emit(
        &mut self,
        f: &mut Tracked,
        sink: &mut dyn Sink,
        report: &mut TickReport,
    ) -> bool {
        let n = f.buffered_done();
        if n == 0 {
            return true;
        }
        // The batch takes the buffer; the file keeps only its unfinished tail (a recycled
        // buffer when the file is busy, a small one when it is not).
        let tail = f.carry.len() - n;
        let mut rest = if f.at_eof {
            Vec::with_capacity(tail.max(256))
        } else {
            let mut b = sink.buffer();
            b.clear();
            b
        };
        rest.extend_from_slice(&f.carry[n..]);
        let mut bytes = std::mem::replace(&mut f.carry, rest);
        bytes.truncate(n);
        let spans = std::mem::take(&mut f.spans);
        let batch = Batch {
            seq: self.take_seq(),
            file: f.info(),
            start: f.carry_start,
            end: f.done,
            expect_mark: !std::mem::replace(&mut f.fresh, false),
            bytes,
            spans,
        };
        f.carry_start = f.done;
        report.batches += 1;
        if !sink.send(batch) {
            report.stopped = true;
            return false;
        }
        true
    }
}
