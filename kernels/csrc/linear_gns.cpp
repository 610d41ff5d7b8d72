// The CPU path's reduction of per-example weight-gradient tiles (trajinv.kernels.linear_gns).
//
// For tiles C (K, N, M) it forms dW (K, M) = sum_n C[k, n], S_1 (K, N) = sum_m C^2 and
// S_W (K, N) = sum_m W C^2 reading each tile element once. With torch ops that is a GEMV, an
// in-place square, a sum and a GEMV: four passes over the tiles, which at t = 64 cost about
// as much as forming them. Work items are (k, m-block) slices; per-item partial sums (fp32
// over a block, summed in double in block order) make the result independent of the thread
// count. With per_example = 0 the sums come out per member, (K,), written or (add_totals)
// added into the caller's buffer: no allocation and no add ops per layer.
#include "prelude.h"

#include <vector>
#include <omp.h>

// One row of one tile: d (+)= c, and the row's sums of c^2 and w c^2. Templated so the
// inner loop has no branch and vectorises (omp simd keeps IEEE semantics otherwise).
template <bool HAS_W, bool ACC>
CLONES static void row(const float* c, const float* w, float* d, int64_t len, double* p1, double* pw) {
    float a1 = 0.f, aw = 0.f;
    #pragma omp simd reduction(+:a1, aw)
    for (int64_t j = 0; j < len; ++j) {
        const float x = c[j], x2 = x * x;
        if (ACC) d[j] += x; else d[j] = x;
        a1 += x2;
        if (HAS_W) aw += x2 * w[j];
    }
    *p1 = a1;
    if (HAS_W) *pw = aw;
}

template <bool HAS_W>
static void item(const float* ct, const float* w, float* dw, int64_t N, int64_t M, int64_t k, int64_t lo,
                 int64_t len, int accumulate, double* p1, double* pw) {
    float* d = dw + k * M + lo;
    const float* wk = HAS_W ? w + k * M + lo : nullptr;
    for (int64_t n = 0; n < N; ++n) {
        const float* c = ct + (k * N + n) * M + lo;
        if (n == 0 && !accumulate) row<HAS_W, false>(c, wk, d, len, p1 + n, pw + n);
        else row<HAS_W, true>(c, wk, d, len, p1 + n, pw + n);
    }
}

extern "C" int trajinv_tile_reduce(const float* ct, const float* w, int64_t K, int64_t N, int64_t M,
                                   float* dw, float* s1, float* sw, int accumulate, int per_example,
                                   int add_totals, int nthreads) {
    const int64_t B = TRAJINV_BLOCK, nb = (M + B - 1) / B, items = K * nb;
    std::vector<double> p1(items * N), pw(items * N);
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(items > 1 && K * N * M > 65536)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t k = it / nb, lo = (it % nb) * B, len = (M - lo < B) ? M - lo : B;
        if (w) item<true>(ct, w, dw, N, M, k, lo, len, accumulate, &p1[it * N], &pw[it * N]);
        else item<false>(ct, w, dw, N, M, k, lo, len, accumulate, &p1[it * N], &pw[it * N]);
    }
    for (int64_t k = 0; k < K; ++k) {
        double t1 = 0, tw = 0;
        for (int64_t n = 0; n < N; ++n) {
            double a1 = 0, aw = 0;
            for (int64_t b = 0; b < nb; ++b) { a1 += p1[(k * nb + b) * N + n]; aw += pw[(k * nb + b) * N + n]; }
            if (per_example) {
                s1[k * N + n] = (float)a1;
                sw[k * N + n] = (float)(w ? aw : a1);
            }
            t1 += a1;
            tw += aw;
        }
        if (!per_example && add_totals) {
            s1[k] += (float)t1;
            sw[k] += (float)(w ? tw : t1);
        } else if (!per_example) {
            s1[k] = (float)t1;
            sw[k] = (float)(w ? tw : t1);
        }
    }
    return 0;
}
