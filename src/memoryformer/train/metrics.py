"""What a run reports: metrics.csv, TensorBoard, W&B, and the throughput of its steps.

metrics.csv is rewritten atomically when a run resumes (rows after the checkpoint are dropped) or
gains a column (an `on_eval` metric); otherwise each row is appended and flushed.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memoryformer.core.config import ModelConfig
from memoryformer.train import distributed as D
from memoryformer.train.files import atomic_write_text, reporting_full_disk

CSV_FIELDS = ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "model_flops_per_s",
              "val_loss", "val_ppl", "elapsed_s")


def flops_per_token(model_config: ModelConfig, seq_len: int, model: nn.Module | None = None) -> float:
    """Training FLOPs per token: the structural count of memoryformer.research.flops (head included).
    `model` is accepted for callers that have one; the count needs only the config."""
    from memoryformer.research.flops import training_flops_per_token

    return float(training_flops_per_token(model_config, seq_len))


def read_metrics(path: Path, up_to_step: int) -> tuple[list[str], list[dict[str, str]]]:
    """(extra column names, rows with step <= up_to_step) of a metrics.csv; a partial last line
    (a write cut by a kill) is left out."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} cannot be read as the run's metrics CSV ({err}); move it aside to "
                         "continue the run") from None
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    try:
        reader = csv.DictReader(io.StringIO(text))
        rows = [r for r in reader if (r.get("step") or "").isdigit() and int(r["step"]) <= up_to_step]
    except csv.Error as err:
        raise ValueError(f"{path} is not a valid metrics CSV ({err}); move it aside to continue the run") from None
    return [k for k in reader.fieldnames or () if k not in CSV_FIELDS], rows


class MetricsLog:
    """Rows of out_dir/metrics.csv, TensorBoard scalars under out_dir/tb, optional W&B; rank 0 only."""

    def __init__(self, out_dir: Path, *, start_step: int, tensorboard: bool, wandb_project: str | None,
                 run_config: dict[str, Any], say: Callable[[str], None]) -> None:
        self.path = out_dir / "metrics.csv"
        self._fields = list(CSV_FIELDS)  # plus any extra columns (on_eval metrics), in order of appearance
        self._file: Any = None
        rows: list[dict[str, str]] = []
        if start_step > 0 and self.path.is_file():  # resume: drop rows logged after the checkpoint
            extra, rows = read_metrics(self.path, start_step)
            self._fields += extra
        self._rewrite(rows)
        self.tb = _tensorboard(out_dir, start_step, say) if tensorboard else None
        self.wandb = _wandb(out_dir, wandb_project, run_config) if wandb_project else None

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        """Replace the file atomically by the header and `rows`, then append to it."""
        if self._file is not None:
            self._file.close()
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self._fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buffer.getvalue())
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self._fields, extrasaction="ignore")

    def row(self, **values: Any) -> None:
        new = [k for k in values if k not in self._fields]
        if new:  # a new column (an on_eval metric): rewrite the small file under the wider header
            self._file.close()
            _, rows = read_metrics(self.path, 2**62)
            self._fields += new
            self._rewrite(rows)
        with reporting_full_disk(self.path):
            self._writer.writerow({k: ("" if v is None else v) for k, v in values.items()})
            self._file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # a full disk: the rows already flushed are what survives
                pass
            self._file = None
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _tensorboard(out_dir: Path, start_step: int, say: Callable[[str], None]):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        say("tensorboard is not installed: logging to metrics.csv only (pip install tensorboard)")
        return None
    return SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 if start_step else None)


def _wandb(out_dir: Path, project: str, run_config: dict[str, Any]):
    try:
        import wandb
    except ImportError:
        raise ValueError("wandb logging was asked for but wandb is not installed; pip install wandb "
                         "or drop the wandb setting") from None
    return wandb.init(project=project, name=out_dir.name, dir=str(out_dir), config=run_config, resume="allow")


@dataclass
class Interval:
    """The steps logged together: per-step losses, LRs and gradient norms, and their throughput."""

    first_step: int
    losses: list[float]
    lrs: list[float]
    grad_norms: list[float]
    seconds: float
    tokens_per_s: float

    @property
    def last_step(self) -> int:
        return self.first_step + len(self.losses) - 1


@dataclass
class StepStats:
    """Step results waiting for one device sync per log interval, and the steady throughput
    (the very first step of a process, with its warm-up and compilation, left out)."""

    tokens_per_step: int
    pending: list[tuple[torch.Tensor, float, torch.Tensor]] = field(default_factory=list)
    interval_start: float = field(default_factory=time.perf_counter)
    first_interval: bool = True
    steady_tokens: float = 0.0
    steady_seconds: float = 0.0

    def add(self, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor) -> None:
        self.pending.append((loss.detach(), lr, grad_norm.detach()))

    def restart_clock(self) -> None:
        """Leave what happened since the last step (evaluation, a checkpoint) out of the throughput."""
        self.interval_start = time.perf_counter()

    @property
    def steady_tokens_per_s(self) -> float:
        return self.steady_tokens / self.steady_seconds if self.steady_seconds > 0 else 0.0

    def flush(self, first_step: int, env: D.DistEnv) -> Interval | None:
        """Reduce the pending steps' losses over ranks (mean); None when nothing is pending."""
        if not self.pending:
            return None
        n = len(self.pending)
        losses = D.all_reduce(torch.stack([p[0] for p in self.pending]).float(), env, "mean").tolist()
        norms = torch.stack([p[2] for p in self.pending]).float().tolist()
        lrs = [p[1] for p in self.pending]
        seconds = time.perf_counter() - self.interval_start
        tokens = n * self.tokens_per_step
        if not self.first_interval or n > 1:
            counted = tokens if not self.first_interval else tokens * (n - 1) / n
            self.steady_tokens += counted
            self.steady_seconds += seconds * counted / tokens
        self.first_interval = False
        self.pending = []
        self.restart_clock()
        return Interval(first_step, losses, lrs, norms, seconds, tokens / seconds if seconds > 0 else 0.0)
