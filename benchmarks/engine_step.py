"""Engine overhead: time per engine iteration ÷ one bare forward of the same shape, and throughput.

The engine runs `--batch` rows of Jacobi decoding (greedy by default) and records each
iteration's time and shape (rows x fed tokens, keys attended). Two baselines of the same shapes,
in the same process:
- `in-step`: the model call inside the iteration (so the ratio is the engine's own bookkeeping:
  choosing tokens, masks, slots);
- `bare`: a plain Hugging Face forward of the same shape on a `DynamicCache` holding as many keys
  (cropped back after each call), what any cached decoder pays.

    python benchmarks/engine_step.py                               # tiny Llama, batch 8, n = 16
    python benchmarks/engine_step.py --batch 1 8 32 --temperature 0.7
    python benchmarks/engine_step.py --drafting recycle multi-block all   # each against the paper's rule

With `--drafting`, each variant's iteration is also timed against the paper's rule at the same
batch: the price of the wider forward (n-grams beside the window, a second block) on this device.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from cllm import Engine, RequestParams, SamplingParams, tiny_model
from cllm.cache import cache_kwargs, new_cache
from cllm.drafts import PAPER, DecodingOptions, variant


@dataclass
class StepFigures:
    batch: int
    step_ms: float
    forward_in_step_ms: float
    bare_forward_ms: float
    tokens_per_s: float
    tokens_per_forward: float

    @property
    def over_bare(self) -> float:
        return self.step_ms / self.bare_forward_ms

    @property
    def over_in_step(self) -> float:
        return self.step_ms / self.forward_in_step_ms


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BareForward:
    """A plain forward of `batch` x `width` new tokens over `keys` attended positions, on a
    `DynamicCache` cropped back after each call."""

    @torch.inference_mode()
    def __init__(self, model, batch: int, width: int, keys: int):
        self.model, self.width = model, width
        device, vocab = model.device, model.config.vocab_size
        self.cache = new_cache(model)
        prefix = torch.randint(0, vocab, (batch, keys - width), device=device)
        model(input_ids=prefix, use_cache=True, logits_to_keep=1, **cache_kwargs(model, self.cache))
        self.step = torch.randint(0, vocab, (batch, width), device=device)
        self.positions = torch.arange(keys - width, keys, device=device).expand(batch, -1)

    @torch.inference_mode()
    def __call__(self) -> None:
        self.model(input_ids=self.step, position_ids=self.positions, use_cache=True,
                   **cache_kwargs(self.model, self.cache))
        self.cache.crop(-self.width)


def _timed(call, device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    call()
    _sync(device)
    return time.perf_counter() - started


def measure(
    model, batch: int, n_token: int = 16, prompt_tokens: int = 64, steps: int = 40,
    sampling: SamplingParams | None = None, decoding: DecodingOptions = PAPER,
) -> StepFigures:
    """Figures of `steps` engine iterations at `batch` rows, each followed by a bare forward of
    the iterations' median shape, so that a shared machine's slow spells hit both alike."""
    sampling = sampling or SamplingParams()
    device, vocab = model.device, model.config.vocab_size
    engine = Engine(model, max_rows=batch)
    generator = torch.Generator().manual_seed(0)
    verified = [0]

    def count(new_ids, _logprobs):
        verified[0] += len(new_ids)

    for _ in range(batch):
        prompt = torch.randint(3, vocab, (prompt_tokens,), generator=generator).tolist()
        params = RequestParams(max_new_tokens=100_000, n_token=n_token, sampling=sampling, decoding=decoding)
        engine.add_request(prompt, params, count)
    shapes: list[tuple[int, int]] = []
    inside: list[float] = []

    def before(_module, _args, kwargs):
        if kwargs.get("attention_mask") is not None:  # the engine's forwards, not the bare ones
            shapes.append((kwargs["input_ids"].shape[1], kwargs["attention_mask"].shape[-1]))
            _sync(device)
            inside.append(-time.perf_counter())

    def after(_module, _args, kwargs, _output):
        if kwargs.get("attention_mask") is not None:
            _sync(device)
            inside[-1] += time.perf_counter()

    hooks = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        for _ in range(6):  # prefill and warm-up; their shapes size the bare forward
            engine.step()
        width, keys = (round(statistics.median(values)) for values in zip(*shapes[1:]))
        del shapes[:], inside[:]
        bare = BareForward(model, batch, width, keys + steps // 2)
        bare()
        tokens_before, forwards_before = verified[0], engine.forwards
        step_times, bare_times = [], []
        for _ in range(steps):
            step_times.append(_timed(engine.step, device))
            bare_times.append(_timed(bare, device))
    finally:
        for hook in hooks:
            hook.remove()
    generated = verified[0] - tokens_before
    return StepFigures(
        batch=batch,
        step_ms=1000 * statistics.median(step_times),
        forward_in_step_ms=1000 * statistics.median(inside[: len(step_times)]),
        bare_forward_ms=1000 * statistics.median(bare_times),
        tokens_per_s=generated / sum(step_times),
        tokens_per_forward=generated / ((engine.forwards - forwards_before) * batch),
    )


def report(figures: list[StepFigures], label: str) -> None:
    print(f"== {label}")
    print(f"{'batch':>6}{'step ms':>10}{'forward ms':>12}{'bare ms':>10}{'step/bare':>11}{'step/fwd':>10}"
          f"{'tok/s':>10}{'TPF':>7}")
    for f in figures:
        print(f"{f.batch:>6}{f.step_ms:>10.2f}{f.forward_in_step_ms:>12.2f}{f.bare_forward_ms:>10.2f}"
              f"{f.over_bare:>11.2f}{f.over_in_step:>10.2f}{f.tokens_per_s:>10.1f}{f.tokens_per_forward:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--n-token", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--drafting", nargs="*", default=[], metavar="VARIANT",
                        help="also time these drafting variants (names as in evaluate --drafting)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = tiny_model("llama", vocab_size=128, seed=0, max_position_embeddings=4096)
    sampling = SamplingParams(temperature=args.temperature)
    figures = [measure(model, batch, args.n_token, steps=args.steps, sampling=sampling) for batch in args.batch]
    report(figures, f"tiny Llama on CPU, n = {args.n_token}, temperature {args.temperature}")
    report_drafting(model, args, figures)


def report_drafting(model, args: argparse.Namespace, plain: list[StepFigures]) -> None:
    """Each variant's iteration time over the paper's rule's (measured just before, same batch)."""
    if not args.drafting:
        return
    everything = DecodingOptions(lookup=True, recycle_candidates=2, recycle_length=4, blocks_in_flight=2)
    sampling = SamplingParams(temperature=args.temperature)
    print("== drafting variants: iteration time over the paper's rule")
    for name in args.drafting:
        for base in plain:
            figures = measure(model, base.batch, args.n_token, steps=args.steps, sampling=sampling,
                              decoding=variant(name, everything))
            print(f"{name:>12} batch {base.batch:>3}: step {figures.step_ms:.2f} ms = "
                  f"{figures.step_ms / base.step_ms:.2f}x the paper's rule")


if __name__ == "__main__":
    main()
