"""`memoryformer reproduce EXPERIMENT`: the paper's comparisons and ablations at small scale
(see memoryformer.research.reproduce: registry, runner, report)."""

from __future__ import annotations

import argparse

from memoryformer.research.reproduce.registry import ORDER, Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    parser.add_argument("experiment", choices=(*ORDER, "scaling", "conversion", "all"), metavar="EXPERIMENT",
                        help=f"one of {', '.join(ORDER)}, all (those), scaling (the token-scaling study: "
                             "long, see docs/results.md) or conversion (dense twin -> MemoryFormer, on the "
                             "scaling study's arms: run it after the study's 4M budget)")
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="corpora to train on (files, directories, globs, .jsonl; e.g. corpora/"
                             "gutenberg); default: the embedded default corpus")
    parser.add_argument("--out", help=f"prepared data and one run directory per arm (default {d.out}); "
                                      "finished arms are reused, unfinished ones resume")
    parser.add_argument("--results", help=f"where <experiment>.json/.md/.png go (default {d.results})")
    parser.add_argument("--steps", type=int, help=f"training steps per arm (default {d.steps})")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help=f"seeds; the twin experiment repeats its headline arms with the second and later "
                             f"(default {' '.join(map(str, d.seeds))})")
    parser.add_argument("--depths", type=int, nargs="+", metavar="N",
                        help=f"layers of the twin experiment's sizes; ablations use the first "
                             f"(default {' '.join(map(str, d.depths))})")
    parser.add_argument("--lrs", type=float, nargs="+", metavar="LR", dest="lr_sweep",
                        help=f"the twin experiment's LR sweep (default {' '.join(f'{x:g}' for x in d.lr_sweep)})")
    parser.add_argument("--batch-size", type=int, help=f"sequences per step (default {d.batch_size})")
    parser.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {d.seq_len})")
    parser.add_argument("--vocab-size", type=int, help=f"BPE vocabulary trained on the corpus (default {d.vocab_size})")
    parser.add_argument("--max-bytes", type=int, help=f"bytes of text to read (default {d.max_bytes:,})")
    parser.add_argument("--threads", type=int, help=f"torch CPU threads (default {d.threads}: fastest on a busy CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="where arms train (default cpu; cuda: the GPU "
                                                                   "path for larger budgets, docs/results.md)")
    parser.add_argument("--jobs", type=int, help=f"scaling: arms trained at once, each in its own process with "
                                                 f"--threads threads (default {d.jobs})")
    parser.add_argument("--max-tokens", type=int, help="scaling: cap on any arm's token budget (shrinks the largest "
                                                       "budget to fit the machine's time)")
    parser.add_argument("--budgets", type=int, nargs="+", metavar="TOKENS",
                        help=f"scaling: token budgets (default {' '.join(map(str, d.budgets))})")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run: tiny models, a few steps")
    parser.add_argument("--list", action="store_true", help="print the experiment's arms and exit")
    parser.add_argument("--progress", action="store_true", help="progress bars while training")


def run(args: argparse.Namespace) -> int:
    from memoryformer.research.reproduce.registry import EXPERIMENTS, flags_of
    from memoryformer.research.reproduce.runner import run

    changes = {k: getattr(args, k) for k in ("data", "out", "results", "steps", "seeds", "depths", "lr_sweep",
                                            "batch_size", "seq_len", "vocab_size", "max_bytes", "threads", "jobs",
                                            "max_tokens", "budgets", "device")
               if getattr(args, k) is not None}
    flags = flags_of(changes, args.quick)
    for key in ("seeds", "depths", "lr_sweep", "budgets"):
        if key in changes:
            changes[key] = tuple(changes[key])
    settings = (Settings.quick_settings if args.quick else Settings)(**changes, progress=args.progress,
                                                                      command=flags)
    if args.list and args.experiment == "conversion":
        from memoryformer.research.reproduce import conversion

        print(conversion.__doc__)
        return 0
    if args.list and args.experiment == "scaling":
        return _list_scaling(settings)
    if args.list:
        for name in ORDER if args.experiment == "all" else (args.experiment,):
            exp = EXPERIMENTS[name]
            print(f"{name} ({exp.paper}): {exp.title}")
            for arm in exp.arms(settings):
                print(f"  {arm.name}")
            if exp.followup is not None and len(settings.seeds) > 1:
                print(f"  + the headline arms again with seeds {', '.join(map(str, settings.seeds[1:]))}")
        return 0
    run(args.experiment, settings)
    return 0


def _list_scaling(settings: Settings) -> int:
    from memoryformer.research.reproduce.scaling import Planner, study_series, tokens_tag

    series = study_series(settings)
    print("scaling (Tables 1, 2, 5): the series; each budget's LRs follow from finished results")
    for x in series:
        print(f"  {x.key}: {x.title}; budgets {', '.join(tokens_tag(b) for b in x.budgets)}")
    print("first arms:")
    for arm in Planner(settings, series, []).arms():
        print(f"  {arm.name}")
    return 0
