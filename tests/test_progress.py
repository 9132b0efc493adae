"""The progress line: share, rate and ETA, a resumed run's rate, one summary line, and large
counts and rates in k, M or G of their unit."""

from __future__ import annotations

import io
import re

import pytest

from cllm.progress import Progress, format_count, format_rate


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr("cllm.progress.time.monotonic", fake)
    return fake


def shown_lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def test_a_log_stream_gets_one_line_per_interval_and_a_summary(clock):
    stream = io.StringIO()
    progress = Progress("train", total=100, unit="steps", stream=stream, log_interval_s=10)
    clock.now = 1.0
    progress.update(10)  # the first update is shown
    clock.now = 2.0
    progress.update(20)  # within the interval: held back
    clock.now = 12.0
    progress.update(60)
    clock.now = 20.0
    progress.update(70)  # held back, so close shows it
    progress.close("done: loss 0.1")
    lines = shown_lines(stream)
    assert lines[0].startswith("train:  10% 10/100 steps")
    assert lines[1].startswith("train:  60% 60/100 steps [0m12s < 0m08s, 5.00 steps/s]")
    assert lines[2].startswith("train:  70% 70/100 steps [0m20s < 0m08s, 3.50 steps/s]")
    assert lines[3] == "train: done: loss 0.1"
    assert len(lines) == 4


def test_close_does_not_repeat_a_line_just_shown(clock):
    stream = io.StringIO()
    progress = Progress("collect", total=4, unit="prompts", stream=stream)
    clock.now = 1.0
    progress.update(4)
    progress.close()
    assert len(shown_lines(stream)) == 1


def test_a_resumed_run_counts_only_its_own_work_in_the_rate(clock):
    stream = io.StringIO()
    progress = Progress("train", total=1000, unit="steps", stream=stream, start=750)
    clock.now = 10.0
    progress.update(760)
    line = shown_lines(stream)[0]
    assert "76% 760/1000 steps" in line
    assert float(re.search(r"([\d.]+) steps/s", line).group(1)) == 1.0  # 10 steps in 10 s, not 760
    assert "< 4m00s" in line  # 240 steps left at 1 step/s


def test_large_counts_and_rates_print_in_units_that_move(clock):
    stream = io.StringIO()
    progress = Progress("[toy-math] training", total=5_000_000, unit="tokens", stream=stream)
    clock.now = 10.0
    progress.update(55_000)  # 5.5 k tokens/s: 0.00 M tokens/s in the old M-token units
    clock.now = 220.0
    progress.update(1_234_000)
    first, second = shown_lines(stream)
    assert "1% 0.06/5.00 M tokens" in first and "5.50 k tokens/s" in first
    assert "25% 1.23/5.00 M tokens" in second and "5.61 k tokens/s" in second


@pytest.mark.parametrize(("rate", "text"), [
    (0.0, "0.00 steps/s"), (0.04166, "0.0417 steps/s"), (3.5, "3.50 steps/s"), (950.4, "950 steps/s"),
    (12_345.0, "12.35 k steps/s"), (2_500_000.0, "2.50 M steps/s"),
])
def test_rate_units(rate, text):
    assert format_rate(rate, "steps") == text


@pytest.mark.parametrize(("done", "total", "text"), [
    (60, 100, "60/100 steps"), (3000, 3000, "3000/3000 steps"), (12_340, 50_000, "12.34/50.00 k steps"),
])
def test_count_units(done, total, text):
    assert format_count(done, total, "steps") == text
