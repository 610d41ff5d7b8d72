"""RMSNorm for member-axis activations: forward, backward, and the gain gradient fused with
per-example (preconditioned) squared norms for the gradient-noise scale.

For y = x_hat * g with x_hat = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps), the
gain gradient of example n is dg_n = sum_t Gy[n, t] * x_hat[n, t] (a d-vector),
dg = sum_n dg_n, and the estimator (docs/design.md, "The gradient noise scale")
wants

    S_W = sum_n |dg_n|_W^2 = sum_n sum_j W_j dg_n[j]^2     (W > 0, shaped like g)
    S_1 = sum_n |dg_n|^2.

Shapes carry the member axis: x, Gy (K, n, t, d), rstd (K, n, t), gain and W (K, d).

Triton (`rmsnorm_gain_grad_with_norms`). The plain gain gradient reads x and Gy
once (2 * n * t * d elements) plus rstd; so does this kernel: each program owns a
d-slice of one member, loops over examples and their tokens, keeps dg_n for the
current example in registers, folds it into dg and into two scalars, and writes
nothing per example but those two scalars. The (n, d) per-example gradients never
reach memory. Extra work: ~5 flops per (example, feature), about 5 / (2 t)
relative to the gain gradient itself, and one read of W (d elements). A member's
d-slices are few programs (6 at d = 768), so its examples are also split into ranges,
each its own program (`choose_splits`, ~2 programs per SM): each range writes its own
fp32 dg slab (K x d, summed after), tiny beside the 2 * n * t * d elements it saves
one program from reading alone.

CPU (`rmsnorm_forward_cpu`, `rmsnorm_backward_cpu`, ``csrc/rmsnorm.cpp``, fp32).
With torch ops an RMSNorm forward is five element-wise passes (square, mean,
rsqrt, two multiplies) and autograd's backward about ten, each reading and
writing the whole activation; at the CPU presets' sizes (a (8, 64, 64)
micro-batch) every pass costs more in dispatch than in arithmetic. Here the
forward reads x once and writes y and rstd; the backward reads x, rstd and Gy
once, writes dx, and forms each dg_n in a private row of a small (K, n, d)
scratch, from which S_W and S_1 come at the end: O(n d) work against the
backward's O(n t d), so measuring the gain norms costs nothing over the fused
backward itself. Results do not depend on the thread count. `available()` says
whether it can run (CPU, fp32, library built, no torch.func transform);
`TRAJINV_NATIVE_NORM=0` turns it off.

Torch ops: `rmsnorm_forward_torch` (any dtype or device; what autograd runs
where the native path cannot) and the references
`rmsnorm_gain_grad_with_norms_reference`, `rmsnorm_backward_reference`.
"""

from __future__ import annotations

import ctypes

import torch
import triton
import triton.language as tl

from trajinv.kernels.backend import (FLOAT_DTYPES, check_splits, example_ranges, multiprocessors, on_device,
                                     resolve_backend)
from trajinv.kernels.native import NativeLibrary

# Launch configuration, shared with the AOT test so what is checked is what runs: a d-slice of
# at most BLOCK_D features; narrower models get a narrower slice and proportionally more token
# rows, so every tile holds TILE elements (32 per thread at 4 warps). A (32, 64) tile at 4 warps
# made ptxas give the fp32 sm_90 kernel a 16-byte stack frame; equal-area tiles compile clean.
LAUNCH_CONFIG = {"BLOCK_T": 32, "BLOCK_D": 128, "num_warps": 4}
TILE = LAUNCH_CONFIG["BLOCK_T"] * LAUNCH_CONFIG["BLOCK_D"]


def launch_config(d: int) -> dict[str, int]:
    """BLOCK_T, BLOCK_D and num_warps for features `d`: one of four tiles (BLOCK_D 16, 32, 64, 128),
    all compiled by the tests. Short sequences mask the unused token rows rather than pick yet
    another, unchecked, tile."""
    block_d = max(16, min(LAUNCH_CONFIG["BLOCK_D"], triton.next_power_of_2(max(d, 1))))
    return {"BLOCK_T": TILE // block_d, "BLOCK_D": block_d, "num_warps": LAUNCH_CONFIG["num_warps"]}


@triton.jit
def _rmsnorm_gns_kernel(
    x_ptr,  # (K, N, T, D) norm input, contiguous
    rstd_ptr,  # (K, N, T) fp32 reciprocal RMS saved by the forward
    gy_ptr,  # (K, N, T, D) output gradient, contiguous
    w_ptr,  # (K, D) positive preconditioner (unused when HAS_W is False)
    dg_ptr,  # (SPLITS, K, D) fp32 gain gradient, one slab per example split (written)
    sw_ptr,  # (K, N, P) fp32 per-program partial sum_j W dg_n^2 (written)
    s1_ptr,  # (K, N, P) fp32 per-program partial sum_j dg_n^2 (written)
    N,
    T,
    D,
    SPLITS,  # example ranges per member, each its own program (K x d-tiles alone is a handful of programs)
    N_PER,  # examples per split
    HAS_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    k = tl.program_id(0) // SPLITS
    split = tl.program_id(0) % SPLITS
    pid_d = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_T)
    mask_d = offs_d < D
    k64 = k.to(tl.int64)
    if HAS_W:
        w = tl.load(w_ptr + k64 * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    dg = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_end = tl.minimum(N, (split + 1) * N_PER)
    for n in range(split * N_PER, n_end):
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
    members = tl.num_programs(0) // SPLITS
    tl.store(dg_ptr + (split.to(tl.int64) * members + k64) * D + offs_d, dg, mask=mask_d)


def _check_grad(x: torch.Tensor, rstd: torch.Tensor, gy: torch.Tensor, precond: torch.Tensor | None) -> None:
    if x.dim() != 4 or tuple(gy.shape) != tuple(x.shape):
        raise ValueError(f"x and gy must both be (K, n, t, d); got x {tuple(x.shape)}, gy {tuple(gy.shape)}")
    if tuple(rstd.shape) != tuple(x.shape[:3]):
        raise ValueError(f"rstd must have shape {tuple(x.shape[:3])} (K, n, t), got {tuple(rstd.shape)}")
    for name, v in (("x", x), ("gy", gy), ("rstd", rstd), ("precond", precond)):
        if v is not None and v.dtype not in FLOAT_DTYPES:
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
    _check_grad(x, rstd, gy, precond)
    dgn = (gy.float() * x.float() * rstd.float()[..., None]).sum(2)
    d2 = dgn.square()
    s_1 = d2.sum(-1)
    s_w = s_1.clone() if precond is None else (d2 * precond.float()[:, None]).sum(-1)
    return (dgn.sum(1), *_finish(s_w, s_1, per_example))


def _gain_grad_torch(x, rstd, gy, precond, per_example):
    # Per-example gain gradients are only (K, n, d): materialising them is cheap.
    K, N, T, D = x.shape
    xhat = x.float() * rstd.float()[..., None]
    dgn = torch.einsum("kntd,kntd->knd", gy.float(), xhat)
    d2 = dgn.square()
    s_1 = d2.sum(-1)
    s_w = s_1.clone() if precond is None else torch.bmm(d2, precond.float().view(K, D, 1))[..., 0]
    return (dgn.sum(1), *_finish(s_w, s_1, per_example))


def choose_splits(programs: int, n: int, sms: int) -> int:
    """Example splits per member: about 2 programs per SM. K x d-tiles is a handful of programs (6 for
    gpt-164m's d = 768 at K = 1, against 132 SMs on an H100), each reading every row of its members; a
    split costs one more fp32 (K, d) slab, written and summed: nothing beside the rows it saves reading."""
    return example_ranges(n, (2 * sms) // max(programs, 1))[0]


def _triton_path(x, rstd, gy, precond, per_example, splits=None):
    K, N, T, D = x.shape
    dg = torch.zeros(K, D, dtype=torch.float32, device=x.device)
    if K * N * D == 0:
        s = torch.zeros(K, N, dtype=torch.float32, device=x.device)
        return (dg, *_finish(s, s.clone(), per_example))
    x, gy = x.contiguous(), gy.contiguous()
    rstd = rstd.float().contiguous()
    cfg = launch_config(D)
    tiles = triton.cdiv(D, cfg["BLOCK_D"])
    if splits is None:
        splits = choose_splits(K * tiles, N, multiprocessors(x))
    splits, n_per = example_ranges(N, splits)
    grid = (K * splits, tiles)
    slabs = dg if splits == 1 else torch.empty(splits, K, D, dtype=torch.float32, device=x.device)
    s_w = torch.empty(K, N, tiles, dtype=torch.float32, device=x.device)
    s_1 = torch.empty_like(s_w)
    w = None if precond is None else precond.contiguous()
    with on_device(x):
        _rmsnorm_gns_kernel[grid](
            x,
            rstd,
            gy,
            w if w is not None else dg,  # dummy pointer, never read when HAS_W is False
            slabs,
            s_w,
            s_1,
            N,
            T,
            D,
            splits,
            n_per,
            HAS_W=w is not None,
            **cfg,
        )
    if splits > 1:
        dg = slabs.sum(0)
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
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gain gradient of y = x * rstd * g per member, with per-example squared norms.

    Args:
        x: norm input (K, n, t, d), fp32/fp16/bf16.
        rstd: 1 / sqrt(mean(x^2, -1) + eps), (K, n, t), as saved by the forward.
        gy: output gradient (K, n, t, d).
        precond: positive weights W (K, d), or None for W = 1.
        per_example: norms per example (K, n) instead of summed (K,).
        backend: "auto" (Triton on CUDA, torch ops otherwise), "triton" or "cpu".
        splits: Triton only: split each member's examples into this many ranges, each its own
            program (None: `choose_splits`, about 2 programs per SM). The same result either way.

    Returns:
        (dg, s_w, s_1): dg (K, d) in **fp32**; s_w = sum_n |dg_n|_W^2 and
        s_1 = sum_n |dg_n|^2 in fp32. No rescaling for mean losses.
    """
    _check_grad(x, rstd, gy, precond)
    check_splits(splits)
    if resolve_backend(backend, x.device) == "cpu":
        return _gain_grad_torch(x, rstd, gy, precond, per_example)
    return _triton_path(x, rstd, gy, precond, per_example, splits)


# ---------------------------------------------------------------- the CPU path

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
NATIVE = NativeLibrary(
    "trajinv_rmsnorm", "rmsnorm.cpp",
    {"trajinv_rmsnorm_fwd": ([_P, _P, _I64, _I64, _I64, _F, _P, _P, _INT], _INT),
     "trajinv_rmsnorm_bwd": ([_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _INT, _INT], _INT)},
    switch="TRAJINV_NATIVE_NORM", what="native CPU RMSNorm",
)


def available(x: torch.Tensor, gain: torch.Tensor) -> bool:
    """Can the native path run these operands (CPU, fp32, library built, no torch.func transform:
    vmap/grad wrap tensors, and raw pointers would bypass them)?"""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and gain.dtype == torch.float32
            and not _functorch_active() and NATIVE.get() is not None)


def _functorch_active() -> bool:
    check = getattr(torch._C, "_are_functorch_transforms_active", None)  # private: absent means unknown
    return True if check is None else bool(check())


def _check(x: torch.Tensor, gain: torch.Tensor) -> None:
    if x.dim() != 4 or gain.dim() != 2 or tuple(gain.shape) != (x.shape[0], x.shape[3]):
        raise ValueError(f"RMSNorm needs x (K, n, t, d) and gain (K, d); got {tuple(x.shape)}, {tuple(gain.shape)}")
    if not available(x, gain):
        raise RuntimeError("native CPU RMSNorm needs fp32 CPU tensors and a built library (see available())")


def rmsnorm_forward_cpu(x: torch.Tensor, gain: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x * rstd * gain and rstd = 1 / sqrt(mean(x^2, -1) + eps) (K, n, t), one pass."""
    _check(x, gain)
    x, gain = x.contiguous(), gain.contiguous()
    K, N, T, D = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(K, N, T, dtype=torch.float32)
    if x.numel():
        NATIVE.get().trajinv_rmsnorm_fwd(x.data_ptr(), gain.data_ptr(), K, N * T, D, eps, y.data_ptr(),
                                         rstd.data_ptr(), torch.get_num_threads())
    else:
        rstd.fill_(float("nan"))  # d = 0: the mean of no squares is undefined, as torch's mean says
    return y, rstd


def rmsnorm_backward_cpu(
    x: torch.Tensor, rstd: torch.Tensor, gain: torch.Tensor, gy: torch.Tensor,
    precond: torch.Tensor | None = None, per_example: bool = False, out_sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dgain, s_w, s_1) in one pass over x and gy.

    s_w = sum_n |dg_n|_W^2 and s_1 = sum_n |dg_n|^2 with W = `precond` (K, d) or 1,
    per example (K, n) or summed (K,); raw contributions, no rescaling for mean losses
    (see the module doc). With `out_sums`, a contiguous fp32 (2, K)
    buffer, the summed (S_W, S_1) are added into it and returned as its rows.
    """
    _check(x, gain)
    K, N, T, D = x.shape
    if tuple(gy.shape) != tuple(x.shape) or tuple(rstd.shape) != (K, N, T):
        raise ValueError(f"gy {tuple(gy.shape)} / rstd {tuple(rstd.shape)} do not match x {tuple(x.shape)}")
    if precond is not None and tuple(precond.shape) != (K, D):
        raise ValueError(f"precond must have shape {(K, D)} (K, d), got {tuple(precond.shape)}")
    x, gain, gy, rstd = x.contiguous(), gain.contiguous(), gy.contiguous().float(), rstd.contiguous().float()
    w = None if precond is None else precond.float().contiguous()
    dx = torch.empty_like(x)
    dgn = torch.empty(K, N, D, dtype=torch.float32)
    dg = torch.empty(K, D, dtype=torch.float32)
    if out_sums is not None:
        if per_example or tuple(out_sums.shape) != (2, K) or out_sums.dtype != torch.float32 \
                or not out_sums.is_contiguous() or out_sums.device.type != "cpu":
            raise ValueError(f"out_sums must be a contiguous fp32 CPU {(2, K)} tensor and per_example False; "
                             f"got {tuple(out_sums.shape)} {out_sums.dtype}, per_example={per_example}")
        s_w, s_1 = out_sums[0], out_sums[1]
    else:
        s_w, s_1 = torch.empty(2, K, N, dtype=torch.float32)
    NATIVE.get().trajinv_rmsnorm_bwd(x.data_ptr(), rstd.data_ptr(), gain.data_ptr(), gy.data_ptr(),
                                     None if w is None else w.data_ptr(), K, N, T, D, dx.data_ptr(),
                                     dgn.data_ptr(), dg.data_ptr(), s_1.data_ptr(), s_w.data_ptr(),
                                     int(out_sums is not None), torch.get_num_threads())
    if not per_example and out_sums is None:
        s_w, s_1 = s_w.sum(1), s_1.sum(1)
    return dx, dg, s_w, s_1


def rmsnorm_forward_torch(x: torch.Tensor, gain: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same forward with torch ops, any dtype or device: what `trajinv.ops.rms_norm`
    runs where the native path cannot (autograd goes through it), and the tests' reference.
    Computes in fp32, or in fp64 when x is fp64 (rstd then fp64 too)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(ct)
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return (xf * rstd[..., None] * gain[:, None, None, :].to(ct)).to(x.dtype), rstd


def rmsnorm_backward_reference(
    x: torch.Tensor, rstd: torch.Tensor, gain: torch.Tensor, gy: torch.Tensor,
    precond: torch.Tensor | None = None, per_example: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit maths with per-example gain gradients (K, n, d) in memory. For tests."""
    r = rstd.float()[..., None]
    xhat = x.float() * r
    gg = gy.float() * gain[:, None, None, :].float()
    dx = r * (gg - xhat * (gg * xhat).mean(-1, keepdim=True))
    dgn = (gy.float() * xhat).sum(2)
    d2 = dgn.square()
    s_1 = d2.sum(-1)
    s_w = s_1.clone() if precond is None else (d2 * precond.float()[:, None]).sum(-1)
    if not per_example:
        s_w, s_1 = s_w.sum(1), s_1.sum(1)
    return dx.to(x.dtype), dgn.sum(1), s_w, s_1
