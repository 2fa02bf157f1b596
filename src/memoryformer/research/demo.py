"""The main job: train a small MemoryFormer and its dense Pythia twin on the same tokens, compare them.

    memoryformer demo [--out runs/demo] [--steps 250]

1. Prepare the embedded default corpus (the Python standard library's sources and pydoc topics) with a
   byte-level BPE trained on it.
2. Train `mf-demo` and `pythia-demo` (d = 256, 4 layers, 4 heads, sequence 256) on exactly the same
   batches, each at its own learning rate: at this scale the learning rate decides the comparison, and
   MemoryFormer wants a far higher one than its twin (the sweep in experiments/results/twin.md put their
   optima at 2.4e-2..4.8e-2 and 6e-3 at d = 128; we take one step lower for MemoryFormer at d = 256).
3. Print parameters, FLOPs per token, learning rate, validation perplexity, training and decode
   throughput side by side; plot both loss curves; show a generated sample from each.
"""

from __future__ import annotations

import contextlib
import json
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memoryformer.core.config import ModelConfig
from memoryformer.progress import Progress

ARMS = (("memoryformer", "mf-demo"), ("dense", "pythia-demo"))
PROMPT = "def main():\n    "
ARM_RECORD = "demo_arm.json"  # an arm's row, sample and curves once it has finished


@dataclass
class DemoSettings:
    out: str = "runs/demo"
    steps: int = 120
    batch_size: int = 16
    seq_len: int = 256
    lr_memoryformer: float = 1.2e-2
    lr_dense: float = 6e-3
    vocab_size: int = 4096
    max_bytes: int = 6_000_000
    eval_every: int = 50
    decode_tokens: int = 128
    seed: int = 0
    model_overrides: dict[str, Any] | None = None  # e.g. smaller models for the smoke test
    progress: bool = True
    command: str = "memoryformer demo"  # how the user started it: rerunning that resumes


def prepare_default_data(settings: DemoSettings) -> Path:
    """Tokenise the embedded default corpus once; reuse it when already prepared."""
    from memoryformer.data import prepare

    data_dir = Path(settings.out) / "data"
    if not (data_dir / "meta.json").is_file():
        prepare(None, data_dir, vocab_size=settings.vocab_size, max_bytes=settings.max_bytes, seed=settings.seed,
                progress=settings.progress)
    return data_dir


def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int, rounds: int = 3) -> float:
    """Median tokens/s of greedy generation, batch 1, with the KV cache."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        model.generate(prompt, new_tokens, temperature=0)
        times.append(time.perf_counter() - t0)
    return new_tokens / statistics.median(times)


def plot_losses(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (arm, res), colour in zip(results.items(), ("tab:blue", "tab:orange")):
        ax.plot(res.steps, res.losses, color=colour, alpha=0.35, lw=1)
        window = max(1, len(res.losses) // 25)
        smooth = [statistics.fmean(res.losses[max(0, i - window + 1):i + 1]) for i in range(len(res.losses))]
        ax.plot(res.steps, smooth, color=colour, lw=2, label=f"{arm} train")
        if res.evals:
            ax.plot([e["step"] for e in res.evals], [e["val_loss"] for e in res.evals], "o--", color=colour,
                    label=f"{arm} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("MemoryFormer vs dense twin, same tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class DemoStopped(Exception):
    """A stop signal (SIGINT, SIGTERM) ended the demo before both arms finished; rerunning resumes."""

    def __init__(self, signum: int, where: str, command: str) -> None:
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} {where}; nothing is lost: run `{command}` again to continue "
                         "(it resumes from the checkpoints)")


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt-like `_Terminated` and SIGINT KeyboardInterrupt outside training
    (train() handles its own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, terminate),
                # whatever the process inherited (an embedding program, a test runner), Ctrl-C stops the demo
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Terminated(BaseException):
    """SIGTERM arrived outside the training loop."""


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Both arms, then the summary; raises `DemoStopped` on SIGINT / SIGTERM, writing no summary."""
    where = "while preparing the data"
    try:
        with _stop_on_sigterm():
            out = Path(settings.out)
            out.mkdir(parents=True, exist_ok=True)
            data_dir = prepare_default_data(settings)
            rows, results, samples = [], {}, {}
            with Progress(total=len(ARMS), desc="demo", unit="arms", enabled=settings.progress) as bar:
                for arm, preset in ARMS:
                    where = f"while training the {arm} arm"
                    row, res, sample = finished_arm(settings, arm) or run_arm(settings, arm, preset, data_dir)
                    rows.append(row)
                    results[arm], samples[arm] = res, sample
                    bar.update(1, **{f"{arm} ppl": row["val_ppl"]})
            where = "while writing the summary"
            return write_summary(settings, rows, results, samples, data_dir)
    except KeyboardInterrupt:
        raise DemoStopped(signal.SIGINT, where, settings.command) from None
    except _Terminated:
        raise DemoStopped(signal.SIGTERM, where, settings.command) from None


def run_arm(settings: DemoSettings, arm: str, preset: str, data_dir: Path) -> tuple[dict[str, Any], Curve, str]:
    """Train one arm (resuming its run when there is one) and measure it: (summary row, TrainResult,
    generated sample). A stop signal during training comes back as KeyboardInterrupt / `_Terminated`."""
    from memoryformer.data import TokenData
    from memoryformer.research.flops import forward_flops_per_token
    from memoryformer.train import TrainConfig, train
    from memoryformer.train.checkpoint import atomic_write_text

    data = TokenData(data_dir)
    tokenizer = data.tokenizer()
    overrides = {"vocab_size": data.vocab_size, "max_seq_len": settings.seq_len, **(settings.model_overrides or {})}
    cfg = ModelConfig.from_preset(preset, **overrides)
    lr = settings.lr_memoryformer if arm == "memoryformer" else settings.lr_dense
    tc = TrainConfig(batch_size=settings.batch_size, seq_len=settings.seq_len, max_steps=settings.steps, lr=lr,
                     warmup_frac=0.05, eval_every=settings.eval_every, eval_batches=0,
                     ckpt_every=max(settings.steps // 2, 1), keep_last=1, log_every=10, seed=settings.seed,
                     device="cpu", tensorboard=True)
    print(f"\n== training {arm} ({preset}, lr {lr:g}) ==", flush=True)
    res = train(cfg, tc, data_dir, Path(settings.out) / arm, resume="auto", progress=settings.progress,
                resume_hint=f"run `{settings.command}` again to continue")
    if res.interrupted:
        raise _Terminated if res.interrupted == "SIGTERM" else KeyboardInterrupt
    if not res.finished:
        raise RuntimeError(f"the {arm} arm stopped at step {res.step} of {settings.steps} without a stop signal")
    model = res.model.eval()
    prompt = torch.tensor([tokenizer.encode(PROMPT).ids], dtype=torch.long)
    room = settings.seq_len - prompt.shape[1]
    torch.manual_seed(settings.seed)
    decode = decode_tokens_per_s(model, prompt, min(settings.decode_tokens, room))
    sample = model.generate(prompt, min(60, room), temperature=0.8, top_k=50,
                            generator=torch.Generator().manual_seed(settings.seed))
    row = {
        "arm": arm, "preset": preset,
        "parameters": model.num_parameters(),
        "non_embedding_parameters": model.num_parameters(exclude_embeddings=True),
        "flops_per_token": forward_flops_per_token(cfg, settings.seq_len),
        "lr": lr, "val_loss": res.val_loss, "val_ppl": res.val_ppl,
        "train_tokens": res.tokens, "train_tokens_per_s": res.tokens_per_s, "decode_tokens_per_s": decode,
    }
    text = tokenizer.decode(sample[0].tolist())
    curve = Curve(res.losses, res.evals)
    record = {"settings": arm_settings(settings), "row": row, "sample": text, "losses": curve.losses,
              "evals": curve.evals}
    atomic_write_text(Path(settings.out) / arm / ARM_RECORD, json.dumps(record, indent=2) + "\n")
    return row, curve, text


@dataclass
class Curve:
    """One arm's training losses (one per step) and validation results, as the loss plot reads them."""

    losses: list[float]
    evals: list[dict[str, float]]

    @property
    def steps(self) -> list[int]:
        return list(range(1, len(self.losses) + 1))


def arm_settings(settings: DemoSettings) -> dict[str, Any]:
    """The settings that decide an arm's result: a finished arm is reused only when they are the same."""
    return {k: v for k, v in settings.__dict__.items() if k not in ("progress", "command", "out")}


def finished_arm(settings: DemoSettings, arm: str) -> tuple[dict[str, Any], Curve, str] | None:
    """(row, curve, sample) of an arm a previous run finished with the same settings, else None."""
    file = Path(settings.out) / arm / ARM_RECORD
    if not file.is_file():
        return None
    record = json.loads(file.read_text())
    if record.get("settings") != json.loads(json.dumps(arm_settings(settings))):
        return None
    print(f"\n== {arm}: finished by an earlier run with the same settings ({file}) ==", flush=True)
    return record["row"], Curve(record["losses"], record["evals"]), record["sample"]


def write_summary(settings: DemoSettings, rows: list[dict[str, Any]], results: dict[str, Any],
                  samples: dict[str, str], data_dir: Path) -> dict[str, Any]:
    """summary.json, summary.md and loss_curves.png of finished arms (all trained the same tokens)."""
    from memoryformer.train.checkpoint import atomic_write_text

    tokens = {row["arm"]: row["train_tokens"] for row in rows}
    if len(set(tokens.values())) != 1:
        raise RuntimeError(f"the arms saw different numbers of training tokens ({tokens}); not comparable")
    out = Path(settings.out)
    png = plot_losses(results, out / "loss_curves.png")
    summary = {"settings": {k: v for k, v in settings.__dict__.items() if k != "command"}, "rows": rows,
               "samples": samples, "plot": str(png), "data": str(data_dir),
               "torch_threads": torch.get_num_threads()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    table = format_table(rows)
    atomic_write_text(out / "summary.md", table + "\n")
    print("\n" + table)
    for arm, text in samples.items():
        print(f"\n--- sample from {arm} (prompt {PROMPT!r}) ---\n{text}")
    print(f"\nrun directory: {out}  (loss curves: {png})")
    return summary


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table, one column per arm."""
    fields = [
        ("parameters", "parameters", lambda v: f"{v / 1e6:.1f}M"),
        ("non_embedding_parameters", "non-embedding parameters", lambda v: f"{v / 1e6:.2f}M"),
        ("flops_per_token", "forward FLOPs/token (2 per MAC)", lambda v: f"{v / 1e6:.1f}M"),
        ("lr", "learning rate", lambda v: f"{v:g}"),
        ("train_tokens", "training tokens", lambda v: f"{v:,}"),
        ("val_ppl", "validation perplexity", lambda v: f"{v:.2f}" if v is not None else "n/a"),
        ("train_tokens_per_s", "training tokens/s", lambda v: f"{v:,.0f}"),
        ("decode_tokens_per_s", "decode tokens/s (batch 1)", lambda v: f"{v:,.0f}"),
    ]
    head = "| | " + " | ".join(f"{r['arm']} ({r['preset']})" for r in rows) + " |"
    lines = [head, "|---" * (len(rows) + 1) + "|"]
    for key, label, fmt in fields:
        lines.append(f"| {label} | " + " | ".join(fmt(r[key]) for r in rows) + " |")
    return "\n".join(lines)
