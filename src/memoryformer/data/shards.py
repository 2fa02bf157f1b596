"""`prepare`: corpus -> tokenizer -> memory-mapped token shards.

Output directory:
    train.bin, val.bin   flat token ids, native byte order, dtype uint16 (vocab <= 65536) or uint32;
                         documents end with the end-of-text token
    tokenizer.json       the tokenizer used (trained here or copied)
    meta.json            see `prepare` (written last: its presence marks a complete directory)

The directory is built beside its final place (a hidden sibling `.NAME.prepare-PID-HEX.tmp`) and
renamed into place only when complete, so an interrupted `prepare` never damages the data already
there; a later `prepare` removes what a killed one left behind. Replacing prepared data needs
`force=True` (`--force`): a training run may depend on it (see `data_fingerprint`).

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

import errno
import functools
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memoryformer.data.corpus import Block, Corpus
from memoryformer.data.tokenizer import eot_id, load_tokenizer, tokenizer_vocab_size, train_bpe
from memoryformer.progress import Progress

FORMAT = "memoryformer-tokens"
FORMAT_VERSION = 1
DTYPES = {"uint16": 1 << 16, "uint32": 1 << 32}  # dtype -> number of ids it holds
SPLITS = ("train", "val")
OUR_FILES = frozenset({"train.bin", "val.bin", "tokenizer.json", "meta.json"})
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
    """Progress output unless switched off: a bar on a terminal, timed lines in a log."""
    return True if progress is None else bool(progress)


def note(message: str) -> None:
    """A one-line notice on stderr about something prepare changed, skipped or cleaned up."""
    print(f"prepare: note: {message}", file=sys.stderr, flush=True)


@dataclass
class _SplitWriter:
    """Appends token ids to one split's file and keeps its counts and the sha256 of its bytes."""

    handle: Any
    dtype: np.dtype
    tokens: int = 0
    blocks: int = 0
    documents: int = 0  # document ends written
    last_block: int = -2
    ends_with_eot: bool = True
    longest_block: int = -1  # index of the block with the most tokens
    longest_tokens: int = -1
    digest: Any = field(default_factory=hashlib.sha256)

    def write(self, ids: np.ndarray) -> None:
        data = ids.astype(self.dtype, copy=False).tobytes()
        self.handle.write(data)
        self.digest.update(data)
        self.tokens += len(ids)


def _fallback_rule(index: int, block: int, to_val: bool) -> bool:
    """The split of a small corpus: only `block` in validation (to_val) or only it in training."""
    return (index == block) == to_val


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory
    finally:
        os.close(fd)


# ---------------------------------------------------------------- the output directory and its temporaries

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>prepare|old)-(?P<pid>\d+)-[0-9a-f]+\.tmp$")
_OLD_STYLE_TEMP = re.compile(r"^\..+\.\d+\.[0-9a-f]+\.tmp$")  # per-file temporaries of older versions


def _temp_dir(out: Path, kind: str) -> Path:
    """A new hidden sibling of `out` (same file system, so a rename moves it into place)."""
    while True:
        path = out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            path.mkdir(parents=False)
            return path
        except FileExistsError:
            continue


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _leftovers(out: Path) -> tuple[list[Path], list[Path]]:
    """Temporaries of dead prepares for `out`: (built or half-built new data, previous data moved aside)."""
    new, old = [], []
    if out.parent.is_dir():
        for entry in out.parent.iterdir():
            match = _TEMP.match(entry.name)
            if match and match["name"] == out.name and not _pid_alive(int(match["pid"])):
                (old if match["kind"] == "old" else new).append(entry)
    return sorted(new), sorted(old, key=lambda p: p.stat().st_mtime)


def restore_moved_aside(out: str | os.PathLike) -> str | None:
    """Move back the previous data that a `prepare` killed between its two renames left aside
    (no `out`, a complete `.NAME.old-...tmp` sibling); returns a note, or None when nothing was done."""
    out = Path(out)
    if out.exists():
        return None
    old = [p for p in _leftovers(out)[1] if (p / "meta.json").is_file()]
    if not old:
        return None
    os.rename(old[-1], out)
    return f"restored the previous data in {out}, which an interrupted prepare had moved aside"


def clean_leftovers(out: str | os.PathLike) -> list[str]:
    """Undo what a killed `prepare` into `out` left behind; returns one note per action: previous
    data moved aside is moved back (`restore_moved_aside`), temporaries are removed."""
    out = Path(out)
    restored = restore_moved_aside(out)
    notes = [restored] if restored else []
    new, old = _leftovers(out)
    stale = new + old
    if out.is_dir():
        stale += [p for p in out.iterdir() if _OLD_STYLE_TEMP.match(p.name)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if stale:
        notes.append(f"removed {len(stale)} leftover temporar{'ies' if len(stale) > 1 else 'y'} of an "
                     f"interrupted prepare ({', '.join(p.name for p in stale[:3])}{', ...' * (len(stale) > 3)})")
    return notes


def _read_our_meta(out: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _check_out_dir(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, holds someone else's files, or holds prepared data (unless force)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for the token shards")
    if not out.is_dir():
        return
    entries = [p.name for p in out.iterdir()]
    if not entries:
        return
    meta = _read_our_meta(out)
    if meta is not None:
        if not force:
            tokens = meta.get("train_tokens")
            held = f" ({tokens:,} training tokens)" if isinstance(tokens, int) else ""
            raise ValueError(f"--out {out} already holds prepared token data{held}, and runs trained on it "
                             "would not resume after it changed; pass --force to replace it, or choose "
                             "another --out")
        return
    if not set(entries) <= OUR_FILES:
        raise ValueError(f"--out {out} is not empty and holds no prepared token data; choose a new "
                         "or empty directory (it would be overwritten)")
    note(f"replacing the incomplete prepared data in {out} (it has no meta.json)")


def _swap_in(work: Path, out: Path) -> None:
    """Move the complete directory `work` to `out`; the previous `out` is removed afterwards."""
    if out.is_dir():
        aside = _temp_dir(out, "old")
        aside.rmdir()
        os.rename(out, aside)
        os.rename(work, out)
        _fsync_dir(out.parent)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(work, out)
        _fsync_dir(out.parent)


def _write_error(err: OSError, out: Path, had_data: bool) -> RuntimeError:
    """One line for a failed write: a full disk named as such; the previous data is untouched."""
    kept = f"the previous data in {out} is unchanged; " if had_data else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return RuntimeError(f"no space left for the token data of {out} (writing {err.filename or out.parent}: "
                            f"{err.strerror}); {kept}free some space or choose another --out")
    return RuntimeError(f"cannot write the token data of {out} ({err.filename or out.parent}: "
                        f"{err.strerror or err}); {kept}check the directory and its permissions")


# ---------------------------------------------------------------- prepare


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
    force: bool = False,
) -> dict[str, Any]:
    """Tokenise a corpus into `out`/{train.bin, val.bin, tokenizer.json, meta.json}; returns meta.

    data: DATA arguments (files, directories, globs, jsonl, embedded:NAME, hf:NAME); None or [] =
        the embedded default corpus. `corpus` (a ready Corpus) overrides `data`, `jsonl_field`,
        `max_bytes`.
    tokenizer: a tokenizer.json path or Hub name; None trains a byte-level BPE of `vocab_size` ids
        on the corpus.
    force: replace prepared data already in `out` (without it, that is an error).
    meta.json holds: format, version, dtype, vocab_size, eot_id, train_tokens, val_tokens, tokens,
        train_blocks, val_blocks, train_documents, val_documents, documents, blocks, text_bytes,
        tokenizer ("tokenizer.json", relative to `out`), tokenizer_source, tokenizer_sha256,
        train_sha256, val_sha256 (of the .bin files), source, corpus (embedded corpora: python
        version, file-list hashes, packages read; else None), input (non-UTF-8, binary and
        unreadable files: see CorpusReport), seed, val_fraction, val_fallback_block (None, or the
        block moved to fill an empty split), block_chars.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}; "
                         "a held-out split is required")
    out = Path(out)
    # absolute, so that the temporary sibling of "." or "data/" is beside it, not inside it
    out = Path(os.path.realpath(out)) if out.is_symlink() else Path(os.path.abspath(out))
    for line in clean_leftovers(out):
        note(line)
    _check_out_dir(out, force)
    if corpus is None:
        corpus = Corpus.from_args(data, jsonl_field=jsonl_field, max_bytes=max_bytes)
    show = use_progress(progress)
    tok, tokenizer_source = _get_tokenizer(corpus, tokenizer, vocab_size, block_chars, show)
    token_dtype = choose_dtype(tokenizer_vocab_size(tok), dtype)
    had_data = out.is_dir() and any(out.iterdir())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = _temp_dir(out, "prepare")
    except OSError as err:
        raise _write_error(err, out, had_data) from None
    try:
        meta = _build(work, corpus, tok, tokenizer_source, token_dtype, seed, val_fraction, block_chars, show)
        _swap_in(work, out)
    except OSError as err:
        raise _write_error(err, out, had_data) from None
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    for line in corpus.report.notes():
        note(line)
    return meta


def _get_tokenizer(corpus: Corpus, tokenizer: str | os.PathLike | None, vocab_size: int, block_chars: int,
                   show: bool):
    """(tokenizer, description): loaded, or a byte-level BPE trained on the corpus."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer), str(tokenizer)
    with Progress(corpus.size_hint(), "reading text for the BPE", unit="bytes", enabled=show) as bar:
        tok = train_bpe(_counted(corpus.texts(block_chars), bar), vocab_size)
    return tok, f"byte-level BPE trained on the corpus (vocab {vocab_size})"


def _counted(texts: Iterable[str], bar: Progress) -> Iterator[str]:
    for text in texts:
        bar.update(len(text.encode("utf-8")))
        yield text


def _build(work: Path, corpus: Corpus, tok, tokenizer_source: str, token_dtype: str, seed: int,
           val_fraction: float, block_chars: int, show: bool) -> dict[str, Any]:
    """Write train.bin, val.bin, tokenizer.json and (last) meta.json into `work`; returns meta."""
    eot = eot_id(tok)
    paths = {split: work / f"{split}.bin" for split in SPLITS}
    assign = functools.partial(is_val_block, seed=seed, val_fraction=val_fraction)
    writers, totals = _tokenize_into(corpus, tok, eot, paths, token_dtype, assign, block_chars, show)
    fallback = None
    empty = [split for split in SPLITS if writers[split].blocks == 0]
    if empty and totals["blocks"] >= 2:  # small corpus: move the other split's longest block
        fallback = writers[SPLITS[1 - SPLITS.index(empty[0])]].longest_block
        assign = functools.partial(_fallback_rule, block=fallback, to_val=empty[0] == "val")
        writers, totals = _tokenize_into(corpus, tok, eot, paths, token_dtype, assign, block_chars, show)
    if writers["train"].tokens == 0 or writers["val"].tokens == 0:
        raise ValueError(f"the corpus is too small to split into train and validation ({totals['blocks']} "
                         f"block(s) of text): give more text (at least two documents)")
    tokenizer_json = tok.to_str(pretty=True).encode()
    _write_durably(work / "tokenizer.json", tokenizer_json)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": token_dtype,
        "vocab_size": tokenizer_vocab_size(tok),
        "eot_id": eot,
        "train_tokens": writers["train"].tokens,
        "val_tokens": writers["val"].tokens,
        "tokens": writers["train"].tokens + writers["val"].tokens,
        "train_blocks": writers["train"].blocks,
        "val_blocks": writers["val"].blocks,
        "train_documents": writers["train"].documents,
        "val_documents": writers["val"].documents,
        "documents": totals["documents"],
        "blocks": totals["blocks"],
        "text_bytes": totals["text_bytes"],
        "tokenizer": "tokenizer.json",
        "tokenizer_source": tokenizer_source,
        "tokenizer_sha256": hashlib.sha256(tokenizer_json).hexdigest(),
        "train_sha256": writers["train"].digest.hexdigest(),
        "val_sha256": writers["val"].digest.hexdigest(),
        "source": corpus.describe(),
        "corpus": corpus.metadata(),
        "input": corpus.report.as_dict(),
        "seed": seed,
        "val_fraction": val_fraction,
        "val_fallback_block": fallback,
        "block_chars": block_chars,
    }
    _write_durably(work / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    _fsync_dir(work)
    return meta


def _tokenize_into(corpus: Corpus, tok, eot: int, paths: dict[str, Path], token_dtype: str,
                   assign: Callable[[int], bool], block_chars: int, show: bool,
                   ) -> tuple[dict[str, _SplitWriter], dict[str, int]]:
    """Stream blocks through tok.encode_batch into the split files (block i -> val when assign(i))."""
    totals = {"blocks": 0, "documents": 0, "text_bytes": 0}
    batch: list[tuple[int, Block]] = []
    batch_chars = batch_bytes = 0
    eot_array = np.array([eot], dtype=np.int64)
    writers = {split: _SplitWriter(open(paths[split], "wb"), np.dtype(token_dtype)) for split in SPLITS}
    bar = Progress(corpus.size_hint(), "tokenising", unit="bytes", enabled=show)

    def flush() -> None:
        encodings = tok.encode_batch([block.text for _, block in batch], add_special_tokens=False)
        bar.update(batch_bytes, tokens=sum(len(e.ids) for e in encodings))
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
            batch_bytes += nbytes
            totals["text_bytes"] += nbytes
            totals["blocks"] += 1
            totals["documents"] += block.doc_end
            if batch_chars >= ENCODE_BATCH_CHARS:
                flush()
                batch_chars = batch_bytes = 0
        if batch:
            flush()
        for w in writers.values():
            w.handle.flush()
            os.fsync(w.handle.fileno())
    finally:
        bar.close()
        for w in writers.values():
            w.handle.close()
    if totals["blocks"] == 0:
        raise ValueError(f"no text found in {corpus.describe()}; the files are empty (give non-empty text)")
    return writers, totals
