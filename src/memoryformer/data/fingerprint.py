"""Fingerprints of prepared data directories: save one when a run starts, compare on `--resume`.

    saved = data_fingerprint("data/tokens")                  # into the run's state at the start
    problem = fingerprint_mismatch(saved, data_fingerprint("data/tokens"))
    if problem:
        raise ValueError(problem)                            # one line naming what changed

A fingerprint is a small JSON-able dict, cheap to compute at any data size: meta.json's counts and
settings, the sha256 of tokenizer.json, each shard's size and a sha256 of its size plus its first
and last MiB, and the full sha256 of each shard that `prepare` recorded in meta.json. The path is
recorded but not compared, so moving or copying the directory is not a change. See docs/data.md.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from memoryformer.data.batches import TokenData
from memoryformer.data.shards import SPLITS

FINGERPRINT_VERSION = 1
END_BYTES = 1 << 20  # bytes hashed at each end of a shard
SPLIT_NAMES = {"train": "training", "val": "validation"}


def _ends_sha256(path: Path, size: int) -> str:
    """sha256 of the file's size (8 bytes, little-endian), its first and its last END_BYTES bytes."""
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        digest.update(f.read(END_BYTES))
        if size > END_BYTES:
            f.seek(max(END_BYTES, size - END_BYTES))
            digest.update(f.read(END_BYTES))
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def data_fingerprint(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The fingerprint of a prepared data directory (validated as `TokenData` does: errors name the
    damaged or missing file). Keys: version, path, dtype, vocab_size, eot_id, train_tokens,
    val_tokens, tokenizer_sha256, shards ({split: {bytes, ends_sha256, sha256}}), corpus_sha256
    (the embedded corpora's file-list hashes, or None), seed, val_fraction, block_chars, source."""
    data = TokenData(data_dir)
    meta = data.meta
    shards = {}
    for split in SPLITS:
        file = data.path / f"{split}.bin"
        size = file.stat().st_size
        shards[split] = {"bytes": size, "ends_sha256": _ends_sha256(file, size),
                         "sha256": meta.get(f"{split}_sha256")}
    corpus = meta.get("corpus") or {}
    parts = corpus.get("parts") if isinstance(corpus, dict) else None
    return {
        "version": FINGERPRINT_VERSION,
        "path": str(data.path.resolve()),
        "dtype": data.dtype.name,
        "vocab_size": data.vocab_size,
        "eot_id": data.eot_id,
        "train_tokens": data.num_tokens("train"),
        "val_tokens": data.num_tokens("val"),
        "tokenizer_sha256": _file_sha256(data.tokenizer_path),
        "shards": shards,
        "corpus_sha256": [p.get("files_sha256") for p in parts] if parts else None,
        "seed": meta.get("seed"),
        "val_fraction": meta.get("val_fraction"),
        "block_chars": meta.get("block_chars"),
        "source": meta.get("source"),
    }


def _number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _changed(saved: dict[str, Any], current: dict[str, Any], key: str) -> bool:
    """True when both fingerprints know `key` and the values differ (older fingerprints may lack it)."""
    return saved.get(key) is not None and current.get(key) is not None and saved[key] != current[key]


def _shard_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'train.bin differs (same size)' for shards whose counts match but whose bytes do not."""
    changes = []
    old_shards, new_shards = saved.get("shards") or {}, current.get("shards") or {}
    for split in SPLITS:
        old, new = old_shards.get(split) or {}, new_shards.get(split) or {}
        if _changed(saved, current, f"{split}_tokens") or _changed(old, new, "bytes"):
            continue  # already said: the counts differ
        if _changed(old, new, "ends_sha256") or _changed(old, new, "sha256"):
            changes.append(f"{split}.bin contents differ (same size)")
    return changes


def fingerprint_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """None when `current` is the same data as `saved`; else one line naming what changed, e.g.
    "the data in DIR changed since this run started: training tokens 1,573,786 -> 871,695;
    tokenizer differs; resume with the data the run started on, or start a new run"."""
    where = current.get("path", "the data directory")
    if not isinstance(saved, dict) or "version" not in saved:
        return (f"the run's saved data fingerprint is not readable, so it cannot be checked that the data in "
                f"{where} is the data the run started on; start a new run")
    changes = []
    for split in SPLITS:
        key = f"{split}_tokens"
        if _changed(saved, current, key):
            changes.append(f"{SPLIT_NAMES[split]} tokens {_number(saved[key])} -> {_number(current[key])}")
    if _changed(saved, current, "tokenizer_sha256"):
        changes.append("tokenizer differs")
    for key, name in (("vocab_size", "vocabulary"), ("eot_id", "end-of-text id"), ("dtype", "token dtype")):
        if _changed(saved, current, key):
            changes.append(f"{name} {_number(saved[key])} -> {_number(current[key])}")
    changes += _shard_changes(saved, current)
    if _changed(saved, current, "corpus_sha256"):
        changes.append("corpus files differ")
    for key, name in (("seed", "split seed"), ("val_fraction", "validation fraction"), ("block_chars", "block size")):
        if _changed(saved, current, key):
            changes.append(f"{name} {_number(saved[key])} -> {_number(current[key])}")
    if not changes:
        return None
    return (f"the data in {where} changed since this run started: {'; '.join(changes)}; resume with the data "
            "the run started on, or start a new run")
