"""Whole models: MemoryFormer against its Pythia twin (same width and depth), head included and excluded.

    python benchmarks/model.py [--pair tiny|demo] [--dtype fp32|bf16] [--rounds 5] [--skip-memory]

Cases, each timed in the same process with the two models alternating (medians over rounds):
  decode   one new token per sequence, batch 1 and 8, after a 128- or 1024-token context (KV cache);
           each call a different token (from 256 random ones), so Memory Layers read uncached rows;
           steps as generate() takes them (MemoryFormer's fused op with the cache's decode_plan)
  prefill  512 tokens, batch 1
  train    one training step as the training loop takes it (forward, cross-entropy, backward,
           clip_and_step, AdamW from build_optimizer, fused where supported, zero_grad): batch 4 x 512
           tokens; and at the scaling study's size (d 128, 2 layers, 4 heads, vocabulary 4096, batch
           8 x 128), a MemoryFormer against its twin of that size
  decode with the LM head in bf16 or int8 (memoryformer.inference.quantize), both models alike; with
           MemoryFormer's tables in int8 as well (the dense twin's head alone); and like for like, each
           side's per-token weights at the same precision: MemoryFormer's bf16 tables beside the dense
           model's bf16 block weights (+ bf16 heads), int8 tables beside int8 block weights (+ int8 heads)
"head excluded" runs embedding, blocks and final norm only. Every decode row at batch 1 carries the bytes
a step reads (decode_bytes: table rows or block weights, KV cache, norms and biases, the head when
included), the achieved GB/s, and MemoryFormer's byte bound: its table rows at the random-row read
bandwidth and the rest at the streaming bandwidth, both measured in the same run (docs/performance.md).
Peak memory (RSS) of decode and of a training step is measured first, per model in a fresh subprocess. Writes
benchmarks/results/model_<pair>_<dtype>.json/.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import configure_allocator, time_interleaved, write_results  # noqa: E402

from memoryformer import LanguageModel, ModelConfig  # noqa: E402
from memoryformer.inference.pages import huge_page_tensor, huge_pages_available, use_huge_pages  # noqa: E402
from memoryformer.inference.quantize import quantize_model  # noqa: E402
from memoryformer.kernels.grad_norms import GradNormTally  # noqa: E402
from memoryformer.train.config import TrainConfig  # noqa: E402
from memoryformer.train.optim import build_optimizer, clip_and_step, fused_adamw_supported  # noqa: E402

PAIRS = {"tiny": ("mf-tiny", "pythia-70m"), "demo": ("mf-demo", "pythia-demo")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# the scaling study's model size (research/reproduce/scaling.py), for both architectures
STUDY_SIZE = dict(vocab_size=4096, n_layers=2, d_model=128, n_heads=4, max_seq_len=128)
TRAIN_CASE = "train step 4x512"
STUDY_CASE = "train step study-size 8x128"
PREFILL_CASE = "prefill 512"
STEP_WARMUP = 3  # training steps of each model before timing (AdamW state, allocator, pages)
LIKE_FOR_LIKE = ("bf16", "int8")  # precisions of the like-for-like decode pairs
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}


def build(preset: str, dtype: torch.dtype, seq: int = 2048, huge_pages: bool = True, **overrides) -> LanguageModel:
    """The preset's model (with `overrides` of its config) in eval mode; large tensors moved onto 2 MiB
    pages (both architectures alike)."""
    torch.manual_seed(0)
    base = ModelConfig.from_preset(preset, **overrides)
    cfg = ModelConfig.from_preset(preset, **{**overrides, "max_seq_len": max(seq, base.max_seq_len)})
    model = LanguageModel(cfg).to(dtype).eval()
    if huge_pages:
        use_huge_pages(model)
    return model


def decode_fn(model: LanguageModel, batch: int, context: int, head: bool):
    cache = model.new_cache(batch, context + 1)
    cache.decode_plan = model.decode_plan(cache)  # as generate() steps: the model read once (None: dense)
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
    """One training step as the training loop (memoryformer.train.loop) takes it, on random tokens
    (batch, tokens): forward with cross-entropy, backward (collecting the kernels' table-gradient norms),
    clip_and_step at TrainConfig's grad_clip with those norms and AdamW from build_optimizer (fused
    where fused_adamw_supported, the clip factor then applied inside it), zero_grad."""
    model.train()
    device = next(model.parameters()).device
    tc = TrainConfig()
    opt = build_optimizer(model, tc, lr=1e-4, fused=fused_adamw_supported(device))
    params = [p for p in model.parameters() if p.requires_grad]
    idx = torch.randint(0, model.config.vocab_size, (batch, tokens))
    targets = torch.randint(0, model.config.vocab_size, (batch, tokens))

    def step():
        with GradNormTally() as tally:
            _, loss = model(idx, targets)
            loss.backward()
        clip_and_step(opt, params, tc.grad_clip, sharded=False, tally=tally)
        opt.zero_grad(set_to_none=True)

    return step


# ---- the bytes of a decode step, and the bandwidths they are read at ------------------------------------


def decode_bytes(cfg: ModelConfig, context: int, *, weights: str = "fp32", head: str | None = None,
                 float_bytes: int = 4) -> dict[str, int]:
    """Bytes one decode step at batch 1 reads after `context` cached tokens (softmax attention).

    weights: the precision of MemoryFormer's tables or of the dense blocks' nn.Linear weights ("fp32",
    "bf16", "int8"; int8 adds a float32 scale per table row read, or per weight row); head: the LM head's
    precision, None when the head is excluded; float_bytes: the element size of everything else (norm
    weights, the KV cache, the embedding row), and of the biases unless `weights` were quantized from a
    wider dtype (quantized layers keep float32 biases). d = d_model, L = n_layers, per block:
      MemoryFormer: K = num_tables rows of each table, each of `out` elements: Q, K, V and ML2 (out d),
                    ML1 (out K(tau + e)); biases of those five layers; two RMSNorms (d each) and the
                    Memory Block's LayerNorm (weight and bias, K(tau + e) each)
      dense:        every weight of the fused QKV (3d x d), attention output (d x d) and MLP (f x d,
                    d x f); their biases; two LayerNorms (2d each)
      both:         the KV cache, keys and values of context + 1 positions (the new one included), 2(c+1)d
    plus the embedding row (d) and the final norm (MemoryFormer d, dense 2d), and the head (vocab x d,
    + vocab scales for int8). Activations and rotary tables (well under 1 KB a block) are not counted.
    Returns {"weights", "kv_cache", "vectors" (norms, biases, embedding row), "head", "total"}.
    """
    if cfg.attention != "softmax":
        raise ValueError(f"decode_bytes counts a softmax KV cache; attention={cfg.attention!r}")
    d, w = cfg.d_model, PRECISION_BYTES[weights]
    scale = 4 if weights == "int8" else 0
    bias = float_bytes if w == float_bytes else 4
    if cfg.architecture == "memoryformer":
        k, hidden = cfg.num_tables, cfg.memory_hidden
        outs = (d, d, d, hidden, d)  # Q, K, V, ML1, ML2: K rows of each table
        block = sum(k * (out * w + scale) for out in outs)
        vectors = sum(outs) * bias * cfg.memory_bias + (2 * d + 2 * hidden) * float_bytes
        final_norm = d
    else:
        f = cfg.ffn_hidden
        shapes = ((3 * d, d), (d, d), (f, d), (d, f))  # (out, in) of each nn.Linear
        block = sum(out * inp * w + out * scale for out, inp in shapes)
        vectors = (4 * d * cfg.attention_bias + f + d) * bias + 4 * d * float_bytes
        final_norm = 2 * d
    kv = 2 * (context + 1) * d * float_bytes
    head_bytes = 0 if head is None else cfg.vocab_size * (d * PRECISION_BYTES[head] + (4 if head == "int8" else 0))
    parts = {"weights": cfg.n_layers * block, "kv_cache": cfg.n_layers * kv,
             "vectors": cfg.n_layers * vectors + (d + final_norm) * float_bytes, "head": head_bytes}
    return {**parts, "total": sum(parts.values())}


def bound_seconds(parts: dict[str, int], gather_bw: float | None, stream_bw: float) -> float:
    """The time `decode_bytes` parts take at the measured bandwidths (bytes/s): "weights" at gather_bw
    (MemoryFormer's scattered table rows) or, with gather_bw None, streamed like the rest (dense)."""
    gathered = parts["weights"] if gather_bw is not None else 0
    return (parts["total"] - gathered) / stream_bw + (gathered / gather_bw if gathered else 0.0)


def random_row_bandwidth(row_bytes: int, *, table_mb: int = 512, rows_per_bag: int = 64, bags: int = 64,
                         rounds: int = 5, huge_pages: bool = True) -> float:
    """Bytes/s of summing random rows of `row_bytes` from a float32 table of `table_mb` MB (many times an
    L3 cache): F.embedding_bag(mode="sum") with per-sample weights (the weighted sum a Memory Layer
    takes; without them torch's CPU path costs time in proportion to the table's rows) over `bags`
    bags of `rows_per_bag` rows each, as a Memory Layer sums K rows per token. The calls cycle through
    index sets drawn at random beforehand, enough of them to touch half the table's bytes, so that the
    rows they read are not left in a cache."""
    table = _filled_table(table_mb, row_bytes // 4, huge_pages)
    per_call = bags * rows_per_bag
    n_sets = max(2, table.shape[0] // (2 * per_call))
    sets = itertools.cycle([torch.randint(0, table.shape[0], (per_call,)) for _ in range(n_sets)])
    offsets = torch.arange(0, per_call, rows_per_bag)
    weights = torch.ones(per_call)

    def gather():
        return F.embedding_bag(next(sets), table, offsets, mode="sum", per_sample_weights=weights)

    t = time_interleaved({"gather": gather}, rounds=rounds)
    return per_call * row_bytes / t["gather"]


def stream_bandwidth(*, table_mb: int = 512, rounds: int = 5, huge_pages: bool = True) -> float:
    """Bytes/s of reading a `table_mb` MB float32 tensor once, in order (a sum)."""
    table = _filled_table(table_mb, 1024, huge_pages)
    t = time_interleaved({"stream": table.sum}, rounds=rounds)
    return table.numel() * 4 / t["stream"]


def _filled_table(table_mb: int, columns: int, huge_pages: bool) -> torch.Tensor:
    """A (table_mb MB / (4 columns), columns) float32 table of ones, on 2 MiB pages if asked."""
    like = torch.empty(table_mb * 2**20 // (4 * columns), columns, device="meta")
    table = huge_page_tensor(like) if huge_pages else torch.empty(like.shape)
    return table.fill_(1.0)


@dataclass(frozen=True)
class Bandwidth:
    """Measured read bandwidths, bytes/s: random rows by row size, and streaming."""

    random_rows: dict[int, float]
    stream: float

    def report(self) -> dict[str, float]:
        """{"random N B rows": GB/s, ..., "stream": GB/s}, as the results record them."""
        return {**{f"random {b} B rows": v / 1e9 for b, v in self.random_rows.items()}, "stream": self.stream / 1e9}


def measure_bandwidth(row_sizes: list[int], rounds: int, huge_pages: bool) -> Bandwidth:
    """The random-row bandwidth at each row size (bytes) and the streaming bandwidth, on the pages the
    models are on."""
    rows = {b: random_row_bandwidth(b, rounds=rounds, huge_pages=huge_pages) for b in sorted(set(row_sizes))}
    return Bandwidth(rows, stream_bandwidth(rounds=rounds, huge_pages=huge_pages))


# ---- the cases -------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One timed comparison. precision: per model, (weights, head) as decode_bytes takes them (head None
    when excluded); batch and context for decode cases."""

    name: str
    head: bool
    tokens: int  # tokens per call, for tok/s
    fns: dict[str, Callable[[], object]]
    precision: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    batch: int | None = None
    context: int | None = None


def precision_label(arch: str, weights: str, head: str | None) -> str:
    """'int8 tables + bf16 head' (MemoryFormer) / 'int8 blocks' (dense, head excluded)."""
    what = "tables" if arch == "memoryformer" else "blocks"
    return f"{weights} {what}" + ("" if head is None else f" + {head} head")


def like_case(precision: str, head: bool) -> str:
    """The name of a like-for-like decode case (batch 1 after 128 tokens), each side's precision in it."""
    h = precision if head else None
    return (f"decode b=1 ctx=128, MF {precision_label('memoryformer', precision, h)} "
            f"vs dense {precision_label('dense', precision, h)}")


def decode_cases(models: dict[str, LanguageModel], dtype_name: str, variants: bool,
                 huge_pages: bool = True) -> list[Case]:
    """The decode cases: both models at `dtype_name`, then (variants) lower-precision heads, int8 tables,
    and the like-for-like pairs (fp32 models only). Quantized copies go on 2 MiB pages like the models
    (as `memoryformer generate` does), both sides alike, when `huge_pages`."""

    def quantize(model: LanguageModel, **kwargs) -> LanguageModel:
        q = quantize_model(model, **kwargs)
        if huge_pages:
            use_huge_pages(q)
        return q

    cases = []
    for batch, context, head in itertools.product((1, 8), (128, 1024), (True, False)):
        prec = {k: (dtype_name, dtype_name if head else None) for k in models}
        cases.append(Case(f"decode b={batch} ctx={context}", head, batch,
                          {k: decode_fn(m, batch, context, head) for k, m in models.items()}, prec, batch, context))
    if not variants:
        return cases
    for label, tables, head, batches in (("bf16 head", None, "bf16", (1, 8)), ("int8 head", None, "int8", (1,)),
                                         ("int8 tables + bf16 head", "int8", "bf16", (1,))):  # tables: MF only
        quantized = {k: quantize(m, tables=tables if k == "memoryformer" else None, head=head)
                     for k, m in models.items()}
        prec = {k: ((tables if k == "memoryformer" else None) or dtype_name, head) for k in models}
        for batch in batches:
            cases.append(Case(f"decode b={batch} ctx=128, {label}", True, batch,
                              {k: decode_fn(m, batch, 128, True) for k, m in quantized.items()}, prec, batch, 128))
    if dtype_name != "fp32":  # a bf16 model's own rows are its bf16 like-for-like
        return cases
    for precision in LIKE_FOR_LIKE:
        quantized = {"memoryformer": quantize(models["memoryformer"], tables=precision, head=precision),
                     "dense": quantize(models["dense"], blocks=precision, head=precision)}
        for head in (True, False):
            prec = {k: (precision, precision if head else None) for k in models}
            cases.append(Case(like_case(precision, head), head, 1,
                              {k: decode_fn(m, 1, 128, head) for k, m in quantized.items()}, prec, 1, 128))
    return cases


def byte_fields(case: Case, configs: dict[str, ModelConfig], t: dict[str, float], float_bytes: int,
                bw: Bandwidth) -> dict:
    """mf_bytes / dense_bytes (decode_bytes totals), achieved GB/s of each, and the byte bounds:
    MemoryFormer's table rows at the random-row bandwidth for its row size, all else streamed; the dense
    model all streamed. Empty for cases other than decode at batch 1."""
    if case.batch != 1:
        return {}
    out = {}
    for arch, short in (("memoryformer", "mf"), ("dense", "dense")):
        weights, head = case.precision[arch]
        parts = decode_bytes(configs[arch], case.context, weights=weights, head=head, float_bytes=float_bytes)
        row_bytes = configs[arch].d_model * PRECISION_BYTES[weights]
        bound = bound_seconds(parts, bw.random_rows[row_bytes] if arch == "memoryformer" else None, bw.stream)
        out |= {f"{short}_bytes": parts["total"], f"{short}_gb_s": parts["total"] / t[arch] / 1e9,
                f"{short}_bound_ms": bound * 1e3, f"{short}_over_bound": t[arch] / bound}
    return out


def row_sizes(cfg: ModelConfig, cases: list[Case]) -> list[int]:
    """The table row sizes (bytes) of MemoryFormer's decode cases at batch 1: d_model x its weights' bytes."""
    return [cfg.d_model * PRECISION_BYTES[c.precision["memoryformer"][0]] for c in cases if c.batch == 1]


def train_cases(models: dict[str, LanguageModel], presets: tuple[str, str], dtype_name: str, huge: bool) -> list[Case]:
    """The training steps: the pair at 4 x 512, and the study-size pair at 8 x 128."""
    study = {arch: build(preset, DTYPES[dtype_name], 128, huge, **STUDY_SIZE)
             for arch, preset in zip(("memoryformer", "dense"), presets, strict=True)}
    prec = {k: (dtype_name, dtype_name) for k in models}
    return [Case(TRAIN_CASE, True, 2048, {k: train_fn(m, 4, 512) for k, m in models.items()}, prec),
            Case(STUDY_CASE, True, 1024, {k: train_fn(m, 8, 128) for k, m in study.items()}, prec)]


# ---- peak memory -----------------------------------------------------------------------------------------


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
    return ("Peak RSS (GB; decode = batch 8 after 1024 tokens; train = a training step on 4 x 512): "
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


# ---- main ------------------------------------------------------------------------------------------------


def time_case(case: Case, rounds: int, configs: dict[str, ModelConfig], float_bytes: int, bw: Bandwidth | None) -> dict:
    """Time one case (training steps: one step per sample) and build its results row."""
    train = case.name.startswith("train")
    if train:  # a step of the study size takes ~60 ms and varies by +-10% here: 3 samples were not enough
        for _ in range(STEP_WARMUP):
            for fn in case.fns.values():
                fn()
        many = case.name == STUDY_CASE
        t = time_interleaved(case.fns, rounds=max(30, 6 * rounds) if many else max(3, rounds // 2), min_time=0.0)
    else:
        t = time_interleaved(case.fns, rounds=rounds)
    prec = {k: precision_label(k, *v) for k, v in case.precision.items()}
    row = {"case": case.name, "head": case.head, "mf_precision": prec.get("memoryformer"),
           "dense_precision": prec.get("dense"), "mf_ms": t["memoryformer"] * 1e3, "dense_ms": t["dense"] * 1e3,
           "ratio": t["memoryformer"] / t["dense"], "mf_tok_s": case.tokens / t["memoryformer"],
           "dense_tok_s": case.tokens / t["dense"]}
    return row | (byte_fields(case, configs, t, float_bytes, bw) if bw is not None else {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=list(PAIRS), default="tiny")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-head-variants", action="store_true",
                        help="no lower-precision cases (bf16 / int8 heads, int8 tables, like-for-like pairs)")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="keep parameters on 4 KiB pages (default: both models on 2 MiB pages, see pages.py)")
    parser.add_argument("--memory-only", action="store_true",
                        help="only (re)measure peak memory and update an existing results file")
    args = parser.parse_args()
    configure_allocator(not args.no_huge_pages)  # activations and gradients too, both models
    mf_name, dense_name = PAIRS[args.pair]
    dtype = DTYPES[args.dtype]
    if args.memory_only:
        return update_memory(args, mf_name, dense_name)
    # peak memory first, in fresh subprocesses, while this process is small: after its training steps it
    # keeps their freed memory for reuse (memoryformer.allocator), 18 GB at mf-tiny, and a 10 GB child then
    # ran a 24 GB machine out of memory
    memory = {} if args.skip_memory else measure_memory(mf_name, dense_name, args.dtype)
    huge = not args.no_huge_pages and huge_pages_available()
    models = {"memoryformer": build(mf_name, dtype, huge_pages=huge), "dense": build(dense_name, dtype, huge_pages=huge)}
    configs = {k: m.config for k, m in models.items()}
    float_bytes = torch.empty(0, dtype=dtype).element_size()
    cases = decode_cases(models, args.dtype, not args.skip_head_variants, huge)
    for head in (True, False):
        cases.append(Case(PREFILL_CASE, head, 512, {k: prefill_fn(m, 512, head) for k, m in models.items()},
                          {k: (args.dtype, args.dtype if head else None) for k in models}))
    bw = measure_bandwidth(row_sizes(configs["memoryformer"], cases), args.rounds, huge)
    print("read bandwidth, GB/s: " + ", ".join(f"{k} {v:.3g}" for k, v in bw.report().items()), flush=True)
    if not args.skip_train:
        cases += train_cases(models, (mf_name, dense_name), args.dtype, huge)
    rows = []
    print(f"{'case':<40} {'head':>5} {'MF ms':>9} {'dense ms':>9} {'ratio':>6} {'MF/bound':>8}")
    for case in cases:
        rows.append(time_case(case, args.rounds, configs, float_bytes, bw))
        case.fns.clear()  # frees the case's quantized copies and KV caches before the next
        r = rows[-1]
        print(f"{case.name[:40]:<40} {str(case.head):>5} {r['mf_ms']:>9.3f} {r['dense_ms']:>9.3f} {r['ratio']:>6.2f} "
              f"{r.get('mf_over_bound', float('nan')):>8.2f}", flush=True)
    write(args, rows, memory, huge, bw)


def write(args, rows: list[dict], memory: dict[str, float], huge: bool, bw: Bandwidth) -> None:
    """results/model_<pair>_<dtype>.json/.md with the parameters, bandwidths and notes."""
    mf_name, dense_name = PAIRS[args.pair]
    params = {}
    for arch, preset, extra in (("memoryformer", mf_name, {}), ("dense", dense_name, {}),
                                ("study memoryformer", mf_name, STUDY_SIZE), ("study dense", dense_name, STUDY_SIZE)):
        with torch.device("meta"):
            params[arch] = LanguageModel(ModelConfig.from_preset(preset, **extra)).num_parameters()
    columns = [("case", "case"), ("head", "head incl."), ("mf_precision", "MF precision"),
               ("dense_precision", "dense precision"), ("mf_ms", f"{mf_name} ms"), ("dense_ms", f"{dense_name} ms"),
               ("ratio", "ratio MF / dense"), ("mf_tok_s", f"{mf_name} tok/s"), ("dense_tok_s", f"{dense_name} tok/s"),
               ("mf_bytes", "MF bytes"), ("dense_bytes", "dense bytes"), ("mf_gb_s", "MF GB/s"),
               ("dense_gb_s", "dense GB/s"), ("mf_bound_ms", "MF bound ms"), ("mf_over_bound", "MF / bound"),
               ("dense_bound_ms", "dense bound ms"), ("dense_over_bound", "dense / bound")]
    notes = [f"Parameters: {mf_name} {params['memoryformer'] / 1e6:.1f}M, {dense_name} {params['dense'] / 1e6:.1f}M. "
             f"dtype {args.dtype}. Medians over interleaved rounds; ratio < 1: MemoryFormer faster.",
             "Parameters of both models on 2 MiB pages (memoryformer.inference.pages.use_huge_pages)." if huge else
             "Parameters on 4 KiB pages (--no-huge-pages or no THP).",
             "MemoryFormer decode runs the fused decode_block op (memoryformer.kernels) when the kernels are built.",
             "Training steps: the training loop's (clip_and_step with the kernels' table-gradient norms, build_optimizer's AdamW, fused where supported). "
             f"{STUDY_CASE}: {mf_name} and {dense_name} at d 128, 2 layers, 4 heads, vocabulary 4096 "
             f"({params['study memoryformer'] / 1e6:.1f}M and {params['study dense'] / 1e6:.1f}M parameters).",
             "Bytes (decode at batch 1, decode_bytes in benchmarks/model.py; docs/performance.md): what a step reads. "
             "Bound: those bytes at the read bandwidths measured in this run, MemoryFormer's table rows at the "
             "random-row rate of their row size, the rest streamed; GB/s: " +
             ", ".join(f"{k} {v:.3g}" for k, v in bw.report().items()) + "."]
    if memory:
        notes.append(memory_note(memory))
    paths = write_results(f"model_{args.pair}_{args.dtype}", rows, columns, title=f"{mf_name} vs {dense_name}",
                          notes=notes, extra={"peak_rss_gb": memory, "parameters": params,
                                              "bandwidth_gb_s": bw.report()})
    print("wrote", *paths)


if __name__ == "__main__":
    main()
