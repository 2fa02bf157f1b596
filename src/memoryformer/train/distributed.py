"""Distributed set-up for training: torchrun detection, DDP and FSDP2 wrapping, full state dicts.

One process per device, launched by `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT). Backend: nccl on CUDA, gloo on CPU.

    DDP  : every rank holds the whole model; gradients are averaged after backward.
    FSDP2: `torch.distributed.fsdp.fully_shard` on every block and on the root, so each rank holds
           1 / world_size of every parameter, gradient and optimizer state (for models whose hash
           tables do not fit one device). Ranks build the model on the meta device; rank 0 builds
           the real initial weights on the CPU and broadcasts them, so the initial weights equal a
           single-process run's with the same seed.

Checkpoints of one process and of DDP hold *full* state dicts (rank 0 writes one file); FSDP2 runs
write sharded checkpoints, one shard per rank (train/sharded.py). Both kinds load in any of the three.

`python -m memoryformer.train.distributed TORCHRUN_ARGS...` is torchrun with clean stops (`launch`):
a SIGTERM / Ctrl-C lets the workers checkpoint, then ends with one line and exit code 143 / 130
instead of torchrun's traceback and 1. See docs/distributed.md.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class DistEnv:
    """Where this process sits: rank among world_size processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False  # True when init_distributed created the process group (destroyed at exit)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the torchrun environment variables are set."""
    return all(name in os.environ for name in TORCHRUN_VARS)


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """"auto"/None -> cuda:local_rank when CUDA is available, else mps, else cpu; "cuda" -> cuda:local_rank."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str | None = "auto") -> DistEnv:
    """Join the torchrun process group (or reuse one already initialised); single process otherwise.

    The backend is nccl for CUDA devices and gloo otherwise. Each rank uses cuda:LOCAL_RANK."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = resolve_device(device, local)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistEnv(rank, world, local, dev, dist.get_backend(), owns_group=False)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistEnv(device=resolve_device(device, int(os.environ.get("LOCAL_RANK", 0))))
    rank, world, local = (int(os.environ[name]) for name in TORCHRUN_VARS)
    dev = resolve_device(device, local)
    if dev.type == "mps":
        raise ValueError("distributed training on mps is not supported; use --device cpu or CUDA GPUs")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group(backend, device_id=dev)
    else:
        dist.init_process_group(backend)
    # The group lives until the process exits: re-creating it in the same torchrun job would meet the
    # previous group's keys in torchrun's store, so later train() calls reuse this one.
    atexit.register(_destroy_group)
    return DistEnv(rank, world, local, dev, backend, owns_group=True)


def _destroy_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op in a single process)."""
    if env.distributed:
        if env.backend == "nccl":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


# ---- collectives that are no-ops in a single process -------------------------------------------


def all_reduce(tensor: torch.Tensor, env: DistEnv, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum", "mean" or "max") of a tensor on env.device; returns it."""
    if env.distributed:
        if op == "mean":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= env.world_size
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when `flag` is True on any rank."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    return bool(all_reduce(t, env, "max").item() > 0)


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every rank (small picklable objects only)."""
    if not env.distributed:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0, device=env.device if env.backend == "nccl" else None)
    return box[0]


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (small picklable objects only)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# ---- wrapping -------------------------------------------------------------------------------------


def shard_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """FSDP2: fully_shard every block, then the root (embedding, final norm, head); in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    blocks = getattr(model, "blocks", None)
    for block in blocks if blocks is not None else []:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def build_sharded(make_model: Callable[[], nn.Module], env: DistEnv) -> nn.Module:
    """An FSDP2 model whose initial weights are rank 0's `make_model()` (built on the CPU).

    Every rank builds the model on the meta device and shards it; only rank 0 materialises the
    full model, whose weights are then broadcast shard by shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full_state = make_model().state_dict() if env.is_main else {}
    with torch.device("meta"):
        model = make_model()
    shard_model(model, env)
    model.to_empty(device=env.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state, options=options)
    del full_state
    return model


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


@contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter for this backward when sync is False
    (gradient accumulation): DDP's no_sync, FSDP2's set_requires_gradient_sync."""
    if sync:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with nullcontext():
            yield


# ---- full state dicts ---------------------------------------------------------------------------


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full model state dict on the CPU (rank 0; other ranks of a sharded model get {}).

    A collective for FSDP2 models: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state dict on the CPU, keyed by parameter name (rank 0; others may get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict[str, Any],
                    optimizer_state: dict[str, Any] | None, env: DistEnv) -> None:
    """Load full state dicts (as written by full_model_state / full_optimizer_state).

    Distributed: only rank 0 needs them (others pass {}); they are broadcast from rank 0."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=env.distributed)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s result as a plain tensor (FSDP2 returns a DTensor)."""
    full = getattr(norm, "full_tensor", None)
    return full() if callable(full) else norm


# ---- torchrun with clean stops ------------------------------------------------------------------

STOP_CODES = {128 + signal.SIGTERM: "SIGTERM", 128 + signal.SIGINT: "SIGINT"}  # what `memoryformer train` returns
DEFAULT_SHUTDOWN_TIMEOUT_S = 300  # torchrun's own default, 30 s, can cut a large checkpoint short


def _stopped_line(name: str) -> str:
    return (f"torchrun: stopped by {name}: the workers were asked to finish their step and checkpoint (rank 0's "
            "last line names the checkpoint); rerun the same command with --resume to continue")


def stop_exit_code(failures: dict[int, Any]) -> int | None:
    """128 + signal when every failed worker stopped on a signal after checkpointing (exit codes 143 / 130),
    else None. `failures`: torchrun's ChildFailedError.failures (rank -> ProcessFailure with .exitcode)."""
    codes = {int(failure.exitcode) for failure in failures.values()}
    return max(codes) if codes and codes <= set(STOP_CODES) else None


def launch(argv: list[str]) -> int:
    """torchrun (same arguments) that ends a signal stop with one line and 128 + signal (143 for SIGTERM,
    130 for Ctrl-C), like a single process, instead of a traceback and exit code 1.

    torchrun's agent forwards SIGTERM / SIGINT to the workers, which finish the step, checkpoint and
    exit; it SIGKILLs them after --shutdown-timeout seconds (default here DEFAULT_SHUTDOWN_TIMEOUT_S,
    or TORCH_ELASTIC_SHUTDOWN_TIMEOUT). A worker that fails for another reason keeps torchrun's report."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(DEFAULT_SHUTDOWN_TIMEOUT_S))
    args = parse_args(argv)
    try:
        run(args)
    except SignalException as err:
        print(_stopped_line(signal.Signals(err.sigval).name), file=sys.stderr)
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        code = stop_exit_code(err.failures)
        if code is not None:  # the workers were signalled directly (e.g. by the cluster), not torchrun
            print(_stopped_line(STOP_CODES[code]), file=sys.stderr)
            return code
        print(err.format_msg(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
