#!/usr/bin/env bash
# Redis ceiling (redis-cli --pipe) vs. redtail backfill/run on the same N lines.
# Usage: bench/ceiling_vs_agent.sh [N] [--rounds R] [--only v1,v2] [--keep]
# Env: REDTAIL=path/to/redtail (default target/release/redtail; build it first
# with `cargo build --release`). Starts its own redis-server instances on free
# ports (never 6379) and shuts them down. See ceiling_vs_agent.py for details.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec python3 "$here/ceiling_vs_agent.py" "$@"
