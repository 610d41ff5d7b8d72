"""The fused AdamW kernel (interpreter) against its fp64 torch reference, plus AOT checks."""

import pytest
import torch

from trajinv.kernels import adamw as F
from trajinv.kernels.aot import KernelSpec, compile_kernels

BLOCK = 256  # small blocks: several per segment, cheap in the interpreter


def _layout():
    """Awkward segments: empty, 1, odd, > block, and two unaligned member segments of one tensor."""
    segs = [
        F.Segment(0, 0, 0, 0, 0),
        F.Segment(16, 17, 1, 0, 0),
        F.Segment(32, 32 + 301, 2, 1, 0),
        F.Segment(336, 336 + 600, 3, 2, 0),  # > block, aligned: full blocks take the vector path
        F.Segment(944, 944 + 131, 4, 3, 0),  # member 0 of a (2, 131) tensor
        F.Segment(944 + 131, 944 + 262, 4, 4, 1),  # member 1, unaligned start
    ]
    hyper = torch.tensor([
        F.hyper_row(1e-2, 0.1, 0.9, 0.999, 1e-8),
        F.hyper_row(3e-2, 0.0, 0.9, 0.95, 1e-8),
        F.hyper_row(1e-3, 0.5, 0.8, 0.99, 1e-6),
        F.hyper_row(2e-3, 0.2, 0.9, 0.95, 1e-8),
        F.hyper_row(8e-3, 0.05, 0.9, 0.95, 1e-8),
    ])
    return segs, hyper, 944 + 262 + 10, 5


def _run(dtype, master, steps=3, grad_scale=None, found_inf_at=None, seed=0):
    torch.manual_seed(seed)
    segs, hyper, n, nt = _layout()
    blocks = F.build_block_table(segs, BLOCK)
    counters = torch.zeros(nt, dtype=torch.int64)
    nblk = F.blocks_per_tensor(blocks, nt)
    p32 = torch.randn(n)
    p, rp = p32.to(dtype).clone(), p32.to(dtype).clone()
    w, rw = (p.float().clone(), p.float().clone()) if master else (None, None)
    m, v, rm, rv = (torch.zeros(n) for _ in range(4))
    rsteps = torch.zeros(nt)
    for i in range(steps):
        g = (torch.randn(n) * 3).to(dtype)
        inf = torch.tensor(1.0 if i == found_inf_at else 0.0)
        stats = torch.full((blocks.shape[0], 4), float("nan"))
        F.fused_adamw_launch(p, g, m, v, w, blocks, hyper, counters, stats, grad_scale, inf, block=BLOCK)
        ref = F.adamw_reference(rp, g, rm, rv, rw, segs, hyper, rsteps, grad_scale, inf)
        got = F.reduce_block_stats(stats, blocks, len(segs)).double()
        torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6)
        assert torch.equal(counters // nblk, rsteps.long())
    return p, rp, m, rm, v, rv, w, rw


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, False),
                                          (torch.float16, False), (torch.bfloat16, True)])
def test_kernel_matches_reference(dtype, master):
    gs = torch.tensor([2.0, 0.5])
    p, rp, m, rm, v, rv, w, rw = _run(dtype, master, grad_scale=gs)
    torch.testing.assert_close(m, rm, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-9)
    if master:
        torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-6)
        assert torch.equal(p, w.to(dtype))
    # 16-bit params: the two may round a value on either side of a tie-close point
    ulp = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(p.float(), rp.float(), rtol=0, atol=ulp * 4)


def test_found_inf_skips_the_step_without_touching_state():
    p, rp, m, rm, v, rv, _, _ = _run(torch.float32, False, steps=3, found_inf_at=1)
    torch.testing.assert_close(p, rp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-9)


def test_skip_on_first_step_leaves_everything_untouched_and_stats_zero():
    segs, hyper, n, nt = _layout()
    blocks = F.build_block_table(segs, BLOCK)
    p, g = torch.randn(n), torch.randn(n)
    p0 = p.clone()
    m, v, counters = torch.zeros(n), torch.zeros(n), torch.zeros(nt, dtype=torch.int64)
    stats = torch.full((blocks.shape[0], 4), float("nan"))
    F.fused_adamw_launch(p, g, m, v, None, blocks, hyper, counters, stats, None, torch.tensor(1.0), block=BLOCK)
    assert torch.equal(p, p0) and not m.any() and not v.any() and not counters.any()
    assert torch.equal(stats, torch.zeros_like(stats))


def test_block_table_covers_each_segment_once():
    segs, _, n, nt = _layout()
    blocks = F.build_block_table(segs, BLOCK)
    hits = torch.zeros(n, dtype=torch.int64)
    for base, lo, hi, t, nb, slot, member, s in blocks.tolist():
        assert base % BLOCK == 0 and base <= lo <= hi <= base + BLOCK
        assert (segs[s].lo, segs[s].tensor, segs[s].slot) <= (lo, t, slot) and hi <= segs[s].hi
        hits[lo:hi] += 1
    covered = torch.zeros(n, dtype=torch.int64)
    for s in segs:
        covered[s.lo:s.hi] = 1
    assert torch.equal(hits, covered)
    assert (F.blocks_per_tensor(blocks, nt) >= 1).all()


def test_stochastic_rounding_is_unbiased():
    n = 4 * BLOCK
    segs = [F.Segment(0, n, 0, 0, 0)]
    blocks = F.build_block_table(segs, BLOCK)
    # zero grads: the update is the decay only, p_new = 0.999, between bf16 0.99609 and 1.0
    hyper = torch.tensor([F.hyper_row(1e-2, 0.1, 0.9, 0.999, 1e-8)])
    means = []
    for sr in (True, False):
        p = torch.ones(n, dtype=torch.bfloat16)
        m, v, c = torch.zeros(n), torch.zeros(n), torch.zeros(1, dtype=torch.int64)
        stats = torch.empty(blocks.shape[0], 4)
        F.fused_adamw_launch(p, torch.zeros(n, dtype=torch.bfloat16), m, v, None, blocks, hyper, c, stats,
                             seed=123, stochastic_rounding=sr, block=BLOCK)
        assert set(p.float().unique().tolist()) <= {1.0, 1.0 - 2**-8}
        means.append(p.double().mean().item())
    sigma = 2**-8 * 0.5 / n**0.5
    assert abs(means[0] - 0.999) < 4 * sigma  # stochastic rounding: unbiased
    assert means[1] == 1.0  # round to nearest: biased by 1e-3 = 30 sigma


def test_launch_counter_counts_one_per_call():
    segs, hyper, n, nt = _layout()
    blocks = F.build_block_table(segs, BLOCK)
    before = F.LAUNCHES
    F.fused_adamw_launch(torch.randn(n), torch.randn(n), torch.zeros(n), torch.zeros(n), None, blocks, hyper,
                         torch.zeros(nt, dtype=torch.int64), torch.empty(blocks.shape[0], 4), block=BLOCK)
    assert F.LAUNCHES == before + 1


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="beta2"):
        F.hyper_row(1e-3, 0.1, 0.9, 1.0, 1e-8)
    with pytest.raises(ValueError, match="multiple of 16"):
        F.build_block_table([F.Segment(0, 4, 0, 0, 0)], 100)
    segs = [F.Segment(0, 4, 0, 0, 0)]
    blocks = F.build_block_table(segs, BLOCK)
    with pytest.raises(ValueError, match="stochastic"):
        F.fused_adamw_launch(torch.zeros(16), torch.zeros(16), torch.zeros(16), torch.zeros(16), None, blocks,
                             torch.zeros(1, 5), torch.zeros(1, dtype=torch.int64), torch.empty(1, 4),
                             stochastic_rounding=True)


# --------------------------------------------------------------------- AOT
TARGET = "trajinv.kernels.adamw:_adamw_kernel"
PTRS = ("p_ptr", "g_ptr", "m_ptr", "v_ptr", "w_ptr", "blocks_ptr", "hyper_ptr", "counters_ptr", "gs_ptr",
        "inf_ptr", "stats_ptr")


def _sig(pt):
    types = [f"*{pt}", f"*{pt}", "*fp32", "*fp32", "*fp32", "*i32", "*fp32", "*i64", "*fp32", "*fp32", "*fp32"]
    sig = dict(zip(PTRS, types))
    sig["seed"] = "i32"
    sig.update({k: "constexpr" for k in ("BLOCK", "MASTER", "SR", "HAS_GS", "GS_PER_MEMBER", "HAS_INF")})
    return sig


def _consts(**kw):
    return {"BLOCK": F.BLOCK, "MASTER": False, "SR": False, "HAS_GS": True, "GS_PER_MEMBER": True,
            "HAS_INF": True, **kw}


def test_aot_compiles_without_spills_and_with_128bit_access():
    # The launcher's variants on both archs. Grad scale (none, one, per member) x found_inf (with, without)
    # for fp32 and bf16 params: a plain drop-in step(), the trainer's per-member scale, AMP; the 16-bit
    # modes (stochastic rounding, master weights, fp16) with no flags and with all of them.
    flags = [dict(HAS_GS=gs, GS_PER_MEMBER=per, HAS_INF=inf)
             for gs, per in ((False, False), (True, False), (True, True)) for inf in (False, True)]
    variants = [(pt, _consts(**f)) for pt in ("fp32", "bf16") for f in flags]
    variants += [(pt, _consts(**mode, **f)) for pt, mode in (("bf16", dict(SR=True)), ("bf16", dict(MASTER=True)),
                 ("fp16", {}), ("fp16", dict(MASTER=True))) for f in (flags[0], flags[-1])]
    specs = [KernelSpec(TARGET, _sig(pt), consts, PTRS, arch) for pt, consts in variants for arch in (80, 90)]
    for spec, k in zip(specs, compile_kernels(specs)):
        where = (spec.arch, spec.signature["p_ptr"], spec.constexprs)
        assert not k.spills and 0 < k.registers <= 255, (where, k.registers)
        # correctly rounded: approximate flush-to-zero sqrt and divide made a denormal v a 0 denominator
        # (fp64 rcp.approx is libdevice's first guess in the bias corrections' exp2/log2, refined there)
        assert not any(k.count(op) for op in ("sqrt.approx", "div.full", "div.approx", "rcp.approx.f32",
                                              "rcp.approx.ftz.f32")), where
        if spec.signature["p_ptr"] == "*fp32":  # p, g, m, v loads and p, m, v stores all 128-bit in full blocks
            assert k.count("ld.global.v4") >= 4 and k.count("st.global.v4") >= 3, where


def test_eps_zero_keeps_the_statistics_of_a_partial_block_finite():
    # eps = 0 is allowed; lanes past a segment's end have v = 0, so P = 0 and g^2/P = 0/0 was summed
    n = 100
    segs = [F.Segment(0, n, 0, 0, 0)]
    hyper = torch.tensor([F.hyper_row(1e-2, 0.0, 0.9, 0.95, 0.0)])
    blocks = F.build_block_table(segs, 256)
    gen = torch.Generator().manual_seed(0)
    p, m, v = torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n)
    rp, rm, rv, rsteps = p.clone(), m.clone(), v.clone(), torch.zeros(1)
    counters = torch.zeros(1, dtype=torch.int64)
    for _ in range(2):
        g = torch.randn(n, generator=gen)
        stats = torch.empty(blocks.shape[0], 4)
        F.fused_adamw_launch(p, g, m, v, None, blocks, hyper, counters, stats, block=256)
        ref = F.adamw_reference(rp, g, rm, rv, None, segs, hyper, rsteps)
        torch.testing.assert_close(F.reduce_block_stats(stats, blocks, 1), ref.float(), rtol=1e-5, atol=1e-6)
