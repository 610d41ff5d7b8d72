"""Bench: `trajinv tune` against 2-D search, at equal member-step budgets.

The claim under test: following the salient direction (ELR, late in small-batch
training) finds lr and wd as good as a dense 2-D grid for a fraction of its cost,
and better than generic 2-D search at that cost.

1. A dense **reference grid** (`GRID` lr x wd, log2 spacing 1), once per training
   seed; cached as sweep directories under bench/results/tune/ (a rerun reuses or
   resumes them). The comparison wants a setting whose optimum is interior in both lr
   and wd; this one's is interior in lr, and in wd a plateau at small wd in the seed
   mean (interior at four seeds of seven; README, "Against 2-D search").
2. **Seed noise**: the std over seeds of the final loss at each grid point, taken
   at the grid's best few points (where the comparisons happen).
3. **`trajinv tune`** per seed (real training, cached too), its budget a third of
   the grid's member-steps; regret = the loss of its recommendation - the grid's
   best (same seed): the fit's vertex trained at that seed (cached under
   heldout/, as point 6), or the best member's own loss when the tune had no
   usable fit. `member_regret`: its best member's loss, what the tune recommended
   before search version 4.
4. **Random search** over the 2-D box, as an opda tuning curve (the expected best
   loss after n trials with 80% simultaneous confidence bands, from each seed's grid
   as the empirical distribution) and as resampled runs; **Optuna's TPE**; all *tabular*: their
   trials are points of the same seed's grid, looked up instead of trained (the
   grid is the box at its own resolution; training them again would give the same
   numbers). TPE asks for a population of trials at a time and is told their
   losses together, as populations train. Many repetitions per seed.
4b. **TPE trained** over the continuous box (the grid's extent, log lr x log wd), once
   per seed at the tune's budget: every trial trained as the tune's members are, so
   both pay a fresh run's noise at the points they chose. A table lookup never pays
   it, and the grid's best is the luckiest of its cells: a tabular method that draws
   a third of the table often lands on that cell, a trained one cannot.
5. Regret against member-steps for each method (a tune's also with its recommendation
   looked up in its seed's grid when it is a grid point, "table": retraining the same
   point in another population moves the loss by up to ~0.005 nat, which a lookup
   never pays); the targets: tune within 2x the
   seed noise of the grid's best at <= 1/3 of the grid's member-steps, and its
   median regret below random search's and TPE's at that budget.
6. **Held-out regret** (with two or more seeds): the regret above measures the best
   loss a method *saw*, and a tabular method that draws many points of one noisy
   table gains from that table's luckiest draws (its minimum is biased low by the
   same noise that sets the grid's best). What a user takes home is the chosen
   (lr, wd), retrained. So each method's recommendation (its best point) is also
   scored on the *other* seeds: the mean of their grids' losses there minus the best
   mean over the grid, a point off the grid (a tune's zoom) trained at those seeds
   (cached under bench/results/tune/heldout/). The tune's best member is scored the
   same way (`member_heldout`): whether recommending the fit's vertex, which smooths
   over the members near the best, beats taking the luckiest of them.

    python bench/bench_tune.py [--quick] [--setting stdlib|small-corpus] [--seeds 0 1 2] [--reps 200]
                               [--devices cpu,cpu] [--no-tpe-trained]

Settings (`SETTINGS`): `stdlib`, the one above and in the README's table (runs cached under
bench/results/tune/); `small-corpus`, the first 400,000 tokens of the same corpus, whose best
(lr, wd) is interior in both (bench/bench_setting.py), its own 7x7 grid and first scan centred
there (cached under bench/results/tune-small-corpus/; tables tune-small-corpus.csv and .png).

Prints a table and the verdicts; writes bench/results/tune.csv and tune.png.
Needs optuna (TPE) and opda (the expected-best curve of random search):
`pip install 'trajinv[hpo]'`.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from results_csv import RESULTS_DIR, results_dir, scratch, write_csv
from trajinv.analysis.plots import save_png
from trajinv.config import DataConfig, Member, ScheduleConfig, TrainConfig, preset
from trajinv.sweep import SweepSpec, run_sweep
from trajinv.tune.report import write_report
from trajinv.tune.runner import TuneSpec, run_tune
from trajinv.tune.search import SearchConfig

OUT = RESULTS_DIR / "tune"
# The setting: tiny on byte tokens, WSD (as the paper). Meant to reach the ELR phase; measured, it is in the LR
# phase at its optimum (README, "Against 2-D search").
SETTING = dict(steps=800, batch_size="32", schedule=ScheduleConfig(kind="wsd", warmup=50, decay_fraction=0.2),
               eval_every=100, log_every=20, checkpoint_every=400)
LR_LOG2 = range(-10, -3)  # 2^-10 .. 2^-4
WD_LOG2 = range(-5, 2)  # 2^-5 .. 2^1
# The tune's search: ELR at lr 2^-7 around 2^-9, a coarse first scan of 4 points over 6 octaves (spacing 2).
# Coarse because the budget is tight (16 members): 7 points (spacing 1) spent 7 of them on a line that the
# check or the regime then left, and the zoom (out to +-0.5 octave: SearchConfig.zoom_width) resolves what the
# coarse scan does not. Chosen on bench/tune_surrogate.py's replays of these runs (median regret 0.0000 vs
# 0.0062 for 7 points, held-out 0.0041 vs 0.0086, with the zoom then out to +-1 octave), then trained (README).
TUNE = dict(lr=2.0 ** -7, center=2.0 ** -9, octaves=6.0, points=4)
QUICK = dict(steps=16, eval_every=8, log_every=8, checkpoint_every=0, eval_seqs=32)


@dataclass(frozen=True)
class Setting:
    """What the bench compares on: the corpus, the grid's axes, the tune's first scan, and where runs are cached.
    The model and training (`SETTING`) are the same for every one."""

    data: DataConfig
    lr_log2: range
    wd_log2: range
    tune: dict
    """SearchConfig fields of the tune's first scan (lr, center, octaves, points)."""
    cache: Path
    train: dict = field(default_factory=dict)
    """TrainConfig fields that differ from `SETTING` (a small corpus's validation split, say)."""

    def data_for(self, quick: bool) -> DataConfig:
        """The corpus, or for --quick at most its first 300,000 tokens."""
        return DataConfig(max_tokens=min(self.data.max_tokens or 300_000, 300_000)) if quick else self.data


SETTINGS = {
    "stdlib": Setting(DataConfig(), LR_LOG2, WD_LOG2, TUNE, OUT),
    # the first 400,000 tokens of the same corpus, ~4 epochs in 800 steps: its best (lr, wd) is interior in both
    # at seeds 0 and 1 (bench/bench_setting.py; README, "A setting whose optimum is interior in both"). The grid
    # and the tune's first scan are centred on that point, lr 2^-8 and wd 2^1 (ELR 2^-7), as on a box a user
    # draws around a guess; its validation split holds 360 windows, so 128 validation sequences.
    "small-corpus": Setting(DataConfig(max_tokens=400_000), range(-11, -4), range(-2, 5),
                            dict(lr=2.0 ** -8, center=2.0 ** -7, octaves=6.0, points=4),
                            RESULTS_DIR / "tune-small-corpus", dict(eval_seqs=128)),
}
STDLIB = SETTINGS["stdlib"]


def train_config(seed: int, quick: bool, setting: Setting = STDLIB) -> TrainConfig:
    extra = QUICK if quick else setting.train
    return TrainConfig(model=preset("tiny"), members=(Member(),), seed=seed, **{**SETTING, **extra})


def grid_axes(quick: bool, setting: Setting = STDLIB) -> tuple[list[float], list[float]]:
    lrs, wds = [2.0 ** e for e in setting.lr_log2], [2.0 ** e for e in setting.wd_log2]
    return (lrs[2:5], wds[2:5]) if quick else (lrs, wds)


def reference_grid(seed: int, quick: bool, data: DataConfig, out: Path, devices: str | None = None,
                   setting: Setting = STDLIB) -> dict[tuple[float, float], float | None]:
    """(lr, wd) -> final validation loss (None: diverged) of the seed's grid, trained or read back.

    Populations of one lr row each, so `devices` ('cpu,cpu') can train rows concurrently."""
    lrs, wds = grid_axes(quick, setting)
    spec = SweepSpec(train=train_config(seed, quick, setting), data=data, lrs=tuple(lrs), wds=tuple(wds),
                     population=len(wds))
    rows = run_sweep(spec, out / f"grid-s{seed}", devices=devices)
    return {(r["lr"], r["wd"]): (r["final_val_loss"] if r["status"] == "done" else None) for r in rows}


def tune_once(seed: int, quick: bool, data: DataConfig, budget: int, out: Path, devices: str | None = None,
              setting: Setting = STDLIB) -> dict:
    cfg = train_config(seed, quick, setting)
    small = dict(points=3, octaves=2.0, zoom_points=1, check_factors=(0.5, 2.0)) if quick else {}
    search = SearchConfig(**{**setting.tune, **small}, budget=budget, steps_per_member=cfg.steps)
    scale = {"devices": devices} if devices else {}
    run = run_tune(TuneSpec(train=cfg, data=data, search=search), out / f"tune-s{seed}", **scale)
    write_report(run, out / f"tune-s{seed}")  # tune.json (what `trajinv fit` reads) and its plots
    r, reco = run.result, run.result.recommendation
    return {"member_steps": sum(s.member_steps for s in run.stages), "lr": reco.lr, "wd": reco.wd,
            "source": reco.source, "member_loss": r.loss, "member": (r.best.lr, r.best.wd), "axis": r.axis,
            "check": r.invariant_check.within_noise if r.invariant_check else None}


def random_search(grid: dict, trials: int, rng: np.random.Generator) -> tuple[float, tuple[float, float]]:
    """(best loss, its (lr, wd)) of `trials` grid points drawn without replacement (diverged: +inf)."""
    keys = list(grid)
    pick = rng.choice(len(keys), size=min(trials, len(keys)), replace=False)
    return min((math.inf if grid[keys[i]] is None else grid[keys[i]], keys[i]) for i in pick)


def _tpe_in_populations(seed: int, trials: int, population: int,
                        evaluate: Callable[[list, int], list[tuple[float, tuple[float, float]]]]
                        ) -> tuple[float, tuple[float, float]]:
    """Optuna TPE asked `population` trials at a time and told their losses together, as populations train.
    `evaluate(batch, k)` suggests each trial's (lr, wd) and returns [(loss, (lr, wd))] (inf: diverged) for
    the k-th batch. Returns the best (loss, (lr, wd)) seen."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=population))
    seen: list[tuple[float, tuple[float, float]]] = []
    while len(seen) < trials:
        batch = [study.ask() for _ in range(min(population, trials - len(seen)))]
        results = evaluate(batch, len(seen) // population)
        for t, (loss, _) in zip(batch, results):
            study.tell(t, loss if math.isfinite(loss) else 1e9)  # TPE needs a number: diverged = very bad
        seen += results
    return min(seen)


def tpe_search(grid: dict, lrs: list[float], wds: list[float], trials: int, population: int,
               seed: int) -> tuple[float, tuple[float, float]]:
    """(best loss, its (lr, wd)) of Optuna TPE over the grid's indices (tabular: looked up, not trained)."""
    def look_up(batch: list, _: int) -> list[tuple[float, tuple[float, float]]]:
        keys = [(lrs[t.suggest_int("lr", 0, len(lrs) - 1)], wds[t.suggest_int("wd", 0, len(wds) - 1)]) for t in batch]
        return [(math.inf if grid[k] is None else grid[k], k) for k in keys]

    return _tpe_in_populations(seed, trials, population, look_up)


def tpe_trained(seed: int, quick: bool, data: DataConfig, budget: int, out: Path, population: int,
                lrs: list[float], wds: list[float], devices: str | None = None, setting: Setting = STDLIB) -> dict:
    """Optuna TPE over the continuous box (log lr x log wd over the grid's extent), every trial *trained*,
    as the tune's members are: each population of trials trained together (a sweep directory per batch
    under tpe-p<population>-s<seed>/). The sampler is seeded and a rerun tells it the same losses, so it asks
    the same points and finds its batches trained."""
    cfg = train_config(seed, quick, setting)

    def train(batch: list, k: int) -> list[tuple[float, tuple[float, float]]]:
        points = [(t.suggest_float("lr", lrs[0], lrs[-1], log=True), t.suggest_float("wd", wds[0], wds[-1], log=True))
                  for t in batch]
        rows = run_sweep(SweepSpec(train=cfg, data=data, points=tuple(points)),
                         out / f"tpe-p{population}-s{seed}" / f"batch-{k}", devices=devices)
        by_point = {_member_key(r["lr"], r["wd"]): r for r in rows}
        results = []
        for lr, wd in points:
            row = by_point[_member_key(lr, wd)]
            ok = row["status"] == "done" and row["final_val_loss"] not in (None, "")
            loss = float(row["final_val_loss"]) if ok else math.inf
            results.append((loss if math.isfinite(loss) else math.inf, (float(row["lr"]), float(row["wd"]))))
        return results

    trials = budget // cfg.steps
    loss, (lr, wd) = _tpe_in_populations(seed * 1000, trials, population, train)
    return {"loss": loss, "lr": lr, "wd": wd, "member_steps": trials * cfg.steps}


def _member_key(lr: float, wd: float) -> tuple[str, str]:
    """A member's (lr, wd) up to the rounding SweepSpec.members applies (and a CSV round trip)."""
    return f"{float(lr):.9g}", f"{float(wd):.9g}"


class HeldOut:
    """Scores a recommendation chosen on one seed by the other seeds (docstring, point 6)."""

    def __init__(self, seeds: list[int], grids: list[dict], quick: bool, data: DataConfig, out: Path,
                 setting: Setting = STDLIB):
        self.grids = dict(zip(seeds, grids))
        self.quick, self.data, self.out, self.setting = quick, data, out, setting
        self.cache: dict[tuple[float, float, int], float] = {}

    def on_grid(self, lr: float, wd: float, seed: int) -> float | None:
        """The seed's grid loss at (lr, wd) (inf: diverged); None when (lr, wd) is not a grid point."""
        grid = self.grids[seed]
        for k, v in grid.items():
            if math.isclose(k[0], lr, rel_tol=1e-9) and math.isclose(k[1], wd, rel_tol=1e-9):
                return math.inf if v is None else v
        return None

    def loss(self, lr: float, wd: float, seed: int) -> float:
        """The final loss at (lr, wd) and `seed`: the seed's grid's there, else trained (once)."""
        table = self.on_grid(lr, wd, seed)
        if table is not None:
            return table
        if (lr, wd, seed) not in self.cache:  # off the grid: train it at this seed (a sweep of one point)
            spec = SweepSpec(train=train_config(seed, self.quick, self.setting), data=self.data, points=((lr, wd),))
            row = run_sweep(spec, self.out / "heldout" / f"lr{lr:.6g}-wd{wd:.6g}-s{seed}")[0]
            self.cache[(lr, wd, seed)] = row["final_val_loss"] if row["status"] == "done" else math.inf
        return self.cache[(lr, wd, seed)]

    def regret(self, lr: float, wd: float, chosen_on: int) -> float:
        """Mean loss at (lr, wd) over the seeds other than `chosen_on`, minus the best such mean of the grid."""
        others = [s for s in self.grids if s != chosen_on]
        if not others:
            return math.nan
        return statistics.fmean(self.loss(lr, wd, s) for s in others) - self._best_without(chosen_on)

    @functools.cache
    def _best_without(self, seed: int) -> float:
        """The best grid point's mean loss over the seeds other than `seed` (asked thousands of times)."""
        others = [s for s in self.grids if s != seed]
        keys = [k for k in self.grids[others[0]] if all(self.grids[s][k] is not None for s in others)]
        return min(statistics.fmean(self.grids[s][k] for s in others) for k in keys)


def seed_noise(grids: list[dict]) -> float:
    """Std over seeds of the final loss, median over the 5 best grid points (by their mean)."""
    keys = [k for k in grids[0] if all(g[k] is not None for g in grids)]
    mean = sorted(keys, key=lambda k: statistics.fmean(g[k] for g in grids))[:5]
    return statistics.median(statistics.stdev([g[k] for g in grids]) for k in mean)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 3x3 grid of a few steps, one seed: a smoke test")
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="stdlib",
                    help="the corpus, grid and first scan compared on (module docstring)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2)")
    ap.add_argument("--devices", default=None,
                    help="train on several devices at once, e.g. 'cpu,cpu' (numbers do not change)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of random search per seed (TPE: reps/10)")
    ap.add_argument("--tpe-population", type=int, default=TUNE["points"],
                    help="trials TPE asks for at a time (one population); default: the tune's first scan")
    ap.add_argument("--no-tpe-trained", action="store_true",
                    help="leave out TPE trained over the box (4b): after the grids, the bench's longest part")
    args = ap.parse_args()
    if args.tpe_population < 1:
        ap.error(f"--tpe-population must be >= 1, got {args.tpe_population}")
    if args.reps is not None and args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    if args.seeds is not None and min(args.seeds) < 0:
        ap.error(f"--seeds must be >= 0, got {min(args.seeds)}")
    if args.seeds is not None and len(set(args.seeds)) < len(args.seeds):  # a repeat read as another seed:
        # its copy of the grid made the seed noise 0 and every row twice
        ap.error(f"--seeds repeats a seed: {' '.join(map(str, args.seeds))}; give each once")
    lacking = [m for m in ("optuna", "opda") if importlib.util.find_spec(m) is None]
    if lacking:  # checked first: the grids before them take hours
        ap.error(f"needs {' and '.join(lacking)}: pip install 'trajinv[hpo]'")
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    reps = args.reps or (10 if args.quick else 200)
    setting = SETTINGS[args.setting]
    data = setting.data_for(args.quick)
    lrs, wds = grid_axes(args.quick, setting)
    steps = train_config(0, args.quick, setting).steps
    grid_cost = len(lrs) * len(wds) * steps
    budget = grid_cost if args.quick else grid_cost // 3  # quick: room for the lr search its few steps call for
    # the full bench keeps its runs (reruns reuse them); --quick trains afresh in a scratch folder
    out = scratch("bench-tune-") if args.quick else setting.cache
    grids = [reference_grid(s, args.quick, data, out, args.devices, setting) for s in seeds]
    sigma = seed_noise(grids) if len(grids) > 1 else float("nan")
    rows, per_method = [], {"random": {}, "tpe": {}}
    heldout, held = HeldOut(seeds, grids, args.quick, data, out, setting), {"random": {}, "tpe": {}}
    opda: dict[int, list[tuple[float, float, float]]] = {}  # budget -> (expected, band lo, band hi) regret per seed
    population = args.tpe_population
    budgets = sorted({budget, grid_cost // 6, grid_cost // 2, grid_cost})
    for seed, grid in zip(seeds, grids):
        best = min(v for v in grid.values() if v is not None)
        tuned = tune_once(seed, args.quick, data, budget, out, args.devices, setting)
        # a fit's vertex was never trained: trained now at this seed, as the user who takes it home would
        loss = tuned["member_loss"] if tuned["source"] == "member" else heldout.loss(tuned["lr"], tuned["wd"], seed)
        looked_up = heldout.on_grid(tuned["lr"], tuned["wd"], seed)
        rows.append({"method": "tune", "seed": seed, "member_steps": tuned["member_steps"],
                     "regret": loss - best, "heldout": heldout.regret(tuned["lr"], tuned["wd"], seed),
                     "table": (loss if looked_up is None else looked_up) - best,
                     "on_grid": looked_up is not None,
                     "grid_best": best, "lr": tuned["lr"], "wd": tuned["wd"], "source": tuned["source"],
                     "axis": tuned["axis"], "check_within_noise": tuned["check"],
                     # the best member instead (search version 3 and older), scored the same ways
                     "member_regret": tuned["member_loss"] - best,
                     "member_heldout": heldout.regret(*tuned["member"], seed)})
        if not args.no_tpe_trained:
            found = tpe_trained(seed, args.quick, data, budget, out, population, lrs, wds, args.devices, setting)
            rows.append({"method": "tpe-trained", "seed": seed, "member_steps": found["member_steps"],
                         "regret": found["loss"] - best, "heldout": heldout.regret(found["lr"], found["wd"], seed),
                         "grid_best": best, "lr": found["lr"], "wd": found["wd"]})
        for b, e, lo, hi in random_search_curve(grid, [b // steps for b in budgets], budgets):
            # a draw from the grid cannot beat its best: the band's lower edge (which opda lets sink towards
            # the loss bound, as for a continuous box) is clipped at zero regret
            opda.setdefault(b, []).append((e - best, max(lo - best, 0.0), hi - best))
        rng = np.random.default_rng(seed)
        for b in budgets:
            trials = b // steps
            found = {"random": [random_search(grid, trials, rng) for _ in range(reps)],
                     "tpe": [tpe_search(grid, lrs, wds, trials, population, seed * 1000 + r)
                             for r in range(max(2, reps // 10))]}
            for method, results in found.items():
                per_method[method].setdefault(b, []).extend(loss - best for loss, _ in results)
                held[method].setdefault(b, []).extend(heldout.regret(*key, seed) for _, key in results)
    for method, by_budget in per_method.items():
        for b, regrets in by_budget.items():
            q25, q50, q75 = np.quantile(regrets, [0.25, 0.5, 0.75])
            rows.append({"method": method, "member_steps": b, "regret": float(q50), "regret_q25": float(q25),
                         "regret_q75": float(q75), "heldout": float(np.median(held[method][b])),
                         "runs": len(regrets)})
    for b, per_seed in sorted(opda.items()):  # averaged over seeds: the expected regret of random search
        e, lo, hi = (statistics.fmean(v[i] for v in per_seed) for i in range(3))
        rows.append({"method": "random-opda", "member_steps": b, "regret": e, "band_lo": lo, "band_hi": hi,
                     "runs": len(per_seed)})
    tune_rows = [r for r in rows if r["method"] == "tune"]
    tpe_rows = [r for r in rows if r["method"] == "tpe-trained"]
    print(f"setting {args.setting}: tiny, {steps} steps, batch {SETTING['batch_size']}, WSD; "
          f"grid {len(lrs)}x{len(wds)} = {grid_cost} member-steps; seeds {seeds}; seed noise sigma = {sigma:.4f} nat")
    print(f"{'method':<12} {'member-steps':>13} {'regret':>10} {'[q25, q75] or 80% band':>26} {'held-out':>9}")
    print("(tune, tpe-trained: per seed; random, tpe: median over repetitions (tabular); random-opda: expected,\n"
          " mean over seeds; held-out: the recommendation scored on the other seeds, docstring point 6)")
    for r in rows:
        spread = (f"[{r['regret_q25']:.4f}, {r['regret_q75']:.4f}]" if "regret_q25" in r else
                  f"band [{r['band_lo']:.4f}, {r['band_hi']:.4f}]" if "band_lo" in r else
                  f"seed {r['seed']}, table {r['table']:.4f}" if "table" in r else f"seed {r['seed']}")
        held_out = f"{r['heldout']:.4f}" if "heldout" in r and math.isfinite(r["heldout"]) else "-"
        print(f"{r['method']:<12} {r['member_steps']:>13} {r['regret']:>10.4f} {spread:>26} {held_out:>9}")
    tune_regret = statistics.median(r["regret"] for r in tune_rows)
    tune_cost = max(r["member_steps"] for r in tune_rows)
    at = min(b for b in budgets if b >= budget)
    print(f"tune: median regret {tune_regret:.4f} at <= {tune_cost} member-steps "
          f"({tune_cost / grid_cost:.0%} of the grid)")
    if math.isfinite(sigma):
        cheap = tune_cost <= grid_cost / 3
        ok = all(r["regret"] <= 2 * sigma for r in tune_rows) and cheap
        print(f"target 1 (within 2 sigma = {2 * sigma:.4f} of the grid's best at <= 1/3 of its cost): "
              f"{'MET' if ok else 'MISSED'}")
        # a fit's vertex is one fresh run at its own seed, against the least of the grid's 49 noisy runs; held out,
        # both sides are means over the same other seeds
        ok = all(r["heldout"] <= 2 * sigma for r in tune_rows) and cheap
        print(f"  held out (each recommendation's mean over the other seeds against the grid's best such mean): "
              f"{'MET' if ok else 'MISSED'}")
    if at in opda:
        e = statistics.fmean(v[0] for v in opda[at])
        print(f"target 2 vs random search's expected regret (opda) at {at} member-steps: tune {tune_regret:.4f} "
              f"vs {e:.4f}: {'MET' if tune_regret < e else 'MISSED'}")
    tune_held = statistics.median(r["heldout"] for r in tune_rows)
    fits = sum(r["source"] == "fit" for r in tune_rows)
    print(f"tune: {fits} of {len(tune_rows)} recommendations are the fit's vertex; recommending the best member "
          f"instead (search version 3): median regret {statistics.median(r['member_regret'] for r in tune_rows):.4f}"
          + (f", held-out {statistics.median(r['member_heldout'] for r in tune_rows):.4f}"
             if math.isfinite(tune_held) else ""))
    tune_table = statistics.median(r["table"] for r in tune_rows)
    on_grid = sum(r["on_grid"] for r in tune_rows)
    for method in ("random", "tpe"):
        other = statistics.median(per_method[method][at])
        print(f"target 2 vs {method} at {at} member-steps: tune {tune_regret:.4f} vs {other:.4f}: "
              f"{verdict(tune_regret, other)}")
        print(f"  table (the tune's recommendation looked up like theirs; {on_grid} of {len(tune_rows)} are grid "
              f"points, the rest keep their trained loss): tune {tune_table:.4f} vs {other:.4f}: "
              f"{verdict(tune_table, other)}")
        if math.isfinite(tune_held):
            other = statistics.median(held[method][at])
            print(f"  held-out (each recommendation scored on the other seeds): tune {tune_held:.4f} vs "
                  f"{other:.4f}: {verdict(tune_held, other)}")
    if tpe_rows:  # the fairest comparison: both trained, both paying a fresh run's noise at the points they chose
        compare_trained_tpe(tune_rows, tpe_rows, tune_regret, tune_held)
    name = "tune" if args.setting == "stdlib" else f"tune-{args.setting}"  # stdlib's: the README's table
    write_csv(results_dir(args.quick) / f"{name}.csv", rows,
              ["method", "seed", "member_steps", "regret", "regret_q25", "regret_q75", "band_lo", "band_hi", "table",
               "on_grid", "heldout", "member_regret", "member_heldout", "runs", "grid_best", "lr", "wd", "source",
               "axis", "check_within_noise"])
    plot(per_method, opda, tune_rows, tpe_rows, sigma, grid_cost, results_dir(args.quick) / f"{name}.png")


def compare_trained_tpe(tune_rows: list[dict], tpe_rows: list[dict], tune_regret: float, tune_held: float) -> None:
    other = statistics.median(r["regret"] for r in tpe_rows)
    print(f"target 2 vs tpe, trained over the continuous box ({len(tpe_rows)} runs, "
          f"<= {max(r['member_steps'] for r in tpe_rows)} member-steps): tune {tune_regret:.4f} vs "
          f"{other:.4f}: {verdict(tune_regret, other)}")
    print(f"  {describe_paired(paired([r['regret'] for r in tune_rows], [r['regret'] for r in tpe_rows]))}")
    other = statistics.median(r["heldout"] for r in tpe_rows)
    if math.isfinite(tune_held) and math.isfinite(other):
        print(f"  held-out: tune {tune_held:.4f} vs {other:.4f}: {verdict(tune_held, other)}")
        print(f"  {describe_paired(paired([r['heldout'] for r in tune_rows], [r['heldout'] for r in tpe_rows]))}")


def verdict(tune: float, other: float) -> str:
    """The target asks for a median regret *below* the other method's: a tie (both 0: both found the
    grid's best) does not meet it."""
    return "MET" if tune < other else "MISSED (tie)" if tune == other else "MISSED"


def paired(tune: list[float], other: list[float], reps: int = 4000, seed: int = 0) -> dict[str, float]:
    """Two methods run once per seed, compared seed by seed: at how many seeds the tune scored lower, the
    difference of the medians (tune - other), and its 90% bootstrap interval with the seeds resampled in
    pairs (a seed's two runs share its grid). One run per seed is one draw: an interval that holds zero
    says these seeds do not decide which median is lower."""
    if len(tune) != len(other) or not tune:
        raise ValueError(f"paired scores need one per seed for both methods, got {len(tune)} and {len(other)}")
    a, b = np.asarray(tune, dtype=float), np.asarray(other, dtype=float)
    pick = np.random.default_rng(seed).integers(0, len(a), size=(reps, len(a)))
    diffs = np.median(a[pick], axis=1) - np.median(b[pick], axis=1)
    lo, hi = np.quantile(diffs, [0.05, 0.95])
    return {"below": int((a < b).sum()), "seeds": len(a), "diff": float(np.median(a) - np.median(b)),
            "lo": float(lo), "hi": float(hi)}


def describe_paired(p: dict[str, float]) -> str:
    """One line of `paired`'s numbers and what they decide; under 3 seeds the resampling has next to
    nothing to draw from, so it decides nothing."""
    resolved = ("too few seeds to decide" if p["seeds"] < 3 else "tune lower" if p["hi"] < 0 else
                "tune higher" if p["lo"] > 0 else "not resolved by these seeds")
    return (f"per seed: tune lower at {p['below']} of {p['seeds']}; median difference {p['diff']:+.4f}, "
            f"90% interval over seeds [{p['lo']:+.4f}, {p['hi']:+.4f}]: {resolved}")


def random_search_curve(grid: dict, trials: list[int], budgets: list[int]) -> list[tuple[int, float, float, float]]:
    """(budget, expected best loss, band lo, band hi) of random search with `trials` draws from the grid
    (opda; diverged points count as the worst loss seen or ln 256, a uniform guess over bytes); [] without opda."""
    try:
        from trajinv.analysis.tuning_curves import default_upper_bound, tuning_curve

        losses = list(grid.values())
        curve = tuning_curve(losses, trials, 0.0, default_upper_bound(losses, vocab_size=256))
    except ImportError:
        return []
    return list(zip(budgets, curve.expected.tolist(), curve.lower.tolist(), curve.upper.tolist()))


def plot(per_method: dict, opda: dict, tune_rows: list[dict], tpe_rows: list[dict], sigma: float, grid_cost: int,
         out: Path) -> Path:
    fig = Figure(figsize=(7.5, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (method, by_budget), colour in zip(per_method.items(), ("C0", "C1")):
        bs = sorted(by_budget)
        q = np.array([np.quantile(by_budget[b], [0.25, 0.5, 0.75]) for b in bs])
        label = "random search (2-D, tabular)" if method == "random" else "TPE (2-D, tabular)"
        ax.plot(bs, q[:, 1], "o-", color=colour, label=f"{label}: median")
        ax.fill_between(bs, q[:, 0], q[:, 2], color=colour, alpha=0.2)
    if opda:
        bs = sorted(opda)
        q = np.array([[statistics.fmean(v[i] for v in opda[b]) for i in range(3)] for b in bs])
        ax.plot(bs, q[:, 0], "s--", color="C2", label="random search: expected (opda), 80% band")
        ax.fill_between(bs, q[:, 1], q[:, 2], color="C2", alpha=0.15)
    ax.plot([r["member_steps"] for r in tune_rows], [r["regret"] for r in tune_rows], "*", ms=14, color="C3",
            mec="k", label="trajinv tune (one per seed)")
    if tpe_rows:
        ax.plot([r["member_steps"] for r in tpe_rows], [r["regret"] for r in tpe_rows], "P", ms=10, color="C1",
                mec="k", label="TPE (2-D box, trained; one per seed)")
    if math.isfinite(sigma):
        ax.axhspan(0, 2 * sigma, color="0.85", zorder=0, label="within 2x seed noise")
    ax.axvline(grid_cost, color="k", ls=":", lw=1, label="full grid")
    ax.set_xscale("log")
    ax.set_xlabel("member-steps spent")
    ax.set_ylabel("regret: best loss found - grid best (nat)")
    ax.set_title("tuning lr and wd: 1-D along ELR vs 2-D search")
    ax.legend(fontsize="small")
    return save_png(fig, out)


if __name__ == "__main__":
    main()
