"""The hyperparameter table of `FusedAdamW`: one row per (group, member) *slot*.

Rows are ``[lr, wd_eff, beta1, beta2, eps]`` (the kernels' `N_HYPER` columns).
A group whose lr or weight_decay is a sequence (or 1-D tensor) of length K has K
slots, one per member of its params' leading axis; other groups have one.
``wd_eff`` folds the decay convention in, so the kernels always apply
``p *= 1 - lr * wd_eff``: torch mode passes ``wd``, independent mode
``wd / lr_0`` (then the decay follows the lr schedule's multiplier; `base_lr`).

Rows built from Python floats are cached per device and rebuilt only when a
value changes: the trainer sets a new lr every step, and on CUDA the table
travels through pinned memory so the copy never synchronises the stream. A
group holding tensors stays on the device: no host sync at all.
"""

from __future__ import annotations

from typing import Any

import torch

from trajinv.kernels.adamw import N_HYPER, hyper_row


BASE_LR = "decay_base_lr"
"""A group's key for independent decay's lr_0 when no torch scheduler has set ``initial_lr``: the group's lr
when it joined the optimizer (or when a torch AdamW's state dict, which has no lr_0, was loaded)."""


def base_lr(group: dict) -> Any:
    """lr_0 of independent decay, wd_eff = wd / lr_0: a torch scheduler's ``initial_lr`` (its base, set when
    the scheduler is built, so lr / lr_0 is its multiplier), else the group's lr when it joined."""
    return group.get("initial_lr", group.get(BASE_LR, group["lr"]))


def copy_lr(lr: Any) -> Any:
    """A copy of an lr value: the trainer changes a tensor or list lr in place, a base must not move."""
    return lr.clone() if isinstance(lr, torch.Tensor) else list(lr) if isinstance(lr, (list, tuple)) else lr


def is_vector(x: Any) -> bool:
    return isinstance(x, (list, tuple)) or (isinstance(x, torch.Tensor) and x.dim() == 1)


def group_members(group: dict) -> int:
    """K of a member group (lr or weight_decay given per member), else 1."""
    ks = {len(group[k]) for k in ("lr", "weight_decay") if is_vector(group[k])}
    if len(ks) > 1:
        raise ValueError(f"per-member lr and weight_decay differ in length: {sorted(ks)}")
    return ks.pop() if ks else 1


def _as_floats(x: Any, k: int) -> list[float]:
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    return [float(v) for v in x] if isinstance(x, (list, tuple)) else [float(x)] * k


class HyperTable:
    """Slot layout of a list of param groups, and their rows per device (cached)."""

    def __init__(self) -> None:
        self.first_slot: list[int] = []  # per group
        self.members: list[int] = []  # K per group, as laid out
        self._cache: dict[torch.device, tuple[list, torch.Tensor]] = {}

    def layout(self, groups: list[dict]) -> None:
        """Assign slots to `groups` (called whenever the optimizer lays out its buckets)."""
        self.first_slot, self.members, slot = [], [], 0
        for g in groups:
            self.first_slot.append(slot)
            self.members.append(group_members(g))
            slot += self.members[-1]

    def rows(self, groups: list[dict], device: torch.device) -> torch.Tensor:
        """(slots, N_HYPER) fp32 on `device`, from the groups' current values."""
        rows: list[torch.Tensor | list[list[float]]] = []
        any_tensor = False
        for gi, (g, k) in enumerate(zip(groups, self.members)):
            if group_members(g) != k:
                raise ValueError(f"group {gi}: member count changed from {k} to {group_members(g)}")
            b1, b2 = (float(x) for x in g["betas"])
            eps = float(g["eps"])
            lr, wd, lr0 = g["lr"], g["weight_decay"], base_lr(g)
            if any(isinstance(x, torch.Tensor) for x in (lr, wd, lr0)):
                any_tensor = True
                t = lambda x: torch.as_tensor(x, dtype=torch.float32, device=device).reshape(-1).expand(k)
                lr_t, wd_t = t(lr), t(wd)
                if g["decay_mode"] == "independent":  # as the float branch: an lr0 of 0 decays nothing
                    l0 = t(lr0)
                    wd_t = torch.where(l0 != 0, wd_t / torch.where(l0 != 0, l0, 1.0), 0.0)
                rows.append(torch.stack([lr_t, wd_t] + [torch.full((k,), c, device=device) for c in (b1, b2, eps)], 1))
            else:
                lrs, wds = _as_floats(lr, k), _as_floats(wd, k)
                if g["decay_mode"] == "independent":
                    wds = [w / l0 if l0 else 0.0 for w, l0 in zip(wds, _as_floats(lr0, k))]
                rows.append([hyper_row(a, w, b1, b2, eps) for a, w in zip(lrs, wds)])
        if any_tensor:
            return torch.cat([r if isinstance(r, torch.Tensor)
                              else torch.tensor(r, dtype=torch.float32, device=device).reshape(-1, N_HYPER)
                              for r in rows])
        flat = [r for rs in rows for r in rs]
        cached = self._cache.get(device)
        if cached is not None and cached[0] == flat:
            return cached[1]
        if device.type != "cuda":  # pinned staging is CUDA's (the CPU needs none)
            out = torch.tensor(flat, dtype=torch.float32).reshape(-1, N_HYPER).to(device)
        else:
            # pinned staging (torch's caching host allocator) so the copy is async: a copy
            # from pageable memory would synchronise the stream first
            out = torch.tensor(flat, dtype=torch.float32, pin_memory=True).reshape(-1, N_HYPER)
            out = out.to(device, non_blocking=True)
        self._cache[device] = (flat, out)
        return out
