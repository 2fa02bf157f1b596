"""Squared 2-norms of table gradients, summed by the Memory Layer backward as it writes them.

Gradient clipping needs the global 2-norm of every gradient, which is one more read of every table
gradient each step (415M floats at mf-tiny). The backward kernel holds each gradient row in registers
when it writes it, so it sums the squares there; `GradNormTally` collects those sums during one
backward window, and `memoryformer.train.optim.clip_gradients` uses a sum only while the gradient is
provably the one the kernel wrote:

- the same parameter (keyed by its storage), recorded once in the window (a table used twice, or a
  second micro-batch, invalidates the record: autograd then adds two gradients);
- the same gradient storage (autograd handed the kernel's tensor to `param.grad` instead of a copy);
- the same version counter (an in-place change through torch ops after the kernel, such as DDP's
  copy-back, GradScaler's unscale or a second micro-batch accumulated into it, bumps it);
- the storage still alive (a weak reference: a new gradient that lands on the freed address of the
  kernel's one is not mistaken for it).

Any other gradient is read as before. Not seen: writes that bypass the version counter, such as
`param.grad.data.mul_()`, a raw `torch.distributed.all_reduce(param.grad)` or fused AdamW writing back
divided gradients; after those, call `clear()` (`clip_and_step` does, after its step). Each thread has
its own active tally (CPU autograd runs a backward on the thread that called it). Only the
record-keeping lives here; the sums come from `memory_layer_backward` (memory_kernels.cpp).

    with GradNormTally() as tally:
        loss.backward()
    norm = clip_gradients(params, max_norm, sharded=False, tally=tally)
"""

from __future__ import annotations

import threading
from typing import NamedTuple

from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

_state = threading.local()  # .active: the tally this thread's backward records into (None: no recording)


def _active() -> GradNormTally | None:
    return getattr(_state, "active", None)


class _Record(NamedTuple):
    grad_ptr: int
    grad_version: int
    numel: int
    sqnorm: float
    storage: StorageWeakRef  # expired once the kernel's gradient is freed


class GradNormTally:
    """Records {parameter storage: squared norm of its gradient} for one backward window (a context
    manager; windows do not nest)."""

    def __init__(self) -> None:
        self._records: dict[int, _Record | None] = {}

    def __enter__(self) -> GradNormTally:
        if _active() is not None:
            raise RuntimeError("GradNormTally: a tally is already active in this thread; windows do not nest")
        self._records.clear()
        _state.active = self
        return self

    def __exit__(self, *exc) -> None:
        _state.active = None

    def clear(self) -> None:
        """Forget every record (after a change to the gradients that bypasses the version counter)."""
        self._records.clear()

    def record(self, param: Tensor, grad: Tensor, sqnorm: float) -> None:
        """Note that `grad` (about to become param.grad) has squared 2-norm `sqnorm`."""
        key = param.data_ptr()
        if key in self._records:  # a second gradient for the same parameter: autograd will sum them
            self._records[key] = None
            return
        self._records[key] = _Record(grad.data_ptr(), grad._version, grad.numel(), float(sqnorm),
                                     StorageWeakRef(grad.untyped_storage()))

    def sqnorm(self, param: Tensor) -> float | None:
        """The recorded squared norm of param.grad, or None unless param.grad is still exactly the
        gradient the kernel wrote."""
        rec = self._records.get(param.data_ptr())
        grad = param.grad
        if rec is None or grad is None:
            return None
        if (grad.data_ptr(), grad._version, grad.numel()) != (rec.grad_ptr, rec.grad_version, rec.numel):
            return None
        return None if rec.storage.expired() else rec.sqnorm

    def __len__(self) -> int:
        return sum(r is not None for r in self._records.values())


def record(param: Tensor, grad: Tensor, sqnorm: float) -> None:
    """Record into the active tally, if any (called by the Memory Layer's backward)."""
    tally = _active()
    if tally is not None and sqnorm >= 0.0 and param.is_leaf:
        tally.record(param, grad, sqnorm)


def active() -> bool:
    """Whether a tally is collecting in this thread (the backward then reads the kernel's sums)."""
    return _active() is not None
