"""The trainer's gradient-noise-scale meter: probes, micro-batch sums, the estimator.

One object per population run. Per step the trainer calls

    meter.begin_step(step)          # choose W (identity during warm-up), reset sums
    ... forward/backward of each micro-batch, calling meter.after_backward() after each ...
    meter.end_backward()            # micro-batch mode: hand the accumulated grads back
    out = meter.end_step(step, B, micro, stats)   # stats: the optimizer's unclipped sums

Modes (see `trajinv.gns` for the maths):

- per-example: a `Probe` on every linear weight (output head included) and
  norm gain; the backward kernels add sum_n |C_n|^2 and sum_n |C_n|_W^2. The
  big batch is the same tensors' summed gradient. Embeddings are not covered.
- micro-batch: after each micro-batch's backward its gradients are added into
  accumulators by `accumulate_grads_with_norms` (one call for every tensor),
  which also adds the micro-batch gradient's squared norms (every parameter).
  A tensor's first micro-batch gradient of a step becomes its accumulator (no
  copy, no zeroing pass).

The preconditioner W = 1/(sqrt(v_hat)+eps) is read from the optimizer state
before this step's update, i.e. the same P the optimizer's precond_grad_sq uses.
"""

from __future__ import annotations

import torch

from trajinv.gns import GNSConfig, GNSTracker, micro_batch_sq_mean, per_example_sq_mean, precond_active
from trajinv.gns_ops import Probe
from trajinv.kernels.accumulate_gns import accumulate_grads_with_norms
from trajinv.population_optim import ParamStats

LOG_KEYS = ("grad_norm", "grad_norm_w", "tr_sigma", "tr_w_sigma", "g2", "g2_w",
            "b_simple", "b_precond", "b_simple_smooth", "b_precond_smooth")


class GNSMeter:
    def __init__(self, params: dict[str, torch.Tensor], members: int, cfg: GNSConfig, preconditioners,
                 model_probes: dict, backend: str = "auto"):
        """`params`: name -> member-axis parameter; `preconditioners()` -> {name: W or None};
        `model_probes`: the model's probe table, filled on measured steps only;
        `backend`: kernel backend ('auto', 'triton', 'torch')."""
        self.cfg, self.members, self.params, self.backend = cfg, members, params, backend
        self.model_probes = model_probes
        self.active = False
        self.preconditioners = preconditioners
        self.tracker = GNSTracker(members, cfg)
        embeddings = cfg.mode == "micro-batch" and cfg.embeddings
        self.covered = [n for n in params if embeddings or n != "wte"]
        # Probes add into rows of one (tensors, 2, K) buffer: one zero_ and one sum per step, not two per probe.
        n_probed = len(self.covered) if cfg.mode == "per-example" else 0
        device = next(iter(params.values())).device if params else torch.device("cpu")
        self.probe_sums = torch.zeros(n_probed, 2, members, device=device)
        self.probes = {n: Probe(sums=self.probe_sums[i], backend=backend) for i, n in enumerate(self.covered[:n_probed])}
        self.acc: dict[str, torch.Tensor] = {}
        self.filled: set[str] = set()  # accumulators holding this step's sum so far
        self.W: dict[str, torch.Tensor | None] = {}
        self.sums = torch.zeros(2, members, dtype=torch.float64)  # rows: weighted, unweighted (host)
        self.preconditioned = False

    def measures(self, step: int) -> bool:
        """Is step `step` measured (see GNSConfig.every)?"""
        return step % self.cfg.every == 0

    def measures_with_w(self, step: int) -> bool:
        """Will step `step` be measured under Adam's W (so the optimizer may emit W for it)?"""
        return self.measures(step) and precond_active(step, self.cfg)

    def begin_step(self, step: int) -> bool:
        """Prepare step `step`; False when this step is not measured."""
        self.active = self.measures(step)
        self.model_probes.clear()
        if not self.active:
            return False
        self.model_probes.update(self.probes)
        self.preconditioned = precond_active(step, self.cfg)
        ws = self.preconditioners() if self.preconditioned else {}
        self.W = {n: ws.get(n) for n in self.covered}
        if self.preconditioned and any(w is None for w in self.W.values()):
            self.preconditioned = False  # no optimizer state yet: stay on the identity
            self.W = dict.fromkeys(self.covered)
        self.sums.zero_()
        self.probe_sums.zero_()
        for name, probe in self.probes.items():
            probe.examples = 0
            probe.precond = self.W[name]
        self.filled.clear()
        return True

    def after_backward(self) -> None:
        """Micro-batch mode: fold this micro-batch's gradients into the accumulator and the sums."""
        if self.cfg.mode != "micro-batch" or not self.active:
            return
        names = [n for n, p in self.params.items() if p.grad is not None]
        grads = [self.params[n].grad for n in names]
        # A tensor's first gradient of the step becomes its accumulator (adopted, not copied).
        accs = [self.acc[n] if n in self.filled else None for n in names]
        accumulate_grads_with_norms(accs, grads, [self.W.get(n) for n in names], members=self.members,
                                    measured=[n in self.W for n in names], backend=self.backend, out_sums=self.sums)
        for name, g, acc in zip(names, grads, accs):
            if acc is None:
                self.acc[name] = g if g.is_contiguous() else g.contiguous()
                self.filled.add(name)
            self.params[name].grad = None

    def end_backward(self) -> None:
        if self.cfg.mode == "micro-batch" and self.active:
            for name in self.filled:
                self.params[name].grad = self.acc[name]
            self.acc.clear()  # .grad holds them now; keep no second reference past the step

    def end_step(self, step: int, batch_size: int, micro: int, stats: ParamStats) -> dict[str, torch.Tensor] | None:
        """Estimates for this step from the small sums and the optimizer's (unclipped) big-batch sums;
        None when the step was not measured."""
        if not self.active:
            return None
        if self.cfg.mode == "per-example":
            self.sums += self.probe_sums.sum(0).cpu()
            small = per_example_sq_mean(self.sums, batch_size)
            b_small = 1
        else:
            small = micro_batch_sq_mean(self.sums, batch_size // micro)
            b_small = micro
        big_1, big_w = stats.totals(self.covered)[:2].cpu()  # grad_sq, precond_grad_sq
        w = self.preconditioned
        return self.tracker.update(step, small[0] if w else None, big_w if w else None, small[1], big_1,
                                   b_small, batch_size, preconditioned=w)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tracker.load_state_dict(state)
