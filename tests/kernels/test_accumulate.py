"""Fused accumulate + micro-batch norms: Triton (interpreter) and CPU path against the
reference and against explicit per-micro-batch gradients; AOT compile check."""

import pytest
import torch

from trajinv.kernels.accumulate import (
    LAUNCH_CONFIG,
    accumulate_grad_with_norms,
    accumulate_grad_with_norms_reference,
    accumulate_grads_with_norms,
)

# (shape, members): no member axis, member axis, odd sizes, more than one block, 0-dim, empty.
CASES = [((7,), 1), ((3, 5, 9), 3), ((2, 3000), 2), ((1, 17, 3), 1), ((), 1), ((2, 0, 4), 2), ((50, 8), 1)]


def _inputs(shape, acc_dtype, grad_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = torch.randn(shape, generator=g).to(acc_dtype)
    grad = torch.randn(shape, generator=g).to(grad_dtype)
    w = torch.rand(shape, generator=g) + 0.05
    return acc, grad, w


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16)])  # fmt: skip
@pytest.mark.parametrize("shape,members", CASES)
def test_matches_reference(shape, members, dtypes, backend):
    acc_dtype, grad_dtype = dtypes
    acc, grad, w = _inputs(shape, *dtypes)
    for precond in (None, w):
        ref_acc = acc.clone()
        got_acc = acc.clone()
        ref = accumulate_grad_with_norms_reference(ref_acc, grad, precond, members)
        got = accumulate_grad_with_norms(got_acc, grad, precond, members=members, backend=backend)
        # The add itself: bitwise equal in fp32, one rounding in bf16.
        tol = dict(rtol=0, atol=0) if acc_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(got_acc, ref_acc, **tol)
        for g_, r_ in zip(got, ref):
            assert g_.shape == (members,) and g_.dtype == torch.float32
            torch.testing.assert_close(g_, r_, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_against_explicit_micro_batch_gradients(backend):
    # A member-axis linear model; three micro-batches accumulated through the kernel.
    K, d_out, d_in = 2, 5, 3
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(K, d_out, d_in, generator=g, requires_grad=True)
    precond = torch.rand(K, d_out, d_in, generator=g) + 0.1
    acc = torch.zeros(K, d_out, d_in)
    s_w = torch.zeros(K)
    s_1 = torch.zeros(K)
    grads = []
    for _ in range(3):
        x = torch.randn(K, 4, d_in, generator=g)
        loss = torch.tanh(torch.bmm(x, weight.transpose(1, 2))).sum()
        (gm,) = torch.autograd.grad(loss, weight)
        grads.append(gm)
        sw, s1 = accumulate_grad_with_norms(acc, gm, precond, members=K, backend=backend)
        s_w += sw
        s_1 += s1
    stacked = torch.stack(grads)  # (micro, K, out, in)
    torch.testing.assert_close(acc, stacked.sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s_1, stacked.square().sum((2, 3)).sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_w, (stacked.square() * precond).sum((2, 3)).sum(0), rtol=1e-5, atol=1e-6)


def test_bad_input_is_rejected():
    acc, grad, w = _inputs((2, 3), torch.float32, torch.float32)
    with pytest.raises(ValueError, match="members"):
        accumulate_grad_with_norms(acc, grad, members=3)
    with pytest.raises(ValueError, match="members"):
        accumulate_grad_with_norms(acc, grad, members=0)
    with pytest.raises(ValueError, match="grad shape"):
        accumulate_grad_with_norms(acc, grad[:1], members=2)
    with pytest.raises(ValueError, match="precond shape"):
        accumulate_grad_with_norms(acc, grad, w.T, members=2)
    with pytest.raises(ValueError, match="contiguous"):
        accumulate_grad_with_norms(acc.T, grad.T, members=1)
    with pytest.raises(TypeError, match="int64"):
        accumulate_grad_with_norms(acc, grad.long(), members=2)
    with pytest.raises(ValueError, match="backend"):
        accumulate_grad_with_norms(acc, grad, members=2, backend="x")


def test_aot_compiles_without_spills_with_vector_access():
    # Both archs, with and without W, in one child-process compile.
    from trajinv.kernels.aot import KernelSpec, compile_kernels

    sig = {"acc_ptr": "*fp32", "g_ptr": "*fp32", "w_ptr": "*fp32", "sw_ptr": "*fp32", "s1_ptr": "*fp32",
           "M": "i32", "HAS_W": "constexpr", "BLOCK": "constexpr"}  # fmt: skip
    specs = []
    for arch in (80, 90):
        for adt, gdt, has_w in (("fp32", "fp32", True), ("fp32", "bf16", False), ("bf16", "bf16", True),
                                ("fp16", "fp16", False)):
            specs.append(KernelSpec("trajinv.kernels.accumulate:_accumulate_gns_kernel",
                                    dict(sig, acc_ptr=f"*{adt}", g_ptr=f"*{gdt}"),
                                    {"HAS_W": has_w, "BLOCK": LAUNCH_CONFIG["BLOCK"]}, ("acc_ptr", "g_ptr", "w_ptr", "M"),
                                    arch, LAUNCH_CONFIG["num_warps"]))  # fmt: skip
    for spec, k in zip(specs, compile_kernels(specs)):
        assert not k.spills and k.registers <= 255
        assert k.count("ld.global.v4") > 0 and k.count("st.global.v4") > 0, (spec.target, spec.arch, spec.signature)
        assert not k.narrow_products("%ctaid.x"), "block offsets in 32 bits wrap past 2^31 elements a member"


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("members", [1, 3])
def test_list_version_matches_per_tensor_reference(native, members, monkeypatch):
    # Several tensors (odd sizes, one past a native block, one empty), some without W,
    # one unmeasured, some with no accumulator (norms only): one call against the
    # per-tensor reference.
    import trajinv.kernels.accumulate as mod

    monkeypatch.setenv("TRAJINV_NATIVE_GNS", "1" if native else "0")
    mod.NATIVE.reset()
    try:
        assert (mod.NATIVE.get() is not None) == native
        shapes = [(members, 5), (members, 4100), (members, 0, 3), (members, 7, 3), (members, 1)]
        g = torch.Generator().manual_seed(4)
        accs = [torch.randn(s, generator=g) for s in shapes]
        grads = [torch.randn(s, generator=g) for s in shapes]
        ws = [torch.rand(s, generator=g) + 0.05 for s in shapes]
        ws[3] = None
        accs[1] = accs[3] = None
        grads_before = [x.clone() for x in grads]
        measured = [True, True, True, True, False]
        ref_accs = [None if a is None else a.clone() for a in accs]
        want_w, want_1 = torch.zeros(members), torch.zeros(members)
        for a, gr, w, meas in zip(ref_accs, grads, ws, measured):
            sw, s1 = accumulate_grad_with_norms_reference(torch.zeros_like(gr) if a is None else a, gr, w, members)
            if meas:
                want_w += sw
                want_1 += s1
        got_w, got_1 = accumulate_grads_with_norms(accs, grads, ws, members, measured=measured)
        assert got_w.shape == (members,) and got_w.dtype == torch.float32
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_1, want_1, rtol=1e-5, atol=1e-5)
        for a, r in zip(accs, ref_accs):
            assert (a is None) == (r is None)
            if a is not None:
                torch.testing.assert_close(a, r, rtol=0, atol=0)  # the same fp32 adds
        assert all(torch.equal(x, y) for x, y in zip(grads, grads_before))  # grads are only read
    finally:
        mod.NATIVE.reset()


def test_list_version_is_thread_count_independent_and_takes_other_dtypes():
    g = torch.Generator().manual_seed(6)
    shapes = [(2, 70000), (2, 33)]
    grads = [torch.randn(s, generator=g) for s in shapes]
    ws = [torch.rand(s, generator=g) for s in shapes]
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            accs = [torch.zeros(s) for s in shapes]
            outs.append((*accumulate_grads_with_norms(accs, grads, ws, 2), *accs))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    # bf16 grads are not the native path's: the torch path gives the same sums
    accs = [torch.zeros(s, dtype=torch.bfloat16) for s in shapes]
    bw, b1 = accumulate_grads_with_norms(accs, [x.bfloat16() for x in grads], ws, 2)
    torch.testing.assert_close(b1, outs[0][1], rtol=1e-2, atol=0)
    with pytest.raises(ValueError, match="one entry per tensor"):
        accumulate_grads_with_norms(accs, grads[:1], ws, 2)
    with pytest.raises(ValueError, match="measured needs"):
        accumulate_grads_with_norms(accs, grads, ws, 2, measured=[True])
    with pytest.raises(ValueError, match="members"):
        accumulate_grads_with_norms(accs, grads, ws, 0)
    fp32 = [torch.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match="differs"):  # the native path's fast check still names the shapes
        accumulate_grads_with_norms(fp32, [grads[1], grads[0]], [None, None], 2)
    # out_sums: added into, in fp64, and returned as its rows
    out = torch.ones(2, 2, dtype=torch.float64)
    rw, r1 = accumulate_grads_with_norms([None, None], grads, ws, 2, out_sums=out)
    torch.testing.assert_close(out[1], 1 + outs[0][1].double(), rtol=1e-6, atol=0)
    assert rw.data_ptr() == out.data_ptr()
    with pytest.raises(ValueError, match="out_sums"):
        accumulate_grads_with_norms([None, None], grads, ws, 2, out_sums=torch.ones(2, 2))


def test_sums_on_the_gradients_device_are_added_without_a_host_copy(monkeypatch):
    # The GNS meter adds every micro-batch's norms into its sums; on CUDA the torch-ops/Triton path moved
    # them to the host each time (.cpu(): a wait for the device per micro-batch). Sums kept on the
    # gradients' device are added there; the result is the same, and nothing is copied to the host.
    import trajinv.kernels.accumulate as mod

    monkeypatch.setenv("TRAJINV_NATIVE_GNS", "0")  # the path CUDA takes (torch ops here, Triton there)
    mod.NATIVE.reset()
    try:
        assert mod.NATIVE.get() is None
        gen = torch.Generator().manual_seed(3)
        grads = [torch.randn(2, 5, 3, generator=gen), torch.randn(2, 7, generator=gen)]
        ws = [torch.rand(2, 5, 3, generator=gen) + 0.5, None]
        want = torch.stack(accumulate_grads_with_norms([None, None], grads, ws, 2, backend="cpu")).double()
        copies = []
        real_cpu = torch.Tensor.cpu
        monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copies.append(self) or real_cpu(self, *a, **k))
        out = torch.zeros(2, 2, dtype=torch.float64)
        accumulate_grads_with_norms([None, None], grads, ws, 2, backend="cpu", out_sums=out)
        assert copies == []
        assert torch.equal(out, want)
    finally:
        mod.NATIVE.reset()


def test_blocks_go_on_the_grid_axis_without_cudas_65535_cap(monkeypatch):
    # CUDA caps grid axes 1 and 2 at 65535: with blocks there, one member's tensor could not pass
    # 65535 * 2048 elements (a 128k x 4096 embedding). Blocks now run along axis 0.
    from trajinv.kernels import accumulate as A

    grids = []

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kw: None

    monkeypatch.setattr(A, "_accumulate_gns_kernel", Spy())
    accumulate_grad_with_norms(torch.zeros(2, 5000), torch.ones(2, 5000), members=2, backend="triton")
    assert grids == [(3, 2)] and A.LAUNCH_CONFIG["BLOCK"] == 2048  # cdiv(5000, 2048) blocks, 2 members
    accumulate_grad_with_norms(torch.zeros(3, 9000), torch.ones(3, 9000), members=3, backend="triton")
    assert grids[-1] == (5, 3)


def test_a_norms_only_entry_takes_a_non_contiguous_grad():
    # nothing is written for it, yet it was refused with "acc must be contiguous" (the native list pass
    # takes contiguous tensors only, so this runs the per-tensor path)
    g = torch.randn(3, 5).t()  # (5, 3), non-contiguous
    w = torch.rand(5, 3) + 0.1
    s_w, s_1 = accumulate_grads_with_norms([None], [g], [w], members=5, backend="cpu")
    ref_w, ref_1 = accumulate_grad_with_norms_reference(torch.zeros(5, 3), g, w, members=5)
    torch.testing.assert_close(s_1, ref_1)
    torch.testing.assert_close(s_w, ref_w)
