"""Accuracy cost of lower-precision inference: bf16 / int8 Memory Layer tables and a bf16 / int8 LM head.

    python benchmarks/precision.py [--checkpoint RUN_DIR_OR_FILE] [--data TOKEN_DIR] [--windows N]
    python benchmarks/precision.py --steps 60 [--work runs/precision]      # no checkpoint: train one
    python benchmarks/precision.py --quick                                   # 8 windows (20 steps if training)

Without --checkpoint, the main job's MemoryFormer (`memoryformer demo` -> runs/demo/memoryformer) is used
when it exists (not with --quick). With --checkpoint, the model comes from `checkpoint.load_model` and the held-out tokens from --data (default:
the data directory the run recorded in run.json). Without it, `mf-demo` is trained for --steps steps on the
embedded default corpus (prepared like `memoryformer demo` does, in --work/data) into --work/memoryformer.
The held-out tokens are non-overlapping windows of max_seq_len tokens from the validation split (every
window, or --windows of them evenly spaced). `memoryformer.inference.quantize.precision_report` measures each option
against the float32 model; the rows go to benchmarks/results/precision.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from memoryformer import kernels  # noqa: E402
from memoryformer.core.config import ModelConfig  # noqa: E402
from memoryformer.data import TokenData  # noqa: E402
from memoryformer.inference.quantize import DEFAULT_OPTIONS, precision_report  # noqa: E402
from memoryformer.research.demo import DemoSettings  # noqa: E402
from memoryformer.train.checkpoint import load_model, read_run_info, run_dir_of  # noqa: E402

COLUMNS = [
    ("option", "option"), ("rel_l2_err", "rel. L2 logit error"), ("mean_rel_err", "mean rel. error"),
    ("max_rel_err", "max rel. error"), ("target_check", "target"), ("top1_agree", "top-1 agreement"),
    ("perplexity", "perplexity"), ("ppl_delta", "Δ ppl"), ("ppl_delta_pct", "Δ ppl %"),
    ("layer_rel_err", "worst layer rel. error"), ("hash_flip_rate", "hash flips"),
    ("table_mb", "table MB"), ("head_mb", "head MB"),
]


def train_default(work: Path, steps: int, batch_size: int, data_dir: Path | None) -> tuple[Path, Path]:
    """Train mf-demo briefly on the embedded default corpus (demo.py's data and learning rate)."""
    from memoryformer.research.demo import DemoSettings, prepare_default_data
    from memoryformer.train import TrainConfig, train

    settings = DemoSettings(out=str(work))
    data_dir = data_dir or prepare_default_data(settings)
    data = TokenData(data_dir)
    cfg = ModelConfig.from_preset("mf-demo", vocab_size=data.vocab_size, max_seq_len=settings.seq_len)
    tc = TrainConfig(batch_size=batch_size, seq_len=settings.seq_len, max_steps=steps,
                     lr=settings.lr_memoryformer, warmup_frac=0.05, eval_every=0, eval_batches=0,
                     ckpt_every=0, keep_last=1, log_every=10, seed=settings.seed, device="cpu", tensorboard=False)
    out = work / "memoryformer"
    train(cfg, tc, data_dir, out, resume="auto")
    return out, data_dir


def trained_how(path: Path) -> str:
    """", trained N steps of batch B x T" from the run's train_config.json, when there is one."""
    run = path if path.is_dir() else run_dir_of(path)
    file = run / "train_config.json"
    if not file.is_file():
        return ""
    tc = json.loads(file.read_text())
    return f", trained {tc.get('max_steps')} steps of batch {tc.get('batch_size')} x {tc.get('seq_len')}"


def held_out(data_dir: Path, seq_len: int, windows: int) -> torch.Tensor:
    """Non-overlapping (n, seq_len) windows of the validation split, n = windows (evenly spaced) or all."""
    val = np.asarray(TokenData(data_dir).tokens("val"), dtype=np.int64)
    total = len(val) // seq_len
    if total == 0:
        raise ValueError(f"the validation split of {data_dir} has fewer than {seq_len} tokens")
    picks = np.arange(total) if windows <= 0 or windows >= total else np.linspace(0, total - 1, windows).round()
    return torch.from_numpy(np.stack([val[int(i) * seq_len:(int(i) + 1) * seq_len] for i in picks]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="run directory, checkpoint or safetensors file")
    parser.add_argument("--data", type=Path, help="prepared token directory (default: the run's own)")
    parser.add_argument("--steps", type=int, default=60, help="training steps without --checkpoint")
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("runs/precision"), help="where to train without --checkpoint")
    parser.add_argument("--windows", type=int, default=0, help="held-out windows (0: the whole split)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--options", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_OPTIONS)}")
    parser.add_argument("--quick", action="store_true", help="8 held-out windows; 20 training steps without --checkpoint")
    args = parser.parse_args()
    if args.quick:
        args.windows = 8 if args.windows <= 0 else min(args.windows, 8)
        args.steps = min(args.steps, 20)

    main_job = Path(DemoSettings().out) / "memoryformer"  # what `memoryformer demo` trains
    if args.checkpoint is None and not args.quick and main_job.is_dir():
        print(f"using the main job's model {main_job} (pass --checkpoint to choose another)", flush=True)
        args.checkpoint = main_job
    if args.checkpoint is None:
        source, data_dir = train_default(args.work, args.steps, args.train_batch_size, args.data)
        how = f"mf-demo trained here for {args.steps} steps (batch {args.train_batch_size} x 256) on the embedded default corpus"
    else:
        source, data_dir = args.checkpoint, args.data
        how = f"checkpoint {args.checkpoint}" + trained_how(args.checkpoint)
    model, _ = load_model(source)
    if data_dir is None:
        recorded = read_run_info(source if Path(source).is_dir() else run_dir_of(Path(source))).get("data_dir")
        if recorded is None:
            raise SystemExit(f"{source} records no data directory; pass --data")
        data_dir = Path(recorded)
    tokens = held_out(Path(data_dir), model.config.max_seq_len, args.windows)
    print(f"{how}; {tokens.shape[0]} held-out windows of {tokens.shape[1]} tokens from {data_dir}", flush=True)
    rows = precision_report(model, tokens, options=args.options, batch_size=args.batch_size)
    for row in rows:
        row["target_check"] = "" if row["target"] is None else f"{'PASS' if row['target_met'] else 'MISS'} (≤ {row['target']:g})"
        row["ppl_delta_pct"] = 100 * row["ppl_delta_rel"]
        row["table_mb"] = None if row["table_bytes"] is None else row["table_bytes"] / 2**20
        row["head_mb"] = row["head_bytes"] / 2**20
        print({k: row[k] for k, _ in COLUMNS}, flush=True)
    backend = "fused C++ kernels" if kernels.loaded() else f"pure PyTorch (kernels: {kernels.last_error() or 'off'})"
    paths_note = (f"Memory Layers: the float32 model and the int8 ML1 / ML2 ran on {backend}; bf16 tables and the int8 "
                  "Q / K / V (one shared hash) sum their picked rows in PyTorch (quantize.gather_sum_dequant).")
    notes = [
        f"Model: {how} ({model.num_parameters() / 1e6:.1f}M parameters, {model.config.n_layers} layers, "
        f"d = {model.config.d_model}). Held-out: {tokens.shape[0]} non-overlapping windows of {tokens.shape[1]} "
        f"tokens ({rows[0]['scored_tokens']:,} scored) from the validation split of {data_dir}. {paths_note}",
        "Errors against the float32 model's logits r (q: the option's), per position p: e_p = max_v |q - r| / "
        "max_v |r|; max / mean rel. error = max / mean of e_p; rel. L2 = ||q - r|| / ||r|| over all positions. "
        "Target: PASS when rel. L2 is within it. Worst layer rel. "
        "error: the largest ||layer_q(x) - layer(x)|| / ||layer(x)|| over Memory Layers fed the float32 model's "
        "input x (the tables' own rounding). Hash flips: the share of (token, table) bucket choices that differ "
        "from the float32 model's; a flipped sign bit upstream swaps a whole table row downstream, which is "
        "what turns a small per-layer error into a larger logit error. Bytes: tables (+ int8 scales) and head "
        "weight (+ scales), biases not counted. Definitions: memoryformer.inference.quantize.precision_report, docs/precision.md.",
    ]
    paths = write_results("precision", rows, COLUMNS, title="Lower-precision inference: accuracy cost",
                          notes=notes, extra={"model": how, "data": str(data_dir), "windows": tokens.shape[0],
                                              "window_tokens": tokens.shape[1], "memory_layer_backend": backend})
    print("wrote", *paths)


if __name__ == "__main__":
    main()
