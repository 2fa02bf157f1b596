"""`memoryformer convert`: another model's weights -> a MemoryFormer run directory.

    memoryformer convert runs/demo/dense --data runs/demo/data --out runs/converted     # a dense twin
    memoryformer convert hf/pythia-demo --data data/tokens --out runs/converted         # any GPT-NeoX HF dir
    memoryformer convert --from-official global_step106418/ --out runs/mf-tiny-official

A dense model becomes a MemoryFormer of the same width and depth: embedding, head and norms are copied,
and every Memory Layer is fitted by least squares to the dense layer it replaces on calibration tokens
from --data (docs/convert.md). Distil it afterwards with `memoryformer train --init-from OUT --teacher SOURCE`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", metavar="DENSE_RUN_OR_HF_DIR",
                        help="a trained dense (Pythia-twin) run directory or checkpoint, or a GPT-NeoX HF directory")
    parser.add_argument("--from-official", metavar="CKPT",
                        help="instead: an official MemoryFormer (GPT-NeoX format) checkpoint, a folder of "
                             "layer_XX-model_00-model_states.pt files or one state-dict file (.pt / .safetensors)")
    parser.add_argument("--out", required=True, metavar="DIR", help="run directory to write (must be new or empty)")
    dense = parser.add_argument_group("dense conversion")
    dense.add_argument("--data", metavar="DIR", help="prepared token data for the calibration tokens "
                       "(`memoryformer prepare`; the dense model's tokenizer)")
    dense.add_argument("--calibration-tokens", type=int, default=32768, metavar="N",
                       help="training tokens the least-squares fits see (default 32768)")
    dense.add_argument("--seq-len", type=int, default=None, metavar="N",
                       help="calibration window length (default: min(256, the model's context))")
    dense.add_argument("--tau", type=int, default=8, help="bits per hash chunk (default 8)")
    dense.add_argument("--weighting", choices=("prob", "l1"), default="prob", help="Memory Layer weight (default prob)")
    dense.add_argument("--iterations", type=int, default=30, metavar="N",
                       help="conjugate-gradient steps per table fit (default 30)")
    official = parser.add_argument_group("official checkpoints")
    official.add_argument("--n-heads", type=int, default=None, metavar="N",
                          help="attention heads (not stored in the weights; default: the official configuration "
                               "for the width, 8 at d = 512 and 768)")
    official.add_argument("--max-seq-len", type=int, default=2048, metavar="N", help="context length (default 2048)")
    official.add_argument("--tokenizer", metavar="FILE", help="a tokenizers JSON file to copy into the run "
                          "(the official models use Pythia's GPT-NeoX-20B tokenizer)")


def _check_args(args: argparse.Namespace) -> Path:
    if (args.source is None) == (args.from_official is None):
        raise ValueError("give either a dense model (DENSE_RUN_OR_HF_DIR) or --from-official CKPT")
    if args.source is not None and args.data is None:
        raise ValueError("converting a dense model needs --data DIR (prepared tokens for calibration)")
    for name in ("calibration_tokens", "iterations", "n_heads", "seq_len", "max_seq_len"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer} is not a file")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; choose a new directory")
    return out


def _load_dense(source: str):
    from memoryformer.train.checkpoint import load_model

    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file() and "model_type" in (path / "config.json").read_text():
        from memoryformer.integrations.hf import load_any

        return load_any(path)
    return load_model(path)


def _calibration(data_dir: str, tokens: int, seq_len: int):
    import numpy as np

    from memoryformer.data.batches import TokenData

    data = TokenData(data_dir)
    data.check_seq_len("train", seq_len)
    count = max(1, tokens // seq_len)
    last = data.num_tokens("train") - seq_len - 1
    starts = np.linspace(0, last, count).astype(np.int64)
    return data, data.windows("train", starts, seq_len)[0]


def _convert_dense(args: argparse.Namespace):
    from memoryformer.convert.dense import convert_dense

    dense, tokenizer = _load_dense(args.source)
    seq_len = args.seq_len or min(256, dense.config.max_seq_len)
    data, idx = _calibration(args.data, args.calibration_tokens, seq_len)
    if data.vocab_size > dense.config.vocab_size:
        raise ValueError(f"--data {args.data} has a vocabulary of {data.vocab_size} but the model has "
                         f"{dense.config.vocab_size}: it was prepared with another tokenizer")
    print(f"converting {args.source} on {idx.numel():,} calibration tokens", file=sys.stderr)

    def report(i: int, errors: dict[str, float]) -> None:
        print(f"block {i}: relative error " + ", ".join(f"{k.removesuffix('_rel_err')} {v:.3f}"
                                                        for k, v in errors.items()), file=sys.stderr)

    mf, reports = convert_dense(dense, idx, tau=args.tau, weighting=args.weighting, iterations=args.iterations,
                                on_block=report)
    info = {"source": str(args.source), "data": str(args.data), "calibration_tokens": int(idx.numel()),
            "tau": args.tau, "weighting": args.weighting, "iterations": args.iterations, "blocks": reports}
    return mf, tokenizer, info


def run(args: argparse.Namespace) -> int:
    from memoryformer.train.checkpoint import (
        CONFIG_FILE,
        TOKENIZER_FILE,
        WEIGHTS_FILE,
        atomic_write_text,
        save_model_weights,
    )

    out = _check_args(args)
    if args.from_official:
        from memoryformer.integrations.official import load_official

        model = load_official(args.from_official, n_heads=args.n_heads, max_seq_len=args.max_seq_len)
        tokenizer, info = None, {"source": str(args.from_official), "official": True}
    else:
        model, tokenizer, info = _convert_dense(args)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, model.config.to_json() + "\n")
    atomic_write_text(out / "convert.json", json.dumps(info, indent=2) + "\n")
    if args.tokenizer:
        atomic_write_text(out / TOKENIZER_FILE, Path(args.tokenizer).read_text())
    elif tokenizer is not None:  # tokenizers.Tokenizer, or a transformers tokenizer wrapping one
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if hasattr(backend, "to_str"):
            atomic_write_text(out / TOKENIZER_FILE, backend.to_str())
    save_model_weights(model, out / WEIGHTS_FILE, model.config)
    cfg = model.config
    print(f"wrote {out}: {cfg.n_layers} layers, d = {cfg.d_model}, tau = {cfg.tau}, {cfg.n_heads} heads, "
          f"weighting {cfg.weighting}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters",
          file=sys.stderr)
    return 0
