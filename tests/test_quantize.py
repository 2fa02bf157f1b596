"""Lower-precision inference (memoryformer.inference.quantize) against float64 references: int8 / bf16 heads and
Memory Layer tables, whole quantized models, option errors and precision_report."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memoryformer import LanguageModel, MemoryLayer, ModelConfig, kernels, memory_layer
from memoryformer.evaluation.evaluate import perplexity
from memoryformer.inference import quantize
from memoryformer.inference.quantize import (
    DEFAULT_OPTIONS,
    TARGETS,
    BF16Linear,
    BF16MemoryLayer,
    Int8Linear,
    Int8MemoryLayer,
    _int8pack_works,
    gather_sum_dequant,
    int8_linear,
    parse_option,
    precision_report,
    quantize_model,
    storage_bytes,
)

BACKENDS = ["torch", "auto"]  # "auto": the fused kernels where they build, else the same pure path


def dequantised(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The int8 rows times their scales, in float64."""
    return q.double() * scales.double()[:, None]


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def make_layer(in_features: int, out_features: int, tau: int, seed: int = 0) -> MemoryLayer:
    torch.manual_seed(seed)
    layer = MemoryLayer(in_features, out_features, tau=tau)
    with torch.no_grad():
        layer.bias.normal_(0, 0.02)
    return layer


def tiny(preset: str, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig.from_preset(preset)).eval()


# ---- the head -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_int8_linear_matches_float64(fused):
    if fused and not _int8pack_works(torch.device("cpu"), torch.float32):
        pytest.skip("torch._weight_int8pack_mm is unavailable here")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 48, generator=g)
    lin = nn.Linear(48, 40, bias=True)
    q, s = kernels.quantize_tables(lin.weight)
    bias = torch.randn(40, generator=g)
    out = int8_linear(x, q, s, bias, fused=fused)
    want = x.double() @ dequantised(q, s).T + bias.double()
    assert out.shape == (2, 5, 40) and out.dtype == torch.float32
    assert rel_max(out, want) < 1e-5


def test_int8_linear_empty_input():
    q, s = kernels.quantize_tables(torch.randn(7, 16))
    assert int8_linear(torch.randn(0, 16), q, s).shape == (0, 7)


def test_int8_head_within_rounding_bound_of_fp32():
    """Each weight is off by at most half its row's scale, so |y_q - y| <= 0.5 s_o ||x||_1 (per output o)."""
    torch.manual_seed(1)
    lin = nn.Linear(64, 100, bias=False)
    head = Int8Linear(lin)
    x = torch.randn(6, 64)
    with torch.no_grad():
        exact = x.double() @ lin.weight.double().T
    out = head(x)
    assert out.dtype == torch.float32
    assert rel_max(out, x.double() @ dequantised(head.qweight, head.scales).T) < 1e-5
    assert torch.equal(head.weight, head.qweight.float() * head.scales[:, None])
    bound = 0.5 * x.double().abs().sum(-1, keepdim=True) * head.scales.double()[None, :]
    assert ((out.double() - exact).abs() <= bound * (1 + 1e-4) + 1e-6).all()
    assert head.qweight.dtype == torch.int8 and head.weight_bytes() == 100 * 64 + 100 * 4


def test_bf16_head_matches_float64():
    torch.manual_seed(2)
    lin = nn.Linear(64, 100, bias=False)
    head = BF16Linear(lin)
    x = torch.randn(6, 64)
    out = head(x)
    want = x.bfloat16().double() @ lin.weight.detach().bfloat16().double().T
    assert out.dtype == torch.float32
    # float32 accumulation, output rounded to bf16 once: within 2^-8 of each value (+ a little absolute)
    assert ((out.double() - want).abs() <= 2.0**-8 * want.abs() + 1e-5 * want.abs().max()).all()
    assert head.weight_bytes() == 100 * 64 * 2


# ---- Memory Layer tables --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared_hash", [False, True])
def test_int8_layer_matches_float64_dequantised(backend, shared_hash):
    layer = make_layer(24, 20, tau=4)
    qlayer = Int8MemoryLayer(layer)
    x = torch.randn(3, 7, 24)
    with kernels.backend(backend):
        out = qlayer(x, qlayer.hash(x) if shared_hash else None)
    # layer.py's math over the dequantised table, in float64
    want = memory_layer(x.double(), dequantised(qlayer.table, qlayer.scales), layer.bias.detach().double(), tau=4)
    assert out.shape == (3, 7, 20) and out.dtype == torch.float32
    assert rel_max(out, want) < 1e-5


def test_int8_layer_within_rounding_bound_of_fp32():
    """|y_q - y| <= 0.5 * sum_k w_k * scales[row_k] per output, rows and weights the layer's hash."""
    layer = make_layer(32, 16, tau=8, seed=3)
    qlayer = Int8MemoryLayer(layer)
    x = torch.randn(50, 32)
    with torch.no_grad():
        exact = memory_layer(x.double(), layer.table.double(), layer.bias.double(), tau=8)
        rows, weights = layer.hash(x.double())
    bound = 0.5 * (weights * qlayer.scales.double()[rows]).sum(-1, keepdim=True)
    assert ((qlayer(x).double() - exact).abs() <= bound * (1 + 1e-4) + 1e-6).all()
    assert qlayer.table_bytes() == layer.table.numel() + layer.table.shape[0] * 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared_hash", [False, True])
def test_bf16_layer_matches_float64(backend, shared_hash):
    layer = make_layer(24, 20, tau=4, seed=4)
    qlayer = BF16MemoryLayer(layer)
    x = torch.randn(3, 7, 24)
    with kernels.backend(backend):
        out = qlayer(x, qlayer.hash(x) if shared_hash else None)
    table = layer.table.detach()
    want = memory_layer(x.double(), table.bfloat16().double(), layer.bias.detach().double(), tau=4)
    assert out.dtype == torch.float32 and qlayer.table.dtype == torch.bfloat16
    assert rel_max(out, want) < 1e-5  # bf16 storage only: the sum is float32
    exact = memory_layer(x.double(), table.double(), layer.bias.detach().double(), tau=4)
    assert rel_max(out, exact) < 2.0**-7  # each table entry within 2^-9 of its float32 value
    assert qlayer.table_bytes() == table.numel() * 2


def test_gather_sum_dequant_matches_float64_loop():
    g = torch.Generator().manual_seed(5)
    table = torch.randint(-127, 128, (32, 6), generator=g, dtype=torch.int8)
    scales = torch.rand(32, generator=g)
    rows = torch.randint(0, 32, (4, 3, 2), generator=g)
    weights = torch.rand(4, 3, 2, generator=g)
    bias = torch.randn(6, generator=g)
    out = gather_sum_dequant(rows, weights, table, scales, bias)
    want = torch.zeros(4, 3, 6, dtype=torch.float64)
    for i in range(4):
        for j in range(3):
            for k in range(2):
                r = rows[i, j, k]
                want[i, j] += weights[i, j, k].double() * scales[r].double() * table[r].double()
    assert rel_max(out, want + bias.double()) < 1e-6


def test_quantized_modules_are_inference_only():
    layer = Int8MemoryLayer(make_layer(8, 4, tau=4))
    head = BF16Linear(nn.Linear(8, 4))
    x = torch.randn(2, 8, requires_grad=True)
    for module in (layer, head):
        with pytest.raises(RuntimeError, match="inference-only"):
            module(x)
        with torch.no_grad():
            assert module(x).shape == (2, 4)
    assert "table=int8" in repr(layer) and "weight=bf16" in repr(head)


# ---- whole models ---------------------------------------------------------------------------------------


def test_quantize_model_leaves_the_original_untouched():
    model = tiny("mf-test")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    q = quantize_model(model, tables="int8", head="int8")
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(q.blocks[0].attn.q_proj, Int8MemoryLayer) and isinstance(q.head, Int8Linear)
    assert not any(isinstance(m, MemoryLayer) for m in q.modules())
    assert not any(p.requires_grad for p in q.parameters()) and not q.training


def dequantised_model(model: LanguageModel, tables: str) -> LanguageModel:
    """A float32 copy whose tables hold exactly the quantized values (int8 * scale or bf16)."""
    out = quantize_model(model)
    for m in out.modules():
        if isinstance(m, MemoryLayer):
            with torch.no_grad():
                if tables == "int8":
                    m.table.copy_(dequantised(*kernels.quantize_tables(m.table)).float())
                else:
                    m.table.copy_(m.table.bfloat16().float())
    return out


@pytest.mark.parametrize("tables", ["bf16", "int8"])
def test_quantized_tables_model_equals_float_model_on_the_quantized_values(tables):
    """The quantized model is the float32 model run on its quantized table values (to float32 rounding)."""
    model = tiny("mf-test")
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    q = quantize_model(model, tables=tables)
    with torch.no_grad():
        got, _ = q(idx)  # no_grad not required (frozen copy), used here for speed
        want, _ = dequantised_model(model, tables)(idx)
    assert rel_max(got, want) < 1e-4


def test_quantized_model_runs_without_no_grad_and_generates():
    model = tiny("mf-test")
    q = quantize_model(model, tables="int8", head="int8")
    logits, loss = q(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, 256) and not logits.requires_grad and math.isfinite(float(loss))
    out = q.generate(torch.zeros(1, 4, dtype=torch.long), 5, temperature=0)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("preset", ["mf-test", "pythia-test"])
@pytest.mark.parametrize("head", ["int8", "bf16"])
def test_quantized_head_logits_close_to_fp32(preset, head):
    model = tiny(preset)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    q = quantize_model(model, head=head)
    with torch.no_grad():
        hidden = model.hidden_states(idx)
        want = hidden.double() @ model.head.weight.double().T
        got, _ = q(idx)
    if head == "int8":  # per logit: |error| <= 0.5 * scale_o * ||h||_1
        bound = 0.5 * hidden.double().abs().sum(-1, keepdim=True) * q.head.scales.double()
        assert ((got.double() - want).abs() <= bound * (1 + 1e-4) + 1e-6).all()
    else:  # bf16 inputs and weights: about 3 * 2^-9 relative per product, sums of 64
        assert rel_max(got, want) < 2e-2


def test_tables_error_for_dense_model_and_bad_options():
    dense = tiny("pythia-test")
    with pytest.raises(ValueError, match="no(ne)?.*head="):
        quantize_model(dense, tables="int8")
    assert isinstance(quantize_model(dense, head="int8").head, Int8Linear)
    model = tiny("mf-test")
    for kwargs in ({"tables": "fp16"}, {"head": "int4"}, {"tables": "INT8"}):
        with pytest.raises(ValueError, match="must be None or one of"):
            quantize_model(model, **kwargs)
    for option in ("int4-head", "int8-tabels", "int8", "int8-tables+bf16-tables", ""):
        with pytest.raises(ValueError, match="unknown precision option"):
            parse_option(option)
    assert parse_option("fp32") == (None, None)
    assert parse_option("bf16-tables+int8-head") == ("bf16", "int8")
    tokens = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="no(ne)?.*head="):
        precision_report(dense, tokens, options=["int8-tables"])
    with pytest.raises(ValueError, match="unknown precision option"):
        precision_report(model, tokens, options=["fp8-tables"])
    with pytest.raises(ValueError, match="int64"):
        precision_report(model, tokens.int())


def test_decode_table_is_what_the_fused_decode_reads():
    layer = MemoryLayer(16, 8, tau=4)
    assert layer.decode_table() == (layer.table, layer.bias, None)
    assert MemoryLayer(16, 8, tau=4, bias=False).decode_table()[1] is None
    assert MemoryLayer(16, 8, tau=4, dtype=torch.float64).decode_table() is None  # the op is float32
    bf16, int8 = BF16MemoryLayer(layer), Int8MemoryLayer(layer)
    table, bias, scales = bf16.decode_table()
    assert table is bf16.table and table.dtype == torch.bfloat16 and bias is bf16.bias and scales is None
    table, bias, scales = int8.decode_table()
    assert table is int8.table and table.dtype == torch.int8 and scales is int8.scales and scales.shape == (64,)
    torch.testing.assert_close(table.float() * scales[:, None], layer.table.detach(), rtol=0,
                               atol=float(scales.max()) / 2)


# ---- precision_report -----------------------------------------------------------------------------------


def test_precision_report_fields_and_reference_row():
    model = tiny("mf-test")
    tokens = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(2))
    rows = precision_report(model, tokens, batch_size=2)
    assert [r["option"] for r in rows] == list(DEFAULT_OPTIONS)
    ref = rows[0]
    assert ref["option"] == "fp32"
    for key in ("rel_l2_err", "mean_rel_err", "max_rel_err", "ppl_delta", "ppl_delta_rel", "hash_flip_rate",
                "layer_rel_err"):
        assert ref[key] == 0.0, key
    assert ref["top1_agree"] == 1.0 and ref["positions"] == 60 and ref["scored_tokens"] == 57
    # the perplexity is evaluate.perplexity's with each row as one window
    nll = sum(perplexity(lambda b: model(b)[0], row.tolist(), max_length=19, progress=False)["nll"]
              for row in tokens)
    assert ref["perplexity"] == pytest.approx(math.exp(nll / 57), rel=1e-6)  # float32 batch sums
    sizes = storage_bytes(model)
    assert ref["table_bytes"] == sizes["tables"] and ref["head_bytes"] == 256 * 64 * 4
    by = {r["option"]: r for r in rows}
    assert by["bf16-tables"]["table_bytes"] * 2 == sizes["tables"]
    assert by["int8-head"]["head_bytes"] == 256 * 64 + 256 * 4
    for option in DEFAULT_OPTIONS[1:]:
        r = by[option]
        assert 0 <= r["rel_l2_err"] and 0 < r["max_rel_err"] < 1 and r["mean_rel_err"] <= r["max_rel_err"]
        assert r["perplexity"] == pytest.approx(ref["perplexity"] * (1 + r["ppl_delta_rel"]))
    assert by["bf16-tables"]["target"] == 1e-2 and by["int8-tables"]["target"] == 2e-2
    for option in ("bf16-tables", "int8-tables"):
        assert by[option]["target_met"] is (by[option]["rel_l2_err"] <= by[option]["target"])
    assert all(by[o]["target"] is None and by[o]["target_met"] is None for o in DEFAULT_OPTIONS if o not in TARGETS)
    assert by["int8-head"]["target"] is None and by["int8-head"]["hash_flip_rate"] == 0.0
    # tables rounded in bf16 / int8: the layers themselves are close, whatever the hash flips do later
    assert 0 < by["bf16-tables"]["layer_rel_err"] < 1e-2 and 0 < by["int8-tables"]["layer_rel_err"] < 3e-2


def test_precision_report_target_met_follows_the_target(monkeypatch):
    """target_met is rel_l2_err <= TARGETS[option]: met under a loose target, missed under a tight one."""
    model = tiny("mf-test")
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(quantize, "TARGETS", {"bf16-tables": 1.0, "int8-tables": 1e-12})
    by = {r["option"]: r for r in precision_report(model, tokens, options=["bf16-tables", "int8-tables"])}
    assert 1e-12 < by["int8-tables"]["rel_l2_err"] and by["bf16-tables"]["rel_l2_err"] <= 1.0
    assert by["bf16-tables"]["target"] == 1.0 and by["bf16-tables"]["target_met"] is True
    assert by["int8-tables"]["target"] == 1e-12 and by["int8-tables"]["target_met"] is False


def test_precision_report_dense_model_defaults_to_head_options():
    dense = tiny("pythia-test")
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    rows = precision_report(dense, tokens)
    assert [r["option"] for r in rows] == ["fp32", "bf16-head", "int8-head"]
    assert all(r["table_bytes"] is None and r["hash_flip_rate"] is None for r in rows)
    assert rows[2]["rel_l2_err"] > 0


# ---- dense block weights (blocks=) ----------------------------------------------------------------------

BLOCK_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
# max |logit error| / max |float64 logit| of pythia-test (2 blocks, d 64) with quantized block weights and
# head: a few rounding units deep (bf16: 2^-8 = 3.9e-3 per weight and input; int8: up to 1/254 of a row's
# largest weight); measured 5e-3-7e-3 (bf16) and 1.1e-2-1.5e-2 (int8) over seeds
BLOCK_ERROR_LIMITS = {"bf16": 2e-2, "int8": 4e-2}


def float64_twin(model: LanguageModel, dequantise_blocks: bool = False) -> LanguageModel:
    """A float64 copy of a float32 model; with dequantise_blocks, every block nn.Linear weight replaced by
    its int8 round trip (qweight * scales), the values an Int8Linear computes with."""
    out = quantize_model(model).double()
    if dequantise_blocks:
        for m in out.blocks.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(dequantised(*kernels.quantize_tables(m.weight.float())))
    return out


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("head", [False, True])
def test_quantized_blocks_logits_close_to_float64(precision, head):
    model = tiny("pythia-test", seed=5)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    q = quantize_model(model, blocks=precision, head=precision if head else None)
    cls = {"bf16": BF16Linear, "int8": Int8Linear}[precision]
    for block, original in zip(q.blocks, model.blocks, strict=True):
        for name in BLOCK_LINEARS:
            module, source = block.get_submodule(name), original.get_submodule(name)
            assert isinstance(module, cls) and torch.equal(module.bias, source.bias)
            if precision == "bf16":
                assert torch.equal(module.qweight, source.weight.detach().bfloat16())
    assert isinstance(q.head, cls) if head else type(q.head) is nn.Linear
    with torch.no_grad():
        want, _ = float64_twin(model)(idx)
        got, _ = q(idx)
    assert got.dtype == torch.float32
    assert 0 < rel_max(got, want) < BLOCK_ERROR_LIMITS[precision]


def test_int8_blocks_compute_with_the_dequantised_weights():
    """An int8-blocks model is the float64 model on the int8 round trip of its block weights, to float32
    rounding: the error above is the weights' rounding, nothing else."""
    model = tiny("pythia-test", seed=6)
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got, _ = quantize_model(model, blocks="int8")(idx)
        want, _ = float64_twin(model, dequantise_blocks=True)(idx)
    assert rel_max(got, want) < 1e-5


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_quantized_blocks_decode_with_cache_matches_full_forward(precision):
    """Prefill 8 tokens into a KV cache, then 8 one at a time: the logits of the full forward. bf16 may
    round a one-token matmul differently from a batched one (one bf16 unit, 2^-8); int8 and the rest
    agree to float32 rounding."""
    q = quantize_model(tiny("pythia-test", seed=7), blocks=precision, head=precision)
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full, _ = q(idx)
        cache = q.new_cache(2, 16)
        steps = [q(idx[:, :8], cache=cache)[0]] + [q(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 16)]
    assert cache.length == 16
    assert rel_max(torch.cat(steps, 1), full) < (2.0**-7 if precision == "bf16" else 1e-5)


def test_blocks_errors():
    model = tiny("mf-test")
    for precision in ("bf16", "int8"):
        with pytest.raises(ValueError, match=f"MemoryFormer.*use tables='{precision}'"):
            quantize_model(model, blocks=precision)
    with pytest.raises(ValueError, match="MemoryFormer.*use tables="):
        quantize_model(quantize_model(model, tables="int8"), blocks="int8")  # quantized tables too
    with pytest.raises(ValueError, match="blocks must be None or one of"):
        quantize_model(tiny("pythia-test"), blocks="fp8")
    with pytest.raises(ValueError, match="no(ne)?.*blocks="):
        quantize_model(tiny("pythia-test"), tables="bf16")  # a dense model's tables error names blocks=
    once = quantize_model(tiny("pythia-test"), blocks="int8")
    with pytest.raises(ValueError, match="nn.Linear layers inside model.blocks"):
        quantize_model(once, blocks="int8")  # nothing left to quantize
