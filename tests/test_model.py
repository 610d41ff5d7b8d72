"""The member-axis GPT: shapes, population equivalence, presets, decay kinds."""

import math

import pytest
import torch

from trajinv.config import preset
from trajinv.model import GPT, count_params, member_slice, param_kind


def _tiny(**kw):
    return preset("tiny", vocab_size=50, d_model=32, n_heads=4, context=16, **kw)


def test_forward_shapes_and_loss_near_uniform_at_init():
    torch.manual_seed(0)
    m = GPT(_tiny(), members=2)
    m.init_weights()
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = m(idx, idx)
    assert logits.shape == (2, 3, 16, 50) and loss.shape == (2,)
    assert torch.allclose(loss, torch.full((2,), torch.log(torch.tensor(50.0)).item()), atol=0.1)


def test_token_losses_average_to_the_mean_loss():
    """reduction="none" gives every token's loss; their mean over a member is exactly its mean loss."""
    torch.manual_seed(0)
    m = GPT(_tiny(), members=2)
    m.init_weights()
    idx, tgt = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    _, loss = m(idx, tgt)
    _, tok = m(idx, tgt, reduction="none")
    assert tok.shape == (2, 3, 16) and torch.equal(tok.reshape(2, 48).mean(1), loss)
    with pytest.raises(ValueError, match="'sum'"):
        m(idx, tgt, reduction="sum")


def test_population_equals_separate_models():
    """Each member of a K=3 model matches a K=1 model with its weights: loss and every gradient."""
    torch.manual_seed(0)
    cfg = _tiny()
    pop = GPT(cfg, members=3)
    for p in pop.parameters():  # members deliberately different
        torch.nn.init.normal_(p, std=0.05)
    idx, tgt = torch.randint(0, 50, (4, 16)), torch.randint(0, 50, (4, 16))
    _, loss = pop(idx, tgt)
    loss.sum().backward()
    for k in range(3):
        one = GPT(cfg, members=1)
        one.load_state_dict(member_slice(pop, k))
        _, l1 = one(idx, tgt)
        l1.sum().backward()
        assert torch.allclose(l1[0], loss[k], rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(pop.named_parameters(), one.parameters()):
            assert torch.allclose(p.grad[k], q.grad[0], rtol=1e-4, atol=1e-6), name


def test_members_start_identical():
    m = GPT(_tiny(), members=3)
    m.init_weights(torch.Generator().manual_seed(1))
    for p in m.parameters():
        assert torch.equal(p[0], p[1]) and torch.equal(p[0], p[2])


def test_causality():
    torch.manual_seed(0)
    m = GPT(_tiny(), members=1)
    m.init_weights()
    a = torch.randint(0, 50, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 50
    la, _ = m(a)
    lb, _ = m(b)
    assert torch.allclose(la[..., :10, :], lb[..., :10, :], atol=1e-5)
    assert not torch.allclose(la[..., 10:, :], lb[..., 10:, :])


def test_gpt164m_builds_on_meta_with_paper_size():
    with torch.device("meta"):
        m = GPT(preset("gpt-164m"), members=1)
    n = count_params(m)
    assert abs(n - 164e6) / 164e6 < 0.05, n
    assert m.wte.shape == (1, 50304, 768) and m.head.shape == (1, 50304, 768)


def test_param_kinds_default_decay_split():
    m = GPT(_tiny(), members=2)
    kinds = {name: param_kind(name, p) for name, p in m.named_parameters()}
    assert kinds["wte"] == "embedding" and kinds["head"] == "matrix"
    assert kinds["blocks.0.attn_norm"] == "gain" and kinds["norm_f"] == "gain"
    assert kinds["blocks.1.w_down"] == "matrix"


@pytest.mark.parametrize("bad", [dict(d_model=30, n_heads=4), dict(n_layers=0)])
def test_bad_model_config(bad):
    with pytest.raises(ValueError):
        preset("tiny", vocab_size=10, **bad)


def test_unknown_preset():
    with pytest.raises(ValueError, match="nope"):
        preset("nope")


def test_too_long_sequence():
    m = GPT(_tiny(), members=1)
    with pytest.raises(ValueError, match="17"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_backward_is_deterministic_with_threads():
    """Identical steps give bitwise identical gradients with 2 threads: the embedding's backward used to
    accumulate repeated tokens with parallel atomic adds, in an order that changed from run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = GPT(preset("tiny", vocab_size=256), members=9)
        model.init_weights(torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        idx, tgt = torch.randint(0, 256, (32, 64), generator=g), torch.randint(0, 256, (32, 64), generator=g)
        grads = []
        for _ in range(6):  # the old backward differed in about half of the repeats
            model.zero_grad(set_to_none=True)
            model(idx, tgt)[1].sum().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        for name in grads[0]:
            assert all(torch.equal(grads[0][name], other[name]) for other in grads[1:]), name
    finally:
        torch.set_num_threads(threads)


def test_a_built_model_is_initialised_from_its_seed():
    # GPT(cfg) used to hold torch.empty weights (NaN losses) until init_weights was called
    idx = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(0))
    a, b, c = GPT(_tiny(), members=2), GPT(_tiny(), members=2), GPT(_tiny(), members=2, seed=1)
    _, loss = a(idx, idx)
    assert torch.isfinite(loss).all() and torch.allclose(loss, torch.full((2,), math.log(50)), atol=0.1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.wte, c.wte)
    ref = GPT(_tiny(), members=2, seed=None)
    ref.init_weights(torch.Generator().manual_seed(0))  # what the seed means
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), ref.parameters()))


def _rope_by_matrices(x: torch.Tensor, theta: float = 10000.0, sign: float = 1.0) -> torch.Tensor:
    """RoPE as explicit 2x2 rotation matrices per position and pair, angles in float64 from theta (an
    independent method: no tables of the model's); sign -1 rotates back."""
    t, pairs = x.shape[-2], x.shape[-1] // 2
    angles = torch.outer(torch.arange(t, dtype=torch.float64),
                         theta ** (-2 * torch.arange(pairs, dtype=torch.float64) / x.shape[-1]))
    c, s = angles.cos(), sign * angles.sin()
    rot = torch.stack((torch.stack((c, -s), -1), torch.stack((s, c), -1)), -2)  # (t, pairs, 2, 2)
    return torch.einsum("tpij,...tpj->...tpi", rot, x.double().unflatten(-1, (pairs, 2))).flatten(-2)


def _model_layout_rope_input(t: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """The model's layout: a transposed view of the qkv projection's slice (non-contiguous, offset)."""
    qkv = torch.randn(3, t, 3 * 4 * head_dim, generator=gen).to(dtype)
    x = qkv[..., 4 * head_dim : 8 * head_dim].reshape(3, t, 4, head_dim).transpose(1, 2)
    return x.detach().requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, head_dim", [(1, 16), (7, 6), (64, 16)])
def test_rope_rotates_each_pair_by_its_positions_angle(dtype, t, head_dim):
    from trajinv.model import apply_rope, rope_tables

    cos, sin = rope_tables(64, head_dim, 10000.0)
    gen = torch.Generator().manual_seed(t)
    x = _model_layout_rope_input(t, head_dim, dtype, gen)
    y = apply_rope(x, cos, sin)
    tol = {torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(y.double(), _rope_by_matrices(x.detach()), rtol=tol, atol=tol)
    gy = torch.randn(y.shape, generator=gen).to(dtype)
    (gx,) = torch.autograd.grad(y, x, gy)
    # the backward is the inverse rotation of the output gradient
    torch.testing.assert_close(gx.double(), _rope_by_matrices(gy, sign=-1.0), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, head_dim", [(1, 2), (7, 6), (64, 16)])
def test_rope_gives_the_pairwise_formulas_bits(dtype, t, head_dim):
    """apply_rope's whole-row form rounds exactly as the pairwise x1*c - x2*s, x1*s + x2*c under autograd
    (the form the model trained with before), forward and backward."""
    from trajinv.model import apply_rope, rope_tables

    def pairwise(x, cos, sin):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        c, s = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)

    cos, sin = rope_tables(64, head_dim, 10000.0)
    gen = torch.Generator().manual_seed(head_dim)
    x = _model_layout_rope_input(t, head_dim, dtype, gen)
    y, ref = apply_rope(x, cos, sin), pairwise(x, cos[:, 0::2], sin[:, 1::2])
    assert torch.equal(y, ref)
    gy = torch.randn(y.shape, generator=gen).to(dtype)
    assert torch.equal(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(ref, x, gy)[0])


def test_rope_tables_hold_each_pairs_angle_twice_and_sin_signed():
    from trajinv.model import rope_tables

    cos, sin = rope_tables(5, 6, 100.0)
    inv_freq = 100.0 ** (-torch.arange(0, 6, 2, dtype=torch.float64) / 6)
    angles = torch.outer(torch.arange(5.0, dtype=torch.float64), inv_freq)
    torch.testing.assert_close(cos, angles.cos().float().repeat_interleave(2, dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(sin[:, 0::2], -angles.sin().float(), rtol=0, atol=0)
    torch.testing.assert_close(sin[:, 1::2], angles.sin().float(), rtol=0, atol=0)


def test_rope_reference_tells_a_rotation_from_its_inverse():
    """The matrix reference is not blind to a flipped sign (the test above would catch one)."""
    from trajinv.model import apply_rope, rope_tables

    cos, sin = rope_tables(8, 4, 10000.0)
    x = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(apply_rope(x, cos, sin).double(), _rope_by_matrices(x, sign=-1.0))
