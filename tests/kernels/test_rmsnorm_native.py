"""Native CPU RMSNorm (forward, backward, per-example gain norms) against the torch
reference, torch.func per-sample gradients and autograd of the torch-ops norm."""

import pytest
import torch
from torch.func import grad, vmap

from trajinv.ops import Probe, rms_norm
from trajinv.kernels import rmsnorm as rmsnorm_cpu
from trajinv.kernels.rmsnorm import (
    rmsnorm_backward_cpu,
    rmsnorm_backward_reference,
    rmsnorm_forward_cpu,
    rmsnorm_forward_torch,
)

EPS = 1e-6
# (K, n, t, d): empty batch, t = 1, n = 1, odd d, sizes past the threading threshold.
SHAPES = [(1, 0, 4, 8), (1, 1, 1, 1), (2, 3, 5, 17), (1, 2, 40, 130), (3, 4, 64, 96)]
TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(K, n, t, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(K, n, t, d, generator=g) * 3
    gain = torch.rand(K, d, generator=g) + 0.5
    gy = torch.randn(K, n, t, d, generator=g)
    w = torch.rand(K, d, generator=g) + 0.05
    return x, gain, gy, w


pytestmark = pytest.mark.skipif(rmsnorm_cpu.NATIVE.get() is None, reason="no C++ compiler")


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(shape):
    x, gain, _, _ = _inputs(*shape)
    y, rstd = rmsnorm_forward_cpu(x, gain, EPS)
    y_ref, rstd_ref = rmsnorm_forward_torch(x, gain, EPS)
    assert y.shape == x.shape and rstd.shape == shape[:3]
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(rstd, rstd_ref, **TOL)


def test_zero_width_rows_give_the_references_nan_not_uninitialised_memory():
    x, gain, _, _ = _inputs(1, 2, 3, 0)
    y, rstd = rmsnorm_forward_cpu(x, gain, EPS)
    _, rstd_ref = rmsnorm_forward_torch(x, gain, EPS)
    assert y.shape == x.shape and rstd_ref.isnan().all()
    torch.testing.assert_close(rstd, rstd_ref, equal_nan=True)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_reference(shape):
    x, gain, gy, w = _inputs(*shape)
    _, rstd = rmsnorm_forward_torch(x, gain, EPS)
    for precond in (None, w):
        for per_example in (False, True):
            got = rmsnorm_backward_cpu(x, rstd, gain, gy, precond, per_example)
            ref = rmsnorm_backward_reference(x, rstd, gain, gy, precond, per_example)
            for g_, r_ in zip(got, ref):
                assert g_.shape == r_.shape and g_.dtype == torch.float32
                torch.testing.assert_close(g_, r_, **TOL)


def test_gain_norms_match_torch_func_per_sample_gradients():
    K, n, t, d = 2, 3, 4, 7
    x, gain, target, w = _inputs(K, n, t, d, seed=3)

    def loss(gn, xs, ts):  # one example: xs (K, 1, t, d)
        return (torch.sin(rmsnorm_forward_torch(xs, gn, EPS)[0]) * ts).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 1, 1))(gain, x[:, :, None], target[:, :, None])  # (n, K, d)
    xv = x.clone().requires_grad_()
    y, rstd = rmsnorm_forward_cpu(xv.detach(), gain, EPS)
    gy = torch.cos(y) * target
    _, dg, s_w, s_1 = rmsnorm_backward_cpu(x, rstd, gain, gy, w, per_example=True)
    torch.testing.assert_close(dg, per_sample.sum(0), **TOL)
    torch.testing.assert_close(s_1, per_sample.square().sum(-1).T, **TOL)
    torch.testing.assert_close(s_w, (per_sample.square() * w).sum(-1).T, **TOL)


@pytest.mark.parametrize("probe", [False, True])
def test_rms_norm_autograd_matches_torch_ops(probe):
    # rms_norm takes the native path on CPU fp32; its gradients must be the torch-ops norm's.
    x, gain, gy, w = _inputs(2, 3, 9, 33)
    xa, ga = x.clone().requires_grad_(), gain.clone().requires_grad_()
    pr = Probe(precond=w) if probe else None
    y = rms_norm(xa, ga, EPS, pr)
    assert y.grad_fn is not None and "Native" in type(y.grad_fn).__name__
    y.backward(gy)
    xb, gb = x.clone().requires_grad_(), gain.clone().requires_grad_()
    rmsnorm_forward_torch(xb, gb, EPS)[0].backward(gy)
    torch.testing.assert_close(y, rmsnorm_forward_torch(x, gain, EPS)[0], **TOL)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    torch.testing.assert_close(ga.grad, gb.grad, **TOL)
    if probe:
        ref = rmsnorm_backward_reference(x, rmsnorm_forward_torch(x, gain, EPS)[1], gain, gy, w)
        torch.testing.assert_close(pr.sq_w, ref[2], **TOL)
        torch.testing.assert_close(pr.sq_1, ref[3], **TOL)
        assert pr.examples == 3


def test_results_do_not_depend_on_thread_count():
    x, gain, gy, w = _inputs(3, 4, 64, 96)
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y, rstd = rmsnorm_forward_cpu(x, gain, EPS)
            out.append((y, rstd, *rmsnorm_backward_cpu(x, rstd, gain, gy, w)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*out))


def test_torch_ops_when_off_or_not_fp32(monkeypatch):
    x, gain, _, _ = _inputs(1, 2, 3, 4)
    assert rmsnorm_cpu.available(x, gain)
    assert not rmsnorm_cpu.available(x.double(), gain)
    assert not rmsnorm_cpu.available(x.bfloat16(), gain)
    y = rms_norm(x.bfloat16().requires_grad_(), gain, EPS)
    assert "Native" not in type(y.grad_fn).__name__
    monkeypatch.setenv("TRAJINV_NATIVE_NORM", "0")
    rmsnorm_cpu.NATIVE.reset()
    try:
        assert not rmsnorm_cpu.available(x, gain)
        y = rms_norm(x.requires_grad_(), gain, EPS)
        assert "Native" not in type(y.grad_fn).__name__
        torch.testing.assert_close(y, rmsnorm_forward_torch(x, gain, EPS)[0])
    finally:
        rmsnorm_cpu.NATIVE.reset()


def test_bad_shapes_are_rejected():
    x, gain, gy, w = _inputs(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"gain \(K, d\)"):
        rmsnorm_forward_cpu(x, gain[:, :4], EPS)
    _, rstd = rmsnorm_forward_cpu(x, gain, EPS)
    with pytest.raises(ValueError, match="do not match"):
        rmsnorm_backward_cpu(x, rstd, gain, gy[:, :2], w)
    with pytest.raises(ValueError, match="precond"):
        rmsnorm_backward_cpu(x, rstd, gain, gy, w[:1])


def test_out_sums_are_added_in_place():
    x, gain, gy, w = _inputs(2, 3, 5, 17)
    _, rstd = rmsnorm_forward_cpu(x, gain, EPS)
    ref = rmsnorm_backward_reference(x, rstd, gain, gy, w)
    out = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    start = out.clone()
    dx, dg, s_w, s_1 = rmsnorm_backward_cpu(x, rstd, gain, gy, w, out_sums=out)
    torch.testing.assert_close(dx, ref[0], **TOL)
    torch.testing.assert_close(dg, ref[1], **TOL)
    torch.testing.assert_close(out[0], start[0] + ref[2], **TOL)
    torch.testing.assert_close(out[1], start[1] + ref[3], **TOL)
    assert s_w.data_ptr() == out.data_ptr()
    with pytest.raises(ValueError, match="out_sums"):
        rmsnorm_backward_cpu(x, rstd, gain, gy, w, per_example=True, out_sums=out)


def test_torch_forward_keeps_fp64_in_fp64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 16, generator=gen, dtype=torch.float64) * 1e3
    gain = torch.rand(2, 16, generator=gen, dtype=torch.float64) + 0.5
    y, rstd = rmsnorm_cpu.rmsnorm_forward_torch(x, gain, 1e-6)
    want_rstd = 1.0 / torch.sqrt(x.square().mean(-1) + 1e-6)
    want = x * want_rstd[..., None] * gain[:, None, None, :]
    assert y.dtype == rstd.dtype == torch.float64
    torch.testing.assert_close(rstd, want_rstd, rtol=1e-13, atol=0)
    torch.testing.assert_close(y, want, rtol=1e-13, atol=0)
