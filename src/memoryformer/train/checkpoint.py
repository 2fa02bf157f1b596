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
    DIR/.lock                  the pid of the process training into DIR (lock.py)

A checkpoint is one `torch.save` zip file holding a dict: format, version, step, model (full
state dict), optimizer (full, keyed by parameter name), scheduler, scaler, sampler, rng (one
entry per rank), model_config, train_config, history, world_size, torch_version. It is written
to a temporary file in the same directory, fsynced and renamed over the final name (files.py), so a
crash never leaves a partial checkpoint under a checkpoint's name. On load, the zip's CRC-32 of every
record is checked and the file is read with `weights_only=True` (no pickled code ever runs), so a
truncated, corrupt or foreign file is an error naming the file, never a silent fresh start; a run
falls back to its newest readable checkpoint and says which ones it passed over.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memoryformer.core.config import ModelConfig
from memoryformer.train import files
from memoryformer.train.files import atomic_write_text

__all__ = ["atomic_write_text"]  # re-exported: run files are written through it

FORMAT = "memoryformer-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
_NAME = re.compile(r"^step_(\d+)\.(?:pt|dcp)$")  # .dcp: a sharded checkpoint folder (train/sharded.py)
# what a checkpoint must hold to resume training from it (load_checkpoint checks step, model, model_config)
RESUME_KEYS = ("optimizer", "scheduler", "sampler")


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


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Delete temporary files that killed writes left in a run directory and its checkpoints folder
    (they never carry a real file's name). Only while holding the run's lock."""
    return files.remove_stale_temporaries(out_dir, Path(out_dir) / CHECKPOINT_DIR)


# ---- atomic writes ------------------------------------------------------------------------------


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save(obj) to a temporary file next to `path`, fsync, then rename over `path`.

    If anything fails, the temporary file is removed and `path` is untouched; a full disk raises
    files.DiskFullError naming `path`."""
    return files.atomic_write(path, lambda f: torch.save(obj, f))


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
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its write was cut short")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as err:
        raise CheckpointError(f"checkpoint {path} is truncated or is not a checkpoint at all ({err})") from None
    except (OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({err})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: record {bad!r} fails its CRC-32 check")


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    """The one-line error for a file torch.load refused (never torch's advice to load it unsafely)."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) or "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" (it references {found.group(1)})" if found else ""
        return CheckpointError(f"{path} is not a memoryformer checkpoint: it holds pickled objects other than "
                               f"tensors and plain containers{what}, and was not loaded because loading it could "
                               "run arbitrary code")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return CheckpointError(f"{path} cannot be read as a memoryformer checkpoint ({type(err).__name__}: "
                           f"{first[:300]})")


def _check_contents(path: Path, state: Any) -> None:
    """Error unless a loaded object has the format, version and fields of a checkpoint."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a memoryformer checkpoint (no format={FORMAT!r} in it); pass a "
                              f"file from a run's {CHECKPOINT_DIR}/ folder or the run directory")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}; this code reads version "
                              f"{VERSION}")
    missing = [k for k in ("step", "model", "model_config") if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is not a complete checkpoint")
    if not isinstance(state["step"], int) or state["step"] < 0:
        raise CheckpointError(f"{path} has step {state['step']!r}; a checkpoint's step is a whole number >= 0")
    model = state["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(f"{path}: its 'model' entry is not a state dict of tensors")
    try:
        ModelConfig.from_dict(state["model_config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: its model config is not valid ({err})") from None


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True, mmap: bool = True) -> dict[str, Any]:
    """Load and validate a checkpoint written by save_checkpoint; tensors land on the CPU.

    Raises CheckpointError for a truncated, corrupt or foreign file, FileNotFoundError if missing.
    The file is read with weights_only=True: a pickle that would run code is refused, not run."""
    path = Path(path)
    if verify:
        verify_checkpoint_file(path)
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises RuntimeError / UnpicklingError / others for bad files
        raise _unreadable(path, err) from None
    _check_contents(path, state)
    return state


def load_newest_valid(candidates: Iterable[Path], say: Callable[[str], None], *,
                      need: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """(path, state) of the first readable checkpoint of `candidates` (newest first), saying in one
    line which damaged ones it passed over. Raises the newest one's error when none is readable."""
    errors: list[CheckpointError] = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
            missing = [k for k in need if k not in state]
            if missing:
                raise CheckpointError(f"{path} lacks {', '.join(missing)}, so training cannot resume from it")
        except CheckpointError as err:
            errors.append(err)
            continue
        if errors:
            say(f"warning: {len(errors)} newer checkpoint(s) are unusable ({errors[0]}); falling back to {path}")
        return path, state
    if not errors:
        raise FileNotFoundError("no checkpoint to load")
    raise errors[0]


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


def read_json_file(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A JSON object from a file, or one error line naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err}); the file is damaged or is not {what}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_model_config(path: str | os.PathLike, what: str = "the model config") -> ModelConfig:
    """A ModelConfig from a JSON file, with errors that name the file."""
    data = read_json_file(path, what)
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} {path} is not a valid ModelConfig: {err}") from None


def write_run_files(out_dir: str | os.PathLike, model_config: ModelConfig, train_config_json: str,
                    data_dir: str | os.PathLike | None, extra: dict[str, Any] | None = None) -> None:
    """config.json, train_config.json, tokenizer.json (copied from data_dir) and run.json, each atomically."""
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
            meta = read_json_file(meta_file, "the data directory's meta.json")
            info["data_meta"] = meta
            tok = data / str(meta.get("tokenizer", TOKENIZER_FILE))
            if tok.is_file():
                files.atomic_copy(tok, out / TOKENIZER_FILE)
    atomic_write_text(out / "run.json", json.dumps(info, indent=2, default=str) + "\n")


def read_run_info(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's run.json ({} when there is none)."""
    file = Path(out_dir) / "run.json"
    return read_json_file(file, "the run's run.json") if file.is_file() else {}


# ---- final weights (safetensors) and loading a model --------------------------------------------


def save_model_weights(model_or_state: torch.nn.Module | dict[str, torch.Tensor], path: str | os.PathLike,
                       config: ModelConfig | None = None, *, step: int | None = None) -> Path:
    """Write weights as safetensors (atomically, with the umask's file mode). A tied head is stored
    once (as embed.weight). The file's metadata holds the ModelConfig JSON and the step, so it also
    loads without config.json."""
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
    return files.atomic_write_by_name(path, lambda name: save_file(tensors, name, metadata=metadata))


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, or CheckpointError naming it."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): its write was cut short")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return metadata, load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is truncated or is not a safetensors file ({str(err)[:200]})") from None


def _weights_config(path: Path, metadata: dict[str, str]) -> ModelConfig:
    config_file = path.parent / CONFIG_FILE
    if "memoryformer_config" in metadata:
        try:
            return ModelConfig.from_json(metadata["memoryformer_config"])
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path} carries a damaged model config in its metadata ({err})") from None
    if config_file.is_file():
        return read_model_config(config_file, "the run's model config")
    raise FileNotFoundError(f"{path} carries no model config and there is no {config_file}")


def _weights_step(path: Path) -> int | None:
    """The step recorded in a safetensors file's metadata (None when absent); CheckpointError when
    the file cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            step = (f.metadata() or {}).get("step")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is truncated or is not a safetensors file ({str(err)[:200]})") from None
    return int(step) if step is not None and str(step).isdigit() else None


def _load_safetensors(path: Path, device: str | torch.device):
    from memoryformer.core.model import LanguageModel

    metadata, state = _read_safetensors(path)
    config = _weights_config(path, metadata)
    model = LanguageModel(config)
    if config.tie_embeddings and "embed.weight" in state:
        state.setdefault("head.weight", state["embed.weight"])
    _load_model_state(model, state, path)
    return model.to(device)


def _load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"the weights in {source} do not fit the model its config describes: "
                              f"{str(err).splitlines()[0]}") from None


def _load_checkpoint_model(path: Path, device: str | torch.device):
    from memoryformer.core.model import LanguageModel

    state = load_checkpoint(path)
    model = LanguageModel(ModelConfig.from_dict(state["model_config"]))
    _load_model_state(model, state["model"], path)
    return model.to(device)


def _load_from_run_dir(run_dir: Path, device: str | torch.device):
    """The newer of model.safetensors and the newest readable checkpoint; a damaged file falls back
    to the next one, saying so (one line on stderr)."""
    found = [path for _, path in reversed(list_checkpoints(run_dir))]
    weights = run_dir / WEIGHTS_FILE
    if weights.is_file():
        try:
            step = _weights_step(weights)
            if not found or (step or 0) >= _step_of(found[0]):
                return _load_safetensors(weights, device), weights
        except CheckpointError as err:
            if not found:
                raise
            print(f"warning: {err}; loading {found[0]} instead", file=sys.stderr)
    if not found:
        raise FileNotFoundError(f"{run_dir} holds neither {WEIGHTS_FILE} nor checkpoints in "
                                f"{CHECKPOINT_DIR}/; is it a training run directory?")
    if found[0].suffix == ".dcp":  # a sharded checkpoint, read in one process (train/sharded.py)
        from memoryformer.train.sharded import load_sharded_model

        return load_sharded_model(found[0]).to(device), found[0]
    path, _ = load_newest_valid(found, lambda line: print(line, file=sys.stderr))
    return _load_checkpoint_model(path, device), path


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(LanguageModel in eval mode on `device`, tokenizers.Tokenizer or None) from a run.

    `path` is a run directory (the newer of its latest checkpoint and model.safetensors; a damaged
    one falls back to the other, or to an older checkpoint, with a warning), a checkpoint file (`.pt`)
    or a safetensors file. The tokenizer is the run's tokenizer.json."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run directory (--out of `memoryformer train`), "
                                "a checkpoint file or a model.safetensors file")
    if path.is_dir() and path.suffix != ".dcp":  # .dcp: a sharded checkpoint folder
        model, path = _load_from_run_dir(path, device)
    elif path.suffix == ".safetensors":
        model = _load_safetensors(path, device)
    elif path.suffix == ".dcp":  # a sharded checkpoint, read in one process (train/sharded.py)
        from memoryformer.train.sharded import load_sharded_model

        model = load_sharded_model(path).to(device)
    else:
        model = _load_checkpoint_model(path, device)
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

    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises its own Exception type for a damaged file
        raise ValueError(f"the run's tokenizer {file} cannot be read ({str(err)[:200]})") from None


def check_same_model(path: Path, state: dict[str, Any], model_config: ModelConfig) -> None:
    """Refuse to resume `state` (a checkpoint's, from `path`) with another model config, naming the fields."""
    saved = state["model_config"]
    if saved != model_config.to_dict():
        diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now"
                for k, v in model_config.to_dict().items() if saved.get(k) != v]
        raise CheckpointError(f"{path} was trained with another model config ({'; '.join(diff)}); "
                              "resume with the same model, or start a new run in another --out")
