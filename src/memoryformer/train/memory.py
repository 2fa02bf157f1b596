"""How many bytes a model needs, from its config alone, and a check against what the machine has.

    estimate = estimate_memory(config, training=True, batch_size=16, seq_len=256)
    check_memory(estimate, torch.device("cpu"), what="mf-small")   # raises NotEnoughMemory when it cannot fit

The model is built on the meta device (no storage), so even a preset of billions of parameters is
counted in milliseconds. Terms, in bytes:

- weights: every parameter and buffer, at `weight_bytes` per value (4: fp32, as training keeps them);
- training adds gradients (one per parameter; a Memory Layer's table gradient is dense, as
  `embedding_bag`'s is) and AdamW's two fp32 moments per parameter;
- activations, a rough term for the batch: per layer and token, 34 * d_model + 5 * n_heads * seq values
  kept for the backward pass (the usual transformer estimate, Korthikanti et al. 2022, at 2 bytes a
  value) plus the logits and their gradient, (batch, seq, vocab) twice in fp32. Inference keeps the
  logits of one batch only.

The estimate is a lower bound on what the allocator asks for; a run near the limit may still fail.
docs/training.md explains how to lower it (smaller batch with --grad-accum, FSDP over GPUs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from memoryformer.core.config import ModelConfig

GIB = 1024 ** 3


class NotEnoughMemory(ValueError):
    """The model cannot fit the memory the device has; the message gives the estimate and the free memory."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs, split by what holds them."""

    parameters: int  # number of parameter and buffer values
    weights: int
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        """`31.2 GiB (weights 7.3, gradients 7.3, AdamW 14.6, activations 2.0 GiB)`."""
        parts = [("weights", self.weights), ("gradients", self.gradients), ("AdamW", self.optimizer),
                 ("activations", self.activations)]
        shown = ", ".join(f"{name} {value / GIB:.1f}" for name, value in parts if value)
        return f"{self.total / GIB:.1f} GiB ({shown} GiB)"

    def to_dict(self) -> dict[str, int]:
        return {"parameters": self.parameters, "weights": self.weights, "gradients": self.gradients,
                "optimizer": self.optimizer, "activations": self.activations, "total": self.total}


def count_values(config: ModelConfig) -> int:
    """Parameter and buffer values of `LanguageModel(config)`, counted on the meta device."""
    from memoryformer.core.model import LanguageModel

    with torch.device("meta"):
        model = LanguageModel(config)
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}  # tied weights once
    return sum(t.numel() for t in tensors.values())


def activation_bytes(config: ModelConfig, batch_size: int, seq_len: int) -> int:
    """Rough bytes of what a training step keeps for its backward pass (see the module docstring)."""
    per_token_layer = 34 * config.d_model + 5 * config.n_heads * seq_len
    blocks = 2 * batch_size * seq_len * config.n_layers * per_token_layer
    logits = 2 * 4 * batch_size * seq_len * config.vocab_size
    return blocks + logits


def estimate_memory(config: ModelConfig, *, training: bool = False, batch_size: int = 1,
                    seq_len: int | None = None, weight_bytes: int = 4) -> MemoryEstimate:
    """Bytes of `config`'s model: weights only for inference (plus one batch of logits), or weights,
    gradients, AdamW state and activations for a training step of (batch_size, seq_len)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    seq_len = seq_len or config.max_seq_len
    values = count_values(config)
    weights = values * weight_bytes
    if not training:
        return MemoryEstimate(values, weights, activations=4 * batch_size * seq_len * config.vocab_size)
    return MemoryEstimate(values, weights, gradients=weights, optimizer=2 * 4 * values,
                          activations=activation_bytes(config, batch_size, seq_len))


def available_ram() -> int | None:
    """Bytes of RAM the OS can give without swapping (MemAvailable), or None when unknown."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """(free bytes, what they are) on `device`: free GPU memory on CUDA, available RAM elsewhere."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{device} has"
    return available_ram(), "this machine has"


def check_memory(estimate: MemoryEstimate, device: torch.device | str, *, what: str, force: bool = False) -> None:
    """Raise `NotEnoughMemory` when `estimate` exceeds the free memory of `device` (unless force)."""
    if force:
        return
    device = torch.device(device)
    free, holder = available_memory(device)
    if free is None or estimate.total <= free:
        return
    kind = "free GPU memory" if device.type == "cuda" else "RAM available"
    raise NotEnoughMemory(f"{what} needs about {estimate.describe()} but {holder} {free / GIB:.1f} GiB of "
                          f"{kind}; pass --force to try anyway")


def check_training_memory(model_config: ModelConfig, batch_size: int, seq_len: int | None, device: str | None,
                          *, fsdp: bool = False, force: bool = False) -> MemoryEstimate:
    """`memoryformer train`'s check before building the model: one process's weights, gradients, AdamW
    state and activations against the free memory of its device. FSDP shards the state: not checked."""
    from memoryformer.train.distributed import resolve_device

    estimate = estimate_memory(model_config, training=True, batch_size=batch_size, seq_len=seq_len)
    if not fsdp:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        check_memory(estimate, resolve_device(device, local_rank), force=force,
                     what=f"training this model ({estimate.parameters / 1e6:,.1f}M parameters) at batch {batch_size}")
    return estimate


def check_inference_memory(path: str | Path, device: torch.device | str, *, batch_size: int = 1,
                           seq_len: int | None = None, force: bool = False) -> MemoryEstimate | None:
    """`eval` / `generate`'s check before loading the model at `path`: its weights and one batch of
    logits against the free memory of `device`. None when the config cannot be read without the
    weights (then loading reports the problem)."""
    try:
        from memoryformer.integrations.hf import peek_config
    except ImportError:  # no transformers: HF directories cannot load anyway; run configs still can
        config = _run_config(Path(path))
    else:
        config = peek_config(path)
    if config is None:
        return None
    estimate = estimate_memory(config, batch_size=batch_size, seq_len=seq_len)
    check_memory(estimate, device, what=f"{path} ({estimate.parameters / 1e6:,.1f}M parameters)", force=force)
    return estimate


def _run_config(path: Path) -> ModelConfig | None:
    run = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else path.parent
    try:
        return ModelConfig.from_json(run / "config.json")
    except (OSError, ValueError, TypeError):
        return None
