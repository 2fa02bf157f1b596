"""lm-evaluation-harness on our models, offline: lm-eval's numbers must equal our own scorer's.

Tiny random models and a tiny PIQA-format task are built here; the task YAML comes from the
evaluation code's `write_lm_eval_tasks`, plus one generate_until YAML written in this file (our task
set has none) to check batched, left-padded generation. Runs:
    --model memoryformer  on a MemoryFormer HF directory (loglikelihood + generate_until)
    --model memoryformer  on a Pythia-twin training run directory (our wrapper, both architectures)
    --model hf            on the Pythia twin's native GPT-NeoX export
    --model hf, trust_remote_code=True  on the MemoryFormer export (no registration needed)
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate", reason="lm-eval's HF model needs accelerate (pip install lm-eval[hf])")

from memoryformer import LanguageModel, ModelConfig  # noqa: E402
from memoryformer.data.tokenizer import train_bpe  # noqa: E402
from memoryformer.evaluation.evaluate import Scorer  # noqa: E402
from memoryformer.evaluation.tasks import load_task, write_lm_eval_tasks  # noqa: E402
from memoryformer.integrations.hf import save_pretrained  # noqa: E402

WORDS = "the a cat dog sat on mat ran fast slow big small red blue water fire stone tree".split()
BATCH = 3  # not a divisor of the request count, so batches are ragged


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE on, caches in a temporary folder, for this module only."""
    cache = tmp_path_factory.mktemp("hf_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
        import datasets.config
        import huggingface_hub.constants
        import transformers.dynamic_module_utils as dynamic

        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(dynamic, "HF_MODULES_CACHE", str(cache / "modules"))
        yield cache


@pytest.fixture(scope="module")
def setup(tmp_path_factory, offline):
    """Tokenizer, the two tiny models, their HF directories and a run directory, and the tasks."""
    from memoryformer.train import checkpoint

    root = tmp_path_factory.mktemp("lm_eval")
    rng = random.Random(0)
    tokenizer = train_bpe([_sentence(rng, 12) for _ in range(300)], vocab_size=300)
    models = {}
    for preset in ("mf-test", "pythia-test"):
        torch.manual_seed(1)
        models[preset] = LanguageModel(ModelConfig.from_preset(preset, vocab_size=320)).eval()
    save_pretrained(models["mf-test"], root / "mf_hf", tokenizer)
    save_pretrained(models["pythia-test"], root / "py_hf", tokenizer)
    run = root / "py_run"
    run.mkdir()
    models["pythia-test"].config.to_json(run / "config.json")
    tokenizer.save(str(run / "tokenizer.json"))
    checkpoint.save_model_weights(models["pythia-test"], run / "model.safetensors")

    docs = [{"goal": _sentence(rng, rng.randint(3, 9)), "sol1": _sentence(rng, rng.randint(1, 5)),
             "sol2": _sentence(rng, rng.randint(1, 5)), "label": i % 2} for i in range(7)]
    (root / "piqa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    assert write_lm_eval_tasks(tasks, {"piqa": root / "piqa.jsonl"}) == ["mf_piqa"]
    prompts = [{"prompt": _sentence(rng, rng.randint(1, 8))} for _ in range(5)]
    (tasks / "greedy.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    # written here: the evaluation task set has no generative task
    (tasks / "mf_test_greedy.yaml").write_text(f"""task: mf_test_greedy
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {json.dumps(str(tasks / "greedy.jsonl"))}
validation_split: validation
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: ""
generation_kwargs:
  until: ["stone"]
  max_gen_toks: 7
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
""")
    return {"root": root, "tokenizer": tokenizer, "models": models, "tasks": tasks, "prompts": prompts}


def _run_lm_eval(model: str, model_args: str, tasks: list[str], include: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import memoryformer.integrations.hf  # noqa: F401  (registers --model memoryformer and the Auto classes)

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=BATCH,
                                   device="cpu", log_samples=True, bootstrap_iters=0,
                                   task_manager=TaskManager(include_path=include, include_defaults=False))


def _check_loglikelihoods_agree(results: dict, model: LanguageModel, tokenizer, root) -> None:
    """lm-eval's per-request log-likelihoods, greedy flags, acc and acc_norm equal our scorer's."""
    scorer = Scorer(lambda idx: model(idx)[0], tokenizer, max_length=model.config.max_seq_len,
                    batch_size=2, progress=False)
    samples = sorted(results["samples"]["mf_piqa"], key=lambda s: s["doc_id"])
    items = load_task("piqa", root / "piqa.jsonl")
    assert len(samples) == len(items)
    for sample, item in zip(samples, items):
        requests = [tuple(arg) for arg in sample["arguments"]]
        assert requests == list(item.requests)  # the same prompts on both sides
        theirs = [resp[0] for resp in sample["resps"]]
        ours = scorer.loglikelihood(requests)
        for (ll_theirs, greedy_theirs), (ll_ours, greedy_ours) in zip(theirs, ours):
            assert math.isclose(ll_theirs, ll_ours, rel_tol=0, abs_tol=1e-4), (ll_theirs, ll_ours)
            assert bool(greedy_theirs) == greedy_ours
    ours = scorer.evaluate("piqa", items)
    metrics = results["results"]["mf_piqa"]
    assert metrics["acc,none"] == pytest.approx(ours["acc"], abs=1e-9)
    assert metrics["acc_norm,none"] == pytest.approx(ours["acc_norm"], abs=1e-9)


def test_memoryformer_registered_model_matches_our_scorer_and_generate(setup):
    model, tokenizer = setup["models"]["mf-test"], setup["tokenizer"]
    results = _run_lm_eval("memoryformer", f"pretrained={setup['root'] / 'mf_hf'}",
                           ["mf_piqa", "mf_test_greedy"], str(setup["tasks"]))
    _check_loglikelihoods_agree(results, model, tokenizer, setup["root"])
    # generate_until: batched with left padding in lm-eval, one prompt at a time here
    eot = tokenizer.token_to_id("<|endoftext|>")
    generated = {s["doc_id"]: s["resps"][0][0] for s in results["samples"]["mf_test_greedy"]}
    assert len(generated) == len(setup["prompts"])
    for doc_id, doc in enumerate(setup["prompts"]):
        ids = torch.tensor([tokenizer.encode(doc["prompt"]).ids])
        new = model.generate(ids, 7, temperature=0, stop_token=eot)[0, ids.shape[1]:].tolist()
        text = tokenizer.decode(new[:new.index(eot)] if eot in new else new)
        assert generated[doc_id] == text.split("stone")[0], doc["prompt"]


def test_memoryformer_registered_model_reads_training_runs(setup):
    results = _run_lm_eval("memoryformer", f"pretrained={setup['root'] / 'py_run'}", ["mf_piqa"],
                           str(setup["tasks"]))
    _check_loglikelihoods_agree(results, setup["models"]["pythia-test"], setup["tokenizer"], setup["root"])


def test_pythia_export_runs_under_plain_hf_model(setup):
    results = _run_lm_eval("hf", f"pretrained={setup['root'] / 'py_hf'},dtype=float32", ["mf_piqa"],
                           str(setup["tasks"]))
    _check_loglikelihoods_agree(results, setup["models"]["pythia-test"], setup["tokenizer"], setup["root"])


def _hide_registration(monkeypatch) -> None:
    """Undo `import memoryformer.integrations.hf`'s Auto registration (a registered class beats remote code)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import memoryformer.integrations.hf

    extra_configs = getattr(CONFIG_MAPPING, "_extra_content", None)
    extra_models = getattr(MODEL_FOR_CAUSAL_LM_MAPPING, "_extra_content", None)
    if extra_configs is None or extra_models is None:
        pytest.skip("this transformers keeps registrations elsewhere")
    monkeypatch.delitem(extra_configs, "memoryformer", raising=False)
    monkeypatch.delitem(extra_models, memoryformer.integrations.hf.MemoryFormerConfig, raising=False)

    def not_this_class(*args, **kwargs):
        raise AssertionError("trust_remote_code should run the exported modeling file, not memoryformer.integrations.hf")

    monkeypatch.setattr(memoryformer.integrations.hf.MemoryFormerForCausalLM, "forward", not_this_class)


def test_memoryformer_export_runs_under_hf_with_trust_remote_code(setup, monkeypatch):
    _hide_registration(monkeypatch)
    results = _run_lm_eval("hf", f"pretrained={setup['root'] / 'mf_hf'},trust_remote_code=True,dtype=float32",
                           ["mf_piqa"], str(setup["tasks"]))
    _check_loglikelihoods_agree(results, setup["models"]["mf-test"], setup["tokenizer"], setup["root"])


@pytest.mark.slow
def test_lm_eval_command_line_with_trust_remote_code(setup, tmp_path):
    """The documented command, in a fresh process that never imports memoryformer."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={setup['root'] / 'mf_hf'},trust_remote_code=True,dtype=float32",
           "--include_path", str(setup["tasks"]), "--tasks", "mf_piqa", "--device", "cpu",
           "--batch_size", str(BATCH), "--output_path", str(tmp_path / "out"), "--log_samples"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    samples = []
    for line in next((tmp_path / "out").rglob("samples_mf_piqa_*.jsonl")).open():
        sample = json.loads(line)  # the file stores arguments as dicts and numbers as strings
        sample["arguments"] = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        sample["resps"] = [[(float(ll), greedy == "True")] for ((ll, greedy),) in sample["resps"]]
        samples.append(sample)
    _check_loglikelihoods_agree({"results": results["results"], "samples": {"mf_piqa": samples}},
                                setup["models"]["mf-test"], setup["tokenizer"], setup["root"])


def test_a_continuation_longer_than_the_context_is_one_line(setup, tmp_path, capsys):
    """lm-eval's HFLM only asserts on a continuation longer than the model's context; our command line
    names the problem in one line and exits 1."""
    from memoryformer.integrations.hf import main

    torch.manual_seed(1)
    short = LanguageModel(ModelConfig.from_preset("mf-test", vocab_size=320, max_seq_len=2)).eval()
    save_pretrained(short, tmp_path / "short", setup["tokenizer"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "memoryformer", "--model_args", f"pretrained={tmp_path / 'short'}",
              "--include_path", str(setup["tasks"]), "--tasks", "mf_piqa", "--device", "cpu",
              "--batch_size", "2"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m memoryformer.hf: error: lm-eval cannot score"), err[-5:]
    assert "2-token context" in err[-1] and "Traceback" not in "\n".join(err)
