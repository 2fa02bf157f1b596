"""Shared fixtures: `built` builds (or loads) the optional C++ kernels once per session."""

from __future__ import annotations

import os

import pytest
import torch

from memoryformer import kernels
from memoryformer.kernels import _loader


@pytest.fixture(scope="session")
def built():
    """Build/load the kernels once for the session.

    Skips where there is no C++ toolchain. A failed build with a toolchain present skips with the
    reason, except under MEMORYFORMER_REQUIRE_KERNELS=1 (set by .ci/run), where load() raises and the
    tests error: in CI a broken kernel source must fail the kernel tests, not skip them.
    """
    missing = _loader.toolchain_missing()
    if missing:
        pytest.skip(f"kernels not buildable here: {missing}")
    if not kernels.load():  # raises KernelBuildError instead under MEMORYFORMER_REQUIRE_KERNELS=1
        pytest.skip(f"kernels failed to build: {kernels.last_error()!r}")
    return torch.ops.memoryformer


@pytest.fixture(autouse=True)
def _signal_handlers_restored(request):
    """Every test leaves SIGINT / SIGTERM handled as it found them (a leaked handler breaks later tests)."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    changed = [signal.Signals(s).name for s, h in before.items() if signal.getsignal(s) is not h]
    for s, h in before.items():
        signal.signal(s, h)
    assert not changed, f"{request.node.nodeid} left its {', '.join(changed)} handler installed"


@pytest.fixture(autouse=True)
def _allocator_left_alone(monkeypatch):
    """`memoryformer` commands run in-process call allocator.configure(): its environment variables are
    put back after each test, and its mallopt calls stay out of the pytest process."""
    from memoryformer import allocator

    keys = (*allocator.DEFAULTS, *allocator.GLIBC_DEFAULTS, "MEMORYFORMER_ALLOCATOR")
    before = {k: os.environ.get(k) for k in keys}
    monkeypatch.setattr(allocator, "_mallopt", lambda param, value: None)
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
