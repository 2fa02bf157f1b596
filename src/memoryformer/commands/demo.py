"""`memoryformer demo`: the main job (see memoryformer.research.demo)."""

from __future__ import annotations

import argparse
import shlex
import sys

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


def command_line(args: argparse.Namespace) -> str:
    """The `memoryformer demo ...` command with the options given (defaults left out): rerunning it resumes."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parts = ["memoryformer", "demo"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        parts += [flag] if isinstance(value, bool) else [flag, str(value)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from memoryformer.research.demo import DemoStopped, run_demo

    settings = DemoSettings(out=args.out, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                            lr_memoryformer=args.lr_memoryformer, lr_dense=args.lr_dense,
                            vocab_size=args.vocab_size, max_bytes=args.max_bytes, eval_every=args.eval_every,
                            progress=not args.no_progress, command=command_line(args))
    if args.quick:
        settings.steps, settings.batch_size, settings.seq_len = min(settings.steps, 6), 4, 64
        settings.vocab_size, settings.max_bytes, settings.eval_every = 512, 300_000, 3
        settings.decode_tokens = 16
        settings.model_overrides = {"n_layers": 2, "d_model": 64, "n_heads": 4, "tau": 4}
    try:
        run_demo(settings)
    except DemoStopped as stopped:
        print(f"memoryformer demo: {stopped}", file=sys.stderr)
        return 128 + stopped.signum
    return 0
