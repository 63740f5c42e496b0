#!/usr/bin/env python3
"""redtail following 1,000 files: active CPU/RSS and idle CPU.

Usage: bench/many_files.sh [--files 1000] [--rate 10000] [--active 20] [--idle 30] [--literal]
(run through many_files.sh, which raises `ulimit -n` to >= 4096)

One fresh redis-server and one `redtail run` (parser raw, metadata = false,
default agent settings: poll_interval 250ms, glob_interval 1s) on
paths = ["DIR/*.log"], with --files files each pre-seeded with 10 lines.
Phases:
  initial   time until XLEN == files*10 (the initial read of every file)
  idle-1    no writes for --idle s right after the initial read: agent CPU %
  active    a writer appends round-robin over all files at --rate lines/s
            total (the lines due each 1 ms tick, one write(2) per file visit)
            for --active s; agent CPU %, redis CPU %; then wait until XLEN
            equals everything written
  idle-2    no writes for --idle s after the active phase (starting 2 s after
            the drain): agent CPU %
Peak RSS is VmHWM from /proc/<agent>/status at the end of each phase.
"""
import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

LINE = (b'10.1.2.3 - - [24/Nov/2026:06:00:00 +0000] "GET /api/v1/users/alpha42?id=1 HTTP/1.1" '
        b'200 5120 "https://www.example.com/" "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) '
        b'Gecko/20100101 Firefox/121.0"\n')


def wait_xlen(r, n, timeout):
    t0 = time.perf_counter()
    while r.xlen("bench") < n and time.perf_counter() - t0 < timeout:
        time.sleep(0.01)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=10000)
    ap.add_argument("--active", type=float, default=20)
    ap.add_argument("--idle", type=float, default=30)
    ap.add_argument("--literal", action="store_true",
                    help="list the files one by one in paths instead of one glob")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(B.machine_line())
    print("ulimit -n: %d (hard %d)" % (soft, hard))
    work = tempfile.mkdtemp(prefix="rt-many-")
    logs = os.path.join(work, "logs")
    os.mkdir(logs)
    paths = [os.path.join(logs, "f%04d.log" % i) for i in range(a.files)]
    for p in paths:
        with open(p, "wb") as f:
            f.write(LINE * 10)
    r = B.Redis(work)
    cfg = os.path.join(work, "many.toml")
    with open(cfg, "w") as f:
        f.write('[agent]\nstate_dir = "%s/state"\n\n[redis]\nurl = "redis://127.0.0.1:%d/0"\n'
                'metadata = false\n\n[[source]]\nname = "many"\npaths = [%s]\n'
                'parser = "raw"\nstream = "bench"\nstart_at = "beginning"\n'
                % (work, r.port, ", ".join('"%s"' % p for p in paths) if a.literal
                   else '"%s/*.log"' % logs))
    cmd = [B.redtail_bin(), "run", "-c", cfg]
    print("redis: ", " ".join(r.cmd))
    print("agent: ", " ".join(cmd), "  # paths = [%s], %d files, raw, metadata=false"
          % ("each file listed" if a.literal else '"%s/*.log"' % logs, a.files))
    out = open(os.path.join(work, "agent.out"), "w")
    agent = subprocess.Popen(cmd, stdout=out, stderr=out)
    rows = []
    expect = a.files * 10
    try:
        t_init = wait_xlen(r, expect, 120)
        rows.append(["initial read (%d lines)" % expect, "%.2f s" % t_init, "-",
                     "-", "%.1f" % B.proc_status(agent.pid, "VmHWM"),
                     "xlen %d" % r.xlen("bench")])

        def idle(label):
            c0, rc0, t0 = B.proc_cpu(agent.pid), r.cpu(), time.perf_counter()
            time.sleep(a.idle)
            wall = time.perf_counter() - t0
            rows.append([label, "%.0f s" % wall,
                         "%.2f %%" % (100 * (B.proc_cpu(agent.pid) - c0) / wall),
                         "%.2f %%" % (100 * (r.cpu() - rc0) / wall),
                         "%.1f" % B.proc_status(agent.pid, "VmHWM"), "-"])
            print(rows[-1], flush=True)

        idle("idle-1: %d quiet files" % a.files)

        fds = [os.open(p, os.O_WRONLY | os.O_APPEND) for p in paths]
        c0, rc0 = B.proc_cpu(agent.pid), r.cpu()
        t0 = time.perf_counter()
        end = t0 + a.active
        n = 0
        nxt = t0
        i = 0
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            due = int(a.rate * (now - t0)) + 1 - n
            for _ in range(max(due, 0)):
                os.write(fds[i], LINE)
                i = (i + 1) % a.files
            n += max(due, 0)
            nxt += 0.001
            d = nxt - time.perf_counter()
            if d > 0:
                time.sleep(d)
        secs = time.perf_counter() - t0
        for fd in fds:
            os.close(fd)
        drain = wait_xlen(r, expect + n, 60)
        wall = time.perf_counter() - t0
        got = r.xlen("bench")
        rows.append(["active: %d lines/s round-robin (achieved %.0f)" % (a.rate, n / secs),
                     "%.1f s + %.2f s drain" % (secs, drain),
                     "%.1f %%" % (100 * (B.proc_cpu(agent.pid) - c0) / wall),
                     "%.1f %%" % (100 * (r.cpu() - rc0) / wall),
                     "%.1f" % B.proc_status(agent.pid, "VmHWM"),
                     "xlen %d of %d" % (got, expect + n)])
        print(rows[-1], flush=True)
        time.sleep(2)
        idle("idle-2: quiet again after activity")
    finally:
        agent.send_signal(signal.SIGTERM)
        _, rc = B.wait_measured(agent)
        out.close()
        r.shutdown()
    print("\nagent exit code after SIGTERM: %d" % rc)
    print(B.table(["phase", "duration", "agent CPU", "redis CPU", "agent VmHWM MiB", "check"], rows))
    if a.keep:
        print("kept", work)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
