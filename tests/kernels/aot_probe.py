"""A minimal kernel that checks the AOT tool chain itself (tests/kernels/test_aot.py)."""

import triton
import triton.language as tl


@triton.jit
def scale_kernel(x, y, n, BLOCK: tl.constexpr):
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = off < n
    tl.store(y + off, tl.load(x + off, mask=m) * 2, mask=m)
