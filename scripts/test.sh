#!/usr/bin/env bash
# The test command: installs what is needed, checks lint and types, then runs the whole suite
# (fast tests first, then the real-guest tests under QEMU TCG). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check src tests
.venv/bin/ruff format --check src tests
.venv/bin/mypy
.venv/bin/pvbus guest build
exec .venv/bin/pytest -q "$@"
