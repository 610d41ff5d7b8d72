"""Tuning curves: closed forms, bands, sweeps (2-D box vs 1-D ELR line), the optional opda, the plot."""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import sys

import numpy as np
import pytest

from trajinv.analysis.tuning_curves import OPDA_MISSING, plot_tuning_curves, sweep_tuning_curves, tuning_curve

# opda is optional: the refusals and the missing-opda test run without it.
needs_opda = pytest.mark.skipif(importlib.util.find_spec("opda") is None, reason="opda not installed")


def expected_min_of_grid(m: int, n: np.ndarray) -> np.ndarray:
    """E[min of n draws with replacement] from {1 + k/m : k = 1..m}: P(min >= y_k) = ((m - k + 1)/m)^n."""
    k = np.arange(1, m + 1)[None, :]
    n = np.asarray(n)[:, None]
    return np.sum((1 + k / m) * (((m - k + 1) / m) ** n - ((m - k) / m) ** n), axis=1)


def csv_rows(rows: list[dict]) -> list[dict]:
    """The rows as a summary.csv reader returns them: every value a string, None as ''."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return list(csv.DictReader(io.StringIO(buf.getvalue())))


def sweep(lrs, wds, loss) -> list[dict]:
    return csv_rows([{"lr": lr, "wd": wd, "elr": lr * wd, "final_val_loss": loss(lr, wd), "status": "done"}
                     for lr in lrs for wd in wds])


@needs_opda
def test_expected_curve_matches_the_closed_form_and_sits_inside_ordered_finite_bands():
    m, ns = 12, np.arange(1, 25)
    curve = tuning_curve(1 + np.arange(1, m + 1) / m, ns, lower_bound=0.0, upper_bound=3.0, label="grid")
    truth = expected_min_of_grid(m, ns)
    np.testing.assert_allclose(curve.expected, truth, rtol=1e-12)
    assert np.all(np.isfinite(curve.lower)) and np.all(np.isfinite(curve.upper))
    assert np.all(curve.lower <= curve.expected) and np.all(curve.expected <= curve.upper)
    assert np.all(curve.lower < truth) and np.all(truth < curve.upper)
    for band in (curve.expected, curve.lower, curve.upper):
        assert np.all(np.diff(band) <= 0)  # more trials never hurt
    assert (curve.label, curve.trials, curve.confidence) == ("grid", m, 0.8)
    np.testing.assert_array_equal(curve.n, ns)


@needs_opda
def test_bands_cover_the_true_curve_at_about_their_confidence():
    # True curve of U(1, 2): E[min of n] = 1 + 1/(n + 1). Simultaneous 80% bands over all n.
    rng, ns = np.random.default_rng(0), np.arange(1, 40)
    truth = 1 + 1 / (ns + 1)
    covered = []
    for _ in range(20):
        curve = tuning_curve(rng.uniform(1, 2, 10), ns, lower_bound=0.5, upper_bound=2.5)
        covered.append(bool(np.all((curve.lower <= truth) & (truth <= curve.upper))))
    assert sum(covered) >= 13  # binomial(20, 0.8): P(< 13) ~ 3%


@needs_opda
def test_bands_narrow_as_the_sample_grows():
    rng = np.random.default_rng(1)
    widths = [tuning_curve(rng.uniform(1, 2, size), [1, 4], 0.0, 3.0) for size in (10, 40)]
    small, large = ((c.upper - c.lower) for c in widths)
    assert np.all(large < 0.7 * small) and np.all(small < 3.0)  # informative, not the whole [0, 3]


@needs_opda
def test_diverged_runs_count_as_the_upper_bound():
    curve = tuning_curve([3.0, None, float("nan"), 4.0], [1, 2], lower_bound=0.0, upper_bound=6.0)
    assert curve.expected[0] == pytest.approx((3 + 6 + 6 + 4) / 4) and curve.trials == 4


@pytest.mark.parametrize("losses,lo,hi,match", [
    ([3.0, 4.0], 0.0, math.inf, "finite"),
    ([3.0, 4.0], 5.0, 5.0, "lower < upper"),
    ([3.0, 7.0], 0.0, 6.0, "7.0"),
    ([], 0.0, 6.0, "at least one"),
])
def test_tuning_curve_refuses_bad_input(losses, lo, hi, match):
    with pytest.raises(ValueError, match=match):
        tuning_curve(losses, [1, 2], lower_bound=lo, upper_bound=hi)


@pytest.mark.parametrize("ns,confidence,match", [([0, 1], 0.8, "ns"), ([], 0.8, "ns"), ([1, 2], 1.0, "confidence")])
def test_tuning_curve_refuses_bad_ns_and_confidence(ns, confidence, match):
    with pytest.raises(ValueError, match=match):
        tuning_curve([3.0, 4.0], ns, lower_bound=0.0, upper_bound=5.0, confidence=confidence)


def test_missing_opda_gives_a_one_line_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "opda", None)
    monkeypatch.setitem(sys.modules, "opda.nonparametric", None)
    with pytest.raises(ImportError) as info:
        tuning_curve([3.0, 4.0], [1, 2], lower_bound=0.0, upper_bound=5.0)
    assert str(info.value) == OPDA_MISSING == "tuning curves need opda: pip install 'trajinv[hpo]'"


@needs_opda
def test_one_dimensional_search_along_elr_beats_the_box_when_loss_follows_elr():
    # The optimum ELR (2^-16.3) sits in the thin tail of the box's ELR distribution but in
    # the middle of the ELR line at the chosen lr, so the line finds it in fewer trials.
    lrs, wds = 2.0 ** np.arange(-12, -6), 2.0 ** np.arange(-6, 0)
    curves = sweep_tuning_curves(sweep(lrs, wds, lambda lr, wd: 3 + 0.05 * (math.log2(lr * wd) + 16.3) ** 2))
    one, two = curves["1d"], curves["2d"]
    assert (one.trials, two.trials) == (6, 36) and len(one.n) == len(two.n) == 36
    assert one.trials_to_reach(3.1) < two.trials_to_reach(3.1)
    assert two.trials_to_reach(2.0) is None


@needs_opda
def test_line_lr_is_the_lr_with_most_members():
    rows = sweep([1e-3, 2e-3, 4e-3], [0.1, 0.2, 0.4], lambda lr, wd: 3 + abs(math.log2(lr / 4e-3 * wd / 0.2)))
    rows += sweep([1e-3], [0.05, 0.8], lambda lr, wd: 3.5)  # an ELR scan at 1e-3: most members
    assert sweep_tuning_curves(rows)["1d"].label == "ELR line at lr=0.001, 5 trials"


@needs_opda
def test_line_lr_ties_go_to_the_lr_of_the_best_member():
    rows = sweep([1e-3, 2e-3, 4e-3], [0.1, 0.2, 0.4], lambda lr, wd: 3 + abs(math.log2(lr / 2e-3)) + wd)
    assert sweep_tuning_curves(rows)["1d"].label == "ELR line at lr=0.002, 3 trials"


def summary(statuses_losses) -> list[dict]:
    return csv_rows([{"lr": 1e-3, "wd": 0.1 * (k + 1), "elr": 1e-4 * (k + 1), "final_val_loss": loss, "status": st}
                     for k, (st, loss) in enumerate(statuses_losses)])


@needs_opda
@pytest.mark.parametrize("vocab_size,upper", [(None, 4.0), (256, math.log(256))])
def test_upper_bound_defaults_to_worst_finite_loss_or_ln_vocab(vocab_size, upper):
    rows = summary([("done", 3.0), ("done", 4.0), ("diverged", None), ("running", 2.0), ("done", None)])
    curve = sweep_tuning_curves(rows, ns=[1], vocab_size=vocab_size)["2d"]
    assert curve.trials == 3  # running and loss-less members are not finished trials
    assert curve.expected[0] == pytest.approx((3.0 + 4.0 + upper) / 3)


@needs_opda
def test_losses_no_better_than_a_uniform_guess_count_as_diverged_at_the_bound():
    rows = summary([("done", 3.0), ("done", 4.0), ("diverged", None)])
    curve = sweep_tuning_curves(rows, ns=[1], vocab_size=2)["2d"]  # ln 2 < 3: nothing was learned
    assert curve.expected[0] == pytest.approx(math.log(2))


def test_sweep_refusals():
    with pytest.raises(ValueError, match="diverged; pass upper_bound"):
        sweep_tuning_curves(summary([("diverged", None), ("diverged", None)]))
    with pytest.raises(ValueError, match="no finished member"):
        sweep_tuning_curves(summary([("running", 3.0)]))
    with pytest.raises(ValueError, match="4.0"):
        sweep_tuning_curves(summary([("done", 3.0), ("done", 4.0)]), upper_bound=3.5)


@needs_opda
def test_plot_writes_a_png_atomically(tmp_path):
    curves = {"a": tuning_curve([3.0, 3.2, 3.5], [1, 2, 4], 0.0, 5.0, label="a"),
              "b": tuning_curve([3.1, 3.3], [1, 2, 4], 0.0, 5.0, label="b")}
    out = plot_tuning_curves(curves, tmp_path / "sub" / "tc.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["tc.png"]
    with pytest.raises(ValueError, match="at least one"):
        plot_tuning_curves({}, tmp_path / "x.png")


def test_a_member_that_ended_no_better_than_a_uniform_guess_is_a_diverged_trial():
    from trajinv.analysis.tuning_curves import finished_trials

    rows = [{"lr": "0.01", "status": "done", "final_val_loss": v} for v in ("2.5", "900.0")]
    assert finished_trials(rows) == [(0.01, 2.5), (0.01, 900.0)]  # without V: a loss like any other
    assert finished_trials(rows, vocab_size=256) == [(0.01, 2.5), (0.01, None)]


@needs_opda
def test_a_stage_varying_one_axis_is_labelled_by_it_and_draws_no_curve_of_one_run():
    # a tune's lr scan (one wd, one member per lr) was labelled "lr x wd" beside an "ELR line" curve of its one
    # best member (a QA run); an ELR scan (one lr) drew the same members twice
    lr_scan = sweep([1e-3, 2e-3, 4e-3, 8e-3], [0.25], lambda lr, wd: 3 + abs(math.log2(lr / 2e-3)))
    assert {k: c.label for k, c in sweep_tuning_curves(lr_scan).items()} == {"2d": "lr at wd=0.25, 4 trials"}
    # a member done without a recorded loss is no trial, and does not make its wd one that varied
    lost = csv_rows([{"lr": 1e-3, "wd": 0.5, "elr": 5e-4, "final_val_loss": None, "status": "done"}])
    assert sweep_tuning_curves(lr_scan + lost)["2d"].label == "lr at wd=0.25, 4 trials"
    elr_scan = sweep([4e-3], [0.125, 0.25, 0.5], lambda lr, wd: 3 + wd)
    assert {k: c.label for k, c in sweep_tuning_curves(elr_scan).items()} == {"2d": "ELR line at lr=0.004, 3 trials"}


@needs_opda
def test_the_plot_frames_the_expected_curves_not_bands_that_reach_the_diverged_bound(tmp_path):
    import unittest.mock

    from matplotlib.figure import Figure

    curves = sweep_tuning_curves(sweep([1e-3, 2e-3], [0.1, 0.2], lambda lr, wd: 3 + 0.01 * lr / 1e-3 + wd / 10),
                                 vocab_size=256)  # the bands reach ln 256 = 5.5
    assert max(float(c.upper.max()) for c in curves.values()) > 4.5
    seen = {}
    real = Figure.savefig

    def savefig(self, *a, **k):
        seen["ylim"] = self.axes[0].get_ylim()
        return real(self, *a, **k)

    with unittest.mock.patch.object(Figure, "savefig", savefig):
        plot_tuning_curves(curves, tmp_path / "tc.png")
    lo = min(float(c.expected.min()) for c in curves.values())
    hi = max(float(c.expected.max()) for c in curves.values())
    margin = max(0.5 * (hi - lo), 0.01)
    assert seen["ylim"] == pytest.approx((lo - margin, hi + margin))


@needs_opda
@pytest.mark.parametrize("trials, some", [(4, {"1", "2", "3", "4"}), (8, {"1", "2", "4"}), (36, {"1", "10"})])
def test_the_trial_axis_reads_plain_numbers(tmp_path, monkeypatch, trials, some):
    """Under a decade of trials matplotlib labelled the minor ticks of the log axis "2x10^0", "3x10^0", and
    the decades "10^0" (LogFormatterSciNotation): a count of trials reads "2", "3", "10"."""
    from matplotlib.figure import Figure

    losses = [3.0 + 0.01 * k for k in range(trials)]
    curves = {"a": tuning_curve(losses, range(1, trials + 1), 0.0, 5.0, label="a")}
    seen = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: seen.append(self))  # read, not written
    plot_tuning_curves(curves, tmp_path / "tc.png")
    (fig,) = seen
    fig.canvas.draw()
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    shown = [t.get_text() for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
             if t.get_visible() and t.get_text() and lo <= t.get_position()[0] <= hi]
    assert some <= set(shown), shown
    for text in shown:
        assert "10^" not in text and "\\times" not in text and "$" not in text, shown
        assert float(text) > 0, shown  # a plain number
