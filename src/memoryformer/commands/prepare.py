"""`memoryformer prepare`: tokenise text into memory-mapped token shards for training."""

from __future__ import annotations

import argparse
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def byte_size(text: str) -> int:
    """`1000`, `500k`, `10M`, `1.5GB` -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 1000000, 500k, 10M or 2G")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="*", metavar="DATA",
                        help="text files, directories, glob patterns, .jsonl files or hf:NAME[:CONFIG][@SPLIT] "
                             "(none: the embedded default corpus, Python's standard library sources)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory for the token shards")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="PATH_OR_NAME",
                     help="a tokenizers JSON file or Hugging Face tokenizer name (default: train a BPE)")
    tok.add_argument("--vocab-size", type=int, default=4096, metavar="N",
                     help="vocabulary of the byte-level BPE trained on the corpus (default 4096)")
    parser.add_argument("--jsonl-field", default="text", metavar="NAME",
                        help="text field of jsonl records and dataset rows (default text)")
    parser.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                        help="fraction of blocks held out for validation (default 0.01, at least one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split (default 0)")
    parser.add_argument("--max-bytes", type=byte_size, default=None, metavar="N",
                        help="read at most N bytes of text (e.g. 20M)")
    parser.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                        help="token file dtype (default: uint16 when the vocabulary fits, else uint32)")
    parser.add_argument("--block-chars", type=int, default=16384, metavar="N",
                        help="documents are cut into blocks of at most N characters, the unit of the "
                             "validation split (default 16384)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")


def run(args: argparse.Namespace) -> int:
    from memoryformer.data import prepare

    meta = prepare(
        args.data,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        jsonl_field=args.jsonl_field,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_bytes=args.max_bytes,
        dtype=args.dtype,
        block_chars=args.block_chars,
        progress=False if args.no_progress else None,
    )
    print(f"source:     {meta['source']}")
    print(f"documents:  {meta['documents']:,} ({meta['text_bytes']:,} bytes of text, {meta['blocks']:,} blocks)")
    print(f"train:      {meta['train_tokens']:,} tokens ({meta['train_blocks']:,} blocks)")
    print(f"val:        {meta['val_tokens']:,} tokens ({meta['val_blocks']:,} blocks)")
    print(f"tokenizer:  {meta['tokenizer_source']}: vocab {meta['vocab_size']:,}, end-of-text id {meta['eot_id']}")
    print(f"dtype:      {meta['dtype']}")
    print(f"written to: {args.out}")
    return 0
