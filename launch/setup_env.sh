#!/usr/bin/env bash
# Creates (or reuses) the project virtualenv in .venv and installs convoy into it.
#   bash launch/setup_env.sh            # runtime: TensorFlow (CPU build) + convoy
#   bash launch/setup_env.sh --test     # plus the test tools and a Horovod build
# Idempotent: a second run only checks what is there. Set CONVOY_TF_EXTRA=gpu on a CUDA machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    # Debian's python3 ships venv separately; the base image may not have it.
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    "$PYTHON" -m venv .venv
  fi
fi
VENV_PY=$PWD/.venv/bin/python

extras="${CONVOY_TF_EXTRA:-cpu}"
[[ "${1:-}" == "--test" ]] && extras="$extras,test"
# Skip pip entirely when the same install was already done from the same setup.py.
stamp=.venv/.convoy-install-$(sha256sum setup.py | cut -c1-16)-${extras//,/-}
if [[ ! -f "$stamp" ]]; then
  "$VENV_PY" -m pip install --quiet --upgrade pip
  "$VENV_PY" -m pip install --quiet -e ".[$extras]"
  touch "$stamp"
fi

if [[ "${1:-}" == "--test" ]]; then
  # The image tests check the MPIJob ssh configs with the real sshd and ssh.
  missing=()
  [[ -x /usr/sbin/sshd ]] || missing+=(openssh-server)
  command -v ssh >/dev/null || missing+=(openssh-client)
  if (( ${#missing[@]} )); then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  bash launch/install_horovod.sh "$VENV_PY"
fi
