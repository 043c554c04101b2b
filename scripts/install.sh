#!/usr/bin/env bash
# One-step set-up on Debian 12: host packages (QEMU 10, busybox, ...) and a virtualenv in .venv
# with pvbus, its test tools and the benchmark's plotting. Idempotent: a second run only checks
# (the venv is refreshed whenever pyproject.toml, setup.py or the C extension changed, or the
# extension is missing where a compiler is there to build it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.pvbus-pyproject.sha256
want=$(cat pyproject.toml setup.py src/pvbus/virtio/_fastring.c | sha256sum | cut -d' ' -f1)
fast='from pvbus.virtio.split import FAST_RING; assert FAST_RING or not __import__("shutil").which("gcc")'
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "$fast" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test,bench]'
  echo "$want" > "$stamp"
fi
