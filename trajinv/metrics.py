"""A run's metrics file: one JSON line per logged step per member, kept consistent with its checkpoints.

``metrics.jsonl`` is appended while training (one process writes it; other ranks of a
data-parallel run hold a null log), flushed after each logged step and fsynced before a
checkpoint commits, so a checkpoint never runs ahead of its metrics. Resuming from
the checkpoint of step s rewrites the file atomically to exactly its lines with
step <= s (a kill during the rewrite leaves the old file); a run without a usable
checkpoint starts the file afresh. Every failed write names the file.

What a line holds is `step_records`: per member the step, tokens, scheduled and base
lr, wd, ELR, batch size and schedule, train loss, validation loss (with its bootstrap
resamples and SE at evals), gradient norms, weight and update norms (total and per
parameter kind), the gradient noise scale when measured, wall-clock seconds, status.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from trajinv.atomic import atomic_write
from trajinv.data import boot_se
from trajinv.gns.meter import LOG_KEYS
from trajinv.optim.population import STAT_FIELDS

METRICS = "metrics.jsonl"


def num(x: Any) -> float | None:
    """A finite float, or None (JSON null) for nan and inf."""
    v = float(x)
    return v if math.isfinite(v) else None


class MetricsLog:
    """``metrics.jsonl`` of one run directory; `writer=False` (other ranks) writes nothing."""

    def __init__(self, run_dir: str | Path, writer: bool = True) -> None:
        self.path = Path(run_dir) / METRICS
        self.writer = writer
        self._f: IO[str] | None = None

    @contextlib.contextmanager
    def open(self, fresh: bool) -> Iterator[MetricsLog]:
        """The file for appending, or truncated when `fresh` (a run from step 0 starts it afresh)."""
        with open(self.path if self.writer else os.devnull, "w" if fresh else "a") as f:
            self._f = f
            try:
                yield self
            finally:
                self._f = None

    @contextlib.contextmanager
    def _naming_errors(self) -> Iterator[None]:
        """A failed write (a full disk) names the file."""
        try:
            yield
        except OSError as e:
            if e.filename is None:
                e.filename = str(self.path)
            raise

    def write(self, records: list[dict]) -> None:
        """Append `records` as JSON lines and flush them to the OS."""
        with self._naming_errors():
            self._f.write("".join(json.dumps(rec) + "\n" for rec in records))
            self._f.flush()

    def sync(self) -> None:
        """On disk (fsync) before a checkpoint commits."""
        if not self.writer:
            return
        with self._naming_errors():
            self._f.flush()
            os.fsync(self._f.fileno())

    def rewrite_to(self, step: int) -> None:
        """Keep exactly the lines with step <= `step`, atomically (a kill leaves the old file).

        A last line that is not JSON (half-written: full disk, host crash) is dropped with a
        note on stderr, and so is one after a record past `step` (lines are written in step
        order, so it is past the checkpoint too: dropped anyway, and after a host crash lines
        written since the last fsync may be garbage); a bad line elsewhere is a ValueError
        naming the file and line."""
        if not self.writer:
            return
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        lines = raw.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()  # the file ends with a newline
        keep = []
        past = False  # a record past `step` has been read: what follows is past it too
        for i, line in enumerate(lines):
            try:
                rec_step = json.loads(line)["step"]
                if isinstance(rec_step, bool) or not isinstance(rec_step, int):
                    raise TypeError
            except (ValueError, KeyError, TypeError, IndexError):
                if past:
                    print(f"note: dropped the malformed line {i + 1} of {self.path}, past the checkpoint's "
                          f"step {step}", file=sys.stderr, flush=True)
                    continue
                if i == len(lines) - 1:
                    print(f"note: dropped the half-written last line {i + 1} of {self.path}", file=sys.stderr,
                          flush=True)
                    break
                raise ValueError(f"malformed metrics line {self.path}:{i + 1} (not a JSON record with a step); "
                                 "fix or delete that line to resume") from None
            if rec_step <= step:
                keep.append(line)
            else:
                past = True
        new = b"".join(line + b"\n" for line in keep)
        if new != raw:
            atomic_write(self.path, lambda f: f.write(new))


def step_records(run, mult: float, bs: int, loss, grad_norm, stats, gns: dict | None, evaluated: bool,
                 newly_dead) -> list[dict]:
    """The lines of one logged step of `run` (a `trajinv.train.Trainer`): one per member that is
    alive or diverged at this step. `stats`: the optimizer's ParamStats of the step; `gns`: the
    meter's estimates when the step was measured."""
    sums = dict(zip(STAT_FIELDS, stats.totals().cpu()))
    se = boot_se(run.last_boot.numpy())
    # per parameter kind: the weight norm and the step's update norm, the phase analysis' input
    by_kind = {kind: stats.totals(names)[2:].sqrt().cpu() for kind, names in run.kinds.items()}
    # where the member is, as summary.csv says where it ended: done on the run's last step
    alive_status = "done" if run.step >= run.cfg.steps else "running"
    out = []
    for k, m in enumerate(run.cfg.members):
        if not (run.alive[k] or newly_dead[k]):
            continue
        rec = {"run_id": run.run_id, "member": k, "name": m.name, "step": run.step, "tokens": run.tokens,
               "lr": m.lr * mult, "base_lr": m.lr, "wd": m.wd, "elr": run.cfg.optim.peak_decay(m),
               "batch_size": bs, "batch_schedule": str(run.batches), "vocab_size": run.cfg.model.vocab_size,
               "train_loss": num(loss[k]), "val_loss": num(run.last_val[k]) if evaluated else None,
               "grad_norm": num(grad_norm[k]), "precond_grad_norm": num(sums["precond_grad_sq"][k].sqrt()),
               "weight_norm": num(sums["param_sq"][k].sqrt()), "update_norm": num(sums["update_sq"][k].sqrt()),
               **{f"{what}_norm_{kind}": num(v[i, k]) for kind, v in by_kind.items()
                  for i, what in enumerate(("weight", "update"))},
               "seconds": round(run.seconds, 3), "status": "diverged" if newly_dead[k] else alive_status}
        if run.cfg.eval_boot:
            # Rounded to 1e-6 nat: far below any spread's noise, and a third of the bytes.
            boot = [round(float(v), 6) for v in run.last_boot[k]] if evaluated else None
            rec["val_loss_boot"] = boot if boot and all(map(math.isfinite, boot)) else None
            rec["val_loss_se"] = num(se[k]) if evaluated else None
        if gns is not None:
            rec.update({f"gns_{key}" if "norm" in key else key: num(gns[key][k]) for key in LOG_KEYS})
            rec["gns_w_identity"] = bool(gns["w_identity"][k])
        elif run.last_gns:
            # a logged step that was not measured (--gns-every N): the running estimates as they stand,
            # which no step between measurements moves (the raw ones belong to measured steps only)
            rec.update({key: num(v[k]) for key, v in run.last_gns.items()})
        out.append(rec)
    return out
