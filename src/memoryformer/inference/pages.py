"""Back large parameters with 2 MiB pages (Linux transparent huge pages), for faster inference.

A Memory Layer reads K scattered table rows per token. With 4 KiB pages nearly every row is a TLB
miss and a page walk; on the 2-core AMD EPYC this project measures on, that made a decoding block
3-4x slower than with 2 MiB pages (benchmarks/results). Dense layers stream their weights and gain
little, but get the same treatment so that comparisons stay fair.

`use_huge_pages(model)` moves every parameter and buffer of at least `min_bytes` into freshly
mapped memory that is advised `MADV_HUGEPAGE` *before* it is first written, so the kernel hands out
huge pages at once (no background collapse). It is a no-op where THP is unavailable (non-Linux,
THP `never`) and never changes values. The same can be had for a whole process by starting Python
with `THP_MEM_ALLOC_ENABLE=1` (PyTorch's allocator then advises every large allocation).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from pathlib import Path

import torch
from torch import nn

MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """True on Linux with transparent huge pages in `always` or `madvise` mode."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        setting = _THP_SETTING.read_text()
    except OSError:
        return False
    return "[never]" not in setting


def _madvise(addr: int, length: int) -> bool:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), MADV_HUGEPAGE) == 0


def huge_page_tensor(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor shaped like `like`, advised for huge pages before use.

    The memory is an anonymous mapping (padded to 2 MiB alignment) owned by the returned tensor.
    """
    nbytes = like.numel() * like.element_size()
    buffer = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # untouched
    base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    offset = (-base) % HUGE_PAGE
    if nbytes >= HUGE_PAGE:
        _madvise(base + offset, nbytes - nbytes % HUGE_PAGE)  # a hint: failure only costs speed
    flat = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(like.dtype).view(like.shape)


def use_huge_pages(module: nn.Module, *, min_bytes: int = 8 << 20) -> int:
    """Move `module`'s CPU parameters and buffers of at least `min_bytes` onto huge pages, in place.

    Values, dtypes, shapes and `requires_grad` are unchanged (parameters keep their identity, so
    optimizers and hooks still see them). Returns the number of bytes moved (0 where THP is
    unavailable). Meant for inference: a later `.to()` or `load_state_dict` with new storage undoes it.
    """
    if not huge_pages_available():
        return 0
    moved = 0
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            nbytes = tensor.numel() * tensor.element_size()
            if tensor.device.type != "cpu" or nbytes < min_bytes or not tensor.is_contiguous():
                continue
            fresh = huge_page_tensor(tensor)
            fresh.copy_(tensor)
            tensor.data = fresh
            moved += nbytes
    return moved
