"""Task readers on tiny generated files: lm-eval's prompt formats, clear errors, lm-eval agreement."""

from __future__ import annotations

import bz2
import json
import os
import warnings
from pathlib import Path

import pytest

from memoryformer.evaluation.tasks import (
    TASKS,
    Completion,
    MultipleChoice,
    TaskFormatError,
    get_task,
    load_docs,
    load_task,
    write_lm_eval_tasks,
)
from memoryformer.evaluation.tasks.hellaswag import capitalize_last_fragment, preprocess


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


PIQA = [
    {"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Eat the lid."},
    {"goal": "dresser", "sol1": "replace drawer with pin ", "sol2": "finish with pin"},
    {"goal": "Clean a pan", "sol1": "Use soap.", "sol2": "Use sand."},
]
ARC = [
    {"id": "q1", "question": {"stem": "Which is a planet?", "choices": [
        {"text": "Mars", "label": "A"}, {"text": "Moon", "label": "B"}, {"text": "Sun", "label": "C"}]},
     "answerKey": "A"},
    {"id": "q2", "question": {"stem": "2 + 2 = ?", "choices": [
        {"text": "3", "label": "1"}, {"text": "4", "label": "2"}, {"text": "5", "label": "3"},
        {"text": "6", "label": "4"}]}, "answerKey": "2"},
    {"id": "q3", "question": {"stem": "Pick E.", "choices": [
        {"text": t, "label": lab} for t, lab in zip("vwxyz", "ABCDE")]}, "answerKey": "E"},
]
WINOGRANDE = [
    {"qID": "a", "sentence": "Sarah beat Maria so _ got the trophy.", "option1": "Sarah", "option2": "Maria",
     "answer": "1"},
    {"qID": "b", "sentence": "The cup fell off the table because _ was unsteady.", "option1": "the cup",
     "option2": "the table", "answer": "2"},
]
WSC = [
    {"context_options": ["The councilmen refused the protesters because the councilmen",
                         "The councilmen refused the protesters because the protesters"],
     "continuation": "feared violence.", "gold": 0},
    {"context_options": ["Tom thanked Ray because Tom", "Tom thanked Ray because Ray"],
     "continuation": "had helped.", "gold": 1},
]
LOGIQA = """
c
Some birds fly.All eagles are birds.
Which follows?Pick one.
A.Eagles fly.
B.Nothing.
C.All birds are eagles.
D.Eagles swim.

a
Passage two.
Question two?
A.first
B.second
C.third
D.fourth
"""
HELLASWAG = """Roof shingle removal: A man is sitting on a roof. he
3
is using wrap to wrap a pair of skis.
is ripping level tiles off.
is holding a rubik's cube.
starts pulling up roofing on a roof.
Family Life: How to cook [title] Boil the water. Visit [www.example.org] for more.
0
Stir  the pot.
[step] Wait.
Go away.
Sleep.
"""
LAMBADA = [{"text": "He opened the door and saw his old friend Harlin"}, {"text": "line one\n\nthe end"}]


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A data root in the standard layout, with tiny files for every task."""
    root = tmp_path / "tasks"
    write_jsonl(root / "piqa/valid.jsonl", PIQA)
    (root / "piqa/valid-labels.lst").write_text("0\n1\n0\n")
    write_jsonl(root / "arc/ARC-Easy-Dev.jsonl", ARC)
    write_jsonl(root / "arc/ARC-Challenge-Dev.jsonl", ARC[1:])
    write_jsonl(root / "winogrande/dev.jsonl", WINOGRANDE)
    write_jsonl(root / "wsc273/wsc273_llmfoundry.jsonl", WSC)
    (root / "logiqa").mkdir()
    (root / "logiqa/Eval.txt").write_text(LOGIQA)
    (root / "hellaswag").mkdir()
    (root / "hellaswag/hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(HELLASWAG.encode()))
    write_jsonl(root / "lambada/lambada_test.jsonl", LAMBADA)
    return root


# -- formats -----------------------------------------------------------------------------------------
def test_piqa_prompt_and_labels_file_found_next_to_data(data_root):
    items = load_task("piqa", data_root=data_root)
    assert [i.gold for i in items] == [0, 1, 0]
    assert items[0].requests == (("Question: How do I open a jar?\nAnswer:", " Twist the lid."),
                                 ("Question: How do I open a jar?\nAnswer:", " Eat the lid."))
    assert items[1].choices == ("replace drawer with pin ", "finish with pin")


def test_arc_letter_and_number_labels(data_root):
    items = load_task("arc_easy", data_root=data_root)
    assert [i.gold for i in items] == [0, 1, 4]
    assert items[0].requests[0] == ("Question: Which is a planet?\nAnswer:", " Mars")
    assert [len(i.requests) for i in items] == [3, 4, 5]
    assert len(load_task("arc_challenge", data_root=data_root)) == 2


def test_winogrande_partial_scoring(data_root):
    items = load_task("winogrande", data_root=data_root)
    assert items[0].requests == (("Sarah beat Maria so Sarah", " got the trophy."),
                                 ("Sarah beat Maria so Maria", " got the trophy."))
    assert items[1].requests[1] == ("The cup fell off the table because the table", " was unsteady.")
    assert [i.gold for i in items] == [0, 1]
    assert items[0].choices == ("Sarah beat Maria so Sarah", "Sarah beat Maria so Maria")  # as lm-eval


def test_winogrande_answers_from_labels_file(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "answer"} for row in WINOGRANDE]
    path = write_jsonl(tmp_path / "dev.jsonl", rows)
    (tmp_path / "dev-labels.lst").write_text("2\n1\n")
    assert [i.gold for i in load_task("winogrande", path)] == [1, 0]


def test_wsc273_partial_scoring(data_root):
    items = load_task("wsc273", data_root=data_root)
    assert items[1].requests == (("Tom thanked Ray because Tom", " had helped."),
                                 ("Tom thanked Ray because Ray", " had helped."))
    assert [i.gold for i in items] == [0, 1]


def test_logiqa_records_normalised_like_the_hf_loader(data_root):
    items = load_task("logiqa", data_root=data_root)
    assert [i.gold for i in items] == [2, 0]
    context = items[0].requests[0][0]
    assert context == ("Passage: Some birds fly. All eagles are birds.\nQuestion: Which follows?Pick one.\n"
                       "Choices:\nA. Eagles fly.\nB. Nothing.\nC. All birds are eagles.\nD. Eagles swim.\nAnswer:")
    assert [c for _, c in items[0].requests] == [" Eagles fly.", " Nothing.", " All birds are eagles.", " Eagles swim."]
    assert items[1].choices == ("first", "second", "third", "fourth")


def test_hellaswag_bz2_preprocessing(data_root):
    items = load_task("hellaswag", data_root=data_root)
    assert items[0].requests[0] == ("Roof shingle removal: A man is sitting on a roof. He",
                                    " is using wrap to wrap a pair of skis.")
    assert items[0].gold == 3
    # lm-eval's preprocess: " [title]" -> ". ", [bracketed] text dropped, double spaces collapsed
    assert items[1].requests[0][0] == "Family Life: How to cook. Boil the water. Visit for more."
    assert items[1].choices == ("Stir the pot.", " Wait.", "Go away.", "Sleep.")  # strip comes first, as lm-eval


def test_hellaswag_helpers():
    assert preprocess("  a [title] b  [x]c ") == "a. b c"
    assert capitalize_last_fragment("Skiing: A man skis. the man in Red") == "Skiing: A man skis. The man in red"
    assert capitalize_last_fragment("Cooking: How to cook. Boil water.") == "Cooking: How to cook. Boil water."
    assert capitalize_last_fragment("Skiing: the man") == "Skiing: The man"


def test_lambada_last_word(data_root):
    items = load_task("lambada", data_root=data_root)
    assert items[0] == Completion("He opened the door and saw his old friend", " Harlin")
    assert items[1] == Completion("line one\n\nthe", " end")  # split on spaces only, as lm-eval


def test_registry_and_limit(data_root):
    assert get_task("mf_ARC-Easy").name == "arc_easy"
    with pytest.raises(ValueError, match="unknown task 'boolq'.*piqa"):
        get_task("boolq")
    with pytest.raises(ValueError, match="needs a data file"):
        load_task("piqa")
    assert len(load_task("hellaswag", data_root=data_root, limit=1)) == 1
    assert all(isinstance(i, MultipleChoice) for i in load_task("logiqa", data_root=data_root))


# -- errors name the file, the line and the field ----------------------------------------------------
def _error(call) -> str:
    with pytest.raises(TaskFormatError) as info:
        call()
    return str(info.value)


def test_piqa_errors(tmp_path):
    path = write_jsonl(tmp_path / "valid.jsonl", [PIQA[0], {"goal": "x", "sol1": "y"}])
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    assert _error(lambda: load_task("piqa", path)) == (
        f"{path}:2: missing field 'sol2' (fields present: ['goal', 'sol1'])")
    write_jsonl(path, PIQA[:2])
    (tmp_path / "valid-labels.lst").write_text("0\n2\n")
    assert _error(lambda: load_task("piqa", path)) == f"{tmp_path / 'valid-labels.lst'}:2: label '2' is not one of ['0', '1']"
    (tmp_path / "valid-labels.lst").write_text("0\n1\n1\n")
    assert "has 3 labels but its data file has 2 examples" in _error(lambda: load_task("piqa", path))
    (tmp_path / "valid-labels.lst").unlink()
    with pytest.raises(FileNotFoundError, match="valid-labels.lst"):
        load_task("piqa", path)
    write_jsonl(path, [PIQA[0], "{not json"])
    assert _error(lambda: load_task("piqa", path)).startswith(f"{path}:2: not valid JSON")


def test_arc_errors(tmp_path):
    bad = json.loads(json.dumps(ARC[0]))
    bad["answerKey"] = "F"
    path = write_jsonl(tmp_path / "arc.jsonl", [ARC[1], bad])
    assert _error(lambda: load_task("arc_easy", path)) == (
        f"{path}:2: field 'answerKey' is 'F', not one of the choice labels ['A', 'B', 'C']")
    del bad["question"]["stem"]
    write_jsonl(path, [bad])
    assert "missing field 'stem'" in _error(lambda: load_task("arc_easy", path))


def test_winogrande_wsc_errors(tmp_path):
    path = write_jsonl(tmp_path / "dev.jsonl", [WINOGRANDE[0], {**WINOGRANDE[1], "answer": "3"}])
    assert _error(lambda: load_task("winogrande", path)) == f"{path}:2: field 'answer' should be '1' or '2', got '3'"
    write_jsonl(path, [{**WINOGRANDE[0], "sentence": "no blank here"}])
    assert "has no '_' blank" in _error(lambda: load_task("winogrande", path))
    path = write_jsonl(tmp_path / "wsc.jsonl", [WSC[0], {**WSC[1], "gold": 2}])
    assert _error(lambda: load_task("wsc273", path)) == f"{path}:2: field 'gold' is 2, outside 0..1"
    write_jsonl(path, [{**WSC[0], "gold": "0"}])
    assert _error(lambda: load_task("wsc273", path)) == f"{path}:1: field 'gold' should be a int, got '0'"


def test_logiqa_errors(tmp_path):
    path = tmp_path / "Eval.txt"
    lines = LOGIQA.split("\n")
    path.write_text("\n".join(lines[:8] + lines[9:]))  # second record loses its blank line: 14 lines
    assert _error(lambda: load_task("logiqa", path)).startswith(f"{path}:2: record has 14 non-blank lines")
    path.write_text(LOGIQA.replace("\na\n", "\ne\n"))
    assert _error(lambda: load_task("logiqa", path)) == f"{path}:10: answer letter 'e' is not one of a, b, c, d"
    path.write_text("\n".join(lines[:15]))  # the last option missing
    assert "record has 6 non-blank lines" in _error(lambda: load_task("logiqa", path))


def test_hellaswag_errors(tmp_path):
    path = tmp_path / "hs.txt"
    path.write_text(HELLASWAG.replace("\n0\n", "\n7\n"))
    assert _error(lambda: load_task("hellaswag", path)).startswith(f"{path}:8: label '7' is not 0-3")
    path.write_text("\n".join(HELLASWAG.split("\n")[:9]))
    assert "has 9 lines, not a multiple of 6" in _error(lambda: load_task("hellaswag", path))


def test_lambada_errors(tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl", [LAMBADA[0], {"txt": "a b"}])
    assert _error(lambda: load_task("lambada", path)) == f"{path}:2: missing field 'text' (fields present: ['txt'])"
    write_jsonl(path, [{"text": "oneword"}])
    assert "has no space" in _error(lambda: load_task("lambada", path))
    with pytest.raises(FileNotFoundError, match="task file not found"):
        load_task("lambada", tmp_path / "missing.jsonl")


# -- lm-eval export ------------------------------------------------------------------------------------
def test_write_lm_eval_tasks_round_trip(data_root, tmp_path):
    out = tmp_path / "lm_eval_tasks"
    names = write_lm_eval_tasks(out, data_root=data_root)
    assert names == [f"mf_{name}" for name in TASKS]
    for name in TASKS:
        yaml_text = (out / f"mf_{name}.yaml").read_text()
        assert f"task: mf_{name}\n" in yaml_text
        assert f'validation: "{(out / f"mf_{name}.jsonl").resolve()}"' in yaml_text
        # the converted jsonl reads back into the same items
        assert load_task(name, out / f"mf_{name}.jsonl") == load_task(name, data_root=data_root), name
    assert write_lm_eval_tasks(tmp_path / "one", {"piqa": data_root / "piqa/valid.jsonl"}, limit=2) == ["mf_piqa"]
    assert len((tmp_path / "one/mf_piqa.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="no task data"):
        write_lm_eval_tasks(tmp_path / "none", data_root=tmp_path / "empty")


def test_lm_eval_task_objects_give_the_same_requests(data_root, tmp_path, monkeypatch):
    """lm-eval's own task objects, built from our YAMLs, make exactly our (context, continuation)
    requests, gold indices and choices (acc_norm's lengths). No model is needed."""
    for var, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"),
                       ("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))):
        monkeypatch.setenv(var, value)
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager, get_task_dict

    out = tmp_path / "lm_eval_tasks"
    names = write_lm_eval_tasks(out, data_root=data_root)
    manager = TaskManager(include_path=str(out), include_defaults=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # get_task_dict works across lm-eval 0.4.x
        loaded = get_task_dict(names, manager)
    tasks = {getattr(task, "task_name", None) or task.config.task: task for task in _leaves(loaded)}
    assert sorted(tasks) == sorted(names)
    for lm_name, task in tasks.items():
        name = lm_name.removeprefix("mf_")
        task.build_all_requests(rank=0, world_size=1)
        requests: dict[int, list[tuple[str, str]]] = {}
        for instance in task.instances:
            requests.setdefault(instance.doc_id, []).append(tuple(instance.arguments))
        ours = load_task(name, data_root=data_root)
        docs = list(task.eval_docs)
        assert len(requests) == len(ours) == len(docs), lm_name
        for doc_id, item in enumerate(ours):
            if isinstance(item, Completion):
                assert requests[doc_id] == [(item.context, item.continuation)], (lm_name, doc_id)
                continue
            assert requests[doc_id] == list(item.requests), (lm_name, doc_id)
            doc = docs[doc_id]
            gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            assert gold == item.gold, (lm_name, doc_id)
            assert tuple(task.doc_to_choice(doc)) == item.choices, (lm_name, doc_id)


def _leaves(obj):
    """Task objects inside lm-eval's (possibly nested) task dict."""
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _leaves(value)
    elif hasattr(obj, "build_all_requests"):
        yield obj


def test_docs_layouts_match_lm_eval_datasets(data_root):
    """The converted docs carry the fields lm-eval's own tasks read (HF dataset layouts)."""
    assert set(load_docs("piqa", data_root=data_root)[0]) == {"goal", "sol1", "sol2", "label"}
    assert set(load_docs("arc_easy", data_root=data_root)[0]) == {"id", "question", "choices", "answerKey"}
    assert set(load_docs("logiqa", data_root=data_root)[0]) == {"label", "context", "question", "options"}
    assert set(load_docs("hellaswag", data_root=data_root)[0]) == {"query", "choices", "label", "gold"}
    assert os.path.basename(get_task("hellaswag").default_path) == "hellaswag_val_full.txt.bz2"


# -- Hugging Face datasets (the hub loader, pointed at local files: nothing is downloaded) -------------------
HUB_ROWS = {
    "piqa": [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
             {"goal": "Find a dog", "sol1": "Ask the fox.", "sol2": "Look for it.", "label": 1}],
    "arc_easy": [{"id": "q1", "question": "Which is a planet?",
                  "choices": {"text": ["Mars", "Moon", "Sun"], "label": ["A", "B", "C"]}, "answerKey": "A"}],
    "arc_challenge": [{"id": "q2", "question": "2 + 2 = ?",
                       "choices": {"text": ["3", "4", "5", "6"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"}],
    "winogrande": [{"sentence": "Sarah beat Maria so _ got the trophy.", "option1": "Sarah", "option2": "Maria",
                    "answer": "1"}],
    "wsc273": [{"text": "The city councilmen refused the demonstrators a permit because they feared violence.",
                "pronoun": "they", "pronoun_loc": 63, "quote": "they feared violence", "quote_loc": 63,
                "options": ["The city councilmen", "The demonstrators"], "label": 0, "source": "(Winograd 1972)"},
               {"text": "Joan made sure to thank Susan for all the help she had given.", "pronoun": "she",
                "pronoun_loc": 47, "quote": "she had given", "quote_loc": 47, "options": ["Joan", "Susan"],
                "label": 1, "source": "(Hirst 1981)"},
               {"text": "The man lifted the boy onto his shoulders.", "pronoun": "his", "pronoun_loc": 28, "quote": "his shoulders",
                "quote_loc": 28, "options": ["The man", "The boy"], "label": 0, "source": "x"}],
    "logiqa": [{"label": "b", "context": "All cats purr.", "question": "Which follows?",
                "options": ["Dogs purr.", "A cat purrs.", "Nothing.", "Cats bark."]}],
    "hellaswag": [{"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
                   "ctx_b": "then", "ctx": "...", "endings": ["a [title] ends.", "b ends.", "c ends.", "d ends."],
                   "source_id": "x", "split": "val", "split_type": "indomain", "label": "3"}],
    "lambada": [{"text": "The quick brown fox jumps"}],
}


def redirect_hub(tmp_path: Path, monkeypatch) -> list:
    """datasets.load_dataset redirected from each task's hub name to a local json file of HUB_ROWS;
    returns the list of (path, name, split) it is asked for."""
    import datasets

    from memoryformer.evaluation.tasks import HUB

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    files = {}
    for task, rows in HUB_ROWS.items():
        files[(HUB[task].path, HUB[task].name)] = write_jsonl(tmp_path / "hub" / f"{task}.jsonl", rows)
    real, asked = datasets.load_dataset, []

    def load_dataset(path, name=None, *args, split=None, data_files=None, **kwargs):
        if (path, name) not in files:  # a local dataset (lm-eval's YAMLs): load it as asked
            return real(path, name, *args, split=split, data_files=data_files, **kwargs)
        asked.append((path, name, split))
        return real("json", data_files={split: str(files[(path, name)])}, split=split,
                    cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return asked


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    return redirect_hub(tmp_path, monkeypatch)


def test_hub_loader_reads_a_local_file_given_as_the_dataset_path(tmp_path, monkeypatch):
    import datasets

    from memoryformer.evaluation.tasks import load_hub_docs

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    file = write_jsonl(tmp_path / "piqa.jsonl", HUB_ROWS["piqa"])
    docs = load_hub_docs("piqa", dataset_path="json", data_files={"validation": str(file)})
    assert docs == HUB_ROWS["piqa"]
    assert load_hub_docs("piqa", dataset_path="json", data_files={"validation": str(file)}, limit=1) == docs[:1]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"goal": "g", "sol1": "a", "label": 0}])
    with pytest.raises(TaskFormatError, match=r"json .*bad.jsonl.*:1: missing field 'sol2'"):
        load_hub_docs("piqa", dataset_path="json", data_files={"validation": str(bad)})


def test_hub_rows_give_lm_eval_s_requests(local_hub):
    """Every task's hub layout, as lm-eval's own task configs turn it into (context, continuation)."""
    from memoryformer.evaluation.tasks import HUB, load_hub_docs

    items = {task: [get_task(task).to_item(doc) for doc in load_hub_docs(task)] for task in HUB_ROWS}
    assert {(path, name) for path, name, _ in local_hub} == {(HUB[t].path, HUB[t].name) for t in HUB_ROWS}
    assert items["piqa"][1].requests == (("Question: Find a dog\nAnswer:", " Ask the fox."),
                                         ("Question: Find a dog\nAnswer:", " Look for it."))
    assert items["piqa"][1].gold == 1
    assert items["arc_easy"][0].requests[0] == ("Question: Which is a planet?\nAnswer:", " Mars")
    assert items["winogrande"][0].requests[1] == ("Sarah beat Maria so Maria", " got the trophy.")
    # lm-eval's wsc273: options lower-cased mid-sentence; the target is the text after the pronoun
    wsc = items["wsc273"]
    head = "The city councilmen refused the demonstrators a permit because "
    assert wsc[0].requests == ((head + "the city councilmen", "  feared violence."),
                               (head + "the demonstrators", "  feared violence."))
    assert wsc[1].requests[1] == ("Joan made sure to thank Susan for all the help Susan", "  had given.")
    assert wsc[1].gold == 1
    assert wsc[2].requests[0] == ("The man lifted the boy onto the man's", "  shoulders.")  # possessive
    assert items["logiqa"][0].gold == 1 and items["logiqa"][0].requests[0][1] == " Dogs purr."
    hella = items["hellaswag"][0]
    assert hella.requests[0] == ("Removing ice from car: Then, the man writes over the snow. Then", " a. ends.")
    assert hella.gold == 3
    assert items["lambada"][0] == Completion("The quick brown fox", " jumps")


def test_eval_without_local_data_uses_the_hub_datasets(local_hub, tmp_path, capsys):
    from memoryformer import cli

    out = tmp_path / "lm"
    assert cli.main(["eval", "--write-lm-eval-tasks", str(out), "--task", "piqa,wsc273"]) == 0
    assert [(p, s) for p, _, s in local_hub] == [("baber/piqa", "validation"), ("lighteval/winograd_wsc", "test")]
    assert sorted(p.name for p in out.glob("*.yaml")) == ["mf_piqa.yaml", "mf_wsc273.yaml"]
    written = [json.loads(line) for line in (out / "mf_piqa.jsonl").read_text().splitlines()]
    assert written == HUB_ROWS["piqa"]


def test_hub_failure_is_one_clear_error(tmp_path, monkeypatch):
    import datasets

    from memoryformer.evaluation.tasks import load_hub_docs

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'baber/piqa' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"cannot load baber/piqa, validation split .*offline, pass --data FILE"):
        load_hub_docs("piqa")
