"""The trainer: metrics, resume bit-identical, divergence, accumulation, schedules, checkpoints."""

import json
import math

import pytest
import torch

from trajinv.checkpoint import load_checkpoint, save_checkpoint
from trajinv.data import boot_means, boot_se, window_resamples
from trajinv.config import Member, OptimConfig
from helpers import metrics_without_time
from trajinv.train import METRICS, DeviceOutOfMemory, Trainer


def _records(path):
    return [json.loads(line) for line in (path / METRICS).read_text().splitlines()]


def test_metrics_lines_per_step_and_member(tiny_data, tiny_train_config, tmp_path):
    cfg = tiny_train_config()
    results = Trainer(cfg, tiny_data, tmp_path).train()
    recs = _records(tmp_path)
    assert len(recs) == cfg.steps * 2
    r = recs[-1]
    for key in ("step", "tokens", "lr", "wd", "elr", "batch_size", "batch_schedule", "train_loss", "val_loss",
                "val_loss_boot", "val_loss_se", "grad_norm", "weight_norm", "update_norm", "precond_grad_norm",
                "seconds"):
        assert key in r, key
    assert r["elr"] == pytest.approx(2e-2 * 0.5) and r["tokens"] == 8 * 4 * 16
    assert [x["val_loss"] is not None for x in recs if x["member"] == 0] == [s % 4 == 0 for s in range(1, 9)]
    assert all(res.status == "done" and res.val_loss < math.log(256) for res in results)
    # each line says where its member is: running, then done on the last step (as summary.csv says)
    assert [x["status"] for x in recs] == ["running"] * (len(recs) - 2) + ["done"] * 2


@pytest.mark.parametrize("optimizer", ["torch", "fused"])
def test_resume_is_bit_identical(tiny_data, tiny_train_config, tmp_path, optimizer, interrupted_run):
    cfg = tiny_train_config(optim=OptimConfig(name=optimizer), steps=10)
    Trainer(cfg, tiny_data, tmp_path / "a").train()
    start, resumed = interrupted_run(cfg, tmp_path / "b", stop_at=7)
    assert start == 6  # the last checkpoint; the metrics of step 7 were dropped and redone
    assert resumed == metrics_without_time(tmp_path / "a")


def test_the_same_run_twice_writes_the_same_checkpoint_tensors(tiny_data, tiny_train_config, tmp_path):
    # the checkpoint held the process's global RNG state, seeded at random per process and never used
    from safetensors.torch import load_file

    cfg = tiny_train_config(steps=4)
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)  # what another process (or the caller's code) leaves in the global generator
        Trainer(cfg, tiny_data, tmp_path / name).train()
    files = sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*.safetensors"))
    assert files
    for f in files:  # tensors, not bytes: safetensors writes its header's metadata in no fixed order
        a, b = load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f)
        assert a.keys() == b.keys(), f
        for k in a:  # bit for bit; NaN (not evaluated yet) equals NaN
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=f"{f}: {k}")


def test_resume_refuses_another_config(tiny_data, tiny_train_config, tmp_path):
    Trainer(tiny_train_config(steps=3), tiny_data, tmp_path).train()
    with pytest.raises(ValueError, match="different configuration"):
        Trainer(tiny_train_config(steps=4), tiny_data, tmp_path).resume()


def test_diverged_member_is_frozen_and_others_go_on(tiny_data, tiny_train_config, tmp_path):
    cfg = tiny_train_config(members=(Member(1e-2, 0.1), Member(1e6, 0.0)), steps=6, optim=OptimConfig(clip=0.0))
    tr = Trainer(cfg, tiny_data, tmp_path)
    # Blow up member 1 directly: NaN weights make its loss NaN at the first step.
    with torch.no_grad():
        tr.model.head[1].fill_(float("nan"))
    results = tr.train()
    assert results[0].status == "done" and results[1].status == "diverged"
    assert math.isfinite(results[0].val_loss)
    recs = _records(tmp_path)
    dead = [r for r in recs if r["member"] == 1]
    assert len(dead) == 1 and dead[0]["status"] == "diverged" and dead[0]["train_loss"] is None
    assert len([r for r in recs if r["member"] == 0]) == 6


@pytest.mark.parametrize("optimizer", ["torch", "fused"])
def test_a_gradient_norm_past_fp32s_range_diverges_the_member(tiny_data, tiny_train_config, tmp_path, monkeypatch,
                                                              optimizer):
    # a finite loss with an infinite gradient norm got clip coefficient 0: the torch optimizer froze the
    # member, the fused one stepped it unclipped. It is a divergence, as a non-finite loss is.
    cfg = tiny_train_config(steps=4, optim=OptimConfig(name=optimizer))
    alone = Trainer(cfg, tiny_data, tmp_path / "a").train()
    norms = Trainer._grad_norms

    def overflow(self):
        out = norms(self)
        if self.step >= 1:
            out[1] = math.inf
        return out

    monkeypatch.setattr(Trainer, "_grad_norms", overflow)
    results = Trainer(cfg, tiny_data, tmp_path / "b").train()
    assert [r.status for r in results] == ["done", "diverged"]
    assert results[0].val_loss == alone[0].val_loss  # the other member never noticed
    dead = [r for r in _records(tmp_path / "b") if r["member"] == 1]
    assert dead[-1]["step"] == 2 and dead[-1]["status"] == "diverged"


def test_weight_and_update_norms_per_parameter_kind(tiny_data, tiny_train_config, tmp_path):
    """The phase analysis reads these: per kind they add up (in squares) to the totals."""
    Trainer(tiny_train_config(steps=2), tiny_data, tmp_path).train()
    for rec in _records(tmp_path):
        for what in ("weight", "update"):
            parts = [rec[f"{what}_norm_{kind}"] for kind in ("matrix", "embedding", "gain")]
            assert all(p > 0 for p in parts[:2]) and parts[2] >= 0
            assert math.sqrt(sum(p * p for p in parts)) == pytest.approx(rec[f"{what}_norm"], rel=1e-5)


@pytest.mark.parametrize("micro_batch", [1, 2, 3])  # 3: an uneven last micro-batch (4 = 3 + 1)
def test_gradient_accumulation_matches_whole_batch(tiny_data, tiny_train_config, tmp_path, micro_batch):
    """Train loss and gradient norm of every step, not only the final validation loss: under Adam
    with clipping a wrong micro-batch weight barely moves the loss but scales every gradient."""
    whole = Trainer(tiny_train_config(steps=3), tiny_data, tmp_path / "w").train()
    micro = Trainer(tiny_train_config(steps=3, micro_batch=micro_batch), tiny_data, tmp_path / "m").train()
    for a, b in zip(whole, micro):
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-4)
    for key in ("train_loss", "grad_norm"):
        want = [r[key] for r in _records(tmp_path / "w")]
        got = [r[key] for r in _records(tmp_path / "m")]
        assert got == pytest.approx(want, rel=1e-5), key


def test_batch_size_schedule_switches_at_a_fraction_of_the_tokens(tiny_data, tiny_train_config, tmp_path):
    # 256 tokens at context 16: the first half (128 tokens) is 4 steps of 2, the second 2 steps of 4.
    tr = Trainer(tiny_train_config(tokens=256, batch_size="2@0.5,4"), tiny_data, tmp_path)
    assert tr.cfg.steps == 6
    results = tr.train()
    recs = [r for r in _records(tmp_path) if r["member"] == 0]
    assert [r["batch_size"] for r in recs] == [2, 2, 2, 2, 4, 4]
    assert [r["tokens"] for r in recs] == [32, 64, 96, 128, 192, 256]
    assert {r["batch_schedule"] for r in recs} == {"2@0.5,4"}
    assert tr.tokens == 256 and results[0].steps == 6 and results[0].tokens == 256


def test_a_step_count_runs_exactly_that_many_steps(tiny_data, tiny_train_config, tmp_path):
    # 4 steps of '2@0.5,4': the largest budget with 4 steps is 160 tokens; its first half
    # (80 tokens) takes 3 steps of 2 (96 tokens), the rest 1 step of 4.
    tr = Trainer(tiny_train_config(steps=4, batch_size="2@0.5,4"), tiny_data, tmp_path)
    tr.train()
    assert [r["batch_size"] for r in _records(tmp_path) if r["member"] == 0] == [2, 2, 2, 4]
    assert tr.tokens == (2 + 2 + 2 + 4) * 16


def test_bf16_autocast_trains_on_cpu(tiny_data, tiny_train_config, tmp_path):
    results = Trainer(tiny_train_config(steps=2, dtype="bf16"), tiny_data, tmp_path).train()
    assert all(math.isfinite(r.train_loss) for r in results)


def test_members_match_single_runs(tiny_data, tiny_train_config, tmp_path):
    """A K=2 population trains each member exactly as a K=1 run would."""
    cfg = tiny_train_config(steps=4)
    pop = Trainer(cfg, tiny_data, tmp_path / "pop").train()
    for k, m in enumerate(cfg.members):
        one = Trainer(tiny_train_config(steps=4, members=(m,)), tiny_data, tmp_path / f"one{k}").train()
        assert one[0].val_loss == pytest.approx(pop[k].val_loss, rel=1e-4)


@pytest.mark.parametrize("gns", [None, "micro-batch", "per-example"])
def test_a_members_run_does_not_depend_on_who_trains_beside_it(tiny_data, tiny_train_config, tmp_path, gns):
    """Bit for bit, with the fused optimizer and clipping active (lr 0.064 clips from step ~10): a tune's
    answer must not change with --population or the memory free. The clip scale's norm was once summed
    over a stacked (tensors, K) column, in another order for K = 1: member 0 parted from step 13 on."""
    from trajinv.config import GNSConfig, Member, OptimConfig

    members = (Member(0.064, 2.0), Member(0.016, 0.5), Member(0.032, 1.0))
    # per-example: the probes' sums were added over a stacked (tensors, 2, K) buffer (1e-7 apart for K = 1)
    extra = {} if gns is None else dict(gns=GNSConfig(mode=gns), micro_batch=2 if gns == "micro-batch" else 0)
    runs = [Trainer(tiny_train_config(steps=40, members=members[:k], optim=OptimConfig(name="fused"), eval_every=20,
                                      log_every=20, checkpoint_every=0, **extra), tiny_data, tmp_path / f"k{k}")
            for k in (1, 2, 3)]
    results = [t.train()[0] for t in runs]
    assert all((r.train_loss, r.val_loss) == (results[0].train_loss, results[0].val_loss) for r in results)
    assert all(r.extra == results[0].extra for r in results)  # B_precond and B_simple too
    for name, p in runs[0].model.named_parameters():
        for t in runs[1:]:
            assert torch.equal(p[0], dict(t.model.named_parameters())[name][0]), name
    # and what it logs: the optimizer's statistics (norms) were summed over a stacked (tensors, K) table
    logged = [[r for r in metrics_without_time(tmp_path / f"k{k}") if r["member"] == 0] for k in (1, 2, 3)]
    assert logged[0] and logged[1] == logged[0] and logged[2] == logged[0]


def test_checkpoint_save_replaces_the_previous_one(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(2)}, {"a": 1})
    save_checkpoint(tmp_path, 2, {"x": torch.zeros(2)}, {"a": 2})
    tensors, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 2 and torch.equal(tensors["x"], torch.zeros(2))
    assert load_checkpoint(tmp_path / "none") is None


@pytest.mark.parametrize("crash_on", ["tensors", "sidecar"])
def test_checkpoint_commit_is_atomic(tmp_path, monkeypatch, crash_on):
    """A crash anywhere inside a checkpoint write leaves the previous checkpoint loadable."""
    import trajinv.checkpoint as ckpt

    save_checkpoint(tmp_path, 1, {"x": torch.ones(2)}, {"a": 1})
    real = ckpt.atomic_write

    def crashing(path, write, **kw):
        is_sidecar = path.suffix == ".json"
        if is_sidecar == (crash_on == "sidecar"):
            def half(f):  # some bytes out, then the process dies
                f.write(b"{" if "b" in kw.get("mode", "wb") else "{")
                raise KeyboardInterrupt
            return real(path, half, **kw)
        return real(path, write, **kw)

    monkeypatch.setattr(ckpt, "atomic_write", crashing)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"x": torch.zeros(2)}, {"a": 2})
    tensors, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 1 and meta["a"] == 1 and torch.equal(tensors["x"], torch.ones(2))


def test_vocab_too_small_is_rejected(tiny_data, tiny_train_config, tmp_path):
    from trajinv.config import ModelConfig

    cfg = tiny_train_config(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, context=16, vocab_size=100))
    with pytest.raises(ValueError, match="256"):
        Trainer(cfg, tiny_data, tmp_path)


@pytest.mark.parametrize("decay_mode", ["torch", "independent"])
def test_fused_and_torch_optimizers_agree(tiny_data, tiny_train_config, tmp_path, decay_mode):
    runs = {}
    for name in ("torch", "fused"):
        cfg = tiny_train_config(steps=6, optim=OptimConfig(name=name, decay_mode=decay_mode))
        Trainer(cfg, tiny_data, tmp_path / name).train()
        runs[name] = _records(tmp_path / name)
    for a, b in zip(runs["torch"], runs["fused"]):
        for key in ("train_loss", "grad_norm", "precond_grad_norm", "weight_norm", "update_norm"):
            assert a[key] == pytest.approx(b[key], rel=2e-4), key


def test_no_duplicate_metrics_after_an_interruption_before_the_first_checkpoint(tiny_data, tiny_train_config, tmp_path):
    """Killed (or Ctrl-C) before any checkpoint: the rerun starts the metrics afresh."""
    cfg = tiny_train_config(steps=5, checkpoint_every=4)
    Trainer(cfg, tiny_data, tmp_path / "a").train()
    Trainer(cfg, tiny_data, tmp_path / "b").train(until=3)
    again = Trainer(cfg, tiny_data, tmp_path / "b")
    assert not again.resume()
    again.train()
    assert metrics_without_time(tmp_path / "b") == metrics_without_time(tmp_path / "a")


def _run_to(tiny_data, cfg, run_dir, until):
    Trainer(cfg, tiny_data, run_dir).train(until=until)
    return (run_dir / METRICS).read_bytes()


def test_half_written_last_metrics_line_is_dropped_with_a_note(tiny_data, tiny_train_config, tmp_path, capsys):
    cfg = tiny_train_config(steps=6, checkpoint_every=3)
    Trainer(cfg, tiny_data, tmp_path / "a").train()
    before = _run_to(tiny_data, cfg, tmp_path / "b", 3)
    with open(tmp_path / "b" / METRICS, "ab") as f:
        f.write(b'{"run_id": "run", "member": 0, "st')  # a full disk or a host crash mid-line
    capsys.readouterr()
    tr = Trainer(cfg, tiny_data, tmp_path / "b")
    assert tr.resume() and tr.step == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "b" / METRICS) in err[0] and "half-written" in err[0]
    assert (tmp_path / "b" / METRICS).read_bytes() == before
    tr.train()
    assert metrics_without_time(tmp_path / "b") == metrics_without_time(tmp_path / "a")


@pytest.mark.parametrize("bad", [b"not json\n", b"[1, 2]\n", b'{"member": 0}\n', b'{"step": "3"}\n'])
def test_bad_metrics_line_elsewhere_names_file_and_line(tiny_data, tiny_train_config, tmp_path, bad):
    cfg = tiny_train_config(steps=6, checkpoint_every=3)
    lines = _run_to(tiny_data, cfg, tmp_path, 3).splitlines(keepends=True)
    damaged = b"".join(lines[:2] + [bad] + lines[2:])
    (tmp_path / METRICS).write_bytes(damaged)
    with pytest.raises(ValueError, match=f"{METRICS}:3 ") as e:
        Trainer(cfg, tiny_data, tmp_path).resume()
    assert "\n" not in str(e.value)
    assert (tmp_path / METRICS).read_bytes() == damaged  # nothing touched


def test_resume_metrics_rewrite_survives_a_failed_write(tiny_data, tiny_train_config, tmp_path):
    """The rewrite goes to a new file renamed over the old one: a write that fails part-way
    (here: the file size limit, as a full disk would) leaves every line where it was."""
    import resource
    import signal

    cfg = tiny_train_config(steps=8, checkpoint_every=3)
    before = _run_to(tiny_data, cfg, tmp_path, 5)  # checkpoint at 3: the resume drops 2 steps of lines
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    tr = Trainer(cfg, tiny_data, tmp_path)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 3, hard))
        with pytest.raises(OSError) as e:
            tr.resume()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert e.value.filename is not None and METRICS in str(e.value.filename)
    assert (tmp_path / METRICS).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_metrics_reach_the_disk_before_each_checkpoint_commits(tiny_data, tiny_train_config, tmp_path, monkeypatch):
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else fd))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("commit", os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    Trainer(tiny_train_config(steps=6, checkpoint_every=3), tiny_data, tmp_path).train()
    commits = [i for i, (kind, path) in enumerate(events) if kind == "commit" and path.endswith(".json")]
    assert len(commits) == 2
    previous = -1
    for i in commits:  # between the previous commit and this one, metrics.jsonl was fsynced
        assert any(kind == "fsync" and str(path).endswith(METRICS) for kind, path in events[previous + 1 : i]), \
            "metrics not fsynced before this checkpoint's commit"
        previous = i


def test_diverged_member_summary_shows_where_it_stopped(tiny_data, tiny_train_config, tmp_path):
    cfg = tiny_train_config(members=(Member(1e-2, 0.1), Member(1e6, 0.0)), steps=6, optim=OptimConfig(clip=0.0),
                            checkpoint_every=2)
    tr = Trainer(cfg, tiny_data, tmp_path / "a")
    with torch.no_grad():
        tr.model.head[1].fill_(float("nan"))
    tr.train(until=3)
    res = tr.results()
    assert res[1].status == "diverged" and (res[1].steps, res[1].tokens) == (1, 1 * 4 * 16)
    resumed = Trainer(cfg, tiny_data, tmp_path / "a")
    assert resumed.resume()
    res = resumed.train()
    assert (res[0].steps, res[0].tokens) == (6, 6 * 4 * 16)
    assert (res[1].steps, res[1].tokens) == (1, 1 * 4 * 16)  # kept through the checkpoint


def test_validation_bootstrap_is_logged_per_member_at_each_eval(tiny_data, tiny_train_config, tmp_path):
    cfg = tiny_train_config(eval_boot=16)
    tr = Trainer(cfg, tiny_data, tmp_path)
    tr.train()
    recs = _records(tmp_path)
    evals = [r for r in recs if r["val_loss"] is not None]
    assert {r["step"] for r in evals} == {4, 8}
    assert all(r["val_loss_boot"] is None and r["val_loss_se"] is None for r in recs if r["val_loss"] is None)
    # The last eval: the means of the per-window losses under the fixed resamples of the 8 windows.
    assert tr.val_windows.shape == (2, 8)
    assert tr.val_windows.double().mean(1).numpy() == pytest.approx([r["val_loss"] for r in evals[-2:]], rel=1e-6)
    want = boot_means(tr.val_windows, window_resamples(8, 16))
    for r in evals[-2:]:
        assert len(r["val_loss_boot"]) == 16
        assert r["val_loss_boot"] == pytest.approx(list(want[r["member"]]), abs=1e-6)
        assert r["val_loss_se"] == pytest.approx(float(boot_se(want[r["member"]])), rel=1e-9)
        assert r["val_loss_se"] > 0


def test_per_window_losses_leave_the_validation_loss_unchanged(tiny_data, tiny_train_config, tmp_path):
    """evaluate() keeps per-window losses; its mean is bit for bit the model's batch mean."""
    tr = Trainer(tiny_train_config(), tiny_data, tmp_path)
    total = torch.zeros(tr.K)
    with torch.no_grad():
        for x, y in tr.val:
            total += tr.model(x, y)[1] * x.shape[0]
    assert torch.equal(tr.evaluate(), total / sum(x.shape[0] for x, _ in tr.val))


def test_no_bootstrap_logs_no_resamples(tiny_data, tiny_train_config, tmp_path):
    Trainer(tiny_train_config(eval_boot=0, steps=4), tiny_data, tmp_path).train()
    assert all("val_loss_boot" not in r and "val_loss_se" not in r for r in _records(tmp_path))


def test_a_trainer_does_not_start_afresh_over_another_run(tiny_data, tiny_train_config, tmp_path):
    # the CLI refused this (--resume), the Python API overwrote the run's checkpoints and metrics
    Trainer(tiny_train_config(steps=3), tiny_data, tmp_path).train()
    before = (tmp_path / METRICS).read_bytes()
    with pytest.raises(ValueError, match="already holds a run; call resume"):
        Trainer(tiny_train_config(steps=3, members=(Member(1e-3, 0.1),)), tiny_data, tmp_path).train()
    assert (tmp_path / METRICS).read_bytes() == before
    again = Trainer(tiny_train_config(steps=3), tiny_data, tmp_path)
    assert again.resume() and again.train()[0].status == "done"  # resumed: a finished run reads back


@pytest.mark.parametrize("device, kernels, interpret, needle", [
    ("cuda", "cpu", "1", "--kernels cpu is the CPU path; on --device cuda"),  # failed at step 1, run dir written
    ("cpu", "triton", None, "--kernels triton on --device cpu needs TRITON_INTERPRET=1"),
])
def test_kernels_that_cannot_run_on_the_device_are_refused_before_anything(tiny_data, tiny_train_config, tmp_path,
                                                                           monkeypatch, device, kernels, interpret,
                                                                           needle):
    monkeypatch.setattr("trajinv.train.check_device", lambda device: None)  # as on a machine with a GPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(ValueError, match=needle):
        Trainer(tiny_train_config(device=device, kernels=kernels), tiny_data, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    Trainer.check(tiny_train_config(device="cpu", kernels="triton"), tiny_data)  # the interpreter runs it


def test_validation_runs_in_chunks_no_larger_than_a_training_forward(tiny_data, tiny_train_config, tmp_path):
    # the population is sized to fit one training forward; 64 validation sequences of K members' logits
    # at once did not fit a GPU sized for micro-batch 1. The chunks change no loss.
    whole = Trainer(tiny_train_config(batch_size="8", eval_seqs=12), tiny_data, tmp_path / "a")
    split = Trainer(tiny_train_config(batch_size="8", micro_batch=2, eval_seqs=12), tiny_data, tmp_path / "b")
    assert [x.shape[0] for x, _ in whole.val] == [8, 4] and [x.shape[0] for x, _ in split.val] == [2] * 6
    torch.testing.assert_close(split.evaluate(), whole.evaluate(), rtol=1e-6, atol=0)
    torch.testing.assert_close(split.val_windows, whole.val_windows, rtol=1e-6, atol=0)


def test_a_resume_on_other_data_is_refused_and_a_renamed_run_keeps_its_id(tiny_data, tiny_train_config, tmp_path):
    # the corpus is not part of TrainConfig: `train --resume --data other.txt` trained on, silently
    from dataclasses import replace as swap

    cfg = tiny_train_config(steps=4, checkpoint_every=2)
    tok = {"name": "tokenizers-json", "path": "/here/tok.json", "sha256": "1" * 64}
    data = swap(tiny_data, manifest={**tiny_data.manifest, "tokenizer": tok})
    first = Trainer(cfg, data, tmp_path / "a", run_id="a")
    first.train(until=2)
    other = swap(data, manifest={**data.manifest, "content_hash": "0" * 64})
    with pytest.raises(ValueError, match=r"trained on other data \(data\.content_hash"):
        Trainer(cfg, other, tmp_path / "a", run_id="a").resume()
    retok = swap(data, manifest={**data.manifest, "tokenizer": {**tok, "sha256": "2" * 64}})
    with pytest.raises(ValueError, match=r"data\.tokenizer\.sha256"):
        Trainer(cfg, retok, tmp_path / "a", run_id="a").resume()
    # the same text and the same tokenizer.json, each reached by another path: the same corpus
    moved = {**data.manifest, "source": "/elsewhere/same.txt", "tokenizer": {**tok, "path": "/there/tok.json"}}
    (tmp_path / "a").rename(tmp_path / "b")
    again = Trainer(cfg, swap(tiny_data, manifest=moved), tmp_path / "b", run_id="b")
    assert again.resume() and again.run_id == "a"  # renamed folder: the run keeps the id its metrics carry
    again.train()
    assert {r["run_id"] for r in _records(tmp_path / "b")} == {"a"}


def test_a_garbled_metrics_line_past_the_checkpoint_is_dropped_not_refused(tiny_data, tiny_train_config, tmp_path,
                                                                           capsys):
    # a host crash can leave garbage in lines written since the last fsync, i.e. after the checkpoint: the
    # resume drops those lines anyway, yet refused to start over one of them
    cfg = tiny_train_config(steps=6, checkpoint_every=3)
    Trainer(cfg, tiny_data, tmp_path / "a").train()
    _run_to(tiny_data, cfg, tmp_path / "b", 3)
    before = (tmp_path / "b" / METRICS).read_bytes()
    tr = Trainer(cfg, tiny_data, tmp_path / "b")
    tr.resume()
    tr.train(until=5)  # lines of steps 4 and 5, past the checkpoint at 3
    lines = (tmp_path / "b" / METRICS).read_bytes().splitlines(keepends=True)
    past = [i for i, line in enumerate(lines) if json.loads(line)["step"] > 3]
    lines[past[1]] = b"\x00" * 40 + b"\n"  # the second line past it: a line past the checkpoint precedes it
    (tmp_path / "b" / METRICS).write_bytes(b"".join(lines))
    capsys.readouterr()
    again = Trainer(cfg, tiny_data, tmp_path / "b")
    assert again.resume() and again.step == 3
    assert "malformed line" in capsys.readouterr().err
    assert (tmp_path / "b" / METRICS).read_bytes() == before
    again.train()
    assert metrics_without_time(tmp_path / "b") == metrics_without_time(tmp_path / "a")


CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.81 GiB of which "
            "1.02 GiB is free. Including non-PyTorch memory, this process has 138.7 GiB memory in use. If reserved "
            "but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")


def test_running_out_of_memory_is_one_line_naming_the_population_and_what_to_change(tiny_data, tiny_train_config,
                                                                                    tmp_path, monkeypatch):
    # torch's out-of-memory error is a paragraph and a traceback; a sweep's user needs who, where and what to do
    trainer = Trainer(tiny_train_config(steps=4), tiny_data, tmp_path / "r", run_id="bs4-p1")
    forward = Trainer._forward_backward

    def third_step_fails(self, step, bs):
        if step == 2:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return forward(self, step, bs)

    monkeypatch.setattr(Trainer, "_forward_backward", third_step_fails)
    with pytest.raises(DeviceOutOfMemory) as e:
        trainer.train()
    assert isinstance(e.value, MemoryError) and "\n" not in str(e.value)
    assert str(e.value) == ("bs4-p1: 2 members ran out of cpu memory in step 3 (CUDA out of memory. Tried to allocate "
                            "2.00 GiB); train fewer members at once (--population of sweep and tune) or use a "
                            "smaller --micro-batch")

    def broken(self, step, bs):  # any other error is left alone
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(Trainer, "_forward_backward", broken)
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        Trainer(tiny_train_config(steps=4), tiny_data, tmp_path / "s").train()


def test_a_population_too_large_to_build_is_named_too(tiny_data, tiny_train_config, tmp_path, monkeypatch):
    import trajinv.train as train_module

    def cannot(*args, **kwargs):  # the CPU allocator's words
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(train_module, "build_optimizer", cannot)
    with pytest.raises(DeviceOutOfMemory, match=r"^run: 2 members ran out of cpu memory while building the model or loading its checkpoint "
                                                r"\(DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                                                r"1099511627776 bytes\. Error code 12 \(Cannot allocate memory\)\);"):
        Trainer(tiny_train_config(), tiny_data, tmp_path / "r")


def test_out_of_memory_after_a_checkpoint_says_the_members_stay_together(tiny_data, tiny_train_config, tmp_path,
                                                                         monkeypatch):
    # a smaller --population splits only populations without a checkpoint: the advice alone was a dead end
    forward = Trainer._forward_backward

    def late(self, step, bs):
        if step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ...")
        return forward(self, step, bs)

    monkeypatch.setattr(Trainer, "_forward_backward", late)
    run = tmp_path / "r"
    with pytest.raises(DeviceOutOfMemory, match=rf"in step 4 .*\(--population of sweep and tune \(this population "
                                                rf"has checkpointed, so its members stay together: move {run} aside "
                                                r"first\)\) or use a smaller --micro-batch$"):
        Trainer(tiny_train_config(steps=6, checkpoint_every=3), tiny_data, run).train()


def test_out_of_memory_in_an_evaluation_names_it(tiny_data, tiny_train_config, tmp_path, monkeypatch):
    # it was "in step 5" of a 4-step run: the step counter had moved on when the evaluation ran
    def evaluate(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB. GPU 0 has ...")

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    with pytest.raises(DeviceOutOfMemory, match=r"^run: 2 members ran out of cpu memory in the evaluation after step 4 "):
        Trainer(tiny_train_config(steps=4, eval_every=4), tiny_data, tmp_path / "r").train()
