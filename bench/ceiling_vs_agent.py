#!/usr/bin/env python3
"""Redis ceiling (redis-cli --pipe of pre-encoded XADDs) vs. redtail, same lines.

Usage: bench/ceiling_vs_agent.py [N] [--rounds R] [--keep]
(bench/ceiling_vs_agent.sh is the documented entry point.)

Variants, run interleaved (every variant once per round, R rounds, default 3),
each into its own freshly started redis-server:
  ceiling-raw     redis-cli --pipe of `XADD bench * message <line>`
  backfill-raw    redtail backfill, parser raw, metadata = false (apples to apples)
  backfill-meta   redtail backfill, parser raw, metadata = true
  run-raw         redtail run from the beginning, metadata = false; time from
                  start until XLEN == N (polled every 10 ms), then SIGTERM
  ceiling-nginx   redis-cli --pipe of XADD with the fields `redtail parse
                  --parser nginx` produces (message included)
  backfill-nginx  redtail backfill, parser nginx, metadata = false
Figures per run: wall seconds, lines/s, client CPU s (user+sys), client peak RSS
(`/usr/bin/time -f %M`; for run-raw VmHWM from /proc just before SIGTERM), redis-server CPU s (from
/proc/<pid>/stat before/after). Medians over rounds are printed; the ratio is
median(agent lines/s) / median(matching ceiling lines/s).
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402


def write_resp_raw(log, out):
    with open(log, "rb") as f, open(out, "wb") as o:
        pre = B.encode("XADD", "bench", "*", "message", "")[:-len(b"$0\r\n\r\n")]
        buf = []
        for line in f:
            line = line.rstrip(b"\n")
            buf.append(pre + b"$%d\r\n%s\r\n" % (len(line), line))
            if len(buf) >= 10000:
                o.write(b"".join(buf))
                buf.clear()
        o.write(b"".join(buf))


def write_resp_nginx(log, out):
    cmd = [B.redtail_bin(), "parse", "--parser", "nginx", log]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    n = 0
    with open(out, "wb") as o:
        buf = []
        for line in p.stdout:
            d = json.loads(line)
            args = ["XADD", "bench", "*", "message", d.pop("message")]
            for k, v in d.items():
                args += [k, v if isinstance(v, str) else json.dumps(v)]
            buf.append(B.encode(*args))
            n += 1
            if len(buf) >= 10000:
                o.write(b"".join(buf))
                buf.clear()
        o.write(b"".join(buf))
    err = p.stderr.read().decode().strip()
    p.wait()
    return n, cmd, err


def config(path, port, state, log, parser, metadata):
    with open(path, "w") as f:
        f.write('[agent]\nstate_dir = "%s"\n\n[redis]\nurl = "redis://127.0.0.1:%d/0"\n'
                'metadata = %s\n\n[[source]]\nname = "b"\npaths = ["%s"]\nparser = "%s"\n'
                'stream = "bench"\nstart_at = "beginning"\n'
                % (state, port, "true" if metadata else "false", log, parser))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int, nargs="?", default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", help="comma-separated subset of variants")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="rt-ceiling-")
    log = os.path.join(work, "access.log")
    rt = B.redtail_bin()
    print(B.machine_line())
    print("workdir:", work)
    t = time.time()
    gen = [sys.executable, os.path.join(B.HERE, "gen.py"), str(a.n), log]
    subprocess.run(gen, check=True)
    size = os.path.getsize(log)
    print("generated: %s  (%d lines, %d bytes, %.1f bytes/line, %.1f s)"
          % (" ".join(gen), a.n, size, size / a.n, time.time() - t))
    raw_resp = os.path.join(work, "raw.resp")
    write_resp_raw(log, raw_resp)
    ng_resp = os.path.join(work, "nginx.resp")
    n_ng, pcmd, perr = write_resp_nginx(log, ng_resp)
    print("pre-encoded: %s (%d bytes); %s (%d bytes, from `%s`: %s)"
          % (raw_resp, os.path.getsize(raw_resp), ng_resp, os.path.getsize(ng_resp),
             " ".join(pcmd), perr))
    if n_ng != a.n:
        print("WARNING: nginx parse gave %d records for %d lines" % (n_ng, a.n))

    variants = ["ceiling-raw", "backfill-raw", "backfill-meta", "run-raw",
                "ceiling-nginx", "backfill-nginx"]
    if a.only:
        variants = [v for v in variants if v in a.only.split(",")]
    results = {v: [] for v in variants}
    cmds = {}
    for rnd in range(1, a.rounds + 1):
        for v in variants:
            r = B.Redis(work)
            state = os.path.join(work, "state-" + v)
            shutil.rmtree(state, ignore_errors=True)
            cfg = os.path.join(work, v + ".toml")
            expect = a.n
            try:
                if v.startswith("ceiling"):
                    resp = raw_resp if v == "ceiling-raw" else ng_resp
                    cmd = ["redis-cli", "-p", str(r.port), "--pipe"]
                    cmds[v] = " ".join(cmd) + " < " + resp
                    c0 = r.cpu()
                    with open(resp, "rb") as fin:
                        wall, cpu, rss, rc = B.run_measured(cmd, stdin=fin,
                                                            stdout=subprocess.DEVNULL)
                    rcpu = r.cpu() - c0
                elif v.startswith("backfill"):
                    parser = "nginx" if v == "backfill-nginx" else "raw"
                    config(cfg, r.port, state, log, parser, v == "backfill-meta")
                    cmd = [rt, "backfill", "-c", cfg, "--no-progress"]
                    cmds[v] = " ".join(cmd) + "   # parser=%s metadata=%s" % (
                        parser, "true" if v == "backfill-meta" else "false")
                    c0 = r.cpu()
                    with open(os.path.join(work, v + ".out"), "w") as fo:
                        wall, cpu, rss, rc = B.run_measured(cmd, stdout=fo, stderr=fo)
                    rcpu = r.cpu() - c0
                else:  # run-raw
                    config(cfg, r.port, state, log, "raw", False)
                    cmd = [rt, "run", "-c", cfg]
                    cmds[v] = " ".join(cmd) + "   # parser=raw metadata=false; " \
                        "poll XLEN every 10 ms until == N, then SIGTERM"
                    c0 = r.cpu()
                    fo = open(os.path.join(work, v + ".out"), "w")
                    t0 = time.perf_counter()
                    p = subprocess.Popen(cmd, stdout=fo, stderr=fo)
                    deadline = t0 + 600
                    while r.xlen("bench") < expect and time.perf_counter() < deadline \
                            and p.poll() is None:
                        time.sleep(0.01)
                    wall = time.perf_counter() - t0
                    rcpu = r.cpu() - c0
                    rss = B.proc_status(p.pid, "VmHWM")
                    p.send_signal(signal.SIGTERM)
                    cpu, rc = B.wait_measured(p)
                    fo.close()
                got = r.xlen("bench")
            finally:
                r.shutdown()
            ok = "ok" if (got == expect and rc == 0) else "BAD(xlen=%d rc=%d)" % (got, rc)
            res = dict(wall=wall, lps=expect / wall, cpu=cpu, rss=rss, rcpu=rcpu, ok=ok)
            results[v].append(res)
            print("round %d %-15s %7.2f s %9.0f lines/s  client cpu %6.2f s  rss %6.1f MiB"
                  "  redis cpu %6.2f s  %s" % (rnd, v, wall, res["lps"], cpu, rss, rcpu, ok),
                  flush=True)

    print("\ncommands:")
    for v in variants:
        print("  %-15s %s" % (v, cmds.get(v, "")))
    print("\nmedians of %d rounds, N = %d lines (%.1f bytes/line):" % (a.rounds, a.n, size / a.n))
    rows = []
    med = {}
    for v in variants:
        rs = results[v]
        m = {k: B.median([x[k] for x in rs]) for k in ("wall", "lps", "cpu", "rss", "rcpu")}
        med[v] = m
    for v in variants:
        m = med[v]
        ceil = "ceiling-nginx" if "nginx" in v else "ceiling-raw"
        ratio = "%.0f %%" % (100 * m["lps"] / med[ceil]["lps"]) if ceil in med else "-"
        # same-round ratios (agent vs ceiling of the same round), median
        if ceil in results and not v.startswith("ceiling"):
            rr = [x["lps"] / c["lps"] for x, c in zip(results[v], results[ceil])]
            ratio += " (per-round %s)" % "/".join("%.0f" % (100 * q) for q in rr)
        rows.append([v, "%.2f" % m["wall"], "%.0f" % m["lps"],
                     "%.1f" % (m["lps"] * size / a.n / 1e6), ratio,
                     "%.2f" % m["cpu"], "%.1f" % m["rss"], "%.2f" % m["rcpu"],
                     "%.0f %%" % (100 * m["rcpu"] / m["wall"]),
                     ",".join(sorted(set(x["ok"] for x in results[v])))])
    print(B.table(["variant", "wall s", "lines/s", "MB/s", "vs ceiling", "client CPU s",
                   "client peak RSS MiB", "redis CPU s", "redis CPU %", "check"], rows))
    if a.keep:
        print("kept", work)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
