"""bench/bench_setting.py's verdict: is a grid's best point interior along lr and along wd, and by what margin."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_setting as bs  # noqa: E402


def _grid(losses):
    """rows lr 2^-3..2^-1, columns wd 2^0..2^2."""
    return {(2.0 ** (i - 3), 2.0 ** j): v for i, row in enumerate(losses) for j, v in enumerate(row)}


def test_a_best_point_in_the_middle_is_interior_in_both_with_its_margins():
    v = bs.judge(_grid([[3.0, 2.9, 3.0],
                        [2.8, 2.5, 2.6],
                        [3.1, 2.7, 3.2]]))
    assert v.best == (0.25, 2.0) and v.loss == 2.5
    assert v.interior == {"lr": True, "wd": True}
    # the nearer neighbour sets the margin: lr 2^-1 (2.7) against 2^-3 (2.9); wd 2^2 (2.6) against 2^0 (2.8)
    assert v.margin["lr"] == pytest.approx(0.2) and v.margin["wd"] == pytest.approx(0.1)


def test_a_best_point_at_the_smallest_wd_is_at_the_edge_there():
    v = bs.judge(_grid([[3.0, 3.1, 3.2],
                        [2.5, 2.6, 2.9],
                        [2.9, 3.0, 3.1]]))
    assert v.interior == {"lr": True, "wd": False} and math.isnan(v.margin["wd"])


def test_a_diverged_neighbour_is_infinitely_worse_and_never_the_best():
    v = bs.judge(_grid([[3.0, None, 3.0],
                        [2.8, 2.5, 2.6],
                        [3.1, None, 3.2]]))
    assert v.best == (0.25, 2.0) and v.margin["lr"] == math.inf
    assert bs.mean_grid([_grid([[1.0, None, 1.0]] * 3), _grid([[2.0, 1.0, 1.0]] * 3)])[(0.125, 2.0)] is None
    assert "div" in "\n".join(bs.describe("seed 0", _grid([[3.0, None, 3.0], [2.8, 2.5, 2.6], [3.1, 2.7, 3.2]])))
