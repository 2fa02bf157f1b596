"""Validation loss on the held-out split, and the autocast context of each precision."""

from __future__ import annotations

import math
import sys
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from memoryformer.train import distributed as D


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 / fp16 autocast on `device`, or nothing for fp32."""
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
        with autocast(env.device, precision):
            _, loss = model(x, y)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
        batches += 1
    if sharded and env.distributed:  # rank 0 has the most windows; others pad with throw-away forwards
        windows = min(data.num_eval_windows("val", seq_len), max_windows or sys.maxsize)
        target = math.ceil(len(range(0, windows, env.world_size)) / batch_size)
        dummy = torch.zeros(1, seq_len, dtype=torch.long, device=env.device)
        for _ in range(target - batches):
            with autocast(env.device, precision):
                model(dummy)
    D.all_reduce(total, env)
    model.train(was_training)
    loss = (total[0] / total[1]).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(total[1].item())}
