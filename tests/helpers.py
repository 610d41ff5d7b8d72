"""Helpers shared by test modules (conftest.py holds only set-up and fixtures)."""

from __future__ import annotations

import json
from pathlib import Path


def metrics_without_time(run_dir: Path) -> list[dict]:
    """A run's metric records without their wall-clock seconds: what must be bit-identical."""
    from trajinv.train import METRICS

    lines = (Path(run_dir) / METRICS).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]
