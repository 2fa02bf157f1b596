"""HellaSwag validation as 6-line text records (optionally .bz2): context, label 0-3, 4 endings.

lm-eval (`hellaswag`) builds its query as preprocess(activity_label + ": " + ctx_a + " " +
ctx_b.capitalize()) and its continuations as " " + preprocess(ending). These files hold the joined
context without ctx_b's capitalisation, so the reader redoes it as far as it can: the last sentence
fragment (where ctx_b starts in ActivityNet items) is capitalised when it starts lower-case. The
files' own bracket clean-up also differs slightly from lm-eval's; `preprocess` is applied on top.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from memoryformer.evaluation.tasks.base import MultipleChoice, TaskFormatError, field, read_jsonl, read_lines

_SENTENCE_END = re.compile(r"[.!?] ")


def preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: strip, " [title]" -> ". ", drop [bracketed] text, fix double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def capitalize_last_fragment(context: str) -> str:
    """Redo `ctx_b.capitalize()`: capitalise the text after the last sentence end if it starts lower-case."""
    start = context.find(": ") + 2 if ": " in context else 0
    for match in _SENTENCE_END.finditer(context, start):
        start = match.end()
    fragment = context[start:]
    if fragment[:1].islower():
        return context[:start] + fragment.capitalize()
    return context


def load_docs(path: str | Path) -> list[dict[str, Any]]:
    """Docs {query, choices: [4 str], label: str, gold: int} (lm-eval's processed HellaSwag layout)."""
    if str(path).endswith((".jsonl", ".json")):
        return _load_jsonl(path)
    lines = read_lines(path)
    if len(lines) % 6:
        raise TaskFormatError(
            path, len(lines),
            f"has {len(lines)} lines, not a multiple of 6 (context, label, 4 endings per example); "
            f"the last example, from line {len(lines) - len(lines) % 6 + 1}, is incomplete",
        )
    docs = []
    for start in range(0, len(lines), 6):
        context, label, *endings = lines[start:start + 6]
        if label.strip() not in ("0", "1", "2", "3"):
            raise TaskFormatError(path, start + 2, f"label {label!r} is not 0-3 (expected lines: context, label, 4 endings)")
        docs.append({
            "query": preprocess(capitalize_last_fragment(context)),
            "choices": [preprocess(ending) for ending in endings],
            "label": label.strip(),
            "gold": int(label),
        })
    return docs


def _load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    docs = []
    for line, obj in read_jsonl(path):
        query = field(obj, "query", str, path, line)
        choices = field(obj, "choices", list, path, line)
        label = str(field(obj, "label", (str, int), path, line))
        if not label.isdigit() or int(label) >= len(choices):
            raise TaskFormatError(path, line, f"field 'label' is {label!r}, not an index into the {len(choices)} choices")
        docs.append({"query": query, "choices": [str(c) for c in choices], "label": label, "gold": int(label)})
    return docs


def to_item(doc: dict[str, Any]) -> MultipleChoice:
    choices = tuple(doc["choices"])
    return MultipleChoice(tuple((doc["query"], " " + c) for c in choices), doc["gold"], choices)
