// One-pass AdamW over fp32 CPU tensors with per-(tensor, member) statistics: the CPU path of
// trajinv.kernels.adamw (the Python wrapper `native_adamw_step` documents the arguments).
//
// Work split: each (tensor, member) *segment* is cut into blocks of TRAJINV_BLOCK elements;
// each OpenMP thread takes a contiguous run of blocks holding an equal share of the elements
// (tiny tensors do not unbalance it). A block sums its elements in fp32 in chunks of
// TRAJINV_CHUNK (vectorised by `omp simd`) and adds the chunk sums into doubles; the per-block
// sums are then reduced per segment in block order, so the result does not depend on the
// number of threads.
#include "prelude.h"

#include <algorithm>
#include <cmath>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Sizes come from adamw.py as -D flags, so each constant has one source.
constexpr int64_t BLOCK = TRAJINV_BLOCK;
constexpr int64_t CHUNK = TRAJINV_CHUNK;
constexpr int64_t PAR_MIN = TRAJINV_PAR_MIN;  // below this many elements a parallel region costs more than it saves

// Segment table columns (SEG_COLS in adamw.py).
enum SegCol { TENSOR, PTR_ROW, MEMBER, OFFSET, LENGTH, SLOT, STATS_ROW, SEG_COLS };
// Hyperparameter table columns (N_HYPER in adamw.py).
enum HyperCol { LR, WD, BETA1, BETA2, EPS, N_HYPER };

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

// ptrs: (rows, 2) param and grad addresses; segs: (nseg, SEG_COLS) int64;
// hyper: (slots, N_HYPER) fp32; steps: per tensor, already advanced;
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
    const int64_t* q = segs + r * SEG_COLS;
    const int64_t t = q[TENSOR], row = q[PTR_ROW], j = q[MEMBER], off = q[OFFSET], n = q[LENGTH];
    const float* h = hyper + q[SLOT] * N_HYPER;
    const double lr = h[LR], wd = h[WD], b1 = h[BETA1], b2 = h[BETA2], eps = h[EPS];
    const double step = steps[t], prev = step - 1;
    const double bc1 = 1 - std::pow(b1, step), bc2 = 1 - std::pow(b2, step);
    Seg& s = S[r];
    s.p = reinterpret_cast<float*>(ptrs[2 * row]) + j * n;
    s.g = reinterpret_cast<const float*>(ptrs[2 * row + 1]) + j * n;
    s.m = m + off;
    s.v = v + off;
    s.w = wout ? wout + off : nullptr;
    s.n = n;
    s.id = q[STATS_ROW];
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
  if (total < PAR_MIN) nthreads = 1;
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
