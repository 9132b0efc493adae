"""What a toy teacher's build costs next to another's, measured side by side in one process.

A full build takes minutes on idle cores and far longer on a busy machine, where wall times mean
little. This script times each domain's tokenizer and then trains its default-size teacher on a
few slices of its training stream, the domains taking turns, and prints the cost per million
training tokens and the ratio to the first domain. Multiply a known build time of the first
domain by the ratio to estimate the others'. Run:

    python benchmarks/toy_build_cost.py                       # math vs sql
    python benchmarks/toy_build_cost.py --domains math code --tokens 20000 --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from cllm import toy
from cllm.toy import teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", nargs="+", choices=toy.DOMAINS, default=["math", "sql"])
    parser.add_argument("--tokens", type=int, default=40_000, help="training tokens per slice")
    parser.add_argument("--rounds", type=int, default=3, help="slices per domain, taken in turns")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizers, tokenizer_seconds = {}, {}
    for domain in args.domains:
        started = time.perf_counter()
        tokenizers[domain] = teacher.train_tokenizer(teacher.default_config(domain))
        tokenizer_seconds[domain] = time.perf_counter() - started
    seconds = dict.fromkeys(args.domains, 0.0)
    tokens = dict.fromkeys(args.domains, 0)
    for _ in range(args.rounds):
        for domain in args.domains:
            config = dataclasses.replace(teacher.default_config(domain), train_tokens=args.tokens, threads=args.threads)
            model = teacher.new_teacher(config, tokenizers[domain])
            started = time.perf_counter()
            tokens[domain] += teacher.train_teacher(model, tokenizers[domain], config).tokens
            seconds[domain] += time.perf_counter() - started
    first = args.domains[0]
    for domain in args.domains:
        per_million = seconds[domain] / tokens[domain] * 1e6
        ratio = per_million / (seconds[first] / tokens[first] * 1e6)
        budget = teacher.default_config(domain).train_tokens / 1e6
        print(f"{domain}: tokenizer {tokenizer_seconds[domain]:.1f} s, training {per_million:.0f} s per M tokens "
              f"({budget:g}M tokens in a build), {ratio:.2f}x {first}'s per token", flush=True)


if __name__ == "__main__":
    main()
