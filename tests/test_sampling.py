"""Lossless sampling: Jacobi sampling draws sequences from exactly the AR distribution.

On a tiny model with a 6-token vocabulary, the probability of every 3-token continuation is
enumerated by plain forward passes (temperature, top-k and top-p applied as the sampler applies
them). Thousands of sampled continuations must fit it by a chi-square test, while a deliberately
broken acceptance rule (accept every draft) must fail the same test.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from cllm import SamplingParams, ar_generate, jacobi_generate, sampling, tiny_model
from cllm.drafts import PAPER, DecodingOptions

VOCAB = 6
LENGTH = 3
PROMPT = [1, 4, 2, 5, 0]
SAMPLES = 6000
P_VALUE_FLOOR = 1e-4  # a correct sampler passes this with probability 0.9999


@pytest.fixture(scope="module")
def model():
    # A narrow init keeps the distributions broad, so that drafts really get rejected.
    return tiny_model("llama", vocab_size=VOCAB, seed=5, initializer_range=0.05)


@torch.inference_mode()
def exact_distribution(model, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(y1 y2 y3 | prompt) for every continuation, from one forward per prefix length."""
    probabilities = {(): 1.0}
    for _ in range(LENGTH):
        prefixes = list(probabilities)
        batch = torch.tensor([PROMPT + list(prefix) for prefix in prefixes])
        logits = model(input_ids=batch).logits[:, -1:]
        nexts = sampling.target_probs(logits, [params] * len(prefixes))[:, 0].tolist()
        probabilities = {
            prefix + (token,): probabilities[prefix] * nexts[row][token]
            for row, prefix in enumerate(prefixes)
            for token in range(VOCAB)
        }
    return probabilities


def chi_square_p_value(samples: list[list[int]], exact: dict[tuple[int, ...], float]) -> float:
    """Goodness of fit of the samples to `exact`, pooling outcomes expected fewer than 5 times."""
    counts = Counter(tuple(sample) for sample in samples)
    assert sum(counts.values()) == len(samples) and all(len(key) == LENGTH for key in counts)
    observed, expected = [], []
    pooled_observed = pooled_expected = 0.0
    for outcome, probability in exact.items():
        if probability * len(samples) >= 5:
            observed.append(counts[outcome])
            expected.append(probability * len(samples))
        else:
            pooled_observed += counts[outcome]
            pooled_expected += probability * len(samples)
    if pooled_expected > 0:
        observed.append(pooled_observed)
        expected.append(pooled_expected)
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    degrees = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(degrees / 2), torch.tensor(statistic / 2)))


def sampled(model, params: SamplingParams, n_token: int, decoding: DecodingOptions = PAPER) -> list[list[int]]:
    prompts = torch.tensor([PROMPT] * SAMPLES)
    return jacobi_generate(
        model, prompts, n_token=n_token, max_new_tokens=LENGTH, sampling=params, decoding=decoding
    ).new_tokens


SETTINGS = [
    SamplingParams(temperature=1.0, seed=0),
    SamplingParams(temperature=0.8, top_k=4, top_p=0.9, seed=1),
]


@pytest.mark.parametrize("params", SETTINGS, ids=["t1", "t0.8-topk4-topp0.9"])
@pytest.mark.parametrize("n_token", [3, 2])
def test_jacobi_sampling_matches_exact_ar_probabilities(model, params, n_token):
    exact = exact_distribution(model, params)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-5)
    output = sampled(model, params, n_token)
    assert chi_square_p_value(output, exact) > P_VALUE_FLOOR


def test_the_test_catches_a_broken_acceptance_rule(model, monkeypatch):
    """Always accepting the drafts (here: the prompt-token guesses and stale redrafts) keeps the
    speed-up but not the distribution, and the chi-square test sees it."""
    params = SETTINGS[0]
    exact = exact_distribution(model, params)
    monkeypatch.setattr(sampling, "accept_drafts", lambda p, q, u, counts: counts)
    assert chi_square_p_value(sampled(model, params, 3), exact) < 1e-12


DRAFTING = {
    "lookup": DecodingOptions(lookup=True),
    "recycle": DecodingOptions(recycle_candidates=2, recycle_length=2),
    "two-blocks": DecodingOptions(blocks_in_flight=2, next_block_share=0.5),
}


@pytest.mark.parametrize("name", list(DRAFTING))
def test_each_drafting_option_samples_exactly_ar(model, name):
    """Guesses from the text, recycled n-grams and a second block are drafts like any other: the
    speculative rule keeps the AR distribution (n_token 2, so 3 tokens span two blocks)."""
    params = SETTINGS[0]
    output = sampled(model, params, 2, DRAFTING[name])
    assert chi_square_p_value(output, exact_distribution(model, params)) > P_VALUE_FLOOR


@pytest.mark.parametrize("name", list(DRAFTING))
def test_the_test_catches_a_broken_rule_under_each_option(model, monkeypatch, name):
    """The same test has the power to see a broken acceptance rule with each option's drafts."""
    params = SETTINGS[0]
    monkeypatch.setattr(sampling, "accept_drafts", lambda p, q, u, counts: counts)
    output = sampled(model, params, 2, DRAFTING[name])
    assert chi_square_p_value(output, exact_distribution(model, params)) < 1e-12


def test_the_rejection_path_is_exercised(model):
    """The drafts really get judged: many are rejected, and redrafted tokens get accepted later."""
    prompts = torch.tensor([PROMPT] * 200)
    output = jacobi_generate(model, prompts, n_token=3, max_new_tokens=LENGTH, sampling=SETTINGS[0])
    iterations = [count for row in output.stats.rows for count in row.iterations_per_block]
    assert 1.5 < sum(iterations) / len(iterations) < 3  # neither all accepted nor all rejected


def test_ar_sampling_matches_the_same_distribution(model):
    params = SETTINGS[0]
    output = ar_generate(model, torch.tensor([PROMPT] * SAMPLES), max_new_tokens=LENGTH, sampling=params)
    assert chi_square_p_value(output.new_tokens, exact_distribution(model, params)) > P_VALUE_FLOOR


def test_same_seed_same_text_and_temperature_zero_is_greedy():
    model = tiny_model("gpt2", vocab_size=128, seed=0)
    prompts = torch.tensor([[5, 17, 42, 8], [99, 3, 64, 1]])
    warm = SamplingParams(temperature=0.9, top_p=0.95, seed=123)

    def run(params, rows=prompts, n_token=8):
        return jacobi_generate(model, rows, n_token=n_token, max_new_tokens=30, sampling=params).new_tokens

    first = run(warm)
    assert run(warm) == first
    assert run(SamplingParams(temperature=0.9, top_p=0.95, seed=124)) != first
    # A row's draws depend on its seed only, not on the batch it shares.
    alone = jacobi_generate(model, prompts[:1], n_token=8, max_new_tokens=30, sampling=warm).new_tokens
    assert alone[0] == first[0]
    greedy = ar_generate(model, prompts, max_new_tokens=30).new_tokens
    assert run(SamplingParams(temperature=0.0, seed=7)) == greedy
    assert run(SamplingParams(temperature=0.9, top_k=1, seed=7)) == greedy


def test_sampling_parameters_are_validated():
    for bad in (dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_counter_based_uniforms_are_uniform_and_keyed():
    keys = sampling.random_keys(list(range(500)), [3] * 500, torch.device("cpu"))
    draws = sampling.uniforms(keys, 64)
    u = draws[:, sampling.ACCEPT_STREAM]
    assert draws.shape == (500, 2, 64) and 0 < draws.min() and draws.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    histogram = torch.histc(u.float(), bins=10, min=0, max=1)
    assert (histogram - 3200).abs().max() < 250  # 32,000 draws in ten equal bins
    assert not torch.equal(u, draws[:, sampling.DRAW_STREAM])
    assert abs(torch.corrcoef(torch.stack([u.flatten(), draws[:, 1].flatten()]))[0, 1].item()) < 0.03
    again = sampling.uniforms(sampling.random_keys([7], [3], torch.device("cpu")), 64)
    assert torch.equal(again[0], draws[7])
    narrower = sampling.uniforms(sampling.random_keys([7], [3], torch.device("cpu")), 16)
    assert torch.equal(narrower[0], draws[7, :, :16])  # a row's draws do not depend on the batch's width
    next_step = sampling.uniforms(sampling.random_keys([7], [4], torch.device("cpu")), 64)
    assert not torch.equal(next_step[0], draws[7])
    pairs = list(itertools.combinations(range(5), 2))
    assert all(not torch.equal(u[a], u[b]) for a, b in pairs)
