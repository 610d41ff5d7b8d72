"""The AdamW step engines behind `FusedAdamW`: one function per path, state passed in.

Each engine updates one bucket (`trajinv.optim.buckets.Bucket`) in place for the
tensors of an active set and returns that step's statistics; the optimizer class
only holds state and groups and picks the engine:

- `triton_step`: the fused Triton kernel (`trajinv.kernels.adamw`), one launch;
  statistics come back as per-block partial sums, reduced only when read.
- `native_step`: fp32 on CPU, the native one-pass kernel; update, statistics and
  (on request) next step's preconditioner W in one pass.
- `torch_step`: everything else on CPU (16-bit params, master weights, stochastic
  rounding, a machine without a compiler): torch's fused CPU AdamW, one call per
  hyperparameter slot, plus foreach sums for the statistics (extra passes).

Statistics per (tensor, member) segment, fields in `N_STATS` order: sum g^2,
sum g^2/P (P = sqrt(v_hat)+eps before the update, 1 on a tensor's first step),
sum p_new^2, sum (p_new - p_old)^2, with g the gradient divided by grad_scale.
A skipped step (found_inf > 0) changes nothing and reports zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from trajinv.kernels import adamw as K
from trajinv.optim.buckets import Active, Bucket, TorchPlan


@dataclass(eq=False)
class StepStats:
    """One bucket's statistics of one step: per segment, or per Triton block until reduced."""

    bucket: Bucket
    table: torch.Tensor  # (segments, N_STATS), or (blocks, N_STATS) partial sums when `blocks` is set
    tensors: list[int]  # the tensors stepped
    blocks: torch.Tensor | None = None  # the launch's block table (Triton path)

    def reduced(self) -> StepStats:
        """Per-segment sums (one small segment sum on the Triton path, done once)."""
        if self.blocks is None:
            return self
        per_seg = K.reduce_block_stats(self.table, self.blocks, len(self.bucket.segments))
        return StepStats(self.bucket, per_seg, self.tensors)


def precond_from_state(v: torch.Tensor, beta2: float, eps: float, step: float, out: torch.Tensor) -> torch.Tensor:
    """out = 1 / (sqrt(v) / sqrt(1 - beta2^step) + eps), with the native step's arithmetic exactly.

    fp32 beta2 and eps (as its hyper table holds them), correctly rounded fp32 ops.
    numpy on CPU, because torch's CPU sqrt is not correctly rounded (about 1 in 6
    results differ in the last bit), and an emitted W must equal a recomputed one
    bitwise: a resumed run then measures exactly what the uninterrupted one did.
    """
    b2, eps32 = np.float32(beta2), np.float32(eps)
    bc2_sqrt = np.float32(math.sqrt(1 - float(b2) ** step))
    if not v.is_cpu:  # device buffers: the same formula with torch ops
        return torch.sqrt(v, out=out).div_(float(bc2_sqrt)).add_(float(eps32)).reciprocal_()
    w = out.numpy()
    np.sqrt(v.numpy(), out=w)
    np.divide(w, bc2_sqrt, out=w)
    np.add(w, eps32, out=w)
    np.divide(np.float32(1), w, out=w)
    return out


# ---------------------------------------------------------------------- Triton


def triton_step(b: Bucket, active: Active, hyper: torch.Tensor, grad_scale: torch.Tensor | None,
                found_inf: torch.Tensor | None, seed: int, stochastic_rounding: bool) -> StepStats:
    """One launch over the active tensors; grads not already in the flat buffer are copied in."""
    dst, src = [], []
    for t, p in enumerate(b.params):
        if not b.param_in_place(t):
            b.repoint(t)
        if active[t] and not b.grad_in_place(t):
            v = b.view(b.flat_grad, t)
            dst.append(v)
            src.append(p.grad)
            p.grad = v
    if dst:
        torch._foreach_copy_(dst, src)
    blocks = b.blocks_for(active)
    stats = torch.empty(blocks.shape[0], K.N_STATS, dtype=torch.float32, device=b.device)
    K.fused_adamw_launch(
        b.flat_param, b.flat_grad, b.exp_avg, b.exp_avg_sq, b.master, blocks, hyper, b.counters, stats,
        grad_scale=grad_scale, found_inf=found_inf, seed=seed,
        stochastic_rounding=stochastic_rounding and b.dtype == torch.bfloat16,
    )
    stepped = [t for t, a in enumerate(active) if a]
    for t in stepped:
        b.launched[t] = True
    return StepStats(b, stats, stepped, blocks)


# ------------------------------------------------------------------ native CPU


def native_step(b: Bucket, active: Active, hyper: torch.Tensor, grad_scale: torch.Tensor | None,
                found_inf: torch.Tensor | None, statistics: bool, precond_out: torch.Tensor | None = None
                ) -> StepStats | None | bool:
    """fp32 CPU: update and statistics in one pass. False when this bucket cannot take the native
    path this step (a strided param); otherwise the statistics (None when not asked for).
    `precond_out` (flat, like exp_avg_sq) receives W for the next step in the same pass."""
    plan = b.native_plan(active)
    ptrs, keep = [], []
    for t in plan.idx:
        p = b.params[t]
        g = p.grad
        if g.shape != p.shape or g.dtype != p.dtype:  # possible through .grad.data; the kernel reads p.numel()
            raise RuntimeError(f"grad of shape {tuple(g.shape)} ({g.dtype}) for a param of shape "
                               f"{tuple(p.shape)} ({p.dtype})")
        if not p.is_contiguous():
            return False  # a strided param (p.data swapped for a view): the torch path handles it
        if not g.is_contiguous():
            g = g.contiguous()
            keep.append(g)  # alive until the kernel returns
        ptrs += (p.data_ptr(), g.data_ptr())
    stats = torch.zeros(len(b.segments), K.N_STATS, dtype=torch.float32) if statistics else None
    if found_inf is not None and float(found_inf) > 0:  # skipped: zero statistics, as the kernel writes
        return StepStats(b, stats, plan.idx) if statistics else None
    if plan.all:
        b.steps += 1
    else:
        b.steps += plan.inc
    K.native_adamw_step(torch.tensor(ptrs, dtype=torch.int64), plan.table, b.exp_avg, b.exp_avg_sq, hyper,
                        b.steps, grad_scale, stats, precond_out=precond_out)
    return StepStats(b, stats, plan.idx) if statistics else None


# ------------------------------------------------------------------- torch ops


def torch_step(b: Bucket, active: Active, hyper: list[list[float]], grad_scale: torch.Tensor | None,
               found_inf: torch.Tensor | None, statistics: bool, stochastic_rounding: bool, seed: int
               ) -> StepStats | None:
    """CPU, any dtype: torch's fused CPU AdamW per hyperparameter slot; statistics by foreach sums."""
    plan = b.torch_plan(active, statistics)
    if found_inf is not None and float(found_inf) > 0:  # skipped: zero statistics, as the kernel writes
        return _per_segment(b, plan.segs, torch.zeros(len(plan.segs), K.N_STATS)) if statistics else None
    if plan.all:
        b.steps += 1
    else:
        torch._foreach_add_(plan.steps, 1.0)
    sixteen = b.dtype != torch.float32
    # fp32 work tensors, member-split: params (or master copy) and grads
    pw: dict[int, list[torch.Tensor]] = {}
    gw: dict[int, list[torch.Tensor]] = {}
    strided = []  # torch's fused CPU AdamW reads params and grads as contiguous: copy in and out
    for t in plan.idx:
        p, k = b.params[t], b.members[t]
        if b.w_views is not None:
            pw[t] = b.w_views[t]
        else:
            pd = p.detach().float() if sixteen else p.detach()
            if not pd.is_contiguous():
                pd = pd.contiguous()
                strided.append(t)
            pw[t] = [pd] if k == 1 else list(pd.reshape(k, p.numel() // k).unbind(0))
        g = p.grad.float() if sixteen else p.grad
        if grad_scale is not None and g is p.grad:  # torch's fused AdamW unscales its grads in place
            g = g.clone(memory_format=torch.contiguous_format)
        g = g.contiguous()
        gw[t] = [g] if k == 1 else list(g.reshape(k, p.numel() // k).unbind(0))
    P = [pw[t][j] for t, j in plan.order]
    G = [gw[t][j] for t, j in plan.order]
    if statistics:
        pre = _pre_stats(b, plan, G, hyper, grad_scale)
        torch._foreach_copy_(plan.scratch_old, P)
    start = 0
    for slot, tjs in plan.per_slot.items():
        lr, wd, b1, b2, eps = hyper[slot]
        sl = slice(start, start + len(tjs))
        start += len(tjs)
        gslot = None
        if grad_scale is not None:
            gslot = grad_scale[tjs[0][1]] if grad_scale.dim() == 1 else grad_scale
        torch._fused_adamw_(
            P[sl], G[sl], plan.m[sl], plan.v[sl], [], [b.step_views[t] for t, _ in tjs],
            lr=lr, beta1=b1, beta2=b2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
            grad_scale=gslot,
        )
    if not sixteen:
        for t in strided:
            p = b.params[t]
            p.data.copy_(pw[t][0] if b.members[t] == 1 else torch.stack(pw[t]).view(p.shape))
    else:
        for t in plan.idx:
            p, k = b.params[t], b.members[t]
            src = b.view(b.master, t) if b.master is not None else (
                pw[t][0] if k == 1 else torch.stack(pw[t]).view(p.shape))
            if stochastic_rounding and b.dtype == torch.bfloat16:
                p.data.copy_(stochastic_round_bf16(src, seed + 40503 * int(b.steps[t]) + t))
            else:
                p.data.copy_(src)
    if not statistics:
        return None
    psq = torch.stack(torch._foreach_norm(P)).square()
    torch._foreach_sub_(plan.scratch_old, P)
    usq = torch.stack(torch._foreach_norm(plan.scratch_old)).square()
    return _per_segment(b, plan.segs, torch.stack([pre[0], pre[1], psq, usq], 1))


def _pre_stats(b: Bucket, plan: TorchPlan, G: list[torch.Tensor], hyper: list[list[float]],
               grad_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """sum g^2 and sum g^2/P per segment before the update (foreach and flat ops, no allocation)."""
    gsq = torch.stack(torch._foreach_norm(G)).square()
    # P = c * sqrt(v) + eps, c = 1/sqrt(1 - beta2^(step-1)); P = 1 on a tensor's first step
    steps = b.steps.tolist()
    key = tuple(steps[t] for t in plan.idx), tuple(map(tuple, hyper))
    if plan.coef_key != key:  # one tuple compare per step; the loop runs on changes only
        coef, epss = [], []
        for s in plan.segs:
            seg = b.segments[s]
            b2, eps = hyper[seg.slot][K.H_BETA2], hyper[seg.slot][K.H_EPS]
            prev = steps[seg.tensor] - 1
            coef.append(1.0 / math.sqrt(1 - b2**prev) if prev > 0 else 0.0)
            epss.append(eps if prev > 0 else 1.0)
        uniform = len(set(coef)) == 1 and len(set(epss)) == 1 and len(plan.segs) > 0
        plan.coef_key, plan.coef = key, (coef, epss, uniform)
    coef, epss, uniform = plan.coef
    S = b.scratch[0]
    P = plan.scratch_p
    torch.sqrt(b.exp_avg_sq, out=S)
    if uniform:  # the usual case: one flat pass instead of per-tensor scalar lists
        S.mul_(coef[0]).add_(epss[0])
    else:
        torch._foreach_mul_(P, coef)
        torch._foreach_add_(P, epss)
    S.rsqrt_()
    torch._foreach_mul_(P, G)
    w = torch.stack(torch._foreach_norm(P)).square()
    if grad_scale is not None:
        scale = grad_scale[plan.members] if grad_scale.dim() == 1 else grad_scale
        gsq, w = gsq / scale**2, w / scale**2
    return gsq, w


def _per_segment(b: Bucket, segs: list[int], rows: torch.Tensor) -> StepStats:
    """Rows for `segs` placed into a full (segments, N_STATS) table of the bucket."""
    full = torch.zeros(len(b.segments), K.N_STATS, dtype=torch.float32, device=rows.device)
    full[segs] = rows.float()
    return StepStats(b, full, sorted({b.segments[s].tensor for s in segs}))


def stochastic_round_bf16(x: torch.Tensor, seed: int) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    bits = x.float().contiguous().view(torch.int32)
    r = torch.randint(0, 1 << 16, bits.shape, generator=gen, device=x.device, dtype=torch.int32)
    return ((bits + r) & -65536).view(torch.float32).to(torch.bfloat16)
