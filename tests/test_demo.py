"""The main job's logic, at smoke-test size: both arms train on the same tokens and get compared."""

from __future__ import annotations

import json

from memoryformer.cli import main


def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert "validation perplexity" in printed and "sample from memoryformer" in printed
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["arm"]: r for r in summary["rows"]}
    assert set(rows) == {"memoryformer", "dense"}
    # same tokens for both arms, a finite perplexity below the uniform one, throughput measured
    assert rows["memoryformer"]["train_tokens"] == rows["dense"]["train_tokens"] == 4 * 4 * 64
    vocab = json.loads((out / "data" / "meta.json").read_text())["vocab_size"]
    for row in rows.values():
        assert 1 < row["val_ppl"] < vocab
        assert row["train_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
    # MemoryFormer's forward FLOPs per token are below its dense twin's
    assert rows["memoryformer"]["flops_per_token"] < rows["dense"]["flops_per_token"]
    for arm in ("memoryformer", "dense"):
        assert (out / arm / "model.safetensors").is_file() and (out / arm / "metrics.csv").is_file()
    assert (out / "loss_curves.png").stat().st_size > 10_000
    # rerunning finds the finished runs and does not train again
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--steps", "4"]) == 0
