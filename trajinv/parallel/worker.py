"""One population trained where a worker runs it: the unit of work of the process pool and of Ray.

`run_job` builds the Trainer, resumes from the run directory's checkpoint and
trains to the end, as the sequential sweep does for each population, and sends
progress events through `emit`. It never raises for a failure of the training
itself: the error comes back in the `Outcome` (and its traceback in
`runs/<run_id>/error.log`), so the parent can record it in summary.csv and let
the other populations finish. Killed workers are the caller's to report
(`failed_outcome`).
"""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trajinv.checkpoint import latest_meta
from trajinv.config import DataConfig, TrainConfig

ERROR_LOG = "error.log"
Emit = Callable[..., None]


@dataclass(frozen=True)
class Job:
    """One population of a sweep."""

    run_id: str
    cfg: TrainConfig
    run_dir: str
    data: DataConfig


@dataclass
class Outcome:
    """What a worker hands back: the population's summary rows, or its error."""

    run_id: str
    rows: list[dict] = field(default_factory=list)
    skipped: bool = False
    """The population was already finished (a rerun)."""
    error: str | None = None
    """One line: the exception type and message, or how the worker died."""


class Throttle:
    """Batches 'advance' events (one per step) into one per `every` seconds: a queue put per step
    of a tiny model would cost more than the step."""

    def __init__(self, emit: Emit, every: float = 0.25):
        self.emit, self.every, self.steps, self.last = emit, every, 0, time.monotonic()

    def advance(self, steps: int = 1) -> None:
        self.steps += steps
        if time.monotonic() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.steps:
            self.emit("advance", steps=self.steps)
        self.steps, self.last = 0, time.monotonic()


_DATA: dict[DataConfig, object] = {}


def _data(cfg: DataConfig):
    """Token data, opened once per worker process (the parent has already built the cache)."""
    from trajinv.data import load_data

    if cfg not in _DATA:
        _DATA[cfg] = load_data(cfg)
    return _DATA[cfg]


def run_job(job: Job, emit: Emit) -> Outcome:
    """Train (or resume, or skip if finished) one population; failures come back as `Outcome.error`."""
    throttle = Throttle(emit)
    try:
        # the trainer lives in _train's frame: gone when it returns or its exception is handled, so the
        # memory of a population that failed (out of memory, say) is free before the next one is sized
        return _train(job, emit, throttle)
    except Exception as e:  # noqa: BLE001 - any failure of one population is recorded, the sweep goes on
        throttle.flush()
        Path(job.run_dir).mkdir(parents=True, exist_ok=True)
        Path(job.run_dir, ERROR_LOG).write_text(traceback.format_exc())
        # its message may name the population already (DeviceOutOfMemory): once is enough
        return failed_outcome(job, f"{type(e).__name__}: {_first_line(e).removeprefix(f'{job.run_id}: ')}")
    finally:
        _release_cuda()


def _train(job: Job, emit: Emit, throttle: Throttle) -> Outcome:
    from trajinv.sweep import summary_rows
    from trajinv.train import Trainer

    trainer = Trainer(job.cfg, _data(job.data), job.run_dir, run_id=job.run_id)
    trainer.resume()
    done = trainer.finished()
    emit("population", run_id=job.run_id, skipped=done, members=len(job.cfg.members))
    emit("advance", steps=job.cfg.steps if done else trainer.step)
    if not done:
        trainer.train(progress=lambda step: throttle.advance())
    throttle.flush()
    Path(job.run_dir, ERROR_LOG).unlink(missing_ok=True)
    return Outcome(job.run_id, summary_rows(job.run_id, job.cfg, trainer.results()), skipped=done)


def failed_outcome(job: Job, error: str) -> Outcome:
    """Summary rows of a failed population: its members, the step its last checkpoint reached, the error."""
    from trajinv.config import elr_columns

    meta = latest_meta(job.run_dir) or {}
    step, tokens = meta.get("step", 0), meta.get("tokens", 0)
    rows = [{"run_id": job.run_id, "member": k, "name": m.name, "lr": m.lr, "wd": m.wd,
             **elr_columns(job.cfg, m), "batch_size": job.cfg.batch_size, "steps": step, "tokens": tokens,
             "final_train_loss": None, "final_val_loss": None, "status": "failed", "error": error}
            for k, m in enumerate(job.cfg.members)]
    return Outcome(job.run_id, rows, error=error)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _release_cuda() -> None:
    import torch

    if torch.cuda.is_initialized():
        gc.collect()  # tensors held only by reference cycles (a traceback's frames) first
        torch.cuda.empty_cache()  # an out-of-memory population leaves nothing behind for the next
