"""Load a checkpoint of the official MemoryFormer code (a GPT-NeoX / DeepSpeed fork) into our model.

The official model is a DeepSpeed pipeline: layer 0 is the embedding, then one layer per MemoryFormer
block, then the final RMSNorm and the head. Its checkpoints hold either one file per pipeline layer
(`layer_XX-model_00-model_states.pt`, each a plain state dict) or one state dict whose keys start with
`sequential.XX.`. The layouts of every tensor agree with ours (flat `(K * 2**tau, out)` tables, the
chunk's first element the most significant hash bit); only the names differ:

    word_embeddings.weight               -> embed.weight
    input_layernorm.scale                -> blocks.i.attn_norm.weight
    attention.{query,key,value}_proj.*   -> blocks.i.attn.{q,k,v}_proj.{table,bias}   (tables -> table)
    post_attention_layernorm.scale       -> blocks.i.mlp_norm.weight
    mlp.0.* / mlp.1.* / mlp.2.*          -> blocks.i.mlp.ml1.* / mlp.norm.* / mlp.ml2.*
    norm.scale                           -> norm.weight
    final_linear.weight                  -> head.weight

The official weight is `||z||_1 * prod sigmoid(2|z|)`, so the model is built with `weighting="l1"`
(docs/method.md). Head count and context length are not stored in the weights: they default to the
official configurations (8 heads at d = 512 and 768, d / 64 otherwise; 2048 positions).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from memoryformer.core.config import ModelConfig

_LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_SEQUENTIAL_KEY = re.compile(r"^(?:module\.)?(?:sequential\.)?(\d+)\.(.+)$")
_BLOCK_NAMES = {
    "input_layernorm.scale": "attn_norm.weight",
    "attention.query_proj.tables": "attn.q_proj.table",
    "attention.query_proj.bias": "attn.q_proj.bias",
    "attention.key_proj.tables": "attn.k_proj.table",
    "attention.key_proj.bias": "attn.k_proj.bias",
    "attention.value_proj.tables": "attn.v_proj.table",
    "attention.value_proj.bias": "attn.v_proj.bias",
    "post_attention_layernorm.scale": "mlp_norm.weight",
    "mlp.0.tables": "mlp.ml1.table",
    "mlp.0.bias": "mlp.ml1.bias",
    "mlp.1.weight": "mlp.norm.weight",
    "mlp.1.bias": "mlp.norm.bias",
    "mlp.2.tables": "mlp.ml2.table",
    "mlp.2.bias": "mlp.ml2.bias",
}
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\._extra_state)$")  # recomputed buffers, not weights
OFFICIAL_HEADS = {512: 8, 768: 8}  # configs/memoryformer_{tiny,small}.yml


def _load_pt(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncation, foreign objects
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable tensor-only checkpoint ({first}); pass the "
                         "per-layer files (layer_XX-model_00-model_states.pt) or a plain state dict") from None


def read_official_layers(path: str | Path) -> dict[int, dict[str, Tensor]]:
    """{pipeline layer index: {name within the layer: tensor}} from a file or a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        return _read_layer_folder(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _split_sequential(load_file(str(path)), path)
    state = _load_pt(path)
    if isinstance(state, dict) and isinstance(state.get("module"), dict):
        state = state["module"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return _split_sequential(state, path)


def _read_layer_folder(folder: Path) -> dict[int, dict[str, Tensor]]:
    latest = folder / "latest"  # DeepSpeed's pointer to the newest global_stepN folder
    if latest.is_file() and (folder / latest.read_text().strip()).is_dir():
        folder = folder / latest.read_text().strip()
    files = {int(m.group(1)): (int(m.group(2)), f) for f in sorted(folder.iterdir())
             if (m := _LAYER_FILE.match(f.name))}
    if not files:
        raise ValueError(f"{folder} holds no layer_XX-model_00-model_states.pt files")
    if any(rank != 0 for rank, _ in files.values()) or any(folder.glob("layer_*-model_01-*")):
        raise ValueError(f"{folder} was saved with model parallelism > 1; merge the shards first")
    return {index: _load_pt(file) for index, (_, file) in sorted(files.items())}


def _split_sequential(state: dict, source: Path) -> dict[int, dict[str, Tensor]]:
    layers: dict[int, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        match = _SEQUENTIAL_KEY.match(key)
        if match is None:
            raise ValueError(f"{source}: key {key!r} is not a pipeline-layer name (sequential.N.*)")
        layers.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    return layers


def _infer_tau(d_model: int, table_rows: int) -> int:
    for tau in range(1, 17):
        if d_model % tau == 0 and (d_model // tau) << tau == table_rows:
            return tau
    raise ValueError(f"a Q table of {table_rows} rows fits no tau for d_model={d_model}")


def official_config(layers: dict[int, dict[str, Tensor]], *, n_heads: int | None = None,
                    max_seq_len: int = 2048) -> ModelConfig:
    """The ModelConfig the official weights describe (weighting "l1", the official norms)."""
    embed = _one_layer_with(layers, "word_embeddings.weight")["word_embeddings.weight"]
    blocks = _block_layers(layers)
    vocab, d_model = embed.shape
    first = blocks[0]
    tau = _infer_tau(d_model, first["attention.query_proj.tables"].shape[0])
    num_tables = d_model // tau
    ml2_rows = first["mlp.2.tables"].shape[0]
    expanding_bits = (ml2_rows // num_tables).bit_length() - 1 - tau
    return ModelConfig(
        vocab_size=vocab, n_layers=len(blocks), d_model=d_model,
        n_heads=n_heads or OFFICIAL_HEADS.get(d_model, max(1, d_model // 64)), max_seq_len=max_seq_len,
        architecture="memoryformer", rotary_pct=0.25, rotary_base=10000.0, norm_eps=1e-5, rms_norm_eps=1e-8,
        tau=tau, expanding_bits=expanding_bits, weighting="l1", memory_bias="mlp.0.bias" in first,
        tie_embeddings=False,
    )


def _one_layer_with(layers: dict[int, dict[str, Tensor]], name: str) -> dict[str, Tensor]:
    found = [layer for layer in layers.values() if name in layer]
    if len(found) != 1:
        raise ValueError(f"expected one pipeline layer holding {name!r}, found {len(found)}")
    return found[0]


def _block_layers(layers: dict[int, dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    blocks = [layers[i] for i in sorted(layers) if "attention.query_proj.tables" in layers[i]]
    if not blocks:
        raise ValueError("no MemoryFormer blocks (attention.query_proj.tables) in the checkpoint")
    if any("attention.hash.projection.weight" in b or "attention.value_proj.hash.projection.weight" in b
           for b in blocks):
        raise ValueError("the checkpoint hashes through a learned projection (remove_projection: false), "
                         "which this package does not implement")
    return blocks


def official_state_dict(layers: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """The official tensors under our parameter names (see the module docstring)."""
    state = {"embed.weight": _one_layer_with(layers, "word_embeddings.weight")["word_embeddings.weight"],
             "norm.weight": _one_layer_with(layers, "norm.scale")["norm.scale"],
             "head.weight": _one_layer_with(layers, "final_linear.weight")["final_linear.weight"]}
    for i, block in enumerate(_block_layers(layers)):
        for name, tensor in block.items():
            if _IGNORED.search(name):
                continue
            if name not in _BLOCK_NAMES:
                raise ValueError(f"block {i}: unexpected official parameter {name!r}")
            state[f"blocks.{i}.{_BLOCK_NAMES[name]}"] = tensor
    return state


def load_official(path: str | Path, *, n_heads: int | None = None, max_seq_len: int = 2048):
    """An official MemoryFormer checkpoint as our LanguageModel (float32, eval mode)."""
    from memoryformer.core.model import LanguageModel

    layers = read_official_layers(path)
    config = official_config(layers, n_heads=n_heads, max_seq_len=max_seq_len)
    model = LanguageModel(config)
    state = {k: v.float() for k, v in official_state_dict(layers).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: the official weights do not fit the inferred model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
