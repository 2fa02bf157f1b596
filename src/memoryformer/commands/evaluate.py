"""`memoryformer eval`: zero-shot tasks and perplexity of a trained model; lm-eval task export.

    memoryformer eval --model runs/mf-tiny --task paper                      # the tasks' Hugging Face datasets
    memoryformer eval --model runs/mf-tiny --task piqa,arc_easy --data-root tasks     # local files, offline
    memoryformer eval --model runs/mf-tiny --task piqa --data piqa/valid.jsonl --ppl book.txt --json
    memoryformer eval --write-lm-eval-tasks lm_eval_tasks --task paper
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="DIR", help="trained model (checkpoint directory) to evaluate")
    parser.add_argument("--task", action="append", default=[], metavar="NAME",
                        help="task(s) to score, repeatable or comma-separated; 'paper' = the paper's six, "
                             "'all' = every task (see --list-tasks)")
    parser.add_argument("--data", action="append", default=[], metavar="PATH",
                        help="data file of each --task, in the same order (repeatable or comma-separated); "
                             "without --data or --data-root, the tasks' Hugging Face datasets are loaded")
    parser.add_argument("--data-root", metavar="DIR",
                        help="folder of task files (one sub-folder per task, see docs/training.md), for tasks without --data")
    parser.add_argument("--ppl", action="append", default=[], metavar="FILE",
                        help="text file to report perplexity and bits per byte on (repeatable)")
    parser.add_argument("--stride", type=int, metavar="N",
                        help="perplexity: score N new tokens per window (default: max length, no overlap)")
    parser.add_argument("--batch-size", type=int, default=16, help="requests per forward pass (default 16)")
    parser.add_argument("--limit", type=int, metavar="N", help="score only the first N examples of each task")
    parser.add_argument("--max-length", type=int, metavar="N",
                        help="model context in tokens (default: the model's max_seq_len)")
    parser.add_argument("--device", help="device to run on: cpu (default), cuda, cuda:1, mps")
    parser.add_argument("--force", action="store_true",
                        help="load the model even when the memory estimate says it will not fit")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--write-lm-eval-tasks", metavar="DIR",
                        help="convert the tasks' data to jsonl + lm-eval YAMLs in DIR, for "
                             "`lm_eval --include_path DIR --tasks mf_piqa,...` (offline)")
    parser.add_argument("--list-tasks", action="store_true", help="list the tasks and their standard files")


def load_model_for_eval(path: str | Path, device: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a training run, a checkpoint file or a Hugging Face directory.

    Uses `memoryformer.integrations.hf.load_any` (which also reads HF directories) when transformers is installed,
    else `memoryformer.train.checkpoint.load_model`. The model maps ids (batch, seq) to `(logits, loss)`.
    """
    try:
        from memoryformer.integrations.hf import load_any as load
    except ImportError:  # no transformers: training runs and checkpoint files only
        try:
            from memoryformer.train.checkpoint import load_model as load
        except ImportError as err:
            if err.name != "memoryformer.train.checkpoint":  # a broken import inside it: show that
                raise
            raise RuntimeError(
                f"cannot load {path}: this install has no memoryformer.train.checkpoint.load_model; build a "
                "memoryformer.evaluation.evaluate.Scorer from your own model and tokenizer instead"
            ) from None
    model, tokenizer = load(path, device=device or "cpu")
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer (tokenizer.json): the tasks need one to tokenise their text")
    return model, tokenizer


def _split(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def resolve_tasks(args: argparse.Namespace) -> dict[str, Path | None]:
    """{task name: data file, or None for its Hugging Face dataset} from --task, --data and --data-root."""
    from memoryformer.evaluation.tasks import PAPER_TASKS, TASKS, get_task, task_path

    names: list[str] = []
    for name in _split(args.task):
        expanded = PAPER_TASKS if name == "paper" else tuple(TASKS) if name == "all" else (get_task(name).name,)
        names += [n for n in expanded if n not in names]
    data = _split(args.data)
    if data and len(data) != len(names):
        raise ValueError(f"got {len(data)} --data file(s) for {len(names)} task(s) ({', '.join(names)}); "
                         "give one --data per --task, in the same order, or use --data-root")
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise FileNotFoundError(f"--data-root {args.data_root} is not a directory")
    if not data and args.data_root is None:
        return dict.fromkeys(names)  # each task's Hugging Face dataset (memoryformer.evaluation.tasks.hub)
    paths = {name: task_path(name, data[i] if data else None, args.data_root) for i, name in enumerate(names)}
    for name, path in paths.items():
        if path.is_dir():
            raise IsADirectoryError(f"data file for task {name!r} is a directory: {path}")
        if not path.is_file():
            raise FileNotFoundError(f"data file for task {name!r} not found: {path}")
    return paths


def load_docs_of(tasks: dict[str, Path | None], limit: int | None) -> dict[str, list[dict[str, Any]]]:
    """Each task's docs, from its file or (None) its Hugging Face dataset."""
    from memoryformer.evaluation.tasks import load_docs, load_hub_docs

    return {name: load_hub_docs(name, limit=limit) if path is None else load_docs(name, path, limit=limit)
            for name, path in tasks.items()}


def run(args: argparse.Namespace) -> int:
    from memoryformer.evaluation.tasks import get_task, write_lm_eval_tasks

    if args.list_tasks:
        return list_tasks()
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--batch-size and --limit must be >= 1")
    tasks = resolve_tasks(args)
    if args.model is None and not args.write_lm_eval_tasks:
        raise ValueError("--model DIR is needed to score tasks or perplexity")
    if args.model is not None and not tasks and not args.ppl:
        raise ValueError("nothing to evaluate: give --task NAME (its Hugging Face dataset, or --data / "
                         "--data-root for local files) and/or --ppl FILE")
    for file in args.ppl:
        if not Path(file).is_file():
            raise FileNotFoundError(f"--ppl file not found (or not a file): {file}")
    docs = load_docs_of(tasks, args.limit)
    if args.write_lm_eval_tasks:
        if not docs and args.data_root is None:
            raise ValueError("--write-lm-eval-tasks: name the tasks with --task (e.g. --task paper)")
        written = write_lm_eval_tasks(args.write_lm_eval_tasks, docs or None, data_root=args.data_root,
                                      limit=args.limit)
        print(f"wrote {len(written)} lm-eval task(s) to {args.write_lm_eval_tasks}: {', '.join(written)}\n"
              f"run: lm_eval --include_path {args.write_lm_eval_tasks} --tasks {','.join(written)} ...",
              file=sys.stderr if args.json else sys.stdout)
        if args.model is None:
            return 0
    items = {name: [get_task(name).to_item(doc) for doc in task_docs] for name, task_docs in docs.items()}

    scorer = build_scorer(args)
    results: dict[str, Any] = {"model": str(args.model), "tasks": {}, "perplexity": {}}
    for name, task_items in items.items():
        results["tasks"][name] = scorer.evaluate(name, task_items)
    for file in args.ppl:
        results["perplexity"][file] = scorer.perplexity_file(file, stride=args.stride)
    if args.json:
        print(json.dumps(_json_safe(results), indent=2))
    else:
        print(format_results(results))
    return 0


def list_tasks() -> int:
    """One line per task: name, whether the paper reports it, its local file, its hub dataset, metrics."""
    from memoryformer.evaluation.tasks import HUB, TASKS

    for name, info in TASKS.items():
        print(f"{name:<14} {'paper' if info.in_paper else '':<6} {info.default_path:<38} "
              f"{HUB[name].describe():<48} {', '.join(info.metrics)}")
    return 0


def build_scorer(args: argparse.Namespace):
    """Load --model and wrap it in a `Scorer` with the CLI's settings."""
    import torch

    from memoryformer.evaluation.evaluate import Scorer
    from memoryformer.train.distributed import resolve_device
    from memoryformer.train.memory import check_inference_memory

    device = resolve_device(args.device or "cpu")
    check_inference_memory(args.model, device, batch_size=args.batch_size, seq_len=args.max_length,
                           force=args.force)
    model, tokenizer = load_model_for_eval(args.model, device)
    model.eval()
    max_length = args.max_length or getattr(getattr(model, "config", None), "max_seq_len", None)
    if max_length is None:
        raise ValueError("the model does not say its context length: pass --max-length N")

    def logits_fn(idx: torch.Tensor) -> torch.Tensor:
        return model(idx)[0]

    return Scorer(logits_fn, tokenizer, max_length=max_length, batch_size=args.batch_size, device=device,
                  progress=not args.quiet)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table: one row per task (acc, acc_norm, perplexity with stderrs), then perplexities."""
    def cell(metrics: dict[str, float], key: str) -> str:
        if key not in metrics:
            return ""
        err = metrics.get(f"{key}_stderr")
        return f"{metrics[key]:.4f}" + (f" ± {err:.4f}" if err is not None and math.isfinite(err) else "")

    lines = []
    if results["tasks"]:
        lines.append(f"{'task':<14} {'n':>6}  {'acc':<17} {'acc_norm':<17} {'perplexity':>10}")
        for name, m in results["tasks"].items():
            ppl = f"{m['perplexity']:.2f}" if "perplexity" in m else ""
            lines.append(f"{name:<14} {m['n']:>6}  {cell(m, 'acc'):<17} {cell(m, 'acc_norm'):<17} {ppl:>10}")
    if results["perplexity"]:
        if lines:
            lines.append("")
        lines.append(f"{'text':<40} {'tokens':>10} {'perplexity':>11} {'bits/byte':>10}")
        for file, m in results["perplexity"].items():
            bpb = f"{m['bits_per_byte']:.4f}" if "bits_per_byte" in m else ""
            lines.append(f"{file[-40:]:<40} {m['tokens']:>10} {m['perplexity']:>11.3f} {bpb:>10}")
    return "\n".join(line.rstrip() for line in lines)
