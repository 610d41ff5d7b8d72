"""Search logic of `trajinv tune`: populations of (lr, wd) points, one stage at a time.

Trajectory invariance (Li et al. 2025): late in a small-batch run the loss depends on
lr and wd only through ELR = lr*wd, so the 2-D search is a 1-D search along ELR at a
fixed lr. With a large batch or too few steps the salient direction is lr (at a fixed
wd); `classify_regime` says which. The search runs along that axis, x = log2(value):

1-scan    `points` members log-spaced over `octaves` around `center`: spacing s.
shift     the best finite member is at the edge of what was evaluated on the line: about
          half a scan (max(2, points//2)) more at spacing s beyond that edge, at most
          `max_shifts` times per line. Diverged members count as evaluated, so a diverged
          neighbour beyond the best stops the shifting: the optimum sits next to the
          divergence boundary and more members past it would only diverge too. If every
          member diverged the shift goes toward smaller values, the side that trains.
check     members on the invariant line through the best point: lr*f, wd/f (same ELR) for
          axis "elr", wd*f at the same lr for axis "lr", f in `check_factors`. Spread =
          max - min finite loss on the line, threshold = max(noise, 2 se_diff), the
          two-sigma band of the difference of the two extremes: se_diff is the std of
          that difference over the validation-window bootstrap resamples, which pair
          the members (every member is scored on the same windows, so what a window
          adds to one loss it adds much the same to the other; 0.011-0.021 nat against
          2 sqrt(se_hi^2 + se_lo^2) = 0.16-0.17 between neighbours of bench_tune's
          small-corpus grid), or sqrt(se_hi^2 + se_lo^2) without resamples (and in
          directories of search version 2 or older). Within it the 1-D answer stands. The check comes before any zoom: a zoom refines a line
          the check may leave, and on bench_tune's grids it left the first line in 3 of 5
          seeds (the zoom's members then bought nothing and the rescan went short).
rescan    otherwise a scan of +-2 s along the axis through the best member of that line (its
          lr for "elr", its wd for "lr"), explored (shifted) as above, at most `max_rescans`
          times; a rescanned line is checked again only while rescans are left (a check
          that cannot move the search any more would spend members on a report). Not when
          the best on the line is the checked point itself: it is best in both directions.
zoom      last, on the line the search settled on: the checked line when its check stood (a
          check member that scored lower did so within noise, alone on its line), else the
          line through the best point of all. A least-squares quadratic in x
          through the finite members within 1.5 s of the best (the best and its
          neighbours: near the optimum, where a quadratic holds; weights 1/se^2). Convex
          with its vertex inside those members -> `zoom_points` around the vertex, else
          around the best member, evenly out to +-w, w = min(s/2, `zoom_width`) (w/2 and
          w for 4). Never past s/2: that is halfway to a scanned neighbour that lost to
          the best. Not much past half an octave either: a coarse scan (s = 2) placed half
          its zoom a whole octave out, where the loss has risen by 0.05-0.07 nat (the
          curvature of bench_tune's fits) and no member of five tunes won; within +-0.5
          octave the same tunes found the same or lower losses (docs/design.md, README).

The recommendation is the vertex of the fit along the settled line when that fit is
usable (convex, its vertex inside its members), with the loss the fit predicts there and
that prediction's se; else the best evaluated member, with its measured loss. Near the
optimum the members differ by less than a run's noise: a zoom 0.25 octave apart on a
curvature of 0.023-0.026 nat/octave^2 separates them by ~0.002 nat, against ~0.01 nat of
seed noise, so the best member is mostly the luckiest run, and retrained at other seeds
it lands where its neighbours do. The vertex averages all the fit's members. On
bench_tune's small-corpus setting, each tune's choice retrained at the other seeds lost
0.017 nat to the grid's best from the vertex against 0.026 from the best member (median
of three seeds; random search and TPE 0.020; README "A setting whose optimum is interior
in both"). `TuneResult.best` is
the best member either way; search version 3 and older recommend it.

Budget: a stage costs len(points) * steps_per_member member-steps. The first scan must
fit (else ValueError); a later stage that does not is trimmed to the points nearest the
current best that fit, or skipped, and the search finishes with what it has.

The search is a pure function of the outcomes it was told: no randomness, no clock, ties
broken by evaluation order. Points count as the same when log2 lr and log2 wd agree to 9
decimals, so values that went through a different product or a JSON file still match.
"""

from __future__ import annotations

import math
import numbers
import statistics
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

from trajinv.tune.fit import (Axis, Fit, InvariantCheck, Recommendation, Regime, TuneResult, classify_regime,
                              fit_quadratic, grid_size, require_int, require_positive)

__all__ = ["Axis", "Point", "Outcome", "Stage", "SearchConfig", "Search", "Fit", "InvariantCheck",
           "Recommendation", "TuneResult", "Regime", "classify_regime", "simulate"]

StageKind = Literal["scan", "shift", "zoom", "check", "rescan"]

_DIGITS = 9  # log2 decimals that identify a point (see the module docstring)
_MIN_CHECK_OCTAVES = 1e-6  # a check factor nearer 1 can round (_DIGITS) to the checked point's key
_ROUNDOFF = 1e-12  # relative slack of the spread test: exactly invariant losses differ by round-off
_FIT_HALF_WIDTH = 1.5  # fit window half-width in scan spacings
_RESCAN_HALF_WIDTH = 2  # rescan half-width in scan spacings
_MAX_CHECK_OCTAVES = 10  # a check factor's distance from 1, in octaves
_MAX_OCTAVES = 40  # a first scan's width: 2**40 ~ 1e12 between its ends, far past any lr or ELR bracket


SEARCH_VERSION = 4
"""The search's rules as a tune directory records them (tune_spec.json), so it replays by its own: 4
recommends the fit's vertex when the fit is usable (module docstring, "The recommendation"; its stages are
version 3's), 3 and older the best member; 3 pairs
the check's two extremes on their bootstrap resamples (module docstring, "check"); 2 keeps
the zoom and the final fit on the checked line when its check stood; 1, in directories made before that,
puts them on the line through the best point of all."""


def _log2key(value: float) -> float:
    return round(math.log2(value), _DIGITS)


@dataclass(frozen=True)
class Point:
    """One member to train."""

    lr: float
    wd: float

    def __post_init__(self) -> None:
        require_positive("point lr", self.lr)
        require_positive("point wd", self.wd)

    @property
    def elr(self) -> float:
        return self.lr * self.wd

    @property
    def key(self) -> tuple[float, float]:
        """Identity of the point up to round-off."""
        return (_log2key(self.lr), _log2key(self.wd))

    def to_dict(self) -> dict:
        return {"lr": self.lr, "wd": self.wd, "elr": self.elr}


@dataclass(frozen=True)
class Outcome:
    """Final validation loss of one point; None or non-finite = diverged."""

    point: Point
    loss: float | None
    se: float = 0.0
    boot: tuple[float, ...] = field(default=(), repr=False)
    """The loss's validation-window bootstrap means, resample b averaging the same windows for every
    member (`trajinv.data.bootstrap`): paired, so a difference of two losses has its own noise; () when
    not logged."""

    def __post_init__(self) -> None:
        if self.finite and not (math.isfinite(self.se) and self.se >= 0):
            raise ValueError(f"se of a finite loss must be finite and >= 0, got {self.se!r}")
        if not all(isinstance(b, numbers.Real) and math.isfinite(b) for b in self.boot):
            raise ValueError("bootstrap means (boot) must be finite numbers")

    @property
    def finite(self) -> bool:
        return self.loss is not None and math.isfinite(self.loss)

    def to_dict(self) -> dict:
        finite = self.finite
        return {**self.point.to_dict(), "loss": self.loss if finite else None, "se": self.se if finite else None}


@dataclass(frozen=True)
class Stage:
    """One population to train; `name` is unique and stable (the stage's directory name)."""

    name: str
    kind: StageKind
    points: tuple[Point, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "points": [p.to_dict() for p in self.points]}


@dataclass(frozen=True)
class SearchConfig:
    """What to search and how far; validated on construction."""

    axis: Axis = "elr"
    """Salient direction: 'elr' (scan lr*wd at a fixed lr) or 'lr' (scan lr at a fixed wd)."""
    lr: float = 8e-3
    """Fixed lr of the ELR scan (axis 'elr')."""
    wd: float = 1.0
    """Fixed wd of an lr scan (axis 'lr')."""
    center: float | None = None
    """Bracket centre along the axis (ELR or lr); None -> lr*wd for 'elr', lr for 'lr'."""
    octaves: float = 6.0
    """Width of the first scan in log2 units."""
    points: int = 7
    """Members of the first scan, log-spaced: spacing = octaves/(points-1); >= 3 for a quadratic."""
    zoom_points: int = 4
    """Members of a zoom, around the fitted vertex out to +-min(spacing/2, zoom_width); 0 = no zoom."""
    zoom_width: float = 0.5
    """Farthest a zoom member lies from the zoom's centre, in octaves (capped at spacing/2)."""
    max_shifts: int = 2
    """Most shift stages per scanned line."""
    check_factors: tuple[float, ...] = (0.25, 0.5, 2.0, 4.0)
    """Multipliers along the invariant line: of lr (same ELR) for 'elr', of wd for 'lr'."""
    max_rescans: int = 1
    """Most rescans after a failed invariance check."""
    noise: float = 0.0
    """Absolute noise floor (nat) below which loss differences count as noise."""
    steps_per_member: int = 1
    """Member-steps one point costs (the cost unit)."""
    budget: int | None = None
    """Total member-steps; None = unbounded."""

    def __post_init__(self) -> None:
        if self.axis not in ("elr", "lr"):
            raise ValueError(f"axis must be 'elr' or 'lr', got {self.axis!r}")
        for name in ("lr", "wd", "octaves", "zoom_width"):
            require_positive(name, getattr(self, name))
        if self.octaves > _MAX_OCTAVES:  # 1e308 underflowed a wd to 0, 2000 overflowed the grid's size
            raise ValueError(f"octaves must be at most {_MAX_OCTAVES} (a scan from x2^-{_MAX_OCTAVES // 2} to "
                             f"x2^{_MAX_OCTAVES // 2} of its centre), got {self.octaves!r}")
        if self.center is not None:
            require_positive("center", self.center)
        for name, least in (("points", 3), ("zoom_points", 0), ("max_shifts", 0),
                            ("max_rescans", 0), ("steps_per_member", 1)):
            require_int(name, getattr(self, name), least)
        factors = tuple(self.check_factors)
        if not factors or any(not (isinstance(f, numbers.Real) and math.isfinite(f) and f > 0) or f == 1
                              for f in factors):
            raise ValueError(f"check_factors must be positive multipliers other than 1, got {self.check_factors!r}")
        same = [f for f in factors if abs(math.log2(f)) < _MIN_CHECK_OCTAVES]
        if same:  # 1 + 1e-10 passed the test above, then named the checked point itself as its check
            raise ValueError(f"check_factors {self.check_factors!r}: {same[0]!r} is within {_MIN_CHECK_OCTAVES:g} "
                             "octaves of 1, so its member could be the checked point itself")
        far = [f for f in factors if abs(math.log2(f)) > _MAX_CHECK_OCTAVES]
        if far:  # 1e-320 passed the test above, trained every stage, then overflowed a wd to inf
            raise ValueError(f"check_factors {self.check_factors!r}: {far[0]!r} is more than {_MAX_CHECK_OCTAVES} "
                             "octaves from 1 (the paper's iso-ELR checks span x1/4 .. x4)")
        object.__setattr__(self, "check_factors", tuple(float(f) for f in factors))
        if not (isinstance(self.noise, numbers.Real) and math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"noise must be finite and >= 0, got {self.noise!r}")
        if self.budget is not None:
            require_int("budget", self.budget, 1)
            if self.budget < self.scan_cost:
                raise ValueError(f"budget of {self.budget} member-steps is below the first scan's "
                                 f"{self.scan_cost} ({self.points} points x {self.steps_per_member})")

    @property
    def spacing(self) -> float:
        """Scan spacing in octaves."""
        return self.octaves / (self.points - 1)

    @property
    def zoom_half_width(self) -> float:
        """How far the outermost zoom members lie from the zoom's centre, in octaves."""
        return min(self.spacing / 2, self.zoom_width)

    @property
    def scan_cost(self) -> int:
        return self.points * self.steps_per_member


@dataclass(frozen=True)
class _Line:
    """A 1-D line of the search: the axis at a fixed lr ('elr') or a fixed wd ('lr')."""

    axis: Axis
    fixed: float

    @classmethod
    def through(cls, axis: Axis, p: Point) -> _Line:
        return cls(axis, p.lr if axis == "elr" else p.wd)

    def point(self, x: float) -> Point:
        value = 2.0 ** x
        return Point(self.fixed, value / self.fixed) if self.axis == "elr" else Point(value, self.fixed)

    def x(self, p: Point) -> float:
        return math.log2(p.elr if self.axis == "elr" else p.lr)

    def holds(self, p: Point) -> bool:
        return _log2key(p.lr if self.axis == "elr" else p.wd) == _log2key(self.fixed)

    def across(self, p: Point, factor: float) -> Point:
        """The point `factor` along the invariant direction from p (same ELR, or same lr)."""
        return Point(p.lr * factor, p.wd / factor) if self.axis == "elr" else Point(p.lr, p.wd * factor)

    def describe(self) -> str:
        return f"ELR line at lr={self.fixed:.4g}" if self.axis == "elr" else f"lr line at wd={self.fixed:.4g}"


class Search:
    """The tune search as a state machine: next_stage() -> train it -> tell() -> ... -> result()."""

    def __init__(self, cfg: SearchConfig, known: Sequence[Outcome] = (), budget: int | None = None,
                 prefix: str = "", version: int = SEARCH_VERSION) -> None:
        """`known`: outcomes measured before this search (the first ELR scan, for the lr search that
        follows it): never proposed again, and counted like its own in lines, fits, checks and the best,
        but not in its cost. `budget` (member-steps) replaces `cfg.budget` for such a search: SearchConfig
        asks a budget to afford a whole first scan, but the points `known` holds are read, not trained,
        so this one need only afford the rest (`fresh_scan_cost`). `prefix` starts its stages' names
        ("lr-" for the lr search: "lr-1-scan" beside the ELR search's "1-scan"). `version`: the rules
        (`SEARCH_VERSION`) of the directory being replayed."""
        if version not in range(1, SEARCH_VERSION + 1):
            raise ValueError(f"search version {version!r} is not one this trajinv knows (1..{SEARCH_VERSION})")
        self._version = version
        self.cfg = cfg
        self._prefix = prefix
        self._line = _Line(cfg.axis, cfg.lr if cfg.axis == "elr" else cfg.wd)
        default_centre = cfg.lr * cfg.wd if cfg.axis == "elr" else cfg.lr
        self._centre = math.log2(cfg.center if cfg.center is not None else default_centre)
        self._history: list[tuple[Stage, tuple[Outcome, ...]]] = []
        self._seen: dict[tuple[float, float], Outcome] = {o.point.key: o for o in known}  # in evaluation order
        self._pending: Stage | None = None
        self._phase = "scan"  # scan -> explore (shift)* -> check -> judge -> (rescan: explore ...) -> zoom -> done
        self._shifts = 0
        self._rescans = 0
        self._checked_at: Point | None = None
        self._check: InvariantCheck | None = None
        self._spent = 0
        self._notes: list[str] = []
        self._cut_short = False  # the budget skipped a stage (`_afford`)
        self._budget = cfg.budget if budget is None else budget
        if budget is not None and budget < self.fresh_scan_cost:
            raise ValueError(f"budget of {budget} member-steps is below the first scan's {self.fresh_scan_cost} "
                             "(its points not read from earlier stages)")

    @property
    def fresh_scan_cost(self) -> int:
        """Member-steps of the first scan's points that `known` does not hold."""
        keys = {p.key for p in self._scan_points()} - set(self._seen)
        return len(keys) * self.cfg.steps_per_member

    # ---- driving ---------------------------------------------------------------------
    def next_stage(self) -> Stage | None:
        """The stage to train next (the same one until told); None when finished."""
        while self._pending is None and self._phase != "done":
            planned = getattr(self, f"_plan_{self._phase}")()
            if planned is not None:
                self._pending = self._afford(*planned)
        return self._pending

    def tell(self, stage: Stage, outcomes: Sequence[Outcome], cost: int | None = None) -> None:
        """Record the outcomes of exactly the pending stage's points (any order). `cost`: the member-steps
        the stage took when not every point trained (one refused as untrainable, lr*wd >= 1, costs
        nothing; a diverged one costs its whole run, masked in its population); default every point at
        `steps_per_member`."""
        outcomes = tuple(outcomes)
        if self._pending is None or stage != self._pending:
            pending = self._pending.name if self._pending else None
            raise ValueError(f"tell() got stage {stage.name!r}, but the pending stage is {pending!r}")
        by_key = {o.point.key: o for o in outcomes}
        keys = [p.key for p in stage.points]
        if len(outcomes) != len(keys) or set(by_key) != set(keys):
            missing = next((p for p in stage.points if p.key not in by_key), None)
            raise ValueError(f"stage {stage.name!r} needs one outcome per point ({len(keys)}), got {len(outcomes)}"
                             + (f"; none for lr={missing.lr:.6g}, wd={missing.wd:.6g}" if missing else ""))
        full = len(keys) * self.cfg.steps_per_member
        if cost is not None and (isinstance(cost, bool) or not isinstance(cost, int) or not 0 <= cost <= full):
            raise ValueError(f"stage {stage.name!r} cost must be an int in [0, {full}] member-steps, got {cost!r}")
        ordered = tuple(by_key[k] for k in keys)
        self._history.append((stage, ordered))
        self._seen.update(zip(keys, ordered))
        self._spent += full if cost is None else cost
        self._pending = None

    def result(self) -> TuneResult:
        """The recommendation; valid once next_stage() returned None."""
        if self._pending is not None or self._phase != "done":
            raise RuntimeError("result() is valid once next_stage() returned None")
        best = self._best()
        notes = list(self._notes)
        if best is None:
            notes.append("every member diverged: no recommendation")
        else:
            notes.extend(self._end_of_line(best, notes))
            if self._check is not None:
                notes.extend(self._end_of_check(best))
        evaluated = [o.point for o in self._seen.values()]
        grid = grid_size([p.lr for p in evaluated], self.cfg.spacing) * grid_size(
            [p.wd for p in evaluated], self.cfg.spacing)
        fit = self._final_fit(best, notes) if best else None
        return TuneResult(
            axis=self.cfg.axis,
            best=best.point if best else None,
            loss=best.loss if best else None,
            se=best.se if best else None,
            fit=fit,
            invariant_check=self._check,
            stages=tuple(self._history),
            cost_member_steps=self._spent,
            grid_equivalent_points=grid,
            grid_equivalent_member_steps=grid * self.cfg.steps_per_member,
            notes=tuple(notes),
            recommendation=self._recommend(best, fit),
        )

    def _recommend(self, best: Outcome | None, fit: Fit | None) -> Recommendation | None:
        """The fit's vertex when there is a usable fit (search version 4), else the best member (module
        docstring, "The recommendation")."""
        if best is None:
            return None
        if fit is not None and self._version >= 4:
            lr, wd = fit.point(self.cfg.axis)
            return Recommendation(lr, wd, fit.loss, fit.se, "fit")
        return Recommendation(best.point.lr, best.point.wd, best.loss, best.se, "member")

    # ---- phases: each returns (kind, points) to propose, or None to go on ------------
    def _scan_points(self) -> list[Point]:
        half = (self.cfg.points - 1) / 2
        return [self._line.point(self._centre + (i - half) * self.cfg.spacing) for i in range(self.cfg.points)]

    def _plan_scan(self) -> tuple[StageKind, list[Point]]:
        self._phase = "explore"
        return "scan", self._scan_points()

    def _plan_explore(self) -> tuple[StageKind, list[Point]] | None:
        line, evaluated = self._line, self._on_line(self._line)
        finite = [(x, o) for x, o in evaluated if o.finite]
        can_shift = self._shifts < self.cfg.max_shifts
        if not finite:
            if can_shift:
                return self._shift(min(x for x, _ in evaluated), -1)
            self._notes.append(f"every member on the {line.describe()} diverged, "
                               f"also after {self._shifts} shift(s) toward smaller values")
            self._phase = "done"
            return None
        xb, _ = min(finite, key=lambda t: t[1].loss)
        notes = []
        for direction, side in ((1, "upper"), (-1, "lower")):
            beyond = [(abs(x - xb), o) for x, o in evaluated if (x - xb) * direction > 0]
            if not beyond:
                if can_shift:
                    return self._shift(xb, direction)
                notes.append(f"best on the {line.describe()} is still at its {side} edge after "
                             f"{self._shifts} shift(s): the optimum may lie beyond")
            elif not min(beyond, key=lambda t: t[0])[1].finite:
                notes.append(f"the member next to the best on the {line.describe()} ({side} side) diverged: "
                             "the optimum is at the divergence boundary, no shift into it")
        self._notes.extend(notes)  # only once the line is settled: explore runs again after each shift
        self._phase = "check" if self._check is None or self._rescans < self.cfg.max_rescans else "zoom"
        return None

    def _plan_zoom(self) -> tuple[StageKind, list[Point]] | None:
        self._phase = "done"
        n = self.cfg.zoom_points
        line, best = self._settled()
        if n == 0 or best is None:
            return None
        best = best.point
        self._line = line
        fit = self._fit(self._line, best)
        if fit is not None:
            centre = math.log2(fit.vertex)
        elif n == 1:  # its one point would be the best member itself
            self._notes.append(f"no zoom: one zoom point and no convex fit on the {self._line.describe()} to place "
                               "it (with its vertex inside the fitted members)")
            return None
        else:
            centre = self._line.x(best)
            self._notes.append(f"zoom on the {self._line.describe()} around the best member: "
                               "no convex fit with its vertex inside the fitted members")
        step = self.cfg.zoom_half_width / max(1, n // 2)  # the outermost pair at +-zoom_half_width
        offsets = ([0.0] if n % 2 else []) + [s * k * step for k in range(1, n // 2 + 1) for s in (-1, 1)]
        return "zoom", [self._line.point(centre + o) for o in sorted(offsets)]

    def _plan_check(self) -> tuple[StageKind, list[Point]]:
        fit = self._fit(self._line, self._best(self._line).point)  # the scanned line's shape, for the report
        if fit is not None:
            # labelled: the summary's "quadratic fit" line is the final one, after the zoom, on more members
            self._notes.append(f"fit on the {self._line.describe()} before the check (scanned members only): "
                               f"vertex at {fit.vertex:.4g}, predicted loss {fit.loss:.4g}, "
                               f"curvature {fit.curvature:.3g}/octave^2")
        best = self._best()
        assert best is not None  # explore finishes the search when the line has no finite member
        self._checked_at = best.point
        self._phase = "judge"
        return "check", [self._line.across(best.point, f) for f in self.cfg.check_factors]

    def _plan_judge(self) -> tuple[StageKind, list[Point]] | None:
        check = self._judge_check()
        self._check = check
        self._phase = "zoom"
        if check.within_noise:
            self._notes.append(f"invariant check: spread {check.spread:.4g} <= threshold {check.threshold:.4g}: "
                               "the 1-D answer stands")
            return None
        finite = [o for o in check.outcomes if o.finite]
        if len(finite) < 2:  # _judge_check noted it: nothing to compare, no direction to rescan
            return None
        top = min(finite, key=lambda o: o.loss)  # the recommendation wins ties: it is listed first
        self._notes.append(f"invariant check: spread {check.spread:.4g} > threshold {check.threshold:.4g}")
        if top.point.key == self._checked_at.key:
            self._notes.append("the checked point is best on its invariant line too (best in both directions): "
                               "no rescan")
        elif self._rescans >= self.cfg.max_rescans:
            self._notes.append(f"rescans exhausted ({self._rescans}): the answer is the best evaluated point")
        else:
            return self._rescan(top.point)
        return None

    # ---- helpers ---------------------------------------------------------------------
    def _rescan(self, through: Point) -> tuple[StageKind, list[Point]]:
        """A new line along the axis through `through`: +-2 spacings around it, then explore it."""
        self._rescans += 1
        self._shifts = 0
        self._line = line = _Line.through(self.cfg.axis, through)
        self._phase = "explore"
        xc, s = line.x(through), self.cfg.spacing
        return "rescan", [line.point(xc + k * s) for k in range(-_RESCAN_HALF_WIDTH, _RESCAN_HALF_WIDTH + 1)]

    def _shift(self, edge: float, direction: int) -> tuple[StageKind, list[Point]]:
        self._shifts += 1
        s, count = self.cfg.spacing, max(2, self.cfg.points // 2)
        return "shift", [self._line.point(edge + direction * k * s) for k in range(1, count + 1)]

    def _afford(self, kind: StageKind, proposed: list[Point]) -> Stage | None:
        """The stage of the new points of `proposed` that the budget allows; None if none."""
        fresh: dict[tuple[float, float], Point] = {}
        for p in proposed:
            if p.key not in self._seen:
                fresh.setdefault(p.key, p)
        points = list(fresh.values())
        if not points:
            return None
        name = f"{self._prefix}{len(self._history) + 1}-{kind}"
        if self._budget is not None:
            affordable = (self._budget - self._spent) // self.cfg.steps_per_member
            if affordable < len(points):
                points = self._nearest(points, affordable)
                if not points:
                    self._notes.append(f"budget: {name} skipped ({self._budget - self._spent} member-steps left, "
                                       f"a member costs {self.cfg.steps_per_member})")
                    self._phase = "done"
                    self._cut_short = True
                    return None
                self._notes.append(f"budget: {name} trimmed to {len(points)} of {len(fresh)} points")
        return Stage(name, kind, tuple(points))

    def _nearest(self, points: list[Point], count: int) -> list[Point]:
        """The `count` points nearest (in log2 lr, log2 wd) the current best, in their order."""
        best = self._best()
        ref = best.point if best else self._line.point(min(x for x, _ in self._on_line(self._line)))
        def distance(p: Point) -> float:
            return math.hypot(math.log2(p.lr / ref.lr), math.log2(p.wd / ref.wd))
        keep = set(sorted(range(len(points)), key=lambda i: distance(points[i]))[:count])
        return [p for i, p in enumerate(points) if i in keep]

    def _on_line(self, line: _Line) -> list[tuple[float, Outcome]]:
        return [(line.x(o.point), o) for o in self._seen.values() if line.holds(o.point)]

    def _best(self, line: _Line | None = None) -> Outcome | None:
        """Best finite outcome (on `line`, or anywhere); ties go to the first evaluated."""
        pool = self._seen.values() if line is None else (o for _, o in self._on_line(line))
        finite = [o for o in pool if o.finite]
        return min(finite, key=lambda o: o.loss) if finite else None

    def _fit(self, line: _Line, best: Point) -> Fit | None:
        """Quadratic through the line's finite members within the fit window around `best`;
        None unless convex with its vertex inside them (else it extrapolates or is a maximum)."""
        xb = line.x(best)
        near = [(x, o) for x, o in self._on_line(line)
                if o.finite and abs(x - xb) <= _FIT_HALF_WIDTH * self.cfg.spacing + 1e-9]
        quad = fit_quadratic([x for x, _ in near], [o.loss for _, o in near], [o.se for _, o in near])
        return Fit.of(quad, line.fixed)

    def _judge_check(self) -> InvariantCheck:
        rec = self._checked_at
        line = [rec] + [self._line.across(rec, f) for f in self.cfg.check_factors]
        outcomes = tuple(dict.fromkeys(self._seen[p.key] for p in line if p.key in self._seen))
        finite = [o for o in outcomes if o.finite]
        lo, hi = min(finite, key=lambda o: o.loss), max(finite, key=lambda o: o.loss)
        spread = hi.loss - lo.loss
        threshold = max(self.cfg.noise, 2.0 * self._difference_se(hi, lo))
        within = len(finite) >= 2 and spread <= threshold + _ROUNDOFF * max(1.0, abs(lo.loss))
        if len(finite) < len(outcomes):
            self._notes.append(f"{len(outcomes) - len(finite)} of {len(outcomes)} members on the invariant "
                               "line diverged (excluded from the spread)")
        if len(finite) < 2:
            self._notes.append("only the checked point is finite on its invariant line: invariance not confirmed")
        return InvariantCheck(outcomes, spread, threshold, within)

    def _difference_se(self, a: Outcome, b: Outcome) -> float:
        """Standard error of a.loss - b.loss: from their paired resamples where both have the same ones (search
        version 3), else as if independent (unpaired: the noise a window adds to both counted twice)."""
        if self._version >= 3 and len(a.boot) == len(b.boot) >= 2:
            return statistics.stdev(x - y for x, y in zip(a.boot, b.boot))
        return math.hypot(a.se, b.se)

    def _end_of_line(self, best: Outcome, notes: list[str]) -> list[str]:
        """A note when the budget stopped the search with the best at an end of the searched line: the shift
        that would have looked past it was never trained (a line settled with its best at an end is noted
        by `_plan_explore`; the check line's ends by `_end_of_check`)."""
        line = self._line
        if not self._cut_short or not line.holds(best.point):
            return []
        prefix = f"best on the {line.describe()} is "
        if any(n.startswith(prefix) for n in notes):
            return []
        xs = [x for x, _ in self._on_line(line)]
        x = line.x(best.point)
        return [f"{prefix}at its {side} edge and the budget stopped the search before a shift past it: the "
                "optimum may lie beyond (raise --budget, with a new --out)"
                for side, end in (("lower", min(xs)), ("upper", max(xs))) if x == end and len(xs) > 1]

    def _end_of_check(self, best: Outcome) -> list[str]:
        """A note when the recommendation is a check member at an end of the check's line: nothing explores a
        check line (shifts follow the searched one), so the optimum may lie beyond that end, unseen. The checked
        point itself is not noted: it lies on the searched line too."""
        along = "lr" if self.cfg.axis == "elr" else "wd"  # what varies along the check line
        checked, *members = self._check.outcomes
        if best.point.key not in {o.point.key for o in members}:
            return []
        xs = [getattr(o.point, along) for o in self._check.outcomes]
        x = getattr(best.point, along)
        if x not in (min(xs), max(xs)):
            return []
        lower = x == min(xs)
        factor = min(self.cfg.check_factors) if lower else max(self.cfg.check_factors)
        return [f"the recommendation is at the {'lower' if lower else 'upper'} end of the invariant check's line "
                f"({along} {x:.4g}): nothing was tried beyond it that way, so the optimum may lie further out "
                f"(a --check-factor {'below' if lower else 'above'} {factor:g} reaches there)"]

    def _settled(self) -> tuple[_Line, Outcome | None]:
        """The line the search settled on, and its best: the checked line when its check stood (the 1-D
        answer stands; a check member that scored lower did so within noise, alone on its line, where a
        zoom could fit nothing), else the line through the best point of all (a failed check found it
        off the scanned lines)."""
        if self._version >= 2 and self._check is not None and self._check.within_noise:
            return self._line, self._best(self._line)
        best = self._best()
        return (self._line if best is None else _Line.through(self.cfg.axis, best.point)), best

    def _final_fit(self, best: Outcome, notes: list[str]) -> Fit | None:
        line, on_line = self._settled()
        if on_line is not best:
            notes.append(f"the best point (lr={best.point.lr:.4g}, wd={best.point.wd:.4g}) is a check member "
                         f"{on_line.loss - best.loss:.3g} below the best on the {line.describe()}, within the "
                         "check's noise: the fit is along that line")
        fit = self._fit(line, on_line.point)
        if fit is None:
            notes.append(f"no convex fit with its vertex inside the members near the best on the {line.describe()}")
        return fit


def simulate(cfg: SearchConfig, oracle: Callable[[Point], Outcome], version: int = SEARCH_VERSION) -> TuneResult:
    """Drive a Search (by the rules of `version`) with `oracle` standing in for training (tests and benches)."""
    search = Search(cfg, version=version)
    while (stage := search.next_stage()) is not None:
        search.tell(stage, [oracle(p) for p in stage.points])
    return search.result()
