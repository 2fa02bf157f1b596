"""TrainConfig (every setting of a run but the model's) and the paper's peak learning rates.

Batch sizes: `batch_size` sequences per device per micro-step; one optimizer step sees the global
batch `batch_size * grad_accum * world_size` sequences of `seq_len` tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from memoryformer.core.config import PRESETS, JsonConfig, ModelConfig

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
    ckpt_every_minutes: float = 30.0  # also save when this much wall clock passed since the last save; 0: off
    keep_last: int = 3  # 0: keep every checkpoint
    seed: int = 0
    shuffle: str = "epoch"  # "epoch" (every window once per epoch) or "random" (random offsets)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere; fp16 uses a GradScaler
    compile: bool = False
    device: str = "auto"
    fsdp: bool = False
    tensorboard: bool = True
    wandb: str | None = None  # a Weights & Biases project name, or None
    init_from: str | None = None  # a run or checkpoint whose weights start a new run (e.g. `memoryformer convert`'s)
    teacher: str | None = None  # a run or checkpoint to distil from (docs/convert.md); None: plain training
    distill_alpha: float = 0.5  # with a teacher: loss = (1 - alpha) CE + alpha T^2 KL(teacher || student)
    distill_temperature: float = 1.0

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
        need(self.ckpt_every_minutes >= 0, f"ckpt_every_minutes must be >= 0, got {self.ckpt_every_minutes}")
        need(self.seq_len is None or self.seq_len >= 1, f"seq_len must be >= 1, got {self.seq_len}")
        need(self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0.0 <= self.distill_alpha <= 1.0, f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        need(self.distill_temperature > 0, f"distill_temperature must be positive, got {self.distill_temperature}")
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


# Settings whose change on resume means the resumed run is not the run that was started.
RECIPE_FIELDS = ("grad_accum", "batch_size", "seq_len", "max_steps", "lr", "min_lr_ratio", "warmup_frac",
                 "warmup_steps", "weight_decay", "betas", "eps", "grad_clip", "seed", "shuffle")
