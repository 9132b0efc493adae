"""Trajectory collection speed: our collector core vs a naive reference-style collector.

    python benchmarks/collect_vs_naive.py                       # toy teacher, toy:train prompts
    python benchmarks/collect_vs_naive.py --model tiny --limit 16   # a tiny random Llama

Ours is `cllm.trajectory.collect_trajectories`: batched, KV-cached Jacobi decoding. The naive
collector is written the way the reference implementation collects: one prompt at a time, no KV
cache, a full forward pass over prompt + block at every Jacobi iteration. It exists only here, as
the baseline, and must reach the same fixed points (asserted). Both run in one process on the
same model and prompts; the script prints the throughput ratio.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import torch

from cllm.hf import load_model, tiny_model
from cllm.prompts import load_prompts
from cllm.trajectory import CollectConfig, collect_trajectories


@dataclass
class Run:
    seconds: float
    outputs: dict[str, list[int]]  # prompt_id -> tokens covered by collected blocks
    blocks: int

    @property
    def tokens(self) -> int:
        return sum(len(tokens) for tokens in self.outputs.values())


def ours(model, tokenizer, prompts: list[dict], config: CollectConfig) -> Run:
    """Our collector on one batch."""
    started = time.perf_counter()
    rows = collect_trajectories(model, tokenizer, prompts, "bench", config).rows
    seconds = time.perf_counter() - started
    outputs: dict[str, list[int]] = {p["prompt_id"]: [] for p in prompts}
    for row in sorted(rows, key=lambda r: (r["prompt_id"], r["block_index"])):
        outputs[row["prompt_id"]] += row["states"][-1][: row["fixed_length"]]
    return Run(seconds, outputs, len(rows))


def merge(runs: list[Run]) -> Run:
    return Run(sum(r.seconds for r in runs), {k: v for r in runs for k, v in r.outputs.items()},
               sum(r.blocks for r in runs))


@torch.inference_mode()
def naive_trajectories(model, prompt_ids: list[int], n: int, max_new_tokens: int, eos: int | None,
                       rng: random.Random) -> tuple[list[int], list[list[list[int]]]]:
    """BENCHMARK BASELINE ONLY, the reference's way: batch 1, no KV cache, and every Jacobi
    iteration runs the model over the whole prompt + generated text + block."""
    generated: list[int] = []
    trajectories = []
    while len(generated) < max_new_tokens:
        block = [rng.choice(prompt_ids) for _ in range(n)]
        states = [block]
        context = prompt_ids + generated
        while True:
            logits = model(input_ids=torch.tensor([context + block])).logits[0]
            updated = logits[len(context) - 1 : len(context) - 1 + n].argmax(dim=-1).tolist()
            if updated == block:
                break
            block = updated
            states.append(block)
        trajectories.append(states)
        valid = min(n, max_new_tokens - len(generated))
        if eos is not None and eos in block[:valid]:
            valid = block.index(eos) + 1
            generated += block[:valid]
            break
        generated += block[:valid]
    return generated, trajectories


def naive(model, prompts: list[dict], config: CollectConfig, eos: int | None) -> Run:
    started = time.perf_counter()
    outputs, blocks = {}, 0
    for prompt in prompts:
        rng = random.Random(prompt["prompt_id"])
        tokens, trajectories = naive_trajectories(model, prompt["prompt_ids"], config.n_token,
                                                  config.max_new_tokens, eos, rng)
        outputs[prompt["prompt_id"]], blocks = tokens, blocks + len(trajectories)
    return Run(time.perf_counter() - started, outputs, blocks)


def load(args: argparse.Namespace):
    """(model, tokenizer, prompts) for the toy teacher or a tiny random Llama."""
    if args.model != "tiny":
        model, tokenizer = load_model(args.model, device="cpu")
        records, _ = load_prompts(args.prompts, tokenizer, limit=args.limit)
        return model, tokenizer, [{"prompt_id": r.prompt_id, "prompt_ids": r.prompt_ids} for r in records]
    model = tiny_model("llama", vocab_size=256, seed=0, hidden_size=128, intermediate_size=256,
                       num_hidden_layers=4)
    generator = random.Random(0)
    prompts = [{"prompt_id": f"p{i}", "prompt_ids": [generator.randrange(1, 256) for _ in range(48)]}
               for i in range(args.limit)]
    return model, _NoEosTokenizer(), prompts


class _NoEosTokenizer:
    """The tokenizer attributes the collector reads, for a random model with no EOS."""

    eos_token_id = None
    pad_token_id = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy", help="toy, toy-math, toy-code, a HF model, or tiny")
    parser.add_argument("--prompts", default="toy:train")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--n-token", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model, tokenizer, prompts = load(args)
    config = CollectConfig(n_token=args.n_token, max_new_tokens=args.max_new_tokens, min_loop_tokens=0)
    print(f"model {args.model}, {len(prompts)} prompts, n={args.n_token}, "
          f"max_new_tokens={args.max_new_tokens}, batch {args.batch_size}, {torch.get_num_threads()} threads")
    # Alternate the two collectors batch by batch, so a change in machine load hits both alike.
    fast_runs, slow_runs = [], []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        fast_runs.append(ours(model, tokenizer, batch, config))
        slow_runs.append(naive(model, batch, config, tokenizer.eos_token_id))
    fast, slow = merge(fast_runs), merge(slow_runs)

    for prompt_id, tokens in fast.outputs.items():
        reference = slow.outputs[prompt_id]
        # Ours has no row for a final block whose first (verified) token ended the output.
        assert reference[: len(tokens)] == tokens and len(reference) - len(tokens) in (0, 1), prompt_id
    for name, run in (("ours (batched, KV cache)", fast), ("naive (batch 1, no cache)", slow)):
        print(f"{name:28s} {run.seconds:8.2f} s  {run.blocks / run.seconds:8.2f} trajectories/s  "
              f"{run.tokens / run.seconds:8.1f} tokens/s  ({run.blocks} blocks, {run.tokens} tokens)")
    print("fixed points identical: yes")
    # Same prompts, same fixed points: the time ratio is the throughput ratio.
    print(f"throughput ratio (ours / naive): {slow.seconds / fast.seconds:.2f}x")


if __name__ == "__main__":
    main()
