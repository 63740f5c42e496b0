"""Shared helpers for the redtail benchmark scripts (stdlib only).

Fresh redis-server instances on free ports (never 6379), CPU seconds from
/proc/<pid>/stat, peak RSS from wait4 rusage (the same getrusage figure that
`/usr/bin/time -f %M` prints), medians, and table printing.
"""
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def redtail_bin():
    return os.environ.get("REDTAIL", os.path.join(REPO, "target", "release", "redtail"))


def free_port(start=16400):
    p = start
    while p < 65000:
        if p != 6379:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                    return p
                except OSError:
                    pass
        p += 1
    raise RuntimeError("no free port")


def proc_cpu(pid):
    """user+sys CPU seconds of a live process (from /proc/<pid>/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def proc_status(pid, key):
    """A kB value from /proc/<pid>/status, e.g. VmHWM, VmRSS (as MiB)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return None


class Redis:
    """A private, non-persistent redis-server on a free port."""

    def __init__(self, workdir, port=None):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-%d-" % self.port, dir=workdir)
        self.cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--daemonize", "yes",
                    "--logfile", os.path.join(self.dir, "redis.log"), "--dir", self.dir,
                    "--pidfile", os.path.join(self.dir, "redis.pid")]
        subprocess.run(self.cmd, check=True)
        deadline = time.time() + 10
        while True:
            try:
                if self.command("PING") == "PONG":
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("redis-server on %d did not start" % self.port)
            time.sleep(0.02)
        while True:
            try:
                with open(os.path.join(self.dir, "redis.pid")) as f:
                    self.pid = int(f.read().strip())
                break
            except (OSError, ValueError):
                time.sleep(0.02)
        self._sock = None

    def command(self, *args):
        """One command over a short-lived connection; returns str/int."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(encode(*args))
            return read_reply(s.makefile("rb"))

    def conn(self):
        if self._sock is None:
            self._sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            self._rf = self._sock.makefile("rb")
        return self._sock, self._rf

    def fast(self, *args):
        """One command over a persistent connection (for polling)."""
        s, rf = self.conn()
        s.sendall(encode(*args))
        return read_reply(rf)

    def xlen(self, stream):
        return self.fast("XLEN", stream)

    def cpu(self):
        return proc_cpu(self.pid)

    def shutdown(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while os.path.exists("/proc/%d" % self.pid) and time.time() < deadline:
            try:
                with open("/proc/%d/stat" % self.pid) as f:
                    if f.read().split(")")[-1].split()[0] == "Z":
                        break
            except OSError:
                break
            time.sleep(0.02)
        shutil.rmtree(self.dir, ignore_errors=True)


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def read_reply(rf):
    line = rf.readline()
    if not line:
        raise OSError("connection closed")
    t, rest = line[:1], line[1:-2]
    if t == b"+":
        return rest.decode()
    if t == b"-":
        raise RuntimeError(rest.decode())
    if t == b":":
        return int(rest)
    if t == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = rf.read(n + 2)[:-2]
        return data
    if t == b"*":
        n = int(rest)
        if n < 0:
            return None
        return [read_reply(rf) for _ in range(n)]
    raise RuntimeError("bad reply %r" % line)


def run_measured(cmd, stdout=None, stderr=None, stdin=None):
    """Run cmd under `/usr/bin/time -f "%U %S %M"`; return (wall_s, cpu_s, maxrss_mib, rc).

    /usr/bin/time (a small process) is used rather than wait4 from Python because
    Linux carries the forking parent's RSS high-water mark into the child's
    ru_maxrss, which would report Python's RSS for small children.
    """
    fd, tf = tempfile.mkstemp(prefix="time-")
    os.close(fd)
    t0 = time.perf_counter()
    p = subprocess.Popen(["/usr/bin/time", "-o", tf, "-f", "%U %S %M"] + list(cmd),
                         stdout=stdout, stderr=stderr, stdin=stdin)
    p.wait()
    wall = time.perf_counter() - t0
    with open(tf) as f:
        last = f.read().strip().splitlines()[-1].split()
    os.unlink(tf)
    return wall, float(last[0]) + float(last[1]), int(last[2]) / 1024.0, p.returncode


def wait_measured(p):
    """Reap a Popen (already signalled); return (cpu_s, returncode)."""
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return ru.ru_utime + ru.ru_stime, p.returncode


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def table(headers, rows):
    cols = list(zip(*([headers] + [[str(c) for c in r] for r in rows])))
    widths = [max(len(c) for c in col) for col in cols]
    def fmt(r):
        return "| " + " | ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                 for i, (c, w) in enumerate(zip(r, widths))) + " |"
    lines = [fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def machine_line():
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = ["?"] * 3
    rv = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    ver = next((x[2:] for x in rv if x.startswith("v=")), "?")
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = "?"
    try:
        built = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(redtail_bin())))
    except OSError:
        built = "missing!"
    return "machine: %d CPUs (shared VM), Redis %s, redtail %s (built %s; repo HEAD %s), loadavg %s" % (
        os.cpu_count(), ver, redtail_bin(), built, rev, " ".join(load))
