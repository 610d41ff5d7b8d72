"""FusedAdamW: AdamW in one kernel launch per (device, dtype) (one more per 2**31 elements on the Triton
path), with per-member lr/wd and statistics.

Drop-in for ``torch.optim.AdamW`` (same maths, same state_dict keys and shapes:
``step``, ``exp_avg``, ``exp_avg_sq``; state dicts load both ways) plus:

* per-member hyperparameters: a group whose ``lr`` and/or ``weight_decay`` is a
  sequence or 1-D tensor of length K treats the leading dim of each of its
  params as a member axis (docs/design.md, "The population axis"). torch's lr
  schedulers write one number into ``group["lr"]``, so they drive scalar groups
  only: schedule a member group by assigning its ``lr`` the K base values times
  the multiplier (a list or a tensor);
* ``decay_mode="torch"`` (``p *= 1 - lr*wd``, ELR = lr*wd) or ``"independent"``
  (``p *= 1 - wd * lr/lr_0``: wd follows the lr schedule's multiplier, with lr_0
  a torch scheduler's ``initial_lr``, else the group's lr when it joined: `hyper.base_lr`);
* statistics of a step, per parameter and member, read by :meth:`statistics`:
  sums of g^2, g^2/P, p^2 and update^2, where g is the unscaled gradient,
  P = sqrt(v_hat) + eps from the state *before* the step (P = 1 on a tensor's
  first step: there is no state yet), p the updated parameter and update =
  p_new - p_old (decay included, before 16-bit rounding);
* the preconditioner W = 1/P of the next step, :meth:`preconditioner` /
  :meth:`preconditioners`, which the fp32 CPU step can write in its own pass
  (``step(emit_preconditioner=True)``);
* 16-bit params with fp32 states, an fp32 master copy (``master_weights``) or
  bf16 stochastic rounding (``stochastic_rounding``);
* AMP: ``step(grad_scale=, found_inf=)`` (or the ``grad_scale``/``found_inf``
  attributes GradScaler sets); grad_scale may be (K,) for member groups.

The class holds groups and state; the maths are the engines of
:mod:`trajinv.optim.engines` over the flat buckets of :mod:`trajinv.optim.buckets`.
Backends (`trajinv.kernels.backend`): ``"auto"`` runs the Triton kernel on CUDA
tensors and the CPU path on CPU; ``"triton"`` forces the kernel (on CPU only
under ``TRITON_INTERPRET=1``); ``"cpu"`` (alias ``"torch"``) forces the CPU path,
which runs fp32 buckets through the native one-pass kernel and 16-bit buckets
(or anything, when that kernel cannot be built: a one-time warning, or with
``native_cpu=False``) through torch's fused CPU AdamW plus foreach sums.

Statistics cost: on the Triton and native paths they ride in the update's
registers (bench/bench_adamw.py); on the torch-ops path they take extra passes
(about 4x the update) and keep an fp32 scratch of 8 B/param between steps
(allocating it every step costs more): pass
``step(statistics=False)`` for steps whose statistics nobody reads.

On the Triton path the parameters become views of one flat buffer per
(device, dtype) (`trajinv.optim.buckets`, as apex and ZeRO do): a param's
storage is then the whole bucket, so ``torch.save`` of one submodule's
``state_dict()`` writes the bucket (save ``{k: v.clone() ...}`` for a part), and a
channels_last or transposed param becomes contiguous.

On the Triton path the step counts live on the device; ``opt.state[p]["step"]``
is refreshed from them by ``state_dict()`` (refreshing it every step would cost
a launch and a sync), so read steps through ``state_dict()`` there.

``opt.state[p]`` holds views of the flat buffers. Edit the moments in place, or
clear or replace entries (``opt.state.clear()`` to restart the moments,
``state[p]["step"] = ...``): as with torch, the next step starts from the state as it
then is (the buckets are rebuilt from it). On the Triton path set a step count by
replacing the entry: an in-place edit of ``step`` is overwritten from the device.
Keys of a caller's own in ``state[p]`` (a Lookahead wrapper's slow weights) stay, and
changing them rebuilds nothing. Every rebuild (after such an edit, ``add_param_group``,
``load_state_dict``, a param moved or re-typed) makes new buffers: a reference held to
an old state tensor stops following the steps (torch's keeps following after
``add_param_group``).
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Iterable, Sequence
from copy import deepcopy
from itertools import repeat
from typing import Any, NamedTuple

import torch

from trajinv.kernels import adamw as K
from trajinv.kernels.backend import normalize_backend, resolve_backend, triton_available
from trajinv.optim import engines
from trajinv.optim.buckets import EXPOSED_KEYS, Bucket, build_buckets
from trajinv.optim.hyper import BASE_LR, HyperTable, copy_lr, group_members, is_vector

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "master_param")
_ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")  # an AdamW state has all three (or none: a caller's keys only)
_PICKLED = ("backend", "master_weights", "stochastic_rounding", "native_cpu", "seed")  # beyond torch's three


def _cast_as_torch(param: torch.Tensor, value: Any, param_id: Any, groups: list[dict], key: Any) -> Any:
    """A state value as torch's `Optimizer.load_state_dict` casts it (tensors to the param's device, and
    floating ones to its dtype), through dicts and sequences."""
    if isinstance(value, torch.Tensor):
        return torch.optim.Optimizer._process_value_according_to_param_policy(param, value, param_id, groups, key)
    if isinstance(value, dict):
        return {k: _cast_as_torch(param, v, param_id, groups, k) for k, v in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return type(value)(_cast_as_torch(param, v, param_id, groups, None) for v in value)
    return value


_UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable")
_HOW_NOT_WHAT = ("capturable", "differentiable")  # how torch's step runs, not what its state means: a state
# saved with them loads (cleared); amsgrad's and maximize's states mean other maths and stay refused


def _refuse_unsupported(group: dict) -> None:
    """torch.optim.AdamW's flags this optimizer does not implement, refused when set True in a group."""
    for name in _UNSUPPORTED:
        if group.get(name):
            raise ValueError(f"FusedAdamW does not support {name}=True")


def _check_grad(p: torch.Tensor) -> None:
    """Grads every path can step, refused the same way on each (before any state or buffer changes)."""
    g = p.grad
    if g.is_sparse:
        raise TypeError(f"FusedAdamW does not support sparse gradients (param {tuple(p.shape)} has a "
                        f"sparse {g.dtype} grad; torch.optim.SparseAdam handles those)")
    if g.dtype != p.dtype:
        raise TypeError(f"grad of param {tuple(p.shape)} must be {p.dtype} like the param, got {g.dtype}")
    if g.shape != p.shape:  # only through .grad.data; a broadcast grad would step with the wrong values
        raise RuntimeError(f"grad of shape {tuple(g.shape)} for a param of shape {tuple(p.shape)}")


def _overlapping(params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two params whose memory overlaps (or one param with itself: an expanded view), if any. Sharing a
    storage without overlap is fine: a model loaded from a checkpoint of one stepped on the Triton path
    shares one flat storage, and interleaved views (``w[:, 0]``, ``w[:, 1]``) share no element."""
    spans = []
    for p in params:
        if p.numel():
            if any(st == 0 and n > 1 for n, st in zip(p.shape, p.stride())):
                return p, p
            base, size = p.untyped_storage().data_ptr(), p.element_size()
            spans.append((base + p.storage_offset() * size, base + (_last_offset(p) + 1) * size, p))
    spans.sort(key=lambda s: s[:2])
    for i, (_, end, a) in enumerate(spans):  # spans sorted by start: a span meets only those starting before its end
        for start, _, b in spans[i + 1:]:
            if start >= end:
                break
            if _share_elements(a, b):
                return a, b
    return None


def _last_offset(t: torch.Tensor) -> int:
    """The storage offset (in elements) of a non-empty tensor's last element: strides are never negative."""
    return t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))


# Largest span (elements) the exact check marks (256 MB of bitmap); past it overlapping spans count as sharing.
_EXACT_LIMIT = 1 << 28


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do two tensors whose byte spans overlap share an element? Exact for strided views of one storage and
    dtype up to `_EXACT_LIMIT` elements of span: each one's elements marked in a bitmap (a byte per element,
    through as_strided: no index arrays); any other pair whose spans overlap counts as sharing."""
    if (a.is_contiguous() and b.is_contiguous() or a.dtype != b.dtype
            or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()):  # offsets of one numbering only
        return True  # a contiguous span holds every element of it
    ends = [_last_offset(t) + 1 for t in (a, b)]
    lo = min(a.storage_offset(), b.storage_offset())
    if a.storage_offset() == b.storage_offset() or ends[0] == ends[1]:
        return True  # the same first or last element (strides are never negative)
    if max(ends) - lo > _EXACT_LIMIT:
        return True
    marks = torch.zeros(max(ends) - lo, dtype=torch.bool)
    try:
        marks.as_strided(a.shape, a.stride(), a.storage_offset() - lo).fill_(True)
    except RuntimeError:  # a overlaps itself (torch refuses to write through such a view): it shares anyway
        return True
    return bool(marks.as_strided(b.shape, b.stride(), b.storage_offset() - lo).any())


class AdamWStats(NamedTuple):
    """Per-step sums for one parameter: shape (K,) for member groups, () otherwise, fp32."""

    grad_sq: torch.Tensor
    precond_grad_sq: torch.Tensor
    param_sq: torch.Tensor
    update_sq: torch.Tensor


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
        amsgrad: bool = False,  # torch.optim.AdamW's sixth positional argument: calls written for it line up
        *,
        decay_mode: str = "torch",
        backend: str = "auto",
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        native_cpu: bool = True,
        seed: int = 0,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        # torch.optim.AdamW's keywords, so code written for it constructs this unchanged: foreach and
        # fused choose among torch's implementations (this one is always fused), the rest we refuse
        del foreach, fused
        _refuse_unsupported(dict(amsgrad=amsgrad, maximize=maximize, capturable=capturable,
                                 differentiable=differentiable))
        backend = normalize_backend(backend)
        if backend == "triton" and not triton_available():
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
        self.native_cpu = native_cpu  # False keeps fp32 CPU buckets on torch ops (comparisons)
        self.seed = int(seed)
        self._buckets: list[Bucket] | None = None
        self._key: list | None = None  # the layout the buckets were built for
        self._seen: tuple = (None, [])  # the state container and its tensors' ids after the last build
        self._where: dict[int, tuple[Bucket, int]] = {}  # id(param) -> (bucket, tensor index)
        self._hyper = HyperTable()
        self._step_stats: list[engines.StepStats] = []  # the last step's, per bucket, reduced on read
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        # independent decay's lr_0 (`hyper.base_lr`), under our own key: torch's "initial_lr" is a scheduler's,
        # set when it is built; set here, an lr changed between the two was lost to the scheduler
        group.setdefault(BASE_LR, copy_lr(group["lr"]))
        self._invalidate()

    def _check_group(self, group: dict) -> None:
        if group["decay_mode"] not in ("torch", "independent"):
            raise ValueError(f"decay_mode must be 'torch' or 'independent', got {group['decay_mode']!r}")
        _refuse_unsupported(group)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        b1, b2 = (float(b) for b in betas)
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {group['betas']}")
        # torch.optim.AdamW's checks (lr >= 0, eps >= 0, weight_decay >= 0), and finite
        for key, what in (("lr", "learning rate"), ("eps", "epsilon value"), ("weight_decay", "weight_decay value")):
            value = group[key]
            if isinstance(value, torch.Tensor) and value.dim() > 1 or is_vector(value) and len(value) == 0:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else f"length {len(value)}"
                raise ValueError(f"{key} must be a number or one value per member (a 1-D sequence of length "
                                 f">= 1), got shape {shape}")
            values = value.reshape(-1).tolist() if isinstance(value, torch.Tensor) else (
                list(value) if isinstance(value, (list, tuple)) else [value])
            for i, v in enumerate(values):
                if not isinstance(v, numbers.Real) or isinstance(v, bool) or not (math.isfinite(v) and v >= 0.0):
                    where = f" (member {i})" if len(values) > 1 or is_vector(value) else ""
                    raise ValueError(f"Invalid {what}: {v!r}{where}; must be a finite number >= 0")
        k = group_members(group)
        if len({id(p) for p in group["params"]}) != len(group["params"]):
            # torch steps a repeated param twice (deprecated); one flat slot per param cannot
            raise ValueError("a param group lists the same param more than once")
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
        if self.backend == "cpu" and device.type != "cpu":
            raise ValueError(f"backend='cpu' is the CPU path; params on {device} need 'auto' or 'triton'")
        return resolve_backend(self.backend, device) == "triton"

    # ---------------------------------------------------------------- buckets
    def _layout_key(self) -> list:
        key = []
        for g in self.param_groups:
            key.append(group_members(g))
            key.extend((id(p), p.dtype, p.device, p.shape) for p in g["params"])
        return key

    def _build(self) -> None:
        """(Re)build the flat buckets, carrying over any existing state (loaded or previous).

        A rebuild follows any change of the layout (a param added, re-typed, moved or re-shaped
        after construction), so the params are checked again first: a state the param no longer
        fits is refused here, before the native kernel would write past it."""
        tied = _overlapping([p for g in self.param_groups for p in g["params"] if self._use_triton(p.device)])
        if tied:
            which = (f"a param of shape {tuple(tied[0].shape)} overlaps itself in memory (an expanded view)"
                     if tied[0] is tied[1] else f"params of shape {tuple(tied[0].shape)} and {tuple(tied[1].shape)} "
                     "overlap in memory (views of one tensor)")
            raise ValueError(f"{which}: the Triton path moves each param into its own slot of a flat buffer, "
                             "which would untie them; tie them as one Parameter")
        for g in self.param_groups:
            self._check_group(g)
            for p in g["params"]:
                old = self.state.get(p, {}).get("exp_avg")
                if old is not None and old.shape != p.shape:
                    raise RuntimeError(f"param of shape {tuple(p.shape)} has optimizer state of shape "
                                       f"{tuple(old.shape)}: it changed shape after the optimizer stepped it; "
                                       "build a new optimizer for the new shape")
        self._sync_all()
        self._hyper.layout(self.param_groups)
        self._buckets = build_buckets(self.param_groups, self._hyper.first_slot, self.state, self._use_triton,
                                      self.master_weights)
        self._where = {id(p): (b, t) for b in self._buckets for t, p in enumerate(b.params)}
        self._key = self._layout_key()
        self._seen = (self.state, self._state_ids())  # what `_state_is_ours` compares against

    def _invalidate(self) -> None:
        """Drop the buckets (rebuilt on the next step), their step counts written back to the state first."""
        self._sync_all()
        self._buckets = None

    def _sync_all(self) -> None:
        """Every bucket's step counts written back to the state (`_sync_steps`)."""
        for b in self._buckets or []:
            self._sync_steps(b)

    def _sync_steps(self, b: Bucket) -> None:
        """Triton path: the step counters live in `b.counters` (units of blocks); refresh `steps`."""
        if b.use_triton:
            b.steps.copy_((b.counters // b.nblk_dev).to("cpu", b.steps.dtype))

    def _ensure_buckets(self) -> list[Bucket]:
        if self._layout_changed() or not self._state_is_ours():
            self._build()
        return self._buckets

    def _layout_changed(self) -> bool:
        """No buckets yet, or the params they were built for are not those of `param_groups` now."""
        return self._buckets is None or self._layout_key() != self._key

    def _state_is_ours(self) -> bool:
        """Does `self.state` still hold what the last build put there? A caller who resets or replaces a
        param's state (`state.clear()`, `state[p] = {}`, `state[p]["step"] = torch.tensor(0.)`) means the
        next step to start from it, as torch.optim.AdamW's does; the flat buffers would step on unseen, and
        `state_dict()` would save what they no longer use. A rebuild takes the state as it is now.
        Compared by identity, the state tensors of our keys in order (a caller's own keys, such as a
        Lookahead wrapper's slow weights, are theirs to change): C-level loops, ~0.5 us a param."""
        return self.state is self._seen[0] and self._state_ids() == self._seen[1]

    def _state_ids(self) -> list[list[int]]:
        states = list(self.state.values())
        keys = [k for k in EXPOSED_KEYS if self.master_weights or k != "master_param"]  # none: one pass fewer
        return [list(map(id, map(dict.get, states, repeat(key)))) for key in keys]

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: torch.Tensor | float | None = None,
             found_inf: torch.Tensor | None = None, statistics: bool = True,
             emit_preconditioner: bool = False):
        """One AdamW step over every param with a grad; grads are divided by `grad_scale`.

        `found_inf > 0` skips the step (no state change, step counters stay), like
        torch's fused AdamW; on the Triton path this is decided on the device.
        `statistics=False`: nobody will read this step's statistics (saves passes on the
        torch-ops path). `emit_preconditioner`: the fp32 CPU path also writes next step's
        W in its pass, so the next `preconditioners()` costs nothing.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        for g in self.param_groups:  # a flag set after the buckets were built (a rebuild checks the rest)
            _refuse_unsupported(g)
            for p in g["params"]:  # before the buckets: building them copies grads in (Triton path)
                if p.grad is not None:
                    _check_grad(p)
        self._step_stats = []
        for b in self._ensure_buckets():
            b.precond_ready = None  # the state changes now; the native step may emit a fresh W
            active = tuple(p.grad is not None for p in b.params)
            if not any(active):
                continue
            gs = self._grad_scale_for(b, grad_scale)
            inf = None if found_inf is None else found_inf.to(b.device, torch.float32).reshape(())
            out = self._step_bucket(b, active, gs, inf, statistics, emit_preconditioner)
            if out is not None:
                self._step_stats.append(out)
        return loss

    def _step_bucket(self, b: Bucket, active: tuple[bool, ...], gs, inf, statistics: bool,
                     emit: bool) -> engines.StepStats | None:
        if b.use_triton:
            return engines.triton_step(b, active, self._hyper.rows(self.param_groups, b.device), gs, inf,
                                       self.seed, self.stochastic_rounding)
        if b.dtype == torch.float32 and b.device.type == "cpu" and self.native_cpu and K.NATIVE.get() is not None:
            emit = emit and all(active)
            out = engines.native_step(b, active, self._hyper.rows(self.param_groups, b.device), gs, inf,
                                      statistics, b.precond_buffer() if emit else None)
            if out is not False:
                skipped = inf is not None and float(inf) > 0  # nothing written: W stays unmade
                if emit and not skipped:
                    b.precond_ready = self._precond_keys(b)
                return out
        # torch ops (also any device but CUDA and the CPU: meta, say): the rows as numbers, read on the CPU
        rows = self._hyper.rows(self.param_groups, torch.device("cpu")).tolist()
        return engines.torch_step(b, active, rows, gs, inf, statistics, self.stochastic_rounding, self.seed)

    def _grad_scale_for(self, b: Bucket, grad_scale) -> torch.Tensor | None:
        if grad_scale is None:
            return None
        gs = torch.as_tensor(grad_scale, dtype=torch.float32).to(b.device)
        if gs.dim() == 1 and gs.numel() > 1:
            bad = [tuple(p.shape) for p, k in zip(b.params, b.members) if k != gs.numel()]
            if bad:
                raise ValueError(f"grad_scale of shape {tuple(gs.shape)} needs member groups of that size; "
                                 f"params {bad[:3]} are not")
            return gs.contiguous()
        return gs.reshape(())

    # -------------------------------------------------------------- read-outs
    def statistics(self) -> dict[torch.Tensor, AdamWStats]:
        """Statistics of the last `step()` for each param it updated (module doc for the definitions).

        Each field is fp32, shape (K,) for member groups and () otherwise. On the
        Triton path the per-block partial sums are reduced here (one small
        segment sum), so a step that nobody reads pays nothing for it.
        """
        out: dict[torch.Tensor, AdamWStats] = {}
        for s in self._reduced_stats():
            cols = s.table.t().contiguous()  # (4, segments): one row slice per field
            for t in s.tensors:
                k, s0 = s.bucket.members[t], s.bucket.seg_start[t]
                out[s.bucket.params[t]] = AdamWStats(*(cols[:, s0 : s0 + k] if k > 1 else cols[:, s0]).unbind(0))
        return out

    def statistics_tables(self) -> list[tuple[list[torch.Tensor], torch.Tensor, list[int]]]:
        """The last `step()`'s statistics before the per-param split, per bucket:
        (params stepped, table (segments, 4) fp32 with one row per (tensor, member)
        segment in bucket order, first row of each of those params). Fields in
        `AdamWStats` order; a member group's param owns K consecutive rows. For
        callers reducing over many params: a couple of ops instead of a few per param.
        """
        return [([s.bucket.params[t] for t in s.tensors], s.table, [s.bucket.seg_start[t] for t in s.tensors])
                for s in self._reduced_stats()]

    def _reduced_stats(self) -> list[engines.StepStats]:
        self._step_stats = [s.reduced() for s in self._step_stats]  # once: later reads reuse them
        return self._step_stats

    def preconditioner(self, p: torch.Tensor) -> torch.Tensor | None:
        """1/(sqrt(v_hat)+eps) from the current state (the next step's "before" P), or None before any step.

        On the Triton path "any step" means any launch: a param whose only steps were skipped by
        `found_inf` gets all ones (W = 1), because telling needs the device's step count (a host sync)."""
        return self._preconditioner(p) if self._laid_out() else None

    def _preconditioner(self, p: torch.Tensor) -> torch.Tensor | None:
        """`preconditioner` on buckets known to be laid out (`_laid_out` checks the whole state: once a call)."""
        where = self._where.get(id(p))
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
            # as the kernel: beta2 rounded to fp32 as the hyper table holds it (v was made with that one),
            # 1 - beta2^step in fp64 (it cancels in fp32 for a beta2 near 1)
            step = (b.counters[t] // b.nblk_dev[t]).double()
            b2_32 = float(torch.tensor(b2, dtype=torch.float32))
            w = 1.0 / ((v / (1 - torch.pow(b2_32, step)).float()).sqrt() + eps)
            return torch.where(step > 0, w, torch.ones_like(w))
        step = float(b.steps[t])
        if step <= 0:
            return None
        return engines.precond_from_state(v, b2, eps, step, torch.empty_like(v))

    def preconditioners(self) -> dict[torch.Tensor, torch.Tensor | None]:
        """`preconditioner(p)` for every parameter, as views of one flat W per bucket.

        On the CPU path a bucket whose tensors share (beta2, eps, step), the
        usual case, gets W from the last step when it emitted it, else from four
        in-place passes over its flat exp_avg_sq into a reused buffer instead of
        four ops per tensor; otherwise per tensor. The views are valid until the
        next call or step.
        """
        out: dict[torch.Tensor, torch.Tensor | None] = {}
        for b in self._buckets if self._laid_out() else ():
            key = self._precond_keys(b)
            if b.use_triton or len(key) != 1 or next(iter(key))[2] <= 0:
                out.update({p: self._preconditioner(p) for p in b.params})
                continue
            if b.precond_ready != key:
                engines.precond_from_state(b.exp_avg_sq, *next(iter(key)), b.precond_buffer())
                b.precond_ready = key
            out.update(zip(b.params, b.precond_views))
        return out

    def _laid_out(self) -> bool:
        """Buckets exist (laid out now if a state was loaded and no step has run since)."""
        if self._buckets is None and any("exp_avg_sq" in st for st in self.state.values()) or (
                self._buckets is not None and not self._state_is_ours()):
            self._ensure_buckets()
        return self._buckets is not None

    def _precond_keys(self, b: Bucket) -> set[tuple[float, float, float]]:
        """The (beta2, eps, step) of a bucket's tensors: W in its buffer is valid for exactly this."""
        return {(float(self.param_groups[gi]["betas"][1]), float(self.param_groups[gi]["eps"]), step)
                for gi, step in zip(b.groups, b.steps.tolist())}

    # ------------------------------------------------------------- state dict
    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles defaults, state and param_groups only; the buckets are
        # rebuilt from the state on the first step after unpickling (or a deepcopy)
        self._sync_all()
        return {**super().__getstate__(), **{k: getattr(self, k) for k in _PICKLED}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # also called by torch's load_state_dict on a live optimizer: fill in only what is missing (the
        # settings of _PICKLED come with the state; the layout is rebuilt on the next step)
        fresh = dict(_buckets=None, _key=None, _seen=(None, []), _where={}, _hyper=HyperTable(), _step_stats=[])
        for key, value in fresh.items():
            self.__dict__.setdefault(key, value)
        super().__setstate__(state)

    def state_dict(self) -> dict[str, Any]:
        self._sync_all()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load ours or torch.optim.AdamW's, as torch loads one: its load hooks run (a pre-hook's dict is the
        one loaded, a post-hook sees and may edit the loaded state), and a saved state goes to the param
        whose id (or name, as `torch.distributed.checkpoint` keys them) stands at the same place in the
        saved param_groups. Unlike torch, the moments and master weights stay fp32 for 16-bit params
        (torch casts them to the param's dtype) and a step count is a float32 tensor. A torch state saved
        with capturable or differentiable set loads with them cleared (they say how a step runs, not what
        the state means); amsgrad and maximize are refused, leaving this optimizer as it was."""
        state_dict = state_dict.copy()  # shallow, as torch: a pre-hook may edit or replace it
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = deepcopy(state_dict["param_groups"])  # the loaded groups do not alias the caller's
        theirs_sizes = [len(g["params"]) for g in saved_groups]
        mine_sizes = [len(g["params"]) for g in self.param_groups]
        if theirs_sizes != mine_sizes:  # torch's words, with the sizes (else a shape check below named a param)
            what = ("has a different number of parameter groups" if len(theirs_sizes) != len(mine_sizes) else
                    "contains a parameter group that doesn't match the size of optimizer's group")
            raise ValueError(f"loaded state dict {what} (params per group: {theirs_sizes}, this optimizer's "
                             f"{mine_sizes})")
        for mine, theirs in zip(self.param_groups, saved_groups):  # their flags, before anything moves
            for name in _HOW_NOT_WHAT:
                theirs[name] = False
            self._check_group({"decay_mode": "torch", **theirs, "params": mine["params"]})
        id_map = dict(zip((i for g in saved_groups for i in g["params"]),
                          (p for g in self.param_groups for p in g["params"])))
        for i, st in state_dict["state"].items():  # before anything is replaced: a refused load changes nothing
            p = id_map.get(i)
            if p is None:
                continue
            held = [k for k in _ADAM_KEYS if k in st]
            if held and len(held) < len(_ADAM_KEYS):  # the step would fail on it, after the load had taken it
                raise ValueError(f"state_dict's state for param {i!r} has {', '.join(held)} but not "
                                 f"{', '.join(k for k in _ADAM_KEYS if k not in st)}: not an AdamW state")
            for key, val in st.items():
                if key in _STATE_KEYS and tuple(val.shape) != tuple(p.shape):
                    raise ValueError(f"state_dict's {key} for param {i!r} has shape {tuple(val.shape)}, the param "
                                     f"{tuple(p.shape)}: the state of another model")
        state: defaultdict[Any, dict] = defaultdict(dict)
        for i, st in state_dict["state"].items():
            p = id_map.get(i)
            if p is None:  # as torch: a state that belongs to no param is kept as it is
                state[i] = st
                continue
            for key, val in st.items():
                if key in _STATE_KEYS:
                    state[p][key] = val.to(device=p.device, dtype=torch.float32)
                elif key == "step":
                    state[p][key] = torch.as_tensor(float(val), dtype=torch.float32)
                else:  # a caller's own key (a Lookahead's slow weights): torch's cast
                    state[p][key] = _cast_as_torch(p, val, i, saved_groups, key)
        for mine, theirs in zip(self.param_groups, saved_groups):
            theirs["params"] = mine["params"]
            if "param_names" in mine and "param_names" not in theirs:
                theirs["param_names"] = mine["param_names"]
            theirs.setdefault("decay_mode", "torch")
            theirs.setdefault(BASE_LR, copy_lr(theirs["lr"]))  # a torch AdamW's state has none
        self._invalidate()
        self.__setstate__({"state": state, "param_groups": saved_groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch; with set_to_none=False the flat grad buffers are zeroed in one op and stay in place."""
        if set_to_none or self._layout_changed():  # a param added by hand: the buckets do not hold it yet
            return super().zero_grad(set_to_none)
        for b in self._buckets:
            for t, p in enumerate(b.params):
                if p.grad is not None and not (b.use_triton and b.grad_in_place(t)):
                    # as torch: cut a grad made with create_graph=True from its graph, which would
                    # otherwise grow by a ZeroBackward node every step
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()
            if b.use_triton:
                b.flat_grad.zero_()
