"""Write the full-scale ModelConfig and TrainConfig JSON files of the paper's runs and their twins.

    python experiments/full_scale/make_configs.py      # rewrites configs/*.json and train/*.json

Model: the package presets (paper section 3.1); MemoryFormer configs leave out the fields only the
Pythia twin reads. Training (paper section 3): sequence 2048, a global batch of 1024 sequences (about
2.1 M tokens), AdamW (0.9, 0.95, eps 1e-8), weight decay 0.1, clip 1.0, 1% warmup then cosine, the
paper's peak LRs (MemoryFormer 3 x its twin's), bf16 autocast. The schedule length and floor:
- MemoryFormer, `train/mf-*.json`: the official configs' 106,418 steps (about 223 B tokens), floor
  0.01 x peak (3e-5 for tiny);
- MemoryFormer, `train/mf-*-pythia-schedule.json`: Pythia's 143,000 steps (about 300 B), floor 0.1 x peak;
- the twins: Pythia's own recipe, 143,000 steps, floor 0.1 x peak.
docs/differences.md lists what still differs from the official code.

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
PYTHIA_SCHEDULE = (143_000, 0.1)  # steps, LR floor / peak: Pythia's published recipe
OFFICIAL_MF_SCHEDULE = (106_418, 0.01)  # configs/memoryformer_{tiny,small}.yml of the official code
PYTHIA_ONLY_FIELDS = ("parallel_residual", "attention_bias", "intermediate_size", "attention")
# model -> (micro-batch per GPU, FSDP): sized for 80 GB GPUs at sequence 2048 in bf16
MICRO = {"pythia-70m": (16, False), "mf-tiny": (16, False), "pythia-160m": (16, False), "mf-small": (16, False),
         "pythia-410m": (8, False), "mf-base": (4, True)}
PAIRS = {"mf-tiny": "pythia-70m", "mf-small": "pythia-160m", "mf-base": "pythia-410m"}


def train_config(name: str, schedule: tuple[int, float] | None = None) -> TrainConfig:
    micro, fsdp = MICRO[name]
    steps, floor = schedule or (OFFICIAL_MF_SCHEDULE if name.startswith("mf-") else PYTHIA_SCHEDULE)
    return TrainConfig(batch_size=micro, grad_accum=GLOBAL_BATCH // (micro * GPUS), seq_len=2048, max_steps=steps,
                       lr=PAPER_LR[name], min_lr_ratio=floor, warmup_frac=0.01, weight_decay=0.1, betas=(0.9, 0.95),
                       eps=1e-8, grad_clip=1.0, eval_every=1000, eval_batches=4, log_every=10, ckpt_every=1000,
                       keep_last=3, seed=1234, precision="bf16", device="auto", fsdp=fsdp, tensorboard=True)


def main() -> None:
    for sub in ("configs", "train"):
        (HERE / sub).mkdir(exist_ok=True)
    for name in MICRO:
        fields = ModelConfig.from_preset(name).to_dict()
        if name.startswith("mf-"):
            fields = {k: v for k, v in fields.items() if k not in PYTHIA_ONLY_FIELDS}
            train_config(name, PYTHIA_SCHEDULE).to_json(HERE / "train" / f"{name}-pythia-schedule.json")
        (HERE / "configs" / f"{name}.json").write_text(json.dumps(fields, indent=2) + "\n")
        train_config(name).to_json(HERE / "train" / f"{name}.json")
    (HERE / "pairs.json").write_text(json.dumps(PAIRS, indent=2) + "\n")
    print(f"wrote {len(MICRO)} model configs and the train configs under {HERE}")


if __name__ == "__main__":
    main()
