"""What survives faults: kill -9, signals during a save, two runs on one --out, damaged files,
NaN losses, a file as --out, a full disk. Each checks the message, the exit code and that no
existing checkpoint changed (docs/training.md, "What survives an interruption")."""

from __future__ import annotations

import csv
import hashlib
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_data import make_data

from memoryformer.cli import main
from memoryformer.core.config import ModelConfig
from memoryformer.train import TrainConfig, train
from memoryformer.train import checkpoint as ckpt
from memoryformer.train.lock import RunLock, RunLockedError

MODEL = ["--preset", "mf-test", "--vocab-size", "300"]
QUIET = ["--no-progress", "--no-tensorboard", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("fault_data"))


def tiny_config() -> ModelConfig:
    return ModelConfig.from_preset("mf-test", vocab_size=300)


def tiny_train(**changes) -> TrainConfig:
    base = dict(batch_size=2, seq_len=16, max_steps=6, eval_every=0, eval_batches=1, log_every=1, ckpt_every=2,
                keep_last=0, tensorboard=False, device="cpu", precision="fp32", ckpt_every_minutes=0)
    return TrainConfig(**{**base, **changes})


def run_args(data_dir, out, *extra: str) -> list[str]:
    return ["train", *MODEL, "--data", str(data_dir), "--out", str(out), "--batch-size", "2", "--seq-len", "16",
            "--eval-every", "0", "--eval-batches", "1", "--log-every", "1", "--keep-last", "0", *QUIET, *extra]


def digests(out: Path) -> dict[str, str]:
    """sha256 of every checkpoint file of a run, by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for _, p in ckpt.list_checkpoints(out)}


def temporaries(out: Path) -> list[str]:
    return sorted(p.name for folder in (out, out / "checkpoints") if folder.is_dir() for p in folder.glob(".*.tmp-*"))


def error_line(capsys) -> str:
    """The one error line of a failed command (after any progress lines), with no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("memoryformer train: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and "Traceback" not in "\n".join(err), err
    return errors[0]


def start(data_dir, out, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "memoryformer.cli", *run_args(data_dir, out, *extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_to_end(data_dir, out, *extra: str) -> None:
    """A whole `memoryformer train` in a subprocess (the same code path as the killed runs)."""
    proc = start(data_dir, out, *extra)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out waiting for the training subprocess"
        time.sleep(0.01)


def logged_steps(out: Path) -> int:
    file = out / "metrics.csv"
    return max(0, len(file.read_text().splitlines()) - 1) if file.is_file() else 0


# ---- kill -9 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """The uninterrupted 24-step run the killed-and-resumed runs must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_to_end(data_dir, out, "--max-steps", "24", "--ckpt-every", "1")
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(out))


def kill_and_resume(data_dir, out: Path, seed: int, straight) -> None:
    rng = random.Random(seed)
    proc = start(data_dir, out, "--max-steps", "24", "--ckpt-every", "1")
    try:
        wait_for(lambda: logged_steps(out) >= 1, proc)
        if rng.random() < 0.5:  # kill while a checkpoint is being written
            folder = out / "checkpoints"
            wait_for(lambda: folder.is_dir() and any(folder.glob(".*.tmp-*")), proc)
        else:  # kill at a random moment
            time.sleep(rng.uniform(0.0, 0.5))
        before = digests(out)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    for _, path in ckpt.list_checkpoints(out):
        ckpt.load_checkpoint(path)  # every file under a checkpoint's name is complete
    run_to_end(data_dir, out, "--max-steps", "24", "--ckpt-every", "1", "--resume", "auto")
    after = digests(out)
    assert {name: after[name] for name in before} == before  # nothing that existed changed
    assert temporaries(out) == []
    final = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))
    assert final["step"] == 24
    assert final["history"]["losses"] == pytest.approx(straight["history"]["losses"], abs=1e-6, rel=0)
    for name, tensor in straight["model"].items():
        assert torch.allclose(final["model"][name], tensor, atol=1e-6, rtol=0), name
    steps = [int(r["step"]) for r in csv.DictReader(open(out / "metrics.csv")) if r["loss"]]
    assert steps == list(range(1, 25))  # each step logged once, none lost


def test_kill_9_then_resume(data_dir, tmp_path, straight):
    kill_and_resume(data_dir, tmp_path / "run", 0, straight)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_kill_9_then_resume_more_seeds(data_dir, tmp_path, straight, seed):
    kill_and_resume(data_dir, tmp_path / "run", seed, straight)


def test_stale_temporaries_removed_and_weights_mode(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    old_mask = os.umask(0o022)
    try:
        train(tiny_config(), tiny_train(max_steps=2), data_dir, out, progress=False, verbose=False)
        assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
        assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()} == {0o644}
    finally:
        os.umask(old_mask)
    (out / ".model.safetensors.tmp-4242").write_bytes(b"\0" * 100_000)  # a kill during the weights write
    (out / "checkpoints" / ".step_00000003.pt.tmp-4242").write_bytes(b"PK partial")
    before = digests(out)
    train(tiny_config(), tiny_train(max_steps=2), data_dir, out, resume="auto", progress=False)
    assert "removed 2 temporary file(s)" in capsys.readouterr().err
    assert temporaries(out) == [] and digests(out) == before


# ---- signals during a save ---------------------------------------------------------------------------


def signal_during_save(monkeypatch, at_step: int, signals: tuple[int, ...]) -> None:
    """Deliver `signals` to this process while the checkpoint of `at_step` is being written."""
    real = ckpt.atomic_save

    def save_with_signals(obj, path):
        if obj["step"] == at_step:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return real(obj, path)

    monkeypatch.setattr(ckpt, "atomic_save", save_with_signals)


@pytest.mark.parametrize("signals", [(signal.SIGINT, signal.SIGINT), (signal.SIGTERM, signal.SIGINT, signal.SIGINT)])
def test_signals_during_a_save_finish_it_then_stop(data_dir, tmp_path, monkeypatch, capfd, signals):
    out = tmp_path / "run"
    signal_during_save(monkeypatch, 4, signals)
    result = train(tiny_config(), tiny_train(max_steps=100), data_dir, out, progress=False)
    err = capfd.readouterr().err  # the handler's note goes straight to file descriptor 2
    assert result.interrupted == signal.Signals(signals[0]).name and result.step == 4 and not result.finished
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4]
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(out, 4))["step"] == 4
    assert f"stopped by {signal.Signals(signals[0]).name} at step 4" in err
    assert "a write is in progress" in err and "Traceback" not in err
    assert temporaries(out) == [] and not (out / "model.safetensors").exists()


def test_second_sigint_outside_a_save_stops_at_once(data_dir, tmp_path, monkeypatch, capsys):
    from memoryformer.train.loop import Trainer

    out = tmp_path / "run"
    real_step = Trainer.train_step

    def step_then_signal(self):
        real_step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    result = train(tiny_config(), tiny_train(max_steps=100), data_dir, out, progress=False)
    err = capsys.readouterr().err
    assert result.interrupted == "SIGINT" and not result.finished
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]  # no checkpoint of the abandoned step
    assert "stopped at once by a second SIGINT at step 3" in err and "step_00000002.pt" in err


def test_cli_sigint_twice_during_a_save(data_dir, tmp_path):
    """The real command: Ctrl-C, then Ctrl-C again while the stop checkpoint is written -> exit 130."""
    out = tmp_path / "run"
    proc = start(data_dir, out, "--max-steps", "100000", "--ckpt-every", "5")
    try:
        wait_for(lambda: len(ckpt.list_checkpoints(out)) >= 1, proc)
        before = digests(out)
        proc.send_signal(signal.SIGINT)
        folder = out / "checkpoints"
        deadline = time.monotonic() + 5
        while proc.poll() is None and not any(folder.glob(".*.tmp-*")) and time.monotonic() < deadline:
            pass  # the signal checkpoint's temporary appears: the save is in progress
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "inline_container" not in err and "stopped by SIGINT" in err
    after = digests(out)
    assert {name: after[name] for name in before} == before
    for _, path in ckpt.list_checkpoints(out):
        ckpt.load_checkpoint(path)
    assert temporaries(out) == []


# ---- one process per run directory -------------------------------------------------------------------


def test_second_run_on_the_same_out_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    proc = start(data_dir, out, "--max-steps", "100000", "--ckpt-every", "0", "--ckpt-every-minutes", "0")
    try:
        wait_for(lambda: logged_steps(out) >= 2, proc)
        rows = (out / "metrics.csv").read_text().splitlines()
        assert main(run_args(data_dir, out, "--max-steps", "10", "--resume", "auto")) == 1
        line = error_line(capsys)
        assert f"pid {proc.pid}" in line and "another training run" in line and str(out) in line
        assert (out / "metrics.csv").read_text().splitlines()[: len(rows)] == rows  # nothing rewritten
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    # the lock went with the process: the run resumes
    assert main(run_args(data_dir, out, "--max-steps", str(ckpt.list_checkpoints(out)[-1][0] + 1), "--resume")) == 0


def test_lock_names_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released on exit
        pass


# ---- damaged files -----------------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def foreign(path: Path) -> None:
    path.write_bytes(os.urandom(5000))


@pytest.mark.parametrize("damage", [truncate, flip_a_byte, foreign, lambda p: p.write_bytes(b"")])
def test_resume_falls_back_to_the_newest_readable_checkpoint(data_dir, tmp_path, capsys, damage):
    out = tmp_path / "run"
    straight = train(tiny_config(), tiny_train(max_steps=6), data_dir, tmp_path / "straight", progress=False,
                     verbose=False)
    train(tiny_config(), tiny_train(max_steps=6), data_dir, out, stop_at_step=4, progress=False, verbose=False)
    damage(ckpt.checkpoint_path(out, 4))
    kept = digests(out)["step_00000002.pt"]
    capsys.readouterr()
    resumed = train(tiny_config(), tiny_train(max_steps=6), data_dir, out, resume=True, progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "step_00000004.pt" in warnings[0] and "falling back to" in warnings[0]
    assert warnings[0].endswith("step_00000002.pt")
    assert resumed.finished and resumed.losses == pytest.approx(straight.losses, abs=1e-6, rel=0)
    assert digests(out)["step_00000002.pt"] == kept


def test_resume_with_no_readable_checkpoint_is_one_line(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(data_dir, out, "--max-steps", "2", "--ckpt-every", "0")) == 0
    truncate(ckpt.checkpoint_path(out, 2))
    before = digests(out)
    capsys.readouterr()
    assert main(run_args(data_dir, out, "--max-steps", "4", "--resume")) == 1
    line = error_line(capsys)
    assert "step_00000002.pt" in line and "truncated" in line
    assert digests(out) == before


def test_malicious_checkpoint_is_never_run(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(data_dir, out, "--max-steps", "2", "--ckpt-every", "0")) == 0
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": 9, "payload": Payload()},
               ckpt.checkpoint_path(out, 9))
    capsys.readouterr()
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(ckpt.checkpoint_path(out, 9))
    message = str(info.value)
    assert not marker.exists() and "arbitrary code" in message and "posix.system" in message
    assert "weights_only" not in message and "likely succeed" not in message
    # resuming passes over it (one warning), and still never runs it
    assert main(run_args(data_dir, out, "--max-steps", "3", "--resume")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "unusable" in line]
    assert len(warnings) == 1 and "step_00000009.pt" in warnings[0] and not marker.exists()


def test_load_model_with_damaged_weights_uses_the_checkpoint(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(), tiny_train(max_steps=2), data_dir, out, progress=False, verbose=False)
    expect, _ = ckpt.load_model(ckpt.checkpoint_path(out, 2))
    truncate(out / "model.safetensors")
    capsys.readouterr()
    model, _ = ckpt.load_model(out)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    line = err[0]
    assert "model.safetensors" in line and "truncated" in line and "step_00000002.pt" in line
    for a, b in zip(model.parameters(), expect.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors is truncated"):
        ckpt.load_model(out / "model.safetensors")


@pytest.mark.parametrize("name", ["config.json", "train_config.json", "run.json"])
def test_damaged_run_files_are_one_line(data_dir, tmp_path, capsys, name):
    out = tmp_path / "run"
    assert main(run_args(data_dir, out, "--max-steps", "2")) == 0
    truncate(out / name)
    before = digests(out)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "3", *QUIET]) == 1
    line = error_line(capsys)
    assert str(out / name) in line and "not valid JSON" in line
    assert digests(out) == before


def test_damaged_metrics_rewrite_keeps_the_old_rows(data_dir, tmp_path, monkeypatch):
    """A kill during the resume's metrics.csv rewrite leaves the old file whole."""
    out = tmp_path / "run"
    train(tiny_config(), tiny_train(max_steps=6), data_dir, out, stop_at_step=4, progress=False, verbose=False)
    with open(out / "metrics.csv", "a") as f:
        f.write("5,160,3.1")  # a row cut short by a kill: no newline
    before = (out / "metrics.csv").read_text()
    real_replace = os.replace

    def killed_at_metrics(src, dst):
        if Path(dst).name == "metrics.csv":
            raise KeyboardInterrupt  # stands for a kill in the middle of the rewrite
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_metrics)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(), tiny_train(max_steps=6), data_dir, out, resume=True, progress=False, verbose=False)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "metrics.csv").read_text() == before and temporaries(out) == []
    train(tiny_config(), tiny_train(max_steps=6), data_dir, out, resume=True, progress=False, verbose=False)
    steps = [int(r["step"]) for r in csv.DictReader(open(out / "metrics.csv")) if r["loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]


# ---- clear errors ------------------------------------------------------------------------------------


def test_nan_loss_is_one_line(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(run_args(data_dir, out, "--max-steps", "50", "--ckpt-every", "2", "--lr", "1e6", "--warmup-steps", "0"))
    line = error_line(capsys)
    assert rc == 1 and "training loss became nan at step" in line and "--lr" in line
    found = ckpt.list_checkpoints(out)
    step = int(line.split("at step ")[1].split()[0])
    assert all(s < step for s, _ in found)  # no checkpoint of a diverged model
    for _, path in found:
        assert torch.isfinite(torch.tensor(ckpt.load_checkpoint(path)["history"]["losses"])).all()


def test_out_is_a_file(data_dir, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    for out in (file, file / "run"):
        assert main(run_args(data_dir, out, "--max-steps", "1")) == 1
        line = error_line(capsys)
        assert f"{file} is a file" in line and "--out" in line
    assert file.read_text() == "keep me"


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs (needs root and a platform that allows mounting one)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_one_line_and_keeps_the_checkpoint(data_dir, small_disk, capsys):
    out = small_disk / "run"
    assert main(run_args(data_dir, out, "--max-steps", "2", "--ckpt-every", "2")) == 0
    size = ckpt.checkpoint_path(out, 2).stat().st_size
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(b"\0" * (free - size // 2))  # room for logs, not for a checkpoint
    before = digests(out)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "6", *QUIET]) == 1
    line = error_line(capsys)
    assert line.startswith("memoryformer train: error: no space left on device while writing ")
    assert "step_00000004.pt" in line and "inline_container" not in line
    assert digests(out) == before and temporaries(out) == []
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(out, 2))["step"] == 2


def test_resume_refuses_changed_data_naming_what_changed(tmp_path):
    """A run records its data's fingerprint; --resume on re-prepared data says which part changed."""
    from tiny_data import make_data

    from memoryformer.data import prepare
    from memoryformer.train import TrainConfig, train

    data = make_data(tmp_path)
    cfg = ModelConfig.from_preset("mf-test", vocab_size=300)
    tc = TrainConfig(batch_size=2, seq_len=16, max_steps=4, eval_every=0, ckpt_every=2, tensorboard=False,
                     device="cpu", precision="fp32")
    train(cfg, tc, data, tmp_path / "run", progress=False, verbose=False, stop_at_step=2)
    (tmp_path / "corpus" / "extra.txt").write_text("the memory table hash layer. " * 400)
    prepare([str(tmp_path / "corpus")], data, vocab_size=300, val_fraction=0.2, block_chars=1000, progress=False,
            force=True)
    with pytest.raises(ValueError, match=r"changed since this run started: training tokens"):
        train(cfg, tc, data, tmp_path / "run", resume=True, progress=False, verbose=False)
