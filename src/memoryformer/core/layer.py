"""The Memory Layer: a drop-in replacement for `nn.Linear` built from hash tables.

The maths (the hash, the "prob" / "l1" weights, the weighted gather-sum) is memoryformer.core.reference's,
the pure-PyTorch reference; see its docstring, the paper's Eq. 6-12 and docs/method.md. This module
checks what a user passes in (once, where it enters) and sends every computation through one
dispatch point per operation, `_hash` and `_layer`: the C++ kernels (memoryformer.kernels, whose
`try_*` hooks answer None where they do not apply: backend "torch", unsupported dtype or device,
shape thresholds, no build) or else the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from memoryformer import kernels as _kernels  # optional fast ops; importing compiles nothing
from memoryformer.core.reference import (
    check_hash_settings,
    check_tau,
    num_tables,
    reference_gather_sum,
    reference_memory_hash,
    reference_memory_layer,
)


def check_input(x: object, in_features: int | None = None) -> Tensor:
    """x as a floating-point tensor with a last dimension (of `in_features` when given)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"MemoryLayer expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"MemoryLayer expects a floating-point input, got dtype {x.dtype}")
    if x.dim() == 0 or (in_features is not None and x.shape[-1] != in_features):
        raise ValueError(f"MemoryLayer expected input with last dimension {in_features}, got shape {tuple(x.shape)}")
    return x


def check_hashed(hashed: object, lead_shape: torch.Size, k: int) -> None:
    """`hashed` is a (rows, weights) pair, both (*lead_shape, K), rows of an integer dtype."""
    if not (isinstance(hashed, (tuple, list)) and len(hashed) == 2):
        raise TypeError("hashed must be a (rows, weights) pair as returned by MemoryLayer.hash")
    rows, weights = hashed
    expected = (*lead_shape, k)
    if tuple(rows.shape) != expected or tuple(weights.shape) != expected:
        raise ValueError(f"hashed rows/weights must both have shape {expected}, "
                         f"got {tuple(rows.shape)} and {tuple(weights.shape)}")
    if rows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"hashed rows must be int64 or int32, got {rows.dtype}")


def _check_table(table: Tensor, k: int, tau: int) -> None:
    if table.dim() != 2 or table.shape[0] != k << tau:
        raise ValueError(f"table must have shape ({k << tau}, out_features) for K={k}, tau={tau}; "
                         f"got {tuple(table.shape)}")


# ---- the dispatch points: kernels where they apply, else the reference ------------------------
def _hash(x: Tensor, tau: int, weighting: str, temperature: float) -> tuple[Tensor, Tensor]:
    fast = _kernels.try_memory_hash(x, tau, weighting, temperature)  # the fused kernels' own hash
    return fast if fast is not None else reference_memory_hash(x, tau, weighting, temperature)


def _layer(x: Tensor, table: Tensor, bias: Tensor | None, tau: int, weighting: str, temperature: float,
           hashed: tuple[Tensor, Tensor] | None) -> Tensor:
    fast = _kernels.try_memory_layer(x, table, bias, tau, weighting, temperature, hashed)
    if fast is not None:
        return fast
    if hashed is None:
        hashed = _hash(x, tau, weighting, temperature)
    return reference_memory_layer(x, table, bias, tau, weighting, temperature, hashed)


def _shared_layers(x: Tensor, tables: list[Tensor], biases: list[Tensor | None], tau: int, weighting: str,
                   temperature: float) -> list[Tensor] | None:
    """Several tables under one hash of x through one fused kernel op, or None (then hash, gather each)."""
    return _kernels.try_memory_layers(x, tables, biases, tau, weighting, temperature)


# ---- functional API (checked) -------------------------------------------------------------------
def memory_hash(x: Tensor, tau: int, weighting: str = "prob", temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Hash x chunk by chunk: x (..., K * tau) -> rows (..., K) int64 (`k * 2**tau + bucket`) and
    differentiable weights (..., K) in x's dtype."""
    check_hash_settings(weighting, temperature)
    num_tables(check_input(x).shape[-1], check_tau(tau))
    return _hash(x, tau, weighting, temperature)


def gather_sum(rows: Tensor, weights: Tensor, table: Tensor, bias: Tensor | None = None) -> Tensor:
    """`out[n] = sum_k weights[n, k] * table[rows[n, k]] + bias`: rows, weights (..., K), table (R, out),
    bias (out,) or None -> (..., out) in table's dtype (memoryformer.core.reference.reference_gather_sum)."""
    return reference_gather_sum(rows, weights, table, bias)


def memory_layer(
    x: Tensor,
    table: Tensor,
    bias: Tensor | None = None,
    *,
    tau: int = 8,
    weighting: str = "prob",
    temperature: float = 1.0,
    hashed: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Functional Memory Layer, for users who keep their own tables.

    Args:
        x: (..., K * tau) input.
        table: (K * 2**tau, out_features); table k, bucket b is row k * 2**tau + b.
        bias: (out_features,) or None.
        hashed: optional (rows, weights) from `memory_hash(x, ...)`, to share one hash.
    Returns:
        (..., out_features).
    """
    check_hash_settings(weighting, temperature)
    k = num_tables(check_input(x).shape[-1], check_tau(tau))
    _check_table(table, k, tau)
    if hashed is not None:
        check_hashed(hashed, x.shape[:-1], k)
    return _layer(x, table, bias, tau, weighting, temperature, hashed)


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` would run code a fused op would skip: hooks (its own or global ones) or a
    forward replaced on the instance."""
    from torch.nn.modules import module as hooks

    return bool("forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or hooks._global_backward_hooks or hooks._global_backward_pre_hooks)


def shared_hash_forward(x: Tensor, layers: list[MemoryLayer]) -> list[Tensor]:
    """Memory Layers reading the same input with the same hash settings (MemoryAttention's Q, K, V):
    x (..., in_features) -> [(..., out_features_i)], hashing x once.

    Plain MemoryLayers go through one fused op on the kernels (one hash, one sort of the tokens by
    bucket, every table's gather; one op in the backward too); other layers (quantized subclasses),
    layers with module hooks (which must see their call) and the reference path hash once and call each
    layer with that hash."""
    first = layers[0]
    check_input(x, first.in_features)
    spec = (first.in_features, first.tau, first.weighting, first.temperature)
    if any((m.in_features, m.tau, m.weighting, m.temperature) != spec for m in layers[1:]):
        raise ValueError("shared_hash_forward needs layers with the same in_features, tau, weighting and temperature")
    if all(type(m).forward is MemoryLayer.forward and not _has_hooks(m) for m in layers):
        fast = _shared_layers(x, [m.table for m in layers], [m.bias for m in layers], first.tau, first.weighting,
                              first.temperature)
        if fast is not None:
            return fast
    hashed = first.hash(x)
    return [m(x, hashed) for m in layers]


class MemoryLayer(nn.Module):
    """Hash-table replacement for `nn.Linear(in_features, out_features)`.

    Parameters:
        table: (num_tables * 2**tau, out_features), num_tables = in_features // tau.
        bias: (out_features,) or None.
    Input (..., in_features) of any float dtype; output (..., out_features) in the table's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tau: int = 8,
        bias: bool = True,
        weighting: str = "prob",
        temperature: float = 1.0,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_hash_settings(weighting, temperature)
        self.num_tables = num_tables(in_features, check_tau(tau))
        if out_features <= 0:
            raise ValueError(f"out_features must be positive, got {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.tau = tau
        self.weighting = weighting
        self.temperature = float(temperature)
        self.init_std = float(init_std)
        factory = {"device": device, "dtype": dtype}
        self.table = nn.Parameter(torch.empty(self.num_tables << tau, out_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Tables ~ N(0, init_std^2) (default 0.02); bias zero (docs/differences.md)."""
        nn.init.normal_(self.table, mean=0.0, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def hash(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(..., in_features) -> rows (..., K) int64, weights (..., K) in x's dtype."""
        check_input(x, self.in_features)
        return _hash(x, self.tau, self.weighting, self.temperature)

    def forward(self, x: Tensor, hashed: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(..., in_features) -> (..., out_features). Pass `hashed` to reuse another layer's hash."""
        check_input(x, self.in_features)
        if hashed is not None:
            check_hashed(hashed, x.shape[:-1], self.num_tables)
        return _layer(x, self.table, self.bias, self.tau, self.weighting, self.temperature, hashed)

    def decode_table(self) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
        """What the fused decode op (memoryformer.kernels.DecodeWeights) reads of this layer:
        (table (R, out), bias (out,) or None, int8 per-row scales (R,) or None), or None where the op
        does not apply: a table other than float32, or a subclass that changes forward."""
        if type(self).forward is not MemoryLayer.forward:
            return None
        p = self._parameters  # read directly: this runs once per layer and decoded token
        table = p["table"]
        return (table, p.get("bias"), None) if table.dtype == torch.float32 else None

    # ---- accounting -----------------------------------------------------------------------
    def num_table_parameters(self) -> int:
        return self.table.numel()

    def table_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the tables in `dtype` (default: the parameter's own dtype)."""
        itemsize = (dtype or self.table.dtype).itemsize
        return self.table.numel() * itemsize

    def macs_per_token(self) -> int:
        """Multiply-adds of the weighted gather-and-sum per token: K * out_features."""
        return self.num_tables * self.out_features

    def hash_ops_per_token(self) -> int:
        """Elementwise hashing operations per token (compare, |.|, sigmoid): about in_features."""
        return self.in_features

    def bytes_read_per_token(self) -> int:
        """Table bytes one token reads: K rows of out_features values."""
        return self.num_tables * self.out_features * self.table.dtype.itemsize

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, tau={self.tau}, "
            f"num_tables={self.num_tables}, buckets={2 ** self.tau}, weighting={self.weighting!r}"
            + (f", temperature={self.temperature}" if self.weighting == "prob" else "")
            + f", bias={self.bias is not None}"
        )

