"""GPU checks of `cllm` (no Ray needed): Jacobi == greedy AR on CUDA, and speed ratios in bf16.

1. Equality on CUDA for tiny random Llama, Qwen2, Mistral and GPT-2 models, batch 5 with mixed
   prompt lengths, n in {1, 4, 16}: exact in fp32, token match rate in bf16 (near-tied logits
   may flip an argmax in low precision, which changes the rest of that row).
2. Decoding speed on a larger random Llama in bf16: forward cost of a 16- and 64-token block
   relative to a 1-token step, and Jacobi/AR wall-clock ratios at batch 1 and 8.
3. The engine on a 7B-shaped random Llama in bf16 (benchmarks/engine_step.py): time per
   iteration over a bare forward of the same shape, and throughput at batch 1, 8 and 32, greedy
   and at temperature 0.7; and the cost of the wider forwards that drafting beyond the paper's
   rule feeds (n + recycled n-grams, two blocks) against n and against 1 token.

    python benchmarks/gpu_check.py            # all three
    python benchmarks/gpu_check.py engine     # only the engine check
"""

from __future__ import annotations

import sys
import time

import engine_step  # benchmarks/engine_step.py (this script's directory is on sys.path)
import torch

from cllm import SamplingParams, ar_generate, jacobi_generate, tiny_model
from cllm.cache import cache_kwargs, new_cache
from cllm.hf import TINY_ARCHITECTURES


def mixed_batch(vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    lengths = [12, 5, 9, 3, 7]
    input_ids = torch.randint(0, vocab, (5, 12), generator=generator)
    mask = torch.zeros(5, 12, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, 12 - length :] = 1
    return input_ids.to(device), mask.to(device)


def token_match_rate(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b)]
    return sum(x == y for x, y in pairs) / len(pairs)


def check_equality(device: torch.device) -> None:
    print("== equality on", torch.cuda.get_device_name(device))
    for arch in TINY_ARCHITECTURES:
        for dtype in (torch.float32, torch.bfloat16):
            model = tiny_model(arch, vocab_size=256, seed=0).to(device, dtype)
            input_ids, mask = mixed_batch(256, device)
            ar = ar_generate(model, input_ids, mask, max_new_tokens=40).new_tokens
            for n_token in (1, 4, 16):
                jacobi = jacobi_generate(model, input_ids, mask, n_token=n_token, max_new_tokens=40).new_tokens
                rate = token_match_rate(jacobi, ar)
                verdict = "EXACT" if jacobi == ar else f"match {rate:.3f}"
                print(f"{arch:8s} {str(dtype):15s} n={n_token:<3d} {verdict}")
                if dtype == torch.float32 and jacobi != ar:
                    raise SystemExit(f"fp32 mismatch for {arch} n={n_token}")


@torch.inference_mode()
def forward_cost(model, prompt_length: int, block: int, repeats: int = 20) -> float:
    device = model.device
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_length), device=device)
    cache = new_cache(model)
    model(input_ids=prompt, use_cache=True, **cache_kwargs(model, cache))
    step = torch.randint(0, model.config.vocab_size, (1, block), device=device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        model(input_ids=step, use_cache=True, **cache_kwargs(model, cache))
        cache.crop(-block)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def check_speed(device: torch.device) -> None:
    print("== speed, random 1B-shaped Llama, bf16")
    model = tiny_model(
        "llama", vocab_size=32000, seed=0, hidden_size=2048, intermediate_size=5504,
        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
        max_position_embeddings=2048,
    ).to(device, torch.bfloat16)
    one = forward_cost(model, 512, 1)
    for block in (16, 64):
        print(f"forward of {block} tokens / 1 token: {forward_cost(model, 512, block) / one:.2f}x")
    for batch in (1, 8):
        prompts = torch.randint(0, 32000, (batch, 64), device=device)
        ar_generate(model, prompts, max_new_tokens=16)  # warm-up
        times = {}
        for name, run in (
            ("ar", lambda prompts=prompts: ar_generate(model, prompts, max_new_tokens=128)),
            ("jacobi", lambda prompts=prompts: jacobi_generate(model, prompts, n_token=16, max_new_tokens=128)),
        ):
            torch.cuda.synchronize()
            start = time.perf_counter()
            output = run()
            torch.cuda.synchronize()
            times[name] = (time.perf_counter() - start, output.stats.total.tokens_per_forward)
        (ar_time, _), (jacobi_time, tpf) = times["ar"], times["jacobi"]
        print(f"batch {batch}: Jacobi TPF {tpf:.2f}, Jacobi/AR wall-clock speedup {ar_time / jacobi_time:.2f}x")


def check_engine(device: torch.device) -> None:
    """The engine's own cost on a 7B shape: built on the device in bf16 (no CPU init)."""
    with device:
        model = tiny_model(
            "llama", vocab_size=32000, seed=0, dtype=torch.bfloat16, hidden_size=4096, intermediate_size=11008,
            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
            initializer_range=0.02,
        )
    for temperature in (0.0, 0.7):
        sampling = SamplingParams(temperature=temperature)
        figures = [
            engine_step.measure(model, batch, n_token=16, prompt_tokens=256, steps=20, sampling=sampling)
            for batch in (1, 8, 32)
        ]
        engine_step.report(figures, f"engine, random 7B-shaped Llama, bf16, n = 16, temperature {temperature}")
    one, block = forward_cost(model, 512, 1), forward_cost(model, 512, 16)
    for width, what in ((24, "n + 2 n-grams of 4"), (32, "two blocks"), (40, "two blocks + 2 n-grams")):
        cost = forward_cost(model, 512, width)
        print(f"forward of {width} tokens ({what}): {cost / block:.2f}x a 16-token block, {cost / one:.2f}x 1 token")
    del model
    torch.cuda.empty_cache()


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    device = torch.device("cuda")
    if sys.argv[1:] == ["engine"]:
        check_engine(device)
        return
    check_equality(device)
    check_engine(device)
    check_speed(device)


if __name__ == "__main__":
    main()
