"""The log-likelihood scorer, task metrics, perplexity and `memoryformer eval`, on a tiny fake model
whose logits are known in closed form, checked against slow direct computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from memoryformer.evaluation.evaluate import (
    Scorer,
    completion_metrics,
    encode_pair,
    make_encoder,
    mean_stderr,
    multiple_choice_metrics,
    perplexity,
)
from memoryformer.evaluation.tasks import Completion, MultipleChoice

CORPUS = [
    "Question: How do I open a jar?\nAnswer: Twist the lid.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "Sarah was a much better surgeon than Maria so she got the harder cases.",
    "  double  spaces and trailing spaces   ",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A small byte-level BPE trained here (offline), with GPT-2-like space handling."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    return tok


class FakeLM:
    """A causal toy model: logits[b, t] = bigram[idx[b, t]] + position[t] + first[idx[b, 0]].

    Position and first-token terms make results depend on where the window starts, so truncation and
    windowing mistakes show; padding on the right cannot change earlier positions.
    """

    def __init__(self, vocab: int, max_len: int = 64, seed: int = 0, bigram_only: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.bigram = torch.randn(vocab, vocab, generator=g) * 2
        scale = 0.0 if bigram_only else 1.0
        self.position = torch.randn(max_len, vocab, generator=g) * scale
        self.first = torch.randn(vocab, vocab, generator=g) * scale
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(idx.shape))
        return self.bigram[idx] + self.position[: idx.shape[1]] + self.first[idx[:, :1]]

    def logprobs_at(self, window: list[int], t: int) -> torch.Tensor:
        """Direct log-probabilities (vocab,) at position t of an unbatched window, in float64."""
        logits = self.bigram[window[t]] + self.position[t] + self.first[window[0]]
        return torch.log_softmax(logits.double(), dim=-1)


def reference_loglikelihood(model: FakeLM, encode, context: str, continuation: str, max_length: int):
    """lm-eval's recipe written out: spaces move, whole split at the context length, left truncation."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = encode(stripped)
    continuation_ids = encode(stripped + continuation)[len(context_ids):]
    window = (context_ids + continuation_ids)[-(max_length + 1):][:-1]
    total, greedy = 0.0, True
    for j, token in enumerate(continuation_ids):
        t = len(window) - len(continuation_ids) + j
        logprobs = model.logprobs_at(window, t)
        total += float(logprobs[token])
        greedy &= int(logprobs.argmax()) == token
    return total, greedy


REQUESTS = [
    ("Question: How do I open a jar?\nAnswer:", " Twist the lid."),
    ("Question: How do I open a jar?\nAnswer:", " Eat the lid."),
    ("The quick brown fox ", "jumps"),  # trailing space moves to the continuation
    ("Sarah was a much better surgeon than Maria so Maria", " got the harder cases."),
    ("The dog", " sleeps."),
    ("  double  spaces", " and trailing spaces   "),
]


def test_encode_pair_replicates_lm_eval(tokenizer):
    encode = make_encoder(tokenizer)
    context_ids, continuation_ids = encode_pair(encode, "The quick brown fox ", "jumps")
    assert context_ids == encode("The quick brown fox")
    assert context_ids + continuation_ids == encode("The quick brown fox jumps")
    lm_eval_model = pytest.importorskip("lm_eval.api.model")

    class Stub:  # just what TemplateLM._encode_pair needs from a causal HF model
        backend = "causal"

        def tok_encode(self, text, add_special_tokens=None):
            return encode(text)

    for context, continuation in REQUESTS:
        expected = lm_eval_model.TemplateLM._encode_pair(Stub(), context, continuation)
        assert encode_pair(encode, context, continuation) == tuple(expected)


@pytest.mark.parametrize("max_length", [6, 12, 64])
def test_loglikelihood_matches_direct_computation(tokenizer, max_length):
    model = FakeLM(tokenizer.get_vocab_size())
    scorer = Scorer(model, tokenizer, max_length=max_length, batch_size=4, progress=False)
    requests = [r for r in REQUESTS if len(encode_pair(scorer.encode, *r)[1]) <= max_length]
    got = scorer.loglikelihood(requests)
    encode = make_encoder(tokenizer)
    for request, (ll, greedy) in zip(requests, got):
        ref_ll, ref_greedy = reference_loglikelihood(model, encode, *request, max_length)
        assert ll == pytest.approx(ref_ll, abs=1e-4), request
        assert greedy == ref_greedy
    assert max(shape[1] for shape in model.shapes) <= max_length


def test_batching_gives_identical_results(tokenizer):
    model = FakeLM(tokenizer.get_vocab_size())
    encode = make_encoder(tokenizer)
    requests = [r for r in REQUESTS if len(encode_pair(encode, *r)[1]) <= 10] * 2  # some get truncated
    results = []
    for batch_size in (1, 2, 5, 64):
        scorer = Scorer(model, tokenizer, max_length=10, batch_size=batch_size, progress=False)
        model.shapes.clear()
        results.append(scorer.loglikelihood(requests))
        assert max(shape[0] for shape in model.shapes) == min(batch_size, len(requests))
    assert all(r == results[0] for r in results[1:])


def test_greedy_flag_and_empty_context(tokenizer):
    vocab = tokenizer.get_vocab_size()
    encode = make_encoder(tokenizer)
    target = encode(" the lid.")
    model = FakeLM(vocab, bigram_only=True)
    model.bigram.zero_()
    for prev, nxt in zip([0] + target[:-1], target):  # 0 = <|endoftext|>, the prefix token
        model.bigram[prev, nxt] = 50.0
    scorer = Scorer(model, tokenizer, max_length=16, progress=False)
    assert scorer.prefix_token_id == 0
    (ll, greedy), (_, other_greedy) = scorer.loglikelihood([("", " the lid."), ("", " the dog.")])
    assert greedy and not other_greedy
    assert ll == pytest.approx(sum(float(model.logprobs_at([0] + target, t)[target[t]]) for t in range(len(target))),
                               abs=1e-4)
    with pytest.raises(ValueError, match="empty context"):
        Scorer(model, lambda s: [1 + ord(c) % 50 for c in s], max_length=16).loglikelihood([("", "x")])


def test_scorer_errors(tokenizer):
    model = FakeLM(tokenizer.get_vocab_size())
    scorer = Scorer(model, tokenizer, max_length=3, progress=False)
    # a continuation longer than the window is scored on its last max_length tokens, with a warning
    context, continuation = "The", " quick brown fox jumps over the lazy dog."
    with pytest.warns(UserWarning, match="last max_length tokens"):
        (long_ll, _), = scorer.loglikelihood([(context, continuation)])
    ctx_ids, cont_ids = scorer.encode_request(context, continuation)
    assert len(cont_ids) > 3
    (expected, _), = scorer.loglikelihood_tokens([(list(ctx_ids) + list(cont_ids[:-3]), list(cont_ids[-3:]))])
    assert long_ll == pytest.approx(expected)
    with pytest.raises(ValueError, match="encodes to no tokens"):
        scorer.loglikelihood([("The", "")])
    bad = Scorer(lambda idx: model(idx)[:, :-1], tokenizer, max_length=8, progress=False)
    with pytest.raises(ValueError, match="expected \\(batch, seq, vocab\\)"):
        bad.loglikelihood([("The dog", " sleeps.")])
    with pytest.raises(TypeError, match="tokenizer"):
        Scorer(model, 42, max_length=8)


# -- metrics -------------------------------------------------------------------------------------------
def _mc(choices: tuple[str, ...], gold: int) -> MultipleChoice:
    return MultipleChoice(tuple(("ctx", " " + c) for c in choices), gold, choices)


def test_multiple_choice_metrics_by_hand():
    items = [_mc(("a", "bbbb"), 1), _mc(("a", "bbbb"), 0), _mc(("xx", "é"), 1), _mc(("p", "q", "r"), 2)]
    lls = [[-2.0, -4.0], [-2.0, -4.0], [-3.0, -1.9], [-1.0, -1.0, -1.0]]
    m = multiple_choice_metrics(items, lls)
    # acc: argmax picks 0, 0, 1, 0 (first of a tie) -> hits 0, 1, 1, 0
    assert m["acc"] == 0.5
    # acc_norm divides by characters: -2/1 < -4/4 -> picks 1; "é" is 1 char: -3/2 > -1.9/1 -> picks 0
    assert m["acc_norm"] == 0.25
    # acc_bytes: "é" is 2 bytes: -3/2 < -1.9/2 -> picks 1
    assert m["acc_bytes"] == 0.5
    assert m["n"] == 4
    assert m["acc_stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert mean_stderr([1.0]) != mean_stderr([1.0])  # nan for n < 2


def test_completion_metrics_by_hand():
    m = completion_metrics([(-1.0, True), (-3.0, False)])
    assert m == {"n": 2, "acc": 0.5, "acc_stderr": pytest.approx(0.5), "perplexity": pytest.approx(math.exp(2.0))}


def test_evaluate_task_end_to_end(tokenizer):
    model = FakeLM(tokenizer.get_vocab_size(), seed=3)
    scorer = Scorer(model, tokenizer, max_length=12, batch_size=3, progress=False)
    encode = make_encoder(tokenizer)
    items = [
        MultipleChoice((("Question: How do I open a jar?\nAnswer:", " Twist the lid."),
                        ("Question: How do I open a jar?\nAnswer:", " Eat the lid.")), 0,
                       ("Twist the lid.", "Eat the lid.")),
        MultipleChoice((("The dog", " sleeps."), ("The dog", " jumps over the lazy dog."),
                        ("The dog", " fox.")), 2, ("sleeps.", "jumps over the lazy dog.", "fox.")),
        MultipleChoice((("Sarah was a", " surgeon."), ("Maria was a", " surgeon.")), 1,
                       ("Sarah was a", "Maria was a")),
    ]
    lls = [[reference_loglikelihood(model, encode, c, x, 12)[0] for c, x in item.requests] for item in items]
    expected = multiple_choice_metrics(items, lls)
    got = scorer.evaluate("piqa", items)
    assert set(got) == {"n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "acc_bytes", "acc_bytes_stderr"}
    for key in ("acc", "acc_norm", "acc_bytes"):
        assert got[key] == expected[key]
    assert set(scorer.evaluate("winogrande", items)) == {"n", "acc", "acc_stderr"}
    completions = [Completion("The quick brown fox", " jumps"), Completion("The lazy", " dog.")]
    got = scorer.evaluate("lambada", completions)
    refs = [reference_loglikelihood(model, encode, c.context, c.continuation, 12) for c in completions]
    assert got["perplexity"] == pytest.approx(math.exp(-sum(r[0] for r in refs) / 2), rel=1e-5)
    assert got["acc"] == sum(r[1] for r in refs) / 2
    with pytest.raises(ValueError, match="no examples"):
        scorer.evaluate("piqa", [])


# -- perplexity ----------------------------------------------------------------------------------------
def _direct_nll(model: FakeLM, windows: list[tuple[list[int], list[int]]]) -> float:
    """Sum of -log p over (input window, its scored targets = the window's last len(targets) next tokens)."""
    nll = 0.0
    for window, targets in windows:
        for j, token in enumerate(targets):
            t = len(window) - len(targets) + j
            nll -= float(model.logprobs_at(window, t)[token])
    return nll


def test_perplexity_non_overlapping_windows_match_direct_computation():
    torch.manual_seed(0)
    tokens = torch.randint(0, 40, (23,)).tolist()
    model = FakeLM(40)
    got = perplexity(model, tokens, max_length=5, batch_size=2, progress=False)
    # inputs tokens[0:5], [5:10], [10:15], [15:20] score the next 5 tokens each; the last window
    # keeps 5 tokens of input (tokens[17:22]) and scores the 2 left over
    windows = [(tokens[i:i + 5], tokens[i + 1:i + 6]) for i in range(0, 20, 5)] + [(tokens[17:22], tokens[21:23])]
    nll = _direct_nll(model, windows)
    assert got["tokens"] == 22
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / 22), rel=1e-5)
    assert "bits_per_byte" not in got


@pytest.mark.parametrize("max_length,stride", [(6, 2), (6, 6), (4, 1), (30, 7)])
def test_perplexity_windows_are_lm_eval_rolling_windows(max_length, stride):
    torch.manual_seed(1)
    tokens = torch.randint(1, 40, (17,)).tolist()
    model = FakeLM(40)
    got = perplexity(model, tokens, max_length=max_length, stride=stride, prefix_token_id=0, n_bytes=30,
                     batch_size=3, progress=False)
    utils = pytest.importorskip("lm_eval.utils")
    windows = list(utils.get_rolling_token_windows(tokens, 0, max_length, max_length - stride + 1))
    nll = _direct_nll(model, windows)
    assert got["tokens"] == 17  # the prefix makes the first token scored too
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / 30, rel=1e-5)


def test_perplexity_of_a_bigram_model_does_not_depend_on_windows():
    """Each token is scored exactly once whatever the windows: a bigram model gives the same total."""
    torch.manual_seed(2)
    tokens = torch.randint(0, 30, (41,)).tolist()
    model = FakeLM(30, bigram_only=True)
    direct = -sum(float(torch.log_softmax(model.bigram[a].double(), -1)[b]) for a, b in zip(tokens, tokens[1:]))
    for max_length, stride, batch_size in [(40, None, 1), (7, None, 3), (7, 3, 2), (4, 1, 16), (64, 5, 4)]:
        got = perplexity(model, tokens, max_length=max_length, stride=stride, batch_size=batch_size, progress=False)
        assert got["tokens"] == 40
        assert got["nll"] == pytest.approx(direct, rel=1e-5), (max_length, stride)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tokens, max_length=4, stride=5)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, tokens[:1], max_length=4)


def test_scorer_perplexity_text_and_file(tokenizer, tmp_path):
    model = FakeLM(tokenizer.get_vocab_size())
    scorer = Scorer(model, tokenizer, max_length=8, batch_size=3, progress=False)
    text = "The quick brown fox jumps over the lazy dog.\nThe dog sleeps. é"
    got = scorer.perplexity(text)
    tokens = make_encoder(tokenizer)(text)
    assert got == perplexity(model, tokens, max_length=8, batch_size=3, prefix_token_id=0,
                             n_bytes=len(text.encode()), progress=False)
    assert got["tokens"] == len(tokens) and got["bytes"] == len(text.encode())
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())  # BOM + CRLF
    assert scorer.perplexity_file(path) == got
    with pytest.raises(FileNotFoundError):
        scorer.perplexity_file(tmp_path / "missing.txt")


# -- the `memoryformer eval` verb -----------------------------------------------------------------------
class FakeModule(torch.nn.Module):
    """What `load_model_for_eval` returns: ids -> (logits, loss), with a config carrying max_seq_len."""

    def __init__(self, fake: FakeLM, max_seq_len: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.fake = fake
        self.config = type("Config", (), {"max_seq_len": max_seq_len})()

    def forward(self, idx):
        return self.fake(idx) + self.weight, None


def _task_files(root: Path) -> None:
    (root / "piqa").mkdir(parents=True)
    rows = [{"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Eat the lid."},
            {"goal": "Find a dog", "sol1": "Look for the lazy dog.", "sol2": "Ask the fox."}]
    (root / "piqa/valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "piqa/valid-labels.lst").write_text("0\n1\n")
    (root / "lambada").mkdir()
    (root / "lambada/lambada_test.jsonl").write_text(json.dumps({"text": "The quick brown fox jumps"}) + "\n")


def test_eval_command(tokenizer, tmp_path, monkeypatch, capsys):
    from memoryformer import cli
    from memoryformer.commands import evaluate as command
    from memoryformer.evaluation.tasks import load_task

    fake = FakeLM(tokenizer.get_vocab_size(), seed=5)
    monkeypatch.setattr(command, "load_model_for_eval", lambda path, device=None: (FakeModule(fake, 16), tokenizer))
    _task_files(tmp_path / "tasks")
    text_file = tmp_path / "book.txt"
    text_file.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    argv = ["eval", "--model", "run", "--task", "piqa,lambada", "--data-root", str(tmp_path / "tasks"),
            "--ppl", str(text_file), "--batch-size", "3", "--quiet"]
    assert cli.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    scorer = Scorer(fake, tokenizer, max_length=16, progress=False)
    assert out["tasks"]["piqa"] == scorer.evaluate("piqa", load_task("piqa", data_root=tmp_path / "tasks"))
    assert out["tasks"]["lambada"]["perplexity"] == pytest.approx(
        scorer.evaluate("lambada", load_task("lambada", data_root=tmp_path / "tasks"))["perplexity"])
    assert out["tasks"]["lambada"]["acc_stderr"] is None  # nan (n = 1) becomes null in JSON
    assert out["perplexity"][str(text_file)]["tokens"] == len(make_encoder(tokenizer)(text_file.read_text()))
    assert cli.main([*argv, "--limit", "1"]) == 0
    table = capsys.readouterr().out
    assert "piqa" in table and "lambada" in table and "bits/byte" in table

    assert cli.main(["eval", "--model", "run", "--task", "piqa,lambada", "--data", "x.jsonl"]) == 1
    assert "got 1 --data file(s) for 2 task(s)" in capsys.readouterr().err
    assert cli.main(["eval", "--task", "piqa", "--data-root", str(tmp_path / "tasks")]) == 1
    assert "--model DIR is needed" in capsys.readouterr().err


def test_eval_command_writes_lm_eval_tasks(tmp_path, capsys):
    from memoryformer import cli

    _task_files(tmp_path / "tasks")
    out = tmp_path / "lm"
    assert cli.main(["eval", "--write-lm-eval-tasks", str(out), "--data-root", str(tmp_path / "tasks")]) == 0
    assert "mf_piqa,mf_lambada" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["mf_lambada.jsonl", "mf_lambada.yaml", "mf_piqa.jsonl",
                                                      "mf_piqa.yaml"]


def test_load_model_for_eval_errors(monkeypatch):
    import sys

    from memoryformer.commands.evaluate import load_model_for_eval

    with pytest.raises(FileNotFoundError, match="some/run"):
        load_model_for_eval("some/run")
    for name in ("memoryformer.integrations.hf", "memoryformer.train.checkpoint"):  # as if neither could be imported
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RuntimeError, match="no memoryformer.train.checkpoint.load_model"):
        load_model_for_eval("some/run")
