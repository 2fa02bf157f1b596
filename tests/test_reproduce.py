"""The reproduction experiments: the registry's arms are controlled comparisons, the runner trains,
caches and reports on a tiny setting, and the CLI drives it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from memoryformer.cli import main
from memoryformer.core.config import ModelConfig
from memoryformer.research.reproduce.registry import (
    EXPERIMENTS,
    ORDER,
    Settings,
    base_model,
    best_lrs,
    twin_followup,
    width_for_tau,
)
from memoryformer.research.reproduce.runner import arm_dir, data_dir, run_experiment, train_config

# what each ablation may change relative to the reference MemoryFormer (besides the LR for "lr")
VARIES = {
    "tau": {"tau", "d_model", "n_heads"},
    "expanding-bits": {"expanding_bits"},
    "gelu": {"memory_block_activation"},
    "lr": set(),
    "weighting": {"weighting", "temperature"},
    "usage": {"n_layers"},
}


def model_diff(a: dict, b: dict) -> set[str]:
    return {k for k in a if a[k] != b[k]}


@pytest.mark.parametrize("settings", [Settings(), Settings.quick_settings()], ids=["default", "quick"])
def test_registry_arms_are_controlled_comparisons(settings):
    assert list(ORDER) == list(EXPERIMENTS)
    ref = base_model(settings)
    for name in ORDER:
        exp = EXPERIMENTS[name]
        arms = exp.arms(settings)
        assert arms, name
        assert len({a.name for a in arms}) == len(arms), f"{name}: arm names must be unique"
        # the same data, steps, batch, sequence, schedule and seed for every arm; only model and LR vary
        common = []
        for arm in arms:
            ModelConfig.from_dict(arm.model)  # a valid model
            assert arm.seed == settings.seeds[0]
            tc = train_config(settings, arm).to_dict()
            common.append({k: v for k, v in tc.items() if k != "lr"})
            assert arm_dir(settings, arm, data_dir(settings)).parent == arm_dir(settings, arms[0], data_dir(settings)).parent
        assert all(c == common[0] for c in common), name
        if name in VARIES:
            for arm in arms:
                assert model_diff(arm.model, ref) <= VARIES[name], (name, arm.name, model_diff(arm.model, ref))
            if name != "lr":
                assert all(a.lr == settings.reference_lr for a in arms)
        if name not in ("usage",):
            assert len(arms) >= 2
    # the ablations vary what the paper varied
    assert [a.model["expanding_bits"] for a in EXPERIMENTS["expanding-bits"].arms(settings)] == [0, 1, 2, 3]
    assert [a.lr for a in EXPERIMENTS["lr"].arms(settings)] == pytest.approx(
        [m * settings.twin_lr for m in (1, 2, 3, 4)])
    assert sorted(a.model["tau"] for a in EXPERIMENTS["tau"].arms(settings)) == [4, 8, 10]
    assert {a.model["weighting"] for a in EXPERIMENTS["weighting"].arms(settings)} == {"prob", "l1"}
    twin = EXPERIMENTS["twin"].arms(settings)
    for depth in settings.depths:  # both architectures at every LR of the sweep, same shape
        for arch in ("memoryformer", "pythia"):
            lrs = [a.lr for a in twin if a.model["architecture"] == arch and a.model["n_layers"] == depth]
            assert lrs == list(settings.lr_sweep)
    assert {a.lr for a in twin if a.model["architecture"] == "memoryformer"} >= {settings.reference_lr}
    assert {a.lr for a in twin if a.model["architecture"] == "pythia"} >= {settings.twin_lr}


def test_reference_arm_is_shared_between_experiments():
    """The reference MemoryFormer appears in several ablations with one run directory (trained once)."""
    s = Settings()
    dirs = {}
    for name in ("tau", "expanding-bits", "gelu", "lr", "weighting", "usage", "twin"):
        for arm in EXPERIMENTS[name].arms(s):
            if arm.model == base_model(s) and arm.lr == s.reference_lr and arm.seed == s.seeds[0]:
                dirs[name] = arm_dir(s, arm, data_dir(s))
    assert set(dirs) == {"tau", "expanding-bits", "gelu", "lr", "weighting", "usage", "twin"}
    assert len(set(dirs.values())) == 1


def test_paper_deltas_are_log_ppl_ratios():
    import math

    from memoryformer.research.reproduce.report import paper_deltas

    tau = paper_deltas("tau")
    assert tau["8"] == 0.0 and tau["10"] == pytest.approx(math.log(18.67 / 18.82))
    assert paper_deltas("lr")["1"] == pytest.approx(math.log(19.86 / 18.82))
    assert paper_deltas("expanding-bits")["0"] == pytest.approx(math.log(19.89 / 18.82))
    assert paper_deltas("gelu") is None and paper_deltas("twin") is None


def test_lr_tags():
    from memoryformer.research.reproduce.registry import _lr_tag

    assert [_lr_tag(x) for x in (1e-3, 3e-3, 6e-3, 1.2e-2, 0.5)] == ["1e-3", "3e-3", "6e-3", "1.2e-2", "5e-1"]


def test_width_for_tau():
    assert width_for_tau(128, 4, 8) == (128, 4)
    assert width_for_tau(128, 4, 10) == (130, 5)  # nearest multiple of 10; head size 26, rotary 6
    assert width_for_tau(512, 8, 10) == (510, 10)  # the paper's d = 510
    d, heads = width_for_tau(32, 4, 10)
    assert d % 10 == 0 and d % heads == 0
    ModelConfig(d_model=d, n_heads=heads, tau=10)  # valid


def test_twin_followup_repeats_the_headline_arms():
    s = Settings(seeds=(0, 1, 2), depths=(2, 4))
    arms = EXPERIMENTS["twin"].arms(s)
    losses = {("memoryformer", 1e-3): 5.0, ("memoryformer", 3e-3): 4.8, ("memoryformer", 6e-3): 4.7,
              ("memoryformer", 1.2e-2): 4.75, ("pythia", 1e-3): 5.1, ("pythia", 3e-3): 4.9, ("pythia", 6e-3): 5.3,
              ("pythia", 1.2e-2): 5.6, ("memoryformer", 2.4e-2): 4.9, ("pythia", 2.4e-2): 6.0,
              ("memoryformer", 4.8e-2): 5.9, ("pythia", 4.8e-2): 7.0}
    rows = [{"seed": a.seed, "lr": a.lr, "labels": a.labels, "val_loss": losses[(a.model["architecture"], a.lr)]}
            for a in arms]
    assert best_lrs(rows, 0) == {("memoryformer", 2): 6e-3, ("pythia", 2): 3e-3, ("memoryformer", 4): 6e-3,
                                 ("pythia", 4): 3e-3}
    more = twin_followup(s, rows)
    got = {(a.model["architecture"], a.lr, a.seed) for a in more}
    assert got == {(arch, lr, seed) for arch, lr in (("memoryformer", 3e-3), ("memoryformer", 6e-3),
                                                     ("pythia", 1e-3), ("pythia", 3e-3)) for seed in (1, 2)}
    assert all(a.model["n_layers"] == 2 for a in more)
    assert twin_followup(Settings(seeds=(0,)), rows) == []


def test_settings_errors():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        Settings(steps=0)
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment("table9", Settings.quick_settings())


# ---- the runner on a tiny setting ----------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the memory table hash layer token model bucket sign chunk query key value".split()
    for d in range(10):
        lines = (" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) + "." for _ in range(80))
        (root / f"doc{d}.txt").write_text("\n".join(lines))
    return root


def tiny_settings(tmp_path, corpus, **changes) -> Settings:
    return Settings.quick_settings(data=[str(corpus)], out=str(tmp_path / "runs"), results=str(tmp_path / "results"),
                                   steps=3, seq_len=16, vocab_size=300, usage_windows=2, figure4_windows=4,
                                   command="--quick", **changes)


def test_runner_trains_caches_and_reports(tmp_path, corpus, monkeypatch):
    s = tiny_settings(tmp_path, corpus)
    report = run_experiment("gelu", s)
    rows = report["rows"]
    assert [r["name"] for r in rows] == ["no activation", "GeLU"]
    for r in rows:  # same tokens, same held-out split, every number present
        assert r["train_tokens"] == 3 * s.batch_size * s.seq_len and r["steps"] == 3
        assert r["val_tokens"] == rows[0]["val_tokens"] > 0
        assert 1 < r["val_ppl"] < 300 and r["forward_flops_per_token"] > 0 and r["table_mb_fp16"] > 0
        assert r["parameters"] > r["non_embedding_parameters"] > 0 and r["train_tokens_per_s"] > 0
        assert set(r["usage_val"]) == {"Q", "K", "V", "ML1", "ML2"}
    assert rows[0]["val_loss"] != rows[1]["val_loss"]  # the GeLU changed something
    assert report["summary"]["reference"] == "no activation"
    assert report["summary"]["delta_val_loss"]["no activation"] == 0.0
    results = tmp_path / "results"
    saved = json.loads((results / "gelu.json").read_text())
    assert saved["rows"][1]["val_loss"] == rows[1]["val_loss"] and saved["machine"]["cores"] >= 1
    md = (results / "gelu.md").read_text()
    assert "memoryformer reproduce gelu --quick" in md and "0.402" not in md  # no paper PPL column for Table 6
    assert (results / "gelu.png").stat().st_size > 5_000

    # a second run reuses the finished arms (no training), and the usage experiment reuses the reference
    import memoryformer.train

    def no_training(*args, **kwargs):
        raise AssertionError("a cached arm was trained again")

    monkeypatch.setattr(memoryformer.train, "train", no_training)
    again = run_experiment("gelu", s)
    assert [r["val_loss"] for r in again["rows"]] == [r["val_loss"] for r in rows]
    usage = run_experiment("usage", s)
    assert usage["rows"][0]["val_loss"] == rows[0]["val_loss"]
    for name in ("figure4.png", "usage_training.png"):
        assert (results / name).stat().st_size > 10_000
    stats = json.loads((results / "usage_stats.json").read_text())
    for split in ("train", "val"):
        q = stats["summary"][split]["Q"]
        assert 0 < q["entropy_ratio"] <= 1 and 0 <= q["dead_share"] < 1
        assert q["hits_per_table"] == s.figure4_windows * s.seq_len


def test_runner_twin_and_cli(tmp_path, corpus, capsys):
    args = ["reproduce", "twin", "--quick", "--data", str(corpus), "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"), "--steps", "2", "--seeds", "0", "1", "--vocab-size", "300"]
    assert main([*args, "--list"]) == 0
    listed = capsys.readouterr().out
    assert "MF L1 lr 3e-3 seed 0" in listed and "twin L1 lr 1e-3 seed 0" in listed and "seeds 1" in listed
    assert main(args) == 0
    report = json.loads((tmp_path / "results" / "twin.json").read_text())
    rows = report["rows"]
    assert {r["architecture"] for r in rows} == {"memoryformer", "pythia"}
    assert {r["seed"] for r in rows} == {0, 1}
    assert len({r["train_tokens"] for r in rows}) == 1
    assert all(("usage_val" in r) == (r["architecture"] == "memoryformer") for r in rows)
    mf = next(r for r in rows if r["architecture"] == "memoryformer")
    tw = next(r for r in rows if r["architecture"] == "pythia")
    assert mf["forward_flops_per_token"] < tw["forward_flops_per_token"]
    gaps = report["summary"]["L1"]
    assert gaps["paper_style"]["seeds"] == [0, 1] and gaps["paper_style"]["gap"] == pytest.approx(
        sum(gaps["paper_style"]["gap_per_seed"]) / 2)
    assert report["command"].startswith("memoryformer reproduce twin --quick --data")
    for name in ("twin.png", "twin_loss_L1.png", "figure1.png"):
        assert (tmp_path / "results" / name).stat().st_size > 10_000
    assert main(["reproduce", "gelu", "--quick", "--steps", "0", "--out", str(tmp_path / "x")]) == 1
    assert "steps must be >= 1" in capsys.readouterr().err


# ---- the full-scale recipes ------------------------------------------------------------------------


def test_full_scale_configs_are_the_papers_runs():
    from pathlib import Path

    from memoryformer.core.config import PAPER_PAIRS
    from memoryformer.train import TrainConfig

    root = Path(__file__).resolve().parents[1] / "experiments" / "full_scale"
    pairs = json.loads((root / "pairs.json").read_text())
    assert pairs == PAPER_PAIRS
    for mf, twin in pairs.items():
        for name in (mf, twin):
            assert ModelConfig.from_json(root / "configs" / f"{name}.json") == ModelConfig.from_preset(name)
        # MemoryFormer: the official configs' schedule by default, Pythia's as a named alternative
        schedules = {mf: (106_418, 0.01), f"{mf}-pythia-schedule": (143_000, 0.1), twin: (143_000, 0.1)}
        for name, (steps, floor) in schedules.items():
            tc = TrainConfig.from_json(root / "train" / f"{name}.json")
            assert tc.batch_size * tc.grad_accum * 8 == 1024  # global batch on one 8-GPU node
            assert (tc.seq_len, tc.max_steps, tc.warmup_frac, tc.min_lr_ratio) == (2048, steps, 0.01, floor)
            assert (tc.weight_decay, tc.betas, tc.grad_clip, tc.precision) == (0.1, (0.9, 0.95), 1.0, "bf16")
        mf_fields = json.loads((root / "configs" / f"{mf}.json").read_text())
        assert not {"parallel_residual", "attention_bias", "intermediate_size", "attention"} & set(mf_fields)
        mf_lr = TrainConfig.from_json(root / "train" / f"{mf}.json").lr
        twin_lr = TrainConfig.from_json(root / "train" / f"{twin}.json").lr
        assert mf_lr == pytest.approx(3 * twin_lr)  # the paper's rule
    assert TrainConfig.from_json(root / "train" / "pythia-70m.json").lr == 1e-3
    assert TrainConfig.from_json(root / "train" / "mf-base.json").fsdp


def test_parallel_arms_fill_every_slot_after_a_cached_arm(tmp_path, monkeypatch):
    """With 2 jobs, a cached arm must not take a worker's slot: it is reported first (so the results
    written hold every finished arm), and the two other arms run at the same time (each waits at a
    barrier for the other)."""
    import concurrent.futures
    import threading

    from memoryformer.research.reproduce import runner
    from memoryformer.research.reproduce.registry import Arm, Settings, base_model

    s = Settings.quick_settings(out=str(tmp_path / "runs"))
    data = tmp_path / "data"
    arms = [Arm(name=f"arm {i}", model=base_model(s), lr=1e-3 * (i + 1), seed=0) for i in range(3)]
    arms = arms[1:] + arms[:1]  # the cached arm last in the plan
    cached = runner.arm_dir(s, arms[-1], data)
    cached.mkdir(parents=True)
    fields = {"val_ppl": 3.0, "train_tokens_per_s": 1.0, "wall_s": 1.0}
    (cached / "arm.json").write_text(json.dumps({"name": "arm 0", "val_loss": 1.0, "run_dir": str(cached), **fields}))
    barrier = threading.Barrier(2, timeout=10)

    def job(settings, arm, data_dir):
        barrier.wait()  # raises BrokenBarrierError unless the other arm runs too
        return {"name": arm.name, "val_loss": 2.0, "run_dir": str(runner.arm_dir(s, arm, Path(data_dir))), **fields}

    class Pool(concurrent.futures.ThreadPoolExecutor):
        def __init__(self, max_workers, mp_context=None, initializer=None, initargs=()):
            super().__init__(max_workers=max_workers)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(runner, "_run_arm_job", job)
    rows = runner.run_plan(s, lambda done: arms, data, jobs=2)
    assert rows[0]["name"] == "arm 0" and sorted(r["name"] for r in rows) == ["arm 0", "arm 1", "arm 2"]
