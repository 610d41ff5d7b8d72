"""tune.png: each stage on the axis it varies, the members a line reads from other stages, the recommendation.

The tunes here train nothing: `runner._run_stage` is replaced by a synthetic surface (with a ripple, so that
the search rescans), so the runner, the search and the report run as they do on a real tune."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from trajinv.config import DataConfig, TrainConfig
from trajinv.tune import runner
from trajinv.tune.report import build_curve_figure, build_heatmap_figure
from trajinv.tune.runner import StageRun, TuneSpec, run_tune
from trajinv.tune.search import Outcome, Recommendation, SearchConfig


def _synthetic_tune(monkeypatch, tmp_path, b_precond: float, lr_opt: float, steps: int, **search):
    """A tune of lr 2^-8, ELR scan around 2^-9, on a surface with its optimum at (lr_opt, ELR 2^-10)."""
    def loss(lr, wd):
        a, c = math.log2(lr / lr_opt), math.log2(lr * wd / 2 ** -10)
        return 1.5 + 0.02 * a * a + 0.05 * c * c + 0.004 * math.sin(7 * a + 3 * c)

    def stage(spec, st, axis, directory, progress, scale, chance):
        directory.mkdir(parents=True, exist_ok=True)
        n = len(st.points)
        return StageRun(st, axis, directory, tuple(Outcome(p, loss(p.lr, p.wd), 0.01) for p in st.points),
                        [b_precond] * n, n * steps, n * steps * 32 * 64)

    monkeypatch.setattr(runner, "_run_stage", stage)
    monkeypatch.setattr(runner, "_preflight", lambda spec, scale: 256)
    spec = TuneSpec(train=TrainConfig(steps=steps, batch_size="32"), data=DataConfig(),
                    search=SearchConfig(**{**dict(lr=2 ** -8, center=2 ** -9, octaves=4, points=5, zoom_points=2,
                                                  check_factors=(0.5, 2.0)), **search}))
    return run_tune(spec, tmp_path)


def _series(ax) -> dict[str, list[tuple[float, float]]]:
    """Legend label -> the (x, y) of its markers, for every errorbar series and line of a panel."""
    out = {}
    for container in ax.containers:
        line = container.lines[0]
        out.setdefault(container.get_label(), []).extend(zip(*line.get_data()))
    for line in ax.lines:
        if not line.get_label().startswith("_"):
            out.setdefault(line.get_label(), []).extend(zip(*line.get_data()))
    return out


@pytest.mark.parametrize("case, factors", [("elr", (0.5, 2.0)), ("lr", (0.5, 2.0)), ("elr", (2.0,)), ("lr", (2.0,))])
def test_a_check_is_drawn_on_the_axis_it_varies_with_the_members_it_reads(monkeypatch, tmp_path, case, factors):
    """An ELR search's iso-ELR check varies lr at one ELR: on the ELR axis its members stood in one vertical
    stack. An lr search's iso-LR check varies wd at one lr: on the lr axis, the same. A one-point check (one
    factor, or a budget's trim) is still on its line (its one wd put it on a wd line, the checked point off)."""
    if case == "elr":  # small batch, enough steps: ELR search; its check moves the line to another lr
        run = _synthetic_tune(monkeypatch, tmp_path, 1e5, 2 ** -7.5, 8000, check_factors=factors)
    else:  # large batch, few steps: the lr search; its best lr is off the first scan's, so its check trains
        run = _synthetic_tune(monkeypatch, tmp_path, 10.0, 2 ** -6.3, 800, check_factors=factors)
    assert run.result.axis == case
    checks = [sr for sr in run.stages if sr.stage.kind == "check" and sr.axis == case]
    fig = build_curve_figure(run)
    titles = {ax.get_title(): ax for ax in fig.axes}
    across = "lr" if case == "elr" else "elr"
    panel = next(ax for t, ax in titles.items()
                 if ("loss along lr at one ELR (the iso-ELR check)" if case == "elr" else "the iso-LR check)") in t)
    assert panel.get_xlabel() == ("lr" if across == "lr" else "ELR = lr x wd")
    series = _series(panel)
    (sr,) = checks
    (label,) = [k for k in series if k.startswith(f"{sr.directory.name} (check, ")]
    assert f"{'ELR' if case == 'elr' else 'lr'}=" in label
    xs = [x for x, _ in series[label]]
    assert len(set(np.round(np.log2(xs), 6))) == len(xs) == len(factors), "the check's members share one x"
    # the checked point itself was trained by another stage: read onto the check's line, not left out
    read = series["on these lines, from other stages (read, not retrained)"]
    centre = run.result.invariant_check.outcomes[0]  # the checked point: trained before the check
    want = centre.point.lr if across == "lr" else centre.point.elr
    assert all(abs(math.log2(x / want)) > 1e-9 for x in xs)
    assert any(abs(math.log2(x / want)) < 1e-9 and y == centre.loss for x, y in read), (want, read)
    # no panel shows a check of its own axis as a vertical stack: every stage's x values differ
    for ax in fig.axes:
        for label, pts in _series(ax).items():
            if "(check," in label:
                assert len({round(math.log2(x), 6) for x, _ in pts}) == len(pts)


def _stars(run) -> list[tuple[str, float, float]]:
    """(x label, x, y) of every 'recommended' marker: the curve panels' first, then the heatmap's."""
    starred = []
    for ax in [*build_curve_figure(run).axes, build_heatmap_figure(run).axes[0]]:
        for star in [line for line in ax.lines if line.get_label() == "recommended"]:
            assert star.get_marker() == "*" and star.get_markerfacecolor() == "none"
            (x,), (y,) = star.get_data()
            starred.append((ax.get_xlabel(), x, y))
    return starred


def test_the_recommended_vertex_is_a_star_on_the_fit_and_on_the_heatmap(monkeypatch, tmp_path):
    run = _synthetic_tune(monkeypatch, tmp_path, 10.0, 2 ** -8, 800)
    reco, fit = run.result.recommendation, run.result.fit
    assert run.result.axis == "lr" and reco.source == "fit"
    assert _stars(run) == [("lr", pytest.approx(reco.lr), pytest.approx(fit.loss)),
                           ("lr", pytest.approx(reco.lr), pytest.approx(reco.wd))]  # then the heatmap, at (lr, wd)


def test_a_recommended_member_is_a_hollow_star_on_every_panel_that_shows_it(monkeypatch, tmp_path):
    """The star hid the member under it (a zoom member, say); now the member shows through. The lr search's
    best is also a member of the first ELR scan, so both panels star it."""
    run = _synthetic_tune(monkeypatch, tmp_path, 10.0, 2 ** -8, 800)
    best = run.result.best
    member = Recommendation(best.lr, best.wd, run.result.loss, run.result.se, "member")  # as without a fit
    run = dataclasses.replace(run, result=dataclasses.replace(run.result, recommendation=member))
    starred = _stars(run)
    elr, lr = ("ELR = lr x wd", best.lr * best.wd), ("lr", best.lr)
    assert {(name, round(math.log2(v), 9)) for name, v, _ in starred[:2]} == {
        (elr[0], round(math.log2(elr[1]), 9)), (lr[0], round(math.log2(lr[1]), 9))}
    assert all(y == pytest.approx(run.result.loss) for _, _, y in starred[:2])
    assert starred[2][1:] == (best.lr, best.wd)  # the heatmap's, at (lr, wd)


def test_the_legend_covers_no_member_even_with_members_in_every_corner(tmp_path):
    """The legend sat inside the panel (matplotlib's "best" corner) and covered members: on a cosine-schedule
    tune no corner was free. Three scans on three lines, high, middle and low, across the whole ELR range
    leave none free either: the legend must stand outside."""
    from matplotlib.legend import Legend

    from trajinv.tune.search import Point, Stage, TuneResult

    elrs = [2.0 ** k for k in range(-12, -5)]
    stages = []
    for i, (lr, level) in enumerate([(2 ** -8, 3.0), (2 ** -7, 2.0), (2 ** -6, 1.0)]):
        points = tuple(Point(lr, e / lr) for e in elrs)
        outcomes = tuple(Outcome(p, level + 0.01 * k, 0.01) for k, p in enumerate(points))
        stages.append(StageRun(Stage(f"{i + 1}-scan", "scan", points), "elr", tmp_path / f"{i + 1}-scan",
                               outcomes, [1e5] * len(points), len(points), len(points)))
    best = stages[2].outcomes[0]
    result = TuneResult(axis="elr", best=best.point, loss=best.loss, se=best.se, fit=None, invariant_check=None,
                        stages=(), cost_member_steps=0, grid_equivalent_points=0, grid_equivalent_member_steps=0,
                        notes=())
    fig = build_curve_figure(runner.TuneRun(TuneSpec(), result, None, stages))
    fig.canvas.draw()
    (ax,) = fig.axes
    points = [xy for label, pts in _series(ax).items() for xy in pts]
    assert len(points) == 3 * len(elrs) + 1  # every member, and the star
    lo, hi = ax.transData.transform(min(points)), ax.transData.transform(max(points))
    frame = ax.get_window_extent()
    assert frame.contains(*lo) and frame.contains(*hi)  # the corners are in the panel: the case is exercised
    legends = fig.findobj(Legend)
    assert len(legends) == 1 and len(legends[0].get_texts()) == 4
    box = legends[0].get_window_extent()
    inside = [(x, y) for x, y in points if box.contains(*ax.transData.transform((x, y)))]
    assert not inside, f"the legend {box} covers members at {inside}"
