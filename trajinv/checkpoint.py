"""Checkpoints: tensors as safetensors plus a JSON sidecar each; the last N kept; validated on load.

Layout in a run directory, per checkpoint of step s (8 digits, zero-padded):

    checkpoint-<s>.safetensors   the tensors; the step is also in the file's header metadata
    checkpoint-<s>.json          the sidecar: meta (run_id, tokens, seconds, config), step,
                                 tensor_file, tensor_bytes (the tensor file's size), format

Commit protocol (`save_checkpoint`):

1. the tensors go to `checkpoint-<s>.safetensors` through `atomic_write` (a temporary file
   beside it, fsync, rename);
2. the sidecar goes to `checkpoint-<s>.json` the same way: **this rename is the commit
   point**; the directory is then fsynced, so the renames survive a host crash too;
3. pruning: checkpoints with a step above s (an abandoned trajectory) and all but the
   newest `keep` at or below s are deleted, each sidecar before its tensor file.

No pointer file: the newest *valid* sidecar wins. `load_checkpoint` tries the sidecars
newest first. A sidecar is valid when it parses as a JSON object with the required keys,
its step matches its file name, it names its own tensor file, that file has the recorded
size, its safetensors header parses and records the same step, and the tensors load (plus
whatever the caller checks). A damaged checkpoint is reported in one line on stderr naming
the file and the next older one is used; when none is usable the load fails with
`CheckpointError` naming the newest. The checks catch truncated, empty, garbage or swapped
files and an edited step; they do not checksum the tensor bytes (a bit flip inside the data
of an intact file goes unnoticed).

A process killed at any moment leaves the previous checkpoint whole; what it may leave
besides (a temporary file of an interrupted write, a tensor file whose sidecar was never
written or was pruned first) is removed by `clean_run_dir`, which the trainer runs on
resume. A sidecar of the old single-sidecar layout (`checkpoint.json`) is still read,
without the step cross-check its tensor file cannot provide, and pruned at the next save.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from trajinv.atomic import atomic_write, remove_stale_temps

FORMAT = 2
LEGACY_SIDECAR = "checkpoint.json"
REQUIRED_KEYS = ("step", "tensor_file", "tensor_bytes")
_SIDECAR_RE = re.compile(r"checkpoint-(\d{8,})\.json")
_TENSORS_RE = re.compile(r"checkpoint-(\d{8,})\.safetensors")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message is one line naming the file."""


def tensor_name(step: int) -> str:
    return f"checkpoint-{step:08d}.safetensors"


def sidecar_name(step: int) -> str:
    return f"checkpoint-{step:08d}.json"


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps of the committed checkpoints (those with a sidecar), ascending; not validated."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in run_dir.iterdir() if (m := _SIDECAR_RE.fullmatch(p.name)))


def latest_meta(run_dir: str | Path) -> dict[str, Any] | None:
    """The sidecar of the newest checkpoint that parses (no tensor checks), or None: where a run got to."""
    for step in reversed(checkpoint_steps(run_dir)):
        try:
            return json.loads((Path(run_dir) / sidecar_name(step)).read_text())
        except (OSError, ValueError):
            continue
    return None


def newest_sidecar(run_dir: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint's sidecar when it passes every check that reads no tensor data: a valid
    sidecar of its step, naming its own tensor file, which has the recorded size and a safetensors header
    that parses and records the same step. None when there is no checkpoint or it fails one
    (`load_checkpoint` then decides, says why, and may fall back to an older checkpoint)."""
    steps = checkpoint_steps(run_dir)
    if not steps:
        return None
    run_dir = Path(run_dir)
    try:
        meta = _read_sidecar(run_dir / sidecar_name(steps[-1]), steps[-1])
        path = run_dir / meta["tensor_file"]
        if path.stat().st_size != meta["tensor_bytes"]:
            return None
        with safe_open(str(path), framework="pt") as f:  # the header only
            if (f.metadata() or {}).get("step") != str(meta["step"]):
                return None
    except Exception:  # noqa: BLE001 - safetensors raises its own error types; any means not trusted here
        return None
    return meta


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether run_dir holds a committed checkpoint (valid or not)."""
    return bool(checkpoint_steps(run_dir)) or (Path(run_dir) / LEGACY_SIDECAR).is_file()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. some network file systems): the renames are still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write and commit a checkpoint of `step` into run_dir, then prune to the newest `keep`;
    returns the tensor file's path."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = tensor_name(step)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(flat, metadata={"step": str(step), "format": str(FORMAT)})
    atomic_write(run_dir / name, lambda f, payload=data: f.write(payload))
    sidecar = dict(meta, step=step, tensor_file=name, tensor_bytes=len(data), format=FORMAT)
    del data  # a whole checkpoint's bytes: free them before the sidecar write and the pruning
    atomic_write(run_dir / sidecar_name(step), lambda f: f.write(json.dumps(sidecar, indent=1, sort_keys=True)),
                 mode="w")
    _fsync_dir(run_dir)
    _prune(run_dir, step, keep)
    return run_dir / name


def _prune(run_dir: Path, step: int, keep: int) -> None:
    steps = checkpoint_steps(run_dir)
    kept = [s for s in steps if s <= step][-keep:]
    _drop(run_dir, [s for s in steps if s not in kept])
    (run_dir / LEGACY_SIDECAR).unlink(missing_ok=True)  # a save in the current layout supersedes it
    _remove_orphans(run_dir)


def prune_older(run_dir: str | Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints at or before `step` (the one a resume loaded) and drop the
    older: a `keep` lowered since the last save takes effect even on a finished run, which saves no
    more. Newer ones (damaged, or the load would have taken them) are left to the next save."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    run_dir = Path(run_dir)
    upto = [s for s in checkpoint_steps(run_dir) if s <= step]
    _drop(run_dir, upto[:-keep])
    _remove_orphans(run_dir)


def _drop(run_dir: Path, steps: list[int]) -> None:
    for s in steps:  # the sidecar first: a tensor file left by a kill here is an orphan, removed on resume
        (run_dir / sidecar_name(s)).unlink(missing_ok=True)
        (run_dir / tensor_name(s)).unlink(missing_ok=True)


def _remove_orphans(run_dir: Path) -> list[Path]:
    """Tensor files without a sidecar (a save killed before its commit, or a prune killed midway)."""
    legacy = None
    try:
        legacy = json.loads((run_dir / LEGACY_SIDECAR).read_text()).get("tensor_file")
    except (OSError, ValueError, AttributeError):
        pass
    committed = set(checkpoint_steps(run_dir))
    removed = []
    for p in run_dir.iterdir():
        m = _TENSORS_RE.fullmatch(p.name)
        if m and int(m.group(1)) not in committed and p.name != legacy:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def clean_run_dir(run_dir: str | Path) -> list[Path]:
    """Remove what interrupted writes left in run_dir: temporary files of `atomic_write`
    (whose writer is gone) and tensor files without a sidecar. Returns what was removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return remove_stale_temps(run_dir) + _remove_orphans(run_dir)


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _read_sidecar(path: Path, step: int | None) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise CheckpointError(f"checkpoint sidecar {path} is not text") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint sidecar {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint sidecar {path} holds a JSON {type(meta).__name__}, not an object")
    required = [k for k in REQUIRED_KEYS if step is not None or k != "tensor_bytes"]
    missing = [k for k in required if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint sidecar {path} lacks the key(s) {', '.join(map(repr, missing))}")
    if isinstance(meta["step"], bool) or not isinstance(meta["step"], int) or meta["step"] < 0:
        raise CheckpointError(f"checkpoint sidecar {path} has a bad step {meta['step']!r}")
    if step is not None and meta["step"] != step:
        raise CheckpointError(f"checkpoint sidecar {path} records step {meta['step']} but is named for step {step}")
    if meta["tensor_file"] != tensor_name(meta["step"]):
        raise CheckpointError(f"checkpoint sidecar {path} names tensor file {meta['tensor_file']!r}, "
                              f"expected {tensor_name(meta['step'])!r}")
    return meta


def _read_tensors(run_dir: Path, meta: dict[str, Any], legacy: bool) -> dict[str, torch.Tensor]:
    path = run_dir / meta["tensor_file"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint tensor file {path} is missing") from None
    if not legacy and size != meta["tensor_bytes"]:
        raise CheckpointError(f"checkpoint tensor file {path} has {size} bytes, its sidecar records "
                              f"{meta['tensor_bytes']} (truncated or replaced)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types; any means unreadable
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint tensor file {path} is not a readable safetensors file ({reason})") from None
    if not legacy and header.get("step") != str(meta["step"]):
        raise CheckpointError(f"checkpoint tensor file {path} records step {header.get('step')!r}, "
                              f"its sidecar {meta['step']}")
    return tensors


def load_checkpoint(
    run_dir: str | Path,
    check_meta: Callable[[dict[str, Any], Path], None] | None = None,
    check_tensors: Callable[[dict[str, torch.Tensor], dict[str, Any]], None] | None = None,
    note: Callable[[str], None] = _note,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, meta) of the newest valid checkpoint in run_dir, or None when it holds none.

    `check_meta(meta, sidecar_path)` runs before the tensors are read: what it raises propagates (e.g. a
    ValueError for a checkpoint of another configuration), except CheckpointError, which
    marks the checkpoint damaged, as does a CheckpointError from `check_tensors`. Each
    damaged checkpoint skipped for an older one is reported through `note` (one line);
    with none usable, the first damage found is raised.
    """
    run_dir = Path(run_dir)
    candidates: list[tuple[Path, int | None]] = [(run_dir / sidecar_name(s), s)
                                                 for s in reversed(checkpoint_steps(run_dir))]
    if (run_dir / LEGACY_SIDECAR).is_file():
        candidates.append((run_dir / LEGACY_SIDECAR, None))
    damaged: list[CheckpointError] = []
    for path, step in candidates:
        try:
            meta = _read_sidecar(path, step)
            if check_meta is not None:
                check_meta(meta, path)
            tensors = _read_tensors(run_dir, meta, legacy=step is None)
            if check_tensors is not None:
                check_tensors(tensors, meta)
        except CheckpointError as e:
            damaged.append(e)
            continue
        for e in damaged:
            note(f"{e}; resuming from the older {path.name} (step {meta['step']})")
        return tensors, meta
    if damaged:
        more = f" (and {len(damaged) - 1} older damaged one(s))" if len(damaged) > 1 else ""
        raise CheckpointError(f"{damaged[0]}; no usable older checkpoint{more}: move the run directory "
                              "away to start over")
    return None
