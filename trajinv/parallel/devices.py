"""Device lists for `--devices`, and pinning a worker process to its device and cores.

`--devices cpu,cpu` runs two CPU workers, each pinned to its half of the cores
(affinity and torch threads); `--devices cuda:0,cuda:1` one worker per GPU, each
seeing only its GPU (CUDA_VISIBLE_DEVICES, set before CUDA starts in the worker,
so Triton kernels and the allocator also land there); `--devices all` every GPU
of the node. An entry may repeat (`cuda:0,cuda:0`: two populations share one GPU).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

_ENTRY = re.compile(r"^(cpu|cuda(?::(\d+))?)$")


@dataclass(frozen=True)
class Placement:
    """Where one worker runs."""

    device: str
    """'cpu' or 'cuda:N' (N counts the GPUs this process sees)."""
    cores: tuple[int, ...]
    """CPU cores the worker may run on (its affinity); empty leaves it as it is."""
    threads: int
    """torch (and OpenMP) threads of the worker."""

    @property
    def kind(self) -> str:
        return "cuda" if self.device.startswith("cuda") else "cpu"


def check_device(device: str) -> None:
    """One-line ValueError unless `device` ('cpu', 'cuda', 'cuda:N') exists in this process.

    Asked before anything is written or sized: torch's own failure (an assertion deep in
    `torch.cuda`, several screens of traceback) comes only when the first tensor moves there."""
    if not device.startswith("cuda"):
        return
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise ValueError(f"device {device!r} requested but no CUDA device is available")
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= n:
        raise ValueError(f"device {device!r} requested but this process sees {n} CUDA device(s): "
                         f"cuda:0..cuda:{n - 1}")


def parse_devices(devices: str | Sequence[str]) -> tuple[str, ...]:
    """'cpu,cpu' or ['cuda:0', 'cuda:1'] or 'all' -> normalised entries; one-line error for a bad one.

    Every entry must be of one kind (all CPU or all CUDA): a population's config names one device kind.
    """
    items = devices.split(",") if isinstance(devices, str) else list(devices)
    items = [d.strip() for d in items if d.strip()]
    if items == ["all"]:
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError("--devices all found no CUDA device; list CPU workers instead, e.g. --devices cpu,cpu")
        return tuple(f"cuda:{i}" for i in range(n))
    if not items:
        raise ValueError("--devices is empty; give e.g. cpu,cpu or cuda:0,cuda:1")
    out = []
    for d in items:
        m = _ENTRY.match(d)
        if m is None:
            raise ValueError(f"unknown device {d!r} in --devices; use cpu, cuda:N or all")
        out.append("cuda:" + (m.group(2) or "0") if d.startswith("cuda") else "cpu")
    kinds = {d.split(":")[0] for d in out}
    if len(kinds) > 1:
        raise ValueError(f"--devices {','.join(items)} mixes CPU and CUDA; use one kind")
    return tuple(out)


def usable_devices(devices: str | Sequence[str]) -> tuple[str, ...]:
    """`parse_devices`, then `check_device` on each entry: what this process can train on."""
    out = parse_devices(devices)
    for d in dict.fromkeys(out):
        check_device(d)
    return out


def device_kind(devices: Sequence[str]) -> str:
    """'cpu' or 'cuda' of a parsed device list."""
    return "cuda" if devices[0].startswith("cuda") else "cpu"


def placements(devices: Sequence[str], cores: Sequence[int] | None = None) -> list[Placement]:
    """One Placement per entry: CPU workers split `cores` (default: this process's affinity) into
    equal contiguous shares (one core each, round robin, when there are more workers than cores);
    GPU workers get an equal share of the threads and no affinity."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None and hasattr(os, "sched_getaffinity") else (
        list(cores) if cores is not None else list(range(os.cpu_count() or 1)))
    n = len(devices)
    share = max(1, len(cores) // n)
    out = []
    for i, d in enumerate(devices):
        if d == "cpu":
            mine = tuple(cores[i * share:(i + 1) * share]) if len(cores) >= n else (cores[i % len(cores)],)
            out.append(Placement(d, mine, len(mine)))
        else:
            out.append(Placement(d, (), share))
    return out


def pin(place: Placement) -> None:
    """Run in a fresh worker process before any CUDA call: restrict it to its device, cores and threads."""
    if place.kind == "cuda":
        index = int(place.device.split(":")[1])
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [v for v in visible.split(",") if v] if visible else None
        if ids is not None and index >= len(ids):
            raise ValueError(f"device {place.device} is not among CUDA_VISIBLE_DEVICES={visible}")
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[index] if ids is not None else str(index)
    if place.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, place.cores)
    import torch

    torch.set_num_threads(place.threads)
