"""The scaling study's results: per series, the best-LR arm at each budget; power-law fits and the
predicted MemoryFormer-minus-twin gap at 100M tokens; loss against training FLOPs and CPU time; best
LR against budget; bucket usage against tokens; Table 5 and Table 2 comparisons. JSON and Markdown
always, PNG plots with matplotlib."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memoryformer.research.analysis import KIND_ORDER, fit_power_law, legend, power_law
from memoryformer.research.reproduce.registry import _lr_tag
from memoryformer.research.reproduce.scaling import Planner, Series, tokens_tag

PREDICT_AT = 100_000_000  # tokens at which the fitted gap is predicted


def training_flops(row: dict[str, Any]) -> float:
    """Training FLOPs of an arm: structural count (2 per multiply-add, head included) x 3 for forward and
    backward, times its tokens."""
    per_token = row.get("training_flops_per_token") or 3 * row["forward_flops_per_token"]
    return per_token * row["train_tokens"]


def _point(row: dict[str, Any], seeds: list[dict[str, Any]]) -> dict[str, Any]:
    losses = [r["val_loss"] for r in seeds]
    return {"tokens": row["labels"]["budget"], "lr": row["lr"], "val_loss": row["val_loss"],
            "seed_losses": {str(r["seed"]): r["val_loss"] for r in seeds},
            "mean_val_loss": sum(losses) / len(losses), "training_flops": training_flops(row),
            "cpu_seconds": row.get("elapsed_seconds") or row.get("wall_s"), "arm": row["name"],
            "usage": row.get("usage_val"), "non_embedding_parameters": row.get("non_embedding_parameters")}


def series_curves(series: Sequence[Series], planner: Planner, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """key -> the settled budgets' best-LR points (tokens ascending) and each budget's sweep."""
    out: dict[str, Any] = {}
    seed0 = planner.s.seeds[0]
    for x in series:
        points, sweeps = [], {}
        for budget in x.budgets:
            mine = [r for r in rows if r["labels"].get("series") == x.key and r["labels"].get("budget") == budget]
            sweeps[str(budget)] = {_lr_tag(r["lr"]): r["val_loss"] for r in mine if r["seed"] == seed0}
            best = planner.optimum(x.key, budget)
            row = next((r for r in mine if r["seed"] == seed0 and round(math.log2(r["lr"] / 1e-3)) == best), None)
            if row is not None:
                points.append(_point(row, [r for r in mine if r["lr"] == row["lr"]]))
        out[x.key] = {"title": x.title, "architecture": x.model["architecture"], "points": points, "sweeps": sweeps}
    return out


def fits(curves: dict[str, Any]) -> dict[str, Any]:
    """A power-law fit per series with three or more settled budgets (mean over seeds where there are two)."""
    out = {}
    for key, c in curves.items():
        if not all(math.isfinite(p["mean_val_loss"]) for p in c["points"]):
            continue  # a diverged best arm: no curve to fit
        fit = fit_power_law([p["tokens"] for p in c["points"]], [p["mean_val_loss"] for p in c["points"]])
        if fit is not None:
            out[key] = {**fit, "predicted_loss_at_100M": power_law(fit, PREDICT_AT)}
    return out


def gap_at_100m(curves: dict[str, Any], fitted: dict[str, Any]) -> dict[str, Any] | None:
    """MemoryFormer minus twin at 100M tokens from the two fits, and how far it can be trusted."""
    if "MF" not in fitted or "twin" not in fitted:
        return None
    mf, tw = fitted["MF"], fitted["twin"]
    largest = max(p["tokens"] for p in curves["MF"]["points"])
    spreads = [abs(a - b) for key in ("MF", "twin") for p in curves[key]["points"] if len(p["seed_losses"]) > 1
               for a, b in [list(p["seed_losses"].values())[:2]]]
    measured = {p["tokens"]: p["mean_val_loss"] for p in curves["MF"]["points"]}
    twin = {p["tokens"]: p["mean_val_loss"] for p in curves["twin"]["points"]}
    return {"tokens": PREDICT_AT, "gap": mf["predicted_loss_at_100M"] - tw["predicted_loss_at_100M"],
            "measured_gap": {str(t): measured[t] - twin[t] for t in sorted(set(measured) & set(twin))},
            "extrapolation_factor": PREDICT_AT / largest, "dof": min(mf["dof"], tw["dof"]),
            "rms_residual": max(mf["rms_residual"], tw["rms_residual"]),
            "seed_spread": max(spreads) if spreads else None}


def trust_statement(gap: dict[str, Any] | None) -> str:
    """An honest sentence on how far the 100M prediction can be trusted."""
    if gap is None:
        return "No fit yet: a power law needs three settled budgets of both MemoryFormer and its twin."
    parts = [f"Each fit has {gap['dof']} degree(s) of freedom (three parameters through "
             f"{gap['dof'] + 3} budgets), so it can describe these points but hardly test the power-law form;",
             f"100M tokens is {gap['extrapolation_factor']:.0f}x past the largest budget, where E (the asymptote) "
             "dominates and is the least constrained parameter;",
             f"the residuals reach {gap['rms_residual']:.4f} nats RMS"]
    if gap["seed_spread"] is not None:
        parts.append(f"and two seeds differ by up to {gap['seed_spread']:.4f} nats")
    verdict = ("so read the predicted gap as the direction the measured gaps trend in, not as a number"
               if gap["dof"] <= 1 or gap["extrapolation_factor"] > 3 else "so the prediction is a fair guide")
    return " ".join(parts) + "; " + verdict + ". The data repeat once budgets exceed the corpus (see the epochs column)."


def usage_against_tokens(curves: dict[str, Any]) -> dict[str, Any]:
    """MemoryFormer series: per layer kind, (tokens, share of buckets never hit, entropy / log 2^tau)."""
    out = {}
    for key, c in curves.items():
        if c["architecture"] != "memoryformer":
            continue
        out[key] = {kind: [{"tokens": p["tokens"], "dead_share": p["usage"][kind]["dead_share"],
                            "entropy_ratio": p["usage"][kind]["entropy_ratio"]}
                           for p in c["points"] if p["usage"] and kind in p["usage"]] for kind in KIND_ORDER}
    return out


def comparisons(curves: dict[str, Any]) -> dict[str, Any]:
    """Table 5 (0 against 2 expanding bits) and Table 2 (each attention against softmax) at their budgets."""
    def at(key: str, tokens: int) -> float | None:
        return next((p["mean_val_loss"] for p in curves.get(key, {}).get("points", []) if p["tokens"] == tokens), None)

    out: dict[str, Any] = {"expanding_bits": None, "attention": {}}
    bits0 = curves.get("MF-bits0", {}).get("points", [])
    if bits0:
        t = bits0[0]["tokens"]
        out["expanding_bits"] = {"tokens": t, "bits0": bits0[0]["val_loss"], "bits2": at("MF", t)}
    for key, c in curves.items():
        if key.startswith("twin-") and key not in ("twin-wide", "twin-demo") and c["points"]:
            t = c["points"][0]["tokens"]
            out["attention"][key.removeprefix("twin-")] = {"tokens": t, "val_loss": c["points"][0]["val_loss"],
                                                          "softmax_val_loss": at("twin", t)}
    return out


def best_lr_against_budget(curves: dict[str, Any]) -> dict[str, list[list[float]]]:
    return {key: [[p["tokens"], p["lr"]] for p in c["points"]] for key, c in curves.items() if len(c["points"]) > 1}


def summarize(series: Sequence[Series], planner: Planner, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    from memoryformer.research.flops import table2_flops

    curves = series_curves(series, planner, rows)
    fitted = fits(curves)
    gap = gap_at_100m(curves, fitted)
    return {"curves": curves, "fits": fitted, "gap_at_100M": gap, "trust": trust_statement(gap),
            "best_lr": best_lr_against_budget(curves), "usage": usage_against_tokens(curves),
            "comparisons": comparisons(curves), "table2_flops": table2_flops()}


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _curve_lines(summary: dict[str, Any], train_tokens: int | None) -> list[str]:
    lines = ["| series | tokens | epochs | best LR | held-out loss (seeds) | training FLOPs | CPU s | LRs tried "
             "(loss) |", "|---|---|---|---|---|---|---|---|"]
    for key, c in summary["curves"].items():
        for p in c["points"]:
            seeds = ", ".join(f"{v:.4f}" for v in p["seed_losses"].values())
            epochs = f"{p['tokens'] / train_tokens:.2f}" if train_tokens else ""
            sweep = ", ".join(f"{lr} ({v:.3f})" for lr, v in sorted(
                c["sweeps"][str(p["tokens"])].items(), key=lambda kv: float(kv[0])))
            cpu = f"{p['cpu_seconds']:,.0f}" if p["cpu_seconds"] else ""
            lines.append(f"| {key} | {tokens_tag(p['tokens'])} | {epochs} | {_lr_tag(p['lr'])} | {seeds} | "
                         f"{p['training_flops']:.3g} | {cpu} | {sweep} |")
    return lines


def _fit_lines(summary: dict[str, Any]) -> list[str]:
    lines = ["", "## Fits: L(D) = E + A (D / 1M tokens)^(-alpha)", ""]
    if not summary["fits"]:
        return lines + ["No series has three settled budgets yet."]
    lines += ["| series | E | A | alpha | residuals (nats) | predicted loss at 100M |", "|---|---|---|---|---|---|"]
    for key, f in summary["fits"].items():
        res = ", ".join(f"{r:+.4f}" for r in f["residuals"])
        lines.append(f"| {key} | {f['E']:.4f} | {f['A']:.4g} | {f['alpha']:.3f} | {res} | "
                     f"{f['predicted_loss_at_100M']:.4f} |")
    gap = summary["gap_at_100M"]
    if gap is not None:
        measured = ", ".join(f"{tokens_tag(int(t))}: {g:+.4f}" for t, g in gap["measured_gap"].items())
        lines += ["", f"MemoryFormer minus twin: measured {measured}; predicted at 100M tokens {gap['gap']:+.4f} nats "
                      "(negative: MemoryFormer better)."]
    return lines + ["", summary["trust"]]


def _comparison_lines(summary: dict[str, Any]) -> list[str]:
    comp, lines = summary["comparisons"], ["", "## Controlled comparisons", ""]
    bits = comp["expanding_bits"]
    if bits and bits["bits2"] is not None:
        lines.append(f"- Expanding bits (Table 5), {tokens_tag(bits['tokens'])} tokens at MF's best LR: 0 bits "
                     f"{bits['bits0']:.4f}, 2 bits {bits['bits2']:.4f} ({bits['bits0'] - bits['bits2']:+.4f}; the "
                     "paper: 19.89 against 18.82 PPL, +0.055 nats).")
    flops = summary["table2_flops"]["rows"]
    lines += ["", "Table 2's attentions in the twin (each at its best LR), and FLOPs of one Pythia-410M block "
              "(s = 2048, d = 1024, 1 multiply-add = 1 FLOP; ours from the structural formulas):", "",
              "| attention | held-out loss | softmax twin | difference | block GFLOPs (ours) | paper |",
              "|---|---|---|---|---|---|"]
    twin_at = next(iter(comp["attention"].values()), {}).get("softmax_val_loss")
    for kind, row in flops.items():
        got = comp["attention"].get(kind, {"val_loss": twin_at} if kind == "softmax" else {})
        loss = got.get("val_loss")
        ref = got.get("softmax_val_loss")
        diff = f"{loss - ref:+.4f}" if loss is not None and ref is not None else ""
        lines.append(f"| {kind} | {'' if loss is None else f'{loss:.4f}'} | {'' if ref is None else f'{ref:.4f}'} | "
                     f"{diff} | {row['block_gflops']:.1f} | {row['paper_block_gflops']} |")
    return lines


def format_markdown(report: dict[str, Any]) -> str:
    from memoryformer.research.reproduce.report import how_it_was_run

    summary = report["summary"]
    s = report["settings"]
    lines = ["# Token scaling: MemoryFormer against its twin, each at its best LR", "",
             "Does MemoryFormer's advantage at equal tokens grow, hold or shrink with more tokens, and where "
             "does it point at 100M tokens?", "",
             f"{report['finished_arms']} arms finished{' (the study is complete)' if report['complete'] else ''}"
             f"; {report['pending_arms']} more planned from these results.", ""]
    lines += _curve_lines(summary, report["data"].get("train_tokens"))
    lines += _fit_lines(summary) + _comparison_lines(summary)
    every = (f"its token budget of {s['batch_size']} x {s['seq_len']}-token steps with its own schedule, "
             "its own best LR (docs/results.md, \"Token scaling\")")
    return "\n".join(lines + how_it_was_run(report, every_arm=every))


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _loglog(ax, title: str, xlabel: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out loss (nats)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    legend(ax, fontsize=7)


def _plot_loss(summary: dict[str, Any], path: Path, x: str, xlabel: str, fitted: bool) -> Path:
    from memoryformer.research.analysis import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for key, c in summary["curves"].items():
        pts = [p for p in c["points"] if p.get(x)]
        if not pts:
            continue
        line, = ax.plot([p[x] for p in pts], [p["mean_val_loss"] for p in pts], "o-", label=key)
        fit = summary["fits"].get(key) if fitted else None
        if fit is not None:
            xs = [pts[0]["tokens"] * (PREDICT_AT / pts[0]["tokens"]) ** (i / 40) for i in range(41)]
            ax.plot(xs, [power_law(fit, t) for t in xs], ":", color=line.get_color(), alpha=0.7)
    _loglog(ax, f"Held-out loss against {xlabel}" + (" (dotted: fits to 100M)" if fitted else ""), xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_best_lr(summary: dict[str, Any], path: Path) -> Path:
    from memoryformer.research.analysis import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, pts in summary["best_lr"].items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=key)
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("best peak LR")
    ax.set_title("Best LR against token budget")
    ax.grid(True, which="both", alpha=0.3)
    legend(ax, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_usage(summary: dict[str, Any], path: Path) -> Path:
    from memoryformer.research.analysis import _pyplot

    plt = _pyplot()
    fig, (dead, ent) = plt.subplots(1, 2, figsize=(10, 4.2))
    for key, kinds in summary["usage"].items():
        for kind, pts in kinds.items():
            if pts:
                tokens = [p["tokens"] for p in pts]
                dead.plot(tokens, [p["dead_share"] for p in pts], "o-", label=f"{key} {kind}")
                ent.plot(tokens, [p["entropy_ratio"] for p in pts], "o-", label=f"{key} {kind}")
    for ax, label in ((dead, "share of buckets never hit"), (ent, "usage entropy / log 2^tau")):
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        legend(ax, fontsize=6)
    fig.suptitle("Bucket usage on held-out text against tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(summary: dict[str, Any], results: Path) -> list[Path]:
    return [_plot_loss(summary, results / "loss_vs_tokens.png", "tokens", "training tokens", True),
            _plot_loss(summary, results / "loss_vs_flops.png", "training_flops", "training FLOPs", False),
            _plot_loss(summary, results / "loss_vs_cpu_time.png", "cpu_seconds", "CPU seconds (one thread)", False),
            _plot_best_lr(summary, results / "best_lr.png"), _plot_usage(summary, results / "usage_vs_tokens.png")]


# ---------------------------------------------------------------------------------------------
# Writing the results as arms finish
# ---------------------------------------------------------------------------------------------


class ScalingWriter:
    """Called after every finished arm: writes <results>/scaling/scaling.json and .md (atomically), and the
    plots at most every `plot_every_s` seconds and at the end (matplotlib permitting)."""

    def __init__(self, s, series: Sequence[Series], data: Path, *, command: str, machine: dict[str, Any],
                 plot_every_s: float = 120.0) -> None:
        self.s, self.series, self.data = s, list(series), data
        self.command, self.machine, self.plot_every_s = command, machine, plot_every_s
        self.results = Path(s.results) / "scaling"
        self._last_plot: float | None = None
        self.plots: list[str] = []
        self.plots_skipped: str | None = None

    def __call__(self, rows: Sequence[dict[str, Any]], *, final: bool = False) -> dict[str, Any]:
        import time

        from memoryformer.research.reproduce.report import draw_plots, write_json
        from memoryformer.research.reproduce.runner import data_fingerprint
        from memoryformer.train.checkpoint import atomic_write_text

        self.results.mkdir(parents=True, exist_ok=True)
        planner = Planner(self.s, self.series, rows)
        done = {r["name"] for r in rows}
        pending = [a.name for a in planner.arms() if a.name not in done]
        summary = summarize(self.series, planner, rows)
        now = time.monotonic()
        if final or (not self.s.quick and (self._last_plot is None or now - self._last_plot >= self.plot_every_s)):
            self._last_plot = now
            self.plots, self.plots_skipped = draw_plots(lambda: plot_all(summary, self.results))
        report = {
            "experiment": "scaling", "command": self.command, "machine": self.machine, "settings": self.s.to_dict(),
            "data": data_fingerprint(self.data), "finished_arms": len(rows), "pending_arms": len(pending),
            "pending": pending, "complete": final and not pending,
            "series": [{"key": x.key, "title": x.title, "budgets": list(x.budgets), "start": x.start,
                        "sweep": x.sweep, "seeds": x.seeds, "model": x.model} for x in self.series],
            "summary": summary, "rows": [{k: v for k, v in r.items() if k not in ("evals", "data")} for r in rows],
            "plots": self.plots, "plots_skipped": self.plots_skipped,
        }
        write_json(self.results / "scaling.json", report)
        atomic_write_text(self.results / "scaling.md", format_markdown(report) + "\n")
        return report
