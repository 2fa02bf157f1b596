"""Whole models: MemoryFormer against its Pythia twin (same width and depth), head included and excluded.

    python benchmarks/model.py [--pair tiny|demo] [--dtype fp32|bf16] [--rounds 5] [--skip-memory]

Cases, each timed in the same process with the two models alternating (medians over rounds):
  decode   one new token per sequence, batch 1 and 8, after a 128- or 1024-token context (KV cache);
           each call a different token (from 256 random ones), so Memory Layers read uncached rows
  prefill  512 tokens, batch 1
  train    one AdamW step (forward, backward, optimizer), batch 4 x 512 tokens
  decode with the LM head in bf16 or int8 (memoryformer.inference.quantize), both models alike; and with
           MemoryFormer's tables in int8 as well (the dense twin has no tables: its head alone)
"head excluded" runs embedding, blocks and final norm only. Peak memory (RSS) of decode and of a training
step is measured per model in a fresh subprocess. Writes benchmarks/results/model_<pair>_<dtype>.json/.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import allocator_huge_pages, time_interleaved, write_results  # noqa: E402

from memoryformer import LanguageModel, ModelConfig  # noqa: E402
from memoryformer.inference.pages import huge_pages_available, use_huge_pages  # noqa: E402
from memoryformer.inference.quantize import quantize_model  # noqa: E402

PAIRS = {"tiny": ("mf-tiny", "pythia-70m"), "demo": ("mf-demo", "pythia-demo")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(preset: str, dtype: torch.dtype, seq: int = 2048, huge_pages: bool = True) -> LanguageModel:
    """The preset's model in eval mode; large tensors moved onto 2 MiB pages (both architectures alike)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, max_seq_len=max(seq, ModelConfig.from_preset(preset).max_seq_len))
    model = LanguageModel(cfg).to(dtype).eval()
    if huge_pages:
        use_huge_pages(model)
    return model


def decode_fn(model: LanguageModel, batch: int, context: int, head: bool):
    cache = model.new_cache(batch, context + 1)
    vocab = model.config.vocab_size
    with torch.no_grad():
        model.hidden_states(torch.randint(0, vocab, (batch, context)), cache=cache)
    # a new token each call: a repeated token would hash to the same table rows and keep them cached
    tokens = itertools.cycle(torch.randint(0, vocab, (256, batch, 1)).unbind(0))

    def step():
        cache.length = context  # overwrite the same position: a fixed-length context each call
        token = next(tokens)
        with torch.no_grad():
            if head:
                model(token, cache=cache, last_logits_only=True)
            else:
                model.hidden_states(token, cache=cache)

    return step


def prefill_fn(model: LanguageModel, tokens: int, head: bool):
    idx = torch.randint(0, model.config.vocab_size, (1, tokens))

    def run():
        with torch.no_grad():
            if head:
                model(idx, last_logits_only=True)
            else:
                model.hidden_states(idx)

    return run


def train_fn(model: LanguageModel, batch: int, tokens: int):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, model.config.vocab_size, (batch, tokens))

    def step():
        opt.zero_grad(set_to_none=True)
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()

    return step


def peak_rss_gb(preset: str, dtype: str, case: str) -> float:
    """Peak RSS (VmHWM) of a fresh process that builds `preset` and runs `case` twice."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from model import build, decode_fn, train_fn, DTYPES
m = build({preset!r}, DTYPES[{dtype!r}], huge_pages=False)  # no transient copies in the peak
fn = decode_fn(m, 8, 1024, True) if {case!r} == "decode" else train_fn(m, 4, 512)
fn(); fn()
# VmHWM, not ru_maxrss: a child's ru_maxrss keeps the forking parent's high-water mark
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024 / 1e9


def measure_memory(mf_name: str, dense_name: str, dtype: str) -> dict[str, float]:
    memory = {}
    for arch, preset in (("memoryformer", mf_name), ("dense", dense_name)):
        for case in ("decode", "train"):
            memory[f"{arch} {case}"] = peak_rss_gb(preset, dtype, case)
            print(f"peak RSS {arch} {case}: {memory[f'{arch} {case}']:.2f} GB", flush=True)
    return memory


def memory_note(memory: dict[str, float]) -> str:
    return ("Peak RSS (GB; decode = batch 8 after 1024 tokens; train = AdamW step on 4 x 512): "
            + ", ".join(f"{k} {v:.2f}" for k, v in memory.items()))


def update_memory(args, mf_name: str, dense_name: str) -> None:
    """Re-measure peak memory and rewrite the memory note of an existing results file."""
    from common import RESULTS

    stem = f"model_{args.pair}_{args.dtype}"
    payload = json.loads((RESULTS / f"{stem}.json").read_text())
    payload["peak_rss_gb"] = measure_memory(mf_name, dense_name, args.dtype)
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = (RESULTS / f"{stem}.md").read_text().splitlines()
    md = [memory_note(payload["peak_rss_gb"]) if line.startswith("Peak RSS") else line for line in md]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=list(PAIRS), default="tiny")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-head-variants", action="store_true", help="no bf16 / int8 LM head cases")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="keep parameters on 4 KiB pages (default: both models on 2 MiB pages, see pages.py)")
    parser.add_argument("--memory-only", action="store_true",
                        help="only (re)measure peak memory and update an existing results file")
    args = parser.parse_args()
    allocator_huge_pages(not args.no_huge_pages)  # activations and gradients too, both models
    mf_name, dense_name = PAIRS[args.pair]
    dtype = DTYPES[args.dtype]
    if args.memory_only:
        return update_memory(args, mf_name, dense_name)
    huge = not args.no_huge_pages and huge_pages_available()
    models = {"memoryformer": build(mf_name, dtype, huge_pages=huge), "dense": build(dense_name, dtype, huge_pages=huge)}
    cases = []
    for batch in (1, 8):
        for context in (128, 1024):
            for head in (True, False):
                cases.append((f"decode b={batch} ctx={context}", "tok/s", batch,
                              {k: decode_fn(m, batch, context, head) for k, m in models.items()}, head))
    for head in (True, False):
        cases.append(("prefill 512", "tok/s", 512, {k: prefill_fn(m, 512, head) for k, m in models.items()}, head))
    if not args.skip_head_variants:  # lower precision (accuracy: benchmarks/precision.py)
        variants = (("bf16 head", None, "bf16", (1, 8)), ("int8 head", None, "int8", (1,)),
                    ("int8 tables + bf16 head", "int8", "bf16", (1,)))  # tables: MemoryFormer only
        for label, tables, head, batches in variants:
            quantized = {k: quantize_model(m, tables=tables if k == "memoryformer" else None, head=head)
                         for k, m in models.items()}
            for batch in batches:
                cases.append((f"decode b={batch} ctx=128, {label}", "tok/s", batch,
                              {k: decode_fn(m, batch, 128, True) for k, m in quantized.items()}, True))
    rows = []
    print(f"{'case':<24} {'head':>5} {'MF ms':>9} {'dense ms':>9} {'ratio':>6}")
    for name, _unit, tokens, fns, head in cases:
        t = time_interleaved(fns, rounds=args.rounds)
        row = {"case": name, "head": head, "mf_ms": t["memoryformer"] * 1e3, "dense_ms": t["dense"] * 1e3,
               "ratio": t["memoryformer"] / t["dense"], "mf_tok_s": tokens / t["memoryformer"],
               "dense_tok_s": tokens / t["dense"]}
        rows.append(row)
        print(f"{name:<24} {str(head):>5} {row['mf_ms']:>9.3f} {row['dense_ms']:>9.3f} {row['ratio']:>6.2f}", flush=True)
    if not args.skip_train:
        fns = {k: train_fn(m, 4, 512) for k, m in models.items()}
        t = time_interleaved(fns, rounds=max(3, args.rounds // 2), min_time=0.0)
        rows.append({"case": "train step 4x512", "head": True, "mf_ms": t["memoryformer"] * 1e3,
                     "dense_ms": t["dense"] * 1e3, "ratio": t["memoryformer"] / t["dense"],
                     "mf_tok_s": 2048 / t["memoryformer"], "dense_tok_s": 2048 / t["dense"]})
        print(f"{'train step 4x512':<24} {'True':>5} {rows[-1]['mf_ms']:>9.1f} {rows[-1]['dense_ms']:>9.1f} "
              f"{rows[-1]['ratio']:>6.2f}", flush=True)
    memory = {}
    if not args.skip_memory:
        del models
        memory = measure_memory(mf_name, dense_name, args.dtype)
    params = {}
    for arch, preset in (("memoryformer", mf_name), ("dense", dense_name)):
        with torch.device("meta"):
            params[arch] = LanguageModel(ModelConfig.from_preset(preset)).num_parameters()
    columns = [("case", "case"), ("head", "head incl."), ("mf_ms", f"{mf_name} ms"), ("dense_ms", f"{dense_name} ms"),
               ("ratio", "ratio MF / dense"), ("mf_tok_s", f"{mf_name} tok/s"), ("dense_tok_s", f"{dense_name} tok/s")]
    notes = [f"Parameters: {mf_name} {params['memoryformer'] / 1e6:.1f}M, {dense_name} {params['dense'] / 1e6:.1f}M. "
             f"dtype {args.dtype}. Medians over interleaved rounds; ratio < 1: MemoryFormer faster.",
             "Parameters of both models on 2 MiB pages (memoryformer.inference.pages.use_huge_pages)." if huge else
             "Parameters on 4 KiB pages (--no-huge-pages or no THP).",
             "MemoryFormer decode runs the fused decode_block op (memoryformer.kernels) when the kernels are built."]
    if memory:
        notes.append(memory_note(memory))
    paths = write_results(f"model_{args.pair}_{args.dtype}", rows, columns,
                          title=f"{mf_name} vs {dense_name}", notes=notes,
                          extra={"peak_rss_gb": memory, "parameters": params})
    print("wrote", *paths)


if __name__ == "__main__":
    main()
