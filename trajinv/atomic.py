"""Atomic file writes: a crash never leaves half a file where a whole one was expected.

`atomic_write` writes beside the target into ``.<name>.<pid>.<random>.tmp``, fsyncs
and renames over the target. A process killed mid-write leaves that temporary
file behind; `remove_stale_temps` removes the ones whose writer (the pid in the
name) is gone, which the trainer does on resume and the data cache before it
tokenizes. Files get the mode `open()` would give them: the target's mode when it
exists, else 0666 less the umask.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[IO[Any]], Any], mode: str = "wb", **open_kwargs: Any) -> Path:
    """Call `write(f)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    The temporary file is removed if `write` fails; the old `path` is untouched until the rename.
    An OSError without a file name (a full disk) gets `path` as its file name.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX)
    try:
        try:
            os.fchmod(fd, _new_file_mode(path))
        except OSError:
            pass  # a file system without modes (some network or FUSE mounts): keep what it gives
        with os.fdopen(fd, mode, **open_kwargs) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)
        raise
    return path


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (our own pid counts as gone: callers clean before they write)."""
    if pid == os.getpid():
        return False  # callers clean before they write: none of ours is in flight
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by someone else
    return True


def writer_pid(name: str) -> int | None:
    """The pid in a temporary name ``.<target>.<pid>.<random>.tmp`` (None if there is none)."""
    parts = name[: -len(TEMP_SUFFIX)].split(".") if name.endswith(TEMP_SUFFIX) else []
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def remove_stale_temps(folder: str | Path, target_glob: str = "*") -> list[Path]:
    """Remove `atomic_write` leftovers in `folder` (for targets matching `target_glob`) whose
    writing process no longer runs; temporary files without a pid in their name (older
    versions) count as stale. Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(f".{target_glob}.*{TEMP_SUFFIX}"):
        pid = writer_pid(tmp.name)
        if pid is not None and pid_alive(pid):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed
