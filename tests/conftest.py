"""Shared fixtures: `built` builds (or loads) the optional C++ kernels once per session."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from memoryformer import kernels


def _toolchain_missing() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401
        except ImportError:
            return "ninja is not installed (torch.utils.cpp_extension needs it)"
    return None


@pytest.fixture(scope="session")
def built():
    """Build/load the kernels once for the session; skip with the reason when impossible."""
    missing = _toolchain_missing()
    if missing:
        pytest.skip(f"kernels not buildable here: {missing}")
    if not kernels.load():
        pytest.skip(f"kernels failed to build: {kernels.last_error()!r}")
    return torch.ops.memoryformer
