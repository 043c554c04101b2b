#!/usr/bin/env bash
# One-step set-up on Debian 12: host packages (QEMU 10, busybox, ...) and a virtualenv in .venv
# with pvbus and its test tools. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import pvbus, pytest, hypothesis, mypy' 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
fi
