"""member_linear / rms_norm with a GNS probe: gradients unchanged, probe sums equal to
per-example ground truth from torch.func.vmap(torch.func.grad(...)), per member."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from trajinv.ops import Probe, member_linear, rms_norm

EPS = 1e-5
NAMES = ("g1", "w1", "w2", "g2")


def _params(K, d, f, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "g1": (torch.rand(K, d, generator=g) + 0.5).to(dtype),
        "w1": (torch.randn(K, f, d, generator=g) / d**0.5).to(dtype),
        "w2": (torch.randn(K, d, f, generator=g) / f**0.5).to(dtype),
        "g2": (torch.rand(K, d, generator=g) + 0.5).to(dtype),
    }


class Tiny(torch.nn.Module):
    """RMSNorm -> linear -> GELU -> linear -> RMSNorm, every parameter with a member axis."""

    def __init__(self, params):
        super().__init__()
        for k, v in params.items():
            self.register_parameter(k, torch.nn.Parameter(v.clone()))
        self.probes: dict = {}

    def forward(self, x, target):
        p = self.probes.get
        h = rms_norm(x, self.g1, EPS, p("g1"))
        h = F.gelu(member_linear(h, self.w1, p("w1")))
        h = rms_norm(member_linear(h, self.w2, p("w2")), self.g2, EPS, p("g2"))
        # Per-member mean over examples (and tokens), summed over members: like the GPT.
        return (h.float() - target).pow(2).mean((1, 2, 3)).sum()


def _data(K, n, t, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, n, t, d, generator=g), torch.randn(K, n, t, d, generator=g)


def _per_sample_grads(params, x, target):
    # Ground truth: grad of each example's own loss (its batch of one), per member.
    model = Tiny(params)

    def one(p, x1, t1):
        return functional_call(model, p, (x1[:, None], t1[:, None]))

    return vmap(grad(one), in_dims=(None, 1, 1))(params, x, target)  # name -> (n, K, ...)


def _preconds(params, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) + 0.1 for k, v in params.items()}


def _run(params, x, target, probes=None, autocast=False):
    model = Tiny(params)
    if probes is not None:
        model.probes.update(probes)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(x, target)
    loss.backward()
    return {k: getattr(model, k).grad for k in NAMES}


@pytest.mark.parametrize("K,n,t,d,f", [(2, 3, 4, 6, 10), (1, 1, 1, 5, 3), (3, 2, 7, 9, 17)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_probe_sums_match_per_sample_gradients(K, n, t, d, f, backend):
    params = _params(K, d, f)
    x, target = _data(K, n, t, d)
    pre = _preconds(params)
    probes = {k: Probe(precond=pre[k], backend=backend) for k in NAMES}
    probes["w2"].precond = None  # identity W on one tensor
    grads = _run(params, x, target, probes)
    plain = _run(params, x, target)
    per_sample = _per_sample_grads(params, x, target)
    for k in NAMES:
        torch.testing.assert_close(grads[k], plain[k], rtol=1e-5, atol=1e-6)
        # Mean loss over n: the backpropagated contribution is C_i = g_i / n; the probe stores raw sums.
        c = per_sample[k] / n
        dims = tuple(range(2, c.dim()))
        w = pre[k] if probes[k].precond is not None else torch.ones_like(pre[k])
        torch.testing.assert_close(probes[k].sq_1, c.square().sum(dims).sum(0), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(probes[k].sq_w, (c.square() * w).sum(dims).sum(0), rtol=1e-4, atol=1e-9)
        assert probes[k].sq_w.shape == (K,) and probes[k].sq_w.dtype == torch.float32
        assert probes[k].examples == n


def test_probe_accumulates_over_backward_calls_and_resets():
    params = _params(2, 6, 8)
    x, target = _data(2, 3, 4, 6)
    probes = {k: Probe() for k in NAMES}
    _run(params, x, target, probes)
    once = {k: p.sq_1.clone() for k, p in probes.items()}
    _run(params, x, target, probes)  # a second micro-batch: sums add up
    for k, p in probes.items():
        torch.testing.assert_close(p.sq_1, 2 * once[k])
        torch.testing.assert_close(p.sq_w, p.sq_1)  # identity W
        assert p.examples == 6
        p.reset()
        assert p.examples == 0 and not p.sq_1.any() and not p.sq_w.any()


def test_bf16_autocast_gradients_match_plain_and_truth():
    K, n, t, d, f = 2, 4, 5, 8, 12
    params = _params(K, d, f)
    x, target = _data(K, n, t, d)
    pre = _preconds(params)
    probes = {k: Probe(precond=pre[k]) for k in NAMES}
    grads = _run(params, x, target, probes, autocast=True)
    plain = _run(params, x, target, autocast=True)
    per_sample = _per_sample_grads(params, x, target)  # fp32 truth
    for k in NAMES:
        assert grads[k].dtype == plain[k].dtype == torch.float32
        torch.testing.assert_close(grads[k], plain[k], rtol=2e-2, atol=2e-3)
        c = per_sample[k] / n
        dims = tuple(range(2, c.dim()))
        torch.testing.assert_close(probes[k].sq_w, (c.square() * pre[k]).sum(dims).sum(0), rtol=6e-2, atol=1e-7)


def test_bf16_parameters_gradients_match_plain():
    params = _params(2, 8, 12, dtype=torch.bfloat16)
    x, target = _data(2, 3, 4, 8)
    x = x.bfloat16()
    probes = {k: Probe() for k in NAMES}
    grads = _run(params, x, target, probes)
    plain = _run(params, x, target)
    for k in NAMES:
        assert grads[k].dtype == torch.bfloat16
        torch.testing.assert_close(grads[k], plain[k], rtol=2e-2, atol=2e-3)
        assert probes[k].sq_1.dtype == torch.float32 and (probes[k].sq_1 > 0).all()


def test_input_gradient_unchanged():
    params = _params(2, 6, 8)
    x, target = _data(2, 3, 4, 6)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    for xi, probes in zip(xs, ({k: Probe() for k in NAMES}, {})):
        m = Tiny(params)
        m.probes.update(probes)
        m(xi, target).backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-7)


def test_bad_probe_and_shapes_are_rejected():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(TypeError, match="dict"):
        member_linear(x, torch.randn(2, 6, 5), probe={})
    with pytest.raises(ValueError, match="member_linear"):
        member_linear(x, torch.randn(1, 6, 5), probe=Probe())
    with pytest.raises(ValueError, match="rms_norm"):
        rms_norm(x, torch.ones(2, 4), EPS, probe=Probe())
    # float64 used to pass the forward and fail inside autograd's backward, in the kernel's dtype check
    with pytest.raises(TypeError, match="with a probe, x must be .* got torch.float64"):
        member_linear(x.double(), torch.randn(2, 6, 5, dtype=torch.float64), probe=Probe())
    with pytest.raises(TypeError, match="with a probe, gain must be .* got torch.float64"):
        rms_norm(x, torch.ones(2, 5, dtype=torch.float64), EPS, probe=Probe())
    w = torch.randn(2, 6, 5, requires_grad=True)
    y = member_linear(x, w, probe=Probe(precond=torch.ones(2, 5, 6)))
    with pytest.raises(ValueError, match="precond"):
        y.sum().backward()
