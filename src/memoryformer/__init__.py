"""MemoryFormer: transformers whose fully-connected layers are hash-table Memory Layers.

The names below load on first use (PEP 562), so importing one module, e.g. memoryformer.core.reference,
does not import the rest of the package.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "PRESETS": "memoryformer.core.config", "ModelConfig": "memoryformer.core.config",
    "MemoryLayer": "memoryformer.core.layer", "gather_sum": "memoryformer.core.layer",
    "memory_hash": "memoryformer.core.layer", "memory_layer": "memoryformer.core.layer",
    "KVCache": "memoryformer.core.model", "LanguageModel": "memoryformer.core.model",
}
__all__ = sorted(_HOMES)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")  # a subpackage: memoryformer.kernels, ...
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise  # the subpackage exists but needs something missing
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value
