#!/usr/bin/env bash
# Set up the project in ./.venv, from nothing, idempotently.
#   scripts/setup.sh          runtime (CPU build of torch, onnxruntime)
#   scripts/setup.sh --test   + test tools, and a Python 3.12 venv with videosdk-agents
#                               (./.venv312) for the wire-compatibility tests
#   scripts/setup.sh --gpu    CUDA build of torch and onnxruntime-gpu instead
set -euo pipefail
cd "$(dirname "$0")/.."

extras="cpu"
with_test=0
gpu=0
for arg in "$@"; do
  case "$arg" in
    --test) with_test=1 ;;
    --gpu) gpu=1 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done
[ "$gpu" = 1 ] && extras="gpu"
[ "$with_test" = 1 ] && extras="$extras,test"

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ "$gpu" = 1 ]; then
    "${pip[@]}" "torch>=2.4,<3"
  else
    # A CPU build first: a bare 'torch' requirement would pull a multi-GB CUDA build.
    "${pip[@]}" "torch==2.13.0"
  fi
fi
"${pip[@]}" -e ".[$extras]"

if [ "$with_test" = 1 ]; then
  if [ ! -x .venv312/bin/python ] && command -v python3.12 >/dev/null 2>&1; then
    PYENV_VERSION="${PYENV_VERSION_312:-3.12.1}" python3.12 -m venv .venv312 || true
  fi
  if [ -x .venv312/bin/python ]; then
    .venv312/bin/python -m pip install -q --disable-pip-version-check videosdk-agents PyJWT
  fi
fi
