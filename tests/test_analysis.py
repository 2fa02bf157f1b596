"""Bucket-usage statistics against hand-computed cases, bucket counting against an independent
sign-bit reference, the training hook, and the plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from memoryformer.core.config import ModelConfig
from memoryformer.core.model import LanguageModel
from memoryformer.research.analysis import (
    BucketCounter,
    bucket_counts,
    count_rows,
    dead_share,
    entropy,
    layer_block,
    layer_kind,
    memory_layers,
    plot_arms,
    plot_bucket_histograms,
    plot_loss_curves,
    plot_lr_sweep,
    plot_usage_during_training,
    table_stats,
    uniform_reference,
    usage_metrics,
    usage_summary,
)


def tiny_mf(**changes) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig.from_preset("mf-test", **changes)).eval()


# ---- statistics --------------------------------------------------------------------------------


def test_entropy_and_dead_share_hand_computed():
    counts = torch.tensor([[2, 2, 0, 0], [1, 1, 1, 1], [4, 0, 0, 0], [3, 1, 0, 0], [0, 0, 0, 0]])
    # p = (1/2, 1/2): log 2; uniform over 4: log 4; one bucket: 0; (3/4, 1/4): -(.75 ln .75 + .25 ln .25)
    expected_h = [math.log(2), math.log(4), 0.0, -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), 0.0]
    assert entropy(counts).tolist() == pytest.approx(expected_h, abs=1e-12)
    assert dead_share(counts).tolist() == pytest.approx([0.5, 0.0, 0.75, 0.5, 1.0])


def test_table_stats_and_uniform_reference():
    counts = torch.tensor([[2, 2, 0, 0], [1, 1, 1, 1]])
    stats = table_stats(counts)
    assert stats["tables"] == 2 and stats["buckets"] == 4 and stats["hits_per_table"] == 4
    assert stats["mean_entropy"] == pytest.approx((math.log(2) + math.log(4)) / 2)
    assert stats["mean_entropy_ratio"] == pytest.approx(0.75)  # (1/2 + 1) / 2 of log 4
    assert stats["mean_dead_share"] == pytest.approx(0.25) and stats["max_dead_share"] == 0.5
    ref = uniform_reference(4, 4)
    assert ref["max_entropy"] == pytest.approx(math.log(4))
    assert ref["expected_dead_share"] == pytest.approx(0.75**4)
    assert ref["expected_entropy"] == pytest.approx(math.log(4) - 3 / 8)
    assert uniform_reference(1024, 0)["expected_dead_share"] == 1.0
    with pytest.raises(ValueError, match="buckets"):
        uniform_reference(0, 10)


def test_usage_summary_per_kind():
    counts = {
        "blocks.0.attn.q_proj": torch.tensor([[2, 2, 0, 0]]),
        "blocks.1.attn.q_proj": torch.tensor([[1, 1, 1, 1]]),
        "blocks.0.mlp.ml2": torch.tensor([[8, 0, 0, 0, 0, 0, 0, 0]]),
    }
    summary = usage_summary(counts)
    assert list(summary) == ["Q", "ML2"]
    assert summary["Q"]["entropy_ratio"] == pytest.approx(0.75)  # mean over both blocks' tables
    assert summary["Q"]["dead_share"] == pytest.approx(0.25)
    assert summary["Q"]["min_entropy_ratio"] == pytest.approx(0.5)
    assert summary["ML2"]["entropy_ratio"] == 0.0 and summary["ML2"]["dead_share"] == pytest.approx(7 / 8)
    assert summary["ML2"]["uniform_dead_share"] == pytest.approx((7 / 8) ** 8)
    metrics = usage_metrics(counts)
    assert metrics == pytest.approx({"usage_H_qkv": 0.75, "usage_dead_qkv": 0.25, "usage_H_ml2": 0.0,
                                     "usage_dead_ml2": 7 / 8})


def test_names_and_count_rows():
    assert layer_kind("blocks.3.mlp.ml2") == "ML2" and layer_kind("blocks.0.attn.v_proj") == "V"
    assert layer_block("blocks.3.mlp.ml2") == 3 and layer_block("head") is None
    rows = torch.tensor([[0, 4 + 3], [1, 4 + 3], [1, 4 + 0]])  # K = 2 tables of 2**2 buckets
    assert count_rows(rows, 2, 2).tolist() == [[1, 2, 0, 0], [1, 0, 0, 2]]


# ---- counting in a model -------------------------------------------------------------------------


def reference_buckets(z: np.ndarray, tau: int) -> np.ndarray:
    """(N, K * tau) -> (N, K) bucket ids, bit j of a chunk = z_j >= 0, first element most significant."""
    n, width = z.shape
    chunks = z.reshape(n, width // tau, tau)
    out = np.zeros((n, width // tau), dtype=np.int64)
    for j in range(tau):
        out = out * 2 + (chunks[:, :, j] >= 0)
    return out


def test_bucket_counts_match_an_independent_reference():
    model = tiny_mf()
    x = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    captured = {}
    hooks = [model.blocks[0].attn_norm.register_forward_hook(lambda m, a, out: captured.setdefault("q_in", out)),
             model.blocks[1].mlp.norm.register_forward_hook(lambda m, a, out: captured.setdefault("ml2_in", out))]
    counts = bucket_counts(model, [x])
    for h in hooks:
        h.remove()
    layers = memory_layers(model)
    assert set(counts) == set(layers) and len(layers) == 2 * 5
    for name, c in counts.items():
        assert c.shape == (layers[name].num_tables, 2 ** layers[name].tau)
        assert (c.sum(-1) == x.numel()).all()  # one hit per token per table
    # Q, K and V share one hash
    assert torch.equal(counts["blocks.0.attn.q_proj"], counts["blocks.0.attn.k_proj"])
    assert torch.equal(counts["blocks.0.attn.q_proj"], counts["blocks.0.attn.v_proj"])
    for key, name in (("q_in", "blocks.0.attn.q_proj"), ("ml2_in", "blocks.1.mlp.ml2")):
        tau = layers[name].tau
        buckets = reference_buckets(captured[key].reshape(x.numel(), -1).numpy(), tau)
        expected = np.stack([np.bincount(buckets[:, k], minlength=2 ** tau) for k in range(buckets.shape[1])])
        assert counts[name].numpy().tolist() == expected.tolist()


def test_bucket_counter_wraps_any_forward_and_errors():
    model = tiny_mf()
    x = torch.randint(0, 256, (2, 8))
    with BucketCounter(model, ["blocks.1.mlp.ml1"]) as counter:
        with torch.no_grad():
            model(x)
            model(x)
    assert list(counter.counts) == ["blocks.1.mlp.ml1"] and int(counter.counts["blocks.1.mlp.ml1"][0].sum()) == 32
    with torch.no_grad():
        model(x)  # hooks are gone
    assert int(counter.counts["blocks.1.mlp.ml1"][0].sum()) == 32
    with pytest.raises(ValueError, match="no MemoryLayer named"):
        BucketCounter(model, ["blocks.9.mlp.ml1"])
    with pytest.raises(ValueError, match="Pythia"):
        bucket_counts(LanguageModel(ModelConfig.from_preset("pythia-test")), [x], ["blocks.0.mlp.ml1"])


def test_usage_hook_in_training(tmp_path):
    import csv
    import random

    from memoryformer.data import TokenData, prepare
    from memoryformer.research.analysis import usage_hook
    from memoryformer.train import TrainConfig, train

    src = tmp_path / "corpus"
    src.mkdir()
    rng = random.Random(0)
    words = "memory table hash bucket sign chunk layer token".split()
    for d in range(8):
        (src / f"d{d}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(50)))
    prepare([str(src)], tmp_path / "data", vocab_size=300, val_fraction=0.2, block_chars=1000, progress=False)
    data = TokenData(tmp_path / "data")
    tc = TrainConfig(batch_size=2, seq_len=16, max_steps=4, eval_every=2, eval_batches=1, ckpt_every=0,
                     tensorboard=False, device="cpu", precision="fp32")
    res = train(ModelConfig.from_preset("mf-test", vocab_size=300), tc, tmp_path / "data", tmp_path / "run",
                progress=False, verbose=False, on_eval=usage_hook(data, 16, windows=4))
    keys = {f"usage_{a}_{k}" for a in ("H", "dead") for k in ("qkv", "ml1", "ml2")}
    assert [e["step"] for e in res.evals] == [2, 4] and all(keys <= set(e) for e in res.evals)
    assert all(0 < e["usage_H_qkv"] <= 1 and 0 <= e["usage_dead_ml2"] < 1 for e in res.evals)
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r["val_loss"]]
    assert float(rows[-1]["usage_H_ml1"]) == pytest.approx(res.evals[-1]["usage_H_ml1"], rel=1e-5)
    pythia = LanguageModel(ModelConfig.from_preset("pythia-test", vocab_size=300))
    assert usage_hook(data, 16, windows=2)(pythia, 0) == {}


# ---- plots -----------------------------------------------------------------------------------------


def test_plots_are_written(tmp_path):
    model = tiny_mf()
    x = torch.randint(0, 256, (2, 16))
    train_counts = bucket_counts(model, [x])
    val_counts = bucket_counts(model, [x[:, :8]])
    p = plot_bucket_histograms(train_counts, val_counts, tmp_path / "f4.png", block=0)
    assert p.stat().st_size > 20_000
    with pytest.raises(ValueError, match="block 7"):
        plot_bucket_histograms(train_counts, None, tmp_path / "x.png", block=7)
    evals = [{"step": s, "usage_H_qkv": 0.9, "usage_dead_qkv": 0.1, "usage_H_ml2": 0.8, "usage_dead_ml2": 0.2}
             for s in (10, 20)]
    assert plot_usage_during_training({"run": evals}, tmp_path / "u.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="no usage metrics"):
        plot_usage_during_training({"run": [{"step": 1}]}, tmp_path / "u2.png")
    runs = {"a": {"losses": [5.0, 4.0, 3.5], "evals": [{"step": 3, "val_loss": 3.6}]}, "b": {"losses": [5.0, 4.5]}}
    assert plot_loss_curves(runs, tmp_path / "l.png").stat().st_size > 10_000
    rows = [{"name": "a", "val_loss": 3.0}, {"name": "a", "val_loss": 3.2}, {"name": "b", "val_loss": 3.5}]
    assert plot_arms(rows, tmp_path / "b.png", title="t", label="name").stat().st_size > 5_000
    # diverged arms (inf / nan losses), one seed of two or all of them: labelled, not a crash
    rows += [{"name": "c", "val_loss": float("inf")}, {"name": "a", "val_loss": float("nan")}]
    assert plot_arms(rows, tmp_path / "b2.png", title="t", label="name").stat().st_size > 5_000
    gone = [{"name": "x", "val_loss": float("inf")}, {"name": "y", "val_loss": float("nan")}]
    assert plot_arms(gone, tmp_path / "b3.png", title="t", label="name").stat().st_size > 5_000
    sweep = [{"arch": a, "lr": lr, "val_loss": v} for a, lr, v in
             (("MF", 1e-3, 4.0), ("MF", 3e-3, 3.5), ("MF", 3e-3, 3.6), ("twin", 1e-3, 4.1), ("twin", 3e-3, 4.2))]
    assert plot_lr_sweep(sweep, tmp_path / "s.png", title="t", group=lambda r: r["arch"]).stat().st_size > 10_000
    with pytest.raises(ValueError, match="no rows"):
        plot_lr_sweep([], tmp_path / "s2.png", title="t", group=str)
