"""The conversion experiment's report: conversion.json, conversion.md and loss_vs_tokens.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

LABELS = {
    "teacher": "(a) dense teacher",
    "converted": "(b) converted, no training",
    "converted+distilled": "(c) converted + distilled",
    "converted+trained": "(c0) converted + trained (no teacher)",
    "scratch": "(d) MemoryFormer from scratch",
    "scratch+distilled": "(e) from scratch + distilled",
}


def _curve(row: dict[str, Any]) -> list[list[float]]:
    """[[tokens, loss], ...] of a run's intermediate evaluations (a few held-out batches each, so on
    another sample than the final full-split loss, and not comparable with it)."""
    return [[e["tokens"], e["val_loss"]] for e in row.get("evals", []) if math.isfinite(e.get("val_loss", math.inf))]


def _entry(row: dict[str, Any], sweep: dict[str, float] | None = None) -> dict[str, Any]:
    out = {"name": row["name"], "lr": row["lr"], "val_loss": row["val_loss"], "train_tokens": row["train_tokens"],
           "run_dir": row["run_dir"], "curve": _curve(row), "wall_s": row.get("wall_s")}
    if sweep is not None:
        out["sweep"] = sweep
    return out


def summarize(plan, teacher: dict[str, Any], scratch: dict[str, Any], converted_loss: float,
              students: list[dict[str, Any]]) -> dict[str, Any]:
    """Every model's held-out loss (each student at its best LR, with its sweep) and the verdict numbers."""
    models: dict[str, Any] = {
        "teacher": {"name": teacher["name"], "lr": teacher["lr"], "val_loss": teacher["val_loss"],
                    "train_tokens": teacher["train_tokens"], "run_dir": teacher["run_dir"]},
        "converted": {"val_loss": converted_loss, "train_tokens": 0},
        "scratch": _entry(scratch),
    }
    for key in ("converted+distilled", "scratch+distilled", "converted+trained"):
        mine = [r for r in students if (r.get("labels") or {}).get("student") == key]
        if mine:
            best = min(mine, key=lambda r: r["val_loss"])
            models[key] = _entry(best, {f"{r['lr']:g}": r["val_loss"] for r in sorted(mine, key=lambda r: r["lr"])})
    scratch_loss = scratch["val_loss"]
    gains = {key: scratch_loss - models[key]["val_loss"] for key in ("converted+distilled", "scratch+distilled",
                                                                     "converted+trained") if key in models}
    return {"teacher_budget": teacher["train_tokens"], "student_budget": scratch["train_tokens"],
            "models": models, "gain_over_scratch_nats": gains, "verdict": verdict(models, gains)}


def _tokens(n: int) -> str:
    """1000448 -> "1M" (a budget rounded to 3 digits, as runs take whole steps)."""
    return f"{n / 1e6:.3g}M"


def verdict(models: dict[str, Any], gains: dict[str, float]) -> str:
    """Plain sentences: does conversion + distillation beat training from scratch at equal extra tokens,
    and does it beat distilling into a model trained from scratch (is the gain the conversion's)?"""
    if "converted+distilled" not in gains:
        return "not finished: the converted + distilled sweep has not run yet"
    tokens = _tokens(models["scratch"]["train_tokens"])

    def side(gain: float) -> str:
        return "ties" if abs(gain) < 0.01 else f"{'beats' if gain > 0 else 'loses to'}"

    g = gains["converted+distilled"]
    text = (f"conversion + distillation {side(g)} training from scratch at {tokens} extra tokens "
            f"({abs(g):.3f} nats)")
    if "scratch+distilled" in models:
        over_e = models["scratch+distilled"]["val_loss"] - models["converted+distilled"]["val_loss"]
        text += (f", and {side(over_e)} training from scratch with the same teacher ({abs(over_e):.3f} nats): "
                 + ("the conversion adds to what the teacher gives" if over_e >= 0.01 else
                    "the gain is the teacher's, not the conversion's"))
    return text


def format_markdown(report: dict[str, Any]) -> str:
    m = report["models"]
    lines = ["# Dense -> MemoryFormer conversion", "",
             f"Command: `{report['command']}`  ",
             f"Machine: {report['machine'].get('cpu')}, torch {report['machine'].get('torch')}", "",
             f"Teacher trained on {_tokens(report['teacher_budget'])} tokens; every student gets "
             f"{_tokens(report['student_budget'])} tokens. Held-out loss on every window of the validation split.", "",
             "| model | best LR | held-out loss | vs (d) from scratch | LR sweep |", "|---|---|---|---|---|"]
    scratch = m["scratch"]["val_loss"]
    for key, label in LABELS.items():
        if key not in m:
            continue
        e = m[key]
        sweep = ", ".join(f"{lr}: {v:.3f}" for lr, v in e.get("sweep", {}).items())
        lr = f"{e['lr']:g}" if "lr" in e else ""
        lines.append(f"| {label} | {lr} | {e['val_loss']:.4f} | {e['val_loss'] - scratch:+.4f} | {sweep} |")
    lines += ["", f"**Verdict:** {report['verdict']}.", "", "![loss against tokens](loss_vs_tokens.png)"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> Path | None:
    """Held-out loss against training tokens of (c), (c0), (d), (e), with (a) and (b) as levels."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipped loss_vs_tokens.png (pip install matplotlib)", flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["models"]
    fig, (ax, end) = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    keys = [k for k in ("converted+distilled", "converted+trained", "scratch", "scratch+distilled") if k in m]
    # a diverged arm's loss is inf (or nan): no bar, a label, and the axis from the finite losses
    finite = [v for v in (m[k]["val_loss"] for k in [*keys, "teacher"]) if math.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    for i, key in enumerate(keys):
        if m[key]["curve"]:
            xs, ys = zip(*m[key]["curve"])
            ax.plot(xs, ys, marker="o", ms=3, color=f"C{i}", label=f"{LABELS[key]} (lr {m[key]['lr']:g})")
        loss = m[key]["val_loss"]
        if math.isfinite(loss):
            end.barh(i, loss, color=f"C{i}")
            end.text(loss, i, f" {loss:.3f}", va="center", fontsize=8)
        else:
            end.text(low - 0.2, i, " diverged", va="center", fontsize=8, color=f"C{i}")
    ax.set_xlabel("training tokens of the student")
    ax.set_ylabel("loss on a few held-out batches (nats/token)")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("During training (evaluation batches)", fontsize=10)
    if math.isfinite(m["teacher"]["val_loss"]):
        end.axvline(m["teacher"]["val_loss"], color="k", ls="--", lw=1,
                    label=f"{LABELS['teacher']} {m['teacher']['val_loss']:.3f}")
    end.set_yticks(range(len(keys)), [LABELS[k].split(") ")[0] + ")" for k in keys])
    end.set_xlim(low - 0.2, high + 0.25)
    end.set_xlabel("full held-out split, end of training (nats/token)")
    if math.isfinite(m["teacher"]["val_loss"]):  # the teacher's line is the legend's one entry
        end.legend(fontsize=7, loc="lower right")
    end.set_title(f"End ({LABELS['converted']}: {m['converted']['val_loss']:.2f})", fontsize=10)
    fig.suptitle("Converting a dense twin into a MemoryFormer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(report: dict[str, Any], results: Path) -> dict[str, Any]:
    """conversion.json, conversion.md and loss_vs_tokens.png under `results` (atomic writes)."""
    from memoryformer.train.checkpoint import atomic_write_text

    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / "conversion.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(results / "conversion.md", format_markdown(report))
    plot(report, results / "loss_vs_tokens.png")
    print(f"wrote {results / 'conversion.json'} and .md: {report['verdict']}", flush=True)
    return report
