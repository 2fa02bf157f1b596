"""`memoryformer reproduce scaling`: a token-scaling study of MemoryFormer and its twin, every arm at its
own best LR, with an adaptive plan computed from finished results.

All arms share the data, batch and sequence length; a budget of D tokens is D / (batch x seq) steps with
its own warmup + cosine schedule. The series (docs/results.md has the reasons):

| series | model | budgets | LR |
|---|---|---|---|
| MF, twin | d = d_model, depths[0] layers (128, 2) | all (0.25M, 1M, 4M, 16M) | adaptive sweep; 2 seeds at the largest |
| twin-wide | the twin widened to MF's non-embedding parameters | the first two | adaptive sweep |
| MF-demo, twin-demo | 2 x width, 2 x depth (the demo's 256, 4) | the second and third | adaptive sweep |
| MF-bits0 | MF with 0 expanding bits (Table 5) | the third | MF's best LR there |
| twin-performer, -cosformer, -linformer | the twin with Table 2's attentions | the second | adaptive sweep |

The adaptive sweep works on a doubling grid (1e-3 x 2^k). A series' first budget is swept at three
points centred on its starting LR (or on another series' optimum at that budget); each later budget at
three points centred on the series' previous optimum; while the best point sits on an edge, the sweep
extends past it (at most MAX_POINTS points). At the largest budget of a series with three or more
budgets, only the previous optimum and its neighbour on the side the optimum moved to (or, when it did
not move, the side that was better at the previous budget) are run, extended while the best is the
outermost in that direction. Rerunning the command recomputes the plan from the cached arms and
continues the study. Pending arms start cheapest first (budget x the series' measured seconds per token),
so every question gets a first answer before the long arms run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from memoryformer.core.config import ModelConfig
from memoryformer.research.reproduce.registry import Arm, Settings, _lr_tag, base_model

GRID_BASE = 1e-3  # the LR grid: GRID_BASE * 2**k
MAX_POINTS = 8  # most LRs one sweep may try
# starting LRs of the first budget: near the best of the twin experiment at 0.2M tokens (MF's sat on
# the sweep's upper edge, 4.8e-2; the twin's at 6e-3), on the grid
START_INDEX = {"memoryformer": 5, "pythia": 2}  # 3.2e-2 and 4e-3
TABLE2_ATTENTIONS = ("performer", "cosformer", "linformer")


def grid_lr(index: int) -> float:
    return GRID_BASE * 2.0**index


def grid_index(lr: float) -> int:
    return round(math.log2(lr / GRID_BASE))


def tokens_tag(tokens: int) -> str:
    """250000 -> "0.25M", 4000000 -> "4M", 2048 -> "2048"."""
    if tokens < 100_000:
        return str(tokens)
    return f"{tokens / 1e6:g}M"


@dataclass(frozen=True)
class Series:
    """One model trained at several token budgets, each at its best LR."""

    key: str
    title: str
    model: dict[str, Any]
    budgets: tuple[int, ...]
    start: int | str  # the first budget's sweep centre: a grid index, or the key of a series whose optimum there
    sweep: bool = True  # False: run at `start`'s optimum only (a controlled comparison)
    seeds: int = 1  # seeds at the largest budget (at its best LR)


def effective_budgets(s: Settings) -> tuple[int, ...]:
    """The study's budgets, capped by --max-tokens (capped budgets that coincide merge)."""
    cap = s.max_tokens
    return tuple(sorted({min(b, cap) if cap else b for b in s.budgets}))


def matched_width(s: Settings, target: int) -> tuple[int, int]:
    """(d_model, n_heads) of the twin (same depth, head size) whose non-embedding parameters are nearest `target`."""
    from memoryformer.research.flops import model_breakdown

    head = s.d_model // s.n_heads

    def non_embedding(d: int) -> int:
        b = model_breakdown(ModelConfig.from_dict(base_model(s, architecture="pythia", d_model=d, n_heads=d // head)))
        return b.total.total - b.total.counts["embedding"] - b.total.counts["head"]

    best, d = None, s.d_model
    while True:
        n = non_embedding(d)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (d, n)
        if n >= target:
            return best[0], best[0] // head
        d += head


def non_embedding_parameters(model: dict[str, Any]) -> int:
    from memoryformer.research.flops import model_breakdown

    b = model_breakdown(ModelConfig.from_dict(model))
    return b.total.total - b.total.counts["embedding"] - b.total.counts["head"]


def study_series(s: Settings) -> list[Series]:
    """Every series of the study for these settings (models and budgets; LRs come from the plan)."""
    budgets = effective_budgets(s)
    small, mid = budgets[:2], budgets[1:3] or budgets[-1:]
    one_m = budgets[1:2] or budgets[:1]
    four_m = budgets[2:3] or budgets[-1:]
    mf, twin = base_model(s), base_model(s, architecture="pythia")
    d_wide, heads_wide = matched_width(s, non_embedding_parameters(mf))
    demo = dict(depth=2 * s.depths[0], d_model=2 * s.d_model)
    seeds = min(2, len(s.seeds))
    series = [
        Series("MF", "MemoryFormer", mf, budgets, START_INDEX["memoryformer"], seeds=seeds),
        Series("twin", "Pythia twin", twin, budgets, START_INDEX["pythia"], seeds=seeds),
        Series("twin-wide", f"twin at MF's non-embedding parameters (d {d_wide})",
               base_model(s, architecture="pythia", d_model=d_wide, n_heads=heads_wide), small, "twin"),
        Series("MF-demo", f"MemoryFormer, demo size (d {demo['d_model']}, {demo['depth']} layers)",
               base_model(s, **demo), mid, "MF"),
        Series("twin-demo", f"twin, demo size (d {demo['d_model']}, {demo['depth']} layers)",
               base_model(s, architecture="pythia", **demo), mid, "twin"),
        Series("MF-bits0", "MemoryFormer with 0 expanding bits (Table 5)", base_model(s, expanding_bits=0), four_m,
               "MF", sweep=False),
    ]
    series += [Series(f"twin-{a}", f"twin with {a} attention (Table 2)",
                      base_model(s, architecture="pythia", attention=a), one_m, "twin") for a in TABLE2_ATTENTIONS]
    return series


def steps_for(s: Settings, tokens: int) -> int:
    return max(1, round(tokens / (s.batch_size * s.seq_len)))


def make_arm(s: Settings, series: Series, tokens: int, index: int, seed: int) -> Arm:
    lr = grid_lr(index)
    return Arm(name=f"{series.key} {tokens_tag(tokens)} lr {_lr_tag(lr)} seed {seed}", model=series.model, lr=lr,
               seed=seed, steps=steps_for(s, tokens),
               labels={"series": series.key, "budget": tokens, "arch": series.model["architecture"]})


class Planner:
    """The study's next arms from finished rows: each (series, budget) sweep's points and optimum."""

    def __init__(self, s: Settings, series: Sequence[Series], rows: Sequence[dict[str, Any]]) -> None:
        self.s, self.series = s, {x.key: x for x in series}
        self.losses: dict[tuple[str, int, int, int], float] = {}
        for r in rows:
            lab = r.get("labels") or {}
            if "series" in lab:
                loss = r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf
                self.losses[(lab["series"], lab["budget"], grid_index(r["lr"]), r["seed"])] = loss
        self._memo: dict[tuple[str, int], tuple[list[int], int | None]] = {}
        self._time_per_token(rows)

    def loss(self, key: str, budget: int, index: int) -> float | None:
        return self.losses.get((key, budget, index, self.s.seeds[0]))

    def optimum(self, key: str, budget: int) -> int | None:
        return self.sweep(key, budget)[1]

    def sweep(self, key: str, budget: int) -> tuple[list[int], int | None]:
        """(grid indices to run at seed 0, the optimum's index once the sweep has settled)."""
        if (key, budget) not in self._memo:
            self._memo[(key, budget)] = self._sweep(self.series[key], budget)
        return self._memo[(key, budget)]

    def _start(self, series: Series, i: int) -> list[int] | None:
        """The first points of budget i's sweep (None while what they depend on is unsettled)."""
        b = series.budgets
        if i == 0:
            centre = series.start if isinstance(series.start, int) else self.optimum(series.start, b[0])
            if centre is None:
                return None
            return [centre] if not series.sweep else [centre - 1, centre, centre + 1]
        prev = self.optimum(series.key, b[i - 1])
        if prev is None:
            return None
        if i == len(b) - 1 and len(b) >= 3:  # the largest budget: the optimum and its neighbour on the trend's side
            return [prev, prev + self._trend(series, i)]
        return [prev - 1, prev, prev + 1]

    def _trend(self, series: Series, i: int) -> int:
        """+1 or -1: where the optimum moved from budget i-2 to i-1; if it stayed, the better side at i-1."""
        b = series.budgets
        prev, before = self.optimum(series.key, b[i - 1]), self.optimum(series.key, b[i - 2])
        if prev != before and before is not None:
            return 1 if prev > before else -1
        up, down = self.loss(series.key, b[i - 1], prev + 1), self.loss(series.key, b[i - 1], prev - 1)
        return 1 if (up if up is not None else math.inf) < (down if down is not None else math.inf) else -1

    def _sweep(self, series: Series, budget: int) -> tuple[list[int], int | None]:
        points = self._start(series, series.budgets.index(budget))
        if points is None:
            return [], None
        if not series.sweep:
            return points, points[0]
        trend = points[1] - points[0] if len(points) == 2 else 0
        while True:
            losses = {p: self.loss(series.key, budget, p) for p in points}
            if any(v is None for v in losses.values()):
                return points, None
            best = min(points, key=lambda p: (losses[p], p))
            step = self._extension(points, best, trend)
            if step == 0 or len(points) >= MAX_POINTS:
                return points, best
            points = sorted({*points, best + step})

    @staticmethod
    def _extension(points: Sequence[int], best: int, trend: int) -> int:
        """Where to add a point: past the best when it sits on an edge (only the trend's edge if given)."""
        if trend:
            edge = max(points) if trend > 0 else min(points)
            return trend if best == edge else 0
        if best == min(points):
            return -1
        return 1 if best == max(points) else 0

    def arms(self) -> list[Arm]:
        """Every arm the study needs given the finished rows (finished ones included), the cheapest
        first (`expected_seconds`), so that every question gets its first answer before the long arms run."""
        out = []
        for series in self.series.values():
            for budget in series.budgets:
                points, best = self.sweep(series.key, budget)
                out += [make_arm(self.s, series, budget, p, self.s.seeds[0]) for p in points]
                if best is not None and budget == series.budgets[-1]:
                    out += [make_arm(self.s, series, budget, best, seed) for seed in self.s.seeds[1:series.seeds]]
        return sorted(out, key=self.expected_seconds)  # stable: plan order among equals

    def expected_seconds(self, arm: Arm) -> float:
        """An arm's budget x its series' measured seconds per token (finished arms' training time over
        all the sessions an arm ran in; a series with none yet counts as the slowest measured one)."""
        return arm.labels["budget"] * self.seconds_per_token.get(arm.labels["series"], self.slowest)

    def _time_per_token(self, rows: Sequence[dict[str, Any]]) -> None:
        per: dict[str, list[float]] = {}
        for r in rows:
            lab = r.get("labels") or {}
            seconds = r.get("elapsed_seconds") or r.get("wall_s")  # elapsed: every session of a resumed arm
            if "series" in lab and seconds and r.get("train_tokens") and not r.get("diverged"):
                per.setdefault(lab["series"], []).append(seconds / r["train_tokens"])
        self.seconds_per_token = {k: sum(v) / len(v) for k, v in per.items()}
        self.slowest = max(self.seconds_per_token.values(), default=1.0)


def scaling_plan(s: Settings) -> Callable[[Sequence[dict[str, Any]]], list[Arm]]:
    """The plan `runner.run_plan` asks after every finished arm."""
    series = study_series(s)
    return lambda rows: Planner(s, series, rows).arms()


def run_scaling(s: Settings) -> dict[str, Any]:
    """Run (or continue) the study: arms in `s.jobs` worker processes, results written after each one to
    <results>/scaling/."""
    import torch

    from memoryformer.research.reproduce.runner import command_line, machine, prepare_data, run_plan
    from memoryformer.research.reproduce.scaling_report import ScalingWriter

    torch.set_num_threads(s.threads)
    data = prepare_data(s)
    series = study_series(s)
    print(f"== scaling: token budgets {', '.join(tokens_tag(b) for b in effective_budgets(s))}; "
          f"{s.jobs} arm(s) at a time ==", flush=True)
    writer = ScalingWriter(s, series, data, command=command_line("scaling", s), machine=machine())
    rows = run_plan(s, lambda done: Planner(s, series, done).arms(), data, jobs=s.jobs, desc="scaling",
                    on_row=writer)
    report = writer(rows, final=True)
    print(f"wrote {writer.results / 'scaling.json'} and .md", flush=True)
    return report
