"""What an --out directory holds, so that each command refuses another command's directory.

`train` writes a run (metrics.jsonl and checkpoints at the top), `sweep` a sweep (spec.json, its runs
under runs/), `tune` a tune (tune_spec.json, its sweeps under stages/). Each one's rerun resumes its
own kind; pointed at another kind it would mix its files into that one's (a train run's summary.csv
replaced a sweep's six rows with one), so it is refused in one line before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from trajinv.checkpoint import has_checkpoint
from trajinv.metrics import METRICS

SWEEP_SPEC = "spec.json"
TUNE_SPEC = "tune_spec.json"
_COMMAND = {"train run": "train", "sweep": "sweep", "tune": "tune"}


def holds(out: str | Path) -> str | None:
    """'tune', 'sweep' or 'train run' (what `out` holds, by its marker file), or None."""
    out = Path(out)
    if (out / TUNE_SPEC).is_file():
        return "tune"
    if (out / SWEEP_SPEC).is_file():
        return "sweep"
    if (out / METRICS).is_file() or has_checkpoint(out):
        return "train run"
    return None


def refuse_other(out: str | Path, mine: str) -> None:
    """One-line ValueError if `out` holds what another command than `mine` ('train', 'sweep', 'tune')
    wrote."""
    held = holds(out)
    if held is not None and _COMMAND[held] != mine:
        raise ValueError(f"{out} holds a {held} (`trajinv {_COMMAND[held]}`), not a {mine}: choose a new --out "
                         "directory")
