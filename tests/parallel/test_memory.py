"""Population sizing: the byte estimate against built tensors and measured memory; members split to fit."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from trajinv.config import GNSConfig, Member, ModelConfig, TrainConfig, preset
from trajinv.data import DataConfig
from trajinv.model import GPT, count_params
from trajinv.parallel import memory
from trajinv.parallel.memory import (estimate_population_bytes, fit_members, params_per_member, size_populations,
                                     spread_size)
from trajinv.sweep import SweepSpec, run_sweep


@pytest.mark.parametrize("name", ["tiny", "small", "gpt-164m"])
def test_params_per_member_counts_the_model(name):
    cfg = preset(name, vocab_size=preset(name).vocab_size or 256)
    if name == "gpt-164m":
        assert params_per_member(cfg) == 162_220_800  # docs/design.md's table; too big to build here
    else:
        assert params_per_member(cfg) == count_params(GPT(cfg, members=3))


def test_state_part_matches_the_tensors_of_a_trained_step(tiny_data, tmp_path):
    """Weights + grads + Adam states of a real Trainer after a step: what the per-parameter bytes count
    (the estimate adds 8 B/param of optimizer scratch that the native CPU path does not use)."""
    from trajinv.train import Trainer

    model = ModelConfig(d_model=64, n_layers=2, n_heads=4, context=32, vocab_size=256)
    cfg = TrainConfig(model=model, members=(Member(), Member(2e-2, 0.5), Member(4e-3, 2.0)), steps=1,
                      batch_size="2", eval_seqs=2, checkpoint_every=0)
    tr = Trainer(cfg, tiny_data, tmp_path)
    tr.train()
    tensors = [p for p in tr.model.parameters()] + [p.grad for p in tr.model.parameters()]
    tensors += [t for k, t in tr.optimizer.state_tensors().items() if k.endswith(("exp_avg", "exp_avg_sq"))]
    measured = sum(t.numel() * t.element_size() for t in tensors)
    P, K = params_per_member(model), 3
    assert measured == P * K * 16  # weights 4 + grads 4 + Adam m 4 + v 4
    acts_free = estimate_population_bytes(model, K, 1, 0) - int(K * 32 * memory.activation_elements_per_token(model)
                                                                * 4)
    assert acts_free == P * K * sum(memory.STATE_BYTES.values())


_MEASURE = textwrap.dedent("""
    import json, sys, tempfile
    import torch
    torch.set_num_threads(1)
    from trajinv.config import GNSConfig, Member, TrainConfig, preset
    from trajinv.data import DataConfig, load_data
    from trajinv.train import Trainer
    K, B, micro, gns = json.loads(sys.argv[1])
    data = load_data(DataConfig(max_tokens=200_000))
    def run(model, K, B, micro, gns, steps):
        cfg = TrainConfig(model=model, members=tuple(Member(1e-3 * (k + 1), 0.1) for k in range(K)), steps=steps,
                          batch_size=str(B), micro_batch=micro, eval_every=10**6, eval_seqs=2, checkpoint_every=0,
                          gns=GNSConfig(mode=gns))
        with tempfile.TemporaryDirectory() as d:
            Trainer(cfg, data, d).train()
    run(preset("tiny", vocab_size=256), 1, 2, 1 if gns == "micro-batch" else 0, gns, 1)  # warm: kernels, allocator
    def status(key):  # kB
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
    open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from the current RSS
    base = status("VmRSS:")
    run(preset("tiny", vocab_size=256), K, B, micro, gns, 2)
    print(json.dumps((status("VmHWM:") - base) * 1024))
""")


@pytest.mark.parametrize("K, B, micro, gns", [(9, 32, 0, "off"), (6, 32, 8, "micro-batch")])
def test_estimate_is_within_a_factor_1_5_of_measured_peak_memory(K, B, micro, gns, tiny_data):
    """Peak RSS growth of two CPU training steps in a fresh process (after a warm-up that loads the
    kernels; the token cache exists, `tiny_data`) against the estimate: within 1.5x either way.
    The peak is the kernel's high-water mark, reset just before the measured run (Linux)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to reset and read the peak RSS")
    proc = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps([K, B, micro, gns])], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    est = estimate_population_bytes(preset("tiny", vocab_size=256), K, B, micro, gns)
    assert measured / 1.5 <= est <= measured * 1.5, (est, measured)


def test_estimate_grows_with_each_input_and_refuses_bad_ones():
    m = preset("tiny", vocab_size=256)
    base = estimate_population_bytes(m, 4, 32)
    assert estimate_population_bytes(m, 8, 32) > base and estimate_population_bytes(m, 4, 64) > base
    assert estimate_population_bytes(m, 4, 32, micro_batch=8) < base  # activations of 8, not 32, sequences
    assert estimate_population_bytes(m, 4, 32, gns_mode="micro-batch") > base
    assert estimate_population_bytes(m, 4, 32, dtype="bf16") < base
    with pytest.raises(ValueError, match="fp16"):
        estimate_population_bytes(m, 4, 32, dtype="fp16")
    with pytest.raises(ValueError, match="-1"):
        estimate_population_bytes(m, -1, 32)


def test_fit_members_is_the_largest_size_that_fits():
    m = preset("small", vocab_size=256)
    budget = estimate_population_bytes(m, 5, 16) + 1
    assert fit_members(m, 9, 16, 0, "off", "fp32", budget) == 5
    assert fit_members(m, 9, 16, 0, "off", "fp32", 10**15) == 9
    assert fit_members(m, 9, 16, 0, "off", "fp32", 1) == 1  # never 0: the run reports the out-of-memory


def _spec(**kw):
    return SweepSpec(train=TrainConfig(model=preset("small"), steps=2, eval_seqs=8, gns=GNSConfig()),
                     data=DataConfig(max_tokens=200_000), lrs=(0.01, 0.02, 0.04), wds=(0.5, 1.0), **kw)


def test_size_populations_fits_keeps_the_users_and_the_stored_size(tmp_path):
    model = preset("small", vocab_size=256)
    four = estimate_population_bytes(model, 4, 32)
    free = int(four / memory.SAFETY["cuda"]) + 1
    assert size_populations(_spec(), tmp_path, lambda: free, "cuda").population == 4
    assert size_populations(_spec(), tmp_path, lambda: 10**15, "cuda").population == 0  # all 6 fit
    assert size_populations(_spec(population=2), tmp_path, lambda: 1 / 0, "cuda").population == 2  # not asked
    (tmp_path / "spec.json").write_text(json.dumps({"population": 3}))
    # nothing trained yet (it ran out of memory, say): the rerun sizes afresh
    assert size_populations(_spec(), tmp_path, lambda: free, "cuda").population == 4
    (tmp_path / "runs/bs32-p0").mkdir(parents=True)
    (tmp_path / "runs/bs32-p0/checkpoint-00000002.json").write_text("{}")
    assert size_populations(_spec(), tmp_path, lambda: 1 / 0, "cuda").population == 3  # a trained split is kept


@pytest.mark.parametrize("members, batch_sizes, workers, size", [
    (6, 1, 1, 6), (6, 1, 2, 3), (6, 1, 4, 2), (25, 1, 8, 4), (5, 1, 2, 3), (2, 1, 8, 1), (1, 1, 8, 1),
    (7, 1, 3, 3), (6, 2, 2, 6), (6, 2, 4, 3), (6, 2, 3, 6), (6, 3, 4, 6), (6, 4, 2, 6), (9, 2, 5, 5)])
def test_spread_size_ends_the_sweep_soonest_with_the_fewest_populations(members, batch_sizes, workers, size):
    assert spread_size(members, batch_sizes, workers) == size

    def makespan(s):  # rounds of the workers, a population's time its size
        return -(-batch_sizes * -(-members // s) // workers) * s

    # every size whose populations per batch size do not outnumber that batch size's share of the workers
    share = min(-(-workers // batch_sizes), members)
    sizes = [s for s in range(1, members + 1) if -(-members // s) <= share]
    best = min(makespan(s) for s in sizes)
    assert makespan(size) == best and size == max(s for s in sizes if makespan(s) == best)


def test_spread_size_refuses_nothing_to_spread():
    with pytest.raises(ValueError, match="workers >= 1"):
        spread_size(3, 1, 0)


def test_size_populations_spreads_members_over_the_workers_within_memory(tmp_path):
    model = preset("small", vocab_size=256)
    four = int(estimate_population_bytes(model, 4, 32) / memory.SAFETY["cuda"]) + 1
    assert size_populations(_spec(), tmp_path, lambda: 10**15, "cuda", workers=2).population == 3
    assert size_populations(_spec(), tmp_path, lambda: 10**15, "cuda", workers=8).population == 1
    assert size_populations(_spec(), tmp_path, lambda: 10**15, "cuda", workers=1).population == 0
    assert size_populations(_spec(), tmp_path, lambda: four, "cuda", workers=2).population == 3  # spread < fit
    two = int(estimate_population_bytes(model, 2, 32) / memory.SAFETY["cuda"]) + 1
    assert size_populations(_spec(), tmp_path, lambda: two, "cuda", workers=2).population == 2  # fit < spread
    assert size_populations(_spec(population=6), tmp_path, lambda: 1 / 0, "cuda", workers=8).population == 6


def test_sequential_sweep_splits_members_that_do_not_fit(tiny_train_config, tmp_path, monkeypatch):
    spec = SweepSpec(train=tiny_train_config(steps=1, eval_every=1), data=DataConfig(max_tokens=200_000),
                     lrs=(0.01, 0.02, 0.04), wds=(0.5,), batch_sizes=("4",))
    model = replace(spec.train.model, vocab_size=256)
    two = estimate_population_bytes(model, 2, 4)
    monkeypatch.setattr(memory, "free_bytes", lambda device, share=1: int(two / memory.SAFETY["cpu"]) + 1)
    rows = run_sweep(spec, tmp_path)
    assert [r["run_id"] for r in rows] == ["bs4-p0", "bs4-p0", "bs4-p1"]
    assert json.loads((tmp_path / "spec.json").read_text())["population"] == 2


def test_cuda_free_memory_counts_what_the_allocator_holds_unused(monkeypatch):
    # a tune's second stage runs in the process that trained the first: torch keeps those blocks cached,
    # and mem_get_info alone called them used (the stage got a fraction of the members it fits)
    from trajinv.parallel.memory import free_bytes

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 50 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: 2 * gib)
    assert free_bytes("cuda") == 58 * gib
    assert free_bytes("cuda:0", share=2) == 29 * gib
