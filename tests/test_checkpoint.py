"""Checkpoints: the last N kept, validated on load, a damaged newest one falls back, leftovers removed."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from helpers import metrics_without_time
from trajinv.checkpoint import (
    CheckpointError,
    checkpoint_steps,
    clean_run_dir,
    load_checkpoint,
    save_checkpoint,
    sidecar_name,
    tensor_name,
)
from trajinv.train import METRICS, Trainer


def _save(run_dir, step, keep=2):
    save_checkpoint(run_dir, step, {"x": torch.full((3,), float(step))}, {"a": step}, keep=keep)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keeps_the_newest_n(tmp_path, keep):
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, keep)
    assert checkpoint_steps(tmp_path) == [2, 4, 6, 8][-keep:]
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted([sidecar_name(s) for s in checkpoint_steps(tmp_path)]
                          + [tensor_name(s) for s in checkpoint_steps(tmp_path)])
    tensors, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 8 and meta["a"] == 8 and torch.equal(tensors["x"], torch.full((3,), 8.0))


def test_a_save_drops_checkpoints_ahead_of_it(tmp_path):
    """After a fallback (or a restart) the newer checkpoints of the abandoned trajectory go."""
    for step in (2, 4, 6):
        _save(tmp_path, step, keep=3)
    _save(tmp_path, 3, keep=3)
    assert checkpoint_steps(tmp_path) == [2, 3]


def _damage(run_dir, how):
    step = checkpoint_steps(run_dir)[-1]
    side, tens = run_dir / sidecar_name(step), run_dir / tensor_name(step)
    if how == "truncated":
        tens.write_bytes(tens.read_bytes()[:-7])
    elif how == "empty":
        tens.write_bytes(b"")
    elif how == "garbage":
        tens.write_bytes(os.urandom(tens.stat().st_size))
    elif how == "tensors-missing":
        tens.unlink()
    elif how == "sidecar-not-json":
        side.write_text('{"step": 6, "tensor_')
    elif how == "sidecar-empty":
        side.write_text("")
    elif how == "sidecar-list":
        side.write_text("[1, 2]")
    elif how == "sidecar-missing-key":
        meta = json.loads(side.read_text())
        del meta["tensor_bytes"]
        side.write_text(json.dumps(meta))
    elif how == "sidecar-step-edited":
        meta = json.loads(side.read_text())
        meta["step"] = 5
        side.write_text(json.dumps(meta))
    elif how == "tensors-of-another-step":  # same size, a different step in the header
        save_file({"x": torch.full((3,), 4.0)}, str(tens), metadata={"step": "4", "format": "2"})
        meta = json.loads(side.read_text())
        meta["tensor_bytes"] = tens.stat().st_size
        side.write_text(json.dumps(meta))
    else:
        raise AssertionError(how)
    return side if how.startswith("sidecar") else tens


DAMAGES = ["truncated", "empty", "garbage", "tensors-missing", "sidecar-not-json", "sidecar-empty", "sidecar-list",
           "sidecar-missing-key", "sidecar-step-edited", "tensors-of-another-step"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_newest_falls_back_to_the_previous_in_one_line(tmp_path, how):
    for step in (4, 6):
        _save(tmp_path, step)
    bad = _damage(tmp_path, how)
    notes = []
    tensors, meta = load_checkpoint(tmp_path, note=notes.append)
    assert meta["step"] == 4 and torch.equal(tensors["x"], torch.full((3,), 4.0))
    assert len(notes) == 1 and "\n" not in notes[0] and str(bad) in notes[0], notes
    assert sidecar_name(4) in notes[0]


@pytest.mark.parametrize("how", ["truncated", "sidecar-missing-key", "sidecar-step-edited"])
def test_no_usable_checkpoint_is_one_line_error_naming_the_file(tmp_path, how):
    _save(tmp_path, 6)
    bad = _damage(tmp_path, how)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_leftovers_of_interrupted_writes_are_removed(tmp_path):
    _save(tmp_path, 4)
    dead = tmp_path / f".{tensor_name(6)}.999999999.x1y2z3.tmp"  # no such pid
    dead.write_bytes(b"half a checkpoint")
    old_style = tmp_path / f".{sidecar_name(6)}.abcd1234.tmp"  # no pid in the name: an older version's
    old_style.write_text("{")
    live = tmp_path / f".metrics.jsonl.{os.getppid()}.abcdefgh.tmp"  # a running writer's: kept
    live.write_text("x")
    orphan = tmp_path / tensor_name(6)  # renamed into place, sidecar never written
    orphan.write_bytes(b"tensors")
    removed = clean_run_dir(tmp_path)
    assert sorted(removed) == sorted([dead, old_style, orphan])
    assert live.exists() and checkpoint_steps(tmp_path) == [4]
    assert load_checkpoint(tmp_path)[1]["step"] == 4


def test_legacy_single_sidecar_layout_still_loads(tmp_path):
    save_file({"x": torch.ones(2)}, str(tmp_path / tensor_name(3)))
    (tmp_path / "checkpoint.json").write_text(json.dumps({"step": 3, "tensor_file": tensor_name(3), "a": 1}))
    tensors, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 3 and torch.equal(tensors["x"], torch.ones(2))
    _save(tmp_path, 5)
    assert not (tmp_path / "checkpoint.json").exists() and not (tmp_path / tensor_name(3)).exists()


def test_trainer_resumes_from_the_previous_checkpoint_when_the_newest_is_damaged(
        tiny_data, tiny_train_config, tmp_path, capsys):
    cfg = tiny_train_config(steps=8, checkpoint_every=2)
    Trainer(cfg, tiny_data, tmp_path / "a").train()
    run = tmp_path / "b"
    Trainer(cfg, tiny_data, run).train(until=7)
    assert checkpoint_steps(run) == [4, 6]
    bad = _damage(run, "truncated")
    capsys.readouterr()
    resumed = Trainer(cfg, tiny_data, run)
    assert resumed.resume() and resumed.step == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and sidecar_name(4) in err[0]
    assert {r["step"] for r in metrics_without_time(run)} == {1, 2, 3, 4}  # never ahead of the checkpoint
    resumed.train()
    assert metrics_without_time(run) == metrics_without_time(tmp_path / "a")
    assert checkpoint_steps(run) == [6, 8]


def test_trainer_removes_leftovers_on_resume(tiny_data, tiny_train_config, tmp_path):
    cfg = tiny_train_config(steps=6, checkpoint_every=2)
    Trainer(cfg, tiny_data, tmp_path).train(until=5)
    (tmp_path / f".{tensor_name(6)}.999999999.abcdefgh.tmp").write_bytes(b"x" * 100)
    (tmp_path / f".{METRICS}.999999999.abcdefgh.tmp").write_text("{}\n")
    (tmp_path / tensor_name(6)).write_bytes(b"x" * 100)
    tr = Trainer(cfg, tiny_data, tmp_path)
    assert tr.resume() and tr.step == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [METRICS, sidecar_name(2), tensor_name(2), sidecar_name(4), tensor_name(4)])


def test_prune_older_keeps_the_newest_up_to_the_loaded_step_and_leaves_newer_ones(tmp_path):
    from trajinv.checkpoint import checkpoint_steps, prune_older, save_checkpoint

    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"w": torch.zeros(2)}, {}, keep=10)
    prune_older(tmp_path, 3, keep=2)  # a resume loaded step 3 (4 was damaged, say): 4 stays for the next save
    assert checkpoint_steps(tmp_path) == [2, 3, 4]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "checkpoint-00000002.safetensors", "checkpoint-00000003.safetensors", "checkpoint-00000004.safetensors"]
    with pytest.raises(ValueError, match="keep must be >= 1, got 0"):
        prune_older(tmp_path, 3, keep=0)
