"""Sharded checkpoints for FSDP2 runs: one shard per rank with `torch.distributed.checkpoint` (DCP).

A single-file checkpoint gathers the whole model and AdamW state on rank 0 (16 bytes per parameter in
fp32: about 81 GB of weights and optimizer state for mf-base). An FSDP2 run instead writes a folder in
which every rank saves only the shards it holds; nothing is gathered:

    DIR/checkpoints/step_00001000.dcp/
        .metadata          DCP's index: every tensor's global shape and where its pieces are
        __0_0.distcp       rank 0's shards of the model and the optimizer state
        __1_0.distcp       rank 1's, ...
        train_state.pt     step, scheduler, scaler, sampler, RNG of every rank, configs, history

Writes are atomic: every rank writes into `checkpoints/.step_00001000.dcp.partial/`; when all ranks
are done (a barrier), rank 0 fsyncs and renames the folder to its final name. A crash or a killed
rank mid-save leaves only the `.partial` folder (deleted when the run resumes), never a folder under
a checkpoint's name. DCP reshards on load, so a sharded checkpoint resumes under FSDP2 at any world
size, under DDP, or in one process; `load_model` (and so `memoryformer export / generate / evaluate`)
reads it in one process. See docs/distributed.md.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memoryformer.core.config import ModelConfig
from memoryformer.train import checkpoint as ckpt
from memoryformer.train import distributed as D
from memoryformer.train.files import fsync_dir

SUFFIX = ".dcp"
STATE_FILE = "train_state.pt"
PARTIAL_SUFFIX = ".partial"


# ---- names ----------------------------------------------------------------------------------------


def sharded_checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """DIR/checkpoints/step_{step:08d}.dcp"""
    return Path(out_dir) / ckpt.CHECKPOINT_DIR / f"step_{step:08d}{SUFFIX}"


def partial_path(path: Path) -> Path:
    """The temporary folder a checkpoint is written into: checkpoints/.step_N.dcp.partial"""
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def is_sharded_checkpoint(path: str | os.PathLike | None) -> bool:
    """True for a sharded checkpoint's name (step_N.dcp), judged by the name alone so that every rank
    agrees on a path rank 0 chose."""
    return path is not None and Path(path).suffix == SUFFIX


def remove_partial_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Delete `.step_N.dcp.partial` folders left by a save that was killed; returns them."""
    folder = Path(out_dir) / ckpt.CHECKPOINT_DIR
    doomed = sorted(folder.glob(f".*{SUFFIX}{PARTIAL_SUFFIX}")) if folder.is_dir() else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ---- saving ---------------------------------------------------------------------------------------


def _write_shards(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shards of the model and optimizer state into `folder` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def save_sharded_checkpoint(out_dir: str | os.PathLike, step: int, model: nn.Module,
                            optimizer: torch.optim.Optimizer, train_state: dict[str, Any], env: D.DistEnv) -> Path:
    """Write step_N.dcp atomically; every rank calls it. `train_state` (rank 0's is written) holds the
    small state: step, scheduler, scaler, sampler, rng (one entry per rank), configs, history."""
    path = sharded_checkpoint_path(out_dir, step)
    tmp = partial_path(path)
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier(env)
    _write_shards(model, optimizer, tmp)
    if env.is_main:
        ckpt.atomic_save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "sharded": True, **train_state},
                         tmp / STATE_FILE)
    D.barrier(env)  # every rank's shards are on disk (DCP fsyncs each file)
    if env.is_main:
        if path.exists():  # a checkpoint of this step from an earlier attempt: replace it
            shutil.rmtree(path)
        fsync_dir(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    D.barrier(env)
    return path


# ---- loading --------------------------------------------------------------------------------------


def read_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """The small state (train_state.pt) of a sharded checkpoint, validated; CheckpointError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"sharded checkpoint {path} does not exist")
    missing = [name for name in (STATE_FILE, ".metadata") if not (path / name).is_file()]
    if missing:
        raise ckpt.CheckpointError(f"sharded checkpoint {path} lacks {', '.join(missing)}; it is not a complete "
                                   "checkpoint (delete it to resume from the previous one)")
    file = path / STATE_FILE
    ckpt.verify_checkpoint_file(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError / UnpicklingError / others for bad files
        raise ckpt.CheckpointError(f"{file} cannot be read ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != ckpt.FORMAT or not state.get("sharded"):
        raise ckpt.CheckpointError(f"{file} is not the state file of a memoryformer sharded checkpoint")
    if state.get("version") != ckpt.VERSION:
        raise ckpt.CheckpointError(f"{file} has checkpoint version {state.get('version')}; this code reads "
                                   f"version {ckpt.VERSION}")
    missing = [k for k in ("step", "model_config", "sampler", "scheduler") if k not in state]
    if missing:
        raise ckpt.CheckpointError(f"{file} lacks {', '.join(missing)}; it is not a complete checkpoint")
    return state


def _read_shards(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Fill `model` (and `optimizer`) from the checkpoint's shards, resharding to this run's layout."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict

    one_process = not (dist.is_available() and dist.is_initialized())
    if optimizer is None:
        state = {"model": model.state_dict()}
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
    with warnings.catch_warnings():  # DCP warns that it reads in one process: that is what we asked for
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(path), no_dist=one_process)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
        return
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_sharded_checkpoint(path: str | os.PathLike, model_config: ModelConfig, model: nn.Module,
                            optimizer: torch.optim.Optimizer | None, env: D.DistEnv) -> dict[str, Any]:
    """Load a sharded checkpoint into this run's (FSDP2, DDP or single-process) model and optimizer;
    returns the small state (as a single-file checkpoint's, without "model" and "optimizer").

    Every rank calls it and reads the folder (it must be on storage every rank sees). An error on
    any rank is raised on every rank."""
    path = Path(path)
    state: dict[str, Any] = {}
    error = None
    try:
        state = read_train_state(path)
        ckpt.check_same_model(path, state, model_config)
    except (ckpt.CheckpointError, FileNotFoundError) as err:
        error = err
    if D.any_rank(error is not None, env):
        raise error or ckpt.CheckpointError(f"{path} cannot be read on another rank (is it on shared storage?)")
    try:
        _read_shards(path, model, optimizer)
    except (RuntimeError, ValueError, OSError) as err:  # DCP raises CheckpointException (a RuntimeError)
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ckpt.CheckpointError(f"the shards of {path} cannot be loaded ({first[:300]})") from None
    return state


# ---- one process: consolidate for export ----------------------------------------------------------


def load_sharded_model(path: str | os.PathLike):
    """A LanguageModel (CPU, eval mode) with the weights of a sharded checkpoint, read in one process
    (the optimizer state is not read)."""
    from memoryformer.core.model import LanguageModel

    path = Path(path)
    state = read_train_state(path)
    model = LanguageModel(ModelConfig.from_dict(state["model_config"]))
    try:
        _read_shards(path, model, None)
    except (RuntimeError, ValueError, OSError) as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ckpt.CheckpointError(f"the shards of {path} cannot be loaded ({first[:300]})") from None
    return model.eval()


def consolidate(path: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write a sharded checkpoint's weights as one safetensors file (config and step in its metadata);
    `load_model`, `memoryformer generate/evaluate/export` read it. `path`: a step_N.dcp folder."""
    path = Path(path)
    state = read_train_state(path)
    model = load_sharded_model(path)
    return ckpt.save_model_weights(model, out_file, model.config, step=int(state["step"]))
