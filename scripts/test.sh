#!/usr/bin/env bash
# Runs redtail's whole test suite. Installs what the tests need when it is missing:
# redis-server (each test starts its own, on a free loopback port) and logrotate.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v logrotate >/dev/null 2>&1 || [ -x /usr/sbin/logrotate ] || need+=(logrotate)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
command -v redis-server >/dev/null 2>&1 || { echo "redis-server is still missing" >&2; exit 1; }

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
  # nextest does not run doc tests.
  cargo test --workspace --doc --quiet
else
  cargo test --workspace "$@"
fi
