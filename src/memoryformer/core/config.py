"""ModelConfig: one dataclass for both architectures, with the paper's named presets.

Presets follow the paper's section 3.1 (docs/method.md, "Presets"): MemoryFormer tiny / small /
base have the depth, width and heads of Pythia-70M / 160M / 410M, tau = 8, K = d / 8 and two
expanding bits. Small presets of our own (`mf-demo`, `mf-test`, ...) exist for CPU runs and tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memoryformer.core.reference import MAX_TAU, WEIGHTINGS, check_tau

ARCHITECTURES = ("memoryformer", "pythia")
ACTIVATIONS = (None, "gelu")
ATTENTIONS = ("softmax", "performer", "cosformer", "linformer")  # the Pythia twin's attention (paper Table 2)


class JsonConfig:
    """dict / JSON round trip and `replace` for the config dataclasses (ModelConfig, TrainConfig)."""

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        """Parse a JSON string, or read a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


@dataclass
class ModelConfig(JsonConfig):
    """Every setting of a MemoryFormer or Pythia-twin language model.

    Fields that only one architecture reads are ignored by the other: tau, expanding_bits,
    weighting, temperature, memory_block_activation and table_init_std are MemoryFormer's;
    intermediate_size, parallel_residual and attention_bias are Pythia's.
    """

    vocab_size: int = 50304
    n_layers: int = 6
    d_model: int = 512
    n_heads: int = 8
    max_seq_len: int = 2048
    architecture: str = "memoryformer"
    # attention
    attention: str = "softmax"  # Pythia only: "performer", "cosformer", "linformer" (Table 2; core/linear_attention.py)
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    # norms: LayerNorm eps (Pythia's norms, and the LayerNorm inside the Memory Block);
    # RMSNorm eps (MemoryFormer's pre-norms and final norm, GPT-NeoX form: x / (rms + eps))
    norm_eps: float = 1e-5
    rms_norm_eps: float = 1e-8
    # MemoryFormer
    tau: int = 8
    expanding_bits: int = 2
    weighting: str = "prob"
    temperature: float = 1.0
    memory_block_activation: str | None = None
    memory_bias: bool = True
    table_init_std: float = 0.02
    # Pythia twin
    intermediate_size: int | None = None  # default 4 * d_model
    parallel_residual: bool = True
    attention_bias: bool = True
    # both: std of the embedding, head and Q/K/V tables (dense weights for Pythia);
    # None means small_init, sqrt(2 / (5 d))
    init_std: float | None = None
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def num_tables(self) -> int:
        """K: the number of hash tables of each Memory Layer (d_model / tau)."""
        return self.d_model // self.tau

    @property
    def memory_hidden(self) -> int:
        """Width between ML1 and ML2: K * (tau + expanding_bits)."""
        return self.num_tables * (self.tau + self.expanding_bits)

    @property
    def ffn_hidden(self) -> int:
        return self.intermediate_size or 4 * self.d_model

    @property
    def resolved_init_std(self) -> float:
        return self.init_std if self.init_std is not None else math.sqrt(2.0 / (5.0 * self.d_model))

    def validate(self) -> None:
        """Check every field's type and range (`_FIELD_RULES`), then the relations between fields; raise one
        TypeError / ValueError naming the field, the value and what is expected."""
        for f in dataclasses.fields(self):
            rule = _FIELD_RULES.get(f.name)
            if rule is not None:
                setattr(self, f.name, rule(f.name, getattr(self, f.name)))
        self._validate_relations()

    def _validate_relations(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"ModelConfig: {msg}")

        need(self.attention == "softmax" or self.architecture == "pythia",
             f"attention={self.attention!r} replaces the Pythia twin's attention; MemoryFormer uses softmax")
        need(self.d_model % self.n_heads == 0, f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        need(self.rotary_dims % 2 == 0, f"rotary dims per head ({self.rotary_dims}) must be even")
        if self.architecture == "memoryformer":
            need(self.d_model % self.tau == 0, f"d_model={self.d_model} is not divisible by tau={self.tau}")
            need(self.tau + self.expanding_bits <= MAX_TAU,
                 f"tau + expanding_bits must be <= {MAX_TAU}, got {self.tau} + {self.expanding_bits}")

    # ---- presets and serialisation -------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def twin(self) -> ModelConfig:
        """The same depth, width, heads, vocabulary and rotary settings in the other architecture."""
        other = "pythia" if self.architecture == "memoryformer" else "memoryformer"
        return self.replace(architecture=other)


# ---- field rules: each takes (name, value) and returns the value (ints and floats normalised) or raises --
def _fail(name: str, value: Any, expected: str, error: type[Exception] = ValueError) -> None:
    raise error(f"ModelConfig.{name} must be {expected}, got {value!r} ({type(value).__name__})")


def _integer(minimum: int) -> Callable[[str, Any], int]:
    def rule(name: str, value: Any) -> int:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            _fail(name, value, expected, TypeError)
        if value < minimum:
            _fail(name, value, expected)
        return int(value)
    return rule


def _number(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str, Any], float]:
    def rule(name: str, value: Any) -> float:
        bracket = "(" if low_open else "["
        expected = f"a number in {bracket}{low:g}, {high:g}]" if high < math.inf else (
            "a positive finite number" if low_open and low == 0 else f"a finite number >= {low:g}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            _fail(name, value, expected, TypeError)
        inside = (low < value if low_open else low <= value) and value <= high and math.isfinite(value)
        if not inside:
            _fail(name, value, expected)
        return float(value)
    return rule


def _optional(rule: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else rule(name, value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(name, value, "true or false", TypeError)
    return value


def _choice(options: tuple) -> Callable[[str, Any], Any]:
    def rule(name: str, value: Any) -> Any:
        if value not in options or (value is not None and not isinstance(value, str)):
            _fail(name, value, f"one of {options}")
        return value
    return rule


def _tau(name: str, value: Any) -> int:
    return check_tau(value, f"ModelConfig.{name}")


_FIELD_RULES: dict[str, Callable[[str, Any], Any]] = {
    "vocab_size": _integer(1), "n_layers": _integer(1), "d_model": _integer(1), "n_heads": _integer(1),
    "max_seq_len": _integer(1), "architecture": _choice(ARCHITECTURES), "attention": _choice(ATTENTIONS),
    "rotary_pct": _number(0.0, 1.0), "rotary_base": _number(0.0, low_open=True),
    "norm_eps": _number(0.0, low_open=True), "rms_norm_eps": _number(0.0, low_open=True),
    "tau": _tau, "expanding_bits": _integer(0), "weighting": _choice(WEIGHTINGS),
    "temperature": _number(0.0, low_open=True), "memory_block_activation": _choice(ACTIVATIONS),
    "memory_bias": _flag, "table_init_std": _number(0.0),
    "intermediate_size": _optional(_integer(1)), "parallel_residual": _flag, "attention_bias": _flag,
    "init_std": _optional(_number(0.0)), "tie_embeddings": _flag,
}


_MF = dict(architecture="memoryformer", tau=8, expanding_bits=2)
_PY = dict(architecture="pythia")

PRESETS: dict[str, dict[str, Any]] = {
    # the paper's models (section 3.1)
    "mf-tiny": dict(**_MF, n_layers=6, d_model=512, n_heads=8),
    "mf-small": dict(**_MF, n_layers=12, d_model=768, n_heads=12),
    "mf-base": dict(**_MF, n_layers=24, d_model=1024, n_heads=16),
    "pythia-70m": dict(**_PY, n_layers=6, d_model=512, n_heads=8),
    "pythia-160m": dict(**_PY, n_layers=12, d_model=768, n_heads=12),
    "pythia-410m": dict(**_PY, n_layers=24, d_model=1024, n_heads=16),
    # ours, for CPU runs: the main job's pair (d = 256, 4 layers, vocabulary 4096, sequence 256)
    "mf-demo": dict(**_MF, n_layers=4, d_model=256, n_heads=4, vocab_size=4096, max_seq_len=256),
    "pythia-demo": dict(**_PY, n_layers=4, d_model=256, n_heads=4, vocab_size=4096, max_seq_len=256),
    # ours, for tests: seconds on a CPU
    "mf-test": {**_MF, "n_layers": 2, "d_model": 64, "n_heads": 4, "vocab_size": 256, "max_seq_len": 64, "tau": 4},
    "pythia-test": dict(**_PY, n_layers=2, d_model=64, n_heads=4, vocab_size=256, max_seq_len=64),
}

# the paper's twin pairs, MemoryFormer preset -> dense preset
PAPER_PAIRS = {"mf-tiny": "pythia-70m", "mf-small": "pythia-160m", "mf-base": "pythia-410m"}
