"""Bad input to every verb this file covers (eval, generate, export, demo, flops, bench): missing,
unreadable or wrong-kind paths, truncated or unsafe weights, a missing device, a model too large for
the machine. Each gives one line `memoryformer VERB: error: ...` (never a traceback), exit code 1 (2 for
argparse), and leaves the files that were there unchanged."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
from pathlib import Path

import pytest
import torch

from memoryformer import LanguageModel, ModelConfig
from memoryformer.cli import main
from memoryformer.data.tokenizer import train_bpe
from memoryformer.integrations.hf import save_pretrained
from memoryformer.train import checkpoint, memory

WORDS = "the a cat dog sat on mat ran fast slow big small red blue water fire stone tree".split()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A run directory, an HF export of it, a text file and an empty directory."""
    root = tmp_path_factory.mktemp("faults")
    rng = random.Random(0)
    tokenizer = train_bpe([" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200)], vocab_size=300)
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig.from_preset("mf-test", vocab_size=320)).eval()
    run = root / "run"
    run.mkdir()
    model.config.to_json(run / "config.json")
    tokenizer.save(str(run / "tokenizer.json"))
    checkpoint.save_model_weights(model, run / "model.safetensors")
    save_pretrained(model, root / "hf", tokenizer)
    (root / "notes.txt").write_text("not a model\n")
    (root / "empty").mkdir()
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def copy_of(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def one_line_error(capsys, verb: str, code: int, expected_code: int = 1) -> str:
    """The single error line of a failed command, checked."""
    err = capsys.readouterr().err
    assert code == expected_code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"memoryformer {verb}: error: "), err
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1, err
    return lines[-1]


VERB_ARGS = {  # a model-reading command per verb, {model} replaced by the path under test
    "eval": ["eval", "--model", "{model}", "--ppl", "{text}", "--quiet"],
    "generate": ["generate", "--model", "{model}", "--prompt", "the cat", "--max-new-tokens", "2"],
    "export": ["export", "{model}", "--out", "{out}"],
}


def run_verb(verb: str, model: Path, root: Path, *extra: str) -> int:
    args = [a.format(model=model, text=root / "notes.txt", out=root / "out_dir") for a in VERB_ARGS[verb]]
    return main([*args, *extra])


@pytest.mark.parametrize("verb", sorted(VERB_ARGS))
@pytest.mark.parametrize("case", ["missing", "text file", "empty directory", "dangling link"])
def test_a_bad_model_path_is_one_line(files, tmp_path, capsys, verb, case):
    root = copy_of(files, tmp_path / "files")
    model = {"missing": root / "nope", "text file": root / "notes.txt", "empty directory": root / "empty",
             "dangling link": root / "link"}[case]
    if case == "dangling link":
        model.symlink_to(root / "gone")
    before = snapshot(root)
    line = one_line_error(capsys, verb, run_verb(verb, model, root))
    assert str(model) in line or model.name in line, line
    assert snapshot(root) == before and not (root / "out_dir").exists()


@pytest.mark.parametrize("verb", sorted(VERB_ARGS))
@pytest.mark.parametrize("where", ["run", "hf"])
def test_truncated_weights_are_one_line(files, tmp_path, capsys, verb, where):
    root = copy_of(files, tmp_path / "files")
    weights = root / where / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(root)
    line = one_line_error(capsys, verb, run_verb(verb, root / where, root))
    assert "safetensors" in line, line
    assert snapshot(root) == before and not (root / "out_dir").exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


@pytest.mark.parametrize("verb", sorted(VERB_ARGS))
def test_a_malicious_pickle_in_an_hf_directory_is_refused_in_one_line(files, tmp_path, capsys, verb):
    root = copy_of(files, tmp_path / "files")
    (root / "hf" / "model.safetensors").unlink()
    with open(root / "hf" / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"model.embed.weight": _Exploit()}, handle, protocol=2)  # torch.load's own protocol
    before = snapshot(root)
    line = one_line_error(capsys, verb, run_verb(verb, root / "hf", root))
    assert "arbitrary code" in line and "refused" in line, line
    assert "weights_only" not in line and "will likely succeed" not in line
    assert snapshot(root) == before


@pytest.mark.parametrize("verb", ["eval", "generate"])
def test_a_missing_device_is_one_line(files, capsys, monkeypatch, verb):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = one_line_error(capsys, verb, run_verb(verb, files / "run", files, "--device", "cuda"))
    assert "CUDA is not available" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
@pytest.mark.parametrize("verb", sorted(VERB_ARGS))
def test_unreadable_weights_are_one_line(files, tmp_path, capsys, verb):
    root = copy_of(files, tmp_path / "files")
    (root / "run" / "model.safetensors").chmod(0)
    try:
        one_line_error(capsys, verb, run_verb(verb, root / "run", root))
    finally:
        (root / "run" / "model.safetensors").chmod(0o644)


def test_eval_bad_task_and_text_paths(files, capsys):
    run = str(files / "run")
    line = one_line_error(capsys, "eval", main(["eval", "--model", run, "--ppl", str(files / "missing.txt")]))
    assert "missing.txt" in line
    line = one_line_error(capsys, "eval", main(["eval", "--model", run, "--ppl", str(files / "empty")]))
    assert "empty" in line
    line = one_line_error(capsys, "eval", main(["eval", "--model", run, "--task", "piqa", "--data",
                                                str(files / "empty")]))
    assert "is a directory" in line
    line = one_line_error(capsys, "eval", main(["eval", "--model", run, "--task", "piqa", "--data-root",
                                                str(files / "notes.txt")]))
    assert "--data-root" in line and "not a directory" in line


def test_generate_bad_tokenizer_path(files, capsys):
    line = one_line_error(capsys, "generate", main(["generate", "--model", str(files / "run"), "--tokenizer",
                                                    str(files / "notes.txt"), "--prompt", "a"]))
    assert "notes.txt" in line or "tokenizer" in line.lower()


def test_export_out_is_a_file(files, tmp_path, capsys):
    root = copy_of(files, tmp_path / "files")
    before = snapshot(root)
    line = one_line_error(capsys, "export", main(["export", str(root / "run"), "--out", str(root / "notes.txt")]))
    assert "not a directory" in line
    line = one_line_error(capsys, "export", main(["export", str(root / "run"), "--out", str(root / "hf")]))
    assert "not empty" in line and "--force" in line
    assert snapshot(root) == before


def test_export_on_a_full_disk_leaves_nothing_behind(files, tmp_path, capsys, monkeypatch):
    """An export that cannot be written completely leaves neither --out nor a partial directory."""
    import errno

    from memoryformer.integrations import hf

    root = copy_of(files, tmp_path / "files")
    real = hf.save_pretrained

    def fill_disk(model, out, *args, **kwargs):
        real(model, out, *args, **kwargs)  # some files are written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(out) / "model.safetensors"))

    monkeypatch.setattr(hf, "save_pretrained", fill_disk)
    line = one_line_error(capsys, "export", main(["export", str(root / "run"), "--out", str(root / "new")]))
    assert "full" in line and "unchanged" in line
    assert not (root / "new").exists() and not list(root.glob(".new.*"))
    # --force over an existing export: the old one stays whole
    before = snapshot(root)
    line = one_line_error(capsys, "export", main(["export", str(root / "run"), "--out", str(root / "hf"),
                                                  "--force"]))
    assert snapshot(root) == before and not list(root.glob(".hf.*"))


def test_export_replaces_with_force_and_is_complete(files, tmp_path, capsys):
    from memoryformer.integrations.hf import load_any

    root = copy_of(files, tmp_path / "files")
    (root / "hf" / "stale.txt").write_text("from an older export")
    assert main(["export", str(root / "run"), "--out", str(root / "hf"), "--force"]) == 0
    assert not (root / "hf" / "stale.txt").exists() and not list(root.glob(".hf.*"))
    model, _ = load_any(root / "hf")
    reference, _ = load_any(root / "run")
    x = torch.randint(0, 320, (1, 5))
    torch.testing.assert_close(model(x)[0], reference(x)[0])


def test_a_model_too_large_for_memory_is_refused_before_loading(files, capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_ram", lambda: 1024)
    for verb in ("eval", "generate"):
        line = one_line_error(capsys, verb, run_verb(verb, files / "run", files))
        assert "needs about" in line and "GiB" in line and "RAM available" in line and "--force" in line
    assert run_verb("generate", files / "run", files, "--force") == 0


def test_train_refuses_a_preset_that_cannot_fit(tmp_path, capsys, monkeypatch):
    """mf-small (1.95B parameters) on a machine with 24 GiB available: refused at once, nothing built."""
    import memoryformer.core.model

    monkeypatch.setattr(memory, "available_ram", lambda: 24 * 2**30)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")

    from tiny_data import make_data

    data = make_data(tmp_path)
    monkeypatch.setattr(memoryformer.core.model.LanguageModel, "__init__", no_model)
    monkeypatch.setattr(memory, "count_values", lambda config: 1_945_920_000)  # the meta model needs __init__
    code = main(["train", "--preset", "mf-small", "--data", str(data), "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--batch-size", "4"])
    line = one_line_error(capsys, "train", code)
    assert "1,945.9M parameters" in line and "24.0 GiB of RAM available" in line and "--force" in line
    assert not (tmp_path / "run").exists()


def test_demo_out_is_a_file(files, tmp_path, capsys):
    target = tmp_path / "demo"
    target.write_text("a file, not a directory\n")
    line = one_line_error(capsys, "demo", main(["demo", "--quick", "--no-progress", "--out", str(target)]))
    assert "demo" in line
    assert target.read_text() == "a file, not a directory\n"


def test_flops_plot_into_a_missing_folder(tmp_path, capsys):
    line = one_line_error(capsys, "flops", main(["flops", "--no-params", "--plot",
                                                 str(tmp_path / "no" / "such" / "fig.png")]))
    assert "fig.png" in line or "no/such" in line
    line = one_line_error(capsys, "flops", main(["flops", "--no-params", "--plot", str(tmp_path)]))
    assert str(tmp_path) in line


def test_bench_results_dir_is_a_file(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("a file\n")
    line = one_line_error(capsys, "bench", main(["bench", "--summary-only", "--results-dir", str(target)]))
    assert "results" in line
    assert target.read_text() == "a file\n"


@pytest.mark.parametrize("verb", sorted(VERB_ARGS))
def test_truncated_weights_beside_a_valid_checkpoint_never_give_a_traceback(files, tmp_path, capsys, verb):
    """The run's model.safetensors is truncated but a valid checkpoint exists: loading may fall back to
    the checkpoint (and succeed) or refuse; either way no traceback, and a refusal is one line."""
    root = copy_of(files, tmp_path / "files")
    model, _ = checkpoint.load_model(root / "run")
    checkpoint.save_checkpoint(checkpoint.checkpoint_path(root / "run", 5),
                               {"step": 5, "model": model.state_dict(), "model_config": model.config.to_dict()})
    weights = root / "run" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = snapshot(root)
    code = run_verb(verb, root / "run", root)
    if code != 0:
        one_line_error(capsys, verb, code)
    else:
        assert "Traceback" not in capsys.readouterr().err
    assert {k: v for k, v in snapshot(root).items() if not k.startswith("out_dir")} == before
