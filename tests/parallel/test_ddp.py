"""One population over two gloo ranks on CPU: the single process's numbers, GNS from the ranks, resume,
rank 0 writes, one-line errors on every rank, and `torchrun -m trajinv train` end to end."""

import csv
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import spawned
import torch
import torch.multiprocessing as tmp
from helpers import metrics_without_time

from trajinv.checkpoint import has_checkpoint
from trajinv.config import GNSConfig, OptimConfig
from trajinv.parallel.ddp import DistContext
from trajinv.train import Trainer

KEYS = ("train_loss", "grad_norm", "precond_grad_norm", "weight_norm", "update_norm", "val_loss")
GNS_KEYS = ("gns_grad_norm", "gns_grad_norm_w", "g2", "g2_w", "tr_sigma", "tr_w_sigma", "b_simple", "b_precond")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(cfg, run_dir, out, until=None, world=2):
    out.mkdir(parents=True, exist_ok=True)
    tmp.spawn(spawned.ddp_rank, args=(world, _port(), cfg, str(run_dir), str(out), until), nprocs=world)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


def _cfg(tiny_train_config, **kw):
    base = dict(steps=6, batch_size="8", eval_every=3, checkpoint_every=3, optim=OptimConfig(name="fused"),
                gns=GNSConfig(mode="micro-batch", precond_warmup=2))
    base.update(kw)
    return tiny_train_config(**base)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_data):
    """Six steps on two ranks, no local micro-batches: each rank's 4 sequences are GNS's small batch."""
    from trajinv.config import Member, ModelConfig, TrainConfig

    def tiny(**kw):  # tiny_train_config is function-scoped; the same settings
        base = dict(model=ModelConfig(d_model=32, n_layers=1, n_heads=2, context=16),
                    members=(Member(1e-2, 0.1), Member(2e-2, 0.5)), steps=8, batch_size="4",
                    optim=OptimConfig(name="torch"), eval_every=4, eval_seqs=8, log_every=1, checkpoint_every=3)
        base.update(kw)
        return TrainConfig(**base)

    root = tmp_path_factory.mktemp("ddp")
    cfg = _cfg(tiny)
    ranks = _ranks(cfg, root / "run", root / "out")
    return cfg, root / "run", ranks


def _close(got, want, rel=2e-5, abs=1e-7):
    return got == pytest.approx(want, rel=rel, abs=abs)


def test_two_ranks_give_the_single_process_losses_gradients_and_gns(two_ranks, tiny_data, tmp_path):
    cfg, run_dir, ranks = two_ranks
    # one process, same global batch of 8, split the way the ranks split it: GNS small batches of 4
    single = Trainer(replace(cfg, micro_batch=4), tiny_data, tmp_path)
    single.train()
    want, got = metrics_without_time(tmp_path), metrics_without_time(run_dir)
    assert len(got) == len(want) == 6 * 2  # rank 0 alone wrote: one line per step and member
    for g, w in zip(got, want):
        for key in KEYS + GNS_KEYS:
            assert (g[key] is None) == (w[key] is None) and (g[key] is None or _close(g[key], w[key])), key
    for name, p in single.model.named_parameters():  # the last step's reduced gradient, on both ranks
        assert torch.allclose(ranks[0]["grads"][name], p.grad, rtol=1e-5, atol=1e-8), name
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
        assert torch.allclose(ranks[0]["weights"][name], p.detach(), rtol=1e-5, atol=1e-7), name
    for key, value in single.last_gns.items():
        assert torch.allclose(ranks[1]["last_gns"][key], value, rtol=1e-4), key
    assert has_checkpoint(run_dir)  # rank 0 wrote it


@pytest.mark.parametrize("embeddings", [False, True])
def test_local_micro_batches_and_ranks_give_the_single_process_micro_batch_gns(tiny_train_config, tiny_data,
                                                                                  tmp_path, embeddings):
    """Two ranks each accumulating two micro-batches of 2: four small batches of 2, as one process with
    micro-batches of 2 has. With the embedding measured too: its big-batch |g|_W^2 was taken from a
    rank's own gradient, before the all-reduce (g2_w up to 50 % low, b_precond 2.2x high in a QA run)."""
    cfg = _cfg(tiny_train_config, steps=3, micro_batch=2, eval_every=3,
               gns=GNSConfig(mode="micro-batch", precond_warmup=2, embeddings=embeddings))
    _ranks(cfg, tmp_path / "ddp", tmp_path / "out")
    Trainer(cfg, tiny_data, tmp_path / "one").train()
    for g, w in zip(metrics_without_time(tmp_path / "ddp"), metrics_without_time(tmp_path / "one"), strict=True):
        for key in KEYS + GNS_KEYS:
            assert (g[key] is None) == (w[key] is None) and (g[key] is None or _close(g[key], w[key])), key


def test_close_frees_the_process_group(two_ranks):
    # the first torch.optim optimizer imports torch.distributed.nn, whose functions' defaults took the running
    # group (`group=group.WORLD`): close destroyed nothing, and the gloo threads met the interpreter's exit
    # (a rank of `torchrun -m trajinv train` aborted: "terminate called without an active exception")
    for rank in two_ranks[2]:
        assert not [t for t in rank["threads_after_close"] if "gloo" in t], rank["threads_after_close"]


def test_start_on_cuda_sets_the_rank_gpu_and_joins_nccl(monkeypatch):
    # no GPU here: the calls it makes are recorded (a local import once made `torch` unbound in start)
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    ctx = DistContext(rank=3, world_size=4, local_rank=1, local_world_size=2)
    ctx.start("cuda")
    assert calls == [("set_device", 1), ("nccl", {"rank": 3, "world_size": 4})] and ctx.backend == "nccl"
    ctx.start("cuda")  # idempotent
    assert len(calls) == 2


def test_two_rank_resume_is_bit_identical(two_ranks, tmp_path):
    cfg, run_dir, _ = two_ranks
    _ranks(cfg, tmp_path / "run", tmp_path / "a", until=5)  # stopped after step 5: the checkpoint is step 3
    ranks = _ranks(cfg, tmp_path / "run", tmp_path / "b")  # every rank loads it and goes on
    assert ranks[0]["step"] == ranks[1]["step"] == 6
    assert metrics_without_time(tmp_path / "run") == metrics_without_time(run_dir)


def _rank_env(rank, world, port):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    return env


TRAIN = ["--steps", "3", "--eval-every", "3", "--eval-seqs", "8", "--log-every", "1", "--warmup", "1",
         "--lr", "0.01", "--wd", "0.1", "--lr", "0.02", "--wd", "0.5", "--optimizer", "torch"]


def test_a_batch_that_does_not_split_fails_in_one_line_on_every_rank(tmp_path, tiny_data):
    port = _port()
    procs = [subprocess.Popen([sys.executable, "-m", "trajinv", "train", *TRAIN, "--batch-size", "6",
                               "--micro-batch", "2", "--out", str(tmp_path / "run")], env=_rank_env(r, 2, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)  # no rank waits for another: the check comes first
        assert p.returncode == 1
        assert err.strip().splitlines() == ["Error: batch size 6 does not split into 2 ranks x micro-batches "
                                            "of 2; use a multiple of 4"], err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs the ranks ask for")
def test_a_rank_without_its_gpu_fails_in_one_line(tmp_path, monkeypatch):
    # torchrun --nproc-per-node 2 ... --device cuda on a machine without two GPUs: every rank died in
    # torch.cuda.set_device with an AttributeError traceback
    from click.testing import CliRunner

    from trajinv.cli import main

    errors = []
    for rank in (0, 1):  # the same line on each (rank 0 passed, joined the group and waited for the other)
        for k, v in {"RANK": rank, "WORLD_SIZE": 2, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": 2}.items():
            monkeypatch.setenv(k, str(v))
        res = CliRunner().invoke(main, ["train", *TRAIN, "--batch-size", "8", "--device", "cuda",
                                        "--out", str(tmp_path / "run")])
        assert res.exit_code == 1 and not (tmp_path / "run").exists()
        errors.append(res.stderr.strip().splitlines())
    assert errors[0] == errors[1] and len(errors[0]) == 1, errors
    assert errors[0][0].startswith("Error: 2 ranks on this node need a GPU each: device 'cuda:1' requested but")


def test_torchrun_trains_one_population_like_one_process(tmp_path):
    # TMPDIR: torchrun's elastic agent leaves a torchelastic_* folder in the temp dir each launch
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TMPDIR": str(tmp_path)}
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(Path(sys.modules[Trainer.__module__].__file__).read_text())  # some real text
    common = [*TRAIN, "--batch-size", "8", "--data", str(corpus)]
    one = subprocess.run([sys.executable, "-m", "trajinv", "train", *common, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "trajinv", "train", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("lr=0.01,wd=0.1") == 1  # rank 0 alone reports
    rows = [list(csv.DictReader(open(tmp_path / d / "summary.csv"))) for d in ("one", "two")]
    for a, b in zip(*rows, strict=True):
        assert a["status"] == b["status"] == "done"
        for key in ("final_train_loss", "final_val_loss"):
            assert _close(float(b[key]), float(a[key])), key
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 1, 2, 2, 3, 3]


def test_context_from_the_torchrun_environment():
    assert not DistContext.from_env({}).active and DistContext.from_env({}).is_main
    ctx = DistContext.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert ctx.active and not ctx.is_main and ctx.local_world_size == 2  # no LOCAL_WORLD_SIZE: its own rank's need
    assert DistContext.from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                 "LOCAL_WORLD_SIZE": "4"}).local_world_size == 4
    assert ctx.shard(8) == slice(4, 8) and ctx.small_batch(8, 0) == 4 and ctx.small_batch(8, 2) == 2
    assert DistContext().shard(8) == slice(0, 8) and DistContext().small_batch(8, 0) == 8
    with pytest.raises(ValueError, match="RANK=2 WORLD_SIZE=2"):
        DistContext.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='two'"):  # the variable at fault is named
        DistContext.from_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="'x'"):
        DistContext.from_env({"RANK": "x"})


def test_world_size_one_is_a_single_process(tiny_train_config, tiny_data, tmp_path):
    cfg = tiny_train_config(steps=2)
    Trainer(cfg, tiny_data, tmp_path / "a").train()
    Trainer(cfg, tiny_data, tmp_path / "b", dist=DistContext.from_env({"RANK": "0", "WORLD_SIZE": "1"})).train()
    assert metrics_without_time(tmp_path / "a") == metrics_without_time(tmp_path / "b")


@pytest.mark.parametrize("command", ["sweep", "tune"])
def test_a_sweep_or_tune_under_torchrun_is_refused_before_it_writes(tmp_path, monkeypatch, command):
    # each rank ran the whole sweep into one --out: two writers of one metrics.jsonl (a line interleaved
    # mid-record, the rerun refused as malformed), exit 0
    from click.testing import CliRunner

    from trajinv.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    res = CliRunner().invoke(main, [command, "--steps", "4", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and not (tmp_path / "o").exists()
    assert res.stderr.strip().splitlines() == [
        f"Error: trajinv {command} does not run under torchrun (WORLD_SIZE=2): every rank would train the whole "
        f"{command} into one directory; spread its populations with --devices or --ray, and use torchrun for "
        "trajinv train"]


def test_a_rank_without_a_world_size_is_not_torchrun(monkeypatch):
    from trajinv.parallel.ddp import refuse_ranks

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "3")  # a scheduler's own variable: sweep never read it
    refuse_ranks("sweep")
    monkeypatch.setenv("WORLD_SIZE", "1")
    refuse_ranks("tune")
