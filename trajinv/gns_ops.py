"""Model ops with an optional gradient-noise probe: member-axis linear and RMSNorm.

Shapes carry a leading member axis K (see DESIGN.md, "Population axis"):
activations (K, n, t, d), linear weights (K, out, in), norm gains (K, d).
With `probe=None` these are plain autograd ops and cost nothing extra.
(Per-example GNS probe path: to be filled in by the GNS work, issue 4.)
"""

from __future__ import annotations

import torch


def member_linear(x: torch.Tensor, w: torch.Tensor, probe=None) -> torch.Tensor:
    """y[k] = x[k] @ w[k].T for x (K, n, t, in), w (K, out, in) -> (K, n, t, out)."""
    K, n, t, d_in = x.shape
    y = torch.bmm(x.reshape(K, n * t, d_in), w.transpose(1, 2))
    return y.view(K, n, t, w.shape[1])


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float, probe=None) -> torch.Tensor:
    """RMSNorm over the last dim with a per-member gain (K, d); x is (K, n, t, d)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * gain[:, None, None, :].float()).to(x.dtype)
