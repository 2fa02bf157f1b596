"""Distributed training on CPU with gloo: 2 processes under torchrun, DDP and FSDP2 against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_data import make_data

from memoryformer.core.config import ModelConfig
from memoryformer.train import TrainConfig, train
from memoryformer.train import checkpoint as ckpt
from memoryformer.train import distributed as D
from memoryformer.train import sharded as S

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch.distributed as dist
    from memoryformer.core.config import ModelConfig
    from memoryformer.train import TrainConfig, train

    data, out = sys.argv[1], sys.argv[2]
    cfg = ModelConfig.from_preset("mf-test", vocab_size=300)
    # per rank: 1 sequence x 2 micro-steps; global batch 1 x 2 x 2 = 4 sequences, as the 1-process run
    tc = TrainConfig(**json.loads(sys.argv[3]))
    quiet = dict(progress=False, verbose=False)
    ddp = train(cfg, tc, data, out + "/ddp", **quiet)
    fsdp_a = train(cfg, tc.replace(fsdp=True), data, out + "/fsdp", stop_at_step=2, **quiet)
    fsdp_b = train(cfg, tc.replace(fsdp=True), data, out + "/fsdp", resume=True, **quiet)
    # the whole validation split (221 windows of 16 today), 5 a batch: rank 0 runs 23 forwards, rank 1 22 + 1 padding
    from memoryformer.train import distributed as D
    from memoryformer.data import TokenData
    from memoryformer.train import validation_loss
    full = validation_loss(fsdp_b.model, TokenData(data), 16, batch_size=5, env=D.init_distributed("cpu"),
                           sharded=True)
    # a single-file checkpoint (DDP's, step 4) resumes under FSDP2 (full state dicts broadcast from rank 0)
    fsdp_c = train(cfg, tc.replace(fsdp=True, max_steps=5), data, out + "/ddp", resume=True, **quiet)
    report = {"ddp": ddp.to_dict(), "fsdp_a": fsdp_a.to_dict(), "fsdp_b": fsdp_b.to_dict(), "full_val": full,
              "fsdp_c": fsdp_c.to_dict(), "initialized_after": dist.is_initialized()}
    with open(f"{out}/rank{os.environ['RANK']}.json", "w") as f:
        json.dump(report, f)
''')




def test_environment_detection(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not D.launched_by_torchrun()
    env = D.init_distributed("cpu")
    assert (env.rank, env.world_size, env.distributed, env.is_main, env.owns_group) == (0, 1, False, True, False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert D.launched_by_torchrun() and not D.init_distributed("cpu").distributed  # world of one: no group
    assert D.resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            D.resolve_device("cuda")
    else:
        assert D.resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    # single-process collectives are identities
    t = torch.tensor([3.0])
    assert D.all_reduce(t, env, "mean").item() == 3.0 and D.any_rank(True, env) and D.broadcast_object(5, env) == 5


def test_ddp_and_fsdp2_match_one_process(tmp_path):
    """torchrun, 2 CPU processes (gloo): DDP and FSDP2 losses equal one process with the same global batch;
    FSDP2 checkpoints (full state dicts) resume, and load in one process like any checkpoint."""
    data = make_data(tmp_path)
    # eps=1e-6, not the recipe's 1e-8: 4 sequences summed in one backward and 2 ranks x 2 micro-batches of 1
    # give gradients that differ by fp32 rounding (~1e-9). AdamW's first update is lr * g / (|g| + eps), so
    # an element whose gradient is ~eps (one embedding entry here, g = 2e-8) moves by 1% of lr more or less,
    # and a hash sign can flip: one validation window's loss then jumps by 2e-3. With eps=1e-6 the update is
    # linear in g at that scale and the two runs stay within rounding of each other.
    settings = dict(batch_size=1, grad_accum=2, seq_len=16, max_steps=4, eval_every=2, eval_batches=2, log_every=1,
                    ckpt_every=0, keep_last=0, tensorboard=False, device="cpu", precision="fp32", eps=1e-6)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "dist"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(data), str(out), json.dumps(settings)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    cfg = ModelConfig.from_preset("mf-test", vocab_size=300)
    one = train(cfg, TrainConfig(**{**settings, "batch_size": 4, "grad_accum": 1}), data, tmp_path / "one",
                progress=False, verbose=False)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        ddp, fsdp_a, fsdp_b = rep["ddp"], rep["fsdp_a"], rep["fsdp_b"]
        assert ddp["world_size"] == 2 and ddp["tokens"] == one.tokens and rep["initialized_after"]
        assert ddp["losses"] == pytest.approx(one.losses, abs=1e-5, rel=0)
        assert [e["val_loss"] for e in ddp["evals"]] == pytest.approx([e["val_loss"] for e in one.evals], abs=1e-5)
        assert fsdp_a["step"] == 2 and fsdp_b["step"] == 4 and fsdp_b["finished"]
        assert fsdp_b["losses"][:2] == fsdp_a["losses"]
        assert fsdp_b["losses"] == pytest.approx(one.losses, abs=1e-5, rel=0)
        assert [e["val_loss"] for e in fsdp_b["evals"]] == pytest.approx([e["val_loss"] for e in one.evals], abs=1e-5)
    assert one.losses[-1] < one.losses[0] - 0.2
    from memoryformer.data import TokenData
    from memoryformer.train import validation_loss

    full = validation_loss(one.model, TokenData(data), 16, batch_size=5)
    assert full["tokens"] == TokenData(data).num_eval_windows("val", 16) * 16
    for rep in reports:
        assert rep["full_val"]["tokens"] == full["tokens"]
        assert rep["full_val"]["loss"] == pytest.approx(full["loss"], abs=1e-5)
        fsdp_c = rep["fsdp_c"]
        assert fsdp_c["step"] == 5 and fsdp_c["losses"][:4] == rep["ddp"]["losses"] and len(fsdp_c["losses"]) == 5

    # DDP wrote single-file checkpoints (rank 0), FSDP2 sharded ones (test_sharded.py); both load in one process
    single = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "one"))
    assert ckpt.load_checkpoint(out / "ddp" / "checkpoints" / "step_00000004.pt")["world_size"] == 2
    assert ckpt.latest_checkpoint(out / "ddp").name == "step_00000005.dcp"
    sharded = ckpt.latest_checkpoint(out / "fsdp")
    assert sharded.name == "step_00000004.dcp" and S.read_train_state(sharded)["world_size"] == 2
    model, tokenizer = ckpt.load_model(sharded)
    assert model.state_dict().keys() == single["model"].keys()
    model, tokenizer = ckpt.load_model(out / "fsdp")
    assert tokenizer is not None and model.config == cfg
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    ref, _ = ckpt.load_model(tmp_path / "one")
    with torch.no_grad():
        assert torch.allclose(model(x)[0], ref(x)[0], atol=1e-3)
    assert (out / "ddp" / "metrics.csv").is_file() and (out / "fsdp" / "model.safetensors").is_file()


def test_stop_exit_code_of_torchrun_failures():
    class Failure:
        def __init__(self, exitcode: int) -> None:
            self.exitcode = exitcode

    assert D.stop_exit_code({0: Failure(143), 1: Failure(143)}) == 143
    assert D.stop_exit_code({1: Failure(130)}) == 130
    assert D.stop_exit_code({0: Failure(143), 1: Failure(1)}) is None  # a real failure keeps torchrun's report
    assert D.stop_exit_code({0: Failure(-9)}) is None and D.stop_exit_code({}) is None


def test_sigterm_to_the_launcher_checkpoints_and_exits_143(tmp_path):
    """SIGTERM to `python -m memoryformer.train.distributed` (torchrun): the FSDP2 workers checkpoint, the
    launcher prints one line and exits 143, no traceback (resuming a sharded checkpoint: test_sharded.py)."""
    import signal
    import time

    data = make_data(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "memoryformer.train.distributed", "--standalone", "--nproc_per_node", "2",
           "-m", "memoryformer.cli", "train", "--preset", "mf-test", "--vocab-size", "300", "--data", str(data),
           "--out", str(out), "--max-steps", "100000", "--batch-size", "1", "--seq-len", "16", "--device", "cpu",
           "--fsdp", "--no-tensorboard", "--no-progress", "--ckpt-every", "0", "--eval-every", "0", "--log-every", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        metrics = out / "metrics.csv"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) > 2):  # a few steps done
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-4000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-4000:]
    assert "Traceback" not in stderr and "torchrun: stopped by SIGTERM" in stderr
    latest = ckpt.latest_checkpoint(out)
    assert latest is not None and latest.suffix == ".dcp" and f"checkpoint {latest}; continue with --resume" in stderr
    history = json.loads((out / "history.json").read_text())
    assert history["interrupted"] == "SIGTERM" and history["step"] == S.read_train_state(latest)["step"]
