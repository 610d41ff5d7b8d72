// RMSNorm forward and backward over fp32 CPU tensors, one pass each, with the per-example
// gain-gradient norms of the gradient-noise scale in the backward (trajinv.kernels.rmsnorm).
//
// The backward forms each example's gain gradient dg_n = sum_t Gy[n, t] * x_hat[n, t] in a
// private row of a (K, n, d) scratch as it goes; S_W = sum_n |dg_n|_W^2 and S_1 = sum_n |dg_n|^2
// come from that scratch at the end: O(n d) work against the backward's O(n t d). Work is
// split over examples (each owns its scratch row) and summed over n in a fixed order, so
// results do not depend on the thread count.
#include "prelude.h"

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
