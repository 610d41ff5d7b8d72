"""FusedAdamW where code written for torch.optim.AdamW puts it: schedulers built late, torch's positional
arguments, flags set on a live optimizer, a state dict it must refuse."""

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from trajinv.optim import FusedAdamW


def _trained(make, steps=5):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = make(model.parameters())
    for g in opt.param_groups:  # from a config, or scaled by the world size, before the scheduler exists
        g["lr"] = 1e-2
    sched = LambdaLR(opt, lambda s: 1.0 / (1 + s))
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()
    return opt, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_scheduler_built_after_an_lr_change_schedules_the_changed_lr():
    # FusedAdamW set torch's "initial_lr" when it was built, so the scheduler's base was the old lr:
    # LambdaLR (what get_linear_schedule_with_warmup returns) trained at a tenth of the lr asked for
    theirs, want = _trained(lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    ours, got = _trained(lambda ps: FusedAdamW(ps, lr=1e-3))
    assert ours.param_groups[0]["initial_lr"] == theirs.param_groups[0]["initial_lr"] == 1e-2
    assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheduler", [False, True])
def test_independent_decay_follows_the_schedules_multiplier(scheduler):
    # lr / lr_0 is the multiplier: lr_0 a scheduler's base when there is one, else the lr the group joined with
    p = torch.nn.Parameter(torch.ones(4))
    opt = FusedAdamW([p], lr=1e-3, weight_decay=0.1, decay_mode="independent")
    if scheduler:
        opt.param_groups[0]["lr"] = 2e-3
        LambdaLR(opt, lambda s: 0.5)  # lr 1e-3 of a base of 2e-3
    else:
        opt.param_groups[0]["lr"] = 5e-4  # half the lr it was built with
    p.grad = torch.zeros(4)  # no Adam update: only the decay moves p
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), 1 - 0.1 * 0.5))


def test_torchs_positional_arguments_line_up():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = FusedAdamW([p], 1e-3, (0.9, 0.999), 1e-8, 0.01, False)  # torch's sixth: amsgrad
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[0]["decay_mode"] == "torch"
    with pytest.raises(ValueError, match=r"^FusedAdamW does not support amsgrad=True$"):
        FusedAdamW([p], 1e-3, (0.9, 0.999), 1e-8, 0.01, True)


@pytest.mark.parametrize("flag", ["maximize", "amsgrad", "capturable", "differentiable"])
def test_a_flag_it_does_not_implement_is_refused_wherever_it_is_set(flag):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=f"does not support {flag}=True"):
        FusedAdamW([{"params": [p], flag: True}])
    opt = FusedAdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0][flag] = True  # after the first step: it was silently ignored (kept minimizing)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=f"does not support {flag}=True"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_a_refused_state_dict_leaves_the_optimizer_as_it_was():
    p, q = (torch.nn.Parameter(torch.zeros(2)) for _ in range(2))
    theirs = torch.optim.AdamW([p], lr=1e-2, amsgrad=True)
    p.grad = torch.ones(2)
    theirs.step()
    ours = FusedAdamW([q], lr=5e-3)
    q.grad = torch.ones(2)
    ours.step()
    state = {k: v.clone() for k, v in ours.state[q].items()}
    with pytest.raises(ValueError, match="amsgrad"):
        ours.load_state_dict(theirs.state_dict())
    group = ours.param_groups[0]
    assert group["lr"] == 5e-3 and not group["amsgrad"]  # they were replaced before the refusal
    assert all(torch.equal(ours.state[q][k], v) for k, v in state.items())
    ours.step()  # still usable
