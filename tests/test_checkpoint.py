"""Checkpoints: atomic writes, keep-last-N, damaged / foreign files, RNG states, load_model, SIGTERM."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from tiny_data import make_data

from memoryformer.core.config import ModelConfig
from memoryformer.core.model import LanguageModel
from memoryformer.train import checkpoint as ckpt


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 3-step run of mf-test (vocabulary 300) with checkpoints at steps 2 and 3."""
    from memoryformer.train import TrainConfig, train

    root = tmp_path_factory.mktemp("ckpt_run")
    data = make_data(root)
    tc = TrainConfig(batch_size=2, seq_len=16, max_steps=3, eval_every=0, eval_batches=1, ckpt_every=2,
                     keep_last=0, tensorboard=False, device="cpu", precision="fp32")
    train(ModelConfig.from_preset("mf-test", vocab_size=300), tc, data, root / "run", progress=False, verbose=False)
    return root / "run"


def good_state(step: int = 1) -> dict:
    cfg = ModelConfig.from_preset("mf-test")
    return {"step": step, "model": {"w": torch.arange(1000.0)}, "model_config": cfg.to_dict()}


# ---- atomic writes and names ------------------------------------------------------------------------


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = ckpt.checkpoint_path(tmp_path, 5)
    ckpt.save_checkpoint(path, good_state(5))
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")  # something reaches the disk, then the write dies
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, good_state(6))  # overwrite attempt: the old file must survive
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, 6), good_state(6))
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary, no step 6
    assert ckpt.load_checkpoint(path)["step"] == 5


def test_keep_last_and_latest(tmp_path):
    for step in (1, 2, 10, 3, 4):
        ckpt.save_checkpoint(ckpt.checkpoint_path(tmp_path, step), good_state(step))
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "checkpoints" / ".step_00000011.pt.tmp-123").write_bytes(b"stale")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000010.pt"
    removed = ckpt.prune_checkpoints(tmp_path, 2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 10] and len(removed) == 3
    assert ckpt.prune_checkpoints(tmp_path, 0) == []  # 0 keeps all
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "notes.txt", "step_00000004.pt", "step_00000010.pt"]
    assert ckpt.latest_checkpoint(tmp_path / "elsewhere") is None


# ---- damaged and foreign files -----------------------------------------------------------------------


def test_truncated_checkpoint(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "c.pt", good_state())
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        path.write_bytes(data[:cut])
        with pytest.raises(ckpt.CheckpointError, match="truncated"):
            ckpt.load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="empty"):
        ckpt.load_checkpoint(path)


def test_corrupt_checkpoint(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "c.pt", good_state())
    data = bytearray(path.read_bytes())
    # flip a byte inside the tensor's data: torch.load alone would load it silently
    offset = bytes(data).index(np.arange(1000, dtype=np.float32)[500:502].tobytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupt.*CRC"):
        ckpt.load_checkpoint(path)


def test_foreign_files(tmp_path):
    cases = {
        "plain_dict.pt": lambda p: torch.save({"state_dict": {"w": torch.zeros(2)}}, p),
        "tensor.pt": lambda p: torch.save(torch.zeros(3), p),
        "noise.pt": lambda p: p.write_bytes(os.urandom(4096)),
        "pickle.pt": lambda p: p.write_bytes(pickle.dumps({"a": 1})),
        "text.pt": lambda p: p.write_text("hello"),
    }
    for name, write in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(ckpt.CheckpointError, match="not a (memoryformer )?checkpoint|not a checkpoint|cannot be read"):
            ckpt.load_checkpoint(path)
    # a zip holding an arbitrary pickled object is refused without running it (weights_only)
    torch.save({"format": ckpt.FORMAT, "obj": random.Random()}, tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match="not a memoryformer checkpoint.*random.Random.*arbitrary code"):
        ckpt.load_checkpoint(tmp_path / "evil.pt")
    torch.save({"format": ckpt.FORMAT, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(ckpt.CheckpointError, match="version 99"):
        ckpt.load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip(tmp_path):
    ckpt.seed_everything(123)
    state = ckpt.capture_rng_state()
    ckpt.save_checkpoint(tmp_path / "r.pt", {**good_state(), "rng": [state]})
    expect = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.seed_everything(999)
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "r.pt")["rng"][0])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]


# ---- weights and load_model -------------------------------------------------------------------------


def test_load_model_from_run_dir_checkpoint_and_weights(run_dir):
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    final = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    reference = LanguageModel(ModelConfig.from_dict(final["model_config"]))
    reference.load_state_dict(final["model"])
    expect = reference(x)[0]

    for source in (run_dir, run_dir / "model.safetensors", ckpt.checkpoint_path(run_dir, 3)):
        model, tokenizer = ckpt.load_model(source)
        assert not model.training and model.config.vocab_size == 300
        assert torch.equal(model(x)[0], expect), source
        assert tokenizer is not None and tokenizer.get_vocab_size() == 300
    older, _ = ckpt.load_model(ckpt.checkpoint_path(run_dir, 2))
    assert not torch.equal(older(x)[0], expect)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_model(run_dir / "nope")
    with pytest.raises(FileNotFoundError, match="neither"):
        empty = run_dir.parent / "empty_run"
        empty.mkdir(exist_ok=True)
        ckpt.load_model(empty)


def test_load_model_prefers_the_newer_of_weights_and_checkpoint(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    # a newer checkpoint (say, a resumed run stopped at step 4) wins over model.safetensors of step 3
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(copy), mmap=False)
    state["model"] = {k: v + 1.0 for k, v in state["model"].items()}
    state["step"] = 4
    state = {k: v for k, v in state.items() if k not in ("format", "version")}
    ckpt.save_checkpoint(ckpt.checkpoint_path(copy, 4), state)
    model, _ = ckpt.load_model(copy)
    assert torch.equal(model.embed.weight, state["model"]["embed.weight"])


def test_save_model_weights_tied(tmp_path):
    cfg = ModelConfig.from_preset("pythia-test", tie_embeddings=True)
    model = LanguageModel(cfg)
    path = ckpt.save_model_weights(model, tmp_path / "model.safetensors", step=7)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert "head.weight" not in f.keys() and f.metadata()["step"] == "7"
    loaded, tokenizer = ckpt.load_model(path)
    assert tokenizer is None and loaded.head.weight is loaded.embed.weight
    x = torch.randint(0, 256, (1, 8))
    assert torch.equal(loaded(x)[0], model.eval()(x)[0])


# ---- stop signals ---------------------------------------------------------------------------------------


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(run_dir, tmp_path):
    """`memoryformer train` in a subprocess: SIGTERM mid-run -> checkpoint, exit code 143; then --resume."""
    out = tmp_path / "sig"
    data = run_dir.parent / "data"
    cmd = [sys.executable, "-m", "memoryformer.cli", "train", "--preset", "mf-test", "--vocab-size", "300",
           "--data", str(data), "--out", str(out), "--max-steps", "100000", "--batch-size", "2", "--seq-len", "16",
           "--eval-every", "0", "--ckpt-every", "0", "--log-every", "1", "--no-tensorboard", "--no-progress",
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        metrics = out / "metrics.csv"
        while time.time() < deadline and proc.poll() is None:  # wait for a few logged steps
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 4:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    found = ckpt.list_checkpoints(out)
    assert len(found) == 1 and found[0][0] >= 3
    state = ckpt.load_checkpoint(found[0][1])
    assert state["step"] == found[0][0] == len(state["history"]["losses"])
    assert not (out / "model.safetensors").exists()  # unfinished: no final weights

    from memoryformer.cli import main

    step = found[0][0]
    assert main(["train", "--out", str(out), "--resume", "--max-steps", str(step + 1), "--no-progress"]) == 0
    assert ckpt.latest_checkpoint(out) == ckpt.checkpoint_path(out, step + 1)
    assert (out / "model.safetensors").is_file()
