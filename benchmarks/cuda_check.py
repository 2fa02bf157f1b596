# device run (timeout_s 570): set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/cuda_check.py --out $OUT --time-budget 420 2>&1 | tee $OUT/cuda_check.log
"""CUDA check: correctness against float64 CPU references, then MemoryLayer / whole-model timings on the GPU.

    python benchmarks/cuda_check.py [--device cuda|cpu] [--quick] [--tiny] [--out DIR] [--time-budget S]

Section 1, correctness (always first, seconds): MemoryLayer / memory_layer values and gradients (x, table,
bias) in float32 and bf16 on the device against float64 on the CPU (same rounded inputs, so the same
hash); mf-test and pythia-test logits, KV-cache decoding against the full forward, greedy generate,
one training step, and torch.compile of a MemoryLayer. Each check is {name, max_abs_err, tol, ok}
with tol = atol + rtol * max|reference|.

Section 2, timing (GPU synchronised, medians over interleaved rounds after warm-up): MemoryLayer(d, d)
against nn.Linear(d, d) (benchmarks/layer.py's cases, N = 1 "cold": rotating over several layer
copies), then mf-tiny against pythia-70m (benchmarks/model.py's cases built on the device): decode
b = 1 and 8 after 128 tokens with and without the head, prefill 512, an AdamW step on 4 x 512, with the
peak of torch.cuda.max_memory_allocated per case. No new timing case starts when less of
--time-budget is left than the slowest case so far took; results are rewritten after every case.

On CUDA the C++ kernels (memoryformer.kernels, CPU only) do not apply: memoryformer.core.layer's pure path
(F.embedding_bag) runs, and MemoryFormer decoding runs the eager block (no fused decode op).
Writes DIR/cuda_<device>.json and .md (benchmarks/common.write_results). Needs no install: src/ is
put first on sys.path.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import re
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # the working tree's package, installed or not
sys.path.insert(0, str(HERE))
import common  # noqa: E402
import layer as layer_bench  # noqa: E402
import model as model_bench  # noqa: E402
from common import time_interleaved, write_results  # noqa: E402

from memoryformer import LanguageModel, MemoryLayer, ModelConfig, kernels, memory_layer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (rtol, atol) per dtype: tol = atol + rtol * max|reference|
TOLS = {"fp32": (1e-4, 1e-6), "bf16": (3e-2, 1e-3)}
# (lead shape, in_features, out_features, tau, weighting, temperature): N = 1, odd N, tau 4 and 8
LAYER_SHAPES = [
    ((1,), 64, 48, 4, "prob", 1.0),
    ((7,), 64, 32, 8, "prob", 1.0),
    ((3, 11), 128, 96, 8, "l1", 1.0),
    ((33,), 96, 64, 4, "prob", 0.5),
]
LARGE_SHAPE = ((2048,), 512, 512, 8, "prob", 1.0)  # many tokens per table row: duplicate-row gradients


class Budget:
    """Wall-clock budget: a new case starts only if the slowest case so far would still fit."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start, self.slowest = seconds, time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self) -> bool:
        return self.seconds - self.elapsed() > 1.5 * self.slowest + 2.0

    def record(self, seconds: float) -> None:
        self.slowest = max(self.slowest, seconds)


# ---- section 1: correctness -------------------------------------------------------------------------------


def check(name: str, got: Tensor, ref: Tensor, rtol: float, atol: float, **extra) -> dict:
    """{name, max_abs_err, tol, ok} of `got` (any device/dtype) against the float64 reference `ref`."""
    got, ref = got.detach().cpu().double(), ref.detach().cpu().double()
    if got.shape != ref.shape:
        return {"name": name, "max_abs_err": float("inf"), "tol": 0.0, "ok": False,
                "error": f"shape {tuple(got.shape)} != {tuple(ref.shape)}", **extra}
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    tol = atol + rtol * (ref.abs().max().item() if ref.numel() else 0.0)
    ok = bool(torch.isfinite(got).all()) and err <= tol
    return {"name": name, "max_abs_err": err, "tol": tol, "ok": ok, **extra}


def failed(name: str, exc: BaseException) -> dict:
    return {"name": name, "max_abs_err": None, "tol": None, "ok": False,
            "error": f"{type(exc).__name__}: {exc}"[:400]}


def layer_checks(dev: torch.device, dtype_name: str, shape: tuple) -> list[dict]:
    """MemoryLayer on `dev` in `dtype_name` against float64 on the CPU: output, grads of x, table, bias,
    and the functional memory_layer's output."""
    lead, d_in, d_out, tau, weighting, temperature = shape
    dtype, (rtol, atol) = DTYPES[dtype_name], TOLS[dtype_name]
    kw = dict(tau=tau, weighting=weighting, temperature=temperature)
    layer = MemoryLayer(d_in, d_out, **kw, device=dev, dtype=dtype)
    with torch.no_grad():
        layer.table.copy_(torch.randn(layer.table.shape) * 0.5)
        layer.bias.copy_(torch.randn(d_out) * 0.1)
    x = torch.randn(*lead, d_in).to(dev, dtype).requires_grad_()
    g = torch.randn(*lead, d_out).to(dev, dtype)
    out = layer(x)
    out.backward(g)
    with torch.no_grad():
        functional = memory_layer(x, layer.table, layer.bias, **kw)

    ref = MemoryLayer(d_in, d_out, **kw, dtype=torch.float64)  # same rounded values: the same hash
    with torch.no_grad():
        ref.table.copy_(layer.table.cpu().double())
        ref.bias.copy_(layer.bias.cpu().double())
    x_ref = x.detach().cpu().double().requires_grad_()
    out_ref = ref(x_ref)
    out_ref.backward(g.cpu().double())

    n = int(torch.Size(lead).numel())
    tag = f"layer {dtype_name} N={n} {d_in}->{d_out} tau={tau} {weighting}" + (
        f" t={temperature:g}" if temperature != 1.0 else "")
    return [check(f"{tag}: out", out, out_ref, rtol, atol),
            check(f"{tag}: memory_layer out", functional, out_ref, rtol, atol),
            check(f"{tag}: grad x", x.grad, x_ref.grad, 2 * rtol, atol),
            check(f"{tag}: grad table", layer.table.grad, ref.table.grad, rtol, atol),
            check(f"{tag}: grad bias", layer.bias.grad, ref.bias.grad, rtol, atol)]


def hash_signs(model: nn.Module, run: Callable[[], object]) -> list[Tensor]:
    """Sign bits (x >= 0) of every Memory Layer input seen while `run()` runs, in call order."""
    signs: list[Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: signs.append((args[0] >= 0).cpu()))
             for m in model.modules() if isinstance(m, MemoryLayer)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return signs


def model_checks(dev: torch.device, preset: str, seq: int) -> list[dict]:
    """One preset in float32 on `dev` against the same weights in float64 on the CPU."""
    rtol, atol = TOLS["fp32"]
    torch.manual_seed(0)
    cpu32 = LanguageModel(ModelConfig.from_preset(preset)).eval()
    model, ref = copy.deepcopy(cpu32).to(dev), copy.deepcopy(cpu32).double()
    vocab, batch, half = model.config.vocab_size, 2, seq // 2
    idx = torch.randint(0, vocab, (batch, seq))
    idx_dev = idx.to(dev)
    rows = []

    with torch.no_grad():
        outs = {}
        signs = hash_signs(model, lambda: outs.update(dev=model(idx_dev)[0]))
        signs_ref = hash_signs(ref, lambda: outs.update(ref=ref(idx)[0]))
        flips = sum(int((a != b).sum()) for a, b in zip(signs, signs_ref))
        rows.append(check(f"model {preset} fp32: logits vs cpu float64", outs["dev"], outs["ref"], rtol, atol,
                          hash_flips=flips))

        cache = model.new_cache(batch, seq)
        steps = [model(idx_dev[:, :half], cache=cache)[0]]
        steps += [model(idx_dev[:, t:t + 1], cache=cache)[0] for t in range(half, seq)]
        rows.append(check(f"model {preset} fp32: KV-cache decode vs full forward", torch.cat(steps, 1),
                          outs["dev"], rtol, atol))

    new = 8
    prompt = idx[:, :half]
    tokens = model.generate(prompt.to(dev), new, temperature=0.0).cpu()
    tokens_ref = ref.generate(prompt, new, temperature=0.0)
    mismatched = int((tokens != tokens_ref).sum()) if tokens.shape == tokens_ref.shape else tokens_ref.numel()
    rows.append({"name": f"model {preset} fp32: generate(temperature=0) {new} tokens vs cpu float64",
                 "max_abs_err": float(mismatched), "tol": 0.0, "ok": mismatched == 0})

    model.train()
    ref.train()
    _, loss = model(idx_dev, idx_dev)
    loss.backward()
    _, loss_ref = ref(idx, idx)
    loss_ref.backward()
    rows.append(check(f"model {preset} fp32: train loss vs cpu float64", loss, loss_ref, 1e-5, 1e-6))
    grads = [check(name, p.grad, p_ref.grad, rtol, atol) if p.grad is not None and p_ref.grad is not None
             else {"name": name, "max_abs_err": float("inf"), "tol": 0.0, "ok": False}
             for (name, p), p_ref in zip(model.named_parameters(), ref.parameters())]
    worst = max(grads, key=lambda r: r["max_abs_err"] / max(r["tol"], 1e-30))
    rows.append({**worst, "name": f"model {preset} fp32: train grads vs cpu float64 (worst: {worst['name']})",
                 "ok": all(r["ok"] for r in grads)})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    _, loss_after = model(idx_dev, idx_dev)
    bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters()) + int(not torch.isfinite(loss_after))
    rows.append({"name": f"model {preset} fp32: AdamW step, parameters and next loss finite",
                 "max_abs_err": float(bad), "tol": 0.0, "ok": bad == 0})
    return rows


def compile_checks(dev: torch.device, backend: str) -> list[dict]:
    """torch.compile(MemoryLayer) against the eager layer on the device: output and x gradient, two N."""
    rtol, atol = TOLS["fp32"]
    torch._dynamo.reset()
    layer = MemoryLayer(128, 96, tau=8, device=dev)
    compiled = torch.compile(layer, backend=backend)
    rows = []
    for n in (8, 65):
        name = f"torch.compile({backend}) MemoryLayer fp32 N={n}"
        try:
            x = torch.randn(n, 128, device=dev, requires_grad=True)
            t0 = time.perf_counter()
            out_c = compiled(x)
            out_c.sum().backward()
            seconds = time.perf_counter() - t0
            grad_c, x.grad = x.grad, None
            out_e = layer(x)
            out_e.sum().backward()
            rows.append(check(f"{name}: out", out_c, out_e, rtol, atol, seconds=seconds))
            rows.append(check(f"{name}: grad x", grad_c, x.grad, rtol, atol))
        except Exception as exc:  # report, do not abort: compile support is what we want to learn
            rows.append(failed(name, exc))
            traceback.print_exc()
    return rows


def correctness(args, dev: torch.device, out: Callable[[dict], None]) -> None:
    """Run every correctness check, passing each row to `out` as it comes."""
    shapes = LAYER_SHAPES + ([] if args.tiny else [LARGE_SHAPE])
    for dtype_name, shape in itertools.product(DTYPES, shapes):
        torch.manual_seed(len(shape[0]) * 1000 + shape[1])
        try:
            rows = layer_checks(dev, dtype_name, shape)
        except Exception as exc:
            rows = [failed(f"layer {dtype_name} {shape}", exc)]
            traceback.print_exc()
        for row in rows:
            out(row)
    for preset in ("mf-test", "pythia-test"):
        try:
            rows = model_checks(dev, preset, seq=16)
        except Exception as exc:
            rows = [failed(f"model {preset}", exc)]
            traceback.print_exc()
        for row in rows:
            out(row)
    if args.compile_backend != "none":
        for row in compile_checks(dev, args.compile_backend):
            out(row)


# ---- section 2: timing --------------------------------------------------------------------------------------


def param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def peak_extra_bytes(fn: Callable[[], object], dev: torch.device) -> int | None:
    """Bytes torch.cuda.max_memory_allocated rose above what was allocated before one call of fn."""
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - base


def timed(fns: dict[str, Callable[[], object]], args, sync: Callable[[], None], min_time: float) -> dict[str, float]:
    for fn in fns.values():  # warm-up beyond time_interleaved's one call: allocator, cuBLAS, autotuning
        for _ in range(args.warmup):
            fn()
    sync()
    return time_interleaved(fns, rounds=args.rounds, min_time=min_time, sync=sync)


def guarded(name: str, budget: Budget, skipped: list[str], case: Callable[..., dict], *args) -> dict | None:
    """`case(*args)` if the budget allows, else None; a failure (e.g. out of memory) is recorded, not raised."""
    if not budget.allows():
        skipped.append(name)
        return None
    t0 = time.perf_counter()
    try:
        return case(*args)
    except Exception as exc:
        traceback.print_exc()
        skipped.append(f"{name} (failed: {type(exc).__name__}: {str(exc)[:200]})")
        return None
    finally:
        budget.record(time.perf_counter() - t0)


def layer_timing(args, dev: torch.device, sync, budget: Budget, out: Callable[[dict], None],
                 skipped: list[str]) -> None:
    """benchmarks/layer.py's cases, built on the device."""
    layer_bench.COLD_BYTES = args.cold_mib * 2**20

    def case(d: int, n: int, dtype_name: str, backward: bool) -> dict:
        dtype, cold = DTYPES[dtype_name], n == 1
        with torch.device(dev):  # make_case's layers and inputs are created on the device
            mem, mem_copies = layer_bench.make_case("memory", d, n, dtype, backward, cold)
            lin, lin_copies = layer_bench.make_case("linear", d, n, dtype, backward, cold)
        t = timed({"memory": mem, "linear": lin}, args, sync, args.min_time)
        return {"d": d, "n": n, "mode": "fwd+bwd" if backward else "fwd", "dtype": dtype_name, "cold": cold,
                "linear_ms": t["linear"] * 1e3, "memory_ms": t["memory"] * 1e3, "ratio": t["memory"] / t["linear"],
                "copies": {"memory": mem_copies, "linear": lin_copies}}

    print(f"{'d':>5} {'N':>5} {'mode':>8} {'dtype':>5} {'Linear ms':>10} {'Memory ms':>10} {'ratio':>6}")
    for d, n, dtype_name, backward in itertools.product(args.d, args.n, args.dtypes, (False, True)):
        name = f"layer d={d} N={n} {'fwd+bwd' if backward else 'fwd'} {dtype_name}"
        row = guarded(name, budget, skipped, case, d, n, dtype_name, backward)
        if row is not None:
            print(f"{d:>5} {n:>5} {row['mode']:>8} {dtype_name:>5} {row['linear_ms']:>10.4f} "
                  f"{row['memory_ms']:>10.4f} {row['ratio']:>6.2f}", flush=True)
            out(row)


def model_timing(args, dev: torch.device, sync, budget: Budget, out: Callable[[dict], None],
                 skipped: list[str]) -> None:
    """benchmarks/model.py's build / decode_fn / prefill_fn / train_fn on the device, MF against dense."""
    mf_name, dense_name = args.pair
    ctx, prefill, (train_b, train_t) = args.context, args.prefill, args.train
    makers: list[tuple[str, int, bool, Callable]] = []  # (case, tokens per call, head, model -> fn)
    for batch, head in itertools.product((1, 8), (True, False)):
        makers.append((f"decode b={batch} ctx={ctx}", batch, head,
                       lambda m, b=batch, h=head: model_bench.decode_fn(m, b, ctx, h)))
    for head in (True, False):
        makers.append((f"prefill {prefill}", prefill, head, lambda m, h=head: model_bench.prefill_fn(m, prefill, h)))
    makers.append((f"train step {train_b}x{train_t}", train_b * train_t, True,
                   lambda m: model_bench.train_fn(m, train_b, train_t)))

    def build(dtype_name: str) -> dict[str, LanguageModel]:
        with torch.device(dev):  # parameters created on the device (2 MiB pages are a CPU matter)
            return {arch: model_bench.build(preset, DTYPES[dtype_name], huge_pages=False)
                    for arch, preset in (("memoryformer", mf_name), ("dense", dense_name))}

    def case(models: dict[str, LanguageModel], dtype_name: str, name: str, tokens: int, head: bool,
             make: Callable) -> dict:
        with torch.device(dev):  # the case's inputs (and KV cache) on the device
            fns = {k: make(m) for k, m in models.items()}
        peak = {k: peak_extra_bytes(fn, dev) for k, fn in fns.items()}  # first call: optimizer state too
        t = timed(fns, args, sync, 0.0 if name.startswith("train") else args.min_time)
        mb = {k: None if peak[k] is None else (param_bytes(models[k]) + peak[k]) / 2**20 for k in fns}
        return {"case": name, "dtype": dtype_name, "head": head, "mf_ms": t["memoryformer"] * 1e3,
                "dense_ms": t["dense"] * 1e3, "ratio": t["memoryformer"] / t["dense"],
                "mf_tok_s": tokens / t["memoryformer"], "dense_tok_s": tokens / t["dense"],
                "mf_peak_mb": mb["memoryformer"], "dense_peak_mb": mb["dense"],
                "mem_ratio": None if mb["dense"] is None else mb["memoryformer"] / mb["dense"]}

    print(f"{'case':<28} {'dtype':>5} {'head':>5} {'MF ms':>9} {'dense ms':>9} {'ratio':>6} {'MF MB':>8} {'dense MB':>8}")
    for dtype_name in args.model_dtypes:
        models = guarded(f"model build {dtype_name}", budget, skipped, build, dtype_name)
        if models is None:
            skipped += [f"model {name} {dtype_name} head={head}" for name, _, head, _ in makers]
            continue
        for name, tokens, head, make in makers:
            row = guarded(f"model {name} {dtype_name} head={head}", budget, skipped,
                          case, models, dtype_name, name, tokens, head, make)
            if row is not None:
                print(f"{name:<28} {dtype_name:>5} {str(head):>5} {row['mf_ms']:>9.3f} {row['dense_ms']:>9.3f} "
                      f"{row['ratio']:>6.2f} {_mb(row['mf_peak_mb']):>8} {_mb(row['dense_peak_mb']):>8}", flush=True)
                out(row)
        del models
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


# ---- output ------------------------------------------------------------------------------------------------


def device_info(dev: torch.device) -> dict:
    info = {"device": str(dev), "torch": torch.__version__, "kernels_backend": kernels.get_backend(),
            "memory_layer_path": "pure (F.embedding_bag)" if dev.type != "cpu" else "kernels where built, else pure",
            "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(name=torch.cuda.get_device_name(dev), cuda=torch.version.cuda, capability=f"{p.major}.{p.minor}",
                    multiprocessors=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    else:
        info["name"] = "cpu"
    return info


def md_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(common._fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


CHECK_COLUMNS = [("name", "check"), ("max_abs_err", "max abs err"), ("tol", "tol"), ("ok", "ok")]
LAYER_COLUMNS = [("d", "d"), ("n", "N"), ("mode", "mode"), ("dtype", "dtype"), ("linear_ms", "Linear ms"),
                 ("memory_ms", "MemoryLayer ms"), ("ratio", "ratio ML / Linear")]
MODEL_COLUMNS = [("case", "case"), ("dtype", "dtype"), ("head", "head incl."), ("mf_ms", "MF ms"),
                 ("dense_ms", "dense ms"), ("ratio", "ratio MF / dense"), ("mf_tok_s", "MF tok/s"),
                 ("dense_tok_s", "dense tok/s"), ("mf_peak_mb", "MF peak MB"), ("dense_peak_mb", "dense peak MB"),
                 ("mem_ratio", "memory ratio")]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---- main --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    parser.add_argument("--quick", action="store_true", help="fewer timing cases and rounds")
    parser.add_argument("--tiny", action="store_true", help="test-sized everything (mf-test vs pythia-test timing)")
    parser.add_argument("--out", type=Path, default=common.RESULTS, help="results folder (on the device: $OUT)")
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds; no new timing case after it")
    parser.add_argument("--skip-timing", action="store_true", help="correctness only")
    parser.add_argument("--backend", choices=kernels.BACKENDS, default=None,
                        help="memoryformer.kernels backend (CPU only; default: MEMORYFORMER_KERNELS or auto)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend for the compile check (aot_eager: fast; none: skip)")
    args = parser.parse_args(argv)
    args.rounds, args.warmup, args.min_time = (3, 2, 0.02) if args.quick else (5, 3, 0.05)
    args.d, args.n, args.dtypes = [512, 1024], [1, 8, 64, 2048, 8192], ["fp32", "bf16"]
    args.pair, args.context, args.prefill, args.train = ("mf-tiny", "pythia-70m"), 128, 512, (4, 512)
    args.model_dtypes, args.cold_mib = ["fp32", "bf16"], 256  # > 4x the H200's 60 MB L2
    if args.quick:
        args.d, args.n, args.model_dtypes = [1024], [1, 64, 8192], ["fp32"]
    if args.tiny:
        args.rounds, args.warmup, args.min_time = 1, 1, 0.002
        args.d, args.n, args.dtypes, args.cold_mib = [64], [1, 8], ["fp32"], 1
        args.pair, args.context, args.prefill, args.train = ("mf-test", "pythia-test"), 8, 16, (2, 16)
        args.model_dtypes = ["fp32"]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False (use --device cpu for a smoke test)")
    with kernels.backend(args.backend) if args.backend else nullcontext():
        return run(args, dev)


def run(args: argparse.Namespace, dev: torch.device) -> dict:
    """Section 1, then section 2 within the time budget; results rewritten after every case."""
    budget = Budget(args.time_budget)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    info = device_info(dev)
    name = f"cuda_{slug(info['name'])}"
    checks: list[dict] = []
    layer_rows: list[dict] = []
    model_rows: list[dict] = []
    skipped: list[str] = []
    common.RESULTS = Path(args.out)  # write_results writes into common.RESULTS

    def save(done: bool = False) -> None:
        ok = all(r["ok"] for r in checks)
        notes = [f"Correctness: {sum(r['ok'] for r in checks)} / {len(checks)} checks ok. "
                 "tol = atol + rtol * max|float64 CPU reference|; rounded inputs are shared, so hashes agree.",
                 f"Device: {info}."]
        if layer_rows:
            notes += ["## MemoryLayer(d, d) vs nn.Linear(d, d)", md_table(layer_rows, LAYER_COLUMNS),
                      f"Medians over interleaved rounds, synchronised; tau = 8. N = 1 rows rotate over >= "
                      f"{args.cold_mib} MiB of weights. Ratio < 1: MemoryLayer faster."]
        if model_rows:
            notes += [f"## {args.pair[0]} vs {args.pair[1]}", md_table(model_rows, MODEL_COLUMNS),
                      "Peak MB = parameters and buffers + the rise of torch.cuda.max_memory_allocated during "
                      "the case's first call (a training step's first call creates AdamW's state)."]
        if skipped:
            notes.append(f"Skipped (time budget {args.time_budget:g} s): " + "; ".join(skipped))
        notes.append("Complete." if done else f"PARTIAL: written after {budget.elapsed():.0f} s, still running.")
        write_results(name, checks, CHECK_COLUMNS, title=f"CUDA check: {info['name']}", notes=notes,
                      extra={"device": info, "correctness_ok": ok, "layer": layer_rows, "model": model_rows,
                             "skipped": skipped, "time_budget_s": args.time_budget,
                             "elapsed_s": round(budget.elapsed(), 1), "complete": done})

    def add_check(row: dict) -> None:
        checks.append(row)
        err, tol = row["max_abs_err"], row["tol"]
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['name']:<78} "
              + (f"err {err:.2e} tol {tol:.2e}" if err is not None else row.get("error", "")), flush=True)

    def add(rows: list[dict]) -> Callable[[dict], None]:
        def append(row: dict) -> None:
            rows.append(row)
            save()
        return append

    print(f"device: {info}", flush=True)
    correctness(args, dev, add_check)
    save()
    print(f"correctness: {sum(r['ok'] for r in checks)} / {len(checks)} ok ({budget.elapsed():.0f} s)", flush=True)
    if not args.skip_timing:
        layer_timing(args, dev, sync, budget, add(layer_rows), skipped)
        model_timing(args, dev, sync, budget, add(model_rows), skipped)
    save(done=True)
    print(f"wrote {common.RESULTS / name}.json/.md ({budget.elapsed():.0f} s)", flush=True)
    return {"name": name, "checks": checks, "layer": layer_rows, "model": model_rows, "skipped": skipped}


if __name__ == "__main__":
    main()
