"""The trainer: one population of K members, checkpointed and resumable.

Members share the model architecture, the batches (common random numbers) and
the batch-size schedule; they differ in lr and wd only. One forward/backward of
batched matmuls serves them all, one optimizer step updates them all.

Determinism: the batch of step s is drawn from a generator seeded by (seed, s),
so the data position is the step counter; with the model, optimizer and
estimator state restored from a checkpoint, a resumed run reproduces the
uninterrupted one bit for bit on CPU.

Crash consistency (docs/design.md, "Determinism and resume"): metrics are flushed
and fsynced before a checkpoint commits; `resume` removes what interrupted writes
left, loads the newest valid checkpoint and rewrites `metrics.jsonl` atomically to
exactly its lines up to that checkpoint's step; a run with no checkpoint starts its
metrics afresh.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from trajinv.checkpoint import (CheckpointError, clean_run_dir, has_checkpoint, load_checkpoint, newest_sidecar,
                                prune_older, save_checkpoint, sidecar_name)
from trajinv.config import PARAM_KINDS, TrainConfig, describe_differences, same_run, to_dict
from trajinv.data import TokenData, boot_means, sample_batch, validation_batches, window_resamples
from trajinv.data.batches import check_validation
from trajinv.gns.estimator import REGIME_LR_FRACTION, regime_batch
from trajinv.gns.meter import GNSMeter
from trajinv.metrics import METRICS, MetricsLog, num, step_records  # noqa: F401 - METRICS: trajinv.train.METRICS
from trajinv.model import GPT, param_kind
from trajinv.optim.population import build_optimizer
from trajinv.parallel.ddp import SINGLE, DistContext
from trajinv.parallel.devices import check_device
from trajinv.rundirs import refuse_other
from trajinv.schedules import BatchSchedule, lr_multiplier



@dataclass
class MemberResult:
    """Where one member ended."""

    name: str
    lr: float
    wd: float
    status: str  # 'done', 'diverged' or 'running' (stopped early)
    steps: int
    """Steps trained: a diverged member's is the step its loss turned non-finite."""
    tokens: int
    """Tokens trained, through `steps`."""
    train_loss: float | None
    val_loss: float | None
    extra: dict = field(default_factory=dict)
    """More summary columns (e.g. the gradient noise scale) when measured."""


def _autocast(cfg: TrainConfig):
    if cfg.dtype == "bf16":
        return torch.autocast(device_type=cfg.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


DATA_IDENTITY = ("content_hash", "tokenizer", "text_field", "val_fraction", "max_tokens")
"""The corpus manifest's fields a checkpoint keeps, so that a resume on other data is refused."""

EVAL_CHUNK = 64
"""Most validation sequences evaluated in one forward (fewer when training's forward is smaller)."""


def data_identity(data: TokenData) -> dict:
    """What makes the corpus this one (`DATA_IDENTITY` of its manifest): a moved file with the same text,
    or a tokenizer.json moved or reached by another path (its sha256 names it), is the same corpus."""
    out = {k: data.manifest.get(k) for k in DATA_IDENTITY}
    if isinstance(out["tokenizer"], dict):
        out["tokenizer"] = {k: v for k, v in out["tokenizer"].items() if k != "path"}
    return out


def _check_sidecar_fields(meta: dict, sidecar: Path) -> None:
    """CheckpointError unless a sidecar has what the trainer keeps there, with plausible tokens and seconds."""
    missing = [k for k in ("run_id", "tokens", "seconds", "config") if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint sidecar {sidecar} lacks the key(s) {', '.join(map(repr, missing))}")
    for key in ("tokens", "seconds"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], (int, float)) or meta[key] < 0:
            raise CheckpointError(f"checkpoint sidecar {sidecar} has a bad {key} {meta[key]!r}")


def _settle_at(metrics: MetricsLog, run_dir: Path, step: int, keep: int) -> None:
    """A run directory as a run goes on from (or ends at) its checkpoint of `step`: metrics.jsonl cut to that
    step (a malformed line before it is a ValueError) and, by the writer, the checkpoints before the newest
    `keep` dropped (a --keep-checkpoints lowered since the last save: a finished run saves no more)."""
    metrics.rewrite_to(step)
    if metrics.writer:  # scale-out: rank 0 (`MetricsLog(writer=dist.is_main)`)
        prune_older(run_dir, step, keep)


def data_warnings(cfg: TrainConfig, data: TokenData) -> list[str]:
    """What `cfg` probably does not mean on this corpus (printed, never refused): more training tokens than
    the corpus holds, so its text comes round again (the model partly learns it by heart)."""
    tokens, corpus = cfg.batch_plan().tokens, int(data.train.size)
    if tokens <= corpus:
        return []
    return [f"a member trains on {tokens:,} tokens, {tokens / corpus:.1f}x the corpus's {corpus:,} training tokens: "
            "its text comes round again, and the losses then also measure memorisation; give more data (--data) "
            "or fewer steps"]


_BUILDING = "while building the model or loading its checkpoint"  # `Trainer._fits`'s place for both


class DeviceOutOfMemory(MemoryError):
    """A population too large for its device, in one line: who, where it stopped, what to change."""


def out_of_memory_words(e: BaseException) -> str | None:
    """torch's first two sentences when `e` is an out-of-memory error (CUDA's, or the CPU allocator's
    RuntimeError), else None. CUDA's message runs on for a paragraph about the allocator's state."""
    text = str(e).strip()
    if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text):
        return None
    said = (text.splitlines() or [type(e).__name__])[0].split(". ")
    first = next((i for i, s in enumerate(said) if "out of memory" in s or "can't allocate" in s), 0)
    return ". ".join(said[first : first + 2]).rstrip(".")


class Trainer:
    """Trains `cfg.members` on `data`, writing metrics and checkpoints into `run_dir`."""

    @staticmethod
    def check(cfg: TrainConfig, data: TokenData, dist: DistContext | None = None) -> TrainConfig:
        """Validate `cfg` against `data` (and the ranks of `dist`) without building anything; returns
        it with the data's vocabulary filled in. Raises ValueError naming the bad value."""
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=cfg.model.vocab_size or data.vocab_size))
        cfg.validate()
        dist = dist or SINGLE
        dist.check(cfg)
        if data.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"data vocabulary {data.vocab_size} exceeds model vocab_size {cfg.model.vocab_size}")
        # here, not when the Trainer builds its validation set: a sweep or tune has written its spec by then,
        # and the corrected --eval-seqs was refused as "another spec"
        check_validation(data.val, cfg.model.context, cfg.eval_seqs)
        check_device(cfg.device)
        on_cuda = cfg.device == "cuda"
        if cfg.kernels == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            # Triton launches on CUDA tensors; CPU tensors only under the interpreter
            raise ValueError("--kernels triton on --device cpu needs TRITON_INTERPRET=1 (the CPU interpreter); "
                             "on CPU use --kernels auto")
        if cfg.kernels == "cpu" and on_cuda:  # else the optimizer refused it at the first step, run dir written
            raise ValueError("--kernels cpu is the CPU path; on --device cuda use --kernels auto or triton")
        batches = BatchSchedule.parse(cfg.batch_size)
        if cfg.gns.mode == "micro-batch":
            for b in batches.sizes:
                small = dist.small_batch(b, cfg.micro_batch)  # scale-out: a rank's batch is a small batch
                if not small or b % small or b // small < 2:
                    raise ValueError(f"GNS micro-batch mode needs --micro-batch dividing batch size {b} "
                                     f"into >= 2 micro-batches, got micro_batch={cfg.micro_batch}")
        return cfg

    def __init__(self, cfg: TrainConfig, data: TokenData, run_dir: str | Path, run_id: str = "run",
                 dist: DistContext | None = None):
        """`dist`: the ranks this population is data-parallel over (trajinv.parallel.ddp); None = one process."""
        self.dist = dist or SINGLE
        cfg = self.check(cfg, data, self.dist)
        self.dist.start(cfg.device)  # after the checks: a bad value fails on every rank before any waits
        self.cfg, self.data, self.run_id = cfg, data, run_id
        self.data_identity = data_identity(data)  # kept in every checkpoint, compared on resume
        self.run_dir = Path(run_dir)
        refuse_other(self.run_dir, "train")  # a sweep's or a tune's directory: its files are not a run's
        self.metrics = MetricsLog(self.run_dir, writer=self.dist.is_main)  # scale-out: rank 0 writes
        self.batches = BatchSchedule.parse(cfg.batch_size)
        self.plan = cfg.batch_plan()  # steps per batch-size stage: from cfg.tokens or cfg.steps
        self.K = len(cfg.members)
        dev = torch.device(cfg.device)
        with self._fits(_BUILDING):
            self.model = GPT(cfg.model, members=self.K, seed=cfg.seed).to(dev)
            self.optimizer = build_optimizer(self.model, cfg.members, cfg.optim, backend=cfg.kernels)
        self.kinds = {kind: [n for n, p in self.model.named_parameters() if param_kind(n, p) == kind]
                      for kind in PARAM_KINDS}
        self.gns = None
        if cfg.gns.enabled:
            self.gns = GNSMeter(dict(self.model.named_parameters()), self.K, cfg.gns, self.model.probes,
                                backend=cfg.kernels, eps=cfg.optim.eps)
        self.last_gns: dict[str, torch.Tensor] = {}
        # b_precond_robust at the last measured step with lr >= REGIME_LR_FRACTION of the peak: the regime's
        # statistic (trajinv.gns.estimator, "The regime"); NaN until such a step
        self.regime_b = torch.full((self.K,), math.nan)
        self.lrs = torch.tensor([m.lr for m in cfg.members])
        self.wds = torch.tensor([m.wd for m in cfg.members])
        # evaluated in chunks no larger than a (rank's) training forward: the population was sized to fit
        # that (trajinv.parallel.memory), and 64 sequences of K members' logits did not fit a GPU sized for less
        forward = max(1, self.dist.small_batch(max(BatchSchedule.parse(cfg.batch_size).sizes), cfg.micro_batch))
        self.val = validation_batches(data.val, cfg.model.context, cfg.eval_seqs, batch_size=min(EVAL_CHUNK, forward))
        self.boot_counts = window_resamples(cfg.eval_seqs, cfg.eval_boot)
        self.val_windows = torch.full((self.K, cfg.eval_seqs), math.nan)
        self.step = 0
        self.tokens = 0
        self.seconds = 0.0
        self.alive = torch.ones(self.K, dtype=torch.bool)
        self.last_train = torch.full((self.K,), math.nan)
        self.last_val = torch.full((self.K,), math.nan)
        self.last_boot = torch.full((self.K, cfg.eval_boot), math.nan, dtype=torch.float64)
        # where each member stopped when its loss turned non-finite (step, tokens); -1 while alive
        self.diverged_at = torch.full((2, self.K), -1, dtype=torch.int64)
        self._saved_step = -1
        self._resume_asked = False  # resume() was called: train() may then start a fresh run here

    # ----------------------------------------------------------------- state
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        t = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        t.update({f"optim.{k}": v for k, v in self.optimizer.state_tensors().items()})
        t["alive"] = self.alive.to(torch.uint8)
        t["diverged_at"] = self.diverged_at
        t["last_train"], t["last_val"], t["last_boot"] = self.last_train, self.last_val, self.last_boot
        # no global RNG state: training draws only from its own seeded generators, and the global one's
        # (seeded at random per process) made two identical runs' checkpoints differ
        if self.gns is not None:
            t.update({f"gns.{k}": v for k, v in self.gns.state_dict().items()})
            t.update({f"last_gns.{k}": v for k, v in self.last_gns.items()})
            t["regime_b"] = self.regime_b
        return t

    def save(self) -> None:
        if not self.dist.is_main:  # scale-out: rank 0 writes
            return
        meta = {"run_id": self.run_id, "tokens": self.tokens, "seconds": self.seconds, "config": to_dict(self.cfg),
                "data": self.data_identity}
        if self.finished():  # read back by `finished_results` without building the model; `extra` as pairs,
            # in order (the sidecar's keys are sorted, and they are summary.csv's columns)
            meta["results"] = [dict(asdict(r), extra=list(r.extra.items())) for r in self.results()]
        save_checkpoint(self.run_dir, self.step, self._state_tensors(), meta, keep=self.cfg.keep_checkpoints)
        self._saved_step = self.step

    def has_checkpoint(self) -> bool:
        return has_checkpoint(self.run_dir)

    def resume(self) -> bool:
        """Continue from the run directory's newest valid checkpoint, if there is one.

        Removes leftovers of interrupted writes first. A damaged newest checkpoint is
        reported (one line on stderr) and the one before is used. With a checkpoint,
        `metrics.jsonl` is rewritten atomically to exactly its lines up to the
        checkpoint's step; without one, `train` starts the metrics afresh.
        Raises ValueError for a checkpoint of another configuration or a metrics line
        that is not JSON (other than a half-written last line, which is dropped with a note).
        """
        self._resume_asked = True
        if not self.run_dir.is_dir():
            return False
        clean_run_dir(self.run_dir)
        with self._fits(_BUILDING):  # the state's tensors land on the device here
            ckpt = load_checkpoint(self.run_dir, check_meta=self._check_meta, check_tensors=self._load_state)
        if ckpt is None:
            return False
        _, meta = ckpt
        self.step, self.tokens, self.seconds = meta["step"], meta["tokens"], meta["seconds"]
        # the run keeps its id when its folder is renamed (`train` names a run after its --out folder)
        self.run_id = str(meta["run_id"])
        self._saved_step = self.step
        _settle_at(self.metrics, self.run_dir, self.step, self.cfg.keep_checkpoints)
        return True

    def finished(self) -> bool:
        """Whether training is over: every step taken, or every member diverged."""
        return self.step >= self.cfg.steps or not bool(self.alive.any())

    @staticmethod
    def finished_results(cfg: TrainConfig, data: TokenData, run_dir: str | Path) -> list[MemberResult] | None:
        """`results()` of a finished run, read from its last checkpoint's sidecar without building the model
        or loading a tensor: a rerun of a finished sweep or tune then costs no device time and starts no
        worker. None unless the newest checkpoint ended the run, is intact by every check that reads no
        tensor (`checkpoint.newest_sidecar`), and was trained with this config (`same_run`) on this data;
        then build a Trainer and `resume`, which sorts out every other case (an older checkpoint, another
        configuration, a checkpoint of an earlier trajinv). Tidies the run directory as `resume` does."""
        run_dir = Path(run_dir)
        meta = newest_sidecar(run_dir)
        cfg = Trainer.check(cfg, data)  # the config as a Trainer holds it (the data's vocabulary filled in)
        try:
            if meta is None:
                return None
            _check_sidecar_fields(meta, run_dir / sidecar_name(meta["step"]))
            if not same_run(meta["config"], to_dict(cfg)) or meta.get("data") != data_identity(data):
                return None
            results = [MemberResult(**dict(r, extra=dict(r["extra"]))) for r in meta["results"]]
        except (KeyError, TypeError, ValueError):  # no results (not finished, or an earlier trajinv's), or damaged
            return None
        if [(r.name, r.lr, r.wd) for r in results] != [(m.name, m.lr, m.wd) for m in cfg.members]:
            return None
        clean_run_dir(run_dir)
        _settle_at(MetricsLog(run_dir), run_dir, meta["step"], cfg.keep_checkpoints)
        return results

    def _check_meta(self, meta: dict, sidecar: Path) -> None:
        _check_sidecar_fields(meta, sidecar)
        if not same_run(meta["config"], to_dict(self.cfg)):
            # named as a sweep or a tune names a changed spec: `train.` then the field, there and here
            differs = describe_differences({"train": meta["config"]}, {"train": to_dict(self.cfg)})
            raise ValueError(f"checkpoint in {self.run_dir} was made by a different configuration"
                             + (f" ({differs})" if differs else "") + "; use a new output directory")
        # the corpus is not in the config: a resume on other data trained on, silently (older
        # checkpoints, without "data", are taken as they are)
        if isinstance(meta.get("data"), dict) and meta["data"] != self.data_identity:
            differs = describe_differences({"data": meta["data"]}, {"data": self.data_identity})
            raise ValueError(f"checkpoint in {self.run_dir} was trained on other data ({differs}); resume with "
                             "the same --data, --tokenizer and --text-field, or use a new output directory")

    def _load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Put a checkpoint's tensors in place; CheckpointError if they do not fit this run.

        A failure part-way is harmless: the older checkpoint then tried overwrites every part."""
        where = self.run_dir / meta["tensor_file"]
        K = self.K
        want = {f"model.{k}": tuple(v.shape) for k, v in self.model.state_dict().items()}
        want.update({"alive": (K,), "last_train": (K,), "last_val": (K,), "last_boot": tuple(self.last_boot.shape)})
        for key, shape in want.items():
            t = tensors.get(key)
            if t is None or tuple(t.shape) != shape:
                got = "missing" if t is None else f"shape {tuple(t.shape)}"
                raise CheckpointError(f"checkpoint tensor file {where}: tensor {key!r} is {got}, expected {shape}")
        try:
            self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            self.optimizer.load_state_tensors({k[6:]: v for k, v in tensors.items() if k.startswith("optim.")})
            if self.gns is not None:
                self.gns.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("gns.")})
                self.last_gns = {k[9:]: v for k, v in tensors.items() if k.startswith("last_gns.")}
                # older checkpoints have none: NaN, and the summary falls back to the last robust value
                self.regime_b = tensors.get("regime_b", torch.full((K,), math.nan)).float().reshape(K)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint tensor file {where} does not fit this run ({reason})") from None
        self.alive = tensors["alive"].bool()
        self.last_train, self.last_val = tensors["last_train"], tensors["last_val"]
        self.last_boot = tensors["last_boot"]
        at = tensors.get("diverged_at")
        if at is None or tuple(at.shape) != (2, K):  # older checkpoints: the step of the checkpoint
            at = torch.where(self.alive, -1, torch.tensor([[meta["step"]], [meta["tokens"]]], dtype=torch.int64))
        self.diverged_at = at.to(torch.int64)

    # ------------------------------------------------------------- training
    def _forward_backward(self, step: int, batch_size: int) -> torch.Tensor:
        """Mean train loss per member (K,) over the step's batch, on the device; gradients in .grad.

        The trainer owns `.grad`: it clears them here, and when the GNS meter sums the
        micro-batches itself (micro-batch mode) it hands each micro-batch's gradients
        over and puts the step's sums back at the end."""
        cfg = self.cfg
        x, y = sample_batch(self.data.train, batch_size, cfg.model.context, cfg.seed, step)
        rows = self.dist.shard(batch_size)  # scale-out: this rank's share of the global batch
        x, y = x[rows].to(cfg.device), y[rows].to(cfg.device)
        micro = cfg.micro_batch or x.shape[0]
        total = torch.zeros(self.K, device=cfg.device)
        params = dict(self.model.named_parameters())
        for p in params.values():
            p.grad = None
        handover = self.gns is not None and self.gns.accumulates
        alive = self.alive.to(cfg.device)  # once per step, not a host-to-device copy per micro-batch
        for start in range(0, x.shape[0], micro):
            xs, ys = x[start : start + micro], y[start : start + micro]
            with _autocast(cfg):
                _, loss = self.model(xs, ys)
            # Each micro-batch's mean loss weighted by its share: the sum is the batch mean.
            loss = loss * (xs.shape[0] / batch_size)
            # Diverged members are frozen: keep their NaNs out of the backward.
            torch.where(alive, loss, 0.0).sum().backward()
            if handover:
                self.gns.accumulate({n: p.grad for n, p in params.items() if p.grad is not None})
                for p in params.values():
                    p.grad = None
            total += loss.detach().float()
        if handover:
            for name, g in self.gns.accumulated().items():
                params[name].grad = g
        if self.dist.active:  # scale-out: sum the ranks' shares (gradients, loss, GNS small-batch sums)
            self.dist.all_reduce_grads_(params.values())
            self.dist.all_reduce_(total)
            if self.gns is not None:
                self.gns.reduce(self.dist.all_reduce_)
        if handover:  # the global batch's gradient, after the all-reduce (a rank's own was a small batch)
            self.gns.big_batch({n: p.grad for n, p in params.items() if p.grad is not None})
        return total

    def _grad_norms(self) -> torch.Tensor:
        """Per-member global gradient norm (K,) on the device: the clipping input, one read of the grads."""
        # Summed tensor by tensor, elementwise over members: a reduction over a stacked (tensors, K)
        # column runs in another order when K = 1 (contiguous) than when K > 1 (strided), and the
        # last-bit difference in the clip scale made a member's run depend on its population's size.
        sq = torch.zeros(self.K, dtype=torch.float32, device=self.cfg.device)
        for p in self.model.parameters():
            if p.grad is not None:
                sq += torch.linalg.vector_norm(p.grad.flatten(1), dim=1, dtype=torch.float32).square()
        return sq.sqrt()

    @torch.no_grad()
    def evaluate(self) -> torch.Tensor:
        """Mean validation loss per member over the fixed validation set.

        Each window's mean loss is kept in `val_windows` (K, eval_seqs): the bootstrap
        (`trajinv.data.bootstrap`) resamples those."""
        self.model.eval()
        total, count = torch.zeros(self.K), 0
        windows = torch.zeros(self.K, sum(x.shape[0] for x, _ in self.val))
        start = 0
        for i, (x, y) in enumerate(self.val):
            n, t = x.shape
            if i % self.dist.world_size == self.dist.rank:  # scale-out: ranks split the set
                with _autocast(self.cfg):
                    _, tok = self.model(x.to(self.cfg.device), y.to(self.cfg.device), reduction="none")
                loss = tok.reshape(self.K, n * t).mean(1)  # exactly the model's mean loss
                windows[:, start : start + n] = tok.mean(2).float().cpu()
                total += loss.float().cpu() * n
                count += n
            start += n
        if self.dist.active:  # every rank gets the whole set's sums and per-window losses
            total = self.dist.all_reduce_(torch.cat([total, torch.tensor([float(count)])]))
            total, count = total[:-1], int(total[-1])
            windows = self.dist.all_reduce_(windows)
        self.model.train()
        self.val_windows = windows
        return total / count

    def train(self, progress=None, until: int | None = None) -> list[MemberResult]:
        """Run from the current step to cfg.steps (or to step `until`, to pause early).

        `progress(step)` is called after each step.
        """
        if self.step == 0 and not self._resume_asked and self.has_checkpoint():
            # starting afresh would replace that run's metrics and checkpoints (the CLI's --resume rule)
            raise ValueError(f"{self.run_dir} already holds a run; call resume() first to continue it, "
                             "or train into another directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self._fits():
            return self._train(progress, until)

    @contextlib.contextmanager
    def _fits(self, where: str | None = None):
        """torch's out-of-memory errors as one `DeviceOutOfMemory` line that names the population, `where`
        (default: the step being trained) and what to change (a long CUDA message and a traceback told a
        sweep's user neither). Nested, the innermost names the place: its error is no RuntimeError."""
        try:
            yield
        except RuntimeError as e:
            said = out_of_memory_words(e)
            if said is None:
                raise
        else:
            return
        where = where or f"in step {self.step + 1}"
        # a checkpoint fixes its population's members: a smaller --population splits only the others
        fixed = (f" (this population has checkpointed, so its members stay together: move {self.run_dir} aside "
                 "first)") if self.has_checkpoint() else ""
        raise DeviceOutOfMemory(f"{self.run_id}: {self.K} member{'s' * (self.K != 1)} ran out of {self.cfg.device} "
                                f"memory {where} ({said}); train fewer members at once (--population of sweep "
                                f"and tune{fixed}) or use a smaller --micro-batch")

    def _train(self, progress, until: int | None) -> list[MemberResult]:
        cfg = self.cfg
        clock = time.perf_counter() - self.seconds
        # From step 0 the metrics start afresh: lines of an attempt that never checkpointed go.
        with self.metrics.open(fresh=self.step == 0) as log:
            stop = cfg.steps if until is None else min(until, cfg.steps)
            while self.step < stop and bool(self.alive.any()):
                step = self.step
                bs = self.plan.at(step)
                mult = lr_multiplier(step, cfg.steps, cfg.schedule)
                measured = self.gns is not None and self.gns.begin_step(
                    step, self.optimizer.preconditioners() if self.gns.wants_preconditioner(step) else None)
                # one wait for the device per step: the loss and the gradient norm come back together
                loss, grad_norm = torch.stack([self._forward_backward(step, bs), self._grad_norms()]).cpu()
                # a gradient norm past fp32's range diverged too, even under a finite loss: its clip
                # coefficient would be 0, which the optimizers read as "frozen" (no update) or "unclipped"
                finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
                newly_dead = self.alive & ~finite
                self.alive &= finite
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
                    gns = self.gns.end_step(step, bs, self.dist.small_batch(bs, cfg.micro_batch), stats)
                    # a diverged member's stay as they were when it stopped (its NaN estimates emptied the
                    # robust window 32 measured steps on, while the smoothed ones kept their last value)
                    self.last_gns = {k: gns[k].float() if k not in self.last_gns
                                     else torch.where(self.alive, gns[k].float(), self.last_gns[k])
                                     for k in ("b_precond_smooth", "b_simple_smooth", "b_precond_robust")}
                    if mult >= REGIME_LR_FRACTION:  # a NaN reading (nothing resolved) keeps the last one
                        robust = self.last_gns["b_precond_robust"]
                        self.regime_b = torch.where(self.alive & ~robust.isnan(), robust, self.regime_b)
                self.step = done
                self.tokens += bs * cfg.model.context
                self.seconds = time.perf_counter() - clock
                self.last_train = torch.where(finite, loss, self.last_train)
                self.diverged_at[0, newly_dead] = done
                self.diverged_at[1, newly_dead] = self.tokens
                if evaluated:
                    with self._fits(f"in the evaluation after step {done}"):
                        self.last_val = torch.where(self.alive, self.evaluate(), self.last_val)
                    boot = torch.from_numpy(boot_means(self.val_windows, self.boot_counts))
                    self.last_boot = torch.where(self.alive[:, None], boot, self.last_boot)
                if logging:
                    log.write(step_records(self, mult, bs, loss, grad_norm, stats, gns, evaluated, newly_dead))
                if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
                    log.sync()
                    self.save()
                if progress is not None:
                    progress(self.step)
            if not bool(self.alive.any()) and self._saved_step != self.step:
                log.sync()
                self.save()
        return self.results()

    def results(self) -> list[MemberResult]:
        out = []
        for k, m in enumerate(self.cfg.members):
            status = "diverged" if not self.alive[k] else ("done" if self.step >= self.cfg.steps else "running")
            extra = {}
            if "b_precond_smooth" in self.last_gns:
                extra = {"b_precond": num(self.last_gns["b_precond_smooth"][k]),
                         "b_simple": num(self.last_gns["b_simple_smooth"][k])}
                # The label comes from the robust statistic (trajinv.gns.estimator, "The regime"), so a few
                # spiky steps cannot decide it, read before an annealing lr's tail inflates it.
                robust = self.last_gns.get("b_precond_robust")
                end = math.nan if robust is None else float(robust[k])
                # NaN: no finite reading at that lr (an older checkpoint's run, or --gns-every measured none there)
                regime = float(self.regime_b[k])
                regime = end if math.isnan(regime) else regime
                extra["b_precond_robust"], extra["b_precond_regime"] = num(end), num(regime)
                # +inf (no signal resolved above the noise) is as small a batch as there is
                extra["batch_regime"] = "" if math.isnan(regime) else (
                    "small" if regime_batch(self.batches.sizes) < regime else "large")
            steps, tokens = self.step, self.tokens
            if not self.alive[k] and int(self.diverged_at[0, k]) >= 0:
                steps, tokens = int(self.diverged_at[0, k]), int(self.diverged_at[1, k])
            out.append(MemberResult(m.name, m.lr, m.wd, status, steps, tokens,
                                    num(self.last_train[k]), num(self.last_val[k]), extra))
        return out
