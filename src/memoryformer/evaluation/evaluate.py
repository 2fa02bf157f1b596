"""Zero-shot scoring and perplexity for any causal language model given as a logits function.

    scorer = Scorer(lambda idx: model(idx)[0], tokenizer, max_length=2048)   # our LanguageModel
    scorer = Scorer(lambda idx: hf_model(idx).logits, hf_tokenizer, max_length=2048)
    metrics = scorer.evaluate("piqa", load_task("piqa", path))   # {"n", "acc", "acc_stderr", ...}
    scorer.perplexity(text)                                       # {"perplexity", "bits_per_byte", ...}

The log-likelihood path replicates lm-eval's Hugging Face model (`HFLM`): `_encode_pair` tokenisation,
left truncation to `max_length`, right padding, and its multiple-choice metrics, so the numbers agree
with `lm_eval` on the same requests.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from memoryformer.evaluation.tasks import Completion, Item, MultipleChoice, get_task
from memoryformer.progress import Progress

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # idx (batch, seq) long -> logits (batch, seq, vocab)
Encoder = Callable[[str], list[int]]


def make_encoder(tokenizer: Any) -> Encoder:
    """A `str -> token ids` function from a `tokenizers.Tokenizer`, an HF tokenizer, or a callable.

    Special tokens are not added, as lm-eval does for causal models.
    """
    if hasattr(tokenizer, "encode"):
        def encode(text: str) -> list[int]:
            out = tokenizer.encode(text, add_special_tokens=False)
            return list(out.ids if hasattr(out, "ids") else out)
        return encode
    if callable(tokenizer):
        return lambda text: list(tokenizer(text))
    raise TypeError(f"expected a tokenizer with .encode or a str -> list[int] function, got {type(tokenizer).__name__}")


def default_prefix_token_id(tokenizer: Any) -> int | None:
    """The token lm-eval puts before an empty context: BOS if the tokenizer has one, else end-of-text."""
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    if hasattr(tokenizer, "token_to_id"):  # tokenizers.Tokenizer
        for token in ("<|endoftext|>", "</s>", "<s>", "<eos>", "<bos>"):
            value = tokenizer.token_to_id(token)
            if value is not None:
                return value
    return None


def encode_pair(encode: Encoder, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for causal models: trailing spaces of the context move to the
    continuation, then encode(context + continuation) is split at len(encode(context))."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids):]


class Scorer:
    """Log-likelihoods of (context, continuation) requests, task metrics and perplexity for one model.

    `logits_fn` maps token ids (batch, seq) to logits (batch, seq, vocab) and must be causal (right
    padding is used). `max_length` is the model's context: longer inputs lose tokens on the left.
    `prefix_token_id` conditions empty contexts and the first token of a perplexity text (default:
    from the tokenizer, as lm-eval); `device` is where input ids are placed.
    """

    def __init__(self, logits_fn: LogitsFn, tokenizer: Any, *, max_length: int, batch_size: int = 16,
                 device: str | torch.device | None = None, prefix_token_id: int | None = None,
                 progress: bool = True):
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length and batch_size must be >= 1, got {max_length} and {batch_size}")
        self.logits_fn = logits_fn
        self.encode = make_encoder(tokenizer)
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.prefix_token_id = prefix_token_id if prefix_token_id is not None else default_prefix_token_id(tokenizer)
        self.progress = progress

    # -- tokenisation --------------------------------------------------------------------------------
    def encode_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of one request exactly as lm-eval's HFLM makes them (empty context: prefix token)."""
        if context == "":
            if self.prefix_token_id is None:
                raise ValueError("a request has an empty context: pass prefix_token_id= to condition it on")
            continuation_ids = self.encode(continuation)
            if continuation_ids and continuation_ids[0] == self.prefix_token_id:
                return continuation_ids[:1], continuation_ids[1:]
            return [self.prefix_token_id], continuation_ids
        return encode_pair(self.encode, context, continuation)

    # -- scoring -------------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]], desc: str = "scoring") -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether every continuation token is the argmax) per request."""
        pairs = []
        for context, continuation in requests:
            context_ids, continuation_ids = self.encode_request(context, continuation)
            if not continuation_ids:
                raise ValueError(f"continuation {continuation!r} (after {context[-40:]!r}) encodes to no tokens")
            pairs.append((context_ids, continuation_ids))
        return self.loglikelihood_tokens(pairs, desc=desc)

    @torch.inference_mode()
    def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                             desc: str = "scoring") -> list[tuple[float, bool]]:
        """Like `loglikelihood`, for pre-tokenised (context ids, continuation ids) pairs.

        Requests are sorted longest first and packed `batch_size` at a time, right-padded with 0; the
        model sees (context + continuation)[-(max_length + 1):][:-1], as in lm-eval.
        """
        for context_ids, continuation_ids in pairs:
            if not context_ids or not continuation_ids:
                raise ValueError("each request needs at least one context and one continuation token")
        if any(len(c) > self.max_length for _, c in pairs):
            # a continuation longer than the window: score only its last max_length tokens, the rest
            # joins the context (lm-eval has no defined behaviour here)
            warnings.warn(f"continuations longer than max_length {self.max_length} tokens are scored on "
                          "their last max_length tokens only", stacklevel=2)
            pairs = [(list(c) + list(k[:-self.max_length]), list(k[-self.max_length:]))
                     if len(k) > self.max_length else (c, k) for c, k in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        bar = Progress(total=len(pairs), desc=desc, unit="requests", enabled=self.progress)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            inputs = [(list(pairs[i][0]) + list(pairs[i][1]))[-(self.max_length + 1):][:-1] for i in chunk]
            width = max(len(x) for x in inputs)
            batch = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(inputs):
                batch[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs = self._logprobs(batch)
            for row, index in enumerate(chunk):
                continuation = torch.tensor(pairs[index][1], dtype=torch.long, device=logprobs.device)
                end = len(inputs[row])
                rows = logprobs[row, end - len(continuation):end]  # (cont, vocab)
                token_logprobs = rows.gather(-1, continuation[:, None]).squeeze(-1)
                greedy = bool((rows.argmax(-1) == continuation).all())
                results[index] = (float(token_logprobs.sum()), greedy)
            bar.update(len(chunk), tokens=sum(len(x) for x in inputs))
        bar.close()
        return results

    def _logprobs(self, batch: torch.Tensor) -> torch.Tensor:
        """log-softmax of the model's logits in float32: (batch, seq) -> (batch, seq, vocab)."""
        logits = self.logits_fn(batch.to(self.device))
        if logits.dim() != 3 or logits.shape[:2] != batch.shape:
            raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for input {tuple(batch.shape)}; "
                             "expected (batch, seq, vocab)")
        return torch.log_softmax(logits.float(), dim=-1)

    # -- tasks ---------------------------------------------------------------------------------------
    def evaluate(self, task: str, items: Sequence[Item]) -> dict[str, float]:
        """Score a task's items and return its metrics (those lm-eval reports for it, plus stderrs)."""
        wanted = get_task(task).metrics if _known(task) else None
        return evaluate_items(self, items, desc=task, metrics=wanted)

    def perplexity(self, text: str, *, stride: int | None = None) -> dict[str, float]:
        """Token perplexity and bits per byte of `text` (see `perplexity`); the first token is scored
        after `prefix_token_id` when there is one, as lm-eval's rolling log-likelihood does."""
        return perplexity(self.logits_fn, self.encode(text), max_length=self.max_length, stride=stride,
                          batch_size=self.batch_size, prefix_token_id=self.prefix_token_id,
                          n_bytes=len(text.encode("utf-8")), device=self.device, progress=self.progress)

    def perplexity_file(self, path: str | Path, *, stride: int | None = None) -> dict[str, float]:
        """`perplexity` of a UTF-8 text file (a BOM is dropped, line endings become "\\n")."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"perplexity text file not found: {path}")
        return self.perplexity(path.read_text(encoding="utf-8-sig"), stride=stride)


def _known(task: str) -> bool:
    try:
        get_task(task)
    except ValueError:
        return False
    return True


# -- metrics -----------------------------------------------------------------------------------------
def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the n-1 sample deviation (lm-eval's `mean_stderr`); nan if n < 2."""
    n = len(values)
    if n < 2:
        return math.nan
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def _argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (numpy's tie rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def multiple_choice_metrics(items: Sequence[MultipleChoice], loglikelihoods: Sequence[Sequence[float]]) -> dict[str, float]:
    """acc (argmax log-likelihood), acc_norm (log-likelihood / character length of each choice, as
    lm-eval), acc_bytes (/ UTF-8 byte length), each with its stderr, and n."""
    hits: dict[str, list[float]] = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for item, lls in zip(items, loglikelihoods, strict=True):
        chars = [len(c) for c in item.choices]
        nbytes = [len(c.encode("utf-8")) for c in item.choices]
        hits["acc"].append(float(_argmax(lls) == item.gold))
        hits["acc_norm"].append(float(_argmax([ll / n if n else -math.inf for ll, n in zip(lls, chars)]) == item.gold))
        hits["acc_bytes"].append(float(_argmax([ll / n if n else -math.inf for ll, n in zip(lls, nbytes)]) == item.gold))
    out: dict[str, float] = {"n": len(items)}
    for name, values in hits.items():
        out[name] = sum(values) / len(values) if values else math.nan
        out[f"{name}_stderr"] = mean_stderr(values)
    return out


def completion_metrics(results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """LAMBADA-style: acc (all target tokens greedy), perplexity = exp(-mean log-likelihood per
    example) as lm-eval aggregates it, and n."""
    greedy = [float(g) for _, g in results]
    lls = [ll for ll, _ in results]
    return {
        "n": len(results),
        "acc": sum(greedy) / len(greedy) if greedy else math.nan,
        "acc_stderr": mean_stderr(greedy),
        "perplexity": math.exp(-sum(lls) / len(lls)) if lls else math.nan,
    }


def evaluate_items(scorer: Scorer, items: Sequence[Item], *, desc: str = "scoring",
                   metrics: Sequence[str] | None = None) -> dict[str, float]:
    """Metrics for a list of items, all `MultipleChoice` or all `Completion`; `metrics` keeps only
    those named (and their stderrs, and n)."""
    if not items:
        raise ValueError(f"{desc}: no examples to score")
    if all(isinstance(item, MultipleChoice) for item in items):
        requests = [request for item in items for request in item.requests]
        flat = scorer.loglikelihood(requests, desc=desc)
        grouped, at = [], 0
        for item in items:
            grouped.append([ll for ll, _ in flat[at:at + len(item.requests)]])
            at += len(item.requests)
        out = multiple_choice_metrics(items, grouped)
        if metrics is not None and "acc_norm" in metrics:
            metrics = [*metrics, "acc_bytes"]
    elif all(isinstance(item, Completion) for item in items):
        out = completion_metrics(scorer.loglikelihood([(i.context, i.continuation) for i in items], desc=desc))
    else:
        raise TypeError(f"{desc}: items must be all MultipleChoice or all Completion")
    if metrics is None:
        return out
    keep = {"n", *metrics, *(f"{m}_stderr" for m in metrics)}
    return {key: value for key, value in out.items() if key in keep}


# -- perplexity --------------------------------------------------------------------------------------
@torch.inference_mode()
def perplexity(logits_fn: LogitsFn, tokens: Sequence[int], *, max_length: int, stride: int | None = None,
               batch_size: int = 8, prefix_token_id: int | None = None, n_bytes: int | None = None,
               device: str | torch.device | None = None, progress: bool = True) -> dict[str, float]:
    """Perplexity of a token sequence scored in windows of at most `max_length` tokens.

    With `prefix_token_id` the sequence is [prefix] + tokens and every token is scored; without it the
    first token is only context. The windows are lm-eval's rolling ones (`get_rolling_token_windows`
    with context_len = max_length - stride + 1): the first window scores its `max_length` targets, each
    later one scores the next `stride` targets from the `max_length` tokens before its last target.
    The default stride, `max_length`, gives non-overlapping windows (lm-eval's loglikelihood_rolling);
    a smaller stride gives every scored token at least max_length - stride tokens of context. Returns
    tokens (scored), nll (summed, nats), loss (nll / tokens), perplexity (exp loss), and with
    `n_bytes` bytes and bits_per_byte (nll / ln 2 / n_bytes).
    """
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    seq = ([prefix_token_id] if prefix_token_id is not None else []) + list(tokens)
    if len(seq) < 2:
        raise ValueError(f"need at least 2 tokens (prefix included) to score, got {len(seq)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    # window (a, s, e) scores targets seq[s:e] from input seq[a:e-1]
    end = min(1 + max_length, len(seq))
    windows = [(0, 1, end)]
    while end < len(seq):
        start, end = end, min(end + stride, len(seq))
        windows.append((end - 1 - max_length, start, end))
    nll = 0.0
    bar = Progress(total=len(seq) - 1, desc="perplexity", unit="tokens", enabled=progress)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        width = max(e - 1 - a for a, _, e in chunk)
        batch = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (a, _, e) in enumerate(chunk):
            batch[row, :e - 1 - a] = torch.tensor(seq[a:e - 1], dtype=torch.long)
        logits = logits_fn(batch.to(device))
        if logits.dim() != 3 or logits.shape[:2] != batch.shape:
            raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for input {tuple(batch.shape)}")
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, (a, s, e) in enumerate(chunk):
            targets = torch.tensor(seq[s:e], dtype=torch.long, device=logprobs.device)
            rows = logprobs[row, s - 1 - a:e - 1 - a]
            nll -= float(rows.gather(-1, targets[:, None]).sum())
            bar.update(e - s, tokens=e - s)
    bar.close()
    count = len(seq) - 1
    out = {"tokens": count, "nll": nll, "loss": nll / count, "perplexity": math.exp(nll / count)}
    if n_bytes:
        out["bytes"] = n_bytes
        out["bits_per_byte"] = nll / math.log(2) / n_bytes
    return out
