"""MemoryLayer against a slow, obvious float64 reference: values, gradients, shapes, dtypes, errors.

float64 runs the pure-PyTorch reference (memoryformer.core.reference) on every backend. The float32
and bfloat16 tests run twice, pinned to each backend with `kernels.backend(...)` (the `layer_backend`
fixture): "torch" (the reference) and "kernels" (the C++ ops at every shape; needs the `built` fixture),
where the reference is patched to fail, so that these tests check the kernels and nothing else.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from memoryformer import MemoryLayer, gather_sum, kernels, memory_hash, memory_layer
from memoryformer.core import layer as layer_module

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _no_fallback(reference):
    def guarded(x, *args, **kwargs):
        if x.is_cpu and x.dtype in (torch.float32, torch.bfloat16):
            raise AssertionError(f"the pure-PyTorch reference ran for a {x.dtype} input under the kernels backend")
        return reference(x, *args, **kwargs)
    return guarded


@pytest.fixture(params=["torch", "kernels"])
def layer_backend(request, monkeypatch):
    """Pin the backend for the test; under "kernels" the reference raises if a float32 / bfloat16 CPU input
    (what the kernels handle) falls back to it. float64 expectations still run the reference."""
    if request.param == "kernels":
        request.getfixturevalue("built")
        for name in ("reference_memory_hash", "reference_memory_layer"):
            monkeypatch.setattr(layer_module, name, _no_fallback(getattr(layer_module, name)))
    with kernels.backend(request.param):
        yield request.param


def away_from_zero(x: torch.Tensor, margin: float = 0.05) -> torch.Tensor:
    """Inputs whose signs are stable under finite-difference steps."""
    return x + margin * torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def reference_forward(x, table, bias, tau, weighting="prob", temperature=1.0):
    """Token by token, chunk by chunk, bit by bit, in float64 (differentiable in x, table, bias)."""
    n_tokens, in_features = x.shape
    num_tables = in_features // tau
    outs = []
    for n in range(n_tokens):
        y = torch.zeros(table.shape[1], dtype=torch.float64)
        for k in range(num_tables):
            z = x[n, k * tau:(k + 1) * tau]
            bucket = 0
            for j in range(tau):
                bucket = bucket * 2 + (1 if z[j].item() >= 0 else 0)  # first element = MSB
            if weighting == "prob":
                w = torch.prod(1.0 / (1.0 + torch.exp(-2.0 * z.abs() / temperature)))
            else:
                w = z.abs().sum() * torch.prod(1.0 / (1.0 + torch.exp(-2.0 * z.abs())))
            y = y + w * table[k * 2**tau + bucket]
        outs.append(y if bias is None else y + bias)
    return torch.stack(outs)


def make_layer(in_features, out_features, tau, weighting="prob", temperature=1.0, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = MemoryLayer(in_features, out_features, tau=tau, weighting=weighting, temperature=temperature,
                        bias=bias, dtype=torch.float64)
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("tau", [1, 4, 8, 10])
@pytest.mark.parametrize("weighting,temperature", [("prob", 1.0), ("prob", 0.5), ("l1", 1.0)])
def test_forward_matches_reference(tau, weighting, temperature):
    layer = make_layer(3 * tau, 5, tau, weighting, temperature)
    x = torch.randn(9, 3 * tau, dtype=torch.float64)
    expected = reference_forward(x, layer.table, layer.bias, tau, weighting, temperature)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tau", [4, 8])
@pytest.mark.parametrize("weighting", ["prob", "l1"])
def test_gradients_match_reference(tau, weighting):
    layer = make_layer(2 * tau, 6, tau, weighting)
    x = away_from_zero(torch.randn(7, 2 * tau, dtype=torch.float64)).requires_grad_()
    grad_out = torch.randn(7, 6, dtype=torch.float64)
    (layer(x) * grad_out).sum().backward()
    got = (x.grad.clone(), layer.table.grad.clone(), layer.bias.grad.clone())

    x_ref = x.detach().clone().requires_grad_()
    table_ref = layer.table.detach().clone().requires_grad_()
    bias_ref = layer.bias.detach().clone().requires_grad_()
    (reference_forward(x_ref, table_ref, bias_ref, tau, weighting) * grad_out).sum().backward()
    for g, r in zip(got, (x_ref.grad, table_ref.grad, bias_ref.grad)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weighting,temperature", [("prob", 1.0), ("prob", 2.0), ("l1", 1.0)])
def test_gradcheck(weighting, temperature):
    layer = make_layer(8, 3, 4, weighting, temperature)
    x = away_from_zero(torch.randn(4, 8, dtype=torch.float64)).requires_grad_()

    def fn(x, table, bias):
        return memory_layer(x, table, bias, tau=4, weighting=weighting, temperature=temperature)

    # first derivatives only: embedding_bag has no double backward
    assert torch.autograd.gradcheck(fn, (x, layer.table, layer.bias), eps=1e-6, atol=1e-8)


def test_hash_bits_at_zero_and_negative_zero():
    # chunk of 4, MSB first: [0.0, -0.0, -1.0, 2.0] -> bits 1 1 0 1 -> 13; all negative -> 0
    x = torch.tensor([[0.0, -0.0, -1.0, 2.0, -3.0, -0.5, -1e-30, -7.0]])
    rows, weights = memory_hash(x, tau=4)
    assert rows.tolist() == [[13, 16 + 0]]
    assert rows.dtype == torch.int64 and weights.dtype == x.dtype
    # prob weight of an all-zero chunk is 2^-tau
    _, w0 = memory_hash(torch.zeros(1, 4), tau=4)
    assert w0.item() == pytest.approx(2.0**-4)


def test_hash_bit_order_matches_paper_figure_3():
    # Fig. 3: [-1.1, -2.7, 0.6] -> 001 -> 1; [3.4, -1.9, -2.3] -> 100 -> 4; [3.1, 0.6, 0.1] -> 111 -> 7
    x = torch.tensor([[-1.1, -2.7, 0.6, 3.4, -1.9, -2.3, 3.1, 0.6, 0.1]])
    rows, _ = memory_hash(x, tau=3)
    assert rows.tolist() == [[1, 8 + 4, 16 + 7]]


def test_weights_range_and_monotone():
    x = torch.linspace(-6, 6, 4 * 8).reshape(4, 8)
    _, w = memory_hash(x, tau=8, weighting="prob")
    assert torch.all(w > 2.0**-8) and torch.all(w < 1.0)
    _, w_hot = memory_hash(x, tau=8, temperature=0.1)
    assert torch.all(w_hot >= w)


def test_shared_hash_equals_separate_calls(layer_backend):
    torch.manual_seed(0)
    q, k, v = (MemoryLayer(32, 16, tau=8) for _ in range(3))
    x = torch.randn(2, 5, 32)
    hashed = q.hash(x)
    for layer in (q, k, v):
        torch.testing.assert_close(layer(x, hashed), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("n_tokens", [0, 1, 63, 65])
def test_token_counts(n_tokens):
    layer = make_layer(16, 4, 8)
    x = torch.randn(n_tokens, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == (n_tokens, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.table.grad.shape == layer.table.shape
    if n_tokens:
        torch.testing.assert_close(y, reference_forward(x.detach(), layer.table, layer.bias, 8))
    else:
        assert torch.all(layer.table.grad == 0)


def test_leading_dimensions():
    layer = make_layer(8, 3, 4)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, 3, 5, 3)
    torch.testing.assert_close(y.reshape(-1, 3), layer(x.reshape(-1, 8)))
    rows, weights = layer.hash(x)
    assert rows.shape == weights.shape == (2, 3, 5, 2)


def _low_precision_case(device: str, dtype: torch.dtype, tol: float) -> None:
    layer64 = make_layer(32, 16, 8)
    x = away_from_zero(torch.randn(10, 32, dtype=torch.float64), 0.1)
    expected = layer64(x)
    layer = MemoryLayer(32, 16, tau=8, device=device, dtype=dtype)
    layer.load_state_dict(layer64.state_dict())
    xl = x.to(device=device, dtype=dtype).requires_grad_()
    y = layer(xl)
    assert y.dtype == dtype and y.device.type == device
    y.float().sum().backward()
    assert xl.grad.dtype == dtype and layer.table.grad.dtype == dtype
    torch.testing.assert_close(y.double().cpu(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_dtypes(layer_backend, dtype, tol):
    _low_precision_case("cpu", dtype, tol)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_runs_the_reference(device):
    _low_precision_case(device, torch.float16, 3e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_low_precision_dtypes_cuda(dtype, tol):
    _low_precision_case("cuda", dtype, tol)


@pytest.mark.parametrize("n_tokens", [1, 5, 70, 300])
@pytest.mark.parametrize("weighting,temperature", [("prob", 1.0), ("prob", 0.5), ("l1", 1.0)])
def test_float32_values_and_gradients_match_float64_reference(layer_backend, n_tokens, weighting, temperature):
    """Both backends' float32 forward and backward (each algorithm's token range) against the
    token-by-token float64 reference."""
    layer64 = make_layer(32, 24, 8, weighting, temperature)
    x64 = away_from_zero(torch.randn(n_tokens, 32, dtype=torch.float64), 0.1)
    grad_out = torch.randn(n_tokens, 24, dtype=torch.float64)
    layer = MemoryLayer(32, 24, tau=8, weighting=weighting, temperature=temperature)
    layer.load_state_dict(layer64.state_dict())
    x = x64.float().requires_grad_()
    y = layer(x)
    (y * grad_out.float()).sum().backward()
    xr, tr, br = (t.detach().clone().requires_grad_() for t in (x64, layer64.table, layer64.bias))
    expected = reference_forward(xr, tr, br, 8, weighting, temperature)
    (expected * grad_out).sum().backward()
    scale = expected.abs().max().item()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6 * scale)
    for got, want in ((x.grad, xr.grad), (layer.table.grad, tr.grad), (layer.bias.grad, br.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_autocast_no_grad_inference_mode(layer_backend):
    layer = make_layer(16, 8, 8).float()
    x = torch.randn(4, 16)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())  # bf16 activations, fp32 tables: output keeps the tables' dtype
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=3e-2, atol=3e-2)
    with torch.no_grad():
        assert not layer(x).requires_grad
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected)


def test_torch_compile_traces_without_graph_breaks(layer_backend):
    layer = make_layer(16, 8, 8).float()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 16, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.slow
def test_torch_compile_inductor():
    layer = make_layer(16, 8, 8).float()
    compiled = torch.compile(layer)
    x = torch.randn(5, 16)
    torch.testing.assert_close(compiled(x), layer(x))


def test_errors():
    with pytest.raises(ValueError, match="in_features=10 .* tau=4"):
        MemoryLayer(10, 4, tau=4)
    with pytest.raises(ValueError, match="tau must be"):
        MemoryLayer(17, 4, tau=17)
    with pytest.raises(ValueError, match="tau must be"):
        MemoryLayer(8, 4, tau=0)
    with pytest.raises(ValueError, match="weighting"):
        MemoryLayer(8, 4, tau=4, weighting="softmax")
    with pytest.raises(ValueError, match="temperature"):
        MemoryLayer(8, 4, tau=4, temperature=0.0)
    layer = MemoryLayer(8, 4, tau=4)
    with pytest.raises(ValueError, match="last dimension 8, got shape \\(3, 9\\)"):
        layer(torch.randn(3, 9))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 8, dtype=torch.bool))
    x = torch.randn(3, 8)
    rows, weights = layer.hash(x)
    with pytest.raises(ValueError, match="shape \\(3, 2\\)"):
        layer(x, (rows[:2], weights[:2]))
    with pytest.raises(ValueError, match="shape"):
        layer(x, (rows, weights[:, :1]))
    with pytest.raises(TypeError, match="pair"):
        layer(x, rows)
    with pytest.raises(ValueError, match="table must have shape \\(32, out_features\\)"):
        memory_layer(x, torch.randn(31, 4), tau=4)


def test_extra_repr_init_and_accounting():
    layer = MemoryLayer(512, 256, tau=8, weighting="l1")
    text = repr(layer)
    for part in ("in_features=512", "out_features=256", "tau=8", "num_tables=64", "weighting='l1'"):
        assert part in text
    assert layer.table.shape == (64 * 256, 256)
    assert torch.all(layer.bias == 0)
    assert abs(layer.table.std().item() - 0.02) < 1e-3
    assert layer.num_table_parameters() == 64 * 256 * 256
    assert layer.table_bytes() == 64 * 256 * 256 * 4
    assert layer.table_bytes(torch.float16) == 64 * 256 * 256 * 2
    assert layer.macs_per_token() == 64 * 256
    assert layer.bytes_read_per_token() == 64 * 256 * 4
    assert MemoryLayer(8, 4, tau=4, bias=False).bias is None
    # spec Table 3: Q layer memory (fp16, decimal MB) 2.1 / 16.8 MB for tau 4 / 8 at d = 512
    assert MemoryLayer(512, 512, tau=4).table_bytes(torch.float16) / 1e6 == pytest.approx(2.10, abs=0.01)
    assert MemoryLayer(512, 512, tau=8).table_bytes(torch.float16) / 1e6 == pytest.approx(16.78, abs=0.01)


def test_functional_form_matches_module():
    layer = make_layer(16, 4, 8, "l1")
    x = torch.randn(3, 16, dtype=torch.float64)
    y = memory_layer(x, layer.table, layer.bias, tau=8, weighting="l1")
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    rows, weights = memory_hash(x, 8, "l1")
    torch.testing.assert_close(gather_sum(rows, weights, layer.table, layer.bias), y, rtol=0, atol=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_at_65536_tokens_stays_far_below_naive_gather():
    """A naive (N, K, out) gather of fp32 at N=65536, K=64, out=512 alone needs 8.6 GB."""
    naive_bytes = 65536 * 64 * 512 * 4 * 1  # one (N, K, out) fp32 tensor
    assert naive_bytes / 1e9 == pytest.approx(8.6, abs=0.05)
    script = textwrap.dedent(
        """
        import json, torch
        from memoryformer import MemoryLayer

        def hwm_kib():  # VmHWM: ru_maxrss would include the forking parent's high-water mark
            return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))

        torch.manual_seed(0)
        layer = MemoryLayer(512, 512)
        x = torch.randn(65536, 512, requires_grad=True)
        base = hwm_kib()
        layer(x).sum().backward()
        print(json.dumps({"base_kib": base, "peak_kib": hwm_kib()}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    peak_gb = json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"] * 1024 / 1e9
    assert peak_gb < 2.5, f"peak RSS {peak_gb:.2f} GB"
    assert peak_gb < naive_bytes / 1e9 / 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    layer = make_layer(64, 32, 8).float()
    x = torch.randn(33, 64, requires_grad=True)
    layer(x).sum().backward()
    layer_cuda = MemoryLayer(64, 32, tau=8, device="cuda")
    layer_cuda.load_state_dict(layer.state_dict())
    xc = x.detach().cuda().requires_grad_()
    y = layer_cuda(xc)
    y.sum().backward()
    torch.testing.assert_close(y.cpu(), layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer_cuda.table.grad.cpu(), layer.table.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xc.grad.cpu(), x.grad, rtol=1e-4, atol=1e-5)


def test_weight_formula_closed_form():
    # paper Eq. 10: p(z) = 1 / prod(1 + exp(-2|z|/t)); l1 = ||z||_1 * p with t = 1
    z = torch.tensor([[0.3, -1.2, 0.0, 2.5]], dtype=torch.float64)
    p = 1.0 / math.prod(1 + math.exp(-2 * abs(v) / 0.7) for v in z[0].tolist())
    _, w = memory_hash(z, 4, "prob", 0.7)
    assert w.item() == pytest.approx(p, rel=1e-12)
    p1 = 1.0 / math.prod(1 + math.exp(-2 * abs(v)) for v in z[0].tolist())
    _, w = memory_hash(z, 4, "l1")
    assert w.item() == pytest.approx(4.0 * p1, rel=1e-12)


# ---- several layers sharing one hash (MemoryAttention's Q, K, V) ----------------------------------------


def _qkv(tau: int = 4, d: int = 16, dtype=torch.float32) -> list[MemoryLayer]:
    torch.manual_seed(3)
    return [MemoryLayer(d, out, tau=tau, dtype=dtype) for out in (16, 16, 24)]


def test_shared_hash_forward_matches_float64_values_and_gradients(layer_backend, monkeypatch):
    """Values and gradients (input, tables, biases) of the shared-hash call against the float64
    reference of each layer on its own; under the kernels backend the one fused op runs."""
    layers = _qkv()
    for m in layers:
        torch.nn.init.normal_(m.bias)
    calls = []
    real = kernels.try_memory_layers
    monkeypatch.setattr(kernels, "try_memory_layers", lambda *a: calls.append(1) or real(*a))
    x = away_from_zero(torch.randn(3, 40, 16)).requires_grad_()
    outs = layer_module.shared_hash_forward(x, layers)
    weights = [torch.randn_like(o) for o in outs]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    assert calls and (real(x.detach(), [m.table for m in layers], [m.bias for m in layers], 4, "prob", 1.0)
                      is not None) == (layer_backend == "kernels")

    x64 = x.detach().double().reshape(-1, 16).requires_grad_()
    tables = [m.table.detach().double().requires_grad_() for m in layers]
    biases = [m.bias.detach().double().requires_grad_() for m in layers]
    refs = [reference_forward(x64, t, b, 4) for t, b in zip(tables, biases)]
    sum((r * w.double().reshape(r.shape)).sum() for r, w in zip(refs, weights)).backward()
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o.double().reshape(r.shape), r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double().reshape(x64.shape), x64.grad, rtol=1e-4, atol=1e-5)
    for m, t, b in zip(layers, tables, biases):
        torch.testing.assert_close(m.table.grad.double(), t.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.bias.grad.double(), b.grad, rtol=1e-5, atol=1e-5)


def test_shared_hash_forward_keeps_module_hooks_and_checks_its_layers():
    """A layer with a forward hook is called (its hook fires), whatever the backend; layers with other
    hash settings are refused."""
    layers = _qkv()
    seen = []
    handle = layers[1].register_forward_hook(lambda m, a, out: seen.append(out.shape))
    x = torch.randn(5, 16)
    outs = layer_module.shared_hash_forward(x, layers)
    handle.remove()
    assert seen == [torch.Size([5, 16])]
    torch.testing.assert_close(outs[1], layers[1](x))
    with pytest.raises(ValueError, match="same in_features, tau"):
        layer_module.shared_hash_forward(x, [layers[0], MemoryLayer(16, 16, tau=8)])
