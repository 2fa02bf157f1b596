"""benchmarks/official_kernels.py and its run_all entry, without the official sources: no timing asserted.

The official kernels are stood in for by PyTorch functions with their semantics (int32 codes of the chunk's
sign bits, first element the most significant; the gather only on whole blocks of 64 tokens), and the
build path by a source that fails to compile, which the compiler rejects at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import official_kernels  # noqa: E402
import run_all  # noqa: E402

SCRIPT = BENCHMARKS / "official_kernels.py"


# ---- padding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 63, 64, 65, 100, 128, 129])
def test_pad_rows_to_a_multiple_of_64(n: int) -> None:
    x = torch.randn(n, 16)
    padded = official_kernels.pad_rows(x)
    total = -(-n // 64) * 64
    assert padded.shape == (total, 16) and official_kernels.padded_rows(n) == total
    assert torch.equal(padded[:n], x) and not padded[n:].any()
    assert (padded.data_ptr() == x.data_ptr()) == (n % 64 == 0)  # no copy when nothing is padded


# ---- the pipeline, on stand-in kernels --------------------------------------------------------------------


def fake_code_score(z: torch.Tensor, codes: torch.Tensor, scores: torch.Tensor, *, msb_first: bool = True) -> None:
    """compute_code_score's semantics: z (B, K, tau) -> codes (B, K) int32, scores (B, K) = l1 * prod sigmoid."""
    tau = z.shape[-1]
    place = 2 ** torch.arange(tau - 1, -1, -1) if msb_first else 2 ** torch.arange(tau)
    codes.copy_(((z > 0).long() * place).sum(-1))
    a = z.abs()
    scores.copy_(a.sum(-1) / torch.prod(1 + torch.exp(-2 * a), dim=-1))


def fake_gather(indexes: torch.Tensor, source: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weighted_vector_gather_add_avx2_par's semantics: (B, K) int32 rows, weights -> (B, out); B % 64 == 0."""
    assert indexes.dtype == torch.int32 and indexes.shape[0] % 64 == 0, "the official gather has no tail loop"
    return (source[indexes.long()] * weights[..., None]).sum(1)


def fake_functions(**code_score_kwargs) -> dict:
    return {"compute_code_score": lambda z, c, s: fake_code_score(z, c, s, **code_score_kwargs),
            "weighted_vector_gather_add_avx2_par": fake_gather}


def test_official_pipeline_matches_our_layer() -> None:
    torch.manual_seed(0)
    forward = official_kernels.official_layer(fake_functions(), official_kernels.TAU)
    for n in (1, 64, 100):
        ours, theirs, err = official_kernels.make_case(forward, 32, n)
        assert ours().shape == theirs().shape == (n, 32)
        assert err <= official_kernels.TOLERANCE


def test_measure_rows_and_max_row(capsys) -> None:
    args = official_kernels.parse_args(["--official-src", "unused", "--d", "16", "--n", "1", "65", "--rounds", "1"])
    rows = official_kernels.measure(official_kernels.official_layer(fake_functions(), official_kernels.TAU), args)
    assert [(r.get("case"), r["d"], r["n"], r["n_padded"]) for r in rows[:2]] == [(None, 16, 1, 64), (None, 16, 65, 128)]
    worst = rows[-1]
    assert worst["case"] == official_kernels.MAX_CASE
    assert worst["ratio"] == max(r["ratio"] for r in rows[:2])
    assert worst["max_rel_err"] == max(r["max_rel_err"] for r in rows[:2])
    assert all(r["ours_ms"] > 0 and r["official_ms"] > 0 for r in rows)
    assert "N pad" in capsys.readouterr().out


def test_different_outputs_are_not_timed() -> None:
    args = official_kernels.parse_args(["--d", "16", "--n", "64", "--rounds", "1"])
    wrong = official_kernels.official_layer(fake_functions(msb_first=False), official_kernels.TAU)
    with pytest.raises(official_kernels.OfficialError, match="differ by"):
        official_kernels.measure(wrong, args)


def test_quick_and_default_sizes() -> None:
    quick = official_kernels.parse_args(["--quick"])
    assert (quick.d, quick.n, quick.rounds) == ([512], [1, 100, 2048], 1)
    full = official_kernels.parse_args(["--n", "8"])
    assert (full.d, full.n, full.rounds) == ([512, 1024], [8], 5)
    for bad in (["--d", "12"], ["--n", "0"], ["--rounds", "0"]):
        with pytest.raises(official_kernels.OfficialError, match="must be positive"):
            official_kernels.check_sizes(official_kernels.parse_args(bad))


# ---- the official sources: checks, flags, commit ----------------------------------------------------------


def fake_checkout(root: Path, source: str = "this is not C++\n", flags: str = 'extra_cflags=["-O1"]') -> Path:
    """The files official_kernels.py reads, each kernel.py with one load(...) call."""
    for kernel in official_kernels.OFFICIAL:
        (root / kernel.source).parent.mkdir(parents=True, exist_ok=True)
        (root / kernel.source).write_text(source)
        (root / kernel.loader).write_text(f"from torch.utils.cpp_extension import load\n"
                                          f"m = load('{kernel.name}', ['src.cc'], {flags}, verbose=True)\n")
    return root


def test_check_sources(tmp_path) -> None:
    with pytest.raises(official_kernels.OfficialError, match="required.*git clone"):
        official_kernels.check_sources(None)
    with pytest.raises(official_kernels.OfficialError, match="no such directory"):
        official_kernels.check_sources(tmp_path / "absent")
    with pytest.raises(official_kernels.OfficialError, match="compute_code_score/torch_extension.cc is missing"):
        official_kernels.check_sources(tmp_path)
    assert official_kernels.check_sources(fake_checkout(tmp_path)) == tmp_path.resolve()


def test_read_flags(tmp_path) -> None:
    loader = tmp_path / "kernel.py"
    loader.write_text("x = load('a', ['s.cc'], extra_cflags=['-fopenmp', '-O3'], extra_ldflags=['-lgomp'])\n")
    assert official_kernels.read_flags(loader) == {"cflags": ["-fopenmp", "-O3"], "ldflags": ["-lgomp"]}
    for text in ("x = load('a', ['s.cc'])\n", "x = load('a', extra_cflags=FLAGS)\n", "def (\n"):
        loader.write_text(text)
        with pytest.raises(official_kernels.OfficialError, match="cannot read"):
            official_kernels.read_flags(loader)


def test_official_commit(tmp_path) -> None:
    assert official_kernels.official_commit(tmp_path) == "unknown"  # not a git checkout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    try:
        subprocess.run([*git, "init", "-q"], check=True)
        (tmp_path / "f").write_text("x")
        subprocess.run([*git, "add", "f"], check=True)
        subprocess.run([*git, "commit", "-qm", "x"], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no working git here")
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert official_kernels.official_commit(tmp_path) == head
    (tmp_path / "sub").mkdir()
    assert official_kernels.official_commit(tmp_path / "sub") == "unknown"  # inside a checkout, not its top


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if "error:" in line]


@pytest.mark.parametrize("case", ["missing", "absent", "not a checkout"])
def test_bad_official_src_gives_one_line(tmp_path, case: str) -> None:
    args = {"missing": [], "absent": ["--official-src", str(tmp_path / "absent")],
            "not a checkout": ["--official-src", str(tmp_path)]}[case]
    result = run_script(*args, "--build-dir", str(tmp_path / "build"))
    lines = error_lines(result)
    assert len(lines) == 1 and result.stderr.strip() == lines[0], result.stderr
    assert lines[0].startswith("official_kernels.py: error: --official-src") and "git clone" in lines[0]
    assert not (tmp_path / "build").exists()


def test_failed_compile_gives_one_line(tmp_path) -> None:
    root = fake_checkout(tmp_path / "src")
    result = run_script("--official-src", str(root), "--build-dir", str(tmp_path / "build"))
    lines = error_lines(result)
    assert len(lines) == 1 and result.stderr.strip().splitlines()[-1] == lines[0], result.stderr
    assert lines[0].startswith("official_kernels.py: error: could not build the official ccs_cpu from ")


# ---- run_all: pass-through and skip -----------------------------------------------------------------------


@pytest.fixture
def fake_runs(tmp_path, monkeypatch) -> list[run_all.Bench]:
    """run_all writing into tmp_path, its run_bench recording the benches it is given."""
    calls: list[run_all.Bench] = []

    def fake_run(b: run_all.Bench, quick: bool) -> run_all.RunResult:
        calls.append(b)
        return run_all.RunResult(b.name, f"python {b.script} {' '.join(b.args)}", 0, 1.0)

    monkeypatch.setattr(run_all, "RESULTS", tmp_path)
    monkeypatch.setattr(run_all, "run_bench", fake_run)
    return calls


def test_run_all_skips_without_official_src(tmp_path, fake_runs) -> None:
    assert run_all.main(["--only", "official_kernels", "layer"]) == 0
    assert [b.name for b in fake_runs] == ["layer"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == [] and summary["runs"][0]["skipped"].startswith("not run: it needs --official-src")
    lines = [line for line in (tmp_path / "SUMMARY.md").read_text().splitlines() if "skipped" in line]
    assert lines == ["| official_kernels | not run: it needs --official-src DIR, a checkout of "
                     "https://github.com/C0-Design/MemoryFormer | skipped | |"]


def test_run_all_passes_official_src_through(tmp_path, fake_runs, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_all.main(["--only", "official_kernels", "--official-src", "checkout"]) == 0
    checkout = str((tmp_path / "checkout").resolve())
    assert [(b.name, b.args) for b in fake_runs] == [("official_kernels", ("--official-src", checkout))]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["command"] == "python benchmarks/run_all.py --only official_kernels --official-src checkout"
    argv = run_all.bench_command(fake_runs[0], quick=True)  # reads the real script's flags
    assert argv[1:] == ["benchmarks/official_kernels.py", "--official-src", checkout, "--quick"]


def test_run_all_summary_only_takes_no_official_src(capsys) -> None:
    with pytest.raises(SystemExit):
        run_all.main(["--summary-only", "--official-src", "x"])
    assert "drop --quick, --bf16, --only and --official-src" in capsys.readouterr().err


def test_target_k_reads_the_max_row(tmp_path) -> None:
    row = {"d": 1024, "n": 64, "n_padded": 64, "ours_ms": 0.9, "official_ms": 1.0, "ratio": 0.9, "max_rel_err": 1e-7}
    payload = {"rows": [row, {**row, "ratio": 0.5}, {"case": official_kernels.MAX_CASE, **row}]}
    (tmp_path / "official_kernels.json").write_text(json.dumps(payload))
    target = [r for r in run_all.targets(run_all.load_results(tmp_path)) if r["key"] == "k"]
    assert [(t["status"], t["value"], t["measured"]) for t in target] == [("MET", 0.9, "0.9 (ours 0.9 ms, official 1 ms)")]
    payload["rows"][-1]["ratio"] = 1.01
    (tmp_path / "official_kernels.json").write_text(json.dumps(payload))
    assert [r["status"] for r in run_all.targets(run_all.load_results(tmp_path)) if r["key"] == "k"] == ["MISSED"]


def test_inputs_have_no_exact_zeros(monkeypatch) -> None:
    """Their CPU hash gives 0.0 the bit 0 and ours the bit 1: the benchmark's inputs avoid exact zeros."""
    def ones_and_zeros(*shape, **kw):  # every chunk's first element 0.0: its bit decides the row
        x = torch.ones(*shape, **kw)
        x[:, ::official_kernels.TAU] = 0.0
        return x

    monkeypatch.setattr(torch, "randn", ones_and_zeros)
    forward = official_kernels.official_layer(fake_functions(), official_kernels.TAU)
    _, _, err = official_kernels.make_case(forward, 16, 64)
    assert err <= official_kernels.TOLERANCE
