"""use_huge_pages: moves large parameters onto 2 MiB pages without changing anything observable."""

from __future__ import annotations

import os

import pytest
import torch

from memoryformer import LanguageModel, ModelConfig
from memoryformer.inference import pages


def _anon_huge_kb() -> int:
    with open("/proc/self/smaps") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))


def test_values_identity_and_grad_flags_are_kept():
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.from_preset("mf-test")).eval()
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    idx = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        logits_before, _ = model(idx)
    moved = pages.use_huge_pages(model, min_bytes=1 << 16)
    after = dict(model.named_parameters())
    assert all(after[k] is params[k] for k in params)  # same Parameter objects (optimizers keep working)
    for k, v in after.items():
        assert torch.equal(v, before[k]) and v.requires_grad and v.is_contiguous()
    with torch.no_grad():
        logits_after, _ = model(idx)
    assert torch.equal(logits_before, logits_after)
    if pages.huge_pages_available():
        big = sum(v.numel() * v.element_size() for v in before.values() if v.numel() * v.element_size() >= 1 << 16)
        assert moved == big > 0
    else:
        assert moved == 0


@pytest.mark.skipif(not pages.huge_pages_available(), reason="transparent huge pages unavailable")
def test_large_tensor_lands_on_huge_pages():
    layer = torch.nn.Linear(2048, 2048)  # 16 MiB weight
    start = _anon_huge_kb()
    assert pages.use_huge_pages(layer) == 2048 * 2048 * 4
    assert _anon_huge_kb() - start >= 8 * 1024  # at least half of it on 2 MiB pages
    out = layer(torch.ones(1, 2048))
    out.sum().backward()  # still a trainable parameter
    assert layer.weight.grad.shape == (2048, 2048)


def test_small_and_unavailable_are_no_ops(monkeypatch):
    layer = torch.nn.Linear(8, 8)
    storage = layer.weight.data_ptr()
    assert pages.use_huge_pages(layer) == 0 and layer.weight.data_ptr() == storage
    monkeypatch.setattr(pages, "huge_pages_available", lambda: False)
    big = torch.nn.Linear(2048, 2048)
    ptr = big.weight.data_ptr()
    assert pages.use_huge_pages(big) == 0 and big.weight.data_ptr() == ptr


def test_cli_asks_for_huge_pages_unless_told_not_to(monkeypatch, capsys):
    from memoryformer import cli

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert cli.main(["flops", "--preset", "mf-test"]) == 0
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # the user's choice wins
    assert cli.main(["flops", "--preset", "mf-test"]) == 0
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
