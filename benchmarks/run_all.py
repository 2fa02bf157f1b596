"""Run every benchmark, each in a fresh process, then write results/SUMMARY.md and results/summary.json.

    python benchmarks/run_all.py [--quick] [--bf16] [--only NAME ...] [--official-src DIR]
    python benchmarks/run_all.py --summary-only      # rebuild the summary from the JSON already there

Benchmarks (--only names): layer (layer.py), model_tiny (model.py --pair tiny), model_tiny_bf16 (model.py
--pair tiny --dtype bf16; only with --bf16 or --only, slow on CPUs without bf16 matrix units), scaling_cost
(scaling_cost.py: decode and training cost as context, batch and tokens per step grow), train_profile
(train_profile.py: a training step phase by phase and op by op), precision
(precision.py, when that script exists) and official_kernels (official_kernels.py: our kernels against the
official MemoryFormer CPU kernels built from DIR; run only with --official-src DIR, a checkout of
https://github.com/C0-Design/MemoryFormer, else skipped with one line in the summary). Each runs as its own
subprocess, so each has a clean process and its own peak memory. --quick passes each script the reduced-size
flags it has (fewer rounds and sizes, no train step or memory pass; scaling_cost.py's own --quick; for
precision.py fewer training steps and windows, trained in runs/precision-quick); quick results overwrite the
full ones, and their command line in the summary says so.

The summary holds the performance targets (each MET or MISSED, read from the JSON results), the source files
with their machine, date and command, and every results table. A failing benchmark is reported there and
makes the exit status 1; the others still run. Progress lines go to stderr. Imports no torch.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PROG = "python benchmarks/run_all.py"


# ---- the benchmarks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bench:
    """One benchmark script run: `python benchmarks/SCRIPT ARGS`, writing results/STEM.json/.md."""

    name: str
    script: str
    args: tuple[str, ...]
    stem: str
    quick: tuple[tuple[str, ...], ...]  # flag groups for --quick, each passed only if the script has its flag
    opt_in: bool = False  # run only when asked for (--bf16 or --only)
    needs: tuple[str, str] | None = None  # (run_all option passed through, what it names); skipped without it


MODEL_QUICK = (("--rounds", "1"), ("--skip-train",), ("--skip-memory",))
BENCHES = (
    Bench("layer", "layer.py", ("--rounds", "9"), "layer",  # 9 rounds: this VM is noisy
          (("--rounds", "1"), ("--d", "1024"), ("--n", "1", "2048"), ("--dtypes", "fp32"))),
    Bench("model_tiny", "model.py", ("--pair", "tiny"), "model_tiny_fp32", MODEL_QUICK),
    Bench("model_tiny_bf16", "model.py", ("--pair", "tiny", "--dtype", "bf16"), "model_tiny_bf16",
          MODEL_QUICK, opt_in=True),
    Bench("scaling_cost", "scaling_cost.py", (), "scaling_cost", (("--quick",),)),
    Bench("train_profile", "train_profile.py", (), "train_profile", (("--pair", "study"), ("--steps", "2"))),
    Bench("precision", "precision.py", (), "precision",  # quick: a shorter training run, kept apart
          (("--quick",), ("--rounds", "1"), ("--steps", "10"), ("--windows", "4"),
           ("--work", "runs/precision-quick"))),
    Bench("official_kernels", "official_kernels.py", (), "official_kernels", (("--quick",),),
          needs=("--official-src", "DIR, a checkout of https://github.com/C0-Design/MemoryFormer")),
)
BY_NAME = {b.name: b for b in BENCHES}


def quick_args(bench: Bench, source: str) -> list[str]:
    """The --quick flag groups whose flag the script's source mentions; its own --quick, if any, alone."""
    present = [g for g in bench.quick if f'"{g[0]}"' in source or f"'{g[0]}'" in source]
    own = [g for g in present if g[0] == "--quick"]
    return [a for g in (own or present) for a in g]


def bench_command(bench: Bench, quick: bool, bench_dir: Path = HERE) -> list[str]:
    """argv of one benchmark run from the repository root (the script must exist when `quick`)."""
    script = bench_dir / bench.script
    extra = quick_args(bench, script.read_text()) if quick else []
    return [sys.executable, f"{bench_dir.name}/{bench.script}", *bench.args, *extra]


def selected(args: argparse.Namespace, bench_dir: Path = HERE) -> list[Bench]:
    """The benchmarks to run: --only's, else all but the opt-in ones (bf16 with --bf16) and absent scripts."""
    if args.only:
        return [BY_NAME[n] for n in dict.fromkeys(args.only)]
    return [b for b in BENCHES if (not b.opt_in or args.bf16) and (bench_dir / b.script).exists()]


@dataclass
class RunResult:
    name: str
    command: str
    returncode: int
    seconds: float
    tail: list[str] = field(default_factory=list)  # last output lines, kept for failures
    skipped: str = ""  # why it was not run (a missing option it needs), or ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_bench(bench: Bench, quick: bool, bench_dir: Path = HERE) -> RunResult:
    """Run one benchmark in a subprocess from the repository root, echoing its output to stderr."""
    if not (bench_dir / bench.script).exists():
        return RunResult(bench.name, bench.script, 127, 0.0, [f"{bench_dir / bench.script} does not exist"])
    argv = bench_command(bench, quick, bench_dir)
    shown = shlex.join(["python", *argv[1:]])
    log(f"running {bench.name}: {shown}")
    tail: collections.deque[str] = collections.deque(maxlen=20)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(argv, cwd=bench_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(f"  {line}")
            tail.append(line.rstrip("\n"))
    seconds = time.perf_counter() - t0
    log(f"{bench.name}: exit {proc.returncode} after {seconds:.0f} s")
    return RunResult(bench.name, shown, proc.returncode, seconds, list(tail))


def run_or_skip(bench: Bench, args: argparse.Namespace) -> RunResult:
    """run_bench, with the run_all option the bench needs (Bench.needs) passed through; skipped without it."""
    if bench.needs is None:
        return run_bench(bench, args.quick)
    flag, what = bench.needs
    value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
    if value is None:
        reason = f"not run: it needs {flag} {what}"
        log(f"{bench.name}: skipped ({reason})")
        return RunResult(bench.name, "", 0, 0.0, skipped=reason)
    path = str(Path(value).expanduser().resolve())  # the bench runs from the repository root
    return run_bench(replace(bench, args=(*bench.args, flag, path)), args.quick)


def log(msg: str) -> None:
    print(f"[run_all] {msg}", file=sys.stderr, flush=True)


# ---- targets --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A row of `stem`.json matching `match` whose `field` (a time ratio unless told) should be at most
    `limit` (None: reported only)."""

    key: str
    text: str
    stem: str
    match: dict
    limit: float | None
    field: str = "ratio"


LAYER_TEXT = "MemoryLayer(1024, 1024) / nn.Linear(1024, 1024) time, fp32"
MODEL_TEXT = "mf-tiny / pythia-70m time, fp32, decode batch 1 after 128 tokens"
TINY = "model_tiny_fp32"
DECODE_BLOCKS = {"case": "decode b=1 ctx=128", "head": False}
STUDY_TEXT = "d 128, 2 layers, 4 heads, vocabulary 4096, batch 8 x 128"


def like_case(precision: str, head: bool) -> str:
    """benchmarks/model.py's like-for-like decode case name (model.like_case; this file imports no torch)."""
    h = f" + {precision} head" if head else ""
    return f"decode b=1 ctx=128, MF {precision} tables{h} vs dense {precision} blocks{h}"


def like_targets() -> tuple[Target, ...]:
    """Reported rows: each lower-precision like-for-like decode pair, blocks and whole model."""
    return tuple(Target("j", f"mf-tiny / pythia-70m time, decode batch 1 after 128 tokens, {p} tables vs {p} "
                             f"block weights" + (f", {p} heads: whole model" if head else ": blocks (head excluded)"),
                        TINY, {"case": like_case(p, head), "head": head}, None)
                 for p in ("bf16", "int8") for head in (False, True))


TARGETS = (
    Target("a", f"{LAYER_TEXT}, forward, N = 1 (cold)", "layer",
           {"d": 1024, "n": 1, "mode": "fwd", "dtype": "fp32"}, 0.2),
    Target("b", f"{MODEL_TEXT}: blocks (head excluded)", "model_tiny_fp32",
           {"case": "decode b=1 ctx=128", "head": False}, 0.15),
    Target("b", f"{MODEL_TEXT}: whole model (head included)", "model_tiny_fp32",
           {"case": "decode b=1 ctx=128", "head": True}, None),
    Target("c", f"{LAYER_TEXT}, forward + backward, N = 2048", "layer",
           {"d": 1024, "n": 2048, "mode": "fwd+bwd", "dtype": "fp32"}, 1.5),
    Target("d", f"{LAYER_TEXT}, forward, N = 2048 (stretch)", "layer",
           {"d": 1024, "n": 2048, "mode": "fwd", "dtype": "fp32"}, 1.0),
    Target("f", "mf-tiny / pythia-70m time, fp32, training step 4 x 512 (the training loop's clipping and "
                "AdamW)", TINY, {"case": "train step 4x512"}, 0.85),
    Target("g", f"MemoryFormer / dense twin time, fp32, training step at the scaling study's size ({STUDY_TEXT})",
           TINY, {"case": "train step study-size 8x128"}, 1.0),
    Target("h", "mf-tiny / pythia-70m time, fp32, prefill 512 tokens: whole model (head included)", TINY,
           {"case": "prefill 512", "head": True}, 0.8),
    Target("i", "mf-tiny time in ms, fp32, decode batch 1 after 128 tokens: blocks (head excluded)", TINY,
           DECODE_BLOCKS, 1.0, field="mf_ms"),
    Target("i", "mf-tiny decode time / its byte bound at the measured read bandwidths, batch 1 after 128 "
                "tokens: blocks (head excluded)", TINY, DECODE_BLOCKS, 2.0, field="mf_over_bound"),
    *like_targets(),
    Target("k", "MemoryLayer(d, d, 'l1') / official CPU kernels time, fp32, forward, max over N and d",
           "official_kernels", {"case": "max over N and d"}, 1.0),
)
# time fields of layer, model and official_kernels rows: (ours, baseline, our label, baseline label)
TIME_PAIRS = (("memory_ms", "linear_ms", "MemoryLayer", "Linear"), ("mf_ms", "dense_ms", "MF", "dense"),
              ("ours_ms", "official_ms", "ours", "official"))
# what a target's measured value is shown with, by field: the unit, the pairs of times (as TIME_PAIRS)
FIELD_UNITS = {"mf_ms": " ms"}
FIELD_TIMES = {"ratio": TIME_PAIRS, "mf_over_bound": (("mf_ms", "mf_bound_ms", "MF", "bound"),)}
PRECISION_LIMITS = {"bf16": 1e-2, "int8": 2e-2}
# precision.json fields (memoryformer.inference.quantize.precision_report): what each error measures
PRECISION_ERRORS = (("layer_rel_err", "one Memory Layer (fp32 model's inputs)"),
                    ("rel_l2_err", "whole-model logits, relative L2 (incl. hash flips downstream)"))


def status(value: float | None, limit: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "NO DATA"
    if limit is None:
        return "reported"
    return "MET" if value <= limit else "MISSED"


def _number(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def find_row(payload: dict | None, match: dict) -> dict | None:
    for row in (payload or {}).get("rows", []):
        if isinstance(row, dict) and all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _ms(v: float) -> str:
    """3 significant digits, whole milliseconds with separators from 1000 up (a training step)."""
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def ratio_target(t: Target, payload: dict | None) -> dict:
    """One target row: the measured value of `t.field` (a ratio with the two times it divides, or an
    absolute time with its unit) and its status."""
    row = find_row(payload, t.match)
    value = _number(row.get(t.field)) if row else None
    if payload is None:
        measured = f"no {t.stem}.json"
    elif value is None:
        measured = f"no row with {'a ratio' if t.field == 'ratio' else t.field} for {t.match}"
    else:
        times = [f" ({la} {_ms(row[a])} ms, {lb} {_ms(row[b])} ms)" for a, b, la, lb in FIELD_TIMES.get(t.field, ())
                 if _number(row.get(a)) is not None and _number(row.get(b)) is not None]
        measured = f"{value:.3g}{FIELD_UNITS.get(t.field, '')}" + "".join(times[:1])
    return {"key": t.key, "target": t.text, "limit": t.limit, "value": value, "measured": measured,
            "status": status(value, t.limit), "source": f"{t.stem}.json"}


def precision_targets(kind: str, payload: dict | None) -> list[dict]:
    """Target rows for `kind` tables from precision.json's "<kind>-tables" row: the relative error of one
    Memory Layer and of the whole model's logits, each against its limit (PRECISION_LIMITS), perplexity change noted."""
    limit = PRECISION_LIMITS[kind]
    row = find_row(payload, {"option": f"{kind}-tables"})
    ppl, ppl_rel = (_number(row.get("ppl_delta")), _number(row.get("ppl_delta_rel"))) if row else (None, None)
    out = []
    for key, what in PRECISION_ERRORS:
        value = _number(row.get(key)) if row else None
        if payload is None:
            measured = "no precision.json"
        elif value is None:
            measured = f"no {key} in a {kind}-tables row"
        else:
            measured = f"{value:.2g}"
            if ppl is not None:
                measured += f"; perplexity change {ppl:+.3g}" + ("" if ppl_rel is None else f" ({100 * ppl_rel:+.2g}%)")
        out.append({"key": "e", "target": f"{kind} tables: relative error, {what}", "limit": limit,
                    "value": value, "measured": measured, "status": status(value, limit), "ppl_delta": ppl,
                    "source": "precision.json"})
    return out


def load_results(results_dir: Path) -> dict[str, dict]:
    """stem -> payload of every readable results JSON (summary.json excluded)."""
    out = {}
    for path in sorted(results_dir.glob("*.json")):
        if path.name == "summary.json":
            continue
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log(f"skipping unreadable {path.name}: {err}")
            continue
        if isinstance(payload, dict):
            out[path.stem] = payload
    return out


def targets(results: dict[str, dict]) -> list[dict]:
    """Every target row, by key (the precision rows, e, after d)."""
    rows = [ratio_target(t, results.get(t.stem)) for t in TARGETS]
    rows += [r for kind in PRECISION_LIMITS for r in precision_targets(kind, results.get("precision"))]
    return sorted(rows, key=lambda r: r["key"])  # stable: the order within a key is kept


# ---- the summary ----------------------------------------------------------------------------------------


def describe_machine(m: dict | None) -> str:
    """'CPU (family F model M, ISA, flags, L2 x KiB, L3 y MiB), N threads, torch X[, GPU Y]' from a results
    file's machine record (the parenthesis holds what it records, common.cpu_details)."""
    if not isinstance(m, dict):
        return "unknown machine"
    detail = []
    if "cpu_family" in m:
        detail.append(f"family {m['cpu_family']} model {m.get('cpu_model', '?')}")
    if m.get("cpu_capability"):
        detail.append(str(m["cpu_capability"]))
    if m.get("cpu_flags"):
        detail.append(" ".join(m["cpu_flags"]))
    for level in ("l2", "l3"):
        kib = m.get(f"{level}_kib")
        if isinstance(kib, int):
            detail.append(f"{level.upper()} " + (f"{kib / 1024:g} MiB" if kib >= 1024 else f"{kib} KiB"))
    parts = [str(m.get("cpu", "unknown CPU")) + (f" ({', '.join(detail)})" if detail else "")]
    if "torch_threads" in m:
        parts.append(f"{m['torch_threads']} threads")
    parts.append(f"torch {m.get('torch', '?')}")
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu']}")
    return ", ".join(parts)


def describe_speed(m: dict | None) -> str:
    """'59 GFLOP/s fp32 matmul, 18.5 GB/s copy' from a results file's machine record ('' without one;
    common.machine_speed measures it)."""
    speed = m.get("speed") if isinstance(m, dict) else None
    if not isinstance(speed, dict):
        return ""
    return f"{speed.get('matmul_gflops', '?')} GFLOP/s fp32 matmul, {speed.get('copy_gb_s', '?')} GB/s copy"


def md_order(stem: str) -> tuple:
    """layer, the model pairs (the benchmarks' own first), the other benchmarks in BENCHES order
    (scaling_cost, precision), then anything else, by name."""
    known = [b.stem for b in BENCHES]
    group = 0 if stem == "layer" else 1 if stem.startswith("model_") else 2 if stem in known else 3
    return (group, known.index(stem) if stem in known else len(known), stem)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _limit(v: float | None) -> str:
    return "" if v is None else f"<= {v:g}"


def build_summary(results_dir: Path = RESULTS, *, command: str = f"{PROG} --summary-only",
                  runs: list[RunResult] | None = None, date: str | None = None) -> tuple[str, dict]:
    """SUMMARY.md's text and summary.json's payload, from the results JSON/Markdown in `results_dir`.

    `runs`: the benchmark runs of this invocation (None: nothing was run, the summary is rebuilt)."""
    date = date or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = load_results(results_dir)
    rows = targets(results)
    sources = {stem: {"date": p.get("date"), "command": p.get("command"),
                      "machine": describe_machine(p.get("machine")), "speed": describe_speed(p.get("machine"))}
               for stem, p in sorted(results.items(), key=lambda kv: md_order(kv[0]))}
    machines = list(dict.fromkeys(s["machine"] for s in sources.values()))
    failed = [r.name for r in runs or [] if not r.ok]
    payload = {"command": command, "date": date, "machines": machines, "targets": rows, "sources": sources,
               "runs": None if runs is None else [vars(r) | {"ok": r.ok} for r in runs], "failed": failed}

    lines = ["# Benchmark summary", "",
             f"Measured on: {'; '.join(machines) or 'no results yet'}  ",
             f"Summary written: {date}, by `{command}`", ""]
    if runs is None:
        lines += ["No benchmark was run for this summary: it is rebuilt from the JSON results below.", ""]
    lines += ["## Targets", "",
              "a-d and f-h are time ratios, ours over the dense baseline's, timed alternately in one process "
              "(below 1: MemoryFormer faster). e is the error of low-precision tables against fp32 ones. i is "
              "MemoryFormer's own decode time, and that time over its byte bound (the bytes a step reads at "
              "the read bandwidths measured in the same run; docs/performance.md). j compares each side at "
              "the same lower precision (reported, no target). k is ours over the official MemoryFormer kernels' time.", "",
              "| | target | limit | measured | status | from |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['key']} | {_cell(r['target'])} | {_limit(r['limit'])} | {_cell(r['measured'])} | "
                     f"{r['status']} | {r['source']} |")
    if runs is not None:
        lines += ["", "## Runs", "", "| benchmark | command | exit | seconds |", "|---|---|---|---|"]
        for r in runs:
            if r.skipped:
                lines.append(f"| {r.name} | {_cell(r.skipped)} | skipped | |")
                continue
            lines.append(f"| {r.name} | `{_cell(r.command)}` | {r.returncode}{'' if r.ok else ' FAILED'} | "
                         f"{r.seconds:.0f} |")
        for r in runs:
            if not r.ok:
                lines += ["", f"{r.name} failed; its results below, if any, are from an earlier run. "
                              "Last output lines:", "", "```", *r.tail, "```"]
    lines += ["", "## Sources", "",
              "Machine speed: the VM's own fp32 matmul and copy rates when the file was written (shared VMs "
              "slow down for hours at a time; compare runs at similar speeds).", "",
              "| file | date | command | machine | machine speed |", "|---|---|---|---|---|"]
    for stem, s in sources.items():
        lines.append(f"| [{stem}.json]({stem}.json) | {s['date']} | `{_cell(s['command'])}` | "
                     f"{_cell(s['machine'])} | {s['speed'] or 'not recorded'} |")
    for stem in sources:
        md = results_dir / f"{stem}.md"
        if md.exists():
            body = md.read_text().rstrip("\n").splitlines()
            body = [("#" + ln if ln.startswith("#") else ln) for ln in body]  # its title one level down
            lines += ["", *body, "", f"(From [{md.name}]({md.name}).)"]
    return "\n".join(lines) + "\n", payload


def write_summary(results_dir: Path, **kwargs) -> Path:
    """Write SUMMARY.md and summary.json into `results_dir`; returns SUMMARY.md's path."""
    text, payload = build_summary(results_dir, **kwargs)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")
    path = results_dir / "SUMMARY.md"
    path.write_text(text)
    return path


# ---- command line ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="reduced rounds and sizes (overwrites the full results; a smoke test, not a "
                             "measurement)")
    parser.add_argument("--bf16", action="store_true",
                        help="also run model.py --pair tiny --dtype bf16 (slow)")
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), metavar="NAME",
                        help=f"run only these benchmarks: {', '.join(BY_NAME)}")
    parser.add_argument("--summary-only", action="store_true",
                        help="run nothing; rebuild SUMMARY.md and summary.json from the JSON results")
    parser.add_argument("--official-src", metavar="DIR",
                        help="a checkout of the official MemoryFormer code (git clone "
                             "https://github.com/C0-Design/MemoryFormer): runs official_kernels, passing it on")
    parser.add_argument("--results-dir", type=Path, default=RESULTS,
                        help="with --summary-only: where the results are read and the summary written "
                             "(default benchmarks/results, where the benchmarks write)")


def command_line(args: argparse.Namespace, prog: str = PROG) -> str:
    """The invocation, spelt out from the parsed arguments."""
    parts = [prog] + ["--quick"] * args.quick + ["--bf16"] * args.bf16
    parts += ["--only", *args.only] if args.only else []
    parts += ["--summary-only"] * args.summary_only
    parts += ["--official-src", args.official_src] if args.official_src else []
    parts += ["--results-dir", str(args.results_dir)] if Path(args.results_dir) != RESULTS else []
    return " ".join(shlex.quote(p) if i else p for i, p in enumerate(parts))


def run(args: argparse.Namespace, prog: str = PROG) -> int:
    """Run the selected benchmarks (unless --summary-only), then write the summary; 1 if any failed."""
    if args.summary_only and (args.quick or args.bf16 or args.only or args.official_src):
        raise ValueError("--summary-only runs no benchmark; drop --quick, --bf16, --only and --official-src")
    if not args.summary_only and Path(args.results_dir) != RESULTS:
        raise ValueError(f"--results-dir needs --summary-only (the benchmarks always write to {RESULTS})")
    command = command_line(args, prog)
    runs = None
    if not args.summary_only:
        runs = [run_or_skip(b, args) for b in selected(args)]
    path = write_summary(Path(args.results_dir), command=command, runs=runs)
    log(f"wrote {path} and summary.json")
    failed = [r.name for r in runs or [] if not r.ok]
    if failed:
        log(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    sys.exit(main())
