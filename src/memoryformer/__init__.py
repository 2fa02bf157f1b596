"""MemoryFormer: transformers whose fully-connected layers are hash-table Memory Layers."""

from memoryformer.core.config import PRESETS, ModelConfig
from memoryformer.core.layer import MemoryLayer, gather_sum, memory_hash, memory_layer
from memoryformer.core.model import KVCache, LanguageModel

__all__ = [
    "KVCache", "LanguageModel", "MemoryLayer", "ModelConfig", "PRESETS",
    "gather_sum", "memory_hash", "memory_layer",
]
__version__ = "0.1.0"
