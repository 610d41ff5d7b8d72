"""Invariance analysis on synthetic curves whose overlap structure is known."""

import json
import math

import numpy as np
import pytest

from trajinv.analysis.invariance import analyze_sweep, invariance_report, iso_elr_groups, iso_lr_groups, transition_step
from trajinv.analysis.spreads import NOISE_Z
from trajinv.analysis.records import curves, load_metrics, load_summary

LRS = (2e-3, 4e-3, 8e-3)
WDS = (0.05, 0.1, 0.2)


def f(x):  # early: a function of lr * step only
    return 2.0 + 3.0 * math.exp(-x)


def g(y):  # late: a function of lr * wd * step only
    return 1.5 + math.exp(-y)


def blended(lr, wd, s):
    """f(lr*s) fading into g(lr*wd*s) on the 1/(lr*wd) time scale."""
    a = math.exp(-lr * wd * s)
    return a * f(lr * s) + (1 - a) * g(lr * wd * s)


def switched(lr, wd, s, t=300):
    """Exactly LR-invariant before step t, exactly ELR-invariant from t on."""
    return f(lr * s) if s < t else g(lr * wd * s)


def make_records(loss, lrs=LRS, wds=WDS, steps=range(0, 1001, 50), bs=32, run_id="r0"):
    recs, m = [], 0
    for lr in lrs:
        for wd in wds:
            for s in steps:
                v = loss(lr, wd, s)
                recs.append({"run_id": run_id, "member": m, "name": f"lr={lr:g},wd={wd:g}", "step": s,
                             "tokens": s * bs * 64, "lr": lr, "base_lr": lr, "wd": wd, "elr": lr * wd,
                             "batch_size": bs, "train_loss": v, "val_loss": v})
            m += 1
    return recs


def group_spreads(loss, step, kind, lrs=LRS, wds=WDS):
    """Hand computation of the mean spread, independent of the module's grouping."""
    members = [(lr, wd) for lr in lrs for wd in wds]
    if kind == "LR":
        groups = [[m for m in members if m[0] == lr] for lr in lrs]
    else:
        elrs = sorted({round(lr * wd, 12) for lr, wd in members})
        groups = [[m for m in members if round(m[0] * m[1], 12) == e] for e in elrs]
        groups = [grp for grp in groups if len({lr for lr, _ in grp}) >= 2]
    spreads = [max(loss(*m, step) for m in grp) - min(loss(*m, step) for m in grp) for grp in groups]
    return float(np.mean(spreads)), len(groups)


def test_switched_curves_give_exact_spreads_verdicts_and_transition():
    rep = invariance_report(make_records(switched))
    assert (rep.early_step, rep.late_step) == (100, 1000)  # 10% of the last common step
    assert rep.iso_lr_early == 0.0 and rep.iso_elr_late == 0.0
    want_elr_early, n_elr = group_spreads(switched, 100, "ELR")
    want_lr_late, n_lr = group_spreads(switched, 1000, "LR")
    assert (n_lr, n_elr) == (3, 3)
    assert rep.iso_elr_early == pytest.approx(want_elr_early, rel=1e-12)
    assert rep.iso_lr_late == pytest.approx(want_lr_late, rel=1e-12)
    assert (rep.verdict_early, rep.verdict_late) == ("LR", "ELR")
    assert rep.transition_step == 300
    lo, hi = rep.transition_elr_steps
    assert lo == pytest.approx(2e-3 * 0.05 * 300) and hi == pytest.approx(8e-3 * 0.2 * 300)
    assert rep.diverged == ()


def test_blended_curves_lr_early_elr_late():
    recs = make_records(blended, steps=range(0, 5001, 100))
    rep = invariance_report(recs)
    assert (rep.early_step, rep.late_step) == (500, 5000)
    assert (rep.verdict_early, rep.verdict_late) == ("LR", "ELR")
    for step, lr_s, elr_s in ((500, rep.iso_lr_early, rep.iso_elr_early), (5000, rep.iso_lr_late, rep.iso_elr_late)):
        assert lr_s == pytest.approx(group_spreads(blended, step, "LR")[0], rel=1e-9)
        assert elr_s == pytest.approx(group_spreads(blended, step, "ELR")[0], rel=1e-9, abs=1e-12)
    t = rep.transition_step
    assert t is not None and 500 < t < 5000
    # From t on the ELR spread stays below the LR spread, just before it does not.
    lr_g, elr_g = {s: group_spreads(blended, s, "LR")[0] for s in (t - 100, t)}, \
        {s: group_spreads(blended, s, "ELR")[0] for s in (t - 100, t)}
    assert elr_g[t] < lr_g[t] and elr_g[t - 100] >= lr_g[t - 100]
    assert transition_step(recs) == t


def test_hand_computed_table_and_diverged_member_excluded():
    table = {  # (lr, wd): (loss at step 10, loss at step 100)
        (0.01, 1.0): (3.00, 2.00), (0.01, 2.0): (3.10, 1.80),
        (0.02, 0.5): (2.50, 2.05), (0.02, 1.0): (2.60, 1.78),
    }
    recs = []
    for m, ((lr, wd), vals) in enumerate(table.items()):
        for s, v in zip((10, 100), vals):
            recs.append({"run_id": "a", "member": m, "step": s, "base_lr": lr, "wd": wd, "elr": lr * wd,
                         "batch_size": 8, "train_loss": v, "val_loss": v})
    # A diverged fifth member in the lr=0.01 group: far off at step 10, NaN later.
    recs += [{"run_id": "a", "member": 4, "name": "blowup", "step": 10, "base_lr": 0.01, "wd": 4.0,
              "batch_size": 8, "train_loss": 9.0, "val_loss": 9.0},
             {"run_id": "a", "member": 4, "name": "blowup", "step": 100, "base_lr": 0.01, "wd": 4.0,
              "batch_size": 8, "train_loss": float("nan"), "val_loss": None}]
    rep = invariance_report(recs, early_step=10, late_step=100)
    assert rep.iso_lr_early == pytest.approx(0.10)  # mean(|3.0-3.1|, |2.5-2.6|)
    assert rep.iso_elr_early == pytest.approx(0.50)  # mean(|3.0-2.5|, |3.1-2.6|)
    assert rep.iso_lr_late == pytest.approx((0.20 + 0.27) / 2)
    assert rep.iso_elr_late == pytest.approx((0.05 + 0.02) / 2)
    assert (rep.verdict_early, rep.verdict_late) == ("LR", "ELR")
    assert rep.diverged == ("blowup",)
    assert all("blowup" not in g.members for g in rep.groups)
    assert rep.transition_step == 100
    text = rep.format(details=True)
    assert "blowup" in text and "early (step 10)" in text and "late (step 100)" in text
    assert len(text.splitlines()) <= 12
    json.dumps(rep.to_dict())


def test_identical_curves_are_a_tie_not_a_transition():
    recs = make_records(lambda lr, wd, s: f(s / 100))
    rep = invariance_report(recs)
    assert (rep.verdict_early, rep.verdict_late) == ("tie", "tie")
    assert rep.iso_lr_late == 0.0 and rep.transition_step is None


def test_no_transition_when_curves_only_depend_on_lr():
    recs = make_records(lambda lr, wd, s: f(lr * s))
    assert transition_step(recs) is None
    rep = invariance_report(recs)
    assert rep.verdict_late == "LR" and rep.transition_step is None
    assert f"LR -> ELR transition: not observed up to the late step ({rep.late_step})" in rep.format()


def test_a_transition_with_one_kind_of_group_is_not_measurable_rather_than_unobserved():
    # a tune's ELR scan (one lr, wd varied) has iso-LR groups only: "not observed" read as a finding
    rep = invariance_report(make_records(lambda lr, wd, s: f(lr * s), lrs=LRS[:1]))
    assert rep.transition_step is None and "not observed" not in rep.format()
    assert "LR -> ELR transition: not measurable: no iso-ELR group" in rep.format()


def test_grouping_tolerance_and_batch_sizes_kept_apart():
    assert 0.1 * 3.0 != 0.3 * 1.0  # floating point: 0.30000000000000004
    recs = make_records(switched, lrs=(0.1, 0.3), wds=(1.0, 3.0), steps=(0, 10))
    cs = curves(recs).values()
    (elr_group,) = iso_elr_groups(cs)
    assert elr_group.value == pytest.approx(0.3) and len(elr_group.members) == 2
    assert len(iso_lr_groups(cs)) == 2
    # Same lr, different wd, but different batch sizes: no group.
    mixed = make_records(switched, lrs=(0.1,), wds=(0.3,), bs=8, run_id="x") + \
        make_records(switched, lrs=(0.1,), wds=(1.0,), bs=64, run_id="y")
    assert iso_lr_groups(curves(mixed).values()) == []
    rep = invariance_report(mixed)
    assert rep.verdict_early == "n/a" and rep.transition_step is None


def test_curves_skip_nulls_and_interpolate():
    recs = make_records(switched, lrs=(0.01,), wds=(1.0,), steps=range(0, 101, 10))
    for r in recs:
        if r["step"] % 20:
            r["val_loss"] = None
    (c,) = curves(recs).values()
    assert list(c.steps) == [0, 20, 40, 60, 80, 100]
    assert c.at(30) == pytest.approx((c.at(20) + c.at(40)) / 2)
    assert math.isnan(c.at(101)) and not c.diverged


def test_running_member_sets_late_step():
    recs = make_records(switched)
    recs = [r for r in recs if not (r["member"] == 0 and r["step"] > 600)]
    rep = invariance_report(recs)
    assert (rep.early_step, rep.late_step) == (50, 600)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="-5"):
        invariance_report(make_records(switched), early_step=-5)
    with pytest.raises(ValueError, match="member 3 lacks wd"):
        curves([{"run_id": "r", "member": 3, "step": 1, "base_lr": 0.1, "val_loss": 2.0}])
    with pytest.raises(ValueError, match="no metric records"):
        curves([])


def _write_sweep(root, recs, status=None):
    by_run = {}
    for r in recs:
        by_run.setdefault(r["run_id"], []).append(r)
    for run_id, rs in by_run.items():
        d = root / "runs" / run_id
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    rows = ["run_id,member,name,lr,wd,elr,batch_size,steps,status"]
    seen = {}
    for r in recs:
        seen[(r["run_id"], r["member"])] = r
    for (run_id, m), r in seen.items():
        st = (status or {}).get(m, "done")
        rows.append(f"{run_id},{m},\"{r['name']}\",{r['lr']},{r['wd']},{r['elr']},{r['batch_size']},{r['step']},{st}")
    (root / "summary.csv").write_text("\n".join(rows) + "\n")


def test_sweep_dir_round_trip(tmp_path):
    recs = make_records(switched, run_id="0001")
    _write_sweep(tmp_path, recs, status={4: "diverged"})
    # A live run leaves a half-written last line: it is skipped, not an error.
    with (tmp_path / "runs" / "0001" / "metrics.jsonl").open("a") as fh:
        fh.write('{"run_id": "0001", "memb')
    loaded = load_metrics(tmp_path)
    assert len(loaded) == len(recs) and loaded[0] == recs[0]
    rows = load_summary(tmp_path)
    assert rows[0]["run_id"] == "0001" and rows[0]["member"] == 0 and rows[0]["lr"] == 2e-3
    rep = analyze_sweep(tmp_path)
    assert rep.diverged == (recs[4 * 21]["name"],)  # member 4, marked by the summary only
    assert (rep.verdict_early, rep.verdict_late) == ("LR", "ELR")


def test_missing_empty_and_malformed_sweep_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_metrics(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no metric records"):
        load_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="summary.csv"):
        load_summary(tmp_path)
    d = tmp_path / "runs" / "r"
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        load_metrics(tmp_path)


# ------------------------------------------------------------- batch-size schedules


def schedule_records(loss, schedule, run_id, lrs=(0.01, 0.02), wds=(0.5, 1.0, 2.0), steps=range(0, 1001, 50),
                     sizes=None, member0=0, context=64):
    """Records of one population; `sizes(step)` is the batch of a step (constant: int(schedule))."""
    sizes = sizes or (lambda s: int(schedule))
    recs, m = [], member0
    for lr in lrs:
        for wd in wds:
            tokens = 0
            for s in range(max(steps) + 1):
                if s in steps:
                    v = loss(lr, wd, s)
                    recs.append({"run_id": run_id, "member": m, "name": f"lr={lr:g},wd={wd:g}", "step": s,
                                 "tokens": tokens, "lr": lr, "base_lr": lr, "wd": wd, "elr": lr * wd,
                                 "batch_size": sizes(s), "batch_schedule": schedule, "train_loss": v, "val_loss": v})
                tokens += sizes(s) * context
            m += 1
    return recs


def test_populations_of_different_schedules_are_never_grouped_together():
    """The issue's case: a '32@0.1,256' population beside a constant-32 one. Both start at batch 32,
    so grouping by the first batch size put them in one iso-LR group, whose spread was then the gap
    between the runs (0.51 here), though each run alone is exactly LR-invariant."""
    lr_only = lambda lr, wd, s: f(lr * s)  # noqa: E731
    const = schedule_records(lr_only, "32", "bs32")
    sched = schedule_records(lambda lr, wd, s: lr_only(lr, wd, s) + 0.51, "32@0.1,256", "bs32at0.1-256",
                             sizes=lambda s: 32 if s < 100 else 256)
    recs = const + sched
    # Today's grouping, by hand: by base lr within the first logged batch size (32 for everyone).
    late = {}
    for r in recs:
        if r["step"] == 1000:
            late.setdefault(r["base_lr"], []).append(r["val_loss"])
    assert np.mean([max(v) - min(v) for v in late.values()]) == pytest.approx(0.51)
    rep = invariance_report(recs)
    assert rep.iso_lr_early == 0.0 and rep.iso_lr_late == 0.0 and rep.verdict_late == "LR"
    lr_groups = [g for g in rep.groups if g.kind == "LR"]
    assert len(lr_groups) == 4 and {g.batch_schedule for g in lr_groups} == {"32", "32@0.1,256"}
    assert all(len(g.members) == 3 for g in lr_groups)
    assert "B=32@0.1,256" in rep.format(details=True)
    # Records written before batch_schedule was logged: the batch sizes seen tell the runs apart.
    legacy = [{k: v for k, v in r.items() if k != "batch_schedule"} for r in recs]
    assert {c.batch_schedule for c in curves(legacy).values()} == {"32", "32,256"}
    assert invariance_report(legacy).iso_lr_late == 0.0


def test_one_schedule_split_over_populations_still_groups_together():
    recs = schedule_records(switched, "32", "bs32-p0", lrs=(2e-3,)) + \
        schedule_records(switched, "32", "bs32-p1", lrs=(4e-3, 8e-3), member0=0)
    groups = iso_elr_groups(curves(recs).values())
    assert any({c.run_id for c in g.members} == {"bs32-p0", "bs32-p1"} for g in groups)
    assert invariance_report(recs).transition_step == 300


def test_tokens_axis_reads_the_same_curves_at_tokens_trained():
    recs = schedule_records(switched, "32", "bs32", lrs=LRS, wds=WDS)
    by_step, by_tokens = invariance_report(recs), invariance_report(recs, x="tokens")
    per_step = 32 * 64
    assert (by_tokens.early_step, by_tokens.late_step) == (100 * per_step, 1000 * per_step)
    assert by_tokens.transition_step == 300 * per_step and by_tokens.x == "tokens"
    assert by_tokens.transition_elr_steps == pytest.approx(by_step.transition_elr_steps)  # still lr*wd*step
    for k in ("iso_lr_early", "iso_elr_early", "iso_lr_late", "iso_elr_late"):
        assert getattr(by_tokens, k) == pytest.approx(getattr(by_step, k), abs=1e-15), k
    assert f"early (tokens {100 * per_step})" in by_tokens.format()
    with pytest.raises(ValueError, match="'epochs'"):
        invariance_report(recs, x="epochs")


def test_tokens_axis_compares_batch_sizes_at_equal_data():
    """Batch 32 for 1000 steps and batch 64 for 500 steps train the same tokens: on the step axis
    the late point is where the batch-64 run ends, halfway through the batch-32 run; on the
    tokens axis it is the end of both."""
    small = schedule_records(switched, "32", "bs32")
    large = schedule_records(switched, "64", "bs64", steps=range(0, 501, 25))
    rep_step, rep_tok = invariance_report(small + large), invariance_report(small + large, x="tokens")
    assert rep_step.late_step == 500
    assert rep_tok.late_step == 1000 * 32 * 64
    assert {g.batch_schedule for g in rep_tok.groups} == {"32", "64"}
    g32 = next(g for g in rep_tok.groups if g.kind == "LR" and g.batch_schedule == "32" and g.value == 0.01)
    want = max(switched(0.01, wd, 1000) for wd in (0.5, 1, 2)) - min(switched(0.01, wd, 1000) for wd in (0.5, 1, 2))
    assert g32.late == pytest.approx(want)


# ------------------------------------------------------------------ noise


def noisy_records(means, n=512, sigma=0.05, steps=(100, 1000), seed=0, boot=64):
    """Records whose val_loss is the mean of per-window losses mu + window difficulty + member noise,
    with val_loss_boot as the trainer logs it (the same resamples for every member)."""
    from trajinv.data import boot_means, window_resamples

    rng = np.random.default_rng(seed)
    counts = window_resamples(n, boot)
    recs, noise = [], {}
    for s in steps:
        shared = rng.normal(0.0, 0.4, size=n)
        for m, ((lr, wd), mu) in enumerate(means.items()):
            eps = rng.normal(0.0, sigma, size=n)
            noise[m, s] = eps
            w = mu(s) + shared + eps
            recs.append({"run_id": "r", "member": m, "name": f"lr={lr:g},wd={wd:g}", "step": s, "tokens": s * 2048,
                         "base_lr": lr, "wd": wd, "elr": lr * wd, "batch_size": 32, "batch_schedule": "32",
                         "train_loss": float(w.mean()), "val_loss": float(w.mean()),
                         "val_loss_boot": [round(float(v), 6) for v in boot_means(w[None], counts)[0]]})
    return recs, noise


def test_spread_standard_errors_and_within_noise_flags():
    # lr=0.01: wd 1 vs 2 differ by 0.1 (far beyond noise); lr=0.02: wd 0.5 vs 1 by 0.0005 (within it).
    means = {(0.01, 1.0): lambda s: 3.0, (0.01, 2.0): lambda s: 3.1,
             (0.02, 0.5): lambda s: 3.0, (0.02, 1.0): lambda s: 3.0005}
    recs, noise = noisy_records(means)
    rep = invariance_report(recs, early_step=100, late_step=1000)
    far, close = (next(g for g in rep.groups if g.kind == "LR" and g.value == lr) for lr in (0.01, 0.02))
    analytic = np.std(noise[1, 1000] - noise[0, 1000], ddof=1) / np.sqrt(512)  # SE of a paired mean gap
    assert far.late_se == pytest.approx(analytic, rel=0.3)
    assert far.late_within_noise is False and close.late_within_noise is True
    assert close.late < NOISE_Z * analytic
    # The shared window difficulty (0.4 / sqrt(512) = 0.018 per member) cancels in every spread.
    assert rep.iso_lr_late_se < 0.005
    assert far.late_octave == pytest.approx(far.late, rel=1e-12)  # two members one octave apart
    text = rep.format(details=True)
    assert " ± " in text and "~" in text and "within noise" in text
    d = rep.to_dict()
    assert d["iso_lr_late_se"] == rep.iso_lr_late_se and d["groups"][0]["late_se"] == rep.groups[0].late_se
    json.dumps(d)


def test_an_lr_vs_elr_difference_within_noise_is_flagged():
    # iso-LR group lr=0.01 (3.0 vs 3.02) and iso-ELR group elr=0.02 (3.02 vs 3.0401): gaps 0.02 and
    # 0.0201 differ by far less than their noise, so the verdict rests on noise.
    means = {(0.01, 1.0): lambda s: 3.0, (0.01, 2.0): lambda s: 3.02, (0.02, 1.0): lambda s: 3.0401}
    recs, _ = noisy_records(means)
    rep = invariance_report(recs, early_step=100, late_step=1000)
    assert rep.verdict_late in ("LR", "ELR") and rep.within_noise_late is True
    assert abs(rep.iso_lr_late - rep.iso_elr_late) <= NOISE_Z * rep.difference_late_se
    assert f"{rep.verdict_late} (within noise)" in rep.format()
    # A clear difference is not flagged.
    means[(0.02, 1.0)] = lambda s: 3.3
    rep = invariance_report(noisy_records(means)[0], early_step=100, late_step=1000)
    assert rep.verdict_late == "LR" and rep.within_noise_late is False and "within noise" not in rep.format()


def test_reports_without_resamples_have_no_uncertainty():
    rep = invariance_report(make_records(switched))
    assert math.isnan(rep.iso_lr_late_se) and rep.within_noise_late is None
    assert " ± " not in rep.format()
    late = {(lr, wd): switched(lr, wd, 1000) for lr in LRS for wd in WDS}  # wd 0.05, 0.1, 0.2: factor 2 apart
    octave = [np.mean([abs(late[lr, 0.1] - late[lr, 0.05]), abs(late[lr, 0.2] - late[lr, 0.1])]) for lr in LRS]
    assert rep.iso_lr_late_octave == pytest.approx(np.mean(octave))


def test_curves_carry_schedule_tokens_and_resamples():
    recs, _ = noisy_records({(0.01, 1.0): lambda s: 3.0}, steps=(100, 200), boot=8)
    recs.append({**recs[0], "step": 150, "val_loss": None, "val_loss_boot": None})  # a logged step without eval
    (c,) = curves(recs).values()
    assert c.batch_schedule == "32" and c.run_id == "r" and list(c.tokens) == [100 * 2048, 200 * 2048]
    assert c.boot.shape == (2, 8)
    mid = c.boot_at(150)
    assert mid == pytest.approx((c.boot[0] + c.boot[1]) / 2) and c.boot_at(250) is None
    assert list(c.boot_at(150 * 2048, x="tokens")) == list(mid) and c.step_at(150 * 2048, "tokens") == 150
    assert list(c.select(c.steps > 100).boot[0]) == list(c.boot[1])
    partial = [r if r["step"] == 100 else {**r, "val_loss_boot": None} for r in recs]
    assert next(iter(curves(partial).values())).boot is None  # resamples missing at a point: none at all


def test_a_member_that_ends_no_better_than_a_uniform_guess_is_diverged():
    # finite but far above ln V (an lr far too large): an outcome of nothing, excluded from the spreads
    from trajinv.analysis.records import curves

    recs = [{"run_id": "r", "member": m, "step": s, "base_lr": 1e-2, "wd": wd, "vocab_size": 256,
             "val_loss": v + s / 1000, "train_loss": v}
            for m, (wd, v) in enumerate([(0.5, 3.0), (1.0, 3.1), (2.0, 900.0)]) for s in (10, 20)]
    cs = curves(recs)
    assert [c.diverged for c in cs.values()] == [False, False, True]
    assert [c.diverged for c in curves([{k: v for k, v in r.items() if k != "vocab_size"} for r in recs]).values()] \
        == [False, False, False]  # without V nothing says 900 is absurd


def test_nothing_to_compare_says_why():
    from trajinv.analysis.invariance import default_steps
    from trajinv.analysis.records import curves

    recs = [{"run_id": "r", "member": m, "step": 5, "base_lr": 1e-2, "wd": 1.0 + m, "val_loss": None,
             "train_loss": 3.0} for m in range(2)]
    with pytest.raises(ValueError, match="no member has a logged value yet"):  # killed before its first eval
        default_steps(curves(recs).values())
    with pytest.raises(ValueError, match="every member diverged"):
        default_steps(curves([{**r, "status": "diverged"} for r in recs]).values())


def test_the_early_position_on_a_tokens_axis_is_one_every_member_has_reached():
    from trajinv.analysis.invariance import default_steps

    # batch 32 and batch 256 evaluated every 50 steps: the larger batch's first eval is 8x further in tokens,
    # so a position before it would hold only the small batch's groups
    recs = make_records(blended, bs=32, run_id="a") + make_records(blended, bs=256, run_id="b",
                                                                    steps=range(0, 151, 50))
    cs = curves(recs).values()
    early, late = default_steps(cs, x="tokens")
    first_large = 50 * 256 * 64
    assert early >= first_large and late == 1000 * 32 * 64  # the last position both reached
    assert default_steps(curves(make_records(blended)).values(), x="tokens")[0] < first_large  # one batch: as before


def _recs(table, boots=None, schedule="32", run_id="r"):
    """Records from {(lr, wd): {step: value}}; boots: {(lr, wd): {step: (B,) array}}."""
    recs = []
    for m, ((lr, wd), by_step) in enumerate(table.items()):
        for s, v in by_step.items():
            r = {"run_id": run_id, "member": m, "name": f"lr={lr:g},wd={wd:g}", "step": s,
                 "tokens": s * int(schedule) * 64, "base_lr": lr, "wd": wd, "elr": lr * wd,
                 "batch_size": int(schedule), "batch_schedule": schedule, "train_loss": v, "val_loss": v}
            if boots is not None:
                r["val_loss_boot"] = [float(x) for x in boots[lr, wd][s]]
            recs.append(r)
    return recs


def _grid(loss, steps, lrs=(2e-3, 4e-3, 8e-3), wds=(0.05, 0.1, 0.2)):
    return _recs({(lr, wd): {s: loss(lr, wd, s) for s in steps} for lr in lrs for wd in wds})


def _f(x):
    return 2.0 + 3.0 * math.exp(-x)


def _g(y):
    return 1.5 + math.exp(-y)


# ----------------------------------------------------------------- invariance.py


def test_early_step_tie_goes_to_the_earlier_step():
    # late 1000: 10% is 100, equally far from the logged steps 50 and 150
    rep = invariance_report(_grid(lambda lr, wd, s: _f(lr * s), steps=(0, 50, 150, 1000)))
    assert (rep.early_step, rep.late_step) == (50, 1000)


def test_transition_is_where_elr_stays_below_not_where_it_first_dips():
    def loss(lr, wd, s):  # ELR-invariant on [100, 200), LR-invariant on [200, 300), ELR-invariant from 300
        return _g(lr * wd * s) if 100 <= s < 200 or s >= 300 else _f(lr * s)

    recs = _grid(loss, steps=range(0, 501, 50))
    assert transition_step(recs) == 300
    assert invariance_report(recs).transition_step == 300


def test_a_group_with_one_value_at_a_position_drops_out_of_the_means():
    """Member (0.02, 1.0) stopped logging at step 50: at step 100 its groups have one value, no spread,
    and the kind's mean spread and its SE come from the other groups alone."""
    rng = np.random.default_rng(0)
    table = {(0.01, 1.0): {10: 3.0, 50: 2.5, 100: 2.0}, (0.01, 2.0): {10: 3.1, 50: 2.4, 100: 1.8},
             (0.02, 0.5): {10: 2.5, 50: 2.3, 100: 2.05}, (0.02, 1.0): {10: 2.6, 50: 2.2}}
    boots = {k: {s: v + rng.normal(0, 0.01, 8) for s, v in by.items()} for k, by in table.items()}
    rep = invariance_report(_recs(table, boots), early_step=10, late_step=100)
    lr_late = [g for g in rep.groups if g.kind == "LR"]
    assert [g.value for g in lr_late] == [0.01, 0.02]
    assert lr_late[0].late == pytest.approx(0.2) and math.isnan(lr_late[1].late)
    assert rep.iso_lr_late == pytest.approx(0.2)  # not mean(0.2, 0)
    assert rep.iso_elr_late == pytest.approx(0.05)  # elr 0.01: |2.0 - 2.05|; elr 0.02 has one value
    want_se = np.std(np.abs(boots[0.01, 1.0][100] - boots[0.01, 2.0][100]), ddof=1)
    assert rep.iso_lr_late_se == pytest.approx(want_se)


def test_difference_se_is_paired_and_taken_at_its_own_position():
    rng = np.random.default_rng(1)
    values = {(0.01, 1.0): 3.0, (0.01, 2.0): 3.02, (0.02, 1.0): 3.05}  # LR spread 0.02, ELR spread 0.03
    noise = {10: 1e-4, 100: 0.05}  # tiny noise early, large late
    shared = {s: rng.normal(0, 0.3, 16) for s in noise}
    table = {k: {s: v for s in noise} for k, v in values.items()}
    boots = {k: {s: v + shared[s] + rng.normal(0, noise[s], 16) for s in noise} for k, v in values.items()}
    rep = invariance_report(_recs(table, boots), early_step=10, late_step=100)
    for s, diff_se, flag in ((10, rep.difference_early_se, rep.within_noise_early),
                             (100, rep.difference_late_se, rep.within_noise_late)):
        b = [boots[k][s] for k in values]
        lr_b, elr_b = np.abs(b[0] - b[1]), np.abs(b[1] - b[2])
        want = np.std(lr_b - elr_b, ddof=1)
        assert diff_se == pytest.approx(want, rel=1e-9)
        assert flag == bool(abs((3.02 - 3.0) - (3.05 - 3.02)) <= 2.0 * want)
    assert rep.within_noise_early is False and rep.within_noise_late is True


def test_spreads_equal_up_to_rounding_are_a_tie():
    # |0.3 - 0.2| = 0.09999999999999998 and |0.2 - 0.1| = 0.1 in floating point
    table = {(0.01, 1.0): {10: 0.3, 20: 0.3}, (0.01, 2.0): {10: 0.2, 20: 0.2}, (0.02, 1.0): {10: 0.1, 20: 0.1}}
    rep = invariance_report(_recs(table), early_step=10, late_step=20)
    assert rep.iso_lr_late != rep.iso_elr_late
    assert (rep.verdict_early, rep.verdict_late) == ("tie", "tie")


def test_groups_are_listed_by_schedule_whatever_the_record_order():
    def pop(schedule, run_id):
        return _recs({(lr, wd): {10: 3.0 + wd, 20: 2.0 + wd} for lr in (0.01, 0.02) for wd in (0.5, 1.0)},
                     schedule=schedule, run_id=run_id)
    # run ids sort the other way round: the batch-64 population is run "a", the batch-32 one run "b"
    a = invariance_report(pop("64", "a") + pop("32", "b"), early_step=10, late_step=20)
    b = invariance_report(pop("32", "b") + pop("64", "a"), early_step=10, late_step=20)
    assert [g.batch_schedule for g in a.groups if g.kind == "LR"] == ["32", "32", "64", "64"]
    assert a.to_dict()["groups"] == b.to_dict()["groups"]


# ------------------------------------------------------------------- spreads.py
