"""Learning-rate schedule shared by the toy teacher's training and consistency training."""

from __future__ import annotations

import math


def warmup_cosine(progress: float, warmup_fraction: float, floor: float = 0.0) -> float:
    """The learning-rate multiplier at `progress` (0 → 1) through training: linear warmup over the
    first `warmup_fraction`, then cosine decay from 1 down to `floor`."""
    if progress < warmup_fraction:
        return progress / warmup_fraction
    decay = (progress - warmup_fraction) / (1 - warmup_fraction)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(decay, 1.0)))
