"""How far apart a group's curves are at one point, and how much of that is noise.

A group (`trajinv.analysis.invariance`) holds members that share lr (iso-LR) or lr*wd
(iso-ELR) and differ along one *varying* hyperparameter: wd, or lr. At one position,
with member values y_1..y_n sorted by the varying value v_1 < ... < v_n and
u_j = log2(v_j):

* **max-min spread**: max_j y_j - min_j y_j. It grows with the number of members and
  with the span of v they cover, so groups of different shapes do not compare.
* **per-octave gap**: the mean absolute gap between members a factor 2 apart along v.
  With y(u) the piecewise-linear interpolant of (u_j, y_j) in log2 v and span
  L = u_n - u_1: if L >= 1, the mean over every member j with u_j + 1 <= u_n of
  |y(u_j + 1) - y_j| (for a grid with factor-2 steps, the mean gap between neighbours);
  if L < 1, |y_n - y_1| / L (the end-to-end gap scaled to one octave). Undefined (NaN)
  when some v_j <= 0 (wd = 0).
* **noise**: every statistic is recomputed on each of the B validation-window resamples
  the trainer logs (`trajinv.data.bootstrap`; resample b is over the same windows for
  every member, so the statistics are resampled jointly, paired across members); its
  standard error (SE) is the sample std of those B values. A group's spread is *within
  noise* when it is at most NOISE_Z standard errors of the paired difference between its
  highest and its lowest member; a difference of two mean spreads is within noise when its
  magnitude is at most NOISE_Z of its own SE.

The bootstrap measures the noise of the finite validation set only, not seed-to-seed
training noise (that needs replicate runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

NOISE_Z = 2.0
"""Standard errors within which a difference counts as noise (~95% two-sided for a normal)."""

_TOL = 1e-9
"""log2 positions closer than this count as equal (0.008 / 0.004 is not exactly 2 in floating point)."""


def max_min(vals: np.ndarray) -> np.ndarray:
    """max - min along the last axis (members), for a point or for every resample at once."""
    vals = np.asarray(vals, dtype=np.float64)
    return vals.max(axis=-1) - vals.min(axis=-1)


def per_octave(varying: Sequence[float], vals: np.ndarray) -> np.ndarray:
    """The per-octave gap (module docstring) along the last axis; ``varying`` sorted ascending."""
    v = np.asarray(varying, dtype=np.float64)
    vals = np.asarray(vals, dtype=np.float64)
    if len(v) < 2 or not np.all(v > 0):
        return np.full(vals.shape[:-1], np.nan)
    u = np.log2(v)
    span = u[-1] - u[0]
    if span <= _TOL:
        return np.full(vals.shape[:-1], np.nan)
    if span < 1 - _TOL:
        return np.abs(vals[..., -1] - vals[..., 0]) / span
    gaps = [np.abs(_interp(u, vals, u[j] + 1) - vals[..., j]) for j in range(len(u)) if u[j] + 1 <= u[-1] + _TOL]
    return np.mean(gaps, axis=0)


def _interp(u: np.ndarray, vals: np.ndarray, p: float) -> np.ndarray:
    """Linear interpolation of vals (..., n) at log2 position p inside [u_1, u_n]."""
    near = np.flatnonzero(np.abs(u - p) <= _TOL)
    if len(near):
        return vals[..., near[0]]
    i = int(np.searchsorted(u, p))
    w = (p - u[i - 1]) / (u[i] - u[i - 1])
    return (1 - w) * vals[..., i - 1] + w * vals[..., i]


def se(samples: np.ndarray | None) -> float:
    """Bootstrap SE (sample std, ddof 1) of a statistic's resampled values; NaN without them."""
    if samples is None:
        return math.nan
    s = np.asarray(samples, dtype=np.float64)
    s = s[np.isfinite(s)]
    return float(s.std(ddof=1)) if len(s) >= 2 else math.nan


def within_noise(value: float, stderr: float) -> bool | None:
    """|value| <= NOISE_Z * stderr; None when either is undefined."""
    if not (math.isfinite(value) and math.isfinite(stderr)):
        return None
    return abs(value) <= NOISE_Z * stderr


@dataclass(frozen=True)
class GroupStats:
    """One group's spreads at one position, with their resampled values."""

    spread: float
    """max - min of the member values (NaN with < 2 values)."""
    octave: float
    """The per-octave gap."""
    spread_boot: np.ndarray | None
    """(B,) the max-min spread under each resample; None when a member has no resamples."""
    octave_boot: np.ndarray | None
    pair_se: float
    """SE of the paired difference between the highest and the lowest member."""

    @property
    def spread_se(self) -> float:
        return se(self.spread_boot)

    @property
    def octave_se(self) -> float:
        return se(self.octave_boot)

    @property
    def within_noise(self) -> bool | None:
        """The members differ by no more than NOISE_Z standard errors of the extreme pair."""
        return within_noise(self.spread, self.pair_se)


def group_stats(varying: Sequence[float], values: Sequence[float], boot: Sequence[np.ndarray | None],
                spread: float | None = None) -> GroupStats:
    """Statistics of members with varying values ``varying`` (ascending), point values ``values``
    and resampled values ``boot`` (one (B,) array or None per member). Members whose value is
    not finite (not logged there) are left out. ``spread`` overrides the point max-min (the
    caller's own computation, kept bit-identical to earlier reports)."""
    keep = [i for i, y in enumerate(values) if math.isfinite(y)]
    if len(keep) < 2:
        return GroupStats(math.nan, math.nan, None, None, math.nan)
    v = np.array([varying[i] for i in keep], dtype=np.float64)
    y = np.array([values[i] for i in keep], dtype=np.float64)
    point = float(max_min(y)) if spread is None else spread
    octave = float(per_octave(v, y))
    b = [boot[i] for i in keep]
    if any(x is None for x in b) or len({len(x) for x in b}) != 1:
        return GroupStats(point, octave, None, None, math.nan)
    resampled = np.stack(b, axis=-1)  # (B, members)
    hi, lo = int(np.argmax(y)), int(np.argmin(y))
    return GroupStats(point, octave, max_min(resampled), per_octave(v, resampled),
                      se(resampled[:, hi] - resampled[:, lo]))


def mean_boot(boots: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """The resampled values of a mean over groups: the mean per resample (None if any is missing)."""
    if not boots or any(b is None for b in boots) or len({len(b) for b in boots}) != 1:
        return None
    return np.mean(np.stack(boots), axis=0)
