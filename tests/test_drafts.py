"""Drafting beyond the paper's rule (`cllm.drafts`): n-gram lookup, recycled n-grams verified beside
the window, several blocks per forward. Each option, alone and combined, keeps every greedy row
exactly equal to greedy AR, under continuous batching with rows that join at different steps."""

from __future__ import annotations

import pytest
import torch
from helpers import hf_greedy

from cllm import Engine, RequestParams, jacobi_generate, pad_prompts, tiny_model
from cllm.drafts import PAPER, DecodingOptions, DraftPool, NgramIndex
from cllm.hf import TINY_ARCHITECTURES
from cllm.row import Row

VOCAB = 128
LOOKUP = DecodingOptions(lookup=True)
RECYCLE = DecodingOptions(recycle_candidates=3, recycle_length=4)
TWO_BLOCKS = DecodingOptions(blocks_in_flight=2, next_block_share=0.5)
ALL = DecodingOptions(lookup=True, recycle_candidates=3, recycle_length=4, blocks_in_flight=3, next_block_share=0.5)
OPTIONS = {"lookup": LOOKUP, "recycle": RECYCLE, "two-blocks": TWO_BLOCKS, "all": ALL}


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES)
def model(request):
    return tiny_model(request.param, vocab_size=VOCAB, seed=3)


def prompt_of(length: int, seed: int) -> list[int]:
    # Few distinct tokens: prompts repeat themselves, so lookups and pooled n-grams find matches.
    return torch.randint(0, 12, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    ids = torch.tensor([prompt])
    return hf_greedy(model, ids, torch.ones_like(ids), max_new_tokens, eos_token_id=eos)[0]


# -- the lookup and the pool -------------------------------------------------------------------


def test_the_longest_latest_match_wins():
    index = NgramIndex([5, 1, 2, 7, 9, 3, 2, 8, 4, 1, 2, 6])
    assert index.continuation([1, 2], 3) == [6]  # the latest "1 2" is followed by 6, then nothing
    assert index.continuation([3, 2], 3) == [8, 4, 1]  # "3 2" beats the later "2"
    assert index.continuation([0, 2], 2) == [6]  # no "0 2": the latest "2" it is
    assert index.continuation([6], 2) == []  # 6 ends the text: nothing followed it
    assert index.continuation([11], 2) == []
    index.extend([0])
    assert index.continuation([6], 2) == [0]


def test_the_pool_keeps_recent_distinct_ngrams_per_first_token():
    pool = DraftPool(length=2, per_key=2)
    pool.add([4, 1, 2, 3])
    assert pool.candidates(4) == [(1, 2)] and pool.candidates(2) == [(3,)] and pool.candidates(3) == []
    pool.add([4, 5, 6])
    pool.add([4, 1, 2])
    assert pool.candidates(4) == [(1, 2), (5, 6)]  # the repeat moved to the front, nothing doubled
    pool.add([4, 7])
    assert pool.candidates(4) == [(7,), (1, 2)]  # at most two per key, the oldest goes


def test_lookup_guesses_come_from_the_row_itself_and_fall_back_to_the_prompt():
    """A block's guesses continue the row's own text; where nothing matches, they are prompt
    tokens as the paper draws them. Another row's text is never looked up."""
    first, other = [3, 4, 5, 6, 3, 8, 9, 10], [20, 21, 22, 23, 24, 25, 26, 27]
    params = RequestParams(max_new_tokens=8, n_token=8, decoding=LOOKUP)
    rows = [Row(index, prompt, params, seed=index, pad_token_id=0, vocab_size=VOCAB)
            for index, prompt in enumerate((first, other))]
    for row in rows:
        row.start(3)  # 3 opens both blocks: only the first row's prompt has it
    assert rows[0].block == [3, 8, 9, 10] + rows[0].block[4:]  # the latest "3" is followed by 8 9 10
    assert set(rows[0].block[4:]) <= set(first)  # then the fallback: the paper's prompt draws
    assert set(rows[1].block[1:]) <= set(other)


def test_options_are_validated_and_trajectories_keep_the_paper_rule():
    for bad in ({"recycle_candidates": -1}, {"recycle_length": 0}, {"blocks_in_flight": 0},
                {"next_block_share": 0.0}, {"next_block_share": 1.5}):
        with pytest.raises(ValueError):
            DecodingOptions(**bad)
    with pytest.raises(ValueError, match="paper"):
        RequestParams(return_trajectories=True, decoding=LOOKUP)


# -- lossless ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIONS))
def test_greedy_equals_ar_for_rows_that_join_at_different_steps(model, name):
    """Five requests (n_token 4, 16, 1, 8, 3) on three slots, one joining mid-flight and two
    waiting for free slots; the last two stop at an EOS taken from inside their AR output, so the
    stop lands in a recycled n-gram or a second block as often as anywhere."""
    options = OPTIONS[name]
    specs = [(12, 4, 30, None), (5, 16, 40, None), (9, 1, 9, None), (3, 8, 25, 12), (7, 3, 33, 20)]
    requests = []
    for seed, (length, n_token, budget, eos_at) in enumerate(specs):
        prompt = prompt_of(length, seed)
        eos = reference(model, prompt, budget)[eos_at] if eos_at is not None else None
        requests.append((prompt, RequestParams(max_new_tokens=budget, n_token=n_token, decoding=options,
                                               eos_token_ids=frozenset({eos} if eos is not None else ())), eos))
    engine = Engine(model, max_rows=3)
    ids = [engine.add_request(prompt, params) for prompt, params, _ in requests[:2]]
    finished = {}
    for _ in range(3):
        finished.update((request.request_id, request) for request in engine.step())
    ids += [engine.add_request(prompt, params) for prompt, params, _ in requests[2:]]
    while engine.has_unfinished():
        finished.update((request.request_id, request) for request in engine.step())
    for request_id, (prompt, params, eos) in zip(ids, requests):
        assert finished[request_id].tokens == reference(model, prompt, params.max_new_tokens, eos), request_id


def test_each_option_really_drafts_differently(model):
    """The options change the work, not the text: the same greedy output, with recycled drafts
    taken and windows wider than a block fed."""
    prompts = [prompt_of(length, seed) for seed, length in enumerate((9, 14, 6))]
    input_ids, mask = pad_prompts(prompts, 0)
    widths: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        outputs = {name: jacobi_generate(model, input_ids, mask, n_token=4, max_new_tokens=40, decoding=options)
                   for name, options in {"paper": PAPER, **OPTIONS}.items()}
    finally:
        hook.remove()
    assert all(output.new_tokens == outputs["paper"].new_tokens for output in outputs.values())
    assert outputs["recycle"].stats.total.recycled > 0
    assert outputs["paper"].stats.total.recycled == 0
    assert max(widths) > 4 + 1  # a second block, or n-grams, rode along in some forward
