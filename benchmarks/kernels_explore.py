"""Micro-benchmark of the Memory Layer kernels against nn.Linear(d, d) and the pure-PyTorch path.

Interleaved A/B timing: every round times each candidate once (in a rotating order), and the
report gives the median over rounds and the ratio to nn.Linear. On a shared machine use this only
to choose between approaches; official numbers come from a quiet machine.

    python benchmarks/kernels_explore.py --mode fwd --n 2048 --d 1024
    python benchmarks/kernels_explore.py --mode train --n 2048 --d 1024 --dtype bf16
    python benchmarks/kernels_explore.py --mode cold --n 1 --d 1024 --layers 6
    python benchmarks/kernels_explore.py --mode fwd --n 2048 --d 1024 --option fwd_algo=1,2 --option cb_fwd=32,64

Allocator: run with e.g. MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1 (glibc) so large temporaries are
not returned to the OS between calls; the script prints what it ran with.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from memoryformer import MemoryLayer, kernels
from memoryformer.core.layer import memory_hash

_CLOCK = {"fn": time.perf_counter}


def _timeit(fn: Callable[[], object], reps: int) -> float:
    clock = _CLOCK["fn"]
    start = clock()
    for _ in range(reps):
        fn()
    return (clock() - start) / reps


def _pure(x, table, bias, tau, weighting):
    with kernels.backend("torch"):
        rows, w = memory_hash(x, tau, weighting)
        return F.embedding_bag(rows, table, mode="sum", per_sample_weights=w.to(table.dtype)) + bias


def build_candidates(args) -> dict[str, Callable[[], object]]:
    d, n, tau, K = args.d, args.n, args.tau, args.d // args.tau
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    layers = args.layers if args.mode == "cold" else 1
    lin_layers = max(layers, 1) * (32 if args.mode == "cold" else 1)
    lins = [torch.nn.Linear(d, d) for _ in range(lin_layers)]
    tables = [(torch.randn(K << tau, d) * 0.02).to(dt) for _ in range(layers)]
    bias = torch.zeros(d, dtype=dt)
    x = torch.randn(n, d)
    train = args.mode == "train"
    counter = itertools.count()
    ops = torch.ops.memoryformer

    def pick(seq):
        return seq[next(counter) % len(seq)]

    cands: dict[str, Callable[[], object]] = {}
    if train:
        xg = x.clone().requires_grad_()
        lin = lins[0]
        g = torch.randn(n, d)

        def linear():
            xg.grad = None
            lin.zero_grad(set_to_none=True)
            lin(xg).backward(g)

        tparam = tables[0].clone().requires_grad_()
        bparam = bias.clone().float().requires_grad_()

        def pure():
            xg.grad = None
            tparam.grad = None
            _pure(xg, tparam, bparam, tau, args.weighting).backward(g.to(dt))

        def kern():
            xg.grad = None
            tparam.grad = None
            ops.memory_layer(xg, [tparam], [bparam], tau, args.weighting, 1.0)[0].backward(g.to(dt))

        cands.update(linear=linear, pure=pure, kernel=kern)
        return cands

    def linear():
        with torch.no_grad():
            return pick(lins)(x)

    def pure():
        with torch.no_grad():
            return _pure(x, pick(tables), bias, tau, args.weighting)

    def kern():
        with torch.no_grad():
            return ops.memory_layer_infer(x, [pick(tables)], [bias], tau, args.weighting, 1.0)[0]

    mls = []
    for t in tables:
        ml = MemoryLayer(d, d, tau=tau, weighting=args.weighting, dtype=dt)
        ml.table.data = t
        mls.append(ml)

    def layer():  # the full MemoryLayer.forward path (checks + dispatch hook + op)
        with torch.no_grad():
            return pick(mls)(x)

    cands.update(linear=linear, pure=pure, kernel=kern, layer=layer)
    if args.bf16_linear:
        lin_bf = [torch.nn.Linear(d, d).to(torch.bfloat16) for _ in range(len(lins))]
        xb = x.to(torch.bfloat16)

        def linear_bf16():
            with torch.no_grad():
                return pick(lin_bf)(xb)

        cands["linear_bf16"] = linear_bf16
    return cands


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["fwd", "train", "cold"], default="fwd")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--tau", type=int, default=8)
    p.add_argument("--weighting", default="l1")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--layers", type=int, default=6, help="cold mode: tables rotated per call")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=0, help="calls per timing (0: auto)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time (all threads), robust to time-slicing on a busy machine")
    p.add_argument("--bf16-linear", action="store_true")
    p.add_argument("--option", action="append", default=[],
                   help="kernel option sweep NAME=v1,v2 (memoryformer::_set_option); repeatable")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    _CLOCK["fn"] = time.process_time if args.clock == "cpu" else time.perf_counter
    if not kernels.load():
        print("kernels unavailable:", kernels.last_error())
        return 1
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"threads={args.threads} malloc={malloc or 'glibc defaults'} args={vars(args)}")
    cands = build_candidates(args)
    sweeps = [(s.split("=")[0], [int(v) for v in s.split("=")[1].split(",")]) for s in args.option]
    variants: list[tuple[str, dict[str, int]]] = [("", {})]
    if sweeps:
        names = [n for n, _ in sweeps]
        variants = [
            (",".join(f"{n}={v}" for n, v in zip(names, combo)), dict(zip(names, combo)))
            for combo in itertools.product(*[vals for _, vals in sweeps])
        ]
    ops = torch.ops.memoryformer

    def run_variant(opts: dict[str, int], fn):
        old = {k: ops._set_option(k, v) for k, v in opts.items()}
        try:
            return fn()
        finally:
            for k, v in old.items():
                ops._set_option(k, v)

    entries: list[tuple[str, Callable[[], object]]] = []
    for name, fn in cands.items():
        if name == "kernel":
            for vname, opts in variants:
                entries.append((f"kernel[{vname}]" if vname else "kernel",
                                (lambda o=opts, f=fn: run_variant(o, f))))
        else:
            entries.append((name, fn))
    for _, fn in entries:  # warm up
        fn()
    reps = args.reps or max(1, int(0.05 / max(_timeit(entries[0][1], 1), 1e-6)))
    times: dict[str, list[float]] = {name: [] for name, _ in entries}
    for r in range(args.rounds):
        order = entries[r % len(entries):] + entries[: r % len(entries)]
        for name, fn in order:
            times[name].append(_timeit(fn, reps))
    base = statistics.median(times["linear"])
    print(f"{'candidate':40s} {'median ms':>10s} {'ratio/linear':>13s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:40s} {med * 1e3:10.3f} {med / base:13.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
