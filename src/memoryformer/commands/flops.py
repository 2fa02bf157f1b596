"""`memoryformer flops`: FLOPs, parameters and memory of the paper presets (Table 1, Figure 1)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from memoryformer.core.config import PRESETS, ModelConfig
from memoryformer.research import flops

PLOT_SUFFIXES = (".png", ".pdf", ".svg")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=int, default=2048, help="sequence length s (default 2048, Table 1)")
    parser.add_argument("--presets", nargs="+", default=list(flops.PAPER_PRESETS), metavar="PRESET",
                        help="presets to report (default: the six paper models)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16",
                        help="storage dtype for the byte counts (default fp16, as the paper)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw Figure 1 (FLOPs per block vs hidden size)")
    parser.add_argument("--no-params", action="store_true",
                        help="skip the parameter breakdown (which builds each model on the meta device)")


def run(args: argparse.Namespace) -> int:
    if args.seq_len <= 0:
        raise ValueError(f"--seq-len must be positive, got {args.seq_len}")
    unknown = [p for p in args.presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; choose from: {', '.join(PRESETS)}")
    if args.plot:
        check_plot_path(args.plot)
    dtype = DTYPES[args.dtype]
    rows = [_row(name, args.seq_len, dtype, with_params=not args.no_params) for name in args.presets]
    plotted = flops.plot_figure1(args.plot) if args.plot else None  # None without matplotlib (warned)
    if args.json:
        out = {
            "seq_len": args.seq_len,
            "dtype": args.dtype,
            "conventions": flops.CONVENTIONS,
            "notes": [flops.TABLE1_NOTE, flops.STRUCTURAL_NOTE],
            "presets": rows,
            "plot": plotted,
        }
        print(json.dumps(out, indent=2))
        return 0
    _print_tables(rows, args.seq_len, args.dtype)
    if plotted:
        print(f"\nFigure 1 written to {plotted}")
    return 0


def check_plot_path(path: str) -> None:
    """--plot must name an image file (.png, .pdf, .svg) in an existing folder."""
    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(f"--plot {path} is a directory; give a file name such as {file / 'figure1.png'}")
    if file.suffix.lower() not in PLOT_SUFFIXES:
        raise ValueError(f"--plot {path}: give an image file name ending in {', '.join(PLOT_SUFFIXES)}")
    if not file.parent.is_dir():
        raise FileNotFoundError(f"--plot {path}: folder {file.parent} does not exist")


def _row(name: str, seq_len: int, dtype: torch.dtype, with_params: bool) -> dict[str, Any]:
    row = flops.flops_report(name, seq_len)
    if with_params:
        row["params"] = flops.model_breakdown(name).to_dict(dtype)
        row["memory"] = _memory(name, seq_len)
    return row


def _memory(name: str, seq_len: int) -> dict[str, dict[str, int]]:
    """Bytes to load the preset (fp32 weights) and to train it at batch 1 (memoryformer.train.memory)."""
    from memoryformer.train.memory import estimate_memory

    config = ModelConfig.from_preset(name)
    return {"inference": estimate_memory(config, seq_len=seq_len).to_dict(),
            "training_batch_1": estimate_memory(config, training=True, batch_size=1, seq_len=seq_len).to_dict()}


def _g(x: float) -> str:
    return f"{x / 1e9:.2f}"


def _m(x: float) -> str:
    return f"{x / 1e6:.1f}M" if x < 1e9 else f"{x / 1e9:.3f}B"


def _print_tables(rows: list[dict[str, Any]], seq_len: int, dtype_name: str) -> None:
    print(f"FLOPs of one block at s = {seq_len}, in G (1e9). 'w/o' = without attention sigma(QK^T)V.")
    print(f"  paper  = {flops.CONVENTIONS['paper']} (Table 1)")
    print(f"  2x     = {flops.CONVENTIONS['2x']}")
    print(f"  struct = {flops.CONVENTIONS['structural']}; elementwise ops (hash, norms, softmax) apart")
    header = ["preset", "L", "d", "paper w/o", "paper tot", "2x w/o", "2x tot", "struct w/o",
              "struct tot", "elementw", "head", "train/tok"]
    table = [header]
    for r in rows:
        st = r["structural"]
        table.append([
            r["name"], str(r["n_layers"]), str(r["d_model"]),
            _g(r["paper"]["without_attention"]), _g(r["paper"]["total"]),
            _g(r["2x"]["without_attention"]), _g(r["2x"]["total"]),
            _g(st["block_macs_without_attention"]), _g(st["block_macs"]), _g(st["block_elementwise"]),
            _g(st["head_macs"]), _g(r["training_flops_per_token"]),
        ])
    _print_grid(table)
    print("  head = LM-head MACs over the sequence (once per model); train/tok = training GFLOPs per token,")
    print("  2x convention, structural count, head included (3 x forward).")
    print(f"Note: {flops.TABLE1_NOTE}")
    print(f"Note: {flops.STRUCTURAL_NOTE}")

    if not any("params" in r for r in rows):
        return
    print(f"\nParameters (measured on a meta-device model); bytes in {dtype_name}.")
    header = ["preset", "params/block", "tables/blk", "dense/blk", "total", "embed+head", "norms",
              "biases", f"tables/blk {dtype_name}", f"total {dtype_name}"]
    table = [header]
    for r in rows:
        p, b = r["params"]["total"], r["params"]["per_block"]
        table.append([
            r["name"], _m(b["total"]), _m(b["tables"]), _m(b["dense"]), _m(p["total"]),
            _m(p["embedding"] + p["head"]), f"{p['norms']:,}", f"{p['biases']:,}",
            f"{b['bytes']['tables'] / 1e6:.1f} MB", f"{p['bytes']['total'] / 1e9:.2f} GB",
        ])
    _print_grid(table)
    _print_memory(rows, seq_len)


def _print_memory(rows: list[dict[str, Any]], seq_len: int) -> None:
    print("\nMemory estimate in GiB (memoryformer.train.memory: `train`, `eval` and `generate` check it first):")
    print(f"  fp32 weights; training one sequence of {seq_len} tokens adds gradients, AdamW state, activations.")
    table = [["preset", "weights", "inference", "train b=1", "gradients", "AdamW", "activations"]]
    for r in rows:
        inf, tr = r["memory"]["inference"], r["memory"]["training_batch_1"]
        table.append([r["name"], *(f"{v / 2**30:.2f}" for v in (
            inf["weights"], inf["total"], tr["total"], tr["gradients"], tr["optimizer"], tr["activations"]))])
    _print_grid(table)


def _print_grid(table: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for n, row in enumerate(table):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
