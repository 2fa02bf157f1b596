"""Token batches for training and evaluation, read from a prepared directory through np.memmap.

Every batch is a pair (x, y) of int64 tensors of shape (batch_size, seq_len) with
y[:, t] = x[:, t + 1] in the token stream: a window of seq_len + 1 tokens starting at `start`
gives x = tokens[start : start + seq_len] and y = tokens[start + 1 : start + seq_len + 1].

Distributed data parallel: with `world_size` ranks each asking for `batch_size` rows, the global
batch of batch_size * world_size windows is drawn identically on every rank and rank r takes the
contiguous rows [r * batch_size, (r + 1) * batch_size). So concatenating the ranks' batches in rank
order gives exactly the batch one process would get with batch_size * world_size rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memoryformer.data.shards import DTYPES, FORMAT, FORMAT_VERSION, SPLITS, restore_moved_aside

Batch = tuple[torch.Tensor, torch.Tensor]


def _mix_seed(*parts: int) -> int:
    """A 63-bit torch seed from integers, the same on every platform and Python run."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not valid for world_size {world_size}; need 0 <= rank < world_size")


def _check_meta_fields(meta: dict[str, Any], meta_file: Path) -> None:
    """The fields readers rely on: present, of the right type, consistent with each other."""
    missing = [k for k in ("dtype", "vocab_size", "eot_id", "train_tokens", "val_tokens") if k not in meta]
    if missing:
        raise ValueError(f"{meta_file} lacks {', '.join(missing)}; prepare the data again")
    if meta["dtype"] not in DTYPES:
        raise ValueError(f"{meta_file} has dtype {meta['dtype']!r}; expected uint16 or uint32")
    for key in ("vocab_size", "eot_id", "train_tokens", "val_tokens"):
        value = meta[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{meta_file}: {key} is {value!r}, not a non-negative integer; the file is "
                             "damaged: prepare the data again")
    if not 0 < meta["vocab_size"] <= DTYPES[meta["dtype"]]:
        raise ValueError(f"{meta_file}: vocab_size {meta['vocab_size']} does not fit dtype {meta['dtype']}; "
                         "the file is damaged: prepare the data again")
    if meta["eot_id"] >= meta["vocab_size"]:
        raise ValueError(f"{meta_file}: eot_id {meta['eot_id']} is not below vocab_size {meta['vocab_size']}; "
                         "the file is damaged: prepare the data again")


class TokenData:
    """A prepared token directory (from `memoryformer prepare`), validated and memory-mapped.

    Attributes: path, meta (the meta.json dict), vocab_size, eot_id, dtype (numpy dtype).
    `tokens(split)` is the flat np.memmap of a split ("train" or "val").
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta = self._read_meta()
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size: int = int(self.meta["vocab_size"])
        self.eot_id: int = int(self.meta["eot_id"])
        self.tokenizer_path = self.path / str(self.meta.get("tokenizer", "tokenizer.json"))
        if not self.tokenizer_path.is_file():
            raise FileNotFoundError(f"{self.tokenizer_path} is missing (the tokenizer of the prepared data); the "
                                    f"directory is incomplete: run `memoryformer prepare ... --out {self.path} --force`")
        self._tokens: dict[str, np.memmap] = {split: self._open_split(split) for split in SPLITS}

    def _open_split(self, split: str) -> np.memmap:
        """The split's file, checked against meta.json and memory-mapped."""
        file = self.path / f"{split}.bin"
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing; the directory is incomplete: run `memoryformer "
                                    f"prepare ... --out {self.path} --force`")
        count = self.meta[f"{split}_tokens"]
        expected = count * self.dtype.itemsize
        actual = file.stat().st_size
        if actual != expected:
            what = "truncated" if actual < expected else "longer than recorded"
            raise ValueError(f"{file} holds {actual} bytes but meta.json says {count} {self.dtype.name} tokens "
                             f"({expected} bytes): it is {what}, so the data is damaged or mixed: prepare it again")
        if expected == 0:
            raise ValueError(f"the {split} split in {self.path} is empty; prepare it again with more text")
        return np.memmap(file, dtype=self.dtype, mode="r")

    def _read_meta(self) -> dict[str, Any]:
        if not self.path.exists():
            restored = restore_moved_aside(self.path)
            if restored is None:
                raise FileNotFoundError(f"no prepared data at {self.path}; create it with `memoryformer prepare "
                                        f"[DATA ...] --out {self.path}`")
            print(f"note: {restored}", file=sys.stderr)
        if not self.path.is_dir():
            raise ValueError(f"{self.path} is a file, not a prepared data directory; pass the directory "
                             "written by `memoryformer prepare --out DIR`")
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.path} has no meta.json, so it is not a (complete) prepared data "
                                    f"directory; run `memoryformer prepare [DATA ...] --out {self.path}`")
        try:
            meta = json.loads(meta_file.read_text())
        except (ValueError, OSError) as err:
            raise ValueError(f"{meta_file} is not valid JSON ({err}); prepare the data again") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not a memoryformer token directory (meta.json has no "
                             f"format={FORMAT!r}); prepare the data with `memoryformer prepare`")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_file} has format version {meta.get('version')}, this code reads version "
                             f"{FORMAT_VERSION}; prepare the data again")
        _check_meta_fields(meta, meta_file)
        return meta

    def verify(self) -> None:
        """Hash both splits in full against the sha256 that `prepare` recorded (a slow, complete check
        of what the size checks at opening cannot see); errors name the damaged file."""
        for split in SPLITS:
            recorded = self.meta.get(f"{split}_sha256")
            if recorded is None:
                continue  # prepared before hashes were recorded
            file = self.path / f"{split}.bin"
            with open(file, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") \
                    else hashlib.sha256(f.read()).hexdigest()
            if digest != recorded:
                raise ValueError(f"{file} does not match the sha256 in meta.json (its bytes changed after "
                                 "prepare); the data is damaged: prepare it again")

    def __repr__(self) -> str:
        return (f"TokenData({str(self.path)!r}, vocab_size={self.vocab_size}, dtype={self.dtype.name}, "
                f"train={self.num_tokens('train')}, val={self.num_tokens('val')})")

    def tokens(self, split: str) -> np.memmap:
        """The flat token array of a split, shape (num_tokens,)."""
        if split not in self._tokens:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        return self._tokens[split]

    def num_tokens(self, split: str) -> int:
        return len(self.tokens(split))

    def tokenizer(self):
        """The `tokenizers.Tokenizer` the data was made with."""
        from memoryformer.data.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_path)

    def check_seq_len(self, split: str, seq_len: int) -> None:
        """Error unless the split holds at least one window of seq_len + 1 tokens."""
        n = self.num_tokens(split)
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if n < seq_len + 1:
            raise ValueError(f"seq_len {seq_len} is longer than the {split} split ({n} tokens, and a window "
                             f"needs seq_len + 1); use a shorter seq_len or prepare more data"
                             + (" or a larger --val-fraction" if split == "val" else ""))

    def windows(self, split: str, starts: torch.Tensor | np.ndarray, seq_len: int,
                device: torch.device | str | None = None) -> Batch:
        """x, y of shape (len(starts), seq_len) for windows beginning at `starts`."""
        starts = np.asarray(starts, dtype=np.int64)
        index = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
        block = torch.from_numpy(self.tokens(split)[index].astype(np.int64))
        x, y = block[:, :-1].contiguous(), block[:, 1:].contiguous()
        if device is not None:
            device = torch.device(device)
            if device.type == "cuda":
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            elif device.type != "cpu":
                x, y = x.to(device), y.to(device)
        return x, y

    def get_batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator | None = None,
                  *, rank: int = 0, world_size: int = 1, device: torch.device | str | None = None) -> Batch:
        """Random windows: x, y int64 of shape (batch_size, seq_len), y = x shifted by one token.

        The global batch of batch_size * world_size window starts is drawn from `generator` (which
        every rank must hold in the same state); this rank gets rows [rank * batch_size, ...).
        Each call advances the generator by the same amount on every rank.
        """
        _check_rank(rank, world_size)
        self.check_seq_len(split, seq_len)
        high = self.num_tokens(split) - seq_len  # starts 0 .. n - seq_len - 1
        starts = torch.randint(0, high, (batch_size * world_size,), generator=generator)
        return self.windows(split, starts[rank * batch_size:(rank + 1) * batch_size].numpy(), seq_len, device)

    def sampler(self, split: str, batch_size: int, seq_len: int, *, seed: int = 0, shuffle: str = "epoch",
                rank: int = 0, world_size: int = 1) -> BatchSampler:
        """A resumable batch sampler; see `BatchSampler`."""
        return BatchSampler(self, split, batch_size, seq_len, seed=seed, shuffle=shuffle, rank=rank,
                            world_size=world_size)

    def eval_batches(self, split: str = "val", batch_size: int = 8, seq_len: int = 256, *, rank: int = 0,
                     world_size: int = 1, max_windows: int | None = None,
                     device: torch.device | str | None = None) -> Iterator[Batch]:
        """The whole split in fixed non-overlapping windows, for an exact validation loss.

        Window i starts at i * seq_len (i = 0 .. (n - 1) // seq_len - 1), so every target token
        tokens[1 : 1 + num_windows * seq_len] is scored exactly once; the tail of fewer than seq_len
        tokens is left out. `max_windows` keeps only the first windows. With world_size ranks, rank
        r gets windows r, r + world, ...: sum the token losses and the token counts over ranks
        (all_reduce) and divide. The last batch may be smaller than batch_size.
        """
        _check_rank(rank, world_size)
        self.check_seq_len(split, seq_len)
        n_windows = self.num_eval_windows(split, seq_len)
        if max_windows is not None:
            n_windows = min(n_windows, max_windows)
        mine = np.arange(rank, n_windows, world_size, dtype=np.int64) * seq_len
        for i in range(0, len(mine), batch_size):
            yield self.windows(split, mine[i:i + batch_size], seq_len, device)

    def num_eval_windows(self, split: str, seq_len: int) -> int:
        """How many windows `eval_batches` covers over all ranks (before max_windows)."""
        return (self.num_tokens(split) - 1) // seq_len


class BatchSampler:
    """Training batches that can be saved and resumed exactly.

    shuffle="epoch": the split is cut into non-overlapping windows (window i starts at i * seq_len,
        n_windows = (num_tokens - 1) // seq_len); each epoch visits every window once, in a random
        order fixed by (seed, epoch). Global batches are consecutive runs of batch_size * world_size
        windows of that endless stream (a batch may straddle two epochs).
    shuffle="random": batch k draws its batch_size * world_size starts uniformly from a generator
        seeded by (seed, k): random windows, any offset, as in `TokenData.get_batch`.

    The state is the number of windows consumed (`position`) and of batches drawn (`step`); it does
    not depend on rank, so every rank holds the same state: save `state_dict()` from rank 0 and load
    it on every rank. Resuming with another world_size but the same global batch gives the same
    global batches.
    """

    def __init__(self, data: TokenData, split: str, batch_size: int, seq_len: int, *, seed: int = 0,
                 shuffle: str = "epoch", rank: int = 0, world_size: int = 1):
        if shuffle not in ("epoch", "random"):
            raise ValueError(f"unknown shuffle {shuffle!r}; use 'epoch' or 'random'")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        _check_rank(rank, world_size)
        data.check_seq_len(split, seq_len)
        self.data, self.split, self.batch_size, self.seq_len = data, split, batch_size, seq_len
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.num_tokens = data.num_tokens(split)
        self.num_windows = (self.num_tokens - 1) // seq_len
        self.position = 0  # windows consumed, over all ranks
        self.step = 0  # batches drawn
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> float:
        """Epochs completed so far (fractional)."""
        return self.position / self.num_windows

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_mix_seed(self.seed, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.num_windows, generator=g), epoch
        return self._perm

    def _global_starts(self) -> np.ndarray:
        count = self.global_batch_size
        if self.shuffle == "random":
            g = torch.Generator().manual_seed(_mix_seed(self.seed, self.step))
            return torch.randint(0, self.num_tokens - self.seq_len, (count,), generator=g).numpy()
        windows = np.empty(count, dtype=np.int64)
        filled, position = 0, self.position
        while filled < count:
            epoch, offset = divmod(position, self.num_windows)
            take = min(count - filled, self.num_windows - offset)
            windows[filled:filled + take] = self._permutation(epoch)[offset:offset + take].numpy()
            filled, position = filled + take, position + take
        return windows * self.seq_len

    def next_batch(self, device: torch.device | str | None = None) -> Batch:
        """This rank's (x, y), each int64 of shape (batch_size, seq_len); advances the state."""
        starts = self._global_starts()
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        self.position += self.global_batch_size
        self.step += 1
        return self.data.windows(self.split, mine, self.seq_len, device)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: put it in the checkpoint, restore with load_state_dict."""
        return {"shuffle": self.shuffle, "seed": self.seed, "position": self.position, "step": self.step,
                "split": self.split, "seq_len": self.seq_len, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the saved sampler stopped; errors if the data or sampling differ."""
        for key in ("shuffle", "seed", "split", "seq_len", "num_tokens"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"the saved sampler has {key}={state[key]!r} but this one has "
                                 f"{getattr(self, key)!r}; resume with the same data, split, seq_len, "
                                 "seed and shuffle")
        self.position, self.step = int(state["position"]), int(state["step"])
