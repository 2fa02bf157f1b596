"""The main job's logic, at smoke-test size: both arms train on the same tokens and get compared; a stop
signal ends it with a resumable message and no summary; a rerun of a finished demo trains nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

import memoryformer.train
from memoryformer.cli import main

QUICK = ["demo", "--quick", "--no-progress", "--steps", "4"]


def assert_not_blank_png(path, min_width=400, min_height=250) -> None:
    """An image of a plausible size whose pixels are not all one colour."""
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] >= min_height and pixels.shape[1] >= min_width, pixels.shape
    assert pixels[..., :3].std() > 0.05, "the image is blank"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished quick demo: (its directory, what it printed)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    with pytest.MonkeyPatch.context():
        import contextlib
        import io

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main([*QUICK, "--out", str(out)]) == 0
    return out, printed.getvalue()


def test_demo_quick_end_to_end(finished):
    out, printed = finished
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
    assert_not_blank_png(out / "loss_curves.png")


def test_rerunning_a_finished_demo_does_not_train_again(finished, monkeypatch, capsys):
    out, _ = finished
    before = (out / "summary.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(memoryformer.train, "train", no_training)
    assert main([*QUICK, "--out", str(out)]) == 0
    assert "finished by an earlier run" in capsys.readouterr().out
    assert (out / "summary.md").read_text() == before  # the finished arms' rows, reused


def _fresh_run(finished, tmp_path):
    """A new demo directory holding only the finished demo's prepared data (no arm trained)."""
    out = tmp_path / "demo"
    shutil.copytree(finished[0] / "data", out / "data")
    return out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_during_an_arm_stops_the_demo(finished, tmp_path, monkeypatch, capsys, signum):
    """The first stop signal checkpoints the arm in training (train() does) and ends the demo: exit
    128 + signal, one line naming the command that continues, no summary, the other arm not started."""
    out = _fresh_run(finished, tmp_path)
    real_train, calls = memoryformer.train.train, []

    def train_then_signal(*args, **kwargs):
        calls.append(args[3])
        assert "memoryformer demo --out" in kwargs["resume_hint"]  # train's own stop line names it too
        result = real_train(*args, **kwargs, stop_at_step=2)
        result.interrupted = signal.Signals(signum).name  # what train() returns after a signal
        return result

    monkeypatch.setattr(memoryformer.train, "train", train_then_signal)
    code = main([*QUICK, "--out", str(out)])
    assert code == 128 + signum
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "--resume" not in err, err
    name = signal.Signals(signum).name
    assert last.startswith(f"memoryformer demo: stopped by {name} while training the memoryformer arm")
    assert f"memoryformer demo --out {out} --steps 4 --quick --no-progress" in last
    assert [str(p) for p in calls] == [str(out / "memoryformer")]
    assert not (out / "summary.json").exists() and not (out / "summary.md").exists()
    assert not (out / "dense").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_outside_training_stops_the_demo_too(finished, tmp_path, monkeypatch, capsys, signum):
    """A real signal between steps (here: while the first arm starts) gives the same one-line stop."""
    out = _fresh_run(finished, tmp_path)

    def signal_now(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler runs at the next bytecode boundary; the sleep is one, and is interrupted
        raise AssertionError("the signal should have stopped the demo")

    monkeypatch.setattr(memoryformer.train, "train", signal_now)
    assert main([*QUICK, "--out", str(out)]) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stopped by" in err[0] and "run `memoryformer demo" in err[0], err
    assert not (out / "summary.json").exists()
