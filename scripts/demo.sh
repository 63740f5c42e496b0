#!/usr/bin/env bash
# A five-minute tour of redtail on a generated nginx log.
#   scripts/demo.sh                      # starts a throwaway redis-server on a free port
#   scripts/demo.sh redis://host:6379/0  # or uses the Redis you name
# Everything it writes lives in one temp directory, printed at the start and removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "== installing redis-server (needed for the throwaway server and redis-cli)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server
fi

work=$(mktemp -d /tmp/redtail-demo.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
echo "== working in $work"

url=${1:-}
if [ -z "$url" ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
    --logfile "$work/redis.log" --daemonize no &
  pids+=($!)
  url="redis://127.0.0.1:$port/0"
  for _ in $(seq 100); do redis-cli -u "$url" ping >/dev/null 2>&1 && break; sleep 0.05; done
  echo "== started a throwaway redis-server at $url"
fi
cli() { redis-cli -u "$url" "$@"; }

echo "== building redtail (release)"
cargo build --release --quiet
bin="$root/target/release/redtail"

mkdir -p "$work/log"
gen() { # gen N START: nginx combined lines
  python3 - "$1" "$2" <<'PY'
import sys, random
n, start = int(sys.argv[1]), int(sys.argv[2])
random.seed(start)
paths = ["/", "/index.html", "/api/v1/items?id=%d", "/login", "/static/app.js"]
for i in range(start, start + n):
    p = random.choice(paths)
    p = p % i if "%d" in p else p
    print('10.0.%d.%d - - [24/Nov/2026:10:%02d:%02d +0000] "GET %s HTTP/1.1" %d %d "-" "demo-agent/1.0 (line %d)"'
          % (i % 250, i % 200, (i // 60) % 60, i % 60, p, random.choice([200, 200, 200, 304, 404, 500]), random.randint(100, 9000), i))
PY
}
gen 100000 0 > "$work/log/access.log"
printf 'this is not an access log line\n' >> "$work/log/access.log"

cat > "$work/redtail.toml" <<TOML
[agent]
state_dir = "$work/state"
glob_interval = "200ms"
rotate_wait = "1s"
[redis]
url = "$url"
[[source]]
name = "nginx"
paths = ["$work/log/access.log*"]
parser = "nginx"
stream = "demo:nginx"
TOML
echo "== config ($work/redtail.toml)"; cat "$work/redtail.toml"
"$bin" validate -c "$work/redtail.toml"

echo; echo "== backfill: 100,001 lines, one of them not nginx"
"$bin" backfill -c "$work/redtail.toml"
echo "XLEN demo:nginx = $(cli XLEN demo:nginx)"

echo; echo "== backfill again: nothing new, nothing published twice"
"$bin" backfill -c "$work/redtail.toml"

echo; echo "== run: follow the file, rotate it like logrotate (rename + new file), append"
"$bin" run -c "$work/redtail.toml" 2> "$work/agent.log" &
agent=$!; pids+=($agent)
sleep 1
gen 500 100000 >> "$work/log/access.log"
mv "$work/log/access.log" "$work/log/access.log.1"
gen 250 100500 >> "$work/log/access.log.1"     # late writes to the rotated file
gen 1000 100750 > "$work/log/access.log"
for _ in $(seq 100); do [ "$(cli XLEN demo:nginx)" -ge 101750 ] && break; sleep 0.1; done
kill -TERM "$agent"; wait "$agent" || true
echo "XLEN demo:nginx = $(cli XLEN demo:nginx) (expected 101750)"

echo; echo "== the newest entry"
cli XREVRANGE demo:nginx + - COUNT 1
echo; echo "== checkpoints"
"$bin" checkpoints -c "$work/redtail.toml"
echo; echo "== dead letters"
"$bin" dlq stats -c "$work/redtail.toml"
echo; echo "== agent log (last lines)"; tail -n 8 "$work/agent.log"
