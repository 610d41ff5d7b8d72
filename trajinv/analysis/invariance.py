"""Read a sweep directory and say along which direction the loss curves overlap.

The trajectory invariance principle (docs/design.md) predicts that early in training
curves with the same learning rate overlap whatever the weight decay is (LR
invariance), and later curves with the same effective learning rate
``ELR = lr * wd`` overlap (ELR invariance), the switch happening after about
``1 / (lr * wd)`` steps. This module measures exactly that on logged metrics:

* iso-LR groups: members with the same base lr (and batch-size schedule) and at
  least two distinct weight decays;
* iso-ELR groups: members with the same ``lr * wd`` (and batch-size schedule) and
  at least two distinct learning rates;
* the *spread* of a group at a step is ``max - min`` of the metric over its
  members; a small spread means the curves coincide there. Beside it, the
  *per-octave gap* (comparable across group sizes and spans) and the standard
  error of both from the validation-window bootstrap (`trajinv.analysis.spreads`);
* the verdict of a phase is the kind of group with the smaller mean spread,
  flagged when the difference is within noise.

Groups never mix batch-size schedules: members of one schedule see the same batches
at the same step, whatever population (run) they trained in; members of different
schedules do not. Positions are steps by default; ``x="tokens"`` reads every curve
at the same number of tokens trained, to compare schedules at equal data.

Everything here is pure functions over metric records (`trajinv.analysis.records`),
so the analysis can be tested on synthetic curves and reused on partial (still
running) sweeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from trajinv.analysis.records import REL_TOL, X_AXES, Curve, MemberKey, curves, load_metrics, load_summary
from trajinv.analysis.spreads import NOISE_Z, GroupStats, group_stats, mean_boot, se, within_noise

EARLY_FRACTION = 0.1
"""Default early step: the evaluated step closest to this fraction of the late
step. 10% is past a typical warm-up yet well before ``1/(lr*wd)`` steps for
the usual grids, where the paper sees LR invariance."""

# ------------------------------------------------------------------------ groups


@dataclass(frozen=True)
class Group:
    """Members of one batch-size schedule sharing one value of lr (kind "LR") or of lr*wd
    (kind "ELR"), sorted by the varying hyperparameter (wd, or lr)."""

    kind: str
    value: float
    batch_size: int | None
    members: tuple[Curve, ...]
    batch_schedule: str | None = None

    @property
    def varying(self) -> list[float]:
        """Each member's value of the hyperparameter that varies: wd (iso-LR) or lr (iso-ELR)."""
        return [c.wd if self.kind == "LR" else c.lr for c in self.members]

    def spread_at(self, pos: float, x: str = "step") -> float:
        """max - min of the members' values at ``pos`` (NaN if < 2 have one)."""
        vals = [v for v in (c.at(pos, x) for c in self.members) if math.isfinite(v)]
        return max(vals) - min(vals) if len(vals) >= 2 else math.nan

    def stats_at(self, pos: float, x: str = "step") -> GroupStats:
        """Spread, per-octave gap and their bootstrap at ``pos`` (`trajinv.analysis.spreads`)."""
        return group_stats(self.varying, [c.at(pos, x) for c in self.members],
                           [c.boot_at(pos, x) for c in self.members], spread=self.spread_at(pos, x))


def _cluster(values: Sequence[float]) -> list[list[int]]:
    """Indices grouped by equal value within REL_TOL (values sorted first)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out: list[list[int]] = []
    for i in order:
        if out and math.isclose(values[i], values[out[-1][0]], rel_tol=REL_TOL, abs_tol=0.0):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _schedule(c: Curve):
    return c.batch_schedule if c.batch_schedule is not None else c.batch_size


def _groups(cs: Iterable[Curve], kind: str) -> list[Group]:
    # Curves of different batch-size schedules see different batches at a step (a '32@0.1,256'
    # population and a constant-32 one share the first batch size, not the run): never mix them.
    live = [c for c in cs if not c.diverged]
    if kind == "ELR":  # wd = 0 is no ELR: those members follow lr for the whole run
        live = [c for c in live if c.elr > 0]
    by_schedule: dict = {}
    for c in live:
        by_schedule.setdefault(_schedule(c), []).append(c)
    out = []
    order = sorted(by_schedule.items(), key=lambda kv: (kv[0] is None, kv[1][0].batch_size or 0, str(kv[0])))
    for schedule, members in order:
        shared = [c.lr if kind == "LR" else c.elr for c in members]
        for idx in _cluster(shared):
            g = [members[i] for i in idx]
            varying = [c.wd if kind == "LR" else c.lr for c in g]
            if len(_cluster(varying)) >= 2:
                g.sort(key=lambda c: c.wd if kind == "LR" else c.lr)
                out.append(Group(kind, float(np.mean([shared[i] for i in idx])), g[0].batch_size, tuple(g),
                                 None if schedule is None else str(schedule)))
    return out


def iso_lr_groups(cs: Iterable[Curve]) -> list[Group]:
    """Non-diverged members with equal lr (and batch-size schedule) and >= 2 distinct wd."""
    return _groups(cs, "LR")


def iso_elr_groups(cs: Iterable[Curve]) -> list[Group]:
    """Non-diverged members with equal ELR > 0 (lr*wd; wd in independent decay mode: the logged `elr`)
    (and batch-size schedule) and >= 2 distinct lr."""
    return _groups(cs, "ELR")


def _mean_spread(groups: Sequence[Group], pos: float, x: str = "step") -> float:
    s = [g.spread_at(pos, x) for g in groups]
    s = [v for v in s if math.isfinite(v)]
    return float(np.mean(s)) if s else math.nan


@dataclass(frozen=True)
class _KindStats:
    """Means over one kind's groups at one position, with their resampled values."""

    spread: float
    spread_boot: np.ndarray | None
    octave: float
    octave_boot: np.ndarray | None


def _kind_stats(groups: Sequence[Group], stats: Sequence[GroupStats], pos: float, x: str) -> _KindStats:
    finite = [st for st in stats if math.isfinite(st.spread)]
    octaves = [st for st in stats if math.isfinite(st.octave)]
    return _KindStats(_mean_spread(groups, pos, x), mean_boot([st.spread_boot for st in finite]),
                      float(np.mean([st.octave for st in octaves])) if octaves else math.nan,
                      mean_boot([st.octave_boot for st in octaves]))


# ------------------------------------------------------------------------- steps


class AllDiverged(ValueError):
    """Every member of a sweep diverged: there is no invariance to measure (its phases and tuning
    curves still say something)."""


def default_steps(cs: Iterable[Curve], x: str = "step") -> tuple[int, int]:
    """(early, late) positions (steps, or tokens with x="tokens") used when the caller gives none.

    late: the last position every non-diverged member has reached (the smallest
    of their last logged positions; with a shared eval grid, the last eval step
    common to all). early: see _early_step.
    """
    cs = list(cs)
    live = [c for c in cs if not c.diverged and len(c.steps)]
    if not live:
        if cs and all(c.diverged for c in cs):
            raise AllDiverged("every member diverged: no curves to compare")
        raise ValueError("no member has a logged value yet (stopped before its first evaluation?)")
    late = int(min(c.axis(x)[-1] for c in live))
    return _early_step(live, late, x), late


def _early_step(live: Sequence[Curve], late: int, x: str = "step") -> int:
    # The logged position closest to EARLY_FRACTION of late; position 0 is excluded
    # because all members share the initialisation, so it says nothing. Not before every member's
    # first logged position: on a tokens axis a larger batch evaluates later, and a group without a
    # value there would drop out of the early mean unannounced.
    first = max((min((s for s in c.axis(x) if s > 0), default=late) for c in live), default=0)
    cand = [s for s in _eval_steps(live, late, x) if s >= first] or [late]
    return min(cand, key=lambda s: (abs(s - EARLY_FRACTION * late), s))


def _eval_steps(cs: Sequence[Curve], late: int, x: str = "step") -> list[int]:
    return sorted({int(s) for c in cs for s in c.axis(x) if 0 < s <= late})


def transition_step(
    records: Iterable[dict] | dict[MemberKey, Curve],
    key: str = "val_loss",
    late_step: int | None = None,
    diverged: Iterable[MemberKey] = (),
    x: str = "step",
) -> int | None:
    """First logged step (or token count, x="tokens") from which the iso-ELR mean spread
    stays below the iso-LR mean spread up to ``late_step``: the observed LR -> ELR switch.

    None when it never happens (or when one kind of group is missing).
    Positions where either mean spread is undefined are ignored.
    """
    cs = records if isinstance(records, dict) else curves(records, key, diverged)
    return _transition(list(cs.values()), iso_lr_groups(cs.values()), iso_elr_groups(cs.values()), late_step, x)


def _transition(cs: list[Curve], lr_g: list[Group], elr_g: list[Group], late: int | None,
                x: str = "step") -> int | None:
    if not lr_g or not elr_g:
        return None
    if late is None:
        late = default_steps(cs, x)[1]
    members = [c for g in (*lr_g, *elr_g) for c in g.members]
    found = None
    for s in _eval_steps(members, late, x):
        a, b = _mean_spread(lr_g, s, x), _mean_spread(elr_g, s, x)
        if not (math.isfinite(a) and math.isfinite(b)):
            continue
        if b < a:
            found = s if found is None else found
        else:
            found = None
    return found


# ------------------------------------------------------------------------ report


@dataclass(frozen=True)
class GroupSpread:
    """One group's spread at the early and late positions, with its per-octave gap and noise."""

    kind: str
    """"LR" (same lr, wd varies) or "ELR" (same lr*wd, lr varies)."""
    value: float
    batch_size: int | None
    members: tuple[str, ...]
    early: float
    late: float
    batch_schedule: str | None = None
    early_se: float = math.nan
    """Bootstrap standard error of ``early`` (NaN when resamples were not logged)."""
    late_se: float = math.nan
    early_octave: float = math.nan
    """Per-octave gap (`trajinv.analysis.spreads`) at the early position."""
    early_octave_se: float = math.nan
    late_octave: float = math.nan
    late_octave_se: float = math.nan
    early_within_noise: bool | None = None
    """The spread is at most NOISE_Z standard errors of the extreme pair's difference."""
    late_within_noise: bool | None = None

    @property
    def label(self) -> str:
        what = "lr" if self.kind == "LR" else "elr"  # the logged ELR: lr*wd, or wd in independent decay mode
        bs = self.batch_schedule if self.batch_schedule is not None else self.batch_size
        return f"{what}={self.value:.3g}" + ("" if bs is None else f",B={bs}")


def _verdict(lr_spread: float, elr_spread: float) -> str:
    if not (math.isfinite(lr_spread) and math.isfinite(elr_spread)):
        return "n/a"
    if math.isclose(lr_spread, elr_spread, rel_tol=1e-9, abs_tol=1e-12):
        return "tie"
    return "LR" if lr_spread < elr_spread else "ELR"


@dataclass(frozen=True)
class InvarianceReport:
    """Which invariance holds early and late, with the numbers behind it."""

    key: str
    """The metric compared (validation loss by default)."""
    early_step: int
    """The early position: a step, or a token count when ``x`` is "tokens"."""
    late_step: int
    iso_lr_early: float
    """Mean spread (max - min) over iso-LR groups at the early step."""
    iso_elr_early: float
    iso_lr_late: float
    iso_elr_late: float
    verdict_early: str
    """"LR" or "ELR" (the kind with the smaller spread), "tie", or "n/a"."""
    verdict_late: str
    groups: tuple[GroupSpread, ...] = ()
    diverged: tuple[str, ...] = ()
    """Names of the members left out of every spread."""
    transition_step: int | None = None
    """First step (token count with x="tokens") from which iso-ELR curves stay closer than iso-LR ones."""
    transition_elr_steps: tuple[float, float] | None = None
    """(min, max) of lr*wd*transition_step over the grouped members: the principle
    expects the switch after about 1/(lr*wd) steps, i.e. a value of order 1 (with
    x="tokens", each member's step at the transition's token count)."""
    x: str = "step"
    """What the positions count: "step" or "tokens"."""
    iso_lr_early_se: float = math.nan
    """Bootstrap standard error of iso_lr_early (NaN without logged resamples); likewise below."""
    iso_elr_early_se: float = math.nan
    iso_lr_late_se: float = math.nan
    iso_elr_late_se: float = math.nan
    iso_lr_early_octave: float = math.nan
    """Mean per-octave gap over iso-LR groups at the early step; likewise below."""
    iso_elr_early_octave: float = math.nan
    iso_lr_late_octave: float = math.nan
    iso_elr_late_octave: float = math.nan
    iso_lr_early_octave_se: float = math.nan
    iso_elr_early_octave_se: float = math.nan
    iso_lr_late_octave_se: float = math.nan
    iso_elr_late_octave_se: float = math.nan
    difference_early_se: float = math.nan
    """Bootstrap SE of iso_lr_early - iso_elr_early (resampled jointly: paired across members)."""
    difference_late_se: float = math.nan
    within_noise_early: bool | None = None
    """|iso_lr_early - iso_elr_early| <= NOISE_Z * difference_early_se: the verdict is not
    resolved by the validation set; None when the SE is unknown."""
    within_noise_late: bool | None = None

    def format(self, details: bool = False) -> str:
        """A short plain-text table; ``details`` adds one line per group."""
        n_lr = sum(g.kind == "LR" for g in self.groups)
        n_elr = len(self.groups) - n_lr
        head = f"{self.key} spread (max-min) within groups"
        where = "step" if self.x == "step" else "tokens"
        e_col, l_col = f"early ({where} {self.early_step})", f"late ({where} {self.late_step})"
        rows = [
            (head, e_col, l_col),
            (f"iso-LR  ({n_lr} group{'s' * (n_lr != 1)}: same lr, wd varies)", _pm(self.iso_lr_early, self.iso_lr_early_se),
             _pm(self.iso_lr_late, self.iso_lr_late_se)),
            (f"iso-ELR ({n_elr} group{'s' * (n_elr != 1)}: same lr*wd, lr varies)", _pm(self.iso_elr_early, self.iso_elr_early_se),
             _pm(self.iso_elr_late, self.iso_elr_late_se)),
            ("per octave: iso-LR", _pm(self.iso_lr_early_octave, self.iso_lr_early_octave_se),
             _pm(self.iso_lr_late_octave, self.iso_lr_late_octave_se)),
            ("per octave: iso-ELR", _pm(self.iso_elr_early_octave, self.iso_elr_early_octave_se),
             _pm(self.iso_elr_late_octave, self.iso_elr_late_octave_se)),
            ("curves overlap along", _noted(self.verdict_early, self.within_noise_early),
             _noted(self.verdict_late, self.within_noise_late)),
        ]
        if details:
            rows += [(f"  {g.kind:<3} {g.label} ({len(g.members)} members)",
                      _pm(g.early, g.early_se) + (" ~" if g.early_within_noise else ""),
                      _pm(g.late, g.late_se) + (" ~" if g.late_within_noise else ""))
                     for g in self.groups]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        w2 = max(len(r[2]) for r in rows)
        lines = [f"{a:<{w0}}  {b:>{w1}}  {c:>{w2}}" for a, b, c in rows]
        if self.transition_step is None and not (n_lr and n_elr):  # it compares the two kinds of group
            missing = " or ".join(kind for kind, n in (("iso-LR", n_lr), ("iso-ELR", n_elr)) if not n)
            lines.append(f"LR -> ELR transition: not measurable: no {missing} group (it compares members of one "
                         "lr with different wd against members of one lr*wd with different lr)")
        elif self.transition_step is None:
            lines.append(f"LR -> ELR transition: not observed up to the late {where} ({self.late_step})")
        else:
            lo, hi = self.transition_elr_steps or (math.nan, math.nan)
            lines.append(f"LR -> ELR transition: {where} {self.transition_step} "
                         f"(lr*wd*step {lo:.3g}..{hi:.3g}; expected order 1)")
        if details and any(g.early_within_noise or g.late_within_noise for g in self.groups):
            lines.append(f"~ within noise: max-min <= {NOISE_Z:g} SE of the paired gap between its extreme members")
        if self.diverged:
            lines.append("diverged (excluded): " + ", ".join(self.diverged))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable form (NaN kept as float NaN)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "groups"}
        d["groups"] = [g.__dict__.copy() for g in self.groups]
        for g in d["groups"]:
            g["members"] = list(g["members"])
        d["diverged"] = list(self.diverged)
        return d


def _f(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.4f}"


def _pm(value: float, stderr: float) -> str:
    """'0.1810 ± 0.0120', or the value alone when its SE is unknown."""
    return _f(value) + (f" ± {stderr:.4f}" if math.isfinite(value) and math.isfinite(stderr) else "")


def _noted(verdict: str, noise: bool | None) -> str:
    return f"{verdict} (within noise)" if noise and verdict in ("LR", "ELR") else verdict


def invariance_report(
    records: Iterable[dict] | dict[MemberKey, Curve],
    early_step: int | None = None,
    late_step: int | None = None,
    key: str = "val_loss",
    diverged: Iterable[MemberKey] = (),
    x: str = "step",
) -> InvarianceReport:
    """Spreads of ``key`` within iso-LR and iso-ELR groups, early and late, with their
    per-octave gaps and bootstrap standard errors.

    ``records`` are metric dicts (as from load_metrics) or ready curves.
    Defaults: see default_steps. A position not logged by a member is linearly
    interpolated from its neighbours. Diverged members are excluded and listed.
    ``x="tokens"`` takes ``early_step``/``late_step`` and reports positions as tokens
    trained: curves of different batch-size schedules are then read at equal data.
    """
    if x not in X_AXES:
        raise ValueError(f"x must be one of {X_AXES}, got {x!r}")
    cs = records if isinstance(records, dict) else curves(records, key, diverged)
    all_c = list(cs.values())
    lr_g, elr_g = iso_lr_groups(all_c), iso_elr_groups(all_c)
    late = default_steps(all_c, x)[1] if late_step is None else int(late_step)
    live = [c for c in all_c if not c.diverged]
    early = _early_step(live, late, x) if early_step is None else int(early_step)
    for name, s in (("early_step", early), ("late_step", late)):
        if s < 0:
            raise ValueError(f"{name} must be >= 0, got {s}")
    groups = (*lr_g, *elr_g)
    stats = {pos: [g.stats_at(pos, x) for g in groups] for pos in (early, late)}
    spreads = tuple(
        GroupSpread(g.kind, g.value, g.batch_size, tuple(c.name for c in g.members), e.spread, lt.spread,
                    batch_schedule=g.batch_schedule, early_se=e.spread_se, late_se=lt.spread_se,
                    early_octave=e.octave, early_octave_se=e.octave_se,
                    late_octave=lt.octave, late_octave_se=lt.octave_se,
                    early_within_noise=e.within_noise, late_within_noise=lt.within_noise)
        for g, e, lt in zip(groups, stats[early], stats[late])
    )
    t = _transition(all_c, lr_g, elr_g, late, x)
    t_elr = None
    if t is not None:
        prods = [c.elr * c.step_at(t, x) for g in groups for c in g.members]
        t_elr = (float(min(prods)), float(max(prods)))
    n_lr = len(lr_g)
    kinds = {(kind, pos): _kind_stats(gs, st, pos, x)
             for pos in (early, late)
             for kind, gs, st in (("LR", lr_g, stats[pos][:n_lr]), ("ELR", elr_g, stats[pos][n_lr:]))}
    lr_e, elr_e, lr_l, elr_l = (kinds[k, p] for p in (early, late) for k in ("LR", "ELR"))
    diff_e, diff_l = _difference_se(lr_e, elr_e), _difference_se(lr_l, elr_l)
    return InvarianceReport(
        key=key, early_step=early, late_step=late,
        iso_lr_early=lr_e.spread, iso_elr_early=elr_e.spread, iso_lr_late=lr_l.spread, iso_elr_late=elr_l.spread,
        verdict_early=_verdict(lr_e.spread, elr_e.spread), verdict_late=_verdict(lr_l.spread, elr_l.spread),
        groups=spreads, diverged=tuple(c.name for c in all_c if c.diverged),
        transition_step=t, transition_elr_steps=t_elr, x=x,
        iso_lr_early_se=se(lr_e.spread_boot), iso_elr_early_se=se(elr_e.spread_boot),
        iso_lr_late_se=se(lr_l.spread_boot), iso_elr_late_se=se(elr_l.spread_boot),
        iso_lr_early_octave=lr_e.octave, iso_elr_early_octave=elr_e.octave,
        iso_lr_late_octave=lr_l.octave, iso_elr_late_octave=elr_l.octave,
        iso_lr_early_octave_se=se(lr_e.octave_boot), iso_elr_early_octave_se=se(elr_e.octave_boot),
        iso_lr_late_octave_se=se(lr_l.octave_boot), iso_elr_late_octave_se=se(elr_l.octave_boot),
        difference_early_se=diff_e, difference_late_se=diff_l,
        within_noise_early=within_noise(lr_e.spread - elr_e.spread, diff_e),
        within_noise_late=within_noise(lr_l.spread - elr_l.spread, diff_l),
    )


def _difference_se(lr: _KindStats, elr: _KindStats) -> float:
    """SE of the iso-LR minus iso-ELR mean spread, resampled jointly (paired across members)."""
    if lr.spread_boot is None or elr.spread_boot is None:
        return math.nan
    return se(lr.spread_boot - elr.spread_boot)


def analyze_sweep(sweep_dir: str | Path, key: str = "val_loss", **kw) -> InvarianceReport:
    """invariance_report on a sweep directory; members the summary marks
    ``diverged`` are excluded even if their logged values look finite."""
    records = load_metrics(sweep_dir)
    bad: list[MemberKey] = []
    try:
        rows = load_summary(sweep_dir)
    except FileNotFoundError:
        rows = []  # a sweep still running may not have written its summary yet
    for row in rows:
        if row.get("status") == "diverged":
            bad.append((str(row.get("run_id")), int(row.get("member") or 0)))
    return invariance_report(records, key=key, diverged=bad, **kw)
