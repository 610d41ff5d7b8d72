"""Bench: is a setting's optimum interior in both lr and wd?

bench_tune.py compares `trajinv tune` with 2-D search; the comparison means most on a
setting whose best (lr, wd) is interior in both (a best wd at the smallest one tried
says only that wd does not matter there). This trains a candidate setting's lr x wd
grid at each seed (sweep directories cached under bench/results/setting/<name>/; a
rerun reuses or resumes them) and prints, per seed and for the seed mean, the grid, its
best point and, along each axis, whether that point is interior and by how much its two
neighbours on the axis are worse (the margin: the smaller of the two), next to the seed
noise (bench_tune's: the std over seeds at the five best points).

Settings (both bench_tune's model and training: tiny, byte tokens, batch 32, 800 steps, WSD):
- `stdlib`: bench_tune's own grid on the whole embedded corpus (the training text never
  repeats). Its best wd sits on a plateau at small wd (README, "Against 2-D search").
- `small-corpus`: the first 400,000 tokens of the same corpus, so 800 steps see each
  training token about 4 times; the gap to the held-out documents then grows with the
  weights, and weight decay has something to do. Its grid is centred where a wider
  first grid put the best point; at seeds 0 and 1 the best is interior in both (README,
  "A setting whose optimum is interior in both").

    python bench/bench_setting.py [--setting small-corpus] [--seeds 0 1] [--devices cpu,cpu] [--quick]

Writes bench/results/setting.csv (every point: setting, seed or 'mean', lr, wd, loss)
and setting.png (the seed mean's grid, its best point marked).
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import bench_tune
from bench_tune import reference_grid, seed_noise
from results_csv import RESULTS_DIR, results_dir, scratch, write_csv
from trajinv.analysis.plots import save_png


_STDLIB, _SMALL = bench_tune.SETTINGS["stdlib"], bench_tune.SETTINGS["small-corpus"]
SETTINGS = {  # bench_tune's corpus and training; the grid (lr_log2 x wd_log2) may differ
    "stdlib": _STDLIB,
    # a first 5x5 grid (lr 2^-11..2^-7, wd 2^-4..2^0, seed 0) put the best point at wd 2^0, its edge, and the
    # rows beyond it at wd 2^1 (best), 2^2, 2^3: this grid is centred on that point
    "small-corpus": replace(_SMALL, lr_log2=range(-10, -5), wd_log2=range(-1, 4)),
}
Grid = dict[tuple[float, float], float | None]  # (lr, wd) -> final validation loss; None: diverged


def train_grid(setting: bench_tune.Setting, seed: int, quick: bool, out: Path, devices: str | None) -> Grid:
    """The seed's grid, trained or read back: bench_tune's reference grid on this setting's axes."""
    return reference_grid(seed, quick, setting.data_for(quick), out, devices, setting)


def mean_grid(grids: list[Grid]) -> Grid:
    """The mean over seeds at each point (None where any seed diverged)."""
    return {k: (None if any(g[k] is None for g in grids) else statistics.fmean(g[k] for g in grids)) for k in grids[0]}


@dataclass(frozen=True)
class Verdict:
    best: tuple[float, float]
    loss: float
    interior: dict[str, bool]
    """'lr', 'wd' -> the best point has a neighbour on both sides along that axis."""
    margin: dict[str, float]
    """'lr', 'wd' -> how much worse the better of its two neighbours along the axis is (nan at an edge)."""


def judge(grid: Grid) -> Verdict:
    """Where the grid's best point lies along each axis (a diverged neighbour counts as infinitely worse)."""
    lrs, wds = sorted({k[0] for k in grid}), sorted({k[1] for k in grid})
    best = min((k for k in grid if grid[k] is not None), key=lambda k: grid[k])
    i, j = lrs.index(best[0]), wds.index(best[1])
    loss = grid[best]

    def along(axis: list[float], at: int, key) -> tuple[bool, float]:
        if not 0 < at < len(axis) - 1:
            return False, math.nan
        sides = [grid[key(axis[at - 1])], grid[key(axis[at + 1])]]
        return True, min(math.inf if v is None else v - loss for v in sides)

    lr_in, lr_margin = along(lrs, i, lambda lr: (lr, best[1]))
    wd_in, wd_margin = along(wds, j, lambda wd: (best[0], wd))
    return Verdict(best, loss, {"lr": lr_in, "wd": wd_in}, {"lr": lr_margin, "wd": wd_margin})


def describe(name: str, grid: Grid) -> list[str]:
    """The grid as a table (rows lr, columns wd, in log2) and its verdict."""
    lrs, wds = sorted({k[0] for k in grid}), sorted({k[1] for k in grid})
    lines = [f"{name}: final validation loss (rows log2 lr, columns log2 wd)",
             "        " + "".join(f"{math.log2(w):>8.0f}" for w in wds)]
    for lr in lrs:
        cells = "".join(f"{'div':>8}" if grid[(lr, w)] is None else f"{grid[(lr, w)]:>8.4f}" for w in wds)
        lines.append(f"{math.log2(lr):>8.0f}{cells}")
    v = judge(grid)
    where = ", ".join(f"{axis} {'interior' if v.interior[axis] else 'at the edge'}"
                      + (f" (margin {v.margin[axis]:.4f})" if v.interior[axis] else "") for axis in ("lr", "wd"))
    lines.append(f"best {v.loss:.4f} at lr 2^{math.log2(v.best[0]):.0f}, wd 2^{math.log2(v.best[1]):.0f}: {where}")
    return lines


def plot(grid: Grid, title: str, out: Path) -> Path:
    """The grid as a heatmap in log2 lr x log2 wd, each cell's loss written in it, the best one framed."""
    lrs, wds = sorted({k[0] for k in grid}), sorted({k[1] for k in grid})
    z = np.array([[np.nan if grid[(lr, w)] is None else grid[(lr, w)] for w in wds] for lr in lrs])
    fig = Figure(figsize=(5.6, 4.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x, y = [math.log2(w) for w in wds], [math.log2(lr) for lr in lrs]
    mesh = ax.pcolormesh(x, y, z, shading="nearest", cmap="viridis_r")
    mid = np.nanmean(z) if np.isfinite(z).any() else 0.0
    for r, c in np.ndindex(z.shape):  # the numbers too: a colour scale cannot show a margin of 0.01 nat
        text = "div" if np.isnan(z[r, c]) else f"{z[r, c]:.3f}"
        ax.text(x[c], y[r], text, ha="center", va="center", fontsize=7,
                color="black" if np.isnan(z[r, c]) or z[r, c] < mid else "white")
    fig.colorbar(mesh, ax=ax, label="final validation loss (nat)")
    v = judge(grid)
    ax.add_patch(Rectangle((math.log2(v.best[1]) - 0.5, math.log2(v.best[0]) - 0.5), 1, 1, fill=False,
                           edgecolor="red", linewidth=2, label=f"best {v.loss:.4f}"))  # around its number
    ax.set(xlabel="log2 weight decay", ylabel="log2 learning rate", title=title, xticks=x, yticks=y)
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.14), frameon=False)
    return save_png(fig, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="small-corpus", help="the candidate setting")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1)")
    ap.add_argument("--devices", default=None, help="train on several devices at once, e.g. 'cpu,cpu'")
    ap.add_argument("--quick", action="store_true", help="a 3x3 grid of a few steps, one seed: a smoke test")
    args = ap.parse_args()
    if args.seeds is not None and (min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds)):
        ap.error(f"--seeds must be distinct and >= 0, got {' '.join(map(str, args.seeds))}")
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    setting = SETTINGS[args.setting]
    out = scratch("bench-setting-") if args.quick else RESULTS_DIR / "setting" / args.setting
    grids = [train_grid(setting, s, args.quick, out, args.devices) for s in seeds]
    rows = []

    def table(seed, grid: Grid) -> list[dict]:
        return [{"setting": args.setting, "seed": seed, "lr": lr, "wd": wd, "loss": v} for (lr, wd), v in grid.items()]

    for seed, grid in zip(seeds, grids):
        print("\n".join(describe(f"seed {seed}", grid)), end="\n\n")
        rows += table(seed, grid)
    mean = mean_grid(grids)
    named = ", ".join(map(str, seeds))
    if len(grids) > 1:
        print("\n".join(describe(f"mean over seeds {named}", mean)))
        print(f"seed noise sigma = {seed_noise(grids):.4f} nat (std over seeds at the five best points)")
        rows += table("mean", mean)
    where = results_dir(args.quick)
    write_csv(where / "setting.csv", rows)
    title = f"{args.setting}, " + (f"mean over seeds {named}" if len(seeds) > 1 else f"seed {named}")
    print(f"wrote {plot(mean, title, where / 'setting.png')}")


if __name__ == "__main__":
    main()
