"""Gradient clipping with the table-gradient norms the backward kernel sums (kernels.grad_norms,
train.optim.clip_gradients), against torch's clip_grad_norm_ and a float64 sum."""

from __future__ import annotations

import pytest
import torch

from memoryformer import kernels
from memoryformer.core.config import ModelConfig
from memoryformer.core.model import LanguageModel
from memoryformer.kernels.grad_norms import GradNormTally
from memoryformer.train.optim import clip_gradients

HAS_TOTAL_NORM = hasattr(torch.nn.utils, "get_total_norm")


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
