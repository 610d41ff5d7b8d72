"""FusedAdamW against torch.optim.AdamW, on the CPU path and the Triton path (interpreter)."""

import collections
import math

import pytest
import torch

from trajinv.kernels import adamw as F
from trajinv.optim import AdamWStats, FusedAdamW, stochastic_round_bf16

BACKENDS = ["torch", "triton"]
SHAPES = [(0,), (1,), (7, 3), (1100,), (33,)]  # empty, 1, odd, > one kernel block


def _params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _clone(ps, dtype=None):
    return [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in ps]


def _grads(ps, gen, scale=1.0):
    return [torch.randn(p.shape, generator=gen) * scale for p in ps]


def _groups(ps):
    return [{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-3, "weight_decay": 0.2, "betas": (0.8, 0.99)}]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_matches_torch_adamw_over_20_steps(backend):
    ps = _params(SHAPES)
    qs = _clone(ps)
    opt = FusedAdamW(_groups(ps), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(_groups(qs), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        for p, q, g in zip(ps, qs, _grads(ps, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_params_track_fp32_adamw(backend, dtype):
    """16-bit params, fp32 states: a few ulps from fp32 AdamW fed the same (rounded) grads,
    and no further from it than torch.optim.AdamW run on the 16-bit params themselves."""
    ps = _params([(5, 40), (1100,)], dtype)
    mw, ts = _clone(ps), _clone(ps)
    qs = _clone(ps, torch.float32)
    opt = FusedAdamW(ps, lr=1e-2, weight_decay=0.1, backend=backend)
    opt_m = FusedAdamW(mw, lr=1e-2, weight_decay=0.1, backend=backend, master_weights=True)
    ref = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1, foreach=False)
    ref16 = torch.optim.AdamW(ts, lr=1e-2, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        for p, m, t, q, g in zip(ps, mw, ts, qs, _grads(ps, gen)):
            g = g.to(dtype)
            p.grad, m.grad, t.grad, q.grad = g.clone(), g.clone(), g.clone(), g.float()
        for o in (opt, opt_m, ref, ref16):
            o.step()
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    for p, m, t, q in zip(ps, mw, ts, qs):
        # master weights: the fp32 copy follows fp32 AdamW tightly, the param is its rounding
        torch.testing.assert_close(opt_m.state[m]["master_param"], q.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(m.detach(), q.detach().to(dtype))
        # without: per-step rounding drifts, by a few ulps of the value over 20 steps
        q = q.detach()
        ulp = torch.exp2(torch.floor(torch.log2(q.abs().clamp_min(2**-6))) - mant)
        err = ((p.detach().float() - q).abs() / ulp)
        err16 = ((t.detach().float() - q).abs() / ulp)
        assert err.max() <= 8 and err.mean() <= 1.5, (err.max(), err.mean())
        assert err.mean() <= err16.mean() * 1.05, (err.mean(), err16.mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_without_master_is_unbiased(backend):
    """Many small updates that round-to-nearest would drop: SR keeps the mean on track."""
    n = 2048
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = FusedAdamW([p], lr=1e-3, weight_decay=0.0, backend=backend, stochastic_rounding=True, seed=3)
    q = torch.nn.Parameter(torch.ones(n))
    ref = torch.optim.AdamW([q], lr=1e-3, weight_decay=0.0, foreach=False)
    for _ in range(6):
        p.grad = torch.ones(n, dtype=torch.bfloat16)
        q.grad = torch.ones(n)
        opt.step()
        ref.step()
    # each step moves by ~1e-3 < half a bf16 ulp below 1 (2**-9): round-to-nearest would stay at 1.0
    target = q[0].item()
    assert abs(p.double().mean().item() - target) < 4 * 2**-8 / math.sqrt(n)
    assert p.float().std() > 0


def test_stochastic_round_helper_is_unbiased():
    x = torch.full((1 << 14,), 1.0 + 2**-10)
    y = stochastic_round_bf16(x, seed=0).double()
    assert set(y.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(y.mean().item() - (1.0 + 2**-10)) < 4 * 2**-7 / 2 / 128


def _member_setup(backend, k=3):
    lrs, wds = [1e-3, 2e-3, 4e-2], [0.1, 0.0, 0.05]
    decayed = _params([(k, 5, 7), (k, 300), (k, 0)], seed=4)  # and an empty member-axis param
    gains = _params([(k, 9)], seed=5)
    opt = FusedAdamW([{"params": decayed, "lr": lrs, "weight_decay": wds},
                      {"params": gains, "lr": torch.tensor(lrs), "weight_decay": 0.0}],
                     betas=(0.9, 0.95), backend=backend)
    refs = []
    for j in range(k):
        d = [torch.nn.Parameter(p.detach()[j].clone()) for p in decayed]
        g = [torch.nn.Parameter(p.detach()[j].clone()) for p in gains]
        refs.append((d + g, torch.optim.AdamW([{"params": d, "lr": lrs[j], "weight_decay": wds[j]},
                                               {"params": g, "lr": lrs[j], "weight_decay": 0.0}],
                                              betas=(0.9, 0.95), foreach=False)))
    return decayed + gains, opt, refs


@pytest.mark.parametrize("backend", BACKENDS)
def test_member_axis_matches_k_separate_torch_optimizers(backend):
    ps, opt, refs = _member_setup(backend)
    gen = torch.Generator().manual_seed(6)
    gs = torch.tensor([1.0, 2.0, 4.0])  # per-member grad scale (the trainer's per-member clipping)
    for i in range(12):
        grads = _grads(ps, gen)
        if i == 5:  # the trainer's schedule: new per-member lr every step, as a list
            opt.param_groups[0]["lr"] = [2e-3, 1e-3, 2e-2]
            opt.param_groups[1]["lr"].mul_(0.5)  # or in place on the tensor
            for j, (_, ref) in enumerate(refs):
                ref.param_groups[0]["lr"] = [2e-3, 1e-3, 2e-2][j]
                ref.param_groups[1]["lr"] *= 0.5
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        for j, (qs, ref) in enumerate(refs):
            for q, g in zip(qs, grads):
                q.grad = g[j] / gs[j]
            ref.step()
        opt.step(grad_scale=gs)
    for pi, p in enumerate(ps):
        for j, (qs, _) in enumerate(refs):
            torch.testing.assert_close(p.detach()[j], qs[pi].detach(), rtol=1e-5, atol=1e-6)
    st = opt.statistics()
    assert all(f.shape == (3,) and f.dtype == torch.float32 for s in st.values() for f in s)


def test_member_group_rejects_params_without_the_axis():
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        FusedAdamW([{"params": [torch.nn.Parameter(torch.zeros(4, 5))], "lr": [1e-3, 2e-3, 3e-3]}])
    with pytest.raises(ValueError, match="differ in length"):
        FusedAdamW([{"params": [torch.nn.Parameter(torch.zeros(3, 5))], "lr": [1, 2, 3], "weight_decay": [1, 2]}])


@pytest.mark.parametrize("backend", BACKENDS)
def test_independent_decay_against_hand_written_reference(backend):
    p = _params([(50,)], seed=7)[0]
    x = p.detach().clone().double()
    lr0, wd, b1, b2, eps = 1e-2, 0.01, 0.9, 0.99, 1e-8
    opt = FusedAdamW([p], lr=lr0, betas=(b1, b2), eps=eps, weight_decay=wd, decay_mode="independent",
                     backend=backend)
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    gen = torch.Generator().manual_seed(8)
    for t in range(1, 9):
        lr = lr0 * (1 - t / 10)  # a schedule: the decay follows lr / lr0
        opt.param_groups[0]["lr"] = lr
        g = torch.randn(50, generator=gen)
        p.grad = g.clone()
        opt.step()
        x = x * (1 - wd * lr / lr0)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = x - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    torch.testing.assert_close(p.detach().double(), x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("box", [list, torch.tensor])
def test_independent_decay_of_a_member_at_lr_zero_is_none_however_given(backend, box):
    # wd_eff = wd / lr0: the list branch mapped lr0 = 0 to no decay, the tensor branch to 1 - 0 x inf = NaN
    p = torch.nn.Parameter(torch.ones(3, 4))
    opt = FusedAdamW([{"params": [p], "lr": box([1e-2, 1e-2, 0.0]), "weight_decay": box([0.1, 0.1, 0.1]),
                       "decay_mode": "independent"}], backend=backend)
    p.grad = torch.ones(3, 4)
    opt.step()
    assert torch.equal(p[2].detach(), torch.ones(4)) and torch.isfinite(p).all()


@pytest.mark.parametrize("backend, native", [("cpu", True), ("cpu", False), ("triton", True)])
def test_a_grad_scale_leaves_the_callers_grads_alone(backend, native):
    # torch's fused AdamW (the CPU torch-ops path) unscales its grads in place: p.grad came back halved
    p = torch.nn.Parameter(torch.ones(8))
    opt = FusedAdamW([p], lr=1e-2, backend=backend, native_cpu=native)
    p.grad = torch.full((8,), 4.0)
    opt.step(grad_scale=2.0)
    assert torch.equal(p.grad, torch.full((8,), 4.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_corrections_hold_for_a_beta2_near_one(backend):
    # the Triton kernel computed 1 - beta2^t in fp32, which cancels: at beta2 = 0.9999 its update sat
    # 2e-5 (relative) from torch's after 3 steps, its preconditioner 1e-4
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(4096, generator=gen)
    grads = [torch.randn(4096, generator=gen) for _ in range(3)]
    ps = [torch.nn.Parameter(p0.clone()) for _ in range(2)]
    opt = FusedAdamW([ps[0]], lr=1e-2, betas=(0.9, 0.9999), weight_decay=0.0, backend=backend)
    ref = torch.optim.AdamW([ps[1]], lr=1e-2, betas=(0.9, 0.9999), weight_decay=0.0, foreach=False)
    for g in grads:
        ps[0].grad, ps[1].grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    ours, theirs = ps[0].detach() - p0, ps[1].detach() - p0
    assert ((ours - theirs).norm() / theirs.norm()).item() < 2e-6
    v_hat = ref.state[ps[1]]["exp_avg_sq"] / (1 - 0.9999 ** 3)
    torch.testing.assert_close(opt.preconditioner(ps[0]), 1 / (v_hat.sqrt() + 1e-8), rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_and_found_inf(backend):
    ps = _params([(20,), (1100,)], seed=9)
    qs = _clone(ps)
    opt = FusedAdamW(ps, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(qs, lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(10)
    for i in range(4):
        grads = _grads(ps, gen, 1024.0)
        for p, q, g in zip(ps, qs, grads):
            p.grad, q.grad = g.clone(), g / 1024.0
        inf = torch.tensor(1.0 if i == 2 else 0.0)
        before = [p.detach().clone() for p in ps]
        opt.step(grad_scale=torch.tensor(1024.0), found_inf=inf)
        if i == 2:  # skipped: nothing moved, the step counter did not advance
            assert all(torch.equal(p, b) for p, b in zip(ps, before))
            assert int(opt.state_dict()["state"][0]["step"]) == 2
        else:
            ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert int(opt.state_dict()["state"][1]["step"]) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_match_torch_sums(backend):
    ps = _params([(1,), (3, 7), (1100,)], seed=11)
    qs = _clone(ps)
    b2, eps = 0.95, 1e-8
    opt = FusedAdamW(ps, lr=1e-2, betas=(0.9, b2), eps=eps, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(qs, lr=1e-2, betas=(0.9, b2), eps=eps, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(12)
    for step in range(1, 4):
        grads = _grads(ps, gen)
        old = [q.detach().clone() for q in qs]
        prev_v = [ref.state[q]["exp_avg_sq"].clone() if q in ref.state else None for q in qs]
        for p, q, g in zip(ps, qs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        st = opt.statistics()
        for p, q, g, o, v in zip(ps, qs, grads, old, prev_v):
            P = torch.ones_like(g) if v is None else (v / (1 - b2 ** (step - 1))).sqrt() + eps
            want = [g.pow(2).sum(), (g * g / P).sum(), q.detach().pow(2).sum(), (q.detach() - o).pow(2).sum()]
            assert isinstance(st[p], AdamWStats)
            for got, w in zip(st[p], want):
                assert got.shape == () and got.dtype == torch.float32
                torch.testing.assert_close(got.double(), w.double(), rtol=1e-4, atol=1e-9)
        W = opt.preconditioner(ps[2])
        want_w = 1 / ((ref.state[qs[2]]["exp_avg_sq"] / (1 - b2**step)).sqrt() + eps)
        torch.testing.assert_close(W, want_w, rtol=1e-5, atol=0)
        # the batched read-outs agree with the per-param ones
        all_w = opt.preconditioners()
        assert set(all_w) == set(ps)
        for p in ps:
            torch.testing.assert_close(all_w[p], opt.preconditioner(p), rtol=1e-6, atol=0)
        tables = opt.statistics_tables()
        seen = set()
        for params, table, starts in tables:
            assert table.shape[1] == 4
            for p, s0 in zip(params, starts):
                torch.testing.assert_close(table[s0], torch.stack(list(st[p])), rtol=0, atol=0)
                seen.add(p)
        assert seen == set(ps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_preconditioner_is_none_before_the_first_step(backend):
    p = _params([(4,)])[0]
    opt = FusedAdamW([p], backend=backend)
    assert opt.preconditioner(p) is None
    p.grad = torch.ones(4)
    opt.step(found_inf=torch.tensor(1.0))  # a skipped first step leaves no state: W = 1 or None
    w = opt.preconditioner(p)
    assert w is None or torch.equal(w, torch.ones(4))
    opt.step()
    torch.testing.assert_close(opt.preconditioner(p), 1 / ((opt.state[p]["exp_avg_sq"] / 0.001).sqrt() + 1e-8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trips_with_torch_adamw(backend):
    ps = _params([(6, 5), (1100,)], seed=13)
    gen = torch.Generator().manual_seed(14)
    grads = [_grads(ps, gen) for _ in range(6)]

    def run(opt, params, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    # A: ours 3 steps -> torch 3 steps; B: torch 3 steps -> ours 3 steps; C: torch 6 steps
    a = _clone(ps)
    opt_a = FusedAdamW(a, lr=1e-2, weight_decay=0.1, backend=backend)
    run(opt_a, a, grads[:3])
    sd = opt_a.state_dict()
    assert set(sd["state"][0]) >= {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"][0]["exp_avg"].shape == (6, 5) and sd["state"][0]["step"].shape == ()
    ta = torch.optim.AdamW(a, lr=1e-2, weight_decay=0.1, foreach=False)
    ta.load_state_dict(sd)
    run(ta, a, grads[3:])

    b = _clone(ps)
    tb = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=False)
    run(tb, b, grads[:3])
    opt_b = FusedAdamW(b, lr=1e-2, weight_decay=0.1, backend=backend)
    opt_b.load_state_dict(tb.state_dict())
    run(opt_b, b, grads[3:])
    assert int(opt_b.state_dict()["state"][1]["step"]) == 6

    c = _clone(ps)
    run(torch.optim.AdamW(c, lr=1e-2, weight_decay=0.1, foreach=False), c, grads)
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y, z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_grad_none_grads_and_replaced_grads(backend):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 1))
    frozen_out = torch.nn.Parameter(torch.randn(3))  # never gets a grad
    ref_model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 1))
    ref_model.load_state_dict(model.state_dict())
    opt = FusedAdamW(list(model.parameters()) + [frozen_out], lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(15)
    x0 = frozen_out.detach().clone()
    for i in range(5):
        x = torch.randn(8, 6, generator=gen)
        for mdl in (model, ref_model):
            mdl(x).pow(2).mean().backward()
        if i == 1:
            model[0].bias.grad = model[0].bias.grad.clone()  # replaced .grad
        if i == 3:
            model[1].bias.grad = None  # a param without grad this step: not stepped
            ref_model[1].bias.grad = None
        opt.step()
        ref.step()
        if i % 2:
            opt.zero_grad(set_to_none=True)
            assert all(p.grad is None for p in model.parameters())
        else:
            model.zero_grad()  # torch's default: grads to None
        ref_model.zero_grad()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert torch.equal(frozen_out.detach(), x0)
    sd = opt.state_dict()["state"]
    assert int(sd[3]["step"]) == 4 and int(sd[0]["step"]) == 5
    assert 4 not in sd or int(sd[4]["step"]) == 0


def test_zero_grad_keeps_flat_grad_views_on_triton_path():
    ps = _params([(3, 4), (5,)])
    opt = FusedAdamW(ps, backend="triton")
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad(set_to_none=False)
    b = opt._buckets[0]
    assert all(b.grad_in_place(t) and not p.grad.any() for t, p in enumerate(ps))
    assert all(b.param_in_place(t) for t in range(len(ps)))


def test_one_launch_per_dtype_group_per_step():
    # 340 tensors: more than one launch of torch's CUDA _foreach kernels takes (36 to 110 by the number of
    # lists), and few enough for the interpreter, which runs a program per tensor (999 took minutes on 2 cores)
    ps = _params([(3,)] * 299 + [(1100,)])
    hs = _params([(5,)] * 40, torch.bfloat16)
    opt = FusedAdamW([{"params": ps}, {"params": hs, "lr": 1e-3}], backend="triton")
    for _ in range(2):
        for p in ps + hs:
            p.grad = torch.ones_like(p)
        before = F.LAUNCHES
        opt.step()
        assert F.LAUNCHES - before == 2  # 340 tensors, 2 dtypes


def test_params_beyond_the_block_tables_reach_get_another_bucket(monkeypatch):
    # the int32 block table spans 2**31 elements: a population sized to fill an H200 went past it and
    # every step was refused ("split the bucket"). A small limit stands in for 2**31 here.
    monkeypatch.setattr(F, "FLAT_LIMIT", 3 * F.BLOCK)
    ps = _params([(1100,), (900,), (33,), (7, 3), (1000,)])
    qs = _clone(ps)
    opt = FusedAdamW(ps, lr=1e-2, weight_decay=0.1, backend="triton")
    ref = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q, g in zip(ps, qs, _grads(ps, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        before = F.LAUNCHES
        opt.step()
        ref.step()
    assert F.LAUNCHES - before == len(opt._buckets) > 1
    assert all(b.total + F.BLOCK < F.FLAT_LIMIT for b in opt._buckets)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_unsupported_options_fail_at_construction():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="amsgrad"):
        FusedAdamW([p], amsgrad=True)
    with pytest.raises(ValueError, match="complex"):
        FusedAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="sparse"):
        FusedAdamW([torch.nn.Parameter(torch.zeros(3).to_sparse())])
    with pytest.raises(TypeError, match="float64"):
        FusedAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="decay_mode"):
        FusedAdamW([p], decay_mode="l2")
    with pytest.raises(ValueError, match="backend"):
        FusedAdamW([p], backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_works_under_torch_grad_scaler(backend):
    """GradScaler hands us grad_scale/found_inf as attributes; an inf step is skipped, as torch's."""
    ps = _params([(4, 6), (7,)], seed=16)
    qs = _clone(ps)
    opt = FusedAdamW(ps, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(qs, lr=1e-2, foreach=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=256.0) for _ in range(2)]
    gen = torch.Generator().manual_seed(17)
    for i in range(4):
        grads = _grads(ps, gen)
        if i == 1:
            grads[0][0, 0] = float("inf")
        for o, params, sc in ((opt, ps, scalers[0]), (ref, qs, scalers[1])):
            loss = sum((p * g).sum() for p, g in zip(params, grads))
            sc.scale(loss).backward()
            sc.step(o)
            sc.update()
            o.zero_grad()
    assert scalers[0].get_scale() == scalers[1].get_scale() == 128.0  # the inf step halved the scale
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert int(opt.state_dict()["state"][0]["step"]) == 3


def test_statistics_can_be_switched_off_on_the_cpu_path_between_steps():
    """The trainer turns statistics on for logged steps only; the maths never changes."""
    ps = _params([(5, 3), (40,)], seed=18)
    qs = _clone(ps)
    opt = FusedAdamW(ps, lr=1e-2, backend="torch")
    ref = torch.optim.AdamW(qs, lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(19)
    for i in range(4):
        for p, q, g in zip(ps, qs, _grads(ps, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step(statistics=i == 2)
        ref.step()
        st = opt.statistics()
        assert (len(st) == 2) == (i == 2)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_preconditioner_right_after_load_state_dict(backend):
    """A resumed run reads W before its first step: it must be the loaded state's."""
    ps = _params([(6, 5), (33,)], seed=20)
    opt = FusedAdamW(ps, lr=1e-2, backend=backend)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    fresh = FusedAdamW(_clone(ps), lr=1e-2, backend=backend)
    fresh.load_state_dict(opt.state_dict())
    for p, q in zip(ps, fresh.param_groups[0]["params"]):
        torch.testing.assert_close(fresh.preconditioner(q), opt.preconditioner(p), rtol=0, atol=0)


def test_emitted_preconditioner_matches_the_state():
    # CPU native path: W written by the step itself is what preconditioners() returns,
    # equal to the one computed from the state; a partial step (a grad missing) does not emit.
    ps = _params([(7, 3), (1100,), (33,)], seed=21)
    opt = FusedAdamW(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    gen = torch.Generator().manual_seed(22)
    for step in range(3):
        for p, g in zip(ps, _grads(ps, gen)):
            p.grad = g
        if step == 2:
            ps[1].grad = None
        opt.step(emit_preconditioner=True)
        bucket = opt._buckets[0]
        assert (bucket.precond_ready is not None) == (step < 2)
        got = opt.preconditioners()
        if step < 2:  # the emitted W is bitwise the one computed from the state (resumed runs rely on it)
            emitted = {p: w.clone() for p, w in got.items()}
            bucket.precond_ready = None
            again = opt.preconditioners()
            assert all(torch.equal(again[p], emitted[p]) for p in ps)
        for p in ps:
            v = opt.state[p]["exp_avg_sq"]
            bc = 1 - 0.95 ** float(opt.state[p]["step"])
            torch.testing.assert_close(got[p], 1 / ((v / bc).sqrt() + 1e-6), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_that_changes_shape_is_refused_not_overrun(backend):
    # the native kernel follows a pointer per tensor: a 10-element param with a 1,000-element state
    # used to be written past its end (a crash later, far from the cause)
    w = torch.nn.Parameter(torch.randn(1000))
    opt = FusedAdamW([w], lr=1e-2, backend=backend)
    w.grad = torch.ones(1000)
    opt.step()
    w.data = torch.randn(10)
    w.grad = torch.ones(10)
    with pytest.raises(RuntimeError, match=r"shape \(10,\) has optimizer state of shape \(1000,\)"):
        opt.step()


def test_a_param_made_float64_after_construction_is_refused():
    model = torch.nn.Linear(3, 2)
    opt = FusedAdamW(model.parameters())
    model.double()
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    with pytest.raises(TypeError, match="float64"):
        opt.step()


def test_a_skipped_step_emits_no_preconditioner():
    # found_inf > 0 skips the update and writes no W, yet the bucket was marked as holding a fresh one:
    # preconditioners() then returned the W of an older state
    p = torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(0)))
    opt = FusedAdamW([p], lr=1e-2, betas=(0.9, 0.95), backend="cpu")
    gen = torch.Generator().manual_seed(1)
    for i, (emit, inf) in enumerate([(True, 0.0), (False, 0.0), (True, 1.0)]):
        p.grad = torch.randn(64, generator=gen) * (1 + 10 * i)
        opt.step(found_inf=torch.tensor(inf), emit_preconditioner=emit)
    st = opt.state[p]
    want = 1 / ((st["exp_avg_sq"] / (1 - 0.95 ** float(st["step"]))).sqrt() + 1e-8)
    torch.testing.assert_close(opt.preconditioners()[p], want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_optimizer_steps_like_the_original(how, backend, tmp_path):
    import copy
    import pickle

    ps = _params([(6, 5), (33,)], seed=21)
    opt = FusedAdamW([{"params": ps[:1]}, {"params": ps[1:], "lr": 3e-3}], lr=1e-2, weight_decay=0.1, seed=7,
                     backend=backend)
    gen = torch.Generator().manual_seed(22)
    grads = [_grads(ps, gen) for _ in range(3)]
    for p, g in zip(ps, grads[0]):
        p.grad = g.clone()
    opt.step()
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(opt))
    else:
        torch.save(opt, tmp_path / "opt.pt")
        twin = torch.load(tmp_path / "opt.pt", weights_only=False)
    assert (twin.seed, twin.backend) == (7, opt.backend)  # ours, beyond torch's pickled three
    qs = [p for g in twin.param_groups for p in g["params"]]
    for gs in grads[1:]:
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        twin.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
    assert int(twin.state_dict()["state"][0]["step"]) == 3


def test_torch_adamw_keywords_construct_it():
    p = torch.nn.Parameter(torch.zeros(3))
    FusedAdamW([p], fused=True, foreach=False, capturable=False, differentiable=False)  # as nanoGPT passes them
    for name in ("capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"{name}=True"):
            FusedAdamW([p], **{name: True})


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_group_added_after_steps_keeps_the_existing_step_counts(backend):
    # the Triton path counts steps on the device: a rebuild for the new group used to read stale host
    # counts, restarting every stepped param's bias correction (step 1 where torch says 6)
    ps = _params([(4,), (33,)], seed=31)
    qs = _clone(ps)
    opt = FusedAdamW(ps[:1], lr=0.1, backend=backend)
    ref = torch.optim.AdamW(qs[:1], lr=0.1, foreach=False)
    gen = torch.Generator().manual_seed(32)
    for step in range(8):
        if step == 5:
            opt.add_param_group({"params": ps[1:]})
            ref.add_param_group({"params": qs[1:]})
        for p, q, g in zip(ps, qs, _grads(ps, gen)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert [float(st["step"]) for st in opt.state_dict()["state"].values()] == [8.0, 3.0]
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_param_listed_twice_in_a_group_is_refused():
    # torch steps it twice (deprecated); one flat slot per param cannot, and the backends disagreed
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match="same param more than once"):
        FusedAdamW([p, p])


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=torch.full((2, 2), 1e-3)), r"lr must be a number or one value per member .* shape \(2, 2\)"),
    (dict(lr=[]), "lr must be .* length 0"),
    (dict(weight_decay=torch.tensor([])), r"weight_decay must be .* shape \(0,\)"),
    (dict(lr=True), "Invalid learning rate: True"),
    (dict(betas=(0.9, 0.99, 0.5)), r"betas must be a pair"),
])
def test_a_malformed_hyperparameter_is_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedAdamW([torch.nn.Parameter(torch.ones(4))], **kwargs)


# Every path: native CPU, torch ops (native off), Triton (interpreted here).
PATHS = [dict(backend="torch"), dict(backend="torch", native_cpu=False), dict(backend="triton")]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape, grad", [((1000,), (2,)), ((4, 3), (3,))])  # shorter; broadcastable
def test_a_grad_swapped_for_another_size_is_refused_not_read_past(path, shape, grad):
    # .grad.data = ... bypasses torch's shape check: the native kernel would read p.numel() grad elements,
    # torch ops and the Triton gather would broadcast a (3,) grad over a (4, 3) param and step with it
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = FusedAdamW([p], lr=0.1, **path)
    p.grad = torch.ones(shape)
    p.grad.data = torch.ones(grad)
    with pytest.raises(RuntimeError, match=rf"grad of shape \({grad[0]},\) for a param of shape"):
        opt.step()
    assert torch.equal(p, torch.zeros(shape))


def _two_storages():
    # one buffer reached through two storages (numpy views): offsets of different numberings, not comparable
    import numpy as np

    base = np.zeros(20, dtype=np.float32)
    return [torch.nn.Parameter(torch.from_numpy(base)[0::2][:4]), torch.nn.Parameter(torch.from_numpy(base[1:])[1::2][:4])]


def test_params_sharing_storage_are_refused_on_the_triton_path():
    # the flat buffers would give each view its own copy: tied weights would drift apart silently
    a = torch.nn.Parameter(torch.zeros(16))
    b = torch.nn.Parameter(a.data.view(4, 4))
    opt = FusedAdamW([a, b], lr=0.1, backend="triton")
    a.grad, b.grad = torch.ones(16), torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"params of shape \(16,\) and \(4, 4\) overlap in memory"):
        opt.step()
    assert torch.equal(a, torch.zeros(16))
    for tied, match in (([torch.nn.Parameter(a.data[::2]), torch.nn.Parameter(a.data[2:4])],  # sharing a[2]
                         r"params of shape \(8,\) and \(2,\) overlap in memory"),
                        ([torch.nn.Parameter(a.data.expand(3, 16))],  # the same memory three times over
                         r"a param of shape \(3, 16\) overlaps itself in memory"),
                        (_two_storages(), r"params of shape \(4,\) and \(4,\) overlap")):  # 2, 4, 6 through two
        with pytest.raises(ValueError, match=match):
            FusedAdamW(tied, lr=0.1, backend="triton").step()
    base, grid = torch.zeros(9), torch.zeros(4, 3)
    # disjoint views of one storage (a loaded checkpoint), interleaved columns and strides (no shared
    # element, though their byte spans overlap), and a tensor of its own: all step
    separate = [torch.nn.Parameter(base[:4]), torch.nn.Parameter(base[4:8]), torch.nn.Parameter(torch.zeros(4)),
                torch.nn.Parameter(grid[:, 0]), torch.nn.Parameter(grid[:, 1]), torch.nn.Parameter(grid[0::2, 2]),
                torch.nn.Parameter(grid[1::2, 2])]
    opt = FusedAdamW(separate, lr=0.1, backend="triton")
    for p in separate:
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(bool((p < 0).all()) for p in separate)


@pytest.mark.parametrize("path", PATHS)
def test_a_sparse_grad_is_refused_on_every_path_and_first_step(path):
    # the Triton path builds its flat buffers (copying grads in) at the first step: check before that
    p = torch.nn.Parameter(torch.zeros(3))
    opt = FusedAdamW([p], lr=0.1, **path)
    p.grad = torch.ones(3).to_sparse()
    with pytest.raises(TypeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(p, torch.zeros(3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_another_models_state_dict_is_refused_and_changes_nothing(backend):
    small, big = _params([(3,)], seed=41), _params([(5,)], seed=42)
    opt, other = FusedAdamW(small, lr=0.1, backend=backend), FusedAdamW(big, lr=0.1, backend=backend)
    for o, ps in ((opt, small), (other, big)):
        ps[0].grad = torch.ones_like(ps[0])
        o.step()
    before = {k: v.clone() for k, v in opt.state[small[0]].items()}
    with pytest.raises(ValueError, match=r"exp_avg for param 0 has shape \(5,\), the param \(3,\)"):
        opt.load_state_dict(other.state_dict())
    assert all(torch.equal(opt.state[small[0]][k], v) for k, v in before.items())
    small[0].grad = torch.ones(3)
    opt.step()
    assert float(opt.state_dict()["state"][0]["step"]) == 2.0


_RESETS = {  # what a training loop does to restart Adam's moments, or to set one param's state
    "clear": lambda opt, ps: opt.state.clear(),
    "a new state dict": lambda opt, ps: setattr(opt, "state", collections.defaultdict(dict)),
    "del one": lambda opt, ps: opt.state.__delitem__(ps[0]),
    "one emptied": lambda opt, ps: opt.state.__setitem__(ps[0], {}),
    "step set to 0": lambda opt, ps: opt.state[ps[0]].__setitem__("step", torch.tensor(0.0)),
    "moments replaced": lambda opt, ps: opt.state[ps[1]].update(exp_avg=torch.zeros_like(ps[1]),
                                                                exp_avg_sq=torch.full_like(ps[1], 2.0)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reset", _RESETS)
def test_a_state_reset_or_replaced_by_hand_is_what_the_next_step_uses(backend, reset):
    # the flat buffers stepped on from the old moments, and state_dict() saved the replaced (unused) ones
    ps = _params([(6, 5), (1100,)], seed=21)
    gen = torch.Generator().manual_seed(22)
    grads = [_grads(ps, gen) for _ in range(6)]
    ours, theirs = _clone(ps), _clone(ps)
    opt = FusedAdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    for i, gs in enumerate(grads):
        if i == 3:
            _RESETS[reset](opt, ours)
            _RESETS[reset](ref, theirs)
        for o, params in ((opt, ours), (ref, theirs)):
            for p, g in zip(params, gs):
                p.grad = g.clone()
            o.step()
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    mine, torchs = opt.state_dict()["state"], ref.state_dict()["state"]
    assert sorted(mine) == sorted(torchs)
    for i, st in torchs.items():
        assert float(mine[i]["step"]) == float(st["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(mine[i][key], st[key], rtol=1e-5, atol=1e-7)


def test_zero_grad_keeping_grads_zeroes_a_param_added_to_a_group_by_hand():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    opt = FusedAdamW(a.parameters(), lr=1e-2)
    a(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.param_groups[0]["params"].extend(b.parameters())
    b(torch.randn(2, 4)).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert all(bool((p.grad == 0).all()) for p in b.parameters())


def test_a_state_dict_with_other_groups_is_refused_in_torchs_words():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    two = FusedAdamW([{"params": a.parameters()}, {"params": b.parameters()}], lr=1e-2)
    with pytest.raises(ValueError, match=r"different number of parameter groups \(params per group: \[2, 2\]"):
        FusedAdamW(a.parameters(), lr=1e-2).load_state_dict(two.state_dict())
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        FusedAdamW([{"params": [a.weight]}, {"params": [a.bias, b.weight]}], lr=1e-2).load_state_dict(two.state_dict())


def test_preconditioners_check_the_state_once_a_call_not_once_a_param():
    # per-param W (two betas in one bucket) went through preconditioner(p), which checked the whole state
    # again for each param: quadratic in the param count, on every GNS-measured step
    ps = _params([(3, 4)] * 6, seed=31)
    opt = FusedAdamW([{"params": ps[:3]}, {"params": ps[3:], "betas": (0.9, 0.99)}], lr=1e-2, backend="cpu")
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    calls = []
    ids = opt._state_ids
    opt._state_ids = lambda: calls.append(1) or ids()
    w = opt.preconditioners()
    assert len(calls) == 1 and all(w[p] is not None for p in ps)
    opt.state.clear()  # a reset: the next read lays out a fresh state, which has no W yet
    assert all(v is None for v in opt.preconditioners().values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_callers_own_state_keys_stay_and_cost_no_rebuild(backend):
    # a Lookahead wrapper (timm's, say) keeps its slow weights in the base optimizer's state[p]: they must
    # survive every step, and changing them is no reset of the moments
    ps = _params([(6, 5), (33,)], seed=41)
    gen = torch.Generator().manual_seed(42)
    ours, theirs = _clone(ps), _clone(ps)
    opt = FusedAdamW(ours, lr=1e-2, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, foreach=False)
    builds = []
    build = opt._build
    opt._build = lambda: builds.append(1) or build()
    for i in range(6):
        gs = _grads(ps, gen)
        for o, params in ((opt, ours), (ref, theirs)):
            for p, g in zip(params, gs):
                p.grad = g.clone()
            o.step()
            for p in params:
                o.state[p]["slow"] = p.detach().clone()  # replaced every step, as a Lookahead sync does
    assert len(builds) == 1
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        assert torch.equal(opt.state[x]["slow"], x.detach())
    opt.state.clear()  # a reset is still seen
    for p in ours:
        p.grad = torch.ones_like(p)
    opt.step()
    assert len(builds) == 2 and float(opt.state_dict()["state"][0]["step"]) == 1
