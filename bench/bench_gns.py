"""Training-step cost of measuring the gradient noise scale: off / micro-batch / per-example.

For each case (preset, members) the same population trains with GNS off, in
micro-batch mode and in per-example mode, measured on every step and on every
4th step (`--gns-every 4`); every mode uses the same micro-batching (so "off"
pays the same accumulation) and the modes are timed interleaved, step by step,
in this one process, so machine noise hits them alike. Reported: median step
time (the every-4 modes: mean over whole 4-step cycles) and the ratio to off,
as the median over rounds of the paired ratio (each mode against the "off"
step timed right beside it; every-4 modes: 4-step cycle against cycle), which
a shared machine's slow drifts do not move. Targets on this CPU: per-example
<= 1.10x, micro-batch <= 1.03x.

    python bench/bench_gns.py [--cases tiny:1,tiny:9,small:1] [--steps N] [--quick]

Timed steps per mode default to 48 for tiny and 12 for small (a tiny step is
~25 ms, so its ratios need more rounds to settle); --steps sets all.

Prints a table and writes bench/results/gns.csv.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from results_csv import at_least, exit_on_sigterm, quick_overrides, refuse_missing_cuda, results_dir, write_csv
from trajinv.config import PRESETS, Member, TrainConfig, preset
from trajinv.data import DataConfig, load_data
from trajinv.gns import GNSConfig
from trajinv.train import Trainer

# (label, GNS mode, every)
MODES = (("off", "off", 1), ("micro-batch", "micro-batch", 1), ("per-example", "per-example", 1),
         ("micro-batch/4", "micro-batch", 4), ("per-example/4", "per-example", 4))
TARGETS = {"off": 1.0, "micro-batch": 1.03, "per-example": 1.10}


def step_times(trainers: dict[str, Trainer], steps: int) -> dict[str, list[float]]:
    """Advance every trainer one step at a time, in turn; seconds per step per mode."""
    times = {mode: [] for mode in trainers}
    cuda = any(tr.cfg.device == "cuda" for tr in trainers.values())
    for _ in range(steps):
        for mode, tr in trainers.items():
            start = time.perf_counter()
            tr.train(until=tr.step + 1)
            if cuda:
                torch.cuda.synchronize()  # the step's kernels, not just their launches
            times[mode].append(time.perf_counter() - start)
    return times


def paired_ratio(times: list[float], off: list[float], every: int) -> float:
    """Median over rounds (every > 1: over whole cycles of `every` rounds) of time / off-time."""
    cycles = range(0, len(times) - every + 1, every)
    return statistics.median(sum(times[i : i + every]) / sum(off[i : i + every]) for i in cycles)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="tiny:1,tiny:9,small:1", help="preset:members, comma separated")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per mode, a multiple of 4 (default: 48 tiny, 12 small)")
    ap.add_argument("--batch", type=at_least(2), default=32)
    ap.add_argument("--micro", type=at_least(1), default=8)
    ap.add_argument("--quick", action="store_true", help="tiny only, 4 steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                    help="where the trainers run (cuda: the Triton kernels)")
    args = ap.parse_args()
    exit_on_sigterm()  # its TemporaryDirectory is removed on `timeout` too
    quick_overrides(ap, args, "cases", "steps")
    if args.steps is not None and (args.steps <= 0 or args.steps % 4):
        ap.error(f"--steps must be a positive multiple of 4 (one measured step in four: whole cycles), got {args.steps}")
    if args.batch % args.micro or args.batch // args.micro < 2:
        ap.error(f"--micro {args.micro} must split --batch {args.batch} into two or more equal micro-batches")
    refuse_missing_cuda(ap, args.device)
    cases = ["tiny:1"] if args.quick else args.cases.split(",")
    bad = [c for c in cases if not re.fullmatch(r"[\w-]+:[1-9]\d*", c) or c.split(":")[0] not in PRESETS]
    if bad:
        ap.error(f"--cases: {bad[0]!r} is not preset:members with a preset of {', '.join(PRESETS)}")
    if len(set(cases)) < len(cases):  # measured twice under one key
        ap.error(f"--cases repeats a case: {args.cases}; give each once")
    default_steps = {"tiny": 48, "small": 12}
    data = load_data(DataConfig())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            name, k = case.split(":")
            members = tuple(Member(8e-3 * 2 ** (i % 3 - 1), 1.0) for i in range(int(k)))
            model = preset(name, vocab_size=data.vocab_size)
            trainers = {}
            for label, mode, every in MODES:
                # eval and logging far apart: the timed steps are training steps only
                cfg = TrainConfig(model=model, members=members, steps=10**6, batch_size=str(args.batch),
                                  micro_batch=args.micro, eval_every=10**9, eval_seqs=8, log_every=10**9,
                                  checkpoint_every=0, gns=GNSConfig(mode=mode, precond_warmup=1, every=every),
                                  device=args.device)
                trainers[label] = Trainer(cfg, data, Path(tmp) / f"{case}-{label}".replace("/", "-"))
            steps = 4 if args.quick else args.steps or default_steps.get(name, 12)
            step_times(trainers, 4)  # warm-up, and past the identity-W step; cycles stay aligned
            times = step_times(trainers, steps)
            for label, mode, every in MODES:
                t = statistics.median(times[label]) if every == 1 else statistics.mean(times[label])
                ratio = paired_ratio(times[label], times["off"], every)
                rows.append({"preset": name, "members": int(k), "mode": label, "steps": steps, "step_ms": t * 1e3,
                             "ratio_to_off": ratio, "target": TARGETS[mode], "meets_target": ratio <= TARGETS[mode]})
    print(f"device={args.device} batch={args.batch} micro={args.micro} threads={torch.get_num_threads()}")
    print(f"{'preset':8s} {'K':>3s} {'mode':14s} {'step ms':>9s} {'x off':>7s} {'target':>7s}")
    for r in rows:
        print(f"{r['preset']:8s} {r['members']:3d} {r['mode']:14s} {r['step_ms']:9.1f} {r['ratio_to_off']:7.3f} "
              f"{r['target']:7.2f}{'' if r['meets_target'] else '  MISSED'}")
    print("step ms: the median step, or for a mode measured one step in four the mean over whole cycles; "
          "x off: the median over cycles of their time against the same cycles off")
    write_csv(results_dir(args.quick) / "gns.csv", rows)


if __name__ == "__main__":
    main()
