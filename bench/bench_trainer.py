"""Trainer throughput: against a plain PyTorch loop, and a population against sequential runs.

Two comparisons, each measured in this one process so the ratios are fair on a
noisy machine:

1. tokens/s of `trajinv.train.Trainer` (K=1, fused optimizer, logging, per-member
   clipping) over a plain loop of the same model and batch (torch.optim.AdamW,
   clip_grad_norm_, nothing else). Ratio near 1 means the trainer adds nothing.
2. One K-member population against K sequential K=1 runs of the same steps:
   the speedup the member axis buys for an lr x wd grid.

    python bench/bench_trainer.py [--preset tiny] [--steps 30] [--members 9] [--quick]

Prints a table and writes bench/results/trainer.csv.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from results_csv import at_least, exit_on_sigterm, quick_overrides, results_dir, write_csv
from trajinv.config import PRESETS, Member, OptimConfig, TrainConfig, preset
from trajinv.data import DataConfig, load_data, sample_batch
from trajinv.model import GPT
from trajinv.train import Trainer



def plain_loop(cfg: TrainConfig, data, steps: int, batch: int) -> float:
    """Seconds for `steps` of the simplest correct loop over the same model."""
    model = GPT(cfg.model, members=1)
    model.init_weights(torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.members[0].lr, weight_decay=cfg.members[0].wd,
                            betas=cfg.optim.betas)
    start = time.perf_counter()
    for step in range(steps):
        x, y = sample_batch(data.train, batch, cfg.model.context, 0, step)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip)
        opt.step()
    return time.perf_counter() - start


def trainer_run(cfg: TrainConfig, data) -> float:
    """Seconds for cfg.steps of the trainer (no eval inside the timed steps but the last)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, data, tmp)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=list(PRESETS))
    ap.add_argument("--steps", type=at_least(1), default=30)
    ap.add_argument("--batch", type=at_least(1), default=32)
    ap.add_argument("--members", type=at_least(1), default=9)
    ap.add_argument("--quick", action="store_true", help="few steps, 3 members")
    args = ap.parse_args()
    exit_on_sigterm()  # its TemporaryDirectory is removed on `timeout` too
    quick_overrides(ap, args, "steps", "members")
    steps, members = (8, 3) if args.quick else (args.steps, args.members)
    data = load_data(DataConfig())
    model = preset(args.preset, vocab_size=data.vocab_size)
    grid = tuple(Member(8e-3 * 2 ** (i % 3 - 1), 2.0 ** (i // 3 - 1)) for i in range(members))
    base = TrainConfig(model=model, members=grid[:1], steps=steps, batch_size=str(args.batch),
                       optim=OptimConfig(name="fused"), eval_every=10**9, eval_seqs=8,
                       log_every=10, checkpoint_every=0)
    tokens = steps * args.batch * model.context

    # warm-up both sides (allocator, thread pools, first-call dispatch) before timing
    plain_loop(base, data, 2, args.batch)
    trainer_run(TrainConfig(**{**base.__dict__, "steps": 2}), data)
    t_plain = plain_loop(base, data, steps, args.batch)
    t_one = trainer_run(base, data)
    t_pop = trainer_run(TrainConfig(**{**base.__dict__, "members": grid}), data)
    t_seq = sum(trainer_run(TrainConfig(**{**base.__dict__, "members": (m,)}), data) for m in grid)

    rows = [
        {"comparison": "plain torch loop (K=1)", "seconds": t_plain, "tokens_per_s": tokens / t_plain, "ratio": 1.0},
        {"comparison": "trajinv trainer (K=1)", "seconds": t_one, "tokens_per_s": tokens / t_one,
         "ratio": t_plain / t_one},
        {"comparison": f"{members} sequential K=1 runs", "seconds": t_seq, "tokens_per_s": members * tokens / t_seq,
         "ratio": 1.0},
        {"comparison": f"one K={members} population", "seconds": t_pop, "tokens_per_s": members * tokens / t_pop,
         "ratio": t_seq / t_pop},
    ]
    print(f"preset={args.preset} steps={steps} batch={args.batch} context={model.context} "
          f"threads={torch.get_num_threads()}")
    print(f"{'comparison':32s} {'seconds':>8s} {'member-tokens/s':>16s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['comparison']:32s} {r['seconds']:8.2f} {r['tokens_per_s']:16.0f} {r['ratio']:7.2f}")
    print("ratio: trainer throughput / plain loop, and population speedup over sequential runs")
    write_csv(results_dir(args.quick) / "trainer.csv", rows)


if __name__ == "__main__":
    main()
