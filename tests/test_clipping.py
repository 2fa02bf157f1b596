"""Gradient clipping: the table-gradient norms the backward kernel sums (kernels.grad_norms,
train.optim.clip_gradients) and the clip factor applied inside fused AdamW (train.optim.clip_and_step),
against torch's clip_grad_norm_ followed by the optimizer step, and a float64 sum."""

from __future__ import annotations

import pytest
import torch

from memoryformer import kernels
from memoryformer.core.config import ModelConfig
from memoryformer.core.model import LanguageModel
from memoryformer.kernels.grad_norms import GradNormTally
from memoryformer.train import TrainConfig, build_optimizer
from memoryformer.train.optim import clip_and_step, clip_gradients, folds_clipping, fused_adamw_supported

HAS_TOTAL_NORM = hasattr(torch.nn.utils, "get_total_norm")
needs_fused = pytest.mark.skipif(not (fused_adamw_supported(torch.device("cpu")) and HAS_TOTAL_NORM),
                                 reason="fused AdamW on CPU needs torch >= 2.4, get_total_norm torch >= 2.6")


def model_and_batch(seed: int = 0, arch: str = "mf-test"):
    torch.manual_seed(seed)
    model = LanguageModel(ModelConfig.from_preset(arch, vocab_size=300))
    x = torch.randint(0, 300, (2, 32))
    return model, x


def table_params(model):
    return [p for n, p in model.named_parameters() if n.endswith(".table")]


def backward(model, x, tally: GradNormTally | None = None, times: int = 1):
    for _ in range(times):
        if tally is None:
            model(x, x)[1].backward()
        else:
            with tally:
                model(x, x)[1].backward()


# ---- the tally ------------------------------------------------------------------------------------

def test_backward_records_every_table_gradient_norm(built):
    model, x = model_and_batch()
    tally = GradNormTally()
    with kernels.backend("kernels"):
        backward(model, x, tally)
    tables = table_params(model)
    assert tables and len(tally) == len(tables)
    for p in tables:
        torch.testing.assert_close(tally.sqnorm(p), p.grad.double().pow(2).sum().item(), rtol=1e-6, atol=0)
    others = [p for p in model.parameters() if p.grad is not None and all(p is not t for t in tables)]
    assert others and all(tally.sqnorm(p) is None for p in others)  # embedding, head, norms: not recorded


def test_a_changed_gradient_is_not_trusted(built):
    """In-place changes (an all-reduce, an unscale), a second micro-batch accumulated into the gradient,
    a new gradient tensor: each makes the record stale."""
    model, x = model_and_batch()
    tally = GradNormTally()
    with kernels.backend("kernels"):
        with tally:
            backward(model, x)
            backward(model, x)  # second micro-batch: autograd sums two gradients per table
    assert len(tally) == 0
    model.zero_grad(set_to_none=True)
    with kernels.backend("kernels"):
        backward(model, x, tally)
    first, second, third = table_params(model)[:3]
    first.grad.mul_(2.0)
    second.grad = second.grad.clone()
    assert tally.sqnorm(first) is None and tally.sqnorm(second) is None and tally.sqnorm(third) is not None


def test_nothing_recorded_outside_a_window_and_windows_do_not_nest(built):
    model, x = model_and_batch()
    tally = GradNormTally()
    with kernels.backend("kernels"):
        backward(model, x)
    assert len(tally) == 0
    with tally, pytest.raises(RuntimeError, match="already active"), GradNormTally():
        pass
    with GradNormTally():  # the failed inner window did not leave the outer one stuck
        pass


def test_pure_path_records_nothing_and_clips_the_same(built):
    model, x = model_and_batch()
    tally = GradNormTally()
    with kernels.backend("torch"):
        backward(model, x, tally)
    assert len(tally) == 0
    params = list(model.parameters())
    expected = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    torch.testing.assert_close(clip_gradients(params, 1.0, sharded=False, tally=tally), expected)


# ---- clip_gradients with the tally --------------------------------------------------------------

@pytest.mark.skipif(not HAS_TOTAL_NORM, reason="get_total_norm needs torch >= 2.6")
@pytest.mark.parametrize("max_norm", [1e-3, 1e9])
def test_clip_with_tally_equals_torch_clip(built, max_norm):
    model, x = model_and_batch(1)
    tally = GradNormTally()
    with kernels.backend("kernels"):
        backward(model, x, tally)
    params = list(model.parameters())
    copies = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(copies, max_norm)  # the same gradients, clipped by torch
    norm = clip_gradients(params, max_norm, sharded=False, tally=tally)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for p, c in zip(params, copies):
        torch.testing.assert_close(p.grad, c.grad, rtol=1e-6, atol=1e-12)


@pytest.mark.skipif(not HAS_TOTAL_NORM, reason="get_total_norm needs torch >= 2.6")
def test_clip_uses_the_recorded_norms(built):
    """The tally's sums, not a second read, give the tables' share of the norm: a doctored record
    moves the norm."""
    model, x = model_and_batch(2)
    tally = GradNormTally()
    with kernels.backend("kernels"):
        backward(model, x, tally)
    params = list(model.parameters())
    honest = float(clip_gradients(params, 1e9, sharded=False, tally=tally))
    table = table_params(model)[0]
    key = table.data_ptr()
    tally._records[key] = tally._records[key]._replace(sqnorm=tally._records[key].sqnorm + 4.0)
    doctored = float(clip_gradients(params, 1e9, sharded=False, tally=tally))
    assert doctored ** 2 == pytest.approx(honest ** 2 + 4.0, rel=1e-6)


@pytest.mark.skipif(not HAS_TOTAL_NORM, reason="get_total_norm needs torch >= 2.6")
def test_clip_with_tally_is_closer_to_the_float64_norm(built):
    """torch sums a big gradient's squares in float32; the kernel in float64: the tally's norm is at
    least as close to the exact norm."""
    torch.manual_seed(7)
    layer_in = torch.randn(2048, 64)
    table = torch.nn.Parameter(torch.randn(8 << 8, 4096) * 0.01)
    tally = GradNormTally()
    with kernels.backend("kernels"), tally:
        kernels.memory_layer(layer_in, table, tau=8).pow(2).sum().backward()
    assert len(tally) == 1
    exact = table.grad.double().pow(2).sum().sqrt().item()
    ours = float(clip_gradients([table], 1e30, sharded=False, tally=tally))
    theirs = float(torch.nn.utils.get_total_norm([table.grad]))
    assert abs(ours - exact) <= abs(theirs - exact) and abs(ours - exact) <= 1e-6 * exact


# ---- clip_and_step ------------------------------------------------------------------------------

def twin_runs(max_norm: float, steps: int = 3):
    """The same model trained by clip_grad_norm_ + step and by clip_and_step (with the tally)."""
    ours, x = model_and_batch(3)
    theirs, _ = model_and_batch(3)
    opt_ours = build_optimizer(ours, TrainConfig(), lr=1e-2, fused=True)
    opt_theirs = build_optimizer(theirs, TrainConfig(), lr=1e-2, fused=True)
    norms = []
    with kernels.backend("kernels"):
        for _ in range(steps):
            tally = GradNormTally()
            backward(ours, x, tally)
            backward(theirs, x)
            assert folds_clipping(opt_ours)
            n_ours = clip_and_step(opt_ours, list(ours.parameters()), max_norm, sharded=False, tally=tally)
            n_theirs = torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), max_norm)
            grads = [(a.grad.clone(), b.grad.clone()) for a, b in zip(ours.parameters(), theirs.parameters())]
            opt_theirs.step()
            norms.append((float(n_ours), float(n_theirs)))
            opt_ours.zero_grad(set_to_none=True)
            opt_theirs.zero_grad(set_to_none=True)
    return ours, theirs, norms, grads


@needs_fused
@pytest.mark.parametrize("max_norm", [1e-2, 1e9])
def test_clip_and_step_equals_clip_then_step(built, max_norm):
    ours, theirs, norms, grads = twin_runs(max_norm)
    for a, b in norms:
        assert a == pytest.approx(b, rel=1e-5)
    assert (max_norm < 1) == all(a > max_norm for a, _ in norms)  # clipped at every step, or never
    for mine, torch_s in grads:  # the gradients left behind are the clipped ones
        torch.testing.assert_close(mine, torch_s, rtol=1e-5, atol=1e-9)
    for a, b in zip(ours.parameters(), theirs.parameters()):  # Adam turns an ulp on a near-zero
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # gradient into ~1e-6 of a 3e-2 update


@needs_fused
def test_clip_and_step_folds_the_factor_into_fused_adamw(built, monkeypatch):
    """When clipping, fused AdamW receives the factor (grad_scale = 1 / factor) and the gradients are
    not scaled beforehand; the attribute is gone after the step."""
    model, x = model_and_batch(4)
    opt = build_optimizer(model, TrainConfig(), lr=1e-2, fused=True)
    seen = []
    real_step = opt.step
    monkeypatch.setattr(opt, "step", lambda: (seen.append(getattr(opt, "grad_scale", None)), real_step())[1])
    scaled = []
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda *a, **k: scaled.append(a))
    backward(model, x)
    norm = clip_and_step(opt, list(model.parameters()), 1e-3, sharded=False)
    assert not scaled and seen[0] is not None
    torch.testing.assert_close(seen[0], torch.tensor((float(norm) + 1e-6) / 1e-3), rtol=1e-6, atol=0)
    assert not hasattr(opt, "grad_scale")


def test_clip_and_step_scales_first_without_fused_adamw(built):
    model, x = model_and_batch(5)
    opt = build_optimizer(model, TrainConfig(), lr=1e-2, fused=False)
    assert not folds_clipping(opt)
    backward(model, x)
    before = [p.grad.clone() for p in model.parameters()]
    norm = clip_and_step(opt, list(model.parameters()), 1e-3, sharded=False)
    factor = 1e-3 / (float(norm) + 1e-6)
    for p, g in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, g * factor)


@needs_fused
def test_an_infinite_norm_zeroes_the_gradients_like_torch(built):
    model, x = model_and_batch(6, "pythia-test")
    opt = build_optimizer(model, TrainConfig(), lr=1e-2, fused=True)
    backward(model, x)
    first = next(model.parameters())
    first.grad[0] = float("inf")
    norm = clip_and_step(opt, list(model.parameters()), 1.0, sharded=False)
    assert norm == float("inf")
    assert all(torch.all(p.grad == 0) for p in model.parameters() if p is not first)


def test_norm_only_needs_local_cpu_gradients():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="scale=False"):
        clip_gradients([p], 1.0, sharded=True, scale=False)


def test_a_compiled_backward_records_nothing_and_keeps_one_graph(built):
    """Under torch.compile the backward is traced with fake tensors, whose sums cannot be read: no
    record, no graph break (fullgraph), and clipping reads the gradient itself."""
    from memoryformer import MemoryLayer

    torch.manual_seed(8)
    layer = MemoryLayer(16, 8, tau=8)
    loss = torch.compile(lambda x: layer(x).pow(2).sum(), backend="aot_eager", fullgraph=True)
    tally = GradNormTally()
    with kernels.backend("kernels"), tally:
        loss(torch.randn(4, 16)).backward()
    assert len(tally) == 0 and layer.table.grad is not None


def test_a_new_gradient_on_the_freed_address_is_not_trusted(built):
    """The record keeps a weak reference to the kernel's gradient storage: once freed, a tensor that
    lands on the same address with version 0 is not taken for it."""
    model, x = model_and_batch(9)
    tally = GradNormTally()
    with kernels.backend("kernels"):
        backward(model, x, tally)
    table = table_params(model)[0]
    assert tally.sqnorm(table) is not None  # the kernel's tensor itself
    for _ in range(3):  # free it; a later copy may reuse its address
        table.grad = table.grad * 0.5
    assert tally.sqnorm(table) is None


def test_clip_and_step_clears_the_tally(built):
    """Fused AdamW writes the clipped gradients back without bumping their versions: the records are
    dropped after the step, so a later clip reads the gradients."""
    model, x = model_and_batch(10)
    opt = build_optimizer(model, TrainConfig(), lr=1e-2, fused=True)
    tally = GradNormTally()
    with kernels.backend("kernels"):
        backward(model, x, tally)
    assert len(tally)
    clip_and_step(opt, list(model.parameters()), 1e-3, sharded=False, tally=tally)
    assert len(tally) == 0


def test_each_thread_has_its_own_tally(built):
    import threading

    errors, sizes = [], []

    def work(seed):
        try:
            model, x = model_and_batch(seed)
            tally = GradNormTally()
            with kernels.backend("kernels"):
                backward(model, x, tally)
            sizes.append(len(tally))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with GradNormTally():  # this thread's window does not block the others
        threads = [threading.Thread(target=work, args=(s,)) for s in (11, 12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and sizes == [len(table_params(model_and_batch(11)[0]))] * 2


@needs_fused
def test_no_fold_when_clipping_a_subset_of_the_optimized_parameters(built, monkeypatch):
    model, x = model_and_batch(13)
    opt = build_optimizer(model, TrainConfig(), lr=1e-2, fused=True)
    backward(model, x)
    subset = table_params(model)
    seen = []
    real_step = opt.step
    monkeypatch.setattr(opt, "step", lambda: (seen.append(getattr(opt, "grad_scale", None)), real_step())[1])
    others = [(p, p.grad.clone()) for p in model.parameters() if all(p is not t for t in subset)]
    clip_and_step(opt, subset, 1e-6, sharded=False)
    assert seen == [None]  # scaled by a multiply, only the subset
    assert all(torch.equal(p.grad, g) for p, g in others)
