"""The AOT helper itself: a trivial copy kernel compiles, vectorises and reports resources."""

import os
from pathlib import Path

import pytest

from trajinv.kernels.aot import KernelSpec, compile_kernels

SIG = {"x": "*fp32", "y": "*fp32", "n": "i32", "BLOCK": "constexpr"}
TARGET = "aot_probe:scale_kernel"  # a test fixture beside this file, not part of the package


@pytest.fixture(autouse=True)
def _probe_importable(monkeypatch):
    """The compiling child process imports the probe kernel from this folder."""
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))


def test_compile_reports_vector_loads_and_no_spills():
    specs = [KernelSpec(TARGET, SIG, {"BLOCK": 1024}, ("x", "y", "n"), arch) for arch in (80, 90)]
    for k in compile_kernels(specs):
        assert k.count("ld.global.v4") > 0 and k.count("st.global.v4") > 0
        assert not k.spills and 0 < k.registers <= 255


def test_unaligned_pointer_gives_scalar_loads():
    (k,) = compile_kernels([KernelSpec(TARGET, SIG, {"BLOCK": 1024})])
    assert k.count("ld.global.v4") == 0


def test_unknown_aligned_name_is_rejected():
    with pytest.raises(RuntimeError, match="nope"):
        compile_kernels([KernelSpec(TARGET, SIG, {"BLOCK": 1024}, ("nope",))])
