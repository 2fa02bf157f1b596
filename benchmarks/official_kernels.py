"""MemoryLayer forward against the official MemoryFormer CPU kernels, on the same tables and inputs.

    python benchmarks/official_kernels.py --official-src PATH/TO/MemoryFormer [--d 512 1024]
        [--n 1 8 64 512 2048 8192] [--rounds 5] [--quick]

PATH/TO/MemoryFormer is a checkout of the official code (`git clone https://github.com/C0-Design/MemoryFormer`).
This script builds two of its CPU kernels from that directory, with the compiler flags of that directory's own
`load(...)` calls, into runs/official-kernels-build (nothing of theirs is part of this repository):
    compute_code_score                    memory_module/compute_code_score/torch_extension.cc (the hash)
    weighted_vector_gather_add_avx2_par   memory_module/gather/cpu/torch_extension.cpp (the weighted gather)
Then, in one process and interleaved, for every d and N it times, without gradients, in fp32:
    ours       MemoryLayer(d, d, weighting="l1") forward on our C++ kernels (backend "kernels", built here if
               needed; the script stops if they cannot be);
    official   their pipeline for the same layer: hash (compute_code_score), row offsets, gather, + bias,
               with no Python between the kernels beyond what the pipeline needs.
tau = 8 (their configs), same table, bias and input for both; the input N(0, 1) with no exact zeros (the
official CPU hash gives 0.0 the bit 0, ours the bit 1). Both give the same output: the script checks it to
1e-5 relative (max |ours - official| / max |official|) at every d and N before timing, and records the
error. The official gather has no tail loop (64 tokens per block), so its input is padded with zero rows up
to a multiple of 64; the padding copy and the padded rows are counted in its time (n_padded in the table).

Writes benchmarks/results/official_kernels.json and .md: median times, ratio ours / official (below 1: ours
faster), the official commit (`git rev-parse HEAD` of the checkout, else "unknown") and both sides' flags.
--quick: 1 round, d = 512, N = 1, 100, 2048 (a smoke test, not a measurement). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import configure_allocator, time_interleaved, write_results  # noqa: E402

from memoryformer import MemoryLayer, kernels  # noqa: E402
from memoryformer.kernels import _loader  # noqa: E402

PROG = "official_kernels.py"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUILD_DIR = REPO / "runs" / "official-kernels-build"
CLONE = "git clone https://github.com/C0-Design/MemoryFormer"
TAU = 8  # code_length of the official configs; their gather needs tables of a multiple of 256 rows
PAD_MULTIPLE = 64  # the official gather's token block (TT = 64), with no tail loop
TOLERANCE = 1e-5  # max |ours - official| / max |official|
MAX_CASE = "max over N and d"  # the summary row run_all's target reads
FULL_D, FULL_N = (512, 1024), (1, 8, 64, 512, 2048, 8192)
QUICK_D, QUICK_N = (512,), (1, 100, 2048)


class OfficialError(Exception):
    """A problem with the official sources or their build: reported as one line, exit status 1."""


@dataclass(frozen=True)
class OfficialKernel:
    """One official C++ extension: its module name, source and the kernel.py whose load(...) has its flags."""

    name: str
    source: str
    loader: str
    function: str


OFFICIAL = (
    OfficialKernel("ccs_cpu", "memory_module/compute_code_score/torch_extension.cc",
                   "memory_module/compute_code_score/kernel.py", "compute_code_score"),
    OfficialKernel("gather_add_cpu", "memory_module/gather/cpu/torch_extension.cpp",
                   "memory_module/gather/cpu/kernel.py", "weighted_vector_gather_add_avx2_par"),
)


# ---- the official sources ---------------------------------------------------------------------------------


def check_sources(root: Path | None) -> Path:
    """The checkout's directory, resolved, if it holds every file of OFFICIAL; else OfficialError."""
    hint = f"(get the official sources with `{CLONE}`)"
    if root is None:
        raise OfficialError(f"--official-src DIR is required: a checkout of the official MemoryFormer code {hint}")
    if not root.is_dir():
        raise OfficialError(f"--official-src {root}: no such directory {hint}")
    for kernel in OFFICIAL:
        for rel in (kernel.source, kernel.loader):
            if not (root / rel).is_file():
                raise OfficialError(f"--official-src {root} is not a checkout of the official MemoryFormer code: "
                                    f"{rel} is missing {hint}")
    return root.resolve()


def read_flags(loader: Path) -> dict[str, list[str]]:
    """extra_cflags and extra_ldflags of the torch.utils.cpp_extension load(...) call in `loader`."""
    try:
        tree = ast.parse(loader.read_text(), str(loader))
    except (OSError, SyntaxError, ValueError) as err:
        raise OfficialError(f"cannot read {loader}: {err}") from None
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        keywords = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        if name != "load" or "extra_cflags" not in keywords:
            continue
        try:
            flags = {key: ast.literal_eval(keywords[key]) if key in keywords else []
                     for key in ("extra_cflags", "extra_ldflags")}
        except ValueError:
            break
        if all(isinstance(v, list) and all(isinstance(f, str) for f in v) for v in flags.values()):
            return {"cflags": flags["extra_cflags"], "ldflags": flags["extra_ldflags"]}
        break
    raise OfficialError(f"cannot read the build flags of {loader}: no load(..., extra_cflags=[...]) call "
                        "with literal lists of strings")


def official_commit(root: Path) -> str:
    """`git rev-parse HEAD` of `root` if it is the top of a git checkout, else "unknown"."""
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = top.stdout.split()
    if top.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root.resolve():
        return "unknown"
    return lines[1]


def _first_error(err: BaseException) -> str:
    """One line from a failed build's message: its compiler error lines if it has any."""
    text = str(err).strip()
    errors = [line.strip() for line in text.splitlines() if "error" in line.lower() and len(line) < 300]
    return " | ".join(errors[:2]) if errors else " ".join(text.split())[:300] or type(err).__name__


def build_official(root: Path, build_dir: Path) -> tuple[dict[str, object], dict[str, dict]]:
    """Build and load every kernel of OFFICIAL from `root` with its own flags, each in build_dir/NAME.

    Returns {function name: the loaded function} and {module name: {source, cflags, ldflags}}."""
    from torch.utils.cpp_extension import load

    functions, flags = {}, {}
    for kernel in OFFICIAL:
        own = read_flags(root / kernel.loader)
        out = build_dir / kernel.name
        out.mkdir(parents=True, exist_ok=True)
        print(f"{PROG}: building (unless built) the official {kernel.name} ({kernel.source}) in {out}",
              file=sys.stderr, flush=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = load(kernel.name, [str(root / kernel.source)], extra_cflags=list(own["cflags"]),
                              extra_ldflags=list(own["ldflags"]), build_directory=str(out), verbose=False)
        except Exception as err:  # compiler errors, a missing toolchain or ninja, a load failure
            raise OfficialError(f"could not build the official {kernel.name} from {root / kernel.source}: "
                                f"{_first_error(err)}") from None
        if not hasattr(module, kernel.function):
            raise OfficialError(f"the official {kernel.name} built from {root / kernel.source} has no function "
                                f"{kernel.function}")
        functions[kernel.function] = getattr(module, kernel.function)
        flags[kernel.name] = {"source": kernel.source, **own}
    return functions, flags


# ---- the two pipelines ------------------------------------------------------------------------------------


def padded_rows(n: int, multiple: int = PAD_MULTIPLE) -> int:
    """n rounded up to a multiple of `multiple` (n >= 1)."""
    return -(-n // multiple) * multiple


def pad_rows(x: Tensor, multiple: int = PAD_MULTIPLE) -> Tensor:
    """x (N, d) -> (padded_rows(N), d): x's rows first, then zero rows; x itself when N is a multiple."""
    n = x.shape[0]
    total = padded_rows(n, multiple)
    if total == n:
        return x
    out = x.new_empty((total, *x.shape[1:]))
    out[:n].copy_(x)
    out[n:].zero_()
    return out


def official_layer(functions: dict[str, object], tau: int):
    """The official hash + gather pipeline of one Memory Layer (their MemoryLayer.forward without autograd).

    Returns forward(x (N, K * tau) fp32, table (K * 2**tau, out) fp32, bias (out,)) -> (N, out)."""
    code_score = functions["compute_code_score"]
    gather = functions["weighted_vector_gather_add_avx2_par"]
    offsets: dict[int, Tensor] = {}

    def forward(x: Tensor, table: Tensor, bias: Tensor) -> Tensor:
        n, d = x.shape
        k = d // tau
        if k not in offsets:  # table k's first row, as their code adds to the codes
            offsets[k] = torch.arange(k, dtype=torch.int32) << tau
        xp = pad_rows(x)
        codes = torch.empty(xp.shape[0], k, dtype=torch.int32)
        scores = torch.empty(xp.shape[0], k, dtype=torch.float32)
        code_score(xp.view(xp.shape[0], k, tau), codes, scores)
        out = gather(codes.add_(offsets[k]), table, scores)  # (padded N, out), zeros-initialised
        return out[:n] + bias

    return forward


def ours_ready() -> None:
    """Pin our C++ kernels (backend "kernels") and build or load them; OfficialError if they are unavailable."""
    kernels.set_backend("kernels")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ok = kernels.load()
    if not ok:
        raise OfficialError(f"our C++ kernels are not available ({_first_error(kernels.last_error() or RuntimeError())}); "
                            "build them with `python -m memoryformer.kernels.build`")


def max_rel_err(ours: Tensor, official: Tensor) -> float:
    """max |ours - official| / max |official| of two (N, out) outputs."""
    return ((ours - official).abs().max() / official.abs().max().clamp_min(1e-30)).item()


def make_case(official, d: int, n: int):
    """(ours, official, max relative error) for one (d, N): zero-argument callables on the same layer and x."""
    layer = MemoryLayer(d, d, tau=TAU, weighting="l1")
    with torch.no_grad():
        layer.bias.normal_(0.0, 0.02)  # nonzero, so that the check covers the bias
    table, bias = layer.table.detach(), layer.bias.detach()
    x = torch.randn(n, d)
    x.masked_fill_(x == 0, 0.5)  # no exact zeros: their CPU hash gives 0.0 bit 0, ours bit 1

    def ours():
        with torch.no_grad():
            return layer(x)

    def theirs():
        return official(x, table, bias)

    err = max_rel_err(ours(), theirs())
    return ours, theirs, err


def openmp_runtimes() -> list[str]:
    """The OpenMP libraries mapped into this process (one: both sides share its thread pool)."""
    try:
        with open("/proc/self/maps") as f:
            names = {line.split()[-1] for line in f if re.match(r"lib[gi]?omp", line.rsplit("/", 1)[-1])}
    except OSError:
        return []
    return sorted(names)


# ---- command line -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--official-src", type=Path, metavar="DIR",
                        help=f"a checkout of the official MemoryFormer code (`{CLONE}`)")
    parser.add_argument("--d", type=int, nargs="+", help=f"layer widths (default {' '.join(map(str, FULL_D))})")
    parser.add_argument("--n", type=int, nargs="+", help=f"tokens (default {' '.join(map(str, FULL_N))})")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 5; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"1 round, d = {QUICK_D[0]}, N = {', '.join(map(str, QUICK_N))} unless given: a smoke "
                             "test (overwrites the full results)")
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR,
                        help="where the official kernels are built (default runs/official-kernels-build)")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="4 KiB pages for every tensor (default: the allocator's 2 MiB pages, both sides)")
    args = parser.parse_args(argv)
    args.d = args.d or list(QUICK_D if args.quick else FULL_D)
    args.n = args.n or list(QUICK_N if args.quick else FULL_N)
    args.rounds = args.rounds if args.rounds is not None else 1 if args.quick else 5
    return args


def check_sizes(args: argparse.Namespace) -> None:
    """d: positive multiples of tau; N and rounds: positive; else OfficialError."""
    if any(d <= 0 or d % TAU for d in args.d):
        raise OfficialError(f"--d must be positive multiples of {TAU}, got {args.d}")
    if any(n <= 0 for n in args.n) or args.rounds <= 0:
        raise OfficialError(f"--n and --rounds must be positive, got --n {args.n} --rounds {args.rounds}")


def measure(official, args: argparse.Namespace) -> list[dict]:
    """One row per (d, N), checked then timed, plus the MAX_CASE row (the largest ratio's row)."""
    rows = []
    print(f"{'d':>5} {'N':>5} {'N pad':>6} {'ours ms':>9} {'official ms':>11} {'ratio':>6} {'max rel err':>11}")
    for d in args.d:
        for n in args.n:
            ours, theirs, err = make_case(official, d, n)
            if not err <= TOLERANCE:
                raise OfficialError(f"d={d} N={n}: ours and the official kernels differ by {err:.3g} relative "
                                    f"(more than {TOLERANCE:g}); not timing different computations")
            t = time_interleaved({"ours": ours, "official": theirs}, rounds=args.rounds)
            row = {"d": d, "n": n, "n_padded": padded_rows(n), "ours_ms": t["ours"] * 1e3,
                   "official_ms": t["official"] * 1e3, "ratio": t["ours"] / t["official"], "max_rel_err": err}
            rows.append(row)
            print(f"{d:>5} {n:>5} {row['n_padded']:>6} {row['ours_ms']:>9.4f} {row['official_ms']:>11.4f} "
                  f"{row['ratio']:>6.2f} {err:>11.2e}", flush=True)
            del ours, theirs
    worst = max(rows, key=lambda r: r["ratio"])
    return rows + [{"case": MAX_CASE, **worst, "max_rel_err": max(r["max_rel_err"] for r in rows)}]


def run(args: argparse.Namespace) -> None:
    """Check the sources, build both sides' kernels, measure, write the results."""
    check_sizes(args)
    root = check_sources(args.official_src)
    configure_allocator(not args.no_huge_pages)
    functions, flags = build_official(root, args.build_dir)
    ours_ready()
    torch.set_num_threads(torch.get_num_threads())  # also the OpenMP default of their parallel regions
    torch.manual_seed(0)
    rows = measure(official_layer(functions, TAU), args)
    columns = [("case", ""), ("d", "d"), ("n", "N"), ("n_padded", "N padded (official)"), ("ours_ms", "ours ms"),
               ("official_ms", "official ms"), ("ratio", "ratio ours / official"), ("max_rel_err", "max rel err")]
    commit = official_commit(root)
    notes = [f"MemoryLayer(d, d, weighting='l1') forward, fp32, no gradient, tau = {TAU}, on our C++ kernels, "
             "against the official compute_code_score + weighted_vector_gather_add_avx2_par (+ bias) on the same "
             f"table, bias and input (N(0, 1), no exact zeros). Medians over {args.rounds} interleaved rounds, "
             f"{torch.get_num_threads()} threads for both. Ratio < 1: ours faster.",
             f"The official gather processes tokens in blocks of {PAD_MULTIPLE} with no tail: its input is padded "
             "with zero rows to N padded, and the copy and the padded rows count in its time.",
             f"max rel err: max |ours - official| / max |official| (checked <= {TOLERANCE:g} before timing). "
             f"Official sources: commit {commit}, each built with its own kernel.py's flags: "
             + "; ".join(f"{name} {' '.join(f['cflags'])} (link: {' '.join(f['ldflags'])})"
                         for name, f in flags.items()) + f". Ours: {' '.join(_loader.CFLAGS)}.",
             "4 KiB pages (--no-huge-pages)." if args.no_huge_pages else
             "THP_MEM_ALLOC_ENABLE=1: large tensors of both sides on 2 MiB pages.",
             "Last row: the largest ratio (with its d, N and times) and the largest error over all rows."]
    extra = {"max_rel_err": rows[-1]["max_rel_err"], "official": {"commit": commit, "kernels": flags},
             "ours": {"backend": kernels.get_backend(), "cflags": list(_loader.CFLAGS),
                      "ldflags": list(_loader.LDFLAGS)},
             "settings": {"tau": TAU, "weighting": "l1", "dtype": "fp32", "pad_multiple": PAD_MULTIPLE,
                          "tolerance": TOLERANCE, "rounds": args.rounds, "threads": torch.get_num_threads(),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "openmp": openmp_runtimes()}}
    paths = write_results("official_kernels", rows, columns, title="MemoryLayer vs the official CPU kernels",
                          notes=notes, extra=extra)
    print("wrote", *paths)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except OfficialError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
