"""Functions that run in processes the tests spawn (pool workers, DDP ranks).

A spawned process imports its target by module and name, so these live in an
importable module (tests/ is on sys.path), not in the test files.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch


# ------------------------------------------------------------------ pool tasks
def fail_second_population(job, emit):
    """A pool task: run id '...-p1' fails inside the worker (its Trainer raises), the others train normally."""
    from dataclasses import replace

    from trajinv.parallel.worker import run_job

    if job.run_id.endswith("-p1"):
        job = replace(job, cfg=replace(job.cfg, device="tpu"))
    return run_job(job, emit)


def second_population_out_of_memory(job, emit):
    """A pool task: the population '...-p1' runs out of memory in its first step (torch's CUDA error)."""
    import torch

    from trajinv.parallel.worker import run_job
    from trajinv.train import Trainer

    if not job.run_id.endswith("-p1"):
        return run_job(job, emit)

    def fail(self, step, bs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB. GPU 0 has ...")

    kept, Trainer._forward_backward = Trainer._forward_backward, fail
    try:
        return run_job(job, emit)
    finally:  # the worker may train another population next
        Trainer._forward_backward = kept


def kill_second_population(job, emit):
    """A pool task: the worker of run id '...-p1' dies by SIGKILL (as under the out-of-memory killer)."""
    from trajinv.parallel.worker import run_job

    if job.run_id.endswith("-p1"):
        os.kill(os.getpid(), signal.SIGKILL)
    return run_job(job, emit)


def record_pid_and_sleep(path):
    """A pool call: write this worker's pid to `path`, then sleep far longer than any test waits."""
    import time

    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(300)


def report_pinning(job, emit):
    """A pool task: where the worker runs (affinity, torch threads, CUDA_VISIBLE_DEVICES)."""
    from trajinv.parallel.worker import Outcome

    return Outcome(job.run_id, [{"run_id": job.run_id, "cores": sorted(os.sched_getaffinity(0)),
                                 "threads": torch.get_num_threads(),
                                 "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}])


# ------------------------------------------------------------------- DDP ranks
def ddp_rank(rank: int, world: int, port: int, cfg, run_dir: str, out: str, until: int | None) -> None:
    """One rank of a gloo process group: train `cfg` (resuming from `run_dir`) to `until` (None = the end),
    then save this rank's last gradients, per-member losses and weights to `out/rank<r>.pt`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from trajinv.data import DataConfig, load_data
    from trajinv.parallel.ddp import DistContext
    from trajinv.train import Trainer

    ctx = DistContext(rank=rank, world_size=world, local_rank=rank)
    trainer = Trainer(cfg, load_data(DataConfig(max_tokens=200_000)), run_dir, dist=ctx)
    trainer.resume()
    trainer.train(until=until)
    ctx.close()
    threads = [(Path("/proc/self/task") / t / "comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    torch.save({"grads": {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None},
                "weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                "last_gns": trainer.last_gns, "step": trainer.step, "threads_after_close": threads},
               os.path.join(out, f"rank{rank}.pt"))
