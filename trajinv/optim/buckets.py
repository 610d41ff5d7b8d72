"""Flat per-(device, dtype) buffers behind `FusedAdamW`: layout, segments, cached plans.

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
On the CPU path nothing is re-pointed or gathered: the native kernel follows a
pointer per tensor and torch's fused CPU AdamW takes the tensors as they are;
only the fp32 states are flat.

Every per-step decision that depends only on which tensors have a gradient
(the *active set*) is made once and cached on the bucket as a plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from trajinv.kernels import adamw as adamw_kernel
from trajinv.kernels.adamw import ALIGN, BLOCK, COL_TENSOR, SEG_COLS, Segment, blocks_per_tensor, build_block_table
from trajinv.optim.hyper import group_members

Active = tuple[bool, ...]
"""Which tensors of a bucket have a gradient this step (the key of every cached plan)."""


def _round_up(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(eq=False)
class NativePlan:
    """Segment table of the native CPU kernel for one active set."""

    idx: list[int]  # the stepped tensors, in table order
    segs: list[int]  # their segments, in table order
    all: bool  # every tensor is stepped (steps advance in one op)
    table: torch.Tensor  # (segments, SEG_COLS) int64
    inc: torch.Tensor  # (tensors,) fp32: 1 where stepped


@dataclass(eq=False)
class TorchPlan:
    """The torch-ops CPU path for one active set: segments grouped by hyperparameter slot."""

    idx: list[int]
    per_slot: dict[int, list[tuple[int, int]]]  # slot -> (tensor, member) pairs
    order: list[tuple[int, int]]  # (tensor, member) in slot order: the layout of every list below
    segs: list[int]
    members: torch.Tensor  # member index of each entry of `order`
    m: list[torch.Tensor]  # exp_avg view per entry
    v: list[torch.Tensor]  # exp_avg_sq view per entry
    steps: list[torch.Tensor]  # step-count view per stepped tensor
    all: bool
    scratch_p: list[torch.Tensor] | None = None  # statistics: W g per entry (views of Bucket.scratch[0])
    scratch_old: list[torch.Tensor] | None = None  # statistics: params before the update (Bucket.scratch[1])
    coef_key: tuple | None = None  # (steps, hyper) the cached P coefficients were made for
    coef: tuple | None = None  # (coefficients, eps values, uniform?) of P = c sqrt(v) + eps per entry


EXPOSED_KEYS = ("step", "exp_avg", "exp_avg_sq", "master_param")
"""The keys of a param's optimizer state that are views of a bucket (`Bucket.exposed_state`)."""


@dataclass(eq=False)
class Bucket:
    """Flat state of the parameters that share one (device, dtype)."""

    device: torch.device
    dtype: torch.dtype
    params: list[torch.nn.Parameter]
    members: list[int]  # K per tensor (1 when the group has no member axis)
    slots: list[int]  # first hyperparameter slot of each tensor
    groups: list[int]  # param group of each tensor
    use_triton: bool
    master_weights: bool

    # Layout (derived in __post_init__)
    offsets: list[int] = field(init=False, default_factory=list)
    seg_start: list[int] = field(init=False, default_factory=list)  # first segment index of each tensor
    segments: list[Segment] = field(init=False, default_factory=list)
    total: int = field(init=False, default=0)

    # Optimizer state, flat fp32; per-tensor step counts on the host as torch.optim.AdamW keeps
    # them (authoritative on the CPU path, refreshed from the device counters on the Triton path)
    exp_avg: torch.Tensor = field(init=False)
    exp_avg_sq: torch.Tensor = field(init=False)
    master: torch.Tensor | None = field(init=False, default=None)
    steps: torch.Tensor = field(init=False)

    # The preconditioner W = 1/(sqrt(v_hat)+eps): FusedAdamW.preconditioners() writes it here and
    # hands out views; valid for the (beta2, eps, step) keys in precond_ready
    precond_buf: torch.Tensor | None = field(init=False, default=None)
    precond_views: list[torch.Tensor] = field(init=False, default_factory=list)
    precond_ready: set | None = field(init=False, default=None)

    # Triton path: flat params and grads, block table, step counters in units of blocks
    flat_param: torch.Tensor | None = field(init=False, default=None)
    flat_grad: torch.Tensor | None = field(init=False, default=None)
    all_blocks: torch.Tensor | None = field(init=False, default=None)
    nblk: torch.Tensor | None = field(init=False, default=None)
    nblk_dev: torch.Tensor | None = field(init=False, default=None)
    counters: torch.Tensor | None = field(init=False, default=None)
    launched: list[bool] = field(init=False, default_factory=list)  # has the tensor had a real launch
    blocks_cache: dict[Active, torch.Tensor] = field(init=False, default_factory=dict)

    # CPU paths: plans per active set, per-member views of the states, scratch
    native_plans: dict[Active, NativePlan] = field(init=False, default_factory=dict)
    torch_plans: dict[Active, TorchPlan] = field(init=False, default_factory=dict)
    m_views: list[list[torch.Tensor]] = field(init=False, default_factory=list)
    v_views: list[list[torch.Tensor]] = field(init=False, default_factory=list)
    w_views: list[list[torch.Tensor]] | None = field(init=False, default=None)
    step_views: list[torch.Tensor] = field(init=False, default_factory=list)
    scratch: torch.Tensor | None = field(init=False, default=None)  # (2, total): persistent, allocating costs more

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
        if self.master_weights and self.dtype != torch.float32:
            self.master = torch.zeros(self.total, **z)
        self.steps = torch.zeros(len(self.params), dtype=torch.float32)
        if self.use_triton:
            self.flat_param = torch.zeros(self.total, dtype=self.dtype, device=self.device)
            self.flat_grad = torch.zeros(self.total, dtype=self.dtype, device=self.device)
            self.all_blocks = build_block_table(self.segments, BLOCK)
            self.nblk = blocks_per_tensor(self.all_blocks, len(self.params))
            self.nblk_dev = self.nblk.to(self.device)
            self.counters = torch.zeros(len(self.params), dtype=torch.int64, device=self.device)
            self.launched = [False] * len(self.params)
        else:
            self.m_views = [self.member_views(self.exp_avg, t) for t in range(len(self.params))]
            self.v_views = [self.member_views(self.exp_avg_sq, t) for t in range(len(self.params))]
            self.step_views = list(self.steps.unbind(0))
            if self.master is not None:
                self.w_views = [self.member_views(self.master, t) for t in range(len(self.params))]

    # ------------------------------------------------------------------ views
    def view(self, flat: torch.Tensor, t: int) -> torch.Tensor:
        """Tensor t's slot of a flat buffer, in the parameter's shape."""
        p = self.params[t]
        return flat[self.offsets[t] : self.offsets[t] + p.numel()].view(p.shape)

    def member_views(self, flat: torch.Tensor, t: int) -> list[torch.Tensor]:
        """Tensor t's slot of a flat buffer, one flat view per member."""
        k = self.members[t]
        if k == 1:
            return [self.view(flat, t)]
        return list(self.view(flat, t).reshape(k, self.params[t].numel() // k).unbind(0))

    def exposed_state(self, t: int) -> dict[str, torch.Tensor]:
        """Tensor t's optimizer state as torch.optim.AdamW keeps it, as views of the flat buffers."""
        st = {"step": self.steps[t], "exp_avg": self.view(self.exp_avg, t), "exp_avg_sq": self.view(self.exp_avg_sq, t)}
        if self.master is not None:
            st["master_param"] = self.view(self.master, t)
        return st

    # ---------------------------------------------------------------- Triton
    def blocks_for(self, active: Active) -> torch.Tensor:
        """Block table rows of the tensors stepped now, on the device (cached per active set)."""
        b = self.blocks_cache.get(active)
        if b is None:
            keep = torch.tensor(active, dtype=torch.bool)[self.all_blocks[:, COL_TENSOR].long()]
            b = self.all_blocks[keep].contiguous().to(self.device)
            self.blocks_cache[active] = b
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

    def precond_buffer(self) -> torch.Tensor:
        """The reused flat W buffer (and per-tensor views of it), created on first use."""
        if self.precond_buf is None:
            self.precond_buf = torch.empty_like(self.exp_avg_sq)
            self.precond_views = [self.view(self.precond_buf, t) for t in range(len(self.params))]
        return self.precond_buf

    # -------------------------------------------------------------- CPU plans
    def native_plan(self, active: Active) -> NativePlan:
        """The native kernel's segment table for this active set (cached)."""
        plan = self.native_plans.get(active)
        if plan is None:
            idx = [t for t, a in enumerate(active) if a]
            rows, segs = [], []
            for r, t in enumerate(idx):
                for j in range(self.members[t]):
                    s = self.seg_start[t] + j
                    seg = self.segments[s]
                    rows.append([t, r, j, seg.lo, seg.hi - seg.lo, seg.slot, s])
                    segs.append(s)
            plan = NativePlan(idx=idx, segs=segs, all=all(active),
                              table=torch.tensor(rows, dtype=torch.int64).reshape(-1, SEG_COLS),
                              inc=torch.tensor(active, dtype=torch.float32))
            self.native_plans[active] = plan
        return plan

    def torch_plan(self, active: Active, statistics: bool) -> TorchPlan:
        """The torch-ops path's grouping for this active set (cached; with scratch when `statistics`)."""
        plan = self.torch_plans.get(active)
        if plan is None:
            per_slot: dict[int, list[tuple[int, int]]] = {}
            for t, a in enumerate(active):
                if a:
                    for j in range(self.members[t]):
                        per_slot.setdefault(self.segments[self.seg_start[t] + j].slot, []).append((t, j))
            idx = [t for t, a in enumerate(active) if a]
            order = [tj for tjs in per_slot.values() for tj in tjs]
            plan = TorchPlan(
                idx=idx, per_slot=per_slot, order=order, segs=[self.seg_start[t] + j for t, j in order],
                members=torch.tensor([j for _, j in order], dtype=torch.long),
                m=[self.m_views[t][j] for t, j in order], v=[self.v_views[t][j] for t, j in order],
                steps=[self.step_views[t] for t in idx], all=all(active),
            )
            self.torch_plans[active] = plan
        if statistics and plan.scratch_p is None:
            if self.scratch is None:
                self.scratch = torch.empty(2, self.total, dtype=torch.float32, device=self.device)
            s1 = [self.member_views(self.scratch[0], t) for t in range(len(self.params))]
            s2 = [self.member_views(self.scratch[1], t) for t in range(len(self.params))]
            plan.scratch_p = [s1[t][j] for t, j in plan.order]
            plan.scratch_old = [s2[t][j] for t, j in plan.order]
        return plan


def build_buckets(groups: list[dict], first_slot: list[int], state: dict, use_triton: Callable[[torch.device], bool],
                  master_weights: bool) -> list[Bucket]:
    """One bucket per (device, dtype) of the params in `groups`, in first-seen order (on the Triton path,
    more when they span the block table's `FLAT_LIMIT` elements or more: one launch each).

    Existing per-param `state` (loaded, or from earlier buckets) is copied into the
    flat buffers, and `state[p]` is replaced by views of them, as torch.optim.AdamW
    exposes it (``step``, ``exp_avg``, ``exp_avg_sq``, ``master_param``). On the Triton
    path params (and existing grads) are re-pointed into the flat buffers.
    """
    by_key: dict[tuple, list] = {}
    for gi, g in enumerate(groups):
        k = group_members(g)
        for p in g["params"]:
            by_key.setdefault((p.device, p.dtype), []).append((p, k, first_slot[gi], gi))
    chunks = [(device, dtype, chunk) for (device, dtype), items in by_key.items()
              for chunk in (_within_limit(items) if use_triton(device) else [items])]
    buckets = []
    for device, dtype, items in chunks:
        b = Bucket(device, dtype, *(list(col) for col in zip(*items)), use_triton=use_triton(device),
                   master_weights=master_weights)
        for t, p in enumerate(b.params):
            st = state.get(p, {})
            if "exp_avg" in st:
                b.view(b.exp_avg, t).copy_(st["exp_avg"])
                b.view(b.exp_avg_sq, t).copy_(st["exp_avg_sq"])
                b.steps[t] = float(st["step"])
            if b.master is not None:
                b.view(b.master, t).copy_(st.get("master_param", p.detach()))
            if b.use_triton:
                b.repoint(t)
                if p.grad is not None:
                    b.view(b.flat_grad, t).copy_(p.grad)
                    p.grad = b.view(b.flat_grad, t)
            # a caller's own keys (a Lookahead's slow weights) stay; ours are the buffers' views
            state[p] = {**{k: v for k, v in st.items() if k not in EXPOSED_KEYS}, **b.exposed_state(t)}
        if b.use_triton:
            b.counters.copy_(b.steps.to(b.counters.device).long() * b.nblk_dev)
            b.launched = [bool(s > 0) for s in b.steps.tolist()]
        buckets.append(b)
    return buckets


def _within_limit(items: list) -> list[list]:
    """`items` (param first) cut, in order, into runs whose aligned sizes plus one block stay below
    the block table's `FLAT_LIMIT` (a single param beyond it stays alone, and its block table refuses it)."""
    runs: list[list] = [[]]
    size = 0
    for item in items:
        n = _round_up(item[0].numel(), ALIGN)
        if runs[-1] and size + n + BLOCK >= adamw_kernel.FLAT_LIMIT:  # read at call time: tests lower it
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += n
    return runs
