"""PNG plots of a sweep: loss curves coloured by lr or by ELR, and the GNS.

Coloured by lr, iso-LR members share a colour and differ in line style (wd):
early in training they should sit on top of each other. Coloured by ELR,
iso-ELR members share a colour and differ in line style (lr): late in training
they should. Looking at the two side by side shows the LR -> ELR transition. When a sweep holds
several batch-size schedules, each gets its own marker; ``x="tokens"`` puts the curves
on a tokens-trained axis, where schedules compare at equal data.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas, never
through pyplot: no global figure state, no GUI backend, nothing to close, and
safe in threads and tests. Files are written to a temporary name and renamed,
so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter

from trajinv.analysis.records import REL_TOL, X_AXES, Curve, curves, load_metrics
from trajinv.atomic import atomic_write

__all__ = ["COLOR_BY", "build_gns_figure", "build_loss_figure", "plain_log_ticks", "plot_loss_curves", "plot_sweep",
           "save_png"]

COLOR_BY = ("lr", "elr")
_STYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)), (0, (8, 3)), (0, (3, 1, 1, 1, 1, 1))]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_GNS_KEYS = ("b_precond_smooth", "b_precond")
_CMAP = "viridis"


def _distinct(values: Iterable[float]) -> list[float]:
    out: list[float] = []
    for v in sorted(values):
        if not out or not math.isclose(v, out[-1], rel_tol=REL_TOL, abs_tol=0.0):
            out.append(v)
    return out


def _index(values: list[float], v: float) -> int:
    return min(range(len(values)), key=lambda i: abs(values[i] - v))


_ZERO_COLOUR = "0.45"  # grey: ELR 0 (a wd = 0 member) has no place on a log colour scale


def _log_norm(values: list[float]) -> LogNorm:
    """Over the positive values (ELR is 0 for a member without weight decay; it is drawn grey)."""
    positive = [v for v in values if v > 0] or [1.0]
    lo, hi = min(positive), max(positive)
    if hi <= lo:  # a single value: LogNorm needs a non-empty range
        lo, hi = lo / 2, hi * 2
    return LogNorm(vmin=lo, vmax=hi)


def _style_curves(cs: list[Curve], color_by: str):
    """(norm, colour of each curve, linestyle of each curve, legend proxies)."""
    if color_by not in COLOR_BY:
        raise ValueError(f"color_by must be one of {COLOR_BY}, got {color_by!r}")
    colour_vals = [c.lr if color_by == "lr" else c.elr for c in cs]
    # Colour fixes one quantity; the line style tells apart the one that varies within a colour.
    style_name = "wd" if color_by == "lr" else "lr"
    style_vals = [c.wd if color_by == "lr" else c.lr for c in cs]
    norm = _log_norm(colour_vals)
    cmap = ScalarMappable(norm=norm, cmap=_CMAP)
    distinct = _distinct(style_vals)
    if len(distinct) <= len(_STYLES):
        styles = [_STYLES[_index(distinct, v)] for v in style_vals]
        proxies = [Line2D([], [], color="0.3", linestyle=_STYLES[i], label=f"{style_name}={v:.3g}")
                   for i, v in enumerate(distinct)]
    else:  # styles would repeat (and 1,001 legend entries took minutes to lay out): one style, one entry
        styles = ["-"] * len(style_vals)
        proxies = [Line2D([], [], color="0.3", label=f"{len(distinct)} {style_name} values")]
    if any(v <= 0 for v in colour_vals):
        proxies.append(Line2D([], [], color=_ZERO_COLOUR, label=f"{color_by}=0"))
    colours = [cmap.to_rgba(v) if v > 0 else _ZERO_COLOUR for v in colour_vals]
    return cmap, colours, styles, proxies


def _check_curves(records, key: str) -> list[Curve]:
    cs = [c for c in curves(records, key).values() if len(c.steps)]
    if not cs:
        raise ValueError(f"no finite {key!r} values in the records")
    return cs


def _schedule_markers(cs: list[Curve]) -> tuple[list[str | None], list[Line2D]]:
    """A marker per batch-size schedule when there are several (None each when there is one)."""
    schedules = sorted({str(c.batch_schedule) for c in cs})
    if len(schedules) < 2:
        return [None] * len(cs), []
    mark = {s: _MARKERS[i % len(_MARKERS)] for i, s in enumerate(schedules)}
    proxies = [Line2D([], [], color="0.3", marker=mark[s], linestyle="none", label=f"B={s}") for s in schedules]
    return [mark[str(c.batch_schedule)] for c in cs], proxies


def build_loss_figure(
    records: Iterable[dict],
    color_by: str = "lr",
    key: str = "val_loss",
    title: str | None = None,
    logx: bool = False,
    x: str = "step",
) -> Figure:
    """The figure behind plot_loss_curves: exactly one line per member in
    ``fig.axes[0].lines`` (legend entries are proxies, not axes lines)."""
    if color_by not in COLOR_BY:
        raise ValueError(f"color_by must be one of {COLOR_BY}, got {color_by!r}")
    if x not in X_AXES:
        raise ValueError(f"x must be one of {X_AXES}, got {x!r}")
    cs = _check_curves(records, key)
    cmap, colours, styles, proxies = _style_curves(cs, color_by)
    markers, schedule_proxies = _schedule_markers(cs)
    fig = Figure(figsize=(7.5, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for c, col, ls, mk in zip(cs, colours, styles, markers):
        # A diverged member is drawn faintly up to its last finite value.
        # a member with one logged point draws no line: a marker shows it
        mk = mk or ("o" if len(c.steps) == 1 else None)
        ax.plot(c.axis(x), c.values, color=col, linestyle=ls, lw=1.5, marker=mk, markersize=4,
                markevery=max(1, len(c.steps) // 8), alpha=0.35 if c.diverged else 0.95, label=c.name)
    if logx:
        # symlog keeps position 0 on the axis; linear below the first positive position.
        pos = [float(s) for c in cs for s in c.axis(x) if s > 0]
        ax.set_xscale("symlog", linthresh=min(pos) if pos else 1.0)
    _clip_ylim(ax, cs)
    ax.set_xlabel("tokens trained" if x == "tokens" else "step")
    ax.set_ylabel(key)
    ax.grid(True, alpha=0.3)
    what = "lr" if color_by == "lr" else "ELR = lr*wd"
    ax.set_title(title or f"{key} coloured by {what}")
    fig.colorbar(cmap, ax=ax, label=what)
    if any(c.diverged for c in cs):
        proxies.append(Line2D([], [], color="0.3", alpha=0.35, label="diverged"))
    ax.legend(handles=proxies + schedule_proxies, fontsize="small", loc="upper right")
    return fig


def _clip_ylim(ax, cs: list[Curve]) -> None:
    # The loss at initialisation is far above the rest: clip the top at the
    # 98th percentile so the part where curves are compared stays readable.
    vals = np.concatenate([c.values for c in cs])
    lo, hi = float(vals.min()), float(np.quantile(vals, 0.98))
    if hi > lo:
        pad = 0.05 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)


def build_gns_figure(records: Iterable[dict], title: str | None = None, x: str = "step") -> Figure | None:
    """B_precond (smoothed if logged) against step (or tokens trained, x="tokens"), one
    line per member and a dashed horizontal line per batch size; None when no GNS values
    were logged."""
    if x not in X_AXES:
        raise ValueError(f"x must be one of {X_AXES}, got {x!r}")
    records = list(records)
    key = next((k for k in _GNS_KEYS if any(_positive(r.get(k)) for r in records)), None)
    if key is None:
        return None
    cs = [c for c in curves(records, key).values() if len(c.steps)]
    cs = [c.select(c.values > 0) for c in cs]
    cs = [c for c in cs if len(c.steps)]
    cmap, colours, styles, proxies = _style_curves(cs, "lr")
    markers, schedule_proxies = _schedule_markers(cs)  # one lr at two schedules: told apart as in the loss plots
    fig = Figure(figsize=(8.5, 4.8), dpi=110, layout="constrained")  # the loss plots' panel, and the legend beside
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for c, col, ls, mk in zip(cs, colours, styles, markers):
        ax.plot(c.axis(x), c.values, color=col, linestyle=ls, lw=1.5, marker=mk or ("o" if len(c.steps) == 1 else None),
                markersize=4, markevery=max(1, len(c.steps) // 8))
    for b in sorted({int(r["batch_size"]) for r in records if r.get("batch_size")}):
        ax.axhline(b, color="crimson", lw=1, linestyle=(0, (4, 4)))
        ax.annotate(f"B={b}", (0.01, b), xycoords=("axes fraction", "data"), color="crimson",
                    fontsize="small", va="bottom")
    ax.set_yscale("log")
    plain_log_ticks(ax.yaxis)  # batch sizes: "30", "200", where the default wrote "3x10^1", "2x10^2"
    ax.set_xlabel("tokens trained" if x == "tokens" else "step")
    ax.set_ylabel(key)
    ax.grid(True, alpha=0.3, which="both")
    ax.set_title(title or "preconditioned gradient noise scale (B below it: small-batch regime)")
    fig.colorbar(cmap, ax=ax, label="lr")
    # beside the panel, outside its frame (the constrained layout puts the colorbar after it): in the upper
    # right it covered the ends of the curves, where B_precond, growing as training goes on, is read
    ax.legend(handles=proxies + schedule_proxies, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0)
    return fig


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


class _PlainLogFormatter(LogFormatter):
    """Labels the ticks matplotlib's log formatter labels (decades; under about a decade, minor ticks too)
    as plain numbers: "2", "20", "0.5", where the default (LogFormatterSciNotation) wrote "2x10^0",
    "2x10^1", "5x10^-1"."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def plain_log_ticks(axis) -> None:
    """Plain-number tick labels on a log-scaled `axis` (an Axes' xaxis or yaxis), major and minor; call it
    after setting the scale, which installs its own formatters."""
    axis.set_major_formatter(_PlainLogFormatter())
    axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False))  # as the log scale sets its minor one


def save_png(fig: Figure, out_png: str | Path) -> Path:
    """Write ``fig`` as PNG atomically (temporary file in the same folder, then rename)."""
    out = Path(out_png)
    if out.suffix.lower() != ".png":
        raise ValueError(f"plot path must end in .png, got {str(out)!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    return out


def plot_loss_curves(
    records: Iterable[dict],
    out_png: str | Path,
    color_by: str = "lr",
    key: str = "val_loss",
    title: str | None = None,
    logx: bool = False,
    x: str = "step",
) -> Path:
    """One line per member of ``key`` against step (or tokens trained, x="tokens"),
    colour = log-scaled lr or ELR (colorbar), line style = wd (colour by lr) or lr
    (colour by ELR), marker = batch-size schedule when there are several."""
    return save_png(build_loss_figure(records, color_by, key, title, logx, x), out_png)


def plot_sweep(sweep_dir: str | Path, key: str = "val_loss", logx: bool = False, x: str = "step") -> list[Path]:
    """Write ``<key>_by_lr.png`` and ``<key>_by_elr.png`` into the sweep folder
    (``<key>_by_lr_tokens.png`` ... with x="tokens"), plus ``gns.png`` (``gns_tokens.png``)
    when B_precond was logged. Returns the paths written."""
    root = Path(sweep_dir)
    records = load_metrics(root)
    suffix = "" if x == "step" else f"_{x}"
    paths = [
        plot_loss_curves(records, root / f"{key}_by_{cb}{suffix}.png", color_by=cb, key=key, logx=logx, x=x)
        for cb in COLOR_BY
    ]
    gns = build_gns_figure(records, x=x)
    if gns is not None:
        paths.append(save_png(gns, root / f"gns{suffix}.png"))
    return paths
