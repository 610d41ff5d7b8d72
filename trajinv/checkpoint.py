"""Checkpoints: tensors as safetensors plus a JSON sidecar, committed atomically.

Layout in a run directory: `checkpoint-<step>.safetensors` and `checkpoint.json`.
The tensors go to a new file first; renaming the sidecar (which names that file)
into place is the single commit point; only then is the previous tensor file
removed. A crash at any moment leaves one whole, consistent checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from trajinv.atomic import atomic_write

SIDECAR = "checkpoint.json"


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write a checkpoint of `step` into run_dir; returns the tensor file's path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{step:08d}.safetensors"
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(run_dir / name, lambda f: f.write(save(flat)))
    sidecar = dict(meta, step=step, tensor_file=name)
    atomic_write(run_dir / SIDECAR, lambda f: f.write(json.dumps(sidecar, indent=1, sort_keys=True)), mode="w")
    for old in run_dir.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink()
    return run_dir / name


def load_checkpoint(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, meta) from run_dir, or None when it holds no checkpoint yet."""
    sidecar = Path(run_dir) / SIDECAR
    if not sidecar.exists():
        return None
    meta = json.loads(sidecar.read_text())
    return load_file(str(Path(run_dir) / meta["tensor_file"])), meta
