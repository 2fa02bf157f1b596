"""`memoryformer convert`: another model's weights -> a MemoryFormer run directory.

    memoryformer convert --from-official global_step106418/ --out runs/mf-tiny-official
    memoryformer convert --from-official mp_rank_00_model_states.pt --out runs/x --n-heads 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-official", required=True, metavar="CKPT",
                        help="an official MemoryFormer (GPT-NeoX format) checkpoint: a folder of "
                             "layer_XX-model_00-model_states.pt files, or one state-dict file (.pt / .safetensors)")
    parser.add_argument("--out", required=True, metavar="DIR", help="run directory to write (must be new or empty)")
    parser.add_argument("--n-heads", type=int, default=None, metavar="N",
                        help="attention heads (not stored in the weights; default: the official configuration "
                             "for the width, 8 at d = 512 and 768)")
    parser.add_argument("--max-seq-len", type=int, default=2048, metavar="N", help="context length (default 2048)")
    parser.add_argument("--tokenizer", metavar="FILE", help="a tokenizers JSON file to copy into the run "
                        "(the official models use Pythia's GPT-NeoX-20B tokenizer)")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; choose a new directory")


def run(args: argparse.Namespace) -> int:
    import shutil

    from memoryformer.integrations.official import load_official
    from memoryformer.train.checkpoint import (
        CONFIG_FILE,
        TOKENIZER_FILE,
        WEIGHTS_FILE,
        atomic_write_text,
        save_model_weights,
    )

    out = Path(args.out)
    _check_out(out)
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer} is not a file")
    if args.n_heads is not None and args.n_heads <= 0:
        raise ValueError(f"--n-heads must be positive, got {args.n_heads}")
    model = load_official(args.from_official, n_heads=args.n_heads, max_seq_len=args.max_seq_len)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, model.config.to_json() + "\n")
    if args.tokenizer:
        shutil.copyfile(args.tokenizer, out / TOKENIZER_FILE)
    save_model_weights(model, out / WEIGHTS_FILE, model.config)
    cfg = model.config
    print(f"wrote {out}: {cfg.n_layers} layers, d = {cfg.d_model}, tau = {cfg.tau}, {cfg.n_heads} heads, "
          f"weighting l1, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", file=sys.stderr)
    return 0
