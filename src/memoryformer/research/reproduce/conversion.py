"""`memoryformer reproduce conversion`: can a MemoryFormer reuse dense pretraining?

The dense teacher is the scaling study's Pythia twin at its best LR at the study's third budget (4M tokens
by default: 4x the tokens each student gets, the study's second budget, 1M). Five models are compared on the same held-out split,
all students at the same extra token budget (1M by default), on the study's data and batch:

| arm | what it is |
|---|---|
| (a) teacher | the dense twin itself |
| (b) converted | `memoryformer convert` of the teacher: tables fitted by least squares, no training |
| (c) converted + distilled | (b) trained for the budget with the teacher's KL (`train --init-from --teacher`) |
| (c0) converted + trained | (b) trained for the budget on cross-entropy only (what the fit alone is worth) |
| (d) from scratch | the study's MemoryFormer at the budget, at its best LR |
| (e) from scratch + distilled | (d)'s model trained from scratch with the teacher's KL |

Students (c) and (e) each get an LR sweep on the study's doubling grid: three points (for (c) one and two
steps below (d)'s optimum and the optimum itself, since a converted model starts near a solution; for (e)
centred on (d)'s optimum), extended while the best sits on an edge. (c0) runs at (c)'s best LR. The
study must have finished its twin sweep at the teacher budget and its MemoryFormer sweep at the student
budget; the experiment says so and stops otherwise. Results: <results>/conversion/conversion.json, .md
and loss_vs_tokens.png.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memoryformer.research.reproduce.registry import Arm, Settings, _lr_tag
from memoryformer.research.reproduce.scaling import (
    MAX_POINTS,
    Planner,
    Series,
    effective_budgets,
    grid_index,
    grid_lr,
    make_arm,
    study_series,
    tokens_tag,
)

CALIBRATION_TOKENS = 32_768


class StudyNotReady(RuntimeError):
    """The scaling study has not finished the sweeps this experiment builds on."""


def study_rows(s: Settings, data: Path) -> list[dict[str, Any]]:
    """The scaling study's finished arms (cached rows only; nothing is trained)."""
    from memoryformer.research.reproduce.runner import _cached_row, arm_dir

    series = study_series(s)
    rows: list[dict[str, Any]] = []
    seen: set[Path] = set()
    while True:
        new = []
        for arm in Planner(s, series, rows).arms():
            path = arm_dir(s, arm, data)
            if path not in seen:
                seen.add(path)
                row = _cached_row(arm, path)
                if row is not None:
                    new.append(row)
        if not new:
            return rows
        rows += new


def best_row(s: Settings, rows: Sequence[dict[str, Any]], key: str, budget: int) -> dict[str, Any]:
    """The study's row at `key`'s settled optimum at `budget` (StudyNotReady while it is not settled)."""
    planner = Planner(s, study_series(s), rows)
    if key not in planner.series or budget not in planner.series[key].budgets:
        raise StudyNotReady(f"the scaling study has no {key} sweep at {tokens_tag(budget)} tokens")
    best = planner.optimum(key, budget)
    if best is None:
        raise StudyNotReady(f"the scaling study's {key} sweep at {tokens_tag(budget)} tokens is not finished: run "
                            "`memoryformer reproduce scaling` with the same --data, --max-bytes and --out first")
    for r in rows:
        lab = r.get("labels") or {}
        if lab.get("series") == key and lab.get("budget") == budget and grid_index(r["lr"]) == best \
                and r["seed"] == s.seeds[0]:
            return r
    raise StudyNotReady(f"no finished {key} arm at {tokens_tag(budget)} tokens and lr {grid_lr(best):g}")


def convert_teacher(teacher_dir: Path, data: Path, out: Path) -> Path:
    """`memoryformer convert TEACHER --data DATA --out OUT` (once; written to a temporary folder, then renamed)."""
    from memoryformer.commands import convert

    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    args = parser.parse_args([str(teacher_dir), "--data", str(data), "--out", str(tmp),
                              "--calibration-tokens", str(CALIBRATION_TOKENS)])
    convert.run(args)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def held_out_loss(run_dir: Path, data: Path, seq_len: int) -> float:
    """A trained or converted model's loss on every held-out window."""
    from memoryformer.data import TokenData
    from memoryformer.train import validation_loss
    from memoryformer.train.checkpoint import load_model

    model, _ = load_model(run_dir)
    return validation_loss(model.eval(), TokenData(data), seq_len, batch_size=16)["loss"]


class ConversionPlan:
    """The students' arms given finished rows: (c) and (e) LR sweeps, then (c0) at (c)'s best LR."""

    def __init__(self, s: Settings, mf: Series, scratch_best: int, budget: int, converted: Path,
                 teacher: Path) -> None:
        self.s, self.mf, self.budget = s, mf, budget
        self.students = {
            "converted+distilled": ([scratch_best - 2, scratch_best - 1, scratch_best],
                                    {"init_from": str(converted), "teacher": str(teacher)}),
            "scratch+distilled": ([scratch_best - 1, scratch_best, scratch_best + 1], {"teacher": str(teacher)}),
        }
        self.after = ("converted+trained", {"init_from": str(converted)}, "converted+distilled")

    def arm(self, key: str, index: int, train: dict[str, Any]) -> Arm:
        base = make_arm(self.s, self.mf, self.budget, index, self.s.seeds[0])
        return Arm(name=f"{key} {tokens_tag(self.budget)} lr {_lr_tag(base.lr)} seed {base.seed}", model=base.model,
                   lr=base.lr, seed=base.seed, steps=base.steps, train=train,
                   labels={"student": key, "budget": self.budget, "arch": "memoryformer"})

    def losses(self, rows: Sequence[dict[str, Any]], key: str) -> dict[int, float]:
        return {grid_index(r["lr"]): (r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf)
                for r in rows if (r.get("labels") or {}).get("student") == key}

    def sweep(self, rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], int | None]:
        points, _ = self.students[key]
        done = self.losses(rows, key)
        while True:
            if any(p not in done for p in points):
                return points, None
            best = min(points, key=lambda p: (done[p], p))
            step = -1 if best == min(points) else 1 if best == max(points) else 0
            if step == 0 or len(points) >= MAX_POINTS:
                return points, best
            points = sorted({*points, best + step})

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[Arm]:
        arms = []
        for key, (_, train) in self.students.items():
            points, _ = self.sweep(rows, key)
            arms += [self.arm(key, p, train) for p in points]
        key, train, source = self.after
        best = self.sweep(rows, source)[1]
        if best is not None:
            arms.append(self.arm(key, best, train))
        return arms


def budgets(s: Settings) -> tuple[int, int]:
    """(teacher, student) token budgets: the study's third and second (4M and 1M by default)."""
    b = effective_budgets(s)
    if len(b) < 3:
        raise ValueError(f"the conversion experiment needs three study budgets, got {', '.join(map(tokens_tag, b))}")
    return b[2], b[1]


def run_conversion(s: Settings) -> dict[str, Any]:
    """Run (or continue) the experiment; write <results>/conversion/."""
    import torch

    from memoryformer.research.reproduce import conversion_report as R
    from memoryformer.research.reproduce.runner import command_line, machine, prepare_data, run_plan

    torch.set_num_threads(s.threads)
    data = prepare_data(s)
    teacher_budget, student_budget = budgets(s)
    rows = study_rows(s, data)
    teacher = best_row(s, rows, "twin", teacher_budget)
    scratch = best_row(s, rows, "MF", student_budget)
    mf = next(x for x in study_series(s) if x.key == "MF")
    teacher_dir = Path(teacher["run_dir"])
    converted = convert_teacher(teacher_dir, data, Path(s.out) / "conversion" / f"converted-{teacher_dir.name}")
    check_same_model(converted, mf.model)
    print(f"== conversion: teacher {teacher['name']} ({teacher['val_loss']:.4f}), students at "
          f"{tokens_tag(student_budget)} tokens; {s.jobs} arm(s) at a time ==", flush=True)
    plan = ConversionPlan(s, mf, grid_index(scratch["lr"]), student_budget, converted, teacher_dir)
    students = run_plan(s, plan, data, jobs=s.jobs, desc="conversion")
    report = R.summarize(plan, teacher, scratch, held_out_loss(converted, data, s.seq_len), students)
    report.update(command=command_line("conversion", s), machine=machine(), converted_dir=str(converted),
                  convert=json.loads((converted / "convert.json").read_text()))
    return R.write(report, Path(s.results) / "conversion")


def check_same_model(converted: Path, model: dict[str, Any]) -> None:
    """The converted model must be the study's MemoryFormer (so --init-from loads it into (d)'s model)."""
    saved = json.loads((converted / "config.json").read_text())
    diff = {k: (saved.get(k), v) for k, v in model.items() if saved.get(k) != v}
    if diff:
        raise ValueError(f"the converted model differs from the study's MemoryFormer in {diff}")
