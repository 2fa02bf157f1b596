"""Training, caching and reusing the arms of an experiment (see `registry` for what they are).

An arm's run directory is named by a hash of everything that defines it; a finished arm's `arm.json`
is reused by any experiment that needs it, an unfinished one resumes from its checkpoint. Arms run
in this process one after another, or (`jobs` > 1 in `run_arms`) in worker processes with one torch
thread each.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from memoryformer.core.config import ModelConfig
from memoryformer.progress import Progress
from memoryformer.research.reproduce.registry import ARCH_LABEL, EXPERIMENTS, ORDER, Arm, Settings

# ---------------------------------------------------------------------------------------------
# Data, run directories, one arm
# ---------------------------------------------------------------------------------------------


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def data_dir(s: Settings) -> Path:
    """The prepared data shared by every arm: <out>/data/<corpus>-v<vocab>-<hash of the settings>."""
    spec = {"data": sorted(str(Path(d).resolve()) for d in s.data) if s.data else None,
            "vocab_size": s.vocab_size, "max_bytes": s.max_bytes, "val_fraction": s.val_fraction}
    first = Path(s.data[0]) if s.data else None
    if first is not None and any(c in first.name for c in "*?["):  # a glob: name it by its folder
        first = first.parent
    label = re.sub(r"[^A-Za-z0-9_-]+", "_", first.name)[:24] if first is not None else "default"
    name = f"{label or 'data'}-v{s.vocab_size}"
    return Path(s.out) / "data" / f"{name}-{_hash(spec)}"


def prepare_data(s: Settings) -> Path:
    """Tokenise the corpus once (BPE of vocab_size trained on it); reuse it when already there."""
    from memoryformer.data import prepare

    path = data_dir(s)
    if not (path / "meta.json").is_file():
        if path.exists():
            shutil.rmtree(path)  # an interrupted prepare
        print(f"preparing {'the default corpus' if not s.data else ', '.join(s.data)} -> {path}", flush=True)
        prepare(s.data or None, path, vocab_size=s.vocab_size, max_bytes=s.max_bytes, val_fraction=s.val_fraction,
                seed=0, progress=s.progress)
    return path


def data_fingerprint(data: Path) -> dict[str, Any]:
    """The prepared data's meta.json as results record it (every scalar field: source, tokenizer, token
    counts, and whatever fingerprint the data step adds), plus its folder."""
    meta = json.loads((Path(data) / "meta.json").read_text())
    small = {k: v for k, v in meta.items() if not isinstance(v, (list, dict)) or len(v) <= 64}
    return {"path": str(data), **small}


def arm_steps(s: Settings, arm: Arm) -> int:
    """Optimizer steps of an arm: its own token budget's when it has one, the settings' otherwise."""
    return arm.steps if arm.steps is not None else s.steps


def train_config(s: Settings, arm: Arm):
    from memoryformer.train import TrainConfig

    steps = arm_steps(s, arm)
    # arms with their own budget (the scaling study) evaluate about 20 times and checkpoint at most
    # every 500 steps; the others keep the settings' eval interval and a checkpoint at half-way
    eval_every = s.eval_every if arm.steps is None else max(s.eval_every, steps // 20)
    ckpt_every = max(steps // 2, 1) if arm.steps is None else max(min(steps // 2, 500), 1)
    return TrainConfig(batch_size=s.batch_size, seq_len=s.seq_len, max_steps=steps, lr=arm.lr,
                       warmup_frac=s.warmup_frac, eval_every=eval_every, eval_batches=s.eval_batches or None,
                       log_every=10, ckpt_every=ckpt_every, keep_last=1, seed=arm.seed, device=s.device,
                       precision="fp32", tensorboard=False, **arm.train)


# settings added after arms were first cached: at these values they are left out of an arm's hash, so
# arms trained before the setting existed are still found
_NEUTRAL_MODEL = {"attention": "softmax"}
_NEUTRAL_TRAIN = {"init_from": None, "teacher": None, "distill_alpha": 0.5, "distill_temperature": 1.0}


def arm_dir(s: Settings, arm: Arm, data: Path) -> Path:
    """<out>/arms/<arch>-<hash of model, training settings and data> (settings at their neutral
    values, _NEUTRAL_MODEL / _NEUTRAL_TRAIN, are left out)."""
    model = {k: v for k, v in arm.model.items() if _NEUTRAL_MODEL.get(k, object()) != v}
    train = {k: v for k, v in train_config(s, arm).to_dict().items() if _NEUTRAL_TRAIN.get(k, object()) != v}
    key = _hash({"model": model, "train": train, "data": data.name})
    return Path(s.out) / "arms" / f"{ARCH_LABEL[arm.model['architecture']]}-{key}"


def model_numbers(cfg: ModelConfig, seq_len: int) -> dict[str, Any]:
    """FLOPs, table memory and parameters of a config (no training needed)."""
    from memoryformer.research import flops as F

    breakdown = F.model_breakdown(cfg)
    counts = breakdown.total.counts
    out: dict[str, Any] = {
        "parameters": breakdown.total.total,
        "non_embedding_parameters": breakdown.total.total - counts["embedding"] - counts["head"],
        "table_parameters": counts["tables"],
        "table_mb_fp16": counts["tables"] * 2 / 1e6,
        "forward_flops_per_token": F.forward_flops_per_token(cfg, seq_len),
        "training_flops_per_token": F.training_flops_per_token(cfg, seq_len),
        "block_flops_paper": F.paper_flops(cfg, seq_len, attention=False),
        "block_flops_paper_with_attention": F.paper_flops(cfg, seq_len),
    }
    if cfg.architecture == "memoryformer":
        k = cfg.num_tables
        out["q_layer_table_mb_fp16"] = F.memory_table_bytes(k, cfg.tau, cfg.d_model) / 1e6
        out["memory_block_table_mb_fp16"] = F.memory_block_table_bytes(k, cfg.tau, cfg.d_model, cfg.expanding_bits) / 1e6
        out["q_layer_flops_paper"] = F.paper_memory_layer_flops(seq_len, k, cfg.tau, cfg.d_model)
    return out


def _config_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The model fields a result row shows (None where the architecture has no such setting)."""
    is_mf = cfg.architecture == "memoryformer"
    return {
        "architecture": cfg.architecture, "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
        "attention": getattr(cfg, "attention", "softmax"),
        "tau": cfg.tau if is_mf else None, "num_tables": cfg.num_tables if is_mf else None,
        "expanding_bits": cfg.expanding_bits if is_mf else None, "weighting": cfg.weighting if is_mf else None,
        "temperature": cfg.temperature if is_mf else None,
        "activation": (cfg.memory_block_activation or "none") if is_mf else None,
    }


def _cached_row(arm: Arm, out: Path) -> dict[str, Any] | None:
    cached = out / "arm.json"
    if not cached.is_file():
        return None
    row = json.loads(cached.read_text())
    row.update(name=arm.name, labels=arm.labels)  # the same run can serve several experiments
    row["cached"] = True
    return row


def run_arm(s: Settings, arm: Arm, data: Path) -> dict[str, Any]:
    """Train one arm (or reuse its finished run) and return its result row."""
    from memoryformer.data import TokenData
    from memoryformer.research.analysis import BucketCounter, usage_hook, usage_summary
    from memoryformer.train import train, validation_loss
    from memoryformer.train.checkpoint import atomic_write_text

    out = arm_dir(s, arm, data)
    row = _cached_row(arm, out)
    if row is not None:
        return row
    cfg = arm.model_config()
    tokens = TokenData(data)
    is_mf = cfg.architecture == "memoryformer"
    hook = usage_hook(tokens, s.seq_len, s.usage_windows) if is_mf and s.usage_windows else None
    steps = arm_steps(s, arm)
    t0 = time.perf_counter()
    try:
        res = train(cfg, train_config(s, arm), data, out, resume="auto", progress=s.progress, verbose=False,
                    on_eval=hook)
    except FloatingPointError as err:  # a diverged LR is a result of a sweep, not a failure of the study
        return _diverged_row(s, arm, cfg, data, out, str(err), time.perf_counter() - t0)
    if not res.finished:
        raise RuntimeError(f"arm {arm.name!r} stopped at step {res.step} of {steps} ({res.interrupted}); rerun "
                           "the same command to resume it")
    model = res.model.eval()
    counter = BucketCounter(model) if is_mf else None
    with counter or contextlib.nullcontext():
        val = validation_loss(model, tokens, s.seq_len, batch_size=16)  # every held-out window
    tail = res.losses[-max(1, len(res.losses) // 10):]
    row = {
        "name": arm.name, "labels": arm.labels, "lr": arm.lr, "seed": arm.seed, **_config_fields(cfg),
        "steps": res.step, "batch_size": s.batch_size, "seq_len": s.seq_len, "train_tokens": res.tokens,
        "val_loss": val["loss"], "val_ppl": val["ppl"], "val_tokens": val["tokens"],
        "train_loss_end": statistics.fmean(tail), "train_tokens_per_s": res.tokens_per_s,
        "wall_s": time.perf_counter() - t0, "train_seconds": res.train_seconds,
        "elapsed_seconds": res.elapsed_seconds, **model_numbers(cfg, s.seq_len),
        "evals": res.evals, "run_dir": str(out), "data": data_fingerprint(data),
    }
    if counter is not None:
        row["usage_val"] = usage_summary(counter.counts)  # over the whole held-out split
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished: model.safetensors and arm.json stay
    atomic_write_text(out / "arm.json", json.dumps(row, indent=1) + "\n")
    return row


def _diverged_row(s: Settings, arm: Arm, cfg: ModelConfig, data: Path, out: Path, why: str,
                  seconds: float) -> dict[str, Any]:
    """The cached result of an arm whose loss became non-finite: held-out loss inf, so sweeps rank it last."""
    from memoryformer.train.checkpoint import atomic_write_text

    row = {"name": arm.name, "labels": arm.labels, "lr": arm.lr, "seed": arm.seed, **_config_fields(cfg),
           "steps": arm_steps(s, arm), "batch_size": s.batch_size, "seq_len": s.seq_len,
           "train_tokens": arm_steps(s, arm) * s.batch_size * s.seq_len, "val_loss": math.inf, "val_ppl": math.inf,
           "val_tokens": 0, "train_loss_end": math.inf, "train_tokens_per_s": 0.0, "wall_s": seconds,
           "diverged": why, **model_numbers(cfg, s.seq_len), "evals": [], "run_dir": str(out),
           "data": data_fingerprint(data)}
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    atomic_write_text(out / "arm.json", json.dumps(row, indent=1) + "\n")
    return row


def arm_line(row: dict[str, Any]) -> str:
    """One log line for a finished arm: its name, held-out loss and time."""
    if row.get("diverged"):
        return f"  {row['name']}: diverged ({row['diverged']}), {row['wall_s']:.0f} s"
    if row.get("cached"):
        return f"  {row['name']}: cached, val loss {row['val_loss']:.4f} ({row['run_dir']})"
    return (f"  {row['name']}: val loss {row['val_loss']:.4f} (ppl {row['val_ppl']:.2f}), "
            f"{row['train_tokens_per_s']:,.0f} tokens/s, {row['wall_s']:.0f} s")


# ---------------------------------------------------------------------------------------------
# Running many arms: in this process, or in worker processes
# ---------------------------------------------------------------------------------------------


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_arm_job(settings: dict[str, Any], arm: Arm, data: str) -> dict[str, Any]:
    """What a worker process runs: one arm (Settings travel as a dict)."""
    return run_arm(Settings(**settings), arm, Path(data))


Plan = Callable[[Sequence[dict[str, Any]]], list[Arm]]


def run_plan(s: Settings, plan: Plan, data: Path, *, jobs: int = 1, desc: str = "arms",
             on_row: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Run arms until `plan(finished rows)` asks for nothing new; return the rows in finishing order.

    The plan may depend on finished results (an adaptive LR sweep); it is asked again after every
    finished arm, and `on_row(rows)` is called then too (to write results as they land). jobs > 1
    runs that many arms at once in worker processes with `s.threads` torch threads each."""
    rows: list[dict[str, Any]] = []
    with Progress(total=None, desc=desc, unit="arms finished") as bar:
        def finished(row: dict[str, Any]) -> None:
            rows.append(row)
            bar.write(arm_line(row))
            bar.update(1, val_loss=row["val_loss"])
            if on_row is not None:
                on_row(rows)

        if jobs <= 1:
            _run_serial(s, plan, data, rows, finished)
        else:
            _run_parallel(s, plan, data, rows, finished, jobs)
    return rows


def _pending(s: Settings, plan: Plan, data: Path, rows: Sequence[dict[str, Any]], busy: set[Path]) -> list[Arm]:
    """The arms the plan wants that are neither finished nor running (one per run directory)."""
    done = {Path(r["run_dir"]) for r in rows}
    out, seen = [], set(busy) | done
    for arm in plan(rows):
        d = arm_dir(s, arm, data)
        if d not in seen:
            seen.add(d)
            out.append(arm)
    return out


def _run_serial(s: Settings, plan: Plan, data: Path, rows: list[dict[str, Any]], finished) -> None:
    while todo := _pending(s, plan, data, rows, set()):
        cached = [row for arm in todo if (row := _cached_row(arm, arm_dir(s, arm, data))) is not None]
        for row in cached:  # all of them first, so the results written hold every finished arm
            finished(row)
        if not cached:
            finished(run_arm(s, todo[0], data))


def _run_parallel(s: Settings, plan: Plan, data: Path, rows: list[dict[str, Any]], finished, jobs: int) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    settings = s.to_dict()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(s.threads,)) as pool:
        running: dict[Any, Path] = {}
        try:
            while True:
                while len(running) < jobs:  # re-plan after every change: a cached arm needs no slot
                    todo = _pending(s, plan, data, rows, set(running.values()))
                    cached = [row for arm in todo if (row := _cached_row(arm, arm_dir(s, arm, data))) is not None]
                    for row in cached:  # all of them first, so the results written hold every finished arm
                        finished(row)
                    if cached:
                        continue
                    if not todo:
                        break
                    running[pool.submit(_run_arm_job, settings, todo[0], str(data))] = arm_dir(s, todo[0], data)
                if not running:
                    return
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    running.pop(future)
                    finished(future.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# ---------------------------------------------------------------------------------------------
# Running an experiment
# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


def command_line(name: str, s: Settings) -> str:
    return f"memoryformer reproduce {name}" + (f" {s.command}" if s.command else "")


def _fixed_plan(arms: Sequence[Arm], followup=None, s: Settings | None = None) -> Plan:
    """A plan of a fixed arm list, then (once every one is done) the experiment's follow-up arms."""
    def plan(rows: Sequence[dict[str, Any]]) -> list[Arm]:
        if followup is None or len(rows) < len(arms):
            return list(arms)
        first = [r for r in rows if r["name"] in {a.name for a in arms}][:len(arms)]
        return [*arms, *followup(s, first)]
    return plan


def run_experiment(name: str, s: Settings, *, arms: list[Arm] | None = None) -> dict[str, Any]:
    """Run (or reuse) every arm of one experiment; write <results>/<name>.json, .md and plots.

    `arms` overrides the experiment's own list (tests)."""
    from memoryformer.research.reproduce import report as R

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(ORDER)}, scaling or all")
    exp = EXPERIMENTS[name]
    torch.set_num_threads(s.threads)
    data = prepare_data(s)
    print(f"== {name}: {exp.title} ({exp.paper}) ==", flush=True)
    todo = list(arms) if arms is not None else exp.arms(s)
    plan = _fixed_plan(todo, exp.followup if arms is None else None, s)
    rows = run_plan(s, plan, data, jobs=1, desc=name)
    order = {a.name: i for i, a in enumerate(plan(rows))}
    rows.sort(key=lambda r: order.get(r["name"], len(order)))
    return R.write_experiment(name, exp, s, rows, data, command=command_line(name, s), machine=machine())


def run(name: str, s: Settings) -> dict[str, dict[str, Any]]:
    """One experiment, or "all" of them in order (arms shared between experiments run once)."""
    if name == "scaling":  # long: never part of "all"
        from memoryformer.research.reproduce.scaling import run_scaling

        return {"scaling": run_scaling(s)}
    if name == "conversion":  # builds on the scaling study's arms
        from memoryformer.research.reproduce.conversion import run_conversion

        return {"conversion": run_conversion(s)}
    names = ORDER if name == "all" else (name,)
    return {n: run_experiment(n, s) for n in names}
