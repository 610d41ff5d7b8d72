"""What every op family shares: the dtypes it takes and which code path runs.

Each op family in this package has two paths:

- ``"triton"``: the fused Triton kernel. Runs on CUDA; on CPU only under
  ``TRITON_INTERPRET=1`` (the interpreter the tests use to run the GPU code).
- ``"cpu"``: the CPU path, mostly small native C++ loops (`kernels.native`)
  with torch ops as the fallback where a native loop cannot run.

``"auto"`` picks Triton for CUDA tensors and the CPU path otherwise. ``"torch"``
is accepted as the old name of ``"cpu"``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Literal, get_args

import torch

Backend = Literal["auto", "triton", "cpu"]
BACKENDS: tuple[str, ...] = get_args(Backend)
ALIASES = {"torch": "cpu"}  # earlier name of the CPU paths

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def normalize_backend(backend: str) -> str:
    """The canonical name of `backend` ('torch' -> 'cpu'); one-line error for an unknown name."""
    name = ALIASES.get(backend, backend)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} (or 'torch', an alias of 'cpu'), "
                         f"got {backend!r}")
    return name


def resolve_backend(backend: str, device: torch.device) -> Literal["triton", "cpu"]:
    """The path that runs for tensors on `device`: 'auto' becomes 'triton' on CUDA, 'cpu' elsewhere."""
    name = normalize_backend(backend)
    if name == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    return name  # type: ignore[return-value]


def triton_available() -> bool:
    """Can Triton kernels run in this process (a CUDA device, or the CPU interpreter)?"""
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def check_splits(splits: int | None) -> None:
    """One-line ValueError unless `splits` (example ranges per member of a per-example kernel) is None or >= 1."""
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
        raise ValueError(f"splits must be a positive int or None, got {splits!r}")


def example_ranges(n: int, splits: int) -> tuple[int, int]:
    """(ranges, examples per range) for `n` >= 1 examples cut into at most `splits` ranges, none empty."""
    per = -(-n // min(max(1, splits), n))
    return -(-n // per), per


def multiprocessors(t: torch.Tensor) -> int:
    """Streaming multiprocessors of `t`'s GPU (1 off CUDA): what the example-split kernels fill."""
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 1


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where a launch must run: Triton launches on the *current* CUDA device, not on its tensors', so a
    launch for tensors on cuda:1 while cuda:0 is current would read foreign addresses. A no-op on CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
