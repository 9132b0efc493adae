"""Incremental detokenization (`cllm.detokenize`): streamed text equals `decode(all ids)` for a
byte-fallback tokenizer on multi-byte output, whatever the chunking; stop strings cut it."""

from __future__ import annotations

import random

import pytest
from helpers import byte_fallback_tokenizer, char_tokenizer

from cllm.detokenize import IncrementalDetokenizer, StopMatcher, TextAssembler

TEXTS = ["the café naïve", "中文字符 and the rest", "emoji 🙂🎉 done", "Ünïcödé 日本語 👩‍💻 ok"]


def stream(decode, ids: list[int], chunks: list[int], stops=(), include_stop=False) -> list[str]:
    assembler = TextAssembler(decode, stops, include_stop)
    deltas, start = [], 0
    for size in chunks:
        deltas.append(assembler.add(ids[start : start + size]))
        start += size
        if assembler.stopped:
            return deltas
    return deltas + [assembler.flush()]


def random_chunks(total: int, rng: random.Random) -> list[int]:
    chunks = []
    while sum(chunks) < total:
        chunks.append(rng.randint(1, 4))
    return chunks


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decode_for_byte_fallback_tokens(text):
    tokenizer = byte_fallback_tokenizer()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.encode()) // 2  # the non-ASCII characters really are byte tokens
    decode = lambda chunk: tokenizer.decode(chunk, skip_special_tokens=True)  # noqa: E731
    rng = random.Random(0)
    for chunks in [[1] * len(ids), [len(ids)]] + [random_chunks(len(ids), rng) for _ in range(10)]:
        deltas = stream(decode, ids, chunks)
        assert "".join(deltas) == decode(ids) == text
        assert all("\ufffd" not in delta for delta in deltas)  # never half a character


def test_special_tokens_and_a_truncated_last_character_still_concatenate_to_decode():
    tokenizer = byte_fallback_tokenizer()
    decode = lambda chunk: tokenizer.decode(chunk, skip_special_tokens=True)  # noqa: E731
    pieces = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in "the é 中 🙂 x ü".split()]
    rng = random.Random(1)
    for _ in range(50):  # whole characters, EOS between them, and the output cut mid-character
        ids = [token for _ in range(rng.randint(1, 8)) for token in rng.choice(pieces + [[tokenizer.eos_token_id]])]
        ids += rng.choice(pieces)[: rng.randint(0, 2)]
        assert "".join(stream(decode, ids, random_chunks(len(ids), rng))) == decode(ids)


def test_each_step_decodes_a_window_not_the_whole_output():
    decoded_lengths = []
    tokenizer = char_tokenizer()

    def decode(ids):
        decoded_lengths.append(len(ids))
        return tokenizer.decode(ids)

    detokenizer = IncrementalDetokenizer(decode)
    ids = tokenizer("a long enough output " * 20, add_special_tokens=False)["input_ids"]
    text = "".join(detokenizer.add([token]) for token in ids) + detokenizer.flush()
    assert text == tokenizer.decode(ids)
    assert max(decoded_lengths) <= 2  # O(new tokens) per step, not O(output)


def test_stop_strings_cut_hold_back_and_report_the_stop():
    matcher = StopMatcher([" END", "##"])
    assert matcher.add("a b") == "a b"
    assert matcher.add(" E") == ""  # may begin " END"
    assert matcher.add("N") == ""
    assert matcher.add("D and more") == "" and matcher.stopped and matcher.stop_reason == " END"
    assert matcher.text == "a b"
    other = StopMatcher([" END"])
    assert other.add("a E") == "a" and other.add("x") == " Ex" and other.flush() == ""
    kept = StopMatcher(["#"], include_stop=True)
    assert kept.add("x#y") == "x#" and kept.text == "x#"


def test_stop_strings_on_multibyte_text_and_its_chunking():
    tokenizer = byte_fallback_tokenizer()
    decode = lambda chunk: tokenizer.decode(chunk, skip_special_tokens=True)  # noqa: E731
    ids = tokenizer("the 中文 stop 🙂 after", add_special_tokens=False)["input_ids"]
    rng = random.Random(2)
    for stops, expected in [(["🙂"], "the 中文 stop "), (["文"], "the 中"), (["none"], "the 中文 stop 🙂 after")]:
        for _ in range(5):
            assert "".join(stream(decode, ids, random_chunks(len(ids), rng), stops)) == expected
    assert "".join(stream(decode, ids, [1] * len(ids), ["文"], include_stop=True)) == "the 中文"


def test_stop_matching_is_linear_in_the_output():
    matcher = StopMatcher(["x" * 64 + "y"])
    for _ in range(20_000):  # one long run of a stop's prefix: each step looks at a bounded tail
        matcher.add("x")
    assert not matcher.stopped and matcher.add("y") == "" and matcher.stopped
    assert matcher.text == "x" * (20_000 - 64)
