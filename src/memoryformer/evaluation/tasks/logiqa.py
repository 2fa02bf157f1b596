"""LogiQA (`Eval.txt`): records of 8 lines: blank, answer letter, passage, question, 4 options "A.text".

Parsed as lm-eval's `EleutherAI/logiqa` loader does: every "." becomes ". " and the text is stripped;
each option loses its first two characters ("A."). lm-eval's (`logiqa`) prompt is
"Passage: {context}\\nQuestion: {question}\\nChoices:\\nA. {o1}\\nB. ...\\nD. {o4}\\nAnswer:" and the
continuations are " {option}".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memoryformer.evaluation.tasks.base import MultipleChoice, TaskFormatError, field, read_jsonl, read_lines

LETTERS = ("a", "b", "c", "d")


def _normalize(text: str) -> str:
    return text.replace(".", ". ").strip()


def load_docs(path: str | Path) -> list[dict[str, Any]]:
    """Docs {label: "a".."d", context, question, options: [4 str]}, from `Eval.txt` or converted jsonl."""
    if str(path).endswith((".jsonl", ".json")):
        return _load_jsonl(path)
    lines = read_lines(path)
    records: list[tuple[int, list[str]]] = []  # (line number of the answer letter, the record's lines)
    current: list[str] | None = None
    for number, line in enumerate(lines, start=1):
        if line.strip() == "":
            current = None
        elif current is None:
            current = [line]
            records.append((number, current))
        else:
            current.append(line)
    docs = []
    for number, record in records:
        if len(record) != 7:
            raise TaskFormatError(
                path, number,
                f"record has {len(record)} non-blank lines; expected 7 (answer letter, passage, question, "
                "4 options), each record preceded by a blank line",
            )
        label = record[0].strip().lower()
        if label not in LETTERS:
            raise TaskFormatError(path, number, f"answer letter {record[0].strip()!r} is not one of a, b, c, d")
        docs.append({
            "label": label,
            "context": _normalize(record[1]),
            "question": _normalize(record[2]),
            "options": [_normalize(option[2:]) for option in record[3:]],
        })
    if not docs:
        raise TaskFormatError(path, None, "no records found")
    return docs


def _load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    docs = []
    for line, obj in read_jsonl(path):
        doc = {key: field(obj, key, str, path, line) for key in ("label", "context", "question")}
        options = field(obj, "options", list, path, line)
        if len(options) != 4 or not all(isinstance(o, str) for o in options):
            raise TaskFormatError(path, line, f"field 'options' should be 4 strings, got {options!r}")
        if doc["label"].strip() not in LETTERS:
            raise TaskFormatError(path, line, f"field 'label' is {doc['label']!r}, not one of a, b, c, d")
        docs.append({**doc, "options": list(options)})
    return docs


def to_item(doc: dict[str, Any]) -> MultipleChoice:
    prompt = f"Passage: {doc['context']}\nQuestion: {doc['question']}\nChoices:\n"
    for letter, option in zip(LETTERS, doc["options"]):
        prompt += f"{letter.upper()}. {option}\n"
    prompt += "Answer:"
    choices = tuple(doc["options"])
    return MultipleChoice(tuple((prompt, " " + c) for c in choices), LETTERS.index(doc["label"].strip()), choices)
