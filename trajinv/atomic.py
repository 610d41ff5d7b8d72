"""Atomic file writes: a crash never leaves half a file where a whole one was expected."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | Path, write: Callable[[IO[Any]], Any], mode: str = "wb", **open_kwargs: Any) -> Path:
    """Call `write(f)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    The temporary file is removed if `write` fails; the old `path` is untouched until the rename.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
