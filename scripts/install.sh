#!/usr/bin/env bash
# Set up a fresh machine: PyTorch (the local CPU build when torch is missing), then this package
# with everything its tests, benchmarks and main job use, then the C++ kernels (built once here so
# that the first run does not compile; skipped with one line where there is no C++ toolchain, and an
# install failure only when MEMORYFORMER_REQUIRE_KERNELS=1 and the build fails; docs/kernels.md).
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[dev]"
python -m memoryformer.kernels.build
