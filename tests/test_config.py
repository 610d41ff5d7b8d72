"""Configs are the one source of defaults: every CLI option agrees with its dataclass field."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import click
import pytest

from trajinv import cli
from trajinv.config import (
    DataConfig,
    GNSConfig,
    Member,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    choices,
    field_doc,
)

CONFIGS = [ModelConfig, OptimConfig, ScheduleConfig, Member, GNSConfig, DataConfig, TrainConfig]


def _defaults(command: click.Command) -> dict:
    return {p.name: p.default for p in command.params if isinstance(p, click.Option)}


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_cli_defaults_build_the_default_configs(command):
    """Configs built from nothing but the CLI's defaults equal the dataclasses' defaults."""
    o = _defaults(cli.main.commands[command])
    train, data = cli._configs(o)
    assert train == TrainConfig()
    assert data == DataConfig()


def test_every_common_option_names_its_field_default_and_choices():
    opts = {p.name: p for p in cli.main.commands["train"].params if isinstance(p, click.Option)}
    for cls, name, decls, overrides in cli._COMMON:
        if name is None:
            continue
        param = opts[decls[0].split("/")[0].lstrip("-").replace("-", "_") if decls else name]
        if "default" not in overrides:
            want = getattr(cls(), name) if cls is not Member else getattr(Member(), name)
            assert param.default == want, (cls.__name__, name)
        allowed = choices(cls, name)
        if allowed and "type" not in overrides:
            assert tuple(param.type.choices) == allowed, (cls.__name__, name)
    assert opts["lrs"].default == (Member().lr,) and opts["wds"].default == (Member().wd,)
    assert opts["batch_size"].default == TrainConfig().batch_size


def test_a_changed_default_is_caught(monkeypatch):
    """The agreement test above fails if a dataclass default and the CLI part ways."""
    o = _defaults(cli.main.commands["train"])
    o["eval_seqs"] = 256  # as if the option had its own literal default
    train, _ = cli._configs(o)
    assert train != TrainConfig()


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_has_a_docstring(cls):
    for f in dataclasses.fields(cls):
        assert field_doc(cls, f.name), f"{cls.__name__}.{f.name} has no docstring"


def test_choices_are_literals_and_validated():
    assert choices(ScheduleConfig, "kind") == ("constant", "cosine", "wsd")
    assert choices(TrainConfig, "kernels") == ("auto", "triton", "cpu")
    assert choices(TrainConfig, "steps") == ()
    with pytest.raises(ValueError, match="'cosin'"):
        ScheduleConfig(kind="cosin").validate()
    with pytest.raises(ValueError, match="'gpu'"):
        TrainConfig(device="gpu").validate()
    with pytest.raises(ValueError, match="'sometimes'"):
        GNSConfig(mode="sometimes")


def test_torch_is_an_alias_of_the_cpu_backend():
    assert TrainConfig(kernels="torch").kernels == "cpu"
    assert "torch" in cli.main.commands["train"].params[[p.name for p in cli.main.commands["train"].params]
                                                       .index("kernels")].type.choices


def test_a_token_budget_decides_the_steps():
    cfg = TrainConfig(tokens=32 * 64 * 100)  # 100 batches of 32 at context 64
    assert cfg.steps == 100 and cfg.batch_plan().tokens == 32 * 64 * 100
    # replace() re-derives: the budget, not a stale step count, decides.
    assert replace(cfg, batch_size="256").steps == 13  # 12.5 batches of 256: the 13th passes the budget
    assert replace(cfg, batch_size="32@0.5,64").steps == 50 + 25
    assert TrainConfig(steps=5, tokens=32 * 64 * 100).steps == 100
    assert TrainConfig().tokens is None and TrainConfig().batch_plan().counts == (800,)


@pytest.mark.parametrize("kw, match", [
    (dict(tokens=-1), "tokens must be a positive integer, got -1"),
    (dict(tokens=64, batch_size="8@0.5,x"), "8@0.5,x"),
])
def test_bad_token_budgets(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


@pytest.mark.parametrize("kw, match", [(dict(steps=1, batch_size="8@0.5,32"), "1 steps are too few"),
                                       (dict(eval_boot=1), "eval_boot must be 0 or >= 2, got 1")])
def test_validate_checks_the_plan_and_the_bootstrap(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw).validate()


def test_spec_differences_name_the_field_and_both_values():
    from trajinv.config import describe_differences, spec_differences

    a = {"train": {"steps": 20, "keep_checkpoints": 2, "optim": {"betas": [0.9, 0.95]}}, "population": 0}
    b = {"train": {"steps": 40, "keep_checkpoints": 5, "optim": {"betas": [0.9, 0.99]}}, "population": 0, "new": 1}
    assert spec_differences(a, a) == [] and spec_differences(a, {**a, "train": {**a["train"], "keep_checkpoints": 9}}) == []
    assert spec_differences(a, b) == ["new (absent there, 1 here)", "train.optim.betas ([0.9, 0.95] there, [0.9, 0.99] here)",
                                      "train.steps (20 there, 40 here)"]
    assert describe_differences(a, b, most=1) == "new (absent there, 1 here) and 2 more"
    assert spec_differences({"keep_checkpoints": 1}, {"keep_checkpoints": 2}) == ["keep_checkpoints (1 there, 2 here)"]


def test_a_warmup_as_long_as_the_run_is_a_warning_not_an_error():
    from trajinv.config import ScheduleConfig

    assert TrainConfig().warnings() == []
    (line,) = TrainConfig(steps=20).warnings()
    assert "--warmup 50 >= the run's 20 steps" in line
    assert TrainConfig(steps=20, schedule=ScheduleConfig(warmup=5)).warnings() == []
    TrainConfig(steps=20).validate()  # still a valid run
    short = dict(steps=8, schedule=ScheduleConfig(warmup=2))
    assert TrainConfig(**short).warnings() == []  # GNS off: its warm-up is moot
    (line,) = TrainConfig(**short, gns=GNSConfig(mode="micro-batch", precond_warmup=10)).warnings()
    assert "--gns-warmup 10 covers the run's 8 steps" in line and "B_precond is B_simple" in line
    assert TrainConfig(**short, gns=GNSConfig(mode="micro-batch", precond_warmup=7)).warnings() == []
    # measured every 4th step (0, 4): step 4 is still warm-up at --gns-warmup 5, step 8 is past the run
    (line,) = TrainConfig(**short, gns=GNSConfig(mode="micro-batch", precond_warmup=5, every=4)).warnings()
    assert "every step the run measures (--gns-every 4 in 8 steps)" in line
    assert TrainConfig(**short, gns=GNSConfig(mode="micro-batch", precond_warmup=4, every=4)).warnings() == []


def test_a_warmup_running_into_the_wsd_decay_is_a_warning():
    # --steps 6 --warmup 5 --decay-fraction 0.5: the lr climbed to its peak, then dropped to 0 in one step
    from trajinv.config import ScheduleConfig
    from trajinv.schedules import lr_multiplier

    wsd = ScheduleConfig(kind="wsd", warmup=5, decay_fraction=0.5)
    assert [lr_multiplier(s, 6, wsd) for s in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 0.0]  # what it trained
    (line,) = TrainConfig(steps=6, schedule=wsd).warnings()
    assert "--warmup 5 runs into the WSD decay (its last 3 of 6 steps)" in line and "only 1 step" in line
    assert TrainConfig(steps=6, schedule=ScheduleConfig(kind="wsd", warmup=3, decay_fraction=0.5)).warnings() == []
    assert TrainConfig(steps=6, schedule=ScheduleConfig(kind="cosine", warmup=5)).warnings() == []
    (line,) = TrainConfig(steps=4, schedule=ScheduleConfig(kind="wsd", warmup=4, decay_fraction=1.0)).warnings()
    assert "the whole run is warmup" in line  # not "never reaches its peak": the last step does


def test_a_member_whose_decay_would_flip_the_weights_is_refused():
    # torch decays p *= 1 - lr*wd: at lr*wd >= 1 that zeroes or flips the weights every step
    with pytest.raises(ValueError, match=r"member lr=10,wd=1: lr\*wd = 10 >= 1"):
        TrainConfig(members=(Member(lr=4e-3, wd=1.0), Member(lr=10.0, wd=1.0))).validate()
    with pytest.raises(ValueError, match=r"wd = 2 >= 1"):  # independent mode decays by wd * schedule
        TrainConfig(members=(Member(lr=1e-3, wd=2.0),), optim=OptimConfig(decay_mode="independent")).validate()
    TrainConfig(members=(Member(lr=10.0, wd=1.0),), optim=OptimConfig(decay=())).validate()  # nothing decays
    TrainConfig(members=(Member(lr=1e-3, wd=0.0),)).validate()


def test_gns_embeddings_without_gns_is_a_warning():
    assert any("--gns-embeddings has no effect with --gns off" in w
               for w in TrainConfig(gns=GNSConfig(mode="off", embeddings=True)).warnings())
