"""WSC273 in llm-foundry's jsonl: {context_options: [two contexts], continuation, gold}.

Partial scoring as lm-eval's `wsc273`: each context (the sentence up to the pronoun, with a candidate
put in its place) is followed by the shared continuation " {continuation}".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memoryformer.evaluation.tasks.base import MultipleChoice, TaskFormatError, field, read_jsonl


def load_docs(path: str | Path) -> list[dict[str, Any]]:
    """Docs {context_options: [str, ...], continuation: str, gold: int}."""
    docs = []
    for line, obj in read_jsonl(path):
        options = field(obj, "context_options", list, path, line)
        if len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise TaskFormatError(path, line, f"field 'context_options' should be a list of 2+ strings, got {options!r}")
        continuation = field(obj, "continuation", str, path, line)
        gold = field(obj, "gold", int, path, line)
        if not 0 <= gold < len(options):
            raise TaskFormatError(path, line, f"field 'gold' is {gold}, outside 0..{len(options) - 1}")
        docs.append({"context_options": list(options), "continuation": continuation, "gold": gold})
    return docs


def to_item(doc: dict[str, Any]) -> MultipleChoice:
    contexts = tuple(doc["context_options"])
    continuation = " " + doc["continuation"]
    return MultipleChoice(tuple((c, continuation) for c in contexts), doc["gold"], contexts)
