"""The paper's comparisons and ablations, at a scale a CPU can run.

    memoryformer reproduce twin|tau|expanding-bits|gelu|lr|weighting|usage|all [--steps N] [--quick]

Every experiment is a list of arms. All arms of an experiment train on the same prepared tokens,
with the same steps, batch, sequence length, schedule and seed (a second seed where asked), and
are scored on the same held-out split (every non-overlapping window of it). An arm differs from
its reference only in what the experiment varies.

| experiment | paper | arms |
|---|---|---|
| twin | Table 1 | MemoryFormer and its Pythia twin at two depths; each at LRs {1, 3, 6, 12, 24, 48} x 1e-3. "Paper-style" pairs MF at 3x the twin's LR with the twin at Pythia's own; "fair" takes each at its best LR |
| tau | Table 3 | tau = 4, 8, 10 (d = 130 and 5 heads for tau = 10, as the paper took d = 510 for 512) |
| expanding-bits | Table 5 | 0, 1, 2, 3 expanding bits in the Memory Block |
| gelu | Table 6 | no activation / GeLU after the Memory Block's LayerNorm |
| lr | Table 4 | MemoryFormer at 1x, 2x, 3x, 4x the twin's LR |
| weighting | ours | "prob" at temperatures 0.5, 1, 2, and the official code's "l1" |
| usage | Figure 4 | bucket-usage histograms and statistics of the reference arm, on training and held-out text |

| scaling | Tables 1, 2, 5 | token scaling: MemoryFormer and its twin from 0.25M to 16M tokens, each at its own best LR (an adaptive sweep), plus a parameter-matched wider twin, the demo size, expanding bits 0 vs 2 and the efficient-attention twins of Table 2 (see `scaling`) |

This module is the registry: the settings, the experiments and their arms. `runner` trains, caches
and reuses arms (a run directory per arm, named by a hash of everything that defines it: model,
training settings, data; a finished arm's `arm.json` is reused by any experiment that needs it, an
unfinished one resumes from its checkpoint); `report` writes `<results>/<experiment>.json` and
`.md` (with the command that regenerates them and the machine), plus PNG plots.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from memoryformer.core.config import ModelConfig

ARCH_LABEL = {"memoryformer": "MF", "pythia": "twin"}


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything shared by the arms of every experiment."""

    out: str = "runs/reproduce"  # prepared data and one run directory per arm (not committed)
    results: str = "experiments/results"  # <experiment>.json / .md / .png
    data: list[str] | None = None  # corpora for `prepare`; None: the embedded default corpus
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    vocab_size: int = 4096
    max_bytes: int | None = 6_000_000
    val_fraction: float = 0.05
    warmup_frac: float = 0.05
    eval_every: int = 50  # intermediate evaluations (with usage logging) on eval_batches batches
    eval_batches: int = 4
    usage_windows: int = 32  # held-out windows scored for bucket usage at each evaluation
    figure4_windows: int = 256  # windows of each split for the Figure 4 histograms
    seeds: tuple[int, ...] = (0, 1)  # the twin experiment repeats its headline arms with seeds[1:]
    d_model: int = 128
    n_heads: int = 4
    depths: tuple[int, ...] = (2, 4)  # the twin experiment's sizes; ablations use depths[0]
    twin_lr: float = 1e-3  # Pythia-70M's peak LR: the paper's baseline
    lr_sweep: tuple[float, ...] = (1e-3, 3e-3, 6e-3, 1.2e-2, 2.4e-2, 4.8e-2)
    lr_multiples: tuple[int, ...] = (1, 2, 3, 4)
    taus: tuple[int, ...] = (4, 8, 10)
    expanding_bits: tuple[int, ...] = (0, 1, 2, 3)
    temperatures: tuple[float, ...] = (0.5, 1.0, 2.0)
    threads: int = 1  # torch threads; 1 is fastest on a busy shared CPU
    device: str = "cpu"  # "cuda": the GPU path for larger budgets (arms on a GPU get their own run directories)
    jobs: int = 2  # arms trained at once, each in its own process (the scaling study)
    max_tokens: int | None = None  # cap on any arm's token budget (the scaling study's largest budget)
    budgets: tuple[int, ...] = (250_000, 1_000_000, 4_000_000, 16_000_000)  # the scaling study's tokens
    quick: bool = False
    progress: bool = False
    command: str = ""  # the flags after the experiment name, recorded in the results

    def __post_init__(self) -> None:
        self.seeds = tuple(int(s) for s in self.seeds)
        self.depths = tuple(int(d) for d in self.depths)
        self.budgets = tuple(sorted(int(b) for b in self.budgets))
        self.lr_sweep = tuple(float(x) for x in self.lr_sweep)
        problems = []
        for name in ("steps", "batch_size", "seq_len", "vocab_size", "d_model", "n_heads", "threads", "jobs"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.seeds:
            problems.append("give at least one seed")
        if not self.depths:
            problems.append("give at least one depth")
        if self.device not in ("cpu", "cuda"):
            problems.append(f"device must be cpu or cuda, got {self.device!r}")
        if not self.budgets or self.budgets[0] < 1:
            problems.append(f"budgets must be positive token counts, got {self.budgets}")
        if self.max_tokens is not None and self.max_tokens < self.batch_size * self.seq_len:
            problems.append(f"max_tokens must be at least one step ({self.batch_size * self.seq_len} tokens), "
                            f"got {self.max_tokens}")
        if self.eval_every < 0 or self.eval_batches < 0:
            problems.append("eval_every and eval_batches must be >= 0")
        if problems:
            raise ValueError("reproduce settings: " + "; ".join(problems))

    @classmethod
    def quick_settings(cls, **changes: Any) -> Settings:
        """A seconds-long smoke setting: tiny models, a few steps, little data."""
        base = dict(steps=4, batch_size=2, seq_len=32, vocab_size=512, max_bytes=300_000, eval_every=2,
                    eval_batches=1, usage_windows=4, figure4_windows=8, seeds=(0,), d_model=32, n_heads=4,
                    depths=(1,), lr_sweep=(1e-3, 3e-3), budgets=(256, 512, 1024, 2048), quick=True)
        return cls(**{**base, **changes})

    @property
    def reference_lr(self) -> float:
        """MemoryFormer's LR in every ablation: 3 x the twin's, as the paper."""
        return 3 * self.twin_lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Arms and experiments
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One training run of an experiment: a model, a peak LR and a seed; labels say what it is."""

    name: str
    model: dict[str, Any]  # every ModelConfig field
    lr: float
    seed: int
    labels: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None  # the arm's own optimizer steps (a token budget); None: the settings' steps
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields of this arm (init_from, teacher, ...)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)


def base_model(settings: Settings, depth: int | None = None, **changes: Any) -> dict[str, Any]:
    """The ablations' reference MemoryFormer (tau 8, 2 expanding bits, "prob", no activation)."""
    cfg = ModelConfig(architecture="memoryformer", vocab_size=settings.vocab_size, max_seq_len=settings.seq_len,
                      d_model=settings.d_model, n_heads=settings.n_heads,
                      n_layers=depth if depth is not None else settings.depths[0], tau=8, expanding_bits=2)
    return cfg.replace(**changes).to_dict()


def width_for_tau(d_model: int, n_heads: int, tau: int, rotary_pct: float = 0.25) -> tuple[int, int]:
    """(d, heads) for a tau that may not divide d_model: d_model itself when it does; otherwise the
    nearest multiple of tau (the lower one on a tie), as the paper used d = 510 for tau = 10, and the
    head count whose head size is nearest the original's with an even number of rotary dims."""
    if d_model % tau == 0:
        return d_model, n_heads
    low = (d_model // tau) * tau
    candidates = [c for c in (low, low + tau) if c > 0]
    d = min(candidates, key=lambda c: (abs(c - d_model), c))
    head_dim = d_model / n_heads
    options = [h for h in range(1, d + 1) if d % h == 0 and int(d // h * rotary_pct) % 2 == 0]
    if not options:
        raise ValueError(f"no head count fits d = {d} (tau = {tau}) with even rotary dims; choose another d_model")
    return d, min(options, key=lambda h: (abs(d / h - head_dim), h))


def _lr_tag(lr: float) -> str:
    """0.003 -> "3e-3", 0.012 -> "1.2e-2"."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _arm(name: str, model: dict[str, Any], lr: float, seed: int, **labels: Any) -> Arm:
    return Arm(name=name, model=model, lr=lr, seed=seed, labels=labels)


def twin_arms(s: Settings) -> list[Arm]:
    """Both architectures at every depth and every LR of the sweep, first seed."""
    arms = []
    for depth in s.depths:
        for arch in ("memoryformer", "pythia"):
            model = base_model(s, depth, architecture=arch)
            for lr in s.lr_sweep:
                arms.append(_arm(f"{ARCH_LABEL[arch]} L{depth} lr {_lr_tag(lr)} seed {s.seeds[0]}", model, lr,
                                 s.seeds[0], arch=arch, depth=depth))
    return arms


def best_lrs(rows: Sequence[dict[str, Any]], seed: int) -> dict[tuple[str, int], float]:
    """(architecture, depth) -> the sweep LR with the lowest held-out loss at `seed`."""
    best: dict[tuple[str, int], tuple[float, float]] = {}
    for r in rows:
        if r["seed"] != seed or r.get("val_loss") is None or not math.isfinite(r["val_loss"]):
            continue
        key = (r["labels"]["arch"], r["labels"]["depth"])
        if key not in best or r["val_loss"] < best[key][0]:
            best[key] = (r["val_loss"], r["lr"])
    return {k: v[1] for k, v in best.items()}


def twin_followup(s: Settings, rows: Sequence[dict[str, Any]]) -> list[Arm]:
    """The headline arms again with seeds[1:], at the first depth (the CPU budget allows no more):
    the paper-style pair (MF at 3x the twin's LR, the twin at its own) and each architecture at
    its best LR of the first seed."""
    if len(s.seeds) < 2:
        return []
    best = best_lrs(rows, s.seeds[0])
    arms = []
    for depth in s.depths[:1]:
        wanted = {("memoryformer", s.reference_lr), ("pythia", s.twin_lr)}
        for arch in ("memoryformer", "pythia"):
            if (arch, depth) in best:
                wanted.add((arch, best[(arch, depth)]))
        for arch, lr in sorted(wanted):
            model = base_model(s, depth, architecture=arch)
            for seed in s.seeds[1:]:
                arms.append(_arm(f"{ARCH_LABEL[arch]} L{depth} lr {_lr_tag(lr)} seed {seed}", model, lr, seed,
                                 arch=arch, depth=depth))
    return arms


def tau_arms(s: Settings) -> list[Arm]:
    arms = []
    for tau in s.taus:
        d, heads = width_for_tau(s.d_model, s.n_heads, tau)
        model = base_model(s, tau=tau, d_model=d, n_heads=heads)
        arms.append(_arm(f"tau {tau} (d {d}, K {d // tau})", model, s.reference_lr, s.seeds[0], tau=tau, d=d,
                         K=d // tau, heads=heads))
    return arms


def bits_arms(s: Settings) -> list[Arm]:
    return [_arm(f"{e} expanding bits", base_model(s, expanding_bits=e), s.reference_lr, s.seeds[0], bits=e)
            for e in s.expanding_bits]


def gelu_arms(s: Settings) -> list[Arm]:
    return [_arm("no activation", base_model(s), s.reference_lr, s.seeds[0], activation="none"),
            _arm("GeLU", base_model(s, memory_block_activation="gelu"), s.reference_lr, s.seeds[0],
                 activation="gelu")]


def lr_arms(s: Settings) -> list[Arm]:
    return [_arm(f"{m}x twin LR ({_lr_tag(m * s.twin_lr)})", base_model(s), m * s.twin_lr, s.seeds[0], multiple=m)
            for m in s.lr_multiples]


def weighting_arms(s: Settings) -> list[Arm]:
    arms = [_arm(f"prob t={t:g}", base_model(s, weighting="prob", temperature=float(t)), s.reference_lr,
                 s.seeds[0], weighting="prob", temperature=float(t)) for t in s.temperatures]
    arms.append(_arm("l1", base_model(s, weighting="l1"), s.reference_lr, s.seeds[0], weighting="l1",
                     temperature=None))
    return arms


def usage_arms(s: Settings) -> list[Arm]:
    """The reference MemoryFormer at each depth (the first one is drawn in Figure 4)."""
    return [_arm(f"reference MF, {depth} layers", base_model(s, depth), s.reference_lr, s.seeds[0], depth=depth)
            for depth in s.depths]


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    paper: str  # the paper's table or figure
    question: str
    arms: Callable[[Settings], list[Arm]]
    followup: Callable[[Settings, Sequence[dict[str, Any]]], list[Arm]] | None = None
    columns: tuple[str, ...] = ()  # labels shown in the Markdown table
    extra: tuple[tuple[str, str], ...] = ()  # (row key, header) of more numbers shown


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment("twin", "MemoryFormer against its Pythia twin at equal tokens", "Table 1",
               "Does MemoryFormer beat its dense twin, as the paper's setup (MF at 3x the twin's LR) or when each "
               "gets its best LR, and does the gap move with size?", twin_arms, twin_followup),
    Experiment("tau", "tau and K (bits per chunk and number of tables)", "Table 3",
               "Does a longer hash code (fewer, larger tables) lower the loss?", tau_arms,
               columns=("tau", "d", "K", "heads"),
               extra=(("q_layer_table_mb_fp16", "Q-layer tables (fp16 MB)"),
                      ("q_layer_flops_paper", "Q-layer FLOPs s(tau+h)K at s=seq"))),
    Experiment("expanding-bits", "Expanding bits in the Memory Block", "Table 5",
               "Do the extra bits of ML2's chunks (tables 2^e times larger) lower the loss?", bits_arms,
               columns=("bits",), extra=(("memory_block_table_mb_fp16", "Memory Block tables per block (fp16 MB)"),)),
    Experiment("gelu", "A GeLU in the Memory Block", "Table 6",
               "Does a GeLU between ML1 and ML2 (after the LayerNorm) change anything?", gelu_arms,
               columns=("activation",)),
    Experiment("lr", "MemoryFormer's learning rate", "Table 4",
               "Is 3x the twin's LR the best for MemoryFormer?", lr_arms, columns=("multiple",)),
    Experiment("weighting", "Bucket weighting: the paper's \"prob\" against the official code's \"l1\"", "not in the paper",
               "Which differentiable weighting trains better, and does the temperature matter?", weighting_arms,
               columns=("weighting", "temperature")),
    Experiment("usage", "Bucket usage of the hash tables", "Figure 4",
               "Are buckets used uniformly (entropy near log 2^tau, few dead buckets), on training and on held-out "
               "text, and how does that evolve during training?", usage_arms),
)}
ORDER = ("twin", "tau", "expanding-bits", "gelu", "lr", "weighting", "usage")


def flags_of(changes: dict[str, Any], quick: bool) -> str:
    """The command-line flags that give `changes` (for the regenerate-with command in reports)."""
    flags = ["--quick"] if quick else []
    for key, value in changes.items():
        flag = "--lrs" if key == "lr_sweep" else "--" + key.replace("_", "-")
        if isinstance(value, (list, tuple)):
            flags += [flag, *(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
        else:
            flags += [flag, str(value)]
    return " ".join(shlex.quote(f) for f in flags)

