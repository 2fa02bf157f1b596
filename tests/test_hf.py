"""transformers integration: config and model classes, KV-cached generate, save / load both ways,
native GPT-NeoX export of the Pythia twin, remote code, load_any, the export verb and its errors.

Every model is a tiny random one built here; nothing is downloaded."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from memoryformer import LanguageModel, ModelConfig  # noqa: E402
from memoryformer.data.tokenizer import train_bpe  # noqa: E402
from memoryformer.integrations.hf import (  # noqa: E402
    REMOTE_CODE,
    MemoryFormerCache,
    MemoryFormerConfig,
    MemoryFormerForCausalLM,
    check_tokenizer,
    is_hf_dir,
    load_any,
    remote_code_source,
    save_pretrained,
    to_hf,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 320
ARCHS = ("mf-test", "pythia-test")
WORDS = "the a cat dog sat on mat ran fast slow big small red blue water fire stone tree über café".split()


@pytest.fixture(scope="module")
def tokenizer():
    import random

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    return train_bpe(texts, vocab_size=300)


def tiny(preset: str, seed: int = 0, **overrides) -> LanguageModel:
    torch.manual_seed(seed)
    model = LanguageModel(ModelConfig.from_preset(preset, vocab_size=VOCAB, **overrides)).eval()
    if model.config.architecture == "memoryformer":  # non-zero biases, so a lost bias shows
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(std=0.02)
    return model


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- config ---------------------------------------------------------------------------------------


def test_import_memoryformer_does_not_import_transformers():
    code = "import sys, memoryformer; assert 'transformers' not in sys.modules, 'eager transformers import'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_round_trip_keeps_every_field(tmp_path):
    cfg = ModelConfig.from_preset("mf-test", vocab_size=VOCAB, temperature=0.5, weighting="l1",
                                  memory_block_activation="gelu", tie_embeddings=True, init_std=0.01)
    hf_cfg = MemoryFormerConfig.from_model_config(cfg)
    assert hf_cfg.to_model_config() == cfg
    assert (hf_cfg.hidden_size, hf_cfg.num_hidden_layers, hf_cfg.num_attention_heads,
            hf_cfg.max_position_embeddings) == (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.max_seq_len)
    assert hf_cfg.hash_temperature == 0.5 and hf_cfg.tie_word_embeddings is True
    hf_cfg.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "memoryformer" and "temperature" not in on_disk
    back = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(back, MemoryFormerConfig) and back.to_model_config() == cfg


# ---- forward and generate ------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ARCHS)
def test_forward_matches_language_model(preset):
    lm = tiny(preset)
    hf = to_hf(lm, native_neox=False)
    x = ids(2, 9)
    out = hf(x, labels=x)
    ref = lm(x)[0]
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)
    expected_loss = F.cross_entropy(ref[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected_loss)
    torch.testing.assert_close(hf(x, logits_to_keep=1).logits, ref[:, -1:], rtol=1e-6, atol=1e-6)
    as_tuple = hf(x, labels=x, return_dict=False)
    torch.testing.assert_close(as_tuple[1], ref, rtol=0, atol=0)


def _record_input_lengths(hf: MemoryFormerForCausalLM) -> list[int]:
    lengths: list[int] = []
    hf.model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    return lengths


@pytest.mark.parametrize("preset", ARCHS)
def test_greedy_generate_equals_ours_and_is_incremental(preset):
    lm = tiny(preset)
    hf = to_hf(lm, native_neox=False)
    x = ids(2, 7)
    ours = lm.generate(x, 12, temperature=0)
    lengths = _record_input_lengths(hf)
    theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(theirs, ours)
    assert lengths == [7] + [1] * 11  # the prompt once, then one token per step: the cache is used
    no_cache = hf.generate(x, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(no_cache, ours)


@pytest.mark.parametrize("preset", ARCHS)
def test_left_padded_batch_generates_as_each_prompt_alone(preset):
    lm = tiny(preset)
    hf = to_hf(lm, native_neox=False)
    short, long = ids(1, 4, seed=2), ids(1, 9, seed=3)
    pad = 5
    batch = torch.cat([torch.cat([torch.full((1, pad), 7), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, pad:], lm.generate(short, 6, temperature=0)[0])
    assert torch.equal(out[1], lm.generate(long, 6, temperature=0)[0])
    # one forward over the padded batch: real positions equal the unpadded logits
    logits = hf(batch, attention_mask=mask).logits
    torch.testing.assert_close(logits[0, pad:], lm(short)[0][0], rtol=1e-5, atol=1e-5)


def test_beam_search_with_cache_equals_without():
    hf = to_hf(tiny("mf-test"), native_neox=False)
    x = ids(2, 5, seed=4)
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(hf.generate(x, **kw), hf.generate(x, use_cache=False, **kw))


def test_sampling_reproducible_and_cache_grows():
    hf = to_hf(tiny("mf-test"), native_neox=False)
    x = ids(1, 3)
    torch.manual_seed(5)
    first = hf.generate(x, max_new_tokens=20, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(5)
    second = hf.generate(x, max_new_tokens=20, do_sample=True, top_k=20, pad_token_id=0)
    assert torch.equal(first, second) and first.shape == (1, 23)
    # the cache started small and grew past its first capacity without changing the logits
    out = hf(x, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert isinstance(cache, MemoryFormerCache) and cache.get_seq_length() == 3
    full = x
    for _ in range(20):  # past the first capacity (16): the cache grows
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        full = torch.cat([full, nxt], 1)
        out = hf(nxt, cache=cache, use_cache=True)
    torch.testing.assert_close(out.logits[:, -1], hf(full).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_a_foreign_cache_object_is_a_clear_error():
    hf = to_hf(tiny("mf-test"), native_neox=False)
    with pytest.raises(TypeError, match="MemoryFormerCache"):
        hf(ids(1, 3), cache=object())


# ---- directories ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_memoryformer_directory_round_trip(tmp_path, tokenizer, tie):
    lm = tiny("mf-test", tie_embeddings=tie)
    out = save_pretrained(lm, tmp_path / "mf", tokenizer)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "modeling_memoryformer.py"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "memoryformer"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_memoryformer.MemoryFormerForCausalLM"
    assert is_hf_dir(out)
    x = ids(2, 9)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, MemoryFormerForCausalLM)
    torch.testing.assert_close(loaded(x).logits, lm(x)[0], rtol=0, atol=0)
    back, tok = load_any(out)
    assert isinstance(back, LanguageModel) and back.config == lm.config
    torch.testing.assert_close(back(x)[0], lm(x)[0], rtol=0, atol=0)
    assert tok.to_str() == tokenizer.to_str()
    if tie:
        assert back.head.weight.data_ptr() == back.embed.weight.data_ptr()


def test_hf_tokenizer_loads_with_auto_tokenizer(tmp_path, tokenizer):
    out = save_pretrained(tiny("pythia-test"), tmp_path / "py", tokenizer)
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "the big cat sat on the café mat"
    assert hf_tok(text).input_ids == tokenizer.encode(text).ids
    assert hf_tok.eos_token == hf_tok.bos_token == "<|endoftext|>"
    assert hf_tok.eos_token_id == tokenizer.token_to_id("<|endoftext|>")
    assert hf_tok.decode(hf_tok(text).input_ids) == text
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_pythia_exports_as_native_gpt_neox(tmp_path, tokenizer):
    from safetensors import safe_open
    from transformers import GPTNeoXForCausalLM

    lm = tiny("pythia-test")
    out = save_pretrained(lm, tmp_path / "neox", tokenizer)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and config["architectures"] == ["GPTNeoXForCausalLM"]
    assert not (out / "modeling_memoryformer.py").exists()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "embed_out.weight" in set(f.keys())  # the on-disk name every transformers version reads
    x = ids(2, 11)
    neox = AutoModelForCausalLM.from_pretrained(out)
    assert type(neox) is GPTNeoXForCausalLM
    torch.testing.assert_close(neox(x).logits, lm(x)[0], rtol=1e-5, atol=1e-5)
    back = LanguageModel.from_hf_gpt_neox(out)
    torch.testing.assert_close(back(x)[0], lm(x)[0], rtol=0, atol=0)
    assert torch.equal(neox.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False),
                       lm.generate(x, 8, temperature=0))
    m, tok = load_any(out)
    assert m.config == lm.config.replace(intermediate_size=lm.config.ffn_hidden) and tok is not None


def test_remote_code_loads_without_memoryformer(tmp_path, tokenizer):
    """The exported MemoryFormer loads with trust_remote_code=True, and the GPT-NeoX export with plain
    transformers, in a Python where `import memoryformer` fails."""
    mf, py = tiny("mf-test", memory_block_activation="gelu"), tiny("pythia-test")
    save_pretrained(mf, tmp_path / "mf", tokenizer)
    save_pretrained(py, tmp_path / "py", tokenizer)
    x = ids(2, 6)
    torch.save({"x": x, "mf": mf(x)[0], "py": py(x)[0], "mf_gen": mf.generate(x, 5, temperature=0)},
               tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "memoryformer":
                    raise ImportError("memoryformer is hidden in this test")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        exp = torch.load({str(tmp_path / "expected.pt")!r})
        mf = AutoModelForCausalLM.from_pretrained({str(tmp_path / "mf")!r}, trust_remote_code=True)
        py = AutoModelForCausalLM.from_pretrained({str(tmp_path / "py")!r})
        tok = AutoTokenizer.from_pretrained({str(tmp_path / "mf")!r}, trust_remote_code=True)
        assert type(mf).__name__ == "MemoryFormerForCausalLM" and "transformers_modules" in type(mf).__module__
        # the copy runs the pure-PyTorch layer; the package may use its C++ kernels: rounding differs
        torch.testing.assert_close(mf(exp["x"]).logits, exp["mf"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(py(exp["x"]).logits, exp["py"], rtol=1e-5, atol=1e-5)
        gen = mf.generate(exp["x"], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(gen, exp["mf_gen"]), (gen, exp["mf_gen"])
        assert tok.eos_token == "<|endoftext|>"
        # the copy's own GPT-NeoX import (LanguageModel.from_hf_gpt_neox) works without the package
        twin = sys.modules[type(mf).__module__].LanguageModel.from_hf_gpt_neox({str(tmp_path / "py")!r})
        torch.testing.assert_close(twin(exp["x"])[0], exp["py"], rtol=1e-5, atol=1e-5)
        assert not any(m.split(".")[0] == "memoryformer" for m in sys.modules)
        print("ok")
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def _generator():
    spec = importlib.util.spec_from_file_location("generate_remote_code", ROOT / "scripts" / "generate_remote_code.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_remote_code_is_up_to_date():
    """Regenerating modeling_memoryformer.py from the sources gives the checked-in text exactly."""
    assert _generator().generate() == remote_code_source(), "run: python scripts/generate_remote_code.py"


def test_remote_code_passes_ruff():
    ruff = shutil.which("ruff")
    assert ruff is not None, "ruff (a dev dependency) is needed for this test"
    result = subprocess.run([ruff, "check", "--no-cache", str(REMOTE_CODE)], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]


def test_remote_code_source_is_self_contained(tmp_path):
    from transformers.dynamic_module_utils import get_imports

    source = remote_code_source()
    (tmp_path / "modeling_memoryformer.py").write_text(source)
    imported = set(get_imports(tmp_path / "modeling_memoryformer.py"))  # what transformers checks before loading
    assert "memoryformer" not in imported and {"torch", "transformers"} <= imported
    namespace: dict = {"__name__": "remote_check"}
    sys.modules["remote_check"] = type(sys)("remote_check")  # dataclasses look the module up
    try:
        sys.modules["remote_check"].__dict__.update(namespace)
        exec(compile(source, "modeling_memoryformer.py", "exec"), sys.modules["remote_check"].__dict__)
    finally:
        ns = sys.modules.pop("remote_check").__dict__
    assert ns["MemoryFormerForCausalLM"] is not MemoryFormerForCausalLM
    assert ns["MemoryFormerConfig"].model_type == "memoryformer"


# ---- load_any: runs, checkpoints, errors -----------------------------------------------------------


def _write_run(run: Path, model: LanguageModel, tokenizer) -> Path:
    from memoryformer.train import checkpoint

    run.mkdir(parents=True)
    model.config.to_json(run / "config.json")
    tokenizer.save(str(run / "tokenizer.json"))
    checkpoint.save_checkpoint(checkpoint.checkpoint_path(run, 3),
                               {"step": 3, "model": model.state_dict(), "model_config": model.config.to_dict()})
    return run


@pytest.mark.parametrize("preset", ARCHS)
def test_load_any_reads_runs_and_checkpoint_files(tmp_path, tokenizer, preset):
    lm = tiny(preset)
    run = _write_run(tmp_path / "run", lm, tokenizer)
    x = ids(1, 8)
    for source in (run, next((run / "checkpoints").iterdir())):
        model, tok = load_any(source)
        torch.testing.assert_close(model(x)[0], lm(x)[0], rtol=0, atol=0)
        assert tok.to_str() == tokenizer.to_str()


@pytest.mark.parametrize("preset", ARCHS)
def test_export_verb_writes_a_loadable_directory(tmp_path, tokenizer, preset):
    from memoryformer.cli import main

    lm = tiny(preset)
    run = _write_run(tmp_path / "run", lm, tokenizer)
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    expected_type = "memoryformer" if preset.startswith("mf") else "gpt_neox"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == expected_type
    x = ids(1, 8)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(loaded(x).logits, lm(x)[0], rtol=1e-5, atol=1e-5)
    # a second export into the same place needs --force
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 1
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--force", "--format", "memoryformer",
                 "--dtype", "bfloat16"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "memoryformer" and config["dtype"] == "bfloat16"


def test_not_a_checkpoint_says_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"not a model checkpoint.*config\.json.*model\.safetensors.*found: notes\.txt"):
        load_any(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such model"):
        load_any(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert not is_hf_dir(tmp_path)


def test_tokenizer_larger_than_vocabulary_is_refused(tmp_path, tokenizer):
    small = tiny("mf-test").config.replace(vocab_size=256)
    with pytest.raises(ValueError, match=r"300 tokens but the model's vocabulary holds only 256"):
        check_tokenizer(tokenizer, small)
    lm = LanguageModel(small)
    with pytest.raises(ValueError, match="not the tokenizer this model was trained with"):
        save_pretrained(lm, tmp_path / "x", tokenizer)
    out = save_pretrained(lm, tmp_path / "y")  # no tokenizer: fine
    tokenizer.save(str(out / "tokenizer.json"))  # a foreign tokenizer put next to it
    with pytest.raises(ValueError, match="300 tokens"):
        load_any(out)
