"""What every task reader shares: the request types, the format error, line-numbered file reading.

A reader turns a task file into *docs* (plain dicts in the field layout of the Hugging Face dataset that
lm-eval's own task reads) and each doc into an *item*: the exact (context, continuation) strings that
lm-eval would send to a model. Docs are what `write_lm_eval_tasks` writes to jsonl for lm-eval; items
are what our scorer consumes. Keeping both in one reader is what makes the two agree.
"""

from __future__ import annotations

import bz2
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TaskFormatError(ValueError):
    """A task file is not in the expected format; the message names the file, line and field."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


@dataclass(frozen=True)
class MultipleChoice:
    """One question: a (context, continuation) request per choice, and the index of the right one.

    `choices` are lm-eval's `doc_to_choice` strings, whose lengths `acc_norm` divides by (for the
    partial-scoring tasks WinoGrande and WSC273 they are the contexts, as in lm-eval).
    """

    requests: tuple[tuple[str, str], ...]
    gold: int
    choices: tuple[str, ...]


@dataclass(frozen=True)
class Completion:
    """One log-likelihood request: score `continuation` after `context` (LAMBADA's last word)."""

    context: str
    continuation: str


Item = MultipleChoice | Completion


def open_text(path: str | Path):
    """Open a text file as UTF-8, decompressing `.bz2` and `.gz` by suffix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_lines(path: str | Path) -> list[str]:
    """All lines of a text file without their line endings (a final newline adds no empty line)."""
    with open_text(path) as handle:
        return handle.read().splitlines()


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a jsonl file; line numbers start at 1."""
    with open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskFormatError(path, number, f"not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise TaskFormatError(path, number, f"expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str | Path, line: int) -> Any:
    """`obj[key]`, checked to exist and to be of `kind`; raise a `TaskFormatError` naming it otherwise."""
    if key not in obj:
        raise TaskFormatError(path, line, f"missing field {key!r} (fields present: {sorted(obj)})")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TaskFormatError(path, line, f"field {key!r} should be a {names}, got {value!r}")
    return value


def read_labels(path: str | Path, expected: int, allowed: tuple[str, ...]) -> list[str]:
    """Read a one-label-per-line file, checking each label is in `allowed` and the count matches."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path} (pass labels_path= to point at it)")
    labels = [line.strip() for line in read_lines(path)]
    while labels and labels[-1] == "":
        labels.pop()
    for number, label in enumerate(labels, start=1):
        if label not in allowed:
            raise TaskFormatError(path, number, f"label {label!r} is not one of {list(allowed)}")
    if len(labels) != expected:
        raise TaskFormatError(
            path, None, f"has {len(labels)} labels but its data file has {expected} examples; they must align"
        )
    return labels


def labels_file_next_to(path: str | Path) -> Path:
    """`dir/valid.jsonl` -> `dir/valid-labels.lst`, the layout PIQA and WinoGrande ship."""
    path = Path(path)
    return path.with_name(f"{path.name.split('.')[0]}-labels.lst")
