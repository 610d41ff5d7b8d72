"""What an --out directory holds, so that each command refuses another command's directory.

`train` writes a run (metrics.jsonl and checkpoints at the top), `sweep` a sweep (spec.json, its runs
under runs/), `tune` a tune (tune_spec.json, its sweeps under stages/). Each one's rerun resumes its
own kind; pointed at another kind it would mix its files into that one's (a train run's summary.csv
replaced a sweep's six rows with one), so it is refused in one line before anything is written.
"""

from __future__ import annotations

import errno
import json
import os
from contextlib import ExitStack
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


def hold(out: str | Path, held: ExitStack) -> None:
    """Lock the directory `out` for this process until `held` closes; one-line ValueError when another
    process holds it. Two sweeps (or tunes) into one --out, the same command started twice, wrote one
    metrics.jsonl at once: lines ran into each other, and the rerun dropped a population's metrics as
    a half-written line. An flock on the directory itself: no lock file to go stale, the kernel drops
    it with the process however that ends (SIGKILL too), and spawned workers do not inherit it. Where
    the file system has no flock (some network mounts), the sweep goes on unlocked, as before."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return
    fd = os.open(out, os.O_RDONLY)
    held.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            return  # no locks here (EBADF, ENOLCK, EOPNOTSUPP on some NFS mounts)
        raise ValueError(f"{out} is in use: another trajinv command is training into it; wait for it to end "
                         "or use another --out") from None
