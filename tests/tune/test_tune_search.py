"""The tune search on synthetic loss surfaces: no training, oracles stand in for the runner."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from trajinv.schedules import BatchSchedule
from trajinv.tune.fit import Fit, Quadratic, fit_quadratic, grid_size
from trajinv.tune.search import (SEARCH_VERSION, Outcome, Point, Search, SearchConfig, Stage, TuneResult,
                                 classify_regime, simulate)

LR = 8e-3
C = math.log2(LR)  # default centre: log2(lr * wd) with wd = 1


def elr_surface(x0: float, curvature: float = 0.1, diverge_above: float = math.inf):
    """Loss depends on lr*wd only: a parabola in log2 ELR with its minimum at x0."""
    def oracle(p: Point) -> Outcome:
        x = math.log2(p.elr)
        return Outcome(p, math.nan if x > diverge_above else 3.0 + curvature * (x - x0) ** 2)
    return oracle


def within_zoom_spacing(result: TuneResult, x0: float, value=lambda p: p.elr) -> bool:
    """The recommendation lies within one zoom spacing (scan spacing / 4) of the optimum x0."""
    return abs(math.log2(value(result.best)) - x0) <= SearchConfig().spacing / 4 + 1e-9


def kinds(result: TuneResult) -> list[str]:
    return [stage.kind for stage, _ in result.stages]


# ---- the 1-D search on invariant surfaces -----------------------------------------------

def test_elr_invariant_surface_finds_the_optimum_and_the_check_stands():
    x0 = C + 1.3
    result = simulate(SearchConfig(), elr_surface(x0))
    assert kinds(result) == ["scan", "check", "zoom"]
    assert within_zoom_spacing(result, x0)
    assert math.log2(result.fit.vertex) == pytest.approx(x0, abs=1e-6)  # an exact parabola: exact vertex
    assert result.fit.loss == pytest.approx(3.0) and result.fit.curvature == pytest.approx(0.2)
    assert result.invariant_check.within_noise
    # Checked at the scan's best member (ELR 2^(C+1), the nearest to x0), before the zoom refined it.
    checked = result.invariant_check.outcomes[0].point
    assert math.log2(checked.elr) == pytest.approx(C + 1.0) and checked.lr == LR
    assert [o.point.elr for o in result.invariant_check.outcomes] == pytest.approx([checked.elr] * 5)
    # the scanned line's fit, made before the check, is named as such beside the final fit (the summary
    # printed the two unlabelled, with different vertices)
    assert any(n.startswith("fit on the ELR line at lr=0.008 before the check (scanned members only)")
               for n in result.notes), result.notes


def test_a_wrong_answer_fails_the_optimum_check():
    # The assertion the tests rely on is discriminating: an answer one scan spacing off is rejected.
    result = simulate(SearchConfig(), elr_surface(C + 1.3))
    assert not within_zoom_spacing(result, C + 1.3 + SearchConfig().spacing)


def test_lr_invariant_surface_along_the_lr_axis():
    l0 = C + 0.6
    def oracle(p: Point) -> Outcome:
        return Outcome(p, 3.0 + 0.1 * (math.log2(p.lr) - l0) ** 2)
    result = simulate(SearchConfig(axis="lr", wd=0.1), oracle)
    assert kinds(result) == ["scan", "check", "zoom"]
    assert all(p.wd == 0.1 for stage, _ in (result.stages[0], result.stages[2]) for p in stage.points)
    assert within_zoom_spacing(result, l0, value=lambda p: p.lr)
    # The iso-LR check varies wd at the scan's best lr (C + 1, the nearest to l0).
    checked = result.invariant_check.outcomes[0].point
    assert {o.point.lr for o in result.invariant_check.outcomes} == {checked.lr}
    assert math.log2(checked.lr) == pytest.approx(C + 1.0)
    assert result.invariant_check.within_noise


def test_known_outcomes_are_never_trained_again_and_count_like_the_searchs_own():
    # the lr search after a first ELR scan at lr = LR: it knows that scan (wd 1/64 .. 1, best at 1/8)
    def oracle(p: Point) -> Outcome:
        return Outcome(p, 3.0 + 0.1 * (math.log2(p.lr) - C - 0.2) ** 2 + 0.01 * abs(math.log2(p.wd / 0.125)))
    first = [oracle(Point(LR, 2.0 ** k / 8)) for k in range(-3, 4)]
    cfg = SearchConfig(axis="lr", wd=0.125, steps_per_member=10, noise=0.05)
    fresh, seeded = simulate(cfg, oracle), Search(cfg, known=first)
    while (stage := seeded.next_stage()) is not None:
        seeded.tell(stage, [oracle(p) for p in stage.points])
    again = seeded.result()
    trained = [p.key for stage, _ in again.stages for p in stage.points]
    assert len(trained) == len(set(trained)) and not set(trained) & {o.point.key for o in first}
    # the lr scan's centre (LR, 1/8) was known, and so was every iso-LR check member (wd x 1/4 .. x 4 at LR)
    assert kinds(fresh) == ["scan", "check", "zoom"] and kinds(again) == ["scan", "zoom"]
    assert len(again.stages[0][0].points) == len(fresh.stages[0][0].points) - 1
    assert again.cost_member_steps == fresh.cost_member_steps - 10 * (1 + len(cfg.check_factors))
    assert again.best == fresh.best and again.best.lr == LR
    assert again.invariant_check.within_noise and len(again.invariant_check.outcomes) == 1 + len(cfg.check_factors)
    assert again.invariant_check.outcomes == fresh.invariant_check.outcomes


def test_a_search_that_reads_part_of_its_first_scan_needs_a_budget_for_the_rest_only():
    first = [Outcome(Point(LR, 2.0 ** k / 8), 3.0 + 0.01 * abs(k)) for k in range(-3, 4)]  # centre (LR, 1/8) known
    cfg = SearchConfig(axis="lr", wd=0.125, steps_per_member=10)  # a first scan of 7 points: 70 member-steps
    assert Search(cfg, known=first).fresh_scan_cost == 60 and Search(cfg).fresh_scan_cost == 70
    with pytest.raises(ValueError):  # SearchConfig refuses 60 (below 70); Search asks only for the 60
        SearchConfig(axis="lr", wd=0.125, steps_per_member=10, budget=60)
    search = Search(cfg, known=first, budget=60)
    stage = search.next_stage()
    assert stage.kind == "scan" and len(stage.points) == 6
    search.tell(stage, [Outcome(p, 3.0) for p in stage.points])
    assert search.next_stage() is None
    result = search.result()
    assert result.cost_member_steps == 60 and not any("1-scan" in n for n in result.notes)  # not trimmed
    with pytest.raises(ValueError) as err:
        Search(cfg, known=first, budget=59)
    assert "59" in str(err.value) and "60" in str(err.value) and "\n" not in str(err.value)


def test_one_zoom_point_without_a_fit_trains_nothing_and_says_so():
    # loss falling all the way to the scan's low edge, no shift allowed: no convex fit to place the zoom by
    result = simulate(SearchConfig(zoom_points=1, max_shifts=0), lambda p: Outcome(p, 3.0 + 0.1 * math.log2(p.elr)))
    assert "zoom" not in kinds(result)
    assert any(n.startswith("no zoom: one zoom point and no convex fit") for n in result.notes)
    assert not any(n.startswith("zoom on the") for n in result.notes)


def test_zoom_skips_points_already_evaluated():
    # Vertex half-way between two scan members: its +-spacing/2 zoom members are those members.
    result = simulate(SearchConfig(), elr_surface(C + 0.5))
    zoom = [stage for stage, _ in result.stages if stage.kind == "zoom"][0]
    assert [math.log2(p.elr) - C for p in zoom.points] == pytest.approx([0.25, 0.75])



@pytest.mark.parametrize("points, octaves, zoom_width, offsets", [
    (7, 6.0, 0.5, [-0.5, -0.25, 0.25, 0.5]),  # spacing 1: out to spacing/2 = zoom_width
    (4, 6.0, 0.5, [-0.5, -0.25, 0.25, 0.5]),  # spacing 2: capped at zoom_width, not a whole octave out
    (4, 6.0, 5.0, [-1.0, -0.5, 0.5, 1.0]),  # a wide zoom_width: capped at spacing/2
    (5, 2.0, 0.5, [-0.25, -0.125, 0.125, 0.25]),  # spacing 0.5: spacing/2 is the nearer limit
    (4, 6.0, 0.3, [-0.3, -0.15, 0.15, 0.3]),
])
def test_zoom_reaches_out_to_the_nearer_of_half_a_spacing_and_zoom_width(points, octaves, zoom_width, offsets):
    x0 = C + 0.1  # an exact parabola: the zoom centres on its vertex
    cfg = SearchConfig(points=points, octaves=octaves, zoom_width=zoom_width)
    result = simulate(cfg, elr_surface(x0))
    assert cfg.zoom_half_width == pytest.approx(max(abs(o) for o in offsets))
    zoom = [stage for stage, _ in result.stages if stage.kind == "zoom"][0]
    assert [math.log2(p.elr) - x0 for p in zoom.points] == pytest.approx(offsets)


# ---- the check and the rescan -----------------------------------------------------------

def neither(p: Point) -> Outcome:
    """Minimum in lr and in wd separately (at lr 2e-3, wd 0.25): not ELR-invariant."""
    return Outcome(p, 3.0 + 0.05 * math.log2(p.lr / 2e-3) ** 2 + 0.08 * math.log2(p.wd / 0.25) ** 2)


def test_non_invariant_surface_fails_the_check_and_the_rescan_improves():
    result = simulate(SearchConfig(), neither)
    names = [stage.name for stage, _ in result.stages]
    # Checked before any zoom; the one rescan is not checked again (no rescan left for it to call).
    assert names == ["1-scan", "2-check", "3-rescan", "4-zoom"]
    first = [o.loss for stage, outs in result.stages[:2] for o in outs]
    assert result.loss < min(first)
    # The rescan runs along ELR at the best lr of the failed check line (lr/2 = 4e-3), and so does the zoom:
    # no member is spent refining the first line, which the check left.
    for stage, _ in result.stages[2:]:
        assert [p.lr for p in stage.points] == pytest.approx([4e-3] * len(stage.points))
    assert (result.best.lr, result.best.wd) == pytest.approx((4e-3, 0.25))
    assert any("spread" in n and ">" in n for n in result.notes)


def test_a_rescanned_line_is_checked_again_while_rescans_are_left():
    result = simulate(SearchConfig(max_rescans=2), neither)
    assert [stage.name for stage, _ in result.stages] == ["1-scan", "2-check", "3-rescan", "4-check", "5-zoom"]
    assert result.invariant_check.outcomes[0].point == result.best  # the report holds the last check
    assert any("best in both directions" in n for n in result.notes)  # the second check: no new rescan


def test_max_rescans_zero_keeps_the_best_evaluated_point():
    result = simulate(SearchConfig(max_rescans=0), neither)
    assert "rescan" not in kinds(result)
    assert not result.invariant_check.within_noise
    assert result.loss == min(o.loss for _, outs in result.stages for o in outs)
    assert any("rescans exhausted" in n for n in result.notes)


def test_wrong_axis_is_caught_by_the_check():
    # An lr-invariant surface searched along ELR: the scan is flat, the iso-ELR check is not.
    l0 = C - 1.0
    def oracle(p: Point) -> Outcome:
        return Outcome(p, 3.0 + 0.1 * (math.log2(p.lr) - l0) ** 2)
    result = simulate(SearchConfig(), oracle)
    assert "rescan" in kinds(result)
    assert not result.invariant_check.within_noise
    assert result.best.lr == pytest.approx(2.0 ** l0)


def lr_tilted(tilt: float, se: float = 0.0):
    """ELR-invariant plus `tilt` nat per octave of lr: spread on the check line = 4 * tilt."""
    def oracle(p: Point) -> Outcome:
        return Outcome(p, 3.0 + 0.1 * (math.log2(p.elr) - C) ** 2 + tilt * math.log2(p.lr / LR), se)
    return oracle


@pytest.mark.parametrize("tilt, rescans", [(0.001, False), (0.01, True)])
def test_noise_floor_decides_the_check(tilt, rescans):
    result = simulate(SearchConfig(noise=0.01), lr_tilted(tilt))
    check = next(outs for stage, outs in result.stages if stage.kind == "check")
    assert ("rescan" in kinds(result)) is rescans
    assert result.invariant_check.threshold == 0.01
    spread = max(o.loss for o in check) - min(o.loss for o in check)
    assert spread == pytest.approx(4 * tilt, rel=1e-3)


@pytest.mark.parametrize("tilt, side", [(0.001, "lower"), (-0.001, "upper"), (0.0, None)])
def test_a_recommendation_at_an_end_of_the_check_line_says_the_optimum_may_lie_beyond(tilt, side):
    # within noise, the check member at lr x 1/4 (or x 4) scored lowest and is recommended; nothing explores a
    # check line, so the tune says so (a QA run's tune recommended its smallest wd tried, unsaid)
    result = simulate(SearchConfig(noise=0.01), lr_tilted(tilt))
    assert result.invariant_check.within_noise
    said = [n for n in result.notes if "end of the invariant check's line" in n]
    if side is None:  # the checked point wins the tie: inside the line, no note
        assert result.best.lr == LR and not said
        return
    assert result.best.lr == pytest.approx(LR * (0.25 if side == "lower" else 4.0))
    assert said == [f"the recommendation is at the {side} end of the invariant check's line (lr "
                    f"{result.best.lr:.4g}): nothing was tried beyond it that way, so the optimum may lie further "
                    f"out (a --check-factor {'below 0.25' if side == 'lower' else 'above 4'} reaches there)"]


def test_the_end_of_check_note_reads_wd_on_an_lr_search_and_spares_the_checked_point():
    # along lr the check varies wd at one lr: its ends are its smallest and largest wd
    def oracle(p: Point) -> Outcome:  # lr-invariant around lr 2^-7, then falling with wd by 0.001 per octave
        return Outcome(p, 3.0 + 0.1 * (math.log2(p.lr) + 7) ** 2 - 0.001 * math.log2(p.wd))

    result = simulate(SearchConfig(axis="lr", noise=0.01), oracle)
    assert result.invariant_check.within_noise and result.best.wd == pytest.approx(4.0)
    assert [n for n in result.notes if "end of the invariant check's line" in n] == [
        "the recommendation is at the upper end of the invariant check's line (wd 4): nothing was tried beyond "
        "it that way, so the optimum may lie further out (a --check-factor above 4 reaches there)"]
    # one-sided factors put the checked point at an end of its check line: it is on the searched line, no note
    flat = simulate(SearchConfig(check_factors=(2.0, 4.0), noise=0.01), lr_tilted(0.001))
    assert flat.best.lr == LR and not [n for n in flat.notes if "end of the invariant check's line" in n]


@pytest.mark.parametrize("se, stands", [(0.01, True), (0.0, False)])
def test_standard_errors_set_the_check_threshold(se, stands):
    result = simulate(SearchConfig(max_rescans=0), lr_tilted(0.005, se))
    check = result.invariant_check
    assert check.threshold == pytest.approx(2 * math.sqrt(2) * se)  # 0.028 > spread 0.02 when se = 0.01
    assert check.within_noise is stands


def windows_shared(tilt: float, common: float = 0.05, own: float = 0.002, n_boot: int = 64):
    """`lr_tilted(tilt)` scored on one validation set: each member's bootstrap means move with the
    resampled windows (`common`, the same draw for every member) plus a little of their own (`own`)."""
    import random

    draw = random.Random(0)
    shared = [draw.gauss(0.0, common) for _ in range(n_boot)]
    base = lr_tilted(tilt)

    def oracle(p: Point) -> Outcome:
        loss = base(p).loss
        mine = random.Random(hash(p.key))
        boot = tuple(loss + c + mine.gauss(0.0, own) for c in shared)
        return Outcome(p, loss, statistics.stdev(boot), boot)
    return oracle


def test_the_check_pairs_its_members_on_the_shared_validation_windows():
    # a spread of 0.02 nat: unpaired, the windows' shared noise (se 0.05 each) hides it; paired on the
    # resamples the difference is known to ~0.003 nat and the 1-D answer does not stand
    oracle, cfg = windows_shared(0.005), SearchConfig(max_rescans=0)
    paired, unpaired = simulate(cfg, oracle, 3).invariant_check, simulate(cfg, oracle, 2).invariant_check
    assert paired.spread == pytest.approx(0.02) == unpaired.spread
    assert unpaired.threshold > 0.1 and unpaired.within_noise  # the rule of directories of version 2
    assert 0.003 < paired.threshold < 0.01 and not paired.within_noise
    # a spread inside the paired noise still stands; and without resamples the check is unpaired
    assert simulate(cfg, windows_shared(0.0005), 3).invariant_check.within_noise
    bare = simulate(cfg, lambda p: Outcome(p, oracle(p).loss, oracle(p).se))
    assert bare.invariant_check.threshold == pytest.approx(unpaired.threshold)


def test_outcome_refuses_non_finite_bootstrap_means():
    with pytest.raises(ValueError, match="boot"):
        Outcome(Point(1e-3, 1.0), 2.0, 0.01, (2.0, math.nan))


def test_fit_weights_follow_the_standard_errors():
    xs = [-2.0, -1.0, 0.0, 1.0, 2.0]
    ys = [(x - 0.3) ** 2 for x in xs]
    ys[4] += 3.0  # an outlier ...
    weighted = fit_quadratic(xs, ys, [0.01, 0.01, 0.01, 0.01, 10.0])  # ... with a large se
    plain = fit_quadratic(xs, ys, [0.0] * 5)
    assert weighted.vertex == pytest.approx(0.3, abs=1e-3)
    assert abs(plain.vertex - 0.3) > 0.1
    assert fit_quadratic([0.0, 1.0, 1.0], [1.0, 2.0, 2.0], [0.0] * 3) is None  # two distinct x


# ---- shifts and divergence --------------------------------------------------------------

def test_optimum_beyond_the_bracket_is_reached_by_a_shift():
    x0 = C + 4.6
    result = simulate(SearchConfig(), elr_surface(x0))
    assert kinds(result) == ["scan", "shift", "check", "zoom"]
    shift = result.stages[1][0]
    assert [math.log2(p.elr) - C for p in shift.points] == pytest.approx([4.0, 5.0, 6.0])
    assert within_zoom_spacing(result, x0)


@pytest.mark.parametrize("max_shifts", [0, 1, 2])
def test_shifts_are_bounded(max_shifts):
    result = simulate(SearchConfig(max_shifts=max_shifts), elr_surface(C + 30))
    assert kinds(result).count("shift") == max_shifts
    assert math.log2(result.best.elr) - C == pytest.approx(3.0 + 3 * max_shifts + 0.5)  # last zoom +s/2
    assert any("upper edge" in n for n in result.notes)


def test_diverged_members_are_excluded_and_never_shifted_into():
    result = simulate(SearchConfig(), elr_surface(C + 4, diverge_above=C + 1.5))
    assert "shift" not in kinds(result)
    assert math.log2(result.best.elr) <= C + 1.5
    assert math.isfinite(result.loss)
    assert any("divergence boundary" in n for n in result.notes)
    text = json.dumps(result.to_dict(), allow_nan=False)  # diverged losses are null in JSON
    assert '"loss": null' in text


def test_a_check_line_that_diverges_confirms_nothing():
    # ELR-invariant, but every lr other than the scanned one diverges: a spread of 0 over one point is no evidence.
    def oracle(p: Point) -> Outcome:
        return elr_surface(C + 0.3)(p) if p.lr == LR else Outcome(p, math.inf)
    result = simulate(SearchConfig(), oracle)
    check = result.invariant_check
    assert [o.finite for o in check.outcomes] == [True, False, False, False, False]
    assert not check.within_noise and "rescan" not in kinds(result)
    assert any("4 of 5 members" in n for n in result.notes)
    assert any("invariance not confirmed" in n for n in result.notes)
    assert not any("spread" in n and "> threshold" in n for n in result.notes)  # no spread over one point
    assert not any("best in both directions" in n for n in result.notes)


def test_all_diverged_shifts_toward_smaller_values_then_gives_up():
    def oracle(p: Point) -> Outcome:
        return Outcome(p, None)
    result = simulate(SearchConfig(max_shifts=2), oracle)
    assert kinds(result) == ["scan", "shift", "shift"]
    lows = [min(p.elr for p in stage.points) for stage, _ in result.stages]
    for (stage, _), previous_low in zip(result.stages[1:], lows):
        assert max(p.elr for p in stage.points) < previous_low
    assert result.best is None and result.loss is None and result.fit is None
    assert result.invariant_check is None
    assert any("every member diverged" in n for n in result.notes)


def test_all_diverged_scan_recovers_below():
    x0 = C - 5
    result = simulate(SearchConfig(), elr_surface(x0, diverge_above=C - 3.5))
    assert kinds(result)[:2] == ["scan", "shift"]
    assert within_zoom_spacing(result, x0)


# ---- budget -----------------------------------------------------------------------------

def test_budget_trims_to_the_points_nearest_the_best_then_finishes():
    cfg = SearchConfig(steps_per_member=10, budget=100)
    result = simulate(cfg, elr_surface(C + 0.1))
    assert result.cost_member_steps == 100
    check = result.stages[1][0]
    # Factors 0.25, 0.5, 2, 4 around the best: 0.5 and 2 are nearest, then 0.25 (tied with 4, listed first).
    assert [p.lr / LR for p in check.points] == pytest.approx([0.25, 0.5, 2.0])
    assert any("2-check trimmed to 3 of 4" in n for n in result.notes)
    assert any("3-zoom skipped" in n for n in result.notes)
    assert result.invariant_check.within_noise and len(result.invariant_check.outcomes) == 4


def test_points_that_trained_nothing_are_not_charged_to_the_budget():
    # three scan points refused untrained (lr*wd >= 1): the scan cost 40, not 70, and the check that
    # follows fits the 60 left (charged 70, it was trimmed to 3 of 4)
    oracle = elr_surface(C + 0.1)
    def run(cost):
        search = Search(SearchConfig(steps_per_member=10, budget=100))
        scan = search.next_stage()
        search.tell(scan, [oracle(p) for p in scan.points], cost=cost)
        return search.next_stage(), search
    check, search = run(40)
    assert check.kind == "check" and len(check.points) == 4
    search.tell(check, [oracle(p) for p in check.points])
    while (stage := search.next_stage()) is not None:
        search.tell(stage, [oracle(p) for p in stage.points])
    assert search.result().cost_member_steps == 40 + 40 + 10 * len(search.result().stages[2][0].points)
    trimmed, _ = run(None)
    assert len(trimmed.points) == 3
    with pytest.raises(ValueError, match=r"cost must be an int in \[0, 70\] member-steps, got 80"):
        run(80)
    search = Search(SearchConfig(steps_per_member=10, budget=100))  # a refused tell records nothing
    scan = search.next_stage()
    with pytest.raises(ValueError):
        search.tell(scan, [oracle(p) for p in scan.points], cost=True)
    search.tell(scan, [oracle(p) for p in scan.points], cost=70)
    assert search.next_stage().name == "2-check"  # one scan recorded, not two


def test_budget_of_exactly_the_scan_skips_everything_after():
    result = simulate(SearchConfig(steps_per_member=10, budget=70), elr_surface(C))
    assert kinds(result) == ["scan"] and result.cost_member_steps == 70
    assert math.log2(result.best.elr) == pytest.approx(C)


@pytest.mark.parametrize("x0, side", [(C + 30, "upper"), (C - 30, "lower")])
def test_a_budget_that_stops_the_search_with_the_best_at_an_edge_says_so(x0, side):
    # the shift that would have looked past the edge was skipped: the tune recommended the scan's end in silence
    result = simulate(SearchConfig(steps_per_member=10, budget=70), elr_surface(x0))
    assert kinds(result) == ["scan"]
    edge = [n for n in result.notes if f"at its {side} edge and the budget stopped the search" in n]
    assert len(edge) == 1 and "--budget" in edge[0]
    # an interior best, or shifts spent before the budget ran out (explore notes it), gets no such note
    assert not any("budget stopped" in n for n in simulate(
        SearchConfig(steps_per_member=10, budget=70), elr_surface(C)).notes)
    spent = simulate(SearchConfig(steps_per_member=10, budget=130, max_shifts=2), elr_surface(x0))
    assert kinds(spent) == ["scan", "shift", "shift"]
    assert sum("edge" in n for n in spent.notes) == 1


def test_budget_below_the_first_scan_is_an_error():
    with pytest.raises(ValueError) as err:
        SearchConfig(steps_per_member=10, budget=60)
    message = str(err.value)
    assert "60" in message and "70" in message and "\n" not in message


def test_grid_equivalent_covers_every_evaluated_lr_and_wd():
    cfg = SearchConfig(points=3, octaves=2.0, zoom_points=0, check_factors=(2.0,), steps_per_member=5)
    result = simulate(cfg, elr_surface(C))
    # wd over 2 octaves (3 values), lr over 1 octave from the check (2 values): a 3 x 2 grid.
    assert kinds(result) == ["scan", "check"]
    assert result.cost_member_steps == 4 * 5
    assert result.grid_equivalent_points == 6
    assert result.grid_equivalent_member_steps == 30


# ---- determinism and the driving protocol -----------------------------------------------

@pytest.mark.parametrize("oracle", [neither, elr_surface(C + 1.2, diverge_above=C + 1.5)], ids=["rescan", "diverged"])
def test_replaying_recorded_outcomes_gives_identical_stages(oracle):
    recorded = json.loads(json.dumps(simulate(SearchConfig(), oracle).to_dict(), allow_nan=False))  # read back
    search = Search(SearchConfig())
    for stage_dict in recorded["stages"]:
        stage = search.next_stage()
        assert stage.name == stage_dict["name"] and stage.kind == stage_dict["kind"]
        assert [(p.lr, p.wd) for p in stage.points] == [(p["lr"], p["wd"]) for p in stage_dict["points"]]
        search.tell(stage, [Outcome(Point(o["lr"], o["wd"]), o["loss"], o["se"]) for o in stage_dict["outcomes"]])
    assert search.next_stage() is None
    assert search.result().to_dict() == recorded


def test_the_same_outcomes_give_the_same_result():
    assert simulate(SearchConfig(), neither) == simulate(SearchConfig(), neither)


def test_tell_rejects_a_wrong_oracle():
    search = Search(SearchConfig())
    stage = search.next_stage()
    assert search.next_stage() is stage  # the same stage until told
    shifted = [Outcome(Point(p.lr * 1.5, p.wd), 3.0) for p in stage.points]  # trained the wrong points
    with pytest.raises(ValueError, match="1-scan"):
        search.tell(stage, shifted)
    with pytest.raises(ValueError, match="needs one outcome per point"):
        search.tell(stage, [Outcome(p, 3.0) for p in stage.points[:-1]])
    with pytest.raises(ValueError, match="pending stage"):
        search.tell(Stage("9-zoom", "zoom", stage.points), [Outcome(p, 3.0) for p in stage.points])
    with pytest.raises(RuntimeError):
        search.result()
    search.tell(stage, [Outcome(p, 3.0) for p in reversed(stage.points)])  # any order is fine
    with pytest.raises(ValueError, match="pending stage is"):
        search.tell(stage, [Outcome(p, 3.0) for p in stage.points])  # told twice
    with pytest.raises(RuntimeError):
        search.result()  # nothing pending, but the search has stages to go


def test_a_diverged_outcome_may_carry_any_se():
    # a runner has no noise estimate for a diverged member: its se is not checked
    assert not Outcome(Point(LR, 1.0), None, se=math.nan).finite
    assert not Outcome(Point(LR, 1.0), math.inf, se=-1.0).finite
    with pytest.raises(ValueError, match="se of a finite loss"):
        Outcome(Point(LR, 1.0), 3.0, se=math.nan)


# ---- regime -----------------------------------------------------------------------------

def test_small_batch_and_long_run_is_elr():
    regime = classify_regime(100.0, 32, 10_000, 8e-3, 0.1)
    assert (regime.axis, regime.small_batch, regime.enough_iterations) == ("elr", True, True)
    assert regime.batch_schedule is None and "small batch" in regime.reason and "enough steps" in regime.reason


@pytest.mark.parametrize("b_precond", [None, math.nan])
def test_unmeasured_noise_scale_assumes_elr_and_says_so(b_precond):
    regime = classify_regime(b_precond, 32, 10_000, 8e-3, 0.1)
    assert (regime.axis, regime.small_batch, regime.b_precond) == ("elr", None, None)
    assert "unmeasured" in regime.reason


def test_too_few_iterations_is_lr():
    regime = classify_regime(100.0, 32, 100, 8e-3, 0.1)  # 100 * 8e-4 = 0.08 transitions
    assert (regime.axis, regime.small_batch, regime.enough_iterations) == ("lr", True, False)
    assert "too few steps" in regime.reason and regime.batch_schedule is None


@pytest.mark.parametrize("b_precond, batch, steps, schedule", [
    # 3 / 8e-4 = 3750 steps at 64 sequences = 0.0469 of 20,000 steps x 256: the tokens' fraction
    (100.0, 256, 20_000, "64@0.05,256"),
    (64.0, 64, 20_000, "32@0.1,64"),  # at B_precond is large; B1 strictly below it: 3750 x 32 / (20,000 x 64)
    (100.0, 256, 1_000, "64@0.5,256"),  # capped at half the run's tokens
])
def test_large_batch_is_lr_with_a_small_batch_first_schedule(b_precond, batch, steps, schedule):
    regime = classify_regime(b_precond, batch, steps, 8e-3, 0.1, min_transitions=3.0)
    assert (regime.axis, regime.small_batch) == ("lr", False)
    assert "large batch" in regime.reason and schedule in regime.reason
    assert "with --tokens" in regime.reason  # at --steps the schedule's small phase trains fewer tokens
    small = int(schedule.split("@")[0])
    assert ("more tokens are needed" in regime.reason) is (0.5 * steps * batch / small * 8e-4 < 3)
    assert regime.batch_schedule == schedule
    assert str(BatchSchedule.parse(regime.batch_schedule)) == schedule  # the trainer's syntax


def test_a_schedule_is_judged_by_its_small_batch_phase_and_never_suggested_back():
    # 8@0.5,16 already starts below B_precond 13.4: small batch, ELR, no schedule to suggest (it suggested itself)
    regime = classify_regime(13.4, 16, 10_000, 8e-3, 0.1, schedule=(8, 16), sequences=120_000)
    assert (regime.axis, regime.small_batch, regime.batch_schedule) == ("elr", True, None)
    assert "batch 8 (the schedule's smallest) < B_precond 13.4" in regime.reason
    # every phase at or above B_precond 20: the suggestion ends at the last batch, over the tokens trained
    # (3 / 8e-4 = 3750 steps at 16 = 60,000 of 1,200,000 sequences: 0.05)
    regime = classify_regime(20.0, 64, 20_000, 8e-3, 0.1, min_transitions=3.0, schedule=(32, 64),
                             sequences=1_200_000)
    assert (regime.axis, regime.small_batch, regime.batch_schedule) == ("lr", False, "16@0.05,64")


def test_no_power_of_two_below_a_tiny_noise_scale():
    assert classify_regime(0.5, 4, 20_000, 8e-3, 0.1).batch_schedule is None
    # a batch of 1 would be suggested below B_precond 2: the tune refuses it (no two micro-batches)
    assert classify_regime(1.9, 4, 20_000, 8e-3, 0.1).batch_schedule is None
    assert classify_regime(2.5, 4, 20_000, 8e-3, 0.1).batch_schedule.startswith("2@")


def test_default_threshold_is_one_timescale():
    """A run just past one tau = 1/(lr wd) counts as long enough (MIN_TRANSITIONS says why), just short does not."""
    from trajinv.tune.fit import MIN_TRANSITIONS

    assert MIN_TRANSITIONS == 1.0
    assert classify_regime(100.0, 32, 800, 2.0 ** -8, 0.5).axis == "elr"  # 800 * 2^-9 = 1.56
    assert classify_regime(100.0, 32, 400, 2.0 ** -8, 0.5).axis == "lr"  # 0.78: too few


# ---- validation -------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("axis", "wd"), ("lr", 0.0), ("wd", -1.0), ("center", math.nan), ("octaves", -2.0),
    ("points", 2), ("zoom_points", -1), ("zoom_width", 0.0), ("zoom_width", math.inf), ("max_shifts", 1.5),
    ("max_rescans", -1),
    ("check_factors", (0.5, 1.0)), ("check_factors", ()), ("check_factors", (0.5, 1e-320)), ("check_factors", (1.0000000001,)), ("check_factors", (2 ** 6e-10,)), ("noise", -0.1),
    ("check_factors", (0.5, math.nan)), ("check_factors", (math.inf,)), ("check_factors", ("2",)),
    ("steps_per_member", 0), ("budget", 0),
])
def test_config_errors_are_one_line_and_name_the_value(field, value):
    with pytest.raises(ValueError) as err:
        SearchConfig(**{field: value})
    message = str(err.value)
    assert "\n" not in message and field in message and repr(value) in message


def test_classify_regime_rejects_bad_inputs():
    with pytest.raises(ValueError, match="batch_size"):
        classify_regime(100.0, 0, 1000, 8e-3, 0.1)
    with pytest.raises(ValueError, match="wd"):
        classify_regime(100.0, 32, 1000, 8e-3, 0.0)


# ---- stage geometry at a spacing other than 1 (the default config's spacing of 1 hides s vs 1/s) ----------

def test_every_stage_places_its_points_where_the_docstring_says():
    # shift -> check (fails) -> rescan -> zoom, at spacing 0.75, wd != 1, three zoom points
    cfg = SearchConfig(lr=0.01, wd=0.5, octaves=3.0, points=5, max_shifts=1, check_factors=(0.5, 2.0),
                       max_rescans=1, zoom_points=3, zoom_width=0.5)
    s, c = 0.75, math.log2(0.01 * 0.5)  # spacing; default centre log2(lr * wd)
    x0, lr0 = c + 2.0, 0.02  # the optimum: past the scan's upper edge (c + 1.5), at another lr

    def oracle(p: Point) -> Outcome:
        return Outcome(p, 3.0 + 0.1 * (math.log2(p.elr) - x0) ** 2 + 0.05 * math.log2(p.lr / lr0) ** 2)

    result = simulate(cfg, oracle)
    assert kinds(result) == ["scan", "shift", "check", "rescan", "zoom"]
    stages = [stage for stage, _ in result.stages]
    line = lambda stage: ([p.lr for p in stage.points], [math.log2(p.elr) for p in stage.points])
    expect = {  # stage -> (lr of each point, log2 ELR of each point)
        "1-scan": ([0.01] * 5, [c + k * s for k in (-2, -1, 0, 1, 2)]),
        "2-shift": ([0.01] * 2, [c + 1.5 + s, c + 1.5 + 2 * s]),  # max(2, points // 2) beyond the edge
        "3-check": ([0.005, 0.02], [c + 2.25] * 2),  # through the best, (c + 2.25, lr 0.01), at the same ELR
        "4-rescan": ([lr0] * 4, [c + 2.25 + k * s for k in (-2, -1, 1, 2)]),  # +-2 s; its centre was checked
        "5-zoom": ([lr0] * 3, [x0 - 0.375, x0, x0 + 0.375]),  # +-min(s / 2, zoom_width) around the vertex
    }
    for stage in stages:
        lrs, xs = line(stage)
        assert lrs == pytest.approx(expect[stage.name][0], rel=1e-12), stage.name
        assert xs == pytest.approx(expect[stage.name][1], abs=1e-9), stage.name
    assert result.best.lr == pytest.approx(lr0) and math.log2(result.best.elr) == pytest.approx(x0)
    assert not result.invariant_check.within_noise


def test_the_lr_axis_check_keeps_lr_and_multiplies_wd_in_factor_order():
    cfg = SearchConfig(axis="lr", lr=0.01, wd=0.5, check_factors=(0.25, 4.0, 0.5))
    result = simulate(cfg, lambda p: Outcome(p, 3.0 + (math.log2(p.lr) + 7.0) ** 2))
    check = next(stage for stage, _ in result.stages if stage.kind == "check")
    best = result.invariant_check.outcomes[0].point
    assert [p.lr for p in check.points] == pytest.approx([best.lr] * 3)
    assert [p.wd / best.wd for p in check.points] == pytest.approx([0.25, 4.0, 0.5])


def test_a_diverged_member_beyond_a_finite_neighbour_is_not_the_divergence_boundary():
    # upper side of the best: its neighbour trains, the two past it diverge. The optimum is not at the
    # divergence boundary (that note is for a diverged *nearest* neighbour), and nothing shifts.
    boundary = "diverged: the optimum is at the divergence boundary"
    result = simulate(SearchConfig(), elr_surface(C + 0.2, diverge_above=C + 1.5))
    assert kinds(result) == ["scan", "check", "zoom"] and not any(boundary in n for n in result.notes)
    result = simulate(SearchConfig(), elr_surface(C + 0.2, diverge_above=C + 0.5))
    assert any("(upper side) " + boundary in n for n in result.notes), result.notes


def test_the_fit_takes_every_finite_member_within_one_and_a_half_spacings_and_no_other():
    # members at +-1.5 s (the window's edge, known before the search) count; at +-2 s they do not
    off = {-1.5: 0.4, 1.5: 0.1, -2.0: 5.0, 2.0: 5.0}  # off the parabola, so their weight shows in the fit
    known = [Outcome(Point(LR, 2.0 ** (C + d) / LR), 3.0 + 0.1 * d * d + e) for d, e in off.items()]
    search = Search(SearchConfig(zoom_points=0), known=known)
    oracle = elr_surface(C)
    while (stage := search.next_stage()) is not None:
        search.tell(stage, [oracle(p) for p in stage.points])
    fit = search.result().fit
    xs = [-1.5, -1.0, 0.0, 1.0, 1.5]
    ys = [3.0 + 0.1 * d * d + off.get(d, 0.0) for d in xs]
    quad = fit_quadratic([C + d for d in xs], ys, [0.0] * 5)
    assert math.log2(fit.vertex) == pytest.approx(quad.x0 - quad.b / (2 * quad.a), abs=1e-9)
    assert fit.curvature == pytest.approx(quad.curvature)
    assert abs(math.log2(fit.vertex) - C) > 0.05  # and the edge members did move it off the parabola's C


def test_a_failed_check_with_one_other_finite_member_still_rescans():
    # check factors (2,): the line holds the checked point and one member; the latter is better
    cfg = SearchConfig(check_factors=(2.0,), max_rescans=1)
    result = simulate(cfg, lambda p: Outcome(p, 3.0 + 0.1 * (math.log2(p.elr) - C) ** 2 - 0.1 * math.log2(p.lr)))
    assert "rescan" in kinds(result) and not result.invariant_check.within_noise


def test_a_check_that_stands_keeps_the_zoom_and_fit_on_the_scanned_line():
    # ELR-invariant up to 0.002 nat, inside the 0.01 noise floor: the check member at lr x 4 scores lowest.
    # The 1-D answer stands, so the zoom refines the scanned line (the check member's line holds it alone:
    # no fit there, and the zoom once landed the recommendation on its own edge).
    x0 = C  # at the checked point: no zoom member beats the check member
    def oracle(p: Point) -> Outcome:
        return Outcome(p, 3.0 + 0.1 * (math.log2(p.elr) - x0) ** 2 - 0.001 * math.log2(p.lr / LR))
    result = simulate(SearchConfig(noise=0.01), oracle)
    assert kinds(result) == ["scan", "check", "zoom"] and result.invariant_check.within_noise
    zoom = result.stages[-1][0]
    assert all(p.lr == pytest.approx(LR) for p in zoom.points)
    assert result.fit.fixed == pytest.approx(LR) and math.log2(result.fit.vertex) == pytest.approx(x0, abs=1e-6)
    assert result.best.lr == pytest.approx(4 * LR)  # still the best evaluated point, and said so
    assert any("is a check member" in n and "within the check's noise" in n for n in result.notes), result.notes
    # a directory made by the earlier rules (version 1) replays by them: the zoom on the check member's line
    old = simulate(SearchConfig(noise=0.01), oracle, version=1)
    assert all(p.lr == pytest.approx(4 * LR) for p in old.stages[-1][0].points)
    for unknown in (0, SEARCH_VERSION + 1):
        with pytest.raises(ValueError, match=f"search version {unknown} "):
            Search(SearchConfig(), version=unknown)


def seed_noisy(x0: float, noise: float = 0.01, curvature: float = 0.05, seed: int = 0):
    """An ELR-invariant parabola plus run noise that a member's se does not hold (a training seed's): each
    point draws its own, fixed per point, as a retrained run would."""
    import random
    def oracle(p: Point) -> Outcome:
        rng = random.Random(hash((round(math.log2(p.lr), 6), round(math.log2(p.wd), 6), seed)))
        return Outcome(p, 3.0 + curvature * (math.log2(p.elr) - x0) ** 2 + rng.gauss(0.0, noise), 0.002)
    return oracle


def test_the_recommendation_is_the_fits_vertex_when_the_fit_is_usable():
    x0 = C + 1.3
    result = simulate(SearchConfig(), elr_surface(x0))
    reco = result.recommendation
    assert reco.source == "fit" and (reco.lr, reco.wd) == pytest.approx(result.fit.point("elr"))
    assert reco.lr == pytest.approx(result.fit.fixed) and math.log2(reco.elr) == pytest.approx(x0, abs=1e-6)
    assert reco.loss == pytest.approx(3.0) and reco.loss == result.fit.loss and reco.se == result.fit.se
    assert result.best is not None and result.loss >= reco.loss  # the best member stays on the result
    # search version 3 (directories made before) recommends the best member, and its stages are the same
    old = simulate(SearchConfig(), elr_surface(x0), version=3)
    assert old.recommendation.source == "member" and (old.recommendation.lr, old.recommendation.wd) == (
        old.best.lr, old.best.wd) and old.recommendation.loss == old.loss
    assert [s.points for s, _ in old.stages] == [s.points for s, _ in result.stages]


def test_without_a_usable_fit_the_recommendation_is_the_best_member():
    # a zoom of one point around the best: the fit's members may hold the vertex or not; force "not" with a
    # surface whose optimum is past the fitted window's end on a line the budget stops at the edge
    result = simulate(SearchConfig(budget=SearchConfig().scan_cost), elr_surface(C + 5.0))
    assert result.fit is None and result.recommendation.source == "member"
    assert (result.recommendation.lr, result.recommendation.wd, result.recommendation.loss) == (
        result.best.lr, result.best.wd, result.loss)
    assert simulate(SearchConfig(), lambda p: Outcome(p, math.nan)).recommendation is None


def test_the_vertex_recommendation_beats_the_best_member_under_run_noise():
    # Why the vertex (module docstring): members near the optimum differ by less than a run's noise, so the
    # best of them is the luckiest; the fit averages them. Over 40 noisy surfaces the vertex lands nearer the
    # true optimum than the best member, in median, by a clear factor.
    x0 = C + 1.3
    vertex, member = [], []
    for seed in range(40):
        r = simulate(SearchConfig(), seed_noisy(x0, seed=seed))
        if r.fit is not None:
            vertex.append(abs(math.log2(r.recommendation.elr) - x0))
        member.append(abs(math.log2(r.best.elr) - x0))
    assert len(vertex) >= 30
    assert statistics.median(vertex) < 0.7 * statistics.median(member), (statistics.median(vertex),
                                                                          statistics.median(member))


def test_the_vertex_is_the_fits_optimum_on_the_line_it_holds_fixed():
    fit = Fit(vertex=2.0 ** -7, loss=2.1, curvature=0.05, points=5, fixed=2.0 ** -8)
    lr, wd = fit.point("elr")  # ELR 2^-7 at lr 2^-8: wd 2
    assert (lr, wd) == (2.0 ** -8, 2.0) and lr * wd == fit.vertex
    assert fit.point("lr") == (2.0 ** -7, 2.0 ** -8)  # lr 2^-7 at wd 2^-8


def test_the_fits_se_is_the_weighted_least_squares_one():
    # independent method: numpy's polyfit with weights 1/se and the unscaled covariance
    import numpy as np
    xs, ses = [-1.5, -0.5, 0.0, 0.25, 1.0, 2.0], [0.01, 0.02, 0.01, 0.03, 0.015, 0.02]
    ys = [2.0 + 0.1 * (x - 0.2) ** 2 + d for x, d in zip(xs, (0.004, -0.006, 0.002, 0.01, -0.003, 0.005))]
    quad = fit_quadratic(xs, ys, ses)
    coef, cov = np.polyfit(xs, ys, 2, w=1 / np.array(ses), cov="unscaled")
    for x in (-1.0, quad.vertex, 1.7):
        g = np.array([x * x, x, 1.0])
        assert quad.value(x) == pytest.approx(float(np.polyval(coef, x)), abs=1e-10)
        assert quad.value_se(x) == pytest.approx(float(np.sqrt(g @ cov @ g)), rel=1e-8)
    fit = Fit.of(quad, 0.01)
    assert fit.se == pytest.approx(quad.value_se(quad.vertex)) and 0 < fit.se < min(ses)  # averaged: below each
    # the se scales with the members' (a wrong propagation that ignored them would not)
    assert fit_quadratic(xs, ys, [2 * v for v in ses]).value_se(quad.vertex) == pytest.approx(2 * fit.se)
    assert fit_quadratic(xs, ys, [0.0] * 6).value_se(0.0) == 0.0  # unmeasured: no se to propagate


def test_a_quadratic_is_usable_when_convex_with_its_vertex_inside_its_points_ends_included():
    xs = [0.0, 0.75, 1.5]
    for vertex, usable in ((0.0, True), (1.5, True), (0.9, True), (-0.01, False), (1.51, False)):
        quad = fit_quadratic(xs, [0.3 * (x - vertex) ** 2 + 2.0 for x in xs], [0.0] * 3)
        assert quad.vertex == pytest.approx(vertex, abs=1e-9) and quad.usable == usable, vertex
        fit = Fit.of(quad, 0.01)
        assert (fit is not None) == usable
        if fit:
            assert math.log2(fit.vertex) == pytest.approx(vertex, abs=1e-9) and fit.loss == pytest.approx(2.0)
    concave = fit_quadratic(xs, [-((x - 0.75) ** 2) for x in xs], [0.0] * 3)
    assert concave.vertex is None and not concave.usable and Fit.of(concave, 0.01) is None


def test_a_vertex_on_an_end_point_is_usable_whichever_way_the_least_squares_rounded_it():
    # the fit of the test above on one machine's BLAS (an Intel Xeon): its vertex 2 ulps past the end at 1.5
    past = Quadratic(a=0.29999999999999954, b=-0.44999999999999973, c=2.16875, x0=0.75, lo=0.0, hi=1.5, n=3)
    assert past.vertex > 1.5 and past.usable and Fit.of(past, 0.01) is not None
    before = Quadratic(a=0.3, b=0.45 + 1e-15, c=2.16875, x0=0.75, lo=0.0, hi=1.5, n=3)
    assert before.vertex < 0.0 and before.usable
    # an octave's millionth outside is outside: the widening is for rounding alone
    for b in (-0.45 - 1.2e-6, 0.45 + 1.2e-6):
        assert not Quadratic(a=0.3, b=b, c=2.0, x0=0.75, lo=0.0, hi=1.5, n=3).usable, b


def test_grid_size_counts_a_log2_grid_at_any_spacing():
    assert grid_size([1.0, 2.0 ** 3], 0.75) == 5  # 3 octaves at 0.75: 4 steps, both ends
    assert grid_size([1.0, 2.0 ** 3.1], 0.75) == 6  # a little past: one more point
    assert grid_size([1.0, 2.0 ** 3], 1.5) == 3 and grid_size([0.5], 0.75) == 1


def test_regime_boundaries_enough_at_exactly_the_transitions_and_large_at_exactly_b_precond():
    exact = classify_regime(100.0, 32, 1000, 0.01, 0.1)  # steps*lr*wd = 1.0 = MIN_TRANSITIONS
    assert exact.enough_iterations and exact.axis == "elr"
    assert not classify_regime(100.0, 32, 999, 0.01, 0.1).enough_iterations
    at = classify_regime(32.0, 32, 1000, 0.01, 0.1)  # batch == B_precond: large, no longer small
    assert at.small_batch is False and at.axis == "lr"
    # a B_precond of 2 or less suggests no small-batch schedule (a batch of 1 cannot measure the noise)
    assert classify_regime(2.0, 32, 1000, 0.01, 0.1).batch_schedule is None
    assert classify_regime(2.5, 32, 1000, 0.01, 0.1).batch_schedule.startswith("2@")
