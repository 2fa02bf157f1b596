"""`memoryformer generate`: sample text from a trained model, printed token by token as it comes.

    memoryformer generate --model runs/mf-tiny --prompt "Once upon a time" --max-new-tokens 100
    echo "The meaning of life" | memoryformer generate --model hf/mf-tiny --temperature 0 --stop-at-eot
    memoryformer generate --model runs/mf-tiny --tables int8 --head bf16      # smaller, faster inference copy

--model is a training run directory, a checkpoint file or a Hugging Face directory (an export).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="training run directory, checkpoint file, or Hugging Face directory")
    parser.add_argument("--prompt", metavar="TEXT",
                        help="text to continue (default: read stdin when it is not a terminal, else start "
                             "from the end-of-text token)")
    parser.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="tokens to generate (default 100)")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T",
                        help="sampling temperature; 0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens only")
    parser.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling: the smallest set reaching P")
    parser.add_argument("--seed", type=int, help="random seed, for repeatable samples")
    parser.add_argument("--stop-at-eot", action="store_true", help="stop when the end-of-text token is generated")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples to draw (default 1)")
    parser.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt")
    parser.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json to use instead of the model's own")
    parser.add_argument("--device", help="device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--tables", choices=["bf16", "int8"],
                        help="MemoryFormer tables in lower precision (memoryformer.inference.quantize; docs/precision.md)")
    parser.add_argument("--head", choices=["bf16", "int8"], help="the LM head in lower precision")
    parser.add_argument("--force", action="store_true",
                        help="load the model even when the memory estimate says it will not fit")


class StreamPrinter:
    """Writes the decoded text of a growing token list, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split over tokens: wait for the rest
            return
        self.flush(text)

    def flush(self, text: str | None = None) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True) if text is None else text
        new = text[len(self.shown):]
        if new:
            self.out.write(new)
            self.out.flush()
        self.shown = text


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if not sys.stdin.isatty():
        return sys.stdin.read()
    return ""


def _check_sampling(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")


def _load(args: argparse.Namespace, device):
    """(model, tokenizer): the model (quantized on request, on 2 MiB pages) and the tokenizer to use."""
    from memoryformer.data.tokenizer import load_tokenizer
    from memoryformer.inference.pages import use_huge_pages
    from memoryformer.inference.quantize import quantize_model
    from memoryformer.integrations.hf import check_tokenizer, load_any
    from memoryformer.train.memory import check_inference_memory

    check_inference_memory(args.model, device, force=args.force)
    model, tokenizer = load_any(args.model, device=device)
    if args.tables or args.head:
        model = quantize_model(model, tables=args.tables, head=args.head)
    use_huge_pages(model)  # Memory Layer rows are scattered: 2 MiB pages save a TLB miss per row (CPU)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        check_tokenizer(tokenizer, model.config, f"--tokenizer {args.tokenizer}")
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer.json; pass --tokenizer FILE")
    return model, tokenizer


def _prompt_ids(args: argparse.Namespace, prompt: str, tokenizer, context: int) -> tuple[list[int], int | None]:
    """(prompt token ids, cut to leave room for the new tokens; the end-of-text id or None)."""
    from memoryformer.data.tokenizer import eot_id

    ids = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
    eot = None
    try:
        eot = eot_id(tokenizer)
    except ValueError:
        if args.stop_at_eot or not ids:
            raise
    if not ids:
        ids = [eot]  # an empty prompt starts a new document
    if args.max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt in the "
                         f"model's context of {context} tokens")
    if len(ids) + args.max_new_tokens > context:
        keep = context - args.max_new_tokens
        print(f"note: the prompt has {len(ids)} tokens; keeping its last {keep} so that "
              f"{args.max_new_tokens} new tokens fit the context of {context}", file=sys.stderr)
        ids = ids[-keep:]
    return ids, eot


def run(args: argparse.Namespace) -> int:
    import torch

    from memoryformer.train.distributed import resolve_device

    _check_sampling(args)
    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = _load(args, device)
    prompt = read_prompt(args)
    ids, eot = _prompt_ids(args, prompt, tokenizer, model.config.max_seq_len)
    generator = None
    if args.seed is not None:
        torch.manual_seed(args.seed)
        generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    for sample in range(args.num_samples):
        if sample:
            sys.stdout.write("\n\n---\n\n")
        if not args.no_echo and prompt:
            sys.stdout.write(tokenizer.decode(ids, skip_special_tokens=True))
            sys.stdout.flush()
        printer = StreamPrinter(tokenizer, sys.stdout)
        model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, stop_token=eot if args.stop_at_eot else None, generator=generator,
                       on_token=lambda token, p=printer: p.push(int(token[0])))
        printer.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
