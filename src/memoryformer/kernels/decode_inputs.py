"""The inputs of the fused decode ops `memoryformer::decode_block` and `decode_blocks`, by name.

DecodeWeights and DecodeScales are the op's tensor lists in its slot order (the C++ enums DecodeSlot and
ScaleSlot of decode_kernels.cpp mirror them; tests/test_decode_kernel.py compares the two), DecodeSettings
its scalars, and `DecodeBlock.from_block` reads them from a MemoryFormerBlock together with the checks
that the op computes that block; DecodePlan is `decode_blocks`' arguments for a whole model and one
KV cache, read once for many steps. This module imports only torch (memoryformer.kernels and its
registration code both read it).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor


class DecodeWeights(NamedTuple):
    """The tensors of one MemoryFormer block that `memoryformer::decode_block` reads, in the op's slot
    order (mirrored by `enum DecodeSlot` in decode_kernels.cpp). Tables are (R, out) float32, bfloat16,
    or int8 with per-row scales (DecodeScales); a bias may be None; everything else is float32."""

    attn_norm_w: Tensor  # (d,) RMSNorm before attention
    q_table: Tensor
    q_bias: Tensor | None
    k_table: Tensor
    k_bias: Tensor | None
    v_table: Tensor
    v_bias: Tensor | None
    mlp_norm_w: Tensor  # (d,) RMSNorm before the Memory Block
    ml1_table: Tensor  # (K * 2**tau, hidden)
    ml1_bias: Tensor | None
    ln_w: Tensor  # (hidden,) the Memory Block's LayerNorm
    ln_b: Tensor
    ml2_table: Tensor  # (K2 * 2**tau2, d)
    ml2_bias: Tensor | None


class DecodeScales(NamedTuple):
    """The (R,) float32 per-row scales of the int8 tables; None for a table that is not int8."""

    q: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None
    ml1: Tensor | None = None
    ml2: Tensor | None = None


class DecodeSettings(NamedTuple):
    """The block's scalars: norm epsilons, heads, the two hash widths and the weighting."""

    rms_eps: float
    ln_eps: float
    n_heads: int
    tau: int
    tau2: int
    weighting: str = "prob"
    temperature: float = 1.0
    gelu: bool = False


class DecodeBlock(NamedTuple):
    """Everything `decode_block` needs of one block besides the token and the cache."""

    weights: DecodeWeights
    scales: DecodeScales
    settings: DecodeSettings

    @classmethod
    def from_block(cls, block: torch.nn.Module) -> DecodeBlock | None:
        """Read a MemoryFormerBlock (memoryformer.core.model), or None where the fused op does not compute
        the same block: a layer without a decode table (`decode_table()` of MemoryLayer and the quantized
        layers), another activation or norm, layers that do not share one hash setting, or a submodule
        with hooks (the op would skip them).

        Runs once per block and token, so submodules and parameters are read from `_modules` and
        `_parameters` directly (nn.Module.__getattr__ costs about 1 us per lookup)."""
        attn, mlp = block._modules["attn"], block._modules["mlp"]
        layers = [attn._modules[n] for n in ("q_proj", "k_proj", "v_proj")] + [mlp._modules["ml1"], mlp._modules["ml2"]]
        if any_hooks((attn, mlp, block._modules["attn_norm"], block._modules["mlp_norm"], *layers,
                      mlp._modules["norm"], mlp._modules["act"])):
            return None
        tables = [getattr(m, "decode_table", _no_table)() for m in layers]
        if any(t is None for t in tables):
            return None
        settings = _decode_settings(block, layers)
        ln = mlp._modules["norm"]._parameters
        if settings is None or ln.get("weight") is None or ln.get("bias") is None:
            return None
        (tq, bq, sq), (tk, bk, sk), (tv, bv, sv), (t1, b1, s1), (t2, b2, s2) = tables
        weights = DecodeWeights(block._modules["attn_norm"]._parameters["weight"], tq, bq, tk, bk, tv, bv,
                                block._modules["mlp_norm"]._parameters["weight"], t1, b1, ln["weight"], ln["bias"],
                                t2, b2)
        return cls(weights, DecodeScales(sq, sk, sv, s1, s2), settings)


class DecodePlan(NamedTuple):
    """The arguments of `decode_blocks` that stay fixed while a model decodes into one KV cache, read
    once (`kernels.try_decode_plan`) instead of at every step. It holds the model's parameter tensors
    themselves, so in-place updates are seen; replaced modules or parameters, new hooks on submodules
    or changed dtypes are not (build a new plan)."""

    cache: weakref.ref  # the KVCache it was built for (weak: the cache holds its plan)
    modules: tuple[torch.nn.Module, ...]  # the blocks, then the final norm: the model it was read from
    layers: tuple[int, ...]  # each block's layer index into the cache's keys and values
    params: list[Tensor]  # every block's DecodeWeights in turn, an empty tensor for None
    scales: list[Tensor]  # every block's DecodeScales in turn, or [] when no table is int8
    norm_weight: Tensor  # (d,) the final RMSNorm's weight
    settings: DecodeSettings  # shared by every block


def global_hooks() -> bool:
    """Whether global module hooks are installed (those of FlopCounterMode and some profilers)."""
    from torch.nn.modules import module as hooks

    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks)


def any_hooks(modules: Iterable[torch.nn.Module]) -> bool:
    """Whether calling any of `modules` would run code that a fused op computing them would skip: hooks
    (their own or global ones, e.g. FlopCounterMode's) or a forward replaced on the instance."""
    if global_hooks():
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               or "forward" in m.__dict__ for m in modules)


def _no_table() -> None:
    return None


def _decode_settings(block: torch.nn.Module, layers: list[torch.nn.Module]) -> DecodeSettings | None:
    """The block's DecodeSettings, or None for a norm / activation the op does not have, or for layers
    whose hash settings differ (all five share weighting and temperature; Q, K, V and ML1 share tau)."""
    mlp = block._modules["mlp"]
    norm, act = mlp._modules["norm"], mlp._modules["act"]
    gelu = type(act) is torch.nn.GELU and act.approximate == "none"
    if not (gelu or type(act) is torch.nn.Identity) or type(norm) is not torch.nn.LayerNorm:
        return None
    q, ml2 = layers[0], layers[-1]
    spec = (q.tau, q.weighting, q.temperature)
    if any((m.tau, m.weighting, m.temperature) != spec for m in layers[1:-1]) or \
            (ml2.weighting, ml2.temperature) != spec[1:]:
        return None
    return DecodeSettings(block._modules["attn_norm"].eps, norm.eps, block._modules["attn"].n_heads, q.tau,
                          ml2.tau, q.weighting, q.temperature, gelu)
