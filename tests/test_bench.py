"""benchmarks/run_all.py (targets, summary, runs) and `memoryformer bench`, on fake results: no timing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from memoryformer import cli
from memoryformer.commands import bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import run_all  # noqa: E402

MACHINE = {"cpu": "Test CPU", "torch_threads": 2, "torch": "9.9.9"}


def layer_row(n: int, mode: str, ratio: float, dtype: str = "fp32", d: int = 1024) -> dict:
    return {"d": d, "n": n, "mode": mode, "dtype": dtype, "cold": n == 1, "linear_ms": 1.0,
            "memory_ms": ratio, "ratio": ratio}


def model_row(head: bool, ratio: float, case: str = "decode b=1 ctx=128") -> dict:
    return {"case": case, "head": head, "mf_ms": 10.0 * ratio, "dense_ms": 10.0, "ratio": ratio}


def write(results: Path, stem: str, rows: list[dict] | None = None, title: str = "", **extra) -> None:
    results.mkdir(parents=True, exist_ok=True)
    payload = {"command": f"python benchmarks/{stem}.py", "machine": MACHINE, "date": "2000-01-01 00:00 UTC",
               **extra, **({} if rows is None else {"rows": rows})}
    (results / f"{stem}.json").write_text(json.dumps(payload))
    (results / f"{stem}.md").write_text(f"# {title or stem}\n\n| x |\n|---|\n| {stem} |\n")


def fake_results(results: Path) -> None:
    """a MET (0.2 is at the limit), b MISSED, c MET, d MISSED; precision: bf16 MET/MET, int8 MET/MISSED."""
    write(results, "layer", [layer_row(1, "fwd", 0.2), layer_row(1, "fwd", 0.01, dtype="bf16"),
                             layer_row(2048, "fwd+bwd", 1.2), layer_row(2048, "fwd", 1.3),
                             layer_row(2048, "fwd", 0.5, d=512)], title="MemoryLayer vs nn.Linear")
    write(results, "model_tiny_fp32", [model_row(True, 0.8), model_row(False, 0.6),
                                       model_row(False, 0.01, case="decode b=8 ctx=128")],
          title="mf-tiny vs pythia")
    write(results, "precision", [precision_row("fp32", 0.0, 0.0, None, 0.0),
                                 precision_row("bf16-tables", 5e-3, 2e-3, 1e-2, -0.02),
                                 precision_row("int8-tables", 3e-2, 1e-2, 2e-2, 0.5),
                                 precision_row("int8-head", 0.5, 0.5, None, 9.0),
                                 precision_row("int8-tables+int8-head", 0.5, 0.5, None, 9.0)])


def precision_row(option: str, rel_l2: float, layer: float, target: float | None, ppl_delta: float) -> dict:
    """A row as benchmarks/precision.py writes it (memoryformer.inference.quantize.precision_report)."""
    return {"option": option, "rel_l2_err": rel_l2, "layer_rel_err": layer, "mean_rel_err": rel_l2 / 2,
            "ppl_delta": ppl_delta, "ppl_delta_rel": ppl_delta / 10, "target": target}


def test_targets_met_and_missed(tmp_path) -> None:
    fake_results(tmp_path)
    rows = run_all.targets(run_all.load_results(tmp_path))
    assert [(r["key"], r["status"]) for r in rows] == [
        ("a", "MET"), ("b", "MISSED"), ("b", "reported"), ("c", "MET"), ("d", "MISSED"), ("f", "NO DATA"),
        ("e", "MET"), ("e", "MET"), ("e", "MET"), ("e", "MISSED")]
    # the fp32 d = 1024 rows; per layer then whole model for bf16, then int8 (head rows ignored)
    assert [r["value"] for r in rows] == [0.2, 0.6, 0.8, 1.2, 1.3, None, 2e-3, 5e-3, 1e-2, 3e-2]
    assert rows[0]["measured"] == "0.2 (MemoryLayer 0.2 ms, Linear 1 ms)"
    assert rows[1]["measured"] == "0.6 (MF 6 ms, dense 10 ms)"
    assert rows[7]["measured"] == "0.005; perplexity change -0.02 (-0.2%)"
    assert rows[7]["ppl_delta"] == -0.02 and rows[9]["limit"] == 2e-2


def test_status_boundaries() -> None:
    assert run_all.status(0.15, 0.15) == "MET"
    assert run_all.status(0.1500001, 0.15) == "MISSED"
    assert run_all.status(float("nan"), 0.15) == "NO DATA"
    assert run_all.status(None, 0.15) == "NO DATA"
    assert run_all.status(3.0, None) == "reported"


def test_missing_files_and_rows(tmp_path) -> None:
    write(tmp_path, "layer", [layer_row(1, "fwd", 0.1)])  # no N = 2048 rows, no model or precision file
    rows = run_all.targets(run_all.load_results(tmp_path))
    assert [r["status"] for r in rows] == ["MET"] + ["NO DATA"] * 9
    assert rows[1]["measured"] == "no model_tiny_fp32.json" and "no row" in rows[3]["measured"]
    assert rows[5]["measured"] == "no official_kernels.json" and rows[6]["measured"] == "no precision.json"
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
    assert run_all.main(["--summary-only", "--results-dir", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().err
    text = (tmp_path / "SUMMARY.md").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["command"] == f"python benchmarks/run_all.py --summary-only --results-dir {tmp_path}"
    assert summary["machines"] == ["Test CPU, 2 threads, torch 9.9.9"] and summary["runs"] is None
    statuses = ["MET", "MISSED", "reported", "MET", "MISSED", "NO DATA", "MET", "MET", "MET", "MISSED"]
    assert [r["status"] for r in summary["targets"]] == statuses
    assert "Test CPU, 2 threads, torch 9.9.9" in text and summary["command"] in text
    assert "No benchmark was run" in text
    assert "| a | " in text and "| MISSED |" in text and "## Runs" not in text
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == ["## Targets", "## Sources", "## MemoryLayer vs nn.Linear", "## mf-tiny vs pythia",
                      "## mf-demo vs pythia-demo", "## precision", "## another"]  # included, in order
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


def test_selection(tmp_path) -> None:
    args = argparse.Namespace(only=None, bf16=False)
    (tmp_path / "layer.py").touch()
    (tmp_path / "model.py").touch()
    assert [b.name for b in run_all.selected(args, tmp_path)] == ["layer", "model_tiny"]  # no precision.py
    (tmp_path / "precision.py").touch()
    args.bf16 = True
    names = [b.name for b in run_all.selected(args, tmp_path)]
    assert names == ["layer", "model_tiny", "model_tiny_bf16", "precision"]
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
