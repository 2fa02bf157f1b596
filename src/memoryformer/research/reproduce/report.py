"""What an experiment writes: its summary numbers, Markdown, JSON and plots.

JSON and Markdown are always written (atomically); the plots need matplotlib (the `plot` extra) and
are skipped with a one-line warning without it.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from memoryformer.research.paper import PAPER_RESULTS
from memoryformer.research.reproduce.registry import (
    ARCH_LABEL,
    EXPERIMENTS,
    Experiment,
    Settings,
    _lr_tag,
    base_model,
    best_lrs,
)

# ---------------------------------------------------------------------------------------------
# Summaries (the numbers the Markdown and docs/results.md quote)
# ---------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


PAPER_KEYS = {"tau": ("tau", 8), "expanding-bits": ("bits", 2), "lr": ("multiple", 3)}


def paper_deltas(name: str) -> dict[str, float] | None:
    """The paper's val PPL of each setting as a loss difference to its reference setting (tau 8,
    2 expanding bits, 3x LR): ln(PPL / PPL_ref) nats, comparable with our "vs reference" column."""
    paper = (PAPER_RESULTS.get(name) or {}).get("val_ppl")
    if not paper or name not in PAPER_KEYS:
        return None
    ref = paper[PAPER_KEYS[name][1]]
    return {str(k): math.log(v / ref) for k, v in paper.items()}


def _is_reference(s: Settings, r: dict[str, Any]) -> bool:
    ref = base_model(s)
    return (r["architecture"] == "memoryformer" and r["lr"] == s.reference_lr and r["seed"] == s.seeds[0]
            and all(r.get(k) == ref[k] for k in ("tau", "expanding_bits", "weighting", "d_model", "n_layers"))
            and r.get("temperature") == ref["temperature"] and r.get("activation") == "none")


def _reference_summary(s: Settings, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each arm's held-out loss minus the reference arm's (tau 8, 2 bits, prob t=1, no act., 3x LR)."""
    ref = next((r for r in rows if _is_reference(s, r)), None)
    if ref is None:
        return {"reference": None}
    return {"reference": ref["name"], "reference_val_loss": ref["val_loss"],
            "delta_val_loss": {r["name"]: r["val_loss"] - ref["val_loss"] for r in rows},
            "best": min(rows, key=lambda r: r["val_loss"])["name"]}


def _twin_summary(s: Settings, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per depth: the sweep, each architecture's best LR, and the paper-style and fair gaps
    (MF minus twin held-out loss; negative = MemoryFormer better), averaged over the seeds both
    arms of a pair have."""
    out: dict[str, Any] = {}
    best = best_lrs(rows, s.seeds[0])

    def losses(arch: str, depth: int, lr: float) -> dict[int, float]:
        return {r["seed"]: r["val_loss"] for r in rows
                if r["architecture"] == arch and r["n_layers"] == depth and r["lr"] == lr}

    def gap(mf: dict[int, float], tw: dict[int, float]) -> dict[str, Any]:
        seeds = sorted(set(mf) & set(tw))
        diffs = [mf[i] - tw[i] for i in seeds]
        return {"seeds": seeds, "mf_val_loss": _mean([mf[i] for i in seeds]) if seeds else None,
                "twin_val_loss": _mean([tw[i] for i in seeds]) if seeds else None,
                "gap": _mean(diffs) if diffs else None, "gap_per_seed": diffs}

    for depth in s.depths:
        mf_best, tw_best = best.get(("memoryformer", depth)), best.get(("pythia", depth))
        sweep = {ARCH_LABEL[a]: {_lr_tag(lr): losses(a, depth, lr).get(s.seeds[0]) for lr in s.lr_sweep}
                 for a in ("memoryformer", "pythia")}
        entry: dict[str, Any] = {
            "sweep_val_loss_seed0": sweep, "best_lr": {"MF": mf_best, "twin": tw_best},
            "paper_style": {"mf_lr": s.reference_lr, "twin_lr": s.twin_lr,
                            **gap(losses("memoryformer", depth, s.reference_lr), losses("pythia", depth, s.twin_lr))},
        }
        if mf_best is not None and tw_best is not None:
            entry["fair"] = {"mf_lr": mf_best, "twin_lr": tw_best,
                             **gap(losses("memoryformer", depth, mf_best), losses("pythia", depth, tw_best))}
            entry["same_lr_3x"] = {"lr": s.reference_lr, **gap(losses("memoryformer", depth, s.reference_lr),
                                                              losses("pythia", depth, s.reference_lr))}
        sample = next(r for r in rows if r["n_layers"] == depth and r["architecture"] == "memoryformer")
        twin = next(r for r in rows if r["n_layers"] == depth and r["architecture"] == "pythia")
        entry["cost"] = {k: {"MF": sample[k], "twin": twin[k]} for k in (
            "parameters", "non_embedding_parameters", "forward_flops_per_token", "block_flops_paper",
            "block_flops_paper_with_attention", "table_mb_fp16")}
        out[f"L{depth}"] = entry
    return out


def _usage_summary(s: Settings, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"arm": rows[0]["name"], "val_loss": rows[0]["val_loss"]}


SUMMARIES: dict[str, Callable[[Settings, Sequence[dict[str, Any]]], dict[str, Any]]] = {
    "twin": _twin_summary, "usage": _usage_summary,
}


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _history(row: dict[str, Any]) -> dict[str, Any]:
    path = Path(row["run_dir"]) / "history.json"
    return json.loads(path.read_text()) if path.is_file() else {"losses": [], "evals": row.get("evals", [])}


def _plot_bars(s: Settings, name: str, rows: Sequence[dict[str, Any]], results: Path, data: Path,
               **_: Any) -> list[Path]:
    from memoryformer.research.analysis import plot_arms

    exp = EXPERIMENTS[name]
    return [plot_arms(rows, results / f"{name}.png", label="name",
                      title=f"{exp.paper}: {exp.title} (held-out loss, same tokens)")]


def _plot_twin(s: Settings, name: str, rows: Sequence[dict[str, Any]], results: Path, data: Path,
               **_: Any) -> list[Path]:
    from memoryformer.research.analysis import plot_loss_curves, plot_lr_sweep
    from memoryformer.research.flops import plot_figure1

    paths = [plot_lr_sweep(rows, results / "twin.png", group=lambda r: f"{ARCH_LABEL[r['architecture']]}, "
                           f"{r['n_layers']} layers", title="MemoryFormer vs Pythia twin: held-out loss against LR "
                           "(star: best; dots: seeds)")]
    best = best_lrs(rows, s.seeds[0])
    for depth in s.depths:
        pick: dict[tuple[str, float], list[str]] = {("memoryformer", s.reference_lr): ["3x twin LR (paper)"],
                                                     ("pythia", s.twin_lr): ["Pythia LR (paper)"]}
        for arch in ("memoryformer", "pythia"):
            if (arch, depth) in best:
                pick.setdefault((arch, best[(arch, depth)]), []).append("best LR")
        runs: dict[str, Any] = {}
        for (arch, lr), what in sorted(pick.items()):
            row = next((r for r in rows if r["architecture"] == arch and r["n_layers"] == depth and r["lr"] == lr
                        and r["seed"] == s.seeds[0]), None)
            if row is not None:
                runs[f"{ARCH_LABEL[arch]} lr {_lr_tag(lr)}, {' = '.join(what)}"] = {
                    **_history(row), "final_val_loss": row["val_loss"]}
        paths.append(plot_loss_curves(runs, results / f"twin_loss_L{depth}.png",
                                      title=f"MemoryFormer vs Pythia twin, {depth} layers, d {s.d_model}, same tokens"))
    paths.append(Path(plot_figure1(str(results / "figure1.png"))))
    return paths


def usage_stats(s: Settings, rows: Sequence[dict[str, Any]], results: Path, data: Path) -> dict[str, Any]:
    """Figure 4's bucket counts of the reference arm on training and held-out text; writes
    <results>/usage_stats.json and returns the counts by split (for the plots)."""
    from memoryformer.data import TokenData
    from memoryformer.research.analysis import bucket_counts, data_windows, dead_share, entropy, usage_summary
    from memoryformer.train.checkpoint import atomic_write_text, load_model

    row = rows[0]
    model, _ = load_model(row["run_dir"])
    tokens = TokenData(data)
    counts = {split: bucket_counts(model, data_windows(tokens, split, s.seq_len, s.figure4_windows))
              for split in ("train", "val")}
    stats = {split: usage_summary(c) for split, c in counts.items()}
    per_table = {split: {n: {"entropy": [round(v, 5) for v in entropy(c).tolist()],
                             "dead_share": dead_share(c).tolist()} for n, c in cs.items() if n.startswith("blocks.0.")}
                 for split, cs in counts.items()}
    atomic_write_text(results / "usage_stats.json", json.dumps(
        {"arm": row["name"], "windows": s.figure4_windows, "seq_len": s.seq_len, "summary": stats,
         "block0_tables": per_table}, indent=1) + "\n")
    row["usage"] = stats
    return counts


def _plot_usage(s: Settings, name: str, rows: Sequence[dict[str, Any]], results: Path, data: Path, *,
                counts: dict[str, Any]) -> list[Path]:
    """Figure 4 of the reference arm (train and held-out text, `counts` from usage_stats) and usage
    during training."""
    from memoryformer.research.analysis import plot_bucket_histograms, plot_usage_during_training

    paths = [plot_bucket_histograms(counts["train"], counts["val"], results / "figure4.png",
                                    title=f"Bucket usage, block 0 of the reference MemoryFormer "
                                          f"({s.figure4_windows * s.seq_len:,} tokens of each split; "
                                          f"Q, K, V share one hash)")]
    mf_runs = {r["name"]: _history(r)["evals"] for r in rows}
    paths.append(plot_usage_during_training(mf_runs, results / "usage_training.png"))
    paths.append(results / "usage_stats.json")
    return paths


PLOTS: dict[str, Callable[..., list[Path]]] = {"twin": _plot_twin, "usage": _plot_usage}


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _fmt_m(v: float) -> str:
    return f"{v / 1e6:.2f}M"


def format_report(report: dict[str, Any], exp: Experiment) -> str:
    """The experiment's Markdown: what was asked, the arms' table, the summary, how it was run."""
    lines = [f"# {exp.title} ({exp.paper})", "", exp.question, ""]
    lines += _arms_table(report, exp)
    lines += _summary_lines(report)
    lines += _usage_lines(report["rows"])
    lines += how_it_was_run(report)
    return "\n".join(lines)


def _arms_table(report: dict[str, Any], exp: Experiment) -> list[str]:
    """One row per arm: what it varies, LR, seed, held-out loss and PPL, paper numbers, costs."""
    ref = report["summary"].get("delta_val_loss") or {}
    paper = (report.get("paper_results") or {}).get("val_ppl")
    deltas = report.get("paper_delta_nats") or {}
    head = ["arm", *exp.columns, "LR", "seed", "held-out loss", "held-out PPL"]
    head += ["vs reference"] * bool(ref) + ["paper val PPL"] * bool(paper) + ["paper vs reference"] * bool(deltas)
    head += [h for _, h in exp.extra]
    head += ["fwd FLOPs/token", "tables (fp16 MB)", "params", "non-emb. params", "train tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        cells = [r["name"], *[str(r["labels"].get(c, "")) for c in exp.columns], _lr_tag(r["lr"]), str(r["seed"]),
                 f"{r['val_loss']:.4f}", f"{r['val_ppl']:.2f}"]
        if ref:
            cells.append(f"{ref.get(r['name'], float('nan')):+.4f}")
        key = next((r["labels"].get(c) for c in ("tau", "bits", "multiple") if c in r["labels"]), None)
        if paper:
            cells.append(f"{paper[key]:.2f}" if key in paper else "")
        if deltas:
            cells.append(f"{deltas[str(key)]:+.4f}" if str(key) in deltas else "")
        cells += [f"{r[k]:.3f}" if isinstance(r[k], float) else f"{r[k]:,}" for k, _ in exp.extra]
        cells += [_fmt_m(r["forward_flops_per_token"]), f"{r['table_mb_fp16']:.1f}", _fmt_m(r["parameters"]),
                  _fmt_m(r["non_embedding_parameters"]), f"{r['train_tokens_per_s']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if ref:
        lines.append("\"vs reference\": this arm's held-out loss minus the reference arm's, in nats (negative: better).")
    if deltas:
        lines.append("\"paper vs reference\": the paper's ln(val PPL / val PPL of the reference setting), the same "
                     "difference in nats on the paper's scale (MemoryFormer-tiny, the Pile, 8000 steps).")
    if ref or deltas:
        lines.append("")
    return lines


def _usage_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    usage_rows = [r for r in rows if r.get("usage_val")]
    if not usage_rows:
        return []
    lines = ["", "Bucket usage on held-out text at the end of training (mean over blocks and tables; "
             "entropy as a share of log 2^tau, and the share of buckets never hit):", "",
             "| arm | " + " | ".join(f"{k} H / dead" for k in ("Q", "ML1", "ML2")) + " |", "|---|---|---|---|"]
    for r in usage_rows:
        u = r["usage_val"]
        lines.append(f"| {r['name']} | " + " | ".join(
            f"{u[k]['entropy_ratio']:.3f} / {u[k]['dead_share']:.1%}" if k in u else "" for k in ("Q", "ML1", "ML2"))
            + " |")
    return lines


def how_it_was_run(report: dict[str, Any], *, every_arm: str | None = None) -> list[str]:
    """The "How this was run" section: command, machine, data, training recipe, plots."""
    s, m, d = report["settings"], report["machine"], report["data"]
    if every_arm is None:
        every_arm = (f"{s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens "
                     f"({s['steps'] * s['batch_size'] * s['seq_len']:,} tokens, the same batches)")
    lines = ["", "## How this was run", "", f"    {report['command']}", "",
             f"- Machine: {m['cpu']}, {m['cores']} cores shared with other users, torch {m['torch']} with "
             f"{m['torch_threads']} thread(s), {m['platform']}. Tokens/s are noisy under that load; the losses "
             "are deterministic.",
             f"- Data: {d.get('source')}; {d.get('tokenizer_source')}; {d.get('train_tokens'):,} training and "
             f"{d.get('val_tokens'):,} held-out tokens.",
             f"- Every arm: {every_arm}, AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, {s['warmup_frac']:.0%} "
             "warmup then cosine to 0.1x, fp32. Held-out loss over every window of the held-out split.",
             "- fwd FLOPs/token: 2 FLOPs per multiply-add, structural count of what the code executes (blocks, "
             "attention and LM head). Tables: every hash table, at 2 bytes per value as the paper counts memory."]
    if report.get("plots"):
        lines += ["- Plots: " + ", ".join(f"[{Path(p).name}]({Path(p).name})" for p in report["plots"])]
    elif report.get("plots_skipped"):
        lines += [f"- Plots: skipped ({report['plots_skipped']})"]
    return lines


def _summary_lines(report: dict[str, Any]) -> list[str]:
    summary, name = report["summary"], report["experiment"]
    if name == "twin":
        lines = ["Gaps are MemoryFormer's held-out loss minus the twin's (negative: MemoryFormer better), mean over "
                 "the seeds both arms ran.", "",
                 "| depth | comparison | MF LR | twin LR | MF loss | twin loss | gap | seeds |", "|---|---|---|---|---|---|---|---|"]
        for depth, e in summary.items():
            for key, label in (("paper_style", "paper-style"), ("fair", "fair (each best LR)"),
                               ("same_lr_3x", "both at 3x twin LR")):
                g = e.get(key)
                if g and g.get("gap") is not None:
                    lr_mf = g.get("mf_lr", g.get("lr"))
                    lr_tw = g.get("twin_lr", g.get("lr"))
                    lines.append(f"| {depth} | {label} | {_lr_tag(lr_mf)} | {_lr_tag(lr_tw)} | {g['mf_val_loss']:.4f} | "
                                 f"{g['twin_val_loss']:.4f} | {g['gap']:+.4f} | {', '.join(map(str, g['seeds']))} |")
        return lines
    if name == "usage":
        f4 = summary["figure4"]
        lines = [f"Figure 4 statistics of {f4['arm']} ({f4['tokens_per_split']:,} tokens of each split; every block "
                 "and table): entropy as a share of log 2^tau (mean, and the lowest table), share of buckets never "
                 "hit (mean, and the worst table), and what a uniform hash would score on as many tokens.", "",
                 "| layer | buckets | train H/logB | train dead | held-out H/logB (min) | held-out dead (max) | "
                 "uniform H/logB, dead |", "|---|---|---|---|---|---|---|"]
        for kind, v in f4["val"].items():
            t = f4["train"][kind]
            lines.append(f"| {kind} | {v['buckets']} | {t['entropy_ratio']:.3f} | {t['dead_share']:.1%} | "
                         f"{v['entropy_ratio']:.3f} ({v['min_entropy_ratio']:.3f}) | {v['dead_share']:.1%} "
                         f"({v['max_dead_share']:.1%}) | {v['uniform_entropy_ratio']:.3f}, {v['uniform_dead_share']:.1%} |")
        n = report["settings"]["usage_windows"] * report["settings"]["seq_len"]
        from memoryformer.research.analysis import uniform_reference

        lines += ["", f"During training (the first {n:,} held-out tokens, scored at each evaluation; Q stands for Q, K, V; "
                  f"on so few tokens a uniform hash would leave {uniform_reference(1024, n)['expected_dead_share']:.1%} "
                  f"of 1,024 buckets and {uniform_reference(256, n)['expected_dead_share']:.1%} of 256 empty):",
                  "", "| arm | step | Q H/logB | Q dead | ML1 H/logB | ML1 dead | ML2 H/logB | ML2 dead |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, evals in summary["during_training"].items():
            for e in evals:
                if "usage_H_qkv" in e:
                    lines.append(f"| {arm} | {e['step']} | " + " | ".join(
                        f"{e[f'usage_H_{k}']:.3f} | {e[f'usage_dead_{k}']:.1%}" for k in ("qkv", "ml1", "ml2")) + " |")
        return lines
    if summary.get("reference"):
        return [f"Reference arm: {summary['reference']} (held-out loss {summary['reference_val_loss']:.4f}); best arm: "
                f"{summary['best']}."]
    return []




# ---------------------------------------------------------------------------------------------
# Writing an experiment's results
# ---------------------------------------------------------------------------------------------


def write_json(path: Path, obj: Any) -> None:
    from memoryformer.train.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def draw_plots(draw: Callable[[], list[Path]]) -> tuple[list[str], str | None]:
    """Run a plotting function: (its paths, None), or ([], why) with a one-line warning when
    matplotlib is missing."""
    from memoryformer.research.analysis import plotting_available

    if not plotting_available():
        from memoryformer.research.analysis import PLOT_EXTRA

        return [], f"matplotlib is not installed: {PLOT_EXTRA}"
    return [str(p) for p in draw()], None


def write_experiment(name: str, exp: Experiment, s: Settings, rows: list[dict[str, Any]], data: Path, *,
                     command: str, machine: dict[str, Any]) -> dict[str, Any]:
    """Summarise the rows and write <results>/<name>.json and .md (always) and the plots (with matplotlib)."""
    from memoryformer.research.reproduce.runner import data_fingerprint

    results = Path(s.results)
    results.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "experiment": name, "title": exp.title, "paper": exp.paper, "question": exp.question,
        "command": command, "machine": machine, "settings": s.to_dict(), "data": data_fingerprint(data),
        "paper_results": PAPER_RESULTS.get(name),
        "rows": [{k: v for k, v in r.items() if k not in ("evals", "data")} for r in rows], "plots": [],
    }
    report["summary"] = SUMMARIES.get(name, _reference_summary)(s, rows)
    report["paper_delta_nats"] = paper_deltas(name)
    extra: dict[str, Any] = {}
    if name == "usage":
        extra["counts"] = usage_stats(s, rows, results, data)
        _add_usage_summary(report, rows, results)
    report["plots"], report["plots_skipped"] = draw_plots(
        lambda: PLOTS.get(name, _plot_bars)(s, name, rows, results, data, **extra))
    write_json(results / f"{name}.json", report)
    from memoryformer.train.checkpoint import atomic_write_text

    atomic_write_text(results / f"{name}.md", format_report(report, exp) + "\n")
    print(f"wrote {results / (name + '.json')} and .md", flush=True)
    return report


def _add_usage_summary(report: dict[str, Any], rows: Sequence[dict[str, Any]], results: Path) -> None:
    stats = json.loads((results / "usage_stats.json").read_text())
    report["summary"]["figure4"] = {"arm": stats["arm"], "tokens_per_split": stats["windows"] * stats["seq_len"],
                                    **stats["summary"]}
    report["summary"]["during_training"] = {
        r["name"]: [{k: v for k, v in e.items() if k == "step" or k.startswith("usage_")} for e in r["evals"]]
        for r in rows}
