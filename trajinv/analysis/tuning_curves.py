"""Tuning curves: the best validation loss to expect after n random-search trials, with confidence bands.

A sweep is a sample from the distribution of final losses that random search over
its box would produce. The expected best (minimum) of n draws from that sample's
empirical distribution is the tuning curve (Dodge et al. 2019); it says what the
search cost buys, and comparing the 2-D lr x wd search with the 1-D search along
the ELR line at fixed lr shows what the trajectory-invariance tuner saves.

The bands come from opda (Lourie, He & Cho): simultaneous confidence bands for the
CDF of the loss distribution, carried to the tuning curve. The expected minimum is
monotone in the CDF (a distribution with more mass at low losses has a lower
expected minimum for every n), so the CDF band's upper edge gives the curve's lower
band and its lower edge the upper band, and the bands hold for all n at once.
They need a bounded support: the band's edges put mass at the bounds, so an
infinite bound makes the expected minimum infinite. A cross-entropy is >= 0, and a
diverged run is worse than any finite one, so it counts as `upper_bound`. Ties
(several diverged runs) only make these order-statistic bands conservative.
Past the sample size the lower band sinks towards `lower_bound`: a finite sample
cannot rule out rare, better configurations it never drew.

Bands use opda's "ld_equal_tailed" method in one process with a fixed seed:
almost as tight as its default "ld_highest_density" (per opda's notes) at a
fraction of the cost, reproducible, and without a process pool on a shared machine.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trajinv.analysis.plots import plain_log_ticks
from trajinv.analysis.records import chance_loss
from trajinv.atomic import atomic_write

__all__ = ["TuningCurve", "default_upper_bound", "plot_tuning_curves", "sweep_tuning_curves", "tuning_curve"]

OPDA_MISSING = "tuning curves need opda: pip install 'trajinv[hpo]'"
_BAND_METHOD = "ld_equal_tailed"
_BAND_SEED = 0  # opda simulates the bands' critical value; a fixed seed makes them reproducible


@dataclass(frozen=True)
class TuningCurve:
    """Expected best loss after n trials (`expected`) with simultaneous `confidence` bands; `trials` = sample size."""

    label: str
    n: np.ndarray
    expected: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    confidence: float
    trials: int

    def trials_to_reach(self, loss: float) -> int | None:
        """The fewest trials among `n` whose expected best loss is <= `loss`; None if none reaches it."""
        hit = np.flatnonzero(self.expected <= loss)
        return int(np.min(self.n[hit])) if hit.size else None


def _empirical_distribution():
    """opda's EmpiricalDistribution, imported only here: opda is an optional dependency."""
    try:
        from opda.nonparametric import EmpiricalDistribution
    except ImportError:
        raise ImportError(OPDA_MISSING) from None
    return EmpiricalDistribution


def _sample(losses: Sequence[float | None], lower_bound: float, upper_bound: float) -> np.ndarray:
    """Losses as floats, diverged (None or non-finite) ones set to `upper_bound`, all inside the bounds."""
    if not (math.isfinite(lower_bound) and math.isfinite(upper_bound) and lower_bound < upper_bound):
        raise ValueError(f"bounds must be finite with lower < upper for finite bands, "
                         f"got lower_bound={lower_bound!r}, upper_bound={upper_bound!r}")
    ys = np.array([upper_bound if v is None or not math.isfinite(v) else float(v) for v in losses], dtype=float)
    if ys.size == 0:
        raise ValueError("a tuning curve needs at least one loss")
    outside = ys[(ys < lower_bound) | (ys > upper_bound)]
    if outside.size:
        raise ValueError(f"loss {outside[0]!r} lies outside [lower_bound={lower_bound!r}, upper_bound={upper_bound!r}]")
    return ys


def tuning_curve(losses: Sequence[float | None], ns: Sequence[int], lower_bound: float, upper_bound: float,
                 confidence: float = 0.8, label: str = "") -> TuningCurve:
    """Expected best (minimum) loss after n random-search trials, for each n in `ns`, with simultaneous bands.

    Trials are draws with replacement from the empirical distribution of `losses`;
    diverged losses (None or non-finite) count as `upper_bound`.
    """
    ys = _sample(losses, lower_bound, upper_bound)
    n = np.asarray(ns, dtype=int)
    if n.ndim != 1 or n.size == 0 or np.any(n < 1):
        raise ValueError(f"ns must be a non-empty list of positive integers, got {ns!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    dist = _empirical_distribution()
    with warnings.catch_warnings():
        # opda warns that ties spoil exact coverage; with ties the bands are conservative (module docstring).
        warnings.filterwarnings("ignore", message="Duplicates detected", category=RuntimeWarning)
        cdf_lo, cdf_point, cdf_hi = dist.confidence_bands(
            ys, confidence, a=lower_bound, b=upper_bound, generator=np.random.default_rng(_BAND_SEED),
            method=_BAND_METHOD, n_jobs=1)
    return TuningCurve(label=label, n=n, expected=cdf_point.average_tuning_curve(n, minimize=True),
                       lower=cdf_hi.average_tuning_curve(n, minimize=True),
                       upper=cdf_lo.average_tuning_curve(n, minimize=True), confidence=confidence, trials=len(ys))


def _float_or_none(value) -> float | None:
    """A summary.csv cell as a float; '' and None (missing) as None."""
    return None if value is None or value == "" else float(value)


def finished_trials(rows: Sequence[dict], vocab_size: int | None = None) -> list[tuple[float, float | None]]:
    """(lr, loss) of every finished member: 'done' with its loss, 'diverged' as None.

    Members still running, or done without a recorded loss, are not finished trials and are left out;
    a 'done' member with a non-finite loss diverged at the end and counts as diverged, and so does one
    that ended no better than a uniform guess (ln `vocab_size`, when given), as `trajinv tune` counts it.
    """
    chance = chance_loss(vocab_size) or math.inf
    out = []
    for row in filter(_is_trial, rows):
        loss = _float_or_none(row.get("final_val_loss"))
        out.append((float(row["lr"]), None if loss is None or not (math.isfinite(loss) and loss < chance) else loss))
    return out


def _is_trial(row: dict) -> bool:
    """A finished trial: diverged, or done with a recorded loss."""
    return row.get("status") == "diverged" or (
        row.get("status") == "done" and _float_or_none(row.get("final_val_loss")) is not None)


def _line_lr(trials: list[tuple[float, float | None]]) -> float:
    """The lr with the most members; among equals, the one holding the best finite loss."""
    def key(lr: float) -> tuple[int, float]:
        losses = [v for x, v in trials if x == lr]
        return len(losses), -min((v for v in losses if v is not None), default=math.inf)
    return max(sorted({lr for lr, _ in trials}), key=key)


def default_upper_bound(losses: Sequence[float | None], vocab_size: int | None = None) -> float:
    """What a diverged trial counts as: the worst finite loss or, if `vocab_size` is given,
    ln(vocab_size) (the loss of a uniform guess) when that is larger."""
    finite = [v for v in losses if v is not None and math.isfinite(v)]
    candidates = finite + ([chance_loss(vocab_size)] if vocab_size else [])
    if not candidates:
        raise ValueError(f"all {len(losses)} members diverged; pass upper_bound or vocab_size")
    return max(candidates)


def sweep_tuning_curves(rows: Sequence[dict], ns: Sequence[int] | None = None, confidence: float = 0.8,
                        lower_bound: float = 0.0, upper_bound: float | None = None,
                        vocab_size: int | None = None) -> dict[str, TuningCurve]:
    """Tuning curves of a sweep's summary rows: "2d" over every member, "1d" along one lr's ELR line.

    "2d" is random search over the lr x wd box (its label says which of lr and wd
    varied: a tune's stage may vary one); "1d" is random search over the members of
    a single lr, which is what the 1-D tuner searches once lr is fixed, left out
    when that lr holds fewer than two members (a curve of one run is that run) or
    every member (it would repeat "2d").
    Its lr is the one with the most members (an iso-lr ELR scan inside a grid has
    more than a grid row), ties going to the lr of the best member: on a full grid
    that is the row through the optimum, the line a tuner that fixed lr well
    would search. `ns` defaults to 1..(number of members) for both curves.
    `upper_bound` defaults to the worst finite loss or, if `vocab_size` is given,
    ln(vocab_size) (the loss of a uniform guess) when that is larger.
    """
    trials = finished_trials(rows, vocab_size)
    if not trials:
        raise ValueError(f"no finished member (status 'done' with a loss, or 'diverged') among {len(rows)} rows")
    if upper_bound is None:
        upper_bound = default_upper_bound([v for _, v in trials], vocab_size)
    ns = range(1, len(trials) + 1) if ns is None else ns
    lr = _line_lr(trials)
    line = [v for x, v in trials if x == lr]
    lrs, wds = ({float(r[key]) for r in rows if _is_trial(r)} for key in ("lr", "wd"))
    box = ("lr x wd" if len(lrs) > 1 and len(wds) > 1 else f"lr at wd={min(wds):.3g}" if len(lrs) > 1
           else f"ELR line at lr={lr:.3g}")
    curves = {"2d": tuning_curve([v for _, v in trials], ns, lower_bound, upper_bound, confidence,
                                 label=f"{box}, {len(trials)} trials")}
    if 2 <= len(line) < len(trials):
        curves["1d"] = tuning_curve(line, ns, lower_bound, upper_bound, confidence,
                                    label=f"ELR line at lr={lr:.3g}, {len(line)} trials")
    return curves


def plot_tuning_curves(curves: dict[str, TuningCurve], out_png: str | Path) -> Path:
    """Expected best loss against trials (log x), one colour per curve with its band shaded.

    The y-axis frames the expected curves, with half their range (at least 0.01 nat) as margin
    either side: bands wider than that run off the plot rather than squash the curves into lines
    (with few trials the upper band reaches the diverged bound, ln V: 5 nat above curves 0.05 nat
    apart; the lower band sinks towards lower_bound past the sample size, module docstring).
    """
    if not curves:
        raise ValueError("plot_tuning_curves needs at least one curve")
    fig = Figure(figsize=(7.5, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for k, (key, c) in enumerate(curves.items()):
        ax.plot(c.n, c.expected, color=f"C{k}", marker="." if len(c.n) < 30 else None, label=c.label or key)
        ax.fill_between(c.n, c.lower, c.upper, color=f"C{k}", alpha=0.2)
    confidence = {c.confidence for c in curves.values()}
    ax.set(xscale="log", xlabel="random-search trials n", ylabel="expected best validation loss",
           title="tuning curves, bands " + ", ".join(f"{p:.0%}" for p in sorted(confidence)))
    plain_log_ticks(ax.xaxis)  # a count of trials: "2", "10", not "2x10^0", "10^1"
    best = min(float(c.expected.min()) for c in curves.values())
    top = max(float(c.expected.max()) for c in curves.values())
    margin = max(0.5 * (top - best), 0.01)
    ax.set_ylim(best - margin, top + margin)
    ax.legend()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    return out
