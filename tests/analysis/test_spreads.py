"""Spread statistics: max-min, the per-octave gap (exact definition) and bootstrap noise."""

import math

import numpy as np
import pytest

from trajinv.analysis.spreads import NOISE_Z, group_stats, max_min, mean_boot, per_octave, se, within_noise


@pytest.mark.parametrize("varying, vals, want", [
    ((1, 2, 4), (3.0, 3.1, 3.5), (0.1 + 0.4) / 2),          # factor-2 grid: mean neighbour gap
    ((1, 4), (3.0, 3.5), 0.25),                               # factor 4: y(u+1) interpolated halfway
    ((0.5, 1), (2.0, 2.3), 0.3),                              # one octave, two members: the gap itself
    ((1, 2 ** 0.5), (2.0, 2.1), 0.1 / 0.5),                   # half an octave: end-to-end gap per octave
    ((1, 2 ** 0.5, 2, 2 ** 1.5), (0.0, 1.0, 0.0, 1.0), 0.0),  # half-octave steps: a factor 2 apart is equal
    ((0.004, 0.008, 0.016), (1.0, 1.2, 1.1), (0.2 + 0.1) / 2),  # float log2 of decimal lrs counts as 1
])
def test_per_octave_gap_by_hand(varying, vals, want):
    assert float(per_octave(varying, np.array(vals))) == pytest.approx(want, abs=1e-12)


def test_per_octave_gap_with_uneven_spacing():
    # wd 1, 2, 3, 8: u = 0, 1, log2 3, 3. Anchors with a partner an octave up: u = 0, 1, log2 3.
    y = np.array([1.0, 2.0, 4.0, 0.0])
    u3 = math.log2(3)
    at2 = 4.0 + (2 - u3) / (3 - u3) * (0.0 - 4.0)        # y(2), between wd 3 and 8
    at_u3p1 = 4.0 + (u3 + 1 - u3) / (3 - u3) * (0.0 - 4.0)  # y(log2 6)
    want = np.mean([abs(2.0 - 1.0), abs(at2 - 2.0), abs(at_u3p1 - 4.0)])
    assert float(per_octave((1, 2, 3, 8), y)) == pytest.approx(want)


def test_per_octave_is_vectorised_over_resamples_and_undefined_for_zero_wd():
    vals = np.array([[3.0, 3.1, 3.5], [3.0, 3.0, 3.0]])
    assert per_octave((1, 2, 4), vals) == pytest.approx([0.25, 0.0])
    assert max_min(vals) == pytest.approx([0.5, 0.0])
    assert math.isnan(float(per_octave((0.0, 1.0), np.array([1.0, 2.0]))))
    assert math.isnan(float(per_octave((1.0, 1.0), np.array([1.0, 2.0]))))


def test_group_within_noise_uses_the_paired_gap_of_the_extreme_members():
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 0.5, size=64)  # window difficulty, common to both members: cancels in pairs
    noise = rng.normal(0, 0.01, size=(2, 64))
    close = group_stats((1, 2), [2.0, 2.001], [2.0 + shared + noise[0], 2.001 + shared + noise[1]])
    far = group_stats((1, 2), [2.0, 2.1], [2.0 + shared + noise[0], 2.1 + shared + noise[1]])
    assert close.pair_se == pytest.approx(np.std(noise[1] - noise[0], ddof=1))
    assert close.within_noise is True and far.within_noise is False
    assert far.spread_se == pytest.approx(far.pair_se, rel=1e-9)  # far from 0 the spread moves like the gap
    assert close.spread_se < 0.5 * np.std(shared)  # paired: not the unpaired noise of each member


def test_missing_values_and_resamples():
    g = group_stats((1, 2, 4), [2.0, math.nan, 2.5], [None, None, None])
    assert g.spread == 0.5 and math.isnan(g.spread_se) and g.within_noise is None
    assert math.isnan(group_stats((1, 2), [2.0, math.nan], [None, None]).spread)
    assert mean_boot([np.ones(3), None]) is None and mean_boot([np.ones(3), np.zeros(3)]).tolist() == [0.5] * 3
    assert math.isnan(se(None)) and math.isnan(se(np.array([1.0])))
    assert within_noise(0.1, 0.05) is (0.1 <= NOISE_Z * 0.05) and within_noise(math.nan, 1.0) is None


def test_per_octave_of_decimal_wds_whose_log2_ratio_is_not_exactly_one():
    assert np.log2(0.11) - np.log2(0.055) < 1 < np.log2(0.1) - np.log2(0.05)  # float rounding, both ways
    assert float(per_octave((0.055, 0.11), np.array([1.0, 1.3]))) == pytest.approx(0.3)
    assert float(per_octave((0.05, 0.1), np.array([1.0, 1.3]))) == pytest.approx(0.3)
    assert float(per_octave((0.055, 0.11, 0.22), np.array([1.0, 1.3, 1.2]))) == pytest.approx(0.2)


def test_within_noise_is_two_standard_errors():
    assert within_noise(0.099, 0.05) is True   # 1.98 SE: within noise at NOISE_Z = 2
    assert within_noise(0.101, 0.05) is False


def test_pair_se_is_that_of_the_highest_and_lowest_member_not_the_ends():
    rng = np.random.default_rng(2)
    boot = [2.0 + rng.normal(0, s, 32) for s in (0.01, 0.2, 0.05)]
    st = group_stats((1, 2, 4), [2.5, 2.0, 3.0], boot)  # lowest: the middle member; highest: the last
    assert st.pair_se == pytest.approx(np.std(boot[2] - boot[1], ddof=1))


def test_resamples_of_unequal_counts_give_no_uncertainty_rather_than_an_error():
    st = group_stats((1, 2), [2.0, 2.1], [np.zeros(4), np.zeros(8)])
    assert st.spread == pytest.approx(0.1) and st.spread_boot is None and math.isnan(st.spread_se)
    assert mean_boot([np.ones(4), np.ones(8)]) is None


def test_se_ignores_non_finite_resamples():
    assert se(np.array([1.0, 2.0, np.nan, 3.0, np.inf])) == pytest.approx(1.0)


def test_mean_boot_is_the_mean_per_resample():
    out = mean_boot([np.zeros(2), np.zeros(2), np.array([3.0, 6.0])])
    assert out.tolist() == [1.0, 2.0]
