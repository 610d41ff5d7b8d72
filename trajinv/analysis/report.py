"""Everything `trajinv analyze` says about a sweep, as text and PNG files.

1. The invariance report (`invariance`): spreads within iso-LR and iso-ELR
   groups, early and late, and the observed LR -> ELR transition; loss plots.
2. The phase of each member from its own weight and update norms (`phase`):
   equilibrium step, phase at the end, regime; the sweep-level transition those
   single runs predict, beside the observed one. Needs the per-kind norms the
   trainer logs (`weight_norm_matrix`, ...); older metrics files skip it.
3. Tuning curves (`tuning_curves`): the expected best loss after n random-search
   trials over the 2-D box and along one ELR line. Needs opda and at least
   `MIN_TRIALS` finished members: without opda a one-line note, with fewer members nothing.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from trajinv.analysis.budgets import unfinished
from trajinv.analysis.invariance import AllDiverged, analyze_sweep
from trajinv.analysis.phase import (equilibrated, format_phases, member_phases, plot_phases,
                                    predicted_transition_step)
from trajinv.analysis.plots import plot_sweep
from trajinv.analysis.records import load_metrics, load_summary
from trajinv.atomic import remove_stale_temps
from trajinv.rundirs import SWEEP_SPEC, TUNE_SPEC, owner

MIN_TRIALS = 4  # fewer finished members make a tuning curve of a handful of points: not worth a figure
PHASES_PNG = "phases.png"
CURVES_PNG = "tuning_curves.png"


def sweep_report(sweep_dir: str | Path, key: str = "val_loss", x: str = "step") -> tuple[str, list[Path]]:
    """(printed report, PNG paths written into the sweep directory); `x`: "step" or "tokens" (the axis
    of the invariance report and plots; the phases always follow steps, the clock of weight decay)."""
    root = Path(sweep_dir)
    stages = root / "stages"  # trajinv.tune.runner.STAGES (analysis does not import the tuner)
    if (root / TUNE_SPEC).is_file() and not (root / "runs").is_dir():
        names = sorted(p.name for p in stages.iterdir() if p.is_dir()) if stages.is_dir() else []
        raise ValueError(f"{root} is a tune: its stages are sweeps; analyze one of them"
                         + (f" ({', '.join(str(stages / n) for n in names)})" if names else ""))
    remove_stale_temps(root, "*.png")  # of an analyze killed while it drew
    try:
        report = analyze_sweep(root, key=key, x=x)
    except AllDiverged as e:  # no curves to compare; the phases and tuning curves still say something
        report = None
        sections = [f"{e} (see summary.csv for their losses)"]
    else:
        sections = [report.format()]
    if (root / SWEEP_SPEC).is_file():
        missing, total, why = unfinished(root)
        if missing:  # an interrupted sweep: say so before numbers that read like a finished one's
            sections.insert(0, f"incomplete: {missing} of {total} members have not finished ({', '.join(why)}); "
                               f"below is what has run so far (rerun the `trajinv {owner(root)}` command to finish it)")
    paths = plot_sweep(root, key=key, x=x) if report is not None else []
    records = load_metrics(root)
    phases = member_phases(records)
    if any(p.phase_at_end != "n/a" for p in phases):
        sections.append(format_phases(phases))
        predicted = predicted_transition_step(phases)
        observed = report.transition_step if x == "step" and report is not None else None
        if predicted is not None and observed:
            sections.append(f"LR -> ELR transition: observed at step {observed}, predicted from single runs' "
                            f"equilibrium at step {predicted:.0f} (ratio {predicted / observed:.2f})")
        elif observed:  # said, not dropped: the prediction needs half the members in equilibrium
            reached, able = equilibrated(phases)
            why = (f"{reached} of {able} members reached equilibrium, half are needed" if able else
                   "every member whose norms were logged diverged")
            sections.append(f"LR -> ELR transition: observed at step {observed}; no prediction from single runs: "
                            f"{why}")
        paths.append(plot_phases(records, phases, root / PHASES_PNG))
    vocab = next((r["vocab_size"] for r in records if r.get("vocab_size")), None)
    text, curve_png = _tuning_curves(root, vocab)
    if text:
        sections.append(text)
    if curve_png is not None:
        paths.append(curve_png)
    return "\n\n".join(sections), paths


def _tuning_curves(root: Path, vocab_size: int | None = None) -> tuple[str, Path | None]:
    try:
        rows = load_summary(root)
    except FileNotFoundError:
        return "", None
    try:
        from trajinv.analysis.tuning_curves import finished_trials, plot_tuning_curves, sweep_tuning_curves
    except ImportError as e:
        return f"tuning curves skipped: {e}", None
    # one search per batch size or schedule: trials of different batch sizes are different runs of a point
    by_batch: dict[str, list[dict]] = {}
    for r in rows:
        by_batch.setdefault(str(r.get("batch_size")), []).append(r)
    curves, bests = {}, {}
    for batch, group in by_batch.items():
        trials = finished_trials(group, vocab_size)  # diverged members are finished trials too
        if len(trials) < MIN_TRIALS:
            continue
        try:
            these = sweep_tuning_curves(group, vocab_size=vocab_size)
        except ValueError as e:  # e.g. no lr with two or more members: no 1-D line to compare
            return f"tuning curves skipped: {e}", None
        prefix = f"batch {batch}: " if len(by_batch) > 1 else ""
        best = min((v for _, v in trials if v is not None), default=None)  # this batch size's best member
        for name, c in these.items():
            curves[prefix + name] = replace(c, label=prefix + (c.label or name))
            bests[prefix + name] = best
    if not curves:
        return "", None
    lines = ["expected best validation loss after n random-search trials (tuning curves):"]
    for name, c in curves.items():
        where = {n: v for n, v in zip(c.n, c.expected)}
        shown = ", ".join(f"n={n}: {where[n]:.4f}" for n in (1, 2, 4, 8) if n in where)
        best = bests[name]
        if best is None:  # every member diverged: the curve sits at the bound, nothing to reach
            lines.append(f"  {c.label or name}: {shown}; every member diverged")
            continue
        near = c.trials_to_reach(best + 0.01)
        lines.append(f"  {c.label or name}: {shown}; within 0.01 of the best member after "
                     + (f"{near} trial{'s' if near != 1 else ''}" if near is not None and math.isfinite(near)
                        else "more trials than shown"))
    return "\n".join(lines), plot_tuning_curves(curves, root / CURVES_PNG)
