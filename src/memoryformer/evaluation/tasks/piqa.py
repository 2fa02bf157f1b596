"""PIQA: `valid.jsonl` ({goal, sol1, sol2}) plus `valid-labels.lst` (0/1 per line, aligned).

lm-eval (`piqa`): context "Question: {goal}\\nAnswer:", continuations " {sol1}" / " {sol2}".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memoryformer.evaluation.tasks.base import (
    MultipleChoice,
    TaskFormatError,
    field,
    labels_file_next_to,
    read_jsonl,
    read_labels,
)


def load_docs(path: str | Path, labels_path: str | Path | None = None) -> list[dict[str, Any]]:
    """Docs {goal, sol1, sol2, label: int}; the labels file defaults to `<stem>-labels.lst` beside `path`.

    A `label` field in the jsonl itself (as in converted files) is used when present.
    """
    docs = []
    for line, obj in read_jsonl(path):
        doc = {key: field(obj, key, str, path, line) for key in ("goal", "sol1", "sol2")}
        if "label" in obj:
            label = field(obj, "label", int, path, line)
            if label not in (0, 1):
                raise TaskFormatError(path, line, f"field 'label' should be 0 or 1, got {label!r}")
            doc["label"] = label
        docs.append(doc)
    if docs and all("label" in doc for doc in docs) and labels_path is None:
        return docs
    labels_path = labels_file_next_to(path) if labels_path is None else labels_path
    for doc, label in zip(docs, read_labels(labels_path, len(docs), ("0", "1"))):
        doc["label"] = int(label)
    return docs


def to_item(doc: dict[str, Any]) -> MultipleChoice:
    choices = (doc["sol1"], doc["sol2"])
    context = f"Question: {doc['goal']}\nAnswer:"
    return MultipleChoice(tuple((context, " " + c) for c in choices), doc["label"], choices)
