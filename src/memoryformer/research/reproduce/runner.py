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

Arms are cached: each has a run directory named by a hash of everything that defines it (model,
training settings, data); a finished arm's `arm.json` is reused by any experiment that needs it,
and an unfinished one resumes from its checkpoint. Results go to `<results>/<experiment>.json`
and `.md` (with the command that regenerates them and the machine), plus PNG plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

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
    quick: bool = False
    progress: bool = False
    command: str = ""  # the flags after the experiment name, recorded in the results

    def __post_init__(self) -> None:
        self.seeds = tuple(int(s) for s in self.seeds)
        self.depths = tuple(int(d) for d in self.depths)
        problems = []
        for name in ("steps", "batch_size", "seq_len", "vocab_size", "d_model", "n_heads", "threads"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.seeds:
            problems.append("give at least one seed")
        if not self.depths:
            problems.append("give at least one depth")
        if self.eval_every < 0 or self.eval_batches < 0:
            problems.append("eval_every and eval_batches must be >= 0")
        if problems:
            raise ValueError("reproduce settings: " + "; ".join(problems))

    @classmethod
    def quick_settings(cls, **changes: Any) -> Settings:
        """A seconds-long smoke setting: tiny models, a few steps, little data."""
        base = dict(steps=4, batch_size=2, seq_len=32, vocab_size=512, max_bytes=300_000, eval_every=2,
                    eval_batches=1, usage_windows=4, figure4_windows=8, seeds=(0,), d_model=32, n_heads=4,
                    depths=(1,), lr_sweep=(1e-3, 3e-3), quick=True)
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

# The paper's numbers (Tables 2-6), for the reports. Validation PPL on the Pile after 8000 steps of
# MemoryFormer-tiny (Tables 3-5); zero-shot average accuracy (Tables 1, 6).
_ABLATION_RUN = {"steps": 8000, "tokens": 8000 * 1024 * 2048, "model": "MemoryFormer-tiny", "data": "the Pile"}
PAPER_RESULTS: dict[str, Any] = {
    "tau": {"val_ppl": {4: 19.01, 8: 18.82, 10: 18.67}, "d": {4: 512, 8: 512, 10: 510},
            "q_layer_memory_mb": {4: 2.1, 8: 16.8, 10: 53.5}, "q_layer_gflops_s2048": {4: 0.14, 8: 0.07, 10: 0.06},
            **_ABLATION_RUN},
    "expanding-bits": {"val_ppl": {0: 19.89, 1: 19.26, 2: 18.82, 3: 18.54},
                       "memory_block_mb": {0: 33.6, 1: 52.4, 2: 88.1, 3: 157.3}, **_ABLATION_RUN},
    "lr": {"val_ppl": {1: 19.86, 2: 19.07, 3: 18.82, 4: 18.84}, **_ABLATION_RUN},
    "gelu": {"zero_shot_avg": {"none": 0.404, "gelu": 0.402}},
    "twin": {"zero_shot_avg": {"Pythia-70M": 0.375, "MF-tiny": 0.404, "Pythia-160M": 0.389, "MF-small": 0.423,
                               "Pythia-410M": 0.435, "MF-base": 0.458},
             "block_gflops_s2048": {"Pythia-70M": 10.7, "MF-tiny": 4.7, "Pythia-160M": 20.9, "MF-small": 7.4,
                                    "Pythia-410M": 34.4, "MF-base": 10.2}},
}


# ---------------------------------------------------------------------------------------------
# Data, run directories, one arm
# ---------------------------------------------------------------------------------------------


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def data_dir(s: Settings) -> Path:
    """The prepared data shared by every arm: <out>/data/<corpus>-v<vocab>-<hash of the settings>."""
    spec = {"data": sorted(str(Path(d).resolve()) for d in s.data) if s.data else None,
            "vocab_size": s.vocab_size, "max_bytes": s.max_bytes, "val_fraction": s.val_fraction}
    first = Path(s.data[0]) if s.data else None
    if first is not None and any(c in first.name for c in "*?["):  # a glob: name it by its folder
        first = first.parent
    label = re.sub(r"[^A-Za-z0-9_-]+", "_", first.name)[:24] if first is not None else "default"
    name = f"{label or 'data'}-v{s.vocab_size}"
    return Path(s.out) / "data" / f"{name}-{_hash(spec)}"


def prepare_data(s: Settings) -> Path:
    """Tokenise the corpus once (BPE of vocab_size trained on it); reuse it when already there."""
    from memoryformer.data import prepare

    path = data_dir(s)
    if not (path / "meta.json").is_file():
        if path.exists():
            shutil.rmtree(path)  # an interrupted prepare
        print(f"preparing {'the default corpus' if not s.data else ', '.join(s.data)} -> {path}", flush=True)
        prepare(s.data or None, path, vocab_size=s.vocab_size, max_bytes=s.max_bytes, val_fraction=s.val_fraction,
                seed=0, progress=s.progress)
    return path


def train_config(s: Settings, arm: Arm):
    from memoryformer.train import TrainConfig

    return TrainConfig(batch_size=s.batch_size, seq_len=s.seq_len, max_steps=s.steps, lr=arm.lr,
                       warmup_frac=s.warmup_frac, eval_every=s.eval_every, eval_batches=s.eval_batches or None,
                       log_every=10, ckpt_every=max(s.steps // 2, 1), keep_last=1, seed=arm.seed, device="cpu",
                       precision="fp32", tensorboard=False)


def arm_dir(s: Settings, arm: Arm, data: Path) -> Path:
    """<out>/arms/<arch>-<hash of model, training settings and data>."""
    key = _hash({"model": arm.model, "train": train_config(s, arm).to_dict(), "data": data.name})
    return Path(s.out) / "arms" / f"{ARCH_LABEL[arm.model['architecture']]}-{key}"


def model_numbers(cfg: ModelConfig, seq_len: int) -> dict[str, Any]:
    """FLOPs, table memory and parameters of a config (no training needed)."""
    from memoryformer.research import flops as F

    breakdown = F.model_breakdown(cfg)
    counts = breakdown.total.counts
    out: dict[str, Any] = {
        "parameters": breakdown.total.total,
        "non_embedding_parameters": breakdown.total.total - counts["embedding"] - counts["head"],
        "table_parameters": counts["tables"],
        "table_mb_fp16": counts["tables"] * 2 / 1e6,
        "forward_flops_per_token": F.forward_flops_per_token(cfg, seq_len),
        "block_flops_paper": F.paper_flops(cfg, seq_len, attention=False),
        "block_flops_paper_with_attention": F.paper_flops(cfg, seq_len),
    }
    if cfg.architecture == "memoryformer":
        k = cfg.num_tables
        out["q_layer_table_mb_fp16"] = F.memory_table_bytes(k, cfg.tau, cfg.d_model) / 1e6
        out["memory_block_table_mb_fp16"] = F.memory_block_table_bytes(k, cfg.tau, cfg.d_model, cfg.expanding_bits) / 1e6
        out["q_layer_flops_paper"] = F.paper_memory_layer_flops(seq_len, k, cfg.tau, cfg.d_model)
    return out


def run_arm(s: Settings, arm: Arm, data: Path) -> dict[str, Any]:
    """Train one arm (or reuse its finished run) and return its result row."""
    from memoryformer.data import TokenData
    from memoryformer.research.analysis import BucketCounter, usage_hook, usage_summary
    from memoryformer.train import train, validation_loss

    out = arm_dir(s, arm, data)
    cached = out / "arm.json"
    if cached.is_file():
        row = json.loads(cached.read_text())
        row.update(name=arm.name, labels=arm.labels)  # the same run can serve several experiments
        print(f"  {arm.name}: cached, val loss {row['val_loss']:.4f} ({out})", flush=True)
        return row
    cfg = arm.model_config()
    tokens = TokenData(data)
    is_mf = cfg.architecture == "memoryformer"
    hook = usage_hook(tokens, s.seq_len, s.usage_windows) if is_mf and s.usage_windows else None
    print(f"  {arm.name}: training {s.steps} steps -> {out}", flush=True)
    t0 = time.perf_counter()
    res = train(cfg, train_config(s, arm), data, out, resume="auto", progress=s.progress, verbose=False,
                on_eval=hook)
    if not res.finished:
        raise RuntimeError(f"arm {arm.name!r} stopped at step {res.step} of {s.steps} ({res.interrupted}); rerun "
                           "the same command to resume it")
    model = res.model.eval()
    counter = BucketCounter(model) if is_mf else None
    with counter or contextlib.nullcontext():
        val = validation_loss(model, tokens, s.seq_len, batch_size=16)  # every held-out window
    tail = res.losses[-max(1, len(res.losses) // 10):]
    row: dict[str, Any] = {
        "name": arm.name, "labels": arm.labels, "architecture": cfg.architecture, "lr": arm.lr, "seed": arm.seed,
        "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
        "tau": cfg.tau if is_mf else None, "num_tables": cfg.num_tables if is_mf else None,
        "expanding_bits": cfg.expanding_bits if is_mf else None, "weighting": cfg.weighting if is_mf else None,
        "temperature": cfg.temperature if is_mf else None,
        "activation": (cfg.memory_block_activation or "none") if is_mf else None,
        "steps": res.step, "batch_size": s.batch_size, "seq_len": s.seq_len, "train_tokens": res.tokens,
        "val_loss": val["loss"], "val_ppl": val["ppl"], "val_tokens": val["tokens"],
        "train_loss_end": statistics.fmean(tail),
        "train_tokens_per_s": res.tokens_per_s, "wall_s": time.perf_counter() - t0,
        **model_numbers(cfg, s.seq_len),
        "evals": res.evals, "run_dir": str(out),
    }
    if counter is not None:
        row["usage_val"] = usage_summary(counter.counts)  # over the whole held-out split
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished: model.safetensors and arm.json stay
    cached.write_text(json.dumps(row, indent=1) + "\n")
    print(f"  {arm.name}: val loss {row['val_loss']:.4f} (ppl {row['val_ppl']:.2f}), "
          f"{row['train_tokens_per_s']:,.0f} tokens/s, {row['wall_s']:.0f} s", flush=True)
    return row


# ---------------------------------------------------------------------------------------------
# Running an experiment
# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


def command_line(name: str, s: Settings) -> str:
    return f"memoryformer reproduce {name}" + (f" {s.command}" if s.command else "")


def run_experiment(name: str, s: Settings, *, arms: list[Arm] | None = None) -> dict[str, Any]:
    """Run (or reuse) every arm of one experiment; write <results>/<name>.json, .md and plots.

    `arms` overrides the experiment's own list (tests)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(ORDER)} or all")
    exp = EXPERIMENTS[name]
    torch.set_num_threads(s.threads)
    data = prepare_data(s)
    print(f"== {name}: {exp.title} ({exp.paper}) ==", flush=True)
    todo = list(arms) if arms is not None else exp.arms(s)
    rows = [run_arm(s, a, data) for a in todo]
    if arms is None and exp.followup is not None:
        rows += [run_arm(s, a, data) for a in exp.followup(s, rows)]
    results = Path(s.results)
    results.mkdir(parents=True, exist_ok=True)
    from memoryformer.data import TokenData

    meta = TokenData(data).meta
    report: dict[str, Any] = {
        "experiment": name, "title": exp.title, "paper": exp.paper, "question": exp.question,
        "command": command_line(name, s), "machine": machine(), "settings": s.to_dict(),
        "data": {"path": str(data), **{k: meta.get(k) for k in ("source", "tokenizer_source", "vocab_size",
                                                               "train_tokens", "val_tokens", "text_bytes")}},
        "paper_results": PAPER_RESULTS.get(name),
        "rows": [{k: v for k, v in r.items() if k != "evals"} for r in rows],
        "plots": [],
    }
    report["summary"] = SUMMARIES.get(name, _reference_summary)(s, rows)
    report["paper_delta_nats"] = paper_deltas(name)
    report["plots"] = [str(p) for p in PLOTS.get(name, _plot_bars)(s, name, rows, results, data)]
    if name == "usage":
        stats = json.loads((results / "usage_stats.json").read_text())
        report["summary"]["figure4"] = {"arm": stats["arm"], "tokens_per_split": stats["windows"] * stats["seq_len"],
                                        **stats["summary"]}
        report["summary"]["during_training"] = {
            r["name"]: [{k: v for k, v in e.items() if k == "step" or k.startswith("usage_")} for e in r["evals"]]
            for r in rows}
    (results / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (results / f"{name}.md").write_text(format_report(report, exp) + "\n")
    print(f"wrote {results / (name + '.json')} and .md", flush=True)
    return report


def run(name: str, s: Settings) -> dict[str, dict[str, Any]]:
    """One experiment, or "all" of them in order (arms shared between experiments run once)."""
    names = ORDER if name == "all" else (name,)
    return {n: run_experiment(n, s) for n in names}


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


def _plot_bars(s: Settings, name: str, rows: Sequence[dict[str, Any]], results: Path, data: Path) -> list[Path]:
    from memoryformer.research.analysis import plot_arms

    exp = EXPERIMENTS[name]
    return [plot_arms(rows, results / f"{name}.png", label="name",
                      title=f"{exp.paper}: {exp.title} (held-out loss, same tokens)")]


def _plot_twin(s: Settings, name: str, rows: Sequence[dict[str, Any]], results: Path, data: Path) -> list[Path]:
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


def _plot_usage(s: Settings, name: str, rows: Sequence[dict[str, Any]], results: Path, data: Path) -> list[Path]:
    """Figure 4 of the reference arm (train and held-out text) and usage during training."""
    from memoryformer.data import TokenData
    from memoryformer.research.analysis import (
        bucket_counts,
        data_windows,
        dead_share,
        entropy,
        plot_bucket_histograms,
        plot_usage_during_training,
        usage_summary,
    )
    from memoryformer.train.checkpoint import load_model

    row = rows[0]
    model, _ = load_model(row["run_dir"])
    tokens = TokenData(data)
    counts = {split: bucket_counts(model, data_windows(tokens, split, s.seq_len, s.figure4_windows))
              for split in ("train", "val")}
    stats = {split: usage_summary(c) for split, c in counts.items()}
    per_table = {split: {n: {"entropy": [round(v, 5) for v in entropy(c).tolist()],
                             "dead_share": dead_share(c).tolist()} for n, c in cs.items() if n.startswith("blocks.0.")}
                 for split, cs in counts.items()}
    (results / "usage_stats.json").write_text(json.dumps(
        {"arm": row["name"], "windows": s.figure4_windows, "seq_len": s.seq_len, "summary": stats,
         "block0_tables": per_table}, indent=1) + "\n")
    row["usage"] = stats
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
    s, m, rows = report["settings"], report["machine"], report["rows"]
    lines = [f"# {exp.title} ({exp.paper})", "", exp.question, ""]
    ref = report["summary"].get("delta_val_loss") or {}
    paper = (report.get("paper_results") or {}).get("val_ppl")
    head = ["arm", *exp.columns, "LR", "seed", "held-out loss", "held-out PPL"]
    if ref:
        head.append("vs reference")
    deltas = report.get("paper_delta_nats") or {}
    if paper:
        head.append("paper val PPL")
    if deltas:
        head.append("paper vs reference")
    head += [h for _, h in exp.extra]
    head += ["fwd FLOPs/token", "tables (fp16 MB)", "params", "non-emb. params", "train tokens/s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
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
    lines += _summary_lines(report)
    usage_rows = [r for r in rows if r.get("usage_val")]
    if usage_rows:
        lines += ["", "Bucket usage on held-out text at the end of training (mean over blocks and tables; "
                  "entropy as a share of log 2^tau, and the share of buckets never hit):", "",
                  "| arm | " + " | ".join(f"{k} H / dead" for k in ("Q", "ML1", "ML2")) + " |", "|---|---|---|---|"]
        for r in usage_rows:
            u = r["usage_val"]
            lines.append(f"| {r['name']} | " + " | ".join(
                f"{u[k]['entropy_ratio']:.3f} / {u[k]['dead_share']:.1%}" if k in u else "" for k in ("Q", "ML1", "ML2"))
                + " |")
    lines += ["", "## How this was run", "",
              f"    {report['command']}", "",
              f"- Machine: {m['cpu']}, {m['cores']} cores shared with other users, torch {m['torch']} with "
              f"{m['torch_threads']} thread(s), {m['platform']}. Tokens/s are noisy under that load; the losses "
              "are deterministic.",
              f"- Data: {report['data'].get('source')}; {report['data'].get('tokenizer_source')}; "
              f"{report['data'].get('train_tokens'):,} training and {report['data'].get('val_tokens'):,} held-out "
              "tokens.",
              f"- Every arm: {s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens "
              f"({s['steps'] * s['batch_size'] * s['seq_len']:,} tokens, the same batches), AdamW (0.9, 0.95), weight "
              f"decay 0.1, clip 1.0, {s['warmup_frac']:.0%} warmup then cosine to 0.1x, fp32. Held-out loss over "
              "every window of the held-out split.",
              "- fwd FLOPs/token: 2 FLOPs per multiply-add, structural count of what the code executes (blocks, "
              "attention and LM head). Tables: every hash table, at 2 bytes per value as the paper counts memory.",
              ]
    if report.get("plots"):
        lines += ["- Plots: " + ", ".join(f"[{Path(p).name}]({Path(p).name})" for p in report["plots"])]
    return "\n".join(lines)


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
