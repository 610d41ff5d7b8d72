"""FusedAdamW: AdamW in one kernel launch per (device, dtype), with per-member lr/wd and statistics.

Drop-in for ``torch.optim.AdamW`` (same maths, same state_dict keys and shapes:
``step``, ``exp_avg``, ``exp_avg_sq``; state dicts load both ways) plus:

* per-member hyperparameters: a group whose ``lr`` and/or ``weight_decay`` is a
  sequence or 1-D tensor of length K treats the leading dim of each of its
  params as a member axis (see DESIGN.md, "Population axis");
* ``decay_mode="torch"`` (``p *= 1 - lr*wd``, ELR = lr*wd) or ``"independent"``
  (``p *= 1 - wd * lr/lr_0``: wd follows the lr schedule's multiplier, with
  ``lr_0 = group["initial_lr"]``, set at construction as torch's schedulers do);
* statistics of every step, per parameter and member, read by
  :meth:`FusedAdamW.statistics`: sums of g^2, g^2/P, p^2 and update^2, where g
  is the unscaled gradient, P = sqrt(v_hat) + eps from the state *before* the
  step (P = 1 on a tensor's first step: there is no state yet), p the updated
  parameter and update = p_new - p_old (decay included, before 16-bit rounding);
* 16-bit params with fp32 states, an fp32 master copy (``master_weights``) or
  bf16 stochastic rounding (``stochastic_rounding``);
* AMP: ``step(grad_scale=, found_inf=)`` (or the ``grad_scale``/``found_inf``
  attributes GradScaler sets); grad_scale may be (K,) for member groups.

Backends: ``"auto"`` runs the Triton kernel on CUDA tensors and the CPU path
on CPU; ``"triton"`` forces the kernel (on CPU only under
``TRITON_INTERPRET=1``, which the tests use); ``"torch"`` forces the CPU path.
The CPU path runs fp32 buckets through a native one-pass kernel
(:mod:`trajinv.cpu_adamw`: update and statistics in one OpenMP pass, compiled
on first use); 16-bit buckets, or any bucket when that kernel cannot be built
(a one-time warning), use torch's fused CPU AdamW (``torch._fused_adamw_``, one
call per hyperparameter slot) plus foreach sums.

Statistics cost: on the Triton path and the native CPU path they ride in the
update's registers (bench/bench_adamw.py, 16M fp32 params, 1-2 threads of a
shared machine: 0.6-1.02x torch's fused AdamW step with statistics, 0.6-0.97x
without). On the torch-ops CPU path they take
extra passes over memory (about 5x the update's own time): set
``opt.track_statistics = False`` there for steps whose statistics nobody reads.

On the Triton path the step counts live on the device; ``opt.state[p]["step"]``
is refreshed from them by ``state_dict()`` (refreshing it every step would cost
a launch and a sync), so read steps through ``state_dict()`` there.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from trajinv import cpu_adamw
from trajinv.flat_buffers import Bucket
from trajinv.kernels import fused_adamw as K

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "master_param")


def _precond_host(v: torch.Tensor, b2: float, eps: float, step: float, out: torch.Tensor) -> torch.Tensor:
    """out = 1 / (sqrt(v) / sqrt(1 - b2^step) + eps) for fp32 CPU v, with the native step's
    arithmetic exactly: fp32 beta2 and eps (as its hyper table holds them), correctly rounded
    fp32 ops. numpy, because torch's CPU sqrt is not correctly rounded (about 1 in 6 results
    differ in the last bit), and an emitted W must equal a recomputed one bitwise: a resumed
    run then measures exactly what the uninterrupted one did."""
    b2, eps = np.float32(b2), np.float32(eps)
    bc2_sqrt = np.float32(math.sqrt(1 - float(b2) ** step))
    if not v.is_cpu:  # device buffers: the same formula with torch ops
        return torch.sqrt(v, out=out).div_(float(bc2_sqrt)).add_(float(eps)).reciprocal_()
    w = out.numpy()
    np.sqrt(v.numpy(), out=w)
    np.divide(w, bc2_sqrt, out=w)
    np.add(w, eps, out=w)
    np.divide(np.float32(1), w, out=w)
    return out


class AdamWStats(NamedTuple):
    """Per-step sums for one parameter: shape (K,) for member groups, () otherwise, fp32."""

    grad_sq: torch.Tensor
    precond_grad_sq: torch.Tensor
    param_sq: torch.Tensor
    update_sq: torch.Tensor


def _is_vector(x: Any) -> bool:
    return isinstance(x, (list, tuple)) or (isinstance(x, torch.Tensor) and x.dim() == 1)


def _group_members(group: dict) -> int:
    """K of a member group (lr or weight_decay given per member), else 1."""
    ks = {len(group[k]) for k in ("lr", "weight_decay") if _is_vector(group[k])}
    if len(ks) > 1:
        raise ValueError(f"per-member lr and weight_decay differ in length: {sorted(ks)}")
    return ks.pop() if ks else 1


def _as_floats(x: Any, k: int) -> list[float]:
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    return [float(v) for v in x] if isinstance(x, (list, tuple)) else [float(x)] * k


class FusedAdamW(torch.optim.Optimizer):
    """AdamW with one fused update per (device, dtype) and free per-member statistics (module doc)."""

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float | Sequence[float] | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | Sequence[float] | torch.Tensor = 1e-2,
        decay_mode: str = "torch",
        backend: str = "auto",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        *,
        track_statistics: bool = True,
        seed: int = 0,
        amsgrad: bool = False,
        maximize: bool = False,
    ) -> None:
        if amsgrad:
            raise ValueError("FusedAdamW does not support amsgrad=True")
        if maximize:
            raise ValueError("FusedAdamW does not support maximize=True")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            raise ValueError("backend='triton' needs CUDA or TRITON_INTERPRET=1")
        if master_weights and stochastic_rounding:
            raise ValueError("choose master_weights or stochastic_rounding, not both")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decay_mode=decay_mode,
            # torch.optim.AdamW's keys, so state dicts load into it unchanged
            amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
        )
        self.backend = backend
        self.master_weights = master_weights
        self.stochastic_rounding = stochastic_rounding
        self.track_statistics = track_statistics
        # CPU native path: the step also writes next step's W = 1/(sqrt(v_hat)+eps) into a flat
        # buffer (4 bytes per element in the same pass), so preconditioners() need not recompute it.
        self.emit_preconditioner = False
        self._native_cpu = True  # fp32 CPU steps through trajinv.cpu_adamw when it builds (False: torch ops)
        self.seed = int(seed)
        self._buckets: list[Bucket] | None = None
        self._hyper_cache: dict[torch.device, tuple[list, torch.Tensor]] = {}
        self._pending: list[tuple[Bucket, torch.Tensor, torch.Tensor, list[int]]] = []
        self._tables: list[tuple[Bucket, torch.Tensor, list[int]]] = []  # per-segment statistics, reduced
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        lr = group["lr"]
        # a copy: the trainer may change lr in place, the schedule's base must not move
        lr0 = lr.clone() if isinstance(lr, torch.Tensor) else list(lr) if isinstance(lr, (list, tuple)) else lr
        group.setdefault("initial_lr", lr0)
        self._buckets = None

    def _check_group(self, group: dict) -> None:
        if group["decay_mode"] not in ("torch", "independent"):
            raise ValueError(f"decay_mode must be 'torch' or 'independent', got {group['decay_mode']!r}")
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("FusedAdamW does not support amsgrad or maximize")
        b1, b2 = (float(b) for b in group["betas"])
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {group['betas']}")
        k = _group_members(group)
        for p in group["params"]:
            if p.is_sparse:
                raise ValueError(f"FusedAdamW does not support sparse params (shape {tuple(p.shape)})")
            if p.is_complex():
                raise ValueError(f"FusedAdamW does not support complex params (dtype {p.dtype})")
            if p.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"param dtype must be float32, bfloat16 or float16, got {p.dtype}")
            if k > 1 and (p.dim() == 0 or p.shape[0] != k):
                raise ValueError(f"param of shape {tuple(p.shape)} lacks the member axis of size {k}")
            if self.stochastic_rounding and p.dtype == torch.float16:
                raise ValueError("stochastic_rounding supports bfloat16 params, got float16")

    def _use_triton(self, device: torch.device) -> bool:
        if self.backend == "torch" and device.type != "cpu":
            raise ValueError(f"backend='torch' is the CPU path; params on {device} need 'auto' or 'triton'")
        return self.backend == "triton" or (self.backend == "auto" and device.type != "cpu")

    # ---------------------------------------------------------------- buckets
    def _layout_key(self) -> list:
        key = []
        for g in self.param_groups:
            key.append(_group_members(g))
            key.extend((id(p), p.dtype, p.device) for p in g["params"])
        return key

    def _build(self) -> None:
        """(Re)build the flat buckets, carrying over any existing state (loaded or previous)."""
        old = self._buckets or []
        for b in old:
            self._sync_steps(b)
        by_key: dict[tuple, list] = {}
        slot = 0
        self._slot_of: list[tuple[int, int, int]] = []  # (group, first slot, K)
        for gi, g in enumerate(self.param_groups):
            k = _group_members(g)
            self._slot_of.append((gi, slot, k))
            for p in g["params"]:
                by_key.setdefault((p.device, p.dtype), []).append((p, k, slot, gi))
            slot += k
        self._num_slots = slot
        buckets = []
        for (device, dtype), items in by_key.items():
            b = Bucket(device, dtype, [i[0] for i in items], [i[1] for i in items], [i[2] for i in items],
                       self._use_triton(device), self.master_weights)
            b.groups = [i[3] for i in items]
            for t, p in enumerate(b.params):
                st = self.state.get(p, {})
                if "exp_avg" in st:
                    b.view(b.exp_avg, t).copy_(st["exp_avg"])
                    b.view(b.exp_avg_sq, t).copy_(st["exp_avg_sq"])
                    b.steps[t] = float(st["step"])
                if b.master is not None:
                    src = st.get("master_param", p.detach())
                    b.view(b.master, t).copy_(src)
                if b.use_triton:
                    b.repoint(t)
                    if p.grad is not None:
                        b.view(b.flat_grad, t).copy_(p.grad)
                        p.grad = b.view(b.flat_grad, t)
                self._expose_state(b, t)
            if b.use_triton:
                b.counters.copy_(b.steps.to(b.counters.device).long() * b.nblk_dev)
                b.launched = [bool(s > 0) for s in b.steps.tolist()]
            buckets.append(b)
        self._buckets = buckets
        self._where = {id(p): (b, t) for b in buckets for t, p in enumerate(b.params)}
        self._key = self._layout_key()

    def _expose_state(self, b: Bucket, t: int) -> None:
        st = {"step": b.steps[t], "exp_avg": b.view(b.exp_avg, t), "exp_avg_sq": b.view(b.exp_avg_sq, t)}
        if b.master is not None:
            st["master_param"] = b.view(b.master, t)
        self.state[b.params[t]] = st

    def _sync_steps(self, b: Bucket) -> None:
        """Triton path: the step counters live in `b.counters` (units of blocks); refresh `steps`."""
        if b.use_triton:
            b.steps.copy_((b.counters // b.nblk_dev).to("cpu", b.steps.dtype))

    def _ensure_buckets(self) -> list[Bucket]:
        if self._buckets is None or self._layout_key() != self._key:
            self._build()
        return self._buckets

    # ------------------------------------------------------------ hyperparams
    def _hyper_rows(self, device: torch.device) -> torch.Tensor:
        """(slots, 5) fp32 [lr, wd_eff, beta1, beta2, eps]; tensors stay on device (no host sync)."""
        rows: list[torch.Tensor | list[list[float]]] = []
        any_tensor = False
        for gi, _first, k in self._slot_of:
            g = self.param_groups[gi]
            if _group_members(g) != k:
                raise ValueError(f"group {gi}: member count changed from {k} to {_group_members(g)}")
            b1, b2 = (float(x) for x in g["betas"])
            eps = float(g["eps"])
            lr, wd, lr0 = g["lr"], g["weight_decay"], g.get("initial_lr", g["lr"])
            if any(isinstance(x, torch.Tensor) for x in (lr, wd, lr0)):
                any_tensor = True
                t = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device).reshape(-1).expand(k)
                lr_t, wd_t = t(lr), t(wd)
                if g["decay_mode"] == "independent":
                    wd_t = wd_t / t(lr0)
                rows.append(torch.stack([lr_t, wd_t] + [torch.full((k,), c, device=device) for c in (b1, b2, eps)], 1))
            else:
                lrs, wds = _as_floats(lr, k), _as_floats(wd, k)
                if g["decay_mode"] == "independent":
                    wds = [w / l0 if l0 else 0.0 for w, l0 in zip(wds, _as_floats(lr0, k))]
                rows.append([K.hyper_row(a, w, b1, b2, eps) for a, w in zip(lrs, wds)])
        if not any_tensor:
            flat = [r for rs in rows for r in rs]
            cached = self._hyper_cache.get(device)
            if cached is not None and cached[0] == flat:
                return cached[1]
            if device.type == "cpu":
                out = torch.tensor(flat, dtype=torch.float32).reshape(-1, K.N_HYPER)
            else:
                # pinned staging (torch's caching host allocator) so the copy is async: a copy
                # from pageable memory would synchronise the stream first
                out = torch.tensor(flat, dtype=torch.float32, pin_memory=True).reshape(-1, K.N_HYPER)
                out = out.to(device, non_blocking=True)
            self._hyper_cache[device] = (flat, out)
            return out
        parts = [r if isinstance(r, torch.Tensor) else torch.tensor(r, dtype=torch.float32, device=device).reshape(-1, K.N_HYPER) for r in rows]
        return torch.cat(parts)

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: torch.Tensor | float | None = None,
             found_inf: torch.Tensor | None = None):
        """One AdamW step over every param with a grad; grads are divided by `grad_scale`.

        `found_inf > 0` skips the step (no state change, step counters stay), like
        torch's fused AdamW; on the Triton path this is decided on the device.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        self._pending = []
        self._tables = []
        for b in self._ensure_buckets():
            b.precond_ready = None  # the state changes now; the native step may emit a fresh W
            active = [p.grad is not None for p in b.params]
            if not any(active):
                continue
            for p in b.params:
                if p.grad is not None and (p.grad.is_sparse or p.grad.dtype != p.dtype):
                    raise TypeError(f"grad of param {tuple(p.shape)} must be dense {p.dtype}, got {p.grad.dtype}")
            gs = self._grad_scale_for(b, grad_scale)
            inf = None if found_inf is None else found_inf.to(b.device, torch.float32).reshape(())
            if b.use_triton:
                self._step_triton(b, tuple(active), gs, inf)
            else:
                self._step_torch(b, active, gs, inf)
        return loss

    def _grad_scale_for(self, b: Bucket, grad_scale) -> torch.Tensor | None:
        if grad_scale is None:
            return None
        gs = torch.as_tensor(grad_scale, dtype=torch.float32).to(b.device)
        if gs.dim() == 1 and gs.numel() > 1:
            bad = [tuple(p.shape) for p, k in zip(b.params, b.members) if k != gs.numel()]
            if bad:
                raise ValueError(f"grad_scale of shape {tuple(gs.shape)} needs member groups of that size; params {bad[:3]} are not")
            return gs.contiguous()
        return gs.reshape(())

    def _step_triton(self, b: Bucket, active: tuple[bool, ...], gs, inf) -> None:
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
            b.flat_param, b.flat_grad, b.exp_avg, b.exp_avg_sq, b.master, blocks,
            self._hyper_rows(b.device), b.counters, stats, grad_scale=gs, found_inf=inf,
            seed=self.seed, stochastic_rounding=self.stochastic_rounding and b.dtype == torch.bfloat16,
        )
        stepped = [t for t, a in enumerate(active) if a]
        for t in stepped:
            b.launched[t] = True
        self._pending.append((b, stats, blocks, stepped))

    def _cpu_plan(self, b: Bucket, active: tuple[bool, ...]) -> dict:
        """Per active set: the segments of each hyperparameter slot, and cached state views."""
        plan = b.cpu_plans.get(active) if hasattr(b, "cpu_plans") else None
        if plan is None:
            if not hasattr(b, "cpu_plans"):
                b.cpu_plans = {}
                b.m_views = [b.member_views(b.exp_avg, t) for t in range(len(b.params))]
                b.v_views = [b.member_views(b.exp_avg_sq, t) for t in range(len(b.params))]
                b.step_views = list(b.steps.unbind(0))
                b.w_views = [b.member_views(b.master, t) for t in range(len(b.params))] if b.master is not None else None
            per_slot: dict[int, list[tuple[int, int]]] = {}
            for t, a in enumerate(active):
                if a:
                    for j in range(b.members[t]):
                        per_slot.setdefault(b.segments[b.seg_start[t] + j].slot, []).append((t, j))
            idx = [t for t, a in enumerate(active) if a]
            order = [tj for tjs in per_slot.values() for tj in tjs]
            plan = dict(
                idx=idx, per_slot=per_slot, order=order,
                segs=[b.seg_start[t] + j for t, j in order],
                members=torch.tensor([j for _, j in order], dtype=torch.long),
                m=[b.m_views[t][j] for t, j in order], v=[b.v_views[t][j] for t, j in order],
                steps=[b.step_views[t] for t in idx], all=all(active),
            )
            if self.track_statistics:
                # persistent scratch: fresh allocations each step cost more than the maths on CPU
                if not hasattr(b, "scratch"):
                    b.scratch = torch.empty(2, b.total, dtype=torch.float32, device=b.device)
                s1 = [b.member_views(b.scratch[0], t) for t in range(len(b.params))]
                s2 = [b.member_views(b.scratch[1], t) for t in range(len(b.params))]
                plan["s1"] = [s1[t][j] for t, j in order]
                plan["s2"] = [s2[t][j] for t, j in order]
            b.cpu_plans[active] = plan
        return plan

    def _native_plan(self, b: Bucket, active: tuple[bool, ...]) -> dict | None:
        """Segment table of the native CPU kernel for this active set (cached), or None if it cannot run."""
        if b.dtype != torch.float32 or not getattr(self, "_native_cpu", True) or cpu_adamw.lib() is None:
            return None
        plans = b.__dict__.setdefault("native_plans", {})
        plan = plans.get(active)
        if plan is None:
            idx = [t for t, a in enumerate(active) if a]
            rows, segs = [], []
            for r, t in enumerate(idx):
                for j in range(b.members[t]):
                    s = b.seg_start[t] + j
                    seg = b.segments[s]
                    rows.append([t, r, j, seg.lo, seg.hi - seg.lo, seg.slot, s])
                    segs.append(s)
            plan = dict(idx=idx, segs=segs, all=all(active),
                        table=torch.tensor(rows, dtype=torch.int64).reshape(-1, cpu_adamw.SEG_COLS),
                        inc=torch.tensor(active, dtype=torch.float32))
            plans[active] = plan
        return plan

    def _step_native(self, b: Bucket, active: tuple[bool, ...], gs, inf) -> bool:
        """CPU path, fp32: update and statistics in one pass (trajinv.cpu_adamw); False if it cannot run."""
        plan = self._native_plan(b, active)
        if plan is None:
            return False
        ptrs, keep = [], []
        for t in plan["idx"]:
            p = b.params[t]
            g = p.grad
            if not p.is_contiguous():
                return False  # a strided param (p.data swapped for a view): the torch path handles it
            if not g.is_contiguous():
                g = g.contiguous()
                keep.append(g)
            ptrs += (p.data_ptr(), g.data_ptr())
        track = self.track_statistics
        stats = torch.zeros(len(b.segments), K.N_STATS, dtype=torch.float32) if track else None
        if inf is not None and float(inf) > 0:  # skipped: zero statistics, as the kernel writes
            if track:
                self._pending.append((b, stats, None, plan["idx"]))
            return True
        if plan["all"]:
            b.steps += 1
        else:
            b.steps += plan["inc"]
        emit = self.emit_preconditioner and plan["all"]
        cpu_adamw.adamw_step(torch.tensor(ptrs, dtype=torch.int64), plan["table"], b.exp_avg, b.exp_avg_sq,
                             self._hyper_rows(b.device), b.steps, gs, stats,
                             precond_out=self._precond_buffer(b) if emit else None)
        if emit:
            b.precond_ready = self._precond_key(b)
        if track:
            self._pending.append((b, stats, None, plan["idx"]))
        return True

    def _step_torch(self, b: Bucket, active: list[bool], gs, inf) -> None:
        """CPU path: the native one-pass kernel for fp32, else torch's fused CPU AdamW per hyperparameter slot."""
        if self._step_native(b, tuple(active), gs, inf):
            return
        plan = self._cpu_plan(b, tuple(active))
        if inf is not None and float(inf) > 0:  # skipped: zero statistics, as the kernel writes
            self._store_stats(b, plan["segs"], torch.zeros(len(plan["segs"]), K.N_STATS))
            return
        hyper = self._hyper_rows(b.device).tolist()
        if plan["all"]:
            b.steps += 1
        else:
            torch._foreach_add_(plan["steps"], 1.0)
        sixteen = b.dtype != torch.float32
        # fp32 work tensors, member-split: params (or master copy) and grads
        pw: dict[int, list[torch.Tensor]] = {}
        gw: dict[int, list[torch.Tensor]] = {}
        strided = []  # torch's fused CPU AdamW reads params and grads as contiguous: copy in and out
        for t in plan["idx"]:
            p, k = b.params[t], b.members[t]
            if b.w_views is not None:
                pw[t] = b.w_views[t]
            else:
                pd = p.detach().float() if sixteen else p.detach()
                if not pd.is_contiguous():
                    pd = pd.contiguous()
                    strided.append(t)
                pw[t] = [pd] if k == 1 else list(pd.reshape(k, p.numel() // k).unbind(0))
            g = (p.grad.float() if sixteen else p.grad).contiguous()
            gw[t] = [g] if k == 1 else list(g.reshape(k, p.numel() // k).unbind(0))
        order = plan["order"]
        P = [pw[t][j] for t, j in order]
        G = [gw[t][j] for t, j in order]
        track = self.track_statistics
        if track:
            if "s1" not in plan:  # statistics switched on after the plan was made
                b.cpu_plans.clear()
                plan = self._cpu_plan(b, tuple(active))
            pre = self._cpu_pre_stats(b, plan, G, hyper, gs)
            p_old = plan["s2"]
            torch._foreach_copy_(p_old, P)
        start = 0
        for slot, tjs in plan["per_slot"].items():
            lr, wd, b1, b2, eps = hyper[slot]
            sl = slice(start, start + len(tjs))
            start += len(tjs)
            gslot = None
            if gs is not None:
                gslot = gs[tjs[0][1]] if gs.dim() == 1 else gs
            torch._fused_adamw_(
                P[sl], G[sl], plan["m"][sl], plan["v"][sl], [], [b.step_views[t] for t, _ in tjs],
                lr=lr, beta1=b1, beta2=b2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False,
                grad_scale=gslot,
            )
        if not sixteen:
            for t in strided:
                p = b.params[t]
                p.data.copy_(pw[t][0] if b.members[t] == 1 else torch.stack(pw[t]).view(p.shape))
        if sixteen:
            for t in plan["idx"]:
                p, k = b.params[t], b.members[t]
                src = b.view(b.master, t) if b.master is not None else (
                    pw[t][0] if k == 1 else torch.stack(pw[t]).view(p.shape))
                if self.stochastic_rounding and b.dtype == torch.bfloat16:
                    p.data.copy_(stochastic_round_bf16(src, self.seed + 40503 * int(b.steps[t]) + t))
                else:
                    p.data.copy_(src)
        if track:
            psq = torch.stack(torch._foreach_norm(P)).square()
            torch._foreach_sub_(p_old, P)
            usq = torch.stack(torch._foreach_norm(p_old)).square()
            self._store_stats(b, plan["segs"], torch.stack([pre[0], pre[1], psq, usq], 1))

    def _cpu_pre_stats(self, b, plan, G, hyper, gs) -> tuple[torch.Tensor, torch.Tensor]:
        """sum g^2 and sum g^2/P per segment before the update (foreach and flat ops, no allocation)."""
        gsq = torch.stack(torch._foreach_norm(G)).square()
        # P = c * sqrt(v) + eps, c = 1/sqrt(1 - beta2^(step-1)); P = 1 on a tensor's first step
        steps = b.steps.tolist()
        key = tuple(steps[t] for t in plan["idx"]), tuple(map(tuple, hyper))
        if plan.get("coef_key") != key:  # one tuple compare per step; the loop runs on changes only
            coef, epss = [], []
            for s in plan["segs"]:
                seg = b.segments[s]
                b2, eps = hyper[seg.slot][3], hyper[seg.slot][4]
                prev = steps[seg.tensor] - 1
                coef.append(1.0 / math.sqrt(1 - b2**prev) if prev > 0 else 0.0)
                epss.append(eps if prev > 0 else 1.0)
            uniform = len(set(coef)) == 1 and len(set(epss)) == 1 and len(plan["segs"]) > 0
            plan["coef_key"], plan["coef"] = key, (coef, epss, uniform)
        coef, epss, uniform = plan["coef"]
        S = b.scratch[0]
        P = plan["s1"]
        torch.sqrt(b.exp_avg_sq, out=S)
        if uniform:  # the usual case: one flat pass instead of per-tensor scalar lists
            S.mul_(coef[0]).add_(epss[0])
        else:
            torch._foreach_mul_(P, coef)
            torch._foreach_add_(P, epss)
        S.rsqrt_()
        torch._foreach_mul_(P, G)
        w = torch.stack(torch._foreach_norm(P)).square()
        if gs is not None:
            scale = gs[plan["members"]] if gs.dim() == 1 else gs
            gsq, w = gsq / scale**2, w / scale**2
        return gsq, w

    def _store_stats(self, b: Bucket, segs: list[int], rows: torch.Tensor) -> None:
        """Keep the per-segment rows; `statistics()` splits them per param when asked."""
        full = torch.zeros(len(b.segments), K.N_STATS, dtype=torch.float32, device=rows.device)
        full[segs] = rows.float()
        self._pending.append((b, full, None, sorted({b.segments[s].tensor for s in segs})))

    def _split_stats(self, b: Bucket, per_seg: torch.Tensor, tensors: list[int]) -> dict:
        out = {}
        cols = per_seg.t().contiguous()  # (4, segments): one row slice per field below
        for t in tensors:
            k, s0 = b.members[t], b.seg_start[t]
            if k > 1:
                out[b.params[t]] = AdamWStats(*cols[:, s0 : s0 + k].unbind(0))
            else:
                out[b.params[t]] = AdamWStats(*cols[:, s0].unbind(0))
        return out

    # -------------------------------------------------------------- read-outs
    def statistics(self) -> dict[torch.Tensor, AdamWStats]:
        """Statistics of the last `step()` for each param it updated (module doc for the definitions).

        Each field is fp32, shape (K,) for member groups and () otherwise. On the
        Triton path the per-block partial sums are reduced here (one small
        segment sum), so a step that nobody reads pays nothing for it.
        """
        self._reduce_pending()
        out: dict[torch.Tensor, AdamWStats] = {}
        for b, per_seg, tensors in self._tables:
            out.update(self._split_stats(b, per_seg, tensors))
        return out

    def statistics_tables(self) -> list[tuple[list[torch.Tensor], torch.Tensor, list[int]]]:
        """The last `step()`'s statistics before the per-param split, per bucket:
        (params stepped, table (segments, 4) fp32 with one row per (tensor, member)
        segment in bucket order, first row of each of those params). Fields in
        `AdamWStats` order; a member group's param owns K consecutive rows. For
        callers reducing over many params: a couple of ops instead of a few per param.
        """
        self._reduce_pending()
        return [([b.params[t] for t in tensors], per_seg, [b.seg_start[t] for t in tensors])
                for b, per_seg, tensors in self._tables]

    def _reduce_pending(self) -> None:
        """Reduce the Triton path's per-block partial sums (if any) to per-segment tables, once."""
        for b, stats, blocks, tensors in self._pending:
            per_seg = stats if blocks is None else K.reduce_block_stats(stats, blocks, len(b.segments))
            self._tables.append((b, per_seg, tensors))
        self._pending = []

    def preconditioner(self, p: torch.Tensor) -> torch.Tensor | None:
        """1/(sqrt(v_hat)+eps) from the current state (the next step's "before" P), or None before any step."""
        if self._buckets is None and any("exp_avg_sq" in st for st in self.state.values()):
            self._ensure_buckets()  # state loaded, no step since: lay it out now so W is the loaded one
        where = self._where.get(id(p)) if self._buckets is not None else None
        if where is None:
            return None
        b, t = where
        g = self.param_groups[b.groups[t]]
        b2, eps = float(g["betas"][1]), float(g["eps"])
        v = b.view(b.exp_avg_sq, t)
        if b.use_triton:
            # the step count stays on the device: no host sync. A tensor whose only
            # launches were skipped (found_inf) still has step 0 there: W = 1 then.
            if not b.launched[t]:
                return None
            step = (b.counters[t] // b.nblk_dev[t]).float()
            w = 1.0 / ((v / (1 - torch.pow(b2, step))).sqrt() + eps)
            return torch.where(step > 0, w, torch.ones_like(w))
        step = float(b.steps[t])
        if step <= 0:
            return None
        return _precond_host(v, b2, eps, step, torch.empty_like(v))

    def preconditioners(self) -> dict[torch.Tensor, torch.Tensor | None]:
        """`preconditioner(p)` for every parameter, as views of one flat W per bucket.

        On the CPU path a bucket whose tensors share (beta2, eps, step), the
        usual case, gets W from the last step when it emitted it
        (`emit_preconditioner`), else from four in-place passes over its flat
        exp_avg_sq into a reused buffer instead of four ops per tensor;
        otherwise per tensor. The views are valid until the next call or step.
        """
        if self._buckets is None and any("exp_avg_sq" in st for st in self.state.values()):
            self._ensure_buckets()
        out: dict[torch.Tensor, torch.Tensor | None] = {}
        for b in self._buckets or ():
            key = self._precond_key(b)
            if b.use_triton or len(key) != 1 or next(iter(key))[2] <= 0:
                out.update({p: self.preconditioner(p) for p in b.params})
                continue
            if b.precond_ready != key:
                _precond_host(b.exp_avg_sq, *next(iter(key)), self._precond_buffer(b))
                b.precond_ready = key
            out.update(zip(b.params, b.precond_views))
        return out

    def _precond_key(self, b: Bucket) -> set[tuple[float, float, float]]:
        """The (beta2, eps, step) of a bucket's tensors: W in its buffer is valid for exactly this."""
        return {(float(self.param_groups[gi]["betas"][1]), float(self.param_groups[gi]["eps"]), step)
                for gi, step in zip(b.groups, b.steps.tolist())}

    def _precond_buffer(self, b: Bucket) -> torch.Tensor:
        if b.precond_buf is None:
            b.precond_buf = torch.empty_like(b.exp_avg_sq)
            b.precond_views = [b.view(b.precond_buf, t) for t in range(len(b.params))]
        return b.precond_buf

    # ------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        for b in self._buckets or []:
            self._sync_steps(b)
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ours or torch.optim.AdamW's; states stay fp32 even for 16-bit params."""
        saved = {i: {k: v for k, v in s.items() if k in _STATE_KEYS} for i, s in state_dict["state"].items()}
        for b in self._buckets or []:
            self._sync_steps(b)
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for i, st in saved.items():
            p = params[i]
            for key, val in st.items():
                self.state[p][key] = val.to(device=p.device, dtype=torch.float32)
            self.state[p]["step"] = torch.as_tensor(float(self.state[p]["step"]), dtype=torch.float32)
        for g in self.param_groups:
            g.setdefault("decay_mode", "torch")
            g.setdefault("initial_lr", g["lr"])
            self._check_group(g)
        self._buckets = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch; with set_to_none=False the flat grad buffers are zeroed in one op and stay in place."""
        if set_to_none or self._buckets is None:
            return super().zero_grad(set_to_none)
        for b in self._buckets:
            for t, p in enumerate(b.params):
                if p.grad is not None and not (b.use_triton and b.grad_in_place(t)):
                    p.grad.zero_()
            if b.use_triton:
                b.flat_grad.zero_()


def stochastic_round_bf16(x: torch.Tensor, seed: int) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    bits = x.float().contiguous().view(torch.int32)
    r = torch.randint(0, 1 << 16, bits.shape, generator=gen, device=x.device, dtype=torch.int32)
    return ((bits + r) & -65536).view(torch.float32).to(torch.bfloat16)
