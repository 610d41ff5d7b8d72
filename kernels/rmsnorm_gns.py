"""RMSNorm gain gradient fused with per-example (preconditioned) squared norms.

For y = x_hat * g with x_hat = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps), the
gain gradient of example n is dg_n = sum_t Gy[n, t] * x_hat[n, t] (a d-vector),
dg = sum_n dg_n, and the gradient-noise-scale estimator wants

    S_W = sum_n |dg_n|_W^2 = sum_n sum_j W_j dg_n[j]^2     (W > 0, shaped like g)
    S_1 = sum_n |dg_n|^2.

Memory traffic. The plain gain gradient reads x and Gy once (2 * n * t * d
elements) plus rstd; so does this kernel: each program owns a d-slice of one
member, loops over examples and their tokens, keeps dg_n for the current
example in registers, folds it into dg and into two scalars, and writes
nothing per example but those two scalars. The (n, d) per-example gradients
never reach memory. Extra work: ~5 flops per (example, feature), i.e. about
5 / (2 t) relative to the gain gradient itself, and one read of W (d elements).

Member axis: x, Gy (K, n, t, d), rstd (K, n, t), W (K, d).

Public API: `rmsnorm_gain_grad_with_norms` (Triton on CUDA, torch on CPU) and
`rmsnorm_gain_grad_with_norms_reference` (explicit per-example maths).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Launch configuration, shared with the AOT test so what is checked is what runs.
LAUNCH_CONFIG = {"BLOCK_T": 32, "BLOCK_D": 128, "num_warps": 4}


@triton.jit
def _rmsnorm_gns_kernel(
    x_ptr,  # (K, N, T, D) norm input, contiguous
    rstd_ptr,  # (K, N, T) fp32 reciprocal RMS saved by the forward
    gy_ptr,  # (K, N, T, D) output gradient, contiguous
    w_ptr,  # (K, D) positive preconditioner (unused when HAS_W is False)
    dg_ptr,  # (K, D) fp32 gain gradient (written)
    sw_ptr,  # (K, N, P) fp32 per-program partial sum_j W dg_n^2 (written)
    s1_ptr,  # (K, N, P) fp32 per-program partial sum_j dg_n^2 (written)
    N,
    T,
    D,
    HAS_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    k = tl.program_id(0)
    pid_d = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    mask_d = offs_d < D
    k64 = k.to(tl.int64)
    if HAS_W:
        w = tl.load(w_ptr + k64 * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    dg = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n in range(0, N):
        row0 = (k64 * N + n) * T
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rows = row0 + t0 + offs_t
            mask_t = (t0 + offs_t) < T
            m = mask_t[:, None] & mask_d[None, :]
            off = rows[:, None] * D + offs_d[None, :]
            x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
            gy = tl.load(gy_ptr + off, mask=m, other=0.0).to(tl.float32)
            r = tl.load(rstd_ptr + rows, mask=mask_t, other=0.0)
            acc += gy * (x * r[:, None])
        dgn = tl.sum(acc, axis=0)
        dg += dgn
        d2 = dgn * dgn
        part = (k64 * N + n) * n_tiles + pid_d
        tl.store(s1_ptr + part, tl.sum(d2, axis=0))
        if HAS_W:
            tl.store(sw_ptr + part, tl.sum(w * d2, axis=0))
    tl.store(dg_ptr + k64 * D + offs_d, dg, mask=mask_d)


def _check(x: torch.Tensor, rstd: torch.Tensor, gy: torch.Tensor, precond: torch.Tensor | None) -> None:
    if x.dim() != 4 or tuple(gy.shape) != tuple(x.shape):
        raise ValueError(f"x and gy must both be (K, n, t, d); got x {tuple(x.shape)}, gy {tuple(gy.shape)}")
    if tuple(rstd.shape) != tuple(x.shape[:3]):
        raise ValueError(f"rstd must have shape {tuple(x.shape[:3])} (K, n, t), got {tuple(rstd.shape)}")
    for name, v in (("x", x), ("gy", gy), ("rstd", rstd), ("precond", precond)):
        if v is not None and v.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be fp32/fp16/bf16, got {v.dtype}")
    if precond is not None and tuple(precond.shape) != (x.shape[0], x.shape[3]):
        raise ValueError(f"precond must have shape {(x.shape[0], x.shape[3])} (K, d), got {tuple(precond.shape)}")


def _finish(s_w: torch.Tensor, s_1: torch.Tensor, per_example: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (s_w, s_1) if per_example else (s_w.sum(1), s_1.sum(1))


def rmsnorm_gain_grad_with_norms_reference(
    x: torch.Tensor,
    rstd: torch.Tensor,
    gy: torch.Tensor,
    precond: torch.Tensor | None = None,
    per_example: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit per-example gain gradients (K, n, d) and their norms. For tests."""
    _check(x, rstd, gy, precond)
    dgn = (gy.float() * x.float() * rstd.float()[..., None]).sum(2)
    d2 = dgn.square()
    s_1 = d2.sum(-1)
    s_w = s_1.clone() if precond is None else (d2 * precond.float()[:, None]).sum(-1)
    return (dgn.sum(1), *_finish(s_w, s_1, per_example))


def _torch_path(x, rstd, gy, precond, per_example):
    # Per-example gain gradients are only (K, n, d): materialising them is cheap.
    K, N, T, D = x.shape
    xhat = x.float() * rstd.float()[..., None]
    dgn = torch.einsum("kntd,kntd->knd", gy.float(), xhat)
    d2 = dgn.square()
    s_1 = d2.sum(-1)
    s_w = s_1.clone() if precond is None else torch.bmm(d2, precond.float().view(K, D, 1))[..., 0]
    return (dgn.sum(1), *_finish(s_w, s_1, per_example))


def _triton_path(x, rstd, gy, precond, per_example):
    K, N, T, D = x.shape
    dg = torch.zeros(K, D, dtype=torch.float32, device=x.device)
    if K * N * D == 0:
        s = torch.zeros(K, N, dtype=torch.float32, device=x.device)
        return (dg, *_finish(s, s.clone(), per_example))
    x, gy = x.contiguous(), gy.contiguous()
    rstd = rstd.float().contiguous()
    block_d = max(16, min(LAUNCH_CONFIG["BLOCK_D"], triton.next_power_of_2(D)))
    block_t = max(1, min(LAUNCH_CONFIG["BLOCK_T"], triton.next_power_of_2(max(T, 1))))
    grid = (K, triton.cdiv(D, block_d))
    s_w = torch.empty(K, N, grid[1], dtype=torch.float32, device=x.device)
    s_1 = torch.empty_like(s_w)
    w = None if precond is None else precond.contiguous()
    _rmsnorm_gns_kernel[grid](
        x,
        rstd,
        gy,
        w if w is not None else dg,  # dummy pointer, never read when HAS_W is False
        dg,
        s_w,
        s_1,
        N,
        T,
        D,
        HAS_W=w is not None,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=LAUNCH_CONFIG["num_warps"],
    )
    s_1 = s_1.sum(2)
    s_w = s_1.clone() if w is None else s_w.sum(2)
    return (dg, *_finish(s_w, s_1, per_example))


def rmsnorm_gain_grad_with_norms(
    x: torch.Tensor,
    rstd: torch.Tensor,
    gy: torch.Tensor,
    precond: torch.Tensor | None = None,
    per_example: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gain gradient of y = x * rstd * g per member, with per-example squared norms.

    Args:
        x: norm input (K, n, t, d), fp32/fp16/bf16.
        rstd: 1 / sqrt(mean(x^2, -1) + eps), (K, n, t), as saved by the forward.
        gy: output gradient (K, n, t, d).
        precond: positive weights W (K, d), or None for W = 1.
        per_example: norms per example (K, n) instead of summed (K,).
        backend: "auto" (Triton on CUDA, torch on CPU), "triton" or "torch".

    Returns:
        (dg, s_w, s_1): dg (K, d) in **fp32**; s_w = sum_n |dg_n|_W^2 and
        s_1 = sum_n |dg_n|^2 in fp32. No rescaling for mean losses.
    """
    _check(x, rstd, gy, precond)
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    if backend == "torch":
        return _torch_path(x, rstd, gy, precond, per_example)
    if backend == "triton":
        return _triton_path(x, rstd, gy, precond, per_example)
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
