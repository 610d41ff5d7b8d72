"""The validation-window bootstrap: fixed resamples, their means and standard errors."""

import numpy as np
import pytest
import torch

from trajinv.data import boot_means, boot_se, window_resamples


def test_resamples_are_fixed_counts_of_the_windows():
    c = window_resamples(50, 16)
    assert c.shape == (50, 16) and c.dtype == np.float64
    assert np.all(c.sum(axis=0) == 50) and np.all(c >= 0) and np.all(c == np.round(c))
    assert np.array_equal(c, window_resamples(50, 16))  # a pure function of (n_windows, n_boot)
    assert not np.array_equal(c, window_resamples(50, 16, seed=1))
    assert len({tuple(col) for col in c.T}) == 16  # distinct resamples
    assert window_resamples(7, 0).shape == (7, 0)


def test_bootstrap_means_are_the_means_over_the_drawn_windows():
    rng = np.random.default_rng(0)
    w = rng.normal(3.0, 0.4, size=(3, 20))
    c = window_resamples(20, 5)
    b = boot_means(torch.from_numpy(w).float(), c)
    assert b.shape == (3, 5)
    # Resample 0 by hand: repeat each window as often as it was drawn.
    drawn = np.repeat(np.arange(20), c[:, 0].astype(int))
    assert b[:, 0] == pytest.approx(w[:, drawn].mean(axis=1), rel=1e-6)
    with pytest.raises(ValueError, match="21 windows"):
        boot_means(w, window_resamples(21, 5))


@pytest.mark.parametrize("n_boot, rel", [(64, 0.3), (4000, 0.05)])
def test_bootstrap_se_matches_the_analytic_se_of_a_mean(n_boot, rel):
    """For i.i.d. windows the SE of the mean loss is std / sqrt(n); B = 64 estimates it to ~9%
    (std of a std estimate from B values: 1/sqrt(2(B-1))), B = 4000 to ~1%."""
    rng = np.random.default_rng(1)
    w = rng.normal(2.5, 0.43, size=(4, 512))  # the per-window spread the data module measured
    analytic = w.std(axis=1, ddof=1) / np.sqrt(512)
    se = boot_se(boot_means(w, window_resamples(512, n_boot)))
    assert se == pytest.approx(analytic, rel=rel)


def test_paired_resamples_see_through_a_shared_window_effect():
    """Two members whose losses differ by a constant on every window: each has an SE,
    their difference has none, because resample b averages the same windows for both."""
    rng = np.random.default_rng(2)
    a = rng.normal(3.0, 0.5, size=256)
    b = boot_means(np.stack([a, a + 0.01]), window_resamples(256, 64))
    assert boot_se(b)[0] > 0.02
    assert boot_se(b[1] - b[0]) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(boot_se(np.ones((2, 1)))).all()
