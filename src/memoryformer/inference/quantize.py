"""Lower-precision inference copies of a trained model, and what they cost in accuracy.

    qmodel = quantize_model(model, tables="int8", head="int8")      # a frozen, quantized copy
    rows = precision_report(model, held_out_tokens)                 # error and perplexity per option

Options (each independent; None keeps the float32 original):
    tables="bf16"  every Memory Layer keeps its table in bfloat16 (half the bytes) and computes in
                   float32: MemoryLayer's hash, then the K picked bf16 rows of each token converted and
                   summed in float32 with the float32 bias (`gather_sum_dequant`, pure PyTorch; not the
                   fused bf16 kernels, which round their output to bf16); the output is cast back to the
                   input's dtype, so the rest of the float32 model is unchanged.
    tables="int8"  symmetric per-row int8 tables with float32 per-row scales (`kernels.quantize_tables`,
                   a quarter of the bytes plus 4 bytes a row), through `kernels.memory_layer_int8` (the
                   fused C++ op `memory_layer_q8`, or dequantise + the pure path). With a shared hash
                   (MemoryAttention's Q, K, V), the K picked int8 rows of each token are dequantised and
                   summed in PyTorch under exactly the given (rows, weights): correctness first, no
                   fused kernel for that case.
    head="bf16"    bf16 LM-head weight; logits = (x.bfloat16() @ w.T).float().
    head="int8"    symmetric per-output-row int8 weight with float32 scales (the same quantiser as the
                   tables); `torch._weight_int8pack_mm` (the CPU int8 weight-only GEMM used by gpt-fast)
                   where it exists and checks out on the device and dtype, else dequantise-and-matmul.
    blocks="bf16"  dense (Pythia) models only: every nn.Linear inside the transformer blocks (the fused
                   QKV projection, the attention output and both MLP matrices) becomes a BF16Linear,
                   the head's module: bf16 weight, float32 bias and output.
    blocks="int8"  the same with Int8Linear (per-output-row int8 weight, `torch._weight_int8pack_mm`).
Dense (Pythia) models have no Memory Layers: `tables` is an error for them, `blocks` and `head` work. A
MemoryFormer's blocks hold no dense weight matrix (Q, K, V and the FFN are Memory Layers; attention only
multiplies activations), so `blocks` is an error for it: its equivalent is `tables`.

The quantized modules are inference-only: quantize_model freezes the copy (requires_grad False, eval
mode), and calling a quantized module on an input that requires grad, with grad enabled, raises.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memoryformer import kernels
from memoryformer.core.layer import MemoryLayer, check_hashed, check_input, memory_hash

M = TypeVar("M", bound=nn.Module)

PRECISIONS = ("bf16", "int8")
REFERENCE = "fp32"
# the options precision_report measures by default; "+" combines a tables and a head option
DEFAULT_OPTIONS = ("fp32", "bf16-tables", "int8-tables", "bf16-head", "int8-head", "int8-tables+int8-head")
# targets on the relative L2 logit error (rel_l2_err, see precision_report)
TARGETS = {"bf16-tables": 1e-2, "int8-tables": 2e-2}
_GATHER_CHUNK = 1 << 22  # elements of the (tokens, K, out) dequantised rows built at a time


def _check_precision(what: str, value: str | None) -> None:
    if value is not None and value not in PRECISIONS:
        raise ValueError(f"{what} must be None or one of {PRECISIONS}, got {value!r}")


def _inference_only(module: nn.Module, x: Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(
            f"{type(module).__name__} is inference-only (quantized weights have no gradient); "
            "run it under torch.no_grad() or torch.inference_mode(), or train the float32 model"
        )


# ---------------------------------------------------------------------------------------------
# Memory Layers over bf16 / int8 tables
# ---------------------------------------------------------------------------------------------


class _QuantizedMemoryLayer(nn.Module):
    """What both table precisions share: the hash, the accounting, the repr. Buffers: table (R, out),
    bias (out,) float32 or None."""

    precision = ""

    def __init__(self, layer: MemoryLayer) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.tau, self.num_tables = layer.tau, layer.num_tables
        self.weighting, self.temperature = layer.weighting, layer.temperature
        bias = None if layer.bias is None else layer.bias.detach().float().clone()
        self.register_buffer("bias", bias)

    hash = MemoryLayer.hash  # (..., in_features) -> rows (..., K) int64, weights (..., K): the same hash

    def _check(self, x: Tensor, hashed: tuple[Tensor, Tensor] | None) -> None:
        check_input(x, self.in_features)
        _inference_only(self, x)
        if hashed is not None:
            check_hashed(hashed, x.shape[:-1], self.num_tables)

    def decode_table(self) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
        """What the fused decode op reads (memoryformer.kernels.DecodeWeights, as MemoryLayer.decode_table):
        (table (R, out) bf16 or int8, bias (out,) float32 or None, per-row scales (R,) float32 for int8
        else None). The op sums in float32, as forward does."""
        b = self._buffers
        return b["table"], b.get("bias"), b.get("scales")

    def table_bytes(self) -> int:
        """Bytes of the table and its scales (the bias is not counted)."""
        scales = getattr(self, "scales", None)
        return self.table.numel() * self.table.element_size() + (0 if scales is None else scales.numel() * 4)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, tau={self.tau}, "
                f"num_tables={self.num_tables}, table={self.precision}, weighting={self.weighting!r}"
                + (f", temperature={self.temperature}" if self.weighting == "prob" else "")
                + f", bias={self.bias is not None}, inference_only=True")


class BF16MemoryLayer(_QuantizedMemoryLayer):
    """A MemoryLayer whose table is stored in bfloat16 and computed with in float32.

    Buffers: table (R, out) bf16, bias (out,) float32 or None. Input (..., in) -> (..., out) in x's dtype:
    the hash (MemoryLayer's), then the K picked bf16 rows converted and summed in float32."""

    precision = "bf16"

    def __init__(self, layer: MemoryLayer) -> None:
        super().__init__(layer)
        self.register_buffer("table", layer.table.detach().to(torch.bfloat16).clone())

    def forward(self, x: Tensor, hashed: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(..., in_features) -> (..., out_features); `hashed` reuses another layer's hash of x."""
        self._check(x, hashed)
        rows, weights = hashed if hashed is not None else self.hash(x)
        return gather_sum_dequant(rows, weights, self.table, None, self.bias).to(x.dtype)


class Int8MemoryLayer(_QuantizedMemoryLayer):
    """A MemoryLayer over a symmetric per-row int8 table: row r = table[r] * scales[r].

    Buffers: table (R, out) int8, scales (R,) float32, bias (out,) float32 or None.
    Input (..., in) -> output (..., out) in x's dtype (computed in float32).
    """

    precision = "int8"

    def __init__(self, layer: MemoryLayer) -> None:
        super().__init__(layer)
        qtable, scales = kernels.quantize_tables(layer.table)
        self.register_buffer("table", qtable)
        self.register_buffer("scales", scales)

    def forward(self, x: Tensor, hashed: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(..., in_features) -> (..., out_features).

        Without `hashed`: the fused int8 op (hash + gather). With `hashed` (rows, weights), e.g. the
        shared Q/K/V hash: the picked int8 rows are dequantised and summed under exactly that hash."""
        self._check(x, hashed)
        if hashed is None:
            out = kernels.memory_layer_int8(x, self.table, self.scales, self.bias, tau=self.tau,
                                            weighting=self.weighting, temperature=self.temperature)
        else:
            out = gather_sum_dequant(*hashed, self.table, self.scales, self.bias)
        return out.to(x.dtype)


def gather_sum_dequant(rows: Tensor, weights: Tensor, table: Tensor, scales: Tensor | None = None,
                       bias: Tensor | None = None) -> Tensor:
    """`out[n] = sum_k weights[n, k] * scales[rows[n, k]] * table[rows[n, k]] + bias`, in float32.

    Args:
        rows: (..., K) integer rows; weights: (..., K); table: (R, out) of any dtype (bf16, int8);
        scales: (R,) per-row scales or None (1); bias: (out,) or None.
    Returns:
        (..., out) float32: the picked rows are converted to float32 (a chunk of tokens at a time, at
        most _GATHER_CHUNK elements of (tokens, K, out)) and summed in float32.
    """
    lead, k = rows.shape[:-1], rows.shape[-1]
    flat_rows = rows.reshape(-1, k).long()
    w = weights.reshape(-1, k).float()
    if scales is not None:
        w = w * scales.float()[flat_rows]  # (N, K): the row's scale folded into its weight
    n, d = flat_rows.shape[0], table.shape[1]
    out = torch.empty(n, d, dtype=torch.float32, device=table.device)
    step = max(1, _GATHER_CHUNK // max(1, k * d))
    for i in range(0, n, step):
        picked = table[flat_rows[i:i + step]].float()  # (n_chunk, K, out)
        out[i:i + step] = torch.bmm(w[i:i + step, None, :], picked).squeeze(1)
    if bias is not None:
        out += bias.float()
    return out.reshape(*lead, d)


# ---------------------------------------------------------------------------------------------
# The LM head in bf16 / int8
# ---------------------------------------------------------------------------------------------

_INT8PACK_OK: dict[tuple[str, torch.dtype], bool] = {}


def _int8pack_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._weight_int8pack_mm exists and agrees with the dequantised matmul here (cached)."""
    key = (device.type, dtype)
    if key not in _INT8PACK_OK:
        ok = hasattr(torch, "_weight_int8pack_mm")
        if ok:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(3, 40, generator=g).to(device, dtype)
            w = torch.randint(-127, 128, (24, 40), generator=g, dtype=torch.int8).to(device)
            s = (torch.rand(24, generator=g) / 100).to(device)
            try:
                got = torch._weight_int8pack_mm(x, w, s.to(dtype)).double()
                want = x.double() @ (w.double() * s.double()[:, None]).T
                ok = got.shape == want.shape and bool(((got - want).abs().max() <= 1e-2 * want.abs().max()).item())
            except (RuntimeError, NotImplementedError):
                ok = False
        _INT8PACK_OK[key] = ok
    return _INT8PACK_OK[key]


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None, *,
                fused: bool | None = None) -> Tensor:
    """`x @ (qweight * scales[:, None]).T + bias` with an int8 weight.

    Args:
        x: (..., in) float; qweight: (out, in) int8; scales: (out,) float32; bias: (out,) or None.
        fused: True = torch._weight_int8pack_mm, False = dequantise-and-matmul, None = the first
            where it works for x's device and dtype.
    Returns:
        (..., out) in x's dtype.
    """
    flat = x.reshape(-1, x.shape[-1])
    if fused is None:
        fused = flat.shape[0] > 0 and _int8pack_works(x.device, x.dtype)
    if fused:
        out = torch._weight_int8pack_mm(flat.contiguous(), qweight, scales.to(x.dtype))
    else:  # y = (x @ q.T) * s: the scale is per output column, so it moves out of the sum
        out = (flat @ qweight.to(x.dtype).T) * scales.to(x.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


class _QuantizedLinear(nn.Module):
    """What both head precisions share. Buffers: qweight (out, in) in the stored dtype, bias (out,)
    float32 or None; `weight` is the effective float32 weight, computed on access (for inspection, and
    for code that reads the head weight's device and dtype, such as LanguageModel.new_cache)."""

    precision = ""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def weight_bytes(self) -> int:
        """Bytes of the stored weight and its scales (the bias is not counted)."""
        scales = getattr(self, "scales", None)
        return self.qweight.numel() * self.qweight.element_size() + (0 if scales is None else scales.numel() * 4)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight={self.precision}, "
                f"bias={self.bias is not None}, inference_only=True")


class BF16Linear(_QuantizedLinear):
    """nn.Linear with a bfloat16 weight: (..., in) -> (x.bfloat16() @ w.T).float() (..., out) float32.

    Buffers: qweight (out, in) bf16, bias (out,) float32 or None."""

    precision = "bf16"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self.register_buffer("qweight", linear.weight.detach().to(torch.bfloat16).clone())

    @property
    def weight(self) -> Tensor:
        """(out, in) float32: the bf16 weight's values."""
        return self.qweight.float()

    def forward(self, x: Tensor) -> Tensor:
        _inference_only(self, x)
        out = (x.to(torch.bfloat16) @ self.qweight.T).float()
        return out if self.bias is None else out + self.bias


class Int8Linear(_QuantizedLinear):
    """nn.Linear with a symmetric per-output-row int8 weight: W ~= qweight * scales[:, None].

    Buffers: qweight (out, in) int8, scales (out,) float32, bias (out,) float32 or None.
    (..., in) -> (..., out) in x's dtype."""

    precision = "int8"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        qweight, scales = kernels.quantize_tables(linear.weight)  # per row of (out, in): per output
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @property
    def weight(self) -> Tensor:
        """(out, in) float32: qweight * scales[:, None]."""
        return self.qweight.float() * self.scales[:, None]

    def forward(self, x: Tensor) -> Tensor:
        _inference_only(self, x)
        return int8_linear(x, self.qweight, self.scales, self.bias)


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------

_TABLE_MODULES = {"bf16": BF16MemoryLayer, "int8": Int8MemoryLayer}
_LINEAR_MODULES = {"bf16": BF16Linear, "int8": Int8Linear}


def _no_tables(model: nn.Module, tables: str) -> None:
    arch = getattr(getattr(model, "config", None), "architecture", type(model).__name__)
    raise ValueError(f"tables={tables!r} needs Memory Layers, but this model ({arch}) has none; "
                     "for a dense (Pythia) model quantize its block weights and head (blocks= / head="
                     "'bf16' or 'int8')")


def _block_linears(model: nn.Module, blocks: str) -> list[str]:
    """Module names of every nn.Linear inside `model.blocks`, for blocks=...; ValueError for a model with
    Memory Layers (a MemoryFormer: use tables=) or without any such nn.Linear."""
    if _memory_layers(model):
        raise ValueError(f"blocks={blocks!r} quantizes the nn.Linear weights of a dense (Pythia) model's blocks, "
                         "but this MemoryFormer's blocks have none (Q, K, V and the FFN are Memory Layers, "
                         f"attention has no weights): use tables={blocks!r}, the equivalent for Memory Layers")
    owner = getattr(model, "blocks", None)
    names = [] if owner is None else [f"blocks.{n}" for n, m in owner.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"blocks={blocks!r} needs nn.Linear layers inside model.blocks; this model has none")
    return names


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Set the submodule called `name` (dotted) of `model` to `module`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: M, *, tables: str | None = None, head: str | None = None,
                   blocks: str | None = None) -> M:
    """A frozen inference copy of a LanguageModel with lower-precision Memory Layer tables, block weights
    and/or head.

    tables: None, "bf16" or "int8" (every MemoryLayer; a model without Memory Layers: ValueError);
    blocks: None, "bf16" or "int8" (every nn.Linear inside `model.blocks`, as BF16Linear / Int8Linear: a
    dense model's block weights; a MemoryFormer: ValueError, its equivalent is `tables`);
    head: None, "bf16" or "int8" (`model.head`).
    The input model is left untouched (the copy is a deepcopy). The copy is in eval mode with every
    parameter's requires_grad False. A tied head is quantized in the copy's head only (the embedding
    stays float32).
    """
    _check_precision("tables", tables)
    _check_precision("blocks", blocks)
    _check_precision("head", head)
    layers = [name for name, m in model.named_modules() if isinstance(m, MemoryLayer)]
    if tables is not None and not layers:
        _no_tables(model, tables)
    linears = _block_linears(model, blocks) if blocks is not None else []
    if head is not None and not isinstance(getattr(model, "head", None), nn.Linear):
        raise ValueError(f"head={head!r} needs model.head to be an nn.Linear, got "
                         f"{type(getattr(model, 'head', None)).__name__}")
    out = copy.deepcopy(model)
    if tables is not None:
        for name in layers:
            _replace(out, name, _TABLE_MODULES[tables](out.get_submodule(name)))
    for name in linears:
        _replace(out, name, _LINEAR_MODULES[blocks](out.get_submodule(name)))
    if head is not None:
        out.head = _LINEAR_MODULES[head](out.head)
    out.requires_grad_(False)
    return out.eval()


def storage_bytes(model: nn.Module) -> dict[str, int]:
    """{"tables": bytes of every Memory Layer table (+ int8 scales), "head": bytes of the head weight
    (+ scales)}; biases are not counted. Works for float and quantized models."""
    tables = sum(m.table_bytes() for m in _memory_layers(model).values())
    head = model.head
    head_bytes = head.weight_bytes() if isinstance(head, _QuantizedLinear) else head.weight.numel() * head.weight.element_size()
    return {"tables": tables, "head": head_bytes}


def parse_option(option: str) -> tuple[str | None, str | None]:
    """"fp32" -> (None, None); "int8-tables" -> ("int8", None); "bf16-tables+int8-head" -> ("bf16", "int8")."""
    if option == REFERENCE:
        return None, None
    parts: dict[str, str] = {}
    for part in option.split("+"):
        precision, _, target = part.strip().partition("-")
        if precision not in PRECISIONS or target not in ("tables", "head") or target in parts:
            raise ValueError(f"unknown precision option {option!r}: use {REFERENCE!r} or PRECISION-tables / "
                             f"PRECISION-head joined by '+', PRECISION one of {PRECISIONS} "
                             f"(e.g. {', '.join(repr(o) for o in DEFAULT_OPTIONS[1:])})")
        parts[target] = precision
    return parts.get("tables"), parts.get("head")


def _memory_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Memory Layer (float or quantized) by its module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (MemoryLayer, _QuantizedMemoryLayer))}


@torch.no_grad()
def _run(model: nn.Module, tokens: Tensor, batch_size: int, keep_first: bool = False):
    """Run model over tokens (N, T) in batches of rows.

    Returns: float32 logits (b, T, vocab) of each batch; {layer name: the rows its hash picks, int32
    (N, T, K)}; and with keep_first, {layer name: (its input, its float32 output)} on the first batch."""
    layers = _memory_layers(model)
    rows: dict[str, list[Tensor]] = {name: [] for name in layers}
    first: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, out: Tensor) -> None:
            x = args[0]
            rows[name].append(memory_hash(x, module.tau, module.weighting, module.temperature)[0].int())
            if keep_first and name not in first:
                first[name] = (x.clone(), out.float().clone())
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        logits = [model(tokens[i:i + batch_size])[0].float() for i in range(0, tokens.shape[0], batch_size)]
    finally:
        for handle in handles:
            handle.remove()
    return logits, {name: torch.cat(r) for name, r in rows.items()}, first


def _nll_sum(logits: Tensor, tokens: Tensor) -> float:
    """Summed next-token NLL (nats) of tokens[:, 1:] under logits[:, :-1]: (b, T, V), (b, T)."""
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum"))


def _logit_errors(reference: list[Tensor], outputs: list[Tensor]) -> dict[str, float]:
    """rel_l2_err, mean_rel_err, max_rel_err, top1_agree of outputs against reference (see precision_report)."""
    e_max, e_sum, d2, r2, agree, positions = 0.0, 0.0, 0.0, 0.0, 0, 0
    for r, q in zip(reference, outputs, strict=True):
        r, diff = r.double(), q.double() - r.double()
        e = diff.abs().amax(-1) / r.abs().amax(-1).clamp_min(torch.finfo(torch.float64).tiny)
        e_max, e_sum = max(e_max, float(e.max())), e_sum + float(e.sum())
        d2, r2 = d2 + float(diff.pow(2).sum()), r2 + float(r.pow(2).sum())
        agree += int((q.argmax(-1) == r.argmax(-1)).sum())
        positions += e.numel()
    return {"rel_l2_err": math.sqrt(d2 / r2) if r2 > 0 else 0.0, "mean_rel_err": e_sum / positions,
            "max_rel_err": e_max, "top1_agree": agree / positions}


@torch.no_grad()
def _layer_error(qmodel: nn.Module, first: dict[str, tuple[Tensor, Tensor]]) -> float:
    """Max over Memory Layers of ||layer_q(x) - y|| / ||y||, (x, y) the float32 model's input and output."""
    worst = 0.0
    for name, layer in _memory_layers(qmodel).items():
        x, y = first[name]
        worst = max(worst, float((layer(x).double() - y.double()).norm() / y.double().norm().clamp_min(1e-300)))
    return worst


def precision_report(model: nn.Module, tokens: Tensor, *, options: Sequence[str] | None = None,
                     batch_size: int = 8) -> list[dict]:
    """Accuracy cost of each precision option against the float32 model on held-out tokens (N, T) int64.

    For each option the model is quantized (`quantize_model`) and run on the same rows. With r the
    float32 reference logits and q the option's, per position p (a row and a time step; vocab V):
        e_p = max_v |q_pv - r_pv| / max_v |r_pv|
        max_rel_err  = max over positions of e_p       mean_rel_err = mean over positions of e_p
        rel_l2_err   = ||q - r||_2 / ||r||_2 over all positions and the vocabulary
        top1_agree   = fraction of positions where argmax q = argmax r
        perplexity   = exp(summed NLL of tokens[:, 1:] given logits[:, :-1] / scored tokens), i.e.
                       `evaluate.perplexity` of each row as one window; ppl_delta = perplexity - the
                       reference's, ppl_delta_rel = perplexity / the reference's - 1
        target, target_met: the option's entry in TARGETS (None if none); met when rel_l2_err <= target
    and, to tell the tables' own rounding from what the model makes of it (None without Memory Layers):
        layer_rel_err  = max over Memory Layers of ||layer_q(x) - layer(x)|| / ||layer(x)||, x being the
                         float32 model's input to that layer (on the first batch of rows)
        hash_flip_rate = fraction of all (position, table) bucket choices, over every Memory Layer, that
                         differ from the float32 model's (a flipped sign bit swaps a whole table row)
        table_bytes, head_bytes: `storage_bytes` of the option's model (table_bytes None without tables).
    options: names for `parse_option`; default DEFAULT_OPTIONS (only those without tables for a model
    without Memory Layers). The "fp32" row is the reference itself (zero error). Returns one dict per option.
    """
    if tokens.dim() != 2 or tokens.dtype != torch.int64 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be an int64 tensor (N, T) with T >= 2, got {tokens.dtype} {tuple(tokens.shape)}")
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or head.weight.dtype != torch.float32:
        raise ValueError("precision_report needs a float32 (unquantized) LanguageModel as the reference")
    has_tables = any(isinstance(m, MemoryLayer) for m in model.modules())
    if options is None:
        options = [o for o in DEFAULT_OPTIONS if has_tables or parse_option(o)[0] is None]
    parsed = {option: parse_option(option) for option in options}  # errors before any work
    for tables, _ in parsed.values():
        if tables is not None and not has_tables:
            _no_tables(model, tables)
    was_training = model.training
    model.eval()
    try:
        reference = _run(model, tokens, batch_size, keep_first=True)
    finally:
        model.train(was_training)
    return [_option_row(model, option, precisions, tokens, batch_size, reference, has_tables)
            for option, precisions in parsed.items()]


def _perplexity(logits: list[Tensor], tokens: Tensor, batch_size: int) -> float:
    """exp(summed NLL of tokens[:, 1:] / scored tokens), logits one (b, T, V) tensor per batch of rows."""
    nll = sum(_nll_sum(q, tokens[i:i + batch_size]) for i, q in zip(range(0, tokens.shape[0], batch_size), logits))
    return math.exp(nll / (tokens.shape[0] * (tokens.shape[1] - 1)))


def _option_row(model: nn.Module, option: str, precisions: tuple[str | None, str | None], tokens: Tensor,
                batch_size: int, reference: tuple, has_tables: bool) -> dict:
    """One precision_report row: quantize (unless fp32), run the same rows, compare with `reference`
    (the float32 model's `_run(..., keep_first=True)`)."""
    ref_logits, ref_rows, first = reference
    tables, head = precisions
    if tables is None and head is None:
        qmodel, outputs, rows = model, ref_logits, ref_rows
    else:
        qmodel = quantize_model(model, tables=tables, head=head)
        outputs, rows, _ = _run(qmodel, tokens, batch_size)
    ref_ppl, ppl = _perplexity(ref_logits, tokens, batch_size), _perplexity(outputs, tokens, batch_size)
    errors = _logit_errors(ref_logits, outputs)
    size = storage_bytes(qmodel)
    target = TARGETS.get(option)
    flips = sum(int((rows[n] != ref_rows[n]).sum()) for n in ref_rows)
    return {
        "option": option, "tables": (tables or REFERENCE) if has_tables else None, "head": head or REFERENCE,
        **errors, "perplexity": ppl, "ppl_delta": ppl - ref_ppl, "ppl_delta_rel": ppl / ref_ppl - 1,
        "layer_rel_err": _layer_error(qmodel, first) if has_tables else None,
        "hash_flip_rate": flips / sum(r.numel() for r in ref_rows.values()) if has_tables else None,
        "table_bytes": size["tables"] if has_tables else None, "head_bytes": size["head"],
        "positions": tokens.numel(), "scored_tokens": tokens.shape[0] * (tokens.shape[1] - 1), "target": target,
        "target_met": None if target is None else errors["rel_l2_err"] <= target,
    }
