"""`memoryformer train`: train a MemoryFormer or Pythia-twin language model on prepared token data.

    memoryformer train --preset mf-demo --data data/tokens --out runs/mf-demo --max-steps 2000
    memoryformer train --out runs/mf-demo --resume            # continue the latest checkpoint
    torchrun --nproc_per_node 8 -m memoryformer.cli train --preset mf-base --fsdp ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memoryformer.train import TrainConfig

# CLI flag -> TrainConfig field, for the settings the command line can override
_OVERRIDES = {
    "max_steps": "max_steps", "lr": "lr", "batch_size": "batch_size", "seq_len": "seq_len",
    "grad_accum": "grad_accum", "device": "device", "precision": "precision", "eval_every": "eval_every",
    "eval_batches": "eval_batches", "ckpt_every": "ckpt_every", "keep_last": "keep_last", "log_every": "log_every",
    "warmup_steps": "warmup_steps", "seed": "seed", "wandb": "wandb", "ckpt_every_minutes": "ckpt_every_minutes",
    "min_lr_ratio": "min_lr_ratio", "init_from": "init_from", "teacher": "teacher",
    "distill_alpha": "distill_alpha", "distill_temperature": "distill_temperature",
}


def _resume_value(text: str) -> bool | str:
    if text == "auto":
        return "auto"
    raise argparse.ArgumentTypeError(f"--resume takes no value or 'auto', got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", metavar="NAME", help="a model preset (mf-tiny, mf-demo, pythia-70m, ...)")
    model.add_argument("--config", metavar="FILE.json",
                       help="a ModelConfig JSON file (or {\"model\": {...}, \"train\": {...}})")
    parser.add_argument("--data", metavar="DIR", help="a prepared data directory (`memoryformer prepare --out DIR`); "
                        "with --resume, defaults to the run's")
    parser.add_argument("--out", required=True, metavar="DIR", help="run directory: checkpoints, logs, weights")
    parser.add_argument("--resume", nargs="?", const=True, default=False, type=_resume_value, metavar="auto",
                        help="continue from the latest checkpoint in --out ('--resume auto': if there is one)")
    parser.add_argument("--train-config", metavar="FILE.json", help="a TrainConfig JSON file (flags override it)")
    g = parser.add_argument_group("training settings (default: the TrainConfig defaults, or the run's on --resume)")
    g.add_argument("--max-steps", type=int, metavar="N")
    g.add_argument("--lr", type=float, help="peak learning rate (default: the paper's for the model size)")
    g.add_argument("--batch-size", type=int, metavar="N", help="sequences per device per micro-step")
    g.add_argument("--seq-len", type=int, metavar="N", help="tokens per sequence (default: the model's max_seq_len)")
    g.add_argument("--grad-accum", type=int, metavar="N", help="micro-steps per optimizer step")
    g.add_argument("--warmup-steps", type=int, metavar="N", help="linear warmup steps (default: 1%% of max-steps)")
    g.add_argument("--min-lr-ratio", type=float, metavar="R",
                   help="the cosine ends at R x the peak LR (default 0.1, Pythia's; the official MemoryFormer "
                        "configs use 0.01)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, mps")
    g.add_argument("--init-from", metavar="RUN", help="start a new run from these weights (e.g. the output of "
                   "`memoryformer convert`; the model config defaults to RUN/config.json)")
    g.add_argument("--teacher", metavar="RUN", help="distil from this model (same tokenizer): the loss mixes "
                   "cross-entropy and the teacher's KL (docs/convert.md)")
    g.add_argument("--distill-alpha", type=float, metavar="A", help="weight of the KL term in [0, 1] (default 0.5)")
    g.add_argument("--distill-temperature", type=float, metavar="T", help="KL temperature (default 1)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 autocast on CUDA, fp32 elsewhere; fp16 uses a gradient scaler")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true", default=None,
                   help="shard parameters, gradients and optimizer state over the torchrun ranks (FSDP2)")
    g.add_argument("--eval-every", type=int, metavar="N", help="validate every N steps (0: only at the end)")
    g.add_argument("--eval-batches", type=int, metavar="N", help="validation batches per evaluation (0: the whole split)")
    g.add_argument("--ckpt-every", type=int, metavar="N", help="checkpoint every N steps (0: only at the end)")
    g.add_argument("--ckpt-every-minutes", type=float, metavar="M",
                   help="also checkpoint when M minutes of wall clock passed since the last one (default 30; 0: off)")
    g.add_argument("--keep-last", type=int, metavar="N", help="checkpoints to keep (0: all)")
    g.add_argument("--log-every", type=int, metavar="N")
    g.add_argument("--seed", type=int)
    g.add_argument("--vocab-size", type=int, metavar="N", help="override the model's vocabulary size")
    g.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard events")
    g.add_argument("--wandb", metavar="PROJECT", help="also log to this Weights & Biases project")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--force", action="store_true",
                        help="train even when the memory estimate says the model will not fit")


def _configs(args: argparse.Namespace):
    """(ModelConfig, TrainConfig, data dir) from the flags, the files they name and, on resume, the run."""
    from memoryformer.core.config import ModelConfig
    from memoryformer.train.checkpoint import CONFIG_FILE, read_json_file, read_model_config, read_run_info

    out = Path(args.out)
    resuming = args.resume is True or (args.resume == "auto" and (out / CONFIG_FILE).is_file())
    train_data: dict = {}
    if args.config:
        data = read_json_file(args.config, "--config")
        if "model" in data:
            train_data = data.get("train", {})
            data = data["model"]
        model_config = ModelConfig.from_dict(data)
    elif args.preset:
        model_config = ModelConfig.from_preset(args.preset)
    elif resuming and (out / CONFIG_FILE).is_file():
        model_config = read_model_config(out / CONFIG_FILE, "the run's model config")
    elif args.init_from and (Path(args.init_from) / CONFIG_FILE).is_file():
        model_config = read_model_config(Path(args.init_from) / CONFIG_FILE, "the --init-from run's model config")
    elif resuming:
        raise FileNotFoundError(f"cannot resume: {out / CONFIG_FILE} does not exist; is {out} a training run?")
    else:
        raise ValueError("give the model with --preset NAME or --config FILE.json")
    if args.vocab_size is not None:
        model_config = model_config.replace(vocab_size=args.vocab_size)
        model_config.validate()

    if args.train_config:
        train_data = read_json_file(args.train_config, "--train-config")
    elif resuming and (out / "train_config.json").is_file() and not train_data:
        train_data = read_json_file(out / "train_config.json", "the run's train config")
    train_config = _train_config(train_data, args.train_config or (out / "train_config.json" if resuming else None))
    changes = {field: getattr(args, flag) for flag, field in _OVERRIDES.items() if getattr(args, flag) is not None}
    if args.eval_batches == 0:
        changes["eval_batches"] = None
    if args.compile:
        changes["compile"] = True
    if args.fsdp:
        changes["fsdp"] = True
    if args.no_tensorboard:
        changes["tensorboard"] = False
    train_config = train_config.replace(**changes)

    data_dir = args.data
    if data_dir is None and resuming:
        data_dir = read_run_info(out).get("data_dir")
    if data_dir is None:
        raise ValueError("give the training data with --data DIR (a directory made by `memoryformer prepare`)")
    if not Path(data_dir).is_dir() or not (Path(data_dir) / "meta.json").is_file():
        raise FileNotFoundError(f"{data_dir} is not a prepared data directory; create it with "
                                f"`memoryformer prepare [DATA ...] --out {data_dir}`")
    return model_config, train_config, data_dir


def _train_config(data: dict, source: Path | str | None) -> TrainConfig:
    """TrainConfig from a dict read from `source` (named in the error when it is not valid)."""
    from memoryformer.train import TrainConfig

    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        where = f" in {source}" if source else ""
        raise ValueError(f"the train config{where} is not valid: {err}") from None


def _is_oom(err: BaseException) -> bool:
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _error(args: argparse.Namespace, message: str) -> int:
    """Print one error line (or re-raise with --traceback); exit code 1."""
    if args.traceback:
        raise
    print(f"memoryformer train: error: {message}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    from memoryformer.data import TokenData
    from memoryformer.train import train
    from memoryformer.train.memory import check_training_memory
    from memoryformer.train.signals import exit_code

    model_config, train_config, data_dir = _configs(args)
    TokenData(data_dir)  # a damaged data directory is named before anything else is checked or built
    # before building: refuse what cannot fit
    check_training_memory(model_config, train_config.batch_size, train_config.seq_len, train_config.device,
                          fsdp=bool(train_config.fsdp), force=args.force)
    try:
        result = train(model_config, train_config, data_dir, args.out, resume=args.resume,
                       progress=not args.no_progress)
    except FloatingPointError as err:  # the loss diverged: the message names the step and the fix
        return _error(args, str(err))
    except OSError as err:  # a full disk, a read-only or missing folder: one line naming the file
        if err.strerror is None:
            return _error(args, str(err))
        return _error(args, f"{err.strerror}: {err.filename}" if err.filename else err.strerror)
    except (RuntimeError, MemoryError) as err:
        if not _is_oom(err) and not isinstance(err, MemoryError):
            raise
        return _error(args, f"out of memory ({str(err).splitlines()[0][:160]}); lower --batch-size (keep the "
                      "global batch with --grad-accum), shorten --seq-len, or shard the model over GPUs with "
                      "torchrun ... --fsdp")
    return exit_code(result.interrupted) if result.interrupted else 0
