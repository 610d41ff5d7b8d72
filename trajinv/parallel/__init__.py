"""Scale-out: every device of a node, many nodes on Ray, one population over several ranks.

- `devices`: `--devices` lists (cpu,cpu / cuda:0,cuda:1 / all) and pinning a worker to its
  device, cores and threads.
- `memory`: a population's bytes from its config; how many members fit a device.
- `worker`: one population trained by a worker (the unit of work of the pool and of Ray).
- `pool`: one spawned worker process per device of this node, fed from a queue.
- `cluster`: each population a Ray task (optional extra `trajinv[ray]`).
- `runner`: a sweep through either backend, summary.csv in population order, failures as rows.
- `ddp`: one population data-parallel over torchrun ranks (torch.distributed).

`trajinv.sweep.run_sweep(..., devices=..., ray=...)` and the Trainer's `dist` argument are
the entry points; docs/design.md, section "Scale-out", explains the choices.
"""
