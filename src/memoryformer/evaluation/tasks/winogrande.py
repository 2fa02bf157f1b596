"""WinoGrande (`dev.jsonl`: {qID, sentence with one "_", option1, option2, answer "1"/"2"}).

lm-eval (`winogrande`) scores partially: one context per option, the sentence up to "_" with the option
put in; the shared continuation is " " + the rest of the sentence after "_" (stripped).
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
    """Docs {sentence, option1, option2, answer: "1"|"2"}.

    The answer comes from the jsonl's `answer` field; when the file has none (or `labels_path` is
    given), from a labels file (default `<stem>-labels.lst` beside `path`).
    """
    docs = []
    for line, obj in read_jsonl(path):
        doc = {key: field(obj, key, str, path, line) for key in ("sentence", "option1", "option2")}
        if "_" not in doc["sentence"]:
            raise TaskFormatError(path, line, f"field 'sentence' has no '_' blank: {doc['sentence']!r}")
        if "answer" in obj and labels_path is None:
            answer = str(field(obj, "answer", (str, int), path, line))
            if answer not in ("1", "2"):
                raise TaskFormatError(path, line, f"field 'answer' should be '1' or '2', got {obj['answer']!r}")
            doc["answer"] = answer
        docs.append(doc)
    if any("answer" not in doc for doc in docs):
        labels_path = labels_file_next_to(path) if labels_path is None else labels_path
        for doc, label in zip(docs, read_labels(labels_path, len(docs), ("1", "2"))):
            doc["answer"] = label
    return docs


def to_item(doc: dict[str, Any]) -> MultipleChoice:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = tuple(sentence[:blank] + option for option in (doc["option1"], doc["option2"]))
    continuation = " " + sentence[blank + 1:].strip()
    return MultipleChoice(tuple((c, continuation) for c in contexts), int(doc["answer"]) - 1, contexts)
