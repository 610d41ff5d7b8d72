"""`trajinv tune` end to end on a tiny model: stages as sweeps, the report, resume after an interruption."""

from __future__ import annotations

import csv
import json
import statistics
import warnings
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from matplotlib.legend import Legend

from trajinv import cli
from trajinv.analysis.budgets import load_budget
from trajinv.analysis.records import load_metrics
from trajinv.config import DataConfig, Member, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig
from trajinv.tune.report import (HEATMAP_PNG, RESULT, CURVE_PNG, build_curve_figure, format_summary, to_json,
                                  write_report)
from trajinv.tune.runner import STAGES, TuneSpec, run_tune
from trajinv.tune.search import SearchConfig

TINY = dict(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, context=16), members=(Member(),), steps=10,
            batch_size="8", optim=OptimConfig(), schedule=ScheduleConfig(warmup=2), eval_every=5, eval_seqs=8,
            log_every=5, checkpoint_every=4)


def _spec(**search) -> TuneSpec:
    s = dict(lr=1e-2, octaves=4.0, points=3, zoom_points=1, max_shifts=1, check_factors=(0.5, 2.0), max_rescans=1)
    s.update(search)
    return TuneSpec(train=TrainConfig(**TINY), data=DataConfig(max_tokens=200_000), search=SearchConfig(**s))


class _Interrupt(Exception):
    pass


def test_stages_are_sweeps_and_the_report_is_complete(tmp_path, tiny_data):
    spec = _spec()
    run = run_tune(spec, tmp_path)
    names = [sr.directory.name for sr in run.stages]
    assert names[0] == "1-scan" and all((tmp_path / STAGES / n / "summary.csv").is_file() for n in names)
    assert all(sr.stage.points and len(sr.outcomes) == len(sr.stage.points) for sr in run.stages)
    # every stage trains with micro-batch GNS on (B_precond for the regime, at no extra runs)
    assert spec.stage_train().gns.mode == "micro-batch" and spec.stage_train().micro_batch == 2
    assert run.stages[0].b_precond, "the first stage measured no B_precond"
    # the regime reads the statistic the summary's batch_regime label is made of
    first = list(csv.DictReader(open(run.stages[0].directory / "summary.csv")))
    regime = sorted(float(r["b_precond_regime"]) for r in first if r["b_precond_regime"])
    assert sorted(run.stages[0].b_precond) == pytest.approx(regime, rel=1e-6)
    assert run.regime is not None and run.regime.axis in ("elr", "lr")
    trained = [p.key for sr in run.stages for p in sr.stage.points]
    assert len(trained) == len(set(trained)), "a point was trained twice"
    # each outcome carries its final eval's bootstrap means, as logged, and the check pairs its extremes on them
    boots = {(r["run_id"], r["member"]): r["val_loss_boot"] for r in load_metrics(run.stages[0].directory)
             if r.get("val_loss_boot")}
    for o in run.stages[0].outcomes:
        row = next(r for r in first if float(r["lr"]) == pytest.approx(o.point.lr)
                   and float(r["wd"]) == pytest.approx(o.point.wd))
        logged = boots[(row["run_id"], int(row["member"]))]
        assert len(o.boot) == spec.train.eval_boot and list(o.boot) == pytest.approx(logged)
    check = run.result.invariant_check
    lo, hi = (min((o for o in check.outcomes if o.finite), key=lambda o: o.loss),
              max((o for o in check.outcomes if o.finite), key=lambda o: o.loss))
    assert check.threshold == pytest.approx(2 * statistics.stdev(a - b for a, b in zip(hi.boot, lo.boot)))
    paths = write_report(run, tmp_path)
    assert [p.name for p in paths] == [RESULT, CURVE_PNG, HEATMAP_PNG] and all(p.stat().st_size for p in paths)
    data = json.loads((tmp_path / RESULT).read_text())
    reco, best = data["recommendation"], data["best_member"]
    assert reco["elr"] == pytest.approx(reco["lr"] * reco["wd"])
    finite = [o["loss"] for s in data["stages"] for o in s["outcomes"] if o["loss"] is not None]
    assert best["val_loss"] == min(finite)  # the best evaluated point, measured
    fit = run.result.fit
    if fit is not None:  # the fit's minimum, with the loss it predicts there
        assert reco["source"] == "fit" and (reco["lr"], reco["wd"]) == pytest.approx(fit.point(run.result.axis))
        assert reco["val_loss"] == fit.loss and reco["val_loss_se"] == fit.se > 0
    else:
        assert reco == {**best, "source": "member"}
    assert data["cost"]["member_steps"] == sum(s["member_steps"] for s in data["stages"])
    assert data["cost"]["member_steps"] == sum(len(s["points"]) for s in data["stages"]) * TINY["steps"]
    assert data["cost"]["grid_points"] >= 3 and data["regime"]["reason"]
    assert "recommended: lr=" in format_summary(run) and "cost:" in format_summary(run)
    if run.result.fit is not None:  # the line the fit lies on is named (it need not hold the recommendation)
        held = "lr" if run.result.axis == "elr" else "wd"
        assert f"at {held}={run.result.fit.fixed:.4g}: minimum at" in format_summary(run)
    assert [s["name"] for s in data["stages"]] == names  # as on disk: unique, "lr-1-scan" beside "1-scan"
    # each stage's legend entry says what its line holds fixed (stages of one panel may lie on different lines);
    # a panel's legend stands under it, a legend of its subfigure
    labels = [t.get_text() for leg in build_curve_figure(run).findobj(Legend) for t in leg.texts]
    for sr in run.stages:
        if any(o.finite for o in sr.outcomes):
            held = "wd" if sr.axis == "lr" else "lr"
            if sr.stage.kind == "check":  # drawn along the axis it varies: wd at one lr, lr at one ELR
                held = "lr" if sr.axis == "lr" else "ELR"
            assert any(t.startswith(f"{sr.directory.name} ({sr.stage.kind}, {held}") for t in labels), labels
    if run.result.fit is not None:
        assert any(t.startswith("quadratic fit in log2 (") for t in labels)
    if run.result.axis == "lr":  # the lr panel shows the ELR scan's member it read on its line (the centre)
        labels = [t.get_text() for leg in build_curve_figure(run).findobj(Legend) for t in leg.texts]
        assert "on these lines, from other stages (read, not retrained)" in labels
    # the title speaks of dotted lines only when a member diverged (it always did)
    assert all(o.finite for sr in run.stages for o in sr.outcomes)
    assert build_curve_figure(run).get_suptitle() == "trajinv tune"
    first = run.stages[0]
    lost = replace(first, outcomes=(replace(first.outcomes[0], loss=None), *first.outcomes[1:]))
    assert build_curve_figure(replace(run, stages=(lost, *run.stages[1:]))).get_suptitle() == (
        "trajinv tune (dotted lines: diverged members)")


def test_a_budget_that_keeps_the_search_on_elr_says_so_in_the_regime_line(tmp_path, tiny_data):
    # first scan 3 x 10 member-steps; 10 left is below the lr scan's 2 new members (20): the ELR search goes on
    run = run_tune(_spec(zoom_points=0, max_rescans=0, budget=40), tmp_path)
    assert run.regime.axis == "lr" and run.result.axis == "elr"
    text = format_summary(run)
    assert "regime: lr (" in text and "tuned along ELR all the same" in text and "regime: tune along" not in text
    assert any("below the lr scan's new members (20 member-steps)" in n and "raise --budget" in n for n in run.notes)


@pytest.mark.parametrize("batch, given, micro", [("32", 0, 8), ("6", 0, 2), ("7", 0, 1), ("2", 0, 1),
                                                  ("48@0.1,256", 0, 16), ("12@0.5,16", 0, 4), ("48@0.1,256", 12, 16),
                                                  ("48@0.1,256", 8, 8), ("8@0.5,16", 4, 4)])
def test_the_stages_micro_batch_divides_every_batch_of_a_schedule(batch, given, micro):
    spec = _spec()
    spec = replace(spec, train=replace(spec.train, batch_size=batch, micro_batch=given))
    used = spec.stage_train()
    assert used.micro_batch == micro
    used.validate()  # every batch of the schedule splits into >= 2 equal micro-batches


def test_a_batch_of_one_cannot_measure_micro_batch_gns():
    spec = _spec()
    with pytest.raises(ValueError, match="batches of two or more sequences, got batch size 1"):
        replace(spec, train=replace(spec.train, batch_size="1")).stage_train()


def test_the_lr_search_needs_a_budget_for_its_new_members_only(tmp_path, tiny_data):
    # first scan 3 x 10 member-steps; the lr scan's 3 points hold the first scan's best member, read back, so
    # 20 left trains the other 2 (it used to ask for all 30 and keep the search on ELR)
    run = run_tune(_spec(zoom_points=0, max_rescans=0, budget=50), tmp_path)
    assert run.regime.axis == "lr" and run.result.axis == "lr"
    assert [sr.directory.name for sr in run.stages] == ["1-scan", "lr-1-scan"]
    assert len(run.stages[1].stage.points) == 2 and sum(sr.member_steps for sr in run.stages) == 50
    assert not any("raise --budget" in n for n in run.notes)
    # the budget's notes name the lr search's stages as on disk
    assert any(n.startswith("budget: lr-2-") for n in run.result.notes), run.result.notes


def test_resume_after_an_interruption_gives_identical_results(tmp_path, tiny_data):
    spec = _spec()
    whole = to_json(run_tune(spec, tmp_path / "whole"))
    events = {"n": 0}

    def interrupt(kind, **info):  # Ctrl-C in the middle of the second stage
        if kind == "advance":
            events["n"] += 1
            if events["n"] == TINY["steps"] * 1 + 4:
                raise _Interrupt

    with pytest.raises(_Interrupt):
        run_tune(spec, tmp_path / "cut", progress=interrupt)
    # what a kill during the report's writes leaves (pid 999999999 runs nowhere): the rerun removes it
    stale = [tmp_path / "cut" / f".{name}.999999999.abcdefgh.tmp" for name in ("tune.json", "tune.png")]
    for path in stale:
        path.write_text("{")
    resumed = to_json(run_tune(spec, tmp_path / "cut"))
    assert not any(path.exists() for path in stale)
    for d in (whole, resumed):
        d.pop("spec")
        for s in d["stages"]:
            s.pop("directory")
    assert resumed == whole


def test_a_directory_of_another_tune_is_refused(tmp_path, tiny_data):
    run_tune(_spec(zoom_points=0, check_factors=(2.0,), max_rescans=0), tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"another spec \(search.lr \(0.01 there, 0.02 here\)\)"):
        run_tune(_spec(zoom_points=0, check_factors=(2.0,), max_rescans=0, lr=2e-2), tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # what does not change a run's numbers may change between a tune and its rerun (it reads the stages back)
    spec = _spec(zoom_points=0, check_factors=(2.0,), max_rescans=0)
    again = run_tune(replace(spec, train=replace(spec.train, keep_checkpoints=5)), tmp_path)
    assert [sr.directory.name for sr in again.stages] and all(sr.outcomes for sr in again.stages)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_cli_tune_rejects_a_budget_below_the_first_scan(tmp_path):
    args = ["tune", "--steps", "6", "--eval-every", "3", "--eval-seqs", "8", "--log-every", "3", "--batch-size", "8",
            "--points", "3", "--octaves", "4", "--zoom-points", "0", "--check-factor", "2", "--max-rescans", "0",
            "--warmup", "1", "--out", str(tmp_path / "t")]
    res = CliRunner().invoke(cli.main, args + ["--budget", "10"])
    assert res.exit_code == 1 and "budget of 10 member-steps" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "t").exists()


def test_scale_out_options_reach_every_stage(tmp_path, monkeypatch):
    """--devices / --ray are handed to each stage's sweep (they change where it trains, not what)."""
    import trajinv.tune.runner as runner

    seen = []
    real = runner.run_sweep

    def spy(spec, out, progress=None, **scale):
        seen.append(scale)
        return real(spec, out, progress=progress)

    monkeypatch.setattr(runner, "run_sweep", spy)
    run_tune(_spec(zoom_points=0, check_factors=(2.0,), max_rescans=0), tmp_path, devices="cpu,cpu")
    assert seen and all(s == {"devices": "cpu,cpu"} for s in seen)


def test_cli_tune_zoom_width_reaches_the_search_and_a_bad_one_is_one_line(tmp_path, monkeypatch):
    import trajinv.tune.runner as runner

    args = ["tune", "--steps", "6", "--eval-every", "3", "--eval-seqs", "8", "--log-every", "3", "--batch-size", "8",
            "--points", "4", "--octaves", "6", "--warmup", "1", "--out", str(tmp_path / "t")]
    res = CliRunner().invoke(cli.main, args + ["--zoom-width", "0"])
    assert res.exit_code == 1 and "zoom_width must be positive and finite, got 0.0" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "t").exists()

    seen = []

    def stop(spec, out, **kw):
        seen.append(spec.search)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(runner, "run_tune", stop)
    res = CliRunner().invoke(cli.main, args + ["--zoom-width", "0.3"])
    assert "stopped by the test" in res.output
    assert seen[0].zoom_width == 0.3 and seen[0].zoom_half_width == 0.3  # spacing 2: half of it is 1


def test_members_that_learned_nothing_count_as_diverged(tmp_path, tiny_data):
    # lr 300: losses blow up (finite ones far above ln 256) or turn NaN; none may be a recommendation
    # centre ELR 8: the first scan (ELR 2, 8, 32) is all lr*wd >= 1, untrainable; its shift trains
    run = run_tune(_spec(lr=300.0, center=8.0, zoom_points=0, max_rescans=0), tmp_path)
    assert run.result.best is None and run.result.fit is None
    assert all(not o.finite for sr in run.stages for o in sr.outcomes)
    assert any("lower --lr" in n for n in run.notes)
    assert format_summary(run).startswith("no recommendation")
    rows = [r for sr in run.stages if (sr.directory / "summary.csv").is_file()  # not when none was trainable
            for r in csv.DictReader(open(sr.directory / "summary.csv"))]
    assert any(r["status"] == "done" for r in rows), "no member ended finite: the case is not exercised"
    assert any(not (sr.directory / "summary.csv").is_file() for sr in run.stages), "no stage was all untrainable"
    # a diverged member is charged its whole run (masked in its population, it kept computing), an
    # untrainable one nothing
    for sr in run.stages:
        trained = len(list(csv.DictReader(open(sr.directory / "summary.csv")))) if sr.directory.exists() else 0
        assert sr.member_steps == trained * TINY["steps"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a panel with nothing to label draws no legend (matplotlib warned)
        write_report(run, tmp_path)
    listed = [s["directory"] for s in json.loads((tmp_path / "tune.json").read_text())["stages"]]
    # a stage that trained nothing has no directory (tune.json named one that was never made)
    assert [d is not None and (tmp_path / d).is_dir() for d in listed] == [sr.member_steps > 0 for sr in run.stages]
    assert None in listed
    with pytest.raises(ValueError, match="no recommendation"):  # not a missing stage summary
        load_budget(tmp_path)


def test_points_whose_decay_would_flip_the_weights_count_as_diverged_untrained(tmp_path, tiny_data):
    # the trainer refuses lr*wd >= 1 (decay would zero or flip the weights each step); a scan reaching
    # ELR 1 gets that point as diverged, untrained, instead of the whole stage failing
    run = run_tune(_spec(lr=0.05, center=0.5, octaves=2.0, points=3, zoom_points=0, max_shifts=0, max_rescans=0),
                   tmp_path)
    first = run.stages[0]
    doomed = [o for o in first.outcomes if o.point.lr * o.point.wd >= 1]
    assert len(doomed) == 1 and doomed[0].loss is None
    rows = list(csv.DictReader(open(first.directory / "summary.csv")))
    assert len(rows) == len(first.stage.points) - 1 and first.member_steps == len(rows) * TINY["steps"]
    assert any("not trained: their decay per step (lr*wd) is >= 1" in n for n in run.notes)


def test_an_lr_search_after_a_scan_that_all_diverged_runs_at_the_scans_middle_wd():
    from trajinv.tune.runner import lr_search
    from trajinv.tune.search import Outcome, Point

    first = [Outcome(Point(1e-2, wd), None) for wd in (0.05, 0.1, 0.2)]  # nothing finite to pick the wd by
    search = lr_search(_spec(), first, spent=30)
    assert search.cfg.axis == "lr" and search.cfg.wd == 0.1  # the point the regime read, not SearchConfig.wd (1)
    # and the regime says so: its steps*lr*wd is of a point that trained nothing
    from trajinv.tune.runner import first_regime

    reason = first_regime(_spec(), first, []).reason
    assert reason.startswith("every member of the first scan diverged, so read at its middle point (lr=0.01, wd=0.1)")
    assert not first_regime(_spec(), first[:1] + [Outcome(Point(1e-2, 0.1), 3.0)], []).reason.startswith("every")


def test_the_regime_of_a_schedule_reads_its_small_phase():
    from trajinv.tune.runner import first_regime
    from trajinv.tune.search import Outcome, Point

    spec = _spec()
    spec = replace(spec, train=replace(spec.train, batch_size="4@0.5,8", steps=2000))
    regime = first_regime(spec, [Outcome(Point(1e-2, 0.1), 3.0)], [6.0])
    assert regime.small_batch and regime.batch_schedule is None and "batch 4 (the schedule's smallest)" in regime.reason


def test_a_check_with_one_finite_member_is_reported_as_not_confirmed():
    from pathlib import Path

    from trajinv.tune.runner import StageRun, TuneRun
    from trajinv.tune.search import Outcome, simulate

    def oracle(p):  # every check member diverges: the checked point alone is finite on its line
        return Outcome(p, 3.0 + 0.1 * (p.elr - 0.01) ** 2 if p.lr == 1e-2 else None)
    spec = _spec()
    result = simulate(replace(spec.search_config(), zoom_points=0), oracle)
    stages = [StageRun(st, "elr", Path(st.name), outs, [], 10 * len(outs), 0) for st, outs in result.stages]
    text = format_summary(TuneRun(spec, result, None, stages))
    assert "check (3 members): spread 0.0000" in text and "not confirmed" in text and "beyond noise" not in text


def test_a_micro_batch_that_splits_a_large_batch_finely_is_named_in_a_note():
    from trajinv.tune.runner import _stage_overrides

    spec = _spec()
    slow = replace(spec, train=replace(spec.train, batch_size="7@0.1,56"))  # gcd 7: micro-batch 1, 56 per step
    assert any("batch 56 runs as 56 of them per step" in n for n in _stage_overrides(slow))
    assert not any("per step" in n for n in _stage_overrides(spec))


def test_a_stage_planned_otherwise_by_an_earlier_version_is_named_as_such(tmp_path, tiny_data):
    spec = _spec(zoom_points=0, check_factors=(2.0,), max_rescans=0)
    run = run_tune(spec, tmp_path)
    first = run.stages[0].directory / "spec.json"
    theirs = json.loads(first.read_text())
    theirs["points"][0][1] *= 2  # as if an earlier search had put its first member elsewhere
    first.write_text(json.dumps(theirs))
    with pytest.raises(ValueError, match="stage 1-scan on disk holds other members than this tune plans") as e:
        run_tune(spec, tmp_path)
    assert "earlier trajinv" in str(e.value) and "\n" not in str(e.value)


def test_gns_options_the_stages_replace_are_named_in_notes():
    from trajinv.gns import GNSConfig
    from trajinv.tune.runner import _stage_overrides

    spec = _spec()
    assert _stage_overrides(spec) == []  # nothing given, nothing replaced
    given = replace(spec, train=replace(spec.train, gns=GNSConfig(mode="per-example"), micro_batch=3))
    notes = _stage_overrides(given)
    assert notes[0].startswith("--gns per-example replaced by micro-batch")
    assert notes[1].startswith("--micro-batch 3 does not split every batch of 8") and notes[1].endswith("the stages use 2")


def test_population_may_change_between_a_tune_and_its_rerun(tmp_path, tiny_data):
    # after a stage ran out of memory the rerun needs a smaller --population; it was "another spec"
    spec = _spec(zoom_points=0, check_factors=(2.0,), max_rescans=0)
    first = to_json(run_tune(spec, tmp_path))
    again = to_json(run_tune(replace(spec, population=1), tmp_path))  # trained stages keep their grouping
    assert json.loads((tmp_path / "tune_spec.json").read_text())["population"] == 1
    assert [p.name for p in (tmp_path / STAGES / "1-scan" / "runs").iterdir()] == ["bs8"]  # not retrained
    for d in (first, again):
        d.pop("spec")
    assert again == first


def test_a_tune_whose_population_ran_out_of_memory_reruns_with_a_smaller_one(tmp_path, tiny_data, monkeypatch):
    # bs8-p0 (2 members) trains, bs8-p1 runs out of memory: the stage kept its split on rerun, so the error's
    # advice (a smaller --population) could not be followed
    from trajinv.train import DeviceOutOfMemory, Trainer

    forward = Trainer._forward_backward

    def too_many(self, step, bs):
        if self.run_id == "bs8-p1" and self.K > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB. GPU 0 has ...")
        return forward(self, step, bs)

    monkeypatch.setattr(Trainer, "_forward_backward", too_many)
    spec = replace(_spec(points=4, zoom_points=0, check_factors=(2.0,), max_rescans=0), population=2)
    with pytest.raises(DeviceOutOfMemory, match="^bs8-p1: 2 members ran out"):
        run_tune(spec, tmp_path)
    scan = tmp_path / STAGES / "1-scan"
    kept = (scan / "runs/bs8-p0/checkpoint-00000010.json").read_bytes()
    run = run_tune(replace(spec, population=1), tmp_path)
    assert (scan / "runs/bs8-p0/checkpoint-00000010.json").read_bytes() == kept  # not retrained
    assert sorted(p.name for p in (scan / "runs").iterdir()) == ["bs8-p0", "bs8-p1", "bs8-p2"]
    assert len(run.stages[0].outcomes) == 4 and all(o.finite for o in run.stages[0].outcomes)


def test_a_stage_reads_back_a_point_whose_stored_digits_round_to_another_key(tmp_path):
    # The sweep keeps 12 significant digits; this zoom member's log2 lr sits 1e-12 from a 9th-decimal
    # rounding boundary, so its stored lr has another Point.key: the stage was never readable again.
    from trajinv.config import sweep_pairs
    from trajinv.tune.runner import _outcomes
    from trajinv.tune.search import Point, Stage

    p, other = Point(0.016121090846427273, 0.25), Point(0.0161210908, 0.25)  # `other`: 1e-11 off, its own point
    ((lr, wd),) = sweep_pairs(points=[(p.lr, p.wd)])
    assert Point(lr, wd).key != p.key  # the trap itself
    rows = [{"lr": lr, "wd": wd, "run_id": "bs8-p0", "member": 0, "status": "done", "final_val_loss": 2.5},
            {"lr": other.lr, "wd": other.wd, "run_id": "bs8-p0", "member": 1, "status": "done", "final_val_loss": 2.9}]
    outcomes, _ = _outcomes(Stage("5-zoom", "zoom", (p, other)), rows, tmp_path, chance=10.0)
    assert [o.loss for o in outcomes] == [2.5, 2.9]


def test_a_directory_replays_by_the_search_rules_it_was_made_with(tmp_path, tiny_data, monkeypatch):
    # tune_spec.json records the search version; one without it predates versions (1): the zoom of a
    # standing check moved in version 2, and such a directory must resume to the stages it holds
    import trajinv.tune.runner as runner
    from trajinv.tune.search import SEARCH_VERSION

    seen = []
    real = runner.Search
    # (the preflight's Search, which only plans the first scan, takes the default: not recorded)
    monkeypatch.setattr(runner, "Search", lambda *a, **k: ("version" in k and seen.append(k["version"])) or real(*a, **k))
    spec = _spec(zoom_points=0, max_rescans=0)
    first = run_tune(spec, tmp_path)
    stored = json.loads((tmp_path / "tune_spec.json").read_text())
    assert stored["search_version"] == SEARCH_VERSION == 4 and set(seen) == {4}
    # version 3 recommended the best member: a directory it made replays to that, on the same stages
    (tmp_path / "tune_spec.json").write_text(json.dumps({**stored, "search_version": 3}))
    seen.clear()
    v3 = run_tune(spec, tmp_path)
    reco = v3.result.recommendation
    assert set(seen) == {3} and v3.result.best == first.result.best
    assert reco.source == "member" and (reco.lr, reco.wd, reco.loss) == (v3.result.best.lr, v3.result.best.wd,
                                                                         v3.result.loss)
    del stored["search_version"]  # as trajinv wrote it before search versions
    (tmp_path / "tune_spec.json").write_text(json.dumps(stored))
    seen.clear()
    again = run_tune(spec, tmp_path)
    assert set(seen) == {1} and again.result.best == first.result.best
    assert "search_version" not in json.loads((tmp_path / "tune_spec.json").read_text())  # left as it was
    # a newer trajinv's, or not a version: refused before anything moves
    for future in (SEARCH_VERSION + 1, "2", True, None):
        (tmp_path / "tune_spec.json").write_text(json.dumps({**stored, "search_version": future}))
        with pytest.raises(ValueError, match=f"says search version {future!r}, which this trajinv does not know"):
            run_tune(spec, tmp_path)


@pytest.mark.parametrize("columns, read", [(("5", "7", "3"), [3.0]), (("5", "7", ""), []), (("5", "7"), [7.0]),
                                           (("5",), [5.0])])
def test_the_regime_reads_the_summarys_regime_statistic_then_older_columns(tmp_path, columns, read):
    # b_precond_regime (read before an annealing lr's tail; empty: no finite reading, which the inflated
    # end-of-run value must not stand in for); a summary written before that column has the robust statistic
    # at the run's end, an older one only the smoothed b_precond
    from trajinv.tune.runner import _outcomes
    from trajinv.tune.search import Point, Stage

    row = dict(zip(("b_precond", "b_precond_robust", "b_precond_regime"), columns),
               run_id="bs8", member="0", lr="0.01", wd="0.5", final_val_loss="2.0", status="done")
    outcomes, b = _outcomes(Stage("1-scan", "scan", (Point(0.01, 0.5),)), [row], tmp_path, chance=5.0)
    assert outcomes[0].loss == 2.0 and b == read
