#!/usr/bin/env bash
# Set up (or reuse) the venv, then run the whole train-small-infer-large demo.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec .venv/bin/loramkit demo "$@"
