"""FLOPs, parameter and memory accounting against the paper's tables and independent references."""

from __future__ import annotations

import json

import paper_numbers as paper
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from memoryformer import cli
from memoryformer.core.config import ModelConfig
from memoryformer.core.layer import MemoryLayer
from memoryformer.research import flops

G = 1e9


# ---- paper convention: Table 1, Figure 1, Tables 3 and 5 ----------------------------------------


@pytest.mark.parametrize("preset", list(paper.TABLE1_FLOPS_G))
def test_table1_paper_convention(preset: str) -> None:
    cfg = ModelConfig.from_preset(preset)
    s = paper.TABLE1_SEQ_LEN
    printed_wo, printed_total = paper.TABLE1_FLOPS_G[preset]
    expected_wo = paper.TABLE1_EXCEPTIONS.get((preset, "without_attention"), (None, printed_wo))[1]
    expected_total = paper.TABLE1_EXCEPTIONS.get((preset, "total"), (None, printed_total))[1]
    assert round(flops.paper_flops(cfg, s, attention=False) / G, 1) == expected_wo
    assert round(flops.paper_flops(cfg, s) / G, 1) == expected_total


def test_table1_exceptions_are_documented() -> None:
    for (preset, column), (printed, formula) in paper.TABLE1_EXCEPTIONS.items():
        value = flops.paper_flops(ModelConfig.from_preset(preset), paper.TABLE1_SEQ_LEN,
                                  attention=column == "total")
        assert round(value / G, 1) == formula != printed
        assert abs(value / G - printed) < 0.1  # near misses, not a different formula
    assert "1.0 G" in flops.TABLE1_NOTE and "0.91 G" in flops.TABLE1_NOTE and "7.4 G" in flops.TABLE1_NOTE


def test_paper_formulas_by_hand() -> None:
    s, d, k = 2048, 512, 64
    assert flops.paper_block_flops("pythia", d, s) == 12 * s * d * d + 2 * s * s * d
    assert flops.paper_block_flops("memoryformer", d, s, num_tables=k, attention=False) == 6 * k * s * d
    assert flops.to_convention(10, "2x") == 20 and flops.to_convention(10, "paper") == 10
    with pytest.raises(ValueError, match="num_tables"):
        flops.paper_block_flops("memoryformer", d, s)
    with pytest.raises(ValueError, match="architecture"):
        flops.paper_block_flops("gpt", d, s)
    with pytest.raises(ValueError, match="seq_len"):
        flops.paper_block_flops("pythia", d, 0)
    with pytest.raises(ValueError, match="convention"):
        flops.to_convention(1, "3x")


def test_figure1_ratio_and_series() -> None:
    data = flops.figure1_series(hidden_sizes=[512, 2048, 3072], seq_lens=paper.FIGURE1_SEQ_LENS)
    mf, tr = data["series"]["MemoryFormer s=2048"], data["series"]["Transformer s=2048"]
    assert mf[1] / tr[1] == pytest.approx(paper.FIGURE1_RATIO_D2048_S2048, abs=5e-4)
    assert round(tr[0] / G, 1) == 10.7 and round(mf[0] / G, 1) == 4.7  # Table 1, tiny
    assert set(data["series"]) == {f"{a} s={s}" for a in ("Transformer", "MemoryFormer") for s in (1024, 2048)}
    # the default x axis spans Figure 1's 512..3072
    default = flops.figure1_series()["hidden_sizes"]
    assert (default[0], default[-1]) == paper.FIGURE1_HIDDEN_SIZES


def test_plot_figure1_writes_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "fig1.png"
    flops.plot_figure1(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_not_blank_png(path)


def assert_not_blank_png(path, min_width=400, min_height=250) -> None:
    """An image of a plausible size whose pixels are not all one colour."""
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] >= min_height and pixels.shape[1] >= min_width, pixels.shape
    assert pixels[..., :3].std() > 0.05, "the image is blank"


def test_table3_memory_layer_flops_and_size() -> None:
    rows = zip(paper.TABLE3, paper.TABLE3_FORMULA_FLOPS_G)
    for row, (((_, tau, k, h), (printed_flops, printed_mb)), formula) in enumerate(rows):
        value = flops.paper_memory_layer_flops(paper.TABLE3_SEQ_LEN, k, tau, h) / G
        assert round(value, 4) == formula
        if row in paper.TABLE3_FLOPS_EXCEPTION_ROWS:
            assert round(value, 2) != printed_flops and abs(value - printed_flops) < 0.01
        else:
            assert round(value, 2) == printed_flops
        assert round(flops.memory_table_bytes(k, tau, h) / 1e6, 1) == printed_mb


def test_table5_memory_block_size() -> None:
    t = paper.TABLE5_TINY
    for bits, printed_mb in paper.TABLE5_MEMORY_BLOCK_MB.items():
        size = flops.memory_block_table_bytes(t["num_tables"], t["tau"], t["d_model"], bits)
        assert round(size / 1e6, 1) == printed_mb


# ---- structural count -------------------------------------------------------------------------


def test_structural_memoryformer_by_hand() -> None:
    cfg = ModelConfig.from_preset("mf-tiny")
    s, d, k, tau, e = 2048, cfg.d_model, cfg.num_tables, cfg.tau, cfg.expanding_bits
    count = flops.structural_count(cfg, s)
    memory = count.block_total(["memory"])
    assert memory == s * (3 * k * d + k * k * (tau + e) + k * d)
    assert memory == pytest.approx(5.25 * k * s * d)  # below the paper's 6Ksd
    assert count.block_total(["dense"]) == 0
    assert count.block_total(["attention"]) == 2 * s * s * d
    assert count.head_macs == s * d * cfg.vocab_size
    assert count.forward_macs() == cfg.n_layers * (memory + 2 * s * s * d) + count.head_macs
    assert count.block_total(["elementwise"]) > 0
    causal = flops.structural_count(cfg, s, causal=True)
    assert causal.block_total(["attention"]) == 2 * d * s * (s + 1) // 2
    with pytest.raises(ValueError, match="kinds"):
        count.block_total(["bogus"])


def test_structural_matches_memory_layers_of_the_model() -> None:
    """The memory MACs equal the sum of MemoryLayer.macs_per_token over an actual block."""
    cfg = ModelConfig.from_preset("mf-small")
    model = flops.build_meta_model(cfg)
    per_token = sum(m.macs_per_token() for m in model.blocks[0].modules() if isinstance(m, MemoryLayer))
    assert flops.structural_count(cfg, 16).block_total(["memory"]) == 16 * per_token


@pytest.mark.parametrize("preset", ["pythia-70m", "pythia-160m", "pythia-410m"])
def test_structural_pythia_equals_paper_formula(preset: str) -> None:
    cfg = ModelConfig.from_preset(preset)
    count = flops.structural_count(cfg, 2048)
    assert count.block_macs(attention=False) == flops.paper_flops(cfg, 2048, attention=False)
    assert count.block_macs() == flops.paper_flops(cfg, 2048)


def _flop_counter_split(model, idx) -> tuple[int, int]:
    """FlopCounterMode on a forward: (mm + addmm FLOPs, all other counted FLOPs).

    The math SDPA backend lowers attention to matmuls the counter sees; torch's counter has no
    formula for the CPU flash kernel and would count attention as zero."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx)
    ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    linear = sum(n for op, n in ops.items() if op.split(".")[-1] in ("mm", "addmm"))
    return linear, counter.get_total_flops() - linear


@pytest.mark.parametrize("preset", ["pythia-test", "mf-test"])
def test_structural_matches_torch_flop_counter(preset: str) -> None:
    """torch's counter (2 FLOPs per multiply-add) sees the dense layers, head and attention
    (QK^T and AV over the full s x s) exactly. On the pure-PyTorch path it sees the Memory Layers
    not at all (embedding_bag counts zero) -- the reason the structural count exists; the fused
    kernels register FLOP formulas, so there it sees exactly the structural memory count."""
    from memoryformer import kernels
    from memoryformer.core.model import LanguageModel

    cfg = ModelConfig.from_preset(preset)
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    batch, s = 2, 32
    idx = torch.randint(0, cfg.vocab_size, (batch, s))
    count = flops.structural_count(cfg, s)
    dense = cfg.n_layers * count.block_total(["dense"]) + count.head_macs
    attention = batch * 2 * cfg.n_layers * count.block_total(["attention"])
    memory = batch * 2 * cfg.n_layers * count.block_total(["memory"])
    with kernels.backend("torch"):
        linear, rest = _flop_counter_split(model, idx)
    assert linear == batch * 2 * dense
    assert rest == attention
    if cfg.architecture == "memoryformer":
        assert memory > 0 and dense == count.head_macs
        if kernels.load():
            with kernels.backend("kernels"):
                linear, rest = _flop_counter_split(model, idx)
            assert linear == batch * 2 * dense
            assert rest == attention + memory


def test_training_flops_per_token_independent_formula() -> None:
    """Pythia: 6 (12 L d^2 + 2 L s d + d V) per token, the usual 6N + attention rule."""
    cfg = ModelConfig.from_preset("pythia-70m")
    L, d, V, s = cfg.n_layers, cfg.d_model, cfg.vocab_size, 2048
    assert flops.training_flops_per_token(cfg, s) == 6 * (12 * L * d * d + 2 * L * s * d + d * V)
    mf = ModelConfig.from_preset("mf-tiny")
    per_token_memory = mf.num_tables * (3 * mf.d_model + mf.memory_hidden + mf.d_model)
    expected = 6 * (mf.n_layers * (per_token_memory + 2 * s * mf.d_model) + mf.d_model * mf.vocab_size)
    assert flops.training_flops_per_token(mf, s) == expected
    assert flops.forward_flops_per_token(mf, s) * 3 == expected


# ---- parameters and bytes ---------------------------------------------------------------------


def _analytic_block_tables(cfg: ModelConfig) -> dict[str, int]:
    k, tau, e, d = cfg.num_tables, cfg.tau, cfg.expanding_bits, cfg.d_model
    return {"qkv": 3 * k * 2**tau * d, "ml1": k * 2**tau * k * (tau + e), "ml2": k * 2 ** (tau + e) * d}


def test_mf_tiny_block_parameters() -> None:
    cfg = ModelConfig.from_preset("mf-tiny")
    model = flops.build_meta_model(cfg)
    block = model.blocks[0]
    layers = {
        "qkv": sum(m.table.numel() for m in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj)),
        "ml1": block.mlp.ml1.table.numel(),
        "ml2": block.mlp.ml2.table.numel(),
    }
    assert layers == _analytic_block_tables(cfg)
    for name, millions in paper.SECTION3_BLOCK_TABLE_PARAMS_M["mf-tiny"].items():
        assert round(layers[name] / 1e6, 1) == millions
    breakdown = flops.model_breakdown(cfg, model)
    assert breakdown.block.counts["tables"] == sum(layers.values())
    assert round(breakdown.block.bytes(torch.float16)["tables"] / 1e6, 1) == 138.4


@pytest.mark.parametrize("preset", list(paper.SECTION3_PARAMS_PER_BLOCK_M))
def test_memoryformer_totals_match_spec(preset: str) -> None:
    cfg = ModelConfig.from_preset(preset)
    b = flops.model_breakdown(preset)
    assert b.to_dict()["blocks_identical"]
    assert b.block.counts["tables"] == sum(_analytic_block_tables(cfg).values())
    assert round(b.block.total / 1e6, 1) == paper.SECTION3_PARAMS_PER_BLOCK_M[preset]
    assert round(b.block.bytes(torch.float16)["tables"] / 1e6, 1) == pytest.approx(
        paper.SECTION3_TABLE_MB_PER_BLOCK_FP16[preset], abs=0.051)
    assert b.total.total == pytest.approx(paper.SECTION3_TOTAL_PARAMS[preset], rel=0.003)
    assert b.total.counts["embedding"] == b.total.counts["head"] == cfg.vocab_size * cfg.d_model
    assert b.total.counts["dense"] == 0 and b.total.counts["other"] == 0
    assert b.total.total == b.total.counts["embedding"] * 2 + cfg.n_layers * b.block.total + cfg.d_model


def test_mf_base_total() -> None:
    b = flops.model_breakdown("mf-base")
    assert round(b.total.total / 1e9, 2) == 6.75
    assert b.total.bytes(torch.float32)["total"] == 4 * b.total.total


@pytest.mark.parametrize("preset", list(paper.PYTHIA_TOTAL_PARAMS))
def test_pythia_totals_match_released_models(preset: str) -> None:
    b = flops.model_breakdown(preset)
    assert b.total.total == paper.PYTHIA_TOTAL_PARAMS[preset]
    assert b.total.counts["tables"] == 0 and b.total.counts["other"] == 0
    assert b.total.counts["biases"] > 0 and b.total.counts["norms"] > 0


def test_tied_embeddings_counted_once() -> None:
    cfg = ModelConfig.from_preset("mf-test", tie_embeddings=True)
    b = flops.model_breakdown(cfg)
    assert b.total.counts["head"] == 0 and b.total.counts["embedding"] == cfg.vocab_size * cfg.d_model
    assert b.total.total == sum(p.numel() for p in flops.build_meta_model(cfg).parameters())


# ---- the command --------------------------------------------------------------------------------


def test_cli_json(capsys) -> None:
    rc = cli.main(["flops", "--json", "--presets", "mf-small", "pythia-70m", "--dtype", "bf16"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in out["presets"]}
    assert round(rows["mf-small"]["paper"]["without_attention"] / G, 1) == 0.9
    assert round(rows["pythia-70m"]["2x"]["total"] / G, 1) == round(2 * 10.74, 1)
    assert rows["pythia-70m"]["params"]["total"]["total"] == paper.PYTHIA_TOTAL_PARAMS["pythia-70m"]
    assert rows["mf-small"]["params"]["per_block"]["dtype"] == "bfloat16"
    assert any("1.0 G" in note for note in out["notes"]) and set(out["conventions"]) >= {"paper", "2x"}


def test_cli_table_and_plot(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "figure1.png"
    assert cli.main(["flops", "--seq-len", "1024", "--no-params", "--plot", str(path)]) == 0
    text = capsys.readouterr().out
    assert "1 FLOP = 1 multiply-add" in text and "0.91 G" in text
    assert_not_blank_png(path)
    for preset in flops.PAPER_PRESETS:
        assert preset in text


def test_cli_bad_input(capsys) -> None:
    assert cli.main(["flops", "--presets", "mf-huge"]) == 1
    assert "unknown preset" in capsys.readouterr().err
    assert cli.main(["flops", "--seq-len", "0"]) == 1


def test_memory_estimate_counts_what_the_model_holds() -> None:
    """Weights, gradients and AdamW from the real model's tensors; activations by the documented formula."""
    from memoryformer import LanguageModel, ModelConfig
    from memoryformer.train.memory import estimate_memory

    for preset in ("mf-test", "pythia-test"):
        config = ModelConfig.from_preset(preset)
        model = LanguageModel(config)
        values = sum(t.numel() for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values())
        inference = estimate_memory(config, batch_size=2, seq_len=8)
        assert inference.parameters == values and inference.weights == 4 * values
        assert inference.activations == 4 * 2 * 8 * config.vocab_size  # one batch of fp32 logits
        training = estimate_memory(config, training=True, batch_size=2, seq_len=8)
        per_token_layer = 34 * config.d_model + 5 * config.n_heads * 8
        activations = 2 * 2 * 8 * config.n_layers * per_token_layer + 2 * 4 * 2 * 8 * config.vocab_size
        assert training.activations == activations
        assert training.total == 4 * values + 4 * values + 8 * values + activations


def test_cli_shows_the_memory_estimate(capsys) -> None:
    assert cli.main(["flops", "--presets", "mf-tiny", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["presets"][0]["memory"]
    assert memory["inference"]["weights"] == 4 * memory["inference"]["parameters"]
    assert memory["training_batch_1"]["total"] > memory["inference"]["total"]
    assert cli.main(["flops", "--presets", "mf-tiny", "mf-small"]) == 0
    text = capsys.readouterr().out
    assert "Memory estimate in GiB" in text and "train b=1" in text
    line = next(line for line in text.splitlines() if line.startswith("mf-small") and "7.25" in line)
    assert float(line.split()[1]) == pytest.approx(1.946e9 * 4 / 2**30, rel=0.01)  # 1.95B fp32 weights
