"""One population over several ranks: `torchrun --nproc-per-node N -m trajinv train ...`.

`DistContext` is what the Trainer needs to know about the other ranks, read from
the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
The process group is torch.distributed's: gloo on CPU, NCCL on CUDA (each rank
on GPU LOCAL_RANK). With WORLD_SIZE 1 (or no torchrun) the context is inactive
and the Trainer runs exactly as a single process.

What the Trainer does with it (`trajinv.train`, the lines marked "scale-out"):

* **Data.** Every rank draws the step's *global* batch with `sample_batch(seed,
  step)` exactly as one process would and keeps its contiguous share (`shard`),
  so the ranks together see the single process's batch, and a resumed or
  re-sized run sees the same data.
* **Gradients.** Each micro-batch's mean loss is weighted by its share of the
  *global* batch (b_m / B), so a rank's accumulated gradient is its part of the
  global mean; one all-reduce (SUM) of all gradients per step, one flat buffer
  per (device, dtype), gives every rank the single process's gradient (the
  average of the ranks' local mean gradients), up to fp32 summation order.
  Per-member clipping then reads the reduced gradient, so every rank clips,
  steps and stays identical. Losses are reduced the same way (divergence is
  decided on the global loss, identically on every rank); the validation set is
  split over ranks and its sums reduced.
* **Why not `DistributedDataParallel`.** Its reducer overlaps communication with
  the backward but owns `.grad` and reduces inside the backward; the GNS meter
  takes each micro-batch's `.grad` over, and the noise scale needs each rank's
  local gradient *before* the reduction. An explicit all-reduce after local
  accumulation moves the same bytes as DDP under `no_sync()` with one reduction
  per step; it gives up only the overlap with the last backward.
* **Gradient noise scale across ranks, at no extra pass.** A rank's local
  gradient is a small batch of the global one. In `--gns micro-batch` mode the
  meter already adds the squared norms (plain and W-weighted, W the optimizer's
  preconditioner, identical on every rank) of every gradient it accumulates;
  those sums are all-reduced before the estimator, which then sees
  B / B_small small batches of B_small sequences: B_small = the micro-batch when
  the ranks also accumulate micro-batches (more, smaller small batches: the
  same split as one process with that micro-batch), else the rank's local
  batch B / world (nanoGNS's and AdaptDL's estimator: the norm of each rank's
  gradient before the all-reduce). Per-example mode sums its probes over ranks
  the same way. The big batch is the reduced gradient the optimizer's
  statistics already measure.
* **Files.** Rank 0 writes metrics, checkpoints and summary.csv; every rank
  loads the checkpoint on resume (the run directory must be on storage all
  ranks see when they span nodes).
* **Bad configurations** (a batch not divisible into world size x micro-batch)
  are refused by `check` before the process group starts, on every rank, with
  the same one-line error.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from trajinv.config import TrainConfig
from trajinv.parallel.devices import check_device
from trajinv.schedules import BatchSchedule


@dataclass
class DistContext:
    """This process's place among the ranks training one population."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE): each needs a GPU of its own under CUDA."""
    backend: str | None = field(default=None, compare=False)
    """'gloo' or 'nccl' once `start` has run (None before, and when inactive)."""

    @classmethod
    def from_env(cls, env: dict | None = None) -> DistContext:
        """The context torchrun describes in the environment; inactive (rank 0 of 1) without it."""
        env = os.environ if env is None else env
        try:
            rank, world, local = (int(env.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
            local_world = int(env.get("LOCAL_WORLD_SIZE", local + 1))  # a launcher without it: this rank's need
        except ValueError:
            said = " ".join(f"{k}={env.get(k)!r}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
                            if k in env)
            raise ValueError(f"bad torchrun environment {said}") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world}")
        return cls(rank, world, local, local_world)

    def __post_init__(self) -> None:
        self.local_world_size = max(self.local_world_size, self.local_rank + 1)  # at least this rank's GPUs

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files."""
        return self.rank == 0

    def check(self, cfg: TrainConfig) -> None:
        """One-line ValueError (the same on every rank) unless every batch of the schedule splits into
        world_size ranks x whole micro-batches."""
        if not self.active:
            return
        if cfg.device == "cuda":  # `start` sets this rank's GPU: torch's failure there is a traceback
            try:  # the node's last GPU, so that every rank fails alike (rank 0 waited in the group for the rest)
                check_device(f"cuda:{self.local_world_size - 1}")
            except ValueError as e:
                raise ValueError(f"{self.local_world_size} ranks on this node need a GPU each: {e}") from None
        unit = self.world_size * (cfg.micro_batch or 1)
        for b in BatchSchedule.parse(cfg.batch_size).sizes:
            if b % unit:
                what = f"{self.world_size} ranks" + (f" x micro-batches of {cfg.micro_batch}" if cfg.micro_batch else "")
                raise ValueError(f"batch size {b} does not split into {what}; use a multiple of {unit}")

    def start(self, device: str) -> None:
        """Join the process group (idempotent): gloo on CPU, NCCL on CUDA with this rank's GPU."""
        if not self.active or self.backend is not None:
            return
        import torch.distributed as dist

        self.backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(self.local_rank)
        # torch.distributed.nn's functions default to `group=group.WORLD`, evaluated when it is first imported
        # (by the first torch.optim optimizer, through torch._dynamo): imported after the group starts, they
        # hold it for good, `close` cannot free it, and its gloo threads met the interpreter's exit (a rank
        # aborted: "terminate called without an active exception"). Imported now, they hold None.
        import torch.distributed.nn as _defaults_bound_now  # noqa: F401 (`as`: a bare import binds `torch` here)
        if not dist.is_initialized():
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size)

    def close(self) -> None:
        """Leave the process group (if this context started one)."""
        import torch.distributed as dist

        if self.backend is not None and dist.is_initialized():
            # every rank past its last collective first: a rank that tore its gloo group down while
            # the other still used it aborted ("terminate called without an active exception")
            dist.barrier()
            dist.destroy_process_group()
        self.backend = None

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    # ------------------------------------------------------------- the step
    def shard(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of `batch_size` sequences."""
        local = batch_size // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)

    def small_batch(self, batch_size: int, micro_batch: int) -> int:
        """B_small of the micro-batch GNS estimator: the micro-batch if set, else the rank's local batch
        (the whole batch for a single process, as before)."""
        return micro_batch or batch_size // self.world_size

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place (a host tensor goes through the device under NCCL)."""
        import torch.distributed as dist

        if not self.active or t.numel() == 0:
            return t
        if self.backend == "nccl" and t.device.type != "cuda":
            dev = t.to(f"cuda:{torch.cuda.current_device()}")
            dist.all_reduce(dev)
            return t.copy_(dev)
        dist.all_reduce(t)
        return t

    def all_reduce_grads_(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every `.grad` over ranks: one flat buffer per (device, dtype), one all-reduce each."""
        if not self.active:
            return
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in groups.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            self.all_reduce_(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


SINGLE = DistContext()
"""The context of an ordinary single-process run."""


def refuse_ranks(command: str) -> None:
    """One-line ValueError when a sweep or tune runs under torchrun: each rank would train every population
    into the same directory (both ranks appended to one metrics.jsonl, a line interleaved mid-record).
    torchrun splits one population over ranks: that is `trajinv train`."""
    try:  # WORLD_SIZE alone: a scheduler may set RANK for its own reasons
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return
    if world > 1:
        raise ValueError(f"trajinv {command} does not run under torchrun (WORLD_SIZE={world}): every rank "
                         f"would train the whole {command} into one directory; spread its populations with "
                         "--devices or --ray, and use torchrun for trajinv train")


def setup(cfg: TrainConfig, data_cfg):
    """For a command under torchrun: the context from the environment, the configuration and the data
    checked and loaded on every rank before any rank waits on another (so a bad value fails on each rank
    with its one line, and no rank hangs), then the process group joined. Returns (context, data).

    Ranks that find no token cache tokenize concurrently; the cache's atomic writes make that safe."""
    from trajinv.data import load_data

    ctx = DistContext.from_env()
    ctx.check(cfg)
    data = load_data(data_cfg)
    ctx.start(cfg.device)
    return ctx, data
