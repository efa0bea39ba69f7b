#!/usr/bin/env bash
# Sets up .venv with the test tools and Horovod, then runs the whole test suite.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -k trainer`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh --test
exec .venv/bin/python -m pytest tests -q -rfE --durations=15 "$@"
