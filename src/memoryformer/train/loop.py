"""The training loop: TrainConfig, the Pythia recipe (docs/training.md), logging, checkpoints, DDP / FSDP2.

Recipe: AdamW (betas 0.9 / 0.95, eps 1e-8), weight decay 0.1 on tables, embedding, head and dense
weights but not on biases or norm parameters; linear warmup over 1% of the steps, then cosine to
0.1 x the peak LR at the last step; gradients clipped to norm 1.0. The paper's LRs are 3 x the
Pythia twin's (`paper_lr`).

    from memoryformer import ModelConfig
    from memoryformer.train.loop import TrainConfig, train
    result = train(ModelConfig.from_preset("mf-demo"), TrainConfig(max_steps=500, batch_size=16),
                   "data/tokens", "runs/mf-demo")
    result.losses, result.evals, result.val_ppl, result.tokens_per_s

Batch sizes: `batch_size` sequences per device per micro-step; one optimizer step sees the global
batch `batch_size * grad_accum * world_size` sequences of `seq_len` tokens.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memoryformer.core.config import PRESETS, JsonConfig, ModelConfig
from memoryformer.train import checkpoint as ckpt
from memoryformer.train import distributed as D

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Peak learning rates of the paper (section 3 of the paper): MemoryFormer uses 3 x its Pythia twin's.
PAPER_LR = {
    "mf-tiny": 3e-3, "mf-small": 1.8e-3, "mf-base": 9e-4,
    "pythia-70m": 1e-3, "pythia-160m": 6e-4, "pythia-410m": 3e-4,
}


def paper_lr(model: ModelConfig | str) -> float:
    """The paper's peak LR for a preset name or a config (matched on the paper's depth and width;
    smaller models get the tiny pair's 3e-3 / 1e-3)."""
    if isinstance(model, str):
        if model in PAPER_LR:
            return PAPER_LR[model]
        if model not in PRESETS:
            raise ValueError(f"unknown preset {model!r}; known presets: {', '.join(PRESETS)}")
        model = ModelConfig.from_preset(model)
    for name, lr in PAPER_LR.items():
        preset = PRESETS[name]
        if (preset["architecture"], preset["n_layers"], preset["d_model"]) == (
                model.architecture, model.n_layers, model.d_model):
            return lr
    return PAPER_LR["mf-tiny"] if model.architecture == "memoryformer" else PAPER_LR["pythia-70m"]


# ---------------------------------------------------------------------------------------------
# TrainConfig
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig(JsonConfig):
    """Every setting of a training run (the model's are in ModelConfig)."""

    batch_size: int = 8  # sequences per device per micro-step
    grad_accum: int = 1
    seq_len: int | None = None  # None: the model's max_seq_len
    max_steps: int = 1000
    lr: float | None = None  # None: paper_lr(model config)
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.01
    warmup_steps: int | None = None  # overrides warmup_frac
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    eval_every: int = 200  # 0: only at the end
    eval_batches: int | None = 20  # validation windows = eval_batches x the global batch; None or 0: the whole split
    log_every: int = 10
    ckpt_every: int = 500  # 0: only at the end (and on a stop signal)
    keep_last: int = 3  # 0: keep every checkpoint
    seed: int = 0
    shuffle: str = "epoch"  # "epoch" (every window once per epoch) or "random" (random offsets)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere; fp16 uses a GradScaler
    compile: bool = False
    device: str = "auto"
    fsdp: bool = False
    tensorboard: bool = True
    wandb: str | None = None  # a Weights & Biases project name, or None

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"TrainConfig: {msg}")

        for name in ("batch_size", "grad_accum", "max_steps", "log_every"):
            need(int(getattr(self, name)) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "keep_last", "seed"):
            need(int(getattr(self, name)) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.seq_len is None or self.seq_len >= 1, f"seq_len must be >= 1, got {self.seq_len}")
        need(self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0.0 <= self.warmup_frac < 1.0, f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        need(self.warmup_steps is None or self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), f"betas must be two numbers in [0, 1), got {self.betas}")
        need(self.eps > 0, f"eps must be positive, got {self.eps}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        need(self.eval_batches is None or self.eval_batches >= 0, f"eval_batches must be >= 0, got {self.eval_batches}")
        need(self.shuffle in ("epoch", "random"), f"shuffle must be 'epoch' or 'random', got {self.shuffle!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    @property
    def resolved_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, self.max_steps)
        return int(round(self.warmup_frac * self.max_steps))

    def resolved_precision(self, device: torch.device) -> str:
        if self.precision != "auto":
            return self.precision
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------


def _norm_types() -> tuple[type, ...]:
    from memoryformer.core.model import RMSNorm

    types: list[type] = [nn.LayerNorm, nn.GroupNorm, RMSNorm]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    return tuple(types)


def decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names with weight decay, names without): no decay on `.bias` and on parameters of norm
    modules (RMSNorm, LayerNorm); decay on everything else (tables, embedding, head, dense weights).
    A parameter shared by two modules (tied embedding) is listed once."""
    norms = _norm_types()
    decay, no_decay, seen = [], [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            full = f"{module_name}.{name}" if module_name else name
            (no_decay if isinstance(module, norms) or name == "bias" else decay).append(full)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: [{params with decay, weight_decay}, {params without, 0.0}]."""
    decay, no_decay = decay_split(model)
    params = dict(model.named_parameters())
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig, lr: float, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over param_groups(model); fused=True for the CUDA fused kernel."""
    return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=lr, betas=config.betas,
                             eps=config.eps, fused=True if fused else None)


class WarmupCosine:
    """LR multiplier of update `step` (0-based): linear warmup (step + 1) / warmup over the first
    `warmup` updates, then cosine from 1 at update `warmup` to `min_ratio` at update max_steps - 1."""

    def __init__(self, warmup: int, max_steps: int, min_ratio: float) -> None:
        self.warmup, self.max_steps, self.min_ratio = int(warmup), int(max_steps), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = self.max_steps - 1 - self.warmup
        progress = min(1.0, (step - self.warmup) / span) if span > 0 else 0.0
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, config: TrainConfig, peak_lr: float | None = None) -> float:
    """The LR of update `step` (0-based) under config's schedule."""
    peak = peak_lr if peak_lr is not None else config.lr
    if peak is None:
        raise ValueError("lr_at needs a peak LR: set config.lr or pass peak_lr")
    return peak * WarmupCosine(config.resolved_warmup_steps, config.max_steps, config.min_lr_ratio)(step)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(config.resolved_warmup_steps, config.max_steps, config.min_lr_ratio))


def _restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any], config: TrainConfig) -> None:
    """Load a scheduler's position, but follow `config`'s schedule (its peak LR and max_steps may have
    changed on resume) and set the optimizer's LRs to it."""
    scheduler.load_state_dict(state)
    schedule = WarmupCosine(config.resolved_warmup_steps, config.max_steps, config.min_lr_ratio)
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [config.lr for _ in groups]
    scheduler.lr_lambdas = [schedule for _ in groups]
    for group in groups:
        group["initial_lr"] = config.lr
        group["lr"] = config.lr * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


def flops_per_token(model_config: ModelConfig, seq_len: int, model: nn.Module | None = None) -> float:
    """Training FLOPs per token (memoryformer.research.flops when present, else 6 x non-embedding parameters)."""
    try:
        from memoryformer.research.flops import training_flops_per_token
    except ImportError:
        training_flops_per_token = None
    if training_flops_per_token is not None:
        return float(training_flops_per_token(model_config, seq_len))
    if model is None:
        from memoryformer.core.model import LanguageModel

        with torch.device("meta"):
            model = LanguageModel(model_config)
    return 6.0 * model.num_parameters(exclude_embeddings=True)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


@torch.no_grad()
def validation_loss(model: nn.Module, data, seq_len: int, batch_size: int = 8, *, max_windows: int | None = None,
                    env: D.DistEnv | None = None, precision: str = "fp32", sharded: bool = False) -> dict[str, float]:
    """Mean next-token loss over the validation split's non-overlapping windows (or the first max_windows).

    Returns {"loss", "ppl", "tokens"}. Distributed: each rank scores its share of the windows and the
    sums are all-reduced; a sharded (FSDP) model runs the same number of forwards on every rank."""
    env = env or D.DistEnv(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=env.device)  # (sum of token losses, tokens)
    batches = 0
    for x, y in data.eval_batches("val", batch_size, seq_len, rank=env.rank, world_size=env.world_size,
                                  max_windows=max_windows, device=env.device):
        with _autocast(env.device, precision):
            _, loss = model(x, y)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
        batches += 1
    if sharded and env.distributed:  # rank 0 has the most windows; others pad with throw-away forwards
        windows = min(data.num_eval_windows("val", seq_len), max_windows or sys.maxsize)
        target = math.ceil(len(range(0, windows, env.world_size)) / batch_size)
        dummy = torch.zeros(1, seq_len, dtype=torch.long, device=env.device)
        for _ in range(target - batches):
            with _autocast(env.device, precision):
                model(dummy)
    D.all_reduce(total, env)
    model.train(was_training)
    loss = (total[0] / total[1]).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(total[1].item())}


# ---------------------------------------------------------------------------------------------
# Logging: CSV, TensorBoard, W&B
# ---------------------------------------------------------------------------------------------

CSV_FIELDS = ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "model_flops_per_s",
              "val_loss", "val_ppl", "elapsed_s")


class MetricsLog:
    """Rows of out_dir/metrics.csv, TensorBoard scalars under out_dir/tb, optional W&B; rank 0 only."""

    def __init__(self, out_dir: Path, *, start_step: int, tensorboard: bool, wandb_project: str | None,
                 run_config: dict[str, Any], say) -> None:
        self.path = out_dir / "metrics.csv"
        rows: list[dict[str, str]] = []
        self._fields = list(CSV_FIELDS)  # plus any extra columns (on_eval metrics), in order of appearance
        if start_step > 0 and self.path.is_file():  # resume: drop rows logged after the checkpoint
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                rows = [r for r in reader if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
                self._fields += [k for k in reader.fieldnames or () if k not in self._fields]
        self._rewrite(rows)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                say("tensorboard is not installed: logging to metrics.csv only (pip install tensorboard)")
            else:
                self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError("wandb logging was asked for but wandb is not installed; pip install wandb "
                                 "or drop the wandb setting") from None
            self.wandb = wandb.init(project=wandb_project, name=out_dir.name, dir=str(out_dir),
                                    config=run_config, resume="allow")

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        self._file = open(self.path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self._fields, extrasaction="ignore")
        self._writer.writeheader()
        self._writer.writerows(rows)
        self._file.flush()

    def row(self, **values: Any) -> None:
        new = [k for k in values if k not in self._fields]
        if new:  # a new column (an on_eval metric): rewrite the small file under the wider header
            self._file.close()
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            self._fields += new
            self._rewrite(rows)
        self._writer.writerow({k: ("" if v is None else v) for k, v in values.items()})
        self._file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# ---------------------------------------------------------------------------------------------
# Stop signals
# ---------------------------------------------------------------------------------------------


class StopSignals:
    """While active, SIGINT and SIGTERM only set `signum`; the loop then checkpoints and stops.
    A second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a run did. Lists are indexed by step - 1 and cover the whole run, resumed parts included."""

    out_dir: str
    model_config: dict[str, Any]
    train_config: dict[str, Any]
    losses: list[float] = field(default_factory=list)  # training loss of each step (mean over micro-batches and ranks)
    lrs: list[float] = field(default_factory=list)  # LR used by each step
    grad_norms: list[float] = field(default_factory=list)  # gradient norm before clipping
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step", "tokens", "val_loss", "val_ppl"}
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen
    tokens_per_step: int = 0
    tokens_per_s: float = 0.0  # steady throughput of this process's last run (first step left out)
    flops_per_token: float = 0.0
    model_flops_per_s: float = 0.0
    train_seconds: float = 0.0  # time in training steps, all runs (evaluation and checkpoints left out)
    elapsed_seconds: float = 0.0  # wall time, all runs
    world_size: int = 1
    precision: str = "fp32"
    finished: bool = False  # True when max_steps was reached
    interrupted: str | None = None  # the signal's name when a signal stopped the run
    checkpoint: str | None = None  # the last checkpoint written
    weights: str | None = None  # out_dir/model.safetensors when written
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # the trained model (FSDP: sharded)

    @property
    def steps(self) -> list[int]:
        return list(range(1, len(self.losses) + 1))

    @property
    def val_loss(self) -> float | None:
        return self.evals[-1]["val_loss"] if self.evals else None

    @property
    def val_ppl(self) -> float | None:
        return self.evals[-1]["val_ppl"] if self.evals else None

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        data["val_loss"], data["val_ppl"] = self.val_loss, self.val_ppl
        return data

    def _history(self) -> dict[str, Any]:
        """The part carried across resumes (stored in checkpoints)."""
        return {"losses": self.losses, "lrs": self.lrs, "grad_norms": self.grad_norms, "evals": self.evals,
                "tokens": self.tokens, "train_seconds": self.train_seconds, "elapsed_seconds": self.elapsed_seconds,
                "tokens_per_s": self.tokens_per_s}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

# Settings whose change on resume means the resumed run is not the run that was started.
_RECIPE_FIELDS = ("grad_accum", "batch_size", "seq_len", "max_steps", "lr", "min_lr_ratio", "warmup_frac",
                  "warmup_steps", "weight_decay", "betas", "eps", "grad_clip", "seed", "shuffle")


def _check_inputs(model_config: ModelConfig, seq_len: int, data) -> None:
    if seq_len > model_config.max_seq_len:
        raise ValueError(f"seq_len {seq_len} is longer than the model's max_seq_len {model_config.max_seq_len}; "
                         f"use --seq-len {model_config.max_seq_len} or less")
    if data.vocab_size > model_config.vocab_size:
        raise ValueError(f"the data's vocabulary ({data.vocab_size} ids, {data.path}/meta.json) is larger than "
                         f"the model's vocab_size {model_config.vocab_size}; use a model with vocab_size >= "
                         f"{data.vocab_size} (e.g. --vocab-size {data.vocab_size}) or prepare the data with "
                         f"--vocab-size {model_config.vocab_size} or less")
    for split in ("train", "val"):
        data.check_seq_len(split, seq_len)


def _resume_target(out: Path, resume: bool | str) -> Path | None:
    latest = ckpt.latest_checkpoint(out)
    if resume == "auto":
        return latest
    if resume:
        if latest is None:
            raise FileNotFoundError(f"cannot resume: no checkpoint in {out / ckpt.CHECKPOINT_DIR}; start the "
                                    "run without --resume")
        return latest
    if latest is not None:
        raise ValueError(f"{out} already holds checkpoints (latest {latest.name}); pass --resume to continue "
                         "that run, or choose another --out")
    return None


def _load_resume_state(path: Path, model_config: ModelConfig, env: D.DistEnv) -> tuple[dict[str, Any], dict[str, Any]]:
    """(small state on every rank, {"model", "optimizer"} full states on rank 0). Errors on all ranks."""
    small: dict[str, Any] = {}
    big: dict[str, Any] = {}
    if env.is_main:
        try:
            state = ckpt.load_checkpoint(path)
            if state["model_config"] != model_config.to_dict():
                saved = state["model_config"]
                diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now"
                        for k, v in model_config.to_dict().items() if saved.get(k) != v]
                raise ckpt.CheckpointError(f"{path} was trained with another model config ({'; '.join(diff)}); "
                                           "resume with the same model, or start a new run in another --out")
            small = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
            big = {"model": state["model"], "optimizer": state.get("optimizer")}
        except (ckpt.CheckpointError, FileNotFoundError, ValueError) as err:
            small = {"error": str(err)}
    small = D.broadcast_object(small, env)
    if "error" in small:
        raise ckpt.CheckpointError(small["error"])
    return small, big


def train(model_config: ModelConfig, train_config: TrainConfig, data_dir: str | Path, out_dir: str | Path,
          resume: bool | str = False, *, stop_at_step: int | None = None, progress: bool = True,
          verbose: bool = True, on_eval: Callable[[nn.Module, int], dict[str, float]] | None = None,
          resume_hint: str = "continue with --resume") -> TrainResult:
    """Train a LanguageModel on a prepared data directory; write logs, checkpoints and weights to out_dir.

    resume: False starts a new run (error if out_dir already holds checkpoints); True continues
        from the latest checkpoint in out_dir (error if there is none); "auto" does whichever applies.
    stop_at_step: checkpoint and return after this step, keeping the schedule of max_steps (train
        in pieces; continue with resume=True). Weights are written only when max_steps is reached.
    on_eval: called as on_eval(model, step) after each validation (model in eval mode, no grad);
        the numbers it returns are stored in that step's `evals` entry and logged beside val_loss
        (metrics.csv columns, TensorBoard "val/<name>"). Under torchrun it runs on every rank.
    Under torchrun, every rank calls train(); rank 0 logs and writes. Returns a TrainResult on
    every rank (loss history, validation results, throughput; `.model` is the trained model).
    SIGINT / SIGTERM: the current step finishes, a checkpoint is written and the result comes
    back with `interrupted` set to the signal's name.
    """
    from memoryformer.core.model import LanguageModel
    from memoryformer.data import TokenData

    out = Path(out_dir)
    data = TokenData(data_dir)
    tc = train_config
    seq_len = tc.seq_len or model_config.max_seq_len
    _check_inputs(model_config, seq_len, data)
    tc = tc.replace(seq_len=seq_len, lr=tc.lr if tc.lr is not None else paper_lr(model_config))
    env = D.init_distributed(tc.device)
    decision: dict[str, Any] = {}
    if env.is_main:  # rank 0 decides (out_dir need only be visible to rank 0) and tells the others
        try:
            decision = {"path": _resume_target(out, resume)}
        except (FileNotFoundError, ValueError) as err:
            decision = {"error": err}
    decision = D.broadcast_object(decision, env)
    if "error" in decision:
        raise decision["error"]
    resume_from = decision["path"]
    result = _train(model_config, tc, data, out, resume_from, env, stop_at_step=stop_at_step, progress=progress,
                    verbose=verbose, make_model=lambda: LanguageModel(model_config), on_eval=on_eval,
                    resume_hint=resume_hint)
    D.barrier(env)  # rank 0's files are complete when any rank returns
    return result


def _train(model_config: ModelConfig, tc: TrainConfig, data, out: Path, resume_from: Path | None,
           env: D.DistEnv, *, stop_at_step: int | None, progress: bool, verbose: bool, make_model,
           on_eval: Callable[[nn.Module, int], dict[str, float]] | None = None,
           resume_hint: str = "continue with --resume") -> TrainResult:
    from tqdm.auto import tqdm

    bar = None

    def say(message: str) -> None:
        if verbose and env.is_main:
            (bar.write if bar is not None else print)(message, file=sys.stderr)

    wall_start = time.perf_counter()
    device = env.device
    precision = tc.resolved_precision(device)
    sharded = tc.fsdp and env.distributed
    if tc.fsdp and not env.distributed:
        say("--fsdp has no effect in a single process (launch with torchrun for sharding)")

    # ---- model, optimizer, schedule, data --------------------------------------------------
    ckpt.seed_everything(tc.seed)
    if sharded:
        core = D.build_sharded(make_model, env)
    else:
        core = make_model().to(device)
    fast = torch.compile(core) if tc.compile else core
    train_model = D.wrap_ddp(fast, env) if env.distributed and not sharded else fast
    optimizer = build_optimizer(core, tc, tc.lr, fused=device.type == "cuda" and not sharded)
    scheduler = build_scheduler(optimizer, tc)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    sampler = data.sampler("train", tc.batch_size, tc.seq_len, seed=tc.seed, shuffle=tc.shuffle, rank=env.rank,
                           world_size=env.world_size)
    tokens_per_step = tc.batch_size * tc.grad_accum * env.world_size * tc.seq_len
    fpt = flops_per_token(model_config, tc.seq_len, core if not sharded else None)
    result = TrainResult(str(out), model_config.to_dict(), tc.to_dict(), tokens_per_step=tokens_per_step,
                         flops_per_token=fpt, world_size=env.world_size, precision=precision)

    # ---- resume ------------------------------------------------------------------------------
    step = 0
    if resume_from is not None:
        small, big = _load_resume_state(resume_from, model_config, env)
        D.load_full_state(core, optimizer, big.get("model", {}), big.get("optimizer", {}) or {}, env)
        del big
        _restore_schedule(scheduler, small["scheduler"], tc)
        if scaler is not None and small.get("scaler"):
            scaler.load_state_dict(small["scaler"])
        sampler.load_state_dict(small["sampler"])
        rng = small.get("rng") or []
        if len(rng) == env.world_size:
            ckpt.restore_rng_state(rng[env.rank])
        step = int(small["step"])
        history = small.get("history") or {}
        for name in ("losses", "lrs", "grad_norms", "evals"):
            setattr(result, name, list(history.get(name, [])))
        result.tokens = int(history.get("tokens", 0))
        result.train_seconds = float(history.get("train_seconds", 0.0))
        result.elapsed_seconds = float(history.get("elapsed_seconds", 0.0))
        result.tokens_per_s = float(history.get("tokens_per_s", 0.0))
        saved_tc = small.get("train_config", {})
        changed = [f"{k} {saved_tc.get(k)!r} -> {v!r}" for k, v in tc.to_dict().items()
                   if k in _RECIPE_FIELDS and k in saved_tc and saved_tc[k] != v]
        if small.get("world_size", env.world_size) != env.world_size:
            changed.append(f"world_size {small.get('world_size')} -> {env.world_size}")
        say(f"resuming from {resume_from} (step {step})")
        if changed:
            say("warning: the run continues with changed settings: " + ", ".join(changed))
    elapsed_before = result.elapsed_seconds

    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(out)
        ckpt.write_run_files(out, model_config, tc.to_json(), data.path,
                             {"world_size": env.world_size, "fsdp": sharded, "precision": precision,
                              "device": str(device)})
    log = (MetricsLog(out, start_step=step, tensorboard=tc.tensorboard, wandb_project=tc.wandb,
                      run_config={"model": model_config.to_dict(), "train": tc.to_dict()}, say=say)
           if env.is_main else None)
    if step == 0:
        say(f"training {model_config.architecture} ({core.num_parameters() / 1e6:.2f}M parameters) on {device} x "
            f"{env.world_size}{' (FSDP2)' if sharded else ''}, {precision}: {tc.max_steps} steps of "
            f"{tokens_per_step} tokens, peak lr {tc.lr:g}")

    # ---- checkpoint writer -------------------------------------------------------------------
    def save(at_step: int) -> Path:
        model_state = D.full_model_state(core)
        optim_state = D.full_optimizer_state(core, optimizer)
        rng = D.gather_objects(ckpt.capture_rng_state(), env)
        path = ckpt.checkpoint_path(out, at_step)
        if env.is_main:
            result.elapsed_seconds = elapsed_before + time.perf_counter() - wall_start
            if steady_seconds > 0:
                result.tokens_per_s = steady_tokens / steady_seconds
            ckpt.save_checkpoint(path, {
                "step": at_step, "model": model_state, "optimizer": optim_state,
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "sampler": sampler.state_dict(), "rng": rng, "model_config": model_config.to_dict(),
                "train_config": tc.to_dict(), "history": result._history(), "world_size": env.world_size,
                "torch_version": str(torch.__version__)})
            ckpt.prune_checkpoints(out, tc.keep_last)
        result.checkpoint = str(path)
        return path

    # ---- training ------------------------------------------------------------------------------
    pending: list[tuple[torch.Tensor, float, torch.Tensor]] = []
    interval_start, interval_tokens = time.perf_counter(), 0
    first_interval = True
    steady_tokens, steady_seconds = 0, 0.0

    def flush() -> None:
        """Reduce the pending steps' losses over ranks and log them (one sync per log interval)."""
        nonlocal pending, interval_start, interval_tokens, first_interval, steady_tokens, steady_seconds
        if not pending:
            return
        losses = D.all_reduce(torch.stack([p[0] for p in pending]).float(), env, "mean").tolist()
        norms = torch.stack([p[2] for p in pending]).float().tolist()
        lrs = [p[1] for p in pending]
        seconds = time.perf_counter() - interval_start
        first = len(result.losses) + 1
        bad = [(first + i, v) for i, v in enumerate(losses) if not math.isfinite(v)]
        if bad and precision != "fp16":
            raise FloatingPointError(f"the training loss became {bad[0][1]} at step {bad[0][0]}; lower the "
                                     "learning rate (--lr) or train in fp32/bf16")
        result.losses += losses
        result.lrs += lrs
        result.grad_norms += norms
        result.train_seconds += seconds
        tps = interval_tokens / seconds if seconds > 0 else 0.0
        if not first_interval or len(pending) > 1:
            # leave the very first step (warm-up, compilation) out of the steady throughput
            counted = interval_tokens if not first_interval else interval_tokens * (len(pending) - 1) / len(pending)
            steady_tokens += counted
            steady_seconds += seconds * counted / interval_tokens
        first_interval = False
        if log is not None:
            step_now = first + len(losses) - 1
            mean_loss = sum(losses) / len(losses)
            elapsed = elapsed_before + time.perf_counter() - wall_start
            log.row(step=step_now, tokens=result.tokens, loss=f"{mean_loss:.6f}", lr=f"{lrs[-1]:.6g}",
                    grad_norm=f"{norms[-1]:.4f}", tokens_per_s=f"{tps:.1f}", model_flops_per_s=f"{tps * fpt:.4g}",
                    elapsed_s=f"{elapsed:.1f}")
            for i, (loss, lr, norm) in enumerate(zip(losses, lrs, norms)):
                log.scalars(first + i, {"train/loss": loss, "train/lr": lr, "train/grad_norm": norm})
            log.scalars(step_now, {"perf/tokens_per_s": tps, "perf/model_flops_per_s": tps * fpt})
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
        pending, interval_tokens = [], 0
        interval_start = time.perf_counter()

    def run_eval(at_step: int) -> None:
        global_batch = tc.batch_size * tc.grad_accum * env.world_size
        max_windows = tc.eval_batches * global_batch if tc.eval_batches else None
        res = validation_loss(fast, data, tc.seq_len, tc.batch_size, max_windows=max_windows, env=env,
                              precision=precision, sharded=sharded)
        entry = {"step": at_step, "tokens": result.tokens, "val_loss": res["loss"], "val_ppl": res["ppl"]}
        extra: dict[str, float] = {}
        if on_eval is not None:
            was_training = core.training
            core.eval()
            with torch.no_grad():
                extra = {k: float(v) for k, v in on_eval(core, at_step).items()}
            core.train(was_training)
        entry.update(extra)
        result.evals.append(entry)
        if log is not None:
            log.row(step=at_step, tokens=result.tokens, val_loss=f"{res['loss']:.6f}", val_ppl=f"{res['ppl']:.4f}",
                    elapsed_s=f"{elapsed_before + time.perf_counter() - wall_start:.1f}",
                    **{k: f"{v:.6g}" for k, v in extra.items()})
            log.scalars(at_step, {"val/loss": res["loss"], "val/ppl": res["ppl"],
                                  **{f"val/{k}": v for k, v in extra.items()}})
        say(f"step {at_step}: val loss {res['loss']:.4f}, ppl {res['ppl']:.2f}")

    params = [p for p in core.parameters() if p.requires_grad]
    clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
    saved_step = step if resume_from is not None else -1
    if env.is_main and progress:
        bar = tqdm(total=tc.max_steps, initial=step, desc="train", dynamic_ncols=True, disable=None)
    try:
        with StopSignals() as stop:
            train_model.train()
            while step < tc.max_steps:
                loss_sum = torch.zeros((), device=device)
                for micro in range(tc.grad_accum):
                    x, y = sampler.next_batch(device)
                    with D.gradient_sync(train_model, micro == tc.grad_accum - 1):
                        with _autocast(device, precision):
                            _, loss = train_model(x, y)
                        scaled = loss / tc.grad_accum
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    loss_sum += loss.detach().float()
                if scaler is not None:
                    scaler.unscale_(optimizer)
                norm = D.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, clip))
                lr_used = optimizer.param_groups[0]["lr"]
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                result.tokens += tokens_per_step
                pending.append((loss_sum / tc.grad_accum, lr_used, norm.detach()))
                interval_tokens += tokens_per_step
                if bar is not None:
                    bar.update(1)

                stopping = D.any_rank(stop.signum is not None, env)
                last = step == tc.max_steps
                pause = stop_at_step is not None and step >= stop_at_step and not last
                do_eval = not stopping and (last or (tc.eval_every and step % tc.eval_every == 0))
                do_ckpt = stopping or pause or last or (tc.ckpt_every and step % tc.ckpt_every == 0)
                if step % tc.log_every == 0 or do_eval or do_ckpt:
                    flush()
                if do_eval:
                    run_eval(step)
                if do_ckpt:
                    save(step)
                    saved_step = step
                if do_eval or do_ckpt:
                    interval_start = time.perf_counter()
                if stopping:
                    result.interrupted = stop.name or "signal on another rank"
                    say(f"stopped by {result.interrupted} at step {step}; checkpoint {result.checkpoint}; "
                        f"{resume_hint}")
                    break
                if pause:
                    say(f"stopped at step {step} (stop_at_step); checkpoint {result.checkpoint}")
                    break
            flush()
            if saved_step != step:  # resumed a finished run, or max_steps already reached
                save(step)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()

    # ---- the end -----------------------------------------------------------------------------------
    if steady_seconds > 0:
        result.tokens_per_s = steady_tokens / steady_seconds
    elif result.tokens_per_s == 0 and result.train_seconds > 0:  # one step only, or nothing left to train
        result.tokens_per_s = result.tokens / result.train_seconds
    result.model_flops_per_s = result.tokens_per_s * fpt
    result.step = step
    result.finished = step >= tc.max_steps
    result.elapsed_seconds = elapsed_before + time.perf_counter() - wall_start
    if result.finished:
        state = D.full_model_state(core)
        if env.is_main:
            result.weights = str(ckpt.save_model_weights(state, out / ckpt.WEIGHTS_FILE, model_config, step=step))
        del state
    if env.is_main:
        ckpt.atomic_write_text(out / "history.json", json.dumps(result.to_dict(), indent=1) + "\n")
        if result.evals and result.finished:
            say(f"done: {step} steps, val loss {result.val_loss:.4f}, ppl {result.val_ppl:.2f}, "
                f"{result.tokens_per_s:,.0f} tokens/s; weights in {result.weights}")
    result.model = core
    return result
