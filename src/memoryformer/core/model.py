"""MemoryFormer and its dense Pythia twin, in one readable file.

    LanguageModel: token embedding -> n_layers blocks -> final norm -> untied head

    MemoryFormerBlock (paper section 2.4, Eq. 13; docs/method.md):
        h = x + Attention(Q, K, V = three Memory Layers sharing one hash of RMSNorm(x))   # no W_O
        y = h + ML2(act(LayerNorm(ML1(RMSNorm(h)))))                                     # Memory Block

    PythiaBlock (GPT-NeoX as Pythia uses it):
        y = x + Attention(LayerNorm1(x)) + MLP(LayerNorm2(x))        (parallel residual)

Both attend causally through `F.scaled_dot_product_attention`, with GPT-NeoX rotary embedding on the
first `rotary_pct` of each head's dims. Tensor layout: (batch, seq, d_model); heads (batch, heads,
seq, head_dim). Incremental decoding keeps keys and values in a preallocated `KVCache`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memoryformer import kernels as _kernels
from memoryformer.core.config import ModelConfig
from memoryformer.core.layer import MemoryLayer, shared_hash_forward
from memoryformer.core.linear_attention import make_attention

# ---------------------------------------------------------------------------------------------
# Norms and rotary embedding
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """GPT-NeoX RMSNorm: `weight * x / (rms(x) + eps)` (eps added to the RMS, as the official code does)."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., dim), computed in float32 or wider, returned in x's dtype.

        rms(x) = ||x||_2 / sqrt(dim), one fused reduction (docs/performance.md); its gradient at x = 0
        is the true weight / eps."""
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True) / math.sqrt(xf.shape[-1])
        return (xf * (rms + self.eps).reciprocal() * self.weight).to(x.dtype)


def rotary_cos_sin(positions: Tensor, rotary_dims: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """GPT-NeoX rotary tables for `positions` (seq,): cos and sin, each (seq, rotary_dims)."""
    exponent = torch.arange(0, rotary_dims, 2, dtype=torch.int64, device=positions.device).float() / rotary_dims
    inv_freq = 1.0 / (base**exponent)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first cos.shape[-1] dims of x (batch, heads, seq, head_dim) by the half-split rule."""
    rot = cos.shape[-1]
    if rot == 0:
        return x
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


# ---------------------------------------------------------------------------------------------
# KV cache and attention
# ---------------------------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values of every layer, each (batch, heads, max_len, head_dim).

    `length` counts the positions already written; a forward pass over T new tokens writes
    positions [length, length + T) in every layer and then advances `length` by T.
    `decode_plan` (None, or LanguageModel.decode_plan(cache)): the fused decode op's reading of the
    model, made once for every one-token step into this cache.
    """

    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_len: int, head_dim: int,
                 *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, n_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0
        self.decode_plan: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """A copy (copy.deepcopy, pickle) carries no decode plan: the plan holds the model's own tensors."""
        return {**self.__dict__, "decode_plan": None}

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (batch, heads, T, head_dim) after the cached positions; return all so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to {end}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reset(self) -> None:
        self.length = 0


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of q (B, H, T, Dh) over k, v (B, H, S, Dh), S >= T, the last T of S being q's."""
    T, S = q.shape[2], k.shape[2]
    if S == T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v)
    past = S - T
    mask = torch.arange(T, device=q.device)[:, None] + past >= torch.arange(S, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _split_heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, T, H * Dh) -> (B, H, T, Dh)."""
    B, T, _ = x.shape
    return x.view(B, T, n_heads, -1).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, Dh) -> (B, T, H * Dh)."""
    B, H, T, Dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * Dh)


def _attend(q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None,
            layer: int, attention: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """Rotary on q and k (B, H, T, Dh), cache update, causal attention (softmax, or `attention`, one of
    core/linear_attention.py's modules) -> (B, T, H * Dh)."""
    cos, sin = rope
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if cache is not None:
        dtype = cache.keys[layer].dtype
        k, v = cache.update(layer, k.to(dtype), v.to(dtype))
        q = q.to(dtype)
    return _merge_heads((attention or causal_attention)(q, k, v))


# ---------------------------------------------------------------------------------------------
# MemoryFormer block
# ---------------------------------------------------------------------------------------------


class MemoryAttention(nn.Module):
    """Q, K, V from three Memory Layers sharing one hash; multi-head causal attention; no W_O."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.n_heads
        kw = dict(tau=cfg.tau, bias=cfg.memory_bias, weighting=cfg.weighting,
                  temperature=cfg.temperature, init_std=cfg.resolved_init_std)
        self.q_proj = MemoryLayer(cfg.d_model, cfg.d_model, **kw)
        self.k_proj = MemoryLayer(cfg.d_model, cfg.d_model, **kw)
        self.v_proj = MemoryLayer(cfg.d_model, cfg.d_model, **kw)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None = None) -> Tensor:
        """(B, T, d) -> (B, T, d)."""
        # one hash for all three (the input is the same); one fused op where the kernels apply
        q, k, v = shared_hash_forward(x, [self.q_proj, self.k_proj, self.v_proj])
        return _attend(_split_heads(q, self.n_heads), _split_heads(k, self.n_heads), _split_heads(v, self.n_heads),
                       rope, cache, self.layer)


class MemoryBlockMLP(nn.Module):
    """The FFN replacement: ML1 (d -> K(tau+e)) -> LayerNorm -> [GeLU] -> ML2 (K chunks of tau+e bits -> d)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = cfg.memory_hidden
        kw = dict(bias=cfg.memory_bias, weighting=cfg.weighting, temperature=cfg.temperature,
                  init_std=cfg.table_init_std)
        self.ml1 = MemoryLayer(cfg.d_model, hidden, tau=cfg.tau, **kw)
        self.norm = nn.LayerNorm(hidden, eps=cfg.norm_eps)
        self.act = nn.GELU() if cfg.memory_block_activation == "gelu" else nn.Identity()
        self.ml2 = MemoryLayer(hidden, cfg.d_model, tau=cfg.tau + cfg.expanding_bits, **kw)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, d) -> (B, T, d)."""
        return self.ml2(self.act(self.norm(self.ml1(x))))


class MemoryFormerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = MemoryAttention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = MemoryBlockMLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None = None) -> Tensor:
        """(B, T, d) -> (B, T, d); standard pre-norm residuals (paper Eq. 13)."""
        if cache is not None and x.shape[1] == 1 and self.decodes_fused():
            # one fused C++ op for the whole block (memoryformer.kernels.DecodeBlock), where it applies
            fused = _kernels.try_decode_block(self, x, rope, cache)
            if fused is not None:
                return fused
        h = x + self.attn(self.attn_norm(x), rope, cache)
        return h + self.mlp(self.mlp_norm(h))

    def decodes_fused(self) -> bool:
        """Whether the fused decode op computes this block as it is: both norms plain RMSNorms with one
        eps, and no forward replaced on an instance (the op checks the layers, kernels.DecodeBlock)."""
        a, m = self._modules["attn_norm"], self._modules["mlp_norm"]
        return (type(a) is RMSNorm and type(m) is RMSNorm and a.eps == m.eps
                and not any("forward" in mod.__dict__ for mod in (self, a, m)))


# ---------------------------------------------------------------------------------------------
# Pythia (GPT-NeoX) block: parameter names follow transformers' GPTNeoXLayer
# ---------------------------------------------------------------------------------------------


class PythiaAttention(nn.Module):
    """Fused QKV projection (per head: q, k, v), rotary, causal attention, output projection."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.n_heads
        self.query_key_value = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.attention_bias)
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.attention_bias)
        if cfg.attention != "softmax":  # Table 2's efficient attentions; softmax adds no submodule
            self.linear_attention = make_attention(cfg.attention, head_dim=cfg.head_dim,
                                                   max_seq_len=cfg.max_seq_len, layer=layer)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None = None) -> Tensor:
        """(B, T, d) -> (B, T, d)."""
        qkv = _split_heads(self.query_key_value(x), self.n_heads)  # (B, H, T, 3 Dh)
        q, k, v = qkv.chunk(3, dim=-1)
        return self.dense(_attend(q, k, v, rope, cache, self.layer, getattr(self, "linear_attention", None)))


class PythiaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.d_model, cfg.ffn_hidden)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, d) -> (B, T, d), exact (erf) GeLU as in Pythia."""
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class PythiaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = PythiaAttention(cfg, layer)
        self.mlp = PythiaMLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache | None = None) -> Tensor:
        """(B, T, d) -> (B, T, d)."""
        attn = self.attention(self.input_layernorm(x), rope, cache)
        if self.parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h))


# ---------------------------------------------------------------------------------------------
# The language model
# ---------------------------------------------------------------------------------------------


class LanguageModel(nn.Module):
    """Token embedding -> blocks -> final norm -> untied LM head, for either architecture."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        block_cls = MemoryFormerBlock if config.architecture == "memoryformer" else PythiaBlock
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(block_cls(config, i) for i in range(config.n_layers))
        if config.architecture == "memoryformer":
            self.norm: nn.Module = RMSNorm(config.d_model, config.rms_norm_eps)
        else:
            self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._rotary_cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self._init_dense_weights()

    def _init_dense_weights(self) -> None:
        """small_init N(0, 2/(5d)) for embedding, head and dense weights; wang_init 2/(L sqrt d) for the
        Pythia output projections (GPT-NeoX's Pythia settings); zero biases. Memory Layers initialise
        their own tables (Q/K/V: small_init; Memory Block: 0.02; docs/method.md)."""
        std = self.config.resolved_init_std
        out_std = 2.0 / (self.config.n_layers * math.sqrt(self.config.d_model))
        nn.init.normal_(self.embed.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.head.weight, std=std)
        for name, module in self.blocks.named_modules():
            if isinstance(module, nn.Linear):
                is_output = name.endswith("attention.dense") or name.endswith("dense_4h_to_h")
                nn.init.normal_(module.weight, std=out_std if is_output else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ---- forward -------------------------------------------------------------------------
    def check_tokens(self, idx: Tensor, cache: KVCache | None = None, extra: int = 0) -> None:
        """Check token ids idx (B, T) before they reach the embedding (where a bad id is a torch-internal
        error, on CUDA a device-side assert): an int64 / int32 tensor, B and T positive, ids in
        [0, vocab_size), and the cached positions + T (+ `extra` to generate) within max_seq_len and the
        cache. One ValueError / TypeError naming what is wrong. The id range costs one aminmax (one device
        sync); it is skipped while torch.compile traces (a data-dependent check would break the graph) and
        on the meta device (no values)."""
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
            raise TypeError(f"token ids must be an int64 tensor of shape (batch, seq), got {got}")
        B, T = idx.shape
        if B == 0 or T == 0:
            raise ValueError(f"token ids must hold at least one sequence of at least one token, got shape {(B, T)}")
        start = cache.length if cache is not None else 0
        end = start + T + extra
        if end > self.config.max_seq_len:
            what = f"{start} cached + {T} new" + (f" + {extra} to generate" if extra else "")
            raise ValueError(f"sequence of {end} positions ({what}) exceeds max_seq_len={self.config.max_seq_len}")
        if cache is not None and end > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; cannot write up to {end}")
        if cache is not None and B != cache.keys[0].shape[0]:
            raise ValueError(f"batch of {B} sequences does not match the KV cache's {cache.keys[0].shape[0]}")
        if not (torch.compiler.is_compiling() or idx.is_meta):
            low, high = torch.stack(torch.aminmax(idx)).tolist()  # one device sync
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def hidden_states(self, idx: Tensor, *, cache: KVCache | None = None) -> Tensor:
        """idx (B, T) int64 -> final-normed hidden states (B, T, d), everything but the head."""
        self.check_tokens(idx, cache)
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        x = self.embed(idx)
        cos, sin = self._rotary_tables(x.device, x.dtype, start + T)
        rope = cos[start:start + T], sin[start:start + T]
        if cache is not None and T == 1:
            # one fused C++ op for every block and the final norm (memoryformer.kernels), where it applies;
            # with the cache's plan (decode_plan) the model is not read again
            plan, blocks = getattr(cache, "decode_plan", None), list(self.blocks)
            fused = None if plan is None else _kernels.try_decode_planned(plan, blocks, self.norm, x, rope, cache)
            if fused is None and self._decodes_fused():
                fused = _kernels.try_decode_blocks(blocks, self.norm, x, rope, cache)
            if fused is not None:
                cache.length += T
                return fused
        for block in self.blocks:
            x = block(x, rope, cache)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def decode_plan(self, cache: KVCache) -> Any:
        """The fused decode op's reading of this model for one-token steps into `cache`
        (memoryformer.kernels.DecodePlan), or None where the op does not apply (a Pythia model, hooks,
        other dtypes, kernels not built). Set `cache.decode_plan` to it, as generate() does, and each
        step skips re-reading the blocks: a quarter or more of mf-tiny's decode step on a 2-core CPU.
        While the cache carries it, do not replace modules or parameters, add hooks to submodules or
        change dtypes (in-place updates of parameters are fine); set `cache.decode_plan = None` first."""
        if not self._decodes_fused():
            return None
        return _kernels.try_decode_plan(list(self.blocks), self.norm, cache)

    def _decodes_fused(self) -> bool:
        """Whether the blocks and final norm are the plain classes the fused decode op computes."""
        norm = self._modules["norm"]
        return type(norm) is RMSNorm and "forward" not in norm.__dict__ and \
            all(type(b) is MemoryFormerBlock and b.decodes_fused() for b in self.blocks)

    def _rotary_tables(self, device: torch.device, dtype: torch.dtype, length: int) -> tuple[Tensor, Tensor]:
        """cos, sin (n, rotary_dims) for positions [0, n), n >= length: computed once per device and dtype
        and grown by doubling (up to max_seq_len) when a longer sequence comes; not saved."""
        key = (device, dtype)
        tables = self._rotary_cache.get(key)
        if tables is None or tables[0].shape[0] < length:
            have = 0 if tables is None else tables[0].shape[0]
            n = min(self.config.max_seq_len, max(length, 2 * have, 1024))
            positions = torch.arange(n, device=device)
            tables = rotary_cos_sin(positions, self.config.rotary_dims, self.config.rotary_base, dtype)
            self._rotary_cache[key] = tables
        return tables

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, cache: KVCache | None = None,
                ignore_index: int = -100, last_logits_only: bool = False) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) int64 -> logits (B, T, vocab) (or (B, 1, vocab) with last_logits_only), and the
        mean cross-entropy against targets (B, T) (positions equal to ignore_index skipped) or None.

        With a cache, idx holds the T tokens after the cache's `length` cached positions."""
        x = self.hidden_states(idx, cache=cache)
        if last_logits_only:
            x = x[:, -1:]
        logits = self.head(x)
        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
        return logits, loss

    # ---- incremental decoding ------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for `batch_size` sequences of up to `max_len` (default max_seq_len) positions."""
        cfg = self.config
        ref = self.embed.weight  # the activations' device and dtype (the head may be quantized)
        return KVCache(cfg.n_layers, batch_size, cfg.n_heads, max_len or cfg.max_seq_len, cfg.head_dim,
                       device=ref.device, dtype=dtype or ref.dtype)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, stop_token: int | None = None,
                 generator: torch.Generator | None = None,
                 on_token: Callable[[Tensor], None] | None = None) -> Tensor:
        """Sample up to max_new_tokens after idx (B, T); returns (B, T + generated).

        temperature 0 is greedy. top_k keeps the k most likely tokens; top_p the smallest set whose
        probability reaches p. A sequence that emits stop_token is padded with it until all stop.
        `on_token` receives each new (B,) token tensor as it is chosen (for streaming); it must not
        change the model (the one-token steps reuse one reading of it: decode_plan)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        self.check_tokens(idx, extra=max_new_tokens)
        B, T = idx.shape
        total = T + max_new_tokens
        cache = self.new_cache(B, total)
        cache.decode_plan = self.decode_plan(cache)
        logits, _ = self(idx, cache=cache, last_logits_only=True)
        out = torch.empty(B, total, dtype=idx.dtype, device=idx.device)
        out[:, :T] = idx
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        n = T
        for _ in range(max_new_tokens):
            token = sample_next_token(logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p,
                                      generator=generator)
            if stop_token is not None:
                token = torch.where(finished, torch.full_like(token, stop_token), token)
                finished |= token == stop_token
            out[:, n] = token
            n += 1
            if on_token is not None:
                on_token(token)
            if stop_token is not None and bool(finished.all()):
                break
            if n < total:
                logits, _ = self(token[:, None], cache=cache)
        return out[:, :n]

    # ---- sizes ---------------------------------------------------------------------------
    def num_parameters(self, *, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.head.weight.numel()
        return n

    # ---- Hugging Face GPT-NeoX interop ---------------------------------------------------
    @classmethod
    def from_hf_gpt_neox(cls, model_or_path: Any) -> LanguageModel:
        """Load a transformers `GPTNeoXForCausalLM` (an instance or a directory / hub name) as a Pythia twin."""
        from memoryformer.integrations.neox import config_from_hf, state_dict_from_hf

        if isinstance(model_or_path, (str, Path)):
            from transformers import GPTNeoXForCausalLM

            model_or_path = GPTNeoXForCausalLM.from_pretrained(model_or_path)
        config = config_from_hf(model_or_path.config)
        model = cls(config)
        model.load_state_dict(state_dict_from_hf(model_or_path.state_dict()))
        return model.to(next(model_or_path.parameters()).dtype)


def sample_next_token(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """logits (B, vocab) -> token ids (B,). temperature 0 (or below 1e-6) means greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature < 1e-6:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # keep tokens until p is reached
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
