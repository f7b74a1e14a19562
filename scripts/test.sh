#!/usr/bin/env bash
# The whole test suite: set everything up, then lint, type-check and run every test tier.
# Tests that need root and network namespaces skip themselves (with the reason) when not root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy ambient ztunnel waypoint cni samples
echo "== pytest"
.venv/bin/pytest -q -p no:cacheprovider "$@"
