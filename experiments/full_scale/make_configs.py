"""Write the full-scale ModelConfig and TrainConfig JSON files of the paper's runs and their twins.

    python experiments/full_scale/make_configs.py      # rewrites configs/*.json and train/*.json

Model: the package presets (paper section 3.1). Training: the Pythia recipe (paper section 3):
sequence 2048, a global batch of 1024 sequences (about 2.1 M tokens), 143,000 steps (about 300 B
tokens, Pythia's schedule; the official MemoryFormer config stopped at 106,418), AdamW (0.9, 0.95,
eps 1e-8), weight decay 0.1, clip 1.0, 1% warmup then cosine to 0.1 x the peak LR, the paper's
peak LRs (MemoryFormer 3 x its twin's), bf16 autocast.

`batch_size` is the micro-batch per GPU and `grad_accum` is set for one node of 8 GPUs; the launch
scripts recompute grad_accum = 1024 / (batch_size x GPUs) for other world sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

from memoryformer.core.config import ModelConfig
from memoryformer.train import PAPER_LR, TrainConfig

HERE = Path(__file__).resolve().parent
GLOBAL_BATCH = 1024  # sequences per optimizer step
GPUS = 8  # the grad_accum written to the files is for one 8-GPU node
STEPS = 143_000
# model -> (micro-batch per GPU, FSDP): sized for 80 GB GPUs at sequence 2048 in bf16
MICRO = {"pythia-70m": (16, False), "mf-tiny": (16, False), "pythia-160m": (16, False), "mf-small": (16, False),
         "pythia-410m": (8, False), "mf-base": (4, True)}
PAIRS = {"mf-tiny": "pythia-70m", "mf-small": "pythia-160m", "mf-base": "pythia-410m"}


def train_config(name: str) -> TrainConfig:
    micro, fsdp = MICRO[name]
    return TrainConfig(batch_size=micro, grad_accum=GLOBAL_BATCH // (micro * GPUS), seq_len=2048, max_steps=STEPS,
                       lr=PAPER_LR[name], min_lr_ratio=0.1, warmup_frac=0.01, weight_decay=0.1, betas=(0.9, 0.95),
                       eps=1e-8, grad_clip=1.0, eval_every=1000, eval_batches=4, log_every=10, ckpt_every=1000,
                       keep_last=3, seed=1234, precision="bf16", device="auto", fsdp=fsdp, tensorboard=True)


def main() -> None:
    for sub in ("configs", "train"):
        (HERE / sub).mkdir(exist_ok=True)
    for name in MICRO:
        ModelConfig.from_preset(name).to_json(HERE / "configs" / f"{name}.json")
        train_config(name).to_json(HERE / "train" / f"{name}.json")
    (HERE / "pairs.json").write_text(json.dumps(PAIRS, indent=2) + "\n")
    print(f"wrote {len(MICRO)} model and {len(MICRO)} train configs under {HERE}")


if __name__ == "__main__":
    main()
