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
