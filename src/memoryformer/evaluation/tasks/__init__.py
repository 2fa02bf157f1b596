"""Zero-shot task readers: local task files -> lm-eval's exact (context, continuation) requests.

    items = load_task("piqa", "data/tasks/piqa/valid.jsonl")     # list[MultipleChoice]
    items = load_task("lambada", data_root="data/tasks")         # the standard layout, see TASKS
    docs = load_hub_docs("piqa")                                 # the Hugging Face dataset lm-eval uses

Each family has a reader module (piqa, arc, winogrande, wsc273, logiqa, hellaswag, lambada) with
`load_docs(path) -> list[dict]` (lm-eval's dataset field layout) and `to_item(doc)`;
`write_lm_eval_tasks` writes those docs plus matching lm-eval task YAMLs for offline `lm_eval` runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memoryformer.evaluation.tasks import arc, hellaswag, lambada, logiqa, piqa, winogrande, wsc273
from memoryformer.evaluation.tasks.base import Completion, Item, MultipleChoice, TaskFormatError


@dataclass(frozen=True)
class TaskInfo:
    """One task: its reader, where its file sits under a data root, and the metrics lm-eval reports."""

    name: str
    load_docs: Callable[..., list[dict[str, Any]]]
    to_item: Callable[[dict[str, Any]], Item]
    default_path: str  # relative to a task-data root (layout: docs/training.md, "Zero-shot task data")
    metrics: tuple[str, ...]  # "acc", "acc_norm" (multiple choice); "acc", "perplexity" (completion)
    in_paper: bool = False  # one of the MemoryFormer paper's zero-shot tasks (Table 1)

    @property
    def lm_eval_name(self) -> str:
        """The task name in the YAMLs `write_lm_eval_tasks` writes (prefixed so built-ins don't clash)."""
        return f"mf_{self.name}"


_MC = ("acc", "acc_norm")
TASKS: dict[str, TaskInfo] = {
    info.name: info
    for info in (
        TaskInfo("piqa", piqa.load_docs, piqa.to_item, "piqa/valid.jsonl", _MC, True),
        TaskInfo("arc_easy", arc.load_docs, arc.to_item, "arc/ARC-Easy-Dev.jsonl", _MC, True),
        TaskInfo("arc_challenge", arc.load_docs, arc.to_item, "arc/ARC-Challenge-Dev.jsonl", _MC, True),
        TaskInfo("winogrande", winogrande.load_docs, winogrande.to_item, "winogrande/dev.jsonl", ("acc",), True),
        TaskInfo("wsc273", wsc273.load_docs, wsc273.to_item, "wsc273/wsc273_llmfoundry.jsonl", ("acc",), True),
        TaskInfo("logiqa", logiqa.load_docs, logiqa.to_item, "logiqa/Eval.txt", _MC, True),
        TaskInfo("hellaswag", hellaswag.load_docs, hellaswag.to_item, "hellaswag/hellaswag_val_full.txt.bz2", _MC),
        TaskInfo("lambada", lambada.load_docs, lambada.to_item, "lambada/lambada_test.jsonl", ("acc", "perplexity")),
    )
}
PAPER_TASKS: tuple[str, ...] = tuple(name for name, info in TASKS.items() if info.in_paper)


def get_task(name: str) -> TaskInfo:
    """The `TaskInfo` for `name` (an `mf_` prefix is accepted); a clear error lists the known tasks."""
    key = name.removeprefix("mf_").strip().lower().replace("-", "_")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


def task_path(name: str, path: str | Path | None = None, data_root: str | Path | None = None) -> Path:
    """`path` itself, or the task's standard file under `data_root`; one of the two is needed."""
    if path is not None:
        return Path(path)
    if data_root is None:
        info = get_task(name)
        raise ValueError(f"task {name!r} needs a data file (e.g. .../{info.default_path}) or a data root")
    return Path(data_root) / get_task(name).default_path


def load_docs(name: str, path: str | Path | None = None, *, data_root: str | Path | None = None,
              limit: int | None = None) -> list[dict[str, Any]]:
    """The task's docs in lm-eval's field layout, the first `limit` only when given."""
    docs = get_task(name).load_docs(task_path(name, path, data_root))
    return docs if limit is None else docs[:limit]


def load_task(name: str, path: str | Path | None = None, *, data_root: str | Path | None = None,
              limit: int | None = None) -> list[Item]:
    """The task's items (`MultipleChoice` or `Completion`), the first `limit` only when given."""
    info = get_task(name)
    return [info.to_item(doc) for doc in load_docs(name, path, data_root=data_root, limit=limit)]


from memoryformer.evaluation.tasks.export import write_lm_eval_tasks  # noqa: E402  (needs TASKS above)
from memoryformer.evaluation.tasks.hub import HUB, load_hub_docs  # noqa: E402

__all__ = [
    "HUB", "PAPER_TASKS", "TASKS", "Completion", "Item", "MultipleChoice", "TaskFormatError", "TaskInfo",
    "get_task", "load_docs", "load_hub_docs", "load_task", "task_path", "write_lm_eval_tasks",
]
