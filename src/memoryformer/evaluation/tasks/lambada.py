"""LAMBADA (OpenAI's detokenised test set, jsonl {text}); the target is the last space-separated word.

lm-eval (`lambada_openai`): context = the text up to the last " ", continuation = " " + last word.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memoryformer.evaluation.tasks.base import Completion, TaskFormatError, field, read_jsonl


def load_docs(path: str | Path) -> list[dict[str, Any]]:
    """Docs {text}."""
    docs = []
    for line, obj in read_jsonl(path):
        text = field(obj, "text", str, path, line)
        if " " not in text:
            raise TaskFormatError(path, line, "field 'text' has no space, so no context before its last word")
        docs.append({"text": text})
    return docs


def to_item(doc: dict[str, Any]) -> Completion:
    words = doc["text"].split(" ")
    return Completion(" ".join(words[:-1]), " " + words[-1])
