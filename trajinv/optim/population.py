"""AdamW for a population: per-member lr and wd over member-axis parameters.

The trainer talks to one small interface whichever optimizer runs underneath:

- `FusedPopulationAdamW` wraps `trajinv.optim.FusedAdamW`: one launch per step
  for all tensors and members, gradient clipping folded in as a per-member
  `grad_scale`, statistics from the same pass.
- `TorchPopulationAdamW` wraps `torch.optim.AdamW`: member k's slice of every
  parameter becomes a leaf Parameter sharing storage with the stacked tensor, in
  param groups of its own (lr_k, wd_k). Statistics are computed with torch ops.

`step()` returns per-parameter statistics (`ParamStats`: name -> field -> a (K,)
fp32 tensor, backed by one table): `grad_sq` and `precond_grad_sq` of the
*unclipped* gradient (W = 1/(sqrt(v_hat)+eps) from the state before the update;
W = 1 on the first step), `param_sq` and `update_sq`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

import torch

from trajinv.config import Member, OptimConfig
from trajinv.model import param_kind
from trajinv.optim.fused_adamw import FusedAdamW

STAT_FIELDS = ("grad_sq", "precond_grad_sq", "param_sq", "update_sq")


class ParamStats(Mapping):
    """One step's statistics: `stats[name][field]` is a (K,) fp32 tensor.

    Backed by one (params, 4, K) table (fields in STAT_FIELDS order); the per-name
    dicts are views made on access.
    """

    def __init__(self, names: list[str], table: torch.Tensor):
        self.names, self.table = names, table
        self._row = {n: i for i, n in enumerate(names)}

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        return dict(zip(STAT_FIELDS, self.table[self._row[name]].unbind(0)))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def totals(self, names: Iterable[str] | None = None) -> torch.Tensor:
        """(4, K): every field summed over `names` (default all); a name without statistics
        is a KeyError naming it (a missing tensor would silently shift the sum)."""
        rows = range(len(self.names)) if names is None else []
        for n in () if names is None else names:
            if n not in self._row:
                raise KeyError(f"no optimizer statistics for parameter {n!r} (no gradient this step, "
                               "or statistics not requested)")
            rows.append(self._row[n])
        # Row by row, elementwise over members: a sum over the stacked rows runs in another order for
        # K = 1 (contiguous) than K > 1 (strided), and a member's logged norms moved with its population.
        out = torch.zeros_like(self.table[0]) if len(self.table) else self.table.new_zeros(self.table.shape[1:])
        for r in rows:
            out += self.table[r]
        return out


class PopulationOptimizer(Protocol):
    def step(self, lr_mult: float, clip_coef: torch.Tensor, stats: bool = True,
             emit_preconditioner: bool = False) -> ParamStats:
        """Update every member; per-parameter statistics when `stats` (else none). With
        `emit_preconditioner` the next `preconditioners()` call may reuse W written by this step."""
    def preconditioner(self, name: str) -> torch.Tensor | None: ...
    def preconditioners(self) -> dict[str, torch.Tensor | None]:
        """`preconditioner(name)` for every parameter, in one go."""
    def state_tensors(self) -> dict[str, torch.Tensor]: ...
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


def _decay_split(model: torch.nn.Module, cfg: OptimConfig) -> tuple[list, list]:
    decayed, plain = [], []
    for name, p in model.named_parameters():
        (decayed if param_kind(name, p) in cfg.decay else plain).append((name, p))
    return decayed, plain


def _member_wd(m: Member, cfg: OptimConfig) -> float:
    # 'independent' decays p *= 1 - wd*mult; AdamW decays by lr*wd' = base_lr*mult*wd', so wd' = wd/base_lr.
    return m.wd / m.lr if cfg.decay_mode == "independent" else m.wd


def _per_member_sq(t: torch.Tensor) -> torch.Tensor:
    return t.float().pow(2).flatten(1).sum(1)


class TorchPopulationAdamW:
    def __init__(self, model: torch.nn.Module, members: tuple[Member, ...], cfg: OptimConfig):
        self.cfg, self.members = cfg, members
        self.named = dict(model.named_parameters())
        decayed, plain = _decay_split(model, cfg)
        # shadows[name][k] is a leaf Parameter viewing member k's slice of the stacked tensor
        self.shadows = {name: [torch.nn.Parameter(p.detach()[k]) for k in range(len(members))]
                        for name, p in self.named.items()}
        groups = []
        for k, m in enumerate(members):
            for params, wd in ((decayed, _member_wd(m, cfg)), (plain, 0.0)):
                if params:
                    groups.append({"params": [self.shadows[n][k] for n, _ in params], "lr": m.lr,
                                   "weight_decay": wd, "base_lr": m.lr})
        self.opt = torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, foreach=False)

    def preconditioner(self, name: str) -> torch.Tensor | None:
        states = [self.opt.state.get(s) for s in self.shadows[name]]
        if any(not st for st in states):
            return None
        b2 = self.cfg.betas[1]
        return torch.stack([1.0 / ((st["exp_avg_sq"] / (1 - b2 ** float(st["step"]))).sqrt() + self.cfg.eps)
                            for st in states])

    def preconditioners(self) -> dict[str, torch.Tensor | None]:
        return {name: self.preconditioner(name) for name in self.named}

    @torch.no_grad()
    def step(self, lr_mult: float, clip_coef: torch.Tensor, stats: bool = True,
             emit_preconditioner: bool = False) -> ParamStats:
        out = {}
        for name, p in self.named.items():
            if p.grad is None:
                continue
            if stats:
                W = self.preconditioner(name)
                g2 = p.grad.float().pow(2)
                out[name] = {"grad_sq": g2.flatten(1).sum(1),
                             "precond_grad_sq": (g2 if W is None else g2 * W).flatten(1).sum(1),
                             "before": p.detach().clone()}
            coef = clip_coef.to(p.grad.dtype).view(-1, *([1] * (p.dim() - 1)))
            p.grad.mul_(coef)
            for k, s in enumerate(self.shadows[name]):
                s.grad = p.grad[k]
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * lr_mult
        self.opt.step()
        for name, st in out.items():
            p = self.named[name]
            st["update_sq"] = _per_member_sq(p.detach() - st.pop("before"))
            st["param_sq"] = _per_member_sq(p.detach())
        K = len(self.members)
        table = (torch.stack([torch.stack([st[f] for f in STAT_FIELDS]) for st in out.values()]) if out
                 else torch.zeros(0, len(STAT_FIELDS), K))
        return ParamStats(list(out), table)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, shadows in self.shadows.items():
            states = [self.opt.state.get(s) for s in shadows]
            if all(states):
                out[f"{name}.exp_avg"] = torch.stack([st["exp_avg"] for st in states])
                out[f"{name}.exp_avg_sq"] = torch.stack([st["exp_avg_sq"] for st in states])
                out[f"{name}.step"] = torch.stack([torch.as_tensor(st["step"], dtype=torch.float32) for st in states])
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, shadows in self.shadows.items():
            if f"{name}.step" not in tensors:
                continue
            # a checkpoint loads on the CPU: the moments go to their parameter's device (torch's Adam
            # refuses a CUDA parameter with CPU state), the step count stays a CPU tensor, as torch keeps it
            for k, s in enumerate(shadows):
                self.opt.state[s] = {"step": tensors[f"{name}.step"][k].clone(),
                                     "exp_avg": tensors[f"{name}.exp_avg"][k].to(s.device, copy=True),
                                     "exp_avg_sq": tensors[f"{name}.exp_avg_sq"][k].to(s.device, copy=True)}


class FusedPopulationAdamW:
    def __init__(self, model: torch.nn.Module, members: tuple[Member, ...], cfg: OptimConfig, backend: str = "auto"):
        self.cfg = cfg
        decayed, plain = _decay_split(model, cfg)
        self.base_lr = [m.lr for m in members]
        groups = [{"params": [p for _, p in params], "lr": list(self.base_lr), "weight_decay": wds}
                  for params, wds in ((decayed, [m.wd for m in members]), (plain, 0.0)) if params]
        self.opt = FusedAdamW(groups, betas=cfg.betas, eps=cfg.eps, decay_mode=cfg.decay_mode, backend=backend)
        self.order = [name for params in (decayed, plain) for name, _ in params]
        self.named = dict(model.named_parameters())
        self.name_of = {id(p): name for name, p in self.named.items()}

    def preconditioner(self, name: str) -> torch.Tensor | None:
        return self.opt.preconditioner(self.named[name])

    def preconditioners(self) -> dict[str, torch.Tensor | None]:
        ws = self.opt.preconditioners()
        return {name: ws.get(p) for name, p in self.named.items()}

    @torch.no_grad()
    def step(self, lr_mult: float, clip_coef: torch.Tensor, stats: bool = True,
             emit_preconditioner: bool = False) -> ParamStats:
        for g in self.opt.param_groups:
            g["lr"] = [lr * lr_mult for lr in self.base_lr]
        # Clipping rides along as a per-member grad scale (no extra pass over the grads);
        # frozen (diverged) members have coef 0 and zeroed grads: scale 1 keeps them finite.
        scale = torch.where(clip_coef > 0, 1.0 / clip_coef.clamp(min=1e-30), 1.0)
        self.opt.step(grad_scale=scale, statistics=stats, emit_preconditioner=emit_preconditioner)
        K = len(self.base_lr)
        if not stats:
            return ParamStats([], torch.zeros(0, len(STAT_FIELDS), K, device=scale.device))
        unclip = scale.pow(2)
        names, parts = [], []
        for params, table, starts in self.opt.statistics_tables():
            # rows are (tensor, member) segments, K per param in member order
            rows = [s0 // K for s0 in starts]
            table = table.view(-1, K, len(STAT_FIELDS))
            table = table.clone() if rows == list(range(table.shape[0])) else table[rows]
            table[..., :2] *= unclip[:, None]  # undo the clipping of both gradient sums, every param at once
            parts.append(table.transpose(1, 2))  # (params, 4, K)
            names += [self.name_of[id(p)] for p in params]
        return ParamStats(names, parts[0] if len(parts) == 1 else torch.cat(parts))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = self.opt.state_dict()["state"]
        return {f"{self.order[i]}.{key}": torch.as_tensor(v) for i, st in state.items() for key, v in st.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        sd = self.opt.state_dict()
        sd["state"] = {i: {key: tensors[f"{name}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq")}
                       for i, name in enumerate(self.order) if f"{name}.step" in tensors}
        self.opt.load_state_dict(sd)


def build_optimizer(model: torch.nn.Module, members: tuple[Member, ...], cfg: OptimConfig,
                    backend: str = "auto") -> PopulationOptimizer:
    """`backend` selects FusedAdamW's kernel path ('auto', 'triton', 'cpu'); torch's AdamW ignores it."""
    cfg.validate()
    if cfg.name == "torch":
        return TorchPopulationAdamW(model, members, cfg)
    return FusedPopulationAdamW(model, members, cfg, backend)
