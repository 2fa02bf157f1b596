"""transformers classes of a MemoryFormer (either architecture): config, KV cache, causal LM.

These are also what the exported `modeling_memoryformer.py` holds (with config.py, layer.py, model.py
and neox.py; `scripts/generate_remote_code.py` writes it), so they import only torch, transformers and
memoryformer's core modules. `memoryformer.integrations.hf` registers them with transformers' Auto
classes and re-exports them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from memoryformer.core.config import ModelConfig
from memoryformer.core.model import KVCache, LanguageModel

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
