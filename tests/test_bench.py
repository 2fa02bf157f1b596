"""benchmarks/run_all.py (targets, summary, runs) and `memoryformer bench`, on fake results; the byte counts
and helpers of model.py and scaling_cost.py. No timing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

from memoryformer import LanguageModel, ModelConfig, cli
from memoryformer.commands import bench
from memoryformer.core.layer import MemoryLayer
from memoryformer.inference.quantize import Int8MemoryLayer, quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402
import model as model_bench  # noqa: E402
import run_all  # noqa: E402
import scaling_cost  # noqa: E402

MACHINE = {"cpu": "Test CPU", "torch_threads": 2, "torch": "9.9.9"}


def layer_row(n: int, mode: str, ratio: float, dtype: str = "fp32", d: int = 1024) -> dict:
    return {"d": d, "n": n, "mode": mode, "dtype": dtype, "cold": n == 1, "linear_ms": 1.0,
            "memory_ms": ratio, "ratio": ratio}


def model_row(head: bool, ratio: float, case: str = "decode b=1 ctx=128", **fields) -> dict:
    return {"case": case, "head": head, "mf_ms": 10.0 * ratio, "dense_ms": 10.0, "ratio": ratio, **fields}


def write(results: Path, stem: str, rows: list[dict] | None = None, title: str = "", **extra) -> None:
    results.mkdir(parents=True, exist_ok=True)
    payload = {"command": f"python benchmarks/{stem}.py", "machine": MACHINE, "date": "2000-01-01 00:00 UTC",
               **extra, **({} if rows is None else {"rows": rows})}
    (results / f"{stem}.json").write_text(json.dumps(payload))
    (results / f"{stem}.md").write_text(f"# {title or stem}\n\n| x |\n|---|\n| {stem} |\n")


def fake_results(results: Path) -> None:
    """a MET (0.2 is at the limit), b MISSED, c MET, d MISSED; precision: bf16 MET/MET, int8 MET/MISSED;
    f MET (0.85, at the limit), g MISSED, h MET; i: 6 ms MISSED, 1.5 x the bound MET; j reported (4 rows)."""
    write(results, "layer", [layer_row(1, "fwd", 0.2), layer_row(1, "fwd", 0.01, dtype="bf16"),
                             layer_row(2048, "fwd+bwd", 1.2), layer_row(2048, "fwd", 1.3),
                             layer_row(2048, "fwd", 0.5, d=512)], title="MemoryLayer vs nn.Linear")
    like = [model_row(head, r, case=run_all.like_case(p, head))
            for (p, head), r in zip([(p, h) for p in ("bf16", "int8") for h in (False, True)], (0.3, 0.4, 0.5, 0.6))]
    write(results, "model_tiny_fp32", [model_row(True, 0.8), model_row(False, 0.6, mf_bound_ms=4.0, mf_over_bound=1.5),
                                       model_row(False, 0.01, case="decode b=8 ctx=128"),
                                       model_row(True, 0.85, case="train step 4x512", mf_ms=6800.0, dense_ms=8000.0),
                                       model_row(True, 1.2, case="train step study-size 8x128"),
                                       model_row(False, 0.1, case="prefill 512"), model_row(True, 0.7, case="prefill 512"),
                                       *like], title="mf-tiny vs pythia")
    write(results, "precision", [precision_row("fp32", 0.0, 0.0, None, 0.0),
                                 precision_row("bf16-tables", 5e-3, 2e-3, 1e-2, -0.02),
                                 precision_row("int8-tables", 3e-2, 1e-2, 2e-2, 0.5),
                                 precision_row("int8-head", 0.5, 0.5, None, 9.0),
                                 precision_row("int8-tables+int8-head", 0.5, 0.5, None, 9.0)])


def precision_row(option: str, rel_l2: float, layer: float, target: float | None, ppl_delta: float) -> dict:
    """A row as benchmarks/precision.py writes it (memoryformer.inference.quantize.precision_report)."""
    return {"option": option, "rel_l2_err": rel_l2, "layer_rel_err": layer, "mean_rel_err": rel_l2 / 2,
            "ppl_delta": ppl_delta, "ppl_delta_rel": ppl_delta / 10, "target": target}


STATUSES = ["MET", "MISSED", "reported", "MET", "MISSED", "MET", "MET", "MET", "MISSED",
            "MET", "MISSED", "MET", "MISSED", "MET"] + ["reported"] * 4 + ["NO DATA"]  # k: no official_kernels.json


def test_targets_met_and_missed(tmp_path) -> None:
    fake_results(tmp_path)
    rows = run_all.targets(run_all.load_results(tmp_path))
    assert [(r["key"], r["status"]) for r in rows] == list(zip("abbcdeeeefghiijjjjk", STATUSES, strict=True))
    # the fp32 d = 1024 rows; per layer then whole model for bf16, then int8 (head rows ignored); the
    # model rows by case and head; i: MF's own time (ms), then its ratio to the bound
    assert [r["value"] for r in rows] == [0.2, 0.6, 0.8, 1.2, 1.3, 2e-3, 5e-3, 1e-2, 3e-2,
                                          0.85, 1.2, 0.7, 6.0, 1.5, 0.3, 0.4, 0.5, 0.6, None]
    assert rows[0]["measured"] == "0.2 (MemoryLayer 0.2 ms, Linear 1 ms)"
    assert rows[1]["measured"] == "0.6 (MF 6 ms, dense 10 ms)"
    assert rows[6]["measured"] == "0.005; perplexity change -0.02 (-0.2%)"
    assert rows[6]["ppl_delta"] == -0.02 and rows[8]["limit"] == 2e-2
    assert rows[9]["measured"] == "0.85 (MF 6,800 ms, dense 8,000 ms)"
    assert rows[12]["measured"] == "6 ms" and rows[12]["limit"] == 1.0
    assert rows[13]["measured"] == "1.5 (MF 6 ms, bound 4 ms)" and rows[13]["limit"] == 2.0
    assert [r["limit"] for r in rows[9:12]] == [0.85, 1.0, 0.8] and all(r["limit"] is None for r in rows[14:18])
    assert "bf16 tables vs bf16 block weights" in rows[14]["target"] and "int8 heads" in rows[17]["target"]


def test_absolute_target_without_its_field(tmp_path) -> None:
    write(tmp_path, "model_tiny_fp32", [model_row(False, 0.6)])  # no mf_over_bound: an older model.py
    rows = {(r["key"], r["limit"]): r for r in run_all.targets(run_all.load_results(tmp_path))}
    assert rows[("i", 1.0)]["status"] == "MISSED" and rows[("i", 2.0)]["status"] == "NO DATA"
    assert rows[("i", 2.0)]["measured"].startswith("no row with mf_over_bound for")


def test_status_boundaries() -> None:
    assert run_all.status(0.15, 0.15) == "MET"
    assert run_all.status(0.1500001, 0.15) == "MISSED"
    assert run_all.status(float("nan"), 0.15) == "NO DATA"
    assert run_all.status(None, 0.15) == "NO DATA"
    assert run_all.status(3.0, None) == "reported"


def test_missing_files_and_rows(tmp_path) -> None:
    write(tmp_path, "layer", [layer_row(1, "fwd", 0.1)])  # no N = 2048 rows, no model or precision file
    rows = run_all.targets(run_all.load_results(tmp_path))
    assert [r["status"] for r in rows] == ["MET"] + ["NO DATA"] * 18
    assert rows[1]["measured"] == "no model_tiny_fp32.json" and "no row" in rows[3]["measured"]
    assert rows[-1]["measured"] == "no official_kernels.json" and rows[5]["measured"] == "no precision.json"
    (tmp_path / "broken.json").write_text("{not json")
    assert set(run_all.load_results(tmp_path)) == {"layer"}
    text, payload = run_all.build_summary(tmp_path / "empty")
    assert "no results yet" in text and all(r["status"] == "NO DATA" for r in payload["targets"])


def test_precision_rows_without_the_error_fields() -> None:
    rows = run_all.precision_targets("int8", {"rows": [{"option": "int8-tables", "note": "not measured"}]})
    assert [r["status"] for r in rows] == ["NO DATA", "NO DATA"] and "no layer_rel_err" in rows[0]["measured"]
    assert [r["status"] for r in run_all.precision_targets("bf16", {"rows": []})] == ["NO DATA", "NO DATA"]


def test_summary_only_writes_summary(tmp_path, capsys) -> None:
    fake_results(tmp_path)
    write(tmp_path, "model_demo_fp32", [], title="mf-demo vs pythia-demo")
    write(tmp_path, "zzz_other", [], title="another")
    write(tmp_path, "scaling_cost", [], title="Cost as work grows")
    assert run_all.main(["--summary-only", "--results-dir", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().err
    text = (tmp_path / "SUMMARY.md").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["command"] == f"python benchmarks/run_all.py --summary-only --results-dir {tmp_path}"
    assert summary["machines"] == ["Test CPU, 2 threads, torch 9.9.9"] and summary["runs"] is None
    assert [r["status"] for r in summary["targets"]] == STATUSES
    assert "Test CPU, 2 threads, torch 9.9.9" in text and summary["command"] in text
    assert "No benchmark was run" in text
    assert "| a | " in text and "| MISSED |" in text and "## Runs" not in text
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == ["## Targets", "## Sources", "## MemoryLayer vs nn.Linear", "## mf-tiny vs pythia",
                      "## mf-demo vs pythia-demo", "## Cost as work grows", "## precision",
                      "## another"]  # included, in order
    assert "summary" not in summary["sources"] and "(From [layer.md](layer.md).)" in text
    assert run_all.main(["--summary-only", "--results-dir", str(tmp_path)]) == 0  # ignores its own output
    assert json.loads((tmp_path / "summary.json").read_text())["targets"] == summary["targets"]


def test_failing_benchmark_reported_others_still_run(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_run(b: run_all.Bench, quick: bool) -> run_all.RunResult:
        calls.append((b.name, quick))
        code = 3 if b.name == "layer" else 0
        return run_all.RunResult(b.name, f"python {b.script}", code, 1.0, ["Traceback", "boom"])

    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    monkeypatch.setattr(run_all, "run_bench", fake_run)
    fake_results(tmp_path)
    assert run_all.main(["--quick", "--only", "layer", "model_tiny"]) == 1
    assert calls == [("layer", True), ("model_tiny", True)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == ["layer"] and [r["ok"] for r in summary["runs"]] == [False, True]
    text = (tmp_path / "SUMMARY.md").read_text()
    assert "| 3 FAILED |" in text and "layer failed" in text and "boom" in text
    assert summary["command"] == "python benchmarks/run_all.py --quick --only layer model_tiny"
    assert run_all.main(["--only", "model_tiny"]) == 0


def test_run_bench_subprocess(tmp_path) -> None:
    bench_dir = tmp_path / "benchmarks"
    bench_dir.mkdir()
    (bench_dir / "fails.py").write_text("import sys\nprint('computing', sys.argv[1:])\nsys.exit(3)\n")
    b = run_all.Bench("fails", "fails.py", ("--pair", "x"), "fails", (("--rounds", "1"),))
    result = run_all.run_bench(b, quick=False, bench_dir=bench_dir)
    assert (result.returncode, result.ok) == (3, False)
    assert result.tail == ["computing ['--pair', 'x']"]
    assert result.command == "python benchmarks/fails.py --pair x"
    gone = run_all.Bench("gone", "gone.py", (), "gone", ())
    missing = run_all.run_bench(gone, quick=False, bench_dir=bench_dir)
    assert not missing.ok and "does not exist" in missing.tail[0]


def test_quick_args_follow_the_scripts_flags(tmp_path) -> None:
    b = run_all.BY_NAME["precision"]
    assert run_all.quick_args(b, 'p.add_argument("--quick")\np.add_argument("--rounds")') == ["--quick"]
    assert run_all.quick_args(b, "p.add_argument('--rounds', type=int)") == ["--rounds", "1"]
    assert run_all.quick_args(b, "no flags") == []
    layer = run_all.bench_command(run_all.BY_NAME["layer"], quick=True)  # reads the real layer.py's flags
    assert layer[1:] == ["benchmarks/layer.py", "--rounds", "9", "--rounds", "1", "--d", "1024", "--n", "1", "2048",
                         "--dtypes", "fp32"]  # the quick flags come last: argparse keeps the last --rounds
    model = run_all.bench_command(run_all.BY_NAME["model_tiny"], quick=True)
    assert model[2:] == ["--pair", "tiny", "--rounds", "1", "--skip-train", "--skip-memory"]
    scaling = run_all.bench_command(run_all.BY_NAME["scaling_cost"], quick=True)
    assert scaling[1:] == ["benchmarks/scaling_cost.py", "--quick"]


def test_selection(tmp_path) -> None:
    args = argparse.Namespace(only=None, bf16=False)
    (tmp_path / "layer.py").touch()
    (tmp_path / "model.py").touch()
    assert [b.name for b in run_all.selected(args, tmp_path)] == ["layer", "model_tiny"]  # no precision.py
    (tmp_path / "precision.py").touch()
    (tmp_path / "scaling_cost.py").touch()
    args.bf16 = True
    names = [b.name for b in run_all.selected(args, tmp_path)]
    assert names == ["layer", "model_tiny", "model_tiny_bf16", "scaling_cost", "precision"]
    args.only = ["model_tiny_bf16", "layer", "layer"]
    assert [b.name for b in run_all.selected(args, tmp_path)] == ["model_tiny_bf16", "layer"]


def test_bad_combinations(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--summary-only", "--quick"])
    assert "--summary-only runs no benchmark" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_all.main(["--results-dir", str(tmp_path)])
    assert "--results-dir needs --summary-only" in capsys.readouterr().err


def test_cli_bench_summary_only(tmp_path) -> None:
    fake_results(tmp_path)
    assert cli.main(["bench", "--summary-only", "--results-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["command"] == f"memoryformer bench --summary-only --results-dir {tmp_path}"
    assert summary["targets"][0]["status"] == "MET"


def test_cli_bench_without_benchmarks_dir(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench, "BENCHMARKS", tmp_path / "no-benchmarks")
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--quick"])
    message = str(exc.value.code)
    assert message.startswith("memoryformer bench: error: ") and "\n" not in message
    assert "source repository" in message
    with pytest.raises(FileNotFoundError, match="source repository"):
        bench.run(argparse.Namespace())


# ---- model.py: case names, the bytes of a decode step, the bound -----------------------------------------


def test_target_case_names_are_model_py_s() -> None:
    """run_all finds model.py's rows by name: the names it matches are the ones model.py writes."""
    tiny = {t.match["case"] for t in run_all.TARGETS if t.stem == "model_tiny_fp32"}
    made = {"decode b=1 ctx=128", model_bench.TRAIN_CASE, model_bench.STUDY_CASE, model_bench.PREFILL_CASE}
    made |= {model_bench.like_case(p, head) for p in model_bench.LIKE_FOR_LIKE for head in (False, True)}
    assert tiny == made
    assert model_bench.like_case("int8", True) == ("decode b=1 ctx=128, MF int8 tables + int8 head "
                                                   "vs dense int8 blocks + int8 head")
    assert model_bench.precision_label("dense", "bf16", None) == "bf16 blocks"


# hand counts for mf-test (d 64, 2 layers, tau 4, e 2: K = 16 tables, ML1 out 16 * 6 = 96, vocab 256) and
# pythia-test (d 64, 2 layers, MLP 256, vocab 256) after 10 cached tokens, float32 unless told
MF_ROWS = 16 * (64 + 64 + 64 + 96 + 64) * 4          # Q, K, V, ML1, ML2: 16 rows each = 22,528 a block
MF_VECTORS = (3 * 64 + 96 + 64) * 4 + (64 + 64 + 96 + 96) * 4  # five biases; two RMSNorms, LayerNorm
DENSE_WEIGHTS = (192 * 64 + 64 * 64 + 256 * 64 + 64 * 256) * 4  # 196,608 a block
DENSE_VECTORS = (192 + 64 + 256 + 64) * 4 + 4 * 64 * 4         # four biases; two LayerNorms
KV = 2 * 11 * 64 * 4                                            # keys and values of 11 positions


def test_decode_bytes_hand_count() -> None:
    mf, dense = ModelConfig.from_preset("mf-test"), ModelConfig.from_preset("pythia-test")
    got = model_bench.decode_bytes(mf, 10)
    assert got == {"weights": 2 * MF_ROWS, "kv_cache": 2 * KV, "vectors": 2 * MF_VECTORS + (64 + 64) * 4,
                   "head": 0, "total": 2 * (MF_ROWS + MF_VECTORS + KV) + 512}
    assert got["total"] == 62208
    int8 = model_bench.decode_bytes(mf, 10, weights="int8", head="int8")
    assert int8["weights"] == 2 * 16 * ((64 + 4) * 4 + (96 + 4))  # a float32 scale per row read
    assert int8["vectors"] == got["vectors"] and int8["head"] == 256 * (64 + 4)
    assert model_bench.decode_bytes(mf, 10, weights="bf16", head="fp32")["weights"] == MF_ROWS  # 2 layers x half
    assert model_bench.decode_bytes(mf, 10, head="bf16")["head"] == 256 * 64 * 2
    got = model_bench.decode_bytes(dense, 10, head="fp32")
    assert got == {"weights": 2 * DENSE_WEIGHTS, "kv_cache": 2 * KV, "vectors": 2 * DENSE_VECTORS + (64 + 128) * 4,
                   "head": 256 * 64 * 4, "total": 2 * (DENSE_WEIGHTS + DENSE_VECTORS + KV) + 768 + 65536}
    int8 = model_bench.decode_bytes(dense, 10, weights="int8")
    assert int8["weights"] == 2 * (DENSE_WEIGHTS // 4 + 576 * 4)  # + a float32 scale per output row
    bf16_model = model_bench.decode_bytes(dense, 10, weights="bf16", float_bytes=2)  # a bf16 model: all halved
    assert bf16_model["total"] * 2 == model_bench.decode_bytes(dense, 10)["total"]
    assert model_bench.decode_bytes(dense, 1000)["kv_cache"] == 2 * 2 * 1001 * 64 * 4
    with pytest.raises(ValueError, match="softmax"):
        model_bench.decode_bytes(ModelConfig.from_preset("pythia-test", attention="performer"), 10)


def _tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def read_per_token(model: LanguageModel) -> int:
    """What the built model's blocks, embedding row and final norm hold that one token reads: K rows of
    every Memory Layer table (+ int8 scales) and its bias; every other block tensor whole."""
    total = model.embed.weight[0].numel() * model.embed.weight.element_size()
    total += _tensor_bytes(*model.norm.parameters())
    for block in model.blocks:
        layers = [m for m in block.modules() if hasattr(m, "num_tables") and hasattr(m, "table")]
        for m in layers:
            total += m.num_tables * m.table.shape[1] * m.table.element_size() + _tensor_bytes(m.bias)
            total += m.num_tables * 4 if isinstance(m, Int8MemoryLayer) else 0
        inside = {id(t) for m in layers for t in (*m.parameters(), *m.buffers())}
        total += _tensor_bytes(*(t for t in (*block.parameters(), *block.buffers()) if id(t) not in inside))
    return total


@pytest.mark.parametrize("preset", ["mf-test", "pythia-test"])
@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
def test_decode_bytes_agree_with_the_built_model(preset, weights) -> None:
    """The formula against the tensors of the model (and of its quantized copies) the benchmark times."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.from_preset(preset))
    arch = "tables" if preset.startswith("mf") else "blocks"
    q = model if weights == "fp32" else quantize_model(model, **{arch: weights}, head=weights)
    assert any(isinstance(m, MemoryLayer) for m in model.modules()) == (arch == "tables")
    parts = model_bench.decode_bytes(model.config, 10, weights=weights, head=weights)
    assert parts["weights"] + parts["vectors"] == read_per_token(q)
    head = q.head.weight_bytes() if weights != "fp32" else _tensor_bytes(q.head.weight)
    assert parts["head"] == head


def test_decode_bytes_of_a_bf16_model_with_int8_tables() -> None:
    """Quantized layers keep float32 biases in a bf16 model; its norms, embedding and cache are bf16."""
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.from_preset("mf-test")).to(torch.bfloat16)
    q = quantize_model(model, tables="int8")
    parts = model_bench.decode_bytes(model.config, 10, weights="int8", float_bytes=2)
    assert parts["weights"] + parts["vectors"] == read_per_token(q)
    assert parts["vectors"] == 2 * ((3 * 64 + 96 + 64) * 4 + (64 + 64 + 96 + 96) * 2) + (64 + 64) * 2
    assert parts["kv_cache"] == KV  # 2 layers at half the bytes


def test_bound_seconds() -> None:
    parts = {"weights": 4e9, "kv_cache": 1e9, "vectors": 0, "head": 1e9, "total": 6e9}
    assert model_bench.bound_seconds(parts, 2e9, 4e9) == pytest.approx(2.0 + 0.5)  # rows gathered, rest streamed
    assert model_bench.bound_seconds(parts, None, 4e9) == pytest.approx(1.5)  # dense: all streamed


def test_filled_table_shape() -> None:
    table = model_bench._filled_table(1, 128, huge_pages=False)  # 1 MB of 512-byte rows
    assert table.shape == (2048, 128) and table.dtype == torch.float32 and bool((table == 1).all())


# ---- scaling_cost.py ------------------------------------------------------------------------------------


def sweep_rows(ratios: list[float], sweep: str = "batch", head: bool = False) -> list[dict]:
    return [{"sweep": sweep, "batch": 2**i, "context": 128, "tokens": 2**i, "head": head, "mf_ms": r,
             "dense_ms": 1.0, "ratio": r} for i, r in enumerate(ratios)]


def test_crossing() -> None:
    assert scaling_cost.crossing(sweep_rows([0.5, 0.8, 1.2, 2.0]), "batch") == "crosses between batch=2 and batch=4"
    assert scaling_cost.crossing(sweep_rows([0.5, 0.9]), "batch") == "MemoryFormer faster at every point"
    assert scaling_cost.crossing(sweep_rows([1.5, 1.1]), "batch") == "dense faster at every point"
    assert scaling_cost.crossing([], "batch") == "no points"
    rows = sweep_rows([2.0, 0.5], head=True) + sweep_rows([0.5], sweep="context")
    assert [r["batch"] for r in scaling_cost.series(rows[::-1], "batch", True)] == [1, 2]


def test_scaling_cost_writes_without_matplotlib(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(scaling_cost, "RESULTS", tmp_path)
    scaling_cost.write(sweep_rows([0.5, 2.0]), ("mf-x", "dense-x"), "scaling_cost")
    out = capsys.readouterr().out
    assert "matplotlib is not installed: plots skipped" in out and "Traceback" not in out
    payload = json.loads((tmp_path / "scaling_cost.json").read_text())
    assert payload["plots"] == [] and payload["crossings"] == {"batch, blocks": "crosses between batch=1 and batch=2"}
    assert not list(tmp_path.glob("*.png")) and "crosses between" in (tmp_path / "scaling_cost.md").read_text()


def test_scaling_cost_plots(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    rows = sweep_rows([0.5, 2.0]) + sweep_rows([0.5, 0.6], head=True) + sweep_rows([3.0, 1.0], sweep="train")
    for r in rows[-2:]:
        r["tokens"] *= 128
    paths = scaling_cost.plot(rows, ("mf-x", "dense-x"), tmp_path, "s")
    assert [p.name for p in paths] == ["s_batch.png", "s_train.png"]  # no context points: no plot
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_results_record_the_machine_speed(tmp_path, monkeypatch) -> None:
    """write_results keeps the VM's matmul and copy rates of the moment; the summary shows them, and
    'not recorded' for files written before."""
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "machine_speed", lambda: {"matmul_gflops": 59.0, "copy_gb_s": 18.5})
    common.write_results("layer", [layer_row(1, "fwd", 0.1)], [("ratio", "ratio")], title="t")
    payload = json.loads((tmp_path / "layer.json").read_text())
    assert payload["machine"]["speed"] == {"matmul_gflops": 59.0, "copy_gb_s": 18.5}
    assert "Machine speed when written: 59.0 GFLOP/s fp32 matmul, 18.5 GB/s copy" in (tmp_path / "layer.md").read_text()
    write(tmp_path, "precision", [])
    text, summary = run_all.build_summary(tmp_path)
    assert summary["sources"]["layer"]["speed"] == "59.0 GFLOP/s fp32 matmul, 18.5 GB/s copy"
    assert "| 59.0 GFLOP/s fp32 matmul, 18.5 GB/s copy |" in text and "| not recorded |" in text


def test_machine_speed_measures_positive_rates() -> None:
    speed = common.machine_speed()
    assert set(speed) == {"matmul_gflops", "copy_gb_s"} and all(v > 0 for v in speed.values())


def test_results_name_the_cpu_behind_the_model_name(tmp_path, monkeypatch) -> None:
    """The machine record's CPU details: the results' Machine line and the summary show them, and a
    record without them still reads."""
    record = {**MACHINE, "cpu_family": "26", "cpu_model": "2", "cpu_capability": "AVX512",
              "cpu_flags": ["avx2", "avx512f"], "l2_kib": 1024, "l3_kib": 39424}
    line = "Test CPU (family 26 model 2, AVX512, avx2 avx512f, L2 1 MiB, L3 38.5 MiB), 2 threads, torch 9.9.9"
    assert run_all.describe_machine(record) == line
    assert run_all.describe_machine({**MACHINE, "l2_kib": 512}) == "Test CPU (L2 512 KiB), 2 threads, torch 9.9.9"
    assert run_all.describe_machine(MACHINE) == "Test CPU, 2 threads, torch 9.9.9"
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(common, "machine", lambda: record)
    monkeypatch.setattr(common, "machine_speed", lambda: {"matmul_gflops": 1.0, "copy_gb_s": 1.0})
    common.write_results("layer", [layer_row(1, "fwd", 0.1)], [("ratio", "ratio")], title="t")
    assert f"Machine: {line}  " in (tmp_path / "results" / "layer.md").read_text()
    text, summary = run_all.build_summary(tmp_path / "results")
    assert summary["sources"]["layer"]["machine"] == line


def _fake_host(root: Path, cpuinfo: str, caches: dict[str, tuple[str, str, str]]) -> Path:
    (root / "proc").mkdir(parents=True)
    (root / "proc" / "cpuinfo").write_text(cpuinfo)
    for name, fields in caches.items():
        index = root / "sys/devices/system/cpu/cpu0/cache" / name
        index.mkdir(parents=True)
        for key, value in zip(("level", "type", "size"), fields, strict=True):
            if value is not None:
                (index / key).write_text(value + "\n")
    return root


def test_cpu_details_reads_the_first_processor_and_cpu0_caches(tmp_path) -> None:
    x86 = ("processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
           "processor\t: 1\ncpu family\t: 99\nmodel\t\t: 9\nflags\t\t: fpu\n")
    root = _fake_host(tmp_path / "x86", x86, {"index0": ("1", "Data", "48K"), "index1": ("1", "Instruction", "32K"),
                                               "index2": ("2", "Unified", "1024K"), "index3": ("3", "Unified", "32M")})
    details = common.cpu_details(root)
    assert details["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert {k: v for k, v in details.items() if k != "cpu_capability"} == {
        "cpu_family": "26", "cpu_model": "2", "cpu_flags": ["avx2", "avx512f", "avx512_bf16"],
        "l2_kib": 1024, "l3_kib": 32768}
    # an ARM host: no family, no x86 flags; a missing size file and a size it cannot parse are left out
    arm = "processor\t: 0\nFeatures\t: fp asimd\nCPU part\t: 0xd0c\n"
    root = _fake_host(tmp_path / "arm", arm, {"index2": ("2", "Unified", None), "index3": ("3", "Unified", "lots")})
    assert set(common.cpu_details(root)) == {"cpu_capability"}
    assert set(common.cpu_details(tmp_path / "nothing-here")) == {"cpu_capability"}
