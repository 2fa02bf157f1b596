"""Conversion between our Pythia twin and transformers' `GPTNeoXForCausalLM`, in both directions.

Parameter names inside a block already match transformers' GPTNeoXLayer; only the outer names differ:
    ours            transformers
    embed.*         gpt_neox.embed_in.*
    blocks.{i}.*    gpt_neox.layers.{i}.*
    norm.*          gpt_neox.final_layer_norm.*
    head.*          embed_out.* (transformers 4.x) or lm_head.* (transformers 5.x)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from memoryformer.core.config import ModelConfig

_OUTER = [("embed.", "gpt_neox.embed_in."), ("blocks.", "gpt_neox.layers."),
          ("norm.", "gpt_neox.final_layer_norm."), ("head.", "embed_out."), ("head.", "lm_head.")]
# transformers may keep buffers in the state dict (rotary inv_freq, masks): not weights
_HF_BUFFERS = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias", "original_inv_freq")


def _rope(hf_config: Any) -> tuple[float, float]:
    """(partial rotary factor, base) from a GPTNeoXConfig of transformers 4.x or 5.x."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    pct = rope.get("partial_rotary_factor", getattr(hf_config, "rotary_pct", 0.25))
    base = rope.get("rope_theta", getattr(hf_config, "rotary_emb_base", 10000.0))
    return float(pct), float(base)


def config_from_hf(hf_config: Any) -> ModelConfig:
    """A Pythia-twin ModelConfig equal to a transformers GPTNeoXConfig."""
    act = getattr(hf_config, "hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"only GPT-NeoX models with hidden_act='gelu' are supported, got {act!r}")
    rope_type = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"only default rotary embeddings are supported, got rope_type={rope_type!r}")
    pct, base = _rope(hf_config)
    return ModelConfig(
        architecture="pythia",
        vocab_size=hf_config.vocab_size,
        n_layers=hf_config.num_hidden_layers,
        d_model=hf_config.hidden_size,
        n_heads=hf_config.num_attention_heads,
        max_seq_len=hf_config.max_position_embeddings,
        intermediate_size=hf_config.intermediate_size,
        rotary_pct=pct,
        rotary_base=base,
        norm_eps=hf_config.layer_norm_eps,
        parallel_residual=hf_config.use_parallel_residual,
        attention_bias=getattr(hf_config, "attention_bias", True),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
    )


def config_to_hf(config: ModelConfig, **extra: Any):
    """A transformers GPTNeoXConfig for a Pythia-twin ModelConfig."""
    from transformers import GPTNeoXConfig

    if config.architecture != "pythia":
        raise ValueError("only the Pythia twin converts to GPTNeoX; MemoryFormer has its own HF classes")
    return GPTNeoXConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        intermediate_size=config.ffn_hidden,
        hidden_act="gelu",
        rotary_pct=config.rotary_pct,
        rotary_emb_base=config.rotary_base,
        max_position_embeddings=config.max_seq_len,
        layer_norm_eps=config.norm_eps,
        use_parallel_residual=config.parallel_residual,
        attention_bias=config.attention_bias,
        tie_word_embeddings=config.tie_embeddings,
        **extra,
    )


def state_dict_from_hf(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers GPTNeoXForCausalLM state dict -> our LanguageModel's."""
    out = {}
    for name, value in hf_state.items():
        if name.endswith(_HF_BUFFERS):
            continue
        for ours, theirs in _OUTER:
            if name.startswith(theirs):
                out[ours + name[len(theirs):]] = value
                break
        else:
            raise ValueError(f"unexpected GPT-NeoX parameter {name!r}")
    return out


def state_dict_to_hf(state: dict[str, Tensor], head_prefix: str = "embed_out.") -> dict[str, Tensor]:
    """Our Pythia-twin LanguageModel state dict -> transformers GPTNeoXForCausalLM's.

    head_prefix: "embed_out." (the name in checkpoints) or "lm_head." (the module name in transformers 5)."""
    out = {}
    outer = [(o, t) for o, t in _OUTER if o != "head."] + [("head.", head_prefix)]
    for name, value in state.items():
        for ours, theirs in outer:
            if name.startswith(ours):
                out[theirs + name[len(ours):]] = value
                break
        else:
            raise ValueError(f"unexpected parameter {name!r}")
    return out
