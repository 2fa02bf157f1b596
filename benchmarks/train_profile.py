"""Where a training step's time goes, MemoryFormer against its twin, phase by phase and op by op.

    python benchmarks/train_profile.py [--pair study|tiny|both] [--steps 6] [--fused-adamw]

Pairs: `study` is the scaling study's size (d 128, 2 layers, 4 heads, vocab 4096, batch 8 x 128); `tiny`
is mf-tiny against pythia-70m at batch 4 x 512. Each step is the training loop's (forward, cross-entropy,
backward, gradient clipping with the table-gradient norms the backward kernels summed, AdamW with the
clip factor inside, zero_grad), timed phase by phase with wall clocks (medians over
steps), then once under torch.profiler for the ops (self CPU time, top 12 per model). "python & other" is
a phase's wall time minus the self time of the ops it ran.

Writes benchmarks/results/train_profile.json/.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import configure_allocator, write_results  # noqa: E402

from memoryformer.kernels.grad_norms import GradNormTally  # noqa: E402
from memoryformer.train.optim import clip_gradients, folds_clipping, step_clipped  # noqa: E402

FUSED = True
PHASES = ("blocks forward", "head + loss forward", "backward", "grad clip", "optimizer", "zero_grad")
PROFILER_CAVEAT = ("The table's phase times are wall clocks without the profiler. The op lists below come from "
                   "one step under torch.profiler, which inflated the Memory Layer ops' self time 4-14x "
                   "against their plain timings (docs/performance.md): read them for which ops run, and "
                   "the table for how long a phase takes.")


def study_pair() -> tuple[dict, dict, tuple[int, int]]:
    base = dict(vocab_size=4096, n_layers=2, d_model=128, n_heads=4, max_seq_len=128)
    return dict(preset="mf-tiny", **base), dict(preset="pythia-70m", **base), (8, 128)


def tiny_pair() -> tuple[dict, dict, tuple[int, int]]:
    return dict(preset="mf-tiny", max_seq_len=512), dict(preset="pythia-70m", max_seq_len=512), (4, 512)


PAIRS = {"study": study_pair, "tiny": tiny_pair}


def build(spec: dict):
    from memoryformer import LanguageModel, ModelConfig
    from memoryformer.train.config import TrainConfig
    from memoryformer.train.optim import build_optimizer

    spec = dict(spec)
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.from_preset(spec.pop("preset"), **spec)).train()
    optimizer = build_optimizer(model, TrainConfig(), lr=1e-3, fused=FUSED)
    return model, optimizer


def step_phases(model, optimizer, idx, targets, clock: dict[str, list[float]], profiled: bool = False) -> None:
    """One training step, each phase under a wall clock (and a profiler label)."""
    def phase(name, fn):
        t0 = time.perf_counter()
        if profiled:
            with record_function(name):
                out = fn()
        else:
            out = fn()
        clock[name].append(time.perf_counter() - t0)
        return out

    with GradNormTally() as tally:  # as the training loop: the kernels sum the table-gradient norms
        hidden = phase("blocks forward", lambda: model.hidden_states(idx))
        loss = phase("head + loss forward", lambda: F.cross_entropy(
            model.head(hidden).float().flatten(0, 1), targets.flatten()))
        phase("backward", loss.backward)
    # the training loop's clip_and_step in its two halves: the norm (and the multiply, unless the
    # optimizer applies the factor itself), then the update
    params, fold = list(model.parameters()), folds_clipping(optimizer)
    norm = phase("grad clip", lambda: clip_gradients(params, 1.0, sharded=False, tally=tally, scale=not fold))
    phase("optimizer", lambda: step_clipped(optimizer, params, norm, 1.0) if fold else optimizer.step())
    phase("zero_grad", lambda: optimizer.zero_grad(set_to_none=True))


def profile_pair(specs: dict[str, dict], batch: tuple[int, int], steps: int) -> dict[str, dict]:
    """Phase medians of both models, their steps alternating (noise hits both alike), then one profiled
    step of each."""
    models = {name: build(spec) for name, spec in specs.items()}
    b, t = batch
    vocab = next(iter(models.values()))[0].config.vocab_size
    data = [(torch.randint(0, vocab, (b, t)), torch.randint(0, vocab, (b, t))) for _ in range(4)]
    clocks: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in models}
    for i in range(2 + steps):  # two warm-up steps (optimizer state, allocator)
        for name, (model, optimizer) in models.items():
            step_phases(model, optimizer, *data[i % 4], clocks[name] if i >= 2 else defaultdict(list))
    out = {}
    for name, (model, optimizer) in models.items():
        phases = {p: statistics.median(clocks[name][p]) for p in PHASES}
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step_phases(model, optimizer, *data[0], defaultdict(list), profiled=True)
        total = sum(phases.values())
        out[name] = {"model": model.config.architecture, "step_ms": total * 1e3, "tokens_per_s": b * t / total,
                     "phases_ms": {k: v * 1e3 for k, v in phases.items()}, "ops": ops_by_phase(prof)}
    return out


def ops_by_phase(prof) -> dict:
    """{phase: {"self_ms": {op: ms}, "wall_ms": ms}} from a profiled step (ops attributed to the label
    whose interval contains them)."""
    events = prof.events()
    labels = [(e.name, e.time_range.start, e.time_range.end) for e in events if e.name in PHASES]
    out = {name: {"self_ms": defaultdict(float), "wall_ms": (end - start) / 1e3} for name, start, end in labels}
    for e in events:
        if e.name in PHASES:
            continue
        for name, start, end in labels:
            if start <= e.time_range.start < end:
                out[name]["self_ms"][e.name] += e.self_cpu_time_total / 1e3
                break
    for v in out.values():
        v["self_ms"] = dict(sorted(v["self_ms"].items(), key=lambda kv: -kv[1]))
    return out


def summary_rows(pair: str, mf: dict, dense: dict) -> list[dict]:
    rows = []
    for phase in PHASES:
        m, d = mf["phases_ms"][phase], dense["phases_ms"][phase]
        rows.append({"pair": pair, "phase": phase, "mf_ms": m, "mf_share": m / mf["step_ms"], "dense_ms": d,
                     "dense_share": d / dense["step_ms"], "ratio": m / d if d else None})
    rows.append({"pair": pair, "phase": "step", "mf_ms": mf["step_ms"], "mf_share": 1.0, "dense_ms": dense["step_ms"],
                 "dense_share": 1.0, "ratio": mf["step_ms"] / dense["step_ms"]})
    return rows


def op_notes(pair: str, name: str, result: dict, top: int = 8) -> str:
    lines = [f"**{pair}, {name}: top ops by self CPU time (ms, one profiled step)**", ""]
    for phase, v in result["ops"].items():
        ops = list(v["self_ms"].items())
        covered = sum(ms for _, ms in ops)
        shown = ", ".join(f"`{op}` {ms:.2f}" for op, ms in ops[:top])
        lines.append(f"- {phase} ({v['wall_ms']:.2f} ms wall, {max(0.0, v['wall_ms'] - covered):.2f} python & other): {shown}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=[*PAIRS, "both"], default="both")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    configure_allocator(True)
    torch.set_num_threads(args.threads)
    rows, notes, raw = [], [], {}
    for pair in (PAIRS if args.pair == "both" else [args.pair]):
        mf_spec, dense_spec, batch = PAIRS[pair]()
        both = profile_pair({"memoryformer": mf_spec, "dense": dense_spec}, batch, args.steps)
        mf, dense = both["memoryformer"], both["dense"]
        raw[pair] = {"batch": batch, "memoryformer": mf, "dense": dense}
        rows += summary_rows(pair, mf, dense)
        notes += [op_notes(pair, "MemoryFormer", mf), op_notes(pair, "dense twin", dense)]
        print(f"{pair}: step {mf['step_ms']:.1f} ms vs {dense['step_ms']:.1f} ms "
              f"(ratio {mf['step_ms'] / dense['step_ms']:.2f})", flush=True)
    notes.insert(0, PROFILER_CAVEAT)
    write_results("train_profile", rows, [("pair", "pair"), ("phase", "phase"), ("mf_ms", "MF ms"),
                                          ("mf_share", "MF share"), ("dense_ms", "dense ms"),
                                          ("dense_share", "dense share"), ("ratio", "MF / dense")],
                  title="Training step profile: MemoryFormer against its twin (medians over steps)",
                  notes=notes, extra={"profiles": raw})


if __name__ == "__main__":
    main()
