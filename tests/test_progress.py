"""The progress line: share, rate and ETA, a resumed run's rate, and one summary line."""

from __future__ import annotations

import io
import re

import pytest

from cllm.progress import Progress


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
