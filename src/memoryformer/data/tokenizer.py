"""Tokenizers (the `tokenizers` library): load from a JSON file or a Hub name, or train a byte-level
BPE on a corpus. The end-of-text token separates documents in the token shards."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT_TOKEN = "<|endoftext|>"
# looked up in this order when a loaded tokenizer has no "<|endoftext|>"
EOT_CANDIDATES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
MIN_BPE_VOCAB = 257  # 256 byte symbols + the end-of-text token


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a `tokenizers` JSON file, a directory holding `tokenizer.json`, or a Hugging
    Face Hub name (e.g. `gpt2`, `EleutherAI/pythia-70m`; needs the network)."""
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as err:
            raise ValueError(f"{path} is not a `tokenizers` JSON file ({err}); pass a tokenizer.json, "
                             "a Hub tokenizer name, or --vocab-size N to train one") from None
    spec = str(spec)
    looks_like_path = spec.startswith((".", "/", "~")) or path.suffix.lower() == ".json" or path.is_dir()
    if looks_like_path:
        raise FileNotFoundError(f"unknown tokenizer {spec!r}: no such tokenizer file; pass a tokenizer.json, "
                                "a Hub tokenizer name, or --vocab-size N to train one")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise ValueError(f"unknown tokenizer {spec!r}: not a local file, and HF_HUB_OFFLINE is set so the "
                         "Hub cannot be asked; pass a tokenizer.json or --vocab-size N")
    try:
        return Tokenizer.from_pretrained(spec)
    except Exception as err:
        raise ValueError(f"unknown tokenizer {spec!r}: not a local file, and the Hugging Face Hub could not "
                         f"provide it ({err}); pass a tokenizer.json, or --vocab-size N to train one") from None


def eot_id(tokenizer: Tokenizer) -> int:
    """The id of the end-of-text token (the first of EOT_CANDIDATES the tokenizer knows)."""
    for token in EOT_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(f"the tokenizer has no end-of-text token (looked for {', '.join(EOT_CANDIDATES)}); "
                     f"add {EOT_TOKEN!r} to it or train one with --vocab-size N")


def tokenizer_vocab_size(tokenizer: Tokenizer) -> int:
    """Number of token ids, added tokens included (ids are 0 .. vocab_size - 1)."""
    return tokenizer.get_vocab_size(with_added_tokens=True)


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, *, min_frequency: int = 2,
              progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style): ByteLevel pre-tokenizer and decoder, no normaliser, so
    decode(encode(text)) == text for any text. `<|endoftext|>` is id 0 and the 256 byte symbols are
    always in the vocabulary. `texts` is streamed, never held whole."""
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"a byte-level BPE needs a vocabulary of at least {MIN_BPE_VOCAB} "
                         f"(256 bytes + end-of-text), got {vocab_size}; use a larger --vocab-size")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    assert tokenizer.token_to_id(EOT_TOKEN) == 0
    return tokenizer
