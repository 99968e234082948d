#!/usr/bin/env bash
# Create the virtualenv and install Dagsmith with its development tools.
# DAGSMITH_VENV chooses where (default .venv). Re-running is cheap: it reinstalls only when
# pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DAGSMITH_VENV:-.venv}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  echo "setup: Python 3.11 is required (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
fi
stamp="$VENV/.dagsmith-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing dependencies into $VENV" >&2
  "$VENV/bin/pip" install -q -e '.[dev]' 2>&1 | grep -v -e '^WARNING: Location' -e '^\s*$' || true
  "$VENV/bin/python" -c 'import dagsmith, fastapi, sqlalchemy, aio_pika' >/dev/null
  echo "$want" > "$stamp"
else
  # The venv may come from another checkout: point the editable install at this one.
  if ! "$VENV/bin/python" -c 'import dagsmith, pathlib, sys; sys.exit(pathlib.Path(dagsmith.__file__).resolve().parents[1] != pathlib.Path.cwd().resolve())' 2>/dev/null; then
    "$VENV/bin/pip" install -q --no-deps -e . 2>&1 | grep -v -e '^WARNING: Location' -e '^\s*$' || true
  fi
fi
