"""`trajinv analyze`'s report: invariance, phases when the norms are logged, tuning curves when opda is there."""

from __future__ import annotations

import pytest

from trajinv.analysis.report import CURVES_PNG, PHASES_PNG, sweep_report
from trajinv.config import ModelConfig, OptimConfig, TrainConfig
from trajinv.data import DataConfig
from trajinv.sweep import SweepSpec, run_sweep


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("sweep")
    train = TrainConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, context=16), steps=12, batch_size="4",
                        optim=OptimConfig(), eval_every=6, eval_seqs=8, log_every=3, checkpoint_every=0)
    spec = SweepSpec(train=train, data=DataConfig(max_tokens=200_000), lrs=(4e-3, 8e-3), wds=(0.5, 1.0),
                     elrs=(4e-3,))
    run_sweep(spec, out)
    return out


def test_report_has_invariance_phases_and_writes_plots(small_sweep):
    stale = small_sweep / ".val_loss_by_lr.png.999999999.abcdefgh.tmp"  # an analyze killed while it drew
    stale.write_bytes(b"\x89PNG")
    text, paths = sweep_report(small_sweep)
    assert not stale.exists()
    assert "iso-LR" in text and "iso-ELR" in text
    assert "eq step" in text and "LR phase" in text  # the phase table: the trainer logs per-kind norms
    assert {p.name for p in paths} >= {"val_loss_by_lr.png", "val_loss_by_elr.png", PHASES_PNG}
    assert all(p.is_file() and p.stat().st_size for p in paths)


def test_tuning_curves_when_opda_is_installed(small_sweep):
    pytest.importorskip("opda")
    text, paths = sweep_report(small_sweep)
    assert "tuning curves" in text and "ELR line at lr=" in text
    assert (small_sweep / CURVES_PNG) in paths


def test_a_sweep_with_a_member_without_weight_decay_gets_its_whole_report(tmp_path, tiny_data):
    # wd = 0 (ELR 0) used to fail the ELR plot's log colour scale, and with it the report
    train = TrainConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, context=16), steps=12, batch_size="4",
                        optim=OptimConfig(), eval_every=6, eval_seqs=8, log_every=3, checkpoint_every=0)
    run_sweep(SweepSpec(train=train, data=DataConfig(max_tokens=200_000), lrs=(4e-3, 8e-3), wds=(0.0, 1.0)),
              tmp_path)
    text, paths = sweep_report(tmp_path)
    assert "iso-LR" in text and "lr=0.004,wd=0" in text
    assert {p.name for p in paths} >= {"val_loss_by_lr.png", "val_loss_by_elr.png"}
    # the two wd = 0 members share "ELR 0" but follow lr all the way: no iso-ELR group
    from trajinv.analysis.invariance import iso_elr_groups, iso_lr_groups
    from trajinv.analysis.records import curves, load_metrics

    cs = list(curves(load_metrics(tmp_path)).values())
    assert iso_elr_groups(cs) == [] and len(iso_lr_groups(cs)) == 2


def test_a_sweep_whose_every_member_diverged_still_gets_phases_and_tuning_curves(tmp_path, tiny_data):
    # lr 10-50 without clipping: losses blow up (finite, far above ln 256); analyze used to stop at
    # "every member diverged" with exit 1, after the sweep had trained fine
    train = TrainConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, context=16), steps=12, batch_size="4",
                        optim=OptimConfig(clip=0.0), eval_every=6, eval_seqs=8, log_every=3, checkpoint_every=0)
    run_sweep(SweepSpec(train=train, data=DataConfig(max_tokens=200_000), lrs=(10.0, 50.0), wds=(0.001, 0.01)),
              tmp_path)
    text, paths = sweep_report(tmp_path)
    assert text.startswith("every member diverged: no curves to compare")
    assert "eq step" in text and PHASES_PNG in {p.name for p in paths}
    if pytest.importorskip("opda"):
        assert "every member diverged" in text.split("tuning curves")[-1] and CURVES_PNG in {p.name for p in paths}


def test_tuning_curves_are_per_batch_size(tmp_path, tiny_data):
    pytest.importorskip("opda")
    train = TrainConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, context=16), steps=8, batch_size="4",
                        optim=OptimConfig(), eval_every=4, eval_seqs=8, log_every=4, checkpoint_every=0)
    run_sweep(SweepSpec(train=train, data=DataConfig(max_tokens=200_000), lrs=(4e-3, 8e-3), wds=(0.5, 1.0),
                        batch_sizes=("4", "8")), tmp_path)
    text, _ = sweep_report(tmp_path)
    assert "batch 4: lr x wd, 4 trials" in text and "batch 8: lr x wd, 4 trials" in text
    assert "8 trials" not in text  # one point trained at two batch sizes is two runs, not two trials of a search


def test_an_interrupted_sweep_is_reported_as_incomplete(small_sweep, tmp_path):
    import shutil

    d = tmp_path / "interrupted"
    shutil.copytree(small_sweep, d)
    lines = (d / "summary.csv").read_text().splitlines()
    (d / "summary.csv").write_text("\n".join(lines[:3]) + "\n")  # what an interruption after 2 members leaves
    text, _ = sweep_report(d)
    total = len(lines) - 1
    assert text.startswith(f"incomplete: {total - 2} of {total} members have not finished ({total - 2} not in "
                           "summary.csv)")
    assert not sweep_report(small_sweep)[0].startswith("incomplete")
    assert "(rerun the `trajinv sweep` command to finish it)" in text.splitlines()[0]
    stage = tmp_path / "tune" / "stages" / "1-scan"  # the same, as a tune's stage: the tune finishes it
    shutil.copytree(d, stage)
    (tmp_path / "tune" / "tune_spec.json").write_text("{}")
    assert "(rerun the `trajinv tune` command to finish it)" in sweep_report(stage)[0].splitlines()[0]


def test_a_tune_directory_is_pointed_to_its_stages(tmp_path):
    (tmp_path / "stages" / "1-scan").mkdir(parents=True)
    (tmp_path / "tune_spec.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is a tune: its stages are sweeps; analyze one of them \(.*1-scan\)"):
        sweep_report(tmp_path)


def test_an_observed_transition_without_a_prediction_says_why(small_sweep, monkeypatch):
    # fewer than half the members in equilibrium: the predicted line was dropped without a word
    from dataclasses import replace

    import trajinv.analysis.report as report
    from trajinv.analysis.invariance import analyze_sweep

    def observed_at_6(*a, **k):
        return replace(analyze_sweep(*a, **k), transition_step=6)

    monkeypatch.setattr(report, "analyze_sweep", observed_at_6)
    monkeypatch.setattr(report, "predicted_transition_step", lambda phases: None)
    head = "LR -> ELR transition: observed at step 6; no prediction from single runs: "
    for counts, why in (((1, 4), "1 of 4 members reached equilibrium, half are needed"),
                        ((0, 0), "every member whose norms were logged diverged")):
        monkeypatch.setattr(report, "equilibrated", lambda phases, counts=counts: counts)
        text, _ = sweep_report(small_sweep)
        assert head + why in text
