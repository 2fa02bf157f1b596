"""Sharded (torch.distributed.checkpoint) checkpoints of FSDP2 runs: 2 CPU processes (gloo) under torchrun.

Saved at 2 ranks, resumed at 2 (bit-exact) and at 1, read in one process for export, and a rank killed
with SIGKILL in the middle of a save: the previous checkpoint stays intact and the run resumes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_data import make_data

from memoryformer.core.config import ModelConfig
from memoryformer.train import TrainConfig, train
from memoryformer.train import checkpoint as ckpt
from memoryformer.train import sharded as S

# eps=1e-6: see test_distributed.py (keeps 1-process and 2-rank runs within rounding of each other)
SETTINGS = dict(batch_size=1, grad_accum=2, seq_len=16, max_steps=4, eval_every=2, eval_batches=2, log_every=1,
                ckpt_every=2, keep_last=0, tensorboard=False, device="cpu", precision="fp32", eps=1e-6, fsdp=True)

WORKER = textwrap.dedent('''
    import json, os, signal, sys
    from memoryformer.core.config import ModelConfig
    from memoryformer.train import sharded as S
    from memoryformer.train import TrainConfig, train

    data, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    tc = TrainConfig(**json.loads(sys.argv[4]))
    cfg = ModelConfig.from_preset("mf-test", vocab_size=300)
    quiet = dict(progress=False, verbose=False)
    rank = os.environ["RANK"]
    if mode == "kill":  # rank 1 dies by SIGKILL once its shards of step 3 are written, before the rename
        write = S._write_shards

        def write_then_die(model, optimizer, folder):
            write(model, optimizer, folder)
            if rank == "1" and "step_00000003" in folder.name:
                os.kill(os.getpid(), signal.SIGKILL)

        S._write_shards = write_then_die
        train(cfg, tc, data, out + "/killed", **quiet)
        raise SystemExit("rank 1 was to be killed at step 3")
    if mode == "resume_killed":
        report = {"resumed": train(cfg, tc, data, out + "/killed", resume=True, **quiet).to_dict()}
    else:
        full = train(cfg, tc, data, out + "/full", **quiet)
        first = train(cfg, tc, data, out + "/pieces", stop_at_step=2, **quiet)
        second = train(cfg, tc, data, out + "/pieces", resume=True, **quiet)
        # DDP (no sharding) resumes the straight run's sharded step-4 checkpoint and writes a single file
        ddp = train(cfg, tc.replace(fsdp=False, max_steps=5), data, out + "/full", resume=True, **quiet)
        report = {"full": full.to_dict(), "first": first.to_dict(), "second": second.to_dict(), "ddp": ddp.to_dict()}
    with open(f"{out}/{mode}_rank{rank}.json", "w") as f:
        json.dump(report, f)
''')


def torchrun(tmp: Path, data: Path, out: Path, mode: str, settings: dict) -> subprocess.CompletedProcess:
    worker = tmp / "sharded_worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(data), str(out), mode, json.dumps(settings)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """(tmp, data, out, reports of both ranks): an FSDP2 run straight through and one stopped at step 2
    and resumed, both at 2 ranks with sharded checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("sharded")
    data = make_data(tmp)
    out = tmp / "runs"
    out.mkdir()
    proc = torchrun(tmp, data, out, "pieces", SETTINGS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((out / f"pieces_rank{r}.json").read_text()) for r in (0, 1)]
    return tmp, data, out, reports


def test_layout_and_bit_exact_resume_at_two_ranks(two_rank_runs):
    _, _, out, reports = two_rank_runs
    for rep in reports:
        full, first, second = rep["full"], rep["first"], rep["second"]
        assert first["step"] == 2 and second["step"] == 4 and second["finished"] and full["finished"]
        assert second["losses"] == full["losses"]  # bit-exact: sampler, RNG, schedule and AdamW state restored
        assert second["grad_norms"] == full["grad_norms"] and second["lrs"] == full["lrs"]
        assert [e["val_loss"] for e in second["evals"]] == [e["val_loss"] for e in full["evals"]]
        assert second["checkpoint"].endswith("step_00000004.dcp")
        assert rep["ddp"]["step"] == 5 and rep["ddp"]["losses"][:4] == full["losses"]
    assert ckpt.latest_checkpoint(out / "full").name == "step_00000005.pt"
    for run in ("full", "pieces"):
        found = [(step, path) for step, path in ckpt.list_checkpoints(out / run) if path.suffix == ".dcp"]
        assert [step for step, _ in found] == [2, 4]
        for _, path in found:
            assert path.is_dir() and path.suffix == ".dcp"
            names = {p.name for p in path.iterdir()}
            assert {".metadata", "__0_0.distcp", "__1_0.distcp", S.STATE_FILE} <= names
            state = S.read_train_state(path)
            assert state["world_size"] == 2 and "model" not in state and len(state["rng"]) == 2
        assert not list((out / run / "checkpoints").glob(".*"))  # no temporary folder left


def test_one_process_reads_and_exports_a_sharded_checkpoint(two_rank_runs, tmp_path):
    _, _, out, _ = two_rank_runs
    step4 = out / "pieces" / "checkpoints" / "step_00000004.dcp"
    # the final model.safetensors (gathered at the end of training) and the step-4 shards hold the same weights
    sharded_model, tokenizer = ckpt.load_model(step4)
    final, _ = ckpt.load_model(out / "pieces" / ckpt.WEIGHTS_FILE)
    assert tokenizer is not None and sharded_model.config == final.config
    for name, tensor in final.state_dict().items():
        assert torch.equal(sharded_model.state_dict()[name], tensor), name
    # consolidation into one file, and a run directory whose latest checkpoint is sharded
    single = S.consolidate(step4, tmp_path / "model.safetensors")
    again, _ = ckpt.load_model(single)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in final.state_dict().items())
    run = tmp_path / "run"
    shutil.copytree(out / "pieces", run)
    (run / ckpt.WEIGHTS_FILE).unlink()
    shutil.rmtree(run / "checkpoints" / "step_00000004.dcp")
    model, _ = ckpt.load_model(run)
    assert model.config == final.config
    from memoryformer.cli import main

    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_resume_at_one_process(two_rank_runs, tmp_path):
    """A sharded checkpoint of 2 ranks resumes in one process (DCP reshards); same global batch."""
    _, data, out, reports = two_rank_runs
    run = tmp_path / "one"
    shutil.copytree(out / "pieces", run)
    shutil.rmtree(run / "checkpoints" / "step_00000004.dcp")
    (run / ckpt.WEIGHTS_FILE).unlink()
    cfg = ModelConfig.from_preset("mf-test", vocab_size=300)
    tc = TrainConfig(**{**SETTINGS, "batch_size": 2})  # 2 sequences x 2 micro-steps: the global batch of 4
    result = train(cfg, tc, data, run, resume=True, progress=False, verbose=False)
    full = reports[0]["full"]
    assert result.step == 4 and result.finished and result.world_size == 1
    assert result.losses[:2] == full["losses"][:2]  # carried over from the checkpoint
    assert result.losses == pytest.approx(full["losses"], abs=1e-5, rel=0)
    assert result.val_loss == pytest.approx(full["val_loss"], abs=1e-5)
    assert ckpt.latest_checkpoint(run).name == "step_00000004.pt"  # one process writes single-file checkpoints


def test_rank_killed_mid_save_keeps_the_previous_checkpoint(two_rank_runs):
    tmp, data, out, reports = two_rank_runs
    settings = {**SETTINGS, "ckpt_every": 1, "keep_last": 2}
    killed = torchrun(tmp, data, out, "kill", settings)
    assert killed.returncode != 0
    folder = out / "killed" / "checkpoints"
    assert [step for step, _ in ckpt.list_checkpoints(out / "killed")] == [1, 2]
    assert (folder / ".step_00000003.dcp.partial").is_dir() and not (folder / "step_00000003.dcp").exists()
    assert S.read_train_state(folder / "step_00000002.dcp")["step"] == 2

    resumed = torchrun(tmp, data, out, "resume_killed", settings)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    result = json.loads((out / "resume_killed_rank0.json").read_text())["resumed"]
    assert result["step"] == 4 and result["finished"]
    assert result["losses"] == reports[0]["full"]["losses"]  # resumed from step 2, bit-exact
    assert [step for step, _ in ckpt.list_checkpoints(out / "killed")] == [3, 4]
    assert not list(folder.glob(".*"))  # the partial folder was deleted on resume


def test_bad_sharded_checkpoints_are_one_line_errors(tmp_path):
    empty = tmp_path / "step_00000001.dcp"
    empty.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="lacks train_state.pt, .metadata"):
        S.read_train_state(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S.read_train_state(tmp_path / "step_00000002.dcp")
    (empty / ".metadata").write_bytes(b"")
    (empty / S.STATE_FILE).write_bytes(b"not a zip")
    with pytest.raises(ckpt.CheckpointError, match="truncated or is not a checkpoint"):
        S.read_train_state(empty)
    ckpt.atomic_save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": 1}, empty / S.STATE_FILE)
    with pytest.raises(ckpt.CheckpointError, match="not the state file of a memoryformer sharded checkpoint"):
        S.read_train_state(empty)
    assert S.is_sharded_checkpoint(empty) and not S.is_sharded_checkpoint(tmp_path / "step_00000001.pt")
    partial = tmp_path / "checkpoints" / ".step_00000003.dcp.partial"
    partial.mkdir(parents=True)
    assert S.remove_partial_checkpoints(tmp_path) == [partial] and not partial.exists()
