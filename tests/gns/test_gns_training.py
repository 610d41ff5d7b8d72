"""Gradient noise scale in the trainer: both modes, agreement, logs, summary, resume, off costs nothing."""

import json
import math

import numpy as np
import pytest
import torch

from trajinv.config import Member, ModelConfig, OptimConfig
from trajinv.gns import GNSConfig
from helpers import metrics_without_time
from trajinv.train import METRICS, Trainer


def _cfg(tiny_train_config, mode, **kw):
    base = dict(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, context=32), members=(Member(1e-2, 0.1),),
                steps=100, batch_size="16", micro_batch=2, eval_every=100, log_every=1, checkpoint_every=0,
                gns=GNSConfig(mode=mode, precond_warmup=5, embeddings=False))
    base.update(kw)
    return tiny_train_config(**base)


def _records(path):
    return [json.loads(line) for line in (path / METRICS).read_text().splitlines()]


def _ratio_of_means(recs, num, den):
    a, b = np.array([r[num] for r in recs]), np.array([r[den] for r in recs])
    rel_se = math.hypot(a.std() / a.mean(), b.std() / b.mean()) / math.sqrt(len(a))
    return a.mean() / b.mean(), rel_se


def test_per_example_and_micro_batch_agree_within_noise(tiny_data, tiny_train_config, tmp_path):
    """Same run, same tensors measured: B_simple and B_precond agree within 3 standard errors."""
    out = {}
    for mode in ("per-example", "micro-batch"):
        Trainer(_cfg(tiny_train_config, mode), tiny_data, tmp_path / mode).train()
        out[mode] = _records(tmp_path / mode)[20:]
    for num, den in (("tr_sigma", "g2"), ("tr_w_sigma", "g2_w")):
        b_pe, se_pe = _ratio_of_means(out["per-example"], num, den)
        b_mb, se_mb = _ratio_of_means(out["micro-batch"], num, den)
        assert b_pe > 0 and b_mb > 0
        assert abs(math.log(b_pe / b_mb)) < 3 * math.hypot(se_pe, se_mb), (num, b_pe, b_mb)


def test_logs_identity_warmup_then_preconditioned(tiny_data, tiny_train_config, tmp_path):
    Trainer(_cfg(tiny_train_config, "per-example", steps=8), tiny_data, tmp_path).train()
    recs = _records(tmp_path)
    assert [r["gns_w_identity"] for r in recs] == [True] * 5 + [False] * 3
    for key in ("gns_grad_norm", "gns_grad_norm_w", "tr_sigma", "tr_w_sigma", "b_simple", "b_precond",
                "b_simple_smooth", "b_precond_smooth"):
        assert key in recs[-1]
    # Under W = 1 the weighted and plain quantities coincide.
    assert recs[0]["tr_w_sigma"] == pytest.approx(recs[0]["tr_sigma"])


def test_gns_does_not_change_training(tiny_data, tiny_train_config, tmp_path):
    losses = {}
    for mode in ("off", "per-example", "micro-batch"):
        Trainer(_cfg(tiny_train_config, mode, steps=5), tiny_data, tmp_path / mode).train()
        losses[mode] = [r["train_loss"] for r in _records(tmp_path / mode)]
    assert losses["per-example"] == pytest.approx(losses["off"], rel=1e-5)
    assert losses["micro-batch"] == pytest.approx(losses["off"], rel=1e-5)
    assert "b_precond" not in _records(tmp_path / "off")[0]


def test_off_attaches_no_probes(tiny_data, tiny_train_config, tmp_path, monkeypatch):
    """GNS off: no meter, no probe ever attached, and no probed kernel runs while training."""
    import trajinv.ops as ops

    def forbidden(*a, **k):
        raise AssertionError("a GNS probe kernel ran with GNS off")

    monkeypatch.setattr(ops, "linear_weight_grad_with_norms", forbidden)
    monkeypatch.setattr(ops.R, "rmsnorm_gain_grad_with_norms", forbidden)
    tr = Trainer(_cfg(tiny_train_config, "off", steps=2), tiny_data, tmp_path)
    assert tr.gns is None and tr.model.probes == {}
    tr.train()
    assert tr.step == 2 and tr.model.probes == {}
    assert not any(k.startswith(("gns_", "b_")) for k in _records(tmp_path)[-1])


def test_summary_records_noise_scale_and_regime(tiny_data, tiny_train_config, tmp_path):
    res = Trainer(_cfg(tiny_train_config, "per-example", steps=30), tiny_data, tmp_path).train()
    assert res[0].extra["b_precond"] is not None and res[0].extra["b_precond"] > 0
    b = res[0].extra["b_precond_robust"]  # the label's statistic: robust to spikes
    assert b is not None and b > 0
    assert res[0].extra["batch_regime"] == ("small" if 16 < b else "large")


def test_a_diverged_members_summary_keeps_its_noise_scales_from_where_it_stopped(tiny_data, tiny_train_config,
                                                                                    tmp_path, monkeypatch):
    # member 1 turns NaN at step 6; 40 measured steps later its robust window (32 steps) held only NaN:
    # b_precond_robust and batch_regime were lost while the smoothed b_precond kept its last value
    cfg = _cfg(tiny_train_config, "micro-batch", steps=46, members=(Member(1e-2, 0.1), Member(2e-2, 0.1)),
               gns=GNSConfig(mode="micro-batch", precond_warmup=2))
    forward_backward = Trainer._forward_backward

    def poisoned(self, step, bs):
        if step == 6:
            self.model.head.data[1].fill_(float("nan"))
        return forward_backward(self, step, bs)

    monkeypatch.setattr(Trainer, "_forward_backward", poisoned)
    res = Trainer(cfg, tiny_data, tmp_path).train()
    assert res[1].status == "diverged" and res[0].status == "done"
    healthy = [r for r in _records(tmp_path) if r["member"] == 1 and r["step"] == 6][0]  # its last healthy step
    for key in ("b_precond_smooth", "b_simple_smooth", "b_precond_robust"):
        assert healthy[key] is not None and math.isfinite(healthy[key]), key
    extra = res[1].extra
    assert extra["b_precond"] == pytest.approx(healthy["b_precond_smooth"], rel=1e-6)
    assert extra["b_precond_robust"] == pytest.approx(healthy["b_precond_robust"], rel=1e-6)
    assert extra["batch_regime"] == ("small" if 16 < extra["b_precond_robust"] else "large")


@pytest.mark.parametrize("optimizer", ["torch", "fused"])
def test_resume_with_gns_is_bit_identical(tiny_data, tiny_train_config, tmp_path, optimizer, interrupted_run):
    # resume at step 4, after the identity warm-up: W must come from the restored optimizer state
    cfg = _cfg(tiny_train_config, "micro-batch", steps=10, checkpoint_every=4, optim=OptimConfig(name=optimizer),
               gns=GNSConfig(mode="micro-batch", precond_warmup=2))
    Trainer(cfg, tiny_data, tmp_path / "a").train()
    start, resumed = interrupted_run(cfg, tmp_path / "b", stop_at=6)
    assert start == 4
    assert resumed == metrics_without_time(tmp_path / "a")


@pytest.mark.parametrize("micro", [0, 3, 16])
def test_micro_batch_mode_needs_two_equal_micro_batches(tiny_data, tiny_train_config, tmp_path, micro):
    with pytest.raises(ValueError, match="micro-batch"):
        Trainer(_cfg(tiny_train_config, "micro-batch", micro_batch=micro), tiny_data, tmp_path)


def test_every_nth_step_measured_and_probes_detached_between(tiny_data, tiny_train_config, tmp_path):
    cfg = _cfg(tiny_train_config, "per-example", steps=6, gns=GNSConfig(mode="per-example", every=3))
    tr = Trainer(cfg, tiny_data, tmp_path)
    tr.train(until=2)
    assert tr.model.probes == {}  # step 1 was not measured: plain autograd
    tr.train()
    recs = _records(tmp_path)
    measured = [r["step"] for r in recs if "b_precond" in r]
    assert measured == [1, 4]  # steps 0 and 3 (0-based), logged after the update
    # every later logged line carries the running estimates as they stand (--gns-every 10 --log-every 10
    # used to log none at all): unchanged until the next measured step
    assert all("b_precond_smooth" in r and "b_precond_robust" in r for r in recs)
    assert recs[1]["b_precond_smooth"] == recs[2]["b_precond_smooth"]
    assert recs[1]["b_precond_smooth"] == pytest.approx(recs[0]["b_precond_smooth"], rel=1e-6)  # kept in fp32


def test_bad_gns_every():
    with pytest.raises(ValueError, match="every"):
        GNSConfig(mode="micro-batch", every=0)


@pytest.mark.parametrize("mode", ["per-example", "micro-batch"])
def test_triton_code_path_matches_cpu_path(tiny_data, tiny_train_config, tmp_path, mode):
    """The trainer on the GPU code path (Triton AdamW and GNS kernels, interpreter) equals the CPU path."""
    base = dict(model=ModelConfig(d_model=16, n_layers=1, n_heads=2, context=8), members=(Member(1e-2, 0.1),
                Member(2e-2, 0.5)), steps=3, batch_size="4", micro_batch=2, eval_every=3, eval_seqs=4,
                log_every=1, optim=OptimConfig(name="fused"),
                # no embedding: its never-seen rows have W = 1/eps = 1e8, which turns fp32 summation-order
                # differences into visible ones (|G|_W^2 is then a difference of ~1e9-sized terms)
                gns=GNSConfig(mode=mode, precond_warmup=1, embeddings=False))
    runs = {}
    for kernels in ("torch", "triton"):
        Trainer(tiny_train_config(**base, kernels=kernels), tiny_data, tmp_path / kernels).train()
        runs[kernels] = _records(tmp_path / kernels)
    assert len(runs["torch"]) == len(runs["triton"]) == 6
    for a, b in zip(runs["torch"], runs["triton"]):
        for key in ("train_loss", "grad_norm", "precond_grad_norm", "weight_norm", "update_norm",
                    "tr_sigma", "tr_w_sigma", "g2", "g2_w"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), key


def _regime_cfg(tiny_train_config, kind, every=1, **kw):
    from trajinv.config import ScheduleConfig

    return _cfg(tiny_train_config, "micro-batch", steps=40, members=(Member(1e-2, 0.1), Member(3e-2, 0.1)),
                gns=GNSConfig(mode="micro-batch", precond_warmup=2, every=every),
                schedule=ScheduleConfig(kind=kind, warmup=4, decay_fraction=0.5), **kw)


@pytest.mark.parametrize("kind, every", [("wsd", 1), ("cosine", 1), ("constant", 1), ("wsd", 4)])
def test_the_regime_reads_b_precond_robust_where_the_lr_is_still_at_least_half_its_peak(
        tiny_data, tiny_train_config, tmp_path, kind, every):
    # an annealed lr's tail inflates B_precond (|G| falls toward its floor, the noise stays): the regime's
    # statistic is the robust one at the last measured step with lr >= REGIME_LR_FRACTION of the peak
    from trajinv.gns.estimator import REGIME_LR_FRACTION
    from trajinv.schedules import lr_multiplier

    cfg = _regime_cfg(tiny_train_config, kind, every)
    res = Trainer(cfg, tiny_data, tmp_path).train()
    last = max(s for s in range(0, cfg.steps, every)  # measured: the multiples of every
               if lr_multiplier(s, cfg.steps, cfg.schedule) >= REGIME_LR_FRACTION)
    assert (last == cfg.steps - 1) == (kind == "constant")
    if every > 1:  # the last step with that lr was not measured: the reading is the measured one before it
        assert lr_multiplier(last + 1, cfg.steps, cfg.schedule) >= REGIME_LR_FRACTION
    recs = _records(tmp_path)
    for k, r in enumerate(res):
        at = {rec["step"]: rec for rec in recs if rec["member"] == k}
        # a record's step counts updates done: step s (0-based) is logged as s + 1
        assert r.extra["b_precond_regime"] == pytest.approx(at[last + 1]["b_precond_robust"], rel=1e-6)
        assert r.extra["b_precond_robust"] == pytest.approx(at[cfg.steps]["b_precond_robust"], rel=1e-6)
        assert r.extra["batch_regime"] == ("small" if 16 < r.extra["b_precond_regime"] else "large")
        if kind != "constant":  # the tail moved it: the two statistics are not the same number
            assert r.extra["b_precond_regime"] != pytest.approx(r.extra["b_precond_robust"], rel=1e-3)


def test_the_regime_statistic_survives_a_resume_and_an_older_checkpoint_falls_back(
        tiny_data, tiny_train_config, tmp_path, monkeypatch):
    cfg = _regime_cfg(tiny_train_config, "wsd", checkpoint_every=10)
    whole = Trainer(cfg, tiny_data, tmp_path / "a").train()
    # killed after step 35 (checkpoint at 30, in the decay past the regime's step 29): resumed from the checkpoint
    Trainer(cfg, tiny_data, tmp_path / "b").train(until=35)
    resumed = Trainer(cfg, tiny_data, tmp_path / "b")
    assert resumed.resume() and resumed.step == 30
    assert [r.extra for r in resumed.train()] == [r.extra for r in whole]
    # a checkpoint of an earlier trajinv holds no regime statistic: the summary reads the robust one at the end,
    # as that version did, instead of a NaN or a value of another step
    state_tensors = Trainer._state_tensors
    monkeypatch.setattr(Trainer, "_state_tensors", lambda self: {k: v for k, v in state_tensors(self).items()
                                                                  if k != "regime_b"})
    Trainer(cfg, tiny_data, tmp_path / "c").train(until=35)
    old = Trainer(cfg, tiny_data, tmp_path / "c")
    assert old.resume() and old.step == 30
    out = old.train()
    assert [r.extra["b_precond_regime"] for r in out] == [r.extra["b_precond_robust"] for r in out]
    assert [r.extra["b_precond_robust"] for r in out] == [r.extra["b_precond_robust"] for r in whole]
    # one from before the regime's step (checkpoint 20): the steps after the resume read it as a fresh run does
    Trainer(cfg, tiny_data, tmp_path / "d").train(until=25)
    early = Trainer(cfg, tiny_data, tmp_path / "d")
    assert early.resume() and early.step == 20
    assert [r.extra for r in early.train()] == [r.extra for r in whole]


def test_a_nan_reading_keeps_the_regime_statistic_and_inf_labels_the_batch_small(tiny_data, tiny_train_config,
                                                                                  tmp_path, monkeypatch):
    # a NaN reading at a step with lr >= half the peak is no reading: it used to erase the statistic, and the
    # summary then fell back to the inflated end-of-run value; +inf (noise and no signal resolved) gave no label
    from trajinv.gns.meter import GNSMeter

    cfg = _regime_cfg(tiny_train_config, "wsd")
    whole = Trainer(cfg, tiny_data, tmp_path / "a").train()
    end_step = GNSMeter.end_step

    def spoiled(self, step, *a, **k):
        out = end_step(self, step, *a, **k)
        if step == 29:  # the regime's step: member 0 reads NaN, member 1 +inf
            out["b_precond_robust"] = torch.tensor([math.nan, math.inf], dtype=out["b_precond_robust"].dtype)
        return out

    monkeypatch.setattr(GNSMeter, "end_step", spoiled)
    res = Trainer(cfg, tiny_data, tmp_path / "b").train()
    recs = {(r["member"], r["step"]): r for r in _records(tmp_path / "b")}
    assert res[0].extra["b_precond_regime"] == pytest.approx(recs[0, 29]["b_precond_robust"], rel=1e-6)
    assert res[0].extra["b_precond_regime"] != whole[0].extra["b_precond_robust"]
    assert res[1].extra["b_precond_regime"] is None and res[1].extra["batch_regime"] == "small"


def test_a_batch_schedules_label_compares_its_smallest_batch_as_the_tune_does(tiny_data, tiny_train_config, tmp_path):
    # the summary labelled a 4@0.5,16 run against 16 while the tune's regime compared 4 (the phase that makes
    # the transition): one member read "large" in summary.csv and "small batch" in tune.json
    from trajinv.tune.fit import classify_regime

    cfg = _cfg(tiny_train_config, "micro-batch", steps=8, batch_size="4@0.5,16", micro_batch=2,
               gns=GNSConfig(mode="micro-batch", precond_warmup=2))
    trainer = Trainer(cfg, tiny_data, tmp_path)
    trainer.train()
    for b, label in ((10.0, "small"), (3.0, "large"), (20.0, "small")):
        trainer.regime_b.fill_(b)
        assert {r.extra["batch_regime"] for r in trainer.results()} == {label}
        regime = classify_regime(b, 16, 8, 1e-2, 0.1, schedule=(4, 16))
        assert regime.small_batch == (label == "small")
