"""Training checkpoints and final weights: atomic writes, validation on load, run directories.

A run directory (`--out DIR`) describes itself:

    DIR/config.json            ModelConfig JSON
    DIR/train_config.json      TrainConfig JSON
    DIR/tokenizer.json         copied from the prepared data directory
    DIR/run.json               data directory, data meta, world size, FSDP
    DIR/metrics.csv            one row per log / eval event
    DIR/history.json           the TrainResult of the last finished (or stopped) run
    DIR/tb/                    TensorBoard events (when enabled)
    DIR/checkpoints/step_00000100.pt   the last `keep_last` checkpoints
    DIR/model.safetensors      final weights (written at the end of training)

A checkpoint is one `torch.save` zip file holding a dict: format, version, step, model (full
state dict), optimizer (full, keyed by parameter name), scheduler, scaler, sampler, rng (one
entry per rank), model_config, train_config, history, world_size, torch_version. It is written
to a temporary file in the same directory and renamed over the final name, so a crash never
leaves a partial checkpoint under a checkpoint's name. On load, the zip's CRC-32 of every record
is checked, so a truncated or corrupt file is an error, never a silent fresh start.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memoryformer.core.config import ModelConfig

FORMAT = "memoryformer-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
_NAME = re.compile(r"^step_(\d+)\.(?:pt|dcp)$")  # .dcp: a sharded checkpoint folder (train/sharded.py)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: truncated, corrupt, foreign or incompatible."""


# ---- names -----------------------------------------------------------------------------------------


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in out_dir/checkpoints, oldest first."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and (path.is_file() if path.suffix == ".pt" else path.is_dir()):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in out_dir/checkpoints, or None."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int | None) -> list[Path]:
    """Delete all but the newest keep_last checkpoints (keep_last None or 0 keeps all); returns the deleted."""
    if not keep_last or keep_last < 0:
        return []
    found = list_checkpoints(out_dir)
    doomed = [path for _, path in found[:-keep_last]]
    for path in doomed:
        if path.is_dir():  # a sharded checkpoint
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return doomed


def remove_stale_temporaries(out_dir: str | os.PathLike) -> None:
    """Delete temporary files left by a write that was killed (they never carry a checkpoint's name)."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if folder.is_dir():
        for path in folder.glob(".*.tmp-*"):
            path.unlink(missing_ok=True)


# ---- atomic writes ------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save(obj) to a temporary file next to `path`, fsync, then rename over `path`.

    If anything fails, the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---- RNG states ---------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The torch (CPU and every CUDA device), numpy and Python RNG states, in weights_only-safe types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---- saving and loading checkpoints -------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a checkpoint dict atomically, adding format and version."""
    payload = {"format": FORMAT, "version": VERSION, **state}
    return atomic_save(payload, path)


def verify_checkpoint_file(path: str | os.PathLike) -> None:
    """Error unless `path` is a complete zip whose every record matches its CRC-32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the write was interrupted; delete it "
                              "to resume from the previous checkpoint")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as err:
        raise CheckpointError(f"checkpoint {path} is truncated or is not a checkpoint at all ({err}); if it "
                              "is a memoryformer checkpoint, delete it to resume from the previous one") from None
    except (OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({err}); delete it to resume from "
                              "the previous checkpoint") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: record {bad!r} fails its CRC-32 check; delete "
                              "it to resume from the previous checkpoint")


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True, mmap: bool = True) -> dict[str, Any]:
    """Load and validate a checkpoint written by save_checkpoint; tensors land on the CPU.

    Raises CheckpointError for a truncated, corrupt or foreign file, FileNotFoundError if missing."""
    path = Path(path)
    if verify:
        verify_checkpoint_file(path)
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises RuntimeError / UnpicklingError / others for bad files
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if "error:" in line.lower()), lines[0] if lines else "")
        raise CheckpointError(f"{path} cannot be read as a memoryformer checkpoint ({type(err).__name__}: "
                              f"{detail[:300]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a memoryformer checkpoint (no format={FORMAT!r} in it); pass a "
                              f"file from a run's {CHECKPOINT_DIR}/ folder or the run directory")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}; this code reads version "
                              f"{VERSION}")
    missing = [k for k in ("step", "model", "model_config") if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is not a complete checkpoint")
    return state


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file itself, or the latest checkpoint of a run directory."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {path / CHECKPOINT_DIR}; train first with "
                                    f"`memoryformer train --out {path}`")
        return latest
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory or a checkpoint file")
    return path


# ---- run directory files ------------------------------------------------------------------------


def run_dir_of(path: Path) -> Path:
    """The run directory a checkpoint or weights file belongs to."""
    if path.is_dir() and path.suffix != ".dcp":  # .dcp: a sharded checkpoint folder
        return path
    return path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent


def write_run_files(out_dir: str | os.PathLike, model_config: ModelConfig, train_config_json: str,
                    data_dir: str | os.PathLike | None, extra: dict[str, Any] | None = None) -> None:
    """config.json, train_config.json, tokenizer.json (copied from data_dir) and run.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, model_config.to_json() + "\n")
    atomic_write_text(out / "train_config.json", train_config_json + "\n")
    info: dict[str, Any] = {"torch_version": str(torch.__version__), **(extra or {})}
    if data_dir is not None:
        data = Path(data_dir)
        info["data_dir"] = str(data.resolve())
        meta_file = data / "meta.json"
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
            info["data_meta"] = meta
            tok = data / str(meta.get("tokenizer", TOKENIZER_FILE))
            if tok.is_file():
                tmp = out / f".{TOKENIZER_FILE}.tmp"
                shutil.copyfile(tok, tmp)
                os.replace(tmp, out / TOKENIZER_FILE)
    atomic_write_text(out / "run.json", json.dumps(info, indent=2, default=str) + "\n")


def read_run_info(out_dir: str | os.PathLike) -> dict[str, Any]:
    file = Path(out_dir) / "run.json"
    return json.loads(file.read_text()) if file.is_file() else {}


# ---- final weights (safetensors) and loading a model --------------------------------------------


def save_model_weights(model_or_state: torch.nn.Module | dict[str, torch.Tensor], path: str | os.PathLike,
                       config: ModelConfig | None = None, *, step: int | None = None) -> Path:
    """Write weights as safetensors (atomically). A tied head is stored once (as embed.weight).

    The file's metadata holds the ModelConfig JSON and the step, so it also loads without config.json."""
    from safetensors.torch import save_file

    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    if config is None and isinstance(model_or_state, torch.nn.Module):
        config = getattr(model_or_state, "config", None)
    tensors = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in state.items():
        if config is not None and config.tie_embeddings and name == "head.weight":
            continue
        key = (tensor.data_ptr(), tensor.numel())
        if tensor.numel() and key in seen:  # shared storage (tied weights): keep the first name
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    metadata = {"format": "pt"}
    if config is not None:
        metadata["memoryformer_config"] = config.to_json()
    if step is not None:
        metadata["step"] = str(step)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _weights_step(path: Path) -> int | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        step = (f.metadata() or {}).get("step")
    return int(step) if step is not None else None


def _load_safetensors(path: Path, device: str | torch.device):
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from memoryformer.core.model import LanguageModel

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None
    config_file = path.parent / CONFIG_FILE
    if "memoryformer_config" in metadata:
        config = ModelConfig.from_json(metadata["memoryformer_config"])
    elif config_file.is_file():
        config = ModelConfig.from_json(config_file)
    else:
        raise FileNotFoundError(f"{path} carries no model config and there is no {config_file}")
    model = LanguageModel(config)
    if config.tie_embeddings:
        state.setdefault("head.weight", state["embed.weight"])
    _load_model_state(model, state, path)
    return model.to(device)


def _load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"the weights in {source} do not fit the model its config describes: "
                              f"{str(err).splitlines()[0]}") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(LanguageModel in eval mode on `device`, tokenizers.Tokenizer or None) from a run.

    `path` is a run directory (the newer of its latest checkpoint and model.safetensors), a
    checkpoint file (`.pt`) or a safetensors file. The tokenizer is the run's tokenizer.json."""
    from memoryformer.core.model import LanguageModel

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory (--out of `memoryformer train`), "
                                "a checkpoint file or a model.safetensors file")
    if path.is_dir() and path.suffix != ".dcp":  # .dcp: a sharded checkpoint folder
        latest = latest_checkpoint(path)
        weights = path / WEIGHTS_FILE
        if weights.is_file() and (latest is None or (_weights_step(weights) or 0) >= _step_of(latest)):
            path = weights
        elif latest is not None:
            path = latest
        else:
            raise FileNotFoundError(f"{path} holds neither {WEIGHTS_FILE} nor checkpoints in "
                                    f"{CHECKPOINT_DIR}/; is it a training run directory?")
    if path.suffix == ".safetensors":
        model = _load_safetensors(path, device)
    elif path.suffix == ".dcp":  # a sharded checkpoint, read in one process (train/sharded.py)
        from memoryformer.train.sharded import load_sharded_model

        model = load_sharded_model(path).to(device)
    else:
        state = load_checkpoint(path)
        model = LanguageModel(ModelConfig.from_dict(state["model_config"]))
        _load_model_state(model, state["model"], path)
        model = model.to(device)
    model.eval()
    return model, load_run_tokenizer(run_dir_of(path))


def _step_of(path: Path) -> int:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else -1


def load_run_tokenizer(run_dir: str | os.PathLike):
    """The run's tokenizer.json as a tokenizers.Tokenizer, or None when the run has none."""
    file = Path(run_dir) / TOKENIZER_FILE
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(file))
