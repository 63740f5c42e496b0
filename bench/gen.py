#!/usr/bin/env python3
"""Generate N deterministic nginx "combined" access-log lines (~200 bytes each).

Usage: bench/gen.py N FILE [--seed S]      (FILE "-" writes to stdout)

Varied client IPs (about 10 % IPv6), methods, paths with query strings,
statuses, sizes, referers and user agents. Same N and seed => same bytes.
"""
import argparse
import random
import sys

METHODS = ["GET"] * 14 + ["POST"] * 3 + ["PUT", "DELETE", "HEAD"]
STATUSES = [200] * 30 + [201, 204, 301, 302, 304, 304, 400, 401, 403, 404, 404, 404, 499, 500, 502, 503]
SECTIONS = ["api/v1/users", "api/v2/orders", "static/js", "static/css", "img/products",
            "blog", "search", "account/settings", "cart", "checkout", "api/v1/metrics", "docs"]
EXT = ["", "", "", ".html", ".json", ".js", ".css", ".png", ".jpg", ".svg"]
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
         "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]
REFERERS = ["-", "-", "https://www.example.com/", "https://www.google.com/search?q=redis+streams",
            "https://shop.example.com/cart", "https://news.ycombinator.com/", "https://t.co/x1Yz"]
UAS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_2) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "curl/8.5.0",
    "Go-http-client/1.1",
    "python-requests/2.31.0",
    "Googlebot/2.1 (+http://www.google.com/bot.html)",
]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def ip(r):
    if r.random() < 0.1:
        return "2001:db8:%x:%x::%x" % (r.randrange(65536), r.randrange(65536), r.randrange(1, 65536))
    return "%d.%d.%d.%d" % (r.choice([10, 172, 192, 203, 198, 81, 93]), r.randrange(256),
                            r.randrange(256), r.randrange(1, 255))


def path(r):
    p = "/" + r.choice(SECTIONS) + "/" + r.choice(WORDS) + str(r.randrange(10000)) + r.choice(EXT)
    if r.random() < 0.4:
        p += "?id=%d&q=%s&page=%d" % (r.randrange(10**6), r.choice(WORDS), r.randrange(1, 50))
    return p


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int)
    ap.add_argument("file")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    r = random.Random(a.seed)
    out = sys.stdout.buffer if a.file == "-" else open(a.file, "wb")
    t = 1_700_000_000  # base epoch second; advances slowly
    buf = []
    for i in range(a.n):
        if r.random() < 0.3:
            t += 1
        # fast manual UTC formatting (no time.strftime per line)
        day, rem = divmod(t, 86400)
        hh, rem = divmod(rem, 3600)
        mm, ss = divmod(rem, 60)
        d = 1 + day % 28
        mon = MONTHS[(day // 28) % 12]
        user = "-" if r.random() < 0.9 else r.choice(WORDS)
        line = '%s - %s [%02d/%s/2023:%02d:%02d:%02d +0000] "%s %s HTTP/%s" %d %d "%s" "%s"\n' % (
            ip(r), user, d, mon, hh, mm, ss, r.choice(METHODS), path(r),
            r.choice(["1.1", "1.1", "2.0"]), r.choice(STATUSES), r.randrange(0, 60000),
            r.choice(REFERERS), r.choice(UAS))
        buf.append(line)
        if len(buf) >= 10000:
            out.write("".join(buf).encode())
            buf.clear()
    out.write("".join(buf).encode())
    out.flush()
    if out is not sys.stdout.buffer:
        out.close()


if __name__ == "__main__":
    main()
