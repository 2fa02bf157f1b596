"""`memoryformer generate`: the printed text equals our model's own generate, streamed token by token,
from training runs and Hugging Face directories; sampling options, stdin, stop-at-eot, errors."""

from __future__ import annotations

import io
import random
import sys

import pytest
import torch

from memoryformer import LanguageModel, ModelConfig
from memoryformer.cli import main
from memoryformer.commands import generate as generate_cmd
from memoryformer.data.tokenizer import train_bpe
from memoryformer.train import checkpoint

pytest.importorskip("transformers")

WORDS = "the a cat dog sat on mat ran fast slow big small red blue water fire stone tree".split()
PROMPT = "the big cat sat on"


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    return train_bpe([" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)], vocab_size=300)


def _model(preset: str, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig.from_preset(preset, vocab_size=320)).eval()


def _run_dir(path, model: LanguageModel, tokenizer=None):
    path.mkdir(parents=True)
    model.config.to_json(path / "config.json")
    checkpoint.save_model_weights(model, path / "model.safetensors")
    if tokenizer is not None:
        tokenizer.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer):
    """{name: (path, model)}: a MemoryFormer run directory and a Pythia twin exported to HF."""
    from memoryformer.integrations.hf import save_pretrained

    root = tmp_path_factory.mktemp("generate")
    mf, py = _model("mf-test"), _model("pythia-test", seed=1)
    return {"run": (_run_dir(root / "run", mf, tokenizer), mf),
            "hf": (save_pretrained(py, root / "hf", tokenizer), py)}


def _expected(model: LanguageModel, tokenizer, prompt: str, n: int, **kw) -> str:
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    out = model.generate(ids, n, **kw)[0, ids.shape[1]:].tolist()
    return tokenizer.decode(out)


class Recorder(io.StringIO):
    """A stdout that remembers every write, to see the text arrive in pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.mark.parametrize("source", ["run", "hf"])
def test_greedy_output_equals_model_generate_and_streams(sources, tokenizer, source, monkeypatch):
    path, model = sources[source]
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", "12",
                 "--temperature", "0", "--device", "cpu"]) == 0
    continuation = _expected(model, tokenizer, PROMPT, 12, temperature=0)
    assert out.getvalue() == PROMPT + continuation + "\n"
    assert out.writes[0] == PROMPT
    pieces = out.writes[1:-1]  # between the echoed prompt and the final newline
    assert len(pieces) >= 6 and "".join(pieces) == continuation  # streamed, not printed at the end


def test_lower_precision_tables_and_head(sources, tokenizer, capsys, monkeypatch):
    from memoryformer.inference import quantize

    path, model = sources["run"]
    used = []
    real = quantize.quantize_model
    monkeypatch.setattr(quantize, "quantize_model", lambda m, **kw: used.append((m, kw)) or real(m, **kw))
    assert main(["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature",
                 "0", "--no-echo", "--device", "cpu", "--tables", "int8", "--head", "bf16"]) == 0
    assert [kw for _, kw in used] == [{"tables": "int8", "head": "bf16"}]
    expected = _expected(real(model, tables="int8", head="bf16"), tokenizer, PROMPT, 8, temperature=0)
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(path), "--tables", "int4"])


def test_seeded_sampling_is_repeatable_and_matches(sources, tokenizer, capsys):
    path, model = sources["run"]
    args = ["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", "10", "--seed", "3",
            "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--no-echo", "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    torch.manual_seed(3)
    expected = _expected(model, tokenizer, PROMPT, 10, temperature=0.9, top_k=50, top_p=0.95,
                         generator=torch.Generator().manual_seed(3))
    assert first == expected + "\n"
    assert main([a if a != "3" else "4" for a in args]) == 0
    assert capsys.readouterr().out != first  # the seed matters


def test_top_k_one_is_greedy_and_stdin_is_the_prompt(sources, tokenizer, capsys, monkeypatch):
    path, model = sources["hf"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
    assert main(["generate", "--model", str(path), "--max-new-tokens", "8", "--top-k", "1", "--seed", "0",
                 "--no-echo", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == _expected(model, tokenizer, PROMPT, 8, temperature=0) + "\n"


def test_empty_prompt_starts_from_end_of_text(sources, tokenizer, capsys):
    path, model = sources["run"]
    assert main(["generate", "--model", str(path), "--prompt", "", "--max-new-tokens", "6",
                 "--temperature", "0", "--device", "cpu"]) == 0
    eot = tokenizer.token_to_id("<|endoftext|>")
    out = model.generate(torch.tensor([[eot]]), 6, temperature=0)[0, 1:].tolist()
    assert capsys.readouterr().out == tokenizer.decode(out) + "\n"


def test_stop_at_eot_stops(tmp_path, tokenizer, monkeypatch, capsys):
    model = _model("mf-test")
    with torch.no_grad():
        model.head.weight.zero_()  # all logits equal: greedy picks id 0, the end-of-text token
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    run = _run_dir(tmp_path / "run", model, tokenizer)
    pushed: list[int] = []
    original = generate_cmd.StreamPrinter.push
    monkeypatch.setattr(generate_cmd.StreamPrinter, "push", lambda self, t: (pushed.append(t), original(self, t)))
    base = ["generate", "--model", str(run), "--prompt", PROMPT, "--max-new-tokens", "9", "--temperature", "0",
            "--device", "cpu"]
    assert main(base) == 0
    assert pushed == [0] * 9
    pushed.clear()
    assert main(base + ["--stop-at-eot"]) == 0
    assert pushed == [0]
    assert capsys.readouterr().out.endswith(PROMPT + "\n")  # the end-of-text token itself is not printed


def test_long_prompt_keeps_its_end(sources, tokenizer, capsys):
    path, model = sources["run"]
    prompt = " ".join(WORDS * 4)  # longer than the 64-token context
    assert main(["generate", "--model", str(path), "--prompt", prompt, "--max-new-tokens", "10",
                 "--temperature", "0", "--no-echo", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "keeping its last 54" in captured.err
    ids = tokenizer.encode(prompt).ids[-54:]
    out = model.generate(torch.tensor([ids]), 10, temperature=0)[0, 54:].tolist()
    assert captured.out == tokenizer.decode(out) + "\n"


def test_stream_printer_holds_back_a_split_character(tokenizer):
    first, second = (tokenizer.token_to_id(c) for c in "Ã©")  # the two UTF-8 bytes of "é", byte-level
    out = Recorder()
    printer = generate_cmd.StreamPrinter(tokenizer, out)
    for token in tokenizer.encode("the").ids:
        printer.push(token)
    printer.push(first)
    assert out.getvalue() == "the"
    printer.push(second)
    assert out.getvalue() == "theé"


def test_errors_are_clear(tmp_path, sources, tokenizer, capsys):
    path, model = sources["run"]
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--model", str(tmp_path / "empty"), "--prompt", "x"]) == 1
    assert "not a model checkpoint" in capsys.readouterr().err
    assert main(["generate", "--model", str(path), "--prompt", "x", "--max-new-tokens", "64"]) == 1
    assert "leaves no room" in capsys.readouterr().err
    bare = _run_dir(tmp_path / "bare", model)  # no tokenizer.json
    assert main(["generate", "--model", str(bare), "--prompt", "x"]) == 1
    assert "--tokenizer" in capsys.readouterr().err
    big = type(tokenizer).from_str(tokenizer.to_str())
    big.add_tokens([f"<extra_{i}>" for i in range(40)])  # 340 ids: more than the model's 320
    big.save(str(tmp_path / "big.json"))
    assert main(["generate", "--model", str(bare), "--tokenizer", str(tmp_path / "big.json"), "--prompt", "x"]) == 1
    assert "model's vocabulary holds only 320" in capsys.readouterr().err
