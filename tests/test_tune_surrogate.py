"""bench/tune_surrogate.py: its surrogate interpolates, its noise estimate pairs the right runs, its replays
search what they are given."""

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import tune_surrogate as ts  # noqa: E402


def bowl(a: float, b: float) -> float:
    return 1.5 + 0.05 * (a + 8.0) ** 2 + 0.01 * (b + 2.0) ** 2


def test_gaussian_process_interpolates_a_smooth_surface_between_its_points():
    points = [(a, b, bowl(a, b)) for a in range(-10, -5) for b in range(-5, 2)]
    gp = ts.GaussianProcess.fit(points)
    for a, b in [(-8.5, -2.5), (-7.3, 0.4), (-9.1, -4.2)]:  # off the training grid
        assert gp(a, b) == pytest.approx(bowl(a, b), abs=0.01)
    assert gp(-8.5, -2.5) != pytest.approx(bowl(-6.0, -2.5), abs=0.01)  # and tells points apart


def write_summary(path: Path, rows: list[tuple[float, float, float | None]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, ["lr", "wd", "final_val_loss", "status"])
        w.writeheader()
        for lr, wd, loss in rows:
            w.writerow({"lr": lr, "wd": wd, "final_val_loss": "" if loss is None else loss,
                        "status": "done" if loss is not None else "diverged"})


def test_cached_runs_and_retrain_noise_pair_a_tune_member_with_its_grid_point(tmp_path):
    write_summary(tmp_path / "grid-s0" / "summary.csv", [(2 ** -8, 0.25, 1.50), (2 ** -7, 0.25, 1.60),
                                                          (2 ** -6, 0.25, None)])
    write_summary(tmp_path / "tune-s0" / "stages" / "1-scan" / "summary.csv",
                  [(2 ** -8, 0.25, 1.51), (2 ** -7.5, 0.25, 1.55),  # the second is off the grid
                   (2 ** -7, 0.25, 1.65)])  # the third 0.1 nat above the grid's best: far from the optimum
    write_summary(tmp_path / "tune-s1" / "stages" / "1-scan" / "summary.csv", [(2 ** -7, 0.25, 1.0)])  # other seed
    # a newer tune with that stage copied in (one observation, counted once) and a member of its own
    write_summary(tmp_path / "tune-v2-s0" / "stages" / "1-scan" / "summary.csv",
                  [(2 ** -8, 0.25, 1.51), (2 ** -7.5, 0.25, 1.55), (2 ** -7, 0.25, 1.65)])
    write_summary(tmp_path / "tune-v2-s0" / "stages" / "2-zoom" / "summary.csv", [(2 ** -8.25, 0.25, 1.53)])
    runs = ts.cached_runs(tmp_path, 0)
    assert len(runs["grid"]) == 2 and len(runs["tune"]) == 4  # the diverged grid member is left out
    assert ts.retrain_noise(runs) == pytest.approx([0.01])
    assert ts.retrain_noise(runs, near=0.2) == pytest.approx([0.01, 0.05])


def test_replayed_tune_finds_the_optimum_of_a_noiseless_elr_invariant_surface():
    def surface(a: float, b: float) -> float:  # minimum at ELR 2^-10, any lr
        return 1.5 + 0.05 * (a + b + 10.0) ** 2
    loss, best = ts.replay_tune(surface, 0.0, np.random.default_rng(0), 16 * ts.STEPS)
    assert loss == pytest.approx(1.5, abs=0.05 * 0.5 ** 2)  # within half an octave of the optimum
    assert abs(math.log2(best.elr) + 10.0) <= 0.5


def test_cached_seeds_are_those_with_a_grid(tmp_path):
    for name in ("grid-s3", "grid-s0", "grid-s12", "grid-sx", "tune-s5"):
        write_summary(tmp_path / name / "summary.csv", [(2 ** -8, 0.25, 1.5)])
    (tmp_path / "grid-s7").mkdir()  # started, no summary yet
    assert ts.cached_seeds(tmp_path) == [0, 3, 12]
