"""One-pass native CPU AdamW with per-(tensor, member) statistics, for FusedAdamW's CPU path.

Torch ops cannot give the statistics for free on CPU: every sum (g^2, g^2/P,
p^2, update^2) is another pass over memory, which made the statistics cost
about 4x the update itself. This kernel does the AdamW update *and* the four
sums in the update's registers, so a step moves the minimum for fp32: read p,
g, m, v and write p, m, v, 28 bytes/param, plus 16 bytes per segment of
statistics. It follows pointers (params and grads stay separate tensors, the
states are the bucket's flat buffers), so one call covers every tensor of a
bucket with no gather.

Work split: each (tensor, member) *segment* is cut into blocks of ``BLOCK``
elements; each OpenMP thread takes a contiguous run of blocks holding an equal
share of the elements (tiny tensors do not unbalance it). A block sums its
elements in fp32 in chunks of ``CHUNK`` (vectorised by ``omp simd``) and adds
the chunk sums into doubles; the per-block sums are then reduced per segment
in block order, so the result does not depend on the number of threads.

Maths: the formulas of ``torch._fused_adamw_``'s ADAMW kernel in fp32 (bias
corrections and step size in double, then cast): ``p *= 1 - lr*wd``,
``m += (1-b1)(g-m)``, ``v = b2 v + (1-b2) g g``, ``p -= (lr/bc1) m /
(sqrt(v)/sqrt(bc2) + eps)`` with ``g = grad * (1/grad_scale)`` (as the Triton
kernel; grads are not written back unscaled). It agrees with
``torch.optim.AdamW`` to fp32 rounding (tests: 20 steps at rtol 1e-5). Compiled with
``-O3`` and IEEE semantics (no ``-ffast-math``; ``-ffp-contract=off`` so no FMA
changes the rounding between CPUs; ``-fno-math-errno`` only lets ``sqrt``
vectorise). x86-64 builds carry AVX2 and AVX-512 clones picked at load time
(GCC ``target_clones``), so one cached binary is safe on any x86-64 machine.

Build: `trajinv.kernels.native.NativeLibrary` (system C++ compiler on first use,
torch's extension cache, ctypes; the call releases the GIL). If the build fails,
``lib()`` returns None once with a warning and FusedAdamW keeps its torch-ops
path. ``TRAJINV_NATIVE_ADAMW=0`` switches the native path off.

Scope: fp32 params on CPU (16-bit params keep the torch-ops path: their
rounding modes, master copies and stochastic rounding live there). The
pure-torch twin of the maths is ``trajinv.kernels.fused_adamw.adamw_reference``.
"""

from __future__ import annotations

import ctypes

import torch

from trajinv.kernels.native import NativeLibrary

BLOCK = 16384  # elements per work item: 448 KB of traffic, far above the per-block overhead
CHUNK = 256  # fp32 partial sums over at most this many elements (per simd lane: CHUNK / width)
SEG_COLS = 7  # segment table: tensor, pointer row, member, flat offset, length, hyper slot, segment id
PAR_MIN = 1 << 16  # below this many elements a parallel region costs more than it saves

_SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <vector>
#include <algorithm>
#ifdef _OPENMP
#include <omp.h>
#endif


namespace {

constexpr int64_t BLOCK = @BLOCK@;
constexpr int64_t CHUNK = @CHUNK@;

struct Seg {
  float* p; const float* g; float* m; float* v; float* w;
  int64_t n, id;
  float inv_gs, decay, w1, b2, c2, step_size, bc2_sqrt, eps, c_prev, eps_prev;
};

// WOUT: also write the next step's preconditioner W = 1/den (den = sqrt(v_hat) + eps of the
// updated state), which the gradient-noise estimator reads: 4 more bytes per element here
// instead of a separate four-pass computation over v.
template <bool STATS, bool WOUT>
inline __attribute__((always_inline)) void body(const Seg& s, int64_t lo, int64_t hi, double* acc) {
  float* __restrict p = s.p;
  const float* __restrict g = s.g;
  float* __restrict m = s.m;
  float* __restrict v = s.v;
  float* __restrict w = s.w;
  const float inv_gs = s.inv_gs, decay = s.decay, w1 = s.w1, b2 = s.b2, c2 = s.c2;
  const float step_size = s.step_size, bc2_sqrt = s.bc2_sqrt, eps = s.eps;
  const float c_prev = s.c_prev, eps_prev = s.eps_prev;
  double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  for (int64_t c = lo; c < hi; c += CHUNK) {
    const int64_t e = std::min(hi, c + CHUNK);
    float sg = 0.f, sw = 0.f, sp = 0.f, su = 0.f;
#pragma omp simd reduction(+ : sg, sw, sp, su)
    for (int64_t i = c; i < e; ++i) {
      const float gi = g[i] * inv_gs;
      const float p0 = p[i], m0 = m[i], v0 = v[i];
      if (STATS) {
        const float gg = gi * gi;
        sg += gg;
        sw += gg / (std::sqrt(v0) * c_prev + eps_prev);  // P from the state before the update
      }
      const float m1 = m0 + w1 * (gi - m0);
      const float v1 = v0 * b2 + c2 * gi * gi;
      const float den = std::sqrt(v1) / bc2_sqrt + eps;
      const float p1 = p0 * decay - step_size * m1 / den;
      m[i] = m1;
      v[i] = v1;
      p[i] = p1;
      if (WOUT) w[i] = 1.0f / den;
      if (STATS) {
        const float u = p1 - p0;
        sp += p1 * p1;
        su += u * u;
      }
    }
    a0 += sg; a1 += sw; a2 += sp; a3 += su;
  }
  acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
}

CLONES void block_stats(const Seg& s, int64_t lo, int64_t hi, double* acc) { body<true, false>(s, lo, hi, acc); }
CLONES void block_plain(const Seg& s, int64_t lo, int64_t hi, double* acc) { body<false, false>(s, lo, hi, acc); }
CLONES void block_stats_w(const Seg& s, int64_t lo, int64_t hi, double* acc) { body<true, true>(s, lo, hi, acc); }
CLONES void block_plain_w(const Seg& s, int64_t lo, int64_t hi, double* acc) { body<false, true>(s, lo, hi, acc); }

}  // namespace

// ptrs: (rows, 2) param and grad addresses; segs: (nseg, 7) int64
// [tensor, ptr row, member, flat offset, length, hyper slot, segment id];
// hyper: (slots, 5) fp32 [lr, wd_eff, beta1, beta2, eps]; steps: per tensor, already advanced;
// gs: null, one value, or one per member; stats: (num segments, 4) fp32 or null;
// wout: null, or flat fp32 laid out like m and v, receiving 1/(sqrt(v_hat) + eps) after the update.
extern "C" int trajinv_adamw_step(
    const int64_t* ptrs, const int64_t* segs, int64_t nseg, float* m, float* v,
    const float* hyper, const float* steps, const float* gs, int gs_per_member,
    float* stats, float* wout, int nthreads) {
  std::vector<Seg> S(nseg);
  std::vector<int64_t> bseg, blo, start;  // blocks: segment, first element; start: prefix element counts
  int64_t total = 0;
  for (int64_t r = 0; r < nseg; ++r) {
    const int64_t* q = segs + r * 7;
    const int64_t t = q[0], row = q[1], j = q[2], off = q[3], n = q[4], slot = q[5];
    const float* h = hyper + slot * 5;
    const double lr = h[0], wd = h[1], b1 = h[2], b2 = h[3], eps = h[4];
    const double step = steps[t], prev = step - 1;
    const double bc1 = 1 - std::pow(b1, step), bc2 = 1 - std::pow(b2, step);
    Seg& s = S[r];
    s.p = reinterpret_cast<float*>(ptrs[2 * row]) + j * n;
    s.g = reinterpret_cast<const float*>(ptrs[2 * row + 1]) + j * n;
    s.m = m + off;
    s.v = v + off;
    s.w = wout ? wout + off : nullptr;
    s.n = n;
    s.id = q[6];
    s.inv_gs = gs ? 1.0f / gs[gs_per_member ? j : 0] : 1.0f;
    s.decay = (float)(1 - lr * wd);
    s.w1 = (float)(1 - b1);
    s.b2 = (float)b2;
    s.c2 = (float)(1 - b2);
    s.step_size = (float)(lr / bc1);
    s.bc2_sqrt = (float)std::sqrt(bc2);
    s.eps = (float)eps;
    // P = sqrt(v_prev / bc2_prev) + eps, and P = 1 on a tensor's first step (no state yet)
    s.c_prev = prev > 0 ? (float)(1 / std::sqrt(1 - std::pow(b2, prev))) : 0.0f;
    s.eps_prev = prev > 0 ? (float)eps : 1.0f;
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
      bseg.push_back(r);
      blo.push_back(lo);
      start.push_back(total);
      total += std::min(BLOCK, n - lo);
    }
  }
  const int64_t nblk = (int64_t)bseg.size();
  std::vector<double> acc(4 * nblk);
  if (total < @PAR_MIN@) nthreads = 1;
  const bool track = stats != nullptr;
#pragma omp parallel num_threads(nthreads)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int tid = 0, nt = 1;
#endif
    // an equal share of the elements, not of the blocks: tails and tiny tensors are short blocks
    const int64_t a = std::lower_bound(start.begin(), start.end(), total * tid / nt) - start.begin();
    const int64_t b = std::lower_bound(start.begin(), start.end(), total * (tid + 1) / nt) - start.begin();
    for (int64_t k = a; k < b; ++k) {
      const Seg& s = S[bseg[k]];
      const int64_t hi = std::min(s.n, blo[k] + BLOCK);
      if (wout) { if (track) block_stats_w(s, blo[k], hi, &acc[4 * k]); else block_plain_w(s, blo[k], hi, &acc[4 * k]); }
      else { if (track) block_stats(s, blo[k], hi, &acc[4 * k]); else block_plain(s, blo[k], hi, &acc[4 * k]); }
    }
  }
  if (track) {
    int64_t k = 0;
    for (int64_t r = 0; r < nseg; ++r) {
      double t[4] = {0, 0, 0, 0};
      for (; k < nblk && bseg[k] == r; ++k)
        for (int c = 0; c < 4; ++c) t[c] += acc[4 * k + c];
      for (int c = 0; c < 4; ++c) stats[4 * S[r].id + c] = (float)t[c];
    }
  }
  return 0;
}
"""

def source() -> str:
    return (_SOURCE.replace("@BLOCK@", str(BLOCK)).replace("@CHUNK@", str(CHUNK))
            .replace("@PAR_MIN@", str(PAR_MIN)))


_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_NATIVE = NativeLibrary("trajinv_cpu_adamw", source,
                        {"trajinv_adamw_step": ([_P, _P, _I64, _P, _P, _P, _P, _P, _INT, _P, _P, _INT], _INT)},
                        switch="TRAJINV_NATIVE_ADAMW", what="native CPU AdamW")


def lib() -> ctypes.CDLL | None:
    """The compiled kernel (built on first call, cached on disk), or None with a one-time warning."""
    return _NATIVE.get()


def reset() -> None:
    """Forget the loaded kernel so that the next `lib()` builds or loads it again (tests)."""
    _NATIVE.reset()


def adamw_step(
    ptrs: torch.Tensor,
    segs: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    hyper: torch.Tensor,
    steps: torch.Tensor,
    grad_scale: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    num_threads: int | None = None,
    precond_out: torch.Tensor | None = None,
) -> None:
    """One fused AdamW step over the segments of `segs`, in place; statistics into `stats` if given.

    ptrs: (rows, 2) int64 addresses of each tensor's fp32 param and grad (contiguous,
    alive for the call). segs: (n, 7) int64 rows [tensor, ptrs row, member, offset in
    exp_avg/exp_avg_sq, length, hyper slot, stats row]; member j of a tensor starts at
    ``j * length`` elements from its param and grad. exp_avg/exp_avg_sq: flat fp32.
    hyper: (slots, 5) fp32 [lr, wd_eff, beta1, beta2, eps]. steps: (tensors,) fp32 step
    counts *after* this step's increment. grad_scale: () or (K,) fp32 (per member),
    grads are multiplied by its reciprocal. stats: (segments, 4) fp32, rows written
    [sum g^2, sum g^2/P, sum p_new^2, sum (p_new - p_old)^2], other rows untouched.
    precond_out: flat fp32 like exp_avg_sq; the stepped segments receive the next step's
    preconditioner 1/(sqrt(v_hat) + eps) from the updated state (the denominator this
    update divided by), the rest is untouched.
    """
    for name, t, dt in (("ptrs", ptrs, torch.int64), ("segs", segs, torch.int64), ("exp_avg", exp_avg, torch.float32),
                        ("exp_avg_sq", exp_avg_sq, torch.float32), ("hyper", hyper, torch.float32),
                        ("steps", steps, torch.float32)):
        if t.dtype != dt or t.device.type != "cpu" or not t.is_contiguous():
            raise TypeError(f"{name} must be a contiguous CPU {dt} tensor, got {t.dtype} on {t.device}")
    if segs.dim() != 2 or segs.shape[1] != SEG_COLS:
        raise ValueError(f"segs must have shape (n, {SEG_COLS}), got {tuple(segs.shape)}")
    if grad_scale is not None and (grad_scale.dtype != torch.float32 or not grad_scale.is_contiguous()):
        raise TypeError(f"grad_scale must be contiguous fp32, got {grad_scale.dtype}")
    if stats is not None and (stats.dtype != torch.float32 or not stats.is_contiguous() or stats.shape[-1] != 4):
        raise TypeError(f"stats must be a contiguous fp32 (segments, 4) tensor, got {stats.dtype} {tuple(stats.shape)}")
    if precond_out is not None and (precond_out.dtype != torch.float32 or not precond_out.is_contiguous()
                                    or precond_out.shape != exp_avg_sq.shape):
        raise TypeError(f"precond_out must be contiguous fp32 shaped like exp_avg_sq {tuple(exp_avg_sq.shape)}, "
                        f"got {precond_out.dtype} {tuple(precond_out.shape)}")
    k = lib()
    if k is None:
        raise RuntimeError("native CPU AdamW is unavailable (see the warning lib() gave)")
    per_member = int(grad_scale is not None and grad_scale.numel() > 1)
    k.trajinv_adamw_step(
        ptrs.data_ptr(), segs.data_ptr(), segs.shape[0], exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
        hyper.data_ptr(), steps.data_ptr(), None if grad_scale is None else grad_scale.data_ptr(), per_member,
        None if stats is None else stats.data_ptr(), None if precond_out is None else precond_out.data_ptr(),
        num_threads or torch.get_num_threads(),
    )
