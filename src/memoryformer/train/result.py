"""TrainResult: what a run did (losses, evaluations, throughput), carried across resumes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn


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

    def history(self) -> dict[str, Any]:
        """The part carried across resumes (stored in checkpoints)."""
        return {"losses": self.losses, "lrs": self.lrs, "grad_norms": self.grad_norms, "evals": self.evals,
                "tokens": self.tokens, "train_seconds": self.train_seconds, "elapsed_seconds": self.elapsed_seconds,
                "tokens_per_s": self.tokens_per_s}

    def restore_history(self, history: dict[str, Any]) -> None:
        """Take back what history() stored (a resumed run continues the lists)."""
        for name in ("losses", "lrs", "grad_norms", "evals"):
            setattr(self, name, list(history.get(name, [])))
        self.tokens = int(history.get("tokens", 0))
        self.train_seconds = float(history.get("train_seconds", 0.0))
        self.elapsed_seconds = float(history.get("elapsed_seconds", 0.0))
        self.tokens_per_s = float(history.get("tokens_per_s", 0.0))
