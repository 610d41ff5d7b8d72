"""Sweeps over lr x wd (x batch size) and iso-ELR lines, trained as populations.

Members that share a batch-size schedule (and so the same batches and length)
train together as one population: one model with a member axis, one optimizer
launch per step. The output directory holds

    spec.json                      the sweep spec; a rerun must match it (but for its population
                                   size: `plan_populations`)
    summary.csv                    one row per member (rewritten after each population)
    runs/<run_id>/metrics.jsonl    one line per logged step per member
    runs/<run_id>/checkpoint*      resumable state

Rerunning the same command resumes: finished populations are skipped,
unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from trajinv.atomic import atomic_write, remove_stale_temps
from trajinv.checkpoint import LEGACY_SIDECAR, has_checkpoint, latest_meta
from trajinv.config import Member, TrainConfig, describe_differences, elr_columns, sweep_pairs, to_dict
from trajinv.data import DataConfig, TokenData, load_data
from trajinv.parallel import memory
from trajinv.parallel.ddp import refuse_ranks
from trajinv.parallel.devices import check_device
from trajinv.parallel.worker import ERROR_LOG
from trajinv.rundirs import SWEEP_SPEC, hold, refuse_other, trained_split
from trajinv.schedules import BatchSchedule
from trajinv.train import MemberResult, Trainer, data_warnings

SPEC = SWEEP_SPEC  # trajinv.rundirs: every command knows the others' markers
SUMMARY = "summary.csv"
SUMMARY_FIELDS = ["run_id", "member", "name", "lr", "wd", "elr", "tau_iter", "tau_fraction", "batch_size", "steps",
                  "tokens", "final_train_loss", "final_val_loss", "status"]


def log2_range(text: str) -> tuple[float, ...]:
    """'-12:-8' -> 2^-12, 2^-11, ..., 2^-8 (inclusive, step 1); '-12:-8:0.5' sets the step."""
    try:
        parts = [float(p) for p in text.split(":")]
        lo, hi = parts[0], parts[1]
        step = parts[2] if len(parts) == 3 else 1.0
        if len(parts) not in (2, 3) or not all(map(math.isfinite, parts)) or step <= 0 or hi < lo:
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"bad log2 range {text!r}; use LO:HI or LO:HI:STEP with LO <= HI") from None
    n = int(math.floor((hi - lo) / step + 1e-9)) + 1
    if n > 10_000:
        raise ValueError(f"log2 range {text!r} has {n} values; at most 10000")
    try:
        return tuple(2.0 ** (lo + i * step) for i in range(n))
    except OverflowError:
        raise ValueError(f"log2 range {text!r} overflows a float (2^{hi:g}); keep LO and HI within -1074..1023") from None


DEMO_LRS = (4e-3, 8e-3, 1.6e-2)
DEMO_WDS = (0.5, 1.0, 2.0)
"""`trajinv sweep`'s grid when an axis is left out: the CPU demo's 3 x 3, iso-LR and iso-ELR groups."""


def distinct_batch_sizes(batch_sizes: Sequence[str]) -> tuple[str, ...]:
    """`batch_sizes` without repeats ('4' and '04', '4@.5,8' and '4@0.5,8' are one), as first given."""
    first: dict[str, str] = {}
    for b in batch_sizes:
        first.setdefault(str(BatchSchedule.parse(b)), b)
    return tuple(first.values())


def default_axes(lrs: Sequence[float], wds: Sequence[float], elrs: Sequence[float]
                 ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(lrs, wds) with each axis left out filled from the demo grid; ELR lines need no wd."""
    return tuple(lrs) or DEMO_LRS, tuple(wds) or (() if elrs else DEMO_WDS)


@dataclass(frozen=True)
class SweepSpec:
    """What to sweep; everything not listed here comes from `train`."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Shared training settings; its `members` and `batch_size` are replaced per population."""
    data: DataConfig = field(default_factory=DataConfig)
    """The corpus every population trains on."""
    lrs: tuple[float, ...] = ()
    """Learning rates of the lr x wd grid (and of the iso-ELR lines)."""
    wds: tuple[float, ...] = ()
    """Weight decays of the lr x wd grid."""
    elrs: tuple[float, ...] = ()
    """Iso-ELR lines: for each value, one member per lr with wd = elr / lr (wd = elr with
    `--decay-mode independent`, whose decay per step is wd)."""
    points: tuple[tuple[float, float], ...] = ()
    """Explicit (lr, wd) members, besides the grid and the lines (what `trajinv tune` trains)."""
    batch_sizes: tuple[str, ...] = ("32",)
    """Batch sizes or batch-size schedules; each is its own population."""
    population: int = 0
    """Most members trained together; 0 = as many as fit the device's free memory (all of a batch size
    if they fit), spread over the workers of --devices or a Ray cluster (`memory.spread_size`); a
    rerun without it keeps the stored size once a population has checkpointed. A rerun
    may change it (smaller, after running out of memory): checkpointed populations keep their members,
    the others are split anew (`plan_populations`)."""

    def members(self) -> tuple[Member, ...]:
        pairs = sweep_pairs(self.lrs, self.wds, self.elrs, self.points, self.train.optim.decay_mode)
        return tuple(Member(lr, wd) for lr, wd in pairs)

    def validate(self) -> None:
        if not self.lrs and not self.points:
            raise ValueError("a sweep needs at least one lr")
        if self.lrs and not (self.wds or self.elrs):
            raise ValueError("a sweep needs weight decays (--wd) or iso-ELR values (--elr)")
        for v in self.elrs:
            if not v > 0:
                raise ValueError(f"elr must be positive, got {v}")
        if self.population < 0:
            raise ValueError(f"population must be >= 0, got {self.population}")
        for b in self.batch_sizes:
            BatchSchedule.parse(b)
        # a repeat is one population under one run id: trained once, listed twice in summary.csv
        if len(distinct_batch_sizes(self.batch_sizes)) < len(self.batch_sizes):
            raise ValueError(f"batch_sizes {self.batch_sizes!r} repeat a batch size; give each once")
        members = self.members()  # validates every lr and wd
        for b in self.batch_sizes:  # each population's schedule must fit the run's steps or tokens
            replace(self.train, members=members, batch_size=b).validate()

    def populations(self) -> list[tuple[str, TrainConfig]]:
        """(run_id, config) per population, in a stable order."""
        members = self.members()
        size = self.population or len(members)
        out = []
        for bs in self.batch_sizes:
            for i in range(0, len(members), size):
                chunk = members[i : i + size]
                run_id = f"bs{_tag(bs)}" + (f"-p{i // size}" if size < len(members) else "")
                out.append((run_id, replace(self.train, members=chunk, batch_size=bs)))
        return out


class SpecMismatch(ValueError):
    """`out` holds a sweep made by another spec; `differences` names the fields (there, here)."""

    def __init__(self, out: Path, differences: str):
        super().__init__(f"{out} holds a sweep made by another spec ({differences}); use a new --out directory")
        self.differences = differences


def _check_spec(out: Path, spec: SweepSpec) -> dict | None:
    """The spec stored in `out` when it is this one (None when there is none); ValueError if it holds
    another (nothing written)."""
    path = out / SPEC
    if not path.exists():
        return None
    try:
        stored = theirs = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is not valid JSON; fix or remove it, or use a new --out directory") from None
    mine = json.loads(json.dumps(to_dict(spec)))
    if isinstance(theirs, dict):  # how the members are grouped is not what they are (plan_populations)
        theirs, mine = ({k: v for k, v in d.items() if k != "population"} for d in (theirs, mine))
    if differences := describe_differences(theirs, mine):
        raise SpecMismatch(out, differences)
    return stored


def _regroup(out: Path, spec: SweepSpec, pops: list[tuple[str, TrainConfig]], resized: bool) -> None:
    """Clear what the plan (`plan_populations`) no longer trains. Run directories without a checkpoint hold
    metrics of attempts that never checkpointed (a resume drops them too) and failed populations' error.log:
    those outside the plan go, and after a change of population size (`resized`) those in it too (the
    name may now hold other members); spec.json then records the size. summary.csv keeps the rows of
    checkpointed populations (the rest are written again as their populations finish), so analysis never
    reads a member twice or under another population's indices. A checkpointed run is never touched."""
    planned = {run_id for run_id, _ in pops}
    for d in (out / "runs").glob("*"):
        if d.is_dir() and not has_checkpoint(d) and (resized or d.name not in planned):
            shutil.rmtree(d)
    if resized:
        summary = out / SUMMARY
        if summary.is_file():
            with summary.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if has_checkpoint(out / "runs" / r.get("run_id", ""))]
            write_summary(out, rows)
        atomic_write(out / SPEC, lambda f: f.write(json.dumps(to_dict(spec), indent=1)), mode="w")


def write_summary(out: Path, rows: list[dict]) -> Path:
    """summary.csv, atomically (a crash never leaves half a table)."""
    path = out / SUMMARY
    extra = [k for row in rows for k in row if k not in SUMMARY_FIELDS]
    fields = SUMMARY_FIELDS + list(dict.fromkeys(extra))

    def write(f) -> None:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)

    atomic_write(path, write, mode="w", newline="")
    return path


def summary_rows(run_id: str, cfg: TrainConfig, results: list[MemberResult]) -> list[dict]:
    """One row per member. elr is the decay per step at the peak lr (lr*wd; wd in independent mode:
    `OptimConfig.peak_decay`), tau_iter = 1/elr the weight-decay EMA's timescale in steps (empty without
    weight decay) and tau_fraction = tau_iter / the run's steps: the optimum sits at a fixed share of
    the run (trajinv.tune.fit, "Enough iterations")."""
    return [{"run_id": run_id, "member": k, "name": r.name, "lr": r.lr, "wd": r.wd,
             **elr_columns(cfg, Member(r.lr, r.wd)), "batch_size": cfg.batch_size, "steps": r.steps,
             "tokens": r.tokens, "final_train_loss": r.train_loss, "final_val_loss": r.val_loss, "status": r.status, **r.extra}
            for k, r in enumerate(results)]


def prepare_sweep(spec: SweepSpec, out: Path, held: ExitStack | None = None
                  ) -> tuple[TokenData, list[tuple[str, TrainConfig]]]:
    """Check `spec` against `out` and the data, then (only then) create `out` and write its spec.json:
    a sweep that fails its checks leaves nothing behind to block the corrected command. With `held`,
    `out` is locked (`rundirs.hold`) until it closes, before anything in it changes.
    Returns the data and the populations (run_id, config): `plan_populations`."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a directory")
    refuse_other(out, "sweep")
    stored = _check_spec(out, spec)
    if stored is not None:
        trained_split(out)  # trained runs beside an unreadable population: refused, before anything moves
    pops = spec.populations() if stored is None else plan_populations(spec, out)
    data = load_data(spec.data)
    for _, cfg in pops:
        Trainer.check(cfg, data)
    out.mkdir(parents=True, exist_ok=True)
    if held is not None:
        hold(out, held)  # another command training here: refused before a file is removed or rewritten
    remove_stale_temps(out)
    if stored is None:
        atomic_write(out / SPEC, lambda f: f.write(json.dumps(to_dict(spec), indent=1)), mode="w")
    else:
        _regroup(out, spec, pops, stored.get("population") != spec.population)
    return data, pops


def plan_populations(spec: SweepSpec, out: Path) -> list[tuple[str, TrainConfig]]:
    """The populations (run_id, config) of a sweep that exists in `out`.

    A population with a checkpoint keeps its run id and members (its checkpoint holds them). When those
    are chunks of `spec.populations()` (a plain resume), that is the plan. Otherwise the population size
    changed after some trained (say one ran out of memory while others finished on other devices): the
    members no trained population holds are chunked by `spec.population` into new run ids, numbered after
    the trained ones of their batch size (`bs<tag>-p<i>`). On CPU a member's numbers never depend on its
    population (docs/design.md, "Population independence")."""
    plain = spec.populations()
    trained = _trained_groups(out)
    chunks = {run_id: (cfg.batch_size, cfg.members) for run_id, cfg in plain}
    if all(chunks.get(run_id) == group for run_id, group in trained.items()):
        return plain
    members, pops = spec.members(), []
    for bs in spec.batch_sizes:
        kept = sorted(((run_id, ms) for run_id, (b, ms) in trained.items() if b == bs),
                      key=lambda g: members.index(g[1][0]) if g[1][0] in members else len(members))
        held = {m for _, ms in kept for m in ms}
        rest = [m for m in members if m not in held]
        first = 1 + max((_index(run_id) for run_id, _ in kept), default=-1)
        size = spec.population or len(rest) or 1
        new = [(f"bs{_tag(bs)}-p{first + i}", tuple(rest[j : j + size])) for i, j in enumerate(range(0, len(rest), size))]
        pops += [(run_id, replace(spec.train, members=ms, batch_size=bs)) for run_id, ms in kept + new]
    return pops


def _trained_groups(out: Path) -> dict[str, tuple[str, tuple[Member, ...]]]:
    """run_id -> (batch schedule, members) of each run under `out`/runs with a checkpoint (its sidecar's config)."""
    groups = {}
    for d in sorted((out / "runs").glob("*")):
        if not (d.is_dir() and has_checkpoint(d)):
            continue
        meta = latest_meta(d) or _legacy_meta(d)
        try:
            cfg = meta["config"]
            groups[d.name] = (str(cfg["batch_size"]), tuple(Member(float(m["lr"]), float(m["wd"]))
                                                           for m in cfg["members"]))
        except (KeyError, TypeError, ValueError):  # a damaged or legacy sidecar: which members is unknown
            raise ValueError(f"{d} has a checkpoint whose sidecar does not say which members it trains; move it "
                             "aside (its members then train anew) or use a new --out directory") from None
    return groups


def _legacy_meta(run_dir: Path) -> dict | None:
    """The sidecar of a checkpoint in the single-file layout of earlier versions (`checkpoint.LEGACY_SIDECAR`)."""
    try:
        return json.loads((run_dir / LEGACY_SIDECAR).read_text())
    except (OSError, ValueError):
        return None


def _tag(batch_size: str) -> str:
    return re.sub(r"[^0-9A-Za-z.]+", "-", batch_size.replace("@", "at"))


def _index(run_id: str) -> int:
    """i of a run id bs<tag>-p<i>; 0 for bs<tag> (one population held every member)."""
    m = re.search(r"-p(\d+)$", run_id)
    return int(m.group(1)) if m else 0


def run_sweep(spec: SweepSpec, out: str | Path, progress: Callable | None = None,
              devices: str | Sequence[str] | None = None, ray: str | None = None, ray_cpus: int = 1) -> list[dict]:
    """Train every population of `spec` into `out` (resuming what is there); returns summary rows.

    `progress(kind, **info)` receives ('start', total=...), ('advance', steps=...) and
    ('population', run_id=..., skipped=bool) events.
    `devices` ('cpu,cpu', 'cuda:0,cuda:1', 'all') or `ray` ('auto', 'local', an address) train
    populations concurrently (trajinv.parallel); then failures are rows with status 'failed'.
    """
    refuse_ranks("sweep")
    spec.validate()
    out = Path(out)
    if devices is not None or ray is not None:  # scale-out (trajinv.parallel): other devices or Ray
        from trajinv.parallel.runner import run_scaled

        return run_scaled(spec, out, progress, devices=devices, ray=ray, ray_cpus=ray_cpus)
    check_device(spec.train.device)  # before sizing asks the device for its free memory
    spec = memory.size_populations(spec, out, lambda: memory.free_bytes(spec.train.device), spec.train.device)
    with ExitStack() as held:  # `out` locked from the checks until the last population is written
        data, pops = prepare_sweep(spec, out, held)
        notify = progress or (lambda kind, **info: None)
        notify("start", total=sum(cfg.steps for _, cfg in pops), **start_warnings(pops, data))
        rows: list[dict] = []
        for run_id, cfg in pops:
            run_dir = out / "runs" / run_id
            results = finished_rows(run_id, cfg, data, run_dir, notify)
            if results is None:
                trainer = Trainer(cfg, data, run_dir, run_id=run_id)
                trainer.resume()
                done = trainer.finished()
                notify("population", run_id=run_id, skipped=done, members=len(cfg.members))
                notify("advance", steps=trainer.step if not done else cfg.steps)
                if not done:
                    trainer.train(progress=lambda step: notify("advance", steps=1))
                results = summary_rows(run_id, cfg, trainer.results())
            rows += results
            write_summary(out, rows)
    return rows


def start_warnings(pops: Sequence[tuple[str, TrainConfig]], data: TokenData) -> dict:
    """The 'start' event's `warnings` (the CLI prints them), when there are any: `data_warnings` of the
    population that trains the most tokens."""
    if not pops:
        return {}
    said = data_warnings(max((cfg for _, cfg in pops), key=lambda c: c.batch_plan().tokens), data)
    return {"warnings": said} if said else {}


def finished_rows(run_id: str, cfg: TrainConfig, data: TokenData, run_dir: Path, notify: Callable) -> list[dict] | None:
    """The summary rows of a population that finished before (`Trainer.finished_results`: no model built,
    no checkpoint loaded), with its progress events; None when it has to be resumed. Raises what a resume
    raises for its metrics (a malformed line)."""
    results = Trainer.finished_results(cfg, data, run_dir)
    if results is None:
        return None
    (run_dir / ERROR_LOG).unlink(missing_ok=True)  # of a worker that failed after the last save
    notify("population", run_id=run_id, skipped=True, members=len(cfg.members))
    notify("advance", steps=cfg.steps)
    return summary_rows(run_id, cfg, results)
