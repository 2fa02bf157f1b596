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
    """Blocks run by the fused ops: calls[0] counts blocks (decode_block: one, decode_blocks: each of its
    blocks), calls[1] the calls of decode_blocks (LanguageModel's one-op step)."""
    calls = [0, 0]
    one, every = kernels.decode_block, kernels._decode_blocks_op  # decode_blocks and planned steps call it

    def counting_one(*args, **kwargs):
        calls[0] += 1
        return one(*args, **kwargs)

    def counting_every(x, k_caches, *args, **kwargs):
        calls[0] += len(k_caches)
        calls[1] += 1
        return every(x, k_caches, *args, **kwargs)

    monkeypatch.setattr(kernels, "decode_block", counting_one)
    monkeypatch.setattr(kernels, "_decode_blocks_op", counting_every)
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
    assert calls == [4 * cfg.n_layers, 4]  # each of the 4 steps: every block in one decode_blocks call
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
    assert calls == [4 * cfg.n_layers, 4]


def test_hooks_are_never_skipped(built, monkeypatch):
    """A hook on the final norm keeps the step out of decode_blocks (each block still decodes fused, and
    the hook runs); a hook inside a block sends that block to the eager path, where the hook sees it."""
    cfg = _config()
    torch.manual_seed(6)
    model = LanguageModel(cfg).eval()
    _randomise(model, seed=7)
    reference = copy.deepcopy(model).double()
    idx = torch.randint(0, cfg.vocab_size, (2, 7))
    seen = {"norm": 0, "q_proj": 0}
    norm_hook = model.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("norm", seen["norm"] + 1))
    calls = _count_fused(monkeypatch)
    _decode_against(model, reference, idx, prompt=4)
    assert calls == [3 * cfg.n_layers, 0] and seen["norm"] == 4  # the prompt and 3 steps
    norm_hook.remove()
    model.blocks[1].attn.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q_proj", seen["q_proj"] + 1))
    calls = _count_fused(monkeypatch)
    _decode_against(model, reference, idx, prompt=4)
    assert calls == [3 * (cfg.n_layers - 1), 0] and seen["q_proj"] == 4  # block 1 eager (and its hook) each step


def _blocks_args(cfg: ModelConfig, n_blocks: int = 2, batch: int = 2, pos: int = 3):
    """decode_blocks' positional arguments for `n_blocks` random blocks (the final norm included)."""
    per_block = [_op_args(cfg, batch, pos) for _ in range(n_blocks)]
    x, _, _, pos, cos, sin, _, _, *rest = per_block[0]
    params = [p for args in per_block for p in args[6]]
    return (x, [a[1] for a in per_block], [a[2] for a in per_block], pos, cos, sin, params, [],
            1 + 0.1 * torch.randn(cfg.d_model), *rest)


def test_decode_blocks_is_decode_block_in_turn_then_the_norm(built):
    cfg = _config(memory_block_activation="gelu")
    torch.manual_seed(8)
    args = _blocks_args(cfg, n_blocks=3)
    x, kcs, vcs, pos, cos, sin, params, scales, norm_w, *rest = args
    kcs2, vcs2 = [k.clone() for k in kcs], [v.clone() for v in vcs]
    out = torch.ops.memoryformer.decode_blocks(*args)
    h = x
    for i, (kc, vc) in enumerate(zip(kcs2, vcs2)):
        h = torch.ops.memoryformer.decode_block(h, kc, vc, pos, cos, sin, params[14 * i:14 * (i + 1)], scales, *rest)
    rms = h.double().pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(out.double(), norm_w.double() * h.double() / (rms + rest[0]), rtol=1e-6, atol=1e-6)
    for a, b in zip(kcs + vcs, kcs2 + vcs2):
        assert torch.equal(a, b)
    no_norm = torch.ops.memoryformer.decode_blocks(x, kcs, vcs, pos, cos, sin, params, scales, torch.empty(0), *rest)
    assert torch.equal(no_norm, h)


def test_decode_blocks_opcheck_meta_flops_and_errors(built):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = _config()
    args = _blocks_args(cfg)
    op = torch.ops.memoryformer.decode_blocks
    torch.library.opcheck(op, args)
    x, kcs, vcs, pos, cos, sin, params, scales, norm_w, *rest = args
    meta = op(x.to("meta"), [k.to("meta") for k in kcs], [v.to("meta") for v in vcs], pos, cos.to("meta"),
              sin.to("meta"), [p.to("meta") for p in params], scales, norm_w.to("meta"), *rest)
    assert meta.shape == x.shape and meta.device.type == "meta"
    with FlopCounterMode(display=False) as every:
        op(*args)
    one_args = _op_args(cfg)  # outside the mode: its global module hooks keep from_block from reading
    with FlopCounterMode(display=False) as one:
        torch.ops.memoryformer.decode_block(*one_args)
    assert every.get_total_flops() == 2 * one.get_total_flops()
    with pytest.raises(RuntimeError, match="one key and one value cache per block"):
        op(x, kcs, vcs[:1], pos, cos, sin, params, scales, norm_w, *rest)
    with pytest.raises(RuntimeError, match="14 parameter tensors for each of the 2 blocks"):
        op(x, kcs, vcs, pos, cos, sin, params[:-1], scales, norm_w, *rest)
    with pytest.raises(RuntimeError, match="no scales or 5 for each of the 2 blocks"):
        op(x, kcs, vcs, pos, cos, sin, params, [torch.ones(3)], norm_w, *rest)
    with pytest.raises(RuntimeError, match="norm_w must have shape"):
        op(x, kcs, vcs, pos, cos, sin, params, scales, norm_w[:-1], *rest)
    block = DecodeBlock.from_block(MemoryFormerBlock(cfg, 0))
    other = block._replace(settings=block.settings._replace(gelu=not block.settings.gelu))
    with pytest.raises(ValueError, match="the same settings"):
        kernels.decode_blocks(x, kcs, vcs, pos, cos, sin, [block, other])


@pytest.mark.parametrize("change", ["mlp_norm_eps", "layer_norm", "instance_forward", "final_norm_eps"])
def test_blocks_and_norms_the_op_does_not_compute_decode_eagerly(built, change, monkeypatch):
    """Each change makes the fused ops compute something else: the block (or, for the final norm's eps,
    the one-op step) must decline, and decoding must still match the float64 reference."""
    cfg = _config()
    torch.manual_seed(9)
    model = LanguageModel(cfg).eval()
    _randomise(model, seed=10)
    block = model.blocks[0]
    if change == "mlp_norm_eps":
        block.mlp_norm.eps = 1e-3
    elif change == "layer_norm":
        block.attn_norm = torch.nn.LayerNorm(cfg.d_model)
    elif change == "instance_forward":
        plain = block.attn.q_proj.forward
        block.attn.q_proj.forward = lambda x, hashed=None: 2 * plain(x, hashed)
    else:
        model.norm.eps = 1e-3
    reference = copy.deepcopy(model).double()
    if change == "instance_forward":  # the copied lambda still calls the original layer: give it its own
        q_ref = reference.blocks[0].attn.q_proj
        ref_forward = type(q_ref).forward.__get__(q_ref)
        q_ref.forward = lambda x, hashed=None: 2 * ref_forward(x, hashed)
    calls = _count_fused(monkeypatch)
    _decode_against(model, reference, torch.randint(0, cfg.vocab_size, (2, 7)), prompt=4)
    one_by_one = 3 * cfg.n_layers if change == "final_norm_eps" else 3 * (cfg.n_layers - 1)
    assert calls == [one_by_one, 0]


def test_mixed_int8_and_float_blocks_decode_in_one_op(built, monkeypatch):
    """Block 0 with int8 tables, block 1 float32: decode_blocks pads the float block's scales."""
    from memoryformer.inference.quantize import quantize_model

    cfg = _config()
    torch.manual_seed(11)
    model = LanguageModel(cfg).eval()
    _randomise(model, seed=12)
    mixed = quantize_model(model, tables="int8")
    mixed.blocks[1] = copy.deepcopy(model.blocks[1])
    idx = torch.randint(0, cfg.vocab_size, (2, 7))
    calls = _count_fused(monkeypatch)
    with torch.no_grad():
        cache = mixed.new_cache(2, 7)
        mixed(idx[:, :4], cache=cache)
        fused = [mixed(idx[:, t:t + 1], cache=cache)[0] for t in range(4, 7)]
        with kernels.backend("torch"):
            cache = mixed.new_cache(2, 7)
            mixed(idx[:, :4], cache=cache)
            eager = [mixed(idx[:, t:t + 1], cache=cache)[0] for t in range(4, 7)]
    assert calls == [3 * cfg.n_layers, 3]
    torch.testing.assert_close(torch.cat(fused, 1), torch.cat(eager, 1), rtol=1e-4, atol=1e-4)


# ---- a decode plan: the model read once per KV cache (generate() pins one) -------------------------------


def _count_reads(monkeypatch) -> list[int]:
    """Counts DecodeBlock.from_block calls (the per-step reading of the model a plan saves)."""
    reads = [0]
    original = DecodeBlock.from_block.__func__

    def counting(cls, block):
        reads[0] += 1
        return original(cls, block)

    monkeypatch.setattr(DecodeBlock, "from_block", classmethod(counting))
    return reads


def test_generate_reads_the_model_once_and_matches_the_eager_path(built, monkeypatch):
    cfg = _config(memory_block_activation="gelu")
    torch.manual_seed(9)
    model = LanguageModel(cfg).eval()
    _randomise(model, seed=10)
    prompt = torch.randint(0, cfg.vocab_size, (2, 4))
    calls, reads = _count_fused(monkeypatch), _count_reads(monkeypatch)
    fused = model.generate(prompt, 10, temperature=0)
    assert calls == [9 * cfg.n_layers, 9] and reads[0] == cfg.n_layers  # 9 fused steps, one reading
    with kernels.backend("torch"):
        eager = model.generate(prompt, 10, temperature=0)
    assert torch.equal(fused, eager)


def test_planned_steps_equal_unplanned_ones_and_see_in_place_updates(built, monkeypatch):
    cfg = _config()
    torch.manual_seed(11)
    model = LanguageModel(cfg).eval()
    _randomise(model, seed=12)
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    planned, plain = model.new_cache(2, 8), model.new_cache(2, 8)
    planned.decode_plan = model.decode_plan(planned)
    assert isinstance(planned.decode_plan, kernels.DecodePlan)
    calls = _count_fused(monkeypatch)
    with torch.no_grad():
        model(idx[:, :4], cache=planned)
        model(idx[:, :4], cache=plain)
        for t in range(4, 8):
            if t == 6:  # an in-place update of a table, as an optimizer step or load_state_dict makes
                model.blocks[0].mlp.ml2.table.mul_(1.5)
            a, _ = model(idx[:, t:t + 1], cache=planned)
            b, _ = model(idx[:, t:t + 1], cache=plain)
            assert torch.equal(a, b)
    assert calls == [2 * 4 * cfg.n_layers, 8]  # both caches' steps fused
    assert torch.equal(planned.keys[1], plain.keys[1]) and torch.equal(planned.values[0], plain.values[0])


def test_a_plan_declines_where_its_step_must_run_otherwise(built, monkeypatch):
    """Another cache, the torch backend, global hooks (FlopCounterMode): the step runs unplanned; a
    Pythia model has no plan."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = _config()
    torch.manual_seed(13)
    model = LanguageModel(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 6))
    cache, other = model.new_cache(1, 6), model.new_cache(1, 6)
    plan = model.decode_plan(cache)
    blocks = list(model.blocks)
    x = model.embed(idx[:, :1])
    rope = tuple(t[:1] for t in model._rotary_tables(x.device, x.dtype, 1))
    with torch.no_grad():
        assert kernels.try_decode_planned(plan, blocks, model.norm, x, rope, cache) is not None
        assert kernels.try_decode_planned(plan, blocks, model.norm, x, rope, other) is None
        assert kernels.try_decode_planned(plan, blocks[::-1], model.norm, x, rope, cache) is None
        with kernels.backend("torch"):
            assert kernels.try_decode_planned(plan, blocks, model.norm, x, rope, cache) is None
        with FlopCounterMode(display=False):
            assert kernels.try_decode_planned(plan, blocks, model.norm, x, rope, cache) is None
    dense = LanguageModel(ModelConfig(architecture="pythia", vocab_size=97, n_layers=2, d_model=32, n_heads=4,
                                      max_seq_len=40))
    assert dense.decode_plan(dense.new_cache(1, 4)) is None


def test_a_plan_sees_gradients_turned_on_after_it_was_made(built):
    """Parameters frozen when the plan is made, then unfrozen: the step runs eagerly and the tables get
    their gradients (a flag recorded with the plan would have kept the op and lost them)."""
    cfg = _config()
    torch.manual_seed(14)
    model = LanguageModel(cfg).requires_grad_(False)
    idx = torch.randint(0, cfg.vocab_size, (2, 5))
    cache = model.new_cache(2, 5)
    cache.decode_plan = model.decode_plan(cache)
    with torch.no_grad():
        model(idx[:, :4], cache=cache)
    model.blocks.requires_grad_(True)  # the embedding stays frozen, so the step's input needs no grad
    model.hidden_states(idx[:, 4:], cache=cache).sum().backward()
    assert all(b.mlp.ml2.table.grad is not None and b.mlp.ml2.table.grad.abs().sum() > 0 for b in model.blocks)


def test_a_plan_belongs_to_its_model_and_cache(built):
    """A cache whose plan came from another model (a quantized copy) decodes that model's own way; a
    copy of a cache carries no plan; the plan does not keep its cache alive."""
    import gc
    import weakref

    from memoryformer.inference.quantize import quantize_model

    cfg = _config()
    torch.manual_seed(15)
    model = LanguageModel(cfg).eval()
    _randomise(model, seed=16)
    quantized = quantize_model(model, tables="int8")
    idx = torch.randint(0, cfg.vocab_size, (1, 6))
    cache, plain = model.new_cache(1, 6), quantized.new_cache(1, 6)
    cache.decode_plan = model.decode_plan(cache)
    with torch.no_grad():
        got = [quantized(idx[:, :5], cache=cache)[0], quantized(idx[:, 5:], cache=cache)[0]]
        want = [quantized(idx[:, :5], cache=plain)[0], quantized(idx[:, 5:], cache=plain)[0]]
    assert torch.equal(got[1], want[1])
    assert copy.deepcopy(cache).decode_plan is None
    ref = weakref.ref(cache)
    gc.disable()
    try:
        del cache
        assert ref() is None  # no reference cycle through the plan: freed at once
    finally:
        gc.enable()
