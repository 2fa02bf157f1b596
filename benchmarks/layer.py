"""MemoryLayer(d, d) against nn.Linear(d, d): forward and forward + backward, fp32 and bf16.

    python benchmarks/layer.py [--d 512 1024] [--n 1 8 64 2048 8192] [--rounds 5]

Prints a table of median times and the ratio MemoryLayer / Linear (below 1 means MemoryLayer is faster),
and writes benchmarks/results/layer.json and layer.md. At N = 1 the layers are "cold": each call uses the
next of several copies (and a new input), so weights are not cache-resident, as in a real multi-layer
model. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import configure_allocator, time_interleaved, write_results  # noqa: E402

from memoryformer import MemoryLayer  # noqa: E402

COLD_BYTES = 96 * 2**20  # rotate over at least this many bytes of weights at N = 1 (L3 here: 32 MiB)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def make_case(kind: str, d: int, n: int, dtype: torch.dtype, backward: bool, cold: bool):
    """A zero-argument callable running one forward (+ backward) of the layer."""
    def build():
        return MemoryLayer(d, d, dtype=dtype) if kind == "memory" else nn.Linear(d, d, dtype=dtype)

    first = build()
    copies = max(1, -(-COLD_BYTES // weight_bytes(first))) if cold else 1
    layers = [first] + [build() for _ in range(copies - 1)]
    inputs = [torch.randn(n, d, dtype=dtype, requires_grad=backward) for _ in range(max(copies, 4) if cold else 1)]
    grad = torch.randn(n, d, dtype=dtype)
    pairs = itertools.cycle(list(zip(itertools.cycle(layers), inputs)) if cold else [(first, inputs[0])])

    def run():
        layer, x = next(pairs)
        if backward:
            for p in layer.parameters():
                p.grad = None
            x.grad = None
            layer(x).backward(grad)
        else:
            with torch.no_grad():
                layer(x)

    return run, copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--n", type=int, nargs="+", default=[1, 8, 64, 2048, 8192])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--name", default="layer", help="results file stem")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="4 KiB pages for every tensor (default: the allocator's 2 MiB pages, both layers)")
    args = parser.parse_args()
    configure_allocator(not args.no_huge_pages)
    torch.manual_seed(0)
    rows = []
    header = f"{'d':>5} {'N':>5} {'mode':>8} {'dtype':>5} {'Linear ms':>10} {'Memory ms':>10} {'ratio':>6}"
    print(header)
    for d, n, dtype_name, backward in itertools.product(args.d, args.n, args.dtypes, (False, True)):
        dtype, cold = DTYPES[dtype_name], n == 1
        mem, mem_copies = make_case("memory", d, n, dtype, backward, cold)
        lin, lin_copies = make_case("linear", d, n, dtype, backward, cold)
        t = time_interleaved({"memory": mem, "linear": lin}, rounds=args.rounds)
        row = {"d": d, "n": n, "mode": "fwd+bwd" if backward else "fwd", "dtype": dtype_name,
               "cold": cold, "linear_ms": t["linear"] * 1e3, "memory_ms": t["memory"] * 1e3,
               "ratio": t["memory"] / t["linear"], "copies": {"memory": mem_copies, "linear": lin_copies}}
        rows.append(row)
        print(f"{d:>5} {n:>5} {row['mode']:>8} {dtype_name:>5} {row['linear_ms']:>10.4f} "
              f"{row['memory_ms']:>10.4f} {row['ratio']:>6.2f}", flush=True)
        del mem, lin
    columns = [("d", "d"), ("n", "N"), ("mode", "mode"), ("dtype", "dtype"), ("linear_ms", "Linear ms"),
               ("memory_ms", "MemoryLayer ms"), ("ratio", "ratio ML / Linear")]
    notes = ["Medians over interleaved rounds. tau = 8, K = d / 8, weighting 'prob'. N = 1 rows are cold "
             "(rotating over >= 96 MiB of weights and fresh inputs). Ratio < 1: MemoryLayer faster.",
             "4 KiB pages (--no-huge-pages)." if args.no_huge_pages else
             "THP_MEM_ALLOC_ENABLE=1: large tensors of both layers on 2 MiB pages."]
    paths = write_results(args.name, rows, columns, title="MemoryLayer vs nn.Linear", notes=notes)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
