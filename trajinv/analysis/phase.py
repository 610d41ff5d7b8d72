"""Whether and when each member reached rotational equilibrium, and its regime, from its own records.

Early in training loss curves depend on lr alone (LR phase), late on ELR = lr*wd
alone (ELR phase; Li et al. 2025). The switch is the weight norm of the
scale-invariant matrices settling where weight decay balances the growth from
the updates (Kosson et al. 2023, "rotational equilibrium"): once there, the
norm and the relative update depend on lr*wd only, and the memory of the
initial norm decays as exp(-2 * theta), theta = wd * sum_s lr_s (the number of
tau = 1/(lr*wd) elapsed). This module reads that off one run's logged weight
and update norms, no grid needed.

Derivation (AdamW, torch convention, noise-dominated)
-----------------------------------------------------
Per step ``w' = r w - eta u`` with ``a = eta*lambda``, ``r = 1 - a`` and
``u = m_hat / (sqrt(v_hat) + eps)`` the Adam direction, of per-element rms
``rho_u``. Scale invariance makes the gradient orthogonal to ``w``.

*Without momentum* (beta1 = 0) ``u_t`` is orthogonal to ``w_t``, so
``E|w'|^2 = r^2 |w|^2 + eta^2 |u|^2`` and at equilibrium
``|w|^2 = eta |u|^2 / (lambda (2 - a))``. The step is ``dw = -a w - eta u``
(decay plus update, orthogonal), ``|dw|^2 = a^2 |w|^2 + eta^2 |u|^2
= (a^2 + a(2 - a)) |w|^2``: **|dw|/|w| = sqrt(2 eta lambda)** exactly, the decay
part ``a`` and the rotation ``sqrt(a(2 - a))`` summing in squares to ``2a``.
This uses only stationarity and orthogonality, no noise model.

*With momentum* the directions are correlated over ~1/(1 - beta1) steps and
``u_t`` is no longer orthogonal to ``w_t`` (which contains ``-eta u_{t-1}``).
For noise-dominated gradients (independent across steps; ``v_hat`` the noise
variance) ``E[u_s . u_t] = N rho_u^2 beta1^|s-t|`` with
``rho_u^2 = (1 - beta1)/(1 + beta1)``. Unrolling ``w_t = -eta sum_j r^j u_{t-1-j}``:

    E|w|^2     = eta^2 N rho_u^2 (1 + r b) / ((1 - r^2)(1 - r b))        (b = beta1)
    E[w_t.u_t] = -eta N rho_u^2 b / (1 - r b)
    |dw|^2/|w|^2 = a^2 + a (2 - a) (1 - b - a b) / (1 + b - a b)

which is ``2a`` at b = 0 and ``2a (1 - b)/(1 + b)`` for small ``a`` (Kosson et
al.'s AdamW value; 0.229 * sqrt(2a) at b = 0.9), while the norm stays
``sqrt(eta N / (2 lambda))`` (gradients of unit variance after Adam's scaling):
momentum shrinks each step, but the correlated steps add up to the same growth.

Neglected: any gradient *signal* (coherent across steps, it raises the b > 0
value towards sqrt(2a)), fluctuations of v_hat and eps, bias correction, the
matrices being only approximately scale-invariant, and mean ratio vs ratio of
means (N large).

Measurement
-----------
``rho_t = update_norm_<kind> / weight_norm_<kind>`` of one record (the norm after
the step; it differs from the one before by O(a)), divided by the equilibrium
value at that record's *scheduled* lr. Single steps are noisy, so the ratio is
the median over a trailing window; windows are measured in theta, the clock of
the relaxation, so warm-up and decay stretch them in steps. ``nu = |w| sqrt(wd/lr_t)``
is the norm with its (quasi-static) equilibrium scaling taken out.

Why the criterion is stationarity, not the derived value
--------------------------------------------------------
On the scale-invariant toy problem of the tests the measured ratio settles at
1.00 +- 0.03 of the value above. On real transformer runs it does not: the
old 3x3 demo sweep (tiny, batch 32, constant lr, 800 steps) settles at 0.5-0.8
of it, lower for lower lr, while the norm has long stopped moving. Pre-norm
blocks make the matrices only partly scale-invariant (a component of the
gradient along w), and gradient signal and clipping are outside the noise model.
A criterion "ratio within 30% of the derived value" therefore called every
member of that sweep LR phase although its spreads switch to ELR at step 250.
So equilibrium is detected from what defines it, the norm no longer relaxing
(`norm_tol`, `drift_tol`), and the derived value is reported beside it
(``ratio_end``: measured over derived) as a calibration; ``Criteria(rel_tol=0.3)``
also demands it, for problems where the noise-dominated model holds.

Criteria (defaults in `Criteria`)
---------------------------------
=====================  ===============================================  ===============================================
verdict                criterion                                        why
=====================  ===============================================  ===============================================
quasi-static step      lr within 10% of its peak, and varied <= 10%     the norm relaxes on that time; a decay (WSD,
                       over the last 1/(2 lr_t wd) steps                cosine) is neither equilibrium nor a
                                                                        departure from it, and on real runs |w|
                                                                        follows a decaying lr more weakly than
                                                                        the sqrt(lr_t) that nu takes out
settled at the end     |d ln nu / d theta| <= 0.2 per tau at the last   relaxing as exp(-2 theta), that slope is the
                       quasi-static step (least squares over the last   fraction of |w|^2 still to go: <= ~20%
                       0.5 tau); its level: median nu of the last
                       0.25 tau (>= 5 points)
equilibrium_step       first quasi-static step from which nu (running   "reached and stays": |w|^2 within ~30% of its
                       median of 5 points) stays within 15% of the      level, 0.6 tau of relaxation from a small
                       level, if settled at the end                     initial norm; noise in nu is ~5%
(optional) rel_tol     median ratio over the last 0.25 tau within       only where the noise-dominated derivation
                       [1/(1+rel_tol), 1+rel_tol] from that step on     holds (scale-invariant, no signal)
phase_at_end           ELR phase iff equilibrium_step; n/a without      equilibrium is what makes curves ELR-only
                       norms
divergence             status diverged, non-finite loss, or end loss    blown up, or stuck near the initial value
                       >= 90% of the initial one (ln V, a uniform       (Kodryan et al.'s high-ELR regime)
                       guess; the first logged one without V)
chaotic equilibrium    loss fell < 2% per tau at the end of the quasi-  stationary at an ELR-dependent level with the
                       static part (slope of ln loss over >= 1 tau and  norm stationary (Kodryan et al.); the points
                       >= 20 points), norm in equilibrium (if logged)   tame per-batch noise when tau is short
convergence            otherwise: loss still falling or norm unsettled  small effective step, still descending
=====================  ===============================================  ===============================================

Validated on real sweeps by ``bench/bench_phase.py`` (the step by which half the
members are in equilibrium against the transition the spreads show).

The loss criteria assume a positive loss (cross-entropy). Decay in the
``independent`` mode (wd scaled by the lr multiplier) is not modelled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from trajinv.analysis.plots import plain_log_ticks, save_png
from trajinv.analysis.records import chance_loss

MAX_LEGEND = 8  # members named in the phase plot's legend; more are coloured by ELR (a colorbar)

__all__ = [
    "DEFAULT_BETA1",
    "KINDS",
    "Criteria",
    "MemberPhase",
    "equilibrium_relative_update",
    "equilibrium_weight_norm",
    "format_phases",
    "member_phases",
    "plot_phases",
    "predicted_transition_step",
]

KINDS = ("matrix", "embedding", "gain")
DEFAULT_BETA1 = 0.9
"""beta1 of the trainer's AdamW (``OptimConfig.betas[0]``); the records do not log it."""


def _decay_per_step(lr: float, wd: float, beta1: float) -> float:
    if not (lr > 0 and wd >= 0 and 0 <= beta1 < 1):
        raise ValueError(f"need lr > 0, wd >= 0, 0 <= beta1 < 1; got lr={lr!r}, wd={wd!r}, beta1={beta1!r}")
    if lr * wd >= 1:
        raise ValueError(f"lr*wd = {lr * wd:g} >= 1: the decay would zero or flip the weights each step")
    return lr * wd


def equilibrium_relative_update(lr: float, wd: float, beta1: float = 0.0) -> float:
    """|dw|/|w| per step at rotational equilibrium, decay included (module docstring).

    ``sqrt(a^2 + a(2-a)(1-b-ab)/(1+b-ab))`` with a = lr*wd, b = beta1: exactly
    sqrt(2 lr wd) without momentum, ~sqrt(2 lr wd (1-b)/(1+b)) with it; 0 when wd = 0.
    """
    a, b = _decay_per_step(lr, wd, beta1), beta1
    return math.sqrt(a * a + a * (2 - a) * (1 - b - a * b) / (1 + b - a * b))


def equilibrium_weight_norm(lr: float, wd: float, update_rms: float, numel: int, beta1: float = 0.0) -> float:
    """|w| at equilibrium for Adam directions of per-element rms ``update_rms`` over ``numel`` weights.

    ``lr * rms * sqrt(N (1+rb) / ((1-r^2)(1-rb)))``, r = 1 - lr*wd: sqrt(lr N rms^2 / (wd (2 - lr wd)))
    without momentum; with it, the directions' correlation is the noise-dominated
    b^|s-t|. Infinite when wd = 0 (the norm grows forever).
    """
    a = _decay_per_step(lr, wd, beta1)
    if update_rms < 0 or numel < 1:
        raise ValueError(f"need update_rms >= 0 and numel >= 1, got {update_rms!r}, {numel!r}")
    if a == 0:
        return math.inf
    r, b = 1 - a, beta1
    return lr * update_rms * math.sqrt(numel * (1 + r * b) / ((1 - r * r) * (1 - r * b)))


@dataclass(frozen=True)
class Criteria:
    """Thresholds of the verdicts; the module docstring gives the reasons."""

    norm_tol: float = 0.15
    """From the equilibrium step on, nu stays within a factor 1+norm_tol of its level at the end."""
    drift_tol: float = 0.2
    """Largest |d ln nu / d theta| (per tau) at the end of a norm that settled."""
    smooth_points: int = 5
    """Points of the running median of nu (centred) that the band test reads."""
    rel_tol: float | None = None
    """When set, the median of rho/rho_eq must also lie within [1/(1+rel_tol), 1+rel_tol]."""
    window_tau: float = 0.25
    """Trailing window (in tau, i.e. theta) of the medians of rho/rho_eq, of nu's level and of the loss."""
    drift_tau: float = 0.5
    """Trailing window (in tau) of the least-squares slope of ln nu."""
    min_points: int = 5
    """Fewest logged points in a window; a window reaches further back to get them."""
    sched_tol: float = 0.1
    """Quasi-static: lr within this fraction of lr_t over the last 1/(2 lr_t wd) steps."""
    plateau_tol: float = 0.02
    """Plateau: the loss fell by less than this fraction over the last plateau_tau."""
    plateau_tau: float = 1.0
    """Look-back (in tau) of the plateau test."""
    plateau_points: int = 20
    """Fewest logged losses the plateau test's slope is fitted to; it reaches further back to get them."""
    stuck_frac: float = 0.1
    """Divergence: the end loss is above (1 - stuck_frac) times the initial one (ln V, else the first logged)."""


@dataclass(frozen=True)
class MemberPhase:
    """Verdicts on one member; ``evidence`` holds the numbers behind them."""

    run_id: str
    member: int
    name: str
    lr: float
    wd: float
    equilibrium_step: int | None
    equilibrium_tau: float | None
    """theta = wd * sum of the scheduled lr up to `equilibrium_step`: weight-decay timescales elapsed (under
    warm-up fewer than step*lr*wd at the peak lr, which this column showed before)."""
    phase_at_end: str
    regime: str
    evidence: dict


@dataclass(frozen=True)
class _Series:
    steps: np.ndarray
    lr: np.ndarray
    theta: np.ndarray
    loss: np.ndarray  # nan where non-finite
    norm: np.ndarray  # nan where not logged
    update: np.ndarray


@dataclass(frozen=True)
class _Measured:
    ratio: np.ndarray  # rho / rho_eq per record
    ratio_smooth: np.ndarray
    ln_nu: np.ndarray  # ln nu, nan where not logged or lr = 0
    ln_nu_smooth: np.ndarray  # centred running median of ln_nu
    drift: np.ndarray  # d ln nu / d theta, trailing


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else math.nan


def _group(records: Iterable[dict]) -> dict[tuple[str, int], list[dict]]:
    """Records per (run_id, member), sorted by step; a resumed run's re-logged step keeps its last record."""
    acc: dict[tuple[str, int], dict[int, dict]] = {}
    for rec in records:
        missing = [k for k in ("step", "lr", "base_lr", "wd") if rec.get(k) is None]
        if missing:
            raise ValueError(f"metric record {rec.get('run_id')!r}/{rec.get('member')} lacks {', '.join(missing)}")
        acc.setdefault((str(rec.get("run_id", "")), int(rec.get("member", 0))), {})[int(rec["step"])] = rec
    return {k: [by_step[s] for s in sorted(by_step)] for k, by_step in acc.items()}


def _series(recs: list[dict], kind: str) -> _Series:
    steps = np.array([r["step"] for r in recs], dtype=np.float64)
    lr = np.array([float(r["lr"]) for r in recs])
    wd = float(recs[0]["wd"])
    # theta = wd * sum of the scheduled lr (trapezoids between logged steps, the first span at its lr).
    spans = np.concatenate([[lr[0] * steps[0]], 0.5 * (lr[1:] + lr[:-1]) * np.diff(steps)])
    theta = wd * np.cumsum(spans)

    def col(key: str) -> np.ndarray:
        return np.array([_num(r.get(key)) for r in recs])

    norm, update = col(f"weight_norm_{kind}"), col(f"update_norm_{kind}")
    bad = ~(np.isfinite(norm) & np.isfinite(update) & (norm > 0))
    norm[bad] = update[bad] = np.nan
    return _Series(steps, lr, theta, col("train_loss"), norm, update)


def _window_starts(theta: np.ndarray, span: float, min_points: int) -> np.ndarray:
    """First index of the trailing window of each point; -1 where fewer than min_points exist yet."""
    idx = np.arange(len(theta))
    starts = np.minimum(np.searchsorted(theta, theta - span, side="left"), idx - min_points + 1)
    return np.where(idx + 1 >= min_points, np.maximum(starts, 0), -1)


def _window_medians(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Median of the finite x[lo[i] : hi[i] + 1] per point; nan where a window is empty (lo < 0 or none finite)."""
    out = np.full(len(x), np.nan)
    for i, (a, b) in enumerate(zip(lo, hi)):
        w = x[a : b + 1] if a >= 0 else x[:0]
        w = w[np.isfinite(w)]
        if len(w):
            out[i] = np.median(w)
    return out


def _trailing_median(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return _window_medians(x, starts, np.arange(len(x)))


def _trailing_slope(t: np.ndarray, y: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Least-squares slope of y on t over each trailing window (nan points left out), by prefix sums."""
    ok = np.isfinite(y)
    t0 = np.where(ok, t - t[0], 0.0)  # shifted so the sums keep their precision
    y0 = np.where(ok, y, 0.0)
    cums = [np.concatenate([[0.0], np.cumsum(v)]) for v in (ok.astype(float), t0, y0, t0 * t0, t0 * y0)]
    i = np.arange(len(t))
    lo = np.maximum(starts, 0)
    n, st, sy, stt, sty = (c[i + 1] - c[lo] for c in cums)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = (n * sty - st * sy) / (n * stt - st * st)
    return np.where((starts >= 0) & (n >= 2), slope, np.nan)


def _quasi_static(s: _Series, wd: float, tol: float) -> np.ndarray:
    """Whether lr is within tol of its peak and stayed within tol of lr_t over the last 1/(2 lr_t wd)
    steps (the norm's relaxation time)."""
    out = np.zeros(len(s.steps), dtype=bool)
    peak = float(np.max(s.lr)) if len(s.lr) else 0.0
    for i, lr in enumerate(s.lr):
        if lr >= (1 - tol) * peak and lr > 0 and wd > 0:
            lo = np.searchsorted(s.steps, s.steps[i] - 1.0 / (2.0 * lr * wd), side="left")
            out[i] = bool(np.all(np.abs(s.lr[lo : i + 1] - lr) <= tol * lr))
    return out


def _centred_median(x: np.ndarray, points: int) -> np.ndarray:
    half, idx = max(points, 1) // 2, np.arange(len(x))
    return _window_medians(x, np.maximum(idx - half, 0), idx + half)


def _measure(s: _Series, wd: float, beta1: float, crit: Criteria) -> _Measured:
    rho_eq = np.array([equilibrium_relative_update(lr, wd, beta1) if lr > 0 else np.nan for lr in s.lr])
    ratio = s.update / s.norm / rho_eq
    with np.errstate(divide="ignore", invalid="ignore"):
        ln_nu = np.log(s.norm) + 0.5 * np.log(wd / np.where(s.lr > 0, s.lr, np.nan))
    return _Measured(
        ratio=ratio,
        ratio_smooth=_trailing_median(ratio, _window_starts(s.theta, crit.window_tau, crit.min_points)),
        ln_nu=ln_nu,
        ln_nu_smooth=_centred_median(ln_nu, crit.smooth_points),
        drift=_trailing_slope(s.theta, ln_nu, _window_starts(s.theta, crit.drift_tau, crit.min_points)),
    )


def _level(s: _Series, m: _Measured, end: int, crit: Criteria) -> float:
    """ln nu's level at the end: its median over the trailing window_tau (>= min_points) ending there."""
    start = _window_starts(s.theta, crit.window_tau, crit.min_points)[end]
    return float(_window_medians(m.ln_nu, [max(start, 0)], [end])[0])


def _equilibrium_index(m: _Measured, q: np.ndarray, level: float, crit: Criteria) -> int | None:
    """First quasi-static index (of ``q``) from which ln nu stays within the band around ``level``
    (its level at the last one), provided the norm has settled there (and the ratio is in its band,
    if asked)."""
    if not len(q):
        return None
    if not (math.isfinite(level) and abs(m.drift[int(q[-1])]) <= crit.drift_tol):
        return None
    with np.errstate(invalid="ignore"):
        ok = np.abs(m.ln_nu_smooth - level) <= math.log1p(crit.norm_tol)
        if crit.rel_tol is not None:
            ok &= np.abs(np.log(m.ratio_smooth)) <= math.log1p(crit.rel_tol)
    failed = q[~ok[q]]
    later = q if not len(failed) else q[q > failed[-1]]
    return int(later[0]) if len(later) else None


def _f(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _regime(s: _Series, end: int, equilibrated: bool, diverged: bool, crit: Criteria,
            chance: float | None = None) -> tuple[str, dict]:
    """Kodryan et al.'s regime from the loss (and the norm's equilibrium); see the criteria table.

    The initial loss is ln V (`chance`: the loss of a uniform guess, which a fresh model's is close to)
    when the records carry the vocabulary: the first *logged* loss comes `log_every` steps in, by when a
    healthy run has fallen far (stuck-looking by comparison) and a blown-up one risen far (falling from
    it looks like convergence). Without V, the first logged loss."""
    finite = np.isfinite(s.loss)
    if diverged or not finite.all():
        return "divergence", {"divergence": "status diverged" if diverged else "non-finite loss"}
    # Early on a window holds what there is, so every point has a smoothed loss.
    smooth = _trailing_median(s.loss, np.maximum(_window_starts(s.theta, crit.window_tau, crit.min_points), 0))
    first, last = float(s.loss[0]) if chance is None else chance, float(smooth[-1])
    ev: dict = {"initial_loss": first, "final_loss": last}
    if last >= (1 - crit.stuck_frac) * first:
        return "divergence", {**ev, "divergence": "loss stuck near or above its initial value"}
    # The fall per plateau_tau from a least-squares slope of ln(loss) on theta: at a short tau the
    # look-back spans a few noisy train losses (+-10% at batch 8), so the fit reaches back over at
    # least plateau_points records.
    drop = None
    if s.theta[end] - s.theta[0] >= crit.plateau_tau:
        starts = _window_starts(s.theta, crit.plateau_tau, crit.plateau_points)
        ln_loss = np.log(np.where(s.loss > 0, s.loss, np.nan))
        drop = -_trailing_slope(s.theta, ln_loss, starts)[end] * crit.plateau_tau
    ev["loss_drop_last_tau"] = _f(drop)
    plateau = drop is not None and drop < crit.plateau_tol
    return ("chaotic equilibrium" if plateau and equilibrated else "convergence"), ev


def _member_phase(key: tuple[str, int], recs: list[dict], kind: str, beta1: float, crit: Criteria) -> MemberPhase:
    first = recs[0]
    lr, wd = float(first["base_lr"]), float(first["wd"])
    s = _series(recs, kind)
    logged = bool(np.isfinite(s.norm).any())
    ev: dict = {"kind": kind, "beta1": beta1, "criteria": asdict(crit), "points": len(recs),
                "theta_end": float(s.theta[-1])}
    # Verdicts are taken at the last quasi-static step: after it a terminal decay anneals, neither
    # equilibrium nor departure from it (without norms too, so the loss plateau is read before it).
    q = np.flatnonzero(_quasi_static(s, wd, crit.sched_tol))
    end = int(q[-1]) if len(q) else len(s.steps) - 1
    ev["quasi_static_points"] = len(q)
    eq = None
    if logged and lr * wd >= 1:  # trainable (torch decays by 1 - lr*wd), but no equilibrium exists
        ev["reason"] = f"lr*wd = {lr * wd:g} >= 1: the decay zeroes or flips the weights each step"
    elif logged and wd > 0:
        m = _measure(s, wd, beta1, crit)
        level = _level(s, m, end, crit)  # end is q[-1] whenever there is a quasi-static step
        eq = _equilibrium_index(m, q, level, crit)
        ev.update(ratio_end=_f(m.ratio_smooth[end]), drift_end=_f(m.drift[end]), nu_end=_f(math.exp(level)),
                  ratio_last=_f(m.ratio_smooth[-1]), weight_norm_end=_f(s.norm[end]),
                  equilibrium_theta=None if eq is None else float(s.theta[eq]))
    elif logged:
        ev["reason"] = "wd = 0: nothing balances the growth of the norm"
    else:
        ev["reason"] = f"no {kind} norms logged"
    diverged = any(r.get("status") == "diverged" for r in recs)
    chance = chance_loss(first.get("vocab_size"))
    regime, loss_ev = _regime(s, end, eq is not None or not logged, diverged, crit, chance)
    step = None if eq is None else int(s.steps[eq])
    return MemberPhase(
        run_id=key[0], member=key[1], name=str(first.get("name") or f"lr={lr:g},wd={wd:g}"), lr=lr, wd=wd,
        equilibrium_step=step, equilibrium_tau=ev.get("equilibrium_theta"),
        phase_at_end="n/a" if not logged or lr * wd >= 1 else ("ELR phase" if eq is not None else "LR phase"),
        regime=regime, evidence={**ev, **loss_ev},
    )


def member_phases(
    records: Iterable[dict], kind: str = "matrix", *, beta1: float = DEFAULT_BETA1, criteria: Criteria = Criteria()
) -> list[MemberPhase]:
    """One MemberPhase per (run_id, member) of ``records``, sorted, judged on the norms of ``kind``.

    ``beta1`` is the Adam momentum the run used; the member's wd must be the decay
    ``kind`` got (gains are not decayed by default).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return [_member_phase(k, recs, kind, beta1, criteria) for k, recs in sorted(_group(records).items())]


def _can_equilibrate(phases: Sequence[MemberPhase]) -> list[MemberPhase]:
    return [p for p in phases if p.phase_at_end != "n/a" and p.regime != "divergence"]


def equilibrated(phases: Sequence[MemberPhase]) -> tuple[int, int]:
    """(members in equilibrium by the end, members that can equilibrate): what a missing prediction lacked."""
    able = _can_equilibrate(phases)
    return sum(p.equilibrium_step is not None for p in able), len(able)


def predicted_transition_step(phases: Sequence[MemberPhase]) -> float | None:
    """The step by which half of the members are in equilibrium: the sweep's predicted LR -> ELR switch.

    Over the members that can equilibrate (norms logged, not diverged), one that never got
    there counting as later than any: the ceil(n/2)-th smallest equilibrium step (the lower
    median; np.median's mean of the middle two was infinite when exactly half got there).
    None when fewer than half did or no member qualifies.
    """
    steps = sorted(math.inf if p.equilibrium_step is None else float(p.equilibrium_step)
                   for p in _can_equilibrate(phases))
    if not steps:
        return None
    half = steps[(len(steps) + 1) // 2 - 1]
    return half if math.isfinite(half) else None


def format_phases(phases: Sequence[MemberPhase]) -> str:
    """A plain-text table, one row per member."""
    head = ("run", "member", "name", "lr", "wd", "elr", "eq step", "eq tau", "phase", "regime", "ratio", "drift")

    def cell(v, fmt: str = "{:.3g}") -> str:
        return "-" if v is None else fmt.format(v)

    rows = [(p.run_id, str(p.member), p.name, cell(p.lr), cell(p.wd), cell(p.lr * p.wd),
             cell(p.equilibrium_step, "{}"), cell(p.equilibrium_tau, "{:.2f}"), p.phase_at_end, p.regime,
             cell(p.evidence.get("ratio_end")), cell(p.evidence.get("drift_end")))
            for p in phases]
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (head, *rows))


def plot_phases(records: Iterable[dict], phases: Sequence[MemberPhase], out_png: str | Path) -> Path:
    """Top: the criterion, nu over its level at the last quasi-static step against step/tau (log x), the
    band shaded, equilibrium steps dotted, regime in the legend, a terminal lr decay (not judged) dashed
    and faded; bottom: the relative update over its derived noise-dominated value (the calibration). PNG
    written atomically."""
    groups = _group(records)
    fig = Figure(figsize=(8, 7.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_n, ax_r = fig.subplots(2, 1)
    drawn = [p for p in phases if p.phase_at_end != "n/a" and p.wd > 0 and (p.run_id, p.member) in groups]
    # A legend entry per member reads well up to a handful; a grid's worth is coloured by ELR instead.
    many = len(drawn) > MAX_LEGEND
    if many:
        elrs = [p.lr * p.wd for p in drawn]
        lo, hi = min(elrs), max(elrs)
        by_elr = ScalarMappable(norm=LogNorm(lo, hi) if hi > lo else LogNorm(lo / 2, hi * 2), cmap="viridis")
    judged: list[float] = []  # nu over its level where the verdict reads it: what the top panel frames
    for i, p in enumerate(drawn):
        crit = Criteria(**p.evidence["criteria"])
        s = _series(groups[(p.run_id, p.member)], p.evidence["kind"])
        m = _measure(s, p.wd, p.evidence["beta1"], crit)
        x = s.theta  # the relaxation's clock: equilibrium_tau is read on it
        colour = by_elr.to_rgba(p.lr * p.wd) if many else f"C{i % 10}"
        level = math.log(p.evidence["nu_end"]) if p.evidence.get("nu_end") else math.nan
        # judged up to the last quasi-static step (the level is nu's there); after it a decaying lr lifts nu
        # (|w| follows lr_t more weakly than the sqrt(lr_t) taken out; ~2x by the end of a WSD run): faded
        q = np.flatnonzero(_quasi_static(s, p.wd, crit.sched_tol))
        cut = int(q[-1]) + 1 if len(q) else len(x)
        nu = np.exp(m.ln_nu_smooth - level)
        judged += [v for v in nu[q] if math.isfinite(v) and v > 0]  # not the warmup's (lr_t near 0: nu large)
        ax_n.plot(x[:cut], nu[:cut], color=colour, lw=1.6, label=None if many else f"{p.name} ({p.regime})")
        ax_r.plot(x, m.ratio, color=colour, alpha=0.2, lw=0.7)
        ax_r.plot(x[:cut], m.ratio_smooth[:cut], color=colour, lw=1.6)
        if cut < len(x):
            ax_n.plot(x[cut - 1:], nu[cut - 1:], color=colour, lw=1.0, ls="--", alpha=0.45)
            ax_r.plot(x[cut - 1:], m.ratio_smooth[cut - 1:], color=colour, lw=1.0, ls="--", alpha=0.45)
        if p.equilibrium_step is not None:
            for ax in (ax_n, ax_r):
                ax.axvline(p.equilibrium_tau, color=colour, ls=":", lw=1.2)
    if drawn:
        crit = drawn[0].evidence["criteria"]
        ax_n.axhspan(1 / (1 + crit["norm_tol"]), 1 + crit["norm_tol"], color="0.85", zorder=0)
        # the judged part and the band; a decay's tail (nu grows as lr_t -> 0) leaves through the top
        ax_n.set_ylim(min(judged + [1 / (1 + crit["norm_tol"])]) / 1.2, max(judged + [1 + crit["norm_tol"]]) * 1.6)
        if crit["rel_tol"] is not None:
            ax_r.axhspan(1 / (1 + crit["rel_tol"]), 1 + crit["rel_tol"], color="0.85", zorder=0)
        for ax in (ax_n, ax_r):
            ax.axhline(1.0, color="0.3", lw=1)
            ax.set_xscale("log")
            ax.set_yscale("log")
            # ratios near 1 and a few timescales: "0.6", "2", "10", where the default wrote "6x10^-1", "10^1"
            plain_log_ticks(ax.xaxis)
            plain_log_ticks(ax.yaxis)
        if many:
            fig.colorbar(by_elr, ax=[ax_n, ax_r], label="ELR = lr*wd")
            counts = {r: sum(p.regime == r for p in drawn) for r in dict.fromkeys(p.regime for p in drawn)}
            ax_r.set_title("regimes: " + ", ".join(f"{n} {r}" for r, n in counts.items()), fontsize="medium")
        else:
            ax_n.legend(fontsize="small", loc="best")
            ax_r.set_title("relative update over its derived noise-dominated value", fontsize="medium")
    else:
        ax_n.text(0.5, 0.5, "no weight/update norms logged", transform=ax_n.transAxes, ha="center")
    ax_n.set_title("weight norm against its level at the last steady-lr step\n(dotted: equilibrium reached; "
                   "dashed, faded: the lr decay, not judged)", fontsize="medium")
    ax_n.set_ylabel("nu / nu_end,  nu = |w| sqrt(wd/lr_t)")
    ax_r.set_ylabel("|dw|/|w|  /  derived value")
    for ax in (ax_n, ax_r):
        ax.set_xlabel("theta = wd * sum of the scheduled lr  (weight-decay timescales)")
        ax.grid(True, alpha=0.3)
    return save_png(fig, out_png)
