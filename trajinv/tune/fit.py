"""What the tune search concludes, and the numbers it concludes from: the weighted
quadratic fit in log2 of the searched value, the invariance-check and result records,
the size of the 2-D lr x wd grid a search is compared with, and the regime rule that
picks the salient axis (ELR or lr) for a run. The search itself is in `search.py`.

numpy only (no scipy): a 3-parameter least-squares problem needs nothing more.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from trajinv.gns.estimator import regime_batch

if TYPE_CHECKING:  # annotations only: search.py imports this module
    from trajinv.tune.search import Outcome, Point, Stage

Axis = Literal["elr", "lr"]


def require_positive(name: str, value: object) -> None:
    """One-line ValueError naming `name` and the value unless it is a positive finite number."""
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")


def require_int(name: str, value: object, least: int) -> None:
    """One-line ValueError naming `name` and the value unless it is an integer >= least."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


VERTEX_ROUNDING = 1e-9
"""Octaves: far above the rounding of a fitted vertex (~1e-15), far below any spacing a search uses."""


@dataclass(frozen=True)
class Quadratic:
    """loss ~ a u^2 + b u + c with u = x - x0, fitted to n points with x in [lo, hi]; x = log2(value)."""

    a: float
    b: float
    c: float
    x0: float
    lo: float
    hi: float
    n: int
    cov: tuple[tuple[float, ...], ...] | None = None
    """Covariance of (a, b, c) from the points' standard errors (as if independent); None when none was given."""

    @property
    def curvature(self) -> float:
        """d^2 loss / d x^2: nat per octave^2."""
        return 2.0 * self.a

    @property
    def vertex(self) -> float | None:
        """x of the minimum; None unless convex (the vertex of a concave fit is a maximum)."""
        return self.x0 - self.b / (2.0 * self.a) if self.a > 0 else None

    @property
    def usable(self) -> bool:
        """Convex with its vertex inside the fitted window, its ends included: outside it the fit extrapolates.
        The ends are widened by VERTEX_ROUNDING: a vertex on an end point comes out of the least squares a few
        ulps to either side, by the CPU's BLAS kernels (1.5000000000000007 for 1.5 on one machine, 1.5 on
        another), and a tune must not take another path by the machine it runs on."""
        v = self.vertex
        return v is not None and self.lo - VERTEX_ROUNDING <= v <= self.hi + VERTEX_ROUNDING

    def value(self, x: float) -> float:
        u = x - self.x0
        return self.a * u * u + self.b * u + self.c

    def value_se(self, x: float) -> float:
        """Standard error of `value(x)` propagated from the points' se (0 when they gave none). At the vertex
        the value does not move to first order with the vertex's position, so this is its se there too."""
        if self.cov is None:
            return 0.0
        u = x - self.x0
        g = np.array([u * u, u, 1.0])
        return float(math.sqrt(max(float(g @ np.array(self.cov) @ g), 0.0)))


@dataclass(frozen=True)
class Fit:
    """The quadratic along the line the search settled on (`fixed`): where it puts the optimum."""

    vertex: float
    """Fitted optimum along the axis (an ELR or an lr value)."""
    loss: float
    """Loss the fit predicts at the vertex."""
    curvature: float
    """d^2 loss / d log2(value)^2 (nat per octave^2)."""
    points: int
    """Finite members the fit went through."""
    fixed: float
    """The line: its lr for axis 'elr', its wd for axis 'lr'."""
    se: float = 0.0
    """Standard error of `loss`, from the members' se (`Quadratic.value_se`)."""

    @classmethod
    def of(cls, quad: Quadratic | None, fixed: float) -> Fit | None:
        """The vertex of `quad` along the line at `fixed`; None unless the quadratic is usable."""
        if quad is None or not quad.usable:
            return None
        return cls(2.0 ** quad.vertex, quad.value(quad.vertex), quad.curvature, quad.n, fixed,
                   quad.value_se(quad.vertex))

    def point(self, axis: Axis) -> tuple[float, float]:
        """(lr, wd) of the vertex: on an ELR line (axis 'elr') at lr `fixed`, on an lr line at wd `fixed`."""
        return (self.fixed, self.vertex / self.fixed) if axis == "elr" else (self.vertex, self.fixed)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InvariantCheck:
    """Losses along the invariant line through a recommendation."""

    outcomes: tuple[Outcome, ...]
    """The recommendation first, then the line's members (diverged ones included)."""
    spread: float
    """max - min of the finite losses."""
    threshold: float
    """max(noise, 2 se of max - min): that se paired over the members' bootstrap resamples (search version 3;
    without resamples, or before, sqrt(se_max^2 + se_min^2))."""
    within_noise: bool
    """Spread within threshold with at least two finite losses: the 1-D answer stands."""

    def to_dict(self) -> dict:
        return {"points": [o.to_dict() for o in self.outcomes], "spread": self.spread,
                "threshold": self.threshold, "within_noise": self.within_noise}


@dataclass(frozen=True)
class Recommendation:
    """The (lr, wd) a tune recommends: the fit's vertex (`source` 'fit') or a trained member ('member')."""

    lr: float
    wd: float
    loss: float
    """Validation loss: the fit's prediction at its vertex, or the member's measured loss."""
    se: float
    """Standard error of `loss` (validation windows; the fit's propagated from its members')."""
    source: Literal["fit", "member"]

    @property
    def elr(self) -> float:
        return self.lr * self.wd

    def to_dict(self) -> dict:
        return {"lr": self.lr, "wd": self.wd, "elr": self.elr, "val_loss": self.loss, "val_loss_se": self.se,
                "source": self.source}


@dataclass(frozen=True)
class TuneResult:
    """What the search found and what it cost; `to_dict()` is JSON-ready."""

    axis: Axis
    best: Point | None
    """Best evaluated point; None when every member diverged."""
    loss: float | None
    se: float | None
    fit: Fit | None
    invariant_check: InvariantCheck | None
    """The last check done (its first outcome is the point it checked)."""
    stages: tuple[tuple[Stage, tuple[Outcome, ...]], ...]
    cost_member_steps: int
    grid_equivalent_points: int
    """Points of a 2-D lr x wd grid at the scan spacing covering every evaluated lr and wd."""
    grid_equivalent_member_steps: int
    notes: tuple[str, ...]
    recommendation: Recommendation | None = None
    """What to train with: the fit's vertex when the fit is usable (search version 4), else `best`."""

    def to_dict(self) -> dict:
        return {
            "axis": self.axis,
            "recommendation": self.recommendation.to_dict() if self.recommendation else None,
            "best": self.best.to_dict() if self.best else None,
            "loss": self.loss,
            "se": self.se,
            "fit": self.fit.to_dict() if self.fit else None,
            "invariant_check": self.invariant_check.to_dict() if self.invariant_check else None,
            "stages": [{**s.to_dict(), "outcomes": [o.to_dict() for o in outs]} for s, outs in self.stages],
            "cost_member_steps": self.cost_member_steps,
            "grid_equivalent_points": self.grid_equivalent_points,
            "grid_equivalent_member_steps": self.grid_equivalent_member_steps,
            "notes": list(self.notes),
        }


def _weights(ses: Sequence[float]) -> np.ndarray:
    """1/se^2 where standard errors are given; an se of 0 is floored at the smallest positive
    one (it is not infinitely precise, just unmeasured); all zero -> equal weights."""
    se = np.asarray(ses, dtype=float)
    positive = se[se > 0]
    if positive.size == 0:
        return np.ones_like(se)
    return 1.0 / np.maximum(se, positive.min()) ** 2


def fit_quadratic(xs: Sequence[float], ys: Sequence[float], ses: Sequence[float]) -> Quadratic | None:
    """Weighted least-squares quadratic; None with fewer than 3 distinct x (underdetermined)."""
    if len(set(xs)) < 3:
        return None
    x = np.asarray(xs, dtype=float)
    x0 = float(x.mean())  # centring keeps the normal equations well conditioned
    u = x - x0
    sw = np.sqrt(_weights(ses))
    design = np.stack([u * u, u, np.ones_like(u)], axis=1) * sw[:, None]
    coef = np.linalg.lstsq(design, np.asarray(ys, dtype=float) * sw, rcond=None)[0]
    a, b, c = (float(v) for v in coef)
    # with weights 1/se^2 the coefficients' covariance is (D^T D)^-1 (D: the weighted design); pinv, as 3
    # distinct x make D^T D invertible in exact arithmetic but a near-degenerate spacing can round it singular
    cov = None
    if any(v > 0 for v in ses):
        cov = tuple(tuple(float(v) for v in row) for row in np.linalg.pinv(design.T @ design))
    return Quadratic(a, b, c, x0, float(x.min()), float(x.max()), len(xs), cov)


def grid_size(values: Sequence[float], spacing: float) -> int:
    """Points of a log2 grid at `spacing` octaves covering every value (both ends included)."""
    octaves = math.log2(max(values) / min(values))
    return math.ceil(octaves / spacing - 1e-9) + 1  # 1e-9: an exact multiple must not round up


@dataclass(frozen=True)
class Regime:
    """Which direction is salient for a run, and why."""

    axis: Axis
    small_batch: bool | None
    """batch_size < B_precond; None when B_precond is unmeasured."""
    enough_iterations: bool
    """steps*lr*wd >= min_transitions."""
    b_precond: float | None
    reason: str
    batch_schedule: str | None
    """For a large batch: a small-batch-first schedule 'B1@f,B2' that recovers ELR invariance."""


MIN_TRANSITIONS = 1.0
"""Enough iterations for ELR invariance: steps * lr * wd of the best member at least this, i.e. the run
past one weight-decay timescale tau = 1/(lr wd). Not more: the optimum itself sits near one tau. Two
tiny-model settings measured here put the best member of an ELR scan at steps * lr * wd = 1.56 (batch
32, 800 steps, WSD: ELR 2^-9; batch 8, 1600 steps: 2^-10), the optimal tau a fixed share of the run
(as Wang & Aitchison 2024 found), and the demo sweep's LR -> ELR transition (the step from which iso-ELR
spreads stay below iso-LR ones) came at lr * wd * step of 0.5 to 8 across its members. A threshold of 3
would call every well-tuned run of these settings too short."""


def classify_regime(b_precond: float | None, batch_size: int, steps: int, lr: float, wd: float,
                    min_transitions: float = MIN_TRANSITIONS, schedule: Sequence[int] | None = None,
                    sequences: int | None = None) -> Regime:
    """The salient axis: 'elr' when the batch is small and the run long enough for the
    LR->ELR transition (~1/(lr*wd) steps, `min_transitions` times over); else 'lr'.

    A run with a batch-size schedule passes its `schedule` (the batch sizes in order) and the
    `sequences` it trains in all: its smallest batch is the one compared with B_precond (the phase
    that makes the transition, the paper's small-batch-first schedule), and a schedule suggested for a
    large batch ends at its last batch with its token budget."""
    require_int("batch_size", batch_size, 1)
    require_int("steps", steps, 1)
    sizes = tuple(schedule) if schedule else (batch_size,)
    if len(sizes) > 1:
        batch_size = regime_batch(sizes)
    final = sizes[-1]
    sequences = steps * final if sequences is None else sequences
    for name, value in (("lr", lr), ("wd", wd), ("min_transitions", min_transitions)):
        require_positive(name, value)
    measured = b_precond is not None and math.isfinite(b_precond)
    small = batch_size < b_precond if measured else None
    transitions = steps * lr * wd
    enough = transitions >= min_transitions
    which = f"batch {batch_size}" + (" (the schedule's smallest)" if len(sizes) > 1 else "")
    if small is None:
        reasons = ["B_precond unmeasured: assuming a small batch"]
    elif small:
        reasons = [f"{which} < B_precond {b_precond:.4g}: small batch"]
    else:
        reasons = [f"{which} >= B_precond {b_precond:.4g}: large batch, the loss follows lr"]
    relation = ">=" if enough else "<"
    reasons.append(f"steps*lr*wd = {transitions:.3g} {relation} {min_transitions:g}: "
                   + ("enough" if enough else "too few") + f" steps for the LR->ELR transition "
                   f"(~{1 / (lr * wd):.0f} steps each)")
    axis: Axis = "elr" if small is not False and enough else "lr"
    schedule = _small_batch_first(b_precond, final, sequences, lr * wd, min_transitions) if small is False else None
    if schedule:
        reasons.append(f"a small-batch phase first recovers ELR invariance: batch-size schedule {schedule}, "
                       "with --tokens at this run's token budget (its switch point is a fraction of the tokens; "
                       "at a step count the small batch would train fewer)")
        small_batch = int(schedule.split("@")[0])
        # the phase is capped at half the run's tokens: that many tokens at the small batch
        if 0.5 * sequences / small_batch * lr * wd < min_transitions:
            reasons.append("even half the run's tokens at the small batch are too few steps for the transition: "
                           "more tokens are needed too")
    return Regime(axis, small, enough, b_precond if measured else None, "; ".join(reasons), schedule)


def _small_batch_first(b_precond: float, batch_size: int, sequences: int, elr: float,
                       transitions: float) -> str | None:
    """'B1@f,B2' (B2 = `batch_size`) at the run's token budget (`sequences` in all): B1 the largest power of
    two below B_precond for the fraction f of the *tokens* (the schedule's convention) that gives
    ~`transitions`/ELR steps at B1, i.e. f = n1 B1 / sequences (rounded up to 0.01, capped at half the tokens);
    None if B_precond <= 2: a batch of 1 cannot measure the noise scale (micro-batch GNS needs two
    micro-batches) and would be refused by the very command it is suggested for."""
    if b_precond <= 2:
        return None
    small = 2 ** (math.ceil(math.log2(b_precond)) - 1)
    share = transitions / elr * small / sequences
    fraction = min(0.5, max(0.01, math.ceil(share * 100 - 1e-9) / 100))  # 1e-9: 0.2 stays 0.2
    return f"{small}@{fraction:g},{batch_size}"
