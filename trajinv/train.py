"""The trainer: one population of K members, checkpointed and resumable.

Members share the model architecture, the batches (common random numbers) and
the batch-size schedule; they differ in lr and wd only. One forward/backward of
batched matmuls serves them all, one optimizer step updates them all.

Determinism: the batch of step s is drawn from a generator seeded by (seed, s),
so the data position is the step counter; with the model, optimizer and
estimator state restored from a checkpoint, a resumed run reproduces the
uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from trajinv.checkpoint import SIDECAR, load_checkpoint, save_checkpoint
from trajinv.config import TrainConfig, to_dict
from trajinv.data import TokenData, boot_means, boot_se, sample_batch, validation_batches, window_resamples
from trajinv.gns.meter import LOG_KEYS, GNSMeter
from trajinv.model import GPT
from trajinv.optim.population import STAT_FIELDS, build_optimizer
from trajinv.schedules import BatchSchedule, lr_multiplier

METRICS = "metrics.jsonl"


@dataclass
class MemberResult:
    """Where one member ended."""

    name: str
    lr: float
    wd: float
    status: str  # 'done', 'diverged' or 'running' (stopped early)
    steps: int
    tokens: int
    train_loss: float | None
    val_loss: float | None
    extra: dict = field(default_factory=dict)
    """More summary columns (e.g. the gradient noise scale) when measured."""


def _autocast(cfg: TrainConfig):
    if cfg.dtype == "bf16":
        return torch.autocast(device_type=cfg.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Trainer:
    """Trains `cfg.members` on `data`, writing metrics and checkpoints into `run_dir`."""

    def __init__(self, cfg: TrainConfig, data: TokenData, run_dir: str | Path, run_id: str = "run"):
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=cfg.model.vocab_size or data.vocab_size))
        cfg.validate()
        if data.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"data vocabulary {data.vocab_size} exceeds model vocab_size {cfg.model.vocab_size}")
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA device is available")
        self.cfg, self.data, self.run_id = cfg, data, run_id
        self.run_dir = Path(run_dir)
        self.batches = BatchSchedule.parse(cfg.batch_size)
        self.plan = cfg.batch_plan()  # steps per batch-size stage: from cfg.tokens or cfg.steps
        self.K = len(cfg.members)
        dev = torch.device(cfg.device)
        self.model = GPT(cfg.model, members=self.K).to(dev)
        self.model.init_weights(torch.Generator(device="cpu").manual_seed(cfg.seed))
        self.optimizer = build_optimizer(self.model, cfg.members, cfg.optim, backend=cfg.kernels)
        self.gns = None
        if cfg.gns.enabled:
            if cfg.gns.mode == "micro-batch":
                for b in self.batches.sizes:
                    if not cfg.micro_batch or b % cfg.micro_batch or b // cfg.micro_batch < 2:
                        raise ValueError(f"GNS micro-batch mode needs --micro-batch dividing batch size {b} "
                                         f"into >= 2 micro-batches, got micro_batch={cfg.micro_batch}")
            self.gns = GNSMeter(dict(self.model.named_parameters()), self.K, cfg.gns, self.model.probes,
                                backend=cfg.kernels)
        self.last_gns: dict[str, torch.Tensor] = {}
        self.lrs = torch.tensor([m.lr for m in cfg.members])
        self.wds = torch.tensor([m.wd for m in cfg.members])
        self.val = validation_batches(data.val, cfg.model.context, cfg.eval_seqs, batch_size=64)
        self.boot_counts = window_resamples(cfg.eval_seqs, cfg.eval_boot)
        self.val_windows = torch.full((self.K, cfg.eval_seqs), math.nan)
        self.step = 0
        self.tokens = 0
        self.seconds = 0.0
        self.alive = torch.ones(self.K, dtype=torch.bool)
        self.last_train = torch.full((self.K,), math.nan)
        self.last_val = torch.full((self.K,), math.nan)
        self.last_boot = torch.full((self.K, cfg.eval_boot), math.nan, dtype=torch.float64)

    # ----------------------------------------------------------------- state
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        t = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        t.update({f"optim.{k}": v for k, v in self.optimizer.state_tensors().items()})
        t["alive"] = self.alive.to(torch.uint8)
        t["last_train"], t["last_val"], t["last_boot"] = self.last_train, self.last_val, self.last_boot
        t["rng"] = torch.get_rng_state()
        if self.gns is not None:
            t.update({f"gns.{k}": v for k, v in self.gns.state_dict().items()})
            t.update({f"last_gns.{k}": v for k, v in self.last_gns.items()})
        return t

    def save(self) -> None:
        meta = {"run_id": self.run_id, "tokens": self.tokens, "seconds": self.seconds, "config": to_dict(self.cfg)}
        save_checkpoint(self.run_dir, self.step, self._state_tensors(), meta)

    def has_checkpoint(self) -> bool:
        return (self.run_dir / SIDECAR).exists()

    def resume(self) -> bool:
        """Load the run directory's checkpoint if there is one; drop metrics logged after it."""
        ckpt = load_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        tensors, meta = ckpt
        if meta["config"] != to_dict(self.cfg):
            raise ValueError(f"checkpoint in {self.run_dir} was made by a different configuration; "
                             "use a new output directory")
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.optimizer.load_state_tensors({k[6:]: v for k, v in tensors.items() if k.startswith("optim.")})
        self.alive = tensors["alive"].bool()
        self.last_train, self.last_val = tensors["last_train"], tensors["last_val"]
        self.last_boot = tensors["last_boot"]
        torch.set_rng_state(tensors["rng"])
        if self.gns is not None:
            self.gns.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("gns.")})
            self.last_gns = {k[9:]: v for k, v in tensors.items() if k.startswith("last_gns.")}
        self.step, self.tokens, self.seconds = meta["step"], meta["tokens"], meta["seconds"]
        self._truncate_metrics(self.step)
        return True

    def _truncate_metrics(self, step: int) -> None:
        path = self.run_dir / METRICS
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in keep))

    # ------------------------------------------------------------- training
    def _forward_backward(self, step: int, batch_size: int) -> torch.Tensor:
        """Mean train loss per member (K,) over the step's batch; gradients in .grad.

        The trainer owns `.grad`: it clears them here, and when the GNS meter sums the
        micro-batches itself (micro-batch mode) it hands each micro-batch's gradients
        over and puts the step's sums back at the end."""
        cfg = self.cfg
        x, y = sample_batch(self.data.train, batch_size, cfg.model.context, cfg.seed, step)
        x, y = x.to(cfg.device), y.to(cfg.device)
        micro = cfg.micro_batch or batch_size
        total = torch.zeros(self.K, device=cfg.device)
        params = dict(self.model.named_parameters())
        for p in params.values():
            p.grad = None
        handover = self.gns is not None and self.gns.accumulates
        for start in range(0, batch_size, micro):
            xs, ys = x[start : start + micro], y[start : start + micro]
            with _autocast(cfg):
                _, loss = self.model(xs, ys)
            # Each micro-batch's mean loss weighted by its share: the sum is the batch mean.
            loss = loss * (xs.shape[0] / batch_size)
            # Diverged members are frozen: keep their NaNs out of the backward.
            torch.where(self.alive.to(loss.device), loss, 0.0).sum().backward()
            if handover:
                self.gns.accumulate({n: p.grad for n, p in params.items() if p.grad is not None})
                for p in params.values():
                    p.grad = None
            total += loss.detach().float()
        if handover:
            for name, g in self.gns.accumulated().items():
                params[name].grad = g
        return total.cpu()

    def _grad_norms(self) -> torch.Tensor:
        """Per-member global gradient norm (K,): the clipping input, one read of the grads."""
        norms = [torch.linalg.vector_norm(p.grad.flatten(1), dim=1, dtype=torch.float32)
                 for p in self.model.parameters() if p.grad is not None]
        return torch.stack(norms).pow(2).sum(0).sqrt().cpu()

    @torch.no_grad()
    def evaluate(self) -> torch.Tensor:
        """Mean validation loss per member over the fixed validation set.

        Each window's mean loss is kept in `val_windows` (K, eval_seqs): the bootstrap
        (`trajinv.data.bootstrap`) resamples those."""
        self.model.eval()
        total, count, windows = torch.zeros(self.K), 0, []
        for x, y in self.val:
            with _autocast(self.cfg):
                _, tok = self.model(x.to(self.cfg.device), y.to(self.cfg.device), reduction="none")
            n, t = x.shape
            loss = tok.reshape(self.K, n * t).mean(1)  # exactly the model's mean loss
            windows.append(tok.mean(2).float().cpu())
            total += loss.float().cpu() * n
            count += n
        self.model.train()
        self.val_windows = torch.cat(windows, dim=1)
        return total / count

    def train(self, progress=None, until: int | None = None) -> list[MemberResult]:
        """Run from the current step to cfg.steps (or to step `until`, to pause early).

        `progress(step)` is called after each step.
        """
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        clock = time.perf_counter() - self.seconds
        with open(self.run_dir / METRICS, "a") as f:
            stop = cfg.steps if until is None else min(until, cfg.steps)
            while self.step < stop and bool(self.alive.any()):
                step = self.step
                bs = self.plan.at(step)
                mult = lr_multiplier(step, cfg.steps, cfg.schedule)
                measured = self.gns is not None and self.gns.begin_step(
                    step, self.optimizer.preconditioners() if self.gns.wants_preconditioner(step) else None)
                loss = self._forward_backward(step, bs)
                finite = torch.isfinite(loss)
                newly_dead = self.alive & ~finite
                self.alive &= finite
                grad_norm = self._grad_norms()
                if not bool(self.alive.all()):
                    dead = ~self.alive.to(cfg.device)
                    for p in self.model.parameters():
                        if p.grad is not None:
                            p.grad.masked_fill_(dead.view(-1, *([1] * (p.dim() - 1))), 0.0)
                clip = torch.ones(self.K)
                if cfg.optim.clip > 0:
                    clip = torch.clamp(cfg.optim.clip / (grad_norm + 1e-6), max=1.0)
                clip = torch.where(self.alive, torch.nan_to_num(clip, nan=0.0), 0.0)
                done = step + 1
                evaluated = done % cfg.eval_every == 0 or done == cfg.steps
                logging = evaluated or done % cfg.log_every == 0 or bool(newly_dead.any())
                # Statistics cost extra passes on CPU: ask for them only when logged or measured.
                emit = self.gns is not None and self.gns.wants_preconditioner(done)
                stats = self.optimizer.step(mult, clip.to(cfg.device), stats=logging or measured,
                                            emit_preconditioner=emit)
                gns = None
                if measured:
                    gns = self.gns.end_step(step, bs, cfg.micro_batch or bs, stats)
                    self.last_gns = {k: gns[k].float() for k in ("b_precond_smooth", "b_simple_smooth")}
                self.step = done
                self.tokens += bs * cfg.model.context
                self.seconds = time.perf_counter() - clock
                self.last_train = torch.where(finite, loss, self.last_train)
                if evaluated:
                    self.last_val = torch.where(self.alive, self.evaluate(), self.last_val)
                    boot = torch.from_numpy(boot_means(self.val_windows, self.boot_counts))
                    self.last_boot = torch.where(self.alive[:, None], boot, self.last_boot)
                if logging:
                    self._write_metrics(f, mult, bs, loss, grad_norm, stats, gns, evaluated, newly_dead)
                    f.flush()  # a checkpoint never runs ahead of the metrics it resumes from
                if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
                    self.save()
                if progress is not None:
                    progress(self.step)
        if not bool(self.alive.any()):
            self.save()
        return self.results()

    def _write_metrics(self, f, mult, bs, loss, grad_norm, stats, gns, evaluated, newly_dead) -> None:
        sums = dict(zip(STAT_FIELDS, stats.totals().cpu()))
        se = boot_se(self.last_boot.numpy())
        for k, m in enumerate(self.cfg.members):
            if not (self.alive[k] or newly_dead[k]):
                continue
            rec = {"run_id": self.run_id, "member": k, "name": m.name, "step": self.step, "tokens": self.tokens,
                   "lr": m.lr * mult, "base_lr": m.lr, "wd": m.wd, "elr": m.elr, "batch_size": bs,
                   "batch_schedule": str(self.batches),
                   "train_loss": _num(loss[k]), "val_loss": _num(self.last_val[k]) if evaluated else None,
                   "grad_norm": _num(grad_norm[k]), "precond_grad_norm": _num(sums["precond_grad_sq"][k].sqrt()),
                   "weight_norm": _num(sums["param_sq"][k].sqrt()), "update_norm": _num(sums["update_sq"][k].sqrt()),
                   "seconds": round(self.seconds, 3), "status": "diverged" if newly_dead[k] else "running"}
            if self.cfg.eval_boot:
                # Rounded to 1e-6 nat: far below any spread's noise, and a third of the bytes.
                boot = [round(float(v), 6) for v in self.last_boot[k]] if evaluated else None
                rec["val_loss_boot"] = boot if boot and all(map(math.isfinite, boot)) else None
                rec["val_loss_se"] = _num(se[k]) if evaluated else None
            if gns is not None:
                rec.update({f"gns_{key}" if "norm" in key else key: _num(gns[key][k]) for key in LOG_KEYS})
                rec["gns_w_identity"] = bool(gns["w_identity"][k])
            f.write(json.dumps(rec) + "\n")

    def results(self) -> list[MemberResult]:
        out = []
        for k, m in enumerate(self.cfg.members):
            status = "diverged" if not self.alive[k] else ("done" if self.step >= self.cfg.steps else "running")
            extra = {}
            if "b_precond_smooth" in self.last_gns:
                b = _num(self.last_gns["b_precond_smooth"][k])
                extra = {"b_precond": b, "b_simple": _num(self.last_gns["b_simple_smooth"][k]),
                         "batch_regime": "" if b is None else ("small" if self.batches.sizes[-1] < b else "large")}
            out.append(MemberResult(m.name, m.lr, m.wd, status, self.step, self.tokens,
                                    _num(self.last_train[k]), _num(self.last_val[k]), extra))
        return out


def _num(x) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None
