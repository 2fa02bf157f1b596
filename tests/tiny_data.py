"""A tiny prepared token directory for training, checkpoint and distributed tests (one definition)."""

from __future__ import annotations

import random

WORDS = "the a memory table hash layer token model train loss value key query bucket sign chunk".split()


def make_data(root, seed: int = 0):
    """A tiny prepared data directory (byte-level BPE of 300 ids) built with data.prepare."""
    from memoryformer.data import prepare

    src = root / "corpus"
    src.mkdir(parents=True)
    rng = random.Random(seed)
    for d in range(12):
        lines = (" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + "." for _ in range(60))
        (src / f"doc{d}.txt").write_text("\n".join(lines))
    prepare([str(src)], root / "data", vocab_size=300, val_fraction=0.2, block_chars=1000, progress=False)
    return root / "data"
