"""FLOPs, parameter and memory accounting for MemoryFormer and its dense Pythia twin.

Three ways of counting compute, always labelled (docs/method.md, "FLOPs"):

* **paper convention** -- one multiply-add = one FLOP, the paper's per-block formulas:
  Transformer `12 s d^2 + 2 s^2 d`, MemoryFormer `6 K s d + 2 s^2 d` ("w/o Attn." drops `2 s^2 d`).
  Reproduces Table 1 (except one printed value, see `TABLE1_NOTE`) and Figure 1.
* **2x convention** -- the usual one, two FLOPs per multiply-add: exactly twice the above.
* **structural count** -- what this package's model code executes, from a `ModelConfig`: the
  Memory Layers' gather-and-sum multiply-adds (`K * out` per token per layer) counted explicitly,
  dense matmuls, attention (`QK^T` and `AV`), the LM head, and elementwise work (hashing, norms,
  softmax, rotary, biases, activations, residuals) kept apart. `torch.utils.flop_counter` counts
  `embedding_bag` -- the Memory Layer's kernel -- as zero, which is why this count exists.

Parameters and bytes come from an actual `LanguageModel` built on the meta device (nothing is
allocated), walked module by module (`parameter_breakdown`, `model_breakdown`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memoryformer.core.config import PRESETS, ModelConfig
from memoryformer.core.layer import MemoryLayer
from memoryformer.core.linear_attention import attention_macs
from memoryformer.research.paper import TABLE1_FLOPS_G, TABLE2_BLOCK_GFLOPS, TABLE2_D_MODEL, TABLE2_SEQ_LEN

CONVENTIONS = {
    "paper": "paper convention: 1 FLOP = 1 multiply-add",
    "2x": "usual convention: 2 FLOPs per multiply-add",
    "structural": "structural count of what this code executes, in multiply-adds (MACs)",
}

PAPER_PRESETS = ("mf-tiny", "pythia-70m", "mf-small", "pythia-160m", "mf-base", "pythia-410m")

TABLE1_NOTE = (
    "Table 1 prints 1.0 G for MemoryFormer-small w/o Attn.; the paper's own formula 6Ksd gives "
    "6*96*2048*768 = 0.91 G, so its total is 7.35 G (printed 7.4 G = 1.0 + 6.44). Every other "
    "Table 1 value matches the formula to 0.1 G."
)
STRUCTURAL_NOTE = (
    "The structural count of a Memory Layer is K*out multiply-adds per token: Q/K/V 3Kd, "
    "ML1 K*K(tau+e), ML2 Kd, about 5.25Ksd per block for tau=8, e=2 -- below the paper's 6Ksd."
)

# Nominal elementwise operations per element, for the structural count's "elementwise" terms.
# They are order-of-magnitude bookkeeping, not measured; the MAC terms are exact.
HASH_OPS_PER_ELEMENT = 6  # sign compare, bit placement, accumulate code, |z|, scale, log-sigmoid
HASH_OPS_PER_CHUNK = 2  # sum of log-sigmoids -> exp; "l1" adds the L1 sum and a multiply
RMSNORM_OPS_PER_ELEMENT = 4  # square, accumulate, divide, scale
LAYERNORM_OPS_PER_ELEMENT = 7  # mean, subtract, square, accumulate, normalise, scale, shift
SOFTMAX_OPS_PER_SCORE = 5  # scale, max, subtract-exp, sum, divide
ROTARY_OPS_PER_ELEMENT = 3  # two multiplies and an add per rotated element of q and k
GELU_OPS_PER_ELEMENT = 8

KINDS = ("dense", "memory", "attention", "elementwise")
MAC_KINDS = ("dense", "memory", "attention")


# ---- paper convention ------------------------------------------------------------------------


def paper_block_flops(
    architecture: str,
    d_model: int,
    seq_len: int,
    *,
    num_tables: int | None = None,
    attention: bool = True,
) -> int:
    """FLOPs of one block in the paper's convention (1 FLOP = 1 multiply-add), as in the paper's Table 1.

    Transformer: `12 s d^2 + 2 s^2 d`; MemoryFormer: `6 K s d + 2 s^2 d` (`num_tables` = K,
    required for "memoryformer"). `attention=False` gives Table 1's "w/o Attn." column.
    """
    _check_positive(d_model=d_model, seq_len=seq_len)
    s, d = seq_len, d_model
    if architecture == "pythia":
        linear = 12 * s * d * d
    elif architecture == "memoryformer":
        if num_tables is None or num_tables <= 0:
            raise ValueError(f"paper_block_flops: memoryformer needs num_tables = K > 0, got {num_tables}")
        linear = 6 * num_tables * s * d
    else:
        raise ValueError(f"architecture must be 'memoryformer' or 'pythia', got {architecture!r}")
    return linear + (2 * s * s * d if attention else 0)


def paper_flops(config: ModelConfig, seq_len: int, *, attention: bool = True) -> int:
    """`paper_block_flops` for a config (one block, paper convention); a twin with an efficient attention
    (config.attention, Table 2) counts that attention's multiply-adds instead of 2 s^2 d."""
    linear = paper_block_flops(config.architecture, config.d_model, seq_len, num_tables=config.num_tables,
                               attention=False)
    if not attention:
        return linear
    return linear + attention_macs(config.attention, seq_len, config.d_model, config.n_heads, config.max_seq_len)


def table2_flops(seq_len: int = TABLE2_SEQ_LEN, d_model: int = TABLE2_D_MODEL, n_heads: int = 16) -> dict[str, Any]:
    """FLOPs of one Pythia-410M block (d = 1024, 16 heads) with each attention of Table 2 at s = seq_len, paper
    convention (1 multiply-add = 1 FLOP), beside the paper's printed numbers (G).

    Ours are the structural formulas of core/linear_attention.attention_macs (Performer m = int(Dh ln Dh)
    features, Linformer r = s / 8, the attention's max_seq_len taken as s)."""
    dense = paper_block_flops("pythia", d_model, seq_len, attention=False)
    rows = {}
    for kind in ("softmax", "performer", "cosformer", "linformer"):
        macs = attention_macs(kind, seq_len, d_model, n_heads, seq_len)
        rows[kind] = {"attention_gflops": macs / 1e9, "block_gflops": (dense + macs) / 1e9,
                      "paper_block_gflops": TABLE2_BLOCK_GFLOPS.get(kind) if kind != "softmax" else
                      TABLE1_FLOPS_G["pythia-410m"][1]}
    return {"seq_len": seq_len, "d_model": d_model, "n_heads": n_heads, "dense_gflops": dense / 1e9, "rows": rows}


def to_convention(macs: int | float, convention: str) -> int | float:
    """Multiply-adds -> FLOPs: "paper" (x1) or "2x" (x2)."""
    if convention == "paper":
        return macs
    if convention == "2x":
        return 2 * macs
    raise ValueError(f"convention must be 'paper' or '2x', got {convention!r}")


def paper_memory_layer_flops(seq_len: int, num_tables: int, tau: int, out_features: int) -> int:
    """Table 3's cost of one Memory Layer over s tokens: `s (tau + h) K` (paper convention)."""
    _check_positive(seq_len=seq_len, num_tables=num_tables, tau=tau, out_features=out_features)
    return seq_len * (tau + out_features) * num_tables


def memory_table_bytes(num_tables: int, tau: int, out_features: int, bytes_per_value: int = 2) -> int:
    """Bytes of one Memory Layer's tables, `K * 2^tau * h * bytes` (Table 3; fp16 by default)."""
    _check_positive(num_tables=num_tables, tau=tau, out_features=out_features, bytes_per_value=bytes_per_value)
    return num_tables * (2**tau) * out_features * bytes_per_value


def memory_block_table_bytes(
    num_tables: int, tau: int, d_model: int, expanding_bits: int, bytes_per_value: int = 2
) -> int:
    """Bytes of a Memory Block's tables (Table 5): ML1 `K 2^tau K(tau+e)` + ML2 `K 2^(tau+e) d`."""
    hidden = num_tables * (tau + expanding_bits)
    return memory_table_bytes(num_tables, tau, hidden, bytes_per_value) + memory_table_bytes(
        num_tables, tau + expanding_bits, d_model, bytes_per_value
    )


# ---- structural count ------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One component of a forward pass over one sequence of `seq_len` tokens.

    kind: "dense" (nn.Linear matmul MACs, biases excluded), "memory" (Memory Layer gather-and-sum
    MACs), "attention" (QK^T and AV MACs), "elementwise" (nominal op count: hashing, norms,
    softmax, rotary, bias adds, activations, residual adds).
    """

    name: str
    kind: str
    count: int


@dataclass(frozen=True)
class StructuralCount:
    """The structural count of one forward pass over one sequence (batch 1).

    `block` holds one block's terms (all blocks are identical); `model` holds the terms outside
    the blocks (final norm, LM head; the embedding is a lookup, zero MACs).
    """

    architecture: str
    seq_len: int
    n_layers: int
    causal: bool
    block: tuple[Term, ...]
    model: tuple[Term, ...]

    def block_total(self, kinds: Iterable[str] = MAC_KINDS) -> int:
        """Sum of one block's terms of the given kinds."""
        kinds = _check_kinds(kinds)
        return sum(t.count for t in self.block if t.kind in kinds)

    def block_macs(self, *, attention: bool = True) -> int:
        """Multiply-adds of one block: dense + memory (+ attention)."""
        return self.block_total(MAC_KINDS if attention else ("dense", "memory"))

    @property
    def head_macs(self) -> int:
        """LM-head multiply-adds over the sequence: `s * d * vocab`."""
        return sum(t.count for t in self.model if t.name == "head")

    def forward_macs(self, *, include_head: bool = True, attention: bool = True) -> int:
        """Multiply-adds of the whole forward: n_layers blocks (+ head)."""
        return self.n_layers * self.block_macs(attention=attention) + (self.head_macs if include_head else 0)

    def forward_elementwise(self) -> int:
        """Nominal elementwise ops of the whole forward (blocks and final norm)."""
        extra = sum(t.count for t in self.model if t.kind == "elementwise")
        return self.n_layers * self.block_total(("elementwise",)) + extra

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "seq_len": self.seq_len,
            "n_layers": self.n_layers,
            "causal": self.causal,
            "block": [dataclasses.asdict(t) for t in self.block],
            "model": [dataclasses.asdict(t) for t in self.model],
            "block_macs_without_attention": self.block_macs(attention=False),
            "block_macs": self.block_macs(),
            "block_elementwise": self.block_total(("elementwise",)),
            "head_macs": self.head_macs,
            "forward_macs": self.forward_macs(),
        }


def structural_count(config: ModelConfig, seq_len: int, *, causal: bool = False) -> StructuralCount:
    """Count what this package's model executes for one sequence of `seq_len` tokens.

    MACs per token and layer: a Memory Layer `K * out` (Q/K/V share one hash, counted once);
    an nn.Linear `in * out` (its bias add is an elementwise term). Attention: `QK^T` and `AV`
    are `s^2 d` MACs each per block; `causal=False` (default) counts the full s x s products
    dense kernels execute (and the paper's `2 s^2 d`), `causal=True` only the s(s+1)/2 pairs a
    causal mask keeps. The head is `s * d * vocab` MACs, reported apart from the blocks.
    """
    _check_positive(seq_len=seq_len)
    s, d, c = seq_len, config.d_model, config
    pairs = s * (s + 1) // 2 if causal else s * s
    block: list[Term] = []

    def mac(name: str, kind: str, per_token: int) -> None:
        block.append(Term(name, kind, s * per_token))

    def ew(name: str, per_token: int) -> None:
        block.append(Term(name, "elementwise", s * per_token))

    if c.architecture == "memoryformer":
        k, hidden = c.num_tables, c.memory_hidden
        chunk_ops = HASH_OPS_PER_CHUNK + (1 if c.weighting == "l1" else 0)
        elem_ops = HASH_OPS_PER_ELEMENT + (1 if c.weighting == "l1" else 0)
        ew("attention.norm", RMSNORM_OPS_PER_ELEMENT * d)
        ew("attention.hash", elem_ops * d + chunk_ops * k)
        mac("attention.q", "memory", k * d)
        mac("attention.k", "memory", k * d)
        mac("attention.v", "memory", k * d)
        bias_outputs = 3 * d
        mlp_bias_outputs = hidden + d
    else:
        ffn = c.ffn_hidden
        ew("attention.norm", LAYERNORM_OPS_PER_ELEMENT * d)
        mac("attention.qkv", "dense", d * 3 * d)
        bias_outputs = 3 * d + d if c.attention_bias else 0
        mlp_bias_outputs = ffn + d

    block += _attention_terms(c, s, pairs)
    ew("attention.rotary", ROTARY_OPS_PER_ELEMENT * 2 * c.rotary_dims * c.n_heads)

    if c.architecture == "memoryformer":
        ew("mlp.norm", RMSNORM_OPS_PER_ELEMENT * d)
        ew("mlp.ml1.hash", elem_ops * d + chunk_ops * k)
        mac("mlp.ml1", "memory", k * hidden)
        ew("mlp.layernorm", LAYERNORM_OPS_PER_ELEMENT * hidden)
        if c.memory_block_activation == "gelu":
            ew("mlp.activation", GELU_OPS_PER_ELEMENT * hidden)
        ew("mlp.ml2.hash", elem_ops * hidden + chunk_ops * (hidden // (c.tau + c.expanding_bits)))
        mac("mlp.ml2", "memory", (hidden // (c.tau + c.expanding_bits)) * d)
        if not c.memory_bias:
            bias_outputs = mlp_bias_outputs = 0
    else:
        mac("attention.dense", "dense", d * d)
        ew("mlp.norm", LAYERNORM_OPS_PER_ELEMENT * d)
        mac("mlp.up", "dense", d * ffn)
        ew("mlp.activation", GELU_OPS_PER_ELEMENT * ffn)
        mac("mlp.down", "dense", ffn * d)
    ew("biases", bias_outputs + mlp_bias_outputs)
    ew("residual", 2 * d)

    final_norm = RMSNORM_OPS_PER_ELEMENT if c.architecture == "memoryformer" else LAYERNORM_OPS_PER_ELEMENT
    model = (
        Term("final_norm", "elementwise", s * final_norm * d),
        Term("head", "dense", s * d * c.vocab_size),
    )
    return StructuralCount(c.architecture, s, c.n_layers, causal, tuple(block), model)


def _attention_terms(c: ModelConfig, s: int, pairs: int) -> list[Term]:
    """Softmax attention over `pairs` query-key pairs (QK^T, softmax, AV), or one of Table 2's efficient
    attentions, linear in s (core/linear_attention.attention_macs)."""
    if c.attention != "softmax":
        return [Term(f"attention.{c.attention}", "attention", attention_macs(c.attention, s, c.d_model, c.n_heads,
                                                                              c.max_seq_len))]
    return [Term("attention.scores", "attention", pairs * c.d_model),  # QK^T over all heads
            Term("attention.softmax", "elementwise", SOFTMAX_OPS_PER_SCORE * pairs * c.n_heads),
            Term("attention.values", "attention", pairs * c.d_model)]  # AV


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token, 2-FLOPs-per-multiply-add convention, structural count.

    `2 * forward_macs / seq_len`: all blocks (Memory Layers, dense layers, full s x s
    attention) plus the LM head; elementwise work (hashing, norms, softmax) is not included.
    """
    return 2 * structural_count(config, seq_len).forward_macs() / seq_len


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token for model-FLOPs/s logging: 3 x `forward_flops_per_token`.

    Convention: 2 FLOPs per multiply-add; structural count (Memory Layers counted as K * out
    multiply-adds per token, which torch's FlopCounterMode misses); LM head included; attention
    counted over the full s x s (what dense kernels execute, as in the paper's 2 s^2 d);
    elementwise work excluded. The backward pass is taken as twice the forward (input and weight
    gradients: for a Memory Layer, the table scatter-add and the weight inner products).

    Args:
        config: the model's configuration.
        seq_len: tokens per training sequence (attention cost grows with it).
    Returns:
        FLOPs per trained token; multiply by tokens/s for model FLOPs/s.
    """
    return 3 * forward_flops_per_token(config, seq_len)


# ---- parameters and bytes --------------------------------------------------------------------

CATEGORIES = ("tables", "dense", "embedding", "head", "norms", "biases", "other")


@dataclass
class ParameterBreakdown:
    """Parameter counts by category (see `CATEGORIES`); shared parameters counted once."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def bytes(self, dtype: torch.dtype = torch.float16) -> dict[str, int]:
        """Bytes per category (and "total") if every parameter were stored in `dtype`."""
        size = _itemsize(dtype)
        out = {name: n * size for name, n in self.counts.items()}
        out["total"] = self.total * size
        return out

    def to_dict(self, dtype: torch.dtype | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {**self.counts, "total": self.total}
        if dtype is not None:
            data["bytes"] = self.bytes(dtype)
            data["dtype"] = str(dtype).removeprefix("torch.")
        return data


def parameter_breakdown(module: nn.Module, *, head: nn.Module | None = None) -> ParameterBreakdown:
    """Walk `module` by type and count its parameters by category.

    MemoryLayer `.table` -> tables; nn.Linear weight -> dense (or head when it is `head`);
    nn.Embedding -> embedding; RMSNorm / nn.LayerNorm -> norms (weight and bias); every bias of a
    MemoryLayer or nn.Linear -> biases; anything else -> other.
    """
    from memoryformer.core.model import RMSNorm

    result = ParameterBreakdown()
    seen: set[int] = set()
    for mod in module.modules():
        for name, param in mod.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(mod, MemoryLayer):
                category = "tables" if name == "table" else "biases" if name == "bias" else "other"
            elif isinstance(mod, nn.Linear):
                if name == "bias":
                    category = "biases"
                else:
                    category = "head" if mod is head else "dense"
            elif isinstance(mod, nn.Embedding):
                category = "embedding"
            elif isinstance(mod, (RMSNorm, nn.LayerNorm)):
                category = "norms"
            else:
                category = "other"
            result.counts[category] += param.numel()
    return result


@dataclass
class ModelBreakdown:
    """Parameters and bytes of one model, measured on an instance (built on the meta device)."""

    name: str
    config: ModelConfig
    total: ParameterBreakdown
    per_block: list[ParameterBreakdown]
    block_modules: list[tuple[str, str, int]]  # block 0: (qualified name, class name, parameters)

    @property
    def block(self) -> ParameterBreakdown:
        """One block's breakdown (block 0; all blocks are the same size)."""
        return self.per_block[0]

    def to_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, Any]:
        return {
            "name": self.name,
            "total": self.total.to_dict(dtype),
            "per_block": self.block.to_dict(dtype),
            "blocks_identical": all(b.counts == self.block.counts for b in self.per_block),
            "block_modules": [{"name": n, "type": t, "params": p} for n, t, p in self.block_modules],
        }


def build_meta_model(config: ModelConfig) -> nn.Module:
    """`LanguageModel(config)` on the meta device: shapes only, no memory allocated."""
    from memoryformer.core.model import LanguageModel

    with torch.device("meta"):
        return LanguageModel(config)


def model_breakdown(config_or_preset: ModelConfig | str, model: nn.Module | None = None) -> ModelBreakdown:
    """Parameter breakdown of a whole model and of each block.

    Args:
        config_or_preset: a ModelConfig or a preset name.
        model: an existing LanguageModel for that config; default: one built on the meta device.
    """
    name, config = _resolve(config_or_preset)
    if model is None:
        model = build_meta_model(config)
    per_block = [parameter_breakdown(b) for b in model.blocks]
    modules = [
        (n, type(m).__name__, sum(p.numel() for p in m.parameters(recurse=False)))
        for n, m in model.blocks[0].named_modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    return ModelBreakdown(name, config, parameter_breakdown(model, head=model.head), per_block, modules)


# ---- reports: Table 1 and Figure 1 -----------------------------------------------------------


def flops_report(config_or_preset: ModelConfig | str, seq_len: int = 2048) -> dict[str, Any]:
    """Per-block FLOPs of one model in all three counts (no model instance needed).

    Returns a dict with "paper" and "2x" ({"without_attention", "total"} per block), and
    "structural" (`StructuralCount.to_dict()`), plus the training FLOPs per token.
    """
    name, config = _resolve(config_or_preset)
    paper = {
        "without_attention": paper_flops(config, seq_len, attention=False),
        "total": paper_flops(config, seq_len),
    }
    return {
        "name": name,
        "architecture": config.architecture,
        "n_layers": config.n_layers,
        "d_model": config.d_model,
        "num_tables": config.num_tables if config.architecture == "memoryformer" else None,
        "seq_len": seq_len,
        "paper": paper,
        "2x": {key: to_convention(v, "2x") for key, v in paper.items()},
        "structural": structural_count(config, seq_len).to_dict(),
        "training_flops_per_token": training_flops_per_token(config, seq_len),
    }


def figure1_series(
    hidden_sizes: Sequence[int] = tuple(range(512, 3073, 128)),
    seq_lens: Sequence[int] = (1024, 2048),
    tau: int = 8,
) -> dict[str, Any]:
    """Figure 1's curves: paper-convention FLOPs per block against d, with K = d / tau.

    Returns {"hidden_sizes": [...], "series": {"transformer s=1024": [...], ...}}.
    """
    series: dict[str, list[int]] = {}
    for s in seq_lens:
        series[f"Transformer s={s}"] = [paper_block_flops("pythia", d, s) for d in hidden_sizes]
        series[f"MemoryFormer s={s}"] = [
            paper_block_flops("memoryformer", d, s, num_tables=d // tau) for d in hidden_sizes
        ]
    return {"hidden_sizes": list(hidden_sizes), "seq_lens": list(seq_lens), "tau": tau, "series": series}


def plot_figure1(path: str, seq_lens: Sequence[int] = (1024, 2048)) -> str | None:
    """Draw Figure 1 (FLOPs per block vs hidden size 512..3072, paper convention) to a PNG; without
    matplotlib, warn in one line and return None."""
    from memoryformer.research.analysis import _pyplot, plotting_available

    if not plotting_available("Figure 1"):
        return None
    plt = _pyplot()

    data = figure1_series(seq_lens=seq_lens)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"Transformer": "-", "MemoryFormer": "--"}
    for label, values in data["series"].items():
        ax.plot(data["hidden_sizes"], [v / 1e9 for v in values], styles[label.split()[0]], label=label)
    ax.set_xlabel("hidden size d")
    ax.set_ylabel("GFLOPs per block (1 FLOP = 1 multiply-add)")
    ax.set_title("FLOPs per block, MemoryFormer (K = d/8) vs Transformer")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- helpers ---------------------------------------------------------------------------------


def _resolve(config_or_preset: ModelConfig | str) -> tuple[str, ModelConfig]:
    if isinstance(config_or_preset, str):
        return config_or_preset, ModelConfig.from_preset(config_or_preset)
    if isinstance(config_or_preset, ModelConfig):
        name = next((p for p in PRESETS if ModelConfig.from_preset(p) == config_or_preset), "custom")
        return name, config_or_preset
    raise TypeError(f"expected a ModelConfig or a preset name, got {type(config_or_preset).__name__}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown term kinds {bad}; known: {KINDS}")
    return kinds


def _itemsize(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return dtype.itemsize
