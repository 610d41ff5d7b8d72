"""Bench: does each run's own weight norm predict the sweep's LR -> ELR switch?

The switch is observed from the spreads (`transition_step`: the first step from
which curves of equal lr*wd agree better than curves of equal lr) and predicted
without a grid, from the members' own norms (`predicted_transition_step`: the
median step at which each member's matrices reach rotational equilibrium,
`trajinv.analysis.phase`). The target: within a factor of 2.

Sweeps (trained into bench/results/phase/ when missing, reused after):

- ``demo``: the `trajinv sweep` default, lr {4, 8, 16}e-3 x wd {0.5, 1, 2},
  constant lr, 800 steps (tau = 1/(lr wd) from 31 to 500 steps);
- ``slow``: the same lrs with a quarter of the wd, 1,600 steps (tau 125 to 2,000):
  the switch should move later, and the prediction with it;
- any sweep directories given on the command line; bench_tune's 7x7 WSD grids
  (bench/results/tune/grid-s*) are added when present and finished.

A grid bigger than 3x3 is also read as every 3x3 window of neighbouring lrs and
wds, each a small sweep of its own (its taus spread over 16x).

    python bench/bench_phase.py [SWEEP_DIR ...] [--key val_loss] [--quick]

--quick trains one small sweep (60 steps, wd x 8 so that tau still fits) in a scratch
folder instead: a smoke test of the script, not a validation.

Prints a table and the verdict; writes bench/results/phase.csv and phase.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from results_csv import RESULTS_DIR, results_dir, scratch, write_csv
from trajinv.analysis.invariance import transition_step
from trajinv.analysis.phase import member_phases, predicted_transition_step
from trajinv.analysis.plots import save_png
from trajinv.analysis.records import load_metrics, load_summary
from trajinv.cli import DEMO_LRS, DEMO_WDS
from trajinv.config import DataConfig, TrainConfig
from trajinv.sweep import SweepSpec, run_sweep

OUT = RESULTS_DIR / "phase"
SWEEPS = {
    "demo": dict(wds=DEMO_WDS, steps=800),
    "slow": dict(wds=tuple(w / 4 for w in DEMO_WDS), steps=1600),
}
QUICK = dict(wds=tuple(w * 8 for w in DEMO_WDS), steps=60)
FACTOR = 2.0  # the target's tolerance on predicted / observed
WINDOW = 3  # lrs and wds per window of a larger grid


def ensure_sweep(name: str, root: Path = OUT, quick: bool = False) -> Path:
    """The named sweep's directory, trained first if it has no summary yet (a partial one resumes)."""
    out = root / name
    if not (out / "summary.csv").is_file():
        cfg = QUICK if quick else SWEEPS[name]
        small = dict(eval_every=10, log_every=5, eval_seqs=32, checkpoint_every=0) if quick else {}
        spec = SweepSpec(train=TrainConfig(steps=cfg["steps"], **small),
                         data=DataConfig(max_tokens=300_000) if quick else DataConfig(), lrs=DEMO_LRS, wds=cfg["wds"])
        print(f"training sweep {name!r} into {out} (lr {DEMO_LRS} x wd {cfg['wds']}, {cfg['steps']} steps)")
        run_sweep(spec, out)
    return out


def finished(sweep: Path) -> bool:
    """Whether every grid point of the sweep has its summary row (bench_tune may still be training it)."""
    try:
        spec = json.loads((sweep / "spec.json").read_text())
        rows = load_summary(sweep)
    except (FileNotFoundError, ValueError):
        return False
    done = [r for r in rows if r.get("status") in ("done", "diverged")]
    return len(done) >= len(spec["lrs"]) * len(spec["wds"])


def windows(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """The whole sweep, and every WINDOW x WINDOW block of neighbouring lrs and wds of a larger grid."""
    lrs = sorted({float(r["base_lr"]) for r in records})
    wds = sorted({float(r["wd"]) for r in records})
    out = [("all", records)]
    if len(lrs) <= WINDOW and len(wds) <= WINDOW:
        return out
    for i in range(len(lrs) - WINDOW + 1):
        for j in range(len(wds) - WINDOW + 1):
            lr_set, wd_set = set(lrs[i : i + WINDOW]), set(wds[j : j + WINDOW])
            sub = [r for r in records if float(r["base_lr"]) in lr_set and float(r["wd"]) in wd_set]
            out.append((f"lr {min(lr_set):.3g}..{max(lr_set):.3g}, wd {min(wd_set):.3g}..{max(wd_set):.3g}", sub))
    return out


def compare(sweep: Path, key: str) -> list[dict]:
    records = load_metrics(sweep)
    phases = {(p.run_id, p.member): p for p in member_phases(records)}
    rows = []
    for label, sub in windows(records):
        members = {(str(r.get("run_id", "")), int(r.get("member", 0))) for r in sub}
        observed = transition_step(sub, key=key)
        predicted = predicted_transition_step([phases[m] for m in sorted(members)])
        taus = sorted(1 / (phases[m].lr * phases[m].wd) for m in members if phases[m].wd > 0)
        ratio = predicted / observed if predicted is not None and observed else None
        verdict = ("agree: no switch" if predicted is None and observed is None else
                   "disagree: one sees no switch" if ratio is None else
                   "within 2x" if 1 / FACTOR <= ratio <= FACTOR else "off by more than 2x")
        rows.append({"sweep": sweep.name, "window": label, "members": len(members),
                     "tau_median": taus[len(taus) // 2] if taus else None, "observed": observed,
                     "predicted": predicted, "ratio": ratio, "verdict": verdict,
                     "in_equilibrium": sum(phases[m].equilibrium_step is not None for m in members)})
    return rows


def plot(rows: list[dict], out: Path) -> Path:
    fig = Figure(figsize=(6.4, 5.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    both = [r for r in rows if r["ratio"] is not None]
    sweeps = list(dict.fromkeys(r["sweep"] for r in both))
    for i, name in enumerate(sweeps):
        pts = [r for r in both if r["sweep"] == name]
        ax.plot([r["observed"] for r in pts], [r["predicted"] for r in pts], "o", color=f"C{i}",
                ms=8 if any(r["window"] == "all" for r in pts) else 6, alpha=0.8, label=name)
    if both:
        lo = min(min(r["observed"], r["predicted"]) for r in both) / 2.5
        hi = max(max(r["observed"], r["predicted"]) for r in both) * 2.5
        xs = [lo, hi]
        ax.plot(xs, xs, color="0.3", lw=1)
        ax.fill_between(xs, [x / FACTOR for x in xs], [x * FACTOR for x in xs], color="0.85", zorder=0,
                        label=f"within {FACTOR:g}x")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.legend(fontsize="small")
    ax.set_xscale("log")
    ax.set_yscale("log")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in dict.fromkeys(r["verdict"] for r in rows)}
    ax.set_title("; ".join(f"{n} {v}" for v, n in counts.items()), fontsize="small")
    ax.set_xlabel("observed LR -> ELR switch (step, from the spreads)")
    ax.set_ylabel("predicted (median single-run equilibrium step)")
    ax.grid(True, alpha=0.3, which="both")
    return save_png(fig, out)


CURVE_KEYS = ("val_loss", "train_loss", "grad_norm", "precond_grad_norm", "weight_norm", "update_norm")
"""Per-step metrics whose spreads `trajinv.analysis.transition_step` compares (metrics.jsonl keys)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweeps", nargs="*", type=Path, help="extra sweep directories")
    ap.add_argument("--key", default="val_loss", choices=CURVE_KEYS,  # checked before minutes of training
                    help="the curves the observed switch is read from")
    ap.add_argument("--quick", action="store_true", help="one small sweep in a scratch folder: a smoke test")
    args = ap.parse_args()
    missing = [d for d in args.sweeps if not (d / "summary.csv").is_file()]
    if missing:  # before any training: the default sweeps take minutes
        ap.error(f"{missing[0]} is not a sweep directory (no summary.csv)")
    if args.quick:
        dirs = [ensure_sweep("quick", scratch("bench-phase-"), quick=True)]
    else:
        dirs = [ensure_sweep(name) for name in SWEEPS]
        dirs += [d for d in sorted((RESULTS_DIR / "tune").glob("grid-s*")) if finished(d)]
    dirs += list(args.sweeps)
    rows = [row for d in dirs for row in compare(d, args.key)]
    print(f"{'sweep':<8} {'window':<34} {'tau med':>8} {'eq':>5} {'observed':>9} {'predicted':>10} "
          f"{'ratio':>6}  verdict")

    def cell(v, fmt="{:.0f}"):
        return "-" if v is None else fmt.format(v)

    for r in rows:
        print(f"{r['sweep']:<8} {r['window']:<34} {cell(r['tau_median']):>8} "
              f"{r['in_equilibrium']:>2}/{r['members']:<2} {cell(r['observed']):>9} {cell(r['predicted']):>10} "
              f"{cell(r['ratio'], '{:.2f}'):>6}  {r['verdict']}")
    whole = [r for r in rows if r["window"] == "all"]
    print(f"whole sweeps: {sum(r['verdict'].startswith(('within', 'agree')) for r in whole)}/{len(whole)} "
          f"within {FACTOR:g}x or agreeing that there is no switch")
    both = [r for r in rows if r["ratio"] is not None]
    if both:
        print(f"sweeps and windows where both see a switch: {sum(r['verdict'] == 'within 2x' for r in both)}/"
              f"{len(both)} within {FACTOR:g}x (median ratio {statistics.median(r['ratio'] for r in both):.2f})")
    one = [r for r in rows if r["verdict"].startswith("disagree")]
    print(f"where only one sees a switch: {len(one)} ({sum(r['predicted'] is not None for r in one)} predicted "
          f"but not observed, {sum(r['observed'] is not None for r in one)} observed but not predicted); "
          f"both see none: {sum(r['verdict'] == 'agree: no switch' for r in rows)}")
    write_csv(results_dir(args.quick) / "phase.csv", rows)
    print(f"wrote {plot(rows, results_dir(args.quick) / 'phase.png')}")


if __name__ == "__main__":
    main()
