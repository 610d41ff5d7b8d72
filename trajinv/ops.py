"""The model's linear and RMSNorm ops, with an optional gradient-noise probe.

Every linear layer and RMSNorm of `trajinv.model.GPT` goes through these two
functions, whether the gradient noise scale is measured or not. Shapes carry a
leading member axis K (docs/design.md, "The population axis"):
activations (K, n, t, d), linear weights (K, out, in), norm gains (K, d).
With `probe=None` the linear is a plain `bmm` and RMSNorm the native one-pass CPU
kernel in fp32 (torch ops elsewhere): nothing is measured, nothing extra paid.

With a `Probe`, the op is a custom autograd Function whose backward computes
dX as usual and the weight (or gain) gradient through the fused kernels of
`trajinv.kernels.linear_gns` / `trajinv.kernels.rmsnorm` (Triton on CUDA,
their CPU paths on CPU), which also return the per-example squared norms

    S_W = sum_n |C_n|_W^2,   S_1 = sum_n |C_n|^2,   C_n = example n's contribution

and add them into the probe. Gradients are the same as without a probe up to
summation order (the fused kernel sums dW in its own order), so a run with probes drifts
from one without as any change of rounding does (docs/design.md, "What each mode covers").

Scaling (read this before using the sums). C_n is example n's contribution to
the gradient of *whatever loss was backpropagated*, with NO rescaling: for a
linear layer C_n = Gy_n^T A_n, for a gain C_n = sum_t Gy_{n,t} * x_hat_{n,t}.
With a loss that is the mean over n examples, L = (1/n) sum_n l_n, the
per-example gradient is grad(l_n) = n * C_n, so sum_n |grad(l_n)|^2 = n^2 S_1.
The estimator (`trajinv.gns.estimator`) applies that factor; this module never does.
Under gradient accumulation the sums keep adding over backward calls, as does
`examples`, until `Probe.reset()`.

Use one Probe per parameter tensor (`GPT.probes` maps parameter names to
probes): `examples` counts the examples seen by that tensor's backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from trajinv.kernels import rmsnorm as R
from trajinv.kernels.backend import FLOAT_DTYPES
from trajinv.kernels.linear_gns import linear_weight_grad_with_norms


@dataclass
class Probe:
    """Per-example squared-norm sums of one parameter's gradient, filled by backward.

    The sums are of raw contributions C_n to the backpropagated loss's gradient,
    not rescaled: with a mean loss over n examples, example n's own gradient is
    n * C_n (the estimator in `trajinv.gns.estimator` applies that factor).
    """

    precond: torch.Tensor | None = None
    """W, positive, shaped like the parameter ((K, out, in) or (K, d)); None = identity.
    Set by the GNS driver before backward (Adam's 1 / (sqrt(v_hat) + eps))."""
    sums: torch.Tensor | None = None
    """(2, K) fp32, rows (sum of |C_n|_W^2, sum of |C_n|^2) over examples and backward
    calls; created by the first backward, or handed in by an owner that keeps one
    buffer for many probes (a row of it). Kernels add into it in place."""
    examples: int = 0
    """Examples seen since the last reset (n per backward call)."""
    backend: str = "auto"
    """Kernel backend: "auto" (Triton on CUDA, the CPU path on CPU), "triton" or "cpu"."""

    @property
    def sq_w(self) -> torch.Tensor | None:
        """(K,) fp32: sum over examples and backward calls of |C_n|_W^2 (None before any backward)."""
        return None if self.sums is None else self.sums[0]

    @property
    def sq_1(self) -> torch.Tensor | None:
        """(K,) fp32: the same with W = 1."""
        return None if self.sums is None else self.sums[1]

    def reset(self) -> None:
        """Zero the sums (kept as a tensor once created) and the example count."""
        if self.sums is not None:
            self.sums.zero_()
        self.examples = 0

    def buffer(self, members: int, device: torch.device) -> torch.Tensor:
        """The (2, K) sums, created as zeros on first use."""
        if self.sums is None:
            self.sums = torch.zeros(2, members, dtype=torch.float32, device=device)
        return self.sums

    def add(self, s_w: torch.Tensor, s_1: torch.Tensor, n: int) -> None:
        """Accumulate one backward call's sums (K,) over n examples."""
        sums = self.buffer(s_w.shape[0], s_w.device)
        sums[0] += s_w.detach()
        sums[1] += s_1.detach()
        self.examples += n


def _autocast_cast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # A custom Function is opaque to autocast: cast its inputs the way autocast
    # would cast a matmul's, outside it, so the casts' backward returns
    # gradients in the parameters' own dtype exactly as on the plain path.
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


class _MemberLinearProbe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, probe: Probe) -> torch.Tensor:
        K, n, t, d_in = x.shape
        ctx.save_for_backward(x, w)
        ctx.probe = probe
        y = torch.bmm(x.reshape(K, n * t, d_in), w.transpose(1, 2))
        return y.view(K, n, t, w.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: torch.Tensor):
        x, w = ctx.saved_tensors
        K, n, t, d_in = x.shape
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.bmm(gy.reshape(K, n * t, -1), w.to(gy.dtype)).view(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:
            probe = ctx.probe
            # the kernel adds S_W, S_1 straight into the probe's (2, K) sums
            dw32, _, _ = linear_weight_grad_with_norms(x, gy, probe.precond, backend=probe.backend,
                                                       out_sums=probe.buffer(K, x.device))
            dw = dw32.to(w.dtype)
            probe.examples += n
        return dx, dw, None


class _RMSNormProbe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, gain: torch.Tensor, eps: float, probe: Probe) -> torch.Tensor:
        y, rstd = R.rmsnorm_forward_torch(x, gain, eps)  # the plain path's forward, rstd (K, n, t)
        ctx.save_for_backward(x, gain, rstd)
        ctx.probe = probe
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: torch.Tensor):
        x, gain, rstd = ctx.saved_tensors
        dx = dgain = None
        if ctx.needs_input_grad[0]:
            r = rstd[..., None]
            xhat = x.float() * r
            gg = gy.float() * gain[:, None, None, :].float()
            dx = (r * (gg - xhat * (gg * xhat).mean(-1, keepdim=True))).to(x.dtype)
        if ctx.needs_input_grad[1]:
            probe = ctx.probe
            dg32, s_w, s_1 = R.rmsnorm_gain_grad_with_norms(x, rstd, gy, probe.precond, backend=probe.backend)
            dgain = dg32.to(gain.dtype)
            probe.add(s_w, s_1, x.shape[1])
        return dx, dgain, None, None


class _RMSNormNative(torch.autograd.Function):
    # CPU fp32, probe or not: one native pass each way (kernels/rmsnorm.py); measured
    # forward + backward at the tiny preset's sizes, 119 -> 58 us (K=1) and 800 -> 250 us
    # (K=9) against torch ops. With a probe the per-example gain norms come out of the
    # same backward pass.
    @staticmethod
    def forward(ctx, x: torch.Tensor, gain: torch.Tensor, eps: float, probe: Probe | None) -> torch.Tensor:
        y, rstd = R.rmsnorm_forward_cpu(x, gain, eps)
        ctx.save_for_backward(x, gain, rstd)
        ctx.probe = probe
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: torch.Tensor):
        x, gain, rstd = ctx.saved_tensors
        probe = ctx.probe
        if probe is None:
            dx, dg, _, _ = R.rmsnorm_backward_cpu(x, rstd, gain, gy)
        else:  # the sums go straight into the probe's (2, K) buffer
            dx, dg, _, _ = R.rmsnorm_backward_cpu(x, rstd, gain, gy, probe.precond,
                                                             out_sums=probe.buffer(x.shape[0], x.device))
            probe.examples += x.shape[1]
        return dx, dg, None, None


def _check_probe(probe: object, **tensors: torch.Tensor) -> None:
    if not isinstance(probe, Probe):
        raise TypeError(f"probe must be a trajinv.ops.Probe or None, got {type(probe).__name__}")
    for name, t in tensors.items():  # checked here, not first in the backward the probe's kernels run in
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"with a probe, {name} must be float32, float16 or bfloat16 (the gradient-norm "
                            f"kernels' dtypes), got {t.dtype}")


def member_linear(x: torch.Tensor, w: torch.Tensor, probe: Probe | None = None) -> torch.Tensor:
    """y[k] = x[k] @ w[k].T for x (K, n, t, in), w (K, out, in) -> (K, n, t, out).

    With a `probe`, backward also adds sum_n |Gy_n^T x_n|_W^2 and the unweighted
    sum into `probe.sq_w` / `probe.sq_1` (raw contributions, see module doc).
    """
    if probe is None:
        K, n, t, d_in = x.shape
        y = torch.bmm(x.reshape(K, n * t, d_in), w.transpose(1, 2))
        return y.view(K, n, t, w.shape[1])
    _check_probe(probe, x=x, w=w)
    if x.dim() != 4 or w.dim() != 3 or x.shape[0] != w.shape[0] or x.shape[3] != w.shape[2]:
        raise ValueError(f"member_linear needs x (K, n, t, in) and w (K, out, in); got {tuple(x.shape)}, {tuple(w.shape)}")
    x, w = _autocast_cast(x, w)
    return _MemberLinearProbe.apply(x, w, probe)


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float, probe: Probe | None = None) -> torch.Tensor:
    """RMSNorm over the last dim with a per-member gain (K, d); x is (K, n, t, d).

    On CPU in fp32 forward and backward are native one-pass loops
    (`trajinv.kernels.rmsnorm`), probe or not; elsewhere torch ops, or with
    a probe the gain-gradient kernel of the same module.

    With a `probe`, backward also adds sum_n |dgain_n|_W^2 and the unweighted
    sum into `probe.sq_w` / `probe.sq_1` (raw contributions, see module doc).
    """
    if probe is not None:
        _check_probe(probe, x=x, gain=gain)
    if x.dim() != 4 or gain.dim() != 2 or tuple(gain.shape) != (x.shape[0], x.shape[3]):
        raise ValueError(f"rms_norm needs x (K, n, t, d) and gain (K, d); got {tuple(x.shape)}, {tuple(gain.shape)}")
    if (probe is None or probe.backend != "triton") and R.available(x, gain):
        return _RMSNormNative.apply(x, gain, eps, probe)
    if probe is None:
        return R.rmsnorm_forward_torch(x, gain, eps)[0]
    return _RMSNormProbe.apply(x, gain, eps, probe)
