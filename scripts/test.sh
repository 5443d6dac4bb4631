#!/usr/bin/env bash
# Set up (or reuse) the venv, then run the test suite. Fails when no test ran (pytest exit 5).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
fi
exit "$rc"
