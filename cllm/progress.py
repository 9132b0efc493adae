"""One progress line per long-running stage: rewritten in place on a terminal, printed at most
every `log_interval_s` seconds otherwise (job logs, CI), and closed with a summary line."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_PREFIXES = ((1e9, "G"), (1e6, "M"), (1e3, "k"))


def scaled(value: float, reference: float) -> tuple[float, str]:
    """`value` under the SI prefix (k, M, G or none) that puts `reference` at 1 to 999."""
    for factor, prefix in _PREFIXES:
        if abs(reference) >= factor:
            return value / factor, prefix + " "
    return value, ""


def format_count(done: float, total: float, unit: str) -> str:
    """`done/total unit`, whole numbers below 10,000 (`60/100 steps`), otherwise in the
    total's prefix with two decimals, so the count moves (`1.23/5.00 M tokens`)."""
    if total < 10_000:
        return f"{done:.0f}/{total:.0f} {unit}"
    scaled_done, prefix = scaled(done, total)
    return f"{scaled_done:.2f}/{scaled(total, total)[0]:.2f} {prefix}{unit}"


def format_rate(rate: float, unit: str) -> str:
    """Units per second in the rate's own prefix, so it moves (`5.51 k tokens/s`), with three
    significant digits below 1 (`0.0417 steps/s`) and none from 100 (`950 tokens/s`)."""
    value, prefix = scaled(rate, rate)
    digits = ".3g" if 0 < value < 1 else ".0f" if value >= 100 else ".2f"
    return f"{value:{digits}} {prefix}{unit}/s"


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """`update(done, detail)` reports `done` out of `total` units; the line shows the share,
    the count and the rate (in k, M or G of the unit where they are large), the elapsed time
    and an ETA. `start` is work done before this run (a resumed job),
    counted in the share but not in the rate."""

    def __init__(self, description: str, total: float, unit: str = "it", stream: TextIO | None = None,
                 log_interval_s: float = 10.0, tty_interval_s: float = 0.25, start: float = 0.0):
        self.description, self.total, self.unit = description, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.interval = tty_interval_s if self.tty else log_interval_s
        self.started = time.monotonic()
        self.last_shown = -float("inf")
        self.shown_done: float | None = None
        self.start = start
        self.done = start
        self.detail = ""

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        share = min(self.done / self.total, 1.0) if self.total else 1.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = format_seconds(eta) if eta != float("inf") else "?"
        detail = f" {self.detail}" if self.detail else ""
        return (f"{self.description}: {share:4.0%} {format_count(self.done, self.total, self.unit)} "
                f"[{format_seconds(elapsed)} < {eta_text}, {format_rate(rate, self.unit)}]{detail}")

    def update(self, done: float, detail: str = "") -> None:
        self.done, self.detail = done, detail
        now = time.monotonic()
        if now - self.last_shown >= self.interval:
            self.last_shown = now
            self._show(self.line())

    def close(self, summary: str = "") -> None:
        """The final state (unless just shown) and a summary line."""
        if self.tty or self.shown_done != self.done:
            self._show(self.line())
        if self.tty:
            self.stream.write("\n")
        if summary:
            self.stream.write(f"{self.description}: {summary}\n")
        self.stream.flush()

    def _show(self, text: str) -> None:
        self.shown_done = self.done
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
