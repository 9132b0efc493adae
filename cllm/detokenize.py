"""Incremental detokenization with stop strings: token ids in, complete text out, as they verify.

`IncrementalDetokenizer` uses the prefix/read-offset method of vLLM and TGI: each step decodes
only the ids from `prefix_offset` on (a window of a few tokens, whatever the output's length) and
emits the text past the decoded prefix once it no longer ends in U+FFFD, the mark of an incomplete
UTF-8 sequence (a byte-fallback tokenizer spells one multi-byte character as several byte tokens).
The concatenation of everything emitted, `flush()` included, equals `decode(all_ids)`.

`StopMatcher` cuts that text at the first stop string, searching only the new text and the last
`longest stop - 1` characters before it (O(total length)), and holds back a tail that may still
grow into a stop string, so streamed text never needs retracting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[list[int]], str]
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text of a growing list of token ids, emitted only once complete."""

    def __init__(self, decode: Decode):
        self._decode = decode
        self.ids: list[int] = []
        self._prefix_offset = 0  # ids before it are already fully emitted and out of the window
        self._read_offset = 0  # ids before it have had their text emitted

    def add(self, new_ids: Sequence[int]) -> str:
        """The text that `new_ids` complete (possibly empty: an incomplete character waits)."""
        self.ids.extend(new_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is held back, incomplete characters included: the output is final."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(REPLACEMENT)):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return new_text[len(prefix_text) :]
        if final:
            self._read_offset = len(self.ids)
        return ""


class StopMatcher:
    """Cuts the growing text at the first of `stops`; `include_stop` keeps the stop string itself."""

    def __init__(self, stops: Sequence[str], include_stop: bool = False):
        if any(stop == "" for stop in stops):
            raise ValueError("stop strings must not be empty")
        self._stops = tuple(stops)
        self._longest = max((len(stop) for stop in self._stops), default=0)
        self._include_stop = include_stop
        self.text = ""  # the text so far, cut at the stop once found
        self._sent = 0  # characters of `text` handed out
        self.stop_reason: str | None = None  # the stop string that matched

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def add(self, new_text: str) -> str:
        """The text now safe to send: up to a stop string, or short of a possible one's start."""
        if self.stopped or not new_text:
            return ""
        searched_from = max(0, len(self.text) - self._longest + 1)
        self.text += new_text
        hits = [(at, stop) for stop in self._stops if (at := self.text.find(stop, searched_from)) >= 0]
        if hits:
            at, stop = min(hits)
            self.text = self.text[: at + len(stop) if self._include_stop else at]
            self.stop_reason = stop
            return self.flush()
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """Everything not sent yet: the output is complete, nothing can still change."""
        return self._release(len(self.text))

    def _held_back(self) -> int:
        """The longest tail of the text that is a proper prefix of some stop string."""
        tail_start = max(self._sent, len(self.text) - self._longest + 1)
        for start in range(tail_start, len(self.text)):
            tail = self.text[start:]
            if any(stop.startswith(tail) for stop in self._stops):
                return len(self.text) - start
        return 0

    def _release(self, end: int) -> str:
        end = max(end, self._sent)
        delta, self._sent = self.text[self._sent : end], end
        return delta


class TextAssembler:
    """Token ids to streamed text: incremental detokenization, then stop strings."""

    def __init__(self, decode: Decode, stops: Sequence[str] = (), include_stop: bool = False):
        self.detokenizer = IncrementalDetokenizer(decode)
        self.stops = StopMatcher(stops, include_stop)

    def add(self, new_ids: Sequence[int]) -> str:
        return self.stops.add(self.detokenizer.add(new_ids))

    def flush(self) -> str:
        return self.stops.add(self.detokenizer.flush()) + self.stops.flush()

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    @property
    def stop_reason(self) -> str | None:
        return self.stops.stop_reason

    @property
    def text(self) -> str:
        return self.stops.text
