#!/usr/bin/env bash
# Set up a fresh machine: PyTorch (the local CPU build when torch is missing), then this package
# with everything its tests, benchmarks and main job use. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[dev]"
