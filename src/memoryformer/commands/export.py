"""`memoryformer export`: a training run (or checkpoint) -> a Hugging Face directory.

    memoryformer export runs/mf-tiny --out hf/mf-tiny          # MemoryFormerForCausalLM (+ remote code)
    memoryformer export runs/pythia-70m --out hf/pythia-70m    # native GPTNeoXForCausalLM
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_DIR_OR_CKPT",
                        help="training run directory, checkpoint file (.pt / .safetensors) or HF directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write (created if missing)")
    parser.add_argument("--format", choices=("auto", "gpt-neox", "memoryformer"), default="auto",
                        help="auto (default): Pythia twins as native GPT-NeoX, MemoryFormers as "
                             "MemoryFormerForCausalLM; memoryformer: our classes for both")
    parser.add_argument("--no-remote-code", action="store_true",
                        help="do not write modeling_memoryformer.py / auto_map (loading then needs "
                             "`import memoryformer.integrations.hf`)")
    parser.add_argument("--dtype", choices=DTYPES, help="cast the saved weights (default: keep their dtype)")
    parser.add_argument("--force", action="store_true",
                        help="replace a non-empty --out directory (the new one is complete before the old one goes)")


def run(args: argparse.Namespace) -> int:
    import torch

    from memoryformer.integrations.hf import load_any, save_pretrained_atomic

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ValueError(f"--out {out} is not empty; choose another directory or pass --force to replace it")
    model, tokenizer = load_any(args.source)
    architecture = model.config.architecture
    if args.format == "gpt-neox" and architecture != "pythia":
        raise ValueError(f"--format gpt-neox needs a Pythia twin; {args.source} is a {architecture} model "
                         "(use --format auto or memoryformer)")
    if tokenizer is None:
        print(f"note: {args.source} has no tokenizer.json; the export has no tokenizer either", file=sys.stderr)
    native = architecture == "pythia" and args.format != "memoryformer"
    save_pretrained_atomic(model, out, tokenizer, replace=args.force, native_neox=native,
                           remote_code=not args.no_remote_code,
                           dtype=getattr(torch, args.dtype) if args.dtype else None)
    kind = "GPTNeoXForCausalLM" if native else "MemoryFormerForCausalLM"
    print(f"wrote {kind} to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}", file=sys.stderr)
    return 0
