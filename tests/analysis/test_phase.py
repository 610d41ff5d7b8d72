"""trajinv.analysis.phase: the equilibrium formulas against real AdamW, and the verdicts on synthetic records."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trajinv.analysis import phase
from trajinv.analysis.phase import (
    DEFAULT_BETA1,
    Criteria,
    MemberPhase,
    equilibrium_relative_update,
    equilibrium_weight_norm,
    format_phases,
    member_phases,
    plot_phases,
    predicted_transition_step,
)

# ------------------------------------------------- real AdamW on a scale-invariant toy problem

NUMEL = 4096
A, B, D = (2e-2, 0.2), (4e-2, 0.1), (2e-2, 0.8)  # A, B: ELR 4e-3 (tau = 250 steps); D: ELR 1.6e-2
TOY_STEPS, TOY_LOG = 1500, 5


def _adamw_toy(settings, beta1: float, seed: int = 0) -> tuple[list[dict], list[float]]:
    """torch.optim.AdamW (decoupled decay) on loss(w) = 1 - (w/|w|) . (3 t + xi), xi ~ N(0, I) a step.

    The loss depends on the direction only, so its gradient is orthogonal to w;
    |xi| = 64 against a signal of 3 makes the gradients noise-dominated. Each
    member starts at 0.3 times its equilibrium norm. Returns metric records (as
    the trainer writes them) and each member's mean rms of the Adam direction
    over the second half.
    """
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(NUMEL, generator=gen)
    target /= target.norm()
    ws = [torch.nn.Parameter(torch.randn(NUMEL, generator=gen)) for _ in settings]
    with torch.no_grad():
        for w, (lr, wd) in zip(ws, settings):
            w.mul_(0.3 * math.sqrt(lr * NUMEL / (2 * wd)) / w.norm())
    opt = torch.optim.AdamW([{"params": [w], "lr": lr, "weight_decay": wd} for w, (lr, wd) in zip(ws, settings)],
                            betas=(beta1, 0.95), eps=1e-12)
    records, rms = [], [[] for _ in settings]
    for step in range(1, TOY_STEPS + 1):
        with torch.no_grad():
            W = torch.stack([w.detach() for w in ws])
            norm = W.norm(dim=1, keepdim=True)
            unit = W / norm
            v = 3.0 * target + torch.randn(len(ws), NUMEL, generator=gen)
            for w, g in zip(ws, -(v - unit * (unit * v).sum(1, keepdim=True)) / norm):
                w.grad = g.clone()
        opt.step()
        if step % TOY_LOG:
            continue
        for k, ((lr, wd), w, old) in enumerate(zip(settings, ws, W)):
            new = w.detach()
            if step > TOY_STEPS // 2:
                rms[k].append(float(((old * (1 - lr * wd) - new) / lr).pow(2).mean().sqrt()))
            records.append({"run_id": f"toy-b{beta1}", "member": k, "name": f"lr={lr:g},wd={wd:g}", "step": step,
                            "lr": lr, "base_lr": lr, "wd": wd, "elr": lr * wd,
                            "train_loss": 1.0 - float(new @ target / new.norm()), "val_loss": None,
                            "status": "running", "weight_norm_matrix": float(new.norm()),
                            "update_norm_matrix": float((new - old).norm())})
    return records, [float(np.mean(r)) for r in rms]


@pytest.fixture(scope="module")
def toy() -> dict[float, tuple[list[dict], list[float], list[tuple[float, float]]]]:
    # Tensors this small only lose by intra-op threads (30x slower on two busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {0.0: (*_adamw_toy([A, B, D], 0.0), [A, B, D]), 0.9: (*_adamw_toy([A, D], 0.9), [A, D])}
    finally:
        torch.set_num_threads(threads)


def _late(records: list[dict], member: int, key: str) -> float:
    """Mean of ``key`` (or of the relative update) over the second half of the toy run."""
    recs = [r for r in records if r["member"] == member and r["step"] > TOY_STEPS // 2]
    if key == "rho":
        return float(np.mean([r["update_norm_matrix"] / r["weight_norm_matrix"] for r in recs]))
    return float(np.mean([r[key] for r in recs]))


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_adamw_relative_update_converges_to_the_equilibrium_value(toy, beta1):
    records, _, settings = toy[beta1]
    for k, (lr, wd) in enumerate(settings):
        measured = _late(records, k, "rho")
        assert measured == pytest.approx(equilibrium_relative_update(lr, wd, beta1), rel=0.03)
        # The wrong formulas are off by far more than that tolerance: the factor 2
        # (sqrt 2 = 1.41) without momentum, the momentum factor (4.4) with it.
        wrong = math.sqrt(lr * wd) if beta1 == 0 else math.sqrt(2 * lr * wd)
        assert abs(measured / wrong - 1) > 0.25


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_adamw_weight_norm_matches_equilibrium_weight_norm(toy, beta1):
    records, rms, settings = toy[beta1]
    for k, (lr, wd) in enumerate(settings):
        predicted = equilibrium_weight_norm(lr, wd, rms[k], NUMEL, beta1)
        assert _late(records, k, "weight_norm_matrix") == pytest.approx(predicted, rel=0.03)
    # Momentum shrinks each step to rms sqrt((1-b)/(1+b)) but leaves the norm alone.
    assert rms[0] == pytest.approx(math.sqrt((1 - beta1) / (1 + beta1)), rel=0.06)


def test_adamw_norm_scales_as_sqrt_lr_over_wd_and_update_with_elr(toy):
    records, _, _ = toy[0.0]
    norm = [_late(records, k, "weight_norm_matrix") for k in range(3)]
    rho = [_late(records, k, "rho") for k in range(3)]
    # B: same ELR as A, lr/wd four times larger; D: ELR four times A's, lr/wd a quarter.
    assert norm[1] / norm[0] == pytest.approx(2.0, rel=0.05)
    assert norm[2] / norm[0] == pytest.approx(0.5, rel=0.05)
    assert rho[1] / rho[0] == pytest.approx(1.0, rel=0.03)
    assert rho[2] / rho[0] == pytest.approx(2.0, rel=0.03)


STRICT = Criteria(rel_tol=0.3)  # the noise-dominated value demanded as well: holds on this toy problem


@pytest.mark.parametrize("beta1", [0.0, 0.9])
@pytest.mark.parametrize("criteria", [Criteria(), STRICT], ids=["stationary", "strict"])
def test_adamw_equilibrium_step_is_of_order_tau(toy, beta1, criteria):
    records, _, settings = toy[beta1]
    phases = member_phases(records, beta1=beta1, criteria=criteria)
    assert [(p.lr, p.wd) for p in phases] == settings
    for p in phases:
        assert p.phase_at_end == "ELR phase"
        assert 0.3 <= p.equilibrium_tau <= 3.0
        assert p.evidence["ratio_end"] == pytest.approx(1.0, abs=0.1)
        assert p.evidence["nu_end"] == pytest.approx(
            _late(records, p.member, "weight_norm_matrix") * math.sqrt(p.wd / p.lr), rel=0.03)
    if beta1 == 0.0:  # A and B share the ELR and equilibrate at the same number of tau
        assert phases[0].equilibrium_tau == pytest.approx(phases[1].equilibrium_tau, rel=0.2)


def test_adamw_wrong_formulas_find_no_equilibrium_when_demanded(toy, monkeypatch):
    records, _, _ = toy[0.9]
    ignored = member_phases(records, beta1=0.0, criteria=STRICT)  # momentum left out of the formula
    assert [p.equilibrium_step for p in ignored] == [None, None]
    assert all(p.evidence["ratio_end"] < 0.3 for p in ignored)
    # The default criterion reads the norm alone: same steps whatever the formula, and ratio_end
    # (the calibration it reports) shows the formula off.
    assert [p.equilibrium_step for p in member_phases(records, beta1=0.0)] == [
        p.equilibrium_step for p in member_phases(records, beta1=0.9)]
    records, _, _ = toy[0.0]
    monkeypatch.setattr(phase, "equilibrium_relative_update", lambda lr, wd, beta1=0.0: math.sqrt(lr * wd))
    no_two = member_phases(records, beta1=0.0, criteria=STRICT)
    assert [p.phase_at_end for p in no_two] == ["LR phase"] * 3
    assert all(p.evidence["ratio_end"] == pytest.approx(math.sqrt(2), rel=0.05) for p in no_two)


# ------------------------------------------------------------------------- formulas


def test_equilibrium_relative_update_closed_forms():
    for a in (1e-4, 4e-3, 0.1, 0.5):
        assert equilibrium_relative_update(a / 0.1, 0.1) == pytest.approx(math.sqrt(2 * a), rel=1e-12)
    # Small lr*wd with momentum: Kosson et al.'s sqrt(2 lr wd (1-b)/(1+b)).
    assert equilibrium_relative_update(1e-3, 0.1, 0.9) == pytest.approx(math.sqrt(2e-4 * 0.1 / 1.9), rel=1e-3)
    assert equilibrium_relative_update(1e-3, 0.0, 0.9) == 0.0
    for bad in [(0.0, 0.1, 0.0), (1e-3, -0.1, 0.0), (1e-3, 0.1, 1.0), (2.0, 0.5, 0.0)]:
        with pytest.raises(ValueError):
            equilibrium_relative_update(*bad)


def test_equilibrium_weight_norm_closed_form():
    lr, wd, rms, n = 3e-3, 0.1, 0.8, 1000
    a = lr * wd
    w = equilibrium_weight_norm(lr, wd, rms, n)
    assert w == pytest.approx(math.sqrt(lr * n * rms**2 / (wd * (2 - a))), rel=1e-12)
    # Without momentum the norm and the relative update balance: (rho w)^2 = a^2 w^2 + lr^2 |u|^2.
    assert (equilibrium_relative_update(lr, wd) * w) ** 2 == pytest.approx(a * a * w * w + lr * lr * n * rms**2)
    assert equilibrium_weight_norm(lr, 0.0, rms, n) == math.inf
    for bad in [(lr, wd, -1.0, n), (lr, wd, rms, 0)]:
        with pytest.raises(ValueError):
            equilibrium_weight_norm(*bad)


def test_default_beta1_is_the_trainers():
    from trajinv.config import OptimConfig

    assert DEFAULT_BETA1 == OptimConfig().betas[0]


# -------------------------------------------------------------- synthetic records per regime

LR, WD, N = 1e-2, 0.1, 10_000  # tau = 1000 steps
TAU = 1.0 / (LR * WD)


def _member(member: int, name: str, loss, *, lr=lambda t: LR, wd: float = WD, steps: int = 8000, every: int = 20,
            kinds=("matrix",), noise: float = 0.05, norm_noise: float = 0.0, status_at: int | None = None,
            seed: int = 0) -> list[dict]:
    """Records of the mean-field AdamW (beta1 = 0, unit-rms directions orthogonal to w, peak lr LR)
    from 0.3 times the equilibrium norm.

    The update norm gets log-normal noise of sd ``noise``, the weight norm of sd ``norm_noise`` (real
    runs: ~0.05), the loss 1% noise;
    ``loss`` may return nan. From ``status_at`` on the member is marked diverged.
    """
    rng = np.random.default_rng(seed)
    w2 = (0.3 * equilibrium_weight_norm(LR, wd, 1.0, N)) ** 2 if wd > 0 else 1.0
    out = []
    for t in range(1, steps + 1):
        eta = lr(t)
        a = eta * wd
        step2 = a * a * w2 + eta * eta * N
        w2 = (1 - a) ** 2 * w2 + eta * eta * N
        if t % every:
            continue
        rec = {"run_id": "syn", "member": member, "name": name, "step": t, "lr": eta, "base_lr": LR, "wd": wd,
               "elr": LR * wd, "train_loss": float(loss(t)) * (1 + 0.01 * rng.standard_normal()),
               "val_loss": None, "status": "diverged" if status_at is not None and t >= status_at else "running"}
        for kind in kinds:
            rec[f"weight_norm_{kind}"] = math.sqrt(w2) * math.exp(norm_noise * rng.standard_normal())
            rec[f"update_norm_{kind}"] = math.sqrt(step2) * math.exp(noise * rng.standard_normal())
        out.append(rec)
    return out


def _plateau(t):
    return 2.0 + 3.5 * math.exp(-t / 500)


def _wsd(t, steps=8000):
    return LR * min(1.0, (steps - t) / (0.2 * steps))


def _wsd_loss(t, steps=8000):
    return _plateau(t) - 0.5 * max(0.0, t - 0.8 * steps) / (0.2 * steps)


def _warmup_cosine(t, steps=30_000, warm=500):
    return LR * (t / warm if t < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - warm) / (steps - warm))))


@pytest.fixture(scope="module")
def synthetic() -> dict[str, MemberPhase]:
    members = [
        _member(0, "chaotic", _plateau),
        _member(1, "wsd", _wsd_loss, lr=_wsd),
        _member(2, "cosine", _plateau, lr=_warmup_cosine, steps=30_000, every=50),
        _member(3, "falling", lambda t: 5.5 * (1 + t / TAU) ** -0.5),
        _member(4, "small-wd", _plateau, wd=1e-4),
        _member(5, "nan", lambda t: _plateau(t) if t < 4000 else math.nan, steps=4020, status_at=4020),
        _member(6, "stuck", lambda t: 5.5),
        _member(7, "blowup", lambda t: 5.5 + t / 2000),
        _member(8, "old", _plateau, kinds=()),
        _member(9, "noisy", _plateau, noise=0.15, norm_noise=0.05, seed=9),
        _member(10, "embedding-only", _plateau, kinds=("embedding",)),
        _member(11, "no-decay", _plateau, wd=0.0),
        _member(12, "old-wsd", _wsd_loss, lr=_wsd, kinds=()),
    ]
    return {p.name: p for p in member_phases([r for m in members for r in m], beta1=0.0)}


def test_constant_lr_reaches_chaotic_equilibrium(synthetic):
    p = synthetic["chaotic"]
    assert (p.phase_at_end, p.regime) == ("ELR phase", "chaotic equilibrium")
    assert 0.3 <= p.equilibrium_tau <= 3.0
    assert p.equilibrium_tau == pytest.approx(p.equilibrium_step / TAU)


def test_wsd_decay_is_neither_divergence_nor_lost_equilibrium(synthetic):
    p, constant = synthetic["wsd"], synthetic["chaotic"]
    assert (p.phase_at_end, p.regime) == ("ELR phase", "chaotic equilibrium")
    # the same relaxation; the level is read where the decay begins (one logged point apart)
    assert p.equilibrium_step == pytest.approx(constant.equilibrium_step, abs=20)
    assert p.evidence["ratio_last"] < 1 / 1.3  # the decay leaves equilibrium behind...
    naive = member_phases(_member(1, "wsd", _wsd_loss, lr=_wsd), beta1=0.0, criteria=Criteria(sched_tol=math.inf))
    assert naive[0].equilibrium_step is None  # ...which counts against it unless decay steps are set aside


def test_equilibrium_value_follows_the_scheduled_lr(synthetic):
    p = synthetic["cosine"]
    assert p.phase_at_end == "ELR phase"
    assert p.equilibrium_step > 500  # not before the warm-up ends
    assert p.evidence["ratio_end"] == pytest.approx(1.0, abs=0.1)
    # its eq tau is theta = wd * sum of the scheduled lr (what the relaxation runs on), not step*lr*wd at the
    # peak lr: the 500-step warm-up and the cosine since then count for less
    assert p.equilibrium_tau == p.evidence["equilibrium_theta"] < p.equilibrium_step * p.lr * p.wd
    records = _member(2, "cosine", _plateau, lr=_warmup_cosine, steps=30_000, every=50)
    for r in records:
        r["lr"] = r["base_lr"]  # as if the equilibrium scaling ignored the schedule
    # |w| follows sqrt(lr_t) down the cosine: read without the schedule, the norm only "settles" in
    # the cosine's flat tail, some 25 tau late
    blind = member_phases(records, beta1=0.0)[0].equilibrium_step
    assert blind is None or blind > 0.8 * 30_000


def test_falling_loss_in_equilibrium_is_convergence(synthetic):
    p = synthetic["falling"]
    assert (p.phase_at_end, p.regime) == ("ELR phase", "convergence")
    assert p.evidence["loss_drop_last_tau"] > 0.02


def test_norm_not_settled_is_lr_phase_and_convergence(synthetic):
    p = synthetic["small-wd"]  # tau = 1e6 steps: the run is far too short
    assert (p.equilibrium_step, p.phase_at_end, p.regime) == (None, "LR phase", "convergence")


@pytest.mark.parametrize("name, reason", [("nan", "status diverged"), ("stuck", "stuck"), ("blowup", "stuck")])
def test_divergence(synthetic, name, reason):
    p = synthetic[name]
    assert p.regime == "divergence"
    assert reason in p.evidence["divergence"]


def test_nonfinite_loss_without_status_is_divergence():
    records = _member(0, "nan", lambda t: _plateau(t) if t < 4000 else math.nan, steps=4020)
    assert member_phases(records, beta1=0.0)[0].evidence["divergence"] == "non-finite loss"


def test_records_without_norms_are_na(synthetic):
    p = synthetic["old"]
    assert (p.equilibrium_step, p.equilibrium_tau, p.phase_at_end) == (None, None, "n/a")
    assert p.regime == "chaotic equilibrium"  # the loss alone: a plateau
    assert "no matrix norms" in p.evidence["reason"]
    # The plateau is read before a terminal decay whether or not norms were logged.
    assert synthetic["old-wsd"].regime == "chaotic equilibrium"


def test_kind_selects_the_norms(synthetic):
    assert synthetic["embedding-only"].phase_at_end == "n/a"
    records = _member(10, "embedding-only", _plateau, kinds=("embedding",))
    assert member_phases(records, "embedding", beta1=0.0)[0].phase_at_end == "ELR phase"
    with pytest.raises(ValueError, match="kind"):
        member_phases(records, "bias")


def test_noisy_norms_are_smoothed(synthetic):
    p = synthetic["noisy"]
    assert 0.3 <= p.equilibrium_tau <= 3.0
    assert p.evidence["ratio_end"] == pytest.approx(1.0, abs=0.1)  # the trailing median of a noisy ratio
    records = _member(9, "noisy", _plateau, noise=0.15, norm_noise=0.05, seed=9)
    raw = member_phases(records, beta1=0.0, criteria=Criteria(smooth_points=1))[0]
    # Unsmoothed, a noisy point leaves the band again and again: found late, if at all.
    assert raw.equilibrium_tau is None or raw.equilibrium_tau > 3.0


def test_drifting_norm_is_not_equilibrium_even_with_balanced_updates():
    # Relative update exactly at its equilibrium value throughout, but the norm
    # grows by half an e-fold per tau until 4 tau, then holds.
    records = [{**r, "weight_norm_matrix": 10 * math.exp(0.5 * min(r["step"] / TAU, 4.0)),
                "update_norm_matrix": 10 * math.exp(0.5 * min(r["step"] / TAU, 4.0)) * math.sqrt(2 * LR * WD)}
               for r in _member(0, "drifting", _plateau)]
    p = member_phases(records, beta1=0.0)[0]
    assert p.phase_at_end == "ELR phase"
    # found once the norm is within norm_tol of where it stops: ln(1.15) / 0.5 = 0.28 tau before 4 tau
    assert 4.0 - 2 * math.log1p(Criteria().norm_tol) - 0.05 < p.equilibrium_tau < 4.0
    # Still growing at the end: never settled, however balanced the updates.
    growing = [{**r, "weight_norm_matrix": 10 * math.exp(0.5 * r["step"] / TAU),
                "update_norm_matrix": 10 * math.exp(0.5 * r["step"] / TAU) * math.sqrt(2 * LR * WD)}
               for r in _member(0, "drifting", _plateau)]
    q = member_phases(growing, beta1=0.0)[0]
    assert (q.equilibrium_step, q.phase_at_end) == (None, "LR phase")
    assert q.evidence["drift_end"] == pytest.approx(0.5, abs=0.01)


def test_relative_update_below_the_derived_value_still_reaches_equilibrium(synthetic):
    """Real transformer runs settle at 0.5-0.8 of the noise-dominated value (module docstring): the
    default criterion reads the norm and finds the same equilibrium; the strict one refuses it."""
    records = [{**r, "update_norm_matrix": 0.6 * r["update_norm_matrix"]} for r in _member(0, "chaotic", _plateau)]
    p = member_phases(records, beta1=0.0)[0]
    assert p.equilibrium_step == synthetic["chaotic"].equilibrium_step
    assert p.evidence["ratio_end"] == pytest.approx(0.6, rel=0.05)
    assert member_phases(records, beta1=0.0, criteria=Criteria(rel_tol=0.3))[0].phase_at_end == "LR phase"


def test_no_weight_decay_has_no_equilibrium(synthetic):
    p = synthetic["no-decay"]
    assert (p.phase_at_end, p.regime) == ("LR phase", "convergence")
    assert "wd = 0" in p.evidence["reason"]


def test_relogged_steps_keep_the_last_record():
    good = _member(0, "chaotic", _plateau)
    stale = [{**r, "update_norm_matrix": 10 * r["update_norm_matrix"]} for r in good[len(good) // 2:]]
    assert member_phases(good[: len(good) // 2] + stale + good[len(good) // 2:], beta1=0.0) == member_phases(
        good, beta1=0.0)


def test_records_without_basic_keys_are_rejected():
    with pytest.raises(ValueError, match="base_lr"):
        member_phases([{"run_id": "r", "member": 0, "step": 1, "lr": 1e-3, "wd": 0.1}])


# ---------------------------------------------------------------- sweep level and output


def _phase(step, phase_at_end="ELR phase", regime="chaotic equilibrium", name="m", member=0) -> MemberPhase:
    return MemberPhase("r", member, name, 1e-2, 0.1, step, None if step is None else step * 1e-3, phase_at_end,
                       regime, {"ratio_end": 1.02, "drift_end": 0.01})


def test_predicted_transition_step_is_the_step_by_which_half_are_in_equilibrium():
    assert predicted_transition_step([_phase(300), _phase(100), _phase(200)]) == 200.0
    assert predicted_transition_step([_phase(100), _phase(200), _phase(None)]) == 200.0
    # exactly half got there: by step 300 half are in equilibrium (a median of inf and 300 said None)
    assert predicted_transition_step([_phase(100), _phase(None), _phase(300), _phase(None)]) == 300.0
    assert predicted_transition_step([_phase(100), _phase(None), _phase(None), _phase(None)]) is None
    assert predicted_transition_step([_phase(400), _phase(100), _phase(300), _phase(200)]) == 200.0
    # Members without norms and diverged members cannot equilibrate: left out.
    mixed = [_phase(None, "n/a"), _phase(200), _phase(400, regime="divergence"), _phase(None, "n/a")]
    assert predicted_transition_step(mixed) == 200.0
    assert predicted_transition_step([_phase(None, "n/a")]) is None


def test_format_phases_table():
    text = format_phases([_phase(1500, name="a"), _phase(None, "LR phase", "convergence", name="bb", member=1)])
    head, first, second = text.splitlines()
    assert head.split() == ["run", "member", "name", "lr", "wd", "elr", "eq", "step", "eq", "tau", "phase",
                            "regime", "ratio", "drift"]
    assert "1500" in first and "1.50" in first and "ELR phase" in first and "chaotic equilibrium" in first
    assert second.split()[6:8] == ["-", "-"]
    assert head.index("phase") == first.index("ELR phase") == second.index("LR phase")


def test_plot_phases_writes_png(synthetic, tmp_path, monkeypatch):
    records = _member(0, "chaotic", _plateau) + _member(8, "old", _plateau, kinds=())
    phases = member_phases(records, beta1=0.0)
    out = plot_phases(records, phases, tmp_path / "phases.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in tmp_path.iterdir()] == ["phases.png"]  # no temporary left behind
    figures = []
    monkeypatch.setattr(phase, "save_png", lambda fig, path: figures.append(fig))
    plot_phases(records, phases, tmp_path / "again.png")
    top, bottom = figures[0].axes[:2]
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["chaotic (chaotic equilibrium)"]
    assert top.get_xscale() == "log"
    marked = [ln for ln in top.lines if ln.get_linestyle() == ":"]
    assert [ln.get_xdata()[0] for ln in marked] == [pytest.approx(phases[0].equilibrium_tau)]
    # the criterion on top (nu over its level, the band around 1), the calibration below
    assert top.get_ylabel().startswith("nu / nu_end") and bottom.get_ylabel().startswith("|dw|/|w|")
    assert top.lines[0].get_ydata()[-1] == pytest.approx(1.0, abs=0.02)
    assert [ln.get_xdata()[0] for ln in bottom.lines if ln.get_linestyle() == ":"] == [
        pytest.approx(phases[0].equilibrium_tau)]


def test_plot_phases_labels_its_log_axes_in_plain_numbers(tmp_path, monkeypatch):
    """The panels' log axes span under a decade of nu and of the update ratio: matplotlib labelled their minor
    ticks "4x10^-1", "6x10^-1", "2x10^0" and theta's decades "10^-1", "10^0"; they read "0.4", "2", "0.1"."""
    records = _member(0, "chaotic", _plateau) + _member(1, "wsd", _wsd_loss, lr=_wsd)
    figures = []
    monkeypatch.setattr(phase, "save_png", lambda fig, path: figures.append(fig))
    plot_phases(records, member_phases(records, beta1=0.0), tmp_path / "phases.png")
    (fig,) = figures
    fig.canvas.draw()
    for ax in fig.axes[:2]:
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            shown = [t.get_text() for t in axis.get_ticklabels(minor=False) + axis.get_ticklabels(minor=True)
                     if t.get_visible() and t.get_text() and lo <= t.get_position()[axis is ax.yaxis] <= hi]
            assert len(shown) >= 2, shown
            for text in shown:
                assert "10^" not in text and "\\times" not in text and "$" not in text, shown
                assert float(text) > 0, shown  # a plain number
        assert {"0.1", "1"} <= {t.get_text() for t in ax.get_xticklabels()}  # theta's decades


@pytest.mark.parametrize("warmup", [0, 2000])
def test_plot_phases_fades_a_terminal_decay_that_the_verdict_does_not_judge(tmp_path, monkeypatch, warmup):
    """Under WSD the decay lifts nu ~2x above its level (|w| follows lr_t more weakly than sqrt(lr_t)); drawn
    solid, that tail read as a run ending twice its level "at the end". The judged part ends at its level,
    and frames the panel: a warmup's nu (lr_t near 0) is not judged either."""
    records = _member(1, "wsd", _wsd_loss, lr=lambda t: _wsd(t) * min(1.0, t / warmup) if warmup else _wsd(t))
    phases = member_phases(records, beta1=0.0)
    figures = []
    monkeypatch.setattr(phase, "save_png", lambda fig, path: figures.append(fig))
    plot_phases(records, phases, tmp_path / "wsd.png")
    top, bottom = figures[0].axes[:2]
    solid = [ln for ln in top.lines if ln.get_linestyle() == "-" and len(ln.get_xdata()) > 2]  # not the 1.0 rule
    faded = [ln for ln in top.lines if ln.get_linestyle() == "--"]
    assert len(solid) == 1 and len(faded) == 1 and faded[0].get_alpha() < 1
    # the last quasi-static step: lr within 10% of its peak, step 6560 of the decay from 6400 (theta 6.55)
    lost = warmup / 2 * LR * WD  # theta a linear warmup does not accrue
    assert solid[0].get_xdata()[-1] == pytest.approx(6.4 + 160 * 0.95 * LR * WD - lost, abs=0.03)
    assert solid[0].get_ydata()[-1] == pytest.approx(1.0, abs=0.05)  # at its level where the verdict is read
    assert faded[0].get_xdata()[0] == solid[0].get_xdata()[-1]
    assert faded[0].get_xdata()[-1] == pytest.approx(7.2 - lost, abs=0.03)  # the end: 6.4 + 0.5 * 1600 * LR * WD
    assert faded[0].get_ydata()[-1] > 1.3  # the decay's lift, shown but set apart
    lo, hi = top.get_ylim()  # framed on the judged part and the band: the lift leaves through the top
    assert 1.15 < hi < min(2.0, max(faded[0].get_ydata()))
    if not warmup:
        assert lo < min(solid[0].get_ydata())
    assert len([ln for ln in bottom.lines if ln.get_linestyle() == "--"]) == 1
    assert "last steady-lr step" in top.get_title()


def test_plot_phases_of_a_grid_colours_by_elr(tmp_path, monkeypatch):
    """More members than phase.MAX_LEGEND: no legend entry each (it would bury the axes) but a colorbar
    of ELR, and the regimes counted."""
    wds = [WD * 2.0 ** k for k in range(phase.MAX_LEGEND + 1)]
    records = [r for i, wd in enumerate(wds) for r in _member(i, f"m{i}", _plateau, wd=wd, steps=2000, every=40)]
    figures = []
    monkeypatch.setattr(phase, "save_png", lambda fig, path: figures.append(fig))
    plot_phases(records, member_phases(records, beta1=0.0), tmp_path / "grid.png")
    top, bottom, bar = figures[0].axes
    assert top.get_legend() is None and bar.get_ylabel() == "ELR = lr*wd"
    assert bar.get_ylim() == pytest.approx((LR * wds[0], LR * wds[-1]))
    assert bottom.get_title().startswith("regimes: ")


def test_plot_phases_without_norms_and_bad_suffix(tmp_path):
    records = _member(8, "old", _plateau, kinds=())
    assert plot_phases(records, member_phases(records), tmp_path / "old.png").is_file()
    with pytest.raises(ValueError, match="png"):
        plot_phases(records, member_phases(records), tmp_path / "old.jpg")


# ---------------------------------------------------------------- a real population

def test_regimes_of_a_real_population_spanning_a_wide_elr_range(tiny_data, tmp_path):
    """Kodryan et al.'s three regimes on real training (the fused optimizer logs the norms): a tiny
    ELR still descends in the LR phase, a large one sits on a plateau in equilibrium, an absurd lr
    never gets below its initial loss."""
    from trajinv.analysis.records import load_metrics
    from trajinv.config import Member, ModelConfig, TrainConfig
    from trajinv.train import Trainer

    cfg = TrainConfig(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, context=16),
                      members=(Member(1e-3, 0.01), Member(0.1, 3.0), Member(3.0, 0.1)), steps=300, batch_size="8",
                      eval_every=100, eval_seqs=8, log_every=5, checkpoint_every=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small only lose by intra-op threads
    try:
        Trainer(cfg, tiny_data, tmp_path).train()
    finally:
        torch.set_num_threads(threads)
    slow, fast, absurd = member_phases(load_metrics(tmp_path))
    assert (slow.phase_at_end, slow.regime) == ("LR phase", "convergence")  # tau = 1e5 steps
    assert slow.evidence["drift_end"] > 1.0  # its norm is still growing fast, in units of its tau
    assert (fast.phase_at_end, fast.regime) == ("ELR phase", "chaotic equilibrium")  # tau = 3.3 steps
    assert fast.equilibrium_step < 200 and fast.evidence["loss_drop_last_tau"] < 0.02
    assert 0.3 < fast.evidence["ratio_end"] < 1.0  # below the noise-dominated value, as on larger runs
    assert absurd.regime == "divergence" and "stuck" in absurd.evidence["divergence"]


def _with_vocab(records: list[dict], vocab: int = 256) -> list[dict]:
    return [{**r, "vocab_size": vocab} for r in records]


def test_the_initial_loss_is_a_uniform_guess_when_the_records_carry_the_vocabulary():
    # the first *logged* loss comes log_every steps in: a healthy run has fallen far by then (its end looked
    # "stuck" beside it) and a blown-up one risen far (falling back from it looked like convergence)
    healthy = _member(0, "healthy", lambda t: 3.0 + 2.0 * math.exp(-t / 5))  # fallen to ~3.04 at the first record
    blown = _member(1, "blown", lambda t: 4096.0 * math.exp(-t / 2000))  # 4096 -> ~74: finite, far above ln 256
    old = {p.name: p for p in member_phases(healthy + blown, beta1=0.0)}
    assert (old["healthy"].regime, old["blown"].regime) == ("divergence", "convergence")  # the old reading
    new = {p.name: p for p in member_phases(_with_vocab(healthy + blown), beta1=0.0)}
    assert new["healthy"].regime != "divergence" and new["blown"].regime == "divergence"
    assert new["healthy"].evidence["initial_loss"] == pytest.approx(math.log(256))


def test_a_member_whose_decay_flips_the_weights_is_na_not_an_error():
    # trainable before the config refused it (lr*wd >= 1): old sweeps hold such members
    records = _member(0, "flip", _plateau, wd=0.1) + [
        {**r, "member": 1, "name": "lr=10,wd=1", "base_lr": 10.0, "lr": 10.0, "wd": 1.0, "elr": 10.0}
        for r in _member(1, "x", lambda t: 1000.0)]
    phases = {p.name: p for p in member_phases(records, beta1=0.0)}
    assert phases["lr=10,wd=1"].phase_at_end == "n/a" and "lr*wd = 10 >= 1" in phases["lr=10,wd=1"].evidence["reason"]
    assert phases["flip"].phase_at_end != "n/a"


def test_equilibrated_counts_what_the_prediction_reads():
    from trajinv.analysis.phase import equilibrated

    mixed = [_phase(None, "n/a"), _phase(200), _phase(None), _phase(None), _phase(400, regime="divergence")]
    assert equilibrated(mixed) == (1, 3) and predicted_transition_step(mixed) is None
    assert equilibrated([_phase(100), _phase(None)]) == (1, 2)


# --- behaviours a mutation pass found unpinned


def test_equilibrium_weight_norm_takes_a_zero_update_and_a_single_weight():
    assert equilibrium_weight_norm(3e-3, 0.1, 0.0, 1000) == 0.0
    assert equilibrium_weight_norm(3e-3, 0.1, 0.8, 1) == pytest.approx(equilibrium_weight_norm(3e-3, 0.1, 0.8, 100) / 10)


def test_records_without_run_id_or_member_are_one_member_zero():
    records = [{k: v for k, v in r.items() if k not in ("run_id", "member")} for r in _member(3, "bare", _plateau)]
    (p,) = member_phases(records, beta1=0.0)
    assert (p.run_id, p.member) == ("", 0)


def test_a_window_reaches_back_to_exactly_min_points_and_no_further():
    theta = np.arange(10.0)  # one tau per record: a 0.5-tau window holds one point, min_points makes it 5
    assert phase._window_starts(theta, 0.5, 5).tolist() == [-1, -1, -1, -1, 0, 1, 2, 3, 4, 5]
    assert phase._window_starts(theta, 3.0, 2).tolist() == [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6]


def test_window_medians_include_both_ends_of_each_window():
    x = np.array([1.0, 2.0, 30.0, np.nan])
    out = phase._window_medians(x, np.array([0, 1, 2, -1]), np.array([0, 2, 3, 3]))
    assert out[:3].tolist() == [1.0, 16.0, 30.0] and math.isnan(out[3])  # nan left out; lo < 0: no window


def test_a_run_shorter_than_the_plateau_look_back_has_no_loss_drop():
    p = member_phases(_member(0, "short", _plateau, steps=500), beta1=0.0)[0]  # half a tau
    assert p.evidence["loss_drop_last_tau"] is None and p.regime == "convergence"


def test_the_plateau_look_back_is_measured_from_the_first_record():
    records = _member(0, "x", _plateau, steps=1040)  # theta 0.02 at the first record, 1.04 at the last
    del records[1]  # the second now at theta 0.06: 0.98 of a tau from it to the end, 1.02 from the first
    assert member_phases(records, beta1=0.0)[0].evidence["loss_drop_last_tau"] is not None
    assert member_phases(_member(0, "x", _plateau, steps=1000), beta1=0.0)[0].evidence["loss_drop_last_tau"] is None


def test_without_the_vocabulary_the_initial_loss_is_the_first_logged_one():
    # the first record's loss, however far the second has fallen from it
    p = member_phases(_member(0, "x", lambda t: 10.0 if t <= 20 else 5.0 * (1 + t / TAU) ** -0.1), beta1=0.0)[0]
    assert p.evidence["initial_loss"] == pytest.approx(10.0, rel=0.05) and p.regime != "divergence"


def test_an_end_loss_of_exactly_ninety_percent_of_ln_v_is_stuck():
    level = (1 - Criteria().stuck_frac) * math.log(256)
    records = [{**r, "train_loss": level} for r in _with_vocab(_member(0, "x", _plateau))]
    assert member_phases(records, beta1=0.0)[0].regime == "divergence"


def test_the_verdicts_are_read_at_the_last_quasi_static_record():
    records = _member(0, "chaotic", _plateau)  # constant lr: every record quasi-static
    p = member_phases(records, beta1=0.0)[0]
    assert p.evidence["weight_norm_end"] == records[-1]["weight_norm_matrix"]


def test_a_member_whose_decay_is_exactly_one_per_step_is_na():
    records = [{**r, "base_lr": 10.0, "lr": 10.0, "wd": 0.1, "elr": 1.0} for r in _member(0, "x", _plateau)]
    p = member_phases(records, beta1=0.0)[0]
    assert p.phase_at_end == "n/a" and "lr*wd = 1 >= 1" in p.evidence["reason"]


def test_plot_phases_of_a_grid_colours_each_member_by_its_elr(tmp_path, monkeypatch):
    from matplotlib import colormaps

    wds = [WD * 2.0 ** -k for k in range(phase.MAX_LEGEND + 1)]  # ELR falling as lr/wd rises
    records = [r for i, wd in enumerate(wds) for r in _member(i, f"m{i}", _plateau, wd=wd, steps=400, every=40)]
    figures = []
    monkeypatch.setattr(phase, "save_png", lambda fig, path: figures.append(fig))
    plot_phases(records, member_phases(records, beta1=0.0), tmp_path / "grid.png")
    top = figures[0].axes[0]
    curves = [ln for ln in top.lines if ln.get_linestyle() != ":"][: len(wds)]
    assert curves[0].get_color() == pytest.approx(colormaps["viridis"](1.0))  # the largest ELR
    assert curves[-1].get_color() == pytest.approx(colormaps["viridis"](0.0))  # the smallest
    band = top.patches[0].get_bbox()  # the criterion: a factor 1 + norm_tol either side of the level
    assert (band.y0, band.y1) == pytest.approx((1 / (1 + Criteria().norm_tol), 1 + Criteria().norm_tol))
