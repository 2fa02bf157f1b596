"""Training: `train()` and its settings, the Pythia recipe, checkpoints (docs/training.md).

    from memoryformer.train import TrainConfig, train
    result = train(model_config, TrainConfig(max_steps=500), "data/tokens", "runs/mf-demo")

Modules: config (TrainConfig, paper LRs), optim (parameter groups, LR schedule), validation,
metrics (metrics.csv, TensorBoard, throughput), result (TrainResult), loop (the phases and `train`),
checkpoint (checkpoints, run directories, load_model), files (atomic writes), lock (one process per
run directory), signals (stopping at a step boundary), distributed (torchrun, DDP, FSDP2).
"""

from memoryformer.train.config import PAPER_LR, PRECISIONS, RECIPE_FIELDS, TrainConfig, paper_lr
from memoryformer.train.files import DiskFullError
from memoryformer.train.lock import RunLockedError
from memoryformer.train.loop import Trainer, train
from memoryformer.train.metrics import CSV_FIELDS, MetricsLog, flops_per_token
from memoryformer.train.optim import (
    WarmupCosine,
    build_optimizer,
    build_scheduler,
    decay_split,
    lr_at,
    param_groups,
)
from memoryformer.train.result import TrainResult
from memoryformer.train.signals import StopSignals
from memoryformer.train.validation import validation_loss

__all__ = [
    "CSV_FIELDS", "PAPER_LR", "PRECISIONS", "RECIPE_FIELDS", "DiskFullError", "MetricsLog", "RunLockedError",
    "StopSignals", "TrainConfig", "TrainResult", "Trainer", "WarmupCosine", "build_optimizer", "build_scheduler",
    "decay_split", "flops_per_token", "lr_at", "paper_lr", "param_groups", "train", "validation_loss",
]
