"""ARC-Easy / ARC-Challenge in AI2's jsonl: {id, question: {stem, choices: [{text, label}]}, answerKey}.

lm-eval (`arc_easy`, `arc_challenge`): context "Question: {stem}\\nAnswer:", continuations " {text}";
the gold index is the position of `answerKey` among the choice labels (A-E or 1-5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memoryformer.evaluation.tasks.base import MultipleChoice, TaskFormatError, field, read_jsonl


def load_docs(path: str | Path) -> list[dict[str, Any]]:
    """Docs in the Hugging Face `ai2_arc` layout: {id, question, choices: {text, label}, answerKey}.

    Accepts AI2's nested layout (`question: {stem, choices}`) and the flat Hugging Face one.
    """
    docs = []
    for line, obj in read_jsonl(path):
        question = field(obj, "question", (dict, str), path, line)
        if isinstance(question, dict):
            stem = field(question, "stem", str, path, line)
            raw = field(question, "choices", list, path, line)
            texts, labels = [], []
            for number, choice in enumerate(raw):
                if not isinstance(choice, dict):
                    raise TaskFormatError(path, line, f"question.choices[{number}] should be an object {{text, label}}")
                texts.append(field(choice, "text", str, path, line))
                labels.append(str(field(choice, "label", (str, int), path, line)))
        else:
            stem = question
            choices = field(obj, "choices", dict, path, line)
            texts = [str(t) for t in field(choices, "text", list, path, line)]
            labels = [str(t) for t in field(choices, "label", list, path, line)]
            if len(texts) != len(labels):
                raise TaskFormatError(path, line, f"choices has {len(texts)} texts but {len(labels)} labels")
        answer = str(field(obj, "answerKey", (str, int), path, line))
        if len(texts) < 2:
            raise TaskFormatError(path, line, f"needs at least 2 choices, got {len(texts)}")
        if len(set(labels)) != len(labels):
            raise TaskFormatError(path, line, f"choice labels repeat: {labels}")
        if answer not in labels:
            raise TaskFormatError(path, line, f"field 'answerKey' is {answer!r}, not one of the choice labels {labels}")
        docs.append({
            "id": str(obj.get("id", line)),
            "question": stem,
            "choices": {"text": texts, "label": labels},
            "answerKey": answer,
        })
    return docs


def to_item(doc: dict[str, Any]) -> MultipleChoice:
    choices = tuple(doc["choices"]["text"])
    context = f"Question: {doc['question']}\nAnswer:"
    gold = doc["choices"]["label"].index(doc["answerKey"])
    return MultipleChoice(tuple((context, " " + c) for c in choices), gold, choices)
