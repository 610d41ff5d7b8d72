"""Optimal lr, wd and ELR against the token budget, and the paper's two scaling claims.

Li et al. (2025, arXiv 2509.25049) claim that, as the data grow, the optimal lr
stays nearly constant while the optimal wd falls sublinearly. This module takes
tuning runs at several token budgets and says whether *these* runs support that.

Choices, and why:

* Everything lives in log2. Tuning grids are geometric, a loss basin is close to
  a parabola in log(lr) and log(wd), and log2(ELR) = log2(lr) + log2(wd), so an
  ELR scan at fixed lr is the same line as a wd scan.
* One budget's optimum: a least-squares quadratic in log2 over the best finite
  member and its grid neighbours (one level either side along each varied axis),
  with its vertex taken if the quadratic is convex and the vertex lies inside
  those neighbours. On an lr x wd grid the quadratic is joint and keeps the
  cross term: late in training the loss follows ELR, so the basin is a valley
  along lr*wd = const. Two separate 1-D fits (lr along the best row, wd along
  the best column) would each correct the best member's ELR on their own, and
  together correct it twice. Otherwise the estimate is the best member itself.
* Its uncertainty: a parametric bootstrap that redraws every finite loss from
  N(loss, se) and repeats the whole estimate (the best member may change). A draw
  with no convex fit adds uniform jitter over the grid cell, since a grid point
  only locates the optimum to within half a spacing either way; without it an
  unfitted optimum would claim zero uncertainty.
* An optimum at the edge of what was evaluated (no member, finite or diverged,
  beyond it along an axis) only bounds the true optimum; fit_scaling refuses it.
* Power laws y = a * N^b are straight lines in log-log, and the optima carry
  their uncertainty in log2, so a line in log2 is the natural fit. The interval
  is a parametric bootstrap over the optima's log2 uncertainties: with a handful
  of budgets a case bootstrap is degenerate (resampling 3 points gives mostly
  repeated x, where the slope is undefined or rests on two points). Scatter about
  the line beyond what those uncertainties explain is added as extra noise whose
  variance is redrawn from its scaled inverse chi-square (n - 2 degrees of
  freedom), so a fit that rests on residuals alone has Student-t, not normal,
  intervals.
* The claims are read off the exponents' intervals: a claim holds when the
  interval lies inside its zone, fails when it lies outside, and is
  inconclusive otherwise. "lr nearly constant": zone (-tol, tol), an
  equivalence test (tol = 0.1: over 10x more data lr moves by less than 26%);
  an interval that merely contains 0 is no evidence, since a wide one always
  does. "wd decreases sublinearly": zone (-1, 0). A quantity that some budget
  held fixed (lr in an ELR scan) was not tuned, so its claim is inconclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from trajinv.atomic import atomic_write

__all__ = ["MIN_BUDGETS", "BudgetOptimum", "ClaimVerdict", "MemberLoss", "PowerLawFit", "ScalingReport",
           "check_budget_count", "fit_power_law", "fit_scaling", "optimum_from_members", "plot_scaling", "tau_iter"]

QUANTITIES = ("lr", "wd", "elr")
_AXES = ("lr", "wd")
_DIGITS = 9  # log2 levels equal to this many digits are one grid level


@dataclass(frozen=True)
class MemberLoss:
    """One tuning run: its lr, wd and final loss (None or non-finite: diverged) with its standard error."""

    lr: float
    wd: float
    loss: float | None
    se: float = 0.0


@dataclass(frozen=True)
class BudgetOptimum:
    """The optimum of one token budget, with log2 standard errors of lr, wd and elr."""

    tokens: float
    steps: int
    lr: float
    wd: float
    elr: float
    log2_se: dict[str, float]
    at_edge: bool
    source: str = ""
    edge_axes: tuple[str, ...] = ()
    """Which axes ('lr', 'wd') the optimum is at the edge of; empty unless at_edge."""
    tuned_axes: tuple[str, ...] = _AXES
    """Which axes the runs varied: an ELR scan at fixed lr tunes only 'wd'."""

    def __post_init__(self) -> None:
        if not (self.tokens > 0 and math.isfinite(self.tokens) and self.steps > 0):
            raise ValueError(f"{self.source or 'budget'}: tokens and steps must be positive, "
                             f"got tokens={self.tokens!r}, steps={self.steps!r}")


def tau_iter(lr: float, wd: float) -> float:
    """1/(lr*wd) steps: the timescale of AdamW's weight-decay EMA (Wang & Aitchison 2024)."""
    if not (lr > 0 and wd > 0 and math.isfinite(lr * wd)):
        raise ValueError(f"tau_iter needs positive finite lr and wd, got lr={lr!r}, wd={wd!r}")
    return 1.0 / (lr * wd)


@dataclass(frozen=True)
class _Grid:
    """Members in log2 coordinates with their level index per axis."""

    values: np.ndarray  # (m, 2) lr, wd as given
    x: np.ndarray  # (m, 2) log2 lr, log2 wd
    idx: np.ndarray  # (m, 2) level index per axis
    levels: tuple[np.ndarray, np.ndarray]
    loss: np.ndarray  # nan = diverged
    se: np.ndarray
    varied: list[int]  # axes with more than one level


def _grid(members: Sequence[MemberLoss], source: str) -> _Grid:
    for m in members:
        if not (m.lr > 0 and m.wd > 0 and math.isfinite(m.lr) and math.isfinite(m.wd)):
            raise ValueError(f"{source or 'members'}: member lr={m.lr:g}, wd={m.wd:g}: the optimum is fitted in log lr "
                             "and log wd, so every lr and wd must be positive and finite (sweep without wd 0)")
        if not (m.se >= 0 and math.isfinite(m.se)):
            raise ValueError(f"{source or 'members'}: member lr={m.lr:g}, wd={m.wd:g}: the standard error of its "
                             f"loss must be finite and >= 0, got {m.se!r}")
    values = np.array([[m.lr, m.wd] for m in members], dtype=float).reshape(-1, 2)
    x = np.log2(values)
    loss = np.array([m.loss if m.loss is not None else np.nan for m in members], dtype=float)
    loss[~np.isfinite(loss)] = np.nan
    if not np.isfinite(loss).any():
        raise ValueError(f"{source or 'members'}: no finite loss among {len(members)} members")
    rounded = np.round(x, _DIGITS)
    levels = (np.unique(rounded[:, 0]), np.unique(rounded[:, 1]))
    idx = np.stack([np.searchsorted(levels[d], rounded[:, d]) for d in (0, 1)], axis=1)
    varied = [d for d in (0, 1) if len(levels[d]) > 1]
    if not varied:
        raise ValueError(f"{source or 'members'}: need members at two or more values of lr or wd, "
                         f"got only lr={members[0].lr:g}, wd={members[0].wd:g}")
    return _Grid(values, x, idx, levels, loss, np.array([m.se for m in members], dtype=float), varied)


def _quadratic_vertex(X: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray | None:
    """Vertex of y ~ c + g.x + x'Hx/2 fitted by (weighted) least squares, if convex and inside the points' box."""
    d = X.shape[1]
    centre = X.mean(axis=0)  # centred features keep the normal equations well conditioned
    Z = X - centre
    pairs = [(i, j) for i in range(d) for j in range(i, d)]
    A = np.column_stack([np.ones(len(Z)), Z] + [Z[:, i] * Z[:, j] * (0.5 if i == j else 1.0) for i, j in pairs])
    if len(y) < A.shape[1]:
        return None
    sw = np.ones(len(y)) if w is None else np.sqrt(w)
    coef, _, rank, _ = np.linalg.lstsq(A * sw[:, None], y * sw, rcond=None)
    if rank < A.shape[1]:
        return None
    g, H = coef[1:1 + d], np.zeros((d, d))
    for (i, j), h in zip(pairs, coef[1 + d:]):
        H[i, j] = H[j, i] = h
    if np.linalg.eigvalsh(H).min() <= 1e-12 * max(1.0, np.abs(H).max()):
        return None
    vertex = centre - np.linalg.solve(H, g)
    inside = np.all(vertex >= X.min(axis=0) - 1e-9) and np.all(vertex <= X.max(axis=0) + 1e-9)
    return vertex if inside else None


def _cell_width(grid: _Grid, best: int, d: int) -> float:
    """Mean spacing of axis d's levels around the best member: the resolution of a grid-point optimum."""
    lv, i = grid.levels[d], grid.idx[best, d]
    return float(np.mean([lv[k + 1] - lv[k] for k in (i - 1, i) if 0 <= k < len(lv) - 1]))


def _locate(grid: _Grid, loss: np.ndarray, window: float | None = None) -> tuple[np.ndarray, int, bool]:
    """(log2 lr, log2 wd) of the optimum, the best member's index, and whether a quadratic located it.

    The quadratic goes through the best member and its neighbours: the next level either side on each
    varied axis (a grid), or with `window` every member within that many octaves of the best, weighted
    1/se^2 (a tune's line, the tune's own rule: its zoom puts members a fraction of an octave from the
    best, and a level-neighbour 0.02 octave away made the fit a three-point curvature of noise)."""
    best = int(np.nanargmin(loss))
    near = np.isfinite(loss)
    for d in grid.varied:
        if window is None:
            near &= np.abs(grid.idx[:, d] - grid.idx[best, d]) <= 1
        else:
            near &= np.abs(grid.x[:, d] - grid.x[best, d]) <= window + 1e-9
    pos = grid.x[best].copy()
    w = None
    if window is not None:
        se = grid.se[near]
        floor = se[se > 0].min() if (se > 0).any() else 1.0  # an unmeasured se is not an exact loss
        w = 1.0 / np.maximum(se, floor) ** 2
    vertex = _quadratic_vertex(grid.x[near][:, grid.varied], loss[near], w)
    if vertex is None:
        return pos, best, False
    pos[grid.varied] = vertex
    return pos, best, True


def _bootstrap_se(grid: _Grid, n_boot: int, seed: int, window: float | None = None) -> dict[str, float]:
    """log2 se of the optimum: its spread over `n_boot` redraws of the losses within their se. The spread
    is half the 16-84 % range (the sd of a normal): a few draws whose quadratic turns flat put a vertex far
    out, and the plain sd of 500 draws followed them (0.09 at one seed, 0.055-0.060 at five others)."""
    rng = np.random.default_rng(seed)
    draws = np.empty((n_boot, 2))
    for k in range(n_boot):
        pos, best, fitted = _locate(grid, grid.loss + grid.se * rng.standard_normal(len(grid.loss)), window)
        if not fitted:
            for d in grid.varied:
                pos[d] += _cell_width(grid, best, d) * rng.uniform(-0.5, 0.5)
        draws[k] = pos
    spread = lambda v: float(np.subtract(*np.quantile(v, [0.84, 0.16])) / 2)  # noqa: E731
    return {"lr": spread(draws[:, 0]), "wd": spread(draws[:, 1]), "elr": spread(draws.sum(axis=1))}


def optimum_from_members(members: Sequence[MemberLoss], tokens: float, steps: int, source: str = "",
                         n_boot: int = 2000, seed: int = 0, window: float | None = None) -> BudgetOptimum:
    """The optimal lr, wd and ELR of one budget's runs (an lr x wd grid, an ELR scan at fixed lr, or an lr scan).

    Axes with a single value (the fixed lr of an ELR scan) keep that value with a log2 se of 0. `window`
    (octaves): fit the members within it of the best, weighted by 1/se^2, not the best's level-neighbours
    (`_locate`); for a tune's lines, whose zoom members are irregularly spaced.
    """
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2 to estimate a spread, got {n_boot}")
    grid = _grid(members, source)
    pos, best, fitted = _locate(grid, grid.loss, window)
    edges = tuple(_AXES[d] for d in grid.varied if grid.idx[best, d] in (0, len(grid.levels[d]) - 1))
    # A grid value is returned exactly as given, not as 2**log2 of it.
    lr, wd = (float(2.0 ** pos[d]) if fitted and d in grid.varied else float(grid.values[best, d]) for d in (0, 1))
    return BudgetOptimum(tokens=float(tokens), steps=int(steps), lr=lr, wd=wd, elr=lr * wd,
                         log2_se=_bootstrap_se(grid, n_boot, seed, window), at_edge=bool(edges), source=source,
                         edge_axes=edges, tuned_axes=tuple(_AXES[d] for d in grid.varied))


@dataclass(frozen=True)
class PowerLawFit:
    """y = a * x**b, with bootstrap intervals; `predict` carries the draws to any x."""

    a: float
    b: float
    a_ci: tuple[float, float]
    b_ci: tuple[float, float]
    ci: float
    draws_log2a: np.ndarray = field(repr=False, compare=False)
    draws_b: np.ndarray = field(repr=False, compare=False)

    def predict(self, x: float | np.ndarray) -> tuple[float | np.ndarray, float | np.ndarray, float | np.ndarray]:
        """(value, lo, hi) of y at x (a number or an array), lo/hi the `ci` bootstrap interval."""
        lx = np.log2(np.asarray(x, dtype=float))
        value = self.a * np.power(np.asarray(x, dtype=float), self.b)
        logs = self.draws_log2a[:, None] + self.draws_b[:, None] * np.atleast_1d(lx)[None, :]
        lo, hi = 2.0 ** np.quantile(logs, [(1 - self.ci) / 2, (1 + self.ci) / 2], axis=0)
        if np.ndim(x) == 0:
            return float(value), float(lo[0]), float(hi[0])
        return value, lo, hi


def fit_power_law(x: Sequence[float], y: Sequence[float], y_log2_se: Sequence[float] | None = None,
                  n_boot: int = 2000, ci: float = 0.9, seed: int = 0) -> PowerLawFit:
    """Fit y = a * x**b by least squares in log2-log2, with a parametric-bootstrap interval.

    Each bootstrap draw puts the fitted line plus noise at the data's x: noise of sd
    `y_log2_se` (the optima's own uncertainty) plus any scatter the residuals show
    beyond it, that excess variance redrawn per draw as s2*(n-2)/chi2(n-2). A case
    bootstrap, which resamples the points, is degenerate with 3 points and weak
    with few more, so it is not used. With y_log2_se None only residual scatter is used.
    """
    lx, ly = np.log2(_positive(x, "x")), np.log2(_positive(y, "y"))
    n = len(lx)
    if n < 3:
        raise ValueError(f"a power-law fit with an interval needs 3 or more points, got {n}")
    if len(ly) != n:
        raise ValueError(f"x and y differ in length: {n} and {len(ly)}")
    if len(np.unique(lx)) < n:
        raise ValueError(f"x values must be distinct, got {list(map(float, x))}")
    if not (0 < ci < 1 and n_boot >= 2):
        raise ValueError(f"need 0 < ci < 1 and n_boot >= 2, got ci={ci}, n_boot={n_boot}")
    se = np.zeros(n) if y_log2_se is None else np.asarray(y_log2_se, dtype=float)
    if se.shape != (n,) or not np.all(np.isfinite(se) & (se >= 0)):
        raise ValueError(f"y_log2_se must be {n} finite values >= 0, got {y_log2_se!r}")
    centre = lx.mean()  # slope and intercept at the data's centre are uncorrelated
    dx = lx - centre
    b, c = np.polyfit(dx, ly, 1)
    fitted = c + b * dx
    excess = max(0.0, float(np.sum((ly - fitted) ** 2)) / (n - 2) - float(np.mean(se ** 2)))
    rng = np.random.default_rng(seed)
    excess_draws = excess * (n - 2) / rng.chisquare(n - 2, size=(n_boot, 1))
    ly_star = fitted + np.sqrt(se ** 2 + excess_draws) * rng.standard_normal((n_boot, n))
    b_star = ly_star @ dx / np.sum(dx ** 2)
    log2a_star = ly_star.mean(axis=1) - b_star * centre
    q = [(1 - ci) / 2, (1 + ci) / 2]
    b_lo, b_hi = np.quantile(b_star, q)
    a_lo, a_hi = 2.0 ** np.quantile(log2a_star, q)
    return PowerLawFit(a=float(2.0 ** (c - b * centre)), b=float(b), a_ci=(float(a_lo), float(a_hi)),
                       b_ci=(float(b_lo), float(b_hi)), ci=ci, draws_log2a=log2a_star, draws_b=b_star)


def _positive(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError(f"{name} must be positive finite numbers for a log-log fit, got {list(values)!r}")
    return arr


@dataclass(frozen=True)
class ClaimVerdict:
    """One of the paper's claims judged from an exponent's interval: 'holds', 'fails' or 'inconclusive'."""

    claim: str
    verdict: str
    exponent: float
    interval: tuple[float, float]
    criterion: str


def _judge(claim: str, quantity: str, fit: PowerLawFit, zone: tuple[float, float],
           optima: Sequence[BudgetOptimum]) -> ClaimVerdict:
    """Holds if the exponent's interval lies inside `zone`, fails if it lies outside, else inconclusive.

    A quantity held fixed at some budget (lr in an ELR scan) was not tuned there, so its
    exponent says nothing about the optimum: the verdict is then inconclusive.
    """
    lo, hi = fit.b_ci
    criterion = f"{quantity} exponent interval inside ({zone[0]:g}, {zone[1]:g}): holds; outside it: fails"
    untuned = [o.source or f"tokens={o.tokens:g}" for o in optima if quantity not in o.tuned_axes]
    if untuned:
        verdict, criterion = "inconclusive", f"{criterion}; {quantity} not tuned at {', '.join(untuned)}"
    elif zone[0] < lo and hi < zone[1]:
        verdict = "holds"
    elif hi <= zone[0] or lo >= zone[1]:
        verdict = "fails"
    else:
        verdict = "inconclusive"
    return ClaimVerdict(claim, verdict, fit.b, fit.b_ci, criterion)


_FAR = 10.0
"""A target more than this factor outside the fitted budgets is flagged as an extrapolation."""


@dataclass(frozen=True)
class ScalingReport:
    """Power laws of the optimal lr, wd and elr in tokens, predictions at a target budget, and the claims."""

    optima: tuple[BudgetOptimum, ...]
    fits: dict[str, PowerLawFit]
    target_tokens: float | None
    predictions: dict[str, tuple[float, float, float]]  # quantity -> (value, lo, hi); empty without a target
    claims: tuple[ClaimVerdict, ...]
    ci: float

    def format(self) -> str:
        """A plain-text report: the optima, the fits, the predictions and the verdicts."""
        pct = f"{self.ci:.0%}"
        lines = [f"{'source':<20} {'tokens':>10} {'steps':>8} {'lr':>10} {'wd':>10} {'elr':>10} "
                 f"{'se(log2 lr,wd,elr)':>20} {'tau_iter/steps':>14}"]
        for o in self.optima:
            se = ",".join(f"{o.log2_se.get(q, 0.0):.2f}" for q in QUANTITIES)
            lines.append(f"{o.source:<20} {o.tokens:>10.3g} {o.steps:>8d} {o.lr:>10.3g} {o.wd:>10.3g} "
                         f"{o.elr:>10.3g} {se:>20} {tau_iter(o.lr, o.wd) / o.steps:>14.3g}")
        lines.append("")
        for q, f in self.fits.items():
            lines.append(f"{q:>3} = {f.a:.3g} * tokens^{f.b:+.3f}   exponent {pct} interval "
                         f"[{f.b_ci[0]:+.3f}, {f.b_ci[1]:+.3f}]")
        if self.predictions:
            lines.append(f"\nat {self.target_tokens:.3g} tokens ({pct} interval):")
            lines += [f"  {q:>3} = {v:.3g}  [{lo:.3g}, {hi:.3g}]" for q, (v, lo, hi) in self.predictions.items()]
            lines += [f"  caution: {c}" for c in self.caveats()]
        lines.append("")
        for c in self.claims:
            lines.append(f"{c.claim}: {c.verdict.upper()} (exponent {c.exponent:+.3f}, interval "
                         f"[{c.interval[0]:+.3f}, {c.interval[1]:+.3f}]; criterion: {c.criterion})")
        return "\n".join(lines)

    def caveats(self) -> list[str]:
        """What makes the predictions doubtful: a target far outside the fitted budgets (a power law
        extrapolated), or a predicted lr*wd >= 1, which no run in torch's decay mode (lr*wd per step,
        the default) can train."""
        if not self.predictions:
            return []
        out = []
        lo, hi = min(o.tokens for o in self.optima), max(o.tokens for o in self.optima)
        t = self.target_tokens
        if t > _FAR * hi or t < lo / _FAR:
            side, ref = ("above the largest", hi) if t > hi else ("below the smallest", lo)
            out.append(f"{t:.3g} tokens is {max(t / ref, ref / t):.3g}x {side} budget fitted ({ref:.3g}): "
                       "the power laws are extrapolated that far")
        lr, wd = self.predictions["lr"][0], self.predictions["wd"][0]
        if lr * wd >= 1:
            out.append(f"the predicted lr*wd = {lr * wd:.3g} >= 1 is untrainable in torch's decay mode (decay would "
                       "zero or flip the weights every step): the fits do not hold there")
        return out

    def to_dict(self) -> dict:
        """JSON-ready: plain floats, lists and strings only."""
        return {
            "ci": self.ci,
            "target_tokens": self.target_tokens,
            "optima": [{"source": o.source, "tokens": o.tokens, "steps": o.steps, "lr": o.lr, "wd": o.wd,
                        "elr": o.elr, "log2_se": dict(o.log2_se), "tau_iter": tau_iter(o.lr, o.wd)}
                       for o in self.optima],
            "fits": {q: {"a": f.a, "b": f.b, "a_ci": list(f.a_ci), "b_ci": list(f.b_ci)} for q, f in self.fits.items()},
            "predictions": {q: {"value": v, "lo": lo, "hi": hi} for q, (v, lo, hi) in self.predictions.items()},
            "caveats": self.caveats(),
            "claims": [{"claim": c.claim, "verdict": c.verdict, "exponent": c.exponent,
                        "interval": list(c.interval), "criterion": c.criterion} for c in self.claims],
        }


MIN_BUDGETS = 3
"""The fewest token budgets a fit takes: a line through them keeps a degree of freedom for their scatter."""


def check_budget_count(names: Sequence[str]) -> None:
    """ValueError unless `names` (one per token budget: `trajinv fit`'s directories) are MIN_BUDGETS or more."""
    if len(names) < MIN_BUDGETS:
        listed = f" ({', '.join(names)})" if names else ""
        raise ValueError(f"a scaling fit needs {MIN_BUDGETS} or more token budgets, one tune or sweep directory each; "
                         f"got {len(names)}{listed}")


def check_target_tokens(target_tokens: float | None) -> None:
    """ValueError unless `target_tokens` (the budget to predict at) is None or a positive, finite number."""
    if target_tokens is not None and not (target_tokens > 0 and math.isfinite(target_tokens)):
        raise ValueError(f"--target-tokens must be a positive, finite number of tokens, got {target_tokens!r}")


def _check_optima(optima: Sequence[BudgetOptimum]) -> None:
    # in the terms of `trajinv fit`, which reaches them: budgets and directories, not optima
    check_budget_count([o.source or f"{o.tokens:g} tokens" for o in optima])
    seen: dict[float, str] = {}
    for o in optima:
        if o.tokens in seen:
            raise ValueError(f"{seen[o.tokens]!r} and {o.source!r} trained the same budget, {o.tokens:g} tokens; "
                             "give one tune or sweep directory per budget")
        seen[o.tokens] = o.source
        if o.at_edge:
            axes = ", ".join(o.edge_axes) or "an unnamed axis"
            raise ValueError(f"the optimum of {o.source!r} (tokens={o.tokens:g}) is at the edge of its sweep "
                             f"along {axes}; extend the sweep past it before fitting (a tune: tune again in a "
                             "new --out whose scan or --check-factor values reach past it)")


def fit_scaling(optima: Sequence[BudgetOptimum], target_tokens: float | None = None, n_boot: int = 2000,
                ci: float = 0.9, seed: int = 0, lr_tolerance: float = 0.1) -> ScalingReport:
    """Fit lr, wd and elr against tokens, predict them at `target_tokens`, and judge the paper's claims.

    `lr_tolerance` is the largest |lr exponent| still called "nearly constant" (see the module docstring).
    """
    _check_optima(optima)
    check_target_tokens(target_tokens)
    if not lr_tolerance > 0:
        raise ValueError(f"lr_tolerance must be > 0, got {lr_tolerance!r}")
    optima = tuple(sorted(optima, key=lambda o: o.tokens))
    tokens = [o.tokens for o in optima]
    fits = {q: fit_power_law(tokens, [getattr(o, q) for o in optima], [o.log2_se.get(q, 0.0) for o in optima],
                             n_boot=n_boot, ci=ci, seed=seed + k)
            for k, q in enumerate(QUANTITIES)}
    predictions = {} if target_tokens is None else {q: f.predict(target_tokens) for q, f in fits.items()}
    claims = (_judge("optimal lr nearly constant in tokens", "lr", fits["lr"], (-lr_tolerance, lr_tolerance), optima),
              _judge("optimal wd decreases sublinearly in tokens", "wd", fits["wd"], (-1.0, 0.0), optima))
    return ScalingReport(optima, fits, target_tokens, predictions, claims, ci)


def _short(tokens: float) -> str:
    """819k, 1.6M, 16M: a token count in three significant digits at most."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if tokens >= scale:
            return f"{tokens / scale:.3g}{unit}"
    return f"{tokens:.3g}"


_LABEL_GAP = 2.0  # points: the least space left between two tick labels


def _unclash_tick_labels(ax, ticks: list[float], labels: list[str], rotation: float, target: float | None) -> None:
    """Blank the x tick labels that would overlap a kept one, once the layout has placed them: budgets close
    together on a log axis (81920 and 122880 beside 16M) ran into each other ("81.9k123k"), and no rotation
    keeps labels apart whose ticks are closer than a label is tall. The target's label is kept first (its
    star stands alone on the axis), then the largest and smallest budget's, then the others left to right;
    a blanked budget keeps its tick, and its point and error bar still mark it."""
    renderer = ax.figure.canvas.get_renderer()
    gap = _LABEL_GAP * ax.figure.dpi / 72 / 2  # pixels each box is padded by
    boxes = [tick.label1.get_window_extent(renderer).padded(gap) for tick in ax.xaxis.get_major_ticks(len(ticks))]
    first = [ticks.index(target)] if target else []
    order = first + [i for i in (len(ticks) - 1, 0, *range(1, len(ticks) - 1)) if i not in first]
    kept: list[int] = []
    for i in order:
        if not any(boxes[i].overlaps(boxes[j]) for j in kept):
            kept.append(i)
    if len(kept) < len(ticks):
        ax.set_xticks(ticks, [lab if i in kept else "" for i, lab in enumerate(labels)], rotation=rotation)


def plot_scaling(report: ScalingReport, out_png: str | Path) -> Path:
    """Optimum vs tokens in log-log, one panel per quantity: points with +-1 se, fit line, interval band, prediction."""
    fig = Figure(figsize=(12, 4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    tokens = np.array([o.tokens for o in report.optima])
    right = max(tokens.max(), report.target_tokens or 0.0)
    grid = np.geomspace(tokens.min(), right, 100)
    # ticks at the budgets (and the target), short labels: matplotlib labels the minor ticks of a
    # log axis spanning under a decade, and their 3x10^5 4x10^5 ... ran together
    ticks = sorted({*tokens.tolist(), *([report.target_tokens] if report.target_tokens else [])})
    labels, rotation = [_short(t) for t in ticks], 30 if len(ticks) > 3 else 0
    axes = fig.subplots(1, len(report.fits), squeeze=False)[0]
    for ax, (q, fit) in zip(axes, report.fits.items()):
        y = np.array([getattr(o, q) for o in report.optima])
        se = np.array([o.log2_se.get(q, 0.0) for o in report.optima])
        ax.errorbar(tokens, y, yerr=[y - y * 2.0 ** -se, y * 2.0 ** se - y], fmt="o", color="C0", label="optimum")
        value, lo, hi = fit.predict(grid)
        ax.plot(grid, value, color="C0", label=f"{q} ~ N^{fit.b:+.2f}")
        ax.fill_between(grid, lo, hi, color="C0", alpha=0.2, label=f"{report.ci:.0%} interval")
        if q in report.predictions:
            v, plo, phi = report.predictions[q]
            ax.errorbar([report.target_tokens], [v], yerr=[[v - plo], [phi - v]], fmt="*", color="C3",
                        markersize=12, label="prediction")
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel=f"optimal {q}",
               title=f"{q}: exponent [{fit.b_ci[0]:+.2f}, {fit.b_ci[1]:+.2f}]")
        ax.set_xticks(ticks, labels, rotation=rotation)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.08, y=0.12)  # the prediction's star and error bar clear the frame
        ax.legend(fontsize=8)
    fig.draw_without_rendering()  # the layout places the labels: only then can their overlaps be measured
    for ax in axes:
        _unclash_tick_labels(ax, ticks, labels, rotation, report.target_tokens)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    return out
