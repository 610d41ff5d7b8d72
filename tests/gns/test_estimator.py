"""Gradient-noise-scale estimator: unbiasedness on a synthetic problem, scaling, EMA, tracker.

The synthetic problem has a known mean gradient G, covariance Sigma (low rank +
diagonal) and a positive diagonal W. Per-example gradients are drawn from
N(G, Sigma); the test forms exactly what the kernels would return (sums of
squared contributions of a mean loss) and checks that over many independent
trials the mean estimate is within 3 standard errors of the truth. The trials
are the leading (member) axis, so everything is one vectorised draw.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from trajinv.gns import (
    DebiasedEMA,
    GNSConfig,
    GNSTracker,
    micro_batch_sq_mean,
    noise_scale,
    per_example_sq_mean,
    precond_active,
    small_big_estimates,
)
from trajinv.gns.estimator import REGIME_WINDOW

D = 50
TRIALS = 2000
M, b = 4, 4  # micro-batches per step and examples per micro-batch
B = M * b


class Problem:
    """Known G, Sigma = U U^T + diag(d), positive W; draws per-example gradients."""

    def __init__(self, seed: int = 0, weighted: bool = True) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.gen = gen
        self.G = 0.3 * torch.randn(D, generator=gen, dtype=torch.float64)
        self.U = 0.5 * torch.randn(D, 3, generator=gen, dtype=torch.float64)
        self.d = 0.5 + torch.rand(D, generator=gen, dtype=torch.float64)
        self.W = (0.2 + 1.8 * torch.rand(D, generator=gen, dtype=torch.float64)) if weighted \
            else torch.ones(D, dtype=torch.float64)
        sigma_diag = (self.U**2).sum(1) + self.d
        self.tr_w_sigma = float((self.W * sigma_diag).sum())
        self.g2_w = float((self.W * self.G**2).sum())

    def draw(self, *shape: int) -> torch.Tensor:
        """Per-example gradients of shape (*shape, D) ~ N(G, Sigma)."""
        a = torch.randn(*shape, 3, generator=self.gen, dtype=torch.float64)
        e = torch.randn(*shape, D, generator=self.gen, dtype=torch.float64)
        return self.G + a @ self.U.T + self.d.sqrt() * e

    def sq(self, x: torch.Tensor) -> torch.Tensor:
        """|x|_W^2 over the last axis."""
        return (self.W * x**2).sum(-1)


def z_score(samples: torch.Tensor, truth: float) -> float:
    """(mean - truth) in standard errors of the mean over the trials."""
    se = samples.std() / math.sqrt(samples.numel())
    return float((samples.mean() - truth) / se)


def per_example_raw(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """What the per-example probe + optimizer stats give: S = sum_n |C_n|^2, |sum_n C_n|^2."""
    g = p.draw(TRIALS, B)
    C = g / B  # contributions to the gradient of the mean loss over B examples
    return p.sq(C).sum(1), p.sq(C.sum(1))


def micro_batch_raw(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """What the accumulation kernel gives: sum_m |h_m|^2, and |sum_m h_m|^2."""
    g = p.draw(TRIALS, M, b)
    h = g.mean(2) / M  # micro-batch m's contribution: its mean loss divided by M
    return p.sq(h).sum(1), p.sq(h.sum(1))


@pytest.mark.parametrize("weighted", [True, False], ids=["W", "identity"])
@pytest.mark.parametrize("mode", ["per-example", "micro-batch"])
def test_estimates_unbiased(mode: str, weighted: bool) -> None:
    p = Problem(seed=1 if weighted else 2, weighted=weighted)
    if mode == "per-example":
        raw, big = per_example_raw(p)
        small, b_small = per_example_sq_mean(raw, B), 1
    else:
        raw, big = micro_batch_raw(p)
        small, b_small = micro_batch_sq_mean(raw, M), b
    g2, tr = small_big_estimates(small, big, b_small, B)
    assert abs(z_score(g2, p.g2_w)) < 3
    assert abs(z_score(tr, p.tr_w_sigma)) < 3
    # the problem is informative: truth is resolved well away from 0 by the trials
    assert p.g2_w / (g2.std() / math.sqrt(TRIALS)) > 10
    assert p.tr_w_sigma / (tr.std() / math.sqrt(TRIALS)) > 10


@pytest.mark.parametrize("mode", ["per-example", "micro-batch"])
def test_wrong_scaling_is_rejected(mode: str) -> None:
    """The 3-SE check has power: a missing or doubled n-factor is caught."""
    p = Problem(seed=3)
    raw, big = per_example_raw(p) if mode == "per-example" else micro_batch_raw(p)
    n, b_small = (B, 1) if mode == "per-example" else (M, b)
    for wrong_small in (raw, raw * n * n):  # forgot the factor n / applied it twice
        g2, tr = small_big_estimates(wrong_small, big, b_small, B)
        assert abs(z_score(tr, p.tr_w_sigma)) > 10
        assert abs(z_score(g2, p.g2_w)) > 3


def test_tracker_estimates_unbiased_over_members() -> None:
    """Same check through GNSTracker, trials as members, W active."""
    p = Problem(seed=4)
    raw_w, big_w = per_example_raw(p)
    tracker = GNSTracker(TRIALS, GNSConfig(mode="per-example", precond_warmup=1))
    out = tracker.update(5, per_example_sq_mean(raw_w, B), big_w,
                         per_example_sq_mean(raw_w, B), big_w, 1, B)
    assert abs(z_score(out["g2_w"], p.g2_w)) < 3
    assert abs(z_score(out["tr_w_sigma"], p.tr_w_sigma)) < 3
    assert torch.allclose(out["grad_norm_w"] ** 2, big_w)
    assert not out["w_identity"].any()


def test_smoothed_noise_scale_converges() -> None:
    """Ratio of EMAs approaches tr(W Sigma)/|G|_W^2, unlike single-step ratios."""
    p = Problem(seed=5)
    K, steps = 8, 300
    tracker = GNSTracker(K, GNSConfig(mode="micro-batch", precond_warmup=1, ema=0.99))
    h = p.draw(steps, K, M, b).mean(3) / M  # one vectorised draw for all steps
    smalls, bigs = micro_batch_sq_mean(p.sq(h).sum(2), M), p.sq(h.sum(2))
    for step in range(steps):
        out = tracker.update(step + 1, smalls[step], bigs[step], smalls[step], bigs[step], b, B)
    truth = p.tr_w_sigma / p.g2_w
    rel = (out["b_precond_smooth"] / truth - 1).abs()
    assert float(rel.max()) < 0.35, (out["b_precond_smooth"], truth)
    assert float(rel.mean()) < 0.15


def test_small_big_exact_on_expectations() -> None:
    """Fed the exact expectations E|g_B|^2 = |G|^2 + tr/B, it returns |G|^2 and tr."""
    g2_true = torch.tensor([0.0, 1.0, 2.5, 1e-3], dtype=torch.float64)
    tr_true = torch.tensor([5.0, 0.0, 40.0, 1e3], dtype=torch.float64)
    for bs, bb in [(1, 2), (1, 512), (3, 7), (32, 8192)]:
        g2, tr = small_big_estimates(g2_true + tr_true / bs, g2_true + tr_true / bb, bs, bb)
        assert g2.dtype == tr.dtype == torch.float64
        torch.testing.assert_close(g2, g2_true, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(tr, tr_true, atol=1e-9, rtol=1e-9)
    # float32 inputs, empty and 2-D leading shapes are fine
    g2, tr = small_big_estimates(torch.ones(2, 3), torch.ones(2, 3) * 0.5, 1, 2)
    assert g2.shape == tr.shape == (2, 3)
    assert small_big_estimates(torch.empty(0), torch.empty(0), 1, 4)[0].shape == (0,)


def test_scaling_helpers() -> None:
    s = torch.tensor([1.0, 2.0], dtype=torch.float32)
    torch.testing.assert_close(per_example_sq_mean(s, 16), torch.tensor([16.0, 32.0], dtype=torch.float64))
    torch.testing.assert_close(micro_batch_sq_mean(s, 4), torch.tensor([4.0, 8.0], dtype=torch.float64))
    for bad in (0, -2):
        with pytest.raises(ValueError, match=str(bad)):
            per_example_sq_mean(s, bad)
        with pytest.raises(ValueError, match=str(bad)):
            micro_batch_sq_mean(s, bad)
    with pytest.raises(TypeError, match="2.5"):
        micro_batch_sq_mean(s, 2.5)


@pytest.mark.parametrize("bs,bb", [(4, 4), (8, 4), (0, 4), (1, 1)])
def test_small_big_bad_sizes(bs: int, bb: int) -> None:
    with pytest.raises(ValueError, match=f"{bs}|{bb}"):
        small_big_estimates(torch.ones(1), torch.ones(1), bs, bb)


def test_noise_scale_degenerate_cases() -> None:
    inf, nan = float("inf"), float("nan")
    tr = torch.tensor([4.0, -1.0, 0.0, 3.0, 3.0, -2.0, 0.0, nan, 1.0, inf])
    g2 = torch.tensor([2.0, 2.0, 2.0, 0.0, -1.0, -1.0, 0.0, 1.0, nan, 1.0])
    want = torch.tensor([2.0, 0.0, 0.0, inf, inf, nan, nan, nan, nan, nan], dtype=torch.float64)
    torch.testing.assert_close(noise_scale(tr, g2), want, equal_nan=True)


def test_tracker_negative_estimate_reports_consistently() -> None:
    """Raw estimates are kept as they are; B follows the same rule raw and smoothed."""
    inf = float("inf")
    tracker = GNSTracker(2, GNSConfig(mode="micro-batch", ema=0.5))
    # member 0: big > small -> tr < 0 (B = 0); member 1: 8|g_big|^2 < 2|g_small|^2 -> g2 < 0 (B = inf)
    small_0, big_0 = torch.tensor([1.0, 10.0]), torch.tensor([2.0, 1.0])
    out = tracker.update(0, None, None, small_0, big_0, 2, 8)
    g2_0, tr_0 = small_big_estimates(small_0, big_0, 2, 8)
    torch.testing.assert_close(out["g2"], g2_0)
    torch.testing.assert_close(out["tr_sigma"], tr_0)
    assert out["tr_sigma"][0] < 0 and out["g2"][1] < 0
    torch.testing.assert_close(out["b_simple"], torch.tensor([0.0, inf], dtype=torch.float64))
    torch.testing.assert_close(out["b_simple_smooth"], out["b_simple"])
    torch.testing.assert_close(out["b_precond"], out["b_simple"])  # W = 1 during warm-up
    # a healthy step next: the smoothed B is the ratio of the debiased EMAs
    small_1, big_1 = torch.tensor([3.0, 3.0]), torch.tensor([1.0, 1.0])
    out = tracker.update(1, None, None, small_1, big_1, 2, 8)
    g2_1, tr_1 = small_big_estimates(small_1, big_1, 2, 8)
    assert (out["b_simple"] > 0).all() and torch.isfinite(out["b_simple"]).all()
    g2_s = (0.5 * g2_1 + 0.25 * g2_0) / 0.75
    tr_s = (0.5 * tr_1 + 0.25 * tr_0) / 0.75
    torch.testing.assert_close(out["b_simple_smooth"], noise_scale(tr_s, g2_s))
    # member 1's smoothed |G|^2 is still <= 0 here, so its smoothed B is inf, not a ratio
    assert g2_s[1] <= 0 and out["b_simple_smooth"][1] == inf


def test_debiased_ema() -> None:
    ema = DebiasedEMA(0.9, (3,))
    assert torch.isnan(ema.value).all()
    x1 = torch.tensor([1.0, -2.0, 5.0])
    torch.testing.assert_close(ema.update(x1), x1.double())  # debiased: first value exact
    for _ in range(5):  # a constant stays constant at every step
        torch.testing.assert_close(ema.update(x1), x1.double())
    ema = DebiasedEMA(0.8, (2,))
    xs = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), torch.tensor([-1.0, 4.0])]
    raw = torch.zeros(2, dtype=torch.float64)
    for t, x in enumerate(xs, start=1):
        raw = 0.8 * raw + 0.2 * x.double()
        torch.testing.assert_close(ema.update(x), raw / (1 - 0.8**t))
    # non-finite inputs are skipped for that element only
    before = ema.value.clone()
    out = ema.update(torch.tensor([float("nan"), 1.0]))
    assert out[0] == before[0] and out[1] != before[1]
    assert ema.count.tolist() == [3.0, 4.0]
    ema.reset()
    assert torch.isnan(ema.value).all()
    # beta = 0: no smoothing
    ema0 = DebiasedEMA(0.0, (1,))
    assert torch.isnan(ema0.value).all()
    ema0.update(torch.tensor([2.0]))
    assert ema0.update(torch.tensor([7.0])).item() == 7.0
    with pytest.raises(ValueError, match="1.0"):
        DebiasedEMA(1.0)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        DebiasedEMA(0.5, (2,)).update(torch.ones(3))


def test_tracker_outputs_per_member() -> None:
    K = 3
    cfg = GNSConfig(mode="micro-batch", precond_warmup=2)
    tracker = GNSTracker(K, cfg)
    small_1, big_1 = torch.tensor([4.0, 5.0, 6.0]), torch.tensor([1.0, 2.0, 3.0])
    small_w, big_w = small_1 * 0.5, big_1 * 0.25
    keys = {"grad_norm", "grad_norm_w", "tr_sigma", "tr_w_sigma", "g2", "g2_w", "b_simple",
            "b_precond", "b_simple_smooth", "b_precond_smooth", "b_precond_robust", "w_identity"}
    for step in range(4):
        out = tracker.update(step, small_w, big_w, small_1, big_1, 4, 16)
        assert set(out) == keys
        assert all(v.shape == (K,) for v in out.values())
        assert out["w_identity"].dtype == torch.bool
        assert bool(out["w_identity"].all()) == (step < 2) == (not precond_active(step, cfg))
        torch.testing.assert_close(out["grad_norm"], big_1.double().sqrt())
        g2, tr = small_big_estimates(small_1, big_1, 4, 16)
        torch.testing.assert_close(out["g2"], g2)
        torch.testing.assert_close(out["tr_sigma"], tr)
        torch.testing.assert_close(out["b_simple"], tr / g2)
    # explicit flag overrides the schedule; W inputs required when preconditioned
    with pytest.raises(ValueError, match="step 0"):
        GNSTracker(K, cfg).update(0, None, None, small_1, big_1, 4, 16, preconditioned=True)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        tracker.update(5, small_w, big_w, small_1[:2], big_1, 4, 16)
    with pytest.raises(ValueError, match="b_small == 1, got 4"):
        GNSTracker(K, GNSConfig(mode="per-example")).update(0, None, None, small_1, big_1, 4, 16)


def test_weighted_ema_restarts_when_preconditioner_activates() -> None:
    K = 2
    tracker = GNSTracker(K, GNSConfig(mode="micro-batch", precond_warmup=3, ema=0.9))
    small_a, big_a = torch.tensor([5.0, 8.0]), torch.tensor([2.0, 3.0])  # W = 1 phase
    small_b, big_b = torch.tensor([0.5, 0.9]), torch.tensor([0.1, 0.2])  # Adam's W
    for step in range(3):
        out = tracker.update(step, None, None, small_a, big_a, 2, 8)
        torch.testing.assert_close(out["b_precond_smooth"], out["b_simple_smooth"])
    out = tracker.update(3, small_b, big_b, small_a, big_a, 2, 8)
    assert not out["w_identity"].any()
    # restarted: the smoothed weighted B is exactly this step's, no W = 1 history mixed in
    torch.testing.assert_close(out["b_precond_smooth"], out["b_precond"])
    assert tracker.state_dict()["g2_w.count"].tolist() == [1.0, 1.0]
    # the unweighted EMAs carry on
    assert tracker.state_dict()["g2.count"].tolist() == [4.0, 4.0]
    out = tracker.update(4, small_b, big_b, small_a, big_a, 2, 8)
    torch.testing.assert_close(out["b_precond_smooth"], out["b_precond"])  # constant input


def test_state_dict_round_trip(tmp_path) -> None:
    cfg = GNSConfig(mode="micro-batch", precond_warmup=2, ema=0.8)
    gen = torch.Generator().manual_seed(0)
    steps = [(torch.rand(4, generator=gen) + 1, torch.rand(4, generator=gen)) for _ in range(5)]
    a = GNSTracker(4, cfg)
    for step, (s, g) in enumerate(steps[:2]):  # stop in the W = 1 phase
        a.update(step, s * 0.5, g * 0.5, s, g, 4, 32)
    path = tmp_path / "gns.safetensors"
    save_file(a.state_dict(), str(path))
    c = GNSTracker(4, cfg)
    c.load_state_dict(load_file(str(path)))
    for step, (s, g) in enumerate(steps[2:], start=2):  # crosses the switch after loading
        out_a = a.update(step, s * 0.5, g * 0.5, s, g, 4, 32)
        out_c = c.update(step, s * 0.5, g * 0.5, s, g, 4, 32)
        for key in out_a:
            torch.testing.assert_close(out_c[key], out_a[key], equal_nan=True)
    assert c.state_dict()["g2_w.count"].tolist() == [3.0] * 4  # restarted at step 2, after the load
    # a state for a different member count is refused without touching the tracker
    before = c.state_dict()
    with pytest.raises(ValueError, match=r"\(4,\)"):
        GNSTracker(3, cfg).load_state_dict(before)
    bad = dict(before)
    bad["tr_w_sigma.count"] = torch.zeros(5)
    with pytest.raises(ValueError, match="tr_w_sigma.count"):
        c.load_state_dict(bad)
    for key, value in c.state_dict().items():
        torch.testing.assert_close(value, before[key], equal_nan=True)
    with pytest.raises(KeyError, match="g2.ema"):
        c.load_state_dict({"preconditioned": torch.tensor([1])})
    with pytest.raises(ValueError, match="preconditioned"):
        c.load_state_dict({k: v for k, v in before.items() if k != "preconditioned"})


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"mode": "per_example"}, ValueError, "'per_example'"),
        ({"mode": "on"}, ValueError, "'on'"),
        ({"precond_warmup": 0}, ValueError, "got 0"),
        ({"precond_warmup": -3}, ValueError, "-3"),
        ({"precond_warmup": 2.5}, TypeError, "2.5"),
        ({"precond_warmup": True}, TypeError, "True"),
        ({"ema": 1.0}, ValueError, "1.0"),
        ({"ema": -0.1}, ValueError, "-0.1"),
        ({"ema": "0.9"}, TypeError, "'0.9'"),
    ],
)
def test_bad_config(kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        GNSConfig(**kwargs)


def test_config_defaults_and_off_mode() -> None:
    cfg = GNSConfig()
    assert (cfg.mode, cfg.precond_warmup, cfg.ema, cfg.enabled) == ("off", 10, 0.95, False)
    assert not precond_active(9, cfg) and precond_active(10, cfg)
    with pytest.raises(ValueError, match="'off'"):
        GNSTracker(2, cfg)
    with pytest.raises(ValueError, match="members.*0"):
        GNSTracker(0, GNSConfig(mode="micro-batch"))


def test_weighted_outputs_come_from_the_weighted_inputs():
    """grad_norm_w and raw b_precond must use the W inputs, not the unweighted ones."""
    tracker = GNSTracker(2, GNSConfig(mode="micro-batch", precond_warmup=1))
    small_1, big_1 = torch.tensor([4.0, 6.0], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    small_w, big_w = torch.tensor([3.0, 1.5], dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64)
    out = tracker.update(3, small_w, big_w, small_1, big_1, 4, 16)
    g2_w, tr_w = small_big_estimates(small_w, big_w, 4, 16)
    g2_1, tr_1 = small_big_estimates(small_1, big_1, 4, 16)
    assert (g2_w > 0).all() and (tr_w > 0).all() and not torch.allclose(tr_w / g2_w, tr_1 / g2_1)
    torch.testing.assert_close(out["grad_norm_w"], big_w.sqrt())
    torch.testing.assert_close(out["grad_norm"], big_1.sqrt())
    torch.testing.assert_close(out["b_precond"], noise_scale(tr_w, g2_w))
    torch.testing.assert_close(out["b_precond_smooth"], noise_scale(tr_w, g2_w))  # first step: EMA = raw
    torch.testing.assert_close(out["b_precond_robust"], noise_scale(tr_w, g2_w))


@pytest.mark.parametrize("small_w, big_w", [(4e307, 0.0),      # tr(W Sigma) overflows, |G|_W^2 finite
                                            (1e308, 1e308)])   # |G|_W^2 overflows (nan), tr(W Sigma) = 0
def test_weighted_numerator_and_denominator_skip_together_when_only_w_overflows(small_w, big_w):
    tracker = GNSTracker(1, GNSConfig(mode="micro-batch", ema=0.5))
    one = lambda x: torch.tensor([x], dtype=torch.float64)
    tracker.update(0, one(3.0), one(1.0), one(3.0), one(1.0), 4, 16, preconditioned=True)
    out = tracker.update(1, one(small_w), one(big_w), one(3.0), one(1.0), 4, 16, preconditioned=True)
    assert not (math.isfinite(out["g2_w"][0]) and math.isfinite(out["tr_w_sigma"][0]))
    state = tracker.state_dict()
    assert state["g2.count"].tolist() == state["tr_sigma.count"].tolist() == [2.0]  # plain inputs were fine
    assert state["g2_w.count"].tolist() == state["tr_w_sigma.count"].tolist() == [1.0]
    g2, tr = small_big_estimates(one(3.0), one(1.0), 4, 16)
    assert out["b_precond_smooth"][0] == pytest.approx(float(tr / g2))


def _feed(tracker, step, tr, g2=1.0, b_small=4, b_big=16):
    small = torch.tensor([g2 + tr / b_small], dtype=torch.float64)
    big = torch.tensor([g2 + tr / b_big], dtype=torch.float64)
    return tracker.update(step, small, big, small, big, b_small, b_big, preconditioned=True)


def test_robust_statistic_is_the_true_median_over_an_even_window():
    tracker = GNSTracker(1, GNSConfig(mode="micro-batch"))
    _feed(tracker, 0, tr=10.0)
    out = _feed(tracker, 1, tr=30.0)
    assert out["b_precond_robust"][0] == pytest.approx(20.0)  # median of (10, 30), not 10 or 30


def test_regime_window_is_32_steps_and_keeps_rolling():
    """README: the regime is the median over the last 32 measured steps."""
    assert REGIME_WINDOW == 32
    tracker = GNSTracker(1, GNSConfig(mode="micro-batch"))
    step = 0
    for tr in [10.0] * 18 + [30.0] * 14:  # 32 steps: 18 of 10, 14 of 30 -> median 10
        out = _feed(tracker, step, tr)
        step += 1
    assert out["b_precond_robust"][0] == pytest.approx(10.0)
    for _ in range(40):  # 40 more steps at 30: every early step has left the window
        out = _feed(tracker, step, 30.0)
        step += 1
    assert out["b_precond_robust"][0] == pytest.approx(30.0)
    for _ in range(20):  # and back: 20 of the last 32 at 10
        out = _feed(tracker, step, 10.0)
        step += 1
    assert out["b_precond_robust"][0] == pytest.approx(10.0)
