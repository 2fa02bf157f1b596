"""Distillation from a dense teacher: the loss a converted (or fresh) MemoryFormer trains on.

    loss = (1 - alpha) * CE(student, targets) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

averaged over tokens (Hinton et al., 2015; the T^2 keeps the gradient scale independent of T).
With alpha = 0 this is plain language-model training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, *, alpha: float = 0.5,
                      temperature: float = 1.0) -> Tensor:
    """Mixed cross-entropy and teacher KL.

    Args:
        student_logits, teacher_logits: (B, T, V); the teacher's are not differentiated.
        targets: (B, T) next-token ids.
        alpha: weight of the KL term in [0, 1].
        temperature: softens both distributions in the KL term (> 0).
    Returns: a scalar.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"distillation temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the two models need the same vocabulary")
    vocab = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, vocab)
    ce = F.cross_entropy(s, targets.reshape(-1))
    if alpha == 0.0:
        return ce
    t = teacher_logits.detach().float().reshape(-1, vocab)
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean")
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, idx: Tensor) -> Tensor:
    """(B, T) -> (B, T, V) logits of a frozen teacher in eval mode."""
    return teacher(idx)[0]
