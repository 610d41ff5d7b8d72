"""Shared by the bench scripts: where results go (`results_dir`) and a table as CSV.

A full run writes bench/results/ (git-ignored; the README's figures come from it); a
`--quick` run writes bench/results/quick/, so a smoke test (`make test`, `make bench`)
never replaces a full run's table with its own. TRAJINV_BENCH_RESULTS moves both (tables and
plots; the training caches of bench_tune and bench_phase stay under bench/results/).
"""

from __future__ import annotations

import argparse
import atexit
import csv
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"
"""Full runs' results, and the caches the tuning bench trains into (bench/results/tune/)."""


def results_dir(quick: bool = False) -> Path:
    """Where a run's tables and plots go: RESULTS_DIR (or $TRAJINV_BENCH_RESULTS), `quick/` below it for --quick."""
    root = Path(os.environ.get("TRAJINV_BENCH_RESULTS") or RESULTS_DIR)
    return root / "quick" if quick else root


def at_least(least: int):
    """An argparse `type`: an int >= `least`; anything else is argparse's one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value

    return parse


def csv_path(text: str) -> Path:
    """An argparse `type` for --out: a CSV file path, checked before the run (a directory there failed
    only when the table was written, after the whole run)."""
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file path such as {str(path / 'out.csv')!r}")
    return path


def quick_overrides(ap: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Refuse, in argparse's one line, options that `--quick` would silently replace with its own values."""
    given = [n for n in names if getattr(args, n) != ap.get_default(n)]
    if args.quick and given:
        ap.error(f"--quick sets its own {', '.join('--' + n.replace('_', '-') for n in given)}; drop one or the other")


def exit_on_sigterm() -> None:
    """Make SIGTERM (what `timeout` sends) an exit, so that atexit handlers and `with TemporaryDirectory()`
    blocks clean up as they do on Ctrl-C; by default it kills the process where it stands."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def refuse_missing_cuda(ap: argparse.ArgumentParser, device: str) -> None:
    """`--device cuda` on a machine without CUDA: argparse's one line, before any work."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")


def scratch(prefix: str) -> Path:
    """A temporary folder for a --quick run's training, removed when the script exits (SIGTERM too)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    exit_on_sigterm()
    return path


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    return path
