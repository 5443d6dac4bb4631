#!/usr/bin/env bash
# Set up (or reuse) the venv, then lint (ruff check + format check) and run the test suite.
# Fails when ruff finds a problem, when a test fails, or when no test ran (pytest exit 5).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
set +e
.venv/bin/ruff check --quiet . && .venv/bin/ruff format --check --quiet .
lint=$?
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
fi
if [ "$lint" -ne 0 ]; then
  echo "error: ruff found problems (run .venv/bin/ruff check --fix . && .venv/bin/ruff format .)" >&2
  [ "$rc" -eq 0 ] && rc=1
fi
exit "$rc"
