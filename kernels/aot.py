"""Ahead-of-time compilation of Triton kernels for NVIDIA GPUs, without a GPU.

Under TRITON_INTERPRET=1 (the test suite) `@triton.jit` yields interpreter
functions that cannot be compiled, so `compile_kernels` compiles in a child
process with the interpreter off; `compile_kernel` is the in-process primitive.

`triton.compile` with an explicit `GPUTarget` runs the whole pipeline (TTIR ->
TTGIR -> LLVM -> PTX -> cubin via the ptxas bundled in the wheel), so register
pressure, spills and vector widths can be checked on a CPU-only machine. The
tests use this to hold every kernel to "no spills, 128-bit loads".
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Pointers and sizes the GPU launcher would see as 16-byte aligned / multiples
# of 16; without this hint the PTX falls back to scalar loads.
ALIGNED = [["tt.divisibility", 16]]


@dataclass(frozen=True)
class CompiledKernel:
    """What one AOT compilation produced, reduced to what we check."""

    arch: int
    ptx: str
    registers: int
    local_bytes: int  # spill space per thread; 0 means no spills
    stack_bytes: int

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.stack_bytes > 0

    def count(self, instruction: str) -> int:
        """Occurrences of a PTX instruction prefix, e.g. 'ld.global.v4'."""
        return len(re.findall(re.escape(instruction) + r"[.\s]", self.ptx))

    def narrow_products(self, source: str) -> list[str]:
        """The 32-bit multiplies and shifts that read the register loaded from `source` (a special register
        such as '%ctaid.x', or a kernel parameter by index, 'param_9'): an element offset scaled there wraps
        at 2^31, where one widened to 64 bits first does not."""
        loaded = re.findall(r"(?:mov|ld\.param)\.[us]?b?\d+\s+(%r\d+),\s*\[?[^;]*" + re.escape(source) + r"\b",
                            self.ptx)
        narrow = r"\s*(?:@!?%p\d+\s+)?(?:mul\.(?:lo|hi)\.[su]32|mad\.(?:lo|hi)\.[su]32|shl\.b32)\s[^;]*"
        return [m.strip() for r in loaded for m in re.findall(r"^" + narrow + re.escape(r) + r"\b[^;]*;", self.ptx, re.M)]


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_kernel(
    fn: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    aligned: tuple[str, ...] = (),
    arch: int = 90,
    num_warps: int = 4,
) -> CompiledKernel:
    """Compile `fn` for sm_`arch`; `aligned` names the arguments to mark 16-divisible.

    `signature` maps every argument name to a Triton type ('*fp32', 'i32', 'fp32',
    'constexpr'); `constexprs` gives the constexpr values.
    """
    names = list(signature)
    unknown = [a for a in aligned if a not in names]
    if unknown:
        raise ValueError(f"aligned names unknown arguments: {unknown}")
    attrs = {(names.index(a),): ALIGNED for a in aligned}
    src = ASTSource(fn, signature, constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout

    def field(name: str) -> int:
        m = re.search(rf"\b{name}:(\d+)", usage)
        if m is None:
            raise RuntimeError(f"cuobjdump output lacks {name}: {usage!r}")
        return int(m.group(1))

    return CompiledKernel(arch, kernel.asm["ptx"], field("REG"), field("LOCAL"), field("STACK"))


@dataclass(frozen=True)
class KernelSpec:
    """One kernel to compile: `module:name` plus what `compile_kernel` takes."""

    target: str  # "trajinv.kernels.adamw:_adamw_kernel"
    signature: dict[str, str]
    constexprs: dict[str, Any]
    aligned: tuple[str, ...] = ()
    arch: int = 90
    num_warps: int = 4


def compile_kernels(specs: list[KernelSpec]) -> list[CompiledKernel]:
    """Compile each spec in one child process with the Triton interpreter off."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    payload = json.dumps([asdict(s) for s in specs])
    proc = subprocess.run(
        [sys.executable, "-m", "trajinv.kernels.aot"], input=payload, capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compilation failed:\n{proc.stderr[-4000:]}")
    return [CompiledKernel(**d) for d in json.loads(proc.stdout.strip().splitlines()[-1])]


def _main() -> None:
    out = []
    for d in json.loads(sys.stdin.read()):
        module, name = d.pop("target").split(":")
        fn = getattr(importlib.import_module(module), name)
        d["aligned"] = tuple(d["aligned"])
        out.append(asdict(compile_kernel(fn, **d)))
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
