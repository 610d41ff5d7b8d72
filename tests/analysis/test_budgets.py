"""`trajinv fit`: optima of sweep and tune directories at several budgets, and the power-law fit across them."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from trajinv import cli
from trajinv.analysis.budgets import TUNE_RESULT, fit_directories, load_budget
from trajinv.sweep import write_summary

STEPS = {1: 400, 2: 800, 4: 1600}  # tokens = steps * 2048


def _optimum(scale: float) -> tuple[float, float]:
    """Known optima: lr constant, wd ~ tokens^-0.5."""
    return 2.0 ** -8, 0.5 * scale ** -0.5


def _loss(lr: float, wd: float, scale: float) -> float:
    """A valley along ELR (the late-training picture) with a weak lr term: quadratic in log2 lr and wd."""
    lr0, wd0 = _optimum(scale)
    a, c = math.log2(lr / lr0), math.log2(lr * wd / (lr0 * wd0))
    return 3.0 + 0.1 * c * c + 0.03 * a * a


def _sweep_dir(root, scale: float):
    lr0, wd0 = _optimum(scale)
    rows, k = [], 0
    for i in range(-2, 3):
        for j in range(-2, 3):
            lr, wd = lr0 * 2.0 ** (i + 0.3), wd0 * 2.0 ** (j - 0.2)  # the optimum between grid points
            rows.append({"run_id": "bs32", "member": k, "name": f"m{k}", "lr": lr, "wd": wd, "elr": lr * wd,
                         "batch_size": "32", "steps": STEPS[scale], "tokens": STEPS[scale] * 2048,
                         "final_train_loss": None, "final_val_loss": _loss(lr, wd, scale), "status": "done"})
            k += 1
    root.mkdir(parents=True)
    write_summary(root, rows)
    return root


def _tune_dir(root, scale: float, check=True):
    """What `trajinv tune` writes: an ELR line at a fixed lr and an iso-ELR check line."""
    lr0, wd0 = _optimum(scale)
    fixed = lr0 * 2.0 ** 0.4
    scan = [(fixed, wd0 * lr0 / fixed * 2.0 ** (j + 0.25)) for j in range(-3, 4)]
    best = min(scan, key=lambda p: _loss(*p, scale))
    stages = [("1-scan", "scan", scan)]
    if check:
        stages.append(("2-check", "check", [(best[0] * f, best[1] / f) for f in (0.25, 0.5, 2.0, 4.0)]))
    data = {"recommendation": None, "stages": []}
    allp = [p for _, _, pts in stages for p in pts]
    reco = min(allp, key=lambda p: _loss(*p, scale))
    data["recommendation"] = {"lr": reco[0], "wd": reco[1], "elr": reco[0] * reco[1], "val_loss": _loss(*reco, scale)}
    for name, kind, pts in stages:
        d = root / "stages" / name
        d.mkdir(parents=True)
        write_summary(d, [{"run_id": "bs32", "member": i, "name": "", "lr": lr, "wd": wd, "elr": lr * wd,
                           "batch_size": "32", "steps": STEPS[scale], "tokens": STEPS[scale] * 2048,
                           "final_train_loss": None, "final_val_loss": _loss(lr, wd, scale), "status": "done"}
                          for i, (lr, wd) in enumerate(pts)])
        data["stages"].append({"name": name, "kind": kind, "directory": f"stages/{name}",
                               "outcomes": [{"lr": lr, "wd": wd, "elr": lr * wd, "loss": _loss(lr, wd, scale),
                                             "se": 0.0} for lr, wd in pts]})
    (root / TUNE_RESULT).write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("make", [_sweep_dir, _tune_dir])
def test_known_optimum_and_exponents_are_recovered(tmp_path, make):
    dirs = [make(tmp_path / f"b{s}", s) for s in STEPS]
    for d, s in zip(dirs, STEPS):
        o = load_budget(d, n_boot=50)
        lr0, wd0 = _optimum(s)
        assert o.tokens == STEPS[s] * 2048 and o.steps == STEPS[s]
        assert math.log2(o.lr / lr0) == pytest.approx(0, abs=0.05)
        assert math.log2(o.wd / wd0) == pytest.approx(0, abs=0.05)
        assert set(o.tuned_axes) == {"lr", "wd"} and not o.at_edge
    report = fit_directories(dirs, target_tokens=8 * STEPS[1] * 2048)
    assert report.fits["wd"].b == pytest.approx(-0.5, abs=0.05)
    assert report.fits["lr"].b == pytest.approx(0.0, abs=0.05)
    wd_pred = report.predictions["wd"][0]
    assert wd_pred == pytest.approx(_optimum(8)[1], rel=0.05)


def test_a_tune_recommending_a_check_member_still_reads_both_lines(tmp_path):
    """The recommendation can be a check member off the scanned line (a better lr within noise): the
    two lines still cross at the scan's best member, so lr and wd both come out."""
    root = _tune_dir(tmp_path / "t", 2)
    data = json.loads((root / TUNE_RESULT).read_text())
    check = data["stages"][1]["outcomes"][0]
    data["recommendation"] = {"lr": check["lr"], "wd": check["wd"], "elr": check["elr"], "val_loss": check["loss"]}
    (root / TUNE_RESULT).write_text(json.dumps(data))
    o = load_budget(root, n_boot=50)
    lr0, wd0 = _optimum(2)
    assert set(o.tuned_axes) == {"lr", "wd"} and not o.at_edge
    assert math.log2(o.lr / lr0) == pytest.approx(0, abs=0.05) and math.log2(o.wd / wd0) == pytest.approx(0, abs=0.05)


def _add_stage(root, name: str, kind: str, points: list[tuple[float, float]], scale: float, axis: str = "elr"):
    data = json.loads((root / TUNE_RESULT).read_text())
    data["stages"].append({"name": name, "kind": kind, "directory": "stages/1-scan",
                           "axis": axis, "outcomes": [{"lr": lr, "wd": wd, "elr": lr * wd, "loss": _loss(lr, wd, scale),
                                                       "se": 0.0} for lr, wd in points]})
    (root / TUNE_RESULT).write_text(json.dumps(data))


def test_a_zoom_after_the_check_still_crosses_the_check_line(tmp_path):
    """The tune checks, then zooms: its best member (the anchor) is a zoom member whose ELR the check
    line does not pass through. The check that crosses the anchor's line still locates lr."""
    root = _tune_dir(tmp_path / "t", 2)
    lr0, wd0 = _optimum(2)
    fixed = lr0 * 2.0 ** 0.4  # the scan's lr (see _tune_dir)
    _add_stage(root, "3-zoom", "zoom", [(fixed, wd0 * lr0 / fixed * 2.0 ** d) for d in (-0.2, 0.05, 0.3)], 2)
    o = load_budget(root, n_boot=50)
    assert set(o.tuned_axes) == {"lr", "wd"} and not o.at_edge
    assert math.log2(o.lr / lr0) == pytest.approx(0, abs=0.05) and math.log2(o.wd / wd0) == pytest.approx(0, abs=0.05)


def test_an_lr_tune_zoomed_after_its_check_locates_wd(tmp_path):
    """Along lr: the iso-LR check varies wd at the scan's best lr, and the zoom then finds a better lr at
    the same wd. The check still crosses the anchor's lr line, so wd is located there."""
    root = tmp_path / "t"
    lr0, wd0 = _optimum(1)
    scan = [(lr0 * 2.0 ** (k + 0.4), wd0) for k in range(-3, 4)]  # best member at lr0 * 2^0.4
    check = [(lr0 * 2.0 ** 0.4, wd0 * f) for f in (0.25, 0.5, 2.0, 4.0)]
    zoom = [(lr0 * 2.0 ** d, wd0) for d in (-0.1, 0.15, 0.65)]
    _tune_dir(root, 1, check=False)
    data = json.loads((root / TUNE_RESULT).read_text())
    data["axis"], data["stages"] = "lr", []
    (root / TUNE_RESULT).write_text(json.dumps(data))
    for name, kind, pts in (("1-scan", "scan", scan), ("2-check", "check", check), ("3-zoom", "zoom", zoom)):
        _add_stage(root, name, kind, pts, 1, axis="lr")
    o = load_budget(root, n_boot=50)
    assert set(o.tuned_axes) == {"lr", "wd"}
    # the check's wd optimum is that of lr0 * 2^0.4, where this surface's valley puts wd0 * 2^-0.4
    assert math.log2(o.wd / wd0) == pytest.approx(-0.4, abs=0.05)
    assert math.log2(o.lr / lr0) == pytest.approx(0, abs=0.1)


def test_an_lr_tune_without_its_check_is_refused_in_one_line(tmp_path):
    """An lr tune whose budget ran out before the check varied wd only at its scan's wd: no wd optimum."""
    root = _tune_dir(tmp_path / "t", 1, check=False)
    data = json.loads((root / TUNE_RESULT).read_text())
    lr0, wd0 = _optimum(1)
    data["axis"] = "lr"
    data["stages"][0]["axis"] = "lr"
    data["stages"][0]["outcomes"] = [{"lr": lr0 * 2.0 ** k, "wd": wd0, "elr": lr0 * 2.0 ** k * wd0,
                                      "loss": _loss(lr0 * 2.0 ** k, wd0, 1), "se": 0.0} for k in range(-2, 3)]
    (root / TUNE_RESULT).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="optimal wd is not located") as e:
        load_budget(root, n_boot=20)
    assert "\n" not in str(e.value)


def test_a_tune_without_check_line_leaves_lr_untuned(tmp_path):
    o = load_budget(_tune_dir(tmp_path / "t", 1, check=False), n_boot=20)
    assert o.tuned_axes == ("wd",) and o.log2_se["lr"] == pytest.approx(0.0, abs=1e-9)


def test_cli_fit_writes_report_and_refuses_too_few_budgets(tmp_path):
    dirs = [str(_sweep_dir(tmp_path / f"b{s}", s)) for s in STEPS]
    res = CliRunner().invoke(cli.main, ["fit", *dirs, "--target-tokens", "1e7", "--out", str(tmp_path / "fit")])
    assert res.exit_code == 0, res.output
    assert "optimal wd decreases sublinearly" in res.output
    assert (tmp_path / "fit" / "scaling.png").stat().st_size > 0
    assert json.loads((tmp_path / "fit" / "scaling.json").read_text())["fits"]["wd"]["b"] < 0
    res = CliRunner().invoke(cli.main, ["fit", *dirs[:2]])
    assert res.exit_code == 1 and "3 or more token budgets" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli.main, ["fit", str(tmp_path), *dirs[:2]])
    assert res.exit_code == 1 and "neither a tune" in res.output
