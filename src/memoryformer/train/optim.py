"""The optimizer and the LR schedule of the Pythia recipe (docs/training.md).

AdamW (betas 0.9 / 0.95, eps 1e-8) with weight decay on every matrix (hash tables, embedding, head,
dense weights) and none on vectors (biases, norm parameters); linear warmup, then cosine to
`min_lr_ratio` x the peak at the last step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from memoryformer.kernels.grad_norms import GradNormTally
from memoryformer.train.config import TrainConfig


def decay_split(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names with weight decay, names without): decay on parameters with two or more dimensions
    (tables, embedding, head, dense weights), none on vectors (biases, RMSNorm / LayerNorm parameters).
    A parameter shared by two modules (tied embedding) is listed once, under its first name."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(name)
    return decay, no_decay

def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: [{params with decay, weight_decay}, {params without, 0.0}]."""
    decay, no_decay = decay_split(model)
    params = dict(model.named_parameters())
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]


def fused_adamw_supported(device: torch.device) -> bool:
    """torch's fused AdamW runs on CUDA, and on CPU from torch 2.4."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)


def build_optimizer(model: nn.Module, config: TrainConfig, lr: float, *, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over param_groups(model). fused=True: torch's fused kernel (one pass over each parameter,
    its gradient and its two moments; the same update as the per-tensor loop, up to rounding), which on
    CPU made AdamW over the scaling study's tables 3x faster (docs/performance.md)."""
    return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=lr, betas=config.betas,
                             eps=config.eps, fused=True if fused else None)


def clip_gradients(params: list[nn.Parameter], max_norm: float, *, sharded: bool,
                   tally: GradNormTally | None = None, scale: bool = True) -> torch.Tensor:
    """Scale the gradients so that their global 2-norm is at most max_norm; return the norm before.

    The same result as `torch.nn.utils.clip_grad_norm_`, which always multiplies every gradient (by 1 when
    the norm is under the limit) to avoid a device sync. On CPU a sync is free, so the multiply runs only
    when it changes something: a pass over every table gradient saved on most steps.

    tally: the squared norms the Memory Layer backward summed as it wrote the table gradients
    (`kernels.grad_norms`), used for the gradients they still describe, so that the norm reads only the
    other gradients: a second pass over every table gradient saved on every step. The kernel sums in
    float over 64 rows, then in float64, so the norm is closer to the exact one than torch's float32 sum (which at mf-tiny's
    33M-entry tables is off by up to 0.2%). scale=False: the norm only, for `step_clipped` (local CPU
    gradients only). Sharded (DTensor) and accelerator gradients keep torch's path."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    grads = [p.grad for p in params if p.grad is not None]
    if sharded or get_total_norm is None or not grads or any(g.device.type != "cpu" for g in grads):
        if not scale:
            raise ValueError("clip_gradients(scale=False) needs local CPU gradients and torch >= 2.6")
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = _total_norm(params, grads, tally, get_total_norm)
    if scale and clip_coefficient(norm, max_norm) < 1.0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def _total_norm(params: list[nn.Parameter], grads: list[torch.Tensor], tally: GradNormTally | None,
                get_total_norm) -> torch.Tensor:
    """The global 2-norm of grads (float32 scalar), using the tally's sums where they hold."""
    if tally is None or not len(tally):
        return get_total_norm(grads)
    known = [tally.sqnorm(p) for p in params if p.grad is not None]
    rest = [g for g, sq in zip(grads, known) if sq is None]
    total = sum(sq for sq in known if sq is not None)
    if rest:
        total += float(get_total_norm(rest)) ** 2
    return torch.tensor(math.sqrt(total), dtype=torch.float32)


def clip_coefficient(norm: torch.Tensor | float, max_norm: float) -> float:
    """clip_grad_norm_'s factor: max_norm / (norm + 1e-6), at most 1."""
    return min(1.0, max_norm / (float(norm) + 1e-6))


def folds_clipping(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step` can apply the clip factor itself: torch's fused AdamW divides every
    gradient by `optimizer.grad_scale` in the same pass as its update (the protocol GradScaler uses),
    which saves clipping's separate read of every gradient."""
    return (isinstance(optimizer, torch.optim.AdamW) and not hasattr(optimizer, "grad_scale")
            and hasattr(torch.nn.utils, "get_total_norm")
            and all(group.get("fused") for group in optimizer.param_groups)
            and all(p.device.type == "cpu" for group in optimizer.param_groups for p in group["params"]))


def clip_and_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float, *,
                  sharded: bool, tally: GradNormTally | None = None) -> torch.Tensor:
    """clip_gradients(params, max_norm, tally=tally), then optimizer.step(); return the norm before
    clipping. Where the optimizer `folds_clipping` and steps exactly `params`' gradients, the factor is
    applied inside the update (`step_clipped`) instead of by a multiply of its own. The tally is
    cleared afterwards."""
    def with_grads(ps) -> set[int]:
        return {id(p) for p in ps if p.grad is not None}

    # the factor inside the update scales every gradient the optimizer steps: only when those are params
    stepped = with_grads(p for group in optimizer.param_groups for p in group["params"])
    if sharded or not folds_clipping(optimizer) or stepped != with_grads(params):
        norm = clip_gradients(params, max_norm, sharded=sharded, tally=tally)
        optimizer.step()
    else:
        norm = clip_gradients(params, max_norm, sharded=False, tally=tally, scale=False)
        step_clipped(optimizer, params, norm, max_norm)
    if tally is not None:
        tally.clear()  # fused AdamW's write-back of clipped gradients does not bump their versions
    return norm


def step_clipped(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], norm: torch.Tensor,
                 max_norm: float) -> None:
    """optimizer.step() on the gradients clipped to max_norm, given their norm, for an optimizer that
    `folds_clipping`: each gradient is divided by 1 / factor inside the update (within an ulp or two of
    clip_grad_norm_'s product), and the gradients left behind are the clipped ones, as after
    clip_grad_norm_. Fused AdamW writes them back, so this saves a read of every gradient, not the
    write."""
    coef = clip_coefficient(norm, max_norm)
    if 0.0 < coef < 1.0:
        optimizer.grad_scale = torch.tensor(1.0 / coef, dtype=torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale
        return
    if coef < 1.0:  # an infinite norm: clip_grad_norm_'s factor 0, which no divisor gives
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    optimizer.step()


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
    """A LambdaLR that applies WarmupCosine to every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(config.resolved_warmup_steps, config.max_steps, config.min_lr_ratio))


def restore_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any], config: TrainConfig) -> None:
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
