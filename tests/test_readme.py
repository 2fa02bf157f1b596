"""The README works as written: every command it prints is extracted and either run for real (the
cheap ones, in a scratch folder holding a tiny `runs/demo/memoryformer` and `runs/demo/dense` made
here, with the tasks' Hugging Face datasets redirected to small local files) or at least parsed by its
own argparse, with the files it reads being ones that an earlier README command writes."""

from __future__ import annotations

import ast
import codecs
import random
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
from test_tasks import redirect_hub

from memoryformer import LanguageModel, ModelConfig
from memoryformer.cli import build_parser, main
from memoryformer.data.tokenizer import train_bpe
from memoryformer.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN = {"eval", "generate", "export", "flops"}  # verbs cheap enough to run for real on the tiny models
PARSE_ONLY = {"demo", "prepare", "train", "reproduce", "bench", "convert"}
DEMO_OUTPUTS = ("runs/demo", "runs/demo/memoryformer", "runs/demo/dense", "runs/demo/data")  # made here, as the demo would


def _ansi_c(match: re.Match) -> str:
    """bash's $'...' quoting -> an ordinary single-quoted shell word."""
    return shlex.quote(codecs.decode(match.group(1), "unicode_escape"))


def readme_commands(text: str) -> list[list[str]]:
    """Every command of the README: lines of ```bash blocks, `$ ` lines of other blocks, and inline code
    that starts with `memoryformer ` or `python ` (outside tables); continuations joined, comments dropped,
    `&&` split."""
    lines: list[str] = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        for line in body.replace("\\\n", " ").splitlines():
            if lang == "bash":
                lines.append(line)
            elif line.startswith("$ "):
                lines.append(line[2:])
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = "\n".join(line for line in prose.splitlines() if not line.startswith("|"))  # table labels
    lines += [span for span in re.findall(r"`((?:memoryformer|python) [^`]+)`", prose)
              if span != "python -m memoryformer.hf"]  # prose naming the lm-eval entry point, not a command
    commands = []
    for line in lines:
        for part in re.sub(r"\$'((?:[^'\\]|\\.)*)'", _ansi_c, line).split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                commands.append(words)
    return commands


def test_readme_opening_is_two_set_up_commands():
    """A fresh machine needs exactly two commands: one runs the main job, one runs the tests."""
    first = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    commands = [shlex.split(line, comments=True) for line in first.strip().splitlines()]
    assert commands == [["bash", "scripts/install.sh", "&&", "memoryformer", "demo"],
                        ["bash", "scripts/install.sh", "&&", "python", "-m", "pytest", "-q"]]
    assert (ROOT / "scripts" / "install.sh").is_file()


def test_readme_mentions_no_folder_users_do_not_have():
    text = README.read_text()
    assert "../shared" not in text and "/work/" not in text
    for words in readme_commands(text):
        assert "..." not in words, words


def test_python_examples_run():
    for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S):
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102


def test_gitignore_covers_what_the_commands_write():
    ignored = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
    written = {_written(words)[0].split("/")[0] for words in readme_commands(README.read_text()) if _written(words)}
    assert written, "no command writes anything?"
    assert written <= ignored, written - ignored


# ---- running them ------------------------------------------------------------------------------------------

def _written(words: list[str]) -> list[str]:
    """The paths a memoryformer command writes (its --out, --write-lm-eval-tasks, --plot)."""
    if words[:1] != ["memoryformer"]:
        return []
    if words[1:2] == ["demo"]:
        return list(DEMO_OUTPUTS)
    out = []
    for flag in ("--out", "--write-lm-eval-tasks", "--plot"):
        if flag in words:
            out.append(words[words.index(flag) + 1])
    return out


def _read(words: list[str]) -> list[str]:
    """The local paths a command reads."""
    paths = []
    flags = ("--model", "--data", "--ppl") if words[0] == "memoryformer" else ("--include_path",)
    for flag in flags:
        if flag in words:
            paths.append(words[words.index(flag) + 1])
    if words[1:2] == ["export"]:
        paths.append(words[2])
    if words[1:2] == ["train"] and "--resume" in words:
        paths.append(words[words.index("--out") + 1])
    if "--model_args" in words:
        args = dict(kv.split("=", 1) for kv in words[words.index("--model_args") + 1].split(","))
        paths.append(args["pretrained"])
    return [p for p in paths if not p.startswith("-")]


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A folder as after `memoryformer demo`: tiny runs/demo/{memoryformer,dense}; the hub redirected."""
    rng = random.Random(0)
    words = "the a cat dog sat on mat def main ( ) : import os return".split()
    tokenizer = train_bpe([" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)], vocab_size=300)
    for arm, preset in (("memoryformer", "mf-test"), ("dense", "pythia-test")):
        torch.manual_seed(0)
        model = LanguageModel(ModelConfig.from_preset(preset, vocab_size=320, max_seq_len=128))
        run = tmp_path / "runs" / "demo" / arm
        run.mkdir(parents=True)
        model.config.to_json(run / "config.json")
        tokenizer.save(str(run / "tokenizer.json"))
        checkpoint.save_model_weights(model, run / "model.safetensors")
    shutil.copy(README, tmp_path / "README.md")
    redirect_hub(tmp_path / ".hub", monkeypatch)
    cache = tmp_path / ".hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(cache / "modules"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _lm_eval(words: list[str]) -> None:
    """`python -m memoryformer.hf ...` or `lm_eval ...`, in this process, on the CPU."""
    import memoryformer.integrations.hf as hf

    args = [*words, "--device", "cpu", "--batch_size", "4", "--limit", "2"]
    if words[0] == "lm_eval":
        from lm_eval.__main__ import cli_evaluate

        saved, sys.argv = sys.argv, args
        try:
            cli_evaluate()
        finally:
            sys.argv = saved
    else:
        hf.main(args[3:])


def test_every_readme_command_runs_or_parses(scratch, capsys):
    pytest.importorskip("lm_eval")
    written = set(DEMO_OUTPUTS) | {"README.md"}
    ran, parsed = [], []
    for words in readme_commands(README.read_text()):
        if words[0] == "torchrun":
            words = ["memoryformer", *words[words.index("memoryformer.cli") + 1:]]
        for path in _read(words):
            assert path in written or Path(path).exists(), f"{shlex.join(words)} reads {path}: nothing writes it"
        if words[:3] == ["python", "-m", "memoryformer.hf"] or words[0] == "lm_eval":
            _lm_eval(words)
            ran.append(words)
        elif words[0] == "memoryformer" and words[1] in RUN:
            assert main(words[1:]) == 0, (shlex.join(words), capsys.readouterr().err[-2000:])
            ran.append(words)
        elif words[0] == "memoryformer":
            assert words[1] in PARSE_ONLY, words
            build_parser(only=words[1]).parse_args(words[1:])  # argparse exits (failing the test) on an error
            parsed.append(words)
        else:
            _check_other(words)
        written.update(_written(words))
    verbs = {w[1] for w in ran if w[0] == "memoryformer"}
    assert verbs == RUN and len([w for w in ran if w[0] != "memoryformer"]) == 2
    assert {w[1] for w in parsed} == PARSE_ONLY
    assert (scratch / "hf" / "mf-demo" / "modeling_memoryformer.py").is_file()
    assert (scratch / "lm_tasks" / "mf_wsc273.yaml").is_file()
    assert (scratch / "fig1.png").is_file()


def _check_other(words: list[str]) -> None:
    """install.sh, pytest, ruff and the benchmark scripts: named files exist; nothing else runs."""
    if words[0] == "bash":
        assert (ROOT / words[1]).is_file(), words
    elif words[:3] == ["python", "-m", "pytest"] or words[:2] == ["ruff", "check"]:
        pass
    elif words[0] == "python" and words[1].endswith(".py"):
        script = ROOT / words[1]
        assert script.is_file(), words
        flags = {w for w in words[2:] if w.startswith("--")}
        assert all(flag in script.read_text() for flag in flags), words
        ast.parse(script.read_text())
    else:
        raise AssertionError(f"the README runs a command this test does not know: {shlex.join(words)}")
