"""Cost as work grows: MemoryFormer against its Pythia twin (fp32) as context, batch and tokens per step grow.

    python benchmarks/scaling_cost.py [--pair tiny|demo] [--rounds 5] [--quick]

Three sweeps, each point timed with the two models alternating (common.time_interleaved, medians over
rounds), with model.py's cases:
  context  decode time per token at batch 1 after 128, 256, 512, 1024 and 2048 cached tokens
  batch    decode time per token (step time / batch) at batch 1, 2, 4, 8, 16 and 32 after 128 tokens
  train    training step time (model.train_fn: the training loop's step) at 1x128 ... 8x512 tokens
Decode points are timed with the head excluded (blocks) and included (whole model). Writes
benchmarks/results/scaling_cost.json/.md (scaling_cost_demo.* for --pair demo) and, where matplotlib is
installed, one PNG per sweep with both models on it, so that one sees where the lines cross.
--quick: the two ends of each sweep (the training sweep's two smallest points), one round: a smoke test,
not a measurement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, configure_allocator, time_interleaved, write_results  # noqa: E402
from model import PAIRS, build, decode_fn, train_fn  # noqa: E402

from memoryformer.inference.pages import huge_pages_available  # noqa: E402

CONTEXTS = (128, 256, 512, 1024, 2048)
BATCHES = (1, 2, 4, 8, 16, 32)
TRAIN_SHAPES = ((1, 128), (2, 128), (4, 128), (4, 256), (4, 512), (8, 512))  # (batch, sequence)
QUICK = {"context": (128, 2048), "batch": (1, 32), "train": ((1, 128), (2, 128))}
# per sweep: the x field, the x axis, the y axis
PLOTS = {"context": ("context", "context (cached tokens), batch 1", "decode ms per token"),
         "batch": ("batch", "batch, after 128 tokens", "decode ms per token"),
         "train": ("tokens", "tokens per training step (batch x sequence)", "training step ms")}


def decode_point(models: dict, sweep: str, batch: int, context: int, head: bool, rounds: int) -> dict:
    """One decode point: ms per generated token (step time / batch) of each model."""
    t = time_interleaved({k: decode_fn(m, batch, context, head) for k, m in models.items()}, rounds=rounds)
    mf, dense = t["memoryformer"] * 1e3 / batch, t["dense"] * 1e3 / batch
    return {"sweep": sweep, "batch": batch, "context": context, "seq": None, "tokens": batch, "head": head,
            "per": "token", "mf_ms": mf, "dense_ms": dense, "ratio": mf / dense}


def train_point(models: dict, batch: int, seq: int, rounds: int) -> dict:
    """One training point: ms per step of each model (one step per sample, at least 3 rounds)."""
    t = time_interleaved({k: train_fn(m, batch, seq) for k, m in models.items()}, rounds=max(3, rounds // 2),
                         min_time=0.0)
    mf, dense = t["memoryformer"] * 1e3, t["dense"] * 1e3
    return {"sweep": "train", "batch": batch, "context": None, "seq": seq, "tokens": batch * seq, "head": True,
            "per": "step", "mf_ms": mf, "dense_ms": dense, "ratio": mf / dense}


def crossing(rows: list[dict], x: str) -> str:
    """Where MF / dense crosses 1 along a series of rows (sorted by `x`): 'between x=A and x=B', or
    which model is faster at every point."""
    for a, b in zip(rows, rows[1:]):
        if (a["ratio"] - 1) * (b["ratio"] - 1) < 0:
            return f"crosses between {x}={a[x]} and {x}={b[x]}"
    if not rows:
        return "no points"
    if all(r["ratio"] < 1 for r in rows):
        return "MemoryFormer faster at every point"
    if all(r["ratio"] > 1 for r in rows):
        return "dense faster at every point"
    return "equal at a point"


def series(rows: list[dict], sweep: str, head: bool) -> list[dict]:
    """The rows of one sweep and head setting, by their x."""
    x = PLOTS[sweep][0]
    return sorted((r for r in rows if r["sweep"] == sweep and r["head"] == head), key=lambda r: r[x])


def plot(rows: list[dict], names: tuple[str, str], out_dir: Path, stem: str) -> list[Path] | None:
    """One PNG per sweep with points (log-log, both models; solid whole model, dashed blocks); None
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    paths = []
    for sweep, (x, xlabel, ylabel) in PLOTS.items():
        if not any(r["sweep"] == sweep for r in rows):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for head in (True, False):
            points = series(rows, sweep, head)
            if not points:
                continue
            what = "" if sweep == "train" else (", whole model" if head else ", blocks")
            for name, key, color in ((names[0], "mf_ms", "C0"), (names[1], "dense_ms", "C1")):
                ax.plot([r[x] for r in points], [r[key] for r in points], color=color, marker="o",
                        linestyle="-" if head else "--", label=name + what)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{names[0]} vs {names[1]}, fp32: {sweep}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = out_dir / f"{stem}_{sweep}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=list(PAIRS), default="tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the ends of each sweep, 1 round (a smoke test)")
    args = parser.parse_args(argv)
    configure_allocator(True)
    rounds = 1 if args.quick else args.rounds
    contexts, batches, shapes = ((QUICK["context"], QUICK["batch"], QUICK["train"]) if args.quick
                                 else (CONTEXTS, BATCHES, TRAIN_SHAPES))
    names = PAIRS[args.pair]
    huge = huge_pages_available()
    models = {arch: build(preset, torch.float32, seq=max(contexts) + 1, huge_pages=huge)
              for arch, preset in zip(("memoryformer", "dense"), names, strict=True)}
    rows = []
    points = [("context", 1, c) for c in contexts] + [("batch", b, 128) for b in batches]
    for (sweep, batch, context), head in ((p, h) for p in points for h in (False, True)):
        rows.append(decode_point(models, sweep, batch, context, head, rounds))
        report(rows[-1])
    for batch, seq in shapes:  # last: train_fn leaves the models in training mode
        rows.append(train_point(models, batch, seq, rounds))
        report(rows[-1])
    stem = "scaling_cost" if args.pair == "tiny" else f"scaling_cost_{args.pair}"
    write(rows, names, stem)


def report(row: dict) -> None:
    """One progress line for a measured point."""
    x = {"context": f"ctx {row['context']}", "batch": f"batch {row['batch']}",
         "train": f"{row['batch']}x{row['seq']}"}[row["sweep"]]
    head = "" if row["sweep"] == "train" else (" whole" if row["head"] else " blocks")
    print(f"{row['sweep']:>7} {x:>10}{head:<7} MF {row['mf_ms']:9.3f} ms  dense {row['dense_ms']:9.3f} ms "
          f"per {row['per']}  ratio {row['ratio']:.2f}", flush=True)


def write(rows: list[dict], names: tuple[str, str], stem: str) -> None:
    """results/STEM.json/.md, the crossings in the notes, and the plots (or one line saying why not)."""
    crossings = {sweep if sweep == "train" else f"{sweep}, {'whole model' if head else 'blocks'}":
                 crossing(series(rows, sweep, head), PLOTS[sweep][0])
                 for sweep in PLOTS for head in ((True,) if sweep == "train" else (False, True))}
    crossings = {k: v for k, v in crossings.items() if v != "no points"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    pngs = plot(rows, names, RESULTS, stem)
    notes = [f"{names[0]} against {names[1]}, fp32. Decode: ms per generated token (step time / batch); "
             "train: ms per training step (the training loop's clipping and AdamW). Medians over interleaved "
             "rounds; ratio < 1: MemoryFormer faster.",
             "Where MF / dense crosses 1: " + "; ".join(f"{k}: {v}" for k, v in crossings.items()) + "."]
    notes += [f"![{p.stem}]({p.name})" for p in pngs or []]
    columns = [("sweep", "sweep"), ("batch", "batch"), ("context", "context"), ("seq", "sequence"),
               ("tokens", "tokens"), ("head", "head incl."), ("per", "time per"), ("mf_ms", f"{names[0]} ms"),
               ("dense_ms", f"{names[1]} ms"), ("ratio", "ratio MF / dense")]
    extra = {"crossings": crossings, "plots": [p.name for p in pngs or []]}
    paths = write_results(stem, rows, columns, title=f"Cost as work grows: {names[0]} vs {names[1]}", notes=notes,
                          extra=extra)
    print("wrote", *paths, *(pngs or []))
    if pngs is None:
        print("matplotlib is not installed: plots skipped (pip install matplotlib); the numbers are in "
              f"{paths[0].name} and {paths[1].name}")


if __name__ == "__main__":
    main()
