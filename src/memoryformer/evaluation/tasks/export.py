"""Write task data as jsonl plus lm-eval task YAMLs, so `lm_eval --include_path DIR` runs offline.

    write_lm_eval_tasks("lm_eval_tasks", data_root="tasks")
    lm_eval --model hf --model_args pretrained=... --include_path lm_eval_tasks --tasks mf_piqa,mf_arc_easy

The YAML templates ship in this package (`mf_<task>.yaml`); each names `mf_<task>.jsonl` as its
validation file, which is rewritten here to the absolute path of the jsonl written beside it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any


def yaml_template(name: str) -> str:
    """The shipped lm-eval YAML for task `name` (without the `mf_` prefix), data path unfilled."""
    return resources.files("memoryformer.evaluation.tasks").joinpath(f"mf_{name}.yaml").read_text(encoding="utf-8")


def write_lm_eval_tasks(
    out_dir: str | Path,
    sources: Mapping[str, str | Path | list[dict[str, Any]]] | None = None,
    *,
    data_root: str | Path | None = None,
    limit: int | None = None,
) -> list[str]:
    """Convert each task's file to `out_dir/mf_<task>.jsonl` and write `out_dir/mf_<task>.yaml` for it.

    `sources` maps task names to their files (or to docs already loaded, e.g. `load_hub_docs`'s);
    with `data_root` instead (or as well, for the tasks not
    in `sources`), every task whose standard file exists under it is written. Returns the lm-eval
    task names written, e.g. ["mf_piqa", ...].
    """
    from memoryformer.evaluation.tasks import TASKS, get_task, load_docs

    chosen: dict[str, Any] = {get_task(name).name: source if isinstance(source, list) else Path(source)
                              for name, source in (sources or {}).items()}
    if data_root is not None:
        for name, info in TASKS.items():
            candidate = Path(data_root) / info.default_path
            if name not in chosen and candidate.is_file():
                chosen[name] = candidate
    if not chosen:
        raise ValueError(
            "no task data to convert: pass sources={task: path} or a data_root holding "
            + ", ".join(info.default_path for info in TASKS.values())
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, source in chosen.items():
        docs = source[:limit] if isinstance(source, list) else load_docs(name, source, limit=limit)
        data_file = (out / f"mf_{name}.jsonl").resolve()
        with open(data_file, "w", encoding="utf-8") as handle:
            for doc in docs:
                handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
        lines = yaml_template(name).splitlines(keepends=True)
        marker = [i for i, line in enumerate(lines) if line.strip() == f"validation: mf_{name}.jsonl"]
        if len(marker) != 1:
            raise RuntimeError(f"the shipped template mf_{name}.yaml has no 'validation: mf_{name}.jsonl' line")
        indent = lines[marker[0]][: len(lines[marker[0]]) - len(lines[marker[0]].lstrip())]
        # a JSON string is a valid YAML string, whatever characters the path has
        lines[marker[0]] = f"{indent}validation: {json.dumps(str(data_file))}\n"
        text = "".join(lines)
        (out / f"mf_{name}.yaml").write_text(text, encoding="utf-8")
        written.append(f"mf_{name}")
    return written
