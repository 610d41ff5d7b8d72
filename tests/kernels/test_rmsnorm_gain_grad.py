"""RMSNorm gain gradient + per-example norms: Triton (interpreter) and CPU path against
the explicit reference and torch.func per-sample gradients; AOT compile check."""

import pytest
import torch
from torch.func import grad, vmap

from trajinv.kernels.aot import KernelSpec, compile_kernels
from trajinv.kernels.rmsnorm import (
    launch_config,
    rmsnorm_gain_grad_with_norms,
    rmsnorm_gain_grad_with_norms_reference,
)

EPS = 1e-6
# (K, n, t, d): t = 1, n = 1, odd d, d and t larger than one block.
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 17), (1, 2, 40, 130), (3, 1, 33, 16)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-4, atol=1e-4)}


def _inputs(K, n, t, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(K, n, t, d, generator=g).to(dtype)
    gy = torch.randn(K, n, t, d, generator=g).to(dtype)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1) + EPS)
    w = torch.rand(K, d, generator=g) + 0.05
    return x, rstd, gy, w


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, backend):
    x, rstd, gy, w = _inputs(*shape, dtype)
    for precond in (None, w):
        for per_example in (False, True):
            ref = rmsnorm_gain_grad_with_norms_reference(x, rstd, gy, precond, per_example)
            got = rmsnorm_gain_grad_with_norms(x, rstd, gy, precond, per_example, backend=backend)
            assert got[0].dtype == torch.float32 and got[0].shape == (shape[0], shape[3])
            assert got[1].shape == ((shape[0], shape[1]) if per_example else (shape[0],))
            for g_, r_ in zip(got, ref):
                torch.testing.assert_close(g_, r_, **TOL[dtype])
            if precond is None:
                torch.testing.assert_close(got[1], got[2])


@pytest.mark.parametrize("splits", [1, 2, 3, 5, 9])
def test_example_splits_give_the_same_result(splits):
    # Splitting a member's examples over programs (to fill a GPU) must change neither dg nor the norms;
    # 3 of 5 examples leaves an uneven last range, 9 is capped at one example per range
    x, rstd, gy, w = _inputs(2, 5, 3, 20, torch.float32)
    ref = rmsnorm_gain_grad_with_norms_reference(x, rstd, gy, w, per_example=True)
    got = rmsnorm_gain_grad_with_norms(x, rstd, gy, w, per_example=True, backend="triton", splits=splits)
    for g_, r_ in zip(got, ref):
        torch.testing.assert_close(g_, r_, rtol=1e-5, atol=1e-5)


def test_splits_fill_the_gpu_and_leave_no_range_empty():
    from trajinv.kernels.rmsnorm import choose_splits

    # gpt-164m, K = 1: 6 d-slices; 264 programs wanted is 44 ranges, as 32 ranges of 2 examples (none empty)
    assert choose_splits(programs=6, n=64, sms=132) == 32
    assert choose_splits(programs=6, n=8, sms=132) == 8  # never more ranges than examples
    assert choose_splits(programs=400, n=64, sms=132) == 1  # enough programs already
    assert choose_splits(programs=6, n=7, sms=4) == 1
    with pytest.raises(ValueError, match="splits must be a positive int"):
        x, rstd, gy, w = _inputs(1, 2, 3, 4, torch.float32)
        rmsnorm_gain_grad_with_norms(x, rstd, gy, w, backend="triton", splits=0)


def test_matches_torch_func_per_sample_gradients():
    K, n, t, d = 2, 3, 4, 7
    g = torch.Generator().manual_seed(3)
    x = torch.randn(K, n, t, d, generator=g)
    gain = torch.rand(K, d, generator=g) + 0.5
    target = torch.randn(K, n, t, d, generator=g)
    precond = torch.rand(K, d, generator=g) + 0.1

    def norm(xs, gn):
        return xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + EPS) * gn[:, None, None, :]

    def loss(gn, xs, ts):  # summed over examples
        return (torch.sin(norm(xs, gn)) * ts).sum()

    gv = gain.clone().requires_grad_()
    y = norm(x, gv)
    gy = torch.autograd.grad((torch.sin(y) * target).sum(), y)[0]
    per_sample = vmap(grad(lambda gn, x1, t1: loss(gn, x1[:, None], t1[:, None])), in_dims=(None, 1, 1))(
        gain, x, target
    )  # (n, K, d)
    rstd = torch.rsqrt(x.pow(2).mean(-1) + EPS)
    for backend in ("triton", "torch"):
        dg, s_w, s_1 = rmsnorm_gain_grad_with_norms(x, rstd, gy, precond, per_example=True, backend=backend)
        torch.testing.assert_close(dg, per_sample.sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s_1, per_sample.square().sum(-1).T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s_w, (per_sample.square() * precond).sum(-1).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_batch_gives_zeros(backend):
    x, rstd, gy, w = _inputs(2, 0, 3, 5, torch.float32)
    dg, s_w, s_1 = rmsnorm_gain_grad_with_norms(x, rstd, gy, w, per_example=True, backend=backend)
    assert dg.shape == (2, 5) and not dg.any() and s_w.shape == (2, 0)
    x, rstd, gy, w = _inputs(2, 3, 0, 5, torch.float32)
    dg, s_w, s_1 = rmsnorm_gain_grad_with_norms(x, rstd, gy, w, backend=backend)
    assert not dg.any() and not s_w.any() and not s_1.any()


def test_bad_input_is_rejected():
    x, rstd, gy, w = _inputs(1, 2, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="rstd"):
        rmsnorm_gain_grad_with_norms(x, rstd[..., :1], gy, w)
    with pytest.raises(ValueError, match="precond"):
        rmsnorm_gain_grad_with_norms(x, rstd, gy, w[:, :3])
    with pytest.raises(ValueError, match="gy"):
        rmsnorm_gain_grad_with_norms(x, rstd, gy[:, :1], w)
    with pytest.raises(TypeError, match="int32"):
        rmsnorm_gain_grad_with_norms(x, rstd, gy.int(), w)
    with pytest.raises(ValueError, match="backend"):
        rmsnorm_gain_grad_with_norms(x, rstd, gy, w, backend="gpu")


# Every tile the launcher can pick (one per BLOCK_D), so the AOT test below compiles all of them.
WIDTHS = (16, 32, 64, 128)


def test_launcher_picks_one_of_the_compiled_tiles():
    picked = {tuple(sorted(launch_config(d).items())) for d in range(1, 5000)}
    assert picked == {tuple(sorted(launch_config(d).items())) for d in WIDTHS}


def test_aot_compiles_without_spills():
    sig = {"x_ptr": "*bf16", "rstd_ptr": "*fp32", "gy_ptr": "*bf16", "w_ptr": "*fp32", "dg_ptr": "*fp32",
           "sw_ptr": "*fp32", "s1_ptr": "*fp32", "N": "i32", "T": "i32", "D": "i32", "SPLITS": "i32", "N_PER": "i32",
           "HAS_W": "constexpr", "BLOCK_T": "constexpr", "BLOCK_D": "constexpr"}  # fmt: skip
    specs = []
    for d in WIDTHS:
        cfg = launch_config(d)
        warps = cfg.pop("num_warps")
        for arch in (80, 90):
            # fp16 compiles like bf16; once, at the widest tile.
            for dt in ("fp32", "bf16", "fp16") if d == 128 else ("fp32", "bf16"):
                for has_w in (True, False):
                    specs.append(KernelSpec(
                        "trajinv.kernels.rmsnorm:_rmsnorm_gns_kernel", dict(sig, x_ptr=f"*{dt}", gy_ptr=f"*{dt}"),
                        dict(HAS_W=has_w, **cfg), ("x_ptr", "rstd_ptr", "gy_ptr", "w_ptr", "dg_ptr", "D"), arch, warps))
    for spec, k in zip(specs, compile_kernels(specs)):
        where = (spec.arch, spec.signature["x_ptr"], spec.constexprs)
        assert not k.spills and k.registers <= 255, (where, k.registers, k.stack_bytes)
        assert k.count("ld.global.v4") > 0, where
