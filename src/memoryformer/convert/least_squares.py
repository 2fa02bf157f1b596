"""Fit a Memory Layer's tables to reproduce a target function on calibration inputs (least squares).

A Memory Layer computes, for N calibration inputs z_n with hashed rows r_nk and weights w_nk,

    y_n = sum_k w_nk * T[r_nk] + bias

which is LINEAR in the table rows and the bias: y = A [T; bias], where the design matrix A (N, rows + 1)
has one non-zero w_nk per (token, table) and a column of ones. So the rows that best reproduce targets
t (N, out) solve a ridge least-squares problem

    min ||A [T; bias] - t||^2 + lam ||T||^2,   i.e.   (A^T A + lam I') [T; bias] = A^T t.

We solve the normal equations by conjugate gradients without forming A: `A v` is a weighted gather-sum
and `A^T r` a scatter-add, each as cheap as one Memory Layer forward or backward. The diagonal of
A^T A (the sum of w^2 over the tokens that hit a row) is the preconditioner, so the first step moves
each row toward the weighted average of the targets of the tokens in its bucket. `tests/test_convert.py`
checks the result against a float64 dense solve. Buckets no calibration token hits get the mean of their
table's fitted rows (that table's expected contribution). docs/convert.md says how the converter chooses
inputs and targets.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memoryformer import MemoryLayer, gather_sum


def _apply(rows: Tensor, w: Tensor, table: Tensor, bias: Tensor) -> Tensor:
    """A [table; bias]: (N, out), one embedding_bag call (no (N, K, out) tensor)."""
    return gather_sum(rows, w, table, bias)


def _apply_transpose(rows: Tensor, w: Tensor, residual: Tensor, num_rows: int, fit_bias: bool) -> tuple[Tensor, Tensor]:
    """A^T residual: (num_rows, out) and (out,)."""
    grad = torch.zeros(num_rows, residual.shape[1], dtype=residual.dtype)
    for k in range(rows.shape[1]):  # table by table: (N, out) at a time
        grad.index_add_(0, rows[:, k], w[:, k : k + 1] * residual)
    return grad, (residual.sum(0) if fit_bias else torch.zeros(residual.shape[1], dtype=residual.dtype))


def fit_rows(rows: Tensor, weights: Tensor, targets: Tensor, num_rows: int, *, iterations: int = 50,
             ridge: float = 1e-4, fit_bias: bool = True, fill_unhit: bool = True,
             tol: float = 1e-10) -> tuple[Tensor, Tensor, Tensor]:
    """Ridge least-squares table rows and bias for fixed hashes (preconditioned conjugate gradients).

    Args:
        rows: (N, K) int64 global row indices (`k * 2**tau + bucket`).
        weights: (N, K) per-table weights.
        targets: (N, out) what the layer should output.
        num_rows: rows of the flat table (K * 2**tau).
        iterations: at most this many CG steps (each about one forward and one backward of the layer).
        ridge: lam above, relative to the mean squared weight (keeps rarely hit rows small).
        fit_bias: fit a bias; False keeps it at zero.
        tol: stop when every column's preconditioned residual has shrunk by this factor.
    Returns:
        table (num_rows, out), bias (out,), hit (num_rows,) bool: rows some token hashed to.
    """
    dtype = torch.promote_types(targets.dtype, torch.float32)
    t, w = targets.to(dtype), weights.to(dtype)
    lam = ridge * float((w * w).mean())
    diag = torch.zeros(num_rows, dtype=dtype).index_add_(0, rows.reshape(-1), (w * w).reshape(-1)) + lam
    diag_bias = float(rows.shape[0]) if fit_bias else 1.0

    def normal(table: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:  # (A^T A + lam I') v
        g_table, g_bias = _apply_transpose(rows, w, _apply(rows, w, table, bias), num_rows, fit_bias)
        return g_table + lam * table, g_bias

    table = torch.zeros(num_rows, t.shape[1], dtype=dtype)
    bias = torch.zeros(t.shape[1], dtype=dtype)
    r_table, r_bias = _apply_transpose(rows, w, t, num_rows, fit_bias)
    z_table, z_bias = r_table / diag[:, None], r_bias / diag_bias
    p_table, p_bias = z_table.clone(), z_bias.clone()
    rz = (r_table * z_table).sum(0) + r_bias * z_bias  # (out,)
    rz0 = rz.clamp_min(1e-300)
    for _ in range(iterations):
        q_table, q_bias = normal(p_table, p_bias)
        alpha = rz / ((p_table * q_table).sum(0) + p_bias * q_bias).clamp_min(1e-300)
        table += alpha * p_table
        bias += alpha * p_bias
        r_table -= alpha * q_table
        r_bias -= alpha * q_bias
        z_table, z_bias = r_table / diag[:, None], r_bias / diag_bias
        rz_new = (r_table * z_table).sum(0) + r_bias * z_bias
        if bool((rz_new <= tol * tol * rz0).all()):
            break
        beta = rz_new / rz.clamp_min(1e-300)
        p_table, p_bias = z_table + beta * p_table, z_bias + beta * p_bias
        rz = rz_new
    hit = diag > lam
    if fill_unhit:
        _fill_unhit_rows(table, hit, rows.shape[1])
    return table, bias, hit


def _fill_unhit_rows(table: Tensor, hit: Tensor, num_tables: int) -> None:
    """Rows of buckets no token hit := the mean of their table's hit rows (in place)."""
    per_table = table.view(num_tables, -1, table.shape[1])
    hit_t = hit.view(num_tables, -1)
    for k in range(num_tables):
        if hit_t[k].any() and not hit_t[k].all():
            per_table[k, ~hit_t[k]] = per_table[k, hit_t[k]].mean(0)


@torch.no_grad()
def fit_memory_layer(layer: MemoryLayer, inputs: Tensor, targets: Tensor, *, iterations: int = 50,
                     ridge: float = 1e-4) -> dict[str, float]:
    """Set `layer`'s table (and bias, if it has one) so that layer(inputs) ~ targets; in place.

    Args:
        inputs: (N, in_features) calibration inputs, as the layer will see them.
        targets: (N, out_features) the outputs to reproduce.
    Returns: {"rel_err": ||layer(x) - t|| / ||t - mean(t)||, "hit_share": share of rows hit}.
    """
    rows, weights = layer.hash(inputs)
    table, bias, hit = fit_rows(rows, weights, targets, layer.table.shape[0], iterations=iterations, ridge=ridge,
                                fit_bias=layer.bias is not None)
    if layer.bias is not None:
        layer.bias.copy_(bias.to(layer.bias.dtype))
    layer.table.copy_(table.to(layer.table.dtype))
    fitted = layer(inputs).to(table.dtype)
    t = targets.to(table.dtype)
    spread = (t - t.mean(0)).norm().clamp_min(1e-30)
    return {"rel_err": float((fitted - t).norm() / spread), "hit_share": float(hit.float().mean())}
