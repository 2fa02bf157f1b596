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
                        help="text files, directories, glob patterns, .jsonl files, hf:NAME[:CONFIG][@SPLIT], or an "
                             "embedded corpus: embedded:python-stdlib (the default when DATA is left out: Python's "
                             "standard library sources) or embedded:python-site-packages (that plus the installed "
                             "site-packages' .py sources, deduplicated; about 200 MB of code; see docs/data.md)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory for the token shards")
    parser.add_argument("--force", action="store_true",
                        help="replace the prepared data already in --out (runs trained on it cannot resume); "
                             "the new data replaces it only once complete")
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
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress output (default: a bar on a terminal, timed lines in a log)")
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
        force=args.force,
    )
    print(f"source:     {meta['source']}")
    print(f"documents:  {meta['documents']:,} ({meta['text_bytes']:,} bytes of text, {meta['blocks']:,} blocks)")
    print(f"train:      {meta['train_tokens']:,} tokens ({meta['train_blocks']:,} blocks)")
    print(f"val:        {meta['val_tokens']:,} tokens ({meta['val_blocks']:,} blocks)")
    print(f"tokenizer:  {meta['tokenizer_source']}: vocab {meta['vocab_size']:,}, end-of-text id {meta['eot_id']}")
    print(f"dtype:      {meta['dtype']}")
    for part in (meta.get("corpus") or {}).get("parts", []):
        print(f"{part['part'] + ':':<11} {part['files_read']:,} of {part['files']:,} files read, "
              f"{len(part['packages']):,} packages, file list sha256 {part['files_sha256'][:16]}")
    print(f"written to: {args.out}")
    return 0
