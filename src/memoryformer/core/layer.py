"""The Memory Layer: a drop-in replacement for `nn.Linear` built from hash tables.

For an input x of `in_features = K * tau` values, chunk k is `x[..., k*tau:(k+1)*tau]`. Its sign
pattern (bit j is 1 iff `x[k*tau + j] >= 0`, the chunk's first element the most significant
bit) picks bucket b of table k, which is row `k * 2**tau + b` of one flat `table` parameter.
The output is the weighted sum of the K picked rows, plus a bias:

    y = sum_k w_k(x) * table[rows_k(x)] + bias

The weight is differentiable, so gradients reach x although the hash does not:
    "prob" (paper Eq. 11):   w_k = prod_j sigmoid(2 |z_kj| / temperature)
    "l1"   (official code):  w_k = ||z_k||_1 * prod_j sigmoid(2 |z_kj|)

The gather-and-sum is one `F.embedding_bag(mode="sum", per_sample_weights=...)` call, fused in
forward and backward; no (N, K, out_features) tensor is ever built. See the paper's Eq. 6-12 and docs/method.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memoryformer import kernels as _kernels  # optional fast ops; importing compiles nothing

WEIGHTINGS = ("prob", "l1")
MAX_TAU = 16


def _check_tau(in_features: int, tau: int) -> int:
    if not isinstance(tau, int) or not 1 <= tau <= MAX_TAU:
        raise ValueError(f"tau must be an integer in 1..{MAX_TAU}, got {tau!r}")
    if in_features <= 0 or in_features % tau != 0:
        raise ValueError(f"in_features={in_features} must be a positive multiple of tau={tau}")
    return in_features // tau


def _check_input(x: Tensor, in_features: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"MemoryLayer expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"MemoryLayer expects a floating-point input, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"MemoryLayer expected input with last dimension {in_features}, got shape {tuple(x.shape)}"
        )


def memory_hash(
    x: Tensor, tau: int, weighting: str = "prob", temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Hash x chunk by chunk.

    Args:
        x: (..., K * tau) floating-point input.
    Returns:
        rows: (..., K) int64 global row indices, `k * 2**tau + bucket`.
        weights: (..., K) differentiable weights in x's dtype (computed in float32 or wider).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
        _check_input(x, -1)
    num_tables = _check_tau(x.shape[-1], tau)
    fast = _kernels.try_memory_hash(x, tau, weighting, temperature)  # same hash as the fused kernels
    if fast is not None:
        return fast
    z = x.unflatten(-1, (num_tables, tau))  # (..., K, tau)
    # bit j of a chunk is 1 iff z_j >= 0 (so 0.0 and -0.0 give 1); first element = MSB
    place = torch.pow(2, torch.arange(tau - 1, -1, -1, device=x.device, dtype=torch.int64))
    offsets = torch.arange(num_tables, device=x.device, dtype=torch.int64) << tau
    rows = ((z >= 0).to(torch.int64) * place).sum(-1) + offsets  # (..., K)

    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    a = z.to(compute_dtype).abs()
    scale = 2.0 / temperature if weighting == "prob" else 2.0
    # prod_j sigmoid(2|z_j|/t) = exp(sum_j logsigmoid(2|z_j|/t)): stable for any tau
    weights = F.logsigmoid(a * scale).sum(-1).exp()
    if weighting == "l1":
        weights = weights * a.sum(-1)
    return rows, weights.to(x.dtype)


def _check_hashed(hashed: tuple[Tensor, Tensor], lead_shape: torch.Size, num_tables: int) -> None:
    if not (isinstance(hashed, (tuple, list)) and len(hashed) == 2):
        raise TypeError("hashed must be a (rows, weights) pair as returned by MemoryLayer.hash")
    rows, weights = hashed
    expected = (*lead_shape, num_tables)
    if tuple(rows.shape) != expected or tuple(weights.shape) != expected:
        raise ValueError(
            f"hashed rows/weights must both have shape {expected}, "
            f"got {tuple(rows.shape)} and {tuple(weights.shape)}"
        )
    if rows.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"hashed rows must be int64 or int32, got {rows.dtype}")


def gather_sum(rows: Tensor, weights: Tensor, table: Tensor, bias: Tensor | None = None) -> Tensor:
    """The weighted gather-and-sum: `out[n] = sum_k weights[n, k] * table[rows[n, k]] + bias`.

    Args:
        rows: (..., K) integer row indices into `table`.
        weights: (..., K) per-row weights.
        table: (R, out_features).
        bias: (out_features,) or None.
    Returns:
        (..., out_features) in table's dtype.
    """
    lead_shape, num_tables = rows.shape[:-1], rows.shape[-1]
    out_features = table.shape[-1]
    flat_rows = rows.reshape(-1, num_tables)
    if flat_rows.shape[0] == 0:
        # zero tokens: an empty output still connected to table and weights, so backward gives zero grads
        out = table.new_zeros(0, out_features) + (table.sum() + weights.sum().to(table.dtype)) * 0
    else:
        out = F.embedding_bag(
            flat_rows,
            table,
            mode="sum",
            per_sample_weights=weights.reshape(-1, num_tables).to(table.dtype),
        )
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*lead_shape, out_features)


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
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
        _check_input(x, -1)  # raises the matching TypeError / ValueError
    num_tables = _check_tau(x.shape[-1], tau)
    expected_rows = num_tables << tau
    if table.dim() != 2 or table.shape[0] != expected_rows:
        raise ValueError(
            f"table must have shape ({expected_rows}, out_features) for K={num_tables}, tau={tau}; "
            f"got {tuple(table.shape)}"
        )
    if hashed is not None:
        _check_hashed(hashed, x.shape[:-1], num_tables)
    return _memory_layer(x, table, bias, tau, weighting, temperature, hashed)


def _memory_layer(x: Tensor, table: Tensor, bias: Tensor | None, tau: int, weighting: str, temperature: float,
                  hashed: tuple[Tensor, Tensor] | None) -> Tensor:
    """`memory_layer` on validated arguments (MemoryLayer.forward calls it directly: at decode sizes the
    checks cost as much as the kernel)."""
    # C++ kernels when available and faster (memoryformer.kernels); None -> the pure path below
    fast = _kernels.try_memory_layer(x, table, bias, tau, weighting, temperature, hashed)
    if fast is not None:
        return fast
    if hashed is None:
        hashed = memory_hash(x, tau, weighting, temperature)
    rows, weights = hashed
    return gather_sum(rows, weights, table, bias)


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
        self.num_tables = _check_tau(in_features, tau)
        if out_features <= 0:
            raise ValueError(f"out_features must be positive, got {out_features}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
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
        _check_input(x, self.in_features)
        return memory_hash(x, self.tau, self.weighting, self.temperature)

    def forward(self, x: Tensor, hashed: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(..., in_features) -> (..., out_features). Pass `hashed` to reuse another layer's hash."""
        _check_input(x, self.in_features)
        table = self.table
        if table.dim() != 2 or table.shape[0] != self.num_tables << self.tau:
            raise ValueError(f"table must have shape ({self.num_tables << self.tau}, out_features) for "
                             f"K={self.num_tables}, tau={self.tau}; got {tuple(table.shape)}")
        if hashed is not None:
            _check_hashed(hashed, x.shape[:-1], self.num_tables)
        return _memory_layer(x, table, self.bias, self.tau, self.weighting, self.temperature, hashed)

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

