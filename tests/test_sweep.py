"""Sweep specs, populations, resume-by-rerun and the summary table."""

import csv
import json

import pytest
import torch

from trajinv.config import Member, OptimConfig, TrainConfig, to_dict
from trajinv.data import DataConfig
from trajinv.sweep import SweepSpec, log2_range, run_sweep


def test_log2_range():
    assert log2_range("-3:-1") == (0.125, 0.25, 0.5)
    assert log2_range("0:1:0.5") == pytest.approx((1.0, 2 ** 0.5, 2.0))
    for bad in ("1", "2:1", "a:b", "0:1:0"):
        with pytest.raises(ValueError, match="log2"):
            log2_range(bad)


def test_members_grid_and_iso_elr_lines_dedupe():
    spec = SweepSpec(lrs=(0.01, 0.02), wds=(0.5, 1.0), elrs=(0.01,))
    ms = spec.members()
    # grid (4) + line elr=0.01 over lrs: (0.01, 1.0) already in grid, (0.02, 0.5) too
    assert ms == (Member(0.01, 0.5), Member(0.01, 1.0), Member(0.02, 0.5), Member(0.02, 1.0))
    line = SweepSpec(lrs=(0.01, 0.04), elrs=(0.02,)).members()
    assert [m.elr for m in line] == pytest.approx([0.02, 0.02])


def test_iso_elr_lines_in_independent_decay_mode_hold_the_decay_per_step():
    # independent mode decays by wd per step, whatever the lr: its iso-ELR line is one wd, not wd = elr/lr
    train = TrainConfig(optim=OptimConfig(decay_mode="independent"))
    assert SweepSpec(train=train, lrs=(0.01, 0.04), elrs=(0.02,)).members() == (Member(0.01, 0.02), Member(0.04, 0.02))


def test_independent_decay_mode_logs_its_decay_per_step_as_elr(tiny_train_config, tmp_path):
    # elr and tau_iter are the decay per step at the peak lr and its timescale: lr*wd in torch mode, wd in
    # independent mode (it logged lr*wd in both, 1e-3 for a member that decays 0.1 per step)
    cfg = tiny_train_config(steps=2, optim=OptimConfig(name="torch", decay_mode="independent"))
    spec = SweepSpec(train=cfg, data=DataConfig(max_tokens=200_000), lrs=(0.01,), elrs=(0.1,), batch_sizes=("4",))
    run_sweep(spec, tmp_path)
    with open(tmp_path / "summary.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert (float(row["wd"]), float(row["elr"]), float(row["tau_iter"])) == pytest.approx((0.1, 0.1, 10.0))
    recs = [json.loads(line) for line in (tmp_path / "runs/bs4/metrics.jsonl").read_text().splitlines()]
    assert [r["elr"] for r in recs] == pytest.approx([0.1] * len(recs))
    torch_mode = OptimConfig(decay_mode="torch")
    assert torch_mode.peak_decay(Member(0.01, 0.1)) == pytest.approx(1e-3)
    assert OptimConfig(decay=()).peak_decay(Member(0.01, 0.1)) == 0.0  # nothing decays: no ELR


def test_a_repeated_batch_size_is_one_population():
    # `--batch-size 4 --batch-size 4` listed one population's members twice in summary.csv
    from trajinv.sweep import distinct_batch_sizes

    assert distinct_batch_sizes(["4", "04", "8", "4@.5,8", "4@0.5,8"]) == ("4", "8", "4@.5,8")
    with pytest.raises(ValueError, match="repeat a batch size"):
        SweepSpec(lrs=(0.01,), wds=(1.0,), batch_sizes=("4", "4")).validate()


def test_populations_split_by_batch_size_and_size():
    spec = SweepSpec(lrs=(0.01, 0.02, 0.04), wds=(1.0,), batch_sizes=("8", "4@0.5,16"), population=2)
    pops = spec.populations()
    assert [rid for rid, _ in pops] == ["bs8-p0", "bs8-p1", "bs4at0.5-16-p0", "bs4at0.5-16-p1"]
    assert [len(c.members) for _, c in pops] == [2, 1, 2, 1]
    assert pops[2][1].batch_size == "4@0.5,16"


def test_populations_at_a_token_budget_get_their_own_steps():
    spec = SweepSpec(train=TrainConfig(tokens=64 * 64 * 10), lrs=(0.01,), wds=(1.0,),
                     batch_sizes=("32", "64", "32@0.5,64"))
    assert [(cfg.steps, cfg.batch_plan().tokens) for _, cfg in spec.populations()] == [
        (20, 64 * 64 * 10), (10, 64 * 64 * 10), (10 + 5, 64 * 64 * 10)]


@pytest.mark.parametrize("kw, match", [(dict(lrs=()), "lr"), (dict(wds=()), "--wd"), (dict(lrs=(-1.0,)), "-1"),
                                       (dict(batch_sizes=("x",)), "x"), (dict(elrs=(0.0,), wds=()), "elr"),
                                       (dict(batch_sizes=("32", "8@0.5,32"), train=TrainConfig(steps=1)),
                                        "1 steps are too few for batch-size schedule '8@0.5,32'")])
def test_bad_specs(kw, match):
    base = dict(lrs=(0.01,), wds=(1.0,))
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        SweepSpec(**base).validate()


class _Stop(Exception):
    pass


def _stop_at(run_id: str):
    """A progress callback that interrupts the sweep as population `run_id` starts."""
    def progress(kind, **info):
        if kind == "population" and info["run_id"] == run_id:
            raise _Stop
    return progress


def _spec(tiny_train_config, **kw):
    base = dict(train=tiny_train_config(steps=4, checkpoint_every=2), data=DataConfig(max_tokens=200_000),
                lrs=(0.01, 0.02), wds=(0.5,), elrs=(0.01,), batch_sizes=("4",))
    base.update(kw)
    return SweepSpec(**base)


def test_sweep_writes_layout_and_rerun_skips(tiny_train_config, tmp_path):
    spec = _spec(tiny_train_config)
    rows = run_sweep(spec, tmp_path)
    assert {r["name"] for r in rows} == {"lr=0.01,wd=0.5", "lr=0.01,wd=1", "lr=0.02,wd=0.5"}
    assert (tmp_path / "spec.json").exists() and (tmp_path / "runs/bs4/metrics.jsonl").exists()
    with open(tmp_path / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and all(r["status"] == "done" and r["steps"] == "4" for r in table)
    for r in table:  # the weight-decay timescale 1/(lr wd) in steps, and as a share of the run
        assert float(r["tau_iter"]) == pytest.approx(1 / (float(r["lr"]) * float(r["wd"])))
        assert float(r["tau_fraction"]) == pytest.approx(float(r["tau_iter"]) / 4)
    before = (tmp_path / "runs/bs4/metrics.jsonl").read_text()
    events = []
    run_sweep(spec, tmp_path, progress=lambda kind, **info: events.append((kind, info)))
    assert ("population", {"run_id": "bs4", "skipped": True, "members": 3}) in events
    assert (tmp_path / "runs/bs4/metrics.jsonl").read_text() == before


def test_sweep_resumes_unfinished_population(tiny_train_config, tmp_path):
    spec = _spec(tiny_train_config, batch_sizes=("4",))
    full = run_sweep(spec, tmp_path / "full")

    class Stop(Exception):
        pass

    def stop(kind, **info):
        if kind == "advance" and info["steps"] == 1:
            stop.n = getattr(stop, "n", 0) + 1
            if stop.n == 3:
                raise Stop

    with pytest.raises(Stop):
        run_sweep(spec, tmp_path / "cut", progress=stop)
    resumed = run_sweep(spec, tmp_path / "cut")
    assert [r["final_val_loss"] for r in resumed] == [r["final_val_loss"] for r in full]


def test_sweep_dir_of_another_spec_is_refused(tiny_train_config, tmp_path):
    run_sweep(_spec(tiny_train_config), tmp_path)
    spec_before = (tmp_path / "spec.json").read_text()
    with pytest.raises(ValueError, match="another spec"):
        run_sweep(_spec(tiny_train_config, lrs=(0.03,)), tmp_path)
    assert (tmp_path / "spec.json").read_text() == spec_before
    assert json.loads(spec_before)["lrs"] == [0.01, 0.02]


@pytest.mark.parametrize("bad", [
    dict(data=DataConfig(source="/no/such/corpus.txt")),                                      # fails loading data
    dict(train_kw=dict(micro_batch=3)),                                                        # fails in the trainer's checks
])
def test_a_failed_sweep_does_not_block_the_corrected_command(tiny_train_config, tmp_path, bad):
    kw = dict(bad)
    train_kw = kw.pop("train_kw", {})
    if train_kw:
        from trajinv.config import GNSConfig

        kw["train"] = tiny_train_config(steps=4, checkpoint_every=2, gns=GNSConfig(mode="micro-batch"), **train_kw)
    with pytest.raises(ValueError):
        run_sweep(_spec(tiny_train_config, **kw), tmp_path / "out")
    assert not (tmp_path / "out" / "spec.json").exists()
    rows = run_sweep(_spec(tiny_train_config), tmp_path / "out")  # the corrected command
    assert len(rows) == 3


def test_keep_checkpoints_may_change_on_a_rerun(tiny_train_config, tmp_path):
    run_sweep(_spec(tiny_train_config, train=tiny_train_config(steps=4, checkpoint_every=1)), tmp_path)
    assert len(list((tmp_path / "runs/bs4").glob("checkpoint-*.json"))) == 2
    spec = _spec(tiny_train_config, train=tiny_train_config(steps=4, checkpoint_every=1, keep_checkpoints=3))
    assert len(run_sweep(spec, tmp_path)) == 3  # the same sweep: a rerun, not "another spec"


def test_checkpoint_every_may_change_on_a_resume_and_the_result_is_the_same(tiny_train_config, tmp_path,
                                                                            monkeypatch):
    # where checkpoints fall changes nothing a run computes; a rerun that changed it was refused
    from trajinv.train import Trainer

    def spec(every):
        return _spec(tiny_train_config, train=tiny_train_config(steps=6, checkpoint_every=every))

    whole = run_sweep(spec(2), tmp_path / "a")
    real = Trainer.train
    def interrupted(self, progress=None, until=None):  # stopped after its step-2 checkpoint
        real(self, progress, until=2)
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(Trainer, "train", interrupted)
        run_sweep(spec(2), tmp_path / "b")
    resumed = run_sweep(spec(3), tmp_path / "b")
    assert [(r["name"], r["final_val_loss"], r["status"]) for r in resumed] == [
        (r["name"], r["final_val_loss"], r["status"]) for r in whole]


def test_a_lowered_keep_checkpoints_prunes_a_finished_run_on_rerun(tiny_train_config, tmp_path):
    spec = _spec(tiny_train_config, train=tiny_train_config(steps=4, checkpoint_every=1, keep_checkpoints=3))
    rows = run_sweep(spec, tmp_path)
    run = tmp_path / "runs/bs4"
    assert sorted(p.name for p in run.glob("checkpoint-*.json")) == [
        "checkpoint-00000002.json", "checkpoint-00000003.json", "checkpoint-00000004.json"]
    lowered = _spec(tiny_train_config, train=tiny_train_config(steps=4, checkpoint_every=1, keep_checkpoints=1))
    assert run_sweep(lowered, tmp_path) == rows  # nothing retrained
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-00000004.json", "checkpoint-00000004.safetensors"]


def _no_trainer(monkeypatch):
    """Make building a Trainer (a model, a checkpoint load) fail: what a read-back must not do."""
    from trajinv.train import Trainer

    def refuse(self, *a, **k):
        raise AssertionError("a Trainer was built")

    monkeypatch.setattr(Trainer, "__init__", refuse)


def test_a_finished_population_is_read_back_without_building_its_model(tiny_train_config, tmp_path, monkeypatch):
    # its final checkpoint's sidecar holds the results: a rerun of a finished sweep or tune loads no weights
    from trajinv.config import GNSConfig

    spec = _spec(tiny_train_config, train=tiny_train_config(steps=4, checkpoint_every=2,
                                                           gns=GNSConfig(mode="micro-batch"), micro_batch=2))
    rows = run_sweep(spec, tmp_path)
    table = (tmp_path / "summary.csv").read_text()
    assert rows[0]["b_precond"] is not None  # the GNS columns come back too
    with monkeypatch.context() as m:
        _no_trainer(m)
        events = []
        again = run_sweep(spec, tmp_path, progress=lambda kind, **info: events.append((kind, info)))
    assert again == rows and (tmp_path / "summary.csv").read_text() == table
    assert ("population", {"run_id": "bs4", "skipped": True, "members": 3}) in events


def test_a_read_back_falls_back_to_a_resume_where_the_sidecar_cannot_be_trusted(tiny_train_config, tmp_path,
                                                                                 monkeypatch):
    spec = _spec(tiny_train_config)
    rows = run_sweep(spec, tmp_path / "a")
    run = tmp_path / "a/runs/bs4"
    last = run / "checkpoint-00000004.safetensors"
    last.write_bytes(last.read_bytes()[:-8])  # truncated: the resume takes step 2's and trains the rest again
    with monkeypatch.context() as m:
        _no_trainer(m)
        with pytest.raises(AssertionError, match="Trainer was built"):
            run_sweep(spec, tmp_path / "a")
    assert run_sweep(spec, tmp_path / "a") == rows  # bit-identical on CPU
    last.write_bytes(bytes(len(last.read_bytes())))  # the recorded size, but no safetensors header
    with monkeypatch.context() as m:
        _no_trainer(m)
        with pytest.raises(AssertionError, match="Trainer was built"):
            run_sweep(spec, tmp_path / "a")
    assert run_sweep(spec, tmp_path / "a") == rows
    # a metrics line that is not JSON is refused as a resume refuses it
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:1] + ["{not json"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match="malformed metrics line .*metrics.jsonl:2"):
        run_sweep(spec, tmp_path / "a")
    # a finished run whose corpus changed under the same path is refused as a resume refuses it, not read back
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a b c d\n" * 5000)
    on_file = _spec(tiny_train_config, data=DataConfig(source=str(corpus)))
    run_sweep(on_file, tmp_path / "b")
    corpus.write_text("e f g h\n" * 5000)
    with pytest.raises(ValueError, match="other data"):
        run_sweep(on_file, tmp_path / "b")


def test_a_population_that_ran_out_of_memory_is_rerun_in_smaller_ones(tiny_train_config, tmp_path, monkeypatch):
    # A population too large for its device fails before its first checkpoint. The rerun that splits the members
    # into smaller populations used to be refused as "another spec" (population 0 there, 1 here): the sweep
    # could only be started over in a new directory.
    from trajinv.train import DeviceOutOfMemory, Trainer

    spec = _spec(tiny_train_config)
    reference = run_sweep(_spec(tiny_train_config, population=1), tmp_path / "ref")
    forward = Trainer._forward_backward

    def too_many(self, step, bs):
        if self.K > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB. GPU 0 has ...")
        return forward(self, step, bs)

    monkeypatch.setattr(Trainer, "_forward_backward", too_many)
    out = tmp_path / "out"
    with pytest.raises(DeviceOutOfMemory, match="^bs4: 3 members ran out of cpu memory in step 1"):
        run_sweep(spec, out)
    assert (out / "runs/bs4").is_dir()
    rows = run_sweep(_spec(tiny_train_config, population=1), out)
    assert [r["run_id"] for r in rows] == ["bs4-p0", "bs4-p1", "bs4-p2"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["bs4-p0", "bs4-p1", "bs4-p2"]  # no member twice
    assert json.loads((out / "spec.json").read_text())["population"] == 1
    assert rows == reference  # on CPU a member's numbers do not depend on its population


def test_a_sweep_that_has_trained_splits_only_its_untrained_members_anew(tiny_train_config, tmp_path):
    # one population finished, the next ran out of memory (on another device, say): the rerun with a smaller
    # --population was refused once anything had checkpointed, so the sweep started over in a new --out
    with pytest.raises(_Stop):
        run_sweep(_spec(tiny_train_config, population=1), tmp_path, progress=_stop_at("bs4-p1"))
    trained = (tmp_path / "runs/bs4-p0/checkpoint-00000004.json").read_bytes()
    rows = run_sweep(_spec(tiny_train_config, population=3), tmp_path)
    assert [r["run_id"] for r in rows] == ["bs4-p0", "bs4-p1", "bs4-p1"]  # p0 kept, the other two together
    assert (tmp_path / "runs/bs4-p0/checkpoint-00000004.json").read_bytes() == trained  # not retrained
    reference = run_sweep(_spec(tiny_train_config), tmp_path / "ref")
    assert [(r["lr"], r["wd"], r["final_val_loss"]) for r in rows] == [
        (r["lr"], r["wd"], r["final_val_loss"]) for r in reference]  # on CPU the grouping changes no number
    again = run_sweep(_spec(tiny_train_config), tmp_path)  # no --population: the stored size, nothing retrained
    assert again == rows and json.loads((tmp_path / "spec.json").read_text())["population"] == 3
    whole = tmp_path / "whole"
    run_sweep(_spec(tiny_train_config), whole)  # one population of all three
    assert len(run_sweep(_spec(tiny_train_config, population=5), whole)) == 3


def test_a_trained_sweep_whose_population_cannot_be_read_is_not_regrouped(tiny_train_config, tmp_path):
    # an unreadable population read as "nothing trained": the rerun deleted the checkpointed runs and retrained
    run_sweep(_spec(tiny_train_config), tmp_path)
    spec = json.loads((tmp_path / "spec.json").read_text())
    (tmp_path / "spec.json").write_text(json.dumps({**spec, "population": None}))
    before = sorted(p.name for p in (tmp_path / "runs/bs4").iterdir())
    with pytest.raises(ValueError, match=r"spec.json has no readable population size \(population: None\)"):
        run_sweep(_spec(tiny_train_config, population=1), tmp_path)
    assert sorted(p.name for p in (tmp_path / "runs/bs4").iterdir()) == before


def test_a_regrouped_sweep_keeps_no_run_of_the_old_grouping(tiny_train_config, tmp_path):
    # 3 members in populations of 2 (bs4-p0, bs4-p1), none checkpointed, then populations of 1: bs4-p0 and
    # bs4-p1 are names of the new grouping too, but their old metrics name other members
    out = tmp_path / "out"
    (out / "runs/bs4-p1").mkdir(parents=True)
    (out / "runs/bs4-p1/metrics.jsonl").write_text(json.dumps({"step": 1, "member": 0, "base_lr": 0.02}) + "\n")
    (out / "spec.json").write_text(json.dumps({**json.loads(json.dumps(to_dict(_spec(tiny_train_config)))),
                                               "population": 2}))
    with pytest.raises(_Stop):  # interrupted before the new bs4-p1 trains: its old lines stayed
        run_sweep(_spec(tiny_train_config, population=1), out, progress=_stop_at("bs4-p1"))
    assert not (out / "runs/bs4-p1/metrics.jsonl").exists()
    rows = run_sweep(_spec(tiny_train_config, population=1), out)
    assert [r["run_id"] for r in rows] == ["bs4-p0", "bs4-p1", "bs4-p2"]


def test_a_checkpoint_whose_members_are_unknown_is_refused_before_anything_moves(tiny_train_config, tmp_path):
    # a damaged sidecar was skipped: a new chunk took its directory's name, and its members were trained twice
    run_sweep(_spec(tiny_train_config, population=1), tmp_path)
    for sidecar in (tmp_path / "runs/bs4-p2").glob("checkpoint-*.json"):
        sidecar.write_text("{")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"bs4-p2 has a checkpoint whose sidecar does not say which members"):
        run_sweep(_spec(tiny_train_config, population=2), tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_regrouped_sweeps_rerun_changes_nothing_on_disk_before_it_trains(tiny_train_config, tmp_path):
    # every rerun after a regroup deleted summary.csv first: one interrupted there left a finished sweep without it
    from trajinv.sweep import prepare_sweep

    with pytest.raises(_Stop):
        run_sweep(_spec(tiny_train_config, population=1), tmp_path, progress=_stop_at("bs4-p1"))
    run_sweep(_spec(tiny_train_config, population=2), tmp_path)  # regrouped: bs4-p0 kept, the other two together
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    prepare_sweep(_spec(tiny_train_config, population=2), tmp_path)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
