"""Small native CPU kernels: C++ compiled on first use, cached, loaded with ctypes.

Torch ops cost one pass over memory each; a fused CPU loop that reads its
operands once is what keeps the CPU paths of our kernels near the cost of the
plain operation. Each library is one plain C++ file under ``csrc/`` (shipped as
package data) with a C ABI: no torch headers, so a build takes about a second
and needs no ninja. The system C++ compiler (``$CXX`` or ``c++``) builds it into
torch's extension cache (``$TORCH_EXTENSIONS_DIR``), keyed by a hash of the
sources, flags, sizes and compiler, and writes it atomically so concurrent
processes never load half a file. Sizes the Python side also needs (block
lengths) are passed as ``-DTRAJINV_<NAME>=<value>``, so each has one source.
The .so links libgomp, which resolves to the copy torch already loaded, so
OpenMP threads are torch's. If anything fails (no compiler, a sandbox without
exec), `NativeLibrary.get()` returns None with a one-time warning and the caller
keeps its torch path; an environment switch turns a library off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

# IEEE semantics (no -ffast-math); no FMA contraction, so rounding does not change
# between CPUs; -fno-math-errno only lets sqrt vectorise.
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]

CSRC = Path(__file__).parent / "csrc"
PRELUDE = CSRC / "prelude.h"  # CLONES and shared includes; part of every build's hash


class NativeLibrary:
    """One C++ source, built on first `get()` and cached on disk and in the process."""

    def __init__(self, name: str, source: str, signatures: dict[str, tuple[list, object]], switch: str,
                 what: str, defines: dict[str, int] | None = None):
        """`source`: a file name under csrc/; `signatures`: function name -> (argtypes, restype);
        `switch`: env var, '0' disables; `what`: how the warning names it ("native CPU AdamW");
        `defines`: NAME -> value, compiled in as TRAJINV_NAME."""
        self.name, self.source, self.signatures, self.switch, self.what = name, CSRC / source, signatures, switch, what
        self.flags = FLAGS + [f"-I{CSRC}"] + [f"-DTRAJINV_{k}={v}" for k, v in (defines or {}).items()]
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._tried = False

    def _compile(self, cxx: str, so: Path) -> None:
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
            out = Path(tmp) / so.name
            res = subprocess.run([cxx, *self.flags, str(self.source), "-o", str(out)], capture_output=True, text=True,
                                 timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"{cxx} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
            os.replace(out, so)

    def _load(self) -> ctypes.CDLL:
        from torch.utils.cpp_extension import get_default_build_root

        cxx = os.environ.get("CXX", "c++")
        exe = shutil.which(cxx)
        if exe is None:
            raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX)")
        texts = [PRELUDE.read_text(), self.source.read_text()]
        # the include path differs between installs; the sources, flags and compiler are what matter
        flags = [f for f in self.flags if not f.startswith("-I")]
        key = hashlib.sha256("\0".join([*texts, *flags, os.path.realpath(exe)]).encode()).hexdigest()[:16]
        # torch's own loader reads $TORCH_EXTENSIONS_DIR; get_default_build_root() does not
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
        so = Path(root) / f"{self.name}_{key}" / f"{self.name}.so"
        if not so.exists():
            self._compile(exe, so)
        lib = ctypes.CDLL(str(so))
        for fn_name, (argtypes, restype) in self.signatures.items():
            fn = getattr(lib, fn_name)
            fn.argtypes, fn.restype = argtypes, restype
        return lib

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, or None (switched off, or the build failed: warned once)."""
        if self._tried:
            return self._lib
        with self._lock:
            if not self._tried:
                if os.environ.get(self.switch, "1") == "0":
                    self._lib = None
                else:
                    try:
                        self._lib = self._load()
                    except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
                        warnings.warn(f"trajinv: {self.what} unavailable, using torch ops ({e})", RuntimeWarning,
                                      stacklevel=3)
                        self._lib = None
                self._tried = True
        return self._lib

    def reset(self) -> None:
        """Forget the loaded library so that the next `get()` builds or loads it again (tests)."""
        with self._lock:
            self._lib, self._tried = None, False
