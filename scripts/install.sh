#!/usr/bin/env bash
# One-step set-up on Debian 12: host packages (QEMU 10, busybox, ...) and a virtualenv in .venv
# with pvbus, its test tools and the benchmark's plotting. Idempotent: a second run only checks
# (the venv is refreshed whenever pyproject.toml changed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.pvbus-pyproject.sha256
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c 'import pvbus' 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test,bench]'
  echo "$want" > "$stamp"
fi
