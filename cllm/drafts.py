"""Where Jacobi drafts come from beyond the paper's rule, and the options that turn each source on:
n-gram lookup in a request's own tokens, a pool of n-grams that its iterations produced and then
rejected (Jacobi Forcing's rejection recycling), and a next block drafted behind the active one.

All of them only propose drafts. Every draft is still judged by the model (`cllm.row`, `cllm.engine`),
so no guess can change the output; a good guess only saves forwards. Answers copy names,
numbers and identifiers from their prompts, and Jacobi iterations often produce the right n-gram
at the wrong place, which is what the lookup and the pool catch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

MAX_CONTEXT = 3  # the longest suffix matched; longer contexts rarely recur in short answers


@dataclass(frozen=True)
class DecodingOptions:
    """Decoding beyond the paper's rule. The defaults are the paper's: a block's guesses are drawn
    from the prompt, and one block is refined at a time. Collection keeps them, since the
    consistency loss is defined on the paper's states.

    lookup: a new block's guesses continue the longest recent match (up to MAX_CONTEXT tokens) of
        its start in the prompt and verified output; the `init` rule fills what no match covers.
    recycle_candidates, recycle_length: every forward also verifies up to this many n-grams of this
        many tokens that continue the last verified token (from the text, and from drafts that
        earlier iterations rejected); the longest that the model confirms becomes the next drafts.
    blocks_in_flight, next_block_share: once the active block has verified this share of its
        tokens, the next blocks_in_flight - 1 blocks are drafted behind it in the same forwards.
    """

    lookup: bool = False
    recycle_candidates: int = 0
    recycle_length: int = 4
    blocks_in_flight: int = 1
    next_block_share: float = 0.1  # JF waits for 0.85; ours draft better early (docs/results.md#decoding)

    def __post_init__(self):
        if self.recycle_candidates < 0:
            raise ValueError(f"recycle_candidates must be >= 0, got {self.recycle_candidates}")
        if self.recycle_length < 1:
            raise ValueError(f"recycle_length must be >= 1, got {self.recycle_length}")
        if self.blocks_in_flight < 1:
            raise ValueError(f"blocks_in_flight must be >= 1, got {self.blocks_in_flight}")
        if not 0 < self.next_block_share <= 1:
            raise ValueError(f"next_block_share must lie in (0, 1], got {self.next_block_share}")


PAPER = DecodingOptions()
TECHNIQUES = ("lookup", "recycle", "multi-block")


def variant(name: str, settings: DecodingOptions) -> DecodingOptions:
    """The paper's rule with the techniques that `name` lists ("recycle", "lookup+multi-block",
    ...) turned on as `settings` has them; "all" turns on every one, "paper" none."""
    techniques = TECHNIQUES if name == "all" else () if name == "paper" else tuple(name.split("+"))
    unknown = [technique for technique in techniques if technique not in TECHNIQUES]
    if unknown or not techniques and name != "paper":
        raise ValueError(f"unknown drafting variant {name!r}: give paper, all, or techniques of "
                         f"{', '.join(TECHNIQUES)} joined by '+'")
    options = PAPER
    if "lookup" in techniques:
        options = replace(options, lookup=True)
    if "recycle" in techniques:
        options = replace(options, recycle_candidates=settings.recycle_candidates,
                          recycle_length=settings.recycle_length)
    if "multi-block" in techniques:
        options = replace(options, blocks_in_flight=settings.blocks_in_flight,
                          next_block_share=settings.next_block_share)
    return options


class NgramIndex:
    """A request's verified tokens (prompt, then output), indexed so that the continuation of the
    latest earlier occurrence of a suffix is found in O(MAX_CONTEXT)."""

    def __init__(self, tokens: Iterable[int] = ()):
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # context -> where its latest continuation starts
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            end = len(self.tokens)
            # The contexts ending just before `token` now have a known continuation.
            for size in range(1, min(MAX_CONTEXT, end) + 1):
                self._after[tuple(self.tokens[end - size : end])] = end
            self.tokens.append(token)

    def continuation(self, suffix: Sequence[int], count: int) -> list[int]:
        """Up to `count` tokens that followed the latest occurrence of the longest matching suffix
        (MAX_CONTEXT tokens down to one) of `suffix`; [] when even its last token never occurred
        with something after it."""
        for size in range(min(MAX_CONTEXT, len(suffix)), 0, -1):
            start = self._after.get(tuple(suffix[len(suffix) - size :]))
            if start is not None:
                return self.tokens[start : start + count]
        return []


class DraftPool:
    """Per request: recent n-grams keyed by their first token, most recent first, without
    duplicates, at most `per_key` per key. The candidates after a verified token t are the
    continuations of the n-grams that start with t."""

    def __init__(self, length: int, per_key: int):
        if length < 1 or per_key < 1:
            raise ValueError(f"length and per_key must be >= 1, got {length} and {per_key}")
        self.length = length
        self.per_key = per_key
        self._pool: dict[int, deque[tuple[int, ...]]] = {}

    def add(self, tokens: Sequence[int]) -> None:
        """Pool every n-gram of `tokens` that has at least one token after its key."""
        for start in range(len(tokens) - 1):
            continuation = tuple(tokens[start + 1 : start + 1 + self.length])
            entries = self._pool.setdefault(tokens[start], deque(maxlen=self.per_key))
            if continuation in entries:
                entries.remove(continuation)
            entries.appendleft(continuation)

    def candidates(self, key: int) -> list[tuple[int, ...]]:
        return list(self._pool.get(key, ()))
