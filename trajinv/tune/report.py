"""What `trajinv tune` writes and prints: tune.json, tune.png, tune_heatmap.png, a summary.

- ``tune.json``: the recommendation (lr, wd, ELR, validation loss ± its standard
  error, and whether it is the fit's minimum or a trained member), the best trained
  member (the same, measured), the regime and B_precond behind it, the invariance check, every stage
  with its members, cost (member-steps, tokens) and sweep directory (null when
  every point was untrainable and nothing was trained), and the cost of a 2-D grid
  of the same resolution.
- ``tune.png``: validation loss along the axis each stage varies (ELR at one lr; lr at
  one wd, or at one ELR for an iso-ELR check), one marker style per stage, the members
  a line holds that other stages trained (hollow), the fitted quadratic around the
  optimum, the recommendation as a hollow star; each panel's legend under it, clear of the members.
- ``tune_heatmap.png``: every evaluated (lr, wd), coloured by loss, on log axes with
  iso-ELR diagonals: a 1-D search in a 2-D picture.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure, SubFigure

from trajinv.analysis.plots import save_png
from trajinv.atomic import atomic_write
from trajinv.config import to_dict
from trajinv.tune.fit import grid_size
from trajinv.tune.runner import STAGES, TuneRun

RESULT = "tune.json"
CURVE_PNG = "tune.png"
HEATMAP_PNG = "tune_heatmap.png"
_MARKERS = "osD^vP*Xh<>"


def to_json(run: TuneRun) -> dict:
    """The JSON-ready record of a tune (see the module doc)."""
    r = run.result
    stages = []
    for sr in run.stages:
        # a stage's name is its directory's ("lr-1-scan" beside "1-scan": the lr search names its own);
        # a stage whose every point was untrainable (lr*wd >= 1) trained nothing and has none
        trained = sr.member_steps > 0
        stages.append({**sr.stage.to_dict(), "directory": f"{STAGES}/{sr.directory.name}" if trained else None,
                       "axis": sr.axis,
                       "member_steps": sr.member_steps,
                       "tokens": sr.tokens, "outcomes": [o.to_dict() for o in sr.outcomes],
                       "b_precond": sr.b_precond})
    spent = sum(sr.member_steps for sr in run.stages)
    # a 2-D grid at the scan's spacing over the box spanned by every evaluated lr and wd (all stages)
    points = [o.point for sr in run.stages for o in sr.outcomes]
    spacing = run.spec.search.octaves / (run.spec.search.points - 1)
    grid_points = grid_size([p.lr for p in points], spacing) * grid_size([p.wd for p in points], spacing)
    grid_steps = grid_points * run.spec.train.steps
    best = None
    if r.best is not None:
        best = {"lr": r.best.lr, "wd": r.best.wd, "elr": r.best.elr, "val_loss": r.loss, "val_loss_se": r.se}
    regime = run.regime
    return {
        "axis": r.axis,
        "recommendation": r.recommendation.to_dict() if r.recommendation else None,
        "best_member": best,
        "regime": None if regime is None else {
            "axis": regime.axis, "small_batch": regime.small_batch, "enough_iterations": regime.enough_iterations,
            "b_precond": regime.b_precond, "reason": regime.reason, "batch_schedule": regime.batch_schedule},
        "fit": r.fit.to_dict() if r.fit else None,
        "invariant_check": r.invariant_check.to_dict() if r.invariant_check else None,
        "cost": {"member_steps": spent, "tokens": sum(sr.tokens for sr in run.stages),
                 "grid_points": grid_points, "grid_member_steps": grid_steps,
                 "fraction_of_grid": spent / grid_steps if grid_steps else None},
        "stages": stages,
        "notes": run.notes + list(r.notes),
        "spec": to_dict(run.spec),
    }


def write_json(run: TuneRun, out: Path) -> Path:
    data = to_json(run)
    return atomic_write(out / RESULT, lambda f: f.write(json.dumps(data, indent=1, allow_nan=False)), mode="w")


def format_summary(run: TuneRun) -> str:
    """The printed summary: recommendation, regime, evidence, cost against a grid."""
    r, data = run.result, to_json(run)
    lines = []
    reco = r.recommendation
    if reco is None:
        lines.append("no recommendation: every member diverged or learned nothing")
    else:
        fitted = reco.source == "fit"
        how = "predicted (the fit's minimum)" if fitted else "(the best trained member: no usable fit)"
        lines.append(f"recommended: lr={reco.lr:.4g}  wd={reco.wd:.4g}  (ELR={reco.elr:.4g})  "
                     f"val_loss {reco.loss:.4f} ± {reco.se or 0:.4f} {how}")
        if fitted:
            lines.append(f"best trained member: lr={r.best.lr:.4g}  wd={r.best.wd:.4g}  (ELR={r.best.elr:.4g})  "
                         f"val_loss {r.loss:.4f} ± {r.se or 0:.4f}")
    if run.regime is not None and run.regime.axis != r.axis:  # the budget kept the search on ELR (notes)
        lines.append(f"regime: lr ({run.regime.reason}); tuned along ELR all the same: no budget for an lr scan")
    elif run.regime is not None:
        lines.append(f"regime: tune along {'ELR' if r.axis == 'elr' else 'lr'} ({run.regime.reason})")
    if r.fit is not None:
        what, held = ("ELR", "lr") if r.axis == "elr" else ("lr", "wd")
        lines.append(f"quadratic fit in log2 {what} at {held}={r.fit.fixed:.4g}: minimum at {what}={r.fit.vertex:.4g}, "
                     f"predicted loss {r.fit.loss:.4f} (curvature {r.fit.curvature:.3g} nat/octave^2, "
                     f"{r.fit.points} members)")
    check = r.invariant_check
    if check is not None:
        finite = sum(o.finite for o in check.outcomes)
        verdict = ("within noise: the 1-D answer stands" if check.within_noise else "beyond noise" if finite >= 2
                   else "not confirmed: only the checked point is finite on its line")
        line = "iso-ELR" if r.axis == "elr" else "iso-LR"
        lines.append(f"{line} check ({len(check.outcomes)} members): spread {check.spread:.4f} vs threshold "
                     f"{check.threshold:.4f}: {verdict}")
    cost = data["cost"]
    frac = cost["fraction_of_grid"]
    lines.append(f"cost: {cost['member_steps']} member-steps in {len(run.stages)} stages "
                 f"({cost['tokens']:,} member-tokens); a 2-D grid of the same resolution: {cost['grid_points']} "
                 f"points, {cost['grid_member_steps']} member-steps"
                 + ("" if not frac else f" ({frac:.0%} of it)" if frac <= 1 else f" ({frac:.2g}x it: a grid this coarse "
                    "costs less than the search)"))
    lines += [f"note: {n}" for n in run.notes + list(r.notes)]
    return "\n".join(lines)


def _x(axis: str, p) -> float:
    return p.lr * p.wd if axis == "elr" else p.lr


def _panel(sr) -> str:
    """The axis a stage varies: its search's, except an invariance check, which crosses it (an ELR search's
    iso-ELR check varies lr; an lr search's iso-LR check varies wd, so ELR, at one lr). On its search's axis
    a check's members would stand in one vertical stack."""
    if sr.stage.kind != "check":
        return sr.axis
    return "lr" if sr.axis == "elr" else "elr"


def _coord(name: str, p) -> float:
    """log2 of a point's lr, wd or ELR, rounded as `Point.key` rounds (equal up to round-off)."""
    return round(math.log2(p.lr if name == "lr" else p.wd if name == "wd" else p.elr), 9)


def _held_name(sr) -> str:
    """What a stage's line holds fixed, by what the stage is: lr on the ELR panel (a scan of ELR at one lr,
    an iso-LR check of wd at one lr), wd on the lr panel (an lr scan), ELR for an iso-ELR check. Read off
    the points instead, a one-point check (a budget trimmed it) has one wd too, and was put on a wd line."""
    if _panel(sr) == "elr":
        return "lr"
    return "wd" if sr.stage.kind != "check" else "ELR"


def _line(sr) -> tuple[str, float] | None:
    """(`_held_name`, its log2 value) of a stage's line; None when its points do not share one."""
    name = _held_name(sr)
    values = {_coord(name, p) for p in sr.stage.points}
    return (name, values.pop()) if len(values) == 1 else None


def _held(sr) -> str:
    """The line a stage lies on, for its label ('lr=0.0039', 'ELR=0.00098'), else the range it spans."""
    line = _line(sr)
    if line is not None:
        return f"{line[0]}={2.0 ** line[1]:.3g}"
    name = _held_name(sr)
    values = sorted(p.lr if name == "lr" else p.wd if name == "wd" else p.elr for p in sr.stage.points)
    return f"{name} {values[0]:.3g}..{values[-1]:.3g}"


def _star(ax, x: float, y: float, size: float) -> None:
    """The recommendation: a hollow star, so the member's own marker and error bar show through it."""
    ax.plot([x], [y], marker="*", ms=size, mfc="none", mec="k", mew=1.5, ls="none", zorder=5,
            label="recommended")


_LEGEND_ROW = 0.2  # inches a row of a small-font legend takes


def _legend_below(ax, subfig: SubFigure) -> int:
    """The panel's legend under it (in its subfigure), outside its frame, in two columns; returns its rows
    (0: none). Inside, the legend covered members wherever it went (a scan's ends sit high in both top
    corners, a rescan's and a check's members low, the fit's minimum at the bottom): no corner of a panel
    is reliably free."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:  # a panel of diverged members only has nothing to label
        return 0
    ncols = min(2, len(handles))
    # "outside": the constrained layout makes room for it under the panel's tick labels and axis label
    subfig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize="small")
    return -(-len(handles) // ncols)


def build_curve_figure(run: TuneRun) -> Figure:
    """Loss along each axis the stages varied, per stage, with the fit and the recommendation: ELR (at one
    lr) and, when the regime switched the search to lr or an iso-ELR check varied lr, lr (at one wd or ELR)."""
    r = run.result
    axes_used = sorted({_panel(sr) for sr in run.stages}, key=lambda a: (a != "elr", a))
    fig = Figure(figsize=(7.5 * len(axes_used), 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    # a subfigure per panel, so that each panel's legend can stand under it (`_legend_below`)
    subfigs = dict(zip(axes_used, fig.subfigures(1, len(axes_used), squeeze=False)[0]))
    panels = {a: subfigs[a].add_subplot() for a in axes_used}
    drawn: dict[str, set] = {a: set() for a in panels}  # the points on each panel, for the star
    colours: dict[tuple, str] = {}  # (panel, line) -> the colour of its first stage
    for i, sr in enumerate(run.stages):
        panel = _panel(sr)
        ax = panels[panel]
        marker = _MARKERS[i % len(_MARKERS)]
        # stages of one panel may lie on different lines (a check, a rescan): the label says which
        label = f"{sr.directory.name} ({sr.stage.kind}, {_held(sr)})"
        pts = [(_x(panel, o.point), o.loss, o.se) for o in sr.outcomes if o.finite]
        drawn[panel] |= {o.point.key for o in sr.outcomes if o.finite}
        if pts:
            x, y, e = (np.array(v) for v in zip(*pts))
            bars = ax.errorbar(x, y, yerr=e, fmt=marker, ms=6, capsize=2, alpha=0.85, label=label)
            colours.setdefault((panel, _line(sr)), bars.lines[0].get_color())
        for o in sr.outcomes:
            if not o.finite:
                ax.axvline(_x(panel, o.point), color="crimson", lw=0.8, ls=":", alpha=0.7)
    # a line also holds members that other stages trained (read, not retrained: the lr scan's centre is the
    # ELR scan's best, a check's centre the point it checks, a rescan's centre the check's best): drawn
    # hollow, in the colour of the line's stage
    for a, ax in panels.items():
        label = "on these lines, from other stages (read, not retrained)"
        lines = [_line(sr) for sr in run.stages if _panel(sr) == a]
        for line in dict.fromkeys(held for held in lines if held is not None):
            read = {o.point.key: o for sr in run.stages if _panel(sr) != a for o in sr.outcomes
                    if o.finite and o.point.key not in drawn[a] and _coord(line[0], o.point) == line[1]}
            if read:
                ax.errorbar([_x(a, o.point) for o in read.values()], [o.loss for o in read.values()],
                            yerr=[o.se for o in read.values()], fmt="o", mfc="none", ms=9, capsize=2,
                            color=colours.get((a, line), "0.3"), label=label)
                drawn[a] |= set(read)
                label = None  # once per panel
    ax = panels.get(r.axis)
    if ax is not None and r.fit is not None:  # loss = min + curvature/2 (log2 x - log2 vertex)^2, fitted window
        half = 1.5 * run.spec.search.octaves / (run.spec.search.points - 1)
        u = np.linspace(-half, half, 101)
        ax.plot(r.fit.vertex * 2.0 ** u, r.fit.loss + 0.5 * r.fit.curvature * u * u, color="k", lw=1.2, ls="--",
                label=f"quadratic fit in log2 ({'wd' if r.axis == 'lr' else 'lr'}={r.fit.fixed:.3g})")
    reco = r.recommendation
    if reco is not None and reco.source == "fit":  # the fit's minimum, on the fit's curve
        if r.axis in panels:
            _star(panels[r.axis], _x(r.axis, reco), reco.loss, 18)
    elif r.best is not None:  # on every panel that shows the recommended member (a point seen along two lines)
        for a in [a for a in panels if r.best.key in drawn[a]] or [a for a in (r.axis,) if a in panels]:
            _star(panels[a], _x(a, r.best), r.loss, 18)
    for a, ax in panels.items():
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ELR = lr x wd" if a == "elr" else "lr")
        ax.set_ylabel("final validation loss")
        ax.grid(True, alpha=0.3, which="both")
        if a == r.axis:
            ax.set_title("loss along ELR" if a == "elr" else "loss along lr (large batch or few steps)")
        else:  # the regime's first scan and an lr search's iso-LR check; an ELR search's iso-ELR check
            ax.set_title("loss along ELR at one lr (the regime's first scan"
                         + ", the iso-LR check" * (r.axis == "lr" and r.invariant_check is not None) + ")"
                         if a == "elr" else "loss along lr at one ELR (the iso-ELR check)")
    rows = max(_legend_below(ax, subfigs[a]) for a, ax in panels.items())
    fig.set_size_inches(fig.get_figwidth(), 4.8 + _LEGEND_ROW * rows)  # room for the tallest legend
    diverged = any(not o.finite for sr in run.stages for o in sr.outcomes)
    fig.suptitle("trajinv tune" + " (dotted lines: diverged members)" * diverged)
    return fig


def build_heatmap_figure(run: TuneRun) -> Figure:
    """Every evaluated (lr, wd) coloured by loss, with iso-ELR diagonals."""
    pts = [(o.point.lr, o.point.wd, o.loss) for sr in run.stages for o in sr.outcomes]
    fig = Figure(figsize=(6.8, 5.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lrs = np.array([p[0] for p in pts])
    wds = np.array([p[1] for p in pts])
    finite = [(lr, wd, loss) for lr, wd, loss in pts if loss is not None and math.isfinite(loss)]
    if finite:
        flr, fwd, floss = (np.array(v) for v in zip(*finite))
        hi = float(np.quantile(floss, 0.9)) if len(floss) > 3 else float(floss.max())
        sc = ax.scatter(flr, fwd, c=floss, cmap="viridis_r", norm=Normalize(float(floss.min()), max(hi, floss.min() + 1e-9)),
                        s=70, edgecolors="k", linewidths=0.4, zorder=3)
        fig.colorbar(sc, ax=ax, label="final validation loss (clipped at the 90th percentile)")
    dead = [(lr, wd) for lr, wd, loss in pts if loss is None or not math.isfinite(loss)]
    if dead:
        ax.scatter(*zip(*dead), marker="x", color="crimson", s=50, zorder=3, label="diverged")
    lo_lr, hi_lr = lrs.min() / 2, lrs.max() * 2
    lo_wd, hi_wd = wds.min() / 2, wds.max() * 2
    elrs = 2.0 ** np.arange(math.floor(math.log2(lo_lr * lo_wd)), math.ceil(math.log2(hi_lr * hi_wd)) + 1)
    xs = np.geomspace(lo_lr, hi_lr, 50)
    for e in elrs:
        ax.plot(xs, e / xs, color="0.6", lw=0.6, ls="--", zorder=1)
    r = run.result
    if r.recommendation is not None:
        _star(ax, r.recommendation.lr, r.recommendation.wd, 20)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlim(lo_lr, hi_lr)
    ax.set_ylim(lo_wd, hi_wd)
    ax.set_xlabel("lr")
    ax.set_ylabel("wd")
    ax.set_title("evaluated (lr, wd); dashed: iso-ELR lines (factor 2 apart)")
    if dead or r.recommendation is not None:
        ax.legend(fontsize="small", loc="upper right")
    return fig


def write_report(run: TuneRun, out: str | Path) -> list[Path]:
    """tune.json, tune.png and tune_heatmap.png into `out`; returns their paths."""
    out = Path(out)
    return [write_json(run, out), save_png(build_curve_figure(run), out / CURVE_PNG),
            save_png(build_heatmap_figure(run), out / HEATMAP_PNG)]
