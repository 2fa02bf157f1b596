"""A trained dense Pythia (GPT-NeoX) model -> a MemoryFormer of the same width and depth.

Three stages (docs/convert.md derives each choice):

1. **Copy** the embedding, the head and the norm scales (LayerNorm weights become RMSNorm scales; the
   LayerNorm biases have no counterpart).
2. **Initialise** each Memory Layer by least squares on calibration activations
   (`convert.least_squares`), block by block in order, each block seeing the stream of the MemoryFormer
   converted so far (so later blocks learn to correct earlier blocks' errors):
   - Q, K: the dense model's q and k of the same hidden state.
   - V: the dense v with the output projection's diagonal head blocks and its bias folded in
     (MemoryFormer has no W_O; attention is linear in V, so this part of W_O is exact).
   - ML1: the top K(tau+e) principal directions of the dense MLP's hidden pre-activation (its most
     informative features, which ML2 then hashes).
   - ML2: what the dense block adds to the stream that MemoryFormer's attention did not:
     `dense_block(x) - h`, where h is the MemoryFormer's stream after its attention.
3. **Distil** with the dense model as teacher: `memoryformer train --teacher` (docs/convert.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from memoryformer import LanguageModel, ModelConfig
from memoryformer.convert.least_squares import fit_memory_layer


class _Captured(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is not run."""


def _capture_input(model: LanguageModel, module: nn.Module, idx: Tensor) -> Tensor:
    """The first positional input `module` receives when `model(idx)` runs."""
    box: list[Tensor] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        box.append(args[0].detach())
        raise _Captured

    handle = module.register_forward_pre_hook(hook)
    try:
        model(idx)
    except _Captured:
        pass
    finally:
        handle.remove()
    return box[0]


def _dense_block_on(dense: LanguageModel, i: int, x: Tensor, idx: Tensor) -> Tensor:
    """dense.blocks[i](x): the dense block applied to the MemoryFormer's stream x (B, T, d)."""
    box: list[Tensor] = []

    def replace_input(_m: nn.Module, args: tuple) -> tuple:
        return (x, *args[1:])

    def keep_output(_m: nn.Module, _args: tuple, out: Tensor) -> None:
        box.append(out.detach())
        raise _Captured

    block = dense.blocks[i]
    handles = [block.register_forward_pre_hook(replace_input), block.register_forward_hook(keep_output)]
    try:
        dense(idx)
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    return box[0]


def memoryformer_config(dense: ModelConfig, *, tau: int = 8, expanding_bits: int = 2,
                        weighting: str = "prob", temperature: float = 1.0) -> ModelConfig:
    """The MemoryFormer with the dense model's vocabulary, width, depth, heads, rotary and context."""
    if dense.architecture != "pythia":
        raise ValueError(f"convert needs a dense (pythia) model, got architecture {dense.architecture!r}")
    if dense.d_model % tau:
        raise ValueError(f"d_model={dense.d_model} is not a multiple of tau={tau}; pass another --tau")
    return ModelConfig(vocab_size=dense.vocab_size, n_layers=dense.n_layers, d_model=dense.d_model,
                       n_heads=dense.n_heads, max_seq_len=dense.max_seq_len, architecture="memoryformer",
                       rotary_pct=dense.rotary_pct, rotary_base=dense.rotary_base, norm_eps=dense.norm_eps,
                       tau=tau, expanding_bits=expanding_bits, weighting=weighting, temperature=temperature,
                       tie_embeddings=dense.tie_embeddings)


def _copy_shared(dense: LanguageModel, mf: LanguageModel) -> None:
    mf.embed.weight.copy_(dense.embed.weight)
    if not mf.config.tie_embeddings:
        mf.head.weight.copy_(dense.head.weight)
    mf.norm.weight.copy_(dense.norm.weight)
    for db, mb in zip(dense.blocks, mf.blocks):
        mb.attn_norm.weight.copy_(db.input_layernorm.weight)
        mb.mlp_norm.weight.copy_(db.post_attention_layernorm.weight)


def _qkv_targets(block: nn.Module, x: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Dense q, k and v (N, d) of stream x (N, d); v with W_O's diagonal head blocks and bias folded in."""
    qkv = block.attention.query_key_value(block.input_layernorm(x))  # (N, 3d), per head [q | k | v]
    n, d = x.shape
    head = d // n_heads
    q, k, v = qkv.view(n, n_heads, 3 * head).split(head, dim=-1)  # (N, H, Dh) each
    w_o = block.attention.dense.weight.view(d, n_heads, head)  # (out, H, Dh)
    diag = torch.stack([w_o[h * head:(h + 1) * head, h] for h in range(n_heads)])  # (H, Dh_out, Dh_in)
    v = torch.einsum("nhi,hoi->nho", v, diag)
    if block.attention.dense.bias is not None:
        v = v + block.attention.dense.bias.view(n_heads, head)
    return q.reshape(n, d), k.reshape(n, d), v.reshape(n, d)


def _principal_targets(hidden: Tensor, width: int) -> Tensor:
    """hidden (N, F) projected on its top `width` principal directions: (N, width)."""
    centred = hidden - hidden.mean(0)
    cov = centred.T.double() @ centred.double() / max(1, centred.shape[0] - 1)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    top = vectors[:, -width:].flip(1).to(hidden.dtype) if width <= vectors.shape[1] else vectors.to(hidden.dtype)
    projected = centred @ top
    if projected.shape[1] < width:
        projected = torch.cat([projected, projected.new_zeros(projected.shape[0], width - projected.shape[1])], 1)
    return projected


def _convert_block(dense: LanguageModel, mf: LanguageModel, i: int, idx: Tensor, **fit: Any) -> dict[str, float]:
    db, mb = dense.blocks[i], mf.blocks[i]
    x3 = _capture_input(mf, mb, idx)  # (B, T, d): the converted model's stream
    x = x3.reshape(-1, x3.shape[-1])
    q, k, v = _qkv_targets(db, x, mf.config.n_heads)
    a = mb.attn_norm(x)
    report = {f"{name}_rel_err": fit_memory_layer(layer, a, target, **fit)["rel_err"]
              for name, layer, target in (("q", mb.attn.q_proj, q), ("k", mb.attn.k_proj, k),
                                          ("v", mb.attn.v_proj, v))}
    h = _capture_input(mf, mb.mlp_norm, idx).reshape(-1, x.shape[-1])  # after the new attention
    b = mb.mlp_norm(h)
    mlp_in = db.post_attention_layernorm(x if db.parallel_residual else h)
    hidden = db.mlp.dense_h_to_4h(mlp_in)
    report["ml1_rel_err"] = fit_memory_layer(mb.mlp.ml1, b, _principal_targets(hidden, mb.mlp.ml1.out_features),
                                             **fit)["rel_err"]
    mb.mlp.norm.reset_parameters()
    c = mb.mlp.act(mb.mlp.norm(mb.mlp.ml1(b)))
    target = _dense_block_on(dense, i, x3, idx).reshape(-1, x.shape[-1]) - h
    report["ml2_rel_err"] = fit_memory_layer(mb.mlp.ml2, c, target, **fit)["rel_err"]
    return report


@torch.no_grad()
def convert_dense(dense: LanguageModel, calibration: Tensor, *, tau: int = 8, expanding_bits: int = 2,
                  weighting: str = "prob", temperature: float = 1.0, iterations: int = 30, ridge: float = 1e-4,
                  on_block: Callable[[int, dict[str, float]], None] | None = None,
                  ) -> tuple[LanguageModel, list[dict[str, float]]]:
    """Copy and least-squares-initialise a MemoryFormer from `dense` (float32, eval mode).

    Args:
        dense: a Pythia-twin LanguageModel.
        calibration: (B, T) token ids the fits see (a few tens of thousands of tokens is plenty).
        on_block: called after each block with its fit report (e.g. for progress).
    Returns: the MemoryFormer, and per block {"q_rel_err", ..., "ml2_rel_err"}: each fit's error
    relative to its target's spread on the calibration tokens.
    """
    if calibration.dim() != 2 or calibration.numel() == 0:
        raise ValueError(f"calibration tokens must be a non-empty (batch, seq) tensor, got {tuple(calibration.shape)}")
    dense = dense.float().eval()
    mf = LanguageModel(memoryformer_config(dense.config, tau=tau, expanding_bits=expanding_bits,
                                           weighting=weighting, temperature=temperature)).eval()
    _copy_shared(dense, mf)
    reports = []
    for i in range(mf.config.n_layers):
        reports.append(_convert_block(dense, mf, i, calibration, iterations=iterations, ridge=ridge))
        if on_block is not None:
            on_block(i, reports[-1])
    return mf, reports
