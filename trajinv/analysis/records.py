"""Read what a sweep wrote: metric records, the summary table, and per-member curves.

Sweep directory layout (written by the sweep engine)::

    <out>/summary.csv                 one row per member
    <out>/runs/<run_id>/metrics.jsonl one JSON object per logged step per member

Everything downstream (`invariance`, `plots`) works on the records these
functions return, so it can be tested on synthetic curves and reused on partial
(still running) sweeps.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from trajinv.metrics import METRICS

MemberKey = tuple[str, int]
"""A member is identified by (run_id, member index inside that run)."""

REL_TOL = 1e-6
"""Relative tolerance under which two lr (or ELR) values count as equal:
lr * wd computed in floating point (0.008 * 0.5 vs 0.004 * 1) differs in the
last bits, a real grid never places two values within a millionth."""

_DIVERGENCE_KEYS = ("train_loss",)
"""Besides the analysed metric, a non-finite value of these marks a member as
diverged: a blown-up training loss ruins the later validation values too."""

_LOSS_KEYS = ("val_loss", "train_loss")
"""Metrics in nats per token: a member whose last one is no better than a uniform
guess over the vocabulary (ln V, when the records carry ``vocab_size``) counts as
diverged, as `trajinv tune` counts it: a loss of 1,000 is finite but not an outcome."""


def chance_loss(vocab_size: int | None) -> float | None:
    """ln V: the loss of a uniform guess over V tokens (None when V is unknown)."""
    return math.log(vocab_size) if vocab_size else None


# --------------------------------------------------------------------------- I/O


def load_metrics(sweep_dir: str | Path) -> list[dict]:
    """All metric records of all runs of a sweep, in file order.

    Reads ``<sweep_dir>/runs/*/metrics.jsonl`` (and ``<sweep_dir>/metrics.jsonl``
    so a single run directory works too). A truncated last line, as a run that
    is still writing leaves it, is skipped; a malformed line elsewhere is an
    error naming the file and line.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory not found: {str(root)!r}")
    files = sorted(root.glob(f"runs/*/{METRICS}"))
    if (root / METRICS).is_file():
        files.insert(0, root / METRICS)
    records: list[dict] = []
    for path in files:
        records.extend(_read_jsonl(path))
    if not records:
        raise ValueError(f"no metric records in {str(root)!r} (expected runs/<run_id>/{METRICS})")
    return records


def _read_jsonl(path: Path) -> Iterator[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)  # json accepts the NaN/Infinity that Python's json writes
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return  # a half-written final line of a live run
            raise ValueError(f"malformed JSON at {path}:{i + 1}") from None
        if not isinstance(rec, dict):
            raise ValueError(f"expected a JSON object at {path}:{i + 1}, got {type(rec).__name__}")
        rec.setdefault("run_id", path.parent.name)
        yield rec


def load_summary(sweep_dir: str | Path) -> list[dict]:
    """Rows of ``<sweep_dir>/summary.csv``, numbers converted to int/float.

    Empty cells become None; text (name, status, batch_regime) stays text.
    """
    path = Path(sweep_dir) / "summary.csv"
    if not path.is_file():
        raise FileNotFoundError(f"summary not found: {str(path)!r}")
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: _parse_cell(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


_TEXT_COLUMNS = {"run_id", "name", "status", "batch_regime"}


def _parse_cell(col: str, v: str | None):
    if v is None or v == "":
        return None
    if col in _TEXT_COLUMNS:
        return v  # a run_id like "0001" must stay text to match the metrics
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


# ------------------------------------------------------------------------ curves


X_AXES = ("step", "tokens")
"""Positions a curve can be read at: optimizer steps, or tokens trained (to compare
populations with different batch-size schedules at equal data)."""


@dataclass(frozen=True)
class Curve:
    """One member's metric against step, with its hyperparameters.

    ``steps``/``values`` hold only finite logged values (null and NaN dropped);
    ``diverged`` says whether a non-finite loss was ever logged. ``tokens`` and
    ``boot`` are aligned with ``steps`` (None when some logged point lacks them).
    """

    run_id: str
    """The population (run) the member trained in; with ``member`` it names the member."""
    member: int
    name: str
    lr: float
    """Base (peak) learning rate, not the scheduled value of a given step."""
    wd: float
    elr: float
    batch_size: int | None
    steps: np.ndarray
    values: np.ndarray
    diverged: bool = False
    batch_schedule: str | None = None
    """The population's batch-size schedule as logged ('32', '32@0.1,256'); for records written
    before it was logged, the batch sizes seen in order ('32', '32,256'; fractions unknown)."""
    tokens: np.ndarray | None = None
    """Tokens trained at each logged step."""
    boot: np.ndarray | None = None
    """(len(steps), B): the metric under B fixed resamples of the validation windows at each
    logged step (``<key>_boot`` records; the same resamples for every member)."""

    @property
    def key(self) -> MemberKey:
        return (self.run_id, self.member)

    def axis(self, x: str = "step") -> np.ndarray:
        """Logged positions in units of ``x`` ("step" or "tokens")."""
        if x not in X_AXES:
            raise ValueError(f"x must be one of {X_AXES}, got {x!r}")
        if x == "step":
            return self.steps
        if self.tokens is None:
            raise ValueError(f"member {self.name!r} has no logged tokens to put on a tokens axis")
        return self.tokens

    def at(self, pos: float, x: str = "step") -> float:
        """Value at ``pos`` (a step, or tokens with x="tokens"): exact if logged there,
        linear interpolation between logged points, NaN outside the logged range."""
        grid = self.axis(x)
        if len(grid) == 0 or pos < grid[0] or pos > grid[-1]:
            return math.nan
        return float(np.interp(pos, grid, self.values))

    def boot_at(self, pos: float, x: str = "step") -> np.ndarray | None:
        """The B resampled values at ``pos``, interpolated like ``at`` with the same weights
        for every resample (so resample b stays the mean over index set b); None when
        not logged or outside the logged range."""
        grid = self.axis(x)
        if self.boot is None or len(grid) == 0 or pos < grid[0] or pos > grid[-1]:
            return None
        i = int(np.searchsorted(grid, pos, side="left"))
        if grid[i] == pos:
            return self.boot[i]
        w = (pos - grid[i - 1]) / (grid[i] - grid[i - 1])
        return (1 - w) * self.boot[i - 1] + w * self.boot[i]

    def step_at(self, pos: float, x: str = "step") -> float:
        """The step at which the member reached ``pos`` (interpolated between logged points)."""
        return float(pos) if x == "step" else float(np.interp(pos, self.axis(x), self.steps))

    def select(self, mask: np.ndarray) -> "Curve":
        """The curve restricted to the logged points where ``mask`` is true (every aligned array)."""
        return replace(self, steps=self.steps[mask], values=self.values[mask],
                       tokens=None if self.tokens is None else self.tokens[mask],
                       boot=None if self.boot is None else self.boot[mask])


def curves(
    records: Iterable[dict], key: str = "val_loss", diverged: Iterable[MemberKey] = ()
) -> dict[MemberKey, Curve]:
    """Group records into one Curve per (run_id, member), sorted by step.

    Records whose ``key`` is null or missing are skipped (validation is only
    evaluated every few steps). A member is flagged diverged when ``key`` or
    the training loss is non-finite in any record, when a record says
    ``status: diverged``, or when listed in ``diverged``. ``<key>_boot`` lists
    (the validation-window bootstrap) become ``Curve.boot``.
    """
    bad = {(str(r), int(m)) for r, m in diverged}
    acc: dict[MemberKey, dict] = {}
    for rec in records:
        mk = (str(rec.get("run_id", "")), int(rec.get("member", 0)))
        c = acc.get(mk)
        if c is None:
            missing = [k for k in ("step", "wd") if rec.get(k) is None]
            if rec.get("base_lr") is None and rec.get("lr") is None:
                missing.append("base_lr")
            if missing:
                raise ValueError(f"metric record of run {mk[0]!r} member {mk[1]} lacks {', '.join(missing)}")
            lr = float(rec["base_lr"] if rec.get("base_lr") is not None else rec["lr"])
            wd = float(rec["wd"])
            elr = float(rec["elr"]) if rec.get("elr") is not None else lr * wd
            c = acc[mk] = {
                "name": str(rec.get("name") or f"lr={lr:g},wd={wd:g}"),
                "lr": lr, "wd": wd, "elr": elr,
                "batch_size": rec.get("batch_size"), "schedule": rec.get("batch_schedule"), "seen": [],
                "points": {}, "tokens": {}, "boot": {}, "diverged": mk in bad,
                "chance": chance_loss(rec.get("vocab_size")),
            }
        bs = rec.get("batch_size")
        if bs is not None and (not c["seen"] or c["seen"][-1] != int(bs)):
            c["seen"].append(int(bs))
        if rec.get("status") == "diverged" or any(_nonfinite(rec.get(k)) for k in (key, *_DIVERGENCE_KEYS)):
            c["diverged"] = True
        v = rec.get(key)
        if v is not None and not _nonfinite(v):
            step = int(rec["step"])
            c["points"][step] = float(v)
            if rec.get("tokens") is not None:
                c["tokens"][step] = int(rec["tokens"])
            boot = rec.get(f"{key}_boot")
            if isinstance(boot, list) and boot and not any(b is None or _nonfinite(b) for b in boot):
                c["boot"][step] = boot
    if not acc:
        raise ValueError("no metric records to analyse")
    names = [c["name"] for c in acc.values()]
    out: dict[MemberKey, Curve] = {}
    for mk, c in sorted(acc.items()):
        steps = np.array(sorted(c["points"]), dtype=np.int64)
        if key in _LOSS_KEYS and c["chance"] is not None and len(steps) and c["points"][int(steps[-1])] >= c["chance"]:
            c["diverged"] = True
        name = c["name"] if names.count(c["name"]) == 1 else f"{mk[0]}/{c['name']}"
        schedule = c["schedule"] or (",".join(map(str, c["seen"])) if c["seen"] else None)
        out[mk] = Curve(
            run_id=mk[0], member=mk[1], name=name, lr=c["lr"], wd=c["wd"], elr=c["elr"],
            batch_size=None if c["batch_size"] is None else int(c["batch_size"]),
            steps=steps, values=np.array([c["points"][s] for s in steps], dtype=np.float64),
            diverged=c["diverged"], batch_schedule=None if schedule is None else str(schedule),
            tokens=_aligned(c["tokens"], steps, np.int64), boot=_aligned(c["boot"], steps, np.float64),
        )
    return out


def _aligned(points: dict, steps: np.ndarray, dtype) -> np.ndarray | None:
    """The values of ``points`` at every step, or None if one is missing (or boot lengths differ)."""
    if len(steps) == 0 or any(int(s) not in points for s in steps):
        return None
    try:
        return np.array([points[int(s)] for s in steps], dtype=dtype)
    except ValueError:  # ragged resample lists
        return None


def _nonfinite(v) -> bool:
    return isinstance(v, (int, float)) and not math.isfinite(v)
