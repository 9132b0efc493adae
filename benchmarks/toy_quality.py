"""Quality and Jacobi speed of the toy teachers on their held-out prompts.

Per domain: teacher size, build time, held-out answer loss (from the build record), three greedy
samples, task quality (math, chat: exact-answer accuracy; sql: execution accuracy and exact match; code:
pass@1, each output's tests run in the sandbox of `cllm.execution`), and
the teacher's Jacobi tokens-per-forward at n=16 next to greedy AR, with a token-for-token check.
Builds a missing teacher first (minutes). Run:

    python benchmarks/toy_quality.py                  # every domain
    python benchmarks/toy_quality.py --domain math --prompts 200
    python benchmarks/toy_quality.py --domain code --prompts 500
    python benchmarks/toy_quality.py --domain chat --prompts 500
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cllm import toy
from cllm.execution import CodeProblem, check_completions
from cllm.jacobi import ar_generate, jacobi_generate
from cllm.metrics import repetition_rate
from cllm.toy import tasks, teacher

MAX_NEW_TOKENS = {"math": 96, "code": 64, "sql": 64, "chat": 96}


def evaluate(model, tokenizer, domain: str, prompts: list[toy.ToyPrompt], max_new_tokens: int,
             n_token: int = 16, batch_size: int = 50) -> dict:
    """Greedy AR and Jacobi decoding of `prompts` in batches; quality, TPF and equality."""
    device = next(model.parameters()).device
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    ar_tokens, jacobi_tokens = [], []
    ar_forwards = jacobi_forwards = 0
    ar_seconds = jacobi_seconds = 0.0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        encoded = tokenizer([p.prompt for p in batch], return_tensors="pt", padding=True)
        ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
        began = time.perf_counter()
        ar = ar_generate(model, ids, mask, max_new_tokens=max_new_tokens, **special)
        ar_seconds += time.perf_counter() - began
        began = time.perf_counter()
        jacobi = jacobi_generate(model, ids, mask, n_token=n_token, max_new_tokens=max_new_tokens, **special)
        jacobi_seconds += time.perf_counter() - began
        ar_tokens += ar.new_tokens
        jacobi_tokens += jacobi.new_tokens
        ar_forwards += ar.stats.total.forwards
        jacobi_forwards += jacobi.stats.total.forwards
    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in ar_tokens]
    if domain == "code":
        problems = [CodeProblem(p.prompt_id, p.prompt, p.test, p.entry_point) for p in prompts]
        checks = [result.passed for result in check_completions(problems, texts)]
    else:
        checks = [tasks.check_answer(domain, text, p.answer, p.prompt) for text, p in zip(texts, prompts)]
    exact = [tasks.exact_match(domain, text, p.answer) for text, p in zip(texts, prompts)]
    generated = sum(len(tokens) for tokens in ar_tokens)
    return {
        "prompts": len(prompts),
        "accuracy": None if checks[0] is None else sum(map(bool, checks)) / len(checks),
        "exact_match": None if exact[0] is None else sum(map(bool, exact)) / len(exact),
        "repetition_rate": sum(repetition_rate(t) for t in ar_tokens) / len(ar_tokens),
        "reference_repetition_rate": sum(
            repetition_rate(tokenizer(p.answer, add_special_tokens=False)["input_ids"]) for p in prompts
        ) / len(prompts),
        "mean_new_tokens": generated / len(prompts),
        "ended_with_eos": sum(t[-1] == tokenizer.eos_token_id for t in ar_tokens if t) / len(prompts),
        "ar_tpf": generated / ar_forwards,
        f"jacobi_tpf_n{n_token}": sum(len(t) for t in jacobi_tokens) / jacobi_forwards,
        "jacobi_rows_equal_to_ar": sum(a == j for a, j in zip(ar_tokens, jacobi_tokens)),
        "ar_tokens_per_second": generated / ar_seconds,
        "jacobi_tokens_per_second": sum(len(t) for t in jacobi_tokens) / jacobi_seconds,
        "samples": [
            {"prompt": p.prompt, "generated": text, "reference": p.answer}
            for p, text in list(zip(prompts, texts))[:3]
        ],
    }


def report(domain: str, prompts: int, max_new_tokens: int, cache_dir: str | None) -> dict:
    model, tokenizer = teacher.load_toy(domain, cache_dir=cache_dir)
    info = teacher.toy_build_info(domain, cache_dir) or {}
    training = info.get("training", {})
    heldout = tasks.toy_prompts("heldout", domain, limit=prompts)
    with torch.inference_mode():
        quality = evaluate(model, tokenizer, domain, heldout, max_new_tokens)
    return {
        "domain": domain,
        "parameters": info.get("parameters"),
        "train_tokens": training.get("tokens"),
        "build_seconds": info.get("build_seconds"),
        "train_seconds": training.get("seconds"),
        "train_cpu_seconds": training.get("cpu_seconds"),
        "heldout_answer_loss": info.get("heldout_answer_loss"),
        "build_device": info.get("device"),
        **quality,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", choices=toy.DOMAINS, action="append",
                        help="repeatable; default: every domain")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts per domain")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=None,
                        help="toy cache root (default: $CLLM_CACHE or ~/.cache/cllm)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for domain in args.domain or toy.DOMAINS:
        result = report(domain, args.prompts, args.max_new_tokens or MAX_NEW_TOKENS[domain], args.cache_dir)
        samples = result.pop("samples")
        print(json.dumps(result, indent=2), flush=True)
        for sample in samples:
            print(f"--- {domain} held-out sample\n[prompt]\n{sample['prompt']}\n[greedy]\n"
                  f"{sample['generated']}\n[reference]\n{sample['reference']}", flush=True)


if __name__ == "__main__":
    main()
