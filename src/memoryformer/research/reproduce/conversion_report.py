"""The conversion experiment's report: conversion.json, conversion.md and loss_vs_tokens.png."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from memoryformer.research.reproduce.scaling import tokens_tag

LABELS = {
    "teacher": "(a) dense teacher",
    "converted": "(b) converted, no training",
    "converted+distilled": "(c) converted + distilled",
    "converted+trained": "(c0) converted + trained (no teacher)",
    "scratch": "(d) MemoryFormer from scratch",
    "scratch+distilled": "(e) from scratch + distilled",
}


def _curve(row: dict[str, Any]) -> list[list[float]]:
    """[[tokens, held-out loss], ...] of a run's intermediate evaluations, then its final full-split loss."""
    points = [[e["tokens"], e["val_loss"]] for e in row.get("evals", []) if math.isfinite(e.get("val_loss", math.inf))]
    return points + [[row["train_tokens"], row["val_loss"]]]


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


def verdict(models: dict[str, Any], gains: dict[str, float]) -> str:
    """One plain sentence on whether conversion beats training from scratch at equal extra tokens."""
    if "converted+distilled" not in gains:
        return "not finished: the converted + distilled sweep has not run yet"
    g = gains["converted+distilled"]
    tokens = tokens_tag(models["scratch"]["train_tokens"])
    if abs(g) < 0.01:
        return f"conversion + distillation ties training from scratch at {tokens} extra tokens ({g:+.3f} nats)"
    side = "beats" if g > 0 else "loses to"
    return f"conversion + distillation {side} training from scratch at {tokens} extra tokens by {abs(g):.3f} nats"


def format_markdown(report: dict[str, Any]) -> str:
    m = report["models"]
    lines = ["# Dense -> MemoryFormer conversion", "",
             f"Command: `{report['command']}`  ",
             f"Machine: {report['machine'].get('cpu')}, torch {report['machine'].get('torch')}", "",
             f"Teacher trained on {tokens_tag(report['teacher_budget'])} tokens; every student gets "
             f"{tokens_tag(report['student_budget'])} tokens. Held-out loss on every window of the validation split.", "",
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
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in ("converted+distilled", "converted+trained", "scratch", "scratch+distilled"):
        if key in m:
            xs, ys = zip(*m[key]["curve"])
            ax.plot(xs, ys, marker="o", ms=3, label=f"{LABELS[key]} (lr {m[key]['lr']:g})")
    ax.axhline(m["teacher"]["val_loss"], color="k", ls="--", lw=1, label=LABELS["teacher"])
    ax.axhline(m["converted"]["val_loss"], color="grey", ls=":", lw=1, label=LABELS["converted"])
    ax.set_xlabel("training tokens of the student")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_xscale("log")
    top = max(m["converted"]["val_loss"], m["teacher"]["val_loss"]) + 0.5
    ax.set_ylim(min(e["val_loss"] for e in m.values()) - 0.1, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Converting a dense twin into a MemoryFormer")
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
