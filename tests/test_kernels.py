"""The C++ Memory Layer kernels (memoryformer.kernels) against the pure-PyTorch path in float64.

The kernels are built once per session (module fixture; cached across sessions in
~/.cache/memoryformer). Every op is checked for values and gradients, with torch.library.opcheck,
under the disabled backend, and with a build that fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from memoryformer import MemoryLayer, kernels
from memoryformer.core.layer import memory_hash, memory_layer
from memoryformer.kernels import _loader

ops = torch.ops.memoryformer if hasattr(torch.ops, "memoryformer") else None


@contextlib.contextmanager
def option(name: str, value: int):
    """Temporarily set a kernel tuning option (algorithm choice, block sizes)."""
    old = torch.ops.memoryformer._set_option(name, value)
    try:
        yield
    finally:
        torch.ops.memoryformer._set_option(name, old)


def reference(x, tables, biases, tau, weighting, temperature, grads=None):
    """Pure-PyTorch layer path in float64: outputs and (with grads) input gradients."""
    with kernels.backend("torch"):
        x64 = x.detach().double().requires_grad_()
        ts = [t.detach().double().requires_grad_() for t in tables]
        bs = [None if b is None else b.detach().double().requires_grad_() for b in biases]
        hashed = memory_hash(x64, tau, weighting, temperature)
        outs = [memory_layer(x64, t, b, tau=tau, weighting=weighting, temperature=temperature, hashed=hashed)
                for t, b in zip(ts, bs)]
        if grads is not None:
            torch.autograd.backward(outs, [g.double() for g in grads])
    return outs, x64, ts, bs


def close(actual, expected, rtol=2e-5, atol=2e-5):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


CASES = [  # (N, K, tau, out_features): odd and even K, tau 4 / 8 / 10, odd widths and tails
    (0, 3, 8, 24), (1, 4, 8, 40), (3, 3, 4, 33), (63, 5, 10, 48), (65, 2, 8, 17),
]
ALGOS = {"token": 1, "bucket": 2, "small": 3}


@pytest.mark.parametrize("n,k,tau,out", CASES)
@pytest.mark.parametrize("weighting,temperature", [("prob", 0.7), ("l1", 1.0)])
@pytest.mark.parametrize("algo", list(ALGOS))
def test_memory_layers_values_and_grads(built, n, k, tau, out, weighting, temperature, algo):
    torch.manual_seed(n + 7 * k + tau)
    x = torch.randn(n, k * tau)
    tables = [torch.randn(k << tau, out), torch.randn(k << tau, out + 3)]
    biases = [torch.randn(out), None]
    grads = [torch.randn(n, out), torch.randn(n, out + 3)]
    ref, x64, ts, bs = reference(x, tables, biases, tau, weighting, temperature, grads)

    xk = x.clone().requires_grad_()
    tk = [t.clone().requires_grad_() for t in tables]
    bk = [biases[0].clone().requires_grad_(), None]
    with option("fwd_algo", ALGOS[algo]):
        outs = kernels.memory_layers(xk, tk, bk, tau=tau, weighting=weighting, temperature=temperature)
    torch.autograd.backward(outs, grads)
    for o, r in zip(outs, ref):
        assert o.dtype == torch.float32 and o.shape == r.shape
        close(o, r)
    close(xk.grad, x64.grad, rtol=1e-4, atol=1e-4)
    for t, t64 in zip(tk, ts):
        close(t.grad, t64.grad)
    close(bk[0].grad, bs[0].grad)


@pytest.mark.parametrize("n", [1, 5, 40])
def test_layer_dispatches_to_kernels_and_matches_pure_path(built, n, monkeypatch):
    torch.manual_seed(n)
    layer = MemoryLayer(32, 20, tau=8, weighting="l1")
    x = torch.randn(2, n, 32, requires_grad=True)
    used = []
    real = kernels.try_memory_layer

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        used.append(out is not None)
        return out

    monkeypatch.setattr(kernels, "try_memory_layer", spy)
    y = layer(x)  # default backend ("auto")
    assert used == [True]
    y.sum().backward()
    gx, gt = x.grad.clone(), layer.table.grad.clone()
    x.grad = None
    layer.table.grad = None
    with kernels.backend("torch"):
        y_ref = layer(x)
    assert used == [True, False]
    y_ref.sum().backward()
    close(y, y_ref, rtol=1e-5, atol=1e-6)
    close(gx, x.grad, rtol=1e-4, atol=1e-5)
    close(gt, layer.table.grad, rtol=1e-5, atol=1e-6)


def test_shared_hash_equals_fused_exactly(built):
    layer = MemoryLayer(24, 12, tau=4)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 24).to(dtype)
        with kernels.backend("kernels"):
            hashed = layer.hash(x)
            assert torch.equal(layer(x, hashed), layer(x))


@pytest.mark.parametrize("tau,k", [(1, 5), (16, 1)])
def test_extreme_tau(built, tau, k):
    torch.manual_seed(tau)
    x = torch.randn(7, k * tau)
    table, g = torch.randn(k << tau, 9), torch.randn(7, 9)
    ref, x64, ts, _ = reference(x, [table], [None], tau, "prob", 1.0, [g])
    for algo in ALGOS.values():
        xk, tk = x.clone().requires_grad_(), table.clone().requires_grad_()
        with option("fwd_algo", algo):
            out = kernels.memory_layer(xk, tk, tau=tau)
        out.backward(g)
        close(out, ref[0])
        close(xk.grad, x64.grad, rtol=1e-4, atol=1e-4)
        close(tk.grad, ts[0].grad)


def test_hash_matches_reference_including_signed_zero_and_nan(built):
    x = torch.randn(6, 40)
    x[0, :8] = 0.0
    x[1, :8] = -0.0
    x[2, 3] = float("nan")
    for weighting, temperature in (("prob", 1.0), ("prob", 0.3), ("l1", 1.0)):
        with kernels.backend("torch"):
            rows_ref, w_ref = memory_hash(x.double(), 8, weighting, temperature)
        rows, w = kernels.memory_hash(x, 8, weighting, temperature)
        assert rows.dtype == torch.int64 and torch.equal(rows, rows_ref)
        assert torch.isnan(w[2, 0]) and torch.isnan(w_ref[2, 0])
        close(w.nan_to_num(), w_ref.nan_to_num(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tau,weighting", [(10, "prob"), (8, "prob"), (8, "l1"), (4, "l1")])
def test_hash_gradient(built, tau, weighting):
    """tau = 8 takes the vector chunk path (memory_common.h: hash_chunks8_backward), others the loop;
    zeros and a NaN included."""
    torch.manual_seed(1)
    x = torch.randn(7, 3 * tau)
    x[0, :tau] = 0.0
    x[1, 2] = float("nan")
    g = torch.randn(7, 3)
    with kernels.backend("torch"):
        x64 = x.double().requires_grad_()
        memory_hash(x64, tau, weighting, 0.5)[1].backward(g.double())
    xk = x.clone().requires_grad_()
    kernels.memory_hash(xk, tau, weighting, 0.5)[1].backward(g)
    assert torch.equal(xk.grad.isnan(), x64.grad.isnan())
    close(xk.grad.nan_to_num(), x64.grad.nan_to_num(), rtol=1e-5, atol=1e-6)


def test_bf16_hash_at_tau_8_matches_float_inputs(built):
    """The vector chunk path reads bf16 inputs as the loop does: the same rows, weights within bf16."""
    torch.manual_seed(2)
    x = torch.randn(33, 48).bfloat16()
    rows, w = kernels.memory_hash(x, 8, "prob", 1.0)
    rows_f, w_f = kernels.memory_hash(x.float(), 8, "prob", 1.0)
    assert w.dtype == torch.bfloat16 and torch.equal(rows, rows_f)
    close(w, w_f, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("rows_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("n", [0, 3, 65])
def test_gather_sum_values_and_grads(built, rows_dtype, n):
    torch.manual_seed(n)
    table = torch.randn(50, 19, requires_grad=True)
    bias = torch.randn(19, requires_grad=True)
    rows = torch.randint(0, 50, (n, 6))
    weights = torch.randn(n, 6, requires_grad=True)
    g = torch.randn(n, 19)
    out = kernels.gather_sum(rows.to(rows_dtype), weights, table, bias)
    out.backward(g)
    t64, w64, b64 = (t.detach().double().requires_grad_() for t in (table, weights, bias))
    ref = (w64[..., None] * t64[rows]).sum(1) + b64
    ref.backward(g.double())
    close(out, ref)
    close(table.grad, t64.grad)
    close(weights.grad, w64.grad)
    close(bias.grad, b64.grad)


def test_gather_sum_rejects_out_of_range_rows(built):
    with pytest.raises(RuntimeError, match=r"rows must lie in \[0, 10\)"):
        kernels.gather_sum(torch.tensor([[0, 10]]), torch.ones(1, 2), torch.randn(10, 4))


def test_bf16_tables_and_inputs(built):
    torch.manual_seed(3)
    x = torch.randn(33, 64).to(torch.bfloat16)
    table = (torch.randn(8 << 8, 48) * 0.1).to(torch.bfloat16)
    g = torch.randn(33, 48).to(torch.bfloat16)
    ref, x64, ts, _ = reference(x, [table], [None], 8, "prob", 1.0, [g])
    xk, tk = x.clone().requires_grad_(), table.clone().requires_grad_()
    out = kernels.memory_layer(xk, tk, tau=8)
    out.backward(g)
    assert out.dtype == torch.bfloat16 and tk.grad.dtype == torch.bfloat16 and xk.grad.dtype == torch.bfloat16
    close(out, ref[0], rtol=2e-2, atol=2e-2)
    close(tk.grad, ts[0].grad, rtol=2e-2, atol=2e-2)
    close(xk.grad, x64.grad, rtol=5e-2, atol=5e-2)


def test_int8_tables(built):
    torch.manual_seed(4)
    table = torch.randn(4 << 8, 40)
    q, scales = kernels.quantize_tables(table)
    assert q.dtype == torch.int8 and scales.shape == (4 << 8,)
    err = (q.float() * scales[:, None] - table).abs()
    assert (err <= scales[:, None] / 2 + 1e-7).all()
    x, bias = torch.randn(9, 32), torch.randn(40)
    deq = q.double() * scales.double()[:, None]
    ref = reference(x, [deq], [bias], 8, "l1", 1.0)[0][0]
    for algo in ALGOS.values():
        with option("fwd_algo", algo):
            out = kernels.memory_layer_int8(x, q, scales, bias, tau=8, weighting="l1")
        assert out.dtype == torch.float32
        close(out, ref, rtol=1e-5, atol=1e-5)
    with kernels.backend("torch"):  # pure fallback: dequantise
        close(kernels.memory_layer_int8(x, q, scales, bias, tau=8, weighting="l1"), ref, rtol=1e-5, atol=1e-5)


def test_results_do_not_depend_on_thread_count(built):
    x, table = torch.randn(300, 64), torch.randn(8 << 8, 72)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.memory_layer(x, table, tau=8)
        g1 = ops_backward(x, table)
        torch.set_num_threads(2)
        two = kernels.memory_layer(x, table, tau=8)
        g2 = ops_backward(x, table)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def ops_backward(x, table):
    g = torch.ones(x.shape[0], table.shape[1])
    gx, gts, _ = torch.ops.memoryformer.memory_layer_backward([g], x, [table], 8, "prob", 1.0, True, True)
    return gx, gts[0]


@pytest.mark.parametrize("n,k,tau,out", [(0, 3, 8, 24), (3, 3, 4, 33), (300, 8, 8, 72), (2048, 4, 8, 40)])
@pytest.mark.parametrize("threads", [1, 2])
def test_backward_sums_table_gradient_squares(built, n, k, tau, out, threads):
    """memory_layer_backward's third output: each fp32 table gradient's squared 2-norm, as written
    (vector columns and the scalar tail), at one and two threads; -1 for a bf16 table; none without
    table gradients."""
    torch.manual_seed(n + k)
    x = torch.randn(n, k * tau)
    tables = [torch.randn(k << tau, out), torch.randn(k << tau, out + 5)]
    grads = [torch.randn(n, out), torch.randn(n, out + 5)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        _, gtables, sq = ops.memory_layer_backward(grads, x, tables, tau, "prob", 1.0, True, True)
    finally:
        torch.set_num_threads(old)
    assert sq.dtype == torch.float64 and sq.shape == (2,)
    for g, s in zip(gtables, sq):
        expected = g.double().pow(2).sum()
        torch.testing.assert_close(s, expected, rtol=1e-6, atol=1e-12)
    _, _, sq_bf16 = ops.memory_layer_backward(grads, x, [t.bfloat16() for t in tables], tau, "prob", 1.0, True, True)
    assert sq_bf16.tolist() == ([-1.0, -1.0] if n else [0.0, 0.0])
    _, _, none = ops.memory_layer_backward(grads, x, tables, tau, "prob", 1.0, True, False)
    assert none.numel() == 0
    with option("grad_sqnorm", 0):  # switched off (for A/B timing): no sums, -1 as for bf16
        _, gtables_off, off = ops.memory_layer_backward(grads, x, tables, tau, "prob", 1.0, True, True)
    assert off.tolist() == ([-1.0, -1.0] if n else [0.0, 0.0])
    assert all(torch.equal(a, b) for a, b in zip(gtables, gtables_off))


def test_opcheck_all_ops(built):
    torch.manual_seed(5)
    x = torch.randn(5, 16, requires_grad=True)
    t1 = torch.randn(2 << 8, 12, requires_grad=True)
    t2 = torch.randn(2 << 8, 7, requires_grad=True)
    b1 = torch.randn(12, requires_grad=True)
    rows = torch.randint(0, 2 << 8, (5, 2))
    w = torch.randn(5, 2, requires_grad=True)
    q, s = kernels.quantize_tables(t1.detach())
    g = [torch.randn(5, 12), torch.randn(5, 7)]
    cases = [
        (built.memory_layer, (x, [t1, t2], [b1, torch.empty(0)], 8, "prob", 0.5)),
        (built.memory_layer, (x.detach(), [t1.detach()], [torch.empty(0)], 8, "l1", 1.0)),
        (built.memory_layer_backward, (g, x.detach(), [t1.detach(), t2.detach()], 8, "l1", 1.0, True, False)),
        (built.memory_layer_backward, (g[:1], x.detach(), [t1.detach()], 8, "prob", 1.0, False, True)),
        (built.gather_sum, (rows, w, t1, b1)),
        (built.gather_sum_backward, (g[0], rows, w.detach(), t1.detach(), True, True)),
        (built.hash, (x, 8, "prob", 2.0)),
        (built.hash_backward, (torch.randn(5, 2), x.detach(), 8, "l1", 1.0)),
        (built.memory_layer_q8, (x.detach(), q, s, None, 8, "prob", 1.0)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_meta_tensors_and_flop_counter(built):
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.empty(4, 3, 16, device="meta")
    out = kernels.memory_layers(x, [torch.empty(2 << 8, 9, device="meta")], tau=8)[0]
    assert out.shape == (4, 3, 9) and out.device.type == "meta"
    with FlopCounterMode(display=False) as counter:
        kernels.memory_layer(torch.randn(6, 16), torch.randn(2 << 8, 9), tau=8)
    assert counter.get_total_flops() == 2 * 6 * 2 * 9


def test_torch_compile_traces_the_op(built):
    layer = MemoryLayer(16, 8, tau=8)
    x = torch.randn(3, 16)
    with kernels.backend("kernels"):
        compiled = torch.compile(layer, backend="eager")
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def test_backend_switch_and_env(built, monkeypatch):
    x, table = torch.randn(4, 16), torch.randn(2 << 8, 8)
    with kernels.backend("torch"):
        assert kernels.get_backend() == "torch"
        assert kernels.try_memory_layer(x, table, None, 8, "prob", 1.0) is None
        assert kernels.try_memory_hash(x, 8, "prob", 1.0) is None
    assert kernels.try_memory_layer(x.double(), table.double(), None, 8, "prob", 1.0) is None  # float64
    with kernels.backend("kernels"):
        assert kernels.try_memory_layer(x, table, None, 8, "prob", 1.0) is not None
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.set_backend("fast")
    # "auto" threshold table: small-N training with wide outputs stays on the pure path
    wide = torch.randn(2 << 8, 600, requires_grad=True)
    assert kernels.try_memory_layer(x, wide, None, 8, "prob", 1.0) is None
    with torch.no_grad():
        assert kernels.try_memory_layer(x, wide, None, 8, "prob", 1.0) is not None
    assert kernels.try_memory_layer(torch.randn(256, 16), wide, None, 8, "prob", 1.0) is not None
    with kernels.backend("kernels"):
        assert kernels.try_memory_layer(x, wide, None, 8, "prob", 1.0) is not None
    from memoryformer.kernels import _backend

    for value, expected in (("0", "torch"), ("off", "torch"), ("1", "auto"), ("", "auto"), ("force", "kernels")):
        monkeypatch.setenv("MEMORYFORMER_KERNELS", value)
        assert _backend._from_env() == expected
    monkeypatch.setenv("MEMORYFORMER_KERNELS", "maybe")
    with pytest.raises(ValueError, match="MEMORYFORMER_KERNELS='maybe'"):
        _backend._from_env()


def test_disabled_backend_gives_pure_path(built, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("kernel called while disabled")

    layer = MemoryLayer(16, 8, tau=8)
    x = torch.randn(3, 16)
    monkeypatch.setattr(kernels, "supported", boom)
    with kernels.backend("torch"):
        y = layer(x)
        assert kernels.memory_layers(x, [layer.table], [layer.bias], tau=8)[0].shape == y.shape


def test_failed_build_warns_once_and_falls_back(built, monkeypatch):
    def broken_build():
        raise RuntimeError("simulated: no compiler")

    saved = _loader._reset_for_tests()
    monkeypatch.delenv("MEMORYFORMER_REQUIRE_KERNELS", raising=False)  # the fallback, not the CI error
    monkeypatch.setattr(_loader, "_ops_registered", lambda: False)
    monkeypatch.setattr(_loader, "_build", broken_build)
    try:
        layer = MemoryLayer(16, 8, tau=8)
        x = torch.randn(3, 16)
        with pytest.warns(RuntimeWarning, match="simulated: no compiler"):
            y = layer(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not kernels.load() and torch.equal(layer(x), y)  # no second warning
        with kernels.backend("torch"):
            torch.testing.assert_close(layer(x), y)
    finally:
        _loader._reset_for_tests(saved)


def test_bad_compiler_in_fresh_process_falls_back(tmp_path):
    """A real failing build: CXX points at a command that fails; the layer still works."""
    script = textwrap.dedent("""
        import warnings, torch
        from memoryformer import MemoryLayer, kernels
        layer = MemoryLayer(16, 8, tau=8)
        x = torch.randn(2, 16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = layer(x)
        with kernels.backend("torch"):
            ok = torch.equal(y, layer(x))
        print(ok, kernels.loaded(), sum("could not build" in str(w.message) for w in caught))
    """)
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), MEMORYFORMER_KERNELS_CACHE=str(tmp_path / "b"))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "False", "1"], res.stdout + res.stderr


def test_bad_arguments_raise_clear_errors(built):
    x, table = torch.randn(2, 16), torch.randn(2 << 8, 8)
    with pytest.raises(RuntimeError, match="weighting must be 'prob' or 'l1'"):
        built.memory_layer(x, [table], [torch.empty(0)], 8, "cos", 1.0)
    with pytest.raises(RuntimeError, match="table must have shape"):
        built.memory_layer(x, [torch.randn(100, 8)], [torch.empty(0)], 8, "prob", 1.0)
    with pytest.raises(RuntimeError, match="float32/bfloat16"):
        built.memory_layer(x.double(), [table], [torch.empty(0)], 8, "prob", 1.0)
    with pytest.raises(RuntimeError, match="positive multiple of tau"):
        built.memory_layer(torch.randn(2, 15), [table], [torch.empty(0)], 8, "prob", 1.0)
    with pytest.raises(ValueError, match="2 tables but 1 biases"):
        kernels.memory_layers(x, [table, table], [None], tau=8)


def test_huge_page_option_keeps_results(built):
    """Opt-in huge-page backing (madvise) of a >= 8 MiB table changes nothing numerically."""
    x, table = torch.randn(5, 64), torch.randn(8 << 8, 1024)
    before = kernels.memory_layer(x, table, tau=8)
    with option("hugepages", 1):
        assert torch.equal(kernels.memory_layer(x, table, tau=8), before)


def _build_has_avx512f() -> bool:
    """Whether the kernels were built with AVX-512F: they are built with -march=native, so whether this
    CPU has it (/proc/cpuinfo; torch's own capability, which ATEN_CPU_CAPABILITY can lower, elsewhere)."""
    try:
        return " avx512f " in f" {open('/proc/cpuinfo').read()} ".replace("\n", " ")
    except OSError:
        return torch.backends.cpu.get_cpu_capability() == "AVX512"


def test_bucket_major_rule_defaults_and_results(built):
    """The auto rule's entry thresholds are the documented ones for this build (2 entries per row for
    fp32 tables and 1.5 for bf16 / int8 with AVX-512; 3 and 3 without). With the size limits lowered
    so that small tables qualify, fp32 and bf16 outputs are bitwise the same on every path, and int8
    ones, which round the row scale differently on the two paths (last bit), show the rule's choice:
    token-major below the threshold, bucket-major from it."""
    entries = ops._set_option("bucket_min_entries", -1)  # a negative value reads without setting
    half_lowp = ops._set_option("bucket_min_half_entries_lowp", -1)
    avx512 = _build_has_avx512f()
    assert (entries, half_lowp) == ((2, 3) if avx512 else (3, 6))
    torch.manual_seed(0)
    K, tau, d = 4, 8, 48
    R = K << tau
    table = torch.randn(R, d)
    q, scales = kernels.quantize_tables(table)
    chose_bucket = set()
    with option("bucket_min_table_bytes", 0), option("bucket_min_n", 0), option("small_n", 0):
        for n in (256, 384, 512, 768):  # 1, 1.5, 2 and 3 entries per table row
            x = torch.randn(n, K * tau)
            runs = {}
            for algo in (0, 1, 2):  # auto, token-major, bucket-major
                with option("fwd_algo", algo):
                    runs[algo] = (kernels.memory_layer(x, table, tau=8),
                                  kernels.memory_layer(x.bfloat16(), table.bfloat16(), tau=8),
                                  kernels.memory_layer_int8(x, q, scales, None, tau=8))
            for i in (0, 1):
                assert torch.equal(runs[1][i], runs[2][i]) and torch.equal(runs[0][i], runs[1][i])
            auto, token, bucket = runs[0][2], runs[1][2], runs[2][2]
            assert not torch.equal(token, bucket)  # else the int8 check below could not tell them apart
            close(token, bucket, rtol=1e-6, atol=1e-6)
            assert torch.equal(auto, bucket if 2 * n * K >= half_lowp * R else token)
            if torch.equal(auto, bucket):
                chose_bucket.add(n)
    assert chose_bucket == ({384, 512, 768} if avx512 else {768})
