"""Which implementation the Memory Layer uses: the backend switch and the shape thresholds.

Backends:
    "auto"    (default) the C++ kernels where they are supported and measured faster, else pure PyTorch;
    "kernels" the C++ kernels wherever they are supported (dtype, device), whatever the shape;
    "torch"   always the pure-PyTorch reference path of memoryformer.core.layer.

The default comes from the environment variable MEMORYFORMER_KERNELS: 0/off/torch -> "torch",
1/on/auto (or unset) -> "auto", force/kernels -> "kernels".
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator

BACKENDS = ("auto", "kernels", "torch")
_ENV_MAP = {
    "": "auto", "1": "auto", "on": "auto", "auto": "auto", "true": "auto",
    "0": "torch", "off": "torch", "torch": "torch", "false": "torch",
    "force": "kernels", "kernels": "kernels",
}


def _from_env() -> str:
    raw = os.environ.get("MEMORYFORMER_KERNELS", "").strip().lower()
    if raw not in _ENV_MAP:
        raise ValueError(
            f"MEMORYFORMER_KERNELS={raw!r} is not understood; use 0 (pure PyTorch), 1 (auto) or force"
        )
    return _ENV_MAP[raw]


def _initial() -> str:
    try:
        return _from_env()
    except ValueError as exc:  # a typo in the environment must not break `import memoryformer`
        warnings.warn(f"{exc}; using 'auto'", RuntimeWarning, stacklevel=2)
        return "auto"


_global = {"backend": _initial()}
_local = threading.local()


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The backend in force for this thread (a `backend(...)` context wins over `set_backend`)."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else _global["backend"]


def set_backend(name: str) -> str:
    """Set the process-wide backend; returns the previous one."""
    previous = _global["backend"]
    _global["backend"] = _check(name)
    return previous


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Use backend `name` inside the block (this thread only), e.g. `with backend("torch"): ...`."""
    _check(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()
