#!/usr/bin/env bash
# redtail following 1,000 files: CPU and peak RSS while active, idle CPU while quiet.
# Usage: bench/many_files.sh [--files 1000] [--rate 10000] [--active 20] [--idle 30] [--literal] [--keep]
# Env: REDTAIL=path/to/redtail (default target/release/redtail).
set -euo pipefail
ulimit -n 4096 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 4096 ]; then
  echo "need ulimit -n >= 4096 (have $(ulimit -n))" >&2; exit 1
fi
here="$(cd "$(dirname "$0")" && pwd)"
exec python3 "$here/many_files.py" "$@"
