"""The native one-pass CPU AdamW (trajinv.kernels.adamw.native_adamw_step): against torch's AdamW, the fp64
reference, the torch-ops statistics, and the fallback when it cannot be built.

The kernel is compiled once per machine (torch's extension cache); each test
process only loads the cached .so.
"""

import os
import shutil

import pytest
import torch

from trajinv.kernels import adamw as F
from trajinv.optim import FusedAdamW

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                                reason="no C++ compiler: the native kernel cannot be built here")

# empty, 1, odd, more than one kernel block, and past the parallel threshold
SHAPES = [(0,), (1,), (7, 3), (F.NATIVE_BLOCK + 37,), (33,), (F.PAR_MIN + 5,)]


def _params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _clone(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def _grads(ps, gen, scale=1.0):
    return [torch.randn(p.shape, generator=gen) * scale for p in ps]


def _native_used(opt) -> bool:
    return all(b.native_plans for b in opt._buckets if b.dtype == torch.float32)


@pytest.fixture
def fresh_native():
    """Each test that breaks the build gets a clean slate and leaves one (the cache reloads)."""
    F.NATIVE.reset()
    yield
    F.NATIVE.reset()


def test_builds_and_loads():
    assert F.NATIVE.get() is not None


def test_one_native_call_per_fp32_bucket_and_step():
    # bench_adamw reports native calls as ops per step: the counter must count them
    ps = _params(SHAPES)
    opt = FusedAdamW(ps, lr=1e-2, backend="torch")
    for p in ps:
        p.grad = torch.ones_like(p)
    before = F.NATIVE_CALLS
    opt.step()
    opt.step()
    assert F.NATIVE_CALLS - before == 2 * len(opt._buckets) and _native_used(opt)


def test_fp32_matches_torch_adamw_over_20_steps():
    ps = _params(SHAPES)
    qs = _clone(ps)
    groups = lambda xs: [{"params": xs[:3]},
                         {"params": xs[3:], "lr": 3e-3, "weight_decay": 0.2, "betas": (0.8, 0.99), "eps": 1e-6}]
    opt = FusedAdamW(groups(ps), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, backend="torch")
    ref = torch.optim.AdamW(groups(qs), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for i in range(20):
        for p, q, g in zip(ps, qs, _grads(ps, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step(statistics=i % 3 != 1)  # both kernel variants, switched between steps
        ref.step()
    assert _native_used(opt)
    steps = opt.state_dict()["state"]
    for i, (p, q) in enumerate(zip(ps, qs)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert int(steps[i]["step"]) == 20


def _member_opt(native: bool, k=3):
    ps = _params([(k, 5, 7), (k, 300), (k, 0), (k, 1), (41,)], seed=4)
    gains = _params([(k, 9)], seed=5)
    lrs, wds = [1e-3, 2e-3, 4e-2], [0.1, 0.0, 0.05]
    opt = FusedAdamW([{"params": ps[:4], "lr": lrs, "weight_decay": wds},
                      {"params": gains, "lr": torch.tensor(lrs), "weight_decay": 0.0},
                      {"params": ps[4:], "lr": 5e-3, "decay_mode": "independent"}],
                     betas=(0.9, 0.95), backend="torch")
    opt.native_cpu = native
    return ps + gains, opt


def test_statistics_match_torch_ops_path_and_plain_sums_with_members():
    """Per-member lr/wd, a grad_scale, empty/odd members, a param without grad, independent decay:
    the native statistics equal the torch-ops path's and plain torch sums."""
    (ps, nat), (qs, tops) = _member_opt(True), _member_opt(False)
    b2, eps = 0.95, 1e-8
    gen = torch.Generator().manual_seed(6)
    for step in range(1, 5):
        grads = _grads(ps, gen)
        old = [p.detach().clone() for p in ps]
        prev_v = [nat.state[p]["exp_avg_sq"].clone() if p in nat.state else None for p in ps]
        for i, (p, q, g) in enumerate(zip(ps, qs, grads)):
            none = step == 3 and i == 1  # not stepped this time
            p.grad, q.grad = (None, None) if none else (g.clone(), g.clone())
        scale = torch.tensor(4.0) if step % 2 else None  # (K,) scales: the next test (member groups only)
        nat.step(grad_scale=scale)
        tops.step(grad_scale=scale)
        s_nat, s_tops = nat.statistics(), tops.statistics()
        assert set(s_nat) == {p for p in ps if p.grad is not None}
        for p, q, g, o, v in zip(ps, qs, grads, old, prev_v):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            if p.grad is None:
                continue
            for a, c in zip(s_nat[p], s_tops[q]):
                assert a.shape == c.shape and a.dtype == torch.float32
                torch.testing.assert_close(a, c, rtol=2e-5, atol=1e-9)
            # plain sums, for a (K, ...) member param: per member
            k = p.shape[0] if p.dim() > 1 else 1
            gg = (g / (1.0 if scale is None else scale)).double().reshape(k, -1)
            st_prev = step - 1 - (1 if (step > 3 and p is ps[1]) else 0)
            P = torch.ones_like(gg) if v is None or st_prev == 0 else (
                (v.double().reshape(k, -1) / (1 - b2**st_prev)).sqrt() + eps)
            pn, po = p.detach().double().reshape(k, -1), o.double().reshape(k, -1)
            want = [gg.pow(2).sum(1), (gg * gg / P).sum(1), pn.pow(2).sum(1), (pn - po).pow(2).sum(1)]
            for got, w in zip(s_nat[p], want):
                torch.testing.assert_close(got.double().reshape(-1), w, rtol=1e-4, atol=1e-9)
    assert _native_used(nat) and not tops._buckets[0].native_plans


def test_per_member_grad_scale_and_found_inf():
    ps = _params([(3, 5, 7), (3, 300), (3, 0), (3, 1)], seed=4)
    nat = FusedAdamW([{"params": ps[:4], "lr": [1e-3, 2e-3, 4e-2], "weight_decay": 0.1}],
                                 backend="torch")
    qs = _clone(ps)
    tops = FusedAdamW([{"params": qs, "lr": [1e-3, 2e-3, 4e-2], "weight_decay": 0.1}], backend="torch")
    tops.native_cpu = False
    gs = torch.tensor([1.0, 3.0, 0.25])
    gen = torch.Generator().manual_seed(7)
    for i in range(4):
        grads = _grads(ps, gen)
        for p, q, g in zip(ps, qs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        inf = torch.tensor(1.0 if i == 1 else 0.0)
        before = [p.detach().clone() for p in ps]
        nat.step(grad_scale=gs, found_inf=inf)
        tops.step(grad_scale=gs, found_inf=inf)
        st = nat.statistics()
        if i == 1:  # skipped: nothing moved, no step counted, zero statistics
            assert all(torch.equal(p, b) for p, b in zip(ps, before))
            assert all(not f.any() for s in st.values() for f in s)
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert int(nat.state_dict()["state"][0]["step"]) == 3
    assert _native_used(nat)


def test_kernel_against_fp64_reference_and_thread_count_independent():
    """The launcher on flat buffers, three tensors, a member tensor, against adamw_reference."""
    gen = torch.Generator().manual_seed(8)
    sizes, members = [F.PAR_MIN + 3, 0, 2 * 513], [1, 1, 2]
    offs = [0, 65552, 65552]  # 16-aligned flat offsets, as a Bucket lays them out
    total = 65552 + 1026 + 14
    params = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    hyper = torch.tensor([F.hyper_row(1e-2, 0.1, 0.9, 0.95, 1e-8), F.hyper_row(3e-3, 0.0, 0.8, 0.99, 1e-6),
                          F.hyper_row(5e-2, 0.3, 0.9, 0.999, 1e-8)], dtype=torch.float32)
    segs, rows = [], []
    for t, (n, k, off) in enumerate(zip(sizes, members, offs)):
        for j in range(k):
            slot = t if k == 1 else 1 + j
            lo = off + j * (n // k)
            rows.append([t, t, j, lo, n // k, slot, len(segs)])
            segs.append(F.Segment(lo, lo + n // k, t, slot, j))
    table = torch.tensor(rows, dtype=torch.int64)
    flat_p, flat_g = torch.zeros(total), torch.zeros(total)
    for n, off, p, g in zip(sizes, offs, params, grads):
        flat_p[off:off + n], flat_g[off:off + n] = p, g
    m, v = torch.rand(total, generator=gen) * 0.1, torch.rand(total, generator=gen) * 0.01
    gs = torch.tensor([2.0, 0.5])
    ref_p, ref_m, ref_v, ref_steps = flat_p.clone(), m.clone(), v.clone(), torch.tensor([4.0, 4.0, 4.0])
    want = F.adamw_reference(ref_p, flat_g.clone(), ref_m, ref_v, None, segs, hyper, ref_steps, grad_scale=gs)
    results = []
    for threads in (1, 2):
        ps = [p.clone() for p in params]
        mm, vv, steps = m.clone(), v.clone(), torch.tensor([5.0, 5.0, 5.0])
        ptrs = torch.tensor([[p.data_ptr(), g.data_ptr()] for p, g in zip(ps, grads)], dtype=torch.int64)
        stats = torch.full((len(segs), 4), -1.0)
        w_out = torch.full((total,), -1.0) if threads == 2 else None  # also emit W on one of the runs
        F.native_adamw_step(ptrs, table, mm, vv, hyper, steps, gs, stats, num_threads=threads, precond_out=w_out)
        for p, n, off in zip(ps, sizes, offs):
            torch.testing.assert_close(p, ref_p[off:off + n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mm, ref_m, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(vv, ref_v, rtol=1e-5, atol=1e-9)
        if w_out is not None:  # W = 1/(sqrt(v_hat) + eps) of the updated state on every segment, padding untouched
            covered = torch.zeros(total, dtype=torch.bool)
            for sg in segs:
                b2, eps = float(hyper[sg.slot, 3]), float(hyper[sg.slot, 4])
                want_w = 1 / ((ref_v[sg.lo:sg.hi] / (1 - b2**5)).sqrt() + eps)
                torch.testing.assert_close(w_out[sg.lo:sg.hi], want_w, rtol=1e-5, atol=0)
                covered[sg.lo:sg.hi] = True
            assert (w_out[~covered] == -1).all()
        torch.testing.assert_close(stats.double(), want, rtol=1e-5, atol=1e-7)
        results.append((ps, stats))
    # the same blocks and the same block-order reduction whatever the number of threads
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    assert torch.equal(results[0][1], results[1][1])


def test_launcher_rejects_bad_buffers():
    z = torch.zeros(4)
    table = torch.zeros(0, F.SEG_COLS, dtype=torch.int64)
    ptrs = torch.zeros(0, 2, dtype=torch.int64)
    hyper = torch.zeros(1, 5)
    with pytest.raises(TypeError, match="exp_avg"):
        F.native_adamw_step(ptrs, table, z.double(), z, hyper, z)
    with pytest.raises(ValueError, match=r"\(3, 6\)"):
        F.native_adamw_step(ptrs, torch.zeros(3, 6, dtype=torch.int64), z, z, hyper, z)
    with pytest.raises(TypeError, match="stats"):
        F.native_adamw_step(ptrs, table, z, z, hyper, z, stats=torch.zeros(2, 3))


@pytest.mark.parametrize("strided_param", [False, True])
def test_strided_params_and_grads_still_correct(strided_param, monkeypatch):
    """A strided grad is made contiguous for the kernel; a strided param takes the torch-ops path."""
    calls = []
    step = F.native_adamw_step
    monkeypatch.setattr(F, "native_adamw_step", lambda *a, **k: calls.append(1) or step(*a, **k))
    ps = _params([(6, 5), (4, 8)], seed=9)
    if strided_param:
        ps[0].data = ps[0].data.t().contiguous().t()
    qs = _clone(ps)
    opt = FusedAdamW(ps, lr=1e-2, backend="torch")
    ref = torch.optim.AdamW(qs, lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(10)
    for _ in range(3):
        for p, q, g in zip(ps, qs, _grads(ps, gen)):
            p.grad, q.grad = g.t().contiguous().t(), g.clone()
        opt.step()
        ref.step()
        assert len(opt.statistics()) == 2
    assert len(calls) == (0 if strided_param else 3)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cxx", ["/nonexistent/c++", "false"])
def test_falls_back_to_torch_ops_with_one_warning_when_the_build_fails(cxx, fresh_native, monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", cxx)  # no compiler / a compiler that fails
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing cached there
    ps = _params([(7, 3), (50,)], seed=11)
    qs = _clone(ps)
    opt = FusedAdamW(ps, lr=1e-2, weight_decay=0.1, backend="torch")
    ref = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(12)
    with pytest.warns(RuntimeWarning, match="native CPU AdamW unavailable"):
        for _ in range(3):
            for p, q, g in zip(ps, qs, _grads(ps, gen)):
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
    assert F.NATIVE.get() is None and not opt._buckets[0].native_plans
    assert len(opt.statistics()) == 2
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="unavailable"):
        F.native_adamw_step(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 7, dtype=torch.int64),
                     torch.zeros(1), torch.zeros(1), torch.zeros(1, 5), torch.zeros(1))


def test_switched_off_by_environment(fresh_native, monkeypatch):
    monkeypatch.setenv("TRAJINV_NATIVE_ADAMW", "0")
    assert F.NATIVE.get() is None


def test_the_build_goes_to_torch_extensions_dir(fresh_native, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # README: where the native libraries are cached
    seen = []

    def compile_nothing(exe, so):
        seen.append(so)
        raise RuntimeError("not built in this test")

    monkeypatch.setattr(F.NATIVE, "_compile", compile_nothing)
    with pytest.warns(RuntimeWarning, match="not built in this test"):
        assert F.NATIVE.get() is None
    assert len(seen) == 1 and seen[0].is_relative_to(tmp_path)
