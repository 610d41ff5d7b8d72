"""Gradient accumulation fused with per-member (preconditioned) squared norms.

Under gradient accumulation each micro-batch gradient g is added into an
accumulator. The micro-batch gradient-noise estimator (DESIGN.md, source 2)
needs, per (tensor, member), the squared norms of each micro-batch gradient:

    s_W[k] = sum_i W[k, i] g[k, i]^2        s_1[k] = sum_i g[k, i]^2

Memory traffic. Plain accumulation reads g, reads acc and writes acc. Computing
the norms afterwards with torch reads g (and W) again: for fp32 that is 12
bytes/element for the add plus 8 for the norms. This kernel does it in the same
pass: read g, read + write acc, read W (when given), so the only extra traffic
over plain accumulation is W itself plus two fp32 partial sums per block of
BLOCK elements. Extra arithmetic: ~4 flops per element.

Member axis: the leading dimension of the tensor, of size `members`
(members = 1 for a tensor without member axis; the sums then have shape (1,)).
Covers every parameter, embeddings included: the tensor is viewed flat per
member, so its inner shape does not matter.

Public API: `accumulate_grad_with_norms` (Triton on CUDA, torch on CPU) and
`accumulate_grad_with_norms_reference`; `accumulate_grads_with_norms` for a
list of tensors (what the trainer calls after each micro-batch: on CPU one
native pass over every tensor, driven by a table of pointers, since at small
sizes a call per tensor costs more than the arithmetic); for flat multi-tensor buffers (the
layout `FusedAdamW` keeps), `accumulate_flat_with_norms` does every
(tensor, member) segment in one launch, driven by a host-built block table
(the Triton interpreter cannot follow pointers stored in memory, so one launch
over many tensors needs them in one allocation).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from trajinv.kernels.native import NativeLibrary

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Launch configuration, shared with the AOT test so what is checked is what runs.
LAUNCH_CONFIG = {"BLOCK": 2048, "num_warps": 4}


@triton.jit
def _accumulate_gns_kernel(
    acc_ptr,  # (members, M) accumulator, updated in place
    g_ptr,  # (members, M) micro-batch gradient
    w_ptr,  # (members, M) positive preconditioner (unused when HAS_W is False)
    sw_ptr,  # (members, P) fp32 partial sum W g^2 (written)
    s1_ptr,  # (members, P) fp32 partial sum g^2 (written)
    M,
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    k = tl.program_id(0)
    pid = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    base = k.to(tl.int64) * M
    g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    acc = tl.load(acc_ptr + base + offs, mask=mask, other=0.0)
    tl.store(acc_ptr + base + offs, (acc.to(tl.float32) + g).to(acc.dtype), mask=mask)
    g2 = g * g
    part = k * tl.num_programs(1) + pid
    tl.store(s1_ptr + part, tl.sum(g2, axis=0))
    if HAS_W:
        w = tl.load(w_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(sw_ptr + part, tl.sum(w * g2, axis=0))


def _check(acc: torch.Tensor, grad: torch.Tensor, precond: torch.Tensor | None, members: int) -> None:
    if not isinstance(members, int) or members < 1:
        raise ValueError(f"members must be a positive int, got {members!r}")
    if tuple(grad.shape) != tuple(acc.shape):
        raise ValueError(f"grad shape {tuple(grad.shape)} differs from acc shape {tuple(acc.shape)}")
    if precond is not None and tuple(precond.shape) != tuple(acc.shape):
        raise ValueError(f"precond shape {tuple(precond.shape)} differs from acc shape {tuple(acc.shape)}")
    for name, v in (("acc", acc), ("grad", grad), ("precond", precond)):
        if v is not None and v.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be fp32/fp16/bf16, got {v.dtype}")
    if members > 1 and (acc.dim() == 0 or acc.shape[0] != members):
        raise ValueError(f"members={members} but the leading dim of shape {tuple(acc.shape)} is not that")
    if not acc.is_contiguous():
        raise ValueError(f"acc must be contiguous to be updated in place (shape {tuple(acc.shape)})")


def accumulate_grad_with_norms_reference(
    acc: torch.Tensor, grad: torch.Tensor, precond: torch.Tensor | None = None, members: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """acc += grad in place; (s_w, s_1) per member, the obvious way. For tests."""
    _check(acc, grad, precond, members)
    acc.add_(grad)
    g2 = grad.float().reshape(members, -1).square()
    s_1 = g2.sum(1)
    s_w = s_1.clone() if precond is None else (g2 * precond.float().reshape(members, -1)).sum(1)
    return s_w, s_1


def _torch_path(acc, grad, precond, members):
    acc.add_(grad)
    g2 = grad.float().reshape(members, -1).square()
    s_1 = g2.sum(1)
    if precond is None:
        return s_1.clone(), s_1
    # vecdot, not bmm: a (members, 1, M) @ (members, M, 1) bmm is ~5x slower on CPU.
    return torch.linalg.vecdot(g2, precond.float().reshape(members, -1)), s_1


def _triton_path(acc, grad, precond, members):
    m = acc.numel() // members
    if m == 0:
        z = torch.zeros(members, dtype=torch.float32, device=acc.device)
        return z, z.clone()
    block = min(LAUNCH_CONFIG["BLOCK"], max(16, triton.next_power_of_2(m)))
    grid = (members, triton.cdiv(m, block))
    s_w = torch.empty(members, grid[1], dtype=torch.float32, device=acc.device)
    s_1 = torch.empty_like(s_w)
    g = grad.contiguous()
    w = None if precond is None else precond.contiguous()
    _accumulate_gns_kernel[grid](
        acc,
        g,
        w if w is not None else g,  # dummy pointer, never read when HAS_W is False
        s_w,
        s_1,
        m,
        HAS_W=w is not None,
        BLOCK=block,
        num_warps=LAUNCH_CONFIG["num_warps"],
    )
    s_1 = s_1.sum(1)
    return (s_1.clone() if w is None else s_w.sum(1)), s_1


def accumulate_grad_with_norms(
    acc: torch.Tensor,
    grad: torch.Tensor,
    precond: torch.Tensor | None = None,
    members: int = 1,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add a micro-batch gradient into `acc` in place and return its squared norms.

    Args:
        acc: accumulator (contiguous), updated in place (acc += grad).
        grad: micro-batch gradient, same shape.
        precond: positive weights W, same shape, or None for W = 1.
        members: size of the leading member axis (1 for a tensor without one).
        backend: "auto" (Triton on CUDA, torch on CPU), "triton" or "torch".

    Returns:
        (s_w, s_1), each fp32 of shape (members,): sum W grad^2 and sum grad^2
        per member, computed from `grad` as given (no rescaling).
    """
    _check(acc, grad, precond, members)
    if backend == "auto":
        backend = "triton" if acc.is_cuda else "torch"
    if backend == "torch":
        return _torch_path(acc, grad, precond, members)
    if backend == "triton":
        return _triton_path(acc, grad, precond, members)
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


# ---------------------------------------------------------------- list of tensors

# CPU: one native pass over every tensor of the list. Work items are (tensor, member,
# block) slices of at most _LIST_BLOCK elements; each writes its own partial sums,
# added in item order afterwards, so results do not depend on the thread count.
_LIST_BLOCK = 4096
_LIST_SOURCE = r"""
#include <cstdint>
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
    const int64_t B = @BLOCK@;
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
"""
NATIVE = NativeLibrary("trajinv_accumulate_list", lambda: _LIST_SOURCE.replace("@BLOCK@", str(_LIST_BLOCK)),
                       {"trajinv_accumulate_list": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                                     ctypes.c_void_p, ctypes.c_int], ctypes.c_int)},
                       switch="TRAJINV_NATIVE_GNS", what="native CPU gradient accumulation")


def _norms_only(grad: torch.Tensor, precond: torch.Tensor | None, members: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = grad.float().reshape(members, -1)
    s_1 = torch.linalg.vecdot(g, g)
    s_w = s_1 if precond is None else torch.linalg.vecdot(g * precond.float().reshape(members, -1), g)
    return s_w, s_1


def accumulate_grads_with_norms(
    accs: Sequence[torch.Tensor | None],
    grads: Sequence[torch.Tensor],
    preconds: Sequence[torch.Tensor | None],
    members: int = 1,
    measured: Sequence[bool] | None = None,
    backend: str = "auto",
    out_sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`accumulate_grad_with_norms` over a list of tensors, sums added over the list.

    Args:
        accs: per tensor, the accumulator (acc += grad), or None for the norms
            only: the first micro-batch of a step adopts its gradient as the
            accumulator, so it costs one read instead of a copy.
        grads, preconds: per tensor, as for `accumulate_grad_with_norms` (every
            tensor has the same leading member axis `members`, or none when 1).
        measured: per tensor, whether its norms enter the sums (an unmeasured
            tensor is still accumulated). Default: all True.
        backend: "auto" (CPU: native when built, else torch; CUDA: Triton), "triton" or "torch".
        out_sums: a contiguous (2, members) fp64 CPU buffer to add (s_w, s_1) into
            (the trainer's running sums over micro-batches); returned as its rows.

    Returns:
        (s_w, s_1) fp32 (members,): sum over measured tensors of W grad^2 and grad^2, per member
        (fp64 rows of `out_sums` when given).
    """
    n = len(grads)
    if len(accs) != n or len(preconds) != n:
        raise ValueError(f"accs, grads, preconds must have one entry per tensor; got {len(accs)}, {n}, {len(preconds)}")
    measured = [True] * n if measured is None else list(measured)
    if len(measured) != n:
        raise ValueError(f"measured needs {n} entries, got {len(measured)}")
    if not isinstance(members, int) or members < 1:
        raise ValueError(f"members must be a positive int, got {members!r}")
    if out_sums is not None and (out_sums.shape != (2, members) or out_sums.dtype != torch.float64
                                 or not out_sums.is_contiguous() or out_sums.device.type != "cpu"):
        raise ValueError(f"out_sums must be a contiguous fp64 CPU (2, {members}) tensor, "
                         f"got {out_sums.dtype} {tuple(out_sums.shape)} on {out_sums.device}")
    device = grads[0].device if n else torch.device("cpu")
    native = (backend in ("auto", "torch") and device.type == "cpu" and NATIVE.get() is not None
              and all(t.dtype == torch.float32 and t.is_contiguous() for t in (*accs, *grads, *preconds)
                      if t is not None))
    if native:
        # Called per micro-batch over every tensor: only the checks the native pass needs
        # (same shapes, the member axis); dtype and layout were checked just above.
        table = (ctypes.c_int64 * (6 * n))()
        for i, (a, g, w) in enumerate(zip(accs, grads, preconds)):
            if (a is not None and a.shape != g.shape) or (w is not None and w.shape != g.shape) \
                    or (members > 1 and (g.dim() == 0 or g.shape[0] != members)):
                _check(g if a is None else a, g, w, members)  # raises the full one-line error
            table[6 * i : 6 * i + 6] = [g.data_ptr(), 0 if a is None else a.data_ptr(),
                                        0 if w is None else w.data_ptr(), g.numel(), members, int(measured[i])]
        sums = torch.zeros(2, members, dtype=torch.float64) if out_sums is None else out_sums
        NATIVE.get().trajinv_accumulate_list(table, n, members, sums.data_ptr(), torch.get_num_threads())
        return (sums[0], sums[1]) if out_sums is not None else (sums[0].float(), sums[1].float())
    for a, g, w in zip(accs, grads, preconds):
        _check(g if a is None else a, g, w, members)
    s_w = torch.zeros(members, dtype=torch.float32, device=device)
    s_1 = torch.zeros(members, dtype=torch.float32, device=device)
    for a, g, w, meas in zip(accs, grads, preconds, measured):
        if a is None:
            sw, s1 = _norms_only(g, w, members)
        else:
            sw, s1 = accumulate_grad_with_norms(a, g, w, members=members, backend=backend)
        if meas:
            s_w += sw
            s_1 += s1
    if out_sums is None:
        return s_w, s_1
    out_sums[0] += s_w.cpu()
    out_sums[1] += s_1.cpu()
    return out_sums[0], out_sums[1]


# ---------------------------------------------------------------- flat multi-tensor variant

FLAT_BLOCK = 1024


@triton.jit
def _accumulate_flat_kernel(
    acc_ptr,  # flat accumulator, updated in place
    g_ptr,  # flat micro-batch gradient
    w_ptr,  # flat positive preconditioner (unused when HAS_W is False)
    blocks_ptr,  # (B, 4) int64 block table: base, lo, hi, segment
    sw_ptr,  # (B,) fp32 partial sum W g^2 (written)
    s1_ptr,  # (B,) fp32 partial sum g^2 (written)
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    # The table only holds BLOCK-aligned bases: telling the compiler enables 128-bit accesses.
    base = tl.multiple_of(tl.load(blocks_ptr + 4 * b), BLOCK)
    lo = tl.load(blocks_ptr + 4 * b + 1)
    hi = tl.load(blocks_ptr + 4 * b + 2)
    offs = base + tl.arange(0, BLOCK)
    if (lo == base) & (hi == base + BLOCK):
        # Interior block on the BLOCK-aligned grid: unmasked, so 128-bit accesses.
        g = tl.load(g_ptr + offs).to(tl.float32)
        acc = tl.load(acc_ptr + offs)
        tl.store(acc_ptr + offs, (acc.to(tl.float32) + g).to(acc.dtype))
        g2 = g * g
        tl.store(s1_ptr + b, tl.sum(g2, axis=0))
        if HAS_W:
            tl.store(sw_ptr + b, tl.sum(tl.load(w_ptr + offs).to(tl.float32) * g2, axis=0))
    else:
        mask = (offs >= lo) & (offs < hi)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
        tl.store(acc_ptr + offs, (acc.to(tl.float32) + g).to(acc.dtype), mask=mask)
        g2 = g * g
        tl.store(s1_ptr + b, tl.sum(g2, axis=0))
        if HAS_W:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(sw_ptr + b, tl.sum(w * g2, axis=0))


def build_flat_blocks(segments: Sequence[tuple[int, int]], n: int, block: int = FLAT_BLOCK) -> torch.Tensor:
    """Block table (B, 4) int64 of (base, lo, hi, segment) for `accumulate_flat_with_norms`.

    Blocks sit on a global `block`-aligned grid: each covers [base, base + block)
    masked to the part [lo, hi) of one range, so interior blocks are full.
    Gaps between segments (alignment padding) get blocks too, with segment id
    len(segments): they are accumulated but land in a dropped bin.
    Build it once per layout and pass it back in (`blocks=`) to skip the host work.
    """
    _check_segments(n, segments)
    ranges, prev = [], 0
    for i, (lo, hi) in enumerate(segments):
        ranges += [(prev, lo, len(segments)), (lo, hi, i)]
        prev = hi
    ranges.append((prev, n, len(segments)))
    rows = []
    for lo, hi, seg in ranges:
        if hi == lo:
            continue
        for base in range(lo - lo % block, hi, block):
            rows.append((base, max(lo, base), min(hi, base + block), seg))
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)


def _equal_runs(segments: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(first index, count, length) of maximal runs of adjacent, touching, equal-length segments."""
    runs: list[tuple[int, int, int]] = []
    for i, (lo, hi) in enumerate(segments):
        if runs:
            j, k, m = runs[-1]
            if hi - lo == m and segments[i - 1][1] == lo:
                runs[-1] = (j, k + 1, m)
                continue
        runs.append((i, 1, hi - lo))
    return runs


def _check_segments(n: int, segments: Sequence[tuple[int, int]]) -> None:
    prev = 0
    for i, (lo, hi) in enumerate(segments):
        if lo < prev or hi < lo or hi > n:
            raise ValueError(f"segment {i} = ({lo}, {hi}) must be sorted, non-overlapping and within [0, {n}]")
        prev = hi


def accumulate_flat_with_norms(
    acc: torch.Tensor,
    grad: torch.Tensor,
    precond: torch.Tensor | None,
    segments: Sequence[tuple[int, int]],
    backend: str = "auto",
    blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat-buffer accumulate: acc += grad over the whole buffer, one launch on CUDA.

    Args:
        acc, grad, precond: 1-D flat buffers of the same length (precond may be None).
        segments: sorted, non-overlapping [lo, hi) ranges, one per (tensor, member).
            Elements outside every segment (alignment padding) are still added
            (they are zeros in a flat gradient buffer) but counted in no sum.
        backend: "auto", "triton" or "torch".
        blocks: a cached `build_flat_blocks(segments)` table (Triton path), optional.

    Returns:
        (s_w, s_1), fp32 of shape (len(segments),): per-segment sums of W grad^2 and grad^2.
    """
    for name, v in (("acc", acc), ("grad", grad), ("precond", precond)):
        if v is not None and v.dim() != 1:
            raise ValueError(f"{name} must be a flat 1-D buffer, got shape {tuple(v.shape)}")
    _check(acc, grad, precond, 1)
    _check_segments(acc.numel(), segments)
    if backend == "auto":
        backend = "triton" if acc.is_cuda else "torch"
    n_seg = len(segments)
    if backend == "torch":
        acc.add_(grad)
        # Per-segment BLAS dot products over contiguous views: no g^2 buffer, and
        # far faster on CPU than torch.segment_reduce (measured ~10x).
        # Runs of adjacent equal-length segments (a member-axis tensor) are
        # reduced together as a (k, m) view: one batched dot per tensor, not
        # per member. W g is formed per run into one small reused buffer: a
        # whole-buffer temporary would cost a fresh, page-faulting allocation.
        g = grad.float()
        w = None if precond is None else precond.float()
        s_1 = torch.zeros(n_seg, dtype=torch.float32, device=acc.device)
        s_w = torch.zeros(n_seg, dtype=torch.float32, device=acc.device)
        # Long segments: a BLAS dot each beats vecdot's (k, m) temporaries.
        runs = []
        for i, k, m in _equal_runs(segments):
            runs += [(i, k, m)] if m < 2**16 else [(i + j, 1, m) for j in range(k)]
        longest = max((k * m for _, k, m in runs), default=0)
        buf = torch.empty(longest if w is not None else 0, dtype=torch.float32, device=acc.device)
        for i, k, m in runs:
            lo = segments[i][0]
            if m == 0:
                continue
            gw = None if w is None else torch.mul(g[lo : lo + k * m], w[lo : lo + k * m], out=buf[: k * m])
            if k == 1:
                torch.dot(g[lo : lo + m], g[lo : lo + m], out=s_1[i])
                if gw is not None:
                    torch.dot(gw, g[lo : lo + m], out=s_w[i])
                continue
            gv = g[lo : lo + k * m].view(k, m)
            torch.linalg.vecdot(gv, gv, out=s_1[i : i + k])
            if gw is not None:
                torch.linalg.vecdot(gw.view(k, m), gv, out=s_w[i : i + k])
        return (s_1.clone() if precond is None else s_w), s_1
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if blocks is None:
        blocks = build_flat_blocks(segments, acc.numel())
    blocks = blocks.to(acc.device)
    n_blocks = blocks.shape[0]
    s_w = torch.zeros(n_seg + 1, dtype=torch.float32, device=acc.device)  # last bin: gaps, dropped
    s_1 = torch.zeros(n_seg + 1, dtype=torch.float32, device=acc.device)
    if n_blocks == 0:
        return s_w[:n_seg], s_1[:n_seg]
    p_w = torch.empty(n_blocks, dtype=torch.float32, device=acc.device)
    p_1 = torch.empty_like(p_w)
    g = grad.contiguous()
    w = None if precond is None else precond.contiguous()
    _accumulate_flat_kernel[(n_blocks,)](
        acc, g, w if w is not None else g, blocks, p_w, p_1, HAS_W=w is not None, BLOCK=FLAT_BLOCK,
        num_warps=4,
    )  # fmt: skip
    seg = blocks[:, 3]
    s_1 = s_1.index_add_(0, seg, p_1)[:n_seg]
    if w is None:
        return s_1.clone(), s_1
    return s_w.index_add_(0, seg, p_w)[:n_seg], s_1
