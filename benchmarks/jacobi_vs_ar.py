"""Jacobi decoding vs greedy AR, measured side by side in one process.

For each batch size and block size n it prints Jacobi's tokens per forward (TPF), the Jacobi/AR
wall-clock speedup (our own AR loop on the same cache path), and our AR against Hugging Face
`generate`. Runs are interleaved and the median of `--repeats` is used, so machine noise hits
both sides alike. Outputs are checked for equality with AR before anything is timed.

    python benchmarks/jacobi_vs_ar.py                       # tiny random Llama, CPU
    python benchmarks/jacobi_vs_ar.py --model toy           # the toy teacher
    python benchmarks/jacobi_vs_ar.py --model <hub id or dir> --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cllm import ar_generate, jacobi_generate, load_model, tiny_model
from cllm.device import default_device
from cllm.hf import TINY_ARCHITECTURES


@dataclass
class Case:
    batch_size: int
    n_token: int
    tokens_per_forward: float
    jacobi_over_ar: float  # wall-clock speedup of Jacobi over our AR
    ar_over_hf: float  # wall-clock speedup of our AR over HF generate


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    architectures = ", ".join(TINY_ARCHITECTURES)
    parser.add_argument("--model", default="tiny:llama",
                        help=f"tiny:<arch> (random, one of {architectures}), toy, a hub id or a local directory")
    parser.add_argument("--n-token", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-hf", action="store_true", help="skip the HF generate comparison")
    return parser.parse_args()


def build_model(name: str, device: torch.device, dtype: torch.dtype | None):
    if name.startswith("tiny:"):
        return tiny_model(name.split(":", 1)[1], vocab_size=1024, seed=0).to(device, dtype or torch.float32), None
    model, tokenizer = load_model(name, device=device, dtype=dtype)
    return model, tokenizer


def make_prompts(model, tokenizer, batch_size: int, length: int) -> torch.Tensor:
    """Equal-length prompts (so HF generate needs no padding): toy held-out prompts when the
    model has a tokenizer, random ids otherwise."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    if tokenizer is not None:
        try:
            from cllm.toy.tasks import toy_prompts

            texts = [p.prompt for p in toy_prompts("heldout", limit=batch_size)]
            ids = [tokenizer(text)["input_ids"][-length:] for text in texts]
            if len(ids) == batch_size and all(len(row) == length for row in ids):
                return torch.tensor(ids)
        except (ImportError, ValueError):
            pass
    return torch.randint(0, vocab, (batch_size, length), generator=generator)


def timed(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(model, prompts: torch.Tensor, n_token: int, args, eos) -> Case:
    device = model.device
    prompts = prompts.to(device)
    ar = ar_generate(model, prompts, max_new_tokens=args.max_new_tokens, eos_token_id=eos)
    jacobi = jacobi_generate(model, prompts, n_token=n_token, max_new_tokens=args.max_new_tokens, eos_token_id=eos)
    if jacobi.new_tokens != ar.new_tokens:
        matching = sum(a == b for a, b in zip(jacobi.new_tokens, ar.new_tokens))
        print(f"  note: {matching}/{len(ar.new_tokens)} rows identical to AR (near-tied argmax in low precision)")

    def run_ar():
        ar_generate(model, prompts, max_new_tokens=args.max_new_tokens, eos_token_id=eos)

    def run_jacobi():
        jacobi_generate(model, prompts, n_token=n_token, max_new_tokens=args.max_new_tokens, eos_token_id=eos)

    def run_hf():
        model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                       max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                       pad_token_id=0, eos_token_id=None)

    ar_times, jacobi_times, hf_times = [], [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits all sides
        ar_times.append(timed(run_ar, device))
        jacobi_times.append(timed(run_jacobi, device))
        if not args.no_hf:
            hf_times.append(timed(run_hf, device))
    ar_rate = ar.stats.total.new_tokens / statistics.median(ar_times)
    jacobi_rate = jacobi.stats.total.new_tokens / statistics.median(jacobi_times)
    hf_rate = prompts.shape[0] * args.max_new_tokens / statistics.median(hf_times) if hf_times else float("nan")
    return Case(
        batch_size=prompts.shape[0],
        n_token=n_token,
        tokens_per_forward=jacobi.stats.total.tokens_per_forward,
        jacobi_over_ar=jacobi_rate / ar_rate,
        ar_over_hf=ar_rate / hf_rate,
    )


def main() -> None:
    args = parse_args()
    device = torch.device(args.device) if args.device else default_device()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer = build_model(args.model, device, dtype)
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{next(model.parameters()).dtype}) on {name}; {args.max_new_tokens} new tokens, median of {args.repeats}")
    print(f"{'batch':>5} {'n':>4} {'TPF':>6} {'Jacobi/AR':>10} {'AR/HF gen':>10}")
    for batch_size in args.batch_sizes:
        prompts = make_prompts(model, tokenizer, batch_size, args.prompt_length)
        for n_token in args.n_token:
            case = measure(model, prompts, n_token, args, eos)
            print(f"{case.batch_size:>5} {case.n_token:>4} {case.tokens_per_forward:>6.2f} "
                  f"{case.jacobi_over_ar:>9.2f}x {case.ar_over_hf:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
