"""Fast CPU paths for the Memory Layer, behind torch.library custom ops (`torch.ops.memoryformer.*`).

The math is memoryformer.core.reference's (the pure-PyTorch reference, always available); these kernels fuse
the hash with the weighted gather, split a token's output columns across threads at small N, work
table-row by table-row at large N, and compute the table / weight / input gradients without a
dense `embedding_bag` backward. Nothing compiles at import: the first use builds the C++ source
(`_loader`: torch.utils.cpp_extension, -O3 -march=native, cached in ~/.cache/memoryformer), and if
that fails the layer falls back to the pure path with one warning.

Public API (x: (..., K*tau); table: (K * 2**tau, out_features)):
    memory_layer(x, table, bias=None, *, tau=8, weighting="prob", temperature=1.0) -> (..., out)
    memory_layers(x, tables, biases=None, *, tau, weighting, temperature) -> [(..., out_i)]
        one hash shared by several tables (Q, K, V): hash once, gather each table
    memory_hash(x, tau, weighting="prob", temperature=1.0) -> (rows int64, weights)
    gather_sum(rows, weights, table, bias=None) -> (..., out)
    quantize_tables(table) -> (int8 table, fp32 per-row scales)
    memory_layer_int8(x, qtable, scales, bias=None, *, tau, weighting, temperature) -> float32
    decode_block(x, k_cache, v_cache, pos, cos, sin, DecodeBlock) -> (B, d): one block, one token
    decode_blocks(x, k_caches, v_caches, pos, cos, sin, [DecodeBlock], norm_weight) -> (B, d): every
        block and the final RMSNorm, one token, one op
        DecodePlan: decode_blocks' arguments for a model and a KV cache, read once
        (try_decode_plan) and used at every step (try_decode_planned)
        DecodeBlock(weights: DecodeWeights, scales: DecodeScales, settings: DecodeSettings) names the
        op's slots (decode_inputs.py); DecodeBlock.from_block(MemoryFormerBlock) reads a block
    backend(name) context manager, set_backend(name), get_backend(): "auto" | "kernels" | "torch"
    load() -> bool (build/load now), loaded() -> bool, last_error()
Dtypes: x and tables float32 or bfloat16 (outputs and table gradients in the table's dtype,
accumulation in float32); int8 tables for inference. Other dtypes/devices take the pure path.

The layer dispatches here (memoryformer.core.layer's `_layer` and `_hash`, its one call each): through
`try_memory_layer` and `try_memory_hash` (so a shared hash equals the fused one), which answer None
where the kernels do not apply; the layer then runs memoryformer.core.reference. MemoryFormerBlock
decodes through `try_decode_block` (DecodeBlock.from_block reads the block), and LanguageModel's
one-token step through `try_decode_blocks` (every block and the final norm in one op), or through
`try_decode_planned` when its KV cache carries a DecodePlan (generate() does). This package imports
memoryformer.core.reference only, never the layer or the model.
Switches: MEMORYFORMER_KERNELS=0 (pure path), =force (kernels at every shape), unset/1 ("auto");
`with kernels.backend("torch"): ...` for one block.

Ops (all with fake kernels for meta tensors / torch.compile, and FLOP formulas):
    memory_layer / memory_layer_backward   fused hash + gather for a list of tables (autograd)
    gather_sum / gather_sum_backward       precomputed (rows, weights) (autograd)
    hash / hash_backward                   the hash alone (autograd)
    memory_layer_infer, gather_sum_infer, hash_infer
                                           the same kernels without an autograd formula: used when
                                           no gradient is needed, skipping the Python autograd wrapper
    memory_layer_q8                        int8 tables with per-row scales
    decode_block                           one whole MemoryFormer block for one decoding step (fp32):
                                           norms, shared hash, Q/K/V, rotary, KV-cache write, attention,
                                           Memory Block; `decode_block` below, used by MemoryFormerBlock
                                           through `try_decode_block`
    decode_blocks                          decode_block for every block in turn, then the final
                                           RMSNorm: LanguageModel's step through `try_decode_blocks`
    _set_option(name, value) -> old        tuning knobs (algorithm, block sizes), for benchmarks

Hash: exp(-s|z|) vectorised over the token; at tau = 8 each chunk is one 8-float vector, its product,
sign code and L1 norm butterfly reductions (memory_common.h: hash_chunks8), other tau a loop per chunk.
Algorithms (forward; the summation order is the same in all, so fp32 and bf16 results are bitwise
identical; int8 ones can differ in the last bit, the row scale multiplying the weight on one path and
the row on the other):
    N <= 16 per thread: each token's output columns split across threads, rows read contiguously;
    otherwise token-major, 64 output columns at a time accumulated in registers;
    except bucket-major for N >= 256, a table of 16 MiB or more and at least 2 entries per table row
    (N K / R) for fp32 tables, 1.5 for bf16 and int8 ones (3 and 3 in builds without AVX-512):
    entries sorted by table row (counting sort), each row's column slice loaded once and added into
    an (N, cb) float tile that stays in cache (memory_kernels.cpp: want_csr).
Backward: bucket-major; each table-gradient row is accumulated in registers and written once
(non-temporal stores), the per-entry weight gradient <grad_out[n], table[row]> in the same pass, and
the squared norm of every fp32 table gradient summed as it is written (float64), which the training
loop's gradient clipping reads instead of the gradients (grad_norms.py: GradNormTally).

Performance advice (2-core Zen 3 measurements, see the report in the repository history):
    THP_MEM_ALLOC_ENABLE=1 (PyTorch allocator: 2 MiB pages for large tensors) made the large-N
    passes up to 1.5x faster (they read each table row in short runs, one TLB entry per row with
    4 KiB pages); set it before starting Python. Also use a caching allocator setting such as
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1 (glibc) to avoid page-faulting temporaries.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from memoryformer.core import reference
from memoryformer.kernels import _loader
from memoryformer.kernels._backend import BACKENDS, backend, get_backend, set_backend
from memoryformer.kernels._loader import last_error, load, loaded
from memoryformer.kernels.decode_inputs import (
    DecodeBlock,
    DecodePlan,
    DecodeScales,
    DecodeSettings,
    DecodeWeights,
    any_hooks,
    global_hooks,
)

__all__ = [
    "BACKENDS", "DecodeBlock", "DecodePlan", "DecodeScales", "DecodeSettings", "DecodeWeights", "any_hooks", "backend",
    "decode_block", "decode_blocks",
    "gather_sum", "get_backend", "last_error", "load", "loaded", "memory_hash", "memory_layer", "memory_layer_int8", "memory_layers", "quantize_tables", "set_backend",
    "supported", "try_decode_block", "try_decode_blocks", "try_decode_plan", "try_decode_planned", "try_memory_hash", "try_memory_layer", "try_memory_layers",
]

_DTYPES = (torch.float32, torch.bfloat16)


def supported(x: Tensor, *tables: Tensor) -> bool:
    """True if the kernels handle these tensors (CPU; x and tables float32 or bfloat16)."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES:
        return False
    return all(t.device.type == "cpu" and t.dtype in _DTYPES and t.dim() == 2 for t in tables)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _grad(*tensors: Tensor | None) -> bool:
    """True if autograd must record: grad mode on and some input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _op(name: str, grad: bool):
    """The op with an autograd formula, or its `_infer` twin (no Python autograd wrapper)."""
    return getattr(torch.ops.memoryformer, name if grad else name + "_infer")


def _biases(x: Tensor, biases) -> list[Tensor]:
    """The op's bias list: an empty tensor stands for "no bias"."""
    return [x.new_empty(0, dtype=torch.float32) if b is None else b for b in biases]


def _require() -> None:
    if not load():
        raise RuntimeError(
            f"memoryformer kernels are unavailable ({last_error()!r}); use memoryformer.core.layer instead"
        )


def memory_layers(
    x: Tensor,
    tables: list[Tensor],
    biases: list[Tensor | None] | None = None,
    *,
    tau: int = 8,
    weighting: str = "prob",
    temperature: float = 1.0,
) -> list[Tensor]:
    """Several Memory Layers sharing one hash of x (Q, K, V): hash once, gather every table.

    Args:
        x: (..., K * tau); tables: each (K * 2**tau, out_i); biases: each (out_i,) or None.
    Returns:
        [(..., out_i)] in each table's dtype. Falls back to the pure path when kernels are off or
        unsupported for these tensors.
    """
    reference.check_hash_settings(weighting, temperature)
    reference.num_tables(x.shape[-1], reference.check_tau(tau))
    biases = list(biases) if biases is not None else [None] * len(tables)
    if len(biases) != len(tables):
        raise ValueError(f"got {len(tables)} tables but {len(biases)} biases; pass None for no bias")
    if get_backend() == "torch" or not supported(x, *tables) or not load():
        hashed = reference.reference_memory_hash(x, tau, weighting, temperature)
        return [reference.reference_gather_sum(*hashed, t, b) for t, b in zip(tables, biases)]
    op = _op("memory_layer", _grad(x, *tables, *biases))
    outs = op(_flat(x), list(tables), _biases(x, biases), tau, weighting, float(temperature))
    return [o.reshape(*x.shape[:-1], o.shape[-1]) for o in outs]


def memory_layer(
    x: Tensor,
    table: Tensor,
    bias: Tensor | None = None,
    *,
    tau: int = 8,
    weighting: str = "prob",
    temperature: float = 1.0,
) -> Tensor:
    """The fused hash + gather op for one table: (..., K*tau) -> (..., out). Requires the kernels."""
    _require()
    op = _op("memory_layer", _grad(x, table, bias))
    out = op(_flat(x), [table], _biases(x, [bias]), tau, weighting, float(temperature))[0]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def memory_hash(x: Tensor, tau: int, weighting: str = "prob", temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The hash as one op: rows (..., K) int64 and weights (..., K) in x's dtype (differentiable)."""
    _require()
    w, rows = _op("hash", _grad(x))(_flat(x), tau, weighting, float(temperature))
    lead = x.shape[:-1]
    return rows.reshape(*lead, rows.shape[-1]), w.reshape(*lead, w.shape[-1])


def gather_sum(rows: Tensor, weights: Tensor, table: Tensor, bias: Tensor | None = None) -> Tensor:
    """`out[n] = sum_k weights[n, k] * table[rows[n, k]] + bias` as one op; rows (..., K)."""
    _require()
    k = rows.shape[-1]
    out = _op("gather_sum", _grad(weights, table, bias))(rows.reshape(-1, k), weights.reshape(-1, k), table, bias)
    return out.reshape(*rows.shape[:-1], out.shape[-1])


def quantize_tables(table: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 quantisation for inference.

    Args:
        table: (R, out_features) float.
    Returns:
        qtable (R, out_features) int8 and scales (R,) float32 with table ~= qtable * scales[:, None].
    """
    if table.dim() != 2 or not table.is_floating_point():
        raise ValueError(f"quantize_tables expects a 2-D float table, got {tuple(table.shape)} {table.dtype}")
    t = table.detach().float()
    scales = t.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(t / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def memory_layer_int8(
    x: Tensor,
    qtable: Tensor,
    scales: Tensor,
    bias: Tensor | None = None,
    *,
    tau: int = 8,
    weighting: str = "prob",
    temperature: float = 1.0,
) -> Tensor:
    """Memory Layer over an int8 table with per-row scales (from `quantize_tables`), inference only.

    Returns (..., out_features) float32. Without the kernels, dequantises and uses the pure path.
    """
    if not (get_backend() != "torch" and supported(x) and load()):
        table = qtable.float() * scales.float()[:, None]
        return reference.reference_memory_layer(x.float(), table, None if bias is None else bias.float(), tau, weighting,
                                      temperature)
    out = torch.ops.memoryformer.memory_layer_q8(_flat(x), qtable, scales, bias, tau, weighting,
                                                 float(temperature))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def decode_block(x: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int, cos: Tensor, sin: Tensor,
                 block: DecodeBlock) -> Tensor:
    """One MemoryFormer block (paper Eq. 13) for one new token per sequence, in one op. Inference only.

    Args:
        x: (B, d) block input, float32.
        k_cache, v_cache: (B, H, max_len, Dh) float32; position `pos` is written, [0, pos] attended.
        cos, sin: (rotary_dims,) rotary tables for `pos`.
        block: the block's weights, int8 scales and settings (`DecodeBlock.from_block`).
    Returns:
        (B, d) float32 block output, every sum in float32. Requires the kernels (`try_decode_block`
        returns None instead where they do not apply).
    """
    _require()
    empty = x.new_empty(0)
    params = [empty if p is None else p for p in block.weights]
    scales = [] if all(s is None for s in block.scales) else [empty if s is None else s for s in block.scales]
    st = block.settings
    return torch.ops.memoryformer.decode_block(x, k_cache, v_cache, int(pos), cos, sin, params, scales,
                                               float(st.rms_eps), float(st.ln_eps), st.n_heads, st.tau, st.tau2,
                                               st.weighting, float(st.temperature), st.gelu)


def decode_blocks(x: Tensor, k_caches: list[Tensor], v_caches: list[Tensor], pos: int, cos: Tensor, sin: Tensor,
                  blocks: list[DecodeBlock], norm_weight: Tensor | None = None) -> Tensor:
    """Every block of a model for one new token per sequence, then the final RMSNorm, in one op (one
    dispatch instead of one per block). Inference only.

    Args:
        x: (B, d) input of the first block, float32.
        k_caches, v_caches: one (B, H, max_len, Dh) float32 cache per block; position `pos` is written.
        cos, sin: (rotary_dims,) rotary tables for `pos`.
        blocks: each block's weights, int8 scales and settings (`DecodeBlock.from_block`); every block
            must have the same settings.
        norm_weight: (d,) the final RMSNorm's weight (its eps is the blocks' rms_eps), or None.
    Returns:
        (B, d) float32: the last block's output, normed when norm_weight is given.
    """
    _require()
    if not blocks:
        raise ValueError("decode_blocks needs at least one block")
    st = blocks[0].settings
    if any(b.settings != st for b in blocks[1:]):
        raise ValueError("decode_blocks needs blocks with the same settings; decode them one by one")
    empty = x.new_empty(0)
    params, scales = _flat_inputs(blocks, empty)
    return _decode_blocks_op(x, k_caches, v_caches, pos, cos, sin, params, scales,
                             empty if norm_weight is None else norm_weight, st)


def _flat_inputs(blocks: list[DecodeBlock], empty: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """decode_blocks' params and scales lists: every block's slots in turn, `empty` for None; no scales
    at all when no table is int8."""
    params = [empty if p is None else p for b in blocks for p in b.weights]
    quantized = any(s is not None for b in blocks for s in b.scales)
    return params, [empty if s is None else s for b in blocks for s in b.scales] if quantized else []


def _decode_blocks_op(x: Tensor, k_caches: list[Tensor], v_caches: list[Tensor], pos: int, cos: Tensor, sin: Tensor,
                      params: list[Tensor], scales: list[Tensor], norm_weight: Tensor, st: DecodeSettings) -> Tensor:
    """The one call of `memoryformer::decode_blocks` (decode_blocks and the planned step both come here)."""
    return torch.ops.memoryformer.decode_blocks(x, k_caches, v_caches, int(pos), cos, sin, params, scales, norm_weight,
                                                float(st.rms_eps), float(st.ln_eps), st.n_heads, st.tau, st.tau2,
                                                st.weighting, float(st.temperature), st.gelu)


_TABLE_FIELDS = frozenset(name for name in DecodeWeights._fields if name.endswith("_table"))
_TABLE_DTYPES = (torch.float32, torch.bfloat16, torch.int8)


def _decodable(x: Tensor, caches: tuple[Tensor, Tensor], block: DecodeBlock) -> bool:
    """The op's tensor conditions: CPU, float32 (tables float32 / bfloat16 / int8), no gradient needed."""
    grad = torch.is_grad_enabled()
    if x.dtype != torch.float32 or not x.is_cpu or (grad and x.requires_grad):
        return False
    ok, needs_grad = _decode_tensors(caches, block)
    return ok and not (grad and needs_grad)


def _decode_tensors(caches: tuple[Tensor, Tensor], block: DecodeBlock) -> tuple[bool, bool]:
    """(whether the block's tensors and caches have the op's dtypes and device, whether any of them
    requires grad)."""
    named = [*zip(("k_cache", "v_cache"), caches), *zip(DecodeWeights._fields, block.weights),
             *zip(("scales",) * 5, block.scales)]
    needs_grad = False
    for name, t in named:
        if t is None:
            continue
        ok_dtype = t.dtype in _TABLE_DTYPES if name in _TABLE_FIELDS else t.dtype == torch.float32
        if not ok_dtype or not t.is_cpu:
            return False, needs_grad
        needs_grad = needs_grad or t.requires_grad
    return True, needs_grad


def try_decode_block(block: torch.nn.Module, x: Tensor, rope: tuple[Tensor, Tensor], cache) -> Tensor | None:
    """MemoryFormerBlock's fused step for one new token per sequence: x (B, 1, d) at position
    `cache.length` of a KVCache -> (B, 1, d), or None so that the caller runs the eager block (backend
    "torch", kernels unbuilt, gradients, dtypes or layers the op does not handle)."""
    if get_backend() == "torch" or torch.jit.is_scripting():
        return None
    inputs = DecodeBlock.from_block(block)
    layer = block._modules["attn"].layer
    caches = (cache.keys[layer], cache.values[layer])
    if inputs is None or not _decodable(x, caches, inputs) or not (_loader._state["ok"] or load()):
        return None
    flat = x.reshape(x.shape[0], -1)
    y = decode_block(flat if flat.is_contiguous() else flat.contiguous(), *caches, cache.length, rope[0], rope[1],
                     inputs)
    return y.view_as(x)


def try_decode_blocks(blocks: list[torch.nn.Module], norm: torch.nn.Module, x: Tensor, rope: tuple[Tensor, Tensor],
                      cache) -> Tensor | None:
    """LanguageModel's fused step: x (B, 1, d) through every MemoryFormerBlock of `blocks` and the final
    RMSNorm `norm` at position `cache.length` of a KVCache -> (B, 1, d) normed hidden states, in one op;
    or None (nothing written) so that the caller runs block by block, where any block or the norm has
    hooks or does not decode fused (`try_decode_block`'s conditions), or the blocks' settings differ.
    The caller checks that `blocks` are plain MemoryFormerBlocks and `norm` an RMSNorm."""
    plan = try_decode_plan(blocks, norm, cache)
    return None if plan is None else try_decode_planned(plan, blocks, norm, x, rope, cache)


def try_decode_plan(blocks: list[torch.nn.Module], norm: torch.nn.Module, cache) -> DecodePlan | None:
    """`try_decode_blocks`' reading of the model and its checks, done once: the DecodePlan of `blocks`
    and `norm` for steps into `cache`, or None where the fused op does not apply (then so does not
    try_decode_blocks). Reading six blocks each step cost a quarter or more of mf-tiny's decode step
    (docs/performance.md)."""
    if get_backend() == "torch" or torch.jit.is_scripting() or any_hooks([norm, *blocks]):
        return None
    inputs = []
    for b in blocks:
        block = DecodeBlock.from_block(b)
        if block is None or (inputs and block.settings != inputs[0].settings):
            return None
        inputs.append(block)
    layers = tuple(b._modules["attn"].layer for b in blocks)
    weight = norm._parameters["weight"]
    if weight is None or norm.eps != inputs[0].settings.rms_eps or weight.dtype != torch.float32 or \
            not weight.is_cpu or not weight.is_contiguous():
        return None
    if not all(_decode_tensors((cache.keys[i], cache.values[i]), block)[0] for i, block in zip(layers, inputs)):
        return None
    if not (_loader._state["ok"] or load()):
        return None
    params, scales = _flat_inputs(inputs, weight.new_empty(0))
    return DecodePlan(weakref.ref(cache), (*blocks, norm), layers, params, scales, weight, inputs[0].settings)


def try_decode_planned(plan: DecodePlan, blocks: list[torch.nn.Module], norm: torch.nn.Module, x: Tensor,
                       rope: tuple[Tensor, Tensor], cache) -> Tensor | None:
    """One fused step of `blocks` and `norm` with their plan from `try_decode_plan`: x (B, 1, d) at
    position `cache.length` -> (B, 1, d) normed hidden states; or None (nothing written) where the step
    must run otherwise: a plan of other modules or for another cache, backend "torch", global hooks,
    gradients needed, or x not float32 on CPU."""
    if plan.cache() is not cache or get_backend() == "torch" or torch.jit.is_scripting() or global_hooks():
        return None
    modules = plan.modules
    if len(modules) != len(blocks) + 1 or modules[-1] is not norm or any(a is not b for a, b in zip(modules, blocks)):
        return None
    if x.dtype != torch.float32 or not x.is_cpu:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or plan.norm_weight.requires_grad
                                    or any(p.requires_grad for p in plan.params)):
        return None
    flat = x.reshape(x.shape[0], -1)
    y = _decode_blocks_op(flat if flat.is_contiguous() else flat.contiguous(), [cache.keys[i] for i in plan.layers],
                          [cache.values[i] for i in plan.layers], cache.length, rope[0], rope[1], plan.params,
                          plan.scales, plan.norm_weight, plan.settings)
    return y.view_as(x)


# "auto" threshold table, from interleaved A/B timings on a 2-core Zen 3 (see the kernels report):
#   no gradient (inference, any N):           kernels (fused hash; column split at small N; table-
#                                             row blocking at large N): 1.1-3x faster than eager
#   gradient, N >= 2**tau or out <= 512:      kernels (1.2-2.5x faster fwd+bwd)
#   gradient, N < 2**tau and out > 512:       pure path (the dense table gradient dominates and
#                                             embedding_bag's zero-fill + index_add was faster)
TRAIN_MIN_TOKENS_LOG2 = None  # None: 2**tau tokens (fewer than one entry per table row)
TRAIN_SMALL_OUT = 512


def _use_kernels(n: int, out_features: int, tau: int, grad: bool) -> bool:
    """The "auto" threshold table: is the kernel faster than the pure path at this shape?"""
    if not grad:
        return True
    min_tokens = 1 << (tau if TRAIN_MIN_TOKENS_LOG2 is None else TRAIN_MIN_TOKENS_LOG2)
    return n >= min_tokens or out_features <= TRAIN_SMALL_OUT


def _active(x: Tensor, *tables: Tensor) -> bool:
    """Kernels selected (backend), supported for these tensors, and built."""
    if get_backend() == "torch" or torch.jit.is_scripting() or x.dim() == 0:
        return False
    return supported(x, *tables) and load()


def try_memory_hash(x: Tensor, tau: int, weighting: str, temperature: float) -> tuple[Tensor, Tensor] | None:
    """The layer's hash hook: (rows, weights) from the kernel, or None for the pure path.

    Used so that a shared hash (`MemoryLayer.hash` then `forward(x, hashed)`) gives exactly the
    fused kernel's weights. Inputs are already validated by memoryformer.core.layer.memory_hash.
    """
    if not _active(x):
        return None
    w, rows = _op("hash", _grad(x))(_flat(x), tau, weighting, float(temperature))
    lead = x.shape[:-1]
    return rows.reshape(*lead, rows.shape[-1]), w.reshape(*lead, w.shape[-1])


def try_memory_layers(x: Tensor, tables: list[Tensor], biases: list[Tensor | None], tau: int, weighting: str,
                      temperature: float) -> list[Tensor] | None:
    """The shared-hash hook (`core.layer.shared_hash_forward`): every table's output from one fused op,
    or None for the caller's path (backend "torch", unsupported tensors, unbuilt kernels, or a shape
    where the "auto" table prefers the pure path). Inputs are already validated."""
    if get_backend() == "torch" or torch.jit.is_scripting() or not supported(x, *tables):
        return None
    if any(b is not None and (not b.is_cpu or b.dtype not in _DTYPES) for b in biases):
        return None
    grad = _grad(x, *tables, *biases)
    n = x.numel() // x.shape[-1]
    if get_backend() == "auto" and not all(_use_kernels(n, t.shape[1], tau, grad) for t in tables):
        return None
    if not _loader._state["ok"] and not load():
        return None
    outs = _op("memory_layer", grad)(_flat(x), list(tables), _biases(x, biases), tau, weighting, float(temperature))
    return [o.reshape(*x.shape[:-1], o.shape[-1]) for o in outs]


def try_memory_layer(
    x: Tensor,
    table: Tensor,
    bias: Tensor | None,
    tau: int,
    weighting: str,
    temperature: float,
    hashed: tuple[Tensor, Tensor] | None = None,
) -> Tensor | None:
    """The layer's hook: the kernel result, or None to take the pure-PyTorch path.

    Inputs are already validated by memoryformer.core.layer.memory_layer.
    """
    mode = get_backend()
    if mode == "torch" or x.dtype not in _DTYPES or table.dtype not in _DTYPES or not (x.is_cpu and table.is_cpu):
        return None
    if bias is not None and (not bias.is_cpu or bias.dtype not in _DTYPES):
        return None
    if torch.jit.is_scripting():
        return None
    if torch.is_grad_enabled():
        grad = ((hashed[1] if hashed is not None else x).requires_grad or table.requires_grad
                or (bias is not None and bias.requires_grad))
    else:
        grad = False
    two_d = x.dim() == 2
    flat = x if two_d else x.reshape(-1, x.shape[-1])
    if mode == "auto" and not _use_kernels(flat.shape[0], table.shape[1], tau, grad):
        return None
    if not _loader._state["ok"] and not load():
        return None
    ops = torch.ops.memoryformer
    if hashed is None:
        op = ops.memory_layer if grad else ops.memory_layer_infer
        biases = [bias] if bias is not None else [x.new_empty(0, dtype=torch.float32)]
        out = op(flat, [table], biases, tau, weighting, float(temperature))[0]
    else:
        rows, weights = hashed
        k = rows.shape[-1]
        op = ops.gather_sum if grad else ops.gather_sum_infer
        out = op(rows.reshape(-1, k), weights.reshape(-1, k), table, bias)
    return out if two_d else out.reshape(*x.shape[:-1], out.shape[-1])
