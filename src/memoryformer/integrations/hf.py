"""Hugging Face `transformers` glue: config and model classes, Auto registration, export, loading.

    import memoryformer.integrations.hf                      # registers "memoryformer" with AutoConfig / AutoModelForCausalLM
    save_pretrained(model, "out", tokenizer)    # our LanguageModel -> an HF directory
    model, tokenizer = load_any("out")          # HF directory, training run or checkpoint -> LanguageModel

A MemoryFormer exports as `MemoryFormerForCausalLM` (config.json with model_type "memoryformer",
model.safetensors, tokenizer files, and a self-contained `modeling_memoryformer.py` named in the
config's `auto_map`, so `trust_remote_code=True` loads it without this package). A Pythia twin exports
as a native `GPTNeoXForCausalLM` checkpoint that plain transformers loads.

`MemoryFormerForCausalLM.generate` (transformers' GenerationMixin) decodes incrementally with our
preallocated `KVCache`, carried as the cache object between steps (`MemoryFormerCache`). Padded
batches (attention_mask with zeros) are run row by row with the padding removed, so left padding
gives exactly the unpadded result. For lm-eval, `MemoryFormerLM` (registered as `--model memoryformer`)
is lm-eval's HFLM over this model; it also accepts training runs and checkpoint files.

Tested with transformers 5.24 and lm-eval 0.4.13; see docs/huggingface.md.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from memoryformer.core.config import ModelConfig
from memoryformer.core.model import LanguageModel
from memoryformer.integrations.hf_model import (  # noqa: F401  (re-exported)
    MemoryFormerCache,
    MemoryFormerConfig,
    MemoryFormerForCausalLM,
)

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HF_MODEL_TYPES = ("memoryformer", "gpt_neox")
REMOTE_CODE_FILE = "modeling_memoryformer.py"

REMOTE_CODE = Path(__file__).with_name(REMOTE_CODE_FILE)  # written by scripts/generate_remote_code.py


def remote_code_source() -> str:
    """The text of the self-contained `modeling_memoryformer.py` that exports carry (config, layer, model,
    neox conversion, the transformers classes), checked in beside this module."""
    return REMOTE_CODE.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------


def register() -> None:
    """Register MemoryFormerConfig / MemoryFormerForCausalLM with AutoConfig / AutoModelForCausalLM,
    and `memoryformer` with lm-eval's model registry (lazily) when lm-eval is installed. Idempotent."""
    try:
        AutoConfig.register("memoryformer", MemoryFormerConfig, exist_ok=True)
        AutoModelForCausalLM.register(MemoryFormerConfig, MemoryFormerForCausalLM, exist_ok=True)
    except TypeError:  # transformers without exist_ok
        try:
            AutoConfig.register("memoryformer", MemoryFormerConfig)
            AutoModelForCausalLM.register(MemoryFormerConfig, MemoryFormerForCausalLM)
        except ValueError:
            pass
    try:
        import lm_eval.models  # noqa: F401  (lm-eval's own models first: it only adds them to an empty registry)
        from lm_eval.api.registry import model_registry
    except ImportError:
        return
    model_registry.register("memoryformer", target=f"{__name__}:MemoryFormerLM")


# ---------------------------------------------------------------------------------------------
# Conversion and saving
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' "Loading weights" / "Writing model shards" bars off for a moment."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _eot_token(tokenizer: Any) -> str | None:
    from memoryformer.data.tokenizer import eot_id

    try:
        return tokenizer.id_to_token(eot_id(tokenizer))
    except ValueError:
        return None


def check_tokenizer(tokenizer: Any, config: ModelConfig, where: str = "the tokenizer") -> None:
    """Raise if the tokenizer has ids the model's embedding cannot hold."""
    from memoryformer.data.tokenizer import tokenizer_vocab_size

    size = tokenizer_vocab_size(tokenizer)
    if size > config.vocab_size:
        raise ValueError(f"{where} has {size} tokens but the model's vocabulary holds only {config.vocab_size}: "
                         "it is not the tokenizer this model was trained with; pass the run's tokenizer.json")


def hf_tokenizer(tokenizer: Any, *, max_length: int | None = None) -> Any:
    """A `PreTrainedTokenizerFast` (AutoTokenizer-loadable) around a `tokenizers.Tokenizer`, with
    bos, eos and pad all the end-of-text token (`<|endoftext|>` for our tokenizers)."""
    from transformers import PreTrainedTokenizerFast

    eot = _eot_token(tokenizer)
    special = {"bos_token": eot, "eos_token": eot, "pad_token": eot} if eot is not None else {}
    kwargs: dict[str, Any] = {"model_max_length": max_length} if max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.__class__.from_str(tokenizer.to_str()),
                                   clean_up_tokenization_spaces=False, **special, **kwargs)


def to_hf(model: LanguageModel, *, native_neox: bool = True, token_ids: dict[str, int] | None = None) -> PreTrainedModel:
    """A transformers model with `model`'s weights: a GPTNeoXForCausalLM (copy) for a Pythia twin when
    native_neox, else a MemoryFormerForCausalLM sharing `model` itself. token_ids: bos/eos/pad ids."""
    token_ids = token_ids or {}
    cfg = model.config
    if cfg.architecture == "pythia" and native_neox:
        from transformers import GPTNeoXForCausalLM

        from memoryformer.integrations.neox import config_to_hf, state_dict_to_hf

        hf = GPTNeoXForCausalLM(config_to_hf(cfg, **token_ids))
        head = "embed_out." if hasattr(hf, "embed_out") else "lm_head."
        hf.load_state_dict(state_dict_to_hf(model.state_dict(), head_prefix=head))
        hf = hf.to(device=model.head.weight.device, dtype=model.head.weight.dtype)
    else:
        hf = MemoryFormerForCausalLM(MemoryFormerConfig.from_model_config(cfg, **token_ids), language_model=model)
    for key, value in token_ids.items():
        setattr(hf.generation_config, key, value)
    return hf.eval()


def save_pretrained(model: LanguageModel, out_dir: str | Path, tokenizer: Any = None, *,
                    native_neox: bool = True, remote_code: bool = True,
                    dtype: torch.dtype | None = None) -> Path:
    """Write `model` (and its `tokenizers.Tokenizer`) as a Hugging Face directory; returns it.

    Pythia twins become native GPT-NeoX checkpoints (unless native_neox=False); MemoryFormers get
    `modeling_memoryformer.py` + auto_map for trust_remote_code (unless remote_code=False).
    dtype: cast the saved weights (e.g. torch.bfloat16); default their own dtype."""
    out = Path(out_dir)
    token_ids: dict[str, int] = {}
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.config)
        eot = _eot_token(tokenizer)
        if eot is not None:
            eot_id = tokenizer.token_to_id(eot)
            token_ids = {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id}
    if dtype is not None and dtype != model.head.weight.dtype:
        model = copy.deepcopy(model).to(dtype)
    hf = to_hf(model, native_neox=native_neox, token_ids=token_ids)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(hf, MemoryFormerForCausalLM) and remote_code:
        hf.config.auto_map = {"AutoConfig": f"{REMOTE_CODE_FILE[:-3]}.MemoryFormerConfig",
                              "AutoModelForCausalLM": f"{REMOTE_CODE_FILE[:-3]}.MemoryFormerForCausalLM"}
        (out / REMOTE_CODE_FILE).write_text(remote_code_source(), encoding="utf-8")
    with _no_progress_bars():
        hf.save_pretrained(out)
    if tokenizer is not None:
        hf_tokenizer(tokenizer, max_length=model.config.max_seq_len).save_pretrained(out)
        # transformers 5 writes its own class name (TokenizersBackend); this one loads in 4.x and 5.x
        tokenizer_config = out / "tokenizer_config.json"
        settings = json.loads(tokenizer_config.read_text())
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
        tokenizer_config.write_text(json.dumps(settings, indent=2) + "\n")
        tokenizer.save(str(out / "tokenizer.json"))  # the run's own file, not transformers' rewrite of it
    return out


def save_pretrained_atomic(model: LanguageModel, out_dir: str | Path, tokenizer: Any = None, *,
                           replace: bool = False, **kwargs: Any) -> Path:
    """`save_pretrained` into a temporary sibling of `out_dir`, renamed to `out_dir` once complete and
    synced to disk: a full disk, an error or a kill never leaves a half-written directory. A non-empty
    `out_dir` is refused unless `replace` (it is then swapped for the new one, whole)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not replace:
        raise ValueError(f"--out {out} is not empty; choose another directory or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        save_pretrained(model, tmp, tokenizer, **kwargs)
        _fsync_tree(tmp)
        _swap_in(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise ValueError(f"the disk holding {out.parent} is full: the export did not fit; "
                             f"{out} is unchanged") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _fsync_tree(folder: Path) -> None:
    """Flush every file of `folder`, and the folder itself, to disk."""
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(new: Path, out: Path) -> None:
    """Rename `new` to `out`; a non-empty `out` is moved aside first and removed after."""
    if out.is_dir() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)  # onto nothing, or onto an empty directory
    _fsync_dir(out.parent)


def export(source: str | Path, out_dir: str | Path, *, native_neox: bool = True, remote_code: bool = True,
           dtype: torch.dtype | None = None) -> Path:
    """`memoryformer export`: a training run, checkpoint file or HF directory -> an HF directory."""
    model, tokenizer = load_any(source)
    if tokenizer is None:
        print(f"note: {source} has no tokenizer; the export has none either", file=sys.stderr)
    return save_pretrained(model, out_dir, tokenizer, native_neox=native_neox, remote_code=remote_code, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def is_hf_dir(path: str | Path) -> bool:
    """A directory with a transformers config.json (model_type memoryformer or gpt_neox) and weights."""
    path = Path(path)
    config = path / "config.json"
    if not (path.is_dir() and config.is_file() and any((path / w).is_file() for w in HF_WEIGHTS)):
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in HF_MODEL_TYPES
    except (json.JSONDecodeError, AttributeError):
        return False


def from_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[LanguageModel, Any]:
    """(LanguageModel, tokenizers.Tokenizer or None) from a Hugging Face directory: a MemoryFormer
    export or any GPT-NeoX checkpoint (as a Pythia twin)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not is_hf_dir(path):
        raise ValueError(_not_a_checkpoint(path))
    model = _read_hf_model(path, json.loads((path / "config.json").read_text())["model_type"])
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json")) if (path / "tokenizer.json").is_file() else None
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.config, f"{path / 'tokenizer.json'}")
    return model.to(device).eval(), tokenizer


def _read_hf_model(path: Path, model_type: str) -> LanguageModel:
    """The LanguageModel of HF directory `path`; unreadable or unsafe weights are a ValueError naming them."""
    import pickle

    try:
        with _no_progress_bars():
            if model_type == "gpt_neox":
                return LanguageModel.from_hf_gpt_neox(str(path))
            return MemoryFormerForCausalLM.from_pretrained(str(path)).model
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line), "")
        raise ValueError(f"{path}: the pickled weights hold Python objects other than tensors; refused, since "
                         "unpickling them could run arbitrary code" + (f" ({detail})" if detail else "")) from None
    except Exception as err:
        if type(err).__module__.split(".")[0] != "safetensors":
            raise
        raise ValueError(f"{path}: the weights are not a readable safetensors file ({str(err).strip()}); "
                         "export the model again") from None


def peek_config(path: str | Path) -> ModelConfig | None:
    """The `ModelConfig` of a model path (HF directory, training run, checkpoint or safetensors file),
    read from its config.json or safetensors header without loading any weights. None when that small
    file is missing or unreadable: loading the model then reports the real problem."""
    path = Path(path).expanduser()
    try:
        if path.is_file() and path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get("memoryformer_config")
            if text is not None:
                return ModelConfig.from_json(text)
        if path.is_file():
            path = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        data = json.loads((path / "config.json").read_text())
        if data.get("model_type") == "memoryformer":
            return MemoryFormerConfig.from_dict(data).to_model_config()
        if data.get("model_type") == "gpt_neox":
            from transformers import GPTNeoXConfig

            from memoryformer.integrations.neox import config_from_hf

            return config_from_hf(GPTNeoXConfig.from_dict(data))
        return ModelConfig.from_dict(data)
    except Exception:  # noqa: BLE001  (a pre-check only: the loader raises the clear error)
        return None


def _not_a_checkpoint(path: Path) -> str:
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    listing = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
    return (f"{path} is not a model checkpoint: expected a Hugging Face directory (config.json with "
            f"model_type {' or '.join(HF_MODEL_TYPES)}, plus model.safetensors), a training run directory "
            f"(config.json, tokenizer.json, and model.safetensors or checkpoints/step_*.pt), or a checkpoint "
            f"file (.pt or .safetensors)" + (f"; found: {listing}" if found else "; the directory is empty"))


def load_any(path: str | Path, device: str | torch.device = "cpu") -> tuple[LanguageModel, Any]:
    """(LanguageModel in eval mode, tokenizers.Tokenizer or None) from a Hugging Face directory, a
    training run directory or a checkpoint file. The tokenizer must fit the model's vocabulary."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such model: {path}")
    if is_hf_dir(path):
        return from_pretrained(path, device)
    from memoryformer.train.checkpoint import load_model

    try:
        model, tokenizer = load_model(path, device=device)
    except FileNotFoundError as err:
        raise ValueError(f"{_not_a_checkpoint(path)} ({err})") from None
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.config, f"the tokenizer of {path}")
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# lm-eval
# ---------------------------------------------------------------------------------------------

_LM_EVAL_CLASS: type | None = None


def _lm_eval_class() -> type:
    """lm-eval's HFLM for our models, made on first use (lm-eval is heavy and optional)."""
    global _LM_EVAL_CLASS
    if _LM_EVAL_CLASS is not None:
        return _LM_EVAL_CLASS
    from lm_eval.models.huggingface import HFLM

    class MemoryFormerLM(HFLM):
        """`lm_eval --model memoryformer --model_args pretrained=PATH`: PATH is an HF directory (either
        architecture), a training run or a checkpoint file. Other HFLM arguments pass through."""

        def __init__(self, pretrained: Any, tokenizer: Any = None, device: str | None = None,
                     dtype: str | torch.dtype | None = None, **kwargs: Any) -> None:
            kwargs.pop("backend", None)
            kwargs.pop("trust_remote_code", None)  # our registered classes are used, not remote code
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            if isinstance(pretrained, (str, Path)) and not is_hf_dir(pretrained):
                source = pretrained
                model, tok = load_any(source)
                if dtype not in (None, "auto"):
                    model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
                pretrained = to_hf(model.to(device), native_neox=False)
                if tokenizer is None:
                    if tok is None:
                        raise ValueError(f"{source} has no tokenizer.json: pass tokenizer=DIR in --model_args")
                    tokenizer = hf_tokenizer(tok, max_length=model.config.max_seq_len)
            elif isinstance(pretrained, (str, Path)):  # HFLM loads HF directories itself
                pretrained = str(pretrained)
                kwargs.update(device=device, dtype=dtype or "auto")
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, backend="causal", **kwargs)

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                                  override_bs: int | None = None) -> list[tuple[float, bool]]:
            """HFLM's, after refusing in one clear error what HFLM would refuse with a bare assert."""
            check_continuations_fit(requests, self.max_length)
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    MemoryFormerLM.__module__ = __name__
    _LM_EVAL_CLASS = MemoryFormerLM
    return MemoryFormerLM


def check_continuations_fit(requests: list, max_length: int) -> None:
    """Raise ValueError when an lm-eval request's continuation (((context, continuation), context ids,
    continuation ids)) is longer than the model's context: lm-eval cannot score it (its HFLM asserts)."""
    too_long = [req for req in requests if len(req[2]) > max_length]
    if too_long:
        longest = max(len(req[2]) for req in too_long)
        raise ValueError(f"lm-eval cannot score {len(too_long)} request(s) whose continuation is longer than "
                         f"the model's {max_length}-token context (up to {longest} tokens); leave those tasks out "
                         f"(mf_piqa and mf_logiqa have such items for a 256-token model), or score them with "
                         f"`memoryformer eval --task ...`, which keeps a continuation's last {max_length} tokens")


def __getattr__(name: str) -> Any:
    if name == "MemoryFormerLM":
        return _lm_eval_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """`python -m memoryformer.integrations.hf ARGS`: lm-eval's command line with `--model memoryformer` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except (ValueError, OSError) as err:  # what a user can fix: one line, not lm-eval's traceback
        if os.environ.get("MEMORYFORMER_TRACEBACK"):
            raise
        message = (str(err).strip().splitlines() or [type(err).__name__])[0]
        print(f"python -m memoryformer.hf: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":  # run through the package module, so only its classes are registered
    from memoryformer.integrations.hf import main as _main

    _main()
else:
    register()
