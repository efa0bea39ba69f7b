#!/usr/bin/env bash
# Sets up .venv with the test tools and Horovod, then runs the whole test suite.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -k trainer`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh --test
# Style first: seconds, and a failure names the file and line.
.venv/bin/ruff format --check --quiet . || { echo "style: run .venv/bin/ruff format ." >&2; exit 1; }
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest tests -q -rfE --durations=15 "$@"
