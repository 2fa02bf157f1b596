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

A variable already set by the user wins. `MEMORYFORMER_ALLOCATOR=0` (or off / false / no) leaves everything as
it is. glibc applies the heap settings to the main thread's heap; blocks over 64 MiB allocated by other
threads still get their own mappings.
"""

from __future__ import annotations

import ctypes
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
    manages. `environ` defaults to os.environ; mallopt runs only for os.environ, and only for the
    variables this call set (glibc read the user's own at start-up)."""
    env = os.environ if environ is None else environ
    if env.get("MEMORYFORMER_ALLOCATOR", "1").strip().lower() in ("0", "off", "false", "no"):
        return {}
    wanted = {**DEFAULTS, **(GLIBC_DEFAULTS if is_glibc() else {})}
    filled = [key for key in wanted if key not in env]
    for key in filled:
        env[key] = wanted[key]
    if env is os.environ and is_glibc():
        for key in filled:
            if key in GLIBC_DEFAULTS:
                _mallopt(_MALLOPT_PARAMS[key], int(wanted[key]))
    return {key: env[key] for key in wanted}


_MALLOPT_PARAMS = {"MALLOC_MMAP_MAX_": _M_MMAP_MAX, "MALLOC_TRIM_THRESHOLD_": _M_TRIM_THRESHOLD}


def _mallopt(param: int, value: int) -> bool:
    """glibc mallopt(param, value); False where glibc refused it (mallopt returns 0 on failure)."""
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
