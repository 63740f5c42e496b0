#!/usr/bin/env python3
"""Write -> XADD latency of `redtail run` at fixed line rates.

Usage: bench/live_latency.py [--rates 1000,10000,100000,1000] [--duration 15] [--keep]

One redis-server (fresh, free port) and one `redtail run` (parser raw,
metadata = false, default agent settings) following one file. For each rate a
writer appends lines to the file for --duration seconds (default 15), writing
the lines due in each 1 ms tick in one write(2) on an O_APPEND fd; every line
starts with time.time_ns() taken just before its write. After each phase the
script waits for the stream to reach the number of lines written, then reads
the phase's entries with XRANGE and computes latency = entry ID milliseconds
(Redis' clock at XADD, same host) - write time. Entry IDs have 1 ms
resolution, so each latency is reported as an upper bound,
(ID ms + 1) - write time: the true latency is at most that and at least 1 ms less. Agent CPU % = agent
utime+stime delta over the phase (writing + drain) / phase wall time.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

PAD = (b'- - [24/Nov/2026:06:00:00 +0000] "GET /api/v1/users/alpha42?id=1&q=x HTTP/1.1" '
       b'200 5120 "https://www.example.com/" "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) '
       b'Gecko/20100101 Firefox/121.0"')


def write_phase(fd, rate, duration, seq0):
    """Append at `rate` lines/s for `duration` s; returns (lines, seconds, max lag ms)."""
    t0 = time.perf_counter()
    end = t0 + duration
    n = 0
    max_lag = 0.0
    tick = 0.001
    next_t = t0
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        due = int(rate * (now - t0)) + 1 - n
        if due > 0:
            max_lag = max(max_lag, now - next_t)
            ts = time.time_ns()
            head = b"%d " % ts
            buf = b"".join(head + b"%d " % (seq0 + n + i) + PAD + b"\n" for i in range(due))
            os.write(fd, buf)
            n += due
        next_t += tick
        delay = next_t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    return n, time.perf_counter() - t0, max_lag * 1e3


def read_latencies(r, start_id, count):
    """XRANGE from start_id (exclusive) for `count` entries; returns (lat_ms list, last id)."""
    lats = []
    last = start_id
    while len(lats) < count:
        rep = r.fast("XRANGE", "bench", "(" + last, "+", "COUNT", 10000)
        if not rep:
            break
        for eid, fields in rep:
            eid = eid.decode()
            ms = int(eid.split("-")[0])
            msg = fields[fields.index(b"message") + 1]
            ts = int(msg[:msg.index(b" ")])
            lats.append(ms + 1 - ts / 1e6)  # upper bound: ID ms is truncated
            last = eid
    return lats, last


def pct(sorted_xs, p):
    if not sorted_xs:
        return float("nan")
    k = min(len(sorted_xs) - 1, max(0, int(round(p / 100.0 * len(sorted_xs) + 0.5)) - 1))
    return sorted_xs[k]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="1000,10000,100000,1000")
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    rates = [int(x) for x in a.rates.split(",")]
    work = tempfile.mkdtemp(prefix="rt-latency-")
    print(B.machine_line())
    r = B.Redis(work)
    log = os.path.join(work, "live.log")
    open(log, "wb").close()
    cfg = os.path.join(work, "live.toml")
    with open(cfg, "w") as f:
        f.write('[agent]\nstate_dir = "%s/state"\n\n[redis]\nurl = "redis://127.0.0.1:%d/0"\n'
                'metadata = false\n\n[[source]]\nname = "live"\npaths = ["%s"]\nparser = "raw"\n'
                'stream = "bench"\nstart_at = "beginning"\n' % (work, r.port, log))
    cmd = [B.redtail_bin(), "run", "-c", cfg]
    print("redis:  ", " ".join(r.cmd))
    print("agent:  ", " ".join(cmd), "  # parser=raw metadata=false, default poll/commit intervals")
    print("writer:  O_APPEND write(2) of the lines due each 1 ms tick, %.0f s per rate" % a.duration)
    out = open(os.path.join(work, "agent.out"), "w")
    agent = subprocess.Popen(cmd, stdout=out, stderr=out)
    time.sleep(2.0)  # let it open the file and settle
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    rows = []
    last_id = "0-0"
    seq = 0
    try:
        for rate in rates:
            c0 = B.proc_cpu(agent.pid)
            rc0 = r.cpu()
            t0 = time.perf_counter()
            n, secs, lag = write_phase(fd, rate, a.duration, seq)
            seq += n
            deadline = time.perf_counter() + 30
            while r.xlen("bench") < seq and time.perf_counter() < deadline:
                time.sleep(0.005)
            wall = time.perf_counter() - t0
            cpu = B.proc_cpu(agent.pid) - c0
            rcpu = r.cpu() - rc0
            hwm = B.proc_status(agent.pid, "VmHWM")
            lats, last_id = read_latencies(r, last_id, n)
            lats.sort()
            rows.append([rate, "%.0f" % (n / secs), n, len(lats),
                         "%.2f" % pct(lats, 50), "%.2f" % pct(lats, 99), "%.2f" % lats[-1] if lats else "-",
                         "%.1f" % (sum(lats) / len(lats)) if lats else "-",
                         "%.1f" % lag, "%.1f %%" % (100 * cpu / wall), "%.1f %%" % (100 * rcpu / wall),
                         "%.1f" % hwm])
            print("rate %d done: %s" % (rate, rows[-1]), flush=True)
            r.fast("XTRIM", "bench", "MAXLEN", 0)  # keep memory flat; IDs stay monotonic
            time.sleep(1.0)
    finally:
        os.close(fd)
        agent.send_signal(signal.SIGTERM)
        _, rc = B.wait_measured(agent)
        out.close()
        r.shutdown()
    print("\nagent exit code after SIGTERM: %d" % rc)
    print(B.table(["target lines/s", "achieved lines/s", "written", "received", "p50 ms",
                   "p99 ms", "max ms", "mean ms", "writer max lag ms", "agent CPU",
                   "redis CPU", "agent VmHWM MiB"], rows))
    print("latency = (XADD entry-ID ms + 1) - write time: an upper bound, true value within 1 ms below.")
    if a.keep:
        print("kept", work)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
