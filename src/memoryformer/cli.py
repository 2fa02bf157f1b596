"""The `memoryformer` command: one entry point, one subcommand per verb.

Errors are printed as one line; set MEMORYFORMER_TRACEBACK=1 to see the full traceback.
Each verb lives in its own module under `memoryformer.commands`, which defines
`add_arguments(parser)` and `run(args) -> int`. This file only dispatches, so a
verb's heavy imports (transformers, lm-eval, matplotlib) load only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from memoryformer import allocator

# verb -> (module under memoryformer.commands, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "run the main job: train a small MemoryFormer and its dense twin, compare"),
    "prepare": ("prepare", "tokenise text into memory-mapped token shards"),
    "train": ("train", "train a MemoryFormer or Pythia-twin language model"),
    "eval": ("evaluate", "perplexity and zero-shot tasks on a trained model"),
    "generate": ("generate", "sample text from a trained model"),
    "export": ("export", "convert a training run to a Hugging Face directory"),
    "convert": ("convert", "a dense GPT-NeoX model or an official checkpoint -> a MemoryFormer run"),
    "flops": ("flops", "FLOPs, parameters and memory of the paper presets (Table 1, Figure 1)"),
    "reproduce": ("reproduce", "run one of the paper's comparisons or ablations at small scale"),
    "bench": ("bench", "benchmarks: MemoryFormer against its dense twin"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoryformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module_name, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if verb == only:  # only the chosen verb's module is imported
            _load(module_name).add_arguments(p)
    return parser


def _load(module_name: str):
    return importlib.import_module(f"memoryformer.commands.{module_name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # 2 MiB pages for large tensors, freed memory kept for reuse (memoryformer.allocator): before any tensor
    allocator.configure()
    verb = argv[0] if argv and argv[0] in VERBS else None
    parser = build_parser(only=verb)
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return int(_load(VERBS[args.verb][0]).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not is_user_error(err) or os.environ.get("MEMORYFORMER_TRACEBACK"):
            raise
        print(f"memoryformer {args.verb}: error: {one_line(err)}", file=sys.stderr)
        return 1


def is_user_error(err: BaseException) -> bool:
    """Errors a user's input or machine causes (bad values, paths, files, devices, memory): printed as
    one line. Anything else is a bug and keeps its traceback."""
    import pickle

    user = (ValueError, OSError, TypeError, RuntimeError, MemoryError, pickle.UnpicklingError)
    return isinstance(err, user) or type(err).__module__.split(".")[0] == "safetensors"


def one_line(err: BaseException) -> str:
    """The error's message on one line. An unpickling refusal keeps only what was refused: torch's
    hint to retry with weights_only=False would run whatever code the file holds."""
    import pickle

    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if isinstance(err, pickle.UnpicklingError):
        detail = next((line for line in lines if "Unsupported" in line or "WeightsUnpickler" in line), "")
        return ("refused to load a file that holds Python objects other than tensors (unpickling it could run "
                "arbitrary code)" + (f": {detail}" if detail else ""))
    if not lines:
        return type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return " ".join(lines)


if __name__ == "__main__":
    sys.exit(main())
