"""Population AdamW adapters: which kinds decay, per-member lr/wd, decay modes, state round trip."""

import pytest
import torch

from trajinv.config import Member, ModelConfig, OptimConfig
from trajinv.model import GPT
from trajinv.optim.population import STAT_FIELDS, build_optimizer

MEMBERS = (Member(1e-2, 0.5), Member(4e-2, 0.25))


def _model():
    m = GPT(ModelConfig(d_model=16, n_layers=1, n_heads=2, context=8, vocab_size=11), members=2)
    m.init_weights(torch.Generator().manual_seed(0))
    return m


def _zero_grad_step(opt_cfg, lr_mult=1.0):
    """With zero gradients Adam's update is 0, so only weight decay moves the weights."""
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, MEMBERS, opt_cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step(lr_mult, torch.ones(2))
    return {n: p.detach() / before[n] for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["torch", "fused"])
def test_default_decays_matrices_and_embeddings_not_gains(name):
    ratio = _zero_grad_step(OptimConfig(name=name))
    for k, m in enumerate(MEMBERS):
        shrink = 1 - m.lr * m.wd
        assert torch.allclose(ratio["wte"][k], torch.tensor(shrink), rtol=1e-6)
        assert torch.allclose(ratio["blocks.0.wqkv"][k], torch.tensor(shrink), rtol=1e-6)
        assert torch.allclose(ratio["head"][k], torch.tensor(shrink), rtol=1e-6)
        assert torch.equal(ratio["norm_f"][k], torch.ones(16))


@pytest.mark.parametrize("name", ["torch", "fused"])
def test_decay_kinds_are_a_config_choice(name):
    ratio = _zero_grad_step(OptimConfig(name=name, decay=("matrix", "gain")))
    assert torch.equal(ratio["wte"], torch.ones_like(ratio["wte"]))
    assert torch.allclose(ratio["norm_f"][1], torch.tensor(1 - 4e-2 * 0.25), rtol=1e-6)


@pytest.mark.parametrize("name", ["torch", "fused"])
def test_independent_decay_follows_schedule_not_lr(name):
    ratio = _zero_grad_step(OptimConfig(name=name, decay_mode="independent"), lr_mult=0.5)
    for k, m in enumerate(MEMBERS):
        assert torch.allclose(ratio["blocks.0.wo"][k], torch.tensor(1 - m.wd * 0.5), rtol=1e-6)


def _one_step_state(name):
    """(model, the optimizer state tensors after one step on a random batch)."""
    model = _model()
    opt = build_optimizer(model, MEMBERS, OptimConfig(name=name))
    idx = torch.randint(0, 11, (2, 8))
    model(idx, idx)[1].sum().backward()
    opt.step(1.0, torch.ones(2))
    return model, opt.state_tensors()


@pytest.mark.parametrize("name", ["torch", "fused"])
def test_state_round_trip(name):
    model, state = _one_step_state(name)
    assert state["blocks.0.wqkv.exp_avg"].shape == model.blocks[0].wqkv.shape
    fresh = build_optimizer(_model(), MEMBERS, OptimConfig(name=name))
    fresh.load_state_tensors(state)
    again = fresh.state_tensors()
    assert state.keys() == again.keys()
    assert all(torch.equal(state[k].float(), again[k].float()) for k in state)
    assert fresh.preconditioner("head") is not None and fresh.preconditioner("head").shape == (2, 11, 16)


@pytest.mark.parametrize("name", ["torch", "fused"])
def test_loaded_state_lives_on_the_parameters_device(name):
    # a checkpoint loads on the CPU; a run resumed on CUDA crashed at its first step with the torch
    # adapter ("Tensor on device cpu is not on the expected device"). "meta" stands in for the GPU.
    _, state = _one_step_state(name)
    elsewhere = _model().to("meta")
    fresh = build_optimizer(elsewhere, MEMBERS, OptimConfig(name=name))
    fresh.load_state_tensors(state)
    moments = {k: v for k, v in fresh.state_tensors().items() if not k.endswith(".step")}
    assert moments and all(v.device.type == "meta" for v in moments.values())


def test_fused_statistics_and_preconditioners_match_torch_adapter():
    # The fused adapter builds its per-param statistics from whole-bucket tables (clipping
    # undone per member in one op) and W from one flat pass; the torch adapter per param.
    cfg_f, cfg_t = OptimConfig(name="fused", clip=0.5), OptimConfig(name="torch", clip=0.5)
    models = [_model(), _model()]
    opts = [build_optimizer(models[0], MEMBERS, cfg_f), build_optimizer(models[1], MEMBERS, cfg_t)]
    gen = torch.Generator().manual_seed(5)
    clip = torch.tensor([0.25, 1.0])
    for _ in range(3):
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in models[0].named_parameters()}
        for m in models:
            for n, p in m.named_parameters():
                p.grad = grads[n].clone()
        ws = [o.preconditioners() for o in opts]
        stats = [o.step(1.0, clip) for o in opts]
        for n in grads:
            if ws[1][n] is None:
                assert ws[0][n] is None
            else:
                torch.testing.assert_close(ws[0][n], ws[1][n], rtol=1e-5, atol=0)
            for key in ("grad_sq", "precond_grad_sq"):
                assert stats[0][n][key].shape == (2,)
                torch.testing.assert_close(stats[0][n][key], stats[1][n][key], rtol=1e-4, atol=1e-8)
            # unclipped: the sums are of the gradient as it was handed in
            torch.testing.assert_close(stats[0][n]["grad_sq"], grads[n].pow(2).flatten(1).sum(1), rtol=1e-4, atol=0)
        # totals: every field summed over all params, or over a subset, in one go
        for st in stats:
            assert set(st) == set(grads) and len(st) == len(grads)
            want = torch.stack([sum(st[n][f] for n in grads) for f in STAT_FIELDS])
            torch.testing.assert_close(st.totals(), want, rtol=1e-5, atol=0)
            some = ["head", "norm_f"]
            want = torch.stack([st["head"][f] + st["norm_f"][f] for f in STAT_FIELDS])
            torch.testing.assert_close(st.totals(some), want, rtol=1e-5, atol=0)
            with pytest.raises(KeyError, match="'not-a-param'"):  # a missing tensor must not shift the sum
                st.totals(some + ["not-a-param"])
        torch.testing.assert_close(stats[0].totals()[:2], stats[1].totals()[:2], rtol=1e-4, atol=1e-8)
