"""Load test of the Serve application: N completion requests at concurrency C, over HTTP with the
official `openai` client. Reports tokens/s, p50/p99 latency, errors and tokens per forward.

By default it starts a local Ray + Serve on loopback and measures, on the same model in one run,
Jacobi vs AR decoding and dynamic batching vs none (max_batch_size=1), at each concurrency:

    python benchmarks/serve_load.py                          # tiny random model, C = 1 and 8
    python benchmarks/serve_load.py --model toy --requests 64 --concurrency 1 8 32
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key $CLLM_API_KEY   # a running server

Prompts are the toy domain's held-out prompts for `--model toy*`, else random token ids (any
model takes them), unless --prompts-file gives one prompt per line. The tiny random model has no
EOS, so every request generates exactly --max-tokens; its tokens per forward stay near 1 (a random
model gains nothing from Jacobi decoding), so its Jacobi-vs-AR ratio only shows the cost of the
block; the batching ratio is the point there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import openai

from cllm.toy import parse_toy_name
from cllm.toy.tasks import toy_prompts


@dataclass(frozen=True)
class Deployment:
    label: str
    mode: str
    max_batch_size: int


DEPLOYMENTS = (
    Deployment("jacobi, batched", "jacobi", 8),
    Deployment("jacobi, no batching", "jacobi", 1),
    Deployment("ar, batched", "ar", 8),
    Deployment("ar, no batching", "ar", 1),
)


@dataclass
class LoadResult:
    label: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    completion_tokens: int
    forwards: int
    latencies_s: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.completion_tokens / self.forwards if self.forwards else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def summary(self) -> dict:
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "p50_ms": round(self.percentile_ms(0.5), 1),
            "p99_ms": round(self.percentile_ms(0.99), 1),
            "tokens_per_forward": round(self.tokens_per_forward, 3),
            "mean_latency_ms": round(1000 * statistics.fmean(self.latencies_s), 1)
            if self.latencies_s
            else None,
        }


async def run_load(
    client: openai.AsyncOpenAI,
    model: str,
    prompts: list[str | list[int]],
    concurrency: int,
    max_tokens: int,
    n_token: int | None,
    label: str,
) -> LoadResult:
    """Send every prompt once, at most `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)
    result = LoadResult(label, concurrency, len(prompts), 0, 0.0, 0, 0, [])
    extra = {"n_token": n_token} if n_token else None

    async def one(prompt: str | list[int]) -> None:
        async with gate:
            started = time.perf_counter()
            try:
                response = await client.completions.create(
                    model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra
                )
            except openai.APIError:
                result.errors += 1
                return
            result.latencies_s.append(time.perf_counter() - started)
            result.completion_tokens += response.usage.completion_tokens
            result.forwards += getattr(response.usage, "forwards", 0) or 0

    started = time.perf_counter()
    await asyncio.gather(*(one(prompt) for prompt in prompts))
    result.wall_s = time.perf_counter() - started
    return result


def random_prompts(count: int, vocab_size: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids from 3 up: the low ids of small vocabularies are usually special tokens.
    return [[rng.randrange(3, vocab_size) for _ in range(length)] for _ in range(count)]


def save_tiny_checkpoint(path: str, vocab_size: int = 128) -> None:
    """A tiny random Llama with a word-level tokenizer and no EOS (requests run to max_tokens)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    from cllm import tiny_model

    vocab = {"<unk>": 0, "<pad>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>").save_pretrained(
        path
    )
    tiny_model("llama", vocab_size=vocab_size, seed=0, max_position_embeddings=2048).save_pretrained(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(url: str, api_key: str, model: str, label: str, args, prompts) -> list[LoadResult]:
    async def all_concurrencies() -> list[LoadResult]:
        async with openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=600
        ) as client:
            # One request first, so model warm-up is not in the figures.
            await run_load(client, model, prompts[:1], 1, args.max_tokens, args.n_token, "warm-up")
            return [
                await run_load(client, model, prompts, concurrency, args.max_tokens, args.n_token, label)
                for concurrency in args.concurrency
            ]

    return asyncio.run(all_concurrencies())


def measure_local_deployments(args, prompts) -> list[LoadResult]:
    """Start Ray + Serve here and measure each deployment in turn, alone on the machine."""
    import ray
    from ray import serve

    from cllm_serve.app import BuilderArgs, build_app

    model = args.model
    workdir = tempfile.TemporaryDirectory()
    if model == "tiny":
        model = workdir.name
        save_tiny_checkpoint(model)
    port = free_port()
    # address="local": a new Ray here, never one that happens to run on this machine already.
    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        object_store_memory=100 * 1024 * 1024,
        include_dashboard=False,
    )
    results = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for deployment in DEPLOYMENTS:
            app = build_app(
                BuilderArgs(
                    model=model,
                    served_model_name="bench",
                    mode=deployment.mode,
                    max_batch_size=deployment.max_batch_size,
                    num_cpus=1,
                    num_gpus=args.num_gpus,
                    max_ongoing_requests=max(16, max(args.concurrency)),
                    max_queued_requests=-1,
                )
            )
            serve.run(app, name="bench", route_prefix="/")
            results += measure(f"http://127.0.0.1:{port}", "unused", "bench", deployment.label, args, prompts)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
        workdir.cleanup()
    return results


def print_report(results: list[LoadResult]) -> None:
    header = (
        f"{'deployment':<22}{'C':>4}{'reqs':>6}{'errors':>8}{'tok/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'TPF':>7}"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        row = result.summary()
        print(
            f"{row['label']:<22}{row['concurrency']:>4}{row['requests']:>6}{row['errors']:>8}"
            f"{row['tokens_per_s']:>9.1f}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['tokens_per_forward']:>7.2f}"
        )
    by_key = {(result.label, result.concurrency): result for result in results}
    concurrencies = sorted({result.concurrency for result in results})
    for concurrency in concurrencies:
        for name, top, bottom in (
            ("jacobi / ar (batched)", "jacobi, batched", "ar, batched"),
            ("batched / no batching (jacobi)", "jacobi, batched", "jacobi, no batching"),
            ("batched / no batching (ar)", "ar, batched", "ar, no batching"),
        ):
            if (top, concurrency) in by_key and (bottom, concurrency) in by_key:
                ratio = by_key[top, concurrency].tokens_per_s / max(
                    by_key[bottom, concurrency].tokens_per_s, 1e-9
                )
                print(f"C={concurrency:<3} tokens/s {name}: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny", help="tiny (random, built here), toy, a directory or a hub id"
    )
    parser.add_argument("--url", help="measure this running server instead of starting deployments here")
    parser.add_argument(
        "--api-key", default="unused", help="bearer key for --url (CLLM_API_KEY of the server)"
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--n-token", type=int, default=None, help="Jacobi block size (default: the server's)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="length of the random prompts")
    parser.add_argument("--prompts-file", help="one prompt per line, used in turn")
    parser.add_argument("--vocab-size", type=int, default=128, help="for random prompts")
    parser.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray")
    parser.add_argument("--num-gpus", type=float, default=None, help="per decoder replica (default: auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()

    prompts: list[str | list[int]]
    if args.prompts_file:
        lines = [line for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        prompts = [lines[i % len(lines)] for i in range(args.requests)]
    elif parse_toy_name(args.model) is not None:  # the teacher's own held-out task prompts
        domain = parse_toy_name(args.model).domain
        prompts = [example.prompt for example in toy_prompts("heldout", domain, limit=args.requests)]
    else:
        prompts = random_prompts(args.requests, args.vocab_size, args.prompt_tokens, args.seed)

    if args.url:
        served = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key).models.list().data[0].id
        results = measure(args.url, args.api_key, served, served, args, prompts)
    else:
        results = measure_local_deployments(args, prompts)
    print_report(results)
    if args.out:
        Path(args.out).write_text(
            json.dumps([result.summary() | {"raw": asdict(result)} for result in results], indent=2)
        )


if __name__ == "__main__":
    main()
