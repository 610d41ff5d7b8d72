"""Gradient accumulation fused with per-member (preconditioned) squared norms.

Under gradient accumulation each micro-batch gradient g is added into an
accumulator. The micro-batch gradient-noise estimator (docs/design.md, "The gradient noise scale")
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

Public API: `accumulate_grads_with_norms` for a list of tensors (what the GNS
meter calls after each micro-batch: on CPU one native pass over every tensor,
driven by a table of pointers, since at small sizes a call per tensor costs
more than the arithmetic; on CUDA the Triton kernel per tensor), the per-tensor
`accumulate_grad_with_norms` and its reference
`accumulate_grad_with_norms_reference`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from trajinv.kernels.backend import FLOAT_DTYPES, on_device, resolve_backend
from trajinv.kernels.native import NativeLibrary

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
    # blocks on axis 0 (up to 2**31 - 1 programs), members on axis 1 (CUDA caps it at 65535): one
    # member's tensor may hold more than 65535 blocks (a 128k x 4096 embedding: 256k blocks)
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: a member's slice may pass 2^31 elements
    k = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    base = k.to(tl.int64) * M
    g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    acc = tl.load(acc_ptr + base + offs, mask=mask, other=0.0)
    tl.store(acc_ptr + base + offs, (acc.to(tl.float32) + g).to(acc.dtype), mask=mask)
    g2 = g * g
    part = k * tl.num_programs(0) + pid
    tl.store(s1_ptr + part, tl.sum(g2, axis=0))
    if HAS_W:
        w = tl.load(w_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(sw_ptr + part, tl.sum(w * g2, axis=0))


def _check(acc: torch.Tensor | None, grad: torch.Tensor, precond: torch.Tensor | None, members: int) -> None:
    """`acc` None: a norms-only entry (nothing is written, so nothing need be contiguous)."""
    if not isinstance(members, int) or members < 1:
        raise ValueError(f"members must be a positive int, got {members!r}")
    shape = tuple(grad.shape)
    if acc is not None and tuple(acc.shape) != shape:
        raise ValueError(f"grad shape {shape} differs from acc shape {tuple(acc.shape)}")
    if precond is not None and tuple(precond.shape) != shape:
        raise ValueError(f"precond shape {tuple(precond.shape)} differs from grad shape {shape}")
    for name, v in (("acc", acc), ("grad", grad), ("precond", precond)):
        if v is not None and v.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be fp32/fp16/bf16, got {v.dtype}")
    if members > 1 and (grad.dim() == 0 or grad.shape[0] != members):
        raise ValueError(f"members={members} but the leading dim of shape {shape} is not that")
    if acc is not None and not acc.is_contiguous():
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


def _cpu_path(acc, grad, precond, members):
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
    grid = (triton.cdiv(m, block), members)
    s_w = torch.empty(members, grid[0], dtype=torch.float32, device=acc.device)
    s_1 = torch.empty_like(s_w)
    g = grad.contiguous()
    w = None if precond is None else precond.contiguous()
    with on_device(acc):
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
        backend: "auto" (Triton on CUDA, torch ops otherwise), "triton" or "cpu".

    Returns:
        (s_w, s_1), each fp32 of shape (members,): sum W grad^2 and sum grad^2
        per member, computed from `grad` as given (no rescaling).
    """
    _check(acc, grad, precond, members)
    if resolve_backend(backend, acc.device) == "cpu":
        return _cpu_path(acc, grad, precond, members)
    return _triton_path(acc, grad, precond, members)


# ---------------------------------------------------------------- list of tensors

# CPU: one native pass over every tensor of the list (csrc/accumulate.cpp).
_LIST_BLOCK = 4096  # elements per work item
NATIVE = NativeLibrary("trajinv_accumulate_list", "accumulate.cpp",
                       {"trajinv_accumulate_list": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                                     ctypes.c_void_p, ctypes.c_int], ctypes.c_int)},
                       switch="TRAJINV_NATIVE_GNS", what="native CPU gradient accumulation",
                       defines={"BLOCK": _LIST_BLOCK})
ROW_COLS = 6  # table row per tensor: grad, acc (0: norms only), W (0: identity) pointers; numel; members; measured


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
        backend: "auto" (CPU: native when built, else torch ops; CUDA: Triton), "triton" or "cpu".
        out_sums: a contiguous (2, members) fp64 buffer to add (s_w, s_1) into (the trainer's running
            sums over micro-batches); returned as its rows. On the gradients' device it costs no wait
            for that device (the sums stay there), on the CPU one per call.

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
    device = grads[0].device if n else torch.device("cpu")
    if out_sums is not None and (out_sums.shape != (2, members) or out_sums.dtype != torch.float64
                                 or not out_sums.is_contiguous()
                                 or out_sums.device not in (device, torch.device("cpu"))):
        raise ValueError(f"out_sums must be a contiguous fp64 (2, {members}) tensor on the CPU or {device}, "
                         f"got {out_sums.dtype} {tuple(out_sums.shape)} on {out_sums.device}")
    native = (resolve_backend(backend, device) == "cpu" and device.type == "cpu" and NATIVE.get() is not None
              and all(t.dtype == torch.float32 and t.is_contiguous() for t in (*accs, *grads, *preconds)
                      if t is not None))
    if native:
        # Called per micro-batch over every tensor: only the checks the native pass needs
        # (same shapes, the member axis); dtype and layout were checked just above.
        table = (ctypes.c_int64 * (ROW_COLS * n))()
        for i, (a, g, w) in enumerate(zip(accs, grads, preconds)):
            if (a is not None and a.shape != g.shape) or (w is not None and w.shape != g.shape) \
                    or (members > 1 and (g.dim() == 0 or g.shape[0] != members)):
                _check(a, g, w, members)  # raises the full one-line error
            table[ROW_COLS * i : ROW_COLS * (i + 1)] = [g.data_ptr(), 0 if a is None else a.data_ptr(),
                                        0 if w is None else w.data_ptr(), g.numel(), members, int(measured[i])]
        sums = torch.zeros(2, members, dtype=torch.float64) if out_sums is None else out_sums
        NATIVE.get().trajinv_accumulate_list(table, n, members, sums.data_ptr(), torch.get_num_threads())
        return (sums[0], sums[1]) if out_sums is not None else (sums[0].float(), sums[1].float())
    for a, g, w in zip(accs, grads, preconds):
        _check(a, g, w, members)
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
    out_sums[0] += s_w.to(out_sums.device)  # fp32 into fp64: exact, wherever the sums live
    out_sums[1] += s_1.to(out_sums.device)
    return out_sums[0], out_sums[1]
