"""bench/bench_tune.py's paired comparison of two methods run once per seed."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_tune as bt  # noqa: E402


def test_paired_counts_seeds_and_resolves_a_difference_every_seed_shows():
    tune = [0.001, 0.002, -0.003, 0.000, 0.004]
    other = [t + 0.01 for t in tune]  # the other method 0.01 worse at every seed
    p = bt.paired(tune, other)
    assert (p["below"], p["seeds"]) == (5, 5)
    assert p["diff"] == pytest.approx(-0.01)
    assert p["hi"] < 0 and p["lo"] == pytest.approx(-0.01, abs=0.006)
    assert bt.describe_paired(p).endswith("tune lower")


def test_paired_leaves_a_difference_of_one_lucky_seed_unresolved():
    tune = [0.010, -0.002, 0.004, 0.006, 0.001]
    other = [0.003, 0.005, 0.000, 0.007, -0.004]  # medians 0.004 vs 0.003; the seeds disagree
    p = bt.paired(tune, other)
    assert p["below"] == 2 and p["diff"] == pytest.approx(0.001)
    assert p["lo"] < 0 < p["hi"]
    assert "not resolved" in bt.describe_paired(p)
    assert bt.describe_paired(bt.paired(other, [o - 0.05 for o in other])).endswith("tune higher")


def test_paired_is_reproducible_and_refuses_unpaired_scores():
    assert bt.paired([0.1, 0.2, 0.3], [0.2, 0.1, 0.0]) == bt.paired([0.1, 0.2, 0.3], [0.2, 0.1, 0.0])
    with pytest.raises(ValueError, match="one per seed for both methods, got 2 and 3"):
        bt.paired([0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="got 0 and 0"):
        bt.paired([], [])


def test_paired_decides_nothing_from_fewer_than_three_seeds():
    assert bt.describe_paired(bt.paired([0.0], [0.01])).endswith("too few seeds to decide")
    assert bt.describe_paired(bt.paired([0.0, 0.001], [0.01, 0.02])).endswith("too few seeds to decide")
    assert bt.describe_paired(bt.paired([0.0, 0.001, 0.002], [0.01, 0.02, 0.03])).endswith("tune lower")
