"""The token-scaling study: the power-law fit against known curves, the adaptive LR plan on synthetic
results, the report on synthetic rows, and the whole machinery on a tiny setting (worker processes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memoryformer.research.analysis import fit_power_law, power_law
from memoryformer.research.reproduce.registry import Settings
from memoryformer.research.reproduce.scaling import (
    MAX_POINTS,
    Planner,
    effective_budgets,
    grid_index,
    grid_lr,
    non_embedding_parameters,
    steps_for,
    study_series,
)

# ---- the power-law fit -----------------------------------------------------------------------------


@pytest.mark.parametrize("e,a,alpha", [(1.7, 2.3, 0.35), (3.0, 0.8, 0.9), (0.5, 5.0, 0.12)])
def test_fit_recovers_an_exact_power_law(e, a, alpha):
    tokens = [2.5e5, 1e6, 4e6, 1.6e7, 6.4e7]
    losses = [e + a * (t / 1e6) ** -alpha for t in tokens]
    fit = fit_power_law(tokens, losses)
    assert fit["E"] == pytest.approx(e, abs=1e-6) and fit["A"] == pytest.approx(a, rel=1e-6)
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-6)
    assert max(abs(r) for r in fit["residuals"]) < 1e-8 and fit["dof"] == 2
    assert power_law(fit, 1e8) == pytest.approx(e + a * 100**-alpha, rel=1e-8)


def test_fit_is_least_squares_on_noisy_points():
    """No small change of the fitted parameters lowers the squared error (a float64 check)."""
    tokens = [2.5e5, 1e6, 4e6, 1.6e7]
    losses = [4.9, 4.31, 3.95, 3.78]
    fit = fit_power_law(tokens, losses)

    def sse(e, a, alpha):
        return sum((y - (e + a * (t / 1e6) ** -alpha)) ** 2 for t, y in zip(tokens, losses))

    best = sse(fit["E"], fit["A"], fit["alpha"])
    assert best == pytest.approx(sum(r * r for r in fit["residuals"]), rel=1e-9)
    for de, da, dal in [(1e-3, 0, 0), (-1e-3, 0, 0), (0, 1e-3, 0), (0, -1e-3, 0), (0, 0, 1e-3), (0, 0, -1e-3)]:
        assert sse(fit["E"] + de, fit["A"] + da, fit["alpha"] + dal) >= best - 1e-12
    assert fit["dof"] == 1


def test_fit_needs_three_points():
    assert fit_power_law([1e6, 4e6], [4.0, 3.8]) is None
    with pytest.raises(ValueError, match="3 token counts but 2 losses"):
        fit_power_law([1, 2, 3], [1, 2])


# ---- the adaptive plan on synthetic results ------------------------------------------------------------

B = (250_000, 1_000_000, 4_000_000, 16_000_000)
# the grid index of the best LR of each (series, budget): MF's optimum falls with tokens (and starts
# two points above its first sweep's centre, so that sweep must extend), the twin's stays put
TRUE_OPT = {"MF": dict(zip(B, (7, 6, 5, 4))), "twin": dict(zip(B, (2, 2, 2, 2)))}
POWER = {"MF": (2.0, 1.1, 0.3), "twin": (2.2, 1.0, 0.25)}  # E, A, alpha of the best-LR losses


def true_opt(series: str, budget: int) -> int:
    return TRUE_OPT.get(series, {}).get(budget, 3)


def fake_loss(series: str, budget: int, index: int) -> float:
    if series == "twin-performer" and index >= 4:
        return math.inf  # diverged
    e, a, alpha = POWER.get(series, (2.5, 1.0, 0.2))
    d = index - true_opt(series, budget)
    return e + a * (budget / 1e6) ** -alpha + 0.05 * d * d + 0.01 * d  # the lower side is the better one


def fake_row(arm) -> dict:
    lab = arm.labels
    return {"name": arm.name, "labels": lab, "lr": arm.lr, "seed": arm.seed, "run_dir": f"/runs/{arm.name}",
            "val_loss": fake_loss(lab["series"], lab["budget"], grid_index(arm.lr)), "train_tokens": lab["budget"],
            "forward_flops_per_token": 1e6, "training_flops_per_token": 3e6, "elapsed_seconds": lab["budget"] / 1e4,
            "non_embedding_parameters": 1000,
            "usage_val": {k: {"dead_share": 1e5 / lab["budget"], "entropy_ratio": 0.9} for k in ("Q", "ML1", "ML2")}
            if lab["arch"] == "memoryformer" else None}


def simulate(s: Settings):
    series = study_series(s)
    rows: list[dict] = []
    for _ in range(100):
        done = {r["name"] for r in rows}
        todo = [a for a in Planner(s, series, rows).arms() if a.name not in done]
        if not todo:
            return series, rows, Planner(s, series, rows)
        rows += [fake_row(a) for a in todo]
    raise AssertionError("the plan never settled")


@pytest.fixture(scope="module")
def study():
    return simulate(Settings())


def sweep_indices(rows, series: str, budget: int, seed: int = 0) -> list[int]:
    return sorted(grid_index(r["lr"]) for r in rows
                  if r["labels"]["series"] == series and r["labels"]["budget"] == budget and r["seed"] == seed)


def test_plan_finds_every_optimum_and_extends_off_edges(study):
    series, rows, planner = study
    for x in series:
        for b in x.budgets:
            want = planner.optimum("MF", b) if x.key == "MF-bits0" else true_opt(x.key, b)
            assert planner.optimum(x.key, b) == want, (x.key, b)
    # MF's first sweep starts at 4, 5, 6 and extends upward past each best edge point up to 8
    assert sweep_indices(rows, "MF", B[0]) == [4, 5, 6, 7, 8]
    assert len(sweep_indices(rows, "MF", B[0])) <= MAX_POINTS
    # the diverged LR ranks last and the sweep stops there
    assert sweep_indices(rows, "twin-performer", B[1]) == [1, 2, 3, 4]


def test_each_budget_is_centred_on_the_previous_optimum(study):
    series, rows, planner = study
    for x in series:
        for i, b in enumerate(x.budgets):
            got = sweep_indices(rows, x.key, b)
            if not x.sweep:
                assert got == [planner.optimum(x.start, b)]
                continue
            if i == 0:
                centre = x.start if isinstance(x.start, int) else planner.optimum(x.start, b)
            else:
                centre = planner.optimum(x.key, x.budgets[i - 1])
            if i == len(x.budgets) - 1 and len(x.budgets) >= 3:
                continue  # the largest budget: the trend rule below
            assert {centre - 1, centre, centre + 1} <= set(got), (x.key, b, got)


def test_largest_budget_runs_the_previous_optimum_and_its_neighbour_on_the_trend_side(study):
    series, rows, planner = study
    # MF's optimum fell from 6 to 5 between 1M and 4M: at 16M run 5 and 4 (not 6)
    assert sweep_indices(rows, "MF", B[3]) == [3, 4, 5]  # 4 won on the trend's edge: extended to 3
    # the twin's stayed at 2: the better side at 4M was the lower one
    assert sweep_indices(rows, "twin", B[3]) == [1, 2]
    for key in ("MF", "twin"):  # 2 seeds at the largest budget for both best arms
        assert sweep_indices(rows, key, B[3], seed=1) == [planner.optimum(key, B[3])]


def test_study_series_are_what_the_study_compares():
    s = Settings()
    by_key = {x.key: x for x in study_series(s)}
    assert by_key["MF"].budgets == by_key["twin"].budgets == B
    mf, twin = by_key["MF"].model, by_key["twin"].model
    assert (mf["d_model"], mf["n_layers"], twin["architecture"]) == (128, 2, "pythia")
    assert {k for k in mf if mf[k] != twin[k]} == {"architecture"}
    wide = by_key["twin-wide"]
    assert wide.budgets == B[:2] and wide.model["d_model"] > 128 and wide.model["n_layers"] == 2
    target = non_embedding_parameters(mf)
    assert abs(non_embedding_parameters(wide.model) - target) / target < 0.05
    for key in ("MF-demo", "twin-demo"):
        assert by_key[key].budgets == B[1:3]
        assert (by_key[key].model["d_model"], by_key[key].model["n_layers"]) == (256, 4)
    assert by_key["MF-bits0"].model["expanding_bits"] == 0 and by_key["MF-bits0"].budgets == (B[2],)
    for a in ("performer", "cosformer", "linformer"):
        assert by_key[f"twin-{a}"].model["attention"] == a and by_key[f"twin-{a}"].budgets == (B[1],)
    assert steps_for(s, 1_000_000) == round(1_000_000 / 1024)
    assert grid_lr(grid_index(3.2e-2)) == pytest.approx(3.2e-2)
    assert effective_budgets(Settings(max_tokens=2_000_000)) == (250_000, 1_000_000, 2_000_000)


# ---- the report on synthetic results ---------------------------------------------------------------


def test_report_fits_the_best_arms_and_predicts_the_gap(study, tmp_path):
    from memoryformer.research.reproduce.scaling_report import ScalingWriter, summarize

    series, rows, planner = study
    summary = summarize(series, planner, rows)
    for key, (e, a, alpha) in POWER.items():
        fit = summary["fits"][key]
        assert (fit["E"], fit["A"], fit["alpha"]) == pytest.approx((e, a, alpha), rel=1e-5)
    (ea, aa, la), (et, at, lt) = POWER["MF"], POWER["twin"]
    want = (ea + aa * 100**-la) - (et + at * 100**-lt)
    assert summary["gap_at_100M"]["gap"] == pytest.approx(want, rel=1e-4)
    assert summary["gap_at_100M"]["dof"] == 1 and "1 degree(s) of freedom" in summary["trust"]
    assert summary["best_lr"]["MF"] == [[b, grid_lr(true_opt("MF", b))] for b in B]
    usage = summary["usage"]["MF"]["Q"]
    assert [p["tokens"] for p in usage] == list(B) and usage[0]["dead_share"] == pytest.approx(0.4)
    comp = summary["comparisons"]
    assert comp["expanding_bits"]["tokens"] == B[2] and set(comp["attention"]) == {"performer", "cosformer",
                                                                                      "linformer"}
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"source": "synthetic", "train_tokens": 10**6, "val_tokens": 10**4,
                                                "files_sha256": "abc", "files": ["x"] * 1000}))
    s = Settings(results=str(tmp_path / "results"))
    machine = {"cpu": "test", "cores": 1, "torch": "x", "torch_threads": 1, "platform": "p"}
    report = ScalingWriter(s, series, data, command="memoryformer reproduce scaling", machine=machine)(rows, final=True)
    assert report["complete"] and report["data"]["files_sha256"] == "abc" and "files" not in report["data"]
    md = (tmp_path / "results" / "scaling" / "scaling.md").read_text()
    assert "predicted at 100M tokens" in md and "| MF | 16M | 16.00 |" in md and "26.1" in md
    saved = json.loads((tmp_path / "results" / "scaling" / "scaling.json").read_text())
    assert saved["summary"]["fits"]["MF"]["alpha"] == pytest.approx(0.3, rel=1e-5)
    for name in ("loss_vs_tokens", "loss_vs_flops", "loss_vs_cpu_time", "best_lr", "usage_vs_tokens"):
        assert (tmp_path / "results" / "scaling" / f"{name}.png").stat().st_size > 5_000


def test_report_of_the_first_arm_draws_without_warnings(study, tmp_path):
    """The report is rewritten after every arm: with one arm finished no plot has a line yet, and none
    may warn (matplotlib's empty-legend warning used to print three times per arm)."""
    import warnings

    from memoryformer.research.reproduce.scaling_report import plot_all, summarize

    series, rows, planner = study
    first = rows[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = plot_all(summarize(series, Planner(Settings(), series, first), first), tmp_path)
    assert paths and all(p.stat().st_size > 1_000 for p in paths)


# ---- the machinery on a tiny setting, without matplotlib, then with it -----------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the memory table hash layer token model bucket sign chunk query key value".split()
    for d in range(10):
        lines = (" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) + "." for _ in range(80))
        (root / f"doc{d}.txt").write_text("\n".join(lines))
    return root


def test_quick_study_in_worker_processes_without_matplotlib_then_reused(tmp_path, corpus, monkeypatch, capsys):
    """--quick trains every arm of the plan (two worker processes) with matplotlib unimportable: one
    warning line, JSON and Markdown written, no plot; a second run reuses every arm and draws the plots."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), str(src)])}
    args = ["reproduce", "scaling", "--quick", "--data", str(corpus), "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"), "--vocab-size", "300", "--seq-len", "16",
            "--budgets", "256", "512", "1024"]
    proc = subprocess.run([sys.executable, "-m", "memoryformer.cli", *args, "--jobs", "2"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "matplotlib is not installed" in line]
    assert len(warnings) == 1 and "pip install 'memoryformer[plot]'" in warnings[0]
    assert "Traceback" not in proc.stderr
    out = tmp_path / "results" / "scaling"
    report = json.loads((out / "scaling.json").read_text())
    assert report["complete"] and report["pending_arms"] == 0 and not list(out.glob("*.png"))
    assert report["plots_skipped"].startswith("matplotlib is not installed")
    rows = report["rows"]
    assert len(rows) >= 40 and {r["labels"]["series"] for r in rows} >= {"MF", "twin", "twin-wide", "MF-bits0"}
    assert all(r["steps"] == r["labels"]["budget"] // (2 * 16) for r in rows)
    assert report["data"]["train_tokens"] > 0 and "source" in report["data"]
    assert " val loss " in proc.stdout + proc.stderr  # a line per finished arm: name, loss, time
    assert "- Plots: skipped" in (out / "scaling.md").read_text()

    import memoryformer.train
    from memoryformer.cli import main

    def no_training(*a, **k):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(memoryformer.train, "train", no_training)
    assert main([*args, "--jobs", "1"]) == 0
    again = json.loads((out / "scaling.json").read_text())
    assert {r["name"]: r["val_loss"] for r in again["rows"]} == {r["name"]: r["val_loss"] for r in rows}
    assert (out / "loss_vs_tokens.png").stat().st_size > 5_000


def test_reproduce_without_matplotlib_writes_json_and_markdown(tmp_path, corpus, monkeypatch, capsys):
    """Any experiment's plots skip with one warning line when matplotlib is missing (in-process)."""
    from memoryformer.cli import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr("memoryformer.research.analysis._warned", set())
    assert main(["reproduce", "gelu", "--quick", "--data", str(corpus), "--out", str(tmp_path / "runs"),
                 "--results", str(tmp_path / "results"), "--steps", "2", "--vocab-size", "300"]) == 0
    err = capsys.readouterr().err
    assert err.count("matplotlib is not installed") == 1 and "memoryformer[plot]" in err
    assert (tmp_path / "results" / "gelu.json").is_file() and (tmp_path / "results" / "gelu.md").is_file()
    assert not (tmp_path / "results" / "gelu.png").exists()
    assert main(["flops", "--plot", str(tmp_path / "f1.png")]) == 0
    assert "skipping Figure 1" in capsys.readouterr().err and not (tmp_path / "f1.png").exists()
    from memoryformer.research.analysis import plot_arms

    with pytest.raises(ImportError, match="memoryformer\\[plot\\]"):
        plot_arms([], tmp_path / "x.png", title="x")


def test_bad_settings_are_one_clear_error(capsys):
    from memoryformer.cli import main

    with pytest.raises(ValueError, match="jobs must be >= 1"):
        Settings(jobs=0)
    with pytest.raises(ValueError, match="budgets must be positive"):
        Settings(budgets=(0, 1000))
    with pytest.raises(ValueError, match="max_tokens must be at least one step"):
        Settings(max_tokens=10)
    assert main(["reproduce", "scaling", "--jobs", "0", "--list"]) == 1
    assert "jobs must be >= 1" in capsys.readouterr().err


def test_list_prints_the_series_and_first_arms(capsys):
    from memoryformer.cli import main

    assert main(["reproduce", "scaling", "--list", "--max-tokens", "4000000"]) == 0
    out = capsys.readouterr().out
    assert "twin-wide: twin at MF's non-embedding parameters (d 608)" in out
    assert "budgets 0.25M, 1M, 4M\n" in out and "MF 0.25M lr 3.2e-2 seed 0" in out and "twin 0.25M lr 4e-3" in out


def test_conversion_experiment_on_a_quick_study(tmp_path, corpus, capsys, monkeypatch):
    """`reproduce conversion` refuses (one line) before the study has its sweeps, then builds on a quick
    study: the teacher is the twin's best arm at the third budget, (c) starts from the converted teacher
    and distils from it, (e) distils from scratch, and a rerun trains nothing."""
    from memoryformer.cli import main

    common = ["--quick", "--data", str(corpus), "--out", str(tmp_path / "runs"), "--results",
              str(tmp_path / "results"), "--vocab-size", "300", "--seq-len", "16", "--budgets", "256", "512", "1024"]
    assert main(["reproduce", "conversion", *common]) == 1
    err = capsys.readouterr().err
    assert "sweep at 1024 tokens is not finished" in err and "Traceback" not in err
    assert main(["reproduce", "scaling", *common, "--jobs", "1"]) == 0
    assert main(["reproduce", "conversion", *common, "--jobs", "1"]) == 0
    report = json.loads((tmp_path / "results" / "conversion" / "conversion.json").read_text())
    models = report["models"]
    assert set(models) == {"teacher", "converted", "scratch", "converted+distilled", "scratch+distilled",
                           "converted+trained"}
    assert models["teacher"]["train_tokens"] == 1024 and models["scratch"]["train_tokens"] == 512
    assert len(models["converted+distilled"]["sweep"]) >= 3 and len(models["scratch+distilled"]["sweep"]) >= 3
    conf = json.loads((Path(models["converted+distilled"]["run_dir"]) / "train_config.json").read_text())
    assert conf["init_from"] == report["converted_dir"] and conf["teacher"] == models["teacher"]["run_dir"]
    conf = json.loads((Path(models["scratch+distilled"]["run_dir"]) / "train_config.json").read_text())
    assert conf["init_from"] is None and conf["teacher"] == models["teacher"]["run_dir"]
    assert math.isfinite(models["converted"]["val_loss"])
    gain = models["scratch"]["val_loss"] - models["converted+distilled"]["val_loss"]
    assert report["gain_over_scratch_nats"]["converted+distilled"] == pytest.approx(gain)
    assert report["verdict"].startswith("conversion + distillation")
    md = (tmp_path / "results" / "conversion" / "conversion.md").read_text()
    assert "(b) converted, no training" in md and "**Verdict:**" in md
    assert (tmp_path / "results" / "conversion" / "loss_vs_tokens.png").stat().st_size > 5_000

    import memoryformer.train

    def no_training(*a, **k):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(memoryformer.train, "train", no_training)
    assert main(["reproduce", "conversion", *common, "--jobs", "1"]) == 0


def test_pending_arms_run_cheapest_first():
    """Arms come out in order of budget x their series' measured seconds per token; a series with no
    finished arm counts as the slowest measured one."""
    s = Settings()
    series = study_series(s)
    first = Planner(s, series, []).arms()
    rows = []
    for arm in first:
        row = fake_row(arm)
        row["elapsed_seconds"] = arm.labels["budget"] * (1e-3 if arm.labels["series"] == "MF" else 5e-3)
        row["wall_s"] = row["elapsed_seconds"]
        rows.append(row)
    planner = Planner(s, series, rows)
    pending = [a for a in planner.arms() if a.name not in {r["name"] for r in rows}]
    costs = [planner.expected_seconds(a) for a in pending]
    assert costs == sorted(costs) and len(set(costs)) > 1
    assert planner.seconds_per_token == {"MF": pytest.approx(1e-3), "twin": pytest.approx(5e-3)}
    resumed = {**rows[0], "wall_s": 1.0}  # a resumed arm's wall_s counts its last session only
    assert Planner(s, series, [resumed, *rows[1:]]).seconds_per_token == planner.seconds_per_token
    unmeasured = next(a for a in pending if a.labels["series"] not in ("MF", "twin"))
    assert planner.expected_seconds(unmeasured) == pytest.approx(unmeasured.labels["budget"] * 5e-3)


def test_conversion_plot_with_diverged_arms(tmp_path):
    """A student that diverged has val loss inf (or nan): the plot labels it and scales its axis from the
    finite losses instead of failing ('Axis limits cannot be NaN or Inf'), also when every arm diverged."""
    from memoryformer.research.reproduce.conversion_report import plot

    def arm(loss, curve=((256, 3.0), (512, 2.5))):
        return {"val_loss": loss, "lr": 0.03, "curve": [list(c) for c in curve]}

    models = {"teacher": arm(1.56), "converted": arm(5.0), "converted+distilled": arm(float("inf")),
              "converted+trained": arm(float("nan"), ((256, float("nan")),)), "scratch": arm(1.6),
              "scratch+distilled": arm(1.58)}
    assert plot({"models": models}, tmp_path / "some.png").stat().st_size > 0
    everything = {k: arm(float("inf")) for k in models}
    assert plot({"models": everything}, tmp_path / "none.png").stat().st_size > 0
