"""Small native CPU kernels: C++ compiled on first use, cached, loaded with ctypes.

Torch ops cost one pass over memory each; a fused CPU loop that reads its
operands once is what keeps the CPU paths of our kernels near the cost of the
plain operation. Each library is plain C++ with a C ABI (no torch headers, so a
build takes about a second and needs no ninja), compiled by the system C++
compiler (``$CXX`` or ``c++``) into torch's extension cache
(``$TORCH_EXTENSIONS_DIR``), keyed by a hash of source, flags and compiler, and
written atomically so concurrent processes never load half a file. The .so
links libgomp, which resolves to the copy torch already loaded, so OpenMP
threads are torch's. If anything fails (no compiler, a sandbox without exec),
`NativeLibrary.get()` returns None with a one-time warning and the caller keeps
its torch path; an environment switch turns a library off.
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
from collections.abc import Callable
from pathlib import Path

# IEEE semantics (no -ffast-math); no FMA contraction, so rounding does not change
# between CPUs; -fno-math-errno only lets sqrt vectorise.
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]

# Put before every source. CLONES: compile a function for baseline x86-64, AVX2 and
# AVX-512 and pick one when the library loads, so one portable build runs the
# machine's widest vectors (the default flags target baseline SSE2 only).
PRELUDE = r"""
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define CLONES
#endif
"""


class NativeLibrary:
    """One C++ source, built on first `get()` and cached on disk and in the process."""

    def __init__(self, name: str, source: Callable[[], str], signatures: dict[str, tuple[list, object]],
                 switch: str, what: str):
        """`signatures`: function name -> (argtypes, restype); `switch`: env var, '0' disables;
        `what`: how the warning names it ("native CPU AdamW")."""
        self.name, self.source, self.signatures, self.switch, self.what = name, source, signatures, switch, what
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._tried = False

    def _compile(self, cxx: str, src: str, so: Path) -> None:
        so.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
            cpp = Path(tmp) / f"{self.name}.cpp"
            cpp.write_text(src)
            out = Path(tmp) / so.name
            res = subprocess.run([cxx, *FLAGS, str(cpp), "-o", str(out)], capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"{cxx} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
            os.replace(out, so)

    def _load(self) -> ctypes.CDLL:
        from torch.utils.cpp_extension import get_default_build_root

        cxx = os.environ.get("CXX", "c++")
        exe = shutil.which(cxx)
        if exe is None:
            raise RuntimeError(f"no C++ compiler: {cxx!r} is not on PATH (set CXX)")
        src = PRELUDE + self.source()
        key = hashlib.sha256("\0".join([src, *FLAGS, os.path.realpath(exe)]).encode()).hexdigest()[:16]
        so = Path(get_default_build_root()) / f"{self.name}_{key}" / f"{self.name}.so"
        if not so.exists():
            self._compile(exe, src, so)
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
