"""Bench: compare search settings of `trajinv tune` on a surrogate of bench_tune's own runs.

Comparing two settings of the search for real costs ~8 minutes per seed here (16
members of 800 steps). This replays them instead, thousands of times, on a model of the
loss surface built from every run bench_tune trained:

- **Surrogate, per seed**: a Gaussian process in (log2 lr, log2 wd) (squared-exponential
  kernel, a constant mean; length scales, amplitude and noise chosen by marginal
  likelihood over a small grid) through all of the seed's cached runs: its grid, TPE
  trials, tune members and held-out points. Its mean is the replay's "true" loss.
- **Training noise**: a replayed evaluation adds N(0, noise^2), noise the GP's own
  (its nugget, chosen with the rest): how far a run at a new (lr, wd) lands from the
  smooth surface at that seed. That is more than retraining the *same* point moves the
  loss (a tune's member that is also a grid point: printed, near the optimum), because at
  one seed the loss is rough in (lr, wd) beyond what a smooth surface follows.
- **Replays** at bench_tune's budget: the tune (`trajinv.tune.search`, with the runner's
  switch to an lr search when the scan's best member has too few steps for the LR->ELR
  transition; B_precond unmeasured, so the batch counts as small, as measured here:
  B_precond 300-500 against batch 32) and Optuna's TPE
  over the grid's box in populations (bench_tune's own loop). Regret = the loss at the
  recommendation (TPE's best trial; the tune's best member, or its fit's vertex trained
  once more, a fresh draw of the noise, as bench_tune trains it) - the best of a
  replayed (noisy) grid; held-out = the other seeds' surrogate at the
  recommendation - their best grid mean, as bench_tune scores it.

It prints, per setting, the mean and sd over repetitions of the *median* over the seeds
(every seed with a cached grid) of regret and held-out regret (what bench_tune's targets
compare). A surrogate smooths what it was not shown
and knows nothing the runs did not see: use it to choose what to train, then train it
with bench_tune. `--quick` replays on a synthetic surface (no cached runs needed).

    python bench/tune_surrogate.py [--quick] [--reps 60] [--noise NAT] [--runs DIR]
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path
from typing import Callable

import numpy as np

from bench_tune import LR_LOG2, OUT, SETTING, TUNE, WD_LOG2, _tpe_in_populations, train_config
from results_csv import results_dir, write_csv
from trajinv.tune.runner import TuneSpec, first_regime, lr_search
from trajinv.tune.search import Outcome, Point, Search, SearchConfig, Stage

STEPS = SETTING["steps"]
GRID_MEMBERS = len(LR_LOG2) * len(WD_LOG2)
SE = 0.022  # the validation-window bootstrap se of a final loss in this setting (tune.json's val_loss_se)
CLIP = 2.0  # nat: see GaussianProcess.fit
Surface = Callable[[float, float], float]  # (log2 lr, log2 wd) -> loss


class GaussianProcess:
    """Posterior mean of a GP with a squared-exponential kernel and a constant mean."""

    def __init__(self, x: np.ndarray, y: np.ndarray, scales: tuple[float, float], amp: float, noise: float):
        self.x, self.scales, self.amp, self.noise, self.mean = x, np.asarray(scales), amp, noise, float(y.mean())
        chol = np.linalg.cholesky(self._kernel(x, x) + noise ** 2 * np.eye(len(x)))
        self.alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, y - self.mean))
        self.nll = 0.5 * float((y - self.mean) @ self.alpha) + float(np.log(np.diag(chol)).sum())

    def _kernel(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = (a[:, None, :] - b[None, :, :]) / self.scales
        return self.amp ** 2 * np.exp(-0.5 * (d ** 2).sum(-1))

    def __call__(self, lr_log2: float, wd_log2: float) -> float:
        return self.mean + (self._kernel(np.array([[lr_log2, wd_log2]]), self.x) @ self.alpha).item()

    @classmethod
    def fit(cls, points: list[tuple[float, float, float]]) -> GaussianProcess:
        """The most likely of a small grid of hyperparameters (length scales in octaves, nat)."""
        x = np.array([(a, b) for a, b, _ in points])
        # losses above CLIP (lr 2^-4, far from any optimum) would set the amplitude and length scales
        # for a region no search stays in
        y = np.minimum([loss for _, _, loss in points], CLIP)
        fits = (cls(x, y, (sl, sw), amp, noise) for sl in (0.5, 0.7, 1.0) for sw in (0.7, 1.0, 1.5, 2.0)
                for amp in (0.2, 0.4) for noise in (0.004, 0.007, 0.01, 0.015, 0.02, 0.03))
        return min(fits, key=lambda g: g.nll)


def cached_runs(runs: Path, seed: int) -> dict[str, list[tuple[float, float, float]]]:
    """(log2 lr, log2 wd, final loss) of the seed's finished members, by where they come from. A member found
    twice with the same loss (a stage copied into a newer tune's directory, or the same point retrained in the
    same kind of run: training is deterministic) counts once: it is one observation."""
    def read(pattern: str) -> list[tuple[float, float, float]]:
        found = {}
        for path in sorted(runs.glob(pattern)):
            for r in csv.DictReader(path.open()):
                if r["status"] == "done" and r["final_val_loss"] and math.isfinite(float(r["final_val_loss"])):
                    run = (math.log2(float(r["lr"])), math.log2(float(r["wd"])), float(r["final_val_loss"]))
                    found.setdefault(tuple(round(v, 9) for v in run), run)
        return list(found.values())

    return {"grid": read(f"grid-s{seed}/summary.csv"), "tpe": read(f"tpe*-s{seed}/batch-*/summary.csv"),
            "tune": read(f"tune*-s{seed}/stages/*/summary.csv"), "heldout": read(f"heldout/*-s{seed}/summary.csv")}


def cached_seeds(runs: Path) -> list[int]:
    """The seeds bench_tune has a finished grid for (grid-s<seed>/summary.csv)."""
    names = (p.parent.name.removeprefix("grid-s") for p in runs.glob("grid-s*/summary.csv"))
    return sorted(int(n) for n in names if n.isdigit())


def retrain_noise(runs: dict[str, list[tuple[float, float, float]]], near: float = 0.05) -> list[float]:
    """Loss differences between a tune member and the grid run at the same point (same seed), where the grid's
    loss is within `near` nat of its best (far from it, at lr 2^-6 and above, retraining moves the loss by
    up to 0.2 nat: no search stays there)."""
    grid = {(round(a, 6), round(b, 6)): loss for a, b, loss in runs["grid"]}
    best = min(grid.values())
    return [loss - grid[k] for a, b, loss in runs["tune"]
            if (k := (round(a, 6), round(b, 6))) in grid and grid[k] - best <= near]


def synthetic(seed: int) -> Surface:
    """--quick: a bowl tilted in lr, flat-ish in wd (what bench_tune's grids look like), per seed."""
    shift = 0.2 * (seed - 2)
    return lambda a, b: 1.5 + 0.06 * (a + 8.2 + shift) ** 2 + 0.004 * (b + 3) ** 2 + 0.01 * max(0.0, b)


def replay_tune(truth: Surface, noise: float, rng: np.random.Generator, budget: int, **search) -> tuple[float, Point]:
    """The loss at the recommendation of one replayed tune, and the recommendation: trajinv.tune.runner's flow
    (its regime and its lr search), with B_precond unmeasured (the batch counts as small, as measured on this
    setting)."""
    spec = TuneSpec(train=train_config(0, quick=False), search=SearchConfig(**{**TUNE, **search}, budget=budget))

    def train(stage: Stage) -> list[Outcome]:
        return [Outcome(p, truth(math.log2(p.lr), math.log2(p.wd)) + rng.normal(0, noise), SE) for p in stage.points]

    s = Search(spec.search_config("elr"))
    first = s.next_stage()
    outcomes = train(first)
    s.tell(first, outcomes)
    if first_regime(spec, outcomes, []).axis == "lr":
        s = lr_search(spec, outcomes, len(outcomes) * STEPS) or s
    while (stage := s.next_stage()) is not None:
        s.tell(stage, train(stage))
    r = s.result()
    reco = r.recommendation
    if reco.source == "member":
        return r.loss, r.best
    x, y = math.log2(reco.lr), math.log2(reco.wd)  # the fit's vertex: never trained by the tune, trained now
    return truth(x, y) + rng.normal(0, noise), Point(reco.lr, reco.wd)


def replay_tpe(truth: Surface, noise: float, rng: np.random.Generator, budget: int, seed: int) -> tuple[float, Point]:
    """Best loss seen and its point of a replayed TPE over the grid's box (bench_tune's loop)."""
    lo_lr, hi_lr, lo_wd, hi_wd = (2.0 ** e for e in (LR_LOG2[0], LR_LOG2[-1], WD_LOG2[0], WD_LOG2[-1]))

    def evaluate(batch: list, _: int) -> list[tuple[float, tuple[float, float]]]:
        points = [(t.suggest_float("lr", lo_lr, hi_lr, log=True), t.suggest_float("wd", lo_wd, hi_wd, log=True))
                  for t in batch]
        return [(truth(math.log2(lr), math.log2(wd)) + rng.normal(0, noise), (lr, wd)) for lr, wd in points]

    loss, (lr, wd) = _tpe_in_populations(seed, budget // STEPS, TUNE["points"], evaluate)
    return loss, Point(lr, wd)


def score(surfaces: list[tuple[Surface, float]], reps: int,
          method: Callable[[Surface, float, np.random.Generator, int], tuple[float, Point]]) -> dict[str, float]:
    """Mean and sd over `reps` of the median over seeds of regret and held-out regret; `surfaces` are
    (truth, noise) per seed, `method(truth, noise, rng, seed)` a replay."""
    grid = [(a, b) for a in LR_LOG2 for b in WD_LOG2]
    held_best = [min(statistics.fmean(f(a, b) for j, (f, _) in enumerate(surfaces) if j != i) for a, b in grid)
                 for i in range(len(surfaces))]
    medians, held = [], []
    for rep in range(reps):
        regrets, heldout = [], []
        for i, (truth, noise) in enumerate(surfaces):
            rng = np.random.default_rng([rep, i])
            grid_best = min(truth(a, b) + rng.normal(0, noise) for a, b in grid)
            loss, p = method(truth, noise, rng, rep * 1000 + i)
            regrets.append(loss - grid_best)
            others = [f(math.log2(p.lr), math.log2(p.wd)) for j, (f, _) in enumerate(surfaces) if j != i]
            heldout.append(statistics.fmean(others) - held_best[i] if others else math.nan)
        medians.append(statistics.median(regrets))
        held.append(statistics.median(heldout))
    return {"regret": statistics.fmean(medians), "regret_sd": statistics.pstdev(medians),
            "heldout": statistics.fmean(held), "heldout_sd": statistics.pstdev(held)}


SETTINGS = {  # name -> SearchConfig overrides of bench_tune's TUNE
    "tune points=7": dict(points=7), "tune points=5": dict(points=5), "tune points=4": dict(points=4),
    "tune points=4 zoom +-1 octave": dict(points=4, zoom_width=1.0),  # the zoom before zoom_width (+-s/2)
    "tune points=4 check x1/2,x2": dict(points=4, check_factors=(0.5, 2.0)),
    "tune points=7 check x1/2,x2": dict(points=7, check_factors=(0.5, 2.0)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a synthetic surface, few repetitions: a smoke test")
    ap.add_argument("--runs", type=Path, default=OUT, help="bench_tune's cache (default bench/results/tune)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="seeds to model (default: every seed with a cached grid; quick: 0-4)")
    ap.add_argument("--reps", type=int, default=None, help="replays per setting (default 60; quick 3)")
    ap.add_argument("--noise", type=float, default=None,
                    help="training noise in nat at every seed (default: each seed's GP noise)")
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 60)
    if args.reps is not None and args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    if args.noise is not None and not args.noise >= 0:
        ap.error(f"--noise must be >= 0, got {args.noise}")
    if args.seeds is None:
        args.seeds = [0, 1, 2, 3, 4] if args.quick else cached_seeds(args.runs)
        if not args.seeds:
            ap.error(f"no cached grid under {args.runs}: run bench/bench_tune.py first (or pass --quick)")
    if args.quick:
        surfaces, measured = [(synthetic(s), 0.01) for s in args.seeds], []
    else:
        runs = [cached_runs(args.runs, s) for s in args.seeds]
        if not all(r["grid"] for r in runs):
            raise SystemExit(f"no cached grid for every seed {args.seeds} under {args.runs}: "
                             "run bench/bench_tune.py first (or --quick)")
        gps = [GaussianProcess.fit([p for group in r.values() for p in group]) for r in runs]
        surfaces = [(gp, gp.noise) for gp in gps]
        measured = [d for r in runs for d in retrain_noise(r)]
    if args.noise is not None:
        surfaces = [(f, args.noise) for f, _ in surfaces]
    print(f"surrogate of {'a synthetic surface' if args.quick else args.runs}, seeds {args.seeds}; training noise "
          f"per seed {', '.join(f'{n:.4f}' for _, n in surfaces)} nat")
    if measured:
        rms = math.sqrt(statistics.fmean(d * d for d in measured))
        print(f"(retraining the same point near the optimum: rms {rms:.4f} nat over {len(measured)} pairs)")
    budget = GRID_MEMBERS * STEPS // 3
    methods = {name: (lambda f, noise, rng, seed, o=o: replay_tune(f, noise, rng, budget, **o))
               for name, o in SETTINGS.items()}
    methods["tpe (trained, 2-D box)"] = lambda f, noise, rng, seed: replay_tpe(f, noise, rng, budget, seed)
    rows = []
    print(f"{'setting':<30} {'median regret':>14} {'sd':>7} {'held-out':>9} {'sd':>7}   ({reps} replays, "
          f"budget {budget} member-steps)")
    for name, method in methods.items():
        r = score(surfaces, reps, method)
        rows.append({"setting": name, **r, "reps": reps})
        print(f"{name:<30} {r['regret']:>14.4f} {r['regret_sd']:>7.4f} {r['heldout']:>9.4f} {r['heldout_sd']:>7.4f}",
              flush=True)
    write_csv(results_dir(args.quick) / "tune_surrogate.csv", rows, ["setting", "regret", "regret_sd", "heldout", "heldout_sd",
                                                         "reps"])


if __name__ == "__main__":
    main()
