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
