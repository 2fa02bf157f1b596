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
import dataclasses
import inspect
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from memoryformer.core.config import ModelConfig
from memoryformer.core.model import KVCache, LanguageModel

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
HF_MODEL_TYPES = ("memoryformer", "gpt_neox")
REMOTE_CODE_FILE = "modeling_memoryformer.py"

# The classes between the markers are also written, with config.py, layer.py and model.py, into the
# self-contained modeling file of exported directories (`remote_code_source`). They may use only the
# names imported in _REMOTE_HEADER and those three modules' names.
# <remote-code>
_HF_NAMES = {"temperature": "hash_temperature", "tie_embeddings": "tie_word_embeddings"}
# transformers' own output field for the cache: `cache` from 5.2x, `past_key_values` before
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MemoryFormerConfig(PretrainedConfig):
    """transformers config holding every `ModelConfig` field under the same name, except
    `temperature` (hash_temperature: `temperature` is a generation setting in transformers) and
    `tie_embeddings` (tie_word_embeddings). Standard names (hidden_size, num_hidden_layers,
    num_attention_heads, max_position_embeddings) are aliases of d_model, n_layers, n_heads, max_seq_len."""

    model_type = "memoryformer"
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layers",
                     "num_attention_heads": "n_heads", "max_position_embeddings": "max_seq_len"}

    def __init__(self, **kwargs: Any) -> None:
        for f in dataclasses.fields(ModelConfig):
            name = _HF_NAMES.get(f.name, f.name)
            if name != "tie_word_embeddings":  # a transformers setting: given to the base class
                setattr(self, name, kwargs.pop(name, f.default))
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> MemoryFormerConfig:
        fields = {_HF_NAMES.get(k, k): v for k, v in config.to_dict().items()}
        return cls(**fields, **kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig(**{f.name: getattr(self, _HF_NAMES.get(f.name, f.name))
                              for f in dataclasses.fields(ModelConfig)})


class MemoryFormerCache:
    """Past keys and values for `MemoryFormerForCausalLM`: one `KVCache` for the whole batch, or one
    per row when the batch is padded (each row then keeps only its real tokens). Capacity grows on
    demand (doubling, at most max_seq_len). `columns` counts the input positions consumed so far,
    padding included, which is what `generate` calls the past length."""

    is_compileable = False
    is_croppable = False
    is_linear = (False,)

    def __init__(self, config: ModelConfig, batch_size: int, *, per_row: bool,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.config, self.per_row, self.device, self.dtype = config, per_row, device, dtype
        self.kv = [self._new(1 if per_row else batch_size, 0) for _ in range(batch_size if per_row else 1)]
        self.columns = 0

    def _new(self, batch: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layers, batch, c.n_heads, capacity, c.head_dim, device=self.device, dtype=self.dtype)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def reserve(self, index: int, new_tokens: int) -> KVCache:
        """The KVCache of row `index` (0 for a batch cache), grown to hold `new_tokens` more."""
        cache = self.kv[index]
        needed = cache.length + new_tokens
        if needed > cache.max_len:
            capacity = max(needed, min(2 * cache.max_len, self.config.max_seq_len), 16)
            grown = self._new(cache.keys[0].shape[0], capacity)
            for layer in range(len(cache.keys)):
                grown.keys[layer][:, :, :cache.length] = cache.keys[layer][:, :, :cache.length]
                grown.values[layer][:, :, :cache.length] = cache.values[layer][:, :, :cache.length]
            grown.length = cache.length
            self.kv[index] = cache = grown
        return cache

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Keep the rows `beam_idx` (B,) in that order (beam search)."""
        if self.per_row:
            old = self.kv
            self.kv = []
            for i in beam_idx.tolist():
                row = self._new(1, old[i].max_len)
                row.keys = [k.clone() for k in old[i].keys]
                row.values = [v.clone() for v in old[i].values]
                row.length = old[i].length
                self.kv.append(row)
        else:
            cache = self.kv[0]
            index = beam_idx.to(cache.keys[0].device)
            cache.keys = [k.index_select(0, index) for k in cache.keys]
            cache.values = [v.index_select(0, index) for v in cache.values]


class MemoryFormerForCausalLM(PreTrainedModel, GenerationMixin):
    """Our `LanguageModel` (either architecture) as a transformers causal LM; weights live under
    `model.` (model.embed.weight, model.blocks.0..., model.head.weight)."""

    config_class = MemoryFormerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["MemoryFormerBlock", "PythiaBlock"]
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}
    _supports_sdpa = True

    def __init__(self, config: MemoryFormerConfig, language_model: LanguageModel | None = None) -> None:
        super().__init__(config)
        self.model = language_model if language_model is not None else LanguageModel(config.to_model_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """LanguageModel initialises its own weights (small_init, wang_init, table init)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our own MemoryFormerCache is made by forward, not a transformers DynamicCache

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def set_output_embeddings(self, value: torch.nn.Module) -> None:
        self.model.head = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: MemoryFormerCache | None = None,
                past_key_values: MemoryFormerCache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        """input_ids (B, T) -> logits (B, T, vocab) (the last `logits_to_keep` positions if > 0).

        attention_mask (B, past + T): 1 for real tokens, 0 for padding. Positions are counted over real
        tokens only, so position_ids are not read. A cache (`cache` or `past_key_values`) holds the
        past; `use_cache=True` without one starts one. labels (B, T) give the shifted next-token loss
        (-100 ignored)."""
        if inputs_embeds is not None:
            raise ValueError("MemoryFormerForCausalLM takes input_ids, not inputs_embeds")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids of shape (batch, seq) are required")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, MemoryFormerCache):
            raise TypeError(f"MemoryFormerForCausalLM keeps its past in a MemoryFormerCache, got "
                            f"{type(cache).__name__}; let generate() make it (no cache_implementation)")
        B, T = input_ids.shape
        new_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must be (batch, past + seq), got {tuple(attention_mask.shape)} "
                                 f"for input_ids {tuple(input_ids.shape)}")
            new_mask = attention_mask[:, -T:].to(torch.bool)
            if bool(new_mask.all()):
                new_mask = None
        if use_cache is None:
            use_cache = cache is not None
        if use_cache and cache is None:
            ref = self.model.head.weight
            cache = MemoryFormerCache(self.model.config, B, per_row=new_mask is not None,
                                      device=ref.device, dtype=ref.dtype)
        keep = logits_to_keep if isinstance(logits_to_keep, int) else None
        if (cache is not None and cache.per_row) or (cache is None and new_mask is not None):
            logits = self._forward_rows(input_ids, new_mask, cache)
        else:
            if new_mask is not None:
                raise ValueError("padding appeared after an unpadded first step; start a new cache")
            kv = cache.reserve(0, T) if cache is not None else None
            last_only = keep == 1 and labels is None
            logits = self.model(input_ids, cache=kv, last_logits_only=last_only)[0]
        if cache is not None:
            cache.columns += T
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        if keep is None:
            logits = logits[:, logits_to_keep]
        elif keep > 0:
            logits = logits[:, -keep:]
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
        return out if return_dict is None or return_dict else out.to_tuple()

    def _forward_rows(self, input_ids: torch.Tensor, new_mask: torch.Tensor | None,
                      cache: MemoryFormerCache | None) -> torch.Tensor:
        """Each row's real tokens through the model on their own; logits at padding are 0."""
        B, T = input_ids.shape
        logits = None
        for row in range(B):
            keep = new_mask[row] if new_mask is not None else torch.ones(T, dtype=torch.bool, device=input_ids.device)
            ids = input_ids[row, keep][None]
            if ids.shape[1] == 0:
                continue
            kv = cache.reserve(row, ids.shape[1]) if cache is not None else None
            out = self.model(ids, cache=kv)[0][0]
            if logits is None:
                logits = out.new_zeros(B, T, out.shape[-1])
            logits[row, keep] = out
        if logits is None:
            weight = self.model.head.weight
            logits = weight.new_zeros(B, T, weight.shape[0])
        return logits

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, next_sequence_length: int | None = None,
                                      cache: MemoryFormerCache | None = None,
                                      past_key_values: MemoryFormerCache | None = None,
                                      attention_mask: torch.Tensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None,
                                      use_cache: bool | None = None, **kwargs: Any) -> dict[str, Any]:
        """The tokens not yet in the cache, the full attention mask, and the cache."""
        if inputs_embeds is not None:
            raise ValueError("MemoryFormerForCausalLM.generate takes input_ids, not inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            input_ids = input_ids[:, cache.columns:]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs
# </remote-code>

_REMOTE_HEADER = '''"""MemoryFormer for transformers (trust_remote_code): written by `memoryformer export`.

Self-contained copy of memoryformer's config.py, layer.py, model.py and the transformers classes of
hf.py. With the `memoryformer` package installed, `import memoryformer.integrations.hf` registers the same classes
and trust_remote_code is not needed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class _NoKernels:
    """Stands in for memoryformer.kernels: this copy has no C++ kernels, so every optional fast path
    (`try_*`) declines with None and the pure-PyTorch reference runs."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("try_"):
            return lambda *args, **kwargs: None
        raise AttributeError(f"memoryformer.kernels.{name} is not part of the exported model code")
'''

_OWN_IMPORT = re.compile(r"^(?P<indent>[ \t]*)(?P<stmt>from memoryformer[\w.]* import (\([^)]*\)|.*)"
                         r"|import memoryformer\S*.*)$", re.MULTILINE)
_KERNELS_IMPORT = re.compile(r"^(from memoryformer import kernels|import memoryformer\.kernels) as (?P<name>\w+)")


def _replace_own_import(match: re.Match) -> str:
    """`from memoryformer import kernels as K` -> `K = _NoKernels()`; other memoryformer imports go
    (their names are defined in the same file)."""
    indent, stmt = match.group("indent"), match.group("stmt")
    kernels = _KERNELS_IMPORT.match(stmt)
    if kernels:
        return f"{indent}{kernels.group('name')} = _NoKernels()  # was: {stmt}"
    return f"{indent}pass  # was: {' '.join(stmt.split())}"


def remote_code_source() -> str:
    """The text of the self-contained `modeling_memoryformer.py` (config, layer, model, HF classes)."""
    from memoryformer.core import config, layer, model, reference

    parts = [_REMOTE_HEADER]
    for module in (reference, config, layer, model):
        text = inspect.getsource(module).replace("from __future__ import annotations\n", "")
        text = _OWN_IMPORT.sub(_replace_own_import, text)
        parts.append(f"\n# {'=' * 90}\n# memoryformer/{Path(module.__file__).name}\n# {'=' * 90}\n{text}")
    own = inspect.getsource(sys.modules[__name__])
    region = own.split("# <remote-code>\n", 1)[1].split("# </remote-code>\n", 1)[0]
    parts.append(f"\n# {'=' * 90}\n# memoryformer/hf.py (transformers classes)\n# {'=' * 90}\n{region}")
    source = "".join(parts)
    compile(source, REMOTE_CODE_FILE, "exec")  # fail here, not at load time, if the assembly broke
    return source


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
    model_type = json.loads((path / "config.json").read_text())["model_type"]
    with _no_progress_bars():
        if model_type == "gpt_neox":
            model = LanguageModel.from_hf_gpt_neox(str(path))
        else:
            model = MemoryFormerForCausalLM.from_pretrained(str(path)).model
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json")) if (path / "tokenizer.json").is_file() else None
    if tokenizer is not None:
        check_tokenizer(tokenizer, model.config, f"{path / 'tokenizer.json'}")
    return model.to(device).eval(), tokenizer


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
    try:
        from memoryformer.train.checkpoint import load_model
    except ImportError as err:
        if err.name != "memoryformer.train.checkpoint":
            raise
        raise ValueError(_not_a_checkpoint(path)) from None
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

    MemoryFormerLM.__module__ = __name__
    _LM_EVAL_CLASS = MemoryFormerLM
    return MemoryFormerLM


def __getattr__(name: str) -> Any:
    if name == "MemoryFormerLM":
        return _lm_eval_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """`python -m memoryformer.integrations.hf ARGS`: lm-eval's command line with `--model memoryformer` registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":  # run through the package module, so only its classes are registered
    from memoryformer.integrations.hf import main as _main

    _main()
else:
    register()
