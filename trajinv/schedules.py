"""Learning-rate multipliers and batch-size schedules as pure functions of progress."""

from __future__ import annotations

import math
from dataclasses import dataclass

from trajinv.config import ScheduleConfig


def lr_multiplier(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr at 0-based `step` of a `total`-step run.

    Linear warmup over `cfg.warmup` steps (reaching 1 at step warmup-1 + 1), then
    'constant' stays at 1, 'cosine' follows a half cosine to min_ratio at the end,
    'wsd' stays at 1 until the last decay_fraction of the run, then decays linearly.
    """
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "cosine":
        span = max(total - cfg.warmup, 1)
        progress = min((step - cfg.warmup) / span, 1.0)
        return cfg.min_ratio + (1 - cfg.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = int(round(cfg.decay_fraction * total))
    decay_start = total - decay_steps
    if step < decay_start or decay_steps == 0:
        return 1.0
    progress = (step - decay_start + 1) / decay_steps
    return 1.0 - (1.0 - cfg.min_ratio) * progress


@dataclass(frozen=True)
class BatchSchedule:
    """Batch size as a step function of training progress: the paper's batch-size scheduler.

    Parsed from '32' (constant) or '8@0.2,32' (8 sequences for the first 20% of
    the steps, then 32); any number of stages, fractions increasing.
    """

    sizes: tuple[int, ...]
    until: tuple[float, ...]  # progress fraction at which each stage but the last ends

    @classmethod
    def parse(cls, text: str) -> "BatchSchedule":
        sizes, until = [], []
        parts = [p.strip() for p in str(text).split(",")]
        try:
            for i, part in enumerate(parts):
                size, _, frac = part.partition("@")
                sizes.append(int(size))
                if i < len(parts) - 1:
                    until.append(float(frac))
                elif frac:
                    raise ValueError
        except ValueError:
            raise ValueError(f"bad batch-size schedule {text!r}; use e.g. '32' or '8@0.2,32'") from None
        if any(s <= 0 for s in sizes):
            raise ValueError(f"batch sizes must be positive, got {text!r}")
        if not all(math.isfinite(u) for u in until):
            raise ValueError(f"batch-size schedule fractions must be finite, got {text!r}")
        if until and (until != sorted(until) or until[0] <= 0 or until[-1] >= 1):
            raise ValueError(f"batch-size schedule fractions must increase inside (0, 1), got {text!r}")
        return cls(tuple(sizes), tuple(until))

    def at(self, step: int, total: int) -> int:
        progress = step / total
        for size, end in zip(self.sizes, self.until):
            if progress < end:
                return size
        return self.sizes[-1]

    @property
    def max(self) -> int:
        return max(self.sizes)

    def __str__(self) -> str:
        stages = [f"{s}@{u:g}" for s, u in zip(self.sizes, self.until)]
        return ",".join(stages + [str(self.sizes[-1])])
