"""The fused decode block (memoryformer::decode_block) against the eager block in float64.

MemoryFormerBlock takes the fused op for one new token per sequence when no gradient is needed and
everything is float32 on CPU; otherwise (and with the kernels off) the eager block runs. The eager
block in float64 with the pure-PyTorch backend is the reference.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from memoryformer import LanguageModel, MemoryLayer, ModelConfig, kernels
from memoryformer.core.model import MemoryFormerBlock
from memoryformer.kernels import DecodeBlock, DecodeScales, DecodeWeights


def _config(**overrides) -> ModelConfig:
    base = dict(vocab_size=97, n_layers=2, d_model=32, n_heads=4, max_seq_len=40, tau=4, expanding_bits=1)
    base.update(overrides)
    return ModelConfig(architecture="memoryformer", **base)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial norms and biases, so every parameter of the block matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))


def _count_fused(monkeypatch) -> list[int]:
    calls = [0]
    real = kernels.decode_block

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "decode_block", counting)
    return calls


def _decode_against(model: LanguageModel, reference: LanguageModel, idx: torch.Tensor, prompt: int):
    """Prefill idx[:, :prompt], then decode the rest one token at a time with both models (the reference
    on the pure-PyTorch backend), comparing logits at every step; returns both KV caches."""
    cache, ref_cache = model.new_cache(idx.shape[0], idx.shape[1]), reference.new_cache(idx.shape[0], idx.shape[1])
    with torch.no_grad():
        model(idx[:, :prompt], cache=cache)
        with kernels.backend("torch"):
            reference(idx[:, :prompt], cache=ref_cache)
        for t in range(prompt, idx.shape[1]):
            logits, _ = model(idx[:, t:t + 1], cache=cache)
            with kernels.backend("torch"):
                ref_logits, _ = reference(idx[:, t:t + 1], cache=ref_cache)
            torch.testing.assert_close(logits.double(), ref_logits, rtol=1e-4, atol=1e-4)
    return cache, ref_cache


VARIANTS = [
    dict(),
    dict(memory_block_activation="gelu", weighting="l1"),
    dict(temperature=0.6, memory_bias=False, expanding_bits=0, rotary_pct=1.0),
    dict(n_heads=2, tau=8, d_model=48, expanding_bits=2, rotary_pct=0.5),
    dict(d_model=64, n_heads=4),  # head_dim 16 and 64: whole vectors, the register-blocked attention
    dict(d_model=128, n_heads=2, memory_block_activation="gelu"),
]


@pytest.mark.parametrize("overrides", VARIANTS)
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_block_matches_float64_eager_block(built, overrides, batch, monkeypatch):
    cfg = _config(**overrides)
    torch.manual_seed(1)
    model = LanguageModel(cfg).eval()
    _randomise(model)
    ref_model = copy.deepcopy(model).double()
    idx = torch.randint(0, cfg.vocab_size, (batch, 9))
    calls = _count_fused(monkeypatch)
    cache, ref_cache = _decode_against(model, ref_model, idx, prompt=5)
    assert calls[0] == 4 * cfg.n_layers
    for layer in range(cfg.n_layers):
        torch.testing.assert_close(cache.keys[layer][:, :, :9].double(), ref_cache.keys[layer][:, :, :9],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache.values[layer][:, :, :9].double(), ref_cache.values[layer][:, :, :9],
                                   rtol=1e-4, atol=1e-5)


def test_fused_decoding_equals_full_forward_and_generate(built, monkeypatch):
    cfg = _config(memory_block_activation="gelu")
    torch.manual_seed(2)
    model = LanguageModel(cfg).eval()
    _randomise(model, seed=3)
    idx = torch.randint(0, cfg.vocab_size, (2, 14))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(2, 14)
        steps = [model(idx[:, :1], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(1, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    calls = _count_fused(monkeypatch)
    prompt = idx[:, :4]
    fused = model.generate(prompt, 10, temperature=0)
    # the 4-token prompt runs the eager blocks; each of the 9 one-token steps after it (the 10th token
    # needs no forward) runs every block fused
    assert calls[0] == 9 * cfg.n_layers
    with kernels.backend("torch"):
        eager = model.generate(prompt, 10, temperature=0)
    assert torch.equal(fused, eager)


def test_eager_block_runs_when_gradients_are_needed(built, monkeypatch):
    cfg = _config()
    model = LanguageModel(cfg)
    calls = _count_fused(monkeypatch)
    cache = model.new_cache(1, 4)
    idx = torch.zeros(1, 1, dtype=torch.long)
    logits, _ = model(idx, cache=cache)  # grad mode, parameters require grad: autograd must see it
    logits.sum().backward()
    assert calls[0] == 0 and model.blocks[0].attn.q_proj.table.grad is not None
    with torch.no_grad():
        model(idx, cache=cache)
    assert calls[0] == cfg.n_layers
    model.double()  # float64 is not a kernel dtype
    with torch.no_grad():
        model(idx, cache=model.new_cache(1, 4))
    assert calls[0] == cfg.n_layers


def test_full_cache_raises_the_eager_error(built):
    model = LanguageModel(_config()).eval()
    cache = model.new_cache(1, 2)
    with torch.no_grad():
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="KV cache holds 2 positions"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def _op_args(cfg: ModelConfig, batch: int = 2, pos: int = 3):
    """The op's positional arguments for a random block, its tensors in DecodeWeights' slot order."""
    block = MemoryFormerBlock(cfg, 0)
    _randomise(block)
    inputs = DecodeBlock.from_block(block)
    params = [p.detach() for p in inputs.weights]
    shape = (batch, cfg.n_heads, 8, cfg.head_dim)
    rot = cfg.rotary_dims
    st = inputs.settings
    args = (torch.randn(batch, cfg.d_model), torch.randn(shape), torch.randn(shape), pos, torch.rand(rot),
            torch.rand(rot), params, [], st.rms_eps, st.ln_eps, st.n_heads, st.tau, st.tau2, st.weighting,
            st.temperature, st.gelu)
    return args


def _cpp_enum(name: str) -> list[str]:
    """The members of a C++ enum of decode_kernels.cpp, lower-cased, without the closing count."""
    source = (Path(kernels.__file__).parent / "decode_kernels.cpp").read_text()
    body = re.search(r"enum " + name + r" : int \{(.*?)\};", source, re.S).group(1)
    members = re.findall(r"\b[A-Z][A-Z0-9_]*\b", re.sub(r"//[^\n]*", "", body))
    return [m.lower() for m in members if not m.startswith("NUM_")]


def test_slot_names_match_the_cpp_enums():
    assert _cpp_enum("DecodeSlot") == list(DecodeWeights._fields)
    assert _cpp_enum("ScaleSlot") == ["scale_" + f for f in DecodeScales._fields]


def test_block_reads_into_named_slots():
    cfg = _config(memory_block_activation="gelu", weighting="l1")
    block = MemoryFormerBlock(cfg, 0)
    inputs = DecodeBlock.from_block(block)
    assert inputs.weights.q_table is block.attn.q_proj.table and inputs.weights.ml2_bias is block.mlp.ml2.bias
    assert inputs.weights.ln_b is block.mlp.norm.bias and inputs.weights.attn_norm_w is block.attn_norm.weight
    assert inputs.scales == DecodeScales()
    assert inputs.settings == (cfg.rms_norm_eps, cfg.norm_eps, cfg.n_heads, cfg.tau, cfg.tau + cfg.expanding_bits,
                               "l1", 1.0, True)


class _ScaledLayer(MemoryLayer):
    def forward(self, x, hashed=None):
        return 2 * super().forward(x, hashed)


@pytest.mark.parametrize("change", ["subclass", "linear", "tanh", "no_affine", "temperature", "float64"])
def test_blocks_the_op_does_not_compute_are_not_read(change):
    cfg = _config()
    block = MemoryFormerBlock(cfg, 0)
    if change == "subclass":
        block.attn.v_proj = _ScaledLayer(cfg.d_model, cfg.d_model, tau=cfg.tau)
    elif change == "linear":
        block.attn.k_proj = torch.nn.Linear(cfg.d_model, cfg.d_model)
    elif change == "tanh":
        block.mlp.act = torch.nn.Tanh()
    elif change == "no_affine":
        block.mlp.norm = torch.nn.LayerNorm(cfg.memory_hidden, elementwise_affine=False)
    elif change == "temperature":
        block.mlp.ml2.temperature = 0.5
    else:
        block.mlp.ml1.double()
    assert DecodeBlock.from_block(block) is None


def test_opcheck_and_meta(built):
    cfg = _config()
    torch.library.opcheck(torch.ops.memoryformer.decode_block, _op_args(cfg))
    x, kc, vc, pos, cos, sin, params, scales, *rest = _op_args(cfg)
    meta = [t.to("meta") for t in (x, kc, vc, cos, sin)]
    out = torch.ops.memoryformer.decode_block(meta[0], meta[1], meta[2], pos, meta[3], meta[4],
                                              [p.to("meta") for p in params], scales, *rest)
    assert out.shape == x.shape and out.device.type == "meta"


def test_flop_count(built):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = _config()
    args = _op_args(cfg, batch=2, pos=3)
    with FlopCounterMode(display=False) as counter:
        torch.ops.memoryformer.decode_block(*args)
    k1, hidden = cfg.d_model // cfg.tau, cfg.memory_hidden
    k2 = hidden // (cfg.tau + cfg.expanding_bits)
    expected = 2 * 2 * (k1 * 3 * cfg.d_model + k1 * hidden + k2 * cfg.d_model + 2 * cfg.d_model * 4)
    assert counter.get_total_flops() == expected


def test_bad_arguments_raise_clear_errors(built):
    cfg = _config()
    x, kc, vc, pos, cos, sin, params, scales, *rest = _op_args(cfg)
    op = torch.ops.memoryformer.decode_block
    with pytest.raises(RuntimeError, match="14 parameter tensors"):
        op(x, kc, vc, pos, cos, sin, params[:-1], scales, *rest)
    with pytest.raises(RuntimeError, match="outside the cache"):
        op(x, kc, vc, 8, cos, sin, params, scales, *rest)
    with pytest.raises(RuntimeError, match="k_cache must have shape"):
        op(x, kc[:1], vc, pos, cos, sin, params, scales, *rest)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        op(x.double(), kc, vc, pos, cos, sin, params, scales, *rest)
    bad = list(params)
    ml2 = DecodeWeights._fields.index("ml2_table")
    bad[ml2] = bad[ml2][:, :-1].contiguous()
    with pytest.raises(RuntimeError, match="ml2_table must have shape"):
        op(x, kc, vc, pos, cos, sin, bad, scales, *rest)
    with pytest.raises(RuntimeError, match="no scales or 5"):
        op(x, kc, vc, pos, cos, sin, params, [torch.ones(3)], *rest)
    int8 = list(params)
    q = DecodeWeights._fields.index("q_table")
    int8[q] = torch.zeros(params[q].shape, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="needs per-row scales"):
        op(x, kc, vc, pos, cos, sin, int8, scales, *rest)
    empty = torch.empty(0)
    with pytest.raises(RuntimeError, match="scales are for int8 tables only"):
        op(x, kc, vc, pos, cos, sin, params, [torch.ones(params[q].shape[0])] + [empty] * 4, *rest)


@pytest.mark.parametrize("tables", ["bf16", "int8"])
def test_quantized_tables_decode_fused_like_their_float64_dequantised_model(built, tables, monkeypatch):
    """A quantize_model copy decodes through the fused op; its reference is the same model with the
    stored tables dequantised to float64 (scales folded in), run by the eager float64 block."""
    from memoryformer.inference.quantize import BF16MemoryLayer, Int8MemoryLayer, quantize_model

    cfg = _config(memory_block_activation="gelu", expanding_bits=2)
    torch.manual_seed(4)
    model = LanguageModel(cfg).eval()
    _randomise(model, seed=5)
    qmodel = quantize_model(model, tables=tables)
    reference = copy.deepcopy(model).double()
    ref_layers = dict(reference.named_modules())
    quantized = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, (BF16MemoryLayer, Int8MemoryLayer))]
    assert len(quantized) == 5 * cfg.n_layers
    for name, qlayer in quantized:
        layer = ref_layers[name]
        scales = getattr(qlayer, "scales", None)
        table = qlayer.table.double() * (1.0 if scales is None else scales.double()[:, None])
        with torch.no_grad():
            layer.table.copy_(table)
    calls = _count_fused(monkeypatch)
    _decode_against(qmodel, reference, torch.randint(0, cfg.vocab_size, (2, 8)), prompt=4)
    assert calls[0] == 4 * cfg.n_layers
