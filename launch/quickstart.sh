#!/usr/bin/env bash
# Quick start: set up .venv, then train and evaluate on the embedded MNIST sample.
# Extra arguments are trainer flags, e.g. `bash launch/quickstart.sh --model=lenet`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec .venv/bin/python -m trainer "$@"
