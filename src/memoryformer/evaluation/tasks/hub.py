"""Task data from the Hugging Face hub, through `datasets.load_dataset`, for `eval --task NAME` without
local files.

    docs = load_hub_docs("piqa")                                   # baber/piqa, validation split
    docs = load_hub_docs("piqa", dataset_path="json", data_files={"validation": "piqa.jsonl"})

The datasets are the ones lm-eval's own task configs load (dataset_path / dataset_name), at the split
that matches our local default file of each task (validation, or test where that is the local one:
WSC273, LAMBADA). Each row is brought into the layout of the task's local reader (the same field names
for most; WSC273 and HellaSwag get lm-eval's own `process_docs` first) and read by that reader, so a
hub row and a local line are checked alike and give the same (context, continuation) requests.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memoryformer.evaluation.tasks.base import TaskFormatError
from memoryformer.evaluation.tasks.hellaswag import preprocess


@dataclass(frozen=True)
class HubSource:
    """Where a task's data lives on the hub, and how a row becomes a line of the local reader's jsonl."""

    path: str  # datasets.load_dataset's `path`
    name: str | None  # its `name` (the dataset config)
    split: str
    to_line: Callable[[dict[str, Any]], dict[str, Any]] = dict

    def describe(self) -> str:
        return f"{self.path}" + (f" ({self.name})" if self.name else "") + f", {self.split} split"


def _wsc273_line(row: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's wsc273 `process_doc` and its doc_to_choice / doc_to_target, as llm-foundry's layout."""
    text = str(row["text"]).replace("  ", " ")
    options = [_wsc_option(row, text, option) for option in row["options"]]
    loc = int(row["pronoun_loc"])
    return {"context_options": [text[:loc] + option for option in options],
            "continuation": text[loc + len(row["pronoun"]):], "gold": row["label"]}


_UPPER_PRONOUNS = ("A", "An", "The", "She", "He", "It", "They", "My", "His", "Her", "Their")


def _wsc_option(row: dict[str, Any], text: str, option: str) -> str:
    if row["pronoun"].lower() in ("my", "his", "her", "our", "their"):
        option += "'s"
    pronoun = option.split()[0]
    start_of_sentence = text[int(row["pronoun_loc"]) - 2] == "."
    if not start_of_sentence and pronoun in _UPPER_PRONOUNS:
        return option.replace(pronoun, pronoun.lower())
    return option


def _hellaswag_line(row: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's hellaswag `process_docs`: the query from activity label and both context halves."""
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"query": preprocess(row["activity_label"] + ": " + context),
            "choices": [preprocess(ending) for ending in row["endings"]], "label": str(row["label"])}


HUB: dict[str, HubSource] = {
    "piqa": HubSource("baber/piqa", None, "validation"),
    "arc_easy": HubSource("allenai/ai2_arc", "ARC-Easy", "validation"),
    "arc_challenge": HubSource("allenai/ai2_arc", "ARC-Challenge", "validation"),
    "winogrande": HubSource("allenai/winogrande", "winogrande_xl", "validation"),
    "wsc273": HubSource("lighteval/winograd_wsc", "wsc273", "test", _wsc273_line),
    "logiqa": HubSource("EleutherAI/logiqa", "logiqa", "validation"),
    "hellaswag": HubSource("Rowan/hellaswag", None, "validation", _hellaswag_line),
    "lambada": HubSource("EleutherAI/lambada_openai", "default", "test"),
}


def load_hub_rows(source: HubSource, *, dataset_path: str | None = None,
                  data_files: str | list[str] | dict[str, Any] | None = None) -> Iterable[dict[str, Any]]:
    """The rows of `source`'s split. `dataset_path` (with `data_files`) loads the same split from
    elsewhere, e.g. "json" and a local file (then the hub config name is not used)."""
    import datasets

    path, name = (dataset_path, None) if dataset_path is not None else (source.path, source.name)
    try:
        return datasets.load_dataset(path, name, split=source.split, data_files=data_files)
    except (OSError, ValueError) as err:  # no network, unknown dataset, missing split
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot load {source.describe() if dataset_path is None else path} with "
                         f"datasets.load_dataset ({detail}); offline, pass --data FILE or --data-root DIR") from None


def load_hub_docs(task: str, *, limit: int | None = None, dataset_path: str | None = None,
                  data_files: str | list[str] | dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The task's docs from the hub (see the module docstring), checked by the task's own reader."""
    from memoryformer.evaluation.tasks import get_task

    info = get_task(task)
    source = HUB[info.name]
    where = source.describe() if dataset_path is None else f"{dataset_path} {data_files}"
    rows = load_hub_rows(source, dataset_path=dataset_path, data_files=data_files)
    with tempfile.TemporaryDirectory(prefix="memoryformer-task-") as tmp:
        file = Path(tmp) / f"{info.name}.jsonl"
        with open(file, "w", encoding="utf-8") as handle:
            for number, row in enumerate(rows, start=1):
                if limit is not None and number > limit:
                    break
                handle.write(json.dumps(_line(source, row, where, number), ensure_ascii=False) + "\n")
        try:
            docs = info.load_docs(file)
        except TaskFormatError as err:
            message = str(err).removeprefix(f"{err.path}:{err.line}: " if err.line is not None else f"{err.path}: ")
            raise TaskFormatError(where, err.line, message) from None
    if not docs:
        raise ValueError(f"{where} has no rows for task {info.name!r}")
    return docs


def _line(source: HubSource, row: dict[str, Any], where: str, number: int) -> dict[str, Any]:
    try:
        return source.to_line(row)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise TaskFormatError(where, number, f"row does not have the expected fields ({type(err).__name__}: "
                              f"{err}; fields present: {sorted(row)})") from None
