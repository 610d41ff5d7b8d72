// Included first by every native CPU kernel of trajinv.kernels; kernels/native.py builds them.
//
// CLONES: compile a function for baseline x86-64, AVX2 and AVX-512 and pick one when the
// library loads (GCC target_clones), so one portable build runs the machine's widest vectors:
// the default flags target baseline SSE2 only.
#pragma once
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define CLONES
#endif
