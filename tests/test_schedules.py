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


def test_batch_schedule_stages():
    bs = BatchSchedule.parse("8@0.2,32")
    assert [bs.at(s, 10) for s in range(10)] == [8, 8] + [32] * 8
    assert bs.max == 32 and str(bs) == "8@0.2,32"
    assert BatchSchedule.parse("16").at(5, 10) == 16


@pytest.mark.parametrize("bad", ["", "x", "8@0.5", "8@0.5,0", "8@0.6,16@0.3,32", "-4"])
def test_bad_batch_schedule(bad):
    with pytest.raises(ValueError, match="batch"):
        BatchSchedule.parse(bad)


def test_bad_schedule_config():
    with pytest.raises(ValueError, match="linear"):
        ScheduleConfig("linear").validate()
