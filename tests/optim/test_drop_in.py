"""FusedAdamW where code written for torch.optim.AdamW puts it: schedulers built late, torch's positional
arguments, flags set on a live optimizer, a state dict it must refuse."""

import warnings

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


# --- load_state_dict as torch loads one, found by a drop-in QA pass (each case against torch.optim.AdamW)

def _stepped(cls, groups_of, grads):
    """An optimizer over `groups_of(params)` after one step with the given grads per param."""
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in grads]
    opt = cls(groups_of(params), lr=1e-2)
    for p, g in zip(params, grads):
        p.grad = torch.full((3,), g)
    opt.step()
    return params, opt


@pytest.mark.parametrize("cls", [torch.optim.AdamW, FusedAdamW])
def test_a_saved_state_goes_to_the_param_its_groups_list_at_that_place(cls):
    # code that now builds its groups in another order reorders the saved groups to match: torch pairs
    # states with params through the ids in the saved groups; by position, b got a's moments with no error
    (a, b), old = _stepped(cls, lambda ps: [{"params": [ps[0]]}, {"params": [ps[1]]}], [1.0, 5.0])
    sd = old.state_dict()
    new = cls([{"params": [b]}, {"params": [a]}], lr=1e-2)
    new.load_state_dict({"state": sd["state"], "param_groups": sd["param_groups"][::-1]})
    assert new.state[b]["exp_avg"].tolist() == pytest.approx([0.5] * 3)  # (1 - beta1) * 5
    assert new.state[a]["exp_avg"].tolist() == pytest.approx([0.1] * 3)


@pytest.mark.parametrize("cls", [torch.optim.AdamW, FusedAdamW])
def test_a_state_dict_keyed_by_parameter_names_loads(cls):
    # torch.distributed.checkpoint (get/set_optimizer_state_dict, FSDP2's path) keys states and group params
    # by the parameters' names; FusedAdamW indexed its params with them (TypeError)
    (a, b), old = _stepped(cls, lambda ps: ps, [1.0, 5.0])
    sd = old.state_dict()
    names = {0: "a.weight", 1: "b.weight"}
    named = {"state": {names[i]: s for i, s in sd["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}
    new = cls([a, b], lr=1e-2)
    new.load_state_dict(named)
    assert new.state[b]["exp_avg"].tolist() == pytest.approx([0.5] * 3) and float(new.state[a]["step"]) == 1.0
    bad = {**named, "state": {**named["state"], "b.weight": {**named["state"]["b.weight"],
                                                             "exp_avg": torch.zeros(4)}}}
    if cls is FusedAdamW:  # the shape check holds for names as for ids
        with pytest.raises(ValueError, match=r"exp_avg for param 'b.weight' has shape \(4,\)"):
            new.load_state_dict(bad)


@pytest.mark.parametrize("cls", [torch.optim.AdamW, FusedAdamW])
def test_load_hooks_decide_the_loaded_state(cls):
    """A pre-hook's returned dict is the one loaded, and a post-hook's edits stand (FusedAdamW loaded the
    moments of the dict it was given, then overwrote the post-hook's, pairing step 0 with old moments)."""
    sd = _stepped(cls, lambda ps: ps, [1.0])[1].state_dict()
    (p,), opt = _stepped(cls, lambda ps: ps, [1.0])
    opt.register_load_state_dict_pre_hook(lambda o, d: {**d, "state": {
        i: {**s, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.full((3,), 4.0)} for i, s in d["state"].items()}})
    opt.load_state_dict(sd)
    assert opt.state[p]["exp_avg"].tolist() == [0.0] * 3 and opt.state[p]["exp_avg_sq"].tolist() == [4.0] * 3

    def restart(o):
        for st in o.state.values():
            st.update(exp_avg=torch.zeros(3), exp_avg_sq=torch.full((3,), 9.0), step=torch.tensor(0.0))

    (p,), opt = _stepped(cls, lambda ps: ps, [1.0])
    opt.register_load_state_dict_post_hook(restart)
    opt.load_state_dict(sd)
    assert opt.state[p]["exp_avg_sq"].tolist() == [9.0] * 3 and float(opt.state[p]["step"]) == 0.0
    before = p.detach().clone()
    p.grad = torch.ones(3)
    opt.step()
    # step 1 from m = 0, v = 9: m_hat = 1, v_hat = (0.999 * 9 + 0.001) / 0.001, after the decay by lr * wd
    v_hat = (0.999 * 9 + 0.001) / 0.001
    want = -1e-2 * 1e-2 * before - 1e-2 / (v_hat ** 0.5 + 1e-8)
    assert (p - before).tolist() == pytest.approx(want.tolist(), rel=1e-4)


@pytest.mark.parametrize("cls", [torch.optim.AdamW, FusedAdamW])
def test_zero_grad_without_none_cuts_a_create_graph_grad_from_its_graph(cls):
    # a gradient penalty (backward(create_graph=True)): the kept grad's graph grew a node every step
    w = torch.nn.Parameter(torch.ones(3))
    opt = cls([w], lr=1e-3)
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        with warnings.catch_warnings():  # torch warns of the reference cycle, once a process
            warnings.simplefilter("ignore")
            w.pow(3).sum().backward(create_graph=True)
        opt.step()
    opt.zero_grad(set_to_none=False)
    assert w.grad.grad_fn is None and not w.grad.requires_grad and w.grad.eq(0).all()


@pytest.mark.parametrize("cls", [torch.optim.AdamW, FusedAdamW])
def test_a_model_on_the_meta_device_steps(cls):
    # deferred init and memory planning build models on meta; FusedAdamW asked for pinned CUDA memory
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    opt = cls(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4, device="meta")).sum().backward()
    opt.step()
    assert opt.state[model.weight]["exp_avg"].device.type == "meta"


def test_a_torch_state_saved_with_capturable_or_differentiable_loads_them_cleared():
    # they change how torch's step runs (CUDA graphs, autograd through it), not the moments: resuming such a
    # run with FusedAdamW was refused
    (p,), theirs = _stepped(torch.optim.AdamW, lambda ps: ps, [1.0])
    sd = theirs.state_dict()
    sd["param_groups"][0].update(capturable=True, differentiable=True)
    (q,), ours = _stepped(FusedAdamW, lambda ps: ps, [2.0])
    ours.load_state_dict(sd)
    assert not ours.param_groups[0]["capturable"] and not ours.param_groups[0]["differentiable"]
    assert sd["param_groups"][0]["capturable"]  # the caller's dict is not edited
    assert torch.equal(ours.state[q]["exp_avg"], theirs.state[p]["exp_avg"])
    q.grad = torch.ones(3)
    ours.step()


def test_a_state_missing_an_adam_key_is_refused_at_load():
    # it loaded, then the first step failed (KeyError 'step') with the optimizer already changed
    (p,), opt = _stepped(FusedAdamW, lambda ps: ps, [1.0])
    sd = opt.state_dict()
    del sd["state"][0]["step"]
    before = {k: v.clone() for k, v in opt.state[p].items()}
    with pytest.raises(ValueError, match=r"param 0 has exp_avg, exp_avg_sq but not step: not an AdamW state"):
        opt.load_state_dict(sd)
    assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())
    opt.load_state_dict({**sd, "state": {0: {"slow": torch.zeros(3)}}})  # a caller's own keys alone: fine
    p.grad = torch.ones(3)
    opt.step()
