#!/usr/bin/env bash
# The test command: set up, start what the tests need, lint, type-check, run every test.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -k reconcile).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
VENV="${DAGSMITH_VENV:-.venv}"
echo "== ruff" >&2
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy" >&2
"$VENV/bin/mypy"
echo "== pytest" >&2
"$VENV/bin/python" -m pytest "$@"
