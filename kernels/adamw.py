"""AdamW over many tensors in one pass, with per-member hyperparameters and free statistics.

Two paths, one maths (the torch reference `adamw_reference` is their twin):

- **Triton** (`fused_adamw_launch`): one launch per (device, dtype) bucket,
  however many tensors it holds; described below.
- **CPU** (`native_adamw_step`, ``csrc/adamw.cpp``): fp32 tensors, one OpenMP
  pass that follows a pointer per tensor (params and grads stay separate
  tensors, the states are flat buffers), so one call covers a bucket with no
  gather. Same 28 B/param; `TRAJINV_NATIVE_ADAMW=0` switches it off and its
  callers (the optimizer) fall back to torch ops. Its maths are those of
  ``torch._fused_adamw_`` in fp32 (bias corrections and step size in double,
  then cast), and it agrees with ``torch.optim.AdamW`` to fp32 rounding of the
  hyperparameters too: betas, lr and eps are held in fp32, so at beta2 = 0.9999
  (1 - beta2 off by 2e-4 relative) ``exp_avg_sq`` differs from torch's by ~2e-4
  relative while the update, whose bias correction uses the same rounded beta2,
  agrees to ~5e-7. The Triton kernel computes its bias corrections in fp64 too.

The Triton kernel. The interpreter cannot follow pointers stored in memory,
so instead of a pointer table the bucket lives in *flat* buffers
(parameters, gradients, exp_avg, exp_avg_sq, optional fp32 master copy) and a
host-built int32 *block table* says what each program does::

    blocks[b] = (base, lo, hi, tensor, nblk, slot, member, segment)

Program ``b`` covers the lanes ``[base, base + BLOCK)`` of the flat buffers,
masked to ``[lo, hi)``: the part of one (tensor, member) *segment* that falls
in this BLOCK-aligned cell. Blocks sit on a global BLOCK grid, so interior
blocks are full and 16-element aligned and take an unmasked path that
compiles to 128-bit loads and stores; only segment edges are masked.
A member segment whose length is not a multiple of 16 starts unaligned, so
its blocks take the masked (scalar) path: correct, slower (model widths are
multiples of 16 in practice). ``slot`` indexes the hyperparameter table (one row per group and member:
lr, wd_eff, beta1, beta2, eps), ``member`` the per-member grad scale.

Memory traffic per parameter for fp32 (the minimum, 28 B): read p, g, m, v;
write p, m, v. The statistics (per segment sums of g^2, g^2/P, p^2, update^2,
P = sqrt(v_hat) + eps from the state *before* this step) are reduced in
registers and written as four floats per block: 16 B per BLOCK elements, i.e.
0.016 B/param at BLOCK=1024 (plus its 32 B table row), and no second pass.
16-bit params: read p, g (2 + 2), m, v (8), write p (2), m, v (8): 22 B; with
an fp32 master copy: read g (2), master, m, v (12), write master, m, v (12)
and p (2): 28 B.

Step counters without a host sync or a second launch: ``counters[t]`` holds
``step * nblk_t + (blocks of t already done this step)``. Each block of
tensor t does ``old = atomic_add(counters[t], inc)`` and reads its step as
``old // nblk_t`` - the same for every block of the step, in any order.
All blocks of a tensor hit one address: one L2 atomic per 1024 elements,
small next to the 28 KB each block moves. ``inc`` is 0 when ``found_inf > 0``
(the step is skipped: no state changes, the counter does not advance), so AMP
skipping needs no host sync.

Weight decay: both paths apply ``p *= 1 - lr * wd_eff``; the host folds the
decay convention into ``wd_eff`` (`trajinv.optim.hyper`).

Stochastic rounding (bf16 params without master weights): add 16 random bits
below the bf16 mantissa of the fp32 result, then truncate. Random bits come
from ``tl.randint(seed + step * 40503, flat offset)``: reproducible,
different every step, no per-step argument (so no recompilation).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from trajinv.kernels.backend import on_device
from trajinv.kernels.native import NativeLibrary

BLOCK = 1024
ALIGN = 16  # elements; flat buffers place every tensor at a multiple of this
# Block table columns: base, lo, hi, tensor, nblk, slot, member, segment.
N_COLS = 8
COL_BASE, COL_LO, COL_HI, COL_TENSOR, COL_NBLK, COL_SLOT, COL_MEMBER, COL_SEGMENT = range(N_COLS)
# Hyperparameter table columns (one row per slot): lr, wd_eff, beta1, beta2, eps.
N_HYPER = 5
H_LR, H_WD, H_BETA1, H_BETA2, H_EPS = range(N_HYPER)
N_STATS = 4  # grad_sq, precond_grad_sq, param_sq, update_sq
# The same layout as Triton constants (a jitted function reads only constexpr globals).
_N_COLS, _N_HYPER, _N_STATS = tl.constexpr(N_COLS), tl.constexpr(N_HYPER), tl.constexpr(N_STATS)
_COL_BASE, _COL_LO, _COL_HI = tl.constexpr(COL_BASE), tl.constexpr(COL_LO), tl.constexpr(COL_HI)
_COL_TENSOR, _COL_NBLK = tl.constexpr(COL_TENSOR), tl.constexpr(COL_NBLK)
_COL_SLOT, _COL_MEMBER = tl.constexpr(COL_SLOT), tl.constexpr(COL_MEMBER)
_H_LR, _H_WD, _H_BETA1 = tl.constexpr(H_LR), tl.constexpr(H_WD), tl.constexpr(H_BETA1)
_H_BETA2, _H_EPS = tl.constexpr(H_BETA2), tl.constexpr(H_EPS)

# Number of kernel launches issued by `fused_adamw_launch` and of native calls by
# `native_adamw_step` (tests count them; bench_adamw reports them as ops per step).
LAUNCHES = 0
NATIVE_CALLS = 0


@triton.jit
def _adamw_body(
    p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, offs, mask,
    inv_gs, lr, decay, beta1, beta2, eps, step_size, inv_sqrt_bc2, inv_sqrt_bc2_prev, p_one,
    seed,
    MASKED: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr,
):
    if MASKED:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        if MASTER:
            p = tl.load(w_ptr + offs, mask=mask, other=0.0)
        else:
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr + offs).to(tl.float32)
        m = tl.load(m_ptr + offs)
        v = tl.load(v_ptr + offs)
        if MASTER:
            p = tl.load(w_ptr + offs)
        else:
            p = tl.load(p_ptr + offs).to(tl.float32)
    g = g * inv_gs
    gg = g * g
    # sqrt_rn and div_rn, correctly rounded as torch's and the interpreter's: a plain sqrt and '/' compile to
    # approximate, flush-to-zero instructions, which with eps = 0 turned a denormal v into a 0 denominator
    # (inf where torch is finite). The kernel is bound by memory; the exact forms cost nothing measurable.
    # P from the state before this update; p_one = 1 on the first step (no state yet).
    p_prev = tl.sqrt_rn(v) * inv_sqrt_bc2_prev + eps
    p_prev = p_prev * (1.0 - p_one) + p_one
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * gg
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    p_new = p * decay - step_size * tl.div_rn(m, denom)
    upd = p_new - p
    if MASKED:
        zero = tl.zeros_like(p_new)
        s_p = tl.sum(tl.where(mask, p_new * p_new, zero), axis=0)
        s_u = tl.sum(tl.where(mask, upd * upd, zero), axis=0)
        # a lane past the segment has g = v = 0, so with eps = 0 its gg / p_prev is 0/0
        s_w = tl.sum(tl.where(mask, tl.div_rn(gg, p_prev), zero), axis=0)
    else:
        s_p = tl.sum(p_new * p_new, axis=0)
        s_u = tl.sum(upd * upd, axis=0)
        s_w = tl.sum(tl.div_rn(gg, p_prev), axis=0)
    s_g = tl.sum(gg, axis=0)
    if SR:
        bits = p_new.to(tl.uint32, bitcast=True)
        r = tl.randint(seed, offs) & 0xFFFF
        bits = (bits + r) & 0xFFFF0000
        out = bits.to(tl.float32, bitcast=True).to(p_ptr.dtype.element_ty)
    elif p_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand: the interpreter's fp32->bf16 cast truncates,
        # the GPU's rounds; after this the cast is exact on both.
        bits = p_new.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        rne = tl.where(p_new == p_new, bits.to(tl.float32, bitcast=True), p_new)
        out = rne.to(tl.bfloat16)
    else:
        out = p_new.to(p_ptr.dtype.element_ty)
    if MASKED:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(p_ptr + offs, out, mask=mask)
        if MASTER:
            tl.store(w_ptr + offs, p_new, mask=mask)
    else:
        tl.store(m_ptr + offs, m)
        tl.store(v_ptr + offs, v)
        tl.store(p_ptr + offs, out)
        if MASTER:
            tl.store(w_ptr + offs, p_new)
    return s_g, s_w, s_p, s_u


@triton.jit
def _adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, w_ptr,
    blocks_ptr, hyper_ptr, counters_ptr, gs_ptr, inf_ptr, stats_ptr,
    seed,
    BLOCK: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr,
    HAS_GS: tl.constexpr, GS_PER_MEMBER: tl.constexpr, HAS_INF: tl.constexpr,
):
    pid = tl.program_id(0)
    row = blocks_ptr + pid * _N_COLS
    base = tl.multiple_of(tl.load(row + _COL_BASE), 16)
    lo = tl.load(row + _COL_LO)
    hi = tl.load(row + _COL_HI)
    tensor = tl.load(row + _COL_TENSOR)
    nblk = tl.load(row + _COL_NBLK)
    slot = tl.load(row + _COL_SLOT)
    member = tl.load(row + _COL_MEMBER)

    inc = tl.full((), 1, tl.int32)
    if HAS_INF:
        inc = tl.where(tl.load(inf_ptr) > 0, 0, 1)
    # Every block of the tensor sees the same `old // nblk` whatever the order.
    old = tl.atomic_add(counters_ptr + tensor, inc.to(tl.int64))
    step_prev = (old // nblk).to(tl.float32)
    step = step_prev + inc.to(tl.float32)

    hrow = hyper_ptr + slot * _N_HYPER
    lr = tl.load(hrow + _H_LR)
    wd = tl.load(hrow + _H_WD)
    beta1 = tl.load(hrow + _H_BETA1)
    beta2 = tl.load(hrow + _H_BETA2)
    eps = tl.load(hrow + _H_EPS)
    inv_gs = tl.full((), 1.0, tl.float32)
    if HAS_GS:
        if GS_PER_MEMBER:
            inv_gs = tl.div_rn(1.0, tl.load(gs_ptr + member))
        else:
            inv_gs = tl.div_rn(1.0, tl.load(gs_ptr))

    # A skipped step divides by bc1 = 0 when step is 0: keep it finite, nothing is stored.
    # 1 - beta^t in fp64 (three scalars per program): in fp32 it cancels for beta near 1 (beta2 = 0.9999
    # moved the update 2e-5 away from torch's AdamW after 3 steps; the CPU paths compute it in fp64)
    step_c = tl.maximum(step, 1.0).to(tl.float64)
    log2_b1 = tl.log2(beta1.to(tl.float64))
    log2_b2 = tl.log2(beta2.to(tl.float64))
    bc1 = (1.0 - tl.exp2(step_c * log2_b1)).to(tl.float32)
    bc2 = (1.0 - tl.exp2(step_c * log2_b2)).to(tl.float32)
    bc2_prev = (1.0 - tl.exp2(tl.maximum(step_prev, 1.0).to(tl.float64) * log2_b2)).to(tl.float32)
    p_one = tl.where(step_prev > 0, 0.0, 1.0)
    step_size = tl.div_rn(lr, bc1)  # correctly rounded, as every divide and root here (_adamw_body)
    inv_sqrt_bc2 = tl.div_rn(1.0, tl.sqrt_rn(bc2))
    inv_sqrt_bc2_prev = tl.div_rn(1.0, tl.sqrt_rn(bc2_prev))
    decay = 1.0 - lr * wd
    rseed = seed + step.to(tl.int32) * 40503

    offs = base + tl.arange(0, BLOCK)
    hi = tl.where(inc > 0, hi, lo)  # a skipped step touches nothing
    full = (lo == base) & (hi == base + BLOCK)
    if full:
        s_g, s_w, s_p, s_u = _adamw_body(
            p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, offs, offs < hi,
            inv_gs, lr, decay, beta1, beta2, eps, step_size, inv_sqrt_bc2, inv_sqrt_bc2_prev, p_one,
            rseed, False, MASTER, SR)
    else:
        mask = (offs >= lo) & (offs < hi)
        s_g, s_w, s_p, s_u = _adamw_body(
            p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, offs, mask,
            inv_gs, lr, decay, beta1, beta2, eps, step_size, inv_sqrt_bc2, inv_sqrt_bc2_prev, p_one,
            rseed, True, MASTER, SR)
    srow = stats_ptr + pid * _N_STATS
    tl.store(srow + 0, s_g)
    tl.store(srow + 1, s_w)
    tl.store(srow + 2, s_p)
    tl.store(srow + 3, s_u)


FLAT_LIMIT = 2**31
"""Elements a block table may span: it holds int32 offsets (the last block included). The optimizer
starts another bucket before it (`trajinv.optim.buckets`)."""


@dataclass(frozen=True)
class Segment:
    """One (tensor, member) range ``[lo, hi)`` of a flat buffer."""

    lo: int
    hi: int
    tensor: int
    slot: int
    member: int


def build_block_table(segments: list[Segment], block: int = BLOCK) -> torch.Tensor:
    """int32 (num_blocks, 8) table; every segment gets >= 1 block (so zero-size tensors still count a step)."""
    if block % ALIGN:
        raise ValueError(f"block must be a multiple of {ALIGN}, got {block}")
    rows: list[list[int]] = []
    per_tensor: dict[int, int] = {}
    for s_id, s in enumerate(segments):
        if s.lo < 0 or s.hi < s.lo:
            raise ValueError(f"segment must have 0 <= lo <= hi, got {s}")
        first = (s.lo // block) * block
        last = max(first + block, -(-s.hi // block) * block)
        for base in range(first, last, block):
            lo, hi = max(s.lo, base), min(s.hi, base + block)
            if hi <= lo and base != first:
                continue
            rows.append([base, lo, max(hi, lo), s.tensor, 0, s.slot, s.member, s_id])
            per_tensor[s.tensor] = per_tensor.get(s.tensor, 0) + 1
    if rows and max(r[COL_HI] for r in rows) + block >= FLAT_LIMIT:
        raise ValueError(f"flat buffer exceeds {FLAT_LIMIT} elements; split the bucket")
    for r in rows:
        r[COL_NBLK] = per_tensor[r[COL_TENSOR]]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, N_COLS)


def blocks_per_tensor(blocks: torch.Tensor, num_tensors: int) -> torch.Tensor:
    """int64 (num_tensors,): how many blocks each tensor has (the counter's unit); 1 for absent tensors."""
    n = torch.ones(num_tensors, dtype=torch.int64)
    if blocks.numel():
        t = blocks[:, COL_TENSOR].long()
        n[t] = blocks[:, COL_NBLK].long()
    return n


def fused_adamw_launch(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    master: torch.Tensor | None,
    blocks: torch.Tensor,
    hyper: torch.Tensor,
    counters: torch.Tensor,
    stats: torch.Tensor,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    seed: int = 0,
    stochastic_rounding: bool = False,
    block: int = BLOCK,
) -> None:
    """One launch: update flat p (and master, m, v) in place, write per-block stats.

    p, g: flat, param dtype; m, v, master: flat fp32; blocks from `build_block_table`;
    hyper: fp32 (slots, 5); counters: int64 (tensors,) in units of blocks (see module doc);
    stats: fp32 (num_blocks, 4), fully overwritten; grad_scale: () or (K,) fp32.
    """
    global LAUNCHES
    nb = blocks.shape[0]
    if nb == 0:
        return
    if stochastic_rounding and (master is not None or p.dtype != torch.bfloat16):
        raise ValueError(f"stochastic rounding needs bf16 params without master weights, got {p.dtype}")
    for name, t in (("m", m), ("v", v), ("hyper", hyper), ("stats", stats)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    gs_per_member = grad_scale is not None and grad_scale.dim() == 1
    dummy = m
    with on_device(p):
        _adamw_kernel[(nb,)](
            p, g, m, v, master if master is not None else dummy,
            blocks, hyper, counters,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            stats, seed,
            BLOCK=block, MASTER=master is not None, SR=stochastic_rounding,
            HAS_GS=grad_scale is not None, GS_PER_MEMBER=gs_per_member, HAS_INF=found_inf is not None,
            num_warps=4,
        )
    LAUNCHES += 1


def reduce_block_stats(stats: torch.Tensor, blocks: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Per-block partial sums (num_blocks, 4) -> per-segment sums (num_segments, 4)."""
    out = torch.zeros(num_segments, N_STATS, dtype=torch.float32, device=stats.device)
    if blocks.numel():
        out.index_add_(0, blocks[:, COL_SEGMENT].to(device=stats.device, dtype=torch.long), stats)
    return out


def adamw_reference(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    master: torch.Tensor | None,
    segments: list[Segment],
    hyper: torch.Tensor,
    steps: torch.Tensor,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch twin of the kernel on the same flat buffers (in place), fp64 maths.

    `steps` (tensors,) holds plain step counts and is advanced in place once per
    tensor. Returns the per-segment statistics (num_segments, 4) in fp64:
    sum g^2, sum g^2/P (P = sqrt(v_hat_prev) + eps, P = 1 on a tensor's first
    step), sum p_new^2, sum (p_new - p_old)^2, with g = grad / grad_scale.
    Rounds the param to its dtype to nearest (no stochastic rounding here).
    """
    stats = torch.zeros(len(segments), N_STATS, dtype=torch.float64)
    if found_inf is not None and float(found_inf) > 0:
        return stats
    done: set[int] = set()
    for i, s in enumerate(segments):
        lr, wd, b1, b2, eps = (float(x) for x in hyper[s.slot])
        if s.tensor not in done:
            steps[s.tensor] += 1
            done.add(s.tensor)
        step = float(steps[s.tensor])
        sl = slice(s.lo, s.hi)
        gs = 1.0
        if grad_scale is not None:
            gs = float(grad_scale.reshape(-1)[s.member if grad_scale.dim() == 1 else 0])
        gg = g[sl].double() / gs
        pp = (master[sl] if master is not None else p[sl]).double()
        mm, vv = m[sl].double(), v[sl].double()
        if step > 1:
            prev = (vv / (1 - b2 ** (step - 1))).sqrt() + eps
        else:
            prev = torch.ones_like(vv)
        mm = mm + (1 - b1) * (gg - mm)
        vv = b2 * vv + (1 - b2) * gg * gg
        denom = (vv / (1 - b2**step)).sqrt() + eps
        pn = pp * (1 - lr * wd) - lr / (1 - b1**step) * mm / denom
        stats[i] = torch.stack([(gg * gg).sum(), (gg * gg / prev).sum(), (pn * pn).sum(), ((pn - pp) ** 2).sum()])
        m[sl], v[sl] = mm.float(), vv.float()
        if master is not None:
            master[sl] = pn.float()
        p[sl] = pn.to(p.dtype)
    return stats


def hyper_row(lr: float, wd: float, beta1: float, beta2: float, eps: float) -> list[float]:
    """One hyperparameter table row; checks the values the kernel takes logs of."""
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {b}")
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be finite and >= 0, got {lr}")
    return [lr, wd, beta1, beta2, eps]


# ---------------------------------------------------------------- the CPU path

NATIVE_BLOCK = 16384  # elements per work item: 448 KB of traffic, far above the per-block overhead
NATIVE_CHUNK = 256  # fp32 partial sums over at most this many elements (per simd lane: CHUNK / width)
PAR_MIN = 1 << 16  # below this many elements a parallel region costs more than it saves
# Segment table of the CPU path: tensor, pointer row, member, flat offset, length, hyper slot, stats row.
SEG_COLS = 7

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
NATIVE = NativeLibrary("trajinv_adamw", "adamw.cpp",
                       {"trajinv_adamw_step": ([_P, _P, _I64, _P, _P, _P, _P, _P, _INT, _P, _P, _INT], _INT)},
                       switch="TRAJINV_NATIVE_ADAMW", what="native CPU AdamW",
                       defines={"BLOCK": NATIVE_BLOCK, "CHUNK": NATIVE_CHUNK, "PAR_MIN": PAR_MIN})


def native_adamw_step(
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
    """One AdamW step over the segments of `segs` on CPU, in place; statistics into `stats` if given.

    ptrs: (rows, 2) int64 addresses of each tensor's fp32 param and grad (contiguous,
    alive for the call). segs: (n, SEG_COLS) int64 rows [tensor, ptrs row, member, offset
    in exp_avg/exp_avg_sq, length, hyper slot, stats row]; member j of a tensor starts at
    ``j * length`` elements from its param and grad. exp_avg/exp_avg_sq: flat fp32.
    hyper: (slots, N_HYPER) fp32. steps: (tensors,) fp32 step counts *after* this step's
    increment. grad_scale: () or (K,) fp32 (per member), grads are multiplied by its
    reciprocal. stats: (segments, N_STATS) fp32, rows written [sum g^2, sum g^2/P, sum
    p_new^2, sum (p_new - p_old)^2], other rows untouched. precond_out: flat fp32 like
    exp_avg_sq; the stepped segments receive the next step's preconditioner
    1/(sqrt(v_hat) + eps) from the updated state (the denominator this update divided by),
    the rest is untouched. Raises RuntimeError when the library is unavailable.
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
    if stats is not None and (stats.dtype != torch.float32 or not stats.is_contiguous()
                              or stats.shape[-1] != N_STATS):
        raise TypeError(f"stats must be a contiguous fp32 (segments, {N_STATS}) tensor, "
                        f"got {stats.dtype} {tuple(stats.shape)}")
    if precond_out is not None and (precond_out.dtype != torch.float32 or not precond_out.is_contiguous()
                                    or precond_out.shape != exp_avg_sq.shape):
        raise TypeError(f"precond_out must be contiguous fp32 shaped like exp_avg_sq {tuple(exp_avg_sq.shape)}, "
                        f"got {precond_out.dtype} {tuple(precond_out.shape)}")
    lib = NATIVE.get()
    if lib is None:
        raise RuntimeError("native CPU AdamW is unavailable (see the warning NATIVE.get() gave)")
    per_member = int(grad_scale is not None and grad_scale.numel() > 1)
    global NATIVE_CALLS
    NATIVE_CALLS += 1
    lib.trajinv_adamw_step(
        ptrs.data_ptr(), segs.data_ptr(), segs.shape[0], exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
        hyper.data_ptr(), steps.data_ptr(), None if grad_scale is None else grad_scale.data_ptr(), per_member,
        None if stats is None else stats.data_ptr(), None if precond_out is None else precond_out.data_ptr(),
        num_threads or torch.get_num_threads(),
    )
