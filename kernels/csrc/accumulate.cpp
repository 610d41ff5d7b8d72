// Gradient accumulation over a list of fp32 CPU tensors fused with the micro-batch squared
// norms (trajinv.kernels.accumulate): acc += g and per-member sums of g^2 and W g^2, one pass.
//
// Work items are (tensor, member, block) slices of at most TRAJINV_BLOCK elements; each writes
// its own partial sums, added in item order afterwards, so results do not depend on the thread
// count. Driven by a table of pointers: at small sizes a call per tensor costs more than the
// arithmetic.
#include "prelude.h"

#include <vector>
#include <omp.h>
// One table row per tensor: grad, acc (0: norms only), W (0: identity) pointers; numel; members; measured.
struct Row { int64_t g, acc, w, numel, members, measured; };
template <bool HAS_W, bool ACC>
CLONES static void block(const float* g, float* acc, const float* w, int64_t len, double* p1, double* pw) {
    float a1 = 0.f, aw = 0.f;
    #pragma omp simd reduction(+:a1, aw)
    for (int64_t j = 0; j < len; ++j) {
        const float x = g[j], x2 = x * x;
        if (ACC) acc[j] += x;
        a1 += x2;
        if (HAS_W) aw += x2 * w[j];
    }
    *p1 = a1;
    *pw = HAS_W ? aw : a1;
}
extern "C" int trajinv_accumulate_list(const Row* rows, int64_t n_rows, int64_t K, double* sums, int nthreads) {
    const int64_t B = TRAJINV_BLOCK;
    std::vector<int64_t> first(n_rows + 1, 0), per(n_rows);
    for (int64_t r = 0; r < n_rows; ++r) {
        const int64_t m = rows[r].numel / rows[r].members;
        per[r] = (m + B - 1) / B;
        first[r + 1] = first[r] + rows[r].members * per[r];
    }
    const int64_t items = first[n_rows];
    std::vector<double> p1(items), pw(items);
    std::vector<int64_t> row_of(items);
    for (int64_t r = 0; r < n_rows; ++r)
        for (int64_t i = first[r]; i < first[r + 1]; ++i) row_of[i] = r;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(items > 1 && items * B > 65536)
    for (int64_t i = 0; i < items; ++i) {
        const int64_t r = row_of[i];
        const Row& row = rows[r];
        const int64_t m = row.numel / row.members, local = i - first[r];
        const int64_t k = local / per[r], lo = k * m + (local % per[r]) * B;
        const int64_t len = (k * m + m - lo < B) ? k * m + m - lo : B;
        const float* g = (const float*)row.g + lo;
        float* acc = row.acc ? (float*)row.acc + lo : nullptr;
        const float* w = row.w ? (const float*)row.w + lo : nullptr;
        if (w) { if (acc) block<true, true>(g, acc, w, len, &p1[i], &pw[i]);
                 else block<true, false>(g, acc, w, len, &p1[i], &pw[i]); }
        else   { if (acc) block<false, true>(g, acc, w, len, &p1[i], &pw[i]);
                 else block<false, false>(g, acc, w, len, &p1[i], &pw[i]); }
    }
    for (int64_t r = 0; r < n_rows; ++r) {
        if (!rows[r].measured) continue;
        for (int64_t i = first[r]; i < first[r + 1]; ++i) {
            const int64_t k = rows[r].members == 1 ? 0 : (i - first[r]) / per[r];
            sums[k] += pw[i];
            sums[K + k] += p1[i];
        }
    }
    return 0;
}
