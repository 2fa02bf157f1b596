"""Squared 2-norms of table gradients, summed by the Memory Layer backward as it writes them.

Gradient clipping needs the global 2-norm of every gradient, which is one more read of every table
gradient each step (415M floats at mf-tiny). The backward kernel holds each gradient row in registers
when it writes it, so it sums the squares there; `GradNormTally` collects those sums during one
backward window, and `memoryformer.train.optim.clip_gradients` uses a sum only while the gradient is
provably the one the kernel wrote:

- the same parameter (keyed by its storage), recorded once in the window (a table used twice, or a
  second micro-batch, invalidates the record: autograd then adds two gradients);
- the same gradient storage (autograd handed the kernel's tensor to `param.grad` instead of a copy);
- the same version counter (an in-place change after the kernel, such as a DDP all-reduce, GradScaler's
  unscale or a second micro-batch accumulated into it, bumps it).

Any other gradient is read as before. Only the record-keeping lives here; the sums come from
`memory_layer_backward` (memory_kernels.cpp).

    with GradNormTally() as tally:
        loss.backward()
    norm = clip_gradients(params, max_norm, sharded=False, tally=tally)
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

_active: GradNormTally | None = None  # the tally the backward records into (None: no recording)


class _Record(NamedTuple):
    grad_ptr: int
    grad_version: int
    numel: int
    sqnorm: float


class GradNormTally:
    """Records {parameter storage: squared norm of its gradient} for one backward window (a context
    manager; windows do not nest)."""

    def __init__(self) -> None:
        self._records: dict[int, _Record | None] = {}

    def __enter__(self) -> GradNormTally:
        global _active
        if _active is not None:
            raise RuntimeError("GradNormTally: a tally is already active; windows do not nest")
        self._records.clear()
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None

    def record(self, param: Tensor, grad: Tensor, sqnorm: float) -> None:
        """Note that `grad` (about to become param.grad) has squared 2-norm `sqnorm`."""
        key = param.data_ptr()
        if key in self._records:  # a second gradient for the same parameter: autograd will sum them
            self._records[key] = None
            return
        self._records[key] = _Record(grad.data_ptr(), grad._version, grad.numel(), float(sqnorm))

    def sqnorm(self, param: Tensor) -> float | None:
        """The recorded squared norm of param.grad, or None unless param.grad is still exactly the
        gradient the kernel wrote."""
        rec = self._records.get(param.data_ptr())
        grad = param.grad
        if rec is None or grad is None:
            return None
        if (grad.data_ptr(), grad._version, grad.numel()) != (rec.grad_ptr, rec.grad_version, rec.numel):
            return None
        return rec.sqnorm

    def __len__(self) -> int:
        return sum(r is not None for r in self._records.values())


def record(param: Tensor, grad: Tensor, sqnorm: float) -> None:
    """Record into the active tally, if any (called by the Memory Layer's backward)."""
    if _active is not None and sqnorm >= 0.0 and param.is_leaf:
        _active.record(param, grad, sqnorm)


def active() -> bool:
    """Whether a tally is collecting (the backward then reads the kernel's sums)."""
    return _active is not None
