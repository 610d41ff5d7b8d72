"""Read a sweep directory and say along which direction the loss curves overlap.

The trajectory invariance principle (docs/design.md) predicts that early in training
curves with the same learning rate overlap whatever the weight decay is (LR
invariance), and later curves with the same effective learning rate
``ELR = lr * wd`` overlap (ELR invariance), the switch happening after about
``1 / (lr * wd)`` steps. This module measures exactly that on logged metrics:

* iso-LR groups: members with the same base lr (and batch size) and at least
  two distinct weight decays;
* iso-ELR groups: members with the same ``lr * wd`` (and batch size) and at
  least two distinct learning rates;
* the *spread* of a group at a step is ``max - min`` of the metric over its
  members; a small spread means the curves coincide there;
* the verdict of a phase is the kind of group with the smaller mean spread.

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

from trajinv.analysis.records import REL_TOL, Curve, MemberKey, curves, load_metrics, load_summary

EARLY_FRACTION = 0.1
"""Default early step: the evaluated step closest to this fraction of the late
step. 10% is past a typical warm-up yet well before ``1/(lr*wd)`` steps for
the usual grids, where the paper sees LR invariance."""

# ------------------------------------------------------------------------ groups


@dataclass(frozen=True)
class Group:
    """Members sharing one value of lr (kind "LR") or of lr*wd (kind "ELR")."""

    kind: str
    value: float
    batch_size: int | None
    members: tuple[Curve, ...]

    def spread_at(self, step: float) -> float:
        """max - min of the members' values at ``step`` (NaN if < 2 have one)."""
        vals = [v for v in (c.at(step) for c in self.members) if math.isfinite(v)]
        return max(vals) - min(vals) if len(vals) >= 2 else math.nan


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


def _groups(cs: Iterable[Curve], kind: str) -> list[Group]:
    # Curves at different batch sizes follow different step clocks: never mix them.
    live = [c for c in cs if not c.diverged]
    by_bs: dict = {}
    for c in live:
        by_bs.setdefault(c.batch_size, []).append(c)
    out = []
    for bs, members in sorted(by_bs.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        shared = [c.lr if kind == "LR" else c.elr for c in members]
        for idx in _cluster(shared):
            g = [members[i] for i in idx]
            varying = [c.wd if kind == "LR" else c.lr for c in g]
            if len(_cluster(varying)) >= 2:
                g.sort(key=lambda c: c.wd if kind == "LR" else c.lr)
                out.append(Group(kind, float(np.mean([shared[i] for i in idx])), bs, tuple(g)))
    return out


def iso_lr_groups(cs: Iterable[Curve]) -> list[Group]:
    """Non-diverged members with equal lr (and batch size) and >= 2 distinct wd."""
    return _groups(cs, "LR")


def iso_elr_groups(cs: Iterable[Curve]) -> list[Group]:
    """Non-diverged members with equal lr*wd (and batch size) and >= 2 distinct lr."""
    return _groups(cs, "ELR")


def _mean_spread(groups: Sequence[Group], step: float) -> float:
    s = [g.spread_at(step) for g in groups]
    s = [x for x in s if math.isfinite(x)]
    return float(np.mean(s)) if s else math.nan


# ------------------------------------------------------------------------- steps


def default_steps(cs: Iterable[Curve]) -> tuple[int, int]:
    """(early, late) steps used when the caller gives none.

    late: the last step every non-diverged member has reached (the smallest
    of their last logged steps; with a shared eval grid, the last eval step
    common to all). early: see _early_step.
    """
    live = [c for c in cs if not c.diverged and len(c.steps)]
    if not live:
        raise ValueError("no non-diverged member has a logged value")
    late = int(min(c.steps[-1] for c in live))
    return _early_step(live, late), late


def _early_step(live: Sequence[Curve], late: int) -> int:
    # The logged step closest to EARLY_FRACTION of late; step 0 is excluded
    # because all members share the initialisation, so it says nothing.
    cand = _eval_steps(live, late) or [late]
    return min(cand, key=lambda s: (abs(s - EARLY_FRACTION * late), s))


def _eval_steps(cs: Sequence[Curve], late: int) -> list[int]:
    return sorted({int(s) for c in cs for s in c.steps if 0 < s <= late})


def transition_step(
    records: Iterable[dict] | dict[MemberKey, Curve],
    key: str = "val_loss",
    late_step: int | None = None,
    diverged: Iterable[MemberKey] = (),
) -> int | None:
    """First logged step from which the iso-ELR mean spread stays below the
    iso-LR mean spread up to ``late_step``: the observed LR -> ELR switch.

    None when it never happens (or when one kind of group is missing).
    Steps where either mean spread is undefined are ignored.
    """
    cs = records if isinstance(records, dict) else curves(records, key, diverged)
    return _transition(list(cs.values()), iso_lr_groups(cs.values()), iso_elr_groups(cs.values()), late_step)


def _transition(cs: list[Curve], lr_g: list[Group], elr_g: list[Group], late: int | None) -> int | None:
    if not lr_g or not elr_g:
        return None
    if late is None:
        late = default_steps(cs)[1]
    members = [c for g in (*lr_g, *elr_g) for c in g.members]
    found = None
    for s in _eval_steps(members, late):
        a, b = _mean_spread(lr_g, s), _mean_spread(elr_g, s)
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
    """One group's spread at the early and late steps."""

    kind: str
    """"LR" (same lr, wd varies) or "ELR" (same lr*wd, lr varies)."""
    value: float
    batch_size: int | None
    members: tuple[str, ...]
    early: float
    late: float

    @property
    def label(self) -> str:
        what = "lr" if self.kind == "LR" else "lr*wd"
        bs = "" if self.batch_size is None else f",B={self.batch_size}"
        return f"{what}={self.value:.3g}{bs}"


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
    """First step from which iso-ELR curves stay closer than iso-LR ones."""
    transition_elr_steps: tuple[float, float] | None = None
    """(min, max) of lr*wd*transition_step over the grouped members: the principle
    expects the switch after about 1/(lr*wd) steps, i.e. a value of order 1."""

    def format(self, details: bool = False) -> str:
        """A short plain-text table; ``details`` adds one line per group."""
        n_lr = sum(g.kind == "LR" for g in self.groups)
        n_elr = len(self.groups) - n_lr
        head = f"{self.key} spread (max-min) within groups"
        e_col, l_col = f"early (step {self.early_step})", f"late (step {self.late_step})"
        rows = [
            (head, e_col, l_col),
            (f"iso-LR  ({n_lr} groups: same lr, wd varies)", _f(self.iso_lr_early), _f(self.iso_lr_late)),
            (f"iso-ELR ({n_elr} groups: same lr*wd, lr varies)", _f(self.iso_elr_early), _f(self.iso_elr_late)),
            ("curves overlap along", self.verdict_early, self.verdict_late),
        ]
        if details:
            rows += [(f"  {g.kind:<3} {g.label} ({len(g.members)} members)", _f(g.early), _f(g.late))
                     for g in self.groups]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{a:<{w0}}  {b:>{w1}}  {c:>{len(l_col)}}" for a, b, c in rows]
        if self.transition_step is None:
            lines.append("LR -> ELR transition: not observed up to the late step")
        else:
            lo, hi = self.transition_elr_steps or (math.nan, math.nan)
            lines.append(f"LR -> ELR transition: step {self.transition_step} "
                         f"(lr*wd*step {lo:.3g}..{hi:.3g}; expected order 1)")
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


def invariance_report(
    records: Iterable[dict] | dict[MemberKey, Curve],
    early_step: int | None = None,
    late_step: int | None = None,
    key: str = "val_loss",
    diverged: Iterable[MemberKey] = (),
) -> InvarianceReport:
    """Spreads of ``key`` within iso-LR and iso-ELR groups, early and late.

    ``records`` are metric dicts (as from load_metrics) or ready curves.
    Defaults: see default_steps. A step not logged by a member is linearly
    interpolated from its neighbours. Diverged members are excluded and listed.
    """
    cs = records if isinstance(records, dict) else curves(records, key, diverged)
    all_c = list(cs.values())
    lr_g, elr_g = iso_lr_groups(all_c), iso_elr_groups(all_c)
    late = default_steps(all_c)[1] if late_step is None else int(late_step)
    live = [c for c in all_c if not c.diverged]
    early = _early_step(live, late) if early_step is None else int(early_step)
    for name, s in (("early_step", early), ("late_step", late)):
        if s < 0:
            raise ValueError(f"{name} must be >= 0, got {s}")
    spreads = tuple(
        GroupSpread(g.kind, g.value, g.batch_size, tuple(c.name for c in g.members),
                    g.spread_at(early), g.spread_at(late))
        for g in (*lr_g, *elr_g)
    )
    t = _transition(all_c, lr_g, elr_g, late)
    t_elr = None
    if t is not None:
        prods = [c.elr * t for g in (*lr_g, *elr_g) for c in g.members]
        t_elr = (float(min(prods)), float(max(prods)))
    lr_e, elr_e = _mean_spread(lr_g, early), _mean_spread(elr_g, early)
    lr_l, elr_l = _mean_spread(lr_g, late), _mean_spread(elr_g, late)
    return InvarianceReport(
        key=key, early_step=early, late_step=late,
        iso_lr_early=lr_e, iso_elr_early=elr_e, iso_lr_late=lr_l, iso_elr_late=elr_l,
        verdict_early=_verdict(lr_e, elr_e), verdict_late=_verdict(lr_l, elr_l),
        groups=spreads, diverged=tuple(c.name for c in all_c if c.diverged),
        transition_step=t, transition_elr_steps=t_elr,
    )


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
