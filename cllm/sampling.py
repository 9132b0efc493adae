"""Sampling for the decoding engine: per-request parameters, the distribution they define, random
numbers that depend only on a request's own seed and progress, and the speculative rule that keeps
Jacobi sampling lossless.

The rule (speculative Jacobi decoding, arXiv 2410.01699; what vLLM's rejection sampler applies to
drafts): a draft token x at a block position was drawn from q, that position's distribution in the
previous iteration (a fixed guess counts as drawn from a one-hot q). With p, the distribution now
computed at that position on a verified prefix, x is accepted with probability min(1, p(x)/q(x)),
in order. The first rejected position instead takes a token drawn from normalize(max(0, p - q)),
and the positions after it are redrafted from the current p. Each verified token is therefore
distributed exactly as AR sampling from p would draw it. Temperature 0 never comes here: the
engine takes the argmax, which is exactly greedy decoding.

Random numbers are counter-based: uniform(seed, step, stream, position) is a hash. One batched op
draws for every row, and a request's draws never depend on what else shares its batch, so the
same seed gives the same text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch

_MASK32 = 0xFFFFFFFF
ACCEPT_STREAM, DRAW_STREAM = 0, 1  # the two streams of uniforms each iteration draws
STREAMS = 2


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 is greedy; top_k 0 and top_p 1 filter nothing."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no limit), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (raw logits, before temperature or
    filtering, as vLLM reports by default), with the `top` most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def target_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """(rows, positions, vocab) probabilities that row i samples from: softmax(logits / T), cut to
    the top_k likeliest tokens, then to the smallest set holding top_p of what is left (as
    Hugging Face's and vLLM's samplers order them). Every row's temperature must be > 0."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device, dtype=torch.float32)
    scaled = logits.float() / temperature[:, None, None]
    if not any(p.top_k or p.top_p < 1 for p in params):
        return scaled.softmax(-1)
    vocab = scaled.shape[-1]
    top_k = torch.tensor([p.top_k or vocab for p in params], device=device)
    # top_p = 1 must keep everything even where rounding lets the cumulative sum pass 1.
    top_p = torch.tensor([p.top_p if p.top_p < 1 else math.inf for p in params], device=device)
    ordered, order = scaled.sort(dim=-1, descending=True)
    ordered = ordered.masked_fill(torch.arange(vocab, device=device) >= top_k[:, None, None], -math.inf)
    probs = ordered.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # the likeliest token always stays
    ordered = ordered.masked_fill(mass_before >= top_p[:, None, None], -math.inf)
    return torch.full_like(scaled, -math.inf).scatter(-1, order, ordered).softmax(-1)


# -- counter-based random numbers -----------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's finalizer, in Python: a well-mixed 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """The low 32 bits of x * constant for x < 2**32, without overflowing int64."""
    return ((x & 0xFFFF) * constant + ((((x >> 16) * constant) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer: every input bit flips each output bit with probability 1/2."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def random_keys(seeds: Sequence[int], counters: Sequence[int], device: torch.device) -> torch.Tensor:
    """(rows,) int64 keys for `uniforms`: a 32-bit hash of each row's seed and counter (how many
    times the row has drawn before), computed here so the device sees one small tensor."""
    keys = [_splitmix64(_splitmix64(seed & _MASK64) ^ counter) & _MASK32 for seed, counter in zip(seeds, counters)]
    return torch.tensor(keys, dtype=torch.int64, device=device)


@cache
def _position_hashes(width: int) -> tuple[int, ...]:
    # Index position * STREAMS + stream: a draw never depends on the batch's width.
    return tuple(_splitmix64(index) & _MASK32 for index in range(width * STREAMS))


def uniforms(keys: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, STREAMS, width) float64 uniforms in (0, 1), a pure function of (key, stream,
    position): one hash round over a tensor, whatever the number of rows."""
    positions = torch.tensor(_position_hashes(width), dtype=torch.int64, device=keys.device)
    h = _mix32(keys[:, None] ^ positions[None, :])
    return ((h.double() + 0.5) / 2.0**32).view(-1, width, STREAMS).transpose(1, 2)


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per distribution over the last dim (weights need not sum to 1), by inverting
    the cumulative distribution at the uniforms `u` (shape: probs.shape[:-1])."""
    cdf = probs.cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
    # Rounding can land past the last token with weight: take the likeliest token instead.
    weight = probs.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return torch.where(weight > 0, index, probs.argmax(-1))


# -- the speculative rule -------------------------------------------------------------------------


def accept_drafts(
    p_drafts: torch.Tensor, q_drafts: torch.Tensor, u: torch.Tensor, draft_counts: torch.Tensor
) -> torch.Tensor:
    """How many leading drafts each row keeps: draft i survives with probability
    min(1, p_i(x_i) / q_i(x_i)), and the first rejection ends the run. Inputs are (rows, width);
    positions at or past a row's `draft_counts` are ignored."""
    live = torch.arange(p_drafts.shape[1], device=p_drafts.device) < draft_counts[:, None]
    rejected = (u * q_drafts >= p_drafts) & live  # u < p/q, without dividing by q
    return torch.where(rejected.any(-1), rejected.float().argmax(-1), draft_counts)


def speculative_step(
    p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, draft_counts: torch.Tensor, keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One iteration of lossless Jacobi sampling for a batch of rows.

    p: (rows, width, vocab) target distributions at the fed positions; position j predicts the
    row's draft j (j < draft_counts) or, at j = draft_counts, the token after the block.
    q: the distributions the drafts were drawn from (same shape; rows past their drafts ignored).
    drafts: (rows, width) draft ids (anything past a row's drafts).
    Returns (accepted, tokens): per row, how many drafts are kept, and a token per position: at
    `accepted` the verified replacement (a residual draw after a rejection, else the token after
    the block), and after it fresh drafts drawn from p."""
    width = p.shape[1]
    index = drafts.unsqueeze(-1)
    u = uniforms(keys, width)
    accepted = accept_drafts(
        p.gather(-1, index).squeeze(-1), q.gather(-1, index).squeeze(-1), u[:, ACCEPT_STREAM], draft_counts
    )
    positions = torch.arange(width, device=p.device)
    rejected_at = (positions == accepted[:, None]) & (accepted < draft_counts)[:, None]
    residual = (p - q).clamp_(min=0)
    # p == q leaves nothing to draw from; a rejection is then (numerically) impossible anyway.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    dist = torch.where(rejected_at.unsqueeze(-1), residual, p)
    return accepted, sample_from(dist, u[:, DRAW_STREAM])


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probabilities of `tokens` (rows, width) under `logits` (rows, width, vocab), and the
    `top` likeliest alternatives' (values, ids), each (rows, width, top), or None when top is 0."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if top <= 0:
        return chosen, None, None
    values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
    return chosen, values, ids
