"""`memoryformer demo`: the main job (see memoryformer.research.demo)."""

from __future__ import annotations

import argparse

from memoryformer.research.demo import DemoSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoSettings()
    parser.add_argument("--out", default=d.out, help=f"run directory (default {d.out}); rerunning resumes")
    parser.add_argument("--steps", type=int, default=d.steps, help=f"training steps per arm (default {d.steps})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--lr-memoryformer", type=float, default=d.lr_memoryformer)
    parser.add_argument("--lr-dense", type=float, default=d.lr_dense)
    parser.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary trained on the corpus")
    parser.add_argument("--max-bytes", type=int, default=d.max_bytes, help="bytes of the default corpus to use")
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--quick", action="store_true",
                        help="a seconds-long smoke run: tiny models, few steps, little data")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from memoryformer.research.demo import run_demo

    settings = DemoSettings(out=args.out, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                            lr_memoryformer=args.lr_memoryformer, lr_dense=args.lr_dense,
                            vocab_size=args.vocab_size, max_bytes=args.max_bytes, eval_every=args.eval_every,
                            progress=not args.no_progress)
    if args.quick:
        settings.steps, settings.batch_size, settings.seq_len = min(settings.steps, 6), 4, 64
        settings.vocab_size, settings.max_bytes, settings.eval_every = 512, 300_000, 3
        settings.decode_tokens = 16
        settings.model_overrides = {"n_layers": 2, "d_model": 64, "n_heads": 4, "tau": 4}
    run_demo(settings)
    return 0
