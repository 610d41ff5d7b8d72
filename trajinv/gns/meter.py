"""The trainer's gradient-noise-scale meter: probes, micro-batch sums, the estimator.

One object per population run. It never touches parameters or their `.grad`:
the trainer hands it what it needs. Per measured step the trainer calls

    meter.begin_step(step, W)       # W: the optimizer's preconditioners (None during warm-up)
    ... each micro-batch: forward/backward, then (micro-batch mode)
        meter.accumulate(grads)     # this micro-batch's gradients, by parameter name
    grads = meter.accumulated()     # micro-batch mode: the step's summed gradients
    out = meter.end_step(step, B, micro, stats)   # stats: the optimizer's unclipped sums

Modes (see `trajinv.gns.estimator` for the maths):

- per-example: a `Probe` on every linear weight (output head included) and
  norm gain; the backward kernels add sum_n |C_n|^2 and sum_n |C_n|_W^2. The
  big batch is the same tensors' summed gradient. Embeddings are not covered.
- micro-batch: each micro-batch's gradients are added into accumulators by
  `accumulate_grads_with_norms` (one call for every tensor), which also adds
  the micro-batch gradient's squared norms. A tensor's first micro-batch
  gradient of a step becomes its accumulator (no copy, no zeroing). It covers
  the same tensors as per-example mode, plus the token embedding when
  `GNSConfig.embeddings` is set.

The preconditioner W = 1/(sqrt(v_hat)+eps) is the optimizer state before this
step's update, i.e. the same P the optimizer's precond_grad_sq uses. One
exception: with the embedding included, its W is formed with v_hat floored at the
member's mean v_hat over the embedding, W_emb = 1/(sqrt(max(v_hat, mean v_hat))+eps).
Rows of rare tokens have v_hat ~ 0, so W ~ 1/eps there, and the step such a token
appears in would put a spike of up to ~1e6 times a typical row's weight into
tr(W Sigma). The floor caps a row's weight at that of a row with average second
moment. The big-batch |g|_W^2 of the embedding is then taken by the meter with the
same floored W (the optimizer's precond_grad_sq uses the unfloored one).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from trajinv.config import GNSConfig
from trajinv.gns.estimator import GNSTracker, micro_batch_sq_mean, per_example_sq_mean, precond_active
from trajinv.kernels.accumulate import accumulate_grads_with_norms
from trajinv.ops import Probe
from trajinv.optim.population import ParamStats

LOG_KEYS = ("grad_norm", "grad_norm_w", "tr_sigma", "tr_w_sigma", "g2", "g2_w",
            "b_simple", "b_precond", "b_simple_smooth", "b_precond_smooth", "b_precond_robust")
EMBEDDING = "wte"


class GNSMeter:
    def __init__(self, shapes: Mapping[str, torch.Tensor], members: int, cfg: GNSConfig, model_probes: dict,
                 backend: str = "auto", eps: float = 1e-8):
        """`shapes`: name -> member-axis parameter (only names, devices and order are read);
        `model_probes`: the model's probe table, filled on measured steps only;
        `backend`: kernel backend ('auto', 'triton', 'cpu'); `eps`: the optimizer's eps
        (to recover v_hat from W for the embedding's floor)."""
        self.cfg, self.members, self.backend, self.eps = cfg, members, backend, float(eps)
        self.model_probes = model_probes
        self.active = False
        self.tracker = GNSTracker(members, cfg)
        embeddings = cfg.mode == "micro-batch" and cfg.embeddings
        self.covered = [n for n in shapes if embeddings or n != EMBEDDING]
        self.floored = EMBEDDING in self.covered  # its W has v_hat floored, its big-batch |g|_W^2 is ours
        self.emb_big_w: torch.Tensor | None = None
        # Probes add into rows of one (tensors, 2, K) buffer: one zero_ and one sum per step, not two per probe.
        n_probed = len(self.covered) if cfg.mode == "per-example" else 0
        device = next(iter(shapes.values())).device if shapes else torch.device("cpu")
        self.probe_sums = torch.zeros(n_probed, 2, members, device=device)
        self.probes = {n: Probe(sums=self.probe_sums[i], backend=backend) for i, n in enumerate(self.covered[:n_probed])}
        self.acc: dict[str, torch.Tensor] = {}  # micro-batch mode: this step's running gradient sums
        self.W: dict[str, torch.Tensor | None] = {}
        # rows: weighted, unweighted; on the parameters' device, so that adding a micro-batch's norms waits
        # for nothing there (a CPU buffer cost CUDA one wait per micro-batch); read once, in end_step
        self.sums = torch.zeros(2, members, dtype=torch.float64, device=device)
        self.preconditioned = False

    def measures(self, step: int) -> bool:
        """Is step `step` measured (see GNSConfig.every)?"""
        return step % self.cfg.every == 0

    def wants_preconditioner(self, step: int) -> bool:
        """Will step `step` be measured under Adam's W (so the optimizer should have W ready)?"""
        return self.measures(step) and precond_active(step, self.cfg)

    def begin_step(self, step: int, preconditioners: Mapping[str, torch.Tensor | None] | None) -> bool:
        """Prepare step `step` with the optimizer's W (None or missing entries: no state yet, W = 1);
        False when this step is not measured."""
        self.active = self.measures(step)
        self.model_probes.clear()
        if not self.active:
            return False
        self.model_probes.update(self.probes)
        self.preconditioned = precond_active(step, self.cfg)
        ws = preconditioners or {}
        self.W = {n: ws.get(n) for n in self.covered} if self.preconditioned else dict.fromkeys(self.covered)
        if self.preconditioned and any(w is None for w in self.W.values()):
            self.preconditioned = False  # no optimizer state yet: stay on the identity
            self.W = dict.fromkeys(self.covered)
        if self.floored and self.preconditioned:
            self.W[EMBEDDING] = floor_embedding_w(self.W[EMBEDDING], self.eps)
        self.emb_big_w = None
        self.sums.zero_()
        self.probe_sums.zero_()
        for name, probe in self.probes.items():
            probe.examples = 0
            probe.precond = self.W[name]
        self.acc.clear()
        return True

    @property
    def accumulates(self) -> bool:
        """Does this step need `accumulate` after each micro-batch (micro-batch mode, measured)?"""
        return self.active and self.cfg.mode == "micro-batch"

    def accumulate(self, grads: Mapping[str, torch.Tensor]) -> None:
        """Micro-batch mode: add one micro-batch's gradients into the step's sums and their norms.

        A tensor's first gradient of the step becomes its accumulator (adopted, not copied), so
        the caller must not reuse the tensors it hands over.
        """
        names = list(grads)
        accs = [self.acc.get(n) for n in names]
        accumulate_grads_with_norms(accs, [grads[n] for n in names], [self.W.get(n) for n in names],
                                    members=self.members, measured=[n in self.W for n in names],
                                    backend=self.backend, out_sums=self.sums)
        for name, acc in zip(names, accs):
            if acc is None:
                g = grads[name]
                self.acc[name] = g if g.is_contiguous() else g.contiguous()

    def accumulated(self) -> dict[str, torch.Tensor]:
        """The step's summed gradients by name (handed over: the meter keeps no reference)."""
        out, self.acc = self.acc, {}
        return out

    def big_batch(self, grads: Mapping[str, torch.Tensor]) -> None:
        """The step's big-batch gradients by name: summed over micro-batches *and* ranks (after the
        all-reduce: one rank's share is a small batch), before anything clips or masks them. Takes the
        embedding's |g|_W^2 under its floored W (module doc); the other tensors' come from the optimizer."""
        if self.floored and self.preconditioned and EMBEDDING in grads:
            g, w = grads[EMBEDDING], self.W[EMBEDDING]
            self.emb_big_w = (g.double().square() * w.double()).flatten(1).sum(1).cpu()

    def reduce(self, all_reduce) -> None:
        """Data-parallel ranks: sum this step's small-batch sums over ranks (`all_reduce` sums a tensor in
        place) before `end_step`; each rank's gradients are small batches of the global one."""
        if self.active:
            all_reduce(self.sums)
            all_reduce(self.probe_sums)

    def end_step(self, step: int, batch_size: int, micro: int, stats: ParamStats) -> dict[str, torch.Tensor] | None:
        """Estimates for this step from the small sums and the optimizer's (unclipped) big-batch sums;
        None when the step was not measured."""
        if not self.active:
            return None
        sums = self.sums.cpu()
        if self.cfg.mode == "per-example":
            for row in self.probe_sums.cpu():  # tensor by tensor: a sum over the stacked axis ran in another
                sums += row                   # order for K = 1, and a member's numbers depended on its population
            small = per_example_sq_mean(sums, batch_size)
            b_small = 1
        else:
            small = micro_batch_sq_mean(sums, batch_size // micro)
            b_small = micro
        big_1, big_w = stats.totals(self.covered)[:2].cpu()  # grad_sq, precond_grad_sq
        w = self.preconditioned
        if w and self.floored:
            if self.emb_big_w is None:
                raise RuntimeError("micro-batch GNS: big_batch() was not called this step")
            others = [n for n in self.covered if n != EMBEDDING]
            big_w = stats.totals(others)[1].cpu().double() + self.emb_big_w
        return self.tracker.update(step, small[0] if w else None, big_w if w else None, small[1], big_1,
                                   b_small, batch_size, preconditioned=w)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tracker.load_state_dict(state)


def floor_embedding_w(w: torch.Tensor, eps: float) -> torch.Tensor:
    """W = 1/(sqrt(v_hat)+eps) of a (K, ...) tensor with v_hat floored at each member's mean:
    1/(sqrt(max(v_hat, mean v_hat))+eps) (module doc). A new tensor; `w` is not changed."""
    sqrt_v = (1.0 / w.double() - eps).clamp(min=0.0)
    mean_v = sqrt_v.square().flatten(1).mean(1)
    cap = 1.0 / (mean_v.sqrt() + eps)  # the weight of a row with the mean second moment
    return torch.minimum(w.double(), cap.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype).contiguous()
