"""Table 2's efficient attentions (Performer, cosFormer, causal Linformer) against float64 references: a
direct O(T^2) computation of the same causal attention, written from the formulas; causality; the
KV-cache path; FAVOR+ against softmax; the twin with each; their FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from memoryformer.core.config import ModelConfig
from memoryformer.core.linear_attention import (
    CosformerAttention,
    LinformerAttention,
    PerformerAttention,
    attention_macs,
    causal_linear_attention,
    linformer_rank,
    performer_features,
)
from memoryformer.core.model import LanguageModel

B, H, T, DH = 2, 3, 13, 8


def qkv(seed: int = 0, t: int = T, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, t, DH, generator=g, dtype=dtype) for _ in range(3))


def direct_kernel_attention(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weights (B, H, T, S) of non-negative pair weights, masked causally (query i = position S - T + i)
    and normalised row by row (a row summing to under 1e-6 divided by 1e-6, as the module does: cosFormer's
    ReLU features can give an all-zero row), times v: the obvious O(T S) computation."""
    t, s = weights.shape[-2:]
    mask = torch.arange(t)[:, None] + (s - t) >= torch.arange(s)[None, :]
    w = weights * mask
    return (w @ v) / w.sum(-1, keepdim=True).clamp_min(1e-6)


def performer_direct(module: PerformerAttention, q, k, v) -> torch.Tensor:
    """exp(w.x - |x|^2 / 2) features without any offset, their products for every pair."""
    w = module.features.double()

    def phi(x):
        x = x * x.shape[-1] ** -0.25
        return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2)

    return direct_kernel_attention(phi(q) @ phi(k).transpose(-1, -2), v)


def cosformer_direct(max_len: int, q, k, v) -> torch.Tensor:
    """relu(q_i) . relu(k_j) cos(pi (i - j) / 2M) for every pair."""
    t, s = q.shape[2], k.shape[2]
    i = torch.arange(s - t, s, dtype=torch.float64)[:, None]
    j = torch.arange(s, dtype=torch.float64)[None, :]
    weights = (torch.relu(q) @ torch.relu(k).transpose(-1, -2)) * torch.cos(math.pi * (i - j) / (2 * max_len))
    return direct_kernel_attention(weights, v)


def linformer_direct(module: LinformerAttention, q, k, v) -> torch.Tensor:
    """Position by position: K~_t = t^(-1/2) sum_{j<=t} E[:, j] k_j, softmax over the r scores."""
    E, F = module.key_projection.double(), module.value_projection.double()
    t_len, s_len = q.shape[2], k.shape[2]
    out = torch.zeros_like(q)
    for i in range(t_len):
        t = s_len - t_len + i  # absolute position
        keys = torch.einsum("rj,bhjd->bhrd", E[:, :t + 1], k[:, :, :t + 1]) / math.sqrt(t + 1)
        values = torch.einsum("rj,bhjd->bhrd", F[:, :t + 1], v[:, :, :t + 1]) / math.sqrt(t + 1)
        p = (torch.einsum("bhd,bhrd->bhr", q[:, :, i], keys) / math.sqrt(DH)).softmax(-1)
        out[:, :, i] = torch.einsum("bhr,bhrd->bhd", p, values)
    return out


def modules() -> dict[str, tuple[torch.nn.Module, object]]:
    torch.manual_seed(0)
    lin = LinformerAttention(32, rank=5).double()
    return {"performer": (PerformerAttention(DH, layer=0), lambda m, q, k, v: performer_direct(m, q, k, v)),
            "cosformer": (CosformerAttention(32), lambda m, q, k, v: cosformer_direct(32, q, k, v)),
            "linformer": (lin, lambda m, q, k, v: linformer_direct(m, q, k, v))}


# ---- the shared prefix-sum kernel ----------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("past", [0, 5])
def test_causal_linear_attention_matches_direct(chunk, past):
    g = torch.Generator().manual_seed(1)
    s, f = T + past, 6
    phi_q = torch.rand(B, H, T, f, generator=g, dtype=torch.float64)
    phi_k = torch.rand(B, H, s, f, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, s, DH, generator=g, dtype=torch.float64)
    got = causal_linear_attention(phi_q, phi_k, v, chunk=chunk)
    want = direct_kernel_attention(phi_q @ phi_k.transpose(-1, -2), v)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---- each attention: direct reference, causality, the cache's last-T-of-S form ------------------


@pytest.mark.parametrize("kind", ["performer", "cosformer", "linformer"])
def test_attention_matches_its_direct_causal_computation(kind):
    module, direct = modules()[kind]
    q, k, v = qkv()
    torch.testing.assert_close(module(q, k, v), direct(module, q, k, v), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["performer", "cosformer", "linformer"])
def test_attention_is_causal(kind):
    module, _ = modules()[kind]
    q, k, v = qkv()
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, 7:] += 3 * torch.randn_like(x[:, :, 7:])  # change the future only
    a, b = module(q, k, v), module(q2, k2, v2)
    torch.testing.assert_close(a[:, :, :7], b[:, :, :7], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a[:, :, 7:], b[:, :, 7:])


@pytest.mark.parametrize("kind", ["performer", "cosformer", "linformer"])
def test_last_queries_over_cached_keys_equal_the_full_computation(kind):
    module, _ = modules()[kind]
    q, k, v = qkv()
    full = module(q, k, v)
    torch.testing.assert_close(module(q[:, :, -4:], k, v), full[:, :, -4:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module(q[:, :, -1:], k, v), full[:, :, -1:], rtol=1e-10, atol=1e-12)


def test_favor_plus_estimates_softmax_attention():
    """With many random features and small q, k, FAVOR+ is close to exact causal softmax attention."""
    q, k, v = (x * 0.5 for x in qkv(2))
    module = PerformerAttention(DH, layer=0, num_features=16384)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    err = (module(q, k, v) - exact).abs().max().item()
    assert err < 0.05
    few = PerformerAttention(DH, layer=0, num_features=4)
    assert (few(q, k, v) - exact).abs().max().item() > err  # the estimate improves with features


def test_performer_features_are_fixed_per_layer_and_orthogonal_in_blocks():
    a, b, c = PerformerAttention(DH, 0), PerformerAttention(DH, 0), PerformerAttention(DH, 1)
    assert a.features.shape == (performer_features(DH), DH)
    assert torch.equal(a.features, b.features) and not torch.equal(a.features, c.features)
    w = a.features[:DH].double()
    unit = w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(unit @ unit.T, torch.eye(DH, dtype=torch.float64), atol=1e-5, rtol=0)


def test_sequence_longer_than_max_seq_len_is_one_clear_error():
    q, k, v = qkv(t=40)
    for module in (CosformerAttention(32), LinformerAttention(32).double()):
        with pytest.raises(ValueError, match="at most max_seq_len = 32 positions, got 40"):
            module(q, k, v)


# ---- the twin with each attention --------------------------------------------------------------


def twin(kind: str) -> LanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="pythia", attention=kind, vocab_size=64, d_model=32, n_heads=4, n_layers=2,
                      max_seq_len=32)
    return LanguageModel(cfg).double().eval()


@pytest.mark.parametrize("kind", ["performer", "cosformer", "linformer"])
def test_twin_decodes_with_the_cache_as_it_scores_the_whole_sequence(kind):
    model = twin(kind)
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(2)
        steps = [model(idx[:, :8], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["performer", "cosformer", "linformer"])
def test_twin_trains_with_each_attention(kind):
    model = twin(kind).float().train()
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_attention_setting_is_validated():
    with pytest.raises(ValueError, match="attention must be one of"):
        ModelConfig(architecture="pythia", attention="flash")
    with pytest.raises(ValueError, match="MemoryFormer uses softmax"):
        ModelConfig(architecture="memoryformer", attention="performer")
    assert ModelConfig.from_dict({k: v for k, v in ModelConfig().to_dict().items() if k != "attention"}).attention \
        == "softmax"  # configs saved before the setting existed


# ---- FLOPs in the paper's convention --------------------------------------------------------------


def test_attention_macs_by_hand():
    s, d, h = 2048, 1024, 16
    dh = 64
    m = int(64 * math.log(64))
    assert m == 266 == performer_features(64) and linformer_rank(2048) == 256
    assert attention_macs("softmax", s, d, h) == 2 * s * s * d
    assert attention_macs("performer", s, d, h) == 4 * s * m * d + 2 * s * m * h
    assert attention_macs("cosformer", s, d, h) == 4 * s * d * dh + 4 * s * dh * h
    assert attention_macs("linformer", s, d, h) == 4 * s * 256 * d
    with pytest.raises(ValueError, match="attention must be one of"):
        attention_macs("flash", s, d, h)


def test_table2_flops_beside_the_papers():
    from memoryformer.research.flops import paper_flops, structural_count, table2_flops

    t = table2_flops()
    dense = 12 * 2048 * 1024**2  # Pythia-410M's block without attention (Table 1: 25.8 G)
    assert t["dense_gflops"] == pytest.approx(dense / 1e9) and round(t["dense_gflops"], 1) == 25.8
    for kind, row in t["rows"].items():
        assert row["block_gflops"] == pytest.approx((dense + attention_macs(kind, 2048, 1024, 16)) / 1e9)
    assert round(t["rows"]["softmax"]["block_gflops"], 1) == t["rows"]["softmax"]["paper_block_gflops"] == 34.4
    assert {k: r["paper_block_gflops"] for k, r in t["rows"].items() if k != "softmax"} == {
        "performer": 26.7, "cosformer": 30.0, "linformer": 26.1}  # Table 2 as printed
    # a config with an efficient attention counts it in the paper convention and the structural count
    cfg = ModelConfig.from_preset("pythia-410m", attention="performer")
    assert paper_flops(cfg, 2048) == dense + attention_macs("performer", 2048, 1024, 16)
    base = structural_count(ModelConfig.from_preset("pythia-410m"), 2048)
    lin = structural_count(cfg, 2048)
    assert base.forward_macs() - lin.forward_macs() == cfg.n_layers * (
        2 * 2048 * 2048 * 1024 - attention_macs("performer", 2048, 1024, 16))
