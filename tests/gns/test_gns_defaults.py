"""GNS defaults: both modes measure the same tensors, the regime label resists spikes, the
embedding (opted in) has its near-zero v_hat floored, numerator and denominator skip together."""

import math

import pytest
import torch

from trajinv.config import GNSConfig, Member, ModelConfig
from trajinv.gns import GNSTracker
from trajinv.gns.estimator import REGIME_WINDOW
from trajinv.gns.meter import EMBEDDING, GNSMeter, floor_embedding_w
from trajinv.model import GPT
from trajinv.optim.population import STAT_FIELDS, ParamStats


def _meter(mode, **kw):
    model = GPT(ModelConfig(d_model=32, n_layers=1, n_heads=2, context=16, vocab_size=64), members=2)
    return GNSMeter(dict(model.named_parameters()), 2, GNSConfig(mode=mode, **kw), model.probes)


def test_both_modes_cover_the_same_tensors_by_default():
    assert GNSConfig().embeddings is False
    per_example, micro = _meter("per-example"), _meter("micro-batch")
    assert per_example.covered == micro.covered and EMBEDDING not in micro.covered
    assert EMBEDDING in _meter("micro-batch", embeddings=True).covered


def test_per_example_mode_refuses_the_embedding():
    with pytest.raises(ValueError, match="embeddings"):
        GNSConfig(mode="per-example", embeddings=True)


def _update(tracker, step, tr, g2, b_small=4, b_big=16):
    """Feed the tracker inputs whose estimates are (|G|^2, tr Sigma) = (g2, tr) for member 0."""
    # small = g2 + tr / b_small, big = g2 + tr / b_big  (the expectations the estimator inverts)
    small = torch.tensor([g2 + tr / b_small], dtype=torch.float64)
    big = torch.tensor([g2 + tr / b_big], dtype=torch.float64)
    return tracker.update(step, small, big, small, big, b_small, b_big, preconditioned=True)


def test_regime_statistic_is_not_decided_by_a_few_spikes():
    """Steady B_precond = 20 with spikes like a rare token's row: the EMA is carried off by
    them for dozens of steps, the windowed medians are not."""
    tracker = GNSTracker(1, GNSConfig(mode="micro-batch", ema=0.95))
    for step in range(60):
        spike = step in (40, 47, 55)
        out = _update(tracker, step, tr=(6e6 if spike else 20.0), g2=1.0)
    assert out["b_precond_smooth"][0] > 1e4  # the smoothed value: thousands, as in the issue
    assert out["b_precond_robust"][0] == pytest.approx(20.0)
    assert out["b_precond"][0] == pytest.approx(20.0)  # the last raw step was steady


def test_regime_window_holds_the_last_steps_and_restarts_with_w():
    tracker = GNSTracker(1, GNSConfig(mode="micro-batch", precond_warmup=1))
    for step in range(REGIME_WINDOW + 10):
        out = _update(tracker, step, tr=10.0 if step < 10 else 30.0, g2=1.0)
    assert out["b_precond_robust"][0] == pytest.approx(30.0)  # the first 10 steps left the window
    small = torch.tensor([1.0], dtype=torch.float64)
    out = tracker.update(99, small, small * 0.5, small, small * 0.5, 4, 16, preconditioned=False)
    assert tracker.window_count == 1  # W switched: the window restarted with the W-weighted EMAs
    assert out["b_precond_robust"][0] == pytest.approx(out["b_precond"][0])


def test_numerator_and_denominator_skip_the_same_steps():
    """One overflowing tr(Sigma) (|G|^2 still finite) must not leave |G|^2 averaged over one more step."""
    tracker = GNSTracker(1, GNSConfig(mode="micro-batch", ema=0.5))
    _update(tracker, 0, tr=8.0, g2=2.0)
    small = torch.tensor([4e307], dtype=torch.float64)  # tr = (small - big) * 16/3 overflows; g2 does not
    big = torch.tensor([0.0], dtype=torch.float64)
    out = tracker.update(1, small, big, small, big, 4, 16, preconditioned=True)
    assert math.isfinite(out["g2"][0]) and not math.isfinite(out["tr_sigma"][0])
    state = tracker.state_dict()
    assert state["g2.count"].tolist() == state["tr_sigma.count"].tolist() == [1.0]
    assert state["g2_w.count"].tolist() == state["tr_w_sigma.count"].tolist() == [1.0]
    assert out["b_simple_smooth"][0] == pytest.approx(4.0)


def test_embedding_w_is_floored_at_the_mean_second_moment():
    eps = 1e-8
    v = torch.tensor([[[1e-2, 1e-2], [1e-2, 1e-2], [1e-20, 0.0]],   # member 0: one row of a rare token
                      [[4.0, 4.0], [4.0, 4.0], [4.0, 4.0]]])          # member 1: uniform, untouched
    w = 1.0 / (v.sqrt() + eps)
    floored = floor_embedding_w(w, eps)
    cap0 = 1.0 / (v[0].mean().sqrt() + eps)
    torch.testing.assert_close(floored[0, 2], torch.full((2,), float(cap0)), rtol=1e-6, atol=0)
    torch.testing.assert_close(floored[0, :2], w[0, :2])  # above the mean: unchanged
    torch.testing.assert_close(floored[1], w[1])
    assert float(w[0, 2].max()) > 1e7 and float(floored.max()) < 20


def test_opted_in_embedding_uses_the_floored_w_for_the_big_batch_too():
    """Identical micro-batches have no noise: tr(W Sigma) must come out 0. That needs the
    big-batch |g|_W^2 under the same floored W as the micro-batch sums."""
    meter = _meter("micro-batch", embeddings=True, precond_warmup=1)
    names = meter.covered
    gen = torch.Generator().manual_seed(0)
    params = {n: p for n, p in zip(names, [torch.empty(0)] * len(names))}
    shapes = {n: s.shape for n, s in _shapes().items()}
    W = {n: torch.rand(shapes[n], generator=gen) + 0.5 for n in names}
    W[EMBEDDING][:, 5] = 1e8  # a rare token's row: v_hat ~ 0
    grads = {n: torch.randn(shapes[n], generator=gen) for n in names}
    assert meter.begin_step(3, W)
    M = 4
    for _ in range(M):  # each micro-batch's contribution h_m = g / M
        meter.accumulate({n: g / M for n, g in grads.items()})
    acc = meter.accumulated()
    meter.big_batch(acc)  # (the trainer hands the step's gradient over after any all-reduce)
    # the optimizer's statistics: precond_grad_sq under its own (unfloored) W
    table = torch.stack([torch.stack([(acc[n] ** 2).flatten(1).sum(1), (W[n] * acc[n] ** 2).flatten(1).sum(1),
                                      torch.zeros(2), torch.zeros(2)]) for n in names])
    out = meter.end_step(3, batch_size=8 * M, micro=8, stats=ParamStats(names, table))
    assert params and len(STAT_FIELDS) == 4
    g2_w = float(out["g2_w"][0])
    assert abs(float(out["tr_w_sigma"][0])) < 1e-4 * g2_w * 8 * M, out["tr_w_sigma"]
    assert abs(float(out["tr_sigma"][0])) < 1e-4 * float(out["g2"][0]) * 8 * M


def _shapes():
    model = GPT(ModelConfig(d_model=32, n_layers=1, n_heads=2, context=16, vocab_size=64), members=2)
    return dict(model.named_parameters())


def test_trainer_summary_labels_the_regime_from_the_robust_statistic(tiny_data, tiny_train_config, tmp_path):
    from trajinv.train import Trainer

    cfg = tiny_train_config(members=(Member(1e-2, 0.1),), steps=12, batch_size="8", micro_batch=2,
                            gns=GNSConfig(mode="micro-batch", precond_warmup=2))
    tr = Trainer(cfg, tiny_data, tmp_path)
    res = tr.train()
    robust = tr.gns.tracker.robust()[0]
    assert res[0].extra["b_precond_robust"] == pytest.approx(robust)
    assert res[0].extra["batch_regime"] == ("small" if 8 < robust else "large")


def test_meter_stays_on_the_identity_while_the_optimizer_has_no_state():
    """A measured step past precond_warmup whose optimizer has no W yet (None, or an entry
    missing) must be measured and labelled under W = 1, not as preconditioned."""
    from trajinv.config import ModelConfig
    from trajinv.gns.meter import GNSMeter
    from trajinv.model import GPT
    from trajinv.optim.population import ParamStats

    model = GPT(ModelConfig(d_model=32, n_layers=1, n_heads=2, context=16, vocab_size=64), members=2)
    shapes = dict(model.named_parameters())
    meter = GNSMeter(shapes, 2, GNSConfig(mode="micro-batch", precond_warmup=1), model.probes)
    names = meter.covered
    gen = torch.Generator().manual_seed(0)
    partial = {names[0]: torch.ones(shapes[names[0]].shape)}  # one tensor has state, the others none
    for ws in (None, partial):
        assert meter.begin_step(3, ws)
        assert meter.preconditioned is False and all(w is None for w in meter.W.values())
        for _ in range(2):
            meter.accumulate({n: torch.randn(shapes[n].shape, generator=gen) for n in names})
        acc = meter.accumulated()
        table = torch.stack([torch.stack([(acc[n] ** 2).flatten(1).sum(1), (acc[n] ** 2).flatten(1).sum(1),
                                          torch.zeros(2), torch.zeros(2)]) for n in names])
        out = meter.end_step(3, batch_size=8, micro=4, stats=ParamStats(names, table))
        assert out["w_identity"].all()
        torch.testing.assert_close(out["tr_w_sigma"], out["tr_sigma"])
