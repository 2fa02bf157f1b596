"""Python-side registrations for the C++ `memoryformer::*` ops: fake (meta) kernels for
torch.compile / meta tensors, autograd formulas, and FLOP formulas for torch.utils.flop_counter.

Called once by `_loader.load()` after the shared library is loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memoryformer.kernels import grad_norms

_done = False


def _empty_like_flag(flag: bool, like: Tensor) -> Tensor:
    return torch.empty_like(like, memory_format=torch.contiguous_format) if flag else like.new_empty(0)


# ---- fake kernels ---------------------------------------------------------------------------------
def _fake_memory_layer(x, tables, biases, tau, weighting, temperature):
    return [x.new_empty((x.shape[0], t.shape[1]), dtype=t.dtype) for t in tables]


def _fake_memory_layer_backward(grads, x, tables, tau, weighting, temperature, need_x, need_tables):
    sqnorms = x.new_empty((len(tables) if need_tables else 0,), dtype=torch.float64)
    return _empty_like_flag(need_x, x), [_empty_like_flag(need_tables, t) for t in tables], sqnorms


def _fake_memory_layer_q8(x, qtable, scales, bias, tau, weighting, temperature):
    return x.new_empty((x.shape[0], qtable.shape[1]), dtype=torch.float32)


def _fake_gather_sum(rows, weights, table, bias):
    return table.new_empty((rows.shape[0], table.shape[1]))


def _fake_gather_sum_backward(grad, rows, weights, table, need_weights, need_table):
    gw = weights.new_empty(weights.shape) if need_weights else weights.new_empty(0)
    return gw, _empty_like_flag(need_table, table)


def _fake_hash(x, tau, weighting, temperature):
    shape = (x.shape[0], x.shape[1] // tau)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


def _fake_hash_backward(grad_weights, x, tau, weighting, temperature):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_decode_block(x, k_cache, v_cache, pos, cos, sin, params, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_decode_blocks(x, k_caches, v_caches, pos, cos, sin, params, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ---- autograd -------------------------------------------------------------------------------------
def _flags(needs, n: int) -> list[bool]:
    return [bool(v) for v in needs] if isinstance(needs, (list, tuple)) else [bool(needs)] * n


def _ml_setup(ctx, inputs, output):
    x, tables, biases, tau, weighting, temperature = inputs
    ctx.save_for_backward(x, *tables)
    ctx.hash_args = (tau, weighting, temperature)
    ctx.bias_meta = [(b.numel() > 0, b.dtype, b.shape) for b in biases]


def _ml_backward(ctx, grads):
    x, *tables = ctx.saved_tensors
    n = len(tables)
    need_x = bool(ctx.needs_input_grad[0])
    need_t = _flags(ctx.needs_input_grad[1], n)
    need_b = _flags(ctx.needs_input_grad[2], n)
    grads = [
        g if g is not None else torch.zeros((x.shape[0], t.shape[1]), dtype=t.dtype)
        for g, t in zip(grads, tables)
    ]
    gx, gtables, sqnorms = torch.ops.memoryformer.memory_layer_backward(
        grads, x, tables, *ctx.hash_args, need_x, any(need_t)
    )
    if grad_norms.active() and sqnorms.numel() and type(sqnorms) is torch.Tensor:  # not while compiling
        # (a traced backward has fake tensors, whose values cannot be read: the norm is then read later)
        for table, grad, sqnorm, need in zip(tables, gtables, sqnorms.tolist(), need_t):
            if need:
                grad_norms.record(table, grad, sqnorm)
    gbiases = [
        (g.sum(0, dtype=torch.float32).to(dt) if has else torch.zeros(shape, dtype=dt)) if need else None
        for (has, dt, shape), need, g in zip(ctx.bias_meta, need_b, grads)
    ]
    gtables = [gt if need else None for gt, need in zip(gtables, need_t)]
    return (gx if need_x else None), gtables, gbiases, None, None, None


def _gs_setup(ctx, inputs, output):
    rows, weights, table, bias = inputs
    ctx.save_for_backward(rows, weights, table)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gs_backward(ctx, grad):
    rows, weights, table = ctx.saved_tensors
    need_w, need_t, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    gw, gt = torch.ops.memoryformer.gather_sum_backward(grad, rows, weights, table, need_w, need_t)
    gb = grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if need_b and ctx.bias_dtype else None
    return None, (gw if need_w else None), (gt if need_t else None), gb


def _hash_setup(ctx, inputs, output):
    x, tau, weighting, temperature = inputs
    ctx.mark_non_differentiable(output[1])  # integer rows
    ctx.save_for_backward(x)
    ctx.hash_args = (tau, weighting, temperature)


def _hash_backward(ctx, grad_weights, grad_rows):
    (x,) = ctx.saved_tensors
    if grad_weights is None:
        return None, None, None, None
    return torch.ops.memoryformer.hash_backward(grad_weights, x, *ctx.hash_args), None, None, None


# ---- FLOP formulas (one multiply-add = 2 FLOPs, as torch.utils.flop_counter counts mm) -----------
def _register_flops() -> None:
    from torch.utils.flop_counter import register_flop_formula

    ops = torch.ops.memoryformer

    @register_flop_formula([ops.memory_layer, ops.memory_layer_infer])
    def _(x_shape, tables_shapes, *args, out_shape=None, **kwargs) -> int:
        n, k = x_shape[0], x_shape[1] // args[1]
        return sum(2 * n * k * s[1] for s in tables_shapes)

    @register_flop_formula(ops.memory_layer_backward)
    def _(grads_shapes, x_shape, tables_shapes, tau, weighting, temperature, need_x, need_tables,
          *args, out_shape=None, **kwargs) -> int:
        n, k = x_shape[0], x_shape[1] // tau
        passes = int(bool(need_x)) + int(bool(need_tables))
        return sum(2 * passes * n * k * s[1] for s in tables_shapes)

    @register_flop_formula(ops.memory_layer_q8)
    def _(x_shape, qtable_shape, scales_shape, bias_shape, tau, *args, out_shape=None, **kwargs) -> int:
        return 2 * x_shape[0] * (x_shape[1] // tau) * qtable_shape[1]

    @register_flop_formula([ops.gather_sum, ops.gather_sum_infer])
    def _(rows_shape, weights_shape, table_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * rows_shape[0] * rows_shape[1] * table_shape[1]

    @register_flop_formula(ops.gather_sum_backward)
    def _(grad_shape, rows_shape, weights_shape, table_shape, need_w, need_t, *args, out_shape=None,
          **kwargs) -> int:
        passes = int(bool(need_w)) + int(bool(need_t))
        return 2 * passes * rows_shape[0] * rows_shape[1] * table_shape[1]


    from memoryformer.kernels.decode_inputs import DecodeWeights  # the op's slot order

    ml1_table = DecodeWeights._fields.index("ml1_table")

    slots = len(DecodeWeights._fields)

    def block_flops(b: int, d: int, hidden: int, pos: int, tau: int, tau2: int) -> int:
        k1, k2 = d // tau, hidden // tau2
        gathers = k1 * 3 * d + k1 * hidden + k2 * d
        attention = 2 * d * (pos + 1)  # q.k and p.v over the pos + 1 cached positions
        return 2 * b * (gathers + attention)

    @register_flop_formula(ops.decode_block)
    def _(x_shape, k_shape, v_shape, pos, cos_shape, sin_shape, params_shapes, scales_shapes, rms_eps, ln_eps,
          n_heads, tau, tau2, *args, out_shape=None, **kwargs) -> int:
        return block_flops(*x_shape, params_shapes[ml1_table][1], pos, tau, tau2)

    @register_flop_formula(ops.decode_blocks)
    def _(x_shape, k_shapes, v_shapes, pos, cos_shape, sin_shape, params_shapes, scales_shapes, norm_shape,
          rms_eps, ln_eps, n_heads, tau, tau2, *args, out_shape=None, **kwargs) -> int:
        return sum(block_flops(*x_shape, params_shapes[i + ml1_table][1], pos, tau, tau2)
                   for i in range(0, len(params_shapes), slots))


def register_python_side() -> None:
    """Register fake kernels, autograd and FLOP formulas (idempotent)."""
    global _done
    if _done:
        return
    lib = "memoryformer::"
    fakes = {
        "memory_layer": _fake_memory_layer,
        "memory_layer_backward": _fake_memory_layer_backward,
        "memory_layer_q8": _fake_memory_layer_q8,
        "gather_sum": _fake_gather_sum,
        "gather_sum_backward": _fake_gather_sum_backward,
        "hash": _fake_hash,
        "hash_backward": _fake_hash_backward,
        "memory_layer_infer": _fake_memory_layer,
        "gather_sum_infer": _fake_gather_sum,
        "hash_infer": _fake_hash,
        "decode_block": _fake_decode_block,
        "decode_blocks": _fake_decode_blocks,
    }
    for name, fn in fakes.items():
        torch.library.register_fake(lib + name, fn)
    torch.library.register_autograd(lib + "memory_layer", _ml_backward, setup_context=_ml_setup)
    torch.library.register_autograd(lib + "gather_sum", _gs_backward, setup_context=_gs_setup)
    torch.library.register_autograd(lib + "hash", _hash_backward, setup_context=_hash_setup)
    _register_flops()
    _done = True
