#!/usr/bin/env bash
# Create .venv with deepqueue, its worker extra and the test tools; install redis-server if
# missing. Where no GPU is present, the CPU build of torch goes in first: a bare `torch` from
# PyPI is a multi-GB CUDA build. Set TORCH_INDEX_URL to choose another torch index.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if ! command -v nvidia-smi >/dev/null 2>&1 && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  cpu_index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
  if .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" "$cpu_index" 2>/dev/null; then
    "${pip[@]}" "torch==$TORCH_VERSION" --index-url "$cpu_index"
  else
    # No reachable CPU index (offline mirrors, local wheel folders): pip's own configuration decides.
    "${pip[@]}" "torch==$TORCH_VERSION"
  fi
fi
"${pip[@]}" -e ".[worker,parquet,export,test,dev]"

if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is needed by the tests and the demo: install it (e.g. apt-get install redis-server)" >&2
    exit 1
  fi
fi
