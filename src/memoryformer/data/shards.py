"""`prepare`: corpus -> tokenizer -> memory-mapped token shards.

Output directory:
    train.bin, val.bin   flat token ids, native byte order, dtype uint16 (vocab <= 65536) or uint32;
                         documents end with the end-of-text token
    tokenizer.json       the tokenizer used (trained here or copied)
    meta.json            see `prepare` (written last: its presence marks a complete directory)

The validation split is held out by block (a document, or a piece of at most `block_chars`
characters of a longer one), deterministically and spread evenly through the corpus: block i goes to
validation when floor(f * (i + 1) + phase) > floor(f * i + phase), with f = val_fraction and phase in
[0, 1) a hash of the seed, so round(f * blocks) blocks (give or take one) are held out. If a small
corpus leaves validation empty (or training empty), the corpus is tokenised again with its longest
block (in tokens) moved to the empty split: neither split is ever empty. Where a split's text is
not contiguous (the block before went to the other split, in the middle of a document), an
end-of-text token is inserted, so every split is a sequence of contiguous runs of text separated by
end-of-text. A literal "<|endoftext|>" inside the text also becomes the end-of-text token.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memoryformer.data.corpus import Block, Corpus
from memoryformer.data.tokenizer import eot_id, load_tokenizer, tokenizer_vocab_size, train_bpe

FORMAT = "memoryformer-tokens"
FORMAT_VERSION = 1
DTYPES = {"uint16": 1 << 16, "uint32": 1 << 32}  # dtype -> number of ids it holds
SPLITS = ("train", "val")
ENCODE_BATCH_CHARS = 1 << 21  # characters handed to one encode_batch call


def choose_dtype(n_vocab: int, dtype: str | None = None) -> str:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; a forced dtype is checked."""
    if dtype in (None, "auto"):
        return "uint16" if n_vocab <= DTYPES["uint16"] else "uint32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown token dtype {dtype!r}; use uint16, uint32 or auto")
    if n_vocab > DTYPES[dtype]:
        raise ValueError(f"a vocabulary of {n_vocab} tokens does not fit in {dtype} (at most {DTYPES[dtype]} "
                         "ids); use --dtype uint32 or leave --dtype out")
    return dtype


def is_val_block(index: int, seed: int, val_fraction: float) -> bool:
    """The deterministic split: block `index` goes to validation (evenly spaced, seeded phase)."""
    digest = hashlib.blake2b(f"val-phase:{seed}".encode(), digest_size=8).digest()
    phase = int.from_bytes(digest, "little") / 2.0**64
    return math.floor(val_fraction * (index + 1) + phase) > math.floor(val_fraction * index + phase)


def use_progress(progress: bool | None) -> bool:
    """Progress bars: on when asked, off when asked; by default only when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else bool(progress)


@dataclass
class _SplitWriter:
    """Appends token ids to one split's file and keeps its counts."""

    handle: Any
    dtype: np.dtype
    tokens: int = 0
    blocks: int = 0
    documents: int = 0  # document ends written
    last_block: int = -2
    ends_with_eot: bool = True
    longest_block: int = -1  # index of the block with the most tokens
    longest_tokens: int = -1

    def write(self, ids: np.ndarray) -> None:
        self.handle.write(ids.astype(self.dtype, copy=False).tobytes())
        self.tokens += len(ids)


def _temp_path(out: Path, name: str) -> Path:
    """A new hidden file beside its final name, with the usual permissions (mkstemp's are 0600)."""
    while True:
        path = out / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            open(path, "xb").close()
            return path
        except FileExistsError:
            continue


def _fallback_rule(index: int, block: int, to_val: bool) -> bool:
    """The split of a small corpus: only `block` in validation (to_val) or only it in training."""
    return (index == block) == to_val


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = _temp_path(path.parent, path.name)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the token shards")
    if out.is_dir() and any(out.iterdir()):
        meta = out / "meta.json"
        ours = False
        if meta.is_file():
            try:
                ours = json.loads(meta.read_text()).get("format") == FORMAT
            except (ValueError, AttributeError):
                ours = False
        if not ours:
            raise ValueError(f"--out {out} is not empty and holds no prepared token data; choose a new "
                             "or empty directory (it would be overwritten)")


def prepare(
    data: list[str] | None = None,
    out: str | os.PathLike = "data/tokens",
    *,
    tokenizer: str | os.PathLike | None = None,
    vocab_size: int = 4096,
    jsonl_field: str = "text",
    val_fraction: float = 0.01,
    seed: int = 0,
    max_bytes: int | None = None,
    dtype: str | None = None,
    block_chars: int = 16384,
    progress: bool | None = None,
    corpus: Corpus | None = None,
) -> dict[str, Any]:
    """Tokenise a corpus into `out`/{train.bin, val.bin, tokenizer.json, meta.json}; returns meta.

    data: DATA arguments (files, directories, globs, jsonl, hf:NAME); None or [] = the embedded
        default corpus. `corpus` (a ready Corpus) overrides `data`, `jsonl_field`, `max_bytes`.
    tokenizer: a tokenizer.json path or Hub name; None trains a byte-level BPE of `vocab_size` ids
        on the corpus.
    meta.json holds: format, version, dtype, vocab_size, eot_id, train_tokens, val_tokens,
        train_blocks, val_blocks, train_documents, val_documents, documents, blocks, text_bytes,
        tokenizer ("tokenizer.json", relative to `out`), tokenizer_source, source, seed,
        val_fraction, val_fallback_block (None, or the block moved to fill an empty split),
        block_chars.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}; "
                         "a held-out split is required")
    out = Path(out)
    if corpus is None:
        corpus = Corpus.from_args(data, jsonl_field=jsonl_field, max_bytes=max_bytes)
    _check_out_dir(out)
    show = use_progress(progress)

    if tokenizer is None:
        tok = train_bpe(corpus.texts(block_chars), vocab_size, progress=show)
        tokenizer_source = f"byte-level BPE trained on the corpus (vocab {vocab_size})"
    else:
        tok = load_tokenizer(tokenizer)
        tokenizer_source = str(tokenizer)
    n_vocab = tokenizer_vocab_size(tok)
    eot = eot_id(tok)
    token_dtype = choose_dtype(n_vocab, dtype)

    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the directory is incomplete until the new one lands
    temps = {split: _temp_path(out, f"{split}.bin") for split in SPLITS}
    try:
        assign = functools.partial(is_val_block, seed=seed, val_fraction=val_fraction)
        writers, totals = _tokenize_into(corpus, tok, eot, temps, token_dtype, assign, block_chars, show)
        fallback = None
        empty = [split for split in SPLITS if writers[split].blocks == 0]
        if empty and totals["blocks"] >= 2:  # small corpus: move the other split's longest block
            fallback = writers[SPLITS[1 - SPLITS.index(empty[0])]].longest_block
            assign = functools.partial(_fallback_rule, block=fallback, to_val=empty[0] == "val")
            writers, totals = _tokenize_into(corpus, tok, eot, temps, token_dtype, assign, block_chars, show)
        if writers["train"].tokens == 0 or writers["val"].tokens == 0:
            raise ValueError(f"the corpus is too small to split into train and validation ({totals['blocks']} "
                             f"block(s) of text): give more text (at least two documents)")
        for split in SPLITS:
            os.replace(temps[split], out / f"{split}.bin")
    finally:
        for path in temps.values():
            path.unlink(missing_ok=True)

    tok_tmp = _temp_path(out, "tokenizer.json")
    tok.save(str(tok_tmp))
    os.replace(tok_tmp, out / "tokenizer.json")
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": token_dtype,
        "vocab_size": n_vocab,
        "eot_id": eot,
        "train_tokens": writers["train"].tokens,
        "val_tokens": writers["val"].tokens,
        "train_blocks": writers["train"].blocks,
        "val_blocks": writers["val"].blocks,
        "train_documents": writers["train"].documents,
        "val_documents": writers["val"].documents,
        "documents": totals["documents"],
        "blocks": totals["blocks"],
        "text_bytes": totals["text_bytes"],
        "tokenizer": "tokenizer.json",
        "tokenizer_source": tokenizer_source,
        "source": corpus.describe(),
        "seed": seed,
        "val_fraction": val_fraction,
        "val_fallback_block": fallback,
        "block_chars": block_chars,
    }
    _write_json_atomic(out / "meta.json", meta)
    return meta


def _tokenize_into(corpus: Corpus, tok, eot: int, paths: dict[str, Path], token_dtype: str,
                   assign: Callable[[int], bool], block_chars: int, show: bool,
                   ) -> tuple[dict[str, _SplitWriter], dict[str, int]]:
    """Stream blocks through tok.encode_batch into the split files (block i -> val when assign(i))."""
    from tqdm import tqdm

    totals = {"blocks": 0, "documents": 0, "text_bytes": 0}
    batch: list[tuple[int, Block]] = []
    batch_chars = 0
    eot_array = np.array([eot], dtype=np.int64)
    writers = {split: _SplitWriter(open(paths[split], "wb"), np.dtype(token_dtype)) for split in SPLITS}
    bar = tqdm(total=corpus.max_bytes, unit="B", unit_scale=True, desc="tokenising", disable=not show)

    def flush() -> None:
        encodings = tok.encode_batch([block.text for _, block in batch], add_special_tokens=False)
        for (index, block), encoding in zip(batch, encodings):
            w = writers["val" if assign(index) else "train"]
            if not (w.last_block == index - 1 or w.ends_with_eot):  # the text jumps: mark it
                w.write(eot_array)
            w.write(np.asarray(encoding.ids, dtype=np.int64))
            if block.doc_end:
                w.write(eot_array)
                w.documents += 1
            if len(encoding.ids) > w.longest_tokens:
                w.longest_block, w.longest_tokens = index, len(encoding.ids)
            w.last_block, w.ends_with_eot = index, block.doc_end
            w.blocks += 1
        batch.clear()

    try:
        for index, block in enumerate(corpus.blocks(block_chars)):
            batch.append((index, block))
            batch_chars += len(block.text)
            nbytes = len(block.text.encode("utf-8"))
            totals["text_bytes"] += nbytes
            totals["blocks"] += 1
            totals["documents"] += block.doc_end
            bar.update(nbytes)
            if batch_chars >= ENCODE_BATCH_CHARS:
                flush()
                batch_chars = 0
        if batch:
            flush()
    finally:
        bar.close()
        for w in writers.values():
            w.handle.close()
    if totals["blocks"] == 0:
        raise ValueError(f"no text found in {corpus.describe()}; the files are empty (give non-empty text)")
    return writers, totals
