"""Shared by the bench scripts: write a results table as CSV (bench/results/ by default)."""

from __future__ import annotations

import csv
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    return path
