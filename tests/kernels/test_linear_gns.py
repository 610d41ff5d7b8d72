"""Fused linear weight gradient + per-example norms: Triton (interpreter) and CPU path
against the explicit per-example reference and against torch.func per-sample gradients."""

import re

import pytest
import torch
from torch.func import grad, vmap

from trajinv.kernels.aot import KernelSpec, compile_kernels
from trajinv.kernels.linear_gns import (
    launch_config,
    linear_weight_grad_with_norms,
    linear_weight_grad_with_norms_reference,
    tf32_allowed,
)

# (K, n, t, in, out): t = 1, n = 1, odd dims, dims and t larger than one block.
SHAPES = [(1, 1, 1, 5, 3), (2, 3, 5, 17, 33), (2, 2, 40, 70, 20), (1, 4, 33, 16, 65)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-4, atol=1e-4)}


def _inputs(K, n, t, d_in, d_out, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(K, n, t, d_in, generator=g).to(dtype)
    gy = torch.randn(K, n, t, d_out, generator=g).to(dtype)
    w = torch.rand(K, d_out, d_in, generator=g) + 0.05
    return a, gy, w


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, backend):
    a, gy, w = _inputs(*shape, dtype)
    for precond in (None, w):
        for per_example in (False, True):
            ref = linear_weight_grad_with_norms_reference(a, gy, precond, per_example)
            got = linear_weight_grad_with_norms(a, gy, precond, per_example, backend=backend)
            assert got[0].dtype == torch.float32 and got[0].shape == (shape[0], shape[4], shape[3])
            want_shape = (shape[0], shape[1]) if per_example else (shape[0],)
            for g_, r_ in zip(got, ref):
                assert g_.shape == r_.shape
                # bf16 inputs are exact in fp32; only summation order differs.
                torch.testing.assert_close(g_, r_, **TOL[dtype])
            assert got[1].shape == want_shape
            if precond is None:
                torch.testing.assert_close(got[1], got[2])


@pytest.mark.parametrize("shape, splits", [
    # splitting examples over programs (to fill a GPU) must not change dW or the norms
    ((2, 5, 3, 20, 17), 2), ((2, 5, 3, 20, 17), 3), ((2, 5, 3, 20, 17), 7),
    # 10 input tiles (64 wide) over 3 output tiles: a full group of 8 and a partial one of 2 in the program
    # order (module doc, "Program order"); a tile missed or visited twice shows in dW and in the norms
    ((2, 2, 3, 600, 130), 1), ((2, 2, 3, 600, 130), 2),
])
def test_example_splits_and_the_grouped_program_order_give_the_same_result(shape, splits):
    a, gy, w = _inputs(*shape, torch.float32)
    ref = linear_weight_grad_with_norms_reference(a, gy, w, per_example=True)
    got = linear_weight_grad_with_norms(a, gy, w, per_example=True, backend="triton", splits=splits)
    for g_, r_ in zip(got, ref):
        torch.testing.assert_close(g_, r_, rtol=1e-5, atol=1e-5)


def test_reference_matches_torch_func_per_sample_gradients():
    # Ground truth independent of the einsum: per-sample grads of a nonlinear loss.
    K, n, t, d_in, d_out = 2, 3, 4, 6, 5
    g = torch.Generator().manual_seed(1)
    x = torch.randn(K, n, t, d_in, generator=g)
    wt = torch.randn(K, d_out, d_in, generator=g)
    precond = torch.rand(K, d_out, d_in, generator=g) + 0.1

    def loss(weight, xs):  # xs (K, n, t, in); summed over examples
        return torch.tanh(torch.einsum("knti,koi->knto", xs, weight)).pow(2).sum()

    wv = wt.clone().requires_grad_()
    xv = x.clone().requires_grad_()
    y = torch.einsum("knti,koi->knto", xv, wv)
    gy = torch.autograd.grad(torch.tanh(y).pow(2).sum(), y)[0]
    per_sample = vmap(grad(lambda w_, x1: loss(w_, x1[:, None])), in_dims=(None, 1))(wt, x)  # (n, K, out, in)
    for backend in ("triton", "torch"):
        dw, s_w, s_1 = linear_weight_grad_with_norms(x, gy, precond, per_example=True, backend=backend)
        torch.testing.assert_close(dw, per_sample.sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s_1, per_sample.square().sum((2, 3)).T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s_w, (per_sample.square() * precond).sum((2, 3)).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch_gives_zeros(backend):
    a, gy, w = _inputs(2, 0, 3, 5, 4, torch.float32)
    dw, s_w, s_1 = linear_weight_grad_with_norms(a, gy, w, per_example=True, backend=backend)
    assert dw.shape == (2, 4, 5) and not dw.any()
    assert s_w.shape == (2, 0) and s_1.shape == (2, 0)
    a, gy, w = _inputs(2, 3, 0, 5, 4, torch.float32)
    dw, s_w, s_1 = linear_weight_grad_with_norms(a, gy, w, backend=backend)
    assert not dw.any() and not s_w.any() and not s_1.any()


def test_cpu_path_chunks_examples(monkeypatch):
    # Force several chunks: results must not depend on the chunking.
    import trajinv.kernels.linear_gns as mod

    a, gy, w = _inputs(2, 7, 3, 9, 11, torch.float32)
    whole = mod.linear_weight_grad_with_norms(a, gy, w, per_example=True, backend="torch")
    monkeypatch.setattr(mod, "_CPU_CHUNK_BYTES", 4 * 2 * 9 * 11 * 2)  # 2 examples per chunk
    chunked = mod.linear_weight_grad_with_norms(a, gy, w, per_example=True, backend="torch")
    for x, y in zip(whole, chunked):
        torch.testing.assert_close(x, y)


def test_bad_input_is_rejected():
    a, gy, w = _inputs(1, 2, 3, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="disagree"):
        linear_weight_grad_with_norms(a, gy[:, :1], w)
    with pytest.raises(ValueError, match="precond"):
        linear_weight_grad_with_norms(a, gy, w.transpose(1, 2))
    with pytest.raises(TypeError, match="int64"):
        linear_weight_grad_with_norms(a.long(), gy, w)
    with pytest.raises(ValueError, match="backend"):
        linear_weight_grad_with_norms(a, gy, w, backend="cuda")
    with pytest.raises(ValueError, match="splits"):
        linear_weight_grad_with_norms(a, gy, w, backend="triton", splits=0)
    with pytest.raises(ValueError, match=r"\(K, n, t, d\)"):
        linear_weight_grad_with_norms(a[0], gy[0], w)


SIG = {
    "a_ptr": "*fp32", "gy_ptr": "*fp32", "w_ptr": "*fp32", "dw_ptr": "*fp32", "sw_ptr": "*fp32", "s1_ptr": "*fp32",
    "N": "i32", "T": "i32", "OUT": "i32", "IN": "i32", "SPLITS": "i32", "N_PER": "i32", "TILES_O": "i32", "TILES_I": "i32", "HAS_W": "constexpr", "UPCAST": "constexpr",
    "PRECISION": "constexpr", "BLOCK_O": "constexpr", "BLOCK_I": "constexpr", "BLOCK_T": "constexpr",
    "GROUP_I": "constexpr",
}  # fmt: skip
ALIGNED = ("a_ptr", "gy_ptr", "w_ptr", "dw_ptr", "T", "OUT", "IN")


def test_aot_compiles_without_spills():
    # Every variant the launcher can pick on a GPU: fp32 (tf32 or ieee dots), bf16/fp16 native dots.
    variants = [(dt, dt == "fp32", precision, has_w) for dt, precision in
                (("fp32", "tf32"), ("fp32", "ieee"), ("bf16", "tf32"), ("fp16", "tf32")) for has_w in (True, False)]
    specs = []
    for arch in (80, 90):
        for dt, upcast, precision, has_w in variants:
            cfg = dict(launch_config(upcast, precision))
            warps = cfg.pop("num_warps")
            sig = dict(SIG, a_ptr=f"*{dt}", gy_ptr=f"*{dt}")
            consts = dict(HAS_W=has_w, UPCAST=upcast, PRECISION=precision, **cfg)
            specs.append(KernelSpec("trajinv.kernels.linear_gns:_linear_gns_kernel", sig, consts, ALIGNED, arch, warps))
    for spec, k in zip(specs, compile_kernels(specs)):
        where = (spec.arch, spec.signature["a_ptr"], spec.constexprs)
        assert not k.spills, (where, k)
        assert k.registers <= 255
        # Operands reach shared memory by cp.async: 16-byte copies (.cg), except where tf32 MMAs need the
        # token-major layout the activations lack: 4-byte transposing copies (.ca), module docstring.
        narrow = len(re.findall(r"cp\.async\.ca\.shared\.global\S*\s*\[[^]]*\],\s*\[[^]]*\],\s*0x4\b", k.ptx))
        wide = k.count("cp.async.cg")
        if spec.signature["a_ptr"] == "*fp32" and spec.constexprs["PRECISION"] == "tf32":
            assert narrow > 0 and (wide > 0) == (spec.arch == 80), where  # sm_80: a's tile still 16 bytes
        else:
            assert wide > 0 and k.count("cp.async.ca") == 0, where
        assert k.count("st.global.v4") > 0  # dW written with vector stores
        # offsets scaled by a width in 64 bits: one member's weight may hold 2^31 elements or more
        for width in ("T", "OUT", "IN"):
            assert not k.narrow_products(f"param_{list(SIG).index(width)}"), (where, width)
        if spec.constexprs["PRECISION"] == "tf32" or not spec.constexprs["UPCAST"]:
            assert k.count("mma") > 0, "tensor-core dot expected"


def test_tf32_follows_either_of_torchs_switches():
    # the GPU path reads this before every launch; reading the legacy allow_tf32 after the newer
    # fp32_precision was set raised "mix of the legacy and new APIs", so the backward crashed
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy switch")
    try:
        assert tf32_allowed() is False  # torch's default
        for setting, expect in (("tf32", True), ("ieee", False)):
            matmul.fp32_precision = setting
            assert tf32_allowed() is expect
        matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"  # the global switch, inherited by matmuls
        assert tf32_allowed() is True
        torch.backends.fp32_precision = "none"
        matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision("high")  # the legacy switches
        assert tf32_allowed() is True
        torch.set_float32_matmul_precision("highest")
        assert tf32_allowed() is False
    finally:  # torch's defaults back
        torch.backends.fp32_precision = "none"
        torch.set_float32_matmul_precision("highest")
        matmul.fp32_precision = "none"


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("chunk_examples", [None, 2])
def test_cpu_path_with_and_without_the_native_reduction(native, chunk_examples, monkeypatch):
    """The CPU path's tile reduction: native one-pass kernel and its torch-ops fallback, whole and chunked."""
    import trajinv.kernels.linear_gns as mod

    monkeypatch.setenv("TRAJINV_NATIVE_GNS", "1" if native else "0")
    mod.NATIVE.reset()
    try:
        assert (mod.NATIVE.get() is not None) == native
        a, gy, w = _inputs(3, 5, 7, 9, 2100, torch.float32)  # M > one native block; odd sizes
        if chunk_examples:
            monkeypatch.setattr(mod, "_CPU_CHUNK_BYTES", 4 * chunk_examples * 9 * 2100)
        for precond in (None, w):
            for per_example in (True, False):
                ref = linear_weight_grad_with_norms_reference(a, gy, precond, per_example=per_example)
                got = linear_weight_grad_with_norms(a, gy, precond, per_example=per_example, backend="torch")
                for g_, r_ in zip(got, ref):
                    assert g_.shape == r_.shape
                    torch.testing.assert_close(g_, r_, rtol=1e-5, atol=1e-4)
    finally:
        mod.NATIVE.reset()


def test_native_reduction_falls_back_with_one_warning(monkeypatch, tmp_path):
    import trajinv.kernels.linear_gns as mod

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    mod.NATIVE.reset()
    try:
        a, gy, w = _inputs(2, 3, 4, 6, 5, torch.float32)
        with pytest.warns(RuntimeWarning, match="per-example reduction unavailable"):
            got = linear_weight_grad_with_norms(a, gy, w, per_example=True, backend="torch")
        ref = linear_weight_grad_with_norms_reference(a, gy, w, per_example=True)
        for g_, r_ in zip(got, ref):
            torch.testing.assert_close(g_, r_, rtol=1e-5, atol=1e-5)
    finally:
        mod.NATIVE.reset()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("chunk_examples", [None, 2])
def test_out_sums_are_added_in_place(backend, chunk_examples, monkeypatch):
    import trajinv.kernels.linear_gns as mod

    if chunk_examples:
        monkeypatch.setattr(mod, "_CPU_CHUNK_BYTES", 4 * chunk_examples * 9 * 11)
    a, gy, w = _inputs(2, 5, 3, 9, 11, torch.float32)
    for precond in (w, None):
        ref = linear_weight_grad_with_norms_reference(a, gy, precond)
        out = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        start = out.clone()
        dw, s_w, s_1 = linear_weight_grad_with_norms(a, gy, precond, backend=backend, out_sums=out)
        torch.testing.assert_close(dw, ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[0], start[0] + ref[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], start[1] + ref[2], rtol=1e-5, atol=1e-5)
        assert s_w.data_ptr() == out.data_ptr() and s_1.data_ptr() == out[1].data_ptr()
    with pytest.raises(ValueError, match="out_sums"):
        linear_weight_grad_with_norms(a, gy, w, per_example=True, out_sums=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="out_sums"):
        linear_weight_grad_with_norms(a, gy, w, out_sums=torch.zeros(2, 3))


@pytest.mark.parametrize("precond", [False, True])
def test_torch_fallback_sums_accurately_at_512x2048(monkeypatch, precond):
    """S_1 and S_W over 1M elements per example: the torch-ops fallback (native reduction off)
    must accumulate them accurately (as one fp32 GEMV it was off by ~2e-4, relative)."""
    import trajinv.kernels.linear_gns as mod

    monkeypatch.setenv("TRAJINV_NATIVE_GNS", "0")
    mod.NATIVE.reset()
    try:
        gen = torch.Generator().manual_seed(0)
        K, n, t, d_in, d_out = 1, 2, 8, 2048, 512
        a = torch.randn(K, n, t, d_in, generator=gen)
        gy = torch.randn(K, n, t, d_out, generator=gen)
        w = torch.rand(K, d_out, d_in, generator=gen) * 1e3 + 1.0 if precond else None
        _, s_w, s_1 = linear_weight_grad_with_norms(a, gy, w, per_example=True, backend="cpu")
        c = torch.einsum("kntO,kntI->knOI", gy.double(), a.double())
        want_1 = c.square().sum((2, 3))
        want_w = want_1 if w is None else (c.square() * w.double()[:, None]).sum((2, 3))
        for got, want in ((s_1, want_1), (s_w, want_w)):
            rel = ((got.double() - want).abs() / want).max().item()
            assert rel < 2e-7, rel  # fp32 output rounding, nothing more
    finally:
        mod.NATIVE.reset()
