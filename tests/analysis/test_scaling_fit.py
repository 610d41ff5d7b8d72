"""Optimum of a budget, power-law fits with intervals, the refusals, the claims and the plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from trajinv.analysis.scaling import (BudgetOptimum, MemberLoss, fit_power_law, fit_scaling, optimum_from_members,
                                      plot_scaling, tau_iter)

LR_LEVELS = 2.0 ** np.arange(-12, -5)  # 7 levels
WD_LEVELS = 2.0 ** np.arange(-6, 1)


def valley(u0: float = -9.3, v0: float = -2.6):
    """A convex quadratic in (log2 lr, log2 wd) with a strong cross term: a valley along lr*wd = const."""
    def loss(lr: float, wd: float) -> float:
        du, dv = math.log2(lr) - u0, math.log2(wd) - v0
        return 3.0 + 0.3 * du * du + 0.2 * dv * dv + 0.4 * du * dv
    return loss


def grid_members(loss, se: float = 0.0, lrs=LR_LEVELS, wds=WD_LEVELS) -> list[MemberLoss]:
    return [MemberLoss(lr, wd, loss(lr, wd), se) for lr in lrs for wd in wds]


def optimum(tokens: float, lr: float, wd: float, se: float = 0.05, source: str = "", **kw) -> BudgetOptimum:
    return BudgetOptimum(tokens=tokens, steps=int(tokens // 1024), lr=lr, wd=wd, elr=lr * wd,
                         log2_se={"lr": se, "wd": se, "elr": se * math.sqrt(2)}, at_edge=kw.pop("at_edge", False),
                         source=source or f"t{tokens:g}", **kw)


def scaling_optima(b_lr: float, b_wd: float, se: float = 0.05, n: int = 5, seed: int = 0) -> list[BudgetOptimum]:
    """Optima on lr = 1e-3 * (N/2^20)^b_lr, wd = 0.1 * (N/2^20)^b_wd, with log2 noise of sd `se`."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        tokens = 2.0 ** (20 + 2 * k)
        lr = 1e-3 * (tokens / 2**20) ** b_lr * 2.0 ** (se * rng.standard_normal())
        wd = 0.1 * (tokens / 2**20) ** b_wd * 2.0 ** (se * rng.standard_normal())
        out.append(optimum(tokens, lr, wd, se))
    return out


# --- the optimum of one budget ------------------------------------------------

def test_grid_optimum_is_the_joint_vertex_of_a_valley():
    # Per-axis fits (lr along the best row, wd along the best column) would give log2 lr -9.03, log2 wd -2.9.
    opt = optimum_from_members(grid_members(valley()), tokens=1e9, steps=1000, source="g")
    assert math.log2(opt.lr) == pytest.approx(-9.3, abs=1e-6)
    assert math.log2(opt.wd) == pytest.approx(-2.6, abs=1e-6)
    assert opt.elr == pytest.approx(opt.lr * opt.wd)
    assert not opt.at_edge and opt.edge_axes == () and opt.tuned_axes == ("lr", "wd")
    assert (opt.tokens, opt.steps, opt.source) == (1e9, 1000, "g")
    assert all(se < 1e-9 for se in opt.log2_se.values())  # exact losses: no spread


def test_elr_scan_at_fixed_lr_keeps_lr_and_gives_it_zero_uncertainty():
    lr = 2.0 ** -10
    members = [MemberLoss(lr, wd, 2.5 + 0.1 * (math.log2(wd) + 3.4) ** 2, 0.01) for wd in WD_LEVELS]
    opt = optimum_from_members(members, tokens=1e9, steps=1000)
    assert opt.lr == lr and opt.log2_se["lr"] == 0.0 and opt.tuned_axes == ("wd",)
    assert math.log2(opt.wd) == pytest.approx(-3.4, abs=0.05)
    assert opt.log2_se["wd"] > 0 and opt.log2_se["elr"] == pytest.approx(opt.log2_se["wd"])


def test_lr_scan_at_fixed_wd():
    members = [MemberLoss(lr, 0.1, 2.5 + 0.2 * (math.log2(lr) + 8.7) ** 2) for lr in LR_LEVELS]
    opt = optimum_from_members(members, tokens=1e9, steps=1000)
    assert math.log2(opt.lr) == pytest.approx(-8.7, abs=1e-6) and opt.wd == 0.1 and opt.tuned_axes == ("lr",)


def test_bootstrap_se_matches_the_scatter_of_repeated_experiments():
    rng = np.random.default_rng(5)
    se, truth = 0.01, [2.5 + 0.05 * (math.log2(wd) + 3.4) ** 2 for wd in WD_LEVELS]
    estimates, reported = [], []
    for r in range(60):
        noisy = truth + se * rng.standard_normal(len(truth))
        opt = optimum_from_members([MemberLoss(1e-3, wd, l, se) for wd, l in zip(WD_LEVELS, noisy)],
                                   1e9, 1000, n_boot=100, seed=r)
        estimates.append(math.log2(opt.wd))
        reported.append(opt.log2_se["wd"])
    assert 0.7 < np.median(reported) / np.std(estimates) < 1.4


def test_optimum_at_the_edge_is_flagged_with_its_axis():
    members = grid_members(valley(u0=-5.5, v0=-2.6))  # lr optimum above the largest lr
    opt = optimum_from_members(members, 1e9, 1000)
    assert opt.at_edge and opt.edge_axes == ("lr",)
    assert opt.lr == LR_LEVELS[-1]  # no extrapolation beyond the evaluated lrs


def test_diverged_member_beyond_the_best_brackets_it_and_falls_back_to_the_best():
    wds = WD_LEVELS
    losses = [2.5 + 0.1 * (math.log2(wd) + 1.2) ** 2 for wd in wds]
    losses[-1] = None  # diverged just past the best (log2 wd = -1)
    opt = optimum_from_members([MemberLoss(1e-3, wd, l) for wd, l in zip(wds, losses)], 1e9, 1000)
    assert not opt.at_edge and opt.wd == 0.5  # two finite points: no quadratic, the best member
    # a grid point: uniform over +-half a step, whose half 16-84 % range is 0.34 of a step
    assert opt.log2_se["wd"] == pytest.approx(0.34, rel=0.1)


def test_optimum_refusals():
    with pytest.raises(ValueError, match="no finite loss"):
        optimum_from_members([MemberLoss(1e-3, 0.1, None), MemberLoss(1e-3, 0.2, float("nan"))], 1e9, 10)
    with pytest.raises(ValueError, match="two or more values"):
        optimum_from_members([MemberLoss(1e-3, 0.1, 2.0), MemberLoss(1e-3, 0.1, 2.1)], 1e9, 10)
    with pytest.raises(ValueError, match="positive"):
        optimum_from_members([MemberLoss(0.0, 0.1, 2.0), MemberLoss(1e-3, 0.2, 2.1)], 1e9, 10)


# --- power laws ---------------------------------------------------------------

@pytest.mark.parametrize("b_lr,b_wd", [(0.0, -0.5), (0.2, -0.8)])
def test_known_exponents_are_inside_their_interval_and_wrong_ones_are_not(b_lr, b_wd):
    opts = scaling_optima(b_lr, b_wd, se=0.1, n=5)
    tokens = [o.tokens for o in opts]
    for values, b, wrong in (([o.lr for o in opts], b_lr, b_lr + 0.3), ([o.wd for o in opts], b_wd, b_wd - 0.3)):
        fit = fit_power_law(tokens, values, [0.1] * len(opts))
        assert fit.b_ci[0] < b < fit.b_ci[1]
        assert not fit.b_ci[0] < wrong < fit.b_ci[1]
        assert fit.a_ci[0] < fit.a < fit.a_ci[1]


@pytest.mark.parametrize("given_se", [True, False])
def test_exponent_interval_has_its_nominal_coverage_with_three_points(given_se):
    rng = np.random.default_rng(1)
    x = 2.0 ** np.array([20.0, 22.0, 24.0])
    hits = 0
    for r in range(200):
        y = 2.0 ** (-0.5 * np.log2(x) + rng.normal(0, 0.2, 3))
        fit = fit_power_law(x, y, [0.2] * 3 if given_se else None, n_boot=1000, seed=r)
        hits += fit.b_ci[0] < -0.5 < fit.b_ci[1]
    assert 0.82 <= hits / 200 <= 0.98  # nominal 0.9; a normal-theory interval on 1 dof covers ~0.7


def test_predict_returns_value_inside_its_interval_and_covers_the_truth():
    x = 2.0 ** np.arange(20, 30, 2)
    rng = np.random.default_rng(2)
    y = 3.0 * x ** -0.5 * 2.0 ** rng.normal(0, 0.05, len(x))
    fit = fit_power_law(x, y, [0.05] * len(x))
    value, lo, hi = fit.predict(2.0**34)
    assert lo < value < hi and lo < 3.0 * 2.0 ** -17 < hi
    values, los, his = fit.predict(x)
    assert values.shape == los.shape == his.shape == x.shape and np.all(los < his)


def test_power_law_refusals():
    with pytest.raises(ValueError, match="3 or more"):
        fit_power_law([1, 2], [1, 2])
    with pytest.raises(ValueError, match="distinct"):
        fit_power_law([1, 2, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1, 2, 3], [1, -2, 3])
    with pytest.raises(ValueError, match="n_boot=1"):
        fit_power_law([1, 2, 3], [1, 2, 3], n_boot=1)


def test_budget_needs_positive_tokens_and_steps():
    with pytest.raises(ValueError, match="empty: .*steps=0"):
        BudgetOptimum(tokens=2.0**20, steps=0, lr=1e-3, wd=0.1, elr=1e-4, log2_se={}, at_edge=False, source="empty")


# --- fit_scaling --------------------------------------------------------------

def one_line_error(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_fit_scaling_refusals_name_the_bad_value():
    opts = scaling_optima(0.0, -0.5, n=3)
    # in `trajinv fit`'s terms: it said "fit_scaling needs optima at 3 or more token budgets, got 2"
    msg = one_line_error(lambda: fit_scaling(opts[:2]))
    assert msg == ("a scaling fit needs 3 or more token budgets, one tune or sweep directory each; got 2 "
                   "(t1.04858e+06, t4.1943e+06)")
    assert one_line_error(lambda: fit_scaling([])).endswith("; got 0")
    twin = optimum(opts[0].tokens, 1e-3, 0.1, source="again")
    msg = one_line_error(lambda: fit_scaling(opts + [twin]))
    assert msg == (f"'t1.04858e+06' and 'again' trained the same budget, {opts[0].tokens:g} tokens; give one tune or "
                   "sweep directory per budget")
    edge = optimum(2.0**30, 1e-3, 0.1, source="big-run", at_edge=True, edge_axes=("wd",))
    msg = one_line_error(lambda: fit_scaling(opts + [edge]))
    assert "big-run" in msg and "along wd" in msg
    assert "(a tune: tune again in a new --out whose scan or --check-factor values reach past it)" in msg


def test_claims_hold_on_the_papers_scaling():
    report = fit_scaling(scaling_optima(0.0, -0.5, se=0.05), target_tokens=2.0**32)
    assert [c.verdict for c in report.claims] == ["holds", "holds"]
    assert report.fits["elr"].b == pytest.approx(-0.5, abs=0.05)
    v, lo, hi = report.predictions["wd"]
    assert lo < 0.1 * 2.0 ** -6 < hi and lo < v < hi


def test_claims_fail_when_lr_grows_and_wd_falls_linearly_or_faster():
    report = fit_scaling(scaling_optima(0.3, -1.2, se=0.05))
    assert [c.verdict for c in report.claims] == ["fails", "fails"]
    assert report.predictions == {}


def test_claims_fail_when_wd_does_not_decrease():
    assert fit_scaling(scaling_optima(0.0, 0.3, se=0.05)).claims[1].verdict == "fails"


def test_claims_are_inconclusive_when_the_interval_straddles_the_zone():
    report = fit_scaling(scaling_optima(0.1, -1.0, se=0.3, n=3))
    assert [c.verdict for c in report.claims] == ["inconclusive", "inconclusive"]


def test_lr_tolerance_sets_how_small_a_constant_exponent_must_be():
    opts = scaling_optima(0.15, -0.5, se=0.02)
    assert fit_scaling(opts).claims[0].verdict == "fails"
    assert fit_scaling(opts, lr_tolerance=0.3).claims[0].verdict == "holds"
    with pytest.raises(ValueError, match="^--target-tokens must be a positive, finite number of tokens, got 0.0$"):
        fit_scaling(opts, target_tokens=0.0)


def test_lr_claim_is_inconclusive_when_lr_was_held_fixed():
    opts = [optimum(o.tokens, 1e-3, o.wd, tuned_axes=("wd",)) for o in scaling_optima(0.0, -0.5)]
    lr_claim, wd_claim = fit_scaling(opts).claims
    assert lr_claim.verdict == "inconclusive" and "not tuned" in lr_claim.criterion
    assert wd_claim.verdict == "holds"


def test_report_formats_and_serialises():
    report = fit_scaling(scaling_optima(0.0, -0.5), target_tokens=2.0**32)
    text = report.format()
    assert "HOLDS" in text and "tau_iter/steps" in text and "4.29e+09" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["claims"][1]["verdict"] == "holds" and set(data["fits"]) == {"lr", "wd", "elr"}
    assert data["optima"][0]["tau_iter"] == pytest.approx(tau_iter(report.optima[0].lr, report.optima[0].wd))


def test_tau_iter():
    assert tau_iter(1e-3, 0.1) == pytest.approx(1e4)
    with pytest.raises(ValueError, match="positive"):
        tau_iter(0.0, 0.1)


def test_plot_writes_a_png_atomically(tmp_path):
    out = plot_scaling(fit_scaling(scaling_optima(0.0, -0.5), target_tokens=2.0**32), tmp_path / "s.png")
    assert out == tmp_path / "s.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["s.png"]  # no temporary file left behind


def test_plot_labels_the_budgets_and_target_not_the_minor_ticks(tmp_path, monkeypatch):
    # under a decade of tokens matplotlib labelled the minor ticks too, and 3x10^5 4x10^5 ... ran together
    from matplotlib.figure import Figure

    opts = [optimum(t, 1e-3 * (t / 4e5) ** 0.05, 0.1 * (t / 4e5) ** -0.5) for t in (4e5, 6e5, 9e5)]
    seen = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (seen.extend(self.axes), real(self, *a, **k))[1])
    plot_scaling(fit_scaling(opts, target_tokens=4e6), tmp_path / "s.png")
    assert len(seen) == 3
    for ax in seen:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["400k", "600k", "900k", "4M"]
        assert not any(t.get_text() for t in ax.xaxis.get_minorticklabels())


def test_predictions_far_outside_the_fitted_budgets_or_untrainable_come_with_a_caution():
    opts = scaling_optima(0.0, -0.5)  # budgets 2^20 .. 2^28 tokens
    assert fit_scaling(opts, target_tokens=2.0**26).caveats() == [] and fit_scaling(opts).caveats() == []
    far = fit_scaling(opts, target_tokens=2.0**32)
    (line,) = far.caveats()
    assert "16x above the largest budget fitted" in line and "caution: " + line in far.format()
    assert far.to_dict()["caveats"] == [line]
    below = fit_scaling(opts, target_tokens=2.0**14).caveats()
    assert len(below) == 1 and "64x below the smallest" in below[0]
    # wd growing with tokens: at 2^40 the prediction has lr*wd ~ 1e-3 * 0.1 * 2^20 = 105, which nothing trains
    grows = fit_scaling(scaling_optima(0.0, 1.0, se=0.01), target_tokens=2.0**40).caveats()
    assert any("lr*wd = " in c and ">= 1 is untrainable" in c for c in grows)


def test_a_member_without_weight_decay_is_named_not_dumped():
    # a sweep with a wd 0 baseline: the error printed the raw MemberLoss(...) repr
    members = grid_members(valley()) + [MemberLoss(1e-3, 0.0, 3.0, 0.01)]
    with pytest.raises(ValueError, match=r"^z8: member lr=0\.001, wd=0: the optimum is fitted in log lr") as e:
        optimum_from_members(members, tokens=1e9, steps=1000, source="z8")
    assert "MemberLoss" not in str(e.value)
    members[-1] = MemberLoss(1e-3, 0.1, 3.0, float("nan"))  # said "se must be finite": the field's name
    with pytest.raises(ValueError, match=r"^z8: member lr=0\.001, wd=0\.1: the standard error of its loss must be "
                                         r"finite and >= 0, got nan$"):
        optimum_from_members(members, tokens=1e9, steps=1000, source="z8")


# --- behaviours a mutation pass found unpinned


def test_budget_needs_positive_tokens_too():
    with pytest.raises(ValueError, match="tokens=0"):
        BudgetOptimum(tokens=0.0, steps=10, lr=1e-3, wd=0.1, elr=1e-4, log2_se={}, at_edge=False)


def test_tau_iter_refuses_no_decay_and_an_overflowing_product():
    for lr, wd in ((1e-3, 0.0), (1e200, 1e200)):
        with pytest.raises(ValueError, match="positive finite"):
            tau_iter(lr, wd)


def test_members_and_reports_are_immutable_values():
    m = MemberLoss(1e-3, 0.1, 2.0)
    assert hash(m) == hash(MemberLoss(1e-3, 0.1, 2.0))
    with pytest.raises(AttributeError):
        m.loss = 1.0
    report = fit_scaling(scaling_optima(0.0, -0.5))
    with pytest.raises(AttributeError):
        report.claims[0].verdict = "holds"
    with pytest.raises(AttributeError):
        report.target_tokens = 1e9


def test_a_vertex_outside_the_points_box_along_one_axis_only_is_refused():
    from trajinv.analysis.scaling import _quadratic_vertex

    X = np.array([(u, v) for u in (-1.0, 0.0, 1.0) for v in (-1.0, 0.0, 1.0)])
    for vertex in ((0.2, -3.0), (-3.0, 0.2), (0.2, 3.0), (3.0, 0.2)):
        y = np.array([0.3 * (u - vertex[0]) ** 2 + 0.2 * (v - vertex[1]) ** 2 for u, v in X])
        assert _quadratic_vertex(X, y) is None
    y = np.array([0.3 * (u - 0.2) ** 2 + 0.2 * (v + 0.4) ** 2 for u, v in X])
    assert _quadratic_vertex(X, y) == pytest.approx([0.2, -0.4])


def test_an_exact_optimum_on_the_outermost_member_is_fitted_without_jitter():
    # the vertex on the edge of the fitted members' box (within rounding) is inside it: located, no spread
    members = [MemberLoss(1e-3, wd, 2.5 + 0.1 * math.log2(wd) ** 2) for wd in WD_LEVELS]  # least at wd = 1
    opt = optimum_from_members(members, 1e9, 1000, n_boot=50, window=2.5)
    assert opt.wd == pytest.approx(1.0) and opt.at_edge
    assert opt.log2_se["wd"] < 1e-6


def _bent(x: float, x0: float = 0.3) -> float:
    """A loss quadratic within 2 octaves of x0, flattening beyond (as a real basin does)."""
    d = abs(x - x0)
    return 2.5 + 0.1 * min(d, 2.0) ** 2 + 0.02 * max(d - 2.0, 0.0)


def test_a_window_fits_the_members_within_it_of_the_best_weighted_by_their_se():
    wds = 2.0 ** np.arange(-4.0, 5.0)  # log2 wd -4 .. 4, best at 0, optimum at 0.3
    line = [MemberLoss(1e-3, wd, _bent(math.log2(wd)), 0.01) for wd in wds]
    # within 1.5 octaves of the best: -1, 0, 1, all on the quadratic
    assert math.log2(optimum_from_members(line, 1e9, 1000, n_boot=20, window=1.5).wd) == pytest.approx(0.3, abs=1e-6)
    # a zoom member 0.5 octave out, its loss 0.2 too high but with a large se: weighted down, not out
    zoom = MemberLoss(1e-3, 2.0 ** 0.5, _bent(0.5) + 0.2, 1.0)
    opt = optimum_from_members(line + [zoom], 1e9, 1000, n_boot=20, window=1.5)
    assert math.log2(opt.wd) == pytest.approx(0.3, abs=0.01)
    even = [MemberLoss(m.lr, m.wd, m.loss, 0.01) for m in line + [zoom]]  # the same se everywhere: it pulls
    assert abs(math.log2(optimum_from_members(even, 1e9, 1000, n_boot=20, window=1.5).wd) - 0.3) > 0.05


def test_a_window_member_without_an_se_weighs_as_the_best_measured_one():
    wds = 2.0 ** np.arange(-4.0, 5.0)
    line = [MemberLoss(1e-3, wd, 2.5 + 0.1 * (math.log2(wd) - 0.3) ** 2, 0.0 if k % 2 else 0.02)
            for k, wd in enumerate(wds)]
    opt = optimum_from_members(line, 1e9, 1000, n_boot=20, window=2.5)
    assert math.log2(opt.wd) == pytest.approx(0.3, abs=1e-6) and not opt.at_edge


def test_two_bootstrap_draws_are_enough_and_one_is_refused():
    members = grid_members(valley(), se=0.01)
    assert optimum_from_members(members, 1e9, 1000, n_boot=2).lr > 0
    with pytest.raises(ValueError, match="n_boot must be >= 2"):
        optimum_from_members(members, 1e9, 1000, n_boot=1)


def test_the_interval_needs_a_coverage_below_one():
    with pytest.raises(ValueError, match="ci=1"):
        fit_power_law([1, 2, 3], [1, 2, 3], ci=1.0)


def test_a_small_given_se_adds_in_variance_to_the_residual_scatter():
    # the scatter about the line (sd 0.2) dwarfs an se of 0.01: the interval is the residuals' alone
    x = 2.0 ** np.arange(20.0, 30.0, 2.0)
    y = 2.0 ** (-0.5 * np.log2(x) + np.array([0.2, -0.2, 0.2, -0.2, 0.0]))
    alone, given = (fit_power_law(x, y, se, seed=3) for se in (None, [0.01] * 5))
    width = lambda f: f.b_ci[1] - f.b_ci[0]  # noqa: E731
    assert width(given) == pytest.approx(width(alone), rel=0.01)


def test_a_target_within_ten_times_the_fitted_budgets_is_no_extrapolation():
    opts = scaling_optima(0.0, -0.5)  # budgets 2^20 .. 2^28 tokens
    assert fit_scaling(opts, target_tokens=2.0**31).caveats() == []  # 8x above
    assert fit_scaling(opts, target_tokens=2.0**17).caveats() == []  # 8x below
    assert len(fit_scaling(opts, target_tokens=2.0**32).caveats()) == 1  # 16x above


def test_lr_tolerance_must_be_positive():
    with pytest.raises(ValueError, match="lr_tolerance must be > 0"):
        fit_scaling(scaling_optima(0.0, -0.5), lr_tolerance=0.0)


def test_plot_bars_span_one_se_in_log2_and_tilts_more_than_three_labels(tmp_path, monkeypatch):
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    opts = [optimum(t, 1e-3, 0.1 * (t / 4e5) ** -0.5, se=0.5) for t in (4e5, 8e5, 1.6e6)]
    seen = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: seen.append(self.axes))  # read, not drawn
    plot_scaling(fit_scaling(opts, target_tokens=4e6), tmp_path / "s.png")
    plot_scaling(fit_scaling(opts), tmp_path / "t.png")
    with_target, without = seen
    wd_axis = with_target[1]
    bars = [c for c in wd_axis.collections if isinstance(c, LineCollection)][0].get_segments()
    for o, seg in zip(opts, bars):
        assert seg[:, 1] == pytest.approx([o.wd * 2 ** -0.5, o.wd * 2 ** 0.5])
    assert {t.get_rotation() for t in with_target[0].get_xticklabels()} == {30.0}  # 3 budgets and the target
    assert {t.get_rotation() for t in without[0].get_xticklabels()} == {0.0}



@pytest.mark.parametrize("budgets, target, ends", [
    ((81920, 122880, 163840), None, ("81.9k", "164k")),  # close together
    ((81920, 122880, 163840), 2e5, ("81.9k", "200k")),
    ((81920, 122880, 163840, 1.6e7), None, ("81.9k", "16M")),  # close together, beside a far one
    ((81920, 122880, 163840), 1.6e7, ("81.9k", "16M")),
    ((4e5, 4e7, 4e9), 4e10, ("400k", "40G"))])  # far apart
def test_no_two_tick_labels_overlap_however_close_the_budgets(tmp_path, monkeypatch, budgets, target, ends):
    """Budgets close together beside a far one ran their labels into each other ("81.9k123k164k"): a label
    that would overlap one kept is blanked (its tick stays), the target's and the end budgets' kept first."""
    from matplotlib.figure import Figure

    opts = [optimum(t, 1e-3 * (t / 4e5) ** 0.05, 0.1 * (t / 4e5) ** -0.5) for t in budgets]
    seen = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: seen.append(self))  # read, not written
    plot_scaling(fit_scaling(opts, target_tokens=target, n_boot=200), tmp_path / "s.png")
    (fig,) = seen
    fig.canvas.draw()
    for ax in fig.axes:
        shown = [(t.get_text(), t.get_window_extent())
                 for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True)
                 if t.get_visible() and t.get_text()]
        for i, (a, box_a) in enumerate(shown):
            for b, box_b in shown[i + 1:]:
                assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"
        assert (shown[0][0], shown[-1][0]) == ends, shown
        assert len(ax.get_xticks()) == len({*budgets, *([target] if target else [])})  # every tick stays
