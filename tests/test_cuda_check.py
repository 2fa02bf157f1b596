"""benchmarks/cuda_check.py smoke test on the CPU: every correctness check passes, results are written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cuda_check  # noqa: E402


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core machine this is several times faster for tiny ops."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_tiny_run_writes_passing_checks(tmp_path, one_thread) -> None:
    result = cuda_check.main(["--device", "cpu", "--quick", "--tiny", "--backend", "torch",
                              "--compile-backend", "aot_eager", "--out", str(tmp_path), "--time-budget", "120"])
    assert result["name"] == "cuda_cpu"
    payload = json.loads((tmp_path / "cuda_cpu.json").read_text())
    checks = payload["rows"]
    failed = [c for c in checks if not c["ok"]]
    assert not failed, failed
    assert payload["correctness_ok"] and payload["complete"]
    names = " | ".join(c["name"] for c in checks)
    for part in ("layer fp32 N=1 ", "layer bf16 N=7 ", "tau=4", "tau=8", ": grad x", ": grad table", ": grad bias",
                 "model mf-test fp32: logits", "model pythia-test fp32: KV-cache decode",
                 "model mf-test fp32: generate", "model pythia-test fp32: train grads", "torch.compile(aot_eager)"):
        assert part in names, part
    assert all(c["max_abs_err"] <= c["tol"] for c in checks)
    layer, model = payload["layer"], payload["model"]
    assert {(r["n"], r["mode"]) for r in layer} == {(1, "fwd"), (1, "fwd+bwd"), (8, "fwd"), (8, "fwd+bwd")}
    assert all(r["linear_ms"] > 0 and r["memory_ms"] > 0 for r in layer)
    assert [r["case"] for r in model][-1] == "train step 2x16" and len(model) == 7
    assert all(r["ratio"] == pytest.approx(r["mf_ms"] / r["dense_ms"]) for r in model)
    md = (tmp_path / "cuda_cpu.md").read_text()
    assert "| check | max abs err | tol | ok |" in md and "## mf-test vs pythia-test" in md


def test_check_flags_errors_beyond_tolerance() -> None:
    ref = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert cuda_check.check("same", ref.float(), ref, 1e-4, 0.0)["ok"]
    bad = cuda_check.check("off", ref.float() + 1e-3, ref, 1e-4, 0.0)
    assert not bad["ok"] and bad["max_abs_err"] == pytest.approx(1e-3, rel=1e-4) and bad["tol"] == pytest.approx(2e-4)
    assert not cuda_check.check("nan", torch.tensor([float("nan"), -2.0]), ref, 1.0, 1.0)["ok"]
    assert not cuda_check.check("shape", ref[:1], ref, 1.0, 1.0)["ok"]


def test_budget_skips_and_failures_are_recorded() -> None:
    skipped: list[str] = []
    assert cuda_check.guarded("late", cuda_check.Budget(0.0), skipped, lambda: {"x": 1}) is None
    budget = cuda_check.Budget(100.0)
    assert cuda_check.guarded("fine", budget, skipped, lambda v: {"x": v}, 2) == {"x": 2}

    def boom() -> dict:
        raise RuntimeError("out of memory")

    assert cuda_check.guarded("broken", budget, skipped, boom) is None
    assert skipped[0] == "late" and skipped[1].startswith("broken (failed: RuntimeError: out of memory")
