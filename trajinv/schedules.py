"""Learning-rate multipliers and batch-size schedules as pure functions of progress."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

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
    decay_steps = cfg.decay_steps(total)
    decay_start = total - decay_steps
    if step < decay_start or decay_steps == 0:
        return 1.0
    progress = (step - decay_start + 1) / decay_steps
    return 1.0 - (1.0 - cfg.min_ratio) * progress


@dataclass(frozen=True)
class BatchPlan:
    """How many steps a run trains at each stage of its batch-size schedule.

    The trainer follows the plan step by step; the sweep summary and the metrics
    (`tokens`) count what it trains. Built by `BatchSchedule.plan_for_tokens` or
    `BatchSchedule.plan_for_steps`, never by hand.
    """

    sizes: tuple[int, ...]
    """Sequences per step of each stage."""
    counts: tuple[int, ...]
    """Steps of each stage (every stage has at least one)."""
    context: int
    """Tokens per sequence."""

    @property
    def steps(self) -> int:
        return sum(self.counts)

    @property
    def tokens(self) -> int:
        """Tokens the whole run trains on."""
        return self.tokens_before(self.steps)

    def tokens_before(self, step: int) -> int:
        """Tokens trained by the first `step` steps (0 <= step <= steps)."""
        if not 0 <= step <= self.steps:
            raise ValueError(f"step {step} is outside the plan's 0..{self.steps}")
        total = 0
        for size, count in zip(self.sizes, self.counts):
            n = min(count, step)
            total += n * size
            step -= n
        return total * self.context

    def at(self, step: int) -> int:
        """Batch size of 0-based `step`."""
        if not 0 <= step < self.steps:
            raise ValueError(f"step {step} is outside the plan's 0..{self.steps - 1}")
        for size, count in zip(self.sizes, self.counts):
            if step < count:
                return size
            step -= count
        raise AssertionError("unreachable")

    def __str__(self) -> str:
        return ",".join(f"{n}x{b}" for b, n in zip(self.sizes, self.counts))


@dataclass(frozen=True)
class BatchSchedule:
    """Batch size as a step function of the tokens trained: the paper's batch-size scheduler.

    Parsed from '32' (constant) or '32@0.1,256' (32 sequences per step for the first
    10% of the run's tokens, then 256); any number of stages, fractions increasing.
    Switch points are fractions of *tokens*, as in the paper, so '32@0.1,256' at a
    budget of N tokens and a constant '256' at N tokens train on the same data total.

    A run's length is a token budget T or a step count S; the plan turns either into
    steps per stage (`plan_for_tokens`, `plan_for_steps`), with exact rational
    arithmetic, so it is a pure function of (schedule, context, T or S).
    """

    sizes: tuple[int, ...]
    until: tuple[float, ...]  # token fraction at which each stage but the last ends

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
            raise ValueError(f"bad batch-size schedule {text!r}; use e.g. '32' or '32@0.1,256'") from None
        if any(s <= 0 for s in sizes):
            raise ValueError(f"batch sizes must be positive, got {text!r}")
        if not all(math.isfinite(u) for u in until):
            raise ValueError(f"batch-size schedule fractions must be finite, got {text!r}")
        if until and (until != sorted(until) or until[0] <= 0 or until[-1] >= 1 or len(set(until)) < len(until)):
            raise ValueError(f"batch-size schedule fractions must increase inside (0, 1), got {text!r}")
        return cls(tuple(sizes), tuple(until))

    def _counts(self, tokens: int, context: int) -> list[int]:
        """Steps per stage for a budget of `tokens` (stages may get 0 here).

        Each step trains at the size of the stage in which the tokens trained before
        it lie, as a fraction of the budget; the run stops once the budget is reached
        (the last step may pass it by less than one batch). Stage i therefore runs
        ceil((end_i - trained) / (size_i * context)) steps, or none if the stages
        before it already passed its end."""
        ends = [Fraction(str(u)) * tokens for u in self.until] + [Fraction(tokens)]
        trained, counts = 0, []
        for size, end in zip(self.sizes, ends):
            n = max(0, math.ceil((end - trained) / (size * context)))
            counts.append(n)
            trained += n * size * context
        return counts

    def plan_for_tokens(self, tokens: int, context: int) -> BatchPlan:
        """The plan of a run with a budget of `tokens` (see `_counts` for the rule).

        A constant size B trains ceil(tokens / (B * context)) steps. A stage whose
        share of the budget the stage before it already used up would get no step:
        that is an error, not a silently different schedule."""
        tokens, context = _positive_int("tokens", tokens), _positive_int("context", context)
        counts = self._counts(tokens, context)
        for i, n in enumerate(counts):
            if n == 0:
                raise ValueError(f"batch-size schedule '{self}' at {tokens} tokens gives stage {i + 1} "
                                 f"(batch {self.sizes[i]}) no step; use more tokens")
        return BatchPlan(self.sizes, tuple(counts), context)

    def plan_for_steps(self, steps: int, context: int) -> BatchPlan:
        """The plan with exactly `steps` steps: that of the largest token budget T whose
        plan has `steps` steps (T = steps * B * context for a constant size B, so a
        constant schedule trains `steps` steps of B, as before schedules counted tokens).

        Found by bisection for the smallest budget with more steps, minus one token.
        When sizes never decrease the step count grows with T one step at a time, so T
        always exists. Where sizes decrease the step count is not monotone in T: the bisection
        may miss a budget that exists, so such a schedule is an error unless it lands."""
        steps, context = _positive_int("steps", steps), _positive_int("context", context)
        lo, hi = 0, steps * max(self.sizes) * context + 1  # sum(counts(hi)) > steps: each step trains <= max
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if sum(self._counts(mid, context)) > steps:
                hi = mid
            else:
                lo = mid
        counts = self._counts(hi - 1, context) if hi > 1 else []
        if sum(counts) != steps:
            raise ValueError(f"batch-size schedule '{self}' (its sizes decrease, so its step count does not grow with "
                             f"the token budget) was not solved for exactly {steps} steps; give a token budget "
                             "(--tokens) instead")
        for i, n in enumerate(counts):
            if n == 0:
                raise ValueError(f"{steps} steps are too few for batch-size schedule '{self}': "
                                 f"stage {i + 1} (batch {self.sizes[i]}) gets no step")
        return BatchPlan(self.sizes, tuple(counts), context)

    @property
    def max(self) -> int:
        return max(self.sizes)

    def __str__(self) -> str:
        stages = [f"{s}@{u}" for s, u in zip(self.sizes, self.until)]  # str(float) round-trips
        return ",".join(stages + [str(self.sizes[-1])])


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
