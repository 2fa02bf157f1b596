"""Shared benchmark helpers: interleaved timing with medians, the machine's description, result files."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from run_all import describe_machine, describe_speed  # the summary's wording (run_all imports no torch)

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU model, threads, torch version (memoryformer.research.reproduce.runner.machine) plus allocator settings."""
    from memoryformer.research.reproduce.runner import machine as base

    prefixes = ("MALLOC_", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")
    info = {**base(), **cpu_details(), "allocator_env": {k: v for k, v in os.environ.items() if k.startswith(prefixes)}}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the vector features the kernels and torch use
_SIZE_UNITS = {"K": 1, "M": 1024, "G": 1024 * 1024}


def cpu_details(root: Path = Path("/")) -> dict:
    """What tells one host's CPU from another behind the same model name (a VM's "AMD EPYC" has been
    more than one chip): cpu_family / cpu_model and which of CPU_FLAGS it has (cpu_flags) from
    /proc/cpuinfo, torch's vector ISA (cpu_capability, e.g. AVX512 or AVX2), and cpu0's L2 and L3 cache
    sizes in KiB (l2_kib, l3_kib; an L2 or L3 may be shared by several cores). Fields it cannot read
    are left out; it never raises. `root`: where /proc and /sys are (tests)."""
    info: dict = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        for line in (root / "proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            field = {"cpu family": "cpu_family", "model": "cpu_model"}.get(key.strip())
            if field:
                info[field] = value.strip()
            elif key.strip() == "flags":
                info["cpu_flags"] = [f for f in CPU_FLAGS if f in value.split()]
    except (OSError, UnicodeDecodeError):
        pass
    for index in sorted((root / "sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
            kib = int(size[:-1]) * _SIZE_UNITS[size[-1]]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, IndexError):
            continue
        if level in ("2", "3") and kind in ("Unified", "Data"):
            info[f"l{level}_kib"] = kib
    return info


def machine_speed() -> dict:
    """How fast this machine runs right now: best-of-3 fp32 matmul GFLOP/s (1024 x 1024 x 4096) and copy
    GB/s (128 MB, read + write counted). A shared VM's speed moves from hour to hour; results files keep
    it so that a run on a slow phase can be told from a regression."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 4096)
    src = torch.randn(32 * 1024 * 1024)
    dst = torch.empty_like(src)
    flops, copy = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        flops.append(2 * 1024 * 1024 * 4096 / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        dst.copy_(src)
        copy.append(2 * src.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return {"matmul_gflops": round(max(flops), 1), "copy_gb_s": round(max(copy), 1)}


def configure_allocator(huge_pages: bool) -> None:
    """Ask PyTorch's CPU allocator for 2 MiB pages on large allocations (THP_MEM_ALLOC_ENABLE), or not,
    and keep freed memory for reuse as the `memoryformer` command does (memoryformer.allocator).

    Call before the first tensor is allocated: the allocator reads the variable once. It applies to the
    dense and the MemoryFormer side alike (see memoryformer/pages.py for why it matters)."""
    from memoryformer import allocator

    os.environ["THP_MEM_ALLOC_ENABLE"] = "1" if huge_pages else "0"
    allocator.configure()


def time_interleaved(fns: dict[str, Callable[[], object]], *, rounds: int = 5, min_time: float = 0.05,
                     sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds per call of each fn, measured in alternating rounds so noise hits all alike.

    Each round runs each fn enough times to last about `min_time` seconds (calibrated once)."""
    sync = sync or (lambda: None)
    reps = {}
    for name, fn in fns.items():
        fn()
        sync()  # warm-up
        t0 = time.perf_counter()
        fn()
        sync()
        one = max(time.perf_counter() - t0, 1e-7)
        reps[name] = max(1, min(10_000, int(min_time / one)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / reps[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def write_results(name: str, rows: list[dict], columns: list[tuple[str, str]], *, title: str,
                  notes: list[str] | None = None, extra: dict | None = None) -> tuple[Path, Path]:
    """Write results/NAME.json and results/NAME.md (a Markdown table of `columns`: (key, header))."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + sys.argv[1:])
    meta = {"command": command, "machine": {**machine(), "speed": machine_speed()},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    payload = {**meta, **(extra or {}), "rows": rows}
    json_path = RESULTS / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    m = meta["machine"]
    lines = [f"# {title}", "", f"Command: `{command}`  ", f"Machine: {describe_machine(m)}  ",
             f"Machine speed when written: {describe_speed(m)}  ", f"Date: {meta['date']}", ""]
    lines += ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(k)) for k, _ in columns) + " |")
    for note in notes or []:
        lines += ["", note]
    md_path = RESULTS / f"{name}.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 100_000:  # byte counts
        return f"{v:,}"
    return "" if v is None else str(v)
