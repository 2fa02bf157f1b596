"""The Memory Layer's maths in pure PyTorch: the reference every fast path is tested against.

For an input x of `K * tau` values, chunk k is `x[..., k*tau:(k+1)*tau]`. Its sign pattern (bit j is
1 iff `z_j >= 0`, so 0.0 and -0.0 hash as positive; the chunk's first element is the most significant
bit) picks bucket b of table k, row `k * 2**tau + b` of one flat table. The output is

    y = sum_k w_k(x) * table[rows_k(x)] + bias

with a differentiable weight (paper Eq. 10-12; docs/method.md):
    "prob" (paper Eq. 11):   w_k = prod_j sigmoid(2 |z_kj| / temperature)
    "l1"   (official code):  w_k = ||z_k||_1 * prod_j sigmoid(2 |z_kj|)

The weighted gather-and-sum is one `F.embedding_bag(mode="sum", per_sample_weights=...)` call, fused
in forward and backward: no (N, K, out_features) tensor is ever built.

This module imports nothing from the rest of the package, and its names are unique within
memoryformer.core (the exported Hugging Face model code joins core's modules into one file). It is also the one home of the hash
settings' constants and their checks (`check_hash_settings`), which ModelConfig and MemoryLayer call
where the values enter; the functions below assume checked arguments.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

WEIGHTINGS = ("prob", "l1")
MAX_TAU = 16  # the most bits a chunk may have (the C++ kernels' kMaxTau); a table then has 65536 rows


def check_tau(tau: object, name: str = "tau") -> int:
    """tau as an int in 1..MAX_TAU, else ValueError / TypeError naming `name`."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Integral):
        raise TypeError(f"{name} must be an integer in 1..{MAX_TAU}, got {tau!r} ({type(tau).__name__})")
    if not 1 <= tau <= MAX_TAU:
        raise ValueError(f"{name} must be an integer in 1..{MAX_TAU}, got {tau}")
    return int(tau)


def check_hash_settings(weighting: object, temperature: object) -> None:
    """weighting one of WEIGHTINGS and temperature a positive finite number, else one clear error."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive number, got {temperature!r} ({type(temperature).__name__})")
    if not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


def num_tables(in_features: int, tau: int) -> int:
    """K = in_features / tau, checking that in_features is a positive multiple of tau."""
    if in_features <= 0 or in_features % tau != 0:
        raise ValueError(f"in_features={in_features} must be a positive multiple of tau={tau}")
    return in_features // tau


def reference_memory_hash(x: Tensor, tau: int, weighting: str = "prob", temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Hash x chunk by chunk.

    Args:
        x: (..., K * tau) floating-point input.
    Returns:
        rows: (..., K) int64 global row indices, `k * 2**tau + bucket`.
        weights: (..., K) differentiable weights in x's dtype (computed in float32 or wider).
    """
    k = x.shape[-1] // tau
    z = x.unflatten(-1, (k, tau))  # (..., K, tau)
    place = torch.pow(2, torch.arange(tau - 1, -1, -1, device=x.device, dtype=torch.int64))  # first = MSB
    offsets = torch.arange(k, device=x.device, dtype=torch.int64) << tau
    rows = ((z >= 0).to(torch.int64) * place).sum(-1) + offsets  # (..., K)

    a = z.to(torch.promote_types(x.dtype, torch.float32)).abs()
    scale = 2.0 / temperature if weighting == "prob" else 2.0
    # prod_j sigmoid(2|z_j|/t) = exp(sum_j logsigmoid(2|z_j|/t)): stable for any tau
    weights = F.logsigmoid(a * scale).sum(-1).exp()
    if weighting == "l1":
        weights = weights * a.sum(-1)
    return rows, weights.to(x.dtype)


def reference_gather_sum(rows: Tensor, weights: Tensor, table: Tensor, bias: Tensor | None = None) -> Tensor:
    """The weighted gather-and-sum: `out[n] = sum_k weights[n, k] * table[rows[n, k]] + bias`.

    Args:
        rows: (..., K) integer row indices into `table`; weights: (..., K).
        table: (R, out_features); bias: (out_features,) or None.
    Returns:
        (..., out_features) in table's dtype.
    """
    lead_shape, k = rows.shape[:-1], rows.shape[-1]
    out_features = table.shape[-1]
    flat_rows = rows.reshape(-1, k)
    if flat_rows.shape[0] == 0:
        # zero tokens: an empty output still connected to table and weights, so backward gives zero grads
        out = table.new_zeros(0, out_features) + (table.sum() + weights.sum().to(table.dtype)) * 0
    else:
        out = F.embedding_bag(flat_rows, table, mode="sum", per_sample_weights=weights.reshape(-1, k).to(table.dtype))
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*lead_shape, out_features)


def reference_memory_layer(x: Tensor, table: Tensor, bias: Tensor | None, tau: int, weighting: str, temperature: float,
                 hashed: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The whole layer: x (..., K * tau) -> (..., out_features), hashing x unless `hashed` is given."""
    rows, weights = hashed if hashed is not None else reference_memory_hash(x, tau, weighting, temperature)
    return reference_gather_sum(rows, weights, table, bias)
