"""`trajinv tune`: run the search of `trajinv.tune.search`, one stage = one sweep directory.

    DIR/tune_spec.json            what was asked; a rerun must match it
    DIR/stages/<stage>/           a sweep directory per stage (spec.json, summary.csv, runs/...)
    DIR/tune.json, tune.png, tune_heatmap.png   the result (`trajinv.tune.report`)

Regime first. Every stage trains with micro-batch GNS on (`--gns-every` amortises
it), so the first stage, a scan of ELR at a fixed lr, also measures B_precond at no
extra runs. Its median over the scan's members (the median: robust to a member or
two whose estimate is dominated by noise) and the best member's steps*lr*wd decide
the regime (`classify_regime`): small batch with enough iterations -> keep scanning
ELR; otherwise the salient direction is lr, and a second search scans lr at the wd
of the first scan's best member (its stages are named ``lr-<stage>``).

Resume. The search is a pure function of the outcomes it was told, so a rerun of
the same command replays it: each stage's sweep resumes or, when finished, only
reads its summary. Interrupting anywhere and rerunning gives the same stages, the
same numbers and the same recommendation.

Outcomes. A member's loss is its final validation loss (None when it diverged); its
standard error is the validation-window bootstrap SE of that loss when the trainer
logged one (`val_loss_se`), else 0 (then `SearchConfig.noise` is the only floor), and
its bootstrap means (`val_loss_boot`), which pair members for the invariance check.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from trajinv.analysis.budgets import final_val_loss_stats
from trajinv.analysis.records import chance_loss
from trajinv.atomic import atomic_write, remove_stale_temps
from trajinv.config import DataConfig, Member, TrainConfig, describe_differences, to_dict
from trajinv.data import load_data
from trajinv.parallel.ddp import refuse_ranks
from trajinv.parallel.devices import check_device, device_kind, usable_devices
from trajinv.rundirs import TUNE_SPEC, refuse_other
from trajinv.schedules import BatchSchedule
from trajinv.sweep import SpecMismatch, SweepSpec, run_sweep
from trajinv.train import Trainer
from trajinv.tune.fit import MIN_TRANSITIONS
from trajinv.tune.search import (SEARCH_VERSION, Outcome, Point, Regime, Search, SearchConfig, Stage, TuneResult,
                                 classify_regime)

SPEC = TUNE_SPEC  # trajinv.rundirs
_VERSION_KEY = "search_version"  # in tune_spec.json, beside the spec (`SEARCH_VERSION`)
STAGES = "stages"
LR_PREFIX = "lr-"  # stages of the lr-axis search that follows an lr verdict (large batch or too few steps)


@dataclass(frozen=True)
class TuneSpec:
    """What to tune; every setting not listed here comes from `train`."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Shared training settings; `members` is replaced per stage, GNS is switched on (micro-batch)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The corpus every stage trains on."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """The search along the salient direction (its budget and cost unit are set from `train`)."""
    population: int = 0
    """Most members trained together per stage; 0 = a whole stage at once if it fits the device's free
    memory, else the most that fit, spread over the workers of --devices or --ray. On CPU the grouping
    never changes a member's numbers (bit for bit, docs/design.md "Population independence"); on GPU
    the batched matmuls may round differently for another K, so set it there to make a tune
    independent of the memory free when it starts and of the number of workers."""
    min_transitions: float = MIN_TRANSITIONS
    """Enough iterations for ELR invariance: steps*lr*wd of the scan's best member at least this
    (trajinv.tune.fit.MIN_TRANSITIONS says why 1)."""

    def stage_train(self) -> TrainConfig:
        """The training config of every stage: micro-batch GNS on, with >= 2 micro-batches."""
        cfg = self.train
        micro = cfg.micro_batch
        sizes = BatchSchedule.parse(cfg.batch_size).sizes
        if not micro or any(b % micro for b in sizes) or min(sizes) // micro < 2:
            micro = _micro_batch_for(sizes)
        gns = cfg.gns if cfg.gns.mode == "micro-batch" else replace(cfg.gns, mode="micro-batch")
        return replace(cfg, micro_batch=micro, gns=gns)

    def search_config(self, axis: str = "elr", **overrides) -> SearchConfig:
        """The search's config with its cost unit: one member trains `train.steps` steps."""
        return replace(self.search, axis=axis, steps_per_member=self.train.steps, **overrides)

    def validate(self) -> None:
        check_decay_mode(self.train)
        self.stage_train().validate()
        search = self.search_config()  # validates (budget against the first scan, ...)
        try:  # the first scan's points, before anything is written: a centre of 1e-320 underflows a wd to 0
            Search(search).next_stage()
        except ValueError as e:
            raise ValueError(f"the first scan around {search.center or search.lr * search.wd:g} over "
                             f"{search.octaves:g} octaves has no valid points ({e}); move --center-elr or "
                             "narrow --octaves") from None
        if self.population < 0:
            raise ValueError(f"population must be >= 0, got {self.population}")
        if not (math.isfinite(self.min_transitions) and self.min_transitions > 0):
            raise ValueError(f"min_transitions must be finite and > 0, got {self.min_transitions}")


def check_decay_mode(train: TrainConfig) -> None:
    """Refuse independent weight decay in one line: the search's ELR is lr*wd and its lines set wd = ELR/lr,
    torch mode's decay per step; in independent mode it is wd (an independent wd is lr times a torch one)."""
    if train.optim.decay_mode != "torch":
        raise ValueError(f"decay_mode {train.optim.decay_mode!r}: the tune searches torch-mode weight decay "
                         "(decay per step lr*wd); tune with --decay-mode torch (an independent wd is lr times it)")


def _micro_batch_for(sizes: Sequence[int]) -> int:
    """A micro-batch that divides every batch size of a schedule: the smallest split into 4, 3 or 2
    (the first that divides the others too), else the largest common divisor that splits it in two or
    more (1 for a prime batch)."""
    smallest, common = min(sizes), math.gcd(*sizes)
    for parts in (4, 3, 2):
        if smallest % parts == 0 and common % (smallest // parts) == 0:
            return smallest // parts
    for micro in range(smallest // 2, 0, -1):
        if common % micro == 0:
            return micro
    raise ValueError(f"micro-batch GNS needs batches of two or more sequences, got batch size {smallest}")


@dataclass
class StageRun:
    """One trained stage: what it was, where it lives, what came out, what it cost."""

    stage: Stage
    axis: str  # the search it belongs to: "elr" or "lr"
    directory: Path
    outcomes: tuple[Outcome, ...]
    b_precond: list[float]
    member_steps: int
    tokens: int


@dataclass
class TuneRun:
    """Everything `trajinv.tune.report` writes: the result, the regime, every stage."""

    spec: TuneSpec
    result: TuneResult
    regime: Regime
    stages: list[StageRun]
    notes: list[str] = field(default_factory=list)
    """What the runner decided beyond the search (e.g. why it did not switch to lr)."""


def _check_spec(out: Path, spec: TuneSpec) -> int:
    """Refuse a directory made by another spec; write ours (atomically) if there is none. Returns the search
    version to replay it with (`SEARCH_VERSION` for a new one; 1 where tune_spec.json predates versions)."""
    refuse_other(out, "tune")
    path = out / SPEC
    mine = json.loads(json.dumps(to_dict(spec)))

    def write(version: int) -> int:
        atomic_write(path, lambda f: f.write(json.dumps({**mine, _VERSION_KEY: version}, indent=1)), mode="w")
        return version

    if path.exists():
        try:
            theirs = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is unreadable ({type(e).__name__}); use a new --out directory") from None
        version = theirs.pop(_VERSION_KEY, 1) if isinstance(theirs, dict) else 1
        if type(version) is not int or not 1 <= version <= SEARCH_VERSION:
            raise ValueError(f"{path} says search version {version!r}, which this trajinv does not know (1.."
                             f"{SEARCH_VERSION}): a newer trajinv made it; use that, or a new --out directory")
        regrouped = isinstance(theirs, dict) and theirs.get("population") != mine["population"]
        if regrouped:  # population: how a stage's members are grouped, not what they are
            theirs = {**theirs, "population": mine["population"]}
        if differences := describe_differences(theirs, mine):
            raise ValueError(f"{out} holds a tune made by another spec ({differences}); "
                             "use a new --out directory")
        remove_stale_temps(out)  # of a killed run's writes (tune.json, its PNGs); the stages clean their own
        return write(version) if regrouped else version  # regrouped: what was asked last
    out.mkdir(parents=True, exist_ok=True)
    return write(SEARCH_VERSION)


def _preflight(spec: TuneSpec, scale: dict) -> int:
    """What each stage's sweep checks before it writes anything (devices, kernels, the data against the
    model), checked before the tune writes its spec: a tune refused there leaves nothing that would make
    the corrected command "another spec". On Ray the driver need not have the cluster's devices.
    Returns the data's vocabulary size."""
    cfg = spec.stage_train()
    if scale.get("devices") is not None or scale.get("ray") is not None:
        from trajinv.parallel.runner import check_scale

        check_scale(scale.get("devices"), scale.get("ray"), scale.get("ray_cpus", 1), cfg.device)
    if scale.get("ray") is None:
        if scale.get("devices") is not None:
            cfg = replace(cfg, device=device_kind(usable_devices(scale["devices"])))
        check_device(cfg.device)  # before the data: tokenizing a corpus can take minutes
    data = load_data(spec.data)
    if scale.get("ray") is None:
        Trainer.check(cfg, data)
    return data.vocab_size


# How far (octaves) a summary row's lr or wd may lie from the point it trained: the sweep keeps 12
# significant digits (7e-12 octaves at most), far inside the 1e-9 that tells two points apart.
_ROW_MATCH = 1e-10


def _row_for(p: Point, rows: list[dict]) -> dict | None:
    """The summary row of point p. Not by `Point.key`: a value stored to 12 digits can round to the other
    side of the key's 9th log2 decimal (a zoom member at lr 0.016121090846427273 did, and its stage could
    never be read back)."""
    x = (math.log2(p.lr), math.log2(p.wd))
    return next((r for r in rows if abs(math.log2(float(r["lr"])) - x[0]) < _ROW_MATCH
                 and abs(math.log2(float(r["wd"])) - x[1]) < _ROW_MATCH), None)


def _outcomes(stage: Stage, rows: list[dict], directory: Path, chance: float, doomed: set = frozenset()
              ) -> tuple[tuple[Outcome, ...], list[float]]:
    """Each point's final loss (None if diverged) and SE, and the members' B_precond.

    A member that ends at or above `chance` (ln V: the loss of a uniform guess, where an untrained model
    starts) learned nothing: it counts as diverged, like a non-finite loss, so it is never a best, a fit
    point, a check member or a B_precond (an lr far too large can blow a loss up to 1e5 and stay finite)."""
    stats = final_val_loss_stats(directory) if rows else {}
    out, bp = [], []
    for p in stage.points:
        if p.key in doomed:  # `doomed`: not trainable (lr*wd >= 1), never trained
            out.append(Outcome(p, None, 0.0))
            continue
        row = _row_for(p, rows)
        if row is None:
            raise RuntimeError(f"stage {stage.name}: no summary row for lr={p.lr:.6g}, wd={p.wd:.6g}")
        loss = row.get("final_val_loss")
        ok = row.get("status") == "done" and loss is not None and math.isfinite(float(loss)) and float(loss) < chance
        se, boot = stats.get((row["run_id"], int(row["member"])), (0.0, ()))
        out.append(Outcome(p, float(loss) if ok else None, se, boot if ok else ()))
        # the summary's batch_regime statistic: robust (an EMA can be carried off by one spike), read before an
        # annealing lr's tail (trajinv.gns.estimator, "The regime"); in a summary written before that column,
        # the robust one at the run's end, before that the smoothed one. An empty cell is no reading.
        b = next((row[k] for k in ("b_precond_regime", "b_precond_robust", "b_precond") if k in row), None)
        if ok and b not in (None, "") and math.isfinite(float(b)):
            bp.append(float(b))
    return tuple(out), bp


def _stage_overrides(spec: TuneSpec) -> list[str]:
    """Notes for the options `stage_train` replaced, so the user's own settings are not silently dropped."""
    given, used = spec.train, spec.stage_train()
    notes = []
    if given.gns.mode not in ("off", used.gns.mode):
        notes.append(f"--gns {given.gns.mode} replaced by {used.gns.mode}: the tune measures B_precond from "
                     "micro-batches in every stage")
    if given.micro_batch and given.micro_batch != used.micro_batch:
        notes.append(f"--micro-batch {given.micro_batch} does not split every batch of {given.batch_size} into two "
                     f"or more equal micro-batches: the stages use {used.micro_batch}")
    largest = max(BatchSchedule.parse(used.batch_size).sizes)
    if largest // used.micro_batch > _MANY_MICRO_BATCHES:
        notes.append(f"the stages measure GNS in micro-batches of {used.micro_batch} (a divisor of every batch of "
                     f"{used.batch_size}): batch {largest} runs as {largest // used.micro_batch} of them per step, "
                     "slowly; batch sizes with a larger common divisor train faster")
    return notes


_MANY_MICRO_BATCHES = 16  # more per step than this is slow enough to say why


def _untrainable(train: TrainConfig, p: Point) -> bool:
    return train.optim.peak_decay(Member(p.lr, p.wd)) >= 1


def _run_stage(spec: TuneSpec, stage: Stage, axis: str, directory: Path, progress: Callable | None,
               scale: dict, chance: float) -> StageRun:
    train = spec.stage_train()
    # A point whose decay would zero or flip the weights every step (lr*wd >= 1) is refused by the trainer;
    # a search that walked there gets it as diverged, untrained, and walks back.
    doomed = {p.key for p in stage.points if _untrainable(train, p)}
    points = tuple((p.lr, p.wd) for p in stage.points if p.key not in doomed)
    rows = []
    if points:
        # this run's --population (smaller after running out of memory, say): a stage's checkpointed
        # populations keep their members, the rest are split by it (trajinv.sweep.plan_populations)
        sweep = SweepSpec(train=train, data=spec.data, points=points, batch_sizes=(spec.train.batch_size,),
                          population=spec.population)
        try:
            rows = run_sweep(sweep, directory, progress=progress, **scale)
        except SpecMismatch as e:  # same tune spec, another stage: planned by a search that decided otherwise
            raise ValueError(f"stage {directory.name} on disk holds other members than this tune plans for it "
                             f"({e.differences}): it was trained by an earlier trajinv whose search decided "
                             "otherwise; use a new --out directory") from None
    failed = [r["run_id"] for r in rows if r.get("status") == "failed"]
    if failed:
        # as a sweep's failed populations: one line (the CLI's), and the rerun retries them
        raise ValueError(f"stage {directory.name}: population(s) {', '.join(dict.fromkeys(failed))} failed "
                           f"(errors in {directory / 'summary.csv'}); rerun the same command to retry them")
    outcomes, bp = _outcomes(stage, rows, directory, chance, doomed)
    # every trained member costs its whole run: a diverged one is masked, not stopped, in its population
    steps = len(points) * spec.train.steps
    tokens = len(points) * train.batch_plan().tokens
    return StageRun(stage, axis, directory, outcomes, bp, steps, tokens)


def _drive(search: Search, spec: TuneSpec, out: Path, progress: Callable | None,
           runs: list[StageRun], scale: dict, chance: float,
           after_first: Callable[[StageRun], bool] | None = None) -> bool:
    """Train the search's stages until it finishes; False when `after_first` stops it early."""
    while (stage := search.next_stage()) is not None:
        if progress is not None:
            progress("stage", name=stage.name, stage_kind=stage.kind, members=len(stage.points))
        run = _run_stage(spec, stage, search.cfg.axis, out / STAGES / stage.name, progress, scale,
                         chance)
        search.tell(stage, run.outcomes, cost=run.member_steps)  # untrainable points cost nothing
        runs.append(run)
        if after_first is not None and len(runs) == 1 and not after_first(run):
            return False
    return True


def run_tune(spec: TuneSpec, out: str | Path, progress: Callable | None = None, **scale) -> TuneRun:
    """Tune `spec` into `out` (resuming what is there) and return the run; see the module doc.

    `progress(kind, **info)` receives the sweeps' events plus ('stage', name=, stage_kind=, members=).
    `scale`: `run_sweep`'s devices / ray / ray_cpus: each stage's populations on several devices or a
    Ray cluster (trajinv.parallel); they change where stages train, not what they compute.
    """
    refuse_ranks("tune")  # before tune_spec.json: each rank would run the whole tune into `out`
    spec.validate()
    out = Path(out)
    vocab = _preflight(spec, scale)
    chance = chance_loss(spec.train.model.vocab_size or vocab)  # a uniform guess's loss (`_outcomes`)
    version = _check_spec(out, spec)
    runs: list[StageRun] = []
    regime: Regime | None = None

    def classify(first: StageRun) -> bool:
        nonlocal regime
        regime = first_regime(spec, first.outcomes, first.b_precond)
        return regime.axis == "elr"

    notes = _stage_overrides(spec)
    search = Search(spec.search_config("elr"), version=version)
    if not _drive(search, spec, out, progress, runs, scale, chance, classify):
        # large batch or too few steps: the loss follows lr; scan it at the wd of the scan's best member
        follow = lr_search(spec, runs[0].outcomes, runs[0].member_steps, version)
        if follow is not None:
            search = follow
            _drive(search, spec, out, progress, runs, scale, chance)
        else:
            left = spec.search.budget - runs[0].member_steps
            need = _lr_search(spec, runs[0].outcomes, version=version).fresh_scan_cost
            notes.append(f"the regime calls for tuning lr, but the budget left ({left} member-steps) is below the "
                         f"lr scan's new members ({need} member-steps): the ELR search went on; raise --budget "
                         "(with a new --out: the budget decides the stages)")
            _drive(search, spec, out, progress, runs, scale, chance)
    result = search.result()
    stage_train = spec.stage_train()
    untrained = [o for sr in runs for o in sr.outcomes if _untrainable(stage_train, o.point)]
    if untrained:
        notes.append(f"{len(untrained)} member(s) not trained: their decay per step (lr*wd) is >= 1, which would zero "
                     "or flip the weights every step; they count as diverged (lower --lr or --center-elr)")
    if result.best is None:
        notes.append(f"no member trained below the loss of a uniform guess (ln {math.exp(chance):.0f} = "
                     f"{chance:.3f}): every member diverged or learned nothing; lower --lr")
    return TuneRun(spec, result, regime, runs, notes)


def first_regime(spec: TuneSpec, outcomes: Sequence[Outcome], b_precond: Sequence[float]) -> Regime:
    """The regime the first ELR scan calls for: the median of its members' B_precond (none: unmeasured) and
    its best member's steps*lr*wd (the middle point's when every member diverged)."""
    stage_cfg = spec.stage_train()
    best = _best_point(outcomes) or outcomes[len(outcomes) // 2].point
    b = statistics.median(b_precond) if b_precond else None
    plan = stage_cfg.batch_plan()
    sequences = sum(size * count for size, count in zip(plan.sizes, plan.counts))
    regime = classify_regime(b, plan.sizes[-1], plan.steps, best.lr, best.wd, spec.min_transitions,
                             schedule=plan.sizes, sequences=sequences)
    if _best_point(outcomes) is None:  # its numbers are of a point that trained nothing: say so
        regime = replace(regime, reason=f"every member of the first scan diverged, so read at its middle point "
                                        f"(lr={best.lr:.4g}, wd={best.wd:.4g}): {regime.reason}")
    return regime


def lr_search(spec: TuneSpec, first: Sequence[Outcome], spent: int, version: int = SEARCH_VERSION
              ) -> Search | None:
    """The lr search that follows a first scan whose regime calls for lr: lr scanned around `--lr` at the wd
    of the scan's best member (its middle member's when all diverged), with the budget left after `spent`
    member-steps; None when that is below the lr scan's points still to train. It knows the scan's
    outcomes: its best member (the lr scan's centre) and the iso-LR check members that coincide with scan
    members are not trained twice, nor paid for again."""
    left = None if spec.search.budget is None else spec.search.budget - spent
    unbounded = _lr_search(spec, first, version=version)
    if left is not None and left < unbounded.fresh_scan_cost:
        return None
    return _lr_search(spec, first, left, version)


def _lr_search(spec: TuneSpec, first: Sequence[Outcome], budget: int | None = None,
               version: int = SEARCH_VERSION) -> Search:
    # every member diverged: the scan's middle point, as the regime read it (not a wd nobody chose)
    wd = (_best_point(first) or first[len(first) // 2].point).wd
    return Search(spec.search_config("lr", wd=wd, center=spec.search.lr, budget=None), known=first, budget=budget,
                  prefix=LR_PREFIX, version=version)


def _best_point(outcomes: Sequence[Outcome]) -> Point | None:
    """The point of the lowest finite loss (the first evaluated on a tie); None when every member diverged."""
    finite = [o for o in outcomes if o.finite]
    return min(finite, key=lambda o: o.loss).point if finite else None
