"""LanguageModel: GPT-NeoX equivalence, KV-cache decoding against the full forward, generate, configs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memoryformer import LanguageModel, ModelConfig
from memoryformer.core.config import PRESETS
from memoryformer.core.model import MemoryFormerBlock, PythiaBlock, RMSNorm, apply_rotary, sample_next_token

ARCHS = ["mf-test", "pythia-test"]


def tiny(preset: str, **overrides) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig.from_preset(preset, **overrides)).eval()


# ---- config -----------------------------------------------------------------------------------


def test_presets_and_json_round_trip(tmp_path):
    for name in PRESETS:
        cfg = ModelConfig.from_preset(name)
        assert ModelConfig.from_json(cfg.to_json()) == cfg
    cfg = ModelConfig.from_preset("mf-tiny", weighting="l1", expanding_bits=3)
    cfg.to_json(tmp_path / "c.json")
    assert ModelConfig.from_json(tmp_path / "c.json") == cfg
    assert json.loads(cfg.to_json())["weighting"] == "l1"


def test_paper_preset_shapes():
    tiny_cfg, small, base = (ModelConfig.from_preset(n) for n in ("mf-tiny", "mf-small", "mf-base"))
    assert (tiny_cfg.n_layers, tiny_cfg.d_model, tiny_cfg.n_heads, tiny_cfg.num_tables) == (6, 512, 8, 64)
    assert (small.n_layers, small.d_model, small.n_heads, small.num_tables) == (12, 768, 12, 96)
    assert (base.n_layers, base.d_model, base.n_heads, base.num_tables) == (24, 1024, 16, 128)
    assert tiny_cfg.memory_hidden == 640 and tiny_cfg.rotary_dims == 16 and tiny_cfg.vocab_size == 50304
    assert tiny_cfg.twin() == ModelConfig.from_preset("pythia-70m")


def test_config_errors():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        ModelConfig.from_preset("nope")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_preset("mf-test", colour="red")
    with pytest.raises(ValueError, match="not divisible by n_heads"):
        ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="not divisible by tau"):
        ModelConfig(d_model=100, n_heads=4, tau=8)
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig(architecture="rnn")
    with pytest.raises(ValueError, match="expanding_bits"):
        ModelConfig(tau=8, expanding_bits=9)
    with pytest.raises(ValueError, match="memory_block_activation"):
        ModelConfig(memory_block_activation="relu")


# ---- blocks -----------------------------------------------------------------------------------


def test_memoryformer_block_structure():
    cfg = ModelConfig.from_preset("mf-tiny")
    with torch.device("meta"):
        block = MemoryFormerBlock(cfg, 0)
    attn, mlp = block.attn, block.mlp
    assert [m.table.shape for m in (attn.q_proj, attn.k_proj, attn.v_proj)] == [(64 * 256, 512)] * 3
    assert mlp.ml1.table.shape == (64 * 256, 640) and mlp.ml1.tau == 8
    assert mlp.ml2.table.shape == (64 * 1024, 512) and mlp.ml2.tau == 10
    assert isinstance(block.attn_norm, RMSNorm) and isinstance(mlp.norm, torch.nn.LayerNorm)
    assert not any(isinstance(m, torch.nn.Linear) for m in block.modules())  # no W_O, no dense layers
    # 69.2M parameters per block (paper section 3.1)
    assert sum(p.numel() for p in block.parameters()) / 1e6 == pytest.approx(69.2, abs=0.05)


def test_rms_norm_matches_the_written_out_formula_with_gradients():
    """RMSNorm equals w * x / (sqrt(mean(x^2)) + eps) in float64, values and gradients (gradcheck),
    and its gradient at x = 0 is the true w / eps, not NaN (the formula's sqrt has no derivative there)."""
    torch.manual_seed(0)
    norm = RMSNorm(12, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(12, dtype=torch.float64))
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    ref = norm.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + norm.eps)
    torch.testing.assert_close(norm(x), ref, rtol=1e-13, atol=1e-13)
    gx, gw = torch.autograd.grad(norm(x).square().sum(), (x, norm.weight))
    rx, rw = torch.autograd.grad(ref.square().sum(), (x, norm.weight))
    torch.testing.assert_close(gx, rx, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(gw, rw, rtol=1e-11, atol=1e-11)
    assert torch.autograd.gradcheck(norm, (x,))
    zero = torch.zeros(2, 12, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(norm(zero).sum(), zero)
    torch.testing.assert_close(g, (norm.weight / norm.eps).expand(2, 12).detach())
    norm32 = RMSNorm(12, eps=1e-6)
    norm32.load_state_dict(norm.state_dict())
    x32 = torch.randn(4, 12)
    for low in (torch.bfloat16, torch.float16):  # computed in float32, returned in the input's dtype
        out = norm32(x32.to(low))
        assert out.dtype == low
        torch.testing.assert_close(out, norm32(x32.to(low).float()).to(low), rtol=0, atol=0)
        torch.testing.assert_close(out.float(), norm32(x32), rtol=2e-2, atol=2e-2)
    assert RMSNorm(0)(torch.zeros(3, 0)).shape == (3, 0)


def test_memoryformer_block_matches_handwritten_reference():
    """The block equals the paper's Eq. 13 written out by hand, with the GeLU variant."""
    torch.manual_seed(1)
    cfg = ModelConfig.from_preset("mf-test", memory_block_activation="gelu", rms_norm_eps=1e-6)
    block = MemoryFormerBlock(cfg, 0).double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 6, cfg.d_model, dtype=torch.float64)
    from memoryformer.core.model import rotary_cos_sin

    rope = rotary_cos_sin(torch.arange(6), cfg.rotary_dims, cfg.rotary_base, torch.float64)

    def rms(v, w):
        return w * v / (v.pow(2).mean(-1, keepdim=True).sqrt() + cfg.rms_norm_eps)

    a = block.attn
    xn = rms(x, block.attn_norm.weight)
    q, k, v = a.q_proj(xn), a.k_proj(xn), a.v_proj(xn)
    H, Dh = cfg.n_heads, cfg.head_dim
    q, k, v = (t.view(2, 6, H, Dh).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    scores = q @ k.transpose(-1, -2) / Dh**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, cfg.d_model)
    h = x + attn
    m = block.mlp
    y = h + m.ml2(torch.nn.functional.gelu(m.norm(m.ml1(rms(h, block.mlp_norm.weight)))))
    torch.testing.assert_close(block(x, rope), y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
@pytest.mark.parametrize("parallel_residual", [True, False])
def test_pythia_matches_transformers_gpt_neox(rotary_pct, parallel_residual):
    transformers = pytest.importorskip("transformers")
    from memoryformer.integrations.neox import config_to_hf

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("pythia-test", rotary_pct=rotary_pct, parallel_residual=parallel_residual)
    hf = transformers.GPTNeoXForCausalLM(config_to_hf(cfg)).eval()
    with torch.no_grad():  # random biases and norms too, so every parameter matters
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = LanguageModel.from_hf_gpt_neox(hf).eval()
    assert ours.config.rotary_pct == rotary_pct and ours.config.parallel_residual == parallel_residual
    idx = torch.randint(0, cfg.vocab_size, (3, 19))
    with torch.no_grad():
        expected = hf(idx).logits
        got, _ = ours(idx)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_from_hf_gpt_neox_loads_a_saved_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    from memoryformer.integrations.neox import config_to_hf

    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(config_to_hf(ModelConfig.from_preset("pythia-test"))).eval()
    hf.save_pretrained(tmp_path)
    ours = LanguageModel.from_hf_gpt_neox(str(tmp_path)).eval()
    idx = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, rtol=0, atol=1e-5)


def test_pythia_block_is_gpt_neox_layout():
    cfg = ModelConfig.from_preset("pythia-70m")
    with torch.device("meta"):
        block = PythiaBlock(cfg, 0)
    names = {n for n, _ in block.named_parameters()}
    assert "attention.query_key_value.weight" in names and "mlp.dense_4h_to_h.bias" in names
    assert sum(p.numel() for p in block.parameters()) == 12 * 512 * 512 + 9 * 512 + 4 * 512  # weights, biases, norms


# ---- forward, loss, cache, generate ---------------------------------------------------------


@pytest.mark.parametrize("preset", ARCHS)
def test_loss_is_cross_entropy_with_ignore_index(preset):
    model = tiny(preset)
    idx = torch.randint(0, 256, (2, 10))
    targets = torch.randint(0, 256, (2, 10))
    targets[0, :4] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    assert logits.shape == (2, 10, 256)


@pytest.mark.parametrize("preset", ARCHS)
@pytest.mark.parametrize("chunks", [[20], [1] * 20, [7, 1, 1, 5, 6], [3, 17]])
def test_incremental_decoding_equals_full_forward(preset, chunks):
    model = tiny(preset)
    idx = torch.randint(0, 256, (3, sum(chunks)))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(3, sum(chunks))
        parts, start = [], 0
        for n in chunks:
            logits, _ = model(idx[:, start:start + n], cache=cache)
            parts.append(logits)
            start += n
    assert cache.length == sum(chunks)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ARCHS)
def test_greedy_generate_equals_argmax_of_full_forward(preset):
    model = tiny(preset)
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, 8, temperature=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        for t in range(5, 13):
            logits, _ = model(out[:, :t])
            assert torch.equal(out[:, t], logits[:, -1].argmax(-1))


def test_generate_sampling_is_reproducible_and_stops():
    model = tiny("mf-test")
    prompt = torch.randint(0, 256, (2, 4))
    a = model.generate(prompt, 10, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 10, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    first = model.generate(prompt[:1], 1, temperature=0)[0, -1].item()
    stopped = model.generate(prompt[:1], 10, temperature=0, stop_token=first)
    assert stopped.shape == (1, 5)
    streamed = []
    model.generate(prompt, 3, temperature=0, on_token=streamed.append)
    assert len(streamed) == 3 and streamed[0].shape == (2,)
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        model.generate(prompt, 61)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    # top_p 0.6: p = softmax = [.032, .087, .237, .644] -> only the top token is needed
    draws = {sample_next_token(logits, top_p=0.6, generator=g).item() for _ in range(100)}
    assert draws == {3}
    assert sample_next_token(logits, temperature=0).item() == 3


_ROOT = Path(__file__).resolve().parents[1] / "src" / "memoryformer"


def _imports_between(names: list[str]) -> dict[str, set[str]]:
    """module -> the package modules it imports (at the top or inside functions), read from the source."""
    import ast

    def module_name(path: Path) -> str:
        parts = list(path.relative_to(_ROOT.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    files = {module_name(p): p for p in _ROOT.rglob("*.py")}
    graph = {}
    for name in names:
        deps = set()
        for node in ast.walk(ast.parse(files[name].read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("memoryformer"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("memoryformer")}
        graph[name] = deps - {name}
    return graph


def test_reference_imports_no_other_package_module():
    code = ("import sys, memoryformer.core.reference; "
            "print(sorted(m for m in sys.modules if m.startswith('memoryformer')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['memoryformer', 'memoryformer.core', 'memoryformer.core.reference']"


def test_core_kernels_and_inference_have_no_import_cycle():
    names = ["memoryformer", "memoryformer.core.config", "memoryformer.core.layer", "memoryformer.core.model",
             "memoryformer.core.reference", "memoryformer.kernels", "memoryformer.kernels._loader",
             "memoryformer.kernels._register", "memoryformer.kernels._backend", "memoryformer.kernels.decode_inputs",
             "memoryformer.inference.quantize", "memoryformer.inference.pages"]
    graph = _imports_between(names)
    assert graph["memoryformer.core.reference"] == set()
    assert "memoryformer.core.layer" not in graph["memoryformer.kernels"]

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(d == goal or (d in graph and d not in seen and reaches(d, goal, seen | {d}))
                   for d in graph[start])

    assert [n for n in names if reaches(n, n, {n})] == []


# wrong types and out-of-range values of every kind of field, each named in one clear error
BAD_CONFIGS = [
    ("vocab_size", "512", TypeError, "vocab_size must be a positive integer, got '512' \\(str\\)"),
    ("n_layers", 2.0, TypeError, "n_layers must be a positive integer, got 2.0"),
    ("d_model", True, TypeError, "d_model must be a positive integer, got True"),
    ("n_heads", 0, ValueError, "n_heads must be a positive integer, got 0"),
    ("max_seq_len", -4, ValueError, "max_seq_len must be a positive integer"),
    ("intermediate_size", 0, ValueError, "intermediate_size must be a positive integer, got 0"),
    ("intermediate_size", "1024", TypeError, "intermediate_size must be a positive integer"),
    ("expanding_bits", -1, ValueError, "expanding_bits must be an integer >= 0, got -1"),
    ("tau", 2.5, TypeError, "tau must be an integer in 1..16, got 2.5"),
    ("tau", 0, ValueError, "tau must be an integer in 1..16, got 0"),
    ("norm_eps", -1e-5, ValueError, "norm_eps must be a positive finite number, got -1e-05"),
    ("rms_norm_eps", 0.0, ValueError, "rms_norm_eps must be a positive finite number"),
    ("norm_eps", "1e-5", TypeError, "norm_eps must be a positive finite number, got '1e-5'"),
    ("init_std", -0.02, ValueError, "init_std must be a finite number >= 0, got -0.02"),
    ("table_init_std", float("nan"), ValueError, "table_init_std must be a finite number >= 0, got nan"),
    ("temperature", 0, ValueError, "temperature must be a positive finite number, got 0"),
    ("rotary_base", float("inf"), ValueError, "rotary_base must be a positive finite number, got inf"),
    ("rotary_pct", 1.5, ValueError, "rotary_pct must be a number in \\[0, 1\\], got 1.5"),
    ("rotary_pct", None, TypeError, "rotary_pct must be a number in"),
    ("weighting", "softmax", ValueError, "weighting must be one of \\('prob', 'l1'\\), got 'softmax'"),
    ("architecture", "rnn", ValueError, "architecture must be one of"),
    ("memory_block_activation", "relu", ValueError, "memory_block_activation must be one of"),
    ("memory_bias", 1, TypeError, "memory_bias must be true or false, got 1 \\(int\\)"),
    ("tie_embeddings", "false", TypeError, "tie_embeddings must be true or false, got 'false'"),
    ("parallel_residual", None, TypeError, "parallel_residual must be true or false"),
]


@pytest.mark.parametrize("field,value,error,message", BAD_CONFIGS)
def test_config_rejects_wrong_types_and_ranges(field, value, error, message, tmp_path):
    with pytest.raises(error, match="ModelConfig." + message):
        ModelConfig.from_preset("mf-test", **{field: value})
    path = tmp_path / "config.json"  # the same from a JSON file (NaN and Infinity are JSON extensions)
    path.write_text(json.dumps({**ModelConfig.from_preset("mf-test").to_dict(), field: value}))
    with pytest.raises(error, match="ModelConfig." + message):
        ModelConfig.from_json(path)


def test_config_normalises_numbers():
    import numpy as np

    cfg = ModelConfig.from_preset("mf-test", vocab_size=np.int64(300), rotary_base=10000, temperature=1)
    assert type(cfg.vocab_size) is int and cfg.vocab_size == 300
    assert type(cfg.rotary_base) is float and type(cfg.temperature) is float
    assert ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("preset", ARCHS)
def test_bad_token_ids_raise_one_clear_error(preset):
    model = tiny(preset)
    ids = torch.zeros(2, 5, dtype=torch.long)
    cases = [
        (ids.clone().fill_(256), ValueError, "token id 256 is outside the vocabulary \\[0, 256\\)"),
        (ids.clone().index_fill_(1, torch.tensor([3]), -1), ValueError, "token id -1 is outside"),
        (ids[:0], ValueError, "at least one sequence of at least one token, got shape \\(0, 5\\)"),
        (ids[:, :0], ValueError, "got shape \\(2, 0\\)"),
        (ids.float(), TypeError, "token ids must be an int64 tensor"),
        (ids[0], TypeError, "of shape \\(batch, seq\\)"),
        ([[1, 2]], TypeError, "token ids must be an int64 tensor of shape \\(batch, seq\\), got list"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            model(bad)
        with pytest.raises(error, match=message):
            model.generate(bad, 2)
    cache = model.new_cache(2, 8)
    with pytest.raises(ValueError, match="token id 300"):
        model(ids.clone().fill_(300), cache=cache)
    assert cache.length == 0  # nothing was written
    with pytest.raises(ValueError, match="batch of 1 sequences does not match the KV cache's 2"):
        model(ids[:1], cache=cache)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        model.generate(ids, 2.5)
    full = model.new_cache(2)
    model(ids, cache=full)
    with pytest.raises(ValueError, match="sequence of 65 positions \\(5 cached \\+ 60 new\\) exceeds max_seq_len=64"):
        model(torch.zeros(2, 60, dtype=torch.long), cache=full)


def test_token_checks_do_not_break_torch_compile():
    model = tiny("mf-test")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, 256, (2, 6))
    torch.testing.assert_close(compiled(ids)[0], model(ids)[0])


def test_forward_errors():
    model = tiny("mf-test")
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_models_build_on_meta_device():
    with torch.device("meta"):
        model = LanguageModel(ModelConfig.from_preset("mf-base"))
    assert model.num_parameters() / 1e9 == pytest.approx(6.75, abs=0.005)
    assert model.head.weight.is_meta


@pytest.mark.parametrize("preset", ARCHS)
def test_backward_reaches_every_parameter(preset):
    model = tiny(preset).train()
    idx = torch.randint(0, 256, (2, 12))
    _, loss = model(idx, idx)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "table" not in n)


def test_init_stds():
    model = LanguageModel(ModelConfig.from_preset("mf-demo"))
    small_init = (2 / (5 * 256)) ** 0.5
    assert model.embed.weight.std().item() == pytest.approx(small_init, rel=0.02)
    assert model.blocks[0].attn.q_proj.table.std().item() == pytest.approx(small_init, rel=0.02)
    assert model.blocks[0].mlp.ml2.table.std().item() == pytest.approx(0.02, rel=0.02)


def test_rotary_tables_are_cached_grown_and_exact():
    from memoryformer.core.model import rotary_cos_sin

    model = LanguageModel(ModelConfig.from_preset("mf-test", max_seq_len=3000))
    cos, sin = model._rotary_tables(torch.device("cpu"), torch.float32, 10)
    assert cos.shape[0] == 1024 and model._rotary_tables(torch.device("cpu"), torch.float32, 900)[0] is cos
    cos, sin = model._rotary_tables(torch.device("cpu"), torch.float32, 1500)  # grows by doubling
    assert cos.shape[0] == 2048
    assert model._rotary_tables(torch.device("cpu"), torch.float32, 2500)[0].shape[0] == 3000  # capped
    ref_cos, ref_sin = rotary_cos_sin(torch.arange(2048), model.config.rotary_dims, model.config.rotary_base,
                                      torch.float32)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)
