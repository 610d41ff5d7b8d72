"""RMSNorm forward and backward on CPU (fp32) as one native pass each, with the
per-example gain-gradient norms of the gradient-noise scale in the same pass.

With torch ops, an RMSNorm forward is five element-wise passes (square, mean,
rsqrt, two multiplies) and autograd's backward about ten, each reading and
writing the whole activation; at the CPU presets' sizes (a (8, 64, 64) micro-
batch) every pass costs more in dispatch than in arithmetic. Here the forward
reads x once and writes y and rstd; the backward reads x, rstd and Gy once and
writes dx, and forms each example's gain gradient

    dg_n = sum_t Gy[n, t] * x_hat[n, t]            (a d-vector)

in a private row of a small (K, n, d) scratch as it goes. dg = sum_n dg_n and,
for the GNS estimator (DESIGN.md, "Gradient noise scale, exactly"),

    S_W = sum_n |dg_n|_W^2,   S_1 = sum_n |dg_n|^2

come from that scratch at the end: O(n * d) work against the backward's
O(n * t * d). So measuring the per-example gain norms costs nothing over the
fused backward itself. Work is split over examples (each owns its scratch row)
and summed over n in a fixed order: results do not depend on the thread count.

Shapes carry the member axis: x, Gy (K, n, t, d), rstd (K, n, t), gain and W
(K, d). Built by `NativeLibrary` (system C++ compiler, first use, cached);
`available()` says whether this path can run, otherwise callers keep torch ops
(`TRAJINV_NATIVE_NORM=0` turns it off). Torch references live beside it.
"""

from __future__ import annotations

import ctypes

import torch

from trajinv.kernels.native import NativeLibrary

_SOURCE = r"""
#include <cstdint>
#include <cmath>
#include <vector>
#include <omp.h>

// One row: y = x * rstd * g. Compiled for AVX2/AVX-512 too, picked at load time (CLONES).
CLONES static float fwd_row(const float* xr, const float* gk, float* yr, int64_t D, float eps) {
    float ss = 0.f;
    #pragma omp simd reduction(+:ss)
    for (int64_t j = 0; j < D; ++j) ss += xr[j] * xr[j];
    const float rs = 1.0f / std::sqrt(ss / (float)D + eps);
    #pragma omp simd
    for (int64_t j = 0; j < D; ++j) yr[j] = (xr[j] * rs) * gk[j];
    return rs;
}

// One row of the backward: dx, and the example's gain gradient accumulated into acc.
CLONES static void bwd_row(const float* xr, const float* gr, const float* gk, float r, float* dr, float* acc,
                           int64_t D) {
    float dot = 0.f;
    #pragma omp simd reduction(+:dot)
    for (int64_t j = 0; j < D; ++j) {
        const float xh = xr[j] * r;
        dot += (gr[j] * gk[j]) * xh;
        acc[j] += gr[j] * xh;
    }
    const float c = dot / (float)D;
    #pragma omp simd
    for (int64_t j = 0; j < D; ++j) dr[j] = r * (gr[j] * gk[j] - (xr[j] * r) * c);
}

extern "C" int trajinv_rmsnorm_fwd(const float* x, const float* g, int64_t K, int64_t R, int64_t D, float eps,
                                   float* y, float* rstd, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(K * R * D > 65536)
    for (int64_t r = 0; r < K * R; ++r) {
        rstd[r] = fwd_row(x + r * D, g + (r / R) * D, y + r * D, D, eps);
    }
    return 0;
}

// dgn: (K, N, D) scratch, one private row per example; dg (K, D); s1, sw (K, N) per example,
// or with add_totals (K,) per member, added into.
extern "C" int trajinv_rmsnorm_bwd(const float* x, const float* rstd, const float* g, const float* gy,
                                   const float* w, int64_t K, int64_t N, int64_t T, int64_t D, float* dx,
                                   float* dgn, float* dg, float* s1, float* sw, int add_totals, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(K * N * T * D > 65536)
    for (int64_t e = 0; e < K * N; ++e) {
        const float* gk = g + (e / N) * D;
        float* acc = dgn + e * D;
        for (int64_t j = 0; j < D; ++j) acc[j] = 0.f;
        for (int64_t t = 0; t < T; ++t) {
            const int64_t row = e * T + t;
            bwd_row(x + row * D, gy + row * D, gk, rstd[row], dx + row * D, acc, D);
        }
    }
    for (int64_t k = 0; k < K; ++k) {
        float* d = dg + k * D;
        const float* wk = w ? w + k * D : nullptr;
        for (int64_t j = 0; j < D; ++j) d[j] = 0.f;
        double t1 = 0, tw = 0;
        for (int64_t n = 0; n < N; ++n) {
            const float* a = dgn + (k * N + n) * D;
            double a1 = 0, aw = 0;
            for (int64_t j = 0; j < D; ++j) {
                d[j] += a[j];
                const double v2 = (double)a[j] * a[j];
                a1 += v2;
                if (wk) aw += v2 * wk[j];
            }
            if (!wk) aw = a1;
            if (!add_totals) {
                s1[k * N + n] = (float)a1;
                sw[k * N + n] = (float)aw;
            }
            t1 += a1;
            tw += aw;
        }
        if (add_totals) {
            s1[k] += (float)t1;
            sw[k] += (float)tw;
        }
    }
    return 0;
}
"""
_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
NATIVE = NativeLibrary(
    "trajinv_rmsnorm_cpu", lambda: _SOURCE,
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
    return y, rstd


def rmsnorm_backward_cpu(
    x: torch.Tensor, rstd: torch.Tensor, gain: torch.Tensor, gy: torch.Tensor,
    precond: torch.Tensor | None = None, per_example: bool = False, out_sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dgain, s_w, s_1) in one pass over x and gy.

    s_w = sum_n |dg_n|_W^2 and s_1 = sum_n |dg_n|^2 with W = `precond` (K, d) or 1,
    per example (K, n) or summed (K,); raw contributions, no rescaling for mean losses
    (see `trajinv.kernels.rmsnorm_gns`). With `out_sums`, a contiguous fp32 (2, K)
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
    """The same forward with torch ops, any dtype or device: what `trajinv.gns_ops.rms_norm`
    runs where the native path cannot (autograd goes through it), and the tests' reference."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return (xf * rstd[..., None] * gain[:, None, None, :].float()).to(x.dtype), rstd


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
