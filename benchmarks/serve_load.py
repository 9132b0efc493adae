"""Load test of the Serve application over HTTP with the official `openai` client: tokens/s, time to
first token (TTFT) and latency percentiles, errors, tokens per forward, and whether every greedy
reply equals the same request sent alone.

Two kinds of load, each streamed (TTFT is the first text chunk):
- closed loop, `--concurrency C`: C clients, each sending its next request when the last is done;
- open loop, `--arrival-rate R`: requests arrive as a Poisson process of R per second.
`--max-tokens-range 16 256` gives each request its own max_tokens (the same ones for every
deployment). By default it starts a local Ray + Serve and measures, one after the other on the
same requests, continuous vs dynamic batching and Jacobi vs AR decoding, for every `--model`; the
deployments run side by side and take turns in `--rounds` rounds, so that a shared machine's slow
spells hit them alike:

    python benchmarks/serve_load.py                                        # tiny random model
    python benchmarks/serve_load.py --model teacher=toy --model cllm=runs/demo/cllm/hf \\
        --concurrency 1 8 --arrival-rate 4 --max-tokens-range 16 256 --requests 64
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key $CLLM_API_KEY  # a running server
    python benchmarks/serve_load.py --in-process ...   # the decoder class itself: no Ray, no HTTP

Prompts are the toy domain's held-out prompts for toy models, else random token ids, unless
--prompts-file gives one prompt per line. The tiny random model has no EOS, so every request
generates exactly its max_tokens; a random model gains nothing from Jacobi decoding (TPF about 1),
so there its Jacobi-vs-AR ratio only shows the cost of the block; the scheduling ratios are the
point there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import openai

from cllm.toy import parse_toy_name
from cllm.toy.tasks import toy_prompts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import free_port, save_tiny_checkpoint  # noqa: E402  (tests/helpers.py)

# What serve/config.yaml turns on for GPUs (cllm.drafts): recycled n-grams and a second block.
DRAFTING = {"recycle_candidates": 2, "recycle_length": 4, "blocks_in_flight": 2}


@dataclass(frozen=True)
class Deployment:
    label: str
    mode: str
    scheduler: str
    max_batch_size: int = 8
    drafting: bool = False  # DRAFTING on, or the paper's rule

    @property
    def settings(self) -> dict:
        """The decoder's settings that make this deployment what its label says."""
        return {"mode": self.mode, "scheduler": self.scheduler, "max_batch_size": self.max_batch_size,
                **(DRAFTING if self.drafting else {})}


DEPLOYMENTS = {
    deployment.label: deployment
    for deployment in (
        Deployment("jacobi, continuous", "jacobi", "continuous"),
        Deployment("jacobi, dynamic", "jacobi", "dynamic"),
        Deployment("ar, continuous", "ar", "continuous"),
        Deployment("ar, dynamic", "ar", "dynamic"),
        Deployment("jacobi, no batching", "jacobi", "dynamic", 1),
        Deployment("jacobi + drafting, continuous", "jacobi", "continuous", drafting=True),
    )
}


@dataclass(frozen=True)
class LoadRequest:
    prompt: str | list[int]
    max_tokens: int
    seed: int


@dataclass
class LoadResult:
    model: str
    label: str
    load: str  # "C=8" or "R=4/s"
    requests: int
    errors: int = 0
    first_error: str = ""  # what the first failed request said, so that errors explain themselves
    wall_s: float = 0.0
    completion_tokens: int = 0
    forwards: int = 0
    ttft_s: list[float] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    texts: dict[int, str] = field(default_factory=dict)
    mismatches: int | None = None  # greedy replies that differ from the request sent alone
    model_forwards: int = 0  # the decoder's forwards during the load (0: unknown)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.completion_tokens / self.forwards if self.forwards else 0.0

    @property
    def rows_per_forward(self) -> float:
        """Mean batch occupancy: the requests' forwards over the model's forwards."""
        return self.forwards / self.model_forwards if self.model_forwards else float("nan")

    def summary(self) -> dict:
        return {
            "model": self.model,
            "label": self.label,
            "load": self.load,
            "requests": self.requests,
            "errors": self.errors,
            "first_error": self.first_error,
            "mismatches": self.mismatches,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "ttft_p50_ms": round(percentile_ms(self.ttft_s, 0.5), 1),
            "ttft_p99_ms": round(percentile_ms(self.ttft_s, 0.99), 1),
            "latency_p50_ms": round(percentile_ms(self.latencies_s, 0.5), 1),
            "latency_p99_ms": round(percentile_ms(self.latencies_s, 0.99), 1),
            "tokens_per_forward": round(self.tokens_per_forward, 3),
            "rows_per_forward": round(self.rows_per_forward, 2),
        }


def percentile_ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def send(client, model: str, request: LoadRequest, temperature: float,
               n_token: int | None, result: LoadResult, index: int) -> None:
    """One streamed request, over HTTP (`client` is an `openai.AsyncOpenAI`) or to a `Decoder`
    object in this process; records its TTFT, latency, text and usage into `result`."""
    started = time.perf_counter()
    text, first, tokens, forwards = "", None, 0, 0
    try:
        if isinstance(client, openai.AsyncOpenAI):
            stream = await client.completions.create(
                model=model, prompt=request.prompt, max_tokens=request.max_tokens, temperature=temperature,
                seed=request.seed, stream=True, stream_options={"include_usage": True},
                extra_body={"n_token": n_token} if n_token else None,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    first = first if first is not None else time.perf_counter() - started
                    text += chunk.choices[0].text
                if chunk.usage is not None:
                    tokens, forwards = chunk.usage.completion_tokens, getattr(chunk.usage, "forwards", 0) or 0
        else:
            from cllm_serve.batching import Failed, Finished, Rejected, TextDelta
            from cllm_serve.decoder import DecodeRequest
            from cllm_serve.openai_api import DecodeParams

            prompt = request.prompt if isinstance(request.prompt, str) else tuple(request.prompt)
            params = DecodeParams(max_tokens=request.max_tokens, n_token=n_token, temperature=temperature,
                                  seed=request.seed)
            decode = DecodeRequest(prompts=(prompt,), params=params)
            async for event in client.generate(decode):
                if isinstance(event, TextDelta) and event.text:
                    first = first if first is not None else time.perf_counter() - started
                    text += event.text
                elif isinstance(event, Finished):
                    tokens, forwards = event.completion_tokens, event.forwards
                elif isinstance(event, (Rejected, Failed)):
                    raise RuntimeError(event.message)
    except (openai.APIError, RuntimeError) as error:
        result.errors += 1
        result.first_error = result.first_error or f"{type(error).__name__}: {error}"[:300]
        return
    result.latencies_s.append(time.perf_counter() - started)
    result.ttft_s.append(first if first is not None else result.latencies_s[-1])
    result.texts[index] = text
    result.completion_tokens += tokens
    result.forwards += forwards


async def closed_loop(client, model, requests, concurrency, temperature, n_token, result) -> None:
    """`concurrency` clients, each sending its next request when its last one is done; `requests`
    holds (index, request) pairs."""
    queue = list(requests)

    async def client_loop() -> None:
        while queue:
            index, request = queue.pop(0)
            await send(client, model, request, temperature, n_token, result, index)

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))


async def open_loop(client, model, requests, rate, temperature, n_token, result, seed) -> None:
    """(index, request) pairs arrive as a Poisson process of `rate` per second, whatever is still
    running."""
    rng = random.Random(seed)
    arrivals, at = [], 0.0
    for _ in requests:
        arrivals.append(at)
        at += rng.expovariate(rate)
    started = time.perf_counter()

    async def arrive(index: int, request: LoadRequest, arrival: float) -> None:
        await asyncio.sleep(max(0.0, started + arrival - time.perf_counter()))
        await send(client, model, request, temperature, n_token, result, index)

    await asyncio.gather(*(arrive(i, request, arrival) for (i, request), arrival in zip(requests, arrivals)))


def measure(targets: list[tuple], api_key: str, model_name: str, shown_as: str, args,
            requests: list[LoadRequest]) -> list[LoadResult]:
    """Every load of `args` on every (label, base URL or decoder[, forwards probe]) target; the
    probe, when given, is an async function returning the decoder's model forwards so far. The
    requests are split into
    `args.rounds` rounds, and the targets take turns round by round, so that a shared machine's
    slow spells hit them alike."""
    rounds = [list(range(len(requests)))[start::args.rounds] for start in range(args.rounds)]

    async def all_loads() -> list[LoadResult]:
        clients = {label: openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=900)
                   if isinstance(base, str) else base for label, base, *_ in targets}
        probes = {label: probe[0] if probe else None for label, _, *probe in targets}
        for client in clients.values():  # one request each first, so warm-up is not in the figures
            await send(client, model_name, requests[0], args.temperature, args.n_token,
                       LoadResult(model_name, "warm-up", "", 1), 0)
        loads = [("C", c) for c in args.concurrency] + [("R", r) for r in args.arrival_rate]
        results = []
        for kind, value in loads:
            name = f"C={value}" if kind == "C" else f"R={value:g}/s"
            by_label = {label: LoadResult(shown_as, label, name, len(requests)) for label, *_ in targets}
            for number, chosen in enumerate(rounds):
                for label, client in clients.items():
                    result, part = by_label[label], [(i, requests[i]) for i in chosen]
                    forwards_before = await probes[label]() if probes[label] else 0
                    started = time.perf_counter()
                    if kind == "C":
                        await closed_loop(client, model_name, part, value, args.temperature, args.n_token, result)
                    else:
                        await open_loop(client, model_name, part, value, args.temperature, args.n_token, result,
                                        args.seed + number)
                    result.wall_s += time.perf_counter() - started
                    if probes[label]:
                        result.model_forwards += await probes[label]() - forwards_before
            for result in by_label.values():
                first_error = f" (first: {result.first_error})" if result.errors else ""
                print(f"{shown_as} {result.label} {name}: {result.tokens_per_s:.1f} tokens/s, "
                      f"{result.errors} errors{first_error}", flush=True)
            results += by_label.values()
        for client in clients.values():
            if isinstance(client, openai.AsyncOpenAI):
                await client.close()
        return results

    return asyncio.run(all_loads())


def alone_texts(target, api_key: str, model_name: str, args, requests) -> dict[int, str]:
    """Each request sent alone, one after the other: the greedy reference of the load runs."""
    async def sequential() -> dict[int, str]:
        client = (openai.AsyncOpenAI(base_url=f"{target}/v1", api_key=api_key, max_retries=0, timeout=900)
                  if isinstance(target, str) else target)
        result = LoadResult(model_name, "alone", "C=1", len(requests))
        for index, request in enumerate(requests):
            await send(client, model_name, request, 0.0, args.n_token, result, index)
        if isinstance(client, openai.AsyncOpenAI):
            await client.close()
        return result.texts

    return asyncio.run(sequential())


def random_prompts(count: int, vocab_size: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids from 3 up: the low ids of small vocabularies are usually special tokens.
    return [[rng.randrange(3, vocab_size) for _ in range(length)] for _ in range(count)]


def load_requests(args, model: str) -> list[LoadRequest]:
    prompts: list[str | list[int]]
    if args.prompts_file:
        lines = [line for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        prompts = [lines[i % len(lines)] for i in range(args.requests)]
    elif parse_toy_name(model) is not None or args.toy_prompts:  # the toy domain's held-out prompts
        domain = parse_toy_name(args.toy_prompts or model).domain
        prompts = [example.prompt for example in toy_prompts("heldout", domain, limit=args.requests)]
    else:
        prompts = random_prompts(args.requests, args.vocab_size, args.prompt_tokens, args.seed)
    rng = random.Random(args.seed)
    low, high = args.max_tokens_range or (args.max_tokens, args.max_tokens)
    return [LoadRequest(prompt, rng.randint(low, high), seed=index) for index, prompt in enumerate(prompts)]


def measure_local(args) -> list[LoadResult]:
    """Start Ray + Serve here and measure every deployment of every model: one model's
    deployments run side by side as separate applications (idle replicas cost nothing) and take
    turns on the same requests."""
    import ray
    from ray import serve

    from cllm_serve.app import BuilderArgs, build_app

    workdir = tempfile.TemporaryDirectory()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # address="local": a new Ray here, never one that happens to run on this machine already.
    ray.init(address="local", num_cpus=max(args.num_cpus, 2 * len(args.deployments)),
             object_store_memory=100 * 1024 * 1024, include_dashboard=False)
    results: list[LoadResult] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, model in args.models:
            if model == "tiny":
                model = str(Path(workdir.name) / "tiny")
                save_tiny_checkpoint(model, with_eos=False)  # requests run to max_tokens
            requests = load_requests(args, model)
            targets = []
            for number, label in enumerate(args.deployments):
                deployment = DEPLOYMENTS[label]
                app = build_app(BuilderArgs(
                    model=model, served_model_name="bench", **deployment.settings, num_cpus=1,
                    num_gpus=args.num_gpus, max_ongoing_requests=max(64, len(requests)), max_queued_requests=-1,
                ))
                serve.run(app, name=f"bench{number}", route_prefix=f"/bench{number}")
                handle = serve.get_deployment_handle("Decoder", app_name=f"bench{number}")
                targets.append((label, f"{url}/bench{number}", _forwards_probe(handle)))
            reference = None
            if args.temperature == 0 and args.check_alone:
                reference = alone_texts(targets[0][1], "unused", "bench", args, requests)
            for result in measure(targets, "unused", "bench", name, args, requests):
                if reference is not None:
                    result.mismatches = sum(text != reference.get(i) for i, text in result.texts.items())
                results.append(result)
            for number in range(len(args.deployments)):
                serve.delete(f"bench{number}")
    finally:
        serve.shutdown()
        ray.shutdown()
        workdir.cleanup()
    return results


def _forwards_probe(handle):
    """The model forwards of the replica behind `handle` (one replica: the benchmark's apps)."""
    async def probe() -> int:
        return (await handle.load.remote()).forwards

    return probe


def _in_process_probe(decoder):
    async def probe() -> int:
        return decoder.load().forwards

    return probe


def measure_in_process(args) -> list[LoadResult]:
    """The same loads on the decoder deployment's class itself, in this process: no Ray, no HTTP,
    so the figures show the engine and its scheduler without the serving path's overhead."""
    import torch

    from cllm_serve.decoder import Decoder, DecoderSettings

    torch.set_num_threads(1)
    workdir = tempfile.TemporaryDirectory()
    results: list[LoadResult] = []
    try:
        for name, model in args.models:
            if model == "tiny":
                model = str(Path(workdir.name) / "tiny")
                save_tiny_checkpoint(model, with_eos=False)  # requests run to max_tokens
            requests = load_requests(args, model)
            decoders = []
            for label in args.deployments:
                deployment = DEPLOYMENTS[label]
                settings = DecoderSettings(model=model, **deployment.settings)
                decoder = Decoder.func_or_class(settings)
                decoders.append((label, decoder, _in_process_probe(decoder)))
            reference = None
            if args.temperature == 0 and args.check_alone:
                reference = alone_texts(decoders[0][1], "", name, args, requests)
            for result in measure(decoders, "", name, name, args, requests):
                if reference is not None:
                    result.mismatches = sum(text != reference.get(i) for i, text in result.texts.items())
                results.append(result)
            for _, decoder, _ in decoders:
                decoder.__del__()
    finally:
        workdir.cleanup()
    return results


def ratio(top: float, bottom: float) -> str:
    return f"{top / bottom:.2f}x" if bottom else "n/a"


def print_report(results: list[LoadResult]) -> None:
    header = (f"{'model':<8}{'deployment':<21}{'load':>8}{'reqs':>6}{'err':>5}{'diff':>6}{'tok/s':>9}"
              f"{'TTFT p50':>10}{'TTFT p99':>10}{'lat p50':>9}{'lat p99':>9}{'TPF':>6}{'rows/fwd':>9}")
    print(header)
    print("-" * len(header))
    for result in results:
        row = result.summary()
        diff = "-" if row["mismatches"] is None else str(row["mismatches"])
        print(f"{row['model']:<8}{row['label']:<21}{row['load']:>8}{row['requests']:>6}{row['errors']:>5}{diff:>6}"
              f"{row['tokens_per_s']:>9.1f}{row['ttft_p50_ms']:>10.0f}{row['ttft_p99_ms']:>10.0f}"
              f"{row['latency_p50_ms']:>9.0f}{row['latency_p99_ms']:>9.0f}{row['tokens_per_forward']:>6.2f}"
              f"{row['rows_per_forward']:>9.2f}")
    by_key = {(r.model, r.label, r.load): r for r in results}
    for model, label, load in sorted(by_key):
        for mode in ("jacobi", "ar"):
            if label == f"{mode}, continuous" and (model, f"{mode}, dynamic", load) in by_key:
                cont, dyn = by_key[model, label, load], by_key[model, f"{mode}, dynamic", load]
                ttft = ratio(percentile_ms(dyn.ttft_s, 0.99), percentile_ms(cont.ttft_s, 0.99))
                latency = ratio(percentile_ms(dyn.latencies_s, 0.99), percentile_ms(cont.latencies_s, 0.99))
                print(f"{model} {load} {mode}: continuous/dynamic tokens/s {ratio(cont.tokens_per_s, dyn.tokens_per_s)}"
                      f", rows per forward {ratio(cont.rows_per_forward, dyn.rows_per_forward)}"
                      f", p99 TTFT dynamic/continuous {ttft}, p99 latency dynamic/continuous {latency}")
        for scheduler in ("continuous", "dynamic"):
            if label == f"jacobi, {scheduler}" and (model, f"ar, {scheduler}", load) in by_key:
                jacobi, ar = by_key[model, label, load], by_key[model, f"ar, {scheduler}", load]
                print(f"{model} {load} {scheduler}: jacobi/ar tokens/s {ratio(jacobi.tokens_per_s, ar.tokens_per_s)}"
                      f" (TPF {jacobi.tokens_per_forward:.2f} vs {ar.tokens_per_forward:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None,
                        help="[name=]tiny (random, built here), toy, a directory or a hub id; repeat to compare")
    parser.add_argument("--deployments", nargs="+", choices=list(DEPLOYMENTS),
                        default=["jacobi, continuous", "jacobi, dynamic", "ar, continuous", "ar, dynamic"])
    parser.add_argument("--url", help="measure this running server instead of starting deployments here")
    parser.add_argument("--in-process", action="store_true",
                        help="drive the decoder deployment's class here, without Ray or HTTP")
    parser.add_argument("--api-key", default="unused", help="bearer key for --url (CLLM_API_KEY of the server)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="the deployments take turns on this many parts")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 8], help="closed-loop clients")
    parser.add_argument("--arrival-rate", type=float, nargs="*", default=[], help="Poisson arrivals per second")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-tokens-range", type=int, nargs=2, metavar=("LOW", "HIGH"),
                        help="each request's max_tokens drawn uniformly from [LOW, HIGH]")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0: sampling, seeded per request")
    parser.add_argument("--n-token", type=int, default=None, help="Jacobi block size (default: the server's)")
    parser.add_argument("--no-check-alone", dest="check_alone", action="store_false",
                        help="skip comparing greedy replies with each request sent alone")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="length of the random prompts")
    parser.add_argument("--prompts-file", help="one prompt per line, used in turn")
    parser.add_argument("--toy-prompts", help="use this toy domain's held-out prompts (e.g. toy-math)")
    parser.add_argument("--vocab-size", type=int, default=128, help="for random prompts")
    parser.add_argument("--num-cpus", type=int, default=2, help="logical CPUs of the local Ray")
    parser.add_argument("--num-gpus", type=float, default=None, help="per decoder replica (default: auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    specs = args.model or ["tiny"]
    args.models = [tuple(spec.split("=", 1)) if "=" in spec else (spec, spec) for spec in specs]

    if args.url:
        served = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key).models.list().data[0].id
        results = measure([(served, args.url)], args.api_key, served, args.models[0][0], args,
                          load_requests(args, args.models[0][1]))
    elif args.in_process:
        results = measure_in_process(args)
    else:
        results = measure_local(args)
    print_report(results)
    if args.out:
        Path(args.out).write_text(
            json.dumps([result.summary() | {"raw": asdict(result)} for result in results], indent=2)
        )


if __name__ == "__main__":
    main()
