"""CPU allocator settings for the whole process, applied by the `memoryformer` command at start-up.

    from memoryformer import allocator
    allocator.configure()   # before the first large tensor; returns what it set

Two settings, both for speed, neither changes a result:

- **2 MiB pages for large tensors** (`THP_MEM_ALLOC_ENABLE=1`, read by PyTorch's CPU allocator at its
  first allocation). Memory Layers read scattered table rows, and on 4 KiB pages a TLB miss per row
  made forward + backward at N = 2048, d = 1024 1.6x slower (benchmarks/layer.py).
- **Freed memory kept for reuse** (glibc only: `MALLOC_MMAP_MAX_=0`, `MALLOC_TRIM_THRESHOLD_=-1`).
  By default glibc gives every block over 32 MiB its own mmap and returns it to the kernel when freed,
  so each training step page-faults its fresh gradients in again: for mf-tiny's 415M table parameters,
  1.7 GB of zeroed pages a step, which made its step at 4 x 512 1.4-1.55x pythia-70m's instead of
  0.83-0.92x (docs/performance.md). With these settings large blocks come from the heap and stay
  there: the process's memory never shrinks below its peak (it rarely would anyway). Set through
  `mallopt` for this process and through the environment for the processes it starts (workers,
  benchmarks, torchrun ranks), since glibc reads the variables at start-up.

A variable already set by the user wins. `MEMORYFORMER_ALLOCATOR=0` leaves everything as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from collections.abc import MutableMapping

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

DEFAULTS = {"THP_MEM_ALLOC_ENABLE": "1"}
GLIBC_DEFAULTS = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "-1"}


def is_glibc() -> bool:
    """Whether this Python runs on glibc (Linux distributions other than musl-based ones)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def configure(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Apply the settings above (user-set variables win); returns the variables now in effect that it
    manages. `environ` defaults to os.environ; mallopt is called only for os.environ."""
    env = os.environ if environ is None else environ
    if env.get("MEMORYFORMER_ALLOCATOR", "1") == "0":
        return {}
    wanted = {**DEFAULTS, **(GLIBC_DEFAULTS if is_glibc() else {})}
    for key, value in wanted.items():
        env.setdefault(key, value)
    if environ is None and is_glibc():
        _mallopt(_M_MMAP_MAX, env["MALLOC_MMAP_MAX_"])
        _mallopt(_M_TRIM_THRESHOLD, env["MALLOC_TRIM_THRESHOLD_"])
    return {key: env[key] for key in wanted}


def _mallopt(param: int, value: str) -> None:
    """glibc mallopt(param, int(value)); a value that is not an integer is left to glibc's own parsing."""
    try:
        number = int(value)
    except ValueError:
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt(ctypes.c_int(param), ctypes.c_int(number))
