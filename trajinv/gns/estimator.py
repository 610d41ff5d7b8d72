"""Gradient noise scale: unbiased small/big-batch estimators, scaling, smoothing.

This module turns the raw squared-norm sums that the fused kernels produce into
per-member estimates of

    |G|^2,   tr(Sigma),   B_simple  = tr(Sigma)   / |G|^2      (McCandlish et al. 2018)
    |G|_W^2, tr(W Sigma), B_precond = tr(W Sigma) / |G|_W^2    (the paper's noise scale)

where G is the true (population) mean gradient, Sigma the per-example gradient
covariance, and W = 1 / (sqrt(v_hat) + eps) the Adam preconditioner taken from
the optimizer state *before* this step's update (|x|_W^2 = sum_i W_i x_i^2).
All quantities are in units of *examples* (sequences): multiply a noise scale by
the tokens per sequence to get it in tokens.

It holds no kernels and no trainer logic: only pure functions on (K,) tensors
(K = population members, any leading shape works), a debiased EMA and a small
stateful `GNSTracker` that the meter (`trajinv.gns.meter`) calls once per step.

The estimator
-------------
If g_B is the mean of B i.i.d. per-example gradients, E|g_B|^2 = |G|^2 + tr(Sigma)/B
(and E|g_B|_W^2 = |G|_W^2 + tr(W Sigma)/B for any fixed W). Two batch sizes give
two equations and two unknowns, solved by `small_big_estimates`:

    |G|^2    ~ (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|g_small|^2 - |g_big|^2) / (1/B_small - 1/B_big)

with |g_small|^2 the *mean over the small batches* of their squared norms. Both
are unbiased; their ratio is not, so numerator and denominator are smoothed
separately (debiased EMA) and divided afterwards.

Where the small batches come from (and the scaling, worked out)
---------------------------------------------------------------
The step's loss is the mean over its B examples, L = (1/B) sum_n l_n, so its
gradient is a sum of *contributions* C_n = grad(l_n) / B. The kernels see
contributions, not per-example gradients, hence the rescaling below.

* ``per-example`` (B_small = 1, B_big = B). The probe kernels return
  S = sum_n |C_n|^2 (or |C_n|_W^2). The per-example gradient is g_n = B C_n, so
  mean_n |g_n|^2 = (1/B) sum_n B^2 |C_n|^2 = B S (`per_example_sq_mean`).
  Gradient accumulation changes nothing: with M micro-batches of b examples and
  each micro-batch loss divided by M, the total is
  (1/M) sum_m (1/b) sum_{n in m} l_n = (1/B) sum_n l_n with B = M b, so each
  example's contribution is still grad(l_n)/B; sum S over all micro-batches and
  use the same B S. For a language model whose loss is the mean over all B t
  tokens (t tokens per sequence), g_n is the gradient of sequence n's mean token
  loss and the same B S holds; with padding or masks that give sequences
  unequal token counts it does not (examples are then weighted unequally).
  Coverage: linear layers (including the output head) and RMSNorm gains, whose
  per-example gradients the probe forms exactly. It leaves out embeddings (a
  per-example embedding gradient is a scatter of rows, not probed) and anything
  else without a probe, so |g_big|^2 must be summed over *the same covered
  tensors*, and the noise scale is that of the covered parameters.
* ``micro-batch`` (B_small = b = B / M, B_big = B). The accumulation kernel
  returns sum_m |h_m|^2 where h_m = grad(loss_m) / M is micro-batch m's
  contribution to the accumulated gradient. The micro-batch mean gradient is
  g_m = M h_m, so mean_m |g_m|^2 = (1/M) sum_m M^2 |h_m|^2 = M sum_m |h_m|^2
  (`micro_batch_sq_mean`). Covers whatever tensors the meter hands over: by
  default the same ones as per-example mode (the embedding only when opted in,
  `GNSConfig.embeddings`). Needs M >= 2 (b < B).
* The big batch in both modes: |g_big|^2 = |sum of contributions|^2, the squared
  norm of the accumulated gradient (per-(tensor, member) sums of g^2 and W g^2
  that the fused optimizer already writes, summed over tensors).

Both must be taken from the *unclipped* gradient: clipping rescales g_big by
c = min(1, max_norm/|g|) but not the per-example or per-micro-batch sums, which
would break the estimator. If the optimizer statistics are computed after
clipping, divide them by c^2 before passing them here.

Degenerate values
-----------------
Noise can make either estimate <= 0. The raw estimates are reported as they
are; a noise scale B = num / den (num = tr, den = |G|^2) follows one rule,
raw or smoothed (`noise_scale`):

    den > 0                -> max(num, 0) / den   (num <= 0: no noise resolved -> 0)
    den <= 0 and num > 0   -> +inf                (no signal resolved above noise)
    den <= 0 and num <= 0  -> nan                 (nothing resolved)
    num or den not finite  -> nan

A single step's estimate is very noisy; the smoothed B from the EMAs of
numerator and denominator is the one to read. Numerator and denominator of a
noise scale are folded in together: if either is not finite on a step, neither is,
so both average over the same steps.

The regime
----------
An EMA of heavy-tailed inputs is moved for dozens of steps by one spike (a rare
token's row with tiny v_hat, say). Whether a batch is small or large against
B_precond is therefore decided by a robust statistic, `b_precond_robust`:

    median of tr(W Sigma) / median of |G|_W^2   over the last REGIME_WINDOW measured steps

(raw per-step estimates, steps where either is non-finite left out, medians per member,
the ratio by the rule above). The window restarts with the W-weighted EMAs when W
switches, so it never mixes W = 1 with Adam's W. Fewer than half of the window's steps
spiking cannot move it.

The trainer reads that statistic for the regime (`b_precond_regime`, the summary's
`batch_regime` label, the tune's regime; against `regime_batch`) at the last measured step whose scheduled lr
is at least REGIME_LR_FRACTION of its peak, not at the last step. A schedule that anneals
the lr toward 0 at its end (WSD's decay, cosine's tail) drives |G|_W toward its floor
while the noise stays, so B_precond climbs there: in the demo's first scan (WSD, 800
steps) the members' median was 80 as the decay began, 144 with the lr at half its peak
(what the regime reads) and 458 at the last step. The question the regime asks is whether the batch is small against the noise
while the run trains (B_precond > B "throughout", in the paper's words), which the
anneal does not answer. A constant schedule reads it at the last step, as before.
"""

from __future__ import annotations

import math
import statistics
import sys

import torch

from trajinv.config import GNSConfig

# Quantities smoothed by the tracker: unweighted pair, then the W-weighted pair
# (which restarts when W changes from the identity to Adam's preconditioner).
_PLAIN = ("g2", "tr_sigma")
_WEIGHTED = ("g2_w", "tr_w_sigma")
_ROWS = _PLAIN + _WEIGHTED
REGIME_WINDOW = 32
"""Measured steps over which `b_precond_robust` takes its medians (module doc, "The regime")."""
REGIME_LR_FRACTION = 0.5
"""The regime's B_precond is read at the last measured step with lr >= this fraction of the peak
(module doc, "The regime"): before an annealing schedule's tail inflates it."""


def regime_batch(sizes) -> int:
    """The batch a run compares with B_precond: its batch size, or a batch-size schedule's smallest (the
    small-batch phase is the one that makes the LR->ELR transition: the paper's small-batch-first schedule).
    One rule for the summary's `batch_regime` and the tune's regime."""
    return min(sizes)


def precond_active(step: int, cfg: GNSConfig) -> bool:
    """Whether step `step` (0-based, = optimizer updates already applied) uses Adam's W.

    W is the identity for step < cfg.precond_warmup.
    """
    return step >= cfg.precond_warmup


# ---------------------------------------------------------------------------
# Scaling: raw kernel sums -> mean squared norm of the small-batch gradients
# ---------------------------------------------------------------------------


def per_example_sq_mean(raw_sum: torch.Tensor, batch_size: int) -> torch.Tensor:
    """mean_n |g_n|^2 = B * S from S = sum_n |C_n|^2 over all B examples of the step.

    C_n is example n's contribution to the gradient of the mean loss over the B
    examples (summed over all micro-batches when accumulating: see module doc),
    so g_n = B C_n. Works the same for |.|_W.
    """
    _check_count("batch_size", batch_size)
    return raw_sum.to(torch.float64) * batch_size


def micro_batch_sq_mean(raw_sum: torch.Tensor, num_micro: int) -> torch.Tensor:
    """mean_m |g_m|^2 = M * sum_m |h_m|^2 from the accumulation kernel's raw sum.

    h_m = grad(loss_m) / M is micro-batch m's contribution to the accumulated
    mean gradient, so the micro-batch mean gradient is g_m = M h_m. Use with
    b_small = micro-batch size, b_big = M * micro-batch size.
    """
    _check_count("num_micro", num_micro)
    return raw_sum.to(torch.float64) * num_micro


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


# ---------------------------------------------------------------------------
# The estimator and the ratio
# ---------------------------------------------------------------------------


# The estimator works on (K,)-sized vectors once per step, on the host in
# float64 Python scalars: a few dozen float operations per member. Vectorised
# (torch or numpy) it was ~40 small ops whose dispatch code is cold again by
# every step (measured 250 us per step inside the trainer, 50 us when hot).


def _floats(x: torch.Tensor) -> list[float]:
    return x.detach().to("cpu", torch.float64).reshape(-1).tolist()


def _estimates(small: float, big: float, b_small: int, b_big: int) -> tuple[float, float]:
    """(|G|^2, tr(Sigma)) from one small-batch mean squared norm and one big-batch squared norm."""
    g2 = (b_big * big - b_small * small) / (b_big - b_small)
    # 1/b_small - 1/b_big = (b_big - b_small) / (b_small b_big), exact in float64
    return g2, (small - big) * (b_small * b_big / (b_big - b_small))


def _ratio(num: float, den: float) -> float:
    """B = num / den with the degenerate-case rule of the module doc."""
    if not (math.isfinite(num) and math.isfinite(den)):
        return math.nan
    if den > 0:
        return max(num, 0.0) / max(den, sys.float_info.min)
    return math.inf if num > 0 else math.nan


def _check_b(b_small: int, b_big: int) -> None:
    _check_count("b_small", b_small)
    _check_count("b_big", b_big)
    if b_big <= b_small:
        raise ValueError(f"b_big must exceed b_small, got b_small={b_small}, b_big={b_big}")


def small_big_estimates(
    small_sq_mean: torch.Tensor, big_sq: torch.Tensor, b_small: int, b_big: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased (|G|^2, tr(Sigma)) from small- and big-batch squared norms.

    small_sq_mean: mean over the small batches of |g_small|^2 (see the scaling
    helpers); big_sq: |g_big|^2. Same formulas with |.|_W give (|G|_W^2,
    tr(W Sigma)). Elementwise over any shape (e.g. (K,) members); float64 out,
    because the |G|^2 numerator is a difference of nearly equal terms when the
    noise dominates. Estimates can be negative: they are returned as they are.
    Computed on the host; results come back on the inputs' device.
    """
    _check_b(b_small, b_big)
    pairs = [_estimates(s_, b_, b_small, b_big) for s_, b_ in zip(_floats(small_sq_mean), _floats(big_sq))]
    shape, device = small_sq_mean.shape, small_sq_mean.device
    return tuple(torch.tensor([p[i] for p in pairs], dtype=torch.float64).view(shape).to(device) for i in (0, 1))


def noise_scale(tr_sigma: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """B = tr / |G|^2 with the degenerate-case rule of the module doc.

    den > 0: max(num, 0)/den; den <= 0 < num: +inf; both <= 0 or any non-finite: nan.
    """
    out = [_ratio(n, d) for n, d in zip(_floats(tr_sigma), _floats(g2))]
    return torch.tensor(out, dtype=torch.float64).view(g2.shape).to(g2.device)


# ---------------------------------------------------------------------------
# Smoothing
# ---------------------------------------------------------------------------


class DebiasedEMA:
    """Exponential moving average with Adam-style bias correction, elementwise.

    value_t = beta value_{t-1} + (1 - beta) x_t, reported as value_t / (1 - beta^t),
    so the first update returns x_1 exactly. Non-finite entries of x are skipped
    for that element (its own count t does not advance), so one overflowed step
    cannot poison a member forever; `update(x, valid)` skips the elements where
    `valid` is False too (GNSTracker skips numerator and denominator together).
    Elements never updated read as nan.
    """

    def __init__(self, beta: float, shape: tuple[int, ...] | torch.Size = ()) -> None:
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        # host float64 tensors, read and rewritten as Python floats (see the estimator note)
        self.ema = torch.zeros(shape, dtype=torch.float64)
        self.count = torch.zeros(shape, dtype=torch.float64)

    def reset(self, rows: slice | None = None) -> None:
        """Forget everything, or only `rows` of the leading axis (the quantity averaged there has changed)."""
        self.ema[slice(None) if rows is None else rows] = 0.0
        self.count[slice(None) if rows is None else rows] = 0.0

    def update(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Fold in x (same shape as the EMA) where finite (and `valid`, a bool tensor of the same
        shape) and return the debiased value (float64, on the host)."""
        if tuple(x.shape) != tuple(self.ema.shape):
            raise ValueError(f"EMA expects shape {tuple(self.ema.shape)}, got {tuple(x.shape)}")
        if valid is not None and tuple(valid.shape) != tuple(self.ema.shape):
            raise ValueError(f"EMA valid mask must have shape {tuple(self.ema.shape)}, got {tuple(valid.shape)}")
        keep = None if valid is None else valid.reshape(-1).tolist()
        return torch.tensor(self._update(_floats(x), keep), dtype=torch.float64).view(self.ema.shape)

    def _update(self, xs: list[float], valid: list[bool] | None = None) -> list[float]:
        """`update` on the flattened values, as Python floats (see the estimator note)."""
        ema, count = self.ema.reshape(-1).tolist(), self.count.reshape(-1).tolist()
        for i, x in enumerate(xs):
            if math.isfinite(x) and (valid is None or valid[i]):
                ema[i] = self.beta * ema[i] + (1.0 - self.beta) * x
                count[i] += 1.0
        self.ema = torch.tensor(ema, dtype=torch.float64).view(self.ema.shape)
        self.count = torch.tensor(count, dtype=torch.float64).view(self.count.shape)
        return self._value(ema, count)

    def _value(self, ema: list[float], count: list[float]) -> list[float]:
        # count == 0 -> nothing to correct (also for beta == 0, as 0**0 == 1) -> nan
        return [e / (1.0 - self.beta**c) if c > 0 else math.nan for e, c in zip(ema, count)]

    @property
    def value(self) -> torch.Tensor:
        """Debiased average; nan where nothing has been folded in yet."""
        out = self._value(self.ema.reshape(-1).tolist(), self.count.reshape(-1).tolist())
        return torch.tensor(out, dtype=torch.float64).view(self.ema.shape)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Plain contiguous tensors (safetensors-ready)."""
        return {f"{prefix}ema": self.ema.detach().cpu().clone(),
                f"{prefix}count": self.count.detach().cpu().clone()}

    def check_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "",
                         shape: tuple[int, ...] | None = None) -> None:
        """Raise (KeyError/ValueError) unless `state` holds this EMA's entries with its shape
        (or `shape`: a slice of it, as `GNSTracker` stores one row per quantity)."""
        want = tuple(self.ema.shape) if shape is None else tuple(shape)
        for key in ("ema", "count"):
            t = state.get(prefix + key)
            if t is None:
                raise KeyError(f"EMA state is missing key {prefix + key!r}")
            if tuple(t.shape) != want:
                raise ValueError(f"EMA state {prefix + key!r} has shape {tuple(t.shape)}, expected {want}")

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Restore from `state_dict(prefix)`; shapes must match."""
        self.check_state_dict(state, prefix)
        self.ema = state[prefix + "ema"].to("cpu", torch.float64).clone()
        self.count = state[prefix + "count"].to("cpu", torch.float64).clone()


# ---------------------------------------------------------------------------
# Per-step tracker
# ---------------------------------------------------------------------------


class GNSTracker:
    """Per-member GNS estimates, raw and smoothed, for the trainer's log.

    Call `update` once per optimizer step with the squared-norm inputs (all (K,)
    tensors; see the module doc for how to scale them). The W-weighted EMAs
    restart whenever the preconditioner switches (identity -> Adam's W, or back):
    |G|_W^2 under W = 1 and under Adam's W are different quantities, and
    averaging across the switch would mix them. The unweighted EMAs never restart.
    """

    def __init__(self, members: int, cfg: GNSConfig) -> None:
        _check_count("members", members)
        if not cfg.enabled:
            raise ValueError("GNSConfig.mode is 'off': build no GNSTracker (check cfg.enabled)")
        self.members = members
        self.cfg = cfg
        # One EMA over the four quantities stacked (rows in _ROWS order): one flat list
        # of floats per step.
        self.ema = DebiasedEMA(cfg.ema, (len(_ROWS), members))
        self._preconditioned: bool | None = None  # W of the last update; None before any
        # the last REGIME_WINDOW raw (tr_w_sigma, g2_w) per member, oldest overwritten first
        self.window = torch.full((REGIME_WINDOW, 2, members), math.nan, dtype=torch.float64)
        self.window_count = 0  # steps written since the window last restarted

    def update(
        self,
        step: int,
        small_sq_mean_w: torch.Tensor | None,
        big_sq_w: torch.Tensor | None,
        small_sq_mean_1: torch.Tensor,
        big_sq_1: torch.Tensor,
        b_small: int,
        b_big: int,
        preconditioned: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Fold in one step; return per-member (K,) tensors for logging.

        small_sq_mean_*: mean over small batches of |g_small|^2 (already scaled by
        `per_example_sq_mean` / `micro_batch_sq_mean`); big_sq_*: |g_big|^2 of the
        unclipped accumulated gradient over the same parameters. `_w` under the
        step's W, `_1` unweighted. When W is the identity the `_w` inputs may be
        None (the unweighted ones are used). `preconditioned` defaults to
        `precond_active(step, cfg)`.

        Returns: grad_norm (|g_big|), grad_norm_w (|g_big|_W), g2, tr_sigma, g2_w,
        tr_w_sigma (this step's estimates), b_simple, b_precond (raw: from this
        step's estimates), b_simple_smooth, b_precond_smooth (ratio of the
        debiased EMAs of numerator and denominator), b_precond_robust (module doc,
        "The regime"), w_identity (bool, True
        where W was the identity). All float64 except w_identity.
        """
        if preconditioned is None:
            preconditioned = precond_active(step, self.cfg)
        if self.cfg.mode == "per-example" and b_small != 1:
            raise ValueError(f"per-example mode needs b_small == 1, got {b_small}")
        if small_sq_mean_w is None or big_sq_w is None:
            if preconditioned:
                raise ValueError(f"step {step} uses Adam's W: small_sq_mean_w and big_sq_w are required")
            small_sq_mean_w, big_sq_w = small_sq_mean_1, big_sq_1
        for name, t in (("small_sq_mean_w", small_sq_mean_w), ("big_sq_w", big_sq_w),
                        ("small_sq_mean_1", small_sq_mean_1), ("big_sq_1", big_sq_1)):
            if tuple(t.shape) != (self.members,):
                raise ValueError(f"{name} must have shape ({self.members},), got {tuple(t.shape)}")

        if self._preconditioned is not None and preconditioned != self._preconditioned:
            self.ema.reset(slice(len(_PLAIN), len(_ROWS)))
            self.window.fill_(math.nan)
            self.window_count = 0
        self._preconditioned = bool(preconditioned)

        _check_b(b_small, b_big)
        s1, sw, b1, bw = (_floats(t) for t in (small_sq_mean_1, small_sq_mean_w, big_sq_1, big_sq_w))
        plain = [_estimates(s_, b_, b_small, b_big) for s_, b_ in zip(s1, b1)]
        weighted = [_estimates(s_, b_, b_small, b_big) for s_, b_ in zip(sw, bw)]
        raw = {"g2": [e[0] for e in plain], "tr_sigma": [e[1] for e in plain],
               "g2_w": [e[0] for e in weighted], "tr_w_sigma": [e[1] for e in weighted]}
        # numerator and denominator of a noise scale skip the same steps
        ok_plain = [math.isfinite(a) and math.isfinite(b) for a, b in zip(raw["g2"], raw["tr_sigma"])]
        ok_w = [math.isfinite(a) and math.isfinite(b) for a, b in zip(raw["g2_w"], raw["tr_w_sigma"])]
        flat = self.ema._update([x for name in _ROWS for x in raw[name]], ok_plain * 2 + ok_w * 2)
        K = self.members
        smooth = {name: flat[i * K : (i + 1) * K] for i, name in enumerate(_ROWS)}
        self.window[self.window_count % REGIME_WINDOW] = torch.tensor(
            [[x if ok else math.nan for x, ok in zip(raw[name], ok_w)] for name in ("tr_w_sigma", "g2_w")],
            dtype=torch.float64)
        self.window_count += 1
        out = {"grad_norm": [math.sqrt(max(x, 0.0)) for x in b1], "grad_norm_w": [math.sqrt(max(x, 0.0)) for x in bw],
               **raw,
               "b_simple": list(map(_ratio, raw["tr_sigma"], raw["g2"])),
               "b_precond": list(map(_ratio, raw["tr_w_sigma"], raw["g2_w"])),
               "b_simple_smooth": list(map(_ratio, smooth["tr_sigma"], smooth["g2"])),
               "b_precond_smooth": list(map(_ratio, smooth["tr_w_sigma"], smooth["g2_w"])),
               "b_precond_robust": self.robust()}
        out = {key: torch.tensor(v, dtype=torch.float64) for key, v in out.items()}
        out["w_identity"] = torch.full((K,), not preconditioned, dtype=torch.bool)
        return out

    def robust(self) -> list[float]:
        """Per member: median tr(W Sigma) / median |G|_W^2 over the window (module doc, "The regime")."""
        out = []
        for k in range(self.members):
            rows = [(n, d) for n, d in self.window[:, :, k].tolist() if math.isfinite(n) and math.isfinite(d)]
            out.append(_ratio(statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows))
                       if rows else math.nan)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain contiguous CPU tensors (safetensors-ready), flat string keys."""
        state: dict[str, torch.Tensor] = {}
        full = self.ema.state_dict()
        for i, name in enumerate(_ROWS):  # one entry per quantity, as the checkpoint format has it
            state.update({f"{name}.{key}": full[key][i].clone() for key in ("ema", "count")})
        flag = -1 if self._preconditioned is None else int(self._preconditioned)
        state["preconditioned"] = torch.tensor([flag], dtype=torch.int64)
        state["window"] = self.window.clone()
        state["window_count"] = torch.tensor([self.window_count], dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from `state_dict()` of a tracker with the same number of members."""
        flag = state.get("preconditioned")
        if flag is None or flag.numel() != 1 or int(flag.item()) not in (-1, 0, 1):
            raise ValueError(f"GNS state has a bad or missing 'preconditioned' entry: {flag!r}")
        for name in _ROWS:  # check everything before touching anything
            self.ema.check_state_dict(state, prefix=f"{name}.", shape=(self.members,))
        window, count = state.get("window"), state.get("window_count")
        if window is not None and tuple(window.shape) != tuple(self.window.shape):
            raise ValueError(f"GNS state 'window' has shape {tuple(window.shape)}, expected {tuple(self.window.shape)}")
        self.ema.load_state_dict({key: torch.stack([state[f"{name}.{key}"] for name in _ROWS])
                                  for key in ("ema", "count")})
        value = int(flag.item())
        self._preconditioned = None if value == -1 else bool(value)
        if window is None or count is None:  # older checkpoints: the window starts empty
            self.window.fill_(math.nan)
            self.window_count = 0
        else:
            self.window = window.to(torch.float64).clone()
            self.window_count = int(count.reshape(-1)[0])
