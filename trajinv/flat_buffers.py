"""Flat per-(device, dtype) buffers behind `FusedAdamW`: layout, segments, block tables.

A *bucket* holds every parameter of one (device, dtype) in one flat layout:
tensor i occupies ``[offset_i, offset_i + numel_i)`` with offsets rounded up to
16 elements (so every tensor starts 64-byte aligned for fp32, and full kernel
blocks get 128-bit accesses). exp_avg / exp_avg_sq (and an fp32 master copy
for 16-bit params) share that layout. A member-axis tensor (leading dim K) is
cut into K *segments*, one per member, each with its own hyperparameter slot.

Why flat: the Triton interpreter cannot load pointers from memory, so one
launch over many tensors needs them in one allocation. On the Triton path the
parameters themselves are re-pointed into the flat buffer (``p.data = view``,
as apex and ZeRO do): zero copies. Gradients are views of a flat grad buffer
when they can be (after a ``zero_grad(set_to_none=False)``, autograd
accumulates in place into them); a gradient that is not (``.grad`` replaced,
or re-created after ``zero_grad()`` set it to None) is copied in: +2x grad
bytes for that tensor (read it, write the flat slot), counted by the bench.
That copy is the cheaper of the two for one backward per step: with grads set
to None autograd hands over its fresh buffer for free and the gather moves
8 B/param (fp32); keeping views means a memset (4 B) plus an in-place
accumulate (12 B instead of 0). Under gradient accumulation the views win.
On the CPU path nothing is re-pointed or gathered: torch's fused CPU AdamW
takes the tensors as they are; only the fp32 states are flat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trajinv.kernels.fused_adamw import ALIGN, BLOCK, Segment, blocks_per_tensor, build_block_table


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass
class Bucket:
    """Flat state of the parameters that share one (device, dtype)."""

    device: torch.device
    dtype: torch.dtype
    params: list[torch.nn.Parameter]
    members: list[int]  # K per tensor (1 when the group has no member axis)
    slots: list[int]  # first hyperparameter slot of each tensor
    use_triton: bool
    master_weights: bool
    offsets: list[int] = field(default_factory=list)
    seg_start: list[int] = field(default_factory=list)  # first segment index of each tensor
    segments: list[Segment] = field(default_factory=list)

    def __post_init__(self) -> None:
        off = 0
        for p in self.params:
            self.offsets.append(off)
            off = _round_up(off + p.numel(), ALIGN)
        self.total = off
        for t, (p, k, slot) in enumerate(zip(self.params, self.members, self.slots)):
            self.seg_start.append(len(self.segments))
            n = p.numel() // k
            for j in range(k):
                lo = self.offsets[t] + j * n
                self.segments.append(Segment(lo, lo + n, t, slot + (j if k > 1 else 0), j))
        z = dict(device=self.device, dtype=torch.float32)
        self.exp_avg = torch.zeros(self.total, **z)
        self.exp_avg_sq = torch.zeros(self.total, **z)
        self.master = torch.zeros(self.total, **z) if self.master_weights and self.dtype != torch.float32 else None
        # per-tensor step counts on the host, as torch.optim.AdamW keeps them; authoritative on
        # the CPU path, refreshed from the device counters on the Triton path
        self.steps = torch.zeros(len(self.params), dtype=torch.float32)
        self.precond_buf: torch.Tensor | None = None  # FusedAdamW.preconditioners() writes W here
        self.precond_views: list[torch.Tensor] = []  # and hands out these views of it
        self.precond_ready: set | None = None  # the (beta2, eps, step) keys precond_buf is valid for
        if self.use_triton:
            self.flat_param = torch.zeros(self.total, dtype=self.dtype, device=self.device)
            self.flat_grad = torch.zeros(self.total, dtype=self.dtype, device=self.device)
            self.all_blocks = build_block_table(self.segments, BLOCK)
            self.nblk = blocks_per_tensor(self.all_blocks, len(self.params))
            self.counters = torch.zeros(len(self.params), dtype=torch.int64, device=self.device)
            self._blocks_cache: dict[tuple[bool, ...], torch.Tensor] = {}
            self.nblk_dev = self.nblk.to(self.device)

    def view(self, flat: torch.Tensor, t: int) -> torch.Tensor:
        p = self.params[t]
        return flat[self.offsets[t] : self.offsets[t] + p.numel()].view(p.shape)

    def member_views(self, flat: torch.Tensor, t: int) -> list[torch.Tensor]:
        k = self.members[t]
        if k == 1:
            return [self.view(flat, t)]
        return list(self.view(flat, t).reshape(k, self.params[t].numel() // k).unbind(0))

    def blocks_for(self, active: tuple[bool, ...]) -> torch.Tensor:
        """Block table rows of the tensors stepped now, on the device (cached per active set)."""
        b = self._blocks_cache.get(active)
        if b is None:
            keep = torch.tensor(active, dtype=torch.bool)[self.all_blocks[:, 3].long()]
            b = self.all_blocks[keep].contiguous().to(self.device)
            self._blocks_cache[active] = b
        return b

    def param_in_place(self, t: int) -> bool:
        """Is the parameter still the view of the flat buffer that the kernel writes?"""
        p = self.params[t]
        want = self.flat_param.data_ptr() + self.offsets[t] * self.flat_param.element_size()
        return p.data_ptr() == want and p.is_contiguous() or p.numel() == 0

    def repoint(self, t: int) -> None:
        """Copy the parameter into its flat slot and make `p.data` that slot (apex/ZeRO style)."""
        p = self.params[t]
        v = self.view(self.flat_param, t)
        v.copy_(p.data)
        p.data = v

    def grad_in_place(self, t: int) -> bool:
        g = self.params[t].grad
        want = self.flat_grad.data_ptr() + self.offsets[t] * self.flat_grad.element_size()
        return g is not None and (g.numel() == 0 or (g.data_ptr() == want and g.is_contiguous()))
