"""Scale-out on one machine's CPUs: worker processes against threads, and DDP ranks against one process.

1. sweep: the same 4-population sweep (tiny preset, K members each) through
   `run_sweep(devices=...)` as 1 worker x all cores' threads and as one worker
   per core x 1 thread. A population gains less than linearly from a second
   thread (small kernels, serial Python per step), so independent workers
   should give more sweep throughput.
2. ddp: one K-member population, global batch B, trained by 1 process with all
   cores' threads against 2 gloo ranks x 1 thread each (trajinv.parallel.ddp):
   the same work split by data instead of by threads, plus one all-reduce per step.

Wall times include starting the worker processes (what a user waits for);
"train_s" is the training loop alone (the trainers' own clocks; for the sweep
their sum divided by the number of workers: each worker's share). member-tokens/s = members x steps x batch x context / wall
time. Configurations alternate over --repeats and the median is reported; on a
shared machine the ratio is what to read.

    python bench/bench_scale.py [--steps 40] [--members 9] [--repeats 2] [--quick]

Prints a table and writes bench/results/scale.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as tmp

from results_csv import at_least, exit_on_sigterm, quick_overrides, results_dir, write_csv
from trajinv.config import Member, OptimConfig, TrainConfig, preset
from trajinv.data import DataConfig, load_data
from trajinv.sweep import SweepSpec, run_sweep

DATA = DataConfig(max_tokens=1_000_000)


def _train_cfg(steps: int, batch: int) -> TrainConfig:
    return TrainConfig(model=preset("tiny"), steps=steps, batch_size=str(batch), optim=OptimConfig(name="fused"),
                       eval_every=steps, eval_seqs=32, log_every=steps, checkpoint_every=0)


def sweep_once(devices: list[str], steps: int, members: int, batch: int) -> tuple[float, float]:
    """(wall seconds, training seconds per worker) of a 4-population sweep on `devices`."""
    lrs = tuple(4e-3 * 2 ** (i / 2) for i in range(members))
    spec = SweepSpec(train=_train_cfg(steps, batch), data=DATA, lrs=lrs, wds=(0.25, 0.5, 1.0, 2.0),
                     population=members)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_sweep(spec, out, devices=devices)
        wall = time.perf_counter() - start
        train = _train_seconds(Path(out), len(devices))
    return wall, train


def _train_seconds(out: Path, workers: int) -> float:
    """Training seconds per worker: the populations' own clocks summed, over the workers."""
    secs = [json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])["seconds"]
            for d in sorted((out / "runs").iterdir())]
    return sum(secs) / workers


def _rank(rank: int, world: int, port: int, threads: int, cfg: TrainConfig, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from trajinv.parallel.ddp import DistContext
    from trajinv.train import Trainer

    ctx = DistContext(rank=rank, world_size=world, local_rank=rank)
    trainer = Trainer(cfg, load_data(DATA), out, dist=ctx)
    start = time.perf_counter()
    trainer.train()
    if rank == 0:
        Path(out, "train_seconds").write_text(str(time.perf_counter() - start))
    ctx.close()


def ddp_once(world: int, threads: int, steps: int, members: int, batch: int) -> tuple[float, float]:
    """(wall seconds, training seconds) of one population on `world` ranks x `threads` threads."""
    cfg = replace_members(_train_cfg(steps, batch), members)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        tmp.spawn(_rank, args=(world, port, threads, cfg, out), nprocs=world)
        wall = time.perf_counter() - start
        return wall, float(Path(out, "train_seconds").read_text())


def replace_members(cfg: TrainConfig, k: int) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, members=tuple(Member(4e-3 * 2 ** (i / 2), 1.0) for i in range(k)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=at_least(1), default=40)
    ap.add_argument("--members", type=at_least(1), default=9, help="K per population")
    ap.add_argument("--batch", type=at_least(1), default=32)
    ap.add_argument("--repeats", type=at_least(1), default=2)
    ap.add_argument("--quick", action="store_true", help="3 steps, K=2, batch 8, one repeat")
    args = ap.parse_args()
    exit_on_sigterm()  # its TemporaryDirectory is removed on `timeout` too
    quick_overrides(ap, args, "steps", "members", "batch", "repeats")
    steps, members, batch, repeats = (3, 2, 8, 1) if args.quick else (args.steps, args.members, args.batch,
                                                                       args.repeats)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load_data(DATA)  # tokenize once, outside the timings
    context = preset("tiny").context
    sweep_tokens = 4 * members * steps * batch * context  # 4 wds -> 4 populations of `members`
    ddp_tokens = members * steps * batch * context
    world = max(w for w in range(1, cores + 1) if batch % w == 0)  # one rank a core, as the batch splits
    configs = [("sweep", f"1 worker x {cores} threads", 1, cores, lambda: sweep_once(["cpu"], steps, members, batch),
                sweep_tokens),
               ("sweep", f"{cores} workers x 1 thread", cores, 1,
                lambda: sweep_once(["cpu"] * cores, steps, members, batch), sweep_tokens),
               ("ddp", f"world 1 x {cores} threads", 1, cores, lambda: ddp_once(1, cores, steps, members, batch),
                ddp_tokens),
               ("ddp", f"world {world} x 1 thread", world, 1, lambda: ddp_once(world, 1, steps, members, batch),
                ddp_tokens)]
    times: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(configs))}
    for _ in range(repeats):  # alternate, so a burst of load hits every configuration alike
        for i, c in enumerate(configs):
            times[i].append(c[4]())
    rows = []
    for i, (exp, name, workers, threads, _, tokens) in enumerate(configs):
        wall = statistics.median(t[0] for t in times[i])
        train = statistics.median(t[1] for t in times[i])
        base = 2 * (i // 2)  # the first configuration of each experiment
        base_wall = statistics.median(t[0] for t in times[base])
        base_train = statistics.median(t[1] for t in times[base])
        rows.append({"experiment": exp, "config": name, "workers": workers, "threads": threads,
                     "members": 4 * members if exp == "sweep" else members, "steps": steps, "batch": batch,
                     "wall_s": round(wall, 2), "train_s": round(train, 2),
                     "member_tokens_per_s": round(tokens / wall), "throughput_ratio": round(base_wall / wall, 3),
                     "train_ratio": round(base_train / train, 3), "repeats": repeats})
    print(f"{'experiment':10s} {'config':22s} {'wall s':>8s} {'train s':>8s} {'member-tok/s':>13s} "
          f"{'ratio':>6s} {'train ratio':>11s}")
    for r in rows:
        print(f"{r['experiment']:10s} {r['config']:22s} {r['wall_s']:8.2f} {r['train_s']:8.2f} "
              f"{r['member_tokens_per_s']:13d} {r['throughput_ratio']:6.3f} {r['train_ratio']:11.3f}")
    write_csv(results_dir(args.quick) / "scale.csv", rows)


if __name__ == "__main__":
    main()
