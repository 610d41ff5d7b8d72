"""--devices lists, core shares and pinning a worker to its device."""

import os

import pytest
import torch

from trajinv.parallel.devices import Placement, device_kind, parse_devices, pin, placements, usable_devices


def test_parse_devices():
    assert parse_devices("cpu,cpu") == ("cpu", "cpu")
    assert parse_devices(["cuda:1", " cuda:0 "]) == ("cuda:1", "cuda:0")
    assert parse_devices("cuda") == ("cuda:0",)
    assert parse_devices("cuda:0,cuda:0") == ("cuda:0", "cuda:0")  # two populations share one GPU
    assert device_kind(("cuda:3",)) == "cuda" and device_kind(("cpu",)) == "cpu"


@pytest.mark.parametrize("text, match", [("gpu", "'gpu'"), ("cuda:x", "'cuda:x'"), ("cpu,cuda:1", "mixes"),
                                         (",", "empty")])
def test_bad_device_entries_are_one_line_errors(text, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_devices(text)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_all_without_a_gpu_says_so():
    with pytest.raises(ValueError, match="no CUDA device"):
        parse_devices("all")


def test_cpu_workers_split_the_cores():
    assert placements(["cpu", "cpu"], cores=[0, 1, 2, 3, 4]) == [Placement("cpu", (0, 1), 2),
                                                                 Placement("cpu", (2, 3), 2)]
    assert placements(["cpu"] * 3, cores=[5, 7]) == [Placement("cpu", (5,), 1), Placement("cpu", (7,), 1),
                                                      Placement("cpu", (5,), 1)]
    gpu = placements(["cuda:0", "cuda:1"], cores=list(range(8)))
    assert gpu == [Placement("cuda:0", (), 4), Placement("cuda:1", (), 4)] and gpu[0].kind == "cuda"


def test_pin_sets_the_visible_gpu_through_the_parents_mask(monkeypatch):
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
        pin(Placement("cuda:1", (), 1))
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6" and torch.get_num_threads() == 1
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        pin(Placement("cuda:2", (), 1))
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
        with pytest.raises(ValueError, match="cuda:1"):
            pin(Placement("cuda:1", (), 1))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_a_cuda_device_this_machine_lacks_is_one_line():
    assert usable_devices("cpu,cpu") == ("cpu", "cpu")
    for text in ("cuda:0", "cuda,cuda"):
        with pytest.raises(ValueError, match="no CUDA device is available") as e:
            usable_devices(text)
        assert "\n" not in str(e.value)


def test_a_cuda_index_past_the_visible_devices_is_one_line():
    with pytest.raises(ValueError, match="'cuda:99' requested") as e:
        usable_devices("cuda:99")
    assert "\n" not in str(e.value)
