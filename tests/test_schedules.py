import pytest

from trajinv.config import ScheduleConfig
from trajinv.schedules import BatchSchedule, lr_multiplier


def test_warmup_is_linear_then_constant():
    cfg = ScheduleConfig("constant", warmup=4)
    assert [lr_multiplier(s, 10, cfg) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_ends_at_min_ratio():
    cfg = ScheduleConfig("cosine", warmup=2, min_ratio=0.1)
    assert lr_multiplier(2, 102, cfg) == pytest.approx(1.0)
    assert lr_multiplier(52, 102, cfg) == pytest.approx(0.55)
    assert lr_multiplier(102, 102, cfg) == pytest.approx(0.1)


def test_wsd_stable_then_linear_decay():
    cfg = ScheduleConfig("wsd", warmup=0, decay_fraction=0.2, min_ratio=0.0)
    m = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert m[:80] == [1.0] * 80
    assert m[80] == pytest.approx(0.95) and m[99] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(m[80:], m[81:]))


def test_batch_schedule_parses_and_prints():
    bs = BatchSchedule.parse("8@0.2,32")
    assert bs.sizes == (8, 32) and bs.until == (0.2,)
    assert bs.max == 32 and str(bs) == "8@0.2,32"
    assert str(BatchSchedule.parse(" 8@.125 , 16@0.5,32")) == "8@0.125,16@0.5,32"
    assert str(BatchSchedule.parse("4@0.123456789,8")) == "4@0.123456789,8"  # no digits lost


@pytest.mark.parametrize("size, steps", [(32, 800), (1, 1), (7, 13), (256, 3)])
def test_constant_schedule_plans_exactly_the_steps(size, steps):
    """A constant batch trains `steps` steps of that batch, its budget being steps * size * context."""
    bs = BatchSchedule.parse(str(size))
    plan = bs.plan_for_steps(steps, 64)
    assert plan.counts == (steps,) and plan.steps == steps and plan.tokens == steps * size * 64
    assert [plan.at(s) for s in range(steps)] == [size] * steps
    assert bs.plan_for_tokens(plan.tokens, 64) == plan
    # A budget that is not a whole number of batches: the last step passes it by less than one batch.
    assert bs.plan_for_tokens(plan.tokens - 1, 64) == plan
    assert bs.plan_for_tokens(plan.tokens + 1, 64).steps == steps + 1


def test_switch_points_are_fractions_of_the_tokens():
    bs = BatchSchedule.parse("32@0.1,256")
    plan = bs.plan_for_tokens(256 * 64 * 100, 64)  # 100 batches of 256
    # 10% of the tokens = 10 batches of 256 = 80 steps of 32; the other 90% = 90 steps of 256.
    assert plan.counts == (80, 90) and plan.tokens == 256 * 64 * 100
    assert plan.tokens_before(80) == 32 * 64 * 80 == plan.tokens // 10
    assert [plan.at(s) for s in (0, 79, 80, 169)] == [32, 32, 256, 256]
    # The same budget at a constant 256 trains the same tokens in 100 steps.
    assert BatchSchedule.parse("256").plan_for_tokens(plan.tokens, 64).counts == (100,)
    three = BatchSchedule.parse("8@0.25,16@0.5,32").plan_for_tokens(32 * 40, 1)
    assert three.counts == (40, 20, 20) and three.tokens == 32 * 40


def test_a_stage_runs_until_its_share_is_reached():
    # Stage 1 ends at 0.5 * 160 = 80 tokens: 2 steps of 32 tokens reach 64 < 80, the third 96 >= 80.
    plan = BatchSchedule.parse("2@0.5,4").plan_for_tokens(160, 16)
    assert plan.counts == (3, 1) and plan.tokens == 160
    assert str(plan) == "3x2,1x4"


@pytest.mark.parametrize("text", ["8@0.2,32", "32@0.1,256", "8@0.25,16@0.5,32", "4@0.3,4", "1@0.01,1000"])
@pytest.mark.parametrize("steps", [3, 10, 11, 97, 800])
def test_step_plans_have_exactly_the_steps_and_round_trip(text, steps):
    """plan_for_steps(S) has S steps; it is the plan of the largest budget with S steps, so
    that budget gives it back and one token more gives another step."""
    bs = BatchSchedule.parse(text)
    try:
        plan = bs.plan_for_steps(steps, 16)
    except ValueError as e:  # too few steps for every stage to get one
        assert "too few" in str(e) and steps < 100
        return
    assert plan.steps == steps and all(n >= 1 for n in plan.counts)
    budget = max(t for t in range(plan.tokens - max(bs.sizes) * 16, plan.tokens + max(bs.sizes) * 16)
                 if sum(bs._counts(t, 16)) == steps)
    assert bs.plan_for_tokens(budget, 16) == plan
    assert sum(bs._counts(budget + 1, 16)) == steps + 1


def test_step_count_grows_one_step_at_a_time_for_growing_batches():
    """Why plan_for_steps always succeeds when sizes never decrease: every step count is reached."""
    for text in ("2@0.3,8", "3@0.1,5@0.6,7", "1@0.5,16"):
        bs = BatchSchedule.parse(text)
        counts = [sum(bs._counts(t, 3)) for t in range(1, 3000)]
        assert counts[0] == 1 and all(b - a in (0, 1) for a, b in zip(counts, counts[1:])), text


@pytest.mark.parametrize("call, match", [
    # One step of 32 at context 64 is 2048 tokens: the whole budget, so the 256 stage gets none.
    (lambda: BatchSchedule.parse("32@0.5,256").plan_for_tokens(2048, 64), "stage 2 .batch 256. no step"),
    (lambda: BatchSchedule.parse("8@0.2,32").plan_for_steps(1, 64), "1 steps are too few"),
    (lambda: BatchSchedule.parse("32").plan_for_tokens(0, 64), "tokens must be a positive integer, got 0"),
    (lambda: BatchSchedule.parse("32").plan_for_tokens(1.5, 64), "got 1.5"),
    (lambda: BatchSchedule.parse("32").plan_for_steps(-3, 64), "steps must be a positive integer, got -3"),
    (lambda: BatchSchedule.parse("32").plan_for_tokens(100, 64).at(2), "step 2 is outside"),
])
def test_plan_errors_name_the_bad_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("bad", ["", "x", "8@0.5", "8@0.5,0", "8@0.6,16@0.3,32", "-4", "8@0.5,16@0.5,32", "8@1,32"])
def test_bad_batch_schedule(bad):
    with pytest.raises(ValueError, match="batch"):
        BatchSchedule.parse(bad)


def test_bad_schedule_config():
    with pytest.raises(ValueError, match="linear"):
        ScheduleConfig("linear").validate()


def test_wsd_decays_to_min_ratio():
    cfg = ScheduleConfig("wsd", warmup=0, decay_fraction=0.2, min_ratio=0.1)
    m = [lr_multiplier(s, 100, cfg) for s in range(100)]
    assert m[:80] == [1.0] * 80
    assert m[80] == pytest.approx(1 - 0.9 / 20) and m[99] == pytest.approx(0.1)


def test_wsd_decay_length_rounds_to_nearest_step():
    # 0.17 * 10 = 1.7 -> 2 decay steps; 0.13 * 10 = 1.3 -> 1 decay step
    assert ScheduleConfig("wsd", decay_fraction=0.17).decay_steps(10) == 2
    assert ScheduleConfig("wsd", decay_fraction=0.13).decay_steps(10) == 1
    m = [lr_multiplier(s, 10, ScheduleConfig("wsd", warmup=0, decay_fraction=0.17)) for s in range(10)]
    assert m == pytest.approx([1.0] * 8 + [0.5, 0.0])


def test_plan_at_its_own_step_count_is_a_value_error():
    plan = BatchSchedule.parse("2@0.5,4").plan_for_tokens(160, 16)  # 3x2,1x4
    assert plan.at(plan.steps - 1) == 4
    with pytest.raises(ValueError, match="step 4 is outside"):
        plan.at(plan.steps)


def test_a_zero_switch_fraction_is_refused_at_parse_time():
    with pytest.raises(ValueError, match="increase inside"):
        BatchSchedule.parse("8@0,32")


def test_plan_for_steps_at_one_token_per_step():
    # size 1, context 1: a step is one token, the bisection's upper bound is tight
    assert BatchSchedule.parse("1").plan_for_steps(5, 1).counts == (5,)
    assert BatchSchedule.parse("1@0.5,1").plan_for_steps(6, 1).counts == (3, 3)


def test_bool_is_not_a_step_or_token_count():
    for call in (lambda: BatchSchedule.parse("8").plan_for_steps(True, 64),
                 lambda: BatchSchedule.parse("8").plan_for_tokens(True, 64),
                 lambda: BatchSchedule.parse("8").plan_for_tokens(512, True)):
        with pytest.raises(ValueError, match="positive integer, got True"):
            call()


def test_decreasing_sizes_that_the_bisection_cannot_hit_are_an_error():
    bs = BatchSchedule.parse("2@0.6,8@0.7,2")
    with pytest.raises(ValueError, match="exactly 7 steps"):
        bs.plan_for_steps(7, 1)
