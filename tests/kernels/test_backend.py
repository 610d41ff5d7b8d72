"""Which path runs, and on which device a Triton launch runs."""

import ast
import contextlib
from pathlib import Path

import pytest
import torch

import trajinv.kernels as kernels_pkg
from trajinv.kernels.backend import on_device, resolve_backend

KERNEL_MODULES = sorted(p for p in Path(kernels_pkg.__file__).parent.glob("*.py") if p.name != "__init__.py")


class _CudaTensor:
    """Stands in for a tensor on the second GPU of a machine (this one may have none)."""

    is_cuda = True
    device = torch.device("cuda", 1)


def test_a_launch_runs_on_its_tensors_device():
    # Triton launches on the current CUDA device: tensors on cuda:1 with cuda:0 current read foreign memory
    guard = on_device(_CudaTensor())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(on_device(torch.zeros(1)), contextlib.nullcontext)


def _launches(tree: ast.AST):
    """(launch call, whether it sits inside `with on_device(...)`) for every `kernel[grid](...)`."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
                isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "") == "on_device"
                for i in node.items):
            guarded |= {id(n) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and \
                getattr(node.func.value, "id", "").endswith("_kernel"):
            yield node, id(node) in guarded


@pytest.mark.parametrize("path", KERNEL_MODULES, ids=[p.stem for p in KERNEL_MODULES])
def test_every_triton_launch_is_guarded_by_its_device(path):
    launches = list(_launches(ast.parse(path.read_text())))
    assert all(ok for _, ok in launches), f"{path.name}: a kernel launch outside `with on_device(...)`"


def test_the_kernel_modules_do_launch():
    # the check above is not vacuous: the op families launch their kernels here
    names = {p.stem for p in KERNEL_MODULES if list(_launches(ast.parse(p.read_text())))}
    assert {"adamw", "accumulate", "linear_gns", "rmsnorm"} <= names


def test_auto_picks_triton_for_cuda_and_the_cpu_path_elsewhere():
    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert resolve_backend("torch", torch.device("cpu")) == "cpu"
