"""Plots: one line per member, colour and style encode the invariance groups, valid PNGs."""

import json
import math

import pytest
from matplotlib.colors import to_rgba

from trajinv.analysis.plots import build_gns_figure, build_loss_figure, plot_loss_curves, plot_sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_records(lrs=(4e-3, 8e-3, 1.6e-2), wds=(0.5, 1.0, 2.0), steps=range(0, 201, 20), gns=False):
    recs, m = [], 0
    for lr in lrs:
        for wd in wds:
            for s in steps:
                v = 2.0 + 3.0 * math.exp(-lr * s) + math.exp(-lr * wd * s)
                r = {"run_id": "r0", "member": m, "name": f"lr={lr:g},wd={wd:g}", "step": s, "lr": lr,
                     "base_lr": lr, "wd": wd, "elr": lr * wd, "batch_size": 32, "train_loss": v,
                     "val_loss": v if s % 40 == 0 else None}
                if gns:
                    r["b_precond_smooth"] = 10.0 + s
                recs.append(r)
            m += 1
    return recs


def _by_name(fig):
    return {line.get_label(): line for line in fig.axes[0].lines}


@pytest.mark.parametrize("color_by", ["lr", "elr"])
def test_one_line_per_member_with_colorbar(color_by):
    fig = build_loss_figure(make_records(), color_by=color_by, logx=True)
    lines = _by_name(fig)
    assert len(lines) == 9 and len(fig.axes) == 2  # plot + colorbar
    assert list(lines["lr=0.008,wd=1"].get_xdata()) == [0, 40, 80, 120, 160, 200]  # nulls skipped
    same_lr = [lines[f"lr=0.008,wd={wd:g}"] for wd in (0.5, 1, 2)]
    same_elr = [lines[n] for n in ("lr=0.004,wd=2", "lr=0.008,wd=1", "lr=0.016,wd=0.5")]
    shared, varied = (same_lr, same_elr) if color_by == "lr" else (same_elr, same_lr)
    # Members sharing the coloured quantity share a colour and differ in line style.
    assert len({to_rgba(ln.get_color()) for ln in shared}) == 1
    assert len({str(ln.get_linestyle()) for ln in shared}) == 3
    assert len({to_rgba(ln.get_color()) for ln in varied}) == 3
    assert fig.axes[0].get_xscale() == "symlog"


def test_bad_color_by_and_missing_key():
    with pytest.raises(ValueError, match="'wd'"):
        build_loss_figure(make_records(), color_by="wd")
    with pytest.raises(ValueError, match="'grad_norm'"):
        build_loss_figure(make_records(), key="grad_norm")


def test_diverged_member_drawn_faintly():
    recs = make_records(lrs=(4e-3,), wds=(0.5, 1.0))
    for r in recs:
        if r["member"] == 1 and r["step"] >= 100:
            r["train_loss"] = float("nan")
            r["val_loss"] = None
    lines = _by_name(build_loss_figure(recs))
    assert lines["lr=0.004,wd=1"].get_alpha() < lines["lr=0.004,wd=0.5"].get_alpha()
    assert max(lines["lr=0.004,wd=1"].get_xdata()) == 80


def test_plot_loss_curves_writes_png_atomically(tmp_path):
    out = plot_loss_curves(make_records(), tmp_path / "sub" / "x.png", color_by="elr", title="t")
    data = out.read_bytes()
    assert out == tmp_path / "sub" / "x.png" and data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert [p.name for p in out.parent.iterdir()] == ["x.png"]  # no temporary left behind
    with pytest.raises(ValueError, match="x.jpg"):
        plot_loss_curves(make_records(), tmp_path / "x.jpg")


@pytest.mark.parametrize("gns", [False, True])
def test_plot_sweep(tmp_path, gns):
    d = tmp_path / "runs" / "r0"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_records(gns=gns)))
    paths = plot_sweep(tmp_path)
    want = ["val_loss_by_lr.png", "val_loss_by_elr.png"] + (["gns.png"] if gns else [])
    assert [p.name for p in paths] == want
    for p in paths:
        assert p.parent == tmp_path and p.read_bytes().startswith(PNG_SIGNATURE)


def test_gns_figure_has_batch_size_line():
    fig = build_gns_figure(make_records(gns=True))
    ax = fig.axes[0]
    hlines = [ln for ln in ax.lines if list(ln.get_ydata()) == [32, 32]]
    assert len(ax.lines) == 9 + 1 and len(hlines) == 1 and ax.get_yscale() == "log"
    assert build_gns_figure(make_records()) is None


def test_tokens_axis_and_a_marker_per_batch_schedule(tmp_path):
    a = make_records(lrs=(4e-3,), wds=(0.5, 1.0))
    b = [{**r, "run_id": "r1", "batch_size": 64, "batch_schedule": "32@0.1,64"} for r in a]
    for r in a:
        r["batch_schedule"] = "32"
    for r in a + b:
        r["tokens"] = r["step"] * r["batch_size"] * 64
    lines = build_loss_figure(a + b, x="tokens").axes[0].lines
    assert len(lines) == 4
    assert {ln.get_marker() for ln in lines} == {"o", "s"}  # one marker per schedule
    assert max(lines[0].get_xdata()) == 200 * 32 * 64 and max(lines[-1].get_xdata()) == 200 * 64 * 64
    fig = build_loss_figure(a, x="tokens")
    assert fig.axes[0].get_xlabel() == "tokens trained" and {ln.get_marker() for ln in fig.axes[0].lines} == {"None"}
    d = tmp_path / "runs" / "r0"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a + b))
    written = [p.name for p in plot_sweep(tmp_path, x="tokens")]
    assert written == ["val_loss_by_lr_tokens.png", "val_loss_by_elr_tokens.png"]
    with pytest.raises(ValueError, match="'epochs'"):
        build_loss_figure(a, x="epochs")
    with pytest.raises(ValueError, match="no logged tokens"):
        build_loss_figure(make_records(), x="tokens")


def test_a_member_without_weight_decay_is_drawn_grey_by_elr():
    # ELR = 0 has no place on a log colour scale: it used to fail the whole report
    fig = build_loss_figure(make_records(wds=(0.0, 1.0)), color_by="elr")
    lines = _by_name(fig)
    assert to_rgba(lines["lr=0.008,wd=0"].get_color()) == to_rgba("0.45")
    assert to_rgba(lines["lr=0.008,wd=1"].get_color()) != to_rgba("0.45")
    assert "elr=0" in [t.get_text() for t in fig.axes[0].get_legend().texts]


def test_a_member_with_one_logged_point_is_drawn_as_a_marker():
    # one eval per member (--eval-every past the run): a line through one point draws nothing
    fig = build_loss_figure(make_records(steps=[40]), color_by="elr")
    assert all(line.get_marker() == "o" and len(line.get_xdata()) == 1 for line in fig.axes[0].lines)
    several = build_loss_figure(make_records(), color_by="elr")
    assert all(line.get_marker() in (None, "None", "") for line in several.axes[0].lines)


def test_gns_figure_marks_each_batch_schedule():
    a = make_records(lrs=(4e-3,), wds=(0.5, 1.0), gns=True)
    b = [{**r, "run_id": "r1", "batch_schedule": "32@0.1,64"} for r in a]
    for r in a:
        r["batch_schedule"] = "32"
    members = build_gns_figure(a + b).axes[0].lines[:4]  # the members' lines come before the batch lines
    assert {ln.get_marker() for ln in members} == {"o", "s"}
    labels = [t.get_text() for t in build_gns_figure(a + b).axes[0].get_legend().texts]
    assert "B=32" in labels and "B=32@0.1,64" in labels
    assert {ln.get_marker() for ln in build_gns_figure(a).axes[0].lines} == {"None"}  # one schedule: no markers


def test_the_gns_legend_covers_no_curve():
    """B_precond grows as training goes on: the legend, in the upper right, covered the ends of the curves,
    where the regime is read. It stands beside the panel, and a panel's legend it stays."""
    fig = build_gns_figure(make_records(gns=True))
    fig.canvas.draw()
    ax = fig.axes[0]
    box = ax.get_legend().get_window_extent()
    points = [xy for line in ax.lines for xy in line.get_transform().transform(line.get_xydata())]  # batch lines too
    assert points and not any(box.contains(x, y) for x, y in points), box
    assert not box.overlaps(fig.axes[1].get_window_extent())  # nor the colorbar


def test_the_gns_axis_reads_plain_numbers():
    """B_precond spanning under a decade (60 to 260 here) had its minor ticks labelled "6x10^1", "2x10^2" and its
    decades "10^2": a batch size reads "60", "200", "100"."""
    records = make_records(gns=True)
    for r in records:
        r["b_precond_smooth"] = 60.0 + r["step"]
    fig = build_gns_figure(records)
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    shown = [t.get_text() for t in ax.get_yticklabels(minor=False) + ax.get_yticklabels(minor=True)
             if t.get_visible() and t.get_text() and lo <= t.get_position()[1] <= hi]
    assert {"100", "200"} <= set(shown), shown
    for text in shown:
        assert "10^" not in text and "\\times" not in text and "$" not in text, shown
        assert float(text) > 0, shown  # a plain number


def test_gns_figure_on_a_tokens_axis(tmp_path):
    # --x tokens drew every plot on tokens but gns.png, whose schedules then sat at the wrong data
    a = make_records(lrs=(4e-3,), wds=(0.5,), gns=True)
    b = [{**r, "run_id": "r1", "member": 1, "batch_size": 64, "batch_schedule": "64"} for r in a]
    for r in a + b:
        r["tokens"] = r["step"] * r["batch_size"] * 64
    fig = build_gns_figure(a + b, x="tokens")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "tokens trained"
    assert [max(ln.get_xdata()) for ln in ax.lines[:2]] == [200 * 32 * 64, 200 * 64 * 64]
    assert build_gns_figure(a + b).axes[0].get_xlabel() == "step"
    with pytest.raises(ValueError, match="'epochs'"):
        build_gns_figure(a, x="epochs")
    d = tmp_path / "runs" / "r0"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a + b))
    assert [p.name for p in plot_sweep(tmp_path, x="tokens")][-1] == "gns_tokens.png"


def test_more_line_styles_than_there_are_is_one_legend_entry():
    # 1,001 lrs at one wd, coloured by ELR: a legend entry per lr (styles repeating every 8) took minutes
    fig = build_loss_figure(make_records(lrs=[1e-3 * 1.1 ** i for i in range(12)], wds=(0.5,)), color_by="elr")
    labels = [t.get_text() for t in fig.axes[0].get_legend().texts]
    assert labels == ["12 lr values"]
    assert {ln.get_linestyle() for ln in fig.axes[0].lines} == {"-"}
    few = build_loss_figure(make_records(), color_by="elr")
    assert [t.get_text() for t in few.axes[0].get_legend().texts] == ["lr=0.004", "lr=0.008", "lr=0.016"]
