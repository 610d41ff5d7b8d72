"""What an --out directory holds, so that each command refuses another command's directory.

`train` writes a run (metrics.jsonl and checkpoints at the top), `sweep` a sweep (spec.json, its runs
under runs/), `tune` a tune (tune_spec.json, its sweeps under stages/). Each one's rerun resumes its
own kind; pointed at another kind it would mix its files into that one's (a train run's summary.csv
replaced a sweep's six rows with one), so it is refused in one line before anything is written.
"""

from __future__ import annotations

import json
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


def owner(out: str | Path) -> str | None:
    """The command whose rerun finishes `out`: 'tune' for a tune or one of its stages (a sweep under the
    tune's stages/), else `holds`' command, or None."""
    out = Path(out)
    if out.parent.name == "stages" and holds(out.parent.parent) == "tune":  # trajinv.tune.runner.STAGES
        return "tune"
    held = holds(out)
    return None if held is None else _COMMAND[held]


def refuse_other(out: str | Path, mine: str) -> None:
    """One-line ValueError if `out` holds what another command than `mine` ('train', 'sweep', 'tune')
    wrote."""
    held = holds(out)
    if held is not None and _COMMAND[held] != mine:
        raise ValueError(f"{out} holds a {held} (`trajinv {_COMMAND[held]}`), not a {mine}: choose a new --out "
                         "directory")


def trained_split(out: str | Path) -> int | None:
    """A sweep's population size (its spec.json's) once any of its runs has a checkpoint, else None.

    What a rerun without --population keeps; until then it is sized afresh
    (`trajinv.parallel.memory.size_populations`). ValueError when runs have checkpoints but spec.json's
    population cannot be read: the sweep is refused rather than regrouped."""
    out = Path(out)
    runs = out / "runs"
    if not runs.is_dir() or not any(has_checkpoint(d) for d in runs.iterdir() if d.is_dir()):
        return None
    try:
        population = json.loads((out / SWEEP_SPEC).read_text()).get("population", 0)
    except (OSError, ValueError, AttributeError):
        population = None
    if isinstance(population, bool) or not isinstance(population, int) or population < 0:
        raise ValueError(f"{out / SWEEP_SPEC} has no readable population size (population: {population!r}) but "
                         "its runs have trained; restore it, or use a new --out directory")
    return population
