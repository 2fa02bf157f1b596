"""Bucket-usage statistics of MemoryFormer's hash tables (the paper's Figure 4), and the plots of
the reproduction experiments (loss curves, usage histograms, usage during training, per-arm bars).

Every Memory Layer hashes its input into K tables of 2**tau buckets. For one table, with hit
counts c_b over its B = 2**tau buckets (N = sum c_b hits, one per token), usage is summarised by

    entropy   H = -sum_b p_b log p_b,  p_b = c_b / N   (nats; the uniform maximum is log B = tau log 2)
    dead share  = #{b : c_b = 0} / B                     (buckets never hit)

A finite sample of a uniform distribution scores a little below log B and leaves some buckets
empty, so both come with their uniform reference for the same N (`uniform_reference`).

    counts = bucket_counts(model, batches)      # {"blocks.0.attn.q_proj": (K, 2**tau) int64, ...}
    summary = usage_summary(counts)              # per kind: mean entropy ratio, dead share, ...
    plot_bucket_histograms(train_counts, val_counts, "figure4.png")

In this model Q, K and V hash the same normalised input with the same tau (one shared hash, as
the official code does), so their counts are identical; they are still reported one by one.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from memoryformer.core.layer import MemoryLayer

# suffix of a Memory Layer's qualified name in LanguageModel -> its short kind
LAYER_KINDS: dict[str, str] = {
    "attn.q_proj": "Q", "attn.k_proj": "K", "attn.v_proj": "V", "mlp.ml1": "ML1", "mlp.ml2": "ML2",
}
KIND_ORDER = ("Q", "K", "V", "ML1", "ML2")
# kinds logged during training: Q, K and V share one hash, so one of them stands for all three
TRAINING_KINDS = {"qkv": "Q", "ml1": "ML1", "ml2": "ML2"}


# ---- counting -------------------------------------------------------------------------------


def memory_layers(model: nn.Module) -> dict[str, MemoryLayer]:
    """Every MemoryLayer of `model` by qualified name (e.g. "blocks.0.attn.q_proj")."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MemoryLayer)}


def layer_kind(name: str) -> str:
    """"blocks.3.mlp.ml2" -> "ML2"; names outside LAYER_KINDS keep their last component."""
    for suffix, kind in LAYER_KINDS.items():
        if name.endswith(suffix):
            return kind
    return name.rsplit(".", 1)[-1]


def layer_block(name: str) -> int | None:
    """"blocks.3.mlp.ml2" -> 3 (None outside `blocks`)."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def count_rows(rows: Tensor, num_tables: int, tau: int) -> Tensor:
    """Global row ids (..., K) (`k * 2**tau + bucket`) -> hit counts (K, 2**tau) int64."""
    counts = torch.bincount(rows.reshape(-1).to(torch.int64), minlength=num_tables << tau)
    return counts[: num_tables << tau].view(num_tables, 1 << tau)


class BucketCounter:
    """Context manager counting bucket hits of Memory Layers during whatever forwards run inside it.

        with BucketCounter(model) as counter:
            validation_loss(model, data, seq_len)      # any forward passes
        counter.counts                                 # {layer name: (K, 2**tau) int64}

    Forward pre-hooks: a layer given a shared hash (Q/K/V) counts that hash, otherwise it hashes
    its own input with `MemoryLayer.hash`. `layers` restricts the names (default: every MemoryLayer).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None) -> None:
        found = memory_layers(model)
        names = list(found) if layers is None else list(layers)
        missing = [n for n in names if n not in found]
        if missing:
            raise ValueError(f"no MemoryLayer named {missing[0]!r} in the model; known: "
                             f"{', '.join(found) or 'none (a dense Pythia twin has no hash tables)'}")
        self.layers = {n: found[n] for n in names}
        self.counts = {n: torch.zeros(m.num_tables, 1 << m.tau, dtype=torch.int64) for n, m in self.layers.items()}
        self._handles: list[Any] = []

    def _hook(self, name: str, layer: MemoryLayer):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            hashed = args[1] if len(args) > 1 and args[1] is not None else None
            with torch.no_grad():
                rows = hashed[0] if hashed is not None else layer.hash(args[0])[0]
                self.counts[name] += count_rows(rows.detach().cpu(), layer.num_tables, layer.tau)
        return hook

    def __enter__(self) -> BucketCounter:
        self._handles = [m.register_forward_pre_hook(self._hook(n, m)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def bucket_counts(model: nn.Module, batches: Iterable[Tensor | tuple[Tensor, ...]],
                  layers: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Hit counts of every bucket of every table, over all tokens of `batches`.

    Args:
        model: a LanguageModel (any module holding MemoryLayers); run in eval mode, no grad.
        batches: token ids (B, T), or (x, y) pairs whose x is used.
        layers: qualified names to count (default: every MemoryLayer).
    Returns:
        {layer name: (K, 2**tau) int64 counts}; each row sums to the number of tokens seen.
    """
    was_training = model.training
    model.eval()
    try:
        with BucketCounter(model, layers) as counter:
            for batch in batches:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        model.train(was_training)
    return counter.counts


def data_windows(data, split: str, seq_len: int, windows: int, batch_size: int = 16) -> list[Tensor]:
    """The first `windows` non-overlapping windows of a TokenData split, as (B, seq_len) batches."""
    return [x for x, _ in data.eval_batches(split, batch_size, seq_len, max_windows=windows)]


# ---- statistics -----------------------------------------------------------------------------


def entropy(counts: Tensor) -> Tensor:
    """Entropy in nats of the bucket distribution of each table: counts (..., B) -> (...,).

    Empty buckets contribute 0 (0 log 0 = 0); a table with no hits has entropy 0."""
    c = counts.to(torch.float64)
    total = c.sum(-1, keepdim=True)
    p = torch.where(total > 0, c / total.clamp_min(1), torch.zeros_like(c))
    return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1)


def dead_share(counts: Tensor) -> Tensor:
    """Share of buckets never hit, per table: counts (..., B) -> (...,) in [0, 1]."""
    return (counts == 0).to(torch.float64).mean(-1)


def uniform_reference(buckets: int, hits: int) -> dict[str, float]:
    """What a uniform hash would score with `hits` tokens over `buckets` buckets.

    expected_dead_share = (1 - 1/B)^N exactly; expected_entropy ~ log B - (B - 1) / (2 N) (the
    Miller-Madow bias of the plug-in estimate, accurate when N >> B)."""
    if buckets < 1 or hits < 0:
        raise ValueError(f"uniform_reference needs buckets >= 1 and hits >= 0, got {buckets}, {hits}")
    log_b = math.log(buckets)
    return {
        "max_entropy": log_b,
        "expected_entropy": max(0.0, log_b - (buckets - 1) / (2 * hits)) if hits else 0.0,
        "expected_dead_share": (1.0 - 1.0 / buckets) ** hits,
    }


def table_stats(counts: Tensor) -> dict[str, Any]:
    """Per-table and mean statistics of one layer's counts (K, B)."""
    ent = entropy(counts)
    dead = dead_share(counts)
    buckets = counts.shape[-1]
    hits = int(counts[0].sum()) if counts.numel() else 0
    ref = uniform_reference(buckets, hits)
    return {
        "tables": counts.shape[0], "buckets": buckets, "hits_per_table": hits,
        "entropy": ent.tolist(), "dead_share": dead.tolist(),
        "mean_entropy": float(ent.mean()), "min_entropy": float(ent.min()),
        "mean_entropy_ratio": float(ent.mean()) / ref["max_entropy"] if buckets > 1 else 1.0,
        "mean_dead_share": float(dead.mean()), "max_dead_share": float(dead.max()),
        **{f"uniform_{k}": v for k, v in ref.items()},
    }


def usage_summary(counts: Mapping[str, Tensor]) -> dict[str, dict[str, float]]:
    """Mean usage per kind (Q, K, V, ML1, ML2) over all blocks and tables.

    Returns {kind: {"entropy_ratio", "dead_share", "min_entropy_ratio", "max_dead_share", "buckets",
    "hits_per_table", "uniform_entropy_ratio", "uniform_dead_share"}}, kinds in KIND_ORDER."""
    by_kind: dict[str, list[Tensor]] = {}
    for name, c in counts.items():
        by_kind.setdefault(layer_kind(name), []).append(c)
    out: dict[str, dict[str, float]] = {}
    for kind in sorted(by_kind, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else 99, k)):
        stacked = torch.cat(by_kind[kind])  # (sum of K, B): all tables of that kind
        buckets, hits = stacked.shape[-1], int(stacked[0].sum())
        ref = uniform_reference(buckets, hits)
        ratio = entropy(stacked) / ref["max_entropy"] if buckets > 1 else torch.ones(stacked.shape[0])
        dead = dead_share(stacked)
        out[kind] = {
            "entropy_ratio": float(ratio.mean()), "dead_share": float(dead.mean()),
            "min_entropy_ratio": float(ratio.min()), "max_dead_share": float(dead.max()),
            "buckets": buckets, "hits_per_table": hits,
            "uniform_entropy_ratio": ref["expected_entropy"] / ref["max_entropy"] if buckets > 1 else 1.0,
            "uniform_dead_share": ref["expected_dead_share"],
        }
    return out


def usage_metrics(counts: Mapping[str, Tensor]) -> dict[str, float]:
    """The few numbers logged during training: usage_H_<kind> (mean entropy / log B) and
    usage_dead_<kind> for kind in qkv, ml1, ml2 (Q stands for Q/K/V: one shared hash)."""
    summary = usage_summary(counts)
    out: dict[str, float] = {}
    for key, kind in TRAINING_KINDS.items():
        if kind in summary:
            out[f"usage_H_{key}"] = summary[kind]["entropy_ratio"]
            out[f"usage_dead_{key}"] = summary[kind]["dead_share"]
    return out


def usage_hook(data, seq_len: int, windows: int = 32, split: str = "val",
               batch_size: int = 16) -> Callable[[nn.Module, int], dict[str, float]]:
    """An `on_eval` callback for memoryformer.train.train: bucket usage (usage_metrics) on the
    first `windows` windows of `split`, the same tokens at every evaluation. A model without
    Memory Layers gets {}."""
    batches = data_windows(data, split, seq_len, windows, batch_size)

    def on_eval(model: nn.Module, step: int) -> dict[str, float]:
        if not memory_layers(model):
            return {}
        device = next(model.parameters()).device
        return usage_metrics(bucket_counts(model, [b.to(device) for b in batches]))

    return on_eval


# ---- plots ----------------------------------------------------------------------------------


PLOT_EXTRA = "pip install 'memoryformer[plot]'"
_warned: set[str] = set()


def plotting_available(what: str = "the plots") -> bool:
    """Whether matplotlib imports; without it, print one warning line (once per `what`) naming the extra."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if what not in _warned:
            _warned.add(what)
            print(f"warning: matplotlib is not installed; skipping {what} ({PLOT_EXTRA})", file=sys.stderr,
                  flush=True)
        return False
    return True


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"plotting needs matplotlib: {PLOT_EXTRA}") from err

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def legend(ax, **kwargs) -> None:
    """ax.legend(**kwargs) when the axes have labelled artists; nothing otherwise (matplotlib warns on an
    empty legend, e.g. a report drawn before its first arm finished)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_bucket_histograms(train_counts: Mapping[str, Tensor], val_counts: Mapping[str, Tensor] | None,
                           path: str | Path, *, block: int = 0, title: str | None = None) -> Path:
    """Figure 4: hits per bucket of the first and last table of Q, K, V, ML1 and ML2 in `block`.

    One row per layer kind, two columns (T_1, T_K); bars for the training text, a step outline for
    held-out text; each panel's title gives entropy / log B and the share of dead buckets."""
    plt = _pyplot()
    names = [n for n in train_counts if layer_block(n) == block]
    names.sort(key=lambda n: KIND_ORDER.index(layer_kind(n)) if layer_kind(n) in KIND_ORDER else 99)
    if not names:
        raise ValueError(f"no Memory Layer counts for block {block}; blocks present: "
                         f"{sorted({layer_block(n) for n in train_counts}, key=str)}")
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 2.1 * len(names) + 0.6), squeeze=False)
    for row, name in enumerate(names):
        c_train = train_counts[name]
        c_val = val_counts.get(name) if val_counts is not None else None
        k_last = c_train.shape[0] - 1
        for col, k in enumerate((0, k_last)):
            ax = axes[row][col]
            buckets = c_train.shape[1]
            edges = torch.arange(buckets + 1).numpy() - 0.5
            ax.stairs(c_train[k].numpy(), edges, fill=True, color="tab:blue", alpha=0.6, label="train text")
            label = f"{layer_kind(name)} T{k + 1}  train H/logB {float(entropy(c_train[k])) / math.log(buckets):.3f}, " \
                    f"dead {float(dead_share(c_train[k])):.1%}"
            if c_val is not None:
                scale = float(c_train[k].sum()) / max(int(c_val[k].sum()), 1)
                ax.stairs(c_val[k].numpy() * scale, edges, color="tab:orange", lw=0.8, label="held-out (rescaled)")
                label += f" | val {float(entropy(c_val[k])) / math.log(buckets):.3f}, {float(dead_share(c_val[k])):.1%}"
            ax.axhline(float(c_train[k].sum()) / buckets, color="k", lw=0.7, ls="--", label="uniform")
            ax.set_title(label, fontsize=8)
            ax.set_xlim(-0.5, buckets - 0.5)
            ax.tick_params(labelsize=7)
            if row == len(names) - 1:
                ax.set_xlabel("bucket", fontsize=8)
            if col == 0:
                ax.set_ylabel("hits", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title or f"Bucket usage, block {block}: first and last table of each Memory Layer", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_usage_during_training(runs: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path) -> Path:
    """Entropy / log B and dead-bucket share against training step, from TrainResult.evals entries
    holding the usage_* metrics of `usage_hook`; one line style per run, one colour per kind."""
    plt = _pyplot()
    fig, (ax_h, ax_d) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"qkv": "tab:blue", "ml1": "tab:green", "ml2": "tab:red"}
    styles = ["-", "--", ":", "-."]
    plotted = False
    for i, (run, evals) in enumerate(runs.items()):
        for key, colour in colours.items():
            pts = [(e["step"], e[f"usage_H_{key}"], e[f"usage_dead_{key}"]) for e in evals if f"usage_H_{key}" in e]
            if not pts:
                continue
            plotted = True
            steps, h, d = zip(*pts)
            label = f"{'Q/K/V' if key == 'qkv' else key.upper()} {run}"
            ax_h.plot(steps, h, styles[i % len(styles)], marker="o", ms=3, color=colour, label=label)
            ax_d.plot(steps, d, styles[i % len(styles)], marker="o", ms=3, color=colour, label=label)
    if not plotted:
        raise ValueError("no usage metrics in the evals given; train with on_eval=usage_hook(...)")
    ax_h.set_ylabel("usage entropy / log(2^tau)")
    ax_d.set_ylabel("share of buckets never hit")
    for ax in (ax_h, ax_d):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_d.legend(fontsize=7)
    fig.suptitle("Bucket usage on held-out text during training (mean over blocks and tables)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_curves(runs: Mapping[str, Mapping[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """Training loss (smoothed) and validation points of several runs.

    runs: {label: {"losses": [per-step loss], "evals": [{"step", "val_loss"}, ...], "final_val_loss"
    (optional: the loss on the whole held-out split, drawn as a star at the last step)}} (a
    TrainResult.to_dict() or a run's history.json works)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6))
    cmap = plt.get_cmap("tab10")
    for i, (label, run) in enumerate(runs.items()):
        losses = list(run["losses"])
        if not losses:
            continue
        colour = cmap(i % 10)
        steps = range(1, len(losses) + 1)
        ax.plot(steps, _smooth(losses, max(1, len(losses) // 25)), color=colour, lw=1.6, label=f"{label} (train)")
        evals = [e for e in run.get("evals", []) if e.get("val_loss") is not None]
        if evals:
            ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o--", ms=3, lw=0.8, color=colour)
        if run.get("final_val_loss") is not None:
            ax.plot([len(losses)], [run["final_val_loss"]], "*", ms=11, color=colour, mec="k", mew=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)\ndashed: held-out sample, star: whole held-out split", fontsize=9)
    ax.set_title(title or "Loss curves, same tokens for every run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_arms(rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str,
              key: str = "val_loss", label: str = "arm") -> Path:
    """Horizontal bars of one metric per arm (default: held-out loss); several seeds of one arm
    are drawn as a bar at their mean with the individual values as dots."""
    plt = _pyplot()
    groups: dict[str, list[float]] = {}
    for r in rows:
        if r.get(key) is not None:
            groups.setdefault(str(r[label]), []).append(float(r[key]))
    if not groups:
        raise ValueError(f"no rows with {key!r} to plot")
    names = list(groups)
    means = [statistics.fmean(v) for v in groups.values()]
    # a diverged arm's value is inf or nan: no bar, a label, and the axis from the finite values
    finite = [x for v in groups.values() for x in v if math.isfinite(x)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = max(hi - lo, 1e-3)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.4))
    for i, values in enumerate(groups.values()):
        shown = [x for x in values if math.isfinite(x)]
        ax.plot(shown, [i] * len(shown), "k.", ms=5)
        if math.isfinite(means[i]):
            ax.barh(i, means[i], color="tab:blue", alpha=0.7)
            ax.text(means[i], i, f" {means[i]:.3f}", va="center", fontsize=8)
        else:
            ax.text(lo - 0.6 * span, i, f" diverged ({len(values) - len(shown)} of {len(values)})", va="center",
                    fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(lo - 0.6 * span, hi + 0.6 * span)
    ax.set_xlabel("held-out cross-entropy (nats/token), lower is better" if key == "val_loss" else key)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lr_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str,
                  group: Callable[[Mapping[str, Any]], str]) -> Path:
    """Held-out loss against peak LR (log axis), one line per group (e.g. architecture and depth)
    through the mean over seeds, with every seed's value as a dot."""
    plt = _pyplot()
    by_group: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        if r.get("val_loss") is not None and math.isfinite(r["val_loss"]):
            by_group.setdefault(group(r), {}).setdefault(float(r["lr"]), []).append(float(r["val_loss"]))
    if not by_group:
        raise ValueError("no rows with a finite val_loss to plot")
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    cmap = plt.get_cmap("tab10")
    for i, (name, points) in enumerate(by_group.items()):
        lrs = sorted(points)
        means = [statistics.fmean(points[lr]) for lr in lrs]
        ax.plot(lrs, means, "-o", ms=4, color=cmap(i % 10), label=name)
        best = min(range(len(lrs)), key=lambda j: means[j])
        ax.plot([lrs[best]], [means[best]], "*", ms=13, color=cmap(i % 10), mec="k", mew=0.5)
        for lr in lrs:
            if len(points[lr]) > 1:
                ax.plot([lr] * len(points[lr]), points[lr], ".", color=cmap(i % 10), ms=5)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- scaling fits ---------------------------------------------------------------------------


def _linear_fit(x: Sequence[float], y: Sequence[float], alpha: float) -> tuple[float, float, float]:
    """Least squares of y = E + A x^(-alpha) for a fixed alpha: (E, A, sum of squared residuals)."""
    import numpy as np

    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    basis = np.stack([np.ones_like(xs), xs ** -alpha], axis=1)
    (e, a), *_ = np.linalg.lstsq(basis, ys, rcond=None)
    resid = ys - basis @ np.array([e, a])
    return float(e), float(a), float(resid @ resid)


def fit_power_law(tokens: Sequence[float], losses: Sequence[float], *, unit: float = 1e6,
                  alpha_range: tuple[float, float] = (1e-3, 3.0)) -> dict[str, Any] | None:
    """Fit L(D) = E + A * (D / unit)^(-alpha) by least squares; None with fewer than 3 points.

    For each alpha the best (E, A) is linear least squares; alpha is found by a grid over alpha_range
    refined by golden-section search. Returns E, A, alpha, unit, the residuals (data minus fit), their
    RMS and the degrees of freedom (points - 3)."""
    if len(tokens) != len(losses):
        raise ValueError(f"fit_power_law: {len(tokens)} token counts but {len(losses)} losses")
    if len(tokens) < 3:
        return None
    x = [t / unit for t in tokens]
    lo, hi = alpha_range
    grid = [lo * (hi / lo) ** (i / 199) for i in range(200)]
    sse = [_linear_fit(x, losses, a)[2] for a in grid]
    i = min(range(len(grid)), key=sse.__getitem__)
    a_lo, a_hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = a_hi - golden * (a_hi - a_lo), a_lo + golden * (a_hi - a_lo)
        if _linear_fit(x, losses, c)[2] < _linear_fit(x, losses, d)[2]:
            a_hi = d
        else:
            a_lo = c
    alpha = (a_lo + a_hi) / 2
    e, a, s = _linear_fit(x, losses, alpha)
    residuals = [float(y - (e + a * xi ** -alpha)) for xi, y in zip(x, losses)]
    return {"E": e, "A": a, "alpha": alpha, "unit": unit, "residuals": residuals,
            "rms_residual": math.sqrt(s / len(x)), "dof": len(x) - 3, "points": len(x)}


def power_law(fit: Mapping[str, Any], tokens: float) -> float:
    """The fitted L(D) at D = tokens."""
    return fit["E"] + fit["A"] * (tokens / fit["unit"]) ** -fit["alpha"]
